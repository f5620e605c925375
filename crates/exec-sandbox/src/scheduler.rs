//! The entry point: admits runs, readies assets and the accelerator, acquires one VM per run
//! ([`crate::acquire`]), executes the code in it ([`crate::execute`]) and destroys it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sbx_protocol::Language;
use tokio::sync::{OnceCell, OwnedSemaphorePermit, Semaphore};

use crate::SchedulerConfig;
use crate::acquire::{self, Acquired, VmFactory, Want};
use crate::admission::{self, Admission, CapacityError, Cost, Permit};
use crate::assets::{self, AssetStore, GuestAssets, OwnQemu};
use crate::background::Background;
use crate::error::Error;
use crate::execute::{self, Execution, VmOrigin, execute};
use crate::gateway::{Gateway, GatewayConfig};
use crate::limits;
use crate::network::NetworkOptions;
use crate::packages::s3::S3Layers;
use crate::packages::{self, PackageSource, PackageStore, ReadyLayer, Requirement, SpecError};
use crate::pool::{self, Pooled, WarmPool};
use crate::result::{
    CacheReport, CacheUsage, ExecutionResult, PreparedPackages, PruneReport, Timing, WarmVm,
};
use crate::run::RunOptions;
use crate::snapshot::{self, Templates};
use crate::validate::{self, ValidationError};
use crate::vm::Qemu;
use crate::vm::accel::{self, AccelConfig, AcceleratorChoice, HostVerdict};
use crate::vm::jail::Jail;
use crate::vm::migration::Warmup;
use crate::vm::qemu::VmSpec;
use crate::vm::{OutputCallback, Vm, VmError};
use sbx_net::policy::Allowlist;

/// Runs code in disposable microVMs.
///
/// Cheap to clone; clones share the concurrency limit and the readied assets.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

struct Inner {
    config: SchedulerConfig,
    /// The QEMU binary and the jail it runs in.
    /// QEMU's jail, shared by every QEMU of this scheduler (and what it learned of the host).
    jail: Arc<Jail>,
    /// exec-sandbox's own QEMU, used unless the configuration names a binary.
    own_qemu: OwnQemu,
    /// Shared with the VMs' owners: a session holds its slot for its whole life.
    slots: Arc<Semaphore>,
    assets: AssetStore,
    host: OnceCell<Host>,
    admission: Arc<Admission>,
    pool: Arc<WarmPool>,
    pool_task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// VMs of runs that returned, being destroyed.
    teardowns: Background,
    /// Held for writing by a test that wants runs' VMs kept alive after their results.
    #[cfg(feature = "testing")]
    teardown_gate: Arc<tokio::sync::RwLock<()>>,
    /// L1 memory snapshots.
    templates: Templates,
    /// The operator's extra CA certificates for networked guests, read once.
    ca_bundle: Option<Arc<Vec<u8>>>,
    /// Package layers (L2 on disk, L3 in S3 when configured).
    packages: PackageStore,
    /// The L3 store, when configured (the package store uploads through it).
    s3: Option<Arc<S3Layers>>,
    /// This process's parent cgroup of VMs, held so it outlives single runs (none where no
    /// cgroup can be made: each VM then reports why).
    _cgroups: Option<Arc<crate::cgroup::Parent>>,
}

impl Drop for Inner {
    /// The last handle is gone: stop refilling and kill the idle warm VMs (`kill_on_drop`).
    fn drop(&mut self) {
        if let Ok(mut task) = self.pool_task.lock()
            && let Some(task) = task.take()
        {
            task.abort();
        }
        drop(self.pool.close());
    }
}

impl Scheduler {
    /// A scheduler for `config` (validated here, its cache directories checked: see
    /// [`SchedulerConfig::cache_dir`]). Nothing is built or booted until needed.
    pub fn new(config: SchedulerConfig) -> Result<Self, Error> {
        let packages = config.package_config();
        Self::with_packages(config, packages)
    }

    fn with_packages(
        config: SchedulerConfig,
        packages: crate::packages::PackageConfig,
    ) -> Result<Self, Error> {
        config.validate()?;
        config.check_cache_dirs()?;
        let s3 = S3Layers::new(&config.s3_config())
            .map_err(|e| ValidationError::Config {
                field: "s3_bucket",
                reason: crate::vm::error_chain(&e),
            })?
            .map(Arc::new);
        let remote = s3
            .clone()
            .map(|s3| s3 as Arc<dyn crate::packages::RemoteLayers>);
        let ca_bundle = config
            .guest_ca_bundle
            .as_deref()
            .map(read_ca_bundle)
            .transpose()?
            .map(Arc::new);
        let cgroups = crate::cgroup::scheduler_started()
            .inspect_err(|reason| tracing::debug!(%reason, "VMs run without cgroups"))
            .ok();
        let policy = admission::Policy::new(&config.admission_config(), &admission::ProcHost);
        tracing::debug!(budget = %policy.budget, "admission budget");
        let scheduler = Self {
            inner: Arc::new(Inner {
                jail: Arc::new(Jail::new(config.qemu_user.clone())),
                own_qemu: OwnQemu::new(
                    Path::new(assets::OWN_QEMU_DIR),
                    assets::build_cache(&config.images_dir),
                ),
                slots: Arc::new(Semaphore::new(config.max_concurrent_vms)),
                assets: AssetStore::new(&config.asset_config()),
                host: OnceCell::new(),
                admission: Admission::new(policy, Box::new(admission::ProcHost)),
                pool: Arc::new(WarmPool::new(config.warm_pool_size)),
                pool_task: std::sync::Mutex::new(None),
                teardowns: Background::default(),
                #[cfg(feature = "testing")]
                teardown_gate: Arc::default(),
                templates: Templates::new(
                    config.l1_snapshots.then(|| {
                        snapshot::Cache::new(
                            config.snapshot_cache_dir.clone(),
                            config.snapshot_cache_max_mb.saturating_mul(1024 * 1024),
                        )
                    }),
                    config.l1_standby,
                ),
                ca_bundle,
                packages: PackageStore::with_remote(packages, remote),
                s3,
                _cgroups: cgroups,
                config,
            }),
        };
        scheduler.ensure_pool_task();
        Ok(scheduler)
    }

