//! File enforcement: irreversible file actions of agents vetoed by BPF-LSM
//! (in the VM), observed and contained by the syscall-tracepoint fallback
//! (on a host without BPF-LSM), and vetoed by Landlock for `agentguard run`
//! agents there. Each test asserts on the disk (what is still there), on
//! what the agent saw, and on the log.
use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use agentguard_tests::{
    agentguard_bin,
    daemon::{fact, testbin, Daemon},
    guard::{CgroupGuard, TempDir},
    require,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(15);
const AGENT: &str = "filer";

/// A tree of `n` files (and a subdirectory holding a third of them).
fn make_tree(root: &Path, n: usize) {
    std::fs::create_dir_all(root.join("sub")).expect("mkdir tree");
    for i in 0..n {
        let dir = if i % 3 == 0 { root.join("sub") } else { root.to_owned() };
        std::fs::write(dir.join(format!("f{i:03}")), format!("file {i}\n")).expect("write tree file");
    }
}

fn count_files(root: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(_) => n += 1,
                Err(_) => {}
            }
        }
    }
    n
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 test path")
}

/// The policy the tests run under: `protected` (a tree) and every `.git`,
/// `*.bak` denied; `held` needs approval; git's lock files audited; the
/// workspace audited; everything else allowed.
fn policy(protected: &Path, held: &Path, selector: &str) -> String {
    format!(
        r#"[agent]
name = "{AGENT}"
{selector}

[files]
default = "allow"

[[files.rule]]
id = "protected-tree"
decision = "deny"
paths = ["{protected}/**"]

[[files.rule]]
id = "held"
decision = "approve"
paths = ["{held}/**"]

[[files.rule]]
id = "locks"
decision = "audit"
paths = ["**/*.lock"]
reversibility = "reversible"

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
id = "workspace"
decision = "audit"
paths = ["{{workspace}}/**"]
"#,
        protected = s(protected),
        held = s(held),
    )
}

