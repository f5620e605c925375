//! One microVM's lifecycle: start QEMU, connect the control channel, wait for the agent, tear
//! down.
//!
//! A [`Vm`] owns its QEMU process (killed on drop and on our death), its private directory
//! (removed on drop) and, for a networked VM, its gateway (stopped on drop), so no path out of
//! a run, error or panic, leaks any of them. Memory snapshots (templates and their clones) are
//! in [`migration`]; what the host reads of a running QEMU from `/proc`, in [`procfs`].

pub mod accel;
pub(crate) mod channel;
#[cfg(test)]
pub(crate) mod fake;
pub(crate) mod handle;
pub(crate) mod host;
pub mod jail;
pub(crate) mod migration;
pub(crate) mod process;
pub(crate) mod procfs;
pub(crate) mod qemu;
pub(crate) mod qmp;

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sbx_protocol::layer::LayerStatus;
use sbx_protocol::{AgentHello, Event, Request};
use tokio::io::{AsyncRead, AsyncReadExt};

pub use self::channel::{AckError, ChannelError};
pub(crate) use self::channel::{Channel, Link};
pub(crate) use self::handle::VmHandle;
use self::jail::{IsolationReport, JailError};
pub(crate) use self::process::Qemu;
use self::process::QemuProcess;
use self::qemu::{Launch, QMP_SOCKET_FD, VmSpec};
use self::qmp::{Qmp, QmpError};
use crate::cgroup::{self, CgroupStatus, VmCgroup};
use crate::error_kind::ErrorKind;
use crate::gateway::{Gateway, GatewayError};
use crate::limits;
use crate::network::ExposedPort;

/// A callback receiving raw bytes as they are produced.
pub type OutputCallback = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// Failure to start or talk to a VM.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    /// QEMU could not be put in its jail.
    #[error("cannot start VM {name} in its jail")]
    Jail {
        /// VM name.
        name: String,
        /// Cause.
        #[source]
        source: JailError,
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
    /// The gateway behind a networked VM's NIC could not start.
    #[error("network gateway of VM {name} failed")]
    Gateway {
        /// VM name.
        name: String,
        /// Cause.
        #[source]
        source: GatewayError,
    },
    /// A networked VM was asked for, with a gateway whose NIC end was already handed out.
    #[error("VM {name}: its gateway's NIC socket was already used")]
    NicUnavailable {
        /// VM name.
        name: String,
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
    #[error("VM {name} could not trust the CA bundle")]
    Certificates {
        /// VM name.
        name: String,
        /// Cause.
        #[source]
        source: AckError,
    },
    /// A VM restored from a memory snapshot could not be told it is a clone.
    #[error("restored VM {name} could not be reseeded")]
    Reseed {
        /// VM name.
        name: String,
        /// Cause.
        #[source]
        source: AckError,
    },
    /// The kernel command line announced a package layer and the agent could not use it.
    #[error("VM {name}: the guest could not mount the package layer {}: {reason}", layer.display())]
    PackageLayer {
        /// VM name.
        name: String,
        /// The layer image.
        layer: PathBuf,
        /// The agent's explanation (guest text, sanitized).
        reason: String,
    },
    /// A template's interpreter could not be warmed before its snapshot.
    #[error("template VM {name} could not warm its interpreter")]
    Warm {
        /// VM name.
        name: String,
        /// Cause.
        #[source]
        source: AckError,
    },
    /// A VM for the warm pool could not run its first, trivial execution.
    #[error("VM {name} could not run the pool's first execution: {reason}")]
    Prime {
        /// VM name.
        name: String,
        /// What went wrong (guest output shortened).
        reason: String,
    },
    /// A VM taken from the warm pool did not answer the ping sent ahead of its code.
    #[error("VM {name} did not answer a ping within {} ms", .after.as_millis())]
    NotAnswering {
        /// VM name.
        name: String,
        /// How long it was given.
        after: Duration,
    },
    /// QEMU could not load a snapshot's device state.
    #[error("VM {name}: QEMU could not load the saved device state")]
    LoadState {
        /// VM name.
        name: String,
    },
    /// QEMU could not save a template's device state.
    #[error("VM {name}: QEMU could not save the device state ({qemu_error})")]
    SaveState {
        /// VM name.
        name: String,
        /// QEMU's own description.
        qemu_error: String,
    },
    /// A snapshot was asked of a VM not booted as a template.
    #[error("VM {name} was not booted as a template")]
    NotATemplate {
        /// VM name.
        name: String,
    },
}

impl VmError {
    /// Stable kind, assuming the failure happened before code was dispatched.
    pub fn kind(&self) -> ErrorKind {
        match self {
            VmError::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                ErrorKind::Permanent
            }
            // The same image fails the same way again.
            VmError::ProtocolVersion { .. } | VmError::PackageLayer { .. } => ErrorKind::Permanent,
            VmError::Jail { source, .. } if source.hint().is_some() => ErrorKind::Permanent,
            VmError::Gateway { source, .. } => source.kind(),
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
            VmError::Jail { source, .. } => source.hint(),
            VmError::PackageLayer { .. } => Some(
                "the layer image is damaged or not an EROFS image the guest can mount: rebuild it"
                    .into(),
            ),
            _ => None,
        }
    }
}

