//! Admission control: a memory and CPU budget shared by every VM of a scheduler, so a burst of
//! runs queues (FIFO, with a deadline) instead of thrashing the host.
//!
//! Each VM holds a [`Permit`] for its [`Cost`] from before QEMU starts until after it is reaped.
//! The budget is derived once from the host ([`HostFacts`]: `MemTotal`, cores); `MemAvailable` and
//! memory pressure are read again at every decision, because other processes use the host too.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::limits;
use crate::vm::accel::Accelerator;

/// Milli-vCPUs in one vCPU.
const MILLI: u64 = 1000;

/// What the admission logic needs to know about the host, behind a seam so it tests with fakes.
pub trait HostFacts: Send + Sync {
    /// `(MemTotal, MemAvailable)` in MB, when known.
    fn memory_mb(&self) -> Option<(u64, u64)>;
    /// Host cores available to us.
    fn cores(&self) -> usize;
    /// Memory pressure (PSI `some avg10`, percent) where the host exposes it.
    fn memory_pressure(&self) -> Option<f64>;
}

/// The real host: `/proc/meminfo`, `/proc/pressure/memory`, `available_parallelism`.
pub struct ProcHost;

impl HostFacts for ProcHost {
    fn memory_mb(&self) -> Option<(u64, u64)> {
        parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?)
    }

    fn cores(&self) -> usize {
        std::thread::available_parallelism().map_or(1, usize::from)
    }

    fn memory_pressure(&self) -> Option<f64> {
        parse_psi_some_avg10(&std::fs::read_to_string("/proc/pressure/memory").ok()?)
    }
}

fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb / 1024)
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

fn parse_psi_some_avg10(text: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix("some "))?
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("avg10="))?
        .parse()
        .ok()
}

/// What one VM is charged against the budget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cost {
    /// Guest memory plus QEMU's own overhead, in MB.
    pub memory_mb: u64,
    /// vCPUs, in thousandths.
    pub cpu_milli: u64,
}

impl Cost {
    /// The cost of a VM with `memory_mb` of guest RAM and `vcpus` under `accelerator`: guest
    /// memory, QEMU itself, and under TCG its translation cache.
    pub fn vm(memory_mb: u32, vcpus: u32, accelerator: Accelerator) -> Cost {
        let tcg = match accelerator {
            Accelerator::Tcg => limits::TCG_TRANSLATION_CACHE_MB,
            Accelerator::Kvm => 0,
        };
        Cost {
            memory_mb: u64::from(memory_mb) + limits::QEMU_OVERHEAD_MB + tcg,
            cpu_milli: u64::from(vcpus) * MILLI,
        }
    }

    /// This cost plus a network gateway's buffers ([`limits::GATEWAY_MEMORY_MB`]), for a VM
    /// with a NIC: the gateway runs in this process, outside the VM's cgroup.
    pub fn with_gateway(self) -> Cost {
        Cost {
            memory_mb: self.memory_mb + limits::GATEWAY_MEMORY_MB,
            ..self
        }
    }

    fn fits_in(self, free: Cost) -> bool {
        self.memory_mb <= free.memory_mb && self.cpu_milli <= free.cpu_milli
    }

    fn saturating_sub(self, other: Cost) -> Cost {
        Cost {
            memory_mb: self.memory_mb.saturating_sub(other.memory_mb),
            cpu_milli: self.cpu_milli.saturating_sub(other.cpu_milli),
        }
    }

    fn add(self, other: Cost) -> Cost {
        Cost {
            memory_mb: self.memory_mb + other.memory_mb,
            cpu_milli: self.cpu_milli + other.cpu_milli,
        }
    }
}

impl fmt::Display for Cost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} MB, {}.{} vCPU",
            self.memory_mb,
            self.cpu_milli / MILLI,
            self.cpu_milli % MILLI / 100
        )
    }
}

