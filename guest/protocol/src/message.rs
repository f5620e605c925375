//! Message types carried inside frames.

use serde::{Deserialize, Serialize};

/// Name of the virtio-serial port the agent looks up under `/sys/class/virtio-ports/*/name`.
pub const CONTROL_PORT_NAME: &str = "org.exec-sandbox.control";

/// Request id used for events that answer no request (the agent's hello).
pub const EVENT_ID_UNSOLICITED: u32 = 0;

/// The interpreter a piece of code is meant for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    /// CPython, code runs in `__main__`'s namespace.
    Python,
    /// Bun: JavaScript and TypeScript, top-level await.
    Javascript,
    /// bash.
    Raw,
}

impl Language {
    /// Every language, in a stable order.
    pub const ALL: [Language; 3] = [Language::Python, Language::Javascript, Language::Raw];

    /// The name users type (`python`, `javascript`, `raw`).
    pub fn as_str(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::Javascript => "javascript",
            Language::Raw => "raw",
        }
    }
}

impl std::fmt::Display for Language {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Language {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "python" | "py" => Ok(Language::Python),
            "javascript" | "js" | "typescript" | "ts" => Ok(Language::Javascript),
            "raw" | "shell" | "sh" | "bash" => Ok(Language::Raw),
            other => Err(format!(
                "unknown language `{other}` (expected python, javascript or raw)"
            )),
        }
    }
}

/// Code to run in the language's persistent interpreter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Interpreter to use.
    pub language: Language,
    /// The program text (UTF-8, no NUL bytes).
    pub code: String,
    /// Wall-clock limit enforced by the guest, in milliseconds.
    pub timeout_ms: u64,
    /// Environment variables applied to this execution, already validated by the host.
    pub env: Vec<(String, String)>,
    /// Bytes of stdout forwarded before the rest is dropped.
    pub stdout_limit: u64,
    /// Bytes of stderr forwarded before the rest is dropped.
    pub stderr_limit: u64,
}

/// Host-to-guest messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Liveness check; answered by [`Event::Pong`].
    Ping,
    /// Start the language's interpreter ahead of time, then import `modules` in it (for a
    /// memory snapshot whose clones should find them imported already); answered by
    /// [`Event::Warmed`] once all are tried. A module that fails to import is skipped: the
    /// user's own import reports the error. Each name must pass
    /// [`layer::is_warm_module`](crate::layer::is_warm_module); at most
    /// [`MAX_WARM_MODULES`](crate::layer::MAX_WARM_MODULES).
    Warm {
        /// The interpreter.
        language: Language,
        /// Modules (Python) or package specifiers (JavaScript) to import, in order.
        modules: Vec<String>,
    },
    /// Run code; answered by output events, then [`Event::ExecDone`] or [`Event::Error`].
    Exec(ExecRequest),
    /// Power the VM off.
    Shutdown,
    /// This VM was just restored from a memory snapshot shared with other clones: mix
    /// `entropy` into the kernel's pool and reseed its CRNG, set the real-time clock to
    /// `unix_time_ns`, and reseed the running interpreters' pseudo-random generators.
    /// Answered by [`Event::Reseeded`] once all of that is done, or [`Event::Error`].
    Reseed {
        /// Fresh random bytes from the host (at most [`MAX_RESEED_ENTROPY`] are used).
        entropy: Vec<u8>,
        /// The host's wall clock, in nanoseconds since the Unix epoch.
        unix_time_ns: u64,
    },
    /// Start writing the file at `path` (relative to the sandbox user's home). The content
    /// follows as [`Request::FileData`] frames and a [`Request::FileEnd`], all with this
    /// request's id, or a [`Request::FileAbort`]. Answered by [`Event::FileWritten`] after the
    /// end, or [`Event::Error`] (possibly before the end: the host stops sending then). The file
    /// is written to a temporary name and renamed into place, so a failed or aborted write
    /// leaves nothing behind.
    WriteFile {
        /// Path relative to the home directory.
        path: String,
        /// Announced size, checked against [`MAX_FILE_SIZE`] before any data and against the
        /// bytes received at the end.
        size: Option<u64>,
        /// Mode 0755 instead of 0644.
        executable: bool,
    },
    /// A chunk (at most [`FILE_CHUNK`] bytes) of the file being written by the request with
    /// this id.
    FileData(Vec<u8>),
    /// The file being written by the request with this id is complete.
    FileEnd,
    /// Give up the write with this id: the temporary file is removed, no answer is sent.
    FileAbort,
    /// Read the regular file at `path`; answered by [`Event::FileData`] chunks then
    /// [`Event::FileEnd`], or [`Event::Error`].
    ReadFile {
        /// Path relative to the home directory.
        path: String,
    },
    /// List the directory at `path` (`""` or `"."` is the home directory); answered by
    /// [`Event::FileList`] or [`Event::Error`].
    ListFiles {
        /// Path relative to the home directory.
        path: String,
    },
    /// Trust these PEM certificates (at most [`MAX_CA_BUNDLE_BYTES`]) in addition to the
    /// image's: the system bundle (`/etc/ssl/certs/ca-certificates.crt`) is replaced by the
    /// image's bundle followed by these, for every program started from now on. Answered by
    /// [`Event::CertificatesTrusted`] or [`Event::Error`].
    TrustCertificates {
        /// PEM text: one or more `CERTIFICATE` blocks.
        pem: Vec<u8>,
    },
}

