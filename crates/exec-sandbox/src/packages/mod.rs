//! Packages: requirements validated on the host, resolved and installed on the host with the
//! ecosystem's own tools (no package code runs, no network for the guest), packed as a
//! read-only EROFS layer, cached on disk (L2) and in S3 (L3), and attached to the VM as a second
//! read-only disk.
//!
//! - `spec`: what a requirement may look like (syntax, limits, normalization), pure.
//! - `allowlist`: the bundled lists of each ecosystem's most-downloaded packages.
//! - `resolve`: ranges to exact versions, and the newest version for a bare name (host tools,
//!   a bounded-time cache).
//! - `install`: the host installs a resolved set into a directory (`pip` wheels only for the
//!   guest's interpreter and platform; `npm` with scripts off).
//! - `layer`: a directory packed as an EROFS image with a manifest.
//! - `cache`: the L2 layer cache on disk; `remote`: the L3 store it talks to, and `s3` the
//!   store in S3 (or an S3-compatible service).

pub(crate) mod remote;
pub(crate) mod s3;

/// The package manager of a language.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Ecosystem {
    /// Python: PyPI-style indexes, wheels, PEP 503 names, PEP 440 versions.
    Python,
    /// JavaScript: npm registries, tarballs, npm names and semver.
    Npm,
}

impl Ecosystem {
    /// The ecosystem of `language`, or `None` for languages that take no packages (`raw`).
    pub(crate) fn of(language: sbx_protocol::Language) -> Option<Ecosystem> {
        match language {
            sbx_protocol::Language::Python => Some(Ecosystem::Python),
            sbx_protocol::Language::Javascript => Some(Ecosystem::Npm),
            sbx_protocol::Language::Raw => None,
        }
    }
}

/// What a requirement asks of its package's version.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Constraint {
    /// Exactly this version (`==2.2.3`, `@4.17.21`): a cache hit needs no index.
    Exact(String),
    /// A range in the ecosystem's own syntax (`>=2,<3`, `~=1.4`, `^4.17.0`), resolved on the host.
    Range(String),
}

/// One validated requirement.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Requirement {
    /// The name in its normalized form (PEP 503 for Python; npm names as they are).
    pub name: String,
    /// The version part.
    pub constraint: Constraint,
}

/// One package of a resolved set, at an exact version.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub(crate) struct Pin {
    /// Normalized name.
    pub name: String,
    /// Exact version.
    pub version: String,
}

/// The guest interpreter a layer is built for: part of every layer's key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub(crate) struct Target {
    /// The ecosystem.
    pub ecosystem: Ecosystem,
    /// The guest image's asset version (its root filesystem).
    pub image_version: String,
    /// The interpreter's version (`3.11` for CPython; Bun's version for npm).
    pub interpreter: String,
    /// The guest's glibc version (`2.36`), which decides the manylinux tags.
    pub glibc: String,
}

/// Which cache level served a run's packages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum PackageSource {
    /// The run asked for no packages.
    #[default]
    None,
    /// The layer was downloaded from S3 (L3).
    L3,
    /// The layer was on this host's disk (L2).
    L2,
    /// The layer was built for this run.
    Built,
}