    /// A scheduler whose package tools (pip, npm) run with `env` on top of this process's
    /// environment: tests point them at a loopback index this way (feature `testing`).
    #[cfg(feature = "testing")]
    pub fn with_package_tool_env(
        config: SchedulerConfig,
        env: Vec<(String, Option<String>)>,
    ) -> Result<Self, Error> {
        let mut packages = config.package_config();
        packages.tools.env = env;
        Self::with_packages(config, packages)
    }

    /// Keeps the VMs of runs returning from now on alive until the guard is dropped (feature
    /// `testing`): a test sees that a run returns before its VM is torn down.
    #[cfg(feature = "testing")]
    pub async fn hold_teardowns(&self) -> tokio::sync::OwnedRwLockWriteGuard<()> {
        Arc::clone(&self.inner.teardown_gate).write_owned().await
    }

    /// The VM names of the standby clones ready now (feature `testing`): QEMU started ahead
    /// of the next restore of a template ([`SchedulerConfig::l1_standby`]).
    #[cfg(feature = "testing")]
    pub fn standby_vms(&self) -> Vec<String> {
        self.inner.templates.standby_names()
    }

    /// Destroys the idle warm VMs and stops refilling the pool; waits until their QEMU
    /// processes, and those of runs that already returned (a run's VM is destroyed just after
    /// its result), are gone. Runs still work afterwards, without the pool.
    pub async fn shutdown(&self) {
        let task = self.inner.pool_task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            task.abort();
            // A VM the task was booting is killed when its future is dropped.
            let _ = task.await;
        }
        for vm in self.inner.pool.close() {
            let Pooled { vm, permit } = vm;
            vm.destroy().await;
            drop(permit);
        }
        // Memory snapshots being saved are abandoned (their template VMs killed).
        self.inner.templates.abort().await;
        // VMs of runs that already returned.
        self.inner.teardowns.wait().await;
    }

    /// Starts the warm-pool refill task if the pool is on and it is not running.
    ///
    /// Called from `new` (so the pool fills before the first run when the scheduler is made
    /// inside a runtime) and again from `run` (a scheduler made outside a runtime, or whose
    /// runtime ended, gets a task on the current one). The task holds only a weak reference.
    fn ensure_pool_task(&self) {
        if !self.inner.pool.enabled() || self.inner.pool.is_closed() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Ok(mut task) = self.inner.pool_task.lock() else {
            return;
        };
        if task.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        *task = Some(
            runtime.spawn(pool::maintain(self.inner.pool.clone(), move || {
                weak.upgrade().map(|inner| Scheduler { inner })
            })),
        );
    }

    /// The idle VMs of the warm pool, with the memory each takes on the host (its QEMU's
    /// proportional set size, which counts pages shared with other VMs, like a memory
    /// snapshot's, in proportion) and where it goes.
    pub fn warm_pool_vms(&self) -> Vec<WarmVm> {
        self.inner.pool.inspect_idle(|language, vm| {
            // One read of QEMU's smaps: the parts add up to the whole.
            let memory = vm.pid().and_then(crate::vm::procfs::memory_use);
            WarmVm {
                language,
                name: vm.name().to_string(),
                pss_mb: memory.map(|m| m.total_mb()),
                memory,
            }
        })
    }

    /// The memory all of this scheduler's VMs together may be charged (MB): configured, or
    /// derived from the host's memory.
    pub fn memory_budget_mb(&self) -> u64 {
        self.inner.admission.budget().memory_mb
    }

    /// Most VMs this scheduler had alive at once (each holds an admission permit from before
    /// QEMU starts until after it is reaped).
    pub fn peak_vms(&self) -> usize {
        self.inner.admission.peak_vms()
    }

    /// The configuration in force.
    pub fn config(&self) -> &SchedulerConfig {
        &self.inner.config
    }

    /// Readies every language's assets and decides the accelerator, so later runs start at once.
    pub async fn prefetch(&self) -> Result<AcceleratorChoice, Error> {
        let assets = self.inner.assets.ensure(&Language::ALL).await?;
        Ok(self.host(&assets).await?.choice.clone())
    }

    /// Runs `options.code` in a fresh VM and returns its result.
    ///
    /// Invalid input is rejected before any VM boots. An execution timeout is a result (exit
    /// code -1), not an error. The VM is killed and reaped just after the result is returned,
    /// on this runtime, holding its share of the budget until it is gone;
    /// [`shutdown`](Self::shutdown) waits for that.
    pub async fn run(&self, options: RunOptions) -> Result<ExecutionResult, Error> {
        let started = Instant::now();
        let config = &self.inner.config;
        let timeout_seconds = options
            .timeout_seconds
            .unwrap_or(config.default_timeout_seconds);
        let memory_mb = options.memory_mb.unwrap_or(config.default_memory_mb);
        validate::code(&options.code)?;
        validate::timeout(timeout_seconds)?;
        validate::memory(memory_mb)?;
        validate::env_vars(&options.env_vars)?;
        let allowed_domains = validate::network(&options.network)?;
        let requirements = self
            .requirements(options.language, &options.packages)
            .await?;
        let gateway = self.gateway(&options.network, allowed_domains)?;
        if let (Some(gateway), Some(on_ports)) = (&gateway, &options.on_ports) {
            on_ports(gateway.exposed_ports());
        }

        let layer = match options.packages_layer {
            Some(image) => Layer::Image(image),
            None => Layer::Packages(requirements),
        };
        let mut started_vm = self
            .start_vm(VmRequest {
                language: options.language,
                memory_mb,
                on_boot_log: options.on_boot_log.as_ref(),
                started,
                gateway,
                layer,
                ping_pooled: false,
            })
            .await?;
        let execution = Execution {
            language: options.language,
            code: options.code,
            timeout_seconds,
            env: options.env_vars,
            on_stdout: options.on_stdout,
            on_stderr: options.on_stderr,
            host_grace: limits::host_timeout_grace(started_vm.accelerator.accelerator),
            ping_first: None,
        };
        // A pooled VM was not pinged when taken: the execution sends that ping ahead of the
        // code. If it goes unanswered (or the request could not be sent), the code got no
        // further than that VM's queue, and a pooled VM has no NIC and none of the caller's
        // files, so nothing could leave it: the VM is destroyed and the run takes another,
        // pinged before it is handed out.
        let (first, spare) = match started_vm.origin {
            VmOrigin::WarmPool => (
                Execution {
                    ping_first: Some(limits::WARM_POOL_PING_DEADLINE),
                    ..execution.clone()
                },
                Some(execution),
            ),
            _ => (execution, None),
        };
        let mut execute_started = Instant::now();
        let mut collected = execute(started_vm.vm.link(), first).await;
        if let (Some(execution), Err(Error::Boot(e))) = (spare, &collected) {
            tracing::info!(error = %e, "warm VM did not answer: the run takes another VM");
            let StartedVm {
                vm,
                packages,
                permit,
                slot,
                ..
            } = started_vm;
            self.tear_down(vm, (packages, permit, slot));
            // What a pooled VM had: no boot log, no NIC, no packages.
            started_vm = self
                .start_vm(VmRequest {
                    language: options.language,
                    memory_mb,
                    on_boot_log: None,
                    started,
                    gateway: None,
                    layer: Layer::Packages(Vec::new()),
                    ping_pooled: true,
                })
                .await?;
            execute_started = Instant::now();
            collected = execute(started_vm.vm.link(), execution).await;
        }
        let execute_ms = elapsed_ms(execute_started);
        let StartedVm {
            vm,
            origin,
            accelerator,
            timing,
            packages,
            permit,
            slot,
        } = started_vm;
        let exposed_ports = vm.exposed_ports().to_vec();
        let network_refusals = vm.take_network_refusals();
        let isolation = vm.isolation();
        let teardown_started = Instant::now();
        let stats = vm.stats();
        let packages_source = packages.source();
        self.tear_down(vm, (packages, permit, slot));
        let teardown_ms = elapsed_ms(teardown_started);
        let collected = collected?;

        let mut result = collected.into_result(
            stats,
            Timing {
                execute_ms,
                teardown_ms,
                total_ms: elapsed_ms(started),
                ..timing
            },
            accelerator,
            origin,
        );
        result.exposed_ports = exposed_ports;
        result.network_refusals = network_refusals;
        result.isolation = isolation;
        (result.packages_source, result.packages_install_ms) = packages_source;
        Ok(result)
    }

    /// Kills and reaps a run's VM in the background (after the result is returned); what it
    /// holds is released after.
    fn tear_down(&self, vm: Vm, held: (ReadyPackages, Permit, OwnedSemaphorePermit)) {
        #[cfg(feature = "testing")]
        let gate = Arc::clone(&self.inner.teardown_gate);
        self.inner.teardowns.spawn(async move {
            #[cfg(feature = "testing")]
            let _open = gate.read().await;
            vm.destroy().await;
            drop(held);
        });
    }

    /// Checks package specs for `language` as [`run`](Self::run) and
    /// [`session`](Self::session) do, without running anything: syntax and limits, and the
    /// allowlist unless `enable_package_validation` is off. A spec without a version is
    /// refused with the newest version the index has, when the index can be asked.
    pub async fn check_packages(&self, language: Language, specs: &[String]) -> Result<(), Error> {
        self.requirements(language, specs).await.map(drop)
    }

    /// The validated requirements of `specs` (see [`check_packages`](Self::check_packages)).
    pub(crate) async fn requirements(
        &self,
        language: Language,
        specs: &[String],
    ) -> Result<Vec<Requirement>, Error> {
        let allowlist = self.inner.config.enable_package_validation;
        match packages::validate(language, specs, allowlist) {
            Ok(requirements) => Ok(requirements),
            Err(source) => {
                let newest = match &source {
                    SpecError::NoVersion { name, .. } => self.newest(language, name).await,
                    _ => None,
                };
                Err(Error::PackageSpec {
                    source: Box::new(source),
                    newest,
                })
            }
        }
    }

    /// The newest version of `name` the guest of `language` can use, when the guest image is
    /// here already and the index answers (never builds anything).
    async fn newest(&self, language: Language, name: &str) -> Option<String> {
        if self.inner.config.offline {
            return None;
        }
        let target = packages::target_for(&self.inner.assets, language).ok()?;
        match self.inner.packages.newest(&target, name).await {
            Ok(newest) => Some(newest),
            Err(e) => {
                tracing::debug!(%name, error = %crate::vm::error_chain(&e), "cannot ask the index for the newest version");
                None
            }
        }
    }

    /// The gateway for a VM with `network` options, when it needs a NIC: forwarded ports are
    /// bound here, before any VM boots, so a taken port fails the call with nothing started.
    pub(crate) fn gateway(
        &self,
        network: &NetworkOptions,
        allowed_domains: Option<Vec<String>>,
    ) -> Result<Option<Gateway>, Error> {
        if !network.needs_nic() {
            return Ok(None);
        }
        let config = &self.inner.config;
        let gateway = Gateway::start(GatewayConfig {
            outbound: network.allow_network,
            allowlist: match allowed_domains {
                Some(domains) => Allowlist::Only(domains),
                None => Allowlist::Any,
            },
            allow_internal: config.network_allow_internal,
            hosts: config.network_hosts.clone(),
            expose: network.expose_ports.clone(),
        })?;
        Ok(Some(gateway))
    }

    /// Readies the assets, the accelerator verdict and the package layer, takes a slot, and
    /// acquires a VM for the request (warm pool, memory snapshot or cold boot). Shared by runs
    /// and sessions: the caller holds the returned slot and permit for as long as the VM lives.
    pub(crate) async fn start_vm(&self, request: VmRequest<'_>) -> Result<StartedVm, Error> {
        let VmRequest {
            language,
            memory_mb,
            on_boot_log,
            started,
            gateway,
            layer,
            ping_pooled,
        } = request;
        let config = &self.inner.config;
        self.ensure_pool_task();
        let assets = self.inner.assets.ensure(&[language]).await?;
        let host = self.host(&assets).await?;
        // Installing packages takes no slot: it needs no VM.
        let packages = self.layer(language, layer).await?;

        let queued = tokio::time::Instant::now();
        let admission_timeout = Duration::from_secs(config.admission_timeout_seconds);
        let slot =
            tokio::time::timeout(admission_timeout, self.inner.slots.clone().acquire_owned())
                .await
                .map_err(|_| CapacityError {
                    waited: admission_timeout,
                    needed: Cost::default(),
                    available: Cost::default(),
                    blocker: admission::Blocker::Slots {
                        max_concurrent_vms: config.max_concurrent_vms,
                    },
                })?
                .expect("the scheduler never closes its semaphore");
        let slot_wait = queued.elapsed();

        let acquiring = Instant::now();
        let admission_deadline =
            tokio::time::Instant::now() + admission_timeout.saturating_sub(slot_wait);
        let Acquired {
            vm,
            origin,
            permit,
            admission_wait,
            phases,
        } = acquire::acquire(
            &self.factory(&assets, host),
            &self.inner.pool,
            &self.inner.admission,
            Want {
                language,
                memory_mb,
                pooled_memory_mb: config.default_memory_mb,
                on_boot_log,
                gateway,
                packages: packages.image(),
                warm_modules: packages.warm_modules(),
                admission_deadline,
                ping_pooled,
            },
        )
        .await
        .map_err(|e| match e {
            // The deadline counts from the queueing, slot wait included: so does the wait the
            // error reports (admission alone measured from its own start fell short of the
            // timeout by the steps before it, 999 ms of a 1 s timeout in a CI run).
            Error::Capacity(mut capacity) => {
                capacity.waited = queued.elapsed();
                Error::Capacity(capacity)
            }
            other => other,
        })?;
        // The budget wait happened inside `acquire`: it belongs to setup, not to the boot.
        let boot = acquiring.elapsed().saturating_sub(admission_wait);
        let guest_ready = phases.guest_ready.min(boot);
        let ms = |d: Duration| d.as_millis() as u64;
        let timing = Timing {
            setup_ms: ms(started.elapsed().saturating_sub(boot)),
            admission_wait_ms: ms(slot_wait + admission_wait),
            boot_ms: ms(boot),
            vm_start_ms: ms(boot - guest_ready),
            guest_ready_ms: ms(guest_ready),
            ..Timing::default()
        };
        Ok(StartedVm {
            vm,
            origin,
            accelerator: host.choice.clone(),
            timing,
            packages,
            permit,
            slot,
        })
    }

    /// The package layer a VM gets: none, the cached (or just built) layer of the
    /// requirements, or a given image (tests).
    async fn layer(&self, language: Language, layer: Layer) -> Result<ReadyPackages, Error> {
        match layer {
            Layer::Packages(requirements) if requirements.is_empty() => Ok(ReadyPackages::None),
            Layer::Packages(requirements) => {
                let target = packages::target_for(&self.inner.assets, language)?;
                let ready = self
                    .inner
                    .packages
                    .ensure(&target, &requirements, |_| {})
                    .await?;
                tracing::debug!(key = %ready.key, source = ?ready.source, packages = ready.closure.len(), "package layer ready");
                Ok(ReadyPackages::Layer(ready))
            }
            Layer::Image(image) => Ok(ReadyPackages::Image(image)),
        }
    }

    /// The factory of this scheduler's VMs, for `assets` on `host`.
    fn factory<'a>(&'a self, assets: &'a GuestAssets, host: &'a Host) -> QemuFactory<'a> {
        QemuFactory {
            inner: &self.inner,
            assets,
            host,
        }
    }

    /// The QEMU this scheduler runs (the configured binary, or the own build, built now when
    /// missing) and the accelerator verdict for this host: remembered, or decided now (with a
    /// probe boot).
    async fn host(&self, assets: &GuestAssets) -> Result<&Host, Error> {
        self.inner
            .host
            .get_or_try_init(|| async {
                let config = &self.inner.config;
                let binary = match &config.qemu_binary {
                    Some(binary) => binary.clone(),
                    None => self.inner.own_qemu.ready().await?,
                };
                let qemu = Qemu::in_jail(binary, Arc::clone(&self.inner.jail));
                let accel = AccelConfig {
                    force_emulation: config.force_emulation,
                    qemu: qemu.clone(),
                    cache_dir: config.cache_dir.clone(),
                };
                let verdict = accel::decide(&accel, &assets.kernel, &assets.initramfs).await;
                Ok(Host { verdict, qemu })
            })
            .await
    }
}

