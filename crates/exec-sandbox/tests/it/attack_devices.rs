//! Devices: what `/dev` offers the sandbox user (uid 1000). No memory, port or hypervisor
//! device, no root-disk node (the agent removes it after mounting), no block device it can
//! open, and the agent's control port (virtio-serial) and the consoles closed to it.

use exec_sandbox::Language;

use crate::support::{expect_outcome, outcome, run};

/// Prints `path: absent` or `path: read <r>, write <w>`, each `OPENED` or `refused (<error>)`.
const PROBE_OPEN: &str = r#"
try_open() { # direction path
    local err
    if [ "$1" = read ]; then err=$( (exec 3<"$2") 2>&1 ); else err=$( (exec 3>"$2") 2>&1 ); fi
    if [ $? -eq 0 ]; then echo OPENED; else echo "refused (${err##*: })"; fi
}
probe_open() {
    if [ ! -e "$1" ] && [ ! -L "$1" ]; then echo "$1: absent"; return; fi
    echo "$1: read $(try_open read "$1"), write $(try_open write "$1")"
}
"#;

/// Names allowed in `/dev` (`vport<n>p<m>`: the agent's virtio-serial ports, root-only).
const ALLOWED: &[&str] = &[
    "console", "fd", "full", "hwrng", "kmsg", "null", "ptmx", "pts", "random", "shm", "stderr",
    "stdin", "stdout", "tty", "ttyS0", "urandom", "zero",
];

#[tokio::test]
async fn dev_offers_the_sandbox_user_nothing_dangerous() {
    let script = format!(
        r#"{PROBE_OPEN}
echo "id: $(id -u):$(id -g)"
echo "listing: $(ls -A /dev | tr '\n' ' ')"
for d in /dev/zram0 /dev/mem /dev/kmem /dev/port /dev/kvm /dev/vda /dev/vdb /dev/sda /dev/hvc0 /dev/tty0 \
         /dev/tty1 /dev/loop0 /dev/loop-control /dev/fuse /dev/mapper /dev/virtio-ports \
         /dev/vsock /dev/vhost-vsock /dev/vhost-net /dev/net/tun /dev/uinput /dev/cpu /dev/snapshot; do
    probe_open "$d"
done
for d in /dev/vport* /dev/console /dev/ttyS0 /dev/hwrng /dev/kmsg; do probe_open "$d"; done
# Every block device (none: the root disk's node and the swap's are removed once in use).
echo "block devices: $(find /dev -type b | tr '\n' ' ')"
for d in $(find /dev -type b); do probe_open "$d"; done
# Character devices everyone may open; any other one must refuse the sandbox user.
for d in $(find /dev -type c); do
    case "${{d#/dev/}}" in
        null|zero|full|random|urandom|tty|ptmx|pts/ptmx) ;;
        *) probe_open "$d" ;;
    esac
done
"#
    );
    let r = run(Language::Raw, &script).await;
    assert_eq!(r.exit_code, 0, "{}", r.stderr);
    expect_outcome(&r, "id", &["1000:1000"]);

    let listing: Vec<&str> = outcome(&r, "listing").split_whitespace().collect();
    let unexpected: Vec<&&str> = listing
        .iter()
        .filter(|n| !ALLOWED.contains(n) && !is_vport(n))
        .collect();
    assert!(
        unexpected.is_empty(),
        "unexpected names in /dev: {unexpected:?}\n/dev holds: {listing:?}"
    );
    assert!(
        listing.iter().any(|n| is_vport(n)),
        "no control port: {listing:?}"
    );

    for absent in [
        "/dev/zram0",
        "/dev/mem",
        "/dev/kmem",
        "/dev/port",
        "/dev/kvm",
        "/dev/vda",
        "/dev/vdb",
        "/dev/sda",
        "/dev/hvc0",
        "/dev/tty0",
        "/dev/tty1",
        "/dev/loop0",
        "/dev/loop-control",
        "/dev/fuse",
        "/dev/mapper",
        "/dev/virtio-ports",
        "/dev/vsock",
        "/dev/vhost-vsock",
        "/dev/vhost-net",
        "/dev/net/tun",
        "/dev/uinput",
        "/dev/cpu",
        "/dev/snapshot",
    ] {
        expect_outcome(&r, absent, &["absent"]);
    }
    // The root disk is the only virtio disk without packages: its node is gone.
    expect_outcome(&r, "block devices", &[""]);

    let denied = "read refused (Permission denied), write refused (Permission denied)";
    for port in listing.iter().filter(|n| is_vport(n)) {
        expect_outcome(&r, &format!("/dev/{port}"), &[denied]);
    }
    for root_only in ["/dev/console", "/dev/ttyS0", "/dev/hwrng"] {
        expect_outcome(&r, root_only, &[denied]);
    }
    // World-readable, but `dmesg_restrict` refuses the reader; not writable.
    expect_outcome(
        &r,
        "/dev/kmsg",
        &["read refused (Operation not permitted), write refused (Permission denied)"],
    );
    // No character device outside the harmless ones opens, in either direction.
    for line in r.stdout.lines().filter(|l| l.starts_with("/dev/")) {
        assert!(!line.contains("OPENED"), "{line}\n{}", r.stdout);
    }
}

fn is_vport(name: &str) -> bool {
    name.strip_prefix("vport")
        .and_then(|rest| rest.split_once('p'))
        .is_some_and(|(dev, port)| {
            [dev, port]
                .iter()
                .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
}
