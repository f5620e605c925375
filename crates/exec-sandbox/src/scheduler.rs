//! The entry point: admits runs, readies assets and the accelerator, and drives one VM per run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sbx_protocol::{Event, ExecOutcome, ExecRequest, Language, Request};
use tokio::sync::{OnceCell, OwnedSemaphorePermit, Semaphore};

use crate::SchedulerConfig;
use crate::admission::{self, Admission, CapacityError, Cost, Permit};
use crate::assets::{AssetStore, GuestAssets};
use crate::error::Error;
use crate::gateway::{Gateway, GatewayConfig};
use crate::limits;
use crate::network::NetworkOptions;
use crate::pool::{self, PooledVm, WarmPool};
use crate::result::{ExecutionResult, Timing};
use crate::run::RunOptions;
use crate::validate::{self, ValidationError};
use crate::vm::accel::{self, AcceleratorChoice, HostVerdict, Precheck};
use crate::vm::qemu::VmSpec;
use crate::vm::snapshot::{self, Templates};
use crate::vm::{OutputCallback, Vm, VmError, VmStats, host};
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
    /// Shared with the VMs' owners: a session holds its slot for its whole life.
    slots: Arc<Semaphore>,
    assets: AssetStore,
    host: OnceCell<HostVerdict>,
    admission: Arc<Admission>,
    pool: Arc<WarmPool>,
    pool_task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// L1 memory snapshots.
    templates: Templates,
    /// The operator's extra CA certificates for networked guests, read once.
    ca_bundle: Option<Arc<Vec<u8>>>,
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
    /// A scheduler for `config` (validated here). Nothing is built or booted until needed.
    pub fn new(config: SchedulerConfig) -> Result<Self, Error> {
        config.validate()?;
        let ca_bundle = config
            .guest_ca_bundle
            .as_deref()
            .map(read_ca_bundle)
            .transpose()?
            .map(Arc::new);
        let policy = admission::Policy::new(&config, &admission::ProcHost);
        tracing::debug!(budget = %policy.budget, "admission budget");
        let scheduler = Self {
            inner: Arc::new(Inner {
                slots: Arc::new(Semaphore::new(config.max_concurrent_vms)),
                assets: AssetStore::new(&config),
                host: OnceCell::new(),
                admission: Admission::new(policy, Box::new(admission::ProcHost)),
                pool: Arc::new(WarmPool::new(config.warm_pool_size)),
                pool_task: std::sync::Mutex::new(None),
                templates: Templates::new(config.l1_snapshots.then(|| {
                    snapshot::Cache::new(
                        config.snapshot_cache_dir.clone(),
                        config.snapshot_cache_max_mb.saturating_mul(1024 * 1024),
                    )
                })),
                ca_bundle,
                config,
            }),
        };
        scheduler.ensure_pool_task();
        Ok(scheduler)
    }

    /// Destroys the idle warm VMs and stops refilling the pool; waits until their QEMU
    /// processes are gone. Runs still work afterwards, without the pool.
    pub async fn shutdown(&self) {
        let task = self.inner.pool_task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            task.abort();
            // A VM the task was booting is killed when its future is dropped.
            let _ = task.await;
        }
        for vm in self.inner.pool.close() {
            let PooledVm { vm, permit } = vm;
            vm.destroy().await;
            drop(permit);
        }
        // Memory snapshots being saved are abandoned (their template VMs killed).
        self.inner.templates.abort().await;
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

    /// Names of the idle warm VMs for `language` (QEMU's `-name`), for tests.
    #[doc(hidden)]
    pub fn warm_pool_vm_names(&self, language: Language) -> Vec<String> {
        self.inner.pool.idle_names(language)
    }

    /// Most VMs this scheduler had alive at once (each holds an admission permit from before
    /// QEMU starts until after it is reaped), for tests.
    #[doc(hidden)]
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
        Ok(self.host(&assets).await.choice.clone())
    }

    /// Runs `options.code` in a fresh VM and returns its result.
    ///
    /// Invalid input is rejected before any VM boots. An execution timeout is a result (exit
    /// code -1), not an error.
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
        let gateway = self.gateway(&options.network, allowed_domains)?;
        if let (Some(gateway), Some(on_ports)) = (&gateway, &options.on_ports) {
            on_ports(gateway.exposed_ports());
        }

        let StartedVm {
            vm,
            origin,
            accelerator,
            setup_ms,
            boot_ms,
            permit: _permit,
            slot: _slot,
        } = self
            .start_vm(
                options.language,
                memory_mb,
                options.on_boot_log.as_ref(),
                started,
                gateway,
            )
            .await?;
        let exposed_ports = vm.exposed_ports().to_vec();

        let execute_started = Instant::now();
        let collected = execute_code(
            &vm,
            options.language,
            options.code,
            timeout_seconds,
            options.env_vars,
            options.on_stdout,
            options.on_stderr,
        )
        .await;
        let execute_ms = elapsed_ms(execute_started);
        let network_refusals = vm.take_network_refusals();
        let stats = vm.destroy().await;
        let collected = collected?;

        let mut result = collected.into_result(
            stats,
            Timing {
                setup_ms,
                boot_ms,
                execute_ms,
                total_ms: elapsed_ms(started),
            },
            accelerator,
            origin,
        );
        result.exposed_ports = exposed_ports;
        result.network_refusals = network_refusals;
        Ok(result)
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

    /// Takes a slot, readies the assets and the accelerator verdict, and acquires a VM for
    /// `language` (warm pool, memory snapshot or cold boot). Shared by runs and sessions: the
    /// caller holds the returned slot and permit for as long as the VM lives.
    pub(crate) async fn start_vm(
        &self,
        language: Language,
        memory_mb: u32,
        on_boot_log: Option<&OutputCallback>,
        started: Instant,
        gateway: Option<Gateway>,
    ) -> Result<StartedVm, Error> {
        let config = &self.inner.config;
        self.ensure_pool_task();
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
        let assets = self.inner.assets.ensure(&[language]).await?;
        let host = self.host(&assets).await;
        let setup_ms = elapsed_ms(started);

        let boot_started = Instant::now();
        // Asset preparation does not count against the admission deadline.
        let admission_deadline =
            tokio::time::Instant::now() + admission_timeout.saturating_sub(slot_wait);
        let (vm, origin, permit) = self
            .acquire_vm(
                language,
                on_boot_log,
                memory_mb,
                &assets,
                host,
                admission_deadline,
                gateway,
            )
            .await?;
        let boot_ms = elapsed_ms(boot_started);
        Ok(StartedVm {
            vm,
            origin,
            accelerator: host.choice.clone(),
            setup_ms,
            boot_ms,
            permit,
            slot,
        })
    }

    /// A VM ready to run `options`: from the warm pool when one fits, else restored from a
    /// memory snapshot, else booted cold. The permit is the VM's share of the admission
    /// budget: hold it until the VM is destroyed.
    ///
    /// With a `gateway` the VM gets a NIC whose backend it is: never from the warm pool (pooled
    /// VMs have no NIC), but from the L1 template of the networked shape when there is one (its
    /// guest configured the NIC when the template booted; the clone gets this gateway's socket).
    #[allow(clippy::too_many_arguments)]
    async fn acquire_vm(
        &self,
        language: Language,
        on_boot_log: Option<&OutputCallback>,
        memory_mb: u32,
        assets: &GuestAssets,
        host: &HostVerdict,
        admission_deadline: tokio::time::Instant,
        gateway: Option<Gateway>,
    ) -> Result<(Vm, VmOrigin, Permit), Error> {
        // Warm pool: built at the default memory, without boot-log streaming or NIC.
        if gateway.is_none()
            && memory_mb == self.inner.config.default_memory_mb
            && on_boot_log.is_none()
            && let Some(PooledVm { vm, permit }) = self.inner.pool.take(language).await
        {
            return Ok((vm, VmOrigin::WarmPool, permit));
        }
        let permit = self
            .admit(
                Cost::vm(memory_mb, VM_VCPUS, host.choice.accelerator),
                admission_deadline,
            )
            .await?;
        let mut spec = self.vm_spec(language, memory_mb, assets, host, on_boot_log.is_some());
        spec.nic = gateway.is_some();
        let boot_deadline = boot_deadline(host);
        // L1: a clone of this shape's template. Not with boot-log streaming: a clone prints no
        // boot log.
        let template_key = (self.inner.templates.enabled() && on_boot_log.is_none())
            .then(|| self.template_key(language, &spec, assets));
        if let Some(key) = &template_key {
            let qemu = &self.inner.config.qemu_binary;
            // A copy: the gateway keeps its end of the socket for a cold boot if this fails.
            let nic = gateway.as_ref().and_then(Gateway::qemu_end_copy);
            if let Some(mut vm) = self.inner.templates.restore(qemu, &spec, key, nic).await {
                if let Some(gateway) = gateway {
                    vm.attach_gateway(gateway);
                }
                self.trust_certificates(&vm).await?;
                return Ok((vm, VmOrigin::Snapshot, permit));
            }
        }
        let qemu = &self.inner.config.qemu_binary;
        let vm = match gateway {
            Some(gateway) => {
                Vm::boot_networked(qemu, &spec, boot_deadline, on_boot_log.cloned(), gateway).await
            }
            None => Vm::boot(qemu, &spec, boot_deadline, on_boot_log.cloned()).await,
        }
        .map_err(Error::Boot)?;
        if let Some(key) = template_key {
            // Saved by a separate template VM: this run does not wait for it.
            let mut template_spec = self.vm_spec(language, memory_mb, assets, host, false);
            template_spec.nic = spec.nic;
            self.save_template_in_background(template_spec, language, key, host);
        }
        self.trust_certificates(&vm).await?;
        Ok((vm, VmOrigin::Cold, permit))
    }

    /// Installs the operator's CA bundle in a VM that may open connections (a failure fails
    /// the run before the code is dispatched; dropping the VM destroys it).
    async fn trust_certificates(&self, vm: &Vm) -> Result<(), Error> {
        match &self.inner.ca_bundle {
            Some(pem) if vm.has_outbound_network() => vm
                .trust_certificates(pem.to_vec(), limits::CA_BUNDLE_DEADLINE)
                .await
                .map_err(Error::Boot),
            _ => Ok(()),
        }
    }

    /// Saves a memory snapshot with a template VM of its own, in the background, when the
    /// admission budget has room for that VM now; otherwise a later cold boot tries again.
    fn save_template_in_background(
        &self,
        spec: VmSpec,
        language: Language,
        key: String,
        host: &HostVerdict,
    ) {
        let cost = Cost::vm(spec.memory_mb, spec.vcpus, host.choice.accelerator);
        let Some(permit) = self.inner.admission.try_admit(cost) else {
            tracing::debug!(%language, "no budget for a template VM now; the snapshot waits");
            return;
        };
        self.inner.templates.build_in_background(
            self.inner.config.qemu_binary.clone(),
            spec,
            language,
            key,
            boot_deadline(host),
            permit,
        );
    }

    /// Waits for room in the budget. Idle warm VMs give way to a run that would otherwise queue
    /// on the budget: the pool refills later, when nobody waits.
    async fn admit(&self, cost: Cost, deadline: tokio::time::Instant) -> Result<Permit, Error> {
        let admission = &self.inner.admission;
        let _announced = admission.announce();
        while admission.budget_is_short(cost) && self.inner.pool.evict_one().await {}
        Ok(admission.admit(cost, deadline).await?)
    }

    /// The VM shape for a language and memory size on this host.
    fn vm_spec(
        &self,
        language: Language,
        memory_mb: u32,
        assets: &GuestAssets,
        host: &HostVerdict,
        verbose_console: bool,
    ) -> VmSpec {
        VmSpec {
            // Unique in the process (not per scheduler), so tests can find a VM by name.
            name: format!(
                "sbx-{}-{}",
                std::process::id(),
                VM_COUNTER.fetch_add(1, Ordering::Relaxed)
            ),
            kernel: assets.kernel.clone(),
            initramfs: assets.initramfs.clone(),
            rootfs: assets.rootfs(language).map(Into::into),
            memory_mb,
            vcpus: VM_VCPUS,
            accelerator: host.choice.accelerator,
            tsc_khz: host.tsc_khz,
            verbose_console,
            tmpfs_mb: memory_mb * limits::GUEST_TMPFS_PERCENT / 100,
            qemu_sandbox: true,
            nic: false,
        }
    }

    /// The accelerator verdict for this host: remembered, or decided now (with a probe boot).
    async fn host(&self, assets: &GuestAssets) -> &HostVerdict {
        self.inner
            .host
            .get_or_init(|| decide_host(&self.inner.config, assets))
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
        let host = self.host(&assets).await;
        let mut ready = Vec::new();
        for language in Language::ALL {
            let spec = self.vm_spec(
                language,
                self.inner.config.default_memory_mb,
                &assets,
                host,
                false,
            );
            let key = self.template_key(language, &spec, &assets);
            // The template VM takes its share of the budget like any other VM.
            let cost = Cost::vm(spec.memory_mb, spec.vcpus, host.choice.accelerator);
            let deadline = tokio::time::Instant::now()
                + Duration::from_secs(self.inner.config.admission_timeout_seconds);
            let _permit = self.admit(cost, deadline).await?;
            let built = self
                .inner
                .templates
                .ensure(
                    &self.inner.config.qemu_binary,
                    &spec,
                    language,
                    &key,
                    boot_deadline(host),
                )
                .await;
            match built {
                Ok(true) => ready.push(language),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(%language, error = %crate::vm::error_chain(&e), "cannot save a memory snapshot");
                }
            }
        }
        Ok(ready)
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

    fn template_key(&self, language: Language, spec: &VmSpec, assets: &GuestAssets) -> String {
        self.inner.templates.key(
            &self.inner.config.qemu_binary,
            language,
            spec,
            &assets.version,
        )
    }
}

