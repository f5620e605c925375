//! Prebuilt assets from an operator's server: `<base>/<version>/manifest.json` and the files it
//! lists, each streamed to a temporary file while hashed and renamed into place only when its
//! SHA-256 and size match the manifest.
//!
//! The server is trusted no further than the manifest's syntax: file names must be the
//! canonical ones, and every byte is checked against the listed hash. Whoever controls the
//! manifest controls the guest image, so the server is reached over `https://` only (plain
//! `http://` to a loopback host is for tests; redirects never leave https), and an operator
//! may pin the manifest's own SHA-256: then a server that hands out other images with matching
//! checksums is refused before anything is installed.

use std::fs::File;
use std::io::{self, Read, Write};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::AssetError;
use super::files::TempFile;
use super::manifest::{self, Entry, Manifest};
use super::stamp::human_size;
use crate::disk::Dir;

/// Connecting, and each wait for response bytes, give up after this long.
const NETWORK_TIMEOUT: Duration = Duration::from_secs(60);

/// One version on one server.
pub(crate) struct Remote {
    agent: ureq::Agent,
    base: String,
    version: String,
    manifest_sha256: Option<String>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("base", &self.base)
            .field("version", &self.version)
            .field("manifest_sha256", &self.manifest_sha256)
            .finish_non_exhaustive()
    }
}

