//! A real S3-protocol server for the tests: `moto_server` on loopback, installed on first use
//! by `scripts/install-moto` (a cached virtualenv), on a port it picks itself, killed on drop
//! (and by the kernel if the test process dies first).

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// How long a fresh server may take to say where it listens.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// A running `moto_server`.
pub(crate) struct Moto {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
}

/// The `moto_server` binary, installed once per cache by the script `scripts/test` also runs.
fn server_binary() -> &'static PathBuf {
    static SERVER: OnceLock<PathBuf> = OnceLock::new();
    SERVER.get_or_init(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/install-moto");
        let output = Command::new(script)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
        assert!(
            output.status.success(),
            "{script} failed ({}): the S3 tests need moto_server",
            output.status
        );
        let path = String::from_utf8(output.stdout).expect("install-moto prints a path");
        PathBuf::from(path.trim())
    })
}

impl Moto {
    /// A server with moto's defaults: any credentials are accepted.
    pub(crate) fn start() -> Moto {
        Self::start_with(&[])
    }

    /// A server with extra environment (moto reads its switches from there).
    pub(crate) fn start_with(env: &[(&str, &str)]) -> Moto {
        let mut command = Command::new(server_binary());
        command
            .args(["-H", "127.0.0.1", "-p", "0"])
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        crate::sys::kill_child_with_parent(&mut command);
        let mut child = command.spawn().expect("cannot start moto_server");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the banner for the port, then keeps draining so the server never blocks on a
        // full pipe; ends when the server does.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("Running on http://127.0.0.1:").nth(1) {
                    let port: String = rest.chars().take_while(char::is_ascii_digit).collect();
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(port);
                    }
                }
            }
        });
        let mut moto = Moto {
            child,
            endpoint: String::new(),
        };
        let port = rx
            .recv_timeout(START_DEADLINE)
            .expect("moto_server did not say where it listens");
        moto.endpoint = format!("http://127.0.0.1:{port}");
        moto
    }

    /// Creates `bucket` with an unsigned request (moto takes it while auth is off or for its
    /// first `INITIAL_NO_AUTH_ACTION_COUNT` requests).
    pub(crate) fn create_bucket(&self, bucket: &str) {
        let url = format!("{}/{bucket}", self.endpoint);
        let response = ureq::put(&url)
            .send_empty()
            .unwrap_or_else(|e| panic!("creating bucket {bucket} failed: {e}"));
        assert!(response.status().is_success(), "{}", response.status());
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
