//! What a package spec may look like, per ecosystem: syntax, limits and name normalization.
//!
//! Pure: no I/O, no index. A spec names one registry package and a version, either an exact pin
//! (`pandas==2.2.3`, `lodash@4.17.21`) or a range in the ecosystem's own syntax (`pandas>=2,<3`,
//! `lodash@^4.17.0`). Anything that would make the host fetch something other than a registry
//! package (URLs, paths, git, aliases), anything that changes what gets installed beyond name
//! and version (extras, environment markers), and a missing version are refused here, before
//! any VM boots or any download starts.
//!
//! - Python: names per PEP 508, normalized per PEP 503 (`Foo_Bar` is `foo-bar`); versions and
//!   specifier sets per PEP 440, checked by `pep440_rs` (the parser uv's own grew from).
//!   `name==V` is an exact pin, `V` kept as given; any other operator, a `==` with a `*`
//!   wildcard, or several comma-separated specifiers form a range, kept without its spaces.
//!   `===` (arbitrary equality) is refused. Extras are refused: they would add packages that the
//!   spec does not name, so the user lists those packages instead.
//! - npm: names per npm's rules for new packages (URL-safe, no leading `.` or `_`), except that
//!   upper case is accepted because old packages still carry it (`JSONStream`); names are kept as
//!   given (npm names are case-sensitive). A leading `-` is refused too, as PEP 508 refuses it:
//!   no accepted spec can pass for a command-line option of the tools that install it. `name@1.2.3` (semver, prerelease and build included)
//!   is an exact pin; npm ranges (`^`, `~`, comparators, `x`/`*` wildcards, `||`, hyphen ranges)
//!   are checked against node-semver's grammar, more strictly than npm itself (npm silently drops
//!   tokens it cannot read, `foo 1.2.3` being `1.2.3`). Dist-tags (`latest`) are refused.

use std::fmt;
use std::str::FromStr;

use super::{Constraint, Ecosystem, Requirement};
use crate::limits;

/// At most this many characters of a spec are quoted in an error message.
const SHOWN_CHARS: usize = 64;

/// A spec as quoted in error messages: its first 64 characters, with backticks,
/// backslashes, control and non-ASCII characters escaped, so that no input can forge or hide
/// text on the user's terminal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecText {
    shown: String,
    truncated: bool,
}

impl SpecText {
    pub(crate) fn new(spec: &str) -> SpecText {
        let mut chars = spec.chars();
        let shown = chars.by_ref().take(SHOWN_CHARS).collect();
        SpecText {
            shown,
            truncated: chars.next().is_some(),
        }
    }
}

impl fmt::Display for SpecText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("`")?;
        for c in self.shown.chars() {
            match c {
                '`' => f.write_str("\\`")?,
                '\\' => f.write_str("\\\\")?,
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                ' '..='~' => write!(f, "{c}")?,
                other => write!(f, "\\u{{{:04X}}}", u32::from(other))?,
            }
        }
        if self.truncated {
            f.write_str("...")?;
        }
        f.write_str("`")
    }
}

/// Which rule a spec broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rule {
    /// The spec is empty.
    Empty,
    /// A control character (newline, tab, NUL, escape...).
    ControlCharacter,
    /// A character outside ASCII (look-alike letters, odd spaces).
    NonAscii,
    /// Spaces at either end, or inside the name.
    Whitespace,
    /// `..` anywhere.
    DotDot,
    /// A URL or another protocol: `https:`, `file:`, `git+ssh:`, `npm:` aliases.
    Url,
    /// A path or a git shorthand (`./pkg`, `/tmp/x.whl`, `user/repo`).
    Path,
    /// A Python environment marker (`; python_version < "3.12"`).
    Marker,
    /// Python extras (`name[extra]`).
    Extras,
    /// A Python direct reference or an npm-style `@` in a Python spec.
    DirectReference,
    /// A Python-style operator right after an npm name (`lodash==4.17.21`).
    NpmSeparator,
    /// The name is longer than [`limits::MAX_PACKAGE_NAME_BYTES`].
    NameTooLong {
        /// The name's length in bytes.
        len: usize,
    },
    /// The name breaks the ecosystem's name syntax; the text says how.
    Name(&'static str),
    /// The version part is longer than [`limits::MAX_PACKAGE_VERSION_BYTES`].
    VersionTooLong {
        /// The version part's length in bytes.
        len: usize,
    },
    /// PEP 440 arbitrary equality (`===`).
    ArbitraryEquality,
    /// Not a PEP 440 version or specifier set.
    Pep440,
    /// Not a semver version or npm range.
    Semver,
    /// An npm dist-tag (`latest`, `next`).
    Tag,
}

const PYTHON_NAME: &str =
    "names are letters, digits, `-`, `_` and `.`, and start and end with a letter or digit";
const NPM_CHARACTERS: &str =
    "names are letters, digits, `-`, `_` and `.` (and `@scope/` before the name)";
const NPM_LEADING: &str = "a name may not start with `.`, `_` or `-`";
const NPM_SCOPE: &str = "a scoped name is `@scope/name`";
const NPM_RESERVED: &str = "`node_modules` and `favicon.ico` are reserved names";
const NAME_MISSING: &str = "the name is missing";

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Empty => f.write_str("the spec is empty"),
            Rule::ControlCharacter => f.write_str("contains a control character"),
            Rule::NonAscii => f.write_str("contains a character outside ASCII"),
            Rule::Whitespace => f.write_str("has spaces at an end or inside the name"),
            Rule::DotDot => f.write_str("contains `..`"),
            Rule::Url => f.write_str(
                "URLs, aliases and other protocols (`https:`, `file:`, `git+ssh:`, `npm:`) are not supported: give a registry name and version",
            ),
            Rule::Path => f.write_str(
                "paths and git shorthands (`./pkg`, `user/repo`) are not supported: give a registry name and version",
            ),
            Rule::Marker => f.write_str("environment markers (`; python_version ...`) are not supported"),
            Rule::Extras => f.write_str(
                "extras (`name[extra]`) are not supported: list the packages the extra adds as specs of their own",
            ),
            Rule::DirectReference => f.write_str(
                "`@` is not a Python version separator: pin with `==` (`name==1.2.3`)",
            ),
            Rule::NpmSeparator => {
                f.write_str("npm versions follow `@` (`name@1.2.3`, `name@^1.2.0`)")
            }
            Rule::NameTooLong { len } => write!(
                f,
                "the name is {len} bytes, limit is {}",
                limits::MAX_PACKAGE_NAME_BYTES
            ),
            Rule::Name(why) => f.write_str(why),
            Rule::VersionTooLong { len } => write!(
                f,
                "the version is {len} bytes, limit is {}",
                limits::MAX_PACKAGE_VERSION_BYTES
            ),
            Rule::ArbitraryEquality => {
                f.write_str("`===` (arbitrary equality) is not supported: use `==`")
            }
            Rule::Pep440 => f.write_str(
                "not a PEP 440 version or specifier set (`==1.2.3`, `>=1.2,<2`, `~=1.4`, `==1.2.*`)",
            ),
            Rule::Semver => f.write_str(
                "not a semver version or npm range (`1.2.3`, `^1.2.0`, `~1.2`, `>=1 <2`, `1.x`, `1 - 2`)",
            ),
            Rule::Tag => f.write_str(
                "tags (`latest`) are not versions: pin a version (`name@1.2.3`) or a range (`name@^1.2.0`)",
            ),
        }
    }
}

