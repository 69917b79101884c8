//! The event stream and audit log: real syscalls of an agent become
//! schema-valid, hash-chained log lines; every kind of tampering is caught
//! and the first bad line named; the chain survives rotation and restarts;
//! a ring-buffer flood is accounted for exactly; fail-closed mode denies an
//! agent's actions while its events cannot be recorded.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Output, Stdio},
    time::{Duration, Instant},
};

use agentguard::{
    audit::{line_hash, log_files, rotated_path, to_hex},
    schema::Schema,
};
use agentguard_tests::{
    daemon::{fact, testbin, Daemon},
    guard::TempDir,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(15);

fn tb() -> String {
    testbin().to_string_lossy().into_owned()
}

fn policy(name: &str, deny_port: u16) -> String {
    policy_with(name, deny_port, "allow")
}

/// With another network default: `audit` logs every allowed connect as a
/// line of its own (`allow` counts a flow's repeats in the kernel instead).
fn policy_with(name: &str, deny_port: u16, default: &str) -> String {
    format!(
        r#"[agent]
name = "{name}"

[network]
default = "{default}"

[[network.rule]]
id = "no-db"
decision = "deny"
cidr = ["127.0.0.0/8"]
ports = [{deny_port}]
protocol = "tcp"
reversibility = "irreversible"
rollback = "restore the database from last night's snapshot"
"#
    )
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn status(d: &Daemon) -> Value {
    let out = d.cli(&["status", "--json"]);
    serde_json::from_str(&ok(&out, "status")).expect("status --json is JSON")
}

/// Every complete line of every file of the log, oldest first, with its
/// file. The daemon may be writing meanwhile (a line not yet ended is left
/// out) or rotating (a file listed can be renamed before it is read: then
/// the files are listed again).
fn all_lines(base: &Path) -> Vec<(PathBuf, String)> {
    'listing: for _ in 0..100 {
        let mut out = Vec::new();
        for f in log_files(base).expect("list log files") {
            let text = match std::fs::read_to_string(&f) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue 'listing,
                Err(e) => panic!("read {}: {e}", f.display()),
            };
            out.extend(text.split_inclusive('\n').filter_map(|l| l.strip_suffix('\n')).map(|l| (f.clone(), l.to_owned())));
        }
        return out;
    }
    panic!("the log files under {} kept changing while being read", base.display());
}

fn parsed(base: &Path) -> Vec<Value> {
    all_lines(base).iter().map(|(_, l)| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l}: {e}"))).collect()
}

/// Lines of the log (every file) for which `pred` holds.
fn count_lines(base: &Path, pred: impl Fn(&str) -> bool) -> u64 {
    all_lines(base).iter().filter(|(_, l)| pred(l)).count() as u64
}

fn wait_until(what: &str, d: &Daemon, mut pred: impl FnMut() -> bool) {
    let start = Instant::now();
    while !pred() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}; daemon log:\n{}", d.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn verify_cli(d: &Daemon, extra: &[&str]) -> Output {
    let mut args = vec!["audit", "verify"];
    args.extend_from_slice(extra);
    d.cli(&args)
}

