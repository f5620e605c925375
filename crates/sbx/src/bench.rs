//! `sbx bench`: end-to-end latency of a trivial program per language, cold, restored from an L1
//! memory snapshot and taken from the warm pool, against the host's own `python3 -c pass`
//! measured in the same invocation. A measurement command, never a pass/fail test.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use exec_sandbox::{Language, RunOptions, Scheduler, SchedulerConfig};
use serde::Serialize;

use crate::cli::BenchArgs;
use crate::status::{self, UsageError};
use crate::{output, term};

/// How long to wait for the warm pool to refill before giving up on a sample.
const POOL_REFILL_DEADLINE: Duration = Duration::from_secs(120);

/// p50 and p95 of a set of samples, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 95th percentile (nearest rank).
    pub p95: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `samples` (milliseconds); `None` when there are none.
    pub fn of(samples: &[f64]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            let index = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
            round1(sorted[index])
        };
        Some(Self {
            p50: rank(0.50),
            p95: rank(0.95),
        })
    }
}

/// Everything measured for one language.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LanguageReport {
    /// Fresh boot per run (no pool, no snapshot).
    pub cold_ms: Option<Percentiles>,
    /// Restored from the language's L1 memory snapshot.
    pub l1_ms: Option<Percentiles>,
    /// Taken from a full warm pool.
    pub warm_ms: Option<Percentiles>,
    /// Runs per second at concurrency = host cores, using L1.
    pub throughput_rps: Option<f64>,
    /// Host memory (PSS) of one idle warm VM.
    pub idle_vm_pss_mb: Option<f64>,
}

/// The whole report, as printed by `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Host facts.
    pub host: BTreeMap<String, serde_json::Value>,
    /// The in-process baseline.
    pub baseline: BTreeMap<String, Percentiles>,
    /// Per language.
    #[serde(flatten)]
    pub languages: BTreeMap<String, LanguageReport>,
    /// Ratios to the baseline and between paths.
    pub ratios: BTreeMap<String, f64>,
}

/// Runs `sbx bench` and returns the exit status.
pub async fn bench(args: BenchArgs) -> u8 {
    let base = match SchedulerConfig::from_env() {
        Ok(config) => config,
        Err(e) => {
            output::print_usage_error(
                &UsageError::new(e.to_string()).hint("fix or unset the EXEC_SANDBOX_* variable"),
            );
            return status::USAGE;
        }
    };
    match measure(&args, base).await {
        Ok(report) => {
            if args.json {
                let text = serde_json::to_string(&report).unwrap_or_default();
                term::stdout(format!("{text}\n").as_bytes());
            } else {
                term::stdout(render_table(&report).as_bytes());
            }
            status::SUCCESS
        }
        Err(e) => {
            output::print_sandbox_error(Some("benchmark failed"), &e);
            status::of_error(&e)
        }
    }
}

fn scheduler(
    base: &SchedulerConfig,
    pool: usize,
    l1: bool,
    slots: usize,
) -> Result<Scheduler, exec_sandbox::Error> {
    Scheduler::new(SchedulerConfig {
        warm_pool_size: pool,
        l1_snapshots: l1,
        max_concurrent_vms: slots,
        ..base.clone()
    })
}

