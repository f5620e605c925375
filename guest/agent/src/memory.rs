//! The guest's memory: compressed swap, the memory guard, and the caps on shared memory.
//!
//! - **Swap** on zram (lz4): pages the programs do not touch are compressed instead of
//!   pushing the VM into an out-of-memory state. The device node is removed once swap is on,
//!   so the sandbox cannot read or rewrite swapped pages through it.
//! - **The guard**: every interpreter (and so every process of the sandbox user) runs in a
//!   group of its own below the cgroup v2 group `/sys/fs/cgroup/sandbox`, whose `memory.max`
//!   leaves the agent and the kernel a reserve. When the programs need more, the kernel kills
//!   the whole group (`memory.oom.group`): the execution ends with 137 and the agent, outside
//!   the group (and PID 1, which the kernel never picks), keeps serving. `pids.max` bounds
//!   process counts. An interpreter's own group ends everything it started in one write
//!   (`cgroup.kill`), however fast it forks: no process can leave its group.
//! - **Shared memory**: `/dev/shm` and System V segments are each capped at 1/16 of memory, so
//!   that the tmpfs mounts together (`/tmp` and `/home/user` a quarter each) stay within 5/8.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::mount::MountFlags;

use crate::config::SANDBOX_NPROC;
use crate::init::{mkdir, mount};
use crate::log;

/// Where the cgroup v2 hierarchy is mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The sandbox's group, below [`CGROUP_ROOT`].
const SANDBOX_GROUP: &str = "sandbox";
/// The zram device used for swap, and its sysfs directory.
const ZRAM_DEV: &str = "/dev/zram0";
const ZRAM_SYS: &str = "/sys/block/zram0";
/// Page size of the guest (x86_64).
const PAGE: usize = 4096;
const MIB: u64 = 1 << 20;

/// How the guest's memory is shared out, from `MemTotal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The sandbox group's `memory.max`, in bytes.
    pub guard_bytes: u64,
    /// The zram device's size (uncompressed bytes it can hold).
    pub swap_bytes: u64,
    /// `/dev/shm`'s size in MiB.
    pub shm_mb: u64,
    /// System V shared memory, all segments together, in bytes (`kernel.shmall`, in pages,
    /// and the largest segment `kernel.shmmax`).
    pub sysv_bytes: u64,
}

/// System V shared memory segments at most (`kernel.shmmni`).
const SYSV_SEGMENTS: u64 = 64;
/// What the agent and the kernel keep outside the guard: an eighth of memory, 24-64 MiB.
const RESERVE_MIN: u64 = 24 * MIB;
const RESERVE_MAX: u64 = 64 * MIB;

impl Budget {
    /// The budget of a guest whose `MemTotal` is `total` bytes.
    pub fn for_total(total: u64) -> Budget {
        let reserve = (total / 8).clamp(RESERVE_MIN, RESERVE_MAX);
        let sixteenth_mb = (total / 16 / MIB).max(1);
        Budget {
            guard_bytes: total.saturating_sub(reserve).max(total / 2),
            swap_bytes: total / 2 / PAGE as u64 * PAGE as u64,
            shm_mb: sixteenth_mb,
            sysv_bytes: sixteenth_mb * MIB,
        }
    }

    /// The budget of this guest, from `/proc/meminfo`.
    pub fn of_this_guest() -> io::Result<Budget> {
        let meminfo = fs::read_to_string("/proc/meminfo")?;
        let total = mem_total(&meminfo)
            .ok_or_else(|| io::Error::other("no MemTotal line in /proc/meminfo"))?;
        Ok(Budget::for_total(total))
    }

