//! Benchmark B7 (../shared/DESIGN.md): an action held by an `approve` rule
//! to the agent frozen, p99 at most 10 ms. A real daemon holds the agent's
//! attempt (a TCP connect; an unlink too, where the file programs load),
//! and this harness times the hook's own timestamp (CLOCK_MONOTONIC, as
//! the pending approval records it) to the moment it sees `frozen 1` in
//! the agent's `cgroup.events` (woken by the kernel's notification on that
//! file, so the figure can only err on the long side). Each round is then
//! denied, which thaws the agent for the next.
//!
//!     ag-bench-approvals [--quick] [--json FILE] [b7]
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpListener,
    os::fd::AsFd as _,
    path::Path,
    process::{Child, ChildStdin, ChildStdout, Stdio},
    time::{Duration, Instant},
};

use agentguard::control::{self, Request};
use agentguard_tests::{
    bench::{self, Row, Spread},
    daemon::{testbin, Daemon},
};
use nix::poll::{ppoll, PollFd, PollFlags};
use serde_json::{json, Value};

const AGENT: &str = "b7";

fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    let i = ((sorted.len() as f64 - 1.0) * p).ceil() as usize;
    sorted.get(i.min(sorted.len().saturating_sub(1))).copied().unwrap_or(0)
}

struct Agent {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Agent {
    fn start(d: &Daemon, what: &str, arg: &str) -> Self {
        let tb = testbin();
        let mut child = d
            .run_cmd(AGENT, &[tb.to_str().expect("utf-8"), "hold-loop", what, arg])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the agent");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut pid = String::new();
        stdout.read_line(&mut pid).expect("agent pid line");
        Self { child, stdin, stdout }
    }

