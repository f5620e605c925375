//! Every path, environment variable, kernel parameter and limit the agent knows, in one place.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use sbx_protocol::Language;

use crate::layer::LayerState;

/// Environment variables read by the agent (all optional).
pub mod env_vars {
    /// Path of the Python interpreter (default `/usr/bin/python3`).
    pub const PYTHON: &str = "SBX_AGENT_PYTHON";
    /// Path of the Bun binary (default `/usr/local/bin/bun`).
    pub const BUN: &str = "SBX_AGENT_BUN";
    /// Path of bash (default `/bin/bash`).
    pub const BASH: &str = "SBX_AGENT_BASH";
    /// Directory where the agent writes its driver files (default `/run/sbx`; dev mode: a fresh
    /// directory under the system temp dir).
    pub const RUN_DIR: &str = "SBX_AGENT_RUN_DIR";
    /// Working directory and `HOME` of the interpreters in dev mode (default: the agent's cwd).
    pub const HOME: &str = "SBX_AGENT_HOME";
    /// Dev mode: a directory laid out like a package layer, pointed at as a mounted one
    /// (`PATH`, `NODE_PATH`; Python's site directory is bound only in the VM).
    pub const PACKAGES: &str = "SBX_AGENT_PACKAGES";
}

/// Kernel command-line parameters read from `/proc/cmdline` in VM mode.
pub mod cmdline {
    /// Size of the `/tmp` tmpfs in MiB.
    pub const TMP_MB: &str = "sbx.tmp_mb";
    /// Size of the `/home/user` tmpfs in MiB.
    pub const HOME_MB: &str = "sbx.home_mb";
    /// `1`: the VM has a package layer disk.
    pub const PACKAGES: &str = sbx_protocol::layer::CMDLINE_PARAM;
    /// `1`: the CPU is emulated (QEMU's TCG).
    pub const TCG: &str = sbx_protocol::TCG_CMDLINE_PARAM;
}

/// Paths inside the guest.
pub mod paths {
    /// Block devices in sysfs: the root disk is the first `vd*` that is not the package layer
    /// (`/dev/vda`).
    pub const SYS_BLOCK: &str = "/sys/block";
    /// Where the root disk is mounted before switching to it.
    pub const NEW_ROOT: &str = "/newroot";
    /// Home of the sandbox user.
    pub const HOME: &str = "/home/user";
    /// Temporary files of the sandbox user (`TMPDIR`), and the agent's script files.
    pub const TMP: &str = "/tmp";
    /// Driver files live here (root-owned tmpfs).
    pub const RUN_DIR: &str = "/run/sbx";
    /// sysfs directory listing virtio-serial ports.
    pub const VIRTIO_PORTS: &str = "/sys/class/virtio-ports";
    /// Default interpreters.
    pub const PYTHON: &str = "/usr/bin/python3";
    /// Default Bun binary.
    pub const BUN: &str = "/usr/local/bin/bun";
    /// Default bash.
    pub const BASH: &str = "/bin/bash";
}

/// Uid and gid of the sandbox user.
pub const SANDBOX_UID: u32 = 1000;
/// Gid of the sandbox user.
pub const SANDBOX_GID: u32 = 1000;
/// `RLIMIT_NPROC` of interpreters (counts every process of the sandbox user).
pub const SANDBOX_NPROC: u64 = 1024;
/// Default size of `/tmp` and `/home/user` when the kernel command line says nothing.
pub const DEFAULT_TMPFS_MB: u64 = 64;
/// Size of `/run` (driver files only).
pub const RUN_TMPFS_MB: u64 = 8;

/// Largest chunk read from an interpreter's stdout or stderr, and so the largest output event.
pub const OUTPUT_CHUNK: usize = 64 * 1024;
/// Largest chunk of a file read for the host (one `FileData` event; the outbox holds up to
/// 64 events, so a read buffers at most a few MiB however slowly the host drains it).
pub const FILE_READ_CHUNK: usize = 64 * 1024;
/// Most file writes in progress at once.
pub const MAX_UPLOADS: usize = 16;
/// A write whose next chunk does not arrive within this time is abandoned (its temporary file
/// removed), so a host that vanished mid-upload leaves nothing behind.
pub const UPLOAD_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Between SIGTERM and SIGKILL when an execution times out.
pub const TERM_GRACE: Duration = Duration::from_secs(1);
/// How long to wait for a SIGKILLed interpreter to be reaped before reporting anyway.
pub const KILL_WAIT: Duration = Duration::from_secs(5);
/// How long the imports of a warm-up may take (big packages under emulation are slow).
pub const WARM_IMPORTS_TIMEOUT: Duration = Duration::from_secs(300);
/// How long an interpreter may take to start and report ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Most bytes drained from one pipe after an execution ends (output written after completion by
/// background processes may keep coming; this bounds the drain).
pub const DRAIN_CAP: usize = 4 * 1024 * 1024;
/// How long to wait for queued events to reach the host before powering off.
pub const SHUTDOWN_FLUSH: Duration = Duration::from_millis(500);
/// Fallback poll interval while the host is not connected (SIGIO normally wakes us sooner).
pub const RECONNECT_POLL: Duration = Duration::from_millis(50);
/// How long to wait for the control port to show up in sysfs at boot.
pub const PORT_APPEAR_TIMEOUT: Duration = Duration::from_secs(30);
/// Stderr tail kept from an interpreter that failed to start, for the error message.
pub const START_STDERR_TAIL: usize = 2048;

/// How the agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 of the VM: mounts, switches root, serves the virtio-serial port.
    Init,
    /// Development: serves stdin/stdout, no mounts, no PID-1 duties.
    Stdio,
}

