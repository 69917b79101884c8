//! AgentGuard's own subtree of the cgroup2 hierarchy:
//! `<cgroup2>/<subtree>/<agent>/<session>/`. Every tagged process is kept in
//! its session's cgroup so one write to the agent's `cgroup.freeze` stops all
//! of them.
use std::{
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

#[derive(Debug, Clone)]
pub struct CgroupTree {
    /// The cgroup2 mount point.
    pub root: PathBuf,
    /// `<root>/<subtree>`.
    pub base: PathBuf,
}

impl CgroupTree {
    pub fn new(root: &Path, subtree: &str) -> io::Result<Self> {
        let base = root.join(subtree);
        std::fs::create_dir_all(&base).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot create cgroup {}: {e}", base.display()))
        })?;
        Ok(Self {
            root: root.to_owned(),
            base,
        })
    }

    pub fn agent_dir(&self, agent: &str) -> PathBuf {
        self.base.join(agent)
    }

    pub fn session_dir(&self, agent: &str, session: u32) -> PathBuf {
        self.agent_dir(agent).join(session_name(session))
    }

    /// Create the session's cgroup (and its agent's); returns its path and id.
    pub fn ensure_session(&self, agent: &str, session: u32) -> io::Result<(PathBuf, u64)> {
        let dir = self.session_dir(agent, session);
        std::fs::create_dir_all(&dir).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot create cgroup {}: {e}", dir.display()))
        })?;
        let id = cgroup_id(&dir)?;
        Ok((dir, id))
    }

    /// Move a process (its whole thread group) into `dir`.
    pub fn move_pid(dir: &Path, pid: u32) -> io::Result<()> {
        std::fs::write(dir.join("cgroup.procs"), pid.to_string())
    }

    /// The cgroup2 path of `dir` relative to the root, as /proc/PID/cgroup prints it.
    pub fn relative(&self, dir: &Path) -> String {
        let rel = dir.strip_prefix(&self.root).unwrap_or(dir);
        format!("/{}", rel.display())
    }

    /// Remove empty session cgroups of agents; returns the removed ones.
    pub fn prune_empty_sessions(&self) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        let Ok(agents) = std::fs::read_dir(&self.base) else {
            return removed;
        };
        for agent in agents.flatten().filter(|e| e.path().is_dir()) {
            let Ok(sessions) = std::fs::read_dir(agent.path()) else {
                continue;
            };
            for s in sessions.flatten().filter(|e| e.path().is_dir()) {
                if !populated(&s.path()) && std::fs::remove_dir(s.path()).is_ok() {
                    removed.push(s.path());
                }
            }
        }
        removed
    }
}

pub fn session_name(session: u32) -> String {
    if session & agentguard_common::RUN_SESSION_BIT != 0 {
        format!("run-{}", session & !agentguard_common::RUN_SESSION_BIT)
    } else {
        format!("pid-{session}")
    }
}

/// The session id a session cgroup's name stands for (the inverse of
/// `session_name`).
pub fn parse_session_name(name: &str) -> Option<u32> {
    if let Some(n) = name.strip_prefix("run-") {
        let n: u32 = n.parse().ok()?;
        return (n & agentguard_common::RUN_SESSION_BIT == 0).then_some(n | agentguard_common::RUN_SESSION_BIT);
    }
    name.strip_prefix("pid-")?.parse().ok().filter(|n| n & agentguard_common::RUN_SESSION_BIT == 0)
}

/// A cgroup's id as the kernel's bpf_get_current_cgroup_id() reports it: the
/// inode number of its directory in cgroup2.
pub fn cgroup_id(dir: &Path) -> io::Result<u64> {
    Ok(std::fs::metadata(dir)?.ino())
}

/// `populated 1` in cgroup.events: some process lives in it or below.
pub fn populated(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events"))
        .map(|t| t.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

/// `dir` and every cgroup below it (bounded depth).
pub fn with_descendants(dir: &Path, depth: usize) -> Vec<PathBuf> {
    let mut out = vec![dir.to_owned()];
    if depth == 0 {
        return out;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(with_descendants(&e.path(), depth - 1));
            }
        }
    }
    out
}

/// Find the cgroup directory of a systemd unit anywhere below `root`.
pub fn find_unit(root: &Path, unit: &str, depth: usize) -> Option<PathBuf> {
    let entries = std::fs::read_dir(root).ok()?;
    let dirs: Vec<_> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .collect();
    if let Some(hit) = dirs.iter().find(|e| e.file_name() == unit) {
        return Some(hit.path());
    }
    if depth == 0 {
        return None;
    }
    dirs.iter().find_map(|e| find_unit(&e.path(), unit, depth - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_names_distinguish_kinds() {
        assert_eq!(session_name(agentguard_common::RUN_SESSION_BIT | 3), "run-3");
        assert_eq!(session_name(4242), "pid-4242");
    }

    #[test]
    fn session_names_parse_back() {
        for id in [agentguard_common::RUN_SESSION_BIT | 3, 4242] {
            assert_eq!(parse_session_name(&session_name(id)), Some(id));
        }
        assert_eq!(parse_session_name("cgroup.procs"), None);
        assert_eq!(parse_session_name("run-x"), None);
    }
}
