//! Standby clones: for each template a run was restored from, one clone's QEMU started ahead of
//! the next run ([`Standby`]: spawned in its jail and cgroup with the template's files, its
//! device state loaded, the guest paused). The next foreground restore of that template takes
//! it and is left with `cont` and the reseed; a replacement starts in the background at once.
//! A standby has a VM name of its own (`sbx-<pid>-<n>`), which the run's VM keeps.
//!
//! What it saves: QEMU's process start and initialisation up to its monitor, and the load: ~15
//! of a clone's ~17 ms host-side start on the 2-core build machine (`docs/measurements.md`).
//! What it costs: one idle QEMU per template in use (~9 MB PSS; no guest runs, its RAM mapping
//! is untouched), started at the background CPU weight. Only clones without a NIC use standbys
//! (a networked clone's NIC socket belongs to its run's gateway), and warm-pool refills do not
//! (nobody waits for them).
//!
//! A standby holds its template's RAM file open for as long as it waits. A compromised clone
//! can write to that file (`snapshot` module docs), so the file's stamp is checked again when
//! the standby is taken, as [`super::Cache::open`] checks it before a restore: a standby whose
//! RAM changed is killed, never resumed.

use std::collections::HashSet;
use std::fs::File;
use std::sync::{Arc, Mutex};

use super::cache::{Cache, RamStamp};
use super::templates::RESTORE_DEADLINE;
use crate::background::Background;
use crate::vm::Qemu;
use crate::vm::migration::Standby;
use crate::vm::qemu::VmSpec;

/// Standbys kept at once, over all keys: the least recently started goes first (a long-lived
/// scheduler restoring many package sets would otherwise keep one per set it ever restored).
pub(crate) const MAX_STANDBYS: usize = 4;

/// One standby and what its RAM file must still be.
struct Ready {
    standby: Standby,
    /// The RAM file QEMU mapped (a second descriptor of it).
    ram: File,
    /// Its stamp when the entry was published.
    stamp: RamStamp,
    /// The async runtime its sockets and process watch are registered with: a scheduler shared
    /// by several runtimes (each `#[tokio::test]` has its own) resumes a standby only on the
    /// runtime that started it, which may be gone by then.
    runtime: Option<tokio::runtime::Id>,
}

/// The current async runtime.
fn runtime() -> Option<tokio::runtime::Id> {
    tokio::runtime::Handle::try_current().ok().map(|h| h.id())
}

impl Ready {
    /// Whether the RAM file is still the one published.
    fn intact(&self) -> bool {
        self.ram
            .metadata()
            .is_ok_and(|meta| RamStamp::of(&meta) == self.stamp)
    }
}

/// The standbys ready (oldest first) and the keys whose standby is starting.
#[derive(Default)]
struct State {
    ready: Vec<(String, Ready)>,
    starting: HashSet<String>,
}

/// The standby clones of one scheduler: at most one per template key (two at concurrency 2 on
/// the 2-core build machine measured no better throughput, `docs/measurements.md`) and
/// [`MAX_STANDBYS`] in all.
#[derive(Default)]
pub(crate) struct Standbys {
    state: Arc<Mutex<State>>,
    tasks: Background,
}

impl std::fmt::Debug for Standbys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ready: Vec<String> = self
            .state
            .lock()
            .map(|s| s.ready.iter().map(|(key, _)| key.clone()).collect())
            .unwrap_or_default();
        f.debug_struct("Standbys").field("ready", &ready).finish()
    }
}

impl Standbys {
    /// The standby of `key`, if one is ready and its RAM file unchanged (a changed one is
    /// killed).
    pub(crate) fn take(&self, key: &str) -> Option<Standby> {
        let ready = {
            let mut state = self.state.lock().ok()?;
            let at = state.ready.iter().position(|(k, _)| k == key)?;
            state.ready.remove(at).1
        };
        if ready.runtime.is_none() || ready.runtime != runtime() {
            tracing::debug!(vm = %ready.standby.name(), key, "a standby clone of another async runtime: killed");
            return None;
        }
        if ready.intact() {
            return Some(ready.standby);
        }
        tracing::warn!(
            vm = %ready.standby.name(),
            key,
            "a standby clone's template RAM file changed after it started: killed, not resumed"
        );
        None
    }

