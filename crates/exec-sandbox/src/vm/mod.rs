//! One microVM: start QEMU, connect the control channel, wait for the agent, tear down.
//!
//! A [`Vm`] owns its QEMU process (killed on drop and on our death) and its private directory
//! (removed on drop), so no path out of a run, error or panic, leaks either.

pub mod accel;
pub mod channel;
pub mod host;
pub mod process;
pub mod qemu;

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sbx_protocol::AgentHello;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Child;

pub use self::channel::{Channel, ChannelError};
use self::qemu::VmSpec;
use crate::error::ErrorKind;
use crate::limits;

/// A callback receiving raw bytes as they are produced.
pub type OutputCallback = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// Failure to start or talk to a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The VM's private directory or control socket could not be created.
    #[error("cannot prepare VM directory {path}")]
    Prepare {
        /// Path involved.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU could not be started.
    #[error("cannot start {qemu}")]
    Spawn {
        /// The QEMU binary.
        qemu: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU exited before the agent said hello.
    #[error("VM {name} exited during boot ({status}); last output:\n{log_tail}")]
    ExitedDuringBoot {
        /// VM name.
        name: String,
        /// QEMU's exit status.
        status: String,
        /// The end of the console and QEMU's stderr.
        log_tail: String,
    },
    /// The agent did not say hello before the deadline.
    #[error("VM {name} did not finish booting within {} s; last output:\n{log_tail}", .after.as_secs())]
    BootTimeout {
        /// VM name.
        name: String,
        /// The deadline.
        after: Duration,
        /// The end of the console and QEMU's stderr.
        log_tail: String,
    },
    /// The agent speaks another protocol version.
    #[error(
        "guest agent speaks protocol {found}, host speaks {}",
        sbx_protocol::PROTOCOL_VERSION
    )]
    ProtocolVersion {
        /// Version the agent announced.
        found: u8,
    },
    /// The control channel failed.
    #[error("control channel of VM {name} failed")]
    Channel {
        /// VM name.
        name: String,
        /// Cause.
        #[source]
        source: ChannelError,
    },
}

impl VmError {
    /// Stable kind, assuming the failure happened before code was dispatched.
    pub fn kind(&self) -> ErrorKind {
        match self {
            VmError::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                ErrorKind::Permanent
            }
            VmError::ProtocolVersion { .. } => ErrorKind::Permanent,
            _ => ErrorKind::Transient,
        }
    }

    /// What the user can do about it.
    pub fn hint(&self) -> Option<String> {
        match self {
            VmError::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound => Some(
                "install QEMU (`apt-get install qemu-system-x86`) or set EXEC_SANDBOX_QEMU".into(),
            ),
            VmError::ProtocolVersion { .. } => {
                Some("the cached guest assets are from another version: run `sbx prefetch`".into())
            }
            _ => None,
        }
    }
}

/// Host-side measurements of a finished VM.
#[derive(Debug, Clone, Copy, Default)]
pub struct VmStats {
    /// QEMU's user + system CPU time.
    pub cpu_time_ms: Option<u64>,
    /// QEMU's peak resident set.
    pub memory_peak_mb: Option<u64>,
}

/// The last bytes QEMU printed (console and stderr), kept for error messages.
#[derive(Clone, Default)]
struct LogTail(Arc<Mutex<VecDeque<u8>>>);

impl LogTail {
    fn push(&self, bytes: &[u8]) {
        if let Ok(mut tail) = self.0.lock() {
            tail.extend(bytes);
            let excess = tail.len().saturating_sub(limits::BOOT_LOG_TAIL_BYTES);
            tail.drain(..excess);
        }
    }

    fn text(&self) -> String {
        let bytes: Vec<u8> = self
            .0
            .lock()
            .map(|t| t.iter().copied().collect())
            .unwrap_or_default();
        String::from_utf8_lossy(&bytes).trim_end().to_string()
    }
}

