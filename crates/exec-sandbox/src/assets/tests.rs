//! The store's flows with a fake builder: no root, no real image build.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use super::*;
use crate::ErrorKind;

/// Writes `fake <asset>` and a lock file; records every call; can fail, skip its output, or
/// hold its first build until released.
#[derive(Debug, Default)]
struct FakeBuilder {
    builds: Mutex<Vec<AssetKind>>,
    fail_on: Option<AssetKind>,
    write_nothing: bool,
    /// (tell the test a build started, wait for the test's go-ahead)
    gate: Mutex<Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>>,
}

impl FakeBuilder {
    fn builds(&self) -> Vec<AssetKind> {
        self.builds.lock().unwrap().clone()
    }
}

impl Builder for FakeBuilder {
    fn build(&self, kind: AssetKind, out_dir: &Path, log: &Path) -> Result<(), AssetError> {
        assert_ne!(
            kind,
            AssetKind::Initramfs,
            "the store writes the initramfs itself"
        );
        self.builds.lock().unwrap().push(kind);
        if let Some((started, go)) = self.gate.lock().unwrap().take() {
            started.send(()).unwrap();
            go.recv_timeout(Duration::from_secs(20))
                .expect("the test releases the build");
        }
        std::fs::write(log, format!("==> building {kind}\n")).unwrap();
        if self.fail_on == Some(kind) {
            return Err(AssetError::Build {
                asset: kind.name(),
                status: std::process::ExitStatus::from_raw(1 << 8),
                log: log.to_path_buf(),
                tail: "E: no space left".into(),
            });
        }
        if !self.write_nothing {
            std::fs::write(out_dir.join(kind.file()), format!("fake {kind}")).unwrap();
            if let Some(lock) = kind.lock_file() {
                std::fs::write(out_dir.join(lock), format!("{kind}-package=1.0\n")).unwrap();
            }
        }
        Ok(())
    }
}

struct Fixture {
    _home: tempfile::TempDir,
    config: AssetConfig,
    builder: Arc<FakeBuilder>,
}

impl Fixture {
    fn new() -> Self {
        Self::with_builder(FakeBuilder::default())
    }

    fn with_builder(builder: FakeBuilder) -> Self {
        let home = tempfile::tempdir().unwrap();
        let config = AssetConfig {
            images_dir: home.path().join("images"),
            source: AssetSource::Build,
            version: None,
            manifest_sha256: None,
        };
        Self {
            _home: home,
            config,
            builder: Arc::new(builder),
        }
    }

    fn store(&self) -> AssetStore {
        self.store_with(inputs())
    }

    fn store_with(&self, inputs: Inputs) -> AssetStore {
        AssetStore::with_parts(&self.config, inputs, self.builder.clone())
    }

    fn manifest(&self, store: &AssetStore) -> manifest::Manifest {
        load_manifest(&store.version_dir()).unwrap()
    }
}

/// The manifest in the directory `dir`, if any.
fn load_manifest(dir: &Path) -> Option<manifest::Manifest> {
    manifest::Manifest::load(&crate::disk::Dir::open(dir).unwrap()).unwrap()
}

fn inputs() -> Inputs {
    Inputs::fake(b"\x7fELF fake agent", "echo fake build")
}

#[tokio::test]
async fn first_ensure_builds_what_is_needed_and_records_it() {
    let fx = Fixture::new();
    let store = fx.store();
    let assets = store.ensure(&[Language::Raw]).await.unwrap();
    assert_eq!(
        fx.builder.builds(),
        [AssetKind::Kernel, AssetKind::Rootfs(Language::Raw)]
    );
    assert_eq!(assets.version, store.version());
    assert_eq!(std::fs::read(&assets.kernel).unwrap(), b"fake kernel");
    assert_eq!(
        std::fs::read(assets.rootfs(Language::Raw).unwrap()).unwrap(),
        b"fake rootfs-raw"
    );
    assert!(assets.rootfs(Language::Python).is_none());
    let cpio = std::fs::read(&assets.initramfs).unwrap();
    let members = initramfs::tests::parse(&cpio).unwrap();
    assert!(
        members
            .iter()
            .any(|m| m.0 == "init" && m.3 == b"\x7fELF fake agent")
    );

    let manifest = fx.manifest(&store);
    let names: Vec<&str> = manifest.assets.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["kernel", "initramfs", "rootfs-raw"]);
    for entry in &manifest.assets {
        let path = store.version_dir().join(&entry.file);
        assert_eq!(
            files::sha256_file(&path).unwrap(),
            (entry.sha256.clone(), entry.size)
        );
        let kind = AssetKind::from_name(&entry.name).unwrap();
        assert_eq!(entry.inputs, inputs().key(kind));
    }
    let kernel = manifest.get(AssetKind::Kernel).unwrap();
    assert_eq!(kernel.lock.as_deref(), Some("kernel-package=1.0\n"));
    assert_eq!(
        std::fs::read_to_string(store.version_dir().join("kernel.lock")).unwrap(),
        "kernel-package=1.0\n"
    );
    assert!(store.version_dir().join("build-kernel.log").is_file());
    // Everything a later process needs to skip hashing is stamped.
    let stamps: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.version_dir().join(stamp::FILE)).unwrap())
            .unwrap();
    for entry in &manifest.assets {
        assert!(
            stamps.get(&entry.file).is_some(),
            "{} unstamped",
            entry.file
        );
    }
    // No temporary files or build directories are left behind.
    for file in std::fs::read_dir(store.version_dir()).unwrap() {
        let name = file.unwrap().file_name().into_string().unwrap();
        assert!(!name.starts_with('.'), "leftover {name}");
    }
}

