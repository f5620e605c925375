//! File helpers shared by the store: hashing, temporary names, atomic replacement.
//!
//! Every file a reader may look at is written under a temporary name in its final directory and
//! renamed into place, so another process sees either nothing or the whole file.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::AssetError;

pub(crate) use crate::disk::sha256_reader;

/// Hex SHA-256 and length of the file at `path`.
pub(crate) fn sha256_file(path: &Path) -> Result<(String, u64), AssetError> {
    let file = File::open(path).map_err(AssetError::io("open", path))?;
    sha256_reader(file).map_err(AssetError::io("read", path))
}

/// A name in `dir` for a file being written: hidden, unique to this process and call, so
/// concurrent writers never share one and leftovers are recognisable (`.<name>.tmp-<pid>-<n>`).
pub(crate) fn temp_path(dir: &Path, name: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

/// Replaces `path` with `bytes` atomically (temporary file, fsync, rename).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AssetError> {
    let dir = path.parent().expect("asset files live in a directory");
    let name = path.file_name().expect("a file path").to_string_lossy();
    let temp = temp_path(dir, &name);
    let result = (|| {
        let mut file = File::create(&temp).map_err(AssetError::io("create", &temp))?;
        file.write_all(bytes)
            .map_err(AssetError::io("write", &temp))?;
        file.sync_all().map_err(AssetError::io("sync", &temp))?;
        fs::rename(&temp, path).map_err(AssetError::io("rename into place", path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// Moves a finished asset file into place, read-only so that nothing edits it by accident
/// (its checksum is recorded).
pub(crate) fn install(temp: &Path, path: &Path) -> Result<(), AssetError> {
    let file = File::open(temp).map_err(AssetError::io("open", temp))?;
    file.sync_all().map_err(AssetError::io("sync", temp))?;
    fs::set_permissions(temp, fs::Permissions::from_mode(0o444))
        .map_err(AssetError::io("set permissions of", temp))?;
    fs::rename(temp, path).map_err(AssetError::io("rename into place", path))
}

/// Removes a temporary file when dropped, unless it was kept.
pub(crate) struct TempFile {
    path: Option<PathBuf>,
}

impl TempFile {
    pub(crate) fn new(path: PathBuf) -> Self {
        Self { path: Some(path) }
    }

    pub(crate) fn path(&self) -> &Path {
        self.path.as_deref().expect("not yet kept")
    }

    /// The file was renamed away: nothing to clean up.
    pub(crate) fn keep(mut self) {
        self.path = None;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_matches_a_known_vector() {
        let (sum, len) = sha256_reader(&b"abc"[..]).unwrap();
        assert_eq!(
            sum,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(len, 3);
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn temp_file_is_removed_unless_kept() {
        let dir = tempfile::tempdir().unwrap();
        let dropped = TempFile::new(temp_path(dir.path(), "a"));
        fs::write(dropped.path(), b"x").unwrap();
        drop(dropped);
        let kept = TempFile::new(temp_path(dir.path(), "b"));
        fs::write(kept.path(), b"x").unwrap();
        let path = kept.path().to_path_buf();
        kept.keep();
        assert!(path.exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
