//! Embeds the guest side into the host library:
//!
//! - builds the static guest agent from the separate `guest/` workspace (or takes a prebuilt one
//!   from `SBX_PREBUILT_AGENT`) and snapshots it into `OUT_DIR`, with its SHA-256, so the library
//!   can `include_bytes!` it and key the initramfs without hashing it at run time;
//! - snapshots the image build inputs from `images/` into `OUT_DIR`. A file that is missing (the
//!   scripts are developed alongside) becomes an empty snapshot and a warning: the library still
//!   compiles and reports the missing script if a build is ever attempted.

#![expect(
    clippy::print_stderr,
    clippy::exit,
    reason = "a build script fails through stderr and its exit status"
)]

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

/// Image build inputs embedded in the library: (path under `images/`, snapshot name).
const IMAGE_INPUTS: &[(&str, &str)] = &[
    ("build-kernel.sh", "build-kernel.sh"),
    ("build-rootfs.sh", "build-rootfs.sh"),
    ("build-qemu.sh", "build-qemu.sh"),
    ("kernel/config.fragment", "kernel-config.fragment"),
    (
        "kernel/boot-calibration.patch",
        "kernel-boot-calibration.patch",
    ),
    ("versions.env", "versions.env"),
];

/// What the guest agent build depends on, relative to the repository root.
const AGENT_INPUTS: &[&str] = &[
    "guest/agent/src",
    "guest/agent/Cargo.toml",
    "guest/Cargo.toml",
    "guest/Cargo.lock",
    "guest/.cargo/config.toml",
    "guest/protocol/src",
    "guest/protocol/Cargo.toml",
];

/// Variables of the outer cargo invocation that must not reach the nested guest build: they
/// would retarget it, change its flags (crt-static comes from the guest's own config) or wrap its
/// compiler (clippy). `CARGO_*` variables are handled by prefix below.
const LEAKING_VARS: &[&str] = &[
    "RUSTFLAGS",
    "RUSTDOCFLAGS",
    "RUSTC",
    "RUSTDOC",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTC_LINKER",
    "TARGET",
    "HOST",
    "OUT_DIR",
    "OPT_LEVEL",
    "PROFILE",
    "DEBUG",
    "NUM_JOBS",
];

/// `CARGO_*` variables that are the user's environment (registry, network, home), kept.
const KEPT_CARGO_PREFIXES: &[&str] = &[
    "CARGO_HOME",
    "CARGO_MAKEFLAGS",
    "CARGO_NET_",
    "CARGO_HTTP_",
    "CARGO_REGISTRIES_",
    "CARGO_REGISTRY_",
    "CARGO_TERM_",
];

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let repo = manifest_dir
        .parent()
        .and_then(Path::parent)
        .expect("the crate lives in <repo>/crates/exec-sandbox")
        .to_path_buf();

    snapshot_image_inputs(&repo.join("images"), &out_dir);

    let agent = match env::var_os("SBX_PREBUILT_AGENT").filter(|v| !v.is_empty()) {
        Some(prebuilt) => {
            let prebuilt = PathBuf::from(prebuilt);
            println!("cargo:rerun-if-changed={}", prebuilt.display());
            prebuilt
        }
        None => {
            for input in AGENT_INPUTS {
                println!("cargo:rerun-if-changed={}", repo.join(input).display());
            }
            build_agent(&repo.join("guest"))
        }
    };
    println!("cargo:rerun-if-env-changed=SBX_PREBUILT_AGENT");

    // A snapshot, not the path in guest/target: a later guest build must not change the bytes
    // under the recorded hash.
    let bytes = fs::read(&agent).unwrap_or_else(|e| {
        fail(&format!(
            "cannot read the guest agent {}: {e}",
            agent.display()
        ))
    });
    if !bytes.starts_with(b"\x7fELF") {
        fail(&format!("{} is not an ELF executable", agent.display()));
    }
    let snapshot = out_dir.join("sbx-agent");
    write_if_changed(&snapshot, &bytes);
    println!("cargo:rustc-env=SBX_AGENT_PATH={}", snapshot.display());
    println!(
        "cargo:rustc-env=SBX_AGENT_SHA256={}",
        hex::encode(Sha256::digest(&bytes))
    );
}

/// Copies each image input to `OUT_DIR` (empty when missing) for `include_str!`.
fn snapshot_image_inputs(images: &Path, out_dir: &Path) {
    let mut any_missing = false;
    for (source, name) in IMAGE_INPUTS {
        let path = images.join(source);
        let text = match fs::read(&path) {
            Ok(text) => {
                println!("cargo:rerun-if-changed={}", path.display());
                text
            }
            Err(_) => {
                any_missing = true;
                println!(
                    "cargo:warning=image build input {} is missing: building that image will fail",
                    path.display()
                );
                Vec::new()
            }
        };
        write_if_changed(&out_dir.join(name), &text);
    }
    if any_missing {
        // Rerun when a missing input appears (a directory is scanned recursively).
        println!("cargo:rerun-if-changed={}", images.display());
    }
}

/// Runs `cargo build --release` in the guest workspace and returns the agent binary.
fn build_agent(guest: &Path) -> PathBuf {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .args(["build", "--release", "--bin", "sbx-agent"])
        .current_dir(guest)
        .env("CARGO_TARGET_DIR", guest.join("target"))
        // stdout carries this script's directives to cargo: keep the nested output off it.
        .stdout(Stdio::from(std::io::stderr()));
    for (name, _) in env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        let leaks = LEAKING_VARS.contains(&name)
            || name.starts_with("__CARGO")
            || (name.starts_with("CARGO_")
                && !KEPT_CARGO_PREFIXES.iter().any(|p| name.starts_with(p)));
        if leaks {
            command.env_remove(name);
        }
    }
    // Re-set after the sweep above removed every other CARGO_* variable.
    command.env("CARGO_TARGET_DIR", guest.join("target"));

    let status = command.status().unwrap_or_else(|e| {
        fail(&format!(
            "cannot run cargo to build the guest agent in {}: {e}",
            guest.display()
        ))
    });
    if !status.success() {
        fail(&format!(
            "building the guest agent (`cargo build --release` in {}) failed with {status}; \
             its errors are above. To use an agent built elsewhere, set \
             SBX_PREBUILT_AGENT=/path/to/sbx-agent",
            guest.display()
        ));
    }
    let binary = guest.join("target/x86_64-unknown-linux-gnu/release/sbx-agent");
    if !binary.is_file() {
        fail(&format!(
            "the guest build succeeded but {} does not exist (does guest/.cargo/config.toml \
             still set the x86_64-unknown-linux-gnu target?)",
            binary.display()
        ));
    }
    binary
}

/// Writes `bytes` unless the file already holds them, so its mtime only moves on real changes.
fn write_if_changed(path: &Path, bytes: &[u8]) {
    if fs::read(path).is_ok_and(|old| old == bytes) {
        return;
    }
    fs::write(path, bytes)
        .unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", path.display())));
}

fn fail(message: &str) -> ! {
    // Cargo shows a failing build script's stderr; a panic would bury the message in a backtrace.
    eprintln!("error: {message}");
    std::process::exit(1)
}
