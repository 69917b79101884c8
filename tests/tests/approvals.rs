//! Approvals: an `approve` rule refuses the action in the kernel, the agent
//! is frozen, and the action happens only when a human grants it and the
//! agent retries the same action on the same target from the same session.
//! Each test asserts on what the kernel did (the errno the agent saw, the
//! connection that did or did not reach the listener, the file still on
//! disk, the cgroup frozen) and on what the daemon recorded.
use std::{
    net::TcpListener,
    path::Path,
    process::{Child, Output, Stdio},
    time::{Duration, Instant},
};

use agentguard_tests::{
    agentguard_bin,
    daemon::{fact, testbin, Daemon},
    guard::TempDir,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(15);
const AGENT: &str = "holder";

fn listener() -> TcpListener {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.set_nonblocking(true).expect("nonblocking");
    l
}

fn port(l: &TcpListener) -> u16 {
    l.local_addr().expect("addr").port()
}

/// Whether a connection arrived (and drain it).
fn accepted(l: &TcpListener) -> bool {
    l.accept().is_ok()
}

fn net_policy(held: &[u16]) -> String {
    format!(
        r#"[agent]
name = "{AGENT}"

[network]
default = "allow"

[[network.rule]]
id = "hold-db"
decision = "approve"
cidr = ["127.0.0.0/8"]
ports = {held:?}
protocol = "tcp"
reversibility = "irreversible"
rollback = "restore the database from its latest backup"
"#
    )
}

const OTHER: &str = "[agent]\nname = \"other\"\n[network]\ndefault = \"allow\"\n";

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `agentguard run --agent AGENT -- ag-testbin steps STEPS...`, running.
fn spawn_steps(d: &Daemon, agent: &str, steps: &[String]) -> Child {
    let tb = testbin();
    let mut args = vec![s(&tb), "steps"];
    args.extend(steps.iter().map(String::as_str));
    d.run_cmd(agent, &args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn agent")
}

fn wait_exit(mut child: Child, what: &str, d: &Daemon) -> Output {
    let start = Instant::now();
    while child.try_wait().expect("try_wait").is_none() {
        if start.elapsed() > WAIT {
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait");
            panic!("{what} did not finish (still frozen?): {out:?}\npending: {:#?}\ndaemon:\n{}", d.approvals(), d.stderr());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("wait")
}

fn wait_until(what: &str, d: &Daemon, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}; daemon:\n{}", d.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn id_of(a: &Value) -> String {
    a["id"].as_u64().expect("approval id").to_string()
}

fn cli_ok(d: &Daemon, args: &[&str]) -> String {
    let out = d.cli(args);
    assert!(out.status.success(), "agentguard {args:?} failed: {}\ndaemon:\n{}", String::from_utf8_lossy(&out.stderr), d.stderr());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn touch(p: &Path) {
    std::fs::write(p, b"").expect("open gate");
}

/// The whole path of an approval: held and frozen, a reviewer's record,
/// `approve --once` lets exactly the same retry through once, another
/// target is held again, and so is the second retry.
#[test]
fn approve_once_lets_the_same_retry_through_once_and_nothing_else() {
    let (p, q) = (listener(), listener());
    let gates = TempDir::new("gates");
    let notify = format!(
        "approval_notify = [\"/bin/sh\", \"-c\", \"cat > {}/notify-$AGENTGUARD_APPROVAL_ID.json\"]",
        s(&gates.join("."))
    );
    let d = Daemon::start_with(&[("holder.toml", &net_policy(&[port(&p), port(&q)]))], &notify);
    let (g1, g2) = (gates.join("g1"), gates.join("g2"));
    let (pa, qa) = (format!("tcp=127.0.0.1:{}", port(&p)), format!("tcp=127.0.0.1:{}", port(&q)));
    let agent = spawn_steps(&d, AGENT, &[pa.clone(), format!("wait={}", s(&g1)), qa, format!("wait={}", s(&g2)), pa.clone(), pa]);
    let agent_pid = agent.id();

    // 1. Held: refused, nothing reached the listener, the agent is frozen,
    //    and the reviewer's record has what the issue lists.
    let a1 = d.wait_approval(WAIT, "the first connect", |a| a["target"] == format!("127.0.0.1:{}", port(&p)));
    wait_until("the agent frozen", &d, || d.frozen(AGENT));
    assert!(!accepted(&p), "a held connect must not reach the listener");
    assert_eq!((a1["kind"].as_str(), a1["action"].as_str()), (Some("net"), Some("connect")));
    assert_eq!((a1["agent"].as_str(), a1["rule"].as_str()), (Some(AGENT), Some("hold-db")));
    assert_eq!(a1["reversibility"], "irreversible");
    assert_eq!(a1["rollback"], "restore the database from its latest backup");
    assert_eq!(a1["enforcement"], "enforced");
    assert_eq!(a1["frozen"], true);
    assert_eq!(a1["protocol"], "tcp");
    assert!(a1["lineage"].is_array(), "{a1:#}");
    let activity = a1["activity"].as_array().expect("activity");
    assert!(
        activity.iter().any(|e| e["kind"] == "exec" && e["pid"].as_u64().is_some()),
        "the last 60 s of activity include the agent's exec: {activity:#?}"
    );
    assert!(activity.iter().any(|e| e["kind"] == "net" && e["approval"] == "held"), "and the held attempt itself: {activity:#?}");
    let human = cli_ok(&d, &["approvals"]);
    assert!(human.contains("hold-db") && human.contains(&format!("127.0.0.1:{}", port(&p))), "{human}");
    // The notify command ran with the approval on stdin.
    let note = gates.join(format!("notify-{}.json", id_of(&a1)));
    wait_until("the notify command", &d, || std::fs::read(&note).is_ok_and(|b| serde_json::from_slice::<Value>(&b).is_ok()));
    let told: Value = serde_json::from_slice(&std::fs::read(&note).expect("notify file")).expect("JSON");
    assert_eq!(told["id"], a1["id"]);
    assert_eq!(told["target"], a1["target"]);

    // 2. Approve once: the agent is thawed and tries another target first:
    //    the grant does not cover it, so it is held again.
    touch(&g1);
    let out = cli_ok(&d, &["approve", &id_of(&a1), "--once"]);
    assert!(out.contains("granted once"), "{out}");
    let a2 = d.wait_approval(WAIT, "the other target", |a| a["target"] == format!("127.0.0.1:{}", port(&q)));
    wait_until("the agent frozen again", &d, || d.frozen(AGENT));
    assert!(!accepted(&q) && !accepted(&p), "a grant for one target lets nothing else through");
    assert_ne!(a2["id"], a1["id"]);

    // 3. Deny that one; the agent retries the approved action: it passes,
    //    once; the second retry is held again.
    touch(&g2);
    let out = cli_ok(&d, &["deny", &id_of(&a2)]);
    assert!(out.contains("denied"), "{out}");
    let a3 = d.wait_approval(WAIT, "the second retry", |a| a["id"] != a1["id"] && a["id"] != a2["id"]);
    assert_eq!(a3["target"], a1["target"], "the second retry of the approved target is held again");
    assert!(accepted(&p), "the first retry after approval reached the listener");
    assert!(!accepted(&p), "exactly once");
    cli_ok(&d, &["deny", &id_of(&a3)]);
    let out = wait_exit(agent, "the agent", &d);
    let facts = |k: &str| fact(&out.stdout, k).unwrap_or_default();
    assert_eq!(
        (facts("s1"), facts("s2"), facts("s3"), facts("s4")),
        ("EPERM".into(), "EPERM".into(), "ok".into(), "EPERM".into()),
        "held, other target held, approved retry, second retry held: {out:?}"
    );
    assert!(d.approvals().is_empty(), "nothing left pending");

    // The log tells the story, and the retry names the approval it used.
    let used = d.wait_event(WAIT, "the granted retry", |e| e["kind"] == "net" && e["approval"] == "granted_once");
    assert_eq!(used["approval_id"], a1["id"]);
    assert_eq!(used["pid"].as_u64(), Some(u64::from(agent_pid)), "the agent itself retried");
    let kinds: Vec<String> = d.events().iter().filter_map(|e| e["kind"].as_str().filter(|k| k.starts_with("approval_")).map(str::to_owned)).collect();
    assert_eq!(
        kinds,
        ["approval_pending", "approval_granted", "approval_pending", "approval_denied", "approval_pending", "approval_denied"],
        "log: {:#?}",
        d.events()
    );
    let granted = d.events().into_iter().find(|e| e["kind"] == "approval_granted").expect("granted line");
    assert!(granted["by"]["pid"].as_u64().is_some(), "who approved is recorded: {granted:#}");
    // Every line, the approval lines included, fits the published schema.
    cli_ok(&d, &["audit", "verify", "--schema"]);
}

/// `approve --for` lets every retry of that action through until it ends,
/// and only the session that was held.
#[test]
fn approve_for_a_duration_lets_each_retry_through() {
    let p = listener();
    let d = Daemon::start(&[("holder.toml", &net_policy(&[port(&p)]))]);
    let gates = TempDir::new("gates");
    let g1 = gates.join("g1");
    let pa = format!("tcp=127.0.0.1:{}", port(&p));
    let agent = spawn_steps(&d, AGENT, &[pa.clone(), format!("wait={}", s(&g1)), pa.clone(), pa.clone(), pa]);
    let a1 = d.wait_approval(WAIT, "the connect", |_| true);
    touch(&g1);
    let out = cli_ok(&d, &["approve", &id_of(&a1), "--for", "1m"]);
    assert!(out.contains("granted until"), "{out}");
    let out = wait_exit(agent, "the agent", &d);
    for k in ["s2", "s3", "s4"] {
        assert_eq!(fact(&out.stdout, k).as_deref(), Some("ok"), "{k}: {out:?}");
    }
    for _ in 0..3 {
        assert!(accepted(&p), "each retry reached the listener");
    }
    assert!(d.approvals().is_empty());

    // The grant is the session's: another session of the same agent, same
    // target, while the grant still runs, is held.
    let first_session = a1["session"].clone();
    let other = spawn_steps(&d, AGENT, &[format!("tcp=127.0.0.1:{}", port(&p))]);
    let a2 = d.wait_approval(WAIT, "the other session's connect", |_| true);
    assert_ne!(a2["session"], first_session, "{a2:#}");
    assert_eq!(a2["target"], a1["target"]);
    cli_ok(&d, &["deny", &id_of(&a2)]);
    let out = wait_exit(other, "the other session", &d);
    assert_eq!(fact(&out.stdout, "s1").as_deref(), Some("EPERM"), "{out:?}");
    assert!(!accepted(&p), "the other session got nothing through");
}

/// Unanswered approvals expire into a deny (the agent is thawed and the
/// action stays refused); `deny --kill` kills the agent; an answered or
/// expired approval cannot be answered again.
#[test]
fn deny_and_expiry_keep_the_action_refused() {
    let p = listener();
    let d = Daemon::start_with(&[("holder.toml", &net_policy(&[port(&p)]))], "approval_timeout_s = 5");
    let gates = TempDir::new("gates");
    let g1 = gates.join("g1");
    let pa = format!("tcp=127.0.0.1:{}", port(&p));
    // The last gate never opens: the agent waits there until it is killed.
    let never = gates.join("never");
    let agent = spawn_steps(&d, AGENT, &[pa.clone(), format!("wait={}", s(&g1)), pa, format!("wait={}", s(&never))]);
    // The approval may expire before a slow machine (the VM) has listed
    // it: read it from the log, which keeps it.
    let pending = d.wait_event(WAIT, "approval_pending", |e| e["kind"] == "approval_pending");
    assert_eq!(pending["frozen"], true, "the daemon confirmed the freeze: {pending:#}");
    let a1 = serde_json::json!({ "id": pending["approval_id"] });
    // Nobody answers: expired within the timeout plus the daemon's tick.
    wait_until("the approval expired", &d, || d.approvals().is_empty());
    let expired = d.wait_event(WAIT, "approval_expired", |e| e["kind"] == "approval_expired");
    assert_eq!(expired["approval_id"], a1["id"]);
    wait_until("the agent thawed", &d, || !d.frozen(AGENT));
    let again = d.cli(&["approve", &id_of(&a1)]);
    assert!(!again.status.success(), "an expired approval cannot be granted");
    assert!(String::from_utf8_lossy(&again.stderr).contains("no pending approval"), "{again:?}");

    // The retry is held again (expiry grants nothing); deny --kill ends the agent.
    touch(&g1);
    let a2 = d.wait_approval(WAIT, "the retry", |a| a["id"] != a1["id"]);
    let out = cli_ok(&d, &["deny", &id_of(&a2), "--kill"]);
    assert!(out.contains("killed"), "{out}");
    let out = wait_exit(agent, "the killed agent", &d);
    assert!(!out.status.success(), "killed: {out:?}");
    assert_eq!(fact(&out.stdout, "s1").as_deref(), Some("EPERM"));
    // The agent is frozen at the refused retry, and may be killed before it
    // gets to print what connect returned: no line, or EPERM, never success.
    let s2 = fact(&out.stdout, "s2");
    assert!(matches!(s2.as_deref(), None | Some("EPERM")), "the retry was refused: {out:?}");
    assert!(!accepted(&p), "nothing ever reached the listener");
}

/// An agent cannot answer its own approval, nor thaw itself: the control
/// socket refuses every tagged process, whether it uses the CLI or writes
/// the request to the socket itself.
#[test]
fn a_tagged_process_cannot_approve_or_thaw() {
    let p = listener();
    let d = Daemon::start(&[("holder.toml", &net_policy(&[port(&p)])), ("other.toml", OTHER)]);
    let gates = TempDir::new("gates");
    let g1 = gates.join("g1");
    let pa = format!("tcp=127.0.0.1:{}", port(&p));
    let agent = spawn_steps(&d, AGENT, &[pa.clone(), format!("wait={}", s(&g1)), pa]);
    let a1 = d.wait_approval(WAIT, "the connect", |_| true);
    wait_until("the agent frozen", &d, || d.frozen(AGENT));
    let id = id_of(&a1);
    let bin = agentguard_bin();
    let config = d.config.to_str().expect("utf-8").to_owned();
    // Another agent's process (tagged) runs the CLI: approve, thaw, deny.
    for args in [vec!["approve", id.as_str()], vec!["thaw", AGENT], vec!["deny", id.as_str()], vec!["approvals"]] {
        let mut full = vec![s(&bin), "--config", config.as_str()];
        full.extend(args.iter().copied());
        let out = d.run_cmd("other", &full).stdin(Stdio::null()).output().expect("run tagged CLI");
        assert!(!out.status.success(), "a tagged `agentguard {args:?}` must fail: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("refused") || err.contains("inside"), "{args:?}: {err}");
    }
    // ...and the raw protocol, written to the socket by the tagged process itself.
    let req = format!("sock={}:{{\"op\":\"approve\",\"id\":{id},\"grant\":\"once\"}}", s(&d.socket));
    let thaw = format!("sock={}:{{\"op\":\"thaw\",\"target\":{{\"agent\":\"{AGENT}\"}},\"reason\":null}}", s(&d.socket));
    let tb = testbin();
    let out = d.run_cmd("other", &[s(&tb), "steps", &req, &thaw]).stdin(Stdio::null()).output().expect("run tagged socket writer");
    for k in ["s1", "s2"] {
        let answer: Value = serde_json::from_str(&fact(&out.stdout, k).unwrap_or_default()).unwrap_or_else(|e| panic!("{k}: {e}: {out:?}"));
        assert_eq!(answer["ok"], false, "{k}: {answer}");
        assert!(answer["error"].as_str().is_some_and(|e| e.contains("agent")), "{k}: {answer}");
    }
    // Nothing changed: still pending, still frozen, nothing got through.
    assert_eq!(d.approvals().len(), 1);
    assert!(d.frozen(AGENT), "the agent is still frozen");
    assert!(!accepted(&p));
    touch(&g1);
    cli_ok(&d, &["deny", &id, "--kill"]);
    let _ = wait_exit(agent, "the killed agent", &d);
}

/// Pending approvals are kept in a state file: a daemon restart keeps them
/// listed, the agent stays frozen meanwhile, and they can be answered after.
#[test]
fn pending_approvals_survive_a_daemon_restart() {
    let p = listener();
    let mut d = Daemon::start(&[("holder.toml", &net_policy(&[port(&p)]))]);
    let gates = TempDir::new("gates");
    let g1 = gates.join("g1");
    let pa = format!("tcp=127.0.0.1:{}", port(&p));
    let agent = spawn_steps(&d, AGENT, &[pa, format!("wait={}", s(&g1))]);
    let a1 = d.wait_approval(WAIT, "the connect", |_| true);
    wait_until("the agent frozen", &d, || d.frozen(AGENT));
    d.restart();
    let after = d.approvals();
    assert_eq!(after.len(), 1, "{after:#?}");
    let st: Value = serde_json::from_slice(&d.cli(&["status", "--json"]).stdout).expect("status --json is JSON");
    let brief = &st["pending_approvals"];
    assert_eq!(brief.as_array().map(Vec::len), Some(1), "status lists the pending approval: {st:#}");
    for k in ["id", "target", "rule", "agent", "pid"] {
        assert_eq!(brief[0][k], a1[k], "status names the held action's {k}");
    }
    assert_eq!(brief[0]["frozen"], true, "{brief}");
    for k in ["id", "target", "rule", "agent", "pid", "lineage", "activity", "expires"] {
        assert_eq!(after[0][k], a1[k], "{k} survives the restart");
    }
    assert!(d.frozen(AGENT), "the agent stays frozen across the restart");
    touch(&g1);
    let out = cli_ok(&d, &["deny", &id_of(&a1)]);
    assert!(out.contains("thawed"), "{out}");
    let out = wait_exit(agent, "the agent", &d);
    assert_eq!(fact(&out.stdout, "s1").as_deref(), Some("EPERM"));
    assert!(d.approvals().is_empty());
    d.restart();
    assert!(d.approvals().is_empty(), "an answered approval does not come back");
}

// ---- files ------------------------------------------------------------------

fn file_policy(held: &Path) -> String {
    format!(
        r#"[agent]
name = "{AGENT}"

[files]
default = "allow"

[[files.rule]]
id = "held-files"
decision = "approve"
paths = ["{}/**"]
reversibility = "irreversible"
rollback = "none: there is no backup"
"#,
        s(held)
    )
}

fn file_mode(d: &Daemon) -> String {
    let out = d.cli(&["status", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    v["file_enforcement"]["mode"].as_str().unwrap_or("?").to_owned()
}

/// With BPF-LSM (the VM): a held unlink does not happen; the process is
/// stopped at the attempt and the agent frozen; after `approve --once` the
/// retry deletes the file, and the next held file is held again.
#[test]
fn a_held_unlink_happens_only_after_approval() {
    let dir = TempDir::new("held");
    let held = dir.join("held");
    std::fs::create_dir_all(&held).expect("mkdir");
    let (x, y) = (held.join("x"), held.join("y"));
    std::fs::write(&x, b"x").expect("write");
    std::fs::write(&y, b"y").expect("write");
    let d = Daemon::start(&[("holder.toml", &file_policy(&held))]);
    let mode = file_mode(&d);
    if mode != "veto" {
        agentguard_tests::skip_without_lsm(&format!("BPF-LSM cannot load on this kernel (file enforcement here: {mode}); the VM harness runs this test"));
        return;
    }
    let g1 = dir.join("g1");
    let (ux, uy) = (format!("unlink={}", s(&x)), format!("unlink={}", s(&y)));
    let agent = spawn_steps(&d, AGENT, &[ux.clone(), format!("wait={}", s(&g1)), ux, uy]);
    let a1 = d.wait_approval(WAIT, "the unlink", |_| true);
    wait_until("the agent frozen", &d, || d.frozen(AGENT));
    assert!(x.exists(), "a held unlink must not happen");
    assert_eq!((a1["kind"].as_str(), a1["action"].as_str(), a1["rule"].as_str()), (Some("file"), Some("unlink"), Some("held-files")));
    assert_eq!(a1["target"].as_str(), Some(s(&x)));
    assert_eq!(a1["enforcement"], "enforced");
    touch(&g1);
    cli_ok(&d, &["approve", &id_of(&a1)]);
    let a2 = d.wait_approval(WAIT, "the other file", |a| a["id"] != a1["id"]);
    assert_eq!(a2["target"].as_str(), Some(s(&y)));
    assert!(!x.exists(), "the approved retry deleted x");
    assert!(y.exists(), "the grant for x does not cover y");
    cli_ok(&d, &["deny", &id_of(&a2)]);
    let out = wait_exit(agent, "the agent", &d);
    let f = |k: &str| fact(&out.stdout, k).unwrap_or_default();
    assert_eq!((f("s1"), f("s2"), f("s3")), ("EPERM".into(), "ok".into(), "EPERM".into()), "{out:?}");
    assert!(y.exists());
}

/// Without BPF-LSM (this host): the unlink cannot be refused; it happens,
/// the process is stopped right after it, the agent frozen, and the
/// approval says so. Answering it thaws the agent.
#[test]
fn a_held_unlink_without_bpf_lsm_is_contained_and_says_so() {
    let dir = TempDir::new("held-obs");
    let held = dir.join("held");
    std::fs::create_dir_all(&held).expect("mkdir");
    let x = held.join("x");
    std::fs::write(&x, b"x").expect("write");
    let d = Daemon::start(&[("holder.toml", &file_policy(&held))]);
    let mode = file_mode(&d);
    if mode != "observe_and_contain" {
        agentguard_tests::skip(&format!("file enforcement here is {mode}: the observation fallback only loads where BPF-LSM cannot veto"));
        return;
    }
    let g1 = dir.join("g1");
    let agent = spawn_steps(&d, AGENT, &[format!("unlink={}", s(&x)), format!("wait={}", s(&g1))]);
    let a1 = d.wait_approval(WAIT, "the unlink", |_| true);
    wait_until("the agent frozen", &d, || d.frozen(AGENT));
    assert_eq!(a1["enforcement"], "contained");
    assert!(a1["note"].as_str().is_some_and(|n| n.contains("already happened")), "{a1:#}");
    touch(&g1);
    cli_ok(&d, &["deny", &id_of(&a1)]);
    let out = wait_exit(agent, "the agent", &d);
    assert_eq!(fact(&out.stdout, "s1").as_deref(), Some("ok"), "observed, not vetoed: {out:?}");
}
