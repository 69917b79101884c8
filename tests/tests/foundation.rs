//! Foundation: the real object loads into this kernel, its programs attach,
//! and events produced by real syscalls arrive through the ring buffer.
use std::{process::Command, time::Duration};

use agentguard::decode::{c_str, KernelEvent};
use agentguard_common::{maps, AgentConfig, Decision, EventKind, Tag};
use agentguard_tests::{
    guard::{CgroupGuard, TempDir},
    kernel::{spawn_in_cgroup, wait_for_event, Loaded},
    require,
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
            AgentConfig { net_default: net as u32, file_default: file as u32, flags: 0, _pad: 0 },
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
    let script = format!("exec 3<>/dev/tcp/127.0.0.1/{port}");

    let tagged = spawn_in_cgroup(Command::new("/bin/bash").args(["-c", &script]), &cgroup)
        .wait_with_output()
        .expect("wait");
    assert!(!tagged.status.success(), "tagged connect must fail");

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

    let untagged = Command::new("/bin/bash").args(["-c", &script]).status().expect("run");
    assert!(untagged.success(), "an untagged process must be unaffected");
}

#[test]
fn lsm_vetoes_unlink_for_tagged_process_only() {
    let mut loaded = Loaded::attach_all();
    require!(
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

    let out = spawn_in_cgroup(Command::new("/bin/rm").arg(&victim), &cgroup)
        .wait_with_output()
        .expect("wait");
    assert!(!out.status.success(), "tagged rm must fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Operation not permitted"), "rm said: {stderr}");
    assert!(victim.exists(), "the file must still be on disk");

    let seen = wait_for_event(&mut ring, Duration::from_secs(5), |ev| {
        matches!(ev, KernelEvent::File(_))
    });
    let KernelEvent::File(file) = seen.last().copied().expect("event") else { unreachable!() };
    assert_eq!(file.decision, Decision::Deny as u32);
    assert_eq!(c_str(&file.dir), dir.path.to_string_lossy());

    let untagged = Command::new("/bin/rm").arg(&victim).status().expect("rm");
    assert!(untagged.success() && !victim.exists(), "an untagged rm must succeed");
}
