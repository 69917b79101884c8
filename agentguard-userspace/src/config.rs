//! /etc/agentguard/agentguard.toml: every path AgentGuard uses, each one
//! overridable (the tests run a daemon entirely inside a temporary directory).
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::policy::{PolicyError, PolicyErrors};

pub const DEFAULT_CONFIG: &str = "/etc/agentguard/agentguard.toml";

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory of policy files (`*.toml`, one agent each).
    pub policy_dir: PathBuf,
    /// The event log (JSON lines).
    pub events_log: PathBuf,
    /// The chain-head checkpoint of the event log, kept apart from it
    /// (docs/events.md).
    pub chain_head: PathBuf,
    /// Rotate the event log when a file would grow beyond this (0: never).
    pub events_rotate_bytes: u64,
    /// Rotated event-log files to keep (0: all).
    pub events_rotate_keep: u32,
    /// fdatasync the event log this often while lines are written, and
    /// whenever 4 MiB were written since the last sync (0: after every batch).
    pub events_fsync_interval_ms: u64,
    /// Deny agents' network and file actions while their events cannot be
    /// recorded (log unwritable, ring buffer overflowing).
    pub fail_closed: bool,
    /// Where programs and maps are pinned (on bpffs): enforcement survives
    /// the daemon, and a restarted daemon takes it over (pins.rs).
    pub pin_dir: PathBuf,
    /// The daemon's sessions, saved for a restarted daemon (runstate.rs).
    pub run_state: PathBuf,
    /// The control socket the CLI talks to.
    pub socket: PathBuf,
    /// Name of AgentGuard's subtree under the cgroup2 root.
    pub cgroup_subtree: String,
    /// A group (besides root) allowed on the control socket.
    pub socket_group: Option<String>,
    /// Where every freeze writes its incident record (one JSON file each).
    pub incident_dir: PathBuf,
    /// DNS servers (`"ip:port"`) asked to keep policy host names current;
    /// empty: the system's (/etc/resolv.conf, /etc/hosts).
    pub dns_servers: Vec<std::net::SocketAddr>,
    /// Size of the kernel's event ring buffer: a power of two, at least one
    /// page. Bigger rides out longer stalls of the daemon before events are
    /// lost (and counted).
    pub events_ring_bytes: u32,
    /// How much the daemon raises its scheduling priority (nice -N, like
    /// auditd's `priority_boost`): an agent that floods the machine with
    /// work must not starve the daemon that records it into losing events.
    /// 0..=20; 0 leaves it as started.
    pub priority_boost: u8,
    /// Approvals (docs/operations.md): seconds a pending approval waits for
    /// a human before it expires into a deny.
    pub approval_timeout_s: u64,
    /// What an expired approval does to its agent: "thaw" (it sees the
    /// action refused and goes on) or "kill".
    pub approval_on_expiry: crate::approvals::OnExpiry,
    /// A command (argv) run for each new pending approval, with the
    /// approval as JSON on its stdin and AGENTGUARD_APPROVAL_* variables.
    pub approval_notify: Option<Vec<String>>,
    /// Where pending approvals and live grants are kept across daemon
    /// restarts (default: `approvals.json` next to `chain_head`).
    pub approvals_state: Option<PathBuf>,
    /// The file this configuration was read from (self-protection guards it).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            policy_dir: PathBuf::from("/etc/agentguard/policies"),
            events_log: PathBuf::from("/var/log/agentguard/events.jsonl"),
            chain_head: PathBuf::from("/var/lib/agentguard/chain-head"),
            events_rotate_bytes: 64 << 20,
            events_rotate_keep: 10,
            events_fsync_interval_ms: 100,
            fail_closed: true,
            pin_dir: PathBuf::from("/sys/fs/bpf/agentguard"),
            run_state: PathBuf::from("/run/agentguard/sessions.json"),
            socket: PathBuf::from("/run/agentguard/agentguard.sock"),
            cgroup_subtree: "agentguard".to_owned(),
            socket_group: None,
            incident_dir: PathBuf::from("/var/log/agentguard/incidents"),
            dns_servers: Vec::new(),
            events_ring_bytes: agentguard_common::limits::EVENTS_RING_BYTES,
            priority_boost: 10,
            approval_timeout_s: 15 * 60,
            approval_on_expiry: crate::approvals::OnExpiry::Thaw,
            approval_notify: None,
            approvals_state: None,
            source: None,
        }
    }
}

