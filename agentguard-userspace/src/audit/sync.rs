//! The log's background sync: fdatasync the files written since the last
//! sync, then write the checkpoint that names their last line. One thread,
//! one job at a time; the event loop never waits for the disk.
use std::{
    fs::File,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

use super::{AuditError, Checkpoint};

pub(super) struct SyncJob {
    pub files: Vec<File>,
    pub checkpoint: Checkpoint,
    pub path: PathBuf,
}

impl SyncJob {
    pub fn run(&self) -> Result<(), AuditError> {
        for f in &self.files {
            f.sync_data().map_err(AuditError::io(&self.checkpoint.log))?;
        }
        if self.checkpoint.seq > 0 {
            self.checkpoint.store(&self.path)?;
        }
        Ok(())
    }
}

/// One background thread that syncs and then writes the checkpoint.
pub(super) struct Syncer {
    tx: Option<mpsc::Sender<SyncJob>>,
    busy: Arc<AtomicBool>,
    pub synced_seq: Arc<AtomicU64>,
}

impl Syncer {
    pub fn start() -> Self {
        let (tx, rx) = mpsc::channel::<SyncJob>();
        let busy = Arc::new(AtomicBool::new(false));
        let synced_seq = Arc::new(AtomicU64::new(0));
        let (b, s) = (busy.clone(), synced_seq.clone());
        let spawned = std::thread::Builder::new().name("ag-log-sync".into()).spawn(move || {
            for job in rx {
                match job.run() {
                    Ok(()) => s.store(job.checkpoint.seq, Ordering::Relaxed),
                    Err(e) => tracing::error!(error = %e, "cannot sync the event log"),
                }
                b.store(false, Ordering::Release);
            }
        });
        match spawned {
            Ok(_) => Self { tx: Some(tx), busy, synced_seq },
            Err(e) => {
                tracing::error!(error = %e, "cannot start the log sync thread; syncing inline");
                Self { tx: None, busy, synced_seq }
            }
        }
    }

    pub fn busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }

    pub fn submit(&self, job: SyncJob) {
        let Some(tx) = &self.tx else {
            if let Err(e) = job.run() {
                tracing::error!(error = %e, "cannot sync the event log");
            }
            return;
        };
        self.busy.store(true, Ordering::Release);
        if let Err(mpsc::SendError(job)) = tx.send(job) {
            self.busy.store(false, Ordering::Release);
            if let Err(e) = job.run() {
                tracing::error!(error = %e, "cannot sync the event log");
            }
        }
    }

    pub fn wait_idle(&self, limit: Duration) {
        let start = Instant::now();
        while self.busy() && start.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