/// What the operator configured for admission (the scheduler derives it from its own
/// configuration, whose fields these mirror).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdmissionConfig {
    /// Memory all VMs together may be charged (MB); derived from the host when `None`.
    pub memory_budget_mb: Option<u64>,
    /// Host memory kept out of a derived budget (MB).
    pub host_memory_reserve_mb: u64,
    /// Derived memory budget over the host's memory less its reserve.
    pub memory_overcommit_ratio: f64,
    /// vCPUs admitted per host core.
    pub cpu_overcommit_ratio: f64,
    /// No admission while `MemAvailable` is below this (MB).
    pub min_available_memory_mb: u64,
    /// No admission while memory pressure is above this (percent).
    pub max_memory_pressure: f64,
}

/// The limits decided from the configuration and the host.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Everything all VMs together may be charged.
    pub budget: Cost,
    /// No admission while `MemAvailable` is below this (MB).
    pub min_available_mb: u64,
    /// No admission while memory pressure is above this (percent).
    pub max_pressure: f64,
}

impl Policy {
    /// The budget for `config` on the host described by `facts`.
    pub fn new(config: &AdmissionConfig, facts: &dyn HostFacts) -> Policy {
        let memory_mb = config.memory_budget_mb.unwrap_or_else(|| {
            // Without /proc/meminfo nothing limits memory but the floor checks (also absent).
            let total = facts.memory_mb().map_or(u64::MAX / 4, |(total, _)| total);
            let usable = total.saturating_sub(config.host_memory_reserve_mb);
            (usable as f64 * config.memory_overcommit_ratio) as u64
        });
        let cpu_milli =
            (facts.cores().max(1) as f64 * config.cpu_overcommit_ratio * MILLI as f64) as u64;
        Policy {
            budget: Cost {
                memory_mb,
                cpu_milli,
            },
            min_available_mb: config.min_available_memory_mb,
            max_pressure: config.max_memory_pressure,
        }
    }
}

/// Why a VM is not admitted right now.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Blocker {
    /// The VM alone is larger than the whole budget: waiting cannot help.
    LargerThanBudget,
    /// Earlier runs are queued ahead.
    Queue {
        /// Runs ahead of this one.
        ahead: usize,
    },
    /// The budget is taken by running (or warm) VMs.
    Budget,
    /// The host's `MemAvailable` is under the floor.
    AvailableMemory {
        /// `MemAvailable`, MB.
        available_mb: u64,
        /// The floor, MB.
        floor_mb: u64,
    },
    /// The host is under memory pressure.
    Pressure {
        /// PSI `some avg10`, percent.
        some_avg10: f64,
        /// The limit, percent.
        limit: f64,
    },
    /// Every `max_concurrent_vms` slot is taken.
    Slots {
        /// The configured limit.
        max_concurrent_vms: usize,
    },
}

impl fmt::Display for Blocker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Blocker::LargerThanBudget => write!(f, "the VM is larger than the whole budget"),
            Blocker::Queue { ahead } => write!(f, "{ahead} runs queued ahead"),
            Blocker::Budget => write!(f, "budget in use by other VMs"),
            Blocker::AvailableMemory {
                available_mb,
                floor_mb,
            } => write!(
                f,
                "host MemAvailable {available_mb} MB is under the {floor_mb} MB floor"
            ),
            Blocker::Pressure { some_avg10, limit } => {
                write!(f, "host memory pressure {some_avg10}% is above {limit}%")
            }
            Blocker::Slots { max_concurrent_vms } => {
                write!(f, "all {max_concurrent_vms} VM slots in use")
            }
        }
    }
}

/// A run could not be admitted before its deadline.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub struct CapacityError {
    /// How long the run waited.
    pub waited: Duration,
    /// What the VM would have been charged.
    pub needed: Cost,
    /// What was free when it gave up.
    pub available: Cost,
    /// What held it back last.
    pub blocker: Blocker,
}

impl fmt::Display for CapacityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let waited = self.waited.as_millis();
        match self.blocker {
            Blocker::Slots { .. } => {
                write!(f, "no VM slot after waiting {waited} ms: {}", self.blocker)
            }
            _ => write!(
                f,
                "no capacity for a VM ({}; {} free of the budget) after waiting {waited} ms: {}",
                self.needed, self.available, self.blocker
            ),
        }
    }
}

