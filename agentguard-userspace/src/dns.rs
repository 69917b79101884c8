//! Host names in network rules, kept current: each name is re-resolved when
//! the DNS answer it came from expires (its TTL), and the kernel's tries are
//! recompiled when the addresses changed. Load and reload resolve through
//! the system resolver (netrules::resolve_hosts); from then on this task
//! follows the TTLs.
//!
//! A name that stops resolving keeps its last addresses (the rule does not
//! silently stop matching) and is retried every [`RETRY`].
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use hickory_resolver::{
    config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig},
    net::runtime::TokioRuntimeProvider,
    TokioResolver,
};
use tokio::time::Instant;

/// Never ask more often than this, whatever the TTL (a TTL of 0 included).
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
/// Ask at least this often, so a long TTL still notices a changed record.
pub const MAX_REFRESH: Duration = Duration::from_secs(300);
/// After a failed lookup.
pub const RETRY: Duration = Duration::from_secs(5);

/// The system's resolver (/etc/resolv.conf, /etc/hosts), or only the given
/// servers.
pub fn resolver(servers: &[SocketAddr]) -> anyhow::Result<TokioResolver> {
    if servers.is_empty() {
        return Ok(TokioResolver::builder_tokio()?.build()?);
    }
    let name_servers = servers
        .iter()
        .map(|s| {
            let mut udp = ConnectionConfig::udp();
            udp.port = s.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = s.port();
            NameServerConfig::new(s.ip(), true, vec![udp, tcp])
        })
        .collect();
    let config = ResolverConfig::from_name_servers(name_servers);
    let mut builder = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
    // Configured servers are the whole truth: /etc/hosts is not consulted.
    builder.options_mut().use_hosts_file = ResolveHosts::Never;
    Ok(builder.build()?)
}

/// One answer: the addresses (sorted, deduplicated) and when to ask again.
pub async fn lookup(resolver: &TokioResolver, host: &str) -> Result<(Vec<IpAddr>, Duration), String> {
    let answer = resolver.lookup_ip(host).await.map_err(|e| e.to_string())?;
    let mut addrs: Vec<IpAddr> = answer.iter().collect();
    addrs.sort();
    addrs.dedup();
    let ttl = answer.valid_until().saturating_duration_since(std::time::Instant::now());
    Ok((addrs, ttl.clamp(MIN_REFRESH, MAX_REFRESH)))
}

/// When each name is due.
#[derive(Default)]
pub struct Schedule {
    due: BTreeMap<String, Instant>,
}

impl Schedule {
    /// The names due now among `hosts` (names no longer in any policy are
    /// forgotten; new ones are due at once).
    pub fn due(&mut self, hosts: &[String], now: Instant) -> Vec<String> {
        self.due.retain(|h, _| hosts.contains(h));
        hosts.iter().filter(|h| self.due.get(*h).is_none_or(|t| *t <= now)).cloned().collect()
    }

    pub fn set(&mut self, host: String, at: Instant) {
        self.due.insert(host, at);
    }

    /// When the next name is due (None: no name is known).
    pub fn next(&self) -> Option<Instant> {
        self.due.values().min().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_names_are_due_at_once_and_dropped_names_forgotten() {
        let now = Instant::now();
        let mut s = Schedule::default();
        let hosts = vec!["a".to_owned(), "b".to_owned()];
        assert_eq!(s.due(&hosts, now), hosts);
        s.set("a".into(), now + Duration::from_secs(10));
        s.set("b".into(), now);
        assert_eq!(s.due(&hosts, now), vec!["b".to_owned()]);
        assert_eq!(s.due(&hosts, now + Duration::from_secs(10)), hosts);
        assert_eq!(s.due(&["b".to_owned()], now), vec!["b".to_owned()]);
        assert!(!s.due.contains_key("a"));
    }
}
