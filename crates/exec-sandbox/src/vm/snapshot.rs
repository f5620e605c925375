//! L1 memory snapshots: warm templates saved once per cache key and restored instead of booted.
//!
//! A template is a VM booted with its RAM in a file (`share=on`) and its language's interpreter
//! warm; saving writes only the device state (`x-ignore-shared`), ~60 KB. A clone maps the RAM
//! file copy-on-write (`share=off`), so it loads in milliseconds and clones share pages.
//!
//! Layout under the cache directory, one directory per key:
//!
//! ```text
//! <key>/ram        guest RAM (sparse; never modified once published: clones map it)
//! <key>/vmstate    QEMU's device state stream
//! <key>/meta.json  sizes and the vmstate's sha256; its mtime is the last use (LRU)
//! <key>.lock       held while one process builds the template
//! ```
//!
//! An entry is built in `.tmp-<key>-…`, `meta.json` written last, and published by renaming
//! the directory: readers see a whole entry or none. A corrupt, truncated or unloadable entry
//! is renamed away and deleted, never loaded, and rebuilt later under the same key but as new
//! files (clones still running keep the old inodes). The cache is kept under a size bound by
//! evicting least recently used entries.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use sbx_protocol::{AgentHello, Event, Language, Request};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::qemu::{Launch, RamFile, VmSpec};
use super::{Vm, VmError};

/// Version of the on-disk layout and of what goes into a key.
pub const FORMAT: u32 = 1;
const META: &str = "meta.json";
const RAM: &str = "ram";
const VMSTATE: &str = "vmstate";
/// Longest accepted `meta.json`.
const MAX_META_BYTES: u64 = 16 * 1024;
/// Deadline of a restore, from QEMU's start to the reseeded guest.
pub const RESTORE_DEADLINE: Duration = Duration::from_secs(10);
/// Age after which a build directory is a leftover of a process that died while building.
const STALE_BUILD: Duration = Duration::from_secs(3600);
/// Deadline of the interpreter warm-up in a template.
const WARM_DEADLINE: Duration = Duration::from_secs(60);

/// A snapshot cache operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file operation failed.
    #[error("snapshot cache: cannot {action} {}", path.display())]
    Io {
        /// What we were doing.
        action: &'static str,
        /// Path involved.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The template VM failed.
    #[error("template VM failed")]
    Vm(#[source] VmError),
    /// The template's agent did not warm its interpreter.
    #[error("template VM could not warm its interpreter: {0}")]
    Warm(String),
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SnapshotError {
    let path = path.to_path_buf();
    move |source| SnapshotError::Io {
        action,
        path,
        source,
    }
}

/// What the saved files must be, written last when a template is saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// [`FORMAT`] at save time.
    pub format: u32,
    /// The cache key (also the directory name).
    pub key: String,
    /// The template's language.
    pub language: Language,
    /// sha256 of `vmstate`, checked before every restore.
    pub vmstate_sha256: String,
    /// Size of `vmstate`.
    pub vmstate_bytes: u64,
    /// Size of `ram` (the guest memory size).
    pub ram_bytes: u64,
    /// When it was saved (ms since the Unix epoch).
    pub created_unix_ms: u64,
    /// The template agent's version and protocol, given to clones as their hello.
    pub agent_version: String,
    /// The template agent's protocol version.
    pub protocol_version: u8,
}

/// Everything a clone must share with its template, hashed into a cache key.
#[derive(Debug, Clone)]
pub struct KeyInputs<'a> {
    /// The template's language.
    pub language: Language,
    /// The VM shape (name ignored; memory, CPUs, accelerator, devices, kernel command line).
    pub spec: &'a VmSpec,
    /// The guest asset version.
    pub asset_version: &'a str,
    /// Identity of the QEMU binary.
    pub qemu: &'a str,
}

