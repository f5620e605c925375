//! Timeouts, concurrency limits and cleanup (output caps: attack_exhaustion).

use std::time::{Duration, Instant};

use exec_sandbox::{Error, ErrorKind, Language, RunOptions, Scheduler, SchedulerConfig};

use crate::support::{chain, run_with};

#[tokio::test]
async fn timeout_returns_minus_one_within_grace() {
    let started = Instant::now();
    let r =
        run_with(RunOptions::new(Language::Python, "while True: pass").timeout_seconds(2)).await;
    let elapsed = started.elapsed();
    assert_eq!(r.exit_code, -1);
    assert!(r.timed_out);
    assert!(
        r.stderr.to_lowercase().contains("timed out"),
        "{}",
        r.stderr
    );
    // Ended by the guest's deadline, before the host's own (timeout + 5 s); the wall time
    // adds the boot and any wait for admission, so it only bounds a hang.
    assert!(r.timing.execute_ms < 7_000, "{:?}", r.timing);
    assert!(elapsed < Duration::from_secs(60), "took {elapsed:?}");
}

#[tokio::test]
async fn timeout_kills_background_children_too() {
    let r =
        run_with(RunOptions::new(Language::Raw, "sleep 100 & sleep 100 & wait").timeout_seconds(1))
            .await;
    assert_eq!(r.exit_code, -1);
}

#[tokio::test]
async fn more_runs_than_slots_all_succeed() {
    let config = SchedulerConfig {
        max_concurrent_vms: 2,
        ..SchedulerConfig::from_env().unwrap()
    };
    let scheduler = Scheduler::new(config).unwrap();
    let mut tasks = Vec::new();
    for i in 0..4 {
        let s = scheduler.clone();
        tasks.push(tokio::spawn(async move {
            s.run(RunOptions::new(Language::Raw, format!("echo run-{i}")))
                .await
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        let r = task
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{}", chain(&e)));
        assert_eq!(r.stdout, format!("run-{i}\n"));
    }
}

#[tokio::test]
async fn bad_env_is_rejected_before_boot() {
    // Nothing can start with this scheduler: no QEMU, and an empty cache it may not fill. A run
    // that got past validation fails on the missing assets instead, as the good one shows.
    let cache = tempfile::tempdir().unwrap();
    let s = Scheduler::new(SchedulerConfig {
        qemu_binary: Some("/nonexistent/qemu".into()),
        offline: true,
        cache_dir: cache.path().into(),
        images_dir: cache.path().join("images"),
        snapshot_cache_dir: cache.path().join("snapshots"),
        ..SchedulerConfig::from_env().unwrap()
    })
    .unwrap();
    let err = s
        .run(RunOptions::new(Language::Python, "print(1)").env("PYTHONPATH", "/tmp"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Validation(_)), "{}", chain(&err));
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(chain(&err).contains("PYTHONPATH"));
    let err = s
        .run(RunOptions::new(Language::Python, "print(1)"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Asset(_)), "{}", chain(&err));
}
