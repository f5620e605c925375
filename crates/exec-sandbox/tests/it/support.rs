//! Shared helpers for the integration tests.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use exec_sandbox::{ExecutionResult, Language, RunOptions, Scheduler, SchedulerConfig};

/// One scheduler for the whole test binary: assets are readied and the accelerator decided once.
/// Without standby clones: it outlives each test's async runtime (a standby is resumed only on
/// the runtime that started it, `snapshot/standby.rs`), and tests that count a process's QEMUs
/// count its runs'. `vm_snapshot` tests standbys with schedulers of their own.
pub fn scheduler() -> Scheduler {
    static SCHEDULER: OnceLock<Scheduler> = OnceLock::new();
    SCHEDULER
        .get_or_init(|| {
            let config = SchedulerConfig {
                l1_standby: false,
                ..SchedulerConfig::from_env().expect("test environment config")
            };
            Scheduler::new(config).expect("scheduler")
        })
        .clone()
}

/// Runs `code` and returns the result, panicking with the whole error chain on failure.
pub async fn run(language: Language, code: &str) -> ExecutionResult {
    run_with(RunOptions::new(language, code)).await
}

/// Runs `options` and returns the result, panicking with the whole error chain on failure.
pub async fn run_with(options: RunOptions) -> ExecutionResult {
    match scheduler().run(options).await {
        Ok(result) => result,
        Err(e) => panic!("run failed: {}", chain(&e)),
    }
}

/// The phases of `r.timing` fit together: setup holds the admission wait, boot is VM start plus
/// guest ready, execute holds the interpreter's start, and the whole call is the four in a row
/// (each figure is rounded down to the millisecond, and a few host steps sit between phases).
pub fn assert_phases_add_up(r: &ExecutionResult) {
    let t = &r.timing;
    assert!(t.admission_wait_ms <= t.setup_ms, "{t:?}");
    let parts = t.vm_start_ms + t.guest_ready_ms;
    assert!(parts <= t.boot_ms && t.boot_ms <= parts + 1, "{t:?}");
    assert!(t.interpreter_start_ms <= t.execute_ms, "{t:?}");
    let sum = t.setup_ms + t.boot_ms + t.execute_ms + t.teardown_ms;
    assert!(
        sum <= t.total_ms && t.total_ms <= sum + 10,
        "phases {sum} ms against {} ms in all: {t:?}",
        t.total_ms
    );
}

/// An error and all its sources on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// One output chunk and when it arrived.
type Chunk = (Instant, Vec<u8>);

/// Output chunks with the time each arrived.
#[derive(Clone, Default)]
pub struct Recorder(pub Arc<Mutex<Vec<Chunk>>>);

impl Recorder {
    pub fn callback(&self) -> impl Fn(&[u8]) + Send + Sync + 'static {
        let inner = self.0.clone();
        move |chunk: &[u8]| inner.lock().unwrap().push((Instant::now(), chunk.to_vec()))
    }

    pub fn first_at(&self) -> Option<Instant> {
        self.0.lock().unwrap().first().map(|(t, _)| *t)
    }
}

/// Polls `condition` every 50 ms until it holds, panicking with `what` after `timeout`.
pub async fn wait_until(
    what: &str,
    timeout: std::time::Duration,
    mut condition: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The pid of the live QEMU process started with `-name <name>`, found through /proc.
pub fn qemu_pid(name: &str) -> Option<u32> {
    exec_sandbox::testing::qemu_pid(name)
}

/// The outcome a probe script printed for `name` (its line `name: outcome`), panicking with the
/// whole result when there is none.
pub fn outcome<'a>(result: &'a ExecutionResult, name: &str) -> &'a str {
    let prefix = format!("{name}: ");
    result
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| {
            panic!(
                "no `{name}` line in:\n{}\nstderr: {}",
                result.stdout, result.stderr
            )
        })
}

/// Asserts that the probe `name` printed one of `expected`, showing the whole output otherwise.
pub fn expect_outcome(result: &ExecutionResult, name: &str, expected: &[&str]) {
    let got = outcome(result, name);
    assert!(
        expected.contains(&got),
        "{name}: got `{got}`, expected one of {expected:?}\nstdout:\n{}\nstderr: {}",
        result.stdout,
        result.stderr
    );
}
