//! Admission control with real VMs: a memory budget for two VMs, a queue, a deadline.

use std::time::{Duration, Instant};

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
    for (i, task) in tasks.into_iter().enumerate() {
        let r = task
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{}", chain(&e)));
        assert_eq!(r.stdout, format!("run-{i}\n"));
    }
    assert_eq!(s.peak_vms(), 2, "the budget fits exactly two VMs");
}

#[tokio::test]
async fn a_run_not_admitted_before_its_deadline_gets_a_capacity_error() {
    let s = budgeted(400, 1);
    let started = Instant::now();
    let runs: Vec<_> = (0..2)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                s.run(RunOptions::new(Language::Raw, "sleep 3; echo done"))
                    .await
            })
        })
        .collect();
    let mut ok = 0;
    let mut refused = 0;
    for run in runs {
        match run.await.unwrap() {
            Ok(r) => {
                assert_eq!(r.stdout, "done\n");
                ok += 1;
            }
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Transient, "{}", chain(&e));
                let Error::Capacity(capacity) = &e else {
                    panic!("expected a capacity error: {}", chain(&e));
                };
                assert!(capacity.waited >= Duration::from_secs(1), "{capacity}");
                assert!(e.hint().is_some());
                refused += 1;
            }
        }
    }
    assert_eq!((ok, refused), (1, 1));
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(s.peak_vms(), 1);
}
