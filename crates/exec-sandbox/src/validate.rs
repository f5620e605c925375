//! Input validation: everything a caller passes is checked here, before any VM boots.

use crate::limits;
use crate::network::NetworkOptions;

/// A caller's input broke a rule. Always the caller's bug: nothing ran.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
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
    /// A network option broke a rule.
    #[error("{field}: {reason}")]
    Network {
        /// `allowed_domains`, `expose_ports` or `allow_network`.
        field: &'static str,
        /// Which rule, naming the value and the limit.
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

/// Checks network options: allowlist entries are RFC 1035 host names (at most
/// [`limits::MAX_ALLOWED_DOMAINS`] of them) and need `allow_network`; at most
/// [`limits::MAX_EXPOSED_PORTS`] forwarded ports, internal ports 1-65535, host ports
/// [`limits::MIN_EXTERNAL_PORT`]-65535 (or dynamic), no port forwarded twice. Returns the
/// normalized allowlist (lowercase, no trailing dot), if any.
pub fn network(options: &NetworkOptions) -> Result<Option<Vec<String>>, ValidationError> {
    let error = |field, reason| ValidationError::Network { field, reason };
    let domains = match &options.allowed_domains {
        None => None,
        Some(_) if !options.allow_network => {
            return Err(error(
                "allowed_domains",
                "an allowlist needs allow_network".into(),
            ));
        }
        Some(list) if list.len() > limits::MAX_ALLOWED_DOMAINS => {
            return Err(error(
                "allowed_domains",
                format!(
                    "{} domains, limit is {}",
                    list.len(),
                    limits::MAX_ALLOWED_DOMAINS
                ),
            ));
        }
        Some(list) => Some(
            list.iter()
                .map(|d| sbx_net::policy::validate_domain(d))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| error("allowed_domains", e.to_string()))?,
        ),
    };
    let ports = &options.expose_ports;
    if ports.len() > limits::MAX_EXPOSED_PORTS {
        return Err(error(
            "expose_ports",
            format!(
                "{} ports, limit is {}",
                ports.len(),
                limits::MAX_EXPOSED_PORTS
            ),
        ));
    }
    for (i, port) in ports.iter().enumerate() {
        if port.internal == 0 {
            return Err(error(
                "expose_ports",
                "internal port 0; must be 1-65535".into(),
            ));
        }
        if let Some(external) = port.external
            && external < limits::MIN_EXTERNAL_PORT
        {
            return Err(error(
                "expose_ports",
                format!(
                    "host port {external} for {}/{}; must be {}-65535, or 0 for any free port",
                    port.internal,
                    port.protocol,
                    limits::MIN_EXTERNAL_PORT
                ),
            ));
        }
        let earlier = &ports[..i];
        if earlier
            .iter()
            .any(|p| p.internal == port.internal && p.protocol == port.protocol)
        {
            return Err(error(
                "expose_ports",
                format!("{}/{} is forwarded twice", port.internal, port.protocol),
            ));
        }
        if let Some(external) = port.external
            && earlier
                .iter()
                .any(|p| p.external == Some(external) && p.protocol == port.protocol)
        {
            return Err(error(
                "expose_ports",
                format!("host port {external}/{} is used twice", port.protocol),
            ));
        }
    }
    Ok(domains)
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
    if !sbx_protocol::env::is_name(name) {
        return Err(err(
            "name must be letters, digits and `_`, not starting with a digit".into(),
        ));
    }
    if let Some(row) = sbx_protocol::env::denied(name) {
        return Err(err(format!("not allowed: it {}", row.hijack)));
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
        for row in sbx_protocol::env::DENIED {
            let name = match row.pattern {
                sbx_protocol::env::Pattern::Exact(name) => name.to_string(),
                sbx_protocol::env::Pattern::Prefix(p) => format!("{p}x"),
                sbx_protocol::env::Pattern::Suffix(s) => format!("x{s}"),
            };
            let e = env_vars(&vars(&[(&name, "x")])).unwrap_err().to_string();
            assert!(e.contains(&name) && e.contains(row.hijack), "{e}");
        }
        assert!(env_vars(&vars(&[("NODE_ENV", "production")])).is_ok());
        for bad_name in ["", "1A", "A-B", "A B", "A=B", "É", "a[$(id)]"] {
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

    #[test]
    fn network_rules_name_the_field_and_limit() {
        use crate::network::{ExposePort, NetworkOptions};
        let net = |allow: bool, domains: Option<&[&str]>, ports: &[ExposePort]| NetworkOptions {
            allow_network: allow,
            allowed_domains: domains.map(|d| d.iter().map(|s| s.to_string()).collect()),
            expose_ports: ports.to_vec(),
        };
        assert_eq!(network(&NetworkOptions::default()), Ok(None));
        assert_eq!(
            network(&net(true, Some(&["Example.COM."]), &[])),
            Ok(Some(vec!["example.com".to_string()]))
        );
        assert_eq!(network(&net(true, Some(&[]), &[])), Ok(Some(vec![])));
        let err = |o: &NetworkOptions| network(o).unwrap_err().to_string();
        assert!(err(&net(false, Some(&["a.com"]), &[])).contains("allow_network"));
        assert!(err(&net(true, Some(&["bad_domain!"]), &[])).starts_with("allowed_domains"));
        let many: Vec<String> = (0..=limits::MAX_ALLOWED_DOMAINS)
            .map(|i| format!("d{i}.com"))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(err(&net(true, Some(&many), &[])).contains("limit is 100"));

        let e = err(&net(false, None, &[ExposePort::tcp(80).on_host_port(80)]));
        assert!(
            e.contains("host port 80") && e.contains("1024-65535"),
            "{e}"
        );
        assert!(err(&net(false, None, &[ExposePort::tcp(0)])).contains("internal port 0"));
        let eleven: Vec<ExposePort> = (1..=11).map(ExposePort::tcp).collect();
        assert!(err(&net(false, None, &eleven)).contains("11 ports, limit is 10"));
        let twice = [ExposePort::tcp(80), ExposePort::tcp(80)];
        assert!(err(&net(false, None, &twice)).contains("forwarded twice"));
        let same_host = [
            ExposePort::tcp(80).on_host_port(8080),
            ExposePort::tcp(81).on_host_port(8080),
        ];
        assert!(err(&net(false, None, &same_host)).contains("used twice"));
        // The same number over TCP and UDP is two different ports.
        let both = [ExposePort::tcp(53), ExposePort::udp(53)];
        assert!(network(&net(false, None, &both)).is_ok());
        // Ports below 1024 in the guest are fine.
        assert!(
            network(&net(
                false,
                None,
                &[ExposePort::tcp(80).on_host_port(18080)]
            ))
            .is_ok()
        );
    }
}
