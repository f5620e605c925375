//! Admission control with real VMs: a memory budget for two VMs, a queue, a deadline.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use exec_sandbox::{Error, ErrorKind, Language, RunOptions, Scheduler, SchedulerConfig};

use crate::support::chain;

/// A VM at the default 256 MB costs 350 MB under TCG (286 MB under KVM): 800 MB fits two.
fn budgeted(memory_budget_mb: u64, admission_timeout_seconds: u64) -> Scheduler {
    let config = SchedulerConfig {
        memory_budget_mb: Some(memory_budget_mb),
        admission_timeout_seconds,
        warm_pool_size: 0,
        max_concurrent_vms: 10,
        ..SchedulerConfig::from_env().unwrap()
    };
    Scheduler::new(config).unwrap()
}

#[tokio::test]
async fn a_burst_queues_within_the_budget_and_all_runs_succeed() {
    let s = budgeted(800, 120);
    let tasks: Vec<_> = (0..5)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                s.run(RunOptions::new(
                    Language::Raw,
                    format!("sleep 0.5; echo run-{i}"),
                ))
                .await
            })
        })
        .collect();
    let mut waits = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        let r = task
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{}", chain(&e)));
        assert_eq!(r.stdout, format!("run-{i}\n"));
        crate::support::assert_phases_add_up(&r);
        waits.push(r.timing.admission_wait_ms);
    }
    assert_eq!(s.peak_vms(), 2, "the budget fits exactly two VMs");
    // Five runs of at least half a second each, two at a time: three waited for a VM to end.
    waits.sort_unstable();
    assert!(
        waits[2] >= 400,
        "admission waits {waits:?}: three runs should have queued"
    );
}

#[tokio::test]
async fn a_run_not_admitted_before_its_deadline_gets_a_capacity_error() {
    let s = budgeted(400, 1);
    // Each run takes a number when it ends: the refused one must end while the admitted one
    // still holds the budget (its program runs for 3 s), not after it.
    let finished = Arc::new(AtomicUsize::new(0));
    let runs: Vec<_> = (0..2)
        .map(|_| {
            let s = s.clone();
            let finished = finished.clone();
            tokio::spawn(async move {
                let result = s
                    .run(RunOptions::new(Language::Raw, "sleep 3; echo done"))
                    .await;
                (result, finished.fetch_add(1, Ordering::SeqCst))
            })
        })
        .collect();
    let mut ok = Vec::new();
    let mut refused = Vec::new();
    for run in runs {
        match run.await.unwrap() {
            (Ok(r), rank) => {
                assert_eq!(r.stdout, "done\n");
                ok.push(rank);
            }
            (Err(e), rank) => {
                assert_eq!(e.kind(), ErrorKind::Transient, "{}", chain(&e));
                let Error::Capacity(capacity) = &e else {
                    panic!("expected a capacity error: {}", chain(&e));
                };
                assert!(capacity.waited >= Duration::from_secs(1), "{capacity}");
                assert!(e.hint().is_some());
                refused.push(rank);
            }
        }
    }
    assert_eq!(
        (ok, refused),
        (vec![1], vec![0]),
        "(admitted, refused) by the order they ended"
    );
    assert_eq!(s.peak_vms(), 1);
}
