//! Gateway bypasses, against loopback fixtures only: every request of a plain-HTTP connection
//! must name the host the connection was opened for, pipelined in one write or sent later on
//! a keep-alive connection.

use std::sync::{Arc, Mutex};

use exec_sandbox::{Language, RunOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::vm_network::{run_on, scheduler};

/// A keep-alive HTTP server on 127.0.0.1 with two virtual hosts: it answers every request
/// (heads without bodies) with `vhost:<Host>` and records each `Host` it served.
struct TwoVhosts {
    port: u16,
    served: Arc<Mutex<Vec<String>>>,
}

impl TwoVhosts {
    async fn start() -> TwoVhosts {
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
    let result = run_on(
        &scheduler(true),
        RunOptions::new(Language::Python, code)
            .allow_network()
            .allowed_domains(["fixture.test"])
            .timeout_seconds(120),
    )
    .await;
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