/// Reads and checks the operator's CA bundle (PEM, at most
/// [`sbx_protocol::MAX_CA_BUNDLE_BYTES`], at least one certificate).
fn read_ca_bundle(path: &std::path::Path) -> Result<Vec<u8>, ValidationError> {
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

async fn decide_host(config: &SchedulerConfig, assets: &GuestAssets) -> HostVerdict {
    let precheck = accel::precheck(config.force_emulation, &accel::RealHost);
    let fingerprint = host::fingerprint(&config.qemu_binary);
    let path = accel::verdict_path(&config.cache_dir, &fingerprint);
    let choice = match precheck {
        Precheck::Decided(choice) => choice,
        Precheck::NeedsProbe => match accel::load_verdict(&path) {
            Some(remembered) => {
                tracing::debug!(accelerator = %remembered.choice.accelerator, reason = %remembered.choice.reason, "accelerator (remembered for this host)");
                return remembered;
            }
            None => {
                tracing::info!("probing KVM with a test boot");
                accel::verdict(probe_kvm(config, assets).await)
            }
        },
    };
    let verdict = HostVerdict {
        choice,
        tsc_khz: tokio::task::spawn_blocking(host::measure_tsc_khz)
            .await
            .ok()
            .flatten(),
    };
    if let Err(e) = accel::store_verdict(&path, &verdict) {
        tracing::warn!(path = %path.display(), error = %e, "cannot remember the accelerator verdict");
    }
    tracing::info!(accelerator = %verdict.choice.accelerator, reason = %verdict.choice.reason, "accelerator");
    verdict
}

/// Boots the kernel and agent (no disk) under KVM and waits for the agent's hello.
async fn probe_kvm(config: &SchedulerConfig, assets: &GuestAssets) -> Result<Duration, String> {
    let spec = VmSpec {
        name: format!("sbx-kvm-probe-{}", std::process::id()),
        kernel: assets.kernel.clone(),
        initramfs: assets.initramfs.clone(),
        rootfs: None,
        memory_mb: limits::MIN_MEMORY_MB,
        vcpus: 1,
        accelerator: accel::Accelerator::Kvm,
        tsc_khz: None,
        verbose_console: false,
        tmpfs_mb: 16,
        qemu_sandbox: true,
        nic: false,
    };
    let started = Instant::now();
    match Vm::boot(&config.qemu_binary, &spec, limits::KVM_PROBE_DEADLINE, None).await {
        Ok(vm) => {
            let elapsed = started.elapsed();
            vm.destroy().await;
            Ok(elapsed)
        }
        Err(VmError::BootTimeout { after, .. }) => Err(format!(
            "the guest did not reach its agent within {} s",
            after.as_secs()
        )),
        Err(VmError::ExitedDuringBoot {
            status, log_tail, ..
        }) => Err(format!(
            "QEMU exited during the probe boot ({status}): {}",
            log_tail.lines().last().unwrap_or("")
        )),
        Err(other) => Err(other.to_string()),
    }
}

/// vCPUs of every run's VM.
const VM_VCPUS: u32 = 1;

/// Numbers VM names.
static VM_COUNTER: AtomicU64 = AtomicU64::new(0);

impl pool::WarmBooter<Vm> for Scheduler {
    async fn boot_warm(&self, language: Language) -> Result<Option<PooledVm>, Error> {
        let assets = self.inner.assets.ensure(&[language]).await?;
        let host = self.host(&assets).await;
        let memory_mb = self.inner.config.default_memory_mb;
        let Some(permit) =
            self.inner
                .admission
                .try_admit(Cost::vm(memory_mb, VM_VCPUS, host.choice.accelerator))
        else {
            return Ok(None);
        };
        let spec = self.vm_spec(language, memory_mb, &assets, host, false);
        let deadline = boot_deadline(host);
        let started = Instant::now();
        let qemu = &self.inner.config.qemu_binary;
        // An L1 clone where a template exists: its interpreter is warm already, it is ready in
        // tens of milliseconds, and idle it shares the template's pages.
        let template_key = self
            .inner
            .templates
            .enabled()
            .then(|| self.template_key(language, &spec, &assets));
        if let Some(key) = &template_key
            && let Some(vm) = self.inner.templates.restore(qemu, &spec, key, None).await
        {
            tracing::debug!(vm = %vm.name(), %language, total_ms = elapsed_ms(started), "warm VM restored");
            return Ok(Some(PooledVm { vm, permit }));
        }
        let vm = Vm::boot(qemu, &spec, deadline, None)
            .await
            .map_err(Error::Boot)?;
        let warm_ms = pool::warm_up(&vm, language, deadline).await?;
        tracing::debug!(vm = %vm.name(), %language, warm_ms, total_ms = elapsed_ms(started), "warm VM ready");
        if let Some(key) = template_key {
            // Later refills restore instead of booting.
            let template_spec = self.vm_spec(language, memory_mb, &assets, host, false);
            self.save_template_in_background(template_spec, language, key, host);
        }
        Ok(Some(PooledVm { vm, permit }))
    }
}

/// Where the VM of a run came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VmOrigin {
    /// Booted for this run.
    Cold,
    /// Taken from the warm pool.
    WarmPool,
    /// Restored from an L1 memory snapshot.
    Snapshot,
}

