//! Input validation: everything a caller passes is checked here, before any VM boots.

use crate::limits;

/// A caller's input broke a rule. Always the caller's bug: nothing ran.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ValidationError {
    /// The code is empty or only whitespace.
    #[error("code is empty")]
    EmptyCode,
    /// The code is larger than [`limits::MAX_CODE_BYTES`].
    #[error("code is {size} bytes, limit is {} bytes", limits::MAX_CODE_BYTES)]
    CodeTooLarge {
        /// Size of the code.
        size: usize,
    },
    /// The code contains a NUL byte.
    #[error("code contains a NUL byte at offset {offset}")]
    CodeHasNul {
        /// Byte offset of the first NUL.
        offset: usize,
    },
    /// The timeout is outside the accepted range.
    #[error(
        "timeout_seconds is {value}, must be {}-{}",
        limits::MIN_TIMEOUT_SECONDS,
        limits::MAX_TIMEOUT_SECONDS
    )]
    Timeout {
        /// Requested timeout.
        value: u64,
    },
    /// The memory size is outside the accepted range.
    #[error(
        "memory_mb is {value}, must be {}-{}",
        limits::MIN_MEMORY_MB,
        limits::MAX_MEMORY_MB
    )]
    Memory {
        /// Requested memory.
        value: u32,
    },
    /// The session idle timeout is outside the accepted range.
    #[error(
        "idle_timeout_seconds is {value}, must be {}-{}",
        limits::MIN_SESSION_IDLE_TIMEOUT_SECONDS,
        limits::MAX_SESSION_IDLE_TIMEOUT_SECONDS
    )]
    IdleTimeout {
        /// Requested idle timeout.
        value: u64,
    },
    /// Too many environment variables.
    #[error("{count} environment variables, limit is {}", limits::MAX_ENV_VARS)]
    TooManyEnvVars {
        /// Number given.
        count: usize,
    },
    /// One environment variable broke a rule.
    #[error("environment variable `{name}`: {reason}")]
    EnvVar {
        /// The variable's name (truncated to 64 characters for display).
        name: String,
        /// Which rule.
        reason: String,
    },
    /// A path in the sandbox broke a rule.
    #[error("path `{path}`: {reason}")]
    GuestPath {
        /// The path (truncated to 64 characters for display).
        path: String,
        /// Which rule.
        reason: String,
    },
    /// A file is larger than [`limits::MAX_FILE_BYTES`].
    #[error("file is {size} bytes, limit is {} bytes", limits::MAX_FILE_BYTES)]
    FileTooLarge {
        /// Size of the file (or bytes produced so far).
        size: u64,
    },
    /// A configuration field is invalid.
    #[error("invalid configuration {field}: {reason}")]
    Config {
        /// Field or environment variable name.
        field: &'static str,
        /// Which rule.
        reason: String,
    },
}

/// Checks program text: not blank, at most 1 MiB, no NUL bytes.
pub fn code(code: &str) -> Result<(), ValidationError> {
    if code.len() > limits::MAX_CODE_BYTES {
        return Err(ValidationError::CodeTooLarge { size: code.len() });
    }
    if let Some(offset) = code.bytes().position(|b| b == 0) {
        return Err(ValidationError::CodeHasNul { offset });
    }
    if code.trim().is_empty() {
        return Err(ValidationError::EmptyCode);
    }
    Ok(())
}

/// Checks the form of a path in the sandbox, relative to `/home/user`: not absolute, no `..`
/// component, no NUL byte, components of at most [`limits::MAX_GUEST_NAME_BYTES`] bytes, at most
/// [`limits::MAX_GUEST_PATH_BYTES`] bytes in all, and naming a file unless `may_be_home` (then
/// `""` and `"."` mean the home directory). The guest checks again and resolves the path without
/// leaving the home directory; this only catches mistakes before anything is sent.
pub fn guest_path(path: &str, may_be_home: bool) -> Result<(), ValidationError> {
    let error = |reason: String| ValidationError::GuestPath {
        path: path.chars().take(64).collect(),
        reason,
    };
    if path.len() > limits::MAX_GUEST_PATH_BYTES {
        return Err(error(format!(
            "{} bytes, limit is {}",
            path.len(),
            limits::MAX_GUEST_PATH_BYTES
        )));
    }
    if path.contains('\0') {
        return Err(error("contains a NUL byte".into()));
    }
    if path.starts_with('/') {
        return Err(error(
            "is absolute; paths are relative to the home directory".into(),
        ));
    }
    let mut names = 0;
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(error("contains `..`".into())),
            name if name.len() > limits::MAX_GUEST_NAME_BYTES => {
                return Err(error(format!(
                    "a component is {} bytes, limit is {}",
                    name.len(),
                    limits::MAX_GUEST_NAME_BYTES
                )));
            }
            _ => names += 1,
        }
    }
    if names == 0 && !may_be_home {
        return Err(error("names no file".into()));
    }
    Ok(())
}

