//! File decisions for tagged processes, in BPF-LSM hooks: unlink, rmdir,
//! rename (the source, and a target it would replace), truncation (truncate,
//! ftruncate, and opens with O_TRUNC of an existing file), and new hard
//! links. Loaded only where BPF-LSM is active; elsewhere fileobs.rs observes
//! and contains instead.
//!
//! Truncation goes through two hooks depending on the kernel: up to 6.1,
//! `security_path_truncate` for truncate(2), ftruncate(2) and O_TRUNC opens;
//! from 6.2 on, `security_file_truncate` for the last two (fs/open.c,
//! do_ftruncate; fs/namei.c, handle_truncate) and `security_path_truncate`
//! only for truncate(2). Both are attached where they exist.
//! Paths are assembled by walking the dentry chain (filepath.rs), not with
//! `bpf_d_path`, which 6.1 refuses in these hooks.
//!
//! Every program body is `#[inline(always)]` into the entry point aya's
//! macro generates: 6.1's verifier refuses a separate subprogram that takes
//! the context ("reg type unsupported for arg#0"). The decision itself,
//! which is most of the code, is one global function, `ag_file_decide`,
//! that takes two numbers.
//!
//! An LSM program returns 0 to allow or a negative errno to refuse. When an
//! earlier LSM already refused (the hook's last `ret` argument is non-zero),
//! that verdict is passed through unchanged.
use agentguard_common::{file_ops, grant_kind, Counter, Decision, Enforcement, FileOp, Tag, RULE_SELF_PROTECT};
use aya_ebpf::{macros::lsm, programs::LsmContext};

use aya_ebpf::helpers::generated::bpf_send_signal;

use crate::{
    dircache,
    filejudge::{approval_of, judge, record, record_preempted},
    filepath::{self, FileScratch, Taken},
    kstructs::{off, path_parts},
    selfprotect::{in_guarded_tree, self_walk},
    shared::{count, decide_unreadable, granted, notify_hold},
};

const EPERM: i32 = 1;
const SIGSTOP: u32 = 19;
/// include/uapi/linux/fs.h.
const RENAME_EXCHANGE: u32 = 2;

#[inline(always)]
fn verdict_errno(d: Decision) -> i32 {
    if d.blocks() { -EPERM } else { 0 }
}

/// How [`ag_file_decide`] assembles the path from [`FileScratch::call`]'s
/// `a` and `b`.
mod build {
    /// `a` a directory (`struct path *`), `b` the entry's dentry.
    pub const DIR_AND_DENTRY: u64 = 0;
    /// `a` a whole `struct path *`.
    pub const PATH: u64 = 1;
    /// `a` a `struct vfsmount *` (0: unreadable), `b` the dentry on it.
    pub const WALK: u64 = 2;
}

/// Judge and record one action: the hook's side. The kernel pointers go to
/// [`ag_file_decide`] through the scratch map, which turns them into plain
/// numbers (a global function takes only scalars); everything after that
/// reads through probe reads, as before.
///
/// The hooks look the tag up before they read anything: an untagged task
/// (every process on the host but the agents) pays that lookup alone.
///
/// `cache`: the action's directory (a `struct path *`) where the directory
/// cache's lookup ran first (dircache.rs `allows`): an allowed verdict is
/// then recorded in the cache if the lookup accepted the directory.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "the hook's side of one call; each is a register or a constant")]
fn decide(tag: Tag, op: FileOp, ops: u32, split: bool, how: u64, a: u64, b: u64, guard1: u64, cache: Option<u64>) -> i32 {
    let Some(s) = filepath::scratch() else {
        // The fail-closed choice of shared.rs (a path it cannot read).
        return verdict_errno(decide_unreadable());
    };
    s.call = [a, b, guard1];
    let call = op as u64 | (ops as u64) << 8 | (split as u64) << 16 | how << 24;
    // The kernel checks an LSM program's return value, and a global
    // function's is any number to it.
    if ag_file_decide(dircache::pack(tag), call) != 0 {
        return -EPERM;
    }
    if let Some(dir) = cache {
        // SAFETY: a field of the map value `s` points to, written by
        // `ag_file_decide` (a call the compiler cannot see into).
        let fill = unsafe { core::ptr::read_volatile(&s.dc_fill) };
        if fill != 0 {
            dircache::fill(dircache::pack(tag), ops as u64, dir, fill);
        }
    }
    0
}