#[derive(Default)]
struct State {
    in_use: Cost,
    /// Runs about to queue (see [`Admission::announce`]).
    announced: usize,
    queue: VecDeque<u64>,
    next_ticket: u64,
    vms: usize,
    peak_vms: usize,
}

/// The shared budget and its FIFO queue.
pub struct Admission {
    policy: Policy,
    facts: Box<dyn HostFacts>,
    state: Mutex<State>,
    changed: Notify,
}

impl Admission {
    /// An empty budget under `policy`, checking the host through `facts`.
    pub fn new(policy: Policy, facts: Box<dyn HostFacts>) -> Arc<Self> {
        Arc::new(Self {
            policy,
            facts,
            state: Mutex::new(State::default()),
            changed: Notify::new(),
        })
    }

    /// The whole budget.
    pub fn budget(&self) -> Cost {
        self.policy.budget
    }

    /// Most VMs that held permits at once so far.
    pub fn peak_vms(&self) -> usize {
        self.lock().peak_vms
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent across a panic (plain counters), so poisoning is ignored.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn free(&self, state: &State) -> Cost {
        self.policy.budget.saturating_sub(state.in_use)
    }

    /// Whether `cost` can be admitted now, ignoring the queue.
    fn check(&self, state: &State, cost: Cost) -> Result<(), Blocker> {
        if !cost.fits_in(self.policy.budget) {
            return Err(Blocker::LargerThanBudget);
        }
        if !cost.fits_in(self.free(state)) {
            return Err(Blocker::Budget);
        }
        if let Some((_, available_mb)) = self.facts.memory_mb()
            && available_mb < self.policy.min_available_mb
        {
            return Err(Blocker::AvailableMemory {
                available_mb,
                floor_mb: self.policy.min_available_mb,
            });
        }
        if let Some(some_avg10) = self.facts.memory_pressure()
            && some_avg10 > self.policy.max_pressure
        {
            return Err(Blocker::Pressure {
                some_avg10,
                limit: self.policy.max_pressure,
            });
        }
        Ok(())
    }

    fn grant(self: &Arc<Self>, state: &mut State, cost: Cost) -> Permit {
        state.in_use = state.in_use.add(cost);
        state.vms += 1;
        state.peak_vms = state.peak_vms.max(state.vms);
        Permit {
            admission: self.clone(),
            cost,
        }
    }

    /// Admits `cost` now if no run is queued or announced and it fits; never waits. For
    /// background work (warm-pool refills) that must not delay runs.
    pub fn try_admit(self: &Arc<Self>, cost: Cost) -> Option<Permit> {
        let mut state = self.lock();
        if !state.queue.is_empty() || state.announced > 0 || self.check(&state, cost).is_err() {
            return None;
        }
        Some(self.grant(&mut state, cost))
    }

    /// Marks a run as about to ask for admission (while it frees room first), so background
    /// work does not take the room it frees. Ends when the guard drops.
    pub fn announce(self: &Arc<Self>) -> Announced {
        self.lock().announced += 1;
        Announced {
            admission: self.clone(),
        }
    }

    /// Whether a queued or immediate admission of `cost` is blocked by the budget alone (the
    /// case where freeing an idle warm VM helps).
    pub fn budget_is_short(&self, cost: Cost) -> bool {
        let state = self.lock();
        cost.fits_in(self.policy.budget) && !cost.fits_in(self.free(&state))
    }

    /// Waits in FIFO order until `cost` fits, or fails once `deadline` passes (at once when it
    /// can never fit). Dropping the future leaves the queue cleanly.
    pub async fn admit(
        self: &Arc<Self>,
        cost: Cost,
        deadline: Instant,
    ) -> Result<Permit, CapacityError> {
        let started = Instant::now();
        let ticket = {
            let mut state = self.lock();
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            state.queue.push_back(ticket);
            ticket
        };
        let _leave = LeaveQueue {
            admission: self,
            ticket,
        };
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let blocker = {
                let mut state = self.lock();
                let ahead = state.queue.iter().position(|t| *t == ticket).unwrap_or(0);
                let verdict = match self.check(&state, cost) {
                    Err(Blocker::LargerThanBudget) => Err(Blocker::LargerThanBudget),
                    _ if ahead > 0 => Err(Blocker::Queue { ahead }),
                    other => other,
                };
                match verdict {
                    Ok(()) => {
                        let permit = self.grant(&mut state, cost);
                        drop(state);
                        // The next in line may fit too.
                        self.changed.notify_waiters();
                        return Ok(permit);
                    }
                    Err(blocker) => {
                        let now = Instant::now();
                        if blocker == Blocker::LargerThanBudget || now >= deadline {
                            return Err(CapacityError {
                                waited: now - started,
                                needed: cost,
                                available: self.free(&state),
                                blocker,
                            });
                        }
                        blocker
                    }
                }
            };
            // Host facts change without any release here: the head re-reads them periodically.
            let wake = match blocker {
                Blocker::AvailableMemory { .. } | Blocker::Pressure { .. } => {
                    deadline.min(Instant::now() + limits::ADMISSION_HOST_POLL)
                }
                _ => deadline,
            };
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    fn release(&self, cost: Cost) {
        {
            let mut state = self.lock();
            state.in_use = state.in_use.saturating_sub(cost);
            state.vms = state.vms.saturating_sub(1);
        }
        self.changed.notify_waiters();
    }
}

/// Removes a ticket from the queue however `admit` ends (granted, failed or dropped).
struct LeaveQueue<'a> {
    admission: &'a Admission,
    ticket: u64,
}

impl Drop for LeaveQueue<'_> {
    fn drop(&mut self) {
        self.admission
            .lock()
            .queue
            .retain(|ticket| *ticket != self.ticket);
        self.admission.changed.notify_waiters();
    }
}

