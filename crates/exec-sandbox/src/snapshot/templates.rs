//! The scheduler's side of L1: building templates (now or in the background), restoring clones,
//! and what happens when a restore fails.
//!
//! A failed restore discards its entry (it may be corrupt) and the run boots cold; the next cold
//! boot of that shape rebuilds the template in the background. If a restore of the same key
//! fails [`MAX_RESTORE_FAILURES`] times in one process, restoring is broken on this host for
//! that shape: the key is neither restored nor rebuilt again by this process, so a broken host
//! costs at most that many failed restores and one extra template build, not one of each per
//! run.

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use sbx_protocol::Language;

use super::cache::{Cache, SnapshotError};
use super::key::{KeyInputs, cache_key, qemu_identity};
use super::standby::Standbys;
use crate::background::Background;
use crate::vm::jail::Credentials;
use crate::vm::migration::Warmup;
use crate::vm::qemu::VmSpec;
use crate::vm::{Qemu, Vm, VmError};

/// Deadline of a restore, from QEMU's start to the reseeded guest.
pub(crate) const RESTORE_DEADLINE: Duration = Duration::from_secs(10);
/// Deadline of the interpreter warm-up in a template.
const WARM_DEADLINE: Duration = Duration::from_secs(60);
/// Deadline of a warm-up that also imports a package set's modules (pandas takes ~25 s under
/// TCG when its bytecode is not precompiled).
const WARM_MODULES_DEADLINE: Duration = Duration::from_secs(300);
/// Failed restores of one key after which this process stops restoring and rebuilding it.
pub(crate) const MAX_RESTORE_FAILURES: u32 = 2;

