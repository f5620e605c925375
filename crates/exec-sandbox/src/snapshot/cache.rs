//! The on-disk cache of memory snapshots: verified entries, atomic publication, LRU eviction.
//!
//! The cache directory is checked (`crate::trust`) before it is read, and every file of an
//! entry is opened through a handle of the entry's directory without following symbolic links.
//! Snapshot files are private to the cache's owner (0600).

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sbx_protocol::layer::LayerStatus;
use sbx_protocol::{AgentHello, Language};
use serde::{Deserialize, Serialize};

use super::{FORMAT, META, RAM, VMSTATE};
use crate::disk::{Dir, allocated_bytes};
use crate::vm::VmError;
use crate::vm::migration::Saved;

/// Longest accepted `meta.json`.
const MAX_META_BYTES: u64 = 16 * 1024;
/// Mode of `vmstate` and `meta.json`.
const FILE_MODE: u32 = 0o600;
/// A key's build lock is `<key>.lock` in the cache directory.
const LOCK_SUFFIX: &str = ".lock";
/// Mode of a template's RAM file (see [`create_ram_file`]).
pub(crate) const RAM_MODE: u32 = 0o600;

/// A snapshot cache operation failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SnapshotError {
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
    /// The cache directory could be changed by another user.
    #[error(transparent)]
    Untrusted(#[from] crate::trust::TrustError),
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SnapshotError {
    let path = path.to_path_buf();
    move |source| SnapshotError::Io {
        action,
        path,
        source,
    }
}

/// Why a cache entry is not loaded (it is then discarded).
#[derive(Debug, thiserror::Error)]
pub(crate) enum VerifyError {
    /// A file of the entry could not be opened or read.
    #[error("cannot read {file}")]
    Read {
        /// The file, relative to the entry.
        file: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// `meta.json` is not valid.
    #[error("bad {META}")]
    Meta(#[source] serde_json::Error),
    /// `meta.json` is for another format or key.
    #[error("{META} is for format {format} key {key}")]
    Mismatch {
        /// The format it names.
        format: u32,
        /// The key it names.
        key: String,
    },
    /// The RAM file has another size than recorded.
    #[error("{RAM} is {found} bytes, expected {expected}")]
    RamSize {
        /// Its size.
        found: u64,
        /// The recorded size.
        expected: u64,
    },
    /// The RAM file was written, truncated, replaced or had its owner or mode changed since it
    /// was published (a clone's QEMU can open it read-write: see `SECURITY.md`).
    #[error("{RAM} changed since it was published")]
    RamChanged,
    /// The device state does not match its recorded size and checksum.
    #[error("{VMSTATE} does not match its checksum ({bytes} bytes)")]
    Vmstate {
        /// Its size.
        bytes: u64,
    },
}

/// What the saved files must be, written last when a template is saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Meta {
    /// [`FORMAT`] at save time.
    pub(crate) format: u32,
    /// The cache key (also the directory name).
    pub(crate) key: String,
    /// The template's language.
    pub(crate) language: Language,
    /// sha256 of `vmstate`, checked before every restore.
    pub(crate) vmstate_sha256: String,
    /// Size of `vmstate`.
    pub(crate) vmstate_bytes: u64,
    /// Size of `ram` (the guest memory size).
    pub(crate) ram_bytes: u64,
    /// `ram` as published: any later write, truncation, `chmod` or replacement changes it.
    pub(crate) ram_stamp: RamStamp,
    /// When it was saved (ms since the Unix epoch).
    pub(crate) created_unix_ms: u64,
    /// The template agent's version and protocol, given to clones as their hello.
    pub(crate) agent_version: String,
    /// The template agent's protocol version.
    pub(crate) protocol_version: u8,
}

/// What identifies a file's contents without reading them: device, inode, size, and the
/// modification and change times. The change time cannot be set back by an unprivileged
/// process: any write, truncation, `chmod`, `chown` or `utimes` moves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RamStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl RamStamp {
    /// The stamp of the file `meta` describes.
    pub(crate) fn of(meta: &fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// A verified entry, ready to restore. Its files are open: a concurrent replacement of the
/// entry cannot pair this device state with another template's RAM.
#[derive(Debug)]
pub(crate) struct Entry {
    /// The entry's directory.
    pub(crate) dir: PathBuf,
    /// Its metadata.
    pub(crate) meta: Meta,
    /// `meta.json`, open (its mtime is the LRU clock).
    meta_file: File,
    /// The device state, open and rewound: the very file whose hash was checked.
    pub(crate) vmstate: File,
    /// The guest RAM file, open (QEMU reopens it through `/proc/self/fd`).
    pub(crate) ram: File,
}

impl Entry {
    /// What the template's agent said, given to clones.
    pub(crate) fn hello(&self) -> AgentHello {
        AgentHello {
            protocol_version: self.meta.protocol_version,
            agent_version: self.meta.agent_version.clone(),
            uptime_ms: 0,
            boot: sbx_protocol::BootTimeline::default(),
            root_mounted: true,
            // Not recorded: the template's own hello was checked when it booted
            // (`Vm::boot_with`), and the key covers its layer.
            packages: LayerStatus::Absent,
        }
    }

    /// The files a clone is restored from; the directory, for discarding the entry.
    pub(crate) fn into_saved(self) -> (Saved, PathBuf) {
        let hello = self.hello();
        (
            Saved {
                ram: self.ram,
                vmstate: self.vmstate,
                hello,
            },
            self.dir,
        )
    }
}

/// A template being built: its temporary directory and the key's build lock.
#[derive(Debug)]
pub(crate) struct Pending {
    key: String,
    dir: PathBuf,
    handle: Dir,
    published: bool,
    _lock: File,
}

impl Pending {
    /// The template's RAM file, for QEMU (created empty by [`Cache::begin`]: QEMU sizes it).
    pub(crate) fn ram(&self) -> PathBuf {
        self.dir.join(RAM)
    }

    /// The template's RAM file (created empty by [`Cache::begin`]), open read-write for QEMU,
    /// which sizes it and maps it shared. QEMU 7.2 reopens it by path (`/proc/self/fd/N`) with
    /// its own user's permissions, so a QEMU running as `owner` (not the cache's owner) gets
    /// the file: still 0600, still opened here without following a link.
    pub(crate) fn ram_for_qemu(&self, owner: Option<(u32, u32)>) -> Result<File, SnapshotError> {
        let path = self.ram();
        let file = self
            .handle
            .open_read_write(RAM)
            .map_err(io_error("open", &path))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
                .map_err(io_error("chown", &path))?;
        }
        Ok(file)
    }

    /// Where the device state goes.
    pub(crate) fn vmstate(&self) -> PathBuf {
        self.dir.join(VMSTATE)
    }

    /// Creates the device state file (0600), for QEMU to write through the descriptor.
    pub(crate) fn create_vmstate(&self) -> Result<File, SnapshotError> {
        self.handle
            .create_new(VMSTATE, FILE_MODE)
            .map_err(io_error("create", &self.vmstate()))
    }
}

/// Creates the empty RAM file of a template in `dir` before its QEMU starts: QEMU opens an
/// existing empty file and sizes it, so the file's owner and mode are decided here, not by
/// QEMU's umask. The one place to change them (the default is private to the cache's owner,
/// [`RAM_MODE`]); a QEMU running as another user needs read-write access to it.
pub(crate) fn create_ram_file(dir: &Dir) -> io::Result<()> {
    dir.create_new(RAM, RAM_MODE).map(drop)
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
pub(crate) struct Cache {
    dir: PathBuf,
    max_bytes: u64,
}

impl Cache {
    /// A cache in `dir` holding at most `max_bytes` (allocated bytes on disk).
    pub(crate) fn new(dir: PathBuf, max_bytes: u64) -> Self {
        Self { dir, max_bytes }
    }

    /// The cache directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn entry_dir(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// The cache directory, open, after checking it; `None` when it does not exist.
    fn root(&self) -> Result<Option<Dir>, SnapshotError> {
        crate::trust::check(&self.dir)?;
        match Dir::open(&self.dir) {
            Ok(root) => Ok(Some(root)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("open", &self.dir)(e)),
        }
    }

    /// The entry for `key` if there is one and it checks out; a bad one is discarded. Marks the
    /// entry as used now.
    pub(crate) fn open(&self, key: &str) -> Option<Entry> {
        let root = match self.root() {
            Ok(root) => root?,
            Err(e) => {
                tracing::warn!(error = %crate::vm::error_chain(&e), "not restoring memory snapshots");
                return None;
            }
        };
        let dir = self.entry_dir(key);
        // Never through a link: a link or a file in the entry's place is a bad entry.
        let verified = match root.open_dir(key) {
            Ok(handle) => verify(&handle, key),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(source) => Err(VerifyError::Read { file: ".", source }),
        };
        match verified {
            Ok(entry) => {
                // LRU clock: the metadata's mtime. Failing to touch it only skews eviction.
                let _ = entry.meta_file.set_modified(SystemTime::now());
                Some(entry)
            }
            Err(reason) => {
                tracing::warn!(dir = %dir.display(), reason = %crate::vm::error_chain(&reason), "discarding a bad memory snapshot");
                self.discard(&dir);
                None
            }
        }
    }

    /// Removes an entry: renamed away first (atomic for readers), then deleted. Clones mapping
    /// its RAM keep their (unlinked) file.
    pub(crate) fn discard(&self, dir: &Path) {
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

    /// Starts building `key`, or `None` when another process is building it right now. The
    /// template's directory is private and holds its empty RAM file ([`create_ram_file`]).
    pub(crate) fn begin(&self, key: &str) -> Result<Option<Pending>, SnapshotError> {
        crate::trust::ensure(&self.dir)?;
        let root = Dir::open(&self.dir).map_err(io_error("open", &self.dir))?;
        let lock_name = format!("{key}{LOCK_SUFFIX}");
        let lock_path = self.dir.join(&lock_name);
        let Some(lock) = root
            .lock(&lock_name, false)
            .map_err(io_error("lock", &lock_path))?
        else {
            return Ok(None);
        };
        let name = format!(".tmp-{key}-{}-{}", std::process::id(), unique());
        let dir = self.dir.join(&name);
        let handle = root.create_dir(&name).map_err(io_error("create", &dir))?;
        let pending = Pending {
            key: key.to_string(),
            dir,
            handle,
            published: false,
            _lock: lock,
        };
        create_ram_file(&pending.handle).map_err(io_error("create", &pending.ram()))?;
        Ok(Some(pending))
    }

    /// Seals a saved template: hashes the device state, writes `meta.json` last and publishes
    /// the directory under its key, replacing a bad entry if one is there.
    pub(crate) fn commit(
        &self,
        mut pending: Pending,
        language: Language,
        hello: &AgentHello,
    ) -> Result<PathBuf, SnapshotError> {
        let vmstate_path = pending.vmstate();
        let (vmstate_sha256, vmstate_bytes) = crate::disk::sha256_reader(
            pending
                .handle
                .open_file(VMSTATE)
                .map_err(io_error("open", &vmstate_path))?,
        )
        .map_err(io_error("read", &vmstate_path))?;
        let ram_path = pending.ram();
        let ram = pending
            .handle
            .open_file(RAM)
            .map_err(io_error("open", &ram_path))?;
        ram.sync_all().map_err(io_error("sync", &ram_path))?;
        // Stamped after the sync and after QEMU is gone: nothing writes it any more.
        let ram_meta = ram.metadata().map_err(io_error("stat", &ram_path))?;
        let ram_bytes = ram_meta.len();
        let ram_stamp = RamStamp::of(&ram_meta);
        let meta = Meta {
            format: FORMAT,
            key: pending.key.clone(),
            language,
            vmstate_sha256,
            vmstate_bytes,
            ram_bytes,
            ram_stamp,
            created_unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            agent_version: hello.agent_version.clone(),
            protocol_version: hello.protocol_version,
        };
        let meta_path = pending.dir.join(META);
        let text = serde_json::to_vec_pretty(&meta).expect("metadata serializes");
        pending
            .handle
            .create_new(META, FILE_MODE)
            .and_then(|mut f| f.write_all(&text).and_then(|()| f.sync_all()))
            .map_err(io_error("write", &meta_path))?;
        let target = self.entry_dir(&pending.key);
        if target.exists() {
            // We hold the key's lock: whatever is there failed verification or is older.
            self.discard(&target);
        }
        fs::rename(&pending.dir, &target).map_err(io_error("publish", &target))?;
        pending.published = true;
        Ok(target)
    }

    /// How many entries the cache holds and the bytes they occupy.
    pub(crate) fn usage(&self) -> (usize, u64) {
        let Ok(read) = fs::read_dir(&self.dir) else {
            return (0, 0);
        };
        read.filter_map(Result::ok)
            .filter(|e| {
                e.file_type().is_ok_and(|t| t.is_dir())
                    && !e.file_name().to_string_lossy().starts_with('.')
            })
            .fold((0, 0), |(n, bytes), e| {
                (n + 1, bytes + allocated_bytes(&e.path()))
            })
    }

    /// Evicts least recently used entries (never `keep`) until the cache fits its bound, and
    /// clears leftovers of interrupted builds. Returns the evicted directories.
    pub(crate) fn evict(&self, keep: &str) -> Vec<PathBuf> {
        if let Err(e) = crate::trust::check(&self.dir) {
            tracing::warn!(error = %crate::vm::error_chain(&e), "not evicting memory snapshots");
            return Vec::new();
        }
        let Ok(read) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut entries: Vec<(SystemTime, u64, PathBuf)> = Vec::new();
        let mut locks = Vec::new();
        let mut total = 0u64;
        for item in read.filter_map(Result::ok) {
            let path = item.path();
            let name = item.file_name().to_string_lossy().into_owned();
            if !item.file_type().is_ok_and(|t| t.is_dir()) {
                if item.file_type().is_ok_and(|t| t.is_file()) && name.ends_with(LOCK_SUFFIX) {
                    locks.push(name);
                }
                continue;
            }
            if crate::disk::remove_if_leftover(&path, &name) {
                continue;
            }
            let size = allocated_bytes(&path);
            total += size;
            if name.starts_with('.') || name == keep {
                continue;
            }
            let used = fs::symlink_metadata(path.join(META))
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
        self.remove_idle_locks(&locks);
        evicted
    }

    /// Removes the build locks (`<key>.lock`) among `names` that nobody holds and whose key
    /// has no entry: one is left by every key ever built, evicted or failed.
    fn remove_idle_locks(&self, names: &[String]) {
        let Ok(root) = Dir::open(&self.dir) else {
            return;
        };
        for name in names {
            let key = &name[..name.len() - LOCK_SUFFIX.len()];
            if key.is_empty() || self.entry_dir(key).exists() {
                continue;
            }
            if let Ok(Some(lock)) = root.lock(name, false) {
                let _ = root.remove_lock(name, lock);
            }
        }
    }
}

/// Checks an entry against its metadata: format, key, RAM size, and the vmstate's size and
/// sha256 (it is small; the RAM file is too big to hash per run and is checked by size).
pub(crate) fn verify(dir: &Dir, key: &str) -> Result<Entry, VerifyError> {
    let read = |file: &'static str| move |source| VerifyError::Read { file, source };
    // Every file is opened through the one handle of the entry's directory, so all of them
    // come from the same entry even if it is replaced meanwhile, and none through a link.
    let meta_file = dir.open_file(META).map_err(read(META))?;
    let mut text = Vec::new();
    (&meta_file)
        .take(MAX_META_BYTES)
        .read_to_end(&mut text)
        .map_err(read(META))?;
    let meta: Meta = serde_json::from_slice(&text).map_err(VerifyError::Meta)?;
    if meta.format != FORMAT || meta.key != key {
        return Err(VerifyError::Mismatch {
            format: meta.format,
            key: meta.key,
        });
    }
    let ram = dir.open_file(RAM).map_err(read(RAM))?;
    // Checked on the open file: what is checked is what QEMU gets.
    let ram_meta = ram.metadata().map_err(read(RAM))?;
    if ram_meta.len() != meta.ram_bytes {
        return Err(VerifyError::RamSize {
            found: ram_meta.len(),
            expected: meta.ram_bytes,
        });
    }
    if RamStamp::of(&ram_meta) != meta.ram_stamp {
        return Err(VerifyError::RamChanged);
    }
    let mut vmstate = dir.open_file(VMSTATE).map_err(read(VMSTATE))?;
    let (sha256, bytes) = crate::disk::sha256_reader(&mut vmstate).map_err(read(VMSTATE))?;
    if bytes != meta.vmstate_bytes || sha256 != meta.vmstate_sha256 {
        return Err(VerifyError::Vmstate { bytes });
    }
    std::io::Seek::rewind(&mut vmstate).map_err(read(VMSTATE))?;
    Ok(Entry {
        dir: dir.path().to_path_buf(),
        meta,
        meta_file,
        vmstate,
        ram,
    })
}

fn unique() -> u128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use super::*;

    /// `begin(key)` of a key nobody builds. Another test's freshly cloned child may hold a
    /// copy of a just released lock for the moment before it closes what it does not use.
    pub(crate) fn begin_free(cache: &Cache, key: &str) -> Pending {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match cache.begin(key).unwrap() {
                Some(pending) => return pending,
                None if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                None => panic!("{key}'s lock stays taken"),
            }
        }
    }

    /// A published entry with a fake RAM file and vmstate.
    pub(crate) fn publish(cache: &Cache, key: &str, vmstate: &[u8]) -> PathBuf {
        let pending = begin_free(cache, key);
        fs::write(pending.ram(), vec![0u8; 4096]).unwrap();
        pending
            .create_vmstate()
            .unwrap()
            .write_all(vmstate)
            .unwrap();
        let hello = AgentHello {
            protocol_version: sbx_protocol::PROTOCOL_VERSION,
            agent_version: "t".into(),
            uptime_ms: 1,
            boot: sbx_protocol::BootTimeline::default(),
            root_mounted: true,
            packages: LayerStatus::Absent,
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
        assert!(verify(&Dir::open(&dir).unwrap(), "k2").is_err());

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

    #[test]
    fn snapshot_files_are_private_and_links_in_the_cache_are_not_followed() {
        use crate::disk::Untouched;
        use std::os::unix::fs::{MetadataExt, symlink};
        let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o7777;
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path().join("snapshots"), u64::MAX);
        let pending = begin_free(&cache, "k");
        assert_eq!(mode(&cache.dir), 0o700);
        assert_eq!(mode(&pending.dir), 0o700);
        assert_eq!(
            (
                mode(&pending.ram()),
                fs::metadata(pending.ram()).unwrap().len()
            ),
            (RAM_MODE, 0),
            "an empty private RAM file for QEMU to size"
        );
        drop(pending);
        let dir = publish(&cache, "k", b"device state");
        for file in [RAM, VMSTATE, META] {
            assert_eq!(mode(&dir.join(file)), 0o600, "{file}");
        }

        // A good meta.json outside the cache, linked in: not followed, the entry discarded,
        // the file outside untouched.
        let outside = tempfile::tempdir().unwrap();
        fs::copy(dir.join(META), outside.path().join(META)).unwrap();
        fs::remove_file(dir.join(META)).unwrap();
        symlink(outside.path().join(META), dir.join(META)).unwrap();
        let untouched = Untouched::record(outside.path());
        assert!(cache.open("k").is_none());
        assert!(!dir.exists(), "discarded");
        untouched.assert_untouched();

        // A whole entry outside, linked in as the key's directory.
        let elsewhere = publish(&cache, "k2", b"device state");
        let copy = outside.path().join("k2");
        fs::rename(&elsewhere, &copy).unwrap();
        symlink(&copy, &elsewhere).unwrap();
        let entry_untouched = Untouched::record(&copy);
        let untouched_with_copy = Untouched::record(outside.path());
        assert!(cache.open("k2").is_none());
        assert!(
            fs::symlink_metadata(&elsewhere).is_err(),
            "the link is gone"
        );
        entry_untouched.assert_untouched();
        untouched_with_copy.assert_untouched();

        // A link planted as a build lock.
        let precious = tempfile::tempdir().unwrap();
        fs::write(precious.path().join("precious"), b"keep me").unwrap();
        let precious_untouched = Untouched::record(precious.path());
        symlink(precious.path().join("precious"), cache.dir.join("k3.lock")).unwrap();
        let err = cache.begin("k3").unwrap_err();
        assert!(
            crate::vm::error_chain(&err).contains("symbolic link"),
            "{err}"
        );
        precious_untouched.assert_untouched();
    }

    #[test]
    fn one_builder_per_key_and_unfinished_builds_leave_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path().to_path_buf(), u64::MAX);
        let first = begin_free(&cache, "k");
        assert!(cache.begin("k").unwrap().is_none(), "locked while building");
        assert!(cache.begin("other").unwrap().is_some());
        let tmp_dir = first.dir.clone();
        assert!(tmp_dir.exists());
        drop(first);
        assert!(!tmp_dir.exists(), "an abandoned build is removed");
        assert!(cache.open("k").is_none(), "nothing was published");
        begin_free(&cache, "k");
    }

    #[test]
    fn eviction_removes_the_build_locks_of_keys_no_longer_cached_unless_held() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path().to_path_buf(), u64::MAX);
        let lock = |key: &str| tmp.path().join(format!("{key}.lock"));
        drop(begin_free(&cache, "failed"));
        let building = begin_free(&cache, "building");
        publish(&cache, "cached", b"device state");
        publish(&cache, "evicted", b"device state");
        cache.discard(&cache.entry_dir("evicted"));
        for key in ["failed", "building", "cached", "evicted"] {
            assert!(lock(key).is_file(), "{key}'s lock is there before");
        }
        assert!(cache.evict("").is_empty(), "within its bound");
        assert!(!lock("failed").exists(), "a failed build's lock goes");
        assert!(!lock("evicted").exists(), "an evicted entry's lock goes");
        assert!(lock("building").is_file(), "a held lock stays");
        assert!(lock("cached").is_file(), "a cached entry's lock stays");
        assert!(
            cache.begin("building").unwrap().is_none(),
            "and still excludes"
        );
        drop(building);
        assert!(cache.open("cached").is_some());
        begin_free(&cache, "failed");
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
