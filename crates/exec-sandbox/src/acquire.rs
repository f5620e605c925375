//! Where the VM of a run or session comes from: the warm pool, an L1 memory snapshot, or a cold
//! boot, and the rules that choose between them.
//!
//! - The warm pool serves only VMs of its own shape: the default memory size, no boot-log
//!   streaming (a pooled VM booted long ago), no NIC and no package layer (pooled VMs have
//!   neither).
//! - Otherwise the VM is admitted against the budget (idle warm VMs give way first), then
//!   restored from the template of its shape when L1 is on and no boot log is streamed (a clone
//!   prints none); a networked clone gets the run's gateway behind its NIC.
//! - Otherwise it boots cold, and a template of its shape is saved in the background so later
//!   runs restore.
//! - A networked VM that may open connections trusts the operator's CA bundle before it is
//!   handed out.
//!
//! VM creation sits behind [`VmFactory`], so these rules unit-test with a fake factory; the
//! scheduler's factory starts QEMU.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sbx_protocol::Language;

use crate::admission::{Admission, Cost, Permit};
use crate::error::Error;
use crate::execute::VmOrigin;
use crate::gateway::Gateway;
use crate::pool::{Pooled, WarmPool};
use crate::vm::migration::Warmup;
use crate::vm::qemu::VmSpec;
use crate::vm::{OutputCallback, StartPhases, VmError, VmHandle};

/// Makes VMs: the seam between the acquisition rules and QEMU.
pub(crate) trait VmFactory: Send + Sync {
    /// The VMs it makes.
    type Vm: VmHandle;

    /// The shape of a VM for `language` (a fresh name each call).
    fn spec(&self, language: Language, memory_mb: u32, verbose_console: bool, nic: bool) -> VmSpec;

    /// The L1 key of the template shaped like `spec`, or `None` when L1 is off.
    fn template_key(&self, language: Language, spec: &VmSpec) -> Option<String>;

    /// What a VM shaped like `spec` is charged against the admission budget.
    fn cost(&self, spec: &VmSpec) -> Cost;

    /// A clone of `key`'s template with `gateway` behind its NIC, or the gateway back when
    /// there is no clone (no template, or the restore failed).
    fn restore(
        &self,
        spec: &VmSpec,
        key: &str,
        gateway: Option<Gateway>,
    ) -> impl Future<Output = Result<Self::Vm, Option<Gateway>>> + Send;

    /// Boots a VM shaped like `spec`, its console to `on_console`, `gateway` behind its NIC.
    fn boot(
        &self,
        spec: &VmSpec,
        on_console: Option<OutputCallback>,
        gateway: Option<Gateway>,
    ) -> impl Future<Output = Result<Self::Vm, VmError>> + Send;

    /// Starts `language`'s interpreter in a freshly booted VM and waits until it is warm.
    fn warm(
        &self,
        vm: &Self::Vm,
        language: Language,
    ) -> impl Future<Output = Result<(), VmError>> + Send;

    /// Runs a pooled VM's first execution ahead of its run ([`crate::execute::prime`]).
    fn prime(
        &self,
        vm: &Self::Vm,
        language: Language,
    ) -> impl Future<Output = Result<(), VmError>> + Send;

    /// Saves the template `key` shaped like `spec`, warmed as `warmup` says, in the
    /// background, when the budget has room for its VM now (otherwise a later cold boot tries
    /// again).
    fn save_template(&self, spec: VmSpec, warmup: Warmup, key: String);

    /// Readies an acquired VM for the caller's code (the operator's CA bundle, in a VM that
    /// may open connections).
    fn prepare(&self, vm: &Self::Vm) -> impl Future<Output = Result<(), VmError>> + Send;
}

