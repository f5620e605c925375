//! The L2 layer cache on disk: verified entries, one builder per key across threads and
//! processes, atomic publication, LRU eviction under a size bound.
//!
//! ```text
//! <package_cache_dir>/
//!   <key>/                 one published layer, never modified once published
//!     layer.erofs          the image (read-only)
//!     manifest.json        what it holds and its sha256 (written before publication)
//!     verified.json        stamp: the image's fingerprint when it last hashed correctly
//!     usage.json           hit count and last use (the LRU clock)
//!   .locks/<key>.lock      flock: held while the key is built, fetched or discarded
//!   .tmp-<key>-…/          a build or download in progress, published by renaming it
//!   .trash-…/              an entry being deleted
//!   .ranges/               remembered range resolutions (`resolve.rs`)
//! ```
//!
//! Readers take no lock: an entry appears whole by rename, and is checked against its manifest
//! (by hashing once, then by the stamp's fingerprint: `assets/stamp.rs`) before use. A bad
//! entry (truncated, edited, manifest unreadable) is discarded under the key's lock and built
//! again. The directory is checked (`crate::trust`) before use, and an entry's files are opened
//! through a handle of its directory without following symbolic links (a link in place of a
//! file or an entry makes the entry bad).

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::error::PackageError;
use super::layer::{LAYER_FILE, LayerManifest, MANIFEST_FILE, MAX_MANIFEST_BYTES};
use super::resolve::unix_ms;
use super::{Pin, Target};
use crate::assets::files;
use crate::assets::manifest::Entry;
use crate::assets::stamp::{Check, Stamps};
use crate::disk::Dir;

/// Hit count and last use of an entry.
const USAGE_FILE: &str = "usage.json";
/// Directory of the per-key lock files.
const LOCKS_DIR: &str = ".locks";
/// Mode of a layer image: read-only, and readable by a QEMU that is not the cache's owner.
const LAYER_MODE: u32 = 0o444;
/// Mode of an entry's manifest and usage record.
const TEXT_MODE: u32 = 0o644;
/// Age after which a build directory is a leftover of a process that died while building.
use crate::disk::allocated_bytes;

/// How an entry has been used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Usage {
    hits: u64,
    last_used_unix_ms: u64,
}

/// The layer cache in one directory.
#[derive(Debug, Clone)]
pub(crate) struct LayerCache {
    dir: PathBuf,
}

/// The outcome of looking a key up.
#[derive(Debug)]
pub(crate) enum Lookup {
    /// A verified entry.
    Hit(Box<Cached>),
    /// No entry.
    Miss,
    /// An entry that fails its checks (to be discarded under the key's lock), and why.
    Bad(String),
}

/// A verified entry, its image open: the open file stays valid even if another process evicts
/// the entry afterwards.
#[derive(Debug)]
pub(crate) struct Cached {
    /// The entry's directory.
    pub(crate) dir: PathBuf,
    /// The same, open.
    handle: Dir,
    /// Its manifest.
    pub(crate) manifest: LayerManifest,
    /// The image, open read-only.
    pub(crate) file: File,
}

impl Cached {
    /// The image's path.
    pub(crate) fn layer_path(&self) -> PathBuf {
        self.dir.join(LAYER_FILE)
    }
}

/// The lock of one key; released when dropped (or when the process dies).
#[derive(Debug)]
pub(crate) struct KeyLock {
    file: File,
}

/// One entry as `sbx cache` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct LayerInfo {
    /// The cache key (the entry's directory name).
    pub key: String,
    /// `python` or `npm`.
    pub ecosystem: String,
    /// The requested packages, as `name==version` (Python) or `name@version` (npm).
    pub packages: Vec<String>,
    /// How many packages the layer holds, dependencies included.
    pub closure_len: usize,
    /// Bytes the entry occupies on disk.
    pub bytes: u64,
    /// How many times it was used from the cache.
    pub hits: u64,
    /// Its last use (ms since the Unix epoch).
    pub last_used_unix_ms: u64,
}