async fn measure(args: &BenchArgs, base: SchedulerConfig) -> Result<Report, exec_sandbox::Error> {
    let runs = args.runs;
    let languages: Vec<Language> = if args.language.is_empty() {
        Language::ALL.to_vec()
    } else {
        args.language.clone()
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

    step(args, "readying assets and memory snapshots");
    let cold = scheduler(&base, 0, false, 1)?;
    let accelerator = cold.prefetch().await?;
    let restored = scheduler(&base, 0, true, cores.max(1))?;
    restored.prefetch_snapshots().await?;

    step(args, &format!("baseline: python3 -c pass x{runs}"));
    let baseline = host_python_spawn(runs).await;

    let mut languages_out = BTreeMap::new();
    for &language in &languages {
        let mut report = LanguageReport::default();
        step(args, &format!("{language}: {runs} cold runs"));
        report.cold_ms = Percentiles::of(
            &sequential(&cold, language, runs, |r| {
                !r.l1_cache_hit && !r.warm_pool_hit
            })
            .await?,
        );
        step(args, &format!("{language}: {runs} runs restored from L1"));
        report.l1_ms =
            Percentiles::of(&sequential(&restored, language, runs, |r| r.l1_cache_hit).await?);
        step(args, &format!("{language}: {runs} warm-pool runs"));
        let (warm, pss) = warm_runs(&base, language, runs).await?;
        report.warm_ms = Percentiles::of(&warm);
        report.idle_vm_pss_mb = median(&pss).map(round1);
        step(
            args,
            &format!("{language}: throughput at concurrency {cores} (L1)"),
        );
        report.throughput_rps =
            Some(throughput(&restored, language, cores, runs.max(2 * cores)).await?);
        languages_out.insert(language.as_str().to_string(), report);
    }
    restored.shutdown().await;

    let baseline_p = Percentiles::of(&baseline);
    let mut ratios = BTreeMap::new();
    for (name, report) in &languages_out {
        if let (Some(warm), Some(spawn)) = (report.warm_ms, baseline_p) {
            ratios.insert(
                format!("{name}_warm_vs_spawn"),
                round2(warm.p50 / spawn.p50),
            );
        }
        if let (Some(l1), Some(cold)) = (report.l1_ms, report.cold_ms) {
            ratios.insert(format!("{name}_l1_vs_cold"), round2(l1.p50 / cold.p50));
        }
    }
    let mut host = BTreeMap::new();
    host.insert("cores".to_string(), cores.into());
    host.insert(
        "accelerator".to_string(),
        accelerator.accelerator.to_string().into(),
    );
    host.insert("accelerator_reason".to_string(), accelerator.reason.into());
    host.insert("runs_per_measurement".to_string(), runs.into());
    let mut baseline_out = BTreeMap::new();
    if let Some(p) = baseline_p {
        baseline_out.insert("python_spawn_ms".to_string(), p);
    }
    Ok(Report {
        host,
        baseline: baseline_out,
        languages: languages_out,
        ratios,
    })
}

/// A trivial program per language.
fn trivial(language: Language) -> &'static str {
    match language {
        Language::Python => "print(1)",
        Language::Javascript => "console.log(1)",
        Language::Raw => "echo 1",
    }
}

/// `runs` sequential runs, each timed end to end; `expect` checks the run took the intended path.
async fn sequential(
    scheduler: &Scheduler,
    language: Language,
    runs: usize,
    expect: impl Fn(&exec_sandbox::ExecutionResult) -> bool,
) -> Result<Vec<f64>, exec_sandbox::Error> {
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let result = scheduler
            .run(RunOptions::new(language, trivial(language)))
            .await?;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        if result.stdout.trim() != "1" || !expect(&result) {
            tracing::warn!(stdout = %result.stdout, stderr = %result.stderr, "a benchmark run did not go as intended; sample dropped");
            continue;
        }
        samples.push(ms);
    }
    Ok(samples)
}

/// Runs taken from a warm pool of one, waiting for it to refill before each; also the PSS of the
/// idle VM about to be taken.
async fn warm_runs(
    base: &SchedulerConfig,
    language: Language,
    runs: usize,
) -> Result<(Vec<f64>, Vec<f64>), exec_sandbox::Error> {
    let scheduler = scheduler(base, 1, true, 1)?;
    let mut samples = Vec::with_capacity(runs);
    let mut pss = Vec::new();
    for _ in 0..runs {
        let deadline = Instant::now() + POOL_REFILL_DEADLINE;
        let idle = loop {
            if let Some(vm) = scheduler
                .warm_pool_vms()
                .into_iter()
                .find(|vm| vm.language == language)
            {
                break Some(vm);
            }
            if Instant::now() > deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let Some(idle) = idle else {
            tracing::warn!(
                "the warm pool did not refill within {} s",
                POOL_REFILL_DEADLINE.as_secs()
            );
            break;
        };
        pss.extend(idle.pss_mb);
        let started = Instant::now();
        let result = scheduler
            .run(RunOptions::new(language, trivial(language)))
            .await?;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        if result.warm_pool_hit && result.stdout.trim() == "1" {
            samples.push(ms);
        }
    }
    scheduler.shutdown().await;
    Ok((samples, pss))
}

/// Runs per second with `concurrency` runs in flight, `total` runs in all.
async fn throughput(
    scheduler: &Scheduler,
    language: Language,
    concurrency: usize,
    total: usize,
) -> Result<f64, exec_sandbox::Error> {
    let started = Instant::now();
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..total {
        let s = scheduler.clone();
        let gate = gate.clone();
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await;
            s.run(RunOptions::new(language, trivial(language))).await
        });
    }
    while let Some(joined) = tasks.join_next().await {
        if let Ok(result) = joined {
            result?;
        }
    }
    Ok(round2(total as f64 / started.elapsed().as_secs_f64()))
}