/// Judge and record one action on an assembled path. An action on
/// AgentGuard's own files is denied whatever the policy says, with rule
/// [`RULE_SELF_PROTECT`], and recorded by the same code as any other
/// decision: the file acted on (`b`, or `a`'s dentry for [`build::PATH`];
/// in a guarded tree, or a directory above one), and `guard1`, a directory
/// that would receive a new name (in a guarded tree; 0 for none;
/// selfprotect.rs). The file judged by its inode (hard links) is the first
/// one's, read by that walk.
///
/// A global function (exported, never inlined): the kernel verifies it
/// once per program, on its own, whatever the state of its callers, where
/// an inlined or static copy is verified again in every state it is called
/// in. `path_rename` calls it twice (the source, then the target).
/// `tag` is the [`Tag`] (agent id in the low half), `call` the operation,
/// its rule ops, `split` and `how` (bytes 0, 1, 2, 3).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn ag_file_decide(tag: u64, call: u64) -> i32 {
    let tag = Tag { agent_id: tag as u32, session_id: (tag >> 32) as u32 };
    let Some(op) = FileOp::from_u32(call as u32 & 0xff) else {
        return verdict_errno(decide_unreadable());
    };
    let ops = (call >> 8) as u32 & 0xff;
    let split = (call >> 16) & 1 != 0;
    let how = (call >> 24) & 0xff;
    let Some(s) = filepath::scratch() else {
        return verdict_errno(decide_unreadable());
    };
    let [a, b, guard1] = s.call;
    let (mnt, dentry) = match how {
        build::PATH => path_parts(a).unwrap_or((0, 0)),
        build::WALK => (a, b),
        _ => (0, b),
    };
    let first = self_walk(dentry);
    let inode = first.inode;
    // A rename within one directory: the walk up from the source has
    // already been through the target's directory.
    let guarded =
        first.guards_start() || (guard1 != 0 && first.parent_in_tree(guard1).unwrap_or_else(|| in_guarded_tree(guard1)));
    if guarded {
        count(Counter::SelfProtectDenials);
    }
    // For the directory cache (dircache.rs `fill` decides from it, after
    // an allow): what the walk up found. Stored as it is, without a branch:
    // a decision here, or a value live across the long way, made the
    // verifier check the long way again for each outcome (path_truncate
    // 2.5 s -> 8 s on 6.12 under TCG).
    s.dc_walk = first.mark as u64 | (first.depth as u64) << 8 | (first.conclusive as u64) << 16 | (guarded as u64) << 24;
    let built = if how == build::DIR_AND_DENTRY {
        filepath::from_dir_and_dentry(s, a, b)
    } else if mnt == 0 || dentry == 0 {
        Err(())
    } else {
        filepath::walk(s, mnt, dentry)
    };
    let (verdict, built) = match built {
        Ok(b) if guarded => ((Decision::Deny, RULE_SELF_PROTECT), Some(b)),
        Ok(b) => (judge(tag, s, b, ops, inode), Some(b)),
        Err(()) if guarded => ((Decision::Deny, RULE_SELF_PROTECT), None),
        // The fail-closed choice of shared.rs: a tagged task's action on a
        // path the kernel cannot read is decided as an unknown agent's.
        Err(()) => ((decide_unreadable(), 0), None),
    };
    let grant = approval_of(tag, op, verdict, s, built);
    if verdict.0 == Decision::Approve && !granted(grant.0) {
        // Held for a human: stop the whole process at the attempt (the
        // signal takes effect before the syscall returns to it); the daemon
        // freezes the agent's cgroup and lets this process continue into
        // the frozen state, so it sees EPERM only once it is thawed. The
        // signal goes first, so the daemon's SIGCONT always comes after it.
        // SAFETY: signals the current process; no pointers involved.
        unsafe { bpf_send_signal(SIGSTOP) };
        notify_hold(tag, grant_kind::FILE);
    }
    record(tag, op, verdict, Enforcement::Enforced, grant, s, built, split);
    s.dc_fill = match (built, verdict.0) {
        (Some(b), Decision::Allow) => (verdict.1 as u64) << 32 | b.name_off as u64,
        _ => 0,
    };
    if granted(grant.0) {
        return 0;
    }
    verdict_errno(verdict.0)
}

