//! Installing a resolved set into a directory with the ecosystem's own tool, running no package
//! code, and reading back the full closure.
//!
//! - **Python**: `pip install --target <dir>/python --only-binary=:all:` for the guest's CPython
//!   (`--python-version`, `--implementation cp`, `--abi`, and every manylinux platform tag its
//!   glibc accepts, listed explicitly because pip expands only the legacy aliases itself).
//!   Installing wheels unpacks files; nothing is built or run. pip's `--report` gives the
//!   closure. Console scripts get the guest's interpreter in their shebang, and the tree is
//!   byte-compiled (unchecked-hash `.pyc`, valid on a read-only mount whatever the timestamps)
//!   by a host CPython of the guest's minor version when the host has one.
//! - **npm**: `npm install --prefix <dir>/node --ignore-scripts`; `node/package-lock.json` gives
//!   the closure. A package whose install cannot work without its scripts (a `preinstall` or
//!   `install` script, or a native addon's `binding.gyp`) is refused; a `postinstall`-only
//!   package is installed without running it.
//!
//! Failures are classified from the tool's own output into [`PackageError`] variants that name
//! the package.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::error::PackageError;
use super::tool::{self, Output, Tools};
use super::{Ecosystem, Pin, Target};
use crate::limits;

/// The guest's interpreter, written into console scripts' shebangs.
pub(crate) const GUEST_PYTHON: &str = "/usr/bin/python3";
/// Deadline for the index listing that explains a pip failure.
const DIAGNOSE_DEADLINE: Duration = Duration::from_secs(120);
/// Output fragments by which pip and npm report an index they could not reach.
const PIP_NETWORK_MARKERS: &[&str] = &[
    "Retrying (Retry(",
    "NewConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "Max retries exceeded",
    "ProxyError",
    "SSLError",
    "Could not fetch URL",
    "HTTP error 5",
    "connection error:",
];
const NPM_NETWORK_CODES: &[&str] = &[
    "ECONNREFUSED",
    "ECONNRESET",
    "ENOTFOUND",
    "ETIMEDOUT",
    "EAI_AGAIN",
    "EHOSTUNREACH",
    "ENETUNREACH",
    "EPIPE",
    "ERR_SOCKET_TIMEOUT",
    "EPROTO",
    "FETCH_ERROR",
];

/// The guest's CPython, as pip's target options need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PythonTarget {
    /// `3.11`.
    pub(crate) version: String,
    /// `cp311`.
    pub(crate) abi: String,
    /// `2.36`.
    pub(crate) glibc: String,
    /// 36, the glibc minor version: `manylinux_2_5` … `manylinux_2_<this>` apply.
    glibc_minor: u32,
}

impl PythonTarget {
    /// The Python side of `target`.
    pub(crate) fn of(target: &Target) -> Result<Self, PackageError> {
        let bad = |reason: String| PackageError::Target {
            language: "python".into(),
            reason,
        };
        let (major, minor) = split_version(&target.interpreter)
            .filter(|(major, _)| *major == 3)
            .ok_or_else(|| {
                bad(format!(
                    "`{}` is not a CPython 3 version",
                    target.interpreter
                ))
            })?;
        let (glibc_major, glibc_minor) = split_version(&target.glibc)
            .filter(|(major, _)| *major == 2)
            .ok_or_else(|| bad(format!("`{}` is not a glibc 2 version", target.glibc)))?;
        Ok(Self {
            version: format!("{major}.{minor}"),
            abi: format!("cp{major}{minor}"),
            glibc: format!("{glibc_major}.{glibc_minor}"),
            glibc_minor,
        })
    }

    /// pip's options selecting wheels for this interpreter and platform, binary only.
    pub(crate) fn pip_options(&self) -> Vec<String> {
        let mut options: Vec<String> = [
            "--only-binary=:all:",
            "--implementation",
            "cp",
            "--python-version",
            &self.version,
            "--abi",
            &self.abi,
        ]
        .map(String::from)
        .to_vec();
        for platform in manylinux_platforms(self.glibc_minor) {
            options.push("--platform".into());
            options.push(platform);
        }
        options
    }
}

