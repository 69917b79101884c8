//! Benchmarks B1 and B1f (../shared/DESIGN.md): unlink, rename and rmdir
//! loops on tmpfs with and without AgentGuard, alternating, as ratios on
//! this machine. B1 is the BPF-LSM path (the VM), B1f the fallback
//! observation through syscall tracepoints (a kernel without BPF-LSM),
//! stated against the floor: an empty program on one syscall tracepoint.
//!
//! Each measurement runs in a fresh child process; "tagged" differs from
//! "untagged" only in that the child is started by `agentguard run` under a
//! policy that allows the loop but has rules of every kind (so the kernel
//! does every lookup). The child prepares its files, then times only the
//! operations and prints ns/op. The report gives per setup the median over
//! rounds, the spread, and the overhead against the baseline.
//!
//!     ag-bench-files [--quick] [--json FILE] [b1|b1f|unlink|rename|rmdir]...
//!     ag-bench-files loop OP ITERATIONS DIR      (child mode)
//!
//! Run by the test harness (libtest arguments such as `--test-threads`), it
//! does a quick pass and prints a libtest-style summary so the VM harness,
//! which runs every test executable it is given, can carry it
//! (`cargo xtask test --vm-only --extra-test-bin target/debug/ag-bench-files`).
use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use agentguard_tests::daemon::Daemon;
use serde_json::{json, Value};

const POLICY: &str = r#"[agent]
name = "bench"
[files]
default = "allow"
[[files.rule]]
id = "db"
decision = "deny"
paths = ["/var/lib/postgresql/**"]
[[files.rule]]
id = "vcs"
decision = "deny"
paths = ["**/.git/**"]
ops = ["unlink", "rmdir", "rename"]
[[files.rule]]
id = "backups"
decision = "deny"
paths = ["**/*.bak"]
[[files.rule]]
id = "temp"
decision = "audit"
paths = ["**/tmp_*"]
"#;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Unlink,
    Rename,
    Rmdir,
}

impl Op {
    const ALL: [Self; 3] = [Self::Unlink, Self::Rename, Self::Rmdir];

    fn name(self) -> &'static str {
        match self {
            Self::Unlink => "unlink",
            Self::Rename => "rename",
            Self::Rmdir => "rmdir",
        }
    }
}

