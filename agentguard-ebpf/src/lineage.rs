//! Process lineage: tag at exec when a selector matches, inherit at fork,
//! forget at exit.
//!
//! Plain sched tracepoints (not tp_btf): their record layout differs between
//! kernels (6.1 carries `char comm[16]`, 6.18 `__data_loc` strings), so the
//! loader reads the layout from tracefs and sets the offsets below. No kernel
//! struct offset is hard-coded here.
//!
//! Tags are keyed by task id, so threads are covered: sched_process_fork fires
//! for every new task (fork, vfork, clone, clone3, pthread_create) from
//! kernel_clone(), after copy_process() and before wake_up_new_task(), so the
//! child is tagged before it runs its first instruction.
use agentguard_common::{
    limits, CgroupMoveEvent, Counter, EventKind, ExecEvent, ExitEvent, ForkEvent, HookFlag,
    PathKey, Tag,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_task, bpf_get_current_uid_gid, bpf_probe_read_kernel,
        bpf_probe_read_kernel_str_bytes, generated::bpf_send_signal,
    },
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
    EbpfContext as _, Global,
};

use crate::shared::{
    count, emit, header, hook_flag, reserve, SCRATCH, SEL_CGROUP, SEL_COMM, SEL_EXE, SEL_UID,
    hint_set, tag_insert, tag_of, tag_remove,
};

const SIGSTOP: u32 = 19;
/// `ExecEvent::newly_tagged` when the process was also stopped (see above).
const EXEC_TAGGED_AND_HELD: u32 = agentguard_common::EXEC_TAGGED_AND_HELD;

#[unsafe(no_mangle)]
static FORK_CHILD_PID_OFF: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static EXEC_OLD_PID_OFF: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static EXEC_FILENAME_OFF: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static CGROUP_ATTACH_PID_OFF: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static CGROUP_ATTACH_DST_ID_OFF: Global<u32> = Global::new(0);
/// `task_struct.exit_code` (from BTF); 0: unknown, no status is read.
#[unsafe(no_mangle)]
static TASK_EXIT_CODE_OFF: Global<u32> = Global::new(0);

/// Set the tag-hint bit of the task id in the first argument. Never
/// attached: the daemon runs it with BPF_PROG_TEST_RUN before it writes a
/// tag itself (agents found running at start), so that only atomic kernel
/// instructions ever change the bitmap.
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn set_tag_hint(ctx: RawTracePointContext) -> i32 {
    let tid: u64 = ctx.arg(0);
    match u32::try_from(tid) {
        Ok(tid) => {
            hint_set(tid);
            0
        }
        Err(_) => 1,
    }
}

/// Change the tag epoch (shared.rs). Never attached: the daemon runs it with
/// BPF_PROG_TEST_RUN after it wrote or removed tags itself, or removed
/// flows, so that no per-CPU flow slot filled before is used again. Like the
/// hint bits, the epoch only ever changes by an atomic kernel instruction.
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn bump_tag_epoch(_ctx: RawTracePointContext) -> i32 {
    crate::shared::bump_tag_epoch();
    0
}

#[tracepoint]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    match try_fork(&ctx) {
        Ok(()) | Err(()) => 0,
    }
}

fn try_fork(ctx: &TracePointContext) -> Result<(), ()> {
    // `current` is the parent here.
    let tag = crate::shared::current_tag().ok_or(())?;
    // SAFETY: the offset comes from this kernel's tracefs format file.
    let child: i32 = unsafe { ctx.read_at(FORK_CHILD_PID_OFF.load() as usize) }.map_err(|_| ())?;
    let child = child as u32;
    if !tag_insert(child, &tag) {
        // An untagged child of an agent is an escape: count it so the daemon
        // reports it and can contain the agent.
        count(Counter::TagInsertFailures);
    }
    emit(ForkEvent {
        header: header(EventKind::Fork, tag),
        child_tid: child,
        _pad: 0,
    });
    Ok(())
}

#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    match try_exec(&ctx) {
        Ok(()) | Err(()) => 0,
    }
}

