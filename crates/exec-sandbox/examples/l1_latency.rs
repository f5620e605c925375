//! Measures end-to-end `run()` latency of a trivial Python program: cold boots (L1 off) versus
//! runs restored from an L1 memory snapshot, through the library, sequentially.
//!
//! ```text
//! cargo run --release -p exec-sandbox --example l1_latency -- [runs]
//! ```

#![expect(clippy::print_stdout, reason = "a measurement tool prints its numbers")]

use std::time::Instant;

use exec_sandbox::{Language, RunOptions, Scheduler, SchedulerConfig};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index]
}

async fn measure(scheduler: &Scheduler, runs: usize, expect_l1: bool) -> Vec<f64> {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let r = scheduler
            .run(RunOptions::new(Language::Python, "print(1)"))
            .await
            .expect("run");
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(r.stdout, "1\n");
        assert_eq!(r.l1_cache_hit, expect_l1, "unexpected VM origin");
        println!(
            "  {} boot {} ms, execute {} ms, total {} ms",
            if expect_l1 { "l1  " } else { "cold" },
            r.timing.boot_ms,
            r.timing.execute_ms,
            r.timing.total_ms
        );
    }
    times.sort_by(f64::total_cmp);
    times
}

#[tokio::main]
async fn main() {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    let base = SchedulerConfig::from_env().expect("config");
    let cold = Scheduler::new(SchedulerConfig {
        l1_snapshots: false,
        ..base.clone()
    })
    .expect("scheduler");
    let l1 = Scheduler::new(SchedulerConfig {
        l1_snapshots: true,
        ..base
    })
    .expect("scheduler");
    let ready = l1.prefetch_snapshots().await.expect("snapshots");
    assert!(ready.contains(&Language::Python), "no Python snapshot");
    // One untimed run each: page cache and host verdict.
    measure(&cold, 1, false).await;
    measure(&l1, 1, true).await;
    let cold_ms = measure(&cold, runs, false).await;
    let l1_ms = measure(&l1, runs, true).await;
    for (name, t) in [("cold", &cold_ms), ("l1", &l1_ms)] {
        println!(
            "{name:>4}: p50 {:7.1} ms  p95 {:7.1} ms  min {:7.1} ms  ({} runs)",
            percentile(t, 0.5),
            percentile(t, 0.95),
            t[0],
            t.len()
        );
    }
    println!(
        "l1/cold p50 ratio: {:.3}",
        percentile(&l1_ms, 0.5) / percentile(&cold_ms, 0.5)
    );
}
