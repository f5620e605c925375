//! Parses arbitrary bytes as the start of a TLS connection, whole and split into records, and
//! lets the gateway's verdict decide the connection.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use sbx_net::policy::{Allowlist, Binding, validate_domain};
use sbx_net::sni::{ClientHello, parse_client_hello};
use sbx_net::sniff::{Presented, sniff};
use sbx_net::verdict::{Policy, SniffProgress, SniffVerdict, sniffed};

fuzz_target!(|data: &[u8]| {
    let whole = parse_client_hello(data);
    if let ClientHello::ServerName(name) = &whole {
        assert_eq!(validate_domain(name).as_ref(), Ok(name));
    }
    // The same bytes as the payload of handshake records of `chunk` bytes each: a reassembled
    // hello must be judged the same.
    if let Some((&chunk, payload)) = data.split_first() {
        let chunk = usize::from(chunk).max(1);
        let mut single = vec![22, 3, 1];
        single.extend_from_slice(&(payload.len().min(16384) as u16).to_be_bytes());
        single.extend_from_slice(&payload[..payload.len().min(16384)]);
        let mut split = Vec::new();
        for piece in payload[..payload.len().min(16384)].chunks(chunk) {
            split.extend_from_slice(&[22, 3, 1]);
            split.extend_from_slice(&(piece.len() as u16).to_be_bytes());
            split.extend_from_slice(piece);
        }
        let (a, b) = (parse_client_hello(&single), parse_client_hello(&split));
        if split.len() < sbx_net::sni::MAX_CLIENT_HELLO_BYTES {
            if let (ClientHello::ServerName(_) | ClientHello::NoServerName, _) = (&a, &b) {
                assert_eq!(a, b);
            }
        }
    }
    let presented = sniff(data);
    if data.first() == Some(&0x16) {
        assert!(!matches!(presented, Presented::Http(_)));
    }
    let policy = Policy {
        outbound: true,
        allowlist: Allowlist::Only(vec!["example.com".into()]),
        allow_internal: false,
        host_addrs: Default::default(),
    };
    let binding = Binding {
        name: "example.com".into(),
        addrs: Vec::new(),
    };
    let progress = SniffProgress {
        bytes: data,
        elapsed: Duration::ZERO,
        client_open: true,
    };
    if let SniffVerdict::Connect { framer } = sniffed(&policy, &binding, 443, progress) {
        match presented {
            Presented::Tls(n) => assert!(n == "example.com" && framer.is_none()),
            Presented::Http(n) => assert!(n == "example.com" && framer.is_some()),
            other => panic!("connected on {other:?}"),
        }
    }
});
