//! The file fallback where BPF-LSM cannot load: the same actions observed
//! through syscall tracepoints, judged by the same rules, and contained. A
//! tracepoint cannot refuse a syscall, so at the first violating action the
//! program stops the whole process at once (`bpf_send_signal(SIGSTOP)`:
//! it takes effect when the syscall returns) and the daemon then freezes the
//! agent's cgroup. The violating syscall itself completes: at most one
//! action per violating process is lost (docs/architecture.md).
//!
//! These programs tax every syscall of every process while attached
//! (../shared/TOOLCHAIN.md), so the loader attaches them only while an
//! agent is live, with the exec-time hold covering the gap (lineage.rs).
//!
//! Paths are judged as the syscall names them, joined to the descriptor's
//! or working directory's real path; `..` and symlinks in the given string
//! are not resolved. Opens with O_TRUNC are judged at syscall exit, on the
//! opened file's real path, and only when they truncated an existing file.
use agentguard_common::{Enforcement, FileOp, HookFlag, PendingOpen, Tag};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user, generated::bpf_send_signal},
    macros::{map, tracepoint},
    maps::HashMap,
    programs::TracePointContext,
};

use crate::{
    filejudge::{approval_of, judge, record, record_preempted},
    filepath::{self, Built, FileScratch},
    kstructs::{dentry_inode, fd_file, off, path_parts, read_u32},
    shared::{current_tag, decide_unreadable, granted, hinted, hook_flag, notify_hold, HOOKS},
};

const SIGSTOP: u32 = 19;
// UAPI constants (include/uapi/asm-generic/fcntl.h, linux/fcntl.h, linux/fs.h):
// part of the syscall ABI, not of any struct layout.
const AT_FDCWD: i64 = -100;
const AT_REMOVEDIR: u64 = 0x200;
const O_CREAT: u64 = 0o100;
const O_EXCL: u64 = 0o200;
const O_TRUNC: u64 = 0o1000;
const O_WRONLY: u64 = 0o1;
const RENAME_NOREPLACE: u64 = 1;
const RENAME_EXCHANGE: u64 = 2;

#[map(name = "AG_FILE_PENDING")]
static FILE_PENDING: HashMap<u32, PendingOpen> = HashMap::with_max_entries(agentguard_common::limits::MAX_TAGGED_TASKS, 0);

/// Argument `i` of a sys_enter_* record (each argument is 8 bytes).
#[inline(always)]
fn arg(ctx: &TracePointContext, i: u64) -> u64 {
    let at = (off!(syscall_args) + 8 * i) as usize;
    // SAFETY: the offset comes from this kernel's tracefs format file.
    unsafe { ctx.read_at::<u64>(at) }.unwrap_or(0)
}

#[inline(always)]
fn ret(ctx: &TracePointContext) -> i64 {
    let at = off!(syscall_ret) as usize;
    // SAFETY: as above.
    unsafe { ctx.read_at::<i64>(at) }.unwrap_or(-1)
}

/// Judge, contain when the decision blocks, record.
#[inline(always)]
fn observe(tag: Tag, op: FileOp, ops: u32, inode: u64, build: impl FnOnce(&mut FileScratch) -> Result<Built, ()>) {
    // A run this one preempted holds this CPU's scratch (filepath.rs
    // `take`; should a kernel run these programs preemptibly): the action
    // cannot be judged, and is contained, fail closed.
    if !filepath::claim() {
        // SAFETY: signals the current process; no pointers involved.
        unsafe { bpf_send_signal(SIGSTOP) };
        record_preempted(tag, op, Enforcement::Observed);
        return;
    }
    observe_taken(tag, op, ops, inode, build);
    filepath::release();
}

#[inline(always)]
fn observe_taken(tag: Tag, op: FileOp, ops: u32, inode: u64, build: impl FnOnce(&mut FileScratch) -> Result<Built, ()>) {
    let Some(s) = filepath::scratch() else { return };
    let (verdict, built) = match build(s) {
        Ok(b) => (judge(tag, s, b, ops, inode), Some(b)),
        Err(()) => ((decide_unreadable(), 0), None),
    };
    let grant = approval_of(tag, op, verdict, s, built);
    if verdict.0.blocks() && !granted(grant.0) {
        // SAFETY: signals the current process; no pointers involved.
        unsafe { bpf_send_signal(SIGSTOP) };
        if verdict.0 == agentguard_common::Decision::Approve {
            notify_hold(tag, agentguard_common::grant_kind::FILE);
        }
    }
    record(tag, op, verdict, Enforcement::Observed, grant, s, built, false);
}

