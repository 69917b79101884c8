//! Assembling the full path of a file action in a per-CPU scratch buffer: a
//! walk up the dentry and mount chain (a hook's directory plus the entry's
//! name, a hook's whole path, a descriptor, the working directory), or a
//! syscall's user string joined to its base directory (the fallback).
//!
//! The buffer is laid out as an LPM-trie key ([`agentguard_common::FilePrefixKey`]
//! behind its prefix length) so the judge looks the path up in place.
//! Writes land at `offset & PATH_MASK` with at most `PATH_CHUNK` bytes, so
//! they always stay inside the buffer, which the verifier checks.
use core::{
    ffi::c_void,
    intrinsics::{atomic_cxchg, AtomicOrdering},
};

use agentguard_common::{
    limits::{FILE_PATH_MAX, FILE_WALK_DEPTH},
    Tag,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{bpf_loop, bpf_probe_read_kernel_str, bpf_probe_read_user_str},
    },
    macros::map,
    maps::PerCpuArray,
};

use crate::{
    kstructs::{dentry_up, mount_frame, off, read_ptr},
    shared::{hinted, tag_epoch, tag_of},
};

/// Longest path the judge looks at (NUL excluded).
pub const PATH_LIMIT: usize = FILE_PATH_MAX - 1;
const PATH_MASK: usize = FILE_PATH_MAX - 1;
const PATH_CHUNK: u32 = FILE_PATH_MAX as u32;

#[repr(C)]
pub struct FileScratch {
    /// LPM key: prefix length in bits, then id and path (the key's data).
    pub prefix_len: u32,
    pub id_be: [u8; 4],
    /// Twice the longest path, so a masked offset plus a chunk always fits.
    pub path: [u8; FILE_PATH_MAX * 2],
    /// Dentry name pointers collected by [`walk`], leaf first.
    pub comps: [u64; FILE_WALK_DEPTH],
    /// Name keys the judge's scan queued for lookup.
    pub key_kind: [u32; NAME_KEYS],
    pub key_hash: [u64; NAME_KEYS],
    /// The judge's name scan, carried between `bpf_loop` iterations.
    pub scan: Scan,
    /// The dentry walk, likewise.
    pub walk: Walk,
    /// A file hook's kernel pointers for `files::ag_file_decide`: as numbers
    /// read back from the map, they are scalars to the verifier, which a
    /// global function's arguments must be.
    pub call: [u64; 3],
    /// A directory cache entry being filled (dircache.rs): too large for
    /// the stack.
    pub dir_entry: agentguard_common::DirCacheEntry,
    /// 1 when `dir_entry` holds the directory of the action being judged.
    pub dir_ok: u64,
    /// The directory cache's key, and what its lookup carries from the
    /// entry (or the agent) to the name check (dircache.rs `lookup`).
    pub dc_key: agentguard_common::DirCacheKey,
    pub dc_cached: u64,
    pub dc_dir_hash: u64,
    pub dc_flags: u32,
    pub dc_prefix_lens: u32,
    pub dc_generation: u32,
    pub dc_epoch: u32,
    /// The entry's name's hashes (dircache.rs `scan`): basename, pair,
    /// three tails, four basename prefixes.
    pub dc_hashes: [u64; 9],
    pub dc_variant: u32,
    /// What `files::ag_file_decide` leaves for the directory cache's `fill`:
    /// the allowing rule (high half) and the directory's length with its
    /// `/`; 0: nothing to record.
    pub dc_fill: u64,
    /// What `files::ag_file_decide`'s walk up for self-protection found:
    /// its mark (byte 0), depth (byte 1), whether it was conclusive (bit
    /// 16), and whether the action touched AgentGuard's files (bit 24).
    pub dc_walk: u64,
    /// The last directory cache entry that held on this CPU, and its key
    /// (dircache.rs `begin`): the next action in the same directory is
    /// answered from here, without the cache's hash lookup. A copy, held
    /// to the same checks as the cache's own entry each time.
    pub dc_last_key: agentguard_common::DirCacheKey,
    pub dc_last: agentguard_common::DirCacheEntry,
    /// The last tag a file hook looked up on this CPU ([`file_tag`]): the
    /// task id, the tag epoch it was read at, and the tag (agent id in the
    /// low half). `memo_ok` 0: none.
    pub memo_tid: u32,
    pub memo_ok: u32,
    pub memo_epoch: u64,
    pub memo_tag: u64,
    /// 1 while a program run on this CPU holds the rest ([`take`]).
    pub busy: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Walk {
    pub mnt: u64,
    pub d: u64,
    pub n: u64,
    pub len: u64,
    pub name_off: u64,
    pub err: u64,
    /// The current mount's root dentry, parent mount and mountpoint, read
    /// together once per mount (root 0: not yet).
    pub root: u64,
    pub mparent: u64,
    pub mpoint: u64,
}

/// State of the name scan (filejudge.rs). It lives in the map value, not
/// on the stack, so the verifier sees unknown values in the loop callback
/// and checks it once for any iteration, on every kernel.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Scan {
    /// The agent's `agent_flags`: which name kinds to queue.
    pub flags: u64,
    pub agent_id: u64,
    pub ops: u64,
    /// The winning rule so far (filejudge.rs `Best`).
    pub best_rule: u64,
    pub best_decision: u64,
    /// Name keys queued in `key_kind`/`key_hash`.
    pub nkeys: u64,
    /// The previous component's hash (the FNV state after its bytes), and
    /// how many components have ended: a pair's hash continues from it
    /// with `/`.
    pub prev: u64,
    pub ncomps: u64,
    pub pair: u64,
    pub len: u64,
    pub prefix_lens: u64,
    pub h: u64,
    pub clen: u64,
    /// Where the current component starts; at the end of the first pass,
    /// where the basename starts and its length (0: the path ends in `/`).
    pub comp_start: u64,
    pub base_len: u64,
    pub t: [u64; 3],
    pub tails: u64,
    pub p: [u64; 4],
    pub prefixes: u64,
}

