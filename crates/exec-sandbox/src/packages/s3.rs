//! L3: package layers shared through S3 or an S3-compatible store, with `object_store`.
//!
//! An entry `<prefix><key>/` holds `layer.erofs.zst` (the layer image, zstd-compressed) and
//! `manifest.json` (the L2 entry's manifest, byte for byte). The manifest goes up last, so a
//! reader that sees it sees a whole entry. A fetch reads the manifest first (none: a miss), then
//! streams the layer through the decompressor to disk, never past the manifest's size, and checks
//! the manifest's sha256. Uploads run in the background, a few at a time, and skip entries the
//! store already has.
//!
//! Credentials come the standard AWS way through `object_store`'s builder, from the environment
//! only (never `~/.aws` files), first match wins: static keys ([`CREDENTIAL_VARS`]), web identity
//! (`AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN`, as EKS IRSA sets them), the ECS task role
//! (`AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`), EKS Pod Identity
//! (`AWS_CONTAINER_CREDENTIALS_FULL_URI` + `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`), then the EC2
//! instance role from instance metadata (IMDSv2).

use std::collections::HashSet;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
    WriteMultipart,
};
use tokio::sync::{Semaphore, mpsc};

use super::remote::{BoxFuture, RemoteError, RemoteLayers};
use crate::limits;

mod config;
#[cfg(test)]
pub(crate) mod moto;
mod stream;
#[cfg(test)]
mod tests;

pub(crate) use config::{S3Config, S3SetupError, S3Timeouts, is_loopback, normalize_prefix};
use stream::{LayerDigest, compress_from, decompress_into};

/// The layer image in an entry directory (the L2 cache's name for it).
const LAYER_FILE: &str = "layer.erofs";
/// The manifest in an entry directory (the L2 cache's name for it).
const MANIFEST_FILE: &str = "manifest.json";
/// The compressed layer's object name under `<prefix><key>/`.
const LAYER_OBJECT: &str = "layer.erofs.zst";
/// The manifest's object name under `<prefix><key>/`.
const MANIFEST_OBJECT: &str = "manifest.json";
/// Chunks (of about a MiB) queued between the network and the (de)compressing thread.
const CHUNKS_QUEUED: usize = 4;
/// Retries of a failed request (connection refused, 5xx), within its deadline.
const MAX_RETRIES: usize = 2;
/// Keys remembered as corrupt in the store, so that their next upload overwrites them.
const MAX_CORRUPT_KEYS: usize = 1024;

/// The environment variables credentials are read from: the AWS SDKs' names (`object_store`
/// reads nothing else). Endpoint, region and bucket come from [`S3Config`] only.
pub(crate) const CREDENTIAL_VARS: [&str; 12] = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_ENDPOINT_URL_STS",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_METADATA_ENDPOINT",
    "AWS_IMDSV1_FALLBACK",
];

/// A cache key usable in an object name: 1-128 of `[A-Za-z0-9._-]`, not starting with `.`.
fn valid_key(key: &str) -> bool {
    (1..=128).contains(&key.len())
        && !key.starts_with('.')
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// What the background uploads did so far.
#[cfg(test)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct UploadStats {
    /// Entries uploaded.
    pub uploaded: u64,
    /// Entries the store already had.
    pub skipped: u64,
    /// Uploads that failed (logged).
    pub failed: u64,
    /// Of the uploaded entries, those sent as multipart uploads.
    pub multipart: u64,
    /// Most uploads ever in flight at once.
    pub peak_in_flight: usize,
}

#[derive(Debug, Default)]
struct Counters {
    uploaded: AtomicU64,
    skipped: AtomicU64,
    failed: AtomicU64,
    multipart: AtomicU64,
    in_flight: AtomicUsize,
    peak_in_flight: AtomicUsize,
}

/// How an upload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Uploaded {
    /// The store had the entry.
    Skipped,
    /// Sent in one request.
    Single,
    /// Sent as a multipart upload.
    Multipart,
}

/// The L3 store: an S3 bucket and prefix.
pub(crate) struct S3Layers {
    shared: Arc<Shared>,
    uploads: crate::background::Background,
}

