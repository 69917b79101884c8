//! Incident records: every freeze writes one JSON file under `incident_dir`
//! saying which agent was frozen, who froze it and why, when, which
//! processes were frozen, and the agent's last 60 seconds of activity taken
//! from the event log (the input of the runbook's blast-radius review). The
//! event log is read as plain JSON lines from its end; fields this module
//! does not know are kept as they are, lines it cannot parse are skipped.
use std::{
    fs::{File, OpenOptions},
    io::{self, Read as _, Seek as _, SeekFrom, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

use crate::{
    events::rfc3339,
    killswitch::{IncidentSink, Method, Outcome},
    procfs,
};

/// How much of the agent's past an incident quotes.
pub const ACTIVITY_WINDOW: Duration = Duration::from_secs(60);
/// Lines quoted at most (the newest are kept).
const MAX_LINES: usize = 10_000;
/// Bytes of the log read at most, from its end.
const MAX_SCAN: u64 = 64 << 20;
const CHUNK: u64 = 256 << 10;
/// The log is in append order, and an event's time (taken in the kernel)
/// can trail its append by the daemon's batching: reading stops only at a
/// line older than the window by this much.
const ORDER_SLACK_NS: i128 = 5_000_000_000;

/// Who asked for an action.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Actor {
    pub uid: u32,
    pub pid: u32,
    pub command: Vec<String>,
    /// The uid the session logged in with (/proc/PID/loginuid): who it was
    /// behind `sudo`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login_uid: Option<u32>,
}

impl Actor {
    pub fn from_proc(p: &procfs::ProcInfo) -> Self {
        let login_uid = std::fs::read_to_string(format!("/proc/{}/loginuid", p.pid))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .filter(|u| *u != u32::MAX);
        Self { uid: p.uid, pid: p.pid, command: p.argv.clone(), login_uid }
    }

    /// This process (the CLI acting alone, or the daemon acting on its own).
    pub fn this_process() -> Self {
        let pid = std::process::id();
        procfs::read(pid).map_or_else(
            || Self {
                uid: nix::unistd::getuid().as_raw(),
                pid,
                command: std::env::args().collect(),
                login_uid: None,
            },
            |p| Self::from_proc(&p),
        )
    }
}

/// A frozen process as the incident lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessRecord {
    pub pid: u32,
    pub ppid: u32,
    pub argv: Vec<String>,
    pub exe: Option<String>,
    pub cgroup: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Incident {
    pub id: String,
    /// When the freeze began (RFC 3339 UTC).
    pub time: String,
    pub action: String,
    pub agent: String,
    pub by: Actor,
    pub reason: Option<String>,
    /// "daemon" or "cli" (the daemon was not running).
    pub recorded_by: String,
    pub method: Method,
    pub confirmed: bool,
    pub elapsed_us: u64,
    pub processes: Vec<ProcessRecord>,
    pub activity_window_s: u64,
    pub events_log: PathBuf,
    /// Event-log lines of this agent from the window, oldest first.
    pub activity: Vec<Value>,
    /// Why `activity` may be incomplete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activity_note: Option<String>,
}

#[derive(Debug, Error)]
pub enum IncidentError {
    #[error("cannot write the incident record {}: {source}; set `incident_dir` in the configuration to a directory root can write", path.display())]
    Write { path: PathBuf, source: io::Error },
}

pub fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// Build and write the incident record of a freeze that began at
/// `started_ns`; returns its path.
pub fn record(
    sink: &IncidentSink<'_>,
    outcome: &Outcome,
    by: &Actor,
    reason: Option<&str>,
    started_ns: i128,
    sessions: &[u32],
) -> Result<PathBuf, IncidentError> {
    let processes = outcome
        .pids
        .iter()
        .filter_map(|pid| procfs::read(*pid))
        .map(|p| ProcessRecord { pid: p.pid, ppid: p.ppid, argv: p.argv, exe: p.exe, cgroup: p.cgroup })
        .collect();
    let (activity, activity_note) = match recent_activity(sink.events_log, &outcome.agent, sessions, started_ns) {
        Ok((lines, truncated)) => (lines, truncated.then(|| format!("more than {MAX_LINES} lines: only the newest are quoted"))),
        Err(e) => (Vec::new(), Some(format!("cannot read the event log {}: {e}", sink.events_log.display()))),
    };
    let time = rfc3339(started_ns);
    let incident = Incident {
        id: String::new(),
        time: time.clone(),
        action: "freeze".into(),
        agent: outcome.agent.clone(),
        by: by.clone(),
        reason: reason.map(str::to_owned),
        recorded_by: sink.recorded_by.into(),
        method: outcome.method,
        confirmed: outcome.confirmed,
        elapsed_us: outcome.elapsed_us,
        processes,
        activity_window_s: ACTIVITY_WINDOW.as_secs(),
        events_log: sink.events_log.to_owned(),
        activity,
        activity_note,
    };
    write(sink.dir, &format!("{}-{}", time.replace(':', ""), outcome.agent), incident)
}

/// Write `incident` as `<dir>/<stem>[-N].json`, readable by root only (argv
/// can hold secrets). Written to a temporary name first and linked into
/// place, so a reader never sees half a record and no record is replaced.
fn write(dir: &Path, stem: &str, mut incident: Incident) -> Result<PathBuf, IncidentError> {
    let err = |path: &Path| {
        let path = path.to_owned();
        move |source| IncidentError::Write { path, source }
    };
    std::fs::DirBuilder::new().recursive(true).mode(0o750).create(dir).map_err(err(dir))?;
    let tmp = dir.join(format!(".{stem}.{}.tmp", std::process::id()));
    for n in 0..1000 {
        let id = if n == 0 { stem.to_owned() } else { format!("{stem}-{n}") };
        let path = dir.join(format!("{id}.json"));
        if path.exists() {
            continue;
        }
        incident.id = id;
        let mut text = serde_json::to_vec_pretty(&incident).map_err(|e| err(&tmp)(io::Error::other(e)))?;
        text.push(b'\n');
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(err(&tmp))?;
        f.write_all(&text).and_then(|()| f.sync_all()).map_err(err(&tmp))?;
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(err(&path)(e)),
        }
    }
    Err(err(dir)(io::Error::other("too many incident records with the same name")))
}

