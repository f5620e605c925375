//! Environment variable names an execution may not set: one table, read by the host's
//! validation and again by the guest agent before a driver sees a name.
//!
//! Each row names what the variable would hijack. Names are compared in upper case: tools read
//! `http_proxy` as readily as `HTTP_PROXY`, and no legitimate program needs a lower-case twin of
//! a refused name.

/// How a row matches a name (after upper-casing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// The name itself.
    Exact(&'static str),
    /// Every name starting with this.
    Prefix(&'static str),
    /// Every name ending with this.
    Suffix(&'static str),
}

/// One row of [`DENIED`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denied {
    /// The names it covers.
    pub pattern: Pattern,
    /// Names the pattern covers that stay allowed.
    pub except: &'static [&'static str],
    /// What a caller could do with it: the reason users see.
    pub hijack: &'static str,
}

const fn exact(name: &'static str, hijack: &'static str) -> Denied {
    Denied {
        pattern: Pattern::Exact(name),
        except: &[],
        hijack,
    }
}

const fn prefix(name: &'static str, hijack: &'static str) -> Denied {
    Denied {
        pattern: Pattern::Prefix(name),
        except: &[],
        hijack,
    }
}

/// The prefix of the drivers' own variables (`__sbx_code`, `__sbx_nonce`, ...), in upper case.
pub const RESERVED_PREFIX: &str = "__SBX";

/// Every refused name, with the hijack it prevents.
pub const DENIED: &[Denied] = &[
    prefix(
        RESERVED_PREFIX,
        "is reserved for the drivers' own variables (it could rewrite the code being run)",
    ),
    prefix(
        "LD_",
        "makes the dynamic loader load code into every program (LD_PRELOAD, LD_LIBRARY_PATH, LD_AUDIT)",
    ),
    prefix(
        "MALLOC_",
        "changes the C library's allocator in every program",
    ),
    exact(
        "GLIBC_TUNABLES",
        "changes the C library's allocator and hardening in every program",
    ),
    exact(
        "GCONV_PATH",
        "makes the C library load a shared object when text is converted (iconv)",
    ),
    exact(
        "LOCPATH",
        "makes the C library load locale data from any file",
    ),
    exact(
        "NLSPATH",
        "makes programs read their message catalogs (format strings) from any file",
    ),
    exact(
        "HOSTALIASES",
        "rewrites the names the resolver looks up for every program",
    ),
    exact(
        "RES_OPTIONS",
        "changes the resolver's behaviour for every program",
    ),
    exact("PATH", "decides which program runs for every command name"),
    exact(
        "HOME",
        "moves every tool's configuration to a directory of the caller's choosing",
    ),
    exact("TMPDIR", "moves every program's temporary files"),
    exact(
        "IFS",
        "changes how the shell splits every unquoted expansion",
    ),
    exact(
        "PYTHONPATH",
        "puts modules of the caller's choosing before the standard library",
    ),
    exact("PYTHONHOME", "replaces Python's standard library"),
    exact("PYTHONSTARTUP", "runs a file in every interactive Python"),
    exact(
        "PYTHONINSPECT",
        "leaves Python in interactive mode when a program ends",
    ),
    exact(
        "PYTHONWARNINGS",
        "imports a module named in a warning filter when Python starts",
    ),
    exact(
        "PYTHONBREAKPOINT",
        "imports and calls any callable when a program calls breakpoint()",
    ),
    exact(
        "PYTHONUSERBASE",
        "adds a directory of the caller's choosing to child Pythons' import path",
    ),
    Denied {
        pattern: Pattern::Prefix("NODE_"),
        except: &["NODE_ENV"],
        hijack: "loads code into every Node process or changes its module resolution and TLS (NODE_OPTIONS, NODE_PATH, NODE_EXTRA_CA_CERTS)",
    },
    prefix(
        "BUN_",
        "changes how Bun runs, installs and resolves every program (BUN_OPTIONS, BUN_INSTALL, ...)",
    ),
    exact("BASH_ENV", "runs a file in every non-interactive bash"),
    exact("ENV", "runs a file in every POSIX shell"),
    prefix("BASH_FUNC_", "defines shell functions in every bash"),
    exact("PROMPT_COMMAND", "runs a command before every prompt"),
    exact(
        "PS4",
        "runs its command substitutions on every traced line (`set -x`)",
    ),
    exact("SHELLOPTS", "switches shell options on in every bash"),
    exact("BASHOPTS", "switches shell options on in every bash"),
    exact(
        "CDPATH",
        "sends `cd` in scripts to directories of the caller's choosing",
    ),
    exact("GLOBIGNORE", "changes which files every glob matches"),
    exact(
        "BASH_XTRACEFD",
        "sends the shell's trace to any descriptor, the driver's own included",
    ),
    exact(
        "BASH_LOADABLES_PATH",
        "lets `enable -f` load builtins from a directory of the caller's choosing",
    ),
    exact(
        "SSL_CERT_FILE",
        "replaces the certificate authorities TLS clients trust",
    ),
    exact(
        "SSL_CERT_DIR",
        "replaces the certificate authorities TLS clients trust",
    ),
    exact(
        "OPENSSL_CONF",
        "makes OpenSSL load a configuration (and engines) from any file",
    ),
    Denied {
        pattern: Pattern::Suffix("_PROXY"),
        except: &[],
        hijack: "sends tools' traffic through a proxy of the caller's choosing (HTTP_PROXY, ALL_PROXY, NO_PROXY, ...)",
    },
    prefix(
        "GIT_",
        "makes git run commands or read configuration of the caller's choosing (GIT_SSH_COMMAND, GIT_CONFIG_*)",
    ),
    exact("PERL5OPT", "loads modules into every perl (-M)"),
];