#[test]
fn real_syscalls_become_schema_valid_chained_lines_and_reports() {
    let db = TcpListener::bind("127.0.0.1:0").expect("bind");
    let web = TcpListener::bind("127.0.0.1:0").expect("bind");
    let (db_port, web_port) = (db.local_addr().expect("addr").port(), web.local_addr().expect("addr").port());
    let d = Daemon::start(&[("evt.toml", &policy("evt", db_port))]);
    let tb = tb();
    // A shell (the session's root) runs two connects as its children.
    let script = format!("{tb} connect tcp 127.0.0.1:{db_port}; {tb} connect tcp 127.0.0.1:{web_port}; true");
    let out = d.run_cmd("evt", &["/bin/sh", "-c", &script]).stdout(Stdio::piped()).output().expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("errno=EPERM") && stdout.contains("result=ok"), "{stdout}");

    let denied = d.wait_event(WAIT, "denied connect", |e| e["kind"] == "net" && e["port"] == db_port);
    let allowed = d.wait_event(WAIT, "allowed connect", |e| e["kind"] == "net" && e["port"] == web_port);
    // What the issue asks every line to say.
    assert_eq!(denied["agent"], "evt");
    assert_eq!(denied["action"], "connect");
    assert_eq!(denied["target"], format!("127.0.0.1:{db_port}"));
    assert_eq!(denied["decision"], "deny");
    assert_eq!(denied["rule"], "no-db");
    assert_eq!(denied["reversibility"], "irreversible");
    assert_eq!(denied["rollback"], "restore the database from last night's snapshot");
    assert_eq!(denied["enforcement"], "enforced");
    assert_eq!((allowed["decision"].as_str(), allowed["rule"].as_str()), (Some("allow"), Some("default")));
    assert!(denied["session"].as_u64().is_some_and(|s| s & (1 << 31) != 0), "{denied}");
    // Lineage: the connecting process's parent is the shell, the session's root.
    let shell = d.wait_event(WAIT, "the shell's exec", |e| e["kind"] == "exec" && e["newly_tagged"] == true && e["session"] == denied["session"]);
    assert_eq!(denied["ppid"], shell["pid"], "{denied}");
    assert_eq!(denied["lineage"], serde_json::json!([shell["pid"]]), "{denied}");
    assert_eq!(shell["lineage"], serde_json::json!([]), "the root's lineage is empty");
    for k in ["seq", "prev", "host", "time", "pid"] {
        assert!(!denied[k].is_null(), "{k} missing: {denied}");
    }

    // People and machines read it back; blast-radius sorts it.
    let json = ok(&d.cli(&["events", "--agent", "evt", "--since", "5m", "--json"]), "events --json");
    let raw = std::fs::read_to_string(&d.events_log).expect("read log");
    for line in json.lines() {
        assert!(raw.lines().any(|l| l == line), "--json must print the log's lines byte for byte: {line}");
        assert!(line.contains("\"agent\":\"evt\""), "{line}");
    }
    assert!(json.lines().count() >= 5, "{json}");
    let human = ok(&d.cli(&["events", "--agent", "evt"]), "events");
    assert!(human.contains(&format!("connect 127.0.0.1:{db_port}/tcp")) && human.contains("deny (no-db, enforced)"), "{human}");
    assert!(!human.contains("\x1b["), "no colour when not on a terminal");
    let blast: Value = serde_json::from_str(&ok(&d.cli(&["blast-radius", "evt", "--since", "10m", "--json"]), "blast-radius")).expect("JSON");
    let irr = &blast["groups"][0];
    assert_eq!(irr["reversibility"], "irreversible");
    let refused = irr["actions"].as_array().expect("actions").iter().find(|a| a["target"] == format!("127.0.0.1:{db_port}")).cloned().expect("the denied connect");
    assert_eq!((refused["outcome"].as_str(), refused["rollback"].as_str()), (Some("refused"), Some("restore the database from last night's snapshot")));
    assert!(blast["processes"].as_array().is_some_and(|p| p.len() >= 3), "{blast}");
    let text = ok(&d.cli(&["blast-radius", "evt"]), "blast-radius");
    assert!(text.find("IRREVERSIBLE") < text.find("COMPENSABLE"), "{text}");

    // Every line the daemon wrote fits the schema, and the chain verifies.
    let mut d = d;
    d.stop();
    let schema = Schema::events().expect("schema");
    for v in parsed(&d.events_log) {
        let errors = schema.validate(&v);
        assert!(errors.is_empty(), "line breaks docs/events.schema.json: {errors:?}\n{v}");
    }
    let out = verify_cli(&d, &["--schema"]);
    assert!(ok(&out, "audit verify").starts_with("ok: "), "{out:?}");
}

#[test]
fn follow_prints_new_events_as_they_are_written() {
    let d = Daemon::start(&[("f.toml", &policy("follow", 1))]);
    let mut follower = Command::new(agentguard_tests::agentguard_bin())
        .arg("--config")
        .arg(&d.config)
        .args(["events", "--follow", "--json", "--agent", "follow"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn events --follow");
    let stdout = follower.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let out = d.run_cmd("follow", &[&tb(), "connect", "udp", "127.0.0.1:9"]).stdout(Stdio::piped()).output().expect("run");
    let pid = fact(&out.stdout, "pid").expect("pid");
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains("\"kind\":\"net\"") && l.contains(&format!("\"pid\":{pid},"))) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "--follow never printed the connect; saw {seen:#?}");
        if let Ok(l) = rx.recv_timeout(left) {
            seen.push(l);
        }
    }
    let _ = follower.kill();
    let _ = follower.wait();
}

