//! The log's subcommands: `agentguard events`, `agentguard blast-radius` and
//! `agentguard audit verify`. They read the log files directly.
use std::{
    io::{self, IsTerminal as _, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;
use serde_json::Value;

use super::{blast, query};
use crate::{
    audit::{verify::verify, Checkpoint},
    cli::Ctx,
    schema::Schema,
};

pub struct EventsArgs {
    pub agent: Option<String>,
    pub since: Option<String>,
    pub follow: bool,
    pub json: bool,
    pub log: Option<PathBuf>,
}

fn use_color() -> bool {
    io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// A closed pipe (`agentguard events | head`) ends the command quietly.
fn quiet_pipe(r: io::Result<()>) -> anyhow::Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn log_path(ctx: &Ctx, log: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    Ok(match log {
        Some(l) => l,
        None => ctx.config()?.events_log,
    })
}

pub fn events(ctx: &Ctx, args: EventsArgs) -> anyhow::Result<ExitCode> {
    let EventsArgs { agent, since, follow, json, log } = args;
    let base = log_path(ctx, log)?;
    let filter = query::Filter {
        agent,
        since_ns: since.as_deref().map(query::parse_since).transpose().map_err(anyhow::Error::msg)?,
    };
    let color = use_color();
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let mut each = |line: &[u8]| -> io::Result<()> {
        if !filter.matches(line) {
            return Ok(());
        }
        if json {
            out.write_all(line)?;
            out.write_all(b"\n")?;
        } else {
            match serde_json::from_slice::<Value>(line) {
                Ok(v) => writeln!(out, "{}", render_line(&v, color))?,
                Err(_) => writeln!(out, "(unreadable line) {}", String::from_utf8_lossy(line))?,
            }
        }
        if follow {
            out.flush()?;
        }
        Ok(())
    };
    let cursor = match query::read_all(&base, &mut each) {
        Ok(c) => c,
        Err(crate::audit::AuditError::Io { source, .. }) if source.kind() == io::ErrorKind::BrokenPipe => return Ok(ExitCode::SUCCESS),
        Err(e) => return Err(e).with_context(|| format!("cannot read the event log {}", base.display())),
    };
    if !follow {
        // `each` is done with `out`.
        quiet_pipe(out.flush())?;
        return Ok(ExitCode::SUCCESS);
    }
    // Following: `each` flushes every line itself.
    let cursor = cursor.with_context(|| format!("no event log at {} to follow", base.display()))?;
    quiet_pipe(query::follow(cursor, each))?;
    Ok(ExitCode::SUCCESS)
}

/// One event, for people: time, agent and pid, what, on what, the verdict.
pub fn render_line(v: &Value, color: bool) -> String {
    let paint = |code: &str, s: &str| if color { format!("\x1b[{code}m{s}\x1b[0m") } else { s.to_owned() };
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("");
    let time = s("time").get(11..23).unwrap_or(s("time"));
    let who = match (v.get("agent").and_then(Value::as_str), v.get("pid").and_then(Value::as_u64)) {
        (Some(a), Some(p)) => format!("{a}[{p}]"),
        (Some(a), None) => a.to_owned(),
        (None, Some(p)) => format!("[{p}]"),
        (None, None) => "agentguard".to_owned(),
    };
    let kind = s("kind");
    let what = match kind {
        "exec" => {
            let argv: Vec<&str> = v["argv"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
            format!("exec {}", if argv.is_empty() { s("target").to_owned() } else { argv.join(" ") })
        }
        "fork" => format!("fork → {}", v["child_tid"]),
        "net" => format!("{} {}/{}", s("action"), s("target"), s("protocol")),
        "file" => format!("{} {}", s("action"), s("target")),
        "loss" => paint("1;31", &format!("LOST {} kernel + {} userspace events", v["ringbuf_drops"], v["userspace_drops"])),
        "audit_gap" => paint("1;31", &format!("LOG ALTERED while no daemon ran: {}", s("reason"))),
        other => {
            let target = s("target");
            if target.is_empty() { other.to_owned() } else { format!("{other} {target}") }
        }
    };
    let mut line = format!("{time} {} {who:<24} {what}", paint("2", &format!("#{}", v["seq"])));
    if let Some(d) = v.get("decision").and_then(Value::as_str) {
        let code = match d {
            "deny" => "1;31",
            "approve" => "1;33",
            "audit" => "36",
            _ => "32",
        };
        line.push_str(&format!("  {}", paint(code, d)));
        if let Some(r) = v.get("rule").and_then(Value::as_str) {
            line.push_str(&format!(" ({r}"));
            if let Some(e) = v.get("enforcement").and_then(Value::as_str) {
                line.push_str(&format!(", {e}"));
            }
            line.push(')');
        }
    }
    line
}

pub fn blast_radius(ctx: &Ctx, agent: &str, since: Option<&str>, json: bool, log: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let base = log_path(ctx, log)?;
    let filter = query::Filter {
        agent: Some(agent.to_owned()),
        since_ns: since.map(query::parse_since).transpose().map_err(anyhow::Error::msg)?,
    };
    let mut b = blast::Builder::new(agent);
    query::read_all(&base, |line| {
        if filter.matches(line) {
            if let Ok(v) = serde_json::from_slice::<Value>(line) {
                b.add(&v);
            }
        }
        Ok(())
    })
    .with_context(|| format!("cannot read the event log {}", base.display()))?;
    let report = b.finish();
    let text = if json { format!("{}\n", serde_json::to_string_pretty(&report)?) } else { blast::render(&report, use_color()) };
    quiet_pipe(io::stdout().lock().write_all(text.as_bytes()))?;
    Ok(ExitCode::SUCCESS)
}

pub fn audit_verify(ctx: &Ctx, log: Option<PathBuf>, chain_head: Option<PathBuf>, json: bool, schema: bool) -> anyhow::Result<ExitCode> {
    let config = ctx.config()?;
    let explicit_head = chain_head.is_some();
    let base = log.unwrap_or_else(|| config.events_log.clone());
    let head_path = chain_head.unwrap_or_else(|| config.chain_head.clone());
    let mut notes = Vec::new();
    let checkpoint = Checkpoint::load(&head_path).with_context(|| format!("cannot read the checkpoint {}", head_path.display()))?;
    let checkpoint = match checkpoint {
        None => {
            notes.push(format!("no checkpoint at {}", head_path.display()));
            None
        }
        Some(cp) if !explicit_head && !same_file(&cp.log, &base) => {
            notes.push(format!("the checkpoint {} belongs to {}, not this log: checked without it", head_path.display(), cp.log.display()));
            None
        }
        Some(cp) => Some(cp),
    };
    let schema = schema.then(Schema::events).transpose()?;
    let mut report = verify(&base, checkpoint.as_ref(), schema.as_ref())?;
    if report.files.is_empty() && checkpoint.is_none() {
        anyhow::bail!("no event log at {}", base.display());
    }
    notes.append(&mut report.notes);
    report.notes = notes;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for n in &report.notes {
            eprintln!("note: {n}");
        }
        match &report.failure {
            Some(f) => println!("FAILED {f}"),
            None => println!(
                "ok: {} lines in {} file(s), seq {}..={}{}",
                report.lines,
                report.files.len(),
                report.first_seq.unwrap_or(0),
                report.last_seq.unwrap_or(0),
                report.checkpoint_seq.map(|s| format!(", chain head matches the checkpoint (seq {s})")).unwrap_or_default()
            ),
        }
    }
    Ok(if report.ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn same_file(a: &Path, b: &Path) -> bool {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
    canon(a) == canon(b)
}

/// The log's lines of `agentguard status`.
pub fn render_status(a: &Value) -> String {
    if a.is_null() {
        return String::new();
    }
    let d = &a["drops"];
    let engaged = &a["fail_closed_engaged"];
    let mut out = format!(
        "event log: {} (seq {}, synced to {}), recording {}{}\n",
        a["log"].as_str().unwrap_or("?"),
        a["seq"],
        a["synced_seq"],
        a["recording"].as_str().unwrap_or("?"),
        a["recording_error"].as_str().map(|e| format!(" since {}: {e}", a["failing_since"].as_str().unwrap_or("?"))).unwrap_or_default(),
    );
    out += &format!(
        "events lost: {} in the kernel (ring buffer full; per CPU {}), {} in userspace ({} undecodable, {} unwritable), {} not yet reported\n",
        d["ringbuf"], d["ringbuf_per_cpu"], d["userspace"], d["decode_error"], d["write_failed"], d["unreported"]
    );
    let lat = &a["hook_to_line"];
    if lat["count"].as_u64().unwrap_or(0) > 0 {
        out += &format!(
            "hook-to-line latency: p50 {} us, p99 {} us, max {} us over {} events\n",
            lat["p50_us"], lat["p99_us"], lat["max_us"], lat["count"]
        );
    }
    let mode = if a["fail_closed"] == true { "on" } else { "off" };
    let now = if engaged["log_failed"] == true || engaged["ring_full"] == true { "ENGAGED: agents' network and file actions are denied" } else { "not engaged" };
    out += &format!("fail-closed: {mode}, {now} (ring overflows so far: {})\n", engaged["ring_full_episodes"]);
    if let Some(m) = a["startup_mismatch"].as_str() {
        out += &format!("WARNING: at start-up the log did not match its checkpoint: {m}\n");
    }
    out
}
