//! Sessions: one VM kept alive across several executions, its interpreter state carried over.
//!
//! A [`Session`] owns a VM (and its concurrency slot and admission permit) from
//! [`Scheduler::session`] until it closes: explicitly, on drop, after its idle timeout, or by
//! rule when the VM can no longer be trusted to hold state (the program was SIGKILLed, the VM
//! stopped answering). Every operation goes through one gate (`Inner::operation`), which
//! suspends the idle timer while it runs. The rules live in `Inner`, generic over the VM, and
//! unit-test against a fake VM under paused time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, Weak};
use std::time::{Duration, Instant};

use sbx_protocol::Language;
use tokio::sync::{Mutex, OwnedSemaphorePermit, RwLock};

use crate::admission::Permit;
use crate::error::Error;
use crate::execute::{Execution, VmOrigin, execute};
use crate::limits;
use crate::network::{ExposedPort, NetworkOptions};
use crate::packages::PackageSource;
use crate::result::{ExecutionResult, Isolation, Timing};
use crate::scheduler::{Layer, ReadyPackages, Scheduler, StartedVm, VmRequest};
use crate::validate;
use crate::vm::accel::AcceleratorChoice;
use crate::vm::{Link, OutputCallback, Vm, VmHandle, VmStats};

/// Exit code of a program killed by SIGKILL (128 + 9): usually the guest's OOM killer, after
/// which the VM's state is not worth keeping.
const EXIT_SIGKILL: i32 = 137;

/// What [`Scheduler::session`] opens.
///
/// ```
/// use exec_sandbox::{Language, SessionOptions};
///
/// let options = SessionOptions::new(Language::Python)
///     .idle_timeout_seconds(60)
///     .env("GREETING", "hi");
/// assert_eq!(options.idle_timeout_seconds, 60);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SessionOptions {
    /// Interpreter of every execution in the session.
    pub language: Language,
    /// Guest memory in MB (at least 128); the scheduler's default when `None`.
    pub memory_mb: Option<u32>,
    /// Environment variables of every execution (an execution's own variables override them).
    pub env_vars: Vec<(String, String)>,
    /// Seconds without any operation after which the session closes itself (10-3600).
    pub idle_timeout_seconds: u64,
    /// Replaces `idle_timeout_seconds` without its lower bound (tests, feature `testing`).
    pub(crate) idle_timeout_unchecked: Option<Duration>,
    /// Network access and forwarded ports for the session's VM (default: no NIC at all).
    pub network: NetworkOptions,
    /// Packages for every execution (`name==version`, `name@version`, or a range), at most 50.
    pub packages: Vec<String>,
    /// A package layer image attached as is (tests only, feature `testing`).
    pub(crate) packages_layer: Option<std::path::PathBuf>,
}

impl SessionOptions {
    /// A session in `language` with every other setting at its default.
    pub fn new(language: Language) -> Self {
        Self {
            language,
            memory_mb: None,
            env_vars: Vec::new(),
            idle_timeout_seconds: limits::DEFAULT_SESSION_IDLE_TIMEOUT_SECONDS,
            idle_timeout_unchecked: None,
            network: NetworkOptions::default(),
            packages: Vec::new(),
            packages_layer: None,
        }
    }

    builders!(memory, env, network, packages);

    /// Sets the idle timeout.
    pub fn idle_timeout_seconds(mut self, seconds: u64) -> Self {
        self.idle_timeout_seconds = seconds;
        self
    }

    /// Sets an idle timeout below the accepted minimum, for tests.
    #[cfg(feature = "testing")]
    pub fn idle_timeout_unchecked(mut self, idle: Duration) -> Self {
        self.idle_timeout_unchecked = Some(idle);
        self
    }

    /// Attaches the EROFS package layer at `path` to the session's VM as is. Testing only
    /// (feature `testing`), like `RunOptions::packages_layer`.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub fn packages_layer(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.packages_layer = Some(path.into());
        self
    }
}

