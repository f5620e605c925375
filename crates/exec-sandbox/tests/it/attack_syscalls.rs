//! Kernel syscalls that open attack surface or need privilege (bpf, io_uring, userfaultfd,
//! namespaces, keyrings, modules, kexec, perf, mount, swap, reboot, the clock, raw I/O ports),
//! made directly through `syscall(2)` from Python's ctypes: each fails, with an errno that says
//! the kernel lacks it (ENOSYS) or refuses the sandbox user (EPERM, EACCES, ...), never success.

use exec_sandbox::Language;

use crate::support::{outcome, run};

const SCRIPT: &str = r#"
import ctypes, errno, os

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
assert os.uname().machine == "x86_64", os.uname().machine
NR = dict(
    bpf=321, io_uring_setup=425, userfaultfd=323, unshare=272, keyctl=250, add_key=248,
    request_key=249, init_module=175, finit_module=313, delete_module=176, kexec_load=246,
    kexec_file_load=320, perf_event_open=298, mount=165, umount2=166, swapon=167, swapoff=168,
    reboot=169, settimeofday=164, clock_settime=227, adjtimex=159, sethostname=170,
    setdomainname=171, chroot=161, pivot_root=155, iopl=172, ioperm=173, acct=163,
    open_by_handle_at=304, setns=308, fsopen=430, move_mount=429, open_tree=428,
    process_vm_readv=310, quotactl=179, syslog=103, vhangup=153, lookup_dcookie=212,
)

def arg(a):
    if isinstance(a, bytes):
        return ctypes.c_char_p(a)
    if isinstance(a, int):
        return ctypes.c_long(a)
    return a

def call(label, name, *args):
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(NR[name]), *map(arg, args))
    e = ctypes.get_errno()
    outcome = ("SUCCEEDED %d" % r) if r >= 0 else errno.errorcode.get(e, str(e))
    print("%s: %s" % (label, outcome), flush=True)

def buf(n, data=b""):
    b = ctypes.create_string_buffer(data, n) if data else ctypes.create_string_buffer(n)
    return ctypes.addressof(b), b

attr, _a = buf(128)
call("bpf", "bpf", 0, attr, 128)  # BPF_MAP_CREATE
params, _p = buf(120)
call("io_uring_setup", "io_uring_setup", 8, params)
call("userfaultfd", "userfaultfd", 0)
for flag, name in [(0x10000000, "NEWUSER"), (0x00020000, "NEWNS"), (0x40000000, "NEWNET"),
                   (0x20000000, "NEWPID"), (0x04000000, "NEWUTS"), (0x08000000, "NEWIPC"),
                   (0x02000000, "NEWCGROUP")]:
    call("unshare CLONE_" + name, "unshare", flag)
call("keyctl", "keyctl", 0, -3, 1)  # KEYCTL_GET_KEYRING_ID, the session keyring, create
call("add_key", "add_key", b"user", b"k", b"v", 1, -3)
call("request_key", "request_key", b"user", b"k", None, 0)
image, _i = buf(64, b"\x7fELF")
call("init_module", "init_module", image, 64, b"")
fd = os.open("/usr/bin/true", os.O_RDONLY)
call("finit_module", "finit_module", fd, b"", 0)
call("delete_module", "delete_module", b"virtio_net", 0x800)  # O_NONBLOCK
call("kexec_load", "kexec_load", 0, 0, 0, 0)
call("kexec_file_load", "kexec_file_load", fd, fd, 1, b"", 0)
pattr, _pa = buf(128, (1).to_bytes(4, "little") + (128).to_bytes(4, "little"))  # cpu-clock
call("perf_event_open", "perf_event_open", pattr, 0, -1, -1, 0)
hw, _hw = buf(128, (0).to_bytes(4, "little") + (128).to_bytes(4, "little"))  # cpu-cycles
call("perf_event_open all cpus", "perf_event_open", hw, -1, 0, -1, 0)
os.makedirs("/tmp/mnt", exist_ok=True)
call("mount", "mount", b"none", b"/tmp/mnt", b"tmpfs", 0, None)
call("umount2 /tmp", "umount2", b"/tmp", 2)  # MNT_DETACH
call("fsopen", "fsopen", b"tmpfs", 0)
call("open_tree", "open_tree", -100, b"/tmp", 1)  # OPEN_TREE_CLONE
with open("/tmp/swap", "wb") as f:
    f.write(b"\0" * 65536)
