//! Foundation: the real object loads into this kernel, its programs attach,
//! and events produced by real syscalls arrive through the ring buffer.
use std::{process::Command, time::Duration};

use agentguard::decode::{c_str, KernelEvent};
use agentguard_common::{maps, AgentConfig, Decision, EventKind, Tag};
use agentguard_tests::{
    guard::{CgroupGuard, TempDir},
    kernel::{spawn_in_cgroup, wait_for_event, Loaded},
    require_lsm,
};
use aya::maps::HashMap;

const AGENT: u32 = 7;
const SESSION: u32 = 70;

fn configure_agent(loaded: &mut Loaded, net: Decision, file: Decision) {
    let mut agents: HashMap<_, u32, AgentConfig> =
        HashMap::try_from(loaded.map_mut(maps::AGENTS)).expect("AG_AGENTS is a hash map");
    agents
        .insert(
            AGENT,
            AgentConfig { net_default: net as u32, file_default: file as u32, ..AgentConfig::default() },
            0,
        )
        .expect("insert agent config");
}

fn tag_cgroup(loaded: &mut Loaded, cgroup: &CgroupGuard) {
    let mut sel: HashMap<_, u64, Tag> =
        HashMap::try_from(loaded.map_mut(maps::SEL_CGROUP)).expect("AG_SEL_CGROUP is a hash map");
    sel.insert(cgroup.id(), Tag { agent_id: AGENT, session_id: SESSION }, 0)
        .expect("insert cgroup selector");
}

#[test]
fn object_loads_and_required_probes_attach() {
    let loaded = Loaded::attach_all();
    for p in &loaded.probes {
        eprintln!("probe {} ({:?}): {:?}", p.program, p.class, p.state);
    }
    // Every required probe attached, or attach_all would have panicked; check
    // the table reported each one.
    assert_eq!(loaded.probes.len(), agentguard::loader::PROBES.len());
}

#[test]
fn exec_in_tagged_cgroup_arrives_as_decoded_event() {
    let mut loaded = Loaded::attach_all();
    let mut ring = loaded.events();
    configure_agent(&mut loaded, Decision::Allow, Decision::Allow);
    let cgroup = CgroupGuard::new("exec");
    tag_cgroup(&mut loaded, &cgroup);

    let mut child = spawn_in_cgroup(Command::new("/bin/true").arg("x"), &cgroup);
    let pid = child.id();
    let status = child.wait().expect("wait");
    assert!(status.success());

    let seen = wait_for_event(&mut ring, Duration::from_secs(5), |ev| {
        matches!(ev, KernelEvent::Exec(e) if e.header.pid == pid)
    });
    let KernelEvent::Exec(exec) = seen.last().copied().expect("an event") else {
        unreachable!()
    };
    assert_eq!(exec.header.kind, EventKind::Exec as u32);
    assert_eq!(exec.header.agent_id, AGENT);
    assert_eq!(exec.header.session_id, SESSION);
    assert_eq!(exec.header.tid, pid);
    assert_eq!(exec.header.uid, nix::unistd::getuid().as_raw());
    assert_eq!(exec.newly_tagged, 1, "the cgroup selector should have tagged it at exec");
    assert_eq!(c_str(&exec.filename), "/bin/true");
    assert_eq!(c_str(&exec.comm), "true");
    assert!(exec.header.ktime_ns > 0);

    // Its exit arrives too, and the tag is gone afterwards.
    wait_for_event(&mut ring, Duration::from_secs(5), |ev| {
        matches!(ev, KernelEvent::Exit(e) if e.header.pid == pid)
    });
    let tags: HashMap<_, u32, Tag> =
        HashMap::try_from(loaded.map_mut(maps::TAGS)).expect("AG_TAGS is a hash map");
    assert!(tags.get(&pid, 0).is_err(), "tag of exited pid {pid} was not dropped");
}

