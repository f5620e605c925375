//! Guest assets: the kernel, the agent initramfs and one root filesystem per language.
//!
//! [`AssetStore::ensure`] finds them in the cache ([`AssetConfig::images_dir`]), verifies them
//! against their manifest, and builds or downloads what is missing, once across processes. The
//! layout and versioning scheme are described in `store.rs` and `inputs.rs`; how verification
//! stays cheap, in `stamp.rs`.
//!
//! Modules: `inputs` (what each asset is made from, keys, versions), `manifest`, `stamp`
//! (fingerprint stamps), `lock` (cross-process lock), `initramfs` (cpio writer), `build` (the
//! image scripts behind the `Builder` seam), `download` (prebuilt assets over HTTP),
//! `store` (the readying logic), `files` (atomic file helpers), `qemu` (the own QEMU build),
//! `prune` (versions and builds nothing uses any more).

mod build;
mod download;
mod error;
pub(crate) mod files;
mod initramfs;
mod inputs;
mod lock;
pub(crate) mod manifest;
mod prune;
mod qemu;
pub(crate) mod stamp;
mod store;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sbx_protocol::Language;

pub use error::AssetError;
pub(crate) use qemu::{DIR as OWN_QEMU_DIR, OwnQemu};

pub(crate) use download::{validate_base_url, validate_manifest_sha256};

use build::{Builder, ScriptBuilder};
use inputs::{AssetKind, Inputs};
use store::Store;

/// What a root filesystem is made of, as its manifest entry records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RootfsFacts {
    /// The inputs key it was built from.
    pub(crate) inputs: String,
    /// Its package lock (`name=version` lines), when its build recorded one.
    pub(crate) lock: Option<String>,
}

/// Paths of verified assets, ready to boot.
#[derive(Debug, Clone)]
pub struct GuestAssets {
    /// Asset version directory name.
    pub version: String,
    /// Uncompressed kernel (`vmlinux`, PVH entry).
    pub kernel: PathBuf,
    /// Initramfs holding the guest agent as `/init`.
    pub initramfs: PathBuf,
    /// Read-only root filesystem per language.
    pub rootfs: BTreeMap<Language, PathBuf>,
}

impl GuestAssets {
    /// The root filesystem for `language`.
    pub fn rootfs(&self, language: Language) -> Option<&Path> {
        self.rootfs.get(&language).map(PathBuf::as_path)
    }
}

/// Where assets live and how missing ones may be obtained: the asset layer's own configuration
/// (the scheduler derives it from its own configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssetConfig {
    /// Where versioned guest images live; builds cache their inputs in `build/` beside it.
    pub images_dir: PathBuf,
    /// How missing assets may be obtained.
    pub source: AssetSource,
    /// Asset version to use instead of the one derived from the build inputs.
    pub version: Option<String>,
    /// The SHA-256 (hex) the downloaded `manifest.json` must have: pinned by the operator, so
    /// a compromised server cannot hand out both images and their checksums.
    pub manifest_sha256: Option<String>,
}

/// How missing assets may be obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssetSource {
    /// Never: a missing asset is an error (offline, or automatic download switched off).
    Forbidden,
    /// Built here from Debian packages by the image scripts.
    Build,
    /// Downloaded from `<url>/<version>/manifest.json` and the files it lists: an `https://`
    /// URL, or `http://` to a loopback host.
    Download(String),
}

/// Finds, verifies, builds or downloads assets under the cache directory.
///
/// Cheap to clone; clones share what has been verified, so only the first
/// [`ensure`](Self::ensure) of a process touches the disk.
#[derive(Debug, Clone)]
pub struct AssetStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    /// Assets verified by this process: trusted for its lifetime.
    verified: Mutex<BTreeMap<AssetKind, PathBuf>>,
    /// One readying at a time per store; other processes are kept out by the file lock.
    readying: tokio::sync::Mutex<()>,
}

impl AssetStore {
    /// A store for `config`'s directories and policies.
    pub fn new(config: &AssetConfig) -> Self {
        let inputs = Inputs::embedded();
        let builder = Arc::new(ScriptBuilder::new(
            inputs.clone(),
            build_cache(&config.images_dir),
        ));
        Self::with_parts(config, inputs, builder)
    }

    pub(crate) fn with_parts(
        config: &AssetConfig,
        inputs: Inputs,
        builder: Arc<dyn Builder>,
    ) -> Self {
        let store = Store {
            images_dir: config.images_dir.clone(),
            version: config.version.clone().unwrap_or_else(|| inputs.version()),
            pinned: config.version.is_some(),
            inputs,
            builder,
            source: config.source.clone(),
            manifest_sha256: config.manifest_sha256.clone(),
            on_lock_wait: None,
        };
        Self::from_store(store)
    }