/// What this daemon's kernel does with file actions (`status`).
fn file_mode(d: &Daemon) -> String {
    let out = d.cli(&["status", "--json"]);
    assert!(out.status.success(), "status failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    v["file_enforcement"]["mode"].as_str().unwrap_or("?").to_owned()
}

/// `agentguard run --agent filer --workspace WS -- args...`
fn run(d: &Daemon, workspace: &Path, args: &[&str]) -> Output {
    Command::new(agentguard_bin())
        .arg("--config")
        .arg(&d.config)
        .args(["run", "--agent", AGENT, "--workspace", s(workspace), "--"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run agentguard run")
}

fn tb(d: &Daemon, workspace: &Path, args: &[&str]) -> Output {
    let bin = testbin();
    let mut full = vec![s(&bin)];
    full.extend_from_slice(args);
    run(d, workspace, &full)
}

fn errno(out: &Output) -> String {
    fact(&out.stdout, "errno").unwrap_or_else(|| fact(&out.stdout, "result").unwrap_or_default())
}

fn file_events(d: &Daemon) -> Vec<Value> {
    d.events().into_iter().filter(|e| e["kind"] == "file").collect()
}

/// The fixture: a workspace, a protected tree, a held tree, all under one
/// temporary directory.
struct Fixture {
    dir: TempDir,
    ws: PathBuf,
    protected: PathBuf,
    held: PathBuf,
}

impl Fixture {
    fn new(name: &str, files: usize) -> Self {
        let dir = TempDir::new(name);
        let ws = dir.join("ws");
        let protected = dir.join("protected");
        let held = dir.join("held");
        std::fs::create_dir_all(&ws).expect("mkdir ws");
        std::fs::create_dir_all(&held).expect("mkdir held");
        make_tree(&protected, files);
        Self { dir, ws, protected, held }
    }
}

// ---- BPF-LSM: vetoed in the kernel (the VM) ---------------------------------

fn lsm_daemon(f: &Fixture) -> Option<Daemon> {
    lsm_only(Daemon::start(&[("filer.toml", &policy(&f.protected, &f.held, ""))]))
}

/// `d`, if it vetoes with BPF-LSM; otherwise the test is skipped.
fn lsm_only(d: Daemon) -> Option<Daemon> {
    let mode = file_mode(&d);
    if mode != "veto" {
        let detail = d.status()["file_enforcement"]["detail"].as_str().unwrap_or("").to_owned();
        agentguard_tests::skip_without_lsm(&format!(
            "BPF-LSM cannot load on this kernel (file enforcement here: {mode}: {detail}); the VM harness runs this test"
        ));
        return None;
    }
    Some(d)
}

#[test]
fn rm_rf_of_a_protected_tree_deletes_nothing_and_the_agent_sees_eperm() {
    let f = Fixture::new("lsm-rmrf", 30);
    let Some(d) = lsm_daemon(&f) else { return };
    let before = count_files(&f.protected);
    let out = run(&d, &f.ws, &["rm", "-rf", s(&f.protected)]);
    assert!(!out.status.success(), "rm -rf of a protected tree must fail: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Operation not permitted"), "rm must see EPERM: {stderr}");
    assert_eq!(count_files(&f.protected), before, "not one file of the protected tree may go");
    let ev = d.wait_event(WAIT, "a denied unlink in the protected tree", |e| {
        e["kind"] == "file" && e["decision"] == "deny" && e["action"] == "unlink"
    });
    assert_eq!(ev["enforcement"], "enforced");
    assert_eq!(ev["rule"], "protected-tree");
    assert!(ev["target"].as_str().unwrap_or("").starts_with(s(&f.protected)), "{ev}");
}

#[test]
fn every_destructive_path_is_vetoed() {
    let f = Fixture::new("lsm-paths", 3);
    // A second name for a protected file, made before the policy loads (by
    // root, not an agent): the file stays protected under it.
    let victim = f.protected.join("f001");
    let other_name = f.dir.join("other-name");
    std::fs::hard_link(&victim, &other_name).expect("hard link");
    let Some(d) = lsm_daemon(&f) else { return };
    let outside = f.ws.join("outside");
    std::fs::write(&outside, b"replacement").expect("write");
    let sub = f.protected.join("sub");
    let empty = f.protected.join("empty");
    std::fs::create_dir_all(&empty).expect("mkdir");
    let original = std::fs::read(&victim).expect("read");

    let cases: Vec<(&str, Vec<String>)> = vec![
        ("unlink", vec!["unlink".into(), s(&victim).into()]),
        ("unlinkat", vec!["unlinkat".into(), s(&f.protected).into(), "f002".into()]),
        ("rmdir", vec!["rmdir".into(), s(&empty).into()]),
        ("rename away", vec!["rename".into(), s(&victim).into(), s(&f.ws.join("stolen")).into()]),
        ("rename over", vec!["rename".into(), s(&outside).into(), s(&victim).into()]),
        ("rename the tree's parent", vec!["rename".into(), s(&sub).into(), s(&f.ws.join("sub2")).into()]),
        ("truncate", vec!["truncate".into(), s(&victim).into()]),
        ("open O_TRUNC", vec!["open-trunc".into(), s(&victim).into()]),
        ("ftruncate", vec!["ftruncate".into(), s(&victim).into()]),
        ("new hard link", vec!["link".into(), s(&victim).into(), s(&f.ws.join("alias")).into()]),
        ("truncate another name", vec!["truncate".into(), s(&other_name).into()]),
        ("unlink another name", vec!["unlink".into(), s(&other_name).into()]),
    ];
    for (what, args) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = tb(&d, &f.ws, &args);
        assert_eq!(errno(&out), "EPERM", "{what}: the kernel must refuse: {out:?}");
    }
    assert_eq!(std::fs::read(&victim).expect("victim still there"), original, "content intact");
    assert!(f.protected.join("f002").exists() && empty.exists() && sub.exists() && other_name.exists());
    assert!(!f.ws.join("alias").exists() && !f.ws.join("stolen").exists());
    // Every refusal is in the log, with its operation.
    let events = file_events(&d);
    for action in ["unlink", "rmdir", "rename", "rename_over", "truncate", "link"] {
        assert!(
            events.iter().any(|e| e["action"] == action && e["decision"] == "deny" && e["enforcement"] == "enforced"),
            "no denied {action} in the log: {events:#?}"
        );
    }
}

#[test]
fn names_approvals_and_the_workspace_are_decided_per_rule() {
    let f = Fixture::new("lsm-rules", 1);
    let Some(d) = lsm_daemon(&f) else { return };
    let git = f.ws.join("repo/.git");
    std::fs::create_dir_all(git.join("refs")).expect("mkdir .git");
    for name in ["HEAD", "index", "index.lock"] {
        std::fs::write(git.join(name), name).expect("write");
    }
    std::fs::write(f.ws.join("db.bak"), b"backup").expect("write");
    std::fs::write(f.ws.join("scratch.txt"), b"scratch").expect("write");
    std::fs::write(f.held.join("x"), b"held").expect("write");

    // .git metadata: deleting is denied...
    assert_eq!(errno(&tb(&d, &f.ws, &["unlink", s(&git.join("HEAD"))])), "EPERM");
    // ...but git's lock dance works: rename index.lock over index.
    assert_eq!(errno(&tb(&d, &f.ws, &["rename", s(&git.join("index.lock")), s(&git.join("index"))])), "ok");
    // A suffix rule anywhere, even in the workspace (it comes first).
    assert_eq!(errno(&tb(&d, &f.ws, &["unlink", s(&f.ws.join("db.bak"))])), "EPERM");
    // approve holds: refused, the agent frozen until a human answers
    // (denied here; tests/tests/approvals.rs has the rest).
    let bin = testbin();
    let held = Command::new(agentguard_bin())
        .arg("--config")
        .arg(&d.config)
        .args(["run", "--agent", AGENT, "--workspace", s(&f.ws), "--", s(&bin), "unlink", s(&f.held.join("x"))])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn agent");
    let pending = d.wait_approval(WAIT, "the held unlink", |a| a["rule"] == "held");
    assert!(f.held.join("x").exists(), "held, not done");
    let denied = d.cli(&["deny", &pending["id"].to_string()]);
    assert!(denied.status.success(), "deny: {denied:?}");
    assert_eq!(errno(&held.wait_with_output().expect("wait")), "EPERM");
    // The workspace: allowed, and logged as audit.
    assert_eq!(errno(&tb(&d, &f.ws, &["unlink", s(&f.ws.join("scratch.txt"))])), "ok");
    make_tree(&f.ws.join("build"), 9);
    let out = run(&d, &f.ws, &["rm", "-rf", s(&f.ws.join("build"))]);
    assert!(out.status.success(), "rm -rf in the workspace is allowed: {out:?}");
    assert!(!f.ws.join("build").exists());
    assert!(!f.ws.join("scratch.txt").exists() && f.ws.join("db.bak").exists() && f.held.join("x").exists());
    let ev = d.wait_event(WAIT, "the audited workspace delete", |e| {
        e["kind"] == "file" && e["target"].as_str().is_some_and(|t| t.ends_with("scratch.txt"))
    });
    assert_eq!((ev["decision"].as_str(), ev["rule"].as_str()), (Some("audit"), Some("workspace")));
    let held = d.wait_event(WAIT, "the held delete", |e| e["kind"] == "file" && e["decision"] == "approve");
    assert_eq!(held["rule"], "held");
}

/// The kernel's directory cache (agentguard-ebpf dircache.rs): an agent's
/// second allowed action in a directory is answered without walking its
/// path, counted and not logged. Everything that could make that answer
/// wrong sends the action the long way, and this test makes each happen
/// between one action and the next of the same agent (one session): the
/// entry's own name matches a rule, the entry is another name of a
/// protected file, an ancestor of the directory is renamed into the
/// protected tree, the directory's mount is moved into it, and a reload
/// adds a rule for the directory. Then the agent tries to use a cached
/// directory above AgentGuard's own (the one the daemon's directory is
/// made in) to rename and remove the daemon's directory. Last, a mount's
/// root is cached like any directory.
#[test]
fn the_directory_cache_never_outlives_what_it_decided() {
    let f = Fixture::new("lsm-dircache", 3);
    let base = f.dir.join("c");
    let dir = base.join("a/b");
    let dir2 = f.dir.join("c2");
    let mnt = f.dir.join("m");
    for d in [&dir, &dir2, &mnt] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    for n in ["f0", "f1", "f2", "f3", "f4", "f5", "f6", "x.bak"] {
        std::fs::write(dir.join(n), n).expect("write");
    }
    std::fs::write(dir2.join("p0"), b"p0").expect("write");
    // In the directory above the daemon's own: a file to rename twice, two
    // directories to remove. Not the temporary directory, which has the
    // fixture's protected tree below it: a directory with a rule's prefix
    // below it is never cached (its entries may be on the way to the rule).
    // (A short name: the daemon's socket is made in it, and a socket's
    // path has at most 107 bytes.)
    let above = TempDir { path: std::env::temp_dir().join(format!("agdc{}", std::process::id())) };
    std::fs::create_dir_all(&above.path).expect("mkdir");
    let (r1, r2, stolen) = (above.join("r1"), above.join("r2"), above.join("stolen"));
    let (d1, d2) = (above.join("d1"), above.join("d2"));
    std::fs::write(&r1, b"r").expect("write");
    for d in [&d1, &d2] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    // Another name for a protected file, made before the policy loads.
    std::fs::hard_link(f.protected.join("f001"), dir2.join("alias")).expect("hard link");
    let Some(d) = lsm_only(Daemon::start_in(&above.path, &[("filer.toml", &policy(&f.protected, &f.held, ""))])) else {
        return;
    };
    if d.status()["file_enforcement"]["directory_cache"] != true {
        panic!("BPF-LSM vetoes here, so the directory cache must be on: {}", d.status()["file_enforcement"]);
    }
    let tmpfs = Tmpfs::mount(mnt.clone());
    let sub = mnt.join("sub");
    std::fs::create_dir_all(&sub).expect("mkdir");
    for n in ["m0", "m1", "m2"] {
        std::fs::write(sub.join(n), n).expect("write");
    }
    for n in ["r0", "r1"] {
        std::fs::write(mnt.join(n), n).expect("write");
    }
    let repeats = || d.status()["kernel_counters"]["file_allowed_repeats"].as_u64().expect("file_allowed_repeats");
    let before = repeats();

    let go: Vec<PathBuf> = (1..=3).map(|i| f.dir.join(format!("go{i}"))).collect();
    let moved = f.protected.join("a/b");
    let moved_mnt = f.protected.join("mp");
    let p = |d: &Path, n: &str| format!("{}", d.join(n).display());
    let steps: Vec<String> = vec![
        format!("unlink={}", p(&dir, "f0")),                       // s1: the long way, logged
        format!("unlink={}", p(&dir, "f1")),                       // s2: from the cache
        format!("unlink={}", p(&dir, "f2")),                       // s3: from the cache
        format!("unlink={}", p(&dir, "x.bak")),                    // s4: its own name's rule
        format!("rename={}:{}", p(&dir, "f3"), p(&dir, "g3")),     // s5: the long way
        format!("rename={}:{}", p(&dir, "g3"), p(&dir, "f3")),     // s6: from the cache
        format!("unlink={}", p(&dir2, "p0")),                      // s7: the long way
        format!("unlink={}", p(&dir2, "alias")),                   // s8: a protected file's other name
        format!("unlink={}", p(&sub, "m0")),                       // s9: the long way
        format!("unlink={}", p(&sub, "m1")),                       // s10: from the cache
        format!("wait={}", go[0].display()),
        format!("unlink={}", p(&moved, "f4")),                     // s11: an ancestor renamed
        format!("unlink={}", p(&moved_mnt.join("sub"), "m2")),     // s12: the mount moved
        format!("wait={}", go[1].display()),
        format!("unlink={}", p(&dir, "f4")),                       // s13: back, the long way
        format!("unlink={}", p(&dir, "f5")),                       // s14: from the cache
        format!("wait={}", go[2].display()),
        format!("unlink={}", p(&dir, "f6")),                       // s15: a rule added since
        format!("rename={}:{}", r1.display(), r2.display()),       // s16: the long way
        format!("rename={}:{}", r2.display(), r1.display()),       // s17: from the cache
        format!("rename={}:{}", d.dir.path.display(), stolen.display()), // s18: the daemon's directory
        format!("rmdir={}", d1.display()),                         // s19: the long way
        format!("rmdir={}", d2.display()),                         // s20: from the cache
        format!("rmdir={}", d.dir.path.display()),                 // s21: the daemon's directory
        format!("unlink={}", p(&mnt, "r0")),                       // s22: a mount's root, the long way
        format!("unlink={}", p(&mnt, "r1")),                       // s23: from the cache
    ];
    let bin = testbin();
    let mut agent = Command::new(agentguard_bin())
        .arg("--config")
        .arg(&d.config)
        .args(["run", "--agent", AGENT, "--workspace", s(&f.ws), "--", s(&bin), "steps"])
        .args(&steps)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn agent");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(agent.stdout.take().expect("stdout")));
    let mut results: Vec<String> = Vec::new();
    let mut upto = |n: usize, results: &mut Vec<String>| {
        while results.len() < n {
            let line = lines.next().expect("the agent ended early").expect("read the agent's output");
            // `s<n>=<result>` per step (ag-testbin prints `pid=` first).
            if let Some((k, r)) = line.split_once('=') {
                if k.starts_with('s') {
                    results.push(r.to_owned());
                }
            }
        }
    };
    upto(10, &mut results);
    let want = ["ok", "ok", "ok", "EPERM", "ok", "ok", "ok", "EPERM", "ok", "ok"];
    assert_eq!(results, want, "the first ten steps");
    assert_eq!(repeats() - before, 4, "steps 2, 3, 6 and 10 came from the cache");
    // The long way logged; the cache counted.
    d.wait_event(WAIT, "the first delete, logged", |e| e["kind"] == "file" && e["target"] == p(&dir, "f0") && e["decision"] == "allow");
    d.wait_event(WAIT, "the hard link, denied", |e| e["kind"] == "file" && e["target"] == p(&dir2, "alias") && e["decision"] == "deny");
    assert!(
        !file_events(&d).iter().any(|e| e["target"] == p(&dir, "f1") || e["target"] == p(&dir, "f2")),
        "answers from the cache are counted, not logged"
    );

    // Root moves the cached directory's grandparent, and the mount, into
    // the protected tree: the same directories, now under its rule.
    std::fs::rename(base.join("a"), f.protected.join("a")).expect("rename into the protected tree");
    std::fs::create_dir_all(&moved_mnt).expect("mkdir");
    nix::mount::mount(Some(&mnt), &moved_mnt, None::<&str>, nix::mount::MsFlags::MS_MOVE, None::<&str>).expect("mount --move");
    std::fs::write(&go[0], b"").expect("go");
    upto(12, &mut results);
    assert_eq!(&results[10..], ["EPERM", "EPERM"], "after the rename and the move");
    assert!(moved.join("f4").exists() && moved_mnt.join("sub/m2").exists());
    for (what, target) in [("rename", p(&moved, "f4")), ("mount move", p(&moved_mnt.join("sub"), "m2"))] {
        d.wait_event(WAIT, what, |e| e["kind"] == "file" && e["target"] == target && e["rule"] == "protected-tree");
    }
    nix::mount::mount(Some(&moved_mnt), &mnt, None::<&str>, nix::mount::MsFlags::MS_MOVE, None::<&str>).expect("mount --move back");

    // Back where it was: decided again, then cached again.
    std::fs::rename(f.protected.join("a"), base.join("a")).expect("rename back");
    std::fs::write(&go[1], b"").expect("go");
    upto(14, &mut results);
    assert_eq!(&results[12..], ["ok", "ok"]);
    assert_eq!(repeats() - before, 5, "step 14 came from the cache");

    // A reload that adds a rule for the directory.
    let late = format!(
        "{}\n[[files.rule]]\nid = \"late\"\ndecision = \"deny\"\npaths = [\"{}/**\"]\n",
        policy(&f.protected, &f.held, ""),
        s(&base)
    );
    std::fs::write(d.dir.join("policies").join("filer.toml"), late).expect("rewrite policy");
    let out = d.cli(&["reload"]);
    assert!(out.status.success(), "reload: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(&go[2], b"").expect("go");
    upto(15, &mut results);
    assert_eq!(results[14], "EPERM", "the rule added by the reload");
    assert!(dir.join("f6").exists());
    d.wait_event(WAIT, "the late rule", |e| e["kind"] == "file" && e["target"] == p(&dir, "f6") && e["rule"] == "late");

    // The directory above the daemon's is cached for renames and removals
    // (its mark says only that it lies above a guarded tree), but the
    // daemon's directory in it has a mark of its own, which a hit checks.
    upto(23, &mut results);
    assert_eq!(&results[15..], ["ok", "ok", "EPERM", "ok", "ok", "EPERM", "ok", "ok"], "above the daemon's directory, and in a mount's root");
    assert_eq!(repeats() - before, 8, "steps 17, 20 and 23 came from the cache");
    assert!(d.dir.path.join("policies").is_dir() && !stolen.exists(), "the daemon's directory stayed where it was");
    d.wait_event(WAIT, "the daemon's directory, not renamed", |e| {
        e["kind"] == "file" && e["action"] == "rename" && e["target"] == s(&d.dir.path) && e["decision"] == "deny"
    });
    d.wait_event(WAIT, "the daemon's directory, not removed", |e| {
        e["kind"] == "file" && e["action"] == "rmdir" && e["target"] == s(&d.dir.path) && e["decision"] == "deny"
    });
    assert!(agent.wait().expect("wait").success());
    assert!(dir.join("x.bak").exists() && dir2.join("alias").exists());
    drop(tmpfs);
}

/// A tmpfs mounted for a test, detached on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: PathBuf) -> Self {
        nix::mount::mount(Some("tmpfs"), &dir, Some("tmpfs"), nix::mount::MsFlags::empty(), Some("size=1m"))
            .unwrap_or_else(|e| panic!("mount tmpfs on {}: {e}", dir.display()));
        Self(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A policy with one `audit` rule per name-pattern kind (the kernel's name
/// scan: components, pairs, the basename, its last pair, suffix and prefix),
/// so each match is logged without stopping the agent.
fn name_kinds_policy(component: &str) -> String {
    format!(
        r#"[agent]
name = "{AGENT}"

[files]
default = "audit"

[[files.rule]]
id = "comp"
decision = "audit"
paths = ["**/{component}/**"]

[[files.rule]]
id = "base"
decision = "audit"
paths = ["**/secrets.env"]

[[files.rule]]
id = "suffix"
decision = "audit"
paths = ["**/*.tar.gz"]

[[files.rule]]
id = "prefix"
decision = "audit"
paths = ["**/core.*"]

[[files.rule]]
id = "pair"
decision = "audit"
paths = ["**/build/cache/**"]

[[files.rule]]
id = "basepair"
decision = "audit"
paths = ["**/etc/hosts.txt"]
"#
    )
}

/// Every kind of name pattern is found by the kernel wherever the name
/// falls in the path (the scan reads it 8 bytes at a time: a component
/// boundary at each offset is covered), near misses are not matched, and
/// after a reload that swaps a pattern the new name matches and the old one
/// no longer does (the kernel's filter of names follows the names map).
/// Run wherever file decisions are taken (BPF-LSM, or the fallback).
#[test]
fn every_name_pattern_kind_is_matched_in_the_kernel() {
    let f = Fixture::new("names", 0);
    let d = Daemon::start(&[("filer.toml", &name_kinds_policy("node_modules"))]);
    let mode = file_mode(&d);
    if mode != "veto" && mode != "observe_and_contain" {
        agentguard_tests::skip(&format!("file actions are not judged on this kernel (file enforcement: {mode})"));
        return;
    }
    let ws = &f.ws;
    let mut expect: Vec<(PathBuf, Option<&str>)> = vec![
        (ws.join("cfg/secrets.env"), Some("base")),
        (ws.join("a.b.tar.gz"), Some("suffix")),
        (ws.join("core.1234"), Some("prefix")),
        (ws.join("build/cache/o.bin"), Some("pair")),
        (ws.join("x/etc/hosts.txt"), Some("basepair")),
        // Near misses: audited by the default.
        (ws.join("cache/build/o.bin"), None),
        (ws.join("etc/x/hosts.txt"), None),
        (ws.join("a.tar.gz.txt"), None),
        (ws.join("xcore.1"), None),
        (ws.join("node_modules.txt"), None),
        (ws.join("plain.txt"), None),
    ];
    for n in 1..=9 {
        expect.push((ws.join("d".repeat(n)).join("node_modules").join("f"), Some("comp")));
    }
    expect.push((ws.join("node_modules"), Some("comp")));
    let judged = |d: &Daemon, expect: &[(PathBuf, Option<&str>)]| {
        for (p, _) in expect {
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, b"x").expect("write");
        }
        let mut args = vec!["rm", "-f"];
        args.extend(expect.iter().map(|(p, _)| s(p)));
        let out = run(d, ws, &args);
        assert!(out.status.success(), "every delete here is allowed: {out:?}");
        for (p, rule) in expect {
            assert!(!p.exists(), "{} was allowed and must be gone", p.display());
            let ev = d.wait_event(WAIT, &format!("the delete of {}", p.display()), |e| {
                e["kind"] == "file" && e["action"] == "unlink" && e["target"] == s(p)
            });
            // A near miss falls to the agent's default (`audit`, so every
            // action is logged), as rule "default".
            let want = match rule {
                Some(r) => (Some("audit"), Some(*r)),
                None => (Some("audit"), Some("default")),
            };
            assert_eq!((ev["decision"].as_str(), ev["rule"].as_str()), want, "{}: {ev}", p.display());
        }
    };
    judged(&d, &expect);

    // Swap the component pattern: the new name is found, the old is not.
    std::fs::write(d.dir.join("policies").join("filer.toml"), name_kinds_policy("vendor")).expect("rewrite policy");
    let out = d.cli(&["reload"]);
    assert!(out.status.success(), "reload: {}", String::from_utf8_lossy(&out.stderr));
    judged(&d, &[(ws.join("app/vendor/lib.js"), Some("comp")), (ws.join("app/node_modules/lib.js"), None)]);
}

// ---- no BPF-LSM: observed and contained, Landlock for run agents (the host) --

fn fallback_daemon(policy_text: &str) -> Option<Daemon> {
    let d = Daemon::start(&[("filer.toml", policy_text)]);
    let mode = file_mode(&d);
    if mode != "observe_and_contain" {
        agentguard_tests::skip(&format!(
            "file enforcement here is {mode}: the observation fallback is only loaded where BPF-LSM cannot veto (this host's CI kernel)"
        ));
        return None;
    }
    Some(d)
}

fn frozen(d: &Daemon) -> bool {
    let dir = d.cgroup_subtree().join(AGENT);
    std::fs::read_to_string(dir.join("cgroup.events")).is_ok_and(|t| t.lines().any(|l| l == "frozen 1"))
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The fallback cannot refuse a syscall: it stops the process at its first
/// violating one (SIGSTOP from the kernel program, taking effect as the
/// syscall returns) and the daemon freezes the agent. So the violating
/// unlink itself completes: **at most one file is lost**, however large the
/// tree (asserted here with 60 files).
#[test]
fn fallback_contains_rm_rf_of_a_protected_tree_losing_at_most_one_file() {
    const FILES: usize = 60;
    const BOUND: usize = 1;
    let f = Fixture::new("obs-rmrf", FILES);
    // A selector-matched agent (not `run`: no Landlock), by its cgroup.
    let cg = CgroupGuard::new("files-obs");
    let rel = format!("/{}", cg.path.file_name().and_then(|n| n.to_str()).expect("cgroup name"));
    let Some(d) = fallback_daemon(&policy(&f.protected, &f.held, &format!("[agent.match]\ncgroup = [{rel:?}]"))) else { return };
    let before = count_files(&f.protected);
    assert_eq!(before, FILES);
    let mut rm = agentguard_tests::kernel::spawn_in_cgroup(
        Command::new("rm").args(["-rf", s(&f.protected)]).stdout(Stdio::null()).stderr(Stdio::null()),
        &cg,
    );
    let ev = d.wait_event(WAIT, "the contained unlink", |e| {
        e["kind"] == "file" && e["decision"] == "deny" && e["enforcement"] == "contained"
    });
    assert_eq!(ev["rule"], "protected-tree");
    wait_until("the agent frozen", || frozen(&d));
    // Frozen: nothing more goes, even given time.
    std::thread::sleep(Duration::from_millis(300));
    let after = count_files(&f.protected);
    let lost = before - after;
    if lost > BOUND {
        for e in d.events().iter().filter(|e| e["kind"] != "net") {
            eprintln!("{e}");
        }
    }
    assert!(lost <= BOUND, "the fallback lost {lost} of {before} files; the bound is {BOUND}");
    assert!(rm.try_wait().expect("try_wait").is_none(), "rm must be held, not finished");
    assert!(
        d.events().iter().any(|e| e["kind"] == "freeze" && e["agent"] == AGENT),
        "the freeze is in the log: {:#?}",
        d.events()
    );
    eprintln!("fallback: rm -rf of {before} protected files lost {lost} (bound {BOUND})");
    let _ = rm.kill();
    let _ = rm.wait();
}

/// Landlock (for `agentguard run`) refuses in the kernel with no BPF-LSM:
/// nothing is lost. The observation fallback still sees the attempt and
/// contains the agent.
#[test]
fn landlock_vetoes_removal_and_truncation_for_run_agents_with_zero_loss() {
    let f = Fixture::new("landlock", 6);
    let Some(d) = fallback_daemon(&policy(&f.protected, &f.held, "")) else { return };
    require!(agentguard::landlock::abi().is_some_and(|v| v >= 2), "Landlock ABI 2+ is not available here");
    let victim = f.protected.join("f001");
    let original = std::fs::read(&victim).expect("read");
    let before = count_files(&f.protected);
    for (args, what) in [
        (vec!["rm", "-rf", s(&f.protected)], "rm -rf"),
        (vec![s(&testbin()), "truncate", s(&victim)], "truncate"),
    ] {
        // The fallback stops the agent at the attempt; run it in the
        // background and look at the disk.
        let mut child = Command::new(agentguard_bin())
            .arg("--config")
            .arg(&d.config)
            .args(["run", "--agent", AGENT, "--workspace", s(&f.ws), "--"])
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn run");
        d.wait_event(WAIT, &format!("{what}: the attempt, observed"), |e| {
            e["kind"] == "file" && e["decision"] == "deny" && e["pid"] == child.id()
        });
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(count_files(&f.protected), before, "{what}: Landlock must lose nothing");
        assert_eq!(std::fs::read(&victim).expect("read"), original, "{what}: content intact");
        let _ = child.kill();
        let _ = child.wait();
        // Thaw for the next attempt (a new session, same agent cgroup).
        let out = d.cli(&["thaw", AGENT]);
        assert!(out.status.success(), "thaw: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// Without Landlock the same ag-testbin unlink loses the file under the
/// fallback: the Landlock test above is not vacuous. (Selector-matched agent.)
#[test]
fn fallback_without_landlock_loses_the_violating_file_only() {
    let f = Fixture::new("obs-one", 3);
    let cg = CgroupGuard::new("files-one");
    let rel = format!("/{}", cg.path.file_name().and_then(|n| n.to_str()).expect("cgroup name"));
    let Some(d) = fallback_daemon(&policy(&f.protected, &f.held, &format!("[agent.match]\ncgroup = [{rel:?}]"))) else { return };
    let victim = f.protected.join("f001");
    let mut child = agentguard_tests::kernel::spawn_in_cgroup(
        Command::new(testbin()).args(["unlink", s(&victim)]).stdout(Stdio::null()),
        &cg,
    );
    d.wait_event(WAIT, "the contained unlink", |e| e["kind"] == "file" && e["enforcement"] == "contained");
    wait_until("the agent frozen", || frozen(&d));
    assert!(!victim.exists(), "observation cannot refuse: the violating unlink itself completes");
    assert_eq!(count_files(&f.protected), 2, "and nothing else goes");
    let _ = child.kill();
    let _ = child.wait();
}

// ---- the shipped default policy ----------------------------------------------

/// The shipped default policy lets git do its own bookkeeping inside `.git`
/// (lock files renamed into place, temporary objects, merge state) while
/// `rm -rf .git` is refused (BPF-LSM) or contained (fallback). Needs git on
/// the machine (the VM has none).
#[test]
fn the_default_policy_lets_git_work_and_keeps_its_history() {
    let Some(git) = ["/usr/bin/git", "/usr/local/bin/git", "/bin/git"].into_iter().map(PathBuf::from).find(|p| p.exists()) else {
        agentguard_tests::skip("git is not installed here");
        return;
    };
    let default = std::fs::read_to_string(agentguard_tests::shipped_policy_dir().join("default.toml")).expect("read the shipped default policy");
    let d = Daemon::start(&[("default.toml", &default)]);
    let dir = TempDir::new("git");
    let ws = dir.join("repo");
    std::fs::create_dir_all(&ws).expect("mkdir");
    std::fs::write(ws.join("a.txt"), b"one\n").expect("write");
    let g = git.to_string_lossy().into_owned();
    let script = format!(
        "set -e; G='{g} -c user.name=t -c user.email=t@t -c init.defaultBranch=main'; \
         $G init -q; $G add a.txt; $G commit -qm one; $G checkout -qb side; echo two >> a.txt; $G commit -qam two; \
         $G checkout -q main; echo three > b.txt; $G add b.txt; $G commit -qm three; $G merge -q --no-edit side; \
         $G log --oneline | wc -l"
    );
    let mut child = Command::new(agentguard_bin())
        .arg("--config")
        .arg(&d.config)
        .args(["run", "--agent", "coding-agent", "--workspace", s(&ws), "--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn git under agentguard run");
    let start = Instant::now();
    while child.try_wait().expect("try_wait").is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "git did not finish (stopped or frozen?); file events: {:#?}",
            file_events(&d).into_iter().filter(|e| e["decision"] == "deny" || e["decision"] == "approve").collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "git under the default policy failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "4", "three commits and a merge");
    let refused: Vec<Value> = file_events(&d).into_iter().filter(|e| e["decision"] == "deny" || e["decision"] == "approve").collect();
    assert!(refused.is_empty(), "git's own work must not be refused: {refused:#?}");

    // Deleting the history is refused, or contained. The files the policy
    // protects (the rest of .git, such as hooks, may go):
    let git_dir = ws.join(".git");
    let protected = || {
        ["objects", "refs", "logs"].iter().map(|d| count_files(&git_dir.join(d))).sum::<usize>()
            + ["HEAD", "config", "index"].iter().filter(|f| git_dir.join(f).exists()).count()
    };
    let objects_before = protected();
    let mut rm = Command::new(agentguard_bin())
        .arg("--config")
        .arg(&d.config)
        .args(["run", "--agent", "coding-agent", "--workspace", s(&ws), "--", "rm", "-rf", s(&ws.join(".git"))])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn rm");
    let ev = d.wait_event(WAIT, "the refused delete in .git", |e| e["kind"] == "file" && e["decision"] == "deny");
    assert_eq!(ev["rule"], "vcs-metadata");
    std::thread::sleep(Duration::from_millis(300));
    let lost = objects_before - protected();
    assert!(lost <= 1, "rm -rf .git lost {lost} of {objects_before} protected files (0 with BPF-LSM, at most 1 contained)");
    let _ = rm.kill();
    let _ = rm.wait();
}
