use std::time::Duration;

use sha2::{Digest, Sha256};

use super::config::*;
use super::moto::Moto;
use super::*;

const BUCKET: &str = "sbx-layers";
/// Upper bound for calls that must fail fast; reaching it means the call hung.
const HANG: Duration = Duration::from_secs(60);

fn config(endpoint: &str) -> S3Config {
    S3Config {
        bucket: Some(BUCKET.into()),
        endpoint_url: Some(endpoint.into()),
        prefix: "test/layers/".into(),
        timeouts: S3Timeouts {
            connect: Duration::from_secs(2),
            request: Duration::from_secs(10),
            min_bytes_per_second: 1024 * 1024,
        },
        ..S3Config::default()
    }
}

fn credentials(name: &str) -> Option<String> {
    match name {
        "AWS_ACCESS_KEY_ID" | "AWS_SECRET_ACCESS_KEY" => Some("testing".into()),
        _ => None,
    }
}

fn chain(error: &RemoteError) -> String {
    crate::vm::error_chain(error)
}

fn layers(config: &S3Config) -> S3Layers {
    S3Layers::with_env(config, credentials)
        .expect("valid configuration")
        .expect("a bucket is set")
}

/// A moto server with the test bucket.
fn moto() -> Moto {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    moto
}

/// Incompressible bytes (xorshift), different for each seed.
fn noise(size: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut bytes = Vec::with_capacity(size + 8);
    while bytes.len() < size {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(size);
    bytes
}

/// A published L2 entry: a fake layer image and its manifest.
struct Entry {
    dir: tempfile::TempDir,
    layer: Vec<u8>,
    manifest: Vec<u8>,
}

fn manifest_for(layer: &[u8]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "format": 1,
        "sha256": hex::encode(Sha256::digest(layer)),
        "size": layer.len(),
        "pins": [{"name": "numpy", "version": "2.1.3"}],
    }))
    .unwrap()
}

