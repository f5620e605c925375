//! The cgroup logic over fake trees in a temp dir, laid out like this project's build machines
//! (hybrid), pure v2 hosts, v1-only hosts and broken ones. The fake behaves like cgroupfs
//! where it matters: new cgroups get their interface files, v2 children get the controllers
//! their parent hands down, removing a cgroup with tasks or children fails, files are never
//! created by a write.

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::mountinfo::tests::HYBRID;
use super::*;

/// A v1 hierarchy's controllers, or the unified hierarchy.
#[derive(Clone)]
enum Kind {
    V1(&'static [&'static str]),
    V2,
}

struct FakeFs {
    root: tempfile::TempDir,
    mounts: Vec<(PathBuf, Kind)>,
    /// Directories this process may not create entries in.
    denied: Mutex<Vec<PathBuf>>,
    alive: Mutex<Vec<u32>>,
}

impl FakeFs {
    /// Mounts at host-looking paths (`/sys/fs/cgroup/...`), kept under a temp dir.
    fn new(mounts: &[(&str, Kind)]) -> Arc<FakeFs> {
        let fs = FakeFs {
            root: tempfile::tempdir().unwrap(),
            mounts: mounts
                .iter()
                .map(|(p, k)| (PathBuf::from(p), k.clone()))
                .collect(),
            denied: Mutex::new(Vec::new()),
            alive: Mutex::new(Vec::new()),
        };
        for (point, kind) in &fs.mounts {
            std::fs::create_dir_all(fs.real(point)).unwrap();
            fs.populate(point, kind, true);
        }
        Arc::new(fs)
    }

    fn real(&self, path: &Path) -> PathBuf {
        self.root
            .path()
            .join(path.strip_prefix("/").unwrap_or(path))
    }

    fn mount_of(&self, path: &Path) -> (&Path, &Kind) {
        self.mounts
            .iter()
            .filter(|(p, _)| path.starts_with(p))
            .max_by_key(|(p, _)| p.as_os_str().len())
            .map(|(p, k)| (p.as_path(), k))
            .expect("path under a fake mount")
    }

    /// Writes a file as the kernel would (tests use it to set counters and controllers).
    fn set(&self, path: impl AsRef<Path>, value: &str) {
        std::fs::write(self.real(path.as_ref()), value).unwrap();
    }

    fn get(&self, path: impl AsRef<Path>) -> String {
        std::fs::read_to_string(self.real(path.as_ref())).unwrap()
    }

    fn has(&self, path: impl AsRef<Path>) -> bool {
        self.real(path.as_ref()).exists()
    }

    /// The interface files of a new cgroup at `dir`.
    fn populate(&self, dir: &Path, kind: &Kind, root: bool) {
        let mut files = vec![("cgroup.procs", String::new())];
        match kind {
            Kind::V1(controllers) => {
                files.push(("tasks", String::new()));
                for c in *controllers {
                    let more: &[(&str, &str)] = match *c {
                        "memory" => &[
                            ("memory.limit_in_bytes", "9223372036854771712"),
                            ("memory.memsw.limit_in_bytes", "9223372036854771712"),
                            ("memory.swappiness", "60"),
                            ("memory.max_usage_in_bytes", "0"),
                        ],
                        "cpu" => &[
                            ("cpu.cfs_period_us", "100000"),
                            ("cpu.cfs_quota_us", "-1"),
                            ("cpu.shares", "1024"),
                            (
                                "cpu.stat",
                                "nr_periods 0\nnr_throttled 0\nthrottled_time 0\n",
                            ),
                        ],
                        "cpuacct" => &[("cpuacct.usage", "0")],
                        "pids" => &[("pids.max", "max")],
                        "cpuset" => &[("cpuset.cpus", ""), ("cpuset.mems", "")],
                        _ => &[],
                    };
                    files.extend(more.iter().map(|(f, v)| (*f, v.to_string())));
                }
            }
            Kind::V2 => {
                let offered = if root {
                    "cpuset cpu io memory hugetlb pids rdma misc".to_string()
                } else {
                    self.get(dir.parent().unwrap().join("cgroup.subtree_control"))
                };
                files.push(("cgroup.subtree_control", String::new()));
                files.push(("cpu.stat", "usage_usec 0\nnr_throttled 0\n".into()));
                for c in offered.split_whitespace() {
                    let more: &[(&str, &str)] = match c {
                        "memory" => &[
                            ("memory.max", "max"),
                            ("memory.swap.max", "max"),
                            ("memory.peak", "0"),
                        ],
                        "cpu" => &[("cpu.max", "max 100000"), ("cpu.weight", "100")],
                        "pids" => &[("pids.max", "max")],
                        _ => &[],
                    };
                    files.extend(more.iter().map(|(f, v)| (*f, v.to_string())));
                }
                files.push(("cgroup.controllers", offered));
            }
        }
        for (file, value) in files {
            if root && self.has(dir.join(file)) {
                continue;
            }
            self.set(dir.join(file), &value);
        }
    }
}

