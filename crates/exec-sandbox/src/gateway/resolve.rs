//! Resolving allowed names on the host.
//!
//! The operator's static entries come first; otherwise the host's own resolver (getaddrinfo, on a
//! blocking thread, with a deadline). Only IPv4 addresses the policy lets the gateway connect to
//! are kept.

use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use sbx_net::policy::host_may_connect;

/// Longest a host lookup may take.
pub const RESOLVE_DEADLINE: Duration = Duration::from_secs(5);
/// Most addresses kept per name.
const MAX_ADDRS: usize = 8;

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Addresses the gateway may connect to.
    Found(Vec<Ipv4Addr>),
    /// The name has no address, or only addresses the policy forbids (how many).
    Nothing {
        /// Addresses dropped by policy.
        forbidden: usize,
    },
    /// The resolver failed or did not answer in time.
    Failed(String),
}

/// Keeps the addresses the policy allows.
pub fn filter(addrs: impl IntoIterator<Item = Ipv4Addr>, allow_internal: bool) -> Resolution {
    let mut kept = Vec::new();
    let mut forbidden = 0;
    for addr in addrs {
        if !host_may_connect(addr, allow_internal) {
            forbidden += 1;
        } else if !kept.contains(&addr) && kept.len() < MAX_ADDRS {
            kept.push(addr);
        }
    }
    if kept.is_empty() {
        Resolution::Nothing { forbidden }
    } else {
        Resolution::Found(kept)
    }
}

/// Resolves `name` (already allowed and normalized).
pub async fn resolve(
    name: String,
    hosts: &[(String, Ipv4Addr)],
    allow_internal: bool,
) -> Resolution {
    let fixed: Vec<Ipv4Addr> = hosts
        .iter()
        .filter(|(host, _)| *host == name)
        .map(|(_, addr)| *addr)
        .collect();
    if !fixed.is_empty() {
        return filter(fixed, allow_internal);
    }
    let lookup = tokio::task::spawn_blocking(move || {
        (name.as_str(), 0u16).to_socket_addrs().map(|addrs| {
            addrs
                .filter_map(|a| match a {
                    SocketAddr::V4(v4) => Some(*v4.ip()),
                    SocketAddr::V6(_) => None,
                })
                .collect::<Vec<_>>()
        })
    });
    match tokio::time::timeout(RESOLVE_DEADLINE, lookup).await {
        Err(_) => Resolution::Failed(format!("no answer within {} s", RESOLVE_DEADLINE.as_secs())),
        Ok(Err(join)) => Resolution::Failed(join.to_string()),
        // getaddrinfo reports "no such name" as an error too: that is an empty answer.
        Ok(Ok(Err(e))) if is_no_such_name(&e) => Resolution::Nothing { forbidden: 0 },
        Ok(Ok(Err(e))) => Resolution::Failed(e.to_string()),
        Ok(Ok(Ok(addrs))) => filter(addrs, allow_internal),
    }
}

/// Whether a lookup error means the name has no address (EAI_NONAME, EAI_NODATA), as opposed
/// to a failing resolver. The standard library only exposes getaddrinfo's message.
fn is_no_such_name(e: &std::io::Error) -> bool {
    let text = e.to_string();
    text.contains("not known") || text.contains("No address associated")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_dropped_unless_allowed() {
        let lo = Ipv4Addr::LOCALHOST;
        let public = Ipv4Addr::new(203, 0, 113, 80);
        let metadata = Ipv4Addr::new(169, 254, 169, 254);
        assert_eq!(
            filter([lo, public, metadata, public], false),
            Resolution::Found(vec![public])
        );
        assert_eq!(
            filter([lo, metadata], false),
            Resolution::Nothing { forbidden: 2 }
        );
        assert_eq!(filter([lo], true), Resolution::Found(vec![lo]));
    }

    #[tokio::test]
    async fn static_entries_answer_first_and_are_filtered() {
        let hosts = vec![("fixture.test".to_string(), Ipv4Addr::LOCALHOST)];
        assert_eq!(
            resolve("fixture.test".into(), &hosts, true).await,
            Resolution::Found(vec![Ipv4Addr::LOCALHOST])
        );
        assert_eq!(
            resolve("fixture.test".into(), &hosts, false).await,
            Resolution::Nothing { forbidden: 1 }
        );
        // The host's resolver answers `localhost` from /etc/hosts, without any traffic.
        assert_eq!(
            resolve("localhost".into(), &[], false).await,
            Resolution::Nothing { forbidden: 1 }
        );
    }
}
