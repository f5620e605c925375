//! The `Host` of a plain HTTP/1.x request, read from the first bytes a client sends.

use crate::policy::validate_domain;

/// Most bytes of a connection's start examined for a request head.
pub const MAX_REQUEST_HEAD_BYTES: usize = 16 * 1024;

/// What the start of a connection says about HTTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestHost {
    /// A request head with exactly one `Host` header naming this host (lowercase, no port, no
    /// trailing dot) and the port it gave, if any.
    Host {
        /// The host name.
        name: String,
        /// The port in the header, if any.
        port: Option<u16>,
    },
    /// A complete request head without a `Host` header.
    Missing,
    /// The bytes so far are a valid prefix of a request head: read more.
    Incomplete,
    /// Not an HTTP/1.x request (also: an absolute-form target naming another host than `Host`,
    /// several `Host` headers, a `Host` that is not a host name, or a head larger than
    /// [`MAX_REQUEST_HEAD_BYTES`]).
    Invalid,
}

/// Most header lines a request head may have.
const MAX_HEADERS: usize = 128;

/// Parses the start of a connection as an HTTP/1.x request head.
///
/// The `Host` header must be `name` or `name:port` with a host name (see
/// [`validate_domain`]): an IP address literal names no host and is [`RequestHost::Invalid`].
/// A request target is origin-form (`/path`), asterisk-form (`*`), absolute-form
/// (`scheme://host[:port]/…`, whose host must be the `Host` name; ports are not compared) or,
/// for `CONNECT`, authority-form (`host:port`, likewise).
pub fn parse_request_host(start: &[u8]) -> RequestHost {
    match parse_head(start) {
        HeadParse::Complete(head) => head.host,
        HeadParse::Incomplete => RequestHost::Incomplete,
        HeadParse::Invalid => RequestHost::Invalid,
    }
}

