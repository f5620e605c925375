//! The entry point the scheduler calls: requirements in, a verified read-only layer out.
//!
//! [`PackageStore::ensure`]: resolve the requirements to exact top-level pins (no index contact
//! for exact pins, remembered answers for ranges), compute the key, then
//! - L2 hit (verified entry on disk) → [`PackageSource::L2`];
//! - else, under the key's lock (one builder per key across threads and processes), look again,
//!   then ask the remote store (L3, when configured): a download that verifies is published →
//!   [`PackageSource::L3`]; a failing remote is a warning;
//! - else install, pack and publish, start the upload → [`PackageSource::Built`].
//!
//! After a build or download, least recently used layers are evicted to fit the size bound.

use std::fs::{self, File};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use sbx_protocol::Language;

use super::cache::{Cached, KeyLock, LayerCache, LayerInfo, Lookup};
use super::error::PackageError;
use super::layer::{self, LAYER_FILE, LayerManifest};
use super::remote::RemoteLayers;
use super::resolve::{Resolver, unix_ms};
use super::tool::Tools;
use super::{Ecosystem, PackageSource, Pin, Requirement, Target, install};
use crate::assets::AssetStore;
use crate::assets::stamp::human_size;
use crate::limits;

/// Progress messages for the user (a TTY spinner, a log line).
pub(crate) type Progress = Arc<dyn Fn(&str) + Send + Sync>;

/// Where layers live and how they may be made: the package layer's own configuration (the
/// scheduler derives it from its own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PackageConfig {
    /// The L2 cache directory (`<cache_dir>/packages`).
    pub(crate) cache_dir: PathBuf,
    /// Bound of the cache in bytes on disk; least recently used layers are evicted beyond it.
    pub(crate) max_bytes: u64,
    /// Never contact an index: only cached layers (and remembered ranges) can be used.
    pub(crate) offline: bool,
    /// How long a range's resolution is remembered.
    pub(crate) range_ttl: Duration,
    /// The host tools and their environment.
    pub(crate) tools: Tools,
}

impl PackageConfig {
    /// Defaults for a cache in `cache_dir`.
    pub(crate) fn new(cache_dir: PathBuf) -> Self {
        Self {
            cache_dir,
            max_bytes: limits::DEFAULT_PACKAGE_CACHE_MAX_MB * 1024 * 1024,
            offline: false,
            range_ttl: limits::PACKAGE_RANGE_CACHE_TTL,
            tools: Tools::default(),
        }
    }
}

/// A layer ready to attach to a VM as a read-only disk.
#[derive(Debug, Clone)]
pub(crate) struct ReadyLayer {
    /// The EROFS image in the cache.
    pub(crate) path: PathBuf,
    /// The same image, open: while it is held, another process's eviction only unlinks the
    /// entry and the inode stays (the VM's holder keeps it until QEMU has the path open).
    #[cfg_attr(
        not(test),
        expect(
            dead_code,
            reason = "held, never read: it keeps the image's inode alive"
        )
    )]
    pub(crate) file: Arc<File>,
    /// The cache key.
    pub(crate) key: String,
    /// The exact top-level pins (ranges resolved), sorted.
    pub(crate) requested: Vec<Pin>,
    /// Everything the layer holds, dependencies included, sorted.
    pub(crate) closure: Vec<Pin>,
    /// Which level served it.
    pub(crate) source: PackageSource,
    /// How long installing and packing took, when it was built for this call.
    pub(crate) install_ms: Option<u64>,
    /// Modules to import in a template before it is saved.
    pub(crate) warm_modules: Vec<String>,
}

impl ReadyLayer {
    fn from_cached(cached: Cached, source: PackageSource, install_ms: Option<u64>) -> Self {
        Self {
            path: cached.layer_path(),
            key: cached.manifest.key,
            requested: cached.manifest.requested,
            closure: cached.manifest.closure,
            warm_modules: cached.manifest.warm_modules,
            file: Arc::new(cached.file),
            source,
            install_ms,
        }
    }
}

/// Resolves, builds, caches and serves package layers. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct PackageStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: PackageConfig,
    cache: LayerCache,
    resolver: Resolver,
    remote: Option<Arc<dyn RemoteLayers>>,
}

impl PackageStore {
    /// A store for `config`, without a remote copy.
    #[cfg(test)]
    pub(crate) fn new(config: PackageConfig) -> Self {
        Self::with_remote(config, None)
    }

    /// A store for `config` that shares its layers through `remote` (L3).
    pub(crate) fn with_remote(
        config: PackageConfig,
        remote: Option<Arc<dyn RemoteLayers>>,
    ) -> Self {
        let resolver = Resolver {
            tools: config.tools.clone(),
            dir: config.cache_dir.join(".ranges"),
            ttl: config.range_ttl,
            offline: config.offline,
        };
        Self {
            inner: Arc::new(Inner {
                cache: LayerCache::new(config.cache_dir.clone()),
                resolver,
                remote,
                config,
            }),
        }
    }

