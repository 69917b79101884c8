//! `cargo xtask bench`: build in release and run every benchmark harness
//! binary of the tests crate (`ag-bench*`), each writing its JSON results
//! under bench/results/. Benchmarks measure ratios against the same machine
//! with no agent loaded; they never run in `cargo xtask test`.
use std::{
    path::Path,
    process::{Command, ExitCode},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};

use crate::{cmd, setup};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// A smoke run in a couple of minutes (fewer rounds and iterations).
    #[arg(long)]
    pub quick: bool,
    /// Only these benchmarks (e.g. b2u b3), passed to each harness.
    pub only: Vec<String>,
}

pub fn run(root: &Path, args: &BenchArgs) -> Result<ExitCode> {
    setup::run(root)?;
    cmd::run(
        Command::new("cargo")
            .current_dir(root)
            .args(["build", "--release", "--workspace", "--exclude", "agentguard-ebpf", "--bins"]),
    )?;
    let results = root.join("bench/results");
    std::fs::create_dir_all(&results).with_context(|| format!("cannot create {}", results.display()))?;
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let release = root.join("target/release");
    let mut harnesses: Vec<_> = std::fs::read_dir(&release)
        .with_context(|| format!("cannot list {}", release.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("ag-bench") && !n.contains('.'))
        })
        .collect();
    harnesses.sort();
    let mut failed = false;
    for h in harnesses {
        let name = h.file_name().and_then(|n| n.to_str()).unwrap_or("bench").to_owned();
        let out = results.join(format!("{stamp}-{name}{}.json", if args.quick { "-quick" } else { "" }));
        let mut c = Command::new(&h);
        if args.quick {
            c.arg("--quick");
        }
        c.arg("--json").arg(&out).args(&args.only);
        println!("\n== {name} ==");
        if let Err(e) = cmd::run(&mut c) {
            eprintln!("xtask: {name} failed: {e:#}");
            failed = true;
        } else {
            println!("results: {}", out.display());
        }
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
