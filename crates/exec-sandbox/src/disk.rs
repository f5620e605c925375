//! Small file-system helpers shared by the on-disk caches (guest images, memory snapshots,
//! package layers): directory handles that never follow a symbolic link, hashing, lock files,
//! sizes on disk, and leftovers of interrupted work.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;
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

/// A directory of a cache, open. Files in it are reached by name relative to this handle
/// (`openat`) and never through a symbolic link (`O_NOFOLLOW`), so a link planted in the cache
/// cannot send a read or a write anywhere else. Names are single path components.
#[derive(Debug)]
pub(crate) struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

impl Dir {
    /// Opens the directory at `path`: a cache directory [`crate::trust`] checked (so a link on
    /// the way to it is one a trusted user made), or a directory this process created.
    pub(crate) fn open(path: &Path) -> io::Result<Self> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let fd = rustix::fs::open(path, flags, Mode::empty())?;
        Ok(Self {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// Its path, for messages and for programs that take paths.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The path of `name` in it.
    pub(crate) fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The subdirectory `name`; a symbolic link there is refused.
    pub(crate) fn open_dir(&self, name: &str) -> io::Result<Self> {
        let fd = self.open_at(name, OFlags::RDONLY | OFlags::DIRECTORY, 0)?;
        Ok(Self {
            fd,
            path: self.join(name),
        })
    }

    /// The subdirectory `name`, created private (0700) if missing.
    pub(crate) fn create_dir(&self, name: &str) -> io::Result<Self> {
        check_name(name)?;
        match rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(crate::trust::DIR_MODE)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        self.open_dir(name)
    }

    /// Opens the regular file `name` for reading.
    pub(crate) fn open_file(&self, name: &str) -> io::Result<File> {
        let file = File::from(self.open_at(name, OFlags::RDONLY, 0)?);
        if !file.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a regular file",
            ));
        }
        Ok(file)
    }

    /// Opens the existing regular file `name` for reading and writing.
    pub(crate) fn open_read_write(&self, name: &str) -> io::Result<File> {
        let file = File::from(self.open_at(name, OFlags::RDWR, 0)?);
        if !file.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a regular file",
            ));
        }
        Ok(file)
    }

    /// Creates the file `name`, which must not exist yet (not even as a link), with exactly
    /// `mode` whatever the umask; open for writing.
    pub(crate) fn create_new(&self, name: &str, mode: u32) -> io::Result<File> {
        let fd = self.open_at(name, OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL, mode)?;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))?;
        Ok(File::from(fd))
    }

    /// Opens (creating it, mode 0600) the lock file `name` for `flock`. Read access suffices
    /// for flock, so a cache prepared by root still locks for another user.
    pub(crate) fn open_lock(&self, name: &str) -> io::Result<File> {
        match self.open_at(name, OFlags::RDWR | OFlags::CREATE, 0o600) {
            Ok(fd) => Ok(File::from(fd)),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EROFS)) => {
                Ok(File::from(self.open_at(name, OFlags::RDONLY, 0)?))
            }
            Err(e) => Err(e),
        }
    }

    /// Takes the `flock` of the lock file `name` (created when missing): waits for it when
    /// `wait`, else `None` while another holder has it. The lock is taken only on the file the
    /// name still names once it is held: a holder may remove the file ([`Dir::remove_lock`]),
    /// and a lock on a removed file would exclude nobody who opens the name afresh.
    pub(crate) fn lock(&self, name: &str, wait: bool) -> io::Result<Option<File>> {
        loop {
            let file = self.open_lock(name)?;
            if !crate::sys::flock_exclusive(&file, wait)? {
                return Ok(None);
            }
            let held = rustix::fs::fstat(&file)?;
            match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(named) if (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino) => {
                    return Ok(Some(file));
                }
                Ok(_) | Err(Errno::NOENT) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Removes the lock file `name`, whose lock `held` is (from [`Dir::lock`], so the name
    /// is that file's until the lock is released): lock files of finished work do not pile up.
    pub(crate) fn remove_lock(&self, name: &str, held: File) -> io::Result<()> {
        let removed = self.remove_file(name);
        drop(held);
        removed
    }

    /// The contents of the regular file `name`: at most `max` bytes, more is an error.
    pub(crate) fn read(&self, name: &str, max: u64) -> io::Result<Vec<u8>> {
        let mut bytes = Vec::new();
        self.open_file(name)?
            .take(max.saturating_add(1))
            .read_to_end(&mut bytes)?;
        if bytes.len() as u64 > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("larger than {max} bytes"),
            ));
        }
        Ok(bytes)
    }

    /// Replaces `name` with `bytes` (mode `mode`; synced first when `durable`): written under a
    /// fresh temporary name, then renamed over it, so readers see the old or the new file and
    /// a link at `name` is replaced, never written through.
    pub(crate) fn replace(
        &self,
        name: &str,
        bytes: &[u8],
        mode: u32,
        durable: bool,
    ) -> io::Result<()> {
        let temp = temp_name(name);
        let result = (|| {
            let mut file = self.create_new(&temp, mode)?;
            file.write_all(bytes)?;
            if durable {
                file.sync_all()?;
            }
            self.rename(&temp, self, name)
        })();
        if result.is_err() {
            let _ = self.remove_file(&temp);
        }
        result
    }

    /// Renames `from` to `to` in `target` (never following a link at either name).
    pub(crate) fn rename(&self, from: &str, target: &Dir, to: &str) -> io::Result<()> {
        check_name(from)?;
        check_name(to)?;
        Ok(rustix::fs::renameat(&self.fd, from, &target.fd, to)?)
    }

    /// Hard-links `from` (a link itself if it is one: never followed) as `to` in `target`.
    pub(crate) fn hard_link(&self, from: &str, target: &Dir, to: &str) -> io::Result<()> {
        check_name(from)?;
        check_name(to)?;
        Ok(rustix::fs::linkat(
            &self.fd,
            from,
            &target.fd,
            to,
            AtFlags::empty(),
        )?)
    }

    /// Removes the file (or link) `name`.
    pub(crate) fn remove_file(&self, name: &str) -> io::Result<()> {
        check_name(name)?;
        Ok(rustix::fs::unlinkat(&self.fd, name, AtFlags::empty())?)
    }

    fn open_at(&self, name: &str, flags: OFlags, mode: u32) -> io::Result<OwnedFd> {
        check_name(name)?;
        let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        rustix::fs::openat(&self.fd, name, flags, Mode::from_raw_mode(mode)).map_err(|e| {
            if e == Errno::LOOP {
                io::Error::other(NOT_FOLLOWED)
            } else {
                e.into()
            }
        })
    }
}

