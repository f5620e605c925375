//! Filesystem writes: the root filesystem is read-only (EROFS) and the root-owned tmpfs mounts
//! refuse the sandbox user; only `/tmp`, `/home/user` and `/dev/shm` take its files. Device
//! nodes cannot be made, nor root's files changed, taken over or removed.

use exec_sandbox::Language;

use crate::support::{expect_outcome, run};

/// Directories of the read-only root filesystem.
const READ_ONLY: &[&str] = &[
    "/",
    "/usr",
    "/usr/bin",
    "/usr/lib",
    "/usr/local/bin",
    "/etc",
    "/bin",
    "/sbin",
    "/lib",
    "/var",
    "/var/tmp",
    "/opt",
    "/srv",
    "/boot",
    "/mnt",
];

/// Root-owned directories on writable filesystems (or with no write bit for others).
const ROOT_OWNED: &[&str] = &["/root", "/run", "/run/sbx", "/dev", "/dev/pts", "/sys"];

const WRITABLE: &[&str] = &["/tmp", "/home/user", "/dev/shm"];

#[tokio::test]
async fn only_the_scratch_mounts_are_writable() {
    let mut script = String::from(
        r#"
attempt() { # label command...
    local label=$1 err; shift
    if err=$("$@" 2>&1); then echo "$label: DONE"; return; fi
    err=${err%%$'\n'*}
    echo "$label: refused (${err##*: })"
}
probe_dir() {
    [ -d "$1" ] || { echo "write $1: absent"; return; }
    if err=$( (: > "$1/.sbx_probe") 2>&1 ); then rm -f "$1/.sbx_probe"; echo "write $1: ok"
    else echo "write $1: refused (${err##*: })"; fi
}
"#,
    );
    for dir in READ_ONLY.iter().chain(ROOT_OWNED).chain(WRITABLE) {
        script.push_str(&format!("probe_dir {dir}\n"));
    }
    script.push_str(
        r#"
attempt "mknod c /tmp" mknod /tmp/mem c 1 1
attempt "mknod b /home/user" mknod /home/user/disk b 254 0
attempt "mknod c /dev/shm" mknod /dev/shm/port c 1 4
attempt "mkfifo /tmp" mkfifo /tmp/fifo
attempt "append /etc/passwd" bash -c 'echo "x::0:0::/:/bin/sh" >> /etc/passwd'
attempt "remove /etc/hosts" rm -f /etc/hosts
attempt "append driver" bash -c 'echo x >> /run/sbx/driver.mjs'
attempt "chmod driver" chmod 666 /run/sbx/driver.mjs
attempt "remove driver" rm -f /run/sbx/driver.mjs
attempt "rename driver" mv /run/sbx/driver.mjs /run/sbx/x
attempt "write resolv.conf" bash -c 'echo nameserver 127.0.0.1 > /etc/resolv.conf'
: > /tmp/mine
attempt "chown to root" chown 0:0 /tmp/mine
attempt "chmod setuid" bash -c 'chmod 4755 /tmp/mine && stat -c %A /tmp/mine | grep -q s'
attempt "remount / rw" mount -o remount,rw /
attempt "chmod /tmp" chmod 700 /tmp
echo "owner /home/user: $(stat -c %u:%g /home/user)"
"#,
    );
    let r = run(Language::Raw, &script).await;
    assert_eq!(r.exit_code, 0, "{r:?}");

    for dir in READ_ONLY {
        expect_outcome(
            &r,
            &format!("write {dir}"),
            &["refused (Read-only file system)"],
        );
    }
    for dir in ROOT_OWNED {
        expect_outcome(
            &r,
            &format!("write {dir}"),
            &["refused (Permission denied)"],
        );
    }
    for dir in WRITABLE {
        expect_outcome(&r, &format!("write {dir}"), &["ok"]);
    }
    // The scratch mounts are nodev, and making a node needs CAP_MKNOD anyway.
    for node in ["mknod c /tmp", "mknod b /home/user", "mknod c /dev/shm"] {
        expect_outcome(&r, node, &["refused (Operation not permitted)"]);
    }
    expect_outcome(&r, "mkfifo /tmp", &["DONE"]);
    expect_outcome(
        &r,
        "append /etc/passwd",
        &["refused (Read-only file system)"],
    );
    expect_outcome(
        &r,
        "remove /etc/hosts",
        &["refused (Read-only file system)"],
    );
    expect_outcome(&r, "append driver", &["refused (Permission denied)"]);
    expect_outcome(&r, "chmod driver", &["refused (Operation not permitted)"]);
    expect_outcome(&r, "remove driver", &["refused (Permission denied)"]);
    expect_outcome(&r, "rename driver", &["refused (Permission denied)"]);
    // /etc/resolv.conf links to /run, root's.
    expect_outcome(&r, "write resolv.conf", &["refused (Permission denied)"]);
    expect_outcome(&r, "chown to root", &["refused (Operation not permitted)"]);
    // The setuid bit may be set on one's own file (it stays the user's), and the mount is
    // nosuid and the process has no-new-privs besides: see attack_privileges.
    expect_outcome(&r, "chmod setuid", &["DONE"]);
    expect_outcome(
        &r,
        "remount / rw",
        &["refused (must be superuser to use mount.)"],
    );
    expect_outcome(&r, "chmod /tmp", &["refused (Operation not permitted)"]);
    expect_outcome(&r, "owner /home/user", &["1000:1000"]);
}
