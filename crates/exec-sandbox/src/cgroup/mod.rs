//! A cgroup per VM: QEMU's memory (swap off), task count and CPU quota are limited, and its CPU
//! time, memory peak and throttling are measured, on cgroup v2 where it serves the controllers
//! and on v1 otherwise (each controller where it is).
//!
//! Layout, per hierarchy: `<base>/exec-sandbox/<pid>/<vm-name>`. `<base>` is this process's own
//! cgroup on v1; on v2 it is the parent of ours (a non-root v2 cgroup holding processes, as
//! ours does, cannot hand controllers to children), or the root when we are in it. `<pid>` is
//! the [`Parent`] of this process's VMs: made when the first scheduler starts and removed when
//! the last one and its VMs are gone. Each VM gets a [`VmCgroup`] before QEMU starts; QEMU
//! writes itself into it between fork and exec (through [`VmCgroup::join_fds`]), and the
//! directories are removed once QEMU is reaped.
//!
//! A process killed with `kill -9` cannot clean up: its QEMU dies with it (parent-death
//! signal), and its empty directories are swept when the next scheduler starts on the host
//! ([`sweep`]: every `exec-sandbox/<pid>` whose process is gone).
//!
//! Everything is found from `/proc/self/mountinfo` and `/proc/self/cgroup`, never from fixed
//! paths, and file operations go through [`CgroupFs`] so the logic is tested on a fake tree.
//! Where no cgroup can be made (no controller, no permission, read-only), VMs run without one
//! and [`CgroupStatus`] says why.

pub(crate) mod fs;
mod guardian;
pub(crate) mod mountinfo;
#[cfg(test)]
mod tests;

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

pub(crate) use self::fs::{CgroupFs, RealFs};
use self::mountinfo::{cgroup_mounts, is_mount_root, memberships, own_dir};
use crate::admission::Cost;
use crate::limits;
pub(crate) use crate::result::CgroupVersion;
use crate::vm::accel::Accelerator;

/// The directory under each base that holds one directory per process.
pub(crate) const DIR_NAME: &str = "exec-sandbox";
/// Period of the CPU quota (`cpu.max`, `cpu.cfs_period_us`): the kernel's default.
pub(crate) const CPU_PERIOD_US: u64 = 100_000;
const MIB: u64 = 1024 * 1024;

/// A controller a VM's cgroup uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Controller {
    /// Memory limit (swap off) and peak.
    Memory,
    /// CPU quota and throttling (and CPU time on v2).
    Cpu,
    /// CPU time on v1 (its own controller there).
    CpuAcct,
    /// Task limit.
    Pids,
}

impl Controller {
    fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Cpu => "cpu",
            Controller::CpuAcct => "cpuacct",
            Controller::Pids => "pids",
        }
    }
}

/// The controllers whose limits every VM should get.
const LIMITING: [Controller; 3] = [Controller::Memory, Controller::Cpu, Controller::Pids];

/// One hierarchy the VMs' cgroups are made in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hierarchy {
    /// The unified (v2) hierarchy, else a v1 one.
    pub v2: bool,
    /// The cgroup `exec-sandbox/` is made in.
    pub base: PathBuf,
    /// What we use it for.
    pub controllers: Vec<Controller>,
    /// A v1 hierarchy that also carries `cpuset`: new cgroups copy their parent's CPUs and
    /// memory nodes, or no task could join them.
    pub cpuset: bool,
}

/// Where VM cgroups go on this host, and what is missing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Where they are made (at least one).
    pub hierarchies: Vec<Hierarchy>,
    /// Limiting controllers no usable hierarchy serves, and why.
    pub gaps: Vec<String>,
}

impl Layout {
    /// Which version holds the limits.
    fn version(&self) -> CgroupVersion {
        let v2 = self.hierarchies.iter().any(|h| h.v2);
        let v1 = self.hierarchies.iter().any(|h| !h.v2);
        match (v1, v2) {
            (true, true) => CgroupVersion::Mixed,
            (false, _) => CgroupVersion::V2,
            (true, false) => CgroupVersion::V1,
        }
    }

    fn gaps_text(&self) -> Option<String> {
        (!self.gaps.is_empty()).then(|| self.gaps.join("; "))
    }
}

