//! File rules → the kernel's maps. Pure: a policy (and a session's
//! workspace) in, map contents out.
//!
//! The kernel cannot match arbitrary globs cheaply, so a path pattern must
//! have one of these forms (anything else is a `policy check` error):
//!
//! | pattern | matches | kernel |
//! |---|---|---|
//! | `/a/b/**`, `{workspace}/x/**` | the directory and everything beneath | LPM node `/a/b/` + exact node `/a/b\0` |
//! | `/a/b`, `{workspace}/x` | exactly that path | exact node |
//! | `/**` | everything | LPM node `/` |
//! | `**/NAME/**` | any path with a component NAME (NAME itself included) | name hash, kind COMPONENT |
//! | `**/NAME` | a basename NAME | name hash, kind BASENAME |
//! | `**/A/B/**` | any path with adjacent components A, B (`A/B` included) | hash of `A/B`, kind PAIR |
//! | `**/A/B` | a path ending in A/B | hash of `A/B`, kind BASE_PAIR |
//! | `**/*.EXT` | a basename ending in `.EXT` (up to three dots) | hash of a tail from a dot, kind SUFFIX |
//! | `**/PREFIX*` | a basename starting with PREFIX (≤ 32 bytes; ≤ 4 lengths per agent) | hash of the basename's first bytes |
//!
//! Each key's value lists, in policy order, every rule that can apply to a
//! path that hits the key (for LPM nodes: the rules of every enclosing
//! prefix as well, as netrules.rs does for addresses), so the kernel takes
//! the lowest rule id over all keys a path hits.
//!
//! A blocking rule (deny, approve) that names rename also protects the
//! ancestors of its prefixes against rename: moving `/var/lib` would carry
//! `/var/lib/postgresql` out of its rule. These are rename-only exact nodes.
use std::{collections::BTreeMap, path::Path};

use agentguard_common::{
    agent_flags, file_ops, fnv1a64, limits, name_kind, Decision, FileQuickFilter, FileRuleEntry, FileRuleList,
};
use thiserror::Error;

use crate::policy::{AgentPolicy, FileOpName, FileRule};

pub const WORKSPACE: &str = "{workspace}";

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FileCompileError {
    #[error("agent {agent}: {key} is covered by {count} file rules, more than the kernel's {max} per key; merge rules")]
    TooManyRules { agent: String, key: String, count: usize, max: usize },
    #[error("agent {agent}: path {path:?} is longer than the kernel's {max}-byte prefix key")]
    PathTooLong { agent: String, path: String, max: usize },
    #[error("agent {agent}: more than {max} different PREFIX* lengths; the kernel checks at most {max}")]
    TooManyPrefixLengths { agent: String, max: usize },
    #[error("agent {agent}, rule {rule:?}: {message}")]
    Pattern { agent: String, rule: String, message: String },
}

/// Where a prefix pattern is rooted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    Absolute,
    Workspace,
}

/// A path pattern in a form the kernel checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// The directory `path` (relative to `base`, without a trailing `/`; ""
    /// is the base itself) and everything beneath it.
    Tree { base: Base, path: String },
    Exact { base: Base, path: String },
    Component(String),
    Basename(String),
    /// `A/B`: two adjacent components.
    Pair(String),
    BasePair(String),
    /// Starts with `.`.
    Suffix(String),
    BasePrefix(String),
}

fn has_glob(s: &str) -> bool {
    s.contains(['*', '?', '[', ']', '{', '}'])
}

fn literal_name(s: &str) -> bool {
    !s.is_empty() && !s.contains('/') && !has_glob(s) && s != "." && s != ".."
}

const FORMS: &str = "supported forms: /abs/dir/**, /abs/path, {workspace}/dir/**, {workspace}/path, **/NAME/**, **/NAME, **/A/B/**, **/A/B, **/*.EXT, **/PREFIX*";

/// `A/B` with two literal names.
fn literal_pair(s: &str) -> bool {
    s.split_once('/').is_some_and(|(a, b)| literal_name(a) && literal_name(b))
}

