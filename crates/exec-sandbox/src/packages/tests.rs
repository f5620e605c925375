//! The package pipeline end to end against the loopback index (`testing.rs`): real pip, npm
//! and mkfs.erofs, no VM, no registry. These tools are required here: a missing one fails the
//! test, it never skips.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::layer::{LAYER_FILE, LayerManifest, MANIFEST_FILE};
use super::testing::{PackageIndex, tool_env};
use super::*;
use crate::ErrorKind;

fn python() -> Target {
    Target {
        ecosystem: Ecosystem::Python,
        image_version: "testimage".into(),
        interpreter: "3.11".into(),
        glibc: "2.36".into(),
    }
}

fn node() -> Target {
    Target {
        ecosystem: Ecosystem::Npm,
        image_version: "testimage".into(),
        interpreter: "1.4.5".into(),
        glibc: "2.36".into(),
    }
}

fn exact(name: &str, version: &str) -> Requirement {
    Requirement {
        name: name.into(),
        constraint: Constraint::Exact(version.into()),
    }
}

fn range(name: &str, range: &str) -> Requirement {
    Requirement {
        name: name.into(),
        constraint: Constraint::Range(range.into()),
    }
}

fn pin(name: &str, version: &str) -> Pin {
    Pin {
        name: name.into(),
        version: version.into(),
    }
}

fn config(dir: &Path, tools: Tools) -> PackageConfig {
    PackageConfig {
        tools,
        ..PackageConfig::new(dir.to_path_buf())
    }
}

/// A store whose tools talk to `index` only.
fn store(index: &PackageIndex, dir: &Path) -> PackageStore {
    PackageStore::new(config(
        dir,
        Tools {
            env: index.tool_env(),
            ..Tools::default()
        },
    ))
}

/// Tools that do not exist: any attempt to run one fails with `ToolMissing`.
fn no_tools() -> Tools {
    Tools {
        python: "/nonexistent/python3".into(),
        npm: "/nonexistent/npm".into(),
        mkfs_erofs: "/nonexistent/mkfs.erofs".into(),
        ..Tools::default()
    }
}

/// A store over `dir` that cannot run any tool: whatever it serves came from the cache.
fn toolless(dir: &Path) -> PackageStore {
    PackageStore::new(config(dir, no_tools()))
}

async fn ensure(
    store: &PackageStore,
    target: &Target,
    requirements: &[Requirement],
) -> Result<ReadyLayer, PackageError> {
    store.ensure(target, requirements, |_| {}).await
}

/// The image's files, extracted with fsck.erofs (erofs-utils, like mkfs.erofs).
fn extract(layer: &Path) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("layer");
    let status = std::process::Command::new("fsck.erofs")
        .arg(format!("--extract={}", root.display()))
        .arg(layer)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("fsck.erofs (erofs-utils) runs");
    assert!(status.success(), "fsck.erofs --extract failed");
    (dir, root)
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[tokio::test]
async fn python_exact_pins_build_a_layer_then_any_order_hits_l2_without_tools() {
    let index = PackageIndex::demo();
    let cache = tempfile::tempdir().unwrap();
    let built = ensure(
        &store(&index, cache.path()),
        &python(),
        &[exact("sbxdemo", "1.0"), exact("sbxdep", "1.0")],
    )
    .await
    .unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!(built.source, PackageSource::Built);
    assert!(built.install_ms.is_some());
    assert_eq!(
        built.requested,
        [pin("sbxdemo", "1.0"), pin("sbxdep", "1.0")]
    );
    assert_eq!(built.closure, [pin("sbxdemo", "1.0"), pin("sbxdep", "1.0")]);
    assert_eq!(built.path, cache.path().join(&built.key).join(LAYER_FILE));

    // The manifest records the closure and the image's checksum.
    let manifest = LayerManifest::parse(
        &fs::read(cache.path().join(&built.key).join(MANIFEST_FILE)).unwrap(),
        &built.key,
    )
    .unwrap();
    assert_eq!(manifest.closure, built.closure);
    let (sha256, size) =
        crate::assets::files::sha256_reader(fs::File::open(&built.path).unwrap()).unwrap();
    assert_eq!(
        (manifest.sha256.as_str(), manifest.size),
        (sha256.as_str(), size)
    );

    // The image holds pip's --target tree, post-processed for the guest.
    let (_keep, root) = extract(&built.path);
    let site = root.join("python");
    assert_eq!(
        fs::read_to_string(site.join("sbxdemo/__init__.py")).unwrap(),
        "VERSION = '1.0'\n\n\ndef main():\n    print('sbxdemo 1.0')\n"
    );
    assert!(site.join("sbxdep/__init__.py").is_file());
    assert!(site.join("sbxdemo-1.0.dist-info/METADATA").is_file());
    let script = fs::read_to_string(site.join("bin/sbxdemo-cli")).unwrap();
    assert!(script.starts_with("#!/usr/bin/python3\n"), "{script}");
    // Unchecked-hash bytecode (flags word 0b01), compiled by a host CPython 3.11.
    let pyc = fs::read(site.join("sbxdemo/__pycache__/__init__.cpython-311.pyc"))
        .expect("the layer ships .pyc files (needs a CPython 3.11 on the host)");
    assert_eq!(u32::from_le_bytes(pyc[4..8].try_into().unwrap()), 1);
    assert!(!root.join("work").exists() && !root.join("tree").exists());

    // Same set in another order, from a store that cannot run any tool: an L2 hit.
    let requests = index.requests().len();
    let hit = ensure(
        &toolless(cache.path()),
        &python(),
        &[exact("sbxdep", "1.0"), exact("sbxdemo", "1.0")],
    )
    .await
    .unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!(hit.source, PackageSource::L2);
    assert_eq!(
        (hit.key.as_str(), &hit.path),
        (built.key.as_str(), &built.path)
    );
    assert_eq!(hit.install_ms, None);
    assert_eq!(hit.closure, built.closure);
    assert_eq!(index.requests().len(), requests, "a hit contacts no index");
    let entries: Vec<LayerInfo> = toolless(cache.path()).entries().await;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].hits, 1);
    assert_eq!(entries[0].packages, ["sbxdemo==1.0", "sbxdep==1.0"]);
    assert_eq!(entries[0].closure_len, 2);
}

