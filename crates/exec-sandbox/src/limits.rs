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
/// Shortest accepted session idle timeout.
pub const MIN_SESSION_IDLE_TIMEOUT_SECONDS: u64 = 10;
/// Longest accepted session idle timeout.
pub const MAX_SESSION_IDLE_TIMEOUT_SECONDS: u64 = 3600;
/// Default session idle timeout: a session with no operation for this long closes itself.
pub const DEFAULT_SESSION_IDLE_TIMEOUT_SECONDS: u64 = 300;
/// Most concurrent VMs a scheduler may be configured for.
pub const MAX_CONCURRENT_VMS: usize = 100;
/// Default concurrent VM limit.
pub const DEFAULT_MAX_CONCURRENT_VMS: usize = 10;

/// Time the host waits past the execution timeout before it stops trusting the guest and kills
/// the VM itself, under KVM. Covers the guest's SIGTERM grace period, its cleanup and the final
/// drain.
pub const HOST_TIMEOUT_GRACE: Duration = Duration::from_secs(5);
/// The same under software emulation, where the guest runs several times slower, and its
/// cleanup with it (a fork bomb's thousand processes to kill and reap on a loaded host took
/// more than 5 s).
pub const HOST_TIMEOUT_GRACE_TCG: Duration = Duration::from_secs(15);

/// [`HOST_TIMEOUT_GRACE`] or [`HOST_TIMEOUT_GRACE_TCG`], for VMs under `accelerator`.
pub fn host_timeout_grace(accelerator: crate::Accelerator) -> Duration {
    match accelerator {
        crate::Accelerator::Kvm => HOST_TIMEOUT_GRACE,
        crate::Accelerator::Tcg => HOST_TIMEOUT_GRACE_TCG,
    }
}
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

/// Most warm VMs a scheduler may keep per language.
pub const MAX_WARM_POOL_SIZE: usize = 20;
/// How often idle warm-pool VMs are pinged; a VM that does not answer is replaced.
pub const WARM_POOL_HEALTH_INTERVAL: Duration = Duration::from_secs(10);
/// Deadline for a pooled VM's ping (health check, and right before it is handed out).
pub const WARM_POOL_PING_DEADLINE: Duration = Duration::from_secs(1);
/// How long a run waits for a pooled VM that is out for its health check's ping (the only idle
/// one of its language) before it starts a VM of its own.
pub const WARM_POOL_CHECK_WAIT: Duration = Duration::from_millis(100);
/// Default time a run may wait for a slot and admission before it fails with a capacity error.
pub const DEFAULT_ADMISSION_TIMEOUT_SECONDS: u64 = 60;
/// Longest accepted admission timeout.
pub const MAX_ADMISSION_TIMEOUT_SECONDS: u64 = 3600;
/// QEMU's own resident memory per VM besides guest RAM (device model, buffers, libraries).
pub const QEMU_OVERHEAD_MB: u64 = 30;
/// What a VM's network gateway (in this process) can hold at most, charged by admission
/// control to every VM with a NIC: 128 connections' socket buffers and relay queues, the DNS
/// and forwarded-port sockets, the frame queues (`gateway::stack::MAX_BYTES`, checked against
/// this by a test).
pub const GATEWAY_MEMORY_MB: u64 = 52;
/// QEMU's translation-block cache under TCG (`-accel tcg,tb-size=`), passed to QEMU and charged
/// by admission control.
pub const TCG_TRANSLATION_CACHE_MB: u64 = 64;
/// Memory a VM's cgroup allows beyond what admission charges it ([`crate::Cost::vm`]: guest
/// memory, [`QEMU_OVERHEAD_MB`], [`TCG_TRANSLATION_CACHE_MB`]): QEMU's heap and kernel memory
/// beyond the charged figures, and the page cache of the disks and QEMU's own binaries
/// (reclaimable, but QEMU's code pages are in use: a limit without room for them thrashes). A
/// guest that fills its memory brings the cgroup to this limit and no further: the cache is
/// reclaimed and QEMU keeps running (`docs/measurements.md`, "A cgroup per VM").
pub const VM_CGROUP_MEMORY_HEADROOM_MB: u64 = 64;
/// Most tasks (processes and threads) in a VM's cgroup. QEMU runs 5 threads idle and up to
/// ~15 during boot and snapshots; its block I/O thread pool may add up to 64 under load. A
/// QEMU that cannot start a thread aborts, so the limit stays well above what it can use.
pub const VM_PIDS_MAX: u32 = 128;
/// Default CPU quota of a VM's cgroup, in percent of one core per vCPU.
pub const DEFAULT_VM_CPU_QUOTA_PERCENT: u32 = 100;
/// Smallest CPU quota a scheduler may be configured for (0 = no quota is accepted too).
pub const MIN_VM_CPU_QUOTA_PERCENT: u32 = 10;
/// Largest CPU quota a scheduler may be configured for.
pub const MAX_VM_CPU_QUOTA_PERCENT: u32 = 1000;
/// Default host memory kept out of the VM memory budget.
pub const DEFAULT_HOST_MEMORY_RESERVE_MB: u64 = 1024;
/// Default ratio of the VM memory budget to the host's memory (less its reserve). Above 1 because
/// guest RAM is only resident once the guest touches it (a cold VM's PSS is about half its size).
pub const DEFAULT_MEMORY_OVERCOMMIT_RATIO: f64 = 1.5;
/// Default ratio of admitted vCPUs to host cores. Idle and waiting VMs cost little CPU; busy ones
/// slow each other down (`docs/measurements.md`: 4 busy VMs on 2 cores take 2.5x longer each) but do not fail.
pub const DEFAULT_CPU_OVERCOMMIT_RATIO: f64 = 4.0;
/// Default floor of the host's `MemAvailable` below which no VM is admitted.
pub const DEFAULT_MIN_AVAILABLE_MEMORY_MB: u64 = 512;
/// Default memory pressure (PSI `some avg10`, percent) above which no VM is admitted.
pub const DEFAULT_MAX_MEMORY_PRESSURE: f64 = 20.0;
/// How often a queued run at the head of the queue re-reads host memory facts while they block it.
pub const ADMISSION_HOST_POLL: Duration = Duration::from_millis(250);
/// Default bound of the L1 memory snapshot cache (allocated bytes on disk), in MB. A Python
/// template at 256 MB of guest memory occupies about 45 MB.
pub const DEFAULT_SNAPSHOT_CACHE_MAX_MB: u64 = 2048;

