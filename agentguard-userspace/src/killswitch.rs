//! The killswitch: freeze, thaw and kill every process of an agent (or of all
//! agents) at once by acting on the agent's cgroup,
//! `<cgroup2>/<subtree>/<agent>/`, which holds all of its sessions. It works
//! the same from the CLI with the daemon stopped and from inside the daemon.
//!
//! Owns: choosing the mechanism (cgroup v2 `cgroup.freeze` / `cgroup.kill`;
//! the v1 freezer where v2 freezing is missing; SIGSTOP / SIGKILL of every pid
//! as the last resort, reported as weaker), waiting for the kernel's
//! confirmation in `cgroup.events`, refusing callers that live inside
//! AgentGuard's subtree, and [`freeze_agent_now`], the entry point for freezing
//! on a violation. Incident records are built and written by `incident.rs`.
mod fallback;
mod record;

use std::{
    fs::File,
    io::{self, Read as _, Seek as _},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    poll::{ppoll, PollFd, PollFlags},
    sys::time::TimeSpec,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use self::record::{event, freeze_agent_now, perform, IncidentSink};
use crate::{cgroups, config::Config, mounts};

/// How long an action waits for the kernel's confirmation before it reports
/// the action as unconfirmed. A task in uninterruptible sleep (D state, e.g.
/// on a hung NFS server) freezes only when it returns towards user space.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a wait re-reads `cgroup.events` even without a notification:
/// cgroup_file_notify() sends at most one notification per file every 10 ms
/// (CGROUP_FILE_NOTIFY_MIN_INTV, kernel/cgroup/cgroup.c) and defers the rest,
/// so a freeze right after another change of the same file would otherwise
/// be seen up to 10 ms late.
const RECHECK: Duration = Duration::from_micros(200);

/// Bounds the depth of `<agent>/<session>/...` walked for processes.
const MAX_DEPTH: usize = 16;

/// Which agents an action is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Agent(String),
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Freeze,
    Thaw,
    Kill,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Self::Freeze => "freeze",
            Self::Thaw => "thaw",
            Self::Kill => "kill",
        }
    }

    fn past(self) -> &'static str {
        match self {
            Self::Freeze => "froze",
            Self::Thaw => "thawed",
            Self::Kill => "killed",
        }
    }
}

/// The mechanism that carried out an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// cgroup v2 `cgroup.freeze` / `cgroup.kill`: one write covers every
    /// session below the agent, new children are born frozen (or killed), and
    /// the kernel confirms in `cgroup.events`.
    Cgroup2,
    /// The v1 freezer: the agent's processes are moved into
    /// `<freezer>/<subtree>/<agent>` and frozen there; confirmed by
    /// `freezer.state`.
    Cgroup1Freezer,
    /// SIGSTOP / SIGCONT / SIGKILL to every pid, repeated until no new one
    /// appears. Weaker: anyone allowed to signal a stopped process can
    /// continue it, and SIGSTOP is visible to the process's parent.
    Signals,
}

impl Method {
    pub fn is_weaker(self) -> bool {
        self == Self::Signals
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Cgroup2 => "cgroup v2",
            Self::Cgroup1Freezer => "cgroup v1 freezer",
            Self::Signals => "WEAKER: signals to every process, no cgroup freezer on this kernel",
        }
    }
}

/// What one action did to one agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Outcome {
    pub action: Action,
    pub agent: String,
    pub method: Method,
    /// Processes (thread groups) the action reached.
    pub processes: usize,
    /// From the first write to the kernel's confirmation.
    pub elapsed_us: u64,
    /// Whether the kernel confirmed the action (`frozen 1`, `frozen 0`, no
    /// process left) within the timeout.
    pub confirmed: bool,
    /// The processes: those frozen or thawed, or those present before a kill.
    #[serde(default)]
    pub pids: Vec<u32>,
}

impl Outcome {
    /// "froze agent claude: 212 processes in 3.1 ms (cgroup v2)".
    pub fn summary(&self) -> String {
        let plural = if self.processes == 1 { "" } else { "es" };
        let ms = self.elapsed_us as f64 / 1000.0;
        let line = format!(
            "{} agent {}: {} process{plural} in {ms:.1} ms ({})",
            self.action.past(),
            self.agent,
            self.processes,
            self.method.describe()
        );
        if self.confirmed {
            return line;
        }
        let what = match self.action {
            Action::Freeze => "that every process is frozen; processes in uninterruptible sleep freeze when they return from the kernel. `agentguard kill` stops them outright",
            Action::Thaw => "that every process runs again; is a parent cgroup frozen?",
            Action::Kill => "that no process is left; run `agentguard kill` again and check `agentguard ps`",
        };
        format!("{line}\n  NOT CONFIRMED: the kernel did not report {what}")
    }
}

