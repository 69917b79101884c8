//! Loading the embedded eBPF object and attaching its programs, driven by one
//! probe table: adding a hook is one row in [`PROBES`].
use std::{
    fs::File,
    path::{Path, PathBuf},
};

use agentguard_common::{globals, maps, programs, HookFlag};
use aya::{
    programs::{
        cgroup_sock_addr::CgroupSockAddrLinkId, CgroupAttachMode, CgroupSockAddr, Lsm, TracePoint,
    },
    Btf, Ebpf, EbpfLoader,
};
use serde::Serialize;
use thiserror::Error;

use crate::tracefs;

/// The kernel object built from agentguard-ebpf, embedded at build time.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agentguard"));

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("cannot read tracepoint layout: {0}")]
    Tracefs(#[from] tracefs::TracefsError),
    #[error("cannot load AgentGuard's eBPF object: {0} (are you root, or do you have CAP_BPF and CAP_PERFMON?)")]
    Object(#[from] aya::EbpfError),
    #[error("the eBPF object has no program `{0}`: the binary was built from mismatched sources; rebuild with `cargo xtask build`")]
    MissingProgram(&'static str),
    #[error("required probe `{program}` failed: {reason}")]
    Required {
        program: &'static str,
        reason: String,
    },
}

/// What a probe protects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionClass {
    Tagging,
    Network,
    File,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    TracePoint {
        category: &'static str,
        name: &'static str,
    },
    /// Attached at the cgroup2 root.
    CgroupSockAddr,
    Lsm {
        hook: &'static str,
    },
}

#[derive(Debug)]
pub struct ProbeSpec {
    pub program: &'static str,
    pub kind: ProbeKind,
    pub class: ActionClass,
    /// A required probe that fails stops the daemon; an optional one degrades
    /// its action class, loudly.
    pub required: bool,
    pub lifetime: Lifetime,
}

/// When a probe is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Lifetime {
    /// From daemon start to stop.
    Always,
    /// Only while some agent is live: the hook costs processes that are not
    /// agents (cgroup_sock_addr makes the kernel lock every UDP socket on
    /// connect and unconnected send, host-wide; ../shared/TOOLCHAIN.md).
    /// Loaded and verified at start, attached by [`LiveHooks`].
    WhileAgentLive,
}

pub const PROBES: &[ProbeSpec] = &[
    ProbeSpec {
        program: programs::SCHED_PROCESS_FORK,
        kind: ProbeKind::TracePoint { category: "sched", name: "sched_process_fork" },
        class: ActionClass::Tagging,
        required: true,
        lifetime: Lifetime::Always,
    },
    ProbeSpec {
        program: programs::SCHED_PROCESS_EXEC,
        kind: ProbeKind::TracePoint { category: "sched", name: "sched_process_exec" },
        class: ActionClass::Tagging,
        required: true,
        lifetime: Lifetime::Always,
    },
    ProbeSpec {
        program: programs::SCHED_PROCESS_EXIT,
        kind: ProbeKind::TracePoint { category: "sched", name: "sched_process_exit" },
        class: ActionClass::Tagging,
        required: true,
        lifetime: Lifetime::Always,
    },
    ProbeSpec {
        program: programs::CONNECT4,
        kind: ProbeKind::CgroupSockAddr,
        class: ActionClass::Network,
        required: true,
        lifetime: Lifetime::WhileAgentLive,
    },
    ProbeSpec {
        program: programs::CONNECT6,
        kind: ProbeKind::CgroupSockAddr,
        class: ActionClass::Network,
        required: true,
        lifetime: Lifetime::WhileAgentLive,
    },
    ProbeSpec {
        program: programs::SENDMSG4,
        kind: ProbeKind::CgroupSockAddr,
        class: ActionClass::Network,
        required: true,
        lifetime: Lifetime::WhileAgentLive,
    },
    ProbeSpec {
        program: programs::SENDMSG6,
        kind: ProbeKind::CgroupSockAddr,
        class: ActionClass::Network,
        required: true,
        lifetime: Lifetime::WhileAgentLive,
    },
    ProbeSpec {
        program: programs::LSM_PATH_UNLINK,
        kind: ProbeKind::Lsm { hook: "path_unlink" },
        class: ActionClass::File,
        required: false,
        lifetime: Lifetime::Always,
    },
];

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ProbeState {
    Attached,
    /// Verified and ready; attached while an agent is live.
    Ready,
    Unavailable { reason: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct ProbeStatus {
    pub program: &'static str,
    pub class: ActionClass,
    #[serde(flatten)]
    pub state: ProbeState,
}

/// Raise RLIMIT_MEMLOCK for kernels that still charge BPF maps to it (< 5.11).
/// Failure is only a warning: newer kernels account BPF memory to the cgroup.
pub fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "cannot raise RLIMIT_MEMLOCK (not needed on kernels >= 5.11)"
        );
    }
}

