//! Writing the compiled file rules (filerules.rs) into the kernel's maps:
//! the agents' prefixes and names, the run sessions' workspace prefixes,
//! and the protected files that have several hard-link names. Like
//! compile.rs, every map is brought to exactly the desired content, new
//! entries first, stale ones after.
use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use agentguard_common::{
    agent_flags, limits, maps, FileInodeKey, FileNameKey, FilePrefixKey, FileQuickFilter, FileRuleEntry,
    FileRuleList, RUN_SESSION_BIT,
};
use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap, MapData,
    },
    Ebpf,
};

use crate::{
    compile::CompileError,
    filerules::{self, AgentFiles, Node},
    policy::PolicySet,
};

/// Files visited per policy load when looking for protected files with
/// several names; a larger protected tree is covered only partly (the
/// daemon warns).
const INODE_SCAN_BUDGET: usize = 200_000;

/// Compile every agent's session-independent file rules.
pub fn compile(set: &PolicySet) -> Result<BTreeMap<u32, AgentFiles>, CompileError> {
    set.agents
        .values()
        .map(|a| Ok((a.id, filerules::compile_agent(a)?)))
        .collect()
}

/// The kernel's internal dev_t (MAJOR << 20 | MINOR) of a stat st_dev.
pub fn kernel_dev(st_dev: u64) -> u32 {
    let major = libc::major(st_dev);
    let minor = libc::minor(st_dev);
    (major << 20) | minor
}

/// Regular files with more than one name under the absolute paths that
/// blocking rules protect, keyed by (agent, device, inode). Returns the
/// entries and warnings (a tree larger than the budget).
pub fn scan_inodes(set: &PolicySet) -> (BTreeMap<FileInodeKey, Vec<FileRuleEntry>>, Vec<String>) {
    let mut out: BTreeMap<FileInodeKey, Vec<FileRuleEntry>> = BTreeMap::new();
    let mut warnings = Vec::new();
    let mut budget = INODE_SCAN_BUDGET;
    for agent in set.agents.values() {
        for (root, entry) in filerules::protected_roots(agent) {
            let Ok(meta) = std::fs::symlink_metadata(&root) else { continue };
            let dev = meta.dev();
            let mut stack = vec![PathBuf::from(&root)];
            while let Some(p) = stack.pop() {
                if budget == 0 {
                    warnings.push(format!(
                        "agent {}: stopped looking for hard-linked protected files after {INODE_SCAN_BUDGET} entries (under {root})",
                        agent.name
                    ));
                    break;
                }
                budget -= 1;
                let Ok(m) = std::fs::symlink_metadata(&p) else { continue };
                if m.dev() != dev {
                    continue; // another mount: not ours to scan
                }
                if m.is_dir() {
                    if let Ok(rd) = std::fs::read_dir(&p) {
                        stack.extend(rd.flatten().map(|e| e.path()));
                    }
                } else if m.is_file() && m.nlink() > 1 {
                    let key = FileInodeKey { agent_id: agent.id, dev: kernel_dev(m.dev()), ino: m.ino() };
                    let v = out.entry(key).or_default();
                    if !v.iter().any(|e| e.rule_id == entry.rule_id) {
                        v.push(entry);
                        v.sort_by_key(|e| e.rule_id);
                    }
                }
            }
        }
    }
    (out, warnings)
}

fn to_list(entries: &[FileRuleEntry]) -> FileRuleList {
    let mut l = FileRuleList::empty();
    for (slot, e) in l.entries.iter_mut().zip(entries) {
        *slot = *e;
    }
    l.count = entries.len().min(limits::FILE_RULES_PER_KEY) as u32;
    l
}