/// Largest file written to or read from a sandbox's home directory (500 MiB; the guest agent
/// enforces the same limit).
pub const MAX_FILE_BYTES: u64 = sbx_protocol::MAX_FILE_SIZE;
/// Longest path accepted for a file in the sandbox, in bytes.
pub const MAX_GUEST_PATH_BYTES: usize = sbx_protocol::MAX_PATH_BYTES;
/// Longest path component accepted for a file in the sandbox, in bytes.
pub const MAX_GUEST_NAME_BYTES: usize = sbx_protocol::MAX_NAME_BYTES;
/// Longest a file transfer waits for the guest: for each answer, and for each chunk the guest
/// must accept. A guest slower than this is treated as broken.
pub const FILE_IO_DEADLINE: Duration = Duration::from_secs(30);

/// Longest a write to a VM's control channel may take, waiting for the writer lock included.
/// A guest that stops reading for this long is treated as broken: the channel is closed.
pub const CHANNEL_WRITE_DEADLINE: Duration = Duration::from_secs(30);
/// Most ports one VM may forward.
pub const MAX_EXPOSED_PORTS: usize = 10;
/// Lowest host port a caller may ask for (0 still means "any free port").
pub const MIN_EXTERNAL_PORT: u16 = 1024;
/// Most domains in one allowlist.
pub const MAX_ALLOWED_DOMAINS: usize = sbx_net::policy::MAX_ALLOWED_DOMAINS;
/// Longest the guest may take to install the operator's CA bundle.
pub const CA_BUNDLE_DEADLINE: Duration = Duration::from_secs(10);

/// Execution timeout of the snippet a pooled VM runs before it is handed out
/// (`execute::prime`); it takes milliseconds.
pub const PRIME_TIMEOUT_SECONDS: u64 = 10;

/// Most packages one run or session may ask for.
pub const MAX_PACKAGES: usize = 50;
/// Longest package name, in bytes (npm's own limit; PyPI names are held to it too).
pub const MAX_PACKAGE_NAME_BYTES: usize = 214;
/// Longest version part of a package spec (`==2.2.3`, `^4.17.0`), in bytes (node-semver's own
/// limit on a version or range).
pub const MAX_PACKAGE_VERSION_BYTES: usize = 256;
/// Default bound of the L2 package layer cache (allocated bytes on disk), in MB. A layer with
/// numpy and pandas takes about 60 MB.
pub const DEFAULT_PACKAGE_CACHE_MAX_MB: u64 = 4096;
/// How long the host remembers which exact version a requested range (`pandas>=2`,
/// `lodash@^4`) resolved to. Within it, a repeated run needs no index contact; after it, a
/// newer release is picked up.
pub const PACKAGE_RANGE_CACHE_TTL: Duration = Duration::from_secs(10 * 60);
/// Longest a package install (pip or npm, downloads included) or its packing may take before
/// the tool is killed and the run fails as transient.
pub const PACKAGE_INSTALL_DEADLINE: Duration = Duration::from_secs(15 * 60);
/// Longest resolving ranges (a pip dry run, `npm view`) may take.
pub const PACKAGE_RESOLVE_DEADLINE: Duration = Duration::from_secs(2 * 60);
/// Default region of the L3 package-layer store in S3.
pub const DEFAULT_S3_REGION: &str = "us-east-1";
/// Default key prefix of the L3 package-layer store: entries are `<prefix><key>/...`.
pub const DEFAULT_S3_PREFIX: &str = "exec-sandbox/layers/";
/// Longest accepted S3 key prefix, in bytes (S3 keys are at most 1024).
pub const MAX_S3_PREFIX_BYTES: usize = 512;
/// Deadline for a TCP (and TLS) connection to the S3 store.
pub const S3_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of one S3 operation whose body is small (a lookup, a manifest, one multipart part),
/// its retries included; also the longest a layer download may go without receiving a byte.
pub const S3_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Slowest transfer a whole layer download or upload is given time for: its deadline is
/// [`S3_REQUEST_TIMEOUT`] plus its size at this rate.
pub const S3_MIN_TRANSFER_BYTES_PER_SECOND: u64 = 1024 * 1024;
/// Layer uploads to S3 in flight at once; more wait their turn.
pub const S3_MAX_CONCURRENT_UPLOADS: usize = 2;
/// Part size of multipart layer uploads; a compressed layer smaller than this is one `PUT`.
/// S3 requires at least 5 MiB for every part but the last.
pub const S3_PART_BYTES: usize = 8 * 1024 * 1024;
/// Parts of one multipart layer upload in flight at once.
pub const S3_PARTS_IN_FLIGHT: usize = 2;
/// Largest package layer image taken from or sent to a remote store.
pub const MAX_REMOTE_LAYER_BYTES: u64 = 4 * 1024 * 1024 * 1024;
/// Largest layer manifest taken from a remote store.
pub const MAX_REMOTE_MANIFEST_BYTES: usize = 1024 * 1024;
