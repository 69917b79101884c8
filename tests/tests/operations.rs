//! Daemon operations on the real kernel: enforcement that outlives a
//! SIGKILLed daemon and is taken over by the next one, `stop --unload`,
//! reloads that leave no window, `status`, and the systemd unit.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use agentguard_tests::{
    agentguard_bin,
    daemon::{fact, testbin, Daemon},
    guard::CgroupGuard,
    kernel::spawn_in_cgroup,
    require, require_lsm,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

fn policy(agent: &str, port: u16, filler: usize) -> String {
    let mut p = format!(
        r#"[agent]
name = "{agent}"

[network]
default = "allow"

[[network.rule]]
id = "deny-port"
decision = "deny"
cidr = ["127.0.0.1/32"]
ports = [{port}]
protocol = "udp"
"#
    );
    if filler > 0 {
        p.push_str("\n[[network.rule]]\nid = \"allow-lo24\"\ndecision = \"allow\"\ncidr = [\"127.0.0.0/24\"]\n");
    }
    p.push_str(&filler_rules(filler));
    p
}

/// `n` host rules elsewhere, so a reload rewrites many entries, in the
/// compiler's order, between the ones that matter.
fn filler_rules(n: usize) -> String {
    (0..n)
        .map(|i| format!("\n[[network.rule]]\nid = \"filler-{i}\"\ndecision = \"deny\"\ncidr = [\"10.{}.{}.{}/32\"]\n", i >> 16, (i >> 8) & 255, i & 255))
        .collect()
}

/// The other version for the reload test: the port denied through a /24
/// instead. Going from this one to `policy(.., filler > 0)` changes the /24's
/// list to an allow and adds a /32 that denies: a compiler that rewrote the
/// /24 before adding the /32 would let connects through in between.
fn policy_via_net(agent: &str, port: u16, filler: usize) -> String {
    format!(
        "[agent]\nname = \"{agent}\"\n\n[network]\ndefault = \"allow\"\n\n[[network.rule]]\nid = \"deny-lo24\"\ndecision = \"deny\"\ncidr = [\"127.0.0.0/24\"]\nports = [{port}]\nprotocol = \"udp\"\n{}",
        filler_rules(filler)
    )
}

fn status(d: &Daemon) -> Value {
    d.status()
}

