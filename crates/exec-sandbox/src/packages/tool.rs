//! Running the host's package tools: pip (as `python3 -m pip`), npm and mkfs.erofs.
//!
//! Every tool runs with this process's environment passed through, so the host's own index
//! configuration applies the way the tool reads it (pip.conf and `PIP_*`, `.npmrc` and
//! `npm_config_*`); nothing here names an index. Output is captured (bounded), a deadline kills
//! a hung tool, and a tool that is not installed is reported as such.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use super::error::PackageError;
use crate::sys;

/// Bytes of each output stream kept (the end of it: errors come last).
const MAX_OUTPUT_BYTES: usize = 4 << 20;
/// Deadline for asking an interpreter its version.
const PROBE_DEADLINE: Duration = Duration::from_secs(30);
/// Deadline for installing a missing tool with apt.
const APT_DEADLINE: Duration = Duration::from_secs(600);

/// The host programs the package pipeline runs, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Tools {
    /// The Python that runs pip (`python3` from `PATH`): `python -m pip`.
    pub(crate) python: PathBuf,
    /// npm (`npm` from `PATH`).
    pub(crate) npm: PathBuf,
    /// mkfs.erofs (`mkfs.erofs` from `PATH`).
    pub(crate) mkfs_erofs: PathBuf,
    /// Variables set (`Some`) or removed (`None`) for every tool, on top of this process's
    /// environment. Empty in production; tests point the tools at a loopback index with it.
    pub(crate) env: Vec<(String, Option<String>)>,
    /// Install a missing mkfs.erofs with apt when running as root (like the image scripts do).
    pub(crate) install_missing: bool,
}

impl Default for Tools {
    fn default() -> Self {
        Self {
            python: PathBuf::from("python3"),
            npm: PathBuf::from("npm"),
            mkfs_erofs: PathBuf::from("mkfs.erofs"),
            env: Vec::new(),
            install_missing: false,
        }
    }
}

/// What a finished tool printed.
#[derive(Debug)]
pub(crate) struct Output {
    /// How it ended.
    pub(crate) status: ExitStatus,
    /// Its standard output (the end of it, if it printed more than we keep).
    pub(crate) stdout: String,
    /// Its error output (likewise).
    pub(crate) stderr: String,
}

impl Output {
    /// The last `lines` lines of stderr (of stdout when stderr is empty), for messages.
    pub(crate) fn tail(&self, lines: usize) -> String {
        let text = if self.stderr.trim().is_empty() {
            &self.stdout
        } else {
            &self.stderr
        };
        let all: Vec<&str> = text.trim_end().lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// A `ToolFailed` error for this output.
    pub(crate) fn failed(&self, tool: &'static str) -> PackageError {
        PackageError::ToolFailed {
            tool,
            status: self.status.to_string(),
            tail: self.tail(15),
        }
    }
}

impl Tools {
    /// A command for `program` with the configured environment, stdin closed.
    pub(crate) fn command(&self, program: &Path) -> Command {
        let mut command = Command::new(program);
        for (name, value) in &self.env {
            match value {
                Some(value) => command.env(name, value),
                None => command.env_remove(name),
            };
        }
        command
    }

    /// `python -m pip` plus the options every pip call here takes: no prompts, no check for a
    /// newer pip (that would contact the index on its own). The host's index settings pass
    /// through; settings that would change where or what pip installs do not.
    pub(crate) fn pip(&self, subcommand: &str) -> Command {
        const NOT_OURS: [&str; 9] = [
            "PIP_USER",
            "PIP_PREFIX",
            "PIP_ROOT",
            "PIP_TARGET",
            "PIP_NO_BINARY",
            "PIP_ONLY_BINARY",
            "PIP_NO_DEPS",
            "PIP_EDITABLE",
            "PIP_REQUIRE_VIRTUALENV",
        ];
        let mut command = self.command(&self.python);
        for name in NOT_OURS {
            command.env_remove(name);
        }
        command.args([
            "-m",
            "pip",
            subcommand,
            "--disable-pip-version-check",
            "--no-input",
        ]);
        command
    }

    /// `npm <subcommand>` without its update check.
    pub(crate) fn npm(&self, subcommand: &str) -> Command {
        let mut command = self.command(&self.npm);
        command.args([subcommand, "--no-update-notifier"]);
        command
    }

    /// The host's CPython `version` (`3.11`) as a real executable (a pyenv shim resolved), if
    /// the host has one: the configured Python, `python<version>` from `PATH`, or
    /// `/usr/bin/python<version>`. Asked once per process.
    pub(crate) fn python_of_version(&self, version: &str) -> Option<PathBuf> {
        /// (configured Python, version) → the interpreter found, if any.
        type Found = Vec<((PathBuf, String), Option<PathBuf>)>;
        static FOUND: Mutex<Found> = Mutex::new(Vec::new());
        let key = (self.python.clone(), version.to_string());
        if let Some((_, found)) = FOUND
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(k, _)| *k == key)
        {
            return found.clone();
        }
        let candidates = [
            self.python.clone(),
            PathBuf::from(format!("python{version}")),
            PathBuf::from(format!("/usr/bin/python{version}")),
        ];
        let found = candidates.iter().find_map(|candidate| {
            let mut command = self.command(candidate);
            command.args([
                "-c",
                "import sys; print('%d.%d' % sys.version_info[:2]); print(sys.executable)",
            ]);
            let out = run("python3", command, PROBE_DEADLINE).ok()?;
            let mut lines = out.stdout.lines();
            let (Some(got), Some(executable)) = (lines.next(), lines.next()) else {
                return None;
            };
            (out.status.success() && got.trim() == version && !executable.trim().is_empty())
                .then(|| PathBuf::from(executable.trim()))
        });
        FOUND
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((key, found.clone()));
        found
    }

