//! Network decisions for tagged processes: cgroup_sock_addr programs on
//! connect4/6 and sendmsg4/6 (unconnected UDP sends), attached at the cgroup2
//! root. Untagged processes are let through after one map lookup.
//!
//! Return 1 lets the call proceed; 0 makes the syscall fail with EPERM before
//! any packet leaves (kernel/bpf/cgroup.c, __cgroup_bpf_run_filter_sock_addr).
use agentguard_common::{Decision, EventKind, NetEvent, NetHook};
use aya_ebpf::{
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};

use crate::shared::{agent_config, current_tag, emit, header};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

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

#[inline(always)]
fn decide(ctx: &SockAddrContext, hook: NetHook) -> i32 {
    let Some(tag) = current_tag() else {
        return 1;
    };
    // SAFETY: the context pointer is the kernel's bpf_sock_addr for this call.
    let sa = unsafe { &*ctx.sock_addr };
    let mut addr = [0u8; 16];
    let family = match hook {
        NetHook::Connect4 | NetHook::Sendmsg4 => {
            addr[..4].copy_from_slice(&sa.user_ip4.to_ne_bytes());
            AF_INET
        }
        NetHook::Connect6 | NetHook::Sendmsg6 => {
            let ip6 = sa.user_ip6;
            addr[0..4].copy_from_slice(&ip6[0].to_ne_bytes());
            addr[4..8].copy_from_slice(&ip6[1].to_ne_bytes());
            addr[8..12].copy_from_slice(&ip6[2].to_ne_bytes());
            addr[12..16].copy_from_slice(&ip6[3].to_ne_bytes());
            AF_INET6
        }
    };
    let port = u16::from_be(sa.user_port as u16);
    let protocol = sa.protocol;

    let decision = Decision::from_u32(agent_config(tag.agent_id).net_default)
        .unwrap_or(crate::shared::decide_unreadable());

    emit(NetEvent {
        header: header(EventKind::Net, tag),
        hook: hook as u32,
        decision: decision as u32,
        rule_id: 0,
        protocol,
        family,
        port,
        _pad: 0,
        addr,
    });
    if decision.blocks() { 0 } else { 1 }
}
