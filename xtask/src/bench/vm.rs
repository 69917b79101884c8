//! B1 in the qemu VM: the only place here where BPF-LSM loads. Boots the
//! 6.12 kernel with the release `ag-bench-files` as the one test binary and
//! the release `agentguard` as /bin/agentguard, and takes the harness's
//! results from the console (`AG-BENCH-FILES-JSON {...}`). Figures under TCG
//! are emulated: only ratios within the same VM mean anything, which is how
//! the harness states them.
//!
//! The VM gets a build directory of its own (build/bench-vm/build/vm), so a
//! benchmark run never overwrites the initramfs or console log of a
//! `cargo xtask test` running at the same time.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

use crate::{
    repo,
    report::Counts,
    vm::{self, Executable},
};

/// The kernel B1 is measured on.
pub const KERNEL: &str = "6.12";

/// The console line the harness prints its document on.
const MARK: &str = "AG-BENCH-FILES-JSON ";

/// Rounds and iterations per setup of a full run in the VM (the quick run
/// uses the harness's own quick pass: 3 rounds of 2 000). Under TCG each
/// operation costs about ten times what it does on the host.
const FULL: (usize, usize) = (7, 10_000);

/// Whether the selection asks for B1 (an empty one asks for everything).
pub fn selected(only: &[String]) -> bool {
    only.is_empty()
        || only
            .iter()
            .any(|s| ["b1", "unlink", "rename", "rmdir"].contains(&s.to_lowercase().as_str()))
}

/// Boot the VM, run the harness, write its document to `file`, and return
/// its summary rows marked with the VM they were measured in.
pub fn b1(
    root: &Path,
    release: &Path,
    file: &Path,
    quick: bool,
    timeout: u64,
) -> Result<Vec<Value>> {
    let vroot = private_root(root)?;
    // The harness reads its rounds from its name in the VM (no arguments of
    // ours reach it there; see harness_rounds in ag-bench-files.rs).
    let name = if quick {
        "ag-bench-files".to_owned()
    } else {
        format!("ag-bench-files-{}-{}", FULL.0, FULL.1)
    };
    let tests = [Executable {
        name,
        path: release.join("ag-bench-files"),
    }];
    let programs = [Executable {
        name: "agentguard".into(),
        path: release.join("agentguard"),
    }];
    for e in tests.iter().chain(&programs) {
        if !e.path.is_file() {
            bail!("{} was not built", e.path.display());
        }
    }
    println!("\n== ag-bench-files in the {KERNEL} VM (TCG) ==");
    let prepared = vm::prepare(&vroot, &tests, &programs)?;
    let env = vm::run(&vroot, KERNEL, &prepared, Duration::from_secs(timeout), vm::BENCH_CPUS)?;
    let log_path = repo::build_dir(&vroot)
        .join("vm")
        .join(KERNEL)
        .join("console.log");
    let log = std::fs::read_to_string(&log_path)
        .with_context(|| format!("cannot read the VM's console log {}", log_path.display()))?;
    let Some(doc) = document(&log) else {
        let why: Vec<String> = env
            .outcomes
            .iter()
            .filter_map(|o| o.note.clone())
            .chain(env.notes.iter().cloned())
            .collect();
        bail!(
            "the VM printed no {} line ({}); console log {}",
            MARK.trim(),
            why.join("; "),
            log_path.display()
        );
    };
    let mut doc = doc?;
    let kernel = log
        .lines()
        .find_map(|l| {
            l.split_once("@@AG KERNEL ")
                .map(|(_, k)| k.trim().to_owned())
        })
        .unwrap_or_else(|| KERNEL.to_owned());
    doc["vm"] = json!({ "kernel": kernel, "accel": "tcg", "notes": env.notes });
    let text = serde_json::to_string_pretty(&doc).context("cannot serialise the VM's results")?;
    std::fs::write(file, text + "\n")
        .with_context(|| format!("cannot write {}", file.display()))?;
    if Counts::of(&env.outcomes).failed > 0 {
        bail!(
            "ag-bench-files failed in the VM after printing its results; console log {}",
            log_path.display()
        );
    }
    let rows = doc["summary"].as_array().cloned().unwrap_or_default();
    Ok(rows
        .into_iter()
        .map(|mut r| {
            r["env"] = json!(format!("vm-{KERNEL} (TCG)"));
            r
        })
        .collect())
}

/// The harness's document from the console log, if it printed one.
fn document(log: &str) -> Option<Result<Value>> {
    let line = log
        .lines()
        .find_map(|l| l.split_once(MARK).map(|(_, j)| j.trim()))?;
    Some(serde_json::from_str(line).context("the VM's AG-BENCH-FILES-JSON line is not JSON"))
}

/// `build/bench-vm`, laid out as a repository root for the VM code: its own
/// `build/vm`, with the cached kernels and the policies linked in.
fn private_root(root: &Path) -> Result<PathBuf> {
    let vroot = repo::build_dir(root).join("bench-vm");
    let build = repo::build_dir(&vroot);
    std::fs::create_dir_all(build.join("vm"))
        .with_context(|| format!("cannot create {}", build.display()))?;
    for (link, target) in [
        (build.join("kernels"), repo::build_dir(root).join("kernels")),
        (repo::policies(&vroot), repo::policies(root)),
    ] {
        if link.symlink_metadata().is_err() {
            std::os::unix::fs::symlink(&target, &link).with_context(|| {
                format!("cannot link {} to {}", link.display(), target.display())
            })?;
        }
    }
    Ok(vroot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection() {
        assert!(selected(&[]));
        assert!(selected(&["B1".into()]));
        assert!(selected(&["rename".into()]));
        assert!(!selected(&["b1f".into(), "b6".into()]));
    }

    #[test]
    fn document_from_console() {
        let log = "noise\r\nAG-BENCH-FILES-JSON {\"summary\": []}\r\ntest x ... ok\n";
        let doc = document(log).expect("found").expect("json");
        assert_eq!(doc["summary"], json!([]));
        assert!(document("nothing").is_none());
    }
}