    /// The System V sysctls, `(key under /proc/sys, value)`.
    fn sysv_sysctls(&self) -> [(&'static str, String); 3] {
        [
            ("kernel/shmmax", self.sysv_bytes.to_string()),
            ("kernel/shmall", (self.sysv_bytes / PAGE as u64).to_string()),
            ("kernel/shmmni", SYSV_SEGMENTS.to_string()),
        ]
    }
}

/// `MemTotal` in bytes from `/proc/meminfo` text.
fn mem_total(meminfo: &str) -> Option<u64> {
    let rest = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    let kib: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
    kib.checked_mul(1024)
}

/// The first page of a swap area (`mkswap`'s format, version 1): the kernel reads the page
/// count at byte 1028 and the signature in the page's last ten bytes.
fn swap_header(bytes: u64) -> Vec<u8> {
    let mut page = vec![0u8; PAGE];
    let last_page = u32::try_from(bytes / PAGE as u64)
        .unwrap_or(u32::MAX)
        .saturating_sub(1);
    page[1024..1028].copy_from_slice(&1u32.to_le_bytes());
    page[1028..1032].copy_from_slice(&last_page.to_le_bytes());
    page[PAGE - 10..].copy_from_slice(b"SWAPSPACE2");
    page
}

/// How many times the kernel killed in the sandbox group, from `memory.events` text.
fn oom_kills(events: &str) -> u64 {
    events
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(key, _)| *key == "oom_kill")
        .filter_map(|(_, n)| n.trim().parse::<u64>().ok())
        .sum()
}

/// The memory guard once set up: the group's directory and `memory.events`.
pub struct Guard {
    group: PathBuf,
    /// Opened once: each execution reads it before it starts (and again after a kill), and a
    /// path lookup through the cgroup file system is ~400 translated blocks in every restored
    /// clone under TCG (`docs/measurements.md`). A read at offset 0 regenerates the text.
    events: fs::File,
    /// `memory.max`, for the note on a kill.
    pub limit_bytes: u64,
    /// The swap the group can fill (0 without swap).
    swap_bytes: u64,
}

/// How close to the limit and to a full swap counts as exhausted.
const EXHAUSTED_SLACK: u64 = 4 * MIB;
/// How often [`Guard::exhausted`] looks during an execution.
const WATCH_PERIOD: std::time::Duration = std::time::Duration::from_millis(250);

/// Whether a group using `current` bytes of memory (page cache included) and `swap` bytes of
/// swap is exhausted: at its limit with its swap full. The kernel would kill it too, but only
/// once reclaim stops finding anything, and evicting the program's own code pages and reading
/// them back can postpone that for minutes on a slow host.
fn is_exhausted(current: u64, swap: u64, limit: u64, swap_size: u64) -> bool {
    swap_size > EXHAUSTED_SLACK
        && current.saturating_add(EXHAUSTED_SLACK) >= limit
        && swap.saturating_add(EXHAUSTED_SLACK) >= swap_size
}

/// Names interpreters' groups.
static GROUPS: AtomicU64 = AtomicU64::new(0);

impl Guard {
    /// A new group below the guard's for one interpreter.
    pub fn new_group(&self) -> io::Result<Group> {
        let dir = self
            .group
            .join(format!("i{}", GROUPS.fetch_add(1, Ordering::Relaxed)));
        mkdir(&dir, 0o755)?;
        let procs = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(dir.join("cgroup.procs"));
        match procs {
            Ok(procs) => Ok(Group {
                dir,
                procs: procs.into(),
            }),
            Err(e) => {
                let _ = fs::remove_dir(&dir);
                Err(e)
            }
        }
    }

    /// Returns (only) once the sandbox is exhausted ([`is_exhausted`]), looking every 250 ms.
    pub async fn exhausted(&self) {
        let read = |name: &str| -> u64 {
            fs::read_to_string(self.group.join(name))
                .ok()
                .and_then(|text| text.trim().parse().ok())
                .unwrap_or(0)
        };
        loop {
            tokio::time::sleep(WATCH_PERIOD).await;
            let (current, swap) = (read("memory.current"), read("memory.swap.current"));
            if is_exhausted(current, swap, self.limit_bytes, self.swap_bytes) {
                return;
            }
        }
    }

    /// Kills by the guard so far (0 when unreadable).
    pub fn kills(&self) -> u64 {
        use std::os::unix::fs::FileExt;
        // `memory.events` is a few short lines: 512 bytes hold it whole.
        let mut buf = [0u8; 512];
        self.events
            .read_at(&mut buf, 0)
            .ok()
            .and_then(|n| std::str::from_utf8(&buf[..n]).ok())
            .map_or(0, oom_kills)
    }

    /// The note added to stderr when the guard killed the execution's processes.
    pub fn note(&self) -> String {
        format!(
            "\nexec-sandbox: out of memory: the sandbox's processes needed more than {} MiB and were killed (exit code 137)\n",
            self.limit_bytes / MIB
        )
    }
}

