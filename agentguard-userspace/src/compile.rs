//! The policy compiler: writes a checked [`PolicySet`] into the kernel's
//! maps. Each map is brought to exactly the desired content: new entries are
//! written before stale ones are removed, so a selector that stays in the
//! policy never disappears, even for an instant.
use std::{collections::BTreeMap, path::Path};

use agentguard_common::{limits, maps, AgentConfig, Decision, NetKeyV4, NetKeyV6, NetRuleList, PathKey, Tag};
use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        HashMap, IterableMap as _, MapData,
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

/// What this process last wrote into the network tries, so that a reload
/// writes only what changed and never walks a trie to find what to remove.
/// `None` (at start, and after a failed write) means unknown: the next sync
/// walks the trie and rewrites every entry.
#[derive(Default)]
pub struct Written {
    v4: Option<BTreeMap<TrieOrd, (NetKeyV4, NetRuleList)>>,
    v6: Option<BTreeMap<TrieOrd, (NetKeyV6, NetRuleList)>>,
}

/// Write the whole policy (and the given run sessions, and the addresses
/// its host names resolved to) into the maps.
pub fn apply(
    ebpf: &mut Ebpf,
    written: &mut Written,
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
    apply_network(ebpf, written, set, resolved)?;
    for (id, (flags, prefix_lens)) in crate::filemaps::apply_agents(ebpf, &files, &inodes)? {
        if let Some(config) = agents.get_mut(&id) {
            config.flags |= flags;
            config.file_prefix_lens = prefix_lens;
        }
    }
    sync::<u32, AgentConfig>(ebpf, maps::AGENTS, &agents)?;
    // The agents' network defaults may have changed: flows decide again.
    bump_net_generation(ebpf)?;
    // And the file rules: the directory cache's entries decide again.
    bump_file_generation(ebpf)?;
    sync::<u64, Tag>(ebpf, maps::SEL_CGROUP, &cgroups_sel)?;
    sync_path(ebpf, &exe)?;
    sync::<[u8; limits::COMM_LEN], Tag>(ebpf, maps::SEL_COMM, &comm)?;
    sync::<u32, Tag>(ebpf, maps::SEL_UID, &uid)?;
    Ok(warnings)
}

/// Every agent's network rules into the two LPM tries.
pub fn apply_network(ebpf: &mut Ebpf, written: &mut Written, set: &PolicySet, resolved: &Resolved) -> Result<(), CompileError> {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for agent in set.agents.values() {
        let agent_be = agent.id.to_be_bytes();
        for (net, list) in netrules::compile_agent(agent, resolved)? {
            match net {
                IpNet::V4(n) => {
                    let key = NetKeyV4 { agent_be, addr: n.network().octets() };
                    v4.push(((32 + u32::from(n.prefix_len()), key.agent_be, addr16(&key.addr)), (key, list)));
                }
                IpNet::V6(n) => {
                    let key = NetKeyV6 { agent_be, addr: n.network().octets() };
                    v6.push(((32 + u32::from(n.prefix_len()), key.agent_be, key.addr), (key, list)));
                }
            }
        }
    }
    // Collected, then built in one pass (sorted first), not inserted one by one.
    let (v4, v6): (BTreeMap<_, _>, BTreeMap<_, _>) = (v4.into_iter().collect(), v6.into_iter().collect());
    sync_trie(ebpf, maps::NET_V4, &mut written.v4, v4, |k: &NetKeyV4| (k.agent_be, addr16(&k.addr)))?;
    sync_trie(ebpf, maps::NET_V6, &mut written.v6, v6, |k: &NetKeyV6| (k.agent_be, k.addr))?;
    bump_net_generation(ebpf)
}

/// After the network rules or defaults were written: counted flows decided
/// under the previous generation are decided again at their next action
/// (net.rs). Written after the rules, so a flow stamped with the new value
/// was decided by the new rules.
fn bump_net_generation(ebpf: &mut Ebpf) -> Result<(), CompileError> {
    bump_hook(ebpf, agentguard_common::HookFlag::NetGeneration, true)
}