/// Classify one path pattern of a `[[files.rule]]`.
pub fn classify(pattern: &str) -> Result<Pattern, String> {
    let unsupported = || format!("path {pattern:?} cannot be checked in the kernel; {FORMS}");
    let prefixed = |base: Base, rest: &str| -> Result<Pattern, String> {
        if let Some(dir) = rest.strip_suffix("/**") {
            if has_glob(dir) || dir.contains("//") {
                return Err(unsupported());
            }
            return Ok(Pattern::Tree { base, path: dir.to_owned() });
        }
        if has_glob(rest) || rest.ends_with('/') && rest != "/" || rest.contains("//") {
            return Err(unsupported());
        }
        Ok(Pattern::Exact { base, path: rest.to_owned() })
    };
    if let Some(rest) = pattern.strip_prefix(WORKSPACE) {
        if !rest.is_empty() && !rest.starts_with('/') {
            return Err(unsupported());
        }
        return prefixed(Base::Workspace, rest);
    }
    if pattern.starts_with('/') {
        let p = prefixed(Base::Absolute, pattern)?;
        if let Pattern::Exact { path, .. } = &p {
            if path == "/" {
                return Ok(Pattern::Exact { base: Base::Absolute, path: String::new() });
            }
        }
        return Ok(p);
    }
    let Some(rest) = pattern.strip_prefix("**/") else { return Err(unsupported()) };
    if let Some(name) = rest.strip_suffix("/**") {
        if literal_name(name) {
            return Ok(Pattern::Component(name.to_owned()));
        }
        if literal_pair(name) {
            return Ok(Pattern::Pair(name.to_owned()));
        }
        return Err(unsupported());
    }
    if literal_name(rest) {
        return Ok(Pattern::Basename(rest.to_owned()));
    }
    if literal_pair(rest) {
        return Ok(Pattern::BasePair(rest.to_owned()));
    }
    if let Some(ext) = rest.strip_prefix('*') {
        if ext.starts_with('.') && literal_name(ext) {
            if ext.matches('.').count() > 3 {
                return Err(format!("suffix {ext:?} has more than three dots; the kernel compares tails from a basename's last three dots"));
            }
            return Ok(Pattern::Suffix(ext.to_owned()));
        }
        return Err(format!("path {pattern:?}: a suffix pattern must be **/*.EXT with a literal .EXT; {FORMS}"));
    }
    if let Some(prefix) = rest.strip_suffix('*') {
        if literal_name(prefix) {
            if prefix.len() > limits::FILE_BASE_PREFIX_MAX {
                return Err(format!("prefix {prefix:?} is longer than {} bytes", limits::FILE_BASE_PREFIX_MAX));
            }
            return Ok(Pattern::BasePrefix(prefix.to_owned()));
        }
    }
    Err(unsupported())
}

/// The [`file_ops`] bits of a rule (none listed: all).
pub fn ops_bits(ops: &[FileOpName]) -> u32 {
    if ops.is_empty() {
        return file_ops::ALL;
    }
    ops.iter()
        .map(|o| match o {
            FileOpName::Unlink => file_ops::UNLINK,
            FileOpName::Rmdir => file_ops::RMDIR,
            FileOpName::Rename => file_ops::RENAME,
            FileOpName::Truncate => file_ops::TRUNCATE,
        })
        .fold(0, |a, b| a | b)
}

/// An LPM node: `P/` (P and beneath, by prefix) or `P\0` (exactly P).
pub type Node = Vec<u8>;

/// How one rule reaches a node.
#[derive(Debug, Clone)]
enum Reach {
    Prefix(Node),
    /// An exact node; `ops` restricts the rule's ops (ancestors: rename only).
    Exact(Node, u32),
}

impl Reach {
    fn node(&self) -> &Node {
        match self {
            Self::Prefix(n) | Self::Exact(n, _) => n,
        }
    }