/// Name keys one path can queue: components and pairs (32 each) and the
/// basename's own (at most 9), rounded up to a power of two for masking.
pub const NAME_KEYS: usize = 128;

#[map(name = "AG_FILE_SCRATCH")]
static FILE_SCRATCH: PerCpuArray<FileScratch> = PerCpuArray::with_max_entries(1, 0);

/// A path in the scratch buffer: `len` bytes (a NUL follows), the last
/// component starting at `name_off` when the builder knows it (0 otherwise).
#[derive(Clone, Copy)]
pub struct Built {
    pub len: usize,
    pub name_off: usize,
}

#[inline(always)]
pub fn scratch() -> Option<&'static mut FileScratch> {
    // SAFETY: per-CPU, and only used by a run that took it ([`take`],
    // [`claim`]): a run that preempts it finds it taken.
    FILE_SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// What a file program finds for the calling task ([`take`]).
pub enum Taken {
    /// Not an agent's: nothing to judge.
    Untagged,
    /// An agent's, and this CPU's scratch is this run's until [`release_scratch`]:
    /// the scratch, handed on so the hook's cheap way (dircache.rs) does
    /// not look it up again.
    Tagged(Tag, *mut FileScratch),
    /// An agent's, and another run on this CPU holds the scratch: one this
    /// run preempted mid-way (a kernel with full preemption runs BPF-LSM
    /// programs preemptibly, with only migration disabled; the fallback's
    /// syscall tracepoint programs take the scratch the same way, in case
    /// a kernel runs them so too). The action cannot be judged here without
    /// overwriting that run's path, cache key and memo; it fails closed.
    Busy(Tag),
}

