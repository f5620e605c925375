//! Gateway bypasses, against loopback fixtures only: names outside the allowlist, a `Host` or
//! TLS server name other than the one the address was resolved for (in the first request, or
//! pipelined or sent later on a keep-alive connection), raw IPs, UDP, DNS over TCP, and IPv6
//! (the guest has none). Each refusal is reported with its reason.

use std::sync::{Arc, Mutex};

use exec_sandbox::{ExecutionResult, Language, RunOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::vm_network::{Fixture, PROBES, run_on, scheduler};

/// A keep-alive HTTP server on 127.0.0.1 with two virtual hosts: it answers every request
/// (heads without bodies) with `vhost:<Host>` and records each `Host` it served.
pub(crate) struct TwoVhosts {
    pub(crate) port: u16,
    pub(crate) served: Arc<Mutex<Vec<String>>>,
}

impl TwoVhosts {
    pub(crate) async fn start() -> TwoVhosts {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let served = Arc::new(Mutex::new(Vec::new()));
        let record = served.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).to_string();
                            buf.drain(..end + 4);
                            let host = head
                                .lines()
                                .find_map(|l| {
                                    let (name, value) = l.split_once(':')?;
                                    name.eq_ignore_ascii_case("host").then(|| value.trim())
                                })
                                .unwrap_or("")
                                .split(':')
                                .next()
                                .unwrap_or("")
                                .to_string();
                            record.lock().unwrap().push(host.clone());
                            let body = format!("vhost:{host}");
                            let response = format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            if stream.write_all(response.as_bytes()).await.is_err()
                                || head.to_ascii_lowercase().contains("connection: close")
                            {
                                return;
                            }
                        }
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        TwoVhosts { port, served }
    }
}

