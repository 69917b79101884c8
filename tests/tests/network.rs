//! Network enforcement: connect and sendmsg of agents decided in the kernel
//! from the policy's rules, on loopback. What the agent sees (EPERM or not),
//! whether the listener got a connection, and what the log says.
use std::{
    net::{TcpListener, UdpSocket},
    os::unix::process::CommandExt as _,
    process::{Command, Output, Stdio},
    time::Duration,
};

use agentguard_tests::{
    daemon::{fact, testbin, Daemon},
    guard::TempDir,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

/// Listeners on loopback that accept anything: TCP v4 + v6 and UDP v4 + v6,
/// on one port number each.
struct Listeners {
    tcp4: TcpListener,
    tcp6: Option<TcpListener>,
    _udp4: UdpSocket,
}

impl Listeners {
    fn new() -> Self {
        let tcp4 = TcpListener::bind("127.0.0.1:0").expect("bind tcp4");
        let port = tcp4.local_addr().expect("addr").port();
        let tcp6 = TcpListener::bind(format!("[::1]:{port}")).ok();
        let udp4 = UdpSocket::bind(format!("127.0.0.1:{port}")).expect("bind udp4");
        tcp4.set_nonblocking(true).expect("nonblocking");
        if let Some(t) = &tcp6 {
            t.set_nonblocking(true).expect("nonblocking");
        }
        Self { tcp4, tcp6, _udp4: udp4 }
    }

    fn port(&self) -> u16 {
        self.tcp4.local_addr().expect("addr").port()
    }

    /// Whether a connection arrived (and drain it).
    fn accepted4(&self) -> bool {
        self.tcp4.accept().is_ok()
    }
}

fn errno(out: &Output) -> String {
    fact(&out.stdout, "errno").unwrap_or_else(|| fact(&out.stdout, "result").unwrap_or_default())
}

fn agent_run(d: &Daemon, agent: &str, args: &[&str]) -> Output {
    let tb = testbin();
    let mut full = vec![tb.to_str().expect("utf-8 path")];
    full.extend_from_slice(args);
    d.run_cmd(agent, &full).stdout(Stdio::piped()).output().expect("run agent")
}

fn net_events(d: &Daemon, port: u16) -> Vec<Value> {
    d.events().into_iter().filter(|e| e["kind"] == "net" && e["port"] == port).collect()
}

fn policy(deny_tcp: u16, deny_udp: u16, deny_v6: u16, approve: u16) -> String {
    format!(
        r#"[agent]
name = "netagent"

[network]
default = "allow"

[[network.rule]]
id = "deny-tcp"
decision = "deny"
cidr = ["127.0.0.1/32"]
ports = [{deny_tcp}]
protocol = "tcp"

[[network.rule]]
id = "deny-udp"
decision = "deny"
cidr = ["127.0.0.0/8"]
ports = [{deny_udp}]
protocol = "udp"

[[network.rule]]
id = "deny-v6"
decision = "deny"
cidr = ["::1/128"]
ports = [{deny_v6}]

[[network.rule]]
id = "hold-db"
decision = "approve"
ports = [{approve}]
"#
    )
}

const STRICT: &str = r#"[agent]
name = "strict"

[network]
default = "deny"

[[network.rule]]
id = "only-localhost"
decision = "allow"
hosts = ["localhost"]
protocol = "tcp"
"#;

#[test]
fn tcp_and_udp_v4_v6_and_mapped_are_decided_per_rule() {
    let (a, b, c, e) = (Listeners::new(), Listeners::new(), Listeners::new(), Listeners::new());
    let d = Daemon::start(&[("net.toml", &policy(a.port(), b.port(), c.port(), e.port()))]);
    let pa = a.port();

    // TCP v4 to a denied port: EPERM, nothing reaches the listener.
    let out = agent_run(&d, "netagent", &["connect", "tcp", &format!("127.0.0.1:{pa}")]);
    assert_eq!(errno(&out), "EPERM", "{out:?}");
    assert!(!a.accepted4(), "a denied connect must not reach the listener");

    // The same destination through IPv4-mapped IPv6 is judged as IPv4.
    let out = agent_run(&d, "netagent", &["connect", "tcp", &format!("[::ffff:127.0.0.1]:{pa}")]);
    assert_eq!(errno(&out), "EPERM", "v4-mapped must not bypass the v4 rule: {out:?}");
    assert!(!a.accepted4());

    // A port no rule names: the agent's default (allow) → it connects.
    let out = agent_run(&d, "netagent", &["connect", "tcp", &format!("127.0.0.1:{}", b.port())]);
    assert_eq!(errno(&out), "ok", "{out:?}");
    assert!(b.accepted4(), "an allowed connect reaches the listener");

    // UDP: connect and unconnected sendto are both judged.
    let pb = b.port();
    let out = agent_run(&d, "netagent", &["connect", "udp", &format!("127.0.0.1:{pb}")]);
    assert_eq!(errno(&out), "EPERM", "udp connect: {out:?}");
    let out = agent_run(&d, "netagent", &["sendto", &format!("127.0.0.1:{pb}")]);
    assert_eq!(errno(&out), "EPERM", "udp sendto: {out:?}");
    let out = agent_run(&d, "netagent", &["sendto", &format!("127.0.0.1:{pa}")]);
    assert_eq!(errno(&out), "ok", "the tcp-only rule does not touch udp: {out:?}");

    // IPv6.
    assert!(c.tcp6.is_some() && a.tcp6.is_some(), "IPv6 loopback is needed for this test");
    let out = agent_run(&d, "netagent", &["connect", "tcp", &format!("[::1]:{}", c.port())]);
    assert_eq!(errno(&out), "EPERM", "v6: {out:?}");
    let out = agent_run(&d, "netagent", &["connect", "tcp", &format!("[::1]:{pa}")]);
    assert_eq!(errno(&out), "ok", "the v4 rule does not apply to ::1: {out:?}");

    // approve holds: refused, the agent frozen until a human answers
    // (denied here; tests/tests/approvals.rs has the rest), and logged.
    let tb = testbin();
    let held = d
        .run_cmd("netagent", &[tb.to_str().expect("utf-8"), "connect", "tcp", &format!("127.0.0.1:{}", e.port())])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn agent");
    let pending = d.wait_approval(WAIT, "the held connect", |a| a["rule"] == "hold-db");
    let denied = d.cli(&["deny", &pending["id"].to_string()]);
    assert!(denied.status.success(), "deny: {denied:?}");
    let out = held.wait_with_output().expect("wait");
    assert_eq!(errno(&out), "EPERM", "approve must not let it through: {out:?}");
    assert!(!e.accepted4());
    let ev = d.wait_event(WAIT, "approve event", |v| v["kind"] == "net" && v["port"] == e.port());
    assert_eq!((ev["decision"].as_str(), ev["approval"].as_str()), (Some("approve"), Some("held")));

    // An untagged process is never affected.
    let out = Command::new(testbin()).args(["connect", "tcp", &format!("127.0.0.1:{pa}")]).output().expect("run");
    assert_eq!(errno(&out), "ok", "untagged: {out:?}");
    assert!(a.accepted4());

    // Each denial reaches the daemon exactly once, with its destination.
    d.wait_event(WAIT, "denials logged", |v| v["kind"] == "net" && v["port"] == pb && v["action"] == "sendmsg");
    let denied_a = net_events(&d, pa);
    let tcp_denials: Vec<_> = denied_a.iter().filter(|v| v["decision"] == "deny" && v["protocol"] == "tcp").collect();
    assert_eq!(tcp_denials.len(), 2, "two denied TCP attempts to {pa} (v4 and v4-mapped), each logged once: {denied_a:#?}");
    assert_eq!(tcp_denials[0]["address"], "127.0.0.1");
    assert_eq!(tcp_denials[0]["agent"], "netagent");
    assert_eq!(tcp_denials[1]["address"], "127.0.0.1", "the mapped address is logged as IPv4");
}

#[test]
fn deny_by_default_agent_reaches_only_named_hosts() {
    let l = Listeners::new();
    let d = Daemon::start(&[("strict.toml", STRICT)]);
    let ok = agent_run(&d, "strict", &["connect", "tcp", &format!("127.0.0.1:{}", l.port())]);
    assert_eq!(errno(&ok), "ok", "localhost resolves to 127.0.0.1, which the host rule allows: {ok:?}");
    let denied = agent_run(&d, "strict", &["connect", "udp", &format!("127.0.0.1:{}", l.port())]);
    assert_eq!(errno(&denied), "EPERM", "udp is not in the host rule: the default denies");
    let denied = agent_run(&d, "strict", &["connect", "tcp", &format!("127.0.0.2:{}", l.port())]);
    assert_eq!(errno(&denied), "EPERM", "127.0.0.2 is not localhost");
}

#[test]
fn dns_traffic_is_visible_with_its_server() {
    let d = Daemon::start(&[("net.toml", "[agent]\nname = \"dnsagent\"\n[network]\ndefault = \"allow\"\n")]);
    let out = agent_run(&d, "dnsagent", &["sendto", "127.0.0.53:53"]);
    assert_eq!(errno(&out), "ok", "{out:?}");
    let ev = d.wait_event(WAIT, "dns event", |v| v["kind"] == "net" && v["port"] == 53);
    assert_eq!(ev["address"], "127.0.0.53");
    assert_eq!(ev["protocol"], "udp");
}

#[test]
fn a_rule_change_applies_to_a_running_agent_without_restart() {
    let l = Listeners::new();
    let port = l.port();
    let open = "[agent]\nname = \"live\"\n[network]\ndefault = \"allow\"\n";
    let d = Daemon::start(&[("live.toml", open)]);
    let gate = TempDir::new("gate");
    let gate_file = gate.join("go");
    let tb = testbin();
    let child = d
        .run_cmd(
            "live",
            &[tb.to_str().expect("utf-8"), "connect-twice", "tcp", &format!("127.0.0.1:{port}"), gate_file.to_str().expect("utf-8")],
        )
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn agent");
    // Wait for the first (allowed) attempt before changing the policy.
    d.wait_event(WAIT, "first connect", |v| v["kind"] == "net" && v["port"] == port);
    let closed = format!("{open}[[network.rule]]\nid = \"close\"\ndecision = \"deny\"\nports = [{port}]\n");
    std::fs::write(d.dir.join("policies").join("live.toml"), closed).expect("rewrite policy");
    let out = d.cli(&["reload"]);
    assert!(out.status.success(), "reload: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(&gate_file, "").expect("open gate");
    let out = child.wait_with_output().expect("wait");
    assert_eq!(fact(&out.stdout, "try1").as_deref(), Some("ok"), "{out:?}");
    assert_eq!(fact(&out.stdout, "try2").as_deref(), Some("EPERM"), "the new rule applies to the running agent: {out:?}");

    // An invalid policy is rejected with file:line:column; the rule in force stays.
    std::fs::write(d.dir.join("policies").join("live.toml"), "[agent]\nname = \"live\"\n[network]\ndefault = \"alow\"\n")
        .expect("write bad policy");
    let out = d.cli(&["reload"]);
    assert!(!out.status.success(), "an invalid policy must be refused");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("live.toml:4:"), "error names file and line: {err}");
    let again = agent_run(&d, "live", &["connect", "tcp", &format!("127.0.0.1:{port}")]);
    assert_eq!(errno(&again), "EPERM", "the previous policy stays in force: {again:?}");

    // A rule taken out of the policy stops applying: its entry leaves the kernel.
    std::fs::write(d.dir.join("policies").join("live.toml"), open).expect("rewrite policy");
    let out = d.cli(&["reload"]);
    assert!(out.status.success(), "reload: {}", String::from_utf8_lossy(&out.stderr));
    let after = agent_run(&d, "live", &["connect", "tcp", &format!("127.0.0.1:{port}")]);
    assert_eq!(errno(&after), "ok", "the removed rule still denies: {after:?}");
}

#[test]
fn policy_check_reports_file_line_column() {
    let dir = TempDir::new("check");
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[agent]\nname = \"x\"\ncolour = 1\n[network]\ndefault = \"deny\"\n[[network.rule]]\nid = \"r\"\ndecision = \"allow\"\ncidr = [\"300.1.1.1/8\"]\n",
    )
    .expect("write");
    let out = Command::new(agentguard_tests::agentguard_bin()).args(["policy", "check"]).arg(&bad).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:3:1"), "unknown key located: {err}");
    let shipped = agentguard_tests::shipped_policy_dir();
    let out = Command::new(agentguard_tests::agentguard_bin()).args(["policy", "check"]).arg(&shipped).arg(shipped.join("examples")).output().expect("run");
    assert!(out.status.success(), "shipped policies must pass: {}", String::from_utf8_lossy(&out.stderr));
}