    /// The ops this reach gives the rule at `node`, if it covers it.
    fn covers(&self, node: &Node, ops: u32) -> Option<u32> {
        match self {
            Self::Prefix(p) => node.starts_with(p).then_some(ops),
            Self::Exact(e, only) => (node == e).then_some(ops & only),
        }
    }
}

/// The concrete path of a prefix pattern (workspace substituted).
fn concrete(base: Base, path: &str, workspace: Option<&Path>) -> Option<String> {
    match base {
        Base::Absolute => Some(path.to_owned()),
        Base::Workspace => {
            let ws = workspace?.to_string_lossy().trim_end_matches('/').to_owned();
            Some(format!("{ws}{path}"))
        }
    }
}

fn exact_node(path: &str) -> Node {
    let mut n = if path.is_empty() { b"/".to_vec() } else { path.as_bytes().to_vec() };
    n.push(0);
    n
}

fn reaches(rule: &FileRule, base_wanted: Base, workspace: Option<&Path>) -> Vec<Reach> {
    let ops = ops_bits(&rule.ops);
    let blocks = Decision::from(rule.decision).blocks();
    let mut out = Vec::new();
    for p in &rule.paths {
        let (tree, base, path) = match classify(p) {
            Ok(Pattern::Tree { base, path }) => (true, base, path),
            Ok(Pattern::Exact { base, path }) => (false, base, path),
            _ => continue,
        };
        if base != base_wanted {
            continue;
        }
        let Some(path) = concrete(base, &path, workspace) else { continue };
        if tree {
            out.push(Reach::Prefix(format!("{path}/").into_bytes()));
        }
        out.push(Reach::Exact(exact_node(&path), file_ops::ALL));
        if blocks && ops & file_ops::RENAME != 0 {
            let mut a = Path::new(&path).parent();
            while let Some(dir) = a {
                let s = dir.to_string_lossy();
                if s == "/" || s.is_empty() {
                    break;
                }
                out.push(Reach::Exact(exact_node(&s), file_ops::RENAME));
                a = dir.parent();
            }
        }
    }
    out
}

/// The LPM nodes of one id (an agent's absolute rules, or a session's
/// workspace rules) with their rule lists.
fn prefix_nodes(agent: &AgentPolicy, base: Base, workspace: Option<&Path>) -> Result<BTreeMap<Node, FileRuleList>, FileCompileError> {
    let rules: Vec<(u32, u32, u32, Vec<Reach>)> = agent
        .file_rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let id = u32::try_from(i + 1).unwrap_or(u32::MAX);
            (id, ops_bits(&r.ops), Decision::from(r.decision) as u32, reaches(r, base, workspace))
        })
        .collect();
    let nodes: std::collections::BTreeSet<Node> =
        rules.iter().flat_map(|(_, _, _, r)| r.iter().map(|x| x.node().clone())).collect();
    let mut out = BTreeMap::new();
    for node in nodes {
        if node.len() > limits::FILE_KEY_PATH {
            return Err(FileCompileError::PathTooLong {
                agent: agent.name.clone(),
                path: String::from_utf8_lossy(&node).trim_end_matches('\0').to_owned(),
                max: limits::FILE_KEY_PATH,
            });
        }
        let mut entries = Vec::new();
        for (rule_id, ops, decision, reach) in &rules {
            let covered = reach.iter().filter_map(|r| r.covers(&node, *ops)).fold(0, |a, b| a | b);
            if covered != 0 {
                entries.push(FileRuleEntry { ops: covered, decision: *decision, rule_id: *rule_id });
            }
        }
        let key = String::from_utf8_lossy(&node).replace('\0', "");
        out.insert(node, list(agent, &key, &entries)?);
    }
    Ok(out)
}

fn list(agent: &AgentPolicy, key: &str, entries: &[FileRuleEntry]) -> Result<FileRuleList, FileCompileError> {
    if entries.len() > limits::FILE_RULES_PER_KEY {
        return Err(FileCompileError::TooManyRules {
            agent: agent.name.clone(),
            key: key.to_owned(),
            count: entries.len(),
            max: limits::FILE_RULES_PER_KEY,
        });
    }
    let mut l = FileRuleList::empty();
    for (slot, e) in l.entries.iter_mut().zip(entries) {
        *slot = *e;
    }
    l.count = entries.len() as u32;
    Ok(l)
}

