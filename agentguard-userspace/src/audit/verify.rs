//! `agentguard audit verify`: walk the chain over every file of the log,
//! oldest first, and name the first line that is not what the daemon wrote.
//!
//! How each kind of tampering shows, and which line is named:
//! - a line changed: the next line's `prev` no longer matches its hash; the
//!   changed line is named (the last line: the checkpoint's hash catches it);
//! - a line deleted: seq jumps; the line after the hole is named;
//! - a line inserted, or lines reordered: seq repeats or goes back, or jumps;
//!   the first line out of place is named;
//! - the tail truncated: the log ends before the checkpoint's seq; the first
//!   missing seq is named (file and the line number it would have had);
//! - the front removed (a retained file deleted): the oldest line is not the
//!   one the checkpoint records;
//! - the daemon found the log altered at start-up: its `audit_gap` line is
//!   named.
use std::{
    fs::File,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
};

use serde::Serialize;

use super::{line_hash, log_files, parse_head, AuditError, Checkpoint, Hash};
use crate::schema::Schema;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// Not a JSON object with seq and prev.
    Unparseable,
    /// The last line has no newline: cut in the middle.
    Incomplete,
    Modified,
    /// seq jumps forward: lines are missing.
    Missing,
    /// seq repeats or goes back: inserted or reordered lines.
    OutOfOrder,
    /// The log ends before the checkpoint's seq.
    Truncated,
    /// The oldest line is not the one the checkpoint records.
    FrontMissing,
    /// The daemon recorded (at start-up) that it found the log altered.
    GapRecorded,
    /// The line breaks the schema (with --schema).
    Schema,
}

#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub kind: FailureKind,
    pub file: PathBuf,
    /// 1-based line number in `file`.
    pub line: u64,
    pub seq: Option<u64>,
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)?;
        if let Some(seq) = self.seq {
            write!(f, " (seq {seq})")?;
        }
        write!(f, ": {}", self.message)
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub files: Vec<PathBuf>,
    pub lines: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub checkpoint_seq: Option<u64>,
    pub failure: Option<Failure>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.failure.is_none()
    }
}

struct Seen {
    file: PathBuf,
    line: u64,
    seq: u64,
    hash: Hash,
}

