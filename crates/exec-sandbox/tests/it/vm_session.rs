//! Sessions: state across executions, the rules that reset or close them, the idle timeout,
//! serialized executions.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use exec_sandbox::{
    Error, ErrorKind, ExecOptions, ExecutionResult, Language, Session, SessionCloseReason,
    SessionOptions,
};

use crate::support::{chain, qemu_pid, scheduler, wait_until};

async fn open(options: SessionOptions) -> Session {
    match scheduler().session(options).await {
        Ok(session) => session,
        Err(e) => panic!("session failed: {}", chain(&e)),
    }
}

async fn exec_with(session: &Session, options: ExecOptions) -> ExecutionResult {
    match session.exec(options).await {
        Ok(result) => result,
        Err(e) => panic!("exec failed: {}", chain(&e)),
    }
}

async fn exec(session: &Session, code: &str) -> ExecutionResult {
    exec_with(session, ExecOptions::new(code)).await
}

/// Runs `code` and asserts its stdout and exit code.
async fn expect(session: &Session, code: &str, stdout: &str, exit_code: i32) {
    let r = exec(session, code).await;
    assert_eq!(
        (r.stdout.as_str(), r.exit_code),
        (stdout, exit_code),
        "{code:?}: stderr: {}",
        r.stderr
    );
}

fn assert_closed(result: Result<ExecutionResult, Error>, reason: &SessionCloseReason) {
    match result {
        Err(Error::SessionClosed { reason: r }) => assert_eq!(&r, reason),
        other => panic!("expected a session-closed error, got {other:?}"),
    }
}

#[tokio::test]
async fn python_state_survives_errors_and_exits_and_is_lost_on_restart() {
    let s = open(SessionOptions::new(Language::Python)).await;
    expect(&s, "import math\nx = 41\nclass C: pass", "", 0).await;
    expect(&s, "print(math.floor(x + 1.5), C.__name__)", "42 C\n", 0).await;
    expect(&s, "import sys; sys.exit(3)", "", 3).await;
    let r = exec(&s, "raise ValueError('boom')").await;
    assert_eq!(r.exit_code, 1);
    assert!(r.stderr.contains("ValueError: boom"), "{}", r.stderr);
    let r = exec(&s, "x = (").await;
    assert_eq!(r.exit_code, 1);
    assert!(r.stderr.contains("SyntaxError"), "{}", r.stderr);
    expect(&s, "print(x)", "41\n", 0).await;

    // The interpreter ends: state lost, the session goes on.
    expect(&s, "import os; os._exit(1)", "", 1).await;
    expect(&s, "print('x' in globals())", "False\n", 0).await;
    expect(&s, "y = 5", "", 0).await;
    let r = exec_with(
        &s,
        ExecOptions::new("import time; time.sleep(60)").timeout_seconds(1),
    )
    .await;
    assert_eq!((r.exit_code, r.timed_out), (-1, true), "{}", r.stderr);
    expect(&s, "print('y' in globals())", "False\n", 0).await;
    assert_eq!(s.exec_count(), 11);
    assert!(s.close_reason().is_none());

    // SIGKILL (what the OOM killer sends) closes the session and destroys the VM; an exec
    // queued behind it does not run.
    let name = s.vm_name().to_string();
    let (killed, queued) = tokio::join!(
        exec(&s, "import os, signal; os.kill(os.getpid(), 9)"),
        s.exec(ExecOptions::new("print('ran')"))
    );
    assert_eq!(killed.exit_code, 137, "{}", killed.stderr);
    assert_closed(queued, &SessionCloseReason::Killed);
    assert_eq!(s.close_reason(), Some(SessionCloseReason::Killed));
    assert!(qemu_pid(&name).is_none(), "the VM is destroyed");
    let err = s.exec(ExecOptions::new("print(1)")).await;
    assert!(matches!(&err, Err(e) if e.kind() == ErrorKind::Permanent));
    assert_closed(err, &SessionCloseReason::Killed);
    assert_eq!(s.exec_count(), 12);
}

#[tokio::test]
async fn javascript_state_persists_and_close_destroys_the_vm() {
    let s = open(SessionOptions::new(Language::Javascript)).await;
    expect(
        &s,
        "const base: number = 41;\nfunction next(n: number) { return n + 1; }",
        "",
        0,
    )
    .await;
    expect(&s, "console.log(next(base))", "42\n", 0).await;
    let name = s.vm_name().to_string();
    assert!(qemu_pid(&name).is_some());
    s.close().await;
    assert!(qemu_pid(&name).is_none(), "close destroys the VM");
    assert_closed(
        s.exec(ExecOptions::new("console.log(1)")).await,
        &SessionCloseReason::Closed,
    );
}

