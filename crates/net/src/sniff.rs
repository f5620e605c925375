//! Which name a TCP connection presents in its first bytes: TLS SNI, or HTTP `Host`.

use crate::http::{RequestHost, parse_request_host};
use crate::sni::{ClientHello, parse_client_hello};

/// Most bytes buffered before a connection must have presented a name.
pub const MAX_SNIFF_BYTES: usize = 16 * 1024;

/// The name a connection presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presented {
    /// TLS with this server name.
    Tls(String),
    /// Plain HTTP with this `Host`.
    Http(String),
    /// Not decided yet: read more bytes (the gateway enforces a deadline:
    /// [`crate::verdict::SNIFF_DEADLINE`]).
    NeedMore,
    /// No name can be found, and why.
    Unnamed(Unnamed),
}

/// Why the first bytes of a connection present no name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unnamed {
    /// A ClientHello without the server_name extension.
    #[error("TLS ClientHello without a server name")]
    NoServerName,
    /// A handshake record whose version is not TLS 1.0-1.3.
    #[error("TLS handshake record of an unknown version")]
    TlsVersion,
    /// A ClientHello that does not parse, or whose server name is not a valid host name (an IP
    /// address literal, for example).
    #[error("malformed TLS ClientHello or invalid server name")]
    MalformedHello,
    /// An HTTP/1 request head without `Host`.
    #[error("HTTP request without a Host header")]
    NoHost,
    /// Neither TLS nor an HTTP/1 request head with a valid `Host` (an IP address literal, for
    /// example).
    #[error("neither TLS nor an HTTP/1 request with a valid Host")]
    NotHttp,
    /// [`MAX_SNIFF_BYTES`] bytes without a decision.
    #[error("no name in the first 16 KiB of the connection")]
    TooLong,
}

/// Decides what `start` presents (TLS first, then HTTP/1.x).
///
/// A first byte of 0x16 (a TLS handshake record) means TLS; anything else is read as HTTP/1.x.
/// [`MAX_SNIFF_BYTES`] or more without a decision is [`Presented::Unnamed`].
pub fn sniff(start: &[u8]) -> Presented {
    let Some(&first) = start.first() else {
        return Presented::NeedMore;
    };
    let decided = if first == 0x16 {
        match parse_client_hello(start) {
            ClientHello::ServerName(name) => Presented::Tls(name),
            ClientHello::Incomplete => Presented::NeedMore,
            ClientHello::NoServerName => Presented::Unnamed(Unnamed::NoServerName),
            ClientHello::NotTls => Presented::Unnamed(Unnamed::TlsVersion),
            ClientHello::Malformed => Presented::Unnamed(Unnamed::MalformedHello),
        }
    } else {
        match parse_request_host(start) {
            RequestHost::Host { name, .. } => Presented::Http(name),
            RequestHost::Incomplete => Presented::NeedMore,
            RequestHost::Missing => Presented::Unnamed(Unnamed::NoHost),
            RequestHost::Invalid => Presented::Unnamed(Unnamed::NotHttp),
        }
    };
    if decided == Presented::NeedMore && start.len() >= MAX_SNIFF_BYTES {
        return Presented::Unnamed(Unnamed::TooLong);
    }
    decided
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::client_hello;
    use proptest::prelude::*;

    #[test]
    fn tls() {
        let hello = client_hello("Files.Example.NET");
        assert_eq!(sniff(&hello), Presented::Tls("files.example.net".into()));
        for len in 1..hello.len() {
            assert_eq!(sniff(&hello[..len]), Presented::NeedMore, "prefix {len}");
        }
        assert!(matches!(
            sniff(&client_hello("10.0.0.1")),
            Presented::Unnamed(_)
        ));
        assert!(matches!(
            sniff(b"\x16\x03\x01\x00\x00"),
            Presented::Unnamed(_)
        ));
        assert!(matches!(sniff(b"\x16\x02\x00"), Presented::Unnamed(_)));
    }

    #[test]
    fn tls_without_a_name() {
        let mut hello = client_hello("example.com");
        // Rename the server_name extension (type 0 at the start of the extensions block).
        let at = hello.len() - (2 + 2 + 2 + 1 + 2 + "example.com".len());
        assert_eq!(&hello[at..at + 2], [0, 0]);
        hello[at + 1] = 0x99;
        assert_eq!(sniff(&hello), Presented::Unnamed(Unnamed::NoServerName));
    }

    #[test]
    fn http() {
        let get = b"GET / HTTP/1.1\r\nHost: Example.com:8080\r\n\r\n";
        assert_eq!(sniff(get), Presented::Http("example.com".into()));
        for len in 1..get.len() {
            assert_eq!(sniff(&get[..len]), Presented::NeedMore, "prefix {len}");
        }
        assert_eq!(
            sniff(b"GET / HTTP/1.0\r\n\r\n"),
            Presented::Unnamed(Unnamed::NoHost)
        );
        assert!(matches!(
            sniff(b"SSH-2.0-OpenSSH_9.6\r\n"),
            Presented::Unnamed(_)
        ));
        assert!(matches!(sniff(b"\x00\x00\x00\x01"), Presented::Unnamed(_)));
        assert!(matches!(
            sniff(b"GET http://evil.example/ HTTP/1.1\r\nHost: example.com\r\n\r\n"),
            Presented::Unnamed(_)
        ));
    }

    #[test]
    fn nothing_yet() {
        assert_eq!(sniff(b""), Presented::NeedMore);
    }

    #[test]
    fn undecided_after_the_limit() {
        let mut head = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
        head.resize(MAX_SNIFF_BYTES - 1, b'a');
        assert_eq!(sniff(&head), Presented::NeedMore);
        head.push(b'a');
        assert!(matches!(sniff(&head), Presented::Unnamed(_)));
        head.resize(MAX_SNIFF_BYTES * 3, b'a');
        assert!(matches!(sniff(&head), Presented::Unnamed(_)));

        // TLS records of 1 byte each never complete a hello within the limit.
        let mut tls = Vec::new();
        tls.extend_from_slice(&[22, 3, 1, 0, 4, 1, 0, 0x30, 0]);
        while tls.len() < MAX_SNIFF_BYTES * 2 {
            tls.extend_from_slice(&[22, 3, 1, 0, 1, 0]);
        }
        assert_eq!(sniff(&tls[..MAX_SNIFF_BYTES - 1]), Presented::NeedMore);
        assert!(matches!(
            sniff(&tls[..MAX_SNIFF_BYTES]),
            Presented::Unnamed(_)
        ));
        assert!(matches!(sniff(&tls), Presented::Unnamed(_)));
    }

    proptest! {
        #[test]
        fn never_panics_and_decides_at_the_limit(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = sniff(&bytes);
            let mut padded = bytes.clone();
            padded.resize(MAX_SNIFF_BYTES, b'a');
            prop_assert_ne!(sniff(&padded), Presented::NeedMore);
        }
    }
}
