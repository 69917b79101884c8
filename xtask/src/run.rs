//! `cargo xtask run`: the daemon in the foreground, with the repository's
//! policies. xtask replaces itself with the daemon (exec), so stdio, signals
//! and the exit code are the daemon's own.

use std::{
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Command, ExitCode},
};

use anyhow::{bail, Result};

use crate::{cmd, repo};

pub fn daemon(root: &Path, extra: &[String]) -> Result<ExitCode> {
    let bin = repo::agentguard_bin(root);
    let mut daemon = Command::new(&bin);
    daemon
        .arg("daemon")
        .arg("--policy-dir")
        .arg(repo::policies(root))
        .args(extra);
    println!("xtask: exec {}", cmd::describe(&daemon));
    let err = daemon.exec();
    bail!(
        "cannot exec {}: {err} (did `cargo xtask build` succeed?)",
        bin.display()
    )
}
