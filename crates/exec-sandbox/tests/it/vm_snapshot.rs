//! L1 memory snapshots: restored runs are correct, clean and unique; bad snapshots are rebuilt.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use exec_sandbox::{
    ExecOptions, ExecutionResult, Language, RunOptions, Scheduler, SchedulerConfig, SessionOptions,
};

use crate::support::chain;

/// A scheduler with L1 on and its own snapshot cache (kept until the returned dir is dropped).
fn l1_scheduler() -> (Scheduler, tempfile::TempDir) {
    l1_scheduler_with(true)
}

/// [`l1_scheduler`], with standby clones on or off.
fn l1_scheduler_with(l1_standby: bool) -> (Scheduler, tempfile::TempDir) {
    let dir = tempfile::Builder::new()
        .prefix("sbx-l1-test-")
        .tempdir()
        .unwrap();
    let config = SchedulerConfig {
        l1_snapshots: true,
        l1_standby,
        snapshot_cache_dir: dir.path().to_path_buf(),
        warm_pool_size: 0,
        ..SchedulerConfig::from_env().unwrap()
    };
    (Scheduler::new(config).unwrap(), dir)
}

async fn run(s: &Scheduler, code: &str) -> ExecutionResult {
    s.run(RunOptions::new(Language::Python, code))
        .await
        .unwrap_or_else(|e| panic!("run failed: {}", chain(&e)))
}

/// Runs cold once and waits for the template saved after it.
async fn with_template(s: &Scheduler) {
    let r = run(s, "print('cold')").await;
    assert_eq!(r.stdout, "cold\n", "stderr: {}", r.stderr);
    assert!(!r.l1_cache_hit, "the first run of a fresh cache boots");
    s.wait_for_snapshots().await;
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect()
}

const PROBE: &str = "import os, random, time
print(os.urandom(32).hex())
print(random.random())
print(time.time())
print('defined' if 'leak' in globals() else 'clean')
print(open('/sys/devices/system/clocksource/clocksource0/current_clocksource').read().strip())
leak = 1";

#[tokio::test]
async fn restored_runs_are_correct_clean_unique_and_current() {
    let (s, dir) = l1_scheduler();
    with_template(&s).await;
    assert_eq!(entries(dir.path()).len(), 1, "one template saved");

    let mut seen = Vec::new();
    for _ in 0..2 {
        let r = run(&s, PROBE).await;
        assert!(r.l1_cache_hit, "restored from the template");
        assert_eq!(r.exit_code, 0, "stderr: {}", r.stderr);
        crate::support::assert_phases_add_up(&r);
        // A clone's interpreter was running in its template: nothing starts it.
        assert_eq!(r.timing.interpreter_start_ms, 0, "{:?}", r.timing);
        assert!(r.timing.vm_start_ms > 0, "{:?}", r.timing);
        let lines: Vec<&str> = r.stdout.lines().collect();
        assert_eq!(lines.len(), 5, "{}", r.stdout);
        assert_eq!(lines[0].len(), 64);
        assert_eq!(lines[3], "clean", "a name defined by an earlier run leaked");
        // Under TCG the template booted on the frequency it was given (`tsc_early_khz=`): a
        // clone does not switch clocksource (`images/kernel/boot-calibration.patch`).
        if r.accelerator.accelerator == exec_sandbox::Accelerator::Tcg {
            assert_eq!(lines[4], "tsc", "{:?}", r.accelerator);
        }
        let guest_time: f64 = lines[2].parse().unwrap();
        let host_time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            (host_time - guest_time).abs() < 5.0,
            "guest clock {guest_time} vs host {host_time}"
        );
        seen.push((lines[0].to_string(), lines[1].to_string()));
    }
    assert_ne!(seen[0].0, seen[1].0, "clones share os.urandom output");
    assert_ne!(seen[0].1, seen[1].1, "clones share random.random() state");
}

#[tokio::test]
async fn a_corrupt_snapshot_is_rejected_and_rebuilt() {
    let (s, dir) = l1_scheduler();
    with_template(&s).await;
    let entry = entries(dir.path()).pop().expect("a template");
    // Truncate the device state: it must never reach QEMU.
    let vmstate = entry.join("vmstate");
    let len = std::fs::metadata(&vmstate).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&vmstate)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    let r = run(&s, "print(6 * 7)").await;
    assert_eq!(r.stdout, "42\n", "stderr: {}", r.stderr);
    assert!(!r.l1_cache_hit, "a corrupt snapshot is not restored");
    s.wait_for_snapshots().await;
    let rebuilt = entries(dir.path());
    assert_eq!(rebuilt.len(), 1);
    assert_eq!(
        std::fs::metadata(rebuilt[0].join("vmstate")).unwrap().len(),
        len,
        "rebuilt in full"
    );
    let r = run(&s, "print(6 * 7)").await;
    assert_eq!(r.stdout, "42\n", "stderr: {}", r.stderr);
    assert!(r.l1_cache_hit, "the rebuilt snapshot is used");
}

#[tokio::test]
async fn javascript_clones_get_their_own_math_random() {
    let (s, _dir) = l1_scheduler();
    let js = |code: &str| RunOptions::new(Language::Javascript, code);
    let cold = s.run(js("console.log('cold')")).await.unwrap();
    assert_eq!(cold.stdout, "cold\n", "stderr: {}", cold.stderr);
    s.wait_for_snapshots().await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        let r = s
            .run(js("console.log(Math.random(), Math.random() < 1)"))
            .await
            .unwrap_or_else(|e| panic!("run failed: {}", chain(&e)));
        assert!(r.l1_cache_hit, "restored from the template");
        assert_eq!(r.exit_code, 0, "stderr: {}", r.stderr);
        assert!(r.stdout.ends_with(" true\n"), "{}", r.stdout);
        seen.push(r.stdout);
    }
    assert_ne!(seen[0], seen[1], "clones share Math.random state");
}

