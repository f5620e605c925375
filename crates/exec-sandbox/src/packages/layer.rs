//! A directory packed as a read-only EROFS image, with the manifest that describes it.
//!
//! `mkfs.erofs` is called directly (not through an image script): its options are the whole
//! recipe, and the determinism options belong next to the code that relies on them. The same
//! tree always packs to the same bytes: fixed timestamps (`-T0`), root ownership
//! (`--all-root`), no extended attributes (`-x-1`), a UUID derived from the layer's key, and
//! permissions normalised before packing (0755 directories and executables, 0644 other files:
//! nothing setuid, nothing writable, whatever the host's umask). Installing the same closure
//! twice may still differ in a few bytes (Python's `.pyc` marshalling is not fully
//! reproducible), which is why each manifest records the sha256 of its own image.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::PackageError;
use super::tool::{self, Tools};
use super::{Pin, Target};
use crate::limits;

/// The layer layout and manifest format; part of every key, so a change rebuilds every layer.
pub(crate) const FORMAT: u32 = 1;
/// The image's file name in an entry.
pub(crate) const LAYER_FILE: &str = "layer.erofs";
/// The manifest's file name in an entry.
pub(crate) const MANIFEST_FILE: &str = "manifest.json";
/// Longest manifest accepted (it lists a closure: thousands of pins at most).
pub(crate) const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// What a layer holds and how to check it, written last into its entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LayerManifest {
    /// [`FORMAT`].
    pub(crate) format: u32,
    /// The cache key (also the entry's directory name and the L3 object name).
    pub(crate) key: String,
    /// The guest interpreter it was built for.
    pub(crate) target: Target,
    /// The top-level pins asked for (sorted).
    pub(crate) requested: Vec<Pin>,
    /// Everything installed: the pins and their dependencies (sorted).
    pub(crate) closure: Vec<Pin>,
    /// Hex sha256 of [`LAYER_FILE`].
    pub(crate) sha256: String,
    /// Its size in bytes.
    pub(crate) size: u64,
    /// When it was built (ms since the Unix epoch).
    pub(crate) built_unix_ms: u64,
    /// How long resolving nothing, installing and packing took (ms).
    pub(crate) install_ms: u64,
    /// Modules a template imports before it is saved (the requested packages' top-level
    /// modules); absent in manifests written before it existed.
    #[serde(default)]
    pub(crate) warm_modules: Vec<String>,
}

impl LayerManifest {
    /// Parses a manifest and checks the fields later steps trust, for the entry `key`.
    pub(crate) fn parse(bytes: &[u8], key: &str) -> Result<Self, String> {
        let manifest: LayerManifest =
            serde_json::from_slice(bytes).map_err(|e| format!("invalid {MANIFEST_FILE}: {e}"))?;
        if manifest.format != FORMAT {
            return Err(format!(
                "format {} is not the supported {FORMAT}",
                manifest.format
            ));
        }
        if manifest.key != key {
            return Err(format!("it is the manifest of {}", manifest.key));
        }
        if !(manifest.sha256.len() == 64
            && manifest
                .sha256
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        {
            return Err(format!("`{}` is not a sha256", manifest.sha256));
        }
        Ok(manifest)
    }

    /// The manifest as written to disk.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let mut text = serde_json::to_vec_pretty(self).expect("a manifest serializes");
        text.push(b'\n');
        text
    }
}

/// The cache key of a layer: sha256 over the format, the target (ecosystem, image, interpreter,
/// glibc) and the sorted, deduplicated top-level pins. The order the pins were asked in does
/// not matter.
pub(crate) fn key(target: &Target, pins: &[Pin]) -> String {
    #[derive(Serialize)]
    struct KeyInput<'a> {
        format: u32,
        target: &'a Target,
        pins: Vec<&'a Pin>,
    }
    let mut sorted: Vec<&Pin> = pins.iter().collect();
    sorted.sort();
    sorted.dedup();
    let input = KeyInput {
        format: FORMAT,
        target,
        pins: sorted,
    };
    let bytes = serde_json::to_vec(&input).expect("plain data serializes");
    hex::encode(Sha256::digest(bytes))
}

