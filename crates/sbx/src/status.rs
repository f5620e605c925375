//! How a command ends: exit statuses, and the error for input the CLI itself rejects.

use exec_sandbox::{ErrorKind, ExecutionResult};

/// Everything went well.
pub const SUCCESS: u8 = 0;
/// Bad command line, bad configuration, or input the sandbox refused before running anything.
pub const USAGE: u8 = 2;
/// The execution timeout fired (the result's exit code is -1), as GNU `timeout` reports it.
pub const TIMEOUT: u8 = 124;
/// The sandbox failed: assets, QEMU, boot, or contact with the VM.
pub const SANDBOX_ERROR: u8 = 125;
/// Interrupted by Ctrl-C (128 + SIGINT).
pub const INTERRUPTED: u8 = 130;
/// Stopped by SIGTERM (128 + SIGTERM).
pub const TERMINATED: u8 = 143;

/// The status `sbx` exits with for a program's result.
///
/// A timeout gives 124. Codes 0-255 pass through unchanged, including a program's own 124 or
/// 125 (`--json` tells them apart). Anything else is reduced to its low 8 bits as a shell does
/// for `exit(n)`, except that a failure never turns into 0: a non-zero code whose low 8 bits
/// are zero becomes 1.
pub fn of_result(exit_code: i32, timed_out: bool) -> u8 {
    if timed_out || exit_code == -1 {
        return TIMEOUT;
    }
    if let Ok(code) = u8::try_from(exit_code) {
        return code;
    }
    match exit_code.to_le_bytes()[0] {
        0 => 1,
        low => low,
    }
}

/// The status for a result.
pub fn of_execution(result: &ExecutionResult) -> u8 {
    of_result(result.exit_code, result.timed_out)
}

/// The status for a library error: invalid input is a usage error, anything else a sandbox error.
pub fn of_error(error: &exec_sandbox::Error) -> u8 {
    match error.kind() {
        ErrorKind::InvalidInput => USAGE,
        _ => SANDBOX_ERROR,
    }
}

/// With several sources: the first non-zero status, in source order.
pub fn combine(statuses: impl IntoIterator<Item = u8>) -> u8 {
    statuses
        .into_iter()
        .find(|&s| s != SUCCESS)
        .unwrap_or(SUCCESS)
}

/// Input the CLI refuses before anything runs (exit status 2), or a sandbox that cannot be set
/// up at all (125: see [`scheduler_error`]).
#[derive(Debug)]
pub struct UsageError {
    message: String,
    cause: Option<Box<dyn std::error::Error + Send + Sync>>,
    hint: Option<String>,
    status: u8,
}

/// Why `Scheduler::new` refused, as the CLI reports it: an invalid configuration is a usage
/// error (2); anything else (a cache directory another user could change) a sandbox error
/// (125) with the library's hint.
pub fn scheduler_error(error: exec_sandbox::Error) -> UsageError {
    let status = of_error(&error);
    let message = if status == USAGE {
        "invalid configuration"
    } else {
        "cannot set up the sandbox"
    };
    let hint = error.hint();
    let mut usage = UsageError::new(message).cause(error);
    usage.status = status;
    usage.hint = hint;
    usage
}

/// The scheduler of `EXEC_SANDBOX_*` (after `adjust`), or why there is none, as the CLI
/// reports it.
pub fn scheduler_from_env(
    adjust: impl FnOnce(&mut exec_sandbox::SchedulerConfig),
) -> Result<exec_sandbox::Scheduler, UsageError> {
    let mut config = exec_sandbox::SchedulerConfig::from_env().map_err(|e| {
        UsageError::new(e.to_string()).hint("fix or unset the EXEC_SANDBOX_* environment variable")
    })?;
    adjust(&mut config);
    exec_sandbox::Scheduler::new(config).map_err(scheduler_error)
}

impl UsageError {
    /// An error saying `message`.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            cause: None,
            hint: None,
            status: USAGE,
        }
    }

    /// The status `sbx` exits with for it.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// Attaches the underlying error (printed as `caused by:`).
    pub fn cause(mut self, cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.cause = Some(Box::new(cause));
        self
    }

    /// Attaches a suggestion (printed as `hint:`).
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// The suggestion, if any.
    pub fn hint_text(&self) -> Option<&str> {
        self.hint.as_deref()
    }
}

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for UsageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_codes_map_to_statuses() {
        assert_eq!(of_result(0, false), 0);
        assert_eq!(of_result(3, false), 3);
        assert_eq!(of_result(255, false), 255);
        assert_eq!(of_result(128 + 9, false), 137, "killed by SIGKILL");
        assert_eq!(of_result(-1, true), TIMEOUT);
        assert_eq!(
            of_result(-1, false),
            TIMEOUT,
            "-1 means timeout even without the flag"
        );
        assert_eq!(of_result(0, true), TIMEOUT, "the flag wins");
        assert_eq!(
            of_result(124, false),
            124,
            "the program's own 124 passes through"
        );
        assert_eq!(of_result(256, false), 1, "never success for a failure");
        assert_eq!(of_result(257, false), 1);
        assert_eq!(of_result(300, false), 44);
        assert_eq!(of_result(-2, false), 254, "as a shell shows exit(-2)");
        assert_eq!(of_result(i32::MIN, false), 1);
    }

    #[test]
    fn several_statuses_give_the_first_failure() {
        assert_eq!(combine([0, 0, 0]), 0);
        assert_eq!(combine([0, 3, 124]), 3);
        assert_eq!(combine([TIMEOUT, 3]), TIMEOUT);
        assert_eq!(combine([]), 0);
    }

    #[test]
    fn usage_errors_chain_their_cause() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let e = UsageError::new("cannot open `x`")
            .cause(io)
            .hint("check the path");
        assert_eq!(e.to_string(), "cannot open `x`");
        assert_eq!(std::error::Error::source(&e).unwrap().to_string(), "gone");
        assert_eq!(e.hint_text(), Some("check the path"));
    }
}
