//! Small file-system helpers shared by the on-disk caches (guest images, memory snapshots,
//! package layers): hashing, lock files, sizes on disk, and leftovers of interrupted work.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};

/// Age after which a cache's `.tmp-*` build directory is a leftover of a process that died
/// while building.
pub(crate) const STALE_BUILD: Duration = Duration::from_secs(3600);

/// Hex SHA-256 and length of everything `reader` yields.
pub(crate) fn sha256_reader(mut reader: impl Read) -> io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buffer[..n]);
        total += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), total))
}

/// Opens (creating it) the file at `path` for `flock`. Read access suffices for flock, so a
/// cache prepared by another user (root) still locks.
pub(crate) fn open_lock_file(path: &Path) -> io::Result<File> {
    File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .or_else(|_| File::open(path))
}

/// Bytes `path` occupies on disk, a directory with everything beneath it (sparse files count
/// what is allocated).
pub(crate) fn allocated_bytes(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    let own = meta.blocks() * 512;
    if !meta.is_dir() {
        return own;
    }
    own + fs::read_dir(path)
        .map(|read| {
            read.filter_map(Result::ok)
                .map(|e| allocated_bytes(&e.path()))
                .sum::<u64>()
        })
        .unwrap_or(0)
}

/// Removes the cache directory entry `path` (named `name`) when it is a leftover: a
/// `.trash-*` directory being deleted, or a `.tmp-*` build older than [`STALE_BUILD`]. True
/// when it was one.
pub(crate) fn remove_if_leftover(path: &Path, name: &str) -> bool {
    let stale_build = name.starts_with(".tmp-")
        && fs::metadata(path)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() > STALE_BUILD);
    if name.starts_with(".trash-") || stale_build {
        let _ = fs::remove_dir_all(path);
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_hashes_locks_and_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, vec![1u8; 10_000]).unwrap();
        assert!(allocated_bytes(dir.path()) >= 10_000);
        assert_eq!(sha256_reader(&b"abc"[..]).unwrap().1, 3);
        let lock = open_lock_file(&dir.path().join("k.lock")).unwrap();
        assert!(crate::sys::flock_exclusive(&lock, false).unwrap());
        let trash = dir.path().join(".trash-x");
        fs::create_dir(&trash).unwrap();
        assert!(remove_if_leftover(&trash, ".trash-x"));
        assert!(!trash.exists());
        let fresh = dir.path().join(".tmp-y");
        fs::create_dir(&fresh).unwrap();
        assert!(
            !remove_if_leftover(&fresh, ".tmp-y"),
            "a build in progress stays"
        );
        assert!(fresh.exists());
    }
}
