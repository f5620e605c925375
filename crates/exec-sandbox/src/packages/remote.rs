//! L3: a shared store of built package layers that several hosts read and fill, behind a small
//! trait so the L2 cache does not know which store it talks to (`s3` implements it).
//!
//! Every failure is a [`RemoteError`]: the caller logs it as a warning and builds the layer
//! locally. A remote store never fails a run.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A store of layer cache entries shared between hosts.
pub(crate) trait RemoteLayers: Send + Sync {
    /// Downloads `key`'s `layer.erofs` and `manifest.json` into `dest_dir` (an empty temp dir the
    /// caller then verifies and publishes). `Ok(false)` when the store has no such entry.
    fn fetch(
        &self,
        key: &str,
        dest_dir: &Path,
    ) -> impl Future<Output = Result<bool, RemoteError>> + Send;

    /// Starts uploading the published entry at `layer_dir` in the background (bounded
    /// concurrency). Failures are logged, never returned.
    fn upload(&self, key: &str, layer_dir: &Path);
}

/// Why a remote store could not serve or take an entry.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RemoteError {
    /// The store refused the credentials or the request (HTTP 401/403).
    #[error("access to layer {key} in the remote store denied")]
    Denied {
        /// The layer's cache key.
        key: String,
        /// The store client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The store did not answer in time.
    #[error("remote store did not answer for layer {key} within {} s", .after.as_secs_f64())]
    Timeout {
        /// The layer's cache key.
        key: String,
        /// The deadline that passed.
        after: Duration,
    },
    /// The store is unreachable or failed the request.
    #[error("remote store failed for layer {key}")]
    Store {
        /// The layer's cache key.
        key: String,
        /// The store client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The stored entry does not match its manifest (or has none, or no layer).
    #[error("layer {key} in the remote store is corrupt: {reason}")]
    Corrupt {
        /// The layer's cache key.
        key: String,
        /// What did not match.
        reason: String,
    },
    /// A local file of the entry could not be read or written.
    #[error("layer {key}: {}", .path.display())]
    Io {
        /// The layer's cache key.
        key: String,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The key cannot name a remote object (a caller bug).
    #[error("layer key `{key}` is not a valid remote name")]
    InvalidKey {
        /// The key.
        key: String,
    },
}
