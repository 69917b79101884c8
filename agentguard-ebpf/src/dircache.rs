//! The directory cache: a tagged agent's unlink, rmdir or rename in a
//! directory where an earlier action of the same kind was allowed is
//! judged without walking the directory's path again (bench B1 tagged;
//! docs/architecture.md, "The directory cache").
//!
//! The long way (files.rs `decide`) fills an entry when it allowed an
//! action (`allow`, not `audit`, which logs every action) and nothing about
//! the entry's own name took part: no name key of the agent has the name's
//! filter bit, no prefix key lies below the directory (`AG_FILE_DIRMARK`),
//! and the self-protection walk found none of AgentGuard's marks above it.
//! Then every action on another entry of that directory gets the same
//! verdict, unless that entry's own name, inode or links say otherwise,
//! which [`hit`] checks each time.
//!
//! An entry holds while
//! - the daemon has not written any file rule, default, workspace or mark
//!   since ([`HookFlag::FileGeneration`], bumped after every such write);
//! - no directory anywhere was renamed and no mount moved since
//!   ([`HookFlag::FileEpoch`], bumped by the `fexit` programs below *after*
//!   the change, so a path walked before it is never stamped with the
//!   value after it);
//! - the directory is the same one: its dentry still has the same inode
//!   (pointer, number, generation), and the same parents and names up to
//!   its mount's root (a dentry freed and reused for another directory
//!   differs in one of them).
//!
//! Every read here is a plain load through a pointer the kernel typed
//! (BTF): the verifier turns each into a guarded load, no helper call,
//! which is what makes a hit cheap. Offsets come from `KERNEL_OFFSETS` in
//! .rodata, which the verifier reads as constants.
use agentguard_common::{
    agent_flags, limits, name_kind, self_marks, Counter, DirCacheEntry, DirCacheKey, FilePrefixKey, FileQuickFilter,
    HookFlag, Tag,
    FNV64_OFFSET, FNV64_PRIME, RUN_SESSION_BIT,
};
use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    macros::{fexit, map},
    maps::{lpm_trie::Key, HashMap, LpmTrie, LruHashMap},
    programs::FExitContext,
};

use crate::{
    filejudge::{name_filter_bit, NAME_KINDS},
    filepath::{self, FileScratch},
    kstructs::off,
    selfprotect::in_self_filter,
    shared::{agent_config, count, recording_failed, HOOKS},
};

#[map(name = "AG_FILE_DIRCACHE")]
static DIRCACHE: LruHashMap<DirCacheKey, DirCacheEntry> = LruHashMap::with_max_entries(limits::MAX_DIRCACHE, 0);

#[map(name = "AG_FILE_DIRMARK")]
static DIRMARK: LpmTrie<FilePrefixKey, u32> = LpmTrie::with_max_entries(limits::MAX_FILE_DIRMARKS, 0);

#[map(name = "AG_FILE_QUICK")]
static QUICK: HashMap<u32, FileQuickFilter> = HashMap::with_max_entries(limits::MAX_AGENTS, 0);

const S_IFMT: u16 = 0o170_000;
const S_IFDIR: u16 = 0o040_000;
const S_IFREG: u16 = 0o100_000;

/// The longest name hashed from the dentry itself (its inline name, four
/// words): longer names take the long way.
const INLINE_NAME: u64 = 31;

/// A load at `off` from `base`, a pointer the kernel typed (a hook's
/// argument, or a pointer member loaded from one): a plain load the
/// verifier checks against BTF and guards against a bad address (it reads
/// 0 then).
#[inline(always)]
fn ld<T>(base: u64, off: u64) -> T {
    // SAFETY: see above; the verifier admits only loads inside the member
    // at `off` of the struct `base` points to.
    unsafe { core::ptr::read_volatile((base + off) as *const T) }
}

/// The generation and epoch now. Generation 0: the cache is off (the
/// daemon writes a nonzero one only once every `fexit` program below is
/// attached, and this kernel's BTF gave the offsets).
#[derive(Clone, Copy)]
pub struct Stamp {
    generation: u32,
    epoch: u32,
}

#[inline(always)]
fn hook(flag: HookFlag) -> u32 {
    match HOOKS.get_ptr(flag as u32) {
        // SAFETY: an array slot; the programs add to it atomically.
        Some(p) => unsafe { core::ptr::read_volatile(p) },
        None => 0,
    }
}

