//! What each asset is made from, and the keys and version derived from it.
//!
//! Every asset has an *inputs key*: the SHA-256 of exactly what determines its content (the
//! kernel: its script, config fragment and patch; a root filesystem: its script, the pinned
//! versions and the language; the initramfs: the agent and the archive format). The asset
//! *version* hashes all the keys, so any input change selects a new version directory, while an
//! asset whose own key did not change is carried over from an older version instead of rebuilt.

use std::fmt;

use sha2::{Digest, Sha256};

use sbx_protocol::Language;

use super::initramfs;

/// One guest asset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum AssetKind {
    /// The uncompressed kernel.
    Kernel,
    /// The cpio archive holding the agent as `/init`.
    Initramfs,
    /// A language's read-only root filesystem.
    Rootfs(Language),
}

impl AssetKind {
    /// Every asset, in manifest order.
    pub(crate) const ALL: [AssetKind; 5] = [
        AssetKind::Kernel,
        AssetKind::Initramfs,
        AssetKind::Rootfs(Language::Python),
        AssetKind::Rootfs(Language::Javascript),
        AssetKind::Rootfs(Language::Raw),
    ];

    /// The assets a VM running `languages` needs: the kernel, the initramfs and their roots.
    pub(crate) fn needed(languages: &[Language]) -> Vec<AssetKind> {
        let mut needed = vec![AssetKind::Kernel, AssetKind::Initramfs];
        needed.extend(languages.iter().map(|&l| AssetKind::Rootfs(l)));
        needed.sort();
        needed.dedup();
        needed
    }

    /// The name in manifests and messages (`kernel`, `initramfs`, `rootfs-python`).
    pub(crate) fn name(self) -> String {
        match self {
            AssetKind::Kernel => "kernel".into(),
            AssetKind::Initramfs => "initramfs".into(),
            AssetKind::Rootfs(l) => format!("rootfs-{l}"),
        }
    }

    /// The file name in a version directory.
    pub(crate) fn file(self) -> String {
        match self {
            AssetKind::Kernel => "vmlinux".into(),
            AssetKind::Initramfs => "initramfs.cpio".into(),
            AssetKind::Rootfs(l) => format!("rootfs-{l}.erofs"),
        }
    }

    /// The package-version lock file its build script writes, if it has one.
    pub(crate) fn lock_file(self) -> Option<String> {
        match self {
            AssetKind::Kernel => Some("kernel.lock".into()),
            AssetKind::Initramfs => None,
            AssetKind::Rootfs(l) => Some(format!("rootfs-{l}.lock")),
        }
    }

    /// The asset called `name` in a manifest.
    pub(crate) fn from_name(name: &str) -> Option<AssetKind> {
        AssetKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// What users are told to expect before a build starts.
    pub(crate) fn build_duration_hint(self) -> &'static str {
        match self {
            AssetKind::Kernel => "takes ~5 min",
            AssetKind::Initramfs => "takes a moment",
            AssetKind::Rootfs(_) => "takes a few minutes",
        }
    }
}

impl fmt::Display for AssetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// The build inputs: embedded in the library, or small fakes in tests.
#[derive(Clone)]
pub(crate) struct Inputs {
    pub(crate) kernel_script: &'static str,
    pub(crate) kernel_fragment: &'static str,
    pub(crate) kernel_patch: &'static str,
    pub(crate) rootfs_script: &'static str,
    pub(crate) versions_env: &'static str,
    /// The static guest agent binary, `/init` of the initramfs.
    pub(crate) agent: &'static [u8],
    /// Hex SHA-256 of [`Self::agent`].
    pub(crate) agent_sha256: String,
}

impl fmt::Debug for Inputs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inputs")
            .field("agent_sha256", &self.agent_sha256)
            .finish_non_exhaustive()
    }
}

impl Inputs {
    /// The scripts and agent compiled into this library (see `build.rs`).
    pub(crate) fn embedded() -> Self {
        Self {
            kernel_script: include_str!(concat!(env!("OUT_DIR"), "/build-kernel.sh")),
            kernel_fragment: include_str!(concat!(env!("OUT_DIR"), "/kernel-config.fragment")),
            kernel_patch: include_str!(concat!(env!("OUT_DIR"), "/kernel-boot-calibration.patch")),
            rootfs_script: include_str!(concat!(env!("OUT_DIR"), "/build-rootfs.sh")),
            versions_env: include_str!(concat!(env!("OUT_DIR"), "/versions.env")),
            agent: include_bytes!(env!("SBX_AGENT_PATH")),
            // Hashed at build time: a megabyte-sized hash on every start would cost milliseconds.
            agent_sha256: env!("SBX_AGENT_SHA256").to_string(),
        }
    }

    /// Inputs for tests, with the agent's hash computed.
    #[cfg(test)]
    pub(crate) fn fake(agent: &'static [u8], script_text: &'static str) -> Self {
        Self {
            kernel_script: script_text,
            kernel_fragment: "CONFIG_FAKE=y\n",
            kernel_patch: "fake patch\n",
            rootfs_script: script_text,
            versions_env: "FAKE=1\n",
            agent,
            agent_sha256: hex::encode(Sha256::digest(agent)),
        }
    }

