//! The warm pool: hits, isolation between runs, dead VMs, shutdown.

use std::time::{Duration, Instant};

use exec_sandbox::{Language, RunOptions, Scheduler, SchedulerConfig};

use crate::support::{chain, qemu_pid, wait_until};

/// Boots may queue behind other tests' VMs on a busy 2-core host.
const REFILL: Duration = Duration::from_secs(90);

/// A scheduler keeping one warm VM per language: L1 clones when `l1` and a template exists,
/// else booted cold and warmed with `Request::Warm`.
fn pooled_scheduler(l1: bool) -> Scheduler {
    let config = SchedulerConfig {
        warm_pool_size: 1,
        l1_snapshots: l1,
        ..SchedulerConfig::from_env().unwrap()
    };
    Scheduler::new(config).unwrap()
}

async fn run(s: &Scheduler, options: RunOptions) -> exec_sandbox::ExecutionResult {
    s.run(options)
        .await
        .unwrap_or_else(|e| panic!("run failed: {}", chain(&e)))
}

async fn refilled(s: &Scheduler, not: &[String]) -> String {
    let mut name = String::new();
    wait_until("a warm VM", REFILL, || {
        let python = s
            .warm_pool_vms()
            .into_iter()
            .find(|vm| vm.language == Language::Python);
        match python {
            Some(vm) if !not.contains(&vm.name) => {
                name = vm.name;
                true
            }
            _ => false,
        }
    })
    .await;
    name
}

#[tokio::test]
#[expect(clippy::print_stderr, reason = "reports the measured latencies")]
async fn pool_hits_are_fast_and_runs_never_share_a_vm() {
    let s = pooled_scheduler(true);
    let first = refilled(&s, &[]).await;
    let held = s.hold_teardowns().await;
    let r1 = run(
        &s,
        RunOptions::new(
            Language::Python,
            "open('/home/user/x', 'w').write('1'); open('/tmp/x', 'w').write('1'); print('wrote')",
        ),
    );
    // A run that waited for its teardown would wait for `held` forever.
    let r1 = tokio::time::timeout(Duration::from_secs(60), r1)
        .await
        .expect("the run waited for its held teardown");
    assert_eq!(r1.stdout, "wrote\n", "stderr: {}", r1.stderr);
    assert!(r1.warm_pool_hit);
    crate::support::assert_phases_add_up(&r1);
    // Started before the run: no VM start, no interpreter start.
    assert_eq!(r1.timing.vm_start_ms, 0, "{:?}", r1.timing);
    assert_eq!(r1.timing.interpreter_start_ms, 0, "{:?}", r1.timing);
    // The result comes before the VM's teardown: its figures were read with QEMU alive.
    assert!(
        qemu_pid(&first).is_some(),
        "the run waited for its teardown"
    );
    assert!(r1.external_cpu_time_ms.is_some(), "{r1:?}");
    drop(held);
    // A used VM is destroyed (just after the result), never returned to the pool.
    wait_until("the used VM's QEMU gone", Duration::from_secs(5), || {
        qemu_pid(&first).is_none()
    })
    .await;

    let second = refilled(&s, std::slice::from_ref(&first)).await;
    let r2 = run(
        &s,
        RunOptions::new(
            Language::Python,
            "import os; print(os.path.exists('/home/user/x'), os.path.exists('/tmp/x'))",
        ),
    )
    .await;
    assert_eq!(r2.stdout, "False False\n", "stderr: {}", r2.stderr);
    assert!(r2.warm_pool_hit);

    // Latency: warm hits against runs that skip the pool (a non-default memory size), which
    // boot cold or restore a memory snapshot.
    let mut warm = vec![r1.timing.total_ms, r2.timing.total_ms];
    let mut seen = vec![first, second];
    let third = refilled(&s, &seen).await;
    seen.push(third);
    let started = Instant::now();
    let r = run(&s, RunOptions::new(Language::Python, "print(1)")).await;
    assert!(r.warm_pool_hit);
    warm.push(started.elapsed().as_millis() as u64);
    let mut other = Vec::new();
    for _ in 0..2 {
        let started = Instant::now();
        let r = run(
            &s,
            RunOptions::new(Language::Python, "print(1)").memory_mb(320),
        )
        .await;
        assert!(!r.warm_pool_hit);
        let origin = if r.l1_cache_hit { "l1" } else { "cold" };
        other.push(format!("{} ({origin})", started.elapsed().as_millis()));
    }
    let last = refilled(&s, &seen).await;
    let pid = qemu_pid(&last).expect("the idle warm VM's QEMU");
    let pss = exec_sandbox::testing::pss_mb(pid);
    eprintln!(
        "warm-pool run ms: {warm:?}; non-pool run ms: {other:?}; idle warm VM PSS: {:?} MB",
        pss.map(|mb| mb.round())
    );

    // Where the idle VM's memory goes: the parts add up to its PSS (read again now, from the
    // kernel's own rollup), the guest's RAM and QEMU's program are there, and a translation
    // cache only under TCG.
    let idle = s
        .warm_pool_vms()
        .into_iter()
        .find(|vm| vm.name == last)
        .expect("the idle warm VM");
    let memory = idle.memory.expect("its memory breakdown");
    let pss = exec_sandbox::testing::pss_mb(pid).expect("its PSS");
    assert!(
        (memory.total_mb() - pss).abs() <= 0.05 * pss,
        "{memory:?} adds up to {pss} MB"
    );
    assert!(
        memory.guest_mb > 1.0 && memory.program_mb > 1.0,
        "{memory:?}"
    );
    let emulated = r.accelerator.accelerator == exec_sandbox::Accelerator::Tcg;
    assert_eq!(memory.translation_cache_mb > 1.0, emulated, "{memory:?}");
    eprintln!("idle warm VM memory: {memory:?}");
    s.shutdown().await;
    assert!(s.warm_pool_vms().is_empty());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU {pid} still exists after shutdown"
    );
    // Runs still work after shutdown, without the pool.
    let r = run(&s, RunOptions::new(Language::Raw, "echo after")).await;
    assert_eq!(r.stdout, "after\n");
    assert!(!r.warm_pool_hit);
}