#[inline(always)]
pub fn stamp() -> Stamp {
    // Without these offsets (0: this kernel's BTF has no such member) the
    // loads below could not be verified: the verifier sees the constant
    // and never follows the branch that would make them.
    if off!(dentry_iname) == 0 || off!(inode_generation) == 0 || off!(renamedata_old) == 0 {
        return Stamp { generation: 0, epoch: 0 };
    }
    // The epoch first: a change after it makes the entry stale, never the
    // other way round.
    let epoch = hook(HookFlag::FileEpoch);
    Stamp { generation: hook(HookFlag::FileGeneration), epoch }
}

/// The hash of a tail that has only its dot so far.
const DOT: u64 = (FNV64_OFFSET ^ b'.' as u64).wrapping_mul(FNV64_PRIME);

/// `x`, which the compiler cannot see through: masks made from it stay
/// masks instead of becoming branches (the BPF target has no
/// conditional move).
#[inline(always)]
fn opaque(x: u64) -> u64 {
    let mut v = 0u64;
    // SAFETY: a local.
    unsafe {
        core::ptr::write_volatile(&mut v, x);
        core::ptr::read_volatile(&v)
    }
}

#[inline(always)]
fn step(h: u64, c: u8) -> u64 {
    (h ^ c as u64).wrapping_mul(FNV64_PRIME)
}

/// A dentry's `d_name.hash_len` (the name's length in the high half, its
/// hash in the low), read as its two 32-bit halves: 6.1's verifier takes
/// the first member of the union `hash_len` is in (`hash`, 4 bytes) and
/// refuses an 8-byte load there. The offset is kept from the compiler,
/// which would otherwise load at `d_name.name` with a displacement of -8:
/// 6.1 read 0 through such a load (session 18).
#[inline(always)]
fn hash_len(d: u64) -> u64 {
    hash_len_at(d, qstr_off())
}

/// The offset of `d_name` in a dentry (its `hash_len`), kept from the
/// compiler ([`hash_len`]).
#[inline(always)]
fn qstr_off() -> u64 {
    opaque(off!(dentry_name) - 8)
}

/// [`hash_len`] with [`qstr_off`] at hand.
#[inline(always)]
fn hash_len_at(d: u64, qstr: u64) -> u64 {
    let hash: u32 = ld(d, qstr);
    let len: u32 = ld(d, qstr + 4);
    (len as u64) << 32 | hash as u64
}

/// A dentry's `d_name.len` alone (the high half of [`hash_len`]): one load.
#[inline(always)]
fn name_len(d: u64) -> u64 {
    let qstr = opaque(off!(dentry_name) - 8);
    let len: u32 = ld(d, qstr + 4);
    len as u64
}

/// Whether the dentry keeps its name inline (this kernel's BTF gave the
/// inline array, and it holds [`INLINE_NAME`] bytes and its NUL).
#[inline(always)]
fn has_inline_names() -> bool {
    off!(dentry_iname) != 0 && off!(dentry_iname_len) >= 32
}

/// A dentry's name when it has at most [`INLINE_NAME`] bytes (the dentry
/// then holds it inline): its length and the four words that hold it.
#[inline(always)]
fn inline_name(d: u64) -> Option<(u64, [u64; 4])> {
    if !has_inline_names() {
        return None;
    }
    let iname = off!(dentry_iname);
    let len = name_len(d);
    if len == 0 || len > INLINE_NAME {
        return None;
    }
    // A name shorter than the inline array is always kept in it
    // (fs/dcache.c: __d_alloc, copy_name and swap_names), so its bytes are
    // read from the dentry itself. (Comparing `d_name.name` with the
    // array's address would be the direct check, but the compiler then
    // reads the bytes through the name pointer, a plain number to the
    // verifier.)
    Some((len, [ld(d, iname), ld(d, iname + 8), ld(d, iname + 16), ld(d, iname + 24)]))
}

/// The name scan's hash of a dentry's name (filejudge.rs).
#[inline(always)]
fn name_hash(d: u64) -> Option<u64> {
    let (len, w) = inline_name(d)?;
    let mut h = FNV64_OFFSET;
    'name: {
        macro_rules! byte {
            ($k:literal) => {
                if $k >= len {
                    break 'name;
                }
                h = step(h, (w[$k / 8] >> (8 * ($k % 8))) as u8);
            };
        }
        byte!(0); byte!(1); byte!(2); byte!(3); byte!(4); byte!(5); byte!(6); byte!(7);
        byte!(8); byte!(9); byte!(10); byte!(11); byte!(12); byte!(13); byte!(14); byte!(15);
        byte!(16); byte!(17); byte!(18); byte!(19); byte!(20); byte!(21); byte!(22); byte!(23);
        byte!(24); byte!(25); byte!(26); byte!(27); byte!(28); byte!(29); byte!(30);
    }
    Some(h)
}

