//! Readying a version directory: find and verify what is there, produce what is missing.
//!
//! ```text
//! <images_dir>/
//!   .lock                        flock: held while anything below is being produced
//!   <version>/                   one per set of build inputs (or EXEC_SANDBOX_ASSET_VERSION)
//!     manifest.json              name, file, sha256, size, inputs key, lock text per asset
//!     verified.json              stamps: fingerprints of files already hashed
//!     vmlinux  initramfs.cpio  rootfs-<language>.erofs    (read-only)
//!     kernel.lock  rootfs-<language>.lock                 (package versions, also in the manifest)
//!     build-<asset>.log          output of the last build of that asset
//! ```
//!
//! Missing assets come, in order of preference, from another version directory holding the
//! same asset (same inputs key, or same SHA-256 for a download: hard-linked, so an agent change
//! costs no kernel or root filesystem rebuild), from the operator's server, or from a build.
//! Everything is produced under the lock and renamed into place, and the manifest is rewritten
//! after each asset, so a failure later on keeps what was finished.
//!
//! The images directory is checked (`crate::trust`) before anything is read from it, and every
//! file in it is opened through a directory handle without following symbolic links.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::build::Builder;
use super::download::Remote;
use super::files::{self, TempFile};
use super::initramfs;
use super::inputs::{AssetKind, Inputs};
use super::lock::DirLock;
use super::manifest::{self, Entry, Manifest};
use super::stamp::{Check, Stamps};
use super::{AssetError, AssetSource};
use crate::disk::Dir;

/// The synchronous core of the asset store (it runs on a blocking thread).
#[derive(Debug)]
pub(crate) struct Store {
    pub(crate) images_dir: PathBuf,
    pub(crate) version: String,
    /// The version was chosen explicitly: its manifest is taken as it is, whatever inputs its
    /// assets were made from.
    pub(crate) pinned: bool,
    pub(crate) inputs: Inputs,
    pub(crate) builder: Arc<dyn Builder>,
    pub(crate) source: AssetSource,
    /// The SHA-256 the downloaded `manifest.json` must have, when the operator pinned it.
    pub(crate) manifest_sha256: Option<String>,
    /// Called when the lock is held by someone else (tests use it to order events).
    pub(crate) on_lock_wait: Option<Hook>,
}

/// A callback, opaque to `Debug`.
#[derive(Clone)]
pub(crate) struct Hook(pub(crate) Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hook")
    }
}

/// Assets found so far, and the ones still missing.
type Survey = (BTreeMap<AssetKind, PathBuf>, Vec<AssetKind>);

/// The operator's server and the manifest it serves, once fetched.
type Served = Option<(Remote, Manifest)>;

impl Store {
    pub(crate) fn version_dir(&self) -> PathBuf {
        self.images_dir.join(&self.version)
    }

    /// The images directory, checked and created (private) if missing.
    fn images(&self) -> Result<Dir, AssetError> {
        crate::trust::ensure(&self.images_dir)?;
        Dir::open(&self.images_dir).map_err(AssetError::io("open", &self.images_dir))
    }

