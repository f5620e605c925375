//! The tools `sbx mcp` offers: one-shot runs, sessions, and files in a session.
//!
//! Arguments are checked by the library exactly as for `sbx run` and the Rust API; whatever it
//! refuses (an unknown language, a timeout out of range, a denied environment variable, a full
//! server) comes back as a tool error whose text names the field and the limit, and the
//! server carries on. Results are the library's `ExecutionResult` as JSON (stdout, stderr, exit
//! code, timing, network refusals, ...), both as structured content and as text.

use std::collections::BTreeMap;

use base64::Engine as _;
use exec_sandbox::{
    ExecOptions, ExecutionResult, Language, NetworkOptions, RunOptions, Scheduler, SessionOptions,
};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{ServerHandler, tool, tool_handler, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};

use super::sessions::Sessions;

/// Largest file `read_file` returns (it travels inside one JSON message).
pub const MAX_READ_BYTES: u64 = 8 << 20;

/// The server's state: one scheduler, the sessions table, and the idle timeout new sessions get.
#[derive(Clone)]
pub struct Tools {
    scheduler: Scheduler,
    sessions: Sessions,
    idle_timeout_seconds: u64,
    tool_router: ToolRouter<Self>,
}

/// The network options of `allow_network` and `allowed_domains` (which implies it).
fn network(allow_network: bool, allowed_domains: Option<Vec<String>>) -> NetworkOptions {
    let mut options = NetworkOptions::default();
    if allow_network || allowed_domains.is_some() {
        options = options.allow_network();
    }
    if let Some(domains) = allowed_domains {
        options = options.allowed_domains(domains);
    }
    options
}

/// Arguments of `run_code`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunCode {
    /// `python`, `javascript` (TypeScript too) or `raw` (bash).
    pub language: String,
    /// The program.
    pub code: String,
    /// Packages to install first (`name==version` for Python, `name@version` for JavaScript).
    #[serde(default)]
    pub packages: Vec<String>,
    /// Seconds before the program is killed (1-300; the server's default otherwise).
    pub timeout_seconds: Option<u64>,
    /// Guest memory in MB (at least 128).
    pub memory_mb: Option<u32>,
    /// Environment variables of the program.
    #[serde(default)]
    pub env_vars: BTreeMap<String, String>,
    /// Give the sandbox a network device; its connections go through a gateway on the host
    /// that enforces the policy (default false: no network at all).
    #[serde(default)]
    pub allow_network: bool,
    /// Only these domains and their subdomains (implies allow_network).
    pub allowed_domains: Option<Vec<String>>,
}

/// Arguments of `session_start`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionStart {
    /// `python`, `javascript` or `raw`: every execution of the session uses it, and state
    /// (variables, imports, files) persists between executions.
    pub language: String,
    /// Packages installed for the whole session.
    #[serde(default)]
    pub packages: Vec<String>,
    /// Guest memory in MB (at least 128).
    pub memory_mb: Option<u32>,
    /// Environment variables of every execution.
    #[serde(default)]
    pub env_vars: BTreeMap<String, String>,
    /// Give the sandbox a network device; its connections go through a gateway on the host
    /// that enforces the policy (default false: no network at all).
    #[serde(default)]
    pub allow_network: bool,
    /// Only these domains and their subdomains (implies allow_network).
    pub allowed_domains: Option<Vec<String>>,
}

/// Arguments of `session_exec`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionExec {
    /// From session_start.
    pub session_id: String,
    /// The code, run in the session's interpreter.
    pub code: String,
    /// Seconds before the execution is killed (1-300).
    pub timeout_seconds: Option<u64>,
    /// Environment variables of this execution, on top of the session's.
    #[serde(default)]
    pub env_vars: BTreeMap<String, String>,
}

/// Arguments naming a session only.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionId {
    /// From session_start.
    pub session_id: String,
}

/// Arguments of `write_file`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteFile {
    /// From session_start.
    pub session_id: String,
    /// Path relative to the sandbox's home directory (`/home/user`); parents are created.
    pub path: String,
    /// The content as text (UTF-8). Give exactly one of content and content_base64.
    pub content: Option<String>,
    /// The content as base64 (for binary files).
    pub content_base64: Option<String>,
    /// Make the file executable (mode 0755 instead of 0644).
    #[serde(default)]
    pub make_executable: bool,
}

/// Arguments of `read_file` and `list_files`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionPath {
    /// From session_start.
    pub session_id: String,
    /// Path relative to the sandbox's home directory (`""` or `.` for the home itself).
    #[serde(default)]
    pub path: String,
}