#[tokio::test]
async fn python_range_resolves_installs_and_is_remembered() {
    let index = PackageIndex::demo();
    let cache = tempfile::tempdir().unwrap();
    let asked = [range("sbxdemo", ">=1.0")];
    let built = ensure(&store(&index, cache.path()), &python(), &asked)
        .await
        .unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!(built.source, PackageSource::Built);
    assert_eq!(built.requested, [pin("sbxdemo", "1.1")]);
    assert_eq!(built.closure, [pin("sbxdemo", "1.1"), pin("sbxdep", "1.0")]);

    // The resolution is remembered: no tool needed within its time bound…
    let hit = ensure(&toolless(cache.path()), &python(), &asked)
        .await
        .unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!((hit.source, hit.key), (PackageSource::L2, built.key));
    // …and asked again after it.
    let expired = PackageStore::new(PackageConfig {
        range_ttl: Duration::ZERO,
        ..config(cache.path(), no_tools())
    });
    let err = ensure(&expired, &python(), &asked).await.unwrap_err();
    assert!(matches!(err, PackageError::ToolMissing { .. }), "{err}");
}

#[tokio::test]
async fn sdist_only_packages_are_refused_naming_the_package() {
    let index = PackageIndex::demo();
    let cache = tempfile::tempdir().unwrap();
    let store = store(&index, cache.path());
    let err = ensure(&store, &python(), &[exact("sbxsrc", "1.0")])
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "sbxsrc 1.0 has no binary wheel for CPython 3.11 on manylinux_2_36 x86_64; only source \
         distributions"
    );
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let err = ensure(&store, &python(), &[exact("sbxneedsrc", "1.0")])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PackageError::NoWheel { package, required_by: Some(by), sdist_only: true, .. } if package == "sbxsrc" && by == "sbxneedsrc"),
        "{err}"
    );
    // Nothing published, nothing left over.
    assert!(store.entries().await.is_empty());
    let leftovers: Vec<_> = fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn python_versions_that_do_not_exist_or_conflict_are_refused() {
    let index = PackageIndex::demo();
    let cache = tempfile::tempdir().unwrap();
    let store = store(&index, cache.path());
    let refused = |r: Result<ReadyLayer, PackageError>| {
        let err = r.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
        err
    };
    let err = refused(ensure(&store, &python(), &[exact("sbxdemo", "9.9")]).await);
    assert_eq!(
        err.to_string(),
        "sbxdemo 9.9 does not exist; available: 1.1, 1.0"
    );
    let err = refused(ensure(&store, &python(), &[exact("sbxnope", "1.0")]).await);
    assert!(
        matches!(&err, PackageError::UnknownPackage { package } if package == "sbxnope"),
        "{err}"
    );
    let err = refused(ensure(&store, &python(), &[range("sbxdemo", ">=5")]).await);
    assert!(
        matches!(&err, PackageError::NoMatchingVersion { package, .. } if package == "sbxdemo"),
        "{err}"
    );
    let err = refused(ensure(&store, &python(), &[exact("sbxconflict", "1.0")]).await);
    assert!(
        matches!(&err, PackageError::NoMatchingVersion { package, required_by: Some(by), .. } if package == "sbxdep" && by == "sbxconflict"),
        "{err}"
    );
    let err = refused(
        ensure(
            &store,
            &python(),
            &[exact("sbxdemo", "1.0"), exact("sbxconflict", "1.0")],
        )
        .await,
    );
    assert!(
        matches!(
            err,
            PackageError::Conflict { .. } | PackageError::NoMatchingVersion { .. }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn a_compiled_extension_wheel_installs() {
    let index = PackageIndex::demo();
    assert!(
        index.has_extension(),
        "building the extension fixture needs gcc and /usr/include/python3.11/Python.h"
    );
    let cache = tempfile::tempdir().unwrap();
    let built = ensure(
        &store(&index, cache.path()),
        &python(),
        &[exact("sbxext", "1.0")],
    )
    .await
    .unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!(built.closure, [pin("sbxext", "1.0")]);
    let (_keep, root) = extract(&built.path);
    let library = root.join("python/sbxext/_speed.cpython-311-x86_64-linux-gnu.so");
    assert!(library.is_file());
    // The fixture's own module (built above from its C source) loads and answers.
    let out = std::process::Command::new("/usr/bin/python3.11")
        .args(["-I", "-c", "import sys; sys.path.insert(0, sys.argv[1]); import sbxext._speed as s; print(s.answer())"])
        .arg(root.join("python"))
        .output()
        .expect("/usr/bin/python3.11 runs");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "42\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn newest_versions_come_from_the_index() {
    let index = PackageIndex::demo();
    let cache = tempfile::tempdir().unwrap();
    let store = store(&index, cache.path());
    assert_eq!(store.newest(&python(), "sbxdemo").await.unwrap(), "1.1");
    let err = store.newest(&python(), "sbxsrc").await.unwrap_err();
    assert!(
        matches!(&err, PackageError::NoWheel { package, .. } if package == "sbxsrc"),
        "{err}"
    );
    assert_eq!(store.newest(&node(), "sbx-demo").await.unwrap(), "1.1.0");
    let err = store.newest(&node(), "sbx-nope").await.unwrap_err();
    assert!(
        matches!(&err, PackageError::UnknownPackage { package } if package == "sbx-nope"),
        "{err}"
    );
}

#[tokio::test]
async fn npm_exact_pins_build_a_layer_with_the_closure() {
    let index = PackageIndex::demo();
    let cache = tempfile::tempdir().unwrap();
    let asked = [exact("sbx-demo", "1.0.0"), exact("@sbx/scoped", "1.0.0")];
    let built = ensure(&store(&index, cache.path()), &node(), &asked)
        .await
        .unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!(built.source, PackageSource::Built);
    assert_eq!(
        built.closure,
        [
            pin("@sbx/scoped", "1.0.0"),
            pin("sbx-demo", "1.0.0"),
            pin("sbx-dep", "1.2.0")
        ]
    );
    let (_keep, root) = extract(&built.path);
    let modules = root.join("node/node_modules");
    assert_eq!(
        fs::read_to_string(modules.join("sbx-demo/index.js")).unwrap(),
        "module.exports = 'sbx-demo 1.0.0';\n"
    );
    assert!(modules.join("sbx-dep/package.json").is_file());
    assert!(modules.join("@sbx/scoped/index.js").is_file());
    assert!(root.join("node/package-lock.json").is_file());

    let hit = ensure(&toolless(cache.path()), &node(), &asked)
        .await
        .unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!((hit.source, hit.key), (PackageSource::L2, built.key));
}

#[tokio::test]
async fn npm_range_resolves_and_is_remembered() {
    let index = PackageIndex::demo();
    let cache = tempfile::tempdir().unwrap();
    let asked = [range("sbx-demo", "^1.0.0")];
    let built = ensure(&store(&index, cache.path()), &node(), &asked)
        .await
        .unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!(built.requested, [pin("sbx-demo", "1.1.0")]);
    let hit = ensure(&toolless(cache.path()), &node(), &asked)
        .await
        .unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!((hit.source, hit.key), (PackageSource::L2, built.key));
}

#[tokio::test]
async fn npm_packages_needing_install_scripts_are_refused_postinstall_is_not_run() {
    let index = PackageIndex::demo();
    let cache = tempfile::tempdir().unwrap();
    let store = store(&index, cache.path());
    let err = ensure(&store, &node(), &[exact("sbx-native", "1.0.0")])
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "sbx-native 1.0.0 needs its native addon build (binding.gyp), and packages are \
         installed with scripts off"
    );
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let err = ensure(&store, &node(), &[exact("sbx-inst", "1.0.0")])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PackageError::InstallScript { package, reason, .. } if package == "sbx-inst" && reason.contains("install")),
        "{err}"
    );
    let built = ensure(&store, &node(), &[exact("sbx-post", "1.0.0")])
        .await
        .unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!(built.closure, [pin("sbx-post", "1.0.0")]);
    assert!(
        !index.marker_dir().join("postinstall-ran").exists(),
        "the postinstall script ran"
    );
    assert_eq!(
        store.entries().await.len(),
        1,
        "refused sets are not cached"
    );
}

