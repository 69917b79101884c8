//! Network decisions for tagged processes: cgroup_sock_addr programs on
//! connect4/6 and sendmsg4/6 (unconnected UDP sends), attached at the cgroup2
//! root. Untagged processes are let through after one map lookup.
//!
//! The decision comes from the agent's prefix in an LPM trie keyed by
//! (agent id, address): the longest matching prefix holds, in policy order,
//! every rule that can apply to it (the compiler copies enclosing prefixes'
//! rules in), and the first rule whose port and protocol match decides. No
//! match: the agent's default. IPv4-mapped IPv6 destinations are judged as
//! the IPv4 address they carry.
//!
//! An `allow` decision is recorded once per flow (process, hook, protocol,
//! address, port, uid): the first action is an event, its repeats are
//! counted in AG_FLOWS and the daemon logs the counts. The flow also keeps
//! the rule that allowed it and the rules' generation (HookFlag::
//! NetGeneration, bumped by the daemon after every change of the network
//! rules): a repeat under the same generation is allowed without deciding
//! again. A busy agent's thousandth request to the same API then costs the
//! tag and flow lookups and an atomic add, not the rule lookups and a
//! ring-buffer record (bench B2u). Every other decision is decided and sent
//! as an event each time.
//!
//! Cheaper still, each CPU keeps the last allowed flow it counted in a slot
//! (AG_FLOW_SLOTS): while the same task repeats it under the same tag epoch
//! (AG_TAG_EPOCH, changed by every tag write) and rule generation, the repeat
//! is counted in the slot, with no hash lookup at all. The slot's pending
//! count moves into the flow's AG_FLOWS count when the slot is refilled, and
//! until then the daemon adds it to what it reads there (events/flows.rs).
//!
//! Return 1 lets the call proceed; 0 makes the syscall fail with EPERM before
//! any packet leaves (kernel/bpf/cgroup.c, __cgroup_bpf_run_filter_sock_addr).
use core::intrinsics::{atomic_cxchg, atomic_xadd, atomic_xchg, AtomicOrdering};

use agentguard_common::{
    approval, grant_kind, limits, Counter, Decision, EventKind, FlowCount, FlowKey, FlowSlot, GrantKey,
    HookFlag, NetEvent, NetHook, NetKeyV4, NetKeyV6, NetRuleList, NET_FLOW_FIRST,
};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_ktime_get_ns},
    macros::{cgroup_sock_addr, map},
    maps::{lpm_trie::Key, HashMap, LpmTrie, PerCpuArray},
    programs::SockAddrContext,
};

use crate::shared::{
    agent_config, count, decide_unreadable, emit_flags, granted, header, hinted, hook_flag,
    notify_hold, tag_epoch, tag_of, use_grant, RB_FORCE_WAKEUP,
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

#[map(name = "AG_NET_V4")]
static NET_V4: LpmTrie<NetKeyV4, NetRuleList> = LpmTrie::with_max_entries(limits::MAX_NET_PREFIXES, 0);

#[map(name = "AG_NET_V6")]
static NET_V6: LpmTrie<NetKeyV6, NetRuleList> = LpmTrie::with_max_entries(limits::MAX_NET_PREFIXES, 0);

#[map(name = "AG_FLOWS")]
static FLOWS: HashMap<FlowKey, FlowCount> = HashMap::with_max_entries(limits::MAX_FLOWS, 0);

/// The daemon's account of what it logged of each flow (common's
/// `maps::FLOWS_LOGGED`). Declared here so it is created and pinned with the
/// others; no program reads it.
#[map(name = "AG_FLOWS_LOGGED")]
static FLOWS_LOGGED: HashMap<FlowKey, FlowCount> = HashMap::with_max_entries(limits::MAX_FLOWS, 0);

#[map(name = "AG_FLOW_SLOTS")]
static FLOW_SLOTS: PerCpuArray<FlowSlot> = PerCpuArray::with_max_entries(1, 0);

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    decide(&ctx, NetHook::Connect4)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    decide(&ctx, NetHook::Connect6)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    decide(&ctx, NetHook::Sendmsg4)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    decide(&ctx, NetHook::Sendmsg6)
}

