//! What `sbx` shows users: JSON lines, per-source headers, and error reports.

use exec_sandbox::{ErrorKind, ExecutionResult, ExposedPort, Language};
use serde::Serialize;

use crate::term::{self, Style};

/// One `--json` line for a finished source: its label and language, then every field of the
/// result in declaration order.
#[derive(Serialize)]
struct JsonResult<'a> {
    source: &'a str,
    language: &'static str,
    #[serde(flatten)]
    result: &'a ExecutionResult,
}

/// One `--json` line for a source the sandbox failed to run.
#[derive(Serialize)]
struct JsonFailure<'a> {
    source: &'a str,
    language: &'static str,
    error: JsonError,
}

#[derive(Serialize)]
struct JsonError {
    kind: ErrorKind,
    message: String,
    /// The `#[source]` chain below `message`, outermost first.
    causes: Vec<String>,
    hint: Option<String>,
}

/// The `--json` line (without newline) for a result.
pub fn json_result(label: &str, language: Language, result: &ExecutionResult) -> String {
    serde_json::to_string(&JsonResult {
        source: label,
        language: language.as_str(),
        result,
    })
    .expect("a result always serializes")
}

/// The `--json` line (without newline) for a source the sandbox failed to run.
pub fn json_failure(label: &str, language: Language, error: &exec_sandbox::Error) -> String {
    failure_line(
        label,
        language,
        JsonError {
            kind: error.kind(),
            message: error.to_string(),
            causes: causes(error),
            hint: error.hint(),
        },
    )
}

/// An error as JSON: `{kind, message, causes, hint}` (the `error` of a `--json` failure line,
/// and of an MCP tool error).
pub fn error_value(error: &exec_sandbox::Error) -> serde_json::Value {
    serde_json::to_value(JsonError {
        kind: error.kind(),
        message: error.to_string(),
        causes: causes(error),
        hint: error.hint(),
    })
    .unwrap_or_default()
}

/// The `--json` line (without newline) for a source whose run ended in a bug of `sbx` itself.
pub fn json_internal_failure(
    label: &str,
    language: Language,
    kind: ErrorKind,
    message: &str,
) -> String {
    failure_line(
        label,
        language,
        JsonError {
            kind,
            message: format!("internal error: {message}"),
            causes: Vec::new(),
            hint: None,
        },
    )
}

fn failure_line(label: &str, language: Language, error: JsonError) -> String {
    serde_json::to_string(&JsonFailure {
        source: label,
        language: language.as_str(),
        error,
    })
    .expect("an error report always serializes")
}

/// How a source ended, for its header.
pub enum Ending<'a> {
    /// It ran to a result.
    Finished(&'a ExecutionResult),
    /// The sandbox failed.
    Failed,
}

/// `==> [2/3] file.py (exit 0, 812 ms)`: printed before each source's output block when several
/// sources run.
pub fn header(position: usize, total: usize, label: &str, ending: Ending<'_>) -> String {
    let what = match ending {
        Ending::Finished(r) if r.timed_out || r.exit_code == -1 => {
            format!("timed out, {} ms", r.timing.total_ms)
        }
        Ending::Finished(r) => format!("exit {}, {} ms", r.exit_code, r.timing.total_ms),
        Ending::Failed => "sandbox error".to_string(),
    };
    format!("[{position}/{total}] {label} ({what})")
}

/// Prints a header on stderr.
pub fn print_header(line: &str) {
    term::stderr_line(&format!("{} {line}", term::paint(Style::Step, "==>")));
}

/// The `#[source]` chain of `error`, outermost first, without `error` itself.
fn causes(error: &dyn std::error::Error) -> Vec<String> {
    std::iter::successors(error.source(), |e| e.source())
        .map(ToString::to_string)
        .collect()
}

/// `error: <context>: <message>`, one `  caused by: ...` per source in the chain, and
/// `hint: ...` when there is one.
pub fn error_lines(
    context: Option<&str>,
    error: &dyn std::error::Error,
    hint: Option<&str>,
) -> Vec<String> {
    let head = match context {
        Some(context) => format!("{context}: {error}"),
        None => error.to_string(),
    };
    let head = term::inert(&head);
    let mut lines = vec![format!("{} {head}", term::paint(Style::Error, "error:"))];
    lines.extend(
        causes(error)
            .into_iter()
            .map(|c| format!("  caused by: {}", term::inert(&c))),
    );
    if let Some(hint) = hint {
        let hint = term::inert(hint);
        lines.push(format!("{} {hint}", term::paint(Style::Hint, "hint:")));
    }
    lines
}