/// Whether the entry `e`'s own name is clear of the agent's name keys by
/// its quick filter `q` (two bit reads; [`FileQuickFilter::clear`]). Not
/// clear: [`scan`] hashes the name for every key kind, as the long way
/// would.
#[inline(always)]
fn quick_clear(q: &FileQuickFilter, e: u64) -> bool {
    if !has_inline_names() {
        return false;
    }
    let len = name_len(e);
    if len < 2 || len > INLINE_NAME {
        return false;
    }
    // Only the words that hold the first and the last two bytes are read
    // (each read of kernel memory is a guarded load; a short name has all
    // three in the first word). `end` is the last byte's index, 1..=30.
    let iname = off!(dentry_iname);
    let w0: u64 = ld(e, iname);
    let end = len - 1;
    let (prev, last) = if end < 8 {
        ((w0 >> ((end - 1) * 8)) as u8, (w0 >> (end * 8)) as u8)
    } else {
        let at = |i: u64| -> u64 {
            match i {
                0 => w0,
                1 => ld(e, iname + 8),
                2 => ld(e, iname + 16),
                _ => ld(e, iname + 24),
            }
        };
        let (wi, sh) = (end >> 3, (end & 7) * 8);
        let cur = at(wi);
        let prev = if sh != 0 { (cur >> (sh - 8)) as u8 } else { (at(wi - 1) >> 56) as u8 };
        (prev, (cur >> sh) as u8)
    };
    q.clear(len as usize, w0 as u8, prev, last)
}

/// Step 2 of a lookup ([`begin`], [`scan`], [`finish`]): hash entry
/// `e`'s own name for every name key the name scan would queue for it
/// (the component, basename, suffix, basename-prefix and pair keys;
/// filejudge.rs) into the scratch map. Returns 0 when the name cannot be
/// hashed here (longer than [`INLINE_NAME`], or more than four basename
/// prefix lengths): the long way then, and nothing is recorded.
///
/// Never inlined, and its hashes go through the scratch map to
/// [`finish`]: with the checks after the loop in the same function, the
/// verifier checked them again for each length the loop can stop at.
#[inline(never)]
pub fn scan<const V: u32>(e: u64) -> u64 {
    let Some(s) = filepath::scratch() else { return 0 };
    unsafe { core::ptr::write_volatile(&mut s.dc_variant, V) };
    // SAFETY (volatile reads): fields of the map value `s` points to.
    let flags = unsafe { core::ptr::read_volatile(&s.dc_flags) };
    if flags & NAME_KINDS == 0 {
        return 1;
    }
    let prefix_lens = unsafe { core::ptr::read_volatile(&s.dc_prefix_lens) };
    let dir_hash = unsafe { core::ptr::read_volatile(&s.dc_dir_hash) };
    let Some((len, w)) = inline_name(e) else { return 0 };
    let prefixes = if flags & agent_flags::FILE_BASE_PREFIX != 0 { prefix_lens } else { 0 };
    // At most four prefix lengths are kept (as the name scan keeps the
    // four longest); with more, the long way.
    let mut more = prefixes;
    more &= more.wrapping_sub(1);
    more &= more.wrapping_sub(1);
    more &= more.wrapping_sub(1);
    more &= more.wrapping_sub(1);
    if more != 0 {
        return 0;
    }
    // The prefix hashes kept (the empty name's hash where none: checked
    // too, it can only send an action the long way).
    let (mut q0, mut q1, mut q2, mut q3) = (FNV64_OFFSET, FNV64_OFFSET, FNV64_OFFSET, FNV64_OFFSET);
    let mut h = FNV64_OFFSET;
    let mut pair = step(dir_hash, b'/');
    // The tails from the last three dots (0: no such dot yet).
    let (mut t0, mut t1, mut t2) = (0u64, 0u64, 0u64);
    'name: {
        macro_rules! byte {
            ($k:literal) => {
                if $k >= len {
                    break 'name;
                }
                let c = (w[$k / 8] >> (8 * ($k % 8))) as u8;
                h = step(h, c);
                pair = step(pair, c);
                t0 = step(t0, c);
                t1 = step(t1, c);
                t2 = step(t2, c);
                // At a dot the tails shift (t2 = t1, t1 = t0, t0 starts
                // anew), by masks rather than a branch: a branch here made
                // two states per byte for the verifier, one with a known
                // t0, and it checked the rest of the name again for each.
                let m = opaque(((c ^ b'.') as u64).wrapping_sub(1) >> 63).wrapping_neg();
                t2 = (t1 & m) | (t2 & !m);
                t1 = (t0 & m) | (t1 & !m);
                t0 = (DOT & m) | (t0 & !m);
                // A basename prefix of `$k + 1` bytes (bit `$k`): its hash
                // goes into the last four kept, checked after the loop. A
                // check here, with its lookup, made the verifier go through
                // the rest of the name again for each way through it.
                if $k < limits::FILE_BASE_PREFIX_MAX {
                    let p = opaque(((prefixes >> $k) & 1) as u64).wrapping_neg();
                    q3 = (q2 & p) | (q3 & !p);
                    q2 = (q1 & p) | (q2 & !p);
                    q1 = (q0 & p) | (q1 & !p);
                    q0 = (h & p) | (q0 & !p);
                }
            };
        }
        byte!(0); byte!(1); byte!(2); byte!(3); byte!(4); byte!(5); byte!(6); byte!(7);
        byte!(8); byte!(9); byte!(10); byte!(11); byte!(12); byte!(13); byte!(14); byte!(15);
        byte!(16); byte!(17); byte!(18); byte!(19); byte!(20); byte!(21); byte!(22); byte!(23);
        byte!(24); byte!(25); byte!(26); byte!(27); byte!(28); byte!(29); byte!(30);
    }
    s.dc_hashes = [h, pair, t0, t1, t2, q0, q1, q2, q3];
    1
}

