//! The file decision, shared by the BPF-LSM hooks and the fallback
//! observation: which of the agent's file rules matches an assembled path
//! first, in policy order, and the event that records it.
//!
//! Sources of candidate rules, each a list in policy order (compiled by
//! agentguard-userspace/src/filerules.rs):
//! - the LPM trie keyed by the agent id (absolute prefixes and exact paths)
//!   and by the session id (prefixes under the session's workspace);
//! - name patterns, by hash: any component, any two adjacent components,
//!   the basename, the last two components, a basename suffix from one of
//!   its last three dots, a basename prefix;
//! - the (device, inode) of a protected file with several hard-link names:
//!   a blocking rule found there wins, so the file stays protected whatever
//!   name the action uses.
//!
//! Over all sources the lowest rule id whose ops include the action's
//! decides; no match: the agent's `[files] default`.
use agentguard_common::{
    agent_flags, approval, grant_kind, limits, name_kind, Decision, Enforcement, EventKind,
    FileEvent, FileInodeKey, FileNameKey, FileOp, FilePrefixKey, FileRuleList, GrantKey, Tag, file_name_filter_bit,
    FNV64_OFFSET, FNV64_PRIME, GRANT_H2_OFFSET, GRANT_H2_PRIME, RULE_FAIL_CLOSED,
    RUN_SESSION_BIT,
};
use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::{bpf_loop, bpf_probe_read_kernel, bpf_probe_read_kernel_str},
    macros::map,
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie},
};

use crate::{
    filepath::{self, Built, FileScratch, Scan},
    kstructs::multi_link_id,
    shared::{agent_config, count, decide_unreadable, header, recording_failed, reserve, use_grant, RB_FORCE_WAKEUP},
};

#[map(name = "AG_FILE_PREFIX")]
static FILE_PREFIX: LpmTrie<FilePrefixKey, FileRuleList> =
    LpmTrie::with_max_entries(limits::MAX_FILE_PREFIXES, 0);

#[map(name = "AG_FILE_NAMES")]
static FILE_NAMES: HashMap<FileNameKey, FileRuleList> =
    HashMap::with_max_entries(limits::MAX_FILE_NAMES, 0);

#[map(name = "AG_FILE_NAME_FILTER")]
static FILE_NAME_FILTER: Array<u64> = Array::with_max_entries(limits::FILE_NAME_FILTER_WORDS, 0);

#[map(name = "AG_FILE_INODES")]
static FILE_INODES: HashMap<FileInodeKey, FileRuleList> =
    HashMap::with_max_entries(limits::MAX_FILE_INODES, 0);

pub const NAME_KINDS: u32 = agent_flags::FILE_COMPONENT
    | agent_flags::FILE_BASENAME
    | agent_flags::FILE_SUFFIX
    | agent_flags::FILE_BASE_PREFIX
    | agent_flags::FILE_PAIR
    | agent_flags::FILE_BASE_PAIR;

/// The winning rule so far: lowest rule id.
struct Best {
    rule_id: u32,
    decision: u32,
}

/// The first entry of `list` whose ops include `ops`, if its rule id beats
/// `best`. Unrolled by hand: as a loop, LLVM folds the two bounds (12 and
/// `count`) into one derived counter that 6.1's verifier cannot bound.
#[inline(always)]
fn consider(list: &FileRuleList, ops: u32, best: &mut Best) {
    const _: () = assert!(limits::FILE_RULES_PER_KEY == 12);
    let count = list.count;
    macro_rules! entry {
        ($k:literal) => {
            if count <= $k {
                return;
            }
            let e = &list.entries[$k];
            if e.ops & ops != 0 {
                if e.rule_id < best.rule_id {
                    best.rule_id = e.rule_id;
                    best.decision = e.decision;
                }
                return;
            }
        };
    }
    entry!(0);
    entry!(1);
    entry!(2);
    entry!(3);
    entry!(4);
    entry!(5);
    entry!(6);
    entry!(7);
    entry!(8);
    entry!(9);
    entry!(10);
    entry!(11);
}