/// L1 memory snapshots.
impl Scheduler {
    /// Saves a memory snapshot (warm template) for every language at the default memory size,
    /// unless a valid one exists, so that the first runs restore instead of booting. Returns
    /// the languages whose template is ready; none when L1 is off.
    pub async fn prefetch_snapshots(&self) -> Result<Vec<Language>, Error> {
        let assets = self.inner.assets.ensure(&Language::ALL).await?;
        let host = self.host(&assets).await?;
        let factory = self.factory(&assets, host);
        let mut ready = Vec::new();
        for language in Language::ALL {
            let spec = factory.spec(language, self.inner.config.default_memory_mb, false, false);
            if self
                .save_template_now(&factory, spec, language.into())
                .await?
            {
                ready.push(language);
            }
        }
        Ok(ready)
    }

    /// Saves the template shaped like `spec` now, unless a valid one exists, its VM admitted
    /// like any other; true when one is ready (false with L1 off, or when saving failed: that
    /// is logged, the caller's runs just boot cold).
    async fn save_template_now(
        &self,
        factory: &QemuFactory<'_>,
        spec: VmSpec,
        warmup: Warmup,
    ) -> Result<bool, Error> {
        let Some(key) = factory.template_key(warmup.language, &spec) else {
            return Ok(false);
        };
        let deadline = tokio::time::Instant::now()
            + Duration::from_secs(self.inner.config.admission_timeout_seconds);
        let _permit = acquire::admit(
            &self.inner.pool,
            &self.inner.admission,
            factory.cost(&spec),
            deadline,
        )
        .await?;
        let built = self
            .inner
            .templates
            .ensure(
                factory.qemu(),
                &spec,
                &warmup,
                &key,
                boot_deadline(factory.host),
            )
            .await;
        Ok(built.unwrap_or_else(|e| {
            tracing::warn!(language = %warmup.language, error = %crate::vm::error_chain(&e), "cannot save a memory snapshot");
            false
        }))
    }