/// A real log with a checkpoint, copied for tampering.
struct Scratch {
    dir: TempDir,
}

impl Scratch {
    fn of(d: &Daemon) -> Self {
        let dir = TempDir::new("tamper");
        std::fs::copy(&d.events_log, dir.join("events.jsonl")).expect("copy log");
        std::fs::copy(d.dir.join("chain-head"), dir.join("chain-head")).expect("copy checkpoint");
        Self { dir }
    }

    fn log(&self) -> PathBuf {
        self.dir.join("events.jsonl")
    }

    fn edit(&self, f: impl FnOnce(&mut Vec<String>)) {
        let text = std::fs::read_to_string(self.log()).expect("read");
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        f(&mut lines);
        std::fs::write(self.log(), format!("{}\n", lines.join("\n"))).expect("write");
    }

    /// `audit verify` on the copy: must fail and name `line` (1-based) and `seq`.
    fn expect_caught(&self, d: &Daemon, what: &str, line: usize, seq: u64) {
        let log = self.log();
        let head = self.dir.join("chain-head");
        let out = verify_cli(d, &["--log", log.to_str().expect("utf-8"), "--chain-head", head.to_str().expect("utf-8")]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{what} was not detected: {text}");
        let want = format!("{}:{line} (seq {seq})", log.display());
        assert!(text.contains(&want), "{what}: expected the report to name {want}; got: {text}");
    }
}

fn seq_at(lines: &[String], i: usize) -> u64 {
    serde_json::from_str::<Value>(&lines[i]).expect("json")["seq"].as_u64().expect("seq")
}

#[test]
fn every_kind_of_tampering_is_detected_and_the_first_bad_line_named() {
    let mut d = Daemon::start(&[("t.toml", &policy("tamper", 1))]);
    let tb = tb();
    for _ in 0..3 {
        ok(&d.run_cmd("tamper", &[&tb, "connect", "udp", "127.0.0.1:9"]).output().expect("run"), "agent");
    }
    wait_until("three exits", &d, || d.events().iter().filter(|e| e["kind"] == "exit").count() >= 3);
    d.stop();
    let lines: Vec<String> = std::fs::read_to_string(&d.events_log).expect("read").lines().map(str::to_owned).collect();
    assert!(lines.len() >= 10, "{lines:#?}");
    let pristine = Scratch::of(&d);
    assert!(ok(&verify_cli(&d, &[]), "verify").starts_with("ok: "));
    let n = lines.len();

    // Modified: a field of line 5 changed (seq kept).
    let s = Scratch::of(&d);
    s.edit(|l| l[4] = l[4].replacen("\"host\":\"", "\"host\":\"x", 1));
    s.expect_caught(&d, "a modified line", 5, seq_at(&lines, 4));
    // The last line modified: only the checkpoint can tell.
    let s = Scratch::of(&d);
    s.edit(|l| l[n - 1] = l[n - 1].replacen("\"host\":\"", "\"host\":\"x", 1));
    s.expect_caught(&d, "a modified last line", n, seq_at(&lines, n - 1));
    // Deleted: line 4 removed; the line after the hole is named.
    let s = Scratch::of(&d);
    s.edit(|l| {
        l.remove(3);
    });
    s.expect_caught(&d, "a deleted line", 4, seq_at(&lines, 4));
    // Inserted: a copy of line 6 after it.
    let s = Scratch::of(&d);
    s.edit(|l| {
        let copy = l[5].clone();
        l.insert(6, copy);
    });
    s.expect_caught(&d, "an inserted line", 7, seq_at(&lines, 5));
    // Reordered: lines 3 and 4 swapped.
    let s = Scratch::of(&d);
    s.edit(|l| l.swap(2, 3));
    s.expect_caught(&d, "reordered lines", 3, seq_at(&lines, 3));
    // Truncated: the last 3 lines cut; the checkpoint names the first missing.
    let s = Scratch::of(&d);
    s.edit(|l| l.truncate(n - 3));
    s.expect_caught(&d, "a truncated tail", n - 2, seq_at(&lines, n - 3));
    // Truncated mid-line.
    let s = Scratch::of(&d);
    let text = std::fs::read(s.log()).expect("read");
    std::fs::write(s.log(), &text[..text.len() - 10]).expect("cut");
    let out = verify_cli(&d, &["--log", s.log().to_str().expect("utf-8"), "--chain-head", s.dir.join("chain-head").to_str().expect("utf-8")]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stdout).contains(&format!("events.jsonl:{n}")), "{out:?}");
    drop(pristine);