/// `3.11` → (3, 11); the patch level, if any, is ignored.
fn split_version(text: &str) -> Option<(u32, u32)> {
    let mut parts = text.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Every manylinux platform tag a glibc 2.`glibc_minor` x86_64 system accepts, most specific
/// first, each legacy alias right after the tag it equals (PEP 600: manylinux2014 =
/// manylinux_2_17, manylinux2010 = manylinux_2_12, manylinux1 = manylinux_2_5). pip 23 expands
/// only the legacy names itself, so the list is given in full.
pub(crate) fn manylinux_platforms(glibc_minor: u32) -> Vec<String> {
    let mut tags = Vec::new();
    for minor in (5..=glibc_minor).rev() {
        tags.push(format!("manylinux_2_{minor}_x86_64"));
        match minor {
            17 => tags.push("manylinux2014_x86_64".into()),
            12 => tags.push("manylinux2010_x86_64".into()),
            5 => tags.push("manylinux1_x86_64".into()),
            _ => {}
        }
    }
    tags
}

/// PEP 503 normalization: lowercase, runs of `-`, `_`, `.` become one `-`.
pub(crate) fn normalize_python_name(name: &str) -> String {
    super::spec::normalize(Ecosystem::Python, name)
}

/// The modules a template of this layer imports before it is saved, so a clone's first import
/// of them is free: for Python the top-level modules of each requested package (its
/// `top_level.txt`, else the top-level names its `RECORD` installs), for npm the requested
/// packages themselves. Names the agent would refuse are left out.
pub(crate) fn warm_modules(ecosystem: Ecosystem, tree: &Path, requested: &[Pin]) -> Vec<String> {
    let language = match ecosystem {
        Ecosystem::Python => sbx_protocol::Language::Python,
        Ecosystem::Npm => sbx_protocol::Language::Javascript,
    };
    let mut modules: Vec<String> = match ecosystem {
        Ecosystem::Npm => requested.iter().map(|p| p.name.clone()).collect(),
        Ecosystem::Python => {
            let site = tree.join(sbx_protocol::layer::PYTHON_DIR);
            let wanted: std::collections::BTreeSet<&str> =
                requested.iter().map(|p| p.name.as_str()).collect();
            let mut found = Vec::new();
            for entry in fs::read_dir(&site).into_iter().flatten().flatten() {
                let file_name = entry.file_name();
                let Some(dist) = file_name
                    .to_str()
                    .and_then(|n| n.strip_suffix(".dist-info"))
                else {
                    continue;
                };
                let name = dist.rsplit_once('-').map_or(dist, |(name, _)| name);
                if wanted.contains(normalize_python_name(name).as_str()) {
                    found.extend(top_level_modules(&entry.path()));
                }
            }
            found
        }
    };
    modules.retain(|m| sbx_protocol::layer::is_warm_module(language, m));
    modules.sort();
    modules.dedup();
    modules.truncate(sbx_protocol::layer::MAX_WARM_MODULES);
    modules
}

/// The top-level modules a wheel installs, from its `.dist-info` directory.
fn top_level_modules(dist_info: &Path) -> Vec<String> {
    if let Ok(text) = fs::read_to_string(dist_info.join("top_level.txt")) {
        return text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
    }
    // Wheels built without setuptools (numpy's, for one) have no top_level.txt: the RECORD
    // lists every installed file; a top-level package is a first component holding
    // `__init__.py`, a top-level module a first-level `.py` or extension file.
    let record = fs::read_to_string(dist_info.join("RECORD")).unwrap_or_default();
    let mut names = std::collections::BTreeSet::new();
    for line in record.lines() {
        let path = line.split(',').next().unwrap_or_default();
        let mut parts = path.split('/');
        let (Some(first), second) = (parts.next(), parts.next()) else {
            continue;
        };
        match second {
            Some("__init__.py") => {
                names.insert(first.to_string());
            }
            None => {
                if let Some(module) = first
                    .strip_suffix(".py")
                    .or_else(|| first.split_once(".cpython-").map(|(m, _)| m))
                    .or_else(|| first.strip_suffix(".abi3.so"))
                {
                    names.insert(module.to_string());
                }
            }
            Some(_) => {}
        }
    }
    names.into_iter().filter(|n| !n.starts_with('_')).collect()
}

/// Installs `pins` (the top-level set) with their dependencies into `tree` (`tree/python` or
/// `tree/node`), using `scratch` for reports; returns the closure, sorted.
pub(crate) fn install(
    tools: &Tools,
    target: &Target,
    pins: &[Pin],
    tree: &Path,
    scratch: &Path,
    progress: &dyn Fn(&str),
) -> Result<Vec<Pin>, PackageError> {
    match target.ecosystem {
        Ecosystem::Python => install_python(tools, target, pins, tree, scratch, progress),
        Ecosystem::Npm => install_npm(tools, pins, tree, progress),
    }
}

// ---------------------------------------------------------------------------------------------
// Python

/// pip's `--report` (the fields read here).
#[derive(Debug, Deserialize)]
pub(crate) struct PipReport {
    pub(crate) install: Vec<PipReportItem>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct PipReportItem {
    pub(crate) metadata: PipMetadata,
}

#[derive(Debug, Deserialize)]
pub(crate) struct PipMetadata {
    pub(crate) name: String,
    pub(crate) version: String,
}

impl PipReport {
    /// Reads the report pip wrote to `path`.
    pub(crate) fn read(path: &Path) -> Result<Self, PackageError> {
        let bytes = fs::read(path).map_err(PackageError::io("read", path))?;
        serde_json::from_slice(&bytes).map_err(|e| PackageError::ToolOutput {
            tool: "pip",
            reason: format!("its report is not valid: {e}"),
        })
    }

    /// Every package the report installs, normalized and sorted.
    pub(crate) fn pins(&self) -> Vec<Pin> {
        let mut pins: Vec<Pin> = self
            .install
            .iter()
            .map(|item| Pin {
                name: normalize_python_name(&item.metadata.name),
                version: item.metadata.version.clone(),
            })
            .collect();
        pins.sort();
        pins.dedup();
        pins
    }
}

fn install_python(
    tools: &Tools,
    target: &Target,
    pins: &[Pin],
    tree: &Path,
    scratch: &Path,
    progress: &dyn Fn(&str),
) -> Result<Vec<Pin>, PackageError> {
    let python = PythonTarget::of(target)?;
    let dir = tree.join("python");
    let report = scratch.join("pip-report.json");
    progress(&format!(
        "installing {} with pip (wheels for CPython {} manylinux_{})",
        describe(pins),
        python.version,
        python.glibc.replace('.', "_")
    ));
    let mut command = tools.pip("install");
    command
        .arg("--target")
        .arg(&dir)
        .args([
            "--ignore-installed",
            "--no-compile",
            "--no-warn-script-location",
            "--progress-bar",
            "off",
            "--report",
        ])
        .arg(&report)
        .args(python.pip_options())
        .args(pins.iter().map(|p| format!("{}=={}", p.name, p.version)));
    let out = tool::run("pip", command, limits::PACKAGE_INSTALL_DEADLINE)?;
    if !out.status.success() {
        return Err(pip_failure(tools, &python, &out));
    }
    let closure = PipReport::read(&report)?.pins();
    check_requested_installed("pip", pins, &closure)?;
    rewrite_shebangs(&dir.join("bin"))?;
    compile(tools, &python, &dir, progress);
    Ok(closure)
}

/// Every requested package must be in the closure: otherwise the tool installed something
/// else than asked, and the cache key would lie. Versions are the tool's to enforce (pip
/// treats `==1.0` and `==1.0.0` as equal, and the closure records what the package says).
fn check_requested_installed(
    tool: &'static str,
    pins: &[Pin],
    closure: &[Pin],
) -> Result<(), PackageError> {
    match pins
        .iter()
        .find(|p| !closure.iter().any(|c| c.name == p.name))
    {
        None => Ok(()),
        Some(p) => Err(PackageError::ToolOutput {
            tool,
            reason: format!("{} is not among what it installed", p.name),
        }),
    }
}

/// Points console scripts at the guest's interpreter: pip wrote the host's into them (as a
/// `#!` line, or for long paths a `/bin/sh` trampoline). Other files are left alone.
pub(crate) fn rewrite_shebangs(bin: &Path) -> Result<(), PackageError> {
    let Ok(entries) = fs::read_dir(bin) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let bytes = fs::read(&path).map_err(PackageError::io("read", &path))?;
        if let Some(rewritten) = rewritten_script(&bytes) {
            fs::write(&path, rewritten).map_err(PackageError::io("write", &path))?;
        }
    }
    Ok(())
}

/// The script with its interpreter lines replaced by [`GUEST_PYTHON`], or `None` if it is not
/// a Python script pip wrote.
fn rewritten_script(bytes: &[u8]) -> Option<Vec<u8>> {
    let line_end = |from: usize| {
        bytes[from..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|i| from + i + 1)
    };
    let first = line_end(0)?;
    let head = &bytes[..first];
    let body_start = if head.starts_with(b"#!/bin/sh") {
        // pip's trampoline: `#!/bin/sh` / `'''exec' "<python>" "$0" "$@"` / `' '''`.
        let second = line_end(first)?;
        if !bytes[first..].starts_with(b"'''exec'") {
            return None;
        }
        let third = line_end(second)?;
        if bytes[second..third].trim_ascii() != b"' '''" {
            return None;
        }
        third
    } else if head.starts_with(b"#!") && head.windows(6).any(|w| w == b"python") {
        first
    } else {
        return None;
    };
    let mut out = format!("#!{GUEST_PYTHON}\n").into_bytes();
    out.extend_from_slice(&bytes[body_start..]);
    Some(out)
}

/// Byte-compiles `dir` with a host CPython of the guest's minor version (same bytecode), as
/// unchecked-hash `.pyc`: the guest's read-only mount cannot take the `.pyc` files Python would
/// otherwise write, and timestamps are fixed in the image. Without such an interpreter the
/// layer ships sources only (imports then compile in memory each time): a warning, not an
/// error.
fn compile(tools: &Tools, python: &PythonTarget, dir: &Path, progress: &dyn Fn(&str)) {
    let Some(interpreter) = tools.python_of_version(&python.version) else {
        tracing::warn!(
            "no CPython {} on this host: the package layer ships without .pyc files",
            python.version
        );
        return;
    };
    progress("byte-compiling");
    let mut command = tools.command(&interpreter);
    command
        .args([
            "-m",
            "compileall",
            "-q",
            "-j",
            "0",
            "--invalidation-mode",
            "unchecked-hash",
        ])
        .arg(dir);
    match tool::run("compileall", command, limits::PACKAGE_INSTALL_DEADLINE) {
        // Exit status 1: some file did not compile (test data with syntax errors, Python 2
        // leftovers); the rest did, and the guest compiles those in memory like before.
        Ok(out) if out.status.success() || out.status.code() == Some(1) => {
            if !out.status.success() {
                tracing::debug!("compileall skipped files: {}", out.tail(5));
            }
        }
        Ok(out) => tracing::warn!("byte-compiling the packages failed: {}", out.tail(5)),
        Err(e) => tracing::warn!(error = %e, "byte-compiling the packages failed"),
    }
}

/// Classifies a failed pip run (`install`, or `install --dry-run` when resolving).
pub(crate) fn pip_failure(tools: &Tools, python: &PythonTarget, out: &Output) -> PackageError {
    let text = format!("{}\n{}", out.stdout, out.stderr);
    if let Some(line) = text
        .lines()
        .find(|l| PIP_NETWORK_MARKERS.iter().any(|m| l.contains(m)))
    {
        return PackageError::IndexUnavailable {
            tool: "pip",
            detail: shorten(line.trim()),
        };
    }
    if text.contains("ResolutionImpossible") || text.contains("conflicting dependencies") {
        return PackageError::Conflict {
            detail: conflict_detail(&text),
        };
    }
    if text.contains("No module named pip") {
        return PackageError::ToolMissing {
            tool: "pip",
            program: tools.python.clone(),
        };
    }
    let Some(missing) = unsatisfied(&text) else {
        return out.failed("pip");
    };
    let listed = match index_versions(tools, python, &missing.name) {
        Ok(listed) => Some(listed),
        Err(e @ PackageError::IndexUnavailable { .. }) => return e,
        // `pip index` is marked experimental: a pip without it still gets a message.
        Err(e) => {
            tracing::debug!(error = %e, "pip cannot list the index's versions");
            None
        }
    };
    classify_unsatisfied(python, missing, listed)
}

/// What pip's "Could not find a version that satisfies the requirement …" line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unsatisfied {
    /// The normalized package name.
    pub(crate) name: String,
    /// The version specifier (`==1.0`, `>=2,<3`, empty).
    pub(crate) spec: String,
    /// The package requiring it, for a dependency.
    pub(crate) required_by: Option<String>,
    /// Versions with a usable wheel, newest first.
    pub(crate) wheel_versions: Vec<String>,
}