/// Decides where VM cgroups go, from mountinfo text, `/proc/self/cgroup` text and the cgroup
/// files themselves: the unified hierarchy for the controllers its `cgroup.controllers` (at
/// the base) offers, v1 hierarchies for the others. `Err` says why no cgroup can be made.
pub(crate) fn detect(
    mountinfo: &str,
    self_cgroup: &str,
    fs: &dyn CgroupFs,
) -> Result<Layout, String> {
    let mounts = cgroup_mounts(mountinfo);
    let ours = memberships(self_cgroup);
    let mut layout = Layout::default();
    // Limiting controllers that are mounted but unusable (their reason is already a gap).
    let mut blocked: Vec<Controller> = Vec::new();
    let gap = |layout: &mut Layout, text: String| {
        if !layout.gaps.contains(&text) {
            layout.gaps.push(text);
        }
    };
    let usable = |read_only: bool, base: &Path| -> Result<(), String> {
        if read_only {
            return Err(format!("{} is mounted read-only", base.display()));
        }
        fs.may_write(base)
            .map_err(|e| format!("cannot create cgroups in {}: {e}", base.display()))
    };

    if let Some(mount) = mounts.iter().find(|m| m.v2) {
        match own_dir(mount, &ours) {
            None => gap(
                &mut layout,
                format!("this process's cgroup is outside {}", mount.point.display()),
            ),
            Some(dir) => {
                let base = if is_mount_root(mount, &dir) {
                    dir
                } else {
                    dir.parent().map_or(dir.clone(), Path::to_path_buf)
                };
                let offered = fs
                    .read(&base.join("cgroup.controllers"))
                    .unwrap_or_default();
                let controllers: Vec<Controller> = LIMITING
                    .into_iter()
                    .filter(|c| offered.split_whitespace().any(|o| o == c.name()))
                    .collect();
                if !controllers.is_empty() {
                    match usable(mount.read_only, &base) {
                        Ok(()) => layout.hierarchies.push(Hierarchy {
                            v2: true,
                            base,
                            controllers,
                            cpuset: false,
                        }),
                        Err(reason) => {
                            blocked.extend(controllers);
                            gap(&mut layout, reason);
                        }
                    }
                }
            }
        }
    }

    let served_by_v2 = |layout: &Layout, c: Controller| {
        layout.hierarchies.iter().any(|h| {
            h.v2 && (h.controllers.contains(&c)
                || c == Controller::CpuAcct && h.controllers.contains(&Controller::Cpu))
        })
    };
    for controller in [
        Controller::Memory,
        Controller::Cpu,
        Controller::CpuAcct,
        Controller::Pids,
    ] {
        if served_by_v2(&layout, controller) {
            continue;
        }
        let Some(mount) = mounts
            .iter()
            .find(|m| !m.v2 && m.controllers.iter().any(|c| c == controller.name()))
        else {
            continue;
        };
        let Some(base) = own_dir(mount, &ours) else {
            blocked.push(controller);
            gap(
                &mut layout,
                format!("this process's cgroup is outside {}", mount.point.display()),
            );
            continue;
        };
        // Co-mounted controllers (`cpu,cpuacct`) share one hierarchy.
        if let Some(h) = layout
            .hierarchies
            .iter_mut()
            .find(|h| !h.v2 && h.base == base)
        {
            h.controllers.push(controller);
            continue;
        }
        match usable(mount.read_only, &base) {
            Ok(()) => layout.hierarchies.push(Hierarchy {
                v2: false,
                base,
                controllers: vec![controller],
                cpuset: mount.controllers.iter().any(|c| c == "cpuset"),
            }),
            Err(reason) => {
                blocked.push(controller);
                gap(&mut layout, reason);
            }
        }
    }

    for controller in LIMITING {
        let served = layout
            .hierarchies
            .iter()
            .any(|h| h.controllers.contains(&controller));
        if !served && !blocked.contains(&controller) {
            gap(&mut layout, format!("no {} controller", controller.name()));
        }
    }
    if layout.hierarchies.is_empty() {
        if mounts.is_empty() {
            return Err("no cgroup filesystem is mounted".into());
        }
        return Err(layout.gaps.join("; "));
    }
    Ok(layout)
}

