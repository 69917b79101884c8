//! Benchmarks B8 and B9 (../shared/DESIGN.md), on a real daemon (release
//! build, its own configuration, pins and cgroups, removed at the end):
//!
//! * B8: the idle daemon's CPU (utime + stime from /proc over a wall-clock
//!   window, as a share of one core) and resident memory (VmRSS, VmHWM),
//!   with no agent live and with one idle agent live.
//! * B9: `reload` of a policy of 10 000 network rules, alternating two
//!   versions that differ in every rule's value (the compiler rewrites every
//!   map entry), timed from the request to the answer on the control socket;
//!   and an agent connecting in a tight loop to an address both versions
//!   deny, across all the reloads: every connect must be denied.
//!
//!     ag-bench-daemon [--quick] [--json FILE] [b8] [b9]
use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use agentguard::control::{self, Request};
use agentguard_tests::daemon::{testbin, Daemon};
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

fn b9(quick: bool) -> Value {
    const RULES: usize = 10_000;
    let port = 45_000 + (std::process::id() % 1000) as u16;
    let d = Daemon::start_with(&[("big.toml", &big_policy(port, RULES, 0))], "fail_closed = false\nevents_rotate_bytes = 8388608\nevents_rotate_keep = 2");
    let file = d.dir.join("policies").join("big.toml");
    let reloads = if quick { 10 } else { 40 };
    // The agent: connects in a tight loop, across every reload.
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
    let mut times = Vec::with_capacity(reloads);
    for i in 0..reloads {
        std::fs::write(&file, big_policy(port, RULES, i as u32 + 1)).expect("write policy");
        let t = Instant::now();
        control::request(&d.socket, &Request::Reload).unwrap_or_else(|e| panic!("reload: {e}\n{}", d.stderr()));
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
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
    times.sort_by(f64::total_cmp);
    json!({
        "rules": RULES,
        "reloads": reloads,
        "median_ms": percentile(&times, 0.5),
        "p90_ms": percentile(&times, 0.9),
        "max_ms": times.last(),
        "connects": attempts,
        "connects_not_denied": attempts - denied,
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let json_out = args.iter().position(|a| a == "--json").and_then(|i| args.get(i + 1)).map(PathBuf::from);
    let selected: Vec<String> = args
        .iter()
        .enumerate()
        .filter(|(i, a)| !(a.starts_with("--") || *i > 0 && args[i - 1] == "--json"))
        .map(|(_, a)| a.to_ascii_lowercase())
        .collect();
    let wants = |b: &str| selected.is_empty() || selected.iter().any(|s| s == b);
    if !wants("b8") && !wants("b9") {
        eprintln!("B8/B9 not selected");
        return;
    }
    let mut doc = json!({ "bench": "B8+B9", "quick": quick, "targets": { "b8_cpu_percent_of_core": 0.1, "b8_rss_kib": 32768, "b9_reload_ms": 100, "b9_not_denied": 0 } });
    if wants("b8") {
        doc["b8"] = b8(quick);
        for (what, v) in [("idle, no agent live", &doc["b8"]["no_agent"]), ("idle, one idle agent", &doc["b8"]["one_idle_agent"])] {
            println!(
                "B8   {what:<28} cpu {:>6.3} % of a core   rss {:>6} KiB (peak {})   target 0.1 %, 32768 KiB",
                v["cpu_percent_of_core"].as_f64().unwrap_or(0.0),
                v["rss_kib"],
                v["rss_peak_kib"]
            );
        }
    }
    if wants("b9") {
        eprintln!("B9: reload of 10 000 rules under a connect loop...");
        let v = b9(quick);
        println!(
            "B9   reload, {} rules, {} reloads   median {:.1} ms  p90 {:.1} ms  max {:.1} ms   target 100 ms; connects not denied: {} of {}",
            v["rules"], v["reloads"],
            v["median_ms"].as_f64().unwrap_or(0.0),
            v["p90_ms"].as_f64().unwrap_or(0.0),
            v["max_ms"].as_f64().unwrap_or(0.0),
            v["connects_not_denied"],
            v["connects"]
        );
        doc["b9"] = v;
    }
    println!("{}", serde_json::to_string(&doc).expect("json"));
    if let Some(path) = json_out {
        let mut f = std::fs::File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        writeln!(f, "{}", serde_json::to_string_pretty(&doc).expect("json")).expect("write json");
    }
}
