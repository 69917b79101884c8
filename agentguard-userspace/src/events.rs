//! Turning decoded kernel events into log records: enriched with the agent's
//! name, the process's parent and lineage, the rule that decided and its
//! reversibility class and rollback note. The schema is documented in
//! docs/events.md and docs/events.schema.json; [`log::EventLog`] appends the
//! records to the hash-chained log ([`crate::audit`]).
use std::{
    borrow::Cow,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use agentguard_common::{Decision, Enforcement, NetHook, RULE_FAIL_CLOSED, RULE_PREEMPTED, RULE_SELF_PROTECT};
use crate::{
    decode::{c_str, KernelEvent},
    policy::{AgentPolicy, PolicySet, Reversibility},
};

pub mod blast;
pub mod cli;
pub mod flows;
pub mod json;
pub mod latency;
pub mod lineage;
pub mod log;
pub mod query;

pub use log::EventLog;

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
        Self { offset_ns: now_ns() - mono }
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

/// Wall-clock nanoseconds since the epoch.
pub fn now_ns() -> i128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0)
}

pub fn now_rfc3339() -> String {
    rfc3339(now_ns())
}

/// RFC 3339 UTC with microseconds, from nanoseconds since the epoch.
pub fn rfc3339(ns: i128) -> String {
    let us_total = ns.div_euclid(1_000);
    let secs = us_total.div_euclid(1_000_000);
    let us = us_total.rem_euclid(1_000_000);
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
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{us:06}Z", sod / 3600, (sod % 3600) / 60, sod % 60)
}

/// Nanoseconds since the epoch from `YYYY-MM-DDTHH:MM:SS[.frac]Z` (the log's
/// form; a numeric offset instead of Z is accepted too).
pub fn parse_rfc3339(s: &str) -> Option<i128> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i128> { s.get(r)?.parse::<u32>().ok().map(i128::from) };
    let (y, mo, d, h, mi, se) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut frac_ns: i128 = 0;
    if let Some(f) = rest.strip_prefix('.') {
        let digits = f.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let padded = format!("{:0<9}", &f[..digits.min(9)]);
        frac_ns = padded.parse::<i128>().ok()?;
        rest = &f[digits..];
    }
    let offset_s: i128 = match rest {
        "Z" | "z" => 0,
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) && &o[3..4] == ":" => {
            let v = o[1..3].parse::<i128>().ok()? * 3600 + o[4..6].parse::<i128>().ok()? * 60;
            if o.starts_with('-') { -v } else { v }
        }
        _ => return None,
    };
    // Howard Hinnant's days-from-civil.
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + h * 3600 + mi * 60 + se) - offset_s) * 1_000_000_000 + frac_ns)
}

pub fn decision_name(d: u32) -> &'static str {
    match Decision::from_u32(d) {
        Some(Decision::Allow) => "allow",
        Some(Decision::Deny) => "deny",
        Some(Decision::Approve) => "approve",
        Some(Decision::Audit) => "audit",
        None => "unknown",
    }
}

/// The log's name of a [`agentguard_common::FileOp`], by its stable number (every operation
/// the kernel reports has one: see the test).
pub fn file_action(op: u32) -> &'static str {
    match op {
        1 => "unlink",
        2 => "rmdir",
        3 => "rename",
        4 => "truncate",
        5 => "link",
        6 => "rename_over",
        7 => "write",
        8 => "create",
        _ => "unknown",
    }
}

pub fn reversibility_name(r: Reversibility) -> &'static str {
    match r {
        Reversibility::Reversible => "reversible",
        Reversibility::Compensable => "compensable",
        Reversibility::Irreversible => "irreversible",
    }
}