/// Whether no name key of the agent can match the entry's own name, from
/// the hashes [`scan`] left: each key's filter bit is clear. A set bit (a
/// rule, or another key sharing its bit) sends the action the long way.
#[inline(always)]
fn name_clear(s: &FileScratch, agent_id: u32, flags: u32) -> bool {
    if flags & NAME_KINDS == 0 {
        return true;
    }
    // SAFETY: fields of the map value `s` points to.
    let hs: [u64; 9] = unsafe { core::ptr::read_volatile(&s.dc_hashes) };
    let [h, pair, t0, t1, t2, q0, q1, q2, q3] = hs;
    // Every key's bit is read and the answers are combined without a
    // branch: one early return per key made the verifier check the rest
    // again for each (path_unlink: 360 000 instructions processed).
    let f = |kind: u32, hash: u64| name_filter_bit(agent_id, kind, hash);
    let on = |flag: u32| -> u64 { (flags & flag != 0) as u64 };
    let mut set = on(agent_flags::FILE_BASE_PREFIX)
        & (f(name_kind::BASE_PREFIX, q0) | f(name_kind::BASE_PREFIX, q1) | f(name_kind::BASE_PREFIX, q2) | f(name_kind::BASE_PREFIX, q3));
    set |= on(agent_flags::FILE_COMPONENT) & f(name_kind::COMPONENT, h);
    set |= on(agent_flags::FILE_BASENAME) & f(name_kind::BASENAME, h);
    set |= on(agent_flags::FILE_PAIR) & f(name_kind::PAIR, pair);
    set |= on(agent_flags::FILE_BASE_PAIR) & f(name_kind::BASE_PAIR, pair);
    // A tail's hash is never 0 once its dot was seen (the prefix was
    // hashed from the offset basis); a tail of 0 is checked too, which
    // can only send an action the long way.
    set |= on(agent_flags::FILE_SUFFIX) & (f(name_kind::SUFFIX, t0) | f(name_kind::SUFFIX, t1) | f(name_kind::SUFFIX, t2));
    set == 0
}

/// The directory `d` on mount `mnt` (a `struct vfsmount *`): its inode
/// and the chain up to the mount's root, as an entry records them.
/// Returns false when it cannot be recorded (deeper than
/// [`limits::DIRCACHE_DEPTH`]). A mount's root is recorded with no chain
/// (depth 0): as for any directory, what lies above its mount's root is
/// covered by the epoch (a directory renamed, a mount moved) and the key's
/// vfsmount (another bind mount of the same directory is another key).
#[inline(always)]
fn record_dir(v: &mut DirCacheEntry, mnt: u64, d: u64) -> bool {
    let inode: u64 = ld(d, off!(dentry_inode));
    if inode == 0 {
        return false;
    }
    v.inode = inode;
    v.ino = ld(inode, off!(inode_ino));
    v.igen = ld(inode, off!(inode_generation));
    let root: u64 = ld(mnt, off!(vfsmount_root));
    let mut cur = d;
    // Unrolled: constant indexes into the entry, one way through each level.
    macro_rules! level {
        ($i:literal) => {
            if cur == root {
                v.depth = $i;
                return true;
            }
            let up: u64 = ld(cur, off!(dentry_parent));
            v.chain[$i] = [up, hash_len(cur)];
            cur = up;
        };
    }
    level!(0);
    level!(1);
    level!(2);
    level!(3);
    level!(4);
    level!(5);
    level!(6);
    level!(7);
    v.depth = limits::DIRCACHE_DEPTH as u64;
    cur == root
}