fn prefix_key(id: u32, node: &Node) -> Key<FilePrefixKey> {
    let mut path = [0u8; limits::FILE_KEY_PATH];
    let n = node.len().min(limits::FILE_KEY_PATH);
    path[..n].copy_from_slice(&node[..n]);
    Key::new(32 + 8 * n as u32, FilePrefixKey { id_be: id.to_be_bytes(), path })
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> CompileError {
    move |source| CompileError::Map { map, source }
}

/// Every directory (with its `/`) that has a prefix key strictly below it,
/// and its length: what `AG_FILE_DIRMARK` holds for one id's keys. The
/// kernel's directory cache never records such a directory (dircache.rs).
fn dir_marks(nodes: &BTreeMap<Node, FileRuleList>) -> BTreeMap<Node, u32> {
    let mut marks = BTreeMap::new();
    for node in nodes.keys() {
        let n = node.len().min(limits::FILE_KEY_PATH);
        for (i, &b) in node[..n].iter().enumerate() {
            if b == b'/' && i + 1 < n {
                marks.insert(node[..=i].to_vec(), (i + 1) as u32);
            }
        }
    }
    marks
}

/// Bring the ids of one namespace (agents: top bit clear; run sessions:
/// set) in the prefix trie to exactly `desired`, and the directory marks
/// with them (marks first in, last out: a directory with a key below it
/// is marked whenever the key is there).
fn sync_prefixes(ebpf: &mut Ebpf, sessions: bool, desired: &BTreeMap<u32, BTreeMap<Node, FileRuleList>>) -> Result<(), CompileError> {
    let marks: BTreeMap<u32, BTreeMap<Node, u32>> = desired.iter().map(|(id, nodes)| (*id, dir_marks(nodes))).collect();
    let old_marks = sync_trie_of(ebpf, maps::FILE_DIRMARK, sessions, &marks, false)?;
    sync_trie_of(ebpf, maps::FILE_PREFIX, sessions, desired, true)?;
    for k in old_marks {
        remove_key(ebpf, maps::FILE_DIRMARK, &k)?;
    }
    Ok(())
}

fn remove_key(ebpf: &mut Ebpf, name: &'static str, k: &Key<FilePrefixKey>) -> Result<(), CompileError> {
    let map = ebpf.map_mut(name).ok_or(CompileError::MissingMap(name))?;
    let mut trie: LpmTrie<&mut MapData, FilePrefixKey, u32> = LpmTrie::try_from(map).map_err(map_err(name))?;
    let _ = trie.remove(k);
    Ok(())
}

/// Bring one namespace's ids in the LPM trie `name` to `desired`. With
/// `remove`, its stale keys go at once; otherwise they are returned, for
/// the caller to remove later.
fn sync_trie_of<V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    sessions: bool,
    desired: &BTreeMap<u32, BTreeMap<Node, V>>,
    remove: bool,
) -> Result<Vec<Key<FilePrefixKey>>, CompileError> {
    let map = ebpf.map_mut(name).ok_or(CompileError::MissingMap(name))?;
    let mut trie: LpmTrie<&mut MapData, FilePrefixKey, V> = LpmTrie::try_from(map).map_err(map_err(name))?;
    // Longest prefix first in, shortest first out: see compile::sync_trie.
    let mut want = BTreeSet::new();
    let mut keys: Vec<(Key<FilePrefixKey>, V)> =
        desired.iter().flat_map(|(id, nodes)| nodes.iter().map(|(node, list)| (prefix_key(*id, node), *list))).collect();
    keys.sort_by_key(|(k, _)| std::cmp::Reverse(k.prefix_len()));
    for (key, list) in keys {
        trie.insert(&key, list, 0).map_err(map_err(name))?;
        want.insert((key.prefix_len(), key.data().id_be, key.data().path.to_vec()));
    }
    let mut stale: Vec<Key<FilePrefixKey>> = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|k| {
            let d = k.data();
            let is_session = u32::from_be_bytes(d.id_be) & RUN_SESSION_BIT != 0;
            is_session == sessions && !want.contains(&(k.prefix_len(), d.id_be, d.path.to_vec()))
        })
        .collect();
    stale.sort_by_key(Key::prefix_len);
    if !remove {
        return Ok(stale);
    }
    for k in stale {
        let _ = trie.remove(&k);
    }
    Ok(Vec::new())
}

fn sync_hash<K: aya::Pod + Ord>(ebpf: &mut Ebpf, name: &'static str, desired: &BTreeMap<K, FileRuleList>) -> Result<(), CompileError> {
    let map = ebpf.map_mut(name).ok_or(CompileError::MissingMap(name))?;
    let mut hm: HashMap<&mut MapData, K, FileRuleList> = HashMap::try_from(map).map_err(map_err(name))?;
    for (k, v) in desired {
        hm.insert(k, v, 0).map_err(map_err(name))?;
    }
    let stale: Vec<K> = hm.keys().filter_map(Result::ok).filter(|k| !desired.contains_key(k)).collect();
    for k in stale {
        let _ = hm.remove(&k);
    }
    Ok(())
}