/// Why a package list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// More than [`limits::MAX_PACKAGES`] specs.
    #[error("{count} packages, limit is {}", limits::MAX_PACKAGES)]
    TooMany {
        /// How many were given.
        count: usize,
    },
    /// Packages for a language that takes none (`raw`).
    #[error("language {language} takes no packages")]
    NoPackagesFor {
        /// The language.
        language: sbx_protocol::Language,
    },
    /// One spec broke a syntax rule.
    #[error("package {spec}: {rule}")]
    Invalid {
        /// The spec, for display.
        spec: SpecText,
        /// The rule.
        rule: Rule,
    },
    /// A bare name: every spec needs a version. Data only: the caller may add the index's
    /// newest version to what the user sees.
    #[error("package {spec} has no version")]
    NoVersion {
        /// The spec, for display.
        spec: SpecText,
        /// The normalized name.
        name: String,
        /// Its ecosystem.
        ecosystem: Ecosystem,
    },
    /// Two specs name the same package (after normalization).
    #[error("packages {first} and {second} name the same package")]
    Duplicate {
        /// The normalized name.
        name: String,
        /// The earlier spec.
        first: SpecText,
        /// The later spec.
        second: SpecText,
    },
    /// With validation on, a name outside the ecosystem's bundled allowlist.
    #[error(
        "package {spec} is not among {}'s 10,000 most-downloaded packages",
        index_name(*.ecosystem)
    )]
    NotAllowed {
        /// The spec, for display.
        spec: SpecText,
        /// The normalized name.
        name: String,
        /// Its ecosystem.
        ecosystem: Ecosystem,
        /// An allowed name that differs only in case (npm names are case-sensitive).
        suggestion: Option<String>,
    },
}

impl SpecError {
    /// The hint, when the index's newest version of a bare name is known.
    pub(crate) fn hint_with_newest(&self, newest: &str) -> Option<String> {
        match self {
            SpecError::NoVersion {
                name, ecosystem, ..
            } => Some(match ecosystem {
                Ecosystem::Python => format!("pin a version: `{name}=={newest}` is the newest"),
                Ecosystem::Npm => format!("pin a version: `{name}@{newest}` is the newest"),
            }),
            _ => self.hint(),
        }
    }

    /// A suggestion for the user, when there is an obvious fix.
    pub fn hint(&self) -> Option<String> {
        match self {
            SpecError::NoVersion {
                name, ecosystem, ..
            } => Some(match ecosystem {
                Ecosystem::Python => format!("pin a version: `{name}==VERSION`"),
                Ecosystem::Npm => format!("pin a version: `{name}@VERSION`"),
            }),
            SpecError::Duplicate { .. } => Some("give each package once".into()),
            SpecError::NoPackagesFor { .. } => {
                Some("packages are for python and javascript".into())
            }
            SpecError::NotAllowed { suggestion, .. } => {
                let off = "to allow packages outside the list, turn package validation off \
                           (`--no-validation`, or `enable_package_validation: false` in `SchedulerConfig`)";
                Some(match suggestion {
                    Some(other) => {
                        format!("npm names are case-sensitive: did you mean `{other}`? {off}")
                    }
                    None => format!("check the name; {off}"),
                })
            }
            SpecError::TooMany { .. } | SpecError::Invalid { .. } => None,
        }
    }
}

/// The name of an ecosystem's package index, for messages.
pub(crate) fn index_name(ecosystem: Ecosystem) -> &'static str {
    match ecosystem {
        Ecosystem::Python => "PyPI",
        Ecosystem::Npm => "npm",
    }
}

/// A name in its normalized form: PEP 503 for Python (lower case, each run of `-`, `_` and `.`
/// one `-`); npm names as they are.
pub(crate) fn normalize(ecosystem: Ecosystem, name: &str) -> String {
    match ecosystem {
        Ecosystem::Python => normalize_python(name),
        Ecosystem::Npm => name.to_owned(),
    }
}

fn normalize_python(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut in_separator_run = false;
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            if !in_separator_run {
                out.push('-');
            }
            in_separator_run = true;
        } else {
            out.extend(c.to_lowercase());
            in_separator_run = false;
        }
    }
    out
}

/// Checks one spec and returns it as a requirement with a normalized name.
pub(crate) fn parse(ecosystem: Ecosystem, spec: &str) -> Result<Requirement, SpecError> {
    let parsed = common(ecosystem, spec).and_then(|()| match ecosystem {
        Ecosystem::Python => python(spec),
        Ecosystem::Npm => npm(spec),
    });
    parsed.map_err(|refusal| match refusal {
        Refusal::Rule(rule) => SpecError::Invalid {
            spec: SpecText::new(spec),
            rule,
        },
        Refusal::NoVersion(name) => SpecError::NoVersion {
            spec: SpecText::new(spec),
            name,
            ecosystem,
        },
    })
}

/// Checks a list of specs: at most [`limits::MAX_PACKAGES`], each valid, no package twice
/// (after normalization). Sorted by normalized name.
#[cfg(test)]
pub(crate) fn parse_all(
    ecosystem: Ecosystem,
    specs: &[String],
) -> Result<Vec<Requirement>, SpecError> {
    let mut requirements: Vec<Requirement> = parse_each(ecosystem, specs)?
        .into_iter()
        .map(|(requirement, _)| requirement)
        .collect();
    requirements.sort();
    Ok(requirements)
}

/// [`parse_all`], unsorted: each requirement with its spec, in the caller's order.
pub(super) fn parse_each(
    ecosystem: Ecosystem,
    specs: &[String],
) -> Result<Vec<(Requirement, &str)>, SpecError> {
    if specs.len() > limits::MAX_PACKAGES {
        return Err(SpecError::TooMany { count: specs.len() });
    }
    let mut out: Vec<(Requirement, &str)> = Vec::with_capacity(specs.len());
    for spec in specs {
        let requirement = parse(ecosystem, spec)?;
        if let Some((_, first)) = out.iter().find(|(r, _)| r.name == requirement.name) {
            return Err(SpecError::Duplicate {
                name: requirement.name,
                first: SpecText::new(first),
                second: SpecText::new(spec),
            });
        }
        out.push((requirement, spec));
    }
    Ok(out)
}

