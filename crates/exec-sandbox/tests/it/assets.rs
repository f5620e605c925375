//! Prebuilt asset downloads against a loopback HTTP server started by the test: no root, no
//! image build, no traffic beyond 127.0.0.1.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use exec_sandbox::assets::{AssetConfig, AssetError, AssetStore};
use exec_sandbox::{ErrorKind, Language, SchedulerConfig};
use sha2::{Digest, Sha256};

/// Serves the files under `root` (GET only, 404 for anything else) until the test process
/// ends, answering at most `MAX_REQUESTS` requests.
pub(crate) fn serve(root: &Path) -> String {
    const MAX_REQUESTS: usize = 200;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let root = root.to_path_buf();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(MAX_REQUESTS) {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            // Skip the headers.
            let mut header = String::new();
            while reader.read_line(&mut header).is_ok_and(|n| n > 2) {
                header.clear();
            }
            let path = request_line.split_whitespace().nth(1).unwrap_or("/");
            let file = (!path.contains(".."))
                .then(|| std::fs::read(root.join(path.trim_start_matches('/'))).ok())
                .flatten();
            let _ = match file {
                Some(body) => stream
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .and_then(|()| stream.write_all(&body)),
                None => stream.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                ),
            };
        }
    });
    format!("http://{address}")
}

/// Asset files and their manifest, laid out as an operator serves them.
pub(crate) fn publish(root: &Path, version: &str, files: &[(&str, &str, &[u8])]) -> PathBuf {
    let dir = root.join(version);
    std::fs::create_dir_all(&dir).unwrap();
    let assets: Vec<serde_json::Value> = files
        .iter()
        .map(|(name, file, content)| {
            std::fs::write(dir.join(file), content).unwrap();
            serde_json::json!({
                "name": name,
                "file": file,
                "sha256": hex::encode(Sha256::digest(content)),
                "size": content.len(),
                "inputs": "0".repeat(64),
                "lock": format!("{name}-package=1.0\n"),
            })
        })
        .collect();
    let manifest = serde_json::json!({ "format": 1, "version": version, "assets": assets });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    dir
}

pub(crate) const ALL_FILES: &[(&str, &str, &[u8])] = &[
    ("kernel", "vmlinux", b"prebuilt kernel"),
    (
        "rootfs-python",
        "rootfs-python.erofs",
        b"prebuilt python root",
    ),
    (
        "rootfs-javascript",
        "rootfs-javascript.erofs",
        b"prebuilt javascript root",
    ),
    ("rootfs-raw", "rootfs-raw.erofs", b"prebuilt raw root"),
];

pub(crate) fn config(images: &Path, base_url: &str, version: &str) -> AssetConfig {
    SchedulerConfig {
        cache_dir: images.into(),
        images_dir: images.join("images"),
        asset_base_url: Some(base_url.into()),
        asset_version: Some(version.into()),
        offline: false,
        auto_download_assets: true,
        ..SchedulerConfig::default()
    }
    .asset_config()
}

