//! The daemon's life around its pins: taking over a previous daemon's
//! sessions at start, saving them as they change, the policy's identity for
//! `status`, and `agentguard stop [--unload]`.
use std::collections::BTreeMap;

use agentguard_common::{Tag, RUN_SESSION_BIT};
use serde_json::json;

use super::{Session, State};
use crate::{
    cgroups::{self, CgroupTree},
    control::Response,
    pins,
    runstate::{self, SavedSession},
};

/// The sessions a previous daemon saved whose cgroups still exist, and the
/// next free run-session number.
pub(super) fn restore_sessions(tree: &CgroupTree, saved: &[SavedSession]) -> (BTreeMap<u32, Session>, u32) {
    let mut sessions = BTreeMap::new();
    for s in saved {
        let dir = tree.session_dir(&s.agent, s.id);
        let Ok(cgroup_id) = cgroups::cgroup_id(&dir) else { continue };
        let kind = if s.kind == "run" { "run" } else { "matched" };
        sessions.insert(
            s.id,
            Session { id: s.id, agent: s.agent.clone(), agent_id: s.agent_id, cgroup: dir, cgroup_id, workspace: s.workspace.clone(), kind, origin: None },
        );
    }
    let next_run = sessions.keys().filter(|id| *id & RUN_SESSION_BIT != 0).map(|id| (id & !RUN_SESSION_BIT) + 1).max().unwrap_or(1);
    (sessions, next_run)
}

/// The run sessions' cgroup selectors (cgroup id → tag).
pub(super) fn run_selectors(sessions: &BTreeMap<u32, Session>) -> BTreeMap<u64, Tag> {
    sessions
        .values()
        .filter(|s| s.kind == "run")
        .map(|s| (s.cgroup_id, Tag { agent_id: s.agent_id, session_id: s.id }))
        .collect()
}

impl State {
    /// Tag every process in a restored session's cgroup that the kernel
    /// does not know (after an upgrade the new object starts with empty
    /// maps; after a plain restart they are all tagged already). Returns how
    /// many it tagged.
    pub(super) fn retag_sessions(&mut self) -> usize {
        let sessions: Vec<(std::path::PathBuf, Tag)> =
            self.sessions.values().map(|s| (s.cgroup.clone(), Tag { agent_id: s.agent_id, session_id: s.id })).collect();
        let mut tagged = 0;
        for (dir, tag) in sessions {
            for pid in crate::killswitch::pids_below(&dir) {
                if !self.is_tagged(pid) && self.tag_tids(pid, tag) > 0 {
                    tagged += 1;
                }
            }
        }
        tagged
    }

    /// Save the sessions for a restarted daemon, when they changed.
    pub(super) fn save_sessions(&mut self) {
        let saved: Vec<SavedSession> = self
            .sessions
            .values()
            .map(|s| SavedSession { id: s.id, agent: s.agent.clone(), agent_id: s.agent_id, workspace: s.workspace.clone(), kind: s.kind.to_owned() })
            .collect();
        match runstate::save(&self.config.run_state, &saved, &self.run_state_written) {
            Ok(text) => self.run_state_written = text,
            Err(e) => tracing::warn!(path = %self.config.run_state.display(), error = %e, "cannot save the sessions; a restarted daemon will re-derive them from the kernel's tags"),
        }
    }

    /// `agentguard stop [--unload]`: without unload, exit and leave the
    /// programs enforcing (as SIGTERM does); with it, detach and remove
    /// everything AgentGuard put in the kernel and the empty cgroups, then
    /// exit.
    pub(super) fn stop(&mut self, unload: bool) -> Response {
        self.stopping = Some(unload);
        self.stop_signal.notify_one();
        if !unload {
            return Response::ok(json!({ "stopped": true, "unloaded": false, "pins": self.pins.root }));
        }
        let report = self.unload();
        Response::ok(report)
    }

