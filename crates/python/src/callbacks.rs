//! Output callbacks: the Rust side of a Python `on_stdout` / `on_stderr` / `on_boot_log`.
//!
//! The library calls an [`OutputCallback`] on one of its own threads. The callable the Python
//! half hands in here never runs user code: it only schedules the user's callback on the
//! caller's event loop (`loop.call_soon_threadsafe`), so user code always runs on that loop.

use std::sync::Arc;

use exec_sandbox::OutputCallback;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// Wraps a Python callable taking `bytes` as a library output callback.
pub(crate) fn output_callback(deliver: Option<Py<PyAny>>) -> Option<OutputCallback> {
    let deliver = deliver?;
    Some(Arc::new(move |chunk: &[u8]| {
        Python::attach(|py| {
            if let Err(e) = deliver.call1(py, (PyBytes::new(py, chunk),)) {
                // Only scheduling can fail here (the loop is closed): Python reports it.
                e.write_unraisable(py, None);
            }
        });
    }))
}