/// One execution in a [`Session`].
///
/// ```
/// use exec_sandbox::ExecOptions;
///
/// let options = ExecOptions::new("print(x)").timeout_seconds(5).env("N", "1");
/// assert_eq!(options.timeout_seconds, Some(5));
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct ExecOptions {
    /// Program text (UTF-8, at most 1 MiB, no NUL bytes).
    pub code: String,
    /// Execution timeout in seconds (1-300); the scheduler's default when `None`.
    pub timeout_seconds: Option<u64>,
    /// Environment variables for this execution, on top of the session's.
    pub env_vars: Vec<(String, String)>,
    /// Receives stdout chunks as the program produces them.
    pub on_stdout: Option<OutputCallback>,
    /// Receives stderr chunks as the program produces them.
    pub on_stderr: Option<OutputCallback>,
}

impl std::fmt::Debug for ExecOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecOptions")
            .field("code_bytes", &self.code.len())
            .field("timeout_seconds", &self.timeout_seconds)
            .field("env_vars", &self.env_vars.len())
            .finish_non_exhaustive()
    }
}

impl ExecOptions {
    /// An execution of `code` with every other setting at its default.
    pub fn new(code: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            timeout_seconds: None,
            env_vars: Vec::new(),
            on_stdout: None,
            on_stderr: None,
        }
    }

    builders!(timeout, env, output);
}

/// Why a session closed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionCloseReason {
    /// [`Session::close`] was called or the session was dropped.
    Closed,
    /// No operation for the idle timeout.
    IdleTimeout {
        /// The idle timeout.
        after: Duration,
    },
    /// A program was killed by SIGKILL (exit code 137, usually the guest's out-of-memory killer).
    Killed,
    /// The VM stopped answering or its control channel closed.
    VmLost,
}

impl std::fmt::Display for SessionCloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Closed => f.write_str("closed by the caller"),
            Self::IdleTimeout { after } => {
                write!(f, "idle for {} s", after.as_secs_f64())
            }
            Self::Killed => {
                f.write_str("a program was killed (exit code 137, likely out of memory)")
            }
            Self::VmLost => f.write_str("the sandbox VM stopped answering"),
        }
    }
}

/// One VM kept alive across executions; interpreter state (Python's `__main__`, JavaScript
/// top-level declarations, shell variables, functions and working directory) carries over.
///
/// Made by [`Scheduler::session`]. Concurrent [`exec`](Self::exec) calls run one after the
/// other. Dropping the session destroys its VM.
pub struct Session {
    inner: Arc<Inner<Vm>>,
    idle_watch: tokio::task::JoinHandle<()>,
}

/// The session's state and rules, generic over the VM so the close rules unit-test with a
/// fake VM.
struct Inner<V: VmHandle> {
    language: Language,
    env_vars: Vec<(String, String)>,
    default_timeout_seconds: u64,
    origin: VmOrigin,
    accelerator: AcceleratorChoice,
    packages: (PackageSource, Option<u64>),
    vm_name: String,
    exposed_ports: Vec<ExposedPort>,
    isolation: Isolation,
    /// `None` once closed. Operations hold a read guard, so they may overlap (a file transfer
    /// during an exec); closing takes the write guard, after the operations in progress.
    live: RwLock<Option<Live<V>>>,
    /// Serializes executions: one interpreter, outputs never interleaved.
    exec_turn: Mutex<()>,
    activity: std::sync::Mutex<Activity>,
    exec_count: AtomicU64,
}

/// The VM and what it holds of the scheduler's capacity; released together.
struct Live<V> {
    vm: V,
    permit: Permit,
    slot: OwnedSemaphorePermit,
    /// The package layer, kept open while the VM may read it.
    packages: ReadyPackages,
}

impl<V: VmHandle> Live<V> {
    async fn destroy(self) -> VmStats {
        let Live {
            vm,
            permit,
            slot,
            packages,
        } = self;
        let stats = vm.destroy().await;
        drop(permit);
        drop(slot);
        drop(packages);
        stats
    }
}

/// What a session keeps of the options it was opened with.
struct Settings {
    language: Language,
    env_vars: Vec<(String, String)>,
    default_timeout_seconds: u64,
    origin: VmOrigin,
    accelerator: AcceleratorChoice,
    /// Where the session's packages came from, and how long their install took.
    packages: (PackageSource, Option<u64>),
}

/// What the idle timer watches.
struct Activity {
    closed: Option<SessionCloseReason>,
    last: tokio::time::Instant,
    in_flight: usize,
}

/// An operation in progress: the idle timer is suspended until it is dropped.
struct InFlight<'a, V: VmHandle>(&'a Inner<V>);

