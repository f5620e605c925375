//! Choosing the accelerator: KVM when it truly works here, software emulation (TCG) otherwise.
//!
//! An openable `/dev/kvm` proves nothing (nested hypervisors accept `KVM_CREATE_VM` and then hang
//! the guest), so the verdict comes from a real probe boot of our kernel with a short deadline,
//! and is remembered per host fingerprint. [`decide`] is the whole decision; the steps that need
//! no boot ([`precheck`], [`verdict`]) are pure and unit-tested with a fake host.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::qemu::VmSpec;
use super::{Vm, VmError, host};
use crate::disk::Dir;
use crate::limits;

/// The accelerator a VM runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Accelerator {
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulation (10-50x slower).
    Tcg,
}

impl std::fmt::Display for Accelerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        })
    }
}

/// The accelerator chosen for this host, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AcceleratorChoice {
    /// The accelerator.
    #[serde(rename = "name")]
    pub accelerator: Accelerator,
    /// Why it was chosen, in words.
    pub reason: String,
}

/// What choosing the accelerator needs: this layer's own configuration.
#[derive(Debug, Clone)]
pub(crate) struct AccelConfig {
    /// Never use KVM.
    pub force_emulation: bool,
    /// The QEMU binary (part of the host fingerprint) and its jail (runs the probe).
    pub qemu: super::Qemu,
    /// Where verdicts are remembered (`<dir>/host/`).
    pub cache_dir: PathBuf,
}

/// What the decision needs to know about the host, answered by the host or by a fake in tests.
pub(crate) trait KvmProber {
    /// Whether `/dev/kvm` can be opened read-write.
    fn open_kvm(&self) -> std::io::Result<()>;
}

/// The real host.
pub(crate) struct RealHost;

impl KvmProber for RealHost {
    fn open_kvm(&self) -> std::io::Result<()> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map(drop)
    }
}

/// Why the KVM probe boot did not reach the agent.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProbeFailure {
    /// The guest hung (the nested-hypervisor symptom).
    #[error("the guest did not reach its agent within {} s", .after.as_secs())]
    Hang {
        /// The probe's deadline.
        after: Duration,
    },
    /// QEMU refused or crashed.
    #[error("QEMU exited during the probe boot ({status}): {last_line}")]
    Exited {
        /// QEMU's exit status.
        status: String,
        /// The last line QEMU or the guest printed.
        last_line: String,
    },
    /// Anything else about starting the probe VM.
    #[error("the probe VM failed: {}", crate::vm::error_chain(.0))]
    Vm(VmError),
}

impl From<VmError> for ProbeFailure {
    fn from(e: VmError) -> Self {
        match e {
            VmError::BootTimeout { after, .. } => ProbeFailure::Hang { after },
            VmError::ExitedDuringBoot {
                status, log_tail, ..
            } => ProbeFailure::Exited {
                status,
                last_line: log_tail.lines().last().unwrap_or("").to_string(),
            },
            other => ProbeFailure::Vm(other),
        }
    }
}

/// Outcome of the steps that need no boot: a final answer, or "probe KVM by booting".
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Precheck {
    /// Decided without booting.
    Decided(AcceleratorChoice),
    /// `/dev/kvm` opens; only a boot can tell whether it works.
    NeedsProbe,
}

/// Decides what can be decided without a boot.
pub(crate) fn precheck(force_emulation: bool, host: &dyn KvmProber) -> Precheck {
    if force_emulation {
        return Precheck::Decided(AcceleratorChoice {
            accelerator: Accelerator::Tcg,
            reason: "software emulation forced by the configuration (force_emulation)".into(),
        });
    }
    match host.open_kvm() {
        Ok(()) => Precheck::NeedsProbe,
        Err(e) => Precheck::Decided(AcceleratorChoice {
            accelerator: Accelerator::Tcg,
            reason: format!("/dev/kvm cannot be opened: {e}"),
        }),
    }
}

/// Turns a probe boot's outcome into a choice.
pub(crate) fn verdict(probe: Result<Duration, ProbeFailure>) -> AcceleratorChoice {
    match probe {
        Ok(elapsed) => AcceleratorChoice {
            accelerator: Accelerator::Kvm,
            reason: format!(
                "KVM probe boot reached the agent in {} ms",
                elapsed.as_millis()
            ),
        },
        Err(why) => AcceleratorChoice {
            accelerator: Accelerator::Tcg,
            reason: format!("/dev/kvm opens but a probe boot under KVM failed ({why})"),
        },
    }
}

