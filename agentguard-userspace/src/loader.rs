//! Loading the embedded eBPF object and attaching its programs, driven by one
//! probe table: adding a hook is one row in [`PROBES`].
use std::{
    fs::File,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use agentguard_common::{globals, maps, programs, HookFlag, KernelOffsets};
use aya::{
    programs::{
        cgroup_sock_addr::CgroupSockAddrLinkId, fexit::FExitLinkId, links::{FdLink, PinnedLink}, lsm::LsmLinkId,
        trace_point::TracePointLinkId, CgroupAttachMode, CgroupSockAddr, FExit, Lsm, TracePoint,
    },
    Btf, Ebpf, EbpfLoader,
};
use serde::Serialize;
use thiserror::Error;

use crate::{pins::{self, Pins}, tracefs};

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
    /// Agents may not signal, ptrace or bpf() their way around AgentGuard.
    SelfProtection,
    /// The kernel's directory cache for file decisions (dircache.rs): the
    /// programs that see renames and mount changes. Without them the cache
    /// is off and every file action takes the long way.
    FileCache,
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
        /// The hook's parameters (the program reads its verdict argument
        /// right after them); checked against this kernel's BTF.
        args: usize,
    },
    /// After a kernel function returns (BTF, trampoline).
    FExit { function: &'static str },
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
    /// An observation fallback for its class: loaded only when the class's
    /// primary (`Always`) probes cannot load, then attached by [`LiveHooks`]
    /// like `WhileAgentLive` (syscall tracepoints tax every syscall of every
    /// process, ../shared/TOOLCHAIN.md).
    FallbackWhileAgentLive,
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
    // Optional: without it, reconciliation finds an agent's cgroup moves
    // within its period instead of at once.
    ProbeSpec {
        program: programs::CGROUP_ATTACH_TASK,
        kind: ProbeKind::TracePoint { category: "cgroup", name: "cgroup_attach_task" },
        class: ActionClass::Tagging,
        required: false,
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
    lsm(programs::LSM_PATH_UNLINK, "path_unlink", 2),
    lsm(programs::LSM_PATH_RMDIR, "path_rmdir", 2),
    lsm(programs::LSM_PATH_RENAME, "path_rename", 5),
    lsm(programs::LSM_PATH_TRUNCATE, "path_truncate", 1),
    // 6.2+ only: ftruncate and O_TRUNC opens (6.1 sends them to path_truncate).
    lsm(programs::LSM_FILE_TRUNCATE, "file_truncate", 1),
    lsm(programs::LSM_PATH_LINK, "path_link", 3),
    cache(programs::DIRCACHE_RENAME, "vfs_rename"),
    cache(programs::DIRCACHE_MOUNT, "__x64_sys_mount"),
    cache(programs::DIRCACHE_UMOUNT, "__x64_sys_umount"),
    cache(programs::DIRCACHE_MOVE_MOUNT, "__x64_sys_move_mount"),
    cache(programs::DIRCACHE_PIVOT_ROOT, "__x64_sys_pivot_root"),
    cache(programs::DIRCACHE_NEW_NS, "copy_mnt_ns"),
    protect(programs::PROTECT_TASK_KILL, "task_kill", 4),
    protect(programs::PROTECT_PTRACE, "ptrace_access_check", 2),
    // The bpf hook has 3 or 4 parameters depending on the kernel: one
    // program per shape; the other is skipped (lsm_hook_check).
    protect(programs::PROTECT_BPF, "bpf", 3),
    protect(programs::PROTECT_BPF4, "bpf", 4),
    protect(programs::PROTECT_FILE_OPEN, "file_open", 1),
    protect(programs::PROTECT_PATH_MKNOD, "path_mknod", 4),
    protect(programs::PROTECT_PATH_MKDIR, "path_mkdir", 3),
    protect(programs::PROTECT_PATH_SYMLINK, "path_symlink", 3),
    observe(programs::OBS_UNLINK, "sys_enter_unlink"),
    observe(programs::OBS_UNLINKAT, "sys_enter_unlinkat"),
    observe(programs::OBS_RMDIR, "sys_enter_rmdir"),
    observe(programs::OBS_RENAME, "sys_enter_rename"),
    observe(programs::OBS_RENAMEAT, "sys_enter_renameat"),
    observe(programs::OBS_RENAMEAT2, "sys_enter_renameat2"),
    observe(programs::OBS_TRUNCATE, "sys_enter_truncate"),
    observe(programs::OBS_FTRUNCATE, "sys_enter_ftruncate"),
    observe(programs::OBS_LINK, "sys_enter_link"),
    observe(programs::OBS_LINKAT, "sys_enter_linkat"),
    observe(programs::OBS_OPEN, "sys_enter_open"),
    observe(programs::OBS_OPENAT, "sys_enter_openat"),
    observe(programs::OBS_OPENAT2, "sys_enter_openat2"),
    observe(programs::OBS_CREAT, "sys_enter_creat"),
    observe(programs::OBS_OPEN_EXIT, "sys_exit_open"),
    observe(programs::OBS_OPENAT_EXIT, "sys_exit_openat"),
    observe(programs::OBS_OPENAT2_EXIT, "sys_exit_openat2"),
    observe(programs::OBS_CREAT_EXIT, "sys_exit_creat"),
];

/// A BPF-LSM file probe: optional (the kernel may lack BPF-LSM), always attached.
const fn lsm(program: &'static str, hook: &'static str, args: usize) -> ProbeSpec {
    ProbeSpec {
        program,
        kind: ProbeKind::Lsm { hook, args },
        class: ActionClass::File,
        required: false,
        lifetime: Lifetime::Always,
    }
}

/// A directory-cache probe (fexit): optional, always attached; the cache
/// is on only when every one of them is ([`dircache_ready`]).
const fn cache(program: &'static str, function: &'static str) -> ProbeSpec {
    ProbeSpec {
        program,
        kind: ProbeKind::FExit { function },
        class: ActionClass::FileCache,
        required: false,
        lifetime: Lifetime::Always,
    }
}

/// Whether the kernel's directory cache may be used: file actions are
/// vetoed by BPF-LSM, every program that keeps the cache's epoch is
/// attached, and this kernel's BTF gave the offsets it reads.
pub fn dircache_ready(statuses: &[ProbeStatus]) -> bool {
    let offsets = kernel_offsets().as_ref().is_ok_and(|o| {
        o.dentry_iname != 0 && o.dentry_iname_len >= 32 && o.inode_generation != 0 && o.renamedata_old != 0 && o.renamedata_new != 0
    });
    let cache: Vec<&ProbeStatus> = statuses.iter().filter(|s| s.class == ActionClass::FileCache).collect();
    offsets
        && file_enforcement(statuses) == FileEnforcement::Veto
        && !cache.is_empty()
        && cache.iter().all(|s| matches!(s.state, ProbeState::Attached))
}

/// A self-protection probe (BPF-LSM): optional, always attached.
const fn protect(program: &'static str, hook: &'static str, args: usize) -> ProbeSpec {
    ProbeSpec {
        program,
        kind: ProbeKind::Lsm { hook, args },
        class: ActionClass::SelfProtection,
        required: false,
        lifetime: Lifetime::Always,
    }
}

/// A file-observation fallback probe on a syscall tracepoint of the same name.
const fn observe(program: &'static str, tracepoint: &'static str) -> ProbeSpec {
    ProbeSpec {
        program,
        kind: ProbeKind::TracePoint { category: "syscalls", name: tracepoint },
        class: ActionClass::File,
        required: false,
        lifetime: Lifetime::FallbackWhileAgentLive,
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ProbeState {
    Attached,
    /// Verified and ready; attached while an agent is live.
    Ready,
    Unavailable { reason: String },
    /// Not needed on this kernel: the hook does not exist here (another
    /// probe covers its actions), or the fallback is not needed because
    /// the primary probes attached.
    Skipped { reason: String },
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

/// Parse the embedded object, set the tracepoint-layout and struct-offset
/// globals from this kernel's tracefs and BTF, and create the maps.
/// Programs are not loaded yet.
pub fn load_object() -> Result<Ebpf, LoadError> {
    load_object_with(None)
}

/// [`load_object`], with every map pinned under `pins` (an existing pin is
/// opened instead of creating the map: see pins.rs).
pub fn load_object_with(pins: Option<&Pins>) -> Result<Ebpf, LoadError> {
    raise_memlock();
    let fork_child = tracefs::field_offset("sched", "sched_process_fork", "child_pid")?;
    let exec_old_pid = tracefs::field_offset("sched", "sched_process_exec", "old_pid")?;
    let exec_filename = tracefs::field_offset("sched", "sched_process_exec", "filename")?;
    // Without the layout the probe is reported unavailable (attach_all) and
    // reconciliation alone finds cgroup moves; the zeros are never read.
    let (attach_pid, attach_dst) = cgroup_attach_layout().clone().unwrap_or_default();
    // Without offsets the file programs are reported unavailable (attach_all);
    // the zeros they would read are never used.
    let offsets = kernel_offsets().clone().unwrap_or_default();
    let exit_code_off = task_exit_code_offset();
    let tgid_off = task_tgid_offset();
    let pinned: Vec<(String, PathBuf)> = pins
        .map(|p| pins::pinned_map_names().into_iter().map(|n| (p.map(&n), n)).map(|(path, n)| (n, path)).collect())
        .unwrap_or_default();
    let mut loader = EbpfLoader::new();
    loader
        .override_global(globals::FORK_CHILD_PID_OFF, &fork_child, true)
        .override_global(globals::EXEC_OLD_PID_OFF, &exec_old_pid, true)
        .override_global(globals::EXEC_FILENAME_OFF, &exec_filename, true)
        .override_global(globals::CGROUP_ATTACH_PID_OFF, &attach_pid, true)
        .override_global(globals::CGROUP_ATTACH_DST_ID_OFF, &attach_dst, true)
        .override_global(globals::KERNEL_OFFSETS, &offsets, true)
        .override_global(globals::TASK_EXIT_CODE_OFF, &exit_code_off, true)
        .override_global(globals::TASK_TGID_OFF, &tgid_off, true)
        .map_max_entries(maps::EVENTS, EVENTS_RING_BYTES.load(std::sync::atomic::Ordering::Relaxed));
    for (name, path) in &pinned {
        loader.map_pin_path(name.as_str(), path.as_path());
    }
    Ok(loader.load(EBPF_OBJECT)?)
}

/// Byte offsets of `pid` and `dst_id` in this kernel's cgroup_attach_task
/// record (tracefs), computed once.
fn cgroup_attach_layout() -> &'static Result<(u32, u32), String> {
    static LAYOUT: OnceLock<Result<(u32, u32), String>> = OnceLock::new();
    LAYOUT.get_or_init(|| {
        let field = |f: &str| tracefs::field_offset("cgroup", "cgroup_attach_task", f).map_err(|e| e.to_string());
        Ok((field("pid")?, field("dst_id")?))
    })
}

/// Whether agents' cgroup moves reach the daemon as they happen (the
/// cgroup_attach_task probe is attached).
pub fn cgroup_moves_observed(probes: &[ProbeStatus]) -> bool {
    probes.iter().any(|p| p.program == programs::CGROUP_ATTACH_TASK && matches!(p.state, ProbeState::Attached))
}

/// The event ring's size for the next [`load_object`] (the daemon sets it
/// from its configuration).
pub static EVENTS_RING_BYTES: std::sync::atomic::AtomicU32 =
    std::sync::atomic::AtomicU32::new(agentguard_common::limits::EVENTS_RING_BYTES);

/// This kernel's BTF, parsed once and kept until [`release_kernel_btf`].
fn kernel_btf() -> std::sync::Arc<Result<crate::btf::Btf, String>> {
    let mut cached = KERNEL_BTF.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    cached.get_or_insert_with(|| std::sync::Arc::new(crate::btf::Btf::from_sys_fs().map_err(|e| e.to_string()))).clone()
}

static KERNEL_BTF: std::sync::Mutex<Option<std::sync::Arc<Result<crate::btf::Btf, String>>>> = std::sync::Mutex::new(None);

/// aya's parse of this kernel's BTF, which loading an LSM program needs:
/// parsed once for all of them (each parse of vmlinux BTF costs about as
/// much as verifying a program) and kept until [`release_kernel_btf`].
fn aya_kernel_btf() -> Result<std::sync::Arc<Btf>, String> {
    let mut cached = AYA_KERNEL_BTF.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(btf) = cached.as_ref() {
        return Ok(btf.clone());
    }
    let btf = std::sync::Arc::new(
        Btf::from_sys_fs().map_err(|e| format!("kernel BTF unavailable (/sys/kernel/btf/vmlinux): {e}"))?,
    );
    *cached = Some(btf.clone());
    Ok(btf)
}

static AYA_KERNEL_BTF: std::sync::Mutex<Option<std::sync::Arc<Btf>>> = std::sync::Mutex::new(None);

/// Drop the parsed BTF (tens of MiB) once loading is done: an idle daemon
/// should not keep it resident (B8). A later need parses it again.
pub fn release_kernel_btf() {
    *KERNEL_BTF.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    *AYA_KERNEL_BTF.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
}

/// Let go of the embedded object's pages once every program is loaded: 4.4
/// MiB of the binary that start-up read through and an idle daemon would
/// otherwise keep resident (B8). They are clean pages of the executable's
/// file: a later read (the CLI's commands run in their own processes)
/// faults them in again from it.
pub fn release_object() {
    let _ = pins::generation();
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1);
    let start = EBPF_OBJECT.as_ptr() as usize;
    let (first, end) = (start.next_multiple_of(page), (start + EBPF_OBJECT.len()) / page * page);
    if end > first {
        // SAFETY: whole pages inside a read-only static, which nothing
        // writes; MADV_DONTNEED on a private file mapping drops this
        // process's copy of them, and the next access reads the file again.
        if unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_DONTNEED) } != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "cannot release the eBPF object's pages");
        }
    }
}

