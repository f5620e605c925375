//! After runs that succeed, time out, or are abandoned mid-flight, no QEMU started by this
//! process remains, and no cgroup: the VMs' go with them, the process's own with its last
//! scheduler. A separate test binary, so no other test's VMs are alive at the same time.

use std::time::Duration;

use exec_sandbox::{Language, RunOptions, Scheduler, SchedulerConfig};

/// QEMU processes whose `-name` says this process started them.
fn our_qemus() -> Vec<u32> {
    exec_sandbox::testing::qemus_of_process(std::process::id())
}

async fn wait_for_no_qemu(deadline: Duration) -> Vec<u32> {
    let end = std::time::Instant::now() + deadline;
    loop {
        let left = our_qemus();
        if left.is_empty() || std::time::Instant::now() > end {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// This process's VM cgroups (`exec-sandbox/<pid>/<vm>`), once they are all gone or after
/// `deadline`.
async fn wait_for_no_vm_cgroups(deadline: Duration) -> Vec<std::path::PathBuf> {
    let end = std::time::Instant::now() + deadline;
    loop {
        let left: Vec<_> = exec_sandbox::testing::process_cgroup_dirs(std::process::id())
            .iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flat_map(|entries| entries.flatten().map(|e| e.path()))
            .filter(|p| p.is_dir())
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
        wait_for_no_qemu(Duration::from_secs(5)).await,
        Vec::<u32>::new()
    );
    assert_eq!(
        wait_for_no_vm_cgroups(Duration::from_secs(15)).await,
        Vec::<std::path::PathBuf>::new()
    );

    let timed_out = scheduler
        .run(RunOptions::new(Language::Raw, "sleep 60").timeout_seconds(1))
        .await
        .unwrap();
    assert_eq!(timed_out.exit_code, -1);
    assert_eq!(
        wait_for_no_qemu(Duration::from_secs(5)).await,
        Vec::<u32>::new()
    );
    assert_eq!(
        wait_for_no_vm_cgroups(Duration::from_secs(15)).await,
        Vec::<std::path::PathBuf>::new()
    );

    // Abandon a run while its VM is alive: dropping the future must kill QEMU.
    let mut run = Box::pin(scheduler.run(RunOptions::new(Language::Raw, "sleep 60")));
    let saw_vm = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            tokio::select! {
                _ = &mut run => panic!("`sleep 60` cannot finish this early"),
                () = tokio::time::sleep(Duration::from_millis(20)) => {
                    if !our_qemus().is_empty() {
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
        wait_for_no_qemu(Duration::from_secs(5)).await,
        Vec::<u32>::new()
    );
    assert_eq!(
        wait_for_no_vm_cgroups(Duration::from_secs(15)).await,
        Vec::<std::path::PathBuf>::new()
    );

    // The process's own cgroup goes with its last scheduler.
    drop(scheduler);
    let end = std::time::Instant::now() + Duration::from_secs(15);
    let own = exec_sandbox::testing::process_cgroup_dirs(std::process::id());
    while own.iter().any(|d| d.exists()) && std::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for dir in &own {
        assert!(!dir.exists(), "{} is left", dir.display());
    }
}