/// Where the verdict for a host fingerprint is remembered.
pub(crate) fn verdict_path(cache_dir: &Path, fingerprint: &str) -> PathBuf {
    cache_dir
        .join("host")
        .join(format!("accelerator-{fingerprint}.json"))
}

/// A remembered verdict plus the host facts measured alongside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct HostVerdict {
    /// The choice.
    pub(crate) choice: AcceleratorChoice,
    /// Host TSC frequency in kHz, if measurable.
    pub(crate) tsc_khz: Option<u64>,
}

/// Largest verdict file read.
const MAX_VERDICT_BYTES: u64 = 64 * 1024;

/// The verdict file's directory (a cache directory: checked, created private when `create`)
/// and its name. A directory another user could change is refused.
fn verdict_dir(path: &Path, create: bool) -> std::io::Result<(Dir, &str)> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Err(std::io::Error::other("not a file path"));
    };
    let checked = if create {
        crate::trust::ensure(dir)
    } else {
        crate::trust::check(dir)
    };
    checked.map_err(|e| std::io::Error::other(crate::vm::error_chain(&e)))?;
    Ok((Dir::open(dir)?, name))
}

/// Reads a remembered verdict; anything unreadable (a symbolic link included: never followed)
/// counts as absent.
pub(crate) fn load_verdict(path: &Path) -> Option<HostVerdict> {
    let (dir, name) = match verdict_dir(path, false) {
        Ok(found) => found,
        Err(e) => {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "not reading the remembered accelerator verdict");
            }
            return None;
        }
    };
    serde_json::from_slice(&dir.read(name, MAX_VERDICT_BYTES).ok()?).ok()
}

/// Remembers a verdict atomically (temp file + rename: a link in its place is replaced).
pub(crate) fn store_verdict(path: &Path, verdict: &HostVerdict) -> std::io::Result<()> {
    let (dir, name) = verdict_dir(path, true)?;
    let text = serde_json::to_vec_pretty(verdict).map_err(std::io::Error::other)?;
    dir.replace(name, &text, 0o600, true)
}

/// The accelerator verdict for this host: remembered for its fingerprint, or decided now
/// (with a probe boot of `kernel` and `initramfs` where `/dev/kvm` opens) and remembered.
pub(crate) async fn decide(config: &AccelConfig, kernel: &Path, initramfs: &Path) -> HostVerdict {
    let precheck = precheck(config.force_emulation, &RealHost);
    let fingerprint = host::fingerprint(&config.qemu.binary);
    let path = verdict_path(&config.cache_dir, &fingerprint);
    let choice = match precheck {
        Precheck::Decided(choice) => choice,
        Precheck::NeedsProbe => match load_verdict(&path) {
            Some(remembered) => {
                tracing::debug!(accelerator = %remembered.choice.accelerator, reason = %remembered.choice.reason, "accelerator (remembered for this host)");
                return remembered;
            }
            None => {
                tracing::info!("probing KVM with a test boot");
                verdict(probe_kvm(&config.qemu, kernel, initramfs).await)
            }
        },
    };
    let verdict = HostVerdict {
        choice,
        tsc_khz: tokio::task::spawn_blocking(host::measure_tsc_khz)
            .await
            .ok()
            .flatten(),
    };
    if let Err(e) = store_verdict(&path, &verdict) {
        tracing::warn!(path = %path.display(), error = %e, "cannot remember the accelerator verdict");
    }
    tracing::info!(accelerator = %verdict.choice.accelerator, reason = %verdict.choice.reason, "accelerator");
    verdict
}

