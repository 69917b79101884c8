//! `agentguard blast-radius AGENT`: what an agent touched, from the log. The
//! processes it ran; the files it deleted or tried to; the connections it
//! made or tried to — grouped by reversibility, irreversible first, each
//! with its rollback note. Repeated identical actions are counted once.
use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

/// Reversibility classes in report order; actions without one come last.
pub const CLASSES: [&str; 4] = ["irreversible", "compensable", "reversible", "unclassified"];

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Process {
    pub time: String,
    pub pid: u64,
    pub ppid: Option<u64>,
    pub exe: String,
    pub argv: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Action {
    /// "file" or "net".
    pub kind: String,
    pub action: String,
    pub target: String,
    pub protocol: Option<String>,
    pub decision: String,
    pub rule: Option<String>,
    pub enforcement: Option<String>,
    /// "done": it happened; "refused": the kernel stopped it before it
    /// happened; "held": refused pending a human's approval.
    pub outcome: &'static str,
    pub rollback: Option<String>,
    pub count: u64,
    pub first: String,
    pub last: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Group {
    pub reversibility: &'static str,
    pub actions: Vec<Action>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct BlastRadius {
    pub agent: String,
    pub events: u64,
    pub first: Option<String>,
    pub last: Option<String>,
    pub processes: Vec<Process>,
    pub groups: Vec<Group>,
}

fn text(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_owned)
}

fn outcome(decision: &str, enforcement: Option<&str>) -> &'static str {
    match (decision, enforcement) {
        (_, Some("contained")) => "done",
        ("deny", _) => "refused",
        ("approve", _) => "held",
        _ => "done",
    }
}

/// Identical actions are counted once: (class order, kind, action, target,
/// decision, rule).
type ActionKey = (usize, String, String, String, String, Option<String>);

/// Collects an agent's events (already filtered to it) into a report.
#[derive(Default)]
pub struct Builder {
    report: BlastRadius,
    actions: BTreeMap<ActionKey, Action>,
}

impl Builder {
    pub fn new(agent: &str) -> Self {
        Self { report: BlastRadius { agent: agent.to_owned(), ..BlastRadius::default() }, actions: BTreeMap::new() }
    }

    pub fn add(&mut self, v: &Value) {
        let r = &mut self.report;
        r.events += 1;
        let time = text(v, "time").unwrap_or_default();
        if r.first.is_none() {
            r.first = Some(time.clone());
        }
        r.last = Some(time.clone());
        match v.get("kind").and_then(Value::as_str) {
            Some("exec") => r.processes.push(Process {
                time,
                pid: v["pid"].as_u64().unwrap_or(0),
                ppid: v["ppid"].as_u64(),
                exe: text(v, "exe").or_else(|| text(v, "target")).unwrap_or_default(),
                argv: v["argv"].as_array().map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect()).unwrap_or_default(),
            }),
            Some(kind @ ("file" | "net")) => {
                let class = v.get("reversibility").and_then(Value::as_str).unwrap_or("unclassified");
                let order = CLASSES.iter().position(|c| *c == class).unwrap_or(CLASSES.len() - 1);
                let decision = text(v, "decision").unwrap_or_else(|| "unknown".into());
                let action = text(v, "action").unwrap_or_default();
                let target = text(v, "target").unwrap_or_default();
                let rule = text(v, "rule");
                let key = (order, kind.to_owned(), action.clone(), target.clone(), decision.clone(), rule.clone());
                let enforcement = text(v, "enforcement");
                let entry = self.actions.entry(key).or_insert_with(|| Action {
                    kind: kind.to_owned(),
                    action,
                    target,
                    protocol: text(v, "protocol"),
                    outcome: outcome(&decision, enforcement.as_deref()),
                    decision,
                    rule,
                    enforcement,
                    rollback: text(v, "rollback"),
                    count: 0,
                    first: time.clone(),
                    last: time.clone(),
                });
                // A counted flow's `repeats` line stands for `count` actions.
                entry.count += v.get("count").and_then(Value::as_u64).unwrap_or(1).max(1);
                entry.last = time;
            }
            _ => {}
        }
    }

    pub fn finish(self) -> BlastRadius {
        let mut report = self.report;
        let mut groups: Vec<Group> = CLASSES.iter().map(|c| Group { reversibility: c, actions: Vec::new() }).collect();
        for ((order, ..), action) in self.actions {
            groups[order].actions.push(action);
        }
        report.groups = groups;
        report
    }
}

