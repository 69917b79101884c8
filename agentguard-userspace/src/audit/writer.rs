//! Appending chained lines: batching, rotation by size, the fsync policy and
//! the chain-head checkpoint.
//!
//! Lines are built in memory and written with one write(2) per batch. A
//! write that fails (disk full) is cut back to the last whole line and the
//! batch is dropped: the file never holds a torn line and the chain never
//! skips a seq. Written data is fdatasync'ed on a background thread every
//! `fsync_interval`, and every 4 MiB under a flood; the checkpoint is
//! written only after the data it names is on disk, so after a crash the
//! checkpoint is never ahead of the log.
use std::{
    fs::{File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use super::{
    body_fields, compose_head, line_hash, log_files, parse_head, read_first_line, read_tail, rotated_numbers, rotated_path,
    sync::{SyncJob, Syncer},
    to_hex, AuditError, Checkpoint, Hash, GENESIS,
};

/// A batch is written once it reaches this size, even mid-drain.
const FLUSH_BYTES: usize = 1 << 20;
/// A sync starts once this much of the current file was written since the
/// last one, before the interval is up: under a flood the page cache the
/// log holds stays small and its pages are reused while warm (bench B5: on
/// this VM a fresh page costs several times the copy into it, and the
/// reader fell behind while the log took fresh ones), and a crash loses
/// less.
const SYNC_BYTES: u64 = 4 << 20;

#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub path: PathBuf,
    pub chain_head: PathBuf,
    /// Start a new file when this one would grow beyond it (0: never).
    pub rotate_bytes: u64,
    /// Rotated files to keep (0: all of them).
    pub keep: u32,
    /// fdatasync at most this often, in the background; zero: after every
    /// batch, before the next one is taken.
    pub fsync_interval: Duration,
}

/// Lines that could not be written: they are gone, and counted.
#[derive(Debug)]
pub struct WriteFailure {
    pub dropped: u64,
    pub error: io::Error,
}

/// What [`ChainWriter::open`] found.
#[derive(Debug, Default)]
pub struct Opened {
    /// The seq the chain continues from (`None`: a new chain).
    pub continues_from: Option<u64>,
    /// Unterminated bytes at the end of the log (a write cut short by a
    /// crash), removed.
    pub repaired_bytes: u64,
    /// The log does not end the way the checkpoint says: lines were removed
    /// or changed while no daemon was writing.
    pub mismatch: Option<String>,
}

pub struct ChainWriter {
    cfg: WriterConfig,
    host_json: String,
    file: File,
    size: u64,
    /// The last line the files hold.
    seq: u64,
    head: Hash,
    /// The last line assigned, buffered ones included.
    next_seq: u64,
    next_head: Hash,
    buf: Vec<u8>,
    buf_lines: u64,
    first_seq: u64,
    first_prev: Hash,
    dirty: bool,
    last_sync: Instant,
    /// Rotated-away files not yet synced.
    unsynced: Vec<File>,
    syncer: Syncer,
    written: u64,
    /// The current file's bytes handed to a sync job so far (each job drops
    /// what it synced from the page cache).
    cache_dropped_to: u64,
}

impl ChainWriter {
    /// Open the log and continue its chain from the last line, repairing a
    /// torn last line and comparing the end with the checkpoint.
    pub fn open(cfg: WriterConfig, host: &str) -> Result<(Self, Opened), AuditError> {
        for p in [&cfg.path, &cfg.chain_head] {
            if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(AuditError::io(dir))?;
            }
        }
        let mut opened = Opened::default();
        let files = log_files(&cfg.path)?;
        let mut last: Option<(u64, Hash)> = None;
        for f in files.iter().rev() {
            let tail = read_tail(f)?;
            if tail.partial > 0 && last.is_none() {
                tracing::warn!(file = %f.display(), bytes = tail.partial, "removing an unterminated last line (a write cut short by a crash)");
                let file = OpenOptions::new().write(true).open(f).map_err(AuditError::io(f))?;
                file.set_len(tail.complete_len).map_err(AuditError::io(f))?;
                opened.repaired_bytes += tail.partial;
            }
            if let Some(line) = tail.last {
                match parse_head(&line) {
                    Ok((h, _)) => last = Some((h.seq, line_hash(&line))),
                    Err(e) => opened.mismatch = Some(format!("the last line of {} is damaged ({e})", f.display())),
                }
                break;
            }
        }
        let checkpoint = match Checkpoint::load(&cfg.chain_head) {
            Ok(cp) => cp.filter(|cp| {
                let ours = cp.log == cfg.path;
                if !ours {
                    tracing::info!(checkpoint = %cfg.chain_head.display(), log = %cp.log.display(), "the checkpoint belongs to another log; starting a new one");
                }
                ours
            }),
            Err(e) => {
                opened.mismatch.get_or_insert(format!("{e}"));
                None
            }
        };
        if let Some(cp) = &checkpoint {
            if let Some(m) = compare_with_checkpoint(&files, last, cp)? {
                opened.mismatch.get_or_insert(m);
            }
        }
        let (seq, head) = match (last, &checkpoint) {
            (Some(l), _) => l,
            (None, Some(cp)) => (cp.seq, cp.hash()),
            (None, None) => (0, GENESIS),
        };
        let (first_seq, first_prev) = oldest_line(&cfg.path)?.unwrap_or((seq + 1, head));
        opened.continues_from = (seq > 0).then_some(seq);
        let file = open_append(&cfg.path)?;
        let size = file.metadata().map_err(AuditError::io(&cfg.path))?.len();
        let host_json = serde_json::to_string(host).unwrap_or_else(|_| "\"\"".into());
        let writer = Self {
            cfg,
            host_json,
            file,
            size,
            seq,
            head,
            next_seq: seq,
            next_head: head,
            buf: Vec::with_capacity(FLUSH_BYTES + 4096),
            buf_lines: 0,
            first_seq,
            first_prev,
            dirty: false,
            last_sync: Instant::now(),
            unsynced: Vec::new(),
            syncer: Syncer::start(),
            written: 0,
            cache_dropped_to: 0,
        };
        Ok((writer, opened))
    }

    /// Chain `body` (one serialized JSON object) and buffer it; returns its
    /// seq. May write earlier lines (a full batch, or before rotating).
    pub fn push(&mut self, body: &[u8]) -> Result<u64, PushError> {
        let inner = body_fields(body).map_err(PushError::Body)?;
        self.push_fields(|out| {
            if !inner.iter().all(u8::is_ascii_whitespace) {
                out.push(b',');
                out.extend_from_slice(inner);
            }
        })
    }

    /// Chain a line whose fields `fields` appends (each as `,"key":value`,
    /// never a raw newline) and buffer it; returns its seq. The line is built
    /// in place in the batch buffer: no copy before the write.
    pub fn push_fields(&mut self, fields: impl FnOnce(&mut Vec<u8>)) -> Result<u64, PushError> {
        let mut start = self.buf.len();
        compose_head(&mut self.buf, self.next_seq + 1, &self.next_head, &self.host_json);
        fields(&mut self.buf);
        self.buf.push(b'}');
        let len = (self.buf.len() - start) as u64 + 1;
        let pending = self.size + start as u64;
        if self.cfg.rotate_bytes > 0 && pending > 0 && pending + len > self.cfg.rotate_bytes {
            // Write what came before, rotate, and start the new file with
            // this line; its seq and prev stay right: rotation does not touch
            // the chain.
            let line = self.buf.split_off(start);
            if let Err(mut f) = self.flush() {
                // This line was never assigned: it is lost with the batch.
                f.dropped += 1;
                return Err(PushError::Write(f));
            }
            self.rotate();
            self.buf.extend_from_slice(&line);
            start = 0;
        }
        self.next_head = line_hash(&self.buf[start..]);
        self.next_seq += 1;
        self.buf.push(b'\n');
        self.buf_lines += 1;
        if self.buf.len() >= FLUSH_BYTES {
            self.flush().map_err(PushError::Write)?;
        }
        Ok(self.next_seq)
    }

    /// Write the buffered lines. Returns how many lines were written.
    pub fn flush(&mut self) -> Result<u64, WriteFailure> {
        if self.buf.is_empty() {
            return Ok(0);
        }
        let lines = self.buf_lines;
        self.buf_lines = 0;
        match self.file.write_all(&self.buf) {
            Ok(()) => {
                self.size += self.buf.len() as u64;
                self.buf.clear();
                self.seq = self.next_seq;
                self.head = self.next_head;
                self.written += lines;
                self.dirty = true;
                if self.cfg.fsync_interval.is_zero() {
                    self.sync_now();
                }
                Ok(lines)
            }
            Err(error) => {
                // Cut a partly written batch back to the last whole line, and
                // take the chain back to it.
                if let Err(e) = self.file.set_len(self.size) {
                    tracing::error!(log = %self.cfg.path.display(), error = %e, "cannot cut a failed write back: the log may end in a torn line");
                }
                self.buf.clear();
                self.next_seq = self.seq;
                self.next_head = self.head;
                Err(WriteFailure { dropped: lines, error })
            }
        }
    }

    /// Nothing buffered, nothing written since the last sync: no tick is
    /// needed for durability.
    pub fn settled(&self) -> bool {
        !self.dirty && self.buf.is_empty() && self.unsynced.is_empty()
    }

    /// Start a background sync when the interval has passed since the last,
    /// or [`SYNC_BYTES`] were written since (one sync at a time).
    pub fn maybe_sync(&mut self, now: Instant) {
        let due = now.duration_since(self.last_sync) >= self.cfg.fsync_interval || self.size.saturating_sub(self.cache_dropped_to) >= SYNC_BYTES;
        if self.dirty && due && !self.syncer.busy() {
            match self.sync_job() {
                Ok(job) => self.syncer.submit(job),
                Err(e) => tracing::error!(error = %e, "cannot prepare the log sync"),
            }
            self.last_sync = now;
        }
    }

    /// Sync everything written so far and write the checkpoint, now (at
    /// shutdown, or after every batch when the interval is zero).
    pub fn sync_now(&mut self) {
        self.syncer.wait_idle(Duration::from_secs(10));
        if !self.dirty {
            return;
        }
        match self.sync_job() {
            Ok(job) => match job.run() {
                Ok(()) => self.syncer.synced_seq.store(job.checkpoint.seq, Ordering::Relaxed),
                Err(e) => tracing::error!(error = %e, "cannot sync the event log"),
            },
            Err(e) => tracing::error!(error = %e, "cannot prepare the log sync"),
        }
        self.last_sync = Instant::now();
    }

    fn sync_job(&mut self) -> Result<SyncJob, AuditError> {
        let mut files = std::mem::take(&mut self.unsynced);
        files.push(self.file.try_clone().map_err(AuditError::io(&self.cfg.path))?);
        self.dirty = false;
        // The previous job dropped whole pages below its end; start at that page.
        let current = self.cache_dropped_to.min(self.size)..self.size;
        self.cache_dropped_to = self.size;
        Ok(SyncJob { files, current, checkpoint: self.checkpoint(), path: self.cfg.chain_head.clone() })
    }

    fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            log: self.cfg.path.clone(),
            seq: self.seq,
            hash: to_hex(&self.head),
            first_seq: self.first_seq,
            first_prev: to_hex(&self.first_prev),
            time: crate::events::now_rfc3339(),
        }
    }

    /// events.jsonl → events.jsonl.1 → … (the oldest beyond `keep` deleted).
    /// The buffer is empty here. A failure keeps writing to the current file.
    fn rotate(&mut self) {
        let base = self.cfg.path.clone();
        let numbers = match rotated_numbers(&base) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "cannot list rotated logs; not rotating");
                return;
            }
        };
        let keep = self.cfg.keep;
        let mut deleted = false;
        for &n in numbers.iter().rev() {
            let from = rotated_path(&base, n);
            let result = if keep > 0 && n >= keep {
                deleted = true;
                expire(&from)
            } else {
                std::fs::rename(&from, rotated_path(&base, n + 1))
            };
            if let Err(e) = result {
                tracing::error!(file = %from.display(), error = %e, "cannot rotate the event log; continuing in the current file");
                return;
            }
        }
        if let Err(e) = std::fs::rename(&base, rotated_path(&base, 1)) {
            tracing::error!(file = %base.display(), error = %e, "cannot rotate the event log; continuing in the current file");
            return;
        }
        match open_append(&base) {
            Ok(file) => {
                self.unsynced.push(std::mem::replace(&mut self.file, file));
                self.size = 0;
                self.cache_dropped_to = 0;
            }
            Err(e) => tracing::error!(error = %e, "cannot open a new log file; continuing in the rotated one"),
        }
        if deleted {
            match oldest_line(&base) {
                Ok(Some(first)) => (self.first_seq, self.first_prev) = first,
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "cannot read the oldest retained log line"),
            }
        }
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn head(&self) -> Hash {
        self.head
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    pub fn synced_seq(&self) -> u64 {
        self.syncer.synced_seq.load(Ordering::Relaxed)
    }

    pub fn config(&self) -> &WriterConfig {
        &self.cfg
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(transparent)]
    Body(AuditError),
    #[error("cannot write the event log: {}", .0.error)]
    Write(WriteFailure),
}