#[inline(always)]
fn by_prefix(s: &mut FileScratch, id: u32, len: usize, ops: u32, best: &mut Best) {
    let bytes = if len + 1 > limits::FILE_KEY_PATH { limits::FILE_KEY_PATH } else { len + 1 };
    s.id_be = id.to_be_bytes();
    s.prefix_len = 32 + 8 * bytes as u32;
    // SAFETY: FileScratch starts with exactly the layout of an LPM key
    // (packed u32 prefix length, then FilePrefixKey).
    let key = unsafe { &*(s as *const FileScratch).cast::<Key<FilePrefixKey>>() };
    if let Some(list) = FILE_PREFIX.get(key) {
        consider(list, ops, best);
    }
}

#[inline(always)]
fn by_name(agent_id: u32, kind: u32, hash: u64, ops: u32, best: &mut Best) {
    let key = FileNameKey { agent_id, kind, hash };
    // SAFETY: the value is only read while this program runs.
    if let Some(list) = unsafe { FILE_NAMES.get(&key) } {
        consider(list, ops, best);
    }
}

#[inline(always)]
fn step(h: u64, c: u8) -> u64 {
    (h ^ c as u64).wrapping_mul(FNV64_PRIME)
}

/// Queue a name key for the lookup pass.
#[inline(always)]
fn push(s: &mut FileScratch, kind: u32, hash: u64) {
    let n = s.scan.nkeys;
    if n < filepath::NAME_KEYS as u64 {
        let i = n as usize & (filepath::NAME_KEYS - 1);
        if let (Some(k), Some(h)) = (s.key_kind.get_mut(i), s.key_hash.get_mut(i)) {
            *k = kind;
            *h = hash;
        }
        s.scan.nkeys = n + 1;
    }
}

/// One word (8 bytes) of the name scan's first pass (a `bpf_loop`
/// callback, iteration `i` reads bytes `8i..8i+8`): hash each component
/// and queue it (and the pair it forms with the previous one) as it ends;
/// at the end of the path, queue the basename's hash and the last pair,
/// and leave where the basename starts for the second pass
/// ([`scan_base_byte`]). A word per iteration: the per-iteration cost (the
/// state's loads and stores) is paid once per 8 bytes, and each byte costs
/// two FNV steps.
unsafe extern "C" fn scan_word(i: u64, _ctx: *mut c_void) -> i64 {
    let Some(s) = filepath::scratch() else { return 1 };
    // The loop runs (len + 8) / 8 times and len < FILE_PATH_MAX, so the
    // mask never changes `8i`; it bounds the read for the verifier.
    let base = (i as usize * 8) & (limits::FILE_PATH_MAX - 8);
    // SAFETY: 8 bytes inside `path` (the word at a multiple of 8, and the
    // buffer is 8-aligned in the map value).
    let w = unsafe { core::ptr::read(s.path.as_ptr().add(base).cast::<u64>()) };
    let flags = s.scan.flags as u32;
    let len = s.scan.len;
    let (mut h, mut pair, mut clen) = (s.scan.h, s.scan.pair, s.scan.clen);
    let (mut prev, mut ncomps, mut comp_start) = (s.scan.prev, s.scan.ncomps, s.scan.comp_start);
    let mut ended = false;
    'word: {
        macro_rules! byte {
            ($k:literal) => {
                let at = base as u64 + $k;
                let c = if at >= len { 0 } else { (w >> (8 * $k)) as u8 };
                if c == 0 {
                    ended = true;
                    break 'word;
                }
                if c == b'/' {
                    if clen > 0 {
                        if flags & agent_flags::FILE_COMPONENT != 0 {
                            push(s, name_kind::COMPONENT, h);
                        }
                        if ncomps > 0 && flags & agent_flags::FILE_PAIR != 0 {
                            push(s, name_kind::PAIR, pair);
                        }
                        prev = h;
                        ncomps += 1;
                    }
                    h = FNV64_OFFSET;
                    pair = step(prev, b'/');
                    clen = 0;
                    comp_start = at + 1;
                } else {
                    h = step(h, c);
                    pair = step(pair, c);
                    clen += 1;
                }
            };
        }
        byte!(0);
        byte!(1);
        byte!(2);
        byte!(3);
        byte!(4);
        byte!(5);
        byte!(6);
        byte!(7);
    }
    if ended {
        s.scan.base_len = 0;
        if clen > 0 {
            if flags & agent_flags::FILE_COMPONENT != 0 {
                push(s, name_kind::COMPONENT, h);
            }
            if ncomps > 0 && flags & agent_flags::FILE_PAIR != 0 {
                push(s, name_kind::PAIR, pair);
            }
            if flags & agent_flags::FILE_BASENAME != 0 {
                push(s, name_kind::BASENAME, h);
            }
            if ncomps > 0 && flags & agent_flags::FILE_BASE_PAIR != 0 {
                push(s, name_kind::BASE_PAIR, pair);
            }
            s.scan.base_len = clen;
        }
        s.scan.comp_start = comp_start;
        return 1;
    }
    let st = &mut s.scan;
    st.h = h;
    st.pair = pair;
    st.clen = clen;
    st.prev = prev;
    st.ncomps = ncomps;
    st.comp_start = comp_start;
    0
}