/// Boots a template with `spec`, warms it as `warmup` says, saves it and publishes it under
/// `key`. `Ok(None)` when another process is building the same key.
pub(crate) async fn build(
    cache: &Cache,
    qemu: &Qemu,
    spec: &VmSpec,
    warmup: &Warmup,
    key: &str,
    boot_deadline: Duration,
) -> Result<Option<PathBuf>, SnapshotError> {
    let Some(pending) = cache.begin(key)? else {
        return Ok(None);
    };
    static TEMPLATES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut spec = spec.clone();
    // Nobody waits for a template: runs boot or restore on their own meanwhile.
    spec.cpu_background = true;
    // Told apart from run VMs in `ps` (and by tests that look for a run's leftovers).
    spec.name = format!(
        "sbx-template-{}-{}",
        std::process::id(),
        TEMPLATES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    // The RAM file belongs to QEMU's user: QEMU reopens it read-write through /proc/self/fd.
    let jail = qemu.jail.clone();
    let credentials = tokio::task::spawn_blocking(move || jail.credentials())
        .await
        .map_err(|e| {
            SnapshotError::Vm(VmError::Jail {
                name: spec.name.clone(),
                source: crate::vm::jail::JailError::Host {
                    action: "resolve the QEMU user".into(),
                    source: std::io::Error::other(e),
                },
            })
        })?
        .map_err(|source| {
            SnapshotError::Vm(VmError::Jail {
                name: spec.name.clone(),
                source,
            })
        })?;
    let owner = match credentials {
        Credentials::Switch(id) => Some((id.uid, id.gid)),
        Credentials::Caller(_) => None,
    };
    let ram = pending.ram_for_qemu(owner)?;
    let vm = Vm::boot_template(qemu, &spec, ram, boot_deadline)
        .await
        .map_err(SnapshotError::Vm)?;
    let deadline = if warmup.modules.is_empty() {
        WARM_DEADLINE
    } else {
        WARM_MODULES_DEADLINE
    };
    vm.warm(warmup, deadline).await.map_err(SnapshotError::Vm)?;
    // The template runs what every clone runs first, the reseed and (pooled or not) an
    // execution, here the warm pool's primer, before its snapshot. A clone then finds those
    // paths already run once: the interpreter's code for them in the guest's page cache (a
    // clone would otherwise read it from its disk: Bun's file reads for its reseed, CPython's
    // compile-and-run) and their lazy set-up done. A clone still translates them (QEMU's
    // translation cache is per process), but no longer waits for the guest's disk nor repeats
    // the set-up. The template's own reseed changes nothing a clone keeps: each reseeds again.
    vm.reseed(RESTORE_DEADLINE)
        .await
        .map_err(SnapshotError::Vm)?;
    // Once: run 64 times, JavaScriptCore compiled the driver's code in the template and
    // every clone then translated that machine code instead of the shared interpreter's, and
    // a full collection there (`Bun.gc(true)`) did the same (JavaScript L1 p50 214 -> 342-345
    // ms, warm 56 -> 79-81 ms, idle PSS 61 -> 87 MB; measured with Bun's GC timer off).
    crate::execute::prime(
        vm.link(),
        warmup.language,
        crate::execute::Primed::Template,
        crate::limits::host_timeout_grace(spec.accelerator),
    )
    .await
    .map_err(SnapshotError::Vm)?;
    let hello = vm.hello().clone();
    let vmstate_path = pending.vmstate();
    let vmstate = pending.create_vmstate()?;
    vm.save_template(&vmstate)
        .await
        .map_err(SnapshotError::Vm)?;
    vmstate.sync_all().map_err(|source| SnapshotError::Io {
        action: "sync",
        path: vmstate_path,
        source,
    })?;
    drop(vmstate);
    let published = cache.commit(pending, warmup.language, &hello)?;
    for evicted in cache.evict(key) {
        tracing::info!(dir = %evicted.display(), "evicted a memory snapshot (cache full)");
    }
    Ok(Some(published))
}

/// The cache, the QEMU identity, the background builds and the restore failures of one
/// scheduler.
#[derive(Debug, Default)]
pub(crate) struct Templates {
    cache: Option<Cache>,
    qemu_identity: OnceLock<String>,
    building: Arc<Mutex<HashSet<String>>>,
    /// Failed restores per key in this process.
    failed: Mutex<HashMap<String, u32>>,
    tasks: Background,
    /// Clones started ahead of foreground restores, when on.
    standbys: Option<Standbys>,
}

impl Templates {
    /// Templates in `cache`, or none at all (L1 switched off); with `standby`, a standby clone
    /// is kept for each template a foreground run was restored from.
    pub(crate) fn new(cache: Option<Cache>, standby: bool) -> Self {
        Self {
            cache,
            qemu_identity: OnceLock::new(),
            building: Arc::default(),
            failed: Mutex::default(),
            tasks: Background::default(),
            standbys: standby.then(Standbys::default),
        }
    }

    /// Whether L1 is on.
    pub(crate) fn enabled(&self) -> bool {
        self.cache.is_some()
    }

    /// The cache key of a template for `language` shaped like `spec`.
    pub(crate) fn key(
        &self,
        qemu: &Qemu,
        language: Language,
        spec: &VmSpec,
        asset_version: &str,
    ) -> String {
        let identity = self
            .qemu_identity
            .get_or_init(|| qemu_identity(&qemu.binary));
        cache_key(&KeyInputs {
            language,
            spec,
            asset_version,
            qemu: identity,
        })
    }

    /// A clone of `key`'s template, or `None` (no template, L1 off, restoring given up for this
    /// key, or the restore failed: then the entry is discarded and the caller boots cold).
    /// `nic` is the NIC backend socket of a networked clone. A foreground restore without a NIC
    /// resumes the key's standby clone when there is one, and starts the next standby.
    pub(crate) async fn restore(
        &self,
        qemu: &Qemu,
        spec: &VmSpec,
        key: &str,
        nic: Option<OwnedFd>,
    ) -> Option<Vm> {
        let cache = self.cache.as_ref()?;
        if self.given_up(key) {
            return None;
        }
        let standbys = self
            .standbys
            .as_ref()
            .filter(|_| nic.is_none() && !spec.cpu_background);
        if let Some(standbys) = standbys
            && let Some(standby) = standbys.take(key)
        {
            standby.to_foreground();
            // The next one starts now: a run as short as raw's `echo` restores and returns in
            // less time than a standby takes to start (~20 ms), and the next run would miss it.
            standbys.replenish(cache, qemu, spec, key);
            let name = standby.name().to_string();
            match standby.resume(RESTORE_DEADLINE).await {
                Ok(vm) => return Some(vm),
                // The entry is checked afresh by the restore below.
                Err(e) => {
                    tracing::warn!(vm = %name, key, error = %crate::vm::error_chain(&e), "a standby clone failed to resume; restoring afresh")
                }
            }
        }
        let (saved, dir) = cache.open(key)?.into_saved();
        match Vm::restore(qemu, spec, saved, nic, RESTORE_DEADLINE).await {
            Ok(vm) => {
                if let Some(standbys) = standbys {
                    standbys.replenish(cache, qemu, spec, key);
                }
                Some(vm)
            }
            Err(e) => {
                tracing::warn!(key, error = %crate::vm::error_chain(&e), "restoring a memory snapshot failed; booting cold");
                self.restore_failed(cache, key, &dir, &e);
                None
            }
        }
    }

    /// Records a failed restore: the entry is discarded unless QEMU never started (then the
    /// entry is not to blame), and the key counts one more failure.
    fn restore_failed(&self, cache: &Cache, key: &str, dir: &Path, error: &VmError) {
        if !matches!(
            error,
            VmError::Spawn { .. } | VmError::Prepare { .. } | VmError::Jail { .. }
        ) {
            cache.discard(dir);
        }
        if let Ok(mut failed) = self.failed.lock() {
            *failed.entry(key.to_string()).or_default() += 1;
        }
    }

    /// Whether this process gave up restoring (and rebuilding) `key`.
    fn given_up(&self, key: &str) -> bool {
        self.failed
            .lock()
            .map(|f| f.get(key).is_some_and(|n| *n >= MAX_RESTORE_FAILURES))
            .unwrap_or(true)
    }

    /// Builds `key`'s template in the background unless it exists, is being built, or this
    /// process gave up on it.
    pub(crate) fn build_in_background(
        &self,
        qemu: Qemu,
        spec: VmSpec,
        warmup: Warmup,
        key: String,
        boot_deadline: Duration,
        budget: impl Send + 'static,
    ) {
        let language = warmup.language;
        let Some(cache) = self.cache.clone() else {
            return;
        };
        if self.given_up(&key) || cache.entry_dir(&key).join(super::META).exists() {
            return;
        }
        if !self
            .building
            .lock()
            .map(|mut b| b.insert(key.clone()))
            .unwrap_or(false)
        {
            return;
        }
        let building = self.building.clone();
        let task = tokio::spawn(async move {
            // The template VM's share of the host budget, held until it is gone.
            let _budget = budget;
            let started = std::time::Instant::now();
            match build(&cache, &qemu, &spec, &warmup, &key, boot_deadline).await {
                Ok(Some(dir)) => {
                    tracing::debug!(%language, dir = %dir.display(), elapsed_ms = started.elapsed().as_millis() as u64, "saved a memory snapshot")
                }
                Ok(None) => tracing::debug!(%language, "another process is saving this snapshot"),
                Err(e) => {
                    tracing::warn!(%language, error = %crate::vm::error_chain(&e), "cannot save a memory snapshot")
                }
            }
            if let Ok(mut b) = building.lock() {
                b.remove(&key);
            }
        });
        self.tasks.track(task);
    }

    /// Builds `key`'s template now unless a valid one exists. True when one is ready after.
    pub(crate) async fn ensure(
        &self,
        qemu: &Qemu,
        spec: &VmSpec,
        warmup: &Warmup,
        key: &str,
        boot_deadline: Duration,
    ) -> Result<bool, SnapshotError> {
        let Some(cache) = &self.cache else {
            return Ok(false);
        };
        if cache.open(key).is_some() {
            return Ok(true);
        }
        Ok(build(cache, qemu, spec, warmup, key, boot_deadline)
            .await?
            .is_some())
    }

    /// The on-disk cache: its directory, entries and bytes (none when L1 is off).
    pub(crate) fn usage(&self) -> Option<(PathBuf, usize, u64)> {
        let cache = self.cache.as_ref()?;
        let (entries, bytes) = cache.usage();
        Some((cache.dir().to_path_buf(), entries, bytes))
    }

    /// Removes every template (clones running keep the files they mapped). Returns how many
    /// entries went.
    pub(crate) fn prune(&self) -> usize {
        let Some(cache) = &self.cache else {
            return 0;
        };
        // Standbys hold their (soon unlinked) files open.
        if let Some(standbys) = &self.standbys {
            standbys.clear();
        }
        Cache::new(cache.dir().to_path_buf(), 0).evict("").len()
    }

    /// Whether background builds are running.
    pub(crate) fn pending(&self) -> bool {
        self.tasks.pending()
    }

    /// Abandons the background builds and waits until their template VMs are gone.
    pub(crate) async fn abort(&self) {
        self.tasks.abort().await;
        if let Some(standbys) = &self.standbys {
            standbys.abort().await;
        }
    }

    /// The VM names of the standby clones ready now.
    #[cfg(feature = "testing")]
    pub(crate) fn standby_names(&self) -> Vec<String> {
        self.standbys
            .as_ref()
            .map(Standbys::names)
            .unwrap_or_default()
    }

    /// Waits for the background builds (a one-shot process calls this before exiting, or its
    /// template would die with it).
    pub(crate) async fn wait(&self) {
        self.tasks.wait().await;
    }
}

impl Drop for Templates {
    /// Background builds end with the scheduler; their template VMs are killed on drop.
    fn drop(&mut self) {
        self.tasks.abort_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::cache::tests::publish;
    use crate::vm::tests::unbootable_spec;

    /// `false` stands in for a QEMU that dies while loading the snapshot.
    const DYING_QEMU: &str = "/bin/false";

    fn qemu(binary: &str) -> Qemu {
        Qemu::new(binary.into(), None)
    }

    #[tokio::test]
    async fn a_failed_restore_discards_the_entry_and_allows_one_rebuild() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path().to_path_buf(), u64::MAX);
        let templates = Templates::new(Some(cache.clone()), false);
        let qemu = &qemu(DYING_QEMU);
        // Each restore is its own VM with its own name, as in production: a name used again
        // could meet the previous VM's cgroup being removed, fail to join it, and count as a
        // QEMU that never started.

        let dir = publish(&cache, "k", b"device state");
        assert!(
            templates
                .restore(qemu, &unbootable_spec(), "k", None)
                .await
                .is_none()
        );
        assert!(
            !dir.exists(),
            "an entry that failed to restore is discarded"
        );
        assert!(
            !templates.given_up("k"),
            "the next cold boot may rebuild it"
        );

        // The rebuilt entry is tried, fails again: restoring this key is given up.
        let dir = publish(&cache, "k", b"device state");
        assert!(
            templates
                .restore(qemu, &unbootable_spec(), "k", None)
                .await
                .is_none()
        );
        assert!(!dir.exists());
        assert!(templates.given_up("k"));

        // Neither restored nor rebuilt any more in this process; other keys are unaffected.
        publish(&cache, "k", b"device state");
        assert!(
            templates
                .restore(qemu, &unbootable_spec(), "k", None)
                .await
                .is_none()
        );
        assert!(
            cache.open("k").is_some(),
            "a given-up key's entry is left alone"
        );
        assert!(!templates.given_up("other"));
    }

    #[tokio::test]
    async fn a_qemu_that_cannot_start_does_not_discard_the_entry() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path().to_path_buf(), u64::MAX);
        let templates = Templates::new(Some(cache.clone()), false);
        let dir = publish(&cache, "k", b"device state");
        let missing = &qemu("/nonexistent/qemu");
        assert!(
            templates
                .restore(missing, &unbootable_spec(), "k", None)
                .await
                .is_none()
        );
        assert!(dir.exists(), "the entry is not to blame");
    }

    #[tokio::test]
    async fn given_up_keys_are_not_rebuilt() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path().to_path_buf(), u64::MAX);
        let templates = Templates::new(Some(cache.clone()), false);
        templates
            .failed
            .lock()
            .unwrap()
            .insert("k".into(), MAX_RESTORE_FAILURES);
        templates.build_in_background(
            qemu(DYING_QEMU),
            unbootable_spec(),
            Language::Python.into(),
            "k".into(),
            Duration::from_secs(1),
            (),
        );
        assert_eq!(templates.tasks.len(), 0, "no build was started");
        // A key not given up does start a build (which fails: `false` is no QEMU).
        templates.build_in_background(
            qemu(DYING_QEMU),
            unbootable_spec(),
            Language::Python.into(),
            "fresh".into(),
            Duration::from_secs(1),
            (),
        );
        assert_eq!(templates.tasks.len(), 1);
        templates.wait().await;
    }
}