    fn line(&mut self, prefix: &str) -> String {
        let mut l = String::new();
        self.stdout.read_line(&mut l).expect("agent output");
        l.trim().strip_prefix(prefix).unwrap_or_else(|| panic!("expected {prefix}..., got {l:?}")).to_owned()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Wait (woken by the kernel's notification on `cgroup.events`) until it
/// has `want`; the CLOCK_MONOTONIC time it was seen.
fn wait_events(events: &Path, want: &str, deadline: Instant) -> Option<u64> {
    let file = std::fs::File::open(events).ok()?;
    loop {
        let text = std::fs::read_to_string(events).unwrap_or_default();
        if text.lines().any(|l| l == want) {
            return Some(monotonic_ns());
        }
        if Instant::now() >= deadline {
            return None;
        }
        let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLPRI)];
        let _ = ppoll(&mut fds, Some(nix::sys::time::TimeSpec::from_duration(Duration::from_millis(50))), None);
    }
}

/// `rounds` held attempts; the attempt-to-frozen times in µs.
fn rounds(d: &Daemon, agent: &mut Agent, rounds: usize, before: &dyn Fn()) -> Value {
    let events = d.cgroup_subtree().join(AGENT).join("cgroup.events");
    let mut times = Vec::with_capacity(rounds);
    for round in 0..rounds {
        before();
        agent.stdin.write_all(b"go\n").expect("signal the agent");
        let _agent_t0: u64 = agent.line("t0=").parse().expect("t0");
        let frozen = wait_events(&events, "frozen 1", Instant::now() + Duration::from_secs(5))
            .unwrap_or_else(|| panic!("round {round}: the agent was not frozen within 5 s; daemon:\n{}", d.stderr()));
        // From the kernel's hook (its timestamp, as the pending approval
        // records it): the agent's own wait for the CPU before its syscall
        // is not AgentGuard's.
        let start = Instant::now();
        let (id, held) = loop {
            let v = control::request(&d.socket, &Request::Approvals).expect("approvals");
            if let Some(a) = v["pending"].as_array().and_then(|p| p.first()) {
                break (a["id"].as_u64().expect("id"), a["held_ktime_ns"].as_u64().expect("held_ktime_ns"));
            }
            assert!(start.elapsed() < Duration::from_secs(5), "round {round}: no pending approval");
            std::thread::sleep(Duration::from_millis(2));
        };
        let us = frozen.saturating_sub(held) / 1000;
        times.push(us);
        if std::env::var_os("AG_BENCH_VERBOSE").is_some() {
            eprintln!("round {round}: {us} us");
        }
        // Answer it: deny, which thaws the agent; it then reports EPERM.
        control::request(&d.socket, &Request::Deny { id: id as u32, kill: false }).expect("deny");
        let r = agent.line("r=");
        assert!(r == "EPERM" || r == "ok", "round {round}: the agent saw {r}");
        wait_events(&events, "frozen 0", Instant::now() + Duration::from_secs(5)).expect("thawed");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut sorted = times.clone();
    sorted.sort_unstable();
    // The daemon's part alone: hook to its write to `cgroup.freeze` (the
    // hold thread logs it); the rest is the kernel freezing the agent, which
    // needs the agent's own task to run (it enters the freezer itself).
    let mut writes: Vec<u64> = d
        .stderr()
        .lines()
        .filter_map(|l| l.split("hook_to_freeze_write_us=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect();
    let writes: Vec<u64> = writes.split_off(writes.len().saturating_sub(rounds));
    let mut wsorted = writes.clone();
    wsorted.sort_unstable();
    json!({
        "rounds": rounds,
        "hook_to_freeze_write": {
            "samples": wsorted.len(),
            "median_us": percentile(&wsorted, 0.5),
            "p99_us": percentile(&wsorted, 0.99),
            "max_us": wsorted.last(),
        },
        "median_us": percentile(&sorted, 0.5),
        "p90_us": percentile(&sorted, 0.9),
        "p99_us": percentile(&sorted, 0.99),
        "max_us": sorted.last(),
    })
}

/// The summary: p99 of hook to frozen against B7's target, per kind of
/// action, with the median and the daemon's own share in the note.
fn summary(net: &Value, file: &Value, file_mode: &str) -> Vec<Row> {
    let ms = |v: &Value, k: &str| v[k].as_u64().map_or(f64::NAN, |us| us as f64 / 1000.0);
    [("held connect", net, "network (cgroup_sock_addr)".to_owned()), ("held unlink", file, format!("file ({file_mode})"))]
        .into_iter()
        .map(|(what, v, setup)| {
            let p99 = ms(v, "p99_us");
            let w = &v["hook_to_freeze_write"];
            Row::new("B7", format!("{what} to agent frozen (p99)"), setup)
                .figure(p99, "ms", Spread::Tail(vec![("median", ms(v, "median_us")), ("max", ms(v, "max_us"))]))
                .target("<= 10 ms", Some(p99 <= 10.0))
                .note(format!(
                    "{} rounds; hook to the daemon's freeze write: median {:.2} ms, p99 {:.2} ms",
                    v["rounds"],
                    ms(w, "median_us"),
                    ms(w, "p99_us")
                ))
        })
        .collect()
}

fn main() {
    let args = bench::Args::from_env();
    args.exit_unless_any("ag-bench-approvals", &["b7"]);
    // The instrument must not add its own wait for the CPU to the figure:
    // this process watches `cgroup.events` at SCHED_FIFO, reset on fork so
    // the daemon and the agent it starts run at normal priority (the
    // daemon's hold thread raises itself, as it does in production).
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: plain syscall on this thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, &param) } != 0 {
        eprintln!("B7: cannot run the harness at real-time priority ({}); its own wake-ups count in the figures", std::io::Error::last_os_error());
    }
    let n = if args.quick { 30 } else { 200 };
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let scratch = std::env::temp_dir().join(format!("ag-bench-b7-{}", std::process::id()));
    let held = scratch.join("held");
    std::fs::create_dir_all(&held).expect("mkdir");
    let policy = format!(
        "[agent]\nname = \"{AGENT}\"\n[network]\ndefault = \"allow\"\n[[network.rule]]\nid = \"held\"\ndecision = \"approve\"\nports = [{port}]\nprotocol = \"tcp\"\n\
         [files]\ndefault = \"allow\"\n[[files.rule]]\nid = \"held-files\"\ndecision = \"approve\"\npaths = [\"{}/**\"]\n",
        held.display()
    );
    // A long timeout: no round may expire while it is measured.
    let d = Daemon::start_with(&[("b7.toml", &policy)], "approval_timeout_s = 3600");

    eprintln!("B7: held TCP connect to frozen, {n} rounds...");
    let mut agent = Agent::start(&d, "tcp", &format!("127.0.0.1:{port}"));
    let net = rounds(&d, &mut agent, n, &|| {});
    drop(agent);
    let status = control::request(&d.socket, &Request::Status).expect("status");
    let file_mode = status["file_enforcement"]["mode"].as_str().unwrap_or("?").to_owned();
    let target = held.join("victim");
    eprintln!("B7: held unlink ({file_mode}) to frozen, {n} rounds...");
    let mut agent = Agent::start(&d, "unlink", target.to_str().expect("utf-8"));
    let file = rounds(&d, &mut agent, n, &|| std::fs::write(&target, b"x").expect("recreate the file"));
    drop(agent);
    drop(d);
    let _ = std::fs::remove_dir_all(&scratch);

    let rows = summary(&net, &file, &file_mode);
    let doc = json!({ "bench": "ag-bench-approvals", "net": net, "file": file, "file_mode": file_mode });
    args.write(doc, &rows);
}
