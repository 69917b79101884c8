//! Approvals: actions an `approve` rule holds for a human. The kernel
//! refuses the action (EPERM) unless a grant for that session and target is
//! in `AG_GRANTS`; the daemon freezes the agent, records a pending approval
//! (this module's [`Approval`]), and a person answers with `agentguard
//! approve ID [--once | --for D]` (a grant the kernel consumes on the retry,
//! then a thaw) or `agentguard deny ID [--kill]`. Unanswered approvals
//! expire into a deny.
//!
//! This module owns what does not need the daemon's state: the records,
//! the state file that carries them across restarts, the notify command,
//! and the CLI's rendering. daemon/approvals.rs acts on the kernel and the
//! cgroups.
use std::{
    collections::BTreeMap,
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use agentguard_common::GrantKey;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::incident::Actor;

/// What an expired approval does to its agent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnExpiry {
    /// Thaw it: the action stays refused, the agent sees EPERM and goes on.
    #[default]
    Thaw,
    /// Kill every process of the agent.
    Kill,
}

/// Event-log lines an approval quotes at most (the newest; the incident
/// record of the freeze quotes the whole window).
pub const ACTIVITY_LINES: usize = 200;

/// A [`GrantKey`] as the state file and the CLI show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredKey {
    pub session: u32,
    pub kind: u32,
    pub op: u32,
    pub port: u16,
    pub family: u16,
    /// The 16 target bytes, hex.
    pub target: String,
}

impl From<GrantKey> for StoredKey {
    fn from(k: GrantKey) -> Self {
        let GrantKey { session_id, kind, op, port, family, target } = k;
        Self { session: session_id, kind, op, port, family, target: target.iter().map(|b| format!("{b:02x}")).collect() }
    }
}

impl StoredKey {
    pub fn to_kernel(&self) -> Option<GrantKey> {
        let Self { session, kind, op, port, family, target } = self;
        let mut bytes = [0u8; 16];
        if target.len() != 32 {
            return None;
        }
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(target.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(GrantKey { session_id: *session, kind: *kind, op: *op, port: *port, family: *family, target: bytes })
    }
}

/// A held action waiting for a human, with what the reviewer needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Approval {
    pub id: u32,
    /// When the action was held (RFC 3339) and when it expires into a deny.
    pub created: String,
    pub expires: String,
    pub expires_ns: i64,
    /// CLOCK_MONOTONIC of the kernel's hook when it held the action.
    #[serde(default)]
    pub held_ktime_ns: u64,
    /// The agent as the killswitch names it (its cgroup): the name given to
    /// `agentguard run --agent`, or the policy's.
    pub agent: String,
    /// The policy it runs under.
    pub policy: Option<String>,
    pub agent_id: u32,
    pub session: u32,
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub ppid: Option<u32>,
    /// Ancestors up to the session's root, nearest first.
    pub lineage: Vec<u32>,
    pub argv: Vec<String>,
    /// "net" or "file".
    pub kind: String,
    /// connect, sendmsg, unlink, rmdir, rename, truncate, link, rename_over.
    pub action: String,
    /// address:port, or the file's path.
    pub target: String,
    pub protocol: Option<String>,
    pub rule: String,
    pub reversibility: String,
    pub rollback: Option<String>,
    /// "enforced": the kernel refused the action, nothing happened yet.
    /// "contained": this kernel could only observe it (no BPF-LSM): the
    /// action happened and the agent was stopped right after.
    pub enforcement: String,
    /// What approving does, in words.
    pub note: String,
    /// Held attempts at the same action and target while pending.
    pub attempts: u32,
    pub frozen: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident: Option<PathBuf>,
    pub activity_window_s: u64,
    /// The agent's event-log lines from the window before the hold, oldest first.
    pub activity: Vec<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activity_note: Option<String>,
    pub key: StoredKey,
}

/// A grant written to the kernel and not yet used up or expired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveGrant {
    pub approval_id: u32,
    pub key: StoredKey,
    pub once: bool,
    /// Wall clock, ns since the epoch (the kernel's copy is CLOCK_MONOTONIC).
    pub expires_ns: i64,
}

/// Pending approvals and live grants, kept in a state file so they survive
/// a daemon restart.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Store {
    pub next_id: u32,
    pub pending: BTreeMap<u32, Approval>,
    pub grants: Vec<LiveGrant>,
    #[serde(skip)]
    path: PathBuf,
}

