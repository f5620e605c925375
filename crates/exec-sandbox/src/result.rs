//! What a run returns.

use serde::Serialize;

use crate::vm::accel::AcceleratorChoice;

/// Where the time of one run went, in milliseconds of host wall time (the guest's own figures
/// say so). The phases follow one another: `setup_ms` (which contains `admission_wait_ms`),
/// then `boot_ms` (`vm_start_ms` then `guest_ready_ms`), then `execute_ms` (which contains
/// `interpreter_start_ms`), then `teardown_ms`; `total_ms` is the whole call. A VM taken from
/// the warm pool was started before the run: its `vm_start_ms` is 0 and `guest_ready_ms` is
/// the check that it still answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Timing {
    /// Validation, package layer, asset checks and admission, before QEMU starts (or a pooled
    /// VM is taken).
    pub setup_ms: u64,
    /// The part of `setup_ms` spent waiting for a free VM slot and room in the memory and CPU
    /// budget.
    pub admission_wait_ms: u64,
    /// From starting QEMU until the guest was ready for the code: `vm_start_ms` +
    /// `guest_ready_ms`.
    pub boot_ms: u64,
    /// From executing QEMU until its guest ran: a cold boot until the guest agent said hello
    /// (kernel and agent start-up), a restore until the memory snapshot was loaded and resumed.
    pub vm_start_ms: u64,
    /// From then until the guest was ready for the code: a restored clone's reseed (fresh
    /// entropy, clock and interpreter seeds), the CA bundle of a networked VM, a pooled VM's
    /// liveness check.
    pub guest_ready_ms: u64,
    /// From dispatching the code until the result arrived.
    pub execute_ms: u64,
    /// The part of `execute_ms` the guest spent starting the interpreter (0 when it was
    /// already running, as in a restored or pooled VM).
    pub interpreter_start_ms: u64,
    /// Reading the VM's cgroup and `/proc` figures after the result arrived and handing the VM
    /// to its teardown: QEMU is killed and reaped after `run()` returns (holding the VM's
    /// share of the budget until then; [`Scheduler::shutdown`](crate::Scheduler::shutdown)
    /// waits for it).
    pub teardown_ms: u64,
    /// The whole `run()` call.
    pub total_ms: u64,
}

impl Timing {
    /// The names of the phases (the JSON keys), in the order they happen.
    pub const PHASES: [&'static str; 9] = [
        "setup_ms",
        "admission_wait_ms",
        "boot_ms",
        "vm_start_ms",
        "guest_ready_ms",
        "execute_ms",
        "interpreter_start_ms",
        "teardown_ms",
        "total_ms",
    ];
}