/// One log line before the writer adds `seq`, `prev` and `host`: borrowed
/// from the policy where it can be, written straight into the batch buffer
/// by [`Record::write_fields`]. The fields every line carries come first, in
/// this order; `detail` adds the kind's own.
#[derive(Debug, Clone)]
pub struct Record<'a> {
    /// When the hook ran, nanoseconds since the epoch.
    pub wall_ns: i128,
    pub kind: &'static str,
    pub action: &'static str,
    pub agent: Option<&'a str>,
    pub agent_id: u32,
    pub session: u32,
    pub pid: u32,
    pub tid: u32,
    pub ppid: Option<u32>,
    /// Ancestors up to the session's root, nearest first.
    pub lineage: std::borrow::Cow<'a, [u32]>,
    pub uid: u32,
    pub target: Target,
    pub decision: Option<&'static str>,
    pub rule: Option<Cow<'a, str>>,
    pub reversibility: Option<&'static str>,
    pub rollback: Option<&'a str>,
    pub enforcement: Option<&'static str>,
    pub detail: Detail,
}

#[derive(Debug, Clone)]
pub enum Target {
    None,
    Text(String),
    Socket(IpAddr, u16),
}

#[derive(Debug, Clone)]
pub enum Detail {
    Exec {
        exe: String,
        comm: String,
        argv: Option<Vec<String>>,
        cwd: Option<PathBuf>,
        old_pid: u32,
        newly_tagged: bool,
    },
    Fork {
        child_tid: u32,
    },
    Exit {
        /// wait(2)-encoded status; None where the kernel's BTF gave no offset.
        status: Option<u32>,
    },
    Net {
        ip: IpAddr,
        port: u16,
        protocol: &'static str,
        /// The kernel's 1-based rule index (0: the agent's default).
        rule_index: u32,
        /// An `approve` decision: held, or let through by approval N's grant.
        approval: Approval,
        /// Actions this line stands for (a counted flow's repeats, else 1).
        count: u64,
        flow: NetFlow,
    },
    File {
        path: String,
        rule_index: u32,
        approval: Approval,
    },
}

/// Where a net line stands in a counted flow (docs/events.md, "Allowed flows").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetFlow {
    /// A single action, not part of a counted flow.
    None,
    /// The first action of a counted flow.
    First,
    /// The repeats counted since the flow was last accounted for (when
    /// known: wall ns).
    Repeats { since_ns: Option<i128> },
}

/// What an `approve` decision met ([`agentguard_common::approval`]) and
/// which approval's grant, if any; written only for `approve` decisions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Approval {
    pub state: u32,
    pub id: u32,
}

impl Approval {
    fn write(self, out: &mut Vec<u8>) {
        use agentguard_common::approval as a;
        let name = match self.state {
            a::NONE => return,
            a::HELD => "held",
            a::GRANTED_ONCE => "granted_once",
            a::GRANTED => "granted",
            _ => "unknown",
        };
        crate::json_key!(out, "approval");
        json::raw_str(out, name);
        if self.id != 0 {
            crate::json_key!(out, "approval_id");
            json::uint(out, u64::from(self.id));
        }
    }
}

impl<'a> Record<'a> {
    /// A record of who (`h`) did something at `wall_ns`; the caller fills in
    /// what (kind, action, target, decision...).
    fn blank(h: &agentguard_common::EventHeader, wall_ns: i128, agent: Option<&'a AgentPolicy>, ppid: Option<u32>, lineage: Cow<'a, [u32]>) -> Self {
        Record {
            wall_ns,
            kind: "exec",
            action: "exec",
            agent: agent.map(|a| a.name.as_str()),
            agent_id: h.agent_id,
            session: h.session_id,
            pid: h.pid,
            tid: h.tid,
            ppid,
            lineage,
            uid: h.uid,
            target: Target::None,
            decision: None,
            rule: None,
            reversibility: None,
            rollback: None,
            enforcement: None,
            detail: Detail::Exit { status: None },
        }
    }
}

