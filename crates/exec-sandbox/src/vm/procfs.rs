//! What the host reads of a QEMU process from `/proc`: CPU time, peak and proportional memory.

use std::path::PathBuf;

use super::VmStats;
use crate::MemoryUse;

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
/// mapped by several processes (e.g. a memory snapshot's page cache shared by its clones). The
/// library itself reads [`memory_use`]; tests check it against this independent reading.
#[cfg(any(test, feature = "testing"))]
pub(crate) fn pss_mb(pid: u32) -> Option<f64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    parse_pss_kb(&rollup).map(|kb| kb as f64 / 1024.0)
}

#[cfg(any(test, feature = "testing"))]
fn parse_pss_kb(smaps_rollup: &str) -> Option<u64> {
    smaps_rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Where the proportional set size of QEMU process `pid` goes ([`MemoryUse`]), from its
/// `smaps`.
pub(crate) fn memory_use(pid: u32) -> Option<MemoryUse> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    parse_memory_use(&smaps)
}

/// Sorts each mapping's `Pss:` by what it holds: the largest mapping is the guest's RAM (at
/// least [`crate::limits::MIN_MEMORY_MB`], larger than anything else QEMU maps); the one
/// anonymous mapping that is readable, writable and executable is TCG's translation cache;
/// other mappings of files are QEMU's program and libraries; the rest is QEMU's data. `None`
/// when the text has no mapping.
fn parse_memory_use(smaps: &str) -> Option<MemoryUse> {
    struct Mapping<'a> {
        size: u64,
        perms: &'a str,
        path: &'a str,
        pss_kb: u64,
    }
    let mut mappings: Vec<Mapping<'_>> = Vec::new();
    for line in smaps.lines() {
        if let Some(kb) = line.strip_prefix("Pss:") {
            if let Some(m) = mappings.last_mut() {
                m.pss_kb += kb.split_whitespace().next()?.parse::<u64>().ok()?;
            }
            continue;
        }
        let mut fields = line.splitn(6, ' ');
        let Some((start, end)) = fields.next().and_then(|r| r.split_once('-')) else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        else {
            // A field line (`Rss:`, `VmFlags:` ...), not a mapping.
            continue;
        };
        let perms = fields.next().unwrap_or("");
        let path = fields.nth(3).unwrap_or("").trim();
        mappings.push(Mapping {
            size: end.saturating_sub(start),
            perms,
            path,
            pss_kb: 0,
        });
    }
    let translation = |m: &Mapping<'_>| m.path.is_empty() && m.perms.starts_with("rwx");
    let guest = mappings
        .iter()
        .enumerate()
        .filter(|(_, m)| !translation(m))
        .max_by_key(|(_, m)| m.size)
        .map(|(i, _)| i)?;
    let mut use_kb = [0u64; 4];
    for (i, m) in mappings.iter().enumerate() {
        let part = if i == guest {
            0
        } else if translation(m) {
            1
        } else if m.path.starts_with('/') {
            2
        } else {
            3
        };
        use_kb[part] += m.pss_kb;
    }
    let mb = |kb: u64| kb as f64 / 1024.0;
    Some(MemoryUse {
        guest_mb: mb(use_kb[0]),
        translation_cache_mb: mb(use_kb[1]),
        program_mb: mb(use_kb[2]),
        data_mb: mb(use_kb[3]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An excerpt of an idle pooled clone's `smaps` (the field lines trimmed).
    const SMAPS: &str = "\
55d1a0000000-55d1a0342000 r-xp 00000000 fe:00 131 /usr/local/lib/exec-sandbox/qemu/x/bin/qemu-system-x86_64
Size:               3336 kB
Rss:                3300 kB
Pss:                3200 kB
Pss_Dirty:             0 kB
55d1a2000000-55d1a2200000 rw-p 00000000 00:00 0                          [heap]
Pss:                2048 kB
7f0ff7fff000-7f1007fff000 rw-p 00000000 fe:00 4242 /root/.cache/exec-sandbox/snapshots/k/ram
Rss:               20000 kB
Pss:               10240 kB
VmFlags: rd wr mr mw me ac sd
7f1008000000-7f100bfff000 rwxp 00000000 00:00 0 
Pss:               14336 kB
7f100c000000-7f1010000000 ---p 00000000 00:00 0 
Pss:                   0 kB
7f1010000000-7f1010100000 rw-p 00000000 00:00 0 
Pss:                1024 kB
7f1012000000-7f1012100000 r--p 00000000 fe:00 77 /usr/lib/x86_64-linux-gnu/libglib-2.0.so.0.7400.6
Pss:                 512 kB
";

    #[test]
    fn memory_is_sorted_by_what_the_pages_hold() {
        let m = parse_memory_use(SMAPS).unwrap();
        assert_eq!(m.guest_mb, 10.0, "the largest mapping: the snapshot's RAM");
        assert_eq!(m.translation_cache_mb, 14.0, "the anonymous rwx mapping");
        assert_eq!(m.program_mb, 3.625, "QEMU's binary and its libraries");
        assert_eq!(m.data_mb, 3.0, "heap and anonymous data");
        assert_eq!(m.total_mb(), 30.625);
        assert_eq!(parse_memory_use("Rss: 1 kB\n"), None);
        assert_eq!(parse_memory_use(""), None);
    }

    #[test]
    fn memory_use_of_this_process_adds_up_to_its_pss() {
        let pid = std::process::id();
        let m = memory_use(pid).expect("our own smaps");
        let pss = pss_mb(pid).expect("our own smaps_rollup");
        // Read at two moments: a test thread may have touched memory in between.
        assert!(
            (m.total_mb() - pss).abs() < 0.25 * pss.max(1.0),
            "{m:?} vs {pss}"
        );
    }

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
