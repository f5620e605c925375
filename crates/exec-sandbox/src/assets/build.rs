//! Building the kernel and root filesystems with the embedded `images/` scripts.
//!
//! The store talks to a [`Builder`]; [`ScriptBuilder`] is the real one (root, minutes, network
//! to the Debian mirror), tests substitute a fake that writes small files.

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use super::AssetError;
use super::inputs::{AssetKind, Inputs};
use crate::sys;

/// Lines of build output kept for the error message.
const TAIL_LINES: usize = 20;
/// Script output lines with this prefix are progress steps, shown to the user.
const PROGRESS_PREFIX: &str = "==> ";
/// How long output is still collected after the script exits.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Builds one kernel or root filesystem.
pub(crate) trait Builder: Send + Sync + fmt::Debug {
    /// Builds `kind` (never the initramfs, which the store writes itself) into `out_dir`:
    /// `out_dir/<kind.file()>` plus its lock file. The build's output goes to `log`.
    fn build(&self, kind: AssetKind, out_dir: &Path, log: &Path) -> Result<(), AssetError>;
}

/// Runs `images/build-kernel.sh` and `images/build-rootfs.sh` (embedded at compile time).
#[derive(Debug)]
pub(crate) struct ScriptBuilder {
    inputs: Inputs,
    /// The scripts' own work cache (kernel tree, debootstrap tarballs).
    build_cache: PathBuf,
}

impl ScriptBuilder {
    pub(crate) fn new(inputs: Inputs, build_cache: PathBuf) -> Self {
        Self {
            inputs,
            build_cache,
        }
    }
}

impl Builder for ScriptBuilder {
    fn build(&self, kind: AssetKind, out_dir: &Path, log: &Path) -> Result<(), AssetError> {
        if let Err(input) = self.inputs.require(kind) {
            return Err(AssetError::MissingInput {
                asset: kind.name(),
                input,
            });
        }
        require_root(sys::effective_uid(), kind)?;
        // The scripts run as root on what they find there (kernel tree, debootstrap tarballs).
        crate::trust::ensure(&self.build_cache)?;
        // The scripts read their data files by path: write the embedded texts out.
        let texts = tempfile::Builder::new()
            .prefix("sbx-build-inputs-")
            .tempdir()
            .map_err(AssetError::io(
                "create a temporary directory in",
                std::env::temp_dir(),
            ))?;
        let write = |name: &str, text: &str| -> Result<PathBuf, AssetError> {
            let path = texts.path().join(name);
            std::fs::write(&path, text).map_err(AssetError::io("write", &path))?;
            Ok(path)
        };
        let mut command = Command::new("bash");
        match kind {
            AssetKind::Kernel => {
                command
                    .arg("-c")
                    .arg(self.inputs.kernel_script)
                    .arg("build-kernel")
                    .arg(out_dir)
                    .env(
                        "SBX_KERNEL_FRAGMENT",
                        write("config.fragment", self.inputs.kernel_fragment)?,
                    )
                    .env(
                        "SBX_KERNEL_PATCH",
                        write("boot-calibration.patch", self.inputs.kernel_patch)?,
                    );
            }
            AssetKind::Rootfs(language) => {
                command
                    .arg("-c")
                    .arg(self.inputs.rootfs_script)
                    .arg("build-rootfs")
                    .arg(language.as_str())
                    .arg(out_dir)
                    .env(
                        "SBX_VERSIONS_ENV",
                        write("versions.env", self.inputs.versions_env)?,
                    );
            }
            AssetKind::Initramfs => unreachable!("the store writes the initramfs itself"),
        }
        command.env("SBX_BUILD_CACHE", &self.build_cache);
        run_logged(command, &kind.name(), log)
    }
}

/// The scripts install packages, debootstrap and chroot: without root they cannot work, and
/// saying so up front beats a failure minutes in.
fn require_root(euid: u32, kind: AssetKind) -> Result<(), AssetError> {
    if euid == 0 {
        Ok(())
    } else {
        Err(AssetError::NeedsRoot { asset: kind.name() })
    }
}