/// Observe a tagged task's action on the path in argument `path_arg`
/// (relative to the descriptor in `dfd_arg`, if any). Every entry point
/// looks the tag up first, before reading any argument: an untagged task,
/// the common case of every process on the host, pays one helper call and
/// one array load (bench B1f).
#[inline(always)]
fn observe_user(ctx: &TracePointContext, tag: Tag, op: FileOp, ops: u32, dfd_arg: Option<u64>, path_arg: u64) -> u32 {
    let dfd = dfd_arg.map_or(AT_FDCWD, |i| arg(ctx, i) as i32 as i64);
    let user = arg(ctx, path_arg);
    observe(tag, op, ops, 0, |s| filepath::from_user(s, dfd, user));
    0
}

#[tracepoint]
pub fn sys_enter_unlink(ctx: TracePointContext) -> u32 {
    let Some(tag) = current_tag() else { return 0 };
    observe_user(&ctx, tag, FileOp::Unlink, FileOp::Unlink.rule_ops(), None, 0)
}

#[tracepoint]
pub fn sys_enter_unlinkat(ctx: TracePointContext) -> u32 {
    let Some(tag) = current_tag() else { return 0 };
    let op = if arg(&ctx, 2) & AT_REMOVEDIR != 0 { FileOp::Rmdir } else { FileOp::Unlink };
    observe_user(&ctx, tag, op, op.rule_ops(), Some(0), 1)
}

#[tracepoint]
pub fn sys_enter_rmdir(ctx: TracePointContext) -> u32 {
    let Some(tag) = current_tag() else { return 0 };
    observe_user(&ctx, tag, FileOp::Rmdir, FileOp::Rmdir.rule_ops(), None, 0)
}

/// A rename's source, then its target. Whether the target exists is not
/// known at syscall entry: it is judged as replaced unless RENAME_NOREPLACE.
#[inline(always)]
fn rename(ctx: &TracePointContext, tag: Tag, old: (Option<u64>, u64), new: (Option<u64>, u64), flags: u64) -> u32 {
    observe_user(ctx, tag, FileOp::Rename, FileOp::Rename.rule_ops(), old.0, old.1);
    if flags & RENAME_NOREPLACE == 0 {
        let ops = if flags & RENAME_EXCHANGE != 0 {
            agentguard_common::file_ops::TRUNCATE | agentguard_common::file_ops::RENAME
        } else {
            FileOp::RenameOver.rule_ops()
        };
        observe_user(ctx, tag, FileOp::RenameOver, ops, new.0, new.1);
    }
    0
}

#[tracepoint]
pub fn sys_enter_rename(ctx: TracePointContext) -> u32 {
    let Some(tag) = current_tag() else { return 0 };
    rename(&ctx, tag, (None, 0), (None, 1), 0)
}

#[tracepoint]
pub fn sys_enter_renameat(ctx: TracePointContext) -> u32 {
    let Some(tag) = current_tag() else { return 0 };
    rename(&ctx, tag, (Some(0), 1), (Some(2), 3), 0)
}

#[tracepoint]
pub fn sys_enter_renameat2(ctx: TracePointContext) -> u32 {
    let Some(tag) = current_tag() else { return 0 };
    let flags = arg(&ctx, 4);
    rename(&ctx, tag, (Some(0), 1), (Some(2), 3), flags)
}

#[tracepoint]
pub fn sys_enter_truncate(ctx: TracePointContext) -> u32 {
    let Some(tag) = current_tag() else { return 0 };
    observe_user(&ctx, tag, FileOp::Truncate, FileOp::Truncate.rule_ops(), None, 0)
}

#[tracepoint]
pub fn sys_enter_link(ctx: TracePointContext) -> u32 {
    let Some(tag) = current_tag() else { return 0 };
    observe_user(&ctx, tag, FileOp::Link, FileOp::Link.rule_ops(), None, 0)
}

#[tracepoint]
pub fn sys_enter_linkat(ctx: TracePointContext) -> u32 {
    let Some(tag) = current_tag() else { return 0 };
    observe_user(&ctx, tag, FileOp::Link, FileOp::Link.rule_ops(), Some(0), 1)
}

/// A truncation of the open file behind `fd`, on its real path.
#[inline(always)]
fn observe_fd(fd: u64) {
    let Some(tag) = current_tag() else { return };
    let parts = fd_file(fd).and_then(|file| path_parts(file + off!(file_path)));
    let inode = parts.map(|(_, d)| dentry_inode(d)).unwrap_or(0);
    observe(tag, FileOp::Truncate, FileOp::Truncate.rule_ops(), inode, |s| {
        let (mnt, dentry) = parts?;
        filepath::walk(s, mnt, dentry)
    });
}