/// A run announced by [`Admission::announce`].
pub struct Announced {
    admission: Arc<Admission>,
}

impl Drop for Announced {
    fn drop(&mut self) {
        let mut state = self.admission.lock();
        state.announced = state.announced.saturating_sub(1);
    }
}

/// One VM's share of the budget, given back on drop.
pub struct Permit {
    admission: Arc<Admission>,
    cost: Cost,
}

impl Permit {
    /// What this permit holds.
    #[cfg(test)]
    pub fn cost(&self) -> Cost {
        self.cost
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit").field("cost", &self.cost).finish()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.release(self.cost);
    }
}

/// An admission with `budget` on a host that never blocks (memory unknown, no pressure), for
/// the tests of the modules that take permits.
#[cfg(test)]
pub(crate) fn with_budget(budget: Cost) -> Arc<Admission> {
    struct Unlimited;

    impl HostFacts for Unlimited {
        fn memory_mb(&self) -> Option<(u64, u64)> {
            None
        }
        fn cores(&self) -> usize {
            2
        }
        fn memory_pressure(&self) -> Option<f64> {
            None
        }
    }

    Admission::new(
        Policy {
            budget,
            min_available_mb: 0,
            max_pressure: 100.0,
        },
        Box::new(Unlimited),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct FakeHost {
        total_mb: u64,
        available_mb: Arc<AtomicU64>,
        cores: usize,
        pressure: Option<f64>,
    }

    impl FakeHost {
        fn new(total_mb: u64, cores: usize) -> Self {
            Self {
                total_mb,
                available_mb: Arc::new(AtomicU64::new(total_mb)),
                cores,
                pressure: None,
            }
        }
    }

    impl HostFacts for FakeHost {
        fn memory_mb(&self) -> Option<(u64, u64)> {
            Some((self.total_mb, self.available_mb.load(Ordering::SeqCst)))
        }
        fn cores(&self) -> usize {
            self.cores
        }
        fn memory_pressure(&self) -> Option<f64> {
            self.pressure
        }
    }

    const VM: Cost = Cost {
        memory_mb: 350,
        cpu_milli: 1000,
    };

    fn admission_for(budget: Cost, host: FakeHost) -> Arc<Admission> {
        Admission::new(
            Policy {
                budget,
                min_available_mb: 512,
                max_pressure: 20.0,
            },
            Box::new(host),
        )
    }

    #[test]
    fn cost_counts_qemu_and_the_tcg_translation_cache() {
        assert_eq!(Cost::vm(256, 1, Accelerator::Tcg), VM);
        assert_eq!(
            Cost::vm(512, 2, Accelerator::Kvm),
            Cost {
                memory_mb: 542,
                cpu_milli: 2000
            }
        );
        assert_eq!(VM.to_string(), "350 MB, 1.0 vCPU");
    }

    #[test]
    fn budget_is_memory_less_reserve_times_ratio_and_cores_times_ratio() {
        let config = AdmissionConfig {
            memory_budget_mb: None,
            host_memory_reserve_mb: 1024,
            memory_overcommit_ratio: 1.5,
            cpu_overcommit_ratio: 2.5,
            min_available_memory_mb: 512,
            max_memory_pressure: 20.0,
        };
        let policy = Policy::new(&config, &FakeHost::new(9216, 2));
        assert_eq!(
            policy.budget,
            Cost {
                memory_mb: 12_288,
                cpu_milli: 5000
            }
        );
        // An explicit budget wins; a reserve larger than the host leaves nothing.
        let explicit = AdmissionConfig {
            memory_budget_mb: Some(800),
            ..config
        };
        assert_eq!(
            Policy::new(&explicit, &FakeHost::new(9216, 2))
                .budget
                .memory_mb,
            800
        );
        let tiny = AdmissionConfig {
            host_memory_reserve_mb: 10_000,
            ..config
        };
        assert_eq!(
            Policy::new(&tiny, &FakeHost::new(9216, 2)).budget.memory_mb,
            0
        );
    }

    #[test]
    fn parses_meminfo_and_psi() {
        let meminfo = "MemTotal:       24731708 kB\nMemFree: 1 kB\nMemAvailable:   23973060 kB\n";
        assert_eq!(parse_meminfo(meminfo), Some((24152, 23411)));
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
        let psi = "some avg10=12.50 avg60=0.00 avg300=0.00 total=0\nfull avg10=1.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(parse_psi_some_avg10(psi), Some(12.5));
        assert_eq!(parse_psi_some_avg10("garbage"), None);
    }

    #[test]
    fn admits_up_to_the_budget_and_releases_on_drop() {
        let a = admission_for(
            Cost {
                memory_mb: 800,
                cpu_milli: 8000,
            },
            FakeHost::new(16_000, 2),
        );
        let p1 = a.try_admit(VM).expect("first fits");
        let p2 = a.try_admit(VM).expect("second fits");
        assert!(a.try_admit(VM).is_none(), "a third exceeds 800 MB");
        assert!(a.budget_is_short(VM));
        drop(p1);
        let announced = a.announce();
        assert!(
            a.try_admit(VM).is_none(),
            "the room is for the announced run"
        );
        drop(announced);
        let _p3 = a.try_admit(VM).expect("room again");
        drop(p2);
        assert_eq!(a.peak_vms(), 2);
        // CPU binds too.
        let a = admission_for(
            Cost {
                memory_mb: 100_000,
                cpu_milli: 1500,
            },
            FakeHost::new(200_000, 1),
        );
        let _p = a.try_admit(VM).unwrap();
        assert!(a.try_admit(VM).is_none());
    }

    #[test]
    fn host_floor_and_pressure_block_admission() {
        let host = FakeHost::new(16_000, 2);
        let available = host.available_mb.clone();
        let a = admission_for(
            Cost {
                memory_mb: 8000,
                cpu_milli: 8000,
            },
            host,
        );
        available.store(400, Ordering::SeqCst);
        assert!(a.try_admit(VM).is_none());
        assert!(matches!(
            a.check(&a.lock(), VM),
            Err(Blocker::AvailableMemory {
                available_mb: 400,
                floor_mb: 512
            })
        ));
        available.store(4000, Ordering::SeqCst);
        assert!(a.try_admit(VM).is_some());

        let mut pressured = FakeHost::new(16_000, 2);
        pressured.pressure = Some(35.0);
        let a = admission_for(
            Cost {
                memory_mb: 8000,
                cpu_milli: 8000,
            },
            pressured,
        );
        assert!(matches!(
            a.check(&a.lock(), VM),
            Err(Blocker::Pressure { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn queued_runs_proceed_in_fifo_order() {
        let a = admission_for(
            Cost {
                memory_mb: 700,
                cpu_milli: 8000,
            },
            FakeHost::new(16_000, 2),
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        let held = a.admit(VM, deadline).await.unwrap();
        let held2 = a.admit(VM, deadline).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..4 {
            let (a, order) = (a.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let permit = a.admit(VM, deadline).await.unwrap();
                order.lock().unwrap().push(i);
                tokio::time::sleep(Duration::from_millis(10)).await;
                drop(permit);
            }));
            // Queue them in a known order.
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // While queued, background work never jumps the queue even when the budget has room.
        drop(held);
        assert!(a.try_admit(VM).is_none());
        drop(held2);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(a.peak_vms(), 2);
        assert_eq!(a.lock().in_use, Cost::default());
        assert!(a.lock().queue.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_head_is_not_overtaken_by_smaller_runs() {
        let a = admission_for(
            Cost {
                memory_mb: 700,
                cpu_milli: 8000,
            },
            FakeHost::new(16_000, 2),
        );
        let far = Instant::now() + Duration::from_secs(60);
        let first = a.try_admit(VM).unwrap();
        let second = a.try_admit(VM).unwrap();
        let big = Cost {
            memory_mb: 700,
            cpu_milli: 1000,
        };
        let big_waiter = tokio::spawn({
            let a = a.clone();
            async move { a.admit(big, far).await }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        let small_waiter = tokio::spawn({
            let a = a.clone();
            async move { a.admit(VM, far).await }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        // Room for the small run, not the big one: the small one still waits its turn.
        drop(first);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!big_waiter.is_finished() && !small_waiter.is_finished());
        drop(second);
        let big_permit = big_waiter.await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!small_waiter.is_finished());
        drop(big_permit);
        small_waiter.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_that_never_fits_in_time_gets_a_capacity_error() {
        let a = admission_for(
            Cost {
                memory_mb: 400,
                cpu_milli: 8000,
            },
            FakeHost::new(16_000, 2),
        );
        let _held = a.try_admit(VM).unwrap();
        let started = Instant::now();
        let err = a
            .admit(VM, started + Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(err.waited, Duration::from_secs(1));
        assert_eq!(err.blocker, Blocker::Budget);
        assert_eq!(err.available.memory_mb, 50);
        assert!(err.to_string().contains("350 MB"), "{err}");
        // Larger than the whole budget: no waiting at all.
        let big = Cost {
            memory_mb: 1000,
            cpu_milli: 1000,
        };
        let err = a
            .admit(big, Instant::now() + Duration::from_secs(60))
            .await
            .unwrap_err();
        assert_eq!(err.blocker, Blocker::LargerThanBudget);
        assert_eq!(err.waited, Duration::ZERO);
        assert!(a.lock().queue.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_waiter_leaves_the_queue() {
        let a = admission_for(
            Cost {
                memory_mb: 400,
                cpu_milli: 8000,
            },
            FakeHost::new(16_000, 2),
        );
        let held = a.try_admit(VM).unwrap();
        let far = Instant::now() + Duration::from_secs(600);
        let waiter = tokio::spawn({
            let a = a.clone();
            async move { a.admit(VM, far).await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(a.lock().queue.len(), 1);
        waiter.abort();
        let _ = waiter.await;
        assert!(a.lock().queue.is_empty());
        drop(held);
        assert!(a.try_admit(VM).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn the_head_rechecks_host_memory_while_it_waits() {
        let host = FakeHost::new(16_000, 2);
        let available = host.available_mb.clone();
        available.store(100, Ordering::SeqCst);
        let a = admission_for(
            Cost {
                memory_mb: 8000,
                cpu_milli: 8000,
            },
            host,
        );
        let waiter = tokio::spawn({
            let a = a.clone();
            async move { a.admit(VM, Instant::now() + Duration::from_secs(10)).await }
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!waiter.is_finished());
        available.store(4000, Ordering::SeqCst);
        let permit = waiter.await.unwrap().expect("admitted once memory is back");
        assert_eq!(permit.cost(), VM);
    }
}
