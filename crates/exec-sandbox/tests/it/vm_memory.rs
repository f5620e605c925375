//! The guest's memory: compressed swap whose device node is gone, the guard's group that the
//! sandbox cannot leave or loosen, the caps on `/dev/shm` and System V shared memory, and free
//! pages going back to the host. (Memory hogs against the guard: `attack_exhaustion.rs`.)

use std::time::{Duration, Instant};

use exec_sandbox::{ExecOptions, Language, Scheduler, SchedulerConfig, SessionOptions};

use crate::support::{chain, qemu_pid, run};

#[tokio::test]
async fn swap_is_compressed_its_node_is_gone_and_the_guard_cannot_be_left() {
    let r = run(
        Language::Raw,
        r#"tail -n +2 /proc/swaps | while read name kind size rest; do echo "swap $name $size"; done
grep MemTotal /proc/meminfo
test -e /dev/zram0 && echo "zram node present" || echo "zram node absent"
echo "cgroup $(cat /proc/self/cgroup)"
(echo $$ > /sys/fs/cgroup/cgroup.procs) 2>/dev/null && echo "left the guard" || echo "leave refused"
(echo max > /sys/fs/cgroup/sandbox/memory.max) 2>/dev/null && echo "raised the guard" || echo "raise refused"
(echo 0 > /sys/fs/cgroup/sandbox/memory.oom.group) 2>/dev/null && echo "oom.group changed" || echo "oom.group refused"
"#,
    )
    .await;
    assert_eq!(r.exit_code, 0, "{}", r.stderr);
    let out = &r.stdout;
    let swap_kb: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("swap /dev/zram0"))
        .and_then(|rest| rest.split_whitespace().last())
        .and_then(|kb| kb.parse().ok())
        .unwrap_or_else(|| panic!("no zram swap in:\n{out}"));
    let total_kb: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
        .unwrap();
    // Half of memory (less the header page).
    assert!(swap_kb.abs_diff(total_kb / 2) <= 8, "{out}");
    for line in [
        "zram node absent",
        "cgroup 0::/sandbox",
        "leave refused",
        "raise refused",
        "oom.group refused",
    ] {
        assert!(out.contains(line), "missing `{line}` in:\n{out}");
    }
}

#[tokio::test]
async fn shared_memory_is_capped_at_a_sixteenth_of_memory() {
    let r = run(
        Language::Python,
        r#"
import ctypes, errno, os
st = os.statvfs("/dev/shm")
print("shm_mb", st.f_blocks * st.f_frsize >> 20)
try:
    with open("/dev/shm/fill", "wb") as f:
        for _ in range(64):
            f.write(b"x" * (1 << 20))
            f.flush()
    print("shm fill: no limit")
except OSError as e:
    print("shm fill:", errno.errorcode[e.errno])
os.remove("/dev/shm/fill")
libc = ctypes.CDLL(None, use_errno=True)
def shmget(mb):
    r = libc.shmget(0, mb << 20, 0o1000 | 0o600)
    return "ok" if r >= 0 else errno.errorcode[ctypes.get_errno()]
print("segment of 32 MiB:", shmget(32))
print("segments of 6 MiB:", [shmget(6) for _ in range(3)])
"#,
    )
    .await;
    assert_eq!(r.exit_code, 0, "{}", r.stderr);
    let out = &r.stdout;
    let shm_mb: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("shm_mb "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    // A sixteenth of the 256 MB guest, from MemTotal (a little under 256 MB).
    assert!((12..=16).contains(&shm_mb), "{out}");
    for line in [
        "shm fill: ENOSPC",
        "segment of 32 MiB: EINVAL",
        "segments of 6 MiB: ['ok', 'ok', 'ENOSPC']",
    ] {
        assert!(out.contains(line), "missing `{line}` in:\n{out}");
    }
}

/// Holds 150 MiB in `held`, in chunks freed to the guest kernel as soon as they are dropped.
const HOLD_150_MIB: &str = "held = [bytearray(bytes(range(256)) * 4096) for _ in range(150)]";

#[tokio::test]
async fn a_cold_booted_vm_gives_freed_memory_back_to_the_host() {
    let config = SchedulerConfig {
        l1_snapshots: false,
        warm_pool_size: 0,
        ..SchedulerConfig::from_env().expect("test environment config")
    };
    let s = Scheduler::new(config).expect("scheduler");
    let session = s
        .session(SessionOptions::new(Language::Python))
        .await
        .unwrap_or_else(|e| panic!("session failed: {}", chain(&e)));
    let pid = qemu_pid(session.vm_name()).expect("the session's QEMU");
    let exec = |code: &'static str| {
        let session = &session;
        async move {
            let r = session
                .exec(ExecOptions::new(code))
                .await
                .unwrap_or_else(|e| panic!("exec failed: {}", chain(&e)));
            assert_eq!(r.exit_code, 0, "{}", r.stderr);
        }
    };
    exec(HOLD_150_MIB).await;
    let held = exec_sandbox::testing::pss_mb(pid).expect("QEMU's PSS");
    exec("del held").await;
    // The guest reports free 2 MiB blocks about two seconds after they are freed.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut now = held;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        now = exec_sandbox::testing::pss_mb(pid).expect("QEMU's PSS");
        if now < held - 100.0 {
            break;
        }
    }
    session.close().await;
    s.shutdown().await;
    assert!(
        now < held - 100.0,
        "PSS {held:.0} MB with 150 MiB held, still {now:.0} MB after freeing it"
    );
}