/// How long a VM took to start, in the two parts the host tells apart (zero for a fake VM).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct StartPhases {
    /// From executing QEMU until the guest ran: hello of a cold boot, resumed clone.
    pub vm_start: Duration,
    /// From then until the guest was ready for code (a clone's reseed).
    pub guest_ready: Duration,
}

/// Host-side measurements of a finished VM: from its cgroup where it has one (and the figure
/// is kept there), else from `/proc`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct VmStats {
    /// QEMU's user + system CPU time.
    pub cpu_time_ms: Option<u64>,
    /// The peak memory charged to QEMU's cgroup, else QEMU's peak resident set.
    pub memory_peak_mb: Option<u64>,
    /// Periods in which QEMU's CPU quota stopped it.
    pub cpu_nr_throttled: Option<u64>,
}

impl VmStats {
    /// The cgroup's figures, each missing one from `/proc`.
    fn merge(cgroup: cgroup::Usage, proc: VmStats) -> VmStats {
        VmStats {
            cpu_time_ms: cgroup.cpu_time_ms.or(proc.cpu_time_ms),
            memory_peak_mb: cgroup.memory_peak_mb.or(proc.memory_peak_mb),
            cpu_nr_throttled: cgroup.cpu_nr_throttled,
        }
    }
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
pub(crate) struct Vm {
    name: String,
    /// Killed on drop before `cgroup` is removed.
    child: QemuProcess,
    /// What the jail around QEMU could build.
    isolation: IsolationReport,
    /// QEMU's cgroup (removed on drop, once QEMU is gone), when it has one.
    cgroup: Option<VmCgroup>,
    /// Whether it has one, and why not.
    cgroup_status: CgroupStatus,
    channel: Channel,
    hello: AgentHello,
    /// QEMU's monitor, for templates and clones.
    qmp: Option<Qmp>,
    /// The gateway behind the NIC, for networked VMs; dropped (stopped) with the VM.
    gateway: Option<Gateway>,
    /// How long it took to start.
    phases: StartPhases,
    _dir: tempfile::TempDir,
}

/// A QEMU process just started, before its guest is known to be ready.
struct Started {
    child: QemuProcess,
    isolation: IsolationReport,
    cgroup: Option<VmCgroup>,
    cgroup_status: CgroupStatus,
    channel: Channel,
    log: LogTail,
    qmp: Option<tokio::net::UnixStream>,
    dir: tempfile::TempDir,
}

impl Started {
    /// The VM `name` of this QEMU, whose agent said `hello`, with its monitor `qmp` if it has
    /// one and no gateway (the QMP socket still here, if any, is dropped).
    fn into_vm(self, name: String, hello: AgentHello, qmp: Option<Qmp>, phases: StartPhases) -> Vm {
        Vm {
            name,
            child: self.child,
            isolation: self.isolation,
            cgroup: self.cgroup,
            cgroup_status: self.cgroup_status,
            channel: self.channel,
            hello,
            qmp,
            gateway: None,
            phases,
            _dir: self.dir,
        }
    }
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

/// Starts QEMU for `spec` and `launch` in its jail, with the control socket (and QMP socket)
/// pre-bound and connected, its files open, `extra_fds` inherited, and the VM's own cgroup
/// (made here, when one can be) joined before QEMU runs.
async fn start(
    qemu: &Qemu,
    spec: &VmSpec,
    launch: &Launch,
    extra_fds: Vec<(OwnedFd, i32)>,
    on_console: Option<OutputCallback>,
) -> Result<Started, VmError> {
    let program = qemu.resolve().map_err(|source| VmError::Spawn {
        qemu: qemu.binary.clone(),
        source,
    })?;
    let dir = tempfile::Builder::new()
        .prefix(&crate::cgroup::temp_dir_prefix(std::process::id()))
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
    for (path, number) in spec.files(launch) {
        let file = std::fs::File::open(path).map_err(|source| VmError::Prepare {
            path: path.to_path_buf(),
            source,
        })?;
        fds.push((file.into(), number));
    }
    let root = dir.path().join("root");
    std::fs::create_dir(&root).map_err(|source| VmError::Prepare {
        path: root.clone(),
        source,
    })?;
    let (cgroup, cgroup_status, join_cgroups) = vm_cgroup(spec);
    let request = process::Request {
        program,
        args: spec.args_for(launch),
        fds,
        join_cgroups,
        kvm: spec.accelerator == accel::Accelerator::Kvm,
        root,
    };
    let spawned = process::spawn_qemu(qemu, request)
        .await
        .map_err(|source| VmError::Jail {
            name: spec.name.clone(),
            source,
        })?;
    let log = LogTail::default();
    tokio::spawn(forward(spawned.stdout, log.clone(), on_console));
    tokio::spawn(forward(spawned.stderr, log.clone(), None));
    Ok(Started {
        child: spawned.process,
        isolation: spawned.isolation,
        cgroup,
        cgroup_status,
        channel: Channel::new(stream),
        log,
        qmp,
        dir,
    })
}

/// The cgroup of the VM of `spec` with its limits, its status, and the descriptors QEMU joins
/// it through; no cgroup (and the reason) when one cannot be made or opened.
fn vm_cgroup(spec: &VmSpec) -> (Option<VmCgroup>, CgroupStatus, Vec<OwnedFd>) {
    let limits = cgroup::Limits::for_vm(
        spec.memory_mb,
        spec.vcpus,
        spec.accelerator,
        spec.cpu_quota_percent,
        if spec.cpu_background {
            cgroup::CpuShare::Background
        } else {
            cgroup::CpuShare::Run
        },
    );
    let made = cgroup::for_vm(&spec.name, &limits).and_then(|cgroup| {
        let joins = cgroup.join_fds().map_err(|e| {
            CgroupStatus::inactive(format!("cannot open the VM's cgroup join files: {e}"))
        })?;
        Ok((cgroup, joins))
    });
    match made {
        Ok((cgroup, joins)) => {
            let status = cgroup.status();
            (Some(cgroup), status, joins)
        }
        Err(status) => (None, status, Vec::new()),
    }
}

/// Whether the agent mounted the layer `layer` of VM `name`, as its hello says.
fn layer_mounted(name: &str, layer: &Path, status: &LayerStatus) -> Result<(), VmError> {
    let reason = match status {
        LayerStatus::Mounted => return Ok(()),
        LayerStatus::Absent => "the agent saw no package layer announced".to_string(),
        LayerStatus::Failed(reason) => sanitize_guest_text(reason, 300),
    };
    Err(VmError::PackageLayer {
        name: name.to_string(),
        layer: layer.to_path_buf(),
        reason,
    })
}

/// Guest text fit for an error message: control characters replaced, at most `max` chars.
fn sanitize_guest_text(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .take(max)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().count() > max {
        out.push('…');
    }
    out
}

/// Raises the CPU weight of VM `name`'s cgroup to a run's (best effort, logged).
fn to_foreground(cgroup: Option<&VmCgroup>, name: &str) {
    if let Some(cgroup) = cgroup
        && let Err(e) = cgroup.set_cpu_share(cgroup::CpuShare::Run)
    {
        tracing::debug!(vm = %name, error = %e, "cannot raise the VM's CPU weight");
    }
}

/// A new VM name, `sbx-<pid>-<n>`: unique in the process (not per scheduler), so tests and
/// operators can find a VM's QEMU by name and tell which process started it.
pub(crate) fn unique_name() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "sbx-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// QEMU's exit status as text, for errors.
fn exit_text(status: std::io::Result<std::process::ExitStatus>) -> String {
    status.map_or_else(|e| e.to_string(), |s| s.to_string())
}

impl Vm {
    /// Starts QEMU for `spec` and waits until the guest agent says hello or `deadline` passes.
    /// Console output goes to `on_console` as it arrives. With a `gateway` the VM gets a NIC
    /// whose backend it is (`spec.nic` must be set); the VM then owns the gateway.
    pub(crate) async fn boot(
        qemu: &Qemu,
        spec: &VmSpec,
        deadline: Duration,
        on_console: Option<OutputCallback>,
        gateway: Option<Gateway>,
    ) -> Result<Vm, VmError> {
        let mut gateway = gateway;
        let mut fds = Vec::new();
        if let Some(gateway) = &mut gateway {
            // Moved, not copied: only QEMU holds its end, so the gateway sees QEMU go.
            let nic = gateway
                .take_qemu_end()
                .ok_or_else(|| VmError::NicUnavailable {
                    name: spec.name.clone(),
                })?;
            fds.push((nic, qemu::NIC_FD));
        }
        let (mut vm, _) =
            Self::boot_with(qemu, spec, &Launch::default(), fds, deadline, on_console).await?;
        vm.gateway = gateway;
        Ok(vm)
    }

