//! L3: a shared store of built package layers that several hosts read and fill, behind a small
//! trait so the L2 cache does not know which store it talks to (`s3` implements it).
//!
//! The store only moves files. Everything it brings back is checked by the L2 cache (manifest
//! for the right key, target and pins; image against its sha256) before use, and every failure
//! is a [`RemoteError`] that costs a warning and a local build: a remote store never fails a
//! run.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

/// A boxed future, so that the trait stays usable as `dyn RemoteLayers`.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where built layers are shared between hosts (L3).
pub(crate) trait RemoteLayers: Send + Sync + std::fmt::Debug {
    /// Downloads the layer `key` (`layer.erofs` and `manifest.json`) into `dest_dir`, an empty
    /// directory on the cache's file system. `Ok(false)` when the store does not have it. The
    /// cache verifies what arrived and publishes it; a partial or corrupt download is simply
    /// discarded.
    fn fetch<'a>(
        &'a self,
        key: &'a str,
        dest_dir: &'a Path,
    ) -> BoxFuture<'a, Result<bool, RemoteError>>;

    /// Starts uploading the published layer in `layer_dir` (`layer.erofs`, `manifest.json`)
    /// under `key`, in the background with bounded concurrency, and returns at once. The files
    /// are never modified, but the entry may be evicted meanwhile: open them before returning,
    /// or give up quietly when they are gone. Failures are logged, never reported.
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
