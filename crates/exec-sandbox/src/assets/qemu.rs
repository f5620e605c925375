//! exec-sandbox's own QEMU: `qemu-system-x86_64` built by `images/build-qemu.sh` with the
//! microvm machine and the virtio-mmio devices VMs use, and nothing else, from Debian's source of
//! the installed `qemu-system-x86` (its patches included).
//!
//! Debian's binary carries every device, display and audio backend and links 50 libraries; each
//! QEMU process pays their relocation and start-up, and a hostile guest meets whatever device
//! code is compiled in. The own build is half the code and a fifth of the written data, starts in
//! 3.5 ms instead of 14 and costs an idle VM ~10 MB less (`docs/measurements.md`).
//!
//! It lives in [`DIR`]`/<key>/bin/`, the key hashing the build script and the identity (size,
//! mtime) of Debian's installed binary, which stands for its version at the cost of one `stat`
//! (`dpkg-query` took 10 ms of every start): a security update of Debian's QEMU replaces that
//! binary and selects a new build on the next start. A system
//! directory, not the cache: it is host code, built by root once for every user of the machine,
//! and the jail already shows QEMU `/usr` (a binary in the cache would bring the cache's path
//! into QEMU's view). It is built locally only, never downloaded.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::AssetError;
use super::build::run_logged;
use super::inputs::hash_parts;
use super::lock::DirLock;
use crate::disk::Dir;
use crate::sys;

/// The build script, embedded at compile time.
const SCRIPT: &str = include_str!(concat!(env!("OUT_DIR"), "/build-qemu.sh"));

/// The name in progress lines and errors.
const ASSET: &str = "qemu";

/// The binary, below a build's directory (the prefix the jail binds).
const BINARY: &str = "bin/qemu-system-x86_64";

/// Where the builds live.
pub(crate) const DIR: &str = "/usr/local/lib/exec-sandbox/qemu";

/// Debian's binary, whose identity keys the build of its package's source.
const DEBIAN_BINARY: &str = "/usr/bin/qemu-system-x86_64";

/// Builds and finds the own QEMU under [`DIR`].
#[derive(Debug, Clone)]
pub(crate) struct OwnQemu {
    /// [`DIR`], or a test's directory.
    dir: PathBuf,
    /// The scripts' work cache (`SBX_BUILD_CACHE`): the source and build trees.
    build_cache: PathBuf,
}

impl OwnQemu {
    /// The own QEMU in `dir` (normally [`DIR`]), built in `build_cache`.
    pub(crate) fn new(dir: &Path, build_cache: PathBuf) -> Self {
        Self {
            dir: dir.to_path_buf(),
            build_cache,
        }
    }

    /// The binary for the installed Debian QEMU, built first when missing (root only; minutes,
    /// with progress).
    pub(crate) fn ensure(&self) -> Result<PathBuf, AssetError> {
        if let Some(found) = installed_fingerprint().and_then(|v| self.existing(&v)) {
            check_root_owned(&found)?;
            return Ok(found);
        }
        if sys::effective_uid() != 0 {
            return Err(AssetError::NeedsRoot {
                asset: ASSET.into(),
            });
        }
        if SCRIPT.is_empty() {
            return Err(AssetError::MissingInput {
                asset: ASSET.into(),
                input: "build-qemu.sh",
            });
        }
        crate::trust::ensure(&self.build_cache)?;
        // Readable and searchable by all (QEMU's user execs the binary), writable by root only.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&self.dir)
            .map_err(AssetError::io("create", &self.dir))?;
        check_root_owned(&self.dir)?;
        let dir = Dir::open(&self.dir).map_err(AssetError::io("open", &self.dir))?;
        let _lock = DirLock::acquire(&dir, || {
            tracing::info!("waiting for another process to finish building QEMU");
        })?;
        // Another process may have built it meanwhile.
        if let Some(found) = installed_fingerprint().and_then(|v| self.existing(&v)) {
            return Ok(found);
        }
        tracing::info!("building exec-sandbox's QEMU (microvm only, ~2.5 min on 2 cores, once)");
        // The script installs Debian's QEMU when missing: the key is known only afterwards.
        let building = self.dir.join(format!(".build-{}", std::process::id()));
        remove_leftover(&building)?;
        let mut command = Command::new("bash");
        command
            .arg("-c")
            .arg(SCRIPT)
            .arg("build-qemu")
            .arg(&building)
            .env("SBX_BUILD_CACHE", &self.build_cache);
        let built = run_logged(command, ASSET, &self.dir.join("build-qemu.log"));
        let fingerprint = built.and_then(|()| {
            installed_fingerprint().ok_or_else(|| {
                AssetError::io("inspect", DEBIAN_BINARY)(std::io::Error::other(
                    "Debian's QEMU is not installed after the build",
                ))
            })
        });
        let fingerprint = match fingerprint {
            Ok(fingerprint) => fingerprint,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&building);
                return Err(e);
            }
        };
        let target = self.dir.join(key(SCRIPT, &fingerprint));
        remove_leftover(&target)?;
        std::fs::rename(&building, &target).map_err(AssetError::io("install", &target))?;
        Ok(target.join(BINARY))
    }

    /// [`Self::ensure`] off the async runtime's threads.
    pub(crate) async fn ready(&self) -> Result<PathBuf, AssetError> {
        let own = self.clone();
        super::run_blocking(move || own.ensure()).await
    }

    /// Builds for other Debian QEMU versions or other build scripts, and the bytes removing
    /// them would free; none when Debian's QEMU is not installed (the current build is unknown).
    fn others(&self) -> Result<(Vec<PathBuf>, u64), AssetError> {
        let Some(current) = current_key() else {
            return Ok((Vec::new(), 0));
        };
        super::prune::others(&self.dir, &current).map_err(AssetError::io("inspect", &self.dir))
    }

    /// Removes [`Self::others`] under the build lock (root only: otherwise nothing is removed);
    /// returns how many went and the bytes that freed.
    fn prune_others(&self) -> Result<(usize, u64), AssetError> {
        if sys::effective_uid() != 0 {
            return Ok((0, 0));
        }
        let dir = match Dir::open(&self.dir) {
            Ok(dir) => dir,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, 0)),
            Err(e) => return Err(AssetError::io("open", &self.dir)(e)),
        };
        let _lock = DirLock::acquire(&dir, || {
            tracing::info!("waiting for another process to finish building QEMU");
        })?;
        let Some(current) = current_key() else {
            return Ok((0, 0));
        };
        super::prune::remove_others(&self.dir, &current).map_err(AssetError::io("prune", &self.dir))
    }

    /// [`Self::others`] off the async runtime's threads.
    pub(crate) async fn unused(&self) -> Result<(Vec<PathBuf>, u64), AssetError> {
        let own = self.clone();
        super::run_blocking(move || own.others()).await
    }

    /// [`Self::prune_others`] off the async runtime's threads.
    pub(crate) async fn prune_unused(&self) -> Result<(usize, u64), AssetError> {
        let own = self.clone();
        super::run_blocking(move || own.prune_others()).await
    }

    /// The built binary for Debian's binary of identity `fingerprint`, if there is one.
    fn existing(&self, fingerprint: &str) -> Option<PathBuf> {
        let binary = self.dir.join(key(SCRIPT, fingerprint)).join(BINARY);
        binary.is_file().then_some(binary)
    }
}

