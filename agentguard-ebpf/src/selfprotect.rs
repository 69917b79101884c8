//! Self-protection, where BPF-LSM loads: a tagged process (an agent) may not
//! signal or ptrace the daemon, nor call bpf() at all (it could detach or
//! rewrite AgentGuard's programs and maps), nor write to AgentGuard's files.
//! The daemon's tgid is in `AG_HOOKS[DaemonTgid]` (written at each start);
//! 0 protects no process.
//!
//! AgentGuard's files are the directories (and files) the daemon lists in
//! `AG_SELF` by (device, inode): its configuration, policies, event log,
//! state, pins and cgroup subtree. Below a [`self_marks::TREE`] entry a
//! tagged process may not open a file for writing, create a file,
//! directory, device or symlink, nor remove, rename, link or truncate
//! anything (files.rs asks [`self_walk`] in its decision). Below the cgroup2
//! root ([`self_marks::CGROUP_ROOT`]) it may not write `cgroup.procs` or
//! `cgroup.threads`: moving itself out of its agent's cgroup.
//!
//! Each program passes an earlier BPF-LSM verdict through unchanged and
//! returns -EPERM for a tagged caller; untagged callers are never judged.
//! Every refusal is counted (`Counter::SelfProtectDenials`).
use agentguard_common::{
    approval, limits::SELF_WALK_DEPTH, self_marks, Counter, Decision, Enforcement, FileInodeKey,
    FileOp, HookFlag, Tag, RULE_SELF_PROTECT, self_filter_bit,
};
use core::ffi::c_void;

use aya_ebpf::{
    helpers::{bpf_probe_read_kernel, generated::bpf_probe_read_kernel_str},
    macros::{lsm, map},
    maps::{Array, HashMap},
    programs::LsmContext,
    Global,
};

use crate::{
    filejudge::record,
    filepath::{self, Built, FileScratch},
    kstructs::{dentry_parent_inode, inode_id, off, path_parts, read_ptr, read_u32, read_u64},
    shared::{count, current_tag, HOOKS},
};

#[map(name = "AG_SELF")]
pub static SELF_INODES: HashMap<FileInodeKey, u32> =
    HashMap::with_max_entries(agentguard_common::limits::MAX_SELF_INODES, 0);

#[map(name = "AG_SELF_FILTER")]
static SELF_FILTER: Array<u64> = Array::with_max_entries(agentguard_common::limits::SELF_FILTER_WORDS, 0);

/// include/linux/fs.h.
const FMODE_WRITE: u32 = 0x2;

const EPERM: i32 = 1;

/// `task_struct.tgid` (from BTF); 0: unknown, signals and ptrace are not judged.
#[unsafe(no_mangle)]
static TASK_TGID_OFF: Global<u32> = Global::new(0);
/// Whether `task` (a `struct task_struct *`) is the daemon's process.
#[inline(always)]
fn is_daemon(task: u64) -> bool {
    let off = TASK_TGID_OFF.load();
    let daemon = HOOKS.get(HookFlag::DaemonTgid as u32).copied().unwrap_or(0);
    if off == 0 || daemon == 0 || task == 0 {
        return false;
    }
    // SAFETY: a probe read of one field of a task the kernel handed us.
    match unsafe { bpf_probe_read_kernel((task as *const u8).wrapping_add(off as usize) as *const u32) } {
        Ok(tgid) => tgid == daemon,
        Err(_) => false,
    }
}

/// security_task_kill(p, info, sig, cred): any signal, including 0.
#[lsm(hook = "task_kill")]
#[inline(always)]
pub fn protect_task_kill(ctx: LsmContext) -> i32 {
    let previous: i32 = ctx.arg(4);
    if previous != 0 {
        return previous;
    }
    if current_tag().is_some() && is_daemon(ctx.arg(0)) { refuse() } else { 0 }
}

/// security_ptrace_access_check(child, mode): PTRACE_ATTACH/SEIZE, and
/// every ptrace_may_access (/proc/PID/mem, process_vm_writev, pidfd_getfd).
#[lsm(hook = "ptrace_access_check")]
#[inline(always)]
pub fn protect_ptrace(ctx: LsmContext) -> i32 {
    let previous: i32 = ctx.arg(2);
    if previous != 0 {
        return previous;
    }
    if current_tag().is_some() && is_daemon(ctx.arg(0)) { refuse() } else { 0 }
}

/// security_bpf(cmd, attr, size): no bpf() for agents. The hook gained a
/// fourth parameter in later kernels, which moves the verdict argument: one
/// program per shape, the loader attaches the one this kernel's BTF matches
/// (a ctx offset must be a constant for the verifier).
#[lsm(hook = "bpf")]
#[inline(always)]
pub fn protect_bpf(ctx: LsmContext) -> i32 {
    bpf_verdict(ctx.arg(3))
}

