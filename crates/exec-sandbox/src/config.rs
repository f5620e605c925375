//! Scheduler configuration: defaults, environment overrides and validation.

use std::path::PathBuf;

use crate::env::{self, EnvVars};
use crate::limits;
use crate::validate::ValidationError;

/// How a [`Scheduler`](crate::Scheduler) runs VMs.
///
/// `SchedulerConfig::default()` gives the documented defaults; [`SchedulerConfig::from_env`]
/// applies the `EXEC_SANDBOX_*` overrides listed in [`EnvVars`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// VMs alive at once; further runs wait for a slot (1-100, default 10).
    pub max_concurrent_vms: usize,
    /// Guest memory when a run does not ask (MB, default 256).
    pub default_memory_mb: u32,
    /// Execution timeout when a run does not ask (seconds, 1-300, default 30).
    pub default_timeout_seconds: u64,
    /// Cache root (default `~/.cache/exec-sandbox`).
    pub cache_dir: PathBuf,
    /// Where versioned guest images live (default `<cache_dir>/images`).
    pub images_dir: PathBuf,
    /// Fail fast instead of building or downloading missing assets.
    pub offline: bool,
    /// Build (or download, when [`Self::asset_base_url`] is set) missing assets automatically.
    pub auto_download_assets: bool,
    /// Operator-hosted prebuilt assets: `<url>/<version>/manifest.json` plus the files it lists.
    pub asset_base_url: Option<String>,
    /// Asset version to use instead of the one derived from the build inputs.
    pub asset_version: Option<String>,
    /// Never use KVM, even where it works.
    pub force_emulation: bool,
    /// The QEMU binary (default `qemu-system-x86_64` from `PATH`).
    pub qemu_binary: PathBuf,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        let cache_dir = default_cache_dir();
        Self {
            max_concurrent_vms: limits::DEFAULT_MAX_CONCURRENT_VMS,
            default_memory_mb: limits::DEFAULT_MEMORY_MB,
            default_timeout_seconds: limits::DEFAULT_TIMEOUT_SECONDS,
            images_dir: cache_dir.join("images"),
            cache_dir,
            offline: false,
            auto_download_assets: true,
            asset_base_url: None,
            asset_version: None,
            force_emulation: false,
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
        }
    }
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
        if let Some(v) = get(EnvVars::ASSET_VERSION).filter(|v| !v.is_empty()) {
            self.asset_version = Some(v);
        }
        if let Some(v) = get(EnvVars::QEMU).filter(|v| !v.is_empty()) {
            self.qemu_binary = PathBuf::from(v);
        }
        self.validate()?;
        Ok(self)
    }

    /// Checks every field against its limit.
    pub fn validate(&self) -> Result<(), ValidationError> {
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

fn default_cache_dir() -> PathBuf {
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("exec-sandbox");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".cache").join("exec-sandbox")
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
    fn bad_env_values_name_the_variable() {
        let e = with(&[(EnvVars::MAX_CONCURRENT_VMS, "lots")]).unwrap_err();
        assert!(e.to_string().contains(EnvVars::MAX_CONCURRENT_VMS), "{e}");
        let e = with(&[(EnvVars::MAX_CONCURRENT_VMS, "0")]).unwrap_err();
        assert!(e.to_string().contains("max_concurrent_vms"), "{e}");
        let e = with(&[(EnvVars::DEFAULT_MEMORY_MB, "64")]).unwrap_err();
        assert!(e.to_string().contains("default_memory_mb"), "{e}");
    }
}
