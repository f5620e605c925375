//! Integration tests of the `sbx` binary.
//!
//! `usage` needs no VM: every case must be refused before any asset is built or VM booted.
//! `cache_trust` neither: a cache another user could change is refused before anything runs.
//! `snapshots` pins what users see (help, error reports and hints) without a VM.
//! `vm` boots real VMs (the first one may build the guest images); `kill` checks that no QEMU
//! outlives a `sbx` killed with SIGKILL; `parity` checks behaviours of the reference system in
//! real VMs (BOM, `#!` scripts, Python's integer digit limit).

mod cache_trust;
mod kill;
mod mcp;
mod packages;
mod parity;
mod snapshots;
mod usage;
mod vm;

use assert_cmd::Command;

/// `sbx` with an isolated, empty, offline cache: anything that reaches for assets fails fast
/// instead of building images.
fn sbx_offline(cache: &tempfile::TempDir) -> Command {
    let mut cmd = Command::cargo_bin("sbx").expect("the sbx binary is built");
    cmd.env("EXEC_SANDBOX_CACHE_DIR", cache.path())
        .env("EXEC_SANDBOX_OFFLINE", "1")
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .env_remove("EXEC_SANDBOX_MAX_CONCURRENT_VMS");
    cmd
}

/// `sbx` with the user's real cache, for tests that boot VMs.
fn sbx() -> Command {
    let mut cmd = Command::cargo_bin("sbx").expect("the sbx binary is built");
    cmd.env("NO_COLOR", "1").env_remove("RUST_LOG");
    cmd
}