    /// This version's directory, if there is one: the images directory is checked first, and
    /// nothing is created.
    pub(crate) fn open_version(&self) -> Result<Option<Dir>, AssetError> {
        crate::trust::check(&self.images_dir)?;
        let images = match Dir::open(&self.images_dir) {
            Ok(images) => images,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(AssetError::io("open", &self.images_dir)(e)),
        };
        match images.open_dir(&self.version) {
            Ok(dir) => Ok(Some(dir)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(AssetError::io("open", self.version_dir())(e)),
        }
    }

    /// See [`super::AssetStore::other_versions`].
    pub(crate) fn other_versions(&self) -> Result<(Vec<PathBuf>, u64), AssetError> {
        crate::trust::check(&self.images_dir)?;
        super::prune::others(&self.images_dir, &self.version)
            .map_err(AssetError::io("inspect", &self.images_dir))
    }

    /// See [`super::AssetStore::prune_other_versions`].
    pub(crate) fn prune_other_versions(&self) -> Result<(usize, u64), AssetError> {
        if !self.images_dir.exists() {
            return Ok((0, 0));
        }
        let images = self.images()?;
        let _lock = DirLock::acquire(&images, || {
            tracing::info!("waiting for another process to finish with the guest images");
        })?;
        crate::trust::check(&self.images_dir)?;
        super::prune::remove_others(&self.images_dir, &self.version)
            .map_err(AssetError::io("prune", &self.images_dir))
    }

    /// This version's manifest, if there is one.
    pub(crate) fn manifest(&self) -> Result<Option<Manifest>, AssetError> {
        match self.open_version()? {
            Some(dir) => Manifest::load(&dir),
            None => Ok(None),
        }
    }

    /// Makes every asset in `needed` present and verified; returns their paths.
    pub(crate) fn ready(
        &self,
        needed: &[AssetKind],
    ) -> Result<BTreeMap<AssetKind, PathBuf>, AssetError> {
        if !manifest::is_version_name(&self.version) {
            return Err(AssetError::InvalidVersion {
                version: self.version.clone(),
            });
        }

        // Without the lock: whatever the manifest lists is complete.
        let (found, missing) = match self.open_version()? {
            Some(dir) => {
                let manifest = Manifest::load(&dir)?;
                self.survey(&dir, manifest.as_ref(), needed)?
            }
            None => (BTreeMap::new(), needed.to_vec()),
        };
        if missing.is_empty() {
            return Ok(found);
        }
        if self.source == AssetSource::Forbidden {
            return Err(AssetError::NotFound {
                missing: missing.iter().map(|k| k.file()).collect(),
                dir: self.version_dir(),
            });
        }

        let images = self.images()?;
        let dir = images
            .create_dir(&self.version)
            .map_err(AssetError::io("create", self.version_dir()))?;
        let _lock = DirLock::acquire(&images, || {
            tracing::info!("waiting for another process to finish preparing the guest assets");
            if let Some(Hook(hook)) = &self.on_lock_wait {
                hook();
            }
        })?;
        // Another process may have produced them while this one waited.
        let mut manifest = Manifest::load(&dir)?.unwrap_or_else(|| Manifest::new(&self.version));
        let (mut found, missing) = self.survey(&dir, Some(&manifest), needed)?;
        let mut remote = None;
        if missing.iter().any(|&k| k != AssetKind::Initramfs) {
            // The server's manifest (checked against the operator's pin) comes before anything
            // is installed.
            self.served(&mut remote)?;
        }
        for kind in missing {
            let entry = self.produce(kind, &images, &dir, &mut remote)?;
            let mut stamps = Stamps::load(&dir);
            stamps.stamp_now(&entry.file, &entry.sha256)?;
            found.insert(kind, dir.join(&entry.file));
            manifest.upsert(entry);
            manifest.save(&dir)?;
            stamps.save();
        }
        Ok(found)
    }

    /// Verifies the listed assets among `needed`; unlisted or absent ones are missing.
    fn survey(
        &self,
        dir: &Dir,
        manifest: Option<&Manifest>,
        needed: &[AssetKind],
    ) -> Result<Survey, AssetError> {
        let mut found = BTreeMap::new();
        let mut missing = Vec::new();
        let mut stamps = Stamps::load(dir);
        for &kind in needed {
            let entry = manifest
                .and_then(|m| m.get(kind))
                .filter(|e| self.pinned || e.inputs == self.inputs.key(kind));
            match entry.map(|e| stamps.check(e)).transpose() {
                Ok(Some(Check::Verified(path))) => {
                    found.insert(kind, path);
                }
                Ok(Some(Check::Missing) | None) => missing.push(kind),
                Err(e) => {
                    stamps.save();
                    return Err(e);
                }
            }
        }
        stamps.save();
        Ok((found, missing))
    }

    /// The operator's server and its manifest for this version, fetched on first use (when
    /// assets are downloaded; `None` otherwise).
    fn served<'r>(
        &self,
        remote: &'r mut Served,
    ) -> Result<Option<&'r (Remote, Manifest)>, AssetError> {
        let AssetSource::Download(base) = &self.source else {
            return Ok(None);
        };
        if remote.is_none() {
            let server = Remote::new(base, &self.version, self.manifest_sha256.as_deref())?;
            let listing = server.manifest()?;
            *remote = Some((server, listing));
        }
        Ok(remote.as_ref())
    }

    /// Puts `kind` into `dir` (this version's, in `images`) and returns its manifest entry.
    fn produce(
        &self,
        kind: AssetKind,
        images: &Dir,
        dir: &Dir,
        remote: &mut Served,
    ) -> Result<Entry, AssetError> {
        if kind == AssetKind::Initramfs {
            // Always this library's own agent: it must speak this library's protocol.
            return self.write_initramfs(dir);
        }
        match &self.source {
            AssetSource::Download(_) => {
                let (server, listing) = self.served(remote)?.expect("downloading");
                let wanted = listing.get(kind).ok_or_else(|| AssetError::Manifest {
                    location: server.url(manifest::FILE),
                    reason: format!("it does not list {kind}"),
                })?;
                if !self.pinned && wanted.inputs != self.inputs.key(kind) {
                    return Err(AssetError::Manifest {
                        location: server.url(manifest::FILE),
                        reason: format!(
                            "its {kind} was built from other inputs than this version's"
                        ),
                    });
                }
                if let Some(entry) = self.reuse(kind, images, dir, |e| e.sha256 == wanted.sha256)? {
                    return Ok(entry);
                }
                let temp = server.fetch(wanted, dir)?;
                self.install(temp, wanted.clone(), dir)
            }
            AssetSource::Build => {
                let key = self.inputs.key(kind);
                if let Some(entry) = self.reuse(kind, images, dir, |e| e.inputs == key)? {
                    return Ok(entry);
                }
                self.build(kind, dir)
            }
            AssetSource::Forbidden => unreachable!("checked before taking the lock"),
        }
    }

    fn write_initramfs(&self, dir: &Dir) -> Result<Entry, AssetError> {
        let kind = AssetKind::Initramfs;
        tracing::info!("writing the initramfs");
        let bytes = initramfs::archive(self.inputs.agent);
        let temp = TempFile::in_dir(dir, &kind.file());
        std::io::Write::write_all(&mut temp.create(dir)?, &bytes)
            .map_err(AssetError::io("write", temp.path()))?;
        let (sha256, size) = files::sha256_reader(&bytes[..]).expect("reading memory cannot fail");
        let entry = Entry {
            name: kind.name(),
            file: kind.file(),
            sha256,
            size,
            inputs: self.inputs.key(kind),
            lock: None,
        };
        self.install(temp, entry, dir)
    }

    fn build(&self, kind: AssetKind, dir: &Dir) -> Result<Entry, AssetError> {
        tracing::info!("building {kind} ({})", kind.build_duration_hint());
        let out = tempfile::Builder::new()
            .prefix(&format!(".build-{kind}-"))
            .tempdir_in(dir.path())
            .map_err(AssetError::io("create a build directory in", dir.path()))?;
        let log = dir.join(&format!("build-{kind}.log"));
        self.builder.build(kind, out.path(), &log)?;
        let built = out.path().join(kind.file());
        if !built.is_file() {
            return Err(AssetError::BuildOutput {
                asset: kind.name(),
                missing: built,
                log,
            });
        }
        let lock = kind.lock_file().and_then(|name| {
            let text = fs::read_to_string(out.path().join(&name)).ok();
            if text.is_none() {
                tracing::warn!(
                    "the {kind} build wrote no {name}: its package versions are not recorded"
                );
            }
            text
        });
        let (sha256, size) = files::sha256_file(&built)?;
        let entry = Entry {
            name: kind.name(),
            file: kind.file(),
            sha256,
            size,
            inputs: self.inputs.key(kind),
            lock,
        };
        tracing::info!("built {kind} ({})", super::stamp::human_size(size));
        let out_dir = Dir::open(out.path()).map_err(AssetError::io("open", out.path()))?;
        files::install(&out_dir, &kind.file(), dir, &entry.file)?;
        write_lock_file(dir, &entry)?;
        Ok(entry)
    }

    /// Moves a verified temporary file into place as `entry.file`, with its lock file.
    fn install(&self, temp: TempFile, entry: Entry, dir: &Dir) -> Result<Entry, AssetError> {
        files::install(dir, temp.name(), dir, &entry.file)?;
        temp.keep();
        write_lock_file(dir, &entry)?;
        Ok(entry)
    }

    /// Links `kind` from another version directory in `images` whose entry satisfies
    /// `matches` and whose file still verifies.
    fn reuse(
        &self,
        kind: AssetKind,
        images: &Dir,
        dir: &Dir,
        matches: impl Fn(&Entry) -> bool,
    ) -> Result<Option<Entry>, AssetError> {
        let Ok(siblings) = fs::read_dir(images.path()) else {
            return Ok(None);
        };
        for sibling in siblings.flatten() {
            let Ok(name) = sibling.file_name().into_string() else {
                continue;
            };
            if name == self.version || name.starts_with('.') {
                continue;
            }
            // A link or a file in place of a version directory is not one.
            let Ok(other) = images.open_dir(&name) else {
                continue;
            };
            let Ok(Some(listing)) = Manifest::load(&other) else {
                continue;
            };
            let Some(entry) = listing.get(kind).filter(|e| matches(e)) else {
                continue;
            };
            let mut stamps = Stamps::load(&other);
            let checked = stamps.check(entry);
            stamps.save();
            match checked {
                Ok(Check::Verified(_)) => {}
                Ok(Check::Missing) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "not reusing {kind} from {}", other.path().display());
                    continue;
                }
            }
            tracing::info!("reusing {kind} from version {name}");
            let temp = TempFile::in_dir(dir, &entry.file);
            let target = dir.join(&entry.file);
            if other.hard_link(&entry.file, dir, temp.name()).is_ok() {
                // Same inode, already read-only and verified.
                dir.rename(temp.name(), dir, &entry.file)
                    .map_err(AssetError::io("rename into place", &target))?;
                temp.keep();
            } else {
                let source = other.join(&entry.file);
                let mut from = other
                    .open_file(&entry.file)
                    .map_err(AssetError::io("open", &source))?;
                std::io::copy(&mut from, &mut temp.create(dir)?)
                    .map_err(AssetError::io("copy", &source))?;
                files::install(dir, temp.name(), dir, &entry.file)?;
                temp.keep();
            }
            write_lock_file(dir, entry)?;
            return Ok(Some(entry.clone()));
        }
        Ok(None)
    }

    /// Copies the version directory's assets, lock files and manifest to `dest/<version>/`, the
    /// layout a server for `asset_base_url` must have.
    pub(crate) fn export(&self, dest: &Path) -> Result<PathBuf, AssetError> {
        let not_found = || AssetError::NotFound {
            missing: vec![manifest::FILE.into()],
            dir: self.version_dir(),
        };
        let dir = self.open_version()?.ok_or_else(not_found)?;
        let listing = Manifest::load(&dir)?.ok_or_else(not_found)?;
        fs::create_dir_all(dest).map_err(AssetError::io("create", dest))?;
        let target = dest.join(&self.version);
        if target.exists() {
            return Err(AssetError::io("export into", &target)(
                std::io::ErrorKind::AlreadyExists.into(),
            ));
        }
        let staging = tempfile::Builder::new()
            .prefix(&format!(".{}-", self.version))
            .tempdir_in(dest)
            .map_err(AssetError::io("create a directory in", dest))?;
        let out = Dir::open(staging.path()).map_err(AssetError::io("open", staging.path()))?;
        for entry in &listing.assets {
            let from = dir.join(&entry.file);
            let mut source = dir
                .open_file(&entry.file)
                .map_err(AssetError::io("open", &from))?;
            let copy = staging.path().join(&entry.file);
            let mut file = File::create(&copy).map_err(AssetError::io("create", &copy))?;
            std::io::copy(&mut source, &mut file).map_err(AssetError::io("copy", &from))?;
            file.set_permissions(fs::Permissions::from_mode(0o444))
                .map_err(AssetError::io("set permissions of", &copy))?;
            write_lock_file(&out, entry)?;
        }
        listing.save(&out)?;
        tracing::info!("exported version {} to {}", self.version, target.display());
        let staging = staging.keep();
        fs::rename(&staging, &target).map_err(AssetError::io("rename into place", &target))?;
        Ok(target)
    }
}

/// Writes the entry's package-version lock text next to it, for people reading the cache.
fn write_lock_file(dir: &Dir, entry: &Entry) -> Result<(), AssetError> {
    let kind = AssetKind::from_name(&entry.name).expect("manifest entries have known names");
    match (kind.lock_file(), &entry.lock) {
        (Some(name), Some(text)) => files::write_atomic(dir, &name, text.as_bytes()),
        _ => Ok(()),
    }
}