/// How the body of a request is framed (RFC 9112 §6.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Body {
    /// No body.
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding` ending in `chunked`.
    Chunked,
    /// The headers frame no body a server would agree on (smuggling territory), and why.
    Unframeable(&'static str),
}

/// A complete request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Head {
    /// Its length in bytes, the empty line included.
    pub len: usize,
    /// What its `Host` says.
    pub host: RequestHost,
    /// How its body is framed.
    pub body: Body,
    /// `CONNECT`, or an `Upgrade` request: if the server agrees, what follows is not HTTP.
    pub switches: bool,
}

/// What the bytes so far are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HeadParse {
    /// A complete head.
    Complete(Head),
    /// A valid prefix of a head, shorter than [`MAX_REQUEST_HEAD_BYTES`].
    Incomplete,
    /// Not an HTTP/1.x request head (or one larger than [`MAX_REQUEST_HEAD_BYTES`]).
    Invalid,
}

/// Parses the request head at the start of `start` with `httparse`.
pub(crate) fn parse_head(start: &[u8]) -> HeadParse {
    if start.is_empty() {
        return HeadParse::Incomplete;
    }
    let examined = start.get(..MAX_REQUEST_HEAD_BYTES).unwrap_or(start);
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(examined) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if examined.len() >= MAX_REQUEST_HEAD_BYTES => {
            return HeadParse::Invalid;
        }
        Ok(httparse::Status::Partial) => return HeadParse::Incomplete,
        Err(_) => return HeadParse::Invalid,
    };
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return HeadParse::Invalid;
    };
    let headers = &*request.headers;
    let switches = method == "CONNECT"
        || (header_values(headers, "upgrade").next().is_some()
            && header_tokens(headers, "connection").any(|t| t.eq_ignore_ascii_case("upgrade")));
    HeadParse::Complete(Head {
        len,
        host: head_host(method, target, headers),
        body: body(headers),
        switches,
    })
}

/// The values of every `name` header, as text (a value that is not UTF-8 is skipped).
fn header_values<'a>(
    headers: &'a [httparse::Header<'a>],
    name: &'a str,
) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
}

/// The comma-separated tokens of every `name` header, trimmed.
fn header_tokens<'a>(
    headers: &'a [httparse::Header<'a>],
    name: &'a str,
) -> impl Iterator<Item = &'a str> + 'a {
    header_values(headers, name)
        .flat_map(|v| v.split(','))
        .map(|t| t.trim_matches([' ', '\t']))
        .filter(|t| !t.is_empty())
}

/// How the body of a request with `headers` is framed.
fn body(headers: &[httparse::Header<'_>]) -> Body {
    let has = |name: &str| headers.iter().any(|h| h.name.eq_ignore_ascii_case(name));
    let (te, cl) = (has("transfer-encoding"), has("content-length"));
    if te && cl {
        return Body::Unframeable("both Transfer-Encoding and Content-Length");
    }
    if te {
        let unreadable = headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("transfer-encoding")
                && std::str::from_utf8(h.value).is_err()
        });
        return match header_tokens(headers, "transfer-encoding").last() {
            Some(last) if !unreadable && last.eq_ignore_ascii_case("chunked") => Body::Chunked,
            _ => Body::Unframeable("a transfer coding that does not end with chunked"),
        };
    }
    if !cl {
        return Body::Empty;
    }
    let mut lengths = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .map(|v| {
            let v = v.trim_ascii();
            if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
                return None;
            }
            std::str::from_utf8(v).ok()?.parse::<u64>().ok()
        });
    let Some(Some(first)) = lengths.next() else {
        return Body::Unframeable("an invalid Content-Length");
    };
    if lengths.any(|other| other != Some(first)) {
        return Body::Unframeable("several different Content-Lengths");
    }
    if first == 0 {
        Body::Empty
    } else {
        Body::Length(first)
    }
}

/// What the `Host` header (and the target) of a head say.
fn head_host(method: &str, target: &str, headers: &[httparse::Header<'_>]) -> RequestHost {
    let mut hosts = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"));
    let host = match (hosts.next(), hosts.next()) {
        (None, _) => return RequestHost::Missing,
        (Some(_), Some(_)) => return RequestHost::Invalid,
        (Some(host), None) => host,
    };
    let Some((name, port)) = std::str::from_utf8(host.value)
        .ok()
        .and_then(parse_authority)
    else {
        return RequestHost::Invalid;
    };
    let target_ok = match target_authority(method, target) {
        Target::NoHost => true,
        Target::Host(target_name) => target_name == name,
        Target::Invalid => false,
    };
    if !target_ok {
        return RequestHost::Invalid;
    }
    RequestHost::Host { name, port }
}

/// What a request target says about the host.
enum Target {
    /// Origin-form or asterisk-form: no host.
    NoHost,
    /// Absolute-form or authority-form naming this host (normalized).
    Host(String),
    /// Anything else.
    Invalid,
}

/// The host named by a request target.
fn target_authority(method: &str, target: &str) -> Target {
    if target.starts_with('/') || target == "*" {
        return Target::NoHost;
    }
    let authority = if method == "CONNECT" {
        Some(target)
    } else {
        target.split_once("://").and_then(|(scheme, rest)| {
            let scheme_ok = scheme
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
            let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            scheme_ok.then(|| rest.get(..end)).flatten()
        })
    };
    match authority.and_then(parse_authority) {
        Some((name, _port)) => Target::Host(name),
        None => Target::Invalid,
    }
}

/// Splits `host[:port]` (surrounding whitespace allowed) into a validated, normalized host name
/// and the port, if any. User info (`user@host`) and IP literals are refused.
fn parse_authority(authority: &str) -> Option<(String, Option<u16>)> {
    let authority = authority.trim_matches([' ', '\t']);
    if authority.contains('@') || authority.starts_with('[') {
        return None;
    }
    let (host, port) = match authority.split_once(':') {
        None => (authority, None),
        Some((host, "")) => (host, None),
        Some((host, port)) => {
            if port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            (host, Some(port.parse::<u16>().ok()?))
        }
    };
    Some((validate_domain(host).ok()?, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn host(name: &str, port: Option<u16>) -> RequestHost {
        RequestHost::Host {
            name: name.into(),
            port,
        }
    }

    /// What `curl http://example.com/` sends.
    const CURL_GET: &[u8] =
        b"GET / HTTP/1.1\r\nHost: example.com\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n";

    #[test]
    fn simple_get() {
        assert_eq!(parse_request_host(CURL_GET), host("example.com", None));
    }

    #[test]
    fn body_after_the_head_is_ignored() {
        let post = b"POST /upload HTTP/1.1\r\nhost: example.org\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(parse_request_host(post), host("example.org", None));
    }

    #[test]
    fn host_forms() {
        let table: &[(&str, RequestHost)] = &[
            ("example.com:8080", host("example.com", Some(8080))),
            ("example.com:80", host("example.com", Some(80))),
            ("example.com:", host("example.com", None)),
            ("EXAMPLE.Com", host("example.com", None)),
            ("Example.COM.:443", host("example.com", Some(443))),
            ("localhost", host("localhost", None)),
            ("  example.com\t", host("example.com", None)),
            ("example.com:65536", RequestHost::Invalid),
            ("example.com:-1", RequestHost::Invalid),
            ("example.com:+80", RequestHost::Invalid),
            ("example.com:80:80", RequestHost::Invalid),
            ("example.com:000080", RequestHost::Invalid),
            ("", RequestHost::Invalid),
            (":80", RequestHost::Invalid),
            ("127.0.0.1", RequestHost::Invalid),
            ("10.0.0.1:80", RequestHost::Invalid),
            ("[::1]", RequestHost::Invalid),
            ("[::1]:8080", RequestHost::Invalid),
            ("user@example.com", RequestHost::Invalid),
            ("exa mple.com", RequestHost::Invalid),
            ("example.com/path", RequestHost::Invalid),
            ("*.example.com", RequestHost::Invalid),
            ("bücher.de", RequestHost::Invalid),
        ];
        for (value, want) in table {
            let head = format!("GET / HTTP/1.1\r\nHost: {value}\r\nAccept: */*\r\n\r\n");
            assert_eq!(
                &parse_request_host(head.as_bytes()),
                want,
                "Host: {value:?}"
            );
        }
        let binary = b"GET / HTTP/1.1\r\nHost: exa\xffmple.com\r\n\r\n";
        assert_eq!(parse_request_host(binary), RequestHost::Invalid);
    }

    #[test]
    fn missing_and_duplicate_host() {
        assert_eq!(
            parse_request_host(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n"),
            RequestHost::Missing
        );
        assert_eq!(
            parse_request_host(b"GET / HTTP/1.0\r\n\r\n"),
            RequestHost::Missing
        );
        let two = b"GET / HTTP/1.1\r\nHost: example.com\r\nHOST: evil.example\r\n\r\n";
        assert_eq!(parse_request_host(two), RequestHost::Invalid);
        let same_twice = b"GET / HTTP/1.1\r\nHost: example.com\r\nHost: example.com\r\n\r\n";
        assert_eq!(parse_request_host(same_twice), RequestHost::Invalid);
        // A header that only starts with "Host" is another header.
        let other = b"GET / HTTP/1.1\r\nHost-Override: evil.example\r\nHost: example.com\r\n\r\n";
        assert_eq!(parse_request_host(other), host("example.com", None));
        // Whitespace before the colon would let a proxy and a server disagree: refused.
        let spaced = b"GET / HTTP/1.1\r\nHost : evil.example\r\nHost: example.com\r\n\r\n";
        assert_eq!(parse_request_host(spaced), RequestHost::Invalid);
    }

    #[test]
    fn request_targets() {
        let table: &[(&str, RequestHost)] = &[
            (
                "GET http://example.com/ HTTP/1.1",
                host("example.com", None),
            ),
            (
                "GET http://EXAMPLE.com:8080/x?y HTTP/1.1",
                host("example.com", None),
            ),
            ("GET http://example.com HTTP/1.1", host("example.com", None)),
            (
                "GET http://example.com?q HTTP/1.1",
                host("example.com", None),
            ),
            (
                "GET https://example.com/ HTTP/1.1",
                host("example.com", None),
            ),
            ("GET http://evil.example/ HTTP/1.1", RequestHost::Invalid),
            (
                "GET http://example.com.evil/ HTTP/1.1",
                RequestHost::Invalid,
            ),
            (
                "GET http://evil.example@example.com/ HTTP/1.1",
                RequestHost::Invalid,
            ),
            ("GET http://127.0.0.1/ HTTP/1.1", RequestHost::Invalid),
            ("GET http:///x HTTP/1.1", RequestHost::Invalid),
            ("GET 1http://example.com/ HTTP/1.1", RequestHost::Invalid),
            ("GET example.com HTTP/1.1", RequestHost::Invalid),
            ("OPTIONS * HTTP/1.1", host("example.com", None)),
            (
                "CONNECT example.com:443 HTTP/1.1",
                host("example.com", None),
            ),
            ("CONNECT evil.example:443 HTTP/1.1", RequestHost::Invalid),
            ("CONNECT 10.0.0.1:443 HTTP/1.1", RequestHost::Invalid),
        ];
        for (line, want) in table {
            let head = format!("{line}\r\nHost: example.com\r\n\r\n");
            assert_eq!(&parse_request_host(head.as_bytes()), want, "{line}");
        }
    }

    #[test]
    fn incomplete_heads() {
        for len in 0..CURL_GET.len() {
            assert_eq!(
                parse_request_host(&CURL_GET[..len]),
                RequestHost::Incomplete,
                "prefix {len}"
            );
        }
    }

    #[test]
    fn not_http() {
        for start in [
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc"[..],
            b"\x00\x01\x02\x03\xff\xfe\r\n\r\n",
            b"SSH-2.0-OpenSSH_9.6\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET / HTTP/2\r\nHost: example.com\r\n\r\n",
            b"GET / FTP/1.1\r\nHost: example.com\r\n\r\n",
            b"GET /\r\n\r\n",
            b"GET  / HTTP/1.1\r\nHost: example.com\r\n\r\n",
        ] {
            assert_eq!(parse_request_host(start), RequestHost::Invalid, "{start:?}");
        }
    }

    #[test]
    fn oversized_heads() {
        let mut head = b"GET / HTTP/1.1\r\nHost: example.com\r\nX-Pad: ".to_vec();
        head.resize(MAX_REQUEST_HEAD_BYTES - 1, b'a');
        assert_eq!(parse_request_host(&head), RequestHost::Incomplete);
        head.push(b'a');
        assert_eq!(parse_request_host(&head), RequestHost::Invalid);
        head.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse_request_host(&head), RequestHost::Invalid);
        // A complete head within the limit is read whatever follows it.
        let mut long = CURL_GET.to_vec();
        long.resize(MAX_REQUEST_HEAD_BYTES * 2, b'x');
        assert_eq!(parse_request_host(&long), host("example.com", None));
        // Too many header lines.
        let mut many = b"GET / HTTP/1.1\r\nHost: example.com\r\n".to_vec();
        for _ in 0..MAX_HEADERS {
            many.extend_from_slice(b"A: b\r\n");
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse_request_host(&many), RequestHost::Invalid);
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = parse_request_host(&bytes);
            let mut http = b"GET / HTTP/1.1\r\nHost: ".to_vec();
            http.extend_from_slice(&bytes);
            if let RequestHost::Host { name, .. } = parse_request_host(&http) {
                prop_assert_eq!(validate_domain(&name), Ok(name.clone()));
            }
        }

        #[test]
        fn host_and_port_round_trip(
            name in "[a-zA-Z][a-zA-Z0-9-]{0,20}[a-zA-Z0-9](\\.[a-zA-Z][a-zA-Z0-9]{0,10}){0,3}",
            port in proptest::option::of(any::<u16>()),
        ) {
            let value = match port {
                Some(port) => format!("{name}:{port}"),
                None => name.clone(),
            };
            let head = format!("GET /index.html HTTP/1.1\r\nHost: {value}\r\n\r\n");
            let want = RequestHost::Host { name: name.to_ascii_lowercase(), port };
            prop_assert_eq!(parse_request_host(head.as_bytes()), want);
        }
    }
}