#[tokio::test]
async fn npm_versions_that_do_not_exist_are_refused() {
    let index = PackageIndex::demo();
    let cache = tempfile::tempdir().unwrap();
    let store = store(&index, cache.path());
    let err = ensure(&store, &node(), &[exact("sbx-demo", "9.9.9")])
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "sbx-demo 9.9.9 does not exist; available: 1.1.0, 1.0.0"
    );
    let err = ensure(&store, &node(), &[exact("sbx-nope", "1.0.0")])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PackageError::UnknownPackage { package } if package == "sbx-nope"),
        "{err}"
    );
    let err = ensure(&store, &node(), &[range("sbx-demo", "^5.0.0")])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PackageError::NoMatchingVersion { package, range, .. } if package == "sbx-demo" && range == "^5.0.0"),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
}

#[tokio::test]
async fn an_unreachable_index_is_transient() {
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let scratch = tempfile::tempdir().unwrap();
    let mut env = tool_env(
        &format!("http://127.0.0.1:{port}/simple/"),
        &format!("http://127.0.0.1:{port}/npm/"),
        scratch.path(),
    );
    env.push(("PIP_RETRIES".into(), Some("1".into())));
    env.push(("npm_config_fetch_retries".into(), Some("0".into())));
    let cache = tempfile::tempdir().unwrap();
    let store = PackageStore::new(config(
        cache.path(),
        Tools {
            env,
            ..Tools::default()
        },
    ));
    let err = ensure(&store, &python(), &[exact("sbxdemo", "1.0")])
        .await
        .unwrap_err();
    assert!(
        matches!(err, PackageError::IndexUnavailable { tool: "pip", .. }),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::Transient);
    let err = ensure(&store, &node(), &[exact("sbx-demo", "1.0.0")])
        .await
        .unwrap_err();
    assert!(
        matches!(err, PackageError::IndexUnavailable { tool: "npm", .. }),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::Transient);
}