fn error(kind: io::ErrorKind) -> io::Error {
    io::Error::from(kind)
}

impl CgroupFs for FakeFs {
    fn read(&self, path: &Path) -> io::Result<String> {
        std::fs::read_to_string(self.real(path))
    }

    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        let real = self.real(path);
        if !real.is_file() {
            return Err(error(io::ErrorKind::NotFound));
        }
        let dir = path.parent().unwrap();
        match path.file_name().and_then(|f| f.to_str()) {
            Some("cgroup.subtree_control") => {
                let (point, _) = self.mount_of(path);
                if dir != point && !self.get(dir.join("cgroup.procs")).trim().is_empty() {
                    // No internal processes: a non-root cgroup with tasks keeps its controllers.
                    return Err(io::Error::from_raw_os_error(libc::EBUSY));
                }
                let offered = self.get(dir.join("cgroup.controllers"));
                let mut enabled: Vec<String> = self
                    .get(path)
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect();
                for token in value.split_whitespace() {
                    let name = token.trim_start_matches('+');
                    if !offered.split_whitespace().any(|o| o == name) {
                        return Err(error(io::ErrorKind::NotFound));
                    }
                    if !enabled.iter().any(|e| e == name) {
                        enabled.push(name.to_owned());
                    }
                }
                self.set(path, &enabled.join(" "));
                Ok(())
            }
            Some("cgroup.procs") => {
                let mut procs = self.get(path);
                procs.push_str(value);
                self.set(path, &procs);
                Ok(())
            }
            _ => std::fs::write(real, value),
        }
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir(self.real(path))?;
        let (_, kind) = self.mount_of(path);
        self.populate(path, &kind.clone(), false);
        Ok(())
    }

    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        let real = self.real(path);
        if !real.exists() {
            return Err(error(io::ErrorKind::NotFound));
        }
        if !self.subdirs(path)?.is_empty() || !self.get(path.join("cgroup.procs")).is_empty() {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        std::fs::remove_dir_all(real)
    }

    fn subdirs(&self, path: &Path) -> io::Result<Vec<String>> {
        RealFs.subdirs(&self.real(path))
    }

    fn exists(&self, path: &Path) -> bool {
        self.real(path).exists()
    }

    fn may_write(&self, path: &Path) -> io::Result<()> {
        if self.denied.lock().unwrap().iter().any(|d| d == path) {
            return Err(io::Error::from_raw_os_error(libc::EACCES));
        }
        if !self.exists(path) {
            return Err(error(io::ErrorKind::NotFound));
        }
        Ok(())
    }

    fn open_procs(&self, path: &Path) -> io::Result<OwnedFd> {
        RealFs.open_procs(&self.real(path))
    }

    fn process_alive(&self, pid: u32) -> bool {
        self.alive.lock().unwrap().contains(&pid)
    }
}

/// This host: v1 controllers each on its own mount, our memory cgroup below the root.
fn hybrid() -> (Arc<FakeFs>, Layout) {
    let fs = FakeFs::new(&[
        ("/sys/fs/cgroup/cpu", Kind::V1(&["cpu"])),
        ("/sys/fs/cgroup/cpuacct", Kind::V1(&["cpuacct"])),
        ("/sys/fs/cgroup/memory", Kind::V1(&["memory"])),
        ("/sys/fs/cgroup/pids", Kind::V1(&["pids"])),
        ("/sys/fs/cgroup/systemd", Kind::V1(&[])),
        ("/sys/fs/cgroup/unified", Kind::V2),
    ]);
    // The unified hierarchy carries none of our controllers here.
    fs.set("/sys/fs/cgroup/unified/cgroup.controllers", "hugetlb");
    fs.create_dir(Path::new("/sys/fs/cgroup/memory/process_api"))
        .unwrap();
    fs.create_dir(Path::new("/sys/fs/cgroup/memory/process_api/47d5"))
        .unwrap();
    fs.set("/sys/fs/cgroup/memory/process_api/47d5/cgroup.procs", "1\n");
    let layout = detect(HYBRID, HYBRID_CGROUP, &*fs).expect("hybrid layout");
    (fs, layout)
}

const HYBRID_CGROUP: &str = "\
9:name=systemd:/
8:pids:/
4:memory:/process_api/47d5
2:cpuacct:/
1:cpu:/
0::/
";

