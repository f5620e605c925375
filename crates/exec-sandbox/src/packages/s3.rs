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
use std::io::{Read, Write};
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
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, mpsc};

use super::remote::{RemoteError, RemoteLayers};
use crate::limits;

#[cfg(test)]
mod moto;
#[cfg(test)]
mod tests;

/// The layer image in an entry directory (the L2 cache's name for it).
const LAYER_FILE: &str = "layer.erofs";
/// The manifest in an entry directory (the L2 cache's name for it).
const MANIFEST_FILE: &str = "manifest.json";
/// The compressed layer's object name under `<prefix><key>/`.
const LAYER_OBJECT: &str = "layer.erofs.zst";
/// The manifest's object name under `<prefix><key>/`.
const MANIFEST_OBJECT: &str = "manifest.json";
/// zstd's default level: fast to compress, and layers are compressed once per build.
const ZSTD_LEVEL: i32 = 3;
/// Bytes read from (or handed to) the network side at a time.
const CHUNK_BYTES: usize = 1024 * 1024;
/// Chunks queued between the network and the (de)compressing thread.
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

/// Where L3 layers live and how long requests may take.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct S3Config {
    /// The bucket; `None` switches L3 off.
    pub bucket: Option<String>,
    /// The bucket's region.
    pub region: String,
    /// Prefix of every object name: empty, or ending in `/`.
    pub prefix: String,
    /// An S3-compatible store's URL instead of AWS's (`http` only for a loopback host).
    pub endpoint_url: Option<String>,
    /// Deadlines.
    pub timeouts: S3Timeouts,
    /// Uploads in flight at once.
    pub max_concurrent_uploads: usize,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            bucket: None,
            region: limits::DEFAULT_S3_REGION.to_owned(),
            prefix: limits::DEFAULT_S3_PREFIX.to_owned(),
            endpoint_url: None,
            timeouts: S3Timeouts::default(),
            max_concurrent_uploads: limits::S3_MAX_CONCURRENT_UPLOADS,
        }
    }
}

/// Deadlines of S3 requests (tests shorten them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct S3Timeouts {
    /// Connecting.
    pub connect: Duration,
    /// One small operation, retries included; the longest a download may go without a byte.
    pub request: Duration,
    /// The slowest rate a whole layer transfer is given time for, beyond `request`.
    pub min_bytes_per_second: u64,
}

impl Default for S3Timeouts {
    fn default() -> Self {
        Self {
            connect: limits::S3_CONNECT_TIMEOUT,
            request: limits::S3_REQUEST_TIMEOUT,
            min_bytes_per_second: limits::S3_MIN_TRANSFER_BYTES_PER_SECOND,
        }
    }
}

impl S3Timeouts {
    /// Deadline of a whole transfer of a `bytes`-long layer.
    fn transfer(&self, bytes: u64) -> Duration {
        self.request + Duration::from_secs(bytes / self.min_bytes_per_second.max(1))
    }
}

/// Why the L3 store could not be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum S3SetupError {
    /// A configuration field breaks its rule.
    #[error("invalid S3 configuration {field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// The rule.
        reason: String,
    },
    /// The client refused the configuration (e.g. a secret key without a key id).
    #[error("cannot configure the S3 client")]
    Client(#[source] object_store::Error),
}