call("swapon", "swapon", b"/tmp/swap", 0)
call("swapoff", "swapoff", b"/tmp/swap")
call("reboot", "reboot", 0xfee1dead, 672274793, 0x4321FEDC, 0)  # LINUX_REBOOT_CMD_POWER_OFF
call("reboot kexec", "reboot", 0xfee1dead, 672274793, 0x45584543, 0)
tv, _tv = buf(16)
call("settimeofday", "settimeofday", tv, 0)
call("clock_settime", "clock_settime", 0, tv)
tx, _tx = buf(256, (1).to_bytes(4, "little"))  # ADJ_OFFSET
call("adjtimex", "adjtimex", tx)
call("sethostname", "sethostname", b"evil", 4)
call("setdomainname", "setdomainname", b"evil", 4)
call("chroot", "chroot", b"/tmp")
call("pivot_root", "pivot_root", b"/tmp", b"/tmp/mnt")
call("iopl", "iopl", 3)
call("ioperm", "ioperm", 0x80, 1, 1)
call("acct", "acct", b"/tmp/acct")
handle, _h = buf(64, (8).to_bytes(4, "little") + (1).to_bytes(4, "little"))
call("open_by_handle_at", "open_by_handle_at", -100, handle, 0)
call("setns", "setns", os.open("/proc/self/ns/mnt", os.O_RDONLY), 0)
local, _l = buf(16)
call("process_vm_readv pid 1", "process_vm_readv", 1, local, 1, local, 1, 0)
call("quotactl", "quotactl", 0x800002, b"/dev/vda", 0, 0)  # Q_QUOTAON
log, _log = buf(128)
call("syslog read", "syslog", 3, log, 128)  # SYSLOG_ACTION_READ_ALL
call("syslog clear", "syslog", 5, 0, 0)
call("vhangup", "vhangup")
"#;

/// Each attempt and the errnos it may fail with.
const EXPECTED: &[(&str, &[&str])] = &[
    ("bpf", &["ENOSYS", "EPERM"]),
    ("io_uring_setup", &["ENOSYS", "EPERM"]),
    ("userfaultfd", &["ENOSYS", "EPERM"]),
    // No user namespaces (`user.max_user_namespaces=0` answers ENOSPC), and the rest need
    // CAP_SYS_ADMIN.
    ("unshare CLONE_NEWUSER", &["EPERM", "EINVAL", "ENOSPC"]),
    ("unshare CLONE_NEWNS", &["EPERM"]),
    ("unshare CLONE_NEWNET", &["EPERM", "EINVAL"]),
    ("unshare CLONE_NEWPID", &["EPERM", "EINVAL"]),
    ("unshare CLONE_NEWUTS", &["EPERM", "EINVAL"]),
    ("unshare CLONE_NEWIPC", &["EPERM", "EINVAL"]),
    ("unshare CLONE_NEWCGROUP", &["EPERM", "EINVAL"]),
    ("keyctl", &["ENOSYS", "EPERM", "EACCES"]),
    ("add_key", &["ENOSYS", "EPERM", "EACCES"]),
    ("request_key", &["ENOSYS", "EPERM", "EACCES"]),
    ("init_module", &["ENOSYS", "EPERM"]),
    ("finit_module", &["ENOSYS", "EPERM"]),
    ("delete_module", &["ENOSYS", "EPERM"]),
    ("kexec_load", &["ENOSYS", "EPERM"]),
    ("kexec_file_load", &["ENOSYS", "EPERM"]),
    ("perf_event_open", &["ENOSYS", "EACCES", "EPERM"]),
    ("perf_event_open all cpus", &["ENOSYS", "EACCES", "EPERM"]),
    ("mount", &["EPERM"]),
    ("umount2 /tmp", &["EPERM"]),
    ("fsopen", &["ENOSYS", "EPERM"]),
    ("open_tree", &["ENOSYS", "EPERM"]),
    ("swapon", &["ENOSYS", "EPERM"]),
    ("swapoff", &["ENOSYS", "EPERM"]),
    ("reboot", &["EPERM"]),
    ("reboot kexec", &["EPERM"]),
    ("settimeofday", &["EPERM"]),
    ("clock_settime", &["EPERM"]),
    ("adjtimex", &["EPERM"]),
    ("sethostname", &["EPERM"]),
    ("setdomainname", &["EPERM"]),
    ("chroot", &["EPERM"]),
    ("pivot_root", &["EPERM"]),
    ("iopl", &["ENOSYS", "EPERM"]),
    ("ioperm", &["ENOSYS", "EPERM"]),
    ("acct", &["ENOSYS", "EPERM"]),
    ("open_by_handle_at", &["ENOSYS", "EPERM"]),
    ("setns", &["EPERM"]),
    // PID 1 is not ours (or the kernel has no cross-memory attach).
    ("process_vm_readv pid 1", &["ENOSYS", "ESRCH", "EPERM"]),
    ("quotactl", &["ENOSYS", "EPERM"]),
    ("syslog read", &["EPERM"]),
    ("syslog clear", &["EPERM"]),
    ("vhangup", &["EPERM"]),
];

#[tokio::test]
async fn dangerous_syscalls_fail_for_the_sandbox_user() {
    let r = run(Language::Python, SCRIPT).await;
    assert_eq!(r.exit_code, 0, "{r:?}");
    let lines = r.stdout.lines().count();
    assert_eq!(lines, EXPECTED.len(), "one line per attempt:\n{}", r.stdout);
    for (name, errnos) in EXPECTED {
        let got = outcome(&r, name);
        assert!(
            errnos.contains(&got),
            "{name}: got {got}, expected one of {errnos:?}\n{}",
            r.stdout
        );
    }
    assert!(!r.stdout.contains("SUCCEEDED"), "{}", r.stdout);
}
