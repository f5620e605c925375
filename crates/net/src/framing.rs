//! Every request on a plain-HTTP connection, not only the first: the gateway frames the
//! HTTP/1.1 messages a client sends (heads with `httparse`, bodies by `Content-Length` or
//! chunked coding with `httparse::parse_chunk_size`) to find each next head, and stops the
//! connection at the first head whose `Host` is not the name the connection was opened for.
//! Without this, a second request pipelined in the same write, or sent later on a keep-alive
//! connection, could name another virtual host of the same server (a shared CDN address).
//!
//! Bytes of a head are held back until the head is complete and checked; body bytes pass as
//! they come. After a `CONNECT` or `Upgrade` request the rest of the stream is passed as it is
//! (a WebSocket, a tunnel): the gateway does not read the server's answers, so a server that
//! ignores such a request would see the following bytes as HTTP (a limit SECURITY.md states).

use crate::http::{Body, HeadParse, MAX_REQUEST_HEAD_BYTES, RequestHost, parse_head};
use crate::policy::same_name;

/// Longest chunk-size line (with extensions) the framer buffers.
pub const MAX_CHUNK_LINE_BYTES: usize = 4096;

/// Why a connection's request stream was stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingStop {
    /// A request named another host.
    #[error("a later request named \"{0}\"")]
    OtherHost(String),
    /// A request had no `Host`.
    #[error("a later request has no Host")]
    NoHost,
    /// Bytes where a request head should start are not one (or the head is too large).
    #[error("a later request is not a valid HTTP/1.1 request head")]
    BadHead,
    /// A request's body cannot be framed.
    #[error("a later request's body cannot be framed: {0}")]
    BadBody(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a request head.
    Head,
    /// Passing this many more body bytes.
    Body(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    /// Passing this many more bytes of a chunk.
    ChunkData(u64),
    /// Reading the CRLF after a chunk's data.
    ChunkEnd,
    /// Reading the trailer section after the last chunk.
    Trailers,
    /// After a `CONNECT` or `Upgrade` request: not HTTP any more.
    Opaque,
}

/// Frames the requests of one plain-HTTP connection opened for `expected`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFramer {
    expected: String,
    state: State,
    /// Bytes of the head, chunk-size line, chunk end or trailers being read.
    buf: Vec<u8>,
    /// Requests whose head was checked.
    requests: u64,
}

impl RequestFramer {
    /// A framer for a connection whose requests must all name `expected`.
    pub fn new(expected: &str) -> RequestFramer {
        RequestFramer {
            expected: expected.to_string(),
            state: State::Head,
            buf: Vec::new(),
            requests: 0,
        }
    }

    /// How many request heads were checked so far.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// Takes the next bytes the client sent; returns those that may go to the server now (the
    /// rest of an incomplete head is held), or why the connection must stop: then nothing of
    /// `input` passes, not even the requests before the stop. After a stop the framer must not
    /// be used again.
    pub fn push(&mut self, input: &[u8]) -> Result<Vec<u8>, FramingStop> {
        let mut out = Vec::with_capacity(input.len());
        let mut rest = input.to_vec();
        loop {
            match self.state {
                State::Opaque => {
                    out.append(&mut rest);
                    return Ok(out);
                }
                State::Body(left) | State::ChunkData(left) => {
                    let take = rest.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    out.extend(rest.drain(..take));
                    let left = left - take as u64;
                    self.state = match (self.state, left) {
                        (State::Body(_), 0) => State::Head,
                        (State::Body(_), _) => State::Body(left),
                        (_, 0) => State::ChunkEnd,
                        _ => State::ChunkData(left),
                    };
                    if left > 0 {
                        return Ok(out);
                    }
                }
                State::Head | State::ChunkSize | State::ChunkEnd | State::Trailers => {
                    self.buf.append(&mut rest);
                    let Some((len, next)) = self.framed()? else {
                        return Ok(out);
                    };
                    out.extend(self.buf.drain(..len));
                    rest = std::mem::take(&mut self.buf);
                    self.state = next;
                }
            }
            if rest.is_empty() && self.buf.is_empty() {
                return Ok(out);
            }
        }
    }

    /// The length of the complete element at the start of `buf` in a buffering state and the
    /// state after it; `None` while it is incomplete.
    fn framed(&mut self) -> Result<Option<(usize, State)>, FramingStop> {
        match self.state {
            State::Head => self.head(),
            State::ChunkSize => match httparse::parse_chunk_size(&self.buf) {
                Ok(httparse::Status::Complete((len, 0))) => Ok(Some((len, State::Trailers))),
                Ok(httparse::Status::Complete((len, size))) => {
                    Ok(Some((len, State::ChunkData(size))))
                }
                Ok(httparse::Status::Partial) if self.buf.len() <= MAX_CHUNK_LINE_BYTES => Ok(None),
                _ => Err(FramingStop::BadBody("an invalid chunk size line")),
            },
            State::ChunkEnd => match self.buf.get(..2) {
                None if self.buf.as_slice() == b"\r" || self.buf.is_empty() => Ok(None),
                Some(b"\r\n") => Ok(Some((2, State::ChunkSize))),
                _ => Err(FramingStop::BadBody("chunk data not followed by CRLF")),
            },
            State::Trailers => {
                if self.buf.starts_with(b"\r\n") {
                    return Ok(Some((2, State::Head)));
                }
                let mut headers = [httparse::EMPTY_HEADER; 64];
                match httparse::parse_headers(&self.buf, &mut headers) {
                    Ok(httparse::Status::Complete((len, _))) => Ok(Some((len, State::Head))),
                    Ok(httparse::Status::Partial) if self.buf.len() < MAX_REQUEST_HEAD_BYTES => {
                        Ok(None)
                    }
                    _ => Err(FramingStop::BadBody("an invalid trailer section")),
                }
            }
            State::Body(_) | State::ChunkData(_) | State::Opaque => Ok(Some((0, self.state))),
        }
    }