/// A pure v2 host with us at `cgroup` (`/` is the root).
fn pure_v2(cgroup: &str) -> (Arc<FakeFs>, Result<Layout, String>) {
    let fs = FakeFs::new(&[("/sys/fs/cgroup", Kind::V2)]);
    let mut dir = PathBuf::from("/sys/fs/cgroup");
    for part in cgroup.split('/').filter(|p| !p.is_empty()) {
        fs.write(
            &dir.join("cgroup.subtree_control"),
            "+memory +cpu +pids +io",
        )
        .unwrap();
        dir.push(part);
        fs.create_dir(&dir).unwrap();
    }
    fs.set(dir.join("cgroup.procs"), "1\n");
    let layout = detect(
        "25 1 0:22 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n",
        &format!("0::{cgroup}\n"),
        &*fs,
    );
    (fs, layout)
}

const VM_LIMITS: Limits = Limits {
    memory_bytes: 414 * MIB,
    pids: 128,
    cpu_quota_us: Some(20_000),
    cpu_share: CpuShare::Run,
};

#[test]
fn detects_this_hosts_hybrid_layout_as_v1_per_controller() {
    let (_fs, layout) = hybrid();
    let bases: Vec<(&Path, &[Controller])> = layout
        .hierarchies
        .iter()
        .map(|h| (h.base.as_path(), h.controllers.as_slice()))
        .collect();
    assert_eq!(
        bases,
        [
            (
                Path::new("/sys/fs/cgroup/memory/process_api/47d5"),
                &[Controller::Memory][..]
            ),
            (Path::new("/sys/fs/cgroup/cpu"), &[Controller::Cpu][..]),
            (
                Path::new("/sys/fs/cgroup/cpuacct"),
                &[Controller::CpuAcct][..]
            ),
            (Path::new("/sys/fs/cgroup/pids"), &[Controller::Pids][..]),
        ]
    );
    assert!(layout.hierarchies.iter().all(|h| !h.v2));
    assert_eq!(layout.version(), CgroupVersion::V1);
    assert!(layout.gaps.is_empty(), "{:?}", layout.gaps);
}

#[test]
fn a_pure_v2_host_serves_everything_from_the_unified_hierarchy() {
    let (_fs, layout) = pure_v2("/");
    let layout = layout.unwrap();
    assert_eq!(layout.hierarchies.len(), 1);
    let h = &layout.hierarchies[0];
    assert!(h.v2);
    assert_eq!(h.base, Path::new("/sys/fs/cgroup"), "we are in the root");
    assert_eq!(
        h.controllers,
        [Controller::Memory, Controller::Cpu, Controller::Pids]
    );
    assert_eq!(layout.version(), CgroupVersion::V2);
    // In a non-root cgroup (which holds us), VM cgroups go beside it.
    let (_fs, layout) = pure_v2("/user.slice/session-1.scope");
    assert_eq!(
        layout.unwrap().hierarchies[0].base,
        Path::new("/sys/fs/cgroup/user.slice")
    );
}

#[test]
fn v1_only_with_co_mounted_cpu_and_cpuacct_is_one_hierarchy_for_both() {
    let fs = FakeFs::new(&[
        ("/sys/fs/cgroup/cpu,cpuacct", Kind::V1(&["cpu", "cpuacct"])),
        ("/sys/fs/cgroup/memory", Kind::V1(&["memory"])),
        ("/sys/fs/cgroup/pids", Kind::V1(&["pids"])),
    ]);
    let mountinfo = "\
30 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
31 25 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
32 25 0:28 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
";
    let layout = detect(mountinfo, "3:cpu,cpuacct:/\n2:memory:/\n1:pids:/\n", &*fs).unwrap();
    assert_eq!(layout.hierarchies.len(), 3);
    assert_eq!(
        layout.hierarchies[1].controllers,
        [Controller::Cpu, Controller::CpuAcct]
    );
    assert!(layout.gaps.is_empty());
}

#[test]
fn without_cgroup_mounts_or_permission_there_is_no_layout_and_a_reason() {
    let fs = FakeFs::new(&[("/sys/fs/cgroup", Kind::V2)]);
    assert_eq!(
        detect("28 1 8:1 / / rw - ext4 /dev/sda1 rw\n", "0::/\n", &*fs),
        Err("no cgroup filesystem is mounted".into())
    );
    let v2 = "25 1 0:22 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
    fs.denied.lock().unwrap().push("/sys/fs/cgroup".into());
    let reason = detect(v2, "0::/\n", &*fs).unwrap_err();
    assert!(
        reason.contains("cannot create cgroups in /sys/fs/cgroup") && reason.contains("denied"),
        "{reason}"
    );
    let read_only = "25 1 0:22 / /sys/fs/cgroup ro,nosuid - cgroup2 cgroup2 rw\n";
    let reason = detect(read_only, "0::/\n", &*fs).unwrap_err();
    assert!(reason.contains("read-only"), "{reason}");
    // The hybrid unified hierarchy alone carries none of the controllers.
    let (fs, _) = hybrid();
    let unified_only = "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
    let reason = detect(unified_only, "0::/\n", &*fs).unwrap_err();
    assert_eq!(
        reason,
        "no memory controller; no cpu controller; no pids controller"
    );
}