/// A tool error whose text says what was wrong.
fn refused(message: impl Into<String>) -> CallToolResult {
    CallToolResult::structured_error(
        json!({ "error": { "kind": "invalid_input", "message": message.into() } }),
    )
}

/// A tool error for what the library returned: its kind, hint and causes, and a message with
/// the whole chain (an agent reads that first: "invalid input: timeout_seconds: ...").
fn failed(error: &exec_sandbox::Error) -> CallToolResult {
    let mut value = crate::output::error_value(error);
    let mut message = error.to_string();
    for cause in value["causes"].as_array().into_iter().flatten() {
        message.push_str(": ");
        message.push_str(cause.as_str().unwrap_or_default());
    }
    value["message"] = Value::String(message);
    CallToolResult::structured_error(json!({ "error": value }))
}

fn language(text: &str) -> Result<Language, CallToolResult> {
    text.parse::<Language>()
        .map_err(|e| refused(format!("language: {e}")))
}

fn result_value(result: &ExecutionResult) -> CallToolResult {
    match serde_json::to_value(result) {
        Ok(value) => CallToolResult::structured(value),
        Err(e) => refused(format!(
            "internal error: the result does not serialize: {e}"
        )),
    }
}

impl Tools {
    /// Tools over `scheduler`, holding at most `max_sessions` sessions.
    pub fn new(scheduler: Scheduler, max_sessions: usize, idle_timeout_seconds: u64) -> Self {
        Self {
            scheduler,
            sessions: Sessions::new(max_sessions),
            idle_timeout_seconds,
            tool_router: Self::tool_router(),
        }
    }

    /// Closes every session (the server is stopping).
    pub async fn close_all(&self) {
        for session in self.sessions.drain() {
            session.close().await;
        }
    }
}