/// Whether `d` on `mnt` is still the directory entry `v` recorded.
#[inline(always)]
fn same_dir(v: &DirCacheEntry, mnt: u64, d: u64) -> bool {
    let inode: u64 = ld(d, off!(dentry_inode));
    if inode != v.inode {
        return false;
    }
    // One branch for the two (under TCG each branch ends a translated
    // block). The inode pointer is compared apart: to the verifier it is
    // a pointer, which no bitwise operation may take.
    let ino: u64 = ld(inode, off!(inode_ino));
    let igen: u32 = ld(inode, off!(inode_generation));
    if (ino ^ v.ino) | (igen ^ v.igen) as u64 != 0 {
        return false;
    }
    let root: u64 = ld(mnt, off!(vfsmount_root));
    let depth = v.depth;
    let mut cur = d;
    // The two offsets each level needs, read once (each read of
    // `KERNEL_OFFSETS` is a load of its own).
    let (parent, qstr) = (off!(dentry_parent), qstr_off());
    macro_rules! level {
        ($i:literal) => {
            if $i >= depth {
                return cur == root;
            }
            let up: u64 = ld(cur, parent);
            if up != v.chain[$i][0] || hash_len_at(cur, qstr) != v.chain[$i][1] {
                return false;
            }
            cur = up;
        };
    }
    const _: () = assert!(limits::DIRCACHE_DEPTH == 8);
    level!(0);
    level!(1);
    level!(2);
    level!(3);
    level!(4);
    level!(5);
    level!(6);
    level!(7);
    cur == root
}

/// Whether two `struct path *` name the same directory on the same mount.
#[inline(always)]
pub fn same_path(a: u64, b: u64) -> bool {
    let (am, ad): (u64, u64) = (ld(a, off!(path_mnt)), ld(a, off!(path_dentry)));
    let (bm, bd): (u64, u64) = (ld(b, off!(path_mnt)), ld(b, off!(path_dentry)));
    am == bm && ad == bd
}

/// Whether entry `v` holds for directory `d` on `mnt` at stamp `st`.
#[inline(always)]
fn holds(v: &DirCacheEntry, st: Stamp, mnt: u64, d: u64) -> bool {
    (v.generation ^ st.generation) | (v.epoch ^ st.epoch) == 0 && same_dir(v, mnt, d)
}

/// Whether two keys are the same, field by field (a derived comparison of
/// the whole struct could become a `bcmp` call, which BPF has not), and
/// without a branch per field (under TCG each branch ends a translated
/// block).
#[inline(always)]
fn same_key(a: &DirCacheKey, b: &DirCacheKey) -> bool {
    let ids = (a.agent_id ^ b.agent_id) | (a.session_id ^ b.session_id) | (a.ops ^ b.ops);
    // Read back from the map: the compiler would otherwise use the
    // pointers just stored there, and the verifier admits no bitwise
    // operation on a pointer.
    // SAFETY: fields of map values the references point to.
    let (ad, am, bd, bm) = unsafe {
        use core::ptr::read_volatile as r;
        (r(&a.dentry), r(&a.mnt), r(&b.dentry), r(&b.mnt))
    };
    (ad ^ bd) | (am ^ bm) | ids as u64 == 0
}

/// `*dst = *src`, a word at a time (the BPF target has no `memcpy` for a
/// copy this size).
#[inline(always)]
fn copy_entry(dst: &mut DirCacheEntry, src: &DirCacheEntry) {
    const WORDS: usize = core::mem::size_of::<DirCacheEntry>() / 8;
    const _: () = assert!(core::mem::size_of::<DirCacheEntry>() % 8 == 0);
    let (d, s) = ((dst as *mut DirCacheEntry).cast::<u64>(), (src as *const DirCacheEntry).cast::<u64>());
    let mut i = 0;
    while i < WORDS {
        // SAFETY: both are whole entries, 8-byte aligned (their first
        // members are 8-byte words after two u32s).
        unsafe { core::ptr::write_volatile(d.add(i), core::ptr::read_volatile(s.add(i))) };
        i += 1;
    }
}