impl S3Config {
    /// Checks every field (the rules of [`validate_bucket`] and its siblings).
    pub(crate) fn validate(&self) -> Result<(), S3SetupError> {
        let invalid = |field| move |reason| S3SetupError::Invalid { field, reason };
        if let Some(bucket) = &self.bucket {
            validate_bucket(bucket).map_err(invalid("s3_bucket"))?;
        }
        validate_region(&self.region).map_err(invalid("s3_region"))?;
        validate_prefix(&self.prefix).map_err(invalid("s3_prefix"))?;
        if let Some(url) = &self.endpoint_url {
            validate_endpoint_url(url).map_err(invalid("s3_endpoint_url"))?;
        }
        if self.max_concurrent_uploads == 0 {
            return Err(invalid("max_concurrent_uploads")(
                "must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// S3's rules for general purpose bucket names: 3-63 characters of lowercase letters, digits,
/// `.` and `-`, starting and ending with a letter or digit, no `..`, not an IPv4 address, none
/// of the reserved prefixes and suffixes.
pub(crate) fn validate_bucket(name: &str) -> Result<(), String> {
    if !(3..=63).contains(&name.len()) {
        return Err(format!("`{name}` is not 3-63 characters long"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '.' || *c == '-'))
    {
        return Err(format!(
            "`{name}` has `{c}`: only lowercase letters, digits, `.` and `-` are allowed"
        ));
    }
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !alnum(name.chars().next()) || !alnum(name.chars().last()) {
        return Err(format!(
            "`{name}` must start and end with a letter or a digit"
        ));
    }
    if name.contains("..") {
        return Err(format!("`{name}` has two dots in a row"));
    }
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err(format!("`{name}` is an IP address"));
    }
    for prefix in ["xn--", "sthree-", "amzn-s3-demo-"] {
        if name.starts_with(prefix) {
            return Err(format!("`{name}` starts with the reserved `{prefix}`"));
        }
    }
    for suffix in ["-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3"] {
        if name.ends_with(suffix) {
            return Err(format!("`{name}` ends with the reserved `{suffix}`"));
        }
    }
    Ok(())
}

/// A region name: lowercase letters, digits and `-` (`us-east-1`, `eu-central-2`, or an
/// S3-compatible store's own name).
pub(crate) fn validate_region(region: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&region.len())
        && region
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{region}` is not 1-64 lowercase letters, digits and `-`"
        ))
    }
}

/// A key prefix: empty, or `/`-separated segments ending in `/`, each non-empty and not `.` or
/// `..`, of printable ASCII without `\`, at most [`limits::MAX_S3_PREFIX_BYTES`].
pub(crate) fn validate_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() {
        return Ok(());
    }
    if prefix.len() > limits::MAX_S3_PREFIX_BYTES {
        return Err(format!("longer than {} bytes", limits::MAX_S3_PREFIX_BYTES));
    }
    if let Some(c) = prefix.chars().find(|c| !c.is_ascii_graphic() || *c == '\\') {
        return Err(format!(
            "`{prefix}` has {c:?}: only printable ASCII without `\\` is allowed"
        ));
    }
    let Some(body) = prefix.strip_suffix('/') else {
        return Err(format!("`{prefix}` does not end with `/`"));
    };
    if body
        .split('/')
        .any(|segment| segment.is_empty() || segment == "." || segment == "..")
    {
        return Err(format!(
            "`{prefix}` has an empty, `.` or `..` segment (or starts with `/`)"
        ));
    }
    Ok(())
}

/// `prefix` as [`validate_prefix`] wants it: no leading `/`, a trailing `/` unless empty.
pub(crate) fn normalize_prefix(prefix: &str) -> String {
    let trimmed = prefix.trim().trim_start_matches('/');
    if trimmed.is_empty() || trimmed.ends_with('/') {
        trimmed.to_owned()
    } else {
        format!("{trimmed}/")
    }
}

/// An endpoint URL: `https://host[:port][/path]`, or `http://` to a loopback host (a local
/// test store; anything else would send signed requests and layers in the clear). No
/// credentials, query or fragment.
pub(crate) fn validate_endpoint_url(text: &str) -> Result<(), String> {
    let url = url::Url::parse(text).map_err(|e| format!("`{text}` is not a URL: {e}"))?;
    let Some(host) = url.host() else {
        return Err(format!("`{text}` has no host"));
    };
    match url.scheme() {
        "https" => {}
        "http" if is_loopback(&host) => {}
        "http" => {
            return Err(format!(
                "`{text}` is plain http to a host that is not loopback; use https"
            ));
        }
        other => return Err(format!("`{text}`: scheme `{other}` is not http(s)")),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "`{text}` carries credentials; give them through the AWS environment variables"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("`{text}` has a query or fragment"));
    }
    Ok(())
}

fn is_loopback(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Domain(name) => name.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => ip.is_loopback(),
    }
}

/// A cache key usable in an object name: 1-128 of `[A-Za-z0-9._-]`, not starting with `.`.
fn valid_key(key: &str) -> bool {
    (1..=128).contains(&key.len())
        && !key.starts_with('.')
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// What the L2 manifest says about its layer image: the fields this module reads (others are
/// ignored; the names follow `cache.rs`'s manifest).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
struct LayerDigest {
    /// Lowercase hex sha256 of `layer.erofs`.
    sha256: String,
    /// Bytes of `layer.erofs`.
    size: u64,
}

impl LayerDigest {
    /// Parses and checks a manifest's digest fields.
    fn parse(manifest: &[u8]) -> Result<Self, String> {
        let digest: LayerDigest =
            serde_json::from_slice(manifest).map_err(|e| format!("manifest is not valid: {e}"))?;
        let hex_ok = digest.sha256.len() == 64
            && digest
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex_ok {
            return Err("manifest's sha256 is not 64 lowercase hex digits".into());
        }
        if digest.size > limits::MAX_REMOTE_LAYER_BYTES {
            return Err(format!(
                "manifest's size {} is above {}",
                digest.size,
                limits::MAX_REMOTE_LAYER_BYTES
            ));
        }
        Ok(digest)
    }
}

/// What the background uploads did so far.
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
    uploads: Mutex<Vec<tokio::task::JoinHandle<()>>>,
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
            uploads: Mutex::new(Vec::new()),
        }))
    }

    /// Waits for the uploads started so far (a one-shot process calls this before exiting, or
    /// its uploads die with it).
    pub(crate) async fn wait_for_uploads(&self) {
        loop {
            let tasks: Vec<_> = self
                .uploads
                .lock()
                .map(|mut t| t.drain(..).collect())
                .unwrap_or_default();
            if tasks.is_empty() {
                return;
            }
            for task in tasks {
                let _ = task.await;
            }
        }
    }

    /// Whether uploads are queued or running.
    pub(crate) fn uploads_pending(&self) -> bool {
        self.uploads
            .lock()
            .map(|t| t.iter().any(|task| !task.is_finished()))
            .unwrap_or(false)
    }

    /// What the uploads did so far.
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
        if let Ok(mut tasks) = self.uploads.lock() {
            for task in tasks.drain(..) {
                task.abort();
            }
        }
    }
}

