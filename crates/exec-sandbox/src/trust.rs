//! The cache directory is a trust root: the library later executes or maps into VMs what it
//! finds there (kernel, initramfs, root filesystems, package layers, memory snapshots, the
//! accelerator verdict), so nobody but the caller and root may be able to change it.
//!
//! The rules, in the spirit of OpenSSH's `StrictModes` and sudo's checks of its own files:
//!
//! - A **cache directory** (what a cache asks for: the cache root, `images`, `snapshots`,
//!   `packages`, `host`, `build`) must be a directory owned by the caller or by root, writable
//!   by neither its group nor others. One the caller owns that others may read or enter (0755,
//!   as earlier versions created them) is tightened to 0700 on the spot; one others may write
//!   is refused, not repaired, because what is in it may already have been replaced.
//! - Every **directory on the way** to it, from `/`, as the kernel resolves the path (the
//!   directories holding symbolic links and their targets included), must be owned by root or
//!   the caller and not writable by group or others, unless it is sticky (`/tmp`): there only
//!   an entry's owner can rename or delete it, and the entry is checked itself.
//! - **Missing directories** are created one component at a time with mode 0700 (set
//!   explicitly, whatever the umask), owned by the caller.
//!
//! A directory that passed is remembered for the life of the process (the checks cost a few
//! `stat`s once); a refusal is not, so fixing the directory and retrying works.

use std::collections::{BTreeSet, VecDeque};
use std::ffi::OsString;
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use crate::env::EnvVars;
use crate::error_kind::ErrorKind;

/// Mode of every directory the library creates in its caches.
pub(crate) const DIR_MODE: u32 = 0o700;
/// Symbolic links followed while resolving one path, as the kernel allows (`MAXSYMLINKS`).
const MAX_LINKS: u32 = 40;
const STICKY: u32 = 0o1000;

/// A cache directory, or a directory on the way to it, that someone other than the caller
/// and root could change: refused before anything is read from it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    /// Another user owns the directory.
    #[error(
        "{} is owned by uid {owner} (mode {mode:04o}); only root or uid {caller} may own it",
        subject(path, cache)
    )]
    ForeignOwner {
        /// The directory refused.
        path: PathBuf,
        /// The cache directory being checked (`path` itself, or below it).
        cache: PathBuf,
        /// Its owner.
        owner: u32,
        /// Its permission bits.
        mode: u32,
        /// This process's effective uid.
        caller: u32,
    },
    /// The directory's group or others may write to it.
    #[error(
        "{} is writable by its group or others (mode {mode:04o}, owner uid {owner})",
        subject(path, cache)
    )]
    Writable {
        /// The directory refused.
        path: PathBuf,
        /// The cache directory being checked (`path` itself, or below it).
        cache: PathBuf,
        /// Its owner.
        owner: u32,
        /// Its permission bits.
        mode: u32,
    },
    /// Something other than a directory is in the way.
    #[error("{} is not a directory", subject(path, cache))]
    NotADirectory {
        /// What is there.
        path: PathBuf,
        /// The cache directory being checked.
        cache: PathBuf,
    },
    /// A file system operation failed.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The directory involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// `cache directory X`, or `X (on the way to cache directory Y)`.
fn subject(path: &Path, cache: &Path) -> String {
    if path == cache {
        format!("cache directory {}", path.display())
    } else {
        format!(
            "{} (on the way to cache directory {})",
            path.display(),
            cache.display()
        )
    }
}

impl TrustError {
    /// Stable kind of the failure: an operator has to act.
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::Permanent
    }

    /// What the operator can do about it.
    pub fn hint(&self) -> Option<String> {
        let elsewhere = format!(
            "set {} to a directory only you can write",
            EnvVars::CACHE_DIR
        );
        match self {
            TrustError::ForeignOwner {
                path,
                cache,
                caller,
                ..
            } if path == cache => Some(format!(
                "if its contents are yours to trust, `chown -R {caller} {}`; otherwise {elsewhere}",
                path.display()
            )),
            TrustError::Writable { path, cache, .. } if path == cache => Some(format!(
                "check that nobody else changed what is in it, then `chmod go-w {}`; or {elsewhere}",
                path.display()
            )),
            TrustError::ForeignOwner { .. } | TrustError::Writable { .. } => {
                Some(format!("{elsewhere}, outside that directory"))
            }
            TrustError::NotADirectory { .. } => Some(format!("remove it, or {elsewhere}")),
            TrustError::Io { .. } => Some(elsewhere),
        }
    }
}