    /// Waits for memory snapshots being saved in the background. A short-lived process calls
    /// this before exiting (after printing its results), or the template VM dies with it.
    pub async fn wait_for_snapshots(&self) {
        self.inner.templates.wait().await;
    }

    /// Whether memory snapshots are being saved in the background.
    pub fn snapshots_pending(&self) -> bool {
        self.inner.templates.pending()
    }

    /// Waits for package layers being uploaded to S3 (L3) in the background. A short-lived
    /// process calls this before exiting, or the upload dies with it.
    pub async fn wait_for_uploads(&self) {
        if let Some(s3) = &self.inner.s3 {
            s3.wait_for_uploads().await;
        }
    }

    /// Whether package layers are being uploaded to S3 in the background.
    pub fn uploads_pending(&self) -> bool {
        self.inner
            .s3
            .as_ref()
            .is_some_and(|s3| s3.uploads_pending())
    }
}

/// Packages and caches.
impl Scheduler {
    /// Readies the package layer of `specs` for `language` ahead of time (validated like a
    /// run's), so the first run with the same set starts as fast as a plain one; with
    /// `snapshot`, also saves the memory snapshot of a VM with that layer (when L1 is on).
    pub async fn prefetch_packages(
        &self,
        language: Language,
        specs: &[String],
        snapshot: bool,
    ) -> Result<PreparedPackages, Error> {
        let requirements = self.requirements(language, specs).await?;
        let assets = self.inner.assets.ensure(&[language]).await?;
        let host = self.host(&assets).await?;
        let ready = self.layer(language, Layer::Packages(requirements)).await?;
        let ReadyPackages::Layer(layer) = &ready else {
            // No specs: nothing to ready.
            return Ok(PreparedPackages {
                source: PackageSource::None,
                install_ms: None,
                resolved: Vec::new(),
                packages: Vec::new(),
                snapshot: false,
            });
        };
        let mut snapshot_ready = false;
        if snapshot {
            let factory = self.factory(&assets, host);
            let spec = VmSpec {
                packages: ready.image(),
                ..factory.spec(language, self.inner.config.default_memory_mb, false, false)
            };
            let warmup = Warmup {
                language,
                modules: ready.warm_modules(),
            };
            snapshot_ready = self.save_template_now(&factory, spec, warmup).await?;
        }
        let show = |pins: &[packages::Pin]| -> Vec<String> {
            match packages::Ecosystem::of(language) {
                Some(ecosystem) => pins
                    .iter()
                    .map(|pin| packages::display_pin(ecosystem, pin))
                    .collect(),
                None => Vec::new(),
            }
        };
        Ok(PreparedPackages {
            source: layer.source,
            install_ms: layer.install_ms,
            resolved: show(&layer.requested),
            packages: show(&layer.closure),
            snapshot: snapshot_ready,
        })
    }