impl<V: VmHandle> Drop for InFlight<'_, V> {
    fn drop(&mut self) {
        let mut activity = self.0.activity();
        activity.in_flight -= 1;
        activity.last = tokio::time::Instant::now();
    }
}

impl<V: VmHandle> Inner<V> {
    /// A session around `live`, open and idle since now.
    fn new(live: Live<V>, settings: Settings) -> Self {
        let Settings {
            language,
            env_vars,
            default_timeout_seconds,
            origin,
            accelerator,
            packages,
        } = settings;
        Inner {
            language,
            env_vars,
            default_timeout_seconds,
            origin,
            accelerator,
            packages,
            vm_name: live.vm.name().to_string(),
            exposed_ports: live.vm.exposed_ports().to_vec(),
            isolation: live.vm.isolation(),
            live: RwLock::new(Some(live)),
            exec_turn: Mutex::new(()),
            activity: std::sync::Mutex::new(Activity {
                closed: None,
                last: tokio::time::Instant::now(),
                in_flight: 0,
            }),
            exec_count: AtomicU64::new(0),
        }
    }

    fn activity(&self) -> std::sync::MutexGuard<'_, Activity> {
        self.activity.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts an operation, unless the session is closed.
    fn begin(&self) -> Result<InFlight<'_, V>, Error> {
        let mut activity = self.activity();
        if let Some(reason) = &activity.closed {
            return Err(Error::SessionClosed {
                reason: reason.clone(),
            });
        }
        activity.in_flight += 1;
        Ok(InFlight(self))
    }

    fn closed_error(&self) -> Error {
        Error::SessionClosed {
            reason: self
                .activity()
                .closed
                .clone()
                .unwrap_or(SessionCloseReason::Closed),
        }
    }

    /// Marks the session closed (the first reason wins) and destroys the VM once the
    /// operations in progress are done. Returns what the host measured of the VM, when this
    /// call destroyed it.
    async fn close(&self, reason: SessionCloseReason) -> Option<VmStats> {
        self.activity().closed.get_or_insert(reason);
        let live = self.live.write().await.take()?;
        let stats = live.destroy().await;
        tracing::debug!(vm = %self.vm_name, reason = %self.closed_error(), "session closed");
        Some(stats)
    }
}

impl<V: VmHandle> Drop for Inner<V> {
    /// Destroys the VM in the background when a runtime is there to do it, so the permit is
    /// released after QEMU is reaped; otherwise `kill_on_drop` kills it.
    fn drop(&mut self) {
        if let Some(live) = self.live.get_mut().take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                live.destroy().await;
            });
        }
    }
}

/// Closes the session once it has been idle for `idle`. Holds only a weak reference.
async fn watch_idle<V: VmHandle>(inner: Weak<Inner<V>>, idle: Duration) {
    loop {
        let wake = {
            let Some(inner) = inner.upgrade() else { return };
            let activity = inner.activity();
            if activity.closed.is_some() {
                return;
            }
            if activity.in_flight > 0 {
                // Suspended; looked at again after another full period.
                tokio::time::Instant::now() + idle
            } else {
                activity.last + idle
            }
        };
        tokio::time::sleep_until(wake).await;
        let Some(inner) = inner.upgrade() else { return };
        let expired = {
            let mut activity = inner.activity();
            let expired = activity.closed.is_none()
                && activity.in_flight == 0
                && tokio::time::Instant::now() >= activity.last + idle;
            if expired {
                activity.closed = Some(SessionCloseReason::IdleTimeout { after: idle });
            }
            expired
        };
        if expired {
            inner
                .close(SessionCloseReason::IdleTimeout { after: idle })
                .await;
            return;
        }
    }
}

