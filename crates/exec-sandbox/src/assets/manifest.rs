//! `manifest.json`: what a version directory holds, with each file's SHA-256.
//!
//! The manifest is written last (atomically), after the files it lists are in place: whatever
//! it lists is complete. It also travels over HTTP for prebuilt downloads, so parsing checks
//! every field a later step trusts (file names, hash syntax).

use serde::{Deserialize, Serialize};

use super::AssetError;
use super::files;
use super::inputs::AssetKind;
use crate::disk::Dir;

/// File name of the manifest in a version directory.
pub(crate) const FILE: &str = "manifest.json";
/// The manifest layout this library reads and writes.
pub(crate) const FORMAT: u32 = 1;
/// Largest manifest accepted (it lists a handful of files).
pub(crate) const MAX_BYTES: u64 = 1 << 20;

/// A version directory's contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Manifest {
    /// Layout version of this file ([`FORMAT`]).
    pub(crate) format: u32,
    /// The version directory name.
    pub(crate) version: String,
    /// Ready assets, in [`AssetKind::ALL`] order.
    pub(crate) assets: Vec<Entry>,
}

/// One ready asset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    /// Asset name (`kernel`, `initramfs`, `rootfs-python`…).
    pub(crate) name: String,
    /// File name inside the version directory.
    pub(crate) file: String,
    /// Hex SHA-256 of the file.
    pub(crate) sha256: String,
    /// Length in bytes.
    pub(crate) size: u64,
    /// The inputs key the asset was made from (see `inputs.rs`).
    pub(crate) inputs: String,
    /// The package versions its build recorded (the `.lock` file's text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) lock: Option<String>,
}

impl Manifest {
    /// An empty manifest for `version`.
    pub(crate) fn new(version: &str) -> Self {
        Self {
            format: FORMAT,
            version: version.to_string(),
            assets: Vec::new(),
        }
    }

    /// The entry for `kind`, if listed.
    pub(crate) fn get(&self, kind: AssetKind) -> Option<&Entry> {
        let name = kind.name();
        self.assets.iter().find(|e| e.name == name)
    }

    /// Adds or replaces the entry of the same name, keeping a stable order.
    pub(crate) fn upsert(&mut self, entry: Entry) {
        self.assets.retain(|e| e.name != entry.name);
        self.assets.push(entry);
        let rank = |e: &Entry| {
            AssetKind::from_name(&e.name)
                .and_then(|k| AssetKind::ALL.iter().position(|&a| a == k))
                .unwrap_or(usize::MAX)
        };
        self.assets.sort_by_key(rank);
    }

    /// Parses and checks a manifest read from `location` (a path or URL, for messages).
    pub(crate) fn parse(bytes: &[u8], location: &str) -> Result<Self, AssetError> {
        let invalid = |reason: String| AssetError::Manifest {
            location: location.to_string(),
            reason,
        };
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        if manifest.format != FORMAT {
            return Err(invalid(format!(
                "format {} is not the supported {FORMAT}",
                manifest.format
            )));
        }
        if !is_version_name(&manifest.version) {
            return Err(invalid(format!(
                "`{}` is not a version name",
                manifest.version
            )));
        }
        for (i, entry) in manifest.assets.iter().enumerate() {
            let Some(kind) = AssetKind::from_name(&entry.name) else {
                return Err(invalid(format!("unknown asset `{}`", entry.name)));
            };
            // The file name becomes a path and a URL: only the canonical one is accepted.
            if entry.file != kind.file() {
                return Err(invalid(format!(
                    "{} must be stored as {}, not `{}`",
                    entry.name,
                    kind.file(),
                    entry.file
                )));
            }
            if !is_sha256(&entry.sha256) {
                return Err(invalid(format!(
                    "{}: `{}` is not a SHA-256",
                    entry.name, entry.sha256
                )));
            }
            if manifest.assets[..i].iter().any(|e| e.name == entry.name) {
                return Err(invalid(format!("{} is listed twice", entry.name)));
            }
        }
        Ok(manifest)
    }

