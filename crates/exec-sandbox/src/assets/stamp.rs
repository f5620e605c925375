//! Cheap re-verification: a file hashed once is trusted while its inode fingerprint holds.
//!
//! Hashing a few hundred megabytes of root filesystem costs seconds, far over the budget of a
//! one-shot `sbx run`. After a full SHA-256 check the store records the file's fingerprint
//! (device, inode, size, mtime and ctime in nanoseconds) in `verified.json` next to the
//! manifest. Later processes compare fingerprints with one `stat` per file and hash again only
//! when something moved. Any write to the file changes its mtime and ctime, and ctime cannot be
//! set back from user space, so an edit in place, a truncation or a replacement is noticed.

use std::collections::BTreeMap;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::AssetError;
use super::files;
use super::manifest::Entry;
use crate::disk::Dir;

/// File name of the stamps in a version directory.
pub(crate) const FILE: &str = "verified.json";

/// What `stat` says about a file; equal fingerprints mean unchanged content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Fingerprint {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl Fingerprint {
    pub(crate) fn of(metadata: &Metadata) -> Self {
        let ns = |secs: i64, nsecs: i64| secs.saturating_mul(1_000_000_000).saturating_add(nsecs);
        Self {
            dev: metadata.dev(),
            ino: metadata.ino(),
            size: metadata.len(),
            mtime_ns: ns(metadata.mtime(), metadata.mtime_nsec()),
            ctime_ns: ns(metadata.ctime(), metadata.ctime_nsec()),
        }
    }
}

/// One verified file: the hash it had and the fingerprint it had then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    sha256: String,
    fingerprint: Fingerprint,
}

/// The stamps of one version directory.
#[derive(Debug)]
pub(crate) struct Stamps<'a> {
    dir: &'a Dir,
    by_file: BTreeMap<String, Stamp>,
    dirty: bool,
}

/// The outcome of checking one listed file.
#[derive(Debug)]
pub(crate) enum Check {
    /// The file matches its manifest entry.
    Verified(PathBuf),
    /// The file does not exist.
    Missing,
}

/// Largest `verified.json` read (it holds a handful of stamps).
const MAX_BYTES: u64 = 1 << 20;

impl<'a> Stamps<'a> {
    /// The stamps recorded in `dir`; unreadable or absent stamps just mean "hash again".
    pub(crate) fn load(dir: &'a Dir) -> Self {
        let by_file = dir
            .read(FILE, MAX_BYTES)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        Self {
            dir,
            by_file,
            dirty: false,
        }
    }

    /// Checks the file `entry` lists: by fingerprint when a stamp matches, else by hashing it
    /// (and stamping it when it matches). A mismatch is an error, never a reason to rebuild;
    /// so is a symbolic link in the file's place (never followed).
    pub(crate) fn check(&mut self, entry: &Entry) -> Result<Check, AssetError> {
        let path = self.dir.join(&entry.file);
        let file = match self.dir.open_file(&entry.file) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Check::Missing),
            Err(e) => return Err(AssetError::io("open", path)(e)),
        };
        let before = file
            .metadata()
            .map(|m| Fingerprint::of(&m))
            .map_err(AssetError::io("inspect", &path))?;
        if self
            .by_file
            .get(&entry.file)
            .is_some_and(|s| s.sha256 == entry.sha256 && s.fingerprint == before)
        {
            return Ok(Check::Verified(path));
        }
        tracing::info!("verifying {} ({})", entry.file, human_size(before.size));
        let (actual, _) = files::sha256_reader(&file).map_err(AssetError::io("read", &path))?;
        if actual != entry.sha256 {
            return Err(AssetError::Checksum {
                name: entry.name.clone(),
                path,
                expected: entry.sha256.clone(),
                actual,
                url: None,
            });
        }
        // Only a file that did not change while it was hashed earns a stamp.
        if file.metadata().is_ok_and(|m| Fingerprint::of(&m) == before) {
            self.record(&entry.file, &entry.sha256, before);
        }
        Ok(Check::Verified(path))
    }

    /// Records that `file` (just written or verified by the caller) has `sha256`.
    pub(crate) fn stamp_now(&mut self, file: &str, sha256: &str) -> Result<(), AssetError> {
        let path = self.dir.join(file);
        let metadata = self
            .dir
            .open_file(file)
            .and_then(|f| f.metadata())
            .map_err(AssetError::io("inspect", &path))?;
        self.record(file, sha256, Fingerprint::of(&metadata));
        Ok(())
    }

    fn record(&mut self, file: &str, sha256: &str, fingerprint: Fingerprint) {
        let stamp = Stamp {
            sha256: sha256.to_string(),
            fingerprint,
        };
        if self.by_file.get(file) != Some(&stamp) {
            self.by_file.insert(file.to_string(), stamp);
            self.dirty = true;
        }
    }

    /// Writes the stamps back if they changed. Failing to is not an error (the directory may
    /// belong to root while this process is not): the files are simply hashed again next time.
    pub(crate) fn save(&mut self) {
        if !self.dirty {
            return;
        }
        let text = serde_json::to_vec_pretty(&self.by_file).expect("stamps always serialize");
        match files::write_atomic(self.dir, FILE, &text) {
            Ok(()) => self.dirty = false,
            Err(e) => tracing::debug!(error = %e, "cannot record verified assets"),
        }
    }
}

