//! `cargo xtask bench`: build in release, run every benchmark harness binary
//! of the tests crate (`ag-bench*`) on this machine and B1 in the 6.12 VM,
//! then print one table over all of them and write it as
//! `bench/results/<stamp>-summary.json` (each harness's own document lands
//! next to it as `<stamp>-<harness>.json`).
//!
//! The table is made of the `"summary"` rows every harness writes (the shape
//! is defined once, in tests/src/bench.rs). A harness that crashes, exits
//! non-zero or writes no summary becomes a failure row and makes the command
//! exit non-zero; a missed target is a result, reported as `MISS`.
//! Benchmarks never run in `cargo xtask test`.

mod table;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use serde_json::{json, Value};

use self::table::Machine;
use crate::{cmd, setup};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// A smoke run in a couple of minutes (fewer rounds and iterations).
    #[arg(long)]
    pub quick: bool,
    /// Do not boot the VM (B1 with BPF-LSM is measured only there).
    #[arg(long)]
    pub no_vm: bool,
    /// Only B1 in the VM, none of the host harnesses.
    #[arg(long, conflicts_with = "no_vm")]
    pub vm_only: bool,
    /// Kill the benchmark VM after this long and count it as a failure.
    #[arg(long, value_name = "SECS", default_value_t = 3600)]
    pub vm_timeout: u64,
    /// Only these benchmarks (e.g. b2u b3), passed to each harness.
    pub only: Vec<String>,
}

/// One harness run, as the summary document records it.
struct HarnessRun {
    name: String,
    file: PathBuf,
    /// `None`: it ran and wrote a summary; otherwise why it failed.
    failure: Option<String>,
    selected: bool,
    rows: Vec<Value>,
    seconds: f64,
    load: (String, String),
    /// CPU time stolen by the hypervisor while it ran, in percent.
    steal_pct: Option<f64>,
}

pub fn run(root: &Path, args: &BenchArgs) -> Result<ExitCode> {
    setup::run(root)?;
    cmd::run(Command::new("cargo").current_dir(root).args([
        "build",
        "--release",
        "--workspace",
        "--exclude",
        "agentguard-ebpf",
        "--bins",
    ]))?;
    let results = root.join("bench/results");
    std::fs::create_dir_all(&results)
        .with_context(|| format!("cannot create {}", results.display()))?;
    let stamp = stamp(args.quick);
    let machine = Machine::probe();
    let release = root.join("target/release");

    let mut runs = Vec::new();
    for h in harnesses(&release)?.iter().filter(|_| !args.vm_only) {
        runs.push(run_harness(h, &results, &stamp, args));
    }
    if args.no_vm {
        println!("\nxtask: bench: --no-vm: B1 (BPF-LSM, in the VM) not measured");
    } else if vm::selected(&args.only) {
        let start = Instant::now();
        let before = table::loadavg();
        let ticks = table::cpu_ticks();
        let file = results.join(format!("{stamp}-ag-bench-files-vm-{}.json", vm::KERNEL));
        let (failure, rows) = match vm::b1(root, &release, &file, args.quick, args.vm_timeout) {
            Ok(rows) if rows.is_empty() => (
                Some("the VM's ag-bench-files wrote no summary rows".to_owned()),
                rows,
            ),
            Ok(rows) => (None, rows),
            Err(e) => (Some(format!("{e:#}")), Vec::new()),
        };
        runs.push(HarnessRun {
            name: format!("ag-bench-files (vm-{})", vm::KERNEL),
            file,
            failure,
            selected: true,
            rows,
            seconds: start.elapsed().as_secs_f64(),
            load: (before, table::loadavg()),
            steal_pct: table::steal_pct(ticks, table::cpu_ticks()),
        });
    }

    let runs: Vec<HarnessRun> = runs.into_iter().filter(|r| r.selected).collect();
    let mut rows: Vec<Value> = Vec::new();
    for r in &runs {
        match &r.failure {
            None => rows.extend(r.rows.iter().cloned()),
            Some(why) => rows.push(table::failure_row(&r.name, why)),
        }
    }
    table::sort(&mut rows);
    println!();
    print!("{}", table::render(&rows, &machine));
    println!("harnesses:");
    for r in &runs {
        println!(
            "  {:<28} {:>6.0} s  load {} -> {}  steal {}  {}",
            r.name,
            r.seconds,
            r.load.0,
            r.load.1,
            r.steal_pct.map_or_else(|| "?".to_owned(), |p| format!("{p:.1} %")),
            r.file.display()
        );
    }
    let failed = runs.iter().filter(|r| r.failure.is_some()).count();
    let missed = rows.iter().filter(|r| r["pass"] == false).count();
    let summary_path = results.join(format!("{stamp}-summary.json"));
    let doc = json!({
        "stamp": stamp,
        "quick": args.quick,
        "only": args.only,
        "machine": machine.to_json(),
        "harnesses": runs.iter().map(|r| json!({
            "name": r.name,
            "file": r.file,
            "failure": r.failure,
            "seconds": r.seconds,
            "loadavg_before": r.load.0,
            "loadavg_after": r.load.1,
            "steal_pct": r.steal_pct,
        })).collect::<Vec<_>>(),
        "summary": rows,
    });
    let text = serde_json::to_string_pretty(&doc).context("cannot serialise the summary")?;
    std::fs::write(&summary_path, text + "\n")
        .with_context(|| format!("cannot write {}", summary_path.display()))?;
    println!(
        "\n{} figures, {missed} targets missed, {failed} harnesses failed; summary: {}",
        rows.len(),
        summary_path.display()
    );
    Ok(if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The harness binaries in target/release, sorted.
fn harnesses(release: &Path) -> Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(release)
        .with_context(|| format!("cannot list {}", release.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("ag-bench") && !n.contains('.'))
        })
        .collect();
    found.sort();
    Ok(found)
}