    /// The manifest in `dir`, or `None` when there is none yet. A symbolic link in its place
    /// is an error, never followed.
    pub(crate) fn load(dir: &Dir) -> Result<Option<Self>, AssetError> {
        let path = dir.join(FILE);
        match dir.read(FILE, MAX_BYTES) {
            Ok(bytes) => Self::parse(&bytes, &path.display().to_string()).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(AssetError::io("read", path)(e)),
        }
    }

    /// Writes the manifest into `dir` atomically.
    pub(crate) fn save(&self, dir: &Dir) -> Result<(), AssetError> {
        let mut text = serde_json::to_vec_pretty(self).expect("a manifest always serializes");
        text.push(b'\n');
        files::write_atomic(dir, FILE, &text)
    }
}

/// A version name safe as one path component and URL segment.
pub(crate) fn is_version_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sbx_protocol::Language;

    fn entry(kind: AssetKind) -> Entry {
        Entry {
            name: kind.name(),
            file: kind.file(),
            sha256: "ab".repeat(32),
            size: 3,
            inputs: "cd".repeat(32),
            lock: kind.lock_file().map(|_| "pkg=1.0\n".into()),
        }
    }

    #[test]
    fn round_trips_through_disk_in_stable_order() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Dir::open(tmp.path()).unwrap();
        assert_eq!(Manifest::load(&dir).unwrap(), None);
        let mut m = Manifest::new("0123456789abcdef");
        m.upsert(entry(AssetKind::Rootfs(Language::Raw)));
        m.upsert(entry(AssetKind::Kernel));
        m.upsert(entry(AssetKind::Initramfs));
        let mut replaced = entry(AssetKind::Kernel);
        replaced.size = 4;
        m.upsert(replaced);
        m.save(&dir).unwrap();
        let loaded = Manifest::load(&dir).unwrap().unwrap();
        assert_eq!(loaded, m);
        let names: Vec<&str> = loaded.assets.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["kernel", "initramfs", "rootfs-raw"]);
        assert_eq!(loaded.get(AssetKind::Kernel).unwrap().size, 4);
        assert!(loaded.get(AssetKind::Rootfs(Language::Python)).is_none());
    }

    #[test]
    fn rejects_what_later_steps_would_trust() {
        let good = {
            let mut m = Manifest::new("v1");
            m.upsert(entry(AssetKind::Kernel));
            serde_json::to_value(m).unwrap()
        };
        let bad = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut v = good.clone();
            edit(&mut v);
            Manifest::parse(v.to_string().as_bytes(), "test")
                .unwrap_err()
                .to_string()
        };
        assert!(Manifest::parse(good.to_string().as_bytes(), "t").is_ok());
        assert!(bad(&|v| v["assets"][0]["file"] = "../../etc/passwd".into()).contains("vmlinux"));
        assert!(bad(&|v| v["assets"][0]["sha256"] = "XYZ".into()).contains("SHA-256"));
        assert!(bad(&|v| v["assets"][0]["name"] = "bootloader".into()).contains("unknown"));
        assert!(bad(&|v| v["format"] = 9.into()).contains("format"));
        assert!(bad(&|v| v["version"] = "../x".into()).contains("version"));
        assert!(
            bad(&|v| {
                let e = v["assets"][0].clone();
                v["assets"].as_array_mut().unwrap().push(e);
            })
            .contains("twice")
        );
        assert!(Manifest::parse(b"{not json", "t").is_err());
    }

    #[test]
    fn version_names_are_single_safe_components() {
        assert!(is_version_name("0123456789abcdef"));
        assert!(is_version_name("v1.2-rc_1"));
        for bad in ["", ".", "..", "a/b", "a b", ".hidden", "ä"] {
            assert!(!is_version_name(bad), "{bad}");
        }
    }
}
