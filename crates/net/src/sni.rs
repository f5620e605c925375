//! The server name (SNI, RFC 6066) of a TLS ClientHello, read from the first bytes a client
//! sends on a connection. The handshake message may span several TLS records; at most
//! [`MAX_CLIENT_HELLO_BYTES`] are examined.

use crate::policy::validate_domain;

/// Most bytes of a connection's start examined for a ClientHello.
pub const MAX_CLIENT_HELLO_BYTES: usize = 16 * 1024;

/// What the start of a connection says about TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientHello {
    /// A ClientHello naming this server (lowercase ASCII, no trailing dot).
    ServerName(String),
    /// A complete ClientHello without a server name extension.
    NoServerName,
    /// The bytes so far are a valid prefix: read more.
    Incomplete,
    /// Not a TLS handshake record.
    NotTls,
    /// A TLS record that is not a well-formed ClientHello (also: an SNI that is not a valid
    /// host name, several host names, or more than [`MAX_CLIENT_HELLO_BYTES`] needed).
    Malformed,
}

/// TLS record content type: handshake.
const CONTENT_HANDSHAKE: u8 = 22;
/// Handshake message type: ClientHello.
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// Length of a TLS record header.
const RECORD_HEADER_BYTES: usize = 5;
/// Largest TLS plaintext record payload (RFC 8446 §5.1).
const MAX_RECORD_PAYLOAD: usize = 1 << 14;
/// Length of a handshake message header (type and 24-bit length).
const HANDSHAKE_HEADER_BYTES: usize = 4;
/// Extension type: server_name.
const EXTENSION_SERVER_NAME: u16 = 0;
/// Server name type: host_name.
const NAME_TYPE_HOST_NAME: u8 = 0;

/// Parses the start of a connection as a TLS ClientHello.
///
/// The first record must be a handshake record (content type 22) with a TLS record version
/// (major version 3), else the connection is [`ClientHello::NotTls`]. The ClientHello may be
/// split across several handshake records; bytes after it are ignored.
pub fn parse_client_hello(start: &[u8]) -> ClientHello {
    let examined = start.get(..MAX_CLIENT_HELLO_BYTES).unwrap_or(start);
    match reassemble(examined) {
        Reassembled::Message(body) => parse_body(&body),
        Reassembled::NotTls => ClientHello::NotTls,
        Reassembled::Malformed => ClientHello::Malformed,
        // All that may be examined was, and the ClientHello is not complete.
        Reassembled::Incomplete if examined.len() >= MAX_CLIENT_HELLO_BYTES => {
            ClientHello::Malformed
        }
        Reassembled::Incomplete => ClientHello::Incomplete,
    }
}

/// The outcome of joining the handshake records at the start of a connection.
enum Reassembled {
    /// The body of the first handshake message, a ClientHello (without its 4-byte header).
    Message(Vec<u8>),
    /// The bytes so far are a valid prefix.
    Incomplete,
    /// The first record is not a TLS handshake record.
    NotTls,
    /// A TLS record stream that cannot carry a ClientHello.
    Malformed,
}

/// Joins the payloads of the handshake records in `data` until they hold the first handshake
/// message, which must be a ClientHello.
fn reassemble(data: &[u8]) -> Reassembled {
    let mut handshake: Vec<u8> = Vec::new();
    let mut rest = data;
    let mut first = true;
    loop {
        // The record header, checked byte by byte so that a prefix of it is judged too.
        let not_handshake = rest.first().is_some_and(|&kind| kind != CONTENT_HANDSHAKE);
        let not_version_3 = rest.get(1).is_some_and(|&major| major != 3);
        if not_handshake || not_version_3 {
            return if first {
                Reassembled::NotTls
            } else {
                Reassembled::Malformed
            };
        }
        let Some(&[_, _, _, len_hi, len_lo]) = rest.get(..RECORD_HEADER_BYTES) else {
            return Reassembled::Incomplete;
        };
        let payload = rest.get(RECORD_HEADER_BYTES..).unwrap_or_default();
        let record_len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
        if record_len == 0 || record_len > MAX_RECORD_PAYLOAD {
            return Reassembled::Malformed;
        }
        first = false;
        let available = payload.len().min(record_len);
        handshake.extend_from_slice(payload.get(..available).unwrap_or_default());

        // The handshake message header, as soon as it is there.
        if handshake
            .first()
            .is_some_and(|&kind| kind != HANDSHAKE_CLIENT_HELLO)
        {
            return Reassembled::Malformed;
        }
        if let Some(len) = handshake.get(1..HANDSHAKE_HEADER_BYTES) {
            let body_len = len
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            if body_len + HANDSHAKE_HEADER_BYTES > MAX_CLIENT_HELLO_BYTES {
                return Reassembled::Malformed;
            }
            let end = HANDSHAKE_HEADER_BYTES + body_len;
            if let Some(body) = handshake.get(HANDSHAKE_HEADER_BYTES..end) {
                return Reassembled::Message(body.to_vec());
            }
        }
        if available < record_len {
            return Reassembled::Incomplete;
        }
        rest = payload.get(record_len..).unwrap_or_default();
    }
}