/// A cgroup operation failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CgroupError {
    /// A directory could not be made.
    #[error("cannot create cgroup {}", path.display())]
    Create {
        /// The cgroup.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Controllers could not be handed to children (v2 `cgroup.subtree_control`).
    #[error("cannot enable {controllers} for the children of {}", path.display())]
    Enable {
        /// The cgroup.
        path: PathBuf,
        /// What was asked for.
        controllers: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A limit could not be set.
    #[error("cannot write {value} to {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// Whether a VM's QEMU runs in a cgroup of its own, and why not (or what it lacks).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CgroupStatus {
    /// QEMU runs in its own cgroup with the limits its hierarchies allow.
    pub active: bool,
    /// Which version holds its limits, when active.
    pub version: Option<CgroupVersion>,
    /// Why there is no cgroup, or which limits are missing.
    pub reason: Option<String>,
}

impl CgroupStatus {
    /// No cgroup, because of `reason`.
    pub(crate) fn inactive(reason: impl Into<String>) -> Self {
        CgroupStatus {
            active: false,
            version: None,
            reason: Some(reason.into()),
        }
    }
}

/// The limits of one VM's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// `memory.max` / `memory.limit_in_bytes` (swap is held at zero).
    pub memory_bytes: u64,
    /// `pids.max`: QEMU's threads count as tasks.
    pub pids: u32,
    /// CPU time per [`CPU_PERIOD_US`], or none.
    pub cpu_quota_us: Option<u64>,
    /// Its weight against the other VMs when the cores are contended.
    pub cpu_share: CpuShare,
}

/// A VM's weight against the other VMs of the process when the host's cores are contended
/// (`cpu.shares` on v1, `cpu.weight` on v2); no limit while cores are idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CpuShare {
    /// A VM a caller waits for: the kernel's default weight.
    Run,
    /// Work nobody waits for yet (a warm-pool refill, a template build): an eighth of that, so
    /// that it takes the cores runs leave idle and no more. A warm run overlapped the refill its
    /// take started, which competed with it for the same two cores (`docs/measurements.md`).
    Background,
}

impl CpuShare {
    /// The file and value that set it.
    fn setting(self, v2: bool) -> (&'static str, &'static str) {
        match (v2, self) {
            (false, CpuShare::Run) => ("cpu.shares", "1024"),
            (false, CpuShare::Background) => ("cpu.shares", "128"),
            (true, CpuShare::Run) => ("cpu.weight", "100"),
            (true, CpuShare::Background) => ("cpu.weight", "12"),
        }
    }
}

impl Limits {
    /// The limits of a VM with `memory_mb` of guest RAM and `vcpus` under `accelerator`: the
    /// memory admission charges it ([`Cost::vm`]) plus
    /// [`VM_CGROUP_MEMORY_HEADROOM_MB`](limits::VM_CGROUP_MEMORY_HEADROOM_MB), and
    /// `cpu_quota_percent` of one core per vCPU (0: no quota).
    pub(crate) fn for_vm(
        memory_mb: u32,
        vcpus: u32,
        accelerator: Accelerator,
        cpu_quota_percent: u32,
        cpu_share: CpuShare,
    ) -> Limits {
        let charged = Cost::vm(memory_mb, vcpus, accelerator).memory_mb;
        Limits {
            memory_bytes: (charged + limits::VM_CGROUP_MEMORY_HEADROOM_MB) * MIB,
            pids: limits::VM_PIDS_MAX,
            cpu_quota_us: (cpu_quota_percent > 0).then(|| {
                CPU_PERIOD_US * u64::from(cpu_quota_percent) * u64::from(vcpus.max(1)) / 100
            }),
            cpu_share,
        }
    }
}

/// What the kernel measured of a VM's cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    /// CPU time of every task (v2 `cpu.stat usage_usec`, v1 `cpuacct.usage`).
    pub cpu_time_ms: Option<u64>,
    /// Highest memory charged (v2 `memory.peak`, v1 `memory.max_usage_in_bytes`): anonymous
    /// memory, page tables and the page cache QEMU brought in. `None` where the kernel keeps
    /// no peak (v2 before Linux 5.19).
    pub memory_peak_mb: Option<u64>,
    /// Periods in which the quota stopped the tasks (`cpu.stat nr_throttled`).
    pub cpu_nr_throttled: Option<u64>,
}

