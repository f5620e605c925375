//! Why a package layer could not be readied, with the stable kind and a hint for each case.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::env::EnvVars;
use crate::error_kind::ErrorKind;

/// Failure to resolve, install, pack or cache the packages a run asked for.
///
/// What the user asked wrong (a version that does not exist, a package that cannot be installed
/// without running its code) is [`ErrorKind::InvalidInput`] and names the package; trouble
/// reaching the index is [`ErrorKind::Transient`]; a missing host tool is
/// [`ErrorKind::Permanent`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PackageError {
    /// The index does not know the package at all.
    #[error("package `{package}` is not on the package index")]
    UnknownPackage {
        /// The package name.
        package: String,
    },
    /// The package exists, the pinned version does not.
    #[error("{package} {version} does not exist{}", available_suffix(available))]
    VersionNotFound {
        /// The package name.
        package: String,
        /// The version asked for.
        version: String,
        /// Versions the index has (newest first, at most a few), when known.
        available: Vec<String>,
    },
    /// No version of the package satisfies a range (asked for, or a dependency's).
    #[error(
        "no version of {package} matches `{range}`{}{}",
        required_by.as_ref().map(|p| format!(" (required by {p})")).unwrap_or_default(),
        available_suffix(available)
    )]
    NoMatchingVersion {
        /// The package name.
        package: String,
        /// The range, in the ecosystem's syntax.
        range: String,
        /// The package whose dependency this is, when it is not a requested one.
        required_by: Option<String>,
        /// Versions the index has, when known.
        available: Vec<String>,
    },
    /// A Python package has no wheel the guest can use (`sdist_only`: only source
    /// distributions, whose build would run the package's code).
    #[error(
        "{package}{} has no binary wheel for CPython {python} on manylinux_{} x86_64{}{}",
        version.as_ref().map(|v| format!(" {v}")).unwrap_or_default(),
        glibc.replace('.', "_"),
        if *sdist_only { "; only source distributions" } else { "" },
        required_by.as_ref().map(|p| format!(" (required by {p})")).unwrap_or_default()
    )]
    NoWheel {
        /// The package name.
        package: String,
        /// The version, when one was pinned.
        version: Option<String>,
        /// The guest's CPython version (`3.11`).
        python: String,
        /// The guest's glibc version (`2.36`).
        glibc: String,
        /// Whether the index has source distributions of it (and nothing the guest can use).
        sdist_only: bool,
        /// The package whose dependency this is, when it is not a requested one.
        required_by: Option<String>,
    },
    /// An npm package needs an install script, and scripts never run.
    #[error("{package} {version} needs its {reason}, and packages are installed with scripts off")]
    InstallScript {
        /// The package name.
        package: String,
        /// Its version.
        version: String,
        /// What needs to run (`install script`, `native addon build (binding.gyp)`…).
        reason: String,
    },
    /// The requested versions cannot be installed together.
    #[error(
        "the requested packages have conflicting dependencies{}",
        detail_suffix(detail)
    )]
    Conflict {
        /// The tool's explanation (which package needs what), possibly empty.
        detail: String,
    },
    /// The package index could not be reached or answered with a server error.
    #[error("{tool} could not reach the package index{}", detail_suffix(detail))]
    IndexUnavailable {
        /// `pip` or `npm`.
        tool: &'static str,
        /// The tool's last words about it.
        detail: String,
    },
    /// A tool ran past its deadline and was killed.
    #[error("{tool} did not finish within {} s", deadline.as_secs())]
    Timeout {
        /// The tool.
        tool: &'static str,
        /// Its deadline.
        deadline: Duration,
    },
    /// A host tool the pipeline needs is not installed.
    #[error("{tool} is not installed on this host")]
    ToolMissing {
        /// `pip`, `npm`, `mkfs.erofs`…
        tool: &'static str,
        /// The program that was looked for.
        program: PathBuf,
    },
    /// A tool failed in a way not recognised above.
    #[error("{tool} failed ({status}); last lines:\n{tail}")]
    ToolFailed {
        /// The tool.
        tool: &'static str,
        /// How it ended.
        status: String,
        /// The end of its error output.
        tail: String,
    },
    /// A tool succeeded but its output is not what it promises.
    #[error("unexpected output from {tool}: {reason}")]
    ToolOutput {
        /// The tool.
        tool: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The layer is not cached (or a range not resolved recently) and the configuration
    /// forbids contacting the index.
    #[error("{what} is not cached and fetching packages is disabled")]
    Offline {
        /// What would have been fetched.
        what: String,
    },
    /// The guest image does not say what the packages must be built for.
    #[error("cannot tell which interpreter the {language} image has: {reason}")]
    Target {
        /// The language.
        language: String,
        /// What is missing.
        reason: String,
    },
    /// The package cache directory could be changed by another user.
    #[error(transparent)]
    Untrusted(#[from] crate::trust::TrustError),
    /// A file system operation failed.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

fn available_suffix(available: &[String]) -> String {
    const SHOWN: usize = 8;
    match available.len() {
        0 => String::new(),
        n if n <= SHOWN => format!("; available: {}", available.join(", ")),
        n => format!(
            "; available: {} and {} more",
            available[..SHOWN].join(", "),
            n - SHOWN
        ),
    }
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

impl PackageError {
    /// Stable kind of the failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            PackageError::UnknownPackage { .. }
            | PackageError::VersionNotFound { .. }
            | PackageError::NoMatchingVersion { .. }
            | PackageError::NoWheel { .. }
            | PackageError::InstallScript { .. }
            | PackageError::Conflict { .. } => ErrorKind::InvalidInput,
            PackageError::IndexUnavailable { .. } | PackageError::Timeout { .. } => {
                ErrorKind::Transient
            }
            PackageError::ToolMissing { .. }
            | PackageError::ToolFailed { .. }
            | PackageError::ToolOutput { .. }
            | PackageError::Offline { .. }
            | PackageError::Target { .. }
            | PackageError::Untrusted(_)
            | PackageError::Io { .. } => ErrorKind::Permanent,
        }
    }

    /// What the user can do about it.
    pub fn hint(&self) -> Option<String> {
        match self {
            PackageError::UnknownPackage { .. } => Some("check the package name's spelling".into()),
            PackageError::VersionNotFound { .. } | PackageError::NoMatchingVersion { .. } => {
                Some("pick a version the index has".into())
            }
            PackageError::NoWheel { .. } => Some(
                "pick a version that publishes manylinux wheels for this CPython, or a \
                 pure-Python alternative: source distributions are never built (that would run \
                 the package's code)"
                    .into(),
            ),
            PackageError::InstallScript { .. } => Some(
                "choose a package (or version) that works without install scripts, such as a \
                 pure-JavaScript alternative"
                    .into(),
            ),
            PackageError::Conflict { .. } => Some("loosen or change the requested versions".into()),
            PackageError::IndexUnavailable { tool, .. } => Some(format!(
                "check the network and {}, then retry",
                match *tool {
                    "npm" => "the host's npm registry (`npm config get registry`)",
                    _ => "the host's pip configuration (pip.conf, PIP_INDEX_URL)",
                }
            )),
            PackageError::Timeout { .. } => Some("retry; a slow index may need another try".into()),
            PackageError::ToolMissing { tool, .. } => Some(match *tool {
                "pip" => {
                    "install pip for the host's python3 (`apt-get install python3-pip`)".into()
                }
                "python3" => "install Python 3 (`apt-get install python3 python3-pip`)".into(),
                "npm" => "install npm (`apt-get install npm`)".into(),
                "mkfs.erofs" => "install erofs-utils (`apt-get install erofs-utils`), or run \
                                 `sudo -E sbx prefetch` once"
                    .into(),
                other => format!("install {other}"),
            }),
            PackageError::Offline { .. } => Some(format!(
                "run once without {}=1 (or `sbx prefetch` with the same packages) to fetch them",
                EnvVars::OFFLINE
            )),
            PackageError::Target { .. } => {
                Some("run `sbx prefetch` to rebuild the guest images".into())
            }
            PackageError::Untrusted(e) => e.hint(),
            PackageError::ToolFailed { .. }
            | PackageError::ToolOutput { .. }
            | PackageError::Io { .. } => None,
        }
    }

    /// Maps an OS error of `action` on `path` (for `map_err`).
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| PackageError::Io {
            action,
            path,
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_package_and_kinds_follow_the_rule() {
        let no_wheel = PackageError::NoWheel {
            package: "sbxsrc".into(),
            version: Some("1.0".into()),
            python: "3.11".into(),
            glibc: "2.36".into(),
            sdist_only: true,
            required_by: None,
        };
        assert_eq!(
            no_wheel.to_string(),
            "sbxsrc 1.0 has no binary wheel for CPython 3.11 on manylinux_2_36 x86_64; only \
             source distributions"
        );
        assert_eq!(no_wheel.kind(), ErrorKind::InvalidInput);
        let missing = PackageError::VersionNotFound {
            package: "sbxdemo".into(),
            version: "9.9".into(),
            available: (0..10).map(|i| format!("1.{i}")).collect(),
        };
        assert_eq!(
            missing.to_string(),
            "sbxdemo 9.9 does not exist; available: 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7 and 2 more"
        );
        let down = PackageError::IndexUnavailable {
            tool: "npm",
            detail: String::new(),
        };
        assert_eq!(down.kind(), ErrorKind::Transient);
        assert!(down.hint().unwrap().contains("npm config get registry"));
        let tool = PackageError::ToolMissing {
            tool: "mkfs.erofs",
            program: "mkfs.erofs".into(),
        };
        assert_eq!(tool.kind(), ErrorKind::Permanent);
        assert!(tool.hint().unwrap().contains("erofs-utils"));
    }
}