    /// What the local caches hold (L1 memory snapshots, L2 package layers) and where L3 is.
    pub async fn caches(&self) -> CacheReport {
        let config = &self.inner.config;
        let layer_entries = self.inner.packages.entries().await;
        CacheReport {
            snapshots: self
                .inner
                .templates
                .usage()
                .map(|(dir, entries, bytes)| CacheUsage {
                    dir,
                    entries,
                    bytes,
                }),
            layers: CacheUsage {
                dir: config.package_cache_dir.clone(),
                entries: layer_entries.len(),
                bytes: layer_entries.iter().map(|l| l.bytes).sum(),
            },
            layer_entries,
            s3: config
                .s3_bucket
                .as_ref()
                .map(|bucket| format!("s3://{bucket}/{}", config.s3_config().prefix)),
            unused_image_versions: unused(
                config.images_dir.clone(),
                self.inner.assets.other_versions().await,
            ),
            unused_qemu_builds: unused(
                crate::assets::OWN_QEMU_DIR.into(),
                self.inner.own_qemu.unused().await,
            ),
        }
    }

    /// Empties the local snapshot and package layer caches (running VMs keep what they
    /// mapped; a layer being built is kept), and removes guest image versions and QEMU builds
    /// other than the ones this scheduler uses (QEMU's only when running as root). The images
    /// in use stay. A long-running process of another exec-sandbox version that used what was
    /// removed fails its next VM start until restarted.
    pub async fn prune_caches(&self) -> PruneReport {
        let layers = self.inner.packages.prune(0).await;
        let (image_versions, image_bytes) = removed(
            "guest image versions",
            self.inner.assets.prune_other_versions().await,
        );
        let (qemu_builds, qemu_bytes) =
            removed("QEMU builds", self.inner.own_qemu.prune_unused().await);
        PruneReport {
            snapshots: self.inner.templates.prune(),
            layers: layers.len(),
            layer_bytes: layers.iter().map(|(_, bytes)| bytes).sum(),
            image_versions,
            image_bytes,
            qemu_builds,
            qemu_bytes,
        }
    }
}