/// One interpreter's group: it and everything it starts. Removed on drop (once empty).
#[derive(Debug)]
pub struct Group {
    dir: PathBuf,
    procs: OwnedFd,
}

impl Group {
    /// The descriptor a child writes `0` to, joining the group (it is close-on-exec).
    pub fn procs_fd(&self) -> RawFd {
        self.procs.as_raw_fd()
    }

    /// SIGKILLs every process in the group at once (`cgroup.kill`).
    pub fn kill(&self) -> io::Result<()> {
        write(&self.dir.join("cgroup.kill"), "1")
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // Fails while killed processes are not reaped yet; the parent's directory is then
        // left with an empty child, which costs nothing.
        let _ = self.kill();
        let _ = fs::remove_dir(&self.dir);
    }
}

static GUARD: OnceLock<Guard> = OnceLock::new();

/// The memory guard, when [`setup`] made one (only in a VM, as PID 1).
pub fn guard() -> Option<&'static Guard> {
    GUARD.get()
}

const NOSUID_NODEV_NOEXEC: MountFlags = MountFlags::NOSUID
    .union(MountFlags::NODEV)
    .union(MountFlags::NOEXEC);

/// Sets up swap, `/dev/shm`, the System V caps and the guard. Each part that fails is logged
/// and skipped: the VM still serves, with less protection.
pub fn setup() {
    let budget = match Budget::of_this_guest() {
        Ok(budget) => budget,
        Err(e) => {
            log::warn(format_args!("memory: {e}; no swap, guard or shm caps"));
            return;
        }
    };
    let swapping = match swap_on(budget.swap_bytes) {
        Ok(()) => true,
        Err(e) => {
            log::warn(format_args!("memory: no compressed swap: {e}"));
            false
        }
    };
    if let Err(e) = mount_shm(budget.shm_mb) {
        log::warn(format_args!("memory: /dev/shm: {e}"));
    }
    for (key, value) in budget.sysv_sysctls() {
        if let Err(e) = fs::write(Path::new("/proc/sys").join(key), &value) {
            log::warn(format_args!("memory: cannot set {key}={value}: {e}"));
        }
    }
    let swap_bytes = if swapping { budget.swap_bytes } else { 0 };
    match make_guard(budget.guard_bytes, swap_bytes) {
        Ok(guard) => {
            let _ = GUARD.set(guard);
        }
        Err(e) => log::warn(format_args!("memory: no guard: {e}")),
    }
}