/// Checks the cache directory `dir` and every directory on the way to it, creating nothing:
/// a missing `dir` passes (there is nothing in it to read yet).
pub(crate) fn check(dir: &Path) -> Result<(), TrustError> {
    verify(dir, false)
}

/// Like [`check`], creating `dir` and any missing directory on the way with mode 0700 first.
pub(crate) fn ensure(dir: &Path) -> Result<(), TrustError> {
    verify(dir, true)
}

/// Directories that passed in this process.
static TRUSTED: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

fn verify(dir: &Path, create: bool) -> Result<(), TrustError> {
    let cache = std::path::absolute(dir).map_err(io_error("resolve", dir))?;
    let known = TRUSTED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(&cache);
    // Only a trusted party can have removed it since; then it is made again, with care.
    if known && (!create || cache.is_dir()) {
        return Ok(());
    }
    let caller = crate::sys::effective_uid();
    // Each pass creates at most one missing component; a path has fewer than this many.
    for _ in 0..=cache.components().count() + MAX_LINKS as usize {
        let resolved = resolve(&cache, caller)?;
        let Some(first_missing) = resolved.missing.first() else {
            check_cache_dir(&resolved.dir, &cache, caller)?;
            TRUSTED
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(cache);
            return Ok(());
        };
        if !create {
            return Ok(());
        }
        make_dir(&resolved.dir.join(first_missing))?;
    }
    Err(io_error("create", &cache)(io::Error::other(
        "it keeps changing while being created",
    )))
}

/// Creates one directory with mode 0700 exactly. One that appeared meanwhile is fine: the
/// next pass checks it like any other.
fn make_dir(path: &Path) -> Result<(), TrustError> {
    match fs::DirBuilder::new().mode(DIR_MODE).create(path) {
        Ok(()) => {
            // mkdir applied the umask; a umask that removes the owner's bits would leave it
            // unusable.
            fs::set_permissions(path, fs::Permissions::from_mode(DIR_MODE))
                .map_err(io_error("set permissions of", path))?;
            tracing::debug!(dir = %path.display(), "created a cache directory");
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_error("create", path)(e)),
    }
}

/// How far a path resolves.
struct Resolved {
    /// The real path of its longest existing prefix: a directory, checked as a directory on
    /// the way unless `missing` is empty (then it is the cache directory itself, unchecked).
    dir: PathBuf,
    /// The components after it that do not exist.
    missing: Vec<OsString>,
}

/// Resolves the absolute `path` one component at a time, as the kernel does, checking every
/// directory passed through on the way (never the last one: it is the cache directory).
fn resolve(path: &Path, caller: u32) -> Result<Resolved, TrustError> {
    let mut todo: VecDeque<OsString> = VecDeque::new();
    push_components(&mut todo, path, false);
    let mut dir = PathBuf::from("/");
    let mut links = 0;
    let root = fs::metadata(&dir).map_err(io_error("inspect", &dir))?;
    check_on_the_way(&dir, &root, path, caller)?;
    while let Some(name) = todo.pop_front() {
        if name == ".." {
            // The parent of a checked directory was checked on the way down.
            dir.pop();
            continue;
        }
        let next = dir.join(&name);
        let meta = match fs::symlink_metadata(&next) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mut missing = vec![name];
                missing.extend(todo);
                return Ok(Resolved { dir, missing });
            }
            Err(e) => return Err(io_error("inspect", &next)(e)),
        };
        if meta.file_type().is_symlink() {
            links += 1;
            if links > MAX_LINKS {
                return Err(io_error("resolve", path)(io::Error::from_raw_os_error(
                    libc::ELOOP,
                )));
            }
            // The link's directory (`dir`) is checked: only a trusted user can change it.
            let target = fs::read_link(&next).map_err(io_error("read the link", &next))?;
            if target.is_absolute() {
                dir = PathBuf::from("/");
            }
            push_components(&mut todo, &target, true);
            continue;
        }
        if !meta.is_dir() {
            return Err(TrustError::NotADirectory {
                path: next,
                cache: path.to_path_buf(),
            });
        }
        if !todo.is_empty() {
            check_on_the_way(&next, &meta, path, caller)?;
        }
        dir = next;
    }
    Ok(Resolved {
        dir,
        missing: Vec::new(),
    })
}