#[derive(Default)]
struct Capped {
    bytes: Vec<u8>,
    truncated: bool,
}

impl Capped {
    /// Keeps what fits under `limit` (the host re-checks the guest's enforcement) and forwards
    /// the kept part to the callback.
    fn accept(&mut self, chunk: &[u8], limit: u64, callback: Option<&OutputCallback>) {
        let room = usize::try_from(limit)
            .unwrap_or(usize::MAX)
            .saturating_sub(self.bytes.len());
        let kept = &chunk[..chunk.len().min(room)];
        if kept.len() < chunk.len() {
            self.truncated = true;
        }
        if kept.is_empty() {
            return;
        }
        self.bytes.extend_from_slice(kept);
        if let Some(cb) = callback {
            cb(kept);
        }
    }
}

/// A VM acquired for a run or a session, with what it took to get it.
pub(crate) struct StartedVm {
    pub(crate) vm: Vm,
    pub(crate) origin: VmOrigin,
    pub(crate) accelerator: AcceleratorChoice,
    pub(crate) setup_ms: u64,
    pub(crate) boot_ms: u64,
    /// The VM's share of the admission budget: dropped after the VM is destroyed.
    pub(crate) permit: Permit,
    /// One of `max_concurrent_vms`: dropped after the VM is destroyed.
    pub(crate) slot: OwnedSemaphorePermit,
}