    /// The layer holding `requirements` (validated, non-empty) and their dependencies, built
    /// for `target`: from the cache, the remote copy, or built now (`progress` tells the user
    /// what takes time).
    pub(crate) async fn ensure(
        &self,
        target: &Target,
        requirements: &[Requirement],
        progress: impl Fn(&str) + Send + Sync + 'static,
    ) -> Result<ReadyLayer, PackageError> {
        let progress: Progress = Arc::new(move |step: &str| {
            tracing::info!("packages: {step}");
            progress(step);
        });
        let inner = Arc::clone(&self.inner);
        let target = target.clone();
        // Checked (and created private) before anything is read from it.
        let dir = inner.config.cache_dir.clone();
        blocking(move || Ok(crate::trust::ensure(&dir)?)).await?;
        let pins = {
            let (inner, target, progress) = (Arc::clone(&inner), target.clone(), progress.clone());
            let requirements = requirements.to_vec();
            blocking(move || inner.resolver.pins(&target, &requirements, &*progress)).await?
        };
        let key = layer::key(&target, &pins);

        // L2, without a lock.
        match self.lookup(&key).await? {
            Lookup::Hit(cached) => return self.hit(*cached).await,
            Lookup::Miss | Lookup::Bad(_) => {}
        }
        if inner.config.offline {
            return Err(PackageError::Offline {
                what: format!(
                    "the package layer for {}",
                    pins.iter()
                        .map(|p| super::display_pin(target.ecosystem, p))
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
            });
        }
        let lock = {
            let (inner, key, progress) = (Arc::clone(&inner), key.clone(), progress.clone());
            Arc::new(
                blocking(move || {
                    inner.cache.lock(&key, || {
                        progress("waiting for another build of the same packages")
                    })
                })
                .await?,
            )
        };
        // Another thread or process may have produced it meanwhile; a bad entry goes now.
        match self.lookup(&key).await? {
            Lookup::Hit(cached) => return self.hit(*cached).await,
            Lookup::Bad(reason) => {
                tracing::warn!(%key, %reason, "discarding a bad package layer");
                let (inner, key, lock) = (Arc::clone(&inner), key.clone(), Arc::clone(&lock));
                blocking(move || {
                    inner.cache.discard(&key, &lock);
                    Ok(())
                })
                .await?;
            }
            Lookup::Miss => {}
        }

        if let Some(cached) = self
            .fetch_remote(&target, &pins, &key, &lock, &progress)
            .await
        {
            self.evict(&key).await;
            return Ok(ReadyLayer::from_cached(cached, PackageSource::L3, None));
        }

        let started = Instant::now();
        let cached = {
            let (inner, target, pins, key, lock, progress) = (
                Arc::clone(&inner),
                target.clone(),
                pins.clone(),
                key.clone(),
                Arc::clone(&lock),
                progress.clone(),
            );
            blocking(move || build(&inner, &target, &pins, &key, &lock, &*progress)).await?
        };
        drop(lock);
        self.evict(&key).await;
        if let Some(remote) = &inner.remote {
            remote.upload(&key, &cached.dir);
        }
        let install_ms = started.elapsed().as_millis() as u64;
        Ok(ReadyLayer::from_cached(
            cached,
            PackageSource::Built,
            Some(install_ms),
        ))
    }

    /// The newest version of `name` the guest of `target` can use, for the "bare name refused,
    /// newest is X" message. Contacts the index.
    pub(crate) async fn newest(&self, target: &Target, name: &str) -> Result<String, PackageError> {
        let (inner, target, name) = (Arc::clone(&self.inner), target.clone(), name.to_string());
        blocking(move || inner.resolver.newest(&target, &name)).await
    }

    /// The cached layers, most recently used first.
    pub(crate) async fn entries(&self) -> Vec<LayerInfo> {
        let inner = Arc::clone(&self.inner);
        blocking(move || Ok(inner.cache.entries()))
            .await
            .unwrap_or_default()
    }

    /// Evicts least recently used layers until the cache holds at most `max_bytes` (0 empties
    /// it; layers being built are kept). Returns the removed keys and the bytes each freed.
    pub(crate) async fn prune(&self, max_bytes: u64) -> Vec<(String, u64)> {
        let inner = Arc::clone(&self.inner);
        blocking(move || Ok(inner.cache.evict(max_bytes, None)))
            .await
            .unwrap_or_default()
    }

    async fn lookup(&self, key: &str) -> Result<Lookup, PackageError> {
        let (inner, key) = (Arc::clone(&self.inner), key.to_string());
        blocking(move || Ok(inner.cache.lookup(&key))).await
    }

    async fn hit(&self, cached: Cached) -> Result<ReadyLayer, PackageError> {
        let inner = Arc::clone(&self.inner);
        let cached = blocking(move || {
            inner.cache.record_use(&cached);
            Ok(cached)
        })
        .await?;
        Ok(ReadyLayer::from_cached(cached, PackageSource::L2, None))
    }

    /// The layer from the remote store, verified and published, if it has a good copy.
    async fn fetch_remote(
        &self,
        target: &Target,
        pins: &[Pin],
        key: &str,
        lock: &Arc<KeyLock>,
        progress: &Progress,
    ) -> Option<Cached> {
        let remote = self.inner.remote.as_ref()?;
        let staging = match self.inner.cache.staging(key) {
            Ok(staging) => staging,
            Err(e) => {
                tracing::warn!(error = %e, "cannot fetch a package layer from the remote store");
                return None;
            }
        };
        match remote.fetch(key, staging.path()).await {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                tracing::warn!(error = %crate::vm::error_chain(&e), %key, "the remote layer store failed; building locally");
                return None;
            }
        }
        progress("verifying the layer from the remote store");
        let (inner, target, pins, key, lock) = (
            Arc::clone(&self.inner),
            target.clone(),
            pins.to_vec(),
            key.to_string(),
            Arc::clone(lock),
        );
        let adopted = blocking(move || {
            Ok(inner
                .cache
                .adopt(staging, &key, &target, &pins, &lock)
                .map_err(|reason| (key, reason)))
        })
        .await;
        match adopted {
            Ok(Ok(cached)) => Some(cached),
            Ok(Err((key, reason))) => {
                tracing::warn!(%key, %reason, "discarding the remote copy of a package layer; building locally");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot verify the remote copy of a package layer");
                None
            }
        }
    }

