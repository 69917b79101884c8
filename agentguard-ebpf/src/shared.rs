//! Maps shared by every program, the event emitter and the counters.
use core::intrinsics::{atomic_and, atomic_or, atomic_xadd, AtomicOrdering};

use agentguard_common::{
    approval, limits, AgentConfig, Counter, Decision, EventHeader, EventKind, Grant, GrantKey,
    HoldEvent, HookFlag, PathKey, StateSlot, Tag, COUNTER_SLOTS, HOOK_SLOTS, STATE_SLOTS,
};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_ktime_get_ns},
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};

#[map(name = "AG_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(limits::EVENTS_RING_BYTES, 0);

#[map(name = "AG_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[map(name = "AG_TAGS")]
static TAGS: HashMap<u32, Tag> = HashMap::with_max_entries(limits::MAX_TAGGED_TASKS, 0);

/// One bit per task id, set for every tagged task (common's
/// `maps::TAG_HINTS`): a clear bit answers "untagged" with one array load,
/// which the verifier inlines, instead of a hash lookup. Bits are set before
/// a tag is written and cleared only by the task's exit after its tag is
/// removed, so a clear bit is never wrong; a stale set bit only costs the
/// lookup.
#[map(name = "AG_TAG_HINTS")]
static TAG_HINTS: Array<u64> = Array::with_max_entries(limits::TAG_HINT_WORDS, 0);

/// Whether `tid` may be tagged (false: it certainly is not).
#[inline(always)]
pub fn hinted(tid: u32) -> bool {
    match TAG_HINTS.get(tid / 64) {
        Some(word) => *word & (1u64 << (tid % 64)) != 0,
        // Beyond the array (cannot happen below PID_MAX_LIMIT): look it up.
        None => true,
    }
}

/// Set `tid`'s hint bit (before its tag is written).
#[inline(always)]
pub fn hint_set(tid: u32) {
    if let Some(word) = TAG_HINTS.get_ptr_mut(tid / 64) {
        // SAFETY: a word of the array; other CPUs change other bits of it.
        unsafe { atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(word, 1u64 << (tid % 64)) };
    }
}

/// Clear `tid`'s hint bit (its tag is gone: the task is exiting).
#[inline(always)]
fn hint_clear(tid: u32) {
    if let Some(word) = TAG_HINTS.get_ptr_mut(tid / 64) {
        // SAFETY: as in `hint_set`.
        unsafe { atomic_and::<u64, u64, { AtomicOrdering::Relaxed }>(word, !(1u64 << (tid % 64))) };
    }
}

/// Changed after every change of [`TAGS`] (common's `maps::TAG_EPOCH`).
#[map(name = "AG_TAG_EPOCH")]
static TAG_EPOCH: Array<u64> = Array::with_max_entries(1, 0);

/// The tag epoch now: read it before a tag, and what was decided from
/// that tag holds while the epoch stays the same.
#[inline(always)]
pub fn tag_epoch() -> u64 {
    TAG_EPOCH.get(0).copied().unwrap_or(0)
}

/// A tag was written or removed.
#[inline(always)]
fn tag_changed() {
    count(Counter::TagChanges);
    bump_tag_epoch();
}

/// Change the tag epoch: what was decided from a tag read before is stale.
#[inline(always)]
pub fn bump_tag_epoch() {
    if let Some(epoch) = TAG_EPOCH.get_ptr_mut(0) {
        // SAFETY: the array's one slot; other CPUs add to it too.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(epoch, 1) };
    }
}

/// The tag of task `tid`, if it belongs to an agent.
#[inline(always)]
pub fn tag_of(tid: u32) -> Option<Tag> {
    if !hinted(tid) {
        return None;
    }
    // SAFETY: the value is copied out before any other map operation.
    unsafe { TAGS.get(&tid) }.copied()
}

/// Tag task `tid`; false when the map is full.
#[inline(always)]
pub fn tag_insert(tid: u32, tag: &Tag) -> bool {
    hint_set(tid);
    let ok = TAGS.insert(&tid, tag, 0).is_ok();
    // After the write: a reader that sees the count (or the epoch) sees
    // the tag.
    tag_changed();
    ok
}