/// Checks a file size against [`limits::MAX_FILE_BYTES`].
pub fn file_size(size: u64) -> Result<(), ValidationError> {
    if size > limits::MAX_FILE_BYTES {
        Err(ValidationError::FileTooLarge { size })
    } else {
        Ok(())
    }
}

/// Checks an execution timeout in seconds.
pub fn timeout(seconds: u64) -> Result<(), ValidationError> {
    if (limits::MIN_TIMEOUT_SECONDS..=limits::MAX_TIMEOUT_SECONDS).contains(&seconds) {
        Ok(())
    } else {
        Err(ValidationError::Timeout { value: seconds })
    }
}

/// Checks a guest memory size in MB.
pub fn memory(mb: u32) -> Result<(), ValidationError> {
    if (limits::MIN_MEMORY_MB..=limits::MAX_MEMORY_MB).contains(&mb) {
        Ok(())
    } else {
        Err(ValidationError::Memory { value: mb })
    }
}

/// Checks a session idle timeout in seconds.
pub fn idle_timeout(seconds: u64) -> Result<(), ValidationError> {
    if (limits::MIN_SESSION_IDLE_TIMEOUT_SECONDS..=limits::MAX_SESSION_IDLE_TIMEOUT_SECONDS)
        .contains(&seconds)
    {
        Ok(())
    } else {
        Err(ValidationError::IdleTimeout { value: seconds })
    }
}

/// Variable names that would let a program's environment take over the runtime or the shell.
const FORBIDDEN_NAMES: &[&str] = &[
    "GLIBC_TUNABLES",
    "NODE_OPTIONS",
    "NODE_PATH",
    "PYTHONPATH",
    "PYTHONSTARTUP",
    "PYTHONHOME",
    "PYTHONINSPECT",
    "BASH_ENV",
    "ENV",
    "PROMPT_COMMAND",
    "SHELLOPTS",
    "BASHOPTS",
    "IFS",
    "PATH",
    "TMPDIR",
    "HOME",
    "BUN_OPTIONS",
];

/// Prefixes of names that are refused for the same reason (`LD_PRELOAD`, `MALLOC_ARENA_MAX`, ...).
const FORBIDDEN_PREFIXES: &[&str] = &["LD_", "MALLOC_", "BASH_FUNC_"];

/// Checks environment variables: count, name syntax and length, value length, control
/// characters (tab allowed) and names that hijack the runtime.
pub fn env_vars(vars: &[(String, String)]) -> Result<(), ValidationError> {
    if vars.len() > limits::MAX_ENV_VARS {
        return Err(ValidationError::TooManyEnvVars { count: vars.len() });
    }
    for (name, value) in vars {
        env_var(name, value)?;
    }
    Ok(())
}

