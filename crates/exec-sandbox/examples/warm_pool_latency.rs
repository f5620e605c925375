//! Measures end-to-end `run()` latency of a trivial Python program taken by a warm-pool VM
//! versus runs that skip the pool (a non-default memory size: they boot cold, or restore an L1
//! snapshot where one exists), through the library, sequentially, and the PSS of an idle
//! warm VM.
//!
//! ```text
//! cargo run --release -p exec-sandbox --example warm_pool_latency -- [runs]
//! ```

#![expect(clippy::print_stdout, reason = "a measurement tool prints its numbers")]

use std::time::{Duration, Instant};

use exec_sandbox::{Language, RunOptions, Scheduler, SchedulerConfig, WarmVm};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index]
}

async fn wait_for_warm_vm(scheduler: &Scheduler) -> WarmVm {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(vm) = scheduler
            .warm_pool_vms()
            .into_iter()
            .find(|vm| vm.language == Language::Python)
        {
            return vm;
        }
        assert!(Instant::now() < deadline, "the pool did not refill");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::main]
async fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    let config = SchedulerConfig {
        warm_pool_size: 1,
        ..SchedulerConfig::from_env().expect("config")
    };
    let other_memory = config.default_memory_mb + 64;
    let scheduler = Scheduler::new(config).expect("scheduler");
    let mut warm = Vec::with_capacity(runs);
    let mut other = Vec::with_capacity(runs);
    let mut pss = Vec::new();
    for i in 0..=runs {
        let idle = wait_for_warm_vm(&scheduler).await;
        pss.extend(idle.pss_mb);
        let started = Instant::now();
        let r = scheduler
            .run(RunOptions::new(Language::Python, "print(1)"))
            .await
            .expect("run");
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        assert!(r.warm_pool_hit && r.stdout == "1\n");
        println!(
            "  warm  boot {} ms, execute {} ms, total {ms:.1} ms",
            r.timing.boot_ms, r.timing.execute_ms
        );
        let started = Instant::now();
        let r = scheduler
            .run(RunOptions::new(Language::Python, "print(1)").memory_mb(other_memory))
            .await
            .expect("run");
        let other_ms = started.elapsed().as_secs_f64() * 1000.0;
        let origin = if r.l1_cache_hit { "l1  " } else { "cold" };
        println!(
            "  {origin}  boot {} ms, execute {} ms, total {other_ms:.1} ms",
            r.timing.boot_ms, r.timing.execute_ms
        );
        // The first round warms the page cache and the host verdict: not counted.
        if i > 0 {
            warm.push(ms);
            other.push(other_ms);
        }
    }
    warm.sort_by(f64::total_cmp);
    other.sort_by(f64::total_cmp);
    for (name, t) in [("warm", &warm), ("other", &other)] {
        println!(
            "{name:>5}: p50 {:7.1} ms  p95 {:7.1} ms  min {:7.1} ms  ({} runs)",
            percentile(t, 0.5),
            percentile(t, 0.95),
            t[0],
            t.len()
        );
    }
    println!(
        "warm/other p50 ratio: {:.3}; idle warm VM PSS: {pss:?} MB",
        percentile(&warm, 0.5) / percentile(&other, 0.5)
    );
    scheduler.shutdown().await;
}