fn try_exec(ctx: &TracePointContext) -> Result<(), ()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    // SAFETY: offsets come from this kernel's tracefs format file.
    let old_pid: i32 = unsafe { ctx.read_at(EXEC_OLD_PID_OFF.load() as usize) }.map_err(|_| ())?;
    let old_pid = old_pid as u32;
    let data_loc: u32 =
        unsafe { ctx.read_at(EXEC_FILENAME_OFF.load() as usize) }.map_err(|_| ())?;

    // A non-leader thread that execs takes over the leader's pid (de_thread):
    // carry its tag over from its old task id.
    // SAFETY: values are copied out at once.
    let mut existing = tag_of(tid);
    if existing.is_none() && old_pid != tid {
        if let Some(tag) = tag_of(old_pid) {
            tag_remove(old_pid, false);
            if !tag_insert(tid, &tag) {
                count(Counter::TagInsertFailures);
            }
            existing = Some(tag);
        }
    }

    // Read the executed path into a zeroed scratch key (also the exe-selector key).
    let scratch = SCRATCH.get_ptr_mut(0).ok_or(())?;
    // SAFETY: per-CPU scratch, exclusive while this program runs.
    let key: &mut PathKey = unsafe { &mut *scratch };
    key.bytes = [0; limits::PATH_MAX];
    let filename_ptr = (ctx.as_ptr() as usize + (data_loc & 0xffff) as usize) as *const u8;
    // SAFETY: the __data_loc word points inside this tracepoint record.
    let _ = unsafe { bpf_probe_read_kernel_str_bytes(filename_ptr, &mut key.bytes) };

    let (tag, newly_tagged) = match existing {
        Some(tag) => (tag, 0),
        None => {
            let tag = select(key).ok_or(())?;
            if !tag_insert(tid, &tag) {
                count(Counter::TagInsertFailures);
            }
            // The network hooks are attached only while some agent is live.
            // A first agent must not act before they are: stop it here, at
            // its first instruction; the daemon attaches and resumes it. The
            // flag is read after the tag insert (the daemon's detach clears
            // the flag, then checks the tag map: see daemon.rs).
            if hook_flag(HookFlag::NetAttached) == 0 {
                // SAFETY: signals the current task; no pointers involved.
                unsafe { bpf_send_signal(SIGSTOP) };
                (tag, EXEC_TAGGED_AND_HELD)
            } else {
                (tag, 1)
            }
        }
    };

    let Some(mut entry) = reserve::<ExecEvent>() else {
        return Ok(());
    };
    // SAFETY: `ExecEvent` is plain data; every field is written below.
    let event = unsafe { &mut *entry.as_mut_ptr() };
    event.header = header(EventKind::Exec, tag);
    event.old_pid = old_pid;
    event.newly_tagged = newly_tagged;
    event.comm = bpf_get_current_comm().unwrap_or([0; limits::COMM_LEN]);
    event.filename = key.bytes;
    entry.submit(0);
    count(Counter::EventsSubmitted);
    Ok(())
}

/// The selectors, most specific first: the session cgroup (`agentguard run`),
/// the executable path, the command name, the user.
fn select(exe: &PathKey) -> Option<Tag> {
    // SAFETY (all lookups): values are copied out at once.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    if let Some(tag) = unsafe { SEL_CGROUP.get(&cgroup) } {
        return Some(session_of_match(*tag));
    }
    if let Some(tag) = unsafe { SEL_EXE.get(exe) } {
        return Some(session_of_match(*tag));
    }
    if let Ok(comm) = bpf_get_current_comm() {
        if let Some(tag) = unsafe { SEL_COMM.get(&comm) } {
            return Some(session_of_match(*tag));
        }
    }
    let uid = bpf_get_current_uid_gid() as u32;
    unsafe { SEL_UID.get(&uid) }.map(|t| session_of_match(*t))
}

/// A selector without a session of its own (everything but an `agentguard
/// run` cgroup) starts a new session rooted at the matching process: its pid
/// is the session id. Run sessions carry ids with the top bit set
/// ([`agentguard_common::RUN_SESSION_BIT`]), so the two never collide.
fn session_of_match(mut tag: Tag) -> Tag {
    if tag.session_id == 0 {
        tag.session_id = (bpf_get_current_pid_tgid() >> 32) as u32;
    }
    tag
}

#[tracepoint]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let Some(tag) = tag_of(tid) else {
        return 0;
    };
    // Dropped at exit so a reused task id never inherits a stale tag.
    tag_remove(tid, true);
    // One event per process, not per thread.
    if (pid_tgid >> 32) as u32 == tid {
        let (exit_code, flags) = exit_code();
        emit(ExitEvent {
            header: header(EventKind::Exit, tag),
            exit_code,
            flags,
        });
    }
    0
}

/// do_exit() stores the code in `current->exit_code` before this tracepoint
/// fires (for exit_group, every thread's is the group's code).
fn exit_code() -> (u32, u32) {
    let off = TASK_EXIT_CODE_OFF.load();
    if off == 0 {
        return (0, 0);
    }
    // SAFETY: `current` is a valid task; a probe read of one of its fields.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    match unsafe { bpf_probe_read_kernel(task.wrapping_add(off as usize) as *const u32) } {
        Ok(code) => (code, agentguard_common::EXIT_STATUS_KNOWN),
        Err(_) => (0, 0),
    }
}

/// A task moved to another cgroup (a write to `cgroup.procs` or
/// `cgroup.threads`, by anyone). For a tagged task, tell the daemon at once,
/// which moves it back if it left its session's cgroup: the freezer
/// (the killswitch) acts on that cgroup. Untagged moves cost one array load.
/// The record is a notification, not an event of the log, so it is not
/// counted in `EventsSubmitted`; a full ring counts it as a drop, and the
/// daemon's periodic reconciliation still finds the move.
#[tracepoint]
pub fn cgroup_attach_task(ctx: TracePointContext) -> u32 {
    let pid_off = CGROUP_ATTACH_PID_OFF.load();
    // 0: the loader did not find this kernel's layout (never a valid offset).
    if pid_off == 0 {
        return 0;
    }
    // SAFETY: offsets come from this kernel's tracefs format file.
    let Ok(moved) = (unsafe { ctx.read_at::<i32>(pid_off as usize) }) else {
        return 0;
    };
    let moved = moved as u32;
    let Some(tag) = tag_of(moved) else {
        return 0;
    };
    // SAFETY: as above.
    let dst = unsafe { ctx.read_at::<u64>(CGROUP_ATTACH_DST_ID_OFF.load() as usize) }.unwrap_or(0);
    if let Some(mut entry) = reserve::<CgroupMoveEvent>() {
        entry.write(CgroupMoveEvent {
            header: header(EventKind::CgroupMove, tag),
            moved_tid: moved,
            _pad: 0,
            dst_cgroup_id: dst,
        });
        entry.submit(crate::shared::RB_FORCE_WAKEUP);
    }
    0
}