/// Verify the log at `base` (and its rotated files) against `checkpoint`.
/// Stops at the first failure.
pub fn verify(base: &Path, checkpoint: Option<&Checkpoint>, schema: Option<&Schema>) -> Result<Report, AuditError> {
    let files = log_files(base)?;
    let mut report = Report { files: files.clone(), checkpoint_seq: checkpoint.map(|c| c.seq), ..Report::default() };
    let fail = |report: &mut Report, kind, file: &Path, line, seq, message: String| {
        report.failure = Some(Failure { kind, file: file.to_owned(), line, seq, message });
    };
    let mut prev: Option<Seen> = None;
    let mut at_checkpoint: Option<Seen> = None;
    for path in &files {
        let f = File::open(path).map_err(AuditError::io(path))?;
        let mut reader = BufReader::new(f);
        let mut line = Vec::new();
        let mut lineno = 0u64;
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line).map_err(AuditError::io(path))?;
            if n == 0 {
                break;
            }
            lineno += 1;
            if line.pop() != Some(b'\n') {
                fail(&mut report, FailureKind::Incomplete, path, lineno, None, "the line is cut short (no newline): the log was truncated mid-line".into());
                return Ok(report);
            }
            let (head, prev_field) = match parse_head(&line) {
                Ok(h) => h,
                Err(e) => {
                    fail(&mut report, FailureKind::Unparseable, path, lineno, None, e);
                    return Ok(report);
                }
            };
            let seq = head.seq;
            match &prev {
                None => {
                    report.first_seq = Some(seq);
                    if let Some(cp) = checkpoint {
                        if seq != cp.first_seq || prev_field != cp.first_prev() {
                            let message = if seq > cp.first_seq {
                                format!("the log starts at seq {seq}, but the checkpoint says it starts at seq {}: lines {}..={} are missing (a retained file deleted, or the start cut off)", cp.first_seq, cp.first_seq, seq - 1)
                            } else {
                                format!("the oldest line is not the one the checkpoint records (seq {})", cp.first_seq)
                            };
                            fail(&mut report, FailureKind::FrontMissing, path, lineno, Some(seq), message);
                            return Ok(report);
                        }
                    }
                }
                Some(p) if seq <= p.seq => {
                    let message = format!("seq {seq} comes after seq {} ({}:{}): a line was inserted or lines were reordered", p.seq, p.file.display(), p.line);
                    fail(&mut report, FailureKind::OutOfOrder, path, lineno, Some(seq), message);
                    return Ok(report);
                }
                Some(p) if seq != p.seq + 1 => {
                    let message = format!(
                        "seq jumps from {} ({}:{}) to {seq}: lines {}..={} were deleted or moved",
                        p.seq,
                        p.file.display(),
                        p.line,
                        p.seq + 1,
                        seq - 1
                    );
                    fail(&mut report, FailureKind::Missing, path, lineno, Some(seq), message);
                    return Ok(report);
                }
                Some(p) if prev_field != p.hash => {
                    let message = format!(
                        "this line was altered: its hash no longer matches the prev recorded by the next line ({}:{})",
                        path.display(),
                        lineno
                    );
                    let (file, line_no, s) = (p.file.clone(), p.line, p.seq);
                    fail(&mut report, FailureKind::Modified, &file, line_no, Some(s), message);
                    return Ok(report);
                }
                Some(_) => {}
            }
            if head.kind.as_deref() == Some("audit_gap") {
                let why = head.reason.unwrap_or_else(|| "no reason recorded".into());
                fail(&mut report, FailureKind::GapRecorded, path, lineno, Some(seq), format!("the daemon found the log altered when it started: {why}"));
                return Ok(report);
            }
            if let Some(schema) = schema {
                let errors = match serde_json::from_slice::<serde_json::Value>(&line) {
                    Ok(v) => schema.validate(&v),
                    Err(e) => vec![e.to_string()],
                };
                if !errors.is_empty() {
                    fail(&mut report, FailureKind::Schema, path, lineno, Some(seq), format!("does not match the schema: {}", errors.join("; ")));
                    return Ok(report);
                }
            }
            let seen = Seen { file: path.clone(), line: lineno, seq, hash: line_hash(&line) };
            if checkpoint.is_some_and(|cp| cp.seq == seq) {
                at_checkpoint = Some(Seen { file: seen.file.clone(), ..seen });
            }
            report.lines += 1;
            report.last_seq = Some(seq);
            prev = Some(seen);
        }
    }
    let Some(cp) = checkpoint else {
        report.notes.push("no checkpoint: a truncated tail cannot be detected".into());
        return Ok(report);
    };
    match (&prev, &at_checkpoint) {
        (None, _) => {
            let file = files.last().cloned().unwrap_or_else(|| base.to_owned());
            fail(&mut report, FailureKind::Truncated, &file, 1, Some(cp.first_seq), format!("the log is empty, but the checkpoint records lines up to seq {}", cp.seq));
        }
        (Some(p), _) if p.seq < cp.seq => {
            let message = format!(
                "the log ends at seq {} ({}:{}), but the checkpoint records seq {}: lines {}..={} were removed from the end",
                p.seq,
                p.file.display(),
                p.line,
                cp.seq,
                p.seq + 1,
                cp.seq
            );
            let (file, line) = (p.file.clone(), p.line + 1);
            fail(&mut report, FailureKind::Truncated, &file, line, Some(p.seq + 1), message);
        }
        (Some(_), Some(at)) if at.hash != cp.hash() => {
            let (file, line) = (at.file.clone(), at.line);
            fail(&mut report, FailureKind::Modified, &file, line, Some(cp.seq), "this line was altered: its hash differs from the checkpoint's".into());
        }
        (Some(p), _) => {
            if p.seq > cp.seq {
                report.notes.push(format!("lines {}..={} were written after the last checkpoint (seq {})", cp.seq + 1, p.seq, cp.seq));
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{compose, to_hex, GENESIS};

    /// A chain of `n` lines in `base`, and its checkpoint.
    fn chain(base: &Path, n: u64) -> (Vec<Vec<u8>>, Checkpoint) {
        let mut lines = Vec::new();
        let mut prev = GENESIS;
        for seq in 1..=n {
            let mut l = Vec::new();
            compose(&mut l, seq, &prev, "\"h\"", format!("{{\"kind\":\"t\",\"n\":{seq}}}").as_bytes()).expect("compose");
            prev = line_hash(&l);
            lines.push(l);
        }
        let cp = Checkpoint {
            log: base.to_owned(),
            seq: n,
            hash: to_hex(&prev),
            first_seq: 1,
            first_prev: to_hex(&GENESIS),
            time: String::new(),
        };
        (lines, cp)
    }

    fn write(base: &Path, lines: &[Vec<u8>]) {
        let mut text = lines.join(&b'\n');
        text.push(b'\n');
        std::fs::write(base, text).expect("write");
    }

    fn check(base: &Path, lines: &[Vec<u8>], cp: &Checkpoint) -> Option<(FailureKind, u64, Option<u64>)> {
        write(base, lines);
        let r = verify(base, Some(cp), None).expect("verify runs");
        r.failure.map(|f| (f.kind, f.line, f.seq))
    }

    #[test]
    fn every_kind_of_tampering_names_the_first_bad_line() {
        let dir = std::env::temp_dir().join(format!("ag-verify-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let base = dir.join("events.jsonl");
        let (lines, cp) = chain(&base, 10);
        assert_eq!(check(&base, &lines, &cp), None);

        let mut modified = lines.clone();
        modified[4] = String::from_utf8(modified[4].clone()).expect("utf-8").replace("\"n\":5", "\"n\":50").into_bytes();
        assert_eq!(check(&base, &modified, &cp), Some((FailureKind::Modified, 5, Some(5))));

        let mut last_modified = lines.clone();
        last_modified[9] = String::from_utf8(last_modified[9].clone()).expect("utf-8").replace("\"n\":10", "\"n\":11").into_bytes();
        assert_eq!(check(&base, &last_modified, &cp), Some((FailureKind::Modified, 10, Some(10))));

        let mut deleted = lines.clone();
        deleted.remove(3);
        assert_eq!(check(&base, &deleted, &cp), Some((FailureKind::Missing, 4, Some(5))));

        let mut inserted = lines.clone();
        inserted.insert(6, lines[5].clone());
        assert_eq!(check(&base, &inserted, &cp), Some((FailureKind::OutOfOrder, 7, Some(6))));

        let mut reordered = lines.clone();
        reordered.swap(2, 3);
        assert_eq!(check(&base, &reordered, &cp), Some((FailureKind::Missing, 3, Some(4))));

        let truncated = lines[..7].to_vec();
        assert_eq!(check(&base, &truncated, &cp), Some((FailureKind::Truncated, 8, Some(8))));

        let mut front = lines[2..].to_vec();
        front.truncate(8);
        assert_eq!(check(&base, &front, &cp), Some((FailureKind::FrontMissing, 1, Some(3))));

        write(&base, &lines);
        let text = std::fs::read(&base).expect("read");
        std::fs::write(&base, &text[..text.len() - 5]).expect("cut");
        let r = verify(&base, Some(&cp), None).expect("runs");
        assert_eq!(r.failure.map(|f| (f.kind, f.line)), Some((FailureKind::Incomplete, 10)));

        // Without a checkpoint the chain still holds, but the tail is unguarded.
        write(&base, &truncated);
        let r = verify(&base, None, None).expect("runs");
        assert!(r.ok() && !r.notes.is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }
}