/// A template runs a reseed and the warm pool's primer before its snapshot, so a clone's first
/// execution finds the paths every execution takes in the guest's page cache: it reads nothing
/// from its disk. Before, python clones read parts of the interpreter there, under emulation at
/// the cost of a block device's whole path. JavaScript is left out: Bun's timer-driven
/// collection can run in a clone at any moment and read code the template never ran (CI saw 3
/// reads once, 0 otherwise), so its count depends on timing.
#[tokio::test]
async fn a_clones_first_execution_reads_nothing_from_its_disk() {
    let (s, _dir) = l1_scheduler();
    for (language, code) in [(Language::Python, "print(1)"), (Language::Raw, "echo 1")] {
        let cold = s
            .run(RunOptions::new(language, code))
            .await
            .unwrap_or_else(|e| panic!("{language} run failed: {}", chain(&e)));
        assert_eq!(cold.stdout, "1\n", "{language} stderr: {}", cold.stderr);
        assert!(!cold.l1_cache_hit, "the first run of a fresh cache boots");
        s.wait_for_snapshots().await;

        let session = s
            .session(SessionOptions::new(language))
            .await
            .unwrap_or_else(|e| panic!("{language} session failed: {}", chain(&e)));
        let first = session.exec(ExecOptions::new(code)).await.unwrap();
        assert_eq!(first.stdout, "1\n", "{language} stderr: {}", first.stderr);
        // Only a restored VM has a monitor to ask.
        assert_eq!(
            session.disk_reads().await,
            Some(0),
            "{language}: a clone's first execution read its disk"
        );
        if language == Language::Python {
            // The count is real: source files the interpreter never reads (it loads their
            // compiled bytecode) come from the disk.
            let read = session
                .exec(ExecOptions::new(
                    "import os\n\
                     d = '/usr/lib/python3.11/email'\n\
                     print(sum(len(open(os.path.join(d, f), 'rb').read()) \
                     for f in os.listdir(d) if f.endswith('.py')) > 0)",
                ))
                .await
                .unwrap();
            assert_eq!(read.stdout, "True\n", "stderr: {}", read.stderr);
            let reads = session.disk_reads().await.unwrap_or(0);
            assert!(
                reads > 0,
                "reading files from the disk counted {reads} reads"
            );
        }
        session.close().await;
    }
}

/// Waits until the scheduler has a standby clone whose QEMU runs, and returns its name.
async fn standby(s: &Scheduler) -> String {
    let mut found = None;
    crate::support::wait_until(
        "a standby clone",
        std::time::Duration::from_secs(30),
        || {
            found = s
                .standby_vms()
                .into_iter()
                .find(|name| crate::support::qemu_pid(name).is_some());
            found.is_some()
        },
    )
    .await;
    found.unwrap()
}

#[tokio::test]
async fn a_standby_clone_serves_the_next_restore_and_ends_with_the_scheduler() {
    let (s, _dir) = l1_scheduler();
    with_template(&s).await;
    assert!(s.standby_vms().is_empty(), "a cold boot starts no standby");
    let r = run(&s, "print(1)").await;
    assert!(r.l1_cache_hit);
    let first = standby(&s).await;

    // The next restore resumes that QEMU: it runs the code, is torn down with the run, and
    // another standby takes its place.
    let r = run(&s, PROBE).await;
    assert!(r.l1_cache_hit);
    assert_eq!(r.exit_code, 0, "stderr: {}", r.stderr);
    assert_eq!(r.stdout.lines().nth(3), Some("clean"), "{}", r.stdout);
    crate::support::assert_phases_add_up(&r);
    crate::support::wait_until(
        "the resumed standby's teardown",
        std::time::Duration::from_secs(10),
        || crate::support::qemu_pid(&first).is_none(),
    )
    .await;
    let second = standby(&s).await;
    assert_ne!(first, second);

    s.shutdown().await;
    assert!(s.standby_vms().is_empty());
    assert_eq!(
        crate::support::qemu_pid(&second),
        None,
        "killed on shutdown"
    );
}

#[tokio::test]
async fn a_standby_whose_template_ram_changed_is_never_resumed() {
    let (s, dir) = l1_scheduler();
    with_template(&s).await;
    assert!(run(&s, "print(1)").await.l1_cache_hit);
    let waiting = standby(&s).await;
    // What a compromised clone writing to the RAM file it was given would leave: a new
    // modification (and change) time.
    let entry = entries(dir.path()).pop().expect("a template");
    std::fs::File::options()
        .write(true)
        .open(entry.join("ram"))
        .unwrap()
        .set_modified(SystemTime::now() + std::time::Duration::from_secs(60))
        .unwrap();

    let r = run(&s, "print(6 * 7)").await;
    assert_eq!(r.stdout, "42\n", "stderr: {}", r.stderr);
    assert!(
        !r.l1_cache_hit,
        "neither the standby nor the entry is restored"
    );
    crate::support::wait_until(
        "the standby's end",
        std::time::Duration::from_secs(10),
        || crate::support::qemu_pid(&waiting).is_none(),
    )
    .await;
    s.shutdown().await;
}

#[tokio::test]
async fn without_standby_no_qemu_waits_ahead() {
    let (s, _dir) = l1_scheduler_with(false);
    with_template(&s).await;
    for _ in 0..2 {
        assert!(run(&s, "print(1)").await.l1_cache_hit);
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(s.standby_vms().is_empty());
}
