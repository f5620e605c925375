//! Builds the QEMU command line for one microVM. Pure: no I/O, unit-tested.

use std::ffi::OsString;
use std::path::PathBuf;

use super::accel::Accelerator;

/// File descriptor number at which QEMU inherits the listening control socket.
pub const CONTROL_SOCKET_FD: i32 = 3;

/// Everything that shapes one VM's command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// Name shown in `ps` (`-name`).
    pub name: String,
    /// Uncompressed kernel.
    pub kernel: PathBuf,
    /// Initramfs holding the agent.
    pub initramfs: PathBuf,
    /// Read-only root filesystem image, or none (accelerator probe).
    pub rootfs: Option<PathBuf>,
    /// Guest memory in MB.
    pub memory_mb: u32,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// KVM or TCG.
    pub accelerator: Accelerator,
    /// Host TSC frequency, used under TCG to skip guest calibration.
    pub tsc_khz: Option<u64>,
    /// Print kernel messages on the console (otherwise `quiet`).
    pub verbose_console: bool,
    /// Size limit of the guest's `/tmp` and `/home/user`, in MB each.
    pub tmpfs_mb: u32,
    /// Run QEMU under its own seccomp sandbox.
    pub qemu_sandbox: bool,
}

impl VmSpec {
    /// The kernel command line.
    pub fn kernel_cmdline(&self) -> String {
        let mut parts: Vec<String> = vec![
            "console=ttyS0".into(),
            "reboot=t".into(),
            "panic=-1".into(),
            "rdinit=/init".into(),
            "random.trust_cpu=on".into(),
            if self.verbose_console {
                "loglevel=7"
            } else {
                "quiet"
            }
            .into(),
        ];
        if self.accelerator == Accelerator::Tcg {
            // Under TCG the guest sees the host's TSC and QEMU's 1 GHz APIC: telling the kernel
            // skips ~0.8 s of calibration (LAB.md).
            if let Some(khz) = self.tsc_khz {
                parts.push("tsc=reliable".into());
                parts.push(format!("tsc_early_khz={khz}"));
                parts.push(format!("lpj={}", khz * 10));
            }
            parts.push("lapic_timer_period=10000000".into());
        }
        parts.push(format!("sbx.tmp_mb={}", self.tmpfs_mb));
        parts.push(format!("sbx.home_mb={}", self.tmpfs_mb));
        parts.join(" ")
    }

    /// QEMU's arguments (without the program name).
    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));
        push(&["-name", &self.name]);
        push(&["-M", "microvm,x-option-roms=off,isa-serial=on,acpi=off"]);
        match self.accelerator {
            Accelerator::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
            // tb-size=64 halves QEMU's resident memory with no measurable slowdown (LAB.md).
            Accelerator::Tcg => push(&["-accel", "tcg,tb-size=64", "-cpu", "max"]),
        }
        push(&["-m", &self.memory_mb.to_string()]);
        push(&["-smp", &self.vcpus.to_string()]);
        push(&[
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]);
        if self.qemu_sandbox {
            push(&[
                "-sandbox",
                "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            ]);
        }
        push(&[
            "-chardev",
            "stdio,id=console,signal=off",
            "-serial",
            "chardev:console",
        ]);
        push(&["-device", "virtio-rng-device"]);
        push(&["-device", "virtio-serial-device"]);
        push(&[
            "-chardev",
            &format!("socket,id=control,fd={CONTROL_SOCKET_FD},server=on,wait=off"),
        ]);
        push(&[
            "-device",
            &format!(
                "virtserialport,chardev=control,name={}",
                sbx_protocol::CONTROL_PORT_NAME
            ),
        ]);
        a.push("-kernel".into());
        a.push(self.kernel.clone().into_os_string());
        a.push("-initrd".into());
        a.push(self.initramfs.clone().into_os_string());
        a.push("-append".into());
        a.push(self.kernel_cmdline().into());
        if let Some(rootfs) = &self.rootfs {
            let mut drive = OsString::from("id=root,format=raw,if=none,readonly=on,file=");
            drive.push(escape_option_value(rootfs));
            a.push("-drive".into());
            a.push(drive);
            a.push("-device".into());
            a.push("virtio-blk-device,drive=root".into());
        }
        a
    }
}

/// QEMU option values separate fields with commas; a literal comma is written twice.
fn escape_option_value(path: &std::path::Path) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut out = Vec::new();
    for &b in path.as_os_str().as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(accelerator: Accelerator) -> VmSpec {
        VmSpec {
            name: "sbx-test".into(),
            kernel: "/a/vmlinux".into(),
            initramfs: "/a/init.cpio".into(),
            rootfs: Some("/a/root,fs.erofs".into()),
            memory_mb: 256,
            vcpus: 1,
            accelerator,
            tsc_khz: Some(2_100_000),
            verbose_console: false,
            tmpfs_mb: 64,
            qemu_sandbox: true,
        }
    }

    fn joined(s: &VmSpec) -> String {
        s.args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn tcg_gets_the_timing_recipe() {
        let s = spec(Accelerator::Tcg);
        let cmdline = s.kernel_cmdline();
        assert!(cmdline.contains("tsc_early_khz=2100000"));
        assert!(cmdline.contains("lpj=21000000"));
        assert!(cmdline.contains("lapic_timer_period=10000000"));
        assert!(cmdline.contains("quiet"));
        let args = joined(&s);
        assert!(args.contains("-accel tcg,tb-size=64 -cpu max"));
        assert!(args.contains("acpi=off"));
    }

    #[test]
    fn kvm_uses_host_cpu_and_no_tsc_hints() {
        let s = spec(Accelerator::Kvm);
        assert!(!s.kernel_cmdline().contains("tsc_early_khz"));
        assert!(!s.kernel_cmdline().contains("lapic_timer_period"));
        assert!(joined(&s).contains("-accel kvm -cpu host"));
    }

    #[test]
    fn no_nic_and_read_only_root() {
        let args = joined(&spec(Accelerator::Tcg));
        assert!(!args.contains("netdev"), "{args}");
        assert!(!args.contains("virtio-net"), "{args}");
        assert!(
            args.contains("readonly=on,file=/a/root,,fs.erofs"),
            "{args}"
        );
        assert!(args.contains("virtio-rng-device"));
        assert!(args.contains(&format!("name={}", sbx_protocol::CONTROL_PORT_NAME)));
    }

    #[test]
    fn probe_boot_has_no_disk() {
        let mut s = spec(Accelerator::Kvm);
        s.rootfs = None;
        assert!(!joined(&s).contains("virtio-blk"));
    }
}