/// Whether the kernel's directory cache may be used: set once every
/// program that keeps its epoch (dircache.rs) is attached, never before.
static DIRCACHE_ON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turn the directory cache on or off (the daemon, after attaching the
/// programs), and bump its generation: nothing recorded before is used.
pub fn set_dircache(ebpf: &mut Ebpf, on: bool) -> Result<(), CompileError> {
    DIRCACHE_ON.store(on, std::sync::atomic::Ordering::SeqCst);
    bump_file_generation(ebpf)
}

/// After every write of the file rules, the agents' defaults, the
/// workspaces or AgentGuard's marks: the directory cache's entries
/// (dircache.rs) were stamped with the previous value and are not used
/// again. Written after the maps, so an entry stamped with the new value
/// was decided by them. 0 keeps the cache off.
pub fn bump_file_generation(ebpf: &mut Ebpf) -> Result<(), CompileError> {
    let on = DIRCACHE_ON.load(std::sync::atomic::Ordering::SeqCst);
    bump_hook(ebpf, agentguard_common::HookFlag::FileGeneration, on)
}

/// The directory cache's generation in force (0: the cache is off); `None`
/// when the map cannot be read.
pub fn file_generation(ebpf: &Ebpf) -> Option<u32> {
    let hooks: aya::maps::Array<&aya::maps::MapData, u32> = aya::maps::Array::try_from(ebpf.map(maps::HOOKS)?).ok()?;
    hooks.get(&(agentguard_common::HookFlag::FileGeneration as u32), 0).ok()
}

/// Bump a generation slot of `AG_HOOKS` (skipping 0), or with `on` false
/// write 0.
fn bump_hook(ebpf: &mut Ebpf, flag: agentguard_common::HookFlag, on: bool) -> Result<(), CompileError> {
    let map = ebpf.map_mut(maps::HOOKS).ok_or(CompileError::MissingMap(maps::HOOKS))?;
    let mut hooks: aya::maps::Array<&mut aya::maps::MapData, u32> =
        aya::maps::Array::try_from(map).map_err(|source| CompileError::Map { map: maps::HOOKS, source })?;
    let slot = flag as u32;
    let current = hooks.get(&slot, 0).map_err(|source| CompileError::Map { map: maps::HOOKS, source })?;
    let next = match (on, flag) {
        (false, agentguard_common::HookFlag::FileGeneration) => 0,
        _ => current.wrapping_add(1).max(1),
    };
    hooks.set(slot, next, 0).map_err(|source| CompileError::Map { map: maps::HOOKS, source })
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
/// docs/architecture.md, "Reloads without a window"). An entry `written`
/// says is already there with the same list is left alone: rewriting it
/// would change nothing.
fn sync_trie<K: Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    written: &mut Option<BTreeMap<TrieOrd, (K, NetRuleList)>>,
    desired: BTreeMap<TrieOrd, (K, NetRuleList)>,
    ord: impl Fn(&K) -> ([u8; 4], [u8; 16]),
) -> Result<(), CompileError> {
    let map = ebpf.map_mut(name).ok_or(CompileError::MissingMap(name))?;
    let mut trie: LpmTrie<&mut MapData, K, NetRuleList> =
        LpmTrie::try_from(map).map_err(|source| CompileError::Map { map: name, source })?;
    // Until this sync succeeds, what the trie holds is unknown.
    let before = written.take();
    let unchanged = |ord: &TrieOrd, list: &NetRuleList| {
        before.as_ref().and_then(|b| b.get(ord)).is_some_and(|(_, old)| old == list)
    };
    let (keys, lists): (Vec<Key<K>>, Vec<NetRuleList>) = desired
        .iter()
        .rev()
        .filter(|(ord, (_, list))| !unchanged(ord, list))
        .map(|(ord, (key, list))| (Key::new(ord.0, *key), *list))
        .unzip();
    let batched = update_batch(trie.map(), &keys, &lists).map_err(|source| CompileError::Map { map: name, source })?;
    if !batched {
        for (k, list) in keys.iter().zip(&lists) {
            trie.insert(k, *list, 0).map_err(|source| CompileError::Map { map: name, source })?;
        }
    }
    let mut stale: Vec<Key<K>> = match &before {
        Some(b) => b
            .iter()
            .filter(|(ord, _)| !desired.contains_key(ord))
            .map(|(ord, (key, _))| Key::new(ord.0, *key))
            .collect(),
        None => trie
            .keys()
            .filter_map(Result::ok)
            .filter(|k| {
                let (a, d) = ord(&k.data());
                !desired.contains_key(&(k.prefix_len(), a, d))
            })
            .collect(),
    };
    stale.sort_by_key(Key::prefix_len);
    for k in stale {
        match trie.remove(&k) {
            // A concurrent removal is fine: the goal is absence.
            Err(source) if !already_absent(&source) => return Err(CompileError::Map { map: name, source }),
            _ => {}
        }
    }
    *written = Some(desired);
    Ok(())
}

/// Write `keys[i] = values[i]`, in order, in as few bpf() calls as the
/// kernel allows: BPF_MAP_UPDATE_BATCH (Linux 5.6+; hash, array and LPM
/// maps) applies them one by one, in array order, in one system call.
/// `Ok(false)`: this kernel has no batch update for the map and nothing was
/// written; the caller writes them one by one, in the same order.
fn update_batch<K: Pod, V: Pod>(map: &MapData, keys: &[K], values: &[V]) -> Result<bool, aya::maps::MapError> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    /// The kernel's internal "not supported", which bpf() can return.
    const ENOTSUPP: i32 = 524;
    /// The `batch` member of `union bpf_attr`.
    #[repr(C)]
    #[derive(Default)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    assert_eq!(keys.len(), values.len(), "one value per key");
    let fd = map.fd().as_fd().as_raw_fd();
    let mut done = 0;
    while done < keys.len() {
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            values: values[done..].as_ptr() as u64,
            count: u32::try_from(keys.len() - done).unwrap_or(u32::MAX),
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at `count` keys and values, Pod and laid out
        // as the map's key and value (the same types aya's single-entry
        // calls pass), alive across the call; the kernel writes back only
        // `attr.count`, the number it applied.
        let r = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_MAP_UPDATE_BATCH, std::ptr::from_mut(&mut attr), std::mem::size_of::<BatchAttr>())
        };
        let applied = attr.count as usize;
        if r == 0 {
            done += applied;
            continue;
        }
        let io_error = std::io::Error::last_os_error();
        if done == 0 && applied == 0 && matches!(io_error.raw_os_error(), Some(libc::EINVAL | ENOTSUPP | libc::EOPNOTSUPP)) {
            return Ok(false);
        }
        return Err(aya::sys::SyscallError { call: "bpf_map_update_batch", io_error }.into());
    }
    Ok(true)
}

/// A delete that failed because the key was not there.
fn already_absent(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
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
pub(crate) fn sync<K, V>(ebpf: &mut Ebpf, name: &'static str, desired: &BTreeMap<K, V>) -> Result<(), CompileError>
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