/// A running microVM whose agent has said hello.
pub struct Vm {
    name: String,
    child: Child,
    channel: Channel,
    log: LogTail,
    hello: AgentHello,
    _dir: tempfile::TempDir,
}

impl Vm {
    /// Starts QEMU for `spec` and waits until the guest agent says hello or `deadline` passes.
    /// Console output goes to `on_console` as it arrives.
    pub async fn boot(
        qemu: &Path,
        spec: &VmSpec,
        deadline: Duration,
        on_console: Option<OutputCallback>,
    ) -> Result<Vm, VmError> {
        let name = spec.name.clone();
        let dir = tempfile::Builder::new()
            .prefix("sbx-vm-")
            .tempdir()
            .map_err(|source| VmError::Prepare {
                path: std::env::temp_dir(),
                source,
            })?;
        let socket_path = dir.path().join("control.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket_path).map_err(|source| {
            VmError::Prepare {
                path: socket_path.clone(),
                source,
            }
        })?;
        // Connect before QEMU starts: the connection waits in the listener's backlog and QEMU
        // accepts it, so there is no window in which the socket exists without a listener.
        let stream = std::os::unix::net::UnixStream::connect(&socket_path)
            .and_then(|s| {
                s.set_nonblocking(true)?;
                tokio::net::UnixStream::from_std(s)
            })
            .map_err(|source| VmError::Prepare {
                path: socket_path.clone(),
                source,
            })?;
        let mut child =
            process::spawn_qemu(qemu.to_path_buf(), spec.args(), OwnedFd::from(listener))
                .await
                .map_err(|source| VmError::Spawn {
                    qemu: qemu.to_path_buf(),
                    source,
                })?;
        let log = LogTail::default();
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(forward(stdout, log.clone(), on_console));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(forward(stderr, log.clone(), None));
        }
        let channel = Channel::new(stream);
        let started = Instant::now();
        let exited = |status: std::io::Result<std::process::ExitStatus>, log: &LogTail| {
            VmError::ExitedDuringBoot {
                name: name.clone(),
                status: status.map_or_else(|e| e.to_string(), |s| s.to_string()),
                log_tail: log.text(),
            }
        };
        let hello = tokio::select! {
            hello = channel.hello() => match hello {
                Ok(hello) => Ok(hello),
                // The channel closes when QEMU dies: report the death, with its last words.
                Err(source) => match tokio::time::timeout(Duration::from_secs(1), child.wait()).await {
                    Ok(status) => {
                        settle_logs().await;
                        Err(exited(status, &log))
                    }
                    Err(_) => Err(VmError::Channel { name: name.clone(), source }),
                },
            },
            status = child.wait() => {
                settle_logs().await;
                Err(exited(status, &log))
            }
            () = tokio::time::sleep(deadline) => Err(VmError::BootTimeout {
                name: name.clone(),
                after: deadline,
                log_tail: log.text(),
            }),
        }?;
        if hello.protocol_version != sbx_protocol::PROTOCOL_VERSION {
            return Err(VmError::ProtocolVersion {
                found: hello.protocol_version,
            });
        }
        tracing::debug!(vm = %name, elapsed_ms = started.elapsed().as_millis() as u64, agent = %hello.agent_version, "agent ready");
        Ok(Vm {
            name,
            child,
            channel,
            log,
            hello,
            _dir: dir,
        })
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the agent said when it started.
    pub fn hello(&self) -> &AgentHello {
        &self.hello
    }

    /// The control channel.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// The end of the console log and QEMU's stderr.
    pub fn log_tail(&self) -> String {
        self.log.text()
    }

    /// Kills QEMU and waits for it, returning what the host measured.
    pub async fn destroy(mut self) -> VmStats {
        let stats = self.child.id().map(read_stats).unwrap_or_default();
        let _ = self.child.start_kill();
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            tracing::warn!(vm = %self.name, "QEMU did not exit 5 s after SIGKILL");
        }
        stats
    }
}