/// The rules every session operation follows.
impl<V: VmHandle> Inner<V> {
    /// One execution, and the verdict on whether the session survives it.
    async fn exec(&self, options: ExecOptions) -> Result<ExecutionResult, Error> {
        let started = Instant::now();
        let timeout_seconds = options
            .timeout_seconds
            .unwrap_or(self.default_timeout_seconds);
        validate::code(&options.code)?;
        validate::timeout(timeout_seconds)?;
        let env = merge_env(&self.env_vars, options.env_vars);
        validate::env_vars(&env)?;

        let execution = Execution {
            language: self.language,
            code: options.code,
            timeout_seconds,
            env,
            on_stdout: options.on_stdout,
            on_stderr: options.on_stderr,
            host_grace: limits::host_timeout_grace(self.accelerator.accelerator),
            ping_first: None,
        };
        // Waiting for the turn counts as an operation in progress, and the turn is held until
        // a closing verdict is in: an exec queued behind one that closes the session fails.
        let _queued = self.begin()?;
        let _turn = self.exec_turn.lock().await;
        let queued_ms = elapsed_ms(started);
        let (outcome, execute_ms) = self
            .operation(async |vm: &V| {
                let execute_started = Instant::now();
                let collected = execute(vm.link(), execution).await;
                let channel_closed = vm.link().channel.is_closed();
                let execute_ms = elapsed_ms(execute_started);
                let refusals = vm.take_network_refusals();
                ((collected, channel_closed, refusals), execute_ms)
            })
            .await?;
        let (collected, channel_closed, refusals) = outcome;
        let close_reason = match &collected {
            Ok(c) if c.exit_code() == EXIT_SIGKILL => Some(SessionCloseReason::Killed),
            // The host's deadline fired: the guest is not trusted any more.
            Ok(c) if !c.guest_reported() => Some(SessionCloseReason::VmLost),
            Err(Error::Communication(_) | Error::Boot(_)) => Some(SessionCloseReason::VmLost),
            _ if channel_closed => Some(SessionCloseReason::VmLost),
            _ => None,
        };
        let stats = match close_reason {
            Some(reason) => self.close(reason).await.unwrap_or_default(),
            None => VmStats::default(),
        };
        let collected = collected?;
        self.exec_count.fetch_add(1, Ordering::Relaxed);
        let mut result = collected.into_result(
            stats,
            Timing {
                setup_ms: queued_ms,
                execute_ms,
                total_ms: elapsed_ms(started),
                ..Timing::default()
            },
            self.accelerator.clone(),
            self.origin,
        );
        result.exposed_ports = self.exposed_ports.clone();
        result.isolation = self.isolation.clone();
        result.network_refusals = refusals;
        (result.packages_source, result.packages_install_ms) = self.packages;
        Ok(result)
    }

    /// Runs `f` with the session's VM as one operation: fails with [`Error::SessionClosed`]
    /// once the session is closed, and suspends the idle timer while `f` runs. Every session
    /// operation (executions, file transfers) goes through here; operations may overlap.
    async fn operation<R>(&self, f: impl AsyncFnOnce(&V) -> R) -> Result<R, Error> {
        let _in_flight = self.begin()?;
        let live = self.live.read().await;
        // Closed while this operation waited: the VM may still be there, winding down.
        let Some(live) = live.as_ref().filter(|_| self.activity().closed.is_none()) else {
            return Err(self.closed_error());
        };
        Ok(f(&live.vm).await)
    }

