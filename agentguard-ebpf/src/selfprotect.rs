//! Self-protection, where BPF-LSM loads: a tagged process (an agent) may not
//! signal or ptrace the daemon, nor call bpf() at all (it could detach or
//! rewrite AgentGuard's programs and maps). The daemon's tgid is in
//! `AG_HOOKS[DaemonTgid]` (written at each start); 0 protects no process.
//!
//! Each program passes an earlier BPF-LSM verdict through unchanged and
//! returns -EPERM for a tagged caller; untagged callers are never judged.
use agentguard_common::HookFlag;
use aya_ebpf::{helpers::bpf_probe_read_kernel, macros::lsm, programs::LsmContext, Global};

use crate::shared::{current_tag, HOOKS};

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
pub fn protect_task_kill(ctx: LsmContext) -> i32 {
    let previous: i32 = ctx.arg(4);
    if previous != 0 {
        return previous;
    }
    if current_tag().is_some() && is_daemon(ctx.arg(0)) { -EPERM } else { 0 }
}

/// security_ptrace_access_check(child, mode): PTRACE_ATTACH/SEIZE, and
/// every ptrace_may_access (/proc/PID/mem, process_vm_writev, pidfd_getfd).
#[lsm(hook = "ptrace_access_check")]
pub fn protect_ptrace(ctx: LsmContext) -> i32 {
    let previous: i32 = ctx.arg(2);
    if previous != 0 {
        return previous;
    }
    if current_tag().is_some() && is_daemon(ctx.arg(0)) { -EPERM } else { 0 }
}

/// security_bpf(cmd, attr, size): no bpf() for agents. The hook gained a
/// fourth parameter in later kernels, which moves the verdict argument: one
/// program per shape, the loader attaches the one this kernel's BTF matches
/// (a ctx offset must be a constant for the verifier).
#[lsm(hook = "bpf")]
pub fn protect_bpf(ctx: LsmContext) -> i32 {
    bpf_verdict(ctx.arg(3))
}

/// security_bpf(cmd, attr, size, kernel).
#[lsm(hook = "bpf")]
pub fn protect_bpf4(ctx: LsmContext) -> i32 {
    bpf_verdict(ctx.arg(4))
}

#[inline(always)]
fn bpf_verdict(previous: i32) -> i32 {
    if previous != 0 {
        return previous;
    }
    if current_tag().is_some() { -EPERM } else { 0 }
}
