//! The subcommands behind `main`: each turns arguments into a call on the
//! library or a request to the daemon, and renders the answer.
use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;
use serde_json::Value;

use crate::{
    config::Config,
    control::{self, Request},
    doctor, policy,
};

pub struct Ctx {
    pub config_path: PathBuf,
    pub socket: Option<PathBuf>,
}

impl Ctx {
    pub fn config(&self) -> anyhow::Result<Config> {
        let mut c = Config::load(&self.config_path)?;
        if let Some(s) = &self.socket {
            c.socket = s.clone();
        }
        Ok(c)
    }
}

pub fn init_tracing() {
    use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _, EnvFilter};
    let filter = EnvFilter::try_from_env("AGENTGUARD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Under systemd, to the journal with structured fields (PRIORITY, the
    // tracing fields as journal fields); a journal that cannot be reached
    // falls back to stderr, which systemd also collects.
    if crate::systemd::stderr_is_journal() {
        if let Ok(journald) = tracing_journald::layer() {
            let _ = tracing_subscriber::registry()
                .with(filter)
                .with(journald.with_syslog_identifier("agentguard".into()))
                .try_init();
            return;
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

pub fn daemon(ctx: &Ctx, policy_dir: Option<PathBuf>, events_log: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let mut config = ctx.config()?;
    if let Some(p) = policy_dir {
        config.policy_dir = p;
    }
    if let Some(e) = events_log {
        config.events_log = e;
    }
    crate::daemon::run(config)?;
    Ok(ExitCode::SUCCESS)
}

pub fn doctor(json: bool) -> anyhow::Result<ExitCode> {
    let report = doctor::run();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", doctor::render(&report));
    }
    Ok(if report.daemon_can_run { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

pub fn policy_check(paths: &[PathBuf]) -> anyhow::Result<ExitCode> {
    if paths.is_empty() {
        anyhow::bail!("give one or more policy files or directories");
    }
    let mut failed = false;
    for path in paths {
        let result = if path.is_dir() {
            policy::load_dir(path).map(|set| set.agents.len())
        } else {
            policy::load_file(path).map(|_| 1)
        };
        match result {
            Ok(n) => println!("{}: ok ({n} agent{})", path.display(), if n == 1 { "" } else { "s" }),
            Err(e) => {
                failed = true;
                eprintln!("{e}");
            }
        }
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

pub fn run(ctx: &Ctx, agent: &str, workspace: Option<PathBuf>, cmd: &[String]) -> anyhow::Result<ExitCode> {
    let config = ctx.config()?;
    let workspace = workspace
        .map(|w| std::fs::canonicalize(&w).with_context(|| format!("workspace {}", w.display())))
        .transpose()?;
    // The daemon creates the session and moves this process into its cgroup;
    // the exec below is then what the kernel tags.
    let answer = control::request(
        &config.socket,
        &Request::NewSession { agent: agent.to_owned(), workspace: workspace.clone() },
    )?;
    tracing::debug!(?answer, "session created");
    apply_landlock(&answer);
    let mut command = std::process::Command::new(&cmd[0]);
    command.args(&cmd[1..]);
    if let Some(w) = &workspace {
        command.current_dir(w);
    }
    let err = command.exec();
    Err(anyhow::anyhow!("cannot execute {}: {err}", cmd[0]))
}

/// Landlock rules for the policy's protected paths (landlock.rs), in this
/// process, which is already in its session cgroup and about to exec the
/// agent. A kernel without Landlock leaves the BPF programs alone in charge,
/// and says so.
fn apply_landlock(answer: &Value) {
    let paths: Vec<String> = answer["landlock"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default();
    if paths.is_empty() {
        return;
    }
    match crate::landlock::restrict(&paths) {
        Ok(Some(applied)) => tracing::debug!(abi = applied.abi, protected = ?applied.protected, grants = applied.grants, "Landlock applied"),
        Ok(None) => {}
        Err(e) => eprintln!("agentguard: warning: {e}; protected paths are guarded by the eBPF programs only"),
    }
}

fn ask(ctx: &Ctx, req: &Request) -> anyhow::Result<Value> {
    Ok(control::request(&ctx.config()?.socket, req)?)
}

pub fn reload(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let v = ask(ctx, &Request::Reload)?;
    let ms = |k: &str| v["timing"][k].as_f64().unwrap_or(f64::NAN);
    println!(
        "policy reloaded: version {}, agents {}; {:.0} ms (parse {:.0}, compile {:.0})",
        v["policy_version"],
        v["agents"],
        ms("total_ms"),
        ms("parse_ms"),
        ms("compile_ms")
    );
    for w in v["warnings"].as_array().into_iter().flatten() {
        eprintln!("warning: {}", w.as_str().unwrap_or_default());
    }
    Ok(ExitCode::SUCCESS)
}

/// `agentguard stop [--unload]`. With the daemon down, `--unload` removes
/// the pins itself (the programs a crashed daemon left enforcing).
pub fn stop(ctx: &Ctx, unload: bool, json: bool) -> anyhow::Result<ExitCode> {
    let config = ctx.config()?;
    // The programs the pinned links attach, to see them leave the kernel.
    let programs = if unload { crate::pins::pinned_program_ids(&config.pin_dir) } else { Vec::new() };
    let mut v = match control::request(&config.socket, &Request::Stop { unload }) {
        Ok(v) => v,
        Err(control::ClientError::NotRunning(_)) if unload => crate::daemon::unload_without_daemon(&config),
        Err(e) => return Err(e.into()),
    };
    if unload {
        // The daemon lets go of its programs as it exits, and the kernel
        // detaches a link whose last pin went from a work item of its own.
        let left = crate::pins::wait_unloaded(&programs, std::time::Duration::from_secs(10));
        if !left.is_empty() {
            v["unloaded"] = serde_json::Value::Bool(false);
        }
        v["programs_left"] = serde_json::json!(left);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        if v["stopped"] == true {
            println!("daemon stopped");
        } else {
            println!("the daemon was not running");
        }
        if !unload {
            println!("the pinned programs keep enforcing ({}); `agentguard stop --unload` removes them", config.pin_dir.display());
        } else if v["unloaded"] == true {
            println!("unloaded: {} pins removed; nothing of AgentGuard is left in the kernel", v["pins_removed"]);
        } else if v["pin_error"].is_string() {
            println!("unload incomplete: {}", v["pin_error"]);
        } else {
            println!(
                "unload incomplete: the pins are removed but programs {} are still loaded after 10 s (a process holds them: `bpftool prog show id N` lists its pids)",
                v["programs_left"]
            );
        }
        for c in v["cgroups_left"].as_array().into_iter().flatten() {
            println!("  cgroup kept (processes still in it): {}", c.as_str().unwrap_or_default());
        }
    }
    Ok(if !unload || v["unloaded"] == true { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

pub fn ps(ctx: &Ctx, json: bool) -> anyhow::Result<ExitCode> {
    let v = ask(ctx, &Request::Ps)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let procs = v["processes"].as_array().cloned().unwrap_or_default();
    if procs.is_empty() {
        println!("no agent processes");
    }
    println!("{:<16} {:>10} {:>8} {:>8}  COMMAND", "AGENT", "SESSION", "PID", "PPID");
    let mut rows: Vec<_> = procs.iter().collect();
    rows.sort_by_key(|p| (p["agent"].as_str().unwrap_or("").to_owned(), p["session"].as_u64(), p["pid"].as_u64()));
    for p in rows {
        let argv: Vec<&str> = p["argv"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        println!(
            "{:<16} {:>10} {:>8} {:>8}  {}",
            p["agent"].as_str().unwrap_or("?"),
            session_label(p["session"].as_u64().unwrap_or(0)),
            p["pid"].as_u64().unwrap_or(0),
            p["ppid"].as_u64().unwrap_or(0),
            argv.join(" ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn session_label(id: u64) -> String {
    crate::cgroups::session_name(u32::try_from(id).unwrap_or(0))
}

pub fn status(ctx: &Ctx, json: bool) -> anyhow::Result<ExitCode> {
    let v = ask(ctx, &Request::Status)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("agentguard {} (pid {})", v["version"].as_str().unwrap_or("?"), v["daemon_pid"]);
        println!("policy:   version {} sha256 {}", v["policy"]["version"], v["policy"]["hash"].as_str().unwrap_or("?"));
        println!("agents:   {}", v["agents"]);
        println!("sessions: {}", v["sessions"]);
        for s in v["session_list"].as_array().into_iter().flatten() {
            println!("  {:<16} {:>10} {:<8} {}", s["agent"].as_str().unwrap_or("?"), session_label(s["id"].as_u64().unwrap_or(0)), s["kind"].as_str().unwrap_or("?"), s["cgroup"].as_str().unwrap_or(""));
        }
        if let Some(e) = v["enforcement"].as_object() {
            for (class, how) in e {
                println!("{:<10} {}", format!("{class}:"), how.as_str().unwrap_or("?"));
            }
        }
        println!("pins: {} ({} pinned)", v["pins"]["dir"].as_str().unwrap_or("?"), v["pins"]["pinned"]);
        println!("pending approvals: {}", v["pending_approvals"].as_array().map_or(0, Vec::len));
        println!("events logged: {}, decode errors: {}", v["events_logged"], v["decode_errors"]);
        println!("kernel counters: {}", v["kernel_counters"]);
        let skipped: Vec<String> = v["skipped_runs"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
            .map(|(p, n)| format!("{p} {n}"))
            .collect();
        if v["skipped_runs"].is_null() {
            println!("runs skipped by the kernel: not counted on this kernel (before 5.12)");
        } else if skipped.is_empty() {
            println!("runs skipped by the kernel: none");
        } else {
            println!("runs skipped by the kernel: {} (`skipped_runs` events in the log say what each risked)", skipped.join(", "));
        }
        println!("approvals pending: {} (`agentguard approvals`)", v["approvals_pending"]);
        if let Some(detail) = v["file_enforcement"]["detail"].as_str() {
            println!("file actions: {detail}");
        }
        print!("{}", crate::events::cli::render_status(&v["audit"]));
        for p in v["probes"].as_array().into_iter().flatten() {
            println!("  {:<20} {:<8} {}", p["program"].as_str().unwrap_or("?"), p["class"].as_str().unwrap_or("?"), p["state"].as_str().unwrap_or("?"));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `agentguard freeze|thaw|kill AGENT|--all`. With the daemon running it
/// acts, writes the incident and logs the action; with the daemon stopped
/// the CLI acts on the cgroups itself and writes the incident of a freeze
/// from the log file. Either way a caller inside
/// AgentGuard's subtree is refused first (see
/// `killswitch::refuse_caller_inside_subtree`).
pub fn killswitch(
    ctx: &Ctx,
    action: crate::killswitch::Action,
    target: &crate::killswitch::Target,
    reason: Option<&str>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use crate::killswitch::{self as ks, Action, ActionResult};
    let config = ctx.config()?;
    ks::refuse_caller_inside_subtree(&config.cgroup_subtree, ks::own_cgroup().as_deref())?;
    let (target, reason_owned) = (target.clone(), reason.map(str::to_owned));
    let req = match action {
        Action::Freeze => Request::Freeze { target: target.clone(), reason: reason_owned },
        Action::Thaw => Request::Thaw { target: target.clone(), reason: reason_owned },
        Action::Kill => Request::Kill { target: target.clone(), reason: reason_owned },
    };
    let act_here = || -> anyhow::Result<Vec<ActionResult>> {
        let killswitch = ks::Killswitch::from_config(&config)?;
        let sink = ks::IncidentSink { dir: &config.incident_dir, events_log: &config.events_log, recorded_by: "cli" };
        Ok(ks::perform(&killswitch, action, &target, &crate::incident::Actor::this_process(), reason, &sink)?)
    };
    // Only a daemon that is not running is bypassed. One that runs but does
    // not answer is not: it alone checks the caller's kernel tag, and a
    // caller it refused must not get the action done anyway.
    let (results, by_daemon) = match control::request(&config.socket, &req) {
        Ok(v) => (serde_json::from_value(v["results"].clone()).context("the daemon's answer has no readable results")?, true),
        Err(control::ClientError::NotRunning(_)) => (act_here()?, false),
        Err(e @ control::ClientError::Refused(_)) => return Err(e.into()),
        Err(e) => anyhow::bail!(
            "{e}\nnothing was done. If the daemon is wedged, stop it (`systemctl stop agentguard`, or kill it) and run this again: with the daemon stopped the CLI acts on the cgroups itself"
        ),
    };
    let all_confirmed = results.iter().all(|r: &ActionResult| r.outcome.confirmed);
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "results": results, "daemon": by_daemon }))?);
    } else {
        if results.is_empty() {
            println!("no agent has a cgroup: nothing to {}", action.name());
        }
        for r in &results {
            println!("{}", r.outcome.summary());
            if let Some(p) = &r.incident {
                println!("  incident: {}", p.display());
            }
            if let Some(e) = &r.incident_error {
                println!("  no incident record: {e}");
            }
        }
        if !by_daemon {
            println!("(the daemon is not running: acted on the cgroups directly; the event log has no record of this)");
        }
    }
    Ok(if all_confirmed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Used by tests and docs: the default policy shipped in the repo.
pub fn shipped_policy_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../policies"))
}

/// `agentguard approvals [--json]`: the pending approvals.
pub fn approvals(ctx: &Ctx, json: bool) -> anyhow::Result<ExitCode> {
    let v = ask(ctx, &Request::Approvals)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v["pending"])?);
    } else {
        let pending = v["pending"].as_array().cloned().unwrap_or_default();
        print!("{}", crate::approvals::render(&pending, v["now_ns"].as_i64().unwrap_or(0)));
    }
    Ok(ExitCode::SUCCESS)
}

/// `agentguard approve ID [--once | --for DURATION]`.
pub fn approve(ctx: &Ctx, id: u32, for_duration: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    let grant = match for_duration {
        None => crate::approvals::Grant::Once,
        Some(d) => crate::approvals::Grant::For {
            seconds: crate::approvals::parse_grant_duration(d).map_err(anyhow::Error::msg)?.as_secs(),
        },
    };
    let v = ask(ctx, &Request::Approve { id, grant })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let how = if v["grant"] == "once" { "once".to_owned() } else { format!("until {}", v["grant_until"].as_str().unwrap_or("?")) };
        println!("approval {id} granted {how}: {} may retry {}", v["agent"].as_str().unwrap_or("?"), v["target"].as_str().unwrap_or("?"));
        if v["thawed"] != true {
            println!("  the agent stays frozen: other approvals still hold it (`agentguard approvals`)");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `agentguard deny ID [--kill]`.
pub fn deny(ctx: &Ctx, id: u32, kill: bool, json: bool) -> anyhow::Result<ExitCode> {
    let v = ask(ctx, &Request::Deny { id, kill })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let agent = v["agent"].as_str().unwrap_or("?");
        let what = if v["killed"] == true {
            format!("{agent} killed")
        } else if v["thawed"] == true {
            format!("{agent} thawed; it sees the action refused")
        } else {
            format!("{agent} stays frozen: other approvals still hold it")
        };
        println!("approval {id} denied: {what}");
    }
    Ok(ExitCode::SUCCESS)
}