/// The outcome of one execution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ExecutionResult {
    /// Standard output (at most [`MAX_STDOUT_BYTES`](crate::limits::MAX_STDOUT_BYTES), invalid
    /// UTF-8 replaced).
    pub stdout: String,
    /// Standard error (at most [`MAX_STDERR_BYTES`](crate::limits::MAX_STDERR_BYTES)).
    pub stderr: String,
    /// The program's exit code; 128+N when killed by signal N; -1 when the timeout fired.
    pub exit_code: i32,
    /// The execution timeout fired (the exit code is then -1).
    pub timed_out: bool,
    /// Stdout went past its limit and the excess was dropped.
    pub stdout_truncated: bool,
    /// Stderr went past its limit and the excess was dropped.
    pub stderr_truncated: bool,
    /// Execution wall time measured inside the guest, when the guest reported it.
    pub execution_time_ms: Option<u64>,
    /// CPU time QEMU used (user + system), measured by the host: from its cgroup where it
    /// ran in one, else from `/proc`.
    pub external_cpu_time_ms: Option<u64>,
    /// QEMU's peak memory, measured by the host: the peak its cgroup was charged (its own
    /// and guest memory, page tables, the page cache it read) where it ran in one with a
    /// memory peak, else its peak resident set (`VmHWM`).
    pub external_memory_peak_mb: Option<u64>,
    /// Periods of 100 ms in which QEMU's CPU quota stopped it (its cgroup's
    /// `cpu.stat nr_throttled`); `None` without a cgroup CPU controller.
    pub external_cpu_nr_throttled: Option<u64>,
    /// Where the time went.
    pub timing: Timing,
    /// Which accelerator ran the VM and why.
    pub accelerator: AcceleratorChoice,
    /// The VM came from a warm pool (always false until the pool exists).
    pub warm_pool_hit: bool,
    /// The VM was restored from a memory snapshot (always false until snapshots exist).
    pub l1_cache_hit: bool,
    /// Ports forwarded from the host into the VM, as bound.
    pub exposed_ports: Vec<crate::network::ExposedPort>,
    /// What the network gateway refused during this execution (a DNS name outside the
    /// allowlist, a connection presenting another name, a raw IP, UDP, ...): distinct entries,
    /// at most 50 and a count of the rest. Empty without network.
    pub network_refusals: Vec<String>,
    /// Which cache level served the run's packages (`none` without packages).
    pub packages_source: crate::packages::PackageSource,
    /// How long installing the packages took, when they were built for this run.
    pub packages_install_ms: Option<u64>,
    /// Which host walls stood around the VM's QEMU process.
    pub isolation: Isolation,
}

/// The host walls around a VM's QEMU process, besides the VM itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Isolation {
    /// QEMU ran in a cgroup of its own, limited in memory (swap off), tasks and CPU.
    pub cgroup: bool,
    /// Which cgroup version held those limits, when it ran in one.
    pub cgroup_version: Option<CgroupVersion>,
    /// The namespaces QEMU got fresh (`mount`, `pid`, `ipc`, `uts`, `net`, and `user` when the
    /// library runs unprivileged); empty where the kernel allows none.
    pub namespaces: Vec<String>,
    /// QEMU ran as a non-root user, with no capabilities and no-new-privs.
    pub unprivileged: bool,
    /// Why a wall is missing or incomplete (`cgroup: ...`, `jail: ...`).
    pub reason: Option<String>,
}

/// The cgroup version a VM's limits were set on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub enum CgroupVersion {
    /// cgroup v1 hierarchies, one per controller or co-mounted.
    #[serde(rename = "v1")]
    V1,
    /// The unified cgroup v2 hierarchy.
    #[serde(rename = "v2")]
    V2,
    /// Some controllers on v2, the others on v1.
    #[serde(rename = "v1+v2")]
    Mixed,
}

impl std::fmt::Display for CgroupVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
            CgroupVersion::Mixed => "v1+v2",
        })
    }
}

impl Isolation {
    /// The walls of a VM whose cgroup is described by `cgroup` and whose jail by `jail`.
    pub(crate) fn of(
        cgroup: &crate::cgroup::CgroupStatus,
        jail: &crate::vm::jail::IsolationReport,
    ) -> Self {
        let reasons: Vec<String> = [
            cgroup.reason.as_ref().map(|r| format!("cgroup: {r}")),
            jail.reason.as_ref().map(|r| format!("jail: {r}")),
        ]
        .into_iter()
        .flatten()
        .collect();
        Isolation {
            cgroup: cgroup.active,
            cgroup_version: cgroup.version,
            namespaces: jail.namespaces.iter().map(|n| n.to_string()).collect(),
            unprivileged: jail.unprivileged,
            reason: (!reasons.is_empty()).then(|| reasons.join("; ")),
        }
    }
}

/// An idle VM of the warm pool, as the host sees it ([`Scheduler::warm_pool_vms`](crate::Scheduler::warm_pool_vms)).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct WarmVm {
    /// The interpreter it runs.
    pub language: sbx_protocol::Language,
    /// Its name (QEMU's `-name`).
    pub name: String,
    /// Its QEMU's proportional set size in MB (pages shared with other processes, such as a
    /// memory snapshot's, count in proportion), when readable.
    pub pss_mb: Option<f64>,
    /// Where that memory goes, when readable.
    pub memory: Option<MemoryUse>,
}

