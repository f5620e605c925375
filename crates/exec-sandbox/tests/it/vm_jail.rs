//! The jailer: QEMU runs unprivileged (no capabilities, no-new-privs, QEMU's own seccomp filter)
//! in fresh mount, PID, IPC, UTS and network namespaces, seeing only the files it needs. Checked
//! from the outside, through `/proc`, on VMs booted cold and restored from a memory snapshot.

use exec_sandbox::{Language, Scheduler, SchedulerConfig, Session, SessionOptions};

use crate::support::{chain, qemu_pid};

/// A scheduler that boots cold (`l1 == false`) or restores from memory snapshots saved in its
/// own cache (kept until the returned directory is dropped).
fn scheduler(l1: bool) -> (Scheduler, tempfile::TempDir) {
    let dir = tempfile::Builder::new()
        .prefix("sbx-jail-test-")
        .tempdir()
        .unwrap();
    let config = SchedulerConfig {
        l1_snapshots: l1,
        snapshot_cache_dir: dir.path().to_path_buf(),
        warm_pool_size: 0,
        ..SchedulerConfig::from_env().expect("test environment config")
    };
    (Scheduler::new(config).expect("scheduler"), dir)
}

async fn open(s: &Scheduler) -> Session {
    match s.session(SessionOptions::new(Language::Python)).await {
        Ok(session) => session,
        Err(e) => panic!("session failed: {}", chain(&e)),
    }
}

/// The value of the `name:` line of a `/proc/<pid>/status`.
fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(':')))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
}

fn namespace(pid: &str, ns: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{ns}"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/ns/{ns}: {e}"))
        .display()
        .to_string()
}

/// Everything the jail promises, read from the host's `/proc` for the running QEMU `pid`.
fn assert_jailed(pid: u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    for ids in ["Uid", "Gid"] {
        let values: Vec<&str> = field(&status, ids).split_whitespace().collect();
        assert_eq!(values.len(), 4, "{ids}: {values:?}");
        // Real, effective, saved and filesystem ids: none is root.
        assert!(values.iter().all(|v| *v != "0"), "{ids}: {values:?}");
    }
    assert_eq!(field(&status, "Groups"), "", "no supplementary groups");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(&status, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(field(&status, "NoNewPrivs"), "1");
    // QEMU's own `-sandbox on` installs a seccomp filter.
    assert_eq!(field(&status, "Seccomp"), "2");
    // PID 1 of its own PID namespace.
    assert_eq!(
        field(&status, "NSpid").split_whitespace().last(),
        Some("1"),
        "{status}"
    );
    let pid = pid.to_string();
    for ns in ["mnt", "pid", "ipc", "uts", "net"] {
        assert_ne!(
            namespace(&pid, ns),
            namespace("self", ns),
            "QEMU shares the test's {ns} namespace"
        );
    }
    // Its root holds only what QEMU opens by path.
    let root = std::path::PathBuf::from(format!("/proc/{pid}/root"));
    let mut names: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in &names {
        assert!(
            [
                "bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "sbin", "usr"
            ]
            .contains(&name.as_str()),
            "{name} in QEMU's root: {names:?}"
        );
    }
    for absent in ["home", "root", "tmp", "var", "sys", "boot"] {
        assert!(!root.join(absent).exists(), "/{absent} visible to QEMU");
    }
    let mut devices: Vec<String> = std::fs::read_dir(root.join("dev"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    devices.sort();
    devices.retain(|d| d != "kvm");
    assert_eq!(devices, ["null", "urandom"]);
    let etc: Vec<String> = std::fs::read_dir(root.join("etc"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        etc,
        ["ld.so.cache"],
        "nothing of the host's /etc but the loader's cache"
    );
    // The cache directory (snapshots, images) is not there by path.
    let cache = SchedulerConfig::from_env().unwrap().cache_dir;
    assert!(!root.join(cache.strip_prefix("/").unwrap()).exists());
    // Read-only: the jail's own tmpfs root cannot be written even by its owner.
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mounts")).unwrap();
    let root_mount = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("/"))
        .unwrap_or_else(|| panic!("no / in {mounts}"));
    assert!(root_mount.contains(" ro,"), "{root_mount}");
    // Its descriptors are the host's files: images and sockets, no directory of the host.
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let target = std::fs::read_link(fd.unwrap().path()).unwrap();
        assert!(
            !target.is_dir(),
            "QEMU holds the directory {}",
            target.display()
        );
    }
}

/// Unless the environment names a binary, QEMU is exec-sandbox's own build: microvm and its
/// devices, none of the host QEMU's display, audio, USB or disassembler libraries.
fn assert_own_qemu(pid: u32) {
    if SchedulerConfig::from_env().unwrap().qemu_binary.is_some() {
        return;
    }
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert!(
        exe.starts_with("/usr/local/lib/exec-sandbox/qemu/"),
        "{}",
        exe.display()
    );
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut libraries: Vec<&str> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter_map(|path| path.rsplit('/').next())
        .filter(|name| name.contains(".so"))
        .collect();
    libraries.sort_unstable();
    libraries.dedup();
    let allowed = [
        "ld-linux-x86-64",
        "libc",
        "libm",
        "libgcc_s",
        "libglib-2.0",
        "libpcre2-8",
        "libpixman-1",
        "libseccomp",
        "libfdt",
        "libz",
    ];
    for library in &libraries {
        // `libz.so.1.2.13`, `libfdt-1.6.1.so`: the name before its version.
        assert!(
            allowed
                .iter()
                .any(|name| library.starts_with(&format!("{name}.so"))
                    || library.starts_with(&format!("{name}-"))),
            "{library} in the own QEMU: {libraries:?}"
        );
    }
}

async fn jailed_session(l1: bool) {
    let (s, _snapshots) = scheduler(l1);
    if l1 {
        // A run boots cold and saves the template (itself a jailed QEMU writing its RAM file).
        let r = s
            .run(exec_sandbox::RunOptions::new(Language::Python, "print(1)"))
            .await
            .unwrap_or_else(|e| panic!("run failed: {}", chain(&e)));
        assert_eq!(r.stdout, "1\n", "{}", r.stderr);
        s.wait_for_snapshots().await;
    }
    let session = open(&s).await;
    let pid = qemu_pid(session.vm_name()).expect("the session's QEMU");
    assert_jailed(pid);
    assert_own_qemu(pid);
    // The guest still works (files handed over, console, control channel).
    let r = session
        .exec(exec_sandbox::ExecOptions::new("print(6 * 7)"))
        .await
        .unwrap_or_else(|e| panic!("exec failed: {}", chain(&e)));
    assert_eq!(r.stdout, "42\n", "{}", r.stderr);
    // The result reports the walls as built.
    let walls = &r.isolation;
    assert!(walls.unprivileged, "{walls:?}");
    assert_eq!(walls.namespaces, ["mount", "pid", "ipc", "uts", "net"]);
    assert!(walls.cgroup, "{walls:?}");
    assert!(
        !walls.reason.as_deref().unwrap_or("").contains("jail:"),
        "{walls:?}"
    );
    assert_eq!(r.l1_cache_hit, l1, "the VM's origin");
    session.close().await;
    s.shutdown().await;
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU {pid} outlived its session"
    );
}

#[tokio::test]
async fn qemu_runs_unprivileged_in_its_own_namespaces_booted_cold() {
    jailed_session(false).await;
}

#[tokio::test]
async fn qemu_runs_unprivileged_in_its_own_namespaces_restored_from_a_snapshot() {
    jailed_session(true).await;
}
