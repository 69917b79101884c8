//! Benchmarks B1 and B1f (../shared/DESIGN.md): unlink, rename and rmdir
//! loops on tmpfs with and without AgentGuard, alternating, as ratios on
//! this machine. B1 is the BPF-LSM path (the VM), B1f the fallback
//! observation through syscall tracepoints (a kernel without BPF-LSM),
//! stated against the floor: an empty program at the fallback's syscall
//! tracepoints.
//!
//! Each measurement runs in a fresh child process; "tagged" differs from
//! "untagged" only in that the child is started by `agentguard run` under a
//! policy that allows the loop but has rules of every kind (so the kernel
//! does every lookup). The child prepares its files, then times only the
//! operations and prints ns/op. Setups alternate round by round; each round
//! enters each setup once and measures every operation in it. The report
//! gives per setup the median over rounds, the spread, and the overhead
//! against the baseline; the summary rows (tests/src/bench.rs) the median of
//! per-round pairs against the baseline.
//!
//!     ag-bench-files [--quick] [--json FILE] [b1|b1f|unlink|rename|rmdir]...
//!     ag-bench-files loop OP ITERATIONS DIR      (child mode)
//!
//! Run by the test harness (libtest arguments such as `--test-threads`), it
//! does a quick pass and prints a libtest-style summary so the VM harness,
//! which runs every test executable it is given, can carry it
//! (`cargo xtask test --vm-only --extra-test-bin target/debug/ag-bench-files`).
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use agentguard_tests::{
    bench::{self, Row},
    daemon::Daemon,
};
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
    /// Not a file operation: the cheapest syscall, with the floor's empty
    /// program also at its tracepoint, measures what the fallback's
    /// mechanism adds to one observed syscall without the spread of a 5 µs
    /// file operation around it (context for B1f: the programs' share of
    /// it is the stricter reading of B1f's target).
    Getppid,
}

impl Op {
    const ALL: [Self; 3] = [Self::Unlink, Self::Rename, Self::Rmdir];

    fn name(self) -> &'static str {
        match self {
            Self::Unlink => "unlink",
            Self::Rename => "rename",
            Self::Rmdir => "rmdir",
            Self::Getppid => "getppid",
        }
    }
}

/// Child mode: prepare, say `ready` and wait for a line on stdin (the
/// parent reads the kernel's program accounts then), then time `n`
/// operations in `dir`; ns/op.
fn child_loop(op: Op, n: usize, dir: &Path) -> f64 {
    let p = |i: usize| dir.join(format!("f{i}"));
    let gate = || {
        println!("ready");
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).expect("read the go line");
    };
    match op {
        Op::Unlink => {
            for i in 0..n {
                std::fs::write(p(i), b"").expect("create");
            }
            gate();
            let t = Instant::now();
            for i in 0..n {
                std::fs::remove_file(p(i)).expect("unlink");
            }
            t.elapsed().as_nanos() as f64 / n as f64
        }
        Op::Rename => {
            let (a, b) = (dir.join("a"), dir.join("b"));
            std::fs::write(&a, b"").expect("create");
            gate();
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
            gate();
            let t = Instant::now();
            for i in 0..n {
                std::fs::remove_dir(p(i)).expect("rmdir");
            }
            t.elapsed().as_nanos() as f64 / n as f64
        }
        Op::Getppid => {
            gate();
            let t = Instant::now();
            for _ in 0..n {
                // SAFETY: no arguments, cannot fail.
                std::hint::black_box(unsafe { libc::getppid() });
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
            Self::Floor => "empty syscall tracepoints (floor)",
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
            // At every tracepoint the fallback uses, so the empty program
            // runs once per operation like the fallback's do (its run time,
            // as the kernel accounts it, is the accounting's own cost per
            // run: program_rows subtracts it).
            agentguard_tests::bench::attach_fallback_floor(&mut l.ebpf);
            if agentguard_tests::bench::file_fallback() {
                attach_getppid_floor(&mut l.ebpf);
            }
            Env::Floor(l)
        }
        Setup::DaemonIdle => {
            let d = Daemon::start(&[("bench.toml", POLICY)]);
            settle(&d);
            Env::Daemon(d, None)
        }
        Setup::Untagged | Setup::Tagged => {
            let d = Daemon::start(&[("bench.toml", POLICY)]);
            let keeper = d.run_cmd("bench", &["sleep", "3600"]).stdout(Stdio::null()).spawn().expect("start a live agent");
            std::thread::sleep(std::time::Duration::from_millis(300));
            settle(&d);
            Env::Daemon(d, Some(keeper))
        }
    }
}