    // The real log truncated while the daemon is down: the restarted daemon
    // records what it found, so the evidence outlives its next checkpoint.
    let kept: Vec<&str> = lines.iter().take(n - 2).map(String::as_str).collect();
    std::fs::write(&d.events_log, format!("{}\n", kept.join("\n"))).expect("truncate");
    d.restart();
    let gap = d.wait_event(WAIT, "audit_gap", |e| e["kind"] == "audit_gap");
    assert!(gap["reason"].as_str().is_some_and(|r| r.contains(&format!("ends at seq {}", seq_at(&lines, n - 3)))), "{gap}");
    let st = status(&d);
    assert!(st["audit"]["startup_mismatch"].is_string(), "{st:#}");
    d.stop();
    let out = verify_cli(&d, &[]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stdout).contains("altered"), "{out:?}");
}

#[test]
fn the_chain_continues_across_rotation_and_a_daemon_restart() {
    let mut d = Daemon::start_with(&[("r.toml", &policy_with("rot", 1, "audit"))], "events_rotate_bytes = 8192\nevents_rotate_keep = 0");
    let tb = tb();
    ok(&d.run_cmd("rot", &[&tb, "connects", "127.0.0.1:9", "60", "0", "now"]).output().expect("run"), "agent");
    d.wait_event(WAIT, "the agent's exit", |e| e["kind"] == "exit");
    d.restart();
    ok(&d.run_cmd("rot", &[&tb, "connects", "127.0.0.1:9", "60", "0", "now"]).output().expect("run"), "agent");
    wait_until("the second run's 60 connects", &d, || all_lines(&d.events_log).iter().filter(|(_, l)| l.contains("\"kind\":\"net\"")).count() >= 120);
    d.stop();

    let lines = all_lines(&d.events_log);
    let files = log_files(&d.events_log).expect("files");
    assert!(files.len() >= 3, "8 KiB files must have rotated: {files:?}");
    assert!(rotated_path(&d.events_log, 1).exists());
    // One chain: seq 1, 2, 3... and each prev the hash of the line before,
    // across files (the first line of a file chains to the previous file's last).
    let mut prev_hash = "0".repeat(64);
    for (i, (file, line)) in lines.iter().enumerate() {
        let v: Value = serde_json::from_str(line).expect("json");
        assert_eq!(v["seq"], i as u64 + 1, "{}: {line}", file.display());
        assert_eq!(v["prev"].as_str(), Some(prev_hash.as_str()), "{}: chain broken at {line}", file.display());
        prev_hash = to_hex(&line_hash(line.as_bytes()));
    }
    // The restarted daemon said where it continued from.
    let starts: Vec<Value> = parsed(&d.events_log).into_iter().filter(|v| v["kind"] == "daemon_start").collect();
    assert_eq!(starts.len(), 2);
    assert_eq!(starts[1]["continues_from"].as_u64(), starts[1]["seq"].as_u64().map(|s| s - 1));
    assert!(ok(&verify_cli(&d, &[]), "verify").contains(&format!("in {} file(s)", files.len())));
    // `events` reads the rotated files too.
    let out = ok(&d.cli(&["events", "--json"]), "events");
    assert_eq!(out.lines().count(), lines.len());
}

fn read_facts_until(out: &mut BufReader<ChildStdout>, key: &str) -> Vec<(String, String)> {
    let mut facts = Vec::new();
    loop {
        let mut line = String::new();
        let n = out.read_line(&mut line).expect("read agent output");
        assert!(n > 0, "agent ended before printing {key}=; printed {facts:?}");
        if let Some((k, v)) = line.trim().split_once('=') {
            facts.push((k.to_owned(), v.to_owned()));
            if k == key {
                return facts;
            }
        }
    }
}

