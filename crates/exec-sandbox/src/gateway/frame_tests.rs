//! The real gateway (stack, policy, resolver) driven the way QEMU drives it: Ethernet frames
//! built with smoltcp's wire types, written to and read from QEMU's end of the NIC socket pair.
//! No VM, and no network: names resolve from the gateway's static hosts, and no connection
//! these tests open reaches the point where the gateway dials the host.

use std::net::Ipv4Addr;
use std::time::Duration;

use sbx_net::policy::Allowlist;
use sbx_protocol::net::{GATEWAY_MAC, GUEST_IPV4, GUEST_MAC};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Icmpv4Message, Icmpv4Packet, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr,
    TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr,
};
use tokio::net::UnixStream;

use super::device::{read_frame, write_frame};
use super::{Gateway, GatewayConfig};

/// Longest a test waits for the gateway's answer to one frame.
const ANSWER_DEADLINE: Duration = Duration::from_secs(10);
/// The address `fixture.test` resolves to on the host (a documentation address: never dialed).
const FIXTURE_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 80);
/// The first virtual address a gateway hands out.
const FIRST_VIRTUAL: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The guest's DNS client port.
const RESOLVER_PORT: u16 = 40053;

fn guest_ip() -> Ipv4Addr {
    Ipv4Addr::from(GUEST_IPV4)
}

fn gateway_ip() -> Ipv4Addr {
    sbx_net::verdict::GATEWAY
}

/// A gateway allowing only `fixture.test`, which the host resolves to [`FIXTURE_ADDR`].
fn allow_fixture() -> GatewayConfig {
    GatewayConfig {
        outbound: true,
        allowlist: Allowlist::Only(vec!["fixture.test".into()]),
        allow_internal: false,
        hosts: vec![
            ("fixture.test".into(), FIXTURE_ADDR),
            ("other.test".into(), FIXTURE_ADDR),
        ],
        expose: Vec::new(),
    }
}

/// The guest's side of the link.
struct Guest {
    nic: UnixStream,
    gateway: Gateway,
}

impl Guest {
    /// Starts a gateway and resolves its MAC address the way a guest does first, which also
    /// teaches the gateway the guest's.
    async fn start(config: GatewayConfig) -> Guest {
        let mut gateway = Gateway::start(config).expect("gateway");
        let end = std::os::unix::net::UnixStream::from(gateway.take_qemu_end().expect("NIC"));
        end.set_nonblocking(true).expect("non-blocking NIC");
        let mut guest = Guest {
            nic: UnixStream::from_std(end).expect("NIC in tokio"),
            gateway,
        };
        guest.send(&arp_request()).await;
        let mac = guest
            .answer("ARP reply", |frame| {
                let eth = EthernetFrame::new_checked(frame).ok()?;
                if eth.ethertype() != EthernetProtocol::Arp {
                    return None;
                }
                match ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).ok()?).ok()? {
                    ArpRepr::EthernetIpv4 {
                        operation: ArpOperation::Reply,
                        source_hardware_addr,
                        source_protocol_addr,
                        ..
                    } if source_protocol_addr == gateway_ip() => Some(source_hardware_addr),
                    _ => None,
                }
            })
            .await;
        assert_eq!(mac, EthernetAddress(GATEWAY_MAC));
        guest
    }

    async fn send(&mut self, frame: &[u8]) {
        write_frame(&mut self.nic, frame).await.expect("frame out");
    }

    /// The first frame from the gateway that `pick` accepts, within [`ANSWER_DEADLINE`].
    async fn answer<T>(&mut self, what: &str, mut pick: impl FnMut(&[u8]) -> Option<T>) -> T {
        let wait = async {
            loop {
                let frame = read_frame(&mut self.nic).await.expect("frame in");
                if let Some(found) = pick(&frame) {
                    return found;
                }
            }
        };
        match tokio::time::timeout(ANSWER_DEADLINE, wait).await {
            Ok(found) => found,
            Err(_) => panic!("no {what} from the gateway within {ANSWER_DEADLINE:?}"),
        }
    }

    /// Asks the gateway's DNS for the A record of `name`: the response code and the addresses.
    async fn resolve(&mut self, id: u16, name: &str) -> (u8, Vec<Ipv4Addr>) {
        self.send(&udp_frame(gateway_ip(), 53, &dns_query(id, name)))
            .await;
        let answer = self
            .answer("DNS answer", |frame| {
                let (src, src_port, dst_port, payload) = udp_of(frame)?;
                let ours = src == gateway_ip() && src_port == 53 && dst_port == RESOLVER_PORT;
                (ours && payload.get(..2) == Some(&id.to_be_bytes())).then_some(payload)
            })
            .await;
        parse_answer(&answer)
    }

    /// Sends a SYN to `dst:port` and returns the gateway's answering TCP flags (RST or SYN-ACK).
    async fn connect(&mut self, dst: Ipv4Addr, port: u16, src_port: u16) -> Answer {
        let seq = TcpSeqNumber(7_000);
        self.send(&syn_frame(dst, port, src_port, seq)).await;
        self.answer("TCP answer", |frame| {
            let eth = EthernetFrame::new_checked(frame).ok()?;
            let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
            if ip.next_header() != IpProtocol::Tcp || ip.src_addr() != dst {
                return None;
            }
            let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
            if (tcp.src_port(), tcp.dst_port()) != (port, src_port) {
                return None;
            }
            assert_eq!(tcp.ack_number(), seq + 1, "the answer acknowledges the SYN");
            Some(match (tcp.syn(), tcp.ack(), tcp.rst()) {
                (true, true, false) => Answer::SynAck,
                (false, _, true) => Answer::Rst,
                other => panic!("unexpected flags (syn, ack, rst) = {other:?}"),
            })
        })
        .await
    }
}

