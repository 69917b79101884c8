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
//! An `allow` decision is recorded once per flow (process, rule, hook,
//! protocol, address, port): the first action is an event, its repeats are
//! counted in AG_FLOWS and the daemon logs the counts. A busy agent's
//! thousandth request to the same API then costs a hash lookup and an atomic
//! add, not a ring-buffer record (bench B2u). Every other decision is an
//! event each time.
//!
//! Return 1 lets the call proceed; 0 makes the syscall fail with EPERM before
//! any packet leaves (kernel/bpf/cgroup.c, __cgroup_bpf_run_filter_sock_addr).
use core::intrinsics::{atomic_xadd, AtomicOrdering};

use agentguard_common::{
    approval, grant_kind, limits, Counter, Decision, EventKind, FlowCount, FlowKey, GrantKey,
    NetEvent, NetHook, NetKeyV4, NetKeyV6, NetRuleList, NET_FLOW_FIRST,
};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_uid_gid},
    macros::{cgroup_sock_addr, map},
    maps::{lpm_trie::Key, HashMap, LpmTrie},
    programs::SockAddrContext,
};

use crate::shared::{
    agent_config, count, current_tag, decide_unreadable, emit_flags, granted, header, notify_hold,
    use_grant, RB_FORCE_WAKEUP,
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
    /// No room for another flow: an event of its own (counted as such).
    Single,
}

/// Count an allowed action in its flow, starting the flow if it is new.
#[inline(always)]
fn count_flow(key: &FlowKey) -> Flow {
    let add = |c: *mut FlowCount| {
        // SAFETY: a value of the hash map, valid for this program run;
        // other CPUs add to it too, hence the atomic add.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(core::ptr::addr_of_mut!((*c).count), 1) };
    };
    if let Some(c) = FLOWS.get_ptr_mut(key) {
        add(c);
        return Flow::Repeat;
    }
    if FLOWS.insert(key, &FlowCount { count: 1 }, u64::from(BPF_NOEXIST)).is_ok() {
        return Flow::First;
    }
    // Another CPU started the same flow meanwhile, or the map is full.
    if let Some(c) = FLOWS.get_ptr_mut(key) {
        add(c);
        return Flow::Repeat;
    }
    count(Counter::FlowsFull);
    Flow::Single
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
    let Some(tag) = current_tag() else {
        return 1;
    };
    // SAFETY: the context pointer is the kernel's bpf_sock_addr for this call.
    let sa = unsafe { &*ctx.sock_addr };
    let port = u16::from_be(sa.user_port as u16);
    let protocol = sa.protocol;
    let agent_be = tag.agent_id.to_be_bytes();

    let mut addr = [0u8; 16];
    let (family, list) = match hook {
        NetHook::Connect4 | NetHook::Sendmsg4 => {
            let v4 = sa.user_ip4.to_ne_bytes();
            addr[..4].copy_from_slice(&v4);
            let key = Key::new(64, NetKeyV4 { agent_be, addr: v4 });
            (AF_INET, NET_V4.get(&key))
        }
        NetHook::Connect6 | NetHook::Sendmsg6 => {
            let ip6 = sa.user_ip6;
            let w0 = ip6[0].to_ne_bytes();
            let w1 = ip6[1].to_ne_bytes();
            let w2 = ip6[2].to_ne_bytes();
            let w3 = ip6[3].to_ne_bytes();
            // ::ffff:a.b.c.d is judged as a.b.c.d.
            if ip6[0] == 0 && ip6[1] == 0 && w2 == [0, 0, 0xff, 0xff] {
                addr[..4].copy_from_slice(&w3);
                let key = Key::new(64, NetKeyV4 { agent_be, addr: w3 });
                (AF_INET, NET_V4.get(&key))
            } else {
                addr[0..4].copy_from_slice(&w0);
                addr[4..8].copy_from_slice(&w1);
                addr[8..12].copy_from_slice(&w2);
                addr[12..16].copy_from_slice(&w3);
                let key = Key::new(160, NetKeyV6 { agent_be, addr });
                (AF_INET6, NET_V6.get(&key))
            }
        }
    };

    let (decision, rule_id) = match list.and_then(|l| first_match(l, port, protocol)) {
        Some(hit) => hit,
        None => (
            Decision::from_u32(agent_config(tag.agent_id).net_default).unwrap_or(decide_unreadable()),
            0,
        ),
    };
    // Fail-closed recording (events, issue 7): while events cannot be
    // recorded, a tagged task's connects and sends are denied.
    let (decision, rule_id) = if crate::shared::recording_failed() {
        (Decision::Deny, agentguard_common::RULE_FAIL_CLOSED)
    } else {
        (decision, rule_id)
    };

    // An `approve` rule: a grant for this session, protocol and destination
    // lets the action through; otherwise it is refused and held (the daemon
    // freezes the agent when it reads the event, so it is sent at once).
    let flow = if decision == Decision::Allow {
        let key = FlowKey {
            pid: (bpf_get_current_pid_tgid() >> 32) as u32,
            session_id: tag.session_id,
            agent_id: tag.agent_id,
            rule_id,
            hook: hook as u32,
            protocol,
            family,
            port,
            addr,
            uid: bpf_get_current_uid_gid() as u32,
        };
        match count_flow(&key) {
            Flow::Repeat => return 1,
            Flow::First => NET_FLOW_FIRST,
            Flow::Single => 0,
        }
    } else {
        0
    };

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