    /// A request head at the start of `buf`: checked, with the state its body starts.
    fn head(&mut self) -> Result<Option<(usize, State)>, FramingStop> {
        let head = match parse_head(&self.buf) {
            HeadParse::Incomplete => return Ok(None),
            HeadParse::Invalid => return Err(FramingStop::BadHead),
            HeadParse::Complete(head) => head,
        };
        match head.host {
            RequestHost::Host { name, .. } if same_name(&name, &self.expected) => {}
            RequestHost::Host { name, .. } => return Err(FramingStop::OtherHost(name)),
            RequestHost::Missing => return Err(FramingStop::NoHost),
            RequestHost::Invalid | RequestHost::Incomplete => return Err(FramingStop::BadHead),
        }
        self.requests += 1;
        let next = match head.body {
            Body::Unframeable(why) => return Err(FramingStop::BadBody(why)),
            _ if head.switches => State::Opaque,
            Body::Empty => State::Head,
            Body::Length(len) => State::Body(len),
            Body::Chunked => State::ChunkSize,
        };
        Ok(Some((head.len, next)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: &str = "allowed.test";

    fn get(host: &str) -> String {
        format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n")
    }

    /// Feeds `chunks` one after the other; the bytes passed, and the stop if any.
    fn feed(chunks: &[&[u8]]) -> (Vec<u8>, Option<FramingStop>) {
        let mut framer = RequestFramer::new(A);
        let mut passed = Vec::new();
        for chunk in chunks {
            match framer.push(chunk) {
                Ok(bytes) => passed.extend(bytes),
                Err(stop) => return (passed, Some(stop)),
            }
        }
        (passed, None)
    }

    #[test]
    fn a_pipelined_request_for_another_host_is_stopped_before_it_passes() {
        // The review's attack: two requests in one write.
        let first = get(A);
        let attack = format!("{first}{}", get("other.test"));
        let (passed, stop) = feed(&[attack.as_bytes()]);
        assert_eq!(stop, Some(FramingStop::OtherHost("other.test".into())));
        assert!(
            passed.is_empty(),
            "nothing of a write holding a foreign head passes"
        );
    }

    #[test]
    fn a_keep_alive_request_for_another_host_is_stopped() {
        let first = get(A);
        let (passed, stop) = feed(&[first.as_bytes(), get("other.test").as_bytes()]);
        assert_eq!(stop, Some(FramingStop::OtherHost("other.test".into())));
        assert_eq!(passed, first.as_bytes());
    }

    #[test]
    fn requests_for_the_name_pass_whole_whatever_the_split() {
        let stream = format!(
            "{}POST /a HTTP/1.1\r\nHost: Allowed.Test.:80\r\nContent-Length: 5\r\n\r\nhello\
             PUT /b HTTP/1.1\r\nhost: allowed.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
             5;ext=1\r\nGET /\r\n0\r\nX-Trailer: 1\r\n\r\n{}",
            get(A),
            get(A)
        );
        let bytes = stream.as_bytes();
        for split in [1, 2, 3, 7, 64, bytes.len()] {
            let chunks: Vec<&[u8]> = bytes.chunks(split).collect();
            let mut framer = RequestFramer::new(A);
            let mut passed = Vec::new();
            for chunk in chunks {
                passed.extend(framer.push(chunk).unwrap());
            }
            assert_eq!(passed, bytes, "split {split}");
            assert_eq!(framer.requests(), 4, "split {split}");
        }
    }

    #[test]
    fn a_body_that_looks_like_a_request_is_body() {
        let smuggled = get("other.test");
        let post = format!(
            "POST / HTTP/1.1\r\nHost: {A}\r\nContent-Length: {}\r\n\r\n{smuggled}{}",
            smuggled.len(),
            get(A)
        );
        let (passed, stop) = feed(&[post.as_bytes()]);
        assert_eq!(stop, None);
        assert_eq!(passed, post.as_bytes());
    }

    #[test]
    fn a_chunked_body_hides_no_request_and_the_next_head_is_checked() {
        let chunk = get("other.test");
        let body = format!("{:x}\r\n{chunk}\r\n0\r\n\r\n", chunk.len());
        let ok =
            format!("POST / HTTP/1.1\r\nHost: {A}\r\nTransfer-Encoding: chunked\r\n\r\n{body}");
        let (passed, stop) = feed(&[ok.as_bytes(), get("other.test").as_bytes()]);
        assert_eq!(stop, Some(FramingStop::OtherHost("other.test".into())));
        assert_eq!(passed, ok.as_bytes());
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        let table: &[(&str, FramingStop)] = &[
            (
                "Content-Length: 5\r\nTransfer-Encoding: chunked",
                FramingStop::BadBody("both Transfer-Encoding and Content-Length"),
            ),
            (
                "Transfer-Encoding: chunked, gzip",
                FramingStop::BadBody("a transfer coding that does not end with chunked"),
            ),
            (
                "Content-Length: 5\r\nContent-Length: 6",
                FramingStop::BadBody("several different Content-Lengths"),
            ),
            (
                "Content-Length: 5, 6",
                FramingStop::BadBody("several different Content-Lengths"),
            ),
            (
                "Content-Length: -1",
                FramingStop::BadBody("an invalid Content-Length"),
            ),
            (
                "Content-Length: 0x10",
                FramingStop::BadBody("an invalid Content-Length"),
            ),
        ];
        for (headers, want) in table {
            let request = format!("POST / HTTP/1.1\r\nHost: {A}\r\n{headers}\r\n\r\n");
            let (passed, stop) = feed(&[request.as_bytes()]);
            assert_eq!(stop.as_ref(), Some(want), "{headers}");
            assert!(passed.is_empty(), "{headers}");
        }
        // The same length twice is one length.
        let request = format!("POST / HTTP/1.1\r\nHost: {A}\r\nContent-Length: 2, 2\r\n\r\nok");
        assert_eq!(feed(&[request.as_bytes()]).1, None);
    }

    #[test]
    fn later_heads_without_host_or_not_http_are_refused() {
        let first = get(A);
        for (later, want) in [
            ("GET / HTTP/1.1\r\n\r\n", FramingStop::NoHost),
            (
                "GET http://other.test/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
                FramingStop::BadHead,
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nHost: allowed.test\r\n\r\n",
                FramingStop::BadHead,
            ),
            ("\x16\x03\x01 not http\r\n\r\n", FramingStop::BadHead),
            ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", FramingStop::BadHead),
        ] {
            let (passed, stop) = feed(&[first.as_bytes(), later.as_bytes()]);
            assert_eq!(stop, Some(want), "{later:?}");
            assert_eq!(passed, first.as_bytes(), "{later:?}");
        }
        let huge = format!(
            "GET / HTTP/1.1\r\nX: {}",
            "a".repeat(MAX_REQUEST_HEAD_BYTES)
        );
        assert_eq!(feed(&[huge.as_bytes()]).1, Some(FramingStop::BadHead));
        let long_chunk_line = format!(
            "POST / HTTP/1.1\r\nHost: {A}\r\nTransfer-Encoding: chunked\r\n\r\n1;{}",
            "e".repeat(MAX_CHUNK_LINE_BYTES)
        );
        assert!(matches!(
            feed(&[long_chunk_line.as_bytes()]).1,
            Some(FramingStop::BadBody(_))
        ));
    }

    #[test]
    fn after_an_upgrade_the_stream_is_not_http() {
        let upgrade = format!(
            "GET /ws HTTP/1.1\r\nHost: {A}\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\r\n"
        );
        let frames: &[u8] = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58";
        let (passed, stop) = feed(&[upgrade.as_bytes(), frames, get("other.test").as_bytes()]);
        assert_eq!(stop, None);
        assert_eq!(
            passed.len(),
            upgrade.len() + frames.len() + get("other.test").len()
        );
        // An Upgrade header without `Connection: upgrade` upgrades nothing.
        let not = format!("GET / HTTP/1.1\r\nHost: {A}\r\nUpgrade: websocket\r\n\r\n");
        let (_, stop) = feed(&[not.as_bytes(), get("other.test").as_bytes()]);
        assert_eq!(stop, Some(FramingStop::OtherHost("other.test".into())));
    }

    proptest! {
        /// Whatever the client sends and however it is split, nothing after a head naming
        /// another host passes, and the bytes passed are a prefix of what was sent.
        #[test]
        fn passes_a_prefix_and_never_a_foreign_head(
            parts in proptest::collection::vec(
                prop_oneof![
                    Just(get(A)),
                    Just(get("other.test")),
                    Just(format!("POST / HTTP/1.1\r\nHost: {A}\r\nContent-Length: 3\r\n\r\nabc")),
                    Just(format!("POST / HTTP/1.1\r\nHost: {A}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")),
                    "[ -~\r\n]{0,40}",
                ],
                0..6,
            ),
            split in 1usize..50,
        ) {
            let stream: String = parts.concat();
            let bytes = stream.as_bytes();
            let mut framer = RequestFramer::new(A);
            let mut passed = Vec::new();
            for chunk in bytes.chunks(split) {
                match framer.push(chunk) {
                    Ok(b) => passed.extend(b),
                    Err(_) => break,
                }
            }
            prop_assert!(bytes.starts_with(&passed));
            let shown = String::from_utf8_lossy(&passed);
            prop_assert!(!shown.contains("Host: other.test"));
        }
    }
}
