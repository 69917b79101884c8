//! Benchmark B6 (../shared/DESIGN.md): the killswitch, from the write to
//! `cgroup.freeze` to the kernel's `frozen 1` in `cgroup.events`, for 100 and
//! 1 000 processes (median over repeated runs), and the number of processes
//! that escape a freeze during a fork storm (target: zero).
//!
//! It drives the same `agentguard::killswitch` code the CLI and the daemon
//! use, on an agent cgroup of its own (no daemon needed), and removes it at
//! the end, also on panic.
//!
//!     ag-bench-freeze [--quick] [--json FILE] [b6]
use std::{
    io::BufRead as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use agentguard::killswitch::{Killswitch, Target};
use agentguard_tests::{
    bench::{self, Row, Spread},
    daemon::{remove_cgroup_tree, testbin},
    guard::CgroupGuard,
    kernel::spawn_in_cgroup,
};
use serde_json::{json, Value};

const AGENT: &str = "bench";

/// An agent cgroup `<cgroup2>/agentguard-bench-<pid>/bench/run-1`, and the
/// processes started in it; all killed and removed on drop.
struct Bench {
    root: PathBuf,
    subtree: String,
    children: Vec<Child>,
}

impl Bench {
    fn new() -> Self {
        agentguard_tests::kernel::assert_root();
        let root = agentguard::mounts::cgroup2_root().expect("no cgroup2 hierarchy is mounted");
        let subtree = format!("agentguard-bench-{}", std::process::id());
        let b = Self { root, subtree, children: Vec::new() };
        std::fs::create_dir_all(b.session()).unwrap_or_else(|e| panic!("mkdir {}: {e}", b.session().display()));
        b
    }

    fn session(&self) -> PathBuf {
        self.root.join(&self.subtree).join(AGENT).join("run-1")
    }

    fn killswitch(&self) -> Killswitch {
        Killswitch::new(&self.root, &self.subtree)
    }

    /// Start `ag-testbin ARGS` in the session; with `ready`, wait for its
    /// `ready=N` line and return N.
    fn spawn(&mut self, args: &[&str], env: Option<(&str, &str)>, ready: bool) -> usize {
        let mut cmd = Command::new(testbin());
        cmd.args(args).stdout(if ready { Stdio::piped() } else { Stdio::null() });
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let guard = CgroupGuard { path: self.session() };
        let mut child = spawn_in_cgroup(&mut cmd, &guard);
        std::mem::forget(guard); // removed with the whole subtree
        let out = child.stdout.take();
        self.children.push(child);
        let Some(out) = out else { return 0 };
        std::io::BufReader::new(out)
            .lines()
            .find_map(|l| l.ok()?.strip_prefix("ready=")?.parse().ok())
            .expect("ag-testbin printed no ready=")
    }

    fn kill_all(&mut self) {
        let r = self.killswitch().kill(&Target::Agent(AGENT.into())).expect("kill");
        assert!(r[0].confirmed, "processes left after kill: {r:?}");
        for mut c in self.children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        remove_cgroup_tree(&self.root.join(&self.subtree));
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or(0)
}

/// Freeze and thaw `runs` times; the freeze's write-to-`frozen 1` times.
fn freeze_runs(b: &mut Bench, n_children: usize, runs: usize) -> Value {
    let made = b.spawn(&["tree", &n_children.to_string(), "-", "100"], None, true);
    let ks = b.killswitch();
    let target = Target::Agent(AGENT.into());
    let start = Instant::now();
    while ks.pids(AGENT).len() < made {
        assert!(start.elapsed() < Duration::from_secs(30), "only {} of {made} processes started", ks.pids(AGENT).len());
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let f = ks.freeze(&target).expect("freeze");
        assert!(f[0].confirmed && f[0].processes == made, "freeze: {f:?}");
        times.push(f[0].elapsed_us);
        let t = ks.thaw(&target).expect("thaw");
        assert!(t[0].confirmed, "thaw: {t:?}");
        // Let the processes run between freezes, as an agent would.
        std::thread::sleep(Duration::from_millis(30));
    }
    let kill_start = Instant::now();
    b.kill_all();
    let kill_us = kill_start.elapsed().as_micros();
    times.sort_unstable();
    json!({
        "processes": made,
        "runs": runs,
        "median_us": percentile(&times, 0.5),
        "p90_us": percentile(&times, 0.9),
        "min_us": times.first(),
        "max_us": times.last(),
        "kill_us": kill_us,
    })
}

/// Live processes whose environment carries `needle`.
fn with_env(needle: &str) -> Vec<u32> {
    agentguard::procfs::pids()
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| s.rfind(')').and_then(|i| s.get(i + 2..i + 3)).map(|st| st != "Z"))
                .unwrap_or(false)
        })
        .filter(|p| std::fs::read(format!("/proc/{p}/environ")).is_ok_and(|e| e.split(|c| *c == 0).any(|kv| kv == needle.as_bytes())))
        .collect()
}

fn cgroup_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_owned))
        .unwrap_or_default()
}

