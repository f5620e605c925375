//! Scheduler configuration: defaults, environment overrides and validation.

use std::path::PathBuf;

use crate::env::{self, EnvVars};
use crate::limits;
use crate::validate::ValidationError;

/// How a [`Scheduler`](crate::Scheduler) runs VMs.
///
/// `SchedulerConfig::default()` gives the documented defaults; [`SchedulerConfig::from_env`]
/// applies the `EXEC_SANDBOX_*` overrides listed in [`EnvVars`].
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// VMs alive at once; further runs wait for a slot (1-100, default 10).
    pub max_concurrent_vms: usize,
    /// Guest memory when a run does not ask (MB, default 256).
    pub default_memory_mb: u32,
    /// Execution timeout when a run does not ask (seconds, 1-300, default 30).
    pub default_timeout_seconds: u64,
    /// Cache root (default `$XDG_CACHE_HOME/exec-sandbox`, else `~/.cache/exec-sandbox` with
    /// the home from `HOME` or, when unset, the password database; root without a home uses
    /// `/var/cache/exec-sandbox`, anyone else must set it). It is a trust root: it and every
    /// cache directory below must be owned by the caller or root and writable by nobody else
    /// (refused otherwise); the library creates them with mode 0700.
    pub cache_dir: PathBuf,
    /// Where versioned guest images live (default `<cache_dir>/images`).
    pub images_dir: PathBuf,
    /// Fail fast instead of building or downloading missing assets.
    pub offline: bool,
    /// Build (or download, when [`Self::asset_base_url`] is set) missing assets automatically.
    pub auto_download_assets: bool,
    /// Operator-hosted prebuilt assets: `<url>/<version>/manifest.json` plus the files it lists.
    /// `https://` only (plain `http://` to a loopback host, for tests).
    pub asset_base_url: Option<String>,
    /// The SHA-256 (hex) the downloaded `manifest.json` must have (default none). With it, a
    /// compromised server cannot hand out both images and their checksums: a manifest that
    /// does not match installs nothing. Needs [`Self::asset_base_url`].
    pub asset_manifest_sha256: Option<String>,
    /// Asset version to use instead of the one derived from the build inputs.
    pub asset_version: Option<String>,
    /// Never use KVM, even where it works.
    pub force_emulation: bool,
    /// The QEMU binary: a path, or a name looked up in `PATH` (`qemu-system-x86_64` for the
    /// host's). `None` (default): exec-sandbox's own QEMU, built once into `images_dir/qemu/`
    /// from Debian's source of the installed `qemu-system-x86` with only the microvm machine and
    /// the devices VMs use (root; ~5 min on 2 cores, like the images).
    pub qemu_binary: Option<PathBuf>,
    /// The user QEMU runs as when the library runs as root: never root itself. `None`
    /// (default) means `sbx-qemu`, a system user created on first use when missing; a named
    /// user must exist. An unprivileged library runs QEMU as itself.
    pub qemu_user: Option<String>,
    /// Restore runs from L1 memory snapshots (warm templates saved once per VM shape) instead
    /// of booting, and save them in the background after a cold boot (default on).
    pub l1_snapshots: bool,
    /// Keep one clone's QEMU started ahead for each memory snapshot a run was restored from,
    /// four at most (default on): the next restore of it skips QEMU's process start and the
    /// device state's load (~15 ms of a clone's start on a 2-core TCG machine). Each costs one
    /// idle QEMU process (~9 MB PSS, no guest running) not charged to the memory budget;
    /// one-shot callers with a single run switch it off. Ignored when [`Self::l1_snapshots`]
    /// is off.
    pub l1_standby: bool,
    /// Where memory snapshots live (default `<cache_dir>/snapshots`).
    pub snapshot_cache_dir: PathBuf,
    /// Bound of the snapshot cache, in MB on disk; least recently used templates are evicted
    /// (default 2048).
    pub snapshot_cache_max_mb: u64,
    /// Where package layers (L2) live (default `<cache_dir>/packages`).
    pub package_cache_dir: PathBuf,
    /// Bound of the package layer cache, in MB on disk; least recently used layers are evicted
    /// (default 4096).
    pub package_cache_max_mb: u64,
    /// Require every requested package to be among its ecosystem's 10,000 most-downloaded
    /// (bundled lists; default on). The syntax rules apply either way.
    pub enable_package_validation: bool,
    /// Warm VMs kept booted per language, interpreter started, for runs at the default memory
    /// without boot-log streaming (0-20, default 0 = off). They are extra to
    /// [`Self::max_concurrent_vms`] but count against the memory and CPU budget.
    pub warm_pool_size: usize,
    /// Longest a run waits for a slot and for admission before it fails with
    /// [`Error::Capacity`](crate::Error::Capacity) (seconds, 1-3600, default 60). Asset
    /// preparation does not count.
    pub admission_timeout_seconds: u64,
    /// Memory all VMs together may be charged, in MB; derived from the host when `None`
    /// (default): (`MemTotal` − [`Self::host_memory_reserve_mb`]) × [`Self::memory_overcommit_ratio`].
    /// A VM is charged its guest memory plus QEMU's overhead (30 MB, and 64 MB of translation
    /// cache under TCG).
    pub memory_budget_mb: Option<u64>,
    /// Host memory kept out of the derived memory budget (MB, default 1024).
    pub host_memory_reserve_mb: u64,
    /// Memory budget over the host's memory less its reserve (> 0, default 1.5: guest RAM is
    /// resident only once touched).
    pub memory_overcommit_ratio: f64,
    /// vCPUs admitted per host core (> 0, default 4.0: busy VMs slow each other down, idle ones
    /// cost little).
    pub cpu_overcommit_ratio: f64,
    /// No VM is admitted while the host's `MemAvailable` is below this (MB, default 512).
    pub min_available_memory_mb: u64,
    /// No VM is admitted while memory pressure (`/proc/pressure/memory`, `some avg10`, percent)
    /// is above this (0-100, default 20; ignored where the host has no PSI).
    pub max_memory_pressure: f64,
    /// CPU quota of each VM's QEMU (its cgroup's `cpu.max`), in percent of one core per vCPU
    /// (10-1000, or 0 for none; default 100: one core per vCPU). Where QEMU gets no cgroup,
    /// nothing enforces it ([`ExecutionResult::isolation`](crate::ExecutionResult::isolation)
    /// says so).
    pub vm_cpu_quota_percent: u32,
    /// Let guests reach the host's loopback, private and link-local addresses (cloud metadata
    /// included) through the gateway when their policy otherwise allows the destination
    /// (default off: never). Meant for tests with loopback fixtures and for operators with
    /// internal mirrors.
    pub network_allow_internal: bool,
    /// Static names the gateway resolves itself before asking the host's resolver, like
    /// `/etc/hosts` for the guests' DNS (default none). A guest still needs the name allowed.
    pub network_hosts: Vec<(String, std::net::Ipv4Addr)>,
    /// A PEM file of CA certificates that guests with network access trust in addition to the
    /// image's (default none): for hosts behind a TLS-intercepting proxy or with an internal
    /// CA. Read and checked when the scheduler is created.
    pub guest_ca_bundle: Option<PathBuf>,
    /// S3 bucket where built package layers are shared between hosts (L3): fetched on a local
    /// cache miss before building, uploaded in the background after a build (default none =
    /// off). Credentials come from the standard AWS environment variables, web identity, the
    /// ECS/EKS container endpoints or instance metadata. Any failure is a warning and a local
    /// build, never a failed run.
    pub s3_bucket: Option<String>,
    /// Region of [`Self::s3_bucket`] (default `us-east-1`).
    pub s3_region: String,
    /// Prefix of the layer objects in [`Self::s3_bucket`] (default `exec-sandbox/layers/`; a
    /// missing trailing `/` is added, `/` alone means the bucket's root).
    pub s3_prefix: String,
    /// An S3-compatible store instead of AWS S3 (MinIO, Ceph, R2...): its `https://` URL, or
    /// `http://` to a loopback address (default none).
    pub s3_endpoint_url: Option<String>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        // Without a home, every directory stays empty and `validate` asks for one.
        let cache_dir = default_cache_dir().unwrap_or_default();
        let below = |name: &str| {
            if cache_dir.as_os_str().is_empty() {
                PathBuf::new()
            } else {
                cache_dir.join(name)
            }
        };
        Self {
            max_concurrent_vms: limits::DEFAULT_MAX_CONCURRENT_VMS,
            default_memory_mb: limits::DEFAULT_MEMORY_MB,
            default_timeout_seconds: limits::DEFAULT_TIMEOUT_SECONDS,
            images_dir: below("images"),
            snapshot_cache_dir: below("snapshots"),
            package_cache_dir: below("packages"),
            cache_dir,
            offline: false,
            auto_download_assets: true,
            asset_base_url: None,
            asset_manifest_sha256: None,
            asset_version: None,
            force_emulation: false,
            qemu_binary: None,
            qemu_user: None,
            l1_snapshots: true,
            l1_standby: true,
            snapshot_cache_max_mb: limits::DEFAULT_SNAPSHOT_CACHE_MAX_MB,
            package_cache_max_mb: limits::DEFAULT_PACKAGE_CACHE_MAX_MB,
            enable_package_validation: true,
            warm_pool_size: 0,
            admission_timeout_seconds: limits::DEFAULT_ADMISSION_TIMEOUT_SECONDS,
            memory_budget_mb: None,
            host_memory_reserve_mb: limits::DEFAULT_HOST_MEMORY_RESERVE_MB,
            memory_overcommit_ratio: limits::DEFAULT_MEMORY_OVERCOMMIT_RATIO,
            cpu_overcommit_ratio: limits::DEFAULT_CPU_OVERCOMMIT_RATIO,
            min_available_memory_mb: limits::DEFAULT_MIN_AVAILABLE_MEMORY_MB,
            max_memory_pressure: limits::DEFAULT_MAX_MEMORY_PRESSURE,
            vm_cpu_quota_percent: limits::DEFAULT_VM_CPU_QUOTA_PERCENT,
            network_allow_internal: false,
            network_hosts: Vec::new(),
            guest_ca_bundle: None,
            s3_bucket: None,
            s3_region: limits::DEFAULT_S3_REGION.to_owned(),
            s3_prefix: limits::DEFAULT_S3_PREFIX.to_owned(),
            s3_endpoint_url: None,
        }
    }
}

