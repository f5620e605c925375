//! The public error type and its stable kinds.

use crate::admission::CapacityError;
use crate::assets::AssetError;
pub use crate::error_kind::ErrorKind;
use crate::session::SessionCloseReason;
use crate::validate::ValidationError;
use crate::vm::VmError;

/// Everything [`Scheduler`](crate::Scheduler) operations can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request was rejected before any VM booted.
    #[error("invalid input")]
    Validation(#[from] ValidationError),
    /// Guest images could not be readied.
    #[error("guest assets unavailable")]
    Asset(#[from] AssetError),
    /// A cache directory could be changed by another user: refused before anything was read
    /// from it (see [`SchedulerConfig::cache_dir`](crate::SchedulerConfig::cache_dir)).
    #[error("cache directory refused")]
    UntrustedCache(#[from] crate::TrustError),
    /// The VM did not boot or its agent did not answer; the code never ran.
    #[error("sandbox VM failed before the code ran")]
    Boot(#[source] VmError),
    /// Contact with the VM was lost after the code was dispatched.
    #[error("lost contact with the sandbox VM after the code was dispatched")]
    Communication(#[source] VmError),
    /// No VM could be admitted before the admission deadline; the code never ran.
    #[error("sandbox host at capacity")]
    Capacity(#[from] CapacityError),
    /// The guest agent refused or failed the request.
    #[error("guest agent error ({kind}): {message}")]
    Guest {
        /// The agent's classification.
        kind: sbx_protocol::GuestErrorKind,
        /// The agent's message.
        message: String,
    },
    /// A file operation in a VM failed.
    #[error("cannot {op} file `{path}` in the sandbox")]
    File {
        /// `write`, `read` or `list`.
        op: &'static str,
        /// The path in the sandbox (truncated to 256 characters).
        path: String,
        /// What went wrong.
        #[source]
        source: crate::files::FileError,
    },
    /// The VM's network gateway could not start (a forwarded host port is taken, say); no VM
    /// was booted.
    #[error("cannot set up the sandbox network")]
    Network(#[from] crate::gateway::GatewayError),
    /// A requested package spec broke a rule (syntax, limits, the allowlist); nothing ran.
    #[error("invalid package request")]
    PackageSpec {
        /// The rule broken.
        #[source]
        source: Box<crate::packages::SpecError>,
        /// For a spec without a version: the newest version the index has, when it could be
        /// asked.
        newest: Option<String>,
    },
    /// The requested packages could not be resolved, installed or cached; no VM was booted.
    #[error("cannot ready the requested packages")]
    Packages(#[source] Box<crate::packages::PackageError>),
    /// The session is closed; it runs nothing more. Open a new one.
    #[error("session is closed: {reason}")]
    SessionClosed {
        /// Why it closed.
        reason: SessionCloseReason,
    },
}

impl Error {
    /// The stable kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Validation(_) => ErrorKind::InvalidInput,
            Error::Asset(e) => e.kind(),
            Error::UntrustedCache(e) => e.kind(),
            Error::Boot(e) => e.kind(),
            Error::Communication(_) => ErrorKind::OutcomeUnknown,
            Error::Capacity(_) => ErrorKind::Transient,
            Error::SessionClosed { .. } => ErrorKind::Permanent,
            Error::Network(e) => e.kind(),
            Error::PackageSpec { .. } => ErrorKind::InvalidInput,
            Error::Packages(e) => e.kind(),
            Error::File { source, .. } => source.kind(),
            Error::Guest { kind, .. } => match kind {
                sbx_protocol::GuestErrorKind::InvalidRequest => ErrorKind::InvalidInput,
                sbx_protocol::GuestErrorKind::InterpreterStart => ErrorKind::Transient,
                sbx_protocol::GuestErrorKind::Internal => ErrorKind::OutcomeUnknown,
            },
        }
    }

    /// A suggestion for the user, when there is an obvious fix.
    pub fn hint(&self) -> Option<String> {
        match self {
            Error::Asset(e) => e.hint(),
            Error::UntrustedCache(e) => e.hint(),
            Error::Boot(e) => e.hint(),
            Error::Capacity(_) => Some(
                "retry later, or raise the budget (EXEC_SANDBOX_MEMORY_BUDGET_MB, EXEC_SANDBOX_CPU_OVERCOMMIT_RATIO) or EXEC_SANDBOX_ADMISSION_TIMEOUT_SECONDS".into(),
            ),
            Error::SessionClosed { .. } => Some("open a new session".into()),
            Error::PackageSpec {
                source,
                newest: Some(newest),
            } => source.hint_with_newest(newest),
            Error::PackageSpec { source, .. } => source.hint(),
            Error::Packages(e) => e.hint(),
            Error::Network(crate::gateway::GatewayError::Bind { .. }) => {
                Some("choose another host port, or 0 for any free one".into())
            }
            _ => None,
        }
    }
}

impl From<crate::packages::PackageError> for Error {
    fn from(e: crate::packages::PackageError) -> Self {
        Error::Packages(Box::new(e))
    }
}
