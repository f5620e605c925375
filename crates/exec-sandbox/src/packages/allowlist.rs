//! The bundled allowlists: each ecosystem's 10,000 most-downloaded packages, compiled in from
//! `data/` (provenance in `data/README.md`; `scripts/refresh-package-allowlists` renews them).
//! With package validation on, a run may only ask for packages in its ecosystem's list: a
//! typo-squatted or freshly published name never reaches the resolver.

use std::collections::HashSet;
use std::sync::OnceLock;

use super::Ecosystem;
use super::spec::{self, SpecError, SpecText};

/// How many names each list holds; the error text says "10,000".
#[cfg(test)]
pub(crate) const LEN: usize = 10_000;

const PYPI: &str = include_str!("../../data/pypi-top-10k.txt");
const NPM: &str = include_str!("../../data/npm-top-10k.txt");

fn names(list: &'static str) -> impl Iterator<Item = &'static str> {
    list.lines().map(str::trim).filter(|line| !line.is_empty())
}

/// The list of `ecosystem`, with Python names normalized (PEP 503), built once.
fn set(ecosystem: Ecosystem) -> &'static HashSet<String> {
    static PYTHON: OnceLock<HashSet<String>> = OnceLock::new();
    static JAVASCRIPT: OnceLock<HashSet<String>> = OnceLock::new();
    match ecosystem {
        Ecosystem::Python => PYTHON.get_or_init(|| {
            names(PYPI)
                .map(|name| spec::normalize(Ecosystem::Python, name))
                .collect()
        }),
        Ecosystem::Npm => JAVASCRIPT.get_or_init(|| names(NPM).map(str::to_owned).collect()),
    }
}

/// Whether `name` is among the ecosystem's most-downloaded packages. Python names match after
/// PEP 503 normalization (`Typing_Extensions` is `typing-extensions`); npm names match exactly.
pub(crate) fn permits(ecosystem: Ecosystem, name: &str) -> bool {
    set(ecosystem).contains(&spec::normalize(ecosystem, name))
}