    /// Hands the VM the gateway behind its NIC (a clone restored with a copy of the gateway's
    /// socket): it stops when the VM is destroyed. The gateway's own copy of QEMU's end is
    /// closed, so only QEMU holds it.
    pub(crate) fn attach_gateway(&mut self, mut gateway: Gateway) {
        drop(gateway.take_qemu_end());
        self.gateway = Some(gateway);
    }

    /// Boots and waits for the hello; also returns the QMP socket when `launch` asks for one.
    async fn boot_with(
        qemu: &Qemu,
        spec: &VmSpec,
        launch: &Launch,
        extra_fds: Vec<(OwnedFd, i32)>,
        deadline: Duration,
        on_console: Option<OutputCallback>,
    ) -> Result<(Vm, Option<tokio::net::UnixStream>), VmError> {
        let name = spec.name.clone();
        let started = Instant::now();
        let mut qemu_started = start(qemu, spec, launch, extra_fds, on_console).await?;
        let qmp = qemu_started.qmp.take();
        let Started {
            child,
            channel,
            log,
            ..
        } = &mut qemu_started;
        let exited = |status, log: &LogTail| VmError::ExitedDuringBoot {
            name: name.clone(),
            status: exit_text(status),
            log_tail: log.text(),
        };
        let hello = tokio::select! {
            hello = channel.hello() => match hello {
                Ok(hello) => Ok(hello),
                // The channel closes when QEMU dies: report the death, with its last words.
                Err(source) => match tokio::time::timeout(Duration::from_secs(1), child.wait()).await {
                    Ok(status) => {
                        settle_logs().await;
                        Err(exited(status, log))
                    }
                    Err(_) => Err(VmError::Channel { name: name.clone(), source }),
                },
            },
            status = child.wait() => {
                settle_logs().await;
                Err(exited(status, log))
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
        if let Some(layer) = &spec.packages {
            layer_mounted(&name, layer, &hello.packages)?;
        }
        let vm_start = started.elapsed();
        tracing::debug!(vm = %name, elapsed_ms = vm_start.as_millis() as u64, agent = %hello.agent_version, "agent ready");
        log_boot_timeline(&name, &hello);
        let vm = qemu_started.into_vm(
            name,
            hello,
            None,
            StartPhases {
                vm_start,
                guest_ready: Duration::ZERO,
            },
        );
        Ok((vm, qmp))
    }

    /// Makes the guest trust `pem` (CA certificates, in addition to the image's) for TLS.
    pub(crate) async fn trust_certificates(
        &self,
        pem: Vec<u8>,
        deadline: Duration,
    ) -> Result<(), VmError> {
        self.link()
            .acknowledged(&Request::TrustCertificates { pem }, deadline, |event| {
                matches!(event, Event::CertificatesTrusted { .. })
            })
            .await
            .map(drop)
            .map_err(|source| VmError::Certificates {
                name: self.name.clone(),
                source,
            })
    }

    /// Gives a VM started in the background (a pooled one) the weight of a run: a caller
    /// waits for it now. Best effort: without it the VM only runs slower under contention.
    pub(crate) fn to_foreground(&self) {
        to_foreground(self.cgroup.as_ref(), &self.name);
    }

    /// How long it took to start.
    pub(crate) fn start_phases(&self) -> StartPhases {
        self.phases
    }

    /// The VM's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// What the agent said when it started.
    pub(crate) fn hello(&self) -> &AgentHello {
        &self.hello
    }

    /// The control channel with the VM's name, for the layers that talk to the agent.
    pub(crate) fn link(&self) -> Link<'_> {
        Link {
            channel: &self.channel,
            name: &self.name,
        }
    }

    /// QEMU's process id, while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// What the gateway of a networked VM refused since the last call.
    pub(crate) fn take_network_refusals(&self) -> Vec<String> {
        self.gateway
            .as_ref()
            .map(Gateway::take_refusals)
            .unwrap_or_default()
    }

    /// Whether the VM's gateway lets it open connections.
    pub(crate) fn has_outbound_network(&self) -> bool {
        self.gateway.as_ref().is_some_and(Gateway::outbound)
    }

    /// The forwarded ports of a networked VM.
    pub(crate) fn exposed_ports(&self) -> &[ExposedPort] {
        self.gateway
            .as_ref()
            .map(Gateway::exposed_ports)
            .unwrap_or_default()
    }

    /// The host walls around this VM's QEMU.
    pub(crate) fn isolation(&self) -> crate::result::Isolation {
        crate::result::Isolation::of(&self.cgroup_status, &self.isolation)
    }

    /// What the host measured so far, QEMU still running: for a run that returns before its
    /// VM is destroyed (the few milliseconds of an idle guest's teardown are left out).
    pub(crate) fn stats(&self) -> VmStats {
        VmStats::merge(self.cgroup_usage(), self.proc_stats())
    }

    /// QEMU's `/proc` figures (the fallback of the cgroup's; gone once QEMU is reaped).
    fn proc_stats(&self) -> VmStats {
        self.child.id().map(procfs::stats).unwrap_or_default()
    }

    /// QEMU's cgroup figures, when it has a cgroup.
    fn cgroup_usage(&self) -> crate::cgroup::Usage {
        self.cgroup
            .as_ref()
            .map(VmCgroup::usage)
            .unwrap_or_default()
    }

    /// Kills QEMU and waits for it, returning what the host measured; its cgroup (read once
    /// QEMU is reaped, so it holds all of QEMU's time) is removed with the VM.
    pub(crate) async fn destroy(mut self) -> VmStats {
        // `/proc` is gone once QEMU is reaped.
        let proc = self.proc_stats();
        let _ = self.child.start_kill();
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            tracing::warn!(vm = %self.name, "QEMU did not exit 5 s after SIGKILL");
        }
        VmStats::merge(self.cgroup_usage(), proc)
    }
}

/// The guest's boot on its own clock, for `--debug`: kernel start-up until `/init`, the
/// agent's steps, and when it served the control port.
fn log_boot_timeline(name: &str, hello: &AgentHello) {
    let boot = &hello.boot;
    if boot.init_ms == 0 {
        return;
    }
    tracing::debug!(
        vm = %name,
        kernel_ms = boot.init_ms,
        root_mounted_ms = boot.root_ms,
        configured_ms = boot.configured_ms,
        agent_serving_ms = hello.uptime_ms,
        "guest boot timeline (guest clock, since the kernel started)"
    );
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

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

    #[test]
    fn a_layer_the_agent_could_not_mount_is_a_clear_permanent_error() {
        let layer = Path::new("/c/layers/ab.erofs");
        assert!(layer_mounted("vm-1", layer, &LayerStatus::Mounted).is_ok());
        let err = layer_mounted(
            "vm-1",
            layer,
            &LayerStatus::Failed("cannot mount /dev/vdb:\x1b[31m invalid argument".into()),
        )
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Permanent);
        assert_eq!(
            err.to_string(),
            "VM vm-1: the guest could not mount the package layer /c/layers/ab.erofs: \
             cannot mount /dev/vdb: [31m invalid argument"
        );
        let err = layer_mounted("vm-1", layer, &LayerStatus::Absent).unwrap_err();
        assert!(err.to_string().contains("no package layer"), "{err}");
        let long = LayerStatus::Failed("x".repeat(1000));
        let text = layer_mounted("vm-1", layer, &long).unwrap_err().to_string();
        assert!(text.ends_with(&format!("{}…", "x".repeat(300))), "{text}");
    }