impl RemoteLayers for S3Layers {
    fn fetch(
        &self,
        key: &str,
        dest_dir: &Path,
    ) -> impl Future<Output = Result<bool, RemoteError>> + Send {
        let shared = Arc::clone(&self.shared);
        let key = key.to_owned();
        let dest_dir = dest_dir.to_owned();
        async move { shared.fetch(&key, &dest_dir).await }
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
        if let Ok(mut tasks) = self.uploads.lock() {
            tasks.retain(|t| !t.is_finished());
            tasks.push(task);
        }
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
                within(key, self.timeouts.request, async {
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

/// The download's sink: the layer file, hashed and bounded by the manifest's size.
struct LayerSink {
    file: std::io::BufWriter<std::fs::File>,
    hasher: Sha256,
    written: u64,
    limit: u64,
    oversized: bool,
    io_failed: bool,
}

impl Write for LayerSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written + buf.len() as u64 > self.limit {
            self.oversized = true;
            return Err(std::io::Error::other(
                "layer is longer than its manifest says",
            ));
        }
        if let Err(e) = self.file.write_all(buf) {
            self.io_failed = true;
            return Err(e);
        }
        self.hasher.update(buf);
        self.written += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush().inspect_err(|_| self.io_failed = true)
    }
}

/// Decompresses the chunks from `rx` into `file` and checks them against `digest`.
fn decompress_into(
    mut rx: mpsc::Receiver<Bytes>,
    file: std::fs::File,
    digest: &LayerDigest,
    key: &str,
    path: &Path,
) -> Result<(), RemoteError> {
    let sink = LayerSink {
        file: std::io::BufWriter::with_capacity(CHUNK_BYTES, file),
        hasher: Sha256::new(),
        written: 0,
        limit: digest.size,
        oversized: false,
        io_failed: false,
    };
    let mut decoder =
        zstd::stream::write::Decoder::new(sink).map_err(|e| io_error(key, path, e))?;
    let mut result = Ok(());
    while let Some(chunk) = rx.blocking_recv() {
        result = decoder.write_all(&chunk);
        if result.is_err() {
            break;
        }
    }
    // Stop the network side before the (slow) final flush.
    drop(rx);
    let result = result.and_then(|()| decoder.flush());
    let sink = decoder.into_inner();
    match result {
        Err(_) if sink.oversized => {
            return Err(corrupt(
                key,
                format!("layer is longer than the manifest's {} bytes", digest.size),
            ));
        }
        Err(e) if sink.io_failed => return Err(io_error(key, path, e)),
        Err(e) => return Err(corrupt(key, format!("not a zstd stream: {e}"))),
        Ok(()) => {}
    }
    if sink.written != digest.size {
        return Err(corrupt(
            key,
            format!(
                "layer has {} bytes, the manifest says {}",
                sink.written, digest.size
            ),
        ));
    }
    let sha256 = hex::encode(sink.hasher.finalize());
    if sha256 != digest.sha256 {
        return Err(corrupt(
            key,
            format!(
                "layer's sha256 is {sha256}, the manifest says {}",
                digest.sha256
            ),
        ));
    }
    Ok(())
}

/// The upload's source side of the channel: compressed bytes in chunks of about
/// [`CHUNK_BYTES`].
struct ChunkSender {
    tx: mpsc::Sender<Bytes>,
    buffer: Vec<u8>,
}

impl ChunkSender {
    fn send_buffer(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buffer,
            Vec::with_capacity(CHUNK_BYTES),
        ));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "upload stopped"))
    }
}

