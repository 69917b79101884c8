//! The `agentguard` command: parse arguments, call one function per subcommand.
use std::{path::PathBuf, process::ExitCode};

use agentguard::{
    cli,
    config::DEFAULT_CONFIG,
    killswitch::{Action, Target},
};
use agentguard::events::cli as events_cli;
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
    /// Stop the daemon. The pinned programs keep enforcing (as after SIGTERM or a
    /// crash) unless --unload: then every program, map and pin is removed.
    Stop {
        /// Detach and remove everything AgentGuard put in the kernel, and its empty cgroups.
        #[arg(long)]
        unload: bool,
        #[arg(long)]
        json: bool,
    },
    /// Stop every process of an agent at once (cgroup freezer); writes an incident record.
    /// Works with the daemon stopped.
    Freeze(KillswitchArgs),
    /// Resume a frozen agent.
    Thaw(KillswitchArgs),
    /// Kill every process of an agent and confirm none is left.
    Kill(KillswitchArgs),
    /// Actions held for a human by `approve` rules, pending an answer.
    Approvals {
        #[arg(long)]
        json: bool,
    },
    /// Let a held action through when the agent retries it (same session,
    /// same action, same target), then thaw the agent.
    #[command(group(clap::ArgGroup::new("how").args(["once", "for_duration"])))]
    Approve {
        id: u32,
        /// One retry passes (the default).
        #[arg(long)]
        once: bool,
        /// Every retry passes for this long (30s, 10m, 2h, 1d).
        #[arg(long = "for", value_name = "DURATION")]
        for_duration: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Keep a held action refused and thaw the agent (or kill it).
    Deny {
        id: u32,
        /// Kill every process of the agent instead of thawing it.
        #[arg(long)]
        kill: bool,
        #[arg(long)]
        json: bool,
    },
    /// Policy tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// The event log: readable for people (colour on a terminal), or the exact JSON lines.
    Events(EventsArgs),
    /// What an agent touched: processes, files, connections, grouped by reversibility.
    BlastRadius {
        agent: String,
        /// Only events since then: a duration back from now (60s, 5m, 2h, 1d) or an RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        json: bool,
        /// The event log (default: the configuration's).
        #[arg(long)]
        log: Option<PathBuf>,
    },
    /// Audit-log tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(clap::Args)]
struct EventsArgs {
    /// Only this agent's events.
    #[arg(long)]
    agent: Option<String>,
    /// Only events since then: a duration back from now (60s, 5m, 2h, 1d) or an RFC 3339 time.
    #[arg(long)]
    since: Option<String>,
    /// Keep printing new events as they are written.
    #[arg(long, short)]
    follow: bool,
    /// The log's JSON lines, byte for byte.
    #[arg(long)]
    json: bool,
    /// The event log (default: the configuration's).
    #[arg(long)]
    log: Option<PathBuf>,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain over every file of the log and against the chain-head
    /// checkpoint; name the first bad line and exit non-zero.
    Verify {
        /// The event log (default: the configuration's).
        #[arg(long)]
        log: Option<PathBuf>,
        /// The chain-head checkpoint (default: the configuration's).
        #[arg(long)]
        chain_head: Option<PathBuf>,
        /// Also check every line against docs/events.schema.json.
        #[arg(long)]
        schema: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["agent", "all"])))]
struct KillswitchArgs {
    /// The agent: its name under `agentguard run --agent NAME`, or its policy's name.
    agent: Option<String>,
    /// Every agent that has a cgroup.
    #[arg(long)]
    all: bool,
    /// Why (recorded in the incident record and the event log).
    #[arg(long)]
    reason: Option<String>,
    #[arg(long)]
    json: bool,
}

impl KillswitchArgs {
    fn run(self, ctx: &cli::Ctx, action: Action) -> anyhow::Result<ExitCode> {
        let Self { agent, all: _, reason, json } = self;
        let target = agent.map_or(Target::All, Target::Agent);
        cli::killswitch(ctx, action, &target, reason.as_deref(), json)
    }
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
    if !matches!(command, Command::Daemon { .. }) {
        // A reader that goes away (`agentguard events | head`) ends the
        // command quietly, as for any Unix tool, instead of a panic on
        // EPIPE. The daemon keeps Rust's default (ignored: a client that
        // hangs up is an error to handle, not a reason to die).
        // SAFETY: signal(2) only changes this process's disposition.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let ctx = cli::Ctx { config_path: config, socket };
    let result = match command {
        Command::Daemon { policy_dir, events_log } => cli::daemon(&ctx, policy_dir, events_log),
        Command::Doctor { json } => cli::doctor(json),
        Command::Run { agent, workspace, cmd } => cli::run(&ctx, &agent, workspace, &cmd),
        Command::Ps { json } => cli::ps(&ctx, json),
        Command::Reload => cli::reload(&ctx),
        Command::Stop { unload, json } => cli::stop(&ctx, unload, json),
        Command::Freeze(args) => args.run(&ctx, Action::Freeze),
        Command::Thaw(args) => args.run(&ctx, Action::Thaw),
        Command::Kill(args) => args.run(&ctx, Action::Kill),
        Command::Status { json } => cli::status(&ctx, json),
        Command::Approvals { json } => cli::approvals(&ctx, json),
        Command::Approve { id, once: _, for_duration, json } => cli::approve(&ctx, id, for_duration.as_deref(), json),
        Command::Deny { id, kill, json } => cli::deny(&ctx, id, kill, json),
        Command::Policy { command: PolicyCommand::Check { paths } } => cli::policy_check(&paths),
        Command::Events(EventsArgs { agent, since, follow, json, log }) => {
            events_cli::events(&ctx, events_cli::EventsArgs { agent, since, follow, json, log })
        }
        Command::BlastRadius { agent, since, json, log } => events_cli::blast_radius(&ctx, &agent, since.as_deref(), json, log),
        Command::Audit { command: AuditCommand::Verify { log, chain_head, schema, json } } => {
            events_cli::audit_verify(&ctx, log, chain_head, json, schema)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("agentguard: {e:#}");
            ExitCode::FAILURE
        }
    }
}