impl Store {
    /// Read the state file; a missing one is an empty store. A file that
    /// cannot be parsed is moved aside (and said so), never silently lost.
    pub fn load(path: &Path) -> io::Result<Self> {
        let mut store = match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice::<Self>(&bytes) {
                Ok(s) => s,
                Err(e) => {
                    let aside = path.with_extension("json.unreadable");
                    tracing::error!(path = %path.display(), aside = %aside.display(), error = %e, "the approvals state file cannot be read; moved aside, starting with no pending approvals");
                    std::fs::rename(path, &aside)?;
                    Self::default()
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Self::default(),
            Err(e) => return Err(e),
        };
        store.next_id = store.next_id.max(1);
        store.path = path.to_owned();
        Ok(store)
    }

    /// Write the state file: a temporary file, synced, renamed into place.
    pub fn save(&self) -> io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::DirBuilder::new().recursive(true).mode(0o750).create(dir)?;
        }
        let tmp = self.path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn take_id(&mut self) -> u32 {
        let id = self.next_id.max(1);
        self.next_id = id + 1;
        id
    }

    /// The pending approval for this exact action and target, if any.
    pub fn pending_for(&self, key: &StoredKey) -> Option<u32> {
        self.pending.values().find(|a| a.key == *key).map(|a| a.id)
    }

    /// Whether another approval still holds `agent` (so it stays frozen).
    pub fn others_pending(&self, agent: &str, except: u32) -> bool {
        self.pending.values().any(|a| a.agent == agent && a.id != except)
    }

    /// Pending approvals whose time is up at `now_ns`.
    pub fn expired(&self, now_ns: i64) -> Vec<u32> {
        self.pending.values().filter(|a| a.expires_ns <= now_ns).map(|a| a.id).collect()
    }
}

/// How a reviewer answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    /// The retry of the same action on the same target passes once.
    Once,
    /// Every such retry passes until the time is up.
    For { seconds: u64 },
}

/// Run the notify command for a new pending approval: argv from the
/// configuration, the approval as JSON on stdin, the essentials in
/// AGENTGUARD_APPROVAL_* variables. It runs detached; its failure is logged,
/// never fatal, and never delays the hold.
pub fn notify(argv: &[String], approval: &Approval) {
    let Some((program, args)) = argv.split_first() else { return };
    let body = serde_json::to_vec(approval).unwrap_or_default();
    let spawned = Command::new(program)
        .args(args)
        .env("AGENTGUARD_APPROVAL_ID", approval.id.to_string())
        .env("AGENTGUARD_APPROVAL_AGENT", &approval.agent)
        .env("AGENTGUARD_APPROVAL_ACTION", &approval.action)
        .env("AGENTGUARD_APPROVAL_TARGET", &approval.target)
        .env("AGENTGUARD_APPROVAL_RULE", &approval.rule)
        .env("AGENTGUARD_APPROVAL_EXPIRES", &approval.expires)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(command = ?argv, id = approval.id, error = %e, "cannot run the approval notify command");
            return;
        }
    };
    let id = approval.id;
    let command = argv.to_vec();
    std::thread::spawn(move || {
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(&body);
        }
        match child.wait_with_output() {
            Ok(out) if out.status.success() => tracing::debug!(id, "approval notify command done"),
            Ok(out) => tracing::error!(id, ?command, status = %out.status, stderr = %String::from_utf8_lossy(&out.stderr), "approval notify command failed"),
            Err(e) => tracing::error!(id, ?command, error = %e, "approval notify command"),
        }
    });
}

/// `approve --for`: a duration, at least a second.
pub fn parse_grant_duration(s: &str) -> Result<Duration, String> {
    let d = crate::events::query::parse_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err(format!("--for {s}: a grant lasts at least 1s"));
    }
    Ok(d)
}