fn env_var(name: &str, value: &str) -> Result<(), ValidationError> {
    let err = |reason: String| ValidationError::EnvVar {
        name: name.chars().take(64).collect(),
        reason,
    };
    if name.is_empty() {
        return Err(err("name is empty".into()));
    }
    if name.len() > limits::MAX_ENV_NAME_BYTES {
        return Err(err(format!(
            "name is {} bytes, limit is {}",
            name.len(),
            limits::MAX_ENV_NAME_BYTES
        )));
    }
    let valid_start = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_');
    if !valid_start || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(err(
            "name must be letters, digits and `_`, not starting with a digit".into(),
        ));
    }
    let upper = name.to_ascii_uppercase();
    if FORBIDDEN_NAMES.contains(&upper.as_str())
        || FORBIDDEN_PREFIXES.iter().any(|p| upper.starts_with(p))
    {
        return Err(err(
            "this name could take over the runtime and is not allowed".into(),
        ));
    }
    if value.len() > limits::MAX_ENV_VALUE_BYTES {
        return Err(err(format!(
            "value is {} bytes, limit is {}",
            value.len(),
            limits::MAX_ENV_VALUE_BYTES
        )));
    }
    if let Some(c) = value.chars().find(|c| c.is_control() && *c != '\t') {
        return Err(err(format!(
            "value contains control character U+{:04X} (only tab is allowed)",
            c as u32
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_path_forms() {
        for ok in ["a.txt", "a/b/c", "./a", "a//b/", "..a", "a..b/c"] {
            assert_eq!(guest_path(ok, false), Ok(()), "{ok}");
        }
        assert_eq!(guest_path("", true), Ok(()));
        assert_eq!(guest_path(".", true), Ok(()));
        let long_name = "n".repeat(limits::MAX_GUEST_NAME_BYTES + 1);
        let long_path = "d/".repeat(limits::MAX_GUEST_PATH_BYTES / 2 + 1);
        for bad in [
            "/etc/passwd",
            "/",
            "..",
            "../x",
            "a/../../x",
            "a/..",
            "a\0b",
            &long_name,
            &long_path,
        ] {
            assert!(
                matches!(
                    guest_path(bad, true),
                    Err(ValidationError::GuestPath { .. })
                ),
                "{bad:?} accepted"
            );
        }
        for no_file in ["", ".", "./", "//"] {
            assert!(guest_path(no_file, false).is_err(), "{no_file:?}");
        }
        assert_eq!(
            guest_path(&"n".repeat(limits::MAX_GUEST_NAME_BYTES), false),
            Ok(())
        );
        let msg = guest_path("/etc/passwd", false).unwrap_err().to_string();
        assert!(
            msg.contains("/etc/passwd") && msg.contains("absolute"),
            "{msg}"
        );
    }

    #[test]
    fn file_size_limit() {
        assert_eq!(file_size(limits::MAX_FILE_BYTES), Ok(()));
        assert_eq!(
            file_size(limits::MAX_FILE_BYTES + 1),
            Err(ValidationError::FileTooLarge {
                size: limits::MAX_FILE_BYTES + 1
            })
        );
    }

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn code_rules() {
        assert_eq!(code(""), Err(ValidationError::EmptyCode));
        assert_eq!(code(" \n\t "), Err(ValidationError::EmptyCode));
        assert_eq!(code("a\0b"), Err(ValidationError::CodeHasNul { offset: 1 }));
        let big = "x".repeat(limits::MAX_CODE_BYTES + 1);
        assert!(matches!(
            code(&big),
            Err(ValidationError::CodeTooLarge { .. })
        ));
        assert!(code(&"x".repeat(limits::MAX_CODE_BYTES)).is_ok());
        assert!(code("print(1)").is_ok());
    }

    #[test]
    fn timeout_and_memory_bounds() {
        assert!(timeout(0).is_err());
        assert!(timeout(1).is_ok());
        assert!(timeout(300).is_ok());
        assert!(timeout(301).is_err());
        assert!(memory(127).is_err());
        assert!(memory(128).is_ok());
        assert!(memory(limits::MAX_MEMORY_MB + 1).is_err());
        assert!(
            timeout(301)
                .unwrap_err()
                .to_string()
                .contains("timeout_seconds")
        );
        assert!(memory(1).unwrap_err().to_string().contains("memory_mb"));
    }

    #[test]
    fn idle_timeout_bounds() {
        assert!(idle_timeout(9).is_err());
        assert!(idle_timeout(10).is_ok());
        assert!(idle_timeout(300).is_ok());
        assert!(idle_timeout(3600).is_ok());
        assert_eq!(
            idle_timeout(3601),
            Err(ValidationError::IdleTimeout { value: 3601 })
        );
        assert!(
            idle_timeout(0)
                .unwrap_err()
                .to_string()
                .contains("idle_timeout_seconds")
        );
    }

    #[test]
    fn env_rules() {
        assert!(env_vars(&vars(&[("FOO", "bar\tbaz"), ("_x1", "")])).is_ok());
        for bad in [
            "LD_PRELOAD",
            "ld_library_path",
            "PYTHONPATH",
            "NODE_OPTIONS",
            "BASH_ENV",
            "PATH",
            "MALLOC_ARENA_MAX",
            "GLIBC_TUNABLES",
            "IFS",
        ] {
            let e = env_vars(&vars(&[(bad, "x")])).unwrap_err();
            assert!(e.to_string().contains(bad), "{bad}: {e}");
        }
        for bad_name in ["", "1A", "A-B", "A B", "A=B", "É"] {
            assert!(env_vars(&vars(&[(bad_name, "x")])).is_err(), "{bad_name:?}");
        }
        assert!(
            env_vars(&vars(&[("A", "x\ny")]))
                .unwrap_err()
                .to_string()
                .contains("U+000A")
        );
        assert!(env_vars(&vars(&[("A", "\u{1b}[31m")])).is_err());
        let long_value = "v".repeat(limits::MAX_ENV_VALUE_BYTES + 1);
        assert!(env_vars(&vars(&[("A", &long_value)])).is_err());
        let long_name = "N".repeat(limits::MAX_ENV_NAME_BYTES + 1);
        assert!(env_vars(&vars(&[(&long_name, "x")])).is_err());
        let many: Vec<_> = (0..=limits::MAX_ENV_VARS)
            .map(|i| (format!("V{i}"), String::new()))
            .collect();
        assert_eq!(
            env_vars(&many),
            Err(ValidationError::TooManyEnvVars {
                count: limits::MAX_ENV_VARS + 1
            })
        );
    }
}
