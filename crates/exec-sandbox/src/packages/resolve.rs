//! Requirements to exact top-level pins, and the newest version of a name.
//!
//! An exact pin is taken as it is, without contacting anything. A range is resolved by the
//! ecosystem's own tool with the host's own index configuration, the way an install would pick:
//! pip (`install --dry-run --no-deps --report`, for the guest's interpreter and platform, wheels
//! only: the newest version the guest can use) and npm (`view name@range`: the `latest` tag when
//! it matches, else the highest matching version, as npm's own installer picks). Each range is
//! resolved on its own, so the answer is cacheable per range: two ranges whose picks conflict
//! fail at install time with a conflict error. Answers are remembered on disk for
//! [`limits::PACKAGE_RANGE_CACHE_TTL`], so repeated runs with the same range need no index
//! contact while a new release is still picked up soon. The directory of remembered answers
//! is checked like every cache directory (`crate::trust`), and its files are opened without
//! following symbolic links.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::PackageError;
use super::install::{self, PipReport, PythonTarget};
use super::tool::{self, Tools};
use super::{Constraint, Ecosystem, Pin, Requirement, Target};
use crate::disk::Dir;
use crate::limits;

/// Longest remembered resolution read.
const MAX_ENTRY_BYTES: u64 = 4096;

/// Resolves requirements for one cache directory.
#[derive(Debug, Clone)]
pub(crate) struct Resolver {
    pub(crate) tools: Tools,
    /// Where remembered range resolutions live.
    pub(crate) dir: PathBuf,
    /// How long a remembered resolution holds.
    pub(crate) ttl: Duration,
    /// Never contact the index: unresolved ranges are an error.
    pub(crate) offline: bool,
}

/// One remembered resolution of a range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Remembered {
    ecosystem: Ecosystem,
    interpreter: String,
    glibc: String,
    name: String,
    range: String,
    version: String,
    resolved_unix_ms: u64,
}

impl Resolver {
    /// The exact top-level pins of `requirements`, sorted.
    pub(crate) fn pins(
        &self,
        target: &Target,
        requirements: &[Requirement],
        progress: &dyn Fn(&str),
    ) -> Result<Vec<Pin>, PackageError> {
        let mut pins = Vec::with_capacity(requirements.len());
        let mut ranges = Vec::new();
        for requirement in requirements {
            match &requirement.constraint {
                Constraint::Exact(version) => pins.push(Pin {
                    name: requirement.name.clone(),
                    version: version.clone(),
                }),
                Constraint::Range(range) => match self.remembered(target, &requirement.name, range)
                {
                    Some(version) => pins.push(Pin {
                        name: requirement.name.clone(),
                        version,
                    }),
                    None => ranges.push((requirement.name.clone(), range.clone())),
                },
            }
        }
        if !ranges.is_empty() {
            if self.offline {
                return Err(PackageError::Offline {
                    what: format!("the resolution of {}", describe_ranges(target, &ranges)),
                });
            }
            progress(&format!("resolving {}", describe_ranges(target, &ranges)));
            let versions = match target.ecosystem {
                Ecosystem::Python => self.resolve_python(target, &ranges)?,
                Ecosystem::Npm => ranges
                    .iter()
                    .map(|(name, range)| self.resolve_npm(name, range))
                    .collect::<Result<Vec<_>, _>>()?,
            };
            for ((name, range), version) in ranges.into_iter().zip(versions) {
                tracing::info!("{name} {range} resolved to {version}");
                self.remember(target, &name, &range, &version);
                pins.push(Pin { name, version });
            }
        }
        pins.sort();
        Ok(pins)
    }