/// A file hook's work for the calling task: nothing for an untagged task,
/// `body` with this CPU's scratch taken for an agent's (given back on every
/// way out), and a refusal (fail closed, counted and recorded) when a run
/// this one preempted holds the scratch (filepath.rs `take`).
#[inline(always)]
fn for_agent(op: FileOp, body: impl FnOnce(Tag, &mut FileScratch) -> i32) -> i32 {
    match filepath::take() {
        Taken::Untagged => 0,
        Taken::Busy(tag) => {
            record_preempted(tag, op, Enforcement::Enforced);
            -EPERM
        }
        Taken::Tagged(tag, s) => {
            // SAFETY: this CPU's scratch, this run's until released below.
            let r = body(tag, unsafe { &mut *s });
            filepath::release_scratch(s);
            r
        }
    }
}

/// An action on `dentry` in directory `dir` (a `struct path *`). With
/// `cached`, a directory where the agent was allowed the same kind of
/// action before answers from the directory cache. `V` gives each hook its
/// own copy of the cache's lookup (dircache.rs).
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "the hook's side of one call; each is a register or a constant")]
fn dir_entry<const V: u32>(ctx: &LsmContext, s: &mut FileScratch, tag: Tag, op: FileOp, ops: u32, dir_arg: usize, dentry_arg: usize, cached: bool) -> i32 {
    let dir: u64 = ctx.arg(dir_arg);
    let dentry: u64 = ctx.arg(dentry_arg);
    let cache = if cached {
        if dircache::allows::<V>(s, tag, ops, dir, dentry) {
            return 0;
        }
        Some(dir)
    } else {
        None
    };
    decide(tag, op, ops, true, build::DIR_AND_DENTRY, dir, dentry, 0, cache)
}

/// security_path_unlink(const struct path *dir, struct dentry *dentry)
#[lsm(hook = "path_unlink")]
#[inline(always)]
pub fn path_unlink(ctx: LsmContext) -> i32 {
    let previous: i32 = ctx.arg(2);
    if previous != 0 {
        return previous;
    }
    for_agent(FileOp::Unlink, |tag, s| dir_entry::<1>(&ctx, s, tag, FileOp::Unlink, FileOp::Unlink.rule_ops(), 0, 1, true))
}

/// security_path_rmdir(const struct path *dir, struct dentry *dentry)
#[lsm(hook = "path_rmdir")]
#[inline(always)]
pub fn path_rmdir(ctx: LsmContext) -> i32 {
    let previous: i32 = ctx.arg(2);
    if previous != 0 {
        return previous;
    }
    for_agent(FileOp::Rmdir, |tag, s| dir_entry::<2>(&ctx, s, tag, FileOp::Rmdir, FileOp::Rmdir.rule_ops(), 0, 1, true))
}

/// security_path_rename(old_dir, old_dentry, new_dir, new_dentry, flags):
/// the source is judged as a rename; an existing target as a truncation of
/// it (its content is replaced), and also as a rename with RENAME_EXCHANGE
/// (it moves to the source's place). The loader checks the hook has these
/// five arguments on this kernel (BTF) before loading.
#[lsm(hook = "path_rename")]
#[inline(always)]
pub fn path_rename(ctx: LsmContext) -> i32 {
    let previous: i32 = ctx.arg(5);
    if previous != 0 {
        return previous;
    }
    for_agent(FileOp::Rename, |tag, s| rename(&ctx, s, tag))
}