    /// One file operation; a VM found dead afterwards closes the session, as for executions.
    async fn file_operation<R>(
        &self,
        f: impl AsyncFnOnce(Link<'_>) -> Result<R, Error>,
    ) -> Result<R, Error> {
        let (result, channel_closed) = self
            .operation(async |vm: &V| {
                let result = f(vm.link()).await;
                (result, vm.link().channel.is_closed())
            })
            .await?;
        if channel_closed {
            self.close(SessionCloseReason::VmLost).await;
        }
        result
    }
}

/// Sessions.
impl Scheduler {
    /// Opens a session: a VM (from the warm pool, a memory snapshot or a cold boot; its state
    /// starts clean either way) kept for several [`Session::exec`] calls.
    ///
    /// Invalid options are rejected before any VM boots. The session holds one of the
    /// scheduler's slots and its share of the admission budget until it closes.
    pub async fn session(&self, options: SessionOptions) -> Result<Session, Error> {
        let started = Instant::now();
        let config = self.config();
        let memory_mb = options.memory_mb.unwrap_or(config.default_memory_mb);
        validate::memory(memory_mb)?;
        validate::env_vars(&options.env_vars)?;
        let allowed_domains = validate::network(&options.network)?;
        let requirements = self
            .requirements(options.language, &options.packages)
            .await?;
        let idle = match options.idle_timeout_unchecked {
            Some(idle) => idle,
            None => {
                validate::idle_timeout(options.idle_timeout_seconds)?;
                Duration::from_secs(options.idle_timeout_seconds)
            }
        };
        let default_timeout_seconds = config.default_timeout_seconds;
        let gateway = self.gateway(&options.network, allowed_domains)?;
        let layer = match options.packages_layer {
            Some(image) => Layer::Image(image),
            None => Layer::Packages(requirements),
        };
        let StartedVm {
            vm,
            origin,
            accelerator,
            packages,
            permit,
            slot,
            ..
        } = self
            .start_vm(VmRequest {
                language: options.language,
                memory_mb,
                on_boot_log: None,
                started,
                gateway,
                layer,
                ping_pooled: true,
            })
            .await?;
        tracing::debug!(vm = %vm.name(), language = %options.language, ?origin, "session opened");
        let package_report = packages.source();
        let inner = Arc::new(Inner::new(
            Live {
                vm,
                permit,
                slot,
                packages,
            },
            Settings {
                language: options.language,
                env_vars: options.env_vars,
                default_timeout_seconds,
                origin,
                accelerator,
                packages: package_report,
            },
        ));
        let idle_watch = tokio::spawn(watch_idle(Arc::downgrade(&inner), idle));
        Ok(Session { inner, idle_watch })
    }
}

impl Session {
    /// Runs `options.code` in the session's interpreter and returns its result.
    ///
    /// A program error, `sys.exit(n)` or a syntax error leave the session and its state as they
    /// were. A program that ends its interpreter (`os._exit`, a signal, the timeout) loses the
    /// state; the next execution gets a fresh interpreter. Exit code 137 (SIGKILL, usually out
    /// of memory) or a VM that stops answering close the session: this call still returns the
    /// result (or the transport error), later calls fail with [`Error::SessionClosed`].
    ///
    /// In the result, `timing.setup_ms` is the wait for earlier executions, the boot and
    /// teardown phases are 0, and
    /// the host's CPU and memory measurements are only there when this execution closed the
    /// session.
    pub async fn exec(&self, options: ExecOptions) -> Result<ExecutionResult, Error> {
        self.inner.exec(options).await
    }

    /// Read requests the session's VM has made of its disks since its QEMU started; `None` when
    /// the VM has no monitor (it booted cold) or the session is closed. Testing only.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub async fn disk_reads(&self) -> Option<u64> {
        let mut live = self.inner.live.write().await;
        live.as_mut()?.vm.disk_reads().await
    }