/// security_bpf(cmd, attr, size, kernel).
#[lsm(hook = "bpf")]
#[inline(always)]
pub fn protect_bpf4(ctx: LsmContext) -> i32 {
    bpf_verdict(ctx.arg(4))
}

#[inline(always)]
fn bpf_verdict(previous: i32) -> i32 {
    if previous != 0 {
        return previous;
    }
    if current_tag().is_some() { refuse() } else { 0 }
}

#[inline(always)]
fn refuse() -> i32 {
    count(Counter::SelfProtectDenials);
    -EPERM
}

/// Whether the filter has the bit of inode number `ino`: only then can
/// `AG_SELF` hold it (under some device). A walk meets mostly inodes that
/// are not AgentGuard's, and learns that without reading their device.
#[inline(always)]
pub fn in_self_filter(ino: u64) -> bool {
    let bit = self_filter_bit(ino);
    match SELF_FILTER.get(bit >> 6) {
        Some(word) => (*word >> (bit & 63)) & 1 != 0,
        // Cannot happen (the index is in range); look the inode up.
        None => true,
    }
}

/// What the walk up from a dentry found: the nearest `AG_SELF` mark (0:
/// none) and how far up it was, whether the walk reached a conclusion (a
/// mark, or the file system's root, within its depth), and the start's
/// parent dentry and inode (read on the way; 0 when unknown, and the
/// inode for a negative dentry).
#[derive(Clone, Copy)]
pub struct SelfWalk {
    pub mark: u32,
    pub depth: u32,
    pub conclusive: bool,
    pub parent: u64,
    pub inode: u64,
}

impl SelfWalk {
    const UNKNOWN: Self = Self { mark: 0, depth: 0, conclusive: false, parent: 0, inode: 0 };

    /// Whether removing, renaming, truncating or linking the start touches
    /// AgentGuard: it lies in a guarded tree, or is a directory above one.
    #[inline(always)]
    pub fn guards_start(&self) -> bool {
        self.mark == self_marks::TREE || (self.mark == self_marks::ANCESTOR && self.depth == 0)
    }

    /// Whether `dir` lies in (or is) a guarded tree, when this walk already
    /// answers it: `dir` is the start's parent and the walk's nearest mark
    /// was above the start (or it found none, conclusively). None: walk
    /// from `dir` to know.
    #[inline(always)]
    pub fn parent_in_tree(&self, dir: u64) -> Option<bool> {
        if dir == 0 || dir != self.parent || !self.conclusive || (self.mark != 0 && self.depth == 0) {
            return None;
        }
        Some(self.mark == self_marks::TREE)
    }
}

/// Walk up from `dentry` (up to [`SELF_WALK_DEPTH`] levels) to the nearest
/// of it and its ancestors that has an `AG_SELF` mark. The walk stays inside
/// the dentry's file system, as every protected file lies in the same file
/// system as the directory that protects it. Per level: the parent and the
/// inode in one read, the inode number in another; the device only for an
/// inode whose filter bit is set.
#[inline(always)]
pub fn self_walk(dentry: u64) -> SelfWalk {
    if dentry == 0 {
        return SelfWalk::UNKNOWN;
    }
    let mut d = dentry;
    let mut start = SelfWalk::UNKNOWN;
    for depth in 0..SELF_WALK_DEPTH as u32 {
        let Ok((up, inode)) = dentry_parent_inode(d) else { return start };
        if depth == 0 {
            (start.parent, start.inode) = (up, inode);
        }
        if inode != 0 {
            if let Ok(ino) = read_u64(inode + off!(inode_ino)) {
                if ino != 0 && in_self_filter(ino) {
                    if let Some((dev, ino)) = inode_id(inode) {
                        let key = FileInodeKey { agent_id: 0, dev, ino };
                        // SAFETY: copied out at once.
                        if let Some(mark) = unsafe { SELF_INODES.get(&key) } {
                            return SelfWalk { mark: *mark, depth, conclusive: true, ..start };
                        }
                    }
                }
            }
        }
        if up == 0 {
            return start;
        }
        if up == d {
            return SelfWalk { depth, conclusive: true, ..start };
        }
        d = up;
    }
    start
}

#[inline(always)]
fn self_mark(dentry: u64) -> u32 {
    self_walk(dentry).mark
}

/// Whether `dentry` lies in (or is) one of AgentGuard's guarded trees.
#[inline(always)]
pub fn in_guarded_tree(dentry: u64) -> bool {
    dentry != 0 && self_mark(dentry) == self_marks::TREE
}

/// Whether the current task is tagged and `dentry` lies in (or is) one of
/// AgentGuard's protected trees. A refusal is counted and recorded as a
/// file event (`op` on the path `build` assembles, decision deny, rule
/// [`RULE_SELF_PROTECT`]).
#[inline(always)]
fn tree_write_denied(tag: Tag, op: FileOp, dentry: u64, build: impl FnOnce(&mut FileScratch) -> Result<Built, ()>) -> bool {
    if dentry == 0 {
        return false;
    }
    if !in_guarded_tree(dentry) {
        return false;
    }
    record_refusal(tag, op, build);
    true
}