struct Shared {
    /// Small requests: lookups, manifests, one-request layers and multipart parts, each bounded
    /// by the request deadline.
    store: Arc<dyn ObjectStore>,
    /// Layer downloads: no overall client deadline (ours scales with the size), an idle one.
    bulk: Arc<dyn ObjectStore>,
    prefix: String,
    timeouts: S3Timeouts,
    slots: Semaphore,
    counters: Counters,
    /// Keys whose stored entry failed verification: their next upload overwrites the entry
    /// instead of skipping it.
    corrupt: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for S3Layers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Layers")
            .field("store", &self.shared.store.to_string())
            .field("prefix", &self.shared.prefix)
            .finish_non_exhaustive()
    }
}

impl S3Layers {
    /// The store `config` names with credentials from the environment, or `None` when it
    /// names no bucket. Makes no request.
    pub(crate) fn new(config: &S3Config) -> Result<Option<Self>, S3SetupError> {
        Self::with_env(config, |name| std::env::var(name).ok())
    }

    /// As [`Self::new`], with credential variables read through `get`.
    pub(crate) fn with_env(
        config: &S3Config,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, S3SetupError> {
        let Some(bucket) = &config.bucket else {
            return Ok(None);
        };
        config.validate()?;
        // reqwest's rustls has no crypto provider of its own here (see the workspace
        // Cargo.toml): use ring, unless the application installed another one first.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let timeouts = config.timeouts;
        let small = ClientOptions::new()
            .with_connect_timeout(timeouts.connect)
            .with_timeout(timeouts.request);
        let bulk = ClientOptions::new()
            .with_connect_timeout(timeouts.connect)
            .with_timeout_disabled()
            .with_read_timeout(timeouts.request);
        let store = build_store(config, bucket, small, None, &get).map_err(S3SetupError::Client)?;
        // One credential provider (and token cache) for both clients.
        let credentials = Arc::clone(store.credentials());
        let bulk = build_store(config, bucket, bulk, Some(credentials), &get)
            .map_err(S3SetupError::Client)?;
        Ok(Some(Self {
            shared: Arc::new(Shared {
                store: Arc::new(store),
                bulk: Arc::new(bulk),
                prefix: config.prefix.clone(),
                timeouts,
                slots: Semaphore::new(config.max_concurrent_uploads),
                counters: Counters::default(),
                corrupt: Mutex::new(HashSet::new()),
            }),
            uploads: crate::background::Background::default(),
        }))
    }

    /// Waits for the uploads started so far (a one-shot process calls this before exiting, or
    /// its uploads die with it).
    pub(crate) async fn wait_for_uploads(&self) {
        self.uploads.wait().await;
    }

    /// Whether uploads are queued or running.
    pub(crate) fn uploads_pending(&self) -> bool {
        self.uploads.pending()
    }

    /// Overwrites the object at `path` (relative to the bucket) with `bytes`, past every
    /// check: tests corrupt a stored layer with it.
    #[cfg(test)]
    pub(crate) async fn put_raw(&self, path: &str, bytes: Vec<u8>) {
        self.shared
            .store
            .put(&ObjectPath::from(path), bytes.into())
            .await
            .unwrap();
    }

    /// What the uploads did so far.
    #[cfg(test)]
    pub(crate) fn upload_stats(&self) -> UploadStats {
        let c = &self.shared.counters;
        UploadStats {
            uploaded: c.uploaded.load(Ordering::Relaxed),
            skipped: c.skipped.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            multipart: c.multipart.load(Ordering::Relaxed),
            peak_in_flight: c.peak_in_flight.load(Ordering::Relaxed),
        }
    }
}

impl Drop for S3Layers {
    /// Uploads end with the store; an interrupted multipart upload is left for the bucket's
    /// lifecycle rule, and its entry has no manifest, so nobody reads it.
    fn drop(&mut self) {
        self.uploads.abort_now();
    }
}

impl RemoteLayers for S3Layers {
    fn fetch<'a>(
        &'a self,
        key: &'a str,
        dest_dir: &'a Path,
    ) -> BoxFuture<'a, Result<bool, RemoteError>> {
        Box::pin(self.shared.fetch(key, dest_dir))
    }

    fn upload(&self, key: &str, layer_dir: &Path) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(key, "not uploading a package layer: no async runtime");
            return;
        };
        let shared = Arc::clone(&self.shared);
        let key = key.to_owned();
        let dir = layer_dir.to_owned();
        let task = runtime.spawn(async move {
            let Ok(_slot) = shared.slots.acquire().await else {
                return;
            };
            let c = &shared.counters;
            let now = c.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            c.peak_in_flight.fetch_max(now, Ordering::SeqCst);
            let started = std::time::Instant::now();
            let outcome = shared.upload(&key, &dir).await;
            c.in_flight.fetch_sub(1, Ordering::SeqCst);
            match outcome {
                Ok(Uploaded::Skipped) => {
                    c.skipped.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(key, "the remote store already has this package layer");
                }
                Ok(how) => {
                    c.uploaded.fetch_add(1, Ordering::Relaxed);
                    if how == Uploaded::Multipart {
                        c.multipart.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::debug!(
                        key,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "uploaded a package layer"
                    );
                }
                Err(e) => {
                    c.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(key, error = %crate::vm::error_chain(&e), "cannot upload a package layer");
                }
            }
        });
        self.uploads.track(task);
    }
}

