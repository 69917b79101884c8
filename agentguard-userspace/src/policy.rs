//! Policy files: parsing, validation with file:line:column errors, and the
//! checked in-memory form the compiler writes into the kernel's maps.
//!
//! One file declares one agent: how to recognise it (`[agent.match]`) and
//! what it may do (`[network]`, `[files]`). The reference is docs/policy.md.
use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, ToSocketAddrs as _},
    ops::Range,
    path::{Path, PathBuf},
};

use agentguard_common::{limits, Decision};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use toml::Spanned;

/// A policy problem, located in its file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}:{column}: {message}", file.display())]
pub struct PolicyError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Several problems at once, so a user fixes them in one pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DecisionName {
    Allow,
    Deny,
    Approve,
    Audit,
}

impl From<DecisionName> for Decision {
    fn from(d: DecisionName) -> Self {
        match d {
            DecisionName::Allow => Decision::Allow,
            DecisionName::Deny => Decision::Deny,
            DecisionName::Approve => Decision::Approve,
            DecisionName::Audit => Decision::Audit,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reversibility {
    Reversible,
    Compensable,
    Irreversible,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Any,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileOpName {
    Unlink,
    Rmdir,
    Rename,
    Truncate,
}

// ---- the file as written -------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    agent: RawAgent,
    #[serde(default)]
    network: Option<RawNetwork>,
    #[serde(default)]
    files: Option<RawFiles>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    name: Spanned<String>,
    #[serde(default)]
    description: Option<String>,
    /// The agent `agentguard run --agent NAME` uses when no policy names NAME.
    #[serde(default)]
    fallback: bool,
    #[serde(rename = "match", default)]
    selectors: Option<RawMatch>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    #[serde(default)]
    exe: Vec<Spanned<String>>,
    #[serde(default)]
    comm: Vec<Spanned<String>>,
    #[serde(default)]
    cgroup: Vec<Spanned<String>>,
    #[serde(default)]
    unit: Vec<Spanned<String>>,
    #[serde(default)]
    uid: Vec<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    default: DecisionName,
    #[serde(default, rename = "rule")]
    rules: Vec<Spanned<RawNetRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetRule {
    id: Spanned<String>,
    decision: DecisionName,
    #[serde(default)]
    cidr: Vec<Spanned<String>>,
    #[serde(default)]
    hosts: Vec<Spanned<String>>,
    #[serde(default)]
    ports: Vec<Spanned<toml::Value>>,
    #[serde(default)]
    protocol: Option<Protocol>,
    #[serde(default)]
    reversibility: Option<Reversibility>,
    #[serde(default)]
    rollback: Option<String>,
    /// Freeze the whole agent when this rule refuses an action.
    #[serde(default)]
    freeze: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFiles {
    default: DecisionName,
    #[serde(default, rename = "rule")]
    rules: Vec<Spanned<RawFileRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFileRule {
    id: Spanned<String>,
    decision: DecisionName,
    paths: Vec<Spanned<String>>,
    #[serde(default)]
    ops: Vec<FileOpName>,
    #[serde(default)]
    reversibility: Option<Reversibility>,
    #[serde(default)]
    rollback: Option<String>,
    /// Freeze the whole agent when this rule refuses an action.
    #[serde(default)]
    freeze: bool,
}

// ---- the checked form ----------------------------------------------------

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Selectors {
    pub exe: Vec<String>,
    pub comm: Vec<String>,
    pub cgroup: Vec<String>,
    pub unit: Vec<String>,
    pub uid: Vec<u32>,
}

impl Selectors {
    pub fn is_empty(&self) -> bool {
        let Self { exe, comm, cgroup, unit, uid } = self;
        exe.is_empty() && comm.is_empty() && cgroup.is_empty() && unit.is_empty() && uid.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetRule {
    pub id: String,
    pub decision: DecisionName,
    pub cidrs: Vec<IpNet>,
    pub hosts: Vec<String>,
    /// Empty means every port.
    pub ports: Vec<PortRange>,
    pub protocol: Protocol,
    pub reversibility: Reversibility,
    pub rollback: Option<String>,
    /// A refusal by this rule also freezes the agent (killswitch), for a
    /// human to look at: `agentguard thaw` or `kill`.
    pub freeze: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileRule {
    pub id: String,
    pub decision: DecisionName,
    pub paths: Vec<String>,
    /// Empty means every destructive operation.
    pub ops: Vec<FileOpName>,
    pub reversibility: Reversibility,
    pub rollback: Option<String>,
    /// A refusal by this rule also freezes the agent (killswitch), for a
    /// human to look at: `agentguard thaw` or `kill`.
    pub freeze: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentPolicy {
    pub name: String,
    /// Stable across reloads and restarts: derived from the name.
    pub id: u32,
    pub description: Option<String>,
    pub fallback: bool,
    pub selectors: Selectors,
    pub net_default: DecisionName,
    pub net_rules: Vec<NetRule>,
    pub file_default: DecisionName,
    pub file_rules: Vec<FileRule>,
    pub source: PathBuf,
}

impl AgentPolicy {
    /// The network rule the kernel reports as `rule_id` (1-based; 0 is the default).
    pub fn net_rule(&self, rule_id: u32) -> Option<&NetRule> {
        self.net_rules.get(usize::try_from(rule_id).ok()?.checked_sub(1)?)
    }

    /// The file rule the kernel reports as `rule_id` (1-based; 0 is the default).
    pub fn file_rule(&self, rule_id: u32) -> Option<&FileRule> {
        self.file_rules.get(usize::try_from(rule_id).ok()?.checked_sub(1)?)
    }
}

/// Every agent the policy directory declares, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PolicySet {
    pub agents: BTreeMap<String, AgentPolicy>,
    /// SHA-256 over the `*.toml` files the set was read from (name and
    /// bytes, in name order), hex: the identity of the policy, for
    /// `status`. Computed from the very bytes that were parsed.
    pub hash: String,
}

impl PolicySet {
    /// The agent `agentguard run --agent NAME` runs under.
    pub fn for_run(&self, name: &str) -> Option<&AgentPolicy> {
        self.agents
            .get(name)
            .or_else(|| self.agents.values().find(|a| a.fallback))
    }

    /// Every host name any network rule mentions.
    pub fn hosts(&self) -> impl Iterator<Item = &String> {
        self.agents
            .values()
            .flat_map(|a| a.net_rules.iter().flat_map(|r| r.hosts.iter()))
    }

    pub fn by_id(&self, id: u32) -> Option<&AgentPolicy> {
        self.agents.values().find(|a| a.id == id)
    }
}

/// FNV-1a of the agent name, never 0 (0 means "no agent" in the kernel).
pub fn agent_id(name: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    // Keep the top bit clear: ids are printed and compared as plain numbers.
    (h & 0x7fff_ffff).max(1)
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, col)
}

struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
    errors: Vec<PolicyError>,
}

impl Ctx<'_> {
    fn err(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, column) = line_col(self.text, span.start);
        self.errors.push(PolicyError {
            file: self.file.to_owned(),
            line,
            column,
            message: message.into(),
        });
    }
}

/// Parse and check one policy file's text.
pub fn parse(file: &Path, text: &str) -> Result<AgentPolicy, PolicyErrors> {
    let raw: RawPolicy = toml::from_str(text).map_err(|e| {
        let (line, column) = e.span().map_or((1, 1), |s| line_col(text, s.start));
        PolicyErrors(vec![PolicyError {
            file: file.to_owned(),
            line,
            column,
            message: e.message().trim().to_owned(),
        }])
    })?;
    let mut cx = Ctx {
        file,
        text,
        errors: Vec::new(),
    };
    let policy = check(&mut cx, raw);
    if cx.errors.is_empty() {
        Ok(policy)
    } else {
        Err(PolicyErrors(cx.errors))
    }
}

fn check(cx: &mut Ctx<'_>, raw: RawPolicy) -> AgentPolicy {
    let RawPolicy { agent, network, files } = raw;
    let RawAgent { name, description, fallback, selectors } = agent;
    let name_span = name.span();
    let name = name.into_inner();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        cx.err(
            name_span,
            format!("agent name {name:?} must be non-empty and use only letters, digits, '-', '_' and '.' (it names a cgroup)"),
        );
    }
    let selectors = check_selectors(cx, selectors.unwrap_or_default());

    let (net_default, net_rules) = match network {
        None => (DecisionName::Allow, Vec::new()),
        Some(n) => (n.default, n.rules.into_iter().map(|r| check_net_rule(cx, r)).collect()),
    };
    let (file_default, file_rules) = match files {
        None => (DecisionName::Allow, Vec::new()),
        Some(f) => (f.default, f.rules.into_iter().map(|r| check_file_rule(cx, r)).collect()),
    };
    check_unique_ids(cx, net_rules.iter().map(|r| &r.id), "network");
    check_unique_ids(cx, file_rules.iter().map(|r| &r.id), "files");

    AgentPolicy {
        id: agent_id(&name),
        name,
        description,
        fallback,
        selectors,
        net_default,
        net_rules,
        file_default,
        file_rules,
        source: cx.file.to_owned(),
    }
}

fn check_unique_ids<'a>(cx: &mut Ctx<'_>, ids: impl Iterator<Item = &'a String>, section: &str) {
    let mut seen = std::collections::BTreeSet::new();
    for id in ids {
        if !seen.insert(id.clone()) {
            // The span of the duplicate is found by searching the text: ids are short and unique enough.
            let at = cx.text.find(&format!("\"{id}\"")).unwrap_or(0);
            cx.err(at..at, format!("[{section}] rule id {id:?} is used twice"));
        }
    }
}

fn check_selectors(cx: &mut Ctx<'_>, m: RawMatch) -> Selectors {
    let RawMatch { exe, comm, cgroup, unit, uid } = m;
    let mut out = Selectors::default();
    for e in exe {
        let span = e.span();
        let e = e.into_inner();
        if !e.starts_with('/') {
            cx.err(span.clone(), format!("exe selector {e:?} must be an absolute path"));
        }
        if e.len() >= limits::PATH_MAX {
            cx.err(span, format!("exe selector is longer than {} bytes", limits::PATH_MAX - 1));
        }
        out.exe.push(e);
    }
    for c in comm {
        let span = c.span();
        let c = c.into_inner();
        if c.is_empty() || c.len() >= limits::COMM_LEN {
            cx.err(
                span,
                format!(
                    "comm selector {c:?} must be 1 to {} bytes (the kernel truncates command names)",
                    limits::COMM_LEN - 1
                ),
            );
        }
        out.comm.push(c);
    }
    for c in cgroup {
        let span = c.span();
        let c = c.into_inner();
        if !c.starts_with('/') {
            cx.err(span, format!("cgroup selector {c:?} must be a path inside the cgroup2 hierarchy, starting with '/'"));
        }
        out.cgroup.push(c);
    }
    for u in unit {
        let span = u.span();
        let u = u.into_inner();
        if !u.contains('.') || u.contains('/') {
            cx.err(span, format!("unit selector {u:?} must be a systemd unit name such as \"agent.service\""));
        }
        out.unit.push(u);
    }
    out.uid = uid.into_iter().map(Spanned::into_inner).collect();
    out
}

fn check_net_rule(cx: &mut Ctx<'_>, rule: Spanned<RawNetRule>) -> NetRule {
    let rule_span = rule.span();
    let RawNetRule { id, decision, cidr, hosts, ports, protocol, reversibility, rollback, freeze } =
        rule.into_inner();
    let id = id.into_inner();
    if cidr.is_empty() && hosts.is_empty() && ports.is_empty() {
        cx.err(rule_span, format!("network rule {id:?} matches nothing: give cidr, hosts or ports"));
    }
    let mut cidrs = Vec::new();
    for c in cidr {
        let span = c.span();
        let text = c.into_inner();
        match text.parse::<IpNet>().or_else(|_| text.parse::<IpAddr>().map(IpNet::from)) {
            Ok(net) => cidrs.push(net.trunc()),
            Err(_) => cx.err(span, format!("{text:?} is not an IP address or CIDR (e.g. 10.0.0.0/8, fd00::/8)")),
        }
    }
    let mut checked_hosts = Vec::new();
    for h in hosts {
        let span = h.span();
        let host = h.into_inner();
        match (host.as_str(), 0u16).to_socket_addrs() {
            Ok(addrs) if addrs.len() > 0 => checked_hosts.push(host),
            Ok(_) => cx.err(span, format!("host {host:?} resolves to no address")),
            Err(e) => cx.err(span, format!("host {host:?} does not resolve: {e}")),
        }
    }
    let mut port_ranges = Vec::new();
    for p in ports {
        let span = p.span();
        match parse_port(p.get_ref()) {
            Ok(r) => port_ranges.push(r),
            Err(msg) => cx.err(span, msg),
        }
    }
    NetRule {
        id,
        decision,
        cidrs,
        hosts: checked_hosts,
        ports: port_ranges,
        protocol: protocol.unwrap_or(Protocol::Any),
        reversibility: reversibility.unwrap_or(Reversibility::Irreversible),
        rollback,
        freeze,
    }
}

fn parse_port(v: &toml::Value) -> Result<PortRange, String> {
    let one = |n: i64| -> Result<u16, String> {
        u16::try_from(n)
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| format!("port {n} is outside 1-65535"))
    };
    match v {
        toml::Value::Integer(n) => {
            let p = one(*n)?;
            Ok(PortRange { first: p, last: p })
        }
        toml::Value::String(s) => {
            let (a, b) = s.split_once('-').unwrap_or((s, s));
            let parse = |t: &str| {
                t.trim()
                    .parse::<i64>()
                    .map_err(|_| format!("{s:?} is not a port or a port range like \"8000-8999\""))
                    .and_then(one)
            };
            let (first, last) = (parse(a)?, parse(b)?);
            if first > last {
                return Err(format!("port range {s:?} runs backwards"));
            }
            Ok(PortRange { first, last })
        }
        other => Err(format!("a port must be a number or a \"first-last\" string, not {}", other.type_str())),
    }
}

fn check_file_rule(cx: &mut Ctx<'_>, rule: Spanned<RawFileRule>) -> FileRule {
    let rule_span = rule.span();
    let RawFileRule { id, decision, paths, ops, reversibility, rollback, freeze } = rule.into_inner();
    let id = id.into_inner();
    let mut checked = Vec::new();
    for p in paths {
        let span = p.span();
        let pattern = p.into_inner();
        let concrete = pattern.replace("{workspace}", "/workspace");
        if !(concrete.starts_with('/') || concrete.starts_with("**")) {
            cx.err(span.clone(), format!("path {pattern:?} must be absolute, start with {{workspace}}, or start with ** (any directory)"));
        }
        if let Err(e) = globset::Glob::new(&concrete) {
            cx.err(span, format!("path {pattern:?} is not a valid glob: {e}"));
        } else if let Err(message) = crate::filerules::classify(&pattern) {
            cx.err(span, message);
        }
        checked.push(pattern);
    }
    if checked.is_empty() {
        cx.err(rule_span, format!("file rule {id:?} has no paths"));
    }
    FileRule {
        id,
        decision,
        paths: checked,
        ops,
        reversibility: reversibility.unwrap_or(Reversibility::Irreversible),
        rollback,
        freeze,
    }
}

fn read(path: &Path) -> Result<String, PolicyErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        PolicyErrors(vec![PolicyError {
            file: path.to_owned(),
            line: 1,
            column: 1,
            message: format!("cannot read: {e}"),
        }])
    })
}

