//! The file programs on a kernel with full preemption (DESIGN.md's threat
//! model: an agent racing its own threads). BPF-LSM programs run with
//! migration disabled but can be preempted, and the file programs keep
//! their work (the path being judged, the directory cache's key) in a
//! per-CPU scratch map: a thread preempted mid-judgment must not resume
//! with the path another thread of the agent wrote there meanwhile.
//!
//! Debian's kernels preempt voluntarily by default (no preemption inside a
//! program), but are built with PREEMPT_DYNAMIC: `preempt=full` on the
//! command line, or a write to debugfs, makes them fully preemptible. The
//! test switches the VM's kernel to full preemption for its run.
use std::{path::Path, process::Stdio, time::Duration};

use agentguard_tests::{
    daemon::{fact, testbin, Daemon},
    guard::TempDir,
};
use serde_json::Value;

const AGENT: &str = "racer";
const PREEMPT: &str = "/sys/kernel/debug/sched/preempt";

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 test path")
}

/// The kernel's preemption model, switched for the test and switched back
/// when dropped.
struct Preemption {
    before: String,
}

impl Preemption {
    /// Switch to full preemption; `Err` says why that cannot be done here.
    fn full() -> Result<Self, String> {
        if !Path::new(PREEMPT).exists() {
            // debugfs may not be mounted (the VM's init does not).
            let _ = std::process::Command::new("mount").args(["-t", "debugfs", "debugfs", "/sys/kernel/debug"]).status();
        }
        let now = std::fs::read_to_string(PREEMPT)
            .map_err(|e| format!("{PREEMPT}: {e} (a kernel without PREEMPT_DYNAMIC, or no debugfs)"))?;
        // "none voluntary (full)": the mode in parentheses.
        let before = now
            .split_whitespace()
            .find_map(|w| w.strip_prefix('(').and_then(|w| w.strip_suffix(')')))
            .ok_or_else(|| format!("{PREEMPT} says {now:?}"))?
            .to_owned();
        std::fs::write(PREEMPT, "full").map_err(|e| format!("cannot switch to full preemption: {e}"))?;
        let after = std::fs::read_to_string(PREEMPT).unwrap_or_default();
        if !after.contains("(full)") {
            return Err(format!("{PREEMPT} says {after:?} after writing full"));
        }
        Ok(Self { before })
    }
}

impl Drop for Preemption {
    fn drop(&mut self) {
        let _ = std::fs::write(PREEMPT, &self.before);
    }
}

fn policy(protected: &Path) -> String {
    format!(
        r#"[agent]
name = "{AGENT}"

[files]
default = "allow"

[[files.rule]]
id = "protected-tree"
decision = "deny"
paths = ["{protected}/**"]
"#,
        protected = s(protected),
    )
}

/// A daemon with `protected` denied to the racing agent, on a kernel
/// switched to full preemption; `None` (the test skipped, saying why:
/// `without_lsm` where BPF-LSM does not load) where either cannot be had.
fn racing_daemon(protected: &Path, without_lsm: &str) -> Option<(Daemon, Preemption)> {
    let d = Daemon::start(&[("racer.toml", &policy(protected))]);
    let mode = d.status()["file_enforcement"]["mode"].as_str().unwrap_or("?").to_owned();
    if mode != "veto" {
        agentguard_tests::skip_without_lsm(&format!("file enforcement here is {mode}: {without_lsm}"));
        return None;
    }
    match Preemption::full() {
        Ok(p) => Some((d, p)),
        Err(why) => {
            agentguard_tests::skip(&format!("cannot make this kernel fully preemptible: {why}"));
            None
        }
    }
}

fn counter(d: &Daemon, name: &str) -> u64 {
    let v: Value = d.status();
    v["events"]["kernel"][name].as_u64().unwrap_or_else(|| panic!("status has no kernel counter {name}: {v:#}"))
}

fn num(out: &[u8], key: &str) -> u64 {
    fact(out, key).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no {key} in {}", String::from_utf8_lossy(out)))
}

