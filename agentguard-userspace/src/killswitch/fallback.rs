//! The killswitch's fallbacks for kernels without cgroup v2 freezing (before
//! 5.2) or `cgroup.kill` (before 5.14): the v1 freezer hierarchy, and as the
//! last resort signals to every pid, pass after pass until a pass finds no
//! process it has not reached. The agent's processes are always found in its
//! cgroup2 directories, where the daemon keeps them.
use std::{
    collections::HashSet,
    path::Path,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

use super::{io_err, KillswitchError};

/// Pause between passes over the pids.
const PASS_PAUSE: Duration = Duration::from_micros(500);

fn read_pids(procs: &Path) -> HashSet<u32> {
    std::fs::read_to_string(procs)
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

fn signal(pid: u32, sig: Signal) {
    if let Ok(raw) = i32::try_from(pid) {
        // ESRCH: it exited meanwhile, which is what we want anyway.
        let _ = kill(Pid::from_raw(raw), sig);
    }
}

/// Freeze through the v1 freezer. FROZEN is set first, so every process
/// moved in afterwards is frozen on arrival (freezer_attach(),
/// kernel/cgroup/legacy_freezer.c), and children of moved processes are born
/// inside. Then the agent's processes are moved in, pass after pass, until a
/// pass finds none left outside: a child forked by a process not yet moved
/// is found by the next pass.
pub(super) fn v1_freeze(v1: &Path, pids: impl Fn() -> Vec<u32>, deadline: Instant) -> Result<bool, KillswitchError> {
    std::fs::create_dir_all(v1).map_err(io_err("create", v1))?;
    let state = v1.join("freezer.state");
    std::fs::write(&state, "FROZEN").map_err(io_err("write", &state))?;
    let procs = v1.join("cgroup.procs");
    loop {
        let inside = read_pids(&procs);
        let outside: Vec<u32> = pids().into_iter().filter(|p| !inside.contains(p)).collect();
        if outside.is_empty() {
            break;
        }
        for pid in outside {
            if let Err(e) = std::fs::write(&procs, pid.to_string()) {
                if e.raw_os_error() != Some(libc::ESRCH) {
                    return Err(io_err("move a process into", &procs)(e));
                }
            }
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
    }
    // Reading freezer.state turns FREEZING into FROZEN once every task is
    // frozen (update_if_frozen()); nothing notifies, so poll.
    loop {
        let s = std::fs::read_to_string(&state).map_err(io_err("read", &state))?;
        if s.trim() == "FROZEN" {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(PASS_PAUSE);
    }
}

/// Thaw a v1-frozen agent, move its processes back to the v1 root and
/// remove its v1 cgroup, so nothing of the freeze is left behind.
pub(super) fn v1_thaw(root: &Path, v1: &Path, deadline: Instant) -> Result<bool, KillswitchError> {
    if !v1.is_dir() {
        return Ok(true);
    }
    let state = v1.join("freezer.state");
    std::fs::write(&state, "THAWED").map_err(io_err("write", &state))?;
    let confirmed = loop {
        let s = std::fs::read_to_string(&state).map_err(io_err("read", &state))?;
        if s.trim() == "THAWED" {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
        std::thread::sleep(PASS_PAUSE);
    };
    let root_procs = root.join("cgroup.procs");
    for pid in read_pids(&v1.join("cgroup.procs")) {
        let _ = std::fs::write(&root_procs, pid.to_string());
    }
    let _ = std::fs::remove_dir(v1);
    Ok(confirmed)
}

/// Every task of `pid` is stopped (or gone).
fn is_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat")).map_or(true, |stat| {
            // The state follows the last ')' (comm may contain one).
            let state = stat.rfind(')').and_then(|i| stat.get(i + 2..i + 3));
            matches!(state, Some("T" | "t" | "Z" | "X") | None)
        })
    })
}

/// SIGSTOP every process, again and again, until two passes in a row see the
/// same set of pids, all stopped: a stopped process cannot fork, so the set
/// can no longer grow. A process a third party continues is stopped again
/// while the loop runs.
pub(super) fn signal_stop(pids: impl Fn() -> Vec<u32>, deadline: Instant) -> bool {
    let mut previous: Option<Vec<u32>> = None;
    loop {
        let now = pids();
        let mut all_stopped = true;
        for &pid in &now {
            if !is_stopped(pid) {
                all_stopped = false;
                signal(pid, Signal::SIGSTOP);
            }
        }
        if all_stopped && previous.as_ref() == Some(&now) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        previous = Some(now);
        std::thread::sleep(PASS_PAUSE);
    }
}

/// SIGCONT every process until none is stopped. This also continues a
/// process the agent itself had stopped (job control): the signal cannot
/// tell the two apart.
pub(super) fn signal_cont(pids: impl Fn() -> Vec<u32>, deadline: Instant) -> bool {
    loop {
        let stopped: Vec<u32> = pids().into_iter().filter(|p| is_stopped(*p)).collect();
        if stopped.is_empty() {
            return true;
        }
        for pid in stopped {
            signal(pid, Signal::SIGCONT);
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(PASS_PAUSE);
    }
}

/// SIGKILL every process, pass after pass, until the agent's cgroups hold
/// none. A task frozen by the v1 freezer acts on SIGKILL only once thawed,
/// so `v1` (the agent's v1 freezer cgroup, if any) is thawed after each pass.
pub(super) fn signal_kill(pids: impl Fn() -> Vec<u32>, v1: Option<&Path>, deadline: Instant) -> bool {
    loop {
        let now = pids();
        if now.is_empty() {
            return true;
        }
        for &pid in &now {
            signal(pid, Signal::SIGKILL);
        }
        if let Some(v1) = v1 {
            let _ = std::fs::write(v1.join("freezer.state"), "THAWED");
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(PASS_PAUSE);
    }
}