#[test]
fn a_missing_controller_is_a_gap_not_a_failure() {
    let fs = FakeFs::new(&[("/sys/fs/cgroup", Kind::V2)]);
    fs.set("/sys/fs/cgroup/cgroup.controllers", "cpu memory io");
    let layout = detect(
        "25 1 0:22 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
        "0::/\n",
        &*fs,
    )
    .unwrap();
    assert_eq!(
        layout.hierarchies[0].controllers,
        [Controller::Memory, Controller::Cpu]
    );
    assert_eq!(layout.gaps, ["no pids controller"]);
    let parent = Arc::new(Parent::create(fs.clone(), layout, 7).unwrap());
    let vm = parent.vm("sbx-7-0", &VM_LIMITS).unwrap();
    assert_eq!(
        vm.status(),
        CgroupStatus {
            active: true,
            version: Some(CgroupVersion::V2),
            reason: Some("no pids controller".into()),
        }
    );
}

#[test]
fn escaped_mount_points_are_used_unescaped() {
    let fs = FakeFs::new(&[
        ("/run/my cgroups/memory", Kind::V1(&["memory"])),
        ("/run/my cgroups/cpu", Kind::V1(&["cpu"])),
        ("/run/my cgroups/pids", Kind::V1(&["pids"])),
    ]);
    let mountinfo = "\
31 25 0:27 / /run/my\\040cgroups/memory rw - cgroup cgroup rw,memory
32 25 0:28 / /run/my\\040cgroups/cpu rw - cgroup cgroup rw,cpu
33 25 0:29 / /run/my\\040cgroups/pids rw - cgroup cgroup rw,pids
";
    let layout = detect(mountinfo, "3:cpu:/\n2:memory:/\n1:pids:/\n", &*fs).unwrap();
    let parent = Arc::new(Parent::create(fs.clone(), layout, 9).unwrap());
    let vm = parent.vm("sbx-9-0", &VM_LIMITS).unwrap();
    assert!(fs.has("/run/my cgroups/memory/exec-sandbox/9/sbx-9-0/memory.limit_in_bytes"));
    drop(vm);
    drop(parent);
    assert!(!fs.has("/run/my cgroups/memory/exec-sandbox"));
}

/// The files behind a VM cgroup's join descriptors.
fn joined_files(vm: &VmCgroup) -> Vec<String> {
    use std::os::fd::AsRawFd;
    vm.join_fds()
        .unwrap()
        .iter()
        .map(|fd| {
            std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .unwrap()
                .display()
                .to_string()
        })
        .collect()
}

#[test]
fn a_v1_vm_cgroup_gets_its_limits_and_goes_with_its_guard() {
    let (fs, layout) = hybrid();
    let parent = Arc::new(Parent::create(fs.clone(), layout, 4242).unwrap());
    let vm = parent.vm("sbx-4242-0", &VM_LIMITS).unwrap();
    let memory = Path::new("/sys/fs/cgroup/memory/process_api/47d5/exec-sandbox/4242/sbx-4242-0");
    let cpu = Path::new("/sys/fs/cgroup/cpu/exec-sandbox/4242/sbx-4242-0");
    let pids = Path::new("/sys/fs/cgroup/pids/exec-sandbox/4242/sbx-4242-0");
    let bytes = (414 * MIB).to_string();
    assert_eq!(fs.get(memory.join("memory.limit_in_bytes")), bytes);
    assert_eq!(fs.get(memory.join("memory.memsw.limit_in_bytes")), bytes);
    assert_eq!(fs.get(memory.join("memory.swappiness")), "0");
    assert_eq!(fs.get(cpu.join("cpu.cfs_period_us")), "100000");
    assert_eq!(fs.get(cpu.join("cpu.cfs_quota_us")), "20000");
    assert_eq!(fs.get(pids.join("pids.max")), "128");
    assert!(fs.has("/sys/fs/cgroup/cpuacct/exec-sandbox/4242/sbx-4242-0/cpuacct.usage"));
    assert_eq!(vm.dirs().len(), 4);
    // v1: the child moves itself through `tasks`, which takes no global lock (see `join_file`).
    let joined = joined_files(&vm);
    assert_eq!(joined.len(), 4, "one per hierarchy: {joined:?}");
    assert!(
        joined.iter().all(|f| f.ends_with("sbx-4242-0/tasks")),
        "{joined:?}"
    );
    assert_eq!(
        vm.status(),
        CgroupStatus {
            active: true,
            version: Some(CgroupVersion::V1),
            reason: None,
        }
    );

    drop(vm);
    assert!(!fs.has(memory) && !fs.has(cpu) && !fs.has(pids));
    assert!(
        fs.has("/sys/fs/cgroup/pids/exec-sandbox/4242"),
        "the parent stays"
    );
    drop(parent);
    for base in [
        "/sys/fs/cgroup/memory/process_api/47d5",
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/cpuacct",
        "/sys/fs/cgroup/pids",
    ] {
        assert!(!fs.has(Path::new(base).join("exec-sandbox")), "{base}");
        assert!(fs.has(base), "{base}");
    }
}

