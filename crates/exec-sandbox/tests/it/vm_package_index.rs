//! Packages end to end in real VMs, from a loopback package index the test serves (wheels and
//! npm tarballs built by the test): validation, host install, the L2 layer cache, the layer
//! attached read-only, imports in runs and sessions, and every refusal before any VM boots. No
//! traffic leaves 127.0.0.1, and the guests have no NIC.

use exec_sandbox::testing::PackageIndex;
use exec_sandbox::{
    Error, ErrorKind, ExecOptions, ExecutionResult, Language, PackageError, PackageSource,
    RunOptions, Scheduler, SchedulerConfig, SessionOptions,
};

use crate::support::chain;

/// A scheduler whose pip and npm use `index`, with its own (empty) package and snapshot
/// caches. The fixtures are not among the top-10,000 packages: validation is off.
fn scheduler(index: &PackageIndex) -> (Scheduler, tempfile::TempDir) {
    let dir = tempfile::Builder::new()
        .prefix("sbx-package-index-test-")
        .tempdir()
        .unwrap();
    let config = SchedulerConfig {
        package_cache_dir: dir.path().join("packages"),
        snapshot_cache_dir: dir.path().join("snapshots"),
        enable_package_validation: false,
        ..SchedulerConfig::from_env().unwrap()
    };
    (
        Scheduler::with_package_tool_env(config, index.tool_env()).unwrap(),
        dir,
    )
}

async fn run(s: &Scheduler, options: RunOptions) -> ExecutionResult {
    s.run(options)
        .await
        .unwrap_or_else(|e| panic!("run failed: {}", chain(&e)))
}

