//! What the host reads of a QEMU process from `/proc`: CPU time, peak and proportional memory.

use std::path::PathBuf;

use super::VmStats;

/// QEMU's CPU time and peak RSS, read from `/proc/<pid>` (before the process is killed).
pub(crate) fn stats(pid: u32) -> VmStats {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let cpu_time_ms = std::fs::read_to_string(proc_dir.join("stat"))
        .ok()
        .and_then(|stat| parse_cpu_ticks(&stat))
        .map(|ticks| ticks * 1000 / CLOCK_TICKS_PER_SECOND);
    let memory_peak_mb = std::fs::read_to_string(proc_dir.join("status"))
        .ok()
        .and_then(|status| parse_vm_hwm_kb(&status))
        .map(|kb| kb.div_ceil(1024));
    VmStats {
        cpu_time_ms,
        memory_peak_mb,
        cpu_nr_throttled: None,
    }
}

/// `USER_HZ`: Linux has reported 100 to userspace on every architecture for decades.
const CLOCK_TICKS_PER_SECOND: u64 = 100;

/// utime + stime (fields 14 and 15) of `/proc/<pid>/stat`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // after_comm starts at field 3 (state), so field N is at index N - 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn parse_vm_hwm_kb(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The pid of the QEMU process started with `-name <name>` (every VM's name is unique per host
/// process), found through `/proc`.
#[cfg(any(test, feature = "testing"))]
pub(crate) fn qemu_pid(name: &str) -> Option<u32> {
    named_pids(|n| n == name).first().copied()
}

/// The live processes started with a `-name` that `matches`, found through `/proc`.
#[cfg(any(test, feature = "testing"))]
pub(crate) fn named_pids(matches: impl Fn(&str) -> bool) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let mut args = cmdline.split(|b| *b == 0);
            args.any(|a| a == b"-name")
                .then(|| args.next())
                .flatten()
                .and_then(|n| std::str::from_utf8(n).ok())
                .filter(|n| matches(n))
                .map(|_| pid)
        })
        .collect()
}

/// Proportional set size of process `pid` in MB: its private memory plus its share of pages
/// mapped by several processes (e.g. a memory snapshot's page cache shared by its clones).
pub(crate) fn pss_mb(pid: u32) -> Option<f64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    parse_pss_kb(&rollup).map(|kb| kb as f64 / 1024.0)
}

fn parse_pss_kb(smaps_rollup: &str) -> Option<u64> {
    smaps_rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat_with_hostile_comm() {
        let stat = "42 (qemu) x) y) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 1";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn parses_vm_hwm() {
        assert_eq!(
            parse_vm_hwm_kb("Name:\tq\nVmHWM:\t  204800 kB\n"),
            Some(204_800)
        );
        assert_eq!(parse_vm_hwm_kb("Name:\tq\n"), None);
    }

    #[test]
    fn pss_of_this_process() {
        assert_eq!(parse_pss_kb("Rss: 10 kB\nPss:    2048 kB\n"), Some(2048));
        assert_eq!(parse_pss_kb("Rss: 10 kB\n"), None);
        let mb = pss_mb(std::process::id()).expect("smaps_rollup of ourselves");
        assert!(mb > 0.0);
        assert_eq!(qemu_pid("no-such-vm-name"), None);
    }

    #[test]
    fn stats_of_this_process() {
        let stats = stats(std::process::id());
        assert!(stats.memory_peak_mb.is_some_and(|mb| mb > 0));
        assert!(stats.cpu_time_ms.is_some());
    }
}