    /// The version an install of the bare `name` would pick: the newest one the guest can use
    /// (Python: with a wheel for its interpreter; npm: the `latest` tag). For the "a version is
    /// required; the newest is X" message.
    pub(crate) fn newest(&self, target: &Target, name: &str) -> Result<String, PackageError> {
        if self.offline {
            return Err(PackageError::Offline {
                what: format!("the newest version of {name}"),
            });
        }
        match target.ecosystem {
            Ecosystem::Python => {
                let ranges = [(name.to_string(), String::new())];
                Ok(self.resolve_python(target, &ranges)?.remove(0))
            }
            Ecosystem::Npm => {
                let mut command = self.tools.npm("view");
                command.args([name, "version", "--json"]);
                let out = tool::run("npm", command, limits::PACKAGE_RESOLVE_DEADLINE)?;
                if !out.status.success() {
                    return Err(install::npm_failure(&self.tools, &out, &[]));
                }
                match serde_json::from_str::<serde_json::Value>(out.stdout.trim()) {
                    Ok(serde_json::Value::String(version)) => Ok(version),
                    _ => Err(PackageError::ToolOutput {
                        tool: "npm",
                        reason: format!("`npm view {name} version` printed no version"),
                    }),
                }
            }
        }
    }

    /// One pip dry run for every range: what `pip install` would pick for each alone.
    fn resolve_python(
        &self,
        target: &Target,
        ranges: &[(String, String)],
    ) -> Result<Vec<String>, PackageError> {
        let python = PythonTarget::of(target)?;
        let scratch = tempfile::Builder::new()
            .prefix("sbx-resolve-")
            .tempdir()
            .map_err(PackageError::io(
                "create a temporary directory in",
                std::env::temp_dir(),
            ))?;
        let report = scratch.path().join("report.json");
        let mut command = self.tools.pip("install");
        command
            .args(["--dry-run", "--quiet", "--ignore-installed", "--no-deps"])
            .arg("--target")
            .arg(scratch.path().join("target"))
            .arg("--report")
            .arg(&report)
            .args(python.pip_options())
            .args(ranges.iter().map(|(name, range)| format!("{name}{range}")));
        let out = tool::run("pip", command, limits::PACKAGE_RESOLVE_DEADLINE)?;
        if !out.status.success() {
            return Err(install::pip_failure(&self.tools, &python, &out));
        }
        let picked = PipReport::read(&report)?.pins();
        ranges
            .iter()
            .map(|(name, _)| {
                picked
                    .iter()
                    .find(|p| p.name == *name)
                    .map(|p| p.version.clone())
                    .ok_or_else(|| PackageError::ToolOutput {
                        tool: "pip",
                        reason: format!("its report does not mention {name}"),
                    })
            })
            .collect()
    }

    /// `npm view name@range version dist-tags`: the version npm's installer would pick.
    fn resolve_npm(&self, name: &str, range: &str) -> Result<String, PackageError> {
        let mut command = self.tools.npm("view");
        command.args([&format!("{name}@{range}"), "version", "dist-tags", "--json"]);
        let out = tool::run("npm", command, limits::PACKAGE_RESOLVE_DEADLINE)?;
        if !out.status.success() {
            return Err(match install::npm_failure(&self.tools, &out, &[]) {
                // npm names the package `undefined` in this message: name it ourselves.
                PackageError::NoMatchingVersion { .. } => PackageError::NoMatchingVersion {
                    package: name.to_string(),
                    range: range.to_string(),
                    required_by: None,
                    available: install::npm_versions(&self.tools, name),
                },
                other => other,
            });
        }
        match pick_npm_version(&out.stdout) {
            Some(version) => Ok(version),
            // npm prints nothing at all when no version matches a range it could parse.
            None if out.stdout.trim().is_empty() => Err(PackageError::NoMatchingVersion {
                package: name.to_string(),
                range: range.to_string(),
                required_by: None,
                available: Vec::new(),
            }),
            None => Err(PackageError::ToolOutput {
                tool: "npm",
                reason: format!("`npm view {name}@{range}` printed no version"),
            }),
        }
    }

    /// The directory of remembered resolutions, checked (created when `create`); `None` when
    /// it is missing or refused (then nothing is remembered: the index is asked).
    fn ranges(&self, create: bool) -> Option<Dir> {
        let checked = if create {
            crate::trust::ensure(&self.dir)
        } else {
            crate::trust::check(&self.dir)
        };
        if let Err(e) = checked {
            tracing::warn!(error = %crate::vm::error_chain(&e), "not using remembered range resolutions");
            return None;
        }
        Dir::open(&self.dir).ok()
    }