/// Take a rotated file out of the log (renamed at once, so the log's file
/// list no longer has it) and delete it on another thread: unlinking a large
/// file takes the filesystem a while, and the event loop must not wait.
fn expire(path: &Path) -> std::io::Result<()> {
    let mut gone = path.as_os_str().to_owned();
    gone.push(".expired");
    let gone = PathBuf::from(gone);
    std::fs::rename(path, &gone)?;
    let spawned = std::thread::Builder::new().name("ag-log-expire".into()).spawn({
        let gone = gone.clone();
        move || {
            if let Err(e) = std::fs::remove_file(&gone) {
                tracing::warn!(file = %gone.display(), error = %e, "cannot delete an expired log file");
            }
        }
    });
    if spawned.is_err() {
        std::fs::remove_file(&gone)?;
    }
    Ok(())
}

fn open_append(path: &Path) -> Result<File, AuditError> {
    OpenOptions::new().create(true).append(true).mode(0o640).open(path).map_err(AuditError::io(path))
}

/// seq and prev of the oldest retained line.
fn oldest_line(base: &Path) -> Result<Option<(u64, Hash)>, AuditError> {
    for f in log_files(base)? {
        if let Some(line) = read_first_line(&f)? {
            return Ok(parse_head(&line).ok().map(|(h, prev)| (h.seq, prev)));
        }
    }
    Ok(None)
}

