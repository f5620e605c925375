//! Why guest assets could not be readied, with the stable kind and a hint for each case.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;

use crate::env::EnvVars;
use crate::error_kind::ErrorKind;

/// Failure to ready guest assets.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AssetError {
    /// Assets are missing and the configuration forbids building or downloading them.
    #[error("guest assets {} are missing from {dir} and fetching them is disabled", missing.join(", "))]
    NotFound {
        /// File names of the missing assets.
        missing: Vec<String>,
        /// The version directory searched.
        dir: PathBuf,
    },
    /// An asset's content does not match the SHA-256 its manifest lists.
    #[error("checksum mismatch for {name} at {path}: expected sha256 {expected}, got {actual}")]
    Checksum {
        /// Asset name (`kernel`, `initramfs`, `rootfs-python`…).
        name: String,
        /// The file checked (for a download: where it would have been stored).
        path: PathBuf,
        /// SHA-256 listed in the manifest.
        expected: String,
        /// SHA-256 of the content found.
        actual: String,
        /// The URL the content came from, for a download.
        url: Option<String>,
    },
    /// A manifest is unreadable or lists something it must not.
    #[error("invalid asset manifest {location}: {reason}")]
    Manifest {
        /// Path or URL of the manifest.
        location: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An image build script failed.
    #[error("building {asset} failed ({status}); last lines of {}:\n{tail}", log.display())]
    Build {
        /// Asset being built.
        asset: String,
        /// How the script ended.
        status: ExitStatus,
        /// The full build log.
        log: PathBuf,
        /// The last lines of the log.
        tail: String,
    },
    /// An image build script succeeded but did not write the file it promises.
    #[error("building {asset} did not produce {}; see {}", missing.display(), log.display())]
    BuildOutput {
        /// Asset being built.
        asset: String,
        /// The file that should exist.
        missing: PathBuf,
        /// The full build log.
        log: PathBuf,
    },
    /// Building images needs root (the scripts install packages, run debootstrap and chroot).
    #[error("building {asset} needs root privileges")]
    NeedsRoot {
        /// Asset that would be built.
        asset: String,
    },
    /// This library was compiled without an image build input (a script missing from `images/`).
    #[error("this build of exec-sandbox does not embed images/{input}, needed to build {asset}")]
    MissingInput {
        /// Asset that would be built.
        asset: String,
        /// The missing file, relative to `images/`.
        input: &'static str,
    },
    /// Fetching a prebuilt asset or its manifest over HTTP failed.
    #[error("downloading {url} failed")]
    Download {
        /// What was being fetched.
        url: String,
        /// The transport or HTTP failure.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The configured asset version cannot name a directory.
    #[error("asset version `{version}` is not a valid name")]
    InvalidVersion {
        /// The configured version.
        version: String,
    },
    /// The server's manifest is not the one the operator pinned: nothing was installed.
    #[error("{url} has sha256 {actual}, not the pinned {expected}")]
    ManifestPin {
        /// The manifest's URL.
        url: String,
        /// The pinned SHA-256.
        expected: String,
        /// What the server sent.
        actual: String,
    },
    /// The asset base URL is not one assets may be downloaded from.
    #[error("cannot download assets from {url}: {reason}")]
    BaseUrl {
        /// The configured URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The images directory (or a build cache) could be changed by another user.
    #[error(transparent)]
    Untrusted(#[from] crate::trust::TrustError),
    /// A file system operation failed.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was being done (`create`, `read`, `rename into place`…).
        action: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl AssetError {
    /// Stable kind of the failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            // The network may come back: nothing ran, retrying is safe.
            AssetError::Download { .. } => ErrorKind::Transient,
            _ => ErrorKind::Permanent,
        }
    }

    /// What the user can do about it.
    pub fn hint(&self) -> Option<String> {
        match self {
            AssetError::NotFound { .. } => Some(format!(
                "run `sbx prefetch` (without {}=1) to build or download them",
                EnvVars::OFFLINE
            )),
            AssetError::Checksum { url: Some(url), .. } => Some(format!(
                "the server's file at {url} does not match its manifest: re-export that version \
                 on the server"
            )),
            AssetError::Checksum { path, .. } => Some(format!(
                "the file was modified or damaged: delete {} and run `sbx prefetch` to rebuild \
                 or re-download it",
                path.display()
            )),
            AssetError::Manifest { .. } => Some(
                "delete that version directory and run `sbx prefetch`, or check the server's \
                 export"
                    .into(),
            ),
            AssetError::Build { log, .. } | AssetError::BuildOutput { log, .. } => {
                Some(format!("the full build log is {}", log.display()))
            }
            AssetError::NeedsRoot { asset } if asset == "qemu" => Some(format!(
                "run `sudo -E sbx prefetch` once (it builds exec-sandbox's QEMU into this cache), \
                 or set {}=qemu-system-x86_64 to run the host's QEMU instead",
                EnvVars::QEMU
            )),
            AssetError::NeedsRoot { .. } => Some(format!(
                "run `sudo -E sbx prefetch` once (it installs build tools and builds the images \
                 into this cache), or set {} to download prebuilt assets",
                EnvVars::ASSET_BASE_URL
            )),
            AssetError::MissingInput { .. } => Some(
                "rebuild exec-sandbox from a checkout whose images/ directory is complete".into(),
            ),
            AssetError::Download { .. } => Some(format!(
                "check {} and the network, then retry",
                EnvVars::ASSET_BASE_URL
            )),
            AssetError::InvalidVersion { .. } => Some(format!(
                "set {} to a directory name (letters, digits, `-`, `_`, `.`)",
                EnvVars::ASSET_VERSION
            )),
            AssetError::ManifestPin { .. } => Some(format!(
                "the server is not serving the manifest you pinned: check the server, or update \
                 {} if that version was re-exported on purpose",
                EnvVars::ASSET_MANIFEST_SHA256
            )),
            AssetError::BaseUrl { .. } => Some(format!(
                "set {} to an https:// URL (plain http only to a loopback address)",
                EnvVars::ASSET_BASE_URL
            )),
            AssetError::Untrusted(e) => e.hint(),
            AssetError::Io { .. } => None,
        }
    }

    /// Maps an OS error of `action` on `path` (for `map_err`).
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| AssetError::Io {
            action,
            path,
            source,
        }
    }
}
