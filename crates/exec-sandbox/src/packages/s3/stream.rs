//! A layer's bytes between the disk and the network, on a blocking thread: zstd, the sha256
//! and size of the manifest, and bounds that stop a store sending more than the manifest says.

use std::io::{Read, Write};
use std::path::Path;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::{corrupt, io_error};
use crate::limits;
use crate::packages::remote::RemoteError;

/// zstd's default level: fast to compress, and layers are compressed once per build.
const ZSTD_LEVEL: i32 = 3;
/// Bytes read from (or handed to) the network side at a time.
const CHUNK_BYTES: usize = 1024 * 1024;

/// What the L2 manifest says about its layer image: the fields this module reads (others are
/// ignored; the names follow `cache.rs`'s manifest).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub(super) struct LayerDigest {
    /// Lowercase hex sha256 of `layer.erofs`.
    pub(super) sha256: String,
    /// Bytes of `layer.erofs`.
    pub(super) size: u64,
}

impl LayerDigest {
    /// Parses and checks a manifest's digest fields.
    pub(super) fn parse(manifest: &[u8]) -> Result<Self, String> {
        let digest: LayerDigest =
            serde_json::from_slice(manifest).map_err(|e| format!("manifest is not valid: {e}"))?;
        let hex_ok = digest.sha256.len() == 64
            && digest
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex_ok {
            return Err("manifest's sha256 is not 64 lowercase hex digits".into());
        }
        if digest.size > limits::MAX_REMOTE_LAYER_BYTES {
            return Err(format!(
                "manifest's size {} is above {}",
                digest.size,
                limits::MAX_REMOTE_LAYER_BYTES
            ));
        }
        Ok(digest)
    }
}

/// The download's sink: the layer file, hashed and bounded by the manifest's size.
struct LayerSink {
    file: std::io::BufWriter<std::fs::File>,
    hasher: Sha256,
    written: u64,
    limit: u64,
    oversized: bool,
    io_failed: bool,
}

impl Write for LayerSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written + buf.len() as u64 > self.limit {
            self.oversized = true;
            return Err(std::io::Error::other(
                "layer is longer than its manifest says",
            ));
        }
        if let Err(e) = self.file.write_all(buf) {
            self.io_failed = true;
            return Err(e);
        }
        self.hasher.update(buf);
        self.written += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush().inspect_err(|_| self.io_failed = true)
    }
}

/// Decompresses the chunks from `rx` into `file` and checks them against `digest`.
pub(super) fn decompress_into(
    mut rx: mpsc::Receiver<Bytes>,
    file: std::fs::File,
    digest: &LayerDigest,
    key: &str,
    path: &Path,
) -> Result<(), RemoteError> {
    let sink = LayerSink {
        file: std::io::BufWriter::with_capacity(CHUNK_BYTES, file),
        hasher: Sha256::new(),
        written: 0,
        limit: digest.size,
        oversized: false,
        io_failed: false,
    };
    let mut decoder =
        zstd::stream::write::Decoder::new(sink).map_err(|e| io_error(key, path, e))?;
    let mut result = Ok(());
    while let Some(chunk) = rx.blocking_recv() {
        result = decoder.write_all(&chunk);
        if result.is_err() {
            break;
        }
    }
    // Stop the network side before the (slow) final flush.
    drop(rx);
    let result = result.and_then(|()| decoder.flush());
    let sink = decoder.into_inner();
    match result {
        Err(_) if sink.oversized => {
            return Err(corrupt(
                key,
                format!("layer is longer than the manifest's {} bytes", digest.size),
            ));
        }
        Err(e) if sink.io_failed => return Err(io_error(key, path, e)),
        Err(e) => return Err(corrupt(key, format!("not a zstd stream: {e}"))),
        Ok(()) => {}
    }
    if sink.written != digest.size {
        return Err(corrupt(
            key,
            format!(
                "layer has {} bytes, the manifest says {}",
                sink.written, digest.size
            ),
        ));
    }
    let sha256 = hex::encode(sink.hasher.finalize());
    if sha256 != digest.sha256 {
        return Err(corrupt(
            key,
            format!(
                "layer's sha256 is {sha256}, the manifest says {}",
                digest.sha256
            ),
        ));
    }
    Ok(())
}

/// The upload's source side of the channel: compressed bytes in chunks of about
/// [`CHUNK_BYTES`].
struct ChunkSender {
    tx: mpsc::Sender<Bytes>,
    buffer: Vec<u8>,
}

impl ChunkSender {
    fn send_buffer(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buffer,
            Vec::with_capacity(CHUNK_BYTES),
        ));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "upload stopped"))
    }
}

impl Write for ChunkSender {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(buf);
        if self.buffer.len() >= CHUNK_BYTES {
            self.send_buffer()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send_buffer()
    }
}

/// Reads `file`, checks it against `digest` and sends it compressed through `tx`.
pub(super) fn compress_from(
    mut file: std::fs::File,
    tx: mpsc::Sender<Bytes>,
    digest: &LayerDigest,
    key: &str,
    path: &Path,
) -> Result<(), RemoteError> {
    let io = |e| io_error(key, path, e);
    let sink = ChunkSender {
        tx,
        buffer: Vec::with_capacity(CHUNK_BYTES),
    };
    let mut encoder = zstd::stream::write::Encoder::new(sink, ZSTD_LEVEL).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut read = 0u64;
    let mut buffer = vec![0u8; CHUNK_BYTES];
    loop {
        let n = file.read(&mut buffer).map_err(io)?;
        if n == 0 {
            break;
        }
        read += n as u64;
        if read > digest.size {
            break;
        }
        hasher.update(&buffer[..n]);
        encoder.write_all(&buffer[..n]).map_err(io)?;
    }
    let mismatch = |what: String| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{what}; not uploading it"),
        ))
    };
    if read != digest.size {
        return Err(mismatch(format!(
            "local layer does not have the manifest's {} bytes",
            digest.size
        )));
    }
    let sha256 = hex::encode(hasher.finalize());
    if sha256 != digest.sha256 {
        return Err(mismatch(format!(
            "local layer's sha256 is {sha256}, its manifest says {}",
            digest.sha256
        )));
    }
    let mut sink = encoder.finish().map_err(io)?;
    sink.flush().map_err(io)
}