/// What a run or session asks of its VM.
pub(crate) struct Want<'a> {
    /// The interpreter.
    pub language: Language,
    /// Guest memory.
    pub memory_mb: u32,
    /// The memory size pooled VMs have (the scheduler's default).
    pub pooled_memory_mb: u32,
    /// Streams the boot log: the VM must boot now.
    pub on_boot_log: Option<&'a OutputCallback>,
    /// The gateway behind the VM's NIC; none: no NIC.
    pub gateway: Option<Gateway>,
    /// The package layer attached as the VM's second disk; it is part of the template's key.
    pub packages: Option<PathBuf>,
    /// Modules the template of this shape imports before it is saved (the package set's).
    pub warm_modules: Vec<String>,
    /// When waiting for the admission budget gives up.
    pub admission_deadline: tokio::time::Instant,
    /// Whether a pooled VM is pinged before it is handed out; a run's execution pings it
    /// itself, ahead of the code ([`crate::execute::Execution::ping_first`]).
    pub ping_pooled: bool,
}

impl Want<'_> {
    /// Whether a pooled VM fits: the pool's shape exactly.
    fn pool_fits(&self) -> bool {
        self.gateway.is_none()
            && self.packages.is_none()
            && self.memory_mb == self.pooled_memory_mb
            && self.on_boot_log.is_none()
    }
}

/// A VM for one run or session, and its share of the budget (hold it until the VM is gone).
pub(crate) struct Acquired<V> {
    /// The VM.
    pub vm: V,
    /// Where it came from.
    pub origin: VmOrigin,
    /// Its admission permit.
    pub permit: Permit,
    /// How long it waited for room in the budget.
    pub admission_wait: Duration,
    /// How long it took to start, preparation included (for a pooled VM, which started before
    /// it was asked for, only taking it, and the check that it still answers if it was pinged).
    pub phases: StartPhases,
}

/// A VM for `want`: from the pool when one fits, else restored from its shape's template, else
/// booted cold (saving that template in the background).
pub(crate) async fn acquire<F: VmFactory>(
    factory: &F,
    pool: &WarmPool<F::Vm>,
    admission: &Arc<Admission>,
    want: Want<'_>,
) -> Result<Acquired<F::Vm>, Error> {
    let taking = Instant::now();
    if want.pool_fits()
        && let Some(Pooled { vm, permit }) = pool.take(want.language, want.ping_pooled).await
    {
        return Ok(Acquired {
            vm,
            origin: VmOrigin::WarmPool,
            permit,
            admission_wait: Duration::ZERO,
            // Started before it was asked for; only taking it (and a ping) is left.
            phases: StartPhases {
                vm_start: Duration::ZERO,
                guest_ready: taking.elapsed(),
            },
        });
    }
    let Want {
        language,
        memory_mb,
        on_boot_log,
        mut gateway,
        packages,
        warm_modules,
        admission_deadline,
        ..
    } = want;
    let spec = VmSpec {
        packages,
        ..factory.spec(
            language,
            memory_mb,
            on_boot_log.is_some(),
            gateway.is_some(),
        )
    };
    let queued = Instant::now();
    let permit = admit(pool, admission, factory.cost(&spec), admission_deadline).await?;
    let admitted = Admitted {
        permit,
        wait: queued.elapsed(),
    };
    // A clone prints no boot log: streaming one means booting.
    let key = match on_boot_log {
        None => factory.template_key(language, &spec),
        Some(_) => None,
    };
    if let Some(key) = &key {
        match factory.restore(&spec, key, gateway).await {
            Ok(vm) => return ready(factory, vm, VmOrigin::Snapshot, admitted).await,
            Err(returned) => gateway = returned,
        }
    }
    let vm = factory
        .boot(&spec, on_boot_log.cloned(), gateway)
        .await
        .map_err(Error::Boot)?;
    if let Some(key) = key {
        factory.save_template(
            spec,
            Warmup {
                language,
                modules: warm_modules,
            },
            key,
        );
    }
    ready(factory, vm, VmOrigin::Cold, admitted).await
}

/// An admitted VM's permit, and how long it waited for it.
struct Admitted {
    permit: Permit,
    wait: Duration,
}