/// Reads big-endian fields from a slice; every read fails past the end.
struct Reader<'a> {
    /// What is left to read.
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `data`.
    fn new(data: &'a [u8]) -> Self {
        Self { rest: data }
    }

    /// The next `n` bytes.
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.rest.len() {
            return None;
        }
        let (taken, rest) = self.rest.split_at(n);
        self.rest = rest;
        Some(taken)
    }

    /// The next byte.
    fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }

    /// The next big-endian `u16`.
    fn u16(&mut self) -> Option<u16> {
        let bytes = self.take(2)?;
        Some(u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]))
    }

    /// A vector with a 1-byte length prefix.
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let len = self.u8()?;
        self.take(usize::from(len))
    }

    /// A vector with a 2-byte length prefix.
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    /// Whether everything was read.
    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
}

/// Parses a complete ClientHello body (RFC 8446 §4.1.2, RFC 5246 §7.4.1.2).
fn parse_body(body: &[u8]) -> ClientHello {
    match server_name(body) {
        Some(Some(name)) => ClientHello::ServerName(name),
        Some(None) => ClientHello::NoServerName,
        None => ClientHello::Malformed,
    }
}

/// The server name of a ClientHello body: `None` when malformed, `Some(None)` when it has no
/// server_name extension.
fn server_name(body: &[u8]) -> Option<Option<String>> {
    let mut hello = Reader::new(body);
    let (major, _minor) = (hello.u8()?, hello.u8()?);
    if major != 3 {
        return None;
    }
    let _random = hello.take(32)?;
    let session_id = hello.vec8()?;
    if session_id.len() > 32 {
        return None;
    }
    let cipher_suites = hello.vec16()?;
    if cipher_suites.is_empty() || cipher_suites.len() % 2 != 0 {
        return None;
    }
    let compression_methods = hello.vec8()?;
    if compression_methods.is_empty() {
        return None;
    }
    if hello.is_empty() {
        // No extensions at all (allowed before TLS 1.3).
        return Some(None);
    }
    let mut extensions = Reader::new(hello.vec16()?);
    if !hello.is_empty() {
        return None;
    }
    let mut name = None;
    while !extensions.is_empty() {
        let extension_type = extensions.u16()?;
        let data = extensions.vec16()?;
        if extension_type == EXTENSION_SERVER_NAME {
            if name.is_some() {
                // A second server_name extension.
                return None;
            }
            name = Some(host_name(data)?);
        }
    }
    Some(name)
}

