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
    /// Rotated-away files not yet synced, then the current file.
    pub files: Vec<File>,
    /// The current file's bytes written since the previous job, which this
    /// job makes durable and then drops from the page cache.
    pub current: std::ops::Range<u64>,
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
        self.drop_cached();
        Ok(())
    }

    /// The log is written once and read rarely: once its bytes are on disk,
    /// give their page-cache pages back. A busy agent's log (hundreds of
    /// MB/s) then does not push the host's own data out of the cache, and
    /// the writer keeps reusing the same warm pages instead of taking fresh
    /// ones (on a VM whose free memory goes back to the hypervisor, a fresh
    /// page costs several times the copy: B4, docs/performance.md). Only
    /// whole pages below the end: the page being appended to stays, so the
    /// next write never reads it back. A failure costs only memory.
    fn drop_cached(&self) {
        use std::os::fd::AsRawFd as _;
        let Some((current, rotated)) = self.files.split_last() else { return };
        for f in rotated {
            // SAFETY: plain syscall on an open descriptor; (0, 0) is the whole file.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
        let page = page_size();
        let start = self.current.start / page * page;
        let end = self.current.end / page * page;
        if end > start {
            // SAFETY: as above; a range of whole pages that are on disk.
            unsafe { libc::posix_fadvise(current.as_raw_fd(), start as i64, (end - start) as i64, libc::POSIX_FADV_DONTNEED) };
        }
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as u64,
        _ => 4096,
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