/// Parse the embedded object, set the tracepoint-layout globals from this
/// kernel's tracefs, and create the maps. Programs are not loaded yet.
pub fn load_object() -> Result<Ebpf, LoadError> {
    raise_memlock();
    let fork_child = tracefs::field_offset("sched", "sched_process_fork", "child_pid")?;
    let exec_old_pid = tracefs::field_offset("sched", "sched_process_exec", "old_pid")?;
    let exec_filename = tracefs::field_offset("sched", "sched_process_exec", "filename")?;
    let ebpf = EbpfLoader::new()
        .override_global(globals::FORK_CHILD_PID_OFF, &fork_child, true)
        .override_global(globals::EXEC_OLD_PID_OFF, &exec_old_pid, true)
        .override_global(globals::EXEC_FILENAME_OFF, &exec_filename, true)
        .load(EBPF_OBJECT)?;
    Ok(ebpf)
}

/// Load one probe into the kernel (verify it) without attaching it.
pub fn load_probe(ebpf: &mut Ebpf, spec: &ProbeSpec) -> Result<(), String> {
    let program = ebpf
        .program_mut(spec.program)
        .ok_or_else(|| LoadError::MissingProgram(spec.program).to_string())?;
    match spec.kind {
        ProbeKind::CgroupSockAddr => {
            let prog: &mut CgroupSockAddr = program.try_into().map_err(|e| format!("{e}"))?;
            prog.load().map_err(|e| describe(&e))
        }
        _ => Err(format!("{}: only cgroup_sock_addr probes are attached on demand", spec.program)),
    }
}

/// Load and attach one probe. Returns a human reason on failure.
pub fn attach_probe(ebpf: &mut Ebpf, spec: &ProbeSpec, cgroup_root: &Path) -> Result<(), String> {
    let program = ebpf
        .program_mut(spec.program)
        .ok_or_else(|| LoadError::MissingProgram(spec.program).to_string())?;
    match spec.kind {
        ProbeKind::TracePoint { category, name } => {
            let tp: &mut TracePoint = program.try_into().map_err(|e| format!("{e}"))?;
            tp.load().map_err(|e| describe(&e))?;
            tp.attach(category, name).map_err(|e| describe(&e))?;
        }
        ProbeKind::CgroupSockAddr => {
            let prog: &mut CgroupSockAddr = program.try_into().map_err(|e| format!("{e}"))?;
            prog.load().map_err(|e| describe(&e))?;
            let cgroup = File::open(cgroup_root)
                .map_err(|e| format!("cannot open cgroup {}: {e}", cgroup_root.display()))?;
            // On 5.7+ aya attaches through a bpf_link, which always coexists
            // with other programs and rejects BPF_F_ALLOW_MULTI (EINVAL):
            // "Single" passes no flags.
            prog.attach(&cgroup, CgroupAttachMode::Single)
                .map_err(|e| describe(&e))?;
        }
        ProbeKind::Lsm { hook } => {
            let btf = Btf::from_sys_fs()
                .map_err(|e| format!("kernel BTF unavailable (/sys/kernel/btf/vmlinux): {e}"))?;
            let lsm: &mut Lsm = program.try_into().map_err(|e| format!("{e}"))?;
            lsm.load(hook, &btf).map_err(|e| describe(&e))?;
            lsm.attach().map_err(|e| describe(&e))?;
        }
    }
    Ok(())
}

