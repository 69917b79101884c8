//! The tamper-evident event log. Every line of events.jsonl carries the
//! SHA-256 of the line before it (`prev`), so changing, removing, inserting
//! or reordering a line breaks the chain. Rotation by size keeps the chain
//! across files: the first line of a new file chains to the last line of the
//! previous one. A chain-head checkpoint kept apart from the log (written
//! atomically by rename) records the seq and hash of the last synced line, so
//! a truncated tail is caught too.
//!
//! This file holds the pure pieces (hashing, line layout, file naming, the
//! checkpoint); [`writer`] appends, [`verify`] checks (`agentguard audit
//! verify`). docs/events.md describes the format.
use std::{
    ffi::OsString,
    fs::File,
    io::{self, BufRead as _, BufReader, Read as _, Seek as _, SeekFrom, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use thiserror::Error;

mod sync;
pub mod verify;
pub mod writer;

/// SHA-256 of one line, without its newline.
pub type Hash = [u8; 32];

/// The `prev` of the very first line of a chain.
pub const GENESIS: Hash = [0; 32];

#[derive(Debug, Error)]
pub enum AuditError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("checkpoint {}: {message}; move it aside to start a new one", path.display())]
    Checkpoint { path: PathBuf, message: String },
    #[error("an event must serialize to one JSON object on one line")]
    NotAnObject,
}

impl AuditError {
    pub fn io(path: &Path) -> impl FnOnce(io::Error) -> Self + '_ {
        move |source| Self::Io { path: path.to_owned(), source }
    }
}

pub fn line_hash(line: &[u8]) -> Hash {
    Sha256::digest(line).into()
}

pub fn to_hex(h: &Hash) -> String {
    let mut out = Vec::with_capacity(64);
    hex_into(&mut out, h);
    String::from_utf8(out).unwrap_or_default()
}

/// Append the hash as 64 lower-case hex digits.
pub fn hex_into(out: &mut Vec<u8>, h: &Hash) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = [0u8; 64];
    for (pair, b) in text.chunks_exact_mut(2).zip(h) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 15)];
    }
    out.extend_from_slice(&text);
}

pub fn from_hex(s: &str) -> Option<Hash> {
    let bytes = s.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

/// Append the start of a chained line: `{"seq":SEQ,"prev":"HEX","host":HOST`.
/// The writer's fields come first so a reader finds them without parsing
/// the rest; the event's fields follow, each as `,"key":value`, then `}`.
pub fn compose_head(out: &mut Vec<u8>, seq: u64, prev: &Hash, host_json: &str) {
    out.extend_from_slice(b"{\"seq\":");
    crate::events::json::uint(out, seq);
    out.extend_from_slice(b",\"prev\":\"");
    hex_into(out, prev);
    out.extend_from_slice(b"\",\"host\":");
    out.extend_from_slice(host_json.as_bytes());
}

/// The fields of `body` (one serialized JSON object, on one line) as
/// `,"key":value...`, for appending after [`compose_head`].
pub fn body_fields(body: &[u8]) -> Result<&[u8], AuditError> {
    match body {
        [b'{', inner @ .., b'}'] if !body.contains(&b'\n') => Ok(inner),
        _ => Err(AuditError::NotAnObject),
    }
}

/// The whole chained line for `body` (one serialized JSON object).
pub fn compose(out: &mut Vec<u8>, seq: u64, prev: &Hash, host_json: &str, body: &[u8]) -> Result<(), AuditError> {
    let inner = body_fields(body)?;
    compose_head(out, seq, prev, host_json);
    if !inner.iter().all(u8::is_ascii_whitespace) {
        out.push(b',');
        out.extend_from_slice(inner);
    }
    out.push(b'}');
    Ok(())
}

/// The fields of a line the chain is checked on.
#[derive(Debug, Deserialize)]
pub struct LineHead {
    pub seq: u64,
    pub prev: String,
    #[serde(default)]
    pub kind: Option<String>,
    /// Set on `audit_gap` lines: what the daemon found at start-up.
    #[serde(default)]
    pub reason: Option<String>,
}

pub fn parse_head(line: &[u8]) -> Result<(LineHead, Hash), String> {
    let head: LineHead = serde_json::from_slice(line).map_err(|e| format!("not a log line: {e}"))?;
    let prev = from_hex(&head.prev).ok_or_else(|| format!("prev {:?} is not a SHA-256 in hex", head.prev))?;
    Ok((head, prev))
}

/// `events.jsonl.N`: the N-th newest rotated file (N ≥ 1).
pub fn rotated_path(base: &Path, n: u32) -> PathBuf {
    let mut s = OsString::from(base.as_os_str());
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// N if `name` is `base_name.N` (N ≥ 1, no leading zero).
pub fn rotation_number(base_name: &str, name: &str) -> Option<u32> {
    let digits = name.strip_prefix(base_name)?.strip_prefix('.')?;
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The numbers of the rotated files that exist, ascending (1 is the newest).
pub fn rotated_numbers(base: &Path) -> Result<Vec<u32>, AuditError> {
    let dir = base.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let Some(base_name) = base.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(AuditError::io(dir)(e)),
    };
    let mut numbers: Vec<u32> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| rotation_number(base_name, n)))
        .collect();
    numbers.sort_unstable();
    Ok(numbers)
}