/// One byte of the basename (the name scan's second pass, a `bpf_loop`
/// callback; only when the agent has suffix or basename-prefix rules):
/// hash the tails from its last three dots and its prefixes at the lengths
/// the agent uses (the four longest); after its last byte, queue them.
unsafe extern "C" fn scan_base_byte(j: u64, _ctx: *mut c_void) -> i64 {
    let Some(s) = filepath::scratch() else { return 1 };
    if j >= s.scan.base_len {
        if s.scan.flags as u32 & agent_flags::FILE_SUFFIX != 0 {
            let (t, tails) = (s.scan.t, s.scan.tails);
            if tails > 0 {
                push(s, name_kind::SUFFIX, t[0]);
            }
            if tails > 1 {
                push(s, name_kind::SUFFIX, t[1]);
            }
            if tails > 2 {
                push(s, name_kind::SUFFIX, t[2]);
            }
        }
        let (p, prefixes) = (s.scan.p, s.scan.prefixes);
        if prefixes > 0 {
            push(s, name_kind::BASE_PREFIX, p[0]);
        }
        if prefixes > 1 {
            push(s, name_kind::BASE_PREFIX, p[1]);
        }
        if prefixes > 2 {
            push(s, name_kind::BASE_PREFIX, p[2]);
        }
        if prefixes > 3 {
            push(s, name_kind::BASE_PREFIX, p[3]);
        }
        return 1;
    }
    let at = (s.scan.comp_start + j) as usize;
    let c = s.path.get(at & (limits::FILE_PATH_MAX - 1)).copied().unwrap_or(0);
    let st = &mut s.scan;
    st.h = step(st.h, c);
    st.clen = j + 1;
    st.t[0] = step(st.t[0], c);
    st.t[1] = step(st.t[1], c);
    st.t[2] = step(st.t[2], c);
    if c == b'.' {
        st.t[2] = st.t[1];
        st.t[1] = st.t[0];
        st.t[0] = step(FNV64_OFFSET, b'.');
        if st.tails < 3 {
            st.tails += 1;
        }
    }
    if st.clen <= limits::FILE_BASE_PREFIX_MAX as u64 && (st.prefix_lens >> ((st.clen - 1) & 31)) & 1 != 0 {
        st.p[3] = st.p[2];
        st.p[2] = st.p[1];
        st.p[1] = st.p[0];
        st.p[0] = st.h;
        if st.prefixes < 4 {
            st.prefixes += 1;
        }
    }
    0
}