/// Child mode: prepare, then time `n` operations in `dir`; ns/op.
fn child_loop(op: Op, n: usize, dir: &Path) -> f64 {
    let p = |i: usize| dir.join(format!("f{i}"));
    match op {
        Op::Unlink => {
            for i in 0..n {
                std::fs::write(p(i), b"").expect("create");
            }
            let t = Instant::now();
            for i in 0..n {
                std::fs::remove_file(p(i)).expect("unlink");
            }
            t.elapsed().as_nanos() as f64 / n as f64
        }
        Op::Rename => {
            let (a, b) = (dir.join("a"), dir.join("b"));
            std::fs::write(&a, b"").expect("create");
            let t = Instant::now();
            for i in 0..n {
                let (from, to) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
                std::fs::rename(from, to).expect("rename");
            }
            t.elapsed().as_nanos() as f64 / n as f64
        }
        Op::Rmdir => {
            for i in 0..n {
                std::fs::create_dir(p(i)).expect("mkdir");
            }
            let t = Instant::now();
            for i in 0..n {
                std::fs::remove_dir(p(i)).expect("rmdir");
            }
            t.elapsed().as_nanos() as f64 / n as f64
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Setup {
    Baseline,
    /// An empty program on syscalls/sys_enter_unlinkat: every syscall takes
    /// the tracing slow path (TOOLCHAIN.md).
    Floor,
    /// Daemon running, no agent live.
    DaemonIdle,
    /// An agent live (on-demand hooks attached); the child untagged.
    Untagged,
    /// The child is the agent; its actions are judged and allowed.
    Tagged,
}

impl Setup {
    const ALL: [Self; 5] = [Self::Baseline, Self::Floor, Self::DaemonIdle, Self::Untagged, Self::Tagged];

    fn name(self) -> &'static str {
        match self {
            Self::Baseline => "no agentguard",
            Self::Floor => "empty syscall tracepoint (floor)",
            Self::DaemonIdle => "daemon, no agent live",
            Self::Untagged => "agent live, untagged",
            Self::Tagged => "tagged, allowed",
        }
    }
}

enum Env {
    None,
    Floor(#[expect(dead_code, reason = "kept alive to keep the program attached")] agentguard_tests::kernel::Loaded),
    Daemon(Daemon, Option<std::process::Child>),
}

fn enter(setup: Setup) -> Env {
    match setup {
        Setup::Baseline => Env::None,
        Setup::Floor => {
            let mut l = agentguard_tests::kernel::Loaded::attach_always();
            let p: &mut aya::programs::TracePoint = l
                .ebpf
                .program_mut(agentguard_common::programs::FLOOR_SYSCALL)
                .expect("floor program")
                .try_into()
                .expect("tracepoint");
            p.load().expect("load floor");
            p.attach("syscalls", "sys_enter_unlinkat").expect("attach floor");
            Env::Floor(l)
        }
        Setup::DaemonIdle => {
            let d = Daemon::start(&[("bench.toml", POLICY)]);
            std::thread::sleep(std::time::Duration::from_millis(800));
            Env::Daemon(d, None)
        }
        Setup::Untagged | Setup::Tagged => {
            let d = Daemon::start(&[("bench.toml", POLICY)]);
            let keeper = d.run_cmd("bench", &["sleep", "3600"]).stdout(Stdio::null()).spawn().expect("start a live agent");
            std::thread::sleep(std::time::Duration::from_millis(300));
            Env::Daemon(d, Some(keeper))
        }
    }
}

fn leave(env: Env) {
    if let Env::Daemon(_, Some(mut k)) = env {
        let _ = k.kill();
        let _ = k.wait();
    }
}

fn measure(setup: Setup, env: &Env, op: Op, n: usize, dir: &Path) -> f64 {
    let me = std::env::current_exe().expect("current_exe");
    let args = ["loop".to_owned(), op.name().to_owned(), n.to_string(), dir.to_string_lossy().into_owned()];
    let out = match (setup, env) {
        (Setup::Tagged, Env::Daemon(d, _)) => {
            let mut full = vec![me.to_str().expect("utf-8 path")];
            full.extend(args.iter().map(String::as_str));
            d.run_cmd("bench", &full).output()
        }
        _ => Command::new(&me).args(&args).output(),
    }
    .expect("run workload child");
    assert!(out.status.success(), "workload failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("ns_per_op="))
        .and_then(|v| v.parse().ok())
        .expect("child prints ns_per_op")
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// A scratch directory on tmpfs, removed at the end.
fn scratch_dir() -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let d = base.join(format!("agentguard-bench-files-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("cannot create {}: {e}", d.display()));
    d
}

fn run_op(op: Op, rounds: usize, n: usize, dir: &Path) -> Value {
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); Setup::ALL.len()];
    let mut mode = String::new();
    for _ in 0..rounds {
        for (i, s) in Setup::ALL.iter().enumerate() {
            let env = enter(*s);
            if let Env::Daemon(d, _) = &env {
                if mode.is_empty() {
                    let out = d.cli(&["status", "--json"]);
                    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
                    mode = v["file_enforcement"]["mode"].as_str().unwrap_or("?").to_owned();
                }
            }
            samples[i].push(measure(*s, &env, op, n, dir));
            leave(env);
        }
    }
    let medians: Vec<f64> = samples.iter_mut().map(|v| median(v)).collect();
    let (base, floor) = (medians[0], medians[1]);
    let rows: Vec<Value> = Setup::ALL
        .iter()
        .zip(&samples)
        .zip(&medians)
        .map(|((s, v), m)| {
            let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
            json!({
                "setup": s.name(),
                "median_ns": m,
                "min_ns": lo,
                "max_ns": hi,
                "ratio_to_baseline": m / base,
                "vs_baseline_pct": (m / base - 1.0) * 100.0,
                "above_floor_pct_of_floor_cost": if floor > base { Some((m - floor) / (floor - base) * 100.0) } else { None },
            })
        })
        .collect();
    json!({ "op": op.name(), "file_enforcement": mode, "iterations": n, "rounds": rounds, "rows": rows })
}

fn print_table(results: &[Value]) {
    println!("{:<7} {:<22} {:<34} {:>10} {:>21} {:>8} {:>9}", "op", "file enforcement", "setup", "median", "spread", "ratio", "vs base");
    for r in results {
        for row in r["rows"].as_array().into_iter().flatten() {
            let f = |k: &str| row[k].as_f64().unwrap_or(f64::NAN);
            println!(
                "{:<7} {:<22} {:<34} {:>8.0}ns {:>9.0}..{:<9.0}ns {:>8.3} {:>+8.1}%",
                r["op"].as_str().unwrap_or(""),
                r["file_enforcement"].as_str().unwrap_or(""),
                row["setup"].as_str().unwrap_or(""),
                f("median_ns"),
                f("min_ns"),
                f("max_ns"),
                f("ratio_to_baseline"),
                f("vs_baseline_pct"),
            );
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("loop") {
        let op = args.get(1).and_then(|s| Op::ALL.into_iter().find(|o| o.name() == s)).expect("op");
        let n: usize = args.get(2).and_then(|s| s.parse().ok()).expect("iterations");
        let dir = PathBuf::from(args.get(3).expect("dir")).join(format!("c{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("child dir");
        let ns = child_loop(op, n, &dir);
        let _ = std::fs::remove_dir_all(&dir);
        println!("ns_per_op={ns}");
        return;
    }
    let harness = args.iter().any(|a| a.starts_with("--test-threads") || a == "--nocapture");
    let quick = harness || args.iter().any(|a| a == "--quick");
    let json_out = args.iter().position(|a| a == "--json").and_then(|i| args.get(i + 1)).cloned();
    // Selection as `cargo xtask bench` passes it: benchmark ids (b1, b1f)
    // or operations; ids of other harnesses select nothing here.
    let selectors: Vec<String> = args
        .iter()
        .enumerate()
        .filter(|(i, a)| !a.starts_with("--") && (*i == 0 || args[i - 1] != "--json"))
        .map(|(_, a)| a.to_lowercase())
        .collect();
    let wanted: Vec<Op> = Op::ALL.into_iter().filter(|o| selectors.iter().any(|a| a == o.name())).collect();
    let ops = if selectors.is_empty() || selectors.iter().any(|a| a == "b1" || a == "b1f") {
        Op::ALL.to_vec()
    } else if wanted.is_empty() {
        eprintln!("ag-bench-files: nothing selected (B1/B1f: b1, b1f, unlink, rename, rmdir)");
        return;
    } else {
        wanted
    };
    let (rounds, n) = if quick { (3, 2_000) } else { (7, 20_000) };
    if harness {
        println!("\nrunning 1 test");
    }
    let dir = scratch_dir();
    let mut results = Vec::new();
    for op in ops {
        eprintln!("running B1/B1f {} ({rounds} rounds of {n})...", op.name());
        results.push(run_op(op, rounds, n, &dir));
    }
    let _ = std::fs::remove_dir_all(&dir);
    print_table(&results);
    let doc = json!({ "bench": "ag-bench-files", "quick": quick, "results": results });
    if harness {
        println!("AG-BENCH-FILES-JSON {}", serde_json::to_string(&doc).expect("json"));
        println!("test b1_b1f_file_loops ... ok\n\ntest result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out");
    }
    if let Some(path) = json_out {
        let mut f = std::fs::File::create(&path).unwrap_or_else(|e| panic!("cannot write {path}: {e}"));
        writeln!(f, "{}", serde_json::to_string_pretty(&doc).expect("json")).expect("write json");
    }
}
