//! What the kernel's self-protection (agentguard-ebpf/src/selfprotect.rs)
//! guards on disk: AgentGuard's own directories and files, written into the
//! `AG_SELF` map by (device, inode) at every daemon start.
//!
//! A directory is guarded as a whole tree: the policy directory, the pin
//! directory, the incident directory, AgentGuard's cgroup subtree, and the
//! directory of each file the daemon keeps (configuration, event log, chain
//! head, sessions, approvals, socket) when that directory is AgentGuard's
//! own. A file that lives in a directory other programs share (/etc, /tmp,
//! /var/log itself, ...) is guarded alone, and the start-up log says so: new
//! files beside it (a rotated log) are then not covered. The cgroup2 root is
//! marked so that no agent can write a `cgroup.procs` or `cgroup.threads`
//! anywhere, that is, move itself out of its agent's cgroup. The directories
//! above each guarded one (up to, not including, `/`) may not be renamed:
//! renaming `/etc/agentguard` away and making a new one would otherwise
//! hand the next reload an agent's policy.
use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use agentguard_common::{maps, self_marks, FileInodeKey};
use aya::{maps::HashMap, Ebpf};

use crate::{config::Config, filemaps::kernel_dev};

/// Directories other programs share: never guarded as a tree.
const SHARED_DIRS: &[&str] = &[
    "/", "/etc", "/var", "/var/log", "/var/lib", "/var/tmp", "/run", "/tmp", "/usr", "/usr/local",
    "/opt", "/srv", "/home", "/root", "/dev", "/dev/shm", "/sys/fs/bpf", "/sys/fs/cgroup",
];

/// One guarded path and its mark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guarded {
    pub path: PathBuf,
    pub mark: u32,
}