#[tokio::test]
async fn missing_tools_are_permanent_and_named() {
    let index = PackageIndex::demo();
    let cache = tempfile::tempdir().unwrap();
    let err = ensure(
        &toolless(cache.path()),
        &python(),
        &[exact("sbxdemo", "1.0")],
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, PackageError::ToolMissing { tool: "pip", .. }),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::Permanent);
    assert!(err.hint().unwrap().contains("python3-pip"));
    let err = ensure(
        &toolless(cache.path()),
        &node(),
        &[exact("sbx-demo", "1.0.0")],
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, PackageError::ToolMissing { tool: "npm", .. }),
        "{err}"
    );
    // pip works, mkfs.erofs does not (and may not be installed from here).
    let no_mkfs = PackageStore::new(config(
        cache.path(),
        Tools {
            env: index.tool_env(),
            mkfs_erofs: "/nonexistent/mkfs.erofs".into(),
            ..Tools::default()
        },
    ));
    let err = ensure(&no_mkfs, &python(), &[exact("sbxdep", "1.0")])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            PackageError::ToolMissing {
                tool: "mkfs.erofs",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.hint().unwrap().contains("erofs-utils"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_ensures_of_one_set_build_once() {
    let index = PackageIndex::demo();
    let cache = tempfile::tempdir().unwrap();
    let asked = [exact("sbxdemo", "1.0")];
    // Separate stores: nothing shared in memory, only the directory (as between processes).
    let (a, b, c) = (
        store(&index, cache.path()),
        store(&index, cache.path()),
        store(&index, cache.path()),
    );
    let target = python();
    let (a, b, c) = tokio::join!(
        ensure(&a, &target, &asked),
        ensure(&b, &target, &asked),
        ensure(&c, &target, &asked)
    );
    let mut sources: Vec<PackageSource> = [a, b, c]
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("{}", chain(&e))).source)
        .collect();
    sources.sort_by_key(|s| *s != PackageSource::Built);
    assert_eq!(
        sources,
        [PackageSource::Built, PackageSource::L2, PackageSource::L2]
    );
    let installs = index
        .requests()
        .iter()
        .filter(|p| p.ends_with(".whl") && p.contains("sbxdemo"))
        .count();
    assert_eq!(
        installs,
        1,
        "one download of the wheel: {:?}",
        index.requests()
    );
}

