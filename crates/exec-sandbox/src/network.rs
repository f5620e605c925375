//! What a caller asks of a VM's network: access (off, an allowlist, or any public destination)
//! and ports forwarded from the host into the guest.
//!
//! Without network and without ports a VM has no NIC at all. With either, its only NIC talks to
//! this process's gateway ([`crate::gateway`]), which enforces everything here.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::Serialize;

/// Host address that forwarded ports bind to. Never anything else.
pub const EXPOSE_HOST: &str = "127.0.0.1";

/// Transport protocol of a forwarded port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    /// TCP (the default).
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

impl fmt::Display for PortProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PortProtocol::Tcp => "tcp",
            PortProtocol::Udp => "udp",
        })
    }
}

/// One port to forward from `127.0.0.1` on the host into the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExposePort {
    /// Port the guest service listens on (1-65535; below 1024 is fine).
    pub internal: u16,
    /// Host port: 1024-65535, or `None` for one chosen by the kernel.
    pub external: Option<u16>,
    /// TCP or UDP.
    pub protocol: PortProtocol,
}

impl ExposePort {
    /// TCP `internal` on a dynamic host port.
    pub fn tcp(internal: u16) -> Self {
        Self {
            internal,
            external: None,
            protocol: PortProtocol::Tcp,
        }
    }

    /// UDP `internal` on a dynamic host port.
    pub fn udp(internal: u16) -> Self {
        Self {
            protocol: PortProtocol::Udp,
            ..Self::tcp(internal)
        }
    }

    /// The same, on host port `external` (0 means dynamic).
    pub fn on_host_port(mut self, external: u16) -> Self {
        self.external = (external != 0).then_some(external);
        self
    }
}

/// `--expose` syntax could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not INTERNAL[:EXTERNAL][/tcp|/udp]: {reason}")]
pub struct ExposeParseError {
    /// The text given.
    pub text: String,
    /// What is wrong with it.
    pub reason: String,
}

impl FromStr for ExposePort {
    type Err = ExposeParseError;

    /// Parses `INTERNAL[:EXTERNAL][/PROTOCOL]`: `8000`, `8000:18000`, `53/udp`, `80:0/tcp`.
    /// Range rules are checked later by validation, with the other inputs.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = |reason: &str| ExposeParseError {
            text: text.to_string(),
            reason: reason.to_string(),
        };
        let (ports, protocol) = match text.split_once('/') {
            None => (text, PortProtocol::Tcp),
            Some((ports, "tcp")) => (ports, PortProtocol::Tcp),
            Some((ports, "udp")) => (ports, PortProtocol::Udp),
            Some(_) => return Err(fail("the protocol must be tcp or udp")),
        };
        let port = |s: &str, what: &str| {
            s.parse::<u16>()
                .map_err(|_| fail(&format!("{what} port `{s}` is not a number 0-65535")))
        };
        let (internal, external) = match ports.split_once(':') {
            None => (port(ports, "internal")?, None),
            Some((i, e)) => (port(i, "internal")?, Some(port(e, "external")?)),
        };
        Ok(ExposePort {
            internal,
            external: external.filter(|&e| e != 0),
            protocol,
        })
    }
}

/// A forwarded port as bound, known before the code runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ExposedPort {
    /// Port in the guest.
    pub internal: u16,
    /// Port on the host.
    pub external: u16,
    /// Host address (always `127.0.0.1`).
    pub host: String,
    /// TCP or UDP.
    pub protocol: PortProtocol,
    /// `http://127.0.0.1:PORT` for TCP, `udp://127.0.0.1:PORT` for UDP.
    pub url: String,
}

impl ExposedPort {
    /// The record for `internal` bound at host port `external`.
    pub fn new(internal: u16, external: u16, protocol: PortProtocol) -> Self {
        let scheme = match protocol {
            PortProtocol::Tcp => "http",
            PortProtocol::Udp => "udp",
        };
        Self {
            internal,
            external,
            host: EXPOSE_HOST.to_string(),
            protocol,
            url: format!("{scheme}://{EXPOSE_HOST}:{external}"),
        }
    }
}

/// Called once with the bound ports, after they are bound and before the code is dispatched.
pub type PortsCallback = Arc<dyn Fn(&[ExposedPort]) + Send + Sync>;

/// The network part of a run or session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NetworkOptions {
    /// Let the guest open connections (through the gateway's policy).
    pub allow_network: bool,
    /// With `allow_network`: only these domains and their subdomains (`Some(vec![])` allows
    /// nothing); `None` allows every public destination. Requires `allow_network`.
    pub allowed_domains: Option<Vec<String>>,
    /// Ports forwarded from the host (at most [`crate::limits::MAX_EXPOSED_PORTS`]).
    pub expose_ports: Vec<ExposePort>,
}

impl NetworkOptions {
    /// Lets the guest open connections, to every public destination unless
    /// [`allowed_domains`](Self::allowed_domains) narrows it.
    pub fn allow_network(mut self) -> Self {
        self.allow_network = true;
        self
    }

    /// Allows only these domains and their subdomains (an empty list allows nothing).
    /// Needs [`allow_network`](Self::allow_network).
    pub fn allowed_domains<S: Into<String>>(
        mut self,
        domains: impl IntoIterator<Item = S>,
    ) -> Self {
        self.allowed_domains = Some(domains.into_iter().map(Into::into).collect());
        self
    }

    /// Forwards a port from `127.0.0.1` on the host into the guest.
    pub fn expose(mut self, port: ExposePort) -> Self {
        self.expose_ports.push(port);
        self
    }

    /// Whether the VM needs a NIC (and a gateway).
    pub fn needs_nic(&self) -> bool {
        self.allow_network || !self.expose_ports.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expose_syntax() {
        assert_eq!("8000".parse(), Ok(ExposePort::tcp(8000)));
        assert_eq!(
            "8000:18000".parse(),
            Ok(ExposePort::tcp(8000).on_host_port(18000))
        );
        assert_eq!("53/udp".parse(), Ok(ExposePort::udp(53)));
        assert_eq!("80:0/tcp".parse(), Ok(ExposePort::tcp(80)));
        for bad in ["", "x", "80:", "80/sctp", "70000", "80:1:2", "-1"] {
            assert!(bad.parse::<ExposePort>().is_err(), "{bad}");
        }
        let err = "80/sctp".parse::<ExposePort>().unwrap_err();
        assert!(err.to_string().contains("tcp or udp"), "{err}");
    }

    #[test]
    fn exposed_port_urls() {
        let p = ExposedPort::new(8000, 41000, PortProtocol::Tcp);
        assert_eq!(p.url, "http://127.0.0.1:41000");
        assert_eq!(
            ExposedPort::new(53, 41001, PortProtocol::Udp).url,
            "udp://127.0.0.1:41001"
        );
    }
}