/// Wait until the daemon is idle: under TCG it settles for seconds after
/// it says it is ready, and a loop measured meanwhile measures it too (the
/// VM's vCPU runs it beside the loop, and the programs' run time grew
/// threefold in the first loop after a start: session 18).
fn settle(d: &Daemon) {
    if !d.wait_idle(std::time::Duration::from_secs(30)) {
        eprintln!("note: the daemon was still busy 30 s after its start; measuring anyway");
    }
}

fn leave(env: Env) {
    if let Env::Daemon(_, Some(mut k)) = env {
        let _ = k.kill();
        let _ = k.wait();
    }
}

/// Run time (ns) and runs of every loaded program on the host, summed, as
/// the kernel accounts them while BPF_ENABLE_STATS is on: those other than
/// program `id`, and `id`'s.
fn programs_account(id: Option<u32>) -> ((u64, u64), (u64, u64)) {
    aya::programs::loaded_programs().filter_map(Result::ok).fold(((0, 0), (0, 0)), |(o, i), p| {
        let add = |(t, c): (u64, u64)| (t + p.run_time().as_nanos() as u64, c + p.run_count());
        if Some(p.id()) == id { (o, add(i)) } else { (add(o), i) }
    })
}

/// Run time (ns) and runs of each loaded program, by program id (with
/// its name).
fn programs_each() -> std::collections::BTreeMap<u32, (String, u64, u64)> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| (p.id(), (p.name_as_str().unwrap_or("?").to_owned(), p.run_time().as_nanos() as u64, p.run_count())))
        .collect()
}

/// The programs' account over one timed loop, per operation.
#[derive(Clone, Debug)]
struct Account {
    ns: f64,
    runs: f64,
    /// Where the fallback observes (no BPF-LSM): the programs' run time per
    /// operation above that of an empty program attached after them at the
    /// same tracepoints, in a second loop (paired operation by operation;
    /// see `measure`).
    paired: Option<f64>,
    /// Where a daemon judges the loop: the share of its operations the
    /// kernel answered from the directory cache (its counter).
    cached: Option<f64>,
    /// Each program that ran in the loop: (name, ns per operation, runs
    /// per operation), the costliest first.
    each: Vec<(String, f64, f64)>,
}

/// The floor's empty program (already loaded) also at getppid's tracepoint.
fn attach_getppid_floor(ebpf: &mut aya::Ebpf) {
    let p: &mut aya::programs::TracePoint =
        ebpf.program_mut(agentguard_common::programs::FLOOR_SYSCALL).expect("floor program").try_into().expect("tracepoint");
    p.attach("syscalls", "sys_enter_getppid").expect("attach the floor at sys_enter_getppid");
}

/// Run the workload child once: `snap` is taken when the child is ready
/// (before its timed loop starts) and again after it has reported; the
/// child's ns/op and both snapshots.
fn timed<T>(setup: Setup, env: &Env, op: Op, n: usize, dir: &Path, snap: impl Fn() -> T) -> (f64, T, T) {
    use std::io::{BufRead as _, BufReader, Write as _};
    let me = std::env::current_exe().expect("current_exe");
    let args = ["loop".to_owned(), op.name().to_owned(), n.to_string(), dir.to_string_lossy().into_owned()];
    let mut cmd = match (setup, env) {
        (Setup::Tagged, Env::Daemon(d, _)) => {
            let mut full = vec![me.to_str().expect("utf-8 path")];
            full.extend(args.iter().map(String::as_str));
            d.run_cmd("bench", &full)
        }
        _ => {
            let mut c = Command::new(&me);
            c.args(&args);
            c
        }
    };
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("run workload child");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines().map_while(Result::ok);
    assert_eq!(lines.next().as_deref(), Some("ready"), "the workload child did not get ready");
    // A tagged child is a new agent session: the daemon creates its cgroup,
    // records its tags and logs its start, once per session. The loop
    // measures what each action costs, so it starts once that is done (on
    // one vCPU, the daemon's start-up work ran inside the timed loop).
    if let (Setup::Tagged, Env::Daemon(d, _)) = (setup, env) {
        settle(d);
    }
    let before = snap();
    writeln!(child.stdin.as_mut().expect("stdin"), "go").expect("start the workload");
    let ns = lines.find_map(|l| l.strip_prefix("ns_per_op=").and_then(|v| v.parse::<f64>().ok()));
    let after = snap();
    // Now the child may clean up (outside the accounts).
    let _ = writeln!(child.stdin.as_mut().expect("stdin"), "done");
    let status = child.wait().expect("wait for the workload child");
    assert!(status.success(), "workload failed: {status}");
    (ns.expect("child prints ns_per_op"), before, after)
}