fn get(facts: &[(String, String)], key: &str) -> u64 {
    facts.iter().find(|(k, _)| k == key).and_then(|(_, v)| v.parse().ok()).unwrap_or_else(|| panic!("no {key} in {facts:?}"))
}

fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).expect("signal the daemon");
}

#[test]
fn a_ring_buffer_flood_ends_in_an_exact_account() {
    const N: u64 = 60_000;
    let d = Daemon::start_with(&[("fl.toml", &policy_with("flood", 1, "audit"))], "events_ring_bytes = 1048576");
    let mut agent = d
        .run_cmd("flood", &[&tb(), "connects", "127.0.0.1:9", &N.to_string(), "0", "stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn flood");
    let mut out = BufReader::new(agent.stdout.take().expect("stdout"));
    let pid = get(&read_facts_until(&mut out, "ready"), "pid");
    d.wait_event(WAIT, "the flooder's exec", |e| e["kind"] == "exec" && e["pid"] == pid);
    eprintln!("flood: agent {pid} ready; stopping the daemon");
    // With the daemon stopped nothing drains the ring (1 MiB here, so the
    // account stays quick to check under emulation): it fills up.
    let daemon = d.child.as_ref().expect("daemon running");
    signal(daemon, nix::sys::signal::Signal::SIGSTOP);
    let mut stdin = agent.stdin.take().expect("stdin");
    writeln!(stdin, "go").expect("start the flood");
    let facts = read_facts_until(&mut out, "elapsed_ns");
    signal(daemon, nix::sys::signal::Signal::SIGCONT);
    eprintln!("flood: done ({facts:?}); daemon resumed");
    assert_eq!(get(&facts, "attempts"), N);
    let denied = get(&facts, "denied");

    // Counted by text (the log holds ~15 000 lines here).
    let pid_field = format!("\"pid\":{pid},");
    let net_lines = || count_lines(&d.events_log, |l| l.contains("\"kind\":\"net\"") && l.contains(&pid_field));
    // Drained: everything reported, and the log stopped growing.
    let start = Instant::now();
    let mut last_seq = 0;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let st = status(&d);
        let seq = st["audit"]["seq"].as_u64().unwrap_or(0);
        if st["audit"]["drops"]["unreported"] == 0 && st["audit"]["drops"]["ringbuf"].as_u64() > Some(0) && seq == last_seq {
            break;
        }
        last_seq = seq;
        assert!(start.elapsed() < Duration::from_secs(120), "the daemon did not drain: {st:#}\n{}", d.stderr());
    }
    let st = status(&d);
    let drops = st["audit"]["drops"]["ringbuf"].as_u64().expect("drops");
    let logged = net_lines();
    eprintln!("flood: {N} connects, {logged} logged, {drops} dropped in the kernel, {denied} denied while the ring was full");
    assert_eq!(logged + drops, N, "every event is either a line or a counted drop");
    assert_eq!(st["audit"]["drops"]["userspace"], 0);
    let per_cpu: u64 = st["audit"]["drops"]["ringbuf_per_cpu"].as_array().expect("per cpu").iter().filter_map(Value::as_u64).sum();
    assert_eq!(per_cpu, drops);
    let reported: u64 = all_lines(&d.events_log)
        .iter()
        .filter(|(_, l)| l.contains("\"kind\":\"loss\""))
        .filter_map(|(_, l)| serde_json::from_str::<Value>(l).ok()?["ringbuf_drops"].as_u64())
        .sum();
    assert_eq!(reported, drops, "loss events account for every drop");
    // Fail-closed: once the ring overflowed, the agent's connects were denied
    // until the daemon drained it; then they are allowed again.
    assert!(denied > 0, "connects after the ring filled must be denied (fail-closed)");
    assert!(st["audit"]["fail_closed_engaged"]["ring_full"] == false && st["audit"]["fail_closed_engaged"]["ring_full_episodes"].as_u64() >= Some(1), "{st:#}");
    let after = d.run_cmd("flood", &[&tb(), "connect", "udp", "127.0.0.1:9"]).stdout(Stdio::piped()).output().expect("run");
    assert_eq!(fact(&after.stdout, "result").as_deref(), Some("ok"), "{after:?}");
    drop(stdin);
    let _ = agent.wait();
}

