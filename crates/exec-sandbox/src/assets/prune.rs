//! The asset versions and QEMU builds nothing uses any more: every change to the guest's build
//! inputs selects a new version directory, and every Debian QEMU update a new build, and the
//! old ones stay until `sbx cache prune` ([`crate::Scheduler::prune_caches`]) removes them.

use std::collections::BTreeSet;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The directories of `parent` other than `keep` (names starting with `.` are locks and
/// builds in progress: never listed), and the bytes removing them all would free: a file also
/// linked into `keep`, or counted once already, counts nothing.
pub(crate) fn others(parent: &Path, keep: &str) -> io::Result<(Vec<PathBuf>, u64)> {
    let entries = match std::fs::read_dir(parent) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e),
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name == keep || name.starts_with('.') || !entry.file_type()?.is_dir() {
            continue;
        }
        dirs.push(entry.path());
    }
    dirs.sort();
    let mut seen = BTreeSet::new();
    let mut kept = 0;
    walk(&parent.join(keep), &mut seen, &mut kept)?;
    let mut bytes = 0;
    for dir in &dirs {
        walk(dir, &mut seen, &mut bytes)?;
    }
    Ok((dirs, bytes))
}

/// Adds the size of every regular file below `dir` whose inode is not in `seen` to `bytes`,
/// without following links.
fn walk(dir: &Path, seen: &mut BTreeSet<(u64, u64)>, bytes: &mut u64) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let meta = std::fs::symlink_metadata(entry.path())?;
        if meta.is_dir() {
            walk(&entry.path(), seen, bytes)?;
        } else if meta.is_file() && seen.insert((meta.dev(), meta.ino())) {
            *bytes += meta.len();
        }
    }
    Ok(())
}

/// Removes `dirs`; returns how many went (one that cannot be removed is logged and kept).
pub(crate) fn remove(dirs: &[PathBuf]) -> usize {
    dirs.iter()
        .filter(|dir| match std::fs::remove_dir_all(dir) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove an unused directory");
                false
            }
        })
        .count()
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn others_are_listed_with_the_bytes_only_they_hold_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        for dir in ["new", "old", "older/bin", ".build-7"] {
            fs::create_dir_all(root.join(dir)).unwrap();
        }
        fs::write(root.join(".lock"), b"").unwrap();
        fs::write(root.join("build.log"), vec![1u8; 8192]).unwrap();
        fs::write(root.join("new/rootfs"), vec![1u8; 64 * 1024]).unwrap();
        // Hard-linked into the kept version: removing `old` frees nothing of it.
        fs::hard_link(root.join("new/rootfs"), root.join("old/rootfs")).unwrap();
        fs::write(root.join("old/initramfs"), vec![1u8; 16 * 1024]).unwrap();
        // Linked between two old versions: counted once.
        fs::write(root.join("older/bin/qemu"), vec![1u8; 32 * 1024]).unwrap();
        fs::hard_link(root.join("older/bin/qemu"), root.join("old/qemu")).unwrap();
        // A link out of the tree is not followed.
        std::os::unix::fs::symlink("/usr", root.join("older/usr")).unwrap();

        let (dirs, bytes) = others(root, "new").unwrap();
        assert_eq!(dirs, [root.join("old"), root.join("older")]);
        assert_eq!(bytes, (16 + 32) * 1024);

        assert_eq!(remove(&dirs), 2);
        assert!(!root.join("old").exists() && !root.join("older").exists());
        for kept in ["new/rootfs", ".build-7", ".lock", "build.log"] {
            assert!(root.join(kept).exists(), "{kept}");
        }
        assert_eq!(others(root, "new").unwrap(), (Vec::new(), 0));
        assert_eq!(
            others(&root.join("missing"), "new").unwrap(),
            (Vec::new(), 0)
        );
    }
}
