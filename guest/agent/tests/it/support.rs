//! Drives an `sbx-agent --stdio` child: frames requests, collects events with deadlines.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sbx_protocol::{
    Event, ExecOutcome, ExecRequest, FILE_CHUNK, FileEntry, FrameDecoder, GuestError, Language,
    Request, encode_frame,
};

/// Longest any single test waits for one event.
pub const EVENT_DEADLINE: Duration = Duration::from_secs(30);

/// An event and when it arrived.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub id: u32,
    pub event: Event,
}

/// What one execution produced.
#[derive(Debug)]
pub struct ExecResult {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub outcome: ExecOutcome,
    pub events: Vec<Received>,
    pub sent_at: Instant,
}

impl ExecResult {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// A temporary directory removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("sbx-agent-it-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running agent in dev mode.
pub struct Agent {
    child: Child,
    stdin: Option<ChildStdin>,
    events: mpsc::Receiver<Received>,
    /// Events received while waiting for something else.
    backlog: Vec<Received>,
    next_id: u32,
    pub home: TempDir,
    _run: TempDir,
}

/// The Python interpreter to test with: `SBX_AGENT_PYTHON`, else the real binary behind
/// `python3` (not a shim script).
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("SBX_AGENT_PYTHON").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 must be installed to run these tests");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The Bun binary, if the environment provides one.
pub fn bun() -> Option<PathBuf> {
    std::env::var_os("SBX_AGENT_BUN")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .filter(|p| p.exists())
}

fn bash() -> PathBuf {
    for candidate in ["/bin/bash", "/usr/bin/bash"] {
        if Path::new(candidate).exists() {
            return PathBuf::from(candidate);
        }
    }
    PathBuf::from("bash")
}

impl Agent {
    /// Starts an agent with the host's interpreters.
    pub fn start() -> Agent {
        Agent::start_with(&[])
    }

    /// Starts an agent with extra environment variables.
    pub fn start_with(extra_env: &[(&str, &str)]) -> Agent {
        let mut command = Command::new(env!("CARGO_BIN_EXE_sbx-agent"));
        command.args(["--stdio", "--no-setuid"]);
        Agent::start_command(command, extra_env)
    }

    /// Starts an agent that, running as root with a supplementary group (4242), switches its
    /// interpreters to uid/gid 1000 as in the VM. Needs root and util-linux's `setpriv`.
    pub fn start_dropping_privileges() -> Agent {
        let mut command = Command::new("setpriv");
        command
            .args(["--groups", "4242", "--"])
            .arg(env!("CARGO_BIN_EXE_sbx-agent"))
            .arg("--stdio");
        Agent::start_command(command, &[])
    }