/// A host name's addresses follow its DNS answers: when the record changes,
/// the rule follows within the record's TTL (plus the refresher's tick), and
/// the old address is released.
#[test]
fn host_name_rules_follow_the_dns_answer_within_its_ttl() {
    use std::net::Ipv4Addr;

    use agentguard_tests::dns::{DnsServer, TTL_SECS};
    let dns = DnsServer::start(Ipv4Addr::new(127, 0, 0, 2));
    let port = Listeners::new().port();
    // The name passes the policy check through the system resolver (a
    // hosts file only the daemon sees says 127.0.0.1); the daemon is told
    // to follow the test server, which says otherwise.
    const HOST: &str = "api.agentguard-ttl.test";
    let text = format!(
        "[agent]\nname = \"ttl\"\n[network]\ndefault = \"allow\"\n\
         [[network.rule]]\nid = \"named\"\ndecision = \"deny\"\nhosts = [\"{HOST}\"]\nports = [{port}]\nprotocol = \"tcp\"\n"
    );
    let d = Daemon::start_with_hosts(
        &[("ttl.toml", &text)],
        &format!("dns_servers = [\"{}\"]", dns.addr()),
        &format!("127.0.0.1 localhost {HOST}\n"),
    );
    let moved_to = |ip: &str| {
        let ip = ip.to_owned();
        move |v: &Value| v["kind"] == "host_addresses" && v["name"] == HOST && v["addresses"] == serde_json::json!([ip])
    };
    d.wait_event(WAIT, "localhost re-resolved through the test server", moved_to("127.0.0.2"));
    let at = |ip: &str| errno(&agent_run(&d, "ttl", &["connect", "tcp", &format!("{ip}:{port}")]));
    assert_eq!(at("127.0.0.2"), "EPERM", "the address DNS gave is denied");
    assert_eq!(at("127.0.0.1"), "ECONNREFUSED", "the address /etc/hosts gave is no longer the host's");

    // The record changes: within its TTL and one refresh tick, the rule moves.
    let changed = std::time::Instant::now();
    dns.set(Ipv4Addr::new(127, 0, 0, 3));
    d.wait_event(WAIT, "the new address", moved_to("127.0.0.3"));
    let took = changed.elapsed();
    assert!(took < Duration::from_secs(u64::from(TTL_SECS) + 3), "refreshed {took:?} after the change (TTL {TTL_SECS} s)");
    assert_eq!(at("127.0.0.3"), "EPERM", "the new address is denied");
    assert_eq!(at("127.0.0.2"), "ECONNREFUSED", "the old address is released");
    assert!(dns.queries() >= 2, "the daemon asked the server: {} queries", dns.queries());
}