/// Prints an error report on stderr.
pub fn print_error(context: Option<&str>, error: &dyn std::error::Error, hint: Option<&str>) {
    term::stderr(error_lines(context, error, hint).join("\n").as_bytes());
    term::stderr(b"\n");
}

/// Prints a library error with its hint.
pub fn print_sandbox_error(context: Option<&str>, error: &exec_sandbox::Error) {
    print_error(context, error, error.hint().as_deref());
}

/// Prints a usage error with its hint.
pub fn print_usage_error(error: &crate::status::UsageError) {
    print_error(None, error, error.hint_text());
}

/// Where packages came from, in words.
pub fn package_source(source: exec_sandbox::PackageSource) -> &'static str {
    match source {
        exec_sandbox::PackageSource::L2 => "from the local cache",
        exec_sandbox::PackageSource::L3 => "downloaded from S3",
        exec_sandbox::PackageSource::Built => "built now",
        _ => "none",
    }
}

/// `sbx: port 8000/tcp -> http://127.0.0.1:41234`, one line per forwarded port (with several
/// sources, the source's label after `sbx: `).
pub fn port_lines(label: Option<&str>, ports: &[ExposedPort]) -> Vec<String> {
    let prefix = label.map(|l| format!("{l}: ")).unwrap_or_default();
    ports
        .iter()
        .map(|p| {
            format!(
                "sbx: {prefix}port {}/{} -> {}",
                p.internal, p.protocol, p.url
            )
        })
        .collect()
}