#[tracepoint]
pub fn sys_enter_ftruncate(ctx: TracePointContext) -> u32 {
    if current_tag().is_some() {
        observe_fd(arg(&ctx, 0));
    }
    0
}

/// Remember an O_TRUNC open of a tagged task until its syscall exit.
#[inline(always)]
fn open_enter(flags: u64) -> u32 {
    if flags & O_TRUNC == 0 {
        return 0;
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    let _ = FILE_PENDING.insert(&tid, &PendingOpen { flags: flags as u32, _pad: 0 }, 0);
    0
}

#[tracepoint]
pub fn sys_enter_open(ctx: TracePointContext) -> u32 {
    if current_tag().is_none() {
        return 0;
    }
    open_enter(arg(&ctx, 1))
}

#[tracepoint]
pub fn sys_enter_openat(ctx: TracePointContext) -> u32 {
    if current_tag().is_none() {
        return 0;
    }
    open_enter(arg(&ctx, 2))
}

/// openat2(dfd, filename, struct open_how *how, size): `how->flags` is its first u64.
#[tracepoint]
pub fn sys_enter_openat2(ctx: TracePointContext) -> u32 {
    if current_tag().is_none() {
        return 0;
    }
    // SAFETY: user memory; a bad pointer makes the read fail.
    let flags = unsafe { bpf_probe_read_user(arg(&ctx, 2) as *const u64) }.unwrap_or(0);
    open_enter(flags)
}

#[tracepoint]
pub fn sys_enter_creat(_ctx: TracePointContext) -> u32 {
    if current_tag().is_none() {
        return 0;
    }
    open_enter(O_CREAT | O_WRONLY | O_TRUNC)
}

/// At exit: if the open succeeded and did not create the file, it truncated
/// an existing one. O_CREAT without O_EXCL is ambiguous; FMODE_CREATED (a
/// macro whose value changed between kernels, so the loader calibrates it)
/// tells; while it is unknown, the open is judged as a truncation.
#[inline(always)]
fn open_exit(ctx: &TracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    // Only tagged tasks have pending opens, and their hint bits stay set
    // until they exit: every other open on the host skips the lookup.
    if !hinted(tid) {
        return 0;
    }
    // SAFETY: copied out at once.
    let Some(pending) = (unsafe { FILE_PENDING.get(&tid) }).copied() else { return 0 };
    let _ = FILE_PENDING.remove(&tid);
    let fd = ret(ctx);
    if fd < 0 {
        return 0;
    }
    let flags = pending.flags as u64;
    if flags & O_CREAT != 0 {
        if flags & O_EXCL != 0 {
            return 0;
        }
        let created = hook_flag(HookFlag::FmodeCreated);
        if created != 0 {
            let mode = fd_file(fd as u64).and_then(|f| read_u32(f + off!(file_mode))).unwrap_or(0);
            if mode & created != 0 {
                return 0;
            }
        }
    }
    observe_fd(fd as u64);
    0
}

#[tracepoint]
pub fn sys_exit_open(ctx: TracePointContext) -> u32 {
    open_exit(&ctx)
}

#[tracepoint]
pub fn sys_exit_openat(ctx: TracePointContext) -> u32 {
    open_exit(&ctx)
}

#[tracepoint]
pub fn sys_exit_openat2(ctx: TracePointContext) -> u32 {
    open_exit(&ctx)
}

#[tracepoint]
pub fn sys_exit_creat(ctx: TracePointContext) -> u32 {
    open_exit(&ctx)
}

/// Calibration (attached briefly by the loader, on sys_exit_openat): the
/// `f_mode` of the file the loader's thread just opened.
#[tracepoint]
pub fn calibrate_fmode(ctx: TracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    if tid != hook_flag(HookFlag::CalibrateTid) {
        return 0;
    }
    let fd = ret(&ctx);
    if fd < 0 {
        return 0;
    }
    let mode = fd_file(fd as u64).and_then(|f| read_u32(f + off!(file_mode))).unwrap_or(0);
    if let Some(slot) = HOOKS.get_ptr_mut(HookFlag::CalibrateMode as u32) {
        // SAFETY: a u32 slot of an array map.
        unsafe { *slot = mode };
    }
    0
}

/// An empty program on a syscall tracepoint, for benchmarks: the cost of the
/// mechanism itself (the floor B1f is stated against). Never attached by the
/// daemon.
#[tracepoint]
pub fn floor_syscall(_ctx: TracePointContext) -> u32 {
    0
}
