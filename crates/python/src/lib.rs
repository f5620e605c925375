//! The native half of the `exec_sandbox` Python package (`exec_sandbox._native`).
//!
//! A thin layer over the [`exec_sandbox`] library: the Python half (in `python/exec_sandbox/`)
//! owns the public API, its names, keyword arguments, data classes and callbacks; this module
//! turns its calls into [`exec_sandbox::Scheduler`] and [`exec_sandbox::Session`] calls, their
//! futures into asyncio awaitables (pyo3-async-runtimes on a tokio runtime of its own), their
//! results into JSON the Python half turns into immutable objects, and every
//! [`exec_sandbox::Error`] into the matching `exec_sandbox.exceptions` class.
//!
//! Nothing here panics across the FFI boundary: every fallible step returns a `PyErr`.
//! Dropping an awaitable's Rust future (the awaiting task was cancelled) drops the VM it holds,
//! which kills its QEMU process.

mod callbacks;
mod config;
mod errors;
mod scheduler;
mod session;

use pyo3::prelude::*;

/// The extension module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<scheduler::NativeScheduler>()?;
    m.add_class::<session::NativeSession>()?;
    m.add_function(wrap_pyfunction!(config::resolve_config, m)?)?;
    m.add_function(wrap_pyfunction!(config::config_fields, m)?)?;
    m.add("MAX_FILE_BYTES", exec_sandbox::limits::MAX_FILE_BYTES)?;
    Ok(())
}