impl Write for ChunkSender {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(buf);
        if self.buffer.len() >= CHUNK_BYTES {
            self.send_buffer()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send_buffer()
    }
}

/// Reads `file`, checks it against `digest` and sends it compressed through `tx`.
fn compress_from(
    mut file: std::fs::File,
    tx: mpsc::Sender<Bytes>,
    digest: &LayerDigest,
    key: &str,
    path: &Path,
) -> Result<(), RemoteError> {
    let io = |e| io_error(key, path, e);
    let sink = ChunkSender {
        tx,
        buffer: Vec::with_capacity(CHUNK_BYTES),
    };
    let mut encoder = zstd::stream::write::Encoder::new(sink, ZSTD_LEVEL).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut read = 0u64;
    let mut buffer = vec![0u8; CHUNK_BYTES];
    loop {
        let n = file.read(&mut buffer).map_err(io)?;
        if n == 0 {
            break;
        }
        read += n as u64;
        if read > digest.size {
            break;
        }
        hasher.update(&buffer[..n]);
        encoder.write_all(&buffer[..n]).map_err(io)?;
    }
    let mismatch = |what: String| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{what}; not uploading it"),
        ))
    };
    if read != digest.size {
        return Err(mismatch(format!(
            "local layer does not have the manifest's {} bytes",
            digest.size
        )));
    }
    let sha256 = hex::encode(hasher.finalize());
    if sha256 != digest.sha256 {
        return Err(mismatch(format!(
            "local layer's sha256 is {sha256}, its manifest says {}",
            digest.sha256
        )));
    }
    let mut sink = encoder.finish().map_err(io)?;
    sink.flush().map_err(io)
}