#[inline(always)]
fn rename(ctx: &LsmContext, s: &mut FileScratch, tag: Tag) -> i32 {
    // Nothing may be moved into AgentGuard's directories either: the
    // target directory guards the source's rename.
    let new_dir: u64 = ctx.arg(2);
    let new_dentry: u64 = ctx.arg(3);
    let (dir, dentry): (u64, u64) = (ctx.arg(0), ctx.arg(1));
    let ops = FileOp::Rename.rule_ops();
    // Within one directory, the cache's answer for it covers the target
    // directory too (an entry is filled only for a directory that is not
    // in a guarded tree of AgentGuard's: at most one above it). Across
    // directories, the
    // long way, which also checks the target directory, and nothing
    // recorded.
    let same_dir = dircache::same_path(dir, new_dir);
    let source = if same_dir && dircache::allows::<3>(s, tag, ops, dir, dentry) {
        0
    } else {
        if !same_dir {
            dircache::forget();
        }
        let new_dir_dentry = path_parts(new_dir).map(|(_, d)| d).unwrap_or(0);
        decide(tag, FileOp::Rename, ops, true, build::DIR_AND_DENTRY, dir, dentry, new_dir_dentry, Some(dir))
    };
    if source != 0 {
        return source;
    }
    // A plain load (the hook's argument is a typed pointer), not a probe
    // read: no helper call on every rename.
    if !dircache::has_inode(new_dentry) {
        return 0;
    }
    let flags: u32 = ctx.arg(4);
    let ops = if flags & RENAME_EXCHANGE != 0 {
        file_ops::TRUNCATE | file_ops::RENAME
    } else {
        FileOp::RenameOver.rule_ops()
    };
    dir_entry::<0>(ctx, s, tag, FileOp::RenameOver, ops, 2, 3, false)
}

/// security_path_truncate(const struct path *path)
#[lsm(hook = "path_truncate")]
#[inline(always)]
pub fn path_truncate(ctx: LsmContext) -> i32 {
    let previous: i32 = ctx.arg(1);
    if previous != 0 {
        return previous;
    }
    for_agent(FileOp::Truncate, |tag, _| {
        let p: u64 = ctx.arg(0);
        decide(tag, FileOp::Truncate, FileOp::Truncate.rule_ops(), false, build::PATH, p, 0, 0, None)
    })
}

/// security_file_truncate(struct file *file), 6.2+: ftruncate and O_TRUNC opens.
#[lsm(hook = "file_truncate")]
#[inline(always)]
pub fn file_truncate(ctx: LsmContext) -> i32 {
    let previous: i32 = ctx.arg(1);
    if previous != 0 {
        return previous;
    }
    for_agent(FileOp::Truncate, |tag, _| {
        let file: u64 = ctx.arg(0);
        let (mnt, dentry) = path_parts(file + off!(file_path)).unwrap_or((0, 0));
        decide(tag, FileOp::Truncate, FileOp::Truncate.rule_ops(), false, build::WALK, mnt, dentry, 0, None)
    })
}

/// security_path_link(struct dentry *old_dentry, const struct path *new_dir,
/// struct dentry *new_dentry): a new name for an existing file is judged
/// on that file, as a truncation (the new name could truncate it). Links
/// never cross mounts, so the file's mount is `new_dir`'s.
#[lsm(hook = "path_link")]
#[inline(always)]
pub fn path_link(ctx: LsmContext) -> i32 {
    let previous: i32 = ctx.arg(3);
    if previous != 0 {
        return previous;
    }
    for_agent(FileOp::Link, |tag, _| {
        let old_dentry: u64 = ctx.arg(0);
        let new_dir: u64 = ctx.arg(1);
        // A second name would let an agent write a protected file from
        // outside AgentGuard's directories; a new name among them is a
        // planted file.
        let (mnt, new_dir_dentry) = path_parts(new_dir).unwrap_or((0, 0));
        decide(tag, FileOp::Link, FileOp::Link.rule_ops(), false, build::WALK, mnt, old_dentry, new_dir_dentry, None)
    })
}

/// Does nothing; `doctor` loads it to prove BPF-LSM programs load and attach here.
#[lsm(hook = "path_unlink")]
#[inline(always)]
pub fn lsm_probe(ctx: LsmContext) -> i32 {
    ctx.arg(2)
}
