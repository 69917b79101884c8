//! Benchmarks B8 and B9 (../shared/DESIGN.md), on a real daemon (release
//! build, its own configuration, pins and cgroups, removed at the end):
//!
//! * B8: the idle daemon's CPU (utime + stime from /proc over a wall-clock
//!   window, as a share of one core) and resident memory (VmRSS, VmHWM),
//!   with no agent live and with one idle agent live.
//! * B9: `reload` of a policy of 10 000 network rules, alternating two
//!   versions that differ in every rule's value (the compiler rewrites every
//!   map entry), timed from the request to the answer on the control socket:
//!   first with the daemon otherwise idle (the target), then with an agent
//!   connecting in a tight loop to an address every version denies, across
//!   all those reloads: every connect must be denied (no window), and the
//!   reload time under that flood is shown too.
//!
//!     ag-bench-daemon [--quick] [--json FILE] [b8] [b9]
use std::{
    io::{BufRead as _, BufReader},
    process::Stdio,
    time::{Duration, Instant},
};

use agentguard::control::{self, Request};
use agentguard_tests::{
    bench::{self, Row, Spread},
    daemon::{testbin, Daemon},
};
use serde_json::{json, Value};

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    ticks as f64 / clock_ticks()
}

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix(key)?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or(0)
}

fn idle(d: &Daemon, window: Duration) -> Value {
    let pid = d.pid().expect("running");
    // Let start-up work (adoption scans, first fsync) finish.
    std::thread::sleep(Duration::from_secs(2));
    let (c0, t0) = (cpu_seconds(pid), Instant::now());
    std::thread::sleep(window);
    let (c1, wall) = (cpu_seconds(pid), t0.elapsed().as_secs_f64());
    json!({
        "window_s": wall,
        "cpu_percent_of_core": 100.0 * (c1 - c0) / wall,
        "rss_kib": status_kib(pid, "VmRSS:"),
        "rss_peak_kib": status_kib(pid, "VmHWM:"),
    })
}

fn b8(quick: bool) -> Value {
    let window = Duration::from_secs(if quick { 10 } else { 60 });
    let policy = std::fs::read_to_string(agentguard_tests::shipped_policy_dir().join("default.toml")).expect("default policy");
    let d = Daemon::start(&[("default.toml", &policy)]);
    eprintln!("B8: idle daemon, no agent live, {window:?}...");
    let none = idle(&d, window);
    let mut agent = d.run_cmd("bench-idle", &[testbin().to_str().expect("utf-8"), "sleep", "3600"]).stdout(Stdio::null()).spawn().expect("agent");
    eprintln!("B8: idle daemon, one idle agent live, {window:?}...");
    let one = idle(&d, window);
    let _ = agent.kill();
    let _ = agent.wait();
    json!({ "no_agent": none, "one_idle_agent": one })
}

/// A policy of `n` network rules; `version` changes every rule's value.
fn big_policy(port: u16, n: usize, version: u32) -> String {
    let mut p = format!(
        "[agent]\nname = \"bench-reload\"\n\n[network]\ndefault = \"allow\"\n\n[[network.rule]]\nid = \"deny-port\"\ndecision = \"deny\"\ncidr = [\"127.0.0.1/32\"]\nports = [{port}]\nprotocol = \"udp\"\n"
    );
    for i in 0..n - 1 {
        let (decision, port) = if version.is_multiple_of(2) { ("deny", 443) } else { ("audit", 8443) };
        p.push_str(&format!(
            "\n[[network.rule]]\nid = \"r{i}\"\ndecision = \"{decision}\"\ncidr = [\"10.{}.{}.{}/32\"]\nports = [{port}]\nprotocol = \"tcp\"\n",
            i >> 16,
            (i >> 8) & 255,
            i & 255
        ));
    }
    p
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or(0.0)
}

/// Reload times (ms): request to answer, and the daemon's own parse and
/// compile phases, each sorted.
#[derive(Default)]
struct Reloads {
    total: Vec<f64>,
    parse: Vec<f64>,
    compile: Vec<f64>,
}

impl Reloads {
    /// `n` reloads, each after rewriting `file` with the next version.
    fn run(d: &Daemon, file: &std::path::Path, port: u16, rules: usize, first_version: u32, n: usize) -> Self {
        let mut r = Self::default();
        for i in 0..n {
            std::fs::write(file, big_policy(port, rules, first_version + i as u32)).expect("write policy");
            let t = Instant::now();
            let answer = control::request(&d.socket, &Request::Reload).unwrap_or_else(|e| panic!("reload: {e}\n{}", d.stderr()));
            r.total.push(t.elapsed().as_secs_f64() * 1000.0);
            let phase = |k: &str| answer["timing"][k].as_f64().unwrap_or_else(|| panic!("reload answer without timing.{k}: {answer}"));
            r.parse.push(phase("parse_ms"));
            r.compile.push(phase("compile_ms"));
        }
        for v in [&mut r.total, &mut r.parse, &mut r.compile] {
            v.sort_by(f64::total_cmp);
        }
        r
    }

    fn json(&self) -> Value {
        json!({
            "reloads": self.total.len(),
            "median_ms": percentile(&self.total, 0.5),
            "p90_ms": percentile(&self.total, 0.9),
            "max_ms": self.total.last(),
            "parse_median_ms": percentile(&self.parse, 0.5),
            "compile_median_ms": percentile(&self.compile, 0.5),
        })
    }
}