/// `task_struct.tgid` from BTF, for selfprotect.rs (0 where this kernel
/// has no BTF: the programs then judge no signal or ptrace).
fn task_tgid_offset() -> u32 {
    kernel_btf().as_ref().as_ref().ok().and_then(|b| b.member_offset("task_struct", "tgid").ok()).unwrap_or(0)
}

/// `task_struct.exit_code` from BTF, for the exit event's status; 0 (no
/// status in exit events) where this kernel has no BTF.
fn task_exit_code_offset() -> u32 {
    let found = kernel_btf()
        .as_ref()
        .as_ref()
        .map_err(Clone::clone)
        .and_then(|b| b.member_offset("task_struct", "exit_code").map_err(|e| e.to_string()));
    found.unwrap_or_else(|e| {
        tracing::warn!("exit events will carry no exit status: task_struct.exit_code not found in BTF ({e})");
        0
    })
}

/// The struct offsets the file programs read (from BTF) and the syscall
/// tracepoint layout (from tracefs), computed once.
pub fn kernel_offsets() -> &'static Result<KernelOffsets, String> {
    static OFFSETS: OnceLock<Result<KernelOffsets, String>> = OnceLock::new();
    OFFSETS.get_or_init(|| {
        let btf = kernel_btf();
        let btf = btf.as_ref().as_ref().map_err(Clone::clone)?;
        let mut o = btf.kernel_offsets().map_err(|e| e.to_string())?;
        let field = |name: &str, f: &str| tracefs::field_offset("syscalls", name, f).map_err(|e| e.to_string());
        o.syscall_args = field("sys_enter_unlinkat", "dfd")?;
        // Every argument is 8 bytes after the previous one (include/trace/syscall.h);
        // check it on this kernel rather than assume it.
        for (name, f, index) in [("sys_enter_unlinkat", "pathname", 1), ("sys_enter_renameat2", "flags", 4), ("sys_enter_openat", "flags", 2)] {
            let at = field(name, f)?;
            if at != o.syscall_args + 8 * index {
                return Err(format!("syscalls/{name}: {f} is at byte {at}, not {}; unknown syscall record layout", o.syscall_args + 8 * index));
            }
        }
        o.syscall_ret = field("sys_exit_openat", "ret")?;
        Ok(o)
    })
}

