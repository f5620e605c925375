//! PID-1 duties before serving: early mounts, switching to the root disk, hardening.
//!
//! The initramfs holds only this binary (`/init`) and `/dev/console`. With a root disk
//! (`/dev/vda`, read-only EROFS) the agent mounts it with writable tmpfs on `/tmp`,
//! `/home/user` and `/run`, moves `/dev` and `/sys` into it, mounts a fresh `/proc` with
//! `hidepid=2`, and switches root; then it mounts the package layer when the command line
//! announces one (`layer.rs`). Without a root disk (the host's accelerator probe) it serves from
//! the initramfs and says so in its hello.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::io::Errno;
use rustix::mount::{MountFlags, UnmountFlags};

use crate::config::{self, BootParams, RUN_TMPFS_MB, SANDBOX_GID, SANDBOX_UID, env_vars, paths};
use crate::layer::{self, Disks, LayerState};
use crate::log;
use crate::sys;

/// A step of the boot sequence failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {}", path.display())]
pub struct InitError {
    action: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

fn step(action: &'static str, path: &Path, result: io::Result<()>) -> Result<(), InitError> {
    result.map_err(|source| InitError {
        action,
        path: path.to_path_buf(),
        source,
    })
}

/// What the boot sequence achieved.
#[derive(Debug, Clone)]
pub struct Booted {
    /// The root disk is mounted and we switched to it.
    pub root_mounted: bool,
    /// Where driver files go.
    pub run_dir: PathBuf,
    /// The package layer.
    pub packages: LayerState,
    /// When each step finished, on the guest's clock.
    pub timeline: sbx_protocol::BootTimeline,
    /// The kernel command line says the CPU is emulated.
    pub tcg: bool,
}

const NOSUID_NODEV: MountFlags = MountFlags::NOSUID.union(MountFlags::NODEV);
const NOSUID_NODEV_NOEXEC: MountFlags = NOSUID_NODEV.union(MountFlags::NOEXEC);

/// Creates a directory with `mode`; one that exists already is fine.
pub(crate) fn mkdir(path: &Path, mode: u32) -> io::Result<()> {
    match fs::DirBuilder::new().mode(mode).create(path) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// mount(2) of a filesystem of type `fstype`; `data` is its option string.
pub(crate) fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: MountFlags,
    data: Option<&str>,
) -> io::Result<()> {
    let data = data
        .map(CString::new)
        .transpose()
        .map_err(|_| io::ErrorKind::InvalidInput)?;
    Ok(rustix::mount::mount(
        source,
        target,
        fstype,
        flags,
        data.as_deref(),
    )?)
}

/// Mounts, ignoring "already mounted" (a kernel may mount devtmpfs itself).
fn mount_fresh(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: MountFlags,
    data: Option<&str>,
) -> Result<(), InitError> {
    match mount(source, target, fstype, flags, data) {
        Err(e) if e.raw_os_error() == Some(Errno::BUSY.raw_os_error()) => Ok(()),
        other => step("mount", target, other),
    }
}

/// Runs the boot sequence. Failures after the early mounts are logged, and the agent still
/// serves (reporting `root_mounted: false` when there is no usable root).
pub fn boot() -> Result<Booted, InitError> {
    let mut timeline = sbx_protocol::BootTimeline {
        init_ms: crate::sys::uptime_ms(),
        ..Default::default()
    };
    let dev = Path::new("/dev");
    let proc = Path::new("/proc");
    let sys_dir = Path::new("/sys");
    for dir in [dev, proc, sys_dir] {
        step("create", dir, mkdir(dir, 0o755))?;
    }
    mount_fresh(
        "devtmpfs",
        dev,
        "devtmpfs",
        MountFlags::NOSUID,
        Some("mode=0755"),
    )?;
    mount_fresh("proc", proc, "proc", NOSUID_NODEV_NOEXEC, None)?;
    mount_fresh("sysfs", sys_dir, "sysfs", NOSUID_NODEV_NOEXEC, None)?;

    let params = BootParams::parse(&fs::read_to_string("/proc/cmdline").unwrap_or_default());
    let disks = Disks::find(Path::new(paths::SYS_BLOCK));
    let root_mounted = if let Some(root) = &disks.root {
        match switch_root(params, &Path::new("/dev").join(root)) {
            Ok(()) => true,
            Err(e) => {
                log::error(format_args!("{}", chain(&e)));
                false
            }
        }
    } else {
        log::info(format_args!(
            "no root disk: serving from the initramfs (probe boot)"
        ));
        false
    };
    timeline.root_ms = crate::sys::uptime_ms();
    let packages = match (params.packages, root_mounted) {
        (false, _) => LayerState::Absent,
        (true, false) => LayerState::Failed("no root filesystem".into()),
        (true, true) => {
            let python = config::path_from_env(env_vars::PYTHON, paths::PYTHON);
            layer::mount_layer(&disks, &python)
        }
    };
    if let LayerState::Failed(reason) = &packages {
        log::error(format_args!("package layer: {reason}"));
    }
    if root_mounted {
        crate::memory::setup();
    }
    harden();
    if let Err(e) = sys::loopback_up() {
        log::warn(format_args!("cannot bring up lo: {e}"));
    }
    crate::network::configure();
    let run_dir = if root_mounted {
        PathBuf::from(paths::RUN_DIR)
    } else {
        // Only root can write in devtmpfs: a safe place without a root disk.
        PathBuf::from("/dev/.sbx-run")
    };
    timeline.configured_ms = crate::sys::uptime_ms();
    Ok(Booted {
        root_mounted,
        run_dir,
        packages,
        timeline,
        tcg: params.tcg,
    })
}

fn switch_root(params: BootParams, root_disk: &Path) -> Result<(), InitError> {
    let new_root = Path::new(paths::NEW_ROOT);
    step("create", new_root, mkdir(new_root, 0o755))?;
    step(
        "mount the root disk on",
        new_root,
        mount(
            &root_disk.to_string_lossy(),
            new_root,
            "erofs",
            MountFlags::RDONLY | NOSUID_NODEV,
            None,
        ),
    )?;

    let tmp = new_root.join("tmp");
    let tmp_opts = format!("mode=1777,size={}m", params.tmp_mb);
    mount_fresh("tmpfs", &tmp, "tmpfs", NOSUID_NODEV, Some(&tmp_opts))?;
    let home = new_root.join(paths::HOME.trim_start_matches('/'));
    let home_opts = format!(
        "mode=0755,uid={SANDBOX_UID},gid={SANDBOX_GID},size={}m",
        params.home_mb
    );
    mount_fresh("tmpfs", &home, "tmpfs", NOSUID_NODEV, Some(&home_opts))?;
    let run = new_root.join("run");
    let run_opts = format!("mode=0755,size={RUN_TMPFS_MB}m");
    if let Err(e) = mount_fresh("tmpfs", &run, "tmpfs", NOSUID_NODEV_NOEXEC, Some(&run_opts)) {
        log::warn(format_args!(
            "{} (the image needs an empty /run)",
            chain(&e)
        ));
    }

    // Keep the kernel's devtmpfs and sysfs; /proc is remounted with hidepid so the sandbox
    // user sees only its own processes.
    for name in ["dev", "sys"] {
        let from = Path::new("/").join(name);
        let to = new_root.join(name);
        step(
            "move",
            &from,
            rustix::mount::mount_move(&from, &to).map_err(io::Error::from),
        )?;
    }
    let new_proc = new_root.join("proc");
    mount_fresh(
        "proc",
        &new_proc,
        "proc",
        NOSUID_NODEV_NOEXEC,
        Some("hidepid=2"),
    )?;
    if let Err(e) = rustix::mount::unmount("/proc", UnmountFlags::DETACH) {
        log::warn(format_args!("cannot unmount the initramfs /proc: {e}"));
    }
    // The initramfs copy of this binary is not needed any more; free its memory.
    let _ = fs::remove_file("/init");

    step("enter", new_root, std::env::set_current_dir(new_root))?;
    step(
        "move",
        new_root,
        rustix::mount::mount_move(".", "/").map_err(io::Error::from),
    )?;
    step(
        "chroot into",
        new_root,
        rustix::process::chroot(".").map_err(io::Error::from),
    )?;
    step("enter", Path::new("/"), std::env::set_current_dir("/"))?;

    // The root disk is mounted; the sandbox has no business with its device node.
    let _ = fs::remove_file(root_disk);
    dev_extras();
    Ok(())
}

/// /dev/pts and the /dev/fd links that shells use for process substitution (`/dev/shm` is
/// `memory.rs`'s).
fn dev_extras() {
    let pts = Path::new("/dev/pts");
    let results = [
        mkdir(pts, 0o755).map_err(|e| format!("mkdir /dev/pts: {e}")),
        mount(
            "devpts",
            pts,
            "devpts",
            MountFlags::NOSUID | MountFlags::NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        )
        .map_err(|e| format!("mount /dev/pts: {e}")),
    ];
    for result in results {
        if let Err(e) = result {
            log::warn(format_args!("{e}"));
        }
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        match std::os::unix::fs::symlink(target, link) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                log::warn(format_args!("cannot link {link}: {e}"));
            }
            _ => {}
        }
    }
}