/// Where a VM's host memory goes: its QEMU's proportional set size (MB), split by what the
/// pages hold. The parts add up to the whole.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct MemoryUse {
    /// The guest's RAM, as far as it was touched. A restored clone's is its memory snapshot's
    /// file: the pages it only read are shared with the other clones (in proportion), the
    /// ones it wrote are its own.
    pub guest_mb: f64,
    /// Code QEMU translated for the emulated CPU (TCG's translation cache; none under KVM).
    pub translation_cache_mb: f64,
    /// QEMU's program and shared libraries (shared with the other VMs, in proportion).
    pub program_mb: f64,
    /// QEMU's own data: heap, stacks, the emulated CPU's TLB and the rest.
    pub data_mb: f64,
}

impl MemoryUse {
    /// The whole: the process's proportional set size.
    pub fn total_mb(&self) -> f64 {
        self.guest_mb + self.translation_cache_mb + self.program_mb + self.data_mb
    }
}

/// What [`Scheduler::prefetch_packages`](crate::Scheduler::prefetch_packages) readied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PreparedPackages {
    /// Which cache level served the layer.
    pub source: crate::PackageSource,
    /// How long the install took, when the layer was built now.
    pub install_ms: Option<u64>,
    /// The packages asked for, at the versions their specs resolved to.
    pub resolved: Vec<String>,
    /// Every package in the layer, dependencies included (`name==version`, `name@version`).
    pub packages: Vec<String>,
    /// Whether a memory snapshot of a VM with this layer is ready (L1).
    pub snapshot: bool,
}

/// What one local cache holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct CacheUsage {
    /// Its directory.
    pub dir: std::path::PathBuf,
    /// How many entries it holds.
    pub entries: usize,
    /// Bytes they occupy on disk.
    pub bytes: u64,
}

/// The caches a scheduler uses ([`Scheduler::caches`](crate::Scheduler::caches)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct CacheReport {
    /// L1 memory snapshots (none when L1 is off).
    pub snapshots: Option<CacheUsage>,
    /// L2 package layers.
    pub layers: CacheUsage,
    /// Each L2 layer, most recently used first.
    pub layer_entries: Vec<crate::LayerInfo>,
    /// Where L3 keeps layers (`s3://bucket/prefix`), when configured.
    pub s3: Option<String>,
    /// Guest image versions other than the one in use (older releases, other build inputs):
    /// how many, and the bytes removing them would free.
    pub unused_image_versions: CacheUsage,
    /// Builds of exec-sandbox's QEMU for other Debian QEMU versions or build scripts.
    pub unused_qemu_builds: CacheUsage,
}

/// What [`Scheduler::prune_caches`](crate::Scheduler::prune_caches) removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PruneReport {
    /// Memory snapshots removed.
    pub snapshots: usize,
    /// Package layers removed.
    pub layers: usize,
    /// Bytes the removed layers occupied.
    pub layer_bytes: u64,
    /// Unused guest image versions removed.
    pub image_versions: usize,
    /// Bytes that freed.
    pub image_bytes: u64,
    /// Unused QEMU builds removed (root only).
    pub qemu_builds: usize,
    /// Bytes that freed.
    pub qemu_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `PHASES` names every field of `Timing` as serialized, in declaration order.
    #[test]
    fn phases_are_the_serialized_fields() {
        let value = serde_json::to_value(Timing::default()).unwrap();
        let keys: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut phases = Timing::PHASES.to_vec();
        let mut sorted = keys.clone();
        phases.sort_unstable();
        sorted.sort_unstable();
        assert_eq!(phases, sorted);
    }
}