/// The calling task's tag for a file program, with this CPU's scratch taken
/// for the rest of the run when the task is an agent's (untagged tasks, the
/// host's every other process, never touch it). Every [`Taken::Tagged`]
/// must be followed by [`release_scratch`] on every way out.
#[inline(always)]
pub fn take() -> Taken {
    let tid = bpf_get_current_pid_tgid() as u32;
    if !hinted(tid) {
        return Taken::Untagged;
    }
    let Some(s) = claim_scratch() else {
        return match tag_of(tid) {
            Some(t) => Taken::Busy(t),
            None => Taken::Untagged,
        };
    };
    // SAFETY: the scratch this run just took.
    match file_tag(unsafe { &mut *s }, tid) {
        Some(t) => Taken::Tagged(t, s),
        None => {
            release_scratch(s);
            Taken::Untagged
        }
    }
}

/// Take this CPU's scratch for this run ([`take`], for a program that has
/// the tag already): false while another run holds it.
#[inline(always)]
pub fn claim() -> bool {
    claim_scratch().is_some()
}

/// The scratch's `busy` word is taken with one compare-and-exchange,
/// atomic against a preemption on this CPU; the scratch is per CPU, so no
/// other CPU ever contends.
///
/// One scratch per CPU: a second one, for a run that preempted another,
/// made `scratch()` choose between the two at each call, and the host's
/// 6.18 verifier took 3.5 times as long over the fallback's programs
/// (their loops call it at every step).
#[inline(always)]
fn claim_scratch() -> Option<*mut FileScratch> {
    let p = FILE_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: a field of the per-CPU map value `p` points to.
    let (_, taken) = unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(core::ptr::addr_of_mut!((*p).busy), 0, 1)
    };
    taken.then_some(p)
}

/// Give this CPU's scratch back ([`take`], [`claim`]). A plain store: only
/// a run on this CPU ever reads the word, and this run's writes to the
/// scratch come before it in program order.
#[inline(always)]
pub fn release() {
    if let Some(p) = FILE_SCRATCH.get_ptr_mut(0) {
        release_scratch(p);
    }
}

/// [`release`] with the scratch at hand ([`Taken::Tagged`]).
#[inline(always)]
pub fn release_scratch(p: *mut FileScratch) {
    // SAFETY: a field of the per-CPU map value `p` points to.
    unsafe { core::ptr::write_volatile(core::ptr::addr_of_mut!((*p).busy), 0) };
}

/// The calling task's tag, as [`current_tag`](crate::shared::current_tag)
/// gives it, for the file hooks: remembered in the scratch `s` this run
/// took ([`take`]) with the task id and the tag epoch it was read at, so
/// an agent's run of file actions looks its tag up once. The epoch changes after every tag
/// written or removed, by the kernel or the daemon (shared.rs
/// `tag_changed`, taghint.rs), and it is read before the tag: a tag
/// changed after the read is never remembered as current.
#[inline(always)]
fn file_tag(s: &mut FileScratch, tid: u32) -> Option<Tag> {
    let epoch = tag_epoch();
    // SAFETY (volatile accesses): fields of the map value `s` points to,
    // this run's while it holds it.
    unsafe {
        if core::ptr::read_volatile(&s.memo_ok) == 1
            && core::ptr::read_volatile(&s.memo_tid) == tid
            && core::ptr::read_volatile(&s.memo_epoch) == epoch
        {
            let t = core::ptr::read_volatile(&s.memo_tag);
            return Some(Tag { agent_id: t as u32, session_id: (t >> 32) as u32 });
        }
    }
    let tag = tag_of(tid);
    if let Some(t) = tag {
        s.memo_tid = tid;
        s.memo_epoch = epoch;
        s.memo_tag = t.agent_id as u64 | (t.session_id as u64) << 32;
        s.memo_ok = 1;
    }
    tag
}

#[inline(always)]
fn put(s: &mut FileScratch, at: usize, byte: u8) {
    if let Some(b) = s.path.get_mut(at & PATH_MASK) {
        *b = byte;
    }
}

#[inline(always)]
fn at_ptr(s: &mut FileScratch, at: usize) -> *mut core::ffi::c_void {
    // SAFETY: masked offset inside the buffer (half its size).
    unsafe { s.path.as_mut_ptr().add(at & PATH_MASK).cast() }
}