/// This process's cgroup in each hierarchy of the layout: `<base>/exec-sandbox/<pid>`. The
/// parent of every VM cgroup of the process; removed when dropped (the last scheduler and VM
/// of the process gone).
pub(crate) struct Parent {
    fs: Arc<dyn CgroupFs>,
    layout: Layout,
    pid: u32,
    /// Removes the directories if this process dies without dropping the parent (real
    /// cgroups of this process only; `None` where it could not start, or in tests on fakes).
    guardian: Option<guardian::Guardian>,
}

impl Parent {
    /// Makes (or takes over) the directories of process `pid` in every hierarchy of `layout`.
    /// Existing ones are a dead namesake's (pids are reused): their VM cgroups are removed.
    pub(crate) fn create(
        fs: Arc<dyn CgroupFs>,
        layout: Layout,
        pid: u32,
    ) -> Result<Parent, CgroupError> {
        let parent = Parent {
            fs,
            layout,
            pid,
            guardian: None,
        };
        for h in &parent.layout.hierarchies {
            let dir = parent.dir(h);
            if parent.fs.exists(&dir) {
                for stale in parent.fs.subdirs(&dir).unwrap_or_default() {
                    let _ = parent.fs.remove_dir(&dir.join(stale));
                }
            }
            parent.ensure(h)?;
        }
        Ok(parent)
    }

    /// Starts the guardian that removes this parent's directories should this process die
    /// without dropping it; a guardian that cannot start is logged (the next scheduler's
    /// sweep still removes them).
    fn guard(&mut self) {
        let dirs = self
            .layout
            .hierarchies
            .iter()
            .map(|h| self.dir(h))
            .collect();
        let temp = std::env::temp_dir().join(temp_dir_prefix(self.pid));
        match guardian::Guardian::spawn(dirs, temp) {
            Ok(guardian) => self.guardian = Some(guardian),
            Err(e) => tracing::warn!("cannot start the cgroup guardian: {e}"),
        }
    }

    /// `<base>/exec-sandbox/<pid>` in `h`.
    fn dir(&self, h: &Hierarchy) -> PathBuf {
        h.base.join(DIR_NAME).join(self.pid.to_string())
    }

    /// Makes the path to this process's directory in `h`, handing the controllers down on v2.
    /// Idempotent: also repairs a directory removed behind our back.
    fn ensure(&self, h: &Hierarchy) -> Result<(), CgroupError> {
        let top = h.base.join(DIR_NAME);
        let dir = self.dir(h);
        if h.v2 {
            enable(&*self.fs, &h.base, &h.controllers)?;
        }
        for cgroup in [&top, &dir] {
            match make_cgroup(&*self.fs, h, cgroup) {
                Err(CgroupError::Create { source, .. })
                    if source.kind() == io::ErrorKind::AlreadyExists => {}
                other => other?,
            }
            if h.v2 {
                enable(&*self.fs, cgroup, &h.controllers)?;
            }
        }
        Ok(())
    }

    /// A cgroup named `name` in every hierarchy, with `limits` set.
    pub(crate) fn vm(
        self: &Arc<Self>,
        name: &str,
        limits: &Limits,
    ) -> Result<VmCgroup, CgroupError> {
        let name = dir_name(name);
        let mut vm = VmCgroup {
            parent: self.clone(),
            dirs: Vec::new(),
            swap_unaccounted: false,
        };
        for h in &self.layout.hierarchies {
            let path = self.dir(h).join(&name);
            match make_cgroup(&*self.fs, h, &path) {
                Ok(()) => {}
                Err(CgroupError::Create { source, .. }) => match source.kind() {
                    // Our directory was swept (by a process that took us for dead): remake it.
                    io::ErrorKind::NotFound => {
                        self.ensure(h)?;
                        make_cgroup(&*self.fs, h, &path)?;
                    }
                    // A dead namesake's leftover (names are unique within a process).
                    io::ErrorKind::AlreadyExists => {
                        let _ = self.fs.remove_dir(&path);
                        make_cgroup(&*self.fs, h, &path)?;
                    }
                    _ => return Err(CgroupError::Create { path, source }),
                },
                Err(other) => return Err(other),
            }
            vm.dirs.push(VmDir {
                path: path.clone(),
                v2: h.v2,
                controllers: h.controllers.clone(),
            });
            vm.swap_unaccounted |= !set_limits(&*self.fs, h, &path, limits)?;
        }
        Ok(vm)
    }

