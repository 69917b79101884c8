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
    io::{BufRead as _, Write as _},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use agentguard::killswitch::{Killswitch, Target};
use agentguard_tests::{
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

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let json_out = args.iter().position(|a| a == "--json").and_then(|i| args.get(i + 1)).map(PathBuf::from);
    // `cargo xtask bench b2 b3` passes its selection to every harness.
    let selected: Vec<&String> = args
        .iter()
        .enumerate()
        .filter(|(i, a)| {
            let is_json_path = *i > 0 && args[i - 1] == "--json";
            !a.starts_with("--") && !is_json_path
        })
        .map(|(_, a)| a)
        .collect();
    if !selected.is_empty() && !selected.iter().any(|a| a.eq_ignore_ascii_case("b6")) {
        eprintln!("B6 not selected");
        return;
    }
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
        "bench": "B6",
        "quick": quick,
        "freeze_100": p100,
        "freeze_1000": p1000,
        "fork_storm": storm,
        "targets": { "freeze_100_median_us": 5000, "freeze_1000_median_us": 25000, "fork_storm_escapes": 0 },
    });
    println!("{}", serde_json::to_string(&doc).expect("json"));
    if let Some(path) = json_out {
        let mut f = std::fs::File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        writeln!(f, "{}", serde_json::to_string_pretty(&doc).expect("json")).expect("write json");
    }
}
