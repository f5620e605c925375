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
//! - `store`: the entry point, [`PackageStore::ensure`]: requirements in, a verified layer out.
//! - `tool`: running pip, npm and mkfs.erofs with the host's own configuration.

mod cache;
mod error;
mod install;
mod layer;
mod remote;
mod resolve;
pub(crate) mod s3;
mod store;
#[cfg(any(test, feature = "testing"))]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
mod tool;

pub use error::PackageError;
pub(crate) use store::PackageConfig;
// What the scheduler integration (and `sbx cache`) will use; the tests use them already.
pub use cache::LayerInfo;
#[cfg_attr(
    not(test),
    expect(unused_imports, reason = "the scheduler integration uses these")
)]
pub(crate) use remote::{BoxFuture, RemoteError, RemoteLayers};
pub(crate) use store::{PackageStore, ReadyLayer, target_for};
#[cfg_attr(
    not(test),
    expect(unused_imports, reason = "the scheduler integration uses these")
)]
pub(crate) use tool::Tools;

pub(crate) mod allowlist;
pub(crate) mod spec;

pub use spec::{Rule, SpecError, SpecText};

/// The package manager of a language.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Ecosystem {
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

impl Target {
    /// The target of a root filesystem, from its asset manifest entry: `inputs` is its inputs
    /// key (so an agent-only change of the asset version keeps every layer) and `lock` its
    /// package lock (`python3.11=3.11.2-6+deb12u8`, `libc6=2.36-9+deb12u14`, `bun=1.4.5`).
    pub(crate) fn from_rootfs(
        ecosystem: Ecosystem,
        inputs: &str,
        lock: &str,
    ) -> Result<Target, PackageError> {
        let no_target = |reason: &str| PackageError::Target {
            language: match ecosystem {
                Ecosystem::Python => "python",
                Ecosystem::Npm => "javascript",
            }
            .into(),
            reason: reason.into(),
        };
        let packages = || {
            lock.lines()
                .filter_map(|l| l.trim().split_once('='))
                // Debian versions: `[epoch:]upstream[-revision]`.
                .map(|(name, v)| {
                    let v = v.split_once(':').map_or(v, |(_, rest)| rest);
                    (name, v.split('-').next().unwrap_or(v))
                })
        };
        let glibc = packages()
            .find(|(name, _)| *name == "libc6")
            .map(|(_, v)| v.split('.').take(2).collect::<Vec<_>>().join("."))
            .ok_or_else(|| no_target("its package lock lists no libc6"))?;
        let interpreter = match ecosystem {
            Ecosystem::Python => packages()
                .find_map(|(name, _)| {
                    let minor = name.strip_prefix("python3.")?;
                    (!minor.is_empty() && minor.bytes().all(|b| b.is_ascii_digit()))
                        .then(|| format!("3.{minor}"))
                })
                .ok_or_else(|| no_target("its package lock lists no python3.N"))?,
            Ecosystem::Npm => packages()
                .find(|(name, _)| *name == "bun")
                .map(|(_, v)| v.to_string())
                .ok_or_else(|| no_target("its package lock lists no bun"))?,
        };
        Ok(Target {
            ecosystem,
            image_version: inputs.chars().take(16).collect(),
            interpreter,
            glibc,
        })
    }
}