/// Helper for `concurrent_ensures_across_processes_build_once`, run in a child process.
#[tokio::test]
#[ignore = "run as a child process by concurrent_ensures_across_processes_build_once"]
async fn child_process_ensure() {
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is set"));
    let scratch = PathBuf::from(var("SBX_PKG_TEST_SCRATCH"));
    fs::create_dir_all(&scratch).unwrap();
    let store = PackageStore::new(config(
        Path::new(&var("SBX_PKG_TEST_CACHE")),
        Tools {
            env: tool_env(
                &var("SBX_PKG_TEST_PIP_INDEX"),
                "http://127.0.0.1:9/",
                &scratch,
            ),
            ..Tools::default()
        },
    ));
    let ready = ensure(&store, &python(), &[exact("sbxdemo", "1.0")])
        .await
        .unwrap_or_else(|e| panic!("{}", chain(&e)));
    fs::write(
        var("SBX_PKG_TEST_OUT"),
        format!("{:?} {}", ready.source, ready.key),
    )
    .unwrap();
}

#[test]
fn concurrent_ensures_across_processes_build_once() {
    let index = PackageIndex::demo();
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let children: Vec<_> = (0..2)
        .map(|i| {
            std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "packages::tests::child_process_ensure",
                    "--ignored",
                    "--test-threads=1",
                ])
                .env("SBX_PKG_TEST_CACHE", &cache)
                .env("SBX_PKG_TEST_PIP_INDEX", index.pip_index_url())
                .env(
                    "SBX_PKG_TEST_SCRATCH",
                    work.path().join(format!("scratch-{i}")),
                )
                .env("SBX_PKG_TEST_OUT", work.path().join(format!("out-{i}")))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "child failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut outcomes: Vec<String> = (0..2)
        .map(|i| fs::read_to_string(work.path().join(format!("out-{i}"))).unwrap())
        .collect();
    outcomes.sort();
    let keys: Vec<&str> = outcomes
        .iter()
        .map(|o| o.split(' ').nth(1).unwrap())
        .collect();
    assert_eq!(keys[0], keys[1]);
    let sources: Vec<&str> = outcomes
        .iter()
        .map(|o| o.split(' ').next().unwrap())
        .collect();
    assert_eq!(sources, ["Built", "L2"], "{outcomes:?}");
}

#[tokio::test]
async fn a_truncated_layer_is_detected_discarded_and_rebuilt() {
    let index = PackageIndex::demo();
    let cache = tempfile::tempdir().unwrap();
    let store = store(&index, cache.path());
    let asked = [exact("sbxdep", "1.0")];
    let first = ensure(&store, &python(), &asked).await.unwrap();
    let size = fs::metadata(&first.path).unwrap().len();
    drop(first.file);
    // Truncate it in place (the file is read-only: make it writable first).
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&first.path, fs::Permissions::from_mode(0o644)).unwrap();
    fs::File::options()
        .write(true)
        .open(&first.path)
        .unwrap()
        .set_len(size / 2)
        .unwrap();
    let again = ensure(&store, &python(), &asked)
        .await
        .unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!(again.source, PackageSource::Built, "a bad layer is rebuilt");
    assert_eq!(again.key, first.key);
    let manifest = LayerManifest::parse(
        &fs::read(cache.path().join(&again.key).join(MANIFEST_FILE)).unwrap(),
        &again.key,
    )
    .unwrap();
    let (sha256, _) =
        crate::assets::files::sha256_reader(fs::File::open(&again.path).unwrap()).unwrap();
    assert_eq!(sha256, manifest.sha256);
    assert_eq!(
        ensure(&store, &python(), &asked).await.unwrap().source,
        PackageSource::L2
    );
    assert_eq!(store.entries().await.len(), 1);
}

