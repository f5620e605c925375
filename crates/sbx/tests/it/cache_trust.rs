//! The cache directory is a trust root: `sbx` refuses a cache another user could change before
//! anything runs, and without a home it asks for a cache directory instead of using `/tmp`.
//! No VM; the tests run as root (they act as `nobody`, uid 65534).

use std::os::unix::fs::chown;
use std::path::Path;

use assert_cmd::Command;
use predicates::prelude::*;

use crate::sbx_offline;
use crate::usage::{HANG_GUARD, QemuRecorder};

const NOBODY: u32 = 65534;

#[test]
fn a_foreign_owned_cache_dir_is_a_permanent_error_with_a_hint_and_nothing_boots() {
    let cache = tempfile::tempdir().unwrap();
    chown(cache.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    let qemu = QemuRecorder::new();
    sbx_offline(&cache)
        .env("EXEC_SANDBOX_QEMU", qemu.binary())
        .args(["run", "print(1)"])
        .timeout(HANG_GUARD)
        .assert()
        .code(125)
        .stdout(predicate::str::is_empty())
        .stderr(predicate::str::contains(cache.path().to_str().unwrap()))
        .stderr(predicate::str::contains("owned by uid 65534"))
        .stderr(predicate::str::contains("hint:"))
        .stderr(predicate::str::contains("chown"))
        .stderr(predicate::str::contains("EXEC_SANDBOX_CACHE_DIR"));
    assert_eq!(qemu.calls(), "", "QEMU ran");
    assert!(
        std::fs::read_dir(cache.path()).unwrap().next().is_none(),
        "something was created in the refused cache"
    );
}

/// The home `nobody` has in the password database.
fn nobody_home() -> String {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.get(2) == Some(&"65534"))
        .and_then(|fields| fields.get(5).map(|home| home.to_string()))
        .expect("a user with uid 65534")
}

#[test]
fn without_a_home_sbx_asks_for_a_cache_dir_and_never_uses_tmp() {
    let home = nobody_home();
    assert!(
        !Path::new(&home).exists(),
        "this test needs uid 65534 to have no home directory (it has {home})"
    );
    let old_fallback = Path::new("/tmp/.cache/exec-sandbox");
    let existed = old_fallback.exists();
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(assert_cmd::cargo::cargo_bin("sbx"))
        .args(["run", "print(1)"])
        .env_remove("HOME")
        .env_remove("XDG_CACHE_HOME")
        .env_remove("EXEC_SANDBOX_CACHE_DIR")
        .env_remove("EXEC_SANDBOX_IMAGES_DIR")
        .env_remove("RUST_LOG")
        .env("EXEC_SANDBOX_OFFLINE", "1")
        .env("NO_COLOR", "1")
        .current_dir("/")
        .timeout(HANG_GUARD)
        .assert()
        .code(2)
        .stdout(predicate::str::is_empty())
        .stderr(predicate::str::contains("cache_dir"))
        .stderr(predicate::str::contains("set EXEC_SANDBOX_CACHE_DIR"));
    assert_eq!(old_fallback.exists(), existed, "a cache appeared in /tmp");
}