/// The cache key of `inputs`: 32 hex digits of a sha256 over the crate version, [`FORMAT`],
/// the language, the asset version and the identity (size, mtime) of each asset file, the
/// QEMU binary's identity and the template's full command line with its name normalised.
pub fn cache_key(inputs: &KeyInputs<'_>) -> String {
    let mut h = Sha256::new();
    let mut field = |name: &str, value: &[u8]| {
        h.update(name.as_bytes());
        h.update((value.len() as u64).to_le_bytes());
        h.update(value);
    };
    field("crate", env!("CARGO_PKG_VERSION").as_bytes());
    field("format", &FORMAT.to_le_bytes());
    field("protocol", &[sbx_protocol::PROTOCOL_VERSION]);
    field("language", inputs.language.as_str().as_bytes());
    field("assets", inputs.asset_version.as_bytes());
    field("qemu", inputs.qemu.as_bytes());
    let files = [
        Some(&inputs.spec.kernel),
        Some(&inputs.spec.initramfs),
        inputs.spec.rootfs.as_ref(),
    ];
    for path in files.into_iter().flatten() {
        field("file", file_identity(path).as_bytes());
    }
    let mut spec = inputs.spec.clone();
    spec.name = "template".into();
    let launch = Launch {
        ram_file: Some(RamFile {
            path: RAM.into(),
            shared: true,
        }),
        qmp: true,
        incoming: false,
    };
    for arg in spec.args_for(&launch) {
        field("arg", arg.as_encoded_bytes());
    }
    hex::encode(&h.finalize()[..16])
}

/// Path, size and modification time: cheap, and changes when a file is replaced.
fn file_identity(path: &Path) -> String {
    match fs::metadata(path) {
        Ok(m) => format!(
            "{}:{}:{}.{}",
            path.display(),
            m.len(),
            m.mtime(),
            m.mtime_nsec()
        ),
        Err(_) => format!("{}:missing", path.display()),
    }
}

/// Identity of the QEMU binary: the resolved path, size and mtime (a `--version` would cost a
/// process start per scheduler).
pub fn qemu_identity(qemu: &Path) -> String {
    let resolved = if qemu.components().count() > 1 {
        Some(qemu.to_path_buf())
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(qemu))
                .find(|candidate| candidate.is_file())
        })
    };
    match resolved {
        Some(path) => file_identity(&fs::canonicalize(&path).unwrap_or(path)),
        None => format!("{}:unresolved", qemu.display()),
    }
}

/// A verified entry, ready to restore. Its files are open: a concurrent replacement of the
/// entry cannot pair this device state with another template's RAM.
#[derive(Debug)]
pub struct Entry {
    /// The entry's directory.
    pub dir: PathBuf,
    /// Its metadata.
    pub meta: Meta,
    /// The device state, open and rewound: the very file whose hash was checked.
    pub vmstate: File,
    /// The guest RAM file, open (QEMU reopens it through `/proc/self/fd`).
    pub ram: File,
}

impl Entry {
    /// What the template's agent said, given to clones.
    pub fn hello(&self) -> AgentHello {
        AgentHello {
            protocol_version: self.meta.protocol_version,
            agent_version: self.meta.agent_version.clone(),
            uptime_ms: 0,
            root_mounted: true,
        }
    }
}

/// A template being built: its temporary directory and the key's build lock.
#[derive(Debug)]
pub struct Pending {
    key: String,
    dir: PathBuf,
    published: bool,
    _lock: File,
}

impl Pending {
    /// Where QEMU creates the template's RAM.
    pub fn ram(&self) -> PathBuf {
        self.dir.join(RAM)
    }

