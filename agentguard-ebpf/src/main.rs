//! AgentGuard's kernel programs: one module per concern.
//!
//! - `lineage`: tag processes at exec, inherit tags through fork, drop them at exit;
//! - `net`: connect / sendmsg decisions for tagged processes (cgroup_sock_addr);
//! - `files`: BPF-LSM file-action decisions for tagged processes;
//! - `fileobs`: the same actions observed through syscall tracepoints and
//!   contained, where BPF-LSM cannot load;
//! - `dircache`: the directory cache that lets a tagged agent's repeated
//!   allowed file actions in one directory skip the walk;
//! - `selfprotect`: agents may not signal or ptrace the daemon, nor call bpf();
//! - `filejudge`, `filepath`, `kstructs`: the file decision they share, path
//!   assembly, and reading kernel structs at offsets taken from BTF.
//!
//! Fail-open or fail-closed is decided in one place, [`shared::decide_unreadable`].
#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target has no `AtomicU64::fetch_add` (it declares
// no compare-and-swap), but LLVM lowers an atomic add to BPF's own atomic
// add instruction (net.rs counts flows with it).
#![expect(internal_features, reason = "core_intrinsics is how the BPF target gets an atomic add")]
#![feature(core_intrinsics)]

mod dircache;
mod filejudge;
mod fileobs;
mod filepath;
mod files;
mod kstructs;
mod lineage;
mod net;
mod selfprotect;
mod shared;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this: it is never called.
    loop {}
}

/// The license the kernel checks before granting GPL-only helpers (bpf_d_path, bpf_send_signal).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
