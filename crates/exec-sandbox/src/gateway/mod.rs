//! The host-side gateway: the only thing a networked VM's NIC talks to.
//!
//! QEMU's NIC backend is one end of a unix stream socket pair (`-netdev socket,fd=N`: each
//! Ethernet frame is prefixed by its length, 4 bytes big endian); the other end feeds a
//! user-space TCP/IP stack ([smoltcp]) in this process. No packet from the guest reaches the
//! host's kernel network stack; the gateway opens *new* host connections on the guest's behalf
//! when, and only when, the VM's policy allows them:
//!
//! - DNS (UDP to the gateway, port 53): names the allowlist permits are resolved on the host and
//!   answered with a *virtual* address bound to that name ([`sbx_net::policy::NameTable`]);
//!   every other name gets NXDOMAIN. DNS to any other server gets an ICMP port unreachable.
//! - TCP: a SYN to a virtual address is accepted; the first bytes the client sends must present
//!   the name that address was bound to (TLS SNI or HTTP `Host`), and only then is the host
//!   connection opened, to the name's real address and the same port. Anything else (a raw IP
//!   under an allowlist, another name, no name within 10 s) is reset. Without an allowlist
//!   ([`Allowlist::Any`]) names are not checked and public raw IPs are allowed too.
//! - Host-internal destinations (loopback, private, link-local, metadata, cloud control planes
//!   such as Azure's 168.63.129.16, and every address of the host's own interfaces, read at
//!   run time by `host_addrs`) are never connected to unless the operator allows them
//!   ([`GatewayConfig::allow_internal`]).
//! - Other UDP: port unreachable. Forwarded ports: the gateway listens on `127.0.0.1` and
//!   opens connections (or relays datagrams) into the guest.
//!
//! Every decision above is a pure function in [`sbx_net::verdict`], table-tested there; this
//! module only carries bytes and applies the verdicts. Module layout: `device` moves frames
//! between QEMU and the stack, `stack` is the event loop (smoltcp, sockets, DNS replies, the
//! verdicts applied), `relay` pumps one host connection, `resolve` asks the host's resolver.

mod device;
#[cfg(test)]
mod frame_tests;
mod host_addrs;
mod relay;
mod resolve;
mod stack;

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use sbx_net::policy::Allowlist;

use crate::error_kind::ErrorKind;
use crate::network::{EXPOSE_HOST, ExposePort, ExposedPort, PortProtocol};

/// What one VM's gateway enforces.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Whether the guest may open connections at all (false: ports only).
    pub outbound: bool,
    /// Which names (and, with [`Allowlist::Any`], raw public addresses) the guest may reach.
    pub allowlist: Allowlist,
    /// Allow host-internal destinations (operator switch).
    pub allow_internal: bool,
    /// Static names answered before the host's resolver.
    pub hosts: Vec<(String, Ipv4Addr)>,
    /// Ports to forward into the guest.
    pub expose: Vec<ExposePort>,
}