/// `123 MB`, `4.5 MB`, `812 KB`: for progress messages.
pub(crate) fn human_size(bytes: u64) -> String {
    const MB: u64 = 1_000_000;
    match bytes {
        b if b >= 100 * MB => format!("{} MB", b / MB),
        b if b >= MB => format!("{:.1} MB", b as f64 / MB as f64),
        b => format!("{} KB", b.div_ceil(1000)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn setup(content: &[u8]) -> (tempfile::TempDir, Entry) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinux"), content).unwrap();
        (dir, entry_for(content))
    }

    fn entry_for(content: &[u8]) -> Entry {
        let (sha256, size) = files::sha256_reader(content).unwrap();
        Entry {
            name: "kernel".into(),
            file: "vmlinux".into(),
            sha256,
            size,
            inputs: String::new(),
            lock: None,
        }
    }

    fn open(dir: &tempfile::TempDir) -> Dir {
        Dir::open(dir.path()).unwrap()
    }

    #[test]
    fn a_verified_file_is_stamped_and_the_stamp_persists() {
        let (dir, entry) = setup(b"kernel bytes");
        let handle = open(&dir);
        let mut stamps = Stamps::load(&handle);
        assert!(matches!(stamps.check(&entry).unwrap(), Check::Verified(_)));
        stamps.save();
        let reloaded = Stamps::load(&handle);
        assert!(reloaded.by_file.contains_key("vmlinux"));
        assert!(!reloaded.dirty);
    }

    #[test]
    fn a_matching_stamp_skips_hashing() {
        let (dir, entry) = setup(b"kernel bytes");
        let handle = open(&dir);
        let mut stamps = Stamps::load(&handle);
        stamps.check(&entry).unwrap();
        // A stamp is trusted: proven by stamping a wrong hash and seeing it accepted. Real
        // stamps are only ever written after a successful hash.
        let mut lying = entry.clone();
        lying.sha256 = "00".repeat(32);
        let fp = stamps.by_file["vmlinux"].fingerprint;
        stamps.record("vmlinux", &lying.sha256, fp);
        assert!(matches!(stamps.check(&lying).unwrap(), Check::Verified(_)));
    }

    #[test]
    fn a_change_invalidates_the_stamp_and_fails_the_check() {
        let (dir, entry) = setup(b"kernel bytes");
        let handle = open(&dir);
        let mut stamps = Stamps::load(&handle);
        stamps.check(&entry).unwrap();
        stamps.save();
        // Timestamps may not move within one clock tick of the kernel's coarse clock, so the
        // edit here also changes the size; a same-size edit moves mtime and ctime a tick later.
        let path = dir.path().join("vmlinux");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"!").unwrap();
        drop(f);
        let mut stamps = Stamps::load(&handle);
        let err = stamps.check(&entry).unwrap_err();
        assert!(matches!(err, AssetError::Checksum { .. }), "{err}");
    }

    #[test]
    fn a_missing_file_is_reported_as_missing() {
        let (dir, entry) = setup(b"x");
        let handle = open(&dir);
        std::fs::remove_file(dir.path().join("vmlinux")).unwrap();
        assert!(matches!(
            Stamps::load(&handle).check(&entry).unwrap(),
            Check::Missing
        ));
    }

    #[test]
    fn a_symlinked_asset_or_stamp_file_is_not_followed() {
        let (dir, entry) = setup(b"kernel bytes");
        let outside = tempfile::tempdir().unwrap();
        let copy = outside.path().join("vmlinux");
        std::fs::write(&copy, b"kernel bytes").unwrap();
        std::fs::remove_file(dir.path().join("vmlinux")).unwrap();
        std::os::unix::fs::symlink(&copy, dir.path().join("vmlinux")).unwrap();
        let handle = open(&dir);
        let mut stamps = Stamps::load(&handle);
        let err = stamps.check(&entry).unwrap_err().to_string();
        assert!(err.contains("vmlinux"), "{err}");
        // A planted stamp file is neither read nor written through: it is replaced.
        let stamps_outside = outside.path().join("verified.json");
        std::fs::write(&stamps_outside, b"{}").unwrap();
        std::os::unix::fs::symlink(&stamps_outside, dir.path().join(FILE)).unwrap();
        std::fs::remove_file(dir.path().join("vmlinux")).unwrap();
        std::fs::write(dir.path().join("vmlinux"), b"kernel bytes").unwrap();
        let mut stamps = Stamps::load(&handle);
        stamps.check(&entry_for(b"kernel bytes")).unwrap();
        stamps.save();
        assert_eq!(std::fs::read(&stamps_outside).unwrap(), b"{}");
        assert!(
            !std::fs::symlink_metadata(dir.path().join(FILE))
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }

    #[test]
    fn sizes_read_naturally() {
        assert_eq!(human_size(812_345), "813 KB");
        assert_eq!(human_size(4_500_000), "4.5 MB");
        assert_eq!(human_size(312_000_000), "312 MB");
    }
}
