//! Every limit the sandbox enforces, in one place.

use std::time::Duration;

/// Largest accepted program text, in bytes.
pub const MAX_CODE_BYTES: usize = 1024 * 1024;
/// Bytes of stdout kept; the rest is dropped and the result says so.
pub const MAX_STDOUT_BYTES: u64 = 1_000_000;
/// Bytes of stderr kept; the rest is dropped and the result says so.
pub const MAX_STDERR_BYTES: u64 = 100_000;
/// Shortest accepted execution timeout.
pub const MIN_TIMEOUT_SECONDS: u64 = 1;
/// Longest accepted execution timeout.
pub const MAX_TIMEOUT_SECONDS: u64 = 300;
/// Default execution timeout.
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 30;
/// Smallest accepted guest memory.
pub const MIN_MEMORY_MB: u32 = 128;
/// Largest accepted guest memory.
pub const MAX_MEMORY_MB: u32 = 16 * 1024;
/// Default guest memory.
pub const DEFAULT_MEMORY_MB: u32 = 256;
/// Most environment variables per execution.
pub const MAX_ENV_VARS: usize = 100;
/// Longest environment variable name, in bytes.
pub const MAX_ENV_NAME_BYTES: usize = 256;
/// Longest environment variable value, in bytes.
pub const MAX_ENV_VALUE_BYTES: usize = 4096;
/// Fewest concurrent VMs a scheduler may be configured for.
pub const MIN_CONCURRENT_VMS: usize = 1;
/// Most concurrent VMs a scheduler may be configured for.
pub const MAX_CONCURRENT_VMS: usize = 100;
/// Default concurrent VM limit.
pub const DEFAULT_MAX_CONCURRENT_VMS: usize = 10;

/// Time the host waits past the execution timeout before it stops trusting the guest and kills
/// the VM itself. Covers the guest's SIGTERM grace period and the final drain.
pub const HOST_TIMEOUT_GRACE: Duration = Duration::from_secs(5);
/// Deadline for a VM to boot and its agent to say hello, under KVM.
pub const BOOT_DEADLINE_KVM: Duration = Duration::from_secs(10);
/// Deadline for a VM to boot and its agent to say hello, under software emulation.
pub const BOOT_DEADLINE_TCG: Duration = Duration::from_secs(30);
/// Deadline for the KVM probe boot; a working KVM boots our kernel in well under a second.
pub const KVM_PROBE_DEADLINE: Duration = Duration::from_secs(5);
/// Largest size of the `/tmp` and `/home/user` tmpfs mounts, as a share of guest memory (percent).
pub const GUEST_TMPFS_PERCENT: u32 = 25;
/// Bytes of boot log kept for error messages.
pub const BOOT_LOG_TAIL_BYTES: usize = 16 * 1024;