/// What a listing of unused directories says, as a cache's usage (nothing, logged, when it
/// failed).
fn unused(
    dir: PathBuf,
    listed: Result<(Vec<PathBuf>, u64), crate::assets::AssetError>,
) -> CacheUsage {
    let (entries, bytes) = match listed {
        Ok((dirs, bytes)) => (dirs.len(), bytes),
        Err(e) => {
            tracing::warn!(error = %crate::vm::error_chain(&e), dir = %dir.display(), "cannot list unused directories");
            (0, 0)
        }
    };
    CacheUsage {
        dir,
        entries,
        bytes,
    }
}

/// How many of `what` a prune removed and the bytes that freed (nothing, logged, on failure).
fn removed(what: &str, result: Result<(usize, u64), crate::assets::AssetError>) -> (usize, u64) {
    result.unwrap_or_else(|e| {
        tracing::warn!(error = %crate::vm::error_chain(&e), "cannot remove unused {what}");
        (0, 0)
    })
}

/// The scheduler's VMs: QEMU processes shaped by its configuration, assets and host verdict.
struct QemuFactory<'a> {
    inner: &'a Inner,
    assets: &'a GuestAssets,
    host: &'a Host,
}

impl QemuFactory<'_> {
    fn qemu(&self) -> &Qemu {
        &self.host.qemu
    }
}

/// What a scheduler learns about its host once: the QEMU it runs and the accelerator verdict.
#[derive(Debug)]
struct Host {
    verdict: HostVerdict,
    qemu: Qemu,
}

impl std::ops::Deref for Host {
    type Target = HostVerdict;

    fn deref(&self) -> &HostVerdict {
        &self.verdict
    }
}