impl Pattern {
    fn matches(self, upper: &str) -> bool {
        match self {
            Pattern::Exact(name) => upper == name,
            Pattern::Prefix(prefix) => upper.starts_with(prefix),
            Pattern::Suffix(suffix) => upper.ends_with(suffix),
        }
    }
}

/// The row that refuses `name`, if any.
pub fn denied(name: &str) -> Option<&'static Denied> {
    let upper = name.to_ascii_uppercase();
    DENIED
        .iter()
        .find(|row| row.pattern.matches(&upper) && !row.except.contains(&upper.as_str()))
}

/// Whether `name` has the form of a shell variable name: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A name each row covers.
    fn sample(row: &Denied) -> String {
        match row.pattern {
            Pattern::Exact(name) => name.to_string(),
            Pattern::Prefix(prefix) => format!("{prefix}X"),
            Pattern::Suffix(suffix) => format!("X{suffix}"),
        }
    }

    #[test]
    fn every_row_refuses_its_names_in_any_case() {
        for row in DENIED {
            let name = sample(row);
            assert_eq!(denied(&name), Some(row), "{name}");
            assert_eq!(denied(&name.to_ascii_lowercase()), Some(row), "{name}");
            assert!(is_name(&name), "{name}");
            assert!(!row.hijack.is_empty());
        }
    }

    #[test]
    fn the_rows_of_the_issue() {
        for name in [
            "__sbx_code",
            "__sbx_nl",
            "LD_PRELOAD",
            "PYTHONWARNINGS",
            "PYTHONBREAKPOINT",
            "PYTHONUSERBASE",
            "GCONV_PATH",
            "LOCPATH",
            "NLSPATH",
            "HOSTALIASES",
            "RES_OPTIONS",
            "PS4",
            "CDPATH",
            "GLOBIGNORE",
            "BASH_XTRACEFD",
            "BASH_LOADABLES_PATH",
            "BUN_OPTIONS",
            "BUN_INSTALL",
            "NODE_OPTIONS",
            "NODE_EXTRA_CA_CERTS",
            "SSL_CERT_FILE",
            "SSL_CERT_DIR",
            "OPENSSL_CONF",
            "http_proxy",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "GIT_SSH_COMMAND",
            "GIT_CONFIG_COUNT",
            "PERL5OPT",
        ] {
            assert!(denied(name).is_some(), "{name} allowed");
        }
    }

    #[test]
    fn ordinary_names_and_exceptions_pass() {
        for name in [
            "NODE_ENV",
            "node_env",
            "FOO",
            "PYTHONINTMAXSTRDIGITS",
            "PYTHONHASHSEED",
            "LANG",
            "TZ",
            "SBX",
            "_sbx",
            "PROXY",
            "MY_PROXYNAME",
            "GITHUB_TOKEN_NAME",
        ] {
            assert_eq!(denied(name), None, "{name}");
        }
    }

    #[test]
    fn name_form() {
        for ok in ["A", "_", "a_1", "__sbx"] {
            assert!(is_name(ok), "{ok}");
        }
        for bad in ["", "1A", "A-B", "a[$(id)]", "A=B", "É", "A B"] {
            assert!(!is_name(bad), "{bad}");
        }
    }
}
