//! `sbx bench`: end-to-end latency of a trivial program per language, cold, restored from an L1
//! memory snapshot and taken from the warm pool, against each language's own interpreter doing
//! nothing on the host (`python3 -c pass`, `node -e 0`, `bash -c :`), measured in the same
//! invocation. A measurement command, never a pass/fail test.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use exec_sandbox::{
    ExecOptions, Language, MemoryUse, RunOptions, Scheduler, SchedulerConfig, SessionOptions,
    Timing, WarmVm,
};
use serde::Serialize;

use crate::cli::BenchArgs;
use crate::status::{self, UsageError};
use crate::{output, term};

/// How long to wait for the warm pool to refill before giving up on a sample.
const POOL_REFILL_DEADLINE: Duration = Duration::from_secs(120);

/// Idle VMs per language for the density measurement.
const DENSITY_VMS: usize = 8;

/// Idle VMs count as settled once each one's PSS stayed within [`SETTLE_TOLERANCE_MB`] for
/// [`SETTLE_QUIET`]; [`settled`] gives up waiting after [`SETTLE_DEADLINE`].
///
/// The quiet period is long enough to see what an idle VM still does ~10 s after it entered
/// the pool (Bun's first timer collection; tokio's 10 s keep-alive of a blocking thread the
/// agent once left behind, which a 5 s window missed: `docs/measurements.md`).
const SETTLE_QUIET: Duration = Duration::from_secs(12);
/// See [`SETTLE_QUIET`].
const SETTLE_TOLERANCE_MB: f64 = 0.2;
/// See [`SETTLE_QUIET`].
const SETTLE_DEADLINE: Duration = Duration::from_secs(60);
/// Executions a session runs before it is timed: its first ones translate paths (under TCG)
/// that later ones find done.
const SESSION_WARMUP: usize = 3;

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
    /// Where the time of each path went: path (`cold`, `l1`, `warm`, and `throughput`: the L1
    /// runs at concurrency = cores) to phase (the fields of the result's `timing`) to its
    /// percentiles.
    pub phases_ms: BTreeMap<String, BTreeMap<String, Percentiles>>,
    /// Runs per second at concurrency = host cores, using L1.
    pub throughput_rps: Option<f64>,
    /// Host memory (PSS) of one idle warm VM, alone in the pool, once settled (a pooled VM's
    /// guest still touches pages for a few seconds after it enters the pool: [`settled`]).
    pub idle_vm_pss_mb: Option<f64>,
    /// The same when it entered the pool (median over the warm runs' VMs).
    pub idle_vm_pss_mb_at_entry: Option<f64>,
    /// Where the settled VM's memory goes.
    pub idle_vm_memory_mb: Option<MemoryUse>,
    /// Host memory (PSS) of each idle warm VM with [`DENSITY_VMS`] of the language idle
    /// (median), once settled: pages they share, such as the memory snapshot's, count in
    /// proportion.
    pub idle_vm_pss_mb_at_8: Option<f64>,
    /// How many idle warm VMs fit in the scheduler's memory budget at that PSS.
    pub density_vms: Option<u64>,
    /// One execution in an open session (after its first [`SESSION_WARMUP`]), timed end to
    /// end by the caller.
    pub session_exec_ms: Option<Percentiles>,
    /// This process's CPU time (all threads, user and system) per such execution: the host's
    /// share of it, which no accelerator changes; the rest of its time is the VM's.
    pub session_host_cpu_ms: Option<f64>,
}

/// A language's interpreter doing nothing on the host, timed from spawn to exit.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Baseline {
    /// The interpreter that was timed: resolved once by asking it (so a version manager's shim
    /// on `PATH` is not what gets timed), symbolic links followed.
    pub binary: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Wall time of one run.
    pub spawn_ms: Percentiles,
    /// Every interpreter binary of the language found on this host (the one on `PATH` and
    /// the system's in `/usr/bin`), each timed the same way: the fastest is the baseline, the
    /// strictest comparison (a version manager's build can start several times slower than
    /// the distribution's).
    pub timed: Vec<TimedBinary>,
}

/// One interpreter binary timed for a baseline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimedBinary {
    /// The binary, symbolic links followed.
    pub binary: PathBuf,
    /// Its median wall time.
    pub p50_ms: f64,
}

/// The whole report, as printed by `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Host facts.
    pub host: BTreeMap<String, serde_json::Value>,
    /// Per language, its interpreter on the host, measured in this invocation.
    pub baseline: BTreeMap<String, Baseline>,
    /// Per language.
    #[serde(flatten)]
    pub languages: BTreeMap<String, LanguageReport>,
    /// Ratios of each language's p50 to its own baseline's, and between paths.
    pub ratios: BTreeMap<String, f64>,
    /// The memory budget density is measured against (MB).
    pub memory_budget_mb: u64,
    /// Packages (`--packages`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packages: Option<crate::bench_packages::PackagesReport>,
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

