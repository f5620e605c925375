//! `/proc` and `/sys`: the sandbox user cannot change kernel settings, read kernel memory or
//! addresses, see other users' processes (`hidepid`), read the kernel log, or write sysfs.

use exec_sandbox::Language;

use crate::support::{expect_outcome, run};

/// Prints `<label>: absent`, `<label>: WRITTEN` or `<label>: refused (<error>)`.
const PROBE_WRITE: &str = r#"
probe_write() { # label path value
    if [ ! -e "$2" ]; then echo "$1: absent"; return; fi
    local err
    if err=$( (echo "$3" > "$2") 2>&1 ); then echo "$1: WRITTEN"; else echo "$1: refused (${err##*: })"; fi
}
"#;

/// Writable sysctls as root; each must refuse the sandbox user.
const SYSCTLS: &[&str] = &[
    "kernel/hostname",
    "kernel/domainname",
    "vm/drop_caches",
    "kernel/panic",
    "kernel/randomize_va_space",
    "kernel/kptr_restrict",
    "kernel/dmesg_restrict",
    "kernel/perf_event_paranoid",
    "vm/overcommit_memory",
    "user/max_user_namespaces",
    "fs/suid_dumpable",
    "fs/protected_hardlinks",
    "net/ipv4/ip_forward",
];

/// Sysctls of features this kernel may lack (the syscalls are then missing too, or it has no
/// core dumps, modules, magic SysRq or Yama); refused when present.
const MAYBE_ABSENT_SYSCTLS: &[&str] = &[
    "kernel/unprivileged_bpf_disabled",
    "vm/unprivileged_userfaultfd",
    "kernel/core_pattern",
    "kernel/modprobe",
    "kernel/sysrq",
    "kernel/yama/ptrace_scope",
];

/// Sysfs attributes writable by root; each must refuse the sandbox user. (The kernel is
/// uniprocessor: Tiny RCU has no `/sys/kernel/rcu_expedited`.)
const SYSFS: &[&str] = &[
    "/sys/kernel/reboot/mode",
    "/sys/kernel/mm/swap/vma_ra_enabled",
    "/sys/block/vda/queue/scheduler",
    "/sys/block/vda/uevent",
    "/sys/module/printk/parameters/time",
    "/sys/class/net/lo/mtu",
];

#[tokio::test]
async fn proc_and_sys_refuse_the_sandbox_user() {
    let mut script = String::from(PROBE_WRITE);
    for key in SYSCTLS.iter().chain(MAYBE_ABSENT_SYSCTLS) {
        script.push_str(&format!("probe_write {key} /proc/sys/{key} 1\n"));
    }
    for path in SYSFS {
        script.push_str(&format!("probe_write {path} {path} 1\n"));
    }
    script.push_str(
        r#"
echo "hostname after: $(cat /proc/sys/kernel/hostname)"
echo "hostname command: $(hostname evil 2>&1 >/dev/null | sed 's/.*: //')"
probe_write /proc/sysrq-trigger /proc/sysrq-trigger b
echo "/proc/kcore: $([ -e /proc/kcore ] && echo present || echo absent)"
if [ -e /proc/kallsyms ]; then
    echo "/proc/kallsyms: $(grep -vc '^0*[[:space:]]' /proc/kallsyms) nonzero"
else
    echo "/proc/kallsyms: absent"
fi
echo "/proc/iomem: $(grep -c -v '^ *0*-0* ' /proc/iomem) nonzero"
echo "/proc/modules: $([ -e /proc/modules ] && echo present || echo absent)"
for f in environ cmdline maps status mem; do
    err=$(cat /proc/1/$f 2>&1 >/dev/null) && echo "/proc/1/$f: READ" || echo "/proc/1/$f: refused (${err##*: })"
done
echo "pid owners: $(stat -c %u /proc/[0-9]* | sort -u | tr '\n' ' ')"
echo "dmesg: $(dmesg 2>&1 >/dev/null | head -1 | sed 's/.*: //')"
mkdir /sys/kernel/sbx_probe 2>/dev/null && echo "mkdir /sys/kernel: CREATED" || echo "mkdir /sys/kernel: refused"
"#,
    );
    let r = run(Language::Raw, &script).await;
    assert_eq!(r.exit_code, 0, "{}", r.stderr);

    let denied = "refused (Permission denied)";
    for key in SYSCTLS {
        expect_outcome(&r, key, &[denied]);
    }
    for key in MAYBE_ABSENT_SYSCTLS {
        expect_outcome(&r, key, &[denied, "absent"]);
    }
    expect_outcome(&r, "hostname after", &["sandbox"]);
    expect_outcome(
        &r,
        "hostname command",
        &["you must be root to change the host name"],
    );
    expect_outcome(&r, "/proc/sysrq-trigger", &[denied, "absent"]);

    // Kernel memory and addresses.
    expect_outcome(&r, "/proc/kcore", &["absent"]);
    expect_outcome(&r, "/proc/kallsyms", &["absent", "0 nonzero"]);
    expect_outcome(&r, "/proc/iomem", &["0 nonzero"]);
    expect_outcome(&r, "/proc/modules", &["absent"]);

    // hidepid: PID 1 (the agent, root) is invisible, and so is every other user's process.
    for f in ["environ", "cmdline", "maps", "status", "mem"] {
        expect_outcome(
            &r,
            &format!("/proc/1/{f}"),
            &["refused (No such file or directory)"],
        );
    }
    expect_outcome(&r, "pid owners", &["1000 "]);
    expect_outcome(&r, "dmesg", &["Operation not permitted"]);

    for path in SYSFS {
        expect_outcome(&r, path, &[denied]);
    }
    expect_outcome(&r, "mkdir /sys/kernel", &["refused"]);
    assert!(!r.stdout.contains("WRITTEN"), "{}", r.stdout);
}