/// One measurement: the operation's ns/op, and (where a program runs) the
/// run time of the host's programs per operation during the timed loop.
/// Where the fallback observes, a second loop with a fresh empty program
/// attached after the others at the fallback's tracepoints pairs their run
/// time with the empty program's in the same syscalls: means from separate
/// loops differ by ±10 ns from loop to loop, as much as the untagged
/// programs cost. In the floor setup that difference is between two empty
/// programs: what running first costs, which `program_rows` takes off.
fn measure(setup: Setup, env: &Env, op: Op, n: usize, dir: &Path) -> (f64, Option<Account>) {
    if setup == Setup::Baseline || op == Op::Getppid {
        return (timed(setup, env, op, n, dir, || ()).0, None);
    }
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS (run time)");
    // Read before the child starts and after it ended: it creates its
    // files before the timed loop, which the cache does not count.
    let repeats = || match env {
        Env::Daemon(d, _) => d.status()["kernel_counters"]["file_allowed_repeats"].as_u64(),
        _ => None,
    };
    let cached_before = repeats();
    let (ns, ((before, _), each_before), ((after, _), each_after)) =
        timed(setup, env, op, n, dir, || (programs_account(None), programs_each()));
    let cached = cached_before.zip(repeats()).map(|(b, a)| a.saturating_sub(b) as f64 / n as f64);
    let mut each: Vec<(String, f64, f64)> = each_after
        .iter()
        .filter_map(|(id, (name, t, c))| {
            let (t0, c0) = each_before.get(id).map_or((0, 0), |(_, t, c)| (*t, *c));
            (*c > c0).then(|| (name.clone(), t.saturating_sub(t0) as f64 / n as f64, (c - c0) as f64 / n as f64))
        })
        .collect();
    each.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut account =
        Account { ns: (after.0 - before.0) as f64 / n as f64, runs: (after.1 - before.1) as f64 / n as f64, paired: None, cached, each };
    if agentguard_tests::bench::file_fallback() {
        let mut ebpf = agentguard::loader::load_object().expect("load the object");
        agentguard_tests::bench::attach_fallback_floor(&mut ebpf);
        let id = ebpf.program(agentguard_common::programs::FLOOR_SYSCALL).expect("floor program").info().expect("program info").id();
        let (_, b, a) = timed(setup, env, op, n, dir, || programs_account(Some(id)));
        let (others, empty) = ((a.0 .0 - b.0 .0) as f64, (a.1 .0 - b.1 .0) as f64);
        assert!(a.1 .1 - b.1 .1 >= n as u64, "the empty program ran {} times for {n} operations", a.1 .1 - b.1 .1);
        account.paired = Some((others - empty) / n as f64);
    }
    drop(stats);
    (ns, Some(account))
}

/// Operations of the untimed loop each setup runs first (see `run_ops`).
const WARM_UP: usize = 200;

