//! The gateway's decisions on a guest's traffic: which TCP connections it accepts and where they
//! lead, how it answers each DNS query, which datagrams it serves, and whether the name a
//! connection presents opens it.
//!
//! Every decision is a pure function of plain data (the VM's [`Policy`], its [`NameTable`], the
//! addresses and bytes the guest sent, counters and elapsed time) returning a typed verdict. The
//! gateway in `exec-sandbox` only carries bytes and applies them. A refusal carries a
//! [`Refusal`], whose text is what users see (`network_refusals`), for example
//! `DNS other.test: not in the allowlist`.
//!
//! ```
//! use std::net::{Ipv4Addr, SocketAddrV4};
//! use sbx_net::policy::{Allowlist, NameTable};
//! use sbx_net::verdict::{Policy, TcpVerdict, tcp_syn};
//!
//! let policy = Policy {
//!     outbound: true,
//!     allowlist: Allowlist::Only(vec!["example.com".into()]),
//!     allow_internal: false,
//!     host_addrs: Default::default(),
//! };
//! let verdict = tcp_syn(&policy, &NameTable::new(), SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 80), 443), 0);
//! let TcpVerdict::Refuse(refusal) = verdict else { panic!("a raw IP under an allowlist") };
//! assert_eq!(
//!     refusal.to_string(),
//!     "TCP 203.0.113.80:443: connections to IP addresses are refused; connect by an allowed name"
//! );
//! ```

use std::net::{Ipv4Addr, SocketAddrV4};
use std::ops::Range;
use std::time::Duration;

use sbx_protocol::net::GATEWAY_IPV4;

use crate::dns::{self, DnsError, Query, Rcode};
use crate::framing::{FramingStop, RequestFramer};
use crate::policy::{
    AddressClass, Allowlist, Binding, HostAddrs, NameTable, classify, host_may_connect, same_name,
};
use crate::sniff::{MAX_SNIFF_BYTES, Presented, Unnamed, sniff};

/// The gateway's address on the guest's link (10.0.2.2): its DNS server and default route.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(
    GATEWAY_IPV4[0],
    GATEWAY_IPV4[1],
    GATEWAY_IPV4[2],
    GATEWAY_IPV4[3],
);
/// The port the gateway answers DNS on.
pub const DNS_PORT: u16 = 53;
/// Connections one VM may have open through the gateway at once (both directions).
pub const MAX_CONNECTIONS: usize = 128;
/// Host lookups one VM may have in flight.
pub const MAX_LOOKUPS: usize = 16;
/// Longest a connection may take to present its name.
pub const SNIFF_DEADLINE: Duration = Duration::from_secs(10);
/// TTL of DNS answers (the virtual address of a name never changes during a VM's life).
pub const DNS_TTL: u32 = 300;
/// Most real addresses kept per name.
pub const MAX_ADDRS_PER_NAME: usize = 8;

/// What one VM may reach: the gateway's configuration, as plain data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Whether the guest may open connections and resolve names at all (false: forwarded
    /// ports only).
    pub outbound: bool,
    /// Which names (and, with [`Allowlist::Any`], which public addresses) the guest may reach.
    pub allowlist: Allowlist,
    /// Whether host-internal destinations (loopback, private, link-local, cloud control
    /// planes, the host's own addresses) may be connected to (operator switch).
    pub allow_internal: bool,
    /// The host's own interface addresses, kept current by the gateway's owner.
    pub host_addrs: HostAddrs,
}

/// Where a guest connection goes, as users see it in a refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// An address the guest dialed itself.
    Addr(SocketAddrV4),
    /// The name bound to the virtual address the guest dialed, and the port.
    Name {
        /// The bound name.
        name: String,
        /// The port dialed.
        port: u16,
    },
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Addr(addr) => write!(f, "{addr}"),
            Destination::Name { name, port } => write!(f, "{name}:{port}"),
        }
    }
}

/// One thing the gateway refused, as reported to the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A DNS query answered with an error.
    #[error("DNS {}: {reason}", shown_name(.name))]
    Dns {
        /// The name asked for (empty: the root).
        name: String,
        /// Why.
        reason: DnsRefusal,
    },
    /// A TCP connection reset.
    #[error("TCP {dest}: {reason}")]
    Tcp {
        /// Where it was going.
        dest: Destination,
        /// Why.
        reason: TcpRefusal,
    },
    /// A datagram answered with ICMP port unreachable.
    #[error("UDP {dst}: only DNS to the gateway ({GATEWAY}:{DNS_PORT})")]
    Udp {
        /// Where it was going.
        dst: SocketAddrV4,
    },
}