fn build_store(
    config: &S3Config,
    bucket: &str,
    options: ClientOptions,
    credentials: Option<object_store::aws::AwsCredentialProvider>,
    get: &impl Fn(&str) -> Option<String>,
) -> Result<object_store::aws::AmazonS3, object_store::Error> {
    let endpoint_is_http = config
        .endpoint_url
        .as_deref()
        .and_then(|u| url::Url::parse(u).ok())
        .is_some_and(|u| u.scheme() == "http");
    let mut builder = AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region(&config.region)
        .with_client_options(options.with_allow_http(endpoint_is_http))
        .with_retry(RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: MAX_RETRIES,
            retry_timeout: config.timeouts.request,
        });
    builder = match &config.endpoint_url {
        // S3-compatible stores generally want path-style requests.
        Some(url) => builder
            .with_endpoint(url.trim_end_matches('/'))
            .with_virtual_hosted_style_request(false),
        // AWS: the bucket's own host, unless a dotted name would not match the certificate.
        None => builder.with_virtual_hosted_style_request(!bucket.contains('.')),
    };
    if let Some(credentials) = credentials {
        return builder.with_credentials(credentials).build();
    }
    for var in CREDENTIAL_VARS {
        if let Some(value) = get(var).filter(|v| !v.is_empty()) {
            builder = builder.with_config(var.to_ascii_lowercase().parse()?, value);
        }
    }
    builder.build()
}

/// Runs `operation` within `after`, a [`RemoteError::Timeout`] past it.
async fn within<T>(
    key: &str,
    after: Duration,
    operation: impl Future<Output = Result<T, RemoteError>>,
) -> Result<T, RemoteError> {
    tokio::time::timeout(after, operation)
        .await
        .unwrap_or_else(|_| {
            Err(RemoteError::Timeout {
                key: key.to_owned(),
                after,
            })
        })
}

/// Whether the client gave up waiting (its own request deadline, connect or idle timeout).
fn timed_out(error: &object_store::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(http) = e.downcast_ref::<object_store::client::HttpError>() {
            return http.kind() == object_store::client::HttpErrorKind::Timeout;
        }
        source = e.source();
    }
    false
}