/// Append the kernel string at `src` at `at`; returns the new length.
#[inline(always)]
fn append_kernel_str(s: &mut FileScratch, at: usize, src: u64) -> Result<usize, ()> {
    // SAFETY: destination bounded as above; src is a kernel address.
    let n = unsafe { bpf_probe_read_kernel_str(at_ptr(s, at), PATH_CHUNK, src as *const _) };
    if n <= 0 {
        return Err(());
    }
    Ok(clamp(at + n as usize - 1, s))
}

#[inline(always)]
fn clamp(len: usize, s: &mut FileScratch) -> usize {
    let len = if len > PATH_LIMIT { PATH_LIMIT } else { len };
    put(s, len, 0);
    len
}

/// `dir` (a `struct path *`) walked, then `/`, then the name of `dentry`.
///
/// `bpf_d_path` would do the walk, but 6.1 refuses it in the path hooks
/// (they joined the kernel's sleepable-hook list, which gates the helper,
/// only later: kernel/bpf/bpf_lsm.c), and `file_truncate` and the syscall
/// tracepoints may not use it on any kernel. One walker serves them all.
#[inline(always)]
pub fn from_dir_and_dentry(s: &mut FileScratch, dir: u64, dentry: u64) -> Result<Built, ()> {
    let (mnt, d) = crate::kstructs::path_parts(dir)?;
    let built = walk(s, mnt, d)?;
    append_name(s, built.len, dentry)
}

#[inline(always)]
fn append_name(s: &mut FileScratch, dir_len: usize, dentry: u64) -> Result<Built, ()> {
    let name_off = if dir_len == 1 {
        1
    } else {
        put(s, dir_len, b'/');
        dir_len + 1
    };
    let name = read_ptr(dentry + off!(dentry_name))?;
    let len = append_kernel_str(s, name_off, name)?;
    Ok(Built { len, name_off })
}

/// Walk from `dentry` up to the root of the mount namespace, crossing
/// mounts as `d_path` does (fs/d_path.c, prepend_path), then write the
/// components root first. Paths deeper than [`FILE_WALK_DEPTH`] keep their
/// innermost components. Both passes are `bpf_loop` callbacks with their
/// state in the map value, so the verifier checks each body once.
#[inline(always)]
pub fn walk(s: &mut FileScratch, vfsmnt: u64, dentry: u64) -> Result<Built, ()> {
    let start = Walk { mnt: vfsmnt - off!(mount_mnt), d: dentry, n: 0, len: 0, name_off: 1, err: 0, root: 0, mparent: 0, mpoint: 0 };
    // The callbacks reach the state through their own map lookup, which
    // the compiler cannot see: hand it over and back with volatile
    // accesses, or it would keep the values it last wrote through `s`.
    // SAFETY: a field of the map value `s` points to.
    unsafe { core::ptr::write_volatile(&mut s.walk, start) };
    // SAFETY: static callbacks; their state is in the map value.
    unsafe {
        bpf_loop((FILE_WALK_DEPTH + 8) as u32, walk_up as *mut c_void, core::ptr::null_mut(), 0);
    }
    // SAFETY: as above.
    let w = unsafe { core::ptr::read_volatile(&s.walk) };
    if w.err != 0 {
        return Err(());
    }
    if w.n == 0 {
        put(s, 0, b'/');
        return Ok(Built { len: clamp(1, s), name_off: 1 });
    }
    // SAFETY: as above.
    unsafe {
        bpf_loop(FILE_WALK_DEPTH as u32, walk_down as *mut c_void, core::ptr::null_mut(), 0);
    }
    // SAFETY: as above.
    let w = unsafe { core::ptr::read_volatile(&s.walk) };
    if w.err != 0 {
        return Err(());
    }
    Ok(Built { len: w.len as usize & PATH_MASK, name_off: w.name_off as usize & PATH_MASK })
}