    fn from_store(store: Store) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                verified: Mutex::new(BTreeMap::new()),
                readying: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// The asset version in use: [`AssetConfig::version`], or the one derived from
    /// the build inputs compiled into this library.
    pub fn version(&self) -> &str {
        &self.inner.store.version
    }

    /// The directory holding this version's assets and `manifest.json`.
    pub fn version_dir(&self) -> PathBuf {
        self.inner.store.version_dir()
    }

    /// What the manifest records about `language`'s root filesystem (its inputs key and
    /// package lock), or `None` when it is not listed yet. The packages layer derives the
    /// guest's interpreter and glibc versions from it.
    pub(crate) fn rootfs_facts(
        &self,
        language: Language,
    ) -> Result<Option<RootfsFacts>, AssetError> {
        let manifest = self.inner.store.manifest()?;
        Ok(manifest.and_then(|m| {
            m.get(AssetKind::Rootfs(language)).map(|entry| RootfsFacts {
                inputs: entry.inputs.clone(),
                lock: entry.lock.clone(),
            })
        }))
    }

    /// Makes sure the kernel, initramfs and the root filesystems of `languages` exist and match
    /// the manifest, building or downloading what is missing (unless offline).
    ///
    /// A file that does not match its manifest is an [`AssetError::Checksum`], never silently
    /// replaced. After the first success in a process, further calls for the same assets return
    /// at once.
    pub async fn ensure(&self, languages: &[Language]) -> Result<GuestAssets, AssetError> {
        let needed = AssetKind::needed(languages);
        if let Some(assets) = self.verified(&needed, languages) {
            return Ok(assets);
        }
        let _turn = self.inner.readying.lock().await;
        if let Some(assets) = self.verified(&needed, languages) {
            return Ok(assets);
        }
        let inner = Arc::clone(&self.inner);
        let wanted = needed.clone();
        let found = run_blocking(move || inner.store.ready(&wanted)).await?;
        self.inner
            .verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(found);
        Ok(self
            .verified(&needed, languages)
            .expect("ready returns every needed asset"))
    }

    /// Readies every language, then copies the version directory (assets, lock files,
    /// `manifest.json`) to `dest/<version>/`: serve `dest` over HTTP and point
    /// `EXEC_SANDBOX_ASSET_BASE_URL` at it to let other hosts download instead of build.
    /// Returns the new directory; an existing one is an error, never overwritten.
    pub async fn export(&self, dest: &Path) -> Result<PathBuf, AssetError> {
        self.ensure(&Language::ALL).await?;
        let inner = Arc::clone(&self.inner);
        let dest = dest.to_path_buf();
        run_blocking(move || inner.store.export(&dest)).await
    }

    /// Version directories other than this store's, and the bytes removing them would free
    /// (files hard-linked into this version count nothing).
    pub(crate) async fn other_versions(&self) -> Result<(Vec<PathBuf>, u64), AssetError> {
        let inner = Arc::clone(&self.inner);
        run_blocking(move || inner.store.other_versions()).await
    }

    /// Removes every version directory but this store's, under the store's lock (nothing is
    /// being built meanwhile); returns how many went and the bytes that freed. Another
    /// configuration's version (`EXEC_SANDBOX_ASSET_VERSION`) goes too: it is rebuilt or
    /// downloaded when next used.
    pub(crate) async fn prune_other_versions(&self) -> Result<(usize, u64), AssetError> {
        let inner = Arc::clone(&self.inner);
        run_blocking(move || inner.store.prune_other_versions()).await
    }

    /// The assets for `languages`, if this process verified all of `needed` already.
    fn verified(&self, needed: &[AssetKind], languages: &[Language]) -> Option<GuestAssets> {
        let verified = self
            .inner
            .verified
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !needed.iter().all(|k| verified.contains_key(k)) {
            return None;
        }
        Some(GuestAssets {
            version: self.inner.store.version.clone(),
            kernel: verified[&AssetKind::Kernel].clone(),
            initramfs: verified[&AssetKind::Initramfs].clone(),
            rootfs: languages
                .iter()
                .map(|&l| (l, verified[&AssetKind::Rootfs(l)].clone()))
                .collect(),
        })
    }
}

/// Runs file system, build and download work off the async threads.
/// The build scripts' work cache (kernel and QEMU trees, debootstrap tarballs) next to the
/// images directory `images_dir`.
pub(crate) fn build_cache(images_dir: &Path) -> PathBuf {
    images_dir.parent().unwrap_or(images_dir).join("build")
}

async fn run_blocking<T: Send + 'static>(
    job: impl FnOnce() -> Result<T, AssetError> + Send + 'static,
) -> Result<T, AssetError> {
    match tokio::task::spawn_blocking(job).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(AssetError::Io {
            action: "finish preparing assets in",
            path: PathBuf::new(),
            source: std::io::Error::other("the async runtime is shutting down"),
        }),
    }
}
