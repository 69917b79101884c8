//! Benchmarks B0, B2, B2u and B3 (../shared/DESIGN.md): the same workload
//! with and without AgentGuard, alternating, as ratios on this machine.
//!
//! Each measurement runs the workload in a fresh child process (so "tagged"
//! differs from "untagged" only in how the child is started) and takes the
//! child's own ns/op. Configurations alternate round by round (each round
//! enters each setup once and runs every selected workload in it); the report
//! gives the median over rounds, the spread (min..max), and the overhead
//! against the baseline of the same round set.
//!
//!     ag-bench [--quick] [--json FILE] [b0|b2|b2u|b3]...
//!     ag-bench loop WORKLOAD ITERATIONS [PORT]     (child mode)
use std::{
    net::{TcpListener, TcpStream, UdpSocket},
    process::{Command, Stdio},
    time::Instant,
};

use agentguard_tests::{
    bench::{self, Row},
    daemon::Daemon,
};
use serde_json::{json, Value};

const POLICY: &str = "[agent]\nname = \"bench\"\n[network]\ndefault = \"allow\"\n[files]\ndefault = \"allow\"\n";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Workload {
    Getppid,
    ForkExec,
    TcpConnect,
    UdpConnect,
    UdpSendto,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Self::Getppid => "getppid",
            Self::ForkExec => "fork-exec",
            Self::TcpConnect => "tcp-connect",
            Self::UdpConnect => "udp-connect",
            Self::UdpSendto => "udp-sendto",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [Self::Getppid, Self::ForkExec, Self::TcpConnect, Self::UdpConnect, Self::UdpSendto]
            .into_iter()
            .find(|w| w.name() == s)
    }

    fn iterations(self, quick: bool) -> u64 {
        let n = match self {
            Self::Getppid => 2_000_000,
            Self::ForkExec => 2_000,
            Self::TcpConnect => 20_000,
            Self::UdpConnect | Self::UdpSendto => 200_000,
        };
        if quick { n / 10 } else { n }
    }
}

/// Child mode: run the workload and print ns/op.
fn child_loop(w: Workload, n: u64, port: u16) -> f64 {
    let start = Instant::now();
    match w {
        Workload::Getppid => {
            for _ in 0..n {
                // SAFETY: no preconditions.
                std::hint::black_box(unsafe { libc::getppid() });
            }
        }
        Workload::ForkExec => {
            for _ in 0..n {
                let st = Command::new("/bin/true").status().expect("spawn /bin/true");
                assert!(st.success());
            }
        }
        Workload::TcpConnect => {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr");
            let start = Instant::now();
            for _ in 0..n {
                let c = TcpStream::connect(addr).expect("connect");
                let (s, _) = listener.accept().expect("accept");
                drop(c);
                drop(s);
            }
            return start.elapsed().as_nanos() as f64 / n as f64;
        }
        Workload::UdpConnect => {
            let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
            for _ in 0..n {
                sock.connect(("127.0.0.1", port)).expect("udp connect");
            }
        }
        Workload::UdpSendto => {
            let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
            for _ in 0..n {
                sock.send_to(b"x", ("127.0.0.1", port)).expect("sendto");
            }
        }
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

/// How a measurement's child is started.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Setup {
    /// No AgentGuard at all.
    Baseline,
    /// An empty program at the cgroup_sock_addr attach points (the floor).
    Floor,
    /// The same, plus an empty program at every syscall tracepoint of the
    /// file fallback (enter and exit): on a kernel without BPF-LSM the
    /// daemon attaches those while an agent is live, and they send every
    /// syscall of the host down the tracing slow paths. There, that is the
    /// floor the network hooks' own cost is measured above.
    FloorFallback,
    /// The daemon running, no agent live.
    DaemonIdle,
    /// The daemon running with an agent live (hooks attached); the child untagged.
    Untagged,
    /// The child itself is an agent (started by `agentguard run`).
    Tagged,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Self::Baseline => "no agentguard",
            Self::Floor => "empty program (floor)",
            Self::FloorFallback => "floor + empty syscall tracepoints",
            Self::DaemonIdle => "daemon, no agent live",
            Self::Untagged => "agent live, untagged",
            Self::Tagged => "tagged, allowed",
        }
    }
}

struct Bench {
    id: &'static str,
    what: &'static str,
    workload: Workload,
    setups: &'static [Setup],
    /// Target per setup (overhead vs baseline or floor), as text.
    targets: &'static [(Setup, &'static str)],
}