impl GatewayConfig {
    /// A gateway that allows nothing and forwards nothing (for template VMs).
    pub fn closed() -> Self {
        Self {
            outbound: false,
            allowlist: Allowlist::Only(Vec::new()),
            allow_internal: false,
            hosts: Vec::new(),
            expose: Vec::new(),
        }
    }
}

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A host port to forward is taken (or not permitted).
    #[error("cannot bind {EXPOSE_HOST}:{port}/{protocol} for guest port {internal}")]
    Bind {
        /// The host port asked for.
        port: u16,
        /// Guest port it was for.
        internal: u16,
        /// TCP or UDP.
        protocol: PortProtocol,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// The socket pair for QEMU could not be created.
    #[error("cannot create the NIC socket pair")]
    SocketPair(#[source] std::io::Error),
}

impl GatewayError {
    /// The stable kind: a taken port asked for by number is the caller's to fix.
    pub fn kind(&self) -> ErrorKind {
        match self {
            GatewayError::Bind { source, .. } if source.kind() == std::io::ErrorKind::AddrInUse => {
                ErrorKind::InvalidInput
            }
            _ => ErrorKind::Transient,
        }
    }
}

/// Most distinct refusals kept between two [`Refusals::take`] calls.
const MAX_REFUSALS: usize = 50;

/// What the gateway refused (DNS names, connections, datagrams), kept for the caller so a
/// program that failed to reach something says why. Distinct entries only, at most
/// 50, then a count of the rest. Every refusal is also logged (`info`,
/// target `sbx::network`).
#[derive(Debug, Clone, Default)]
pub struct Refusals(Arc<Mutex<RefusalLog>>);

#[derive(Debug, Default)]
struct RefusalLog {
    entries: Vec<String>,
    more: usize,
}

impl Refusals {
    /// Records one refusal.
    pub(crate) fn record(&self, refusal: impl std::fmt::Display) {
        let text = refusal.to_string();
        tracing::info!(target: "sbx::network", "refused: {text}");
        let Ok(mut log) = self.0.lock() else { return };
        if log.entries.contains(&text) {
            return;
        }
        if log.entries.len() < MAX_REFUSALS {
            log.entries.push(text);
        } else {
            log.more += 1;
        }
    }

    /// The refusals since the last call.
    pub fn take(&self) -> Vec<String> {
        let Ok(mut log) = self.0.lock() else {
            return Vec::new();
        };
        let mut entries = std::mem::take(&mut log.entries);
        if log.more > 0 {
            entries.push(format!("... and {} more", log.more));
            log.more = 0;
        }
        entries
    }
}

/// `error` and its sources on one line (`a: b: c`), for refusal texts and logs.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Host sockets of the forwarded ports, bound before the VM boots.
enum HostSocket {
    Tcp(std::net::TcpListener),
    Udp(std::net::UdpSocket),
}

/// A running gateway. Dropping it stops everything it runs: the stack, every relayed
/// connection, the forwarded ports' listeners.
pub struct Gateway {
    exposed: Vec<ExposedPort>,
    outbound: bool,
    refusals: Refusals,
    qemu_end: Option<OwnedFd>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("exposed", &self.exposed)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Binds the forwarded ports and starts the stack. Must be called inside a tokio runtime.
    pub fn start(config: GatewayConfig) -> Result<Gateway, GatewayError> {
        let mut exposed = Vec::with_capacity(config.expose.len());
        let mut host_sockets = Vec::with_capacity(config.expose.len());
        for port in &config.expose {
            let addr = SocketAddr::from((
                EXPOSE_HOST.parse::<Ipv4Addr>().expect("a valid address"),
                port.external.unwrap_or(0),
            ));
            let bind_error = |source| GatewayError::Bind {
                port: port.external.unwrap_or(0),
                internal: port.internal,
                protocol: port.protocol,
                source,
            };
            let (socket, local) = match port.protocol {
                PortProtocol::Tcp => {
                    let listener = std::net::TcpListener::bind(addr).map_err(bind_error)?;
                    listener.set_nonblocking(true).map_err(bind_error)?;
                    let local = listener.local_addr().map_err(bind_error)?;
                    (HostSocket::Tcp(listener), local)
                }
                PortProtocol::Udp => {
                    let socket = std::net::UdpSocket::bind(addr).map_err(bind_error)?;
                    socket.set_nonblocking(true).map_err(bind_error)?;
                    let local = socket.local_addr().map_err(bind_error)?;
                    (HostSocket::Udp(socket), local)
                }
            };
            exposed.push(ExposedPort::new(port.internal, local.port(), port.protocol));
            host_sockets.push(socket);
        }
        let (ours, qemu_end) =
            std::os::unix::net::UnixStream::pair().map_err(GatewayError::SocketPair)?;
        ours.set_nonblocking(true)
            .map_err(GatewayError::SocketPair)?;
        let ours = tokio::net::UnixStream::from_std(ours).map_err(GatewayError::SocketPair)?;
        let refusals = Refusals::default();
        let outbound = config.outbound;
        let task = tokio::spawn(stack::run(config, ours, host_sockets, refusals.clone()));
        Ok(Gateway {
            exposed,
            outbound,
            refusals,
            qemu_end: Some(qemu_end.into()),
            task,
        })
    }

    /// The forwarded ports as bound.
    pub fn exposed_ports(&self) -> &[ExposedPort] {
        &self.exposed
    }

    /// Whether the guest may open connections (not only accept forwarded ones).
    pub fn outbound(&self) -> bool {
        self.outbound
    }

    /// What the gateway refused since the last call.
    pub fn take_refusals(&self) -> Vec<String> {
        self.refusals.take()
    }

    /// QEMU's end of the NIC socket pair (once).
    pub fn take_qemu_end(&mut self) -> Option<OwnedFd> {
        self.qemu_end.take()
    }

    /// A duplicate of QEMU's end, for an attempt that may fail (a snapshot restore): the
    /// original stays for the next attempt.
    pub fn qemu_end_copy(&self) -> Option<OwnedFd> {
        self.qemu_end.as_ref().and_then(|fd| fd.try_clone().ok())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_distinct_bounded_and_taken_once() {
        let refusals = Refusals::default();
        refusals.record("DNS a.test: not in the allowlist");
        refusals.record("DNS a.test: not in the allowlist");
        for i in 0..MAX_REFUSALS + 3 {
            refusals.record(format!("TCP 198.18.0.{i}:80: refused"));
        }
        let taken = refusals.take();
        assert_eq!(taken.len(), MAX_REFUSALS + 1);
        assert_eq!(taken[0], "DNS a.test: not in the allowlist");
        assert_eq!(taken.last().unwrap(), "... and 4 more");
        assert!(refusals.take().is_empty());
    }

    #[test]
    fn gateway_buffers_fit_what_admission_charges() {
        // The real sockets' buffers are what the bound assumes.
        let socket = stack::tests::tcp_socket_for_test();
        let socket_bytes = socket.recv_capacity() + socket.send_capacity();
        assert!(
            socket_bytes + relay::TO_HOST_CHUNKS * relay::CHUNK + relay::CREDIT
                <= stack::CONNECTION_BYTES,
            "{socket_bytes}"
        );
        // `MAX_BYTES` within `GATEWAY_MEMORY_MB` is checked at build time (stack.rs).
        let vm = crate::admission::Cost::vm(256, 1, crate::vm::accel::Accelerator::Tcg);
        assert_eq!(
            vm.with_gateway().memory_mb,
            vm.memory_mb + crate::limits::GATEWAY_MEMORY_MB
        );
    }
}