/// Read and check one file.
pub fn load_file(path: &Path) -> Result<AgentPolicy, PolicyErrors> {
    parse(path, &read(path)?)
}

/// Every `*.toml` directly in `dir` (subdirectories such as examples/ are not
/// read). All problems of all files are reported together.
pub fn load_dir(dir: &Path) -> Result<PolicySet, PolicyErrors> {
    let mut errors = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| {
        PolicyErrors(vec![PolicyError {
            file: dir.to_owned(),
            line: 1,
            column: 1,
            message: format!("cannot read policy directory: {e}"),
        }])
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let mut set = PolicySet::default();
    let mut hash = Sha256::new();
    for file in files {
        let loaded = read(&file).and_then(|text| {
            hash.update(file.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default());
            hash.update([0]);
            hash.update(text.as_bytes());
            hash.update([0]);
            parse(&file, &text)
        });
        match loaded {
            Err(PolicyErrors(mut e)) => errors.append(&mut e),
            Ok(agent) => {
                if let Some(prev) = set.agents.values().find(|a| a.id == agent.id && a.name != agent.name) {
                    errors.push(PolicyError {
                        file: file.clone(),
                        line: 1,
                        column: 1,
                        message: format!("agent {:?} hashes to the same id as {:?} in {}; rename one", agent.name, prev.name, prev.source.display()),
                    });
                } else if let Some(prev) = set.agents.get(&agent.name) {
                    errors.push(PolicyError {
                        file: file.clone(),
                        line: 1,
                        column: 1,
                        message: format!("agent {:?} is already declared in {}", agent.name, prev.source.display()),
                    });
                } else {
                    set.agents.insert(agent.name.clone(), agent);
                }
            }
        }
    }
    let fallbacks: Vec<_> = set.agents.values().filter(|a| a.fallback).collect();
    if fallbacks.len() > 1 {
        errors.push(PolicyError {
            file: fallbacks[1].source.clone(),
            line: 1,
            column: 1,
            message: format!(
                "more than one fallback agent ({} and {}); keep `fallback = true` in one",
                fallbacks[0].name, fallbacks[1].name
            ),
        });
    }
    set.hash = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if errors.is_empty() { Ok(set) } else { Err(PolicyErrors(errors)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<AgentPolicy, PolicyErrors> {
        parse(Path::new("t.toml"), text)
    }

    #[test]
    fn parses_a_full_policy() {
        let a = p(r#"
[agent]
name = "claude"
fallback = true
[agent.match]
exe = ["/usr/bin/claude"]
comm = ["claude"]
uid = [1000]
[network]
default = "allow"
[[network.rule]]
id = "metadata"
decision = "deny"
cidr = ["169.254.169.254", "fd00:ec2::254/128"]
[[network.rule]]
id = "db"
decision = "approve"
ports = [5432, "6379-6380"]
protocol = "tcp"
rollback = "restore from snapshot"
[files]
default = "audit"
[[files.rule]]
id = "git"
decision = "deny"
paths = ["**/.git/**", "{workspace}/**"]
ops = ["unlink", "rename"]
"#)
        .expect("valid");
        assert_eq!(a.name, "claude");
        assert!(a.fallback);
        assert_eq!(a.net_rules.len(), 2);
        assert_eq!(a.net_rules[0].cidrs[0].to_string(), "169.254.169.254/32");
        assert_eq!(a.net_rules[1].ports, vec![PortRange { first: 5432, last: 5432 }, PortRange { first: 6379, last: 6380 }]);
        assert_eq!(a.file_default, DecisionName::Audit);
        assert_eq!(a.id, agent_id("claude"));
    }

    #[test]
    fn unknown_key_is_located() {
        let e = p("[agent]\nname = \"a\"\ncolour = \"red\"\n").expect_err("must be rejected");
        assert_eq!(e.0.len(), 1);
        assert_eq!((e.0[0].line, e.0[0].column), (3, 1), "{e}");
        assert!(e.0[0].message.contains("unknown field"), "{e}");
    }

    #[test]
    fn bad_cidr_and_port_are_located() {
        let text = "[agent]\nname = \"a\"\n[network]\ndefault = \"deny\"\n[[network.rule]]\nid = \"x\"\ndecision = \"allow\"\ncidr = [\"10.0.0.0/33\"]\nports = [70000]\n";
        let e = p(text).expect_err("must be rejected");
        let lines: Vec<_> = e.0.iter().map(|e| (e.line, e.column)).collect();
        assert_eq!(lines, vec![(8, 9), (9, 10)], "{e}");
        assert!(e.to_string().starts_with("t.toml:8:9: "), "{e}");
    }

    #[test]
    fn bad_decision_and_unresolvable_host() {
        let e = p("[agent]\nname = \"a\"\n[network]\ndefault = \"maybe\"\n").expect_err("must be rejected");
        assert_eq!(e.0[0].line, 4, "{e}");
        let e = p("[agent]\nname = \"a\"\n[network]\ndefault = \"deny\"\n[[network.rule]]\nid = \"h\"\ndecision = \"allow\"\nhosts = [\"no-such-host.invalid\"]\n").expect_err("must be rejected");
        assert_eq!((e.0[0].line, e.0[0].column), (8, 10), "{e}");
    }

    #[test]
    fn agent_ids_are_stable_and_nonzero() {
        assert_eq!(agent_id("claude"), agent_id("claude"));
        assert_ne!(agent_id("claude"), agent_id("codex"));
        assert_ne!(agent_id(""), 0);
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }
}