#[test]
fn a_v2_vm_cgroup_gets_its_controllers_handed_down_and_its_limits() {
    let (fs, layout) = pure_v2("/");
    let parent = Arc::new(Parent::create(fs.clone(), layout.unwrap(), 5).unwrap());
    let vm = parent
        .vm(
            "sbx-5-1",
            &Limits {
                cpu_quota_us: None,
                ..VM_LIMITS
            },
        )
        .unwrap();
    for dir in [
        "/sys/fs/cgroup/exec-sandbox",
        "/sys/fs/cgroup/exec-sandbox/5",
    ] {
        assert_eq!(
            fs.get(Path::new(dir).join("cgroup.subtree_control")),
            "memory cpu pids",
            "{dir}"
        );
    }
    let dir = Path::new("/sys/fs/cgroup/exec-sandbox/5/sbx-5-1");
    assert_eq!(fs.get(dir.join("memory.max")), (414 * MIB).to_string());
    assert_eq!(fs.get(dir.join("memory.swap.max")), "0");
    assert_eq!(fs.get(dir.join("cpu.max")), "max 100000");
    assert_eq!(fs.get(dir.join("pids.max")), "128");
    let joined = joined_files(&vm);
    assert_eq!(joined.len(), 1, "{joined:?}");
    assert!(joined[0].ends_with("sbx-5-1/cgroup.procs"), "{joined:?}");
    drop(vm);
    drop(parent);
    assert!(!fs.has("/sys/fs/cgroup/exec-sandbox"));

    // Beside a cgroup that holds processes: the shared parent already hands them down.
    let (fs, layout) = pure_v2("/user.slice/session-1.scope");
    let parent = Arc::new(Parent::create(fs.clone(), layout.unwrap(), 6).unwrap());
    let _vm = parent.vm("sbx-6-0", &VM_LIMITS).unwrap();
    assert_eq!(
        fs.get("/sys/fs/cgroup/user.slice/exec-sandbox/6/sbx-6-0/cpu.max"),
        "20000 100000"
    );
}

#[test]
fn a_background_vm_gets_an_eighth_of_the_cpu_weight_until_it_runs() {
    let background = Limits {
        cpu_share: CpuShare::Background,
        ..VM_LIMITS
    };
    // v1: `cpu.shares`, the kernel's 1024 for a VM a caller waits for.
    let (fs, layout) = hybrid();
    let parent = Arc::new(Parent::create(fs.clone(), layout, 4242).unwrap());
    let cpu = Path::new("/sys/fs/cgroup/cpu/exec-sandbox/4242");
    let run = parent.vm("sbx-4242-0", &VM_LIMITS).unwrap();
    assert_eq!(fs.get(cpu.join("sbx-4242-0/cpu.shares")), "1024");
    let pooled = parent.vm("sbx-4242-1", &background).unwrap();
    assert_eq!(fs.get(cpu.join("sbx-4242-1/cpu.shares")), "128");
    pooled.set_cpu_share(CpuShare::Run).unwrap();
    assert_eq!(fs.get(cpu.join("sbx-4242-1/cpu.shares")), "1024");
    drop((run, pooled));

    // v2: `cpu.weight`, default 100.
    let (fs, layout) = pure_v2("/");
    let parent = Arc::new(Parent::create(fs.clone(), layout.unwrap(), 5).unwrap());
    let pooled = parent.vm("sbx-5-1", &background).unwrap();
    let weight = Path::new("/sys/fs/cgroup/exec-sandbox/5/sbx-5-1/cpu.weight");
    assert_eq!(fs.get(weight), "12");
    pooled.set_cpu_share(CpuShare::Run).unwrap();
    assert_eq!(fs.get(weight), "100");
}