/// The `agentguard approvals` table.
pub fn render(pending: &[Value], now_ns: i64) -> String {
    if pending.is_empty() {
        return "no pending approvals\n".into();
    }
    let mut out = format!("{:>4}  {:<14} {:>10} {:<11} {:<32} {:<16} {:>8}\n", "ID", "AGENT", "SESSION", "ACTION", "TARGET", "RULE", "EXPIRES");
    for a in pending {
        let left = a["expires_ns"].as_i64().map_or_else(|| "?".to_owned(), |e| {
            let s = (e - now_ns).max(0) / 1_000_000_000;
            format!("{}m{:02}s", s / 60, s % 60)
        });
        let session = crate::cgroups::session_name(a["session"].as_u64().and_then(|s| u32::try_from(s).ok()).unwrap_or(0));
        out.push_str(&format!(
            "{:>4}  {:<14} {:>10} {:<11} {:<32} {:<16} {:>8}\n",
            a["id"],
            a["agent"].as_str().unwrap_or("?"),
            session,
            a["action"].as_str().unwrap_or("?"),
            a["target"].as_str().unwrap_or("?"),
            a["rule"].as_str().unwrap_or("?"),
            left,
        ));
        out.push_str(&format!(
            "      pid {} (lineage {:?}), {}, {}{}\n",
            a["pid"],
            a["lineage"].as_array().map(|l| l.iter().filter_map(Value::as_u64).collect::<Vec<_>>()).unwrap_or_default(),
            a["reversibility"].as_str().unwrap_or("?"),
            a["enforcement"].as_str().unwrap_or("?"),
            a["rollback"].as_str().map(|r| format!("; rollback: {r}")).unwrap_or_default(),
        ));
        out.push_str(&format!(
            "      {} event(s) in the last {}s; {}\n",
            a["activity"].as_array().map_or(0, Vec::len),
            a["activity_window_s"],
            a["note"].as_str().unwrap_or(""),
        ));
    }
    out
}

/// The event-log line of a resolution.
pub fn resolution_event(kind: &str, a: &Approval, by: Option<&Actor>, extra: Value) -> Value {
    let mut v = serde_json::json!({
        "kind": kind,
        "agent": a.agent,
        "agent_id": a.agent_id,
        "session": a.session,
        "pid": a.pid,
        "target": a.target,
        "decision": "approve",
        "rule": a.rule,
        "reversibility": a.reversibility,
        "rollback": a.rollback,
        "enforcement": a.enforcement,
        "approval_id": a.id,
        "held_action": a.action,
        "by": by,
    });
    if let (Value::Object(m), Value::Object(x)) = (&mut v, extra) {
        m.extend(x);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_keys_round_trip_through_the_state_file_form() {
        let k = GrantKey { session_id: 0x8000_0003, kind: 1, op: 6, port: 5432, family: 2, target: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xfe] };
        let s = StoredKey::from(k);
        assert_eq!(s.target, "7f0000010000000000000000000000fe");
        assert_eq!(s.to_kernel(), Some(k));
        assert_eq!(StoredKey { target: "7f".into(), ..s.clone() }.to_kernel(), None);
        assert_eq!(StoredKey { target: "zz".repeat(16), ..s }.to_kernel(), None);
    }

    #[test]
    fn store_survives_a_save_and_load_and_finds_by_key() {
        let dir = std::env::temp_dir().join(format!("ag-approvals-{}", std::process::id()));
        let path = dir.join("approvals.json");
        let mut store = Store::load(&path).expect("empty");
        assert_eq!(store.take_id(), 1);
        let key = StoredKey::from(GrantKey { session_id: 7, kind: 2, op: 1, port: 0, family: 0, target: [9; 16] });
        let a = Approval {
            id: 1,
            created: "t".into(),
            expires: "t".into(),
            expires_ns: 100,
            held_ktime_ns: 1,
            agent: "a".into(),
            policy: None,
            agent_id: 1,
            session: 7,
            pid: 2,
            tid: 2,
            uid: 0,
            ppid: None,
            lineage: vec![],
            argv: vec![],
            kind: "file".into(),
            action: "unlink".into(),
            target: "/x".into(),
            protocol: None,
            rule: "r".into(),
            reversibility: "irreversible".into(),
            rollback: None,
            enforcement: "enforced".into(),
            note: String::new(),
            attempts: 1,
            frozen: true,
            freeze_error: None,
            incident: None,
            activity_window_s: 60,
            activity: vec![],
            activity_note: None,
            key: key.clone(),
        };
        store.pending.insert(1, a);
        store.save().expect("save");
        let back = Store::load(&path).expect("load");
        assert_eq!(back.next_id, 2);
        assert_eq!(back.pending_for(&key), Some(1));
        assert!(!back.others_pending("a", 1));
        assert!(back.others_pending("a", 2));
        assert_eq!(back.expired(99), Vec::<u32>::new());
        assert_eq!(back.expired(100), vec![1]);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn grant_durations() {
        assert_eq!(parse_grant_duration("10m"), Ok(Duration::from_secs(600)));
        assert!(parse_grant_duration("500ms").is_err());
        assert!(parse_grant_duration("soon").is_err());
    }
}
