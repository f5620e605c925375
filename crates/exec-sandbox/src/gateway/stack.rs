//! The gateway's event loop: a smoltcp interface on the guest's link, carrying the bytes of
//! every DNS query, connection and datagram to and from the guest, and the forwarded ports.
//!
//! Every decision (which SYN gets a socket, how a DNS query is answered, which datagram is
//! served, whether a connection's presented name opens it) is taken by the pure functions of
//! [`sbx_net::verdict`]; this module feeds them what the guest sent and applies the verdict.
//!
//! One task owns all state (no locks). It wakes on a frame from QEMU, an event from a relay,
//! resolver or listener task, or smoltcp's next timer, and then polls the interface, serves DNS
//! and the forwarded UDP ports, and pumps every connection.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use sbx_net::dns::Query;
use sbx_net::framing::RequestFramer;
use sbx_net::policy::{Binding, NameTable};
use sbx_net::sniff::MAX_SNIFF_BYTES;
use sbx_net::verdict::{
    self, Answered, DNS_PORT, Destination, DnsVerdict, Lookup, Policy, SniffProgress, SniffVerdict,
    TcpVerdict,
};
use sbx_protocol::net::{GATEWAY_MAC, GUEST_IPV4, PREFIX_LEN};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant as NetInstant;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, IpAddress, IpCidr, IpEndpoint,
    IpListenEndpoint, IpProtocol, Ipv4Packet, TcpPacket, UdpPacket,
};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::{AbortHandle, JoinSet};

use super::device::{Queues, read_frame, write_frame};
use super::relay::{self, CHUNK, CREDIT, RelayError, RelayIo, TO_HOST_CHUNKS};
use super::resolve::{HostResolver, ResolveError};
use super::{GatewayConfig, HostSocket, Refusals};

/// Identifies one relayed connection.
pub type ConnId = u64;

