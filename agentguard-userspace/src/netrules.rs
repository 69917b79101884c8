//! Network rules → the kernel's per-agent LPM tries. Pure: a policy and the
//! addresses its host names resolved to in, prefix lists out.
//!
//! The kernel does one longest-prefix lookup per connect or send, then walks
//! that prefix's list in order. So each prefix's list holds, in policy order,
//! every rule whose address set contains the prefix (its own rules and those
//! of every enclosing prefix, including address-less rules at /0): the first
//! rule whose port and protocol match is the one the policy file lists first.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use agentguard_common::{limits, Decision, NetRuleEntry, NetRuleList};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::policy::{AgentPolicy, Protocol};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("agent {agent}: {prefix} is covered by {count} rule entries (each port range counts once), more than the kernel's {max} per prefix; merge rules or port ranges")]
pub struct TooManyRules {
    pub agent: String,
    pub prefix: IpNet,
    pub count: usize,
    pub max: usize,
}

/// The tries' content for one agent: prefix → ordered rule list.
pub type Lists = BTreeMap<IpNet, NetRuleList>;

/// Host names a policy mentions, resolved: host → addresses.
pub type Resolved = BTreeMap<String, Vec<IpAddr>>;

/// The address sets of a rule, per family; an address-less rule matches all.
fn rule_nets(rule: &crate::policy::NetRule, resolved: &Resolved) -> Vec<IpNet> {
    let mut nets: Vec<IpNet> = rule.cidrs.clone();
    for h in &rule.hosts {
        for a in resolved.get(h).into_iter().flatten() {
            nets.push(IpNet::from(*a));
        }
    }
    if rule.cidrs.is_empty() && rule.hosts.is_empty() {
        nets.push(IpNet::V4(Ipv4Net::default()));
        nets.push(IpNet::V6(Ipv6Net::default()));
    }
    nets
}

fn entries(rule_id: u32, rule: &crate::policy::NetRule) -> Vec<NetRuleEntry> {
    let protocol = match rule.protocol {
        Protocol::Tcp => libc::IPPROTO_TCP as u32,
        Protocol::Udp => libc::IPPROTO_UDP as u32,
        Protocol::Any => 0,
    };
    let decision = Decision::from(rule.decision) as u32;
    if rule.ports.is_empty() {
        return vec![NetRuleEntry { first_port: 0, last_port: u16::MAX, protocol, decision, rule_id }];
    }
    rule.ports
        .iter()
        .map(|p| NetRuleEntry { first_port: p.first, last_port: p.last, protocol, decision, rule_id })
        .collect()
}

pub fn compile_agent(agent: &AgentPolicy, resolved: &Resolved) -> Result<Lists, TooManyRules> {
    // Each rule's entries, one flat vector: rule i owns entries[spans[i]].
    let mut entries_flat: Vec<NetRuleEntry> = Vec::with_capacity(agent.net_rules.len());
    let mut spans = Vec::with_capacity(agent.net_rules.len());
    // Address set → the rules naming it, in policy order.
    let mut by_net: HashMap<IpNet, Vec<usize>> = HashMap::with_capacity(agent.net_rules.len());
    // The prefix lengths rules name, per family (v4, v6): only those can
    // hold an ancestor of a node.
    let mut lengths: [BTreeSet<u8>; 2] = Default::default();
    for (i, r) in agent.net_rules.iter().enumerate() {
        let id = u32::try_from(i + 1).unwrap_or(u32::MAX);
        let start = entries_flat.len();
        entries_flat.extend(entries(id, r));
        spans.push(start..entries_flat.len());
        for n in rule_nets(r, resolved) {
            let rules = by_net.entry(n.trunc()).or_default();
            if rules.last() != Some(&i) {
                rules.push(i);
            }
            lengths[usize::from(n.addr().is_ipv6())].insert(n.prefix_len());
        }
    }
    let mut nodes: Vec<IpNet> = by_net.keys().copied().collect();
    nodes.sort_unstable();
    let mut out = Vec::with_capacity(nodes.len());
    let mut covering: Vec<usize> = Vec::new();
    for node in nodes {
        // The rules that cover `node` are those naming one of its
        // ancestors (itself included): one lookup per prefix length some
        // rule uses (at most 33, or 129), not a pass over every rule, so
        // 10 000 rules compile in milliseconds.
        covering.clear();
        covering.extend(
            lengths[usize::from(node.addr().is_ipv6())]
                .range(..=node.prefix_len())
                .filter_map(|len| IpNet::new(node.addr(), *len).ok())
                .filter_map(|anc| by_net.get(&anc.trunc()))
                .flatten(),
        );
        covering.sort_unstable();
        covering.dedup();
        let count: usize = covering.iter().map(|i| spans[*i].len()).sum();
        if count > limits::NET_RULES_PER_PREFIX {
            return Err(TooManyRules {
                agent: agent.name.clone(),
                prefix: node,
                count,
                max: limits::NET_RULES_PER_PREFIX,
            });
        }
        let mut list = NetRuleList {
            count: count as u32,
            _pad: 0,
            entries: [NetRuleEntry::default(); limits::NET_RULES_PER_PREFIX],
        };
        let applicable = covering.iter().flat_map(|i| &entries_flat[spans[*i].clone()]);
        for (slot, e) in list.entries.iter_mut().zip(applicable) {
            *slot = *e;
        }
        out.push((node, list));
    }
    // Sorted already: built in one pass, not entry by entry.
    Ok(out.into_iter().collect())
}