/// A rule with `freeze = true` refuses the connect and stops the whole agent
/// at once (the killswitch); `thaw` lets it go on.
#[test]
fn a_freeze_rule_refuses_and_freezes_the_agent() {
    let port = Listeners::new().port();
    let text = format!(
        "[agent]\nname = \"fz\"\n[network]\ndefault = \"allow\"\n\
         [[network.rule]]\nid = \"tripwire\"\ndecision = \"deny\"\nports = [{port}]\nfreeze = true\n"
    );
    let d = Daemon::start(&[("fz.toml", &text)]);
    let tb = testbin();
    let tb = tb.to_str().expect("utf-8");
    let script = format!("{tb} connect tcp 127.0.0.1:{port}; exec {tb} sleep 30");
    let mut agent = d.run_cmd("fz", &["/bin/sh", "-c", &script]).stdout(Stdio::piped()).spawn().expect("spawn agent");
    let ev = d.wait_event(WAIT, "the freeze", |v| v["kind"] == "freeze" && v["agent"] == "fz");
    assert!(ev["reason"].as_str().is_some_and(|r| r.contains("tripwire")), "the freeze names the rule: {ev}");
    let events = std::fs::read_to_string(d.cgroup_subtree().join("fz").join("cgroup.events")).expect("cgroup.events");
    assert!(events.lines().any(|l| l == "frozen 1"), "the kernel reports the agent frozen: {events}");
    let out = d.cli(&["thaw", "fz", "--reason", "test"]);
    assert!(out.status.success(), "thaw: {}", String::from_utf8_lossy(&out.stderr));
    let _ = agent.kill();
    let out = agent.wait_with_output().expect("agent output");
    assert_eq!(fact(&out.stdout, "errno").or_else(|| fact(&out.stdout, "result")).as_deref(), Some("EPERM"), "{out:?}");
}

