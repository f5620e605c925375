//! Facts about the host that shape the VM command line and the accelerator verdict: the TSC
//! frequency and the host fingerprint.

use std::time::{Duration, Instant};

/// Measures the host's TSC frequency in kHz by timing the counter against the monotonic clock.
///
/// Under TCG the guest reads the host's counter, so telling the guest kernel the frequency
/// (`tsc_early_khz=`, `lpj=`) skips about half a second of calibration.
pub(crate) fn measure_tsc_khz() -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let flags = cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .unwrap_or("");
        if !flags.split_whitespace().any(|f| f == "constant_tsc") {
            return None;
        }
        let mut samples = Vec::with_capacity(3);
        for _ in 0..3 {
            let t0 = Instant::now();
            let c0 = crate::sys::read_tsc();
            std::thread::sleep(Duration::from_millis(20));
            let c1 = crate::sys::read_tsc();
            let elapsed = t0.elapsed();
            let khz = (c1.wrapping_sub(c0) as f64 / elapsed.as_secs_f64() / 1000.0).round();
            samples.push(khz as u64);
        }
        samples.sort_unstable();
        // Round to 1 MHz: TSC frequencies are nominal values and the measurement jitters.
        samples
            .get(1)
            .map(|khz| (khz + 500) / 1000 * 1000)
            .filter(|khz| *khz > 0)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// A string that changes when anything deciding the accelerator verdict changes: the kernel,
/// the CPU, the loaded hypervisor modules and the QEMU binary.
pub(crate) fn fingerprint(qemu: &std::path::Path) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    h.update(read("/proc/sys/kernel/osrelease"));
    h.update(read("/proc/sys/kernel/version"));
    let cpuinfo = read("/proc/cpuinfo");
    for line in cpuinfo.lines().take_while(|l| !l.is_empty()) {
        if line.starts_with("model name") || line.starts_with("flags") {
            h.update(line);
        }
    }
    let mut modules: Vec<String> = std::fs::read_dir("/sys/module")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("kvm"))
                .collect()
        })
        .unwrap_or_default();
    modules.sort();
    h.update(modules.join(","));
    if let Some(meta) = which(qemu).and_then(|p| std::fs::metadata(p).ok()) {
        use std::os::unix::fs::MetadataExt;
        h.update(format!("{}:{}:{}", meta.len(), meta.mtime(), meta.ino()));
    }
    hex::encode(&h.finalize()[..8])
}

/// Resolves a program name against `PATH` (absolute or relative paths are returned as they are).
pub(crate) fn which(program: &std::path::Path) -> Option<std::path::PathBuf> {
    if program.components().count() > 1 {
        return program.exists().then(|| program.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_measurement_is_plausible() {
        if let Some(khz) = measure_tsc_khz() {
            assert!((100_000..20_000_000).contains(&khz), "{khz} kHz");
            assert_eq!(khz % 1000, 0);
        }
    }

    #[test]
    fn fingerprint_is_stable() {
        let q = std::path::Path::new("sh");
        assert_eq!(fingerprint(q), fingerprint(q));
        assert_eq!(fingerprint(q).len(), 16);
    }
}