/// The one host name of a server_name extension's data (RFC 6066 §3), validated and normalized.
fn host_name(data: &[u8]) -> Option<String> {
    let mut extension = Reader::new(data);
    let mut list = Reader::new(extension.vec16()?);
    if !extension.is_empty() {
        return None;
    }
    let name_type = list.u8()?;
    let name = list.vec16()?;
    if name_type != NAME_TYPE_HOST_NAME || !list.is_empty() {
        // Another name type, or several names.
        return None;
    }
    validate_domain(std::str::from_utf8(name).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A ClientHello captured from OpenSSL 3 (Python's `ssl` module writing into a memory BIO,
    /// `server_hostname="example.com"`): one 517-byte record with TLS 1.3 extensions
    /// (supported_versions, key_share, …). Its last extension is 226 bytes of zero padding,
    /// appended by [`openssl_hello`] rather than spelled out here.
    const OPENSSL_HELLO_HEAD: &str = concat!(
        "1603010200010001fc030356b7e5e97a9fc23f764ce03b6ef6dca627fcc3c489bced6bc234cd4e6570487920631d82f8",
        "feefc415a15b1c200572ab64bd1ec9988edc4b8ea149c095374881720024130213031301c02cc030c02bc02fcca9cca8",
        "c024c028c023c027009f009e006b006700ff0100018f00000010000e00000b6578616d706c652e636f6d000b00040300",
        "0102000a00160014001d0017001e0019001801000101010201030104002300000016000000170000000d002a00280403",
        "05030603080708080809080a080b080408050806040105010601030303010302040205020602002b0005040304030300",
        "2d00020101003300260024001d0020c877c61fe1e72597fa88aca33e0817f81800af77b7cabc4e80487e2a0836893200",
        "1500e2",
    );

    /// Bytes from hex.
    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The captured OpenSSL ClientHello record.
    fn openssl_hello() -> Vec<u8> {
        let mut record = hex(OPENSSL_HELLO_HEAD);
        record.resize(517, 0);
        record
    }

    /// The handshake message of a single-record hello.
    fn handshake_of(record: &[u8]) -> Vec<u8> {
        record[5..].to_vec()
    }

    /// `handshake` split into TLS records at `splits` (offsets into `handshake`).
    fn records(handshake: &[u8], splits: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut from = 0;
        for &to in splits.iter().chain([handshake.len()].iter()) {
            let piece = &handshake[from..to];
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&(piece.len() as u16).to_be_bytes());
            out.extend_from_slice(piece);
            from = to;
        }
        out
    }

    /// A server_name extension (type, data) with these (name type, name) entries.
    fn sni_extension(names: &[(u8, &[u8])]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for (name_type, name) in names {
            list.push(*name_type);
            list.extend_from_slice(&(name.len() as u16).to_be_bytes());
            list.extend_from_slice(name);
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        (0, data)
    }

    /// A TLS 1.2-style ClientHello handshake message with these extensions (`None`: no
    /// extensions block at all).
    fn hello(extensions: Option<&[(u16, Vec<u8>)]>) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0x42; 32]);
        body.push(32);
        body.extend_from_slice(&[0x17; 32]);
        body.extend_from_slice(&[0, 4, 0x13, 0x01, 0xc0, 0x2f]);
        body.extend_from_slice(&[1, 0]);
        if let Some(extensions) = extensions {
            let mut block = Vec::new();
            for (kind, data) in extensions {
                block.extend_from_slice(&kind.to_be_bytes());
                block.extend_from_slice(&(data.len() as u16).to_be_bytes());
                block.extend_from_slice(data);
            }
            body.extend_from_slice(&(block.len() as u16).to_be_bytes());
            body.extend_from_slice(&block);
        }
        let mut message = vec![1];
        message.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        message.extend_from_slice(&body);
        message
    }

    fn name(s: &str) -> ClientHello {
        ClientHello::ServerName(s.into())
    }

    #[test]
    fn reads_the_openssl_client_hello() {
        assert_eq!(parse_client_hello(&openssl_hello()), name("example.com"));
    }

    #[test]
    fn bytes_after_the_hello_are_ignored() {
        let mut start = openssl_hello();
        // A middlebox-compatibility ChangeCipherSpec and some early data.
        start.extend_from_slice(&[20, 3, 3, 0, 1, 1, 23, 3, 3, 0, 2, 0xab, 0xcd]);
        assert_eq!(parse_client_hello(&start), name("example.com"));
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let full = openssl_hello();
        for len in 0..full.len() {
            assert_eq!(
                parse_client_hello(&full[..len]),
                ClientHello::Incomplete,
                "prefix {len}"
            );
        }
    }

    #[test]
    fn reassembles_a_hello_split_across_records() {
        let handshake = handshake_of(&openssl_hello());
        for split in 1..handshake.len() {
            let start = records(&handshake, &[split]);
            assert_eq!(
                parse_client_hello(&start),
                name("example.com"),
                "split at {split}"
            );
        }
        // Split in three, and every prefix of that.
        let start = records(&handshake, &[2, 100]);
        assert_eq!(parse_client_hello(&start), name("example.com"));
        for len in 0..start.len() {
            assert_eq!(
                parse_client_hello(&start[..len]),
                ClientHello::Incomplete,
                "prefix {len}"
            );
        }
    }

    #[test]
    fn one_byte_records() {
        let handshake = hello(Some(&[sni_extension(&[(0, b"example.org")])]));
        let splits: Vec<usize> = (1..handshake.len()).collect();
        let start = records(&handshake, &splits);
        assert_eq!(parse_client_hello(&start), name("example.org"));
    }

    #[test]
    fn normalizes_the_name() {
        let handshake = hello(Some(&[sni_extension(&[(0, b"WWW.Example.ORG.")])]));
        assert_eq!(
            parse_client_hello(&records(&handshake, &[])),
            name("www.example.org")
        );
    }

    #[test]
    fn no_server_name() {
        let handshake = hello(Some(&[(10, vec![0, 2, 0, 0x1d]), (23, vec![])]));
        assert_eq!(
            parse_client_hello(&records(&handshake, &[])),
            ClientHello::NoServerName
        );
        let handshake = hello(None);
        assert_eq!(
            parse_client_hello(&records(&handshake, &[])),
            ClientHello::NoServerName
        );
        let handshake = hello(Some(&[]));
        assert_eq!(
            parse_client_hello(&records(&handshake, &[])),
            ClientHello::NoServerName
        );
        // The captured hello with its server_name extension renamed to an unknown type.
        let mut start = openssl_hello();
        let at = OPENSSL_HELLO_HEAD.find("00000010000e").unwrap() / 2;
        start[at..at + 2].copy_from_slice(&[0xfa, 0xfa]);
        assert_eq!(parse_client_hello(&start), ClientHello::NoServerName);
    }

    #[test]
    fn several_or_bad_names_are_malformed() {
        let cases: Vec<Vec<(u16, Vec<u8>)>> = vec![
            vec![sni_extension(&[(0, b"a.example"), (0, b"b.example")])],
            vec![
                sni_extension(&[(0, b"a.example")]),
                sni_extension(&[(0, b"b.example")]),
            ],
            vec![
                sni_extension(&[(0, b"a.example")]),
                sni_extension(&[(0, b"a.example")]),
            ],
            vec![sni_extension(&[(1, b"a.example")])],
            vec![sni_extension(&[])],
            vec![sni_extension(&[(0, b"")])],
            vec![sni_extension(&[(0, b"192.0.2.1")])],
            vec![sni_extension(&[(0, b"bad_name.example")])],
            vec![sni_extension(&[(0, b"a\0.example")])],
            vec![sni_extension(&[(0, "bücher.de".as_bytes())])],
            vec![sni_extension(&[(0, &[0xff, 0xfe])])],
            vec![sni_extension(&[(0, &[b'a'; 300])])],
            vec![(0, vec![])],
            vec![(0, vec![0, 5, 0, 0, 1, b'a'])],
            vec![(0, vec![0, 3, 0, 0, 1, b'a'])],
            vec![(0, vec![0, 4, 0, 0, 1, b'a', 0])],
        ];
        for (i, extensions) in cases.iter().enumerate() {
            let handshake = hello(Some(extensions));
            assert_eq!(
                parse_client_hello(&records(&handshake, &[])),
                ClientHello::Malformed,
                "case {i}"
            );
        }
    }

    #[test]
    fn not_tls() {
        for start in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"\x80\x2e\x01\x03\x01",         // SSLv2-style ClientHello
            b"\x17\x03\x03\x00\x10",         // application data first
            b"\x15\x03\x03\x00\x02\x02\x28", // an alert
            b"\x16\x02\x00",                 // not a TLS record version
            b"\x16\x00",
            b"\x00",
        ] {
            assert_eq!(parse_client_hello(start), ClientHello::NotTls, "{start:?}");
        }
        assert_eq!(parse_client_hello(b""), ClientHello::Incomplete);
        assert_eq!(parse_client_hello(b"\x16"), ClientHello::Incomplete);
        assert_eq!(parse_client_hello(b"\x16\x03"), ClientHello::Incomplete);
    }

    #[test]
    fn malformed_records_and_messages() {
        let handshake = handshake_of(&openssl_hello());
        // An empty record, and one over 2^14 bytes.
        assert_eq!(
            parse_client_hello(b"\x16\x03\x01\x00\x00"),
            ClientHello::Malformed
        );
        assert_eq!(
            parse_client_hello(b"\x16\x03\x01\x40\x01"),
            ClientHello::Malformed
        );
        // A ServerHello.
        assert_eq!(
            parse_client_hello(b"\x16\x03\x03\x00\x04\x02\x00\x00\x26"),
            ClientHello::Malformed
        );
        // A handshake message longer than the limit is refused at once.
        assert_eq!(
            parse_client_hello(b"\x16\x03\x01\x00\x04\x01\x00\x40\x00"),
            ClientHello::Malformed
        );
        // The second record is not a handshake record, or has a bad version.
        let mut split = records(&handshake, &[10]);
        split[5 + 10] = 23;
        assert_eq!(parse_client_hello(&split), ClientHello::Malformed);
        let mut split = records(&handshake, &[10]);
        split[5 + 10 + 1] = 1;
        assert_eq!(parse_client_hello(&split), ClientHello::Malformed);
        // Body fields inconsistent with the message length.
        let mut body_short = handshake.clone();
        body_short[3] -= 1; // message length 1 less: extensions overrun the body
        assert_eq!(
            parse_client_hello(&records(&body_short, &[])),
            ClientHello::Malformed
        );
        let mut body_long = handshake.clone();
        body_long[3] += 1;
        body_long.push(0); // one byte after the extensions
        assert_eq!(
            parse_client_hello(&records(&body_long, &[])),
            ClientHello::Malformed
        );
        // Session id over 32 bytes, odd cipher suites length, no compression methods.
        let mut hello_bytes = hello(None);
        hello_bytes[4 + 34] = 33;
        assert_eq!(
            parse_client_hello(&records(&hello_bytes, &[])),
            ClientHello::Malformed
        );
        let mut hello_bytes = hello(None);
        hello_bytes[4 + 34 + 33 + 1] = 3;
        assert_eq!(
            parse_client_hello(&records(&hello_bytes, &[])),
            ClientHello::Malformed
        );
        let mut hello_bytes = hello(None);
        hello_bytes[4 + 34 + 33 + 6] = 0;
        assert_eq!(
            parse_client_hello(&records(&hello_bytes, &[])),
            ClientHello::Malformed
        );
    }

    #[test]
    fn large_hellos_up_to_the_limit() {
        // A 12 KiB hello (a post-quantum key share is about 1.2 KiB; this is far more), in two
        // records.
        let padding = (21, vec![0; 12 * 1024]);
        let handshake = hello(Some(&[sni_extension(&[(0, b"example.com")]), padding]));
        let start = records(&handshake, &[8000]);
        assert_eq!(parse_client_hello(&start), name("example.com"));
        for len in [0, 5, 100, 8004, 8005, 8010, start.len() - 1] {
            assert_eq!(
                parse_client_hello(&start[..len]),
                ClientHello::Incomplete,
                "prefix {len}"
            );
        }
    }

    #[test]
    fn more_than_the_limit_is_malformed() {
        // A hello that fits the limit as a message but, in 1-byte records, needs 6 connection
        // bytes per message byte.
        let padding = (21, vec![0; 4000]);
        let handshake = hello(Some(&[padding, sni_extension(&[(0, b"example.com")])]));
        let splits: Vec<usize> = (1..handshake.len()).collect();
        let start = records(&handshake, &splits);
        assert!(start.len() > MAX_CLIENT_HELLO_BYTES);
        assert_eq!(
            parse_client_hello(&start[..MAX_CLIENT_HELLO_BYTES - 1]),
            ClientHello::Incomplete
        );
        assert_eq!(
            parse_client_hello(&start[..MAX_CLIENT_HELLO_BYTES]),
            ClientHello::Malformed
        );
        assert_eq!(parse_client_hello(&start), ClientHello::Malformed);
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse_client_hello(&bytes);
            let mut tls = vec![22, 3, 1];
            tls.extend_from_slice(&bytes);
            let _ = parse_client_hello(&tls);
        }

        #[test]
        fn mutated_hellos_never_panic(
            edits in proptest::collection::vec((0usize..517, any::<u8>()), 1..8),
            cut in 0usize..600,
        ) {
            let mut start = openssl_hello();
            for (at, byte) in edits {
                start[at] = byte;
            }
            start.truncate(cut);
            if let ClientHello::ServerName(name) = parse_client_hello(&start) {
                prop_assert!(crate::policy::validate_domain(&name) == Ok(name.clone()));
            }
        }

        #[test]
        fn any_split_of_any_name(
            name in "[a-z][a-z0-9-]{0,20}[a-z0-9](\\.[a-z][a-z0-9]{0,10}){1,3}",
            splits in proptest::collection::btree_set(1usize..150, 0..5),
        ) {
            let handshake = hello(Some(&[(10, vec![0, 2, 0, 0x1d]), sni_extension(&[(0, name.as_bytes())])]));
            let splits: Vec<usize> = splits.into_iter().filter(|s| *s < handshake.len()).collect();
            let start = records(&handshake, &splits);
            prop_assert_eq!(parse_client_hello(&start), ClientHello::ServerName(name));
            for len in 0..start.len() {
                prop_assert_eq!(parse_client_hello(&start[..len]), ClientHello::Incomplete);
            }
        }
    }
}