/// Freeze in the middle of a fork storm `runs` times; count the processes of
/// the storm that are outside the agent's cgroup afterwards, or that appear
/// or vanish while it is frozen.
fn storm_runs(b: &mut Bench, runs: usize) -> Value {
    let ks = b.killswitch();
    let target = Target::Agent(AGENT.into());
    let inside = format!("/{}/{AGENT}/", b.subtree);
    let (mut escapes, mut frozen_counts, mut times) = (0, Vec::new(), Vec::new());
    for run in 0..runs {
        let needle = format!("AG_BENCH_STORM={}-{run}", std::process::id());
        let value = needle.split_once('=').map(|(_, v)| v).unwrap_or_default().to_owned();
        for _ in 0..2 {
            b.spawn(&["forkstorm", "3", "3", "30"], Some(("AG_BENCH_STORM", &value)), false);
        }
        let start = Instant::now();
        while with_env(&needle).len() < 40 {
            assert!(start.elapsed() < Duration::from_secs(10), "the storm did not start");
            std::thread::sleep(Duration::from_millis(2));
        }
        let f = ks.freeze(&target).expect("freeze");
        let before = with_env(&needle);
        std::thread::sleep(Duration::from_millis(200));
        let after = with_env(&needle);
        let outside = after.iter().filter(|p| !cgroup_of(**p).starts_with(&inside)).count();
        let changed = after.iter().filter(|p| !before.contains(p)).count() + before.iter().filter(|p| !after.contains(p)).count();
        if !f[0].confirmed || outside + changed > 0 {
            eprintln!("storm run {run}: confirmed={} outside={outside} changed={changed}", f[0].confirmed);
        }
        escapes += outside + changed + usize::from(!f[0].confirmed);
        frozen_counts.push(f[0].processes as u64);
        times.push(f[0].elapsed_us);
        b.kill_all();
        let left = with_env(&needle);
        escapes += left.len();
    }
    frozen_counts.sort_unstable();
    times.sort_unstable();
    json!({
        "runs": runs,
        "escapes": escapes,
        "processes_median": percentile(&frozen_counts, 0.5),
        "median_us": percentile(&times, 0.5),
        "max_us": times.last(),
    })
}

/// The summary: freeze times as milliseconds (median of runs, p90 and max
/// as spread) against DESIGN.md's B6 targets, and the fork storm's escapes.
fn summary(p100: &Value, p1000: &Value, storm: &Value) -> Vec<Row> {
    let ms = |v: &Value, k: &str| v[k].as_u64().map_or(f64::NAN, |us| us as f64 / 1000.0);
    let mut rows: Vec<Row> = [(p100, 5.0), (p1000, 25.0)]
        .into_iter()
        .map(|(v, target)| {
            let m = ms(v, "median_us");
            Row::new("B6", "freeze to frozen 1", format!("{} processes", v["processes"]))
                .figure(m, "ms", Spread::Tail(vec![("p90", ms(v, "p90_us")), ("max", ms(v, "max_us"))]))
                .target(format!("<= {target} ms"), Some(m <= target))
                .note(format!("{} runs; cgroup.kill of all: {:.1} ms", v["runs"], v["kill_us"].as_u64().unwrap_or(0) as f64 / 1000.0))
        })
        .collect();
    let escapes = storm["escapes"].as_u64().unwrap_or(u64::MAX);
    rows.push(
        Row::new("B6", "escapes from a freeze in a fork storm", format!("{} runs", storm["runs"]))
            .figure(escapes as f64, "count", Spread::None)
            .target("0", Some(escapes == 0))
            .note(format!("~{} processes frozen per run, freeze median {:.1} ms", storm["processes_median"], ms(storm, "median_us"))),
    );
    rows
}

fn main() {
    let args = bench::Args::from_env();
    args.exit_unless_any("ag-bench-freeze", &["b6"]);
    let quick = args.quick;
    let runs = if quick { 7 } else { 31 };
    let mut b = Bench::new();
    eprintln!("B6: freeze 100 processes, {runs} runs...");
    // tree N makes about 4N/3 + 1 processes.
    let p100 = freeze_runs(&mut b, 75, runs);
    eprintln!("B6: freeze 1000 processes, {runs} runs...");
    let p1000 = freeze_runs(&mut b, 750, runs);
    eprintln!("B6: fork storm...");
    let storm = storm_runs(&mut b, if quick { 3 } else { 10 });
    drop(b);

    println!("{:<4} {:<34} {:>9} {:>10} {:>10} {:>10} {:>10}", "id", "what", "processes", "median", "p90", "max", "target");
    for (what, v, target) in [("freeze to frozen 1, 100 processes", &p100, "5 ms"), ("freeze to frozen 1, 1000 processes", &p1000, "25 ms")] {
        let ms = |k: &str| format!("{:.2} ms", v[k].as_u64().unwrap_or(0) as f64 / 1000.0);
        println!("{:<4} {:<34} {:>9} {:>10} {:>10} {:>10} {:>10}", "B6", what, v["processes"].to_string(), ms("median_us"), ms("p90_us"), ms("max_us"), target);
    }
    println!(
        "{:<4} {:<34} {:>9} {:>10} {:>10} {:>10} {:>10}",
        "B6",
        format!("fork storm: escapes in {} runs", storm["runs"]),
        storm["processes_median"].to_string(),
        storm["escapes"].to_string(),
        "",
        "",
        "0"
    );
    let doc = json!({
        "bench": "ag-bench-freeze",
        "freeze_100": p100,
        "freeze_1000": p1000,
        "fork_storm": storm,
        "targets": { "freeze_100_median_us": 5000, "freeze_1000_median_us": 25000, "fork_storm_escapes": 0 },
    });
    let rows = summary(&p100, &p1000, &storm);
    args.write(doc, &rows);
}