    /// The inputs key of `kind` (hex SHA-256).
    pub(crate) fn key(&self, kind: AssetKind) -> String {
        match kind {
            AssetKind::Kernel => hash_parts(&[
                b"kernel",
                self.kernel_script.as_bytes(),
                self.kernel_fragment.as_bytes(),
                self.kernel_patch.as_bytes(),
            ]),
            AssetKind::Initramfs => hash_parts(&[
                b"initramfs",
                &initramfs::FORMAT_VERSION.to_le_bytes(),
                self.agent_sha256.as_bytes(),
            ]),
            AssetKind::Rootfs(language) => hash_parts(&[
                b"rootfs",
                self.rootfs_script.as_bytes(),
                self.versions_env.as_bytes(),
                language.as_str().as_bytes(),
            ]),
        }
    }

    /// The version directory name for these inputs: 16 hex digits covering every asset's key.
    pub(crate) fn version(&self) -> String {
        let keys: Vec<String> = AssetKind::ALL.iter().map(|&k| self.key(k)).collect();
        let parts: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
        hash_parts(&parts)[..16].to_string()
    }

    /// The text of the build inputs `kind` needs, or which one this build lacks.
    pub(crate) fn require(&self, kind: AssetKind) -> Result<(), &'static str> {
        let needed: &[(&str, &'static str)] = match kind {
            AssetKind::Kernel => &[
                (self.kernel_script, "build-kernel.sh"),
                (self.kernel_fragment, "kernel/config.fragment"),
                (self.kernel_patch, "kernel/boot-calibration.patch"),
            ],
            AssetKind::Initramfs => &[],
            AssetKind::Rootfs(_) => &[
                (self.rootfs_script, "build-rootfs.sh"),
                (self.versions_env, "versions.env"),
            ],
        };
        match needed.iter().find(|(text, _)| text.trim().is_empty()) {
            Some((_, name)) => Err(name),
            None => Ok(()),
        }
    }
}

/// SHA-256 over length-prefixed parts, so that moving bytes between parts changes the hash.
pub(super) fn hash_parts(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_files_and_lock_files_round_trip() {
        for kind in AssetKind::ALL {
            assert_eq!(AssetKind::from_name(&kind.name()), Some(kind));
        }
        let python = AssetKind::Rootfs(Language::Python);
        assert_eq!(python.name(), "rootfs-python");
        assert_eq!(python.file(), "rootfs-python.erofs");
        assert_eq!(python.lock_file().as_deref(), Some("rootfs-python.lock"));
        assert_eq!(AssetKind::Kernel.file(), "vmlinux");
        assert_eq!(AssetKind::Initramfs.lock_file(), None);
        assert_eq!(AssetKind::from_name("rootfs-cobol"), None);
    }

    #[test]
    fn needed_covers_kernel_initramfs_and_the_languages_asked_for() {
        assert_eq!(
            AssetKind::needed(&[Language::Raw, Language::Raw]),
            vec![
                AssetKind::Kernel,
                AssetKind::Initramfs,
                AssetKind::Rootfs(Language::Raw)
            ]
        );
        assert_eq!(AssetKind::needed(&Language::ALL).len(), 5);
    }

    #[test]
    fn an_agent_change_moves_only_the_initramfs_key() {
        let a = Inputs::fake(b"agent one", "script");
        let b = Inputs::fake(b"agent two", "script");
        assert_ne!(a.version(), b.version());
        assert_ne!(a.key(AssetKind::Initramfs), b.key(AssetKind::Initramfs));
        for kind in [AssetKind::Kernel, AssetKind::Rootfs(Language::Python)] {
            assert_eq!(a.key(kind), b.key(kind));
        }
    }

    #[test]
    fn a_script_change_moves_the_keys_built_from_it() {
        let a = Inputs::fake(b"agent", "script one");
        let b = Inputs::fake(b"agent", "script two");
        assert_ne!(a.version(), b.version());
        assert_ne!(a.key(AssetKind::Kernel), b.key(AssetKind::Kernel));
        assert_eq!(a.key(AssetKind::Initramfs), b.key(AssetKind::Initramfs));
        let mut c = a.clone();
        c.versions_env = "FAKE=2\n";
        assert_eq!(a.key(AssetKind::Kernel), c.key(AssetKind::Kernel));
        assert_ne!(
            a.key(AssetKind::Rootfs(Language::Raw)),
            c.key(AssetKind::Rootfs(Language::Raw))
        );
        // Each language has its own root filesystem key.
        assert_ne!(
            a.key(AssetKind::Rootfs(Language::Raw)),
            a.key(AssetKind::Rootfs(Language::Python))
        );
    }

    #[test]
    fn version_is_stable_and_short() {
        let a = Inputs::fake(b"agent", "script");
        assert_eq!(a.version(), a.clone().version());
        assert_eq!(a.version().len(), 16);
        assert!(a.version().bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn the_embedded_agent_hash_matches_its_bytes() {
        let inputs = Inputs::embedded();
        assert_eq!(
            inputs.agent_sha256,
            hex::encode(Sha256::digest(inputs.agent))
        );
        assert!(inputs.agent.starts_with(b"\x7fELF"));
    }

    #[test]
    fn missing_inputs_are_named() {
        let mut inputs = Inputs::fake(b"agent", "script");
        assert_eq!(inputs.require(AssetKind::Kernel), Ok(()));
        inputs.rootfs_script = "";
        assert_eq!(
            inputs.require(AssetKind::Rootfs(Language::Raw)),
            Err("build-rootfs.sh")
        );
        assert_eq!(inputs.require(AssetKind::Kernel), Ok(()));
    }
}