#[test]
fn a_preempted_judgment_never_reads_another_threads_path() {
    let dir = TempDir::new("preempt-race");
    let protected = dir.join("protected");
    let ws = dir.join("ws");
    std::fs::create_dir_all(&protected).expect("mkdir protected");
    std::fs::create_dir_all(&ws).expect("mkdir ws");
    const FILES: usize = 16;
    for i in 0..FILES {
        std::fs::write(protected.join(format!("f{i}")), b"keep me\n").expect("write protected file");
    }
    let scratch = ws.join("scratch");
    std::fs::write(&scratch, b"x").expect("write workspace file");

    let Some((d, preemption)) = racing_daemon(&protected, "the race is between BPF-LSM programs, which the VM harness loads") else { return };

    let busy_before = counter(&d, "file_scratch_busy");
    // Rounds until the race was run into at least once: a run in which no
    // program was preempted mid-way proves nothing.
    let (mut preempted, mut truncate_eperm, mut truncate_attempts, mut rounds) = (0, 0, 0, 0);
    while rounds < 4 {
        rounds += 1;
        let tb = testbin();
        let out = d
            .run_cmd(AGENT, &[s(&tb), "race-unlink", s(&protected), &FILES.to_string(), s(&scratch), "15"])
            .stdout(Stdio::piped())
            .output()
            .expect("run the racing agent");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "the racing agent failed: {out:?}");
        assert_eq!(fact(&out.stdout, "pinned").as_deref(), Some("1"), "both threads on one CPU: {text}");
        // What the kernel did: not one protected file went.
        let left = (0..FILES).filter(|i| protected.join(format!("f{i}")).exists()).count();
        assert_eq!((num(&out.stdout, "unlink_deleted"), left), (0, FILES), "a protected file was deleted: {text}");
        assert_eq!(num(&out.stdout, "unlink_other"), 0, "every unlink refused with EPERM: {text}");
        assert!(num(&out.stdout, "unlink_attempts") > 0 && num(&out.stdout, "truncate_attempts") > 0, "{text}");
        truncate_eperm += num(&out.stdout, "truncate_eperm");
        truncate_attempts += num(&out.stdout, "truncate_attempts");
        preempted = counter(&d, "file_scratch_busy") - busy_before;
        eprintln!("round {rounds}: {}", text.replace('\n', " "));
        eprintln!("round {rounds}: file_scratch_busy +{preempted}");
        if preempted > 0 {
            break;
        }
    }
    drop(preemption);
    assert!(preempted > 0, "in {rounds} rounds of 15 s no file program was preempted mid-way: the race was not exercised");
    // Fail closed is not fail always: the allowed truncates that found the
    // scratch free went through. (Those refused were refused because the
    // scratch was taken, or because the ring buffer overflowed with this
    // flood of events and the daemon runs fail-closed.)
    assert!(truncate_eperm < truncate_attempts, "every allowed truncate was refused ({truncate_eperm})");
    // Each refusal for a taken scratch is an event of its own (rule
    // `preempted`), unless the ring was full, which is counted too.
    let logged = d.wait_event(Duration::from_secs(30), "a file event with rule preempted", |e| e["kind"] == "file" && e["rule"] == "preempted");
    assert_eq!(logged["decision"], "deny", "{logged}");
}

fn skipped(d: &Daemon, program: &str) -> u64 {
    let v = d.status();
    v["skipped_runs"][program].as_u64().unwrap_or_else(|| panic!("status has no skipped_runs for {program}: {:#}", v["skipped_runs"]))
}

/// Two threads on one CPU renaming directories (each in a parent of its
/// own: in one parent, the second waited for the first's lock and nothing
/// was ever skipped) for 10 s, under `dir`/`name`. Not an agent: the
/// directory cache's `fexit` program stamps every rename on the host.
fn race_renames(dir: &Path, name: &str) {
    let moves = dir.join(name);
    std::fs::create_dir_all(&moves).expect("mkdir moves");
    let out = std::process::Command::new(testbin()).args(["race-rename", s(&moves), "10"]).output().expect("run the renaming threads");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "the renaming threads failed: {out:?}");
    assert_eq!(fact(&out.stdout, "pinned").as_deref(), Some("1"), "both threads on one CPU: {text}");
    assert!(num(&out.stdout, "renames") > 0, "{text}");
}

