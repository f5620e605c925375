//! The warm pool: VMs booted ahead, interpreter already started, each handed out to one run.
//!
//! A background task ([`maintain`]) keeps `size` idle VMs per language, booting one at a time
//! and only when the admission budget has room with nobody queued (refills never delay runs). Idle
//! VMs are pinged every [`limits::WARM_POOL_HEALTH_INTERVAL`], one at a time (a run that finds
//! its language's VMs all out for that ping waits for one, up to
//! [`limits::WARM_POOL_CHECK_WAIT`]), and once more when they are handed out: by the pool for a
//! session, by the run's own execution for a run (a ping sent ahead of the code, so the two round
//! trips overlap); a VM whose channel closed or that does not answer is destroyed and replaced,
//! never used. A VM leaves the pool for good: nothing a run leaves behind reaches another.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sbx_protocol::{Event, Language, Request};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::admission::Permit;
use crate::error::Error;
use crate::limits;
use crate::vm::{Vm, VmHandle};

/// What the pool needs of a VM: a seam, so the pool's logic unit-tests with fakes.
pub(crate) trait PoolVm: Send + Sync + 'static {
    /// The VM's name.
    fn name(&self) -> &str;
    /// True once the VM is known to be dead (its control channel closed).
    fn is_gone(&self) -> bool;
    /// Whether the agent answers a ping within [`limits::WARM_POOL_PING_DEADLINE`].
    fn ping(&self) -> impl Future<Output = bool> + Send;
    /// Gives the VM a run's CPU weight (an idle VM has a refill's).
    fn to_foreground(&self);
    /// Kills and reaps the VM.
    fn destroy(self) -> impl Future<Output = ()> + Send;
}

impl<V: VmHandle> PoolVm for V {
    fn name(&self) -> &str {
        VmHandle::name(self)
    }

    fn is_gone(&self) -> bool {
        self.link().channel.is_closed()
    }

    async fn ping(&self) -> bool {
        !self.is_gone()
            && self
                .link()
                .acknowledged(&Request::Ping, limits::WARM_POOL_PING_DEADLINE, |e| {
                    matches!(e, Event::Pong)
                })
                .await
                .is_ok()
    }

    fn to_foreground(&self) {
        VmHandle::to_foreground(self);
    }

    async fn destroy(self) {
        VmHandle::destroy(self).await;
    }
}

/// An idle warm VM and its share of the admission budget.
pub(crate) struct Pooled<V = Vm> {
    /// The VM, its interpreter started.
    pub vm: V,
    /// Held for as long as the VM lives.
    pub permit: Permit,
}

impl<V: PoolVm> Pooled<V> {
    /// Kills and reaps the VM, then gives its budget back.
    async fn destroy(self) {
        let Pooled { vm, permit } = self;
        vm.destroy().await;
        drop(permit);
    }
}

/// Boots warm VMs for the pool (the scheduler, reached through a weak reference).
pub(crate) trait WarmBooter<V>: Send {
    /// Boots a VM for `language` and starts its interpreter; `Ok(None)` when the admission
    /// budget has no room right now.
    fn boot_warm(
        &self,
        language: Language,
    ) -> impl Future<Output = Result<Option<Pooled<V>>, Error>> + Send;
}

struct State<V> {
    idle: HashMap<Language, VecDeque<Pooled<V>>>,
    /// VMs per language out of `idle` for their health check's ping.
    checking: HashMap<Language, usize>,
    closed: bool,
}

/// Idle warm VMs per language.
pub(crate) struct WarmPool<V = Vm> {
    size: usize,
    state: Mutex<State<V>>,
    wake: Notify,
    /// Told when a VM comes back from its health check (or is found dead there).
    checked: Notify,
}

impl<V: PoolVm> WarmPool<V> {
    /// A pool keeping `size` VMs per language (0: disabled).
    pub fn new(size: usize) -> Self {
        Self {
            size,
            state: Mutex::new(State {
                idle: HashMap::new(),
                checking: HashMap::new(),
                closed: false,
            }),
            wake: Notify::new(),
            checked: Notify::new(),
        }
    }