/// What one execution produced, before it becomes an [`ExecutionResult`].
pub(crate) struct Collected {
    stdout: Capped,
    stderr: Capped,
    outcome: ExecOutcome,
    guest_reported: bool,
}

impl Collected {
    /// The exit code the program ended with (-1 on a timeout).
    pub(crate) fn exit_code(&self) -> i32 {
        self.outcome.exit_code
    }

    /// False when the host's own deadline fired: the guest stopped answering.
    pub(crate) fn guest_reported(&self) -> bool {
        self.guest_reported
    }

    pub(crate) fn into_result(
        self,
        stats: VmStats,
        timing: Timing,
        accelerator: AcceleratorChoice,
        origin: VmOrigin,
    ) -> ExecutionResult {
        ExecutionResult {
            stdout: String::from_utf8_lossy(&self.stdout.bytes).into_owned(),
            stderr: String::from_utf8_lossy(&self.stderr.bytes).into_owned(),
            exit_code: self.outcome.exit_code,
            timed_out: self.outcome.timed_out,
            stdout_truncated: self.outcome.stdout_truncated || self.stdout.truncated,
            stderr_truncated: self.outcome.stderr_truncated || self.stderr.truncated,
            execution_time_ms: self
                .guest_reported
                .then_some(self.outcome.execution_time_ms),
            external_cpu_time_ms: stats.cpu_time_ms,
            external_memory_peak_mb: stats.memory_peak_mb,
            timing,
            accelerator,
            warm_pool_hit: origin == VmOrigin::WarmPool,
            l1_cache_hit: origin == VmOrigin::Snapshot,
            exposed_ports: Vec::new(),
            network_refusals: Vec::new(),
        }
    }
}