/// The directory name of the build of `script` for Debian's binary of identity `fingerprint`.
fn key(script: &str, fingerprint: &str) -> String {
    let mut key = hash_parts(&[script.as_bytes(), fingerprint.as_bytes()]);
    key.truncate(16);
    key
}

/// The directory name of the build for the installed Debian QEMU, the one in use; `None` when
/// Debian's QEMU is not installed (which build is current is then unknown).
fn current_key() -> Option<String> {
    installed_fingerprint().map(|fingerprint| key(SCRIPT, &fingerprint))
}

/// The identity of Debian's installed QEMU binary (its package's version, in effect), if any.
fn installed_fingerprint() -> Option<String> {
    let binary = Path::new(DEBIAN_BINARY);
    binary
        .is_file()
        .then(|| crate::snapshot::key::file_identity(binary))
}

/// Host code runs from `path`: it and every directory above it must be root's and writable by
/// nobody else, or nothing is run from it.
fn check_root_owned(path: &Path) -> Result<(), AssetError> {
    for p in path.ancestors() {
        let meta = std::fs::metadata(p).map_err(AssetError::io("inspect", p))?;
        if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
            return Err(AssetError::io("trust", p)(std::io::Error::other(format!(
                "not root's, or writable by others (owner {}, mode {:o}): exec-sandbox's QEMU is \
                 not run from there",
                meta.uid(),
                meta.mode() & 0o7777
            ))));
        }
    }
    Ok(())
}

/// Removes what an interrupted build left at `path` (a directory of the cache, never a link).
fn remove_leftover(path: &Path) -> Result<(), AssetError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {
            std::fs::remove_dir_all(path).map_err(AssetError::io("remove", path))
        }
        Ok(_) => std::fs::remove_file(path).map_err(AssetError::io("remove", path)),
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_follows_the_script_and_debians_binary() {
        let debian = "/usr/bin/qemu-system-x86_64:18397984:1779741869.0";
        let base = key("script", debian);
        assert_eq!(base.len(), 16);
        assert!(base.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(base, key("script", debian));
        let updated = "/usr/bin/qemu-system-x86_64:18398112:1781000000.0";
        assert_ne!(base, key("script", updated), "a security update");
        assert_ne!(base, key("script2", debian), "a new recipe");
        // Lengths are part of the hash: moving a byte between the parts changes it.
        assert_ne!(key("ab", "c"), key("a", "bc"));
    }

    #[test]
    fn the_script_is_embedded_and_builds_only_the_microvm_devices() {
        assert!(SCRIPT.contains("--without-default-devices"), "{SCRIPT}");
        for device in ["VIRTIO_BLK", "VIRTIO_NET", "VIRTIO_SERIAL", "VIRTIO_RNG"] {
            assert!(SCRIPT.contains(&format!("CONFIG_{device}=y")), "{device}");
        }
    }

    #[test]
    fn only_root_owned_directories_writable_by_root_alone_are_trusted() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("qemu");
        std::fs::create_dir(&dir).unwrap();
        let set = |mode| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode));
        set(0o755).unwrap();
        // /tmp itself is sticky and world-writable: a tempdir is never a trusted place.
        let err = check_root_owned(&dir).unwrap_err().to_string();
        assert!(err.contains("trust"), "{err}");
        assert!(check_root_owned(Path::new("/usr/bin")).is_ok());
        set(0o777).unwrap();
        let err = check_root_owned(&dir).unwrap_err();
        assert!(
            format!("{err:?}").contains(&dir.display().to_string()),
            "{err:?}"
        );
    }

    #[test]
    fn a_built_binary_is_found_by_its_key() {
        let tmp = tempfile::tempdir().unwrap();
        let own = OwnQemu::new(tmp.path(), tmp.path().join("build"));
        assert_eq!(own.existing("1.0"), None);
        let bin = tmp.path().join(key(SCRIPT, "1.0")).join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("qemu-system-x86_64"), b"").unwrap();
        assert_eq!(own.existing("1.0"), Some(bin.join("qemu-system-x86_64")));
        assert_eq!(
            own.existing("1.1"),
            None,
            "another Debian version needs its own build"
        );
    }
}