/// Run `c` on CPU 0 only.
fn on_cpu0(mut c: Command) -> Command {
    // SAFETY: sched_setaffinity is async-signal-safe; nothing else runs
    // between fork and exec.
    unsafe {
        c.pre_exec(|| {
            let mut set = nix::sched::CpuSet::new();
            set.set(0).map_err(std::io::Error::from)?;
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).map_err(std::io::Error::from)
        });
    }
    c
}

/// Each CPU remembers the last allowed flow it counted (net.rs, the flow
/// slot), keyed by the task. An agent must not inherit another agent's
/// allowed flow by coming to life with its process id on the same CPU. The
/// first process, in an allow-everything agent, connects and exits; a
/// process of a deny-everything agent that was already running then forks a
/// child that gets the same pid (ns_last_pid), on the same CPU, and connects
/// to the same address. Both sessions stay open throughout, so no policy
/// compile (which decides every flow again) happens in between: only the
/// tag epoch (a tag was written at the fork) stands between the child and
/// the other agent's flow.
#[test]
fn a_reused_pid_does_not_inherit_another_agents_allowed_flow() {
    use std::io::{BufRead as _, BufReader, Write as _};
    let l = Listeners::new();
    let target = format!("127.0.0.1:{}", l.port());
    let d = Daemon::start(&[
        ("open.toml", "[agent]\nname = \"open\"\n[network]\ndefault = \"allow\"\n"),
        ("shut.toml", "[agent]\nname = \"shut\"\n[network]\ndefault = \"deny\"\n"),
    ]);
    let tb = testbin();
    let tb = tb.to_str().expect("utf-8");
    let spawn = |agent: &str, script: String| {
        let mut c = on_cpu0(d.run_cmd(agent, &["/bin/sh", "-c", &script]));
        let mut child = c.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("spawn agent");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        (child, out.lines().map_while(Result::ok))
    };
    for _ in 0..20 {
        // Not the script's last command: the shell forks it (dash would
        // exec a last one in place, keeping the shell's own pid).
        let (mut shut, mut shut_out) = spawn("shut", format!("echo ready; read go; {tb} connect udp {target}; echo end"));
        assert_eq!(shut_out.next().as_deref(), Some("ready"));
        // One connect, on the process's main thread (the slot is keyed by
        // the thread): its flow is then in CPU 0's slot.
        let (mut open, open_out) = spawn("open", format!("{tb} connect udp {target}; echo end; read done"));
        let facts: Vec<String> = open_out.take_while(|l| l != "end").collect();
        assert!(facts.iter().any(|l| l == "result=ok"), "the open agent may connect: {facts:?}");
        let pid: u32 = facts.iter().find_map(|l| l.strip_prefix("pid=")).and_then(|p| p.parse().ok()).expect("pid");
        let start = std::time::Instant::now();
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            assert!(start.elapsed() < WAIT, "the open agent's process did not exit");
            std::thread::sleep(Duration::from_millis(1));
        }
        // The next process created gets `pid`, unless another one beats it.
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).expect("write ns_last_pid");
        shut.stdin.as_mut().expect("stdin").write_all(b"go\n").expect("release the shut agent");
        let lines: Vec<String> = shut_out.collect();
        let _ = shut.wait();
        let _ = open.stdin.as_mut().expect("stdin").write_all(b"done\n");
        let _ = open.wait();
        if !lines.iter().any(|l| *l == format!("pid={pid}")) {
            continue;
        }
        let errno = lines.iter().find_map(|l| l.strip_prefix("errno="));
        assert_eq!(errno, Some("EPERM"), "the deny-everything agent's child with a reused pid connected: {lines:?}");
        return;
    }
    panic!("the second agent's child never got the first one's pid in 20 attempts");
}

