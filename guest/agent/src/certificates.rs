//! Extra certificate authorities for TLS clients in the guest.
//!
//! Behind a TLS-intercepting proxy (or with an internal CA) the host trusts a CA the image does
//! not. On [`Request::TrustCertificates`](sbx_protocol::Request::TrustCertificates) the agent
//! writes the image's system bundle followed by the host's certificates to a file on `/run`
//! and bind-mounts it read-only over the system bundle, which OpenSSL (Python's `ssl`, curl,
//! git) reads by default. A second request replaces the first. The root filesystem stays
//! untouched; the sandbox user cannot change the mounted file.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sbx_protocol::{MAX_CA_BUNDLE_BYTES, pem_certificate_count};

use crate::config::Mode;

/// The system bundle every OpenSSL-based client reads (`/usr/lib/ssl/cert.pem` links here).
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Where the merged bundle is written.
const MERGED_BUNDLE: &str = "/run/sbx-ca-certificates.crt";

/// Why the certificates could not be trusted.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// More than [`MAX_CA_BUNDLE_BYTES`].
    #[error("the certificate bundle is {0} bytes; the limit is {MAX_CA_BUNDLE_BYTES}")]
    TooLarge(usize),
    /// No `BEGIN CERTIFICATE` block.
    #[error("the bundle holds no PEM certificate")]
    NoCertificate,
    /// The agent runs in development mode, where the trust store is the host's own.
    #[error("trusting certificates needs the agent to run as the VM's init")]
    NotInit,
    /// A file or mount step failed.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
}

impl TrustError {
    /// Whether the request itself was at fault (as opposed to the guest).
    pub fn is_invalid_request(&self) -> bool {
        matches!(self, TrustError::TooLarge(_) | TrustError::NoCertificate)
    }
}

/// The image's bundle followed by the extra certificates, each ending with a newline.
pub fn merged(system: &[u8], extra: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(system.len() + extra.len() + 2);
    for part in [system, extra] {
        out.extend_from_slice(part);
        if !part.is_empty() && !part.ends_with(b"\n") {
            out.push(b'\n');
        }
    }
    out
}

/// Checks `pem` and, as init, makes the system bundle the image's plus `pem`. Returns how many
/// certificates were added.
pub fn trust(mode: Mode, pem: &[u8]) -> Result<u32, TrustError> {
    if pem.len() > MAX_CA_BUNDLE_BYTES {
        return Err(TrustError::TooLarge(pem.len()));
    }
    let certificates = pem_certificate_count(pem);
    if certificates == 0 {
        return Err(TrustError::NoCertificate);
    }
    if mode != Mode::Init {
        return Err(TrustError::NotInit);
    }
    let system = Path::new(SYSTEM_BUNDLE);
    let io_error = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| TrustError::Io {
            action,
            path,
            source,
        }
    };
    // A second request replaces the first: uncover the image's bundle again.
    let _ = rustix::mount::unmount(system, rustix::mount::UnmountFlags::DETACH);
    let image_bundle = match fs::read(system) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_error("read", system)(e)),
    };
    let target = Path::new(MERGED_BUNDLE);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(target)
        .map_err(io_error("create", target))?;
    file.write_all(&merged(&image_bundle, pem))
        .map_err(io_error("write", target))?;
    file.set_permissions(fs::Permissions::from_mode(0o644))
        .map_err(io_error("set the mode of", target))?;
    drop(file);
    rustix::mount::mount_bind(MERGED_BUNDLE, system)
        .map_err(|e| io_error("bind-mount over", system)(e.into()))?;
    rustix::mount::mount_remount(
        system,
        rustix::mount::MountFlags::BIND | rustix::mount::MountFlags::RDONLY,
        "",
    )
    .map_err(|e| io_error("make read-only", system)(e.into()))?;
    Ok(u32::try_from(certificates).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT: &[u8] = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----";

    #[test]
    fn counts_and_merges() {
        assert_eq!(pem_certificate_count(b""), 0);
        assert_eq!(pem_certificate_count(CERT), 1);
        assert_eq!(pem_certificate_count(&[CERT, b"\n", CERT].concat()), 2);
        assert_eq!(merged(b"a", CERT), [b"a\n", CERT, b"\n"].concat());
        assert_eq!(merged(b"", b"b\n"), b"b\n");
    }

    #[test]
    fn bad_bundles_are_refused_before_anything_is_touched() {
        let big = vec![b'A'; MAX_CA_BUNDLE_BYTES + 1];
        assert!(matches!(
            trust(Mode::Init, &big),
            Err(TrustError::TooLarge(n)) if n == big.len()
        ));
        assert!(matches!(
            trust(Mode::Init, b"not pem"),
            Err(TrustError::NoCertificate)
        ));
        // Development mode never touches the host's trust store.
        assert!(matches!(trust(Mode::Stdio, CERT), Err(TrustError::NotInit)));
    }
}
