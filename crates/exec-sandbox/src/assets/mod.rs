//! Guest assets: the kernel, the agent initramfs and one root filesystem per language.
//!
//! INTERFACE STUB — the assets engineer owns this module and replaces the bodies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sbx_protocol::Language;

use crate::error::ErrorKind;

/// Failure to ready guest assets.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    /// An asset is missing and the configuration forbids building or downloading it.
    #[error("asset `{name}` is missing from {dir} and offline mode forbids fetching it")]
    NotFound {
        /// Asset file name.
        name: String,
        /// Directory searched.
        dir: PathBuf,
    },
}

impl AssetError {
    /// Stable kind of the failure.
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::Permanent
    }

    /// What the user can do about it.
    pub fn hint(&self) -> Option<String> {
        None
    }
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

/// Finds, verifies, builds or downloads assets under the cache directory.
#[derive(Debug, Clone)]
pub struct AssetStore {
    config: crate::SchedulerConfig,
}

impl AssetStore {
    /// A store for `config`'s directories and policies.
    pub fn new(config: &crate::SchedulerConfig) -> Self {
        Self {
            config: config.clone(),
        }
    }

    /// Makes sure the kernel, initramfs and the root filesystems of `languages` exist and match
    /// the manifest, building or downloading what is missing (unless offline).
    pub async fn ensure(&self, languages: &[Language]) -> Result<GuestAssets, AssetError> {
        let _ = languages;
        Err(AssetError::NotFound {
            name: "vmlinux".into(),
            dir: self.config.images_dir.clone(),
        })
    }
}