    /// Whether the pool keeps any VMs.
    pub fn enabled(&self) -> bool {
        self.size > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<V>> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether [`Self::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// A warm VM for `language`, if one is idle, at a run's CPU weight. With `ping`, it is
    /// pinged first and VMs that do not answer are destroyed on the way; without, it is only
    /// known to have answered its last health check, and the caller checks it
    /// ([`crate::execute::Execution::ping_first`]). Either way a VM whose channel closed is
    /// never handed out.
    ///
    /// The VM gets its weight before that ping, and the refill starts after it: otherwise the
    /// ping, answered at a refill's weight, competes with the new VM's start.
    ///
    /// When every idle VM of `language` is out for its health check, the caller waits for one
    /// to come back, up to [`limits::WARM_POOL_CHECK_WAIT`] (a ping takes milliseconds; a VM
    /// start, hundreds of them).
    pub async fn take(&self, language: Language, ping: bool) -> Option<Pooled<V>> {
        let wait_until = Instant::now() + limits::WARM_POOL_CHECK_WAIT;
        loop {
            let candidate = loop {
                let checked = self.checked.notified();
                tokio::pin!(checked);
                {
                    let mut state = self.lock();
                    if let Some(vm) = state.idle.get_mut(&language).and_then(VecDeque::pop_front) {
                        break vm;
                    }
                    if state.checking.get(&language).copied().unwrap_or(0) == 0 {
                        return None;
                    }
                    // Registered under the lock: the check's return cannot slip past.
                    checked.as_mut().enable();
                }
                tokio::time::timeout_at(wait_until, checked).await.ok()?;
            };
            candidate.vm.to_foreground();
            let alive = if ping {
                candidate.vm.ping().await
            } else {
                !candidate.vm.is_gone()
            };
            self.wake.notify_one();
            if alive {
                return Some(candidate);
            }
            tracing::info!(vm = %candidate.vm.name(), "warm VM is dead: discarded");
            candidate.destroy().await;
        }
    }

    /// Destroys one idle VM (from the language with the most) so a queued run can use its
    /// budget. False when the pool is empty.
    pub async fn evict_one(&self) -> bool {
        let victim = {
            let mut state = self.lock();
            state
                .idle
                .values_mut()
                .max_by_key(|q| q.len())
                .and_then(VecDeque::pop_back)
        };
        match victim {
            Some(vm) => {
                tracing::debug!(vm = %vm.vm.name(), "warm VM evicted for a queued run");
                vm.destroy().await;
                self.wake.notify_one();
                true
            }
            None => false,
        }
    }

    /// Stops refilling and returns every idle VM for the caller to destroy.
    pub fn close(&self) -> Vec<Pooled<V>> {
        let drained: Vec<Pooled<V>> = {
            let mut state = self.lock();
            state.closed = true;
            state.idle.drain().flat_map(|(_, q)| q).collect()
        };
        self.wake.notify_one();
        drained
    }

    /// Names of the idle VMs for `language`.
    #[cfg(test)]
    pub fn idle_names(&self, language: Language) -> Vec<String> {
        self.lock()
            .idle
            .get(&language)
            .map(|q| q.iter().map(|p| p.vm.name().to_string()).collect())
            .unwrap_or_default()
    }

    /// `f` of every idle VM, with its language.
    pub fn inspect_idle<T>(&self, f: impl Fn(Language, &V) -> T) -> Vec<T> {
        let state = self.lock();
        let mut out = Vec::new();
        for language in Language::ALL {
            if let Some(queue) = state.idle.get(&language) {
                out.extend(queue.iter().map(|p| f(language, &p.vm)));
            }
        }
        out
    }

    /// Adds an idle VM, as a refill would.
    #[cfg(test)]
    pub fn put_for_test(&self, language: Language, vm: Pooled<V>) {
        assert!(self.put(language, vm).is_none(), "the pool is open");
    }

    /// Adds a VM; returns it when the pool is closed (the caller destroys it).
    fn put(&self, language: Language, vm: Pooled<V>) -> Option<Pooled<V>> {
        let mut state = self.lock();
        if state.closed {
            return Some(vm);
        }
        state.idle.entry(language).or_default().push_back(vm);
        None
    }

    /// Drops VMs whose channel closed (QEMU died) and returns the language furthest below size.
    fn most_needed(&self) -> (Option<Language>, Vec<Pooled<V>>) {
        let mut state = self.lock();
        let mut dead = Vec::new();
        for queue in state.idle.values_mut() {
            let (alive, gone): (VecDeque<Pooled<V>>, VecDeque<Pooled<V>>) =
                queue.drain(..).partition(|p| !p.vm.is_gone());
            *queue = alive;
            dead.extend(gone);
        }
        let needed = Language::ALL
            .into_iter()
            .map(|l| (l, state.idle.get(&l).map_or(0, VecDeque::len)))
            .filter(|(_, n)| *n < self.size)
            .min_by_key(|(_, n)| *n)
            .map(|(l, _)| l);
        (needed, dead)
    }

    /// Pings every idle VM, one at a time, each back at the end of its queue; those that fail
    /// are destroyed. The others stay available to runs meanwhile.
    async fn health_check(&self) {
        for language in Language::ALL {
            let count = self.lock().idle.get(&language).map_or(0, VecDeque::len);
            for _ in 0..count {
                let (vm, out) = {
                    let mut state = self.lock();
                    let Some(vm) = state.idle.get_mut(&language).and_then(VecDeque::pop_front)
                    else {
                        break;
                    };
                    *state.checking.entry(language).or_default() += 1;
                    (
                        vm,
                        CheckedOut {
                            pool: self,
                            language,
                        },
                    )
                };
                let alive = vm.vm.ping().await;
                let leftover = if alive {
                    self.put(language, vm)
                } else {
                    Some(vm)
                };
                drop(out);
                if let Some(vm) = leftover {
                    if !alive {
                        tracing::info!(vm = %vm.vm.name(), "warm VM failed its health check: replaced");
                    }
                    vm.destroy().await;
                }
            }
        }
    }
}

/// A VM out of the pool for its health check's ping, counted in `checking` until this is
/// dropped (also when the check's task is aborted mid-ping: takes would wait for it otherwise).
struct CheckedOut<'a, V: PoolVm> {
    pool: &'a WarmPool<V>,
    language: Language,
}

impl<V: PoolVm> Drop for CheckedOut<'_, V> {
    fn drop(&mut self) {
        if let Some(n) = self.pool.lock().checking.get_mut(&self.language) {
            *n = n.saturating_sub(1);
        }
        self.pool.checked.notify_waiters();
    }
}

/// Keeps the pool full until it is closed or the scheduler is gone (`upgrade` returns `None`).
///
/// The task holds the scheduler only while it boots a VM, so dropping the last user handle ends
/// it (the scheduler's drop closes the pool).
pub(crate) async fn maintain<V: PoolVm, B: WarmBooter<V>>(
    pool: Arc<WarmPool<V>>,
    upgrade: impl Fn() -> Option<B> + Send,
) {
    let mut next_health = Instant::now() + limits::WARM_POOL_HEALTH_INTERVAL;
    let mut failures: u32 = 0;
    // Refills wait after a failed boot (backoff) or a full budget, even when woken earlier.
    let mut refill_not_before = Instant::now();
    loop {
        while Instant::now() >= refill_not_before {
            if pool.is_closed() {
                return;
            }
            let (needed, dead) = pool.most_needed();
            for vm in dead {
                tracing::info!(vm = %vm.vm.name(), "warm VM died: replaced");
                vm.destroy().await;
            }
            let Some(language) = needed else { break };
            let Some(booter) = upgrade() else { return };
            match booter.boot_warm(language).await {
                Ok(Some(vm)) => {
                    failures = 0;
                    if let Some(vm) = pool.put(language, vm) {
                        vm.destroy().await;
                        return;
                    }
                }
                Ok(None) => refill_not_before = Instant::now() + Duration::from_secs(1),
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let backoff = Duration::from_secs(1 << failures.min(6));
                    tracing::warn!(%language, error = %e, retry_in_s = backoff.as_secs(), "warm VM failed to boot");
                    refill_not_before = Instant::now() + backoff;
                }
            }
        }
        if pool.is_closed() {
            return;
        }
        if Instant::now() >= next_health {
            pool.health_check().await;
            next_health = Instant::now() + limits::WARM_POOL_HEALTH_INTERVAL;
            continue;
        }
        let wake = if refill_not_before > Instant::now() {
            next_health.min(refill_not_before)
        } else {
            next_health
        };
        tokio::select! {
            () = pool.wake.notified() => {}
            () = tokio::time::sleep_until(wake) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;
    use crate::admission::{Admission, Cost};

    const VM: Cost = Cost {
        memory_mb: 350,
        cpu_milli: 1000,
    };

    fn admission(vms: u64) -> Arc<Admission> {
        crate::admission::with_budget(Cost {
            memory_mb: VM.memory_mb * vms,
            cpu_milli: 100_000,
        })
    }

    /// A VM that can be made to die (`gone`) or hang (`hung`: channel open, no pong).
    struct FakeVm {
        name: String,
        gone: Arc<AtomicBool>,
        hung: Arc<AtomicBool>,
        destroyed: Arc<AtomicUsize>,
        /// What was asked of each VM, in order: (name, "ping" or "foreground").
        calls: Calls,
        /// How long every fake takes to answer a ping.
        ping_time: Arc<Mutex<Duration>>,
    }

    type Calls = Arc<Mutex<Vec<(String, &'static str)>>>;

    impl PoolVm for FakeVm {
        fn name(&self) -> &str {
            &self.name
        }
        fn is_gone(&self) -> bool {
            self.gone.load(Ordering::SeqCst)
        }
        async fn ping(&self) -> bool {
            self.calls.lock().unwrap().push((self.name.clone(), "ping"));
            let ping_time = *self.ping_time.lock().unwrap();
            tokio::time::sleep(ping_time).await;
            !self.is_gone() && !self.hung.load(Ordering::SeqCst)
        }
        fn to_foreground(&self) {
            self.calls
                .lock()
                .unwrap()
                .push((self.name.clone(), "foreground"));
        }
        async fn destroy(self) {
            self.destroyed.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A booted fake's name and its (gone, hung) switches.
    type Booted = (String, Arc<AtomicBool>, Arc<AtomicBool>);

    #[derive(Clone)]
    struct Booter {
        admission: Arc<Admission>,
        booted: Arc<Mutex<Vec<Booted>>>,
        destroyed: Arc<AtomicUsize>,
        failing: Arc<AtomicBool>,
        attempts: Arc<AtomicUsize>,
        calls: Calls,
        ping_time: Arc<Mutex<Duration>>,
    }

    impl Booter {
        fn new(admission: Arc<Admission>) -> Self {
            Self {
                admission,
                booted: Arc::default(),
                destroyed: Arc::default(),
                failing: Arc::default(),
                attempts: Arc::default(),
                calls: Arc::default(),
                ping_time: Arc::default(),
            }
        }

        /// Flags of the VM called `name`: (gone, hung).
        fn flags(&self, name: &str) -> (Arc<AtomicBool>, Arc<AtomicBool>) {
            let booted = self.booted.lock().unwrap();
            let (_, gone, hung) = booted.iter().find(|(n, ..)| n == name).unwrap();
            (gone.clone(), hung.clone())
        }
    }

    impl WarmBooter<FakeVm> for Booter {
        async fn boot_warm(&self, language: Language) -> Result<Option<Pooled<FakeVm>>, Error> {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            if self.failing.load(Ordering::SeqCst) {
                return Err(Error::Guest {
                    kind: sbx_protocol::GuestErrorKind::InterpreterStart,
                    message: "no interpreter".into(),
                });
            }
            let Some(permit) = self.admission.try_admit(VM) else {
                return Ok(None);
            };
            let mut booted = self.booted.lock().unwrap();
            let name = format!("{language}-{}", booted.len());
            let (gone, hung) = (Arc::default(), Arc::default());
            booted.push((name.clone(), Arc::clone(&gone), Arc::clone(&hung)));
            Ok(Some(Pooled {
                vm: FakeVm {
                    name,
                    gone,
                    hung,
                    destroyed: self.destroyed.clone(),
                    calls: self.calls.clone(),
                    ping_time: self.ping_time.clone(),
                },
                permit,
            }))
        }
    }

    fn start(size: usize, booter: &Booter) -> (Arc<WarmPool<FakeVm>>, tokio::task::JoinHandle<()>) {
        let pool = Arc::new(WarmPool::new(size));
        let b = booter.clone();
        let task = tokio::spawn(maintain(pool.clone(), move || Some(b.clone())));
        (pool, task)
    }

    async fn until(what: &str, mut condition: impl FnMut() -> bool) {
        for _ in 0..10_000 {
            if condition() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never happened: {what}");
    }

    fn idle(pool: &WarmPool<FakeVm>) -> usize {
        Language::ALL
            .iter()
            .map(|l| pool.idle_names(*l).len())
            .sum()
    }

    #[tokio::test(start_paused = true)]
    async fn fills_every_language_and_refills_after_a_take() {
        let booter = Booter::new(admission(100));
        let (pool, _task) = start(2, &booter);
        until("full pool", || idle(&pool) == 6).await;
        let oldest = pool.idle_names(Language::Python)[0].clone();
        let taken = pool.take(Language::Python, true).await.expect("a warm VM");
        assert_eq!(taken.vm.name(), oldest);
        until("refilled", || pool.idle_names(Language::Python).len() == 2).await;
        assert!(!pool.idle_names(Language::Python).contains(&oldest));
        assert_eq!(booter.booted.lock().unwrap().len(), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn a_taken_vm_gets_a_runs_weight_before_its_last_ping() {
        let booter = Booter::new(admission(100));
        let (pool, task) = start(1, &booter);
        until("full pool", || idle(&pool) == 3).await;
        // The periodic health check pings idle VMs at their idle weight.
        tokio::time::sleep(limits::WARM_POOL_HEALTH_INTERVAL + Duration::from_secs(1)).await;
        task.abort();
        let name = pool.idle_names(Language::Python)[0].clone();
        let calls = |booter: &Booter| -> Vec<&'static str> {
            let calls = booter.calls.lock().unwrap();
            calls
                .iter()
                .filter(|(n, _)| *n == name)
                .map(|(_, c)| *c)
                .collect()
        };
        assert_eq!(calls(&booter), ["ping"], "health check");
        let taken = pool.take(Language::Python, true).await.expect("a warm VM");
        assert_eq!(taken.vm.name(), name);
        assert_eq!(calls(&booter), ["ping", "foreground", "ping"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_or_hung_vm_is_never_handed_out() {
        let booter = Booter::new(admission(100));
        let (pool, task) = start(1, &booter);
        until("full pool", || idle(&pool) == 3).await;
        task.abort();
        let name = pool.idle_names(Language::Python)[0].clone();
        booter.flags(&name).0.store(true, Ordering::SeqCst);
        assert!(pool.take(Language::Python, true).await.is_none());
        let name = pool.idle_names(Language::Raw)[0].clone();
        booter.flags(&name).1.store(true, Ordering::SeqCst);
        assert!(pool.take(Language::Raw, true).await.is_none());
        assert_eq!(booter.destroyed.load(Ordering::SeqCst), 2);
        assert!(pool.take(Language::Javascript, true).await.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_ping_only_a_closed_channel_is_caught() {
        let booter = Booter::new(admission(100));
        let (pool, task) = start(2, &booter);
        until("full pool", || idle(&pool) == 6).await;
        task.abort();
        let [dead, hung] = [0, 1].map(|i| pool.idle_names(Language::Python)[i].clone());
        booter.flags(&dead).0.store(true, Ordering::SeqCst);
        booter.flags(&hung).1.store(true, Ordering::SeqCst);
        let before = booter.calls.lock().unwrap().len();
        let taken = pool.take(Language::Python, false).await.expect("a VM");
        assert_eq!(
            taken.vm.name(),
            hung,
            "the caller's own ping finds a hung VM"
        );
        assert_eq!(booter.destroyed.load(Ordering::SeqCst), 1, "the dead one");
        let calls = booter.calls.lock().unwrap();
        assert!(
            calls[before..].iter().all(|(_, c)| *c == "foreground"),
            "no ping"
        );
    }

    /// A pool of `size` per language, full, whose health check starts at the returned instant
    /// and whose pings take `ping_time` each.
    async fn checked_pool(
        size: usize,
        ping_time: Duration,
    ) -> (Arc<WarmPool<FakeVm>>, Booter, Instant) {
        let booter = Booter::new(admission(100));
        *booter.ping_time.lock().unwrap() = ping_time;
        let check = Instant::now() + limits::WARM_POOL_HEALTH_INTERVAL;
        let (pool, _task) = start(size, &booter);
        until("full pool", || idle(&pool) == 3 * size).await;
        (pool, booter, check)
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_waits_for_its_languages_only_vm_to_come_back_from_its_health_check() {
        let (pool, _booter, check) = checked_pool(1, Duration::from_millis(30)).await;
        let name = pool.idle_names(Language::Python)[0].clone();
        // Python's VM is pinged first, from `check` to `check` + 30 ms.
        tokio::time::sleep_until(check + Duration::from_millis(10)).await;
        assert!(
            pool.idle_names(Language::Python).is_empty(),
            "out for its ping"
        );
        let asked = Instant::now();
        let taken = pool
            .take(Language::Python, false)
            .await
            .expect("the checked VM");
        assert_eq!(taken.vm.name(), name);
        assert_eq!(asked.elapsed(), Duration::from_millis(20));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_health_check_delays_a_run_by_a_bounded_wait_and_other_vms_not_at_all() {
        let (pool, _booter, check) = checked_pool(2, Duration::from_secs(1)).await;
        let [first, second] = [0, 1].map(|i| pool.idle_names(Language::Python)[i].clone());
        tokio::time::sleep_until(check + Duration::from_millis(10)).await;
        // One VM at a time is out: the other is handed out at once.
        let asked = Instant::now();
        let taken = pool.take(Language::Python, false).await.expect("a VM");
        assert_eq!(
            (taken.vm.name(), asked.elapsed()),
            (&*second, Duration::ZERO)
        );
        // With none left in the pool, the wait for the one being pinged is bounded.
        let asked = Instant::now();
        assert!(pool.take(Language::Python, false).await.is_none());
        assert_eq!(asked.elapsed(), limits::WARM_POOL_CHECK_WAIT);
        // It answered in the end: back in the pool.
        until("back", || {
            pool.idle_names(Language::Python).contains(&first)
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_check_cut_short_leaves_no_vm_counted_out() {
        let booter = Booter::new(admission(100));
        *booter.ping_time.lock().unwrap() = Duration::from_secs(1);
        let check = Instant::now() + limits::WARM_POOL_HEALTH_INTERVAL;
        let (pool, task) = start(1, &booter);
        until("full pool", || idle(&pool) == 3).await;
        tokio::time::sleep_until(check + Duration::from_millis(10)).await;
        assert!(
            pool.idle_names(Language::Python).is_empty(),
            "out for its ping"
        );
        // The task ends mid-ping (its runtime ended, say): the VM goes with it.
        task.abort();
        let _ = task.await;
        let asked = Instant::now();
        assert!(pool.take(Language::Python, false).await.is_none());
        assert_eq!(asked.elapsed(), Duration::ZERO, "nothing to wait for");
    }

    #[tokio::test(start_paused = true)]
    async fn dead_and_hung_idle_vms_are_replaced() {
        let booter = Booter::new(admission(100));
        let (pool, _task) = start(1, &booter);
        until("full pool", || idle(&pool) == 3).await;
        let hung = pool.idle_names(Language::Python)[0].clone();
        booter.flags(&hung).1.store(true, Ordering::SeqCst);
        let dead = pool.idle_names(Language::Raw)[0].clone();
        booter.flags(&dead).0.store(true, Ordering::SeqCst);
        // The periodic health check finds both (the dead one may go sooner).
        tokio::time::sleep(limits::WARM_POOL_HEALTH_INTERVAL + Duration::from_secs(1)).await;
        until("replacements", || {
            idle(&pool) == 3
                && !pool.idle_names(Language::Python).contains(&hung)
                && !pool.idle_names(Language::Raw).contains(&dead)
        })
        .await;
        assert_eq!(booter.destroyed.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn refills_stay_within_the_budget_and_give_way_to_runs() {
        let admission = admission(2);
        let booter = Booter::new(admission.clone());
        let (pool, _task) = start(1, &booter);
        until("two warm VMs", || idle(&pool) == 2).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(idle(&pool), 2, "the third does not fit");
        // A run that needs room evicts an idle VM, and the refill does not take the room back
        // while the run is announced.
        let announced = admission.announce();
        assert!(admission.budget_is_short(VM));
        assert!(pool.evict_one().await);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let permit = admission.try_admit(VM);
        assert!(permit.is_none(), "announced runs go through the queue");
        drop(announced);
        assert!(admission.try_admit(VM).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn boot_failures_back_off() {
        let booter = Booter::new(admission(100));
        booter.failing.store(true, Ordering::SeqCst);
        let (pool, _task) = start(1, &booter);
        tokio::time::sleep(Duration::from_secs(30)).await;
        let attempts = booter.attempts.load(Ordering::SeqCst);
        // 2 + 4 + 8 + 16 s between attempts: 4 or 5 in 30 s, not hundreds.
        assert!((3..=5).contains(&attempts), "{attempts} attempts");
        booter.failing.store(false, Ordering::SeqCst);
        until("recovered", || idle(&pool) == 3).await;
    }

    #[tokio::test(start_paused = true)]
    async fn closing_drains_and_a_gone_scheduler_ends_the_task() {
        let booter = Booter::new(admission(100));
        let (pool, task) = start(1, &booter);
        until("full pool", || idle(&pool) == 3).await;
        assert_eq!(pool.close().len(), 3);
        assert!(pool.take(Language::Python, true).await.is_none());
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("the task ends once the pool is closed")
            .unwrap();

        let pool = Arc::new(WarmPool::<FakeVm>::new(1));
        let task = tokio::spawn(maintain(pool.clone(), || None::<Booter>));
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("the task ends when the scheduler is gone")
            .unwrap();
        assert_eq!(idle(&pool), 0);
    }
}