/// Load one probe into the kernel (verify it) without attaching it.
pub fn load_probe(ebpf: &mut Ebpf, spec: &ProbeSpec) -> Result<(), String> {
    let program = ebpf
        .program_mut(spec.program)
        .ok_or_else(|| LoadError::MissingProgram(spec.program).to_string())?;
    match spec.kind {
        ProbeKind::CgroupSockAddr => {
            let prog: &mut CgroupSockAddr = program.try_into().map_err(|e| format!("{e}"))?;
            verified(spec.program, || prog.load()).map_err(|e| describe(&e))
        }
        ProbeKind::TracePoint { .. } => {
            let prog: &mut TracePoint = program.try_into().map_err(|e| format!("{e}"))?;
            verified(spec.program, || prog.load()).map_err(|e| describe(&e))
        }
        ProbeKind::Lsm { .. } | ProbeKind::FExit { .. } => {
            Err(format!("{}: BPF-LSM and fexit probes are attached at start, not on demand", spec.program))
        }
    }
}

/// The link of an attached probe, as its program holds it.
#[derive(Debug)]
enum LinkId {
    TracePoint(TracePointLinkId),
    Cgroup(CgroupSockAddrLinkId),
    Lsm(LsmLinkId),
    FExit(FExitLinkId),
}