#[test]
fn connect_by_tagged_process_is_denied_and_reported_untagged_allowed() {
    let mut loaded = Loaded::attach_all();
    let mut ring = loaded.events();
    configure_agent(&mut loaded, Decision::Deny, Decision::Allow);
    let cgroup = CgroupGuard::new("connect");
    tag_cgroup(&mut loaded, &cgroup);

    // A listener on loopback that both clients try to reach.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let testbin = agentguard_tests::daemon::testbin();
    let target = format!("127.0.0.1:{port}");
    let connect = || {
        let mut c = Command::new(&testbin);
        c.args(["connect", "tcp", &target]);
        c
    };

    let tagged = spawn_in_cgroup(connect().stdout(std::process::Stdio::piped()), &cgroup)
        .wait_with_output()
        .expect("wait");
    assert!(!tagged.status.success(), "tagged connect must fail");
    assert!(String::from_utf8_lossy(&tagged.stdout).contains("errno=EPERM"), "the caller sees EPERM");

    let seen = wait_for_event(&mut ring, Duration::from_secs(5), |ev| {
        matches!(ev, KernelEvent::Net(n) if n.port == port)
    });
    let KernelEvent::Net(net) = seen.last().copied().expect("event") else { unreachable!() };
    assert_eq!(net.decision, Decision::Deny as u32);
    assert_eq!(net.family, libc::AF_INET as u16);
    assert_eq!(net.protocol, libc::IPPROTO_TCP as u32);
    assert_eq!(&net.addr[..4], &[127, 0, 0, 1]);
    assert_eq!(net.header.agent_id, AGENT);

    // The kernel refused before the connection existed: nothing to accept.
    listener.set_nonblocking(true).expect("nonblocking");
    assert!(listener.accept().is_err(), "a denied connect must not reach the listener");

    let untagged = connect().output().expect("run");
    assert!(untagged.status.success(), "an untagged process must be unaffected: {untagged:?}");
}

#[test]
fn lsm_vetoes_unlink_for_tagged_process_only() {
    let mut loaded = Loaded::attach_all();
    require_lsm!(
        loaded.file_veto(),
        "BPF-LSM cannot load on this kernel ({}); the VM harness runs this test",
        loaded.unavailable_reason(agentguard::loader::ActionClass::File)
    );
    let mut ring = loaded.events();
    configure_agent(&mut loaded, Decision::Allow, Decision::Deny);
    let cgroup = CgroupGuard::new("unlink");
    tag_cgroup(&mut loaded, &cgroup);
    let dir = TempDir::new("unlink");
    let victim = dir.join("victim");
    std::fs::write(&victim, b"keep me").expect("write");

    let testbin = agentguard_tests::daemon::testbin();
    let out = spawn_in_cgroup(
        Command::new(&testbin).arg("unlink").arg(&victim).stdout(std::process::Stdio::piped()),
        &cgroup,
    )
    .wait_with_output()
    .expect("wait");
    assert!(!out.status.success(), "tagged unlink must fail");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("errno=EPERM"), "the agent sees EPERM: {said}");
    assert!(victim.exists(), "the file must still be on disk");

    let seen = wait_for_event(&mut ring, Duration::from_secs(5), |ev| {
        matches!(ev, KernelEvent::File(_))
    });
    let KernelEvent::File(file) = seen.last().copied().expect("event") else { unreachable!() };
    assert_eq!(file.decision, Decision::Deny as u32);
    assert_eq!(c_str(&file.dir), dir.path.to_string_lossy());

    let untagged = Command::new(&testbin).arg("unlink").arg(&victim).output().expect("unlink");
    assert!(untagged.status.success() && !victim.exists(), "an untagged unlink must succeed: {untagged:?}");
}

#[test]
fn first_agent_is_held_at_exec_until_network_hooks_are_attached() {
    // No agent live: the network hooks are detached (B0: nothing paid).
    let mut loaded = Loaded::attach_always();
    let mut ring = loaded.events();
    configure_agent(&mut loaded, Decision::Deny, Decision::Allow);
    let cgroup = CgroupGuard::new("held");
    tag_cgroup(&mut loaded, &cgroup);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();

    let testbin = agentguard_tests::daemon::testbin();
    let child = spawn_in_cgroup(
        Command::new(&testbin)
            .args(["connect", "tcp", &format!("127.0.0.1:{port}")])
            .stdout(std::process::Stdio::piped()),
        &cgroup,
    );
    let pid = child.id();
    let seen = wait_for_event(&mut ring, Duration::from_secs(5), |ev| {
        matches!(ev, KernelEvent::Exec(e) if e.header.pid == pid)
    });
    let KernelEvent::Exec(exec) = seen.last().copied().expect("event") else { unreachable!() };
    assert_eq!(exec.newly_tagged, agentguard_common::EXEC_TAGGED_AND_HELD);
    // Stopped at its first instruction: state T, and it has not connected.
    std::thread::sleep(Duration::from_millis(200));
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let state = stat.rsplit(')').next().and_then(|r| r.split_whitespace().next()).unwrap_or("?");
    assert_eq!(state, "T", "the first agent must be stopped until the hooks are attached: {stat}");
    listener.set_nonblocking(true).expect("nonblocking");
    assert!(listener.accept().is_err(), "nothing may connect while held");

    // The daemon's part: attach, then resume. The very first connect is judged.
    let root = agentguard::mounts::cgroup2_root().expect("cgroup2");
    loaded.live.attach(&mut loaded.ebpf, &root).expect("attach network hooks");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGCONT)
        .expect("SIGCONT");
    let out = child.wait_with_output().expect("wait");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("errno=EPERM"), "the first connect must be denied: {stdout}");
    assert!(listener.accept().is_err(), "a denied connect must not reach the listener");
}
