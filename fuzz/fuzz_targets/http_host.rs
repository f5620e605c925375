//! Parses arbitrary bytes as the start of a plain HTTP connection, and sniffs them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sbx_net::http::{RequestHost, parse_request_host};
use sbx_net::policy::validate_domain;
use sbx_net::sniff::{Presented, sniff};

fuzz_target!(|data: &[u8]| {
    let parsed = parse_request_host(data);
    if let RequestHost::Host { name, .. } = &parsed {
        assert_eq!(validate_domain(name).as_ref(), Ok(name));
    }
    // Arbitrary bytes as a `Host` value.
    let mut head = b"GET / HTTP/1.1\r\nHost: ".to_vec();
    head.extend_from_slice(data);
    head.extend_from_slice(b"\r\n\r\n");
    if let RequestHost::Host { name, .. } = parse_request_host(&head) {
        assert_eq!(validate_domain(&name), Ok(name));
    }
    match (sniff(data), parsed) {
        (Presented::Http(a), RequestHost::Host { name: b, .. }) => assert_eq!(a, b),
        (Presented::Http(_), _) => panic!("sniff found a Host the parser did not"),
        _ => {}
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = validate_domain(text);
    }
});