/// Count and record a refusal (the event carries the path when it can be built).
#[inline(always)]
fn record_refusal(tag: Tag, op: FileOp, build: impl FnOnce(&mut FileScratch) -> Result<Built, ()>) {
    count(Counter::SelfProtectDenials);
    // The path is built in this CPU's scratch, which a run this one
    // preempted may hold (filepath.rs `take`): then the event goes without
    // it, counted.
    let taken = filepath::claim();
    if !taken {
        count(Counter::FileScratchBusy);
    }
    let Some(s) = filepath::scratch() else {
        if taken {
            filepath::release();
        }
        return;
    };
    let built = if taken { build(s).ok() } else { None };
    record(tag, op, (Decision::Deny, RULE_SELF_PROTECT), Enforcement::Enforced, (approval::NONE, 0, [0; 16]), s, built, false);
    if taken {
        filepath::release();
    }
}

/// Whether `dentry` is named `cgroup.procs` or `cgroup.threads`. The name
/// is compared as two little-endian words of a zeroed 16-byte buffer (no
/// memcmp in BPF).
#[inline(always)]
fn is_cgroup_membership_file(dentry: u64) -> bool {
    let Ok(name) = read_ptr(dentry + off!(dentry_name)) else { return false };
    let mut buf = [0u8; 16];
    // SAFETY: writes at most buf.len() bytes into buf, NUL included.
    let n = unsafe { bpf_probe_read_kernel_str(buf.as_mut_ptr() as *mut c_void, buf.len() as u32, name as *const c_void) };
    if n <= 0 {
        return false;
    }
    let word = |b: &[u8; 16], at: usize| u64::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3], b[at + 4], b[at + 5], b[at + 6], b[at + 7]]);
    let (lo, hi) = (word(&buf, 0), word(&buf, 8));
    let procs = *b"cgroup.procs\0\0\0\0";
    let threads = *b"cgroup.threads\0\0";
    (lo == word(&procs, 0) && hi == word(&procs, 8)) || (lo == word(&threads, 0) && hi == word(&threads, 8))
}

/// security_file_open(file): an open for writing by a tagged process of a
/// file in a protected tree, or of a cgroup's membership file anywhere.
#[lsm(hook = "file_open")]
#[inline(always)]
pub fn protect_file_open(ctx: LsmContext) -> i32 {
    let previous: i32 = ctx.arg(1);
    if previous != 0 {
        return previous;
    }
    let Some(tag) = current_tag() else { return 0 };
    let file: u64 = ctx.arg(0);
    let Ok(mode) = read_u32(file + off!(file_mode)) else { return 0 };
    if mode & FMODE_WRITE == 0 {
        return 0;
    }
    let Ok((mnt, dentry)) = path_parts(file + off!(file_path)) else { return 0 };
    let refused = match self_mark(dentry) {
        self_marks::TREE => true,
        self_marks::CGROUP_ROOT => is_cgroup_membership_file(dentry),
        _ => false,
    };
    if !refused {
        return 0;
    }
    record_refusal(tag, FileOp::Write, |s| filepath::walk(s, mnt, dentry));
    -EPERM
}

/// A new entry `dentry` in directory `dir` (a `struct path *`).
#[inline(always)]
fn create_in(dir: u64, dentry: u64) -> i32 {
    // The tag first: an untagged task (nearly every create on the host)
    // pays the lookup alone.
    let Some(tag) = current_tag() else { return 0 };
    let Ok((_, dir_dentry)) = path_parts(dir) else { return 0 };
    if tree_write_denied(tag, FileOp::Create, dir_dentry, |s| filepath::from_dir_and_dentry(s, dir, dentry)) { -EPERM } else { 0 }
}

/// security_path_mknod(dir, dentry, mode, dev): regular files created by
/// open(O_CREAT) and mknod.
#[lsm(hook = "path_mknod")]
#[inline(always)]
pub fn protect_path_mknod(ctx: LsmContext) -> i32 {
    let previous: i32 = ctx.arg(4);
    if previous != 0 {
        return previous;
    }
    create_in(ctx.arg(0), ctx.arg(1))
}

/// security_path_mkdir(dir, dentry, mode).
#[lsm(hook = "path_mkdir")]
#[inline(always)]
pub fn protect_path_mkdir(ctx: LsmContext) -> i32 {
    let previous: i32 = ctx.arg(3);
    if previous != 0 {
        return previous;
    }
    create_in(ctx.arg(0), ctx.arg(1))
}

/// security_path_symlink(dir, dentry, old_name): a symlink planted among
/// the policies would be read as one.
#[lsm(hook = "path_symlink")]
#[inline(always)]
pub fn protect_path_symlink(ctx: LsmContext) -> i32 {
    let previous: i32 = ctx.arg(3);
    if previous != 0 {
        return previous;
    }
    create_in(ctx.arg(0), ctx.arg(1))
}
