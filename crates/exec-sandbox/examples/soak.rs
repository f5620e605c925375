//! Soak: many runs, then a count of everything a leak would leave behind.
//!
//! `cargo run --release --example soak -- N M` runs N runs one after the other and then M runs
//! started all at once (admission queues what the host budget cannot take yet), mixing languages
//! and endings (a normal exit, a program error, a
//! timeout, a program that kills itself with SIGKILL, an execution that prints a lot), and prints
//! what is left afterwards: QEMU processes of this process, per-VM cgroups
//! (`exec-sandbox/<pid>/sbx-<pid>-N`) and, once the scheduler is dropped, the process's own
//! (`exec-sandbox/<pid>`), open file
//! descriptors, the library's temporary directories, and how much the host process's resident
//! memory grew. Every count must be zero and the growth flat; the numbers are printed, never
//! asserted: this is a measurement command.

#![expect(clippy::print_stdout, reason = "a measurement tool prints its numbers")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use exec_sandbox::{Language, RunOptions, Scheduler, SchedulerConfig};

/// One kind of run in the mix: language, code, timeout, and what its exit code should be.
struct Kind {
    name: &'static str,
    language: Language,
    code: &'static str,
    timeout: u64,
    exit: i32,
}

const MIX: &[Kind] = &[
    Kind {
        name: "python ok",
        language: Language::Python,
        code: "print(sum(range(1000)))",
        timeout: 30,
        exit: 0,
    },
    Kind {
        name: "javascript ok",
        language: Language::Javascript,
        code: "console.log([1,2,3].map(x => x * 2).join(','))",
        timeout: 30,
        exit: 0,
    },
    Kind {
        name: "raw error",
        language: Language::Raw,
        code: "echo failing >&2; exit 3",
        timeout: 30,
        exit: 3,
    },
    Kind {
        name: "python timeout",
        language: Language::Python,
        code: "while True: pass",
        timeout: 1,
        exit: -1,
    },
    Kind {
        name: "raw killed",
        language: Language::Raw,
        code: "kill -9 $$",
        timeout: 30,
        exit: 137,
    },
    Kind {
        name: "python big output",
        language: Language::Python,
        code: "import sys\nfor i in range(200000): sys.stdout.write('x' * 20 + '\\n')",
        timeout: 30,
        exit: 0,
    },
];

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let sequential = args.next().and_then(Result::ok).unwrap_or(20);
    let concurrent = args.next().and_then(Result::ok).unwrap_or(4);
    let config = SchedulerConfig {
        max_concurrent_vms: concurrent.clamp(1, exec_sandbox::limits::MAX_CONCURRENT_VMS),
        ..SchedulerConfig::from_env().expect("configuration")
    };
    let scheduler = Scheduler::new(config).expect("scheduler");
    // Warm-up: assets, accelerator, memory snapshots; the baseline is taken after it.
    scheduler.prefetch_snapshots().await.expect("prefetch");
    let baseline = Snapshot::take();
    let started = Instant::now();

    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    // Allocators and caches settle during the first runs: growth is also measured from here.
    let settle = (sequential / 10).max(1);
    let mut settled = None;
    for i in 0..sequential {
        let kind = &MIX[i % MIX.len()];
        *outcomes.entry(outcome(&scheduler, kind).await).or_default() += 1;
        if i + 1 == settle {
            settled = Some(Snapshot::take().rss_mb);
        }
    }
    let end_of_sequential = Snapshot::take().rss_mb;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..concurrent {
        let scheduler = scheduler.clone();
        tasks.spawn(async move { outcome(&scheduler, &MIX[i % MIX.len()]).await });
    }
    while let Some(joined) = tasks.join_next().await {
        let key = joined.unwrap_or_else(|e| format!("panicked: {e}"));
        *outcomes.entry(key).or_default() += 1;
    }
    scheduler.wait_for_snapshots().await;
    scheduler.shutdown().await;
    let elapsed = started.elapsed();
    let after = Snapshot::take();

    println!(
        "runs: {sequential} sequential, then {concurrent} started at once, in {:.0} s (peak {} VMs alive)",
        elapsed.as_secs_f64(),
        scheduler.peak_vms()
    );
    for (outcome, count) in &outcomes {
        println!("  {count:>5}  {outcome}");
    }
    println!("left behind:");
    println!(
        "  QEMU processes of this process: {}",
        after.qemu.saturating_sub(baseline.qemu)
    );
    println!(
        "  per-VM cgroups of this process: {}",
        after.cgroups.saturating_sub(baseline.cgroups)
    );
    // The process's parent cgroup (`exec-sandbox/<pid>`) goes with the last scheduler and
    // VM cgroup of the process (a VM cgroup still draining is removed by a helper thread).
    drop(scheduler);
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    let mut process_cgroups = process_cgroup_dirs();
    while process_cgroups > 0 && Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        process_cgroups = process_cgroup_dirs();
    }
    println!("  cgroups of this process after its scheduler is dropped: {process_cgroups}");
    println!(
        "  open file descriptors: {} (before {}, after {})",
        after.fds as i64 - baseline.fds as i64,
        baseline.fds,
        after.fds
    );
    println!(
        "  VM temporary directories: {}",
        after.temp_dirs.saturating_sub(baseline.temp_dirs)
    );
    println!(
        "  host RSS growth: {:+.1} MB (before {:.1} MB, after {:.1} MB)",
        after.rss_mb - baseline.rss_mb,
        baseline.rss_mb,
        after.rss_mb
    );
    if let Some(settled) = settled {
        println!(
            "  host RSS growth over sequential runs {settle}-{sequential}: {:+.1} MB",
            end_of_sequential - settled
        );
    }
}