    /// A spec whose paths don't exist: for tests where QEMU never gets that far.
    pub(crate) fn unbootable_spec() -> VmSpec {
        // Unique like real VM names: tests run at once, and a VM's cgroup is named after it.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        VmSpec {
            name: format!("t-{n}"),
            kernel: "/nonexistent/vmlinux".into(),
            initramfs: "/nonexistent/initramfs".into(),
            rootfs: None,
            packages: None,
            memory_mb: 128,
            vcpus: 1,
            accelerator: accel::Accelerator::Tcg,
            tsc_khz: None,
            verbose_console: false,
            tmpfs_mb: 16,
            qemu_sandbox: false,
            nic: false,
            cpu_quota_percent: crate::limits::DEFAULT_VM_CPU_QUOTA_PERCENT,
            cpu_background: false,
        }
    }

    #[tokio::test]
    async fn missing_qemu_is_a_permanent_spawn_error() {
        let spec = unbootable_spec();
        let err = Vm::boot(
            &Qemu::new("/nonexistent/qemu".into(), None),
            &spec,
            Duration::from_secs(1),
            None,
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
        let mut spec_args_ignored = unbootable_spec();
        spec_args_ignored.kernel = "/dev/null".into();
        spec_args_ignored.initramfs = "/dev/null".into();
        let err = Vm::boot(
            &Qemu::new("/bin/false".into(), None),
            &spec_args_ignored,
            Duration::from_secs(10),
            None,
            None,
        )
        .await
        .err()
        .expect("boot must fail");
        assert!(matches!(err, VmError::ExitedDuringBoot { .. }), "{err}");
        assert_eq!(err.kind(), ErrorKind::Transient);
    }

    #[tokio::test]
    async fn a_gateway_whose_nic_was_used_is_refused_before_qemu_starts() {
        let mut gateway = Gateway::start(crate::gateway::GatewayConfig::closed()).unwrap();
        drop(gateway.take_qemu_end());
        let mut spec = unbootable_spec();
        spec.nic = true;
        let err = Vm::boot(
            &Qemu::new("/nonexistent/qemu".into(), None),
            &spec,
            Duration::from_secs(1),
            None,
            Some(gateway),
        )
        .await
        .err()
        .expect("boot must fail");
        assert!(matches!(err, VmError::NicUnavailable { .. }), "{err}");
    }
}