#[tokio::test]
async fn offline_serves_cached_layers_and_refuses_the_rest() {
    let index = PackageIndex::demo();
    let cache = tempfile::tempdir().unwrap();
    ensure(
        &store(&index, cache.path()),
        &python(),
        &[exact("sbxdep", "1.0")],
    )
    .await
    .unwrap();
    let offline = PackageStore::new(PackageConfig {
        offline: true,
        ..config(cache.path(), no_tools())
    });
    let hit = ensure(&offline, &python(), &[exact("sbxdep", "1.0")])
        .await
        .unwrap();
    assert_eq!(hit.source, PackageSource::L2);
    let err = ensure(&offline, &python(), &[exact("sbxdemo", "1.0")])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PackageError::Offline { what } if what.contains("sbxdemo==1.0")),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::Permanent);
}

#[tokio::test]
async fn prune_empties_the_cache() {
    let index = PackageIndex::demo();
    let cache = tempfile::tempdir().unwrap();
    let store = store(&index, cache.path());
    ensure(&store, &python(), &[exact("sbxdep", "1.0")])
        .await
        .unwrap();
    ensure(&store, &node(), &[exact("sbx-dep", "1.0.0")])
        .await
        .unwrap();
    let entries = store.entries().await;
    assert_eq!(entries.len(), 2);
    let mut ecosystems: Vec<&str> = entries.iter().map(|e| e.ecosystem.as_str()).collect();
    ecosystems.sort();
    assert_eq!(ecosystems, ["npm", "python"]);
    let removed = store.prune(0).await;
    assert_eq!(removed.len(), 2);
    assert!(removed.iter().all(|(_, bytes)| *bytes > 0));
    assert!(store.entries().await.is_empty());
}

/// A remote store over a directory of published entries (another host's L2 cache), optionally
/// serving a damaged image or failing outright.
#[derive(Debug, Default)]
struct FakeRemote {
    source: Option<PathBuf>,
    damaged: bool,
    broken: bool,
    fetches: AtomicUsize,
    uploads: Mutex<Vec<String>>,
}

impl RemoteLayers for FakeRemote {
    fn fetch<'a>(
        &'a self,
        key: &'a str,
        dest_dir: &'a Path,
    ) -> BoxFuture<'a, Result<bool, RemoteError>> {
        Box::pin(async move {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            if self.broken {
                return Err(RemoteError::Store {
                    key: key.into(),
                    source: "access denied".into(),
                });
            }
            let Some(source) = &self.source else {
                return Ok(false);
            };
            let entry = source.join(key);
            if !entry.exists() {
                return Ok(false);
            }
            for file in [LAYER_FILE, MANIFEST_FILE] {
                fs::copy(entry.join(file), dest_dir.join(file)).map_err(|source| {
                    RemoteError::Io {
                        key: key.into(),
                        path: dest_dir.join(file),
                        source,
                    }
                })?;
            }
            if self.damaged {
                use std::os::unix::fs::PermissionsExt;
                let layer = dest_dir.join(LAYER_FILE);
                fs::set_permissions(&layer, fs::Permissions::from_mode(0o644)).unwrap();
                let mut bytes = fs::read(&layer).unwrap();
                bytes[100] ^= 0xff;
                fs::write(&layer, bytes).unwrap();
            }
            Ok(true)
        })
    }

    fn upload(&self, key: &str, layer_dir: &Path) {
        assert!(layer_dir.join(LAYER_FILE).is_file());
        self.uploads.lock().unwrap().push(key.to_string());
    }
}

