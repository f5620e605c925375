//! Builds the QEMU command line for one microVM. Pure: no I/O, unit-tested.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

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
/// File descriptors at which QEMU inherits the kernel, the initramfs, the root filesystem and
/// the package layer: it opens every file through `/proc/self/fd/N`, none by path (its jail
/// has no view of them).
pub const KERNEL_FD: i32 = 8;
/// See [`KERNEL_FD`].
pub const INITRAMFS_FD: i32 = 9;
/// See [`KERNEL_FD`].
pub const ROOTFS_FD: i32 = 10;
/// See [`KERNEL_FD`].
pub const PACKAGES_FD: i32 = 11;
/// Id of the file memory backend; a clone's must match its template's.
const MEMORY_BACKEND_ID: &str = "mem0";

/// Guest RAM kept in a file inherited at [`RAM_FD`], for memory snapshots
/// (`docs/measurements.md`, "L1 memory snapshots"): created by the host for a template, the
/// template's saved RAM for a clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamFile {
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
    /// Background work nobody waits for yet (a warm-pool refill, a template build): QEMU's
    /// cgroup gets a low CPU weight until the VM is taken for a run. Host side.
    pub cpu_background: bool,
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
            parts.push(format!("{}=1", sbx_protocol::TCG_CMDLINE_PARAM));
        }
        parts.push(format!("sbx.tmp_mb={}", self.tmpfs_mb));
        parts.push(format!("sbx.home_mb={}", self.tmpfs_mb));
        if self.packages.is_some() {
            // The agent must know: a layer that does not show up is then a boot failure.
            parts.push(format!("{}=1", sbx_protocol::layer::CMDLINE_PARAM));
        }
        parts.join(" ")
    }

    /// The files QEMU reads for `launch`, each with the descriptor number it inherits the open
    /// file at (read-only). The command line refers to them as `/proc/self/fd/N`.
    pub fn files(&self, launch: &Launch) -> Vec<(&Path, i32)> {
        let mut files = Vec::new();
        if !launch.incoming {
            files.push((self.kernel.as_path(), KERNEL_FD));
            files.push((self.initramfs.as_path(), INITRAMFS_FD));
        }
        if let Some(rootfs) = &self.rootfs {
            files.push((rootfs.as_path(), ROOTFS_FD));
        }
        if let Some(packages) = &self.packages {
            files.push((packages.as_path(), PACKAGES_FD));
        }
        files
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
            // QEMU 7.2 reopens the file read-write even with `share=off`.
            a.push("-object".into());
            a.push(
                format!(
                    "memory-backend-file,id={MEMORY_BACKEND_ID},size={}M,share={},mem-path={}",
                    self.memory_mb,
                    if ram.shared { "on" } else { "off" },
                    fd_path(RAM_FD)
                )
                .into(),
            );
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
        if launch.ram_file.is_none() {
            // Free guest pages go back to the host (QEMU drops them from the VM's memory).
            // Only for anonymous RAM: QEMU 7.2 discards pages of a file-backed RAM by punching
            // holes in the file, which for a clone is its template, shared by every clone
            // (SECURITY.md). Templates and clones have no balloon at all, since a guest
            // kernel could also discard pages by inflating one.
            push(&["-device", "virtio-balloon-device,free-page-reporting=on"]);
        }
        // One port (the control channel, number 1: QEMU keeps 0 for a console). The default
        // of 31 ports costs the guest 64 virtqueues to set up: 40 ms of its boot under TCG
        // against 17 ms (`docs/measurements.md`).
        push(&["-device", "virtio-serial-device,max_ports=2"]);
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
            a.push(fd_path(KERNEL_FD).into());
            a.push("-initrd".into());
            a.push(fd_path(INITRAMFS_FD).into());
            a.push("-append".into());
            a.push(self.kernel_cmdline().into());
        }
        if self.rootfs.is_some() {
            // The block layer takes the descriptor itself (an fd set), never reopening the
            // file: QEMU's user needs no permission on it.
            a.push("-add-fd".into());
            a.push(format!("fd={ROOTFS_FD},set={ROOTFS_FD}").into());
            a.push("-drive".into());
            a.push(
                format!(
                    "id=root,format=raw,if=none,readonly=on,file={}",
                    fd_set(ROOTFS_FD)
                )
                .into(),
            );
            a.push("-device".into());
            a.push("virtio-blk-device,drive=root".into());
        }
        if self.packages.is_some() {
            // The block layer takes the descriptor itself (an fd set), never reopening the
            // file: QEMU's user needs no permission on it.
            a.push("-add-fd".into());
            a.push(format!("fd={PACKAGES_FD},set={PACKAGES_FD}").into());
            a.push("-drive".into());
            a.push(
                format!(
                    "id=packages,format=raw,if=none,readonly=on,file={}",
                    fd_set(PACKAGES_FD)
                )
                .into(),
            );
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

/// How QEMU names the file it inherited at descriptor `fd`.
fn fd_path(fd: i32) -> String {
    format!("/proc/self/fd/{fd}")
}

/// The fd set `-add-fd fd=<fd>,set=<fd>` made of inherited descriptor `fd`: QEMU duplicates the
/// descriptor instead of opening a path.
fn fd_set(fd: i32) -> String {
    format!("/dev/fdset/{fd}")
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
            cpu_background: false,
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
        assert!(cmdline.contains("sbx.tcg=1"));
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
        assert!(!s.kernel_cmdline().contains("sbx.tcg"));
        assert!(joined(&s).contains("-accel kvm -cpu host,-vmx,-svm"));
    }

    #[test]
    fn no_nic_and_read_only_root() {
        let args = joined(&spec(Accelerator::Tcg));
        assert!(!args.contains("netdev"), "{args}");
        assert!(!args.contains("virtio-net"), "{args}");
        assert!(
            args.contains("id=root,format=raw,if=none,readonly=on,file=/dev/fdset/10"),
            "{args}"
        );
        assert!(
            !args.contains("/a/"),
            "no host path on the command line: {args}"
        );
        assert!(args.contains("virtio-rng-device"));
        assert!(args.contains(&format!("name={}", sbx_protocol::CONTROL_PORT_NAME)));
    }

    #[test]
    fn only_vms_with_anonymous_ram_get_a_free_page_reporting_balloon() {
        let s = spec(Accelerator::Tcg);
        let balloon = "virtio-balloon-device,free-page-reporting=on";
        assert!(joined(&s).contains(balloon));
        for shared in [true, false] {
            let launch = Launch {
                ram_file: Some(RamFile { shared }),
                qmp: true,
                incoming: !shared,
            };
            let args = s.args_for(&launch);
            assert!(
                !args.iter().any(|a| a.to_string_lossy().contains("balloon")),
                "a template's RAM file is shared by its clones: {args:?}"
            );
        }
    }

    #[test]
    fn template_and_clone_differ_only_where_qemu_allows() {
        let s = spec(Accelerator::Tcg);
        let template = Launch {
            ram_file: Some(RamFile { shared: true }),
            qmp: true,
            incoming: false,
        };
        let clone = Launch {
            ram_file: Some(RamFile { shared: false }),
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
        assert!(
            t.contains("memory-backend-file,id=mem0,size=256M,share=on,mem-path=/proc/self/fd/6")
        );
        assert!(c.contains("share=off,mem-path=/proc/self/fd/6"), "{c}");
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
        let root_drive = at("id=root,format=raw,if=none,readonly=on,file=/dev/fdset/10");
        let root_device = at("virtio-blk-device,drive=root");
        let drive = at("id=packages,format=raw,if=none,readonly=on,file=/dev/fdset/11");
        let device = at("virtio-blk-device,drive=packages,serial=sbx-packages");
        assert_eq!(args[drive - 1], "-drive");
        assert_eq!(
            args[drive - 2],
            "fd=11,set=11",
            "the layer's descriptor is its fd set"
        );
        assert_eq!(args[drive - 3], "-add-fd");
        assert_eq!(args[root_drive - 2], "fd=10,set=10");
        assert_eq!(args[device - 1], "-device");
        assert!(root_drive < root_device && root_device < drive && drive < device);
        assert_eq!(device, args.len() - 1, "the last device");
        assert_eq!(
            args.iter().filter(|a| a.starts_with("virtio-blk")).count(),
            2
        );
    }

    #[test]
    fn every_file_is_an_inherited_descriptor_at_its_own_number() {
        let mut s = spec(Accelerator::Tcg);
        s.packages = Some("/l/layer.erofs".into());
        let files = |launch: &Launch| -> Vec<(String, i32)> {
            s.files(launch)
                .into_iter()
                .map(|(p, fd)| (p.display().to_string(), fd))
                .collect()
        };
        let boot = Launch::default();
        assert_eq!(
            files(&boot),
            [
                ("/a/vmlinux".to_string(), KERNEL_FD),
                ("/a/init.cpio".to_string(), INITRAMFS_FD),
                ("/a/root,fs.erofs".to_string(), ROOTFS_FD),
                ("/l/layer.erofs".to_string(), PACKAGES_FD),
            ]
        );
        let args = s.args_for(&boot);
        let joined: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let after = |flag: &str| joined[joined.iter().position(|a| a == flag).unwrap() + 1].clone();
        assert_eq!(after("-kernel"), format!("/proc/self/fd/{KERNEL_FD}"));
        assert_eq!(after("-initrd"), format!("/proc/self/fd/{INITRAMFS_FD}"));
        // A clone has no kernel: its RAM holds it.
        let clone = Launch {
            ram_file: Some(RamFile { shared: false }),
            qmp: true,
            incoming: true,
        };
        assert_eq!(
            files(&clone).iter().map(|(_, fd)| *fd).collect::<Vec<_>>(),
            [ROOTFS_FD, PACKAGES_FD]
        );
        // Every number is distinct, above stdio, and clear of the sockets and snapshot files.
        let mut numbers = vec![
            CONTROL_SOCKET_FD,
            QMP_SOCKET_FD,
            INCOMING_FD,
            RAM_FD,
            NIC_FD,
            KERNEL_FD,
            INITRAMFS_FD,
            ROOTFS_FD,
            PACKAGES_FD,
        ];
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers.len(), 9);
        assert!(numbers[0] > 2);
        assert!(numbers.len() <= crate::vm::process::MAX_FDS);
    }

    #[test]
    fn probe_boot_has_no_disk() {
        let mut s = spec(Accelerator::Kvm);
        s.rootfs = None;
        assert!(!joined(&s).contains("virtio-blk"));
    }
}