/// `name==version` (Python) or `name@version` (npm), as users write pins.
pub(crate) fn display_pin(ecosystem: Ecosystem, pin: &Pin) -> String {
    match ecosystem {
        Ecosystem::Python => format!("{}=={}", pin.name, pin.version),
        Ecosystem::Npm => format!("{}@{}", pin.name, pin.version),
    }
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

/// Checks the packages a run or session asks for, before any VM boots or any download starts:
/// none at all is fine for every language; `raw` takes none; otherwise at most
/// [`crate::limits::MAX_PACKAGES`] specs, each valid for the language's ecosystem, no package
/// twice, and, when `allowlist` is on, each among the ecosystem's most-downloaded packages.
/// The syntax rules always apply. Sorted by normalized name.
pub(crate) fn validate(
    language: sbx_protocol::Language,
    specs: &[String],
    allowlist: bool,
) -> Result<Vec<Requirement>, SpecError> {
    if specs.is_empty() {
        return Ok(Vec::new());
    }
    let ecosystem = Ecosystem::of(language).ok_or(SpecError::NoPackagesFor { language })?;
    let parsed = spec::parse_each(ecosystem, specs)?;
    if allowlist {
        for (requirement, spec) in &parsed {
            allowlist::check(ecosystem, &requirement.name, spec)?;
        }
    }
    let mut requirements: Vec<Requirement> = parsed.into_iter().map(|(r, _)| r).collect();
    requirements.sort();
    Ok(requirements)
}

#[cfg(test)]
mod validate_tests {
    use super::*;
    use sbx_protocol::Language;

    fn strings(specs: &[&str]) -> Vec<String> {
        specs.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn no_packages_is_fine_for_every_language() {
        for language in Language::ALL {
            for allowlist in [true, false] {
                assert_eq!(validate(language, &[], allowlist), Ok(vec![]));
            }
        }
    }

    #[test]
    fn raw_takes_no_packages() {
        for allowlist in [true, false] {
            let err =
                validate(Language::Raw, &strings(&["requests==2.31.0"]), allowlist).unwrap_err();
            assert_eq!(
                err,
                SpecError::NoPackagesFor {
                    language: Language::Raw
                }
            );
            assert_eq!(err.to_string(), "language raw takes no packages");
        }
    }

    #[test]
    fn allowed_packages_pass_sorted_and_normalized() {
        let specs = strings(&["typing_extensions>=4.12", "Pandas==2.2.3", "numpy==2.1.3"]);
        let requirements = validate(Language::Python, &specs, true).unwrap();
        assert_eq!(
            requirements,
            [
                Requirement {
                    name: "numpy".into(),
                    constraint: Constraint::Exact("2.1.3".into()),
                },
                Requirement {
                    name: "pandas".into(),
                    constraint: Constraint::Exact("2.2.3".into()),
                },
                Requirement {
                    name: "typing-extensions".into(),
                    constraint: Constraint::Range(">=4.12".into()),
                },
            ]
        );
        let specs = strings(&["lodash@4.17.21", "@types/node@^20"]);
        let names: Vec<String> = validate(Language::Javascript, &specs, true)
            .unwrap()
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["@types/node", "lodash"]);
    }

    #[test]
    fn the_allowlist_applies_only_when_asked() {
        let specs = strings(&["numpy==2.1.3", "surely-not-a-popular-package==1.0"]);
        let err = validate(Language::Python, &specs, true).unwrap_err();
        assert!(
            matches!(&err, SpecError::NotAllowed { name, ecosystem: Ecosystem::Python, .. } if name == "surely-not-a-popular-package"),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("`surely-not-a-popular-package==1.0`")
        );
        assert_eq!(validate(Language::Python, &specs, false).unwrap().len(), 2);

        let specs = strings(&["lodash@4.17.21", "Lodash@4.17.21"]);
        assert!(matches!(
            validate(Language::Javascript, &specs, true),
            Err(SpecError::NotAllowed { .. })
        ));
    }

    #[test]
    fn syntax_rules_apply_with_the_allowlist_off() {
        for (language, spec) in [
            (Language::Python, "requests"),
            (Language::Javascript, "lodash"),
        ] {
            for allowlist in [true, false] {
                assert!(matches!(
                    validate(language, &strings(&[spec]), allowlist),
                    Err(SpecError::NoVersion { .. })
                ));
            }
        }
        // A syntax error anywhere wins over an allowlist miss earlier in the list.
        let specs = strings(&[
            "surely-not-a-popular-package==1.0",
            "pandas @ file:///x.whl",
        ]);
        for allowlist in [true, false] {
            assert!(matches!(
                validate(Language::Python, &specs, allowlist),
                Err(SpecError::Invalid {
                    rule: spec::Rule::Url,
                    ..
                })
            ));
        }
        let specs = strings(&["Foo_Bar==1", "foo-bar==2"]);
        assert!(matches!(
            validate(Language::Python, &specs, false),
            Err(SpecError::Duplicate { .. })
        ));
    }

    #[test]
    fn at_most_fifty_packages() {
        let popular: Vec<String> = include_str!("../../data/pypi-top-10k.txt")
            .lines()
            .take(crate::limits::MAX_PACKAGES + 1)
            .map(|name| format!("{name}>=0"))
            .collect();
        let fifty = &popular[..crate::limits::MAX_PACKAGES];
        assert_eq!(validate(Language::Python, fifty, true).unwrap().len(), 50);
        assert_eq!(
            validate(Language::Python, &popular, true),
            Err(SpecError::TooMany { count: 51 })
        );
    }
}