const BENCHES: &[Bench] = &[
    Bench {
        id: "B0",
        what: "getppid with the daemon idle (no agent live)",
        workload: Workload::Getppid,
        setups: &[Setup::Baseline, Setup::DaemonIdle],
        targets: &[(Setup::DaemonIdle, "0 % added")],
    },
    Bench {
        id: "B0",
        what: "UDP connect with the daemon idle (no agent live)",
        workload: Workload::UdpConnect,
        setups: &[Setup::Baseline, Setup::DaemonIdle],
        targets: &[(Setup::DaemonIdle, "0 % added")],
    },
    Bench {
        id: "B2",
        what: "TCP loopback connect+accept+close",
        workload: Workload::TcpConnect,
        setups: &[Setup::Baseline, Setup::Untagged, Setup::Tagged],
        targets: &[(Setup::Untagged, "<= 1 %"), (Setup::Tagged, "<= 2 %")],
    },
    Bench {
        id: "B2u",
        what: "UDP connect",
        workload: Workload::UdpConnect,
        setups: &[Setup::Baseline, Setup::Floor, Setup::FloorFallback, Setup::Untagged, Setup::Tagged],
        targets: &[(Setup::Untagged, "<= floor + 20 ns"), (Setup::Tagged, "<= floor + 100 ns")],
    },
    Bench {
        id: "B2u",
        what: "UDP unconnected sendto",
        workload: Workload::UdpSendto,
        setups: &[Setup::Baseline, Setup::Floor, Setup::FloorFallback, Setup::Untagged, Setup::Tagged],
        targets: &[(Setup::Untagged, "<= floor + 20 ns"), (Setup::Tagged, "<= floor + 100 ns")],
    },
    Bench {
        id: "B3",
        what: "fork + exec(/bin/true) + wait",
        workload: Workload::ForkExec,
        setups: &[Setup::Baseline, Setup::FloorFallback, Setup::Untagged, Setup::Tagged],
        targets: &[(Setup::Untagged, "<= 1 %"), (Setup::Tagged, "<= 3 %")],
    },
];

/// The environment a setup needs, kept alive while measuring.
enum Env {
    None,
    // Held only to keep the floor programs attached.
    Floor(#[expect(dead_code, reason = "kept alive to keep the programs attached")] agentguard_tests::kernel::Loaded),
    Daemon(Daemon, Option<std::process::Child>),
}

fn enter(setup: Setup) -> Env {
    match setup {
        Setup::Baseline => Env::None,
        Setup::Floor | Setup::FloorFallback => {
            let mut l = agentguard_tests::kernel::Loaded::attach_always();
            attach_floor(&mut l.ebpf);
            if setup == Setup::FloorFallback {
                agentguard_tests::bench::attach_fallback_floor(&mut l.ebpf);
            }
            Env::Floor(l)
        }
        Setup::DaemonIdle => {
            let d = Daemon::start(&[("bench.toml", POLICY)]);
            // Let the daemon settle (it detaches idle hooks within 0.5 s).
            std::thread::sleep(std::time::Duration::from_millis(800));
            Env::Daemon(d, None)
        }
        Setup::Untagged | Setup::Tagged => {
            let d = Daemon::start(&[("bench.toml", POLICY)]);
            // A live agent keeps the network hooks attached.
            let keeper = d
                .run_cmd("bench", &["/bin/sleep", "3600"])
                .stdout(Stdio::null())
                .spawn()
                .expect("start a live agent");
            std::thread::sleep(std::time::Duration::from_millis(300));
            Env::Daemon(d, Some(keeper))
        }
    }
}

/// Load the empty programs and attach them at the cgroup2 root (detached
/// when `ebpf` drops). aya attaches through a bpf_link where the kernel
/// has them (every kernel here), and cgroup links always run beside the
/// other programs at the same point, never in their place.
fn attach_floor(ebpf: &mut aya::Ebpf) {
    let root = agentguard::mounts::cgroup2_root().expect("cgroup2");
    let cg = std::fs::File::open(&root).expect("open cgroup2 root");
    for name in [agentguard_common::programs::FLOOR_CONNECT4, agentguard_common::programs::FLOOR_SENDMSG4] {
        let p: &mut aya::programs::CgroupSockAddr = ebpf.program_mut(name).expect("floor program").try_into().expect("sock_addr");
        p.load().expect("load floor");
        p.attach(&cg, aya::programs::CgroupAttachMode::Single).expect("attach floor");
    }
}

fn leave(env: Env) {
    if let Env::Daemon(_, Some(mut k)) = env {
        let _ = k.kill();
        let _ = k.wait();
    }
}

/// The cgroup_sock_addr program a UDP workload runs in `setup`, if any.
fn udp_program(setup: Setup, w: Workload) -> Option<&'static str> {
    use agentguard_common::programs::{CONNECT4, FLOOR_CONNECT4, FLOOR_SENDMSG4, SENDMSG4};
    match (setup, w) {
        (Setup::Floor | Setup::FloorFallback, Workload::UdpConnect) => Some(FLOOR_CONNECT4),
        (Setup::Floor | Setup::FloorFallback, Workload::UdpSendto) => Some(FLOOR_SENDMSG4),
        (Setup::Untagged | Setup::Tagged, Workload::UdpConnect) => Some(CONNECT4),
        (Setup::Untagged | Setup::Tagged, Workload::UdpSendto) => Some(SENDMSG4),
        _ => None,
    }
}

