//! The tag-hint bitmap (AG_TAG_HINTS, one bit per task id) from the
//! daemon's side. Every kernel hook first tests the caller's bit and treats
//! a clear bit as "untagged" without looking the task up in AG_TAGS: the
//! common case, for every process on the host, costs one array load.
//!
//! That is only safe if a tagged task's bit is never clear. The kernel sets
//! bits with atomic or before it writes a tag (fork, exec). When the daemon
//! writes a tag itself (agents found running at start, restored sessions),
//! it must set the bit first too, and it cannot do that with a map update:
//! a read-modify-write of a 64-bit word would race with the kernel changing
//! another bit of it. So the daemon runs a small never-attached program,
//! `set_tag_hint`, with BPF_PROG_TEST_RUN, which sets the bit with the same
//! atomic instruction.
use std::os::fd::{AsFd as _, AsRawFd as _};

use agentguard_common::programs;
use aya::{programs::RawTracePoint, Ebpf};

/// Load the `set_tag_hint` program (once per daemon start; not attached).
pub fn load(ebpf: &mut Ebpf) -> Result<(), String> {
    let prog: &mut RawTracePoint = ebpf
        .program_mut(programs::SET_TAG_HINT)
        .ok_or_else(|| format!("the eBPF object has no program {}", programs::SET_TAG_HINT))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    prog.load().map_err(|e| format!("cannot load {}: {e}", programs::SET_TAG_HINT))
}

/// Set the hint bit of task `tid`. Call before writing its tag.
pub fn set(ebpf: &Ebpf, tid: u32) -> Result<(), String> {
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    /// The `test` member of `union bpf_attr`.
    #[repr(C)]
    #[derive(Default)]
    struct TestRunAttr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        _pad: u32,
    }
    let prog: &RawTracePoint = ebpf
        .program(programs::SET_TAG_HINT)
        .ok_or_else(|| format!("the eBPF object has no program {}", programs::SET_TAG_HINT))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    let fd = prog.fd().map_err(|e| format!("{} is not loaded: {e}", programs::SET_TAG_HINT))?;
    // A raw tracepoint's context is its arguments: args[0] is the task id.
    let args: [u64; 1] = [u64::from(tid)];
    let mut attr = TestRunAttr {
        prog_fd: fd.as_fd().as_raw_fd() as u32,
        ctx_size_in: std::mem::size_of_val(&args) as u32,
        ctx_in: args.as_ptr() as u64,
        ..TestRunAttr::default()
    };
    // SAFETY: `attr` is the kernel's test-run layout, its ctx_in points at
    // `args` (alive across the call), no output buffers are given; the
    // kernel writes back only `retval` and `duration`.
    let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_TEST_RUN, std::ptr::from_mut(&mut attr), std::mem::size_of::<TestRunAttr>()) };
    if r != 0 {
        return Err(format!("BPF_PROG_TEST_RUN of {}: {}", programs::SET_TAG_HINT, std::io::Error::last_os_error()));
    }
    if attr.retval != 0 {
        return Err(format!("{} refused task id {tid}", programs::SET_TAG_HINT));
    }
    Ok(())
}