/// Boots the kernel and agent (no disk) under KVM and waits for the agent's hello.
async fn probe_kvm(
    qemu: &super::Qemu,
    kernel: &Path,
    initramfs: &Path,
) -> Result<Duration, ProbeFailure> {
    let spec = VmSpec {
        name: format!("sbx-kvm-probe-{}", std::process::id()),
        kernel: kernel.to_path_buf(),
        initramfs: initramfs.to_path_buf(),
        rootfs: None,
        packages: None,
        memory_mb: limits::MIN_MEMORY_MB,
        vcpus: 1,
        accelerator: Accelerator::Kvm,
        tsc_khz: None,
        verbose_console: false,
        tmpfs_mb: 16,
        qemu_sandbox: true,
        nic: false,
        cpu_quota_percent: limits::DEFAULT_VM_CPU_QUOTA_PERCENT,
        cpu_background: false,
    };
    let started = Instant::now();
    let vm = Vm::boot(qemu, &spec, limits::KVM_PROBE_DEADLINE, None, None).await?;
    let elapsed = started.elapsed();
    vm.destroy().await;
    Ok(elapsed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    struct FakeHost(Option<std::io::ErrorKind>);
    impl KvmProber for FakeHost {
        fn open_kvm(&self) -> std::io::Result<()> {
            self.0.map_or(Ok(()), |kind| Err(kind.into()))
        }
    }

    #[test]
    fn forced_emulation_wins() {
        let Precheck::Decided(c) = precheck(true, &FakeHost(None)) else {
            panic!("expected a decision")
        };
        assert_eq!(c.accelerator, Accelerator::Tcg);
        assert!(c.reason.contains("force_emulation"));
    }

    #[test]
    fn unopenable_kvm_means_tcg_with_the_reason() {
        let Precheck::Decided(c) =
            precheck(false, &FakeHost(Some(std::io::ErrorKind::PermissionDenied)))
        else {
            panic!("expected a decision")
        };
        assert_eq!(c.accelerator, Accelerator::Tcg);
        assert!(
            c.reason.starts_with("/dev/kvm cannot be opened"),
            "{}",
            c.reason
        );
        assert!(c.reason.contains("permission denied"), "{}", c.reason);
    }

    #[test]
    fn openable_kvm_needs_a_probe_and_a_hang_means_tcg() {
        assert_eq!(precheck(false, &FakeHost(None)), Precheck::NeedsProbe);
        let hang = ProbeFailure::from(VmError::BootTimeout {
            name: "p".into(),
            after: Duration::from_secs(5),
            log_tail: "many\nlines".into(),
        });
        let c = verdict(Err(hang));
        assert_eq!(c.accelerator, Accelerator::Tcg);
        assert_eq!(
            c.reason,
            "/dev/kvm opens but a probe boot under KVM failed (the guest did not reach its agent within 5 s)"
        );
        let crash = ProbeFailure::from(VmError::ExitedDuringBoot {
            name: "p".into(),
            status: "exit status: 1".into(),
            log_tail: "first\nqemu: assertion failed".into(),
        });
        let c = verdict(Err(crash));
        assert!(
            c.reason.ends_with(
                "(QEMU exited during the probe boot (exit status: 1): qemu: assertion failed)"
            ),
            "{}",
            c.reason
        );
        let c = verdict(Ok(Duration::from_millis(180)));
        assert_eq!(c.accelerator, Accelerator::Kvm);
    }

    #[test]
    fn verdicts_roundtrip_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = verdict_path(dir.path(), "abc");
        assert_eq!(load_verdict(&path), None);
        let v = HostVerdict {
            choice: verdict(Err(ProbeFailure::Hang {
                after: Duration::from_secs(5),
            })),
            tsc_khz: Some(2_100_000),
        };
        store_verdict(&path, &v).unwrap();
        assert_eq!(load_verdict(&path), Some(v));
        std::fs::write(&path, "{not json").unwrap();
        assert_eq!(load_verdict(&path), None);
        assert_eq!(
            std::fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o777,
            0o700,
            "the host directory is private"
        );
    }

    #[test]
    fn a_symlinked_verdict_is_neither_read_nor_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let path = verdict_path(dir.path(), "abc");
        let v = HostVerdict {
            choice: verdict(Ok(Duration::from_millis(180))),
            tsc_khz: None,
        };
        let outside = tempfile::tempdir().unwrap();
        let planted = outside.path().join("verdict.json");
        std::fs::write(&planted, serde_json::to_vec(&v).unwrap()).unwrap();
        let before = std::fs::read(&planted).unwrap();
        std::fs::create_dir(path.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&planted, &path).unwrap();
        assert_eq!(
            load_verdict(&path),
            None,
            "a planted verdict is not believed"
        );
        store_verdict(&path, &v).unwrap();
        assert_eq!(std::fs::read(&planted).unwrap(), before);
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 1);
        assert!(
            !std::fs::symlink_metadata(&path)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(load_verdict(&path), Some(v));
    }
}
