//! The small programs that run inside each interpreter and the agent's side of their protocol.
//!
//! A driver reads commands on its fd 3 and answers on its fd 4:
//!
//! ```text
//! agent -> driver: "<nonce> <env_len> <code_len>\n" <env_len bytes: "NAME=VALUE\n"...> <code_len bytes of code>
//! driver -> agent: "ready\n" once, then "<nonce> <exit code>\n" per command
//! ```
//!
//! The nonce is 128 random bits chosen per command, so a status line cannot be replayed, and
//! the status travels on its own pipe, so nothing user code prints can be taken for it.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use sbx_protocol::Language;

use crate::config::Config;

/// Python driver, passed with `-c`.
pub const PYTHON: &str = include_str!("drivers/python.py");
/// bash driver, passed with `-c`.
pub const BASH: &str = include_str!("drivers/bash.sh");
/// Bun driver, written to the run directory (Bun needs a module file).
pub const BUN: &str = include_str!("drivers/bun.mjs");
/// File name of the Bun driver inside the run directory.
pub const BUN_FILE: &str = "driver.mjs";
/// First status line of a driver that is ready for commands.
pub const READY: &str = "ready";

/// A request the agent refuses before running anything.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidRequest {
    /// The code holds a NUL byte (no interpreter can take it).
    #[error("code contains a NUL byte at offset {offset}")]
    NulInCode {
        /// Byte offset of the first NUL.
        offset: usize,
    },
    /// An environment variable name is not a portable identifier.
    #[error("environment variable name {name:?} is not of the form [A-Za-z_][A-Za-z0-9_]*")]
    EnvName {
        /// The name, as sent.
        name: String,
    },
    /// An environment variable name is one the host refuses too: it would hijack a runtime,
    /// a tool, or the driver itself.
    #[error("environment variable {name} is not allowed: it {hijack}")]
    EnvDenied {
        /// The variable's name.
        name: String,
        /// What it would hijack.
        hijack: &'static str,
    },
    /// An environment variable value holds a NUL or a newline.
    #[error("environment variable {name} has a NUL or newline in its value")]
    EnvValue {
        /// The variable's name.
        name: String,
    },
    /// The timeout is zero.
    #[error("timeout_ms must be at least 1")]
    ZeroTimeout,
}

/// The code as a driver gets it: one leading byte-order mark (U+FEFF, which editors on Windows
/// put at the start of UTF-8 files) removed, as the reference does for every language. Python
/// would refuse it as a non-printable character and bash would run `\u{feff}echo` as a command.
pub fn strip_bom(code: &str) -> &str {
    code.strip_prefix('\u{feff}').unwrap_or(code)
}

/// Environment variables `language`'s interpreter starts with, beyond the base environment.
///
/// Python: no limit on converting huge integers to and from strings (3.11 refuses more than
/// 4300 digits by default); the execution timeout bounds the cost, as in the reference. The
/// interpreter reads the variable once, at start: a value passed with one execution is applied
/// by the Python driver (`sys.set_int_max_str_digits`) for that execution only.
///
/// JavaScript on an `emulated_cpu` (TCG): JavaScriptCore's top tier (FTL) off. Its compiles
/// cost far more than they return there: on the 1-vCPU guest the compiler thread takes the
/// only CPU from the program. In-guest times (`docs/measurements.md`): `fib(20)` 151-412 ms
/// with every tier, 9-94 without FTL; `fib(34)` 844 → 621 ms; 200k objects built, mapped and
/// sorted 1139-1482 → 746-903 ms. The lower tiers (interpreter, baseline and DFG JITs) stay
/// on; under KVM every tier does.
///
/// Bun's own collection timer stays on. Off (`BUN_GC_TIMER_DISABLE`), an idle pooled VM no
/// longer collects once idle (its settled PSS 73 → 62 MB), but the collection then lands in
/// the user's first executions (warm JavaScript 15 → 57 ms, `docs/measurements.md`).
pub fn interpreter_env(
    language: Language,
    emulated_cpu: bool,
) -> &'static [(&'static str, &'static str)] {
    match language {
        Language::Python => &[("PYTHONINTMAXSTRDIGITS", "0")],
        Language::Javascript if emulated_cpu => &[("BUN_JSC_useFTLJIT", "0")],
        Language::Javascript | Language::Raw => &[],
    }
}

/// Checks what the drivers cannot represent.
pub fn validate(
    code: &str,
    env: &[(String, String)],
    timeout_ms: u64,
) -> Result<(), InvalidRequest> {
    if timeout_ms == 0 {
        return Err(InvalidRequest::ZeroTimeout);
    }
    if let Some(offset) = code.bytes().position(|b| b == 0) {
        return Err(InvalidRequest::NulInCode { offset });
    }
    for (name, value) in env {
        if !sbx_protocol::env::is_name(name) {
            return Err(InvalidRequest::EnvName { name: name.clone() });
        }
        if let Some(row) = sbx_protocol::env::denied(name) {
            return Err(InvalidRequest::EnvDenied {
                name: name.clone(),
                hijack: row.hijack,
            });
        }
        if value.contains(['\0', '\n']) {
            return Err(InvalidRequest::EnvValue { name: name.clone() });
        }
    }
    Ok(())
}

/// A per-command secret, as 32 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nonce(String);

impl Nonce {
    /// 128 bits from `/dev/urandom` (never blocks, even early in boot).
    pub fn generate() -> io::Result<Nonce> {
        let mut bytes = [0u8; 16];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        Ok(Nonce::from_bytes(bytes))
    }

    fn from_bytes(bytes: [u8; 16]) -> Nonce {
        let mut hex = String::with_capacity(32);
        for b in bytes {
            let _ = write!(hex, "{b:02x}");
        }
        Nonce(hex)
    }

