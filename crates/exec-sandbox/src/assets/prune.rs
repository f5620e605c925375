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

/// Removes the directories [`others`] lists; returns how many went and the bytes that freed.
/// One that cannot be removed is logged and kept, and what is left of it (all, or the part a
/// failed removal did not reach) is not counted as freed.
pub(crate) fn remove_others(parent: &Path, keep: &str) -> io::Result<(usize, u64)> {
    remove_others_with(parent, keep, &|dir| std::fs::remove_dir_all(dir))
}

fn remove_others_with(
    parent: &Path,
    keep: &str,
    remove_dir: &dyn Fn(&Path) -> io::Result<()>,
) -> io::Result<(usize, u64)> {
    let (dirs, listed) = others(parent, keep)?;
    let removed = dirs
        .iter()
        .filter(|dir| match remove_dir(dir) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove an unused directory");
                false
            }
        })
        .count();
    let (_, left) = others(parent, keep)?;
    Ok((removed, listed.saturating_sub(left)))
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

        assert_eq!(remove_others(root, "new").unwrap(), (2, bytes));
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

    #[test]
    fn what_cannot_be_removed_is_not_reported_freed() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        for dir in ["new", "gone", "stuck"] {
            fs::create_dir(root.join(dir)).unwrap();
        }
        fs::write(root.join("gone/a"), vec![1u8; 4096]).unwrap();
        fs::write(root.join("stuck/b"), vec![1u8; 8192]).unwrap();
        fs::write(root.join("stuck/c"), vec![1u8; 16384]).unwrap();
        // A removal that fails part-way: `b` goes, `c` and the directory stay.
        let partly = |dir: &Path| {
            if dir.ends_with("stuck") {
                fs::remove_file(dir.join("b"))?;
                return Err(io::Error::from(io::ErrorKind::PermissionDenied));
            }
            fs::remove_dir_all(dir)
        };
        assert_eq!(
            remove_others_with(root, "new", &partly).unwrap(),
            (1, 4096 + 8192),
            "the bytes that went, not the bytes listed"
        );
        assert_eq!(
            others(root, "new").unwrap(),
            (vec![root.join("stuck")], 16384)
        );
    }
}
