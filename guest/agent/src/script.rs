//! Raw code that starts with `#!` is a script, as a shell would run `./script`: it is written to
//! a private file and the bash driver executes that file, so the kernel starts the interpreter on
//! its `#!` line and the execution's exit code is the script's own.
//!
//! The file is created by the agent in the guest's `/tmp` with `O_EXCL` under a random name,
//! owned by the sandbox user, mode 0700, and removed once the execution ends (however it ends).
//! The driver runs it like any other command (same environment, working directory, timeout,
//! output limits), with stdin on `/dev/null` and without the driver's control descriptors, so
//! the script can neither read the next command nor forge a status line. It is a separate
//! process: nothing it does (`cd`, variables) persists, even for a `#!/bin/bash` script.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};

use crate::config::{Config, SANDBOX_GID, SANDBOX_UID, paths};
use crate::driver::Nonce;
use crate::log;

/// Exit code when the `#!` interpreter does not exist (as bash reports a command it cannot
/// find).
pub const NO_INTERPRETER: i32 = 127;
/// Exit code when the script cannot be written (as bash reports a file it cannot execute).
pub const CANNOT_WRITE: i32 = 126;

/// Whether raw code is a script for the kernel to run.
pub fn is_script(code: &str) -> bool {
    code.starts_with("#!")
}

/// The interpreter a `#!` line names, as the kernel reads it: after `#!` and any blanks, up to
/// the next blank or the end of the line. `None` when the line names none.
pub fn interpreter(code: &str) -> Option<&str> {
    let line = code.strip_prefix("#!")?.lines().next()?;
    line.split([' ', '\t']).find(|word| !word.is_empty())
}

/// A script file, removed when dropped.
#[derive(Debug)]
pub struct Script {
    path: PathBuf,
}

impl Drop for Script {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            log::warn(format_args!(
                "cannot remove the script {}: {e}",
                self.path.display()
            ));
        }
    }
}

/// What the bash driver is given for a script.
#[derive(Debug)]
pub enum Prepared {
    /// Execute this file (keep it until the execution ends).
    Run(Script),
    /// Do not run anything: report `message` on stderr and exit with `code`.
    Refused {
        /// Says what is wrong, shell-style.
        message: String,
        /// The exit code.
        code: i32,
    },
}

impl Prepared {
    /// The bash command that carries it out.
    pub fn command(&self) -> String {
        match self {
            Prepared::Run(script) => {
                format!("{} </dev/null", quote(&script.path.to_string_lossy()))
            }
            Prepared::Refused { message, code } => {
                format!(
                    "builtin printf '%s\\n' {} >&2; (exit {code})",
                    quote(message)
                )
            }
        }
    }
}

/// Writes `code` (a script) to a fresh private file for the sandbox user.
pub fn prepare(config: &Config, code: &str) -> Prepared {
    if let Some(interpreter) = interpreter(code) {
        // Relative names resolve against the shell's working directory at exec time: the
        // kernel (and bash's message) handles those.
        if interpreter.starts_with('/') && !Path::new(interpreter).exists() {
            return Prepared::Refused {
                message: format!(
                    "{interpreter}: bad interpreter (#! line): No such file or directory"
                ),
                code: NO_INTERPRETER,
            };
        }
    }
    match write(config, Path::new(paths::TMP), code) {
        Ok(script) => Prepared::Run(script),
        Err(e) => Prepared::Refused {
            message: format!("cannot write the script to {}: {e}", paths::TMP),
            code: CANNOT_WRITE,
        },
    }
}

fn write(config: &Config, dir: &Path, code: &str) -> io::Result<Script> {
    let nonce = Nonce::generate()?;
    let path = dir.join(format!(".sbx-script-{}", &nonce.as_str()[..16]));
    // O_EXCL and O_NOFOLLOW: nothing planted in the shared /tmp is opened or followed.
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rustix::fs::open(&path, flags, Mode::from_raw_mode(0o700))?;
    // From here on the file is ours to remove, whatever fails.
    let script = Script { path };
    let mut file = File::from(fd);
    // The umask may have narrowed the mode given to open.
    rustix::fs::fchmod(&file, Mode::from_raw_mode(0o700))?;
    if config.drop_privileges {
        let owner = rustix::fs::Uid::from_raw(SANDBOX_UID);
        let group = rustix::fs::Gid::from_raw(SANDBOX_GID);
        rustix::fs::fchown(&file, Some(owner), Some(group))?;
    }
    file.write_all(code.as_bytes())?;
    // Closed before the execution starts: an open writer would make exec fail (ETXTBSY).
    drop(file);
    Ok(script)
}

/// `text` as one bash word, with no expansion at all.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests")]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::config::Mode as AgentMode;

    #[test]
    fn scripts_and_their_interpreters() {
        assert!(is_script("#!/bin/sh\necho"));
        assert!(!is_script(" #!/bin/sh"));
        assert!(!is_script("# comment"));
        assert_eq!(
            interpreter("#!/usr/bin/awk -f\nBEGIN {}"),
            Some("/usr/bin/awk")
        );
        assert_eq!(interpreter("#! \t/bin/sh\n"), Some("/bin/sh"));
        assert_eq!(interpreter("#!/usr/bin/env python3"), Some("/usr/bin/env"));
        assert_eq!(interpreter("#!python3\n"), Some("python3"));
        assert_eq!(interpreter("#!\necho hi"), None);
        assert_eq!(interpreter("#!   \n"), None);
    }

    #[test]
    fn quoting_takes_everything_literally() {
        assert_eq!(quote("/tmp/x"), "'/tmp/x'");
        assert_eq!(quote("it's $HOME `x`"), r"'it'\''s $HOME `x`'");
    }

    fn config() -> Config {
        Config {
            mode: AgentMode::Stdio,
            drop_privileges: false,
            home: PathBuf::from("/"),
            run_dir: PathBuf::from("/"),
            python: PathBuf::from("python3"),
            bun: PathBuf::from("bun"),
            bash: PathBuf::from("bash"),
            root_mounted: false,
            packages: crate::layer::LayerState::Absent,
            boot: sbx_protocol::BootTimeline::default(),
            emulated_cpu: false,
        }
    }

    #[test]
    fn script_file_is_private_and_removed_on_drop() {
        let dir = std::env::temp_dir();
        let script = write(&config(), &dir, "#!/bin/sh\necho hi\n").unwrap();
        let path = script.path.clone();
        assert!(path.starts_with(&dir));
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o700);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "#!/bin/sh\necho hi\n"
        );
        let other = write(&config(), &dir, "#!/bin/sh\n").unwrap();
        assert_ne!(other.path, path, "a fresh name each time");
        drop(script);
        assert!(!path.exists());
    }

    #[test]
    fn missing_interpreter_is_refused_like_a_shell() {
        let prepared = prepare(&config(), "#!/nonexistent/awk -f\nBEGIN {}");
        let Prepared::Refused { message, code } = &prepared else {
            panic!("expected a refusal, got {prepared:?}");
        };
        assert_eq!(*code, NO_INTERPRETER);
        assert!(
            message.starts_with("/nonexistent/awk: bad interpreter"),
            "{message}"
        );
        assert_eq!(
            prepared.command(),
            "builtin printf '%s\\n' '/nonexistent/awk: bad interpreter (#! line): No such file or directory' >&2; (exit 127)"
        );
    }
}