/// A small tmpfs for the log, unmounted on drop.
struct TinyFs {
    dir: PathBuf,
}

impl TinyFs {
    fn mount(dir: PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&dir).expect("mkdir");
        nix::mount::mount(Some("tmpfs"), &dir, Some("tmpfs"), nix::mount::MsFlags::empty(), Some(format!("size={size},mode=0755").as_str()))
            .unwrap_or_else(|e| panic!("mount tmpfs on {}: {e}", dir.display()));
        Self { dir }
    }

    /// Fill it up; returns the filler's path.
    fn fill(&self) -> PathBuf {
        let path = self.dir.join("filler");
        let mut f = std::fs::File::create(&path).expect("create filler");
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        path
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn fail_closed_denies_while_the_log_cannot_be_written() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let target = format!("127.0.0.1:{port}");
    let base = TempDir::new("fullfs");
    let fs = TinyFs::mount(base.join("log"), "256k");
    let log = fs.dir.join("events.jsonl");
    let mut d = Daemon::start_with(&[("fc.toml", &policy("fc", 1))], &format!("events_log = {log:?}"));
    d.events_log = log.clone();
    assert!(ok(&d.cli(&["status"]), "status").contains("fail-closed: on, not engaged"));

    let filler = fs.fill();
    // The log's last page still has room for a few small lines (a failed
    // batch is cut back to the last whole line, and a later, smaller one may
    // fit), so recording flips between failing and ok until that slack is
    // used up. The agent keeps producing lines and trying to connect until
    // the kernel refuses it (the connects before were let through while the
    // log was writable again); the refused one never arrives.
    let script = format!(
        "i=0; while [ $i -lt 400 ]; do /bin/true; {tb} connect tcp {target} | grep -q '^errno=EPERM' && {{ echo refused_after=$i; exit 0; }}; i=$((i+1)); done; echo never_refused",
        tb = tb()
    );
    let out = d.run_cmd("fc", &["/bin/sh", "-c", &script]).stdout(Stdio::piped()).output().expect("run");
    let refused_after = fact(&out.stdout, "refused_after").unwrap_or_else(|| panic!("a tagged connect must be denied while the log is full: {out:?}\n{}", d.stderr()));
    listener.set_nonblocking(true).expect("nonblocking");
    let mut arrived = 0;
    while listener.accept().is_ok() {
        arrived += 1;
    }
    assert_eq!(arrived.to_string(), refused_after, "exactly the connects made before the refusal arrived: the denied one did not");
    let st = status(&d);
    assert!(st["audit"]["drops"]["write_failed"].as_u64() > Some(0), "{st:#}");
    assert!(d.stderr().contains("cannot write the event log"), "the failure is in the daemon's log");
    // An untagged process is not affected.
    let untagged = Command::new(testbin()).args(["connect", "tcp", &target]).output().expect("run");
    assert_eq!(fact(&untagged.stdout, "result").as_deref(), Some("ok"));
    let _ = listener.accept();

    // Space returns: recording resumes, the loss is reported, agents act again.
    std::fs::remove_file(filler).expect("free space");
    wait_until("recording to recover", &d, || status(&d)["audit"]["recording"] == "ok");
    let loss = d.wait_event(WAIT, "loss event", |e| e["kind"] == "loss" && e["write_failures"].as_u64() > Some(0));
    assert!(loss["userspace_drops"].as_u64() > Some(0), "{loss}");
    assert_eq!(status(&d)["audit"]["fail_closed_engaged"]["log_failed"], false);
    let out = d.run_cmd("fc", &[&tb(), "connect", "tcp", &target]).stdout(Stdio::piped()).output().expect("run");
    assert_eq!(fact(&out.stdout, "result").as_deref(), Some("ok"), "{out:?}");
    // No torn line was left behind: the chain verifies.
    assert!(ok(&verify_cli(&d, &[]), "verify").starts_with("ok: "));
}