    /// What VMs made under this parent report.
    fn status(&self) -> CgroupStatus {
        CgroupStatus {
            active: true,
            version: Some(self.layout.version()),
            reason: self.layout.gaps_text(),
        }
    }
}

impl Drop for Parent {
    fn drop(&mut self) {
        // A scheduler started while this one was being dropped has made its own parent, in
        // the same directories: they are its now.
        let slot = PARENT.lock().unwrap_or_else(PoisonError::into_inner);
        if slot
            .upgrade()
            .is_some_and(|live| live.pid == self.pid && live.layout == self.layout)
        {
            return;
        }
        // Removed here: the guardian must not act on them (nor on a newer parent's).
        drop(self.guardian.take());
        for h in &self.layout.hierarchies {
            let dir = self.dir(h);
            if !remove_tree(&*self.fs, &dir) {
                tracing::debug!(cgroup = %dir.display(), "cannot remove the process's cgroup");
            }
            // Shared with other processes: stays while they use it.
            let _ = self.fs.remove_dir(&h.base.join(DIR_NAME));
        }
    }
}

/// The name prefix of process `pid`'s per-VM temporary directories (control sockets, the jail's
/// root): its guardian removes them too should the process die unannounced.
pub(crate) fn temp_dir_prefix(pid: u32) -> String {
    format!("sbx-vm-{pid}-")
}

/// A cgroup name for VM `name`: anything but `[A-Za-z0-9._-]` becomes `_`.
fn dir_name(name: &str) -> String {
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() || name.starts_with('.') {
        format!("vm{name}")
    } else {
        name
    }
}

/// Makes cgroup `path` in `h`; on a v1 hierarchy with `cpuset`, gives it its parent's CPUs
/// and memory nodes.
fn make_cgroup(fs: &dyn CgroupFs, h: &Hierarchy, path: &Path) -> Result<(), CgroupError> {
    let created = fs.create_dir(path).map_err(|source| CgroupError::Create {
        path: path.to_path_buf(),
        source,
    });
    if h.cpuset
        && let Some(parent) = path.parent()
    {
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let mine = fs.read(&path.join(file)).unwrap_or_default();
            if mine.trim().is_empty()
                && let Ok(theirs) = fs.read(&parent.join(file))
            {
                write(fs, &path.join(file), theirs.trim())?;
            }
        }
    }
    created
}

/// Hands `controllers` to the children of v2 cgroup `path` (`cgroup.subtree_control`), unless
/// it already does.
fn enable(fs: &dyn CgroupFs, path: &Path, controllers: &[Controller]) -> Result<(), CgroupError> {
    let file = path.join("cgroup.subtree_control");
    let enabled = fs.read(&file).unwrap_or_default();
    let missing: Vec<String> = controllers
        .iter()
        .filter(|c| !enabled.split_whitespace().any(|e| e == c.name()))
        .map(|c| format!("+{}", c.name()))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let value = missing.join(" ");
    fs.write(&file, &value)
        .map_err(|source| CgroupError::Enable {
            path: path.to_path_buf(),
            controllers: value,
            source,
        })
}

