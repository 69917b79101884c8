//! What /proc says about a process: lineage, executable, arguments, start
//! time, cgroup. Used for `ps`, for tagging agents that were already running,
//! and to enrich events.
use std::path::PathBuf;

use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ProcInfo {
    pub pid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub comm: String,
    pub exe: Option<String>,
    pub argv: Vec<String>,
    /// Start time in clock ticks after boot (field 22 of /proc/PID/stat).
    pub start_ticks: u64,
    /// The cgroup2 path (relative to the cgroup2 root).
    pub cgroup: Option<String>,
}

pub fn read(pid: u32) -> Option<ProcInfo> {
    let base = PathBuf::from(format!("/proc/{pid}"));
    let stat = std::fs::read_to_string(base.join("stat")).ok()?;
    let (comm, ppid, start_ticks) = parse_stat(&stat)?;
    let status = std::fs::read_to_string(base.join("status")).ok()?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(u32::MAX);
    let exe = std::fs::read_link(base.join("exe"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned());
    let argv = std::fs::read(base.join("cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default();
    let cgroup = std::fs::read_to_string(base.join("cgroup"))
        .ok()
        .and_then(|t| cgroup2_path(&t));
    Some(ProcInfo {
        pid,
        ppid,
        uid,
        comm,
        exe,
        argv,
        start_ticks,
        cgroup,
    })
}

/// (comm, ppid, starttime) from /proc/PID/stat; comm may contain spaces and
/// parentheses, so split at the last ')'.
fn parse_stat(stat: &str) -> Option<(String, u32, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    let rest: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
    // rest[0] is field 3 (state); ppid is field 4, starttime field 22.
    let ppid = rest.get(1)?.parse().ok()?;
    let start = rest.get(19)?.parse().ok()?;
    Some((comm, ppid, start))
}

/// The `0::/path` line of /proc/PID/cgroup.
fn cgroup2_path(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

/// Every pid in /proc.
pub fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Every thread id of a process.
pub fn tids(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether the process has exited and waits to be reaped (state Z or X).
pub fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])))
        .unwrap_or(true)
}

/// The thread-group id of a task id.
pub fn tgid_of(tid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_comm() {
        let s = "1234 (a (b) c) S 77 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(parse_stat(s), Some(("a (b) c".to_owned(), 77, 98765)));
    }

    #[test]
    fn reads_this_process() {
        let me = read(std::process::id()).expect("own /proc entry");
        assert_eq!(me.pid, std::process::id());
        assert!(me.ppid > 0);
        assert!(!me.argv.is_empty());
    }

    #[test]
    fn cgroup_line() {
        assert_eq!(cgroup2_path("12:freezer:/\n0::/a/b\n"), Some("/a/b".to_owned()));
    }
}
