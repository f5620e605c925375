//! `Session`: one VM kept across executions, its files, as asyncio awaitables.

use std::path::PathBuf;
use std::sync::Arc;

use exec_sandbox::{ExecOptions, Session};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use pyo3_async_runtimes::tokio::future_into_py;

use crate::callbacks::output_callback;
use crate::errors;
use crate::scheduler::{in_range, result_json};

/// An open session; dropping the last reference destroys its VM.
#[pyclass(frozen, module = "exec_sandbox._native")]
pub(crate) struct NativeSession {
    inner: Arc<Session>,
}

impl NativeSession {
    pub(crate) fn new(session: Session) -> Self {
        Self {
            inner: Arc::new(session),
        }
    }
}

/// A local file could not be used: the matching Python `OSError` naming the path.
fn local_error(path: &std::path::Path, e: std::io::Error) -> PyErr {
    let err = PyErr::from(e);
    Python::attach(|py| {
        let note = format!("local file {}", path.display());
        // Best effort: the note only adds the path to the message.
        let _ = err.value(py).call_method1("add_note", (note,));
    });
    err
}

#[pymethods]
impl NativeSession {
    /// Runs code in the session's interpreter; resolves to the result as JSON.
    #[pyo3(signature = (code, *, timeout_seconds=None, env_vars=Vec::new(), on_stdout=None, on_stderr=None))]
    fn exec<'py>(
        &self,
        py: Python<'py>,
        code: String,
        timeout_seconds: Option<i64>,
        env_vars: Vec<(String, String)>,
        on_stdout: Option<Py<PyAny>>,
        on_stderr: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mut options = ExecOptions::new(code);
        options.timeout_seconds = timeout_seconds
            .map(|t| in_range("timeout_seconds", t))
            .transpose()?;
        options.env_vars = env_vars;
        options.on_stdout = output_callback(on_stdout);
        options.on_stderr = output_callback(on_stderr);
        let session = self.inner.clone();
        future_into_py(py, async move {
            let result = session.exec(options).await.map_err(errors::sandbox_error)?;
            result_json(&result)
        })
    }

    /// Writes `data`, or the local file `source`, to `path` in the sandbox; resolves to the
    /// bytes written.
    #[pyo3(signature = (path, *, data=None, source=None, make_executable=false))]
    fn write_file<'py>(
        &self,
        py: Python<'py>,
        path: String,
        data: Option<Vec<u8>>,
        source: Option<PathBuf>,
        make_executable: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let session = self.inner.clone();
        future_into_py(py, async move {
            let written = match (data, source) {
                (Some(data), None) => {
                    let size = data.len() as u64;
                    session
                        .write_file(&path, data.as_slice(), Some(size), make_executable)
                        .await
                }
                (None, Some(source)) => {
                    let file = tokio::fs::File::open(&source)
                        .await
                        .map_err(|e| local_error(&source, e))?;
                    let size = file
                        .metadata()
                        .await
                        .map_err(|e| local_error(&source, e))?
                        .len();
                    session
                        .write_file(&path, file, Some(size), make_executable)
                        .await
                }
                _ => {
                    return Err(pyo3::exceptions::PyTypeError::new_err(
                        "write_file takes exactly one of data and source",
                    ));
                }
            };
            written.map_err(errors::sandbox_error)
        })
    }

    /// Reads `path` from the sandbox: into the local file `destination` (written whole or not
    /// at all; resolves to the bytes read), else resolves to its content as `bytes`.
    #[pyo3(signature = (path, *, destination=None))]
    fn read_file<'py>(
        &self,
        py: Python<'py>,
        path: String,
        destination: Option<PathBuf>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let session = self.inner.clone();
        future_into_py(py, async move {
            let Some(destination) = destination else {
                let mut content = Vec::new();
                session
                    .read_file(&path, &mut content)
                    .await
                    .map_err(errors::sandbox_error)?;
                return Python::attach(|py| Ok(PyBytes::new(py, &content).into_any().unbind()));
            };
            // A temporary file beside the destination, renamed over it once complete: a failed
            // read leaves the destination as it was.
            let dir = match destination.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let partial =
                tempfile::NamedTempFile::new_in(&dir).map_err(|e| local_error(&destination, e))?;
            let file = partial.reopen().map_err(|e| local_error(&destination, e))?;
            let mut file = tokio::fs::File::from_std(file);
            let read = session
                .read_file(&path, &mut file)
                .await
                .map_err(errors::sandbox_error)?;
            tokio::io::AsyncWriteExt::flush(&mut file)
                .await
                .map_err(|e| local_error(&destination, e))?;
            drop(file);
            partial
                .persist(&destination)
                .map_err(|e| local_error(&destination, e.error))?;
            Python::attach(|py| Ok(read.into_pyobject(py)?.into_any().unbind()))
        })
    }

    /// Lists a directory; resolves to `(name, is_dir, size)` tuples.
    #[pyo3(signature = (path=String::new()))]
    fn list_files<'py>(&self, py: Python<'py>, path: String) -> PyResult<Bound<'py, PyAny>> {
        let session = self.inner.clone();
        future_into_py(py, async move {
            let entries = session
                .list_files(&path)
                .await
                .map_err(errors::sandbox_error)?;
            Ok(entries
                .into_iter()
                .map(|e| (e.name, e.is_dir, e.size))
                .collect::<Vec<_>>())
        })
    }

    /// Closes the session and destroys its VM (after the operations in progress).
    fn close<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let session = self.inner.clone();
        future_into_py(py, async move {
            session.close().await;
            Ok(())
        })
    }

    /// Executions that returned a result.
    #[getter]
    fn exec_count(&self) -> u64 {
        self.inner.exec_count()
    }

    /// Why the session closed, or `None` while it is open.
    #[getter]
    fn close_reason(&self) -> Option<String> {
        self.inner.close_reason().map(|r| r.to_string())
    }

    /// The session's forwarded ports as JSON.
    #[getter]
    fn exposed_ports(&self) -> PyResult<String> {
        serde_json::to_string(self.inner.exposed_ports()).map_err(|e| {
            pyo3::exceptions::PyRuntimeError::new_err(format!("cannot encode the ports: {e}"))
        })
    }

    /// The interpreter.
    #[getter]
    fn language(&self) -> &'static str {
        self.inner.language().as_str()
    }

    /// The VM's name (QEMU's `-name`).
    #[getter]
    fn vm_name(&self) -> String {
        self.inner.vm_name().to_owned()
    }
}