/// Runs Python `code` with the network allowed to `fixture.test` only (which resolves to the
/// loopback fixtures: the operator switch is on), within `timeout_seconds`.
pub(crate) async fn on_fixture_test(code: String, timeout_seconds: u64) -> ExecutionResult {
    run_on(
        &scheduler(true),
        RunOptions::new(Language::Python, code)
            .allow_network()
            .allowed_domains(["fixture.test"])
            .timeout_seconds(timeout_seconds),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_and_keep_alive_requests_must_name_the_allowed_host() {
    let fixture = TwoVhosts::start().await;
    let code = format!(
        r#"
import socket
PORT = {port}
def req(host):
    return ("GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host).encode()
def talk(name, writes):
    s = socket.create_connection(("fixture.test", PORT), timeout=20)
    got = b""
    try:
        for i, data in enumerate(writes):
            s.sendall(data)
            if i + 1 < len(writes):
                got += s.recv(4096)
        while True:
            more = s.recv(4096)
            if not more:
                break
            got += more
    except OSError as e:
        got += b" [" + type(e).__name__.encode() + b"]"
    print(name, got.decode(errors="replace").replace("\r\n", " "))
talk("allowed-twice", [req("fixture.test") + req("fixture.test:%d" % PORT) + b"GET / HTTP/1.1\r\nHost: fixture.test\r\nConnection: close\r\n\r\n"])
talk("pipelined", [req("fixture.test") + req("other.test")])
talk("keep-alive", [req("fixture.test"), req("other.test")])
"#,
        port = fixture.port
    );
    let result = on_fixture_test(code, 120).await;
    let out = &result.stdout;
    let line = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} line: {result:?}"))
            .to_string()
    };
    assert_eq!(
        line("allowed-twice").matches("vhost:fixture.test").count(),
        3,
        "{out}"
    );
    assert!(!line("pipelined").contains("vhost:"), "{out}");
    let keep_alive = line("keep-alive");
    assert_eq!(keep_alive.matches("vhost:fixture.test").count(), 1, "{out}");
    assert!(!keep_alive.contains("vhost:other.test"), "{out}");
    let served = fixture.served.lock().unwrap().clone();
    assert!(!served.iter().any(|h| h == "other.test"), "{served:?}");
    assert_eq!(
        served.iter().filter(|h| *h == "fixture.test").count(),
        4,
        "{served:?}"
    );
    // Both stops read the same, and refusals are kept distinct.
    assert_eq!(
        result.network_refusals,
        [format!(
            "TCP fixture.test:{}: a later request named \"other.test\"",
            fixture.port
        )],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowlist_dns_host_sni_raw_ip_and_udp() {
    let fixture = Fixture::start(b"fixture says hi".to_vec()).await;
    let scheduler = scheduler(true);
    let code = format!(
        "{}\nPORT = {}\n{}",
        PROBES,
        fixture.port,
        r#"
probe("dns-allowed", lambda: resolve("fixture.test").startswith("198.18."))
probe("dns-unlisted", lambda: resolve("other.test"))
probe("dns-sub-unlisted", lambda: resolve("www.other.test"))
probe("http-match", lambda: http("fixture.test", "fixture.test:%d" % PORT))
probe("http-mismatch", lambda: http("fixture.test", "other.test"))
probe("sni-mismatch", lambda: tls("fixture.test", "other.test"))
probe("raw-gateway", lambda: raw_ip("10.0.2.2"))
probe("raw-virtual", lambda: raw_ip("198.18.200.200"))
probe("udp-out", lambda: udp(resolve("fixture.test"), 5353))
probe("dns-elsewhere", lambda: udp("198.18.200.200", 53))
"#
    );
    let result = run_on(
        &scheduler,
        RunOptions::new(Language::Python, code)
            .allow_network()
            .allowed_domains(["fixture.test"])
            .timeout_seconds(120),
    )
    .await;
    let out = &result.stdout;
    let expect = [
        "dns-allowed ok True",
        "dns-unlisted refused gaierror",
        "dns-sub-unlisted refused gaierror",
        "http-match ok fixture says hi",
        "http-mismatch refused",
        "sni-mismatch refused",
        "raw-gateway refused",
        "raw-virtual refused",
        "udp-out refused",
        "dns-elsewhere refused",
    ];
    for line in expect {
        assert!(
            out.lines().any(|l| l.starts_with(line)),
            "missing `{line}` in:\n{out}\nstderr: {}",
            result.stderr
        );
    }
    // Each refusal is reported in the result, with its reason.
    let refusals = result.network_refusals.join("\n");
    for expected in [
        "DNS other.test: not in the allowlist".to_string(),
        "DNS www.other.test: not in the allowlist".to_string(),
        format!(
            "TCP fixture.test:{}: the client named \"other.test\"",
            fixture.port
        ),
        "TCP 10.0.2.2:".to_string(),
        "TCP 198.18.200.200:".to_string(),
        "UDP 198.18.200.200:53: only DNS to the gateway".to_string(),
        ":5353: only DNS to the gateway".to_string(),
    ] {
        assert!(
            refusals.contains(&expected),
            "missing `{expected}` in:\n{refusals}"
        );
    }
    // Only the matching request ever reached the fixture, with the Host the guest sent.
    assert_eq!(fixture.connections(), 1, "{out}");
    assert_eq!(
        *fixture.last_host.lock().unwrap(),
        format!("fixture.test:{}", fixture.port)
    );
}

/// A TCP server on 127.0.0.1 that records the first bytes of every connection (what arrived
/// within two seconds, at most 4 KiB) and closes it.
struct FirstBytes {
    port: u16,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl FirstBytes {
    async fn start() -> FirstBytes {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
                    while got.len() < 4096 {
                        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
                            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&chunk[..n]),
                            _ => break,
                        }
                    }
                    record.lock().unwrap().push(got);
                });
            }
        });
        FirstBytes { port, seen }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_judged_by_its_sni_and_ipv6_and_dns_over_tcp_are_refused() {
    let fixture = FirstBytes::start().await;
    let code = format!(
        "{PROBES}\nPORT = {}\n{}",
        fixture.port,
        r#"
QUERY = bytes.fromhex("123401000001000000000000") + b"\x07fixture\x04test\x00\x00\x01\x00\x01"
def dns_tcp(addr, port):
    s = socket.create_connection((addr, port), timeout=15)
    s.sendall(len(QUERY).to_bytes(2, "big") + QUERY)
    data = s.recv(512)
    if not data:
        raise ConnectionResetError("closed without an answer")
    return data.hex()

probe("ipv6-tcp-socket", lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM))
probe("ipv6-udp-socket", lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM))
probe("ipv6-resolve", lambda: socket.getaddrinfo("fixture.test", PORT, socket.AF_INET6))
probe("ipv6-create-connection", lambda: socket.create_connection(("::ffff:198.18.200.200", PORT), timeout=15))
probe("dns-tcp-gateway", lambda: dns_tcp("10.0.2.2", 53))
probe("dns-tcp-virtual", lambda: dns_tcp("198.18.200.200", 53))
probe("dns-tcp-allowed-name", lambda: dns_tcp(resolve("fixture.test"), PORT))
probe("sni-mismatch", lambda: tls("fixture.test", "other.test"))
probe("sni-absent", lambda: tls("fixture.test", None))
probe("sni-match", lambda: tls("fixture.test", "fixture.test"))
"#
    );
    let result = on_fixture_test(code, 120).await;
    let out = &result.stdout;
    let line = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} line: {result:?}"))
            .to_string()
    };
    // No IPv6 in the guest kernel: no socket, no address, no v4-mapped detour.
    for name in ["ipv6-tcp-socket", "ipv6-udp-socket"] {
        assert_eq!(line(name), format!("{name} refused OSError"), "{out}");
    }
    assert_eq!(
        line("ipv6-resolve"),
        "ipv6-resolve refused gaierror",
        "{out}"
    );
    assert!(
        line("ipv6-create-connection").starts_with("ipv6-create-connection refused"),
        "{out}"
    );
    for name in [
        "dns-tcp-gateway",
        "dns-tcp-virtual",
        "dns-tcp-allowed-name",
        "sni-mismatch",
        "sni-absent",
    ] {
        assert!(line(name).starts_with(&format!("{name} refused")), "{out}");
    }
    // The matching name passes: the fixture (no TLS server) ends the handshake itself.
    assert!(line("sni-match").starts_with("sni-match refused"), "{out}");

    let refusals = result.network_refusals.join("\n");
    for expected in [
        "TCP 10.0.2.2:53: no TCP service on the gateway".to_string(),
        "TCP 198.18.200.200:53: the address was never given in a DNS answer".to_string(),
        format!("TCP fixture.test:{}: no name presented", fixture.port),
        format!(
            "TCP fixture.test:{}: the client named \"other.test\"",
            fixture.port
        ),
    ] {
        assert!(
            refusals.contains(&expected),
            "missing `{expected}` in:\n{refusals}\nstdout:\n{out}"
        );
    }
    // Exactly one connection reached the fixture: the TLS ClientHello naming fixture.test.
    let seen = fixture.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}\n{refusals}");
    let hello = &seen[0];
    assert_eq!(hello.first(), Some(&0x16), "not a TLS handshake: {hello:?}");
    let contains = |needle: &[u8]| hello.windows(needle.len()).any(|w| w == needle);
    assert!(contains(b"fixture.test") && !contains(b"other.test"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_heads_that_disagree_about_the_host_are_refused() {
    let fixture = TwoVhosts::start().await;
    let code = format!(
        r#"
import socket
PORT = {port}
def send(name, head):
    s = socket.create_connection(("fixture.test", PORT), timeout=20)
    got = b""
    try:
        s.sendall(head.encode())
        while True:
            more = s.recv(4096)
            if not more:
                break
            got += more
            if b"vhost:" in got:
                break
    except OSError as e:
        got += b"[" + type(e).__name__.encode() + b"]"
    body = got.decode(errors="replace")
    print("%s: %s" % (name, body[body.index("vhost:"):] if "vhost:" in body else "refused"), flush=True)
send("plain", "GET / HTTP/1.1\r\nHost: fixture.test\r\n\r\n")
send("upper-case and trailing dot", "GET / HTTP/1.1\r\nHost: FIXTURE.test.\r\n\r\n")
send("absolute-form other host", "GET http://other.test/ HTTP/1.1\r\nHost: fixture.test\r\n\r\n")
send("two hosts", "GET / HTTP/1.1\r\nHost: fixture.test\r\nHost: other.test\r\n\r\n")
send("userinfo host", "GET / HTTP/1.1\r\nHost: fixture.test@other.test\r\n\r\n")
send("connect other host", "CONNECT other.test:443 HTTP/1.1\r\nHost: fixture.test\r\n\r\n")
send("folded host", "GET / HTTP/1.1\r\nHost: fixture.test\r\n other.test\r\n\r\n")
send("http/1.0 without host", "GET / HTTP/1.0\r\n\r\n")
"#,
        port = fixture.port
    );
    let result = on_fixture_test(code, 120).await;
    assert_eq!(result.exit_code, 0, "{result:?}");
    let shown = |name: &str| {
        result
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} line: {result:?}"))
            .to_string()
    };
    assert_eq!(shown("plain"), "vhost:fixture.test", "{result:?}");
    assert_eq!(
        shown("upper-case and trailing dot"),
        "vhost:FIXTURE.test.",
        "{result:?}"
    );
    for refused in [
        "absolute-form other host",
        "two hosts",
        "userinfo host",
        "connect other host",
        "folded host",
        "http/1.0 without host",
    ] {
        assert_eq!(shown(refused), "refused", "{refused}: {}", result.stdout);
    }
    let served = fixture.served.lock().unwrap().clone();
    assert_eq!(served, ["fixture.test", "FIXTURE.test."], "{served:?}");
    // Refusals are distinct entries: the five invalid heads read alike.
    let port = fixture.port;
    assert_eq!(
        result.network_refusals,
        [
            format!(
                "TCP fixture.test:{port}: no name presented (neither TLS nor an HTTP/1 request with a valid Host)"
            ),
            format!(
                "TCP fixture.test:{port}: no name presented (HTTP request without a Host header)"
            ),
        ]
    );
}
