//! File helpers shared by the store: hashing, temporary names, atomic replacement.
//!
//! Every file a reader may look at is written under a temporary name in its final directory and
//! renamed into place, so another process sees either nothing or the whole file. Files are
//! reached through a directory handle and never through a symbolic link (`disk::Dir`).

use std::fs::{self, File};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::AssetError;
use crate::disk::Dir;

pub(crate) use crate::disk::sha256_reader;

/// Mode of a finished asset: read-only, so that nothing edits it by accident (its checksum is
/// recorded), and readable by a QEMU that does not run as the cache's owner.
const ASSET_MODE: u32 = 0o444;
/// Mode of the manifest, stamps and lock texts.
const TEXT_MODE: u32 = 0o644;

/// Hex SHA-256 and length of the file at `path` (a build's output, in a directory of ours);
/// a symbolic link there is refused.
pub(crate) fn sha256_file(path: &Path) -> Result<(String, u64), AssetError> {
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(AssetError::io("open", path))?;
    sha256_reader(file).map_err(AssetError::io("read", path))
}

/// Replaces `name` in `dir` with `bytes` atomically (temporary file, fsync, rename).
pub(crate) fn write_atomic(dir: &Dir, name: &str, bytes: &[u8]) -> Result<(), AssetError> {
    dir.replace(name, bytes, TEXT_MODE, true)
        .map_err(AssetError::io("write", dir.join(name)))
}

/// Moves the finished asset `from` (in `source`) into `dir` as `name`: synced, read-only.
pub(crate) fn install(source: &Dir, from: &str, dir: &Dir, name: &str) -> Result<(), AssetError> {
    let path = source.join(from);
    let file = source
        .open_file(from)
        .map_err(AssetError::io("open", &path))?;
    file.sync_all().map_err(AssetError::io("sync", &path))?;
    file.set_permissions(fs::Permissions::from_mode(ASSET_MODE))
        .map_err(AssetError::io("set permissions of", &path))?;
    source
        .rename(from, dir, name)
        .map_err(AssetError::io("rename into place", dir.join(name)))
}

/// A temporary file in a cache directory, removed when dropped unless kept.
pub(crate) struct TempFile {
    path: Option<PathBuf>,
    name: String,
}

impl TempFile {
    /// A fresh temporary name in `dir` for what will become `name` (nothing is created).
    pub(crate) fn in_dir(dir: &Dir, name: &str) -> Self {
        let name = crate::disk::temp_name(name);
        Self {
            path: Some(dir.join(&name)),
            name,
        }
    }

    /// Creates it (it must not exist) for writing.
    pub(crate) fn create(&self, dir: &Dir) -> Result<File, AssetError> {
        dir.create_new(&self.name, TEXT_MODE)
            .map_err(AssetError::io("create", self.path()))
    }

    /// Its name in its directory.
    pub(crate) fn name(&self) -> &str {
        &self.name
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
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        let path = tmp.path().join("manifest.json");
        write_atomic(&dir, "manifest.json", b"one").unwrap();
        write_atomic(&dir, "manifest.json", b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn temp_file_is_removed_unless_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        let dropped = TempFile::in_dir(&dir, "a");
        dropped.create(&dir).unwrap();
        drop(dropped);
        let kept = TempFile::in_dir(&dir, "b");
        kept.create(&dir).unwrap();
        let path = kept.path().to_path_buf();
        kept.keep();
        assert!(path.exists());
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn install_makes_the_file_read_only_under_its_name() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        let temp = TempFile::in_dir(&dir, "vmlinux");
        std::io::Write::write_all(&mut temp.create(&dir).unwrap(), b"k").unwrap();
        install(&dir, temp.name(), &dir, "vmlinux").unwrap();
        temp.keep();
        let meta = fs::metadata(tmp.path().join("vmlinux")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o444);
    }
}