/// Parses pip's `Could not find a version that satisfies the requirement REQ (from PARENT)
/// (from versions: A, B)`.
pub(crate) fn unsatisfied(text: &str) -> Option<Unsatisfied> {
    const PREFIX: &str = "Could not find a version that satisfies the requirement ";
    let line = text.lines().find_map(|l| {
        let at = l.find(PREFIX)?;
        Some(&l[at + PREFIX.len()..])
    })?;
    let (requirement, versions) = line.rsplit_once(" (from versions: ")?;
    let versions = versions.trim_end().strip_suffix(')')?;
    let (requirement, required_by) = match requirement.split_once(" (from ") {
        Some((req, parent)) => (req, parent.strip_suffix(')').map(parent_name)),
        None => (requirement, None),
    };
    let requirement = requirement.trim();
    let name_len = requirement
        .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        .unwrap_or(requirement.len());
    let name = &requirement[..name_len];
    // `name[extra]>=1`: the extras do not matter to the message.
    let spec = requirement[name_len..].trim();
    let spec = match spec.strip_prefix('[') {
        Some(rest) => rest.split_once(']').map_or("", |(_, s)| s).trim(),
        None => spec,
    };
    let mut wheel_versions: Vec<String> = if versions.trim() == "none" {
        Vec::new()
    } else {
        versions.split(',').map(|v| v.trim().to_string()).collect()
    };
    wheel_versions.reverse();
    Some(Unsatisfied {
        name: normalize_python_name(name),
        spec: spec.to_string(),
        required_by,
        wheel_versions,
    })
}

