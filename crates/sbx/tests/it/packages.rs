//! Packages through `sbx run`, as users type them: refusals (exit 2) before any VM, and real
//! packages from the package indexes this host is configured for (pip's and npm's own
//! configuration), installed on the host and imported in a VM that has no network device.

use std::time::Duration;

use predicates::prelude::*;

use crate::{sbx, sbx_offline};

/// Generous: the first run installs the packages and may build the images.
const RUN_DEADLINE: Duration = Duration::from_secs(20 * 60);

#[test]
fn bad_package_requests_are_usage_errors_before_any_vm() {
    let cache = tempfile::tempdir().unwrap();
    let many: Vec<String> = (0..51).map(|i| format!("-p=pkg{i}==1.0")).collect();
    for (args, says) in [
        (
            vec!["-p", "no-such-sbx-package==1.0"],
            "10,000 most-downloaded",
        ),
        (
            vec!["-p", "numpy @ https://example.invalid/numpy.whl"],
            "numpy",
        ),
        (vec!["-p", "numpy==1.0", "-p", "NumPy==2.0"], "same package"),
        (
            vec!["-l", "raw", "-p", "numpy==2.1.3"],
            "raw takes no packages",
        ),
        (
            vec!["-l", "javascript", "-p", "lodash@latest"],
            "lodash@latest",
        ),
        (many.iter().map(String::as_str).collect(), "51 packages"),
    ] {
        sbx_offline(&cache)
            .arg("run")
            .args(&args)
            .arg("1")
            .timeout(Duration::from_secs(60))
            .assert()
            .code(2)
            .stderr(predicate::str::contains(says));
    }
    // Validation off: the allowlist goes, the syntax rules stay.
    sbx_offline(&cache)
        .args(["run", "--no-validation", "-p", "numpy ; os_name", "1"])
        .timeout(Duration::from_secs(60))
        .assert()
        .code(2);
}

#[test]
fn a_bare_name_is_refused_with_the_newest_version_as_a_hint() {
    sbx()
        .args(["run", "-q", "-p", "six", "print(1)"])
        .timeout(RUN_DEADLINE)
        .assert()
        .code(2)
        .stderr(predicate::str::contains("has no version"))
        .stderr(predicate::str::is_match(r"six==\d+\.\d+").unwrap());
}

#[test]
fn numpy_from_the_package_index_without_network_in_the_guest() {
    let out = sbx()
        .args([
            "run",
            "-q",
            "--json",
            "-p",
            "numpy==2.1.3",
            "import os, numpy\nprint(numpy.arange(6).sum(), sorted(os.listdir('/sys/class/net')))",
        ])
        .timeout(RUN_DEADLINE)
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let line: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(line["stdout"], "15 ['lo']\n", "{line}");
    assert!(
        ["built", "l2", "l3"].contains(&line["packages_source"].as_str().unwrap()),
        "{line}"
    );
    // The same set again is served from the cache.
    sbx()
        .args([
            "run",
            "-q",
            "--json",
            "-p",
            "numpy==2.1.3",
            "import numpy; print(numpy.__version__)",
        ])
        .timeout(RUN_DEADLINE)
        .assert()
        .success()
        .stdout(predicate::str::contains(r#""stdout":"2.1.3\n""#))
        .stdout(predicate::str::contains(r#""packages_source":"l2""#));
}

#[test]
fn lodash_from_the_npm_registry() {
    sbx()
        .args([
            "run",
            "-q",
            "-l",
            "javascript",
            "-p",
            "lodash@4.17.21",
            "import _ from 'lodash'; console.log(_.chunk([1,2,3,4],2).length)",
        ])
        .timeout(RUN_DEADLINE)
        .assert()
        .success()
        .stdout("2\n");
}