/// Largest certificate bundle [`Request::TrustCertificates`] accepts.
pub const MAX_CA_BUNDLE_BYTES: usize = 1024 * 1024;

/// How many PEM certificates (`-----BEGIN CERTIFICATE-----` blocks) `pem` holds: the host
/// checks a bundle with it before sending, the agent again before trusting it.
pub fn pem_certificate_count(pem: &[u8]) -> usize {
    const BEGIN: &[u8] = b"-----BEGIN CERTIFICATE-----";
    pem.windows(BEGIN.len()).filter(|w| *w == BEGIN).count()
}

/// Largest file written or read through [`Request::WriteFile`] and [`Request::ReadFile`]
/// (500 MiB).
pub const MAX_FILE_SIZE: u64 = 500 * 1024 * 1024;
/// Largest payload of one [`Request::FileData`] or [`Event::FileData`] frame.
pub const FILE_CHUNK: usize = 256 * 1024;
/// Longest accepted file path, in bytes.
pub const MAX_PATH_BYTES: usize = 4096;
/// Longest accepted path component, in bytes.
pub const MAX_NAME_BYTES: usize = 255;
/// Most entries one [`Event::FileList`] carries (keeps it well under a frame's size).
pub const MAX_LIST_ENTRIES: usize = 4096;

/// One directory entry in an [`Event::FileList`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// The entry's name (lossily converted to UTF-8).
    pub name: String,
    /// Whether it is a directory (symbolic links are not followed: a link is never a
    /// directory here).
    pub is_dir: bool,
    /// Allocated size in bytes (`st_blocks * 512`): a sparse file reports what it occupies,
    /// not its apparent length.
    pub size: u64,
}

/// Most entropy bytes the agent uses from one [`Request::Reseed`].
pub const MAX_RESEED_ENTROPY: usize = 512;

/// The guest's boot, each step in milliseconds since the kernel started (`CLOCK_BOOTTIME`):
/// the kernel's own start-up is `init_ms`, the agent's the rest. All zero when the agent is not
/// PID 1 (a development run on stdin/stdout) and for a clone (its template booted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootTimeline {
    /// The agent started as `/init`.
    pub init_ms: u64,
    /// The root filesystem was mounted and switched to.
    pub root_ms: u64,
    /// Swap, cgroups, hardening and the network configured: ready to open the control port.
    pub configured_ms: u64,
}

/// Sent once by the agent when its control port opens, with id [`EVENT_ID_UNSOLICITED`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentHello {
    /// Protocol version the agent speaks.
    pub protocol_version: u8,
    /// The agent's crate version.
    pub agent_version: String,
    /// Guest monotonic clock when the agent started serving, in milliseconds since kernel start.
    pub uptime_ms: u64,
    /// Where the guest's boot went, on its own clock.
    pub boot: BootTimeline,
    /// Whether a root filesystem was found and mounted (false in an accelerator probe boot).
    pub root_mounted: bool,
    /// The package layer the kernel command line announced, if any.
    pub packages: crate::layer::LayerStatus,
}