/// Gives the log readers a moment to catch a dead QEMU's last output.
async fn settle_logs() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

async fn forward<R: AsyncRead + Unpin>(
    mut reader: R,
    log: LogTail,
    callback: Option<OutputCallback>,
) {
    let mut buf = vec![0u8; 8192];
    while let Ok(n) = reader.read(&mut buf).await {
        if n == 0 {
            break;
        }
        log.push(&buf[..n]);
        if let Some(cb) = &callback {
            cb(&buf[..n]);
        }
    }
}

/// Reads QEMU's CPU time and peak RSS from `/proc` (before it is killed).
fn read_stats(pid: u32) -> VmStats {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let cpu_time_ms = std::fs::read_to_string(proc_dir.join("stat"))
        .ok()
        .and_then(|stat| parse_cpu_ticks(&stat))
        .map(|ticks| ticks * 1000 / clock_ticks_per_second());
    let memory_peak_mb = std::fs::read_to_string(proc_dir.join("status"))
        .ok()
        .and_then(|status| parse_vm_hwm_kb(&status))
        .map(|kb| kb.div_ceil(1024));
    VmStats {
        cpu_time_ms,
        memory_peak_mb,
    }
}

fn clock_ticks_per_second() -> u64 {
    // Linux has reported USER_HZ = 100 to userspace on every architecture for decades.
    100
}

/// utime + stime (fields 14 and 15) of `/proc/<pid>/stat`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // after_comm starts at field 3 (state), so field N is at index N - 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn parse_vm_hwm_kb(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat_with_hostile_comm() {
        let stat = "42 (qemu) x) y) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 1";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn parses_vm_hwm() {
        assert_eq!(
            parse_vm_hwm_kb("Name:\tq\nVmHWM:\t  204800 kB\n"),
            Some(204_800)
        );
        assert_eq!(parse_vm_hwm_kb("Name:\tq\n"), None);
    }

    #[test]
    fn log_tail_is_bounded() {
        let tail = LogTail::default();
        for _ in 0..100 {
            tail.push(&[b'x'; 1000]);
        }
        tail.push(b"END");
        let text = tail.text();
        assert_eq!(text.len(), limits::BOOT_LOG_TAIL_BYTES);
        assert!(text.ends_with("END"));
    }

    /// A spec whose paths don't exist: for tests where QEMU never gets that far.
    fn unbootable_spec() -> VmSpec {
        VmSpec {
            name: "t".into(),
            kernel: "/nonexistent/vmlinux".into(),
            initramfs: "/nonexistent/initramfs".into(),
            rootfs: None,
            memory_mb: 128,
            vcpus: 1,
            accelerator: accel::Accelerator::Tcg,
            tsc_khz: None,
            verbose_console: false,
            tmpfs_mb: 16,
            qemu_sandbox: false,
        }
    }

    #[tokio::test]
    async fn missing_qemu_is_a_permanent_spawn_error() {
        let spec = unbootable_spec();
        let err = Vm::boot(
            Path::new("/nonexistent/qemu"),
            &spec,
            Duration::from_secs(1),
            None,
        )
        .await
        .err()
        .expect("boot must fail");
        assert!(matches!(err, VmError::Spawn { .. }), "{err}");
        assert_eq!(err.kind(), ErrorKind::Permanent);
        assert!(err.hint().is_some());
    }

    #[tokio::test]
    async fn qemu_that_exits_at_once_is_a_boot_error_with_its_output() {
        // `false` stands in for a QEMU that exits at once, as with a bad option.
        let spec_args_ignored = unbootable_spec();
        let err = Vm::boot(
            Path::new("/bin/false"),
            &spec_args_ignored,
            Duration::from_secs(10),
            None,
        )
        .await
        .err()
        .expect("boot must fail");
        assert!(matches!(err, VmError::ExitedDuringBoot { .. }), "{err}");
        assert_eq!(err.kind(), ErrorKind::Transient);
    }
}