/// The gateway's answer to a SYN.
#[derive(Debug, PartialEq)]
enum Answer {
    SynAck,
    Rst,
}

/// An Ethernet frame from the guest to the gateway carrying `ip` and its payload.
fn ip_frame(ip: Ipv4Repr, emit_payload: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let eth = EthernetRepr {
        src_addr: EthernetAddress(GUEST_MAC),
        dst_addr: EthernetAddress(GATEWAY_MAC),
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut frame = vec![0; eth.buffer_len() + ip.buffer_len() + ip.payload_len];
    let mut eth_frame = EthernetFrame::new_unchecked(&mut frame);
    eth.emit(&mut eth_frame);
    let mut packet = Ipv4Packet::new_unchecked(eth_frame.payload_mut());
    ip.emit(&mut packet, &ChecksumCapabilities::default());
    emit_payload(packet.payload_mut());
    frame
}

/// The guest's ARP request for the gateway's address.
fn arp_request() -> Vec<u8> {
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(GUEST_MAC),
        source_protocol_addr: guest_ip(),
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: gateway_ip(),
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(GUEST_MAC),
        dst_addr: EthernetAddress::BROADCAST,
        ethertype: EthernetProtocol::Arp,
    };
    let mut frame = vec![0; eth.buffer_len() + arp.buffer_len()];
    let mut eth_frame = EthernetFrame::new_unchecked(&mut frame);
    eth.emit(&mut eth_frame);
    arp.emit(&mut ArpPacket::new_unchecked(eth_frame.payload_mut()));
    frame
}

/// A datagram from the guest's resolver port to `dst:port`.
fn udp_frame(dst: Ipv4Addr, port: u16, payload: &[u8]) -> Vec<u8> {
    let udp = UdpRepr {
        src_port: RESOLVER_PORT,
        dst_port: port,
    };
    let ip = Ipv4Repr {
        src_addr: guest_ip(),
        dst_addr: dst,
        next_header: IpProtocol::Udp,
        payload_len: udp.header_len() + payload.len(),
        hop_limit: 64,
    };
    ip_frame(ip, |buf| {
        udp.emit(
            &mut UdpPacket::new_unchecked(buf),
            &IpAddress::Ipv4(guest_ip()),
            &IpAddress::Ipv4(dst),
            payload.len(),
            |out| out.copy_from_slice(payload),
            &ChecksumCapabilities::default(),
        );
    })
}

/// A SYN from the guest's `src_port` to `dst:port`.
fn syn_frame(dst: Ipv4Addr, port: u16, src_port: u16, seq: TcpSeqNumber) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port,
        dst_port: port,
        control: TcpControl::Syn,
        seq_number: seq,
        ack_number: None,
        window_len: 64_000,
        window_scale: None,
        max_seg_size: Some(1460),
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let ip = Ipv4Repr {
        src_addr: guest_ip(),
        dst_addr: dst,
        next_header: IpProtocol::Tcp,
        payload_len: tcp.buffer_len(),
        hop_limit: 64,
    };
    ip_frame(ip, |buf| {
        tcp.emit(
            &mut TcpPacket::new_unchecked(buf),
            &IpAddress::Ipv4(guest_ip()),
            &IpAddress::Ipv4(dst),
            &ChecksumCapabilities::default(),
        );
    })
}

/// A UDP datagram's source address, ports and payload, if `frame` carries one.
fn udp_of(frame: &[u8]) -> Option<(Ipv4Addr, u16, u16, Vec<u8>)> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if ip.next_header() != IpProtocol::Udp || ip.dst_addr() != guest_ip() {
        return None;
    }
    let udp = UdpPacket::new_checked(ip.payload()).ok()?;
    Some((
        ip.src_addr(),
        udp.src_port(),
        udp.dst_port(),
        udp.payload().to_vec(),
    ))
}

/// A standard A query for `name` with recursion desired.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut query = Vec::new();
    for field in [id, 0x0100, 1, 0, 0, 0] {
        query.extend_from_slice(&field.to_be_bytes());
    }
    for label in name.split('.') {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    query
}