#[test]
fn a_v2_cgroup_holding_processes_cannot_be_the_base_and_says_why() {
    let (fs, layout) = pure_v2("/");
    let mut layout = layout.unwrap();
    // As in a container whose cgroup namespace makes its own (busy) cgroup look like the root.
    fs.create_dir(Path::new("/sys/fs/cgroup/busy")).unwrap();
    fs.set("/sys/fs/cgroup/busy/cgroup.procs", "1\n");
    layout.hierarchies[0].base = "/sys/fs/cgroup/busy".into();
    let err = Parent::create(fs.clone(), layout, 8).err().unwrap();
    assert!(matches!(err, CgroupError::Enable { .. }), "{err}");
    assert_eq!(
        crate::vm::error_chain(&err),
        "cannot enable +memory +cpu +pids for the children of /sys/fs/cgroup/busy: \
         Device or resource busy (os error 16)"
    );
}

/// A kernel without swap accounting: cgroups show no memsw / swap.max files.
struct NoSwap(Arc<FakeFs>);

impl CgroupFs for NoSwap {
    fn read(&self, p: &Path) -> io::Result<String> {
        self.0.read(p)
    }
    fn write(&self, p: &Path, v: &str) -> io::Result<()> {
        self.0.write(p, v)
    }
    fn create_dir(&self, p: &Path) -> io::Result<()> {
        self.0.create_dir(p)?;
        for file in ["memory.memsw.limit_in_bytes", "memory.swap.max"] {
            std::fs::remove_file(self.0.real(&p.join(file))).ok();
        }
        Ok(())
    }
    fn remove_dir(&self, p: &Path) -> io::Result<()> {
        self.0.remove_dir(p)
    }
    fn subdirs(&self, p: &Path) -> io::Result<Vec<String>> {
        self.0.subdirs(p)
    }
    fn exists(&self, p: &Path) -> bool {
        self.0.exists(p)
    }
    fn may_write(&self, p: &Path) -> io::Result<()> {
        self.0.may_write(p)
    }
    fn open_procs(&self, p: &Path) -> io::Result<OwnedFd> {
        self.0.open_procs(p)
    }
    fn process_alive(&self, pid: u32) -> bool {
        self.0.process_alive(pid)
    }
}

#[test]
fn without_swap_accounting_the_swap_files_are_skipped() {
    let (v1, layout) = hybrid();
    let (v2, v2_layout) = pure_v2("/");
    for (fs, layout, limit_file) in [
        (v1, layout, "memory.limit_in_bytes"),
        (v2, v2_layout.unwrap(), "memory.max"),
    ] {
        let parent = Arc::new(Parent::create(Arc::new(NoSwap(fs.clone())), layout, 11).unwrap());
        let vm = parent
            .vm("sbx-11-0", &VM_LIMITS)
            .expect("no swap files, no failure");
        let memory = vm.dirs()[0].clone();
        assert_eq!(fs.get(memory.join(limit_file)), (414 * MIB).to_string());
        assert!(!fs.has(memory.join("memory.memsw.limit_in_bytes")));
        assert!(!fs.has(memory.join("memory.swap.max")));
        // And the result says so.
        let reason = vm.status().reason.unwrap_or_default();
        assert!(reason.contains("no swap accounting"), "{reason}");
    }
    // Where swap is accounted, nothing is said about it.
    let (fs, layout) = hybrid();
    let parent = Arc::new(Parent::create(fs, layout, 12).unwrap());
    let vm = parent.vm("sbx-12-0", &VM_LIMITS).unwrap();
    assert!(
        !vm.status().reason.unwrap_or_default().contains("swap"),
        "{:?}",
        vm.status()
    );
}