/// `name`, or `.` for the root.
fn shown_name(name: &str) -> &str {
    if name.is_empty() { "." } else { name }
}

/// Why a DNS query was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DnsRefusal {
    /// The VM has forwarded ports but no network access.
    #[error("the VM has no network access (forwarded ports only)")]
    NoOutbound,
    /// The allowlist does not permit the name.
    #[error("not in the allowlist")]
    NotAllowed,
    /// Every address the host found is one the gateway may not connect to.
    #[error("resolves only to host-internal addresses")]
    OnlyInternal,
}

/// Why a TCP connection was reset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TcpRefusal {
    /// The VM has forwarded ports but no network access.
    #[error("the VM has no network access (forwarded ports only)")]
    NoOutbound,
    /// The gateway's own address (it serves only DNS).
    #[error("no TCP service on the gateway")]
    Gateway,
    /// A virtual address no DNS answer gave out.
    #[error("the address was never given in a DNS answer")]
    UnknownVirtual,
    /// Loopback, private or link-local, without the operator's switch.
    #[error("a host-internal address")]
    Internal,
    /// A cloud control plane's address, without the operator's switch.
    #[error("a cloud control-plane address")]
    ControlPlane,
    /// An address of the host's own interfaces, without the operator's switch.
    #[error("an address of the host itself")]
    HostAddress,
    /// An address that is never a destination (0/8, multicast, reserved, broadcast).
    #[error("an unroutable address")]
    Unroutable,
    /// A raw address under an allowlist.
    #[error("connections to IP addresses are refused; connect by an allowed name")]
    RawAddress,
    /// [`MAX_CONNECTIONS`] connections are open already.
    #[error("{MAX_CONNECTIONS} connections are open")]
    TooManyConnections,
    /// No name within [`SNIFF_DEADLINE`].
    #[error(
        "no TLS server name or HTTP Host within {} s or {MAX_SNIFF_BYTES} bytes",
        SNIFF_DEADLINE.as_secs()
    )]
    NoNameInTime,
    /// The client stopped sending before it presented a name.
    #[error("the client closed the connection before presenting a name")]
    ClosedUnnamed,
    /// The first bytes present no name.
    #[error("no name presented ({0})")]
    Unnamed(Unnamed),
    /// The client presented another name than the one the address was bound to.
    #[error("the client named \"{presented}\" on an address resolved for \"{bound}\"")]
    OtherName {
        /// The name in the SNI or `Host`.
        presented: String,
        /// The name the virtual address is bound to.
        bound: String,
    },
    /// A later request on a plain-HTTP connection named another host, or could not be framed.
    #[error("{0}")]
    LaterRequest(FramingStop),
    /// The client presented the bound name, but the allowlist does not permit it.
    #[error("the client named \"{0}\", which is not in the allowlist")]
    NotAllowed(String),
}

/// What to do with a guest's TCP SYN for a new flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcpVerdict {
    /// Accept, and connect to the binding's addresses (same port) only once the client has
    /// presented the bound name: see [`sniffed`].
    Sniff {
        /// What the virtual address is bound to.
        binding: Binding,
        /// The port dialed.
        port: u16,
    },
    /// Accept and connect at once to the first of `addrs` that answers, at the port dialed.
    Connect {
        /// Where the connection goes, for logs and later refusals.
        dest: Destination,
        /// The host addresses to try, in order.
        addrs: Vec<Ipv4Addr>,
    },
    /// No socket: the stack answers with a reset.
    Refuse(Refusal),
}

/// Decides a guest SYN to `dst`, with `open_connections` already open.
///
/// In order: no outbound access refuses everything; the gateway's own address has no TCP
/// service; a virtual address must have been given in a DNS answer, and leads to its name
/// (sniffed under an allowlist, connected at once without one); a raw address is refused
/// under an allowlist, and otherwise must be one the gateway may connect to. An accepted
/// connection beyond [`MAX_CONNECTIONS`] is refused.
pub fn tcp_syn(
    policy: &Policy,
    names: &NameTable,
    dst: SocketAddrV4,
    open_connections: usize,
) -> TcpVerdict {
    let refuse = |reason| {
        TcpVerdict::Refuse(Refusal::Tcp {
            dest: Destination::Addr(dst),
            reason,
        })
    };
    match accept(policy, names, dst) {
        Err(reason) => refuse(reason),
        Ok(_) if open_connections >= MAX_CONNECTIONS => refuse(TcpRefusal::TooManyConnections),
        Ok(accepted) => accepted,
    }
}

