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
