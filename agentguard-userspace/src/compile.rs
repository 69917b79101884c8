//! The policy compiler: writes a checked [`PolicySet`] into the kernel's
//! maps. Each map is brought to exactly the desired content: new entries are
//! written before stale ones are removed, so a selector that stays in the
//! policy never disappears, even for an instant.
use std::{collections::BTreeMap, path::Path};

use agentguard_common::{limits, maps, AgentConfig, Decision, NetKeyV4, NetKeyV6, NetRuleList, PathKey, Tag};
use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        HashMap, MapData,
    },
    Ebpf, Pod,
};
use ipnet::IpNet;
use thiserror::Error;

use crate::{
    cgroups,
    netrules::{self, Resolved},
    policy::{AgentPolicy, PolicySet},
};

#[derive(Debug, Error)]
pub enum CompileError {
    #[error("the eBPF object has no map {0}: binary and object are mismatched; rebuild")]
    MissingMap(&'static str),
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error(transparent)]
    TooManyRules(#[from] crate::netrules::TooManyRules),
    #[error(transparent)]
    Files(#[from] crate::filerules::FileCompileError),
}

/// Selectors that resolve to a cgroup (policy `cgroup` and `unit` entries)
/// plus the daemon's own run sessions.
pub fn cgroup_selectors(set: &PolicySet, cgroup_root: &Path) -> (BTreeMap<u64, Tag>, Vec<String>) {
    let mut out = BTreeMap::new();
    let mut unresolved = Vec::new();
    for agent in set.agents.values() {
        let tag = Tag { agent_id: agent.id, session_id: 0 };
        let mut dirs = Vec::new();
        for c in &agent.selectors.cgroup {
            let dir = cgroup_root.join(c.trim_start_matches('/'));
            if dir.is_dir() {
                dirs.push(dir);
            } else {
                unresolved.push(format!("agent {}: cgroup {c} does not exist (yet)", agent.name));
            }
        }
        for u in &agent.selectors.unit {
            match cgroups::find_unit(cgroup_root, u, 6) {
                Some(dir) => dirs.push(dir),
                None => unresolved.push(format!("agent {}: unit {u} has no cgroup (not running?)", agent.name)),
            }
        }
        for dir in dirs {
            for d in cgroups::with_descendants(&dir, 8) {
                if let Ok(id) = cgroups::cgroup_id(&d) {
                    out.insert(id, tag);
                }
            }
        }
    }
    (out, unresolved)
}

pub fn agent_config(agent: &AgentPolicy) -> AgentConfig {
    AgentConfig {
        net_default: Decision::from(agent.net_default) as u32,
        file_default: Decision::from(agent.file_default) as u32,
        flags: 0,
        file_prefix_lens: 0,
    }
}

pub fn path_key(path: &str) -> Option<PathKey> {
    let bytes = path.as_bytes();
    if bytes.len() >= limits::PATH_MAX {
        return None;
    }
    let mut key = PathKey::zeroed();
    key.bytes[..bytes.len()].copy_from_slice(bytes);
    Some(key)
}

pub fn comm_key(comm: &str) -> [u8; limits::COMM_LEN] {
    let mut key = [0u8; limits::COMM_LEN];
    let b = comm.as_bytes();
    let n = b.len().min(limits::COMM_LEN - 1);
    key[..n].copy_from_slice(&b[..n]);
    key
}

/// Write the whole policy (and the given run sessions, and the addresses
/// its host names resolved to) into the maps.
pub fn apply(
    ebpf: &mut Ebpf,
    set: &PolicySet,
    cgroup_root: &Path,
    sessions: &BTreeMap<u64, Tag>,
    resolved: &Resolved,
) -> Result<Vec<String>, CompileError> {
    let files = crate::filemaps::compile(set)?;
    let (inodes, mut warnings) = crate::filemaps::scan_inodes(set);
    let mut agents: BTreeMap<u32, AgentConfig> =
        set.agents.values().map(|a| (a.id, agent_config(a))).collect();
    let mut exe = BTreeMap::new();
    let mut comm = BTreeMap::new();
    let mut uid = BTreeMap::new();
    for a in set.agents.values() {
        let tag = Tag { agent_id: a.id, session_id: 0 };
        for e in &a.selectors.exe {
            // The kernel sees the path as executed; /proc sees it resolved.
            // Both forms are keys so either way of starting the agent matches.
            let mut forms = vec![e.clone()];
            if let Ok(real) = std::fs::canonicalize(e) {
                forms.push(real.to_string_lossy().into_owned());
            }
            for f in forms {
                if let Some(k) = path_key(&f) {
                    exe.insert(k.bytes, tag);
                }
            }
        }
        for c in &a.selectors.comm {
            comm.insert(comm_key(c), tag);
        }
        for u in &a.selectors.uid {
            uid.insert(*u, tag);
        }
    }
    let (mut cgroups_sel, cgroup_warnings) = cgroup_selectors(set, cgroup_root);
    warnings.extend(cgroup_warnings);
    cgroups_sel.extend(sessions.iter().map(|(k, v)| (*k, *v)));

    // Rules first, then defaults: an agent's rules are in place before any
    // change to what its unmatched traffic gets.
    apply_network(ebpf, set, resolved)?;
    for (id, (flags, prefix_lens)) in crate::filemaps::apply_agents(ebpf, &files, &inodes)? {
        if let Some(config) = agents.get_mut(&id) {
            config.flags |= flags;
            config.file_prefix_lens = prefix_lens;
        }
    }
    sync::<u32, AgentConfig>(ebpf, maps::AGENTS, &agents)?;
    sync::<u64, Tag>(ebpf, maps::SEL_CGROUP, &cgroups_sel)?;
    sync_path(ebpf, &exe)?;
    sync::<[u8; limits::COMM_LEN], Tag>(ebpf, maps::SEL_COMM, &comm)?;
    sync::<u32, Tag>(ebpf, maps::SEL_UID, &uid)?;
    Ok(warnings)
}

/// Every agent's network rules into the two LPM tries.
pub fn apply_network(ebpf: &mut Ebpf, set: &PolicySet, resolved: &Resolved) -> Result<(), CompileError> {
    let mut v4 = BTreeMap::new();
    let mut v6 = BTreeMap::new();
    for agent in set.agents.values() {
        let agent_be = agent.id.to_be_bytes();
        for (net, list) in netrules::compile_agent(agent, resolved)? {
            match net {
                IpNet::V4(n) => {
                    let key = NetKeyV4 { agent_be, addr: n.network().octets() };
                    v4.insert((32 + u32::from(n.prefix_len()), key.agent_be, addr16(&key.addr)), (key, list));
                }
                IpNet::V6(n) => {
                    let key = NetKeyV6 { agent_be, addr: n.network().octets() };
                    v6.insert((32 + u32::from(n.prefix_len()), key.agent_be, key.addr), (key, list));
                }
            }
        }
    }
    sync_trie(ebpf, maps::NET_V4, &v4, |k: &NetKeyV4| (k.agent_be, addr16(&k.addr)))?;
    sync_trie(ebpf, maps::NET_V6, &v6, |k: &NetKeyV6| (k.agent_be, k.addr))?;
    Ok(())
}

/// (prefix length, agent, address padded to 16 bytes): a trie key's order
/// without an allocation per key (10 000-rule reloads, B9).
type TrieOrd = (u32, [u8; 4], [u8; 16]);

fn addr16(v4: &[u8; 4]) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..4].copy_from_slice(v4);
    a
}