/// The policy part of [`tcp_syn`]: where a connection to `dst` goes, or why it may not.
fn accept(policy: &Policy, names: &NameTable, dst: SocketAddrV4) -> Result<TcpVerdict, TcpRefusal> {
    let (addr, port) = (*dst.ip(), dst.port());
    if !policy.outbound {
        return Err(TcpRefusal::NoOutbound);
    }
    if addr == GATEWAY {
        return Err(TcpRefusal::Gateway);
    }
    if NameTable::is_virtual(addr) {
        let binding = names.lookup(addr).ok_or(TcpRefusal::UnknownVirtual)?;
        return Ok(match policy.allowlist {
            Allowlist::Only(_) => TcpVerdict::Sniff {
                binding: binding.clone(),
                port,
            },
            Allowlist::Any => TcpVerdict::Connect {
                dest: Destination::Name {
                    name: binding.name.clone(),
                    port,
                },
                addrs: binding.addrs.clone(),
            },
        });
    }
    if let Allowlist::Only(_) = policy.allowlist {
        return Err(TcpRefusal::RawAddress);
    }
    connectable(addr, policy.allow_internal, &policy.host_addrs)?;
    Ok(TcpVerdict::Connect {
        dest: Destination::Addr(dst),
        addrs: vec![addr],
    })
}

/// Whether the gateway may connect to the host address `addr` ([`host_may_connect`]), and if
/// not, why.
fn connectable(addr: Ipv4Addr, allow_internal: bool, host: &HostAddrs) -> Result<(), TcpRefusal> {
    if host_may_connect(addr, allow_internal, host) {
        return Ok(());
    }
    Err(match classify(addr) {
        AddressClass::Unroutable => TcpRefusal::Unroutable,
        AddressClass::ControlPlane => TcpRefusal::ControlPlane,
        AddressClass::Public => TcpRefusal::HostAddress,
        AddressClass::Loopback | AddressClass::Private | AddressClass::LinkLocal => {
            TcpRefusal::Internal
        }
    })
}

/// Whether a host client on a forwarded port may be connected into the guest, with
/// `open_connections` already open (refused silently: the host client sees its connection
/// closed).
pub fn forwarded_connection(open_connections: usize) -> bool {
    open_connections < MAX_CONNECTIONS
}

/// How far a sniffed connection got presenting its name.
#[derive(Debug, Clone, Copy)]
pub struct SniffProgress<'a> {
    /// The bytes the client sent so far (the gateway reads at most [`MAX_SNIFF_BYTES`]).
    pub bytes: &'a [u8],
    /// Time since the connection was accepted.
    pub elapsed: Duration,
    /// Whether more bytes may still come (the client has not sent FIN, or the handshake is not
    /// complete yet).
    pub client_open: bool,
}

/// What to do with a connection that is presenting its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SniffVerdict {
    /// Not decided: read more.
    Wait,
    /// The bound name: connect to the binding's addresses and replay the bytes read, through
    /// `framer` when the connection is plain HTTP (every later request's `Host` is checked).
    Connect {
        /// For plain HTTP: the framer the bytes read, and every later byte, go through.
        framer: Option<RequestFramer>,
    },
    /// Reset the connection.
    Refuse(Refusal),
}