    fn entry_name(&self, target: &Target, name: &str, range: &str) -> String {
        let key = serde_json::to_vec(&(
            target.ecosystem,
            &target.interpreter,
            &target.glibc,
            name,
            range,
        ))
        .expect("plain data serializes");
        let digest = hex::encode(Sha256::digest(key));
        format!("{}.json", &digest[..32])
    }

    /// A resolution of `range` remembered within the time bound.
    fn remembered(&self, target: &Target, name: &str, range: &str) -> Option<String> {
        let bytes = self
            .ranges(false)?
            .read(&self.entry_name(target, name, range), MAX_ENTRY_BYTES)
            .ok()?;
        let entry: Remembered = serde_json::from_slice(&bytes).ok()?;
        let now = unix_ms(SystemTime::now());
        let fresh = entry.resolved_unix_ms <= now
            && u128::from(now - entry.resolved_unix_ms) < self.ttl.as_millis();
        let same = entry.ecosystem == target.ecosystem
            && entry.interpreter == target.interpreter
            && entry.glibc == target.glibc
            && entry.name == name
            && entry.range == range;
        (fresh && same).then_some(entry.version)
    }

    /// Remembers a resolution; failing to is only a missed shortcut next time.
    fn remember(&self, target: &Target, name: &str, range: &str, version: &str) {
        let entry = Remembered {
            ecosystem: target.ecosystem,
            interpreter: target.interpreter.clone(),
            glibc: target.glibc.clone(),
            name: name.to_string(),
            range: range.to_string(),
            version: version.to_string(),
            resolved_unix_ms: unix_ms(SystemTime::now()),
        };
        let file = self.entry_name(target, name, range);
        let text = serde_json::to_vec_pretty(&entry).expect("plain data serializes");
        let Some(dir) = self.ranges(true) else {
            return;
        };
        // No fsync: losing the file in a crash is harmless here.
        if let Err(e) = dir.replace(&file, &text, 0o644, false) {
            tracing::debug!(error = %e, "cannot remember a range resolution");
        }
    }
}

