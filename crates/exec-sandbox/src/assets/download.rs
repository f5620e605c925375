//! Prebuilt assets from an operator's server: `<base>/<version>/manifest.json` and the files it
//! lists, each streamed to a temporary file while hashed and renamed into place only when its
//! SHA-256 and size match the manifest.
//!
//! The server is trusted no further than the manifest's syntax: file names must be the
//! canonical ones, and every byte is checked against the listed hash. (Whoever controls the
//! manifest controls the guest image; authenticating the server is TLS's job.)

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::AssetError;
use super::files::{self, TempFile};
use super::manifest::{self, Entry, Manifest};
use super::stamp::human_size;

/// Connecting, and each wait for response bytes, give up after this long.
const NETWORK_TIMEOUT: Duration = Duration::from_secs(60);

/// One version on one server.
pub(crate) struct Remote {
    agent: ureq::Agent,
    base: String,
    version: String,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("base", &self.base)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl Remote {
    pub(crate) fn new(base_url: &str, version: &str) -> Self {
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::PlatformVerifier)
            .build();
        let config = ureq::Agent::config_builder()
            .tls_config(tls)
            .timeout_connect(Some(NETWORK_TIMEOUT))
            .timeout_recv_response(Some(NETWORK_TIMEOUT))
            // Per read, not per body: a large file may take long, a stalled one must not.
            .timeout_per_read(Some(NETWORK_TIMEOUT))
            .user_agent(concat!("exec-sandbox/", env!("CARGO_PKG_VERSION")))
            .build();
        Self {
            agent: ureq::Agent::new_with_config(config),
            base: base_url.trim_end_matches('/').to_string(),
            version: version.to_string(),
        }
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

    /// Fetches and checks the version's manifest.
    pub(crate) fn manifest(&self) -> Result<Manifest, AssetError> {
        let url = self.url(manifest::FILE);
        tracing::info!("fetching {url}");
        let bytes = self
            .get(&url)?
            .into_with_config()
            .limit(manifest::MAX_BYTES)
            .read_to_vec()
            .map_err(|e| download_error(&url, e))?;
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
    pub(crate) fn fetch(&self, entry: &Entry, dir: &Path) -> Result<TempFile, AssetError> {
        let url = self.url(&entry.file);
        tracing::info!("downloading {url} ({})", human_size(entry.size));
        let mut body = self.get(&url)?.into_reader();
        let temp = TempFile::new(files::temp_path(dir, &entry.file));
        let mut file = File::create(temp.path()).map_err(AssetError::io("create", temp.path()))?;
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

fn download_error(url: &str, source: impl std::error::Error + Send + Sync + 'static) -> AssetError {
    AssetError::Download {
        url: url.to_string(),
        source: Box::new(source),
    }
}