pub(crate) fn scheduler(
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
    // Runs are sequential; more than one slot lets a run start while the previous run's VM is
    // still being torn down (after its result), as with the default `max_concurrent_vms`.
    let cold = scheduler(&base, 0, false, cores.max(2))?;
    let accelerator = cold.prefetch().await?;
    // Throughput keeps `cores` runs in flight: as many slots again hold the VMs of runs that
    // returned and are being torn down, so a run never waits for another's teardown.
    let restored = scheduler(&base, 0, true, 2 * cores)?;
    restored.prefetch_snapshots().await?;

    let mut baseline = BTreeMap::new();
    for &language in &languages {
        let interpreters = HostInterpreter::resolve_all(language).await;
        if interpreters.is_empty() {
            tracing::warn!(%language, "no host baseline for this language");
        }
        let mut timed = Vec::new();
        for interpreter in interpreters {
            step(
                args,
                &format!("{language} baseline: {} x{runs}", interpreter.command()),
            );
            if let Some(spawn_ms) = Percentiles::of(&interpreter.time(runs).await) {
                timed.push((interpreter, spawn_ms));
            }
        }
        if let Some(b) = fastest(timed) {
            baseline.insert(language.as_str().to_string(), b);
        }
    }

    let mut languages_out = BTreeMap::new();
    for &language in &languages {
        let mut report = LanguageReport::default();
        step(args, &format!("{language}: {runs} cold runs"));
        let cold_runs = sequential(&cold, language, runs, |r| {
            !r.l1_cache_hit && !r.warm_pool_hit
        })
        .await?;
        report.cold_ms = cold_runs.wall();
        report.phases_ms.insert("cold".into(), cold_runs.phases());
        step(args, &format!("{language}: {runs} runs restored from L1"));
        let l1_runs = sequential(&restored, language, runs, |r| r.l1_cache_hit).await?;
        report.l1_ms = l1_runs.wall();
        report.phases_ms.insert("l1".into(), l1_runs.phases());
        step(args, &format!("{language}: {runs} warm-pool runs"));
        let (warm, at_entry, idle) = warm_runs(&base, language, runs).await?;
        report.warm_ms = warm.wall();
        report.phases_ms.insert("warm".into(), warm.phases());
        report.idle_vm_pss_mb_at_entry = median(&at_entry).map(round1);
        report.idle_vm_pss_mb = idle.as_ref().and_then(|vm| vm.pss_mb).map(round1);
        report.idle_vm_memory_mb = idle.and_then(|vm| vm.memory);
        step(
            args,
            &format!("{language}: throughput at concurrency {cores} (L1)"),
        );
        let (rps, in_flight) = throughput(&restored, language, cores, runs.max(2 * cores)).await?;
        report.throughput_rps = Some(rps);
        report
            .phases_ms
            .insert("throughput".into(), in_flight.phases());
        step(args, &format!("{language}: {runs} executions in a session"));
        let (execs, host_cpu_ms) = session_execs(&restored, language, runs).await?;
        report.session_exec_ms = Percentiles::of(&execs);
        report.session_host_cpu_ms = host_cpu_ms.map(round2);
        languages_out.insert(language.as_str().to_string(), report);
    }
    step(
        args,
        &format!("density: {DENSITY_VMS} idle warm VMs of each language"),
    );
    let memory_budget_mb = restored.memory_budget_mb();
    for (language, pss) in idle_pss_at(&base, DENSITY_VMS, &languages).await? {
        if let Some(report) = languages_out.get_mut(language.as_str()) {
            report.idle_vm_pss_mb_at_8 = median(&pss).map(round1);
            report.density_vms = report
                .idle_vm_pss_mb_at_8
                .filter(|pss| *pss > 0.0)
                .map(|pss| (memory_budget_mb as f64 / pss) as u64);
        }
    }
    restored.shutdown().await;

    let mut ratios = ratios(&languages_out, &baseline, cores);
    let mut host = BTreeMap::new();
    host.insert("cores".to_string(), cores.into());
    host.insert(
        "accelerator".to_string(),
        accelerator.accelerator.to_string().into(),
    );
    host.insert("accelerator_reason".to_string(), accelerator.reason.into());
    host.insert("runs_per_measurement".to_string(), runs.into());
    host.insert("l1_standby".to_string(), base.l1_standby.into());
    let packages = if args.packages {
        let report = crate::bench_packages::measure(args, &base).await?;
        ratios.extend(report.ratios());
        Some(report)
    } else {
        None
    };
    Ok(Report {
        host,
        baseline,
        languages: languages_out,
        ratios,
        memory_budget_mb,
        packages,
    })
}