#[tokio::test]
async fn javascript_imports_and_requires_resolve_from_the_working_directory() {
    let s = open(SessionOptions::new(Language::Javascript)).await;
    expect(
        &s,
        "const fs = await import('node:fs');\n\
         fs.writeFileSync('esm.mjs', 'export const v = 40;');\n\
         fs.writeFileSync('cjs.cjs', 'module.exports = 2;');",
        "",
        0,
    )
    .await;
    // Relative specifiers resolve from /home/user, not from the driver's directory; code that
    // names neither word skips the scan and still runs.
    expect(
        &s,
        "const { v } = await import('./esm.mjs'); console.log(v + require('./cjs.cjs'))",
        "42\n",
        0,
    )
    .await;
    expect(&s, "console.log(process.cwd())", "/home/user\n", 0).await;
    s.close().await;
}

#[tokio::test]
async fn bash_variables_functions_and_cwd_persist() {
    let s = open(SessionOptions::new(Language::Raw).env("GREETING", "hi")).await;
    expect(&s, "v=5; g() { echo \"g:$1\"; }; cd /tmp", "", 0).await;
    expect(
        &s,
        "echo $v; g y; pwd; echo $GREETING",
        "5\ng:y\n/tmp\nhi\n",
        0,
    )
    .await;
    let r = exec_with(&s, ExecOptions::new("echo $GREETING").env("GREETING", "yo")).await;
    assert_eq!(r.stdout, "yo\n", "an execution's variable wins");
}

/// Generous bounds for waits on a VM under software emulation; reaching one is a failure.
const CLOSE_DEADLINE: Duration = Duration::from_secs(60);

/// Waits until `session` has closed by itself and its VM is gone.
async fn wait_closed_by_idle(session: &Session) {
    let name = session.vm_name().to_string();
    wait_until("the idle session to close", CLOSE_DEADLINE, || {
        session.close_reason().is_some()
    })
    .await;
    wait_until("the idle session's VM to go", CLOSE_DEADLINE, || {
        qemu_pid(&name).is_none()
    })
    .await;
}

#[tokio::test]
async fn idle_timeout_closes_and_is_suspended_during_an_operation() {
    let idle = Duration::from_secs(2);
    let s = open(SessionOptions::new(Language::Python).idle_timeout_unchecked(idle)).await;
    expect(&s, "x = 1", "", 0).await;
    // An execution three times as long as the idle timeout: the timer is suspended while it
    // runs, so the session is still open when it ends, and its state with it.
    expect(&s, "import time; time.sleep(6); print(x)", "1\n", 0).await;
    assert_eq!(s.close_reason(), None, "closed during an operation");
    expect(&s, "print(x)", "1\n", 0).await;
    // Left alone, it closes by itself.
    wait_closed_by_idle(&s).await;
    assert_eq!(
        s.close_reason(),
        Some(SessionCloseReason::IdleTimeout { after: idle })
    );
    assert_closed(
        s.exec(ExecOptions::new("print(x)")).await,
        &SessionCloseReason::IdleTimeout { after: idle },
    );
}

#[tokio::test]
async fn concurrent_execs_run_one_after_the_other_and_state_survives_idle() {
    // `s` keeps the state; `clock` has a short idle timeout and is opened after `s`'s last
    // execution, so when `clock` has closed by itself, `s` has been idle at least that long.
    let s = open(SessionOptions::new(Language::Python)).await;
    expect(&s, "import time\nkept = 'still here'", "", 0).await;
    let seen = Arc::new(Mutex::new(String::new()));
    let printer = |letter: char| {
        let seen = seen.clone();
        ExecOptions::new(format!(
            "for _ in range(5):\n    print('{letter}', flush=True)\n    time.sleep(0.2)"
        ))
        .on_stdout(move |chunk| {
            seen.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(chunk))
        })
    };
    let (a, b) = tokio::join!(exec_with(&s, printer('a')), exec_with(&s, printer('b')));
    assert_eq!(a.stdout, "a\n".repeat(5));
    assert_eq!(b.stdout, "b\n".repeat(5));
    let order: String = seen.lock().unwrap().split_whitespace().collect();
    assert!(
        order == "aaaaabbbbb" || order == "bbbbbaaaaa",
        "interleaved: {order}"
    );

    let clock =
        open(SessionOptions::new(Language::Raw).idle_timeout_unchecked(Duration::from_secs(3)))
            .await;
    wait_closed_by_idle(&clock).await;
    expect(&s, "print(kept)", "still here\n", 0).await;
    assert_eq!(s.exec_count(), 4);
}