/// Whether the names filter has the bit of this key: only then can
/// `AG_FILE_NAMES` hold it.
#[inline(always)]
pub fn name_filtered(agent_id: u32, kind: u32, hash: u64) -> bool {
    name_filter_bit(agent_id, kind, hash) != 0
}

/// The names filter's bit of this key, 0 or 1.
#[inline(always)]
pub fn name_filter_bit(agent_id: u32, kind: u32, hash: u64) -> u64 {
    let bit = file_name_filter_bit(agent_id, kind, hash);
    match FILE_NAME_FILTER.get(bit >> 6) {
        Some(word) => (*word >> (bit & 63)) & 1,
        // Cannot happen (the index is in range): look the name up.
        None => 1,
    }
}

/// Look one queued name key up (a `bpf_loop` callback): the single place
/// that calls `by_name`, so the verifier checks a lookup once.
unsafe extern "C" fn lookup_key(k: u64, _ctx: *mut c_void) -> i64 {
    let Some(s) = filepath::scratch() else { return 1 };
    if k >= s.scan.nkeys {
        return 1;
    }
    let i = k as usize & (filepath::NAME_KEYS - 1);
    let (Some(&kind), Some(&hash)) = (s.key_kind.get(i), s.key_hash.get(i)) else { return 1 };
    let agent_id = s.scan.agent_id as u32;
    // Most names match no rule: look a name up only when the filter has
    // its bit (filemaps.rs keeps every key's bit set).
    if !name_filtered(agent_id, kind, hash) {
        return 0;
    }
    let mut best = Best { rule_id: s.scan.best_rule as u32, decision: s.scan.best_decision as u32 };
    by_name(agent_id, kind, hash, s.scan.ops as u32, &mut best);
    s.scan.best_rule = best.rule_id as u64;
    s.scan.best_decision = best.decision as u64;
    0
}

/// Look the path's names up: scan it into a queue of name keys, then look
/// each up. Both passes are `bpf_loop` callbacks (see filepath::walk).
#[inline(always)]
fn by_names(s: &mut FileScratch, b: Built, agent_id: u32, flags: u32, prefix_lens: u32, ops: u32, best: &mut Best) {
    let start = Scan {
        flags: flags as u64,
        agent_id: agent_id as u64,
        ops: ops as u64,
        best_rule: best.rule_id as u64,
        best_decision: best.decision as u64,
        nkeys: 0,
        prev: 0,
        ncomps: 0,
        pair: 0,
        len: b.len as u64,
        prefix_lens: if flags & agent_flags::FILE_BASE_PREFIX != 0 { prefix_lens as u64 } else { 0 },
        h: FNV64_OFFSET,
        clen: 0,
        comp_start: 0,
        base_len: 0,
        t: [0; 3],
        tails: 0,
        p: [0; 4],
        prefixes: 0,
    };
    // Handed over and back volatile: see filepath::walk.
    // SAFETY: a field of the map value `s` points to.
    unsafe { core::ptr::write_volatile(&mut s.scan, start) };
    // SAFETY: static callbacks; no context pointer (the state is in the map).
    unsafe {
        bpf_loop(((b.len + 8) / 8) as u32, scan_word as *mut c_void, core::ptr::null_mut(), 0);
    }
    if flags & (agent_flags::FILE_SUFFIX | agent_flags::FILE_BASE_PREFIX) != 0 {
        // SAFETY: as above.
        unsafe {
            let base_len = core::ptr::read_volatile(&s.scan.base_len);
            if base_len > 0 {
                core::ptr::write_volatile(&mut s.scan.h, FNV64_OFFSET);
                bpf_loop((base_len + 1) as u32, scan_base_byte as *mut c_void, core::ptr::null_mut(), 0);
            }
        }
    }
    // SAFETY: as above.
    unsafe {
        bpf_loop(filepath::NAME_KEYS as u32, lookup_key as *mut c_void, core::ptr::null_mut(), 0);
    }
    // SAFETY: as above.
    let scan = unsafe { core::ptr::read_volatile(&s.scan) };
    best.rule_id = scan.best_rule as u32;
    best.decision = scan.best_decision as u32;
}