/// A scratch directory on tmpfs, removed at the end.
fn scratch_dir() -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let d = base.join(format!("agentguard-bench-files-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("cannot create {}: {e}", d.display()));
    d
}

/// Measure every op in `ops` under every setup, `rounds` times. Each
/// round enters each setup once (starting a daemon is the slow part, above
/// all in the VM) and runs every op in it, one child per op.
fn run_ops(ops: &[Op], rounds: usize, n: usize, dir: &Path) -> Vec<(Value, Vec<Row>)> {
    // Asked once, before any setup is entered: the answer loads and attaches
    // the object, which must not happen beside a setup's own programs.
    let fallback = agentguard_tests::bench::file_fallback();
    // samples[op][setup][round]; programs[..] likewise, the programs' run
    // time per operation.
    let mut samples: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); Setup::ALL.len()]; ops.len()];
    let mut programs: Vec<Vec<Vec<Account>>> = vec![vec![Vec::new(); Setup::ALL.len()]; ops.len()];
    // getppid ns/op without AgentGuard and in the floor setup, per round
    // (the fallback only).
    let mut getppid: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut mode = String::new();
    for round in 0..rounds {
        eprintln!("B1/B1f round {} of {rounds}...", round + 1);
        for (i, s) in Setup::ALL.iter().enumerate() {
            let env = enter(*s);
            if let Env::Daemon(d, _) = &env {
                if mode.is_empty() {
                    let out = d.cli(&["status", "--json"]);
                    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
                    mode = v["file_enforcement"]["mode"].as_str().unwrap_or("?").to_owned();
                    // B1 measured as something else is no measurement.
                    assert!(
                        mode == "veto" || !agentguard_tests::bpf_lsm_loadable(),
                        "BPF-LSM programs load on this kernel, yet the daemon's file enforcement is {mode}: {}",
                        v["file_enforcement"]
                    );
                }
            }
            // Every setup runs each operation once untimed first. Under TCG
            // a program's first runs pay for translating its freshly
            // compiled code, and every setup starts its own daemon: the first
            // 2 000-operation loop after a start accounted 2.2-2.9 µs per
            // tagged unlink, the next ones 0.7-0.8 µs (session 19). The
            // timed loop still starts in a new directory, whose first
            // action takes the long way.
            for op in ops {
                let _ = timed(*s, &env, *op, WARM_UP.min(n), dir, || ());
            }
            for (o, op) in ops.iter().enumerate() {
                let (ns, prog) = measure(*s, &env, *op, n, dir);
                samples[o][i].push(ns);
                programs[o][i].extend(prog);
            }
            if fallback && matches!(s, Setup::Baseline | Setup::Floor) {
                let (ns, _) = measure(*s, &env, Op::Getppid, n * 40, dir);
                getppid[usize::from(*s == Setup::Floor)].push(ns);
            }
            leave(env);
        }
    }
    // What the floor adds to one observed syscall, per round.
    let floor_cost = bench::paired(&getppid[1], &getppid[0], |f, b| f - b);
    ops.iter()
        .zip(samples)
        .zip(programs)
        .map(|((op, samples), programs)| detail(*op, &mode, rounds, n, samples, &programs, &floor_cost))
        .collect()
}

fn detail(op: Op, mode: &str, rounds: usize, n: usize, samples: Vec<Vec<f64>>, programs: &[Vec<Account>], floor_cost: &[f64]) -> (Value, Vec<Row>) {
    let mut summary = summary(op, mode, &samples);
    summary.extend(program_rows(op, mode, &samples, programs, floor_cost));
    let medians: Vec<f64> = samples.iter().map(|v| bench::median(v)).collect();
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
                "program_ns_per_op": programs[Setup::ALL.iter().position(|x| x == s).expect("a setup")].iter().map(|a| a.ns).collect::<Vec<_>>(),
                "program_runs_per_op": programs[Setup::ALL.iter().position(|x| x == s).expect("a setup")].iter().map(|a| a.runs).collect::<Vec<_>>(),
                "program_above_empty_ns_per_op": programs[Setup::ALL.iter().position(|x| x == s).expect("a setup")].iter().filter_map(|a| a.paired).collect::<Vec<_>>(),
            })
        })
        .collect();
    (json!({ "op": op.name(), "file_enforcement": mode, "iterations": n, "rounds": rounds, "rows": rows }), summary)
}