/// Untag task `tid` (it is exiting, or its task id moved at exec). The bit
/// is cleared only at exit (`clear_hint`): after an exec's move, the old id
/// is free, and a stale bit only costs a lookup.
#[inline(always)]
pub fn tag_remove(tid: u32, clear_hint: bool) {
    let _ = TAGS.remove(&tid);
    tag_changed();
    if clear_hint {
        hint_clear(tid);
    }
}

#[map(name = "AG_AGENTS")]
pub static AGENTS: HashMap<u32, AgentConfig> = HashMap::with_max_entries(limits::MAX_AGENTS, 0);

#[map(name = "AG_SEL_CGROUP")]
pub static SEL_CGROUP: HashMap<u64, Tag> = HashMap::with_max_entries(limits::MAX_SELECTORS, 0);

#[map(name = "AG_SEL_EXE")]
pub static SEL_EXE: HashMap<PathKey, Tag> = HashMap::with_max_entries(limits::MAX_SELECTORS, 0);

#[map(name = "AG_SEL_COMM")]
pub static SEL_COMM: HashMap<[u8; limits::COMM_LEN], Tag> =
    HashMap::with_max_entries(limits::MAX_SELECTORS, 0);

#[map(name = "AG_SEL_UID")]
pub static SEL_UID: HashMap<u32, Tag> = HashMap::with_max_entries(limits::MAX_SELECTORS, 0);

#[map(name = "AG_HOOKS")]
pub static HOOKS: Array<u32> = Array::with_max_entries(HOOK_SLOTS, 0);

/// A [`HookFlag`] slot of the hooks map (0 when unset).
#[inline(always)]
pub fn hook_flag(flag: HookFlag) -> u32 {
    HOOKS.get(flag as u32).copied().unwrap_or(0)
}

#[map(name = "AG_STATE")]
pub static STATE: Array<u32> = Array::with_max_entries(STATE_SLOTS, 0);

#[inline(always)]
fn state_set(slot: StateSlot) -> bool {
    STATE.get(slot as u32).is_some_and(|v| *v != 0)
}

/// Fail-closed recording (docs/events.md): true while the event of an action
/// could not be recorded, because the daemon cannot write its log or the ring
/// buffer overflowed and has not been drained yet. Both flags are only ever
/// set in fail-closed mode. The network and file programs deny a tagged
/// task's action while this holds: an agent must not act unrecorded.
#[inline(always)]
pub fn recording_failed() -> bool {
    state_set(StateSlot::LogFailed) || state_set(StateSlot::RingFull)
}

#[map(name = "AG_GRANTS")]
pub static GRANTS: HashMap<GrantKey, Grant> = HashMap::with_max_entries(limits::MAX_GRANTS, 0);