/// One measurement: the workload's ns/op, and for the UDP workloads with a
/// program attached, the kernel's account of that program (BPF_ENABLE_STATS,
/// on for the measurement only): its mean run time in a second loop in
/// which a fresh empty program is attached after it, minus that empty
/// program's. Both run in the same syscalls, so the difference is paired
/// operation by operation; means from separate loops differ by ±10 ns from
/// loop to loop, as much as the untagged program costs. Where the program
/// is itself the floor's empty program, the difference is what running
/// first costs (the position bias), which `program_rows` takes off.
fn measure(setup: Setup, env: &Env, w: Workload, n: u64, port: u16) -> (f64, Option<f64>) {
    let Some(program) = udp_program(setup, w) else {
        return (run_child(setup, env, w, n, port), None);
    };
    let wall = run_child(setup, env, w, n, port);
    let floor = match w {
        Workload::UdpConnect => agentguard_common::programs::FLOOR_CONNECT4,
        _ => agentguard_common::programs::FLOOR_SENDMSG4,
    };
    let mut ebpf = agentguard::loader::load_object().expect("load the object");
    attach_floor(&mut ebpf);
    let second = ebpf.program(floor).expect("floor program").info().expect("program info").id();
    let runs = || {
        let all: Vec<_> = aya::programs::loaded_programs().filter_map(Result::ok).collect();
        let sum = |keep: &dyn Fn(&aya::programs::ProgramInfo) -> bool| {
            all.iter().filter(|p| keep(p)).fold((0u64, 0u64), |(t, c), p| (t + p.run_time().as_nanos() as u64, c + p.run_count()))
        };
        (sum(&|p| p.name_as_str() == Some(program) && p.id() != second), sum(&|p| p.id() == second))
    };
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS (run time)");
    let before = runs();
    run_child(setup, env, w, n, port);
    let after = runs();
    drop(stats);
    drop(ebpf);
    let mean = |(t0, c0): (u64, u64), (t1, c1): (u64, u64), what: &str| {
        assert!(c1 - c0 >= n, "{what} ran {} times for {n} operations", c1 - c0);
        (t1 - t0) as f64 / (c1 - c0) as f64
    };
    let first = mean(before.0, after.0, program);
    let empty = mean(before.1, after.1, "the second empty program");
    (wall, Some(first - empty))
}

