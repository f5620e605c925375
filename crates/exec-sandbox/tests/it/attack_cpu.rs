//! CPU features visible to the guest: nested virtualization is never advertised, so guest code
//! cannot start a hypervisor of its own (the first step toward attacking the host's).

use exec_sandbox::Language;

use crate::support::run;

#[tokio::test]
async fn nested_virtualization_is_not_advertised() {
    let r = run(
        Language::Raw,
        "grep -m1 '^flags' /proc/cpuinfo; ls /dev/kvm 2>&1; echo done",
    )
    .await;
    assert_eq!(r.exit_code, 0, "{}", r.stderr);
    let flags: Vec<&str> = r
        .stdout
        .lines()
        .next()
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().collect())
        .unwrap_or_default();
    assert!(flags.len() > 10, "no CPU flags read: {}", r.stdout);
    for hidden in ["vmx", "svm"] {
        assert!(!flags.contains(&hidden), "{hidden} advertised: {flags:?}");
    }
    assert!(r.stdout.contains("No such file"), "{}", r.stdout);
}

#[tokio::test]
async fn the_guest_kernel_mitigates_what_the_cpu_needs() {
    let r = run(
        Language::Raw,
        "cd /sys/devices/system/cpu/vulnerabilities && for f in *; do echo \"$f: $(cat $f)\"; done",
    )
    .await;
    assert_eq!(r.exit_code, 0, "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert!(
        lines.iter().any(|l| l.starts_with("spectre_v1: ")),
        "{}",
        r.stdout
    );
    for line in &lines {
        assert!(!line.contains("Vulnerable"), "{line}\n{}", r.stdout);
    }
    // Spectre v1 (usercopy barriers) and v2 (retpolines or IBRS) are always mitigated.
    for name in ["spectre_v1", "spectre_v2"] {
        let line = lines.iter().find(|l| l.starts_with(name)).unwrap();
        assert!(line.contains("Mitigation"), "{line}");
    }
}
