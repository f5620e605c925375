use super::*;
use crate::testing::{client_hello, dns_query as query};
use proptest::prelude::*;

const PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 80);
/// A public address of one of the host's own interfaces.
const HOST_OWN: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

fn only(domains: &[&str]) -> Allowlist {
    Allowlist::Only(domains.iter().map(|d| d.to_string()).collect())
}

fn policy(outbound: bool, allowlist: Allowlist, allow_internal: bool) -> Policy {
    Policy {
        outbound,
        allowlist,
        allow_internal,
        host_addrs: HostAddrs::new(vec![HOST_OWN]),
    }
}

fn addr(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// `fixture.test` bound to 198.18.0.1 (→ 203.0.113.80), `other.test` to 198.18.0.2.
fn names() -> NameTable {
    let mut names = NameTable::new();
    assert_eq!(
        names.bind("fixture.test", vec![PUBLIC]),
        Some(addr("198.18.0.1"))
    );
    assert_eq!(
        names.bind("other.test", vec![addr("203.0.113.81")]),
        Some(addr("198.18.0.2"))
    );
    names
}

/// What a [`tcp_syn`] verdict should be, in short.
#[derive(Debug, Clone, PartialEq)]
enum Syn {
    /// Sniff for the name bound to the address.
    Sniff,
    /// Connect at once to the name's addresses.
    Named,
    /// Connect at once to the address itself.
    Raw,
    /// Refused for this reason.
    No(TcpRefusal),
}

fn short(verdict: &TcpVerdict, dst: SocketAddrV4, names: &NameTable) -> Syn {
    match verdict {
        TcpVerdict::Sniff { binding, port } => {
            assert_eq!(Some(binding), names.lookup(*dst.ip()));
            assert_eq!(*port, dst.port());
            Syn::Sniff
        }
        TcpVerdict::Connect {
            dest: Destination::Name { name, port },
            addrs,
        } => {
            let binding = names.lookup(*dst.ip()).unwrap();
            assert_eq!((name, addrs), (&binding.name, &binding.addrs));
            assert_eq!(*port, dst.port());
            Syn::Named
        }
        TcpVerdict::Connect {
            dest: Destination::Addr(to),
            addrs,
        } => {
            assert_eq!((to, addrs.as_slice()), (&dst, &[*dst.ip()][..]));
            Syn::Raw
        }
        TcpVerdict::Refuse(Refusal::Tcp {
            dest: Destination::Addr(to),
            reason,
        }) => {
            assert_eq!(*to, dst);
            Syn::No(reason.clone())
        }
        TcpVerdict::Refuse(other) => panic!("{dst}: refused as {other:?}"),
    }
}

#[test]
fn tcp_destination_classes_by_mode() {
    use Syn::*;
    use TcpRefusal::*;
    let names = names();
    // Columns: allowlist × allow_internal = [Only/off, Only/on, Any/off, Any/on].
    #[rustfmt::skip]
    let table: &[(&str, &str, [Syn; 4])] = &[
        ("bound virtual",       "198.18.0.1",      [Sniff, Sniff, Named, Named]),
        ("bound virtual 2",     "198.18.0.2",      [Sniff, Sniff, Named, Named]),
        ("unknown virtual",     "198.18.200.200",  [No(UnknownVirtual), No(UnknownVirtual), No(UnknownVirtual), No(UnknownVirtual)]),
        ("virtual net base",    "198.18.0.0",      [No(UnknownVirtual), No(UnknownVirtual), No(UnknownVirtual), No(UnknownVirtual)]),
        ("gateway",             "10.0.2.2",        [No(Gateway), No(Gateway), No(Gateway), No(Gateway)]),
        ("loopback",            "127.0.0.1",       [No(RawAddress), No(RawAddress), No(Internal), Raw]),
        ("loopback /8",         "127.1.2.3",       [No(RawAddress), No(RawAddress), No(Internal), Raw]),
        ("the guest itself",    "10.0.2.15",       [No(RawAddress), No(RawAddress), No(Internal), Raw]),
        ("RFC 1918 10/8",       "10.1.2.3",        [No(RawAddress), No(RawAddress), No(Internal), Raw]),
        ("RFC 1918 172.16/12",  "172.31.0.1",      [No(RawAddress), No(RawAddress), No(Internal), Raw]),
        ("RFC 1918 192.168/16", "192.168.1.1",     [No(RawAddress), No(RawAddress), No(Internal), Raw]),
        ("CGNAT",               "100.64.0.1",      [No(RawAddress), No(RawAddress), No(Internal), Raw]),
        ("metadata",            "169.254.169.254", [No(RawAddress), No(RawAddress), No(Internal), Raw]),
        ("public",              "203.0.113.80",    [No(RawAddress), No(RawAddress), Raw, Raw]),
        ("public 8.8.8.8",      "8.8.8.8",         [No(RawAddress), No(RawAddress), Raw, Raw]),
        ("Azure WireServer",    "168.63.129.16",   [No(RawAddress), No(RawAddress), No(ControlPlane), Raw]),
        ("the host's own",      "198.51.100.7",    [No(RawAddress), No(RawAddress), No(HostAddress), Raw]),
        ("this network",        "0.0.0.0",         [No(RawAddress), No(RawAddress), No(Unroutable), No(Unroutable)]),
        ("multicast",           "224.0.0.1",       [No(RawAddress), No(RawAddress), No(Unroutable), No(Unroutable)]),
        ("broadcast",           "255.255.255.255", [No(RawAddress), No(RawAddress), No(Unroutable), No(Unroutable)]),
    ];
    let modes = [
        (only(&["fixture.test"]), false),
        (only(&["fixture.test"]), true),
        (Allowlist::Any, false),
        (Allowlist::Any, true),
    ];
    for (what, dst, wants) in table {
        let dst = SocketAddrV4::new(addr(dst), 443);
        for ((allowlist, allow_internal), want) in modes.iter().zip(wants) {
            let on = policy(true, allowlist.clone(), *allow_internal);
            let got = short(&tcp_syn(&on, &names, dst, 0), dst, &names);
            assert_eq!(&got, want, "{what} {dst} under {on:?}");
            // Network off (forwarded ports only): everything is refused, whatever the rest.
            let off = policy(false, allowlist.clone(), *allow_internal);
            let got = short(&tcp_syn(&off, &names, dst, 0), dst, &names);
            assert_eq!(got, No(NoOutbound), "{what} {dst} under {off:?}");
        }
        // An empty allowlist is an allowlist: like `Only`, with no name bound to sniff for.
        let empty = policy(true, only(&[]), true);
        let got = short(&tcp_syn(&empty, &names, dst, 0), dst, &names);
        assert_eq!(&got, &wants[1], "{what} {dst} under an empty allowlist");
    }
}

#[test]
fn tcp_refusals_read_as_today() {
    let names = names();
    let table = [
        (
            policy(false, Allowlist::Any, false),
            "10.0.2.2:80",
            "TCP 10.0.2.2:80: the VM has no network access (forwarded ports only)",
        ),
        (
            policy(true, Allowlist::Any, true),
            "10.0.2.2:80",
            "TCP 10.0.2.2:80: no TCP service on the gateway",
        ),
        (
            policy(true, only(&["fixture.test"]), false),
            "198.18.200.200:8080",
            "TCP 198.18.200.200:8080: the address was never given in a DNS answer",
        ),
        (
            policy(true, Allowlist::Any, false),
            "169.254.169.254:80",
            "TCP 169.254.169.254:80: a host-internal address",
        ),
        (
            policy(true, Allowlist::Any, true),
            "224.0.0.251:5353",
            "TCP 224.0.0.251:5353: an unroutable address",
        ),
        (
            policy(true, only(&["fixture.test"]), true),
            "203.0.113.80:443",
            "TCP 203.0.113.80:443: connections to IP addresses are refused; connect by an allowed name",
        ),
    ];
    for (policy, dst, want) in table {
        let dst: SocketAddrV4 = dst.parse().unwrap();
        let TcpVerdict::Refuse(refusal) = tcp_syn(&policy, &names, dst, 0) else {
            panic!("{dst} accepted under {policy:?}");
        };
        assert_eq!(refusal.to_string(), want);
    }
}

#[test]
fn tcp_connections_are_bounded_after_the_policy() {
    let names = names();
    let any = policy(true, Allowlist::Any, false);
    let allowlist = policy(true, only(&["fixture.test"]), false);
    let public = SocketAddrV4::new(PUBLIC, 443);
    let bound = SocketAddrV4::new(addr("198.18.0.1"), 443);
    for (policy, dst) in [(&any, public), (&any, bound), (&allowlist, bound)] {
        let below = tcp_syn(policy, &names, dst, MAX_CONNECTIONS - 1);
        assert!(!matches!(below, TcpVerdict::Refuse(_)), "{below:?}");
        for open in [MAX_CONNECTIONS, MAX_CONNECTIONS + 5] {
            let TcpVerdict::Refuse(refusal) = tcp_syn(policy, &names, dst, open) else {
                panic!("{dst} accepted with {open} open");
            };
            assert_eq!(
                refusal.to_string(),
                format!("TCP {dst}: 128 connections are open")
            );
        }
    }
    // A destination the policy refuses says why, however many connections are open.
    let gateway = SocketAddrV4::new(GATEWAY, 80);
    assert_eq!(
        tcp_syn(&any, &names, gateway, MAX_CONNECTIONS),
        TcpVerdict::Refuse(Refusal::Tcp {
            dest: Destination::Addr(gateway),
            reason: TcpRefusal::Gateway
        })
    );
    assert!(forwarded_connection(MAX_CONNECTIONS - 1));
    assert!(!forwarded_connection(MAX_CONNECTIONS));
}

/// What a [`sniffed`] verdict should be, in short.
#[derive(Debug, PartialEq)]
enum Sniffed {
    Wait,
    Connect,
    No(TcpRefusal),
}

#[test]
fn presented_names() {
    use crate::sniff::Unnamed as Why;
    use Sniffed::*;
    use TcpRefusal::*;
    let binding = Binding {
        name: "fixture.test".into(),
        addrs: vec![PUBLIC],
    };
    let allowlist = policy(true, only(&["fixture.test"]), false);
    let http =
        |host: &str| format!("GET / HTTP/1.1\r\nHost: {host}\r\nAccept: */*\r\n\r\n").into_bytes();
    let hello = client_hello("fixture.test");
    let mut padded = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
    padded.resize(MAX_SNIFF_BYTES, b'a');
    // A hello in 1-byte handshake records never completes within the limit (both parsers stop
    // at the same limit as the sniffer, so they decide first).
    let mut tiny_records = vec![22, 3, 1, 0, 4, 1, 0, 0x30, 0];
    while tiny_records.len() < MAX_SNIFF_BYTES {
        tiny_records.extend_from_slice(&[22, 3, 1, 0, 1, 0]);
    }
    tiny_records.truncate(MAX_SNIFF_BYTES);
    let other_name = |name: &str| OtherName {
        presented: name.into(),
        bound: "fixture.test".into(),
    };
    let second = Duration::from_secs(1);
    let late = SNIFF_DEADLINE;
    // Rename the server_name extension (type 0 at the start of the extensions).
    let mut no_sni = hello.clone();
    let at = no_sni.len() - (2 + 2 + 2 + 1 + 2 + "fixture.test".len());
    no_sni[at + 1] = 0x99;
    // (what, bytes, elapsed, client still open, want)
    #[rustfmt::skip]
    let table: Vec<(&str, Vec<u8>, Duration, bool, Sniffed)> = vec![
        ("matching SNI",                 hello.clone(),                     second, true,  Connect),
        ("matching SNI, any case",       client_hello("Fixture.TEST"),      second, true,  Connect),
        ("matching SNI with a root dot", client_hello("fixture.test."),     second, true,  Connect),
        ("matching SNI, then FIN",       hello.clone(),                     second, false, Connect),
        ("matching SNI, late",           hello.clone(),                     late,   true,  Connect),
        ("matching Host",                http("fixture.test"),              second, true,  Connect),
        ("matching Host with a port",    http("fixture.test:8080"),         second, true,  Connect),
        ("matching Host, any case",      http("FIXTURE.test"),              second, true,  Connect),
        ("other SNI",                    client_hello("other.test"),        second, true,  No(other_name("other.test"))),
        ("other Host",                   http("other.test"),                second, true,  No(other_name("other.test"))),
        ("a subdomain is another name",  client_hello("www.fixture.test"),  second, true,  No(other_name("www.fixture.test"))),
        ("a suffix is another name",     http("badfixture.test"),           second, true,  No(other_name("badfixture.test"))),
        ("raw IP as SNI",                client_hello("203.0.113.80"),      second, true,  No(Unnamed(Why::MalformedHello))),
        ("raw IP as Host",               http("203.0.113.80"),              second, true,  No(Unnamed(Why::NotHttp))),
        ("raw IPv6 as Host",             http("[::1]:8080"),                second, true,  No(Unnamed(Why::NotHttp))),
        ("no Host",                      b"GET / HTTP/1.0\r\n\r\n".to_vec(),  second, true,  No(Unnamed(Why::NoHost))),
        ("TLS without SNI",              no_sni,                            second, true,  No(Unnamed(Why::NoServerName))),
        ("neither TLS nor HTTP",         b"SSH-2.0-OpenSSH_9.6\r\n".to_vec(), second, true,  No(Unnamed(Why::NotHttp))),
        ("nothing yet",                  Vec::new(),                        second, true,  Wait),
        ("incomplete hello",             hello[..hello.len() - 1].to_vec(), second, true,  Wait),
        ("incomplete head",              http("fixture.test")[..25].to_vec(), second, true, Wait),
        ("nothing by the deadline",      Vec::new(),                        late,   true,  No(NoNameInTime)),
        ("incomplete at the deadline",   hello[..10].to_vec(),              late,   true,  No(NoNameInTime)),
        ("FIN before anything",          Vec::new(),                        second, false, No(ClosedUnnamed)),
        ("FIN inside the head",          b"GET / HTTP/1.1\r\n".to_vec(),     second, false, No(ClosedUnnamed)),
        ("the size limit, HTTP",         padded,                            second, true,  No(Unnamed(Why::NotHttp))),
        ("the size limit, TLS",          tiny_records.clone(),              second, true,  No(Unnamed(Why::MalformedHello))),
        ("below the size limit, TLS",    tiny_records[..MAX_SNIFF_BYTES - 1].to_vec(), second, true, Wait),
    ];
    for (what, bytes, elapsed, client_open, want) in table {
        let progress = SniffProgress {
            bytes: &bytes,
            elapsed,
            client_open,
        };
        let got = match sniffed(&allowlist, &binding, 8080, progress) {
            SniffVerdict::Wait => Wait,
            SniffVerdict::Connect { .. } => Connect,
            SniffVerdict::Refuse(Refusal::Tcp {
                dest: Destination::Name { name, port: 8080 },
                reason,
            }) if name == "fixture.test" => No(reason),
            SniffVerdict::Refuse(other) => panic!("{what}: refused as {other:?}"),
        };
        assert_eq!(got, want, "{what}");
    }
}

#[test]
fn presented_name_refusals_read_as_today() {
    let binding = Binding {
        name: "fixture.test".into(),
        addrs: vec![PUBLIC],
    };
    let allowlist = policy(true, only(&["fixture.test"]), false);
    let table: [(&[u8], Duration, bool, &str); 5] = [
        (
            b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n",
            Duration::ZERO,
            true,
            "TCP fixture.test:8080: the client named \"other.test\" on an address resolved for \"fixture.test\"",
        ),
        (
            b"GET / HTTP/1.1\r\n",
            SNIFF_DEADLINE,
            true,
            "TCP fixture.test:8080: no TLS server name or HTTP Host within 10 s or 16384 bytes",
        ),
        (
            b"",
            Duration::ZERO,
            false,
            "TCP fixture.test:8080: the client closed the connection before presenting a name",
        ),
        (
            b"GET / HTTP/1.0\r\n\r\n",
            Duration::ZERO,
            true,
            "TCP fixture.test:8080: no name presented (HTTP request without a Host header)",
        ),
        (
            b"\x16\x02\x00",
            Duration::ZERO,
            true,
            "TCP fixture.test:8080: no name presented (TLS handshake record of an unknown version)",
        ),
    ];
    for (bytes, elapsed, client_open, want) in table {
        let progress = SniffProgress {
            bytes,
            elapsed,
            client_open,
        };
        let SniffVerdict::Refuse(refusal) = sniffed(&allowlist, &binding, 8080, progress) else {
            panic!("{want}: not refused");
        };
        assert_eq!(refusal.to_string(), want);
    }
    // A name bound before the allowlist stopped permitting it (not a state the gateway
    // reaches: the allowlist of a VM never changes) is still refused.
    let elsewhere = policy(true, only(&["other.test"]), false);
    let progress = SniffProgress {
        bytes: &client_hello("fixture.test"),
        elapsed: Duration::ZERO,
        client_open: true,
    };
    let SniffVerdict::Refuse(refusal) = sniffed(&elsewhere, &binding, 443, progress) else {
        panic!("an unlisted name was let through");
    };
    assert_eq!(
        refusal.to_string(),
        "TCP fixture.test:443: the client named \"fixture.test\", which is not in the allowlist"
    );
}

/// What a [`dns_query`] verdict should be, in short.
#[derive(Debug, PartialEq)]
enum Dns {
    /// Look this name up.
    Lookup(&'static str),
    /// Answer now, reporting this refusal.
    Answer(DnsAnswer, Option<&'static str>),
    /// FORMERR with this id.
    FormErr(u16),
    /// No answer at all.
    Silent,
}

fn dns_short(verdict: &DnsVerdict) -> (Dns, Option<String>) {
    match verdict {
        DnsVerdict::Lookup(query) => (Dns::Lookup(""), Some(query.name.clone())),
        DnsVerdict::Answer(answered) => (
            Dns::Answer(answered.answer.clone(), None),
            answered.refusal.as_ref().map(|r| r.to_string()),
        ),
        DnsVerdict::Malformed { id: Some(id), .. } => (Dns::FormErr(*id), None),
        DnsVerdict::Malformed { id: None, .. } => (Dns::Silent, None),
    }
}

#[test]
fn dns_verdicts() {
    use Dns::*;
    use dns::{CLASS_IN, TYPE_A, TYPE_AAAA};
    const TYPE_MX: u16 = 15;
    const TYPE_TXT: u16 = 16;
    const TYPE_ANY: u16 = 255;
    const CLASS_CH: u16 = 3;
    let listed = policy(true, only(&["fixture.test", "api.example.test"]), false);
    let any = policy(true, Allowlist::Any, false);
    let off = policy(false, Allowlist::Any, true);
    let empty = policy(true, only(&[]), false);
    let q = query;
    let a = |name: &str| query(1, name, TYPE_A, CLASS_IN);
    let nx = |refusal| Answer(DnsAnswer::Error(Rcode::NxDomain), Some(refusal));
    let refused = |refusal| Answer(DnsAnswer::Error(Rcode::Refused), Some(refusal));
    let error = |rcode| Answer(DnsAnswer::Error(rcode), None);
    let no_data = || Answer(DnsAnswer::NoData, None);
    let response = {
        let mut packet = query(7, "fixture.test", TYPE_A, CLASS_IN);
        packet[2] |= 0x80;
        packet
    };
    let compressed = {
        let mut packet = query(8, "", TYPE_A, CLASS_IN);
        packet.truncate(12);
        packet.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        packet
    };
    let two_questions = {
        let mut packet = query(9, "fixture.test", TYPE_A, CLASS_IN);
        packet[5] = 2;
        packet
    };
    // (what, policy, packet, lookups in flight, want)
    #[rustfmt::skip]
    let table: Vec<(&str, &Policy, Vec<u8>, usize, Dns)> = vec![
        ("allowed A",                     &listed, a("fixture.test"),         0, Lookup("fixture.test")),
        ("allowed A, any case",           &listed, a("FIXTURE.Test"),         0, Lookup("fixture.test")),
        ("subdomain of a listed name",    &listed, a("www.fixture.test"),     0, Lookup("www.fixture.test")),
        ("listed subdomain",              &listed, a("api.example.test"),     0, Lookup("api.example.test")),
        ("below a listed subdomain",      &listed, a("v2.api.example.test"),  0, Lookup("v2.api.example.test")),
        ("parent of a listed subdomain",  &listed, a("example.test"),         0, nx("DNS example.test: not in the allowlist")),
        ("sibling of a listed subdomain", &listed, a("www.example.test"),     0, nx("DNS www.example.test: not in the allowlist")),
        ("unlisted",                      &listed, a("other.test"),           0, nx("DNS other.test: not in the allowlist")),
        ("unlisted subdomain",            &listed, a("www.other.test"),       0, nx("DNS www.other.test: not in the allowlist")),
        ("a listed name as a suffix",     &listed, a("badfixture.test"),      0, nx("DNS badfixture.test: not in the allowlist")),
        ("the root",                      &listed, a(""),                     0, nx("DNS .: not in the allowlist")),
        ("empty allowlist",               &empty,  a("fixture.test"),         0, nx("DNS fixture.test: not in the allowlist")),
        ("unlisted AAAA",                 &listed, q(1, "other.test", TYPE_AAAA, CLASS_IN), 0, nx("DNS other.test: not in the allowlist")),
        ("unlisted, lookups saturated",   &listed, a("other.test"), MAX_LOOKUPS, nx("DNS other.test: not in the allowlist")),
        ("allowed AAAA",                  &listed, q(1, "fixture.test", TYPE_AAAA, CLASS_IN), 0, no_data()),
        ("allowed MX",                    &listed, q(1, "fixture.test", TYPE_MX, CLASS_IN),   0, no_data()),
        ("allowed TXT",                   &listed, q(1, "fixture.test", TYPE_TXT, CLASS_IN),  0, no_data()),
        ("allowed ANY",                   &listed, q(1, "fixture.test", TYPE_ANY, CLASS_IN),  0, no_data()),
        ("class CH",                      &listed, q(1, "fixture.test", TYPE_A, CLASS_CH),    0, error(Rcode::NotImp)),
        ("class CH, unlisted",            &listed, q(1, "other.test", TYPE_A, CLASS_CH),      0, error(Rcode::NotImp)),
        ("one lookup below the bound",    &listed, a("fixture.test"), MAX_LOOKUPS - 1, Lookup("fixture.test")),
        ("lookup bound reached",          &listed, a("fixture.test"), MAX_LOOKUPS,     error(Rcode::ServFail)),
        ("lookup bound reached, AAAA",    &listed, q(1, "fixture.test", TYPE_AAAA, CLASS_IN), MAX_LOOKUPS, error(Rcode::ServFail)),
        ("no allowlist",                  &any,    a("anything.example"),     0, Lookup("anything.example")),
        ("no allowlist, AAAA",            &any,    q(1, "anything.example", TYPE_AAAA, CLASS_IN), 0, no_data()),
        ("no allowlist, the root",        &any,    a(""),                     0, nx("DNS .: not in the allowlist")),
        ("network off",                   &off,    a("fixture.test"),         0, refused("DNS fixture.test: the VM has no network access (forwarded ports only)")),
        ("network off, other class",      &off,    q(1, "fixture.test", TYPE_A, CLASS_CH), 0, refused("DNS fixture.test: the VM has no network access (forwarded ports only)")),
        ("a response",                    &listed, response,                  0, FormErr(7)),
        ("a compression pointer",         &listed, compressed,                0, FormErr(8)),
        ("two questions",                 &listed, two_questions,             0, FormErr(9)),
        ("an invalid name",               &listed, q(10, "-bad-.test", TYPE_A, CLASS_IN), 0, FormErr(10)),
        ("an IP address as the name",     &any,    q(12, "10.0.0.1", TYPE_A, CLASS_IN),   0, FormErr(12)),
        ("truncated, network off",        &off,    q(11, "fixture.test", TYPE_A, CLASS_IN)[..20].to_vec(), 0, FormErr(11)),
        ("no header",                     &listed, vec![0, 1, 2, 3, 4],       0, Silent),
        ("nothing",                       &listed, Vec::new(),                0, Silent),
        ("oversized",                     &listed, vec![0; 600],              0, FormErr(0)),
    ];
    for (what, policy, packet, lookups, want) in table {
        let verdict = dns_query(policy, &packet, lookups);
        let (got, detail) = dns_short(&verdict);
        match want {
            Lookup(name) => {
                assert_eq!(got, Lookup(""), "{what}");
                assert_eq!(detail.as_deref(), Some(name), "{what}");
                assert_eq!(verdict.reply(), None, "{what}");
            }
            Answer(answer, refusal) => {
                assert_eq!(got, Answer(answer, None), "{what}");
                assert_eq!(detail.as_deref(), refusal, "{what}");
            }
            other => assert_eq!(got, other, "{what}"),
        }
    }
}

/// The RCODE and ANCOUNT of an answer packet.
fn rcode_and_count(answer: &[u8]) -> (u8, u16) {
    (answer[3] & 0x0f, u16::from_be_bytes([answer[6], answer[7]]))
}

#[test]
fn dns_replies_on_the_wire() {
    let listed = policy(true, only(&["fixture.test"]), false);
    let packet = query(0x1234, "other.test", dns::TYPE_A, dns::CLASS_IN);
    let reply = dns_query(&listed, &packet, 0).reply().unwrap();
    assert_eq!(&reply[..2], &[0x12, 0x34]);
    assert_eq!(rcode_and_count(&reply), (3, 0), "NXDOMAIN");
    let packet = query(1, "fixture.test", dns::TYPE_AAAA, dns::CLASS_IN);
    let reply = dns_query(&listed, &packet, 0).reply().unwrap();
    assert_eq!(rcode_and_count(&reply), (0, 0), "no data");
    let mut packet = query(0x4321, "fixture.test", dns::TYPE_A, dns::CLASS_IN);
    packet[2] |= 0x80;
    let reply = dns_query(&listed, &packet, 0).reply().unwrap();
    assert_eq!(reply.len(), 12);
    assert_eq!(&reply[..2], &[0x43, 0x21]);
    assert_eq!(rcode_and_count(&reply), (1, 0), "FORMERR");

    let packet = query(5, "fixture.test", dns::TYPE_A, dns::CLASS_IN);
    let DnsVerdict::Lookup(q) = dns_query(&listed, &packet, 0) else {
        panic!("not looked up");
    };
    let mut names = NameTable::new();
    let answered = dns_resolved(q, &Lookup::Found(vec![PUBLIC]), &mut names);
    let reply = answered.to_bytes();
    assert_eq!(rcode_and_count(&reply), (0, 1));
    // The record ends with its TTL, length and the virtual address.
    let record = &reply[reply.len() - 10..];
    assert_eq!(&record[..4], &DNS_TTL.to_be_bytes());
    assert_eq!(&record[4..], &[0, 4, 198, 18, 0, 1]);
}

#[test]
fn dns_answers_after_the_lookup() {
    let a = |name: &str| dns::parse_query(&query(3, name, dns::TYPE_A, dns::CLASS_IN)).unwrap();
    let mut names = NameTable::new();
    let table: Vec<(&str, Lookup, DnsAnswer, Option<&str>)> = vec![
        (
            "fixture.test",
            Lookup::Found(vec![PUBLIC]),
            DnsAnswer::Addr(addr("198.18.0.1")),
            None,
        ),
        (
            "other.test",
            Lookup::Found(vec![addr("203.0.113.9")]),
            DnsAnswer::Addr(addr("198.18.0.2")),
            None,
        ),
        // The same name keeps its address; its real addresses are refreshed.
        (
            "fixture.test",
            Lookup::Found(vec![addr("203.0.113.7")]),
            DnsAnswer::Addr(addr("198.18.0.1")),
            None,
        ),
        (
            "internal.test",
            Lookup::Nothing { forbidden: 2 },
            DnsAnswer::Error(Rcode::NxDomain),
            Some("DNS internal.test: resolves only to host-internal addresses"),
        ),
        (
            "missing.test",
            Lookup::Nothing { forbidden: 0 },
            DnsAnswer::Error(Rcode::NxDomain),
            None,
        ),
        (
            "broken.test",
            Lookup::Failed,
            DnsAnswer::Error(Rcode::ServFail),
            None,
        ),
    ];
    for (name, lookup, answer, refusal) in table {
        let answered = dns_resolved(a(name), &lookup, &mut names);
        assert_eq!(answered.answer, answer, "{name}");
        assert_eq!(
            answered.refusal.map(|r| r.to_string()).as_deref(),
            refusal,
            "{name}"
        );
        assert_eq!(answered.query.name, name);
    }
    assert_eq!(
        names.lookup(addr("198.18.0.1")).unwrap().addrs,
        vec![addr("203.0.113.7")]
    );
    assert_eq!(
        names.lookup(addr("198.18.0.3")),
        None,
        "failed lookups bind nothing"
    );

    // A full table answers SERVFAIL for new names and still answers bound ones.
    let mut full = NameTable::new();
    for i in 0..crate::policy::MAX_BOUND_NAMES {
        full.bind(&format!("n{i}.test"), vec![PUBLIC]).unwrap();
    }
    let found = Lookup::Found(vec![PUBLIC]);
    let answered = dns_resolved(a("one-more.test"), &found, &mut full);
    assert_eq!(answered.answer, DnsAnswer::Error(Rcode::ServFail));
    assert_eq!(answered.refusal, None);
    let answered = dns_resolved(a("n0.test"), &found, &mut full);
    assert_eq!(answered.answer, DnsAnswer::Addr(addr("198.18.0.1")));
}

#[test]
fn usable_addrs_keep_what_the_gateway_may_connect_to() {
    let lo = Ipv4Addr::LOCALHOST;
    let metadata = addr("169.254.169.254");
    let private = addr("10.1.2.3");
    let multicast = addr("224.0.0.1");
    let wire_server = addr("168.63.129.16");
    let table: Vec<(Vec<Ipv4Addr>, bool, Lookup)> = vec![
        (
            vec![lo, PUBLIC, metadata, PUBLIC],
            false,
            Lookup::Found(vec![PUBLIC]),
        ),
        (
            vec![wire_server, HOST_OWN, PUBLIC],
            false,
            Lookup::Found(vec![PUBLIC]),
        ),
        (
            vec![wire_server, HOST_OWN],
            false,
            Lookup::Nothing { forbidden: 2 },
        ),
        (
            vec![wire_server, HOST_OWN],
            true,
            Lookup::Found(vec![wire_server, HOST_OWN]),
        ),
        (
            vec![lo, metadata, private],
            false,
            Lookup::Nothing { forbidden: 3 },
        ),
        (
            vec![lo, metadata, private],
            true,
            Lookup::Found(vec![lo, metadata, private]),
        ),
        (
            vec![multicast, addr("0.0.0.0")],
            true,
            Lookup::Nothing { forbidden: 2 },
        ),
        (
            vec![addr("198.18.0.1")],
            true,
            Lookup::Nothing { forbidden: 1 },
        ),
        (vec![], false, Lookup::Nothing { forbidden: 0 }),
        (
            (1..=20).map(|i| Ipv4Addr::new(203, 0, 113, i)).collect(),
            false,
            Lookup::Found((1..=8).map(|i| Ipv4Addr::new(203, 0, 113, i)).collect()),
        ),
    ];
    for (addrs, allow_internal, want) in table {
        assert_eq!(
            usable_addrs(addrs.clone(), &policy(true, Allowlist::Any, allow_internal)),
            want,
            "{addrs:?}"
        );
    }
}

#[test]
fn udp_verdicts() {
    let forwarded = 30000..30002;
    let table: &[(&str, Range<u16>, Option<UdpVerdict>)] = &[
        ("10.0.2.2:53", forwarded.clone(), Some(UdpVerdict::Dns)),
        ("10.0.2.2:53", 0..0, Some(UdpVerdict::Dns)),
        (
            "10.0.2.2:30000",
            forwarded.clone(),
            Some(UdpVerdict::Forwarded),
        ),
        (
            "10.0.2.2:30001",
            forwarded.clone(),
            Some(UdpVerdict::Forwarded),
        ),
        ("10.0.2.2:30002", forwarded.clone(), None),
        ("10.0.2.2:30000", 30000..30000, None),
        ("10.0.2.2:5353", forwarded.clone(), None),
        ("10.0.2.2:123", forwarded.clone(), None),
        ("198.18.200.200:53", forwarded.clone(), None),
        ("198.18.0.1:5353", forwarded.clone(), None),
        ("8.8.8.8:53", forwarded.clone(), None),
        ("127.0.0.1:30000", forwarded.clone(), None),
        ("255.255.255.255:67", forwarded.clone(), None),
    ];
    for (dst, ports, want) in table {
        let dst: SocketAddrV4 = dst.parse().unwrap();
        let got = udp_datagram(dst, ports.clone());
        match want {
            Some(want) => assert_eq!(&got, want, "{dst}"),
            None => assert_eq!(
                got,
                UdpVerdict::Refuse(Refusal::Udp { dst }),
                "{dst} with {ports:?}"
            ),
        }
    }
    assert_eq!(
        Refusal::Udp {
            dst: "198.18.200.200:53".parse().unwrap()
        }
        .to_string(),
        "UDP 198.18.200.200:53: only DNS to the gateway (10.0.2.2:53)"
    );
}

fn any_policy() -> impl Strategy<Value = Policy> {
    (
        any::<bool>(),
        prop_oneof![
            Just(Allowlist::Any),
            Just(only(&[])),
            Just(only(&["fixture.test"])),
            Just(only(&["fixture.test", "other.test"])),
        ],
        any::<bool>(),
    )
        .prop_map(|(outbound, allowlist, allow_internal)| {
            policy(outbound, allowlist, allow_internal)
        })
}

proptest! {
    #[test]
    fn tcp_syn_never_lets_through_what_the_policy_forbids(
        policy in any_policy(),
        bits in prop_oneof![any::<u32>(), (0u32..8).prop_map(|n| u32::from(Ipv4Addr::new(198, 18, 0, 0)) + n), Just(u32::from(HOST_OWN)), Just(u32::from(Ipv4Addr::new(168, 63, 129, 16)))],
        port in any::<u16>(),
        open in 0usize..200,
    ) {
        let names = names();
        let dst = SocketAddrV4::new(Ipv4Addr::from(bits), port);
        let addr = *dst.ip();
        match tcp_syn(&policy, &names, dst, open) {
            TcpVerdict::Sniff { binding, port: p } => {
                prop_assert!(policy.outbound && open < MAX_CONNECTIONS);
                prop_assert!(matches!(policy.allowlist, Allowlist::Only(_)));
                prop_assert_eq!(Some(&binding), names.lookup(addr));
                prop_assert_eq!(p, port);
            }
            TcpVerdict::Connect { dest, addrs } => {
                prop_assert!(policy.outbound && open < MAX_CONNECTIONS);
                prop_assert_eq!(&policy.allowlist, &Allowlist::Any);
                prop_assert!(addr != GATEWAY);
                match dest {
                    Destination::Addr(to) => {
                        prop_assert_eq!(to, dst);
                        prop_assert_eq!(addrs, vec![addr]);
                        prop_assert!(host_may_connect(addr, policy.allow_internal, &policy.host_addrs));
                        prop_assert!(policy.allow_internal || (addr != HOST_OWN && classify(addr) == AddressClass::Public));
                    }
                    Destination::Name { name, .. } => {
                        prop_assert_eq!(Some(&name), names.lookup(addr).map(|b| &b.name));
                    }
                }
            }
            TcpVerdict::Refuse(Refusal::Tcp { dest: Destination::Addr(to), reason }) => {
                prop_assert_eq!(to, dst);
                if !policy.outbound {
                    prop_assert_eq!(reason, TcpRefusal::NoOutbound);
                }
            }
            TcpVerdict::Refuse(other) => prop_assert!(false, "{other:?}"),
        }
    }

    #[test]
    fn dns_query_never_panics_and_looks_up_only_allowed_a_queries(
        policy in any_policy(),
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        lookups in 0usize..20,
    ) {
        let verdict = dns_query(&policy, &bytes, lookups);
        if let Some(reply) = verdict.reply() {
            prop_assert!(reply.len() <= 512);
            prop_assert_eq!(reply.get(..2), bytes.get(..2));
        }
        if let DnsVerdict::Lookup(query) = verdict {
            prop_assert!(policy.outbound && lookups < MAX_LOOKUPS);
            prop_assert!(policy.allowlist.permits(&query.name));
            prop_assert_eq!((query.qtype, query.qclass), (dns::TYPE_A, dns::CLASS_IN));
        }
    }

    #[test]
    fn dns_query_of_generated_names(
        policy in any_policy(),
        labels in proptest::collection::vec("[a-zA-Z][a-zA-Z0-9-]{0,10}[a-zA-Z0-9]", 1..4),
        qtype in any::<u16>(),
    ) {
        let name = labels.join(".");
        let verdict = dns_query(&policy, &query(1, &name, qtype, dns::CLASS_IN), 0);
        let permitted = policy.outbound && policy.allowlist.permits(&name);
        match verdict {
            DnsVerdict::Lookup(query) => {
                prop_assert!(permitted && qtype == dns::TYPE_A);
                prop_assert_eq!(query.name, name.to_ascii_lowercase());
            }
            DnsVerdict::Answer(Answered { answer: DnsAnswer::NoData, refusal: None, .. }) => {
                prop_assert!(permitted && qtype != dns::TYPE_A);
            }
            DnsVerdict::Answer(Answered { answer: DnsAnswer::Error(_), refusal: Some(_), .. }) => {
                prop_assert!(!permitted);
            }
            other => prop_assert!(false, "{other:?}"),
        }
    }

    #[test]
    fn sniffed_decides_by_the_deadline_and_connects_only_the_bound_name(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        millis in 0u64..20_000,
        client_open in any::<bool>(),
    ) {
        let binding = Binding { name: "fixture.test".into(), addrs: vec![PUBLIC] };
        let allowlist = policy(true, only(&["fixture.test"]), false);
        let elapsed = Duration::from_millis(millis);
        let verdict = sniffed(&allowlist, &binding, 443, SniffProgress { bytes: &bytes, elapsed, client_open });
        match verdict {
            SniffVerdict::Wait => prop_assert!(elapsed < SNIFF_DEADLINE && client_open),
            SniffVerdict::Connect { framer } => {
                let consistent = match sniff(&bytes) {
                    Presented::Tls(name) => name == "fixture.test" && framer.is_none(),
                    Presented::Http(name) => name == "fixture.test" && framer.is_some(),
                    _ => false,
                };
                prop_assert!(consistent);
            }
            SniffVerdict::Refuse(_) => {}
        }
    }

    #[test]
    fn sniffed_connects_exactly_the_bound_name(
        labels in proptest::collection::vec("[a-z][a-z0-9-]{0,10}[a-z0-9]", 1..4),
        upper in any::<bool>(),
        tls in any::<bool>(),
    ) {
        let bound = labels.join(".");
        let binding = Binding { name: bound.clone(), addrs: vec![PUBLIC] };
        let on = policy(true, Allowlist::Only(vec![bound.clone()]), false);
        let progress = |bytes: &[u8]| -> SniffVerdict {
            sniffed(&on, &binding, 443, SniffProgress { bytes, elapsed: Duration::ZERO, client_open: true })
        };
        let present = |name: &str| if tls {
            client_hello(name)
        } else {
            format!("GET / HTTP/1.1\r\nHost: {name}\r\n\r\n").into_bytes()
        };
        let shown = if upper { bound.to_ascii_uppercase() } else { bound.clone() };
        let framed = matches!(progress(&present(&shown)), SniffVerdict::Connect { framer } if framer.is_some() != tls);
        prop_assert!(framed);
        let sub = format!("www.{bound}");
        prop_assert!(matches!(progress(&present(&sub)), SniffVerdict::Refuse(_)));
        let glued = format!("x{bound}");
        prop_assert!(matches!(progress(&present(&glued)), SniffVerdict::Refuse(_)));
    }
}