/// Sysctls that narrow what the sandbox user can learn or do (and one that widens it: any user
/// may listen on ports below 1024, so a sandboxed server can take port 80). Missing ones
/// (features not in the kernel) are skipped silently.
const SYSCTLS: &[(&str, &str)] = &[
    ("kernel/kptr_restrict", "2"),
    ("kernel/dmesg_restrict", "1"),
    ("kernel/perf_event_paranoid", "3"),
    ("kernel/unprivileged_bpf_disabled", "1"),
    ("kernel/sysrq", "0"),
    ("kernel/hostname", "sandbox"),
    ("vm/unprivileged_userfaultfd", "0"),
    ("user/max_user_namespaces", "0"),
    ("fs/protected_symlinks", "1"),
    ("fs/protected_hardlinks", "1"),
    ("fs/protected_fifos", "2"),
    ("fs/protected_regular", "2"),
    ("fs/suid_dumpable", "0"),
    ("net/ipv4/ip_unprivileged_port_start", "0"),
];

/// The agent's nice value: programs that hog the (single) vCPU, fork bombs included, leave it
/// enough CPU to enforce timeouts and answer the host. Interpreters go back to 0.
pub const AGENT_NICE: i32 = -10;

fn harden() {
    if let Err(e) = rustix::process::setpriority_process(None, AGENT_NICE) {
        log::warn(format_args!("cannot raise the agent's priority: {e}"));
    }
    for (key, value) in SYSCTLS {
        let path = Path::new("/proc/sys").join(key);
        match fs::write(&path, value) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => log::warn(format_args!("cannot set {key}={value}: {e}")),
        }
    }
}

/// Writes the Bun driver into `run_dir` (root-owned, read-only for everyone else).
pub fn install_drivers(run_dir: &Path) -> io::Result<()> {
    fs::create_dir_all(run_dir)?;
    fs::set_permissions(run_dir, fs::Permissions::from_mode(0o755))?;
    let path = crate::driver::bun_driver_path(run_dir);
    let _ = fs::remove_file(&path);
    fs::write(&path, crate::driver::BUN)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o444))
}

/// An error and its causes on one line.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