/// zram swap of `bytes`, then the device node goes.
fn swap_on(bytes: u64) -> io::Result<()> {
    let sys = Path::new(ZRAM_SYS);
    fs::write(sys.join("disksize"), bytes.to_string())
        .map_err(|e| io::Error::new(e.kind(), format!("{ZRAM_SYS}/disksize: {e}")))?;
    let mut device = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(ZRAM_DEV)?;
    device.write_all(&swap_header(bytes))?;
    device.sync_all()?;
    drop(device);
    let path = std::ffi::CString::new(ZRAM_DEV).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
    if unsafe { libc::swapon(path.as_ptr(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    fs::remove_file(ZRAM_DEV)
}

/// `/dev/shm`: world-writable (sticky), no devices, setuid or exec, `shm_mb` MiB.
fn mount_shm(shm_mb: u64) -> io::Result<()> {
    let shm = Path::new("/dev/shm");
    mkdir(shm, 0o1777)?;
    let options = format!("mode=1777,size={shm_mb}m");
    mount("tmpfs", shm, "tmpfs", NOSUID_NODEV_NOEXEC, Some(&options))
}

/// Mounts cgroup v2, enables the memory and pids controllers below the root, and makes the
/// sandbox group.
fn make_guard(limit_bytes: u64, swap_bytes: u64) -> io::Result<Guard> {
    let root = Path::new(CGROUP_ROOT);
    mkdir(root, 0o755)?;
    mount("cgroup2", root, "cgroup2", NOSUID_NODEV_NOEXEC, None)?;
    write(&root.join("cgroup.subtree_control"), "+memory +pids")?;
    let group = root.join(SANDBOX_GROUP);
    mkdir(&group, 0o755)?;
    write(&group.join("memory.max"), &limit_bytes.to_string())?;
    write(&group.join("memory.oom.group"), "1")?;
    write(&group.join("pids.max"), &SANDBOX_NPROC.to_string())?;
    let events = fs::File::open(group.join("memory.events"))?;
    Ok(Guard {
        events,
        group,
        limit_bytes,
        swap_bytes,
    })
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn kills_reread_the_open_events_file_from_its_start_each_time() {
        let path = std::env::temp_dir().join(format!("sbx-memory-events-{}", std::process::id()));
        fs::write(
            &path,
            "low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\noom_group_kill 1\n",
        )
        .unwrap();
        let guard = Guard {
            group: std::env::temp_dir(),
            events: fs::File::open(&path).unwrap(),
            limit_bytes: 64 * MIB,
            swap_bytes: 0,
        };
        assert_eq!(guard.kills(), 2);
        assert_eq!(guard.kills(), 2);
        fs::write(&path, "low 0\noom_kill 17\n").unwrap();
        assert_eq!(guard.kills(), 17);
        fs::remove_file(&path).unwrap();
        assert_eq!(guard.kills(), 17, "the open file outlives its name");
    }

    #[test]
    fn a_256_mib_guest_leaves_a_32_mib_reserve_and_caps_shared_memory_at_a_sixteenth() {
        let total = 240 * MIB;
        let b = Budget::for_total(total);
        assert_eq!(b.guard_bytes, total - 30 * MIB);
        assert_eq!(b.swap_bytes, 120 * MIB);
        assert_eq!(b.shm_mb, 15);
        assert_eq!(b.sysv_bytes, 15 * MIB);
        let sysctls = b.sysv_sysctls();
        assert_eq!(sysctls[0], ("kernel/shmmax", (15 * MIB).to_string()));
        assert_eq!(sysctls[1], ("kernel/shmall", (15 * MIB / 4096).to_string()));
        assert_eq!(sysctls[2], ("kernel/shmmni", "64".to_string()));
    }

    #[test]
    fn the_reserve_stays_between_24_and_64_mib() {
        assert_eq!(Budget::for_total(120 * MIB).guard_bytes, 96 * MIB);
        assert_eq!(Budget::for_total(4096 * MIB).guard_bytes, 4032 * MIB);
        // A tiny guest still gives the programs half.
        assert_eq!(Budget::for_total(32 * MIB).guard_bytes, 16 * MIB);
    }

    #[test]
    fn mem_total_is_read_in_bytes() {
        let text = "MemTotal:         245724 kB\nMemFree:          200000 kB\n";
        assert_eq!(mem_total(text), Some(245_724 * 1024));
        assert_eq!(mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(mem_total("MemTotal: lots kB\n"), None);
    }

    #[test]
    fn the_swap_header_is_mkswaps() {
        let page = swap_header(120 * MIB);
        assert_eq!(page.len(), 4096);
        assert_eq!(&page[4086..], b"SWAPSPACE2");
        assert_eq!(u32::from_le_bytes(page[1024..1028].try_into().unwrap()), 1);
        assert_eq!(
            u32::from_le_bytes(page[1028..1032].try_into().unwrap()),
            120 * 256 - 1
        );
        assert!(page[..1024].iter().all(|b| *b == 0));
    }

    #[test]
    fn exhausted_means_at_the_limit_with_swap_full() {
        let (limit, swap) = (210 * MIB, 120 * MIB);
        assert!(is_exhausted(limit, swap, limit, swap));
        assert!(is_exhausted(limit - MIB, swap - MIB, limit, swap));
        // At the limit with swap to spare: the kernel swaps, nothing to do.
        assert!(!is_exhausted(limit, 60 * MIB, limit, swap));
        // Swap full but room in memory (the program freed some): nothing to do.
        assert!(!is_exhausted(150 * MIB, swap, limit, swap));
        // Without swap the watch is off: page cache alone can sit at the limit.
        assert!(!is_exhausted(limit, 0, limit, 0));
    }

    #[test]
    fn oom_kills_come_from_the_oom_kill_line() {
        let events = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 3\noom_group_kill 1\n";
        assert_eq!(oom_kills(events), 3);
        assert_eq!(oom_kills(""), 0);
    }
}