/// One action's result as the CLI prints it and the daemon sends it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ActionResult {
    #[serde(flatten)]
    pub outcome: Outcome,
    /// The incident record a freeze wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident: Option<PathBuf>,
    /// Why a freeze wrote no incident record (the freeze itself happened).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident_error: Option<String>,
}

#[derive(Debug, Error)]
pub enum KillswitchError {
    #[error("no cgroup2 hierarchy is mounted, so there are no agent cgroups to act on; mount one (`mount -t cgroup2 none /sys/fs/cgroup`)")]
    NoCgroup2,
    #[error("{name:?} is not an agent name: it must be one path component (no '/', not '.' or '..')")]
    BadName { name: String },
    #[error("agent {agent:?} has no cgroup under {}; {}", base.display(), existing_list(existing))]
    UnknownAgent { agent: String, base: PathBuf, existing: Vec<String> },
    #[error("refused: {0}. Agents cannot freeze, thaw or kill agents; run this from a shell that is not part of an agent")]
    CallerIsAgent(String),
    #[error("cannot {what} {}: {source}{}", path.display(), hint(source))]
    Io { what: &'static str, path: PathBuf, source: io::Error },
}

fn existing_list(existing: &[String]) -> String {
    if existing.is_empty() {
        "no agent has one (nothing runs under AgentGuard; `agentguard ps` lists agent processes)".to_owned()
    } else {
        format!("agents that have one: {}", existing.join(", "))
    }
}

fn hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::PermissionDenied => " (run as root)",
        io::ErrorKind::NotFound => " (the cgroup is gone: did the agent's last process exit?)",
        _ => "",
    }
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> KillswitchError {
    let path = path.to_owned();
    move |source| KillswitchError::Io { what, path, source }
}

/// Refuse a caller that lives inside AgentGuard's cgroup subtree.
///
/// The daemon keeps every tagged process in its session cgroup inside the
/// subtree (and moves it back if it leaves), so a cgroup inside the subtree
/// is how a process of an agent looks without the kernel's tag map. With the
/// daemon stopped nobody else checks, so the CLI calls this on itself before
/// touching a cgroup file; the daemon calls it on its peer as well as
/// checking the peer's kernel tag. `cgroup` is the caller's cgroup2 path as
/// /proc/PID/cgroup prints it in the initial cgroup namespace; `None` (not
/// readable, or the caller is in another cgroup namespace whose paths are
/// relative) is refused because it cannot be checked.
///
/// This keeps an agent from turning AgentGuard's killswitch against other
/// agents or from undoing a freeze. It is not a boundary against an agent
/// running as root, which could write `cgroup.freeze` itself.
pub fn refuse_caller_inside_subtree(subtree: &str, cgroup: Option<&str>) -> Result<(), KillswitchError> {
    let Some(cg) = cgroup else {
        return Err(KillswitchError::CallerIsAgent(
            "cannot tell which cgroup the calling process lives in (unreadable, or another cgroup namespace)".into(),
        ));
    };
    let sub = format!("/{}", subtree.trim_matches('/'));
    if cg == sub || cg.starts_with(&format!("{sub}/")) {
        return Err(KillswitchError::CallerIsAgent(format!(
            "the calling process lives in {cg}, inside AgentGuard's subtree {sub}: it belongs to an agent"
        )));
    }
    Ok(())
}

/// This process's cgroup2 path; `None` when it cannot be trusted: in a
/// cgroup namespace other than the initial one, paths are relative to that
/// namespace's root. The initial cgroup namespace has a fixed inode,
/// PROC_CGROUP_INIT_INO (include/linux/proc_ns.h).
pub fn own_cgroup() -> Option<String> {
    const PROC_CGROUP_INIT_INO: u64 = 0xEFFF_FFFB;
    let initial_ns = match std::fs::read_link("/proc/self/ns/cgroup") {
        Ok(link) => link.to_string_lossy() == format!("cgroup:[{PROC_CGROUP_INIT_INO}]"),
        // A kernel without cgroup namespaces: paths are absolute.
        Err(e) => e.kind() == io::ErrorKind::NotFound,
    };
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    initial_ns.then(|| text.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_owned)).flatten()
}