fn corrupt(key: &str, reason: impl Into<String>) -> RemoteError {
    RemoteError::Corrupt {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

fn io_error(key: &str, path: &Path, source: std::io::Error) -> RemoteError {
    RemoteError::Io {
        key: key.to_owned(),
        path: path.to_owned(),
        source,
    }
}

impl Shared {
    fn store_error(&self, key: &str, error: object_store::Error) -> RemoteError {
        let key = key.to_owned();
        match error {
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => RemoteError::Denied {
                key,
                source: Box::new(error),
            },
            // The clients' deadlines (request, connect, idle read) are all at most this.
            _ if timed_out(&error) => RemoteError::Timeout {
                key,
                after: self.timeouts.request,
            },
            _ => RemoteError::Store {
                key,
                source: Box::new(error),
            },
        }
    }

    fn object(&self, key: &str, name: &str) -> Result<ObjectPath, RemoteError> {
        if !valid_key(key) {
            return Err(RemoteError::InvalidKey {
                key: key.to_owned(),
            });
        }
        ObjectPath::parse(format!("{}{key}/{name}", self.prefix)).map_err(|_| {
            RemoteError::InvalidKey {
                key: key.to_owned(),
            }
        })
    }

    fn mark_corrupt(&self, key: &str) {
        if let Ok(mut keys) = self.corrupt.lock() {
            if keys.len() >= MAX_CORRUPT_KEYS {
                keys.clear();
            }
            keys.insert(key.to_owned());
        }
    }

    fn known_corrupt(&self, key: &str) -> bool {
        self.corrupt.lock().is_ok_and(|keys| keys.contains(key))
    }

    async fn fetch(&self, key: &str, dest_dir: &Path) -> Result<bool, RemoteError> {
        let manifest_object = self.object(key, MANIFEST_OBJECT)?;
        let layer_object = self.object(key, LAYER_OBJECT)?;
        let Some(manifest) = within(
            key,
            self.timeouts.request,
            self.get_small(key, &manifest_object),
        )
        .await?
        else {
            return Ok(false);
        };
        let layer_path = dest_dir.join(LAYER_FILE);
        let manifest_path = dest_dir.join(MANIFEST_FILE);
        let result = async {
            let digest = LayerDigest::parse(&manifest).map_err(|reason| corrupt(key, reason))?;
            within(
                key,
                self.timeouts.transfer(digest.size),
                self.download_layer(key, &layer_object, &digest, &layer_path),
            )
            .await?;
            std::fs::write(&manifest_path, &manifest).map_err(|e| io_error(key, &manifest_path, e))
        }
        .await;
        if let Err(e) = result {
            let _ = std::fs::remove_file(&layer_path);
            let _ = std::fs::remove_file(&manifest_path);
            if matches!(e, RemoteError::Corrupt { .. }) {
                self.mark_corrupt(key);
            }
            return Err(e);
        }
        Ok(true)
    }

    /// A small object's bytes (at most [`limits::MAX_REMOTE_MANIFEST_BYTES`]); `None` when
    /// the store has no such object.
    async fn get_small(
        &self,
        key: &str,
        object: &ObjectPath,
    ) -> Result<Option<Bytes>, RemoteError> {
        let result = match self.store.get(object).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.store_error(key, e)),
        };
        let limit = limits::MAX_REMOTE_MANIFEST_BYTES;
        if result.meta.size > limit as u64 {
            return Err(corrupt(
                key,
                format!("manifest is larger than {limit} bytes"),
            ));
        }
        let mut stream = result.into_stream();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.store_error(key, e))?;
            if bytes.len() + chunk.len() > limit {
                return Err(corrupt(
                    key,
                    format!("manifest is larger than {limit} bytes"),
                ));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(Some(bytes.into()))
    }

    /// Streams the compressed layer through a decompressing thread into `path`.
    async fn download_layer(
        &self,
        key: &str,
        object: &ObjectPath,
        digest: &LayerDigest,
        path: &Path,
    ) -> Result<(), RemoteError> {
        let result = match self.bulk.get(object).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(corrupt(key, "manifest without a layer"));
            }
            Err(e) => return Err(self.store_error(key, e)),
        };
        // zstd never grows data by more than a small fraction; more than that is not our stream.
        let compressed_limit = digest.size + digest.size / 64 + 64 * 1024;
        if result.meta.size > compressed_limit {
            return Err(corrupt(
                key,
                format!("compressed layer is {} bytes, too large", result.meta.size),
            ));
        }
        let file = std::fs::File::create(path).map_err(|e| io_error(key, path, e))?;
        let (tx, rx) = mpsc::channel::<Bytes>(CHUNKS_QUEUED);
        let writer = {
            let key = key.to_owned();
            let path = path.to_owned();
            let digest = digest.clone();
            tokio::task::spawn_blocking(move || decompress_into(rx, file, &digest, &key, &path))
        };
        let mut stream = result.into_stream();
        let mut received = 0u64;
        let mut network = Ok(());
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(e) => {
                    network = Err(self.store_error(key, e));
                    break;
                }
            };
            received += chunk.len() as u64;
            if received > compressed_limit {
                network = Err(corrupt(key, "compressed layer is longer than announced"));
                break;
            }
            if tx.send(chunk).await.is_err() {
                // The writer stopped early: its result says why.
                break;
            }
        }
        drop(tx);
        let written = writer.await.map_err(|e| RemoteError::Io {
            key: key.to_owned(),
            path: path.to_owned(),
            source: std::io::Error::other(e),
        })?;
        network?;
        written
    }

    async fn upload(&self, key: &str, dir: &Path) -> Result<Uploaded, RemoteError> {
        let manifest_object = self.object(key, MANIFEST_OBJECT)?;
        let layer_object = self.object(key, LAYER_OBJECT)?;
        let manifest_path = dir.join(MANIFEST_FILE);
        let manifest =
            std::fs::read(&manifest_path).map_err(|e| io_error(key, &manifest_path, e))?;
        let digest = LayerDigest::parse(&manifest).map_err(|reason| RemoteError::Io {
            key: key.to_owned(),
            path: manifest_path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, reason),
        })?;
        if !self.known_corrupt(key) {
            let exists = within(key, self.timeouts.request, async {
                match self.store.head(&manifest_object).await {
                    Ok(_) => Ok(true),
                    Err(object_store::Error::NotFound { .. }) => Ok(false),
                    Err(e) => Err(self.store_error(key, e)),
                }
            })
            .await?;
            if exists {
                return Ok(Uploaded::Skipped);
            }
        }
        let how = self
            .upload_layer(key, &layer_object, &dir.join(LAYER_FILE), &digest)
            .await?;
        within(key, self.timeouts.request, async {
            self.store
                .put(&manifest_object, PutPayload::from(manifest))
                .await
                .map_err(|e| self.store_error(key, e))
        })
        .await?;
        if let Ok(mut keys) = self.corrupt.lock() {
            keys.remove(key);
        }
        Ok(how)
    }

    /// Compresses `path` on a blocking thread and sends it: one `PUT` when it fits in a part,
    /// a multipart upload otherwise. Completes only when the file matched `digest`.
    async fn upload_layer(
        &self,
        key: &str,
        object: &ObjectPath,
        path: &Path,
        digest: &LayerDigest,
    ) -> Result<Uploaded, RemoteError> {
        let file = std::fs::File::open(path).map_err(|e| io_error(key, path, e))?;
        let (tx, mut rx) = mpsc::channel::<Bytes>(CHUNKS_QUEUED);
        let compressor = {
            let key = key.to_owned();
            let path = path.to_owned();
            let digest = digest.clone();
            tokio::task::spawn_blocking(move || compress_from(file, tx, &digest, &key, &path))
        };
        let mut head: Vec<Bytes> = Vec::new();
        let mut head_bytes = 0;
        let mut multipart: Option<WriteMultipart> = None;
        let sent = within(key, self.timeouts.transfer(digest.size), async {
            while let Some(chunk) = rx.recv().await {
                match &mut multipart {
                    Some(writer) => {
                        writer
                            .wait_for_capacity(limits::S3_PARTS_IN_FLIGHT)
                            .await
                            .map_err(|e| self.store_error(key, e))?;
                        writer.put(chunk);
                    }
                    None => {
                        head_bytes += chunk.len();
                        head.push(chunk);
                        if head_bytes > limits::S3_PART_BYTES {
                            let upload = self
                                .store
                                .put_multipart(object)
                                .await
                                .map_err(|e| self.store_error(key, e))?;
                            let mut writer =
                                WriteMultipart::new_with_chunk_size(upload, limits::S3_PART_BYTES);
                            for chunk in head.drain(..) {
                                writer.put(chunk);
                            }
                            multipart = Some(writer);
                        }
                    }
                }
            }
            Ok(())
        })
        .await;
        drop(rx);
        let compressed = compressor.await.map_err(|e| RemoteError::Io {
            key: key.to_owned(),
            path: path.to_owned(),
            source: std::io::Error::other(e),
        });
        let ready = sent.and(compressed.and_then(|r| r));
        match (multipart, ready) {
            (None, Ok(())) => {
                within(key, self.timeouts.request, async {
                    self.store
                        .put(object, PutPayload::from_iter(head))
                        .await
                        .map_err(|e| self.store_error(key, e))
                })
                .await?;
                Ok(Uploaded::Single)
            }
            (Some(writer), Ok(())) => {
                // The last part, the parts still in flight, then the completion request.
                let rest = limits::S3_PART_BYTES * (limits::S3_PARTS_IN_FLIGHT + 1);
                within(key, self.timeouts.transfer(rest as u64), async {
                    writer.finish().await.map_err(|e| self.store_error(key, e))
                })
                .await?;
                Ok(Uploaded::Multipart)
            }
            (Some(writer), Err(e)) => {
                let _ = tokio::time::timeout(self.timeouts.request, writer.abort()).await;
                Err(e)
            }
            (None, Err(e)) => Err(e),
        }
    }
}