fn write(fs: &dyn CgroupFs, path: &Path, value: &str) -> Result<(), CgroupError> {
    fs.write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

/// Writes `value` to `file` in `dir` if the kernel offers that file (swap accounting, for
/// one, is a boot option); whether it did.
fn write_if_offered(
    fs: &dyn CgroupFs,
    dir: &Path,
    file: &str,
    value: &str,
) -> Result<bool, CgroupError> {
    let path = dir.join(file);
    if !fs.exists(&path) {
        return Ok(false);
    }
    write(fs, &path, value)?;
    Ok(true)
}

/// Sets `limits` on the VM cgroup `dir` of hierarchy `h`; false when it holds memory but the
/// kernel accounts no swap there (then only `memory.swappiness=0` keeps QEMU out of swap on
/// v1, and nothing on v2).
fn set_limits(
    fs: &dyn CgroupFs,
    h: &Hierarchy,
    dir: &Path,
    limits: &Limits,
) -> Result<bool, CgroupError> {
    let memory = limits.memory_bytes.to_string();
    let mut swap_held = true;
    for controller in &h.controllers {
        match (controller, h.v2) {
            (Controller::Memory, true) => {
                write(fs, &dir.join("memory.max"), &memory)?;
                swap_held = write_if_offered(fs, dir, "memory.swap.max", "0")?;
            }
            (Controller::Memory, false) => {
                write(fs, &dir.join("memory.limit_in_bytes"), &memory)?;
                // Memory + swap held at the memory limit: nothing can be swapped out.
                swap_held = write_if_offered(fs, dir, "memory.memsw.limit_in_bytes", &memory)?;
                write_if_offered(fs, dir, "memory.swappiness", "0")?;
            }
            (Controller::Cpu, true) => {
                let quota = limits
                    .cpu_quota_us
                    .map_or_else(|| "max".to_string(), |q| q.to_string());
                write(
                    fs,
                    &dir.join("cpu.max"),
                    &format!("{quota} {CPU_PERIOD_US}"),
                )?;
                set_share(fs, dir, true, limits.cpu_share)?;
            }
            (Controller::Cpu, false) => {
                write(
                    fs,
                    &dir.join("cpu.cfs_period_us"),
                    &CPU_PERIOD_US.to_string(),
                )?;
                let quota = limits.cpu_quota_us.map_or(-1, |q| q as i64);
                write(fs, &dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
                set_share(fs, dir, false, limits.cpu_share)?;
            }
            (Controller::Pids, _) => write(fs, &dir.join("pids.max"), &limits.pids.to_string())?,
            (Controller::CpuAcct, _) => {}
        }
    }
    Ok(swap_held)
}

/// Sets a new VM cgroup's [`CpuShare`]: written only when it is not the default it starts with.
fn set_share(fs: &dyn CgroupFs, dir: &Path, v2: bool, share: CpuShare) -> Result<(), CgroupError> {
    if share == CpuShare::Run {
        return Ok(());
    }
    let (file, value) = share.setting(v2);
    write(fs, &dir.join(file), value)
}

/// One directory of a VM's cgroup.
struct VmDir {
    path: PathBuf,
    v2: bool,
    controllers: Vec<Controller>,
}

/// The file a single-threaded child writes `0` into to join a cgroup: `cgroup.procs` on v2; on
/// v1, `tasks`. Both move the (single-threaded) child, but a v1 `cgroup.procs` write moves a
/// whole thread group and takes the kernel's global threadgroup lock for writing, which waits
/// for an RCU grace period once the lock has been idle: 10-20 ms of every VM start here,
/// against none for the calling thread moving itself through `tasks`
/// (`cgroup_procs_write_start`: no lock for pid 0 of a single-thread write).
fn join_file(v2: bool) -> &'static str {
    if v2 { "cgroup.procs" } else { "tasks" }
}

/// The cgroup of one VM, in every hierarchy; removed when dropped (at once when QEMU is gone,
/// else by a helper thread as soon as its tasks have drained).
pub(crate) struct VmCgroup {
    parent: Arc<Parent>,
    dirs: Vec<VmDir>,
    /// The kernel accounts no swap in its memory cgroup: swap could not be held at zero.
    swap_unaccounted: bool,
}

impl VmCgroup {
    /// Open files, one per hierarchy, for QEMU's child process to write `"0\n"` into between
    /// fork and exec (so it runs in the cgroup from its first instruction). The files are
    /// opened here, with our credentials: a child that dropped its privileges can still join.
    pub(crate) fn join_fds(&self) -> io::Result<Vec<OwnedFd>> {
        self.dirs
            .iter()
            .map(|d| self.parent.fs.open_procs(&d.path.join(join_file(d.v2))))
            .collect()
    }

    /// Changes the VM's [`CpuShare`] (a pooled VM taken for a run).
    pub(crate) fn set_cpu_share(&self, share: CpuShare) -> Result<(), CgroupError> {
        for dir in &self.dirs {
            if dir.controllers.contains(&Controller::Cpu) {
                let (file, value) = share.setting(dir.v2);
                write(&*self.parent.fs, &dir.path.join(file), value)?;
            }
        }
        Ok(())
    }

    /// What the kernel measured so far (all of it, once QEMU is reaped).
    pub(crate) fn usage(&self) -> Usage {
        let fs = &*self.parent.fs;
        let mut usage = Usage::default();
        for dir in &self.dirs {
            let read = |file: &str| fs.read(&dir.path.join(file)).ok();
            for controller in &dir.controllers {
                match (controller, dir.v2) {
                    (Controller::Cpu, v2) => {
                        if let Some(stat) = read("cpu.stat") {
                            usage.cpu_nr_throttled = stat_field(&stat, "nr_throttled");
                            if v2 {
                                usage.cpu_time_ms =
                                    stat_field(&stat, "usage_usec").map(|us| us / 1000);
                            }
                        }
                    }
                    (Controller::CpuAcct, _) => {
                        usage.cpu_time_ms = read("cpuacct.usage")
                            .and_then(|ns| ns.trim().parse::<u64>().ok())
                            .map(|ns| ns / 1_000_000);
                    }
                    (Controller::Memory, v2) => {
                        let file = if v2 {
                            "memory.peak"
                        } else {
                            "memory.max_usage_in_bytes"
                        };
                        usage.memory_peak_mb = read(file)
                            .and_then(|bytes| bytes.trim().parse::<u64>().ok())
                            .map(|bytes| bytes.div_ceil(MIB));
                    }
                    (Controller::Pids, _) => {}
                }
            }
        }
        usage
    }

    /// Active, with the version and what is missing.
    pub(crate) fn status(&self) -> CgroupStatus {
        let mut status = self.parent.status();
        if self.swap_unaccounted {
            let note = "no swap accounting: swap is not held at zero (memory.swappiness=0 on v1)";
            status.reason = Some(match status.reason {
                Some(reason) => format!("{reason}; {note}"),
                None => note.to_string(),
            });
        }
        status
    }

    /// The VM's cgroup directories.
    #[cfg(test)]
    pub(crate) fn dirs(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.path.clone()).collect()
    }
}

