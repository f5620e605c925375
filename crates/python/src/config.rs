//! `SchedulerConfig` between Python keyword arguments and [`exec_sandbox::SchedulerConfig`].
//!
//! The Python class calls [`resolve_config`] with the keyword arguments it was given: they are
//! applied on top of [`SchedulerConfig::from_env`] (so every `EXEC_SANDBOX_*` variable still
//! works for the fields not given), validated, and every field comes back resolved. The
//! scheduler is later built from that full dictionary with [`from_resolved`].

use std::net::Ipv4Addr;
use std::path::PathBuf;

use exec_sandbox::SchedulerConfig;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors;

/// Session idle timeout when neither the session nor the configuration names one.
const SESSION_IDLE_TIMEOUT: &str = "session_idle_timeout_seconds";

/// The directories derived from `cache_dir` unless given themselves.
const DERIVED_DIRS: [(&str, &str); 3] = [
    ("images_dir", "images"),
    ("snapshot_cache_dir", "snapshots"),
    ("package_cache_dir", "packages"),
];

fn extract<'py, T: FromPyObjectOwned<'py>>(field: &str, value: &Bound<'py, PyAny>) -> PyResult<T> {
    value.extract::<T>().map_err(|e| {
        let e: PyErr = e.into();
        let got = value
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".into());
        errors::validation_error(field, format!("{field}: invalid value of type {got}: {e}"))
    })
}

macro_rules! fields {
    ($($name:ident),* $(,)?) => {
        /// Every field a `SchedulerConfig` takes, in order.
        const FIELDS: &[&str] = &[$(stringify!($name),)* "network_hosts", SESSION_IDLE_TIMEOUT];

        /// Sets the field `name`; false when there is no such field.
        fn set_field(config: &mut SchedulerConfig, name: &str, value: &Bound<'_, PyAny>) -> PyResult<bool> {
            match name {
                $(stringify!($name) => config.$name = extract(name, value)?,)*
                "network_hosts" => config.network_hosts = network_hosts(value)?,
                _ => return Ok(false),
            }
            Ok(true)
        }

        /// Every field of `config` into `dict`.
        fn fill(config: &SchedulerConfig, dict: &Bound<'_, PyDict>) -> PyResult<()> {
            $(dict.set_item(stringify!($name), config.$name.clone())?;)*
            let hosts = PyDict::new(dict.py());
            for (name, addr) in &config.network_hosts {
                hosts.set_item(name, addr.to_string())?;
            }
            dict.set_item("network_hosts", hosts)?;
            Ok(())
        }
    };
}

fields!(
    max_concurrent_vms,
    warm_pool_size,
    default_memory_mb,
    default_timeout_seconds,
    cache_dir,
    images_dir,
    snapshot_cache_dir,
    package_cache_dir,
    offline,
    auto_download_assets,
    asset_base_url,
    asset_manifest_sha256,
    asset_version,
    force_emulation,
    qemu_binary,
    qemu_user,
    l1_snapshots,
    l1_standby,
    snapshot_cache_max_mb,
    package_cache_max_mb,
    enable_package_validation,
    admission_timeout_seconds,
    memory_budget_mb,
    host_memory_reserve_mb,
    memory_overcommit_ratio,
    cpu_overcommit_ratio,
    min_available_memory_mb,
    max_memory_pressure,
    vm_cpu_quota_percent,
    network_allow_internal,
    guest_ca_bundle,
    s3_bucket,
    s3_region,
    s3_prefix,
    s3_endpoint_url,
);

/// `{name: "ipv4"}` (or pairs) into the static host table.
fn network_hosts(value: &Bound<'_, PyAny>) -> PyResult<Vec<(String, Ipv4Addr)>> {
    let field = "network_hosts";
    let pairs: Vec<(String, String)> = match value.cast::<PyDict>() {
        Ok(dict) => dict
            .iter()
            .map(|(k, v)| Ok((extract(field, &k)?, extract(field, &v)?)))
            .collect::<PyResult<_>>()?,
        Err(_) => extract(field, value)?,
    };
    pairs
        .into_iter()
        .map(|(name, addr)| {
            let ip = addr.trim().parse().map_err(|_| {
                errors::validation_error(
                    field,
                    format!("{field}: `{addr}` (for `{name}`) is not an IPv4 address"),
                )
            })?;
            Ok((name, ip))
        })
        .collect()
}

/// Applies `overrides` to `config`, then validates it. Returns the idle timeout of sessions.
fn apply(config: &mut SchedulerConfig, overrides: &Bound<'_, PyDict>) -> PyResult<u64> {
    let mut idle = exec_sandbox::limits::DEFAULT_SESSION_IDLE_TIMEOUT_SECONDS;
    let given = |name: &str| overrides.contains(name).unwrap_or(false);
    for (key, value) in overrides.iter() {
        let name: String = key.extract()?;
        if value.is_none() && !accepts_none(&name) {
            continue;
        }
        if name == SESSION_IDLE_TIMEOUT {
            idle = extract(&name, &value)?;
        } else if !set_field(config, &name, &value)? {
            return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                "SchedulerConfig got an unexpected keyword argument `{name}`"
            )));
        }
        if name == "cache_dir" {
            for (dir, below) in DERIVED_DIRS {
                if !given(dir) {
                    let path: PathBuf = config.cache_dir.join(below);
                    set_field(config, dir, &path.into_pyobject(overrides.py())?)?;
                }
            }
        }
    }
    config
        .validate()
        .map_err(|e| errors::sandbox_error(exec_sandbox::Error::Validation(e)))?;
    exec_sandbox::validate::idle_timeout(idle).map_err(|e| {
        let message = e
            .to_string()
            .replacen("idle_timeout_seconds", SESSION_IDLE_TIMEOUT, 1);
        errors::validation_error(SESSION_IDLE_TIMEOUT, message)
    })?;
    Ok(idle)
}

/// Fields whose `None` means something (rather than "not given").
fn accepts_none(name: &str) -> bool {
    matches!(
        name,
        "asset_base_url"
            | "asset_manifest_sha256"
            | "asset_version"
            | "qemu_user"
            | "memory_budget_mb"
            | "guest_ca_bundle"
            | "s3_bucket"
            | "s3_endpoint_url"
    )
}

/// The configuration the environment gives with `overrides` on top, validated, every field
/// resolved. Invalid values raise `InputValidationError` naming the field.
#[pyfunction]
pub(crate) fn resolve_config<'py>(overrides: &Bound<'py, PyDict>) -> PyResult<Bound<'py, PyDict>> {
    let mut config = SchedulerConfig::from_env()
        .map_err(|e| errors::sandbox_error(exec_sandbox::Error::Validation(e)))?;
    let idle = apply(&mut config, overrides)?;
    let dict = PyDict::new(overrides.py());
    fill(&config, &dict)?;
    dict.set_item(SESSION_IDLE_TIMEOUT, idle)?;
    Ok(dict)
}

/// The names of every configuration field.
#[pyfunction]
pub(crate) fn config_fields() -> Vec<&'static str> {
    FIELDS.to_vec()
}

/// The configuration a fully resolved dictionary (from [`resolve_config`]) describes.
pub(crate) fn from_resolved(resolved: &Bound<'_, PyDict>) -> PyResult<(SchedulerConfig, u64)> {
    let mut config = SchedulerConfig::default();
    let idle = apply(&mut config, resolved)?;
    Ok((config, idle))
}