#[test]
fn usage_is_read_from_either_version() {
    let (fs, layout) = hybrid();
    let parent = Arc::new(Parent::create(fs.clone(), layout, 12).unwrap());
    let vm = parent.vm("sbx-12-0", &VM_LIMITS).unwrap();
    fs.set(
        "/sys/fs/cgroup/cpuacct/exec-sandbox/12/sbx-12-0/cpuacct.usage",
        "2345678901\n",
    );
    fs.set(
        "/sys/fs/cgroup/cpu/exec-sandbox/12/sbx-12-0/cpu.stat",
        "nr_periods 40\nnr_throttled 31\nthrottled_time 99\n",
    );
    fs.set(
        "/sys/fs/cgroup/memory/process_api/47d5/exec-sandbox/12/sbx-12-0/memory.max_usage_in_bytes",
        &(300 * MIB + 1).to_string(),
    );
    assert_eq!(
        vm.usage(),
        Usage {
            cpu_time_ms: Some(2345),
            memory_peak_mb: Some(301),
            cpu_nr_throttled: Some(31),
        }
    );

    let (fs, layout) = pure_v2("/");
    let parent = Arc::new(Parent::create(fs.clone(), layout.unwrap(), 13).unwrap());
    let vm = parent.vm("sbx-13-0", &VM_LIMITS).unwrap();
    let dir = Path::new("/sys/fs/cgroup/exec-sandbox/13/sbx-13-0");
    fs.set(
        dir.join("cpu.stat"),
        "usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\nnr_periods 10\nnr_throttled 4\nthrottled_usec 7\n",
    );
    fs.set(dir.join("memory.peak"), &(200 * MIB).to_string());
    assert_eq!(
        vm.usage(),
        Usage {
            cpu_time_ms: Some(1500),
            memory_peak_mb: Some(200),
            cpu_nr_throttled: Some(4),
        }
    );
    // A kernel without memory.peak: no peak from the cgroup (the caller falls back).
    std::fs::remove_file(fs.real(&dir.join("memory.peak"))).unwrap();
    assert_eq!(vm.usage().memory_peak_mb, None);
}

#[test]
fn sweeping_removes_only_what_dead_processes_left() {
    let (fs, layout) = hybrid();
    let dead = Arc::new(Parent::create(fs.clone(), layout.clone(), 100).unwrap());
    let dead_vm = dead.vm("sbx-100-0", &VM_LIMITS).unwrap();
    let alive = Arc::new(Parent::create(fs.clone(), layout.clone(), 200).unwrap());
    let _alive_vm = alive.vm("sbx-200-0", &VM_LIMITS).unwrap();
    let busy = Arc::new(Parent::create(fs.clone(), layout.clone(), 300).unwrap());
    let busy_vm = busy.vm("sbx-300-0", &VM_LIMITS).unwrap();
    fs.alive.lock().unwrap().push(200);
    // A QEMU that somehow outlived its dead parent: its cgroup cannot go yet.
    fs.set(
        "/sys/fs/cgroup/cpu/exec-sandbox/300/sbx-300-0/cgroup.procs",
        "4711\n",
    );
    fs.create_dir(Path::new("/sys/fs/cgroup/cpu/exec-sandbox/not-a-pid"))
        .unwrap();
    // Processes killed with `kill -9` run no destructors.
    std::mem::forget((dead, dead_vm, busy, busy_vm));

    let own = 400;
    assert_eq!(
        sweep(&*fs, &layout, own),
        4 + 3,
        "process 100 in all 4 hierarchies, process 300 in the 3 where its VM holds no task"
    );
    for h in &layout.hierarchies {
        let top = h.base.join(DIR_NAME);
        assert!(!fs.has(top.join("100")), "{}", top.display());
        assert!(fs.has(top.join("200/sbx-200-0")), "{}", top.display());
    }
    assert!(fs.has("/sys/fs/cgroup/cpu/exec-sandbox/300/sbx-300-0"));
    assert!(!fs.has("/sys/fs/cgroup/memory/process_api/47d5/exec-sandbox/300"));
    assert!(fs.has("/sys/fs/cgroup/cpu/exec-sandbox/not-a-pid"));
    // Once the straggler is gone, the next sweep takes it.
    fs.set(
        "/sys/fs/cgroup/cpu/exec-sandbox/300/sbx-300-0/cgroup.procs",
        "",
    );
    assert_eq!(sweep(&*fs, &layout, own), 1);
    assert!(!fs.has("/sys/fs/cgroup/cpu/exec-sandbox/300"));
}

#[test]
fn a_dead_namesakes_leftovers_are_taken_over() {
    let (fs, layout) = hybrid();
    let old = Arc::new(Parent::create(fs.clone(), layout.clone(), 77).unwrap());
    std::mem::forget(old.vm("sbx-77-0", &VM_LIMITS).unwrap());
    std::mem::forget(old);
    // A new process with the same pid.
    let parent = Arc::new(Parent::create(fs.clone(), layout, 77).unwrap());
    assert!(!fs.has("/sys/fs/cgroup/cpu/exec-sandbox/77/sbx-77-0"));
    let vm = parent.vm("sbx-77-0", &VM_LIMITS).unwrap();
    assert_eq!(vm.dirs().len(), 4);
}

#[test]
fn a_parent_swept_behind_our_back_is_remade() {
    let (fs, layout) = hybrid();
    let parent = Arc::new(Parent::create(fs.clone(), layout.clone(), 55).unwrap());
    // Another process took us for dead (another PID namespace) and removed our directories.
    assert_eq!(sweep(&*fs, &layout, 1), 4);
    let vm = parent.vm("sbx-55-3", &VM_LIMITS).unwrap();
    assert!(fs.has("/sys/fs/cgroup/pids/exec-sandbox/55/sbx-55-3/pids.max"));
    drop(vm);
}