    /// Starts a standby for `key` in the background, shaped like `spec` (under a name of its
    /// own, which the VM keeps when a run takes it), unless one is ready or starting.
    pub(crate) fn replenish(&self, cache: &Cache, qemu: &Qemu, spec: &VmSpec, key: &str) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        if state.ready.iter().any(|(k, _)| k == key) || !state.starting.insert(key.to_string()) {
            return;
        }
        drop(state);
        let spec = VmSpec {
            name: crate::vm::unique_name(),
            cpu_background: true,
            ..spec.clone()
        };
        let (cache, qemu, key) = (cache.clone(), qemu.clone(), key.to_string());
        let starting = Starting {
            state: self.state.clone(),
            key,
        };
        self.tasks.spawn(async move {
            let started = start(&cache, &qemu, &spec, &starting.key).await;
            // Killed outside the lock.
            let mut evicted = Vec::new();
            if let Some(started) = started
                && let Ok(mut state) = starting.state.lock()
            {
                state.ready.push((starting.key.clone(), started));
                let excess = state.ready.len().saturating_sub(MAX_STANDBYS);
                evicted.extend(state.ready.drain(..excess));
            }
            drop(starting);
            drop(evicted);
        });
    }

    /// Kills every standby (and any starting) and waits until they are gone.
    pub(crate) async fn abort(&self) {
        self.tasks.abort().await;
        for (_, ready) in self.drain() {
            ready.standby.destroy().await;
        }
    }

    /// The VM names of the standbys ready now.
    #[cfg(feature = "testing")]
    pub(crate) fn names(&self) -> Vec<String> {
        self.state
            .lock()
            .map(|s| {
                s.ready
                    .iter()
                    .map(|(_, ready)| ready.standby.name().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Kills every standby now (in the background).
    pub(crate) fn clear(&self) {
        drop(self.drain());
    }

    /// Takes every standby ready out of the state (to be killed outside its lock).
    fn drain(&self) -> Vec<(String, Ready)> {
        self.state
            .lock()
            .map(|mut s| s.ready.drain(..).collect())
            .unwrap_or_default()
    }
}

impl Drop for Standbys {
    /// Standbys starting are abandoned (their QEMU killed); those ready are killed with the
    /// state.
    fn drop(&mut self) {
        self.tasks.abort_now();
    }
}

/// A key's standby starting: the key leaves `starting` when this goes, with the task or with
/// its runtime.
struct Starting {
    state: Arc<Mutex<State>>,
    key: String,
}

impl Drop for Starting {
    fn drop(&mut self) {
        if let Ok(mut state) = self.state.lock() {
            state.starting.remove(&self.key);
        }
    }
}

/// Opens `key`'s entry and starts a standby of it; `None` (logged) when there is no valid
/// entry or QEMU could not be readied.
async fn start(cache: &Cache, qemu: &Qemu, spec: &VmSpec, key: &str) -> Option<Ready> {
    let entry = cache.open(key)?;
    let stamp = entry.meta.ram_stamp;
    let ram = match entry.ram.try_clone() {
        Ok(ram) => ram,
        Err(e) => {
            tracing::debug!(key, error = %e, "cannot start a standby clone");
            return None;
        }
    };
    let (saved, _) = entry.into_saved();
    match Standby::start(qemu, spec, saved, None, RESTORE_DEADLINE).await {
        Ok(standby) => Some(Ready {
            standby,
            ram,
            stamp,
            runtime: runtime(),
        }),
        Err(e) => {
            tracing::debug!(key, error = %crate::vm::error_chain(&e), "cannot start a standby clone");
            None
        }
    }
}
