//! `cargo xtask test`: setup and build, then host unit tests, host
//! integration tests and VM integration tests (one qemu VM per kernel), then
//! the report. Exits non-zero if anything failed, crashed or timed out.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::{
    build::{self, TestExe, INTEGRATION_PACKAGE},
    host, kernels,
    report::{self, Counts, EnvResults, Outcome},
    setup,
    vm::{self, Executable},
};

#[derive(clap::Args)]
pub struct TestArgs {
    /// Only the host: unit tests and integration tests, no VM.
    #[arg(long, conflicts_with = "vm_only")]
    host_only: bool,
    /// Only the integration tests in the VMs.
    #[arg(long)]
    vm_only: bool,
    /// Boot only this kernel (6.12 or 6.1); default: all.
    #[arg(long, value_name = "LABEL")]
    kernel: Option<String>,
    /// How many VMs run at once. Each VM's tests run one at a time and keep
    /// about one host core busy with emulation (its verifier runs are most
    /// of its time), so on this 2-core machine two VMs side by side take
    /// about the time of one. Default: the host's cores, at most one per
    /// kernel. 1: one after the other.
    #[arg(long, value_name = "N")]
    vm_jobs: Option<usize>,
    /// Kill a VM that runs longer than this and count it as a failure. The
    /// 6.1 VM took 2 260 s of emulation on a slow day here (2026-12-06; the
    /// 6.12 VM 1 363 s, side by side); 3 000 s keeps a hang bounded, and with
    /// the VMs side by side the whole of CI (setup and build ~8 min, host
    /// ~17 min, then the slower VM) inside its 90 minutes.
    #[arg(long, value_name = "SECS", default_value_t = 3000)]
    vm_timeout: u64,
    /// Run only these integration test files (tests/tests/NAME.rs; repeat
    /// for more). For working on one capability; CI runs everything.
    #[arg(long = "only", value_name = "NAME")]
    only: Vec<String>,
    /// Also run this test executable as an integration test (host and VM);
    /// for exercising the harness.
    #[arg(long, value_name = "PATH")]
    extra_test_bin: Vec<PathBuf>,
    /// Run the --extra-test-bin executables alone, none of the project's
    /// integration tests (for example, a script that starts the daemon in
    /// the VM once and prints what the verifier said).
    #[arg(long, requires = "extra_test_bin", conflicts_with = "only")]
    only_extra: bool,
    /// vCPUs of each test VM. One measures what a program costs without
    /// another vCPU's turns in its clock (under single-threaded TCG; as the
    /// benchmark's VM does, `vm::BENCH_CPUS`); the tests want two.
    #[arg(long, value_name = "N", default_value_t = vm::TEST_CPUS, value_parser = clap::value_parser!(u32).range(1..=8))]
    vm_cpus: u32,
}

pub fn run(root: &Path, args: &TestArgs) -> Result<ExitCode> {
    let labels: Vec<&str> = match &args.kernel {
        Some(label) => vec![kernels::find(label)?.label],
        None => kernels::labels(),
    };
    setup::run(root)?;
    let built = build::run(root)?;
    let mut integration: Vec<TestExe> = built
        .tests
        .iter()
        .filter(|t| t.is_integration())
        .cloned()
        .collect();
    if !args.only.is_empty() {
        let known: Vec<String> = integration.iter().map(|t| t.target.clone()).collect();
        if let Some(bad) = args.only.iter().find(|n| !known.contains(n)) {
            anyhow::bail!("--only {bad}: no such integration test; there are: {}", known.join(", "));
        }
        integration.retain(|t| args.only.contains(&t.target));
    }
    if args.only_extra {
        integration.clear();
    }
    for path in &args.extra_test_bin {
        integration.push(extra(path)?);
    }

    let mut envs = Vec::new();
    if !args.vm_only {
        let mut outcomes = Vec::new();
        for exe in built.tests.iter().filter(|t| !t.is_integration()) {
            outcomes.extend(host::run_unit(exe));
        }
        for exe in &integration {
            outcomes.extend(host::run_integration(root, exe));
        }
        envs.push(EnvResults {
            env: "host".into(),
            outcomes,
            notes: Vec::new(),
        });
    }
    if !args.host_only {
        let programs: Vec<Executable> = built
            .programs
            .iter()
            .map(|p| Executable {
                name: p.name.clone(),
                path: p.path.clone(),
            })
            .collect();
        let timeout = Duration::from_secs(args.vm_timeout);
        let jobs = args
            .vm_jobs
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
            .max(1);
        envs.extend(vm_envs(root, &labels, &integration, &programs, timeout, jobs, args.vm_cpus));
    }

    println!();
    print!("{}", report::render(&envs));
    let totals = Counts::of(envs.iter().flat_map(|e| &e.outcomes));
    Ok(if totals.failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn vm_envs(
    root: &Path,
    labels: &[&str],
    integration: &[TestExe],
    programs: &[Executable],
    timeout: Duration,
    jobs: usize,
    cpus: u32,
) -> Vec<EnvResults> {
    if integration.is_empty() {
        println!(
            "xtask: vm: no integration test executables in {INTEGRATION_PACKAGE}; no VM booted"
        );
        return Vec::new();
    }
    let tests: Vec<Executable> = integration
        .iter()
        .map(|t| Executable {
            name: t.label(),
            path: t.path.clone(),
        })
        .collect();
    let failed_env = |label: &str, err: anyhow::Error| {
        let env = format!("vm-{label}");
        EnvResults {
            outcomes: vec![Outcome::binary_failure(&env, format!("{err:#}"))],
            env,
            notes: Vec::new(),
        }
    };
    let prepared = match vm::prepare(root, &tests, programs) {
        Ok(p) => p,
        Err(err) => {
            let err = format!("{err:#}");
            return labels
                .iter()
                .map(|l| failed_env(l, anyhow::anyhow!("{err}")))
                .collect();
        }
    };
    let run = |label: &str| vm::run(root, label, &prepared, timeout, cpus).unwrap_or_else(|e| failed_env(label, e));
    // Each VM has its own directory, initramfs and console log, and its
    // console lines carry its label, so VMs can run side by side; results
    // are reported in label order whatever order they finish in.
    let mut results = Vec::with_capacity(labels.len());
    for batch in labels.chunks(jobs) {
        if batch.len() == 1 {
            results.push(run(batch[0]));
            continue;
        }
        println!("xtask: vm: {} VMs at once: {}", batch.len(), batch.join(", "));
        std::thread::scope(|scope| {
            let running: Vec<_> = batch.iter().map(|label| scope.spawn(|| run(label))).collect();
            for (label, handle) in batch.iter().zip(running) {
                results.push(handle.join().unwrap_or_else(|_| failed_env(label, anyhow::anyhow!("the thread running this VM panicked"))));
            }
        });
    }
    results
}

/// A test executable given on the command line, treated as an integration test.
fn extra(path: &Path) -> Result<TestExe> {
    let path = path
        .canonicalize()
        .with_context(|| format!("--extra-test-bin {}: no such file", path.display()))?;
    let file = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .with_context(|| format!("--extra-test-bin {}: not a file", path.display()))?;
    // target/debug/deps/<name>-<16 hex digits>: drop cargo's hash.
    let name = match file.rsplit_once('-') {
        Some((stem, hash)) if hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()) => {
            stem.to_owned()
        }
        _ => file,
    };
    Ok(TestExe {
        package: INTEGRATION_PACKAGE.into(),
        target: name,
        kind: "test".into(),
        manifest_dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
        path,
    })
}