/// Decide a tagged task's action on the path in `s`. `inode` is the
/// target's inode pointer when the hook knows it (0 otherwise).
#[inline(always)]
pub fn judge(tag: Tag, s: &mut FileScratch, b: Built, ops: u32, inode: u64) -> (Decision, u32) {
    // Fail-closed recording (events, issue 7): while events cannot be
    // recorded, a tagged task's file actions are denied.
    if recording_failed() {
        return (Decision::Deny, RULE_FAIL_CLOSED);
    }
    let cfg = agent_config(tag.agent_id);
    let flags = cfg.flags;
    let mut best = Best { rule_id: u32::MAX, decision: 0 };
    if flags & agent_flags::FILE_PREFIX != 0 {
        by_prefix(s, tag.agent_id, b.len, ops, &mut best);
    }
    // Workspaces belong to `agentguard run` sessions (ids with the top bit).
    if flags & agent_flags::FILE_SESSION != 0 && tag.session_id & RUN_SESSION_BIT != 0 {
        by_prefix(s, tag.session_id, b.len, ops, &mut best);
    }
    if flags & NAME_KINDS != 0 {
        by_names(s, b, tag.agent_id, flags, cfg.file_prefix_lens, ops, &mut best);
    }
    let mut verdict = if best.rule_id == u32::MAX {
        (Decision::from_u32(cfg.file_default).unwrap_or(decide_unreadable()), 0)
    } else {
        (Decision::from_u32(best.decision).unwrap_or(decide_unreadable()), best.rule_id)
    };
    if flags & agent_flags::FILE_INODES != 0 {
        if let Some((dev, ino)) = multi_link_id(inode) {
            let key = FileInodeKey { agent_id: tag.agent_id, dev, ino };
            let mut other = Best { rule_id: u32::MAX, decision: 0 };
            // SAFETY: read while this program runs.
            if let Some(list) = unsafe { FILE_INODES.get(&key) } {
                consider(list, ops, &mut other);
            }
            if let Some(d) = Decision::from_u32(other.decision) {
                if other.rule_id != u32::MAX && d.blocks() {
                    verdict = (d, other.rule_id);
                }
            }
        }
    }
    verdict
}

/// One byte of the grant hash (a `bpf_loop` callback): both hashes of
/// [`agentguard_common::path_grant_target`], carried in the scan state.
unsafe extern "C" fn grant_byte(i: u64, _ctx: *mut c_void) -> i64 {
    let Some(s) = filepath::scratch() else { return 1 };
    if i >= s.scan.len {
        return 1;
    }
    let c = s.path.get(i as usize & (limits::FILE_PATH_MAX - 1)).copied().unwrap_or(0);
    s.scan.h = step(s.scan.h, c);
    s.scan.pair = (s.scan.pair ^ c as u64).wrapping_mul(GRANT_H2_PRIME);
    0
}

/// What an action decided `approve` meets in the grants: `(approval
/// state, approval id, the path's grant target)`. Only `approve` pays for
/// hashing the path.
#[inline(always)]
pub fn approval_of(tag: Tag, op: FileOp, verdict: (Decision, u32), s: &mut FileScratch, b: Option<Built>) -> (u32, u32, [u8; 16]) {
    if verdict.0 != Decision::Approve {
        return (approval::NONE, 0, [0; 16]);
    }
    // A path the kernel could not read has no target a grant could name.
    let Some(b) = b else { return (approval::HELD, 0, [0; 16]) };
    // Handed over and back volatile: see filepath::walk.
    // SAFETY: fields of the map value `s` points to; a static callback.
    let (h1, h2) = unsafe {
        core::ptr::write_volatile(&mut s.scan.h, FNV64_OFFSET);
        core::ptr::write_volatile(&mut s.scan.pair, GRANT_H2_OFFSET);
        core::ptr::write_volatile(&mut s.scan.len, b.len as u64);
        bpf_loop(b.len as u32, grant_byte as *mut c_void, core::ptr::null_mut(), 0);
        (core::ptr::read_volatile(&s.scan.h), core::ptr::read_volatile(&s.scan.pair))
    };
    let mut target = [0u8; 16];
    target[..8].copy_from_slice(&h1.to_ne_bytes());
    target[8..].copy_from_slice(&h2.to_ne_bytes());
    let key = GrantKey { session_id: tag.session_id, kind: grant_kind::FILE, op: op as u32, port: 0, family: 0, target };
    let (state, id) = use_grant(&key);
    (state, id, target)
}

