//! Privileges and capabilities: user code runs as uid/gid 1000 with no effective or permitted
//! capabilities and no-new-privs, finds no setuid/setgid program, and cannot become root
//! (`su`, `sudo`), mount, chroot or trace PID 1.

use exec_sandbox::Language;

use crate::support::{expect_outcome, outcome, run};

const SCRIPT: &str = r#"
import ctypes, errno, os, shutil, subprocess

def show(name, value):
    print("%s: %s" % (name, value), flush=True)

def sh(cmd):
    p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60)
    return p.returncode, (p.stdout + p.stderr).strip()

show("ids", "%d %d %d %d" % (os.getuid(), os.geteuid(), os.getgid(), os.getegid()))
show("groups", " ".join(map(str, os.getgroups())) or "none")
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
for field in ("Uid", "Gid", "CapInh", "CapPrm", "CapEff", "CapAmb", "CapBnd", "NoNewPrivs"):
    show(field, " ".join(status[field].split()))

rc, out = sh("find / -xdev -perm /6000 -type f 2>/dev/null")
show("setuid/setgid files", out.replace("\n", " ") or "none")

for tool in ("sudo", "doas", "pkexec"):
    show("which " + tool, shutil.which(tool) or "absent")
rc, out = sh("echo x | su -c id root 2>&1")
show("su", "rc %d, root %s" % (rc, "uid=0" in out))
rc, out = sh("newgrp root -c id 2>&1 </dev/null")
show("newgrp", "rc %d, root %s" % (rc, "gid=0" in out))

libc = ctypes.CDLL(None, use_errno=True)
def errname(r):
    return "SUCCEEDED" if r == 0 else errno.errorcode[ctypes.get_errno()]
MS_REMOUNT = 32
os.makedirs("/tmp/mnt", exist_ok=True)
show("mount(2) tmpfs", errname(libc.mount(b"none", b"/tmp/mnt", b"tmpfs", 0, None)))
show("mount(2) remount / rw", errname(libc.mount(None, b"/", None, MS_REMOUNT, None)))
rc, out = sh("mount -t tmpfs none /tmp/mnt")
show("mount(8)", "rc %d" % rc)
show("chroot(2)", errname(libc.chroot(b"/tmp")))
PTRACE_ATTACH, PTRACE_SEIZE = 16, 0x4206
libc.ptrace.restype = ctypes.c_long
show("ptrace attach 1", errname(libc.ptrace(PTRACE_ATTACH, 1, None, None)))
show("ptrace seize 1", errname(libc.ptrace(PTRACE_SEIZE, 1, None, None)))
try:
    os.setuid(0)
    show("setuid(0)", "SUCCEEDED")
except OSError as e:
    show("setuid(0)", errno.errorcode[e.errno])
try:
    os.setgroups([0])
    show("setgroups([0])", "SUCCEEDED")
except OSError as e:
    show("setgroups([0])", errno.errorcode[e.errno])
rc, out = sh("setpriv --reuid=0 id")
show("setpriv --reuid=0", "rc %d" % rc)
rc, out = sh("unshare -r id")
show("unshare -r", "rc %d" % rc)
"#;

#[tokio::test]
async fn user_code_has_no_privileges_and_cannot_gain_any() {
    let r = run(Language::Python, SCRIPT).await;
    assert_eq!(r.exit_code, 0, "{r:?}");
    expect_outcome(&r, "ids", &["1000 1000 1000 1000"]);
    // No supplementary groups at all.
    expect_outcome(&r, "groups", &["none"]);
    expect_outcome(&r, "Uid", &["1000 1000 1000 1000"]);
    expect_outcome(&r, "Gid", &["1000 1000 1000 1000"]);
    for caps in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        expect_outcome(&r, caps, &["0000000000000000"]);
    }
    // The bounding set is whatever the kernel started with; with no permitted capabilities,
    // no-new-privs and no setuid program it cannot be used. Shown for the record.
    assert!(
        u64::from_str_radix(outcome(&r, "CapBnd"), 16).is_ok(),
        "{}",
        r.stdout
    );
    expect_outcome(&r, "NoNewPrivs", &["1"]);

    expect_outcome(&r, "setuid/setgid files", &["none"]);
    for tool in ["sudo", "doas", "pkexec"] {
        expect_outcome(&r, &format!("which {tool}"), &["absent"]);
    }
    // `su` is there (util-linux), but not setuid: it cannot read the shadow file.
    expect_outcome(&r, "su", &["rc 1, root False"]);
    let newgrp = outcome(&r, "newgrp");
    assert!(
        newgrp.ends_with("root False") && !newgrp.starts_with("rc 0"),
        "{}",
        r.stdout
    );

    expect_outcome(&r, "mount(2) tmpfs", &["EPERM"]);
    expect_outcome(&r, "mount(2) remount / rw", &["EPERM"]);
    expect_outcome(&r, "mount(8)", &["rc 32"]);
    expect_outcome(&r, "chroot(2)", &["EPERM"]);
    // Yama's ptrace_scope (or, without Yama, hidepid and the uid check) refuses.
    expect_outcome(&r, "ptrace attach 1", &["EPERM", "ESRCH"]);
    expect_outcome(&r, "ptrace seize 1", &["EPERM", "ESRCH"]);
    expect_outcome(&r, "setuid(0)", &["EPERM"]);
    expect_outcome(&r, "setgroups([0])", &["EPERM"]);
    let setpriv = outcome(&r, "setpriv --reuid=0");
    assert_ne!(setpriv, "rc 0", "{}", r.stdout);
    let unshare = outcome(&r, "unshare -r");
    assert_ne!(unshare, "rc 0", "{}", r.stdout);
    assert!(!r.stdout.contains("SUCCEEDED"), "{}", r.stdout);
}