/// Load and attach one probe. Returns a human reason on failure.
pub fn attach_probe(ebpf: &mut Ebpf, spec: &ProbeSpec, cgroup_root: &Path) -> Result<(), String> {
    attach_probe_id(ebpf, spec, cgroup_root).map(drop)
}

/// Take an attached probe's link out of its program and pin it at `path`,
/// so it stays attached when the daemon is gone. A link the kernel cannot
/// pin (no bpf_link for this attach type, kernels before 5.15 for
/// tracepoints) was detached by the attempt: the caller attaches again,
/// unpinned.
fn pin_link(ebpf: &mut Ebpf, program: &'static str, id: LinkId, path: &Path) -> Result<PinnedLink, String> {
    let prog = ebpf.program_mut(program).ok_or_else(|| LoadError::MissingProgram(program).to_string())?;
    let fd: Result<FdLink, _> = match id {
        LinkId::TracePoint(id) => {
            let p: &mut TracePoint = prog.try_into().map_err(|e| describe(&e))?;
            p.take_link(id).map_err(|e| describe(&e))?.try_into()
        }
        LinkId::Cgroup(id) => {
            let p: &mut CgroupSockAddr = prog.try_into().map_err(|e| describe(&e))?;
            p.take_link(id).map_err(|e| describe(&e))?.try_into()
        }
        LinkId::Lsm(id) => {
            let p: &mut Lsm = prog.try_into().map_err(|e| describe(&e))?;
            Ok(p.take_link(id).map_err(|e| describe(&e))?.into())
        }
        LinkId::FExit(id) => {
            let p: &mut FExit = prog.try_into().map_err(|e| describe(&e))?;
            Ok(p.take_link(id).map_err(|e| describe(&e))?.into())
        }
    };
    let fd = fd.map_err(|e| format!("{program}: this kernel has no bpf_link for it ({})", describe(&e)))?;
    pins::pin(fd, path)
}

