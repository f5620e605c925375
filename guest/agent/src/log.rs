//! Diagnostics on stderr: the VM console in VM mode (the host shows it with `--debug`), the
//! terminal in dev mode. Never on stdout, which carries the protocol in dev mode.

use std::fmt::Arguments;
use std::io::Write;

fn emit(level: &str, args: Arguments<'_>) {
    // One write per line so lines from several threads do not interleave.
    let line = format!("sbx-agent: {level}{args}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Something worth knowing at boot or when it goes well.
pub fn info(args: Arguments<'_>) {
    emit("", args);
}

/// Something went wrong but the agent carries on.
pub fn warn(args: Arguments<'_>) {
    emit("warning: ", args);
}

/// Something went wrong and the agent stops.
pub fn error(args: Arguments<'_>) {
    emit("error: ", args);
}
