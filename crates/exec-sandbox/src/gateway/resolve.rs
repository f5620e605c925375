//! Resolving allowed names on the host.
//!
//! The operator's static entries come first; otherwise an asynchronous resolver (Hickory DNS,
//! configured from the host's `/etc/resolv.conf` and `/etc/hosts`) with a deadline. A lookup is
//! a future on the gateway's runtime, not a blocking thread: guests asking for names under a
//! black-holed zone hold only sockets and timers, never the blocking pool that every VM and
//! `tokio::fs` share. Each gateway (one per VM) has its own resolver and cache, so one VM's
//! lookups tell nothing about another's; lookups in flight per VM are bounded by the verdicts
//! ([`sbx_net::verdict::MAX_LOOKUPS`]). Every IPv4 address found is returned: which
//! of them the gateway may use is decided by [`sbx_net::verdict::usable_addrs`].

use std::net::Ipv4Addr;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{LookupIpStrategy, ResolveHosts, ResolverOpts};

/// Longest a host lookup may take.
pub const RESOLVE_DEADLINE: Duration = Duration::from_secs(5);
/// Answers (and "no such name") kept per gateway.
pub const CACHE_ENTRIES: usize = 256;
/// Longest an answer is kept, whatever its TTL.
pub const MAX_CACHE_TTL: Duration = Duration::from_secs(300);