/// Step 1 of a lookup: a tagged task's `ops` action in directory `dir` (a
/// `struct path *`); `tag` is the task's [`Tag`] as [`pack`] makes it.
/// Takes the stamp, finds the directory's entry if it still holds, and
/// leaves in the scratch map what [`scan`] and [`finish`] need: the agent's
/// flags (the entry's, or the agent's now), its prefix lengths, the
/// directory's name's hash, whether an entry holds. Returns 1 to go on;
/// [`ALLOWED`] when an entry holds and the entry `e` is clear by the
/// entry's quick filter and [`entry_clear`] (no [`scan`], no [`finish`]);
/// 0
/// (cache off, or the directory's name too long to hash here) sends the
/// action the long way, with nothing to record.
///
/// Called first, before anything of the long way is read: a rename or a
/// rule change after the stamp taken here makes what is recorded stale.
///
/// The three steps are never inlined and keep their state in the scratch
/// map: each returns a constant, so every way out of one leaves the
/// program in the same state, and the verifier checks what follows once
/// (inlined, each early return was a different state, and the long way
/// was checked again for each; path_unlink took 98 s of verification).
#[inline(never)]
pub fn begin<const V: u32>(s: &mut FileScratch, tag: u64, ops: u64, dir: u64, e: u64) -> u64 {
    unsafe { core::ptr::write_volatile(&mut s.dc_variant, V) };
    // SAFETY (all volatile accesses below): fields of the map value `s`
    // points to, this run's while it holds it (filepath.rs `take`).
    unsafe { core::ptr::write_volatile(&mut s.dir_ok, 0) };
    let st = stamp();
    if st.generation == 0 {
        return 0;
    }
    let (agent_id, session_id, ops) = (tag as u32, (tag >> 32) as u32, ops as u32);
    let mnt: u64 = ld(dir, off!(path_mnt));
    let d: u64 = ld(dir, off!(path_dentry));
    s.dc_key = DirCacheKey { agent_id, session_id, ops, pad: 0, dentry: d, mnt };
    // This CPU's last entry first (no hash lookup), then the cache's; an
    // entry that holds is copied to the last one, and judged from there.
    let held = if same_key(&s.dc_last_key, &s.dc_key) && holds(&s.dc_last, st, mnt, d) {
        true
    } else {
        // SAFETY: read while this program runs.
        match unsafe { DIRCACHE.get(&s.dc_key) } {
            Some(v) if holds(v, st, mnt, d) => {
                copy_entry(&mut s.dc_last, v);
                s.dc_last_key = s.dc_key;
                true
            }
            _ => false,
        }
    };
    if held {
        let v = &s.dc_last;
        // Most names are clear by the quick filter: no hashing, and the
        // answer here.
        if v.flags & NAME_KINDS == 0 || quick_clear(&v.quick, e) {
            return if entry_clear(e, v.flags) { ALLOWED } else { 0 };
        }
        s.dc_flags = v.flags;
        s.dc_prefix_lens = v.prefix_lens;
        s.dc_dir_hash = v.name_hash;
        unsafe { core::ptr::write_volatile(&mut s.dc_cached, 1) };
        return 1;
    }
    // For `finish`, which records the directory at this stamp.
    s.dc_generation = st.generation;
    s.dc_epoch = st.epoch;
    let cfg = agent_config(agent_id);
    let pairs = cfg.flags & (agent_flags::FILE_PAIR | agent_flags::FILE_BASE_PAIR) != 0;
    s.dc_dir_hash = if pairs {
        match name_hash(d) {
            Some(h) => h,
            None => return 0,
        }
    } else {
        0
    };
    s.dc_flags = cfg.flags;
    s.dc_prefix_lens = cfg.file_prefix_lens;
    // SAFETY: copied out at once.
    s.dir_entry.quick = match unsafe { QUICK.get(&agent_id) } {
        Some(q) => *q,
        None => FileQuickFilter::ALL,
    };
    unsafe { core::ptr::write_volatile(&mut s.dc_cached, 0) };
    1
}

