//! Tasks a scheduler runs in the background and may have to wait for or stop: memory
//! snapshots being saved, package layers being uploaded, and the teardown of VMs whose run
//! already returned.
//!
//! A run's teardown: killing QEMU and reaping it takes a few milliseconds (the kernel tears
//! down its address space), and nothing in a run's result needs it: the host's figures are
//! read first. So a run reads them, hands its VM to a background task with everything the VM
//! holds (its admission share, its slot of `max_concurrent_vms`, its package layer) and
//! returns. Those are released only once QEMU is gone, so the budget never counts a VM as gone
//! early. [`Scheduler::shutdown`] waits for every teardown; a runtime that ends first drops
//! them, and dropping a VM kills its QEMU.
//!
//! [`Scheduler::shutdown`]: crate::Scheduler::shutdown

use std::future::Future;
use std::sync::Mutex;

use tokio::task::JoinHandle;

/// Background tasks started so far (finished ones are dropped as new ones come).
#[derive(Debug, Default)]
pub(crate) struct Background(Mutex<Vec<JoinHandle<()>>>);

impl Background {
    /// Runs `task` on the current runtime, tracked.
    pub(crate) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.track(tokio::spawn(task));
    }

    /// Tracks a task already spawned.
    pub(crate) fn track(&self, task: JoinHandle<()>) {
        if let Ok(mut tasks) = self.0.lock() {
            tasks.retain(|t| !t.is_finished());
            tasks.push(task);
        }
    }

    /// Whether a task is still running.
    pub(crate) fn pending(&self) -> bool {
        self.0
            .lock()
            .map(|t| t.iter().any(|task| !task.is_finished()))
            .unwrap_or(false)
    }

    /// Returns once every task has ended, those started while waiting included (a task
    /// dropped with its runtime has ended too).
    pub(crate) async fn wait(&self) {
        loop {
            let tasks = self.drain();
            if tasks.is_empty() {
                return;
            }
            for task in tasks {
                let _ = task.await;
            }
        }
    }

    /// Stops every task and waits until each is dropped.
    pub(crate) async fn abort(&self) {
        for task in self.drain() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Stops every task without waiting (for `Drop`).
    pub(crate) fn abort_now(&self) {
        for task in self.drain() {
            task.abort();
        }
    }

    /// How many tasks are tracked, finished ones not yet dropped included.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.0.lock().map(|t| t.len()).unwrap_or(0)
    }

    fn drain(&self) -> Vec<JoinHandle<()>> {
        self.0
            .lock()
            .map(|mut t| t.drain(..).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn wait_returns_once_every_task_has_ended() {
        let tasks = Background::default();
        tasks.wait().await;
        let started = tokio::time::Instant::now();
        for ms in [30, 10, 20] {
            tasks.spawn(tokio::time::sleep(Duration::from_millis(ms)));
        }
        assert!(tasks.pending());
        tasks.wait().await;
        assert_eq!(started.elapsed(), Duration::from_millis(30));
        assert!(!tasks.pending());
    }

    #[test]
    fn a_task_dropped_with_its_runtime_is_no_longer_pending() {
        let tasks = Background::default();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            tasks.spawn(std::future::pending());
        });
        assert!(tasks.pending());
        drop(runtime);
        assert!(!tasks.pending());
    }

    #[tokio::test(start_paused = true)]
    async fn abort_stops_every_task() {
        let tasks = Background::default();
        tasks.spawn(std::future::pending());
        tasks.abort().await;
        assert!(!tasks.pending());
        tasks.wait().await;
    }
}