    fn unload(&mut self) -> serde_json::Value {
        // The on-demand links first (the daemon holds their fds), then every
        // pin: a link whose last pin goes and that no process holds detaches.
        let _ = self.live.detach_if(&mut self.ebpf, |_| true);
        let pins_removed = pins::list(&self.pins.root).len();
        let pin_error = pins::remove_all(&self.pins.root).err().map(|e| e.to_string());
        let _ = std::fs::remove_file(&self.config.run_state);
        let mut left = Vec::new();
        for s in self.sessions.values() {
            if std::fs::remove_dir(&s.cgroup).is_err() && s.cgroup.exists() {
                left.push(s.cgroup.display().to_string());
            }
        }
        self.tree.prune_empty_sessions();
        if let Ok(agents) = std::fs::read_dir(&self.tree.base) {
            for a in agents.flatten() {
                let _ = std::fs::remove_dir(a.path());
            }
        }
        let _ = std::fs::remove_dir(&self.tree.base);
        tracing::warn!(pins_removed, ?left, "unloaded: AgentGuard no longer enforces anything on this host");
        let _ = self.log.append(&json!({ "kind": "daemon_stop", "unload": true, "pins_removed": pins_removed }));
        let _ = self.log.flush();
        json!({
            "stopped": true,
            "unloaded": pin_error.is_none(),
            "pins_removed": pins_removed,
            "pin_error": pin_error,
            "cgroups_left": left,
        })
    }
}

/// `agentguard stop --unload` with no daemon running: remove the pins (the
/// programs detach), the saved sessions and AgentGuard's empty cgroups.
pub fn unload_without_daemon(config: &crate::config::Config) -> serde_json::Value {
    let pins_removed = pins::list(&config.pin_dir).len();
    let pin_error = pins::remove_all(&config.pin_dir).err().map(|e| e.to_string());
    let _ = std::fs::remove_file(&config.run_state);
    let mut left = Vec::new();
    if let Some(root) = crate::mounts::cgroup2_root() {
        let base = root.join(&config.cgroup_subtree);
        let mut dirs = cgroups::with_descendants(&base, 4);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            if std::fs::remove_dir(&d).is_err() && d.exists() {
                left.push(d.display().to_string());
            }
        }
    }
    json!({ "stopped": false, "unloaded": pin_error.is_none(), "pins_removed": pins_removed, "pin_error": pin_error, "cgroups_left": left })
}

impl State {
    /// The operational part of `status`: the policy's identity, every
    /// session, the mechanism per action class, the pins, and the approvals
    /// waiting for a human.
    pub(super) fn status_ops(&mut self, v: &mut serde_json::Value) {
        use crate::loader::{class_attached, file_enforcement, ActionClass, FileEnforcement};
        let network = if !class_attached(&self.probes, ActionClass::Network) {
            "none"
        } else if self.live.attached() {
            "veto: cgroup_sock_addr at the cgroup2 root (attached)"
        } else {
            "veto: cgroup_sock_addr, attached while an agent is live (none is now)"
        };
        let file = match file_enforcement(&self.probes) {
            FileEnforcement::Veto => "veto: BPF-LSM",
            FileEnforcement::ObserveAndContain => "observe and contain: syscall tracepoints + freeze (Landlock for run sessions)",
            FileEnforcement::None => "none",
        };
        let protection = if class_attached(&self.probes, ActionClass::SelfProtection)
            && self.probes.iter().any(|p| p.class == ActionClass::SelfProtection && matches!(p.state, crate::loader::ProbeState::Attached))
        {
            "BPF-LSM: agents cannot signal or ptrace the daemon, call bpf(), write AgentGuard's files or leave their cgroup"
        } else {
            "none: BPF-LSM is not available here (agents are refused on the control socket only)"
        };
        let killswitch = if self.tree.base.join("cgroup.freeze").exists() {
            "cgroup v2 freezer"
        } else {
            "cgroup v1 freezer or signals (weaker)"
        };
        let sessions: Vec<_> = self.sessions.values().cloned().collect();
        let extra = json!({
            "policy": {
                "version": self.policy_version,
                "hash": self.policies.hash,
                "dir": self.config.policy_dir,
            },
            "session_list": sessions,
            "enforcement": {
                "tagging": "sched_process_fork/exec/exit tracepoints",
                "network": network,
                "file": file,
                "killswitch": killswitch,
                "self_protection": protection,
            },
            "events": {
                "logged": self.events_logged,
                "decode_errors": self.decode_errors,
                "kernel": v["kernel_counters"].clone(),
            },
            "pins": {
                "dir": self.pins.dir,
                "generation": pins::generation(),
                "adopted_at_start": self.pins.adopted,
                "pinned": pins::list(&self.pins.dir).len(),
            },
            // The actions held for a human, in brief (`agentguard approvals`
            // has the whole record).
            "pending_approvals": self.approvals.pending.values().map(|a| json!({
                "id": a.id,
                "agent": a.agent,
                "pid": a.pid,
                "action": a.action,
                "target": a.target,
                "rule": a.rule,
                "expires": a.expires,
                "frozen": a.frozen,
            })).collect::<Vec<_>>(),
        });
        if let (Some(m), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
            m.extend(e);
        }
    }
}