/// An `approve` decision meets the grants: `(approval state, approval id)`.
/// A one-time grant is used by deleting it, and only the caller whose
/// delete succeeds passes (the map's delete is atomic), so two racing
/// retries cannot both go through. An expired grant is removed and holds.
#[inline(always)]
pub fn use_grant(key: &GrantKey) -> (u32, u32) {
    // SAFETY: copied out at once.
    let Some(grant) = (unsafe { GRANTS.get(key) }).copied() else {
        return (approval::HELD, 0);
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if now >= grant.expires_ns {
        let _ = GRANTS.remove(key);
        return (approval::HELD, 0);
    }
    if grant.once != 0 {
        return match GRANTS.remove(key) {
            Ok(()) => (approval::GRANTED_ONCE, grant.approval_id),
            Err(_) => (approval::HELD, 0),
        };
    }
    (approval::GRANTED, grant.approval_id)
}

#[map(name = "AG_HOLDS")]
pub static HOLDS: RingBuf = RingBuf::with_byte_size(limits::HOLDS_RING_BYTES, 0);

/// Tell the daemon's hold thread that the current process's action was
/// held (`kind`: a [`agentguard_common::grant_kind`]). Best effort: the
/// main event, which carries the same fact, freezes the agent too.
#[inline(always)]
pub fn notify_hold(tag: Tag, kind: u32) {
    if let Some(mut entry) = HOLDS.reserve::<HoldEvent>(0) {
        // The header's kind is unused on this ring (one record type).
        entry.write(HoldEvent { header: header(EventKind::Net, tag), kind, _pad: 0 });
        entry.submit(RB_FORCE_WAKEUP);
    }
}

/// Whether an action under `approval` goes ahead (a grant let it through).
#[inline(always)]
pub const fn granted(approval_state: u32) -> bool {
    approval_state == approval::GRANTED_ONCE || approval_state == approval::GRANTED
}

/// bpf_ringbuf_submit flag: wake the reader now. A held action's event
/// must reach the daemon at once, which freezes the agent (bench B7).
pub const RB_FORCE_WAKEUP: u64 = 2;

/// One path-sized scratch buffer per CPU (the BPF stack is only 512 bytes).
#[map(name = "AG_SCRATCH")]
pub static SCRATCH: PerCpuArray<PathKey> = PerCpuArray::with_max_entries(1, 0);

pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot. Atomic: a program run that preempts
        // another on this CPU (kernels with full preemption) may count
        // between its load and its store, and a lost count (a ring buffer
        // drop) would be a silent loss.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, 1) };
    }
}

/// The calling task's tag, if it belongs to an agent.
#[inline(always)]
pub fn current_tag() -> Option<Tag> {
    tag_of(bpf_get_current_pid_tgid() as u32)
}

pub fn agent_config(agent_id: u32) -> AgentConfig {
    // SAFETY: copied out at once.
    match unsafe { AGENTS.get(&agent_id) } {
        Some(config) => *config,
        None => AgentConfig {
            net_default: decide_unreadable() as u32,
            file_default: decide_unreadable() as u32,
            flags: 0,
            file_prefix_lens: 0,
        },
    }
}

/// The one fail-open / fail-closed choice: a tagged task whose agent has no
/// configuration in the kernel (the daemon has not written it, or it was
/// removed while the task lives) is denied, and so is a tagged task's file
/// action on a path the kernel cannot read. An agent is known to be an
/// agent; not knowing its rules, or its target, must not let it through.
pub const fn decide_unreadable() -> Decision {
    Decision::Deny
}

pub fn header(kind: EventKind, tag: Tag) -> EventHeader {
    let pid_tgid = bpf_get_current_pid_tgid();
    EventHeader {
        kind: kind as u32,
        agent_id: tag.agent_id,
        session_id: tag.session_id,
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        uid: bpf_get_current_uid_gid() as u32,
        // SAFETY: no preconditions.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
    }
}

/// Reserve room for one event, counting the loss when the ring is full.
#[inline(always)]
pub fn reserve<T: 'static>() -> Option<aya_ebpf::maps::ring_buf::RingBufEntry<T>> {
    let entry = EVENTS.reserve::<T>(0);
    if entry.is_none() {
        count(Counter::RingbufDrops);
        // Latch the fail-closed flag at the first lost event; the daemon
        // clears it once it has drained the ring.
        if state_set(StateSlot::FailClosed) {
            if let Some(slot) = STATE.get_ptr_mut(StateSlot::RingFull as u32) {
                // SAFETY: a u32 array slot; a racing writer writes the same value.
                unsafe { *slot = 1 };
            }
        }
    }
    entry
}

/// Write a fully built small event.
#[inline(always)]
pub fn emit<T: 'static>(event: T) {
    emit_flags(event, 0);
}

/// Write a fully built small event with bpf_ringbuf_submit `flags`.
#[inline(always)]
pub fn emit_flags<T: 'static>(event: T, flags: u64) {
    if let Some(mut entry) = reserve::<T>() {
        entry.write(event);
        entry.submit(flags);
        count(Counter::EventsSubmitted);
    }
}