/// Step 3 of a lookup, after [`begin`] and [`scan`] both went on: with an
/// entry that holds, whether the entry `e` itself is clear too (its name,
/// its self-protection bit, its links): 1 allows the action (counted, not
/// logged). Without one, the directory `dir` is recorded into the scratch
/// map (`dir_ok`) for [`fill`] if the entry's name is clear. 0: the long way.
#[inline(never)]
pub fn finish<const V: u32>(tag: u64, dir: u64, e: u64) -> u64 {
    let Some(s) = filepath::scratch() else { return 0 };
    unsafe { core::ptr::write_volatile(&mut s.dc_variant, V) };
    // SAFETY (volatile accesses): as in `begin`.
    let cached = unsafe { core::ptr::read_volatile(&s.dc_cached) };
    let flags = unsafe { core::ptr::read_volatile(&s.dc_flags) };
    if !name_clear(s, tag as u32, flags) {
        return 0;
    }
    if cached != 0 {
        return entry_clear(e, flags) as u64;
    }
    let mnt: u64 = ld(dir, off!(path_mnt));
    let d: u64 = ld(dir, off!(path_dentry));
    let v = &mut s.dir_entry;
    v.generation = unsafe { core::ptr::read_volatile(&s.dc_generation) };
    v.epoch = unsafe { core::ptr::read_volatile(&s.dc_epoch) };
    v.flags = flags;
    v.prefix_lens = unsafe { core::ptr::read_volatile(&s.dc_prefix_lens) };
    v.name_hash = unsafe { core::ptr::read_volatile(&s.dc_dir_hash) };
    if record_dir(v, mnt, d) {
        unsafe { core::ptr::write_volatile(&mut s.dir_ok, 1) };
    }
    0
}

/// What [`begin`] returns when it allowed the action itself.
const ALLOWED: u64 = 3;

/// With an entry that holds and the entry `e`'s name clear: whether `e`
/// itself is clear too (not one of AgentGuard's, by the self-protection
/// filter; not a protected file's other name, by its links; `flags` the
/// entry's [`agent_flags`]) and recording works. Counts the action then.
#[inline(always)]
fn entry_clear(e: u64, flags: u32) -> bool {
    let inode: u64 = ld(e, off!(dentry_inode));
    let ino: u64 = ld(inode, off!(inode_ino));
    if in_self_filter(ino) {
        return false;
    }
    if flags & agent_flags::FILE_INODES != 0 {
        let mode: u16 = ld(inode, off!(inode_mode));
        let nlink: u32 = ld(inode, off!(inode_nlink));
        if mode & S_IFMT == S_IFREG && nlink > 1 {
            return false;
        }
    }
    // Fail-closed recording denies; the long way says so.
    if recording_failed() {
        return false;
    }
    count(Counter::FileAllowedRepeats);
    true
}

/// A lookup: whether the cache allows a tagged task's `ops` action on
/// entry `e` of directory `dir` ([`begin`], [`scan`], [`finish`]).
#[inline(always)]
pub fn allows<const V: u32>(s: &mut FileScratch, tag: Tag, ops: u32, dir: u64, e: u64) -> bool {
    let t = pack(tag);
    let b = begin::<V>(s, t, ops as u64, dir, e);
    b == ALLOWED || (b != 0 && scan::<V>(e) != 0 && finish::<V>(t, dir, e) != 0)
}

/// A [`Tag`] as the steps of a lookup and [`fill`] take it (one register).
#[inline(always)]
pub fn pack(tag: Tag) -> u64 {
    tag.agent_id as u64 | (tag.session_id as u64) << 32
}

/// No directory to record for this action.
#[inline(always)]
pub fn forget() {
    if let Some(s) = filepath::scratch() {
        // SAFETY: a field of the map value `s` points to.
        unsafe { core::ptr::write_volatile(&mut s.dir_ok, 0) };
    }
}

/// Whether the directory `s.path[..len]` (with its `/`) has a prefix key
/// of `id` below it.
#[inline(always)]
fn marked(s: &mut FileScratch, id: u32, len: usize) -> bool {
    s.id_be = id.to_be_bytes();
    s.prefix_len = 32 + 8 * len as u32;
    // SAFETY: FileScratch starts with exactly the layout of an LPM key
    // (filejudge.rs by_prefix).
    let key = unsafe { &*(s as *const FileScratch).cast::<Key<FilePrefixKey>>() };
    match DIRMARK.get(key) {
        Some(&n) => n as usize == len,
        None => false,
    }
}

