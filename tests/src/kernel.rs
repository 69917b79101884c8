//! Loading the real programs for a test, and asking the kernel what it can do.
use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use agentguard::{
    decode::{decode, KernelEvent},
    loader::{self, ActionClass, ProbeState, ProbeStatus},
};
use aya::{maps::RingBuf, Ebpf};

/// The real object, loaded and attached to this kernel; detached on drop.
pub struct Loaded {
    pub ebpf: Ebpf,
    pub probes: Vec<ProbeStatus>,
    pub live: loader::LiveHooks,
}

impl Loaded {
    /// Load and attach every probe, the on-demand network hooks included (as
    /// the daemon does while an agent is live); panics (with the kernel's
    /// reason) when a required one fails.
    pub fn attach_all() -> Self {
        let mut l = Self::attach_always();
        let root = agentguard::mounts::cgroup2_root().expect("no cgroup2 mount");
        l.live.attach(&mut l.ebpf, &root).unwrap_or_else(|e| panic!("attach network hooks: {e}"));
        l
    }

    /// Like [`Self::attach_all`] but leaves the on-demand hooks detached, as
    /// the daemon does while no agent is live.
    pub fn attach_always() -> Self {
        assert_root();
        let mut ebpf = loader::load_object().unwrap_or_else(|e| panic!("load: {e}"));
        let root = agentguard::mounts::cgroup2_root().expect("no cgroup2 mount");
        let probes = loader::attach_all(&mut ebpf, &root).unwrap_or_else(|e| panic!("attach: {e}"));
        Self { ebpf, probes, live: loader::LiveHooks::default() }
    }

    pub fn file_veto(&self) -> bool {
        loader::class_attached(&self.probes, ActionClass::File)
    }

    pub fn unavailable_reason(&self, class: ActionClass) -> String {
        self.probes
            .iter()
            .filter(|p| p.class == class)
            .find_map(|p| match &p.state {
                ProbeState::Unavailable { reason } => Some(format!("{}: {reason}", p.program)),
                ProbeState::Attached | ProbeState::Ready | ProbeState::Skipped { .. } => None,
            })
            .unwrap_or_default()
    }

    pub fn map_mut(&mut self, name: &str) -> &mut aya::maps::Map {
        self.ebpf
            .map_mut(name)
            .unwrap_or_else(|| panic!("the eBPF object has no map {name}"))
    }

    /// Take the events ring buffer (once).
    pub fn events(&mut self) -> RingBuf<aya::maps::MapData> {
        let map = self
            .ebpf
            .take_map(agentguard_common::maps::EVENTS)
            .expect("events ring buffer already taken or missing");
        RingBuf::try_from(map).expect("AG_EVENTS is a ring buffer")
    }
}

/// Drain events until `pred` matches one or `timeout` passes; returns every
/// event seen (the matching one last) or panics with what was seen.
pub fn wait_for_event(
    ring: &mut RingBuf<aya::maps::MapData>,
    timeout: Duration,
    mut pred: impl FnMut(&KernelEvent) -> bool,
) -> Vec<KernelEvent> {
    let start = Instant::now();
    let mut seen = Vec::new();
    while start.elapsed() < timeout {
        while let Some(item) = ring.next() {
            let ev = decode(&item).unwrap_or_else(|e| panic!("undecodable record: {e}"));
            let hit = pred(&ev);
            seen.push(ev);
            if hit {
                return seen;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("no matching event within {timeout:?}; saw {} events: {seen:#?}", seen.len());
}

pub fn assert_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "integration tests load eBPF programs and must run as root (cargo xtask test does)"
    );
}

/// Spawn `cmd` inside `cgroup` (it joins before exec, so exec is its first
/// action there).
pub fn spawn_in_cgroup(cmd: &mut Command, cgroup: &crate::guard::CgroupGuard) -> Child {
    use std::os::unix::process::CommandExt as _;
    let procs = std::ffi::CString::new(cgroup.procs_file().into_os_string().into_encoded_bytes())
        .expect("cgroup path has no NUL");
    // SAFETY: the closure makes only async-signal-safe calls (open, write,
    // close) on memory prepared before fork: the test process has threads.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if ok { Ok(()) } else { Err(err) }
        });
    }
    cmd.stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"))
}
