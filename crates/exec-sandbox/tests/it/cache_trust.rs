//! The cache directory is a trust root (SECURITY.md): each test plants what another user could
//! (a link, a foreign owner, a writable directory) and proves it is refused, with nothing
//! outside the cache created or changed. No VM; the tests run as root (they `chown` to
//! `nobody`, uid 65534).

use std::os::unix::fs::{MetadataExt, PermissionsExt, chown, symlink};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use exec_sandbox::assets::{AssetError, AssetStore};
use exec_sandbox::{Error, ErrorKind, Language, Scheduler, SchedulerConfig, TrustError};

use crate::assets::{ALL_FILES, config, publish, serve};
use crate::support::chain;

const NOBODY: u32 = 65534;

/// What a directory outside the cache holds (names, contents, mtimes, modes), to prove an
/// attack through the cache changed nothing there.
struct Untouched {
    dir: PathBuf,
    before: Vec<(String, Vec<u8>, SystemTime, u32)>,
}

impl Untouched {
    fn record(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            before: list(dir),
        }
    }

    fn assert_untouched(&self) {
        assert_eq!(
            list(&self.dir),
            self.before,
            "{} changed",
            self.dir.display()
        );
    }
}

fn list(dir: &Path) -> Vec<(String, Vec<u8>, SystemTime, u32)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            let bytes = if meta.is_file() {
                std::fs::read(e.path()).unwrap()
            } else {
                Vec::new()
            };
            let name = e.file_name().into_string().unwrap();
            (name, bytes, meta.modified().unwrap(), meta.mode())
        })
        .collect();
    files.sort();
    files
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().mode() & 0o7777
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Every cache directory under `cache`, offline (nothing could be built or downloaded).
fn offline_config(cache: &Path) -> SchedulerConfig {
    SchedulerConfig {
        cache_dir: cache.into(),
        images_dir: cache.join("images"),
        snapshot_cache_dir: cache.join("snapshots"),
        package_cache_dir: cache.join("packages"),
        offline: true,
        ..SchedulerConfig::default()
    }
}

/// `Scheduler::new`'s refusal: permanent, with a hint.
fn refused(config: SchedulerConfig) -> Error {
    let error = Scheduler::new(config)
        .err()
        .expect("the scheduler is refused");
    assert_eq!(error.kind(), ErrorKind::Permanent, "{}", chain(&error));
    assert!(error.hint().is_some(), "{}", chain(&error));
    error
}

#[tokio::test]
async fn a_symlink_planted_as_the_images_lock_is_refused_and_its_target_untouched() {
    let server_root = tempfile::tempdir().unwrap();
    publish(server_root.path(), "v-lock", ALL_FILES);
    let home = tempfile::tempdir().unwrap();
    let images = home.path().join("images");
    std::fs::create_dir(&images).unwrap();
    set_mode(&images, 0o700);
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("shadow");
    std::fs::write(&target, b"root:*:0:0\n").unwrap();
    let untouched = Untouched::record(outside.path());
    symlink(&target, images.join(".lock")).unwrap();

    // Downloading needs the lock: its file is opened without following the link.
    let store = AssetStore::new(&config(home.path(), &serve(server_root.path()), "v-lock"));
    let err = store.ensure(&[Language::Python]).await.unwrap_err();
    assert!(matches!(err, AssetError::Io { .. }), "{}", chain(&err));
    assert!(chain(&err).contains("symbolic link"), "{}", chain(&err));
    assert!(chain(&err).contains(".lock"), "{}", chain(&err));
    untouched.assert_untouched();
    assert!(
        std::fs::symlink_metadata(images.join(".lock"))
            .unwrap()
            .file_type()
            .is_symlink(),
        "the link itself stays for the operator to look at"
    );
}

#[tokio::test]
async fn a_cache_dir_owned_by_another_uid_is_refused() {
    let parent = tempfile::tempdir().unwrap();
    let cache = parent.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    set_mode(&cache, 0o700);
    chown(&cache, Some(NOBODY), Some(NOBODY)).unwrap();
    let untouched = Untouched::record(parent.path());

    let error = refused(offline_config(&cache));
    let Error::UntrustedCache(TrustError::ForeignOwner { path, owner, .. }) = &error else {
        panic!("{}", chain(&error))
    };
    assert_eq!((path, *owner), (&cache, NOBODY));
    let text = chain(&error);
    assert!(
        text.contains(&cache.display().to_string()) && text.contains("uid 65534"),
        "{text}"
    );
    assert!(
        error.hint().unwrap().contains("chown"),
        "{:?}",
        error.hint()
    );

    // A library user with the asset store alone is refused the same way.
    let store = AssetStore::new(&config(&cache, "http://127.0.0.1:9", "v1"));
    let err = store.ensure(&[Language::Python]).await.unwrap_err();
    assert!(
        matches!(err, AssetError::Untrusted(TrustError::ForeignOwner { .. })),
        "{}",
        chain(&err)
    );
    assert_eq!(err.kind(), ErrorKind::Permanent);

    assert!(
        std::fs::read_dir(&cache).unwrap().next().is_none(),
        "nothing created in it"
    );
    untouched.assert_untouched();
}

#[test]
fn a_group_writable_cache_dir_is_refused_and_a_0755_one_is_made_private() {
    let parent = tempfile::tempdir().unwrap();
    let cache = parent.path().join("cache");
    std::fs::create_dir_all(cache.join("images")).unwrap();
    set_mode(&cache, 0o775);
    let error = refused(offline_config(&cache));
    assert!(
        matches!(
            &error,
            Error::UntrustedCache(TrustError::Writable { mode: 0o775, .. })
        ),
        "{}",
        chain(&error)
    );
    assert!(
        error.hint().unwrap().contains("chmod go-w"),
        "{:?}",
        error.hint()
    );
    assert_eq!(
        mode(&cache),
        0o775,
        "refused, not repaired: its contents may be changed"
    );

    // A cache as earlier versions left it (0755, the caller's): made private, then used.
    set_mode(&cache, 0o755);
    set_mode(&cache.join("images"), 0o755);
    Scheduler::new(offline_config(&cache)).expect("accepted");
    assert_eq!((mode(&cache), mode(&cache.join("images"))), (0o700, 0o700));
}

#[test]
fn a_cache_under_a_directory_others_can_write_is_refused() {
    let parent = tempfile::tempdir().unwrap();
    let shared = parent.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    set_mode(&shared, 0o777);
    let error = refused(offline_config(&shared.join("cache")));
    let Error::UntrustedCache(TrustError::Writable { path, .. }) = &error else {
        panic!("{}", chain(&error))
    };
    assert_eq!(path, &shared);
    assert!(std::fs::read_dir(&shared).unwrap().next().is_none());
    // Sticky, like /tmp: only an entry's owner may rename or remove it. Accepted.
    set_mode(&shared, 0o1777);
    Scheduler::new(offline_config(&shared.join("cache"))).expect("accepted");
}

#[tokio::test]
async fn cache_directories_are_created_private() {
    let server_root = tempfile::tempdir().unwrap();
    publish(server_root.path(), "v-new", ALL_FILES);
    let home = tempfile::tempdir().unwrap();
    let cache = home.path().join("new/exec-sandbox");
    let store = AssetStore::new(&config(&cache, &serve(server_root.path()), "v-new"));
    store.ensure(&[Language::Raw]).await.unwrap();
    for dir in ["new", "new/exec-sandbox", "new/exec-sandbox/images"] {
        assert_eq!(mode(&home.path().join(dir)), 0o700, "{dir}");
    }
    assert_eq!(mode(&store.version_dir()), 0o700);
}