impl Config {
    /// The approvals state file (see [`Config::approvals_state`]).
    pub fn approvals_state_path(&self) -> PathBuf {
        self.approvals_state.clone().unwrap_or_else(|| {
            self.chain_head.parent().unwrap_or(Path::new("/var/lib/agentguard")).join("approvals.json")
        })
    }

    /// Read `path`; a missing file at the default location means defaults.
    pub fn load(path: &Path) -> Result<Self, PolicyErrors> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && path == Path::new(DEFAULT_CONFIG) => {
                return Ok(Self::default())
            }
            Err(e) => {
                return Err(PolicyErrors(vec![PolicyError {
                    file: path.to_owned(),
                    line: 1,
                    column: 1,
                    message: format!("cannot read configuration: {e}"),
                }]))
            }
        };
        let mut config: Self = toml::from_str(&text).map_err(|e| {
            let (line, column) = e
                .span()
                .map_or((1, 1), |s| crate::policy::line_col(&text, s.start));
            PolicyErrors(vec![PolicyError {
                file: path.to_owned(),
                line,
                column,
                message: e.message().trim().to_owned(),
            }])
        })?;
        // A value out of range: the error points at its key.
        let bad = |key: &str, message: String| {
            let (line, column) = crate::policy::line_col(&text, text.find(key).unwrap_or(0));
            Err(PolicyErrors(vec![PolicyError { file: path.to_owned(), line, column, message }]))
        };
        let ring = config.events_ring_bytes;
        if !ring.is_power_of_two() || ring < 4096 {
            return bad("events_ring_bytes", format!("events_ring_bytes = {ring}: must be a power of two of at least 4096 (a page), e.g. 16777216"));
        }
        if config.priority_boost > 20 {
            return bad("priority_boost", format!("priority_boost = {}: must be 0 to 20 (the daemon runs at nice -priority_boost)", config.priority_boost));
        }
        config.source = Some(path.to_owned());
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_size_that_is_not_a_power_of_two_is_refused_with_its_line() {
        let dir = std::env::temp_dir().join(format!("ag-config-ring-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let f = dir.join("agentguard.toml");
        std::fs::write(&f, "fail_closed = true\nevents_ring_bytes = 100000\n").expect("write");
        let e = Config::load(&f).expect_err("must be rejected");
        assert_eq!((e.0[0].line, e.0[0].column), (2, 1), "{e}");
        std::fs::write(&f, "events_ring_bytes = 65536\n").expect("write");
        assert_eq!(Config::load(&f).expect("valid").events_ring_bytes, 65536);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_priority_boost_beyond_nice_range_is_refused_with_its_line() {
        let dir = std::env::temp_dir().join(format!("ag-config-boost-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let f = dir.join("agentguard.toml");
        std::fs::write(&f, "fail_closed = true\npriority_boost = 30\n").expect("write");
        let e = Config::load(&f).expect_err("must be rejected");
        assert_eq!((e.0[0].line, e.0[0].column), (2, 1), "{e}");
        std::fs::write(&f, "priority_boost = 0\n").expect("write");
        assert_eq!(Config::load(&f).expect("valid").priority_boost, 0);
        assert_eq!(Config::default().priority_boost, 10);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn partial_config_keeps_defaults() {
        let c: Config = toml::from_str("socket = \"/tmp/x.sock\"\n").expect("parses");
        assert_eq!(c.socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(c.cgroup_subtree, "agentguard");
    }

    #[test]
    fn unknown_key_is_an_error_with_position() {
        let dir = std::env::temp_dir().join(format!("ag-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let f = dir.join("c.toml");
        std::fs::write(&f, "socket = \"/x\"\nsokcet = 1\n").expect("write");
        let e = Config::load(&f).expect_err("must be rejected");
        assert_eq!((e.0[0].line, e.0[0].column), (2, 1), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