    /// Where the device state goes.
    pub fn vmstate(&self) -> PathBuf {
        self.dir.join(VMSTATE)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.published {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// The on-disk cache of templates, bounded in size.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
    max_bytes: u64,
}

impl Cache {
    /// A cache in `dir` holding at most `max_bytes` (allocated bytes on disk).
    pub fn new(dir: PathBuf, max_bytes: u64) -> Self {
        Self { dir, max_bytes }
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn entry_dir(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// The entry for `key` if there is one and it checks out; a bad one is discarded. Marks the
    /// entry as used now.
    pub fn open(&self, key: &str) -> Option<Entry> {
        let dir = self.entry_dir(key);
        if !dir.exists() {
            return None;
        }
        match verify(&dir, key) {
            Ok(entry) => {
                // LRU clock: the metadata's mtime. Failing to touch it only skews eviction.
                let _ = File::options()
                    .write(true)
                    .open(dir.join(META))
                    .and_then(|f| f.set_modified(SystemTime::now()));
                Some(entry)
            }
            Err(reason) => {
                tracing::warn!(dir = %dir.display(), %reason, "discarding a bad memory snapshot");
                self.discard(&dir);
                None
            }
        }
    }

    /// Removes an entry: renamed away first (atomic for readers), then deleted. Clones mapping
    /// its RAM keep their (unlinked) file.
    pub fn discard(&self, dir: &Path) {
        let trash = self.dir.join(format!(
            ".trash-{}-{}-{}",
            dir.file_name().and_then(|n| n.to_str()).unwrap_or("entry"),
            std::process::id(),
            unique()
        ));
        if fs::rename(dir, &trash).is_ok() {
            let _ = fs::remove_dir_all(&trash);
        }
    }

    /// Starts building `key`, or `None` when another process is building it right now.
    pub fn begin(&self, key: &str) -> Result<Option<Pending>, SnapshotError> {
        fs::create_dir_all(&self.dir).map_err(io_error("create", &self.dir))?;
        let lock_path = self.dir.join(format!("{key}.lock"));
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_error("open", &lock_path))?;
        if !crate::sys::flock_exclusive(&lock, false).map_err(io_error("lock", &lock_path))? {
            return Ok(None);
        }
        let dir = self
            .dir
            .join(format!(".tmp-{key}-{}-{}", std::process::id(), unique()));
        fs::create_dir(&dir).map_err(io_error("create", &dir))?;
        Ok(Some(Pending {
            key: key.to_string(),
            dir,
            published: false,
            _lock: lock,
        }))
    }

    /// Seals a saved template: hashes the device state, writes `meta.json` last and publishes
    /// the directory under its key, replacing a bad entry if one is there.
    pub fn commit(
        &self,
        mut pending: Pending,
        language: Language,
        hello: &AgentHello,
    ) -> Result<PathBuf, SnapshotError> {
        let vmstate_path = pending.vmstate();
        let (vmstate_sha256, vmstate_bytes) =
            hash_file(&mut File::open(&vmstate_path).map_err(io_error("open", &vmstate_path))?)
                .map_err(io_error("read", &vmstate_path))?;
        let ram_path = pending.ram();
        let ram = File::open(&ram_path).map_err(io_error("open", &ram_path))?;
        ram.sync_all().map_err(io_error("sync", &ram_path))?;
        let ram_bytes = ram.metadata().map_err(io_error("stat", &ram_path))?.len();
        let meta = Meta {
            format: FORMAT,
            key: pending.key.clone(),
            language,
            vmstate_sha256,
            vmstate_bytes,
            ram_bytes,
            created_unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            agent_version: hello.agent_version.clone(),
            protocol_version: hello.protocol_version,
        };
        let meta_path = pending.dir.join(META);
        let text = serde_json::to_vec_pretty(&meta).expect("metadata serializes");
        fs::write(&meta_path, text).map_err(io_error("write", &meta_path))?;
        File::open(&meta_path)
            .and_then(|f| f.sync_all())
            .map_err(io_error("sync", &meta_path))?;
        let target = self.entry_dir(&pending.key);
        if target.exists() {
            // We hold the key's lock: whatever is there failed verification or is older.
            self.discard(&target);
        }
        fs::rename(&pending.dir, &target).map_err(io_error("publish", &target))?;
        pending.published = true;
        Ok(target)
    }

    /// Evicts least recently used entries (never `keep`) until the cache fits its bound, and
    /// clears leftovers of interrupted builds. Returns the evicted directories.
    pub fn evict(&self, keep: &str) -> Vec<PathBuf> {
        let Ok(read) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut entries: Vec<(SystemTime, u64, PathBuf)> = Vec::new();
        let mut total = 0u64;
        for item in read.filter_map(Result::ok) {
            let path = item.path();
            let name = item.file_name().to_string_lossy().into_owned();
            if !path.is_dir() {
                continue;
            }
            let stale_build = name.starts_with(".tmp-")
                && fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().unwrap_or_default() > STALE_BUILD);
            if name.starts_with(".trash-") || stale_build {
                let _ = fs::remove_dir_all(&path);
                continue;
            }
            let size = allocated_bytes(&path);
            total += size;
            if name.starts_with('.') || name == keep {
                continue;
            }
            let used = fs::metadata(path.join(META))
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            entries.push((used, size, path));
        }
        entries.sort();
        let mut evicted = Vec::new();
        for (_, size, path) in entries {
            if total <= self.max_bytes {
                break;
            }
            self.discard(&path);
            total = total.saturating_sub(size);
            evicted.push(path);
        }
        evicted
    }
}

/// Checks an entry against its metadata: format, key, RAM size, and the vmstate's size and
/// sha256 (it is small; the RAM file is too big to hash per run and is checked by size).
pub fn verify(dir: &Path, key: &str) -> Result<Entry, String> {
    // Every file is opened through one descriptor of the directory, so all of them come from
    // the same entry even if it is replaced meanwhile.
    let handle = File::open(dir).map_err(|e| format!("cannot open the entry: {e}"))?;
    let base = PathBuf::from(format!("/proc/self/fd/{}", handle.as_raw_fd()));
    let meta_path = base.join(META);
    let mut text = Vec::new();
    File::open(&meta_path)
        .and_then(|f| f.take(MAX_META_BYTES).read_to_end(&mut text))
        .map_err(|e| format!("cannot read {META}: {e}"))?;
    let meta: Meta = serde_json::from_slice(&text).map_err(|e| format!("bad {META}: {e}"))?;
    if meta.format != FORMAT || meta.key != key {
        return Err(format!(
            "{META} is for format {} key {}",
            meta.format, meta.key
        ));
    }
    let ram = File::open(base.join(RAM)).map_err(|e| format!("cannot open {RAM}: {e}"))?;
    let ram_bytes = ram
        .metadata()
        .map_err(|e| format!("cannot stat {RAM}: {e}"))?
        .len();
    if ram_bytes != meta.ram_bytes {
        return Err(format!(
            "{RAM} is {ram_bytes} bytes, expected {}",
            meta.ram_bytes
        ));
    }
    let mut vmstate =
        File::open(base.join(VMSTATE)).map_err(|e| format!("cannot open {VMSTATE}: {e}"))?;
    let (sha256, bytes) =
        hash_file(&mut vmstate).map_err(|e| format!("cannot read {VMSTATE}: {e}"))?;
    if bytes != meta.vmstate_bytes || sha256 != meta.vmstate_sha256 {
        return Err(format!(
            "{VMSTATE} does not match its checksum ({bytes} bytes)"
        ));
    }
    std::io::Seek::rewind(&mut vmstate).map_err(|e| format!("cannot rewind {VMSTATE}: {e}"))?;
    Ok(Entry {
        dir: dir.to_path_buf(),
        meta,
        vmstate,
        ram,
    })
}

fn hash_file(file: &mut File) -> io::Result<(String, u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok((hex::encode(h.finalize()), total));
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
}

/// Bytes a directory's files occupy on disk (sparse RAM files count what is allocated).
fn allocated_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|read| {
            read.filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

fn unique() -> u128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// Boots a template for `language` with `spec`, warms the interpreter, saves it and publishes
/// it under `key`. `Ok(None)` when another process is building the same key.
pub async fn build(
    cache: &Cache,
    qemu: &Path,
    spec: &VmSpec,
    language: Language,
    key: &str,
    boot_deadline: Duration,
) -> Result<Option<PathBuf>, SnapshotError> {
    let Some(pending) = cache.begin(key)? else {
        return Ok(None);
    };
    static TEMPLATES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut spec = spec.clone();
    // Told apart from run VMs in `ps` (and by tests that look for a run's leftovers).
    spec.name = format!(
        "sbx-template-{}-{}",
        std::process::id(),
        TEMPLATES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let vm = Vm::boot_template(qemu, &spec, &pending.ram(), boot_deadline)
        .await
        .map_err(SnapshotError::Vm)?;
    let mut warmed = vm
        .channel()
        .request(&Request::Warm(language))
        .await
        .map_err(|e| SnapshotError::Warm(e.to_string()))?;
    match tokio::time::timeout(WARM_DEADLINE, warmed.recv()).await {
        Ok(Some(Event::Warmed { .. })) => {}
        Ok(other) => return Err(SnapshotError::Warm(format!("{other:?}"))),
        Err(_) => return Err(SnapshotError::Warm("timed out".into())),
    }
    drop(warmed);
    let hello = vm.hello().clone();
    let vmstate_path = pending.vmstate();
    let vmstate = File::create(&vmstate_path).map_err(io_error("create", &vmstate_path))?;
    vm.save_template(&vmstate)
        .await
        .map_err(SnapshotError::Vm)?;
    vmstate
        .sync_all()
        .map_err(io_error("sync", &vmstate_path))?;
    drop(vmstate);
    let published = cache.commit(pending, language, &hello)?;
    for evicted in cache.evict(key) {
        tracing::info!(dir = %evicted.display(), "evicted a memory snapshot (cache full)");
    }
    Ok(Some(published))
}

/// The scheduler's side of L1: the cache, the QEMU identity, and the background builds.
#[derive(Debug, Default)]
pub struct Templates {
    cache: Option<Cache>,
    qemu_identity: OnceLock<String>,
    building: Arc<Mutex<HashSet<String>>>,
    /// Keys whose restore failed in this process: not tried again (no failing restore plus
    /// rebuild on every run if restoring is broken on this host).
    failed: Mutex<HashSet<String>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Templates {
    /// Templates in `cache`, or none at all (L1 switched off).
    pub fn new(cache: Option<Cache>) -> Self {
        Self {
            cache,
            qemu_identity: OnceLock::new(),
            building: Arc::default(),
            failed: Mutex::default(),
            tasks: Mutex::default(),
        }
    }

    /// Whether L1 is on.
    pub fn enabled(&self) -> bool {
        self.cache.is_some()
    }

    /// The cache key of a template for `language` shaped like `spec`.
    pub fn key(
        &self,
        qemu: &Path,
        language: Language,
        spec: &VmSpec,
        asset_version: &str,
    ) -> String {
        let identity = self.qemu_identity.get_or_init(|| qemu_identity(qemu));
        cache_key(&KeyInputs {
            language,
            spec,
            asset_version,
            qemu: identity,
        })
    }

    /// A clone of `key`'s template, or `None` (no template, L1 off, or the restore failed: then
    /// the entry is discarded and the caller boots cold). `nic` is the NIC backend socket of a
    /// networked clone.
    pub async fn restore(
        &self,
        qemu: &Path,
        spec: &VmSpec,
        key: &str,
        nic: Option<OwnedFd>,
    ) -> Option<Vm> {
        let cache = self.cache.as_ref()?;
        if self.has_failed(key) {
            return None;
        }
        let entry = cache.open(key)?;
        let hello = entry.hello();
        match Vm::restore(
            qemu,
            spec,
            entry.ram,
            entry.vmstate,
            hello,
            nic,
            RESTORE_DEADLINE,
        )
        .await
        {
            Ok(vm) => Some(vm),
            Err(e) => {
                let spawn_failed = matches!(e, VmError::Spawn { .. } | VmError::Prepare { .. });
                tracing::warn!(key, error = %crate::vm::error_chain(&e), "restoring a memory snapshot failed; booting cold");
                if !spawn_failed {
                    cache.discard(&entry.dir);
                }
                if let Ok(mut failed) = self.failed.lock() {
                    failed.insert(key.to_string());
                }
                None
            }
        }
    }

    fn has_failed(&self, key: &str) -> bool {
        self.failed.lock().map(|f| f.contains(key)).unwrap_or(true)
    }

    /// Builds `key`'s template in the background unless it exists or is being built.
    pub fn build_in_background(
        &self,
        qemu: PathBuf,
        spec: VmSpec,
        language: Language,
        key: String,
        boot_deadline: Duration,
        budget: impl Send + 'static,
    ) {
        let Some(cache) = self.cache.clone() else {
            return;
        };
        if self.has_failed(&key) || cache.entry_dir(&key).join(META).exists() {
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
            match build(&cache, &qemu, &spec, language, &key, boot_deadline).await {
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
        if let Ok(mut tasks) = self.tasks.lock() {
            tasks.retain(|t| !t.is_finished());
            tasks.push(task);
        }
    }

    /// Builds `key`'s template now unless a valid one exists. True when one is ready after.
    pub async fn ensure(
        &self,
        qemu: &Path,
        spec: &VmSpec,
        language: Language,
        key: &str,
        boot_deadline: Duration,
    ) -> Result<bool, SnapshotError> {
        let Some(cache) = &self.cache else {
            return Ok(false);
        };
        if cache.open(key).is_some() {
            return Ok(true);
        }
        Ok(build(cache, qemu, spec, language, key, boot_deadline)
            .await?
            .is_some())
    }

    /// Whether background builds are running.
    pub fn pending(&self) -> bool {
        self.tasks
            .lock()
            .map(|t| t.iter().any(|task| !task.is_finished()))
            .unwrap_or(false)
    }

    /// Abandons the background builds and waits until their template VMs are gone.
    pub async fn abort(&self) {
        let tasks: Vec<_> = self
            .tasks
            .lock()
            .map(|mut t| t.drain(..).collect())
            .unwrap_or_default();
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
    }

    /// Waits for the background builds started so far (a one-shot process calls this before
    /// exiting, or its template would die with it).
    pub async fn wait(&self) {
        let tasks: Vec<_> = self
            .tasks
            .lock()
            .map(|mut t| t.drain(..).collect())
            .unwrap_or_default();
        for task in tasks {
            let _ = task.await;
        }
    }
}

impl Drop for Templates {
    /// Background builds end with the scheduler; their template VMs are killed on drop.
    fn drop(&mut self) {
        if let Ok(mut tasks) = self.tasks.lock() {
            for task in tasks.drain(..) {
                task.abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::accel::Accelerator;

    fn spec(memory_mb: u32) -> VmSpec {
        VmSpec {
            name: "sbx-1-2".into(),
            kernel: "/nonexistent/vmlinux".into(),
            initramfs: "/nonexistent/initramfs".into(),
            rootfs: Some("/nonexistent/rootfs".into()),
            memory_mb,
            vcpus: 1,
            accelerator: Accelerator::Tcg,
            tsc_khz: Some(2_100_000),
            verbose_console: false,
            tmpfs_mb: 64,
            qemu_sandbox: true,
            nic: false,
        }
    }

    fn key_of(language: Language, spec: &VmSpec, assets: &str, qemu: &str) -> String {
        cache_key(&KeyInputs {
            language,
            spec,
            asset_version: assets,
            qemu,
        })
    }

    #[test]
    fn key_covers_what_a_clone_must_share_and_ignores_the_name() {
        let base = key_of(Language::Python, &spec(256), "v1", "q1");
        assert_eq!(base.len(), 32);
        let mut renamed = spec(256);
        renamed.name = "other".into();
        assert_eq!(base, key_of(Language::Python, &renamed, "v1", "q1"));
        let mut more_cpus = spec(256);
        more_cpus.vcpus = 2;
        let mut kvm = spec(256);
        kvm.accelerator = Accelerator::Kvm;
        for other in [
            key_of(Language::Raw, &spec(256), "v1", "q1"),
            key_of(Language::Python, &spec(512), "v1", "q1"),
            key_of(Language::Python, &spec(256), "v2", "q1"),
            key_of(Language::Python, &spec(256), "v1", "q2"),
            key_of(Language::Python, &more_cpus, "v1", "q1"),
            key_of(Language::Python, &kvm, "v1", "q1"),
        ] {
            assert_ne!(base, other);
        }
    }

    /// A published entry with a fake RAM file and vmstate.
    fn publish(cache: &Cache, key: &str, vmstate: &[u8]) -> PathBuf {
        let pending = cache.begin(key).unwrap().expect("lock is free");
        fs::write(pending.ram(), vec![0u8; 4096]).unwrap();
        fs::write(pending.vmstate(), vmstate).unwrap();
        let hello = AgentHello {
            protocol_version: sbx_protocol::PROTOCOL_VERSION,
            agent_version: "t".into(),
            uptime_ms: 1,
            root_mounted: true,
        };
        cache.commit(pending, Language::Python, &hello).unwrap()
    }

    #[test]
    fn metadata_roundtrip_and_integrity_checks() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path().to_path_buf(), u64::MAX);
        let dir = publish(&cache, "k1", b"device state");
        let mut entry = cache.open("k1").expect("valid entry");
        assert_eq!(entry.meta.vmstate_bytes, 12);
        assert_eq!(entry.meta.ram_bytes, 4096);
        assert_eq!(entry.hello().agent_version, "t");
        let mut read_back = String::new();
        entry.vmstate.read_to_string(&mut read_back).unwrap();
        assert_eq!(read_back, "device state", "handed out rewound");
        // A wrong key in the metadata is not this entry.
        assert!(verify(&dir, "k2").is_err());

        // Truncated vmstate: rejected and removed, never handed out.
        fs::write(dir.join(VMSTATE), b"device").unwrap();
        assert!(cache.open("k1").is_none());
        assert!(!dir.exists(), "a bad entry is discarded");

        // Same size, different bytes; truncated RAM; garbage metadata.
        for damage in [
            |d: &Path| fs::write(d.join(VMSTATE), b"DEVICE STATE").unwrap(),
            |d: &Path| {
                File::options()
                    .write(true)
                    .open(d.join(RAM))
                    .unwrap()
                    .set_len(100)
                    .unwrap()
            },
            |d: &Path| fs::write(d.join(META), b"{not json").unwrap(),
            |d: &Path| fs::remove_file(d.join(RAM)).unwrap(),
        ] {
            let dir = publish(&cache, "k1", b"device state");
            assert!(cache.open("k1").is_some());
            damage(&dir);
            assert!(cache.open("k1").is_none());
            assert!(!dir.exists());
        }
    }

    #[tokio::test]
    async fn a_failed_restore_discards_the_entry_and_is_not_retried() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path().to_path_buf(), u64::MAX);
        let dir = publish(&cache, "k", b"device state");
        let templates = Templates::new(Some(cache.clone()));
        // `false` stands in for a QEMU that dies while loading the snapshot.
        let qemu = Path::new("/bin/false");
        assert!(
            templates
                .restore(qemu, &spec(256), "k", None)
                .await
                .is_none()
        );
        assert!(
            !dir.exists(),
            "an entry that failed to restore is discarded"
        );
        publish(&cache, "k", b"device state");
        assert!(
            templates
                .restore(qemu, &spec(256), "k", None)
                .await
                .is_none()
        );
        assert!(
            cache.open("k").is_some(),
            "not tried again in this process: the new entry was left alone"
        );
    }

    #[test]
    fn one_builder_per_key_and_unfinished_builds_leave_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path().to_path_buf(), u64::MAX);
        let first = cache.begin("k").unwrap().expect("free");
        assert!(cache.begin("k").unwrap().is_none(), "locked while building");
        assert!(cache.begin("other").unwrap().is_some());
        let tmp_dir = first.dir.clone();
        assert!(tmp_dir.exists());
        drop(first);
        assert!(!tmp_dir.exists(), "an abandoned build is removed");
        assert!(cache.open("k").is_none(), "nothing was published");
        assert!(cache.begin("k").unwrap().is_some(), "lock released");
    }

    #[test]
    fn eviction_drops_least_recently_used_first() {
        let tmp = tempfile::tempdir().unwrap();
        let unbounded = Cache::new(tmp.path().to_path_buf(), u64::MAX);
        let a = publish(&unbounded, "a", &[1; 8192]);
        let b = publish(&unbounded, "b", &[2; 8192]);
        let c = publish(&unbounded, "c", &[3; 8192]);
        let old = SystemTime::now() - Duration::from_secs(3600);
        for (dir, age) in [(&a, 3), (&b, 1), (&c, 2)] {
            File::options()
                .write(true)
                .open(dir.join(META))
                .unwrap()
                .set_modified(old - Duration::from_secs(age))
                .unwrap();
        }
        // Using `a` makes it the most recently used.
        assert!(unbounded.open("a").is_some());
        let one_entry = allocated_bytes(&a);
        assert!(one_entry > 0);
        let bounded = Cache::new(tmp.path().to_path_buf(), one_entry * 2);
        assert!(unbounded.evict("none").is_empty(), "within bound");
        let evicted = bounded.evict("none");
        assert_eq!(evicted, vec![c.clone()], "c was used longest ago");
        assert!(a.exists() && b.exists() && !c.exists());
        // The entry being kept is never evicted, even when it is the oldest.
        let tiny = Cache::new(tmp.path().to_path_buf(), 1);
        tiny.evict("b");
        assert!(b.exists() && !a.exists());
    }
}
