//! Cache keys of memory snapshots: everything a clone must share with its template.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use sbx_protocol::Language;
use sha2::{Digest, Sha256};

use super::FORMAT;
use crate::vm::qemu::{Launch, RamFile, VmSpec};

/// Everything a clone must share with its template, hashed into a cache key.
#[derive(Debug, Clone)]
pub(crate) struct KeyInputs<'a> {
    /// The template's language.
    pub(crate) language: Language,
    /// The VM shape (name ignored; memory, CPUs, accelerator, devices, kernel command line).
    pub(crate) spec: &'a VmSpec,
    /// The guest asset version.
    pub(crate) asset_version: &'a str,
    /// Identity of the QEMU binary.
    pub(crate) qemu: &'a str,
}

/// The cache key of `inputs`: 32 hex digits of a sha256 over the crate version, [`FORMAT`],
/// the language, the asset version and the identity (size, mtime) of each asset file and of
/// the package layer, the QEMU binary's identity and the template's full command line with its
/// name normalised.
pub(crate) fn cache_key(inputs: &KeyInputs<'_>) -> String {
    let mut h = Sha256::new();
    let mut field = |name: &str, value: &[u8]| {
        h.update(name.as_bytes());
        h.update((value.len() as u64).to_le_bytes());
        h.update(value);
    };
    field("crate", env!("CARGO_PKG_VERSION").as_bytes());
    field("format", &FORMAT.to_le_bytes());
    field("protocol", &[sbx_protocol::PROTOCOL_VERSION]);
    field("language", inputs.language.as_str().as_bytes());
    field("assets", inputs.asset_version.as_bytes());
    field("qemu", inputs.qemu.as_bytes());
    let files = [
        Some(&inputs.spec.kernel),
        Some(&inputs.spec.initramfs),
        inputs.spec.rootfs.as_ref(),
    ];
    for path in files.into_iter().flatten() {
        field("file", file_identity(path).as_bytes());
    }
    // A template's page cache and imported modules come from its layer: a different layer
    // (or the same path rewritten) never restores another's template.
    if let Some(layer) = &inputs.spec.packages {
        field("packages", file_identity(layer).as_bytes());
    }
    let mut spec = inputs.spec.clone();
    spec.name = "template".into();
    let launch = Launch {
        ram_file: Some(RamFile { shared: true }),
        qmp: true,
        incoming: false,
    };
    for arg in spec.args_for(&launch) {
        field("arg", arg.as_encoded_bytes());
    }
    hex::encode(&h.finalize()[..16])
}

/// Path, size and modification time: cheap, and changes when a file is replaced.
pub(crate) fn file_identity(path: &Path) -> String {
    match fs::metadata(path) {
        Ok(m) => format!(
            "{}:{}:{}.{}",
            path.display(),
            m.len(),
            m.mtime(),
            m.mtime_nsec()
        ),
        Err(_) => format!("{}:missing", path.display()),
    }
}

/// Identity of the QEMU binary: the resolved path, size and mtime (a `--version` would cost a
/// process start per scheduler).
pub(crate) fn qemu_identity(qemu: &Path) -> String {
    let resolved = if qemu.components().count() > 1 {
        Some(qemu.to_path_buf())
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(qemu))
                .find(|candidate| candidate.is_file())
        })
    };
    match resolved {
        Some(path) => file_identity(&fs::canonicalize(&path).unwrap_or(path)),
        None => format!("{}:unresolved", qemu.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::accel::Accelerator;

    fn spec(memory_mb: u32) -> VmSpec {
        VmSpec {
            name: "sbx-1-2".into(),
            kernel: "/nonexistent/vmlinux".into(),
            initramfs: "/nonexistent/initramfs".into(),
            rootfs: Some("/nonexistent/rootfs".into()),
            packages: None,
            memory_mb,
            vcpus: 1,
            accelerator: Accelerator::Tcg,
            tsc_khz: Some(2_100_000),
            verbose_console: false,
            tmpfs_mb: 64,
            qemu_sandbox: true,
            nic: false,
            cpu_quota_percent: 100,
            cpu_background: false,
        }
    }

    fn key_of(language: Language, spec: &VmSpec, assets: &str, qemu: &str) -> String {
        cache_key(&KeyInputs {
            language,
            spec,
            asset_version: assets,
            qemu,
        })
    }

    #[test]
    fn key_covers_what_a_clone_must_share_and_ignores_the_name() {
        let base = key_of(Language::Python, &spec(256), "v1", "q1");
        assert_eq!(base.len(), 32);
        let mut renamed = spec(256);
        renamed.name = "other".into();
        assert_eq!(base, key_of(Language::Python, &renamed, "v1", "q1"));
        let mut more_cpus = spec(256);
        more_cpus.vcpus = 2;
        let mut kvm = spec(256);
        kvm.accelerator = Accelerator::Kvm;
        for other in [
            key_of(Language::Raw, &spec(256), "v1", "q1"),
            key_of(Language::Python, &spec(512), "v1", "q1"),
            key_of(Language::Python, &spec(256), "v2", "q1"),
            key_of(Language::Python, &spec(256), "v1", "q2"),
            key_of(Language::Python, &more_cpus, "v1", "q1"),
            key_of(Language::Python, &kvm, "v1", "q1"),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn key_covers_the_package_layer_and_its_identity() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.erofs"), dir.path().join("b.erofs"));
        std::fs::write(&a, b"layer a").unwrap();
        std::fs::write(&b, b"layer a").unwrap();
        let with = |layer: &Path| {
            let mut s = spec(256);
            s.packages = Some(layer.to_path_buf());
            key_of(Language::Python, &s, "v1", "q1")
        };
        let none = key_of(Language::Python, &spec(256), "v1", "q1");
        let key_a = with(&a);
        assert_ne!(none, key_a, "a layer gets its own template");
        assert_ne!(key_a, with(&b), "another layer, another template");
        assert_eq!(key_a, with(&a), "stable while the file is unchanged");
        // The same path rewritten with other content (here: another size).
        std::fs::write(&a, b"layer a, rebuilt").unwrap();
        assert_ne!(key_a, with(&a), "a replaced layer file is a new template");
    }
}