    fn start_command(mut command: Command, extra_env: &[(&str, &str)]) -> Agent {
        let home = TempDir::new("home");
        let run = TempDir::new("run");
        command
            .env("SBX_AGENT_PYTHON", python())
            .env("SBX_AGENT_BASH", bash())
            .env("SBX_AGENT_HOME", &home.0)
            .env("SBX_AGENT_RUN_DIR", &run.0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(bun) = bun() {
            command.env("SBX_AGENT_BUN", bun);
        }
        for (k, v) in extra_env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("spawn sbx-agent");
        let stdin = child.stdin.take();
        let mut stdout = child.stdout.take().expect("stdout");
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            let mut decoder = FrameDecoder::new();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                decoder.push(&buf[..n]);
                while let Ok(Some((id, event))) = decoder.next_frame::<Event>() {
                    let received = Received {
                        at: Instant::now(),
                        id,
                        event,
                    };
                    if tx.send(received).is_err() {
                        return;
                    }
                }
            }
        });
        Agent {
            child,
            stdin,
            events,
            backlog: Vec::new(),
            next_id: 1,
            home,
            _run: run,
        }
    }

    /// Sends a request; returns its id.
    pub fn send(&mut self, request: &Request) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        self.send_raw(&encode_frame(id, request).expect("encode"));
        id
    }

    /// Writes raw bytes to the agent's stdin.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(bytes).expect("write to agent");
        stdin.flush().expect("flush");
    }

    /// Closes the agent's stdin.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// The next event for any request, or panics after `deadline`.
    pub fn next_event(&mut self, deadline: Duration) -> Received {
        if !self.backlog.is_empty() {
            return self.backlog.remove(0);
        }
        self.events
            .recv_timeout(deadline)
            .unwrap_or_else(|e| panic!("no event from the agent within {deadline:?}: {e}"))
    }

    /// The next event for request `id`; others are kept for later.
    pub fn next_for(&mut self, id: u32, deadline: Duration) -> Received {
        if let Some(pos) = self.backlog.iter().position(|r| r.id == id) {
            return self.backlog.remove(pos);
        }
        let until = Instant::now() + deadline;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let received = self
                .events
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("no event for request {id} within {deadline:?}: {e}"));
            if received.id == id {
                return received;
            }
            self.backlog.push(received);
        }
    }

    /// Waits for the hello.
    pub fn hello(&mut self) -> sbx_protocol::AgentHello {
        match self.next_event(EVENT_DEADLINE) {
            Received {
                id: 0,
                event: Event::Hello(hello),
                ..
            } => hello,
            other => panic!("expected a hello, got {other:?}"),
        }
    }

    /// A request with generous defaults.
    pub fn request(language: Language, code: &str) -> ExecRequest {
        ExecRequest {
            language,
            code: code.to_string(),
            timeout_ms: 20_000,
            env: Vec::new(),
            stdout_limit: 10_000_000,
            stderr_limit: 10_000_000,
        }
    }

    /// Runs `request` and collects everything up to its `ExecDone`.
    pub fn exec_request(&mut self, request: ExecRequest) -> ExecResult {
        let sent_at = Instant::now();
        let id = self.send(&Request::Exec(request));
        self.collect(id, sent_at)
    }

    /// Collects the events of exec request `id` up to its `ExecDone`.
    pub fn collect(&mut self, id: u32, sent_at: Instant) -> ExecResult {
        let mut result = ExecResult {
            stdout: Vec::new(),
            stderr: Vec::new(),
            outcome: ExecOutcome {
                exit_code: i32::MIN,
                timed_out: false,
                stdout_truncated: false,
                stderr_truncated: false,
                execution_time_ms: 0,
                interpreter_start_ms: 0,
            },
            events: Vec::new(),
            sent_at,
        };
        loop {
            let received = self.next_for(id, EVENT_DEADLINE);
            result.events.push(received.clone());
            match received.event {
                Event::Stdout(bytes) => result.stdout.extend(bytes),
                Event::Stderr(bytes) => result.stderr.extend(bytes),
                Event::ExecDone(outcome) => {
                    result.outcome = outcome;
                    return result;
                }
                other => panic!("unexpected event for exec {id}: {other:?}"),
            }
        }
    }

    /// Runs code with default limits.
    pub fn exec(&mut self, language: Language, code: &str) -> ExecResult {
        self.exec_request(Agent::request(language, code))
    }

    /// Sends an exec expected to fail with a `GuestError`.
    pub fn exec_error(&mut self, request: ExecRequest) -> GuestError {
        let id = self.send(&Request::Exec(request));
        match self.next_for(id, EVENT_DEADLINE).event {
            Event::Error(e) => e,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    /// Writes `content` to `path` in chunks, announcing `size`; returns the answer.
    pub fn write_file_sized(
        &mut self,
        path: &str,
        content: &[u8],
        size: Option<u64>,
        executable: bool,
    ) -> Result<u64, GuestError> {
        let id = self.send(&Request::WriteFile {
            path: path.to_string(),
            size,
            executable,
        });
        let mut frames = Vec::new();
        for chunk in content.chunks(FILE_CHUNK) {
            frames.extend(encode_frame(id, &Request::FileData(chunk.to_vec())).expect("encode"));
        }
        frames.extend(encode_frame(id, &Request::FileEnd).expect("encode"));
        self.send_raw(&frames);
        match self.next_for(id, EVENT_DEADLINE).event {
            Event::FileWritten { size } => Ok(size),
            Event::Error(e) => Err(e),
            other => panic!("unexpected answer to a write: {other:?}"),
        }
    }

    /// Writes `content` to `path`, announcing its size.
    pub fn write_file(
        &mut self,
        path: &str,
        content: &[u8],
        executable: bool,
    ) -> Result<u64, GuestError> {
        self.write_file_sized(path, content, Some(content.len() as u64), executable)
    }

    /// Reads `path` whole.
    pub fn read_file(&mut self, path: &str) -> Result<Vec<u8>, GuestError> {
        let id = self.send(&Request::ReadFile {
            path: path.to_string(),
        });
        let mut content = Vec::new();
        loop {
            match self.next_for(id, EVENT_DEADLINE).event {
                Event::FileData(bytes) => content.extend(bytes),
                Event::FileEnd { size } => {
                    assert_eq!(size, content.len() as u64, "FileEnd size");
                    return Ok(content);
                }
                Event::Error(e) => return Err(e),
                other => panic!("unexpected answer to a read: {other:?}"),
            }
        }
    }

    /// Lists `path`.
    pub fn list_files(&mut self, path: &str) -> Result<(Vec<FileEntry>, bool), GuestError> {
        let id = self.send(&Request::ListFiles {
            path: path.to_string(),
        });
        match self.next_for(id, EVENT_DEADLINE).event {
            Event::FileList { entries, truncated } => Ok((entries, truncated)),
            Event::Error(e) => Err(e),
            other => panic!("unexpected answer to a listing: {other:?}"),
        }
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the agent to exit.
    pub fn wait_exit(&mut self, deadline: Duration) -> std::process::ExitStatus {
        let until = Instant::now() + deadline;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < until,
                "agent did not exit within {deadline:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stdin = None;
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` until it holds or `deadline` passes.
pub fn wait_until(deadline: Duration, mut check: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + deadline;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