impl LayerCache {
    pub(crate) fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    #[cfg(test)]
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    fn entry_dir(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// The cache directory, checked and created (private) if missing.
    fn ensure_root(&self) -> Result<Dir, PackageError> {
        crate::trust::ensure(&self.dir)?;
        Dir::open(&self.dir).map_err(PackageError::io("open", &self.dir))
    }

    /// The cache directory, open, if it exists (the store checked it).
    fn root(&self) -> io::Result<Option<Dir>> {
        match Dir::open(&self.dir) {
            Ok(root) => Ok(Some(root)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The entry for `key`, verified (hashed once, then trusted by its stamp). Takes no lock.
    pub(crate) fn lookup(&self, key: &str) -> Lookup {
        let root = match self.root() {
            Ok(Some(root)) => root,
            Ok(None) => return Lookup::Miss,
            Err(e) => return Lookup::Bad(format!("cannot open the cache: {e}")),
        };
        let dir = match root.open_dir(key) {
            Ok(dir) => dir,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Lookup::Miss,
            Err(e) => return Lookup::Bad(format!("cannot open the entry: {e}")),
        };
        match verify(dir, key) {
            Ok(cached) => Lookup::Hit(Box::new(cached)),
            Err(reason) => Lookup::Bad(reason),
        }
    }

    /// Counts a use of `cached` and moves it to the front of the LRU order. Failing to only
    /// skews eviction and the hit count.
    pub(crate) fn record_use(&self, cached: &Cached) {
        let mut usage = read_usage(&cached.handle).unwrap_or_default();
        usage.hits += 1;
        usage.last_used_unix_ms = unix_ms(SystemTime::now());
        let text = serde_json::to_vec(&usage).expect("plain data serializes");
        if let Err(e) = cached.handle.replace(USAGE_FILE, &text, TEXT_MODE, false) {
            tracing::debug!(error = %e, "cannot record the use of a package layer");
        }
    }

    /// Takes `key`'s lock, calling `on_wait` first if another thread or process holds it.
    pub(crate) fn lock(&self, key: &str, on_wait: impl FnOnce()) -> Result<KeyLock, PackageError> {
        let (locks, name) = self.locks(key)?;
        let path = locks.join(&name);
        let taken = |wait| {
            locks
                .lock(&name, wait)
                .map_err(PackageError::io("lock", &path))
        };
        let file = match taken(false)? {
            Some(file) => file,
            None => {
                on_wait();
                taken(true)?.ok_or_else(|| {
                    PackageError::io("lock", &path)(io::Error::other("a waiting lock was refused"))
                })?
            }
        };
        Ok(KeyLock { file })
    }

    /// `key`'s lock if nobody holds it.
    fn try_lock(&self, key: &str) -> Option<KeyLock> {
        let (locks, name) = self.locks(key).ok()?;
        let file = locks.lock(&name, false).ok()??;
        Some(KeyLock { file })
    }

    /// The directory of the keys' lock files, and `key`'s lock file name in it.
    fn locks(&self, key: &str) -> Result<(Dir, String), PackageError> {
        let locks_path = self.dir.join(LOCKS_DIR);
        let locks = self
            .ensure_root()?
            .create_dir(LOCKS_DIR)
            .map_err(PackageError::io("create", &locks_path))?;
        Ok((locks, format!("{key}.lock")))
    }

    /// Removes `key`'s entry (the caller holds its lock): renamed away first, so readers see
    /// the whole entry or none, then deleted. Users holding its image open keep it.
    pub(crate) fn discard(&self, key: &str, _lock: &KeyLock) {
        self.remove_entry(&self.entry_dir(key));
    }

    fn remove_entry(&self, dir: &Path) {
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

    /// A fresh directory for building or downloading `key`, inside the cache (so publishing is
    /// a rename); removed when dropped unless published.
    pub(crate) fn staging(&self, key: &str) -> Result<tempfile::TempDir, PackageError> {
        self.ensure_root()?;
        // A fresh directory of its own, mode 0700.
        tempfile::Builder::new()
            .prefix(&format!(".tmp-{key}-"))
            .tempdir_in(&self.dir)
            .map_err(PackageError::io("create a build directory in", &self.dir))
    }

    /// Publishes a built layer: `staging` holds `layer.erofs`, `manifest` describes it (its
    /// sha256 computed from the file written). The image is made read-only and stamped, the
    /// manifest written, and the directory renamed to the key, replacing a bad entry.
    pub(crate) fn publish(
        &self,
        staging: tempfile::TempDir,
        manifest: &LayerManifest,
        _lock: &KeyLock,
    ) -> Result<Cached, PackageError> {
        let dir = Dir::open(staging.path()).map_err(PackageError::io("open", staging.path()))?;
        seal(&dir, LAYER_FILE)?;
        write_synced(&dir, MANIFEST_FILE, &manifest.to_bytes())?;
        self.finish(staging, &dir, manifest)
    }

    /// Publishes a downloaded layer after checking it: `staging` holds `layer.erofs` and
    /// `manifest.json` as fetched; the manifest must be for `key`, `target` and `requested`,
    /// and the image must match its sha256 and size. Returns why not otherwise.
    pub(crate) fn adopt(
        &self,
        staging: tempfile::TempDir,
        key: &str,
        target: &Target,
        requested: &[Pin],
        _lock: &KeyLock,
    ) -> Result<Cached, String> {
        let dir =
            Dir::open(staging.path()).map_err(|e| format!("cannot open the download: {e}"))?;
        let manifest = read_manifest(&dir, key)?;
        if manifest.target != *target || manifest.requested != requested {
            return Err("its manifest is for another target or package set".into());
        }
        let file = dir
            .open_file(LAYER_FILE)
            .map_err(|e| format!("cannot open {LAYER_FILE}: {e}"))?;
        let (sha256, size) =
            files::sha256_reader(file).map_err(|e| format!("cannot read {LAYER_FILE}: {e}"))?;
        if sha256 != manifest.sha256 || size != manifest.size {
            return Err(format!(
                "{LAYER_FILE} does not match its manifest ({size} bytes, sha256 {sha256})"
            ));
        }
        seal(&dir, LAYER_FILE).map_err(|e| e.to_string())?;
        self.finish(staging, &dir, &manifest)
            .map_err(|e| e.to_string())
    }

    /// Stamps the sealed image, starts its usage record and renames the directory into place.
    fn finish(
        &self,
        staging: tempfile::TempDir,
        dir: &Dir,
        manifest: &LayerManifest,
    ) -> Result<Cached, PackageError> {
        let mut stamps = Stamps::load(dir);
        stamps
            .stamp_now(LAYER_FILE, &manifest.sha256)
            .map_err(|e| PackageError::ToolOutput {
                tool: "the layer cache",
                reason: e.to_string(),
            })?;
        stamps.save();
        let usage = Usage {
            hits: 0,
            last_used_unix_ms: unix_ms(SystemTime::now()),
        };
        let usage_path = staging.path().join(USAGE_FILE);
        dir.replace(
            USAGE_FILE,
            &serde_json::to_vec(&usage).expect("plain data"),
            TEXT_MODE,
            false,
        )
        .map_err(PackageError::io("write", &usage_path))?;
        let target = self.entry_dir(&manifest.key);
        if target.exists() {
            // The caller holds the key's lock: whatever is there failed its checks.
            self.remove_entry(&target);
        }
        let staged = staging.keep();
        if let Err(e) = fs::rename(&staged, &target) {
            let _ = fs::remove_dir_all(&staged);
            return Err(PackageError::io("publish", &target)(e));
        }
        let layer = target.join(LAYER_FILE);
        let handle = Dir::open(&self.dir)
            .and_then(|root| root.open_dir(&manifest.key))
            .map_err(PackageError::io("open", &target))?;
        let file = handle
            .open_file(LAYER_FILE)
            .map_err(PackageError::io("open", &layer))?;
        Ok(Cached {
            dir: target,
            handle,
            manifest: manifest.clone(),
            file,
        })
    }

    /// Evicts least recently used entries (never `keep`, never one being built or fetched)
    /// until the entries fit `max_bytes`, and clears leftovers of interrupted builds. Returns
    /// the evicted keys and the bytes each freed.
    pub(crate) fn evict(&self, max_bytes: u64, keep: Option<&str>) -> Vec<(String, u64)> {
        if let Err(e) = crate::trust::check(&self.dir) {
            tracing::warn!(error = %crate::vm::error_chain(&e), "not evicting package layers");
            return Vec::new();
        }
        let (Ok(Some(root)), Ok(read)) = (self.root(), fs::read_dir(&self.dir)) else {
            return Vec::new();
        };
        let mut entries: Vec<(u64, u64, String)> = Vec::new();
        let mut total = 0u64;
        for item in read.filter_map(Result::ok) {
            let path = item.path();
            let name = item.file_name().to_string_lossy().into_owned();
            if !item.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if crate::disk::remove_if_leftover(&path, &name) {
                continue;
            }
            if !is_key(&name) {
                continue;
            }
            let bytes = allocated_bytes(&path);
            total += bytes;
            let used = root.open_dir(&name).map_or(0, |entry| last_used(&entry));
            entries.push((used, bytes, name));
        }
        entries.sort();
        let mut evicted = Vec::new();
        for (_, bytes, key) in entries {
            if total <= max_bytes {
                break;
            }
            if Some(key.as_str()) == keep {
                continue;
            }
            let Some(lock) = self.try_lock(&key) else {
                continue;
            };
            tracing::info!("evicting package layer {key} ({bytes} bytes)");
            self.discard(&key, &lock);
            if let Ok((locks, name)) = self.locks(&key) {
                let _ = locks.remove_lock(&name, lock.file);
            }
            total -= bytes;
            evicted.push((key, bytes));
        }
        evicted
    }

    /// Every published entry with a readable manifest, most recently used first.
    pub(crate) fn entries(&self) -> Vec<LayerInfo> {
        if let Err(e) = crate::trust::check(&self.dir) {
            tracing::warn!(error = %crate::vm::error_chain(&e), "not listing package layers");
            return Vec::new();
        }
        let (Ok(Some(root)), Ok(read)) = (self.root(), fs::read_dir(&self.dir)) else {
            return Vec::new();
        };
        let mut infos: Vec<LayerInfo> = read
            .filter_map(Result::ok)
            .filter_map(|item| {
                let key = item.file_name().to_str()?.to_string();
                if !is_key(&key) {
                    return None;
                }
                let path = item.path();
                let entry = root.open_dir(&key).ok()?;
                let manifest = read_manifest(&entry, &key).ok()?;
                let usage = read_usage(&entry).unwrap_or_default();
                let ecosystem = manifest.target.ecosystem;
                Some(LayerInfo {
                    ecosystem: serde_json::to_value(ecosystem)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default(),
                    packages: manifest
                        .requested
                        .iter()
                        .map(|p| super::display_pin(ecosystem, p))
                        .collect(),
                    closure_len: manifest.closure.len(),
                    bytes: allocated_bytes(&path),
                    hits: usage.hits,
                    last_used_unix_ms: last_used(&entry),
                    key,
                })
            })
            .collect();
        infos.sort_by_key(|info| std::cmp::Reverse(info.last_used_unix_ms));
        infos
    }
}

/// Checks an entry: its manifest is for `key`, and its image matches the manifest (by stamp,
/// else by hashing it and stamping it).
fn verify(dir: Dir, key: &str) -> Result<Cached, String> {
    let manifest = read_manifest(&dir, key)?;
    let entry = Entry {
        name: format!("package layer {key}"),
        file: LAYER_FILE.into(),
        sha256: manifest.sha256.clone(),
        size: manifest.size,
        inputs: String::new(),
        lock: None,
    };
    let mut stamps = Stamps::load(&dir);
    let checked = stamps.check(&entry);
    stamps.save();
    match checked {
        Ok(Check::Verified(_)) => {
            let file = dir
                .open_file(LAYER_FILE)
                .map_err(|e| format!("cannot open {LAYER_FILE}: {e}"))?;
            Ok(Cached {
                dir: dir.path().to_path_buf(),
                handle: dir,
                manifest,
                file,
            })
        }
        Ok(Check::Missing) => Err(format!("{LAYER_FILE} is missing")),
        Err(e) => Err(e.to_string()),
    }
}

fn read_manifest(dir: &Dir, key: &str) -> Result<LayerManifest, String> {
    let bytes = dir
        .read(MANIFEST_FILE, MAX_MANIFEST_BYTES)
        .map_err(|e| format!("cannot read {MANIFEST_FILE}: {e}"))?;
    LayerManifest::parse(&bytes, key)
}

/// Longest `usage.json` read.
const MAX_USAGE_BYTES: u64 = 4096;

fn read_usage(dir: &Dir) -> Option<Usage> {
    serde_json::from_slice(&dir.read(USAGE_FILE, MAX_USAGE_BYTES).ok()?).ok()
}

/// The entry's LRU clock: its last recorded use, else when its manifest was written.
fn last_used(dir: &Dir) -> u64 {
    read_usage(dir)
        .map(|u| u.last_used_unix_ms)
        .filter(|&ms| ms > 0)
        .or_else(|| {
            fs::symlink_metadata(dir.join(MANIFEST_FILE))
                .and_then(|m| m.modified())
                .ok()
                .map(unix_ms)
        })
        .unwrap_or(0)
}

/// A cache key: 64 lowercase hex digits (anything else in the directory is not an entry).
fn is_key(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Makes the finished image `name` in `dir` read-only and durable.
fn seal(dir: &Dir, name: &str) -> Result<(), PackageError> {
    let path = dir.join(name);
    let file = dir
        .open_file(name)
        .map_err(PackageError::io("open", &path))?;
    file.set_permissions(fs::Permissions::from_mode(LAYER_MODE))
        .map_err(PackageError::io("set permissions of", &path))?;
    file.sync_all().map_err(PackageError::io("sync", &path))
}

/// Writes the new file `name` in `dir`, durably.
fn write_synced(dir: &Dir, name: &str, bytes: &[u8]) -> Result<(), PackageError> {
    let path = dir.join(name);
    let mut file = dir
        .create_new(name, TEXT_MODE)
        .map_err(PackageError::io("create", &path))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(PackageError::io("write", &path))
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packages::Ecosystem;
    use crate::packages::layer;
    use std::io::Write;

    fn target() -> Target {
        Target {
            ecosystem: Ecosystem::Python,
            image_version: "img".into(),
            interpreter: "3.11".into(),
            glibc: "2.36".into(),
        }
    }

    fn pin(name: &str) -> Pin {
        Pin {
            name: name.into(),
            version: "1.0".into(),
        }
    }

    /// Publishes a fake layer of `size` bytes for `name==1.0`; returns its key.
    fn put(cache: &LayerCache, name: &str, size: usize) -> String {
        let requested = vec![pin(name)];
        let key = layer::key(&target(), &requested);
        let lock = cache.lock(&key, || {}).unwrap();
        let staging = cache.staging(&key).unwrap();
        let bytes = vec![7u8; size];
        fs::write(staging.path().join(LAYER_FILE), &bytes).unwrap();
        let (sha256, size) = files::sha256_reader(&bytes[..]).unwrap();
        let manifest = LayerManifest {
            format: layer::FORMAT,
            key: key.clone(),
            target: target(),
            requested: requested.clone(),
            closure: requested,
            sha256,
            size,
            built_unix_ms: 1,
            install_ms: 1,
            warm_modules: Vec::new(),
        };
        cache.publish(staging, &manifest, &lock).unwrap();
        key
    }

    fn set_last_used(cache: &LayerCache, key: &str, ms: u64) {
        let usage = Usage {
            hits: 0,
            last_used_unix_ms: ms,
        };
        fs::write(
            cache.dir().join(key).join(USAGE_FILE),
            serde_json::to_vec(&usage).unwrap(),
        )
        .unwrap();
    }

    #[test]
    fn a_published_entry_is_found_verified_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let cache = LayerCache::new(dir.path().to_path_buf());
        let key = put(&cache, "a", 10_000);
        let Lookup::Hit(hit) = cache.lookup(&key) else {
            panic!("a published entry is a hit")
        };
        assert_eq!(hit.manifest.requested, [pin("a")]);
        assert_eq!(
            fs::metadata(hit.layer_path()).unwrap().permissions().mode() & 0o777,
            0o444
        );
        cache.record_use(&hit);
        cache.record_use(&hit);
        let infos = cache.entries();
        assert_eq!(infos.len(), 1);
        assert_eq!(infos[0].hits, 2);
        assert_eq!(infos[0].packages, ["a==1.0"]);
        assert!(infos[0].bytes >= 10_000);
        assert!(matches!(cache.lookup(&"0".repeat(64)), Lookup::Miss));
        // Nothing left behind but the entry, its lock and nothing else.
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn a_truncated_or_edited_layer_is_bad_and_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let cache = LayerCache::new(dir.path().to_path_buf());
        let key = put(&cache, "a", 10_000);
        let layer = dir.path().join(&key).join(LAYER_FILE);
        fs::set_permissions(&layer, fs::Permissions::from_mode(0o644)).unwrap();
        File::options()
            .write(true)
            .open(&layer)
            .unwrap()
            .set_len(5_000)
            .unwrap();
        let Lookup::Bad(reason) = cache.lookup(&key) else {
            panic!("a truncated layer is bad")
        };
        assert!(reason.contains("checksum"), "{reason}");
        let lock = cache.lock(&key, || {}).unwrap();
        cache.discard(&key, &lock);
        assert!(matches!(cache.lookup(&key), Lookup::Miss));

        // Same size, other bytes (appended then truncated back: the fingerprint moves).
        let key = put(&cache, "b", 10_000);
        let layer = dir.path().join(&key).join(LAYER_FILE);
        fs::set_permissions(&layer, fs::Permissions::from_mode(0o644)).unwrap();
        let mut f = File::options().write(true).open(&layer).unwrap();
        f.write_all(b"X").unwrap();
        drop(f);
        assert!(matches!(cache.lookup(&key), Lookup::Bad(_)));

        let key = put(&cache, "c", 100);
        fs::write(dir.path().join(&key).join(MANIFEST_FILE), b"{not json").unwrap();
        assert!(matches!(cache.lookup(&key), Lookup::Bad(r) if r.contains("invalid")));
    }

    #[test]
    fn links_in_place_of_a_layer_its_manifest_or_a_lock_are_not_followed() {
        use crate::disk::Untouched;
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let cache = LayerCache::new(dir.path().join("packages"));
        let outside = tempfile::tempdir().unwrap();
        // The same bytes outside the cache, linked in place of the layer: the entry is bad
        // (the link is never opened), and discarding it removes the link only.
        let key = put(&cache, "a", 10_000);
        let entry = cache.dir().join(&key);
        fs::copy(entry.join(LAYER_FILE), outside.path().join(LAYER_FILE)).unwrap();
        fs::copy(
            entry.join(MANIFEST_FILE),
            outside.path().join(MANIFEST_FILE),
        )
        .unwrap();
        let untouched = Untouched::record(outside.path());
        fs::remove_file(entry.join(LAYER_FILE)).unwrap();
        symlink(outside.path().join(LAYER_FILE), entry.join(LAYER_FILE)).unwrap();
        assert!(matches!(cache.lookup(&key), Lookup::Bad(_)));
        let lock = cache.lock(&key, || {}).unwrap();
        cache.discard(&key, &lock);
        drop(lock);
        assert!(matches!(cache.lookup(&key), Lookup::Miss));

        let key = put(&cache, "b", 100);
        let entry = cache.dir().join(&key);
        fs::remove_file(entry.join(MANIFEST_FILE)).unwrap();
        symlink(
            outside.path().join(MANIFEST_FILE),
            entry.join(MANIFEST_FILE),
        )
        .unwrap();
        assert!(matches!(cache.lookup(&key), Lookup::Bad(r) if r.contains("symbolic link")));

        // A link in place of the whole entry.
        let key = put(&cache, "c", 100);
        let entry = cache.dir().join(&key);
        let moved = outside.path().join("entry");
        fs::rename(&entry, &moved).unwrap();
        symlink(&moved, &entry).unwrap();
        let moved_untouched = Untouched::record(&moved);
        assert!(matches!(cache.lookup(&key), Lookup::Bad(_)));
        assert!(cache.entries().iter().all(|e| e.key != key));
        moved_untouched.assert_untouched();

        // A link planted as a key's lock file.
        let key = "d".repeat(64);
        let precious = outside.path().join(LAYER_FILE);
        symlink(
            &precious,
            cache.dir().join(LOCKS_DIR).join(format!("{key}.lock")),
        )
        .unwrap();
        let err = cache.lock(&key, || {}).unwrap_err();
        assert!(
            crate::vm::error_chain(&err).contains("symbolic link"),
            "{err}"
        );

        // Nothing outside changed but the entry moved there by the test itself.
        fs::remove_dir_all(&moved).unwrap();
        untouched.assert_untouched();
    }

    #[test]
    fn eviction_keeps_the_most_recently_used_within_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let cache = LayerCache::new(dir.path().to_path_buf());
        let old = put(&cache, "old", 100_000);
        let mid = put(&cache, "mid", 100_000);
        let new = put(&cache, "new", 100_000);
        set_last_used(&cache, &old, 1_000);
        set_last_used(&cache, &mid, 2_000);
        set_last_used(&cache, &new, 3_000);
        let per_entry = allocated_bytes(&dir.path().join(&new));
        // Room for two: the oldest goes.
        let evicted = cache.evict(2 * per_entry + per_entry / 2, None);
        assert_eq!(
            evicted.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            [old.as_str()]
        );
        assert!(matches!(cache.lookup(&old), Lookup::Miss));
        assert!(matches!(cache.lookup(&new), Lookup::Hit(_)));
        // A locked entry (being rebuilt) and the kept one survive even a zero bound.
        let _building = cache.lock(&mid, || {}).unwrap();
        let evicted = cache.evict(0, Some(&new));
        assert!(evicted.is_empty(), "{evicted:?}");
        drop(_building);
        let evicted = cache.evict(0, None);
        assert_eq!(evicted.len(), 2);
        assert!(cache.entries().is_empty());
    }

    #[test]
    fn leftovers_of_interrupted_work_are_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let cache = LayerCache::new(dir.path().to_path_buf());
        let trash = dir.path().join(".trash-x-1-1");
        fs::create_dir_all(trash.join("sub")).unwrap();
        let fresh = cache.staging(&"a".repeat(64)).unwrap();
        let stale = dir.path().join(".tmp-old");
        fs::create_dir(&stale).unwrap();
        File::open(&stale)
            .unwrap()
            .set_modified(SystemTime::now() - 2 * crate::disk::STALE_BUILD)
            .unwrap();
        cache.evict(u64::MAX, None);
        assert!(!trash.exists());
        assert!(!stale.exists());
        assert!(fresh.path().exists(), "a build in progress is left alone");
    }

    #[test]
    fn adopting_a_download_checks_it() {
        let dir = tempfile::tempdir().unwrap();
        let cache = LayerCache::new(dir.path().to_path_buf());
        // A good entry elsewhere plays the remote copy.
        let source = LayerCache::new(dir.path().join("remote"));
        let key = put(&source, "a", 1_000);
        let copy = |corrupt: bool| {
            let staging = cache.staging(&key).unwrap();
            for file in [LAYER_FILE, MANIFEST_FILE] {
                fs::copy(
                    source.dir().join(&key).join(file),
                    staging.path().join(file),
                )
                .unwrap();
            }
            if corrupt {
                let layer = staging.path().join(LAYER_FILE);
                fs::set_permissions(&layer, fs::Permissions::from_mode(0o644)).unwrap();
                fs::write(&layer, vec![8u8; 1_000]).unwrap();
            }
            staging
        };
        let lock = cache.lock(&key, || {}).unwrap();
        let err = cache
            .adopt(copy(true), &key, &target(), &[pin("a")], &lock)
            .unwrap_err();
        assert!(err.contains("does not match"), "{err}");
        let err = cache
            .adopt(copy(false), &key, &target(), &[pin("b")], &lock)
            .unwrap_err();
        assert!(err.contains("another"), "{err}");
        assert!(matches!(cache.lookup(&key), Lookup::Miss));
        cache
            .adopt(copy(false), &key, &target(), &[pin("a")], &lock)
            .unwrap();
        drop(lock);
        assert!(matches!(cache.lookup(&key), Lookup::Hit(_)));
        // Failed adoptions left nothing behind.
        assert!(fs::read_dir(dir.path()).unwrap().all(|e| {
            !e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".tmp-")
        }));
    }
}
