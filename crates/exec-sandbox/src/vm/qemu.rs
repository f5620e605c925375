//! Builds the QEMU command line for one microVM. Pure: no I/O, unit-tested.

use std::ffi::OsString;
use std::path::PathBuf;

use super::accel::Accelerator;

/// File descriptor number at which QEMU inherits the listening control socket.
pub const CONTROL_SOCKET_FD: i32 = 3;

/// File descriptor at which QEMU inherits the listening QMP socket (templates and clones).
pub const QMP_SOCKET_FD: i32 = 4;
/// File descriptor at which a restored VM inherits its template's device state.
pub const INCOMING_FD: i32 = 5;
/// File descriptor at which a restored VM inherits its template's RAM file.
pub const RAM_FD: i32 = 6;
/// File descriptor at which QEMU inherits its end of the gateway's NIC socket pair.
pub const NIC_FD: i32 = 7;
/// Id of the file memory backend; a clone's must match its template's.
const MEMORY_BACKEND_ID: &str = "mem0";

/// Guest RAM kept in a file, for memory snapshots (`docs/measurements.md`, "L1 memory snapshots").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamFile {
    /// The file (created by QEMU for a template, its saved RAM for a clone).
    pub path: PathBuf,
    /// `share=on` (a template: guest writes reach the file) or `share=off` (a clone: a private
    /// copy-on-write mapping; the file is never modified).
    pub shared: bool,
}