/// Why the host's resolver gave no answer (a name without addresses is an empty answer, not an
/// error).
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// No answer within [`RESOLVE_DEADLINE`].
    #[error("no answer within {} s", RESOLVE_DEADLINE.as_secs())]
    Timeout,
    /// The host's resolver configuration could not be read.
    #[error("cannot read the host's resolver configuration")]
    Config(#[source] hickory_resolver::ResolveError),
    /// The name servers failed.
    #[error("the host's resolver failed")]
    Resolver(#[source] hickory_resolver::ResolveError),
}

/// One gateway's resolver.
pub struct HostResolver {
    resolver: Result<TokioResolver, hickory_resolver::ResolveError>,
}

/// Sets the options every gateway resolver uses on top of `options`.
fn tune(options: &mut ResolverOpts) {
    // Two tries of 2 s each fit in the deadline.
    options.timeout = Duration::from_secs(2);
    options.attempts = 2;
    options.cache_size = CACHE_ENTRIES;
    options.positive_max_ttl = Some(MAX_CACHE_TTL);
    options.negative_max_ttl = Some(MAX_CACHE_TTL);
    options.ip_strategy = LookupIpStrategy::Ipv4Only;
    options.use_hosts_file = ResolveHosts::Always;
}

impl HostResolver {
    /// A resolver configured like the host's (`/etc/resolv.conf`, `/etc/hosts`); when that
    /// configuration cannot be read, every lookup fails and says why.
    pub fn system() -> HostResolver {
        let resolver = TokioResolver::builder_tokio().map(|mut builder| {
            tune(builder.options_mut());
            builder.build()
        });
        HostResolver { resolver }
    }

    /// A resolver asking only `servers` (UDP), for tests with a loopback name server.
    #[cfg(test)]
    pub fn with_servers(servers: &[std::net::SocketAddr]) -> HostResolver {
        use hickory_resolver::config::{NameServerConfig, ResolverConfig};
        use hickory_resolver::name_server::TokioConnectionProvider;
        use hickory_resolver::proto::xfer::Protocol;

        let group: Vec<NameServerConfig> = servers
            .iter()
            .map(|addr| NameServerConfig::new(*addr, Protocol::Udp))
            .collect();
        let config = ResolverConfig::from_parts(None, Vec::new(), group);
        let mut builder =
            TokioResolver::builder_with_config(config, TokioConnectionProvider::default());
        tune(builder.options_mut());
        HostResolver {
            resolver: Ok(builder.build()),
        }
    }

    /// The IPv4 addresses of `name` (already allowed and normalized): the operator's `hosts`
    /// entries for it if there are any, else the resolver's answer. The name is looked up as
    /// given (fully qualified): the host's search domains never apply.
    pub async fn resolve(
        &self,
        name: &str,
        hosts: &[(String, Ipv4Addr)],
    ) -> Result<Vec<Ipv4Addr>, ResolveError> {
        let fixed: Vec<Ipv4Addr> = hosts
            .iter()
            .filter(|(host, _)| host == name)
            .map(|(_, addr)| *addr)
            .collect();
        if !fixed.is_empty() {
            return Ok(fixed);
        }
        let resolver = match &self.resolver {
            Ok(resolver) => resolver,
            Err(e) => return Err(ResolveError::Config(e.clone())),
        };
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        match tokio::time::timeout(RESOLVE_DEADLINE, resolver.ipv4_lookup(fqdn)).await {
            Err(_) => Err(ResolveError::Timeout),
            Ok(Ok(lookup)) => Ok(lookup.iter().map(|a| a.0).collect()),
            // "No such name" and "no A record" are empty answers.
            Ok(Err(e)) if e.is_nx_domain() || e.is_no_records_found() => Ok(Vec::new()),
            Ok(Err(e)) => Err(ResolveError::Resolver(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use super::*;

    #[tokio::test]
    async fn static_entries_answer_first_then_the_hosts_file() {
        let public = Ipv4Addr::new(203, 0, 113, 80);
        let hosts = vec![
            ("fixture.test".to_string(), Ipv4Addr::LOCALHOST),
            ("fixture.test".to_string(), public),
            ("localhost".to_string(), public),
        ];
        let resolver = HostResolver::system();
        assert_eq!(
            resolver.resolve("fixture.test", &hosts).await.unwrap(),
            vec![Ipv4Addr::LOCALHOST, public]
        );
        // A static entry hides the host's own answer.
        assert_eq!(
            resolver.resolve("localhost", &hosts).await.unwrap(),
            vec![public]
        );
        // `localhost` comes from /etc/hosts, without any traffic; the address is returned (the
        // policy filters it, not the resolver).
        assert!(
            resolver
                .resolve("localhost", &[])
                .await
                .unwrap()
                .contains(&Ipv4Addr::LOCALHOST)
        );
    }

    /// A name server on loopback that counts the queries it gets and sends what `reply` makes
    /// of each (nothing for `None`).
    async fn name_server(reply: fn(&[u8]) -> Option<Vec<u8>>) -> (SocketAddr, Arc<AtomicUsize>) {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let queries = Arc::new(AtomicUsize::new(0));
        let count = queries.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                count.fetch_add(1, Ordering::SeqCst);
                if let Some(answer) = reply(&buf[..n]) {
                    let _ = socket.send_to(&answer, peer).await;
                }
            }
        });
        (addr, queries)
    }

    /// A black-holed zone: no answer, ever.
    async fn black_hole() -> (SocketAddr, Arc<AtomicUsize>) {
        name_server(|_| None).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_black_holed_zone_never_holds_the_blocking_pool() {
        let (server, queries) = black_hole().await;
        let resolver = Arc::new(HostResolver::with_servers(&[server]));
        // Far more lookups than tokio has blocking threads by default in small configurations,
        // all at once: the old getaddrinfo-on-spawn_blocking design would hold one thread each.
        let started = Instant::now();
        let lookups: Vec<_> = (0..200)
            .map(|i| {
                let resolver = resolver.clone();
                tokio::spawn(async move {
                    resolver
                        .resolve(&format!("n{i}.black-hole.test"), &[])
                        .await
                })
            })
            .collect();
        // Meanwhile the blocking pool serves at once.
        let blocking = Instant::now();
        tokio::task::spawn_blocking(|| ()).await.unwrap();
        assert!(
            blocking.elapsed() < Duration::from_secs(1),
            "blocking pool held {:?}",
            blocking.elapsed()
        );
        for lookup in lookups {
            assert!(matches!(
                lookup.await.unwrap(),
                Err(ResolveError::Timeout | ResolveError::Resolver(_))
            ));
        }
        let took = started.elapsed();
        assert!(
            took < RESOLVE_DEADLINE + Duration::from_secs(3),
            "200 lookups took {took:?}"
        );
        assert!(
            queries.load(Ordering::SeqCst) >= 200,
            "the server was asked"
        );
    }

    /// Every A query answered with 203.0.113.7 (TTL 60).
    async fn answering() -> (SocketAddr, Arc<AtomicUsize>) {
        name_server(|query| {
            if query.len() < 12 {
                return None;
            }
            // Header: same id, QR + RD + RA, one question, one answer.
            let mut reply = query[..2].to_vec();
            reply.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]);
            // The question as asked (up to its end: name, type, class).
            let mut at = 12;
            while at < query.len() && query[at] != 0 {
                at += 1 + usize::from(query[at]);
            }
            reply.extend_from_slice(&query[12..(at + 5).min(query.len())]);
            // Answer: pointer to the name, A, IN, TTL 60, 4 bytes.
            reply.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 203, 0, 113, 7]);
            Some(reply)
        })
        .await
    }

    #[tokio::test]
    async fn answers_are_cached() {
        let (server, queries) = answering().await;
        let resolver = HostResolver::with_servers(&[server]);
        let want = vec![Ipv4Addr::new(203, 0, 113, 7)];
        assert_eq!(resolver.resolve("cached.test", &[]).await.unwrap(), want);
        let asked = queries.load(Ordering::SeqCst);
        assert!(asked >= 1);
        for _ in 0..5 {
            assert_eq!(resolver.resolve("cached.test", &[]).await.unwrap(), want);
        }
        assert_eq!(
            queries.load(Ordering::SeqCst),
            asked,
            "served from the cache"
        );
        // Another gateway's resolver has its own cache.
        let other = HostResolver::with_servers(&[server]);
        assert_eq!(other.resolve("cached.test", &[]).await.unwrap(), want);
        assert!(queries.load(Ordering::SeqCst) > asked);
    }
}