/// Queues `path`'s components (in front of what is queued when `front`).
fn push_components(todo: &mut VecDeque<OsString>, path: &Path, front: bool) {
    let names: Vec<OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_os_string()),
            Component::ParentDir => Some("..".into()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect();
    if front {
        for name in names.into_iter().rev() {
            todo.push_front(name);
        }
    } else {
        todo.extend(names);
    }
}

/// A directory on the way: owned by root or the caller, and writable by nobody else unless
/// sticky.
fn check_on_the_way(
    path: &Path,
    meta: &Metadata,
    cache: &Path,
    caller: u32,
) -> Result<(), TrustError> {
    let (owner, mode) = (meta.uid(), meta.mode() & 0o7777);
    if owner != 0 && owner != caller {
        return Err(TrustError::ForeignOwner {
            path: path.to_path_buf(),
            cache: cache.to_path_buf(),
            owner,
            mode,
            caller,
        });
    }
    if mode & 0o022 != 0 && mode & STICKY == 0 {
        return Err(TrustError::Writable {
            path: path.to_path_buf(),
            cache: cache.to_path_buf(),
            owner,
            mode,
        });
    }
    Ok(())
}

/// The cache directory itself (`real` is its resolved path): owned by root or the caller,
/// writable by nobody else, sticky or not; the caller's own is tightened to 0700.
fn check_cache_dir(real: &Path, cache: &Path, caller: u32) -> Result<(), TrustError> {
    let meta = fs::metadata(real).map_err(io_error("inspect", real))?;
    let (owner, mode) = (meta.uid(), meta.mode() & 0o7777);
    if owner != 0 && owner != caller {
        return Err(TrustError::ForeignOwner {
            path: cache.to_path_buf(),
            cache: cache.to_path_buf(),
            owner,
            mode,
            caller,
        });
    }
    if mode & 0o022 != 0 {
        return Err(TrustError::Writable {
            path: cache.to_path_buf(),
            cache: cache.to_path_buf(),
            owner,
            mode,
        });
    }
    if owner == caller && mode & 0o077 != 0 {
        fs::set_permissions(real, fs::Permissions::from_mode(DIR_MODE))
            .map_err(io_error("set permissions of", real))?;
        // Quietly: what earlier versions created, made as this version creates it.
        tracing::debug!(dir = %cache.display(), "made the cache directory private (mode {mode:04o} to 0700)");
    }
    Ok(())
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> TrustError {
    let path = path.to_path_buf();
    move |source| TrustError::Io {
        action,
        path,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{chown, symlink};

    /// Tests run as root (the project's test hosts do); the foreign owner is `nobody`.
    const NOBODY: u32 = 65534;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().mode() & 0o7777
    }

    fn set_mode(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn missing_cache_directories_are_created_private() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("a/b/exec-sandbox");
        check(&cache).unwrap();
        assert!(!tmp.path().join("a").exists(), "check creates nothing");
        ensure(&cache).unwrap();
        for dir in ["a", "a/b", "a/b/exec-sandbox"] {
            assert_eq!(mode(&tmp.path().join(dir)), 0o700, "{dir}");
        }
        // Remembered, and made again if it went away.
        fs::remove_dir(&cache).unwrap();
        ensure(&cache).unwrap();
        assert_eq!(mode(&cache), 0o700);
    }

    #[test]
    fn a_cache_dir_owned_by_another_uid_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("exec-sandbox");
        fs::create_dir(&cache).unwrap();
        chown(&cache, Some(NOBODY), Some(NOBODY)).unwrap();
        let err = ensure(&cache).unwrap_err();
        assert!(
            matches!(&err, TrustError::ForeignOwner { owner: NOBODY, path, .. } if *path == cache),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains(&cache.display().to_string()) && text.contains("65534"),
            "{text}"
        );
        assert!(err.hint().unwrap().contains("chown"), "{:?}", err.hint());
        assert_eq!(err.kind(), ErrorKind::Permanent);
        // Refusals are not remembered: fixed, it passes.
        chown(&cache, Some(0), Some(0)).unwrap();
        check(&cache).unwrap();
    }

    #[test]
    fn a_group_writable_cache_dir_is_refused_not_repaired() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("exec-sandbox");
        fs::create_dir(&cache).unwrap();
        set_mode(&cache, 0o770);
        let err = check(&cache).unwrap_err();
        assert!(
            matches!(err, TrustError::Writable { mode: 0o770, .. }),
            "{err}"
        );
        assert!(err.hint().unwrap().contains("chmod go-w"));
        assert_eq!(mode(&cache), 0o770, "left as found");
        // Sticky does not make a cache directory safe: others could add entries to it.
        set_mode(&cache, 0o1777);
        assert!(matches!(
            check(&cache).unwrap_err(),
            TrustError::Writable { .. }
        ));
    }

    #[test]
    fn an_existing_0755_cache_dir_of_the_caller_is_tightened_to_0700() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("exec-sandbox");
        fs::create_dir(&cache).unwrap();
        set_mode(&cache, 0o755);
        check(&cache).unwrap();
        assert_eq!(mode(&cache), 0o700);
    }

    #[test]
    fn parents_must_be_owned_by_root_or_the_caller_and_not_writable_unless_sticky() {
        let tmp = tempfile::tempdir().unwrap();
        let parent = tmp.path().join("shared");
        let cache = parent.join("exec-sandbox");
        fs::create_dir_all(&cache).unwrap();
        set_mode(&parent, 0o777);
        let err = check(&cache).unwrap_err();
        assert!(
            matches!(&err, TrustError::Writable { path, .. } if *path == parent),
            "{err}"
        );
        assert!(err.to_string().contains("on the way to"), "{err}");
        // Sticky (like /tmp, which every test here passes through): others cannot rename or
        // remove what is not theirs.
        set_mode(&parent, 0o1777);
        check(&cache).unwrap();
        set_mode(&parent, 0o755);
        chown(&parent, Some(NOBODY), None).unwrap();
        let err = ensure(&cache.join("images")).unwrap_err();
        assert!(
            matches!(&err, TrustError::ForeignOwner { path, .. } if *path == parent),
            "{err}"
        );
        assert!(!cache.join("images").exists(), "nothing created");
    }

    #[test]
    fn symbolic_links_on_the_way_are_resolved_and_their_targets_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        fs::create_dir(&real).unwrap();
        let link = tmp.path().join("link");
        symlink("real", &link).unwrap();
        ensure(&link.join("cache")).unwrap();
        assert_eq!(mode(&real.join("cache")), 0o700);
        // A link into a directory someone else owns leads nowhere trusted.
        let foreign = tmp.path().join("foreign");
        fs::create_dir(&foreign).unwrap();
        chown(&foreign, Some(NOBODY), None).unwrap();
        let trap = tmp.path().join("trap");
        symlink(&foreign, &trap).unwrap();
        let err = ensure(&trap.join("cache")).unwrap_err();
        assert!(
            matches!(&err, TrustError::ForeignOwner { path, .. } if *path == foreign),
            "{err}"
        );
        assert!(fs::read_dir(&foreign).unwrap().next().is_none());
        // A file in the way.
        fs::write(tmp.path().join("file"), b"").unwrap();
        assert!(matches!(
            ensure(&tmp.path().join("file/cache")).unwrap_err(),
            TrustError::NotADirectory { .. }
        ));
    }
}