#[test]
fn a_busy_vm_cgroup_is_removed_once_its_tasks_are_gone() {
    let (fs, layout) = hybrid();
    let parent = Arc::new(Parent::create(fs.clone(), layout, 66).unwrap());
    let vm = parent.vm("sbx-66-0", &VM_LIMITS).unwrap();
    let procs = PathBuf::from("/sys/fs/cgroup/pids/exec-sandbox/66/sbx-66-0/cgroup.procs");
    fs.set(&procs, "4711\n");
    let dirs = vm.dirs();
    // What the guard's helper thread does, with a short patience.
    let left = remove_when_empty(&*fs, dirs.clone(), Duration::from_millis(100));
    assert_eq!(left, [procs.parent().unwrap()]);
    let drain = std::thread::spawn({
        let fs = fs.clone();
        move || {
            std::thread::sleep(Duration::from_millis(50));
            fs.set(&procs, "");
        }
    });
    assert!(remove_when_empty(&*fs, dirs, Duration::from_secs(10)).is_empty());
    drain.join().unwrap();
    std::mem::forget(vm);
}

#[test]
fn a_v1_hierarchy_with_cpuset_gives_new_cgroups_its_cpus_and_nodes() {
    let fs = FakeFs::new(&[
        ("/sys/fs/cgroup/cpu,cpuset", Kind::V1(&["cpu", "cpuset"])),
        ("/sys/fs/cgroup/memory", Kind::V1(&["memory"])),
    ]);
    fs.set("/sys/fs/cgroup/cpu,cpuset/cpuset.cpus", "0-3\n");
    fs.set("/sys/fs/cgroup/cpu,cpuset/cpuset.mems", "0\n");
    let mountinfo = "\
30 25 0:26 / /sys/fs/cgroup/cpu,cpuset rw - cgroup cgroup rw,cpu,cpuset
31 25 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
";
    let layout = detect(mountinfo, "3:cpu,cpuset:/\n2:memory:/\n", &*fs).unwrap();
    assert!(layout.hierarchies[1].cpuset);
    assert_eq!(layout.gaps, ["no pids controller"]);
    let parent = Arc::new(Parent::create(fs.clone(), layout, 3).unwrap());
    let _vm = parent.vm("sbx-3-0", &VM_LIMITS).unwrap();
    let dir = Path::new("/sys/fs/cgroup/cpu,cpuset/exec-sandbox/3/sbx-3-0");
    assert_eq!(fs.get(dir.join("cpuset.cpus")), "0-3");
    assert_eq!(fs.get(dir.join("cpuset.mems")), "0");
}

#[test]
fn limits_follow_what_admission_charges() {
    let tcg = Limits::for_vm(256, 1, Accelerator::Tcg, 100, CpuShare::Run);
    let charged = Cost::vm(256, 1, Accelerator::Tcg).memory_mb;
    assert_eq!(charged, 256 + 30 + 64);
    assert_eq!(
        tcg.memory_bytes,
        (charged + limits::VM_CGROUP_MEMORY_HEADROOM_MB) * MIB
    );
    assert_eq!(tcg.cpu_quota_us, Some(100_000));
    assert_eq!(tcg.pids, limits::VM_PIDS_MAX);
    let kvm = Limits::for_vm(512, 2, Accelerator::Kvm, 20, CpuShare::Background);
    assert_eq!(
        kvm.memory_bytes,
        (512 + 30 + limits::VM_CGROUP_MEMORY_HEADROOM_MB) * MIB
    );
    assert_eq!(kvm.cpu_quota_us, Some(40_000), "20 % of a core per vCPU");
    assert_eq!(
        Limits::for_vm(256, 1, Accelerator::Kvm, 0, CpuShare::Run).cpu_quota_us,
        None
    );
    assert_eq!(kvm.cpu_share, CpuShare::Background);
}

#[test]
fn vm_names_become_safe_directory_names() {
    assert_eq!(dir_name("sbx-12-3"), "sbx-12-3");
    assert_eq!(dir_name("a/b c"), "a_b_c");
    assert_eq!(dir_name(".."), "vm..");
    assert_eq!(dir_name(""), "vm");
}

#[test]
fn stat_fields_are_found_by_exact_name() {
    let stat = "nr_periods 5\nnr_throttled 2\nthrottled_time 30\n";
    assert_eq!(stat_field(stat, "nr_throttled"), Some(2));
    assert_eq!(stat_field(stat, "throttled"), None);
    assert_eq!(stat_field("nr_throttled x\n", "nr_throttled"), None);
}