impl VmFactory for QemuFactory<'_> {
    type Vm = Vm;

    fn spec(&self, language: Language, memory_mb: u32, verbose_console: bool, nic: bool) -> VmSpec {
        VmSpec {
            // Unique in the process (not per scheduler), so tests can find a VM by name.
            name: crate::vm::unique_name(),
            kernel: self.assets.kernel.clone(),
            initramfs: self.assets.initramfs.clone(),
            rootfs: self.assets.rootfs(language).map(Into::into),
            packages: None,
            memory_mb,
            vcpus: VM_VCPUS,
            accelerator: self.host.choice.accelerator,
            tsc_khz: self.host.tsc_khz,
            verbose_console,
            tmpfs_mb: memory_mb * limits::GUEST_TMPFS_PERCENT / 100,
            qemu_sandbox: true,
            nic,
            cpu_quota_percent: self.inner.config.vm_cpu_quota_percent,
            cpu_background: false,
        }
    }

    fn template_key(&self, language: Language, spec: &VmSpec) -> Option<String> {
        let templates = &self.inner.templates;
        templates
            .enabled()
            .then(|| templates.key(self.qemu(), language, spec, &self.assets.version))
    }

    fn cost(&self, spec: &VmSpec) -> Cost {
        let vm = Cost::vm(spec.memory_mb, spec.vcpus, spec.accelerator);
        if spec.nic { vm.with_gateway() } else { vm }
    }

    async fn restore(
        &self,
        spec: &VmSpec,
        key: &str,
        gateway: Option<Gateway>,
    ) -> Result<Vm, Option<Gateway>> {
        // A copy: the gateway keeps its end of the socket for a cold boot if this fails.
        let nic = gateway.as_ref().and_then(Gateway::qemu_end_copy);
        match self
            .inner
            .templates
            .restore(self.qemu(), spec, key, nic)
            .await
        {
            Some(mut vm) => {
                if let Some(gateway) = gateway {
                    vm.attach_gateway(gateway);
                }
                Ok(vm)
            }
            None => Err(gateway),
        }
    }

    async fn boot(
        &self,
        spec: &VmSpec,
        on_console: Option<OutputCallback>,
        gateway: Option<Gateway>,
    ) -> Result<Vm, VmError> {
        Vm::boot(
            self.qemu(),
            spec,
            boot_deadline(self.host),
            on_console,
            gateway,
        )
        .await
    }

    async fn warm(&self, vm: &Vm, language: Language) -> Result<(), VmError> {
        let elapsed_ms = vm.warm(&language.into(), boot_deadline(self.host)).await?;
        tracing::debug!(vm = %vm.name(), %language, elapsed_ms, "interpreter warm");
        Ok(())
    }

    async fn prime(&self, vm: &Vm, language: Language) -> Result<(), VmError> {
        let started = Instant::now();
        let grace = limits::host_timeout_grace(self.host.choice.accelerator);
        execute::prime(vm.link(), language, execute::Primed::PooledVm, grace).await?;
        tracing::debug!(vm = %vm.name(), %language, elapsed_ms = elapsed_ms(started), "warm VM primed");
        Ok(())
    }

    fn save_template(&self, spec: VmSpec, warmup: Warmup, key: String) {
        let Some(permit) = self.inner.admission.try_admit(self.cost(&spec)) else {
            tracing::debug!(language = %warmup.language, "no budget for a template VM now; the snapshot waits");
            return;
        };
        self.inner.templates.build_in_background(
            self.qemu().clone(),
            spec,
            warmup,
            key,
            boot_deadline(self.host),
            permit,
        );
    }

    async fn prepare(&self, vm: &Vm) -> Result<(), VmError> {
        match &self.inner.ca_bundle {
            Some(pem) if vm.has_outbound_network() => {
                vm.trust_certificates(pem.to_vec(), limits::CA_BUNDLE_DEADLINE)
                    .await
            }
            _ => Ok(()),
        }
    }
}

/// Reads and checks the operator's CA bundle (PEM, at most
/// [`sbx_protocol::MAX_CA_BUNDLE_BYTES`], at least one certificate).
fn read_ca_bundle(path: &Path) -> Result<Vec<u8>, ValidationError> {
    let bad = |reason: String| ValidationError::Config {
        field: "guest_ca_bundle",
        reason: format!("{}: {reason}", path.display()),
    };
    let limit = sbx_protocol::MAX_CA_BUNDLE_BYTES;
    let size = std::fs::metadata(path)
        .map_err(|e| bad(e.to_string()))?
        .len();
    if size > limit as u64 {
        return Err(bad(format!("{size} bytes; the limit is {limit}")));
    }
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    if sbx_protocol::pem_certificate_count(&pem) == 0 {
        return Err(bad("no PEM certificate in it".into()));
    }
    Ok(pem)
}

fn boot_deadline(host: &HostVerdict) -> Duration {
    match host.choice.accelerator {
        accel::Accelerator::Kvm => limits::BOOT_DEADLINE_KVM,
        accel::Accelerator::Tcg => limits::BOOT_DEADLINE_TCG,
    }
}

/// vCPUs of every run's VM. The guest kernel is built uniprocessor (`CONFIG_SMP` off in
/// `images/kernel/config.fragment`): more would need it back.
const VM_VCPUS: u32 = 1;

impl pool::WarmBooter<Vm> for Scheduler {
    async fn boot_warm(&self, language: Language) -> Result<Option<Pooled<Vm>>, Error> {
        let assets = self.inner.assets.ensure(&[language]).await?;
        let host = self.host(&assets).await?;
        let started = Instant::now();
        let warm = acquire::warm_vm(
            &self.factory(&assets, host),
            &self.inner.admission,
            language,
            self.inner.config.default_memory_mb,
        )
        .await?;
        if let Some(warm) = &warm {
            tracing::debug!(vm = %warm.vm.name(), %language, total_ms = elapsed_ms(started), "warm VM ready");
        }
        Ok(warm)
    }
}

/// What a run or session asks of its VM.
pub(crate) struct VmRequest<'a> {
    pub(crate) language: Language,
    pub(crate) memory_mb: u32,
    pub(crate) on_boot_log: Option<&'a OutputCallback>,
    /// When the caller started (for `timing.setup_ms`).
    pub(crate) started: Instant,
    pub(crate) gateway: Option<Gateway>,
    pub(crate) layer: Layer,
    /// Whether a pooled VM is pinged before it is handed out (`acquire::Want::ping_pooled`).
    pub(crate) ping_pooled: bool,
}

/// The package layer asked for.
pub(crate) enum Layer {
    /// The layer of these validated requirements (none when empty).
    Packages(Vec<Requirement>),
    /// This image as is (tests, feature `testing`).
    Image(PathBuf),
}

/// The package layer a VM got.
pub(crate) enum ReadyPackages {
    /// No packages.
    None,
    /// A cached (or just built) layer, kept open for as long as the VM may use it.
    Layer(ReadyLayer),
    /// An image given as is.
    Image(PathBuf),
}