/// `name value` of a `cpu.stat`-like file.
fn stat_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(' ')?;
        (key == name).then(|| value.trim().parse().ok()).flatten()
    })
}

impl Drop for VmCgroup {
    fn drop(&mut self) {
        let fs = &*self.parent.fs;
        let busy: Vec<PathBuf> = self
            .dirs
            .drain(..)
            .map(|d| d.path)
            .filter(|path| !removed(fs.remove_dir(path)))
            .collect();
        if busy.is_empty() {
            return;
        }
        // QEMU is still exiting (a VM dropped without being destroyed): wait for its tasks to
        // drain off the caller's thread. The parent lives until then.
        let parent = self.parent.clone();
        let spawned = std::thread::Builder::new()
            .name("sbx-cgroup-rm".into())
            .spawn(move || remove_when_empty(&*parent.fs, busy, REMOVE_PATIENCE));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a thread to remove a VM's cgroup");
        }
    }
}

/// How long a busy VM cgroup's removal is retried.
const REMOVE_PATIENCE: Duration = Duration::from_secs(10);

/// A removal that left nothing behind.
fn removed(result: io::Result<()>) -> bool {
    match result {
        Ok(()) => true,
        Err(e) => e.kind() == io::ErrorKind::NotFound,
    }
}

/// Retries removing `dirs` (backing off from 5 ms to 200 ms) until they are gone or `patience`
/// has passed; returns what is left.
fn remove_when_empty(
    fs: &dyn CgroupFs,
    mut dirs: Vec<PathBuf>,
    patience: Duration,
) -> Vec<PathBuf> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(5);
    while !dirs.is_empty() && started.elapsed() < patience {
        std::thread::sleep(delay);
        dirs.retain(|d| !removed(fs.remove_dir(d)));
        delay = (delay * 2).min(Duration::from_millis(200));
    }
    for dir in &dirs {
        tracing::warn!(cgroup = %dir.display(), "a VM's cgroup still has tasks; left for the next sweep");
    }
    dirs
}

/// Removes `dir` and its child cgroups (one level: VM cgroups); true when it is gone.
fn remove_tree(fs: &dyn CgroupFs, dir: &Path) -> bool {
    for child in fs.subdirs(dir).unwrap_or_default() {
        let _ = fs.remove_dir(&dir.join(child));
    }
    removed(fs.remove_dir(dir))
}

