//! The file operations the cgroup logic needs, behind a seam: [`RealFs`] on the host's cgroup
//! filesystems, and a fake tree in a temp dir in the unit tests.

use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::Path;

/// What cgroup management does to files.
pub(crate) trait CgroupFs: Send + Sync {
    /// A cgroup file's contents.
    fn read(&self, path: &Path) -> io::Result<String>;
    /// Writes `value` to an existing cgroup file (never creates one).
    fn write(&self, path: &Path, value: &str) -> io::Result<()>;
    /// Creates a cgroup (the kernel fills in its interface files).
    fn create_dir(&self, path: &Path) -> io::Result<()>;
    /// Removes an empty cgroup (`EBUSY` while it holds tasks, whatever files it shows).
    fn remove_dir(&self, path: &Path) -> io::Result<()>;
    /// Names of the child cgroups of `path`.
    fn subdirs(&self, path: &Path) -> io::Result<Vec<String>>;
    /// Whether `path` exists.
    fn exists(&self, path: &Path) -> bool;
    /// Whether this process may create entries in the directory `path` (`Err` says why not).
    fn may_write(&self, path: &Path) -> io::Result<()>;
    /// Opens a `cgroup.procs` file for a child process to write itself into.
    fn open_procs(&self, path: &Path) -> io::Result<OwnedFd>;
    /// Whether process `pid` exists (for sweeping the leftovers of dead processes).
    fn process_alive(&self, pid: u32) -> bool;
}

/// The host's cgroup filesystems.
pub(crate) struct RealFs;

impl CgroupFs for RealFs {
    fn read(&self, path: &Path) -> io::Result<String> {
        std::fs::read_to_string(path)
    }

    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        // One write(2) per value: cgroup files take one value per write.
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)?
            .write_all(value.as_bytes())
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir(path)
    }

    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir(path)
    }

    fn subdirs(&self, path: &Path) -> io::Result<Vec<String>> {
        Ok(std::fs::read_dir(path)?
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .collect())
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn may_write(&self, path: &Path) -> io::Result<()> {
        crate::sys::may_write(path)
    }

    fn open_procs(&self, path: &Path) -> io::Result<OwnedFd> {
        // std opens with O_CLOEXEC: QEMU never inherits it; the child writes before exec.
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map(OwnedFd::from)
    }

    fn process_alive(&self, pid: u32) -> bool {
        Path::new("/proc").join(pid.to_string()).exists()
    }
}