impl Remote {
    /// The server at `base_url` (see [`validate_base_url`]) for `version`, its manifest
    /// pinned to `manifest_sha256` when given.
    pub(crate) fn new(
        base_url: &str,
        version: &str,
        manifest_sha256: Option<&str>,
    ) -> Result<Self, AssetError> {
        let https = validate_base_url(base_url).map_err(|reason| AssetError::BaseUrl {
            url: base_url.to_string(),
            reason,
        })?;
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::PlatformVerifier)
            .build();
        let config = ureq::Agent::config_builder()
            .tls_config(tls)
            // A redirect may not trade TLS for plain http.
            .https_only(https)
            .timeout_connect(Some(NETWORK_TIMEOUT))
            .timeout_recv_response(Some(NETWORK_TIMEOUT))
            // Per read, not per body: a large file may take long, a stalled one must not.
            .timeout_per_read(Some(NETWORK_TIMEOUT))
            .user_agent(concat!("exec-sandbox/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Self {
            agent: ureq::Agent::new_with_config(config),
            base: base_url.trim_end_matches('/').to_string(),
            version: version.to_string(),
            manifest_sha256: manifest_sha256.map(str::to_ascii_lowercase),
        })
    }

    /// The URL of `file` in this version.
    pub(crate) fn url(&self, file: &str) -> String {
        format!("{}/{}/{file}", self.base, self.version)
    }

    fn get(&self, url: &str) -> Result<ureq::Body, AssetError> {
        self.agent
            .get(url)
            .call()
            .map(|response| response.into_body())
            .map_err(|e| download_error(url, e))
    }

    /// Fetches and checks the version's manifest (against the pin first, when there is one).
    pub(crate) fn manifest(&self) -> Result<Manifest, AssetError> {
        let url = self.url(manifest::FILE);
        tracing::info!("fetching {url}");
        let bytes = self
            .get(&url)?
            .into_with_config()
            .limit(manifest::MAX_BYTES)
            .read_to_vec()
            .map_err(|e| download_error(&url, e))?;
        if let Some(expected) = &self.manifest_sha256 {
            let actual = hex::encode(Sha256::digest(&bytes));
            if actual != *expected {
                return Err(AssetError::ManifestPin {
                    url,
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        let manifest = Manifest::parse(&bytes, &url)?;
        if manifest.version != self.version {
            return Err(AssetError::Manifest {
                location: url,
                reason: format!(
                    "it describes version {}, not {}",
                    manifest.version, self.version
                ),
            });
        }
        Ok(manifest)
    }

    /// Downloads `entry`'s file into a temporary file in `dir`, verified against the entry.
    pub(crate) fn fetch(&self, entry: &Entry, dir: &Dir) -> Result<TempFile, AssetError> {
        let url = self.url(&entry.file);
        tracing::info!("downloading {url} ({})", human_size(entry.size));
        let mut body = self.get(&url)?.into_reader();
        let temp = TempFile::in_dir(dir, &entry.file);
        let mut file: File = temp.create(dir)?;
        let mut hasher = Sha256::new();
        let mut received = 0u64;
        let mut buffer = vec![0; 1 << 20];
        // One byte past the listed size is enough to know the file is wrong.
        while received <= entry.size {
            let n = match body.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(download_error(&url, e)),
            };
            hasher.update(&buffer[..n]);
            received += n as u64;
            file.write_all(&buffer[..n])
                .map_err(AssetError::io("write", temp.path()))?;
        }
        let actual = hex::encode(hasher.finalize());
        if received != entry.size || actual != entry.sha256 {
            return Err(AssetError::Checksum {
                name: entry.name.clone(),
                path: dir.join(&entry.file),
                expected: entry.sha256.clone(),
                actual: if received == entry.size {
                    actual
                } else {
                    format!(
                        "{actual} ({received} bytes where {} were listed)",
                        entry.size
                    )
                },
                url: Some(url),
            });
        }
        Ok(temp)
    }
}

/// Checks an asset base URL: `https://host[:port][/path]`, or `http://` to a loopback host
/// (a test server; anything else would let the network swap the manifest); no credentials,
/// query or fragment. True when it is https.
pub(crate) fn validate_base_url(text: &str) -> Result<bool, String> {
    let url = url::Url::parse(text).map_err(|e| format!("`{text}` is not a URL: {e}"))?;
    if !matches!(url.scheme(), "https" | "http") {
        return Err(format!("`{text}`: scheme `{}` is not https", url.scheme()));
    }
    let Some(host) = url.host() else {
        return Err(format!("`{text}` has no host"));
    };
    let https = match url.scheme() {
        "https" => true,
        "http" if crate::packages::s3::is_loopback(&host) => false,
        _ => {
            return Err(format!(
                "`{text}` is plain http to a host that is not loopback; use https"
            ));
        }
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("`{text}` carries credentials"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("`{text}` has a query or fragment"));
    }
    Ok(https)
}

/// Checks a pinned manifest SHA-256: 64 hex digits.
pub(crate) fn validate_manifest_sha256(text: &str) -> Result<(), String> {
    if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(format!("`{text}` is not a SHA-256 (64 hex digits)"))
    }
}

fn download_error(url: &str, source: impl std::error::Error + Send + Sync + 'static) -> AssetError {
    AssetError::Download {
        url: url.to_string(),
        source: Box::new(source),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_are_https_or_loopback_http() {
        for good in [
            "https://assets.example.test/sbx",
            "https://assets.example.test:8443",
            "http://127.0.0.1:8080/assets",
            "http://127.3.4.5",
            "http://[::1]:9000",
            "http://localhost:1/x",
        ] {
            assert!(validate_base_url(good).is_ok(), "{good}");
        }
        for (bad, why) in [
            ("http://assets.example.test/sbx", "not loopback"),
            ("http://10.0.0.1/sbx", "not loopback"),
            ("ftp://127.0.0.1/sbx", "scheme"),
            ("file:///srv/assets", "scheme"),
            ("https://user:pw@assets.example.test", "credentials"),
            ("https://assets.example.test/?v=1", "query"),
            ("assets.example.test", "not a URL"),
        ] {
            let e = validate_base_url(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(matches!(
            Remote::new("http://10.0.0.1", "v1", None),
            Err(AssetError::BaseUrl { .. })
        ));
    }

    #[test]
    fn manifest_pins_are_sha256_hex() {
        assert!(validate_manifest_sha256(&"aB".repeat(32)).is_ok());
        for bad in ["", "abc", &"g".repeat(64), &"a".repeat(65)] {
            assert!(validate_manifest_sha256(bad).is_err(), "{bad}");
        }
    }
}