/// Decides a connection to the virtual address bound to `binding` (at `port`) from its first
/// bytes: the TLS server name or HTTP `Host` must equal the bound name (case-insensitive,
/// trailing dot ignored) and be allowed; no name within [`SNIFF_DEADLINE`] or
/// [`MAX_SNIFF_BYTES`] is refused.
pub fn sniffed(
    policy: &Policy,
    binding: &Binding,
    port: u16,
    progress: SniffProgress<'_>,
) -> SniffVerdict {
    let refuse = |reason| {
        SniffVerdict::Refuse(Refusal::Tcp {
            dest: Destination::Name {
                name: binding.name.clone(),
                port,
            },
            reason,
        })
    };
    let in_time = progress.elapsed < SNIFF_DEADLINE;
    let named = |name: String, http: bool| {
        if !same_name(&name, &binding.name) {
            refuse(TcpRefusal::OtherName {
                presented: name,
                bound: binding.name.clone(),
            })
        } else if !policy.allowlist.permits(&name) {
            refuse(TcpRefusal::NotAllowed(name))
        } else {
            SniffVerdict::Connect {
                framer: http.then(|| RequestFramer::new(&binding.name)),
            }
        }
    };
    match sniff(progress.bytes) {
        Presented::NeedMore
            if progress.bytes.len() < MAX_SNIFF_BYTES && in_time && progress.client_open =>
        {
            SniffVerdict::Wait
        }
        Presented::NeedMore if in_time && !progress.client_open => {
            refuse(TcpRefusal::ClosedUnnamed)
        }
        Presented::NeedMore => refuse(TcpRefusal::NoNameInTime),
        Presented::Unnamed(why) => refuse(TcpRefusal::Unnamed(why)),
        Presented::Tls(name) => named(name, false),
        Presented::Http(name) => named(name, true),
    }
}

/// The refusal for a plain-HTTP connection to `binding` (at `port`) whose framer stopped.
pub fn later_request(binding: &str, port: u16, stop: FramingStop) -> Refusal {
    Refusal::Tcp {
        dest: Destination::Name {
            name: binding.to_string(),
            port,
        },
        reason: TcpRefusal::LaterRequest(stop),
    }
}

/// How the gateway answers a DNS query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsAnswer {
    /// NOERROR with one A record: the name's virtual address.
    Addr(Ipv4Addr),
    /// NOERROR without records ("no data"): the name is allowed, but not this type.
    NoData,
    /// This response code, without records.
    Error(Rcode),
}

/// A decided answer to a query, with the refusal to report if the policy refused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answered {
    /// The query answered.
    pub query: Query,
    /// The answer.
    pub answer: DnsAnswer,
    /// Why the policy refused the query, when it did (a failing or saturated resolver is not
    /// a refusal).
    pub refusal: Option<Refusal>,
}

impl Answered {
    /// The answer packet.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self.answer {
            DnsAnswer::Addr(addr) => dns::answer_a(&self.query, &[addr], DNS_TTL),
            DnsAnswer::NoData => dns::answer_a(&self.query, &[], DNS_TTL),
            DnsAnswer::Error(rcode) => dns::answer_error(&self.query, rcode),
        }
    }
}

/// What to do with a DNS packet the guest sent to the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsVerdict {
    /// Not a query the gateway answers: FORMERR when the packet has a header to answer to
    /// (`id`), otherwise nothing.
    Malformed {
        /// The transaction id, if the packet has a header.
        id: Option<u16>,
        /// What is wrong, for logs.
        error: DnsError,
    },
    /// Answer at once.
    Answer(Answered),
    /// An allowed A query: look the name up on the host, then answer with [`dns_resolved`].
    Lookup(Query),
}

impl DnsVerdict {
    /// The packet to send back at once, if any.
    pub fn reply(&self) -> Option<Vec<u8>> {
        match self {
            DnsVerdict::Malformed { id, .. } => id.map(dns::answer_formerr),
            DnsVerdict::Answer(answered) => Some(answered.to_bytes()),
            DnsVerdict::Lookup(_) => None,
        }
    }
}

/// Decides a DNS packet sent to the gateway's port 53, with `lookups_in_flight` host lookups
/// running.
///
/// Without outbound access every query is REFUSED; a class other than IN is NOTIMP; a name
/// the allowlist does not permit is NXDOMAIN, without any host lookup; with
/// [`MAX_LOOKUPS`] lookups in flight, SERVFAIL; an allowed name of a type other than A gets
/// "no data" (IPv4 is all the guest has, and resolvers go on to the A answer); an allowed A
/// query is looked up.
pub fn dns_query(policy: &Policy, packet: &[u8], lookups_in_flight: usize) -> DnsVerdict {
    let query = match dns::parse_query(packet) {
        Ok(query) => query,
        Err(error) => {
            return DnsVerdict::Malformed {
                id: dns::query_id(packet),
                error,
            };
        }
    };
    let (answer, refusal) = if !policy.outbound {
        (Rcode::Refused, Some(DnsRefusal::NoOutbound))
    } else if query.qclass != dns::CLASS_IN {
        (Rcode::NotImp, None)
    } else if !policy.allowlist.permits(&query.name) {
        (Rcode::NxDomain, Some(DnsRefusal::NotAllowed))
    } else if lookups_in_flight >= MAX_LOOKUPS {
        (Rcode::ServFail, None)
    } else if query.qtype != dns::TYPE_A {
        return DnsVerdict::Answer(Answered {
            query,
            answer: DnsAnswer::NoData,
            refusal: None,
        });
    } else {
        return DnsVerdict::Lookup(query);
    };
    DnsVerdict::Answer(Answered {
        refusal: refusal.map(|reason| Refusal::Dns {
            name: query.name.clone(),
            reason,
        }),
        answer: DnsAnswer::Error(answer),
        query,
    })
}