fn b9(quick: bool) -> Value {
    const RULES: usize = 10_000;
    let port = 45_000 + (std::process::id() % 1000) as u16;
    let d = Daemon::start_with(&[("big.toml", &big_policy(port, RULES, 0))], "fail_closed = false\nevents_rotate_bytes = 8388608\nevents_rotate_keep = 2");
    let file = d.dir.join("policies").join("big.toml");
    let reloads = if quick { 10 } else { 40 };
    // The reload time itself: the daemon with nothing else to do.
    let quiet = Reloads::run(&d, &file, port, RULES, 1, reloads);
    // The window: an agent connects in a tight loop to an address every
    // version denies, across every reload. Each denied connect is also an
    // event, so the daemon logs a flood meanwhile.
    let tb = testbin();
    let stop = d.dir.join("stop");
    let mut agent = d
        .run_cmd("bench-reload", &[tb.to_str().expect("utf-8"), "connects-until", &format!("127.0.0.1:{port}"), stop.to_str().expect("utf-8")])
        .stdout(Stdio::piped())
        .spawn()
        .expect("agent");
    let mut lines = BufReader::new(agent.stdout.take().expect("stdout")).lines().map_while(Result::ok);
    for l in lines.by_ref() {
        if l == "ready=1" {
            break;
        }
    }
    let loaded = Reloads::run(&d, &file, port, RULES, reloads as u32 + 1, reloads);
    std::fs::write(&stop, "").expect("stop the agent");
    let (mut attempts, mut denied) = (0u64, 0u64);
    for l in lines {
        if let Some(v) = l.strip_prefix("attempts=") {
            attempts = v.parse().expect("number");
        }
        if let Some(v) = l.strip_prefix("denied=") {
            denied = v.parse().expect("number");
        }
    }
    let _ = agent.wait();
    json!({
        "rules": RULES,
        "quiet": quiet.json(),
        "under_flood": loaded.json(),
        "connects": attempts,
        "connects_not_denied": attempts - denied,
    })
}

/// The summary rows: B8's CPU and RSS per setup, B9's reload time and the
/// connects that got through.
fn summary(b8: Option<&Value>, b9: Option<&Value>) -> Vec<Row> {
    let mut rows = Vec::new();
    for (key, setup) in [("no_agent", "idle, no agent live"), ("one_idle_agent", "idle, one idle agent live")] {
        let Some(v) = b8.map(|b| &b[key]) else { continue };
        let cpu = v["cpu_percent_of_core"].as_f64().unwrap_or(f64::NAN);
        let rss = v["rss_kib"].as_u64().map_or(f64::NAN, |k| k as f64 / 1024.0);
        let peak = v["rss_peak_kib"].as_u64().map_or(f64::NAN, |k| k as f64 / 1024.0);
        rows.push(
            Row::new("B8", "daemon CPU", setup)
                .figure(cpu, "%", Spread::None)
                .target("<= 0.1 % of a core", Some(cpu <= 0.1))
                .note(format!("utime+stime over {:.0} s", v["window_s"].as_f64().unwrap_or(0.0))),
        );
        rows.push(
            Row::new("B8", "daemon resident memory", setup)
                .figure(rss, "MiB", Spread::Tail(vec![("peak", peak)]))
                .target("<= 32 MiB", Some(rss <= 32.0))
                .note("VmRSS; peak is VmHWM"),
        );
    }
    if let Some(v) = b9 {
        let phases = |r: &Value| {
            format!(
                "{} reloads alternating two versions that differ in every rule; daemon's median parse {:.0} ms, compile and map writes {:.0} ms",
                r["reloads"],
                r["parse_median_ms"].as_f64().unwrap_or(f64::NAN),
                r["compile_median_ms"].as_f64().unwrap_or(f64::NAN)
            )
        };
        let spread = |r: &Value| Spread::Tail(vec![("p90", r["p90_ms"].as_f64().unwrap_or(f64::NAN)), ("max", r["max_ms"].as_f64().unwrap_or(f64::NAN))]);
        let (quiet, flood) = (&v["quiet"], &v["under_flood"]);
        let m = quiet["median_ms"].as_f64().unwrap_or(f64::NAN);
        rows.push(
            Row::new("B9", "policy reload, request to answer", format!("{} rules", v["rules"]))
                .figure(m, "ms", spread(quiet))
                .target("<= 100 ms", Some(m <= 100.0))
                .note(phases(quiet)),
        );
        rows.push(
            Row::new("B9", "policy reload under a flood of denied connects (informational)", format!("{} rules", v["rules"]))
                .figure(flood["median_ms"].as_f64().unwrap_or(f64::NAN), "ms", spread(flood))
                .target("none: shares 2 cores with the agent's loop and the daemon logging each denial", None)
                .note(phases(flood)),
        );
        let through = v["connects_not_denied"].as_u64().unwrap_or(u64::MAX);
        rows.push(
            Row::new("B9", "denied connects that got through during reloads", format!("{} connects", v["connects"]))
                .figure(through as f64, "count", Spread::None)
                .target("0 (no window)", Some(through == 0))
                .note("tight UDP connect loop of an agent across every reload"),
        );
    }
    rows
}

fn main() {
    let args = bench::Args::from_env();
    args.exit_unless_any("ag-bench-daemon", &["b8", "b9"]);
    let mut doc = json!({ "bench": "ag-bench-daemon" });
    if args.wants("b8") {
        doc["b8"] = b8(args.quick);
    }
    if args.wants("b9") {
        eprintln!("B9: reload of 10 000 rules under a connect loop...");
        doc["b9"] = b9(args.quick);
    }
    let rows = summary(doc.get("b8"), doc.get("b9"));
    args.write(doc, &rows);
}