impl Record<'_> {
    /// Append the fields, each as `,"key":value` (see [`crate::audit::compose_head`]).
    pub fn write_fields(&self, out: &mut Vec<u8>) {
        use json::{opt_raw_str, opt_str, opt_uint, raw_str, uint};
        crate::json_key!(out, "time");
        json::time(out, self.wall_ns);
        crate::json_key!(out, "kind");
        raw_str(out, self.kind);
        crate::json_key!(out, "action");
        raw_str(out, self.action);
        crate::json_key!(out, "agent");
        opt_str(out, self.agent);
        crate::json_key!(out, "agent_id");
        uint(out, u64::from(self.agent_id));
        crate::json_key!(out, "session");
        uint(out, u64::from(self.session));
        crate::json_key!(out, "pid");
        uint(out, u64::from(self.pid));
        crate::json_key!(out, "tid");
        uint(out, u64::from(self.tid));
        crate::json_key!(out, "ppid");
        opt_uint(out, self.ppid.map(u64::from));
        crate::json_key!(out, "lineage");
        json::uint_array(out, &self.lineage);
        crate::json_key!(out, "uid");
        uint(out, u64::from(self.uid));
        crate::json_key!(out, "target");
        match &self.target {
            Target::None => json::null(out),
            Target::Text(t) => json::str(out, t),
            Target::Socket(ip, port) => json::sockaddr(out, *ip, *port),
        }
        crate::json_key!(out, "decision");
        opt_raw_str(out, self.decision);
        crate::json_key!(out, "rule");
        opt_str(out, self.rule.as_deref());
        crate::json_key!(out, "reversibility");
        opt_raw_str(out, self.reversibility);
        crate::json_key!(out, "rollback");
        opt_str(out, self.rollback);
        crate::json_key!(out, "enforcement");
        opt_raw_str(out, self.enforcement);
        match &self.detail {
            Detail::Exec { exe, comm, argv, cwd, old_pid, newly_tagged } => {
                crate::json_key!(out, "exe");
                json::str(out, exe);
                crate::json_key!(out, "comm");
                json::str(out, comm);
                crate::json_key!(out, "argv");
                match argv {
                    Some(args) => {
                        out.push(b'[');
                        for (i, a) in args.iter().enumerate() {
                            if i > 0 {
                                out.push(b',');
                            }
                            json::str(out, a);
                        }
                        out.push(b']');
                    }
                    None => json::null(out),
                }
                crate::json_key!(out, "cwd");
                opt_str(out, cwd.as_ref().map(|c| c.to_string_lossy()).as_deref());
                crate::json_key!(out, "old_pid");
                uint(out, u64::from(*old_pid));
                crate::json_key!(out, "newly_tagged");
                json::bool(out, *newly_tagged);
            }
            Detail::Fork { child_tid } => {
                crate::json_key!(out, "child_tid");
                uint(out, u64::from(*child_tid));
            }
            Detail::Exit { status } => {
                // `exit_code`: the process's exit status; `signal`: the signal
                // that ended it; both null when unknown.
                let (code, signal, core) = match status {
                    Some(st) if st & 0x7f == 0 => (Some(u64::from((st >> 8) & 0xff)), None, false),
                    Some(st) => (None, Some(u64::from(st & 0x7f)), st & 0x80 != 0),
                    None => (None, None, false),
                };
                crate::json_key!(out, "exit_code");
                opt_uint(out, code);
                crate::json_key!(out, "signal");
                opt_uint(out, signal);
                crate::json_key!(out, "core_dumped");
                json::bool(out, core);
            }
            Detail::Net { ip, port, protocol, rule_index, approval, count, flow } => {
                crate::json_key!(out, "address");
                out.push(b'"');
                json::ip_text(out, *ip);
                out.push(b'"');
                crate::json_key!(out, "port");
                uint(out, u64::from(*port));
                crate::json_key!(out, "protocol");
                raw_str(out, protocol);
                crate::json_key!(out, "rule_index");
                uint(out, u64::from(*rule_index));
                approval.write(out);
                crate::json_key!(out, "count");
                uint(out, *count);
                match flow {
                    NetFlow::None => {}
                    NetFlow::First => {
                        crate::json_key!(out, "flow");
                        raw_str(out, "first");
                    }
                    NetFlow::Repeats { since_ns } => {
                        crate::json_key!(out, "flow");
                        raw_str(out, "repeats");
                        crate::json_key!(out, "since");
                        match since_ns {
                            Some(ns) => json::time(out, *ns),
                            None => json::null(out),
                        }
                    }
                }
            }
            Detail::File { path, rule_index, approval } => {
                crate::json_key!(out, "path");
                json::str(out, path);
                crate::json_key!(out, "rule_index");
                uint(out, u64::from(*rule_index));
                approval.write(out);
            }
        }
    }
}