/// Refuses `name` (from `spec`) unless the ecosystem's list has it.
pub(crate) fn check(ecosystem: Ecosystem, name: &str, spec: &str) -> Result<(), SpecError> {
    if permits(ecosystem, name) {
        return Ok(());
    }
    let lower = name.to_ascii_lowercase();
    let suggestion = (ecosystem == Ecosystem::Npm && lower != name && permits(ecosystem, &lower))
        .then_some(lower);
    Err(SpecError::NotAllowed {
        spec: SpecText::new(spec),
        name: spec::normalize(ecosystem, name),
        ecosystem,
        suggestion,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packages::spec::parse;

    /// The bundled lists hold what the refresh script promises: exactly [`LEN`] names, each a
    /// name the spec rules accept, Python names already normalized, none twice.
    #[test]
    fn bundled_lists_follow_the_spec_rules() {
        for (ecosystem, list, pin) in [
            (Ecosystem::Python, PYPI, "==1.0"),
            (Ecosystem::Npm, NPM, "@1.0.0"),
        ] {
            let names: Vec<&str> = names(list).collect();
            assert_eq!(names.len(), LEN, "{ecosystem:?}");
            assert_eq!(list.lines().count(), LEN, "{ecosystem:?}: blank lines");
            assert_eq!(set(ecosystem).len(), LEN, "{ecosystem:?}: duplicates");
            for name in names {
                let requirement = parse(ecosystem, &format!("{name}{pin}"))
                    .unwrap_or_else(|e| panic!("{ecosystem:?} list: {e}"));
                assert_eq!(requirement.name, name, "{ecosystem:?} list: not normalized");
            }
        }
    }

    #[test]
    fn python_names_match_after_normalization() {
        for name in [
            "pandas",
            "Pandas",
            "PANDAS",
            "typing-extensions",
            "typing_extensions",
            "Typing.Extensions",
            "PyYAML",
            "numpy",
            "requests",
        ] {
            assert!(permits(Ecosystem::Python, name), "{name}");
        }
        for name in ["pandas-but-not", "reqeusts", "lodash-es", ""] {
            assert!(!permits(Ecosystem::Python, name), "{name}");
        }
    }

    #[test]
    fn npm_names_match_exactly() {
        for name in ["lodash", "react", "@types/node", "@babel/core", "JSV"] {
            assert!(permits(Ecosystem::Npm, name), "{name}");
        }
        for name in [
            "Lodash",
            "LODASH",
            "jsv",
            "@Types/node",
            "lodash_",
            "numpy",
            "",
        ] {
            assert!(!permits(Ecosystem::Npm, name), "{name}");
        }
    }

    #[test]
    fn refusals_name_the_spec_and_say_how_to_turn_validation_off() {
        let err = check(Ecosystem::Python, "reqeusts", "Reqeusts==2.31.0").unwrap_err();
        assert_eq!(
            err,
            SpecError::NotAllowed {
                spec: SpecText::new("Reqeusts==2.31.0"),
                name: "reqeusts".into(),
                ecosystem: Ecosystem::Python,
                suggestion: None,
            }
        );
        assert_eq!(
            err.to_string(),
            "package `Reqeusts==2.31.0` is not among PyPI's 10,000 most-downloaded packages"
        );
        assert_eq!(LEN, 10_000, "the message says 10,000");
        let hint = err.hint().unwrap();
        assert!(
            hint.contains("--no-validation") && hint.contains("enable_package_validation: false"),
            "{hint}"
        );

        let err = check(Ecosystem::Npm, "Lodash", "Lodash@4.17.21").unwrap_err();
        assert!(matches!(&err, SpecError::NotAllowed { suggestion: Some(s), .. } if s == "lodash"));
        assert!(err.to_string().contains("`Lodash@4.17.21`") && err.to_string().contains("npm's"));
        assert!(err.hint().unwrap().contains("did you mean `lodash`?"));

        assert_eq!(check(Ecosystem::Npm, "lodash", "lodash@4.17.21"), Ok(()));
    }

    /// Runs the refresh script on a copy of the data directory.
    fn refresh(data: &std::path::Path, ecosystem: &str, ranking: &str) -> std::process::Output {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../scripts/refresh-package-allowlists"
        );
        let ranking_file = data.join("ranking.txt");
        std::fs::write(&ranking_file, ranking).unwrap();
        std::process::Command::new("bash")
            .arg(script)
            .arg(ecosystem)
            .arg(&ranking_file)
            .args(["--date", "2031-02-03", "--data-dir"])
            .arg(data)
            .output()
            .unwrap()
    }

    fn data_copy() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let data = concat!(env!("CARGO_MANIFEST_DIR"), "/data");
        for file in ["README.md", "pypi-top-10k.txt", "npm-top-10k.txt"] {
            std::fs::copy(format!("{data}/{file}"), dir.path().join(file)).unwrap();
        }
        dir
    }

    #[test]
    fn the_refresh_script_validates_normalizes_and_keeps_the_top() {
        let dir = data_copy();
        let fresh: Vec<String> = (0..LEN + 5).map(|i| format!("Fresh_Pkg.{i}")).collect();
        let ranking = format!(
            "Typing_Extensions\r\n\n  numpy  \nbad name\ntyping.extensions\n../evil\nx\u{1b}y\n{}\n",
            fresh.join("\n")
        );
        let out = refresh(dir.path(), "python", &ranking);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("dropped 3 names") && stderr.contains("dropped 1 duplicates"),
            "{stderr}"
        );
        let list = std::fs::read_to_string(dir.path().join("pypi-top-10k.txt")).unwrap();
        let names: Vec<&str> = list.lines().collect();
        assert_eq!(names.len(), LEN);
        assert_eq!(names[..3], ["typing-extensions", "numpy", "fresh-pkg-0"]);
        assert_eq!(names[LEN - 1], format!("fresh-pkg-{}", LEN - 3));
        let readme = std::fs::read_to_string(dir.path().join("README.md")).unwrap();
        let row = |file: &str| {
            readme
                .lines()
                .find(|l| l.starts_with(&format!("| `{file}`")))
                .unwrap()
                .to_owned()
        };
        assert!(
            row("pypi-top-10k.txt").ends_with("snapshotted on 2031-02-03 |"),
            "{readme}"
        );
        assert!(!row("npm-top-10k.txt").contains("2031-02-03"), "{readme}");

        // Too few names: nothing changes.
        let before = std::fs::read_to_string(dir.path().join("npm-top-10k.txt")).unwrap();
        let out = refresh(dir.path(), "npm", "lodash\n@types/node\nJSV\n");
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("only 3 usable names"));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("npm-top-10k.txt")).unwrap(),
            before
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("README.md")).unwrap(),
            readme
        );
    }

    /// The bundled lists are what the script makes of themselves: the script and the library
    /// agree on the rules.
    #[test]
    fn the_refresh_script_reproduces_the_bundled_lists() {
        let dir = data_copy();
        for (ecosystem, list, file) in [
            ("python", PYPI, "pypi-top-10k.txt"),
            ("npm", NPM, "npm-top-10k.txt"),
        ] {
            let out = refresh(dir.path(), ecosystem, list);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(
                std::fs::read_to_string(dir.path().join(file)).unwrap(),
                list
            );
        }
    }
}
