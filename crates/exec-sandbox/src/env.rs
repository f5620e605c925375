//! Environment variables read by the library: the one place their names are spelled.

/// Names of environment variables that configure exec-sandbox.
pub struct EnvVars;

impl EnvVars {
    /// Overrides [`SchedulerConfig::max_concurrent_vms`](crate::SchedulerConfig::max_concurrent_vms).
    pub const MAX_CONCURRENT_VMS: &'static str = "EXEC_SANDBOX_MAX_CONCURRENT_VMS";
    /// Directory holding built or downloaded guest images (default: the cache directory).
    pub const IMAGES_DIR: &'static str = "EXEC_SANDBOX_IMAGES_DIR";
    /// Cache root (default `$XDG_CACHE_HOME/exec-sandbox` or `~/.cache/exec-sandbox`; see
    /// [`SchedulerConfig::cache_dir`](crate::SchedulerConfig::cache_dir)).
    pub const CACHE_DIR: &'static str = "EXEC_SANDBOX_CACHE_DIR";
    /// `1` forbids building or downloading assets: missing assets fail fast.
    pub const OFFLINE: &'static str = "EXEC_SANDBOX_OFFLINE";
    /// Asset version directory to use (default: derived from the build inputs).
    pub const ASSET_VERSION: &'static str = "EXEC_SANDBOX_ASSET_VERSION";
    /// `1` forces software emulation (TCG) even where KVM works.
    pub const FORCE_EMULATION: &'static str = "EXEC_SANDBOX_FORCE_EMULATION";
    /// Base URL of prebuilt assets (`<url>/<version>/manifest.json` and the files it lists):
    /// `https://`, or `http://` to a loopback host.
    pub const ASSET_BASE_URL: &'static str = "EXEC_SANDBOX_ASSET_BASE_URL";
    /// SHA-256 the downloaded `manifest.json` must have; see
    /// [`SchedulerConfig::asset_manifest_sha256`](crate::SchedulerConfig::asset_manifest_sha256).
    pub const ASSET_MANIFEST_SHA256: &'static str = "EXEC_SANDBOX_ASSET_MANIFEST_SHA256";
    /// Path of the `qemu-system-x86_64` binary (default: found on `PATH`).
    pub const QEMU: &'static str = "EXEC_SANDBOX_QEMU";
    /// The user QEMU runs as when the library runs as root (default `sbx-qemu`, created when
    /// missing).
    pub const QEMU_USER: &'static str = "EXEC_SANDBOX_QEMU_USER";
    /// Overrides [`SchedulerConfig::default_memory_mb`](crate::SchedulerConfig::default_memory_mb).
    pub const DEFAULT_MEMORY_MB: &'static str = "EXEC_SANDBOX_DEFAULT_MEMORY_MB";
    /// Overrides [`SchedulerConfig::default_timeout_seconds`](crate::SchedulerConfig::default_timeout_seconds).
    pub const DEFAULT_TIMEOUT_SECONDS: &'static str = "EXEC_SANDBOX_DEFAULT_TIMEOUT_SECONDS";
    /// Overrides [`SchedulerConfig::warm_pool_size`](crate::SchedulerConfig::warm_pool_size).
    pub const WARM_POOL_SIZE: &'static str = "EXEC_SANDBOX_WARM_POOL_SIZE";
    /// Overrides [`SchedulerConfig::admission_timeout_seconds`](crate::SchedulerConfig::admission_timeout_seconds).
    pub const ADMISSION_TIMEOUT_SECONDS: &'static str = "EXEC_SANDBOX_ADMISSION_TIMEOUT_SECONDS";
    /// Overrides [`SchedulerConfig::memory_budget_mb`](crate::SchedulerConfig::memory_budget_mb).
    pub const MEMORY_BUDGET_MB: &'static str = "EXEC_SANDBOX_MEMORY_BUDGET_MB";
    /// Overrides [`SchedulerConfig::host_memory_reserve_mb`](crate::SchedulerConfig::host_memory_reserve_mb).
    pub const HOST_MEMORY_RESERVE_MB: &'static str = "EXEC_SANDBOX_HOST_MEMORY_RESERVE_MB";
    /// Overrides [`SchedulerConfig::memory_overcommit_ratio`](crate::SchedulerConfig::memory_overcommit_ratio).
    pub const MEMORY_OVERCOMMIT_RATIO: &'static str = "EXEC_SANDBOX_MEMORY_OVERCOMMIT_RATIO";
    /// Overrides [`SchedulerConfig::cpu_overcommit_ratio`](crate::SchedulerConfig::cpu_overcommit_ratio).
    pub const CPU_OVERCOMMIT_RATIO: &'static str = "EXEC_SANDBOX_CPU_OVERCOMMIT_RATIO";
    /// Overrides [`SchedulerConfig::min_available_memory_mb`](crate::SchedulerConfig::min_available_memory_mb).
    pub const MIN_AVAILABLE_MEMORY_MB: &'static str = "EXEC_SANDBOX_MIN_AVAILABLE_MEMORY_MB";
    /// Overrides [`SchedulerConfig::max_memory_pressure`](crate::SchedulerConfig::max_memory_pressure).
    pub const MAX_MEMORY_PRESSURE: &'static str = "EXEC_SANDBOX_MAX_MEMORY_PRESSURE";
    /// Overrides [`SchedulerConfig::vm_cpu_quota_percent`](crate::SchedulerConfig::vm_cpu_quota_percent).
    pub const VM_CPU_QUOTA_PERCENT: &'static str = "EXEC_SANDBOX_VM_CPU_QUOTA_PERCENT";
    /// `0` switches L1 memory snapshots off ([`SchedulerConfig::l1_snapshots`](crate::SchedulerConfig::l1_snapshots)).
    pub const L1_SNAPSHOTS: &'static str = "EXEC_SANDBOX_L1_SNAPSHOTS";
    /// `0` switches standby clones off ([`SchedulerConfig::l1_standby`](crate::SchedulerConfig::l1_standby)).
    pub const L1_STANDBY: &'static str = "EXEC_SANDBOX_L1_STANDBY";
    /// Overrides [`SchedulerConfig::snapshot_cache_dir`](crate::SchedulerConfig::snapshot_cache_dir).
    pub const SNAPSHOT_CACHE_DIR: &'static str = "EXEC_SANDBOX_SNAPSHOT_CACHE_DIR";
    /// Overrides [`SchedulerConfig::snapshot_cache_max_mb`](crate::SchedulerConfig::snapshot_cache_max_mb).
    pub const SNAPSHOT_CACHE_MAX_MB: &'static str = "EXEC_SANDBOX_SNAPSHOT_CACHE_MAX_MB";
    /// Overrides [`SchedulerConfig::package_cache_dir`](crate::SchedulerConfig::package_cache_dir).
    pub const PACKAGE_CACHE_DIR: &'static str = "EXEC_SANDBOX_PACKAGE_CACHE_DIR";
    /// Overrides [`SchedulerConfig::package_cache_max_mb`](crate::SchedulerConfig::package_cache_max_mb).
    pub const PACKAGE_CACHE_MAX_MB: &'static str = "EXEC_SANDBOX_PACKAGE_CACHE_MAX_MB";
    /// `0` lets packages outside the bundled top-10,000 lists through; see
    /// [`SchedulerConfig::enable_package_validation`](crate::SchedulerConfig::enable_package_validation).
    pub const PACKAGE_VALIDATION: &'static str = "EXEC_SANDBOX_PACKAGE_VALIDATION";
    /// Let guests reach the host's internal addresses (`1`/`true`); see
    /// [`SchedulerConfig::network_allow_internal`](crate::SchedulerConfig::network_allow_internal).
    pub const NETWORK_ALLOW_INTERNAL: &'static str = "EXEC_SANDBOX_NETWORK_ALLOW_INTERNAL";
    /// `name=ipv4,...` answered by the gateway's DNS; see
    /// [`SchedulerConfig::network_hosts`](crate::SchedulerConfig::network_hosts).
    pub const NETWORK_HOSTS: &'static str = "EXEC_SANDBOX_NETWORK_HOSTS";
    /// Path of a PEM bundle networked guests trust too; see
    /// [`SchedulerConfig::guest_ca_bundle`](crate::SchedulerConfig::guest_ca_bundle).
    pub const GUEST_CA_BUNDLE: &'static str = "EXEC_SANDBOX_GUEST_CA_BUNDLE";
    /// S3 bucket of the shared package-layer cache (L3); unset = off. See
    /// [`SchedulerConfig::s3_bucket`](crate::SchedulerConfig::s3_bucket).
    pub const S3_BUCKET: &'static str = "EXEC_SANDBOX_S3_BUCKET";
    /// Overrides [`SchedulerConfig::s3_region`](crate::SchedulerConfig::s3_region).
    pub const S3_REGION: &'static str = "EXEC_SANDBOX_S3_REGION";
    /// Overrides [`SchedulerConfig::s3_prefix`](crate::SchedulerConfig::s3_prefix) (`/` for the
    /// bucket's root).
    pub const S3_PREFIX: &'static str = "EXEC_SANDBOX_S3_PREFIX";
    /// URL of an S3-compatible store; see
    /// [`SchedulerConfig::s3_endpoint_url`](crate::SchedulerConfig::s3_endpoint_url).
    pub const S3_ENDPOINT_URL: &'static str = "EXEC_SANDBOX_S3_ENDPOINT_URL";
}

/// True for the values that switch a flag variable on (`1`, `true`, `yes`, `on`).
pub(crate) fn is_truthy(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}
