//! The cross-process lock that serializes building, downloading and manifest updates.
//!
//! An exclusive `flock` on `<images_dir>/.lock`. The kernel drops it when the holder's
//! descriptor closes, including when the process dies, so a crashed `sbx` never leaves the
//! cache locked. Readers take no lock: files appear by rename and the manifest is written last.
//! A symbolic link planted as the lock file is refused, never followed.

use std::fs::File;

use super::AssetError;
use crate::disk::Dir;
use crate::sys;

/// File name of the lock in the images directory.
pub(crate) const FILE: &str = ".lock";

/// Holds the lock until dropped.
#[derive(Debug)]
pub(crate) struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock on `images_dir`, calling `on_wait` first if another process holds it.
    pub(crate) fn acquire(images_dir: &Dir, on_wait: impl FnOnce()) -> Result<Self, AssetError> {
        let path = images_dir.join(FILE);
        let file = images_dir
            .open_lock(FILE)
            .map_err(AssetError::io("open the lock file", &path))?;
        if !sys::flock_exclusive(&file, false).map_err(AssetError::io("lock", &path))? {
            on_wait();
            sys::flock_exclusive(&file, true).map_err(AssetError::io("lock", &path))?;
        }
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn a_second_holder_waits_until_the_first_releases() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(&Dir::open(dir.path()).unwrap(), || {
            panic!("the lock is free")
        })
        .unwrap();
        let (waiting_tx, waiting_rx) = mpsc::channel();
        let (acquired_tx, acquired_rx) = mpsc::channel();
        let path = dir.path().to_path_buf();
        let second = std::thread::spawn(move || {
            let images = Dir::open(&path).unwrap();
            let lock = DirLock::acquire(&images, || waiting_tx.send(()).unwrap()).unwrap();
            acquired_tx.send(()).unwrap();
            drop(lock);
        });
        waiting_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the second caller waits");
        assert!(
            acquired_rx.try_recv().is_err(),
            "acquired while the first holds the lock"
        );
        drop(first);
        acquired_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("acquired after release");
        second.join().unwrap();
    }
}