#[tokio::test]
async fn later_calls_and_later_processes_build_nothing() {
    let fx = Fixture::new();
    let store = fx.store();
    let first = store.ensure(&[Language::Raw]).await.unwrap();
    let builds = fx.builder.builds().len();
    let again = store.ensure(&[Language::Raw]).await.unwrap();
    assert_eq!(again.kernel, first.kernel);
    // A new store is a new process as far as memoization goes.
    let fresh = fx.store().ensure(&[Language::Raw]).await.unwrap();
    assert_eq!(fresh.rootfs, first.rootfs);
    assert_eq!(fx.builder.builds().len(), builds);
    // Another language builds only its own root filesystem.
    store
        .ensure(&[Language::Python, Language::Raw])
        .await
        .unwrap();
    assert_eq!(
        fx.builder.builds()[builds..],
        [AssetKind::Rootfs(Language::Python)]
    );
}

#[tokio::test]
async fn a_corrupted_asset_is_a_checksum_error_not_a_rebuild() {
    let fx = Fixture::new();
    let assets = fx.store().ensure(&[Language::Raw]).await.unwrap();
    let builds = fx.builder.builds().len();
    let rootfs = assets.rootfs(Language::Raw).unwrap().to_path_buf();
    let mut perms = std::fs::metadata(&rootfs).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
    std::fs::set_permissions(&rootfs, perms).unwrap();
    std::fs::write(&rootfs, b"tampered root filesystem").unwrap();

    let err = fx.store().ensure(&[Language::Raw]).await.unwrap_err();
    let AssetError::Checksum {
        name,
        path,
        expected,
        actual,
        url,
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(name, "rootfs-raw");
    assert_eq!(path, &rootfs);
    assert_ne!(expected, actual);
    assert!(url.is_none());
    assert_eq!(err.kind(), ErrorKind::Permanent);
    let hint = err.hint().unwrap();
    assert!(
        hint.contains(&rootfs.display().to_string()) && hint.contains("sbx prefetch"),
        "{hint}"
    );
    assert_eq!(fx.builder.builds().len(), builds, "nothing was rebuilt");
    assert_eq!(std::fs::read(&rootfs).unwrap(), b"tampered root filesystem");
    // Deleting the damaged file, as the hint says, rebuilds just that asset.
    std::fs::remove_file(&rootfs).unwrap();
    fx.store().ensure(&[Language::Raw]).await.unwrap();
    assert_eq!(
        fx.builder.builds()[builds..],
        [AssetKind::Rootfs(Language::Raw)]
    );
}

/// "At once": offline, nothing is built and no lock is taken or waited for (a process building
/// the same version holds it for minutes).
#[tokio::test]
async fn offline_reports_what_is_missing_at_once() {
    let mut fx = Fixture::new();
    fx.config.source = AssetSource::Forbidden;
    let err = fx.store().ensure(&[Language::Python]).await.unwrap_err();
    let AssetError::NotFound { missing, dir } = &err else {
        panic!("{err}")
    };
    assert_eq!(
        missing,
        &["vmlinux", "initramfs.cpio", "rootfs-python.erofs"]
    );
    assert_eq!(dir, &fx.store().version_dir());
    assert!(err.hint().unwrap().contains("EXEC_SANDBOX_OFFLINE"));
    assert!(fx.builder.builds().is_empty());
    assert!(
        !fx.config.images_dir.exists(),
        "offline mode creates nothing"
    );

    // Offline with everything present works without touching the builder.
    fx.config.source = AssetSource::Build;
    fx.store().ensure(&[Language::Python]).await.unwrap();
    fx.config.source = AssetSource::Forbidden;
    fx.store().ensure(&[Language::Python]).await.unwrap();
    // While another process holds the lock, offline does not wait for it.
    let images = crate::disk::Dir::open(&fx.config.images_dir).unwrap();
    let _held = lock::DirLock::acquire(&images, || panic!("nobody else holds the lock")).unwrap();
    let mut store = fx.store();
    Arc::get_mut(&mut store.inner).unwrap().store.on_lock_wait =
        Some(store::Hook(Arc::new(|| {
            panic!("offline waited for the lock")
        })));
    let err = store.ensure(&[Language::Javascript]).await.unwrap_err();
    assert!(
        matches!(&err, AssetError::NotFound { missing, .. } if missing == &["rootfs-javascript.erofs"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_stores_build_once() {
    let fx = Fixture::new();
    let (started_tx, started_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel();
    *fx.builder.gate.lock().unwrap() = Some((started_tx, go_rx));

    // Two stores with separate in-process state: as far as the lock knows, two processes.
    let first = fx.store();
    let first_task = tokio::spawn(async move { first.ensure(&[Language::Raw]).await });
    tokio::task::spawn_blocking(move || started_rx.recv_timeout(Duration::from_secs(20)))
        .await
        .unwrap()
        .expect("the first store starts building");

    // The second store finds nothing ready and must wait on the lock: only then is the
    // first build released, so the second has certainly tried while the first was building.
    let go = Mutex::new(Some(go_tx));
    let waited = Arc::new(AtomicBool::new(false));
    let waited2 = Arc::clone(&waited);
    let mut second = fx.store();
    let store = Arc::get_mut(&mut second.inner).unwrap();
    store.store.on_lock_wait = Some(store::Hook(Arc::new(move || {
        waited2.store(true, Ordering::SeqCst);
        if let Some(go) = go.lock().unwrap().take() {
            go.send(()).unwrap();
        }
    })));
    let second_result = second.ensure(&[Language::Raw]).await.unwrap();
    let first_result = first_task.await.unwrap().unwrap();

    assert!(waited.load(Ordering::SeqCst));
    assert_eq!(
        fx.builder.builds(),
        [AssetKind::Kernel, AssetKind::Rootfs(Language::Raw)],
        "each asset built exactly once"
    );
    assert_eq!(first_result.kernel, second_result.kernel);
    assert_eq!(first_result.rootfs, second_result.rootfs);
}

#[tokio::test]
async fn an_agent_change_rebuilds_neither_kernel_nor_rootfs() {
    let fx = Fixture::new();
    let old = fx.store().ensure(&Language::ALL).await.unwrap();
    let builds = fx.builder.builds().len();

    let new_store = fx.store_with(Inputs::fake(b"\x7fELF new agent", "echo fake build"));
    assert_ne!(new_store.version(), old.version);
    let new = new_store.ensure(&Language::ALL).await.unwrap();
    assert_eq!(
        fx.builder.builds().len(),
        builds,
        "no kernel or rootfs build"
    );
    assert_ne!(new.kernel, old.kernel);
    let inode = |p: &Path| std::fs::metadata(p).unwrap().ino();
    assert_eq!(inode(&new.kernel), inode(&old.kernel), "shared, not copied");
    let python = |a: &GuestAssets| a.rootfs(Language::Python).unwrap().to_path_buf();
    assert_eq!(inode(&python(&new)), inode(&python(&old)));
    assert_ne!(
        std::fs::read(&new.initramfs).unwrap(),
        std::fs::read(&old.initramfs).unwrap()
    );
    let manifest = fx.manifest(&new_store);
    assert!(manifest.get(AssetKind::Kernel).unwrap().lock.is_some());
    assert!(new_store.version_dir().join("rootfs-python.lock").is_file());
    // The old version still verifies (its files' ctime moved with the new link).
    fx.store().ensure(&Language::ALL).await.unwrap();
}

#[tokio::test]
async fn pruning_removes_the_versions_an_upgrade_left_and_keeps_the_one_in_use() {
    let fx = Fixture::new();
    let old_store = fx.store();
    let old = old_store.ensure(&Language::ALL).await.unwrap();
    let new_store = fx.store_with(Inputs::fake(b"\x7fELF new agent", "echo fake build"));
    let new = new_store.ensure(&Language::ALL).await.unwrap();

    // Seen from the new version: the old one, whose kernel and root filesystems are linked
    // into the new one (they cost nothing); its initramfs, manifest and logs are its own.
    let (others, bytes) = new_store.other_versions().await.unwrap();
    assert_eq!(others, [old_store.version_dir()]);
    let own: u64 = std::fs::read_dir(old_store.version_dir())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap())
        .filter(|m| m.nlink() == 1)
        .map(|m| m.len())
        .sum();
    assert!(own >= std::fs::metadata(&old.initramfs).unwrap().len());
    assert_eq!(bytes, own);

    assert_eq!(new_store.prune_other_versions().await.unwrap(), (1, bytes));
    assert!(!old_store.version_dir().exists());
    assert_eq!(new_store.other_versions().await.unwrap(), (Vec::new(), 0));
    // The version in use is untouched and still verifies without a build.
    let builds = fx.builder.builds().len();
    let again = fx
        .store_with(Inputs::fake(b"\x7fELF new agent", "echo fake build"))
        .ensure(&Language::ALL)
        .await
        .unwrap();
    assert_eq!(again.kernel, new.kernel);
    assert_eq!(fx.builder.builds().len(), builds);
    assert!(
        fx.config.images_dir.join(".lock").exists(),
        "the lock stays"
    );
}

#[tokio::test]
async fn a_kernel_input_change_rebuilds_only_the_kernel() {
    let fx = Fixture::new();
    fx.store().ensure(&[Language::Raw]).await.unwrap();
    let builds = fx.builder.builds().len();
    let mut changed = inputs();
    changed.kernel_fragment = "CONFIG_OTHER=y\n";
    fx.store_with(changed)
        .ensure(&[Language::Raw])
        .await
        .unwrap();
    assert_eq!(fx.builder.builds()[builds..], [AssetKind::Kernel]);
}

#[tokio::test]
async fn a_failed_build_keeps_what_was_finished() {
    let fx = Fixture::with_builder(FakeBuilder {
        fail_on: Some(AssetKind::Rootfs(Language::Raw)),
        ..FakeBuilder::default()
    });
    let err = fx.store().ensure(&[Language::Raw]).await.unwrap_err();
    let AssetError::Build { asset, tail, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(asset, "rootfs-raw");
    assert!(tail.contains("no space"));
    assert_eq!(err.kind(), ErrorKind::Permanent);

    // The kernel survived: a working builder only builds the root filesystem.
    let retry = Fixture {
        builder: Arc::new(FakeBuilder::default()),
        ..fx
    };
    retry.store().ensure(&[Language::Raw]).await.unwrap();
    assert_eq!(retry.builder.builds(), [AssetKind::Rootfs(Language::Raw)]);
}

#[tokio::test]
async fn a_build_without_its_output_is_an_error() {
    let fx = Fixture::with_builder(FakeBuilder {
        write_nothing: true,
        ..FakeBuilder::default()
    });
    let err = fx.store().ensure(&[Language::Raw]).await.unwrap_err();
    assert!(
        matches!(&err, AssetError::BuildOutput { asset, .. } if asset == "kernel"),
        "{err}"
    );
    assert!(
        load_manifest(&fx.store().version_dir()).is_none_or(|m| m.get(AssetKind::Kernel).is_none())
    );
}

#[tokio::test]
async fn a_pinned_version_uses_its_own_directory() {
    let mut fx = Fixture::new();
    fx.config.version = Some("release-1".into());
    let store = fx.store();
    assert_eq!(store.version(), "release-1");
    let assets = store.ensure(&[Language::Raw]).await.unwrap();
    assert!(
        assets
            .kernel
            .starts_with(fx.config.images_dir.join("release-1"))
    );

    fx.config.version = Some("../escape".into());
    let err = fx.store().ensure(&[Language::Raw]).await.unwrap_err();
    assert!(matches!(err, AssetError::InvalidVersion { .. }), "{err}");
}

#[tokio::test]
async fn export_copies_a_complete_version() {
    let fx = Fixture::new();
    let store = fx.store();
    let dest = tempfile::tempdir().unwrap();
    let exported = store.export(dest.path()).await.unwrap();
    assert_eq!(exported, dest.path().join(store.version()));
    let manifest = load_manifest(&exported).unwrap();
    assert_eq!(manifest.assets.len(), AssetKind::ALL.len());
    for entry in &manifest.assets {
        let (sha256, size) = files::sha256_file(&exported.join(&entry.file)).unwrap();
        assert_eq!((sha256, size), (entry.sha256.clone(), entry.size));
    }
    assert!(exported.join("rootfs-javascript.lock").is_file());
    assert!(
        !exported.join(stamp::FILE).exists(),
        "stamps are local to a machine"
    );
    let err = store.export(dest.path()).await.unwrap_err();
    assert!(err.to_string().contains("export into"), "{err}");
}
