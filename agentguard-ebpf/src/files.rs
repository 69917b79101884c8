//! File decisions for tagged processes, in BPF-LSM hooks. Loaded only where
//! BPF-LSM is active; elsewhere the daemon observes and contains instead.
//!
//! An LSM program returns 0 to allow or a negative errno to refuse. When an
//! earlier LSM already refused (`ret` argument non-zero), that verdict is
//! passed through unchanged.
use agentguard_common::{limits, Decision, Enforcement, EventKind, FileEvent, FileOp};
use aya_ebpf::{helpers::generated::bpf_d_path, macros::lsm, programs::LsmContext};

use crate::shared::{agent_config, count, current_tag, header, reserve};

const EPERM: i32 = 1;

/// security_path_unlink(const struct path *dir, struct dentry *dentry): ret is arg 2.
#[lsm(hook = "path_unlink")]
pub fn path_unlink(ctx: LsmContext) -> i32 {
    let previous: i32 = ctx.arg(2);
    if previous != 0 {
        return previous;
    }
    let Some(tag) = current_tag() else {
        return 0;
    };
    let decision = Decision::from_u32(agent_config(tag.agent_id).file_default)
        .unwrap_or(crate::shared::decide_unreadable());
    if let Some(mut entry) = reserve::<FileEvent>() {
        // SAFETY: plain data; the fields are written below, the paths by the helper.
        let event = unsafe { &mut *entry.as_mut_ptr() };
        event.header = header(EventKind::File, tag);
        event.op = FileOp::Unlink as u32;
        event.decision = decision as u32;
        event.rule_id = 0;
        event.enforcement = Enforcement::Enforced as u32;
        event.name[0] = 0;
        let dir: *mut aya_ebpf::bindings::path = ctx.arg(0);
        // SAFETY: `dir` is the hook's trusted struct path argument.
        let n = unsafe {
            bpf_d_path(dir, event.dir.as_mut_ptr().cast(), limits::PATH_MAX as u32)
        };
        if n < 0 {
            event.dir[0] = 0;
        }
        entry.submit(0);
        count(agentguard_common::Counter::EventsSubmitted);
    }
    if decision.blocks() { -EPERM } else { 0 }
}

/// Does nothing; `doctor` loads it to prove BPF-LSM programs load and attach here.
#[lsm(hook = "path_unlink")]
pub fn lsm_probe(ctx: LsmContext) -> i32 {
    ctx.arg(2)
}