/// Bring an LPM trie to exactly `desired`: insert/update first, longest
/// prefix first, then delete, shortest prefix first. In that order the
/// longest prefix present for any address is, at every instant, either the
/// old policy's longest match with its old list or the new policy's with its
/// new list, so lookups see one version or the other, never a mix (see
/// docs/architecture.md, "Reloads without a window").
fn sync_trie<K: Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    desired: &BTreeMap<TrieOrd, (K, NetRuleList)>,
    ord: impl Fn(&K) -> ([u8; 4], [u8; 16]),
) -> Result<(), CompileError> {
    let map = ebpf.map_mut(name).ok_or(CompileError::MissingMap(name))?;
    let mut trie: LpmTrie<&mut MapData, K, NetRuleList> =
        LpmTrie::try_from(map).map_err(|source| CompileError::Map { map: name, source })?;
    for ((prefix, _, _), (key, list)) in desired.iter().rev() {
        trie.insert(&Key::new(*prefix, *key), *list, 0)
            .map_err(|source| CompileError::Map { map: name, source })?;
    }
    let mut stale: Vec<Key<K>> = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|k| {
            let (a, d) = ord(&k.data());
            !desired.contains_key(&(k.prefix_len(), a, d))
        })
        .collect();
    stale.sort_by_key(Key::prefix_len);
    for k in stale {
        let _ = trie.remove(&k);
    }
    Ok(())
}

fn sync_path(ebpf: &mut Ebpf, desired: &BTreeMap<[u8; limits::PATH_MAX], Tag>) -> Result<(), CompileError> {
    let desired: BTreeMap<PathKeyOrd, Tag> = desired
        .iter()
        .map(|(k, v)| (PathKeyOrd(PathKey { bytes: *k }), *v))
        .collect();
    sync::<PathKeyOrd, Tag>(ebpf, maps::SEL_EXE, &desired)
}

/// `PathKey` with the ordering a BTreeMap needs.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
struct PathKeyOrd(PathKey);

impl PartialOrd for PathKeyOrd {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for PathKeyOrd {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.bytes.cmp(&other.0.bytes)
    }
}

// SAFETY: transparent over PathKey, which is Pod.
unsafe impl Pod for PathKeyOrd {}

/// Bring a hash map to exactly `desired`: insert/update first, then delete.
fn sync<K, V>(ebpf: &mut Ebpf, name: &'static str, desired: &BTreeMap<K, V>) -> Result<(), CompileError>
where
    K: Pod + Ord,
    V: Pod + PartialEq,
{
    let map = ebpf.map_mut(name).ok_or(CompileError::MissingMap(name))?;
    let mut hm: HashMap<&mut MapData, K, V> =
        HashMap::try_from(map).map_err(|source| CompileError::Map { map: name, source })?;
    for (k, v) in desired {
        hm.insert(k, v, 0)
            .map_err(|source| CompileError::Map { map: name, source })?;
    }
    let stale: Vec<K> = hm
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !desired.contains_key(k))
        .collect();
    for k in stale {
        // A concurrent removal is fine: the goal is absence.
        let _ = hm.remove(&k);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_nul_padded() {
        let k = path_key("/usr/bin/claude").expect("fits");
        assert_eq!(&k.bytes[..15], b"/usr/bin/claude");
        assert!(k.bytes[15..].iter().all(|&b| b == 0));
        assert!(path_key(&"x".repeat(limits::PATH_MAX)).is_none());
        assert_eq!(&comm_key("a-very-long-command-name")[..], b"a-very-long-com\0");
    }
}