/// An agent started with `agentguard run` that runs `connects ADDR N 0 stdin`:
/// ready, then N UDP connects in a tight loop when told, then waits.
struct Connector {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Connector {
    fn start(d: &Daemon, agent: &str, port: u16, n: u64) -> Self {
        let tb = testbin();
        let mut child = d
            .run_cmd(agent, &[tb.to_str().expect("utf-8"), "connects", &format!("127.0.0.1:{port}"), &n.to_string(), "0", "stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn agent");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let c = Self { child, stdin, lines };
        while c.next_line() != "ready=1" {}
        c
    }

    fn next_line(&self) -> String {
        self.lines.recv_timeout(Duration::from_secs(120)).expect("a line from the agent")
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn go(&mut self) {
        writeln!(self.stdin).expect("tell the agent");
    }

    /// (attempts, denied), once the loop is done.
    fn result(&self) -> (u64, u64) {
        let mut attempts = None;
        loop {
            let l = self.next_line();
            if let Some(v) = l.strip_prefix("attempts=") {
                attempts = v.parse().ok();
            }
            if let Some(v) = l.strip_prefix("denied=") {
                return (attempts.expect("attempts first"), v.parse().expect("number"));
            }
        }
    }

    /// Close its stdin: whatever it waits for, it exits.
    fn finish(self) {
        let Self { mut child, stdin, .. } = self;
        drop(stdin);
        let _ = child.wait();
    }
}

/// A new process exec'd inside `cgroup` (a run session's), which the kernel
/// tags at exec from the session's selector: its UDP connect's errno.
fn connect_from(cgroup: &std::path::Path, port: u16) -> String {
    let guard = CgroupGuard { path: cgroup.to_owned() };
    let mut cmd = Command::new(testbin());
    cmd.args(["connect", "udp", &format!("127.0.0.1:{port}")]).stdout(Stdio::piped());
    let out = spawn_in_cgroup(&mut cmd, &guard).wait_with_output().expect("wait");
    std::mem::forget(guard); // the daemon's cgroup, not the test's to remove
    fact(&out.stdout, "errno").or_else(|| fact(&out.stdout, "result")).unwrap_or_default()
}

fn session_cgroup(d: &Daemon, agent: &str) -> std::path::PathBuf {
    let st = status(d);
    let s = st["session_list"].as_array().and_then(|l| l.iter().find(|s| s["agent"] == agent)).cloned();
    let s = s.unwrap_or_else(|| panic!("no session of {agent} in status: {st:#}"));
    s["cgroup"].as_str().expect("cgroup").into()
}

fn net_events_of(d: &Daemon, pid: u32) -> Vec<Value> {
    d.events().into_iter().filter(|e| e["kind"] == "net" && e["pid"] == pid).collect()
}

#[test]
fn sigkill_leaves_enforcement_in_place_and_a_restart_takes_it_over() {
    let port = 40_000 + (std::process::id() % 1000) as u16;
    let mut d = Daemon::start(&[("crash.toml", &policy("crashy", port, 0))]);
    let mut agent = Connector::start(&d, "crashy", port, 50);
    let cgroup = session_cgroup(&d, "crashy");
    let pins_before = d.pins();
    for must in ["links/sched_process_fork", "links/sched_process_exec", "links/sched_process_exit", "live/connect4", "maps/AG_TAGS", "maps/AG_EVENTS", "maps/AG_NET_V4"] {
        assert!(pins_before.iter().any(|p| p.ends_with(must)), "{must} is not pinned: {pins_before:#?}");
    }

    d.kill9();
    assert!(!d.socket.exists() || std::os::unix::net::UnixStream::connect(&d.socket).is_err(), "the daemon is gone");
    assert_eq!(d.pins(), pins_before, "SIGKILL leaves every pin");
    // The running agent is still judged...
    agent.go();
    assert_eq!(agent.result(), (50, 50), "every connect after the daemon died must be denied");
    // ...and so is a process that starts in its session now: tagged at exec
    // by the pinned program from the pinned selector.
    assert_eq!(connect_from(&cgroup, port), "EPERM", "a new agent process while no daemon runs");

    d.start_again();
    let err = d.stderr();
    assert!(err.contains("took over the kernel state a previous daemon left pinned"), "{err}");
    let st = status(&d);
    assert_eq!(st["pins"]["adopted_at_start"], true, "{st:#}");
    assert_eq!(d.pins(), pins_before, "nothing attached twice, nothing lost");
    // The programs of the links it took over are watched for skipped runs
    // as its own would be (skips.rs).
    assert!(st["skipped_runs"]["sched_process_fork"].is_u64(), "{st:#}");
    assert!(!err.contains("cannot watch the program's skipped runs"), "{err}");
    // The session and the tag are the same ones.
    assert_eq!(session_cgroup(&d, "crashy"), cgroup);
    let tag = d.tag_of(agent.pid());
    assert!(tag.as_ref().is_some_and(|(a, s)| a == "crashy" && *s >= 0x8000_0000), "{tag:?}");
    // What the kernel did while no daemon ran was in the pinned ring buffer:
    // each of the 50 denials is logged once (once: not two programs attached).
    let start = Instant::now();
    while net_events_of(&d, agent.pid()).len() < 50 {
        assert!(start.elapsed() < WAIT, "the denials made while the daemon was dead never reached the log: {:#?}\n{}", net_events_of(&d, agent.pid()), d.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    let evs = net_events_of(&d, agent.pid());
    assert_eq!(evs.len(), 50, "each denial exactly once");
    assert!(evs.iter().all(|e| e["decision"] == "deny" && e["rule"] == "deny-port"), "{evs:#?}");
    // Still enforcing, with the new daemon.
    assert_eq!(connect_from(&cgroup, port), "EPERM", "after the restart");
    agent.finish();
    // A rule taken out of the policy while no daemon ran: the next daemon
    // knows nothing of what the pinned maps hold, finds the stale entry in
    // the kernel and removes it.
    d.kill9();
    std::fs::write(d.dir.join("policies").join("crash.toml"), policy_via_net("crashy", port.wrapping_add(1), 0)).expect("rewrite policy");
    d.start_again();
    let run_connect = |port: u16| {
        let tb = testbin();
        let out = d.run_cmd("crashy", &[tb.to_str().expect("utf-8"), "connect", "udp", &format!("127.0.0.1:{port}")]).stdout(Stdio::piped()).output().expect("run agent");
        fact(&out.stdout, "errno").or_else(|| fact(&out.stdout, "result")).unwrap_or_default()
    };
    assert_eq!(run_connect(port), "ok", "the rule removed while the daemon was dead still denies");
    assert_eq!(run_connect(port.wrapping_add(1)), "EPERM", "the new rule applies");
    // The log is one chain across the crash.
    d.stop();
    let out = d.cli(&["audit", "verify"]);
    assert!(out.status.success(), "audit verify after a SIGKILL and a restart: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn stop_keeps_enforcing_and_stop_unload_removes_everything() {
    let port = 41_000 + (std::process::id() % 1000) as u16;
    let mut d = Daemon::start(&[("u.toml", &policy("unloady", port, 0))]);
    let mut agent = Connector::start(&d, "unloady", port, 20);
    let cgroup = session_cgroup(&d, "unloady");
    assert!(!d.pins().is_empty());

    // `stop`: the daemon exits, the programs stay.
    let out = d.cli(&["stop"]);
    assert!(out.status.success(), "stop: {}", String::from_utf8_lossy(&out.stderr));
    wait_exit(&mut d);
    assert!(!d.pins().is_empty(), "stop without --unload keeps the pins");
    assert_eq!(connect_from(&cgroup, port), "EPERM", "still enforced after `stop`");

    // Back, then `stop --unload` through the daemon.
    d.start_again();
    assert_eq!(status(&d)["pins"]["adopted_at_start"], true);
    let out = d.cli(&["stop", "--unload", "--json"]);
    assert!(out.status.success(), "stop --unload: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!((v["stopped"].as_bool(), v["unloaded"].as_bool()), (Some(true), Some(true)), "{v:#}");
    assert_eq!(v["programs_left"].as_array().map(Vec::len), Some(0), "the kernel let go of every program: {v:#}");
    wait_exit(&mut d);
    assert!(!d.pin_dir.exists(), "the pin directory is gone: {:?}", d.pins());
    // Nothing judges the agent any more.
    agent.go();
    assert_eq!(agent.result(), (20, 0), "after unload no connect is denied");
    agent.finish();
}

#[test]
fn stop_unload_without_a_daemon_removes_what_a_crashed_daemon_left() {
    let port = 42_000 + (std::process::id() % 1000) as u16;
    let mut d = Daemon::start(&[("c.toml", &policy("orphan", port, 0))]);
    let mut agent = Connector::start(&d, "orphan", port, 10);
    d.kill9();
    let out = d.cli(&["stop", "--unload"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("was not running") && text.contains("unloaded"), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(!d.pin_dir.exists(), "{:?}", d.pins());
    agent.go();
    assert_eq!(agent.result(), (10, 0), "no program left to deny");
    agent.finish();
}

fn wait_exit(d: &mut Daemon) {
    let mut child = d.child.take().expect("running");
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the daemon did not exit; log:\n{}", d.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn reloads_under_load_leave_no_window_and_an_invalid_policy_keeps_the_old_one() {
    let port = 43_000 + (std::process::id() % 1000) as u16;
    // fail_closed off: a ring-buffer overflow must not deny in the policy's
    // place and hide a window. Small rotated log files: many events.
    let d = Daemon::start_with(
        &[("r.toml", &policy("reloady", port, 0))],
        "fail_closed = false\nevents_rotate_bytes = 4194304\nevents_rotate_keep = 2",
    );
    let file = d.dir.join("policies").join("r.toml");
    let a = policy_via_net("reloady", port, 1000);
    let b = policy("reloady", port, 1000);
    let mut agent = Connector::start(&d, "reloady", port, 3_000_000);
    agent.go();
    // Reload, alternating the two versions, until the loop is over.
    let mut reloads = 0u64;
    let mut got: Vec<String> = Vec::new();
    let finished = |got: &[String]| got.iter().any(|l| l.starts_with("denied="));
    while !finished(&got) {
        std::fs::write(&file, if reloads.is_multiple_of(2) { &b } else { &a }).expect("write policy");
        let out = d.cli(&["reload"]);
        assert!(out.status.success(), "reload: {}", String::from_utf8_lossy(&out.stderr));
        reloads += 1;
        got.extend(agent.lines.try_iter());
    }
    let num = |key: &str| got.iter().find_map(|l| l.strip_prefix(key)).and_then(|v| v.parse::<u64>().ok()).expect("a number");
    let (attempts, denied) = (num("attempts="), num("denied="));
    eprintln!("{attempts} connects across {reloads} reloads, {denied} denied");
    assert!(reloads >= 3, "the loop ended before the reloads could overlap it ({reloads})");
    assert_eq!(denied, attempts, "{} connects got through during reloads", attempts - denied);
    let st = status(&d);
    assert_eq!(st["policy"]["version"], reloads, "{st:#}");

    // An invalid policy: refused with file:line:column, the old one stays.
    let before = st["policy"]["hash"].clone();
    std::fs::write(&file, format!("{a}\n[[network.rule]]\nid = \"broken\"\ndecision = \"maybe\"\ncidr = [\"1.2.3.4/32\"]\n")).expect("write");
    let out = d.cli(&["reload"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("r.toml:") && err.contains("previous policy stays"), "{err}");
    let st = status(&d);
    assert_eq!((st["policy"]["version"].as_u64(), &st["policy"]["hash"]), (Some(reloads), &before), "{st:#}");
    assert_eq!(connect_from(&session_cgroup(&d, "reloady"), port), "EPERM", "the old policy is in force");
    agent.finish();
}

#[test]
fn status_reports_policy_sessions_enforcement_and_pins() {
    let port = 44_000 + (std::process::id() % 1000) as u16;
    let d = Daemon::start(&[("s.toml", &policy("statusy", port, 0))]);
    let agent = Connector::start(&d, "statusy", port, 1);
    let st = status(&d);
    assert_eq!(st["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(st["policy"]["version"], 0);
    assert_eq!(st["policy"]["hash"].as_str().map(str::len), Some(64), "{st:#}");
    assert!(st["agents"].as_array().is_some_and(|a| a.iter().any(|x| x == "statusy")), "{st:#}");
    assert!(st["session_list"].as_array().is_some_and(|l| l.iter().any(|s| s["agent"] == "statusy" && s["kind"] == "run")), "{st:#}");
    for class in ["tagging", "network", "file", "killswitch"] {
        assert!(st["enforcement"][class].is_string(), "no mechanism for {class}: {st:#}");
    }
    assert!(st["enforcement"]["network"].as_str().is_some_and(|n| n.contains("(attached)")), "{st:#}");
    assert!(st["events"]["kernel"]["ringbuf_drops"].is_u64(), "{st:#}");
    assert!(st["pending_approvals"].is_array(), "{st:#}");
    assert!(st["pins"]["pinned"].as_u64().is_some_and(|n| n > 10), "{st:#}");
    // Runs the kernel skipped, read from every tracepoint and fexit
    // program's info (skips.rs): the tagging tracepoints everywhere, the
    // directory cache's stamps with BPF-LSM, the fallback's tracepoints
    // without. null would mean this kernel cannot count them.
    let skipped = st["skipped_runs"].as_object().unwrap_or_else(|| panic!("skipped_runs: {st:#}"));
    let watched = |p: &str| skipped.get(p).is_some_and(Value::is_u64);
    assert!(watched("sched_process_fork") && watched("sched_process_exec"), "{st:#}");
    let lsm = st["file_enforcement"]["mode"] == "veto";
    assert!(if lsm { watched("dircache_rename") } else { watched("sys_enter_unlinkat") }, "{st:#}");
    assert!(!skipped.contains_key("path_unlink") && !skipped.contains_key("connect4"), "BPF-LSM and cgroup programs are never skipped: {st:#}");
    assert!(st["file_cache_generation"].is_u64(), "{st:#}");
    // priority_boost (default 10): every thread of the daemon runs at nice
    // -10, as the kernel reports it (field 19 of /proc/PID/task/TID/stat).
    assert_eq!(st["nice"], -10, "{st:#}");
    let pid = st["daemon_pid"].as_u64().expect("daemon_pid");
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks").filter_map(Result::ok).collect();
    assert!(!tasks.is_empty());
    for t in tasks {
        let stat = std::fs::read_to_string(t.path().join("stat")).expect("stat");
        let comm_end = stat.rfind(')').expect("comm");
        let fields: Vec<&str> = stat[comm_end + 2..].split(' ').collect();
        // fields[0] is field 3 (state): nice, field 19, is fields[16].
        assert_eq!(fields[16], "-10", "thread {:?} of the daemon: {stat}", t.file_name());
    }
    let text = d.cli(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("policy:   version 0 sha256 ") && text.contains("network:") && text.contains("pending approvals: 0"), "{text}");
    assert!(text.contains("runs skipped by the kernel: "), "{text}");
    agent.finish();
}

/// The unit file in the repo, as systemd itself reads it.
#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    let unit = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/agentguard.service");
    require!(unit.exists(), "packaging/agentguard.service is not in this image ({})", unit.display());
    let analyze = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"].into_iter().find(|p| std::path::Path::new(p).exists());
    require!(analyze.is_some(), "systemd-analyze is not installed here (apt package systemd; `cargo xtask setup` installs it on the host)");
    // The unit names /usr/local/bin/agentguard; point it at the binary under
    // test (verify checks that ExecStart exists and is executable).
    let dir = agentguard_tests::guard::TempDir::new("unit");
    let text = std::fs::read_to_string(&unit).expect("read unit").replace("/usr/local/bin/agentguard", agentguard_bin().to_str().expect("utf-8"));
    let copy = dir.join("agentguard.service");
    std::fs::write(&copy, text).expect("write unit");
    let out = Command::new(analyze.expect("checked")).args(["verify", "--man=no"]).arg(&copy).output().expect("systemd-analyze");
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // Lines about the unit itself; the host's other units are not ours to judge.
    let ours: Vec<&str> = all.lines().filter(|l| l.contains("agentguard.service")).collect();
    assert!(out.status.success() && ours.is_empty(), "systemd-analyze verify: {all}");
}

/// Run `ag-testbin ARGS` as a process of `agent`'s session (tagged at exec)
/// and return its errno (or `ok`).
fn as_agent(d: &Daemon, cgroup: &std::path::Path, args: &[&str]) -> String {
    let guard = CgroupGuard { path: cgroup.to_owned() };
    let mut cmd = Command::new(testbin());
    cmd.args(args).stdout(Stdio::piped());
    let out = spawn_in_cgroup(&mut cmd, &guard).wait_with_output().expect("wait");
    std::mem::forget(guard);
    let _ = d;
    fact(&out.stdout, "errno").or_else(|| fact(&out.stdout, "result")).unwrap_or_default()
}

/// Self-protection (BPF-LSM; the qemu harness): an agent cannot signal or
/// ptrace the daemon, nor open AgentGuard's pinned maps with bpf(), while
/// the same actions from an untagged process go through.
#[test]
fn an_agent_cannot_signal_ptrace_or_bpf_the_daemon() {
    let port = 46_000 + (std::process::id() % 1000) as u16;
    let d = Daemon::start(&[("p.toml", &policy("protected", port, 0))]);
    let st = status(&d);
    let probe = st["probes"].as_array().and_then(|p| p.iter().find(|p| p["program"] == "protect_task_kill")).cloned().unwrap_or_default();
    require_lsm!(probe["state"] == "attached", "BPF-LSM self-protection cannot load on this kernel ({}); it runs in the qemu harness", probe["reason"].as_str().unwrap_or("no reason given"));
    assert!(st["enforcement"]["self_protection"].as_str().is_some_and(|s| s.starts_with("BPF-LSM")), "{st:#}");
    let agent = Connector::start(&d, "protected", port, 1);
    let cgroup = session_cgroup(&d, "protected");
    let daemon = d.pid().expect("running").to_string();
    let tags = d.pins().into_iter().find(|p| p.ends_with("maps/AG_TAGS")).map(|p| d.pin_dir.join(p)).expect("AG_TAGS pinned");
    let tags = tags.to_str().expect("utf-8");

    // An agent: every attempt refused.
    for (what, args) in [
        ("SIGKILL to the daemon", vec!["signal", &daemon, "9"]),
        ("SIGSTOP to the daemon", vec!["signal", &daemon, "19"]),
        ("signal 0 to the daemon", vec!["signal", &daemon, "0"]),
        ("ptrace of the daemon", vec!["ptrace", &daemon]),
        ("bpf() on the pinned tag map", vec!["bpf-obj-get", tags]),
    ] {
        assert_eq!(as_agent(&d, &cgroup, &args), "EPERM", "{what} by an agent");
    }
    assert!(status(&d)["daemon_pid"].as_u64().is_some(), "the daemon still answers");
    // The agent's own kin is not protected: it can still signal itself.
    assert_eq!(as_agent(&d, &cgroup, &["signal", &agent.pid().to_string(), "0"]), "ok", "signals between agent processes");
    // Not an agent: the same calls work (the refusal is the tag's, not the kernel's).
    let untagged = |args: &[&str]| {
        let out = Command::new(testbin()).args(args).output().expect("run");
        fact(&out.stdout, "errno").or_else(|| fact(&out.stdout, "result")).unwrap_or_default()
    };
    assert_eq!(untagged(&["signal", &daemon, "0"]), "ok");
    assert_eq!(untagged(&["bpf-obj-get", tags]), "ok");
    agent.finish();
}

/// Self-protection of AgentGuard's files (BPF-LSM; the qemu harness): an
/// agent cannot write, truncate, remove, rename or link AgentGuard's
/// configuration, policies, event log, chain head or pins, cannot plant a
/// file, directory or symlink among them, and cannot write a cgroup's
/// membership or freeze file (leave its cgroup, thaw itself). An untagged
/// process still can; every refusal is counted in `status`.
#[test]
fn an_agent_cannot_write_remove_or_plant_agentguards_files() {
    let port = 46_000 + (std::process::id() % 1000) as u16;
    // The incidents live two levels below a directory of the test's: the
    // directories above a guarded one may not be renamed.
    let outside = agentguard_tests::guard::TempDir::new("outside");
    let incidents = outside.join("var").join("incidents");
    let d = Daemon::start_with(&[("p.toml", &policy("guarded", port, 0))], &format!("incident_dir = {incidents:?}"));
    let st = status(&d);
    let probe = st["probes"].as_array().and_then(|p| p.iter().find(|p| p["program"] == "protect_file_open")).cloned().unwrap_or_default();
    require_lsm!(probe["state"] == "attached", "BPF-LSM self-protection cannot load on this kernel ({}); it runs in the qemu harness", probe["reason"].as_str().unwrap_or("no reason given"));
    let agent = Connector::start(&d, "guarded", port, 1);
    let cgroup = session_cgroup(&d, "guarded");
    let s = |p: &std::path::Path| p.to_str().expect("utf-8").to_owned();
    let policy_file = d.dir.join("policies").join("p.toml");
    let policy_text = std::fs::read(&policy_file).expect("policy");
    let config_text = std::fs::read(&d.config).expect("config");
    let chain_head = d.dir.join("chain-head");
    let pin = d.pins().into_iter().find(|p| p.ends_with("maps/AG_TAGS")).map(|p| d.pin_dir.join(p)).expect("AG_TAGS pinned");
    let planted = outside.join("evil.toml");
    let beside = outside.join("var").join("beside");
    std::fs::write(&beside, "not AgentGuard's").expect("write beside");
    std::fs::write(&planted, "[agent]\nname = \"guarded\"\n[network]\ndefault = \"allow\"\n").expect("write outside");
    let before = status(&d)["kernel_counters"]["self_protect_denials"].as_u64().unwrap_or(0);

    let attempts: Vec<(&str, Vec<String>)> = vec![
        ("append to the event log", vec!["append".into(), s(&d.events_log), "{\"forged\":1}\n".into()]),
        ("truncate the event log", vec!["truncate".into(), s(&d.events_log)]),
        ("rewrite the configuration", vec!["write".into(), s(&d.config), "policy_dir = \"/tmp\"\n".into()]),
        ("rewrite a policy", vec!["write".into(), s(&policy_file), "[agent]\nname = \"guarded\"\n".into()]),
        ("remove a policy", vec!["unlink".into(), s(&policy_file)]),
        ("rename a policy", vec!["rename".into(), s(&policy_file), s(&d.dir.join("moved.toml"))]),
        ("link a policy out", vec!["link".into(), s(&policy_file), s(&outside.join("second-name"))]),
        ("create a policy", vec!["create".into(), s(&d.dir.join("policies").join("new.toml"))]),
        ("move a policy in", vec!["rename".into(), s(&planted), s(&d.dir.join("policies").join("evil.toml"))]),
        ("symlink a policy in", vec!["symlink".into(), s(&planted), s(&d.dir.join("policies").join("link.toml"))]),
        ("mkdir among the policies", vec!["mkdir".into(), s(&d.dir.join("policies").join("sub"))]),
        ("remove the chain head", vec!["unlink".into(), s(&chain_head)]),
        ("remove a pin", vec!["unlink".into(), s(&pin)]),
        ("leave its cgroup", vec!["write".into(), s(&agentguard::mounts::cgroup2_root().expect("cgroup2").join("cgroup.procs")), "0".into()]),
        ("thaw its cgroup", vec!["write".into(), s(&cgroup.join("cgroup.freeze")), "0".into()]),
        ("make a sub-cgroup", vec!["mkdir".into(), s(&cgroup.join("elsewhere"))]),
        ("rename a directory above a guarded one", vec!["rename".into(), s(&outside.join("var")), s(&outside.join("var-moved"))]),
        ("write into the incident directory", vec!["create".into(), s(&incidents.join("forged.json"))]),
    ];
    for (what, args) in &attempts {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_eq!(as_agent(&d, &cgroup, &args), "EPERM", "an agent tried to {what}");
    }
    // Nothing changed.
    assert_eq!(std::fs::read(&policy_file).expect("the policy is still there"), policy_text);
    assert_eq!(std::fs::read(&d.config).expect("the configuration is still there"), config_text);
    assert!(chain_head.exists() && pin.exists(), "the chain head and the pin are still there");
    for name in ["new.toml", "evil.toml", "link.toml", "sub"] {
        assert!(std::fs::symlink_metadata(d.dir.join("policies").join(name)).is_err(), "{name} was planted among the policies");
    }
    assert!(!outside.join("second-name").exists() && !d.dir.join("moved.toml").exists());
    assert!(!cgroup.join("elsewhere").exists());
    assert!(incidents.is_dir() && !incidents.join("forged.json").exists(), "the incident directory stayed where it was, untouched");
    // (The attempt's argv is in the log, inside its exec event.)
    assert!(!std::fs::read_to_string(&d.events_log).expect("log").lines().any(|l| l.starts_with("{\"forged\"")), "the event log took a forged line");
    assert!(status(&d)["session_list"].as_array().is_some_and(|l| l.iter().any(|x| x["agent"] == "guarded")));
    let after = status(&d)["kernel_counters"]["self_protect_denials"].as_u64().expect("self_protect_denials in status");
    assert!(after >= before + attempts.len() as u64, "every refusal is counted: {before} -> {after}");
    // ... and recorded, with what was tried on which path.
    for (action, path) in [
        ("write", s(&d.config)),
        ("create", s(&d.dir.join("policies").join("new.toml"))),
        ("unlink", s(&chain_head)),
        ("truncate", s(&d.events_log)),
    ] {
        let ev = d.wait_event(Duration::from_secs(30), action, |e| e["kind"] == "file" && e["action"] == action && e["path"] == path.as_str());
        assert_eq!((ev["decision"].as_str(), ev["rule"].as_str()), (Some("deny"), Some("agentguard-self-protection")), "{ev}");
    }
    // The agent can still write its own files, also beside AgentGuard's
    // directories; an untagged process can write AgentGuard's.
    assert_eq!(as_agent(&d, &cgroup, &["create", &s(&outside.join("mine"))]), "ok", "an agent's own file");
    assert_eq!(as_agent(&d, &cgroup, &["rename", &s(&beside), &s(&outside.join("var").join("beside-2"))]), "ok", "a file beside a guarded directory");
    let untagged = |args: &[&str]| {
        let out = Command::new(testbin()).args(args).output().expect("run");
        fact(&out.stdout, "errno").or_else(|| fact(&out.stdout, "result")).unwrap_or_default()
    };
    let by_root = d.dir.join("policies").join("by-root.txt");
    assert_eq!(untagged(&["create", &s(&by_root)]), "ok", "root, untagged, manages AgentGuard's files");
    std::fs::remove_file(&by_root).expect("remove");
    agent.finish();
}
