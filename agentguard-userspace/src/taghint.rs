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
//!
//! The tag epoch (AG_TAG_EPOCH) follows the same rule: the network programs
//! count an allowed flow's repeats in a per-CPU slot while the epoch stays
//! the same, so after the daemon changed tags itself (or removed flows) it
//! runs `bump_tag_epoch`, which changes the epoch with an atomic add. A
//! read-modify-write from here could move the epoch back to a value a stale
//! slot still holds.
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd};

use agentguard_common::programs;
use aya::{programs::RawTracePoint, Ebpf};

/// Load the never-attached programs the daemon runs (once per start).
pub fn load(ebpf: &mut Ebpf) -> Result<(), String> {
    for name in [programs::SET_TAG_HINT, programs::BUMP_TAG_EPOCH] {
        let prog: &mut RawTracePoint = ebpf
            .program_mut(name)
            .ok_or_else(|| format!("the eBPF object has no program {name}"))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| e.to_string())?;
        prog.load().map_err(|e| format!("cannot load {name}: {e}"))?;
    }
    Ok(())
}

/// The descriptor of a loaded never-attached program.
fn program_fd<'a>(ebpf: &'a Ebpf, name: &str) -> Result<BorrowedFd<'a>, String> {
    let prog: &RawTracePoint = ebpf
        .program(name)
        .ok_or_else(|| format!("the eBPF object has no program {name}"))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    Ok(prog.fd().map_err(|e| format!("{name} is not loaded: {e}"))?.as_fd())
}

/// Run program `name` (descriptor `fd`) once with `arg` as its first raw
/// tracepoint argument (the only one either program reads); its return value.
fn test_run(name: &str, fd: BorrowedFd<'_>, arg: u64) -> Result<u32, String> {
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
    let args: [u64; 1] = [arg];
    let mut attr = TestRunAttr {
        prog_fd: fd.as_raw_fd() as u32,
        ctx_size_in: std::mem::size_of_val(&args) as u32,
        ctx_in: args.as_ptr() as u64,
        ..TestRunAttr::default()
    };
    // SAFETY: `attr` is the kernel's test-run layout, its ctx_in points at
    // `args` (alive across the call), no output buffers are given; the
    // kernel writes back only `retval` and `duration`.
    let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_TEST_RUN, std::ptr::from_mut(&mut attr), std::mem::size_of::<TestRunAttr>()) };
    if r != 0 {
        return Err(format!("BPF_PROG_TEST_RUN of {name}: {}", std::io::Error::last_os_error()));
    }
    Ok(attr.retval)
}

/// `bump_tag_epoch`, held by a descriptor of its own, for a holder that
/// does not keep the object (the flow ledger).
pub struct EpochBump(OwnedFd);

impl EpochBump {
    pub fn new(ebpf: &Ebpf) -> Result<Self, String> {
        let fd = program_fd(ebpf, programs::BUMP_TAG_EPOCH)?;
        fd.try_clone_to_owned().map(Self).map_err(|e| format!("cannot hold {}: {e}", programs::BUMP_TAG_EPOCH))
    }

    /// Change the tag epoch.
    pub fn bump(&self) -> Result<(), String> {
        test_run(programs::BUMP_TAG_EPOCH, self.0.as_fd(), 0).map(|_| ())
    }
}

/// Set the hint bit of task `tid`. Call before writing its tag.
pub fn set(ebpf: &Ebpf, tid: u32) -> Result<(), String> {
    // A raw tracepoint's context is its arguments: args[0] is the task id.
    if test_run(programs::SET_TAG_HINT, program_fd(ebpf, programs::SET_TAG_HINT)?, u64::from(tid))? != 0 {
        return Err(format!("{} refused task id {tid}", programs::SET_TAG_HINT));
    }
    Ok(())
}

/// Change the tag epoch: after the daemon wrote or removed tags.
pub fn bump_epoch(ebpf: &Ebpf) -> Result<(), String> {
    test_run(programs::BUMP_TAG_EPOCH, program_fd(ebpf, programs::BUMP_TAG_EPOCH)?, 0).map(|_| ())
}
