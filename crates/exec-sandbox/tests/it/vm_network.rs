//! Networking through real VMs: no NIC by default, the operator switch for host-internal
//! destinations, forwarded ports (the allowlist's refusals: attack_gateway).
//!
//! Traffic goes only to loopback fixtures in this process and, for the TLS test, to the package
//! registry this machine is configured with (`npm config get registry`). Refusals are proven
//! with names and virtual addresses that never leave the gateway.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use exec_sandbox::{
    Error, ErrorKind, ExposePort, ExposedPort, Language, RunOptions, Scheduler, SchedulerConfig,
    SessionOptions,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{chain, run_with};

/// A scheduler whose gateways may reach this host's loopback, with `fixture.test` and
/// `other.test` naming it (`allow_internal` off: the names resolve but are never given out).
pub(crate) fn scheduler(allow_internal: bool) -> Scheduler {
    let mut config = SchedulerConfig::from_env().expect("test environment config");
    config.network_allow_internal = allow_internal;
    config.network_hosts = vec![
        ("fixture.test".into(), Ipv4Addr::LOCALHOST),
        ("other.test".into(), Ipv4Addr::LOCALHOST),
    ];
    Scheduler::new(config).expect("scheduler")
}

pub(crate) async fn run_on(
    scheduler: &Scheduler,
    options: RunOptions,
) -> exec_sandbox::ExecutionResult {
    match scheduler.run(options).await {
        Ok(result) => result,
        Err(e) => panic!("run failed: {}", chain(&e)),
    }
}

/// An HTTP server on 127.0.0.1 that answers every request with `body` and counts connections
/// and remembers the last `Host` it saw.
pub(crate) struct Fixture {
    pub(crate) port: u16,
    connections: Arc<AtomicUsize>,
    pub(crate) last_host: Arc<std::sync::Mutex<String>>,
}

impl Fixture {
    pub(crate) async fn start(body: Vec<u8>) -> Fixture {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let last_host = Arc::new(std::sync::Mutex::new(String::new()));
        let (count, host) = (connections.clone(), last_host.clone());
        let body = Arc::new(body);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let (host, body) = (host.clone(), body.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&head).to_string();
                    if let Some(line) = text
                        .lines()
                        .find(|l| l.to_ascii_lowercase().starts_with("host:"))
                    {
                        *host.lock().unwrap() = line[5..].trim().to_string();
                    }
                    let header = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = stream.write_all(header.as_bytes()).await;
                    let _ = stream.write_all(&body).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Fixture {
            port,
            connections,
            last_host,
        }
    }