/// The summary rows of one operation, in percent added against the
/// baseline (median of per-round pairs). With BPF-LSM (`veto`) they are B1;
/// with the syscall-tracepoint fallback they are B1f, whose untagged target
/// sits on the floor: at most 5 % above the floor's operation. The idle
/// daemon is B0 (nothing added: it holds unless every round was slower).
fn summary(op: Op, mode: &str, samples: &[Vec<f64>]) -> Vec<Row> {
    let of = |s: Setup| &samples[Setup::ALL.iter().position(|x| *x == s).expect("setup measured")][..];
    let base = of(Setup::Baseline);
    let ns = |v: &[f64]| format!("{:.0} ns/op", bench::median(v));
    let added = |s: Setup| {
        let d = bench::paired(of(s), base, bench::pct_added);
        (bench::median(&d), bench::range(&d), format!("{} vs {} without", ns(of(s)), ns(base)))
    };
    let what = format!("{} loop on tmpfs", op.name());
    let (id, veto) = match mode {
        "veto" => ("B1", true),
        _ => ("B1f", false),
    };
    let mode_note = if veto { String::new() } else { format!("; file enforcement: {mode}") };
    let mut rows = Vec::new();
    let (floor, spread, note) = added(Setup::Floor);
    rows.push(
        Row::new(id, what.clone(), Setup::Floor.name())
            .figure(floor, "%", spread)
            .target("(floor: empty programs at the fallback's syscall tracepoints)", None)
            .note(note),
    );
    let (m, spread, note) = added(Setup::DaemonIdle);
    let idle = bench::paired(of(Setup::DaemonIdle), base, bench::pct_added);
    rows.push(
        Row::new("B0", what.clone(), Setup::DaemonIdle.name())
            .figure(m, "%", spread)
            .target("0 % added", Some(idle.iter().any(|x| *x <= 0.0)))
            .note(note),
    );
    let (m, spread, note) = added(Setup::Untagged);
    let row = Row::new(id, what.clone(), Setup::Untagged.name()).figure(m, "%", spread);
    rows.push(match mode {
        "veto" => row.target("<= 1 %", Some(m <= 1.0)).note(note),
        "observe_and_contain" => {
            // DESIGN.md: "≤ the syscall-tracepoint floor + 5 % of it", the
            // floor being the same loop with the empty programs (as B2u's
            // "floor + 20 ns"); the issue: "within 5 % of the floor".
            let d = bench::paired(of(Setup::Untagged), of(Setup::Floor), bench::pct_added);
            let above = bench::median(&d);
            Row::new(id, what.clone(), Setup::Untagged.name())
                .figure(above, "%", bench::range(&d))
                .target("<= 5 % above the floor (the floor + 5 % of it)", Some(above <= 5.0))
                .note(format!("{note}; the floor adds {floor:.1} % to the operation"))
        }
        _ => row.target("-", None).note(format!("{note}{mode_note}")),
    });
    let (m, spread, note) = added(Setup::Tagged);
    let row = Row::new(id, what, Setup::Tagged.name()).figure(m, "%", spread);
    rows.push(if veto {
        row.target("<= 2 %", Some(m <= 2.0)).note(note)
    } else {
        // DESIGN.md states no tagged target for the fallback: each action of
        // an agent is an event through the ring buffer to the daemon.
        row.target("(no target: every action is an event)", None).note(format!("{note}{mode_note}"))
    });
    rows
}

/// The programs' own cost as the kernel accounts it (BPF_ENABLE_STATS).
///
/// With BPF-LSM (B1): run time per operation during the timed loop, per
/// round, as a share of that round's operation without AgentGuard. The
/// accounting itself costs each run a fixed amount (two clock reads; ~80 ns
/// on this VM): the empty program's accounted time per run, measured in the
/// floor setup, is taken off each run.
///
/// The fallback (B1f): per round, the programs' run time per operation
/// above an empty program's run after them in the same loop, less the same
/// difference between two empty programs (what running first costs), as a
/// share of the floor's operation (DESIGN.md: at most the floor + 5 % of
/// it). Beside it, the share of what the floor adds to one observed
/// syscall, measured on getppid with the floor's program at its tracepoint
/// too (`floor_cost`: the same slow paths and record, without the spread of
/// a file operation), which is the stricter reading of the target.
///
/// The loop figures carry the same cost plus everything else a syscall
/// meets (under TCG in the VM, spreads of ±100 %); this is the programs
/// alone. It leaves out the daemon's work on the events the actions send
/// (bench B4's subject).
/// The three programs that cost most per operation, over all rounds.
fn by_program(rounds: &[Account]) -> String {
    let mut sum: std::collections::BTreeMap<&str, (f64, f64)> = std::collections::BTreeMap::new();
    for a in rounds {
        for (name, ns, runs) in &a.each {
            let e = sum.entry(name.as_str()).or_default();
            e.0 += ns / rounds.len() as f64;
            e.1 += runs / rounds.len() as f64;
        }
    }
    let mut v: Vec<_> = sum.into_iter().collect();
    v.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    v.iter().take(3).map(|(n, (ns, runs))| format!("{n} {ns:.0} ns ({runs:.2} runs)")).collect::<Vec<_>>().join(", ")
}

