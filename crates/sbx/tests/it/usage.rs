//! Refusals that need no VM: exit status 2, a clear message on stderr, nothing on stdout, and
//! nothing started: no asset looked for, no QEMU run.

use std::path::PathBuf;
use std::time::Duration;

use predicates::prelude::*;

use crate::sbx_offline;

/// A hang guard, not a measurement: a refusal that waits on something fails here instead of
/// hanging the suite.
pub(crate) const HANG_GUARD: Duration = Duration::from_secs(60);

/// A stand-in for QEMU that records each call in a file beside it, then fails.
pub(crate) struct QemuRecorder {
    dir: tempfile::TempDir,
}

impl QemuRecorder {
    pub(crate) fn new() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qemu-system-x86_64");
        std::fs::write(
            &path,
            "#!/bin/sh\necho \"$*\" >> \"$(dirname \"$0\")/calls\"\nexit 1\n",
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self { dir }
    }

    pub(crate) fn binary(&self) -> PathBuf {
        self.dir.path().join("qemu-system-x86_64")
    }

    /// The command lines it was called with.
    pub(crate) fn calls(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("calls")).unwrap_or_default()
    }
}

/// `sbx args...` is refused with status 2 and `stderr_has` in its message, before anything
/// started: with an empty offline cache and a recording QEMU, whatever reached for assets or a
/// VM would fail differently (status 125, a message about missing assets), leave files in the
/// cache, or leave a call in the recorder.
fn refuses(args: &[&str], stderr_has: &str) {
    let cache = tempfile::tempdir().unwrap();
    let qemu = QemuRecorder::new();
    sbx_offline(&cache)
        .env("EXEC_SANDBOX_QEMU", qemu.binary())
        .args(args)
        .write_stdin("")
        .timeout(HANG_GUARD)
        .assert()
        .code(2)
        .stdout(predicate::str::is_empty())
        .stderr(predicate::str::contains(stderr_has));
    assert_eq!(qemu.calls(), "", "{args:?} ran QEMU");
    assert!(
        std::fs::read_dir(cache.path()).unwrap().next().is_none(),
        "{args:?} touched the cache"
    );
}

/// The recorder and the empty cache do catch a run that goes past validation.
#[test]
fn the_refusal_check_notices_a_run_that_went_further() {
    let cache = tempfile::tempdir().unwrap();
    let qemu = QemuRecorder::new();
    sbx_offline(&cache)
        .env("EXEC_SANDBOX_QEMU", qemu.binary())
        .args(["run", "print(1)"])
        .timeout(HANG_GUARD)
        .assert()
        .code(125)
        .stderr(predicate::str::contains("guest assets unavailable"));
}

#[test]
fn empty_code_fails_fast_with_a_clear_message() {
    refuses(&["run", ""], "code is empty");
    refuses(&["run", "  \n"], "invalid source `code[1]`");
    refuses(&["run", "-c", ""], "code is empty");
}

#[test]
fn one_bad_source_stops_them_all_before_anything_runs() {
    refuses(&["run", "print(1)", ""], "code[2]");
}

#[test]
fn malformed_env_is_a_usage_error() {
    refuses(&["run", "-e", "BAD", "run.py"], "KEY=VALUE");
}

#[test]
fn env_names_that_hijack_the_runtime_are_named() {
    refuses(&["run", "-e", "LD_PRELOAD=x", "print(1)"], "LD_PRELOAD");
    refuses(&["run", "-e", "PYTHONPATH=/x", "print(1)"], "PYTHONPATH");
    // The review's driver hijacks: refused before any VM, naming the variable and why.
    refuses(
        &[
            "run",
            "-l",
            "raw",
            "-e",
            "__sbx_code=echo HIJACKED",
            "echo original",
        ],
        "`__sbx_code`: not allowed: it is reserved for the drivers' own variables",
    );
    refuses(
        &[
            "run",
            "-l",
            "raw",
            "-e",
            "__sbx_nl=@",
            "-e",
            "A=x@PATH=/nonexistent@B=1",
            "echo",
        ],
        "__sbx_nl",
    );
    refuses(&["run", "-e", "PS4=$(id)", "print(1)"], "every traced line");
    refuses(&["run", "-e", "https_proxy=x", "print(1)"], "proxy");
}

#[test]
fn a_missing_file_is_not_run_as_code() {
    refuses(
        &["run", "does-not-exist.py"],
        "no such file: `does-not-exist.py`",
    );
}

#[test]
fn a_file_with_an_unknown_extension_needs_a_language() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, "print(1)\n").unwrap();
    refuses(&["run", path.to_str().unwrap()], "hint: pass -l");
}

#[test]
fn an_empty_file_or_stdin_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.py");
    std::fs::write(&path, "").unwrap();
    refuses(&["run", path.to_str().unwrap()], "code is empty");
    refuses(&["run", "-"], "invalid source `-`");
    refuses(&["run", "-", "-"], "only once");
}