/// Wall time of `python3 -c pass` on the host, `runs` times.
async fn host_python_spawn(runs: usize) -> Vec<f64> {
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let status = tokio::process::Command::new("python3")
            .args(["-c", "pass"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status()
            .await;
        if status.is_ok_and(|s| s.success()) {
            samples.push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    samples
}

fn median(samples: &[f64]) -> Option<f64> {
    Percentiles::of(samples).map(|p| p.p50)
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn step(args: &BenchArgs, text: &str) {
    if !args.log.quiet {
        term::step(text);
    }
}

/// The human-readable table.
pub fn render_table(report: &Report) -> String {
    let cell = |p: Option<Percentiles>| {
        p.map_or("-".to_string(), |p| format!("{:.0} / {:.0}", p.p50, p.p95))
    };
    let mut out = String::new();
    let host = |k: &str| {
        report
            .host
            .get(k)
            .map(|v| v.to_string().trim_matches('"').to_string())
            .unwrap_or_default()
    };
    out.push_str(&format!(
        "host: {} cores, accelerator {} ({})\n",
        host("cores"),
        host("accelerator"),
        host("accelerator_reason")
    ));
    if let Some(p) = report.baseline.get("python_spawn_ms") {
        out.push_str(&format!(
            "baseline python3 -c pass: p50 {:.1} ms, p95 {:.1} ms\n",
            p.p50, p.p95
        ));
    }
    out.push_str(&format!(
        "\n{:<12} {:>16} {:>16} {:>16} {:>10} {:>12}\n",
        "language", "cold p50/p95 ms", "L1 p50/p95 ms", "warm p50/p95 ms", "runs/s", "idle PSS MB"
    ));
    for (name, r) in &report.languages {
        out.push_str(&format!(
            "{:<12} {:>16} {:>16} {:>16} {:>10} {:>12}\n",
            name,
            cell(r.cold_ms),
            cell(r.l1_ms),
            cell(r.warm_ms),
            r.throughput_rps.map_or("-".into(), |v| format!("{v:.2}")),
            r.idle_vm_pss_mb.map_or("-".into(), |v| format!("{v:.0}")),
        ));
    }
    if !report.ratios.is_empty() {
        out.push('\n');
        for (k, v) in &report.ratios {
            out.push_str(&format!("{k}: {v:.2}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        assert_eq!(Percentiles::of(&[]), None);
        let p = Percentiles::of(&[5.0]).unwrap();
        assert_eq!((p.p50, p.p95), (5.0, 5.0));
        let samples: Vec<f64> = (1..=20).map(f64::from).rev().collect();
        let p = Percentiles::of(&samples).unwrap();
        assert_eq!((p.p50, p.p95), (10.0, 19.0));
    }

    #[test]
    fn json_has_the_issue_shape() {
        let mut languages = BTreeMap::new();
        languages.insert(
            "python".to_string(),
            LanguageReport {
                cold_ms: Percentiles::of(&[1000.0]),
                l1_ms: Percentiles::of(&[100.0]),
                warm_ms: Percentiles::of(&[30.0]),
                throughput_rps: Some(3.5),
                idle_vm_pss_mb: Some(40.0),
            },
        );
        let mut baseline = BTreeMap::new();
        baseline.insert(
            "python_spawn_ms".to_string(),
            Percentiles::of(&[60.0]).unwrap(),
        );
        let mut ratios = BTreeMap::new();
        ratios.insert("python_warm_vs_spawn".to_string(), 0.5);
        let report = Report {
            host: BTreeMap::new(),
            baseline,
            languages,
            ratios,
        };
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["baseline"]["python_spawn_ms"]["p50"], 60.0);
        assert_eq!(json["python"]["cold_ms"]["p95"], 1000.0);
        assert_eq!(json["python"]["l1_ms"]["p50"], 100.0);
        assert_eq!(json["python"]["warm_ms"]["p50"], 30.0);
        assert_eq!(json["python"]["throughput_rps"], 3.5);
        assert_eq!(json["python"]["idle_vm_pss_mb"], 40.0);
        assert_eq!(json["ratios"]["python_warm_vs_spawn"], 0.5);
        assert!(json["host"].is_object());
        let table = render_table(&report);
        assert!(
            table.contains("python") && table.contains("1000 / 1000"),
            "{table}"
        );
    }
}
