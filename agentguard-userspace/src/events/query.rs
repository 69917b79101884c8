//! Reading the log back: every file (rotated ones included) oldest first,
//! filtered by agent and time, and following the live file across
//! rotations. Used by `agentguard events` and `agentguard blast-radius`; the
//! files are read directly, no daemon needed.
use std::{
    fs::File,
    io::{self, BufRead as _, BufReader, Read as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use super::{now_ns, parse_rfc3339};
use crate::audit::{log_files, AuditError};

/// `60s`, `5m`, `2h`, `1d`, `250ms`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a duration (like 60s, 5m, 2h, 1d)"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m, h or d)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

/// `--since`: a duration back from now, or an RFC 3339 time. Nanoseconds
/// since the epoch.
pub fn parse_since(s: &str) -> Result<i128, String> {
    if let Some(t) = parse_rfc3339(s) {
        return Ok(t);
    }
    let d = parse_duration(s).map_err(|e| format!("{e}, or an RFC 3339 time"))?;
    Ok(now_ns() - d.as_nanos() as i128)
}

#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub agent: Option<String>,
    pub since_ns: Option<i128>,
}

#[derive(Deserialize)]
struct Keys<'a> {
    #[serde(borrow, default)]
    time: Option<&'a str>,
    #[serde(borrow, default)]
    agent: Option<&'a str>,
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        self.agent.is_none() && self.since_ns.is_none()
    }

    /// Whether a raw line passes (an unparseable line passes only an empty filter).
    pub fn matches(&self, line: &[u8]) -> bool {
        if self.is_empty() {
            return true;
        }
        let Ok(k) = serde_json::from_slice::<Keys<'_>>(line) else { return false };
        if self.agent.as_deref().is_some_and(|a| k.agent != Some(a)) {
            return false;
        }
        if let Some(since) = self.since_ns {
            if k.time.and_then(parse_rfc3339).is_none_or(|t| t < since) {
                return false;
            }
        }
        true
    }
}

/// Call `each` with every line of every file of the log, oldest first.
/// Returns where the live file ended, for [`follow`].
pub fn read_all(base: &Path, mut each: impl FnMut(&[u8]) -> io::Result<()>) -> Result<Option<Cursor>, AuditError> {
    let files = log_files(base)?;
    let mut line = Vec::new();
    for path in &files {
        let f = File::open(path).map_err(AuditError::io(path))?;
        let live = path == base;
        let ino = f.metadata().map_err(AuditError::io(path))?.ino();
        let mut reader = BufReader::with_capacity(1 << 16, f);
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line).map_err(AuditError::io(path))?;
            if n == 0 || line.last() != Some(&b'\n') {
                break;
            }
            line.pop();
            each(&line).map_err(AuditError::io(path))?;
        }
        if live {
            // At end of file the reader holds nothing buffered; an
            // unterminated line waits in `partial` for its end.
            return Ok(Some(Cursor { path: path.clone(), file: reader.into_inner(), ino, partial: line }));
        }
    }
    Ok(None)
}

/// Where `--follow` reads on from.
pub struct Cursor {
    path: PathBuf,
    file: File,
    ino: u64,
    partial: Vec<u8>,
}

impl Cursor {
    /// Read what was appended since the last call. When the daemon rotated
    /// the file, finish the old one (still open) and go on with the new.
    pub fn poll(&mut self, mut each: impl FnMut(&[u8]) -> io::Result<()>) -> io::Result<()> {
        loop {
            self.drain(&mut each)?;
            let rotated = std::fs::metadata(&self.path).map(|m| m.ino() != self.ino).unwrap_or(false);
            if !rotated {
                return Ok(());
            }
            self.drain(&mut each)?;
            let file = File::open(&self.path)?;
            self.ino = file.metadata()?.ino();
            self.file = file;
            self.partial.clear();
        }
    }

    fn drain(&mut self, each: &mut impl FnMut(&[u8]) -> io::Result<()>) -> io::Result<()> {
        let mut chunk = Vec::new();
        self.file.read_to_end(&mut chunk)?;
        self.partial.extend_from_slice(&chunk);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else { return Ok(()) };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        for line in complete.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            each(line)?;
        }
        Ok(())
    }
}

/// Follow the live file until `each` fails (a closed pipe ends it).
pub fn follow(mut cursor: Cursor, mut each: impl FnMut(&[u8]) -> io::Result<()>) -> io::Result<()> {
    loop {
        cursor.poll(&mut each)?;
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::rfc3339;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("60"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        for bad in ["", "s", "5y", "-5s", "five"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        let t = parse_since("2026-11-24T15:42:07Z").expect("absolute");
        assert_eq!(t, 1_795_534_927_000_000_000);
        let rel = parse_since("10s").expect("relative");
        assert!((now_ns() - rel - 10_000_000_000).abs() < 1_000_000_000);
    }

    #[test]
    fn filters_by_agent_and_time() {
        let now = now_ns();
        let line = |agent: &str, ago_s: i128| format!(r#"{{"seq":1,"time":"{}","agent":"{agent}"}}"#, rfc3339(now - ago_s * 1_000_000_000));
        let f = Filter { agent: Some("claude".into()), since_ns: Some(now - 60_000_000_000) };
        assert!(f.matches(line("claude", 5).as_bytes()));
        assert!(!f.matches(line("claude", 120).as_bytes()));
        assert!(!f.matches(line("codex", 5).as_bytes()));
        assert!(!f.matches(br#"{"seq":2,"time":"x","agent":null}"#));
        assert!(Filter::default().matches(b"anything"));
    }

    #[test]
    fn reads_rotated_files_in_order_and_follows_rotation() {
        let dir = std::env::temp_dir().join(format!("ag-query-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let base = dir.join("events.jsonl");
        std::fs::write(crate::audit::rotated_path(&base, 2), "a\n").expect("write");
        std::fs::write(crate::audit::rotated_path(&base, 1), "b\n").expect("write");
        std::fs::write(&base, "c\nd").expect("write");
        let mut seen = Vec::new();
        let cursor = read_all(&base, |l| {
            seen.push(String::from_utf8_lossy(l).into_owned());
            Ok(())
        })
        .expect("reads");
        assert_eq!(seen, ["a", "b", "c"], "the unterminated line waits");
        let mut cursor = cursor.expect("live file");
        // The writer finishes the line, rotates, and starts a new file.
        std::fs::write(&base, "c\nd\ne\n").expect("write");
        std::fs::rename(&base, crate::audit::rotated_path(&base, 1)).expect("rotate");
        std::fs::write(&base, "f\n").expect("write");
        let mut more = Vec::new();
        cursor
            .poll(|l| {
                more.push(String::from_utf8_lossy(l).into_owned());
                Ok(())
            })
            .expect("polls");
        assert_eq!(more, ["d", "e", "f"]);
        let _ = std::fs::remove_dir_all(dir);
    }
}