/// The agent's event-log lines from the window before `until_ns`, oldest
/// first, and whether some were left out. A line belongs to the agent when
/// its `agent` is the agent's name, or its `session` is one of the agent's
/// sessions (a run under a fallback policy logs the policy's name).
pub fn recent_activity(log: &Path, agent: &str, sessions: &[u32], until_ns: i128) -> io::Result<(Vec<Value>, bool)> {
    let from_ns = until_ns - ACTIVITY_WINDOW.as_nanos() as i128;
    let mut file = match File::open(log) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), false)),
        Err(e) => return Err(e),
    };
    let len = file.seek(SeekFrom::End(0))?;
    let floor = len.saturating_sub(MAX_SCAN);
    let mut pos = len;
    // The start of the line that the chunk read last cut in two.
    let mut carry: Vec<u8> = Vec::new();
    let mut newest_first = Vec::new();
    let mut truncated = false;
    while pos > floor {
        let start = pos.saturating_sub(CHUNK).max(floor);
        let mut chunk = vec![0; usize::try_from(pos - start).map_err(io::Error::other)?];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&carry);
        pos = start;
        // Unless at the start, the first piece may be part of a longer line.
        let (head, body) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) if pos > floor => (chunk[..i].to_vec(), &chunk[i + 1..]),
            _ => (Vec::new(), &chunk[..]),
        };
        let mut older_seen = false;
        for line in body.split(|&b| b == b'\n').rev().filter(|l| !l.is_empty()) {
            let Ok(v) = serde_json::from_slice::<Value>(line) else { continue };
            let Some(t) = v.get("time").and_then(Value::as_str).and_then(parse_rfc3339) else { continue };
            if t < from_ns - ORDER_SLACK_NS {
                older_seen = true;
            }
            if t < from_ns || t > until_ns || !belongs(&v, agent, sessions) {
                continue;
            }
            if newest_first.len() == MAX_LINES {
                truncated = true;
                continue;
            }
            newest_first.push(v);
        }
        carry = head;
        if older_seen {
            break;
        }
    }
    newest_first.reverse();
    Ok((newest_first, truncated))
}