#[tokio::test]
async fn the_remote_copy_serves_misses_and_a_bad_one_is_rebuilt_and_uploaded() {
    let index = PackageIndex::demo();
    let work = tempfile::tempdir().unwrap();
    let asked = [exact("sbxdemo", "1.0")];
    // Host A builds (its cache plays the remote store's content).
    let host_a = work.path().join("a");
    let built = ensure(&store(&index, &host_a), &python(), &asked)
        .await
        .unwrap();

    // Host B has no tools: it can only be served by the remote.
    let remote = Arc::new(FakeRemote {
        source: Some(host_a.clone()),
        ..FakeRemote::default()
    });
    let host_b = PackageStore::with_remote(
        config(&work.path().join("b"), no_tools()),
        Some(remote.clone()),
    );
    let fetched = ensure(&host_b, &python(), &asked)
        .await
        .unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!(fetched.source, PackageSource::L3);
    assert_eq!(fetched.closure, built.closure);
    assert_eq!(
        ensure(&host_b, &python(), &asked).await.unwrap().source,
        PackageSource::L2
    );
    assert_eq!(remote.fetches.load(Ordering::SeqCst), 1);
    assert!(
        remote.uploads.lock().unwrap().is_empty(),
        "nothing built, nothing uploaded"
    );

    // Host C gets a damaged copy: discarded, built locally, uploaded.
    let damaged = Arc::new(FakeRemote {
        source: Some(host_a.clone()),
        damaged: true,
        ..FakeRemote::default()
    });
    let host_c = PackageStore::with_remote(
        PackageConfig {
            tools: Tools {
                env: index.tool_env(),
                ..Tools::default()
            },
            ..PackageConfig::new(work.path().join("c"))
        },
        Some(damaged.clone()),
    );
    let rebuilt = ensure(&host_c, &python(), &asked).await.unwrap();
    assert_eq!(rebuilt.source, PackageSource::Built);
    assert_eq!(*damaged.uploads.lock().unwrap(), [rebuilt.key.as_str()]);

    // Host D's remote fails: a warning and a local build, never a failed run.
    let failing = Arc::new(FakeRemote {
        broken: true,
        ..FakeRemote::default()
    });
    let host_d = PackageStore::with_remote(
        PackageConfig {
            tools: Tools {
                env: index.tool_env(),
                ..Tools::default()
            },
            ..PackageConfig::new(work.path().join("d"))
        },
        Some(failing.clone()),
    );
    assert_eq!(
        ensure(&host_d, &python(), &asked).await.unwrap().source,
        PackageSource::Built
    );
    assert_eq!(failing.fetches.load(Ordering::SeqCst), 1);
}

#[test]
fn targets_come_from_the_root_filesystem_lock() {
    let lock = "bash=5.2.15-2+b13\nlibc6=2.36-9+deb12u14\nlibpython3.11-stdlib=3.11.2-6+deb12u8\npython3-minimal=3.11.2-1+b1\npython3.11=3.11.2-6+deb12u8\npython3=3.11.2-1+b1\n";
    let inputs = "2b3ba75f5bc02866edf4a438913d998a79ebcd23e876ffa55e6d859d2fd839ac";
    let target = Target::from_rootfs(Ecosystem::Python, inputs, lock).unwrap();
    assert_eq!(
        target,
        Target {
            ecosystem: Ecosystem::Python,
            image_version: "2b3ba75f5bc02866".into(),
            interpreter: "3.11".into(),
            glibc: "2.36".into(),
        }
    );
    let js =
        Target::from_rootfs(Ecosystem::Npm, inputs, "bun=1.4.5\nlibc6=2.36-9+deb12u14\n").unwrap();
    assert_eq!(
        (js.interpreter.as_str(), js.glibc.as_str()),
        ("1.4.5", "2.36")
    );
    let err = Target::from_rootfs(Ecosystem::Npm, inputs, lock).unwrap_err();
    assert!(err.to_string().contains("bun"), "{err}");
    let err = Target::from_rootfs(Ecosystem::Python, inputs, "python3.11=3.11.2\n").unwrap_err();
    assert!(err.to_string().contains("libc6"), "{err}");
}

/// The guest images on this machine, when built: their manifest yields a target.
#[test]
fn the_asset_manifest_gives_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let store = crate::assets::AssetStore::new(&crate::assets::AssetConfig {
        images_dir: images.clone(),
        source: crate::assets::AssetSource::Forbidden,
        version: Some("v1".into()),
        manifest_sha256: None,
    });
    let err = target_for(&store, sbx_protocol::Language::Python).unwrap_err();
    assert!(
        err.to_string().contains("not in the asset manifest"),
        "{err}"
    );
    fs::create_dir_all(images.join("v1")).unwrap();
    fs::write(
        images.join("v1/manifest.json"),
        serde_json::json!({
            "format": 1,
            "version": "v1",
            "assets": [{
                "name": "rootfs-python",
                "file": "rootfs-python.erofs",
                "sha256": "ab".repeat(32),
                "size": 1,
                "inputs": "cd".repeat(32),
                "lock": "libc6=2.36-9\npython3.11=3.11.2-6\n",
            }],
        })
        .to_string(),
    )
    .unwrap();
    let target = target_for(&store, sbx_protocol::Language::Python).unwrap();
    assert_eq!(target.image_version, "cd".repeat(8));
    assert_eq!(target.interpreter, "3.11");
    let err = target_for(&store, sbx_protocol::Language::Raw).unwrap_err();
    assert!(err.to_string().contains("no packages"), "{err}");
}

