//! Running code in each language: output, exit codes, streaming, environment.

use std::time::{Duration, Instant};

use exec_sandbox::{Language, RunOptions};

use crate::support::{Recorder, assert_phases_add_up, run, run_with};

#[tokio::test]
async fn python_hello() {
    let r = run(Language::Python, "print('Hello from sandbox')").await;
    assert_eq!(r.stdout, "Hello from sandbox\n", "stderr: {}", r.stderr);
    assert_eq!(r.exit_code, 0);
    assert!(!r.timed_out);
    assert!(r.execution_time_ms.is_some());
    assert_phases_add_up(&r);
}

/// A cold boot: the VM start is the kernel and the agent, and the interpreter starts inside
/// the execution.
#[tokio::test]
async fn a_cold_run_reports_where_its_time_went() {
    let s = exec_sandbox::Scheduler::new(exec_sandbox::SchedulerConfig {
        l1_snapshots: false,
        warm_pool_size: 0,
        ..exec_sandbox::SchedulerConfig::from_env().unwrap()
    })
    .unwrap();
    let r = s
        .run(RunOptions::new(Language::Python, "print(1)"))
        .await
        .unwrap();
    assert_eq!(r.stdout, "1\n", "stderr: {}", r.stderr);
    assert!(!r.l1_cache_hit && !r.warm_pool_hit);
    assert_phases_add_up(&r);
    let t = r.timing;
    assert!(t.vm_start_ms > 0, "{t:?}");
    assert!(r.external_cpu_time_ms.is_some_and(|ms| ms > 0), "{r:?}");
    assert!(
        t.interpreter_start_ms > 0,
        "a cold VM starts its interpreter: {t:?}"
    );
}

#[tokio::test]
async fn javascript_typescript_and_top_level_await() {
    let r = run(
        Language::Javascript,
        "const x: number = 6 * 7;\nawait new Promise((r) => setTimeout(r, 20));\nconsole.log(x);",
    )
    .await;
    assert_eq!(r.stdout, "42\n", "stderr: {}", r.stderr);
    assert_eq!(r.exit_code, 0);
}

#[tokio::test]
async fn javascript_on_an_emulated_cpu_runs_without_jscs_top_jit_tier() {
    // The environment the interpreter started with (Bun refuses to start on a `BUN_JSC_`
    // option JavaScriptCore does not know, so a misspelt one fails every JavaScript test).
    let r = run(
        Language::Javascript,
        "console.log(process.env.BUN_JSC_useFTLJIT ?? 'unset');",
    )
    .await;
    assert_eq!(r.exit_code, 0, "stderr: {}", r.stderr);
    let expected = match r.accelerator.accelerator {
        exec_sandbox::Accelerator::Tcg => "0\n",
        _ => "unset\n",
    };
    assert_eq!(r.stdout, expected, "{:?}", r.accelerator);
}

#[tokio::test]
async fn raw_shell_runs_as_uid_1000() {
    let r = run(Language::Raw, "echo $((6*7)); id -u; id -g").await;
    assert_eq!(r.stdout, "42\n1000\n1000\n", "stderr: {}", r.stderr);
    assert_eq!(r.exit_code, 0);
}

#[tokio::test]
async fn exit_codes_are_the_programs_own() {
    let r = run(Language::Python, "import sys; sys.exit(3)").await;
    assert_eq!(r.exit_code, 3);
    let r = run(Language::Raw, "exit 7").await;
    assert_eq!(r.exit_code, 7);
    let r = run(Language::Javascript, "process.exit(5)").await;
    assert_eq!(r.exit_code, 5);
}

#[tokio::test]
async fn killed_by_signal_is_128_plus_n() {
    let r = run(
        Language::Python,
        "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    )
    .await;
    assert_eq!(r.exit_code, 128 + 9);
    let r = run(Language::Raw, "kill -SEGV $$").await;
    assert_eq!(r.exit_code, 128 + 11);
}

#[tokio::test]
async fn stderr_and_exceptions_are_captured() {
    let r = run(
        Language::Python,
        "import sys\nprint('to err', file=sys.stderr)\nraise ValueError('boom')",
    )
    .await;
    assert_eq!(r.exit_code, 1);
    assert!(r.stderr.contains("to err"), "{}", r.stderr);
    assert!(r.stderr.contains("ValueError: boom"), "{}", r.stderr);
    assert_eq!(r.stdout, "");
}

#[tokio::test]
async fn stdin_is_empty() {
    let r = run(
        Language::Python,
        "import sys; print(repr(sys.stdin.read()))",
    )
    .await;
    assert_eq!(r.stdout, "''\n", "stderr: {}", r.stderr);
    let r = run(
        Language::Raw,
        "if read -r line; then echo got; else echo eof; fi",
    )
    .await;
    assert_eq!(r.stdout, "eof\n", "stderr: {}", r.stderr);
}

#[tokio::test]
async fn env_vars_are_applied() {
    let r = run_with(
        RunOptions::new(
            Language::Python,
            "import os; print(os.environ['GREETING'], os.environ['TABBED'])",
        )
        .env("GREETING", "hello")
        .env("TABBED", "a\tb"),
    )
    .await;
    assert_eq!(r.stdout, "hello a\tb\n", "stderr: {}", r.stderr);
    let r = run_with(RunOptions::new(Language::Raw, "echo \"$ANSWER\"").env("ANSWER", "42")).await;
    assert_eq!(r.stdout, "42\n");
}

#[tokio::test]
async fn output_streams_before_completion() {
    let stdout = Recorder::default();
    let options = RunOptions::new(
        Language::Python,
        "import time\nprint('first', flush=True)\ntime.sleep(2)\nprint('second')",
    )
    .on_stdout(stdout.callback());
    let result = run_with(options).await;
    let finished = Instant::now();
    assert_eq!(result.stdout, "first\nsecond\n");
    let first = stdout.first_at().expect("a chunk arrived");
    assert!(
        finished.duration_since(first) >= Duration::from_millis(1500),
        "first chunk arrived only {:?} before the end",
        finished.duration_since(first)
    );
}

#[tokio::test]
async fn result_names_the_accelerator_and_why() {
    let r = run(Language::Raw, "true").await;
    assert!(!r.accelerator.reason.is_empty());
    if std::env::var("EXEC_SANDBOX_FORCE_EMULATION").as_deref() == Ok("1") {
        assert_eq!(r.accelerator.accelerator, exec_sandbox::Accelerator::Tcg);
    }
    let json = serde_json::to_value(&r).unwrap();
    assert!(json["accelerator"]["name"].is_string(), "{json}");
    assert!(json["accelerator"]["reason"].is_string(), "{json}");
}
