//! One microVM: start QEMU, connect the control channel, wait for the agent, tear down.
//!
//! A [`Vm`] owns its QEMU process (killed on drop and on our death) and its private directory
//! (removed on drop), so no path out of a run, error or panic, leaks either.

pub mod accel;
pub mod channel;
pub mod host;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod snapshot;

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sbx_protocol::{AgentHello, Event, Request};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Child;

pub use self::channel::{Channel, ChannelError};
use self::qemu::{INCOMING_FD, Launch, QMP_SOCKET_FD, RAM_FD, RamFile, VmSpec};
use self::qmp::{Qmp, QmpError};
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
    /// Talking to QEMU's monitor failed (saving or restoring a memory snapshot).
    #[error("QEMU monitor of VM {name} failed")]
    Qmp {
        /// VM name.
        name: String,
        /// Cause.
        #[source]
        source: QmpError,
    },
    /// The guest could not add the operator's CA certificates.
    #[error("VM {name}: {reason}")]
    Certificates {
        /// VM name.
        name: String,
        /// What went wrong.
        reason: String,
    },
    /// Saving or restoring a memory snapshot failed.
    #[error("memory snapshot of VM {name}: {reason}")]
    Snapshot {
        /// VM name.
        name: String,
        /// What went wrong.
        reason: String,
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
    /// QEMU's monitor, for templates and clones.
    qmp: Option<Qmp>,
    /// The gateway behind the NIC, for networked VMs; dropped (stopped) with the VM.
    gateway: Option<crate::gateway::Gateway>,
    _dir: tempfile::TempDir,
}

/// Deadline of each monitor exchange of a template save.
const QMP_DEADLINE: Duration = Duration::from_secs(10);

/// A QEMU process just started, before its guest is known to be ready.
struct Started {
    child: Child,
    channel: Channel,
    log: LogTail,
    qmp: Option<tokio::net::UnixStream>,
    dir: tempfile::TempDir,
}

/// Binds a listening socket at `path` and connects to it. The connection waits in the
/// listener's backlog until QEMU accepts it, so there is no window in which the socket exists
/// without a listener and no polling for the path.
fn listen_and_connect(path: &Path) -> Result<(OwnedFd, tokio::net::UnixStream), VmError> {
    let prepare = |source| VmError::Prepare {
        path: path.to_path_buf(),
        source,
    };
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(prepare)?;
    let stream = std::os::unix::net::UnixStream::connect(path)
        .and_then(|s| {
            s.set_nonblocking(true)?;
            tokio::net::UnixStream::from_std(s)
        })
        .map_err(prepare)?;
    Ok((OwnedFd::from(listener), stream))
}