/// `sbxdemo==1.0` or `sbxdemo` → `sbxdemo`.
fn parent_name(parent: &str) -> String {
    let end = parent
        .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        .unwrap_or(parent.len());
    normalize_python_name(&parent[..end])
}

/// The versions the index lists for `name` for this interpreter, wheels *or* source
/// distributions (`pip index versions` does not apply `--only-binary`), newest first; empty
/// when the index has nothing.
fn index_versions(
    tools: &Tools,
    python: &PythonTarget,
    name: &str,
) -> Result<Vec<String>, PackageError> {
    let mut command = tools.pip("index");
    command
        .arg("versions")
        .arg(name)
        .args(python.pip_options())
        .arg("--pre");
    let out = tool::run("pip", command, DIAGNOSE_DEADLINE)?;
    let text = format!("{}\n{}", out.stdout, out.stderr);
    if let Some(line) = text
        .lines()
        .find(|l| PIP_NETWORK_MARKERS.iter().any(|m| l.contains(m)))
    {
        return Err(PackageError::IndexUnavailable {
            tool: "pip",
            detail: shorten(line.trim()),
        });
    }
    if !out.status.success() {
        if text.contains("No matching distribution found") {
            return Ok(Vec::new());
        }
        return Err(out.failed("pip"));
    }
    Ok(out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("Available versions: "))
        .map(|list| list.split(',').map(|v| v.trim().to_string()).collect())
        .unwrap_or_default())
}

/// Decides what an unsatisfied requirement means, given every version the index lists
/// (wheels or sources; `None` when pip could not list them).
pub(crate) fn classify_unsatisfied(
    python: &PythonTarget,
    missing: Unsatisfied,
    listed: Option<Vec<String>>,
) -> PackageError {
    let exact = missing
        .spec
        .strip_prefix("==")
        .map(|v| v.trim().to_string());
    let no_wheel = |version: Option<String>, sdist_only: bool| PackageError::NoWheel {
        package: missing.name.clone(),
        version,
        python: python.version.clone(),
        glibc: python.glibc.clone(),
        sdist_only,
        required_by: missing.required_by.clone(),
    };
    let listed = match listed {
        Some(listed) => listed,
        // Without the listing, a package without usable wheels cannot be told from an unknown
        // one: say what is certain.
        None if missing.wheel_versions.is_empty() => return no_wheel(exact, false),
        None => missing.wheel_versions.clone(),
    };
    let no_wheel = |version: Option<String>| no_wheel(version, true);
    if listed.is_empty() && missing.wheel_versions.is_empty() {
        return PackageError::UnknownPackage {
            package: missing.name,
        };
    }
    if let Some(version) = exact {
        if listed.contains(&version) && !missing.wheel_versions.contains(&version) {
            return no_wheel(Some(version));
        }
        if missing.required_by.is_none() {
            return PackageError::VersionNotFound {
                package: missing.name,
                version,
                available: if listed.is_empty() {
                    missing.wheel_versions
                } else {
                    listed
                },
            };
        }
    }
    if missing.wheel_versions.is_empty() {
        return no_wheel(None);
    }
    PackageError::NoMatchingVersion {
        package: missing.name,
        range: missing.spec,
        required_by: missing.required_by,
        available: missing.wheel_versions,
    }
}

/// The "The conflict is caused by:" lines pip prints, joined.
fn conflict_detail(text: &str) -> String {
    let mut lines = text
        .lines()
        .skip_while(|l| !l.contains("The conflict is caused by:"));
    lines.next();
    let causes: Vec<&str> = lines
        .map(str::trim)
        .take_while(|l| !l.is_empty())
        .take(6)
        .collect();
    if causes.is_empty() {
        text.lines()
            .find(|l| l.contains("Cannot install"))
            .map(|l| shorten(l.trim_start_matches("ERROR: ").trim()))
            .unwrap_or_default()
    } else {
        causes.join("; ")
    }
}