impl ReadyPackages {
    /// The image to attach.
    fn image(&self) -> Option<PathBuf> {
        match self {
            ReadyPackages::None => None,
            ReadyPackages::Layer(layer) => Some(layer.path.clone()),
            ReadyPackages::Image(image) => Some(image.clone()),
        }
    }

    /// What a template of this layer imports before it is saved.
    fn warm_modules(&self) -> Vec<String> {
        match self {
            ReadyPackages::Layer(layer) => layer.warm_modules.clone(),
            ReadyPackages::None | ReadyPackages::Image(_) => Vec::new(),
        }
    }

    /// Where the packages came from and how long their install took.
    pub(crate) fn source(&self) -> (PackageSource, Option<u64>) {
        match self {
            ReadyPackages::Layer(layer) => (layer.source, layer.install_ms),
            ReadyPackages::None | ReadyPackages::Image(_) => (PackageSource::None, None),
        }
    }
}

/// A VM acquired for a run or a session, with what it took to get it.
pub(crate) struct StartedVm {
    pub(crate) vm: Vm,
    pub(crate) origin: VmOrigin,
    pub(crate) accelerator: AcceleratorChoice,
    /// Where the time went until the VM was ready (`setup_ms`, `admission_wait_ms`, `boot_ms`,
    /// `vm_start_ms`, `guest_ready_ms`; the rest is 0).
    pub(crate) timing: Timing,
    /// Its package layer: held (open) for as long as the VM lives.
    pub(crate) packages: ReadyPackages,
    /// The VM's share of the admission budget: dropped after the VM is destroyed.
    pub(crate) permit: Permit,
    /// One of `max_concurrent_vms`: dropped after the VM is destroyed.
    pub(crate) slot: OwnedSemaphorePermit,
}

fn elapsed_ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn invalid_input_is_rejected_before_any_vm() {
        let config = SchedulerConfig {
            // A QEMU that does not exist and no assets: reaching the VM stage would fail
            // with another kind, and would have to create the images directory.
            qemu_binary: Some("/nonexistent/qemu".into()),
            offline: true,
            images_dir: "/nonexistent/images".into(),
            ..SchedulerConfig::default()
        };
        let s = Scheduler::new(config).unwrap();
        for options in [
            RunOptions::new(Language::Python, "  \n"),
            RunOptions::new(Language::Python, "print(1)").timeout_seconds(0),
            RunOptions::new(Language::Python, "print(1)").timeout_seconds(301),
            RunOptions::new(Language::Python, "print(1)").memory_mb(64),
            RunOptions::new(Language::Python, "print(1)").env("LD_PRELOAD", "/x.so"),
            RunOptions::new(Language::Python, "a\0b"),
        ] {
            let err = s.run(options).await.unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidInput, "{err}");
            assert!(matches!(err, Error::Validation(_)), "{err}");
        }
        assert_eq!(s.peak_vms(), 0, "no VM was admitted");
    }

    #[tokio::test]
    async fn package_requests_are_checked_before_any_vm() {
        let offline = || SchedulerConfig {
            qemu_binary: Some("/nonexistent/qemu".into()),
            offline: true,
            images_dir: "/nonexistent/images".into(),
            ..SchedulerConfig::default()
        };
        let s = Scheduler::new(offline()).unwrap();
        let many: Vec<String> = (0..51).map(|i| format!("p{i}==1")).collect();
        for (language, specs) in [
            (Language::Raw, vec!["requests==2.32.3".to_string()]),
            (Language::Python, vec!["requests".to_string()]),
            (
                Language::Python,
                vec!["no-such-package-sbx==1.0".to_string()],
            ),
            (
                Language::Python,
                vec!["pandas @ https://x/p.whl".to_string()],
            ),
            (Language::Javascript, vec!["lodash@latest".to_string()]),
            (Language::Python, many),
        ] {
            let err = s
                .run(RunOptions::new(language, "1").packages(specs.clone()))
                .await
                .unwrap_err();
            assert!(matches!(err, Error::PackageSpec { .. }), "{specs:?}: {err}");
            assert_eq!(err.kind(), crate::ErrorKind::InvalidInput);
            let err = s
                .session(crate::SessionOptions::new(language).packages(specs.clone()))
                .await
                .unwrap_err();
            assert!(matches!(err, Error::PackageSpec { .. }), "{specs:?}: {err}");
        }
        assert_eq!(s.peak_vms(), 0, "no VM was admitted");

        // A bare name: offline, the index is not asked; the hint still says to pin.
        let err = s
            .check_packages(Language::Python, &["requests".into()])
            .await
            .unwrap_err();
        let Error::PackageSpec { newest, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(newest, &None);
        assert!(err.hint().unwrap().contains("requests==VERSION"), "{err:?}");

        // With validation off, a name outside the allowlist passes the checks (and this
        // offline scheduler then fails on its missing assets instead).
        let mut config = offline();
        config.enable_package_validation = false;
        let s = Scheduler::new(config).unwrap();
        s.check_packages(Language::Python, &["no-such-package-sbx==1.0".into()])
            .await
            .unwrap();
        let err = s
            .run(RunOptions::new(Language::Python, "1").packages(["no-such-package-sbx==1.0"]))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Asset(_)), "{err}");
        // The syntax rules hold either way.
        assert!(
            s.check_packages(Language::Python, &["x==1 ; sys_platform".into()])
                .await
                .is_err()
        );
    }
}