/// How an allowed action is recorded.
enum Flow {
    /// A repeat of a counted flow: counted, no event.
    Repeat,
    /// The first action of a counted flow: an event marked as such.
    First,
    /// An event of its own: no room for another flow (counted as such), or
    /// the flow is counted under another rule than the one that decided now.
    Single,
}

/// Count `n` more actions of a flow.
#[inline(always)]
fn add(c: *mut FlowCount, n: u64) {
    // SAFETY: a value of the hash map, valid for this program run; other
    // CPUs add to it too, hence the atomic add.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(core::ptr::addr_of_mut!((*c).count), n) };
}

/// A repeat of a flow decided under the current generation: counted, and
/// allowed without deciding again (the rules it was decided by have not
/// changed since); its serial. Anything else returns `None` and is decided.
#[inline(always)]
fn counted_repeat(key: &FlowKey, generation: u32) -> Option<u64> {
    let c = FLOWS.get_ptr_mut(key)?;
    // SAFETY: as in `add`; a racing store of the same generation is harmless.
    if unsafe { (*c).generation } != generation {
        return None;
    }
    add(c, 1);
    // SAFETY: as in `add`; written once, when the flow started.
    Some(unsafe { (*c).serial })
}

/// Count an action that `rule_id` allowed under `generation` in its flow,
/// starting the flow if it is new; with the flow's serial when counted.
#[inline(always)]
fn count_flow(key: &FlowKey, rule_id: u32, generation: u32) -> (Flow, u64) {
    let existing = |c: *mut FlowCount| {
        // SAFETY: as in `add`.
        if unsafe { (*c).rule_id } != rule_id {
            // Counted under the rule of an earlier policy: this action is an
            // event of its own, so neither rule is credited with the other's.
            return (Flow::Single, 0);
        }
        // SAFETY: as in `add`; concurrent stores write the same value.
        unsafe { (*c).generation = generation };
        add(c, 1);
        // SAFETY: as in `counted_repeat`.
        (Flow::Repeat, unsafe { (*c).serial })
    };
    if let Some(c) = FLOWS.get_ptr_mut(key) {
        return existing(c);
    }
    // SAFETY: no preconditions.
    let serial = unsafe { bpf_ktime_get_ns() };
    if FLOWS.insert(key, &FlowCount { count: 1, rule_id, generation, serial }, u64::from(BPF_NOEXIST)).is_ok() {
        return (Flow::First, serial);
    }
    // Another CPU started the same flow meanwhile, or the map is full.
    if let Some(c) = FLOWS.get_ptr_mut(key) {
        return existing(c);
    }
    count(Counter::FlowsFull);
    (Flow::Single, 0)
}

/// This CPU's flow slot, taken; `None` while another program run on this
/// CPU (a task it preempted) holds it: that run then does without it.
#[inline(always)]
fn slot_take() -> Option<*mut FlowSlot> {
    let s = FLOW_SLOTS.get_ptr_mut(0)?;
    // SAFETY: a value of the per-CPU array; the exchange makes this run its
    // only user until `slot_release`.
    let (_, taken) = unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            core::ptr::addr_of_mut!((*s).busy),
            0,
            1,
        )
    };
    taken.then_some(s)
}

#[inline(always)]
fn slot_release(s: *mut FlowSlot) {
    // SAFETY: as in `slot_take`; the exchange orders this run's writes
    // before the next user's reads.
    unsafe { atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(core::ptr::addr_of_mut!((*s).busy), 0) };
}

/// The same action of the same process: everything in the flow key that
/// the tag does not determine.
#[inline(always)]
fn same_action(a: &FlowKey, b: &FlowKey) -> bool {
    a.pid == b.pid
        && a.hook == b.hook
        && a.protocol == b.protocol
        && a.family == b.family
        && a.port == b.port
        && a.uid == b.uid
        && a.addr == b.addr
}