    async fn evict(&self, keep: &str) {
        let (inner, keep) = (Arc::clone(&self.inner), keep.to_string());
        let max = inner.config.max_bytes;
        let _ = blocking(move || Ok(inner.cache.evict(max, Some(&keep)))).await;
    }
}

/// Installs, packs and publishes the layer `key` (the caller holds its lock).
fn build(
    inner: &Inner,
    target: &Target,
    pins: &[Pin],
    key: &str,
    lock: &KeyLock,
    progress: &dyn Fn(&str),
) -> Result<Cached, PackageError> {
    let started = Instant::now();
    let tools = &inner.config.tools;
    let staging = inner.cache.staging(key)?;
    let work = staging.path().join("work");
    let tree = staging.path().join("tree");
    for dir in [&work, &tree] {
        fs::create_dir(dir).map_err(PackageError::io("create", dir))?;
    }
    let closure = install::install(tools, target, pins, &tree, &work, progress)?;
    let warm_modules = install::warm_modules(target.ecosystem, &tree, pins);
    let image = staging.path().join(LAYER_FILE);
    layer::pack(tools, &tree, &image, key, progress)?;
    for dir in [&work, &tree] {
        fs::remove_dir_all(dir).map_err(PackageError::io("remove", dir))?;
    }
    let file = File::open(&image).map_err(PackageError::io("open", &image))?;
    let (sha256, size) =
        crate::assets::files::sha256_reader(file).map_err(PackageError::io("read", &image))?;
    let manifest = LayerManifest {
        format: layer::FORMAT,
        key: key.to_string(),
        target: target.clone(),
        requested: pins.to_vec(),
        closure,
        sha256,
        size,
        built_unix_ms: unix_ms(SystemTime::now()),
        install_ms: started.elapsed().as_millis() as u64,
        warm_modules,
    };
    let cached = inner.cache.publish(staging, &manifest, lock)?;
    let count = cached.manifest.closure.len();
    progress(&format!(
        "layer ready: {count} package{}, {} ({:.1} s)",
        if count == 1 { "" } else { "s" },
        human_size(size),
        started.elapsed().as_secs_f64()
    ));
    Ok(cached)
}

/// The target of `language`'s guest image, from the asset manifest (the root filesystem's
/// inputs key and package lock). Call after [`AssetStore::ensure`] readied the language.
pub(crate) fn target_for(assets: &AssetStore, language: Language) -> Result<Target, PackageError> {
    let no_target = |reason: String| PackageError::Target {
        language: language.to_string(),
        reason,
    };
    let ecosystem =
        Ecosystem::of(language).ok_or_else(|| no_target("it takes no packages".into()))?;
    let facts = assets
        .rootfs_facts(language)
        .map_err(|e| no_target(e.to_string()))?
        .ok_or_else(|| no_target("its root filesystem is not in the asset manifest".into()))?;
    let lock = facts
        .lock
        .ok_or_else(|| no_target("its root filesystem has no package lock".into()))?;
    Target::from_rootfs(ecosystem, &facts.inputs, &lock)
}

/// Runs file system and tool work off the async threads.
async fn blocking<T: Send + 'static>(
    job: impl FnOnce() -> Result<T, PackageError> + Send + 'static,
) -> Result<T, PackageError> {
    match tokio::task::spawn_blocking(job).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(PackageError::io(
            "finish preparing packages in",
            PathBuf::new(),
        )(std::io::Error::other(
            "the async runtime is shutting down",
        ))),
    }
}