/// Attach `spec` (taking over the link a previous daemon pinned, if any)
/// and pin its link. Returns whether it was adopted.
fn attach_pinned(ebpf: &mut Ebpf, spec: &ProbeSpec, cgroup_root: &Path, pins: &Pins) -> Result<bool, String> {
    if pins.adopt_link(spec.program).is_some() {
        return Ok(true);
    }
    let id = attach_probe_id(ebpf, spec, cgroup_root)?;
    if let Err(e) = pin_link(ebpf, spec.program, id, &pins.link(spec.program)) {
        tracing::warn!(program = spec.program, error = %e, "cannot pin: the program stays attached only while the daemon runs");
        attach_probe_id(ebpf, spec, cgroup_root)?;
    }
    Ok(false)
}

fn attach_probe_id(ebpf: &mut Ebpf, spec: &ProbeSpec, cgroup_root: &Path) -> Result<LinkId, String> {
    let program = ebpf
        .program_mut(spec.program)
        .ok_or_else(|| LoadError::MissingProgram(spec.program).to_string())?;
    match spec.kind {
        ProbeKind::TracePoint { category, name } => {
            let tp: &mut TracePoint = program.try_into().map_err(|e| format!("{e}"))?;
            if tp.fd().is_err() {
                verified(spec.program, || tp.load()).map_err(|e| describe(&e))?;
            }
            Ok(LinkId::TracePoint(tp.attach(category, name).map_err(|e| describe(&e))?))
        }
        ProbeKind::CgroupSockAddr => {
            let prog: &mut CgroupSockAddr = program.try_into().map_err(|e| format!("{e}"))?;
            if prog.fd().is_err() {
                verified(spec.program, || prog.load()).map_err(|e| describe(&e))?;
            }
            let cgroup = File::open(cgroup_root)
                .map_err(|e| format!("cannot open cgroup {}: {e}", cgroup_root.display()))?;
            // On 5.7+ aya attaches through a bpf_link, which always coexists
            // with other programs and rejects BPF_F_ALLOW_MULTI (EINVAL):
            // "Single" passes no flags.
            Ok(LinkId::Cgroup(prog.attach(&cgroup, CgroupAttachMode::Single).map_err(|e| describe(&e))?))
        }
        ProbeKind::Lsm { hook, .. } => {
            if let Err(e) = kernel_offsets() {
                return Err(format!("cannot compute the kernel struct offsets the file programs read: {e}"));
            }
            let lsm: &mut Lsm = program.try_into().map_err(|e| format!("{e}"))?;
            if lsm.fd().is_err() {
                let btf = aya_kernel_btf()?;
                verified(spec.program, || lsm.load(hook, &btf)).map_err(|e| describe(&e))?;
            }
            Ok(LinkId::Lsm(lsm.attach().map_err(|e| describe(&e))?))
        }
        ProbeKind::FExit { function } => {
            if let Err(e) = kernel_offsets() {
                return Err(format!("cannot compute the kernel struct offsets the directory cache reads: {e}"));
            }
            let prog: &mut FExit = program.try_into().map_err(|e| format!("{e}"))?;
            if prog.fd().is_err() {
                let btf = aya_kernel_btf()?;
                verified(spec.program, || prog.load(function, &btf)).map_err(|e| describe(&e))?;
            }
            Ok(LinkId::FExit(prog.attach().map_err(|e| describe(&e))?))
        }
    }
}