/// Sum of `count` over net lines to `port` with `decision`, and the lines.
fn counted(d: &Daemon, port: u16, decision: &str) -> (u64, Vec<Value>) {
    let lines: Vec<Value> = net_events(d, port).into_iter().filter(|e| e["decision"] == decision).collect();
    (lines.iter().map(|e| e["count"].as_u64().unwrap_or_else(|| panic!("a net line without count: {e}"))).sum(), lines)
}

#[test]
fn allowed_repeats_are_counted_in_the_kernel_and_logged_exactly() {
    const N: u64 = 20_000;
    const AUDITED: u64 = 300;
    let (allowed, allowed2, audited, denied) = (Listeners::new(), Listeners::new(), Listeners::new(), Listeners::new());
    let policy = format!(
        "[agent]\nname = \"flows\"\n[network]\ndefault = \"allow\"\n\
         [[network.rule]]\nid = \"watch\"\ndecision = \"audit\"\nports = [{}]\n\
         [[network.rule]]\nid = \"no\"\ndecision = \"deny\"\nports = [{}]\n",
        audited.port(),
        denied.port()
    );
    let d = Daemon::start(&[("flows.toml", &policy)]);
    let tb = testbin();
    let tb = tb.to_str().expect("utf-8");
    // N allowed connects to one port, N to another, then audited and denied
    // ones, one process each, all on CPU 0: the second allowed flow refills
    // the CPU's flow slot, which moves the first one's repeats into AG_FLOWS
    // (net.rs, slot_fill), and the second's stay in the slot until the
    // daemon reads them there. Both accounts must come out exact.
    let script = format!(
        "{tb} connects 127.0.0.1:{} {N} 0 now && {tb} connects 127.0.0.1:{} {N} 0 now && {tb} connects 127.0.0.1:{} {AUDITED} 0 now && {tb} connects 127.0.0.1:{} 50 0 now",
        allowed.port(),
        allowed2.port(),
        audited.port(),
        denied.port()
    );
    let out = on_cpu0(d.run_cmd("flows", &["/bin/sh", "-c", &script])).stdout(Stdio::piped()).output().expect("run agent");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("denied=50"), "the deny rule still refuses every attempt: {text}");

    // Every allowed connect is accounted for: one `first` line, then
    // `repeats` lines whose counts add up to the rest, exactly.
    for port in [allowed.port(), allowed2.port()] {
        let start = std::time::Instant::now();
        let (total, lines) = loop {
            let (total, lines) = counted(&d, port, "allow");
            if total >= N || start.elapsed() > WAIT {
                break (total, lines);
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(total, N, "allowed connects to {port} accounted for: {lines:#?}");
        let firsts: Vec<_> = lines.iter().filter(|e| e["flow"] == "first").collect();
        assert_eq!(firsts.len(), 1, "one first line per flow: {lines:#?}");
        assert_eq!(firsts[0]["count"], 1);
        assert!(lines.len() < 50, "repeats are summarised, not one line each: {} lines", lines.len());
        for r in lines.iter().filter(|e| e["flow"] == "repeats") {
            assert_eq!((r["pid"].clone(), r["rule"].as_str(), r["protocol"].as_str()), (firsts[0]["pid"].clone(), Some("default"), Some("udp")), "{r}");
            assert!(r["since"].is_string(), "{r}");
        }
    }
    // audit and deny decisions stay one line per action.
    let (audited_total, audited_lines) = counted(&d, audited.port(), "audit");
    assert_eq!((audited_total, audited_lines.len() as u64), (AUDITED, AUDITED), "audit: one line each");
    assert!(audited_lines.iter().all(|e| e["flow"].is_null()));
    let (denied_total, denied_lines) = counted(&d, denied.port(), "deny");
    assert_eq!((denied_total, denied_lines.len()), (50, 50), "deny: one line each");

    // The session ended: its flows leave the kernel.
    let start = std::time::Instant::now();
    while d.status()["audit"]["flows_counted"] != 0 {
        assert!(start.elapsed() < WAIT, "the ended session's flows stay counted: {:#}", d.status()["audit"]);
        std::thread::sleep(Duration::from_millis(100));
    }
    for port in [allowed.port(), allowed2.port()] {
        assert_eq!(counted(&d, port, "allow").0, N, "removing the flows logged nothing twice");
    }
}