/// A tagged task's file action that found this CPU's scratch taken by a
/// run it preempted (filepath.rs `take`): refused or contained by the
/// caller, counted, and recorded without its path (the path is built in
/// the scratch). `record` reads nothing of the scratch without a path.
#[inline(always)]
pub fn record_preempted(tag: Tag, op: FileOp, how: Enforcement) {
    count(agentguard_common::Counter::FileScratchBusy);
    if let Some(s) = filepath::scratch() {
        record(tag, op, (Decision::Deny, agentguard_common::RULE_PREEMPTED), how, (approval::NONE, 0, [0; 16]), s, None, false);
    }
}

/// Write the event. With `split`, the directory goes to `dir` and the last
/// component to `name`; otherwise `dir` holds the whole path.
#[inline(always)]
pub fn record(tag: Tag, op: FileOp, verdict: (Decision, u32), how: Enforcement, grant: (u32, u32, [u8; 16]), s: &FileScratch, b: Option<Built>, split: bool) {
    let Some(mut entry) = reserve::<FileEvent>() else { return };
    let (approval_state, approval_id, grant_target) = grant;
    // SAFETY: plain data; every field is written below.
    let event = unsafe { &mut *entry.as_mut_ptr() };
    event.header = header(EventKind::File, tag);
    event.op = op as u32;
    event.decision = verdict.0 as u32;
    event.rule_id = verdict.1;
    event.enforcement = how as u32;
    event.approval = approval_state;
    event.approval_id = approval_id;
    event.grant_target = grant_target;
    event.name[0] = 0;
    event.dir[0] = 0;
    if let Some(b) = b {
        // Only the path's bytes: copying all of PATH_MAX would cost every
        // recorded action a 4 KiB copy (bench B1); the rest of the buffer
        // is never read (the daemon stops at the NUL written below).
        let last = limits::PATH_MAX - 1;
        // Masked, so every verifier bounds it (a compare alone was refused
        // by 6.12's): [0, PATH_MAX - 1], the NUL goes at `n` below.
        let n = (if b.len > last { last } else { b.len }) & last;
        // SAFETY: copies at most PATH_MAX - 1 bytes of the scratch buffer
        // (larger) into the event's PATH_MAX-byte `dir`.
        unsafe {
            bpf_probe_read_kernel(event.dir.as_mut_ptr().cast(), n as u32, s.path.as_ptr().cast());
        }
        if split && b.name_off > 0 {
            let dir_end = if b.name_off == 1 { 1 } else { b.name_off - 1 };
            event.dir[if dir_end > last { last } else { dir_end } & last] = 0;
            // SAFETY: source inside the scratch buffer (masked), destination the event's name.
            unsafe {
                bpf_probe_read_kernel_str(
                    event.name.as_mut_ptr().cast(),
                    limits::PATH_MAX as u32,
                    s.path.as_ptr().add(b.name_off & (limits::FILE_PATH_MAX - 1)).cast(),
                );
            }
        } else {
            event.dir[if b.len > last { last } else { b.len } & last] = 0;
        }
    }
    // A held action's event reaches the daemon at once (it freezes the agent).
    entry.submit(if approval_state == approval::HELD { RB_FORCE_WAKEUP } else { 0 });
    count(agentguard_common::Counter::EventsSubmitted);
}
