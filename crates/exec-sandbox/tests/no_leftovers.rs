//! After runs that succeed, time out, or are abandoned mid-flight, no QEMU started by this
//! process remains, and no cgroup: the VMs' go with them, the process's own with its last
//! scheduler. A separate test binary, so no other test's VMs are alive at the same time.

use std::time::Duration;

use exec_sandbox::{Language, RunOptions, Scheduler, SchedulerConfig};

/// QEMU processes whose `-name` says this process started them, but `scheduler`'s waiting
/// standby clones (started ahead of its next restore, kept while it lives).
fn our_qemus(scheduler: &Scheduler) -> Vec<u32> {
    let standbys: Vec<u32> = scheduler
        .standby_vms()
        .iter()
        .flat_map(|name| exec_sandbox::testing::processes_named(name))
        .collect();
    exec_sandbox::testing::qemus_of_process(std::process::id())
        .into_iter()
        .filter(|pid| !standbys.contains(pid))
        .collect()
}

async fn wait_for_no_qemu(scheduler: &Scheduler, deadline: Duration) -> Vec<u32> {
    wait_for_none(deadline, || our_qemus(scheduler)).await
}

/// What `left` returns, once it is empty or after `deadline`.
async fn wait_for_none<T>(deadline: Duration, left: impl Fn() -> Vec<T>) -> Vec<T> {
    let end = std::time::Instant::now() + deadline;
    loop {
        let left = left();
        if left.is_empty() || std::time::Instant::now() > end {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// This process's VM cgroups (`exec-sandbox/<pid>/<vm>`) but those of `scheduler`'s waiting
/// standby clones, once they are all gone or after `deadline`.
async fn wait_for_no_vm_cgroups(
    scheduler: &Scheduler,
    deadline: Duration,
) -> Vec<std::path::PathBuf> {
    let end = std::time::Instant::now() + deadline;
    loop {
        let standbys = scheduler.standby_vms();
        let left: Vec<_> = exec_sandbox::testing::process_cgroup_dirs(std::process::id())
            .iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flat_map(|entries| entries.flatten().map(|e| e.path()))
            .filter(|p| {
                p.is_dir()
                    && !p
                        .file_name()
                        .is_some_and(|n| standbys.iter().any(|s| n == s.as_str()))
            })
            .collect();
        if left.is_empty() || std::time::Instant::now() > end {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn no_qemu_survives_success_timeout_or_cancellation() {
    let scheduler = Scheduler::new(SchedulerConfig::from_env().unwrap()).unwrap();

    let ok = scheduler
        .run(RunOptions::new(Language::Raw, "echo hi"))
        .await
        .unwrap();
    assert_eq!(ok.stdout, "hi\n");
    assert_eq!(
        wait_for_no_qemu(&scheduler, Duration::from_secs(5)).await,
        Vec::<u32>::new()
    );
    assert_eq!(
        wait_for_no_vm_cgroups(&scheduler, Duration::from_secs(15)).await,
        Vec::<std::path::PathBuf>::new()
    );

    let timed_out = scheduler
        .run(RunOptions::new(Language::Raw, "sleep 60").timeout_seconds(1))
        .await
        .unwrap();
    assert_eq!(timed_out.exit_code, -1);
    assert_eq!(
        wait_for_no_qemu(&scheduler, Duration::from_secs(5)).await,
        Vec::<u32>::new()
    );
    assert_eq!(
        wait_for_no_vm_cgroups(&scheduler, Duration::from_secs(15)).await,
        Vec::<std::path::PathBuf>::new()
    );

    // Abandon a run while its VM is alive: dropping the future must kill QEMU.
    let mut run = Box::pin(scheduler.run(RunOptions::new(Language::Raw, "sleep 60")));
    let saw_vm = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            tokio::select! {
                _ = &mut run => panic!("`sleep 60` cannot finish this early"),
                () = tokio::time::sleep(Duration::from_millis(20)) => {
                    if !our_qemus(&scheduler).is_empty() {
                        break;
                    }
                }
            }
        }
    })
    .await;
    assert!(saw_vm.is_ok(), "no VM appeared within 60 s");
    drop(run);
    assert_eq!(
        wait_for_no_qemu(&scheduler, Duration::from_secs(5)).await,
        Vec::<u32>::new()
    );
    assert_eq!(
        wait_for_no_vm_cgroups(&scheduler, Duration::from_secs(15)).await,
        Vec::<std::path::PathBuf>::new()
    );

    // Every QEMU (standby clones included) and the process's own cgroup go with its last
    // scheduler.
    drop(scheduler);
    let pid = std::process::id();
    assert_eq!(
        wait_for_none(Duration::from_secs(5), || {
            exec_sandbox::testing::qemus_of_process(pid)
        })
        .await,
        Vec::<u32>::new()
    );
    let end = std::time::Instant::now() + Duration::from_secs(15);
    let own = exec_sandbox::testing::process_cgroup_dirs(std::process::id());
    while own.iter().any(|d| d.exists()) && std::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for dir in &own {
        assert!(!dir.exists(), "{} is left", dir.display());
    }
}