/// One agent's file rules that do not depend on a session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentFiles {
    /// [`agent_flags`] bits (the inode bit is added by the compiler's scan).
    pub flags: u32,
    pub prefix_lens: u32,
    pub prefixes: BTreeMap<Node, FileRuleList>,
    /// (kind, hash) → rules.
    pub names: BTreeMap<(u32, u64), FileRuleList>,
    /// Which entry names could match a name key (the directory cache's
    /// test, dircache.rs).
    pub quick: FileQuickFilter,
}

pub fn compile_agent(agent: &AgentPolicy) -> Result<AgentFiles, FileCompileError> {
    let prefixes = prefix_nodes(agent, Base::Absolute, None)?;
    let mut flags = if prefixes.is_empty() { 0 } else { agent_flags::FILE_PREFIX };
    let mut prefix_lens = 0u32;
    let mut names: BTreeMap<(u32, u64), Vec<FileRuleEntry>> = BTreeMap::new();
    let mut quick = FileQuickFilter::default();
    for (i, rule) in agent.file_rules.iter().enumerate() {
        let entry = FileRuleEntry {
            ops: ops_bits(&rule.ops),
            decision: Decision::from(rule.decision) as u32,
            rule_id: u32::try_from(i + 1).unwrap_or(u32::MAX),
        };
        for p in &rule.paths {
            let pattern = classify(p).map_err(|message| FileCompileError::Pattern {
                agent: agent.name.clone(),
                rule: rule.id.clone(),
                message,
            })?;
            let (kind, name, flag) = match &pattern {
                Pattern::Tree { base: Base::Workspace, .. } | Pattern::Exact { base: Base::Workspace, .. } => {
                    flags |= agent_flags::FILE_SESSION;
                    continue;
                }
                Pattern::Tree { .. } | Pattern::Exact { .. } => continue,
                Pattern::Component(n) => (name_kind::COMPONENT, n, agent_flags::FILE_COMPONENT),
                Pattern::Basename(n) => (name_kind::BASENAME, n, agent_flags::FILE_BASENAME),
                Pattern::Pair(n) => (name_kind::PAIR, n, agent_flags::FILE_PAIR),
                Pattern::BasePair(n) => (name_kind::BASE_PAIR, n, agent_flags::FILE_BASE_PAIR),
                Pattern::Suffix(n) => (name_kind::SUFFIX, n, agent_flags::FILE_SUFFIX),
                Pattern::BasePrefix(n) => {
                    prefix_lens |= 1 << (n.len() - 1);
                    (name_kind::BASE_PREFIX, n, agent_flags::FILE_BASE_PREFIX)
                }
            };
            flags |= flag;
            quick.add(flag, name.as_bytes());
            let v = names.entry((kind, fnv1a64(name.as_bytes()))).or_default();
            if v.last().is_none_or(|e| e.rule_id != entry.rule_id) {
                v.push(entry);
            }
        }
    }
    if prefix_lens.count_ones() > 4 {
        return Err(FileCompileError::TooManyPrefixLengths { agent: agent.name.clone(), max: 4 });
    }
    let names = names
        .into_iter()
        .map(|((kind, hash), entries)| Ok(((kind, hash), list(agent, &format!("name #{hash:x}"), &entries)?)))
        .collect::<Result<_, FileCompileError>>()?;
    Ok(AgentFiles { flags, prefix_lens, prefixes, names, quick })
}

/// The LPM nodes of one session: the agent's `{workspace}` rules with the
/// session's workspace substituted.
pub fn compile_session(agent: &AgentPolicy, workspace: &Path) -> Result<BTreeMap<Node, FileRuleList>, FileCompileError> {
    prefix_nodes(agent, Base::Workspace, Some(workspace))
}

