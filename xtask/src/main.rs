//! `cargo xtask`: the one entry point that sets up a machine, builds the
//! workspace, runs the daemon and runs every test (host and qemu VMs).
//!
//! This file owns only the command line and the dispatch; each command lives
//! in its own module.

mod apt;
mod bench;
mod build;
mod cmd;
mod host;
mod install;
mod kernels;
mod libtest;
mod repo;
mod report;
mod run;
mod setup;
mod test;
mod vm;

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Setup, build, run and test AgentGuard")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what this machine lacks (apt packages, rust-src, bpf-linker,
    /// the VM kernels). Idempotent: a second run only checks.
    Setup,
    /// Setup, then build the workspace (debug) and its test executables.
    Build,
    /// Setup and build, then run `agentguard daemon --policy-dir <repo>/policies`
    /// in the foreground. Arguments after `--` go to the daemon.
    Run {
        /// Extra arguments for the daemon.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Setup and build, then run unit tests and integration tests on the host
    /// and in qemu VMs (Debian cloud kernels 6.12 and 6.1).
    Test(test::TestArgs),
    /// Build in release and install the daemon as a systemd service: binary,
    /// unit, configuration (kept if it exists) and the shipped policies.
    Install(install::InstallArgs),
    /// Build in release and run the benchmark harnesses (B0-B9 as far as
    /// they exist); results go to bench/results/*.json.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> Result<ExitCode> {
    let root: PathBuf = repo::root();
    match command {
        Command::Setup => {
            setup::run(&root)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Build => {
            setup::run(&root)?;
            let built = build::run(&root)?;
            println!(
                "built: {} test executables ({} integration)",
                built.tests.len(),
                built.tests.iter().filter(|t| t.is_integration()).count()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { args } => {
            setup::run(&root)?;
            build::programs_only(&root)?;
            run::daemon(&root, &args)
        }
        Command::Test(args) => test::run(&root, &args),
        Command::Bench(args) => bench::run(&root, &args),
        Command::Install(args) => {
            install::run(&root, &args)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