fn entry(size: usize, seed: u64) -> Entry {
    let dir = tempfile::tempdir().unwrap();
    let layer = noise(size, seed);
    let manifest = manifest_for(&layer);
    std::fs::write(dir.path().join(LAYER_FILE), &layer).unwrap();
    std::fs::write(dir.path().join(MANIFEST_FILE), &manifest).unwrap();
    Entry {
        dir,
        layer,
        manifest,
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

async fn upload_and_wait(layers: &S3Layers, key: &str, entry: &Entry) {
    layers.upload(key, entry.dir.path());
    layers.wait_for_uploads().await;
}

/// Fetches `key` into a fresh directory and returns it with the outcome.
async fn fetch(layers: &S3Layers, key: &str) -> (tempfile::TempDir, Result<bool, RemoteError>) {
    let dest = tempfile::tempdir().unwrap();
    let result = tokio::time::timeout(HANG, layers.fetch(key, dest.path()))
        .await
        .expect("fetch hung");
    (dest, result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_between_two_empty_caches_then_skips_what_the_store_has() {
    let moto = moto();
    let key = "python-3.11-abc123";
    // Host A builds and uploads; host B, with its own empty cache, fetches.
    let host_a = layers(&config(&moto.endpoint));
    let built = entry(300_000, 1);
    upload_and_wait(&host_a, key, &built).await;
    assert_eq!(
        host_a.upload_stats(),
        UploadStats {
            uploaded: 1,
            peak_in_flight: 1,
            ..UploadStats::default()
        }
    );
    let host_b = layers(&config(&moto.endpoint));
    let (dest, result) = fetch(&host_b, key).await;
    assert!(result.unwrap(), "the entry is in the store");
    assert_eq!(files_in(dest.path()), [LAYER_FILE, MANIFEST_FILE]);
    assert_eq!(
        std::fs::read(dest.path().join(LAYER_FILE)).unwrap(),
        built.layer
    );
    assert_eq!(
        std::fs::read(dest.path().join(MANIFEST_FILE)).unwrap(),
        built.manifest
    );
    // Stored compressed under the prefix, and a second upload of the key sends nothing.
    let stored = host_b
        .shared
        .store
        .head(&ObjectPath::from(format!(
            "test/layers/{key}/{LAYER_OBJECT}"
        )))
        .await
        .unwrap();
    assert!(stored.size > 0);
    upload_and_wait(&host_b, key, &built).await;
    assert_eq!(host_b.upload_stats().skipped, 1);
    assert_eq!(host_b.upload_stats().uploaded, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_of_a_missing_key_is_a_miss() {
    let moto = moto();
    let layers = layers(&config(&moto.endpoint));
    let (dest, result) = fetch(&layers, "never-built").await;
    assert!(!result.unwrap());
    assert!(files_in(dest.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_entries_are_refused_leave_nothing_and_are_overwritten_by_the_next_upload() {
    let moto = moto();
    let layers = layers(&config(&moto.endpoint));
    let key = "corrupted";
    let built = entry(200_000, 2);
    upload_and_wait(&layers, key, &built).await;
    let object = ObjectPath::from(format!("test/layers/{key}/{LAYER_OBJECT}"));
    let zstd_of = |bytes: &[u8]| zstd::encode_all(bytes, 3).unwrap();
    let cases: [(&str, Option<Vec<u8>>); 5] = [
        ("other bytes", Some(noise(5000, 3))),
        ("zstd of other content", Some(zstd_of(&noise(200_000, 4)))),
        ("zstd of longer content", Some(zstd_of(&noise(400_000, 2)))),
        (
            "zstd of a truncated layer",
            Some(zstd_of(&built.layer[..1000])),
        ),
        ("no layer object", None),
    ];
    for (case, stored) in cases {
        match stored {
            Some(bytes) => {
                layers
                    .shared
                    .store
                    .put(&object, bytes.into())
                    .await
                    .unwrap();
            }
            None => layers.shared.store.delete(&object).await.unwrap(),
        }
        let (dest, result) = fetch(&layers, key).await;
        let error = result.expect_err(case);
        assert!(
            matches!(error, RemoteError::Corrupt { .. }),
            "{case}: {}",
            chain(&error)
        );
        assert!(files_in(dest.path()).is_empty(), "{case}: files left");
    }
    // The manifest is still there, but the key was seen corrupt: the upload replaces the entry.
    upload_and_wait(&layers, key, &built).await;
    assert_eq!(
        layers.upload_stats().uploaded,
        2,
        "{:?}",
        layers.upload_stats()
    );
    let (dest, result) = fetch(&layers, key).await;
    assert!(result.unwrap());
    assert_eq!(
        std::fs::read(dest.path().join(LAYER_FILE)).unwrap(),
        built.layer
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_layer_that_does_not_match_its_manifest_is_not_uploaded() {
    let moto = moto();
    let layers = layers(&config(&moto.endpoint));
    let built = entry(100_000, 5);
    std::fs::write(built.dir.path().join(LAYER_FILE), noise(100_000, 6)).unwrap();
    upload_and_wait(&layers, "bad-local", &built).await;
    assert_eq!(layers.upload_stats().failed, 1);
    let (_, result) = fetch(&layers, "bad-local").await;
    assert!(!result.unwrap(), "nothing reached the store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_is_down_fails_fast() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let layers = layers(&config(&format!("http://127.0.0.1:{port}")));
    let (dest, result) = fetch(&layers, "some-key").await;
    let error = result.unwrap_err();
    assert!(
        matches!(error, RemoteError::Store { .. }),
        "{}",
        chain(&error)
    );
    assert!(files_in(dest.path()).is_empty());
    let built = entry(1000, 7);
    tokio::time::timeout(HANG, upload_and_wait(&layers, "some-key", &built))
        .await
        .expect("upload hung");
    assert_eq!(layers.upload_stats().failed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_never_answers_times_out() {
    // Accepts connections and reads requests, never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let mut config = config(&format!("http://127.0.0.1:{port}"));
    config.timeouts.request = Duration::from_secs(1);
    let layers = layers(&config);
    let (_, result) = fetch(&layers, "some-key").await;
    let error = result.unwrap_err();
    assert!(
        matches!(error, RemoteError::Timeout { after, .. } if after == Duration::from_secs(1)),
        "{}",
        chain(&error)
    );
    silent.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_denied_is_reported() {
    // moto checks credentials against its IAM after the first request (our bucket creation);
    // ours are unknown to it.
    let moto = Moto::start_with(&[("INITIAL_NO_AUTH_ACTION_COUNT", "1")]);
    moto.create_bucket(BUCKET);
    let layers = layers(&config(&moto.endpoint));
    let (_, result) = fetch(&layers, "some-key").await;
    let error = result.unwrap_err();
    assert!(
        matches!(error, RemoteError::Denied { .. }),
        "{}",
        chain(&error)
    );
    let built = entry(1000, 8);
    upload_and_wait(&layers, "some-key", &built).await;
    assert_eq!(layers.upload_stats().failed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_run_at_most_the_configured_number_at_once() {
    let moto = moto();
    let layers = layers(&config(&moto.endpoint));
    assert_eq!(layers.shared.slots.available_permits(), 2);
    let entries: Vec<Entry> = (0..6).map(|i| entry(2_000_000, 10 + i)).collect();
    for (i, built) in entries.iter().enumerate() {
        layers.upload(&format!("key-{i}"), built.dir.path());
    }
    assert!(layers.uploads_pending());
    layers.wait_for_uploads().await;
    assert!(!layers.uploads_pending());
    let stats = layers.upload_stats();
    assert_eq!(stats.uploaded, 6, "{stats:?}");
    assert_eq!(stats.peak_in_flight, 2, "{stats:?}");
    let (dest, result) = fetch(&layers, "key-5").await;
    assert!(result.unwrap());
    assert_eq!(
        std::fs::read(dest.path().join(LAYER_FILE)).unwrap(),
        entries[5].layer
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_layer_goes_through_multipart() {
    let moto = moto();
    let layers = layers(&config(&moto.endpoint));
    let key = "large";
    let built = entry(20 * 1024 * 1024, 20);
    upload_and_wait(&layers, key, &built).await;
    let stats = layers.upload_stats();
    assert_eq!((stats.uploaded, stats.multipart), (1, 1), "{stats:?}");
    // S3 (and moto) give a multipart object the ETag `<md5 of part md5s>-<parts>`.
    let meta = layers
        .shared
        .store
        .head(&ObjectPath::from(format!(
            "test/layers/{key}/{LAYER_OBJECT}"
        )))
        .await
        .unwrap();
    let etag = meta.e_tag.unwrap_or_default();
    assert!(etag.trim_matches('"').ends_with("-3"), "{etag}");
    let (dest, result) = fetch(&layers, key).await;
    assert!(result.unwrap());
    let fetched = std::fs::read(dest.path().join(LAYER_FILE)).unwrap();
    assert!(fetched == built.layer, "the fetched layer differs");
}

#[test]
fn no_bucket_means_no_store() {
    assert!(
        S3Layers::with_env(&S3Config::default(), credentials)
            .unwrap()
            .is_none()
    );
}

#[test]
fn credentials_come_only_from_the_listed_variables() {
    let mut config = config("http://127.0.0.1:9");
    config.bucket = Some("valid-bucket".into());
    // A secret without a key id is refused by the client builder.
    let half = |name: &str| (name == "AWS_SECRET_ACCESS_KEY").then(|| "s".to_owned());
    let error = S3Layers::with_env(&config, half).unwrap_err();
    assert!(matches!(error, S3SetupError::Client(_)), "{error}");
    // Unlisted variables are not read, so they cannot redirect the client.
    let read = std::sync::Mutex::new(Vec::new());
    S3Layers::with_env(&config, |name| {
        read.lock().unwrap().push(name.to_owned());
        None
    })
    .unwrap();
    let read = read.into_inner().unwrap();
    assert!(
        read.iter()
            .all(|name| CREDENTIAL_VARS.contains(&name.as_str())),
        "{read:?}"
    );
}

#[test]
fn bucket_names_follow_s3_rules() {
    for good in ["abc", "my-bucket.logs", "a1b2", &"a".repeat(63)] {
        assert!(validate_bucket(good).is_ok(), "{good}");
    }
    for bad in [
        "ab",
        &"a".repeat(64),
        "My-Bucket",
        "bucket_name",
        "-bucket",
        "bucket-",
        "a..b",
        "192.168.1.1",
        "xn--bucket",
        "sthree-bucket",
        "bucket-s3alias",
        "bucket--ol-s3",
    ] {
        assert!(validate_bucket(bad).is_err(), "{bad}");
    }
}

#[test]
fn prefixes_and_regions() {
    for good in ["", "exec-sandbox/layers/", "a/", "team.1/x_y/"] {
        assert!(validate_prefix(good).is_ok(), "{good:?}");
    }
    for bad in [
        "/abs/", "a//b/", "a/../b/", "./a/", "no-slash", "a b/", "a\\b/",
    ] {
        assert!(validate_prefix(bad).is_err(), "{bad:?}");
    }
    assert!(validate_prefix(&format!("{}/", "a".repeat(600))).is_err());
    assert_eq!(normalize_prefix("/x/y"), "x/y/");
    assert_eq!(normalize_prefix("x/"), "x/");
    assert_eq!(normalize_prefix(""), "");
    assert!(validate_region("eu-central-1").is_ok());
    for bad in ["", "EU", "us east"] {
        assert!(validate_region(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn endpoints_are_https_or_loopback_http() {
    for good in [
        "https://s3.example.test",
        "https://minio.internal:9000/base",
        "http://127.0.0.1:9000",
        "http://127.5.0.1",
        "http://localhost:9000/",
        "http://[::1]:9000",
    ] {
        assert!(validate_endpoint_url(good).is_ok(), "{good}");
    }
    for bad in [
        "http://10.0.0.5:9000",
        "http://minio:9000",
        "ftp://127.0.0.1",
        "https://user:pass@s3.example.test",
        "https://s3.example.test/?x=1",
        "not a url",
        "https://",
    ] {
        assert!(validate_endpoint_url(bad).is_err(), "{bad}");
    }
}

#[test]
fn keys_are_checked_before_any_request() {
    let layers = layers(&config("http://127.0.0.1:9"));
    for bad in ["", "../x", "a/b", ".hidden", &"k".repeat(129)] {
        assert!(
            matches!(
                layers.shared.object(bad, MANIFEST_OBJECT),
                Err(RemoteError::InvalidKey { .. })
            ),
            "{bad:?}"
        );
    }
    assert_eq!(
        layers
            .shared
            .object("python-3.11_ab.c", MANIFEST_OBJECT)
            .unwrap()
            .as_ref(),
        "test/layers/python-3.11_ab.c/manifest.json"
    );
}

#[test]
fn manifests_must_name_a_digest() {
    let good = manifest_for(b"abc");
    assert_eq!(LayerDigest::parse(&good).unwrap().size, 3);
    for bad in [
        &b"not json"[..],
        br#"{"size": 3}"#,
        br#"{"sha256": "XYZ", "size": 3}"#,
        br#"{"sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", "size": 99999999999999}"#,
    ] {
        assert!(LayerDigest::parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
    }
}
