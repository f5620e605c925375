//! What users see, snapshotted: help texts and the error reports (with their `hint:` lines) of
//! failures that need no VM. The `.snap` files under `snapshots/` are the reviewed output; a
//! change shows up as a failing test with a diff. To accept one without `cargo insta`:
//! `INSTA_UPDATE=always cargo test -p sbx --test it snapshots`, then review `git diff`.

use crate::sbx_offline;

/// Exit status, stdout and stderr of `sbx args...` run offline with an empty cache, as one text.
fn transcript(args: &[&str], env: &[(&str, &str)]) -> (String, tempfile::TempDir) {
    let cache = tempfile::tempdir().unwrap();
    let mut cmd = sbx_offline(&cache);
    for (name, value) in env {
        cmd.env(name, value);
    }
    let out = cmd
        .args(args)
        .write_stdin("")
        // A hang guard, not a measurement: none of these reaches a VM.
        .timeout(std::time::Duration::from_secs(60))
        .output()
        .unwrap();
    let text = format!(
        "$ sbx {}\nexit status: {}\n--- stdout\n{}--- stderr\n{}",
        args.join(" "),
        out.status
            .code()
            .map_or("none (killed)".to_string(), |c| c.to_string()),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    (text, cache)
}

/// Snapshots `sbx args...` with the run's own paths and versions replaced by placeholders.
macro_rules! assert_transcript {
    ($name:literal, $args:expr) => {
        assert_transcript!($name, $args, &[])
    };
    ($name:literal, $args:expr, $env:expr) => {{
        let (text, cache) = transcript($args, $env);
        let cache = regex_escape(&cache.path().display().to_string());
        let version = regex_escape(env!("CARGO_PKG_VERSION"));
        insta::with_settings!({
            filters => vec![
                (cache.as_str(), "[CACHE]"),
                // Guest asset versions are hashes of the image inputs.
                (r"\b[0-9a-f]{16}\b", "[ASSET_VERSION]"),
                (version.as_str(), "[VERSION]"),
            ],
        }, {
            insta::assert_snapshot!($name, text);
        });
    }};
}

/// `text` as a regular expression matching itself.
fn regex_escape(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let special = "\\.+*?()|[]{}^$".contains(c);
            special.then_some('\\').into_iter().chain([c])
        })
        .collect()
}

#[test]
fn top_level_help() {
    assert_transcript!("help", &["--help"]);
}

#[test]
fn run_help() {
    assert_transcript!("run_help", &["run", "--help"]);
}

#[test]
fn version() {
    assert_transcript!("version", &["--version"]);
}

#[test]
fn a_usage_error_shows_the_usage() {
    assert_transcript!("missing_source", &["run"]);
}

#[test]
fn an_invalid_env_var_name_is_explained() {
    assert_transcript!("env_name_invalid", &["run", "-e", "1BAD=x", "print(1)"]);
    assert_transcript!(
        "env_name_forbidden",
        &["run", "-e", "LD_PRELOAD=x", "print(1)"]
    );
}

#[test]
fn a_privileged_host_port_is_refused() {
    assert_transcript!(
        "expose_privileged_port",
        &["run", "--expose", "80:80", "print(1)"]
    );
}

#[test]
fn bad_configuration_names_the_variable_with_a_hint() {
    assert_transcript!(
        "config_invalid",
        &["run", "print(1)"],
        &[("EXEC_SANDBOX_MAX_CONCURRENT_VMS", "lots")]
    );
}

#[test]
fn offline_without_assets_says_what_is_missing_and_how_to_fix_it() {
    assert_transcript!("offline_missing_assets", &["run", "print(1)"]);
}
