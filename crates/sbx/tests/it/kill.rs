//! `kill -9` of `sbx` mid-run leaves no QEMU behind: the jailed QEMU carries a parent-death
//! signal (set before and again after it drops privileges) and is PID 1 of its own namespace.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Direct children of `pid` whose command line starts with a QEMU binary (by name or path).
fn qemu_children(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some(after_comm) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let ppid: u32 = after_comm
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        // argv[0] is the binary as configured: a name in PATH or a path (the own build's).
        let is_qemu = std::fs::read(entry.path().join("cmdline"))
            .map(|c| {
                let argv0 = c.split(|&b| b == 0).next().unwrap_or_default();
                let name = argv0.rsplit(|&b| b == b'/').next().unwrap_or_default();
                name.starts_with(b"qemu-system")
            })
            .unwrap_or(false);
        if ppid == pid && is_qemu {
            found.push(child);
        }
    }
    found
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[test]
fn sigkill_of_sbx_mid_run_leaves_no_qemu() {
    let mut sbx = Command::new(assert_cmd::cargo::cargo_bin("sbx"))
        .args(["run", "-q", "-t", "120", "import time; time.sleep(100)"])
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = sbx.id();
    let deadline = Instant::now() + Duration::from_secs(120);
    let qemu = loop {
        if let Some(q) = qemu_children(pid).first() {
            break *q;
        }
        assert!(Instant::now() < deadline, "sbx never started a VM");
        assert!(
            sbx.try_wait().unwrap().is_none(),
            "sbx exited before its VM started"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // Let the VM get going, then kill sbx without giving it any chance to clean up.
    std::thread::sleep(Duration::from_millis(500));
    let status = std::fs::read_to_string(format!("/proc/{qemu}/status")).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("NSpid:") && l.ends_with("\t1")),
        "the QEMU killed here is the jailed one (PID 1 of its namespace): {status}"
    );
    let name = vm_name(qemu);
    sbx.kill().unwrap();
    sbx.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(qemu) || !with_name(&name).is_empty() {
        assert!(
            Instant::now() < deadline,
            "QEMU {qemu} (VM {name}: {:?}) outlived sbx by 10 s",
            with_name(&name)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `-name` argument of QEMU `pid`.
fn vm_name(pid: u32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let at = args.iter().position(|a| *a == b"-name").expect("-name");
    String::from_utf8_lossy(args[at + 1]).into_owned()
}

/// Live processes (of any parent) whose command line holds `-name <name>`.
fn with_name(name: &str) -> Vec<u32> {
    exec_sandbox::testing::processes_named(name)
        .into_iter()
        .filter(|pid| alive(*pid))
        .collect()
}
