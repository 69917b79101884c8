//! The fast path of an approval hold (bench B7: held action to agent
//! frozen, p99 ≤ 10 ms): a thread of its own, at real-time priority, that
//! reads `AG_HOLDS` and freezes the held process's agent with one write to
//! its `cgroup.freeze`, then continues a process the kernel stopped at the
//! attempt (file actions) so it lands in the frozen state.
//!
//! It shares nothing with the daemon's state and takes no lock: the agent's
//! cgroup is found from the process's own `/proc/PID/cgroup`. Everything
//! else about the hold (the pending approval, the incident record, the
//! confirmed freeze) is done by the main event loop, which reads the same
//! fact from the main event stream and repeats the write if this thread
//! could not do it. Measured without this thread on a loaded 2-core
//! machine, the tail was the event loop's wait for the CPU (p99 15–38 ms);
//! with it, about 2 ms (docs/performance.md).
use std::{
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use agentguard_common::{grant_kind, HoldEvent};
use aya::maps::{MapData, RingBuf};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// SCHED_FIFO priority of the thread: above every normal task, below the
/// kernel's own real-time threads (which use 50 and up). It sleeps in
/// poll() unless an action was just held.
const RT_PRIORITY: i32 = 10;

/// Start the thread. `base` is `<cgroup2>/<subtree>`.
pub fn spawn(mut ring: RingBuf<MapData>, root: PathBuf, base: PathBuf) -> std::io::Result<()> {
    std::thread::Builder::new().name("agentguard-hold".into()).spawn(move || {
        raise_priority();
        loop {
            {
                let mut fds = [PollFd::new(ring.as_fd(), PollFlags::POLLIN)];
                if let Err(e) = poll(&mut fds, PollTimeout::NONE) {
                    if e != nix::errno::Errno::EINTR {
                        tracing::error!(error = %e, "hold thread: cannot poll the holds ring; holds are frozen by the event loop only");
                        return;
                    }
                }
            }
            while let Some(item) = ring.next() {
                if item.len() != std::mem::size_of::<HoldEvent>() {
                    continue;
                }
                // SAFETY: length checked; HoldEvent is plain integers.
                let hold: HoldEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                freeze_now(&root, &base, &hold);
            }
        }
    })?;
    Ok(())
}

fn raise_priority() {
    let param = libc::sched_param { sched_priority: RT_PRIORITY };
    // SAFETY: plain syscall on the calling thread (pid 0).
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "hold thread: cannot take real-time priority (CAP_SYS_NICE, or RLIMIT_RTPRIO); a held agent is frozen at normal priority and may take longer on a busy host"
        );
    }
}

/// The agent cgroup (`<base>/<agent>`) that holds `pid`, if it is in one.
fn agent_dir_of(pid: u32, root: &Path, base: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = root.join(rel.trim_start_matches('/'));
    let agent = dir.strip_prefix(base).ok()?.components().next()?;
    Some(base.join(agent))
}

fn freeze_now(root: &Path, base: &Path, hold: &HoldEvent) {
    let pid = hold.header.pid;
    let frozen = match agent_dir_of(pid, root, base) {
        Some(dir) => match std::fs::write(dir.join("cgroup.freeze"), "1") {
            Ok(()) => {
                let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
                    .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
                    .unwrap_or(0);
                // The bench (ag-bench-approvals) reads this line.
                tracing::debug!(pid, hook_to_freeze_write_us = now.saturating_sub(hold.header.ktime_ns) / 1000, "hold thread: froze the agent");
                true
            }
            Err(e) => {
                tracing::warn!(pid, dir = %dir.display(), error = %e, "hold thread: cannot freeze; the event loop will try again");
                false
            }
        },
        // Not in its agent's cgroup yet (just tagged): the event loop,
        // which places it, freezes it.
        None => {
            tracing::debug!(pid, "hold thread: held process is not in an agent cgroup");
            false
        }
    };
    // A stopped process is continued only into a freezing cgroup; otherwise
    // the event loop continues it once it has frozen the agent.
    if frozen && hold.kind == grant_kind::FILE {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGCONT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_agent_dir_of_this_process_only_under_base() {
        // This test process is not in any agent cgroup.
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(agent_dir_of(std::process::id(), root, &root.join("agentguard-none-such")), None);
        assert_eq!(agent_dir_of(u32::MAX, root, root), None);
    }
}