/// `<language>_warm_vs_spawn` and `<language>_session_vs_spawn` (warm-pool and session p50
/// over the language's own baseline p50),
/// `<language>_l1_vs_cold` and `<language>_throughput_vs_l1_bound` (runs per second over
/// `cores` / L1 p50), for what was measured.
fn ratios(
    languages: &BTreeMap<String, LanguageReport>,
    baseline: &BTreeMap<String, Baseline>,
    cores: usize,
) -> BTreeMap<String, f64> {
    let mut ratios = BTreeMap::new();
    for (name, report) in languages {
        // The paths that run code in a VM already running, against starting the interpreter.
        for (path, p) in [
            ("warm", report.warm_ms),
            ("session", report.session_exec_ms),
        ] {
            if let (Some(p), Some(spawn)) = (p, baseline.get(name)) {
                ratios.insert(
                    format!("{name}_{path}_vs_spawn"),
                    round2(p.p50 / spawn.spawn_ms.p50),
                );
            }
        }
        if let (Some(l1), Some(cold)) = (report.l1_ms, report.cold_ms) {
            ratios.insert(format!("{name}_l1_vs_cold"), round2(l1.p50 / cold.p50));
        }
        // Runs per second against what `cores` runs in flight at the L1 p50 would give.
        if let (Some(l1), Some(rps)) = (report.l1_ms, report.throughput_rps)
            && l1.p50 > 0.0
        {
            let bound = cores as f64 * 1000.0 / l1.p50;
            ratios.insert(
                format!("{name}_throughput_vs_l1_bound"),
                round2(rps / bound),
            );
        }
    }
    ratios
}

/// A trivial program per language.
fn trivial(language: Language) -> &'static str {
    match language {
        Language::Python => "print(1)",
        Language::Javascript => "console.log(1)",
        Language::Raw => "echo 1",
    }
}

/// The runs of one path: each one's wall time and the phases its result reported.
#[derive(Debug, Default)]
pub(crate) struct Runs {
    wall_ms: Vec<f64>,
    timings: Vec<Timing>,
}

impl Runs {
    fn push(&mut self, wall_ms: f64, timing: Timing) {
        self.wall_ms.push(wall_ms);
        self.timings.push(timing);
    }

    /// Percentiles of the wall times.
    pub(crate) fn wall(&self) -> Option<Percentiles> {
        Percentiles::of(&self.wall_ms)
    }

    /// Percentiles of each phase of `timing`, by the field's name.
    pub(crate) fn phases(&self) -> BTreeMap<String, Percentiles> {
        let mut by_phase: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for timing in &self.timings {
            let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(timing) else {
                continue;
            };
            for (phase, ms) in fields {
                if let Some(ms) = ms.as_f64() {
                    by_phase.entry(phase).or_default().push(ms);
                }
            }
        }
        by_phase
            .into_iter()
            .filter_map(|(phase, samples)| Some((phase, Percentiles::of(&samples)?)))
            .collect()
    }
}

/// `runs` sequential runs, each timed end to end; `expect` checks the run took the intended path.
async fn sequential(
    scheduler: &Scheduler,
    language: Language,
    runs: usize,
    expect: impl Fn(&exec_sandbox::ExecutionResult) -> bool,
) -> Result<Runs, exec_sandbox::Error> {
    sequential_runs(
        scheduler,
        runs,
        || RunOptions::new(language, trivial(language)),
        expect,
    )
    .await
}

/// `runs` runs of `options()` one after the other; a run that does not print `1` or fails
/// `expect` is dropped (and logged).
pub(crate) async fn sequential_runs(
    scheduler: &Scheduler,
    runs: usize,
    options: impl Fn() -> RunOptions,
    expect: impl Fn(&exec_sandbox::ExecutionResult) -> bool,
) -> Result<Runs, exec_sandbox::Error> {
    let mut samples = Runs::default();
    for _ in 0..runs {
        let started = Instant::now();
        let result = scheduler.run(options()).await?;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        if result.stdout.trim() != "1" || !expect(&result) {
            tracing::warn!(stdout = %result.stdout, stderr = %result.stderr, "a benchmark run did not go as intended; sample dropped");
            continue;
        }
        samples.push(ms, result.timing);
    }
    Ok(samples)
}

/// `runs` executions of the trivial program in one session, after [`SESSION_WARMUP`]: each
/// one's wall time, and this process's CPU time per execution over them (`None` for no runs).
async fn session_execs(
    scheduler: &Scheduler,
    language: Language,
    runs: usize,
) -> Result<(Vec<f64>, Option<f64>), exec_sandbox::Error> {
    let session = scheduler.session(SessionOptions::new(language)).await?;
    let measured = async {
        for _ in 0..SESSION_WARMUP {
            session.exec(ExecOptions::new(trivial(language))).await?;
        }
        let mut samples = Vec::with_capacity(runs);
        let cpu_before = process_cpu();
        for _ in 0..runs {
            let started = Instant::now();
            let result = session.exec(ExecOptions::new(trivial(language))).await?;
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            if result.stdout.trim() == "1" && result.exit_code == 0 {
                samples.push(ms);
            } else {
                tracing::warn!(stdout = %result.stdout, stderr = %result.stderr, "a session execution did not print 1; sample dropped");
            }
        }
        let host_cpu_ms = (runs > 0).then(|| {
            (process_cpu().saturating_sub(cpu_before)).as_secs_f64() * 1000.0 / runs as f64
        });
        Ok((samples, host_cpu_ms))
    }
    .await;
    session.close().await;
    measured
}

