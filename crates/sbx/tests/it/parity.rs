//! Behaviours of the reference system that users rely on, checked as they see them: through
//! `sbx run` in real microVMs.

use std::time::Duration;

use crate::sbx;

/// Generous: software emulation boots slowly, and the first run may build the images.
const RUN_DEADLINE: Duration = Duration::from_secs(20 * 60);

/// A UTF-8 byte-order mark, as editors on Windows write at the start of a file.
const BOM: &str = "\u{feff}";

#[test]
fn a_leading_bom_is_ignored_in_python() {
    sbx()
        .args(["run", &format!("{BOM}print('py')")])
        .timeout(RUN_DEADLINE)
        .assert()
        .success()
        .stdout("py\n");
}

#[test]
fn a_leading_bom_is_ignored_in_javascript() {
    sbx()
        .args(["run", "-l", "javascript"])
        .arg(format!("{BOM}const n: number = 1; console.log('js', n)"))
        .timeout(RUN_DEADLINE)
        .assert()
        .success()
        .stdout("js 1\n");
}

#[test]
fn a_leading_bom_is_ignored_in_raw() {
    sbx()
        .args(["run", "-l", "raw", &format!("{BOM}echo sh")])
        .timeout(RUN_DEADLINE)
        .assert()
        .success()
        .stdout("sh\n");
}

#[test]
fn a_bom_file_runs_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bom.py");
    std::fs::write(&path, format!("{BOM}print('from a file')\n")).unwrap();
    sbx()
        .arg("run")
        .arg(&path)
        .timeout(RUN_DEADLINE)
        .assert()
        .success()
        .stdout("from a file\n");
}

#[test]
fn an_awk_shebang_runs_awk_with_its_exit_code() {
    sbx()
        .args([
            "run",
            "-l",
            "raw",
            "#!/usr/bin/awk -f\nBEGIN { print \"hi\"; exit 3 }",
        ])
        .timeout(RUN_DEADLINE)
        .assert()
        .code(3)
        .stdout("hi\n");
}

#[test]
fn a_bash_shebang_script_runs_as_the_sandbox_user_in_its_own_process() {
    sbx()
        .args(["run", "-l", "raw"])
        .arg("#!/bin/bash\necho \"$(id -u) $0 $$\" | sed 's/sbx-script-[0-9a-f]*/X/'; exit 4")
        .timeout(RUN_DEADLINE)
        .assert()
        .code(4)
        .stdout(predicates::str::is_match(r"^1000 /tmp/\.X [0-9]+\n$").unwrap());
}

/// The raw image has no Python: a Python shebang fails as a shell would, naming the interpreter.
#[test]
fn a_python_shebang_without_python_in_the_image_exits_127() {
    sbx()
        .args(["run", "-l", "raw", "#!/usr/bin/python3\nprint('hi')"])
        .timeout(RUN_DEADLINE)
        .assert()
        .code(127)
        .stdout("")
        .stderr(predicates::str::contains(
            "/usr/bin/python3: bad interpreter (#! line): No such file or directory",
        ));
}

#[test]
fn an_env_python_shebang_without_python_in_the_image_exits_127() {
    sbx()
        .args(["run", "-l", "raw", "#!/usr/bin/env python3\nprint('hi')"])
        .timeout(RUN_DEADLINE)
        .assert()
        .code(127)
        .stdout("")
        .stderr(predicates::str::contains("python3"));
}

#[test]
fn python_prints_integers_of_any_size() {
    sbx()
        .args(["run", "print(len(str(10**5000)))"])
        .timeout(RUN_DEADLINE)
        .assert()
        .success()
        .stdout("5001\n");
}

#[test]
fn a_callers_pythonintmaxstrdigits_still_wins() {
    sbx()
        .args(["run", "-e", "PYTHONINTMAXSTRDIGITS=4300"])
        .arg("print(len(str(10**5000)))")
        .timeout(RUN_DEADLINE)
        .assert()
        .code(1)
        .stdout("")
        .stderr(predicates::str::contains(
            "ValueError: Exceeds the limit (4300 digits)",
        ));
}