    pub(crate) fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_the_vm_has_no_nic() {
    let result = run_with(RunOptions::new(
        Language::Raw,
        "ls /sys/class/net; getent hosts example.com || echo no-dns",
    ))
    .await;
    assert_eq!(result.stdout, "lo\nno-dns\n", "{result:?}");
    assert!(result.exposed_ports.is_empty());
}

/// The guest program used by the policy tests: one line per probe.
pub(crate) const PROBES: &str = r#"
import socket, ssl, sys
def probe(name, fn):
    try:
        print(name, "ok", fn())
    except Exception as e:
        print(name, "refused", type(e).__name__)
    sys.stdout.flush()

def resolve(name):
    return socket.gethostbyname(name)

def http(name, host_header):
    s = socket.create_connection((name, PORT), timeout=15)
    s.sendall(("GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host_header).encode())
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    if not data:
        raise ConnectionResetError("closed without an answer")
    return data.split(b"\r\n\r\n", 1)[1].decode()

def tls(name, server_name):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection((name, PORT), timeout=15)
    s = ctx.wrap_socket(raw, server_hostname=server_name)
    return s.version()

def raw_ip(addr):
    s = socket.create_connection((addr, PORT), timeout=15)
    s.sendall(b"hello")
    if not s.recv(10):
        raise ConnectionResetError("closed")
    return "connected"

def udp(addr, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.connect((addr, port))
    s.send(b"x")
    s.send(b"x")
    return s.recv(100)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_loopback_is_unreachable_unless_the_operator_allows_it() {
    let fixture = Fixture::start(b"internal".to_vec()).await;
    let code = format!(
        "{PROBES}\nPORT = {}\nprobe('dns', lambda: resolve('fixture.test'))\nprobe('http', lambda: http('fixture.test', 'fixture.test'))\n",
        fixture.port
    );
    // An allowlist naming the fixture, with the operator switch off: the name never resolves
    // to anything the guest could use, and nothing reaches the fixture.
    let result = run_on(
        &scheduler(false),
        RunOptions::new(Language::Python, code.clone())
            .allow_network()
            .allowed_domains(["fixture.test"])
            .timeout_seconds(60),
    )
    .await;
    assert!(
        result.stdout.contains("dns refused") && result.stdout.contains("http refused"),
        "{result:?}"
    );
    // Without an allowlist too ("any public destination" is not the host).
    let result = run_on(
        &scheduler(false),
        RunOptions::new(Language::Python, code)
            .allow_network()
            .timeout_seconds(60),
    )
    .await;
    assert!(result.stdout.contains("http refused"), "{result:?}");
    assert_eq!(fixture.connections(), 0);
}

/// The registry this machine is configured with, from npm's own configuration.
fn registry_host() -> Option<String> {
    let out = std::process::Command::new("npm")
        .args(["config", "get", "registry"])
        .output()
        .ok()?;
    let url = String::from_utf8(out.stdout).ok()?;
    let rest = url.trim().split_once("://")?.1;
    let host = rest.split(['/', ':']).next()?;
    (!host.is_empty()).then(|| host.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_an_allowed_registry_works_and_sni_must_match() {
    // node and npm are among the README's requirements.
    let registry = registry_host().expect("`npm config get registry` names a registry");
    // curl -k: the registry sits behind a TLS-intercepting proxy whose CA only the host trusts.
    let code = format!(
        "curl -sk -o /dev/null -w 'allowed %{{http_code}}\\n' https://{registry}/ || echo allowed failed\n\
         curl -sk -o /dev/null --max-time 20 --connect-to other.test:443:{registry}:443 https://other.test/ \
           && echo spoofed connected || echo spoofed refused\n\
         curl -sk -o /dev/null --max-time 20 https://{registry}.evil.test/ && echo unlisted connected || echo unlisted refused\n"
    );
    let result = run_on(
        &scheduler(false),
        RunOptions::new(Language::Raw, code)
            .allow_network()
            .allowed_domains([registry.as_str()])
            .timeout_seconds(90),
    )
    .await;
    let out = &result.stdout;
    let status = out
        .lines()
        .find_map(|l| l.strip_prefix("allowed "))
        .unwrap_or_default();
    assert!(
        status.len() == 3 && status != "000" && !status.starts_with('5'),
        "TLS to {registry} through the gateway: {out}\n{}",
        result.stderr
    );
    assert!(out.contains("spoofed refused"), "{out}");
    assert!(out.contains("unlisted refused"), "{out}");
}

/// A free port on 127.0.0.1 (bound and released; the test binds it again at once).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    Ok(String::from_utf8_lossy(&response).to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposed_port_serves_the_host_while_the_code_runs_and_the_guest_stays_offline() {
    let external = free_port();
    let (tx, rx) = tokio::sync::oneshot::channel::<Vec<ExposedPort>>();
    let tx = std::sync::Mutex::new(Some(tx));
    // Port 80 in the guest: below 1024, as the unprivileged sandbox user.
    let code = r#"
import os, socket, subprocess, sys
os.chdir("/home/user")
open("hello.txt", "w").write("served from the guest\n")
try:
    socket.create_connection(("10.0.2.2", 80), timeout=5)
    print("outbound connected")
except OSError as e:
    print("outbound refused", type(e).__name__)
try:
    socket.gethostbyname("fixture.test")
    print("dns answered")
except OSError:
    print("dns refused")
sys.stdout.flush()
server = subprocess.Popen([sys.executable, "-m", "http.server", "80"],
                          stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
# The host asks for /done once it has read the page (a request is logged before its answer
# is sent, so the page's own log line is too early to stop at).
for line in server.stderr:
    if b"GET /done" in line:
        break
server.kill()
print("served")
"#;
    let options = RunOptions::new(Language::Python, code)
        .expose(ExposePort::tcp(80).on_host_port(external))
        .timeout_seconds(120)
        .on_ports(move |ports| {
            if let Some(tx) = tx.lock().unwrap().take() {
                let _ = tx.send(ports.to_vec());
            }
        });
    let scheduler = scheduler(false);
    let run = tokio::spawn(async move { scheduler.run(options).await });
    let ports = rx.await.expect("ports are reported before the code runs");
    assert_eq!(ports.len(), 1);
    assert_eq!((ports[0].internal, ports[0].external), (80, external));
    assert_eq!(ports[0].url, format!("http://127.0.0.1:{external}"));

    let deadline = Instant::now() + Duration::from_secs(90);
    let page = loop {
        match http_get(external, "/hello.txt").await {
            Ok(page) if page.contains("200") => break page,
            _ if Instant::now() < deadline && !run.is_finished() => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => {
                let finished = if run.is_finished() {
                    format!("{:?}", run.await)
                } else {
                    "still running".into()
                };
                panic!("no page from the guest: {other:?}; the run: {finished}")
            }
        }
    };
    assert!(page.contains("served from the guest"), "{page}");
    let _ = http_get(external, "/done").await;
    let result = run.await.unwrap().expect("run");
    assert!(result.stdout.contains("outbound refused"), "{result:?}");
    assert!(result.stdout.contains("dns refused"), "{result:?}");
    assert!(result.stdout.contains("served"), "{result:?}");
    assert_eq!(result.exposed_ports, ports);
    let refusals = result.network_refusals.join("\n");
    assert!(
        refusals.contains("TCP 10.0.2.2:80: the VM has no network access")
            && refusals.contains("DNS fixture.test: the VM has no network access"),
        "{refusals}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_is_forwarded_both_ways_in_a_session() {
    let scheduler = scheduler(false);
    let session = scheduler
        .session(SessionOptions::new(Language::Python).expose(ExposePort::udp(5353)))
        .await
        .unwrap_or_else(|e| panic!("session: {}", chain(&e)));
    let port = session.exposed_ports()[0].external;
    // A background echo server in the guest.
    let start = session
        .exec(exec_sandbox::ExecOptions::new(
            r#"
import socket, threading
def echo():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 5353))
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(b"echo:" + data, peer)
threading.Thread(target=echo, daemon=True).start()
print("listening")
"#,
        ))
        .await
        .unwrap();
    assert_eq!(start.stdout, "listening\n");
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(("127.0.0.1", port)).await.unwrap();
    let mut buf = [0u8; 64];
    let mut answer = None;
    for _ in 0..20 {
        socket.send(b"ping").await.unwrap();
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(500), socket.recv(&mut buf)).await
        {
            answer = Some(buf[..n].to_vec());
            break;
        }
    }
    assert_eq!(answer.as_deref(), Some(&b"echo:ping"[..]));
    session.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_host_port_and_bad_options_fail_before_any_vm() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    // Nothing can start with this scheduler: no QEMU, and an empty cache it may not fill. A run
    // that got past the checks fails on the missing assets instead, as the good one shows.
    let cache = tempfile::tempdir().unwrap();
    let scheduler = Scheduler::new(SchedulerConfig {
        qemu_binary: Some("/nonexistent/qemu".into()),
        offline: true,
        cache_dir: cache.path().into(),
        images_dir: cache.path().join("images"),
        snapshot_cache_dir: cache.path().join("snapshots"),
        ..SchedulerConfig::from_env().expect("test environment config")
    })
    .expect("scheduler");
    let err = scheduler
        .run(
            RunOptions::new(Language::Python, "print(1)")
                .expose(ExposePort::tcp(80).on_host_port(port)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Network(_)), "{}", chain(&err));
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{}", chain(&err));
    assert!(
        chain(&err).contains(&format!("127.0.0.1:{port}")),
        "{}",
        chain(&err)
    );
    for options in [
        RunOptions::new(Language::Python, "print(1)")
            .allow_network()
            .allowed_domains(["bad_domain!"]),
        RunOptions::new(Language::Python, "print(1)").expose(ExposePort::tcp(80).on_host_port(80)),
        RunOptions::new(Language::Python, "print(1)").allowed_domains(["example.com"]),
    ] {
        let err = scheduler.run(options).await.unwrap_err();
        assert!(matches!(err, Error::Validation(_)), "{}", chain(&err));
    }
    let err = scheduler
        .run(
            RunOptions::new(Language::Python, "print(1)")
                .expose(ExposePort::tcp(80).on_host_port(0)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Asset(_)), "{}", chain(&err));
    drop(taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_networked_clone_of_a_memory_snapshot_gets_its_own_gateway() {
    let fixture = Fixture::start(b"clone says hi".to_vec()).await;
    let scheduler = scheduler(true);
    let options = || {
        RunOptions::new(
            Language::Raw,
            format!("curl -s http://fixture.test:{}/", fixture.port),
        )
        .allow_network()
        .allowed_domains(["fixture.test"])
        .timeout_seconds(60)
    };
    let first = run_on(&scheduler, options()).await;
    assert_eq!(first.stdout, "clone says hi", "{first:?}");
    // The first networked run of this shape (if no earlier one did) saves a template with a
    // NIC; the next one is its clone, with this run's own gateway behind the NIC.
    scheduler.wait_for_snapshots().await;
    let second = run_on(&scheduler, options()).await;
    assert!(second.l1_cache_hit, "{second:?}");
    assert_eq!(second.stdout, "clone says hi", "{second:?}");
    assert_eq!(fixture.connections(), 2);
}

/// The host's own trust store (which holds the proxy's CA on these machines).
fn host_ca_bundle() -> std::path::PathBuf {
    std::env::var_os("SSL_CERT_FILE")
        .map(Into::into)
        .unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_operators_ca_bundle_tls_verifies_without_k() {
    let registry = registry_host().expect("`npm config get registry` names a registry");
    let mut config = SchedulerConfig::from_env().expect("test environment config");
    config.guest_ca_bundle = Some(host_ca_bundle());
    let with_bundle = Scheduler::new(config).expect("scheduler");
    let curl = format!(
        "curl -sS -o /dev/null -w 'status %{{http_code}}\\n' https://{registry}/ 2>&1 | tail -1"
    );
    let result = run_on(
        &with_bundle,
        RunOptions::new(Language::Raw, curl.clone())
            .allow_network()
            .allowed_domains([registry.as_str()])
            .timeout_seconds(60),
    )
    .await;
    let status = result
        .stdout
        .trim()
        .strip_prefix("status ")
        .unwrap_or("000");
    assert!(
        status.len() == 3 && status != "000" && !status.starts_with('5'),
        "verified TLS to {registry}: {result:?}"
    );
    let python = format!(
        "import urllib.request\nprint(urllib.request.urlopen('https://{registry}/', timeout=30).status)"
    );
    let result = run_on(
        &with_bundle,
        RunOptions::new(Language::Python, python)
            .allow_network()
            .allowed_domains([registry.as_str()])
            .timeout_seconds(60),
    )
    .await;
    assert!(
        result.exit_code == 0 && result.stdout.trim().len() == 3,
        "Python's default context verifies: {result:?}"
    );
    // Without the bundle the same curl cannot verify the intercepting proxy's certificate.
    let result = run_on(
        &scheduler(false),
        RunOptions::new(Language::Raw, curl)
            .allow_network()
            .allowed_domains([registry.as_str()])
            .timeout_seconds(60),
    )
    .await;
    assert!(
        result.stdout.contains("status 000") || !result.stdout.contains("status"),
        "{result:?}"
    );
}

#[test]
fn a_bad_ca_bundle_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    for path in [not_pem, dir.path().join("missing.pem")] {
        let mut config = SchedulerConfig::from_env().expect("test environment config");
        config.guest_ca_bundle = Some(path.clone());
        let err = Scheduler::new(config).err().expect("refused");
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert!(chain(&err).contains("guest_ca_bundle"), "{}", chain(&err));
    }
}