/// What the policy says about the rule that decided: (rule id, class, rollback).
/// An action no rule classifies (the agent's default decided) is treated as
/// irreversible, the same conservative default the policy parser gives a rule
/// without a class.
fn classify<'a>(
    agent: Option<&'a AgentPolicy>,
    rule_id: u32,
    rule: impl Fn(&'a AgentPolicy, u32) -> Option<(&'a str, Reversibility, Option<&'a str>)>,
) -> (Cow<'a, str>, &'static str, Option<&'a str>) {
    if rule_id == RULE_FAIL_CLOSED {
        return (Cow::Borrowed("fail-closed"), "irreversible", None);
    }
    if rule_id == RULE_SELF_PROTECT {
        return (Cow::Borrowed("agentguard-self-protection"), "irreversible", None);
    }
    if rule_id == RULE_PREEMPTED {
        return (Cow::Borrowed("preempted"), "irreversible", None);
    }
    if rule_id == 0 {
        return (Cow::Borrowed("default"), "irreversible", None);
    }
    match agent.and_then(|a| rule(a, rule_id)) {
        Some((id, class, rollback)) => (Cow::Borrowed(id), reversibility_name(class), rollback),
        None => (Cow::Owned(format!("#{rule_id}")), "irreversible", None),
    }
}

/// Where a network action went, as the kernel reported it.
#[derive(Debug, Clone, Copy)]
pub struct NetDest {
    /// [`NetHook`].
    pub hook: u32,
    pub protocol: u32,
    pub family: u16,
    pub port: u16,
    pub addr: [u8; 16],
}

/// Fill in a `net` line: action, target, the decision and its rule.
#[expect(clippy::too_many_arguments, reason = "one call per kind of net line, each field named at the call")]
fn net_fields<'a>(r: &mut Record<'a>, agent: Option<&'a AgentPolicy>, dest: NetDest, decision: u32, rule_id: u32, approval: Approval, count: u64, flow: NetFlow) {
    let ip: IpAddr = match i32::from(dest.family) {
        libc::AF_INET => Ipv4Addr::new(dest.addr[0], dest.addr[1], dest.addr[2], dest.addr[3]).into(),
        _ => Ipv6Addr::from(dest.addr).into(),
    };
    r.kind = "net";
    r.action = match NetHook::from_u32(dest.hook) {
        Some(NetHook::Connect4 | NetHook::Connect6) => "connect",
        Some(NetHook::Sendmsg4 | NetHook::Sendmsg6) => "sendmsg",
        None => "unknown",
    };
    let protocol = match dest.protocol as i32 {
        libc::IPPROTO_TCP => "tcp",
        libc::IPPROTO_UDP => "udp",
        _ => "other",
    };
    r.target = Target::Socket(ip, dest.port);
    let (rule, class, rollback) = classify(agent, rule_id, |a, id| {
        a.net_rule(id).map(|r| (r.id.as_str(), r.reversibility, r.rollback.as_deref()))
    });
    (r.decision, r.rule, r.reversibility, r.rollback) = (Some(decision_name(decision)), Some(rule), Some(class), rollback);
    r.enforcement = Some("enforced");
    r.detail = Detail::Net { ip, port: dest.port, protocol, rule_index: rule_id, approval, count, flow };
}

