//! Helpers for the crate's own integration tests (feature `testing`): what a test needs to see
//! of the host that the public API does not show. Not a stable interface.

/// The pid of the QEMU process started with `-name <name>`, found through `/proc`.
pub fn qemu_pid(name: &str) -> Option<u32> {
    crate::vm::procfs::qemu_pid(name)
}

/// The QEMU processes (of any parent) whose VMs process `pid` named (`sbx-<pid>-N`), found
/// through `/proc`.
pub fn qemus_of_process(pid: u32) -> Vec<u32> {
    let marker = format!("sbx-{pid}-");
    crate::vm::procfs::named_pids(|name| name.starts_with(&marker))
}

/// The processes (of any parent) started with `-name <name>`, found through `/proc`.
pub fn processes_named(name: &str) -> Vec<u32> {
    crate::vm::procfs::named_pids(|n| n == name)
}

/// Proportional set size of process `pid` in MB.
pub fn pss_mb(pid: u32) -> Option<f64> {
    crate::vm::procfs::pss_mb(pid)
}

/// Where the cgroup of this process's VM `name` is (or would be) on this host, one directory
/// per hierarchy (empty where VMs get no cgroup).
pub fn vm_cgroup_dirs(name: &str) -> Vec<std::path::PathBuf> {
    crate::cgroup::vm_dirs(name)
}

/// Where the cgroup directory of process `pid` (the parent of its VMs' cgroups) is (or would
/// be) on this host, one per hierarchy.
pub fn process_cgroup_dirs(pid: u32) -> Vec<std::path::PathBuf> {
    crate::cgroup::process_dirs(pid)
}

/// A result with every field set, as a cold Python run printing `42` with one forwarded port
/// would return it (for tests of what front ends print).
pub fn sample_result() -> crate::ExecutionResult {
    use crate::{Accelerator, AcceleratorChoice, ExposedPort, PortProtocol, Timing};
    crate::ExecutionResult {
        stdout: "42\n".into(),
        stderr: String::new(),
        exit_code: 0,
        timed_out: false,
        stdout_truncated: false,
        stderr_truncated: false,
        execution_time_ms: Some(12),
        external_cpu_time_ms: Some(900),
        external_memory_peak_mb: Some(140),
        external_cpu_nr_throttled: Some(3),
        timing: Timing {
            setup_ms: 3,
            admission_wait_ms: 1,
            boot_ms: 700,
            vm_start_ms: 650,
            guest_ready_ms: 50,
            execute_ms: 40,
            interpreter_start_ms: 20,
            teardown_ms: 2,
            total_ms: 745,
        },
        accelerator: AcceleratorChoice {
            accelerator: Accelerator::Tcg,
            reason: "KVM opens but the probe boot hung".into(),
        },
        warm_pool_hit: false,
        l1_cache_hit: false,
        exposed_ports: vec![ExposedPort::new(8000, 41234, PortProtocol::Tcp)],
        network_refusals: Vec::new(),
        packages_source: crate::PackageSource::None,
        packages_install_ms: None,
        isolation: crate::Isolation {
            cgroup: true,
            cgroup_version: Some(crate::CgroupVersion::V1),
            namespaces: ["mount", "pid", "ipc", "uts", "net"]
                .map(String::from)
                .to_vec(),
            unprivileged: true,
            reason: None,
        },
    }
}

/// The loopback package index (PEP 503 simple index and npm registry) with test-built wheels
/// and tarballs, for tests that install packages without a real registry.
pub use crate::packages::testing::{PackageIndex, tool_env};