/// Python code that prints what it imported and the guest's network devices.
const PYTHON_DEMO: &str = "import os, sbxdemo, sbxdep\n\
    sbxdemo.main()\n\
    print(sbxdep.VERSION, sorted(os.listdir('/sys/class/net')))";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_packages_are_built_once_then_served_from_the_cache() {
    let index = PackageIndex::demo();
    let (s, _dir) = scheduler(&index);

    let built = run(
        &s,
        RunOptions::new(Language::Python, PYTHON_DEMO).packages(["sbxdemo==1.0"]),
    )
    .await;
    assert_eq!(
        built.stdout, "sbxdemo 1.0\n1.0 ['lo']\n",
        "{}",
        built.stderr
    );
    assert_eq!(built.packages_source, PackageSource::Built);
    assert!(built.packages_install_ms.is_some());

    // The same set again: from L2, without asking the index anything.
    let asked = index.requests().len();
    let cached = run(
        &s,
        RunOptions::new(Language::Python, PYTHON_DEMO).packages(["sbxdemo==1.0"]),
    )
    .await;
    assert_eq!(cached.stdout, built.stdout, "{}", cached.stderr);
    assert_eq!(cached.packages_source, PackageSource::L2);
    assert_eq!(cached.packages_install_ms, None);
    assert_eq!(index.requests().len(), asked, "an exact pin needs no index");
    assert!(!cached.warm_pool_hit, "pooled VMs have no packages");

    // A range resolves on the host to the newest match.
    let ranged = run(
        &s,
        RunOptions::new(Language::Python, "import sbxdemo; sbxdemo.main()")
            .packages(["sbxdemo>=1.0,<2"]),
    )
    .await;
    assert_eq!(ranged.stdout, "sbxdemo 1.1\n", "{}", ranged.stderr);

    // The layer is read-only for the program.
    let write = run(
        &s,
        RunOptions::new(
            Language::Python,
            "import sbxdemo\ntry:\n    open(sbxdemo.__file__, 'a')\nexcept OSError as e:\n    print(type(e).__name__)",
        )
        .packages(["sbxdemo==1.0"]),
    )
    .await;
    assert!(
        matches!(write.stdout.trim(), "OSError" | "PermissionError"),
        "{} {}",
        write.stdout,
        write.stderr
    );

    if index.has_extension() {
        let ext = run(
            &s,
            RunOptions::new(
                Language::Python,
                "from sbxext import _speed\nprint(_speed.answer())",
            )
            .packages(["sbxext==1.0"]),
        )
        .await;
        assert_eq!(ext.stdout, "42\n", "{}", ext.stderr);
    }
    let report = s.caches().await;
    assert!(report.layers.entries >= 2, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_keeps_its_packages_across_executions() {
    let index = PackageIndex::demo();
    let (s, _dir) = scheduler(&index);
    let session = s
        .session(SessionOptions::new(Language::Python).packages(["sbxdemo==1.1"]))
        .await
        .unwrap_or_else(|e| panic!("session: {}", chain(&e)));
    let first = session
        .exec(ExecOptions::new("import sbxdemo as d"))
        .await
        .unwrap();
    assert_eq!(first.exit_code, 0, "{}", first.stderr);
    assert_eq!(first.packages_source, PackageSource::Built);
    let second = session.exec(ExecOptions::new("d.main()")).await.unwrap();
    assert_eq!(second.stdout, "sbxdemo 1.1\n", "{}", second.stderr);
    session.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn javascript_packages_come_with_their_dependencies() {
    let index = PackageIndex::demo();
    let (s, _dir) = scheduler(&index);
    let r = run(
        &s,
        RunOptions::new(
            Language::Javascript,
            "import demo from 'sbx-demo';\n\
             import dep from 'sbx-dep';\n\
             import scoped from '@sbx/scoped';\n\
             const cjs = require('sbx-demo');\n\
             console.log(demo, '|', dep, '|', scoped, '|', cjs === demo);",
        )
        .packages(["sbx-demo@1.0.0", "@sbx/scoped@1.0.0"]),
    )
    .await;
    assert_eq!(
        r.stdout, "sbx-demo 1.0.0 | sbx-dep 1.2.0 | @sbx/scoped 1.0.0 | true\n",
        "{}",
        r.stderr
    );
    assert_eq!(r.packages_source, PackageSource::Built);
    assert!(
        !index.marker_dir().join("postinstall-ran").exists(),
        "no install script ever runs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_cannot_be_installed_safely_is_refused_before_any_vm() {
    let index = PackageIndex::demo();
    let (s, _dir) = scheduler(&index);
    for (language, spec, what) in [
        (Language::Python, "sbxsrc==1.0", "only source distributions"),
        (Language::Python, "sbxneedsrc==1.0", "sbxsrc"),
        (Language::Python, "sbxdemo==9.9", "does not exist"),
        (Language::Python, "sbxconflict==1.0", "sbxdep"),
        (Language::Javascript, "sbx-native@1.0.0", "sbx-native"),
        (Language::Javascript, "sbx-inst@1.0.0", "sbx-inst"),
    ] {
        let err = s
            .run(RunOptions::new(language, "1").packages([spec]))
            .await
            .unwrap_err();
        let Error::Packages(package_error) = &err else {
            panic!("{spec}: {}", chain(&err))
        };
        let package_error: &PackageError = package_error;
        let text = chain(&err);
        assert!(text.contains(what), "{spec}: {text}");
        assert_eq!(
            err.kind(),
            ErrorKind::InvalidInput,
            "{spec}: {package_error}"
        );
    }
    // Validation refusals never reach the index.
    let asked = index.requests().len();
    for (language, specs) in [
        (Language::Python, vec!["sbxdemo==1.0", "SbxDemo==1.1"]),
        (Language::Python, vec!["sbxdemo==1.0 ; os_name == 'posix'"]),
        (Language::Raw, vec!["sbxdemo==1.0"]),
    ] {
        let err = s
            .run(RunOptions::new(language, "1").packages(specs.clone()))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::PackageSpec { .. }), "{specs:?}: {err}");
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
    }
    assert_eq!(index.requests().len(), asked);
    // A bare name is refused with the newest version the index has.
    let err = s
        .run(RunOptions::new(Language::Python, "1").packages(["sbxdemo"]))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PackageSpec { .. }), "{err}");
    let hint = err.hint().unwrap_or_default();
    assert!(hint.contains("sbxdemo==1.1"), "{hint}");
    assert_eq!(s.peak_vms(), 0, "no VM was booted for any refusal");
}
