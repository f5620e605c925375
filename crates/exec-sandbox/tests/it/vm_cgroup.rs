//! The cgroup wall: every QEMU runs in a cgroup of its own with memory (swap off), task and CPU
//! limits, the cgroup goes with the VM, a hog is stopped by its own limits while its neighbour
//! completes, a spinner is held to its quota, and `kill -9` of the host process leaves no QEMU
//! and (after the next scheduler starts) no cgroup behind.
//!
//! Where this host gives VMs no cgroup, the tests check that the results say why and stop.
//! They print what they measured (what stopped the hog, the spinner's CPU share).

#![expect(clippy::print_stderr, reason = "the tests report what they measured")]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use exec_sandbox::limits;
use exec_sandbox::testing::{process_cgroup_dirs, vm_cgroup_dirs};
use exec_sandbox::{
    Accelerator, ExecutionResult, Language, RunOptions, Scheduler, SchedulerConfig, SessionOptions,
};

use crate::support::{chain, qemu_pid, run, scheduler, wait_until};

const MIB: u64 = 1024 * 1024;

/// Whether `result` ran in a cgroup; when not, it must say why.
fn had_cgroup(result: &ExecutionResult) -> bool {
    if !result.isolation.cgroup {
        let reason = result.isolation.reason.as_deref().unwrap_or("");
        assert!(!reason.is_empty(), "no cgroup and no reason: {result:?}");
        eprintln!("no cgroup on this host: {reason}");
    }
    result.isolation.cgroup
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

/// The pids listed in a cgroup's `cgroup.procs`.
fn procs(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

#[tokio::test]
async fn a_running_vms_qemu_is_in_its_own_cgroup_with_its_limits_and_it_goes_with_the_vm() {
    let session = scheduler()
        .session(SessionOptions::new(Language::Python))
        .await
        .unwrap_or_else(|e| panic!("{}", chain(&e)));
    let first = session
        .exec(exec_sandbox::ExecOptions::new("print(6*7)"))
        .await
        .unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!(first.stdout, "42\n");
    if !had_cgroup(&first) {
        session.close().await;
        return;
    }
    let name = session.vm_name().to_string();
    let qemu = qemu_pid(&name).expect("the session's QEMU");
    let dirs = vm_cgroup_dirs(&name);
    assert!(!dirs.is_empty());

    let tcg = match session.accelerator().accelerator {
        Accelerator::Tcg => limits::TCG_TRANSLATION_CACHE_MB,
        _ => 0,
    };
    let memory = (u64::from(limits::DEFAULT_MEMORY_MB)
        + limits::QEMU_OVERHEAD_MB
        + tcg
        + limits::VM_CGROUP_MEMORY_HEADROOM_MB)
        * MIB;
    let mut seen = Vec::new();
    for dir in &dirs {
        assert!(dir.is_dir(), "{} is missing", dir.display());
        assert!(
            procs(dir).contains(&qemu),
            "QEMU {qemu} is not in {}",
            dir.display()
        );
        let has = |file: &str| dir.join(file).exists();
        if has("memory.limit_in_bytes") {
            assert_eq!(read(&dir.join("memory.limit_in_bytes")), memory.to_string());
            if has("memory.memsw.limit_in_bytes") {
                assert_eq!(
                    read(&dir.join("memory.memsw.limit_in_bytes")),
                    memory.to_string()
                );
            }
            assert_eq!(read(&dir.join("memory.swappiness")), "0");
            seen.push("memory");
        }
        if has("memory.max") {
            assert_eq!(read(&dir.join("memory.max")), memory.to_string());
            if has("memory.swap.max") {
                assert_eq!(read(&dir.join("memory.swap.max")), "0");
            }
            seen.push("memory");
        }
        if has("cpu.cfs_quota_us") {
            // The default quota: one core per vCPU.
            assert_eq!(read(&dir.join("cpu.cfs_period_us")), "100000");
            assert_eq!(read(&dir.join("cpu.cfs_quota_us")), "100000");
            seen.push("cpu");
        }
        if has("cpu.max") {
            assert_eq!(read(&dir.join("cpu.max")), "100000 100000");
            seen.push("cpu");
        }
        if has("pids.max") {
            assert_eq!(read(&dir.join("pids.max")), limits::VM_PIDS_MAX.to_string());
            seen.push("pids");
        }
    }
    seen.sort_unstable();
    seen.dedup();
    if first.isolation.reason.is_none() {
        assert_eq!(seen, ["cpu", "memory", "pids"], "{dirs:?}");
    }

    session.close().await;
    wait_until(
        "the VM's cgroup to be removed",
        Duration::from_secs(15),
        || dirs.iter().all(|d| !d.exists()),
    )
    .await;
}

#[tokio::test]
async fn memory_hog_is_stopped_by_its_own_limit_and_the_neighbour_completes() {
    // Bytes are written, not just reserved: every page is touched.
    let hog = "\
chunks = []
for i in range(4096):
    chunks.append(b'x' * (16 << 20))
print('the hog survived', len(chunks))
";
    let neighbour = "\
import time
time.sleep(3)
print(sum(range(1_000_000)))
";
    let scheduler = scheduler();
    let (hog, neighbour) = tokio::join!(
        scheduler.run(RunOptions::new(Language::Python, hog).timeout_seconds(60)),
        run(Language::Python, neighbour),
    );
    assert_eq!(neighbour.stdout, "499999500000\n", "{neighbour:?}");
    assert_eq!(neighbour.exit_code, 0);

    // The hog's run either returned a result (its process was killed or failed inside the
    // guest) or failed as a sandbox error (its VM was killed): never did it complete.
    match &hog {
        Ok(r) => {
            assert!(!r.stdout.contains("survived"), "{r:?}");
            assert_ne!(r.exit_code, 0, "{r:?}");
            let stopped_by = if r.stderr.contains("MemoryError") {
                "MemoryError in the guest (allocation refused)"
            } else if r.exit_code == 137 || r.exit_code == -9 || r.stderr.contains("Killed") {
                "the guest kernel's OOM killer"
            } else {
                "something else"
            };
            eprintln!(
                "hog stopped by {stopped_by}: exit {}, stderr tail {:?}, QEMU peak {:?} MB, cgroup {}",
                r.exit_code,
                r.stderr
                    .chars()
                    .rev()
                    .take(200)
                    .collect::<String>()
                    .chars()
                    .rev()
                    .collect::<String>(),
                r.external_memory_peak_mb,
                r.isolation.cgroup,
            );
            if r.isolation.cgroup
                && let Some(peak) = r.external_memory_peak_mb
            {
                let limit = u64::from(limits::DEFAULT_MEMORY_MB)
                    + limits::QEMU_OVERHEAD_MB
                    + limits::TCG_TRANSLATION_CACHE_MB
                    + limits::VM_CGROUP_MEMORY_HEADROOM_MB;
                assert!(
                    peak <= limit,
                    "QEMU peaked at {peak} MB over its limit {limit} MB"
                );
            }
        }
        Err(e) => eprintln!("hog's VM stopped: {}", chain(e)),
    }
    // The host is unaffected: a new run still works.
    let after = run(Language::Python, "print('after')").await;
    assert_eq!(after.stdout, "after\n");
}

#[tokio::test]
async fn cpu_spinner_is_throttled_to_its_quota() {
    const QUOTA_PERCENT: u32 = 20;
    let mut config = SchedulerConfig::from_env().expect("test environment config");
    config.vm_cpu_quota_percent = QUOTA_PERCENT;
    config.warm_pool_size = 0;
    let scheduler = Scheduler::new(config).expect("scheduler");
    let spin = "\
import time
end = time.time() + 3
n = 0
while time.time() < end:
    n += 1
print('spun')
";
    let started = Instant::now();
    let r = scheduler
        .run(RunOptions::new(Language::Python, spin).timeout_seconds(120))
        .await
        .unwrap_or_else(|e| panic!("{}", chain(&e)));
    let wall_ms = started.elapsed().as_millis() as u64;
    assert_eq!(r.stdout, "spun\n", "{r:?}");
    if !had_cgroup(&r) {
        return;
    }
    let throttled = r
        .external_cpu_nr_throttled
        .expect("a CPU controller's count");
    let cpu_ms = r.external_cpu_time_ms.expect("CPU time from the cgroup");
    eprintln!(
        "quota {QUOTA_PERCENT}%: QEMU used {cpu_ms} ms of CPU in {wall_ms} ms of wall time ({:.0}%), throttled in {throttled} periods",
        cpu_ms as f64 * 100.0 / wall_ms as f64
    );
    assert!(throttled > 0, "{r:?}");
    // QEMU lived within the run's wall time, and may use its quota in every 100 ms period of
    // it (one period's worth of slack for the period it started in).
    let allowed = wall_ms * u64::from(QUOTA_PERCENT) / 100 + 100;
    assert!(
        cpu_ms <= allowed,
        "{cpu_ms} ms of CPU in {wall_ms} ms is over a {QUOTA_PERCENT}% quota"
    );
}

/// Environment variable that makes [`kill_9_child_holds_a_vm`] run (in a child process).
const KILL9_CHILD: &str = "EXEC_SANDBOX_IT_KILL9_CHILD";

/// Run by [`kill_9_leaves_no_qemu_and_no_cgroup`] in a child
/// process it then kills: holds a VM running a long sleep.
#[tokio::test]
#[ignore = "run in a child process by kill_9_leaves_no_qemu_and_no_cgroup"]
async fn kill_9_child_holds_a_vm() {
    assert!(
        std::env::var_os(KILL9_CHILD).is_some(),
        "only meant to run in a child process that is killed"
    );
    let r = run(Language::Raw, "sleep 600").await;
    panic!("the sleep was meant to be killed: {r:?}");
}

/// QEMU processes whose `-name` says process `pid` started them.
fn qemus_of(pid: u32) -> Vec<u32> {
    exec_sandbox::testing::qemus_of_process(pid)
}

/// The VM cgroups under the process directories `dirs` that hold a task.
fn busy_vm_cgroups(dirs: &[PathBuf]) -> Vec<PathBuf> {
    dirs.iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|entries| entries.flatten().map(|e| e.path()))
        .filter(|p| p.is_dir() && !procs(p).is_empty())
        .collect()
}

#[tokio::test]
async fn kill_9_leaves_no_qemu_and_no_cgroup() {
    // A run here tells whether this host gives VMs cgroups at all.
    let probe = run(Language::Raw, "true").await;
    let cgroups = had_cgroup(&probe);

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "vm_cgroup::kill_9_child_holds_a_vm",
            "--ignored",
            "--nocapture",
        ])
        .env(KILL9_CHILD, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let dirs = process_cgroup_dirs(pid);
    let deadline = Duration::from_secs(180);
    wait_until("the child's QEMU to start", deadline, || {
        !qemus_of(pid).is_empty()
    })
    .await;
    if cgroups {
        wait_until("the child's QEMU to join its cgroup", deadline, || {
            busy_vm_cgroups(&dirs).len() == dirs.len()
        })
        .await;
    }
    let qemus = qemus_of(pid);

    // SIGKILL: no destructor runs in the child.
    child.kill().unwrap();
    child.wait().unwrap();
    wait_until(
        "the killed process's QEMU to die with it",
        Duration::from_secs(10),
        || qemus_of(pid).is_empty(),
    )
    .await;
    eprintln!("QEMU {qemus:?} died with its host process {pid}");
    if !cgroups {
        return;
    }
    // Nothing ran the dead process's destructors: its guardian removes its cgroups once its
    // QEMU has left them, with no scheduler started anywhere.
    wait_until(
        "the dead process's guardian to remove its cgroups",
        Duration::from_secs(10),
        || dirs.iter().all(|d| !d.exists()),
    )
    .await;
    // And its VMs' temporary directories (control sockets, the jail's root).
    let temp_prefix = format!("sbx-vm-{pid}-");
    let temps: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&temp_prefix))
        .map(|e| e.path())
        .collect();
    assert!(temps.is_empty(), "left behind: {temps:?}");
    // And the next scheduler's sweep has nothing left to do (its second line of defence).
    let _next = Scheduler::new(SchedulerConfig::from_env().unwrap()).expect("scheduler");
    for dir in &dirs {
        assert!(!dir.exists(), "{} came back", dir.display());
    }
}