/// Warnings about a result (printed unless quiet): output cut at its limit, and what the
/// network gateway refused.
pub fn result_warnings(label: Option<&str>, result: &ExecutionResult) -> Vec<String> {
    let prefix = label.map(|l| format!("{l}: ")).unwrap_or_default();
    let mut out = Vec::new();
    for (stream, truncated, limit) in [
        (
            "stdout",
            result.stdout_truncated,
            exec_sandbox::limits::MAX_STDOUT_BYTES,
        ),
        (
            "stderr",
            result.stderr_truncated,
            exec_sandbox::limits::MAX_STDERR_BYTES,
        ),
    ] {
        if truncated {
            out.push(format!(
                "{} {prefix}{stream} passed its limit of {limit} bytes; the rest was dropped",
                term::paint(Style::Warning, "warning:")
            ));
        }
    }
    for refusal in &result.network_refusals {
        out.push(format!(
            "{} {prefix}network refused {}",
            term::paint(Style::Warning, "warning:"),
            term::inert(&refusal.to_string())
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use exec_sandbox::PortProtocol;

    fn result() -> ExecutionResult {
        exec_sandbox::testing::sample_result()
    }

    #[test]
    fn json_result_has_every_field() {
        let line = json_result("code[1]", Language::Python, &result());
        assert!(!line.contains('\n'));
        insta::assert_snapshot!(line);
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        let keys: Vec<_> = value.as_object().unwrap().keys().cloned().collect();
        for key in [
            "source",
            "language",
            "stdout",
            "stderr",
            "exit_code",
            "timed_out",
            "stdout_truncated",
            "stderr_truncated",
            "execution_time_ms",
            "external_cpu_time_ms",
            "external_memory_peak_mb",
            "external_cpu_nr_throttled",
            "timing",
            "accelerator",
            "warm_pool_hit",
            "l1_cache_hit",
            "exposed_ports",
            "network_refusals",
            "packages_source",
            "packages_install_ms",
            "isolation",
        ] {
            assert!(keys.iter().any(|k| k == key), "missing {key}: {keys:?}");
        }
        assert_eq!(value["accelerator"]["name"], "tcg");
        assert_eq!(value["isolation"]["cgroup"], true);
        assert_eq!(value["isolation"]["cgroup_version"], "v1");
        assert_eq!(value["language"], "python");
        assert_eq!(value["timing"]["total_ms"], 745);
        assert_eq!(
            value["exposed_ports"],
            serde_json::json!([{
                "internal": 8000,
                "external": 41234,
                "host": "127.0.0.1",
                "protocol": "tcp",
                "url": "http://127.0.0.1:41234"
            }])
        );
    }

    #[test]
    fn forwarded_ports_one_line_each() {
        let ports = [
            ExposedPort::new(8000, 41234, PortProtocol::Tcp),
            ExposedPort::new(53, 41235, PortProtocol::Udp),
        ];
        assert_eq!(
            port_lines(None, &ports),
            [
                "sbx: port 8000/tcp -> http://127.0.0.1:41234",
                "sbx: port 53/udp -> udp://127.0.0.1:41235"
            ]
        );
        assert_eq!(
            port_lines(Some("code[2]"), &ports[..1]),
            ["sbx: code[2]: port 8000/tcp -> http://127.0.0.1:41234"]
        );
        assert!(port_lines(None, &[]).is_empty());
    }

    #[test]
    fn json_failure_names_the_kind() {
        let error = exec_sandbox::Error::from(exec_sandbox::ValidationError::EmptyCode);
        let line = json_failure("a.py", Language::Raw, &error);
        insta::assert_snapshot!(line);
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["error"]["kind"], "invalid_input");
        assert_eq!(value["error"]["causes"][0], "code is empty");
    }

    #[test]
    fn headers() {
        let mut r = result();
        assert_eq!(
            header(2, 3, "file.py", Ending::Finished(&r)),
            "[2/3] file.py (exit 0, 745 ms)"
        );
        r.exit_code = -1;
        r.timed_out = true;
        assert_eq!(
            header(1, 2, "code[1]", Ending::Finished(&r)),
            "[1/2] code[1] (timed out, 745 ms)"
        );
        assert_eq!(header(3, 3, "-", Ending::Failed), "[3/3] - (sandbox error)");
    }

    #[test]
    fn errors_print_their_chain_and_hint() {
        let error = exec_sandbox::Error::from(exec_sandbox::ValidationError::EmptyCode);
        let lines = error_lines(Some("code[1]"), &error, Some("write some code"));
        assert_eq!(
            lines,
            [
                "error: code[1]: invalid input",
                "  caused by: code is empty",
                "hint: write some code"
            ]
        );
    }

    #[test]
    fn truncation_is_reported_per_stream() {
        let mut r = result();
        assert!(result_warnings(None, &r).is_empty());
        r.stdout_truncated = true;
        let w = result_warnings(Some("a.py"), &r);
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("a.py: stdout passed its limit of 1000000 bytes"),
            "{w:?}"
        );
    }

    #[test]
    fn network_refusals_are_warned_one_line_each() {
        let mut r = result();
        r.network_refusals = vec![
            "DNS other.test: not in the allowlist".into(),
            "UDP 198.18.0.1:5353: only DNS to the gateway (10.0.2.2:53)".into(),
        ];
        r.network_refusals
            .push("TCP x: the client named \"\u{1b}]0;owned\u{7}\"".into());
        let w = result_warnings(None, &r);
        assert_eq!(w.len(), 3);
        assert!(w[2].ends_with(r#"named "\u{1b}]0;owned\u{7}""#), "{w:?}");
        assert!(
            w[0].ends_with("network refused DNS other.test: not in the allowlist"),
            "{w:?}"
        );
    }

    #[test]
    fn guest_text_in_error_lines_cannot_steer_the_terminal() {
        #[derive(Debug)]
        struct Hostile;
        impl std::fmt::Display for Hostile {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("no such file: \u{1b}[2J\u{1b}]52;c;aGk=\u{7}x\u{202e}y\nz\u{9b}")
            }
        }
        impl std::error::Error for Hostile {}
        let lines = error_lines(Some("download"), &Hostile, Some("\u{1b}[31mred"));
        let all = lines.join("\n");
        for c in ['\u{1b}', '\u{7}', '\u{202e}', '\u{9b}'] {
            assert!(!all.contains(c), "{all:?}");
        }
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].ends_with(
                r"download: no such file: \u{1b}[2J\u{1b}]52;c;aGk=\u{7}x\u{202e}y\u{a}z\u{9b}"
            ),
            "{lines:?}"
        );
        assert!(lines[1].ends_with(r"\u{1b}[31mred"), "{lines:?}");
    }
}