/// The directory cache's stamps come from `fexit` programs, which the
/// kernel skips on a CPU where the same program is already running: on a
/// fully preemptible kernel, a run preempted half-way makes the next one a
/// skip, and that rename goes unstamped. No skip is silent: the daemon
/// reads the kernel's count, flushes the cache (a new generation), logs a
/// `skipped_runs` event and shows the count in `status`. Skips while no
/// daemon runs (the programs stay attached) are reported by the next one,
/// which takes the same programs over.
#[test]
fn a_skipped_stamp_flushes_the_directory_cache() {
    let dir = TempDir::new("preempt-stamps");
    let protected = dir.join("protected");
    std::fs::create_dir_all(&protected).expect("mkdir protected");
    let Some((mut d, preemption)) = racing_daemon(&protected, "the directory cache and its fexit programs load with BPF-LSM, in the VM harness") else {
        return;
    };
    let generation = |d: &Daemon| d.status()["file_cache_generation"].as_u64().expect("a file cache generation");
    let (before, generation_before) = (skipped(&d, "dircache_rename"), generation(&d));
    assert!(generation_before > 0, "the directory cache is on with BPF-LSM");
    let (mut rounds, mut now) = (0, before);
    while rounds < 4 && now == before {
        rounds += 1;
        race_renames(&dir.path, &format!("moves{rounds}"));
        // The daemon reads the counts every second.
        std::thread::sleep(Duration::from_secs(2));
        now = skipped(&d, "dircache_rename");
        eprintln!("round {rounds}: {} dircache_rename runs skipped so far", now - before);
    }
    assert!(now > before, "in {rounds} rounds of 10 s the kernel skipped no run of dircache_rename: the race was not exercised");
    // Every skip is in the log, with what was done about it.
    let events: Vec<Value> = d.events().into_iter().filter(|e| e["kind"] == "skipped_runs" && e["program"] == "dircache_rename").collect();
    let logged: u64 = events.iter().map(|e| e["skipped"].as_u64().expect("skipped")).sum();
    assert_eq!(logged, now - before, "each skipped run is counted in a skipped_runs event: {events:#?}");
    for e in &events {
        assert_eq!(e["remedy"], "the directory cache was flushed", "{e}");
        assert_eq!(e["class"], "file_cache", "{e}");
        assert_eq!(e["while_no_daemon"], false, "{e}");
    }
    // The flush is a new generation: no entry stamped before is used again.
    let generation_after = generation(&d);
    assert!(generation_after >= generation_before + events.len() as u64, "the cache was flushed once per report: {generation_before} -> {generation_after}, {} reports", events.len());

    // No daemon: the programs stay attached and the kernel keeps counting.
    let (mut tries, mut grew) = (0, 0);
    while tries < 4 && grew == 0 {
        tries += 1;
        let last = skipped(&d, "dircache_rename");
        d.kill9();
        race_renames(&dir.path, &format!("unwatched{tries}"));
        d.start_again();
        let now = skipped(&d, "dircache_rename");
        grew = now.checked_sub(last).unwrap_or_else(|| panic!("the count went from {last} to {now} across the restart: the restarted daemon did not take the same program over"));
        eprintln!("while no daemon ran ({tries}): {grew} dircache_rename runs skipped");
    }
    drop(preemption);
    assert!(grew > 0, "in {tries} rounds of 10 s without a daemon the kernel skipped no run of dircache_rename: the race was not exercised");
    let first = d.wait_event(Duration::from_secs(10), "a skipped_runs event for the runs skipped while no daemon ran", |e| {
        e["kind"] == "skipped_runs" && e["program"] == "dircache_rename" && e["while_no_daemon"] == true
    });
    assert_eq!(first["remedy"], "the directory cache was flushed", "{first}");
    // Each try that saw no skip restarted too: only the last one's are new.
    let unwatched: u64 = d
        .events()
        .into_iter()
        .filter(|e| e["kind"] == "skipped_runs" && e["program"] == "dircache_rename" && e["while_no_daemon"] == true)
        .map(|e| e["skipped"].as_u64().expect("skipped"))
        .sum();
    assert_eq!(unwatched, grew, "the runs skipped while no daemon ran are all reported at the next start");
}