#[tokio::test]
async fn downloads_verify_and_export_round_trips() {
    let server_root = tempfile::tempdir().unwrap();
    publish(server_root.path(), "v-test", ALL_FILES);
    let url = serve(server_root.path());
    let home = tempfile::tempdir().unwrap();
    let store = AssetStore::new(&config(home.path(), &url, "v-test"));

    let assets = store.ensure(&[Language::Raw]).await.unwrap();
    assert_eq!(std::fs::read(&assets.kernel).unwrap(), b"prebuilt kernel");
    assert_eq!(
        std::fs::read(assets.rootfs(Language::Raw).unwrap()).unwrap(),
        b"prebuilt raw root"
    );
    assert!(
        !store.version_dir().join("rootfs-python.erofs").exists(),
        "only what was asked"
    );
    // The initramfs always carries this library's own agent: written locally.
    assert!(
        std::fs::read(&assets.initramfs)
            .unwrap()
            .starts_with(b"070701")
    );
    assert_eq!(
        std::fs::read_to_string(store.version_dir().join("kernel.lock")).unwrap(),
        "kernel-package=1.0\n"
    );

    // An operator re-serves what this host has; a second host downloads it from there.
    let export_root = tempfile::tempdir().unwrap();
    let exported = store.export(export_root.path()).await.unwrap();
    assert_eq!(exported, export_root.path().join("v-test"));
    let second_home = tempfile::tempdir().unwrap();
    let second = AssetStore::new(&config(
        second_home.path(),
        &serve(export_root.path()),
        "v-test",
    ));
    let copy = second.ensure(&Language::ALL).await.unwrap();
    for language in Language::ALL {
        assert_eq!(
            std::fs::read(copy.rootfs(language).unwrap()).unwrap(),
            std::fs::read(exported.join(format!("rootfs-{language}.erofs"))).unwrap()
        );
    }
    assert_eq!(
        std::fs::read(&copy.initramfs).unwrap(),
        std::fs::read(&assets.initramfs).unwrap()
    );
}