/// An aya error with its whole source chain, on one line.
fn describe(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Attach every probe in [`PROBES`]. A required probe that fails is an error;
/// an optional one is reported as unavailable.
pub fn attach_all(ebpf: &mut Ebpf, cgroup_root: &Path) -> Result<Vec<ProbeStatus>, LoadError> {
    let mut statuses = Vec::with_capacity(PROBES.len());
    for spec in PROBES {
        let result = match spec.lifetime {
            Lifetime::Always => attach_probe(ebpf, spec, cgroup_root).map(|()| ProbeState::Attached),
            Lifetime::WhileAgentLive => load_probe(ebpf, spec).map(|()| ProbeState::Ready),
        };
        let state = match result {
            Ok(state) => state,
            Err(reason) if spec.required => {
                return Err(LoadError::Required {
                    program: spec.program,
                    reason,
                })
            }
            Err(reason) => ProbeState::Unavailable { reason },
        };
        statuses.push(ProbeStatus {
            program: spec.program,
            class: spec.class,
            state,
        });
    }
    Ok(statuses)
}

/// Whether every probe of `class` is attached or ready to be.
pub fn class_attached(statuses: &[ProbeStatus], class: ActionClass) -> bool {
    statuses
        .iter()
        .filter(|s| s.class == class)
        .all(|s| matches!(s.state, ProbeState::Attached | ProbeState::Ready))
}

/// The on-demand probes ([`Lifetime::WhileAgentLive`]) and the kernel flag
/// that tells the exec hook whether they are attached.
#[derive(Debug, Default)]
pub struct LiveHooks {
    links: Vec<(&'static str, CgroupSockAddrLinkId)>,
}

impl LiveHooks {
    pub fn attached(&self) -> bool {
        !self.links.is_empty()
    }

    /// Attach every on-demand probe at the cgroup2 root, then raise the flag.
    pub fn attach(&mut self, ebpf: &mut Ebpf, cgroup_root: &Path) -> Result<(), LoadError> {
        if self.attached() {
            return Ok(());
        }
        let cgroup = File::open(cgroup_root).map_err(|e| LoadError::Required {
            program: "network hooks",
            reason: format!("cannot open cgroup {}: {e}", cgroup_root.display()),
        })?;
        for spec in PROBES.iter().filter(|p| p.lifetime == Lifetime::WhileAgentLive) {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(spec.program)
                .ok_or(LoadError::MissingProgram(spec.program))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| LoadError::Required { program: spec.program, reason: describe(&e) })?;
            // See attach_probe: "Single" passes no flags to bpf_link_create.
            let id = prog
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(|e| LoadError::Required { program: spec.program, reason: describe(&e) })?;
            self.links.push((spec.program, id));
        }
        set_hook_flag(ebpf, HookFlag::NetAttached, 1).map_err(|reason| LoadError::Required { program: maps::HOOKS, reason })
    }

    /// Lower the flag first (a process tagged from now on stops itself at
    /// exec), then let `still_idle` confirm nothing became live meanwhile,
    /// then detach. Returns whether it detached.
    pub fn detach_if(&mut self, ebpf: &mut Ebpf, still_idle: impl FnOnce(&mut Ebpf) -> bool) -> bool {
        if !self.attached() {
            return false;
        }
        if set_hook_flag(ebpf, HookFlag::NetAttached, 0).is_err() {
            return false;
        }
        if !still_idle(ebpf) {
            let _ = set_hook_flag(ebpf, HookFlag::NetAttached, 1);
            return false;
        }
        for (program, id) in self.links.drain(..) {
            let Some(prog) = ebpf.program_mut(program) else { continue };
            let prog: Result<&mut CgroupSockAddr, _> = prog.try_into();
            if let Ok(prog) = prog {
                if let Err(e) = prog.detach(id) {
                    tracing::warn!(program, error = %describe(&e), "detach failed");
                }
            }
        }
        true
    }
}

fn set_hook_flag(ebpf: &mut Ebpf, flag: HookFlag, value: u32) -> Result<(), String> {
    let map = ebpf.map_mut(maps::HOOKS).ok_or_else(|| format!("map {} missing", maps::HOOKS))?;
    let mut arr: aya::maps::Array<&mut aya::maps::MapData, u32> =
        aya::maps::Array::try_from(map).map_err(|e| describe(&e))?;
    arr.set(flag as u32, value, 0).map_err(|e| describe(&e))
}

/// The pin directory for AgentGuard's maps and links.
pub fn default_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/agentguard")
}