/// A repeat of the flow in this CPU's slot, by the task that filled it,
/// under the same tag epoch and rule generation: counted in the slot.
/// `key` need not carry the tag (the epoch vouches for it).
#[inline(always)]
fn slot_repeat(pid_tgid: u64, epoch: u64, generation: u32, key: &FlowKey) -> bool {
    let Some(s) = slot_take() else { return false };
    // SAFETY: the slot is this run's until released.
    let hit = unsafe {
        (*s).pid_tgid == pid_tgid
            && (*s).tag_epoch == epoch
            && (*s).generation == generation
            && same_action(&(*s).key, key)
    };
    if hit {
        // SAFETY: as above; the daemon only reads it.
        unsafe { (*s).pending += 1 };
    }
    slot_release(s);
    hit
}

/// Put the flow `key` (`serial`), just counted for task `pid_tgid` under
/// `epoch` and `generation`, in this CPU's slot; what the slot counted
/// before goes to its own flow first.
#[inline(always)]
fn slot_fill(pid_tgid: u64, epoch: u64, generation: u32, key: &FlowKey, serial: u64) {
    let Some(s) = slot_take() else { return };
    // SAFETY: the slot is this run's until released. The atomic adds on
    // `seq` (odd in between) fence the refill for a reader.
    unsafe {
        let seq = core::ptr::addr_of_mut!((*s).seq);
        atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(seq, 1);
        let pending = (*s).pending;
        if pending != 0 {
            // A flow removed by the daemon since (its serial changed, or it
            // is gone) was accounted for with this count already.
            if let Some(c) = FLOWS.get_ptr_mut(&(*s).key) {
                if (*c).serial == (*s).serial {
                    add(c, pending);
                }
            }
            (*s).pending = 0;
        }
        (*s).pid_tgid = pid_tgid;
        (*s).tag_epoch = epoch;
        (*s).generation = generation;
        (*s).serial = serial;
        (*s).key = *key;
        atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(seq, 1);
    }
    slot_release(s);
}

/// First rule in `list` that matches the port and protocol.
#[inline(always)]
fn first_match(list: &NetRuleList, port: u16, protocol: u32) -> Option<(Decision, u32)> {
    let count = list.count as usize;
    for i in 0..limits::NET_RULES_PER_PREFIX {
        if i >= count {
            break;
        }
        let e = &list.entries[i];
        if port >= e.first_port
            && port <= e.last_port
            && (e.protocol == 0 || e.protocol == protocol)
        {
            return Some((Decision::from_u32(e.decision).unwrap_or(decide_unreadable()), e.rule_id));
        }
    }
    None
}

