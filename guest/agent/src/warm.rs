//! Importing modules in a warm interpreter (the `modules` of
//! [`Request::Warm`](sbx_protocol::Request::Warm)), so that a memory snapshot saved afterwards
//! holds them imported and its clones' first `import` of them costs nothing.
//!
//! The imports run as an internal command of the language's driver: output dropped, a module
//! that fails to import skipped (the user's own import reports the error), and nothing left in
//! the user's namespace.

use sbx_protocol::Language;
use sbx_protocol::layer::{MAX_WARM_MODULES, is_warm_module};

/// A warm-up the agent refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WarmError {
    /// More modules than [`MAX_WARM_MODULES`].
    #[error("{count} modules to warm, at most {MAX_WARM_MODULES}")]
    TooMany {
        /// How many were asked for.
        count: usize,
    },
    /// A name that is not a module of the language.
    #[error("{name:?} is not a {language} module name")]
    BadName {
        /// The language.
        language: Language,
        /// The name, as sent.
        name: String,
    },
}

/// Checks the modules of a warm-up in `language`.
pub fn check(language: Language, modules: &[String]) -> Result<(), WarmError> {
    if modules.len() > MAX_WARM_MODULES {
        return Err(WarmError::TooMany {
            count: modules.len(),
        });
    }
    match modules.iter().find(|m| !is_warm_module(language, m)) {
        Some(name) => Err(WarmError::BadName {
            language,
            name: name.clone(),
        }),
        None => Ok(()),
    }
}

/// The driver command importing `modules` (already [`check`]ed, so each is a plain quoted
/// string), or `None` when there is nothing to import.
pub fn code(language: Language, modules: &[String]) -> Option<String> {
    if modules.is_empty() {
        return None;
    }
    let list = modules
        .iter()
        .map(|m| format!("\"{m}\""))
        .collect::<Vec<_>>()
        .join(", ");
    match language {
        // In a function, deleted afterwards: the user's namespace stays as it was.
        Language::Python => Some(format!(
            "def __sbx_warm(names):\n\
             \x20   import importlib\n\
             \x20   for name in names:\n\
             \x20       try:\n\
             \x20           importlib.import_module(name)\n\
             \x20       except BaseException:\n\
             \x20           pass\n\
             try:\n\
             \x20   __sbx_warm([{list}])\n\
             finally:\n\
             \x20   del __sbx_warm\n"
        )),
        // Literal specifiers, so the driver resolves each from the working directory as it
        // does for the user's imports.
        Language::Javascript => {
            let imports = modules
                .iter()
                .map(|m| format!("import(\"{m}\")"))
                .collect::<Vec<_>>()
                .join(", ");
            Some(format!("await Promise.allSettled([{imports}]);\n"))
        }
        Language::Raw => None,
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn checks_count_and_names() {
        assert_eq!(
            check(Language::Python, &names(&["numpy", "os.path"])),
            Ok(())
        );
        assert_eq!(
            check(Language::Javascript, &names(&["lodash", "@a/b"])),
            Ok(())
        );
        assert!(matches!(
            check(Language::Python, &names(&["numpy", "x\"); import os; (\""])),
            Err(WarmError::BadName { .. })
        ));
        assert!(matches!(
            check(Language::Javascript, &names(&["./local"])),
            Err(WarmError::BadName { .. })
        ));
        assert!(matches!(
            check(Language::Raw, &names(&["x"])),
            Err(WarmError::BadName { .. })
        ));
        assert_eq!(check(Language::Raw, &[]), Ok(()));
        let many = vec!["m".to_string(); MAX_WARM_MODULES + 1];
        assert_eq!(
            check(Language::Python, &many),
            Err(WarmError::TooMany {
                count: MAX_WARM_MODULES + 1
            })
        );
    }

    #[test]
    fn code_imports_every_module() {
        assert_eq!(code(Language::Python, &[]), None);
        let py = code(Language::Python, &names(&["json", "os.path"])).unwrap();
        assert!(py.contains("__sbx_warm([\"json\", \"os.path\"])"), "{py}");
        assert!(py.ends_with("finally:\n    del __sbx_warm\n"), "{py}");
        let js = code(Language::Javascript, &names(&["lodash", "@a/b"])).unwrap();
        assert_eq!(
            js,
            "await Promise.allSettled([import(\"lodash\"), import(\"@a/b\")]);\n"
        );
        assert_eq!(code(Language::Raw, &names(&["x"])), None);
    }
}
