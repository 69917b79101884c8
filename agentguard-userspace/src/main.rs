//! The `agentguard` command: parse arguments, call one function per subcommand.
use std::{path::PathBuf, process::ExitCode};

use agentguard::{cli, config::DEFAULT_CONFIG};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "agentguard", version, about = "Kernel-level enforcement for AI agents")]
struct Args {
    /// Configuration file.
    #[arg(long, global = true, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Control socket (overrides the configuration).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground.
    Daemon {
        /// Policy directory (overrides the configuration).
        #[arg(long)]
        policy_dir: Option<PathBuf>,
        /// Event log (overrides the configuration).
        #[arg(long)]
        events_log: Option<PathBuf>,
    },
    /// What this kernel offers and how each action class will be enforced.
    Doctor {
        #[arg(long)]
        json: bool,
    },
    /// Start CMD as agent NAME, tagged from its first instruction.
    Run {
        #[arg(long)]
        agent: String,
        /// The session's workspace; CMD starts there.
        #[arg(long)]
        workspace: Option<PathBuf>,
        #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
        cmd: Vec<String>,
    },
    /// Agents, sessions and their processes.
    Ps {
        #[arg(long)]
        json: bool,
    },
    /// The daemon's state.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Re-read and apply the policies (as SIGHUP does); an invalid policy keeps the old one.
    Reload,
    /// Policy tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Check policy files (or every *.toml in a directory); exit non-zero on any error.
    Check { paths: Vec<PathBuf> },
}

fn main() -> ExitCode {
    let args = Args::parse();
    cli::init_tracing();
    let Args { config, socket, command } = args;
    let ctx = cli::Ctx { config_path: config, socket };
    let result = match command {
        Command::Daemon { policy_dir, events_log } => cli::daemon(&ctx, policy_dir, events_log),
        Command::Doctor { json } => cli::doctor(json),
        Command::Run { agent, workspace, cmd } => cli::run(&ctx, &agent, workspace, &cmd),
        Command::Ps { json } => cli::ps(&ctx, json),
        Command::Reload => cli::reload(&ctx),
        Command::Status { json } => cli::status(&ctx, json),
        Command::Policy { command: PolicyCommand::Check { paths } } => cli::policy_check(&paths),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("agentguard: {e:#}");
            ExitCode::FAILURE
        }
    }
}