/// Bring the bit filter `name` (an array of `u64` words in front of a
/// map, like [`maps::FILE_NAME_FILTER`]) to cover `bits`: with `exact`, to
/// exactly those bits (call it after the map's stale keys are removed);
/// without, to its bits and those (before the new keys are inserted). So
/// every key in the map has its bit set at every moment, whichever the
/// kernel reads of a word being written: each word changes from bits that
/// cover the map's keys to other bits that do, and a torn read of it mixes
/// bytes of the two.
pub fn sync_bit_filter(ebpf: &mut Ebpf, name: &'static str, bits: impl Iterator<Item = u32>, exact: bool) -> Result<(), CompileError> {
    let map = ebpf.map_mut(name).ok_or(CompileError::MissingMap(name))?;
    let mut filter: Array<&mut MapData, u64> = Array::try_from(map).map_err(map_err(name))?;
    let mut words = vec![0u64; filter.len() as usize];
    for bit in bits {
        if let Some(w) = words.get_mut((bit >> 6) as usize) {
            *w |= 1 << (bit & 63);
        }
    }
    for (i, want) in words.into_iter().enumerate() {
        let i = i as u32;
        let have = filter.get(&i, 0).map_err(map_err(name))?;
        let word = if exact { want } else { have | want };
        if word != have {
            filter.set(i, word, 0).map_err(map_err(name))?;
        }
    }
    Ok(())
}

fn name_bits<'a, I: Iterator<Item = &'a FileNameKey> + 'a>(keys: I) -> impl Iterator<Item = u32> + 'a {
    keys.map(|k| agentguard_common::file_name_filter_bit(k.agent_id, k.kind, k.hash))
}

/// The agents' prefixes, names and protected inodes. Returns the
/// [`agent_flags`] each agent gets (its compiled kinds, plus the inode bit
/// when it has protected multi-link files).
pub fn apply_agents(
    ebpf: &mut Ebpf,
    files: &BTreeMap<u32, AgentFiles>,
    inodes: &BTreeMap<FileInodeKey, Vec<FileRuleEntry>>,
) -> Result<BTreeMap<u32, (u32, u32)>, CompileError> {
    let prefixes: BTreeMap<u32, BTreeMap<Node, FileRuleList>> =
        files.iter().map(|(id, f)| (*id, f.prefixes.clone())).collect();
    sync_prefixes(ebpf, false, &prefixes)?;
    let names: BTreeMap<FileNameKey, FileRuleList> = files
        .iter()
        .flat_map(|(id, f)| f.names.iter().map(move |((kind, hash), l)| (FileNameKey { agent_id: *id, kind: *kind, hash: *hash }, *l)))
        .collect();
    // Every key the kernel may find gets its filter bit before it is
    // inserted, and keeps it until it is removed (sync_bit_filter).
    sync_bit_filter(ebpf, maps::FILE_NAME_FILTER, name_bits(names.keys()), false)?;
    sync_hash(ebpf, maps::FILE_NAMES, &names)?;
    sync_bit_filter(ebpf, maps::FILE_NAME_FILTER, name_bits(names.keys()), true)?;
    // The directory cache copies an agent's quick filter into each entry
    // it fills; an entry lives only until the generation bump that follows
    // this write (compile.rs), so the filter needs no write order of its
    // own.
    let quick: BTreeMap<u32, FileQuickFilter> = files.iter().map(|(id, f)| (*id, f.quick)).collect();
    crate::compile::sync(ebpf, maps::FILE_QUICK, &quick)?;
    let inode_lists: BTreeMap<FileInodeKey, FileRuleList> = inodes.iter().map(|(k, v)| (*k, to_list(v))).collect();
    sync_hash(ebpf, maps::FILE_INODES, &inode_lists)?;
    Ok(files
        .iter()
        .map(|(id, f)| {
            let inode_bit = if inodes.keys().any(|k| k.agent_id == *id) { agent_flags::FILE_INODES } else { 0 };
            (*id, (f.flags | inode_bit, f.prefix_lens))
        })
        .collect())
}

/// The run sessions' workspace rules: session id → (agent name, workspace).
pub fn apply_workspaces(ebpf: &mut Ebpf, set: &PolicySet, sessions: &BTreeMap<u32, (u32, PathBuf)>) -> Result<(), CompileError> {
    let mut desired = BTreeMap::new();
    for (session, (agent_id, workspace)) in sessions {
        if session & RUN_SESSION_BIT == 0 {
            continue;
        }
        let Some(agent) = set.by_id(*agent_id) else { continue };
        desired.insert(*session, filerules::compile_session(agent, Path::new(workspace))?);
    }
    sync_prefixes(ebpf, true, &desired)?;
    crate::compile::bump_file_generation(ebpf)
}
