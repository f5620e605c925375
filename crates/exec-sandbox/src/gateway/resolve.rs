//! Resolving allowed names on the host.
//!
//! The operator's static entries come first; otherwise the host's own resolver (getaddrinfo, on a
//! blocking thread, with a deadline). Every IPv4 address found is returned: which of them the
//! gateway may use is decided by [`sbx_net::verdict::usable_addrs`].

use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// Longest a host lookup may take.
pub const RESOLVE_DEADLINE: Duration = Duration::from_secs(5);

/// Why the host's resolver gave no answer (a name without addresses is an empty answer, not an
/// error).
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// No answer within [`RESOLVE_DEADLINE`].
    #[error("no answer within {} s", RESOLVE_DEADLINE.as_secs())]
    Timeout,
    /// The blocking lookup task died.
    #[error("the lookup task failed")]
    Task(#[source] tokio::task::JoinError),
    /// getaddrinfo failed.
    #[error("the host's resolver failed")]
    Resolver(#[source] std::io::Error),
}

/// The IPv4 addresses of `name` (already allowed and normalized): the operator's `hosts`
/// entries for it if there are any, else the host resolver's answer.
pub async fn resolve(
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
    let name = name.to_owned();
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
        Err(_) => Err(ResolveError::Timeout),
        Ok(Err(join)) => Err(ResolveError::Task(join)),
        // getaddrinfo reports "no such name" as an error too: that is an empty answer.
        Ok(Ok(Err(e))) if is_no_such_name(&e) => Ok(Vec::new()),
        Ok(Ok(Err(e))) => Err(ResolveError::Resolver(e)),
        Ok(Ok(Ok(addrs))) => Ok(addrs),
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

    #[tokio::test]
    async fn static_entries_answer_first() {
        let public = Ipv4Addr::new(203, 0, 113, 80);
        let hosts = vec![
            ("fixture.test".to_string(), Ipv4Addr::LOCALHOST),
            ("fixture.test".to_string(), public),
            ("localhost".to_string(), public),
        ];
        assert_eq!(
            resolve("fixture.test", &hosts).await.unwrap(),
            vec![Ipv4Addr::LOCALHOST, public]
        );
        // A static entry hides the host's own answer.
        assert_eq!(resolve("localhost", &hosts).await.unwrap(), vec![public]);
        // The host's resolver answers `localhost` from /etc/hosts, without any traffic; the
        // address is returned (the policy filters it, not the resolver).
        assert!(
            resolve("localhost", &[])
                .await
                .unwrap()
                .contains(&Ipv4Addr::LOCALHOST)
        );
    }
}