/// Runs `code` (already validated) in `vm`'s interpreter for `language`, with the host's own
/// deadline a grace period past the timeout.
pub(crate) async fn execute_code(
    vm: &Vm,
    language: Language,
    code: String,
    timeout_seconds: u64,
    env: Vec<(String, String)>,
    on_stdout: Option<OutputCallback>,
    on_stderr: Option<OutputCallback>,
) -> Result<Collected, Error> {
    let request = ExecRequest {
        language,
        code,
        timeout_ms: timeout_seconds * 1000,
        env,
        stdout_limit: limits::MAX_STDOUT_BYTES,
        stderr_limit: limits::MAX_STDERR_BYTES,
    };
    execute(
        vm,
        request,
        on_stdout,
        on_stderr,
        Duration::from_secs(timeout_seconds) + limits::HOST_TIMEOUT_GRACE,
    )
    .await
}

/// Dispatches the code and gathers output until the guest reports completion or the host's own
/// deadline passes (then the guest is not trusted any more: the VM is killed by the caller).
async fn execute(
    vm: &Vm,
    request: ExecRequest,
    on_stdout: Option<OutputCallback>,
    on_stderr: Option<OutputCallback>,
    host_deadline: Duration,
) -> Result<Collected, Error> {
    let timeout_seconds = request.timeout_ms / 1000;
    let mut subscription = vm
        .channel()
        .request(&Request::Exec(request))
        .await
        .map_err(|source| {
            Error::Boot(VmError::Channel {
                name: vm.name().to_string(),
                source,
            })
        })?;
    let mut stdout = Capped::default();
    let mut stderr = Capped::default();
    let deadline = tokio::time::Instant::now() + host_deadline;
    loop {
        let event = match tokio::time::timeout_at(deadline, subscription.recv()).await {
            Ok(Some(event)) => event,
            Ok(None) => {
                return Err(Error::Communication(VmError::Channel {
                    name: vm.name().to_string(),
                    source: crate::vm::ChannelError::Closed,
                }));
            }
            Err(_elapsed) => {
                let note = format!(
                    "\nExecution timed out after {timeout_seconds} s (enforced by the host: the guest stopped responding)\n"
                );
                stderr.accept(
                    note.as_bytes(),
                    limits::MAX_STDERR_BYTES + note.len() as u64,
                    on_stderr.as_ref(),
                );
                return Ok(Collected {
                    stdout,
                    stderr,
                    outcome: ExecOutcome {
                        exit_code: -1,
                        timed_out: true,
                        stdout_truncated: false,
                        stderr_truncated: false,
                        execution_time_ms: host_deadline.as_millis() as u64,
                        interpreter_start_ms: 0,
                    },
                    guest_reported: false,
                });
            }
        };
        match event {
            Event::Stdout(chunk) => {
                stdout.accept(&chunk, limits::MAX_STDOUT_BYTES, on_stdout.as_ref())
            }
            // Room for the agent's timeout note past the cap.
            Event::Stderr(chunk) => {
                stderr.accept(&chunk, limits::MAX_STDERR_BYTES + 256, on_stderr.as_ref())
            }
            Event::ExecDone(outcome) => {
                return Ok(Collected {
                    stdout,
                    stderr,
                    outcome,
                    guest_reported: true,
                });
            }
            Event::Error(e) => {
                return Err(Error::Guest {
                    kind: e.kind,
                    message: e.message,
                });
            }
            other => tracing::debug!(?other, "unexpected event during exec"),
        }
    }
}

fn elapsed_ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_output_keeps_the_limit_and_reports_truncation() {
        let mut c = Capped::default();
        let seen = Arc::new(std::sync::Mutex::new(0usize));
        let seen2 = seen.clone();
        let cb: OutputCallback = Arc::new(move |b: &[u8]| *seen2.lock().unwrap() += b.len());
        c.accept(b"hello", 8, Some(&cb));
        assert!(!c.truncated);
        c.accept(b"world", 8, Some(&cb));
        assert_eq!(c.bytes, b"hellowor");
        assert!(c.truncated);
        c.accept(b"more", 8, Some(&cb));
        assert_eq!(*seen.lock().unwrap(), 8);
    }

    #[tokio::test]
    async fn invalid_input_is_rejected_before_any_vm() {
        let config = SchedulerConfig {
            // A QEMU that does not exist: reaching the VM stage would fail differently.
            qemu_binary: "/nonexistent/qemu".into(),
            offline: true,
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
            let started = Instant::now();
            let err = s.run(options).await.unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidInput, "{err}");
            assert!(started.elapsed() < Duration::from_secs(1));
        }
    }
}
