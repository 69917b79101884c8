//! Agent identity: every process of an agent is tagged in the kernel, from
//! its first instruction, through fork, threads, vfork, clone3, double fork,
//! setsid and exec; untagged processes stay untagged; running agents are
//! found at daemon start; a process that leaves its cgroup is put back.
use std::{
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use agentguard_tests::{
    daemon::{fact, testbin, Daemon},
    guard::{CgroupGuard, TempDir},
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

fn policy(name: &str, match_section: &str) -> String {
    format!("[agent]\nname = \"{name}\"\n\n[agent.match]\n{match_section}\n")
}

/// A copy of ag-testbin under another name (so comm and exe selectors can
/// match it without matching anything else).
fn testbin_as(dir: &TempDir, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::copy(testbin(), &p).unwrap_or_else(|e| panic!("copy ag-testbin to {}: {e}", p.display()));
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    p
}

fn tb() -> String {
    testbin().to_string_lossy().into_owned()
}

fn proc_of(ps: &Value, pid: u32) -> Option<&Value> {
    ps["processes"].as_array()?.iter().find(|p| p["pid"] == pid)
}

fn wait_tagged(d: &Daemon, pid: u32, agent: &str) -> Value {
    let ps = d.wait_ps(WAIT, &format!("pid {pid} tagged as {agent}"), |ps| {
        proc_of(ps, pid).is_some_and(|p| p["agent"] == agent)
    });
    proc_of(&ps, pid).cloned().expect("present in the snapshot that matched")
}

/// Read `key=value` lines from a child's stdout until `key` appears.
fn read_fact(child: &mut std::process::Child, key: &str) -> u32 {
    use std::io::Read as _;
    let out = child.stdout.as_mut().expect("piped stdout");
    // One byte at a time: a buffered reader would swallow the lines after
    // this one, which the next call needs.
    let mut line = Vec::new();
    loop {
        let mut b = [0u8; 1];
        let n = out.read(&mut b).expect("read child output");
        assert!(n > 0, "child ended before printing {key}=");
        if b[0] != b'\n' {
            line.push(b[0]);
            continue;
        }
        let text = String::from_utf8_lossy(&line).into_owned();
        line.clear();
        if let Some(v) = text.trim().strip_prefix(&format!("{key}=")) {
            return v.parse().expect("numeric fact");
        }
    }
}

#[test]
fn run_tags_the_command_in_a_fresh_session_cgroup() {
    let d = Daemon::start(&[("a.toml", &policy("tester", ""))]);
    let mut child = d
        .run_cmd("tester", &[&tb(), "sleep", "30"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn run");
    // `run` execs the command: same pid.
    let pid = read_fact(&mut child, "pid");
    assert_eq!(pid, child.id());
    let p = wait_tagged(&d, pid, "tester");
    let session = p["session"].as_u64().expect("session");
    assert!(session & (1 << 31) != 0, "a run session id has the top bit set: {session:#x}");
    let cg = p["cgroup"].as_str().expect("cgroup");
    assert!(
        cg.starts_with(&format!("/{}/tester/run-", d.subtree)),
        "process lives in {cg}, not in its session cgroup"
    );
    // The exec that tagged it is in the log, with argv and uid.
    let ev = d.wait_event(WAIT, "exec that tagged the run", |e| {
        e["kind"] == "exec" && e["pid"] == pid && e["newly_tagged"] == true
    });
    assert_eq!(ev["agent"], "tester");
    assert_eq!(ev["argv"][1], "sleep");
    assert_eq!(ev["uid"], 0);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn undeclared_name_runs_under_the_fallback_policy() {
    let fallback = "[agent]\nname = \"coding-agent\"\nfallback = true\n";
    let d = Daemon::start(&[("default.toml", fallback)]);
    let mut child = d.run_cmd("my-new-agent", &[&tb(), "sleep", "30"]).stdout(Stdio::piped()).spawn().expect("spawn");
    let pid = read_fact(&mut child, "pid");
    let p = wait_tagged(&d, pid, "coding-agent");
    assert!(
        p["cgroup"].as_str().unwrap_or("").contains("/my-new-agent/"),
        "the session cgroup carries the name the user gave: {p}"
    );
    let _ = child.kill();
    let _ = child.wait();

    // Without a fallback, an unknown name is refused, not run unguarded.
    let d2 = Daemon::start(&[("a.toml", &policy("only-this", ""))]);
    let out = d2.run_cmd("unknown", &[&tb(), "sleep", "0"]).output().expect("run");
    assert!(!out.status.success(), "unknown agent without fallback must not run");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no policy declares agent"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn tag_follows_double_fork_setsid_threads_vfork_clone3_and_exec() {
    let d = Daemon::start(&[("a.toml", &policy("tester", ""))]);
    let tb = tb();

    // Double fork + setsid: the grandchild is reparented and in a new session.
    let out = d.run_cmd("tester", &[&tb, "daemonize", &tb, "sleep", "30"]).output().expect("run");
    let grandchild: u32 = fact(&out.stdout, "grandchild").expect("grandchild pid").parse().expect("pid");
    let p = wait_tagged(&d, grandchild, "tester");
    assert_ne!(p["ppid"], fact(&out.stdout, "pid").expect("pid").parse::<u32>().expect("n"), "grandchild was reparented");

    // Threads: every thread carries the tag.
    let mut threads = d.run_cmd("tester", &[&tb, "threads", "3", "30"]).stdout(Stdio::piped()).spawn().expect("spawn");
    let pid = read_fact(&mut threads, "pid");
    d.wait_ps(WAIT, "4 tagged threads", |ps| proc_of(ps, pid).is_some_and(|p| p["threads_tagged"] == 4));

    // vfork (posix_spawn's CLONE_VM|CLONE_VFORK) and clone3 children.
    for how in ["vfork", "clone3"] {
        let mut c = d.run_cmd("tester", &[&tb, how, &tb, "sleep", "30"]).stdout(Stdio::piped()).spawn().expect("spawn");
        let child = read_fact(&mut c, "child");
        wait_tagged(&d, child, "tester");
        let _ = c.kill();
    }

    // An exec chain through a shell keeps the tag.
    let mut c = d
        .run_cmd("tester", &["/bin/sh", "-c", &format!("{tb} exec /bin/sh -c 'exec {tb} sleep 30'")])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = read_fact(&mut c, "pid");
    // The first program of the chain prints the pid and goes on exec'ing:
    // wait for the last one (`ag-testbin sleep 30`) to show, tagged. The
    // process is tagged from its start (a run session), so a snapshot
    // taken mid-chain shows an earlier program.
    let last = |p: &Value| p["argv"].as_array().is_some_and(|a| a.len() == 3 && a[1] == "sleep");
    d.wait_ps(WAIT, &format!("pid {pid}'s exec chain ended in `sleep`, tagged as tester"), |ps| {
        proc_of(ps, pid).is_some_and(|p| last(p) && p["agent"] == "tester")
    });
    let _ = c.kill();
    let _ = threads.kill();
    let _ = threads.wait();
}

#[test]
fn each_selector_kind_tags_at_exec_and_siblings_stay_untagged() {
    let bins = TempDir::new("selectors");
    let by_comm = testbin_as(&bins, "agt-comm-sel");
    let by_exe = testbin_as(&bins, "agt-exe-sel-bin");
    let cg = CgroupGuard::new("sel");
    let cg_rel = format!("/{}", cg.path.file_name().expect("name").to_string_lossy());
    let policies = [
        ("comm.toml", policy("by-comm", "comm = [\"agt-comm-sel\"]")),
        ("exe.toml", policy("by-exe", &format!("exe = [{:?}]", by_exe))),
        ("uid.toml", policy("by-uid", "uid = [54321]")),
        ("cg.toml", policy("by-cgroup", &format!("cgroup = [{cg_rel:?}]"))),
    ];
    let refs: Vec<(&str, &str)> = policies.iter().map(|(a, b)| (*a, b.as_str())).collect();
    let d = Daemon::start(&refs);

    let spawn = |cmd: &mut Command| -> (std::process::Child, u32) {
        let mut c = cmd.stdout(Stdio::piped()).spawn().expect("spawn");
        let pid = read_fact(&mut c, "pid");
        (c, pid)
    };
    let (mut a, pa) = spawn(Command::new(&by_comm).args(["sleep", "30"]));
    let (mut b, pb) = spawn(Command::new(&by_exe).args(["sleep", "30"]));
    let mut as_uid = Command::new(testbin());
    as_uid.args(["sleep", "30"]).uid(54321).gid(54321);
    let (mut c, pc) = spawn(&mut as_uid);
    let (mut e, pe) = {
        let mut cmd = Command::new(testbin());
        cmd.args(["sleep", "30"]);
        let mut child = agentguard_tests::kernel::spawn_in_cgroup(cmd.stdout(Stdio::piped()), &cg);
        let pid = read_fact(&mut child, "pid");
        (child, pid)
    };
    let (mut sibling, ps_) = spawn(Command::new(testbin()).args(["sleep", "30"]));

    for (pid, agent) in [(pa, "by-comm"), (pb, "by-exe"), (pc, "by-uid"), (pe, "by-cgroup")] {
        let p = wait_tagged(&d, pid, agent);
        assert_eq!(p["session"], pid, "a matched process roots its own session");
    }
    // Matched processes are moved into AgentGuard's subtree.
    d.wait_ps(WAIT, "matched processes contained", |ps| {
        [pa, pb, pc, pe].iter().all(|pid| {
            proc_of(ps, *pid).and_then(|p| p["cgroup"].as_str()).is_some_and(|cg| cg.starts_with(&format!("/{}/", d.subtree)))
        })
    });
    assert!(proc_of(&d.ps(), ps_).is_none(), "an unmatched sibling must stay untagged");
    for ch in [&mut a, &mut b, &mut c, &mut e, &mut sibling] {
        let _ = ch.kill();
        let _ = ch.wait();
    }
}

#[test]
fn agents_running_before_the_daemon_are_tagged_with_their_descendants() {
    let bins = TempDir::new("preexisting");
    let agent = testbin_as(&bins, "agt-pre-sel");
    // The agent and a child it spawned, both alive before the daemon starts,
    // and still alive however long the daemon takes to verify its programs
    // (over 30 s on a slow TCG VM): the test kills both when it is done.
    let mut parent = Command::new(&agent)
        .args(["vfork", &tb(), "sleep", "600"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn agent");
    let ppid = read_fact(&mut parent, "pid");
    let child = read_fact(&mut parent, "child");
    let d = Daemon::start(&[("a.toml", &policy("pre", "comm = [\"agt-pre-sel\"]"))]);
    wait_tagged(&d, ppid, "pre");
    let c = wait_tagged(&d, child, "pre");
    assert_eq!(c["session"], ppid, "the descendant joins its ancestor's session");
    d.wait_event(WAIT, "tag event for the adopted agent", |e| e["kind"] == "tag" && e["pid"] == ppid);
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child as i32), nix::sys::signal::Signal::SIGKILL);
    let _ = parent.kill();
    let _ = parent.wait();
}

/// An agent the daemon found running (tagged by the daemon, not by the
/// kernel at exec) is judged like any other: its tag-hint bit was set before
/// its tag was written, so the hooks do not take it for untagged.
#[test]
fn an_agent_adopted_at_start_is_judged_in_the_kernel() {
    let bins = TempDir::new("adopted");
    let agent = testbin_as(&bins, "agt-adopted");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let gate = bins.join("go");
    // Connects once before the daemon exists, then again once the gate opens.
    let mut a = Command::new(&agent)
        .args(["connect-twice", "udp", &format!("127.0.0.1:{port}"), gate.to_str().expect("utf-8")])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn agent");
    let pid = read_fact(&mut a, "pid");
    let policy = format!("{}[network]\ndefault = \"allow\"\n[[network.rule]]\nid = \"closed\"\ndecision = \"deny\"\nports = [{port}]\n", policy("adopted", "comm = [\"agt-adopted\"]"));
    let d = Daemon::start(&[("a.toml", &policy)]);
    wait_tagged(&d, pid, "adopted");
    std::fs::write(&gate, "").expect("open the gate");
    let out = a.wait_with_output().expect("wait");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("try1=ok"), "before the daemon: {text}");
    assert!(text.contains("try2=EPERM"), "an adopted agent's connect must be judged by its policy: {text}");
    d.wait_event(WAIT, "the adopted agent's denial", |e| e["kind"] == "net" && e["pid"] == pid && e["decision"] == "deny");
}

/// Where BPF-LSM self-protection loads (the VMs) the agent's own move is
/// refused and recorded, and a move by someone else (an untagged root
/// process, as a container runtime might) is undone and recorded; elsewhere
/// (this host) the agent's own move happens and is undone and recorded. Both
/// kernels see the cgroup_attach_task probe report the move.
#[test]
fn a_process_that_leaves_its_cgroup_is_moved_back_and_recorded() {
    let d = Daemon::start(&[("a.toml", &policy("tester", ""))]);
    let root = agentguard::mounts::cgroup2_root().expect("cgroup2");
    // The agent moves itself to the root cgroup; what its shell saw goes to a
    // file so a failure says whether the move itself worked.
    let trace = TempDir::new("escape");
    let trace_file = trace.join("trace");
    let escape = format!(
        "{{ echo $$ > {root}/cgroup.procs && echo moved || echo move-failed; cat /proc/self/cgroup; }} > {trace} 2>&1; exec {tb} sleep 30",
        root = root.display(),
        trace = trace_file.display(),
        tb = tb()
    );
    let mut c = d.run_cmd("tester", &["/bin/sh", "-c", &escape]).stdout(Stdio::piped()).spawn().expect("spawn");
    let pid = read_fact(&mut c, "pid");
    let said = std::fs::read_to_string(&trace_file).unwrap_or_default();
    if d.attached("protect_file_open") {
        // BPF-LSM self-protection: the move is refused, the process never
        // left, and the attempt is an event.
        assert!(said.lines().any(|l| l == "move-failed"), "a tagged process wrote the root cgroup.procs: {said}");
        assert!(said.contains(&format!("0::/{}/tester/", d.subtree)), "still in its session cgroup: {said}");
        let ev = d.wait_event(WAIT, "the refused move", |e| e["kind"] == "file" && e["pid"] == pid && e["action"] == "write");
        assert_eq!(ev["decision"], "deny", "{ev}");
        assert_eq!(ev["rule"], "agentguard-self-protection", "{ev}");
        assert_eq!(ev["path"], format!("{}/cgroup.procs", root.display()), "{ev}");
        // This test is no agent: its write is allowed, and it is an escape.
        std::fs::write(root.join("cgroup.procs"), pid.to_string()).expect("an untagged root process moves the agent");
    } else {
        assert!(said.starts_with("moved"), "the agent's own move did not happen: {said}");
    }
    let ev = d.wait_event(WAIT, "cgroup_escape", |e| e["kind"] == "cgroup_escape" && e["pid"] == pid);
    assert_eq!(ev["agent"], "tester");
    // The kernel reports the move as it happens (cgroup_attach_task; every
    // kernel we test has the tracepoint). Whatever reaches the daemon first
    // names the line: the report, the periodic reconciliation, or the
    // handling of the shell's exec (it was tagged at exec; the move can come
    // before the daemon reads that event). The report itself must arrive;
    // `detected` is one of the three (the schema's enum).
    assert!(d.attached("cgroup_attach_task"), "the cgroup move probe is attached: {}", d.status()["probes"]);
    let errors = agentguard::schema::Schema::events().expect("schema").validate(&ev);
    assert!(errors.is_empty(), "the line breaks docs/events.schema.json: {errors:?}\n{ev}");
    // The report may be read in the daemon's next batch: wait for it.
    let deadline = std::time::Instant::now() + WAIT;
    let reported = loop {
        let n = d.status()["cgroup_moves_reported"].as_u64().unwrap_or(0);
        if n >= 1 || std::time::Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(reported >= 1, "the kernel reported the tagged process's move: {reported}");
    d.wait_ps(WAIT, "escaped process back in its session cgroup", |ps| {
        proc_of(ps, pid)
            .and_then(|p| p["cgroup"].as_str())
            .is_some_and(|cg| cg.starts_with(&format!("/{}/tester/", d.subtree)))
    });
    let _ = c.kill();
    let _ = c.wait();
}

#[test]
fn exit_events_carry_the_status_or_the_signal() {
    let d = Daemon::start(&[("a.toml", &policy("tester", ""))]);
    for (script, code, signal) in [("exit 7", Some(7), None), ("kill -KILL $$", None, Some(9))] {
        let out = d.run_cmd("tester", &["/bin/sh", "-c", &format!("echo pid=$$; {script}")]).stdout(Stdio::piped()).output().expect("run");
        let pid: u32 = fact(&out.stdout, "pid").expect("pid").parse().expect("n");
        let exit = d.wait_event(WAIT, "exit of the tagged shell", |e| e["kind"] == "exit" && e["pid"] == pid);
        assert_eq!((exit["exit_code"].as_u64(), exit["signal"].as_u64()), (code, signal), "{script}: {exit}");
    }
}

/// Make the next fork get `pid` (root in the initial pid namespace only).
fn set_last_pid(pid: u32) -> bool {
    std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).is_ok()
}

#[test]
fn a_reused_pid_does_not_inherit_a_stale_tag() {
    let d = Daemon::start(&[("a.toml", &policy("tester", ""))]);
    let out = d.run_cmd("tester", &[&tb(), "sleep", "0"]).output().expect("run");
    assert!(out.status.success());
    let pid: u32 = fact(&out.stdout, "pid").expect("pid").parse().expect("n");
    let exit = d.wait_event(WAIT, "exit of the tagged process", |e| e["kind"] == "exit" && e["pid"] == pid);
    assert_eq!((exit["exit_code"].as_u64(), exit["signal"].as_u64()), (Some(0), None), "{exit}");
    agentguard_tests::require!(
        Path::new("/proc/sys/kernel/ns_last_pid").exists(),
        "no /proc/sys/kernel/ns_last_pid: cannot force pid reuse"
    );
    // Try a few times: another process on the host may take the pid first.
    for _ in 0..20 {
        if !set_last_pid(pid) {
            break;
        }
        let mut c = Command::new(testbin()).args(["sleep", "3"]).stdout(Stdio::piped()).spawn().expect("spawn");
        if c.id() == pid {
            std::thread::sleep(Duration::from_millis(300));
            assert!(proc_of(&d.ps(), pid).is_none(), "pid {pid} was reused by an untagged process and came up tagged");
            let _ = c.kill();
            let _ = c.wait();
            return;
        }
        let _ = c.kill();
        let _ = c.wait();
    }
    agentguard_tests::skip(&format!("could not get pid {pid} reassigned (busy host)"));
}
