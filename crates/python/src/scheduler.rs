//! `Scheduler`: runs and sessions, as asyncio awaitables.

use exec_sandbox::{
    ExecutionResult, ExposePort, Language, NetworkOptions, PortProtocol, RunOptions, Scheduler,
    SessionOptions,
};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use pyo3_async_runtimes::tokio::future_into_py;

use crate::callbacks::output_callback;
use crate::session::NativeSession;
use crate::{config, errors};

/// One library scheduler; the Python `Scheduler` owns it between `__aenter__` and `__aexit__`.
#[pyclass(frozen, module = "exec_sandbox._native")]
pub(crate) struct NativeScheduler {
    inner: Scheduler,
    idle_timeout_seconds: u64,
}

/// A language name as the library's [`Language`].
pub(crate) fn language(name: &str) -> PyResult<Language> {
    Language::ALL
        .into_iter()
        .find(|l| l.as_str() == name)
        .ok_or_else(|| {
            errors::validation_error(
                "language",
                format!("language: `{name}` is not one of python, javascript, raw"),
            )
        })
}

/// An integer argument in the range of `T`, or an `InputValidationError` naming it.
pub(crate) fn in_range<T: TryFrom<i64>>(field: &str, value: i64) -> PyResult<T> {
    T::try_from(value)
        .map_err(|_| errors::validation_error(field, format!("{field} is {value}, out of range")))
}

/// The network part of a run or session: ports arrive as `(internal, external, protocol)`.
pub(crate) fn network(
    allow_network: bool,
    allowed_domains: Option<Vec<String>>,
    expose_ports: Vec<(i64, Option<i64>, String)>,
) -> PyResult<NetworkOptions> {
    let mut network = NetworkOptions::default();
    network.allow_network = allow_network;
    network.allowed_domains = allowed_domains;
    for (internal, external, protocol) in expose_ports {
        let field = "expose_ports";
        let protocol = match protocol.as_str() {
            "tcp" => PortProtocol::Tcp,
            "udp" => PortProtocol::Udp,
            other => {
                return Err(errors::validation_error(
                    field,
                    format!("{field}: protocol `{other}` is not tcp or udp"),
                ));
            }
        };
        let internal: u16 = in_range(field, internal)?;
        let external: Option<u16> = external.map(|e| in_range(field, e)).transpose()?;
        network.expose_ports.push(ExposePort {
            internal,
            external: external.filter(|&e| e != 0),
            protocol,
        });
    }
    Ok(network)
}

/// A result as the JSON the Python half turns into an `ExecutionResult`.
pub(crate) fn result_json(result: &ExecutionResult) -> PyResult<String> {
    serde_json::to_string(result).map_err(|e| {
        pyo3::exceptions::PyRuntimeError::new_err(format!("cannot encode the result: {e}"))
    })
}

#[pymethods]
impl NativeScheduler {
    /// A scheduler for the configuration `resolved` (every field, from `resolve_config`).
    #[new]
    fn new(resolved: &Bound<'_, PyDict>) -> PyResult<Self> {
        let (config, idle_timeout_seconds) = config::from_resolved(resolved)?;
        // Inside the runtime, so that the warm pool starts filling at once.
        let _runtime = pyo3_async_runtimes::tokio::get_runtime().enter();
        let inner = Scheduler::new(config).map_err(errors::sandbox_error)?;
        Ok(Self {
            inner,
            idle_timeout_seconds,
        })
    }

    /// Runs code in a fresh VM; resolves to the result as JSON.
    #[pyo3(signature = (
        language, code, *, timeout_seconds=None, memory_mb=None, env_vars=Vec::new(),
        packages=Vec::new(), allow_network=false, allowed_domains=None, expose_ports=Vec::new(),
        on_stdout=None, on_stderr=None, on_boot_log=None
    ))]
    #[expect(
        clippy::too_many_arguments,
        reason = "the reference's keyword arguments"
    )]
    fn run<'py>(
        &self,
        py: Python<'py>,
        language: &str,
        code: String,
        timeout_seconds: Option<i64>,
        memory_mb: Option<i64>,
        env_vars: Vec<(String, String)>,
        packages: Vec<String>,
        allow_network: bool,
        allowed_domains: Option<Vec<String>>,
        expose_ports: Vec<(i64, Option<i64>, String)>,
        on_stdout: Option<Py<PyAny>>,
        on_stderr: Option<Py<PyAny>>,
        on_boot_log: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mut options = RunOptions::new(self::language(language)?, code);
        options.timeout_seconds = timeout_seconds
            .map(|t| in_range("timeout_seconds", t))
            .transpose()?;
        options.memory_mb = memory_mb.map(|m| in_range("memory_mb", m)).transpose()?;
        options.env_vars = env_vars;
        options.packages = packages;
        options.network = network(allow_network, allowed_domains, expose_ports)?;
        options.on_stdout = output_callback(on_stdout);
        options.on_stderr = output_callback(on_stderr);
        options.on_boot_log = output_callback(on_boot_log);
        let scheduler = self.inner.clone();
        future_into_py(py, async move {
            let result = scheduler
                .run(options)
                .await
                .map_err(errors::sandbox_error)?;
            result_json(&result)
        })
    }

    /// Opens a session; resolves to a `NativeSession`.
    #[pyo3(signature = (
        language, *, packages=Vec::new(), memory_mb=None, allow_network=false,
        allowed_domains=None, expose_ports=Vec::new(), env_vars=Vec::new(),
        idle_timeout_seconds=None
    ))]
    #[expect(
        clippy::too_many_arguments,
        reason = "the reference's keyword arguments"
    )]
    fn session<'py>(
        &self,
        py: Python<'py>,
        language: &str,
        packages: Vec<String>,
        memory_mb: Option<i64>,
        allow_network: bool,
        allowed_domains: Option<Vec<String>>,
        expose_ports: Vec<(i64, Option<i64>, String)>,
        env_vars: Vec<(String, String)>,
        idle_timeout_seconds: Option<i64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mut options = SessionOptions::new(self::language(language)?);
        options.packages = packages;
        options.memory_mb = memory_mb.map(|m| in_range("memory_mb", m)).transpose()?;
        options.network = network(allow_network, allowed_domains, expose_ports)?;
        options.env_vars = env_vars;
        options.idle_timeout_seconds = match idle_timeout_seconds {
            Some(seconds) => in_range("idle_timeout_seconds", seconds)?,
            None => self.idle_timeout_seconds,
        };
        let scheduler = self.inner.clone();
        future_into_py(py, async move {
            let session = scheduler
                .session(options)
                .await
                .map_err(errors::sandbox_error)?;
            Ok(NativeSession::new(session))
        })
    }

    /// Destroys the idle warm VMs and stops refilling the pool.
    fn shutdown<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let scheduler = self.inner.clone();
        future_into_py(py, async move {
            scheduler.shutdown().await;
            Ok(())
        })
    }

    /// The names of the idle VMs in the warm pool.
    fn warm_pool_vms(&self) -> Vec<String> {
        self.inner
            .warm_pool_vms()
            .into_iter()
            .map(|vm| vm.name)
            .collect()
    }
}