/// Starts QEMU for `spec` and `launch`, with the control socket (and QMP socket) pre-bound and
/// connected, and `extra_fds` inherited.
async fn start(
    qemu: &Path,
    spec: &VmSpec,
    launch: &Launch,
    extra_fds: Vec<(OwnedFd, i32)>,
    on_console: Option<OutputCallback>,
) -> Result<Started, VmError> {
    let dir = tempfile::Builder::new()
        .prefix("sbx-vm-")
        .tempdir()
        .map_err(|source| VmError::Prepare {
            path: std::env::temp_dir(),
            source,
        })?;
    let (control_listener, stream) = listen_and_connect(&dir.path().join("control.sock"))?;
    let mut fds = vec![(control_listener, qemu::CONTROL_SOCKET_FD)];
    let mut qmp = None;
    if launch.qmp {
        let (listener, stream) = listen_and_connect(&dir.path().join("qmp.sock"))?;
        fds.push((listener, QMP_SOCKET_FD));
        qmp = Some(stream);
    }
    fds.extend(extra_fds);
    let mut child = process::spawn_qemu_with_fds(qemu.to_path_buf(), spec.args_for(launch), fds)
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
    Ok(Started {
        child,
        channel: Channel::new(stream),
        log,
        qmp,
        dir,
    })
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
        let (vm, _) = Self::boot_with(
            qemu,
            spec,
            &Launch::default(),
            Vec::new(),
            deadline,
            on_console,
        )
        .await?;
        Ok(vm)
    }

    /// Like [`Vm::boot`], with a NIC whose backend is `gateway` (which the VM then owns: it
    /// stops when the VM is destroyed). `spec.nic` must be set.
    pub async fn boot_networked(
        qemu: &Path,
        spec: &VmSpec,
        deadline: Duration,
        on_console: Option<OutputCallback>,
        mut gateway: crate::gateway::Gateway,
    ) -> Result<Vm, VmError> {
        let nic = gateway.take_qemu_end().ok_or_else(|| VmError::Prepare {
            path: PathBuf::from("nic"),
            source: std::io::Error::other("the gateway's NIC socket was already used"),
        })?;
        let (mut vm, _) = Self::boot_with(
            qemu,
            spec,
            &Launch::default(),
            vec![(nic, qemu::NIC_FD)],
            deadline,
            on_console,
        )
        .await?;
        vm.gateway = Some(gateway);
        Ok(vm)
    }

    /// Hands the VM the gateway behind its NIC (a clone restored with the gateway's socket):
    /// it stops when the VM is destroyed.
    pub fn attach_gateway(&mut self, gateway: crate::gateway::Gateway) {
        self.gateway = Some(gateway);
    }

    /// What the gateway of a networked VM refused since the last call.
    pub fn take_network_refusals(&self) -> Vec<String> {
        self.gateway
            .as_ref()
            .map(|g| g.take_refusals())
            .unwrap_or_default()
    }

    /// Whether the VM's gateway lets it open connections.
    pub fn has_outbound_network(&self) -> bool {
        self.gateway.as_ref().is_some_and(|g| g.outbound())
    }

    /// The forwarded ports of a networked VM.
    pub fn exposed_ports(&self) -> &[crate::network::ExposedPort] {
        self.gateway
            .as_ref()
            .map(|g| g.exposed_ports())
            .unwrap_or_default()
    }

    /// Boots a template: guest RAM in `ram` (shared, so it holds the guest's memory when saved)
    /// and a QMP monitor, for [`Vm::save_template`]. A template with a NIC (`spec.nic`) gets a
    /// gateway that allows nothing: the guest configures its NIC at boot, and its clones are
    /// given their own gateways when restored.
    pub async fn boot_template(
        qemu: &Path,
        spec: &VmSpec,
        ram: &Path,
        deadline: Duration,
    ) -> Result<Vm, VmError> {
        let launch = Launch {
            ram_file: Some(RamFile {
                path: ram.to_path_buf(),
                shared: true,
            }),
            qmp: true,
            incoming: false,
        };
        let mut fds = Vec::new();
        let mut gateway = None;
        if spec.nic {
            let mut closed =
                crate::gateway::Gateway::start(crate::gateway::GatewayConfig::closed()).map_err(
                    |e| VmError::Prepare {
                        path: PathBuf::from("nic"),
                        source: std::io::Error::other(e.to_string()),
                    },
                )?;
            if let Some(fd) = closed.take_qemu_end() {
                fds.push((fd, qemu::NIC_FD));
            }
            gateway = Some(closed);
        }
        let (mut vm, qmp) = Self::boot_with(qemu, spec, &launch, fds, deadline, None).await?;
        vm.gateway = gateway;
        let name = vm.name.clone();
        if let Some(stream) = qmp {
            let qmp = Qmp::handshake(stream, tokio::time::Instant::now() + QMP_DEADLINE)
                .await
                .map_err(|source| VmError::Qmp { name, source })?;
            vm.qmp = Some(qmp);
        }
        Ok(vm)
    }

    /// Boots and waits for the hello; also returns the QMP socket when `launch` asks for one.
    async fn boot_with(
        qemu: &Path,
        spec: &VmSpec,
        launch: &Launch,
        extra_fds: Vec<(OwnedFd, i32)>,
        deadline: Duration,
        on_console: Option<OutputCallback>,
    ) -> Result<(Vm, Option<tokio::net::UnixStream>), VmError> {
        let name = spec.name.clone();
        let Started {
            mut child,
            channel,
            log,
            qmp,
            dir,
        } = start(qemu, spec, launch, extra_fds, on_console).await?;
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
        let vm = Vm {
            name,
            child,
            channel,
            log,
            hello,
            qmp: None,
            gateway: None,
            _dir: dir,
        };
        Ok((vm, qmp))
    }

    /// Starts a clone of a template: its RAM file mapped copy-on-write (`share=off`, the file
    /// is never modified), its device state read from `vmstate`, then the guest resumed and
    /// told it is a clone (fresh entropy, clock, interpreter generators) before it is handed
    /// out. `ram` is the template's RAM file and `vmstate` its device state, both open (the
    /// caller checked them). `hello` is what the template's agent said.
    #[allow(clippy::too_many_arguments)]
    pub async fn restore(
        qemu: &Path,
        spec: &VmSpec,
        ram: std::fs::File,
        vmstate: std::fs::File,
        hello: AgentHello,
        nic: Option<OwnedFd>,
        deadline: Duration,
    ) -> Result<Vm, VmError> {
        let name = spec.name.clone();
        let launch = Launch {
            ram_file: Some(RamFile {
                // The open file, not a path: nothing can swap it between check and use.
                path: format!("/proc/self/fd/{RAM_FD}").into(),
                shared: false,
            }),
            qmp: true,
            incoming: true,
        };
        let started_at = Instant::now();
        let Started {
            mut child,
            channel,
            log,
            qmp,
            dir,
        } = start(
            qemu,
            spec,
            &launch,
            [
                (OwnedFd::from(vmstate), INCOMING_FD),
                (OwnedFd::from(ram), RAM_FD),
            ]
            .into_iter()
            .chain(nic.map(|fd| (fd, qemu::NIC_FD)))
            .collect(),
            None,
        )
        .await?;
        let Some(qmp) = qmp else {
            unreachable!("a clone is always started with a QMP socket");
        };
        let until = tokio::time::Instant::now() + deadline;
        tracing::debug!(vm = %name, elapsed_ms = started_at.elapsed().as_millis() as u64, "QEMU started");
        let resume = async {
            let qmp_error = |source| VmError::Qmp {
                name: name.clone(),
                source,
            };
            let mut qmp = Qmp::handshake(qmp, until).await.map_err(qmp_error)?;
            // The template's RAM is the file itself: only device state is in the stream.
            let capabilities = json!({"capabilities": [
                {"capability": "x-ignore-shared", "state": true},
                {"capability": "events", "state": true},
            ]});
            qmp.execute("migrate-set-capabilities", Some(capabilities), until)
                .await
                .map_err(qmp_error)?;
            qmp.execute(
                "migrate-incoming",
                Some(json!({"uri": format!("fd:{INCOMING_FD}")})),
                until,
            )
            .await
            .map_err(qmp_error)?;
            let done = qmp
                .wait_event(
                    "MIGRATION",
                    |data| matches!(data["status"].as_str(), Some("completed" | "failed")),
                    until,
                )
                .await
                .map_err(qmp_error)?;
            if done["status"] != "completed" {
                return Err(VmError::Snapshot {
                    name: name.clone(),
                    reason: "QEMU could not load the saved device state".into(),
                });
            }
            tracing::debug!(vm = %name, elapsed_ms = started_at.elapsed().as_millis() as u64, "device state loaded");
            // The template was saved paused, so the clone stays paused until told.
            qmp.execute("cont", None, until).await.map_err(qmp_error)?;
            Ok(qmp)
        };
        let qmp = tokio::select! {
            qmp = resume => qmp,
            status = child.wait() => {
                settle_logs().await;
                Err(VmError::ExitedDuringBoot {
                    name: name.clone(),
                    status: status.map_or_else(|e| e.to_string(), |s| s.to_string()),
                    log_tail: log.text(),
                })
            }
        }?;
        let vm = Vm {
            name,
            child,
            channel,
            log,
            hello,
            qmp: Some(qmp),
            gateway: None,
            _dir: dir,
        };
        let remaining = deadline.saturating_sub(started_at.elapsed());
        vm.reseed(remaining).await?;
        tracing::debug!(vm = %vm.name, elapsed_ms = started_at.elapsed().as_millis() as u64, "restored from a memory snapshot");
        Ok(vm)
    }

    /// Tells a restored guest it is a clone: host entropy for its CRNG, the current time, and
    /// fresh seeds for running interpreters. Also the first request after `cont`, so it pays
    /// the empty translation cache rather than the user's code.
    async fn reseed(&self, deadline: Duration) -> Result<(), VmError> {
        let mut entropy = vec![0u8; 64];
        std::io::Read::read_exact(
            &mut std::fs::File::open("/dev/urandom").map_err(|source| VmError::Prepare {
                path: "/dev/urandom".into(),
                source,
            })?,
            &mut entropy,
        )
        .map_err(|source| VmError::Prepare {
            path: "/dev/urandom".into(),
            source,
        })?;
        let unix_time_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let name = self.name.clone();
        self.acknowledged(
            &Request::Reseed {
                entropy,
                unix_time_ns,
            },
            "reseed",
            deadline,
            |event| matches!(event, Event::Reseeded { .. }),
            |reason| VmError::Snapshot {
                name: name.clone(),
                reason,
            },
        )
        .await
    }

    /// Makes the guest trust `pem` (CA certificates, in addition to the image's) for TLS.
    pub async fn trust_certificates(
        &self,
        pem: Vec<u8>,
        deadline: Duration,
    ) -> Result<(), VmError> {
        let name = self.name.clone();
        self.acknowledged(
            &Request::TrustCertificates { pem },
            "trust the CA bundle",
            deadline,
            |event| matches!(event, Event::CertificatesTrusted { .. }),
            |reason| VmError::Certificates {
                name: name.clone(),
                reason,
            },
        )
        .await
    }

    /// Sends `request` and waits up to `deadline` for the answer `expected` accepts; a guest
    /// error, another answer or no answer becomes `fail(reason)`.
    async fn acknowledged(
        &self,
        request: &Request,
        what: &str,
        deadline: Duration,
        expected: impl Fn(&Event) -> bool,
        fail: impl Fn(String) -> VmError,
    ) -> Result<(), VmError> {
        let channel_error = |source| VmError::Channel {
            name: self.name.clone(),
            source,
        };
        let mut answers = self.channel.request(request).await.map_err(channel_error)?;
        match tokio::time::timeout(deadline, answers.recv()).await {
            Ok(Some(event)) if expected(&event) => Ok(()),
            Ok(Some(Event::Error(e))) => {
                Err(fail(format!("the guest could not {what}: {}", e.message)))
            }
            Ok(Some(other)) => Err(fail(format!("unexpected answer to {what}: {other:?}"))),
            Ok(None) => Err(channel_error(ChannelError::Closed)),
            Err(_) => Err(fail(format!(
                "no answer to {what} within {} ms",
                deadline.as_millis()
            ))),
        }
    }

    /// Saves a template booted with [`Vm::boot_template`]: pauses the guest for good, writes
    /// its device state to `vmstate` (the RAM is already in the template's RAM file) and ends
    /// QEMU. The VM is consumed: a saved template is never resumed.
    pub async fn save_template(mut self, vmstate: &std::fs::File) -> Result<(), VmError> {
        use std::os::fd::AsFd;
        let name = self.name.clone();
        let qmp_error = |source| VmError::Qmp {
            name: name.clone(),
            source,
        };
        let Some(mut qmp) = self.qmp.take() else {
            return Err(VmError::Snapshot {
                name,
                reason: "not booted as a template".into(),
            });
        };
        let until = tokio::time::Instant::now() + QMP_DEADLINE;
        let capabilities =
            json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]});
        qmp.execute("migrate-set-capabilities", Some(capabilities), until)
            .await
            .map_err(qmp_error)?;
        qmp.execute("stop", None, until).await.map_err(qmp_error)?;
        // QEMU's own sandbox forbids `exec:` URIs (spawn=deny) and 7.2 has no `file:`: the
        // open file travels over the monitor socket and `fd:` names it.
        qmp.execute_with_fd(
            "getfd",
            Some(json!({"fdname": "vmstate"})),
            vmstate.as_fd(),
            until,
        )
        .await
        .map_err(qmp_error)?;
        qmp.execute("migrate", Some(json!({"uri": "fd:vmstate"})), until)
            .await
            .map_err(qmp_error)?;
        loop {
            let info = qmp
                .execute("query-migrate", None, until)
                .await
                .map_err(qmp_error)?;
            match info["status"].as_str() {
                Some("completed") => break,
                Some("failed" | "cancelled") => {
                    return Err(VmError::Snapshot {
                        name,
                        reason: format!(
                            "QEMU could not save the device state: {}",
                            info["error-desc"].as_str().unwrap_or("no reason given")
                        ),
                    });
                }
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        // `quit` may close the socket before answering.
        let _ = qmp.execute("quit", None, until).await;
        if tokio::time::timeout(QMP_DEADLINE, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
        }
        Ok(())
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

/// An error and its sources on one line, for logs.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
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
            nic: false,
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