/// Why one spec was refused, before the spec is attached for display.
enum Refusal {
    Rule(Rule),
    /// No version; the normalized name.
    NoVersion(String),
}

impl From<Rule> for Refusal {
    fn from(rule: Rule) -> Refusal {
        Refusal::Rule(rule)
    }
}

/// Rules both ecosystems share, on the whole spec.
fn common(ecosystem: Ecosystem, spec: &str) -> Result<(), Refusal> {
    let rule = if spec.is_empty() {
        Rule::Empty
    } else if spec.chars().any(char::is_control) {
        Rule::ControlCharacter
    } else if !spec.is_ascii() {
        Rule::NonAscii
    } else if spec.starts_with(' ') || spec.ends_with(' ') {
        Rule::Whitespace
    } else if spec.contains("..") {
        Rule::DotDot
    } else if spec.contains(':') {
        // Neither names nor versions contain `:`: every URL, `file:`, `git+ssh:`, `github:` or
        // `npm:` alias, and Windows drive path does.
        Rule::Url
    } else if ecosystem == Ecosystem::Python && spec.contains(';') {
        Rule::Marker
    } else if spec.contains('\\')
        || spec.starts_with(['.', '/', '~'])
        || (ecosystem == Ecosystem::Python && spec.contains('/'))
    {
        Rule::Path
    } else {
        return Ok(());
    };
    Err(rule.into())
}

fn is_python_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

fn python(spec: &str) -> Result<Requirement, Refusal> {
    let name_end = spec.find(|c| !is_python_name_char(c)).unwrap_or(spec.len());
    let (name, rest) = spec.split_at(name_end);
    let version = rest.trim_start_matches(' ');
    let spaced = version.len() != rest.len();
    match version.chars().next() {
        None => {
            python_name(name)?;
            return Err(Refusal::NoVersion(normalize_python(name)));
        }
        Some('[') => return Err(Rule::Extras.into()),
        Some('@') => return Err(Rule::DirectReference.into()),
        Some(c) if spaced && is_python_name_char(c) => return Err(Rule::Whitespace.into()),
        Some('=' | '<' | '>' | '!' | '~') => {}
        // A character no name may contain, right in the name.
        Some(_) if !spaced => return Err(Rule::Name(PYTHON_NAME).into()),
        Some(_) => return Err(Rule::Pep440.into()),
    }
    python_name(name)?;
    if version.len() > limits::MAX_PACKAGE_VERSION_BYTES {
        return Err(Rule::VersionTooLong { len: version.len() }.into());
    }
    if version.contains("===") {
        return Err(Rule::ArbitraryEquality.into());
    }
    let specifiers = pep440_rs::VersionSpecifiers::from_str(version).map_err(|_| Rule::Pep440)?;
    // The parser accepts spaces around operators and commas only, so dropping them changes
    // nothing but the form.
    let compact: String = version.chars().filter(|&c| c != ' ').collect();
    let constraint = match &*specifiers {
        [] => return Err(Rule::Pep440.into()),
        [single] if *single.operator() == pep440_rs::Operator::Equal => {
            let exact = compact.strip_prefix("==").ok_or(Rule::Pep440)?;
            Constraint::Exact(exact.to_owned())
        }
        _ => Constraint::Range(compact),
    };
    Ok(Requirement {
        name: normalize_python(name),
        constraint,
    })
}

/// PEP 508: `^([A-Z0-9]|[A-Z0-9][A-Z0-9._-]*[A-Z0-9])$`, case-insensitive.
fn python_name(name: &str) -> Result<(), Rule> {
    if name.len() > limits::MAX_PACKAGE_NAME_BYTES {
        return Err(Rule::NameTooLong { len: name.len() });
    }
    let edges_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if name.is_empty() {
        Err(Rule::Name(NAME_MISSING))
    } else if !name.chars().all(is_python_name_char)
        || !edges_ok(name.chars().next())
        || !edges_ok(name.chars().next_back())
    {
        Err(Rule::Name(PYTHON_NAME))
    } else {
        Ok(())
    }
}

fn npm(spec: &str) -> Result<Requirement, Refusal> {
    // In `@scope/name@1.2.3` the first `@` belongs to the name.
    let at = match spec.strip_prefix('@') {
        Some(scoped) => scoped.find('@').map(|i| i + 1),
        None => spec.find('@'),
    };
    let (name, version) = match at {
        Some(i) => (&spec[..i], Some(&spec[i + 1..])),
        None => (spec, None),
    };
    if name.contains(['=', '<', '>', '^', '~', '|']) {
        return Err(Rule::NpmSeparator.into());
    }
    if name.contains(' ') {
        return Err(Rule::Whitespace.into());
    }
    npm_name(name)?;
    let version = version.unwrap_or_default().trim_matches(' ');
    if version.is_empty() {
        return Err(Refusal::NoVersion(name.to_owned()));
    }
    if version.len() > limits::MAX_PACKAGE_VERSION_BYTES {
        return Err(Rule::VersionTooLong { len: version.len() }.into());
    }
    if version.contains('/') {
        return Err(Rule::Path.into());
    }
    let constraint = match npm_version(version) {
        Some(NpmVersion::Exact) => Constraint::Exact(version.to_owned()),
        Some(NpmVersion::Range(range)) => Constraint::Range(range),
        Some(NpmVersion::Any) => return Err(Refusal::NoVersion(name.to_owned())),
        None if is_tag(version) => return Err(Rule::Tag.into()),
        None => return Err(Rule::Semver.into()),
    };
    Ok(Requirement {
        name: name.to_owned(),
        constraint,
    })
}

/// npm's name rules (validate-npm-package-name) for new packages, upper case aside.
fn npm_name(name: &str) -> Result<(), Rule> {
    if name.len() > limits::MAX_PACKAGE_NAME_BYTES {
        return Err(Rule::NameTooLong { len: name.len() });
    }
    if name.is_empty() {
        return Err(Rule::Name(NAME_MISSING));
    }
    let lower = name.to_ascii_lowercase();
    if lower == "node_modules" || lower == "favicon.ico" {
        return Err(Rule::Name(NPM_RESERVED));
    }
    match name.strip_prefix('@') {
        Some(scoped) => {
            let (scope, bare) = scoped.split_once('/').ok_or(Rule::Name(NPM_SCOPE))?;
            if bare.contains('/') {
                return Err(Rule::Path);
            }
            npm_name_part(scope)?;
            npm_name_part(bare)
        }
        None if name.contains('/') => Err(Rule::Path),
        None => npm_name_part(name),
    }
}