/// A VM's CPU weight against its siblings: `cpu.shares` (v1) or `cpu.weight` (v2), as
/// `file=value`; none without a CPU cgroup.
fn cpu_share(name: &str) -> Option<String> {
    vm_cgroup_dirs(name).iter().find_map(|dir| {
        ["cpu.shares", "cpu.weight"].iter().find_map(|file| {
            std::fs::read_to_string(dir.join(file))
                .ok()
                .map(|v| format!("{file}={}", v.trim()))
        })
    })
}

#[tokio::test]
async fn a_pooled_vm_runs_at_an_eighth_of_the_cpu_weight_until_a_caller_takes_it() {
    let s = Scheduler::new(SchedulerConfig {
        warm_pool_size: 1,
        ..SchedulerConfig::from_env().unwrap()
    })
    .unwrap();
    let mut pooled = String::new();
    wait_until("a warm VM", Duration::from_secs(90), || {
        match s
            .warm_pool_vms()
            .into_iter()
            .find(|vm| vm.language == Language::Python)
        {
            Some(vm) => {
                pooled = vm.name;
                true
            }
            None => false,
        }
    })
    .await;
    let idle = cpu_share(&pooled);
    eprintln!("idle pooled VM {pooled}: {idle:?}");
    let session = s
        .session(SessionOptions::new(Language::Python))
        .await
        .unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!(session.vm_name(), pooled, "the session took the pooled VM");
    let taken = cpu_share(&pooled);
    let first = session
        .exec(exec_sandbox::ExecOptions::new("print(6*7)"))
        .await
        .unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!(first.stdout, "42\n");
    session.close().await;
    s.shutdown().await;
    if !had_cgroup(&first) {
        return;
    }
    let Some(idle) = idle else {
        // Only a host missing a controller (which the result names) has no CPU cgroup.
        assert!(first.isolation.reason.is_some(), "{first:?}");
        return;
    };
    assert!(
        matches!(idle.as_str(), "cpu.shares=128" | "cpu.weight=12"),
        "{idle}"
    );
    assert!(
        matches!(taken.as_deref(), Some("cpu.shares=1024" | "cpu.weight=100")),
        "{taken:?}"
    );
}