fn run_harness(h: &Path, results: &Path, stamp: &str, args: &BenchArgs) -> HarnessRun {
    let name = h
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("ag-bench")
        .to_owned();
    let file = results.join(format!("{stamp}-{name}.json"));
    let _ = std::fs::remove_file(&file);
    let mut c = Command::new(h);
    if args.quick {
        c.arg("--quick");
    }
    c.arg("--json").arg(&file).args(&args.only);
    println!("\n== {name} ==");
    let before = table::loadavg();
    let ticks = table::cpu_ticks();
    let start = Instant::now();
    let status = c.status();
    let seconds = start.elapsed().as_secs_f64();
    let load = (before, table::loadavg());
    let steal_pct = table::steal_pct(ticks, table::cpu_ticks());
    let mut run = HarnessRun {
        name: name.clone(),
        file: file.clone(),
        failure: None,
        selected: true,
        rows: Vec::new(),
        seconds,
        load,
        steal_pct,
    };
    match status {
        Err(e) => run.failure = Some(format!("cannot start {}: {e}", h.display())),
        Ok(s) if !s.success() => {
            run.failure = Some(format!("{name} failed ({s}); see its output above"))
        }
        Ok(_) => match read_doc(&file) {
            Err(e) => run.failure = Some(format!("{e:#}")),
            Ok(doc) if doc["selected"] == false => run.selected = false,
            Ok(doc) => match doc["summary"].as_array() {
                Some(rows) if !rows.is_empty() => {
                    run.rows = rows
                        .iter()
                        .cloned()
                        .map(|mut r| {
                            r["env"] = json!("host");
                            r
                        })
                        .collect();
                }
                _ => {
                    run.failure = Some(format!(
                        "{name} wrote no \"summary\" rows to {}",
                        file.display()
                    ))
                }
            },
        },
    }
    if let Some(why) = &run.failure {
        eprintln!("xtask: bench: {why}");
    }
    run
}

fn read_doc(file: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("the harness wrote no results to {}", file.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))
}

/// `20261124T205741Z` (UTC), with `-quick` for smoke runs: sorts by time
/// and tells a smoke run from a full one at a glance.
fn stamp(quick: bool) -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let t = secs % 86_400;
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z{}",
        t / 3600,
        t / 60 % 60,
        t % 60,
        if quick { "-quick" } else { "" }
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_416), (2025, 11, 24));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