/// One step up: to the parent dentry, or across a mount to its mountpoint.
/// A mount's root, parent and mountpoint are read together once per mount,
/// a dentry's parent and name in one read (kstructs.rs): one probe read per
/// level and one per mount.
unsafe extern "C" fn walk_up(_i: u64, _ctx: *mut c_void) -> i64 {
    let Some(s) = scratch() else { return 1 };
    let (mnt, d, n) = (s.walk.mnt, s.walk.d, s.walk.n);
    if s.walk.root == 0 {
        let Ok((root, parent, mountpoint)) = mount_frame(mnt) else {
            s.walk.err = 1;
            return 1;
        };
        (s.walk.root, s.walk.mparent, s.walk.mpoint) = (root, parent, mountpoint);
    }
    let (root, parent, mountpoint) = (s.walk.root, s.walk.mparent, s.walk.mpoint);
    if d == root {
        if parent == 0 || parent == mnt {
            return 1;
        }
        if mountpoint == 0 {
            s.walk.err = 1;
            return 1;
        }
        s.walk.mnt = parent;
        s.walk.d = mountpoint;
        s.walk.root = 0;
        return 0;
    }
    let Ok((up, name)) = dentry_up(d) else {
        s.walk.err = 1;
        return 1;
    };
    if up == 0 {
        s.walk.err = 1;
        return 1;
    }
    if up == d || n >= FILE_WALK_DEPTH as u64 {
        return 1;
    }
    if name == 0 {
        s.walk.err = 1;
        return 1;
    }
    if let Some(slot) = s.comps.get_mut(n as usize & (FILE_WALK_DEPTH - 1)) {
        *slot = name;
    }
    s.walk.n = n + 1;
    s.walk.d = up;
    0
}

/// One component down, root first: `/` and its name.
unsafe extern "C" fn walk_down(i: u64, _ctx: *mut c_void) -> i64 {
    let Some(s) = scratch() else { return 1 };
    let (n, len) = (s.walk.n, s.walk.len as usize);
    if i >= n || len >= PATH_LIMIT {
        return 1;
    }
    let Some(&name) = s.comps.get((n - 1 - i) as usize & (FILE_WALK_DEPTH - 1)) else { return 1 };
    put(s, len, b'/');
    match append_kernel_str(s, len + 1, name) {
        Ok(end) => {
            s.walk.name_off = (len + 1) as u64;
            s.walk.len = end as u64;
            0
        }
        Err(()) => {
            s.walk.err = 1;
            1
        }
    }
}

/// The path a syscall names: the user string at `user`, joined to the
/// directory of descriptor `dfd` (AT_FDCWD: the working directory) when it
/// is relative. Components are not resolved (no `..`, no symlinks): the
/// fallback judges the path as given (docs/architecture.md).
#[inline(always)]
pub fn from_user(s: &mut FileScratch, dfd: i64, user: u64) -> Result<Built, ()> {
    const AT_FDCWD: i64 = -100;
    // SAFETY: one byte of user memory; a bad pointer makes it fail.
    let lead: Result<u8, _> = unsafe { aya_ebpf::helpers::bpf_probe_read_user(user as *const u8) };
    let lead = lead.map_err(|_| ())?;
    let at = if lead == b'/' {
        0
    } else {
        let base = if dfd == AT_FDCWD {
            crate::kstructs::cwd()?
        } else {
            let file = crate::kstructs::fd_file(dfd as u64)?;
            crate::kstructs::path_parts(file + off!(file_path))?
        };
        let built = walk(s, base.0, base.1)?;
        if built.len == 1 {
            1
        } else {
            put(s, built.len, b'/');
            built.len + 1
        }
    };
    // SAFETY: destination bounded as in append_kernel_str; src is user memory.
    let n = unsafe { bpf_probe_read_user_str(at_ptr(s, at), PATH_CHUNK, user as *const _) };
    if n <= 0 {
        return Err(());
    }
    let mut len = clamp(at + n as usize - 1, s);
    // "dir/" names dir.
    if len > 1 && s.path.get((len - 1) & PATH_MASK) == Some(&b'/') {
        len -= 1;
        put(s, len, 0);
    }
    Ok(Built { len, name_off: 0 })
}