/// Packs `tree` into the EROFS image `out` (LZ4HC, deterministic), installing mkfs.erofs with
/// apt first when it is missing and that is allowed.
pub(crate) fn pack(
    tools: &Tools,
    tree: &Path,
    out: &Path,
    key: &str,
    progress: &dyn Fn(&str),
) -> Result<(), PackageError> {
    normalize_tree(tree)?;
    progress("packing the layer (EROFS)");
    let run = || {
        let mut command = tools.command(&tools.mkfs_erofs);
        command
            .args(["-zlz4hc", "-x-1", "-T0", "--all-root", "--quiet"])
            .arg(format!("-U{}", uuid_of(key)))
            .arg(out)
            .arg(tree);
        tool::run("mkfs.erofs", command, limits::PACKAGE_INSTALL_DEADLINE)
    };
    let output = match run() {
        Err(PackageError::ToolMissing { .. })
            if tools.install_with_apt("erofs-utils", progress) =>
        {
            run()?
        }
        other => other?,
    };
    if !output.status.success() {
        return Err(output.failed("mkfs.erofs"));
    }
    Ok(())
}

/// A UUID made of the key's first 128 bits: stable for the layer, distinct between layers.
fn uuid_of(key: &str) -> String {
    let h = |range: std::ops::Range<usize>| key.get(range).unwrap_or("0");
    format!(
        "{}-{}-{}-{}-{}",
        h(0..8),
        h(8..12),
        h(12..16),
        h(16..20),
        h(20..32)
    )
}