/// Removes what dead processes left in `layout` (`exec-sandbox/<pid>` whose process is gone,
/// with their VM cgroups); returns how many process directories went. Directories of live
/// processes, ours and anything not named by a pid are left alone; a cgroup that still holds
/// tasks cannot be removed (the kernel refuses), so a live VM is never disturbed.
pub(crate) fn sweep(fs: &dyn CgroupFs, layout: &Layout, own_pid: u32) -> usize {
    let mut swept = 0;
    for h in &layout.hierarchies {
        let top = h.base.join(DIR_NAME);
        for entry in fs.subdirs(&top).unwrap_or_default() {
            let Some(pid) = entry
                .bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| entry.parse::<u32>().ok())
                .flatten()
            else {
                continue;
            };
            if pid == own_pid || fs.process_alive(pid) {
                continue;
            }
            if remove_tree(fs, &top.join(&entry)) {
                tracing::debug!(cgroup = %top.join(&entry).display(), "swept the cgroup of a dead process");
                swept += 1;
            }
        }
    }
    swept
}

/// This host's layout, detected once per process.
fn host_layout() -> &'static Result<Layout, String> {
    static LAYOUT: OnceLock<Result<Layout, String>> = OnceLock::new();
    LAYOUT.get_or_init(|| {
        let read = |path: &str| {
            std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))
        };
        let layout = detect(&read("/proc/self/mountinfo")?, &read("/proc/self/cgroup")?, &RealFs);
        match &layout {
            Ok(layout) => tracing::debug!(version = %layout.version(), hierarchies = ?layout.hierarchies, gaps = ?layout.gaps, "cgroups"),
            Err(reason) => tracing::debug!(%reason, "no cgroups for VMs"),
        }
        layout
    })
}

/// This process's live [`Parent`], if any.
static PARENT: Mutex<Weak<Parent>> = Mutex::new(Weak::new());

/// This process's [`Parent`]: the live one, or a new one.
fn parent() -> Result<Arc<Parent>, String> {
    let layout = host_layout().as_ref().map_err(Clone::clone)?;
    let mut slot = PARENT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(parent) = slot.upgrade() {
        return Ok(parent);
    }
    let mut parent = Parent::create(Arc::new(RealFs), layout.clone(), std::process::id())
        .map_err(|e| crate::vm::error_chain(&e))?;
    parent.guard();
    let parent = Arc::new(parent);
    *slot = Arc::downgrade(&parent);
    Ok(parent)
}

/// Called when a scheduler starts: sweeps what dead processes left, and returns this
/// process's parent cgroup for the scheduler to hold (so it outlives single runs).
pub(crate) fn scheduler_started() -> Result<Arc<Parent>, String> {
    if let Ok(layout) = host_layout() {
        sweep(&RealFs, layout, std::process::id());
    }
    parent()
}

/// A cgroup for the VM `name` with `limits`, ready to be joined; or why it has none.
pub(crate) fn for_vm(name: &str, limits: &Limits) -> Result<VmCgroup, CgroupStatus> {
    let parent = parent().map_err(CgroupStatus::inactive)?;
    parent.vm(name, limits).map_err(|e| {
        let reason = crate::vm::error_chain(&e);
        tracing::debug!(vm = %name, %reason, "VM runs without a cgroup");
        CgroupStatus::inactive(reason)
    })
}

/// Where this process's cgroup for VM `name` is (or would be), one path per hierarchy.
#[cfg(any(test, feature = "testing"))]
pub(crate) fn vm_dirs(name: &str) -> Vec<PathBuf> {
    process_dirs(std::process::id())
        .into_iter()
        .map(|d| d.join(dir_name(name)))
        .collect()
}

/// Where the cgroup of process `pid` is (or would be), one path per hierarchy.
#[cfg(any(test, feature = "testing"))]
pub(crate) fn process_dirs(pid: u32) -> Vec<PathBuf> {
    match host_layout() {
        Ok(layout) => layout
            .hierarchies
            .iter()
            .map(|h| h.base.join(DIR_NAME).join(pid.to_string()))
            .collect(),
        Err(_) => Vec::new(),
    }
}
