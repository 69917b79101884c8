//! Turning decoded kernel events into log records (enriched with agent names
//! and process details) and appending them to the event log as JSON lines.
//! The schema is documented in docs/events.md.
use std::{
    fs::{File, OpenOptions},
    io::{BufWriter, Write as _},
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use agentguard_common::{Decision, Enforcement, FileOp, NetHook};
use serde::Serialize;
use serde_json::{json, Value};

use crate::{
    decode::{c_str, KernelEvent},
    policy::PolicySet,
    procfs,
};

/// Converts the kernel's monotonic timestamps to wall-clock time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// realtime - monotonic, in nanoseconds.
    offset_ns: i128,
}

impl Clock {
    pub fn new() -> Self {
        let mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec()))
            .unwrap_or(0);
        let real = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        Self { offset_ns: real - mono }
    }

    pub fn wall_ns(&self, ktime_ns: u64) -> i128 {
        i128::from(ktime_ns) + self.offset_ns
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// RFC 3339 UTC with milliseconds, from nanoseconds since the epoch.
pub fn rfc3339(ns: i128) -> String {
    let ms_total = ns.div_euclid(1_000_000);
    let secs = ms_total.div_euclid(1000);
    let ms = ms_total.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i128::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        sod / 3600,
        (sod % 3600) / 60,
        sod % 60
    )
}

fn decision_name(d: u32) -> &'static str {
    match Decision::from_u32(d) {
        Some(Decision::Allow) => "allow",
        Some(Decision::Deny) => "deny",
        Some(Decision::Approve) => "approve",
        Some(Decision::Audit) => "audit",
        None => "unknown",
    }
}

/// One log line, before the sequence number and chain are added.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub time: String,
    pub kind: &'static str,
    pub agent: Option<String>,
    pub agent_id: u32,
    pub session: u32,
    pub pid: u32,
    pub tid: u32,
    pub ppid: Option<u32>,
    pub uid: u32,
    #[serde(flatten)]
    pub detail: Value,
}

/// Build the record for a kernel event. Reads /proc for details the kernel
/// did not carry (argv, parent); a process that has already exited has none.
pub fn record(ev: &KernelEvent, policies: &PolicySet, clock: &Clock) -> Record {
    let h = ev.header();
    let agent = policies.by_id(h.agent_id).map(|a| a.name.clone());
    let info = procfs::read(h.pid);
    let (kind, detail) = match ev {
        KernelEvent::Exec(e) => (
            "exec",
            json!({
                "exe": c_str(&e.filename),
                "comm": c_str(&e.comm),
                "argv": info.as_ref().map(|i| i.argv.clone()),
                "cwd": std::fs::read_link(format!("/proc/{}/cwd", h.pid)).ok(),
                "old_pid": e.old_pid,
                "newly_tagged": e.newly_tagged == 1,
            }),
        ),
        KernelEvent::Fork(f) => ("fork", json!({ "child_tid": f.child_tid })),
        KernelEvent::Exit(_) => ("exit", json!({})),
        KernelEvent::Net(n) => {
            let addr: std::net::IpAddr = match n.family as i32 {
                libc::AF_INET => std::net::Ipv4Addr::new(n.addr[0], n.addr[1], n.addr[2], n.addr[3]).into(),
                _ => std::net::Ipv6Addr::from(n.addr).into(),
            };
            let hook = match NetHook::from_u32(n.hook) {
                Some(NetHook::Connect4 | NetHook::Connect6) => "connect",
                Some(NetHook::Sendmsg4 | NetHook::Sendmsg6) => "sendmsg",
                None => "unknown",
            };
            let protocol = match n.protocol as i32 {
                libc::IPPROTO_TCP => "tcp",
                libc::IPPROTO_UDP => "udp",
                _ => "other",
            };
            (
                "net",
                json!({
                    "action": hook,
                    "address": addr.to_string(),
                    "port": n.port,
                    "protocol": protocol,
                    "decision": decision_name(n.decision),
                    "rule": n.rule_id,
                    "enforcement": "enforced",
                }),
            )
        }
        KernelEvent::File(f) => {
            let op = match FileOp::from_u32(f.op) {
                Some(FileOp::Unlink) => "unlink",
                Some(FileOp::Rmdir) => "rmdir",
                Some(FileOp::Rename) => "rename",
                Some(FileOp::Truncate) => "truncate",
                None => "unknown",
            };
            let enforcement = if f.enforcement == Enforcement::Observed as u32 {
                "contained"
            } else {
                "enforced"
            };
            let dir = c_str(&f.dir);
            let name = c_str(&f.name);
            let target = if name.is_empty() { dir.clone() } else { format!("{}/{name}", dir.trim_end_matches('/')) };
            (
                "file",
                json!({
                    "action": op,
                    "target": target,
                    "decision": decision_name(f.decision),
                    "rule": f.rule_id,
                    "enforcement": enforcement,
                }),
            )
        }
    };
    Record {
        time: rfc3339(clock.wall_ns(h.ktime_ns)),
        kind,
        agent,
        agent_id: h.agent_id,
        session: h.session_id,
        pid: h.pid,
        tid: h.tid,
        ppid: info.map(|i| i.ppid),
        uid: h.uid,
        detail,
    }
}

/// The append-only event log.
pub struct EventLog {
    out: BufWriter<File>,
    seq: u64,
    host: String,
}

impl EventLog {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let seq = std::fs::read_to_string(path)
            .map(|t| t.lines().count() as u64)
            .unwrap_or(0);
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Self { out: BufWriter::new(file), seq, host })
    }

    pub fn append(&mut self, record: &impl Serialize) -> std::io::Result<u64> {
        self.seq += 1;
        let mut v = serde_json::to_value(record).map_err(std::io::Error::other)?;
        if let Value::Object(m) = &mut v {
            m.insert("seq".into(), self.seq.into());
            m.insert("host".into(), self.host.clone().into());
        }
        serde_json::to_writer(&mut self.out, &v).map_err(std::io::Error::other)?;
        self.out.write_all(b"\n")?;
        Ok(self.seq)
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        // 2026-11-24T15:42:07.123Z
        assert_eq!(rfc3339(1_795_534_927_123_000_000), "2026-11-24T15:42:07.123Z");
        assert_eq!(rfc3339(951_782_400_000_000_000), "2000-02-29T00:00:00.000Z");
    }
}