/// Absolute trees and paths that a blocking rule protects: where the
/// compiler looks for files with several hard-link names, and the rule ids
/// (in policy order) that protect each.
pub fn protected_roots(agent: &AgentPolicy) -> Vec<(String, FileRuleEntry)> {
    let mut out = Vec::new();
    for (i, rule) in agent.file_rules.iter().enumerate() {
        let decision = Decision::from(rule.decision);
        if !decision.blocks() {
            continue;
        }
        let entry = FileRuleEntry {
            ops: ops_bits(&rule.ops),
            decision: decision as u32,
            rule_id: u32::try_from(i + 1).unwrap_or(u32::MAX),
        };
        for p in &rule.paths {
            match classify(p) {
                Ok(Pattern::Tree { base: Base::Absolute, path } | Pattern::Exact { base: Base::Absolute, path })
                    if !path.is_empty() =>
                {
                    out.push((path, entry));
                }
                _ => {}
            }
        }
    }
    out
}

/// The paths Landlock should protect for a run session: existing
/// directories or files under `deny` rules with a concrete path (absolute,
/// or in the workspace), that cover removal or truncation. `approve` is
/// left to the BPF programs: Landlock cannot ask a human.
pub fn landlock_protected(agent: &AgentPolicy, workspace: Option<&Path>) -> Vec<String> {
    let mut out = Vec::new();
    for rule in &agent.file_rules {
        if Decision::from(rule.decision) != Decision::Deny {
            continue;
        }
        for p in &rule.paths {
            let (base, path) = match classify(p) {
                Ok(Pattern::Tree { base, path } | Pattern::Exact { base, path }) => (base, path),
                _ => continue,
            };
            let Some(path) = concrete(base, &path, workspace) else { continue };
            if !path.is_empty() && path != "/" && !out.contains(&path) {
                out.push(path);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::policy::parse;

    fn agent(rules: &str) -> AgentPolicy {
        parse(Path::new("t.toml"), &format!("[agent]\nname = \"a\"\n[files]\ndefault = \"approve\"\n{rules}")).expect("valid policy")
    }

    fn rule(id: &str, decision: &str, paths: &[&str], ops: &str) -> String {
        let paths: Vec<String> = paths.iter().map(|p| format!("{p:?}")).collect();
        format!("[[files.rule]]\nid = \"{id}\"\ndecision = \"{decision}\"\npaths = [{}]\n{ops}\n", paths.join(", "))
    }

    #[test]
    fn classifies_the_supported_forms_and_rejects_the_rest() {
        assert_eq!(classify("/var/lib/postgresql/**"), Ok(Pattern::Tree { base: Base::Absolute, path: "/var/lib/postgresql".into() }));
        assert_eq!(classify("/**"), Ok(Pattern::Tree { base: Base::Absolute, path: String::new() }));
        assert_eq!(classify("/etc/passwd"), Ok(Pattern::Exact { base: Base::Absolute, path: "/etc/passwd".into() }));
        assert_eq!(classify("{workspace}/**"), Ok(Pattern::Tree { base: Base::Workspace, path: String::new() }));
        assert_eq!(classify("{workspace}/build/**"), Ok(Pattern::Tree { base: Base::Workspace, path: "/build".into() }));
        assert_eq!(classify("**/.git/**"), Ok(Pattern::Component(".git".into())));
        assert_eq!(classify("**/MERGE_HEAD"), Ok(Pattern::Basename("MERGE_HEAD".into())));
        assert_eq!(classify("**/*.bak"), Ok(Pattern::Suffix(".bak".into())));
        assert_eq!(classify("**/*.tar.gz"), Ok(Pattern::Suffix(".tar.gz".into())));
        assert_eq!(classify("**/tmp_*"), Ok(Pattern::BasePrefix("tmp_".into())));
        assert_eq!(classify("**/.git/objects/**"), Ok(Pattern::Pair(".git/objects".into())));
        assert_eq!(classify("**/.git/HEAD"), Ok(Pattern::BasePair(".git/HEAD".into())));
        for bad in ["/var/*/data", "**/*.bak*", "**/a/b/c/**", "**/a/*/**", "*.bak", "relative/**", "/a/**/b", "{workspace}x", "**/*bak"] {
            assert!(classify(bad).is_err(), "{bad} must be rejected");
        }
    }

    #[test]
    fn prefix_nodes_carry_enclosing_rules_in_policy_order() {
        let a = agent(&[
            rule("pg", "deny", &["/var/lib/postgresql/**"], ""),
            rule("tmp", "audit", &["/tmp/**"], ""),
            rule("outside", "approve", &["/**"], "ops = [\"unlink\", \"rmdir\", \"rename\"]"),
        ]
        .concat());
        let f = compile_agent(&a).expect("compiles");
        assert_eq!(f.flags & agent_flags::FILE_PREFIX, agent_flags::FILE_PREFIX);
        let pg = &f.prefixes[&b"/var/lib/postgresql/".to_vec()];
        assert_eq!(pg.count, 2);
        assert_eq!((pg.entries[0].rule_id, pg.entries[1].rule_id), (1, 3));
        assert_eq!(pg.entries[0].decision, Decision::Deny as u32);
        assert_eq!(pg.entries[1].ops, file_ops::UNLINK | file_ops::RMDIR | file_ops::RENAME);
        // The directory itself, exactly.
        assert_eq!(f.prefixes[&b"/var/lib/postgresql\0".to_vec()].entries[0].rule_id, 1);
        // Its ancestors are protected against rename only, by the deny rule.
        let lib = &f.prefixes[&b"/var/lib\0".to_vec()];
        assert_eq!((lib.entries[0].rule_id, lib.entries[0].ops), (1, file_ops::RENAME));
        assert_eq!(lib.entries[1].rule_id, 3);
        // The root node: only the catch-all.
        assert_eq!(f.prefixes[&b"/".to_vec()].count, 1);
        // /tmp adds its own two nodes but no ancestors (audit does not block).
        let keys: Vec<String> = f.prefixes.keys().map(|k| String::from_utf8_lossy(k).replace('\0', "$")).collect();
        assert_eq!(keys, ["/", "/$", "/tmp$", "/tmp/", "/var$", "/var/lib$", "/var/lib/postgresql$", "/var/lib/postgresql/"]);
    }

    #[test]
    fn names_are_hashed_per_kind_and_prefix_lengths_recorded() {
        let a = agent(&[
            rule("backups", "deny", &["**/*.bak", "**/*.dump"], ""),
            rule("git-internals", "audit", &["**/*.lock", "**/tmp_*", "**/MERGE_HEAD"], ""),
            rule("vcs", "deny", &["**/.git/**"], "ops = [\"unlink\", \"rmdir\", \"rename\"]"),
            rule("ws", "audit", &["{workspace}/**"], ""),
        ]
        .concat());
        let f = compile_agent(&a).expect("compiles");
        let want = agent_flags::FILE_SUFFIX | agent_flags::FILE_BASE_PREFIX | agent_flags::FILE_BASENAME | agent_flags::FILE_COMPONENT | agent_flags::FILE_SESSION;
        assert_eq!(f.flags, want);
        assert_eq!(f.prefix_lens, 1 << 3, "tmp_ is 4 bytes");
        let bak = f.names[&(name_kind::SUFFIX, fnv1a64(b".bak"))];
        assert_eq!((bak.count, bak.entries[0].rule_id), (1, 1));
        let git = f.names[&(name_kind::COMPONENT, fnv1a64(b".git"))];
        assert_eq!(git.entries[0].ops, file_ops::UNLINK | file_ops::RMDIR | file_ops::RENAME);
        assert!(f.prefixes.is_empty(), "workspace rules are per session");
        let s = compile_session(&a, Path::new("/home/u/proj")).expect("compiles");
        assert_eq!(s[&b"/home/u/proj/".to_vec()].entries[0].rule_id, 4);
        assert!(s.contains_key(b"/home/u/proj\0".as_slice()));
    }

    #[test]
    fn limits_are_reported() {
        let mut text = String::new();
        for i in 0..13 {
            text.push_str(&rule(&format!("r{i}"), "deny", &["/data/**"], ""));
        }
        assert!(matches!(compile_agent(&agent(&text)), Err(FileCompileError::TooManyRules { count: 13, .. })));
        let long = format!("/{}/**", "x".repeat(300));
        assert!(matches!(compile_agent(&agent(&rule("l", "deny", &[&long], ""))), Err(FileCompileError::PathTooLong { .. })));
        let prefixes: Vec<String> = (1..=5).map(|n| format!("**/{}*", "p".repeat(n))).collect();
        let refs: Vec<&str> = prefixes.iter().map(String::as_str).collect();
        assert!(matches!(compile_agent(&agent(&rule("p", "audit", &refs, ""))), Err(FileCompileError::TooManyPrefixLengths { .. })));
    }

    #[test]
    fn landlock_and_inode_roots_take_blocking_concrete_paths() {
        let a = agent(&[
            rule("pg", "deny", &["/var/lib/postgresql/**", "**/*.bak"], ""),
            rule("hold", "approve", &["/srv/backups/**"], ""),
            rule("secrets", "deny", &["{workspace}/secrets/**"], ""),
            rule("ws", "audit", &["{workspace}/**"], ""),
        ]
        .concat());
        assert_eq!(landlock_protected(&a, Some(Path::new("/w"))), vec!["/var/lib/postgresql".to_owned(), "/w/secrets".to_owned()]);
        let roots: Vec<String> = protected_roots(&a).into_iter().map(|(p, _)| p).collect();
        assert_eq!(roots, vec!["/var/lib/postgresql".to_owned(), "/srv/backups".to_owned()]);
    }

    /// What the kernel decides (filejudge.rs), mirrored over the compiled
    /// maps: longest LPM node per id, name hashes, lowest rule id.
    fn decide(a: &AgentPolicy, workspace: Option<&Path>, path: &str, ops: u32) -> (Decision, u32) {
        let f = compile_agent(a).expect("compiles");
        let mut best: Option<(u32, u32)> = None;
        let mut consider = |l: &FileRuleList| {
            if let Some(e) = l.entries[..l.count as usize].iter().find(|e| e.ops & ops != 0) {
                if best.is_none_or(|(id, _)| e.rule_id < id) {
                    best = Some((e.rule_id, e.decision));
                }
            }
        };
        let lpm = |nodes: &BTreeMap<Node, FileRuleList>| -> Option<FileRuleList> {
            let mut key = path.as_bytes().to_vec();
            key.push(0);
            nodes.iter().filter(|(n, _)| key.starts_with(n)).max_by_key(|(n, _)| n.len()).map(|(_, l)| *l)
        };
        if let Some(l) = lpm(&f.prefixes) {
            consider(&l);
        }
        if let Some(ws) = workspace {
            if let Some(l) = lpm(&compile_session(a, ws).expect("compiles")) {
                consider(&l);
            }
        }
        let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        let name = |kind: u32, n: &str| f.names.get(&(kind, fnv1a64(n.as_bytes()))).copied();
        for c in &comps {
            if let Some(l) = name(name_kind::COMPONENT, c) {
                consider(&l);
            }
        }
        for w in comps.windows(2) {
            if let Some(l) = name(name_kind::PAIR, &format!("{}/{}", w[0], w[1])) {
                consider(&l);
            }
        }
        if comps.len() >= 2 {
            let n = comps.len();
            if let Some(l) = name(name_kind::BASE_PAIR, &format!("{}/{}", comps[n - 2], comps[n - 1])) {
                consider(&l);
            }
        }
        if let Some(base) = comps.last() {
            if let Some(l) = name(name_kind::BASENAME, base) {
                consider(&l);
            }
            let dots: Vec<usize> = base.match_indices('.').map(|(i, _)| i).collect();
            for &d in dots.iter().rev().take(3) {
                if let Some(l) = name(name_kind::SUFFIX, &base[d..]) {
                    consider(&l);
                }
            }
            let lens: Vec<usize> = (1..=32).filter(|n| f.prefix_lens & (1 << (n - 1)) != 0 && *n <= base.len()).collect();
            for &n in lens.iter().rev().take(4) {
                if let Some(l) = name(name_kind::BASE_PREFIX, &base[..n]) {
                    consider(&l);
                }
            }
        }
        match best {
            Some((id, d)) => (Decision::from_u32(d).expect("decision"), id),
            None => (Decision::from(a.file_default), 0),
        }
    }

    #[test]
    fn the_shipped_default_policy_decides_the_irreversible_list() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/default.toml");
        let a = crate::policy::load_file(&path).expect("the shipped policy parses");
        let ws = Some(Path::new("/home/dev/proj"));
        let rule = |id: u32| a.file_rule(id).map(|r| r.id.clone()).unwrap_or_default();
        let d = |p: &str, op: u32| {
            let (decision, id) = decide(&a, ws, p, op);
            (decision, rule(id))
        };
        use file_ops::*;
        assert_eq!(d("/var/lib/postgresql/16/main/base/1/1259", UNLINK), (Decision::Deny, "database-data".into()));
        assert_eq!(d("/var/lib/postgresql", RENAME), (Decision::Deny, "database-data".into()));
        assert_eq!(d("/var/lib", RENAME), (Decision::Deny, "database-data".into()), "moving an ancestor moves the tree");
        assert_eq!(d("/home/dev/proj/db.dump", UNLINK), (Decision::Deny, "backups".into()));
        assert_eq!(d("/srv/x.tar.bak", TRUNCATE), (Decision::Deny, "backups".into()));
        assert_eq!(d("/home/dev/proj/.git/objects/ab/cdef", UNLINK), (Decision::Deny, "vcs-metadata".into()));
        assert_eq!(d("/home/dev/proj/.git", RMDIR), (Decision::Deny, "vcs-metadata".into()));
        // git itself keeps working: lock files renamed into place, the
        // target replaced (judged as a truncation), temp objects removed.
        assert_eq!(d("/home/dev/proj/.git/index.lock", RENAME).0, Decision::Audit);
        assert_eq!(d("/home/dev/proj/.git/index", TRUNCATE).0, Decision::Audit);
        assert_eq!(d("/home/dev/proj/.git/objects/ab/tmp_obj_x1y2", UNLINK).0, Decision::Audit);
        assert_eq!(d("/home/dev/proj/.git/MERGE_HEAD", UNLINK).0, Decision::Audit);
        assert_eq!(d("/home/dev/proj/.git/tXaaNmo", UNLINK).0, Decision::Audit, "git init's probe file");
        assert_eq!(d("/home/dev/proj/.git/refs/heads/main", UNLINK), (Decision::Deny, "vcs-metadata".into()));
        assert_eq!(d("/home/dev/proj/.git/HEAD", UNLINK), (Decision::Deny, "vcs-metadata".into()));
        assert_eq!(d("/home/dev/proj/.git/refs/heads/main.lock", RENAME).0, Decision::Audit);
        // The workspace: allowed and logged; elsewhere deletes need approval.
        assert_eq!(d("/home/dev/proj/src/main.rs", UNLINK), (Decision::Audit, "workspace".into()));
        assert_eq!(d("/home/dev/notes.txt", UNLINK), (Decision::Approve, "outside-workspace".into()));
        assert_eq!(d("/home/dev/notes.txt", TRUNCATE), (Decision::Audit, String::new()), "overwriting is not a delete");
        assert_eq!(d("/tmp/build-1/x.o", UNLINK).0, Decision::Audit);
        assert_eq!(d("/home/dev/.claude.json.tmp.123", RENAME).0, Decision::Audit);
        let (decision, _) = decide(&a, None, "/home/dev/proj/src/main.rs", UNLINK);
        assert_eq!(decision, Decision::Approve, "no workspace: the whole disk is outside it");
    }
}
