//! `cargo xtask setup`: make this machine (Debian 12, root, rustup with stable
//! and nightly) able to build and test AgentGuard. Every item is checked first
//! and installed only when missing, so a second run changes nothing and takes
//! a moment. Prints one `ok` / `installed` line per item.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result};

use crate::{apt::Apt, cmd, kernels};

/// Debian packages: LLVM 22 for bpf-linker, qemu + busybox + cpio for the VM
/// tests, systemd for `systemd-analyze verify` of the unit.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "systemd",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

/// Print one status line for a setup item.
pub fn status(state: &str, item: &str) {
    println!("setup: {state:<9} {item}");
}

pub fn run(root: &Path) -> Result<()> {
    let mut apt = Apt::default();
    apt_packages(&mut apt)?;
    rust_src()?;
    bpf_linker()?;
    kernels::ensure_all(root, &mut apt)?;
    Ok(())
}

fn apt_packages(apt: &mut Apt) -> Result<()> {
    let missing = apt.missing(APT_PACKAGES)?;
    apt.install(&missing)?;
    for p in APT_PACKAGES {
        let state = if missing.iter().any(|m| m == p) {
            "installed"
        } else {
            "ok"
        };
        status(state, &format!("apt {p}"));
    }
    Ok(())
}

fn rust_src() -> Result<()> {
    let item = "rustup component rust-src (nightly)";
    let installed = cmd::stdout(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("cannot list nightly's components: is rustup installed with a nightly toolchain?")?;
    if installed.lines().any(|l| l.trim().starts_with("rust-src")) {
        status("ok", item);
        return Ok(());
    }
    cmd::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
    .context("cannot add rust-src to the nightly toolchain")?;
    status("installed", item);
    Ok(())
}

fn bpf_linker() -> Result<()> {
    let item = format!("bpf-linker {BPF_LINKER_VERSION}");
    let current = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if current.split_whitespace().any(|w| w == BPF_LINKER_VERSION) {
        status("ok", &item);
        return Ok(());
    }
    println!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    cmd::run(
        Command::new(cargo)
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22"]),
    )
    .context("cannot install bpf-linker: llvm-22-dev and libpolly-22-dev must be installed")?;
    status("installed", &item);
    Ok(())
}
