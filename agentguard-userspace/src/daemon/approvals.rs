//! The daemon's side of approvals (crate::approvals has the records): a
//! held action's event freezes the agent at once and becomes a pending
//! approval; `approve` writes a grant into `AG_GRANTS` that the kernel
//! consumes on the retry, then thaws; `deny` and expiry thaw or kill.
//!
//! The freeze is the first thing done with a held event: a write to the
//! agent's `cgroup.freeze`, before the record is built (bench B7 measures
//! the held attempt to `frozen 1`). For file actions the kernel has
//! already stopped the offending process at the attempt (SIGSTOP from the
//! hook); it is continued once its cgroup is freezing, so it lands in the
//! frozen state and a thaw resumes it.
use agentguard_common::{approval, grant_kind, Decision, Enforcement, GrantKey};
use aya::maps::{HashMap, MapData};
use serde_json::json;

use super::{Response, State};
use crate::{
    approvals::{self, Approval, Grant, LiveGrant, OnExpiry, StoredKey},
    decode::KernelEvent,
    events,
    incident::{self, Actor},
    killswitch::{self, Action, Target},
    procfs,
};

/// CLOCK_MONOTONIC now, as `bpf_ktime_get_ns` reads it.
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

fn wall_ns() -> i64 {
    i64::try_from(incident::now_ns()).unwrap_or(i64::MAX)
}

/// The grant key and approval fields of an `approve` decision's event.
fn approval_parts(ev: &KernelEvent) -> Option<(GrantKey, u32, u32, bool)> {
    match ev {
        KernelEvent::Net(n) if n.decision == Decision::Approve as u32 => Some((
            GrantKey { session_id: n.header.session_id, kind: grant_kind::NET, op: n.protocol, port: n.port, family: n.family, target: n.addr },
            n.approval,
            n.approval_id,
            false,
        )),
        KernelEvent::File(f) if f.decision == Decision::Approve as u32 => Some((
            GrantKey { session_id: f.header.session_id, kind: grant_kind::FILE, op: f.op, port: 0, family: 0, target: f.grant_target },
            f.approval,
            f.approval_id,
            true,
        )),
        _ => None,
    }
}

impl State {
    /// Restore pending approvals and live grants from the state file.
    pub(super) fn restore_approvals(&mut self) {
        let now = wall_ns();
        let mono = monotonic_ns();
        let grants = std::mem::take(&mut self.approvals.grants);
        for g in grants {
            if g.expires_ns <= now {
                continue;
            }
            let left = u64::try_from(g.expires_ns - now).unwrap_or(0);
            if self.write_grant(&g.key, g.once, mono + left, g.approval_id).is_ok() {
                self.approvals.grants.push(g);
            }
        }
        if !self.approvals.pending.is_empty() || !self.approvals.grants.is_empty() {
            tracing::warn!(
                pending = self.approvals.pending.len(),
                grants = self.approvals.grants.len(),
                state = %self.approvals.path().display(),
                "approvals restored from the state file"
            );
        }
        self.save_approvals();
    }

    fn save_approvals(&self) {
        if let Err(e) = self.approvals.save() {
            tracing::error!(path = %self.approvals.path().display(), error = %e, "cannot write the approvals state file: pending approvals would not survive a restart");
        }
    }

    fn grants_map(&mut self) -> Option<HashMap<&mut MapData, GrantKey, agentguard_common::Grant>> {
        let map = self.ebpf.map_mut(agentguard_common::maps::GRANTS)?;
        HashMap::try_from(map).ok()
    }

    fn write_grant(&mut self, key: &StoredKey, once: bool, expires_mono_ns: u64, approval_id: u32) -> anyhow::Result<()> {
        let k = key.to_kernel().ok_or_else(|| anyhow::anyhow!("approval {approval_id}: unreadable grant key"))?;
        let mut map = self.grants_map().ok_or_else(|| anyhow::anyhow!("the eBPF object has no {} map: rebuild agentguard", agentguard_common::maps::GRANTS))?;
        let value = agentguard_common::Grant { expires_ns: expires_mono_ns, once: u32::from(once), approval_id };
        map.insert(k, value, 0).map_err(|e| anyhow::anyhow!("cannot write the grant of approval {approval_id}: {e}"))
    }