/// Through the host's own configured indexes (pip.conf, npm config): real wheels and tarballs.
/// Opt-in: `cargo test -p exec-sandbox --lib -- --ignored packages::tests::host_registries`.
#[tokio::test]
#[ignore = "contacts the package registries this host is configured for"]
#[expect(clippy::print_stderr, reason = "reports the install times it measured")]
async fn host_registries_install_numpy_and_lodash() {
    let cache = tempfile::tempdir().unwrap();
    let store = PackageStore::new(PackageConfig::new(cache.path().to_path_buf()));
    let numpy = ensure(&store, &python(), &[exact("numpy", "2.1.3")])
        .await
        .unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!(numpy.closure, [pin("numpy", "2.1.3")]);
    let (_keep, root) = extract(&numpy.path);
    assert!(root.join("python/numpy/__init__.py").is_file());
    assert!(
        fs::read_dir(root.join("python/numpy/_core"))
            .unwrap()
            .any(|e| e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with("cpython-311-x86_64-linux-gnu.so"))
    );
    let lodash = ensure(&store, &node(), &[range("lodash", "^4.17.0")])
        .await
        .unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!(lodash.closure.len(), 1);
    assert!(
        lodash.requested[0].version.starts_with("4."),
        "{:?}",
        lodash.requested
    );
    eprintln!(
        "numpy: {} ms, {} bytes; lodash: {} ms",
        numpy.install_ms.unwrap(),
        fs::metadata(&numpy.path).unwrap().len(),
        lodash.install_ms.unwrap()
    );
}

/// L3 for real: host A builds from the loopback index and uploads to an S3-protocol server on
/// loopback (moto); host B, with an empty cache and no tools at all, is served from S3 and
/// builds nothing; a corrupted object in S3 is detected and host C rebuilds locally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_travel_through_a_real_s3_store() {
    use crate::packages::s3::moto::Moto;
    use crate::packages::s3::{S3Config, S3Layers};

    let moto = Moto::start();
    moto.create_bucket("sbx-l3");
    let s3_config = S3Config {
        bucket: Some("sbx-l3".into()),
        endpoint_url: Some(moto.endpoint.clone()),
        prefix: "layers/".into(),
        ..S3Config::default()
    };
    let credentials = |name: &str| match name {
        "AWS_ACCESS_KEY_ID" | "AWS_SECRET_ACCESS_KEY" => Some("testing".to_string()),
        _ => None,
    };
    let s3 = || {
        Arc::new(
            S3Layers::with_env(&s3_config, credentials)
                .unwrap()
                .unwrap(),
        )
    };
    let index = PackageIndex::demo();
    let work = tempfile::tempdir().unwrap();
    let asked = [exact("sbxdemo", "1.0")];

    let a_remote = s3();
    let host_a = PackageStore::with_remote(
        config(
            &work.path().join("a"),
            Tools {
                env: index.tool_env(),
                ..Tools::default()
            },
        ),
        Some(a_remote.clone() as Arc<dyn RemoteLayers>),
    );
    let built = ensure(&host_a, &python(), &asked).await.unwrap();
    assert_eq!(built.source, PackageSource::Built);
    a_remote.wait_for_uploads().await;

    let host_b = PackageStore::with_remote(
        config(&work.path().join("b"), no_tools()),
        Some(s3() as Arc<dyn RemoteLayers>),
    );
    let fetched = ensure(&host_b, &python(), &asked)
        .await
        .unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!(fetched.source, PackageSource::L3, "host B built nothing");
    assert_eq!(fetched.closure, built.closure);
    assert_eq!(
        fs::read(&fetched.path).unwrap(),
        fs::read(&built.path).unwrap(),
        "the very layer host A built"
    );

    // Someone overwrites the stored layer: host C detects it and builds locally.
    let layer_object = format!("layers/{}/layer.erofs.zst", built.key);
    let c_remote = s3();
    c_remote
        .put_raw(&layer_object, b"not a zstd stream".to_vec())
        .await;
    let host_c = PackageStore::with_remote(
        config(
            &work.path().join("c"),
            Tools {
                env: index.tool_env(),
                ..Tools::default()
            },
        ),
        Some(c_remote.clone() as Arc<dyn RemoteLayers>),
    );
    let rebuilt = ensure(&host_c, &python(), &asked).await.unwrap();
    assert_eq!(rebuilt.source, PackageSource::Built);
    c_remote.wait_for_uploads().await;
    // The rebuilt upload repaired the store for the next host.
    let host_d = PackageStore::with_remote(
        config(&work.path().join("d"), no_tools()),
        Some(s3() as Arc<dyn RemoteLayers>),
    );
    assert_eq!(
        ensure(&host_d, &python(), &asked).await.unwrap().source,
        PackageSource::L3
    );
}