/// Every file of the log that exists, oldest first: `base.N` … `base.1`, `base`.
pub fn log_files(base: &Path) -> Result<Vec<PathBuf>, AuditError> {
    let mut files: Vec<PathBuf> = rotated_numbers(base)?.into_iter().rev().map(|n| rotated_path(base, n)).collect();
    if base.exists() {
        files.push(base.to_owned());
    }
    Ok(files)
}

/// The head of the chain, kept apart from the log (default
/// /var/lib/agentguard/chain-head): the last synced line's seq and hash, and
/// where the retained log starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The log this checkpoint belongs to.
    pub log: PathBuf,
    pub seq: u64,
    /// SHA-256 (hex) of the line with `seq`.
    pub hash: String,
    /// seq and prev of the oldest line still retained (rotation deletes old files).
    pub first_seq: u64,
    pub first_prev: String,
    pub time: String,
}

impl Checkpoint {
    /// The checkpoint at `path`; `None` when there is none yet.
    pub fn load(path: &Path) -> Result<Option<Self>, AuditError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(AuditError::io(path)(e)),
        };
        let cp: Self = serde_json::from_str(&text)
            .map_err(|e| AuditError::Checkpoint { path: path.to_owned(), message: e.to_string() })?;
        if from_hex(&cp.hash).is_none() || from_hex(&cp.first_prev).is_none() {
            return Err(AuditError::Checkpoint { path: path.to_owned(), message: "hash is not a SHA-256 in hex".into() });
        }
        Ok(Some(cp))
    }

    /// Write atomically: a temporary file next to it, synced, renamed over.
    pub fn store(&self, path: &Path) -> Result<(), AuditError> {
        let mut tmp = OsString::from(path.as_os_str());
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut text = serde_json::to_vec_pretty(self).map_err(|e| AuditError::io(path)(io::Error::other(e)))?;
        text.push(b'\n');
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(AuditError::io(&tmp))?;
        f.write_all(&text).map_err(AuditError::io(&tmp))?;
        f.sync_all().map_err(AuditError::io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(AuditError::io(path))?;
        Ok(())
    }

    pub fn hash(&self) -> Hash {
        from_hex(&self.hash).unwrap_or(GENESIS)
    }

    pub fn first_prev(&self) -> Hash {
        from_hex(&self.first_prev).unwrap_or(GENESIS)
    }
}

/// The end of a file: its last complete line, and the length of any
/// unterminated bytes after it (a write cut short).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tail {
    pub last: Option<Vec<u8>>,
    /// Bytes up to and including the last newline.
    pub complete_len: u64,
    pub partial: u64,
}

pub fn read_tail(path: &Path) -> Result<Tail, AuditError> {
    let err = AuditError::io(path);
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Tail::default()),
        Err(e) => return Err(err(e)),
    };
    let len = f.metadata().map_err(AuditError::io(path))?.len();
    // Read backwards in growing windows until two newlines (or the start) are seen.
    let mut window: u64 = 64 * 1024;
    loop {
        let start = len.saturating_sub(window);
        f.seek(SeekFrom::Start(start)).map_err(AuditError::io(path))?;
        let mut buf = Vec::with_capacity(usize::try_from(len - start).unwrap_or(0));
        f.read_to_end(&mut buf).map_err(AuditError::io(path))?;
        let Some(end) = buf.iter().rposition(|&b| b == b'\n') else {
            if start == 0 {
                return Ok(Tail { last: None, complete_len: 0, partial: len });
            }
            window *= 4;
            continue;
        };
        let complete_len = start + end as u64 + 1;
        match buf[..end].iter().rposition(|&b| b == b'\n') {
            Some(begin) => {
                return Ok(Tail { last: Some(buf[begin + 1..end].to_vec()), complete_len, partial: len - complete_len });
            }
            None if start == 0 => {
                return Ok(Tail { last: Some(buf[..end].to_vec()), complete_len, partial: len - complete_len });
            }
            None => window *= 4,
        }
    }
}