fn belongs(v: &Value, agent: &str, sessions: &[u32]) -> bool {
    v.get("agent").and_then(Value::as_str) == Some(agent)
        || v.get("session")
            .and_then(Value::as_u64)
            .and_then(|s| u32::try_from(s).ok())
            .is_some_and(|s| s != 0 && sessions.contains(&s))
}

/// Nanoseconds since the epoch from RFC 3339 (`2026-05-24T03:15:02.123Z`,
/// any fraction, `Z` or `±HH:MM`).
pub fn parse_rfc3339(s: &str) -> Option<i128> {
    let b = s.as_bytes();
    let num = |from: usize, to: usize| -> Option<i64> {
        let t = s.get(from..to)?;
        t.bytes().all(|c| c.is_ascii_digit()).then(|| t.parse().ok()).flatten()
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (y, mo, d, h, mi, sec) = (num(0, 4)?, num(5, 7)?, num(8, 10)?, num(11, 13)?, num(14, 16)?, num(17, 19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac_ns: i128 = 0;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let digits = s.get(start..i.min(start + 9))?;
        frac_ns = digits.parse::<i128>().ok()? * 10_i128.pow(9 - u32::try_from(digits.len()).ok()?);
    }
    let offset_s = match s.get(i..)? {
        "Z" | "z" => 0,
        tz if tz.len() == 6 && (tz.starts_with('+') || tz.starts_with('-')) && tz.as_bytes()[3] == b':' => {
            let secs = num(i + 1, i + 3)? * 3600 + num(i + 4, i + 6)? * 60;
            if tz.starts_with('-') { -secs } else { secs }
        }
        _ => return None,
    };
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec - offset_s;
    Some(i128::from(secs) * 1_000_000_000 + frac_ns)
}

/// Howard Hinnant's days-from-civil.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_log_writes() {
        for ns in [0_i128, 951_782_400_000_000_000, 1_795_534_927_123_000_000] {
            assert_eq!(parse_rfc3339(&rfc3339(ns)), Some(ns));
        }
        assert_eq!(parse_rfc3339("1970-01-01T01:00:00.5+01:00"), Some(500_000_000));
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00.123456789Z"), Some(123_456_789));
        for bad in ["", "yesterday", "2026-13-01T00:00:00Z", "2026-01-01T00:00:00", "2026-01-01T00:00:00Q"] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    fn line(t_ns: i128, agent: &str, session: u32, extra: &str) -> String {
        format!(r#"{{"time":"{}","kind":"exec","agent":"{agent}","session":{session},"pid":1,"future_field":{{"x":1}}{extra}}}"#, rfc3339(t_ns))
    }

    #[test]
    fn quotes_the_last_minute_of_this_agent_only() {
        let dir = std::env::temp_dir().join(format!("ag-incident-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let log = dir.join("events.jsonl");
        let now = 1_800_000_000_000_000_000_i128;
        let s = 1_000_000_000_i128;
        let mut text = String::new();
        // Long before the window: enough lines to need several chunks.
        for i in 0..5000 {
            text += &line(now - 600 * s + i, "claude", 7, &format!(r#","pad":"{}""#, "x".repeat(100)));
            text.push('\n');
        }
        text += &line(now - 61 * s, "claude", 7, "");
        text += "\nnot json at all\n";
        text += &line(now - 59 * s, "claude", 7, r#","n":1"#);
        text.push('\n');
        text += &line(now - 30 * s, "other", 8, "");
        text.push('\n');
        text += &line(now - 20 * s, "coding-agent", 7, r#","n":2"#);
        text.push('\n');
        text += &line(now - s, "claude", 9, r#","n":3"#);
        text.push('\n');
        text += &line(now + s, "claude", 7, "");
        text.push('\n');
        std::fs::write(&log, text).expect("write log");
        let (lines, truncated) = recent_activity(&log, "claude", &[7], now).expect("read");
        let ns: Vec<_> = lines.iter().map(|l| l["n"].as_u64()).collect();
        assert_eq!(ns, vec![Some(1), Some(2), Some(3)], "{lines:#?}");
        assert!(!truncated);
        assert_eq!(lines[0]["future_field"]["x"], 1, "unknown fields are kept");
        assert_eq!(recent_activity(&dir.join("missing"), "claude", &[], now).expect("missing log").0.len(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