/// Why the log's end disagrees with the checkpoint, if it does.
fn compare_with_checkpoint(files: &[PathBuf], last: Option<(u64, Hash)>, cp: &Checkpoint) -> Result<Option<String>, AuditError> {
    let Some((last_seq, last_hash)) = last else {
        return Ok(Some(format!("the log is empty or missing, but the checkpoint records seq {}", cp.seq)));
    };
    if last_seq < cp.seq {
        return Ok(Some(format!(
            "the log ends at seq {last_seq}, but the checkpoint records seq {}: lines {}..={} were removed",
            cp.seq,
            last_seq + 1,
            cp.seq
        )));
    }
    let found = if last_seq == cp.seq { Some(last_hash) } else { find_line_hash(files, cp.seq)? };
    Ok(match found {
        Some(h) if h == cp.hash() => None,
        Some(_) => Some(format!("the line with seq {} differs from the checkpoint", cp.seq)),
        None => Some(format!("no line with seq {} (the checkpoint's) is in the log", cp.seq)),
    })
}

/// The hash of the line with `seq`, searching the newest files first.
fn find_line_hash(files: &[PathBuf], seq: u64) -> Result<Option<Hash>, AuditError> {
    for f in files.iter().rev() {
        let text = std::fs::read(f).map_err(AuditError::io(f))?;
        for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            if parse_head(line).is_ok_and(|(h, _)| h.seq == seq) {
                return Ok(Some(line_hash(line)));
            }
        }
        let first = text.split(|&b| b == b'\n').next().and_then(|l| parse_head(l).ok());
        if first.is_some_and(|(h, _)| h.seq <= seq) {
            break;
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::verify::{verify, FailureKind};

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ag-writer-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    fn cfg(d: &Path, rotate_bytes: u64, keep: u32) -> WriterConfig {
        WriterConfig {
            path: d.join("events.jsonl"),
            chain_head: d.join("chain-head"),
            rotate_bytes,
            keep,
            fsync_interval: Duration::ZERO,
        }
    }

    fn write_n(w: &mut ChainWriter, n: u64) {
        for i in 0..n {
            w.push(format!("{{\"kind\":\"test\",\"i\":{i}}}").as_bytes()).expect("push");
        }
        w.flush().expect("flush");
    }

    #[test]
    fn chain_continues_across_rotation_and_reopen() {
        let d = dir("rotate");
        let c = cfg(&d, 600, 0);
        let (mut w, opened) = ChainWriter::open(c.clone(), "host").expect("open");
        assert_eq!(opened.continues_from, None);
        write_n(&mut w, 20);
        w.sync_now();
        assert!(rotated_path(&c.path, 2).exists(), "small files rotate");
        let (head, seq) = (w.head(), w.seq());
        drop(w);
        let (mut w, opened) = ChainWriter::open(c.clone(), "host").expect("reopen");
        assert_eq!((opened.continues_from, opened.mismatch), (Some(seq), None));
        assert_eq!(w.head(), head);
        write_n(&mut w, 5);
        w.sync_now();
        let cp = Checkpoint::load(&c.chain_head).expect("loads").expect("exists");
        let report = verify(&c.path, Some(&cp), None).expect("verifies");
        assert!(report.failure.is_none(), "{report:?}");
        assert_eq!((report.first_seq, report.last_seq, report.lines), (Some(1), Some(25), 25));
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn keep_deletes_the_oldest_and_the_checkpoint_follows() {
        let d = dir("keep");
        let c = cfg(&d, 400, 2);
        let (mut w, _) = ChainWriter::open(c.clone(), "host").expect("open");
        write_n(&mut w, 40);
        w.sync_now();
        assert!(!rotated_path(&c.path, 3).exists(), "only 2 rotated files are kept");
        let cp = Checkpoint::load(&c.chain_head).expect("loads").expect("exists");
        assert!(cp.first_seq > 1);
        let report = verify(&c.path, Some(&cp), None).expect("verifies");
        assert!(report.failure.is_none(), "{report:?}");
        // Deleting the oldest retained file is not rotation: caught.
        std::fs::remove_file(rotated_path(&c.path, 2)).expect("rm");
        let report = verify(&c.path, Some(&cp), None).expect("verifies");
        assert_eq!(report.failure.map(|f| f.kind), Some(FailureKind::FrontMissing));
        let _ = std::fs::remove_dir_all(d);
    }

    /// Pages of `path` in the page cache (mincore), and the page count.
    fn resident_pages(path: &Path) -> (usize, usize) {
        use std::os::fd::AsRawFd as _;
        let f = File::open(path).expect("open");
        let len = f.metadata().expect("stat").len() as usize;
        let page = 4096;
        let pages = len.div_ceil(page);
        // SAFETY: a private read-only mapping of an open file, unmapped below.
        let addr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0) };
        assert_ne!(addr, libc::MAP_FAILED, "mmap");
        let mut vec = vec![0u8; pages];
        // SAFETY: `vec` has one byte per page of the mapping.
        let rc = unsafe { libc::mincore(addr, len, vec.as_mut_ptr()) };
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(addr, len) };
        assert_eq!(rc, 0, "mincore");
        (vec.iter().filter(|b| **b & 1 == 1).count(), pages)
    }

    /// Synced log bytes leave the page cache (the kernel's own account,
    /// mincore), except the page still being appended to; bytes written
    /// after the sync stay until the next one.
    #[test]
    fn synced_lines_leave_the_page_cache() {
        // On the repo's disk: tmpfs (a possible /tmp) keeps its pages.
        let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ag-writer-cache");
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir");
        let c = cfg(&d, 0, 0);
        let (mut w, _) = ChainWriter::open(c.clone(), "host").expect("open");
        // fsync_interval zero: every flush syncs (and drops) at once.
        write_n(&mut w, 3000);
        let (resident, pages) = resident_pages(&c.path);
        assert!(pages > 50, "{pages} pages written");
        assert!(resident <= 1, "{resident} of {pages} synced pages still cached");
        // Bytes written while no sync runs stay cached until one does.
        let mut c2 = c.clone();
        c2.fsync_interval = Duration::from_secs(3600);
        drop(w);
        let (mut w, _) = ChainWriter::open(c2, "host").expect("reopen");
        write_n(&mut w, 3000);
        let (resident, _) = resident_pages(&c.path);
        assert!(resident > 50, "unsynced bytes are not dropped: {resident} pages cached");
        w.sync_now();
        let (resident, pages) = resident_pages(&c.path);
        assert!(resident <= 1, "after the sync: {resident} of {pages} pages still cached");
        let report = verify(&c.path, None, None).expect("verifies");
        assert!(report.failure.is_none(), "{report:?}");
        assert_eq!(report.lines, 6000);
        let _ = std::fs::remove_dir_all(d);
    }

    /// Under a flood a sync does not wait for the interval: 4 MiB written
    /// since the last one start the next.
    #[test]
    fn a_sync_starts_after_4_mib_whatever_the_interval() {
        let d = dir("syncbytes");
        let mut c = cfg(&d, 0, 0);
        c.fsync_interval = Duration::from_secs(3600);
        let (mut w, _) = ChainWriter::open(c, "host").expect("open");
        write_n(&mut w, 100);
        w.maybe_sync(Instant::now());
        w.syncer.wait_idle(Duration::from_secs(10));
        assert_eq!(w.synced_seq(), 0, "below 4 MiB the interval decides");
        let pad = "x".repeat(1000);
        for _ in 0..4500 {
            w.push(format!("{{\"kind\":\"test\",\"pad\":\"{pad}\"}}").as_bytes()).expect("push");
        }
        w.flush().expect("flush");
        w.maybe_sync(Instant::now());
        w.syncer.wait_idle(Duration::from_secs(10));
        assert_eq!(w.synced_seq(), w.seq(), "over 4 MiB written: synced before the interval");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn torn_tail_is_repaired_and_truncation_is_reported_at_open() {
        let d = dir("torn");
        let c = cfg(&d, 0, 0);
        let (mut w, _) = ChainWriter::open(c.clone(), "host").expect("open");
        write_n(&mut w, 5);
        w.sync_now();
        drop(w);
        let mut f = OpenOptions::new().append(true).open(&c.path).expect("open");
        f.write_all(b"{\"seq\":6,\"pr").expect("write");
        let (w, opened) = ChainWriter::open(c.clone(), "host").expect("reopen");
        assert_eq!((opened.repaired_bytes, opened.mismatch, w.seq()), (12, None, 5));
        drop(w);
        // Remove the last two lines behind the writer's back.
        let text = std::fs::read_to_string(&c.path).expect("read");
        let kept: Vec<&str> = text.lines().take(3).collect();
        std::fs::write(&c.path, format!("{}\n", kept.join("\n"))).expect("write");
        let (w, opened) = ChainWriter::open(c, "host").expect("reopen");
        assert!(opened.mismatch.as_deref().is_some_and(|m| m.contains("ends at seq 3")), "{opened:?}");
        assert_eq!(w.seq(), 3, "the chain continues from what is there");
        let _ = std::fs::remove_dir_all(d);
    }
}
