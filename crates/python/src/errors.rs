//! Every library error as the `exec_sandbox.exceptions` class it maps to.
//!
//! The mapping (documented in the package README) goes by variant where the reference has a
//! more precise class, else by [`ErrorKind`]. Each exception carries `message` (the whole cause
//! chain, and a `hint:` line when there is a fix to suggest) and `context`: `kind` (the stable
//! [`ErrorKind`]), `field` (for invalid input: the argument or configuration field at fault)
//! and `hint`.

use exec_sandbox::assets::AssetError;
use exec_sandbox::{Error, ErrorKind, FileError, SpecError, ValidationError, VmError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// The module that defines the exception classes.
const EXCEPTIONS: &str = "exec_sandbox.exceptions";

/// Where an error goes: the class name, and the input field at fault when there is one.
struct Target {
    class: &'static str,
    field: Option<String>,
}

fn target(class: &'static str) -> Target {
    Target { class, field: None }
}

fn invalid(class: &'static str, field: impl Into<String>) -> Target {
    Target {
        class,
        field: Some(field.into()),
    }
}

/// The class of an error of `kind` when nothing more precise applies.
fn by_kind(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidInput => "InputValidationError",
        ErrorKind::Transient => "TransientError",
        ErrorKind::OutcomeUnknown => "CommunicationOutcomeUnknownError",
        ErrorKind::Permanent => "PermanentError",
    }
}

fn validation_target(e: &ValidationError) -> Target {
    match e {
        ValidationError::EmptyCode
        | ValidationError::CodeTooLarge { .. }
        | ValidationError::CodeHasNul { .. } => invalid("CodeValidationError", "code"),
        ValidationError::Timeout { .. } => invalid("InputValidationError", "timeout_seconds"),
        ValidationError::Memory { .. } => invalid("InputValidationError", "memory_mb"),
        ValidationError::IdleTimeout { .. } => {
            invalid("InputValidationError", "idle_timeout_seconds")
        }
        ValidationError::TooManyEnvVars { .. } | ValidationError::EnvVar { .. } => {
            invalid("EnvVarValidationError", "env_vars")
        }
        ValidationError::GuestPath { .. } => invalid("InputValidationError", "path"),
        ValidationError::FileTooLarge { .. } => invalid("InputValidationError", "content"),
        ValidationError::Network { field, .. } | ValidationError::Config { field, .. } => {
            invalid("InputValidationError", *field)
        }
        _ => target("InputValidationError"),
    }
}

fn error_target(e: &Error) -> Target {
    match e {
        Error::Validation(v) => validation_target(v),
        Error::Asset(a) => target(match a {
            AssetError::NotFound { .. } | AssetError::MissingInput { .. } => "AssetNotFoundError",
            AssetError::Checksum { .. } | AssetError::ManifestPin { .. } => "AssetChecksumError",
            AssetError::Download { .. } => "AssetDownloadError",
            _ => "AssetError",
        }),
        Error::UntrustedCache(_) => target("VmConfigError"),
        Error::Boot(vm) => target(match vm {
            VmError::BootTimeout { .. } => "VmBootTimeoutError",
            VmError::ExitedDuringBoot { .. } => "VmQemuCrashError",
            VmError::Gateway { .. } => "VmGvproxyError",
            _ if vm.kind() == ErrorKind::Permanent => "VmDependencyError",
            _ => "VmTransientError",
        }),
        Error::Communication(_) => target("CommunicationOutcomeUnknownError"),
        Error::Capacity(_) => target("VmCapacityError"),
        Error::Guest { .. } => target("GuestAgentError"),
        Error::File { source, .. } => match source {
            FileError::Oversized => target("OutputLimitError"),
            FileError::Refused { .. } => invalid("InputValidationError", "path"),
            FileError::SizeMismatch { .. } => invalid("InputValidationError", "content"),
            other => target(by_kind(other.kind())),
        },
        Error::Network(_) => match e.kind() {
            ErrorKind::InvalidInput => invalid("InputValidationError", "expose_ports"),
            ErrorKind::Transient => target("VmGvproxyError"),
            kind => target(by_kind(kind)),
        },
        Error::PackageSpec { source, .. } => match **source {
            SpecError::NotAllowed { .. } => invalid("PackageNotAllowedError", "packages"),
            _ => invalid("InputValidationError", "packages"),
        },
        Error::Packages(_) => match e.kind() {
            ErrorKind::InvalidInput => invalid("InputValidationError", "packages"),
            kind => target(by_kind(kind)),
        },
        Error::SessionClosed { .. } => target("SessionClosedError"),
        _ => target(by_kind(e.kind())),
    }
}

/// `e` and its causes, `: `-separated (the form the CLI prints).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

/// The exception for a library error.
pub(crate) fn sandbox_error(e: Error) -> PyErr {
    let Target { class, field } = error_target(&e);
    let kind = e.kind();
    let hint = e.hint();
    let mut message = chain(&e);
    if let Some(hint) = &hint {
        message.push_str("\nhint: ");
        message.push_str(hint);
    }
    build(class, message, kind, field, hint)
}

/// An `InputValidationError` about `field`, raised before the library is called.
pub(crate) fn validation_error(field: &str, message: String) -> PyErr {
    build(
        "InputValidationError",
        message,
        ErrorKind::InvalidInput,
        Some(field.to_owned()),
        None,
    )
}

fn kind_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidInput => "invalid_input",
        ErrorKind::Transient => "transient",
        ErrorKind::OutcomeUnknown => "outcome_unknown",
        ErrorKind::Permanent => "permanent",
    }
}

fn build(
    class: &str,
    message: String,
    kind: ErrorKind,
    field: Option<String>,
    hint: Option<String>,
) -> PyErr {
    Python::attach(|py| {
        let made = (|| -> PyResult<PyErr> {
            let context = PyDict::new(py);
            context.set_item("kind", kind_name(kind))?;
            context.set_item("field", field)?;
            context.set_item("hint", hint)?;
            let class = py.import(EXCEPTIONS)?.getattr(class)?;
            Ok(PyErr::from_value(class.call1((message, context))?))
        })();
        // Building the exception failed (the module could not be imported): raise that.
        made.unwrap_or_else(|e| e)
    })
}
