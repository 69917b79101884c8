//! Rebuild the kernel programs when the bpf-linker binary changes: cargo
//! cannot see that dependency otherwise.
use std::env;

fn main() {
    // bpf-linker is found on PATH by rustc; track its mtime.
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
    println!("cargo:rerun-if-env-changed=PATH");
    let _ = env::var("PATH");
}
