//! Parses arbitrary bytes as a DNS query, builds every answer from any query it accepts, and
//! lets the gateway's verdict decide it under each kind of policy.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use sbx_net::dns::{
    MAX_QUERY_BYTES, Rcode, answer_a, answer_error, answer_formerr, parse_query, query_id,
};
use sbx_net::policy::Allowlist;
use sbx_net::verdict::{DnsVerdict, Policy, dns_query};

fuzz_target!(|data: &[u8]| {
    for (outbound, allowlist) in [
        (true, Allowlist::Any),
        (true, Allowlist::Only(vec!["example.com".into()])),
        (false, Allowlist::Any),
    ] {
        let policy = Policy {
            outbound,
            allowlist,
            allow_internal: false,
            host_addrs: Default::default(),
        };
        let verdict = dns_query(&policy, data, 0);
        if let Some(reply) = verdict.reply() {
            assert!(reply.len() <= 512);
        }
        if let DnsVerdict::Lookup(query) = verdict {
            assert!(policy.outbound && policy.allowlist.permits(&query.name));
        }
    }
    let id = query_id(data);
    assert_eq!(id.is_some(), data.len() >= 12);
    match parse_query(data) {
        Ok(query) => {
            assert_eq!(Some(query.id), id);
            assert!(data.len() <= MAX_QUERY_BYTES);
            assert!(query.name.len() <= 253);
            // The bytes after the header seed the addresses.
            let addrs: Vec<Ipv4Addr> = data
                .chunks_exact(4)
                .take(40)
                .map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3]))
                .collect();
            for answer in [
                answer_a(&query, &addrs, 60),
                answer_a(&query, &[], 0),
                answer_error(&query, Rcode::NxDomain),
                answer_error(&query, Rcode::ServFail),
            ] {
                assert!(answer.len() <= 512);
                assert_eq!(answer.get(..2), Some(&query.id.to_be_bytes()[..]));
                assert_eq!(
                    answer.get(12..12 + query.question.len()),
                    Some(&query.question[..])
                );
            }
            // With QR cleared, an error answer is the query again.
            let mut echoed = answer_error(&query, Rcode::Refused);
            echoed[2] &= 0x7f;
            assert_eq!(parse_query(&echoed).as_ref(), Ok(&query));
        }
        Err(error) => {
            let _ = error.to_string();
            if let Some(id) = id {
                assert_eq!(answer_formerr(id).len(), 12);
            }
        }
    }
});