fn shorten(line: &str) -> String {
    const MAX: usize = 300;
    if line.len() <= MAX {
        return line.to_string();
    }
    let mut end = MAX;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &line[..end])
}

/// `a 1.0, b 2.0` (or a count for long sets), for progress messages.
fn describe(pins: &[Pin]) -> String {
    if pins.len() > 4 {
        return format!("{} packages", pins.len());
    }
    pins.iter()
        .map(|p| format!("{} {}", p.name, p.version))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------------
// npm

/// `package-lock.json` (the fields read here).
#[derive(Debug, Deserialize)]
struct Lock {
    #[serde(default)]
    packages: BTreeMap<String, LockEntry>,
}

#[derive(Debug, Deserialize)]
struct LockEntry {
    name: Option<String>,
    version: Option<String>,
    #[serde(default)]
    link: bool,
}

/// A package's own `package.json` (the fields read here).
#[derive(Debug, Default, Deserialize)]
struct PackageJson {
    #[serde(default)]
    scripts: BTreeMap<String, serde_json::Value>,
    gypfile: Option<bool>,
}

fn install_npm(
    tools: &Tools,
    pins: &[Pin],
    tree: &Path,
    progress: &dyn Fn(&str),
) -> Result<Vec<Pin>, PackageError> {
    let prefix = tree.join("node");
    fs::create_dir_all(&prefix).map_err(PackageError::io("create", &prefix))?;
    progress(&format!(
        "installing {} with npm (scripts off)",
        describe(pins)
    ));
    let mut command = tools.npm("install");
    command
        .current_dir(&prefix)
        .arg("--prefix")
        .arg(&prefix)
        .args([
            "--ignore-scripts",
            "--no-audit",
            "--no-fund",
            "--omit=dev",
            "--save-exact",
            // Whatever the host's npm config says: a local tree, with its lock file.
            "--no-global",
            "--package-lock",
        ])
        .args(pins.iter().map(|p| format!("{}@{}", p.name, p.version)));
    let out = tool::run("npm", command, limits::PACKAGE_INSTALL_DEADLINE)?;
    if !out.status.success() {
        return Err(npm_failure(tools, &out, pins));
    }
    let closure = npm_closure(&prefix)?;
    check_requested_installed(
        "npm",
        pins,
        &closure.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(),
    )?;
    if let Some(refusal) = closure
        .iter()
        .find_map(|(pin, dir)| needs_scripts(dir).map(|reason| (pin, reason)))
    {
        let (pin, reason) = refusal;
        return Err(PackageError::InstallScript {
            package: pin.name.clone(),
            version: pin.version.clone(),
            reason,
        });
    }
    let mut pins: Vec<Pin> = closure.into_iter().map(|(p, _)| p).collect();
    pins.sort();
    pins.dedup();
    Ok(pins)
}

/// Every installed package of the lock with its directory, sorted by name and version.
/// Entries whose directory does not exist (optional packages for other platforms) are not
/// installed and not part of the closure.
fn npm_closure(prefix: &Path) -> Result<Vec<(Pin, PathBuf)>, PackageError> {
    let path = prefix.join("package-lock.json");
    let bytes = fs::read(&path).map_err(PackageError::io("read", &path))?;
    let lock: Lock = serde_json::from_slice(&bytes).map_err(|e| PackageError::ToolOutput {
        tool: "npm",
        reason: format!("its package-lock.json is not valid: {e}"),
    })?;
    let mut closure = Vec::new();
    for (key, entry) in lock.packages {
        if key.is_empty() || entry.link {
            continue;
        }
        // Lock keys are relative paths under the prefix; nothing else is trusted as one.
        if key
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(PackageError::ToolOutput {
                tool: "npm",
                reason: format!("its lock lists the path `{key}`"),
            });
        }
        let dir = prefix.join(&key);
        if !dir.is_dir() {
            continue;
        }
        let name = entry.name.unwrap_or_else(|| {
            key.rsplit_once("node_modules/")
                .map_or(key.as_str(), |(_, n)| n)
                .to_string()
        });
        let Some(version) = entry.version else {
            return Err(PackageError::ToolOutput {
                tool: "npm",
                reason: format!("its lock gives no version for `{key}`"),
            });
        };
        closure.push((Pin { name, version }, dir));
    }
    closure.sort();
    Ok(closure)
}