/// The line for the repeats of an allowed flow that the kernel counted
/// since the flow was last accounted for, accounted for now (`wall_ns`).
pub fn flow_repeats_record<'a>(
    repeats: &flows::Repeats,
    wall_ns: i128,
    policies: &'a PolicySet,
    ppid: Option<u32>,
    lineage: std::borrow::Cow<'a, [u32]>,
) -> Record<'a> {
    let key = &repeats.key;
    let agent = policies.by_id(key.agent_id);
    let who = agentguard_common::EventHeader {
        kind: agentguard_common::EventKind::Net as u32,
        agent_id: key.agent_id,
        session_id: key.session_id,
        pid: key.pid,
        tid: key.pid,
        uid: key.uid,
        ktime_ns: 0,
    };
    let mut r = Record::blank(&who, wall_ns, agent, ppid, lineage);
    let dest = NetDest { hook: key.hook, protocol: key.protocol, family: key.family, port: key.port, addr: key.addr };
    net_fields(&mut r, agent, dest, Decision::Allow as u32, repeats.rule_id, Approval::default(), repeats.count, NetFlow::Repeats { since_ns: repeats.since_ns });
    r
}

/// Build the record for a kernel event. `ppid` and `lineage` come from the
/// daemon's process table ([`lineage::ProcTable`]); an exec also reads /proc
/// for argv and cwd (a process that already exited has none).
pub fn record<'a>(ev: &KernelEvent, policies: &'a PolicySet, clock: &Clock, ppid: Option<u32>, lineage: std::borrow::Cow<'a, [u32]>) -> Record<'a> {
    let h = ev.header();
    let agent = policies.by_id(h.agent_id);
    let mut r = Record::blank(h, clock.wall_ns(h.ktime_ns), agent, ppid, lineage);
    match ev {
        KernelEvent::Exec(e) => {
            let exe = c_str(&e.filename);
            r.target = Target::Text(exe.clone());
            r.detail = Detail::Exec {
                exe,
                comm: c_str(&e.comm),
                argv: crate::procfs::read(h.pid).map(|i| i.argv),
                cwd: std::fs::read_link(format!("/proc/{}/cwd", h.pid)).ok(),
                old_pid: e.old_pid,
                newly_tagged: e.newly_tagged != 0,
            };
        }
        KernelEvent::Fork(f) => {
            (r.kind, r.action) = ("fork", "fork");
            r.detail = Detail::Fork { child_tid: f.child_tid };
        }
        KernelEvent::CgroupMove(m) => {
            // Not logged by the daemon (it logs `cgroup_escape`); a record
            // for completeness of the decoder's kinds.
            (r.kind, r.action) = ("cgroup_move", "cgroup_move");
            r.target = Target::Text(format!("cgroup id {}", m.dst_cgroup_id));
        }
        KernelEvent::Exit(x) => {
            (r.kind, r.action) = ("exit", "exit");
            r.detail = Detail::Exit { status: (x.flags & agentguard_common::EXIT_STATUS_KNOWN != 0).then_some(x.exit_code) };
        }
        KernelEvent::Net(n) => {
            let flow = if n.flow == agentguard_common::NET_FLOW_FIRST { NetFlow::First } else { NetFlow::None };
            let dest = NetDest { hook: n.hook, protocol: n.protocol, family: n.family, port: n.port, addr: n.addr };
            net_fields(&mut r, agent, dest, n.decision, n.rule_id, Approval { state: n.approval, id: n.approval_id }, 1, flow);
        }
        KernelEvent::File(f) => {
            r.kind = "file";
            r.action = file_action(f.op);
            let dir = c_str(&f.dir);
            let name = c_str(&f.name);
            let path = if name.is_empty() { dir } else { format!("{}/{name}", dir.trim_end_matches('/')) };
            r.target = Target::Text(path.clone());
            let (rule, class, rollback) = classify(agent, f.rule_id, |a, id| {
                a.file_rule(id).map(|r| (r.id.as_str(), r.reversibility, r.rollback.as_deref()))
            });
            (r.decision, r.rule, r.reversibility, r.rollback) = (Some(decision_name(f.decision)), Some(rule), Some(class), rollback);
            r.enforcement = Some(if f.enforcement == Enforcement::Observed as u32 { "contained" } else { "enforced" });
            r.detail = Detail::File { path, rule_index: f.rule_id, approval: Approval { state: f.approval, id: f.approval_id } };
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use agentguard_common::{EventHeader, EventKind, NetEvent};

    use super::*;
    use crate::schema::Schema;

    #[test]
    fn formats_and_parses_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339(1_795_534_927_123_456_000), "2026-11-24T15:42:07.123456Z");
        assert_eq!(rfc3339(951_782_400_000_000_000), "2000-02-29T00:00:00.000000Z");
        for ns in [0, 1_795_534_927_123_456_000, 951_782_400_000_000_000, 4_102_444_799_999_999_000] {
            assert_eq!(parse_rfc3339(&rfc3339(ns)), Some(ns));
        }
        assert_eq!(parse_rfc3339("2026-11-24T16:42:07+01:00"), Some(1_795_534_927_000_000_000));
        assert_eq!(parse_rfc3339("2026-11-24T15:42:07.5Z"), Some(1_795_534_927_500_000_000));
        for bad in ["", "2026-11-24", "2026-13-01T00:00:00Z", "2026-11-24T15:42:07", "2026-11-24T15:42:07.Z"] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn every_file_operation_has_a_name() {
        for n in 0..64 {
            if agentguard_common::FileOp::from_u32(n).is_some() {
                assert_ne!(file_action(n), "unknown", "FileOp {n} needs a name in the log");
            }
        }
        assert_eq!(file_action(agentguard_common::FileOp::Unlink as u32), "unlink");
    }

    fn policies() -> PolicySet {
        let text = "[agent]\nname = \"a\"\n[network]\ndefault = \"allow\"\n[[network.rule]]\nid = \"db\"\ndecision = \"deny\"\ncidr = [\"10.0.0.0/8\"]\nreversibility = \"compensable\"\nrollback = \"restore it\"\n";
        let a = crate::policy::parse(std::path::Path::new("a.toml"), text).expect("policy parses");
        let mut set = PolicySet::default();
        set.agents.insert(a.name.clone(), a);
        set
    }

    fn net(rule_id: u32, decision: Decision) -> KernelEvent {
        KernelEvent::Net(NetEvent {
            header: EventHeader { kind: EventKind::Net as u32, agent_id: crate::policy::agent_id("a"), session_id: 5, pid: 10, tid: 10, uid: 0, ktime_ns: 1 },
            hook: NetHook::Connect4 as u32,
            decision: decision as u32,
            rule_id,
            protocol: libc::IPPROTO_TCP as u32,
            family: libc::AF_INET as u16,
            port: 5432,
            approval: 0,
            addr: [10, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            approval_id: 0,
            flow: 0,
        })
    }

    #[test]
    fn net_records_carry_the_rule_class_and_rollback_and_fit_the_schema() {
        let set = policies();
        let schema = Schema::events().expect("schema");
        let r = record(&net(1, Decision::Deny), &set, &Clock::new(), Some(1), vec![1].into());
        assert_eq!((r.kind, r.action), ("net", "connect"));
        assert_eq!((r.rule.as_deref(), r.reversibility, r.rollback), (Some("db"), Some("compensable"), Some("restore it")));
        assert_eq!((r.decision, r.enforcement, r.agent), (Some("deny"), Some("enforced"), Some("a")));
        let d = record(&net(0, Decision::Allow), &set, &Clock::new(), None, vec![].into());
        assert_eq!((d.rule.as_deref(), d.reversibility), (Some("default"), Some("irreversible")));
        let fc = record(&net(RULE_FAIL_CLOSED, Decision::Deny), &set, &Clock::new(), None, vec![].into());
        assert_eq!(fc.rule.as_deref(), Some("fail-closed"));
        for rec in [r, d, fc] {
            // As the writer emits it.
            let mut line = Vec::new();
            crate::audit::compose_head(&mut line, 1, &crate::audit::GENESIS, "\"h\"");
            rec.write_fields(&mut line);
            line.push(b'}');
            let v: serde_json::Value = serde_json::from_slice(&line).expect("json");
            assert_eq!(schema.validate(&v), Vec::<String>::new(), "{v}");
            assert_eq!(v["target"], "10.1.2.3:5432");
            assert_eq!(v["address"], "10.1.2.3");
        }
    }
}