/// After the long way allowed (`allow`, rule `rule_id`) the action `ops`
/// of `tag` ([`pack`]) in directory `dir`, whose path with its `/` is the
/// first `dir_len` bytes of the scratch path: record the directory if
/// [`finish`] prepared it, unless a prefix key lies below it. Never
/// inlined: the long way reaches it by many ways, and inlined, it would be
/// checked once for each.
#[inline(never)]
pub fn fill(tag: u64, ops: u64, dir: u64, rule_and_len: u64) -> u64 {
    let Some(s) = filepath::scratch() else { return 0 };
    // SAFETY: a field of the map value `s` points to.
    if unsafe { core::ptr::read_volatile(&s.dir_ok) } != 1 {
        return 0;
    }
    // What the walk up from the entry found: fill only where it reached a
    // conclusion and found nothing of AgentGuard's at or above the entry,
    // or only a directory above a guarded tree, above the entry (/tmp
    // above the daemon's own files). A hit checks the entry's own mark
    // again ([`finish`]), and the entry that leads to the guarded tree has
    // one; no such mark lies inside a guarded tree (the daemon's plan).
    // SAFETY: a field of the map value `s` points to.
    let walk = unsafe { core::ptr::read_volatile(&s.dc_walk) };
    let (mark, depth) = ((walk & 0xff) as u32, (walk >> 8) & 0xff);
    let (conclusive, guarded) = ((walk >> 16) & 1 != 0, (walk >> 24) & 1 != 0);
    if guarded || !conclusive || !(mark == 0 || (mark == self_marks::ANCESTOR && depth > 0)) {
        return 0;
    }
    let dir_len = (rule_and_len & 0xffff_ffff) as usize;
    if dir_len < 2 || dir_len > limits::FILE_KEY_PATH {
        return 0;
    }
    let (agent_id, session_id) = (tag as u32, (tag >> 32) as u32);
    if marked(s, agent_id, dir_len) {
        return 0;
    }
    let sessions = s.dir_entry.flags & agent_flags::FILE_SESSION != 0 && session_id & RUN_SESSION_BIT != 0;
    if sessions && marked(s, session_id, dir_len) {
        return 0;
    }
    s.dir_entry.rule_id = (rule_and_len >> 32) as u32;
    let mnt: u64 = ld(dir, off!(path_mnt));
    let d: u64 = ld(dir, off!(path_dentry));
    s.dc_key = DirCacheKey { agent_id, session_id, ops: ops as u32, pad: 0, dentry: d, mnt };
    let _ = DIRCACHE.insert(&s.dc_key, &s.dir_entry, 0);
    0
}

/// Change the epoch: every entry stamped before is stale.
#[inline(always)]
fn bump_epoch() {
    if let Some(epoch) = HOOKS.get_ptr_mut(HookFlag::FileEpoch as u32) {
        // SAFETY: an array slot; other CPUs add to it too.
        unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(epoch, 1) };
    }
}

/// Whether the dentry `d` (a pointer the kernel typed) has an inode: a
/// name that exists.
#[inline(always)]
pub fn has_inode(d: u64) -> bool {
    ld::<u64>(d, off!(dentry_inode)) != 0
}

#[inline(always)]
fn is_dir(d: u64) -> bool {
    let inode: u64 = ld(d, off!(dentry_inode));
    let mode: u16 = ld(inode, off!(inode_mode));
    mode & S_IFMT == S_IFDIR
}

/// After every rename on the host: when a directory moved (either side,
/// for RENAME_EXCHANGE), every path below it changed.
/// `int vfs_rename(struct renamedata *rd)`.
#[fexit(function = "vfs_rename")]
pub fn dircache_rename(ctx: FExitContext) -> i32 {
    if off!(renamedata_old) == 0 || off!(renamedata_new) == 0 {
        return 0;
    }
    let rd: u64 = ctx.arg(0);
    let old: u64 = ld(rd, off!(renamedata_old));
    let new: u64 = ld(rd, off!(renamedata_new));
    if is_dir(old) || is_dir(new) {
        bump_epoch();
    }
    0
}

/// After every change of the mount tree: a moved, detached or new mount
/// changes the paths below it.
macro_rules! mount_change {
    ($name:ident, $function:literal) => {
        #[doc = concat!("After `", $function, "`.")]
        #[fexit(function = $function)]
        pub fn $name(_ctx: FExitContext) -> i32 {
            bump_epoch();
            0
        }
    };
}
mount_change!(dircache_mount, "__x64_sys_mount");
mount_change!(dircache_umount, "__x64_sys_umount");
mount_change!(dircache_move_mount, "__x64_sys_move_mount");
mount_change!(dircache_pivot_root, "__x64_sys_pivot_root");
mount_change!(dircache_new_ns, "copy_mnt_ns");
