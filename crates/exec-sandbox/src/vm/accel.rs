//! Choosing the accelerator: KVM when it truly works here, software emulation (TCG) otherwise.
//!
//! An openable `/dev/kvm` proves nothing (nested hypervisors accept `KVM_CREATE_VM` and then hang
//! the guest), so the verdict comes from a real probe boot of our kernel with a short deadline,
//! and is remembered per host fingerprint.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The accelerator a VM runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
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
pub struct AcceleratorChoice {
    /// The accelerator.
    #[serde(rename = "name")]
    pub accelerator: Accelerator,
    /// Why it was chosen, in words.
    pub reason: String,
}

/// What the decision needs to know about the host, answered by the host or by a fake in tests.
pub trait KvmProber {
    /// Whether `/dev/kvm` can be opened read-write, with the error if not.
    fn open_kvm(&self) -> Result<(), String>;
}

/// The real host.
pub struct RealHost;

impl KvmProber for RealHost {
    fn open_kvm(&self) -> Result<(), String> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map(drop)
            .map_err(|e| format!("/dev/kvm cannot be opened: {e}"))
    }
}

/// Outcome of the steps that need no boot: a final answer, or "probe KVM by booting".
#[derive(Debug, PartialEq, Eq)]
pub enum Precheck {
    /// Decided without booting.
    Decided(AcceleratorChoice),
    /// `/dev/kvm` opens; only a boot can tell whether it works.
    NeedsProbe,
}

/// Decides what can be decided without a boot.
pub fn precheck(force_emulation: bool, host: &dyn KvmProber) -> Precheck {
    if force_emulation {
        return Precheck::Decided(AcceleratorChoice {
            accelerator: Accelerator::Tcg,
            reason: format!(
                "software emulation forced ({}=1)",
                crate::EnvVars::FORCE_EMULATION
            ),
        });
    }
    match host.open_kvm() {
        Ok(()) => Precheck::NeedsProbe,
        Err(why) => Precheck::Decided(AcceleratorChoice {
            accelerator: Accelerator::Tcg,
            reason: why,
        }),
    }
}

/// Turns a probe boot's outcome into a choice.
pub fn verdict(probe: Result<std::time::Duration, String>) -> AcceleratorChoice {
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
pub fn verdict_path(cache_dir: &Path, fingerprint: &str) -> PathBuf {
    cache_dir
        .join("host")
        .join(format!("accelerator-{fingerprint}.json"))
}

/// A remembered verdict plus the host facts measured alongside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostVerdict {
    /// The choice.
    pub choice: AcceleratorChoice,
    /// Host TSC frequency in kHz, if measurable.
    pub tsc_khz: Option<u64>,
}

/// Reads a remembered verdict; anything unreadable counts as absent.
pub fn load_verdict(path: &Path) -> Option<HostVerdict> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Remembers a verdict atomically (temp file + rename).
pub fn store_verdict(path: &Path, verdict: &HostVerdict) -> std::io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("no parent"))?;
    std::fs::create_dir_all(dir)?;
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    serde_json::to_writer_pretty(tmp.as_file(), verdict).map_err(std::io::Error::other)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeHost(Result<(), String>);
    impl KvmProber for FakeHost {
        fn open_kvm(&self) -> Result<(), String> {
            self.0.clone()
        }
    }

    #[test]
    fn forced_emulation_wins() {
        let Precheck::Decided(c) = precheck(true, &FakeHost(Ok(()))) else {
            panic!("expected a decision")
        };
        assert_eq!(c.accelerator, Accelerator::Tcg);
        assert!(c.reason.contains("EXEC_SANDBOX_FORCE_EMULATION"));
    }

    #[test]
    fn unopenable_kvm_means_tcg_with_the_reason() {
        let Precheck::Decided(c) = precheck(false, &FakeHost(Err("/dev/kvm: EACCES".into())))
        else {
            panic!("expected a decision")
        };
        assert_eq!(c.accelerator, Accelerator::Tcg);
        assert!(c.reason.contains("EACCES"));
    }

    #[test]
    fn openable_kvm_needs_a_probe_and_a_hang_means_tcg() {
        assert_eq!(precheck(false, &FakeHost(Ok(()))), Precheck::NeedsProbe);
        let c = verdict(Err("no hello within 5 s".into()));
        assert_eq!(c.accelerator, Accelerator::Tcg);
        assert!(c.reason.contains("no hello within 5 s"));
        let c = verdict(Ok(std::time::Duration::from_millis(180)));
        assert_eq!(c.accelerator, Accelerator::Kvm);
    }

    #[test]
    fn verdicts_roundtrip_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = verdict_path(dir.path(), "abc");
        assert_eq!(load_verdict(&path), None);
        let v = HostVerdict {
            choice: verdict(Err("hang".into())),
            tsc_khz: Some(2_100_000),
        };
        store_verdict(&path, &v).unwrap();
        assert_eq!(load_verdict(&path), Some(v));
        std::fs::write(&path, "{not json").unwrap();
        assert_eq!(load_verdict(&path), None);
    }
}