/// The paths to guard for `config`, with the cgroup2 root and AgentGuard's
/// subtree of it. Also returns warnings (a file guarded alone).
pub fn plan(config: &Config, cgroup_root: &Path, cgroup_base: &Path) -> (Vec<Guarded>, Vec<String>) {
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    let tree = |p: &Path| Guarded { path: p.to_owned(), mark: self_marks::TREE };
    for dir in [&config.policy_dir, &config.pin_dir, &config.incident_dir] {
        out.push(tree(dir));
    }
    out.push(tree(cgroup_base));
    out.push(Guarded { path: cgroup_root.to_owned(), mark: self_marks::CGROUP_ROOT });
    let files = [
        ("event log", config.events_log.clone()),
        ("chain head", config.chain_head.clone()),
        ("sessions file", config.run_state.clone()),
        ("skipped-run counts", crate::skips::saved_path(&config.run_state)),
        ("approvals file", config.approvals_state_path()),
        ("control socket", config.socket.clone()),
    ];
    let source = config.source.clone().map(|f| ("configuration", f));
    for (what, file) in files.into_iter().chain(source) {
        let file = absolute(&file);
        match file.parent() {
            Some(dir) if !is_shared(dir) => out.push(tree(dir)),
            _ => {
                warnings.push(format!(
                    "self-protection guards the {what} {} alone: its directory is shared with other programs, so new files beside it (rotations) are not guarded",
                    file.display()
                ));
                out.push(tree(&file));
            }
        }
    }
    // The directories above each tree may not be renamed: that would move
    // the tree away and let another take its path. A directory inside
    // another tree is guarded whole by it and gets no mark of its own: the
    // kernel's walk stops at the nearest mark, and "above a tree" there
    // would hide the tree further up (a tree nested in another with a
    // directory between them).
    let marked: Vec<PathBuf> = out.iter().map(|g| g.path.clone()).collect();
    let trees: Vec<PathBuf> = out.iter().filter(|g| g.mark == self_marks::TREE).map(|g| g.path.clone()).collect();
    for g in out.clone() {
        if g.mark != self_marks::TREE {
            continue;
        }
        for up in g.path.ancestors().skip(1).filter(|p| p.parent().is_some()) {
            // `marked` has the trees themselves; `trees` whatever lies in one.
            if !trees.iter().any(|t| up.starts_with(t)) && !marked.iter().any(|m| m == up) {
                out.push(Guarded { path: up.to_owned(), mark: self_marks::ANCESTOR });
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out.dedup();
    (out, warnings)
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

fn is_shared(dir: &Path) -> bool {
    let dir = dir.canonicalize().unwrap_or_else(|_| absolute(dir));
    SHARED_DIRS.iter().any(|s| dir == Path::new(s))
}

/// Before the programs attach over maps a previous daemon pinned: add the
/// filter bits of the plan's existing paths to the bits already there
/// ([`apply`] then makes the filter exact). A daemon of an earlier build may
/// have left bits computed differently (earlier builds mixed the device
/// into each bit); with both sets, programs of either build find
/// AgentGuard's inodes in the moment between attach and [`apply`].
pub fn preset_filter(ebpf: &mut Ebpf, guarded: &[Guarded]) -> anyhow::Result<()> {
    let (want, _) = inode_marks(guarded);
    let bits = want.keys().map(|k| agentguard_common::self_filter_bit(k.ino));
    crate::filemaps::sync_bit_filter(ebpf, maps::SELF_FILTER, bits, false)?;
    Ok(())
}

/// The (device, inode) of every path of `guarded` that exists, with its
/// mark, and a problem for each that does not.
fn inode_marks(guarded: &[Guarded]) -> (BTreeMap<FileInodeKey, u32>, Vec<String>) {
    let mut want: BTreeMap<FileInodeKey, u32> = BTreeMap::new();
    let mut problems = Vec::new();
    for g in guarded {
        match std::fs::metadata(&g.path) {
            Ok(m) => {
                let key = FileInodeKey { agent_id: 0, dev: kernel_dev(m.dev()), ino: m.ino() };
                // One inode reached by two paths: a tree or the cgroup root
                // outranks "above a tree".
                let mark = want.entry(key).or_insert(g.mark);
                if *mark == self_marks::ANCESTOR {
                    *mark = g.mark;
                }
            }
            Err(e) => problems.push(format!("cannot guard {}: {e}", g.path.display())),
        }
    }
    (want, problems)
}

/// Write `guarded` into the kernel's `AG_SELF` map: every path that exists
/// is keyed by its (device, inode); entries of a previous plan that are no
/// longer wanted are removed after the new ones are in, so nothing is
/// unguarded in between. Returns what was guarded and the problems.
pub fn apply(ebpf: &mut Ebpf, guarded: &[Guarded]) -> anyhow::Result<(usize, Vec<String>)> {
    let (want, problems) = inode_marks(guarded);
    let limit = agentguard_common::limits::MAX_SELF_INODES as usize;
    if want.len() > limit {
        anyhow::bail!("{} paths to guard, the kernel map holds {limit}", want.len());
    }
    let bits = || want.keys().map(|k| agentguard_common::self_filter_bit(k.ino));
    // The kernel looks an inode up only when its filter bit is set: set the
    // new ones first, clear the stale ones last (filemaps::sync_bit_filter).
    crate::filemaps::sync_bit_filter(ebpf, maps::SELF_FILTER, bits(), false)?;
    let mut map: HashMap<_, FileInodeKey, u32> = HashMap::try_from(
        ebpf.map_mut(maps::SELF_INODES)
            .ok_or_else(|| anyhow::anyhow!("the eBPF object has no {} map", maps::SELF_INODES))?,
    )?;
    for (key, mark) in &want {
        map.insert(key, mark, 0)?;
    }
    let stale: Vec<FileInodeKey> = map.keys().flatten().filter(|k| !want.contains_key(k)).collect();
    for key in stale {
        let _ = map.remove(&key);
    }
    crate::filemaps::sync_bit_filter(ebpf, maps::SELF_FILTER, bits(), true)?;
    Ok((want.len(), problems))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_between_two_nested_trees_is_left_to_the_outer_tree() {
        let config = Config {
            chain_head: "/var/lib/agentguard/chain-head".into(),
            incident_dir: "/var/lib/agentguard/a/b/incidents".into(),
            ..Config::default()
        };
        let (plan, _) = plan(&config, Path::new("/sys/fs/cgroup"), Path::new("/sys/fs/cgroup/agentguard"));
        let mark = |p: &str| plan.iter().find(|g| g.path == Path::new(p)).map(|g| g.mark);
        assert_eq!(mark("/var/lib/agentguard"), Some(self_marks::TREE), "{plan:?}");
        assert_eq!(mark("/var/lib/agentguard/a/b/incidents"), Some(self_marks::TREE), "{plan:?}");
        // Marked "above a tree", these would stop the kernel's walk before
        // it reached /var/lib/agentguard: a file in them would be unguarded.
        assert_eq!(mark("/var/lib/agentguard/a"), None, "{plan:?}");
        assert_eq!(mark("/var/lib/agentguard/a/b"), None, "{plan:?}");
        assert_eq!(mark("/var/lib"), Some(self_marks::ANCESTOR), "{plan:?}");
    }

    #[test]
    fn agentguards_own_directories_are_trees_and_shared_ones_guard_the_file_alone() {
        let config = Config {
            events_log: "/var/log/agentguard/events.jsonl".into(),
            chain_head: "/var/lib/agentguard/chain-head".into(),
            run_state: "/run/agentguard/sessions.json".into(),
            socket: "/run/agentguard/agentguard.sock".into(),
            source: Some("/etc/agentguard.toml".into()),
            ..Config::default()
        };
        let (plan, warnings) = plan(&config, Path::new("/sys/fs/cgroup"), Path::new("/sys/fs/cgroup/agentguard"));
        let paths: Vec<(&str, u32)> = plan.iter().map(|g| (g.path.to_str().unwrap_or(""), g.mark)).collect();
        for want in [
            ("/etc/agentguard/policies", self_marks::TREE),
            ("/var/log/agentguard", self_marks::TREE),
            ("/var/lib/agentguard", self_marks::TREE),
            ("/run/agentguard", self_marks::TREE),
            ("/sys/fs/bpf/agentguard", self_marks::TREE),
            ("/sys/fs/cgroup/agentguard", self_marks::TREE),
            ("/sys/fs/cgroup", self_marks::CGROUP_ROOT),
            // /etc is shared: the configuration file alone.
            ("/etc/agentguard.toml", self_marks::TREE),
            // Above the trees: not to be renamed.
            ("/etc/agentguard", self_marks::ANCESTOR),
            ("/etc", self_marks::ANCESTOR),
            ("/var/log", self_marks::ANCESTOR),
            ("/sys/fs/bpf", self_marks::ANCESTOR),
        ] {
            assert!(paths.contains(&want), "{want:?} missing from {paths:?}");
        }
        assert!(!paths.iter().any(|(p, m)| *p == "/etc" && *m != self_marks::ANCESTOR), "{paths:?}");
        assert!(!paths.iter().any(|(p, m)| *p == "/sys/fs/cgroup" && *m != self_marks::CGROUP_ROOT), "the cgroup root keeps its mark: {paths:?}");
        assert!(!paths.iter().any(|(p, _)| *p == "/"), "{paths:?}");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("/etc/agentguard.toml"), "{warnings:?}");
    }
}