/// Prepares an acquired VM; one that cannot be prepared is destroyed, not handed out.
async fn ready<F: VmFactory>(
    factory: &F,
    vm: F::Vm,
    origin: VmOrigin,
    admitted: Admitted,
) -> Result<Acquired<F::Vm>, Error> {
    let preparing = Instant::now();
    if let Err(e) = factory.prepare(&vm).await {
        vm.destroy().await;
        return Err(Error::Boot(e));
    }
    let mut phases = vm.start_phases();
    phases.guest_ready += preparing.elapsed();
    Ok(Acquired {
        vm,
        origin,
        permit: admitted.permit,
        admission_wait: admitted.wait,
        phases,
    })
}

/// Waits for room in the budget. Idle warm VMs give way to a VM that would otherwise queue on
/// the budget: the pool refills later, when nobody waits.
pub(crate) async fn admit<V: crate::pool::PoolVm>(
    pool: &WarmPool<V>,
    admission: &Arc<Admission>,
    cost: Cost,
    deadline: tokio::time::Instant,
) -> Result<Permit, Error> {
    let _announced = admission.announce();
    while admission.budget_is_short(cost) && pool.evict_one().await {}
    Ok(admission.admit(cost, deadline).await?)
}

/// A warm VM for the pool: restored from its shape's template (its interpreter warm already),
/// else booted and warmed (saving the template in the background). `Ok(None)` when the budget
/// has no room right now: refills never wait for, or queue ahead of, runs.
pub(crate) async fn warm_vm<F: VmFactory>(
    factory: &F,
    admission: &Arc<Admission>,
    language: Language,
    memory_mb: u32,
) -> Result<Option<Pooled<F::Vm>>, Error> {
    let mut spec = factory.spec(language, memory_mb, false, false);
    // Nobody waits for it until a run takes it.
    spec.cpu_background = true;
    let Some(permit) = admission.try_admit(factory.cost(&spec)) else {
        return Ok(None);
    };
    let key = factory.template_key(language, &spec);
    if let Some(key) = &key
        && let Ok(vm) = factory.restore(&spec, key, None).await
    {
        match factory.prime(&vm, language).await {
            Ok(()) => return Ok(Some(Pooled { vm, permit })),
            Err(e) => {
                // Booting afresh is what a failed restore does too.
                tracing::warn!(vm = %vm.name(), error = %crate::vm::error_chain(&e), "restored warm VM failed its first execution: booting one instead");
                vm.destroy().await;
            }
        }
    }
    let vm = factory.boot(&spec, None, None).await.map_err(Error::Boot)?;
    if let Err(e) = factory.warm(&vm, language).await {
        vm.destroy().await;
        return Err(Error::Boot(e));
    }
    // The template is saved from a VM of its own, warmed but never primed: a primed
    // interpreter has run code.
    if let Some(key) = key {
        factory.save_template(spec, language.into(), key);
    }
    if let Err(e) = factory.prime(&vm, language).await {
        vm.destroy().await;
        return Err(Error::Boot(e));
    }
    Ok(Some(Pooled { vm, permit }))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::vm::accel::Accelerator;
    use crate::vm::fake::{Destroyed, FakeVm, healthy};
    use crate::vm::tests::unbootable_spec;
    use crate::{ErrorKind, gateway::GatewayConfig};

    const DEFAULT_MB: u32 = 256;

    fn admission(vms: u64) -> Arc<Admission> {
        crate::admission::with_budget(Cost {
            memory_mb: 350 * vms,
            cpu_milli: 100_000,
        })
    }

    /// What the fake factory was asked to do.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Call {
        Restore {
            key: String,
            nic: bool,
        },
        Boot {
            verbose: bool,
            nic: bool,
            memory_mb: u32,
        },
        Warm,
        Prime,
        Save {
            key: String,
        },
        Prepare,
    }

    #[derive(Default)]
    struct Factory {
        l1: bool,
        template_exists: bool,
        boot_fails: bool,
        prepare_fails: bool,
        prime_fails: bool,
        calls: Mutex<Vec<Call>>,
        /// The package layer of each VM booted.
        booted_layers: Mutex<Vec<Option<PathBuf>>>,
        /// `cpu_background` of each VM restored or booted.
        backgrounds: Mutex<Vec<bool>>,
        destroyed: Destroyed,
    }

    impl Factory {
        fn calls(&self) -> Vec<Call> {
            self.calls.lock().unwrap().clone()
        }

        fn record(&self, call: Call) {
            self.calls.lock().unwrap().push(call);
        }

        fn vm(&self, name: &str) -> FakeVm {
            FakeVm::new(name, healthy(), &self.destroyed)
        }
    }

    impl VmFactory for Factory {
        type Vm = FakeVm;

        fn spec(&self, _: Language, memory_mb: u32, verbose: bool, nic: bool) -> VmSpec {
            VmSpec {
                memory_mb,
                verbose_console: verbose,
                nic,
                ..unbootable_spec()
            }
        }

        fn template_key(&self, language: Language, spec: &VmSpec) -> Option<String> {
            let layer = spec
                .packages
                .as_ref()
                .map(|p| format!("-{}", p.display()))
                .unwrap_or_default();
            self.l1
                .then(|| format!("{language}-{}-{}{layer}", spec.memory_mb, spec.nic))
        }

        fn cost(&self, spec: &VmSpec) -> Cost {
            Cost::vm(spec.memory_mb, 1, Accelerator::Tcg)
        }

        async fn restore(
            &self,
            spec: &VmSpec,
            key: &str,
            gateway: Option<Gateway>,
        ) -> Result<FakeVm, Option<Gateway>> {
            self.record(Call::Restore {
                key: key.into(),
                nic: gateway.is_some(),
            });
            self.backgrounds.lock().unwrap().push(spec.cpu_background);
            assert_eq!(spec.nic, gateway.is_some());
            if self.template_exists {
                Ok(self.vm("clone"))
            } else {
                Err(gateway)
            }
        }

        async fn boot(
            &self,
            spec: &VmSpec,
            on_console: Option<OutputCallback>,
            gateway: Option<Gateway>,
        ) -> Result<FakeVm, VmError> {
            assert_eq!(spec.verbose_console, on_console.is_some());
            self.record(Call::Boot {
                verbose: spec.verbose_console,
                nic: gateway.is_some(),
                memory_mb: spec.memory_mb,
            });
            self.booted_layers
                .lock()
                .unwrap()
                .push(spec.packages.clone());
            self.backgrounds.lock().unwrap().push(spec.cpu_background);
            if self.boot_fails {
                return Err(VmError::BootTimeout {
                    name: spec.name.clone(),
                    after: Duration::from_secs(30),
                    log_tail: String::new(),
                });
            }
            Ok(self.vm("booted"))
        }

        async fn warm(&self, _: &FakeVm, _: Language) -> Result<(), VmError> {
            self.record(Call::Warm);
            Ok(())
        }

        async fn prime(&self, vm: &FakeVm, _: Language) -> Result<(), VmError> {
            self.record(Call::Prime);
            if self.prime_fails {
                return Err(VmError::Prime {
                    name: vm.name().into(),
                    reason: "exit code 1".into(),
                });
            }
            Ok(())
        }

        fn save_template(&self, _: VmSpec, _: Warmup, key: String) {
            self.record(Call::Save { key });
        }

        async fn prepare(&self, vm: &FakeVm) -> Result<(), VmError> {
            self.record(Call::Prepare);
            if self.prepare_fails {
                return Err(VmError::NotATemplate {
                    name: vm.name().into(),
                });
            }
            Ok(())
        }
    }

    /// A warm VM booted (no template to restore), warmed, its template saved, then primed.
    fn booted_warmed_saved_primed(key: &str) -> [Call; 4] {
        [
            Call::Boot {
                verbose: false,
                nic: false,
                memory_mb: DEFAULT_MB,
            },
            Call::Warm,
            Call::Save { key: key.into() },
            Call::Prime,
        ]
    }

    fn want(memory_mb: u32) -> Want<'static> {
        Want {
            language: Language::Python,
            memory_mb,
            pooled_memory_mb: DEFAULT_MB,
            on_boot_log: None,
            gateway: None,
            packages: None,
            warm_modules: Vec::new(),
            admission_deadline: tokio::time::Instant::now() + Duration::from_secs(60),
            ping_pooled: true,
        }
    }

    fn gateway() -> Gateway {
        Gateway::start(GatewayConfig::closed()).unwrap()
    }

    /// A pool holding one warm Python VM.
    async fn pool_with_one(factory: &Factory, admission: &Arc<Admission>) -> WarmPool<FakeVm> {
        let pool = WarmPool::new(1);
        let permit = admission.try_admit(Cost::vm(DEFAULT_MB, 1, Accelerator::Tcg));
        pool.put_for_test(
            Language::Python,
            Pooled {
                vm: factory.vm("pooled"),
                permit: permit.unwrap(),
            },
        );
        pool
    }

    #[tokio::test(start_paused = true)]
    async fn a_pooled_vm_serves_a_run_of_the_pools_shape() {
        let factory = Factory {
            l1: true,
            ..Factory::default()
        };
        let admission = admission(4);
        let pool = pool_with_one(&factory, &admission).await;
        let got = acquire(&factory, &pool, &admission, want(DEFAULT_MB))
            .await
            .unwrap();
        assert_eq!(got.origin, VmOrigin::WarmPool);
        assert_eq!(got.vm.name(), "pooled");
        assert!(got.vm.in_foreground(), "a run waits for it now");
        assert!(factory.calls().is_empty(), "{:?}", factory.calls());
    }

    #[tokio::test(start_paused = true)]
    async fn the_pool_is_skipped_for_other_memory_a_boot_log_or_a_nic() {
        let log: OutputCallback = Arc::new(|_: &[u8]| {});
        for case in 0..4 {
            let factory = Factory::default();
            let admission = admission(4);
            let pool = pool_with_one(&factory, &admission).await;
            let mut w = want(DEFAULT_MB);
            match case {
                0 => w.memory_mb = 512,
                1 => w.on_boot_log = Some(&log),
                2 => w.packages = Some("/l/a.erofs".into()),
                _ => w.gateway = Some(gateway()),
            }
            let got = acquire(&factory, &pool, &admission, w).await.unwrap();
            assert_eq!(got.origin, VmOrigin::Cold, "case {case}");
            assert_eq!(got.vm.name(), "booted");
            assert!(
                pool.take(Language::Python, true).await.is_some(),
                "case {case}: the pooled VM is still there"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_package_layer_goes_to_the_vm_and_its_template() {
        let factory = Factory {
            l1: true,
            ..Factory::default()
        };
        let admission = admission(4);
        let pool = pool_with_one(&factory, &admission).await;
        let mut w = want(DEFAULT_MB);
        w.packages = Some("/l/a.erofs".into());
        let got = acquire(&factory, &pool, &admission, w).await.unwrap();
        assert_eq!(got.origin, VmOrigin::Cold, "never a pooled VM");
        assert_eq!(
            *factory.backgrounds.lock().unwrap(),
            [false, false],
            "a run waits for its VM"
        );
        let key = "python-256-false-/l/a.erofs".to_string();
        assert_eq!(
            factory.calls(),
            [
                Call::Restore {
                    key: key.clone(),
                    nic: false
                },
                Call::Boot {
                    verbose: false,
                    nic: false,
                    memory_mb: DEFAULT_MB
                },
                Call::Save { key },
                Call::Prepare,
            ]
        );
        assert_eq!(
            *factory.booted_layers.lock().unwrap(),
            [Some(PathBuf::from("/l/a.erofs"))]
        );
        assert!(
            pool.take(Language::Python, true).await.is_some(),
            "pool untouched"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_template_is_restored_and_prepared() {
        let factory = Factory {
            l1: true,
            template_exists: true,
            ..Factory::default()
        };
        let admission = admission(4);
        let got = acquire(&factory, &WarmPool::new(0), &admission, want(512))
            .await
            .unwrap();
        assert_eq!(got.origin, VmOrigin::Snapshot);
        assert_eq!(
            factory.calls(),
            [
                Call::Restore {
                    key: "python-512-false".into(),
                    nic: false
                },
                Call::Prepare
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_template_it_boots_cold_and_saves_one() {
        let factory = Factory {
            l1: true,
            ..Factory::default()
        };
        let admission = admission(4);
        let mut w = want(DEFAULT_MB);
        w.gateway = Some(gateway());
        let got = acquire(&factory, &WarmPool::new(0), &admission, w)
            .await
            .unwrap();
        assert_eq!(got.origin, VmOrigin::Cold);
        assert_eq!(
            factory.calls(),
            [
                Call::Restore {
                    key: "python-256-true".into(),
                    nic: true
                },
                Call::Boot {
                    verbose: false,
                    nic: true,
                    memory_mb: DEFAULT_MB
                },
                Call::Save {
                    key: "python-256-true".into()
                },
                Call::Prepare,
            ],
            "the gateway given back by the failed restore goes to the cold boot"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_boot_log_means_a_verbose_cold_boot_and_no_template() {
        let factory = Factory {
            l1: true,
            template_exists: true,
            ..Factory::default()
        };
        let log: OutputCallback = Arc::new(|_: &[u8]| {});
        let mut w = want(DEFAULT_MB);
        w.on_boot_log = Some(&log);
        let got = acquire(&factory, &WarmPool::new(0), &admission(4), w)
            .await
            .unwrap();
        assert_eq!(got.origin, VmOrigin::Cold);
        assert_eq!(
            factory.calls(),
            [
                Call::Boot {
                    verbose: true,
                    nic: false,
                    memory_mb: DEFAULT_MB
                },
                Call::Prepare
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn with_l1_off_nothing_is_restored_or_saved() {
        let factory = Factory::default();
        acquire(&factory, &WarmPool::new(0), &admission(4), want(DEFAULT_MB))
            .await
            .unwrap();
        assert_eq!(
            factory.calls(),
            [
                Call::Boot {
                    verbose: false,
                    nic: false,
                    memory_mb: DEFAULT_MB
                },
                Call::Prepare
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failures_release_the_budget_and_leave_no_vm() {
        let admission = admission(1);
        let boot_fails = Factory {
            boot_fails: true,
            ..Factory::default()
        };
        let err = acquire(&boot_fails, &WarmPool::new(0), &admission, want(DEFAULT_MB))
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind(), ErrorKind::Transient, "{err}");

        let prepare_fails = Factory {
            prepare_fails: true,
            ..Factory::default()
        };
        let err = acquire(
            &prepare_fails,
            &WarmPool::new(0),
            &admission,
            want(DEFAULT_MB),
        )
        .await
        .err()
        .unwrap();
        assert_eq!(err.kind(), ErrorKind::Transient, "{err}");
        assert_eq!(
            prepare_fails.destroyed.count(),
            1,
            "an unprepared VM is destroyed"
        );
        assert!(
            admission
                .try_admit(Cost::vm(DEFAULT_MB, 1, Accelerator::Tcg))
                .is_some(),
            "both permits were given back"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_budget_is_a_capacity_error_at_the_deadline() {
        let admission = admission(1);
        let _held = admission
            .try_admit(Cost::vm(DEFAULT_MB, 1, Accelerator::Tcg))
            .unwrap();
        let factory = Factory::default();
        let started = tokio::time::Instant::now();
        let mut w = want(DEFAULT_MB);
        w.admission_deadline = started + Duration::from_secs(3);
        let err = acquire(&factory, &WarmPool::new(0), &admission, w)
            .await
            .err()
            .unwrap();
        assert!(matches!(err, Error::Capacity(_)), "{err}");
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        assert!(factory.calls().is_empty(), "nothing was started");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_warm_vm_gives_way_to_a_run_that_needs_its_budget() {
        let factory = Factory::default();
        let admission = admission(1);
        let pool = pool_with_one(&factory, &admission).await;
        // A networked run: the pooled VM cannot serve it, but its budget can.
        let mut w = want(DEFAULT_MB);
        w.gateway = Some(gateway());
        let got = acquire(&factory, &pool, &admission, w).await.unwrap();
        assert_eq!(got.origin, VmOrigin::Cold);
        assert_eq!(factory.destroyed.count(), 1, "the idle VM was evicted");
        assert!(pool.take(Language::Python, true).await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn warm_vms_restore_when_they_can_and_boot_and_warm_otherwise() {
        let admission = admission(4);
        let restoring = Factory {
            l1: true,
            template_exists: true,
            ..Factory::default()
        };
        let vm = warm_vm(&restoring, &admission, Language::Raw, DEFAULT_MB)
            .await
            .unwrap()
            .expect("budget has room");
        assert_eq!(vm.vm.name(), "clone");
        assert_eq!(
            restoring.calls(),
            [
                Call::Restore {
                    key: "raw-256-false".into(),
                    nic: false
                },
                Call::Prime
            ]
        );

        let booting = Factory {
            l1: true,
            ..Factory::default()
        };
        warm_vm(&booting, &admission, Language::Raw, DEFAULT_MB)
            .await
            .unwrap()
            .expect("budget has room");
        let mut expected = vec![Call::Restore {
            key: "raw-256-false".into(),
            nic: false,
        }];
        expected.extend(booted_warmed_saved_primed("raw-256-false"));
        assert_eq!(booting.calls(), expected);
        for factory in [&restoring, &booting] {
            let backgrounds = factory.backgrounds.lock().unwrap();
            assert!(
                !backgrounds.is_empty() && backgrounds.iter().all(|b| *b),
                "nobody waits for a pool's VM: {backgrounds:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_warm_vm_that_cannot_run_its_first_execution_is_never_pooled() {
        let admission = admission(4);
        let factory = Factory {
            l1: true,
            template_exists: true,
            prime_fails: true,
            ..Factory::default()
        };
        let error = match warm_vm(&factory, &admission, Language::Python, DEFAULT_MB).await {
            Err(e) => e,
            Ok(vm) => panic!("pooled {:?}", vm.map(|v| v.vm.name().to_string())),
        };
        let chain = crate::vm::error_chain(&error);
        assert!(chain.contains("first execution: exit code 1"), "{chain}");
        // The clone that failed, then the VM booted instead that failed too: both destroyed,
        // and neither kept its share of the budget.
        let mut expected = vec![
            Call::Restore {
                key: "python-256-false".into(),
                nic: false,
            },
            Call::Prime,
        ];
        expected.extend(booted_warmed_saved_primed("python-256-false"));
        assert_eq!(factory.calls(), expected);
        assert_eq!(factory.destroyed.count(), 2);
        assert!(admission.try_admit(admission.budget()).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn warm_vms_never_wait_for_the_budget() {
        let admission = admission(1);
        let _held = admission
            .try_admit(Cost::vm(DEFAULT_MB, 1, Accelerator::Tcg))
            .unwrap();
        let factory = Factory::default();
        let started = tokio::time::Instant::now();
        let none = warm_vm(&factory, &admission, Language::Python, DEFAULT_MB)
            .await
            .unwrap();
        assert!(none.is_none());
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert!(factory.calls().is_empty());
    }
}