/// Everything the serving part of the agent needs to know.
#[derive(Debug, Clone)]
pub struct Config {
    /// How the agent runs.
    pub mode: Mode,
    /// Switch interpreters to [`SANDBOX_UID`]/[`SANDBOX_GID`] (only possible as root).
    pub drop_privileges: bool,
    /// Working directory and `HOME` of interpreters.
    pub home: PathBuf,
    /// Directory for driver files.
    pub run_dir: PathBuf,
    /// Interpreter binaries.
    pub python: PathBuf,
    /// Bun binary.
    pub bun: PathBuf,
    /// bash binary.
    pub bash: PathBuf,
    /// Whether a root filesystem was mounted (reported in the hello).
    pub root_mounted: bool,
    /// The package layer (reported in the hello; the interpreters' environment points at it).
    pub packages: LayerState,
    /// The boot's steps (reported in the hello; zero outside PID 1).
    pub boot: sbx_protocol::BootTimeline,
    /// The CPU is emulated (QEMU's TCG), as the kernel command line says: interpreters start
    /// tuned for it ([`crate::driver::interpreter_env`]).
    pub emulated_cpu: bool,
}

impl Config {
    /// The interpreter binary for `language`.
    pub fn interpreter(&self, language: Language) -> &std::path::Path {
        match language {
            Language::Python => &self.python,
            Language::Javascript => &self.bun,
            Language::Raw => &self.bash,
        }
    }

    /// Kill every process of the sandbox uid on timeout (only in the VM, where that uid is ours).
    pub fn sandbox_uid_owned(&self) -> Option<u32> {
        (self.mode == Mode::Init && self.drop_privileges).then_some(SANDBOX_UID)
    }

    /// The environment every interpreter starts with.
    pub fn base_env(&self) -> Vec<(OsString, OsString)> {
        let home = self.home.clone().into_os_string();
        let layer = self.packages.layer().cloned().unwrap_or_default();
        let pairs: [(&str, OsString); 11] = [
            ("HOME", home),
            ("USER", "user".into()),
            ("LOGNAME", "user".into()),
            ("SHELL", "/bin/bash".into()),
            ("PATH", layer.path(BASE_PATH)),
            ("LANG", "C.UTF-8".into()),
            ("TMPDIR", paths::TMP.into()),
            ("PYTHONUNBUFFERED", "1".into()),
            // Python would otherwise try to write .pyc files next to read-only sources.
            ("PYTHONDONTWRITEBYTECODE", "1".into()),
            // Bun: no telemetry, no update checks, plain error output.
            ("DO_NOT_TRACK", "1".into()),
            ("NO_COLOR", "1".into()),
        ];
        let mut env: Vec<(OsString, OsString)> =
            pairs.into_iter().map(|(k, v)| (k.into(), v)).collect();
        env.extend(layer.env());
        env
    }
}

/// Reads an interpreter path from `var`, falling back to `default`.
pub fn path_from_env(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default))
}

/// `PATH` of the interpreters (a package layer's console scripts go after it).
pub const BASE_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// What the kernel command line tells the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootParams {
    /// `/tmp` size in MiB.
    pub tmp_mb: u64,
    /// `/home/user` size in MiB.
    pub home_mb: u64,
    /// A package layer disk is attached (`sbx.packages=1`).
    pub packages: bool,
    /// The CPU is emulated (`sbx.tcg=1`).
    pub tcg: bool,
}

impl BootParams {
    /// Parses `/proc/cmdline` text; unknown or malformed parameters keep their defaults.
    pub fn parse(cmdline_text: &str) -> Self {
        let mut params = BootParams {
            tmp_mb: DEFAULT_TMPFS_MB,
            home_mb: DEFAULT_TMPFS_MB,
            packages: false,
            tcg: false,
        };
        for word in cmdline_text.split_ascii_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            match key {
                cmdline::PACKAGES => params.packages = value == "1",
                cmdline::TCG => params.tcg = value == "1",
                _ => {}
            }
            let Some(mb) = value
                .parse::<u64>()
                .ok()
                .filter(|mb| (1..=1 << 20).contains(mb))
            else {
                continue;
            };
            match key {
                cmdline::TMP_MB => params.tmp_mb = mb,
                cmdline::HOME_MB => params.home_mb = mb,
                _ => {}
            }
        }
        params
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_params_default_and_parse() {
        assert_eq!(
            BootParams::parse("console=ttyS0 quiet"),
            BootParams {
                tmp_mb: DEFAULT_TMPFS_MB,
                home_mb: DEFAULT_TMPFS_MB,
                packages: false,
                tcg: false,
            }
        );
        assert_eq!(
            BootParams::parse("reboot=t sbx.tmp_mb=128 sbx.home_mb=32 sbx.packages=1\n"),
            BootParams {
                tmp_mb: 128,
                home_mb: 32,
                packages: true,
                tcg: false,
            }
        );
        assert!(!BootParams::parse("sbx.packages=0 sbx.packages").packages);
        assert!(BootParams::parse("quiet sbx.tcg=1 sbx.tmp_mb=64").tcg);
        assert!(!BootParams::parse("sbx.tcg=0 sbx.tcg").tcg);
    }

    #[test]
    fn boot_params_reject_nonsense() {
        let p = BootParams::parse("sbx.tmp_mb=0 sbx.home_mb=-5 sbx.tmp_mb=abc sbx.home_mb");
        assert_eq!(p.tmp_mb, DEFAULT_TMPFS_MB);
        assert_eq!(p.home_mb, DEFAULT_TMPFS_MB);
    }
}