fn run_child(setup: Setup, env: &Env, w: Workload, n: u64, port: u16) -> f64 {
    let me = std::env::current_exe().expect("current_exe");
    let args = ["loop".to_owned(), w.name().to_owned(), n.to_string(), port.to_string()];
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

/// For the UDP benchmarks, the programs' own cost as the kernel accounts
/// it. Per round (see `measure`): the agent's program's mean run time minus
/// that of an empty program run after it in the same loop, less the same
/// difference between two empty programs (what running first costs by
/// itself). The loop figures carry the same cost plus everything else a
/// syscall meets on a shared 2-core VM (their spreads are hundreds of ns);
/// the kernel's figure is the program alone (the accounting overhead is in
/// both means and cancels).
fn program_rows(b: &Bench, programs: &[Vec<f64>]) -> Vec<Row> {
    let of = |s: Setup| b.setups.iter().position(|x| *x == s).map(|i| &programs[i][..]).filter(|v| !v.is_empty());
    let Some(bias) = of(Setup::Floor) else { return Vec::new() };
    let mut rows = vec![Row::new(b.id, b.what, "empty program run first, program run time")
        .figure(bench::median(bias), "ns", bench::range(bias))
        .target("(an empty program's mean run time minus a second one's after it: what running first costs)", None)
        .note("BPF_ENABLE_STATS run_time_ns / run_cnt over the loop, both attached")];
    for (setup, target) in b.targets {
        let Some(s) = of(*setup) else { continue };
        let Some(allowed) = target.strip_prefix("<= floor + ").and_then(|t| t.trim_end_matches(" ns").parse::<f64>().ok()) else { continue };
        let d = bench::paired(s, bias, |s, f| s - f);
        let m = bench::median(&d);
        rows.push(
            Row::new(b.id, b.what, format!("{}, program run time", setup.name()))
                .figure(m, "ns", bench::range(&d))
                .target(format!("<= {allowed:.0} ns above the empty program (kernel's run-time account)"), Some(m <= allowed))
                .note(format!(
                    "{:.1} ns above an empty program run after it in the same loop, less {:.1} ns for running first",
                    bench::median(s),
                    bench::median(bias)
                )),
        );
    }
    rows
}

/// The summary rows of one benchmark: per setup with a target, the figure
/// the target is stated in (percent added against the baseline, or ns above
/// the floor), as the median of per-round pairs; the floor itself as context.
fn summary(b: &Bench, samples: &[Vec<f64>]) -> Vec<Row> {
    let of = |s: Setup| b.setups.iter().position(|x| *x == s).map(|i| &samples[i][..]);
    let base = of(Setup::Baseline).expect("every benchmark has a baseline");
    let ns = |v: &[f64]| format!("{:.0} ns/op", bench::median(v));
    let mut rows = Vec::new();
    for (setup, what) in [
        (Setup::Floor, "(floor: the mechanism's own cost)"),
        (Setup::FloorFallback, "(floor on a kernel without BPF-LSM: + the file fallback's syscall tracepoints)"),
    ] {
        if let Some(floor) = of(setup) {
            let d = bench::paired(floor, base, |s, r| s - r);
            rows.push(
                Row::new(b.id, b.what, setup.name())
                    .figure(bench::median(&d), "ns", bench::range(&d))
                    .target(what, None)
                    .note(format!("{} vs {} without", ns(floor), ns(base))),
            );
        }
    }
    // The floor the targets are stated against: where the daemon runs the
    // file fallback while an agent is live, its syscall tracepoints are part
    // of the mechanism every setup with an agent live pays.
    let (floor, floor_name) = match (agentguard_tests::bench::file_fallback(), of(Setup::FloorFallback)) {
        (true, Some(f)) => (Some(f), "the floor + syscall tracepoints"),
        _ => (of(Setup::Floor), "the floor"),
    };
    for (setup, target) in b.targets {
        let s = of(*setup).expect("a target's setup is measured");
        let row = Row::new(b.id, b.what, setup.name());
        let row = if let (Some(allowed), Some(floor)) = (target.strip_prefix("<= floor + ").and_then(|t| t.trim_end_matches(" ns").parse::<f64>().ok()), floor) {
            let d = bench::paired(s, floor, |s, f| s - f);
            let m = bench::median(&d);
            row.figure(m, "ns", bench::range(&d))
                .target(format!("<= {allowed:.0} ns above {floor_name}"), Some(m <= allowed))
                .note(format!("{} ({floor_name} {}, without {})", ns(s), ns(floor), ns(base)))
        } else {
            let d = bench::paired(s, base, bench::pct_added);
            let m = bench::median(&d);
            let pass = if target.starts_with("0 %") {
                // "Nothing added" cannot be shown to the last digit; it holds
                // unless the setup was slower in every round of the alternation.
                d.iter().any(|x| *x <= 0.0)
            } else {
                let pct: f64 = target.trim_start_matches("<= ").trim_end_matches(" %").parse().expect("target in %");
                m <= pct
            };
            row.figure(m, "%", bench::range(&d)).target(*target, Some(pass)).note(format!("{} vs {} without", ns(s), ns(base)))
        };
        rows.push(row);
    }
    rows
}

/// Every setup any of `benches` uses, in alternation order.
const SETUPS: [Setup; 6] = [Setup::Baseline, Setup::Floor, Setup::FloorFallback, Setup::DaemonIdle, Setup::Untagged, Setup::Tagged];

/// Measure `benches`, `rounds` times: each round enters each setup once
/// (starting a daemon is the slow part) and runs, in it, the workload of
/// every benchmark that uses that setup, one child each.
fn run_benches(benches: &[&Bench], rounds: usize, quick: bool) -> Vec<(Value, Vec<Row>)> {
    let sink = UdpSocket::bind("127.0.0.1:0").expect("bind sink");
    let port = sink.local_addr().expect("addr").port();
    // samples[bench][setup index in bench.setups][round]; programs[..]
    // likewise, the program's run time where the kernel accounts one.
    let mut samples: Vec<Vec<Vec<f64>>> = benches.iter().map(|b| vec![Vec::new(); b.setups.len()]).collect();
    let mut programs = samples.clone();
    for round in 0..rounds {
        eprintln!("round {} of {rounds}...", round + 1);
        for setup in SETUPS {
            let users: Vec<(usize, usize)> =
                benches.iter().enumerate().filter_map(|(bi, b)| b.setups.iter().position(|s| *s == setup).map(|si| (bi, si))).collect();
            if users.is_empty() {
                continue;
            }
            let env = enter(setup);
            for (bi, si) in users {
                let w = benches[bi].workload;
                let (wall, program) = measure(setup, &env, w, w.iterations(quick), port);
                samples[bi][si].push(wall);
                programs[bi][si].extend(program);
            }
            leave(env);
        }
    }
    benches.iter().zip(samples).zip(programs).map(|((b, samples), programs)| report(b, rounds, quick, &samples, &programs)).collect()
}

fn report(b: &Bench, rounds: usize, quick: bool, samples: &[Vec<f64>], programs: &[Vec<f64>]) -> (Value, Vec<Row>) {
    let n = b.workload.iterations(quick);
    let mut summary = summary(b, samples);
    summary.extend(program_rows(b, programs));
    let medians: Vec<f64> = samples.iter().map(|v| bench::median(v)).collect();
    let base = medians[0];
    let floor = b.setups.iter().position(|s| *s == Setup::Floor).map(|i| medians[i]);
    let rows: Vec<Value> = b
        .setups
        .iter()
        .zip(samples)
        .zip(&medians)
        .map(|((s, v), m)| {
            let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
            let target = b.targets.iter().find(|(t, _)| t == s).map(|(_, t)| *t);
            let verdict = summary
                .iter()
                .find(|r| r.setup == s.name() && r.pass.is_some())
                .map(|r| if r.pass == Some(true) { "pass" } else { "miss" });
            json!({
                "setup": s.name(),
                "median_ns": m,
                "min_ns": lo,
                "max_ns": hi,
                "samples_ns": v,
                // Per round: the program's mean run time above an empty
                // program run after it in the same loop (for the floor: an
                // empty program above a second one).
                "program_above_empty_ns": programs[b.setups.iter().position(|x| x == s).expect("a measured setup")],
                "vs_baseline_pct": (m / base - 1.0) * 100.0,
                "vs_floor_ns": floor.map(|f| m - f),
                "target": target,
                "verdict": verdict,
            })
        })
        .collect();
    (json!({ "id": b.id, "what": b.what, "workload": b.workload.name(), "iterations": n, "rounds": rounds, "rows": rows }), summary)
}

fn print_table(results: &[Value]) {
    println!("{:<4} {:<46} {:<24} {:>11} {:>21} {:>9} {:>10}  target", "id", "what", "setup", "median", "spread", "vs base", "vs floor");
    for r in results {
        for row in r["rows"].as_array().into_iter().flatten() {
            let f = |k: &str| row[k].as_f64().unwrap_or(f64::NAN);
            println!(
                "{:<4} {:<46} {:<24} {:>9.0}ns {:>9.0}..{:<9.0}ns {:>+8.1}% {:>10}  {} {}",
                r["id"].as_str().unwrap_or(""),
                r["what"].as_str().unwrap_or(""),
                row["setup"].as_str().unwrap_or(""),
                f("median_ns"),
                f("min_ns"),
                f("max_ns"),
                f("vs_baseline_pct"),
                row["vs_floor_ns"].as_f64().map(|v| format!("{v:+.0}ns")).unwrap_or_default(),
                row["target"].as_str().unwrap_or(""),
                row["verdict"].as_str().unwrap_or(""),
            );
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("loop") {
        let w = args.get(1).and_then(|s| Workload::parse(s)).expect("workload");
        let n: u64 = args.get(2).and_then(|s| s.parse().ok()).expect("iterations");
        let port: u16 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(9);
        println!("ns_per_op={}", child_loop(w, n, port));
        return;
    }
    let args = bench::Args::parse(&args);
    args.exit_unless_any("ag-bench", &["b0", "b2", "b2u", "b3"]);
    let rounds = if args.quick { 3 } else { 7 };
    let (mut results, mut rows) = (Vec::new(), Vec::new());
    let benches: Vec<&Bench> = BENCHES.iter().filter(|b| args.wants(b.id)).collect();
    eprintln!("running {} ({rounds} rounds)...", benches.iter().map(|b| format!("{} {}", b.id, b.workload.name())).collect::<Vec<_>>().join(", "));
    for (detail, summary) in run_benches(&benches, rounds, args.quick) {
        results.push(detail);
        rows.extend(summary);
    }
    print_table(&results);
    args.write(json!({ "bench": "ag-bench", "results": results }), &rows);
}