/// Not a test: prints QEMU's PSS through a session's life, booted cold (anonymous RAM, with the
/// free-page-reporting balloon) and restored from a memory snapshot (RAM mapped from the
/// template's file, no balloon), for `docs/measurements.md`:
/// `cargo test -p exec-sandbox --features testing --test it measure_pss -- --ignored --nocapture --test-threads 1`
#[tokio::test]
#[ignore = "a measurement, run by hand"]
#[expect(clippy::print_stdout, reason = "a measurement prints its numbers")]
async fn measure_pss() {
    for l1 in [false, true] {
        let config = SchedulerConfig {
            l1_snapshots: l1,
            warm_pool_size: 0,
            ..SchedulerConfig::from_env().expect("test environment config")
        };
        let s = Scheduler::new(config).expect("scheduler");
        if l1 {
            let r = run_on(&s, "print(1)").await;
            assert_eq!(r.exit_code, 0, "{}", r.stderr);
            s.wait_for_snapshots().await;
        }
        for _ in 0..3 {
            let session = s
                .session(SessionOptions::new(Language::Python))
                .await
                .unwrap_or_else(|e| panic!("session failed: {}", chain(&e)));
            let pid = qemu_pid(session.vm_name()).expect("the session's QEMU");
            let pss = || exec_sandbox::testing::pss_mb(pid).unwrap_or(f64::NAN);
            let idle = Duration::from_secs(6);
            let ready = pss();
            tokio::time::sleep(idle).await;
            let rested = pss();
            let ok = |r: Result<exec_sandbox::ExecutionResult, _>| r.map(|r| r.exit_code == 0);
            let held_ok = ok(session.exec(ExecOptions::new(HOLD_150_MIB)).await);
            let held = pss();
            let freed_ok = ok(session.exec(ExecOptions::new("del held")).await);
            tokio::time::sleep(idle).await;
            let freed = pss();
            println!(
                "{}: ready {ready:.0} MB, after 6 s idle {rested:.0} MB, 150 MiB held {held:.0} MB, \
                 6 s after freeing it {freed:.0} MB ({held_ok:?}, {freed_ok:?})",
                if l1 { "restored" } else { "cold" }
            );
            session.close().await;
        }
        s.shutdown().await;
    }
}

async fn run_on(s: &Scheduler, code: &str) -> exec_sandbox::ExecutionResult {
    s.run(exec_sandbox::RunOptions::new(Language::Python, code))
        .await
        .unwrap_or_else(|e| panic!("run failed: {}", chain(&e)))
}