    /// The name the killswitch knows the agent of a session by.
    pub(super) fn agent_name_of(&self, agent_id: u32, session: u32) -> Option<String> {
        match self.sessions.get(&session) {
            Some(s) => Some(s.agent.clone()),
            None => self.agent(agent_id).map(|a| a.name.clone()),
        }
    }

    /// A network or file event of an `approve` decision (after it is logged).
    pub(super) fn on_approval_event(&mut self, ev: &KernelEvent) {
        let Some((key, state, id, is_file)) = approval_parts(ev) else { return };
        match state {
            approval::HELD => self.hold(ev, key, is_file),
            approval::GRANTED_ONCE => {
                // The kernel used the grant up; forget it.
                let stored = StoredKey::from(key);
                let before = self.approvals.grants.len();
                self.approvals.grants.retain(|g| !(g.approval_id == id && g.key == stored));
                if self.approvals.grants.len() != before {
                    self.save_approvals();
                }
            }
            _ => {}
        }
    }

    fn hold(&mut self, ev: &KernelEvent, key: GrantKey, is_file: bool) {
        let h = *ev.header();
        let Some(agent) = self.agent_name_of(h.agent_id, h.session_id) else {
            tracing::error!(agent_id = h.agent_id, pid = h.pid, "held action of an agent without a policy: nothing to freeze");
            return;
        };
        // Freeze first (B7): one write; the killswitch below confirms it and
        // writes the incident record.
        let freeze_file = self.tree.agent_dir(&agent).join("cgroup.freeze");
        let fast = std::fs::write(&freeze_file, "1");
        if is_file {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(h.pid as i32), nix::sys::signal::Signal::SIGCONT);
        }
        let stored = StoredKey::from(key);
        if let Some(id) = self.approvals.pending_for(&stored) {
            if let Some(a) = self.approvals.pending.get_mut(&id) {
                a.attempts += 1;
            }
            self.save_approvals();
            return;
        }

