//! A real `agentguard daemon` for a test: its own policy directory, event
//! log, socket and cgroup subtree under a temporary directory; stopped and
//! cleaned up on drop.
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{agentguard_bin, guard::TempDir};

pub struct Daemon {
    pub dir: TempDir,
    pub child: Option<Child>,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub events_log: PathBuf,
    pub subtree: String,
    /// On bpffs (pins cannot live in the temporary directory), one per
    /// daemon so tests never share kernel state; removed on drop.
    pub pin_dir: PathBuf,
    stderr_log: PathBuf,
    /// Run the daemon in a mount namespace of its own where this file is
    /// /etc/hosts (see [`Self::start_with_hosts`]).
    hosts: Option<PathBuf>,
}

/// Pin directories of test daemons whose test process is gone (killed
/// before its drops ran): their programs would stay attached forever.
fn remove_stale_pin_dirs() {
    let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("agentguard-test-").and_then(|r| r.split('-').next()).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

impl Daemon {
    /// Start a daemon with these policies (file name, text) and wait until
    /// it is ready.
    pub fn start(policies: &[(&str, &str)]) -> Self {
        Self::start_with(policies, "")
    }

    /// Like [`Self::start`], with `extra` appended to the configuration
    /// (top-level `key = value` lines; a key given there replaces the default).
    pub fn start_with(policies: &[(&str, &str)], extra: &str) -> Self {
        let mut d = Self::prepare(policies, extra);
        d.spawn();
        d
    }

    /// Like [`Self::start`], with the daemon's directory (its policies,
    /// socket, event log: AgentGuard's own files) made under `parent`.
    pub fn start_in(parent: &Path, policies: &[(&str, &str)]) -> Self {
        let mut d = Self::prepare_in(parent, policies, "");
        d.spawn();
        d
    }

    /// The directory and configuration, without starting the process.
    fn prepare(policies: &[(&str, &str)], extra: &str) -> Self {
        Self::prepare_in(&std::env::temp_dir(), policies, extra)
    }

    fn prepare_in(parent: &Path, policies: &[(&str, &str)], extra: &str) -> Self {
        crate::kernel::assert_root();
        let dir = TempDir::new_in(parent, "daemon");
        let policy_dir = dir.join("policies");
        std::fs::create_dir_all(&policy_dir).expect("mkdir policies");
        for (name, text) in policies {
            std::fs::write(policy_dir.join(name), text).expect("write policy");
        }
        let socket = dir.join("agentguard.sock");
        let events_log = dir.join("events.jsonl");
        let subtree = format!("agentguard-test-{}", std::process::id());
        let config = dir.join("agentguard.toml");
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let _ = agentguard::mounts::ensure_mounted("bpf", "/sys/fs/bpf");
        remove_stale_pin_dirs();
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/agentguard-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        // A key in `extra` replaces the default line for it.
        let overridden = |line: &&str| {
            let key = line.split('=').next().unwrap_or("").trim();
            extra.lines().any(|l| l.split('=').next().unwrap_or("").trim() == key)
        };
        let defaults = format!(
            "policy_dir = {:?}\nevents_log = {:?}\nsocket = {:?}\ncgroup_subtree = {:?}\npin_dir = {:?}\nincident_dir = {:?}\nchain_head = {:?}\nrun_state = {:?}\n",
            policy_dir,
            events_log,
            socket,
            subtree,
            pin_dir,
            dir.join("incidents"),
            dir.join("chain-head"),
            dir.join("sessions.json"),
        );
        let kept: Vec<&str> = defaults.lines().filter(|l| !overridden(l)).collect();
        std::fs::write(&config, format!("{}\n{extra}\n", kept.join("\n"))).expect("write config");
        let stderr_log = dir.join("daemon.stderr");
        Self { dir, child: None, config, socket, events_log, subtree, pin_dir, stderr_log, hosts: None }
    }

    /// Like [`Self::start_with`], with the daemon seeing `hosts` as its
    /// /etc/hosts (bind-mounted in a private mount namespace: the host's own
    /// file is never touched).
    pub fn start_with_hosts(policies: &[(&str, &str)], extra: &str, hosts: &str) -> Self {
        let mut d = Self::prepare(policies, extra);
        let file = d.dir.join("hosts");
        std::fs::write(&file, hosts).expect("write hosts");
        d.hosts = Some(file);
        d.spawn();
        d
    }

    /// Start the daemon process again after [`Self::stop`], same configuration.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    fn spawn(&mut self) {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_log)
            .expect("stderr log");
        let mut cmd = Command::new(agentguard_bin());
        cmd.args(["--config"])
            .arg(&self.config)
            .arg("daemon")
            .env("AGENTGUARD_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        if let Some(hosts) = self.hosts.clone() {
            use std::os::unix::process::CommandExt as _;

            use nix::{mount::MsFlags, sched::CloneFlags};
            // SAFETY: only syscalls between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sched::unshare(CloneFlags::CLONE_NEWNS)?;
                    nix::mount::mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)?;
                    nix::mount::mount(Some(&hosts), "/etc/hosts", None::<&str>, MsFlags::MS_BIND, None::<&str>)?;
                    Ok(())
                });
            }
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", agentguard_bin().display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let ready = lines.next().and_then(Result::ok).unwrap_or_default();
        self.child = Some(child);
        assert_eq!(ready, "agentguard daemon ready", "daemon did not start; its log:\n{}", self.stderr());
        // Keep draining stdout so the daemon never blocks on it.
        std::thread::spawn(move || for _ in lines {});
    }

    /// Where this daemon (and the CLI with this config) writes incident records.
    pub fn incident_dir(&self) -> PathBuf {
        self.dir.join("incidents")
    }

    /// Stop the daemon process but keep its cgroups and the agents in them
    /// (they are removed on drop).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGKILL the daemon (no shutdown path runs), keeping its pins.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start the daemon process again after [`Self::stop`] or [`Self::kill9`].
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the daemon is still running");
        self.spawn();
    }

    /// The daemon's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Wait (at most `limit`) until the daemon used no CPU time for half a
    /// second: a benchmark measured while it still settles after its start
    /// measures the daemon too. Returns whether it became idle.
    pub fn wait_idle(&self, limit: std::time::Duration) -> bool {
        let Some(pid) = self.pid() else { return false };
        // utime + stime, in clock ticks (proc(5), fields 14 and 15).
        let ticks = || -> Option<u64> {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let after_comm = &stat[stat.rfind(')')? + 2..];
            let f: Vec<&str> = after_comm.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        };
        let start = std::time::Instant::now();
        let mut last = ticks();
        while start.elapsed() < limit {
            std::thread::sleep(std::time::Duration::from_millis(500));
            let now = ticks();
            if now.is_some() && now == last {
                return true;
            }
            last = now;
        }
        false
    }

    /// Everything pinned under this daemon's pin directory (relative paths).
    pub fn pins(&self) -> Vec<String> {
        agentguard::pins::list(&self.pin_dir)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// Run the CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(agentguard_bin())
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run agentguard CLI")
    }

    /// `agentguard status --json`.
    pub fn status(&self) -> Value {
        let out = self.cli(&["status", "--json"]);
        assert!(out.status.success(), "status: {}{}", String::from_utf8_lossy(&out.stderr), self.stderr());
        serde_json::from_slice(&out.stdout).expect("status --json is JSON")
    }

    /// Whether the daemon reports `program` attached.
    pub fn attached(&self, program: &str) -> bool {
        self.status()["probes"].as_array().is_some_and(|p| p.iter().any(|p| p["program"] == program && p["state"] == "attached"))
    }

    /// A `Command` for `agentguard run --agent AGENT -- args...`.
    pub fn run_cmd(&self, agent: &str, args: &[&str]) -> Command {
        let mut c = Command::new(agentguard_bin());
        c.arg("--config").arg(&self.config).args(["run", "--agent", agent, "--"]).args(args);
        c
    }

    pub fn ps(&self) -> Value {
        let out = self.cli(&["ps", "--json"]);
        assert!(out.status.success(), "ps failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("ps --json is JSON")
    }

    /// The (agent, session) ps reports for `pid`, if it is tagged.
    pub fn tag_of(&self, pid: u32) -> Option<(String, u64)> {
        let ps = self.ps();
        ps["processes"].as_array()?.iter().find(|p| p["pid"] == pid).map(|p| {
            (p["agent"].as_str().unwrap_or("").to_owned(), p["session"].as_u64().unwrap_or(0))
        })
    }

    /// Poll until `pred` holds on `ps`, or panic after `timeout`.
    pub fn wait_ps(&self, timeout: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let ps = self.ps();
            if pred(&ps) {
                return ps;
            }
            if start.elapsed() >= timeout {
                let text = std::fs::read_to_string(&self.events_log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
                panic!("timed out waiting for {what}; ps: {ps:#}\nlast events:\n{}\ndaemon log:\n{}", tail.join("\n"), self.stderr());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every complete line of the event log, parsed. A last line without
    /// its newline is a batch the daemon is writing at this moment (a read
    /// can see part of a concurrent write(2)): it is left for the next read.
    pub fn events(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.events_log).unwrap_or_default();
        let complete = match text.rfind('\n') {
            Some(end) => &text[..=end],
            None => "",
        };
        complete
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad log line {l}: {e}")))
            .collect()
    }

    /// Poll the event log until an event satisfies `pred`.
    pub fn wait_event(&self, timeout: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            if let Some(e) = self.events().into_iter().find(|e| pred(e)) {
                return e;
            }
            assert!(start.elapsed() < timeout, "timed out waiting for event {what}; log:\n{:#?}\ndaemon:\n{}", self.events(), self.stderr());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `approvals --json`: the pending approvals.
    pub fn approvals(&self) -> Vec<Value> {
        let out = self.cli(&["approvals", "--json"]);
        assert!(out.status.success(), "approvals failed: {}\ndaemon:\n{}", String::from_utf8_lossy(&out.stderr), self.stderr());
        serde_json::from_slice::<Value>(&out.stdout).expect("approvals --json is JSON").as_array().cloned().unwrap_or_default()
    }

    /// Poll until a pending approval satisfies `pred`; returns it.
    pub fn wait_approval(&self, timeout: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            if let Some(a) = self.approvals().into_iter().find(|a| pred(a)) {
                return a;
            }
            assert!(start.elapsed() < timeout, "timed out waiting for approval {what}; pending: {:#?}\ndaemon:\n{}", self.approvals(), self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the kernel reports `agent`'s cgroup frozen.
    pub fn frozen(&self, agent: &str) -> bool {
        std::fs::read_to_string(self.cgroup_subtree().join(agent).join("cgroup.events")).is_ok_and(|t| t.lines().any(|l| l == "frozen 1"))
    }

    pub fn cgroup_subtree(&self) -> PathBuf {
        agentguard::mounts::cgroup2_root().expect("cgroup2").join(&self.subtree)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        // The pins keep the programs attached after the daemon: remove them.
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        remove_cgroup_tree(&self.cgroup_subtree());
    }
}

/// Kill everything in a cgroup tree and remove it, deepest first.
pub fn remove_cgroup_tree(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    let mut dirs = agentguard::cgroups::with_descendants(dir, 16);
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in dirs {
        for _ in 0..100 {
            if std::fs::remove_dir(&d).is_ok() || !d.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The ag-testbin helper: `$AGENTGUARD_TESTBIN`, else next to `agentguard`.
pub fn testbin() -> PathBuf {
    std::env::var_os("AGENTGUARD_TESTBIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| agentguard_bin().with_file_name("ag-testbin"))
}

/// Parse `key=value` lines of ag-testbin output.
pub fn facts(out: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(out)
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect()
}

pub fn fact(out: &[u8], key: &str) -> Option<String> {
    facts(out).into_iter().find(|(k, _)| k == key).map(|(_, v)| v)
}
