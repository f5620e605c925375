//! Network policy of exec-sandbox.
//!
//! Everything the host gateway decides about a guest's traffic is here, as pure functions over
//! bytes and addresses: no I/O, no async runtime. The parsers read bytes the guest controls, so
//! they are bounded, never panic, and are fuzzed (`fuzz/fuzz_targets/{dns_query,client_hello,
//! http_host}.rs`).
//!
//! - [`dns`]: the one-question DNS queries the gateway answers, and its answers.
//! - [`sni`]: the server name of a TLS ClientHello.
//! - [`http`]: the `Host` of a plain HTTP/1 request.
//! - [`framing`]: every request of a plain-HTTP connection, framed to check each one's `Host`.
//! - [`sniff`]: which name the first bytes of a TCP connection present (TLS or HTTP).
//! - [`policy`]: domain validation, the allowlist, destination address classes, and the table
//!   binding the addresses handed to a guest to the names they were resolved for.
//! - [`verdict`]: the gateway's decisions (TCP SYNs, DNS queries and lookups, datagrams, the name
//!   a connection presents) as pure functions returning typed verdicts, and the refusals users
//!   see.

pub mod dns;
pub mod framing;
pub mod http;
pub mod policy;
pub mod sni;
pub mod sniff;
#[cfg(test)]
mod testing;
pub mod verdict;