/// Acts on the agent cgroups below `<cgroup2>/<subtree>`.
#[derive(Debug, Clone)]
pub struct Killswitch {
    base: PathBuf,
    subtree: String,
    v1_freezer: Option<PathBuf>,
    forced: Option<Method>,
    timeout: Duration,
}

impl Killswitch {
    pub fn new(cgroup2_root: &Path, subtree: &str) -> Self {
        let subtree = subtree.trim_matches('/').to_owned();
        Self {
            base: cgroup2_root.join(&subtree),
            subtree,
            v1_freezer: mounts::cgroup1_freezer(),
            forced: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    pub fn from_config(config: &Config) -> Result<Self, KillswitchError> {
        let root = mounts::cgroup2_root().ok_or(KillswitchError::NoCgroup2)?;
        Ok(Self::new(&root, &config.cgroup_subtree))
    }

    /// Use this mechanism whatever the kernel offers (tests exercise the
    /// fallbacks on kernels that have cgroup v2 freezing).
    pub fn with_method(mut self, method: Method) -> Self {
        self.forced = Some(method);
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn base(&self) -> &Path {
        &self.base
    }

    pub fn agent_dir(&self, agent: &str) -> PathBuf {
        self.base.join(agent)
    }

    /// Agents that have a cgroup, sorted.
    pub fn agents(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(&self.base)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    /// The agents `target` names, each checked to have a cgroup.
    pub fn resolve(&self, target: &Target) -> Result<Vec<String>, KillswitchError> {
        match target {
            Target::All => Ok(self.agents()),
            Target::Agent(name) => {
                if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                    return Err(KillswitchError::BadName { name: name.clone() });
                }
                if !self.agent_dir(name).is_dir() {
                    return Err(KillswitchError::UnknownAgent {
                        agent: name.clone(),
                        base: self.base.clone(),
                        existing: self.agents(),
                    });
                }
                Ok(vec![name.clone()])
            }
        }
    }

    /// Every process (thread group) in the agent's cgroups, sorted.
    pub fn pids(&self, agent: &str) -> Vec<u32> {
        pids_below(&self.agent_dir(agent))
    }

    fn method(&self, agent: &str, action: Action) -> Method {
        if let Some(m) = self.forced {
            return m;
        }
        let file = match action {
            Action::Kill => "cgroup.kill",
            Action::Freeze | Action::Thaw => "cgroup.freeze",
        };
        if self.agent_dir(agent).join(file).exists() {
            Method::Cgroup2
        } else if self.v1_freezer.is_some() && action != Action::Kill {
            Method::Cgroup1Freezer
        } else {
            Method::Signals
        }
    }

    fn v1_dir(&self, agent: &str) -> Option<PathBuf> {
        self.v1_freezer.as_ref().map(|v1| v1.join(&self.subtree).join(agent))
    }

    pub fn act(&self, action: Action, target: &Target) -> Result<Vec<Outcome>, KillswitchError> {
        match action {
            Action::Freeze => self.freeze(target),
            Action::Thaw => self.thaw(target),
            Action::Kill => self.kill(target),
        }
    }

    /// Freeze every process of the target's agents and wait until the kernel
    /// reports them frozen. The writes for all agents go out first, then the
    /// waits, so `--all` costs about as long as the slowest agent.
    pub fn freeze(&self, target: &Target) -> Result<Vec<Outcome>, KillswitchError> {
        self.set_frozen(target, true)
    }

    /// Undo a freeze and wait until the kernel reports the agents running.
    pub fn thaw(&self, target: &Target) -> Result<Vec<Outcome>, KillswitchError> {
        self.set_frozen(target, false)
    }

    fn set_frozen(&self, target: &Target, frozen: bool) -> Result<Vec<Outcome>, KillswitchError> {
        let action = if frozen { Action::Freeze } else { Action::Thaw };
        let agents = self.resolve(target)?;
        let deadline = Instant::now() + self.timeout;
        // Cgroup v2 first, all writes before any wait.
        let mut pending = Vec::new();
        let mut outcomes = Vec::new();
        for agent in &agents {
            let method = self.method(agent, action);
            if method != Method::Cgroup2 {
                outcomes.push(self.set_frozen_fallback(agent, method, frozen, deadline)?);
                continue;
            }
            let dir = self.agent_dir(agent);
            let events = EventsFile::open(&dir)?;
            let start = Instant::now();
            let freeze = dir.join("cgroup.freeze");
            std::fs::write(&freeze, if frozen { "1" } else { "0" }).map_err(io_err("write", &freeze))?;
            pending.push((agent, dir, events, start));
        }
        let want = if frozen { "frozen 1" } else { "frozen 0" };
        for (agent, dir, mut events, start) in pending {
            // A thaw can be overtaken by a new freeze (an approval hold
            // freezing the agent the moment it runs again): once
            // `cgroup.freeze` says 1 again, the thaw happened and is over.
            let superseded = || !frozen && std::fs::read_to_string(dir.join("cgroup.freeze")).is_ok_and(|v| v.trim() == "1");
            let confirmed = events.wait_for_or(want, deadline, superseded)?;
            let elapsed = start.elapsed();
            let pids = pids_below(&dir);
            outcomes.push(outcome(action, agent, Method::Cgroup2, pids, elapsed, confirmed));
        }
        outcomes.sort_by(|a, b| a.agent.cmp(&b.agent));
        Ok(outcomes)
    }

    fn set_frozen_fallback(&self, agent: &str, method: Method, frozen: bool, deadline: Instant) -> Result<Outcome, KillswitchError> {
        let action = if frozen { Action::Freeze } else { Action::Thaw };
        let dir = self.agent_dir(agent);
        let start = Instant::now();
        let confirmed = match (method, self.v1_dir(agent), frozen) {
            (Method::Cgroup1Freezer, Some(v1), true) => fallback::v1_freeze(&v1, || pids_below(&dir), deadline)?,
            (Method::Cgroup1Freezer, Some(v1), false) => {
                let root = self.v1_freezer.clone().unwrap_or_default();
                fallback::v1_thaw(&root, &v1, deadline)?
            }
            (_, _, true) => fallback::signal_stop(|| pids_below(&dir), deadline),
            (_, _, false) => fallback::signal_cont(|| pids_below(&dir), deadline),
        };
        let elapsed = start.elapsed();
        Ok(outcome(action, agent, method, pids_below(&dir), elapsed, confirmed))
    }

    /// Kill every process of the target's agents and confirm none is left.
    /// An agent frozen before is thawed afterwards (its cgroup is empty by
    /// then), so the next `agentguard run` of that agent is not born frozen.
    pub fn kill(&self, target: &Target) -> Result<Vec<Outcome>, KillswitchError> {
        let agents = self.resolve(target)?;
        let deadline = Instant::now() + self.timeout;
        let mut outcomes = Vec::new();
        for agent in &agents {
            let dir = self.agent_dir(agent);
            let pids = pids_below(&dir);
            let method = match self.method(agent, Action::Kill) {
                // The v1 freezer has no kill: signals, with a thaw after each pass.
                Method::Cgroup1Freezer => Method::Signals,
                m => m,
            };
            let start = Instant::now();
            let confirmed = if method == Method::Cgroup2 {
                let mut events = EventsFile::open(&dir)?;
                let kill = dir.join("cgroup.kill");
                std::fs::write(&kill, "1").map_err(io_err("write", &kill))?;
                events.wait_for("populated 0", deadline)?
            } else {
                // A task frozen by the v1 freezer cannot act on SIGKILL until
                // it is thawed; the kill loop thaws it after the first signal.
                let v1 = self.v1_dir(agent).filter(|d| d.is_dir());
                fallback::signal_kill(|| pids_below(&dir), v1.as_deref(), deadline)
            };
            let elapsed = start.elapsed();
            if confirmed {
                self.unfreeze_empty(agent);
            }
            outcomes.push(outcome(Action::Kill, agent, method, pids, elapsed, confirmed));
        }
        Ok(outcomes)
    }

    fn unfreeze_empty(&self, agent: &str) {
        let freeze = self.agent_dir(agent).join("cgroup.freeze");
        if std::fs::read_to_string(&freeze).is_ok_and(|t| t.trim() == "1") {
            if let Err(e) = std::fs::write(&freeze, "0") {
                tracing::warn!(agent, error = %e, "cannot reset cgroup.freeze after the kill");
            }
        }
        if let Some(v1) = self.v1_dir(agent).filter(|d| d.is_dir()) {
            let root = self.v1_freezer.clone().unwrap_or_default();
            let _ = fallback::v1_thaw(&root, &v1, Instant::now() + Duration::from_secs(1));
        }
    }
}

fn outcome(action: Action, agent: &str, method: Method, pids: Vec<u32>, elapsed: Duration, confirmed: bool) -> Outcome {
    Outcome {
        action,
        agent: agent.to_owned(),
        method,
        processes: pids.len(),
        elapsed_us: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
        confirmed,
        pids,
    }
}

/// Every pid in `dir` and its descendant cgroups.
pub fn pids_below(dir: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = cgroups::with_descendants(dir, MAX_DEPTH)
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect::<Vec<u32>>())
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// `cgroup.events` of one cgroup, opened before the write that changes it so
/// that no notification is missed. The kernel wakes pollers of the file with
/// POLLPRI on every change (kernfs_notify() from cgroup_file_notify()); a
/// read records which change the reader has seen.
struct EventsFile {
    file: File,
    path: PathBuf,
}

impl EventsFile {
    fn open(dir: &Path) -> Result<Self, KillswitchError> {
        let path = dir.join("cgroup.events");
        let file = File::open(&path).map_err(io_err("open", &path))?;
        Ok(Self { file, path })
    }

    fn read(&mut self) -> Result<String, KillswitchError> {
        let mut text = String::new();
        self.file
            .rewind()
            .and_then(|()| self.file.read_to_string(&mut text))
            .map_err(io_err("read", &self.path))?;
        Ok(text)
    }

    /// Wait until the file has the line `want`; false when `deadline` passed.
    fn wait_for(&mut self, want: &str, deadline: Instant) -> Result<bool, KillswitchError> {
        self.wait_for_or(want, deadline, || false)
    }

    /// [`Self::wait_for`], also ending (true) as soon as `done()` holds.
    fn wait_for_or(&mut self, want: &str, deadline: Instant, done: impl Fn() -> bool) -> Result<bool, KillswitchError> {
        loop {
            if self.read()?.lines().any(|l| l == want) || done() {
                return Ok(true);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            let wait = RECHECK.min(deadline - now);
            let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLPRI)];
            match ppoll(&mut fds, Some(TimeSpec::from_duration(wait)), None) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(io_err("poll", &self.path)(e.into())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_inside_the_subtree_are_refused() {
        assert!(refuse_caller_inside_subtree("agentguard", Some("/agentguard/claude/run-1")).is_err());
        assert!(refuse_caller_inside_subtree("agentguard", Some("/agentguard")).is_err());
        assert!(refuse_caller_inside_subtree("agentguard", None).is_err());
        assert!(refuse_caller_inside_subtree("agentguard", Some("/agentguard-other/x")).is_ok());
        assert!(refuse_caller_inside_subtree("agentguard", Some("/user.slice/session-1.scope")).is_ok());
        assert!(refuse_caller_inside_subtree("/a/b/", Some("/a/b/c")).is_err());
    }

    #[test]
    fn agent_names_cannot_leave_the_subtree() {
        let ks = Killswitch::new(Path::new("/nonexistent-cgroup-root"), "agentguard");
        for bad in ["", ".", "..", "../x", "a/b"] {
            assert!(matches!(ks.resolve(&Target::Agent(bad.into())), Err(KillswitchError::BadName { .. })), "{bad:?}");
        }
        let e = ks.resolve(&Target::Agent("claude".into())).expect_err("must be rejected");
        assert!(e.to_string().contains("no agent has one"), "{e}");
        assert_eq!(ks.resolve(&Target::All).expect("all"), Vec::<String>::new());
    }

    #[test]
    fn target_wire_format() {
        assert_eq!(serde_json::to_string(&Target::All).expect("json"), r#""all""#);
        assert_eq!(serde_json::to_string(&Target::Agent("c".into())).expect("json"), r#"{"agent":"c"}"#);
    }

    #[test]
    fn summary_reads_like_the_runbook() {
        let o = outcome(Action::Freeze, "claude", Method::Cgroup2, (1..=212).collect(), Duration::from_micros(3100), true);
        assert_eq!(o.summary(), "froze agent claude: 212 processes in 3.1 ms (cgroup v2)");
        let weak = Outcome { method: Method::Signals, confirmed: false, ..o };
        assert!(weak.summary().contains("WEAKER") && weak.summary().contains("NOT CONFIRMED"), "{}", weak.summary());
    }
}