    /// Writes `source` to `path` (relative to `/home/user`) in the sandbox: streamed in chunks,
    /// parents created, atomic (an aborted or failed write leaves no partial file), owned by the
    /// sandbox user, mode 0755 if `executable` else 0644, at most
    /// [`MAX_FILE_BYTES`](crate::limits::MAX_FILE_BYTES) (checked before the transfer when `size`
    /// is given). Works while an execution is running. Returns the bytes written.
    pub async fn write_file(
        &self,
        path: &str,
        source: impl tokio::io::AsyncRead + Unpin,
        size: Option<u64>,
        executable: bool,
    ) -> Result<u64, Error> {
        self.inner
            .file_operation(async |vm: Link<'_>| {
                crate::files::write_file(vm, path, source, size, executable).await
            })
            .await
    }

    /// Streams the sandbox file `path` (relative to `/home/user`) into `dest`. Symbolic links
    /// leading out of the home directory are refused. Returns the bytes read.
    pub async fn read_file(
        &self,
        path: &str,
        dest: impl tokio::io::AsyncWrite + Unpin,
    ) -> Result<u64, Error> {
        self.inner
            .file_operation(async |vm: Link<'_>| crate::files::read_file(vm, path, dest).await)
            .await
    }

    /// Lists the directory `path` (relative to `/home/user`; `""` or `"."` for the home itself).
    pub async fn list_files(&self, path: &str) -> Result<Vec<crate::FileEntry>, Error> {
        self.inner
            .file_operation(async |vm: Link<'_>| crate::files::list_files(vm, path).await)
            .await
    }

    /// Executions that returned a result.
    pub fn exec_count(&self) -> u64 {
        self.inner.exec_count.load(Ordering::Relaxed)
    }

    /// The session's interpreter.
    pub fn language(&self) -> Language {
        self.inner.language
    }

    /// Why the session closed, or `None` while it is open.
    pub fn close_reason(&self) -> Option<SessionCloseReason> {
        self.inner.activity().closed.clone()
    }

    /// Ports forwarded from `127.0.0.1` on the host into the session's VM, as bound.
    pub fn exposed_ports(&self) -> &[ExposedPort] {
        &self.inner.exposed_ports
    }

    /// Which accelerator runs the session's VM.
    pub fn accelerator(&self) -> &AcceleratorChoice {
        &self.inner.accelerator
    }

    /// The VM's name (QEMU's `-name`, as in `ps` and the logs).
    pub fn vm_name(&self) -> &str {
        &self.inner.vm_name
    }

    /// Closes the session and destroys its VM, after the operations in progress. Later calls
    /// fail with [`Error::SessionClosed`]. Closing a closed session does nothing.
    pub async fn close(&self) {
        self.inner.close(SessionCloseReason::Closed).await;
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.idle_watch.abort();
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("vm", &self.inner.vm_name)
            .field("language", &self.inner.language)
            .field("exec_count", &self.exec_count())
            .field("close_reason", &self.close_reason())
            .finish_non_exhaustive()
    }
}

/// The session's variables with the execution's on top (an execution's value wins).
fn merge_env(session: &[(String, String)], exec: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = session
        .iter()
        .filter(|(name, _)| !exec.iter().any(|(n, _)| n == name))
        .cloned()
        .collect();
    env.extend(exec);
    env
}

fn elapsed_ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ErrorKind, SchedulerConfig};

    fn offline_scheduler() -> Scheduler {
        Scheduler::new(SchedulerConfig {
            // A QEMU that does not exist: reaching the VM stage would fail differently.
            qemu_binary: Some("/nonexistent/qemu".into()),
            offline: true,
            images_dir: "/nonexistent/images".into(),
            ..SchedulerConfig::default()
        })
        .unwrap()
    }

    #[tokio::test]
    async fn invalid_options_are_rejected_before_any_vm() {
        let s = offline_scheduler();
        for options in [
            SessionOptions::new(Language::Python).idle_timeout_seconds(9),
            SessionOptions::new(Language::Python).idle_timeout_seconds(3601),
            SessionOptions::new(Language::Python).memory_mb(64),
            SessionOptions::new(Language::Raw).env("LD_PRELOAD", "/x.so"),
        ] {
            let err = s.session(options).await.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
            assert!(matches!(err, Error::Validation(_)), "{err}");
        }
        assert_eq!(s.peak_vms(), 0, "no VM was admitted");
    }

    #[test]
    fn exec_env_overrides_session_env() {
        let v = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            merge_env(&v(&[("A", "1"), ("B", "2")]), v(&[("B", "3"), ("C", "4")])),
            v(&[("A", "1"), ("B", "3"), ("C", "4")])
        );
    }

    #[test]
    fn session_closed_is_permanent_and_names_the_reason() {
        let e = Error::SessionClosed {
            reason: SessionCloseReason::IdleTimeout {
                after: Duration::from_secs(300),
            },
        };
        assert_eq!(e.kind(), ErrorKind::Permanent);
        assert_eq!(e.to_string(), "session is closed: idle for 300 s");
    }

    mod rules {
        use std::sync::Arc;

        use sbx_protocol::{Event, Request};
        use tokio::sync::Semaphore;

        use super::super::*;
        use crate::admission::Cost;
        use crate::vm::fake::{Destroyed, FakeVm, Reply, Script, done, healthy};

        struct Open {
            inner: Arc<Inner<FakeVm>>,
            destroyed: Destroyed,
            slots: Arc<Semaphore>,
            _idle_watch: tokio::task::JoinHandle<()>,
        }

        /// A session on a fake VM following `script`, closing after `idle` without operations.
        async fn open(script: Script, idle: Duration) -> Open {
            let destroyed = Destroyed::default();
            let admission = crate::admission::with_budget(Cost {
                memory_mb: 1000,
                cpu_milli: 1000,
            });
            let permit = admission
                .try_admit(Cost {
                    memory_mb: 1,
                    cpu_milli: 1,
                })
                .unwrap();
            let slots = Arc::new(Semaphore::new(1));
            let slot = slots.clone().acquire_owned().await.unwrap();
            let inner = Arc::new(Inner::new(
                Live {
                    vm: FakeVm::new("session-vm", script, &destroyed),
                    permit,
                    slot,
                    packages: ReadyPackages::None,
                },
                Settings {
                    language: Language::Python,
                    env_vars: vec![("S".into(), "session".into())],
                    default_timeout_seconds: 30,
                    origin: VmOrigin::Snapshot,
                    accelerator: AcceleratorChoice {
                        accelerator: crate::Accelerator::Tcg,
                        reason: "test".into(),
                    },
                    packages: (PackageSource::L2, Some(5)),
                },
            ));
            let idle_watch = tokio::spawn(watch_idle(Arc::downgrade(&inner), idle));
            Open {
                inner,
                destroyed,
                slots,
                _idle_watch: idle_watch,
            }
        }

        /// Executions whose code is an exit code (`"137"`), or `"hang"` for no answer, or
        /// `"die"` for a lost VM, or `"sleep:N"` for N seconds then exit 0.
        fn by_code() -> Script {
            Box::new(|request| match request {
                Request::Exec(e) if e.code == "hang" => Reply::Silence,
                Request::Exec(e) if e.code == "die" => Reply::Hangup,
                Request::Exec(e) if e.code.starts_with("sleep:") => {
                    let secs: u64 = e.code["sleep:".len()..].parse().unwrap();
                    Reply::Events(vec![(Duration::from_secs(secs), done(0))])
                }
                Request::Exec(e) => Reply::now([
                    Event::Stdout(e.code.as_bytes().to_vec()),
                    done(e.code.parse().unwrap_or(0)),
                ]),
                Request::ListFiles { .. } => Reply::Hangup,
                _ => Reply::Silence,
            })
        }

        fn closed_because(err: Error) -> SessionCloseReason {
            match err {
                Error::SessionClosed { reason } => reason,
                other => panic!("not closed: {other}"),
            }
        }

        const IDLE: Duration = Duration::from_secs(60);

        #[tokio::test(start_paused = true)]
        async fn program_errors_keep_the_session_and_env_merges() {
            let s = open(by_code(), IDLE).await;
            s.inner
                .live
                .read()
                .await
                .as_ref()
                .unwrap()
                .vm
                .refuse(&["DNS x.test: not in the allowlist"]);
            let r = s
                .inner
                .exec(ExecOptions::new("1").env("E", "exec"))
                .await
                .unwrap();
            assert_eq!((r.exit_code, r.stdout.as_str()), (1, "1"));
            assert_eq!(r.network_refusals, ["DNS x.test: not in the allowlist"]);
            let r = s.inner.exec(ExecOptions::new("0")).await.unwrap();
            assert_eq!(r.exit_code, 0);
            assert!(r.network_refusals.is_empty(), "reported once");
            assert_eq!(s.inner.exec_count.load(Ordering::Relaxed), 2);
            assert!(s.inner.activity().closed.is_none());
            assert_eq!(
                r.external_cpu_time_ms, None,
                "measured only when the VM goes"
            );
            assert!(r.l1_cache_hit);
            let live = s.inner.live.read().await;
            let Request::Exec(first) = &live.as_ref().unwrap().vm.requests()[0] else {
                panic!()
            };
            assert_eq!(
                first.env,
                vec![("S".into(), "session".into()), ("E".into(), "exec".into())]
            );
        }

        #[tokio::test(start_paused = true)]
        async fn exit_137_closes_the_session_after_returning_its_result() {
            let s = open(by_code(), IDLE).await;
            let r = s.inner.exec(ExecOptions::new("137")).await.unwrap();
            assert_eq!(r.exit_code, 137);
            assert_eq!(
                r.external_cpu_time_ms,
                Some(7),
                "the closing exec has the VM's figures"
            );
            assert_eq!(s.destroyed.count(), 1);
            assert_eq!(s.slots.available_permits(), 1, "the slot is given back");
            let err = s.inner.exec(ExecOptions::new("0")).await.unwrap_err();
            assert_eq!(closed_because(err), SessionCloseReason::Killed);
        }

        #[tokio::test(start_paused = true)]
        async fn the_host_deadline_closes_the_session() {
            let s = open(by_code(), IDLE).await;
            let started = tokio::time::Instant::now();
            let r = s
                .inner
                .exec(ExecOptions::new("hang").timeout_seconds(3))
                .await
                .unwrap();
            // The fake session's accelerator decides the grace (TCG: the longer one).
            assert_eq!(
                started.elapsed(),
                Duration::from_secs(3)
                    + limits::host_timeout_grace(s.inner.accelerator.accelerator)
            );
            assert!(r.timed_out && r.exit_code == -1);
            let err = s.inner.exec(ExecOptions::new("0")).await.unwrap_err();
            assert_eq!(closed_because(err), SessionCloseReason::VmLost);
            assert_eq!(s.destroyed.count(), 1);
        }

        #[tokio::test(start_paused = true)]
        async fn a_lost_channel_closes_the_session_with_outcome_unknown() {
            let s = open(by_code(), IDLE).await;
            let err = s.inner.exec(ExecOptions::new("die")).await.unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::OutcomeUnknown, "{err}");
            let err = s.inner.exec(ExecOptions::new("0")).await.unwrap_err();
            assert_eq!(closed_because(err), SessionCloseReason::VmLost);
        }

        #[tokio::test(start_paused = true)]
        async fn a_file_operation_on_a_dead_vm_closes_the_session() {
            let s = open(by_code(), IDLE).await;
            let err = s
                .inner
                .file_operation(async |vm: Link<'_>| crate::files::list_files(vm, ".").await)
                .await
                .unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::OutcomeUnknown, "{err}");
            let err = s.inner.exec(ExecOptions::new("0")).await.unwrap_err();
            assert_eq!(closed_because(err), SessionCloseReason::VmLost);
        }

        #[tokio::test(start_paused = true)]
        async fn an_exec_queued_behind_a_closing_one_fails() {
            let s = open(by_code(), IDLE).await;
            let inner = s.inner.clone();
            let first = tokio::spawn(async move {
                inner
                    .exec(ExecOptions::new("hang").timeout_seconds(1))
                    .await
            });
            tokio::task::yield_now().await;
            let second = s.inner.exec(ExecOptions::new("0")).await.unwrap_err();
            assert_eq!(closed_because(second), SessionCloseReason::VmLost);
            assert!(first.await.unwrap().unwrap().timed_out);
        }

        #[tokio::test(start_paused = true)]
        async fn idle_sessions_close_and_operations_suspend_the_timer() {
            let s = open(by_code(), IDLE).await;
            // An execution three times longer than the idle timeout is not cut short.
            let r = s
                .inner
                .exec(ExecOptions::new("sleep:180").timeout_seconds(300))
                .await
                .unwrap();
            assert_eq!(r.exit_code, 0);
            assert!(s.inner.activity().closed.is_none());
            // Activity restarts the clock: just under the timeout later, still open.
            tokio::time::sleep(IDLE - Duration::from_secs(1)).await;
            assert!(s.inner.activity().closed.is_none());
            tokio::time::sleep(Duration::from_secs(2)).await;
            assert_eq!(
                s.inner.activity().closed,
                Some(SessionCloseReason::IdleTimeout { after: IDLE })
            );
            // The idle close destroys the VM and gives the slot back.
            for _ in 0..100 {
                if s.destroyed.count() == 1 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            assert_eq!(s.destroyed.count(), 1);
            assert_eq!(s.slots.available_permits(), 1);
            let err = s.inner.exec(ExecOptions::new("0")).await.unwrap_err();
            assert!(matches!(
                closed_because(err),
                SessionCloseReason::IdleTimeout { .. }
            ));
        }

        #[tokio::test(start_paused = true)]
        async fn close_waits_for_operations_in_progress() {
            let s = open(healthy(), IDLE).await;
            let inner = s.inner.clone();
            let running = tokio::spawn(async move {
                inner
                    .operation(async |_vm: &FakeVm| {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        "done"
                    })
                    .await
            });
            tokio::task::yield_now().await;
            let started = tokio::time::Instant::now();
            s.inner.close(SessionCloseReason::Closed).await;
            assert_eq!(started.elapsed(), Duration::from_secs(5));
            assert_eq!(running.await.unwrap().unwrap(), "done");
            assert_eq!(s.destroyed.count(), 1);
            let err = s.inner.exec(ExecOptions::new("0")).await.unwrap_err();
            assert_eq!(closed_because(err), SessionCloseReason::Closed);
        }
    }
}