fn program_rows(op: Op, mode: &str, samples: &[Vec<f64>], programs: &[Vec<Account>], floor_cost: &[f64]) -> Vec<Row> {
    let at = |s: Setup| Setup::ALL.iter().position(|x| *x == s).expect("setup measured");
    let base = &samples[at(Setup::Baseline)];
    let floor = &programs[at(Setup::Floor)];
    let what = format!("{} loop on tmpfs", op.name());
    let id = if mode == "veto" { "B1" } else { "B1f" };
    let mut rows = Vec::new();
    let bias: Vec<f64> = floor.iter().filter_map(|f| f.paired).collect();
    if id == "B1f" && !floor_cost.is_empty() {
        rows.push(
            Row::new(id, what.clone(), "floor, per observed syscall")
                .figure(bench::median(floor_cost), "ns", bench::range(floor_cost))
                .target("(what the floor adds to one observed syscall: getppid with and without it)", None)
                .note(format!("empty program run first: {:.1} ns per operation (taken off the rows below)", bench::median(&bias))),
        );
    }
    for setup in [Setup::Untagged, Setup::Tagged] {
        let p = &programs[at(setup)];
        if p.len() != base.len() || floor.len() != base.len() {
            continue;
        }
        // Per round: the programs' time less the accounting's, per operation.
        let own: Vec<f64> = match p.iter().map(|a| a.paired).collect::<Option<Vec<f64>>>() {
            Some(paired) if bias.len() == paired.len() => bench::paired(&paired, &bias, |p, b| p - b),
            _ => p.iter().zip(floor).map(|(a, f)| a.ns - a.runs * (f.ns / f.runs.max(1e-9))).collect(),
        };
        let pct: Vec<f64> = own.iter().zip(base).map(|(o, b)| o / b * 100.0).collect();
        let m = bench::median(&pct);
        let runs = bench::median(&p.iter().map(|a| a.runs).collect::<Vec<_>>());
        let note = if bias.is_empty() {
            format!(
                "{:.0} ns of programs per operation of {:.0} ns ({runs:.1} runs, accounting {:.0} ns per run taken off)",
                bench::median(&own),
                bench::median(base),
                bench::median(&floor.iter().map(|f| f.ns / f.runs.max(1e-9)).collect::<Vec<_>>()),
            )
        } else {
            format!(
                "{:.1} ns of programs per operation of {:.0} ns ({runs:.1} runs) above an empty program run after them in the same loop",
                bench::median(&own),
                bench::median(base)
            )
        };
        let cached: Vec<f64> = p.iter().filter_map(|a| a.cached).collect();
        let note = match setup {
            Setup::Tagged if !cached.is_empty() && mode == "veto" => {
                format!("{note}; {:.1} % of operations answered from the directory cache", bench::median(&cached) * 100.0)
            }
            _ => note,
        };
        let note = format!("{note}; by program (accounting included): {}", by_program(p));
        let row = Row::new(id, what.clone(), format!("{}, program run time", setup.name())).figure(m, "%", bench::range(&pct));
        rows.push(match (mode, setup) {
            ("veto", Setup::Untagged) => row.target("<= 1 % (programs' run time, kernel's account)", Some(m <= 1.0)).note(note),
            ("veto", _) => row.target("<= 2 % (programs' run time, kernel's account)", Some(m <= 2.0)).note(note),
            (_, Setup::Untagged) => {
                // B1f: what the programs add above the floor, as a share of
                // the floor's operation (5 % allowed), per round; beside it,
                // their share of what the floor adds to one observed syscall.
                let above = bench::paired(&own, &samples[at(Setup::Floor)], |o, f| o / f * 100.0);
                let a = bench::median(&above);
                let cost = bench::median(floor_cost);
                let strict = if cost > 0.0 {
                    format!("; {:.0} % of the {cost:.0} ns the floor adds to one observed syscall", bench::median(&own) / cost * 100.0)
                } else {
                    String::new()
                };
                row.figure(a, "%", bench::range(&above))
                    .target("<= 5 % of the floor's operation (programs' run time above the empty program, kernel's account)", Some(a <= 5.0))
                    .note(format!("{note}{strict}"))
            }
            _ => row.target("(no target: every action is an event)", None).note(note),
        });
    }
    rows
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
    // The benchmark's policy, for a script that measures the same loops
    // (docs/wip/hitcost.sh).
    if args.first().map(String::as_str) == Some("policy") {
        print!("{POLICY}");
        return;
    }
    if args.first().map(String::as_str) == Some("loop") {
        let op = args.get(1).and_then(|s| Op::ALL.into_iter().chain([Op::Getppid]).find(|o| o.name() == s)).expect("op");
        let n: usize = args.get(2).and_then(|s| s.parse().ok()).expect("iterations");
        let dir = PathBuf::from(args.get(3).expect("dir")).join(format!("c{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("child dir");
        let ns = child_loop(op, n, &dir);
        println!("ns_per_op={ns}");
        // The parent reads the programs' accounts now; the clean-up (a
        // tagged rmdir the long way) waits for its line, or it would be
        // counted in the loop.
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let harness = args.iter().any(|a| a.starts_with("--test-threads") || a == "--nocapture");
    let mut args = bench::Args::parse(&args);
    // Under the test harness (the VM) only libtest's arguments come in
    // (`--test-threads=1 --color never`): run everything.
    if harness {
        args.selected.clear();
    }
    args.quick |= harness;
    // Selection as `cargo xtask bench` passes it: benchmark ids (b1, b1f)
    // or operations; ids of other harnesses select nothing here.
    let by_op: Vec<Op> = Op::ALL.into_iter().filter(|o| args.selected.iter().any(|a| a == o.name())).collect();
    let ops = if args.wants_any(&["b1", "b1f"]) { Op::ALL.to_vec() } else { by_op };
    if ops.is_empty() {
        args.exit_unless_any("ag-bench-files", &["b1", "b1f", "unlink", "rename", "rmdir"]);
    }
    let (rounds, n) = match (harness_rounds(), args.quick) {
        (Some(r), _) => r,
        (None, true) => (3, 2_000),
        (None, false) => (7, 20_000),
    };
    if harness {
        println!("\nrunning 1 test");
    }
    let dir = scratch_dir();
    let (mut results, mut rows) = (Vec::new(), Vec::new());
    eprintln!("running B1/B1f {} ({rounds} rounds of {n})...", ops.iter().map(|o| o.name()).collect::<Vec<_>>().join(", "));
    for (detail, summary) in run_ops(&ops, rounds, n, &dir) {
        results.push(detail);
        rows.extend(summary);
    }
    let _ = std::fs::remove_dir_all(&dir);
    print_table(&results);
    let doc = json!({ "bench": "ag-bench-files", "results": results });
    if harness {
        let mut doc = doc.clone();
        doc["quick"] = json!(args.quick);
        doc["rounds"] = json!(rounds);
        doc["summary"] = Value::Array(rows.iter().map(Row::to_json).collect());
        println!("AG-BENCH-FILES-JSON {}", serde_json::to_string(&doc).expect("json"));
        println!("test b1_b1f_file_loops ... ok\n\ntest result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out");
    }
    args.write(doc, &rows);
}

/// Rounds and iterations for a run under the test harness, from the name
/// this binary was given: `ag-bench-files-R-N` runs R rounds of N (how
/// `cargo xtask bench` asks the VM for a full run; the VM's init passes no
/// arguments of ours). Plain `ag-bench-files`: the quick pass.
fn harness_rounds() -> Option<(usize, usize)> {
    let exe = std::env::args().next()?;
    let name = Path::new(&exe).file_name()?.to_str()?;
    let mut parts = name.strip_prefix("ag-bench-files-")?.split('-');
    let rounds = parts.next()?.parse().ok()?;
    let n = parts.next()?.parse().ok()?;
    Some((rounds, n))
}