/// Runs one of the mix and says how it ended, in words.
async fn outcome(scheduler: &Scheduler, kind: &Kind) -> String {
    let options = RunOptions::new(kind.language, kind.code).timeout_seconds(kind.timeout);
    match scheduler.run(options).await {
        Ok(r) if r.exit_code == kind.exit => format!("{}: as expected", kind.name),
        Ok(r) => format!(
            "{}: exit {} (expected {})",
            kind.name, r.exit_code, kind.exit
        ),
        Err(e) => format!("{}: error ({:?})", kind.name, e.kind()),
    }
}

/// What a leak would leave, counted.
struct Snapshot {
    qemu: usize,
    cgroups: usize,
    fds: usize,
    temp_dirs: usize,
    rss_mb: f64,
}

impl Snapshot {
    fn take() -> Snapshot {
        let me = std::process::id();
        let marker = format!("sbx-{me}-");
        let temp_prefix = format!("sbx-vm-{me}-");
        Snapshot {
            qemu: qemu_processes(&marker),
            cgroups: cgroup_mounts()
                .iter()
                .map(|mount| count_dirs_named(mount, &marker, 6))
                .sum(),
            fds: std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count),
            temp_dirs: std::fs::read_dir(std::env::temp_dir()).map_or(0, |read| {
                read.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with(&temp_prefix))
                    .count()
            }),
            rss_mb: std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|status| {
                    status
                        .lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                })
                .map_or(0.0, |kb| kb / 1024.0),
        }
    }
}

/// QEMU processes whose `-name` is one of this process's VMs (`sbx-<pid>-N`).
fn qemu_processes(marker: &str) -> usize {
    std::fs::read_dir("/proc").map_or(0, |read| {
        read.filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .filter(|cmdline| {
                let mut args = cmdline.split(|b| *b == 0);
                args.any(|a| a == b"-name")
                    && args
                        .next()
                        .is_some_and(|n| n.starts_with(marker.as_bytes()))
            })
            .count()
    })
}

/// This process's parent cgroups of VMs (`exec-sandbox/<pid>`), in every hierarchy.
fn process_cgroup_dirs() -> usize {
    let me = std::process::id().to_string();
    cgroup_mounts()
        .iter()
        .map(|mount| count_children_named(mount, "exec-sandbox", &me, 5))
        .sum()
}

/// Directories `<parent>/<child>` under `dir` (at most `depth` levels down).
fn count_children_named(dir: &Path, parent: &str, child: &str, depth: usize) -> usize {
    if depth == 0 {
        return 0;
    }
    std::fs::read_dir(dir).map_or(0, |read| {
        read.filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| {
                let own = usize::from(
                    e.file_name().to_string_lossy() == parent && e.path().join(child).is_dir(),
                );
                own + count_children_named(&e.path(), parent, child, depth - 1)
            })
            .sum()
    })
}

/// Mount points of every cgroup hierarchy, from `/proc/self/mountinfo`.
fn cgroup_mounts() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            matches!(fstype, "cgroup" | "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .collect()
}

/// Directories under `dir` (at most `depth` levels down) whose name starts with `marker`.
fn count_dirs_named(dir: &Path, marker: &str, depth: usize) -> usize {
    if depth == 0 {
        return 0;
    }
    std::fs::read_dir(dir).map_or(0, |read| {
        read.filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| {
                let own = usize::from(e.file_name().to_string_lossy().starts_with(marker));
                own + count_dirs_named(&e.path(), marker, depth - 1)
            })
            .sum()
    })
}
