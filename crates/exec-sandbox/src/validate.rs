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