/// Why the package in `dir` cannot work without its install scripts, if it cannot: a
/// `preinstall` or `install` script, or a `binding.gyp` (npm runs `node-gyp rebuild` for it
/// unless `gypfile` is false). `postinstall` alone is allowed.
fn needs_scripts(dir: &Path) -> Option<String> {
    let manifest: PackageJson = fs::read(dir.join("package.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default();
    for script in ["preinstall", "install"] {
        if manifest.scripts.contains_key(script) {
            return Some(format!("`{script}` script"));
        }
    }
    if manifest.gypfile != Some(false) && dir.join("binding.gyp").is_file() {
        return Some("native addon build (binding.gyp)".into());
    }
    None
}

/// An npm error's code and message lines, from `--json` output or from the `npm error` /
/// `npm ERR!` lines of its error output.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct NpmError {
    pub(crate) code: String,
    pub(crate) lines: Vec<String>,
}

pub(crate) fn npm_error(out: &Output) -> NpmError {
    #[derive(Deserialize)]
    struct Json {
        error: JsonError,
    }
    #[derive(Deserialize)]
    struct JsonError {
        #[serde(default)]
        code: Option<String>,
        #[serde(default)]
        summary: String,
        #[serde(default)]
        detail: String,
    }
    if let Ok(Json { error }) = serde_json::from_str::<Json>(out.stdout.trim()) {
        let mut lines = vec![error.summary];
        lines.extend(error.detail.lines().map(str::to_string));
        return NpmError {
            code: error.code.unwrap_or_default(),
            lines,
        };
    }
    let mut error = NpmError::default();
    for line in out.stderr.lines() {
        let Some(rest) = line
            .strip_prefix("npm error ")
            .or_else(|| line.strip_prefix("npm ERR! "))
        else {
            continue;
        };
        match rest.strip_prefix("code ") {
            Some(code) if error.code.is_empty() => error.code = code.trim().to_string(),
            _ => error.lines.push(rest.trim().to_string()),
        }
    }
    error
}

/// Classifies a failed npm run (`install`, or `view` when resolving). `asked` are the pins of
/// an install (to tell an exact version from a range).
pub(crate) fn npm_failure(tools: &Tools, out: &Output, asked: &[Pin]) -> PackageError {
    let error = npm_error(out);
    let code = error.code.as_str();
    let first = |marker: &str| error.lines.iter().find(|l| l.contains(marker)).cloned();
    if NPM_NETWORK_CODES.contains(&code)
        || (code.len() == 4
            && code.starts_with("E5")
            && code[1..].bytes().all(|b| b.is_ascii_digit()))
    {
        return PackageError::IndexUnavailable {
            tool: "npm",
            detail: shorten(error.lines.first().map_or(code, String::as_str)),
        };
    }
    match code {
        "ETARGET" => {
            // `notarget No matching version found for sbx-demo@9.9.9.`
            let spec = first("No matching version found for ")
                .and_then(|l| {
                    l.split_once("No matching version found for ")
                        .map(|(_, s)| s.trim_end_matches('.').to_string())
                })
                .unwrap_or_default();
            let (package, range) = split_npm_spec(&spec);
            let available = npm_versions(tools, &package);
            if asked
                .iter()
                .any(|p| p.name == package && p.version == range)
            {
                PackageError::VersionNotFound {
                    package,
                    version: range,
                    available,
                }
            } else {
                PackageError::NoMatchingVersion {
                    package,
                    range,
                    required_by: None,
                    available,
                }
            }
        }
        "E404" => {
            // `The requested resource 'sbx-nope@1.0.0' could not be found …`
            let resource = first("The requested resource '").and_then(|l| {
                let (_, rest) = l.split_once("The requested resource '")?;
                Some(rest.split_once('\'')?.0.to_string())
            });
            let Some(spec) = resource else {
                return out.failed("npm");
            };
            let (package, range) = split_npm_spec(&spec);
            // `npm view name@range` on a known package: `No match found for version ^5`
            // (npm may call the package `undefined` here; the caller knows better).
            if first("No match found for version").is_some() {
                return PackageError::NoMatchingVersion {
                    package,
                    range,
                    required_by: None,
                    available: Vec::new(),
                };
            }
            PackageError::UnknownPackage { package }
        }
        "ERESOLVE" => PackageError::Conflict {
            detail: shorten(
                &error
                    .lines
                    .iter()
                    .filter(|l| !l.is_empty() && !l.starts_with("A complete log"))
                    .take(4)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
        },
        _ => out.failed("npm"),
    }
}

/// `@scope/name@^1.2` → (`@scope/name`, `^1.2`).
pub(crate) fn split_npm_spec(spec: &str) -> (String, String) {
    let search_from = usize::from(spec.starts_with('@'));
    match spec[search_from..].find('@') {
        Some(at) => (
            spec[..search_from + at].to_string(),
            spec[search_from + at + 1..].to_string(),
        ),
        None => (spec.to_string(), String::new()),
    }
}

/// The versions the registry has for `name`, newest first (best effort: empty on failure).
pub(crate) fn npm_versions(tools: &Tools, name: &str) -> Vec<String> {
    if name.is_empty() {
        return Vec::new();
    }
    let mut command = tools.npm("view");
    command.args([name, "versions", "--json"]);
    let Ok(out) = tool::run("npm", command, DIAGNOSE_DEADLINE) else {
        return Vec::new();
    };
    let mut versions: Vec<String> = match serde_json::from_str(out.stdout.trim()) {
        Ok(serde_json::Value::Array(list)) => list
            .into_iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        Ok(serde_json::Value::String(one)) => vec![one],
        _ => Vec::new(),
    };
    versions.sort_by(|a, b| compare_semver(b, a));
    versions
}

/// Orders npm versions by semver precedence (unparsable ones first, by text).
pub(crate) fn compare_semver(a: &str, b: &str) -> std::cmp::Ordering {
    match (semver::Version::parse(a), semver::Version::parse(b)) {
        (Ok(a), Ok(b)) => a.cmp(&b),
        (Ok(_), Err(_)) => std::cmp::Ordering::Greater,
        (Err(_), Ok(_)) => std::cmp::Ordering::Less,
        (Err(_), Err(_)) => a.cmp(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn python() -> PythonTarget {
        PythonTarget::of(&Target {
            ecosystem: Ecosystem::Python,
            image_version: "img".into(),
            interpreter: "3.11".into(),
            glibc: "2.36".into(),
        })
        .unwrap()
    }

    #[test]
    fn platform_tags_cover_every_manylinux_the_glibc_accepts() {
        let tags = manylinux_platforms(36);
        assert_eq!(tags.first().unwrap(), "manylinux_2_36_x86_64");
        assert_eq!(tags.last().unwrap(), "manylinux1_x86_64");
        assert_eq!(tags.len(), 32 + 3);
        let at = |t: &str| tags.iter().position(|x| x == t).unwrap();
        assert_eq!(at("manylinux2014_x86_64"), at("manylinux_2_17_x86_64") + 1);
        assert_eq!(at("manylinux2010_x86_64"), at("manylinux_2_12_x86_64") + 1);
        let options = python().pip_options();
        assert!(options.contains(&"--only-binary=:all:".to_string()));
        assert!(options.windows(2).any(|w| w == ["--abi", "cp311"]));
        assert!(
            options
                .windows(2)
                .any(|w| w == ["--python-version", "3.11"])
        );
    }

    #[test]
    fn targets_that_are_not_cpython_3_or_glibc_2_are_refused() {
        let mut target = Target {
            ecosystem: Ecosystem::Python,
            image_version: "img".into(),
            interpreter: "3.11.2".into(),
            glibc: "2.36".into(),
        };
        assert_eq!(PythonTarget::of(&target).unwrap().abi, "cp311");
        target.interpreter = "bun".into();
        assert!(PythonTarget::of(&target).is_err());
        target.interpreter = "3.11".into();
        target.glibc = "musl".into();
        assert!(PythonTarget::of(&target).is_err());
    }

    #[test]
    fn names_normalize_per_pep_503() {
        assert_eq!(
            normalize_python_name("Typing_Extensions"),
            "typing-extensions"
        );
        assert_eq!(normalize_python_name("zope.interface"), "zope-interface");
        assert_eq!(normalize_python_name("a-_.b"), "a-b");
    }

    #[test]
    fn console_scripts_get_the_guest_interpreter() {
        let plain =
            b"#!/root/.pyenv/versions/3.11.7/bin/python3\n# -*- coding: utf-8 -*-\nimport re\n";
        assert_eq!(
            rewritten_script(plain).unwrap(),
            b"#!/usr/bin/python3\n# -*- coding: utf-8 -*-\nimport re\n"
        );
        let trampoline =
            b"#!/bin/sh\n'''exec' \"/very/long/path/bin/python3\" \"$0\" \"$@\"\n' '''\nimport re\n";
        assert_eq!(
            rewritten_script(trampoline).unwrap(),
            b"#!/usr/bin/python3\nimport re\n"
        );
        assert_eq!(rewritten_script(b"#!/bin/sh\necho hi\n"), None);
        assert_eq!(rewritten_script(b"\x7fELF..."), None);
    }

    #[test]
    fn pip_unsatisfied_lines_parse() {
        let top = unsatisfied(
            "ERROR: Could not find a version that satisfies the requirement sbxdemo==9.9 (from versions: 1.0, 1.1)\nERROR: No matching distribution found for sbxdemo==9.9\n",
        )
        .unwrap();
        assert_eq!(
            top,
            Unsatisfied {
                name: "sbxdemo".into(),
                spec: "==9.9".into(),
                required_by: None,
                wheel_versions: vec!["1.1".into(), "1.0".into()],
            }
        );
        let dep = unsatisfied(
            "ERROR: Could not find a version that satisfies the requirement Sbx_Dep[fast]<1.0 (from sbxconflict==1.0) (from versions: none)",
        )
        .unwrap();
        assert_eq!(dep.name, "sbx-dep");
        assert_eq!(dep.spec, "<1.0");
        assert_eq!(dep.required_by.as_deref(), Some("sbxconflict"));
        assert!(dep.wheel_versions.is_empty());
        assert_eq!(unsatisfied("ERROR: something else"), None);
    }

    #[test]
    fn unsatisfied_requirements_classify() {
        let py = python();
        let missing = |spec: &str, by: Option<&str>, wheels: &[&str]| Unsatisfied {
            name: "pkg".into(),
            spec: spec.into(),
            required_by: by.map(str::to_string),
            wheel_versions: wheels.iter().map(|s| s.to_string()).collect(),
        };
        let listed = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let e = classify_unsatisfied(&py, missing("==1.0", None, &[]), listed(&["1.0"]));
        assert!(
            matches!(&e, PackageError::NoWheel { sdist_only: true, version: Some(v), .. } if v == "1.0"),
            "{e}"
        );
        let e = classify_unsatisfied(&py, missing("==9.9", None, &["1.0"]), listed(&["1.0"]));
        assert!(
            matches!(&e, PackageError::VersionNotFound { version, .. } if version == "9.9"),
            "{e}"
        );
        let e = classify_unsatisfied(&py, missing("==1.0", None, &[]), listed(&[]));
        assert!(matches!(e, PackageError::UnknownPackage { .. }), "{e}");
        let e = classify_unsatisfied(&py, missing("", Some("app"), &[]), listed(&["2.0"]));
        assert!(
            matches!(&e, PackageError::NoWheel { required_by: Some(p), version: None, .. } if p == "app"),
            "{e}"
        );
        let e = classify_unsatisfied(
            &py,
            missing("<1.0", Some("app"), &["1.0"]),
            listed(&["1.0"]),
        );
        assert!(
            matches!(&e, PackageError::NoMatchingVersion { range, required_by: Some(_), .. } if range == "<1.0"),
            "{e}"
        );
        // A pip that cannot list the index still names the package.
        let e = classify_unsatisfied(&py, missing("==1.0", None, &[]), None);
        assert!(
            matches!(&e, PackageError::NoWheel { sdist_only: false, version: Some(v), .. } if v == "1.0"),
            "{e}"
        );
        let e = classify_unsatisfied(&py, missing("==9.9", None, &["1.0"]), None);
        assert!(matches!(e, PackageError::VersionNotFound { .. }), "{e}");
    }

    #[test]
    fn pip_network_trouble_and_conflicts_are_recognised() {
        let out = |stdout: &str, stderr: &str| Output {
            status: std::process::ExitStatus::default(),
            stdout: stdout.into(),
            stderr: stderr.into(),
        };
        let tools = Tools::default();
        let e = pip_failure(
            &tools,
            &python(),
            &out(
                "",
                "WARNING: Retrying (Retry(total=0, connect=None)) after connection broken by 'NewConnectionError(...)': /simple/x/\nERROR: No matching distribution found for x==1",
            ),
        );
        assert!(
            matches!(e, PackageError::IndexUnavailable { tool: "pip", .. }),
            "{e}"
        );
        let e = pip_failure(
            &tools,
            &python(),
            &out(
                "The conflict is caused by:\n    a 1.0 depends on c>=1.0\n    b 1.0 depends on c<1.0\n\nTo fix this you could try to:\n",
                "ERROR: Cannot install a==1.0 and b==1.0 because these package versions have conflicting dependencies.\nERROR: ResolutionImpossible: for help visit …",
            ),
        );
        let PackageError::Conflict { detail } = &e else {
            panic!("{e}")
        };
        assert_eq!(detail, "a 1.0 depends on c>=1.0; b 1.0 depends on c<1.0");
    }

    #[test]
    fn npm_errors_classify() {
        let tools = Tools {
            npm: "/nonexistent/npm".into(),
            ..Tools::default()
        };
        let out = |stdout: &str, stderr: &str| Output {
            status: std::process::ExitStatus::default(),
            stdout: stdout.into(),
            stderr: stderr.into(),
        };
        let pins = [Pin {
            name: "sbx-demo".into(),
            version: "9.9.9".into(),
        }];
        let e = npm_failure(
            &tools,
            &out(
                "",
                "npm error code ETARGET\nnpm error notarget No matching version found for sbx-demo@9.9.9.\n",
            ),
            &pins,
        );
        assert!(
            matches!(&e, PackageError::VersionNotFound { package, version, .. } if package == "sbx-demo" && version == "9.9.9"),
            "{e}"
        );
        let e = npm_failure(
            &tools,
            &out(
                "",
                "npm ERR! code E404\nnpm ERR! 404 Not Found - GET http://127.0.0.1:9/@sbx%2fnope\nnpm ERR! 404  The requested resource '@sbx/nope@1.0.0' could not be found or you do not have permission to access it.\n",
            ),
            &[],
        );
        assert!(
            matches!(&e, PackageError::UnknownPackage { package } if package == "@sbx/nope"),
            "{e}"
        );
        let e = npm_failure(
            &tools,
            &out(
                "",
                "npm error code ECONNREFUSED\nnpm error FetchError: request to http://127.0.0.1:1/x failed\n",
            ),
            &[],
        );
        assert_eq!(e.kind(), crate::ErrorKind::Transient, "{e}");
        let e = npm_failure(
            &tools,
            &out(
                "",
                "npm error code E503\nnpm error 503 Service Unavailable\n",
            ),
            &[],
        );
        assert!(matches!(e, PackageError::IndexUnavailable { .. }), "{e}");
        let e = npm_failure(
            &tools,
            &out(
                r#"{"error":{"code":"E404","summary":"No match found for version ^5","detail":"The requested resource 'sbx-demo@^5' could not be found"}}"#,
                "",
            ),
            &[],
        );
        assert!(
            matches!(&e, PackageError::NoMatchingVersion { package, range, .. } if package == "sbx-demo" && range == "^5"),
            "{e}"
        );
    }

    #[test]
    fn npm_specs_split_at_the_version_even_when_scoped() {
        assert_eq!(
            split_npm_spec("@scope/name@^1.2"),
            ("@scope/name".into(), "^1.2".into())
        );
        assert_eq!(
            split_npm_spec("lodash@4.17.21"),
            ("lodash".into(), "4.17.21".into())
        );
        assert_eq!(split_npm_spec("lodash"), ("lodash".into(), String::new()));
    }

    #[test]
    fn npm_scripts_rule() {
        let dir = tempfile::tempdir().unwrap();
        let package = |name: &str, json: &str, gyp: bool| {
            let d = dir.path().join(name);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("package.json"), json).unwrap();
            if gyp {
                fs::write(d.join("binding.gyp"), "{}").unwrap();
            }
            d
        };
        let post = package(
            "post",
            r#"{"scripts":{"postinstall":"node x.js","test":"x"}}"#,
            false,
        );
        assert_eq!(needs_scripts(&post), None);
        let inst = package(
            "inst",
            r#"{"scripts":{"install":"node-gyp rebuild"}}"#,
            false,
        );
        assert_eq!(needs_scripts(&inst).unwrap(), "`install` script");
        let pre = package("pre", r#"{"scripts":{"preinstall":"x"}}"#, false);
        assert_eq!(needs_scripts(&pre).unwrap(), "`preinstall` script");
        let gyp = package("gyp", r#"{"name":"gyp"}"#, true);
        assert!(needs_scripts(&gyp).unwrap().contains("binding.gyp"));
        let no_gyp = package("nogyp", r#"{"gypfile":false}"#, true);
        assert_eq!(needs_scripts(&no_gyp), None);
    }

    #[test]
    fn semver_order_for_npm_versions() {
        let mut v = vec!["1.10.0", "1.2.0", "1.2.0-beta.1", "junk"];
        v.sort_by(|a, b| compare_semver(a, b));
        assert_eq!(v, ["junk", "1.2.0-beta.1", "1.2.0", "1.10.0"]);
    }
}