/// Runs `command` to completion: both output streams go to `log`, `==> ` lines become progress
/// events, and a failure carries the last lines.
pub(crate) fn run_logged(mut command: Command, asset: &str, log: &Path) -> Result<(), AssetError> {
    // In a checked version directory; a link planted there is refused, not written through.
    let log_file = File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(log)
        .map_err(AssetError::io("create", log))?;
    let sink = Arc::new(Mutex::new(Sink {
        log: log_file,
        tail: VecDeque::with_capacity(TAIL_LINES),
    }));
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    sys::kill_child_with_parent(&mut command);
    let mut child = command.spawn().map_err(AssetError::io("run", "bash"))?;
    let (done_tx, done_rx) = mpsc::channel();
    let streams: [Box<dyn Read + Send>; 2] = [
        Box::new(child.stdout.take().expect("piped")),
        Box::new(child.stderr.take().expect("piped")),
    ];
    for stream in streams {
        let (sink, done, asset) = (Arc::clone(&sink), done_tx.clone(), asset.to_owned());
        std::thread::spawn(move || {
            pump(stream, &asset, &sink);
            let _ = done.send(());
        });
    }
    // This thread spawned the child and waits for it, so the parent-death signal cannot fire
    // while the build runs.
    let status = child
        .wait()
        .map_err(AssetError::io("wait for the build of", log))?;
    // A daemon the script started may hold the pipes open forever: drain briefly, then move on.
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            break;
        }
    }
    if status.success() {
        return Ok(());
    }
    let tail = sink.lock().unwrap_or_else(|p| p.into_inner()).tail.clone();
    Err(AssetError::Build {
        asset: asset.to_owned(),
        status,
        log: log.to_path_buf(),
        tail: Vec::from(tail).join("\n"),
    })
}

struct Sink {
    log: File,
    tail: VecDeque<String>,
}

fn pump(stream: impl Read, asset: &str, sink: &Mutex<Sink>) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\n', '\r']);
        if let Some(step) = text.strip_prefix(PROGRESS_PREFIX) {
            tracing::info!("{asset}: {step}");
        } else {
            tracing::debug!("{asset}: {text}");
        }
        let mut sink = sink.lock().unwrap_or_else(|p| p.into_inner());
        // A full disk must not kill the build; the tail still reaches the error.
        let _ = sink.log.write_all(&line);
        if sink.tail.len() == TAIL_LINES {
            sink.tail.pop_front();
        }
        sink.tail.push_back(text.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sbx_protocol::Language;

    fn script(text: &str) -> Command {
        let mut c = Command::new("bash");
        c.arg("-c").arg(text);
        c
    }

    #[test]
    fn output_is_logged_and_a_failure_keeps_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("build-kernel.log");
        let err = run_logged(
            script("echo '==> step one' >&2; for i in $(seq 1 30); do echo line $i; done; exit 3"),
            "kernel",
            &log,
        )
        .unwrap_err();
        let AssetError::Build {
            asset,
            status,
            tail,
            ..
        } = &err
        else {
            panic!("{err}")
        };
        assert_eq!(asset, "kernel");
        assert_eq!(status.code(), Some(3));
        let lines: Vec<&str> = tail.lines().collect();
        assert_eq!(lines.len(), TAIL_LINES);
        // stdout and stderr are read by two threads, so where the one stderr line lands among
        // them is a race; the stdout lines kept are the last ones, in order.
        let stdout: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.starts_with("line "))
            .collect();
        let expected: Vec<String> = (31 - stdout.len()..=30)
            .map(|i| format!("line {i}"))
            .collect();
        assert_eq!(stdout, expected);
        let logged = std::fs::read_to_string(&log).unwrap();
        assert!(
            logged.contains("==> step one\n") && logged.contains("line 1\n"),
            "{logged}"
        );
    }

    #[test]
    fn success_is_ok() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        run_logged(script("echo fine"), "rootfs-raw", &log).unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "fine\n");
    }

    #[test]
    fn building_without_root_is_refused_with_a_hint() {
        let err = require_root(1000, AssetKind::Rootfs(Language::Python)).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Permanent);
        assert!(err.to_string().contains("rootfs-python"), "{err}");
        let hint = err.hint().unwrap();
        assert!(
            hint.contains("sudo") && hint.contains("EXEC_SANDBOX_ASSET_BASE_URL"),
            "{hint}"
        );
        assert!(require_root(0, AssetKind::Kernel).is_ok());
    }

    #[test]
    fn a_missing_script_is_reported_before_anything_runs() {
        let mut inputs = Inputs::fake(b"agent", "exit 0");
        inputs.rootfs_script = "";
        let dir = tempfile::tempdir().unwrap();
        let err = ScriptBuilder::new(inputs, dir.path().into())
            .build(
                AssetKind::Rootfs(Language::Raw),
                dir.path(),
                &dir.path().join("log"),
            )
            .unwrap_err();
        assert!(
            matches!(
                err,
                AssetError::MissingInput {
                    input: "build-rootfs.sh",
                    ..
                }
            ),
            "{err}"
        );
    }

    /// The real kernel build: root, the Debian mirror and ~5 minutes.
    #[test]
    #[ignore = "builds the real kernel: needs root, the Debian mirror and minutes"]
    fn real_kernel_build() {
        let out = tempfile::tempdir().unwrap();
        let cache = std::env::temp_dir().join("sbx-real-build-cache");
        ScriptBuilder::new(Inputs::embedded(), cache)
            .build(AssetKind::Kernel, out.path(), &out.path().join("build.log"))
            .unwrap();
        assert!(out.path().join("vmlinux").is_file());
        assert!(out.path().join("kernel.lock").is_file());
    }
}