/// Load (the kernel verifies) and say how long it took: on a slow machine
/// the verifier is most of a daemon's start (seconds per file program in
/// an emulated VM), and this is where an operator sees which program.
fn verified<T, E>(program: &str, load: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
    let start = std::time::Instant::now();
    let r = load();
    tracing::debug!(program, ms = start.elapsed().as_millis() as u64, ok = r.is_ok(), "loaded into the kernel");
    r
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

/// Why an LSM probe's hook does not apply on this kernel (it does not
/// exist, so another probe covers its actions), or why it cannot work here.
pub fn lsm_hook_check(hook: &str, args: usize) -> Result<(), ProbeState> {
    let btf = kernel_btf();
    let Ok(btf) = btf.as_ref() else { return Ok(()) };
    match btf.func_params(&format!("bpf_lsm_{hook}")) {
        None => Err(ProbeState::Skipped { reason: format!("this kernel has no {hook} LSM hook") }),
        // Another program of the table is built for this kernel's shape.
        Some(n) if n != args && PROBES.iter().any(|p| matches!(p.kind, ProbeKind::Lsm { hook: h, args: a } if h == hook && a == n)) => {
            Err(ProbeState::Skipped { reason: format!("this kernel's {hook} hook takes {n} parameters; its own program covers it") })
        }
        Some(n) if n != args => Err(ProbeState::Unavailable {
            reason: format!("the {hook} LSM hook takes {n} arguments on this kernel, the program expects {args}"),
        }),
        Some(_) => Ok(()),
    }
}

/// Attach every probe in [`PROBES`]. A required probe that fails is an error;
/// an optional one is reported as unavailable. Fallback probes are loaded
/// only when their class's primary probes did not all attach.
pub fn attach_all(ebpf: &mut Ebpf, cgroup_root: &Path) -> Result<Vec<ProbeStatus>, LoadError> {
    attach_all_with(ebpf, cgroup_root, None)
}

/// [`attach_all`], pinning the always-attached links under `pins`, or
/// taking over the ones a previous daemon pinned there (pins.rs).
pub fn attach_all_with(ebpf: &mut Ebpf, cgroup_root: &Path, pins: Option<&Pins>) -> Result<Vec<ProbeStatus>, LoadError> {
    let attach = |ebpf: &mut Ebpf, spec: &ProbeSpec| match pins {
        Some(p) => attach_pinned(ebpf, spec, cgroup_root, p).map(|adopted| {
            if adopted {
                tracing::debug!(program = spec.program, "took over the pinned link");
            }
            ProbeState::Attached
        }),
        None => attach_probe(ebpf, spec, cgroup_root).map(|()| ProbeState::Attached),
    };
    let mut statuses = Vec::with_capacity(PROBES.len());
    for spec in PROBES {
        if spec.lifetime == Lifetime::FallbackWhileAgentLive {
            continue;
        }
        let result = match (spec.lifetime, spec.kind) {
            (_, ProbeKind::Lsm { hook, args }) => match lsm_hook_check(hook, args) {
                Err(state) => {
                    statuses.push(ProbeStatus { program: spec.program, class: spec.class, state });
                    continue;
                }
                Ok(()) => attach(ebpf, spec),
            },
            // The directory cache serves only BPF-LSM's decisions: without
            // them its programs would only tax every rename and mount.
            (_, ProbeKind::FExit { .. }) if spec.class == ActionClass::FileCache && !class_attached(&statuses, ActionClass::File) => {
                statuses.push(ProbeStatus {
                    program: spec.program,
                    class: spec.class,
                    state: ProbeState::Skipped { reason: "BPF-LSM does not veto file actions here: no directory cache to keep".into() },
                });
                continue;
            }
            // A program that would ignore every move is not attached.
            _ if spec.program == programs::CGROUP_ATTACH_TASK && cgroup_attach_layout().is_err() => Err(format!(
                "cannot read the cgroup_attach_task record layout: {}; reconciliation alone finds cgroup moves",
                cgroup_attach_layout().as_ref().err().map_or("", String::as_str)
            )),
            (Lifetime::Always, _) => attach(ebpf, spec),
            _ => load_probe(ebpf, spec).map(|()| ProbeState::Ready),
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
    let vetoed = class_attached(&statuses, ActionClass::File);
    for spec in PROBES.iter().filter(|p| p.lifetime == Lifetime::FallbackWhileAgentLive) {
        let state = if vetoed {
            ProbeState::Skipped { reason: "BPF-LSM vetoes file actions here; no observation needed".into() }
        } else if let Err(e) = kernel_offsets() {
            ProbeState::Unavailable { reason: format!("cannot compute kernel struct offsets: {e}") }
        } else {
            match load_probe(ebpf, spec) {
                Ok(()) => ProbeState::Ready,
                Err(reason) => ProbeState::Unavailable { reason },
            }
        };
        statuses.push(ProbeStatus { program: spec.program, class: spec.class, state });
    }
    if !vetoed && statuses.iter().any(|s| s.class == ActionClass::File && matches!(s.state, ProbeState::Ready)) {
        match crate::fmode::calibrate(ebpf) {
            Ok(bit) => tracing::debug!(fmode_created = format!("{bit:#x}"), "calibrated FMODE_CREATED"),
            Err(e) => tracing::warn!(error = %e, "cannot calibrate FMODE_CREATED: the file fallback judges every O_TRUNC open as a truncation"),
        }
    }
    Ok(statuses)
}

/// Whether every primary (not fallback) probe of `class` is attached, ready
/// to be, or not needed on this kernel.
pub fn class_attached(statuses: &[ProbeStatus], class: ActionClass) -> bool {
    let primary = |program: &str| {
        PROBES.iter().any(|p| p.program == program && p.lifetime != Lifetime::FallbackWhileAgentLive)
    };
    statuses
        .iter()
        .filter(|s| s.class == class && primary(s.program))
        .all(|s| matches!(s.state, ProbeState::Attached | ProbeState::Ready | ProbeState::Skipped { .. }))
}

/// How file actions of agents are enforced, given the probe states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileEnforcement {
    /// BPF-LSM: the kernel refuses the action before it happens.
    Veto,
    /// Syscall tracepoints: the action is observed and the agent contained
    /// (stopped at its first violating action, then frozen).
    ObserveAndContain,
    /// Neither could load: file actions are not judged.
    None,
}

pub fn file_enforcement(statuses: &[ProbeStatus]) -> FileEnforcement {
    let fallback = |program: &str| PROBES.iter().any(|p| p.program == program && p.lifetime == Lifetime::FallbackWhileAgentLive);
    let mut observers = statuses.iter().filter(|s| s.class == ActionClass::File && fallback(s.program)).peekable();
    if class_attached(statuses, ActionClass::File) {
        FileEnforcement::Veto
    } else if observers.peek().is_some() && observers.all(|s| matches!(s.state, ProbeState::Ready)) {
        // Every observation program, or a destructive path would go unseen.
        FileEnforcement::ObserveAndContain
    } else {
        FileEnforcement::None
    }
}

/// The on-demand probes ([`Lifetime::WhileAgentLive`], and the loaded
/// [`Lifetime::FallbackWhileAgentLive`] ones) and the kernel flag that tells
/// the exec hook whether they are attached. With pins, each attached link is
/// pinned under `live/` while it is attached, so it outlives the daemon; a
/// restarted daemon takes them over ([`LiveHooks::adopt`]).
#[derive(Debug, Default)]
pub struct LiveHooks {
    links: Vec<(&'static str, CgroupSockAddrLinkId)>,
    tracepoints: Vec<(&'static str, TracePointLinkId)>,
    pinned: Vec<(&'static str, PinnedLink)>,
    pins: Option<Pins>,
}

fn is_network(program: &str) -> bool {
    PROBES.iter().any(|p| p.program == program && p.lifetime == Lifetime::WhileAgentLive)
}

impl LiveHooks {
    /// On-demand hooks whose links are pinned under `pins`.
    pub fn pinned(pins: Pins) -> Self {
        Self { pins: Some(pins), ..Self::default() }
    }

    pub fn attached(&self) -> bool {
        !self.links.is_empty() || self.pinned.iter().any(|(p, _)| is_network(p))
    }

    /// How many fallback observation programs are attached.
    pub fn observing(&self) -> usize {
        self.tracepoints.len() + self.pinned.iter().filter(|(p, _)| !is_network(p)).count()
    }

    /// Take over the on-demand links a previous daemon left pinned, then
    /// attach whatever of the set is missing (it died between two attaches)
    /// and raise the flag; with none pinned, lower it. Returns how many it
    /// took over.
    pub fn adopt(&mut self, ebpf: &mut Ebpf, cgroup_root: &Path) -> Result<usize, LoadError> {
        let Some(pins) = &self.pins else { return Ok(0) };
        for spec in PROBES.iter().filter(|p| p.lifetime != Lifetime::Always) {
            let path = pins.live(spec.program);
            if !path.exists() {
                continue;
            }
            match PinnedLink::from_pin(&path) {
                Ok(link) => self.pinned.push((spec.program, link)),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "unreadable pinned link; removing it");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let adopted = self.pinned.len();
        if adopted > 0 {
            self.attach(ebpf, cgroup_root)?;
        } else {
            set_hook_flag(ebpf, HookFlag::NetAttached, 0).map_err(|reason| LoadError::Required { program: maps::HOOKS, reason })?;
        }
        Ok(adopted)
    }

    fn has(&self, program: &str) -> bool {
        self.pinned.iter().any(|(p, _)| *p == program)
            || self.links.iter().any(|(p, _)| *p == program)
            || self.tracepoints.iter().any(|(p, _)| *p == program)
    }

    /// Keep an attached link: pinned under `live/` where possible.
    fn keep(&mut self, ebpf: &mut Ebpf, spec: &ProbeSpec, id: LinkId, cgroup_root: &Path) -> Result<(), LoadError> {
        let err = |reason| LoadError::Required { program: spec.program, reason };
        let id = match &self.pins {
            Some(pins) => match pin_link(ebpf, spec.program, id, &pins.live(spec.program)) {
                Ok(link) => {
                    self.pinned.push((spec.program, link));
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(program = spec.program, error = %e, "cannot pin: attached only while the daemon runs");
                    attach_probe_id(ebpf, spec, cgroup_root).map_err(err)?
                }
            },
            None => id,
        };
        match id {
            LinkId::Cgroup(id) => self.links.push((spec.program, id)),
            LinkId::TracePoint(id) => self.tracepoints.push((spec.program, id)),
            LinkId::Lsm(_) | LinkId::FExit(_) => {}
        }
        Ok(())
    }

    /// Attach every on-demand probe (the network programs at the cgroup2
    /// root, the file fallback's tracepoints where it is loaded) that is not
    /// attached yet, then raise the flag.
    pub fn attach(&mut self, ebpf: &mut Ebpf, cgroup_root: &Path) -> Result<(), LoadError> {
        let complete = |this: &Self, ebpf: &mut Ebpf| {
            PROBES.iter().filter(|p| p.lifetime != Lifetime::Always).all(|p| this.has(p.program) || !loaded(ebpf, p))
        };
        if self.attached() && complete(self, ebpf) {
            return Ok(());
        }
        for spec in PROBES.iter().filter(|p| p.lifetime == Lifetime::WhileAgentLive) {
            if self.has(spec.program) {
                continue;
            }
            ebpf.program(spec.program).ok_or(LoadError::MissingProgram(spec.program))?;
            // See attach_probe: "Single" passes no flags to bpf_link_create.
            let id = attach_probe_id(ebpf, spec, cgroup_root).map_err(|reason| LoadError::Required { program: spec.program, reason })?;
            self.keep(ebpf, spec, id, cgroup_root)?;
        }
        // The loaded fallback tracepoints (nothing where BPF-LSM vetoes).
        for spec in PROBES.iter().filter(|p| p.lifetime == Lifetime::FallbackWhileAgentLive) {
            if self.has(spec.program) || !loaded(ebpf, spec) {
                continue; // not loaded: not needed, or unavailable (reported at start)
            }
            let id = attach_probe_id(ebpf, spec, cgroup_root).map_err(|reason| LoadError::Required { program: spec.program, reason })?;
            self.keep(ebpf, spec, id, cgroup_root)?;
        }
        set_hook_flag(ebpf, HookFlag::NetAttached, 1).map_err(|reason| LoadError::Required { program: maps::HOOKS, reason })
    }

    /// Lower the flag first (a process tagged from now on stops itself at
    /// exec), then let `still_idle` confirm nothing became live meanwhile,
    /// then detach (and unpin). Returns whether it detached.
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
        for (program, link) in self.pinned.drain(..) {
            // Dropping the last fd of an unpinned link detaches it.
            if let Err(e) = link.unpin() {
                tracing::warn!(program, error = %e, "cannot unpin");
            }
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
        for (program, id) in self.tracepoints.drain(..) {
            let Some(prog) = ebpf.program_mut(program) else { continue };
            if let Ok(tp) = <&mut TracePoint>::try_from(prog) {
                if let Err(e) = tp.detach(id) {
                    tracing::warn!(program, error = %describe(&e), "detach failed");
                }
            }
        }
        true
    }
}

/// Whether `spec`'s program is loaded (verified) in this daemon.
fn loaded(ebpf: &Ebpf, spec: &ProbeSpec) -> bool {
    match ebpf.program(spec.program) {
        Some(aya::programs::Program::TracePoint(p)) => p.fd().is_ok(),
        Some(aya::programs::Program::CgroupSockAddr(p)) => p.fd().is_ok(),
        _ => false,
    }
}

pub(crate) fn set_hook_flag(ebpf: &mut Ebpf, flag: HookFlag, value: u32) -> Result<(), String> {
    let map = ebpf.map_mut(maps::HOOKS).ok_or_else(|| format!("map {} missing", maps::HOOKS))?;
    let mut arr: aya::maps::Array<&mut aya::maps::MapData, u32> =
        aya::maps::Array::try_from(map).map_err(|e| describe(&e))?;
    arr.set(flag as u32, value, 0).map_err(|e| describe(&e))
}

/// The pin directory for AgentGuard's maps and links.
pub fn default_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/agentguard")
}
