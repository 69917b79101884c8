//! Shared helpers for AgentGuard's integration tests: skipping with a reason
//! the test runner can count, RAII guards for cgroups and files, locating the
//! `agentguard` binary, and loading the real programs.
//!
//! Tests panic with context instead of returning `Result`.

pub mod bench;
pub mod daemon;
pub mod guard;
pub mod kernel;

use std::{io::Write as _, path::PathBuf};

/// Record that the calling test was skipped, and why. `cargo xtask test` reads
/// these records (one JSON object per line in `$AGENTGUARD_SKIP_FILE`) and
/// counts the test as skipped, never as passed. The caller must `return` right
/// after.
pub fn skip(reason: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed test thread>")
        .to_owned();
    eprintln!("SKIPPED {test}: {reason}");
    if let Some(path) = std::env::var_os("AGENTGUARD_SKIP_FILE") {
        let line = serde_json::json!({ "test": test, "reason": reason }).to_string();
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot open skip file {path:?}: {e}"));
        writeln!(file, "{line}").unwrap_or_else(|e| panic!("cannot write skip file: {e}"));
    }
}

/// Skip the current test with a reason unless `$cond` holds.
#[macro_export]
macro_rules! require {
    ($cond:expr, $($reason:tt)+) => {
        if !$cond {
            $crate::skip(&format!($($reason)+));
            return;
        }
    };
}

/// Whether a trivial BPF-LSM program (agentguard-ebpf's `lsm_probe`, which
/// does nothing) loads and attaches on this kernel. Where it does (the VMs),
/// AgentGuard's own BPF-LSM programs must too. Having `bpf` in the LSM list
/// is not enough: this host lists it and still refuses every BPF-LSM load.
pub fn bpf_lsm_loadable() -> bool {
    static LOADABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LOADABLE.get_or_init(|| {
        let Ok(btf) = aya::Btf::from_sys_fs() else { return false };
        let Ok(mut ebpf) = aya::EbpfLoader::new().btf(Some(&btf)).load(agentguard::loader::EBPF_OBJECT) else { return false };
        let Some(program) = ebpf.program_mut("lsm_probe") else { return false };
        let Ok(lsm) = <&mut aya::programs::Lsm>::try_from(program) else { return false };
        lsm.load("path_unlink", &btf).is_ok() && lsm.attach().is_ok()
    })
}

/// Skip a test that needs AgentGuard's BPF-LSM programs, which did not
/// load. Where a BPF-LSM program can load at all (the VMs) that is a
/// regression, not a reason to skip: it fails the test instead, so a
/// program the verifier starts refusing can never pass as a run of skips.
pub fn skip_without_lsm(reason: &str) {
    assert!(!bpf_lsm_loadable(), "BPF-LSM programs load on this kernel, yet AgentGuard's did not: {reason}");
    skip(reason);
}

/// [`require!`] for a BPF-LSM program (see [`skip_without_lsm`]).
#[macro_export]
macro_rules! require_lsm {
    ($cond:expr, $($reason:tt)+) => {
        if !$cond {
            $crate::skip_without_lsm(&format!($($reason)+));
            return;
        }
    };
}

/// The `agentguard` binary under test: `$AGENTGUARD_BIN`, else next to the
/// test binary's directory (target/debug/agentguard).
pub fn agentguard_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("AGENTGUARD_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // A bin (target/debug/ag-bench) sits next to it; a test binary
    // (target/debug/deps/<test>) one level below.
    let dir = exe.parent().expect("binary has a parent directory");
    let sibling = dir.join("agentguard");
    if sibling.exists() {
        return sibling;
    }
    dir.parent().unwrap_or(dir).join("agentguard")
}

/// The repo's shipped policies: `$AGENTGUARD_POLICY_DIR` (the VM harness
/// copies them into its image), else `policies/` in the source tree.
pub fn shipped_policy_dir() -> PathBuf {
    std::env::var_os("AGENTGUARD_POLICY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // No `..`: the VM image holds <repo>/policies but not <repo>/tests.
            let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
            manifest.parent().unwrap_or(manifest).join("policies")
        })
}

pub mod dns;