    /// Installs the Debian `package` with apt when that is allowed and possible (root, apt-get
    /// present), the way the image scripts ensure their tools. Returns whether it did.
    pub(crate) fn install_with_apt(&self, package: &str, progress: &dyn Fn(&str)) -> bool {
        static APT: Mutex<()> = Mutex::new(());
        if !self.install_missing || sys::effective_uid() != 0 {
            return false;
        }
        let _one_at_a_time = APT.lock().unwrap_or_else(|p| p.into_inner());
        progress(&format!("installing {package} with apt"));
        let apt = |args: &[&str]| {
            let mut command = Command::new("apt-get");
            command.args(args).env("DEBIAN_FRONTEND", "noninteractive");
            run("apt-get", command, APT_DEADLINE).is_ok_and(|out| out.status.success())
        };
        let installed = apt(&["update", "-qq"])
            && apt(&["install", "-y", "-qq", "--no-install-recommends", package]);
        if !installed {
            tracing::warn!("installing {package} with apt failed");
        }
        installed
    }
}

/// Runs `command` to completion with stdin closed and both output streams captured, killing it
/// after `deadline`. A program that does not exist is [`PackageError::ToolMissing`].
///
/// Call from a blocking thread: this thread spawns the child and waits for it, so the child's
/// parent-death signal (it dies with this process) cannot fire early.
pub(crate) fn run(
    tool: &'static str,
    mut command: Command,
    deadline: Duration,
) -> Result<Output, PackageError> {
    let started = Instant::now();
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    sys::kill_child_with_parent(&mut command);
    let program = PathBuf::from(command.get_program());
    tracing::debug!(?command, "running {tool}");
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(PackageError::ToolMissing { tool, program });
        }
        Err(e) => return Err(PackageError::io("run", program)(e)),
    };
    let (tx, rx) = mpsc::channel();
    let streams: [Box<dyn Read + Send>; 2] = [
        Box::new(child.stdout.take().expect("piped")),
        Box::new(child.stderr.take().expect("piped")),
    ];
    for (index, stream) in streams.into_iter().enumerate() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let _ = tx.send((index, read_bounded(stream)));
        });
    }
    let mut outputs: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..2 {
        let left = deadline.saturating_sub(started.elapsed());
        match rx.recv_timeout(left) {
            Ok((index, bytes)) => outputs[index] = bytes,
            Err(_) => return Err(kill(child, tool, deadline)),
        }
    }
    // Both streams are closed: the tool is exiting (or left a daemon holding nothing of ours).
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(None) => return Err(kill(child, tool, deadline)),
            Err(e) => return Err(PackageError::io("wait for", program)(e)),
        }
    };
    let [stdout, stderr] = outputs.map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
    tracing::debug!(%status, ms = started.elapsed().as_millis() as u64, "{tool} finished");
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

fn kill(mut child: Child, tool: &'static str, deadline: Duration) -> PackageError {
    let _ = child.kill();
    let _ = child.wait();
    PackageError::Timeout { tool, deadline }
}

/// Everything `stream` yields, keeping only the last [`MAX_OUTPUT_BYTES`].
fn read_bounded(mut stream: impl Read) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buffer = [0u8; 64 * 1024];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                kept.extend_from_slice(&buffer[..n]);
                if kept.len() > 2 * MAX_OUTPUT_BYTES {
                    kept.drain(..kept.len() - MAX_OUTPUT_BYTES);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if kept.len() > MAX_OUTPUT_BYTES {
        kept.drain(..kept.len() - MAX_OUTPUT_BYTES);
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bash(script: &str) -> Command {
        let mut command = Command::new("bash");
        command.args(["-c", script]);
        command
    }

    #[test]
    fn output_is_captured_and_status_reported() {
        let out = run(
            "bash",
            bash("echo out; echo err >&2; exit 3"),
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.tail(5), "err");
        assert!(out.failed("bash").to_string().contains("err"));
    }

    #[test]
    fn a_missing_program_is_a_missing_tool() {
        let err = run(
            "npm",
            Command::new("/nonexistent/sbx-npm"),
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(
            matches!(&err, PackageError::ToolMissing { tool: "npm", program } if program == Path::new("/nonexistent/sbx-npm")),
            "{err}"
        );
    }

    #[test]
    fn a_hung_tool_is_killed_at_its_deadline() {
        let err = run("bash", bash("exec sleep 600"), Duration::from_millis(200)).unwrap_err();
        assert!(
            matches!(err, PackageError::Timeout { tool: "bash", .. }),
            "{err}"
        );
        assert_eq!(err.kind(), crate::ErrorKind::Transient);
    }

    #[test]
    fn the_environment_is_passed_through_with_overrides() {
        let tools = Tools {
            env: vec![
                ("SBX_TEST_SET".into(), Some("yes".into())),
                ("HOME".into(), None),
            ],
            ..Tools::default()
        };
        let mut command = tools.command(Path::new("bash"));
        command.args(["-c", "echo \"$SBX_TEST_SET ${HOME-unset} ${PATH:+path}\""]);
        let out = run("bash", command, Duration::from_secs(30)).unwrap();
        assert_eq!(out.stdout, "yes unset path\n");
    }

    #[test]
    fn output_beyond_the_bound_keeps_the_end() {
        let big = vec![b'a'; 3 * MAX_OUTPUT_BYTES]
            .into_iter()
            .chain(*b"end")
            .collect::<Vec<u8>>();
        let kept = read_bounded(&big[..]);
        assert_eq!(kept.len(), MAX_OUTPUT_BYTES);
        assert!(kept.ends_with(b"end"));
    }
}