#[test]
fn out_of_range_numbers_are_refused() {
    refuses(&["run", "-t", "0", "print(1)"], "--timeout");
    refuses(&["run", "-m", "64", "print(1)"], "--memory");
    refuses(&["run", "-j", "0", "print(1)"], "--concurrency");
    refuses(&["run", "-l", "cobol", "print(1)"], "cobol");
}

#[test]
fn nothing_to_run_is_a_usage_error() {
    refuses(&["run"], "SOURCE");
    refuses(&["run", "-q", "--debug", "x"], "cannot be used with");
}

#[test]
fn bad_configuration_names_the_variable() {
    let cache = tempfile::tempdir().unwrap();
    sbx_offline(&cache)
        .env("EXEC_SANDBOX_MAX_CONCURRENT_VMS", "lots")
        .args(["run", "print(1)"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("EXEC_SANDBOX_MAX_CONCURRENT_VMS"))
        .stderr(predicate::str::contains("hint:"));
}

#[test]
fn version_and_help() {
    let cache = tempfile::tempdir().unwrap();
    sbx_offline(&cache)
        .arg("--version")
        .assert()
        .success()
        .stdout(predicate::str::starts_with(format!(
            "sbx {}",
            env!("CARGO_PKG_VERSION")
        )));
    sbx_offline(&cache)
        .args(["run", "--help"])
        .assert()
        .success()
        .stdout(predicate::str::contains("--concurrency"))
        .stdout(predicate::str::contains("124"));
}

#[test]
fn offline_without_assets_is_a_sandbox_error_with_json_on_stdout() {
    let cache = tempfile::tempdir().unwrap();
    let out = sbx_offline(&cache)
        .args(["run", "--json", "-q", "print(1)"])
        .timeout(Duration::from_secs(30))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let value: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(value["source"], "code[1]");
    assert_eq!(value["language"], "python");
    assert_eq!(value["error"]["kind"], "permanent");
    assert!(String::from_utf8_lossy(&out.stderr).contains("error:"));
}

#[test]
fn bad_uploads_and_downloads_are_refused_before_any_vm() {
    refuses(
        &["run", "--upload", "no-such-file.csv:data.csv", "print(1)"],
        "--upload: cannot read no-such-file.csv",
    );
    refuses(
        &["run", "--upload", "x:/etc/passwd", "print(1)"],
        "absolute",
    );
    refuses(&["run", "--download", "../escape", "print(1)"], "..");
    refuses(
        &[
            "run",
            "--download",
            "out.txt:/no/such/dir/out.txt",
            "print(1)",
        ],
        "does not exist",
    );
    refuses(
        &["run", "--download", "out.txt", "print(1)", "print(2)"],
        "exactly one source",
    );
}

#[test]
fn malformed_network_flags_are_usage_errors_naming_the_flag() {
    refuses(&["run", "--expose", "80/sctp", "print(1)"], "--expose");
    refuses(&["run", "--expose", "80/sctp", "print(1)"], "tcp or udp");
    refuses(&["run", "--expose", "abc", "print(1)"], "--expose");
    refuses(
        &["run", "--expose", "abc", "print(1)"],
        "INTERNAL[:EXTERNAL]",
    );
}

#[test]
fn network_limits_are_refused_before_any_vm() {
    refuses(&["run", "--expose", "80:80", "print(1)"], "--expose");
    refuses(&["run", "--expose", "80:80", "print(1)"], "1024");
    refuses(
        &["run", "--allow-domain", "bad_domain!", "print(1)"],
        "--allow-domain",
    );
    refuses(
        &["run", "--allow-domain", "bad_domain!", "print(1)"],
        "bad_domain!",
    );
    let ports: Vec<String> = (8001..=8011).map(|p| p.to_string()).collect();
    let mut args = vec!["run"];
    for port in &ports {
        args.extend(["--expose", port.as_str()]);
    }
    args.push("print(1)");
    refuses(&args, "invalid --expose: 11 ports, limit is 10");
    refuses(
        &[
            "run", "--expose", "8000", "--expose", "8000/tcp", "print(1)",
        ],
        "forwarded twice",
    );
    refuses(
        &[
            "run",
            "--expose",
            "8000:18000",
            "-c",
            "print(1)",
            "-c",
            "print(2)",
        ],
        "needs exactly one source",
    );
}

#[test]
fn network_flags_are_in_the_help() {
    let cache = tempfile::tempdir().unwrap();
    sbx_offline(&cache)
        .args(["run", "--help"])
        .assert()
        .success()
        .stdout(predicate::str::contains("--network"))
        .stdout(predicate::str::contains("--allow-domain <DOMAIN>"))
        .stdout(predicate::str::contains("implies --network"))
        .stdout(predicate::str::contains(
            "--expose <INTERNAL[:EXTERNAL][/PROTOCOL]>",
        ));
}