/// Parses `name=ipv4[,name=ipv4...]` (the format of [`EnvVars::NETWORK_HOSTS`]).
fn parse_network_hosts(text: &str) -> Result<Vec<(String, std::net::Ipv4Addr)>, ValidationError> {
    let bad = |reason: String| ValidationError::Config {
        field: EnvVars::NETWORK_HOSTS,
        reason,
    };
    text.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            let (name, addr) = entry
                .split_once('=')
                .ok_or_else(|| bad(format!("`{entry}` is not NAME=IPV4")))?;
            let name =
                sbx_net::policy::validate_domain(name.trim()).map_err(|e| bad(e.to_string()))?;
            let addr = addr
                .trim()
                .parse()
                .map_err(|_| bad(format!("`{addr}` is not an IPv4 address")))?;
            Ok((name, addr))
        })
        .collect()
}

impl SchedulerConfig {
    /// Defaults with the `EXEC_SANDBOX_*` environment overrides applied.
    ///
    /// A variable that is set but unparsable is an error naming it, never silently ignored.
    pub fn from_env() -> Result<Self, ValidationError> {
        Self::default().with_env_overrides(|name| std::env::var(name).ok())
    }

    /// Applies overrides read through `get` (the environment in production, a map in tests).
    pub fn with_env_overrides(
        mut self,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ValidationError> {
        fn parse<T: std::str::FromStr>(name: &'static str, v: &str) -> Result<T, ValidationError> {
            v.trim().parse().map_err(|_| ValidationError::Config {
                field: name,
                reason: format!("`{v}` is not a valid number"),
            })
        }
        if let Some(v) = get(EnvVars::MAX_CONCURRENT_VMS) {
            self.max_concurrent_vms = parse(EnvVars::MAX_CONCURRENT_VMS, &v)?;
        }
        if let Some(v) = get(EnvVars::DEFAULT_MEMORY_MB) {
            self.default_memory_mb = parse(EnvVars::DEFAULT_MEMORY_MB, &v)?;
        }
        if let Some(v) = get(EnvVars::DEFAULT_TIMEOUT_SECONDS) {
            self.default_timeout_seconds = parse(EnvVars::DEFAULT_TIMEOUT_SECONDS, &v)?;
        }
        if let Some(v) = get(EnvVars::CACHE_DIR).filter(|v| !v.is_empty()) {
            self.cache_dir = PathBuf::from(v);
            self.images_dir = self.cache_dir.join("images");
            self.snapshot_cache_dir = self.cache_dir.join("snapshots");
            self.package_cache_dir = self.cache_dir.join("packages");
        }
        if let Some(v) = get(EnvVars::IMAGES_DIR).filter(|v| !v.is_empty()) {
            self.images_dir = PathBuf::from(v);
        }
        let truthy = |v: Option<String>| v.is_some_and(|v| env::is_truthy(&v));
        if truthy(get(EnvVars::OFFLINE)) {
            self.offline = true;
        }
        if truthy(get(EnvVars::FORCE_EMULATION)) {
            self.force_emulation = true;
        }
        if let Some(v) = get(EnvVars::ASSET_BASE_URL).filter(|v| !v.is_empty()) {
            self.asset_base_url = Some(v);
        }
        if let Some(v) = get(EnvVars::ASSET_MANIFEST_SHA256).filter(|v| !v.trim().is_empty()) {
            self.asset_manifest_sha256 = Some(v.trim().to_owned());
        }
        if let Some(v) = get(EnvVars::ASSET_VERSION).filter(|v| !v.is_empty()) {
            self.asset_version = Some(v);
        }
        if let Some(v) = get(EnvVars::QEMU).filter(|v| !v.is_empty()) {
            self.qemu_binary = Some(PathBuf::from(v));
        }
        if let Some(v) = get(EnvVars::QEMU_USER).filter(|v| !v.trim().is_empty()) {
            self.qemu_user = Some(v.trim().to_owned());
        }
        if let Some(v) = get(EnvVars::L1_SNAPSHOTS).filter(|v| !v.trim().is_empty()) {
            self.l1_snapshots = env::is_truthy(&v);
        }
        if let Some(v) = get(EnvVars::L1_STANDBY).filter(|v| !v.trim().is_empty()) {
            self.l1_standby = env::is_truthy(&v);
        }
        if let Some(v) = get(EnvVars::SNAPSHOT_CACHE_DIR).filter(|v| !v.is_empty()) {
            self.snapshot_cache_dir = PathBuf::from(v);
        }
        if let Some(v) = get(EnvVars::SNAPSHOT_CACHE_MAX_MB) {
            self.snapshot_cache_max_mb = parse(EnvVars::SNAPSHOT_CACHE_MAX_MB, &v)?;
        }
        if let Some(v) = get(EnvVars::PACKAGE_CACHE_DIR).filter(|v| !v.is_empty()) {
            self.package_cache_dir = PathBuf::from(v);
        }
        if let Some(v) = get(EnvVars::PACKAGE_VALIDATION).filter(|v| !v.trim().is_empty()) {
            self.enable_package_validation = env::is_truthy(&v);
        }
        if let Some(v) = get(EnvVars::PACKAGE_CACHE_MAX_MB) {
            self.package_cache_max_mb = parse(EnvVars::PACKAGE_CACHE_MAX_MB, &v)?;
        }
        self.apply_admission_env(&get)?;
        if let Some(v) = get(EnvVars::NETWORK_ALLOW_INTERNAL).filter(|v| !v.trim().is_empty()) {
            self.network_allow_internal = env::is_truthy(&v);
        }
        if let Some(v) = get(EnvVars::GUEST_CA_BUNDLE).filter(|v| !v.trim().is_empty()) {
            self.guest_ca_bundle = Some(PathBuf::from(v));
        }
        if let Some(v) = get(EnvVars::NETWORK_HOSTS).filter(|v| !v.trim().is_empty()) {
            self.network_hosts = parse_network_hosts(&v)?;
        }
        self.apply_s3_env(&get);
        self.validate()?;
        Ok(self)
    }

    /// The L3 package-layer store overrides.
    fn apply_s3_env(&mut self, get: &impl Fn(&str) -> Option<String>) {
        let get = |name: &str| {
            get(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        if let Some(v) = get(EnvVars::S3_BUCKET) {
            self.s3_bucket = Some(v);
        }
        if let Some(v) = get(EnvVars::S3_REGION) {
            self.s3_region = v;
        }
        if let Some(v) = get(EnvVars::S3_PREFIX) {
            self.s3_prefix = v;
        }
        if let Some(v) = get(EnvVars::S3_ENDPOINT_URL) {
            self.s3_endpoint_url = Some(v);
        }
    }

    /// The warm-pool and admission overrides.
    fn apply_admission_env(
        &mut self,
        get: &impl Fn(&str) -> Option<String>,
    ) -> Result<(), ValidationError> {
        fn parse<T: std::str::FromStr>(name: &'static str, v: &str) -> Result<T, ValidationError> {
            v.trim().parse().map_err(|_| ValidationError::Config {
                field: name,
                reason: format!("`{v}` is not a valid number"),
            })
        }
        let get = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        if let Some(v) = get(EnvVars::WARM_POOL_SIZE) {
            self.warm_pool_size = parse(EnvVars::WARM_POOL_SIZE, &v)?;
        }
        if let Some(v) = get(EnvVars::ADMISSION_TIMEOUT_SECONDS) {
            self.admission_timeout_seconds = parse(EnvVars::ADMISSION_TIMEOUT_SECONDS, &v)?;
        }
        if let Some(v) = get(EnvVars::MEMORY_BUDGET_MB) {
            self.memory_budget_mb = Some(parse(EnvVars::MEMORY_BUDGET_MB, &v)?);
        }
        if let Some(v) = get(EnvVars::HOST_MEMORY_RESERVE_MB) {
            self.host_memory_reserve_mb = parse(EnvVars::HOST_MEMORY_RESERVE_MB, &v)?;
        }
        if let Some(v) = get(EnvVars::MEMORY_OVERCOMMIT_RATIO) {
            self.memory_overcommit_ratio = parse(EnvVars::MEMORY_OVERCOMMIT_RATIO, &v)?;
        }
        if let Some(v) = get(EnvVars::CPU_OVERCOMMIT_RATIO) {
            self.cpu_overcommit_ratio = parse(EnvVars::CPU_OVERCOMMIT_RATIO, &v)?;
        }
        if let Some(v) = get(EnvVars::MIN_AVAILABLE_MEMORY_MB) {
            self.min_available_memory_mb = parse(EnvVars::MIN_AVAILABLE_MEMORY_MB, &v)?;
        }
        if let Some(v) = get(EnvVars::MAX_MEMORY_PRESSURE) {
            self.max_memory_pressure = parse(EnvVars::MAX_MEMORY_PRESSURE, &v)?;
        }
        if let Some(v) = get(EnvVars::VM_CPU_QUOTA_PERCENT) {
            self.vm_cpu_quota_percent = parse(EnvVars::VM_CPU_QUOTA_PERCENT, &v)?;
        }
        Ok(())
    }

    /// Checks the warm-pool and admission fields.
    fn validate_admission(&self) -> Result<(), ValidationError> {
        let bad =
            |field: &'static str, reason: String| Err(ValidationError::Config { field, reason });
        if self.warm_pool_size > limits::MAX_WARM_POOL_SIZE {
            return bad(
                "warm_pool_size",
                format!(
                    "{} is above {}",
                    self.warm_pool_size,
                    limits::MAX_WARM_POOL_SIZE
                ),
            );
        }
        if !(1..=limits::MAX_ADMISSION_TIMEOUT_SECONDS).contains(&self.admission_timeout_seconds) {
            return bad(
                "admission_timeout_seconds",
                format!(
                    "{} is outside 1-{}",
                    self.admission_timeout_seconds,
                    limits::MAX_ADMISSION_TIMEOUT_SECONDS
                ),
            );
        }
        for (field, ratio) in [
            ("memory_overcommit_ratio", self.memory_overcommit_ratio),
            ("cpu_overcommit_ratio", self.cpu_overcommit_ratio),
        ] {
            if !(ratio.is_finite() && ratio > 0.0) {
                return bad(field, format!("{ratio} is not a positive number"));
            }
        }
        if !(0.0..=100.0).contains(&self.max_memory_pressure) {
            return bad(
                "max_memory_pressure",
                format!("{} is outside 0-100", self.max_memory_pressure),
            );
        }
        let quota = self.vm_cpu_quota_percent;
        if quota != 0
            && !(limits::MIN_VM_CPU_QUOTA_PERCENT..=limits::MAX_VM_CPU_QUOTA_PERCENT)
                .contains(&quota)
        {
            return bad(
                "vm_cpu_quota_percent",
                format!(
                    "{quota} is outside {}-{} (0 = no quota)",
                    limits::MIN_VM_CPU_QUOTA_PERCENT,
                    limits::MAX_VM_CPU_QUOTA_PERCENT
                ),
            );
        }
        Ok(())
    }

    /// The asset layer's share of this configuration.
    pub fn asset_config(&self) -> crate::assets::AssetConfig {
        use crate::assets::AssetSource;
        crate::assets::AssetConfig {
            images_dir: self.images_dir.clone(),
            source: if self.offline || !self.auto_download_assets {
                AssetSource::Forbidden
            } else if let Some(base) = &self.asset_base_url {
                AssetSource::Download(base.clone())
            } else {
                AssetSource::Build
            },
            version: self.asset_version.clone(),
            manifest_sha256: self.asset_manifest_sha256.clone(),
        }
    }

    /// Checks the cache directories (see [`crate::trust`]) before anything is read from them:
    /// one another user owns or can write is refused. Creates nothing (a caller's own
    /// directory that others may read is made private).
    pub(crate) fn check_cache_dirs(&self) -> Result<(), crate::TrustError> {
        let mut dirs = vec![&self.cache_dir, &self.images_dir, &self.package_cache_dir];
        if self.l1_snapshots {
            dirs.push(&self.snapshot_cache_dir);
        }
        dirs.into_iter()
            .try_for_each(|dir| crate::trust::check(dir))
    }

    /// The package layer's share of this configuration. Missing tools are installed with apt
    /// (as root) under the same policy as asset builds.
    pub(crate) fn package_config(&self) -> crate::packages::PackageConfig {
        let mut config = crate::packages::PackageConfig::new(self.package_cache_dir.clone());
        config.max_bytes = self.package_cache_max_mb.saturating_mul(1024 * 1024);
        config.offline = self.offline;
        config.tools.install_missing = !self.offline && self.auto_download_assets;
        config
    }

    /// The L3 package-layer store's share of this configuration.
    pub(crate) fn s3_config(&self) -> crate::packages::s3::S3Config {
        crate::packages::s3::S3Config {
            bucket: self.s3_bucket.clone(),
            region: self.s3_region.clone(),
            prefix: crate::packages::s3::normalize_prefix(&self.s3_prefix),
            endpoint_url: self.s3_endpoint_url.clone(),
            ..Default::default()
        }
    }

    /// The admission layer's share of this configuration.
    pub(crate) fn admission_config(&self) -> crate::admission::AdmissionConfig {
        crate::admission::AdmissionConfig {
            memory_budget_mb: self.memory_budget_mb,
            host_memory_reserve_mb: self.host_memory_reserve_mb,
            memory_overcommit_ratio: self.memory_overcommit_ratio,
            cpu_overcommit_ratio: self.cpu_overcommit_ratio,
            min_available_memory_mb: self.min_available_memory_mb,
            max_memory_pressure: self.max_memory_pressure,
        }
    }

    /// The QEMU user, when named, is a portable user name and not root.
    fn validate_qemu_user(&self) -> Result<(), ValidationError> {
        if let Some(user) = &self.qemu_user {
            // A portable user name (it goes to the passwd lookup as is).
            let valid = !user.is_empty()
                && user.len() <= 32
                && !user.starts_with('-')
                && user
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
            if !valid {
                return Err(ValidationError::Config {
                    field: "qemu_user",
                    reason: format!("`{user}` is not a user name"),
                });
            }
            if user == "root" {
                return Err(ValidationError::Config {
                    field: "qemu_user",
                    reason: "QEMU never runs as root".into(),
                });
            }
        }
        Ok(())
    }

    /// Checks the cache directories are named, and the asset download settings.
    fn validate_cache(&self) -> Result<(), ValidationError> {
        let bad =
            |field: &'static str, reason: String| Err(ValidationError::Config { field, reason });
        for (field, dir) in [
            ("cache_dir", &self.cache_dir),
            ("images_dir", &self.images_dir),
            ("snapshot_cache_dir", &self.snapshot_cache_dir),
            ("package_cache_dir", &self.package_cache_dir),
        ] {
            if dir.as_os_str().is_empty() {
                return bad(
                    field,
                    format!(
                        "no directory: HOME and XDG_CACHE_HOME are unset and this user has no \
                         home directory; set {} (never a shared temporary directory)",
                        EnvVars::CACHE_DIR
                    ),
                );
            }
        }
        if let Some(url) = &self.asset_base_url {
            crate::assets::validate_base_url(url)
                .or_else(|reason| bad("asset_base_url", reason).map(|()| true))?;
        }
        if let Some(pin) = &self.asset_manifest_sha256 {
            crate::assets::validate_manifest_sha256(pin)
                .or_else(|reason| bad("asset_manifest_sha256", reason))?;
            if self.asset_base_url.is_none() {
                return bad(
                    "asset_manifest_sha256",
                    format!(
                        "it pins a downloaded manifest, but {} is not set",
                        EnvVars::ASSET_BASE_URL
                    ),
                );
            }
        }
        Ok(())
    }

    /// Checks every field against its limit.
    pub fn validate(&self) -> Result<(), ValidationError> {
        self.validate_admission()?;
        self.validate_cache()?;
        self.validate_qemu_user()?;
        self.s3_config().validate().map_err(|e| match e {
            crate::packages::s3::S3SetupError::Invalid { field, reason } => {
                ValidationError::Config { field, reason }
            }
            other => ValidationError::Config {
                field: "s3_bucket",
                reason: other.to_string(),
            },
        })?;
        if !(limits::MIN_CONCURRENT_VMS..=limits::MAX_CONCURRENT_VMS)
            .contains(&self.max_concurrent_vms)
        {
            return Err(ValidationError::Config {
                field: "max_concurrent_vms",
                reason: format!(
                    "{} is outside {}-{}",
                    self.max_concurrent_vms,
                    limits::MIN_CONCURRENT_VMS,
                    limits::MAX_CONCURRENT_VMS
                ),
            });
        }
        crate::validate::memory(self.default_memory_mb).map_err(|e| ValidationError::Config {
            field: "default_memory_mb",
            reason: e.to_string(),
        })?;
        crate::validate::timeout(self.default_timeout_seconds).map_err(|e| {
            ValidationError::Config {
                field: "default_timeout_seconds",
                reason: e.to_string(),
            }
        })?;
        Ok(())
    }
}

/// The cache directory's name under a user's cache home.
const CACHE_NAME: &str = "exec-sandbox";
/// Root's caches when root has no home directory.
const SYSTEM_CACHE_DIR: &str = "/var/cache/exec-sandbox";

/// The default cache root of this process (see [`SchedulerConfig::cache_dir`]); `None` when
/// there is no home to put it in.
fn default_cache_dir() -> Option<PathBuf> {
    cache_dir_for(
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME"),
        // With HOME unset (or empty), std asks the password database (getpwuid_r).
        std::env::home_dir,
        crate::sys::effective_uid(),
    )
}

/// `$XDG_CACHE_HOME/exec-sandbox` (an absolute one, as the XDG specification wants), else
/// `<home>/.cache/exec-sandbox` with `HOME` or, when it is unset or empty, the home the
/// password database gives (`passwd_home`; one that does not exist, like `/nonexistent`, or `/`
/// is none); root without a home gets [`SYSTEM_CACHE_DIR`], anyone else `None`. Never a shared
/// temporary directory, where another user could prepare the cache.
fn cache_dir_for(
    xdg_cache_home: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
    passwd_home: impl FnOnce() -> Option<PathBuf>,
    euid: u32,
) -> Option<PathBuf> {
    let set = |v: Option<std::ffi::OsString>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(xdg) = set(xdg_cache_home).filter(|p| p.is_absolute()) {
        return Some(xdg.join(CACHE_NAME));
    }
    let home = set(home).or_else(|| {
        passwd_home().filter(|h| h.is_absolute() && h.parent().is_some() && h.is_dir())
    });
    match home {
        Some(home) => Some(home.join(".cache").join(CACHE_NAME)),
        None if euid == 0 => Some(PathBuf::from(SYSTEM_CACHE_DIR)),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with(vars: &[(&str, &str)]) -> Result<SchedulerConfig, ValidationError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        SchedulerConfig::default().with_env_overrides(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_match_the_reference() {
        let c = SchedulerConfig::default();
        assert_eq!(c.max_concurrent_vms, 10);
        assert_eq!(c.default_memory_mb, 256);
        assert_eq!(c.default_timeout_seconds, 30);
        assert!(c.auto_download_assets);
        assert!(!c.offline && !c.force_emulation);
        assert!(c.cache_dir.ends_with("exec-sandbox"));
        assert_eq!(c.images_dir, c.cache_dir.join("images"));
    }

    #[test]
    fn without_home_the_cache_never_falls_back_to_tmp() {
        let some = |s: &str| Some(std::ffi::OsString::from(s));
        let no_passwd = || None;
        let passwd = |p: &'static str| move || Some(PathBuf::from(p));
        let tmp = tempfile::tempdir().unwrap();
        let real_home: &'static str = Box::leak(tmp.path().display().to_string().into_boxed_str());
        // XDG first (relative ones are ignored, as the specification says), then HOME.
        assert_eq!(
            cache_dir_for(some("/x/cache"), some("/h"), no_passwd, 1000),
            Some(PathBuf::from("/x/cache/exec-sandbox"))
        );
        assert_eq!(
            cache_dir_for(some("rel"), some("/h"), no_passwd, 1000),
            Some(PathBuf::from("/h/.cache/exec-sandbox"))
        );
        // HOME unset or empty: the password database's home, if it exists.
        for home in [None, some("")] {
            assert_eq!(
                cache_dir_for(None, home, passwd(real_home), 1000),
                Some(tmp.path().join(".cache/exec-sandbox"))
            );
        }
        assert_eq!(
            cache_dir_for(None, None, passwd("/nonexistent"), 1000),
            None,
            "a home that does not exist is none"
        );
        assert_eq!(cache_dir_for(None, None, passwd("/"), 1000), None);
        // No home at all: a system location for root, an error for anyone else.
        assert_eq!(
            cache_dir_for(None, None, no_passwd, 0),
            Some(PathBuf::from("/var/cache/exec-sandbox"))
        );
        assert_eq!(cache_dir_for(None, None, no_passwd, 1000), None);

        let homeless = SchedulerConfig {
            cache_dir: PathBuf::new(),
            images_dir: PathBuf::new(),
            ..SchedulerConfig::default()
        };
        let e = homeless.validate().unwrap_err().to_string();
        assert!(
            e.contains("cache_dir") && e.contains(EnvVars::CACHE_DIR),
            "{e}"
        );
    }

    #[test]
    fn asset_downloads_are_https_or_loopback_and_pins_are_checked() {
        let pin = "ab".repeat(32);
        let c = with(&[
            (EnvVars::ASSET_BASE_URL, "https://assets.example.test/sbx"),
            (EnvVars::ASSET_MANIFEST_SHA256, &pin),
        ])
        .unwrap();
        assert_eq!(c.asset_config().manifest_sha256.as_deref(), Some(&*pin));
        assert!(with(&[(EnvVars::ASSET_BASE_URL, "http://127.0.0.1:8080")]).is_ok());
        for (vars, field) in [
            (
                vec![(EnvVars::ASSET_BASE_URL, "http://assets.example.test/sbx")],
                "asset_base_url",
            ),
            (
                vec![(EnvVars::ASSET_BASE_URL, "ftp://127.0.0.1/sbx")],
                "asset_base_url",
            ),
            (
                vec![
                    (EnvVars::ASSET_BASE_URL, "https://assets.example.test"),
                    (EnvVars::ASSET_MANIFEST_SHA256, "abc"),
                ],
                "asset_manifest_sha256",
            ),
            (
                vec![(EnvVars::ASSET_MANIFEST_SHA256, pin.as_str())],
                "asset_manifest_sha256",
            ),
        ] {
            let e = with(&vars).unwrap_err();
            assert!(e.to_string().contains(field), "{vars:?}: {e}");
        }
    }

    #[test]
    fn env_overrides_apply() {
        let c = with(&[
            (EnvVars::MAX_CONCURRENT_VMS, "3"),
            (EnvVars::CACHE_DIR, "/x/cache"),
            (EnvVars::OFFLINE, "1"),
            (EnvVars::FORCE_EMULATION, "true"),
        ])
        .unwrap();
        assert_eq!(c.max_concurrent_vms, 3);
        assert_eq!(c.cache_dir, PathBuf::from("/x/cache"));
        assert_eq!(c.images_dir, PathBuf::from("/x/cache/images"));
        assert!(c.offline && c.force_emulation);
        let c = with(&[(EnvVars::CACHE_DIR, "/a"), (EnvVars::IMAGES_DIR, "/b")]).unwrap();
        assert_eq!(c.images_dir, PathBuf::from("/b"));
        assert!(!with(&[(EnvVars::OFFLINE, "0")]).unwrap().offline);
    }

    #[test]
    fn pool_and_admission_overrides_apply_and_are_checked() {
        let d = SchedulerConfig::default();
        assert_eq!(d.warm_pool_size, 0);
        assert_eq!(d.admission_timeout_seconds, 60);
        assert_eq!(d.memory_budget_mb, None);
        let c = with(&[
            (EnvVars::WARM_POOL_SIZE, "2"),
            (EnvVars::ADMISSION_TIMEOUT_SECONDS, "5"),
            (EnvVars::MEMORY_BUDGET_MB, "800"),
            (EnvVars::MEMORY_OVERCOMMIT_RATIO, "1.25"),
            (EnvVars::CPU_OVERCOMMIT_RATIO, "2"),
            (EnvVars::MAX_MEMORY_PRESSURE, "50"),
            (EnvVars::VM_CPU_QUOTA_PERCENT, "20"),
        ])
        .unwrap();
        assert_eq!(c.vm_cpu_quota_percent, 20);
        assert_eq!(d.vm_cpu_quota_percent, 100);
        assert_eq!(
            with(&[(EnvVars::VM_CPU_QUOTA_PERCENT, "0")])
                .unwrap()
                .vm_cpu_quota_percent,
            0,
            "0 turns the quota off"
        );
        assert_eq!(c.warm_pool_size, 2);
        assert_eq!(c.admission_timeout_seconds, 5);
        assert_eq!(c.memory_budget_mb, Some(800));
        assert_eq!(c.memory_overcommit_ratio, 1.25);
        assert_eq!(c.cpu_overcommit_ratio, 2.0);
        assert_eq!(c.max_memory_pressure, 50.0);
        for (var, value, field) in [
            (EnvVars::WARM_POOL_SIZE, "21", "warm_pool_size"),
            (
                EnvVars::ADMISSION_TIMEOUT_SECONDS,
                "0",
                "admission_timeout_seconds",
            ),
            (EnvVars::CPU_OVERCOMMIT_RATIO, "0", "cpu_overcommit_ratio"),
            (
                EnvVars::MEMORY_OVERCOMMIT_RATIO,
                "NaN",
                "memory_overcommit_ratio",
            ),
            (EnvVars::MAX_MEMORY_PRESSURE, "101", "max_memory_pressure"),
            (EnvVars::VM_CPU_QUOTA_PERCENT, "5", "vm_cpu_quota_percent"),
            (
                EnvVars::VM_CPU_QUOTA_PERCENT,
                "1001",
                "vm_cpu_quota_percent",
            ),
            (
                EnvVars::VM_CPU_QUOTA_PERCENT,
                "-1",
                EnvVars::VM_CPU_QUOTA_PERCENT,
            ),
            (EnvVars::MEMORY_BUDGET_MB, "lots", EnvVars::MEMORY_BUDGET_MB),
        ] {
            let e = with(&[(var, value)]).unwrap_err();
            assert!(e.to_string().contains(field), "{var}={value}: {e}");
        }
    }

    #[test]
    fn snapshot_settings() {
        let d = SchedulerConfig::default();
        assert!(d.l1_snapshots);
        assert_eq!(d.snapshot_cache_dir, d.cache_dir.join("snapshots"));
        let c = with(&[(EnvVars::CACHE_DIR, "/x")]).unwrap();
        assert_eq!(c.snapshot_cache_dir, PathBuf::from("/x/snapshots"));
        let c = with(&[
            (EnvVars::L1_SNAPSHOTS, "0"),
            (EnvVars::SNAPSHOT_CACHE_DIR, "/s"),
            (EnvVars::SNAPSHOT_CACHE_MAX_MB, "100"),
        ])
        .unwrap();
        assert!(!c.l1_snapshots);
        assert_eq!(c.snapshot_cache_dir, PathBuf::from("/s"));
        assert_eq!(c.snapshot_cache_max_mb, 100);
        assert!(with(&[(EnvVars::L1_SNAPSHOTS, "1")]).unwrap().l1_snapshots);
        assert!(d.l1_standby);
        assert!(!with(&[(EnvVars::L1_STANDBY, "0")]).unwrap().l1_standby);
        assert!(with(&[(EnvVars::L1_STANDBY, "1")]).unwrap().l1_standby);
        let e = with(&[(EnvVars::SNAPSHOT_CACHE_MAX_MB, "big")]).unwrap_err();
        assert!(
            e.to_string().contains(EnvVars::SNAPSHOT_CACHE_MAX_MB),
            "{e}"
        );
    }

    #[test]
    fn package_cache_settings() {
        let d = SchedulerConfig::default();
        assert_eq!(d.package_cache_dir, d.cache_dir.join("packages"));
        assert_eq!(d.package_cache_max_mb, 4096);
        let p = d.package_config();
        assert_eq!(p.cache_dir, d.package_cache_dir);
        assert_eq!(p.max_bytes, 4096 * 1024 * 1024);
        assert!(!p.offline && p.tools.install_missing);
        let c = with(&[(EnvVars::CACHE_DIR, "/x"), (EnvVars::OFFLINE, "1")]).unwrap();
        assert_eq!(c.package_cache_dir, PathBuf::from("/x/packages"));
        let p = c.package_config();
        assert!(p.offline && !p.tools.install_missing);
        let c = with(&[
            (EnvVars::PACKAGE_CACHE_DIR, "/p"),
            (EnvVars::PACKAGE_CACHE_MAX_MB, "10"),
        ])
        .unwrap();
        assert_eq!(c.package_cache_dir, PathBuf::from("/p"));
        assert_eq!(c.package_config().max_bytes, 10 * 1024 * 1024);
        let e = with(&[(EnvVars::PACKAGE_CACHE_MAX_MB, "lots")]).unwrap_err();
        assert!(e.to_string().contains(EnvVars::PACKAGE_CACHE_MAX_MB), "{e}");
    }

    #[test]
    fn asset_source_follows_offline_auto_download_and_base_url() {
        use crate::assets::AssetSource;
        let mut c = SchedulerConfig::default();
        assert_eq!(c.asset_config().source, AssetSource::Build);
        c.asset_base_url = Some("http://127.0.0.1:1/assets".into());
        assert_eq!(
            c.asset_config().source,
            AssetSource::Download("http://127.0.0.1:1/assets".into())
        );
        c.auto_download_assets = false;
        assert_eq!(c.asset_config().source, AssetSource::Forbidden);
        c.auto_download_assets = true;
        c.offline = true;
        assert_eq!(c.asset_config().source, AssetSource::Forbidden);
        c.asset_version = Some("v1".into());
        assert_eq!(c.asset_config().version.as_deref(), Some("v1"));
        assert_eq!(c.asset_config().images_dir, c.images_dir);
    }

    #[test]
    fn s3_settings() {
        let d = SchedulerConfig::default();
        assert_eq!(d.s3_bucket, None);
        assert_eq!(d.s3_region, "us-east-1");
        assert_eq!(d.s3_prefix, "exec-sandbox/layers/");
        assert_eq!(d.s3_config().bucket, None);
        let c = with(&[
            (EnvVars::S3_BUCKET, "team-layers"),
            (EnvVars::S3_REGION, "eu-west-3"),
            (EnvVars::S3_PREFIX, "sbx/cache"),
            (EnvVars::S3_ENDPOINT_URL, "http://127.0.0.1:9000"),
        ])
        .unwrap();
        assert_eq!(c.s3_bucket.as_deref(), Some("team-layers"));
        assert_eq!(c.s3_region, "eu-west-3");
        let s3 = c.s3_config();
        assert_eq!(s3.prefix, "sbx/cache/");
        assert_eq!(s3.endpoint_url.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(s3.region, "eu-west-3");
        assert_eq!(
            with(&[(EnvVars::S3_PREFIX, "/")])
                .unwrap()
                .s3_config()
                .prefix,
            ""
        );
        for (var, value, field) in [
            (EnvVars::S3_BUCKET, "Team_Layers", "s3_bucket"),
            (EnvVars::S3_REGION, "EU WEST", "s3_region"),
            (EnvVars::S3_PREFIX, "a/../b", "s3_prefix"),
            (
                EnvVars::S3_ENDPOINT_URL,
                "http://10.1.2.3:9000",
                "s3_endpoint_url",
            ),
            (
                EnvVars::S3_ENDPOINT_URL,
                "s3.example.test",
                "s3_endpoint_url",
            ),
        ] {
            let e = with(&[(var, value)]).unwrap_err();
            assert!(e.to_string().contains(field), "{var}={value}: {e}");
        }
    }

    #[test]
    fn bad_env_values_name_the_variable() {
        let e = with(&[(EnvVars::MAX_CONCURRENT_VMS, "lots")]).unwrap_err();
        assert!(e.to_string().contains(EnvVars::MAX_CONCURRENT_VMS), "{e}");
        let e = with(&[(EnvVars::MAX_CONCURRENT_VMS, "0")]).unwrap_err();
        assert!(e.to_string().contains("max_concurrent_vms"), "{e}");
        let e = with(&[(EnvVars::DEFAULT_MEMORY_MB, "64")]).unwrap_err();
        assert!(e.to_string().contains("default_memory_mb"), "{e}");
    }
}
