//! Acting on behalf of a caller and keeping the record: [`perform`] (the
//! CLI with the daemon stopped, and the daemon's control socket),
//! [`freeze_agent_now`] (every caller that stops an agent, including the
//! daemon's own freeze on violation), the incident record of each freeze,
//! and the event-log line the daemon appends.
use std::path::Path;

use serde_json::{json, Value};

use super::{Action, ActionResult, Killswitch, KillswitchError, Target};
use crate::{
    cgroups,
    incident::{self, Actor},
};

/// Where incident records go and which event log they quote.
#[derive(Debug, Clone, Copy)]
pub struct IncidentSink<'a> {
    pub dir: &'a Path,
    pub events_log: &'a Path,
    /// Who wrote the record: "daemon" or "cli".
    pub recorded_by: &'static str,
}

/// Freeze `agent` now and write its incident record; returns once the kernel
/// reports every process frozen (or the timeout passed: see
/// `Outcome::confirmed`). For every caller that stops an agent: the CLI and
/// the control socket, and inside the daemon a rule that freezes on
/// violation, the file fallback's containment, approvals. A failure to write
/// the incident does not undo or fail the freeze; it is reported in
/// `ActionResult::incident_error`.
pub fn freeze_agent_now(
    ks: &Killswitch,
    agent: &str,
    by: &Actor,
    reason: Option<&str>,
    sink: &IncidentSink<'_>,
) -> Result<ActionResult, KillswitchError> {
    let target = Target::Agent(agent.to_owned());
    perform(ks, Action::Freeze, &target, by, reason, sink)?
        .pop()
        .ok_or_else(|| KillswitchError::UnknownAgent { agent: agent.to_owned(), base: ks.base.clone(), existing: ks.agents() })
}

/// Carry out `action` on `target`; a freeze writes one incident record per
/// agent, after all of them are frozen.
pub fn perform(
    ks: &Killswitch,
    action: Action,
    target: &Target,
    by: &Actor,
    reason: Option<&str>,
    sink: &IncidentSink<'_>,
) -> Result<Vec<ActionResult>, KillswitchError> {
    let started_ns = incident::now_ns();
    let outcomes = ks.act(action, target)?;
    Ok(outcomes
        .into_iter()
        .map(|outcome| {
            if action != Action::Freeze {
                return ActionResult { outcome, incident: None, incident_error: None };
            }
            let sessions = session_ids(&ks.agent_dir(&outcome.agent));
            match incident::record(sink, &outcome, by, reason, started_ns, &sessions) {
                Ok(path) => ActionResult { outcome, incident: Some(path), incident_error: None },
                Err(e) => {
                    tracing::error!(agent = outcome.agent, error = %e, "froze the agent but wrote no incident record");
                    ActionResult { outcome, incident: None, incident_error: Some(e.to_string()) }
                }
            }
        })
        .collect())
}

/// The session ids of an agent's session cgroups (`run-N`, `pid-N`).
fn session_ids(agent_dir: &Path) -> Vec<u32> {
    std::fs::read_dir(agent_dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(cgroups::parse_session_name))
                .collect()
        })
        .unwrap_or_default()
}

/// The event-log line the daemon appends for a killswitch action. `pid` and
/// `uid` are the caller's; `session` is 0 (an action on a whole agent).
pub fn event(r: &ActionResult, by: &Actor, reason: Option<&str>, agent_id: Option<u32>) -> Value {
    let o = &r.outcome;
    json!({
        "time": crate::events::rfc3339(incident::now_ns()),
        "kind": o.action.name(),
        "agent": o.agent,
        "agent_id": agent_id.unwrap_or(0),
        "session": 0,
        "pid": by.pid,
        "uid": by.uid,
        "by": by,
        "reason": reason,
        "processes": o.processes,
        "method": o.method,
        "elapsed_us": o.elapsed_us,
        "confirmed": o.confirmed,
        "incident": r.incident,
    })
}