/// What a host lookup of an allowed name found, after the policy's filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Addresses the gateway may connect to (at most [`MAX_ADDRS_PER_NAME`], no duplicates).
    Found(Vec<Ipv4Addr>),
    /// No address the gateway may connect to; `forbidden` were dropped by the policy.
    Nothing {
        /// Addresses found but dropped.
        forbidden: usize,
    },
    /// The host's resolver failed or did not answer in time.
    Failed,
}

/// Keeps the addresses of a host lookup the gateway may connect to (public, or host-internal
/// with `allow_internal`; never unroutable), in order, without duplicates, at most
/// [`MAX_ADDRS_PER_NAME`].
pub fn usable_addrs(addrs: impl IntoIterator<Item = Ipv4Addr>, policy: &Policy) -> Lookup {
    let mut kept = Vec::new();
    let mut forbidden = 0;
    for addr in addrs {
        if connectable(addr, policy.allow_internal, &policy.host_addrs).is_err() {
            forbidden += 1;
        } else if !kept.contains(&addr) && kept.len() < MAX_ADDRS_PER_NAME {
            kept.push(addr);
        }
    }
    if kept.is_empty() {
        Lookup::Nothing { forbidden }
    } else {
        Lookup::Found(kept)
    }
}

/// Answers an allowed A query once its lookup finished: found addresses are bound to the name
/// in `names` and the name's virtual address is the answer (SERVFAIL when the table is full);
/// nothing usable is NXDOMAIN (a refusal when the policy dropped addresses); a failed lookup
/// is SERVFAIL.
pub fn dns_resolved(query: Query, lookup: &Lookup, names: &mut NameTable) -> Answered {
    let (answer, refusal) = match lookup {
        Lookup::Found(addrs) => match names.bind(&query.name, addrs.clone()) {
            Some(virtual_addr) => (DnsAnswer::Addr(virtual_addr), None),
            None => (DnsAnswer::Error(Rcode::ServFail), None),
        },
        Lookup::Nothing { forbidden } if *forbidden > 0 => (
            DnsAnswer::Error(Rcode::NxDomain),
            Some(DnsRefusal::OnlyInternal),
        ),
        Lookup::Nothing { .. } => (DnsAnswer::Error(Rcode::NxDomain), None),
        Lookup::Failed => (DnsAnswer::Error(Rcode::ServFail), None),
    };
    Answered {
        refusal: refusal.map(|reason| Refusal::Dns {
            name: query.name.clone(),
            reason,
        }),
        answer,
        query,
    }
}

/// What the gateway does with a guest datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UdpVerdict {
    /// A DNS query to the gateway: [`dns_query`].
    Dns,
    /// A reply on a forwarded UDP port: relayed to the port's host peer.
    Forwarded,
    /// Nothing listens: the stack answers ICMP port unreachable.
    Refuse(Refusal),
}

/// Decides a guest datagram to `dst`; `forwarded` are the gateway ports of the forwarded UDP
/// ports (the guest's services answer to them).
pub fn udp_datagram(dst: SocketAddrV4, forwarded: Range<u16>) -> UdpVerdict {
    if *dst.ip() != GATEWAY {
        UdpVerdict::Refuse(Refusal::Udp { dst })
    } else if dst.port() == DNS_PORT {
        UdpVerdict::Dns
    } else if forwarded.contains(&dst.port()) {
        UdpVerdict::Forwarded
    } else {
        UdpVerdict::Refuse(Refusal::Udp { dst })
    }
}

#[cfg(test)]
mod tests;
