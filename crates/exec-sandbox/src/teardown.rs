//! VMs being destroyed after their run returned.
//!
//! Killing QEMU and reaping it takes a few milliseconds (the kernel tears down its address
//! space), and nothing in a run's result needs it: the host's figures are read first. So a run
//! reads them, hands its VM here with everything the VM holds (its admission share, its slot
//! of `max_concurrent_vms`, its package layer) and returns. Those are released only once QEMU
//! is gone, so the budget never counts a VM as gone early. [`Scheduler::shutdown`] waits for
//! every teardown; a runtime that ends first drops them, and dropping a VM kills its QEMU.
//!
//! [`Scheduler::shutdown`]: crate::Scheduler::shutdown

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

/// Counts teardowns in flight and wakes [`Teardowns::wait`] when none is left.
#[derive(Default)]
pub(crate) struct Teardowns {
    pending: AtomicUsize,
    idle: Notify,
}

impl Teardowns {
    /// Runs `teardown` on the current runtime, counted until it ends.
    pub(crate) fn spawn(self: &Arc<Self>, teardown: impl Future<Output = ()> + Send + 'static) {
        self.pending.fetch_add(1, Ordering::SeqCst);
        let done = Done(self.clone());
        tokio::spawn(async move {
            // Counted down even if the task is dropped (its runtime ended).
            let _done = done;
            teardown.await;
        });
    }

    /// How many are in flight.
    pub(crate) fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }

    /// Returns once no teardown is in flight.
    pub(crate) async fn wait(&self) {
        loop {
            let idle = self.idle.notified();
            let mut idle = std::pin::pin!(idle);
            // Registered before the check, so a teardown ending in between still wakes us.
            idle.as_mut().enable();
            if self.pending() == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// Counts one teardown down when dropped.
struct Done(Arc<Teardowns>);

impl Drop for Done {
    fn drop(&mut self) {
        if self.0.pending.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn wait_returns_once_every_teardown_has_ended() {
        let teardowns = Arc::new(Teardowns::default());
        teardowns.wait().await;
        let started = tokio::time::Instant::now();
        for ms in [30, 10, 20] {
            teardowns.spawn(tokio::time::sleep(Duration::from_millis(ms)));
        }
        assert_eq!(teardowns.pending(), 3);
        teardowns.wait().await;
        assert_eq!(started.elapsed(), Duration::from_millis(30));
        assert_eq!(teardowns.pending(), 0);
    }

    #[test]
    fn a_teardown_dropped_with_its_runtime_is_counted_down() {
        let teardowns = Arc::new(Teardowns::default());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            teardowns.spawn(std::future::pending());
        });
        assert_eq!(teardowns.pending(), 1);
        drop(runtime);
        assert_eq!(teardowns.pending(), 0);
    }
}