#[inline(always)]
fn decide(ctx: &SockAddrContext, hook: NetHook) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !hinted(pid_tgid as u32) {
        return 1;
    }
    // SAFETY: the context pointer is the kernel's bpf_sock_addr for this call.
    let sa = unsafe { &*ctx.sock_addr };
    let port = u16::from_be(sa.user_port as u16);
    let protocol = sa.protocol;

    // The destination as judged: ::ffff:a.b.c.d is a.b.c.d.
    // Built as words: byte stores would cost a memset call.
    let (words, family) = match hook {
        NetHook::Connect4 | NetHook::Sendmsg4 => ([sa.user_ip4, 0, 0, 0], AF_INET),
        NetHook::Connect6 | NetHook::Sendmsg6 => {
            let ip6 = sa.user_ip6;
            if ip6[0] == 0 && ip6[1] == 0 && ip6[2].to_ne_bytes() == [0, 0, 0xff, 0xff] {
                ([ip6[3], 0, 0, 0], AF_INET)
            } else {
                (ip6, AF_INET6)
            }
        }
    };
    // SAFETY: the same 16 bytes; any bit pattern is a valid byte array.
    let addr = unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(words) };

    // Fail-closed recording (events, issue 7): while events cannot be
    // recorded, a tagged task's connects and sends are denied.
    let recording_failed = crate::shared::recording_failed();
    // Read before the rules: a flow is only ever stamped with a generation
    // whose rules (written before the daemon bumps it) it was decided by.
    let generation = hook_flag(HookFlag::NetGeneration);
    // Read before the tag, likewise.
    let epoch = tag_epoch();
    let mut key = FlowKey {
        pid: (pid_tgid >> 32) as u32,
        session_id: 0,
        agent_id: 0,
        _pad: 0,
        hook: hook as u32,
        protocol,
        family,
        port,
        addr,
        uid: bpf_get_current_uid_gid() as u32,
    };
    if !recording_failed && slot_repeat(pid_tgid, epoch, generation, &key) {
        return 1;
    }
    let Some(tag) = tag_of(pid_tgid as u32) else {
        return 1;
    };
    key.session_id = tag.session_id;
    key.agent_id = tag.agent_id;
    if !recording_failed {
        if let Some(serial) = counted_repeat(&key, generation) {
            slot_fill(pid_tgid, epoch, generation, &key, serial);
            return 1;
        }
    }
    let agent_be = tag.agent_id.to_be_bytes();

    let list = if family == AF_INET {
        let mut v4 = [0u8; 4];
        v4.copy_from_slice(&addr[..4]);
        NET_V4.get(&Key::new(64, NetKeyV4 { agent_be, addr: v4 }))
    } else {
        NET_V6.get(&Key::new(160, NetKeyV6 { agent_be, addr }))
    };

    let (decision, rule_id) = match list.and_then(|l| first_match(l, port, protocol)) {
        Some(hit) => hit,
        None => (
            Decision::from_u32(agent_config(tag.agent_id).net_default).unwrap_or(decide_unreadable()),
            0,
        ),
    };
    let (decision, rule_id) = if recording_failed {
        (Decision::Deny, agentguard_common::RULE_FAIL_CLOSED)
    } else {
        (decision, rule_id)
    };

    let flow = if decision == Decision::Allow {
        match count_flow(&key, rule_id, generation) {
            (Flow::Repeat, serial) => {
                slot_fill(pid_tgid, epoch, generation, &key, serial);
                return 1;
            }
            (Flow::First, serial) => {
                slot_fill(pid_tgid, epoch, generation, &key, serial);
                NET_FLOW_FIRST
            }
            (Flow::Single, _) => 0,
        }
    } else {
        0
    };

    // An `approve` rule: a grant for this session, protocol and destination
    // lets the action through; otherwise it is refused and held (the daemon
    // freezes the agent when it reads the event, so it is sent at once).
    let (approval, approval_id) = if decision == Decision::Approve {
        let key = GrantKey { session_id: tag.session_id, kind: grant_kind::NET, op: protocol, port, family, target: addr };
        use_grant(&key)
    } else {
        (approval::NONE, 0)
    };
    let flags = if approval == approval::HELD {
        notify_hold(tag, grant_kind::NET);
        RB_FORCE_WAKEUP
    } else {
        0
    };
    emit_flags(
        NetEvent {
            header: header(EventKind::Net, tag),
            hook: hook as u32,
            decision: decision as u32,
            rule_id,
            protocol,
            family,
            port,
            approval,
            addr,
            approval_id,
            flow,
        },
        flags,
    );
    if decision.blocks() && !granted(approval) { 0 } else { 1 }
}

/// Empty programs at the same attach points, for benchmarks: the cost of the
/// mechanism itself (the "floor" B2u is stated against). Never attached by
/// the daemon.
#[cgroup_sock_addr(connect4)]
pub fn floor_connect4(_ctx: SockAddrContext) -> i32 {
    1
}

#[cgroup_sock_addr(sendmsg4)]
pub fn floor_sendmsg4(_ctx: SockAddrContext) -> i32 {
    1
}