#[tokio::test]
async fn a_tampered_download_is_a_checksum_error() {
    let server_root = tempfile::tempdir().unwrap();
    let dir = publish(server_root.path(), "v-tampered", ALL_FILES);
    std::fs::write(dir.join("rootfs-raw.erofs"), b"prebuilt raw ROOT").unwrap();
    let home = tempfile::tempdir().unwrap();
    let store = AssetStore::new(&config(
        home.path(),
        &serve(server_root.path()),
        "v-tampered",
    ));

    let err = store.ensure(&[Language::Raw]).await.unwrap_err();
    let AssetError::Checksum { name, url, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(name, "rootfs-raw");
    assert!(
        url.as_deref()
            .unwrap()
            .ends_with("/v-tampered/rootfs-raw.erofs")
    );
    assert_eq!(err.kind(), ErrorKind::Permanent);
    // Nothing unverified is left where a later run could pick it up.
    let leftovers: Vec<_> = std::fs::read_dir(store.version_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.starts_with("rootfs-raw") || name.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A file longer than listed is caught too. (A fresh cache: the first one already holds
    // the genuine kernel, which a download of the same SHA-256 would reuse.)
    let dir = publish(server_root.path(), "v-long", ALL_FILES);
    std::fs::write(dir.join("vmlinux"), b"prebuilt kernel and then some").unwrap();
    let home = tempfile::tempdir().unwrap();
    let store = AssetStore::new(&config(home.path(), &serve(server_root.path()), "v-long"));
    let err = store.ensure(&[Language::Raw]).await.unwrap_err();
    assert!(
        matches!(&err, AssetError::Checksum { name, .. } if name == "kernel"),
        "{err}"
    );
}

#[tokio::test]
async fn a_missing_version_is_a_transient_download_error() {
    let server_root = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let url = serve(server_root.path());
    let store = AssetStore::new(&config(home.path(), &url, "v-absent"));

    let err = store.ensure(&[Language::Python]).await.unwrap_err();
    let AssetError::Download { url: failed, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(failed, &format!("{url}/v-absent/manifest.json"));
    assert_eq!(err.kind(), ErrorKind::Transient);
    assert!(
        std::error::Error::source(&err)
            .unwrap()
            .to_string()
            .contains("404")
    );
}

#[tokio::test]
async fn a_manifest_not_listing_an_asset_says_so() {
    let server_root = tempfile::tempdir().unwrap();
    publish(server_root.path(), "v-partial", &ALL_FILES[..1]);
    let home = tempfile::tempdir().unwrap();
    let store = AssetStore::new(&config(
        home.path(),
        &serve(server_root.path()),
        "v-partial",
    ));
    let err = store.ensure(&[Language::Javascript]).await.unwrap_err();
    assert!(
        matches!(&err, AssetError::Manifest { reason, .. } if reason.contains("rootfs-javascript")),
        "{err}"
    );
}

#[tokio::test]
async fn a_closed_port_is_a_download_error() {
    // Bind then drop: nothing listens on the port afterwards.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let home = tempfile::tempdir().unwrap();
    let store = AssetStore::new(&config(
        home.path(),
        &format!("http://127.0.0.1:{port}"),
        "v1",
    ));
    let err = store.ensure(&[Language::Raw]).await.unwrap_err();
    assert!(matches!(err, AssetError::Download { .. }), "{err}");
    assert_eq!(err.kind(), ErrorKind::Transient);
}

#[tokio::test]
async fn a_pinned_manifest_installs_and_a_wrong_pin_installs_nothing() {
    let server_root = tempfile::tempdir().unwrap();
    let dir = publish(server_root.path(), "v-pin", ALL_FILES);
    let url = serve(server_root.path());
    let served = hex::encode(Sha256::digest(
        std::fs::read(dir.join("manifest.json")).unwrap(),
    ));

    // A server that lists other checksums than the operator pinned is refused before any
    // download (it could have replaced both the images and their checksums).
    let home = tempfile::tempdir().unwrap();
    let mut pinned = config(home.path(), &url, "v-pin");
    pinned.manifest_sha256 = Some("0".repeat(64));
    let store = AssetStore::new(&pinned);
    let err = store.ensure(&[Language::Python]).await.unwrap_err();
    let AssetError::ManifestPin {
        expected, actual, ..
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(
        (expected.as_str(), actual.as_str()),
        ("0".repeat(64).as_str(), served.as_str())
    );
    assert_eq!(err.kind(), ErrorKind::Permanent);
    assert!(
        err.hint()
            .unwrap()
            .contains("EXEC_SANDBOX_ASSET_MANIFEST_SHA256")
    );
    let installed: Vec<_> = std::fs::read_dir(store.version_dir())
        .map(|dir| dir.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(installed.is_empty(), "installed {installed:?}");

    // The right pin (in any case) installs.
    pinned.manifest_sha256 = Some(served.to_uppercase());
    let assets = AssetStore::new(&pinned)
        .ensure(&[Language::Python])
        .await
        .unwrap();
    assert_eq!(std::fs::read(&assets.kernel).unwrap(), b"prebuilt kernel");
}

#[test]
fn plain_http_to_a_host_that_is_not_loopback_is_refused_at_config_time() {
    let home = tempfile::tempdir().unwrap();
    let with_url = |url: &str| SchedulerConfig {
        cache_dir: home.path().into(),
        images_dir: home.path().join("images"),
        asset_base_url: Some(url.into()),
        ..SchedulerConfig::default()
    };
    for bad in [
        "http://assets.example.test/sbx",
        "http://192.0.2.1/sbx",
        "ftp://127.0.0.1/sbx",
    ] {
        let e = with_url(bad).validate().unwrap_err().to_string();
        assert!(e.contains("asset_base_url"), "{bad}: {e}");
        let refused = exec_sandbox::Scheduler::new(with_url(bad))
            .err()
            .expect("refused");
        assert_eq!(refused.kind(), ErrorKind::InvalidInput, "{bad}");
    }
    let e = SchedulerConfig::default()
        .with_env_overrides(|name| {
            (name == "EXEC_SANDBOX_ASSET_BASE_URL").then(|| "http://assets.example.test".into())
        })
        .unwrap_err();
    assert!(e.to_string().contains("https"), "{e}");
    for good in [
        "https://assets.example.test/sbx",
        "http://127.0.0.1:8080/sbx",
        "http://[::1]:1",
    ] {
        with_url(good).validate().unwrap();
    }
    assert!(
        std::fs::read_dir(home.path()).unwrap().next().is_none(),
        "validation creates nothing"
    );
}