/// How an execution ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOutcome {
    /// The program's exit code, 128+N when killed by signal N, -1 on timeout.
    pub exit_code: i32,
    /// The guest-side timeout fired and the process group was killed.
    pub timed_out: bool,
    /// Stdout went past its limit and the excess was dropped.
    pub stdout_truncated: bool,
    /// Stderr went past its limit and the excess was dropped.
    pub stderr_truncated: bool,
    /// Wall time of the execution measured in the guest, in milliseconds.
    pub execution_time_ms: u64,
    /// Time spent starting the interpreter for this execution (0 when it was already running).
    pub interpreter_start_ms: u64,
}

/// Stable classes of failure reported by the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestErrorKind {
    /// The request was malformed or violated a limit.
    InvalidRequest,
    /// The interpreter could not be started.
    InterpreterStart,
    /// Anything else inside the agent.
    Internal,
}

impl std::fmt::Display for GuestErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GuestErrorKind::InvalidRequest => "invalid request",
            GuestErrorKind::InterpreterStart => "interpreter start",
            GuestErrorKind::Internal => "internal",
        })
    }
}

/// A failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestError {
    /// Class of failure.
    pub kind: GuestErrorKind,
    /// Human-readable detail.
    pub message: String,
}

/// Guest-to-host messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// The agent is ready to serve.
    Hello(AgentHello),
    /// Answer to [`Request::Ping`].
    Pong,
    /// The interpreter is running and has paid its first-start cost (and imported the
    /// modules asked for).
    Warmed {
        /// Milliseconds it took, imports included.
        elapsed_ms: u64,
    },
    /// A chunk of the program's standard output.
    Stdout(Vec<u8>),
    /// A chunk of the program's standard error.
    Stderr(Vec<u8>),
    /// The execution finished.
    ExecDone(ExecOutcome),
    /// The request failed.
    Error(GuestError),
    /// Answer to [`Request::Reseed`]: the CRNG is reseeded, the clock set, the interpreters'
    /// generators reseeded.
    Reseeded {
        /// Interpreters whose generator was reseeded.
        interpreters: u32,
    },
    /// Answer to a completed [`Request::WriteFile`]: the file is in place.
    FileWritten {
        /// Bytes written.
        size: u64,
    },
    /// A chunk (at most [`FILE_CHUNK`] bytes) of the file read by [`Request::ReadFile`].
    FileData(Vec<u8>),
    /// The file read by [`Request::ReadFile`] is complete.
    FileEnd {
        /// Bytes sent in all.
        size: u64,
    },
    /// Answer to [`Request::ListFiles`], sorted by name.
    FileList {
        /// At most [`MAX_LIST_ENTRIES`] entries.
        entries: Vec<FileEntry>,
        /// The directory holds more entries than were sent (which ones were sent is
        /// unspecified).
        truncated: bool,
    },
    /// Answer to [`Request::TrustCertificates`]: the system bundle now includes them.
    CertificatesTrusted {
        /// Certificates added.
        certificates: u32,
    },
}

impl Event {
    /// The variant's name, for messages about an event that arrived where it does not belong
    /// (never its payload, which the guest controls).
    pub fn name(&self) -> &'static str {
        match self {
            Event::Hello(_) => "Hello",
            Event::Pong => "Pong",
            Event::Warmed { .. } => "Warmed",
            Event::Stdout(_) => "Stdout",
            Event::Stderr(_) => "Stderr",
            Event::ExecDone(_) => "ExecDone",
            Event::Error(_) => "Error",
            Event::Reseeded { .. } => "Reseeded",
            Event::FileWritten { .. } => "FileWritten",
            Event::FileData(_) => "FileData",
            Event::FileEnd { .. } => "FileEnd",
            Event::FileList { .. } => "FileList",
            Event::CertificatesTrusted { .. } => "CertificatesTrusted",
        }
    }
}