/// Resolve every host name the policies mention. A name that does not
/// resolve keeps its previous addresses (or none), and is reported.
pub fn resolve_hosts<'a>(
    hosts: impl Iterator<Item = &'a String>,
    previous: &Resolved,
) -> (Resolved, Vec<String>) {
    use std::net::ToSocketAddrs as _;
    let mut out = Resolved::new();
    let mut problems = Vec::new();
    for h in hosts {
        match (h.as_str(), 0u16).to_socket_addrs() {
            Ok(addrs) => {
                let mut v: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
                v.sort();
                v.dedup();
                out.insert(h.clone(), v);
            }
            Err(e) => {
                problems.push(format!("host {h} does not resolve ({e}); keeping its previous addresses"));
                out.insert(h.clone(), previous.get(h).cloned().unwrap_or_default());
            }
        }
    }
    (out, problems)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::policy::parse;

    fn agent(text: &str) -> AgentPolicy {
        parse(Path::new("t.toml"), text).expect("valid policy")
    }

    #[test]
    fn enclosing_rules_are_copied_in_policy_order() {
        let a = agent(
            "[agent]\nname = \"a\"\n[network]\ndefault = \"allow\"\n\
             [[network.rule]]\nid = \"meta\"\ndecision = \"deny\"\ncidr = [\"169.254.169.254\"]\n\
             [[network.rule]]\nid = \"db\"\ndecision = \"approve\"\nports = [5432]\nprotocol = \"tcp\"\n\
             [[network.rule]]\nid = \"lan\"\ndecision = \"audit\"\ncidr = [\"169.254.0.0/16\"]\n",
        );
        let lists = compile_agent(&a, &Resolved::new()).expect("fits");
        let meta: IpNet = "169.254.169.254/32".parse().expect("net");
        let l = lists[&meta];
        // meta (own), db (address-less, all), lan (encloses it): in policy order.
        assert_eq!(l.count, 3);
        assert_eq!([l.entries[0].rule_id, l.entries[1].rule_id, l.entries[2].rule_id], [1, 2, 3]);
        assert_eq!(l.entries[1].first_port, 5432);
        assert_eq!(l.entries[1].protocol, libc::IPPROTO_TCP as u32);
        let lan: IpNet = "169.254.0.0/16".parse().expect("net");
        assert_eq!(lists[&lan].count, 2, "meta does not apply to the wider /16");
        let all6: IpNet = "::/0".parse().expect("net");
        assert_eq!(lists[&all6].entries[0].rule_id, 2);
    }

    #[test]
    fn hosts_become_host_prefixes() {
        let a = agent(
            "[agent]\nname = \"a\"\n[network]\ndefault = \"deny\"\n\
             [[network.rule]]\nid = \"api\"\ndecision = \"allow\"\nhosts = [\"localhost\"]\nports = [443]\n",
        );
        let mut r = Resolved::new();
        r.insert("localhost".into(), vec!["127.0.0.1".parse().expect("ip")]);
        let lists = compile_agent(&a, &r).expect("fits");
        assert_eq!(lists.len(), 1);
        let (net, l) = lists.iter().next().expect("one");
        assert_eq!(net.to_string(), "127.0.0.1/32");
        assert_eq!((l.entries[0].first_port, l.entries[0].last_port), (443, 443));
    }

    #[test]
    fn too_many_rules_for_a_prefix_is_an_error() {
        let mut text = "[agent]\nname = \"a\"\n[network]\ndefault = \"deny\"\n".to_owned();
        for i in 0..17 {
            text.push_str(&format!("[[network.rule]]\nid = \"r{i}\"\ndecision = \"allow\"\nports = [{}]\n", 1000 + i));
        }
        let e = compile_agent(&agent(&text), &Resolved::new()).expect_err("must be rejected");
        assert_eq!(e.count, 17);
    }
}