/// The response code and A record addresses of an answer to [`dns_query`] (each record:
/// a 2-byte name pointer, type, class, TTL, length, then the address).
fn parse_answer(answer: &[u8]) -> (u8, Vec<Ipv4Addr>) {
    assert!(answer[2] & 0x80 != 0, "a response");
    let rcode = answer[3] & 0x0f;
    let count = usize::from(u16::from_be_bytes([answer[6], answer[7]]));
    let records = &answer[answer.len() - count * 16..];
    let addrs = records
        .chunks_exact(16)
        .map(|record| {
            assert_eq!(&record[2..6], &[0, 1, 0, 1], "type A, class IN");
            Ipv4Addr::new(record[12], record[13], record[14], record[15])
        })
        .collect();
    (rcode, addrs)
}

#[tokio::test]
async fn an_allowed_name_is_answered_with_a_virtual_address() {
    let mut guest = Guest::start(allow_fixture()).await;
    assert_eq!(
        guest.resolve(1, "fixture.test").await,
        (0, vec![FIRST_VIRTUAL])
    );
    // The same name keeps its address, in any case.
    assert_eq!(
        guest.resolve(2, "FIXTURE.test").await,
        (0, vec![FIRST_VIRTUAL])
    );
    assert!(guest.gateway.take_refusals().is_empty());
}

#[tokio::test]
async fn a_refused_name_is_nxdomain_and_reported() {
    let mut guest = Guest::start(allow_fixture()).await;
    // `other.test` has a static host entry: refused by the allowlist, not for lack of one.
    assert_eq!(guest.resolve(3, "other.test").await, (3, vec![]));
    assert_eq!(
        guest.gateway.take_refusals(),
        ["DNS other.test: not in the allowlist"]
    );
}

#[tokio::test]
async fn a_syn_to_a_refused_address_is_reset_and_reported() {
    let mut guest = Guest::start(allow_fixture()).await;
    assert_eq!(guest.connect(gateway_ip(), 80, 50_001).await, Answer::Rst);
    assert_eq!(
        guest
            .connect(Ipv4Addr::new(198, 18, 200, 200), 443, 50_002)
            .await,
        Answer::Rst
    );
    assert_eq!(guest.connect(FIXTURE_ADDR, 443, 50_003).await, Answer::Rst);
    assert_eq!(
        guest.gateway.take_refusals(),
        [
            "TCP 10.0.2.2:80: no TCP service on the gateway",
            "TCP 198.18.200.200:443: the address was never given in a DNS answer",
            "TCP 203.0.113.80:443: connections to IP addresses are refused; connect by an allowed name",
        ]
    );
}

#[tokio::test]
async fn a_syn_to_a_bound_virtual_address_is_accepted() {
    let mut guest = Guest::start(allow_fixture()).await;
    // Before any DNS answer the address is bound to nothing.
    assert_eq!(guest.connect(FIRST_VIRTUAL, 443, 50_010).await, Answer::Rst);
    assert_eq!(
        guest.resolve(4, "fixture.test").await,
        (0, vec![FIRST_VIRTUAL])
    );
    assert_eq!(
        guest.connect(FIRST_VIRTUAL, 443, 50_011).await,
        Answer::SynAck
    );
    assert_eq!(
        guest.gateway.take_refusals(),
        ["TCP 198.18.0.1:443: the address was never given in a DNS answer"]
    );
}

#[tokio::test]
async fn dns_to_another_server_is_port_unreachable() {
    let mut guest = Guest::start(allow_fixture()).await;
    let elsewhere = Ipv4Addr::new(198, 18, 200, 200);
    guest
        .send(&udp_frame(elsewhere, 53, &dns_query(5, "fixture.test")))
        .await;
    let code = guest
        .answer("ICMP port unreachable", |frame| {
            let eth = EthernetFrame::new_checked(frame).ok()?;
            let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
            if ip.next_header() != IpProtocol::Icmp {
                return None;
            }
            let icmp = Icmpv4Packet::new_checked(ip.payload()).ok()?;
            (icmp.msg_type() == Icmpv4Message::DstUnreachable).then_some(icmp.msg_code())
        })
        .await;
    assert_eq!(code, 3, "port unreachable");
    assert_eq!(
        guest.gateway.take_refusals(),
        ["UDP 198.18.200.200:53: only DNS to the gateway (10.0.2.2:53)"]
    );
}

#[tokio::test]
async fn without_network_access_dns_is_refused_and_syns_reset() {
    let mut config = allow_fixture();
    config.outbound = false;
    let mut guest = Guest::start(config).await;
    assert_eq!(guest.resolve(6, "fixture.test").await, (5, vec![]));
    assert_eq!(guest.connect(FIRST_VIRTUAL, 443, 50_020).await, Answer::Rst);
    assert_eq!(
        guest.gateway.take_refusals(),
        [
            "DNS fixture.test: the VM has no network access (forwarded ports only)",
            "TCP 198.18.0.1:443: the VM has no network access (forwarded ports only)",
        ]
    );
}
