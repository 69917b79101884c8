//! Where things are: the repository root and the paths xtask reads and writes
//! under it (`target/debug`, the git-ignored `build/` cache).

use std::path::{Path, PathBuf};

/// The workspace root: the parent of this crate's manifest directory.
pub fn root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest.to_path_buf())
}

/// `target/debug/agentguard`, the daemon and CLI binary (in
/// `$CARGO_TARGET_DIR` when that is set).
pub fn agentguard_bin(root: &Path) -> PathBuf {
    target_dir(root).join("debug/agentguard")
}

/// Where cargo builds: `$CARGO_TARGET_DIR`, else `target/`.
pub fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => root.join(d),
        _ => root.join("target"),
    }
}

/// The policy directory the daemon runs with.
pub fn policies(root: &Path) -> PathBuf {
    root.join("policies")
}

/// `build/`: xtask's git-ignored cache and output directory.
pub fn build_dir(root: &Path) -> PathBuf {
    root.join("build")
}