#[tool_router]
impl Tools {
    /// Runs code once in a fresh microVM.
    #[tool(
        description = "Run code once in a fresh, disposable microVM (no network unless asked). Returns stdout, stderr, exit_code, timed_out, timing and network_refusals."
    )]
    async fn run_code(&self, Parameters(args): Parameters<RunCode>) -> CallToolResult {
        let language = match language(&args.language) {
            Ok(l) => l,
            Err(e) => return e,
        };
        let mut options = RunOptions::new(language, args.code).packages(args.packages);
        options.timeout_seconds = args.timeout_seconds;
        options.memory_mb = args.memory_mb;
        options.env_vars = args.env_vars.into_iter().collect();
        options.network = network(args.allow_network, args.allowed_domains);
        match self.scheduler.run(options).await {
            Ok(result) => result_value(&result),
            Err(e) => failed(&e),
        }
    }

    /// Starts a session.
    #[tool(
        description = "Start a session: one microVM whose interpreter keeps its state (variables, imports, files) across session_exec calls. Returns session_id. Close it with session_close."
    )]
    async fn session_start(&self, Parameters(args): Parameters<SessionStart>) -> CallToolResult {
        let language = match language(&args.language) {
            Ok(l) => l,
            Err(e) => return e,
        };
        if let Err(e) = self.sessions.has_room() {
            return refused(e.to_string());
        }
        let mut options = SessionOptions::new(language)
            .packages(args.packages)
            .idle_timeout_seconds(self.idle_timeout_seconds);
        options.memory_mb = args.memory_mb;
        options.env_vars = args.env_vars.into_iter().collect();
        options.network = network(args.allow_network, args.allowed_domains);
        let session = match self.scheduler.session(options).await {
            Ok(session) => session,
            Err(e) => return failed(&e),
        };
        match self.sessions.insert(session) {
            Ok(id) => CallToolResult::structured(json!({
                "session_id": id,
                "language": language.as_str(),
                "idle_timeout_seconds": self.idle_timeout_seconds,
            })),
            Err((session, e)) => {
                session.close().await;
                refused(e.to_string())
            }
        }
    }

    /// Runs code in a session.
    #[tool(
        description = "Run code in a session's interpreter (state persists). Returns the same fields as run_code."
    )]
    async fn session_exec(&self, Parameters(args): Parameters<SessionExec>) -> CallToolResult {
        let session = match self.sessions.get(&args.session_id) {
            Ok(s) => s,
            Err(e) => return refused(format!("session_id: {e}")),
        };
        let mut options = ExecOptions::new(args.code);
        options.timeout_seconds = args.timeout_seconds;
        options.env_vars = args.env_vars.into_iter().collect();
        match session.exec(options).await {
            Ok(result) => result_value(&result),
            Err(e) => failed(&e),
        }
    }

    /// Closes a session.
    #[tool(description = "Close a session and destroy its microVM.")]
    async fn session_close(&self, Parameters(args): Parameters<SessionId>) -> CallToolResult {
        match self.sessions.remove(&args.session_id) {
            Ok(session) => {
                let executions = session.exec_count();
                session.close().await;
                CallToolResult::structured(json!({ "closed": true, "exec_count": executions }))
            }
            Err(e) => refused(format!("session_id: {e}")),
        }
    }

    /// Writes a file into a session.
    #[tool(
        description = "Write a file into a session's home directory (text in content, or binary in content_base64). Atomic: a failed write leaves nothing."
    )]
    async fn write_file(&self, Parameters(args): Parameters<WriteFile>) -> CallToolResult {
        let bytes = match (args.content, args.content_base64) {
            (Some(text), None) => text.into_bytes(),
            (None, Some(encoded)) => {
                match base64::engine::general_purpose::STANDARD.decode(encoded.trim()) {
                    Ok(bytes) => bytes,
                    Err(e) => return refused(format!("content_base64: not base64: {e}")),
                }
            }
            _ => return refused("give exactly one of content and content_base64"),
        };
        let session = match self.sessions.get(&args.session_id) {
            Ok(s) => s,
            Err(e) => return refused(format!("session_id: {e}")),
        };
        let size = bytes.len() as u64;
        match session
            .write_file(
                &args.path,
                bytes.as_slice(),
                Some(size),
                args.make_executable,
            )
            .await
        {
            Ok(written) => {
                CallToolResult::structured(json!({ "path": args.path, "bytes": written }))
            }
            Err(e) => failed(&e),
        }
    }

    /// Reads a file from a session.
    #[tool(
        description = "Read a file from a session's home directory (at most 8 MiB). Returns content as text when it is UTF-8, else content_base64."
    )]
    async fn read_file(&self, Parameters(args): Parameters<SessionPath>) -> CallToolResult {
        let session = match self.sessions.get(&args.session_id) {
            Ok(s) => s,
            Err(e) => return refused(format!("session_id: {e}")),
        };
        let mut bytes = Vec::new();
        let mut sink = Capped {
            bytes: &mut bytes,
            room: MAX_READ_BYTES,
        };
        if let Err(e) = session.read_file(&args.path, &mut sink).await {
            if sink.room == 0 {
                return refused(format!(
                    "path: `{}` is larger than read_file's limit of {} MiB",
                    args.path,
                    MAX_READ_BYTES >> 20
                ));
            }
            return failed(&e);
        }
        let size = bytes.len();
        let value = match String::from_utf8(bytes) {
            Ok(text) => json!({ "path": args.path, "bytes": size, "content": text }),
            Err(e) => json!({
                "path": args.path,
                "bytes": size,
                "content_base64": base64::engine::general_purpose::STANDARD.encode(e.into_bytes()),
            }),
        };
        CallToolResult::structured(value)
    }

    /// Lists a directory in a session.
    #[tool(description = "List a directory of a session's home directory.")]
    async fn list_files(&self, Parameters(args): Parameters<SessionPath>) -> CallToolResult {
        let session = match self.sessions.get(&args.session_id) {
            Ok(s) => s,
            Err(e) => return refused(format!("session_id: {e}")),
        };
        match session.list_files(&args.path).await {
            Ok(entries) => {
                let entries: Vec<Value> = entries
                    .iter()
                    .map(|e| json!({ "name": e.name, "is_dir": e.is_dir, "size": e.size }))
                    .collect();
                CallToolResult::structured(json!({ "path": args.path, "entries": entries }))
            }
            Err(e) => failed(&e),
        }
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Tools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("sbx", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Runs untrusted code in disposable QEMU microVMs. run_code for one-shot runs; \
                 session_start / session_exec / session_close to keep state; write_file, \
                 read_file and list_files move files in and out of a session.",
            )
    }
}

/// An `AsyncWrite` into a vector that refuses bytes beyond `room`.
struct Capped<'a> {
    bytes: &'a mut Vec<u8>,
    room: u64,
}

impl tokio::io::AsyncWrite for Capped<'_> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let take = usize::try_from(self.room)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        if take == 0 && !buf.is_empty() {
            return std::task::Poll::Ready(Err(std::io::Error::other("read_file's limit reached")));
        }
        self.bytes.extend_from_slice(&buf[..take]);
        self.room -= take as u64;
        std::task::Poll::Ready(Ok(take))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