/// The first line of a file (without its newline), if it has a complete one.
pub fn read_first_line(path: &Path) -> Result<Option<Vec<u8>>, AuditError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(AuditError::io(path)(e)),
    };
    let mut line = Vec::new();
    BufReader::new(f).read_until(b'\n', &mut line).map_err(AuditError::io(path))?;
    Ok(line.pop().filter(|&b| b == b'\n').map(|_| line))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let h = line_hash(b"abc");
        assert_eq!(to_hex(&h), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(from_hex(&to_hex(&h)), Some(h));
        assert_eq!(from_hex("zz"), None);
        assert_eq!(from_hex(&"A".repeat(64)), None, "upper case is not the log's form");
    }

    #[test]
    fn compose_puts_the_chain_fields_first() {
        let mut out = Vec::new();
        compose(&mut out, 7, &GENESIS, "\"h1\"", br#"{"kind":"exec","pid":3}"#).expect("composes");
        let text = String::from_utf8(out).expect("utf-8");
        assert_eq!(text, format!(r#"{{"seq":7,"prev":"{}","host":"h1","kind":"exec","pid":3}}"#, "0".repeat(64)));
        let (head, prev) = parse_head(text.as_bytes()).expect("parses");
        assert_eq!((head.seq, prev, head.kind.as_deref()), (7, GENESIS, Some("exec")));

        let mut empty = Vec::new();
        compose(&mut empty, 1, &GENESIS, "\"h\"", b"{}").expect("composes");
        assert!(serde_json::from_slice::<serde_json::Value>(&empty).is_ok());
        assert!(matches!(compose(&mut Vec::new(), 1, &GENESIS, "\"h\"", b"[1]"), Err(AuditError::NotAnObject)));
        assert!(matches!(compose(&mut Vec::new(), 1, &GENESIS, "\"h\"", b"{\n}"), Err(AuditError::NotAnObject)));
    }

    #[test]
    fn rotation_names() {
        let base = Path::new("/var/log/agentguard/events.jsonl");
        assert_eq!(rotated_path(base, 3), PathBuf::from("/var/log/agentguard/events.jsonl.3"));
        assert_eq!(rotation_number("events.jsonl", "events.jsonl.12"), Some(12));
        for bad in ["events.jsonl", "events.jsonl.", "events.jsonl.0", "events.jsonl.01", "events.jsonl.1.tmp", "events.jsonlx.1", "other.1"] {
            assert_eq!(rotation_number("events.jsonl", bad), None, "{bad}");
        }
    }

    #[test]
    fn files_oldest_first_and_tails() {
        let dir = std::env::temp_dir().join(format!("ag-audit-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let base = dir.join("events.jsonl");
        std::fs::write(&base, b"{\"a\":1}\n{\"a\":2}\n{\"a\":3").expect("write");
        std::fs::write(rotated_path(&base, 1), b"{\"b\":1}\n").expect("write");
        std::fs::write(rotated_path(&base, 2), b"").expect("write");
        let files = log_files(&base).expect("lists");
        assert_eq!(files, vec![rotated_path(&base, 2), rotated_path(&base, 1), base.clone()]);
        let tail = read_tail(&base).expect("tail");
        assert_eq!(tail.last.as_deref(), Some(&b"{\"a\":2}"[..]));
        assert_eq!((tail.complete_len, tail.partial), (16, 6));
        let one = read_tail(&rotated_path(&base, 1)).expect("tail");
        assert_eq!(one.last.as_deref(), Some(&b"{\"b\":1}"[..]));
        assert_eq!(read_tail(&rotated_path(&base, 2)).expect("tail"), Tail::default());
        assert_eq!(read_first_line(&base).expect("first").as_deref(), Some(&b"{\"a\":1}"[..]));

        let cp_path = dir.join("chain-head");
        assert_eq!(Checkpoint::load(&cp_path).expect("none yet"), None);
        let cp = Checkpoint {
            log: base.clone(),
            seq: 3,
            hash: to_hex(&line_hash(b"x")),
            first_seq: 1,
            first_prev: to_hex(&GENESIS),
            time: "t".into(),
        };
        cp.store(&cp_path).expect("stores");
        assert_eq!(Checkpoint::load(&cp_path).expect("loads"), Some(cp));
        std::fs::write(&cp_path, "{").expect("write");
        assert!(matches!(Checkpoint::load(&cp_path), Err(AuditError::Checkpoint { .. })));
        let _ = std::fs::remove_dir_all(dir);
    }
}