/// Makes the tree's permissions independent of the host's umask and safe to share: 0755 for
/// directories and for files with any execute bit, 0644 for other files; symbolic links are
/// kept; anything else (device nodes, sockets, fifos: no installer makes them) is removed.
pub(crate) fn normalize_tree(dir: &Path) -> Result<(), PackageError> {
    let entries = fs::read_dir(dir).map_err(PackageError::io("read", dir))?;
    for entry in entries {
        let entry = entry.map_err(PackageError::io("read", dir))?;
        let path = entry.path();
        let meta = fs::symlink_metadata(&path).map_err(PackageError::io("inspect", &path))?;
        let kind = meta.file_type();
        if kind.is_symlink() {
            continue;
        }
        let mode = if kind.is_dir() {
            normalize_tree(&path)?;
            0o755
        } else if kind.is_file() {
            if meta.permissions().mode() & 0o111 != 0 {
                0o755
            } else {
                0o644
            }
        } else {
            fs::remove_file(&path).map_err(PackageError::io("remove", &path))?;
            continue;
        };
        if meta.permissions().mode() & 0o7777 != mode {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                .map_err(PackageError::io("set permissions of", &path))?;
        }
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
        .map_err(PackageError::io("set permissions of", dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packages::Ecosystem;

    fn pin(name: &str, version: &str) -> Pin {
        Pin {
            name: name.into(),
            version: version.into(),
        }
    }

    fn target() -> Target {
        Target {
            ecosystem: Ecosystem::Python,
            image_version: "2b3ba75f5bc02866".into(),
            interpreter: "3.11".into(),
            glibc: "2.36".into(),
        }
    }

    #[test]
    fn the_key_ignores_order_and_duplicates_but_not_content() {
        let t = target();
        let a = key(&t, &[pin("numpy", "2.1.3"), pin("pandas", "2.2.3")]);
        assert_eq!(a.len(), 64);
        assert_eq!(
            a,
            key(
                &t,
                &[
                    pin("pandas", "2.2.3"),
                    pin("numpy", "2.1.3"),
                    pin("numpy", "2.1.3")
                ]
            )
        );
        assert_ne!(a, key(&t, &[pin("numpy", "2.1.3"), pin("pandas", "2.2.2")]));
        let other_image = Target {
            image_version: "other".into(),
            ..t.clone()
        };
        assert_ne!(
            a,
            key(
                &other_image,
                &[pin("numpy", "2.1.3"), pin("pandas", "2.2.3")]
            )
        );
        let npm = Target {
            ecosystem: Ecosystem::Npm,
            ..t
        };
        assert_ne!(
            a,
            key(&npm, &[pin("numpy", "2.1.3"), pin("pandas", "2.2.3")])
        );
    }

    #[test]
    fn manifests_round_trip_and_bad_ones_are_named() {
        let k = key(&target(), &[pin("a", "1")]);
        let manifest = LayerManifest {
            format: FORMAT,
            key: k.clone(),
            target: target(),
            requested: vec![pin("a", "1")],
            closure: vec![pin("a", "1"), pin("b", "2")],
            sha256: "ab".repeat(32),
            size: 4096,
            built_unix_ms: 1,
            install_ms: 2,
            warm_modules: Vec::new(),
        };
        assert_eq!(
            LayerManifest::parse(&manifest.to_bytes(), &k).unwrap(),
            manifest
        );
        assert!(
            LayerManifest::parse(&manifest.to_bytes(), "other")
                .unwrap_err()
                .contains("manifest of")
        );
        let mut bad = manifest.clone();
        bad.sha256 = "../x".into();
        assert!(
            LayerManifest::parse(&bad.to_bytes(), &k)
                .unwrap_err()
                .contains("sha256")
        );
        bad = manifest;
        bad.format = 99;
        assert!(
            LayerManifest::parse(&bad.to_bytes(), &k)
                .unwrap_err()
                .contains("format")
        );
        assert!(LayerManifest::parse(b"{", &k).is_err());
    }

    #[test]
    fn uuids_come_from_the_key() {
        assert_eq!(
            uuid_of(&"0123456789abcdef".repeat(4)),
            "01234567-89ab-cdef-0123-456789abcdef"
        );
    }

    fn write_tree(root: &Path, order: &[&str]) {
        for name in order {
            let path = root.join("python").join(name);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, format!("content of {name}\n")).unwrap();
        }
        let script = root.join("python/bin/tool");
        fs::create_dir_all(script.parent().unwrap()).unwrap();
        fs::write(&script, "#!/usr/bin/python3\n").unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink("../pkg", root.join("python/bin/link")).unwrap();
    }

    /// Needs mkfs.erofs (erofs-utils): fails, never skips, where it is missing.
    #[test]
    fn the_same_tree_packs_to_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        write_tree(&a, &["pkg/__init__.py", "pkg/z.py", "other/y.py"]);
        write_tree(&b, &["other/y.py", "pkg/z.py", "pkg/__init__.py"]);
        // Other timestamps than the first tree's.
        fs::File::options()
            .write(true)
            .open(b.join("python/pkg/z.py"))
            .unwrap()
            .set_modified(
                std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(86_400),
            )
            .unwrap();
        fs::set_permissions(b.join("python/pkg/z.py"), fs::Permissions::from_mode(0o666)).unwrap();
        let k = key(&target(), &[pin("a", "1")]);
        let tools = Tools::default();
        pack(&tools, &a, &dir.path().join("a.erofs"), &k, &|_| {}).unwrap();
        pack(&tools, &b, &dir.path().join("b.erofs"), &k, &|_| {}).unwrap();
        let image_a = fs::read(dir.path().join("a.erofs")).unwrap();
        assert_eq!(image_a, fs::read(dir.path().join("b.erofs")).unwrap());
        // Normalised modes.
        let mode = |p: &str| fs::metadata(a.join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("python/bin/tool"), 0o755);
        assert_eq!(mode("python/pkg/z.py"), 0o644);
        assert_eq!(mode("python/pkg"), 0o755);
        // Another key, another UUID: different bytes.
        let other = key(&target(), &[pin("a", "2")]);
        pack(&tools, &a, &dir.path().join("c.erofs"), &other, &|_| {}).unwrap();
        assert_ne!(image_a, fs::read(dir.path().join("c.erofs")).unwrap());
    }

    #[test]
    fn a_missing_mkfs_is_named() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("tree")).unwrap();
        let tools = Tools {
            mkfs_erofs: "/nonexistent/mkfs.erofs".into(),
            ..Tools::default()
        };
        let err = pack(
            &tools,
            &dir.path().join("tree"),
            &dir.path().join("x.erofs"),
            "k",
            &|_| {},
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                PackageError::ToolMissing {
                    tool: "mkfs.erofs",
                    ..
                }
            ),
            "{err}"
        );
    }
}
