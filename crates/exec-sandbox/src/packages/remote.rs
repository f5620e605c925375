//! The seam to the L3 copy of the layers (S3 or compatible): what the L2 cache asks of it.
//!
//! The L3 implementation only moves files. Everything it brings back is checked by the L2
//! cache (manifest for the right key, target and pins; image against its sha256) before use,
//! and a remote that fails, denies or serves garbage only costs a warning and a local build.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;

/// A boxed future, so that the trait stays usable as `dyn RemoteLayers`.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Failure of the remote store. Never fails a run: the layer is built locally instead.
#[derive(Debug, thiserror::Error)]
#[cfg_attr(
    not(test),
    expect(dead_code, reason = "the S3 implementation constructs these")
)]
pub(crate) enum RemoteError {
    /// The store could not be reached, refused, or failed.
    #[error("the remote layer store failed to {op} {key}")]
    Store {
        /// `fetch` or `upload`.
        op: &'static str,
        /// The layer's key.
        key: String,
        /// The client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Writing the downloaded files failed.
    #[error("cannot write {}", path.display())]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

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