    /// The hex text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Encodes one command for any driver.
pub fn command(nonce: &Nonce, env: &[(String, String)], code: &str) -> Vec<u8> {
    let mut env_block = String::new();
    for (name, value) in env {
        env_block.push_str(name);
        env_block.push('=');
        env_block.push_str(value);
        env_block.push('\n');
    }
    let mut out = format!("{} {} {}\n", nonce.as_str(), env_block.len(), code.len()).into_bytes();
    out.reserve(env_block.len() + code.len());
    out.extend_from_slice(env_block.as_bytes());
    out.extend_from_slice(code.as_bytes());
    out
}

/// The exit code in `line` if it is the status line for `nonce`. Bytes before the nonce are
/// skipped: user code that can reach the status pipe (through `/proc`) and leaves an unfinished
/// line there must not make the real status unrecognisable. Without the nonce nothing matches.
pub fn parse_status(line: &str, nonce: &Nonce) -> Option<i32> {
    let (got, code) = line.rsplit_once(' ')?;
    if !got.ends_with(nonce.as_str()) {
        return None;
    }
    code.trim_end().parse().ok()
}

/// Program and arguments starting `language`'s driver.
pub fn argv(config: &Config, language: Language) -> (PathBuf, Vec<OsString>) {
    let program = config.interpreter(language).to_path_buf();
    let args: Vec<OsString> = match language {
        Language::Python => vec!["-u".into(), "-c".into(), PYTHON.into()],
        Language::Raw => vec![
            "--noprofile".into(),
            "--norc".into(),
            "-c".into(),
            BASH.into(),
            "bash".into(),
        ],
        Language::Javascript => vec![
            // No implicit package downloads: the sandbox has no registry to talk to.
            "--no-install".into(),
            bun_driver_path(&config.run_dir).into_os_string(),
        ],
    };
    (program, args)
}

/// Where the Bun driver is written.
pub fn bun_driver_path(run_dir: &Path) -> PathBuf {
    run_dir.join(BUN_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_javascript_on_an_emulated_cpu_loses_a_jit_tier() {
        let ftl_off = ("BUN_JSC_useFTLJIT", "0");
        assert_eq!(interpreter_env(Language::Javascript, true), [ftl_off]);
        assert!(interpreter_env(Language::Javascript, false).is_empty());
        for emulated in [false, true] {
            assert_eq!(
                interpreter_env(Language::Python, emulated),
                [("PYTHONINTMAXSTRDIGITS", "0")]
            );
            assert!(interpreter_env(Language::Raw, emulated).is_empty());
        }
    }

    fn nonce() -> Nonce {
        Nonce::from_bytes([0xab; 16])
    }

    #[test]
    fn nonce_is_random_hex() {
        let a = Nonce::generate().expect("urandom");
        let b = Nonce::generate().expect("urandom");
        assert_eq!(a.as_str().len(), 32);
        assert!(a.as_str().bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn command_layout() {
        let env = vec![
            ("A".to_string(), "1\t2".to_string()),
            ("B_2".to_string(), String::new()),
        ];
        let cmd = command(&nonce(), &env, "print('é')");
        let text = String::from_utf8(cmd).expect("utf8");
        let (header, rest) = text.split_once('\n').expect("header");
        let parts: Vec<&str> = header.split(' ').collect();
        assert_eq!(parts[0], nonce().as_str());
        assert_eq!(parts[1], "11");
        assert_eq!(parts[2], "11", "length in bytes, not chars");
        assert_eq!(rest, "A=1\t2\nB_2=\nprint('é')");
    }

    #[test]
    fn status_lines() {
        let n = nonce();
        assert_eq!(parse_status(&format!("{} 3", n.as_str()), &n), Some(3));
        assert_eq!(parse_status(&format!("{} -1\n", n.as_str()), &n), Some(-1));
        assert_eq!(parse_status("deadbeef 0", &n), None);
        assert_eq!(parse_status(&format!("{} x", n.as_str()), &n), None);
        assert_eq!(parse_status(READY, &n), None);
        assert_eq!(
            parse_status(&format!("junk{} 5", n.as_str()), &n),
            Some(5),
            "an unfinished line before the status"
        );
        assert_eq!(parse_status(&format!("{} 5 6", n.as_str()), &n), None);
        assert_eq!(parse_status(&n.as_str()[1..], &n), None);
    }

    #[test]
    fn one_leading_bom_is_stripped() {
        assert_eq!(strip_bom("\u{feff}print(1)"), "print(1)");
        assert_eq!(strip_bom("\u{feff}\u{feff}x"), "\u{feff}x", "only one");
        assert_eq!(strip_bom("x\u{feff}"), "x\u{feff}", "only at the start");
        assert_eq!(strip_bom(""), "");
    }

    #[test]
    fn validation() {
        let ok = vec![("_X1".to_string(), "a\tb".to_string())];
        assert_eq!(validate("x", &ok, 1), Ok(()));
        assert_eq!(validate("x", &ok, 0), Err(InvalidRequest::ZeroTimeout));
        assert_eq!(
            validate("a\0b", &[], 1),
            Err(InvalidRequest::NulInCode { offset: 1 })
        );
        for bad in ["", "1A", "A-B", "A=B", "É"] {
            let env = vec![(bad.to_string(), String::new())];
            assert!(
                matches!(validate("", &env, 1), Err(InvalidRequest::EnvName { .. })),
                "{bad}"
            );
        }
        let env = vec![("A".to_string(), "x\ny".to_string())];
        assert!(matches!(
            validate("", &env, 1),
            Err(InvalidRequest::EnvValue { .. })
        ));
    }
}