/// How a VM is launched beyond its [`VmSpec`]: the template and clone variants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Launch {
    /// Guest RAM in a file instead of anonymous memory.
    pub ram_file: Option<RamFile>,
    /// A QMP monitor on the socket inherited at [`QMP_SOCKET_FD`].
    pub qmp: bool,
    /// Wait for the device state over QMP (`-incoming defer`) instead of booting; the kernel
    /// is left out (it is in the restored RAM).
    pub incoming: bool,
}

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
    /// Read-only package layer image (EROFS), attached as a second disk after the root disk.
    pub packages: Option<PathBuf>,
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
    /// A virtio-net NIC whose backend is the socket inherited at [`NIC_FD`] (the gateway's).
    pub nic: bool,
    /// CPU quota of QEMU's cgroup, in percent of one core per vCPU (0: none). Host side: not
    /// on the command line.
    pub cpu_quota_percent: u32,
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
            // skips ~0.8 s of calibration (`docs/measurements.md`).
            if let Some(khz) = self.tsc_khz {
                parts.push("tsc=reliable".into());
                parts.push(format!("tsc_early_khz={khz}"));
                parts.push(format!("lpj={}", khz * 10));
            }
            parts.push("lapic_timer_period=10000000".into());
        }
        parts.push(format!("sbx.tmp_mb={}", self.tmpfs_mb));
        parts.push(format!("sbx.home_mb={}", self.tmpfs_mb));
        if self.packages.is_some() {
            // The agent must know: a layer that does not show up is then a boot failure.
            parts.push(format!("{}=1", sbx_protocol::layer::CMDLINE_PARAM));
        }
        parts.join(" ")
    }

    /// QEMU's arguments (without the program name) for a cold boot.
    #[cfg(test)]
    pub fn args(&self) -> Vec<OsString> {
        self.args_for(&Launch::default())
    }

    /// QEMU's arguments (without the program name) for `launch`.
    ///
    /// A clone must get exactly its template's machine options, memory, CPUs, devices and
    /// device order; only socket paths, the name, `-incoming` and the kernel may differ.
    pub fn args_for(&self, launch: &Launch) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));
        push(&["-name", &self.name]);
        let mut machine = String::from("microvm,x-option-roms=off,isa-serial=on,acpi=off");
        if launch.ram_file.is_some() {
            machine.push_str(",memory-backend=");
            machine.push_str(MEMORY_BACKEND_ID);
        }
        push(&["-M", &machine]);
        // Nested virtualization is never offered: `vmx`/`svm` are hidden from the guest.
        match self.accelerator {
            Accelerator::Kvm => push(&["-accel", "kvm", "-cpu", "host,-vmx,-svm"]),
            // A 64 MB translation cache halves QEMU's resident memory with no measurable
            // slowdown (`docs/measurements.md`); admission control charges the same figure per VM.
            Accelerator::Tcg => push(&[
                "-accel",
                &format!("tcg,tb-size={}", crate::limits::TCG_TRANSLATION_CACHE_MB),
                "-cpu",
                "max,-vmx,-svm",
            ]),
        }
        push(&["-m", &self.memory_mb.to_string()]);
        if let Some(ram) = &launch.ram_file {
            // Never `readonly=on`: guest RAM would be read-only and the guest die silently.
            let mut object = OsString::from(format!(
                "memory-backend-file,id={MEMORY_BACKEND_ID},size={}M,share={},mem-path=",
                self.memory_mb,
                if ram.shared { "on" } else { "off" }
            ));
            object.push(escape_option_value(&ram.path));
            a.push("-object".into());
            a.push(object);
        }
        let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));
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
        if self.nic {
            let mac = sbx_protocol::net::GUEST_MAC
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":");
            a.push("-netdev".into());
            a.push(format!("socket,id=net0,fd={NIC_FD}").into());
            a.push("-device".into());
            a.push(format!("virtio-net-device,netdev=net0,mac={mac}").into());
        }
        if launch.qmp {
            a.push("-chardev".into());
            a.push(format!("socket,id=qmp,fd={QMP_SOCKET_FD},server=on,wait=off").into());
            a.push("-mon".into());
            a.push("chardev=qmp,mode=control".into());
        }
        if launch.incoming {
            // x-ignore-shared cannot be set on the command line in QEMU 7.2: the stream is
            // given later over QMP.
            a.push("-incoming".into());
            a.push("defer".into());
        } else {
            a.push("-kernel".into());
            a.push(self.kernel.clone().into_os_string());
            a.push("-initrd".into());
            a.push(self.initramfs.clone().into_os_string());
            a.push("-append".into());
            a.push(self.kernel_cmdline().into());
        }
        if let Some(rootfs) = &self.rootfs {
            let mut drive = OsString::from("id=root,format=raw,if=none,readonly=on,file=");
            drive.push(escape_option_value(rootfs));
            a.push("-drive".into());
            a.push(drive);
            a.push("-device".into());
            a.push("virtio-blk-device,drive=root".into());
        }
        if let Some(packages) = &self.packages {
            let mut drive = OsString::from("id=packages,format=raw,if=none,readonly=on,file=");
            drive.push(escape_option_value(packages));
            a.push("-drive".into());
            a.push(drive);
            // The agent finds the layer by this serial, never by its device name.
            a.push("-device".into());
            a.push(
                format!(
                    "virtio-blk-device,drive=packages,serial={}",
                    sbx_protocol::layer::DISK_SERIAL
                )
                .into(),
            );
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
            packages: None,
            memory_mb: 256,
            vcpus: 1,
            accelerator,
            tsc_khz: Some(2_100_000),
            verbose_console: false,
            tmpfs_mb: 64,
            qemu_sandbox: true,
            nic: false,
            cpu_quota_percent: 100,
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
        assert!(args.contains("-accel tcg,tb-size=64 -cpu max,-vmx,-svm"));
        assert!(args.contains("acpi=off"));
    }

    #[test]
    fn kvm_uses_host_cpu_and_no_tsc_hints() {
        let s = spec(Accelerator::Kvm);
        assert!(!s.kernel_cmdline().contains("tsc_early_khz"));
        assert!(!s.kernel_cmdline().contains("lapic_timer_period"));
        assert!(joined(&s).contains("-accel kvm -cpu host,-vmx,-svm"));
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
    fn template_and_clone_differ_only_where_qemu_allows() {
        let s = spec(Accelerator::Tcg);
        let template = Launch {
            ram_file: Some(RamFile {
                path: "/c/t/ram".into(),
                shared: true,
            }),
            qmp: true,
            incoming: false,
        };
        let clone = Launch {
            ram_file: Some(RamFile {
                path: "/c/t/ram".into(),
                shared: false,
            }),
            qmp: true,
            incoming: true,
        };
        let t = s
            .args_for(&template)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        let c = s
            .args_for(&clone)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(t.contains("acpi=off,memory-backend=mem0 "), "{t}");
        assert!(t.contains("memory-backend-file,id=mem0,size=256M,share=on,mem-path=/c/t/ram"));
        assert!(c.contains("share=off,mem-path=/c/t/ram"), "{c}");
        assert!(!t.contains("readonly=on,mem") && !c.contains("-kernel"));
        assert!(c.contains("-incoming defer") && !t.contains("-incoming"));
        assert!(c.contains("-mon chardev=qmp,mode=control"));
        // Everything before the kernel/incoming part is the same except `share`.
        let cut = |x: &str, at: &str| x[..x.find(at).unwrap()].replace("share=on", "share=off");
        assert_eq!(cut(&t, "-kernel"), cut(&c, "-incoming"));
        assert!(
            !joined(&s).contains("memory-backend"),
            "cold boots keep anonymous RAM"
        );
    }

    #[test]
    fn a_package_layer_is_a_second_read_only_disk_after_the_root_disk() {
        let plain = spec(Accelerator::Tcg);
        assert!(!joined(&plain).contains("packages"), "only when set");
        assert!(!plain.kernel_cmdline().contains("sbx.packages"));

        let mut s = spec(Accelerator::Tcg);
        s.packages = Some("/l/layer,1.erofs".into());
        assert!(s.kernel_cmdline().ends_with(" sbx.packages=1"));
        let args: Vec<String> = s
            .args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let at = |wanted: &str| args.iter().position(|a| a == wanted).expect(wanted);
        let root_drive = at("id=root,format=raw,if=none,readonly=on,file=/a/root,,fs.erofs");
        let root_device = at("virtio-blk-device,drive=root");
        let drive = at("id=packages,format=raw,if=none,readonly=on,file=/l/layer,,1.erofs");
        let device = at("virtio-blk-device,drive=packages,serial=sbx-packages");
        assert_eq!(args[drive - 1], "-drive");
        assert_eq!(args[device - 1], "-device");
        assert!(root_drive < root_device && root_device < drive && drive < device);
        assert_eq!(device, args.len() - 1, "the last device");
        assert_eq!(
            args.iter().filter(|a| a.starts_with("virtio-blk")).count(),
            2
        );
    }

    #[test]
    fn probe_boot_has_no_disk() {
        let mut s = spec(Accelerator::Kvm);
        s.rootfs = None;
        assert!(!joined(&s).contains("virtio-blk"));
    }
}