#[tokio::test]
async fn a_dead_warm_vm_is_replaced_not_handed_out() {
    let s = pooled_scheduler(false);
    let doomed = refilled(&s, &[]).await;
    let pid = qemu_pid(&doomed).expect("the warm VM's QEMU");
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());

    let r = run(&s, RunOptions::new(Language::Python, "print(6 * 7)")).await;
    assert_eq!(r.stdout, "42\n", "stderr: {}", r.stderr);

    let replacement = refilled(&s, &[doomed]).await;
    let r = run(&s, RunOptions::new(Language::Python, "print('hit')")).await;
    assert_eq!(r.stdout, "hit\n");
    assert!(r.warm_pool_hit);
    wait_until("the used VM's QEMU gone", Duration::from_secs(5), || {
        qemu_pid(&replacement).is_none()
    })
    .await;

    // Dropping the last handle kills the idle VMs too.
    let next = refilled(&s, &[replacement]).await;
    let pid = qemu_pid(&next).expect("the idle warm VM's QEMU");
    drop(s);
    wait_until("QEMU gone after drop", Duration::from_secs(10), || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_or(true, |stat| stat.contains(") Z "))
    })
    .await;
}

/// A run does not ping a pooled VM before it sends the code: the ping goes ahead of the code
/// in the same exchange. A pooled VM that stops answering (its QEMU stopped here) costs the
/// run that ping's deadline: the run then takes another VM, and the hung one is destroyed.
#[tokio::test]
async fn a_hung_warm_vm_costs_a_run_one_ping_deadline() {
    let s = pooled_scheduler(true);
    let hung = refilled(&s, &[]).await;
    let pid = qemu_pid(&hung).expect("the warm VM's QEMU");
    let signal = |name: &str| {
        let sent = std::process::Command::new("kill")
            .args([name, &pid.to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    };
    signal("-STOP");
    let started = Instant::now();
    let r = s
        .run(RunOptions::new(Language::Python, "print(6 * 7)"))
        .await;
    let took = started.elapsed();
    // Before any assertion: a stopped QEMU must not outlive a failed test.
    if qemu_pid(&hung).is_some() {
        signal("-CONT");
    }
    let r = r.unwrap_or_else(|e| panic!("run failed: {}", chain(&e)));
    assert_eq!(r.stdout, "42\n", "stderr: {}", r.stderr);
    // The pool's refill may be the VM it got in the end (pinged first, then).
    assert!(
        took >= Duration::from_secs(1),
        "one ping deadline: {took:?}"
    );
    wait_until("the hung VM's QEMU gone", Duration::from_secs(10), || {
        qemu_pid(&hung).is_none()
    })
    .await;
}

/// A pooled VM has run the pool's primer (one line to stdout and one to stderr, so the paths
/// every execution takes are translated before a run gets the VM). A program must not be able
/// to tell: what it sees of its interpreter's state is what a clone fresh from the same
/// template shows.
#[tokio::test]
async fn a_primed_warm_vm_shows_a_program_what_a_fresh_clone_does() {
    let probes = [
        (
            Language::Python,
            "import sys; print(sorted(k for k in globals() if k != 'sys'), sys.stdout.isatty(), hasattr(sys, 'last_value'))",
        ),
        (
            Language::Javascript,
            "console.log(Object.getOwnPropertyNames(globalThis).sort().join(','))",
        ),
        (
            Language::Raw,
            "compgen -v | tr '\\n' ' '; echo \"status=$?\"",
        ),
    ];
    let fresh = Scheduler::new(SchedulerConfig {
        warm_pool_size: 0,
        l1_snapshots: true,
        ..SchedulerConfig::from_env().unwrap()
    })
    .unwrap();
    // Every language's template exists before the pool fills: pooled VMs and the fresh runs
    // are clones of the same ones.
    fresh
        .prefetch_snapshots()
        .await
        .unwrap_or_else(|e| panic!("templates: {}", chain(&e)));
    let pooled = pooled_scheduler(true);
    for (language, probe) in probes {
        wait_until(&format!("a warm {language} VM"), REFILL, || {
            pooled
                .warm_pool_vms()
                .iter()
                .any(|vm| vm.language == language)
        })
        .await;
        let from_pool = run(&pooled, RunOptions::new(language, probe)).await;
        assert!(from_pool.warm_pool_hit, "{language}");
        let from_template = run(&fresh, RunOptions::new(language, probe)).await;
        assert!(
            from_template.l1_cache_hit,
            "{language}: the pool's template serves the fresh run too"
        );
        assert_eq!(from_pool.exit_code, 0, "{language}: {}", from_pool.stderr);
        assert_eq!(
            from_pool.stderr, "",
            "{language}: the primer's output never shows"
        );
        assert_eq!(
            from_pool.stdout, from_template.stdout,
            "{language}: a pooled VM differs from a fresh clone"
        );
    }
    pooled.shutdown().await;
    fresh.shutdown().await;
}