        let created_ns = wall_ns();
        let (ppid, lineage) = self.log.ancestry(h.pid, h.session_id);
        let rec = events::record(ev, &self.policies, &self.clock, ppid, lineage.clone().into());
        let target = match &rec.target {
            events::Target::Socket(ip, port) => match ip {
                std::net::IpAddr::V6(v6) => format!("[{v6}]:{port}"),
                std::net::IpAddr::V4(v4) => format!("{v4}:{port}"),
            },
            events::Target::Text(t) => t.clone(),
            events::Target::None => String::new(),
        };
        let protocol = match &rec.detail {
            events::Detail::Net { protocol, .. } => Some((*protocol).to_owned()),
            _ => None,
        };
        let (policy, kind, action) = (rec.agent.map(str::to_owned), rec.kind.to_owned(), rec.action.to_owned());
        let rule = rec.rule.as_deref().unwrap_or("default").to_owned();
        let reversibility = rec.reversibility.unwrap_or("irreversible").to_owned();
        let rollback = rec.rollback.map(str::to_owned);
        let enforcement = rec.enforcement.unwrap_or("enforced").to_owned();
        drop(rec);
        let contained = matches!(ev, KernelEvent::File(f) if f.enforcement == Enforcement::Observed as u32);
        let note = if contained {
            "this kernel cannot veto file actions (no BPF-LSM): the action already happened and the agent was stopped right after it; approving only thaws the agent".to_owned()
        } else {
            "refused with EPERM and held; approving lets the same action on the same target by the same session through when the agent retries it, then thaws the agent".to_owned()
        };
        let id = self.approvals.take_id();
        let timeout = self.config.approval_timeout_s;
        let expires_ns = created_ns.saturating_add(i64::try_from(timeout.saturating_mul(1_000_000_000)).unwrap_or(i64::MAX));
        let reason = format!("approval {id}: {agent} {action} {target} held by rule {rule}");
        let (frozen, freeze_error, incident) = match self.freeze_agent(&agent, &reason) {
            Ok(r) => (r.outcome.confirmed, None, r.incident),
            Err(e) => {
                let fast = fast.err().map(|f| format!("; cgroup.freeze: {f}")).unwrap_or_default();
                (false, Some(format!("{e}{fast}")), None)
            }
        };
        let sessions: Vec<u32> = self.sessions.values().filter(|s| s.agent == agent).map(|s| s.id).collect();
        let (activity, activity_note) = match incident::recent_activity(&self.config.events_log, &agent, &sessions, i128::from(created_ns)) {
            Ok((mut lines, _)) => {
                let note = (lines.len() > approvals::ACTIVITY_LINES)
                    .then(|| format!("{} lines in the window; the newest {} are quoted here, the incident record has them all", lines.len(), approvals::ACTIVITY_LINES));
                let cut = lines.len().saturating_sub(approvals::ACTIVITY_LINES);
                (lines.split_off(cut), note)
            }
            Err(e) => (Vec::new(), Some(format!("cannot read the event log: {e}"))),
        };
        let a = Approval {
            id,
            created: events::rfc3339(i128::from(created_ns)),
            expires: events::rfc3339(i128::from(expires_ns)),
            expires_ns,
            held_ktime_ns: h.ktime_ns,
            agent: agent.clone(),
            policy,
            agent_id: h.agent_id,
            session: h.session_id,
            pid: h.pid,
            tid: h.tid,
            uid: h.uid,
            ppid,
            lineage,
            argv: procfs::read(h.pid).map(|p| p.argv).unwrap_or_default(),
            kind,
            action,
            target,
            protocol,
            rule,
            reversibility,
            rollback,
            enforcement,
            note,
            attempts: 1,
            frozen,
            freeze_error,
            incident: incident.clone(),
            activity_window_s: incident::ACTIVITY_WINDOW.as_secs(),
            activity,
            activity_note,
            key: stored,
        };
        tracing::warn!(id, agent, action = a.action, target = a.target, rule = a.rule, frozen, "action held for approval");
        let line = approvals::resolution_event("approval_pending", &a, None, json!({ "expires": a.expires, "incident": incident, "frozen": frozen }));
        if let Err(e) = self.log.append(&line) {
            tracing::error!(error = %e, "cannot append to the event log");
        }
        let _ = self.log.flush();
        if let Some(argv) = &self.config.approval_notify {
            approvals::notify(argv, &a);
        }
        self.approvals.pending.insert(id, a);
        self.save_approvals();
    }

    /// `agentguard approvals`.
    pub(super) fn approvals_list(&self) -> Response {
        let pending: Vec<&Approval> = self.approvals.pending.values().collect();
        Response::ok(json!({ "pending": pending, "now_ns": wall_ns() }))
    }

    /// Resolve `id`: check the caller, take it out of the pending set.
    fn take_pending(&mut self, id: u32, caller: Option<i32>) -> Result<(Approval, Actor), Response> {
        let Some(caller) = caller.and_then(|p| u32::try_from(p).ok()).and_then(procfs::read) else {
            return Err(Response::err("cannot identify the calling process (no SO_PEERCRED pid, or it exited)"));
        };
        // Like the killswitch: nothing inside AgentGuard's subtree answers an approval.
        if let Err(e) = killswitch::refuse_caller_inside_subtree(&self.config.cgroup_subtree, caller.cgroup.as_deref()) {
            return Err(Response::err(e.to_string()));
        }
        let Some(a) = self.approvals.pending.remove(&id) else {
            let known: Vec<u32> = self.approvals.pending.keys().copied().collect();
            return Err(Response::err(format!("no pending approval {id} (pending: {known:?}); it may have been answered or have expired: see `agentguard events`")));
        };
        Ok((a, Actor::from_proc(&caller)))
    }

    /// `agentguard approve ID [--once | --for D]`.
    pub(super) fn approve(&mut self, id: u32, grant: Grant, caller: Option<i32>) -> Response {
        let (a, by) = match self.take_pending(id, caller) {
            Ok(x) => x,
            Err(r) => return r,
        };
        let (once, seconds) = match grant {
            Grant::Once => (true, self.config.approval_timeout_s.max(1)),
            Grant::For { seconds } => (false, seconds),
        };
        let expires_mono = monotonic_ns().saturating_add(seconds.saturating_mul(1_000_000_000));
        let expires_ns = wall_ns().saturating_add(i64::try_from(seconds.saturating_mul(1_000_000_000)).unwrap_or(i64::MAX));
        if let Err(e) = self.write_grant(&a.key, once, expires_mono, id) {
            self.approvals.pending.insert(id, a);
            return Response::err(format!("{e:#}; the approval stays pending"));
        }
        self.approvals.grants.push(LiveGrant { approval_id: id, key: a.key.clone(), once, expires_ns });
        let mode = if once { "once" } else { "for" };
        let line = approvals::resolution_event(
            "approval_granted",
            &a,
            Some(&by),
            json!({ "grant": mode, "grant_until": events::rfc3339(i128::from(expires_ns)) }),
        );
        let _ = self.log.append(&line);
        let thaw = self.release(&a, &by, Action::Thaw, &format!("approval {id} granted ({mode})"));
        self.save_approvals();
        Response::ok(json!({ "id": id, "agent": a.agent, "target": a.target, "grant": mode, "grant_until": events::rfc3339(i128::from(expires_ns)), "thawed": thaw }))
    }

    /// `agentguard deny ID [--kill]`.
    pub(super) fn deny(&mut self, id: u32, kill: bool, caller: Option<i32>) -> Response {
        let (a, by) = match self.take_pending(id, caller) {
            Ok(x) => x,
            Err(r) => return r,
        };
        let line = approvals::resolution_event("approval_denied", &a, Some(&by), json!({ "kill": kill }));
        let _ = self.log.append(&line);
        let action = if kill { Action::Kill } else { Action::Thaw };
        let done = self.release(&a, &by, action, &format!("approval {id} denied"));
        self.save_approvals();
        Response::ok(json!({ "id": id, "agent": a.agent, "target": a.target, "killed": kill && done, "thawed": !kill && done }))
    }

    /// Thaw (or kill) the agent of a resolved approval: a kill always, a
    /// thaw only when no other approval still holds the agent. Whether it
    /// was done.
    fn release(&mut self, a: &Approval, by: &Actor, action: Action, reason: &str) -> bool {
        if action == Action::Thaw && self.approvals.others_pending(&a.agent, a.id) {
            tracing::info!(agent = a.agent, id = a.id, "other approvals still hold the agent: it stays frozen");
            return false;
        }
        if action == Action::Kill {
            // A killed agent has nothing left to approve.
            let ids: Vec<u32> = self.approvals.pending.values().filter(|p| p.agent == a.agent).map(|p| p.id).collect();
            for other in ids {
                if let Some(p) = self.approvals.pending.remove(&other) {
                    let _ = self.log.append(&approvals::resolution_event("approval_denied", &p, Some(by), json!({ "kill": true, "reason": format!("agent killed by the answer to approval {}", a.id) })));
                }
            }
        }
        match self.killswitch(action, &Target::Agent(a.agent.clone()), by, Some(reason)) {
            Ok(_) => true,
            Err(e) => {
                tracing::error!(agent = a.agent, action = action.name(), error = %e, "approval answered, but the agent could not be released");
                false
            }
        }
    }

    /// Expire approvals nobody answered, and forget grants past their time
    /// (the kernel refuses them already; this keeps the map small).
    pub(super) fn expire_approvals(&mut self) {
        let now = wall_ns();
        let due = self.approvals.expired(now);
        let mut changed = !due.is_empty();
        for id in due {
            let Some(a) = self.approvals.pending.remove(&id) else { continue };
            let on_expiry = self.config.approval_on_expiry;
            tracing::warn!(id, agent = a.agent, ?on_expiry, "approval expired unanswered: denied");
            let line = approvals::resolution_event("approval_expired", &a, None, json!({ "on_expiry": on_expiry }));
            let _ = self.log.append(&line);
            let action = match on_expiry {
                OnExpiry::Thaw => Action::Thaw,
                OnExpiry::Kill => Action::Kill,
            };
            self.release(&a, &Actor::this_process(), action, &format!("approval {id} expired unanswered"));
        }
        let (live, gone): (Vec<LiveGrant>, Vec<LiveGrant>) = std::mem::take(&mut self.approvals.grants).into_iter().partition(|g| g.expires_ns > now);
        self.approvals.grants = live;
        for g in gone {
            changed = true;
            if let (Some(k), Some(mut map)) = (g.key.to_kernel(), self.grants_map()) {
                let _ = map.remove(&k);
            }
        }
        if changed {
            self.save_approvals();
        }
    }
}