/// CPU time this process has used so far, all its threads (those that ended too).
fn process_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// Runs taken from a warm pool of one, waiting for it to refill before each; also the PSS of
/// each idle VM about to be taken, and the refilled pool's VM once [`settled`].
async fn warm_runs(
    base: &SchedulerConfig,
    language: Language,
    runs: usize,
) -> Result<(Runs, Vec<f64>, Option<WarmVm>), exec_sandbox::Error> {
    let scheduler = scheduler(base, 1, true, 1)?;
    let mut samples = Runs::default();
    let mut at_entry = Vec::new();
    for _ in 0..runs {
        if !pool_holds(&scheduler, &[language], 1).await {
            tracing::warn!(
                "the warm pool did not refill within {} s",
                POOL_REFILL_DEADLINE.as_secs()
            );
            break;
        }
        at_entry.extend(
            scheduler
                .warm_pool_vms()
                .into_iter()
                .filter(|vm| vm.language == language)
                .find_map(|vm| vm.pss_mb),
        );
        let started = Instant::now();
        let result = scheduler
            .run(RunOptions::new(language, trivial(language)))
            .await?;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        if result.warm_pool_hit && result.stdout.trim() == "1" {
            samples.push(ms, result.timing);
        }
    }
    let idle = if pool_holds(&scheduler, &[language], 1).await {
        settled(&scheduler, |vm| vm.language == language)
            .await
            .into_iter()
            .next()
    } else {
        None
    };
    scheduler.shutdown().await;
    Ok((samples, at_entry, idle))
}

/// The idle VMs `pick` selects once their memory settled: a pooled VM's guest still touches
/// pages for a few seconds after it enters the pool (what its interpreter and kernel do once
/// idle, each path's first run in that VM), so its PSS then is not what it holds while it
/// waits. Settled: the same VMs, each one's PSS within [`SETTLE_TOLERANCE_MB`] of a reading
/// [`SETTLE_QUIET`] earlier. After [`SETTLE_DEADLINE`], whatever they hold then.
async fn settled(scheduler: &Scheduler, pick: impl Fn(&WarmVm) -> bool) -> Vec<WarmVm> {
    let deadline = Instant::now() + SETTLE_DEADLINE;
    let picked = || {
        let mut vms: Vec<WarmVm> = scheduler
            .warm_pool_vms()
            .into_iter()
            .filter(&pick)
            .collect();
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        vms
    };
    let readings = |vms: &[WarmVm]| -> Vec<(String, Option<f64>)> {
        vms.iter().map(|vm| (vm.name.clone(), vm.pss_mb)).collect()
    };
    let mut reference = readings(&picked());
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = picked();
        let reading = readings(&now);
        if !same_memory(&reference, &reading) {
            reference = reading;
            since = Instant::now();
        } else if since.elapsed() >= SETTLE_QUIET {
            return now;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                "idle VMs' memory did not settle within {} s",
                SETTLE_DEADLINE.as_secs()
            );
            return now;
        }
    }
}

/// Whether two readings of idle VMs (name, PSS) are the same VMs, each within
/// [`SETTLE_TOLERANCE_MB`] of its earlier PSS.
fn same_memory(before: &[(String, Option<f64>)], now: &[(String, Option<f64>)]) -> bool {
    before.len() == now.len()
        && before.iter().zip(now).all(|((a, x), (b, y))| {
            a == b && matches!((x, y), (Some(x), Some(y)) if (x - y).abs() <= SETTLE_TOLERANCE_MB)
        })
}