/// The report for people.
pub fn render(r: &BlastRadius, color: bool) -> String {
    use std::fmt::Write as _;
    let paint = |code: &str, s: &str| if color { format!("\x1b[{code}m{s}\x1b[0m") } else { s.to_owned() };
    let mut out = String::new();
    let span = match (&r.first, &r.last) {
        (Some(a), Some(b)) => format!("{a} .. {b}"),
        _ => "no events".into(),
    };
    let _ = writeln!(out, "blast radius of agent {} ({} events, {span})", paint("1", &r.agent), r.events);
    for g in &r.groups {
        let title = g.reversibility.to_uppercase();
        let code = match g.reversibility {
            "irreversible" => "1;31",
            "compensable" => "1;33",
            "reversible" => "1;32",
            _ => "1",
        };
        let _ = writeln!(out, "\n{} ({})", paint(code, &title), g.actions.len());
        for a in &g.actions {
            let what = match (&a.protocol, a.kind.as_str()) {
                (Some(p), "net") => format!("{} {} {}/{p}", a.kind, a.action, a.target),
                _ => format!("{} {} {}", a.kind, a.action, a.target),
            };
            let outcome = match a.outcome {
                "refused" => paint("31", "refused"),
                "held" => paint("33", "held"),
                _ => "done".to_owned(),
            };
            let _ = write!(
                out,
                "  {what}  {outcome} ({} by rule {}, {})",
                a.decision,
                a.rule.as_deref().unwrap_or("?"),
                a.enforcement.as_deref().unwrap_or("?")
            );
            if a.count > 1 {
                let _ = write!(out, "  x{}", a.count);
            }
            let _ = writeln!(out, "  rollback: {}", a.rollback.as_deref().unwrap_or("none recorded"));
        }
    }
    let _ = writeln!(out, "\n{} ({})", paint("1", "PROCESSES"), r.processes.len());
    for p in &r.processes {
        let _ = writeln!(out, "  {}  pid {} (ppid {})  {}", p.time, p.pid, p.ppid.map_or("?".into(), |v| v.to_string()), if p.argv.is_empty() { p.exe.clone() } else { p.argv.join(" ") });
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_counted_flows_repeats_line_adds_its_count() {
        let mut b = Builder::new("claude");
        let line = |t: &str, extra: Value| {
            let mut v = json!({"time": t, "kind": "net", "action": "connect", "target": "10.0.0.1:443", "protocol": "tcp", "decision": "allow", "rule": "default", "reversibility": "irreversible", "rollback": null, "enforcement": "enforced"});
            v.as_object_mut().expect("object").extend(extra.as_object().expect("object").clone());
            v
        };
        b.add(&line("t1", json!({"count": 1, "flow": "first"})));
        b.add(&line("t2", json!({"count": 40, "flow": "repeats", "since": "t1"})));
        let r = b.finish();
        let a = &r.groups[0].actions;
        assert_eq!((a.len(), a[0].count, a[0].first.as_str(), a[0].last.as_str()), (1, 41, "t1", "t2"));
    }

    #[test]
    fn groups_irreversible_first_and_counts_repeats() {
        let mut b = Builder::new("claude");
        b.add(&json!({"time": "t1", "kind": "exec", "pid": 5, "ppid": 1, "exe": "/bin/rm", "argv": ["rm", "-rf", "/data"]}));
        for t in ["t2", "t3"] {
            b.add(&json!({"time": t, "kind": "net", "action": "connect", "target": "10.0.0.1:5432", "protocol": "tcp", "decision": "allow", "rule": "db", "reversibility": "compensable", "rollback": "restore", "enforcement": "enforced"}));
        }
        b.add(&json!({"time": "t4", "kind": "file", "action": "unlink", "target": "/data/x", "decision": "deny", "rule": "default", "reversibility": "irreversible", "rollback": null, "enforcement": "enforced"}));
        b.add(&json!({"time": "t5", "kind": "file", "action": "unlink", "target": "/data/y", "decision": "deny", "rule": "default", "reversibility": "irreversible", "rollback": null, "enforcement": "contained"}));
        b.add(&json!({"time": "t6", "kind": "fork", "pid": 5}));
        let r = b.finish();
        assert_eq!((r.events, r.first.as_deref(), r.last.as_deref()), (6, Some("t1"), Some("t6")));
        assert_eq!(r.groups.iter().map(|g| g.reversibility).collect::<Vec<_>>(), CLASSES);
        let irr = &r.groups[0].actions;
        assert_eq!(irr.len(), 2);
        assert_eq!((irr[0].target.as_str(), irr[0].outcome), ("/data/x", "refused"));
        assert_eq!((irr[1].target.as_str(), irr[1].outcome), ("/data/y", "done"), "contained means it happened");
        let comp = &r.groups[1].actions;
        assert_eq!((comp.len(), comp[0].count, comp[0].first.as_str(), comp[0].last.as_str()), (1, 2, "t2", "t3"));
        assert_eq!(r.processes[0].argv, ["rm", "-rf", "/data"]);
        let text = render(&r, false);
        let irr_at = text.find("IRREVERSIBLE").expect("irreversible section");
        let comp_at = text.find("COMPENSABLE").expect("compensable section");
        assert!(irr_at < comp_at, "{text}");
        assert!(text.contains("rollback: restore") && text.contains("x2"), "{text}");
    }
}