/// `pandas>=2, numpy~=1.26` (pip) or `lodash@^4` (npm), for messages.
fn describe_ranges(target: &Target, ranges: &[(String, String)]) -> String {
    ranges
        .iter()
        .map(|(name, range)| match target.ecosystem {
            Ecosystem::Python => format!("{name}{range}"),
            Ecosystem::Npm => format!("{name}@{range}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The version npm's installer picks from `npm view name@range version dist-tags --json`: the
/// `latest` tag if it is among the matches, else the highest match.
pub(crate) fn pick_npm_version(json: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Match {
        version: String,
        #[serde(rename = "dist-tags", default)]
        dist_tags: std::collections::BTreeMap<String, String>,
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Matches {
        One(Match),
        Many(Vec<Match>),
    }
    let matches = match serde_json::from_str(json.trim()).ok()? {
        Matches::One(one) => vec![one],
        Matches::Many(many) => many,
    };
    let latest = matches.iter().find_map(|m| m.dist_tags.get("latest"));
    if let Some(latest) = latest.filter(|l| matches.iter().any(|m| m.version == **l)) {
        return Some(latest.clone());
    }
    matches
        .iter()
        .map(|m| m.version.as_str())
        .max_by(|a, b| install::compare_semver(a, b))
        .map(str::to_string)
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    fn resolver(dir: &Path, ttl: Duration) -> Resolver {
        Resolver {
            tools: Tools {
                python: "/nonexistent/python3".into(),
                npm: "/nonexistent/npm".into(),
                ..Tools::default()
            },
            dir: dir.to_path_buf(),
            ttl,
            offline: false,
        }
    }

    fn target(ecosystem: Ecosystem) -> Target {
        Target {
            ecosystem,
            image_version: "img".into(),
            interpreter: "3.11".into(),
            glibc: "2.36".into(),
        }
    }

    fn requirement(name: &str, constraint: Constraint) -> Requirement {
        Requirement {
            name: name.into(),
            constraint,
        }
    }

    #[test]
    fn exact_pins_need_no_tool() {
        let dir = tempfile::tempdir().unwrap();
        let pins = resolver(dir.path(), Duration::from_secs(600))
            .pins(
                &target(Ecosystem::Python),
                &[
                    requirement("b", Constraint::Exact("2".into())),
                    requirement("a", Constraint::Exact("1".into())),
                ],
                &|_| panic!("no progress for exact pins"),
            )
            .unwrap();
        assert_eq!(
            pins,
            [
                Pin {
                    name: "a".into(),
                    version: "1".into()
                },
                Pin {
                    name: "b".into(),
                    version: "2".into()
                }
            ]
        );
    }

    #[test]
    fn remembered_ranges_hold_for_their_time_and_per_target() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = resolver(dir.path(), Duration::from_secs(600));
        let py = target(Ecosystem::Python);
        fresh.remember(&py, "sbxdemo", ">=1.0", "1.1");
        let asked = [requirement("sbxdemo", Constraint::Range(">=1.0".into()))];
        let pins = fresh.pins(&py, &asked, &|_| {}).unwrap();
        assert_eq!(pins[0].version, "1.1");
        // Another interpreter is another question: the missing tool proves it is asked.
        let other = Target {
            interpreter: "3.12".into(),
            ..py.clone()
        };
        let err = fresh.pins(&other, &asked, &|_| {}).unwrap_err();
        assert!(matches!(err, PackageError::ToolMissing { .. }), "{err}");
        // Expired: asked again.
        let expired = resolver(dir.path(), Duration::ZERO);
        let err = expired.pins(&py, &asked, &|_| {}).unwrap_err();
        assert!(matches!(err, PackageError::ToolMissing { .. }), "{err}");
        // Offline: refused by name, no tool.
        let offline = Resolver {
            offline: true,
            ..expired
        };
        let err = offline.pins(&py, &asked, &|_| {}).unwrap_err();
        assert!(
            matches!(&err, PackageError::Offline { what } if what.contains("sbxdemo>=1.0")),
            "{err}"
        );
    }

    #[test]
    fn a_symlinked_range_cache_entry_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let ranges = dir.path().join(".ranges");
        let fresh = resolver(&ranges, Duration::from_secs(600));
        let py = target(Ecosystem::Python);
        fresh.remember(&py, "sbxdemo", ">=1.0", "1.1");
        let name = fresh.entry_name(&py, "sbxdemo", ">=1.0");
        // A remembered answer planted outside the cache and linked in is not read...
        let outside = tempfile::tempdir().unwrap();
        let planted = outside.path().join("planted.json");
        std::fs::rename(ranges.join(&name), &planted).unwrap();
        let before = std::fs::read(&planted).unwrap();
        std::os::unix::fs::symlink(&planted, ranges.join(&name)).unwrap();
        assert_eq!(fresh.remembered(&py, "sbxdemo", ">=1.0"), None);
        // ...and remembering again replaces the link instead of writing through it.
        fresh.remember(&py, "sbxdemo", ">=1.0", "1.2");
        assert_eq!(std::fs::read(&planted).unwrap(), before);
        assert_eq!(
            fresh.remembered(&py, "sbxdemo", ">=1.0").as_deref(),
            Some("1.2")
        );
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 1);
        assert_eq!(
            std::fs::metadata(&ranges).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }

    #[test]
    fn npm_picks_latest_when_it_matches_else_the_highest() {
        let both = r#"[{"version":"1.0.0","dist-tags":{"latest":"1.0.0"}},{"version":"1.1.0-beta.1","dist-tags":{"latest":"1.0.0"}},{"version":"1.1.0","dist-tags":{"latest":"1.0.0"}}]"#;
        assert_eq!(pick_npm_version(both).unwrap(), "1.0.0");
        let above = r#"[{"version":"2.0.0","dist-tags":{"latest":"1.0.0"}},{"version":"2.10.0","dist-tags":{"latest":"1.0.0"}},{"version":"2.9.0","dist-tags":{"latest":"1.0.0"}}]"#;
        assert_eq!(pick_npm_version(above).unwrap(), "2.10.0");
        let one = r#"{"version":"1.0.0","dist-tags":{"latest":"1.1.0"}}"#;
        assert_eq!(pick_npm_version(one).unwrap(), "1.0.0");
        assert_eq!(pick_npm_version(""), None);
    }
}