/// Waits until the warm pool holds `count` idle VMs of each of `languages`; false when it does
/// not within [`POOL_REFILL_DEADLINE`].
async fn pool_holds(scheduler: &Scheduler, languages: &[Language], count: usize) -> bool {
    let deadline = Instant::now() + POOL_REFILL_DEADLINE;
    loop {
        let idle = scheduler.warm_pool_vms();
        if languages
            .iter()
            .all(|l| idle.iter().filter(|vm| vm.language == *l).count() >= count)
        {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The PSS of each idle VM of a warm pool holding `count` of every language (the pool fills
/// all of them), per language in `languages`. The CPU budget is raised for it: idle VMs use
/// none, and only memory is measured.
async fn idle_pss_at(
    base: &SchedulerConfig,
    count: usize,
    languages: &[Language],
) -> Result<Vec<(Language, Vec<f64>)>, exec_sandbox::Error> {
    let total = count * Language::ALL.len();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let scheduler = Scheduler::new(SchedulerConfig {
        warm_pool_size: count,
        l1_snapshots: true,
        max_concurrent_vms: total,
        cpu_overcommit_ratio: (total as f64 / cores as f64).max(base.cpu_overcommit_ratio),
        ..base.clone()
    })?;
    // A run starts the pool's refill task.
    let _ = scheduler
        .run(RunOptions::new(Language::Raw, trivial(Language::Raw)))
        .await?;
    let full = pool_holds(&scheduler, languages, count).await;
    if !full {
        tracing::warn!(
            "the warm pool did not reach {count} idle VMs per language within {} s",
            POOL_REFILL_DEADLINE.as_secs()
        );
    }
    let idle = settled(&scheduler, |vm| languages.contains(&vm.language)).await;
    let out = languages
        .iter()
        .map(|&language| {
            let pss = idle
                .iter()
                .filter(|vm| vm.language == language)
                .filter_map(|vm| vm.pss_mb)
                .collect();
            (language, pss)
        })
        .collect();
    scheduler.shutdown().await;
    Ok(out)
}

/// Runs per second with `concurrency` runs in flight, `total` runs in all.
async fn throughput(
    scheduler: &Scheduler,
    language: Language,
    concurrency: usize,
    total: usize,
) -> Result<(f64, Runs), exec_sandbox::Error> {
    let started = Instant::now();
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..total {
        let s = scheduler.clone();
        let gate = gate.clone();
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await;
            let started = Instant::now();
            let result = s.run(RunOptions::new(language, trivial(language))).await;
            (started.elapsed().as_secs_f64() * 1000.0, result)
        });
    }
    let mut runs = Runs::default();
    while let Some(joined) = tasks.join_next().await {
        if let Ok((ms, result)) = joined {
            runs.push(ms, result?.timing);
        }
    }
    Ok((round2(total as f64 / started.elapsed().as_secs_f64()), runs))
}

/// A language's interpreter on the host, resolved to the binary that really runs.
struct HostInterpreter {
    binary: PathBuf,
    args: &'static [&'static str],
}

impl HostInterpreter {
    /// The language's interpreters on this host: the one on `PATH` and the system's in
    /// `/usr/bin`, each asked where its binary is and with symbolic links followed (a version
    /// manager's shim, like pyenv's `python3` shell script, would otherwise be timed too and
    /// flatter every ratio); one entry per distinct binary.
    async fn resolve_all(language: Language) -> Vec<Self> {
        let (program, _, args) = Self::spec(language);
        let mut found: Vec<Self> = Vec::new();
        for candidate in [PathBuf::from(program), Path::new("/usr/bin").join(program)] {
            match Self::ask_binary(language, &candidate).await {
                Ok(binary) if !found.iter().any(|f| f.binary == binary) => {
                    found.push(Self { binary, args });
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(%language, candidate = %candidate.display(), error = %e, "not a baseline");
                }
            }
        }
        found
    }

    /// The program on `PATH`, the arguments that make it print its own binary's path, and the
    /// arguments of a run that does nothing.
    fn spec(
        language: Language,
    ) -> (
        &'static str,
        &'static [&'static str],
        &'static [&'static str],
    ) {
        match language {
            Language::Python => (
                "python3",
                &["-c", "import sys; print(sys.executable)"],
                &["-c", "pass"],
            ),
            Language::Javascript => ("node", &["-p", "process.execPath"], &["-e", "0"]),
            Language::Raw => ("bash", &["-c", "printf '%s\\n' \"$BASH\""], &["-c", ":"]),
        }
    }

    /// Runs `program` (a name on `PATH` or a path) so that it prints its binary's path, and
    /// returns that path with symbolic links followed.
    async fn ask_binary(language: Language, program: &std::path::Path) -> std::io::Result<PathBuf> {
        let (_, query, _) = Self::spec(language);
        let output = tokio::process::Command::new(program)
            .args(query)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .await?;
        let path = String::from_utf8_lossy(&output.stdout).trim().to_string();
        if !output.status.success() || path.is_empty() {
            return Err(std::io::Error::other(format!(
                "`{}` did not name its binary ({})",
                program.display(),
                output.status
            )));
        }
        std::fs::canonicalize(&path)
    }

    /// How the baseline is run, for progress lines.
    fn command(&self) -> String {
        format!("{} {}", self.binary.display(), self.args.join(" "))
    }

    /// Wall time of `runs` runs, from spawn to exit; failed runs are left out.
    async fn time(&self, runs: usize) -> Vec<f64> {
        let mut samples = Vec::with_capacity(runs);
        for _ in 0..runs {
            let started = Instant::now();
            let status = tokio::process::Command::new(&self.binary)
                .args(self.args)
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
}

/// The baseline from the timed interpreters: the fastest by p50, listing them all.
fn fastest(timed: Vec<(HostInterpreter, Percentiles)>) -> Option<Baseline> {
    let all: Vec<TimedBinary> = timed
        .iter()
        .map(|(i, p)| TimedBinary {
            binary: i.binary.clone(),
            p50_ms: round1(p.p50),
        })
        .collect();
    let (interpreter, spawn_ms) = timed
        .into_iter()
        .min_by(|(_, a), (_, b)| a.p50.total_cmp(&b.p50))?;
    Some(Baseline {
        binary: interpreter.binary,
        args: interpreter.args.iter().map(ToString::to_string).collect(),
        spawn_ms,
        timed: all,
    })
}

fn median(samples: &[f64]) -> Option<f64> {
    Percentiles::of(samples).map(|p| p.p50)
}

pub(crate) fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

pub(crate) fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

pub(crate) fn step(args: &BenchArgs, text: &str) {
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
    if let Some(standby) = report.host.get("l1_standby").and_then(|v| v.as_bool()) {
        out.push_str(if standby {
            "L1 runs resume a standby clone when one is ready (EXEC_SANDBOX_L1_STANDBY=0: off)\n"
        } else {
            "L1 runs start their own QEMU (standby clones off)\n"
        });
    }
    for (name, b) in &report.baseline {
        let others: Vec<String> = b
            .timed
            .iter()
            .filter(|t| t.binary != b.binary)
            .map(|t| format!("{} {:.1} ms", t.binary.display(), t.p50_ms))
            .collect();
        let others = if others.is_empty() {
            String::new()
        } else {
            format!("; slower, not the baseline: {}", others.join(", "))
        };
        out.push_str(&format!(
            "baseline {name}: p50 {:.1} ms, p95 {:.1} ms ({} {}{others})\n",
            b.spawn_ms.p50,
            b.spawn_ms.p95,
            b.binary.display(),
            b.args.join(" "),
        ));
    }
    out.push_str(&format!(
        "\n{:<12} {:>16} {:>16} {:>16} {:>8} {:>9} {:>9} {:>8}\n",
        "language",
        "cold p50/p95 ms",
        "L1 p50/p95 ms",
        "warm p50/p95 ms",
        "runs/s",
        "PSS 1 MB",
        "PSS 8 MB",
        "density"
    ));
    let number = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
    for (name, r) in &report.languages {
        out.push_str(&format!(
            "{:<12} {:>16} {:>16} {:>16} {:>8} {:>9} {:>9} {:>8}\n",
            name,
            cell(r.cold_ms),
            cell(r.l1_ms),
            cell(r.warm_ms),
            r.throughput_rps.map_or("-".into(), |v| format!("{v:.2}")),
            number(r.idle_vm_pss_mb),
            number(r.idle_vm_pss_mb_at_8),
            r.density_vms.map_or("-".into(), |v| v.to_string()),
        ));
    }
    out.push_str(&format!(
        "(PSS of one idle warm VM alone, and with 8 of each language idle, once settled; \
         density: idle VMs in the {} MB memory budget at the second)\n",
        report.memory_budget_mb
    ));
    let entries: Vec<String> = report
        .languages
        .iter()
        .filter_map(|(name, r)| Some(format!("{name} {:.1}", r.idle_vm_pss_mb_at_entry?)))
        .collect();
    if !entries.is_empty() {
        out.push_str(&format!(
            "(PSS alone when it entered the pool, MB: {})\n",
            entries.join(", ")
        ));
    }
    let sessions: Vec<String> = report
        .languages
        .iter()
        .filter_map(|(name, r)| {
            let p = r.session_exec_ms?;
            let cpu = r
                .session_host_cpu_ms
                .map_or(String::new(), |ms| format!(", host CPU {ms:.2} ms"));
            Some(format!("{name} {:.1} / {:.1}{cpu}", p.p50, p.p95))
        })
        .collect();
    if !sessions.is_empty() {
        out.push_str(&format!(
            "(an execution in an open session, p50 / p95 ms, and this process's CPU time per \
             execution: {})\n",
            sessions.join("; ")
        ));
    }
    let breakdowns: Vec<String> = report
        .languages
        .iter()
        .filter_map(|(name, r)| {
            let m = r.idle_vm_memory_mb?;
            Some(format!(
                "  {name}: guest RAM {:.1}, translation cache {:.1}, QEMU program {:.1}, QEMU data {:.1}\n",
                m.guest_mb, m.translation_cache_mb, m.program_mb, m.data_mb
            ))
        })
        .collect();
    if !breakdowns.is_empty() {
        out.push_str("\nPSS of one idle warm VM alone, settled, MB (the translation cache is TCG's; none under KVM):\n");
        out.push_str(&breakdowns.concat());
    }
    out.push_str("\nphases p50/p95 ms (the result's `timing`):\n");
    for (name, r) in &report.languages {
        for (path, phases) in &r.phases_ms {
            let cells: Vec<String> = Timing::PHASES
                .iter()
                .filter_map(|phase| {
                    let p = phases.get(*phase)?;
                    Some(format!(
                        "{} {:.0}/{:.0}",
                        phase.trim_end_matches("_ms"),
                        p.p50,
                        p.p95
                    ))
                })
                .collect();
            out.push_str(&format!("  {name} {path}: {}\n", cells.join(", ")));
        }
    }
    if let Some(packages) = &report.packages {
        out.push_str(&packages.render());
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

    fn baseline(binary: &str, args: &[&str], p50: f64) -> Baseline {
        Baseline {
            binary: binary.into(),
            args: args.iter().map(ToString::to_string).collect(),
            spawn_ms: Percentiles::of(&[p50]).unwrap(),
            timed: vec![TimedBinary {
                binary: binary.into(),
                p50_ms: p50,
            }],
        }
    }

    #[test]
    fn the_fastest_interpreter_found_is_the_baseline() {
        let interpreter = |binary: &str| HostInterpreter {
            binary: binary.into(),
            args: &["-c", "pass"],
        };
        let timed = vec![
            (
                interpreter("/opt/pyenv/python3.11"),
                Percentiles::of(&[37.5, 38.0]).unwrap(),
            ),
            (
                interpreter("/usr/bin/python3.11"),
                Percentiles::of(&[13.6, 14.0]).unwrap(),
            ),
        ];
        let b = fastest(timed).unwrap();
        assert_eq!(b.binary, Path::new("/usr/bin/python3.11"));
        assert_eq!(b.args, ["-c", "pass"]);
        assert_eq!(b.spawn_ms.p50, 13.6);
        let listed: Vec<_> = b
            .timed
            .iter()
            .map(|t| (t.binary.clone(), t.p50_ms))
            .collect();
        assert_eq!(
            listed,
            [
                (PathBuf::from("/opt/pyenv/python3.11"), 37.5),
                (PathBuf::from("/usr/bin/python3.11"), 13.6)
            ]
        );
        assert!(fastest(Vec::new()).is_none());
    }

    #[test]
    fn idle_memory_is_settled_when_the_same_vms_hold_the_same_pss() {
        let reading = |vms: &[(&str, Option<f64>)]| -> Vec<(String, Option<f64>)> {
            vms.iter().map(|(n, p)| (n.to_string(), *p)).collect()
        };
        let before = reading(&[("a", Some(40.0)), ("b", Some(60.0))]);
        assert!(same_memory(&before, &before));
        assert!(same_memory(
            &before,
            &reading(&[
                ("a", Some(40.0 + SETTLE_TOLERANCE_MB / 2.0)),
                ("b", Some(59.9))
            ])
        ));
        // Grown beyond the tolerance, another VM, one VM fewer, an unreadable PSS: not yet.
        assert!(!same_memory(
            &before,
            &reading(&[("a", Some(40.3)), ("b", Some(60.0))])
        ));
        assert!(!same_memory(
            &before,
            &reading(&[("a", Some(40.0)), ("c", Some(60.0))])
        ));
        assert!(!same_memory(&before, &reading(&[("a", Some(40.0))])));
        assert!(!same_memory(
            &before,
            &reading(&[("a", None), ("b", Some(60.0))])
        ));
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
                phases_ms: BTreeMap::from([(
                    "l1".to_string(),
                    BTreeMap::from([
                        ("vm_start_ms".to_string(), Percentiles::of(&[40.0]).unwrap()),
                        (
                            "guest_ready_ms".to_string(),
                            Percentiles::of(&[50.0, 70.0]).unwrap(),
                        ),
                    ]),
                )]),
                throughput_rps: Some(3.5),
                idle_vm_pss_mb: Some(40.0),
                idle_vm_pss_mb_at_entry: Some(38.5),
                idle_vm_memory_mb: Some(
                    serde_json::from_value(serde_json::json!({
                        "guest_mb": 20.0,
                        "translation_cache_mb": 13.5,
                        "program_mb": 4.0,
                        "data_mb": 2.5,
                    }))
                    .unwrap(),
                ),
                idle_vm_pss_mb_at_8: Some(25.0),
                density_vms: Some(400),
                session_exec_ms: Percentiles::of(&[2.0, 3.0, 9.0]),
                session_host_cpu_ms: Some(0.12),
            },
        );
        let mut baselines = BTreeMap::new();
        baselines.insert(
            "python".to_string(),
            baseline("/usr/bin/python3.11", &["-c", "pass"], 60.0),
        );
        let report = Report {
            host: BTreeMap::new(),
            ratios: ratios(&languages, &baselines, 2),
            baseline: baselines,
            languages,
            memory_budget_mb: 10_000,
            packages: None,
        };
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["baseline"]["python"]["binary"], "/usr/bin/python3.11");
        assert_eq!(
            json["baseline"]["python"]["args"],
            serde_json::json!(["-c", "pass"])
        );
        assert_eq!(json["baseline"]["python"]["spawn_ms"]["p50"], 60.0);
        assert_eq!(json["python"]["cold_ms"]["p95"], 1000.0);
        assert_eq!(json["python"]["l1_ms"]["p50"], 100.0);
        assert_eq!(json["python"]["warm_ms"]["p50"], 30.0);
        assert_eq!(json["python"]["throughput_rps"], 3.5);
        assert_eq!(json["python"]["idle_vm_pss_mb"], 40.0);
        assert_eq!(json["python"]["idle_vm_pss_mb_at_8"], 25.0);
        assert_eq!(json["python"]["idle_vm_pss_mb_at_entry"], 38.5);
        assert_eq!(
            json["python"]["idle_vm_memory_mb"]["translation_cache_mb"],
            13.5
        );
        assert_eq!(json["python"]["density_vms"], 400);
        assert_eq!(
            json["python"]["phases_ms"]["l1"]["guest_ready_ms"]["p95"],
            70.0
        );
        assert_eq!(json["memory_budget_mb"], 10_000);
        assert_eq!(json["ratios"]["python_warm_vs_spawn"], 0.5);
        assert_eq!(json["ratios"]["python_l1_vs_cold"], 0.1);
        assert_eq!(json["python"]["session_exec_ms"]["p50"], 3.0);
        assert_eq!(json["python"]["session_host_cpu_ms"], 0.12);
        assert_eq!(json["ratios"]["python_session_vs_spawn"], 0.05);
        // 2 cores at 100 ms: 20 runs/s at best.
        assert_eq!(json["ratios"]["python_throughput_vs_l1_bound"], 0.18);
        assert!(json["host"].is_object());
        let table = render_table(&report);
        assert!(
            table.contains(
                "  python: guest RAM 20.0, translation cache 13.5, QEMU program 4.0, QEMU data 2.5\n"
            ),
            "{table}"
        );
        assert!(
            table.contains("python") && table.contains("1000 / 1000"),
            "{table}"
        );
        assert!(
            table.contains("python l1: vm_start 40/40, guest_ready 50/70"),
            "{table}"
        );
        assert!(table.contains("10000 MB memory budget"), "{table}");
        assert!(
            table.contains("(PSS alone when it entered the pool, MB: python 38.5)"),
            "{table}"
        );
        assert!(
            table.contains("per execution: python 3.0 / 9.0, host CPU 0.12 ms)"),
            "{table}"
        );
        assert!(
            table.contains(
                "baseline python: p50 60.0 ms, p95 60.0 ms (/usr/bin/python3.11 -c pass)"
            ),
            "{table}"
        );
    }

    #[test]
    fn each_language_is_compared_with_its_own_baseline() {
        let warm = |p50: f64| LanguageReport {
            warm_ms: Percentiles::of(&[p50]),
            ..LanguageReport::default()
        };
        let languages = BTreeMap::from([
            ("javascript".to_string(), warm(80.0)),
            ("python".to_string(), warm(80.0)),
            ("raw".to_string(), warm(80.0)),
        ]);
        let baselines = BTreeMap::from([
            (
                "javascript".to_string(),
                baseline("/usr/bin/node", &["-e", "0"], 40.0),
            ),
            (
                "python".to_string(),
                baseline("/usr/bin/python3", &["-c", "pass"], 20.0),
            ),
        ]);
        assert_eq!(
            ratios(&languages, &baselines, 2),
            BTreeMap::from([
                ("javascript_warm_vs_spawn".to_string(), 2.0),
                ("python_warm_vs_spawn".to_string(), 4.0),
            ]),
            "no baseline, no ratio"
        );
    }

    /// Each baseline is an interpreter binary itself, not a shim on `PATH`: asked again where
    /// it lives, it names itself, and it runs the do-nothing program. Each binary is listed
    /// once, and the one `PATH` finds is among them.
    #[tokio::test]
    async fn host_interpreters_resolve_to_their_real_binary() {
        for language in Language::ALL {
            let interpreters = HostInterpreter::resolve_all(language).await;
            assert!(!interpreters.is_empty(), "{language}: none found");
            let mut seen = Vec::new();
            for interpreter in &interpreters {
                let binary = &interpreter.binary;
                assert!(binary.is_absolute(), "{}", binary.display());
                assert_eq!(&std::fs::canonicalize(binary).unwrap(), binary);
                assert_eq!(
                    &HostInterpreter::ask_binary(language, binary).await.unwrap(),
                    binary,
                    "{language} names itself"
                );
                assert_eq!(
                    interpreter.time(2).await.len(),
                    2,
                    "{}",
                    interpreter.command()
                );
                assert!(!seen.contains(binary), "{} twice", binary.display());
                seen.push(binary.clone());
            }
            let (program, _, _) = HostInterpreter::spec(language);
            let on_path = HostInterpreter::ask_binary(language, Path::new(program))
                .await
                .unwrap();
            assert!(seen.contains(&on_path), "{language}: {seen:?}");
        }
    }
}