/// What an open of a symbolic link in a cache fails with.
pub(crate) const NOT_FOLLOWED: &str =
    "it is a symbolic link, and links in a cache are never followed";

/// Names handed to [`Dir`] are single components chosen by this library.
fn check_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("`{name}` is not a file name"),
        ));
    }
    Ok(())
}

/// A name for a file being written next to `name`: hidden, unique to this process and call, so
/// concurrent writers never share one and leftovers are recognisable (`.<name>.tmp-<pid>-<n>`).
pub(crate) fn temp_name(name: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(".{name}.tmp-{}-{n}", std::process::id())
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

/// What a directory outside a cache holds, to prove a test's attack changed nothing there.
#[cfg(test)]
pub(crate) struct Untouched {
    dir: PathBuf,
    before: Vec<(std::ffi::OsString, Vec<u8>, std::time::SystemTime, u32)>,
}

#[cfg(test)]
impl Untouched {
    /// Records every file of `dir`: name, contents, mtime and mode.
    pub(crate) fn record(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            before: Self::list(dir),
        }
    }

    fn list(dir: &Path) -> Vec<(std::ffi::OsString, Vec<u8>, std::time::SystemTime, u32)> {
        let mut files: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let meta = fs::symlink_metadata(e.path()).unwrap();
                let bytes = if meta.is_file() {
                    fs::read(e.path()).unwrap()
                } else {
                    Vec::new()
                };
                (e.file_name(), bytes, meta.modified().unwrap(), meta.mode())
            })
            .collect();
        files.sort();
        files
    }

    /// Panics unless `dir` holds exactly what it held, unchanged.
    pub(crate) fn assert_untouched(&self) {
        assert!(
            Self::list(&self.dir) == self.before,
            "{} changed",
            self.dir.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn links_in_a_cache_are_never_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("precious");
        fs::write(&target, b"keep me").unwrap();
        let untouched = Untouched::record(outside.path());
        let dir = Dir::open(tmp.path()).unwrap();
        for name in ["link", "another-link"] {
            symlink(&target, tmp.path().join(name)).unwrap();
        }
        symlink(outside.path(), tmp.path().join("dir-link")).unwrap();
        let refused = |e: io::Error| e.to_string();
        assert!(refused(dir.open_file("link").unwrap_err()).contains("symbolic link"));
        assert!(refused(dir.open_lock("link").unwrap_err()).contains("symbolic link"));
        assert!(dir.read("link", 100).is_err());
        assert!(dir.create_new("link", 0o600).is_err());
        assert!(dir.open_dir("dir-link").is_err());
        assert!(dir.create_dir("dir-link").is_err());
        // Replacing a link replaces the link itself.
        dir.replace("link", b"new", 0o600, true).unwrap();
        assert_eq!(fs::read(tmp.path().join("link")).unwrap(), b"new");
        // A hard link of a link is a link, not the file it points to.
        dir.hard_link("another-link", &dir, "again").unwrap();
        assert!(
            fs::symlink_metadata(tmp.path().join("again"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert!(
            dir.open_file("../x").is_err(),
            "names are single components"
        );
        untouched.assert_untouched();
    }

    #[test]
    fn new_files_and_directories_get_exact_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        let mode = |name: &str| fs::metadata(tmp.path().join(name)).unwrap().mode() & 0o7777;
        dir.create_new("a", 0o600).unwrap();
        dir.create_new("b", 0o444).unwrap();
        dir.create_dir("d").unwrap();
        dir.open_lock("l").unwrap();
        dir.replace("r", b"x", 0o644, false).unwrap();
        assert_eq!(
            [mode("a"), mode("b"), mode("d"), mode("l"), mode("r")],
            [0o600, 0o444, 0o700, 0o600, 0o644]
        );
        assert!(
            dir.create_new("a", 0o600).is_err(),
            "never over an existing file"
        );
        assert_eq!(dir.read("r", 1).unwrap(), b"x");
        assert!(dir.read("r", 0).is_err(), "bounded");
    }

    #[test]
    fn a_lock_is_taken_on_the_file_its_name_names_even_when_a_holder_removes_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        let first = dir.lock("k.lock", false).unwrap().expect("free");
        assert!(dir.lock("k.lock", false).unwrap().is_none(), "held");
        let (opened, opened_rx) = std::sync::mpsc::channel();
        let path = tmp.path().to_path_buf();
        let waiter = std::thread::spawn(move || {
            let dir = Dir::open(&path).unwrap();
            opened.send(()).unwrap();
            // Opens the file the first holder is about to remove and waits on its lock.
            dir.lock("k.lock", true).unwrap().expect("waited for")
        });
        opened_rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        dir.remove_lock("k.lock", first).unwrap();
        let second = waiter.join().unwrap();
        let named = fs::symlink_metadata(tmp.path().join("k.lock")).expect("created afresh");
        let held = second.metadata().unwrap();
        assert_eq!(
            (named.dev(), named.ino()),
            (held.dev(), held.ino()),
            "the waiter holds the file the name names, not the removed one"
        );
        assert!(
            dir.lock("k.lock", false).unwrap().is_none(),
            "and excludes a newcomer"
        );
    }

    #[test]
    fn sizes_hashes_locks_and_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, vec![1u8; 10_000]).unwrap();
        assert!(allocated_bytes(dir.path()) >= 10_000);
        assert_eq!(sha256_reader(&b"abc"[..]).unwrap().1, 3);
        let lock = Dir::open(dir.path()).unwrap().open_lock("k.lock").unwrap();
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
