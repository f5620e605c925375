//! What a caller asks for in one run.

use std::path::PathBuf;

use sbx_protocol::Language;

use crate::network::{NetworkOptions, PortsCallback};
use crate::vm::OutputCallback;

/// One execution request for [`Scheduler::run`](crate::Scheduler::run).
///
/// ```
/// use exec_sandbox::{Language, RunOptions};
///
/// let options = RunOptions::new(Language::Python, "print(6 * 7)")
///     .timeout_seconds(10)
///     .env("GREETING", "hi")
///     .on_stdout(|chunk| eprint!("{}", String::from_utf8_lossy(chunk)));
/// assert_eq!(options.timeout_seconds, Some(10));
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct RunOptions {
    /// Interpreter.
    pub language: Language,
    /// Program text (UTF-8, at most 1 MiB, no NUL bytes).
    pub code: String,
    /// Execution timeout in seconds (1-300); the scheduler's default when `None`.
    pub timeout_seconds: Option<u64>,
    /// Guest memory in MB (at least 128); the scheduler's default when `None`.
    pub memory_mb: Option<u32>,
    /// Environment variables for the program.
    pub env_vars: Vec<(String, String)>,
    /// Receives stdout chunks as the program produces them.
    pub on_stdout: Option<OutputCallback>,
    /// Receives stderr chunks as the program produces them.
    pub on_stderr: Option<OutputCallback>,
    /// Receives the VM's console output during boot (also makes the kernel verbose).
    pub on_boot_log: Option<OutputCallback>,
    /// Network access and forwarded ports (default: no NIC at all).
    pub network: NetworkOptions,
    /// Packages to install (`name==version`, `name@version`, or a range), at most 50.
    pub packages: Vec<String>,
    /// Receives the forwarded ports once bound, before the code runs.
    pub on_ports: Option<PortsCallback>,
    /// A package layer image attached as is (tests only, feature `testing`).
    pub(crate) packages_layer: Option<PathBuf>,
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("language", &self.language)
            .field("code_bytes", &self.code.len())
            .field("timeout_seconds", &self.timeout_seconds)
            .field("memory_mb", &self.memory_mb)
            .field("env_vars", &self.env_vars.len())
            .field("network", &self.network)
            .field("packages", &self.packages)
            .finish_non_exhaustive()
    }
}

impl RunOptions {
    /// A run of `code` in `language` with every other setting at its default.
    pub fn new(language: Language, code: impl Into<String>) -> Self {
        Self {
            language,
            code: code.into(),
            timeout_seconds: None,
            memory_mb: None,
            env_vars: Vec::new(),
            on_stdout: None,
            on_stderr: None,
            on_boot_log: None,
            network: NetworkOptions::default(),
            packages: Vec::new(),
            on_ports: None,
            packages_layer: None,
        }
    }

    builders!(timeout, memory, env, output, network, packages);

    /// Streams the VM console to `f`.
    pub fn on_boot_log(mut self, f: impl Fn(&[u8]) + Send + Sync + 'static) -> Self {
        self.on_boot_log = Some(std::sync::Arc::new(f));
        self
    }

    /// Calls `f` with the forwarded ports once they are bound, before the code runs.
    pub fn on_ports(
        mut self,
        f: impl Fn(&[crate::network::ExposedPort]) + Send + Sync + 'static,
    ) -> Self {
        self.on_ports = Some(std::sync::Arc::new(f));
        self
    }

    /// Attaches the EROFS package layer at `path` to the run's VM as is. Testing only (feature
    /// `testing`): no validation, no cache; such runs never take a pooled VM and get their own
    /// memory snapshots.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub fn packages_layer(mut self, path: impl Into<PathBuf>) -> Self {
        self.packages_layer = Some(path.into());
        self
    }
}