/// What the stack's helper tasks tell it.
#[derive(Debug)]
pub enum Event {
    /// An outbound host connection is established.
    Connected {
        /// Which connection.
        id: ConnId,
        /// How long connecting took.
        took: Duration,
    },
    /// Host bytes for the guest.
    Data {
        /// Which connection.
        id: ConnId,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// The host finished sending.
    Eof {
        /// Which connection.
        id: ConnId,
    },
    /// The host connection failed or could not be made.
    Failed {
        /// Which connection.
        id: ConnId,
        /// Why.
        error: RelayError,
    },
    /// A connection arrived on a forwarded TCP port.
    Accepted {
        /// Index of the forwarded port.
        port: usize,
        /// The host client.
        stream: TcpStream,
    },
    /// A datagram arrived on a forwarded UDP port.
    Datagram {
        /// Index of the forwarded port.
        port: usize,
        /// Who sent it.
        peer: SocketAddr,
        /// The payload.
        bytes: Vec<u8>,
    },
    /// A host lookup for a guest's DNS query finished.
    Resolved {
        /// The query.
        query: Query,
        /// Where the answer goes.
        peer: IpEndpoint,
        /// What the host found (unfiltered).
        found: Result<Vec<Ipv4Addr>, ResolveError>,
    },
}

/// TCP buffer size per direction per connection.
const SOCKET_BUFFER: usize = 64 * 1024;
/// Buffer size per direction of a forwarded UDP port's socket on the gateway.
const UDP_FORWARD_BUFFER: usize = 64 * 1024;
/// Frames queued from QEMU to the stack (a full queue stops reading QEMU's socket).
const FRAMES_IN: usize = 64;
/// Frames queued from the stack to QEMU (a frame beyond is dropped; TCP resends it): about
/// one full-size segment per connection's window.
const FRAMES_OUT: usize = 128;
/// Events (relay data, lookups, datagrams) queued toward the stack.
const EVENTS: usize = 1024;

/// Most bytes one TCP connection holds in the gateway: its socket's two buffers, the guest
/// chunks queued toward the host, the host bytes read ahead under its credit (the data events
/// and the pending bytes toward the guest), and a name being sniffed or a request head being
/// framed (with the chunk that completes it).
pub(crate) const CONNECTION_BYTES: usize = 2 * SOCKET_BUFFER
    + TO_HOST_CHUNKS * CHUNK
    + CREDIT
    + MAX_SNIFF_BYTES
    + sbx_net::http::MAX_REQUEST_HEAD_BYTES
    + CHUNK;
/// Most bytes a gateway holds besides its connections: the DNS socket, the forwarded UDP
/// ports' sockets, and the frame queues (each frame at most [`super::device::MAX_FRAME`]).
pub(crate) const FIXED_BYTES: usize = 2 * DNS_SOCKET_BYTES
    + crate::limits::MAX_EXPOSED_PORTS * 2 * UDP_FORWARD_BUFFER
    + (FRAMES_IN + FRAMES_OUT) * super::device::MAX_FRAME;
/// Most bytes a gateway holds: what admission charges a VM with a NIC
/// ([`crate::limits::GATEWAY_MEMORY_MB`], checked by a test).
pub(crate) const MAX_BYTES: usize =
    sbx_net::verdict::MAX_CONNECTIONS * CONNECTION_BYTES + FIXED_BYTES;
// What admission charges covers the bound, and stays far below the ~100 MiB 128 connections
// could hold before the buffers were bounded: checked when the crate is built.
const _: () = assert!(MAX_BYTES as u64 <= crate::limits::GATEWAY_MEMORY_MB * 1024 * 1024);
const _: () = assert!(crate::limits::GATEWAY_MEMORY_MB <= 64);
/// Buffer size per direction of the DNS socket.
const DNS_SOCKET_BYTES: usize = 32 * 1024;
/// Longest the loop sleeps (bounds how late deadlines are noticed).
const MAX_SLEEP: Duration = Duration::from_millis(500);
/// Sleep while a connection waits for room toward its host.
const BLOCKED_SLEEP: Duration = Duration::from_millis(2);
/// Frames or events handled per wake-up before polling the interface again.
const BATCH: usize = 64;
/// Local ports of connections the gateway opens into the guest.
const INBOUND_PORTS: std::ops::Range<u16> = 40000..60000;
/// Local ports of the forwarded UDP ports' sockets on the gateway.
const UDP_FORWARD_BASE: u16 = 30000;

/// A guest-initiated flow: (guest port, destination, destination port).
type FlowKey = (u16, Ipv4Addr, u16);

enum Phase {
    /// Waiting for the client to present a name.
    Sniffing {
        buf: Vec<u8>,
        accepted: std::time::Instant,
        binding: Binding,
        port: u16,
    },
    /// Relaying (or connecting to the host).
    Open,
}

struct Conn {
    handle: SocketHandle,
    flow: Option<FlowKey>,
    phase: Phase,
    to_host: Option<mpsc::Sender<Vec<u8>>>,
    to_host_rx: Option<mpsc::Receiver<Vec<u8>>>,
    pending: Vec<u8>,
    pending_from: usize,
    host_eof: bool,
    fin_sent: bool,
    established: bool,
    credit: Arc<Semaphore>,
    task: Option<AbortHandle>,
    label: String,
    /// A plain-HTTP connection's framer, with the bound name and port for its refusal: every
    /// guest byte goes through it.
    http: Option<(RequestFramer, String, u16)>,
}

struct UdpForward {
    handle: SocketHandle,
    internal: u16,
    host: Arc<tokio::net::UdpSocket>,
    peer: Option<SocketAddr>,
}

struct Stack {
    config: Arc<GatewayConfig>,
    policy: Policy,
    iface: Interface,
    device: Queues,
    sockets: SocketSet<'static>,
    dns: SocketHandle,
    udp_forwards: Vec<UdpForward>,
    tcp_forwards: Vec<u16>,
    conns: HashMap<ConnId, Conn>,
    flows: HashMap<FlowKey, ConnId>,
    names: NameTable,
    next_id: ConnId,
    next_inbound_port: u16,
    lookups: usize,
    /// The host resolver, made at the first lookup (its cache is this VM's alone).
    resolver: Option<Arc<HostResolver>>,
    blocked: bool,
    events: mpsc::Sender<Event>,
    tasks: JoinSet<()>,
    started: std::time::Instant,
    refusals: Refusals,
}

fn guest() -> Ipv4Addr {
    Ipv4Addr::from(GUEST_IPV4)
}

fn gateway() -> Ipv4Addr {
    verdict::GATEWAY
}

/// Runs the gateway until QEMU closes the NIC socket (or the task is aborted).
pub async fn run(
    config: GatewayConfig,
    nic: UnixStream,
    host_sockets: Vec<HostSocket>,
    refusals: Refusals,
) {
    let (events_tx, mut events) = mpsc::channel::<Event>(EVENTS);
    let (frames_in_tx, mut frames_in) = mpsc::channel::<Vec<u8>>(FRAMES_IN);
    let (frames_out_tx, mut frames_out) = mpsc::channel::<Vec<u8>>(FRAMES_OUT);
    let (mut nic_rx, mut nic_tx) = nic.into_split();
    let mut stack = Stack::new(config, events_tx, refusals);
    stack.tasks.spawn(async move {
        loop {
            match read_frame(&mut nic_rx).await {
                Ok(frame) => {
                    if frames_in_tx.send(frame).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::debug!(target: "sbx::network", "gateway: {e}");
                    return;
                }
            }
        }
    });
    stack.tasks.spawn(async move {
        while let Some(frame) = frames_out.recv().await {
            if write_frame(&mut nic_tx, &frame).await.is_err() {
                return;
            }
        }
    });
    stack.listen(host_sockets);

    loop {
        stack.poll();
        for frame in stack.device.tx.drain(..) {
            // QEMU not keeping up: drop, like a full NIC queue; TCP retransmits.
            let _ = frames_out_tx.try_send(frame);
        }
        let sleep = stack.next_wake();
        tokio::select! {
            frame = frames_in.recv() => {
                let Some(frame) = frame else { break };
                stack.device.rx.push_back(frame);
                while stack.device.rx.len() < BATCH {
                    match frames_in.try_recv() {
                        Ok(frame) => stack.device.rx.push_back(frame),
                        Err(_) => break,
                    }
                }
            }
            Some(event) = events.recv() => {
                stack.handle(event);
                for _ in 1..BATCH {
                    match events.try_recv() {
                        Ok(event) => stack.handle(event),
                        Err(_) => break,
                    }
                }
            }
            () = tokio::time::sleep(sleep) => {}
        }
    }
    tracing::debug!(target: "sbx::network", "gateway: the NIC closed; stopping");
}

impl Stack {
    fn new(config: GatewayConfig, events: mpsc::Sender<Event>, refusals: Refusals) -> Stack {
        let mut device = Queues::default();
        let mut iface_config = Config::new(EthernetAddress(GATEWAY_MAC).into());
        iface_config.random_seed = random_seed();
        let started = std::time::Instant::now();
        let mut iface = Interface::new(iface_config, &mut device, NetInstant::from_millis(0));
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(gateway()), PREFIX_LEN));
        });
        // Accept packets for every address routed via ourselves: the guest's default route
        // points here, so every destination it dials arrives at this stack.
        iface.set_any_ip(true);
        let _ = iface.routes_mut().add_default_ipv4_route(gateway());

        let mut sockets = SocketSet::new(Vec::new());
        let mut dns_socket = udp_socket(32, DNS_SOCKET_BYTES);
        let _ = dns_socket.bind(IpListenEndpoint {
            addr: Some(IpAddress::Ipv4(gateway())),
            port: DNS_PORT,
        });
        let dns = sockets.add(dns_socket);
        Stack {
            policy: Policy {
                outbound: config.outbound,
                allowlist: config.allowlist.clone(),
                allow_internal: config.allow_internal,
                host_addrs: super::host_addrs::current(),
            },
            config: Arc::new(config),
            iface,
            device,
            sockets,
            dns,
            udp_forwards: Vec::new(),
            tcp_forwards: Vec::new(),
            conns: HashMap::new(),
            flows: HashMap::new(),
            names: NameTable::new(),
            next_id: 0,
            next_inbound_port: INBOUND_PORTS.start,
            lookups: 0,
            resolver: None,
            blocked: false,
            events,
            tasks: JoinSet::new(),
            started,
            refusals,
        }
    }

    fn now(&self) -> NetInstant {
        NetInstant::from_micros(
            i64::try_from(self.started.elapsed().as_micros()).unwrap_or(i64::MAX),
        )
    }

    /// Starts the tasks that accept on the forwarded ports.
    fn listen(&mut self, host_sockets: Vec<HostSocket>) {
        for (index, (socket, port)) in host_sockets
            .into_iter()
            .zip(self.config.expose.clone())
            .enumerate()
        {
            let events = self.events.clone();
            match socket {
                HostSocket::Tcp(listener) => {
                    self.tcp_forwards.push(port.internal);
                    let slot = self.tcp_forwards.len() - 1;
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        continue;
                    };
                    self.tasks.spawn(async move {
                        while let Ok((stream, _)) = listener.accept().await {
                            let event = Event::Accepted { port: slot, stream };
                            if events.send(event).await.is_err() {
                                return;
                            }
                        }
                    });
                }
                HostSocket::Udp(socket) => {
                    let Ok(host) = tokio::net::UdpSocket::from_std(socket) else {
                        continue;
                    };
                    let host = Arc::new(host);
                    let mut guest_side = udp_socket(64, UDP_FORWARD_BUFFER);
                    let _ = guest_side.bind(IpListenEndpoint {
                        addr: Some(IpAddress::Ipv4(gateway())),
                        port: UDP_FORWARD_BASE + index as u16,
                    });
                    let handle = self.sockets.add(guest_side);
                    self.udp_forwards.push(UdpForward {
                        handle,
                        internal: port.internal,
                        host: host.clone(),
                        peer: None,
                    });
                    let slot = self.udp_forwards.len() - 1;
                    self.tasks.spawn(async move {
                        let mut buf = vec![0; 65536];
                        while let Ok((n, peer)) = host.recv_from(&mut buf).await {
                            let event = Event::Datagram {
                                port: slot,
                                peer,
                                bytes: buf[..n].to_vec(),
                            };
                            if events.send(event).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        }
    }

    /// Ingests queued frames, serves DNS and forwarded datagrams, pumps connections, and
    /// emits what that produced.
    fn poll(&mut self) {
        let frames: Vec<Option<Inspected>> = self.device.rx.iter().map(|f| inspect(f)).collect();
        for inspected in frames.into_iter().flatten() {
            match inspected {
                Inspected::Syn(key, dst, port) => self.on_syn(key, dst, port),
                Inspected::Udp(dst, port) => self.on_udp(dst, port),
            }
        }
        let now = self.now();
        self.iface.poll(now, &mut self.device, &mut self.sockets);
        self.blocked = false;
        self.serve_dns();
        self.serve_udp_forwards();
        self.pump();
        self.iface.poll(now, &mut self.device, &mut self.sockets);
    }

    fn next_wake(&mut self) -> Duration {
        let now = self.now();
        let mut sleep = self
            .iface
            .poll_delay(now, &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
            .unwrap_or(MAX_SLEEP)
            .min(MAX_SLEEP);
        if self.blocked {
            sleep = sleep.min(BLOCKED_SLEEP);
        }
        sleep
    }

    /// A guest SYN for a flow not seen yet: a listening socket for it if the policy accepts
    /// the destination; otherwise nothing, and smoltcp answers with a reset.
    fn on_syn(&mut self, key: FlowKey, dst: Ipv4Addr, port: u16) {
        if self.flows.contains_key(&key) {
            return;
        }
        let dst = SocketAddrV4::new(dst, port);
        // Refreshes the handle `self.policy` shares when it is stale.
        super::host_addrs::current();
        let (label, phase, connect) =
            match verdict::tcp_syn(&self.policy, &self.names, dst, self.conns.len()) {
                TcpVerdict::Refuse(refusal) => {
                    self.refusals.record(refusal);
                    return;
                }
                TcpVerdict::Sniff { binding, port } => (
                    Destination::Name {
                        name: binding.name.clone(),
                        port,
                    }
                    .to_string(),
                    Phase::Sniffing {
                        buf: Vec::new(),
                        accepted: std::time::Instant::now(),
                        binding,
                        port,
                    },
                    None,
                ),
                TcpVerdict::Connect { dest, addrs } => (dest.to_string(), Phase::Open, Some(addrs)),
            };
        let mut socket = tcp_socket();
        if socket
            .listen(IpListenEndpoint {
                addr: Some(IpAddress::Ipv4(*dst.ip())),
                port,
            })
            .is_err()
        {
            return;
        }
        let handle = self.sockets.add(socket);
        let id = self.add_conn(handle, Some(key), phase, label);
        if let Some(addrs) = connect {
            self.spawn_connect(id, addrs, port, Vec::new());
        }
    }

    /// The gateway ports of the forwarded UDP ports.
    fn udp_forward_ports(&self) -> std::ops::Range<u16> {
        UDP_FORWARD_BASE..UDP_FORWARD_BASE + self.udp_forwards.len() as u16
    }

    /// Records a guest datagram smoltcp will answer with "port unreachable": anything but DNS
    /// to the gateway and replies on forwarded UDP ports.
    fn on_udp(&mut self, dst: Ipv4Addr, port: u16) {
        let dst = SocketAddrV4::new(dst, port);
        if let verdict::UdpVerdict::Refuse(refusal) =
            verdict::udp_datagram(dst, self.udp_forward_ports())
        {
            self.refusals.record(refusal);
        }
    }

    fn add_conn(
        &mut self,
        handle: SocketHandle,
        flow: Option<FlowKey>,
        phase: Phase,
        label: String,
    ) -> ConnId {
        let id = self.next_id;
        self.next_id += 1;
        let (tx, rx) = mpsc::channel(TO_HOST_CHUNKS);
        if let Some(flow) = flow {
            self.flows.insert(flow, id);
        }
        self.conns.insert(
            id,
            Conn {
                handle,
                flow,
                phase,
                to_host: Some(tx),
                to_host_rx: Some(rx),
                pending: Vec::new(),
                pending_from: 0,
                host_eof: false,
                fin_sent: false,
                established: false,
                credit: Arc::new(Semaphore::new(CREDIT)),
                task: None,
                label,
                http: None,
            },
        );
        id
    }

    fn relay_io(&mut self, id: ConnId) -> Option<RelayIo> {
        let conn = self.conns.get_mut(&id)?;
        Some(RelayIo {
            id,
            to_host: conn.to_host_rx.take()?,
            events: self.events.clone(),
            credit: conn.credit.clone(),
        })
    }

    fn spawn_connect(&mut self, id: ConnId, addrs: Vec<Ipv4Addr>, port: u16, initial: Vec<u8>) {
        let Some(io) = self.relay_io(id) else { return };
        let task = self
            .tasks
            .spawn(relay::connect_and_relay(addrs, port, initial, io));
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.task = Some(task);
        }
    }

    fn remove_conn(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.remove(&id) {
            if let Some(task) = conn.task {
                task.abort();
            }
            conn.credit.close();
            if let Some(flow) = conn.flow {
                self.flows.remove(&flow);
            }
            self.sockets.remove(conn.handle);
        }
    }

    /// Resets the guest's side of `id` after its host connection failed.
    fn fail(&mut self, id: ConnId, error: &RelayError) {
        if let Some(conn) = self.conns.get(&id) {
            self.refusals
                .record(format!("TCP {}: {}", conn.label, super::chain(error)));
        }
        self.reset(id);
    }

    /// Resets the guest's side of `id`; the connection is removed after the reset went out.
    fn reset(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.get_mut(&id) {
            if let Some(task) = conn.task.take() {
                task.abort();
            }
            conn.to_host = None;
            self.sockets.get_mut::<tcp::Socket>(conn.handle).abort();
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Connected { id, took } => {
                if let Some(conn) = self.conns.get(&id) {
                    tracing::debug!(
                        target: "sbx::network",
                        "connected to {} in {} ms", conn.label, took.as_millis()
                    );
                }
            }
            Event::Data { id, bytes } => {
                if let Some(conn) = self.conns.get_mut(&id) {
                    conn.pending.extend_from_slice(&bytes);
                }
            }
            Event::Eof { id } => {
                if let Some(conn) = self.conns.get_mut(&id) {
                    conn.host_eof = true;
                }
            }
            Event::Failed { id, error } => self.fail(id, &error),
            Event::Accepted { port, stream } => self.accept_forwarded(port, stream),
            Event::Datagram { port, peer, bytes } => {
                if let Some(forward) = self.udp_forwards.get_mut(port) {
                    forward.peer = Some(peer);
                    let to = IpEndpoint::new(IpAddress::Ipv4(guest()), forward.internal);
                    // A full buffer drops the datagram, as UDP may.
                    let _ = self
                        .sockets
                        .get_mut::<udp::Socket>(forward.handle)
                        .send_slice(&bytes, to);
                }
            }
            Event::Resolved { query, peer, found } => {
                self.lookups = self.lookups.saturating_sub(1);
                let lookup = match found {
                    Ok(addrs) => {
                        super::host_addrs::current();
                        verdict::usable_addrs(addrs, &self.policy)
                    }
                    Err(e) => {
                        tracing::info!(
                            target: "sbx::network",
                            "DNS {}: {}", query.name, super::chain(&e)
                        );
                        Lookup::Failed
                    }
                };
                let answered = verdict::dns_resolved(query, &lookup, &mut self.names);
                if let Some(refusal) = &answered.refusal {
                    self.refusals.record(refusal);
                }
                self.reply_dns(&answered.to_bytes(), peer);
            }
        }
    }

    /// A host client on a forwarded TCP port: a connection from the gateway into the guest.
    fn accept_forwarded(&mut self, port: usize, stream: TcpStream) {
        let Some(&internal) = self.tcp_forwards.get(port) else {
            return;
        };
        if !verdict::forwarded_connection(self.conns.len()) {
            return;
        }
        let local_port = self.next_inbound_port;
        self.next_inbound_port = if local_port + 1 >= INBOUND_PORTS.end {
            INBOUND_PORTS.start
        } else {
            local_port + 1
        };
        let mut socket = tcp_socket();
        let remote = IpEndpoint::new(IpAddress::Ipv4(guest()), internal);
        let local = IpListenEndpoint {
            addr: Some(IpAddress::Ipv4(gateway())),
            port: local_port,
        };
        if socket.connect(self.iface.context(), remote, local).is_err() {
            return;
        }
        let _ = stream.set_nodelay(true);
        let handle = self.sockets.add(socket);
        let id = self.add_conn(handle, None, Phase::Open, format!("guest port {internal}"));
        let Some(io) = self.relay_io(id) else { return };
        let task = self.tasks.spawn(relay::relay(stream, Vec::new(), io));
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.task = Some(task);
        }
    }

    fn reply_dns(&mut self, answer: &[u8], peer: IpEndpoint) {
        let _ = self
            .sockets
            .get_mut::<udp::Socket>(self.dns)
            .send_slice(answer, peer);
    }

    /// Answers every queued DNS query: refusals at once, allowed A queries after a host lookup.
    fn serve_dns(&mut self) {
        let mut verdicts = Vec::new();
        {
            let socket = self.sockets.get_mut::<udp::Socket>(self.dns);
            let mut lookups = self.lookups;
            while let Ok((packet, meta)) = socket.recv() {
                let verdict = verdict::dns_query(&self.policy, packet, lookups);
                if let DnsVerdict::Lookup(_) = verdict {
                    lookups += 1;
                }
                verdicts.push((verdict, meta.endpoint));
            }
        }
        for (verdict, peer) in verdicts {
            if let Some(reply) = verdict.reply() {
                self.reply_dns(&reply, peer);
            }
            match verdict {
                DnsVerdict::Malformed { error, .. } => {
                    tracing::debug!(target: "sbx::network", "DNS: malformed query: {error}");
                }
                DnsVerdict::Answer(Answered {
                    refusal: Some(refusal),
                    ..
                }) => self.refusals.record(refusal),
                DnsVerdict::Answer(_) => {}
                DnsVerdict::Lookup(query) => self.lookup(query, peer),
            }
        }
    }

    /// Looks `query`'s name up on the host; the answer goes out when [`Event::Resolved`] comes.
    fn lookup(&mut self, query: Query, peer: IpEndpoint) {
        self.lookups += 1;
        let config = self.config.clone();
        let events = self.events.clone();
        let resolver = self
            .resolver
            .get_or_insert_with(|| Arc::new(HostResolver::system()))
            .clone();
        self.tasks.spawn(async move {
            let found = resolver.resolve(&query.name, &config.hosts).await;
            let _ = events.send(Event::Resolved { query, peer, found }).await;
        });
    }

    /// Datagrams the guest sent back on forwarded UDP ports go to the port's last host peer.
    fn serve_udp_forwards(&mut self) {
        for forward in &self.udp_forwards {
            let socket = self.sockets.get_mut::<udp::Socket>(forward.handle);
            while let Ok((bytes, meta)) = socket.recv() {
                let from_service =
                    meta.endpoint == IpEndpoint::new(IpAddress::Ipv4(guest()), forward.internal);
                if let (true, Some(peer)) = (from_service, forward.peer) {
                    let _ = forward.host.try_send_to(bytes, peer);
                }
            }
        }
    }

    /// Moves bytes between every connection's guest socket and its relay.
    fn pump(&mut self) {
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            self.pump_one(id);
        }
    }

    fn pump_one(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let socket = self.sockets.get_mut::<tcp::Socket>(conn.handle);
        let state = socket.state();
        if matches!(state, tcp::State::Closed | tcp::State::TimeWait) {
            self.remove_conn(id);
            return;
        }
        if state == tcp::State::Established {
            conn.established = true;
        }
        if let Phase::Sniffing {
            buf,
            accepted,
            binding,
            port,
        } = &mut conn.phase
        {
            while socket.can_recv() && buf.len() < MAX_SNIFF_BYTES {
                let room = MAX_SNIFF_BYTES - buf.len();
                let _ = socket.recv(|data| {
                    let n = data.len().min(room);
                    buf.extend_from_slice(&data[..n]);
                    (n, ())
                });
            }
            let progress = SniffProgress {
                bytes: buf,
                elapsed: accepted.elapsed(),
                client_open: socket.may_recv() || !conn.established,
            };
            match verdict::sniffed(&self.policy, binding, *port, progress) {
                SniffVerdict::Wait => {}
                SniffVerdict::Connect { framer } => {
                    let (mut initial, addrs, port) =
                        (std::mem::take(buf), binding.addrs.clone(), *port);
                    if let Some(mut framer) = framer {
                        // The first request is checked again with any pipelined behind it.
                        match framer.push(&initial) {
                            Ok(pass) => initial = pass,
                            Err(stop) => {
                                let refusal = verdict::later_request(&binding.name, port, stop);
                                self.refusals.record(refusal);
                                self.reset(id);
                                return;
                            }
                        }
                        conn.http = Some((framer, binding.name.clone(), port));
                    }
                    conn.phase = Phase::Open;
                    self.spawn_connect(id, addrs, port, initial);
                }
                SniffVerdict::Refuse(refusal) => {
                    self.refusals.record(refusal);
                    self.reset(id);
                }
            }
            return;
        }

        // Guest → host.
        let mut stopped = None;
        if let Some(tx) = &conn.to_host {
            while socket.can_recv() {
                match tx.try_reserve() {
                    Ok(permit) => {
                        let mut chunk = socket
                            .recv(|data| {
                                let n = data.len().min(CHUNK);
                                (n, data[..n].to_vec())
                            })
                            .unwrap_or_default();
                        if let Some((framer, name, port)) = &mut conn.http {
                            match framer.push(&chunk) {
                                Ok(pass) => chunk = pass,
                                Err(stop) => {
                                    stopped = Some(verdict::later_request(name, *port, stop));
                                    break;
                                }
                            }
                        }
                        permit.send(chunk);
                    }
                    Err(mpsc::error::TrySendError::Full(())) => {
                        self.blocked = true;
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(())) => break,
                }
            }
            if conn.established && !socket.may_recv() && !socket.can_recv() {
                // The guest sent FIN: the relay shuts the host side's write half.
                conn.to_host = None;
            }
        }
        if let Some(refusal) = stopped {
            self.refusals.record(refusal);
            self.reset(id);
            return;
        }
        // Host → guest.
        while conn.pending_from < conn.pending.len() && socket.can_send() {
            let n = socket
                .send_slice(&conn.pending[conn.pending_from..])
                .unwrap_or(0);
            if n == 0 {
                break;
            }
            conn.pending_from += n;
            conn.credit.add_permits(n);
        }
        if conn.pending_from == conn.pending.len() {
            conn.pending.clear();
            conn.pending_from = 0;
            if conn.host_eof && !conn.fin_sent {
                socket.close();
                conn.fin_sent = true;
            }
        }
    }
}

/// A guest frame the policy looks at before the stack processes it.
enum Inspected {
    /// A TCP SYN (without ACK): its flow, destination and port.
    Syn(FlowKey, Ipv4Addr, u16),
    /// A UDP datagram: its destination and port.
    Udp(Ipv4Addr, u16),
}

/// Classifies a frame from the guest (frames not from the guest's address are left to the
/// stack, which drops them).
fn inspect(frame: &[u8]) -> Option<Inspected> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if ip.src_addr() != guest() {
        return None;
    }
    let dst = ip.dst_addr();
    match ip.next_header() {
        IpProtocol::Tcp => {
            let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
            (tcp.syn() && !tcp.ack())
                .then(|| Inspected::Syn((tcp.src_port(), dst, tcp.dst_port()), dst, tcp.dst_port()))
        }
        IpProtocol::Udp => {
            let udp = UdpPacket::new_checked(ip.payload()).ok()?;
            Some(Inspected::Udp(dst, udp.dst_port()))
        }
        _ => None,
    }
}

fn tcp_socket() -> tcp::Socket<'static> {
    let mut socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
        tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
    );
    socket.set_nagle_enabled(false);
    socket
}

fn udp_socket(packets: usize, bytes: usize) -> udp::Socket<'static> {
    udp::Socket::new(
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; packets], vec![0; bytes]),
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; packets], vec![0; bytes]),
    )
}

/// Seed for TCP initial sequence numbers and ephemeral choices: differs per gateway.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    hasher.finish()
}

#[cfg(test)]
pub(crate) mod tests {
    /// A connection's socket, as the stack makes it.
    pub(crate) fn tcp_socket_for_test() -> smoltcp::socket::tcp::Socket<'static> {
        super::tcp_socket()
    }
}
