//! Reaping of every child (PID 1 inherits all orphans) without stealing the exit statuses of
//! the interpreters the agent spawned.
//!
//! One task waits for SIGCHLD and calls `waitpid(-1, WNOHANG)` until nothing is left; a status
//! whose pid was registered at spawn time goes to its waiter, any other (an orphan) is dropped.
//! Spawning and reaping hold the same lock, so a child cannot be reaped before it is registered.
//! Nothing else in the agent may wait for children (no `tokio::process`).

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::oneshot;

use crate::log;
use crate::sys::{self, WaitStatus};

type Waiters = HashMap<i32, oneshot::Sender<WaitStatus>>;

/// Handle to the reaper task.
#[derive(Debug, Clone)]
pub struct Reaper {
    waiters: Arc<Mutex<Waiters>>,
}

impl Reaper {
    /// Installs the SIGCHLD handler and starts reaping. Must run inside the tokio runtime,
    /// before anything is spawned.
    pub fn start() -> io::Result<Reaper> {
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Reaper {
            waiters: Arc::default(),
        };
        let task = reaper.clone();
        tokio::spawn(async move {
            // Children that ended before the handler existed.
            task.reap_all();
            while sigchld.recv().await.is_some() {
                task.reap_all();
            }
        });
        Ok(reaper)
    }

    fn lock(&self) -> MutexGuard<'_, Waiters> {
        // A panic while holding the lock leaves the map consistent (single inserts/removes).
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawns `command` and returns the child with a receiver of its exit status.
    pub fn spawn(
        &self,
        command: &mut Command,
    ) -> io::Result<(Child, oneshot::Receiver<WaitStatus>)> {
        let mut waiters = self.lock();
        let child = command.spawn()?;
        let (tx, rx) = oneshot::channel();
        let pid = i32::try_from(child.id()).map_err(|_| io::Error::other("pid out of range"))?;
        waiters.insert(pid, tx);
        Ok((child, rx))
    }

    fn reap_all(&self) {
        let mut waiters = self.lock();
        loop {
            match sys::reap_any() {
                Ok(Some((pid, status))) => {
                    if let Some(tx) = waiters.remove(&pid) {
                        // The waiter may be gone (interpreter dropped); nothing to do then.
                        let _ = tx.send(status);
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    log::warn(format_args!("waitpid failed: {e}"));
                    return;
                }
            }
        }
    }
}
