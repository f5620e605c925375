//! Signals to PID 1 (the guest agent, root): the sandbox user may not signal it, and signalling
//! every process it may (`kill -1`) ends only its own; the run still returns its result and a
//! session's next execution still runs.

use exec_sandbox::{ExecOptions, ExecutionResult, Language, Session, SessionOptions};

use crate::support::{chain, expect_outcome, run, scheduler};

/// Signals PID 1 with each signal, one line per attempt (`kill -<SIG> 1: <outcome>`).
const KILL_PID_1: &str = r#"
for sig in KILL STOP TERM INT HUP SEGV ABRT USR1 CONT; do
    if err=$(kill -s $sig 1 2>&1); then echo "kill -$sig 1: SENT"; else echo "kill -$sig 1: refused (${err##*- })"; fi
done
"#;

const SIGNALS: &[&str] = &[
    "KILL", "STOP", "TERM", "INT", "HUP", "SEGV", "ABRT", "USR1", "CONT",
];

fn expect_pid_1_refused(r: &ExecutionResult) {
    for sig in SIGNALS {
        expect_outcome(
            r,
            &format!("kill -{sig} 1"),
            &["refused (Operation not permitted)"],
        );
    }
}

#[tokio::test]
async fn pid_1_refuses_every_signal_and_the_run_returns() {
    let script = format!(
        "{KILL_PID_1}\nkill -9 -1; echo \"kill -9 -1: rc $?\"\nkill -STOP -1; echo \"kill -STOP -1: rc $?\"\necho 'after: alive'"
    );
    let r = run(Language::Raw, &script).await;
    assert_eq!(r.exit_code, 0, "{r:?}");
    expect_pid_1_refused(&r);
    // `kill -1` reaches the caller's own processes only (never PID 1, never itself).
    expect_outcome(&r, "kill -9 -1", &["rc 0"]);
    expect_outcome(&r, "kill -STOP -1", &["rc 0"]);
    expect_outcome(&r, "after", &["alive"]);

    let python = r#"
import os, signal
for sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGTERM, signal.SIGSEGV):
    try:
        os.kill(1, sig)
        print("os.kill(1, %s): SENT" % sig.name)
    except OSError as e:
        print("os.kill(1, %s): refused (%s)" % (sig.name, os.strerror(e.errno)))
os.kill(-1, signal.SIGKILL)
print("after: alive", flush=True)
"#;
    let r = run(Language::Python, python).await;
    assert_eq!(r.exit_code, 0, "{r:?}");
    for sig in ["SIGKILL", "SIGSTOP", "SIGTERM", "SIGSEGV"] {
        expect_outcome(
            &r,
            &format!("os.kill(1, {sig})"),
            &["refused (Operation not permitted)"],
        );
    }
    expect_outcome(&r, "after", &["alive"]);
}

async fn open(language: Language) -> Session {
    scheduler()
        .session(SessionOptions::new(language))
        .await
        .unwrap_or_else(|e| panic!("session: {}", chain(&e)))
}

async fn exec(session: &Session, code: &str) -> ExecutionResult {
    session
        .exec(ExecOptions::new(code))
        .await
        .unwrap_or_else(|e| panic!("exec {code:?}: {}", chain(&e)))
}

#[tokio::test]
async fn a_session_goes_on_after_signals_to_pid_1() {
    let s = open(Language::Raw).await;
    assert_eq!(exec(&s, "kept=yes").await.exit_code, 0);
    let r = exec(&s, KILL_PID_1).await;
    assert_eq!(r.exit_code, 0, "{r:?}");
    expect_pid_1_refused(&r);
    let r = exec(&s, "kill -9 -1; echo \"kill -9 -1: rc $?\"").await;
    expect_outcome(&r, "kill -9 -1", &["rc 0"]);
    let r = exec(&s, "echo \"next: $kept\"").await;
    assert_eq!(
        (r.stdout.as_str(), r.exit_code),
        ("next: yes\n", 0),
        "{r:?}"
    );
    assert!(s.close_reason().is_none(), "{:?}", s.close_reason());
    s.close().await;

    let s = open(Language::Python).await;
    assert_eq!(exec(&s, "kept = 'yes'").await.exit_code, 0);
    let r = exec(
        &s,
        r#"
import os, signal
for sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGTERM):
    try:
        os.kill(1, sig)
        print("os.kill(1, %s): SENT" % sig.name)
    except OSError as e:
        print("os.kill(1, %s): refused (%s)" % (sig.name, os.strerror(e.errno)))
os.kill(-1, signal.SIGKILL)
os.kill(-1, signal.SIGSTOP)
print("kill -1: done")
"#,
    )
    .await;
    for sig in ["SIGKILL", "SIGSTOP", "SIGTERM"] {
        expect_outcome(
            &r,
            &format!("os.kill(1, {sig})"),
            &["refused (Operation not permitted)"],
        );
    }
    expect_outcome(&r, "kill -1", &["done"]);
    let r = exec(&s, "print('next:', kept)").await;
    assert_eq!(
        (r.stdout.as_str(), r.exit_code),
        ("next: yes\n", 0),
        "{r:?}"
    );
    assert!(s.close_reason().is_none(), "{:?}", s.close_reason());
    s.close().await;
}

/// Code that stops its own process group (the interpreter with it) hangs only itself: the
/// timeout still ends the execution (SIGKILL reaches stopped processes), and a session's next
/// execution runs in a fresh interpreter.
#[tokio::test]
async fn an_interpreter_that_stops_itself_ends_at_the_timeout() {
    let r = crate::support::run_with(
        exec_sandbox::RunOptions::new(Language::Raw, "echo before; kill -STOP 0; echo after")
            .timeout_seconds(2),
    )
    .await;
    assert_eq!((r.exit_code, r.timed_out), (-1, true), "{r:?}");
    assert_eq!(r.stdout, "before\n", "{r:?}");

    let s = open(Language::Python).await;
    let r = s
        .exec(
            ExecOptions::new("import os, signal\nos.kill(0, signal.SIGSTOP)\nprint('after')")
                .timeout_seconds(2),
        )
        .await
        .unwrap_or_else(|e| panic!("exec: {}", chain(&e)));
    assert_eq!((r.exit_code, r.timed_out), (-1, true), "{r:?}");
    assert_eq!(r.stdout, "", "{r:?}");
    let r = exec(&s, "print('next')").await;
    assert_eq!((r.stdout.as_str(), r.exit_code), ("next\n", 0), "{r:?}");
    s.close().await;
}