fn npm_name_part(part: &str) -> Result<(), Rule> {
    if part.is_empty() {
        Err(Rule::Name(NPM_SCOPE))
    } else if part.starts_with(['.', '_', '-']) {
        // npm refuses `.` and `_`; `-` too here, so that no spec can pass for a command-line
        // option of the tools that install it.
        Err(Rule::Name(NPM_LEADING))
    } else if !part
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        Err(Rule::Name(NPM_CHARACTERS))
    } else {
        Ok(())
    }
}

/// A word that npm would take as a dist-tag (`latest`, `next`, `beta`); `v1.2.3` is a
/// malformed version, not a tag.
fn is_tag(version: &str) -> bool {
    let mut chars = version.chars();
    let first = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    let v_number =
        version.starts_with(['v', 'V']) && version[1..].starts_with(|c: char| c.is_ascii_digit());
    first && !v_number && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// What an npm version part means.
enum NpmVersion {
    /// One full semver version: an exact pin.
    Exact,
    /// A range, in a normalized form (single spaces, operators joined to their versions).
    Range(String),
    /// Any version at all (`*`, `x`): no version.
    Any,
}

/// Parses node-semver's grammar:
///
/// ```text
/// range-set  ::= range ( logical-or range ) *
/// logical-or ::= ( ' ' ) * '||' ( ' ' ) *
/// range      ::= hyphen | simple ( ' ' simple ) *
/// hyphen     ::= partial ' - ' partial
/// simple     ::= ( '<' | '>' | '>=' | '<=' | '=' | '~' | '~>' | '^' ) ? partial
/// partial    ::= xr ( '.' xr ( '.' xr qualifier ? )? )?
/// xr         ::= 'x' | 'X' | '*' | nr
/// nr         ::= '0' | ['1'-'9'] ( ['0'-'9'] ) *
/// qualifier  ::= ( '-' pre )? ( '+' build )?
/// ```
///
/// Stricter than npm in four ways: an empty range (between `||`) is refused; a qualifier only
/// follows three numbers; a number never follows a wildcard (`1.x.3`); an operator and each end
/// of a hyphen range need a major version (`^x`, `>=*`, `1 - x` are refused). Spaces between an
/// operator and its version are allowed, as npm allows them.
fn npm_version(text: &str) -> Option<NpmVersion> {
    let mut ranges = Vec::new();
    for range in text.split("||") {
        let tokens: Vec<&str> = range.split(' ').filter(|t| !t.is_empty()).collect();
        ranges.push(npm_range(&tokens)?);
    }
    if let [only] = ranges.as_slice()
        && let Some(partial) = parse_partial(only)
    {
        return Some(match partial {
            Partial::Full => NpmVersion::Exact,
            Partial::Wildcard => NpmVersion::Any,
            Partial::Prefix => NpmVersion::Range(only.clone()),
        });
    }
    Some(NpmVersion::Range(ranges.join(" || ")))
}

const NPM_OPERATORS: [&str; 8] = [">=", "<=", "~>", ">", "<", "=", "~", "^"];

fn npm_range(tokens: &[&str]) -> Option<String> {
    let mut simple: Vec<String> = Vec::with_capacity(tokens.len());
    let mut rest = tokens.iter();
    while let Some(&token) = rest.next() {
        if NPM_OPERATORS.contains(&token) {
            simple.push(format!("{token}{}", rest.next()?));
        } else {
            simple.push(token.to_owned());
        }
    }
    match simple.as_slice() {
        [] => None,
        [low, dash, high] if dash == "-" => {
            // `x - 2`, `1 - *`: each end needs a major version.
            for end in [low, high] {
                if let Partial::Wildcard = parse_partial(end)? {
                    return None;
                }
            }
            Some(format!("{low} - {high}"))
        }
        _ => {
            for comparator in &simple {
                match NPM_OPERATORS
                    .iter()
                    .find_map(|op| comparator.strip_prefix(op))
                {
                    // `^x`, `>=*`: an operator needs a major version.
                    Some(partial) => match parse_partial(partial)? {
                        Partial::Wildcard => return None,
                        Partial::Full | Partial::Prefix => {}
                    },
                    None => {
                        parse_partial(comparator)?;
                    }
                }
            }
            Some(simple.join(" "))
        }
    }
}

/// What kind of version a `partial` is.
enum Partial {
    /// `1.2.3`, `1.2.3-rc.1+build.5`.
    Full,
    /// `1`, `1.2`, `1.x`, `1.2.*`.
    Prefix,
    /// `*`, `x`, `X.x`.
    Wildcard,
}

fn parse_partial(text: &str) -> Option<Partial> {
    let (core, qualifier) = match text.find(['-', '+']) {
        Some(i) => (&text[..i], Some(&text[i..])),
        None => (text, None),
    };
    let parts: Vec<&str> = core.split('.').collect();
    if parts.len() > 3 {
        return None;
    }
    let mut numbers = 0;
    let mut wildcard = false;
    for part in &parts {
        if matches!(*part, "x" | "X" | "*") {
            wildcard = true;
        } else if wildcard {
            // `1.x.3`: npm ignores what follows a wildcard; refused here.
            return None;
        } else {
            numeric_identifier(part)?;
            numbers += 1;
        }
    }
    if let Some(qualifier) = qualifier {
        if numbers != 3 {
            return None;
        }
        let (pre, build) = match qualifier.split_once('+') {
            Some((pre, build)) => (pre, Some(build)),
            None => (qualifier, None),
        };
        if let Some(pre) = pre.strip_prefix('-') {
            for identifier in pre.split('.') {
                let numeric =
                    !identifier.is_empty() && identifier.bytes().all(|b| b.is_ascii_digit());
                if !is_identifier(identifier)
                    || (numeric && identifier.len() > 1 && identifier.starts_with('0'))
                {
                    return None;
                }
            }
        } else if !pre.is_empty() {
            return None;
        }
        if let Some(build) = build
            && !build.split('.').all(is_identifier)
        {
            return None;
        }
    }
    Some(match numbers {
        3 => Partial::Full,
        0 => Partial::Wildcard,
        _ => Partial::Prefix,
    })
}

/// `0|[1-9][0-9]*`, at most JavaScript's largest safe integer (node-semver's own limit).
fn numeric_identifier(text: &str) -> Option<u64> {
    const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;
    let digits = !text.is_empty() && text.len() <= 16 && text.bytes().all(|b| b.is_ascii_digit());
    if !digits || (text.len() > 1 && text.starts_with('0')) {
        return None;
    }
    text.parse().ok().filter(|&n| n <= MAX_SAFE_INTEGER)
}

/// A semver prerelease or build identifier: `[0-9A-Za-z-]+`.
fn is_identifier(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn exact(v: &str) -> Constraint {
        Constraint::Exact(v.into())
    }

    fn range(v: &str) -> Constraint {
        Constraint::Range(v.into())
    }

    /// Asserts that `spec` is accepted as `name` with `constraint`.
    fn accepts(ecosystem: Ecosystem, spec: &str, name: &str, constraint: Constraint) {
        let expected = Requirement {
            name: name.into(),
            constraint,
        };
        assert_eq!(parse(ecosystem, spec), Ok(expected), "{spec}");
    }

    /// Asserts that `spec` breaks `rule`, and that the message quotes the spec.
    fn refuses(ecosystem: Ecosystem, spec: &str, rule: Rule) {
        let err = parse(ecosystem, spec).expect_err(spec);
        assert_eq!(
            err,
            SpecError::Invalid {
                spec: SpecText::new(spec),
                rule
            },
            "{spec}"
        );
        names_the_spec(&err, spec);
    }

    fn names_the_spec(err: &SpecError, spec: &str) {
        let message = err.to_string();
        assert!(
            message.contains(&SpecText::new(spec).to_string()),
            "{message}"
        );
        let plain = spec
            .chars()
            .all(|c| (' '..='~').contains(&c) && c != '`' && c != '\\');
        if plain && spec.len() <= SHOWN_CHARS {
            assert!(message.contains(&format!("`{spec}`")), "{message}");
        }
        assert!(!message.chars().any(char::is_control), "{message}");
    }

    fn no_version(ecosystem: Ecosystem, spec: &str, name: &str) {
        let err = parse(ecosystem, spec).expect_err(spec);
        assert_eq!(
            err,
            SpecError::NoVersion {
                spec: SpecText::new(spec),
                name: name.into(),
                ecosystem
            },
            "{spec}"
        );
        names_the_spec(&err, spec);
        assert!(err.hint().unwrap().contains(name), "{:?}", err.hint());
    }

    #[test]
    fn python_exact_pins() {
        use Ecosystem::Python;
        for (spec, name, version) in [
            ("pandas==2.2.3", "pandas", "2.2.3"),
            ("numpy == 2.1.3", "numpy", "2.1.3"),
            ("Foo_Bar.baz==1.0", "foo-bar-baz", "1.0"),
            ("A1==1", "a1", "1"),
            ("x==0", "x", "0"),
            ("torch==2.4.0+cpu", "torch", "2.4.0+cpu"),
            ("pkg==1!2.0", "pkg", "1!2.0"),
            ("pkg==1.0rc1", "pkg", "1.0rc1"),
            ("pkg==1.0.post1.dev2", "pkg", "1.0.post1.dev2"),
        ] {
            accepts(Python, spec, name, exact(version));
        }
        let longest = "n".repeat(limits::MAX_PACKAGE_NAME_BYTES);
        accepts(Python, &format!("{longest}==1"), &longest, exact("1"));
    }

    #[test]
    fn python_ranges() {
        use Ecosystem::Python;
        for (spec, text) in [
            ("requests>=2.31", ">=2.31"),
            ("requests<=2.31", "<=2.31"),
            ("requests<3", "<3"),
            ("requests>2", ">2"),
            ("requests!=2.0", "!=2.0"),
            ("requests~=2.31", "~=2.31"),
            ("requests==2.*", "==2.*"),
            ("requests==2.31.*", "==2.31.*"),
            ("requests!=2.*", "!=2.*"),
            ("requests>=2,<3", ">=2,<3"),
            ("requests >= 2.0 , != 2.1 , < 3", ">=2.0,!=2.1,<3"),
            ("requests==2.0,==2.0", "==2.0,==2.0"),
        ] {
            accepts(Python, spec, "requests", range(text));
        }
    }

    #[test]
    fn python_refusals() {
        use Ecosystem::Python;
        let long_name = "n".repeat(limits::MAX_PACKAGE_NAME_BYTES + 1);
        let long_version = format!(">={}", "1".repeat(limits::MAX_PACKAGE_VERSION_BYTES));
        let table: Vec<(String, Rule)> = vec![
            ("".into(), Rule::Empty),
            ("pandas==2.2.3\n".into(), Rule::ControlCharacter),
            ("pan\0das==1".into(), Rule::ControlCharacter),
            ("pandas==1\t".into(), Rule::ControlCharacter),
            ("pandas\t==1".into(), Rule::ControlCharacter),
            ("\u{1b}[31mpandas==1".into(), Rule::ControlCharacter),
            ("pandas==1\u{7f}".into(), Rule::ControlCharacter),
            ("pand\u{e4}s==1".into(), Rule::NonAscii),
            ("pandas\u{a0}==1".into(), Rule::NonAscii),
            ("\u{440}andas==1".into(), Rule::NonAscii),
            ("pandas==1\u{202e}".into(), Rule::NonAscii),
            (" pandas==1".into(), Rule::Whitespace),
            ("pandas==1 ".into(), Rule::Whitespace),
            ("pan das==1".into(), Rule::Whitespace),
            ("../pandas".into(), Rule::DotDot),
            ("pandas==1..2".into(), Rule::DotDot),
            ("a..b==1".into(), Rule::DotDot),
            ("pandas @ https://example.invalid/p.whl".into(), Rule::Url),
            ("file:///tmp/p.whl".into(), Rule::Url),
            ("git+https://example.invalid/p".into(), Rule::Url),
            ("C:\\pkgs\\p.whl".into(), Rule::Url),
            ("pandas==2.2.3; python_version<'3.12'".into(), Rule::Marker),
            ("pandas==2.2.3 ;sys_platform=='linux'".into(), Rule::Marker),
            ("./pandas".into(), Rule::Path),
            ("/tmp/pandas.whl".into(), Rule::Path),
            ("dist/pandas-2.2.3.whl".into(), Rule::Path),
            ("~/pkgs".into(), Rule::Path),
            ("pkgs\\p.whl".into(), Rule::Path),
            ("requests[socks]==2.31.0".into(), Rule::Extras),
            ("requests [socks,http2]>=2".into(), Rule::Extras),
            ("numpy@2.1.3".into(), Rule::DirectReference),
            ("pandas===2.2.3".into(), Rule::ArbitraryEquality),
            ("pandas=2.2.3".into(), Rule::Pep440),
            ("pandas==".into(), Rule::Pep440),
            ("pandas>=1,".into(), Rule::Pep440),
            ("pandas>=1,,<2".into(), Rule::Pep440),
            ("pandas==latest".into(), Rule::Pep440),
            ("pandas>1.*".into(), Rule::Pep440),
            ("pandas~=1".into(), Rule::Pep440),
            ("pandas>=1.0+local".into(), Rule::Pep440),
            ("pandas==1 .0".into(), Rule::Pep440),
            ("pandas (>=1.0)".into(), Rule::Pep440),
            ("pandas<>1".into(), Rule::Pep440),
            ("pandas==99999999999999999999999".into(), Rule::Pep440),
            ("pan$das==1".into(), Rule::Name(PYTHON_NAME)),
            ("-pandas==1".into(), Rule::Name(PYTHON_NAME)),
            ("pandas-==1".into(), Rule::Name(PYTHON_NAME)),
            ("pandas_".into(), Rule::Name(PYTHON_NAME)),
            ("==1.0".into(), Rule::Name(NAME_MISSING)),
            (
                format!("{long_name}==1"),
                Rule::NameTooLong {
                    len: long_name.len(),
                },
            ),
            (
                format!("pandas{long_version}"),
                Rule::VersionTooLong {
                    len: long_version.len(),
                },
            ),
        ];
        for (spec, rule) in table {
            refuses(Python, &spec, rule);
        }
    }

    #[test]
    fn python_bare_names_have_no_version() {
        no_version(Ecosystem::Python, "requests", "requests");
        no_version(Ecosystem::Python, "Typing_Extensions", "typing-extensions");
        let err = parse(Ecosystem::Python, "requests").unwrap_err();
        assert_eq!(err.to_string(), "package `requests` has no version");
        assert_eq!(
            err.hint().as_deref(),
            Some("pin a version: `requests==VERSION`")
        );
    }

    #[test]
    fn npm_exact_pins() {
        use Ecosystem::Npm;
        for (spec, name, version) in [
            ("lodash@4.17.21", "lodash", "4.17.21"),
            ("@types/node@20.11.5", "@types/node", "20.11.5"),
            ("react@19.0.0-rc.1", "react", "19.0.0-rc.1"),
            ("esbuild@0.20.0+build.5", "esbuild", "0.20.0+build.5"),
            (
                "left-pad@1.3.0-beta.2+exp.sha.5114f85",
                "left-pad",
                "1.3.0-beta.2+exp.sha.5114f85",
            ),
            ("socket.io@4.7.5", "socket.io", "4.7.5"),
            ("@scope/pkg.js@1.0.0", "@scope/pkg.js", "1.0.0"),
            ("JSONStream@1.3.5", "JSONStream", "1.3.5"),
            ("lodash@ 4.17.21", "lodash", "4.17.21"),
            ("a@0.0.0", "a", "0.0.0"),
        ] {
            accepts(Npm, spec, name, exact(version));
        }
        let longest = "n".repeat(limits::MAX_PACKAGE_NAME_BYTES);
        accepts(Npm, &format!("{longest}@1.0.0"), &longest, exact("1.0.0"));
    }

    #[test]
    fn npm_ranges() {
        use Ecosystem::Npm;
        for (spec, text) in [
            ("lodash@^4.17.0", "^4.17.0"),
            ("lodash@~4.17", "~4.17"),
            ("lodash@~>4.1", "~>4.1"),
            ("lodash@>=4 <5", ">=4 <5"),
            ("lodash@>= 4.0.0   < 5", ">=4.0.0 <5"),
            ("lodash@>4.0.0-rc.1", ">4.0.0-rc.1"),
            ("lodash@<=4", "<=4"),
            ("lodash@<4.0.0-0", "<4.0.0-0"),
            ("lodash@=4.17.21", "=4.17.21"),
            ("lodash@4", "4"),
            ("lodash@4.17", "4.17"),
            ("lodash@4.x", "4.x"),
            ("lodash@4.17.*", "4.17.*"),
            ("lodash@4.X.x", "4.X.x"),
            ("lodash@^4.x", "^4.x"),
            ("lodash@1.2.3 - 2.3.4", "1.2.3 - 2.3.4"),
            ("lodash@1 - 2", "1 - 2"),
            ("lodash@^3 || ^4", "^3 || ^4"),
            ("lodash@^3||^4", "^3 || ^4"),
            ("lodash@1.2.3 - 2 || >=3 <3.1", "1.2.3 - 2 || >=3 <3.1"),
            // Matches nothing, but that is for the resolver to say.
            ("lodash@0.1 - 0.0", "0.1 - 0.0"),
        ] {
            accepts(Npm, spec, "lodash", range(text));
        }
        accepts(Npm, "@types/node@^20", "@types/node", range("^20"));
    }

    #[test]
    fn npm_refusals() {
        use Ecosystem::Npm;
        let long_name = "n".repeat(limits::MAX_PACKAGE_NAME_BYTES + 1);
        let long_scoped = format!("@s/{}", "n".repeat(limits::MAX_PACKAGE_NAME_BYTES - 2));
        let long_version = "^1.2.3 || ".repeat(26) + "^1";
        let table: Vec<(String, Rule)> = vec![
            ("".into(), Rule::Empty),
            ("lodash@\t4.17.21".into(), Rule::ControlCharacter),
            ("lodash@4.17.21\r".into(), Rule::ControlCharacter),
            ("lod\u{e1}sh@4.17.21".into(), Rule::NonAscii),
            (" lodash@4.17.21".into(), Rule::Whitespace),
            ("lo dash@4.17.21".into(), Rule::Whitespace),
            ("lodash @4.17.21".into(), Rule::Whitespace),
            ("../lodash".into(), Rule::DotDot),
            ("a..b@1.0.0".into(), Rule::DotDot),
            ("lodash@file:../x".into(), Rule::DotDot),
            ("npm:lodash@4.17.21".into(), Rule::Url),
            ("lodash@npm:lodash@4.17.21".into(), Rule::Url),
            ("git+ssh://git@example.invalid/u/r.git".into(), Rule::Url),
            ("github:user/repo".into(), Rule::Url),
            (
                "lodash@https://example.invalid/lodash.tgz".into(),
                Rule::Url,
            ),
            ("lodash@file:lodash.tgz".into(), Rule::Url),
            ("lodash@workspace:*".into(), Rule::Url),
            ("user/repo".into(), Rule::Path),
            ("user/repo@1.0.0".into(), Rule::Path),
            ("./pkg".into(), Rule::Path),
            ("/tmp/x.tgz".into(), Rule::Path),
            ("~/x".into(), Rule::Path),
            (".bin@1.0.0".into(), Rule::Path),
            ("x\\y@1.0.0".into(), Rule::Path),
            ("@scope/a/b@1.0.0".into(), Rule::Path),
            ("lodash@1.0.0/x".into(), Rule::Path),
            ("lodash==4.17.21".into(), Rule::NpmSeparator),
            ("lodash>=4".into(), Rule::NpmSeparator),
            ("lodash^4".into(), Rule::NpmSeparator),
            ("_private@1.0.0".into(), Rule::Name(NPM_LEADING)),
            ("--global@1.0.0".into(), Rule::Name(NPM_LEADING)),
            ("@-scope/x@1.0.0".into(), Rule::Name(NPM_LEADING)),
            ("@_scope/x@1.0.0".into(), Rule::Name(NPM_LEADING)),
            ("@scope/.x@1.0.0".into(), Rule::Name(NPM_LEADING)),
            ("node_modules@1.0.0".into(), Rule::Name(NPM_RESERVED)),
            ("Favicon.ICO@1.0.0".into(), Rule::Name(NPM_RESERVED)),
            ("lo$dash@1.0.0".into(), Rule::Name(NPM_CHARACTERS)),
            ("lodash!@1.0.0".into(), Rule::Name(NPM_CHARACTERS)),
            ("lo(dash)@1.0.0".into(), Rule::Name(NPM_CHARACTERS)),
            ("@scope@1.0.0".into(), Rule::Name(NPM_SCOPE)),
            ("@/x@1.0.0".into(), Rule::Name(NPM_SCOPE)),
            ("@scope/@1.0.0".into(), Rule::Name(NPM_SCOPE)),
            ("@1.2.3".into(), Rule::Name(NPM_SCOPE)),
            ("@4.17.21".into(), Rule::Name(NPM_SCOPE)),
            (
                format!("{long_name}@1.0.0"),
                Rule::NameTooLong {
                    len: long_name.len(),
                },
            ),
            (
                format!("{long_scoped}@1.0.0"),
                Rule::NameTooLong {
                    len: long_scoped.len(),
                },
            ),
            (
                format!("lodash@{long_version}"),
                Rule::VersionTooLong {
                    len: long_version.len(),
                },
            ),
            ("lodash@latest".into(), Rule::Tag),
            ("lodash@next".into(), Rule::Tag),
            ("lodash@v4.17.21".into(), Rule::Semver),
            ("lodash@4.17.21.1".into(), Rule::Semver),
            ("lodash@01.2.3".into(), Rule::Semver),
            ("lodash@1.2.3-01".into(), Rule::Semver),
            ("lodash@1.2.3-".into(), Rule::Semver),
            ("lodash@1.2.3+".into(), Rule::Semver),
            ("lodash@1.2.3-a..b".into(), Rule::DotDot),
            ("lodash@1.2.3-a.+b".into(), Rule::Semver),
            ("lodash@1.x.3".into(), Rule::Semver),
            ("lodash@1.2-beta".into(), Rule::Semver),
            ("lodash@foo 1.2.3".into(), Rule::Semver),
            ("lodash@1.2.3 ||".into(), Rule::Semver),
            ("lodash@|| 1.2.3".into(), Rule::Semver),
            ("lodash@1 | 2".into(), Rule::Semver),
            ("lodash@1 - 2 - 3".into(), Rule::Semver),
            ("lodash@>=1 - 2".into(), Rule::Semver),
            ("lodash@- 2".into(), Rule::Semver),
            ("lodash@>=".into(), Rule::Semver),
            ("lodash@>==1".into(), Rule::Semver),
            ("lodash@^x".into(), Rule::Semver),
            ("lodash@>=*".into(), Rule::Semver),
            ("lodash@1 - x".into(), Rule::Semver),
            ("lodash@* - 2".into(), Rule::Semver),
            ("lodash@9007199254740992.0.0".into(), Rule::Semver),
            ("lodash@4.17.21@1".into(), Rule::Semver),
            ("lodash@4.17.21,5".into(), Rule::Semver),
        ];
        for (spec, rule) in table {
            refuses(Npm, &spec, rule);
        }
    }

    #[test]
    fn npm_bare_names_and_wildcards_have_no_version() {
        use Ecosystem::Npm;
        for (spec, name) in [
            ("lodash", "lodash"),
            ("@types/node", "@types/node"),
            ("lodash@", "lodash"),
            ("lodash@*", "lodash"),
            ("lodash@x", "lodash"),
            ("lodash@X.x", "lodash"),
            ("JSONStream", "JSONStream"),
        ] {
            no_version(Npm, spec, name);
        }
        let err = parse(Npm, "@types/node").unwrap_err();
        assert_eq!(
            err.hint().as_deref(),
            Some("pin a version: `@types/node@VERSION`")
        );
    }

    #[test]
    fn messages_quote_the_spec_safely() {
        let huge = format!("pandas=={}", "1".repeat(1 << 20));
        let err = parse(Ecosystem::Python, &huge).unwrap_err();
        let message = err.to_string();
        assert!(message.len() < 300, "{} bytes", message.len());
        assert!(
            message.contains("`pandas==1111") && message.contains("...`"),
            "{message}"
        );

        let err = parse(Ecosystem::Python, "a`b\\c\n\u{1b}[2J\u{202e}==1").unwrap_err();
        assert_eq!(
            err.to_string(),
            "package `a\\`b\\\\c\\n\\u{001B}[2J\\u{202E}==1`: contains a control character"
        );
    }

    #[test]
    fn lists_are_limited_sorted_and_without_duplicates() {
        let specs = |n: usize| -> Vec<String> { (0..n).map(|i| format!("pkg{i}==1")).collect() };
        let limit = limits::MAX_PACKAGES;
        assert_eq!(
            parse_all(Ecosystem::Python, &specs(limit)).unwrap().len(),
            limit
        );
        let err = parse_all(Ecosystem::Python, &specs(limit + 1)).unwrap_err();
        assert_eq!(err, SpecError::TooMany { count: limit + 1 });
        assert_eq!(err.to_string(), "51 packages, limit is 50");
        assert_eq!(parse_all(Ecosystem::Npm, &[]), Ok(vec![]));

        let specs: Vec<String> = ["zope.interface==7", "Attrs>=23", "mid==1"]
            .map(String::from)
            .into();
        let names: Vec<String> = parse_all(Ecosystem::Python, &specs)
            .unwrap()
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["attrs", "mid", "zope-interface"]);

        for (ecosystem, first, second, name) in [
            (Ecosystem::Python, "Foo_Bar==1", "foo-bar==2", "foo-bar"),
            (Ecosystem::Python, "a.b==1", "A-B>=1", "a-b"),
            (Ecosystem::Npm, "lodash@4.17.21", "lodash@^4", "lodash"),
        ] {
            let specs = vec![
                "other==1".replace("==", sep(ecosystem)),
                first.into(),
                second.into(),
            ];
            let err = parse_all(ecosystem, &specs).unwrap_err();
            assert_eq!(
                err,
                SpecError::Duplicate {
                    name: name.into(),
                    first: SpecText::new(first),
                    second: SpecText::new(second),
                }
            );
            let message = err.to_string();
            assert!(
                message.contains(&format!("`{first}`")) && message.contains(&format!("`{second}`")),
                "{message}"
            );
        }
        // npm names are case-sensitive: two packages.
        let specs: Vec<String> = ["JSV@1.0.0", "jsv@1.0.0"].map(String::from).into();
        assert_eq!(parse_all(Ecosystem::Npm, &specs).unwrap().len(), 2);
        // The first broken spec is reported.
        let specs: Vec<String> = ["ok==1", "bad spec==1", "requests"]
            .map(String::from)
            .into();
        assert!(matches!(
            parse_all(Ecosystem::Python, &specs),
            Err(SpecError::Invalid {
                rule: Rule::Whitespace,
                ..
            })
        ));
    }

    fn sep(ecosystem: Ecosystem) -> &'static str {
        match ecosystem {
            Ecosystem::Python => "==",
            Ecosystem::Npm => "@",
        }
    }

    #[test]
    fn normalization() {
        for (name, normalized) in [
            ("Foo_Bar", "foo-bar"),
            ("typing_extensions", "typing-extensions"),
            ("Typing.Extensions", "typing-extensions"),
            ("a-_.-b", "a-b"),
            ("PyYAML", "pyyaml"),
            ("zope.interface", "zope-interface"),
        ] {
            assert_eq!(normalize(Ecosystem::Python, name), normalized);
        }
        assert_eq!(normalize(Ecosystem::Npm, "JSONStream"), "JSONStream");
    }

    /// Version parts built from node-semver's grammar, mostly valid.
    fn npm_versions() -> impl Strategy<Value = String> {
        let number = prop_oneof!["0", "[1-9][0-9]{0,3}"];
        let wildcard = prop_oneof![Just("x"), Just("X"), Just("*")];
        let full = (
            number.clone(),
            number.clone(),
            number.clone(),
            proptest::option::of("-(0|[1-9][0-9]?|[a-z][0-9a-z-]{0,3})(\\.[0-9a-z]{1,3})?"),
            proptest::option::of("\\+[0-9a-z-]{1,4}"),
        )
            .prop_map(|(a, b, c, pre, build)| {
                format!(
                    "{a}.{b}.{c}{}{}",
                    pre.unwrap_or_default(),
                    build.unwrap_or_default()
                )
            });
        let prefix = (
            number.clone(),
            proptest::option::of(number),
            proptest::option::of(wildcard.clone()),
        )
            .prop_map(|(a, b, w)| {
                let mut out = a;
                if let Some(b) = b {
                    out = format!("{out}.{b}");
                }
                if let Some(w) = w {
                    out = format!("{out}.{w}");
                }
                out
            });
        let partial = prop_oneof![4 => full, 3 => prefix, 1 => wildcard.prop_map(str::to_owned)];
        let operator = prop_oneof!["", "\\^", "~", "~>", ">=", "<=", ">", "<", "=", ">= ", "< "];
        let simple = (operator, partial.clone()).prop_map(|(op, p)| format!("{op}{p}"));
        let range = prop_oneof![
            3 => proptest::collection::vec(simple, 1..4).prop_map(|v| v.join(" ")),
            1 => (partial.clone(), partial).prop_map(|(a, b)| format!("{a} - {b}")),
        ];
        proptest::collection::vec(range, 1..3).prop_map(|v| v.join(" || "))
    }

    /// Python version parts, mostly valid.
    fn python_versions() -> impl Strategy<Value = String> {
        let version = "[0-9]{1,3}(\\.[0-9]{1,3}){0,3}((a|b|rc)[0-9])?(\\.post[0-9])?(\\.dev[0-9])?";
        let operator = prop_oneof!["==", "!=", ">=", "<=", ">", "<", "~=", "===", " == ", ">= "];
        let specifier = (operator, version, proptest::option::of(Just(".*")))
            .prop_map(|(op, v, star)| format!("{op}{v}{}", star.unwrap_or_default()));
        proptest::collection::vec(specifier, 1..4).prop_map(|v| v.join(","))
    }

    /// Whether node-semver (the `nodejs-semver` port) reads an npm range. The port refuses
    /// ranges that match nothing (`0.1 - 0.0`, `>2 <1`), which npm reads: then each comparator
    /// and each end of a hyphen range must read on its own.
    fn node_semver_reads(range: &str) -> bool {
        nodejs_semver::Range::parse(range).is_ok()
            || range
                .split(" || ")
                .flat_map(|alternative| alternative.split(' ').filter(|t| *t != "-"))
                .all(|atom| nodejs_semver::Range::parse(atom).is_ok())
    }

    proptest! {
        #[test]
        fn never_panics_on_any_input(spec in "\\PC{0,80}|[ -~]{0,300}") {
            for ecosystem in [Ecosystem::Python, Ecosystem::Npm] {
                if let Err(err) = parse(ecosystem, &spec) {
                    names_the_spec(&err, &spec);
                    let _ = err.hint();
                }
            }
        }

        #[test]
        fn never_panics_on_spec_like_input(spec in "[a-zA-Z0-9@/._=<>!~^*|, +xX;\\[\\]-]{0,60}") {
            for ecosystem in [Ecosystem::Python, Ecosystem::Npm] {
                match parse(ecosystem, &spec) {
                    Err(err) => names_the_spec(&err, &spec),
                    Ok(requirement) => {
                        // Nothing accepted can pass for an option of pip or npm.
                        prop_assert!(!spec.starts_with('-'), "{}", spec);
                        prop_assert_eq!(normalize(ecosystem, &requirement.name), requirement.name);
                    }
                }
            }
        }

        #[test]
        fn normalization_is_idempotent(name in "\\PC{0,40}|[a-zA-Z0-9._-]{0,40}") {
            let once = normalize(Ecosystem::Python, &name);
            prop_assert_eq!(normalize(Ecosystem::Python, &once), once.clone());
            if python_name(&name).is_ok() {
                prop_assert!(python_name(&once).is_ok(), "{}", once);
            }
        }

        /// What we accept, node-semver reads; and the normalized form reads back the same.
        #[test]
        fn npm_versions_agree_with_node_semver(version in npm_versions()) {
            let spec = format!("left-pad@{version}");
            if let Ok(requirement) = parse(Ecosystem::Npm, &spec) {
                let text = match &requirement.constraint {
                    Constraint::Exact(v) => {
                        prop_assert!(nodejs_semver::Version::parse(v).is_ok(), "{}", v);
                        v
                    }
                    Constraint::Range(r) => r,
                };
                prop_assert!(node_semver_reads(text), "{}", text);
                let again = parse(Ecosystem::Npm, &format!("left-pad@{text}"));
                prop_assert_eq!(again, Ok(requirement));
            }
        }

        /// What we accept, `pep440_rs` reads; and the normalized form reads back the same.
        #[test]
        fn python_versions_read_back(name in "[A-Za-z][A-Za-z0-9._-]{0,10}[A-Za-z0-9]", version in python_versions()) {
            let spec = format!("{name}{version}");
            if let Ok(requirement) = parse(Ecosystem::Python, &spec) {
                let again = match &requirement.constraint {
                    Constraint::Exact(v) => {
                        prop_assert!(pep440_rs::Version::from_str(v).is_ok(), "{}", v);
                        format!("{}=={v}", requirement.name)
                    }
                    Constraint::Range(r) => format!("{}{r}", requirement.name),
                };
                prop_assert_eq!(parse(Ecosystem::Python, &again), Ok(requirement));
            }
        }
    }
}
