//! Length-prefixed, versioned frames with a hard size bound.
//!
//! The decoder is fed whatever bytes arrive and never panics: a peer that sends garbage gets a
//! [`DecodeError`], after which the channel should be dropped.

use serde::{Serialize, de::DeserializeOwned};

/// First two bytes of every frame.
pub const MAGIC: [u8; 2] = *b"SX";
/// Version of the framing and message schema. 2: `Request::Warm` names modules to import and
/// the hello reports the package layer. 3: the hello carries the guest's boot timeline.
pub const PROTOCOL_VERSION: u8 = 3;
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 12;
/// Largest payload accepted in one frame (code is at most 1 MiB, plus room for the envelope).
pub const MAX_PAYLOAD: u32 = 2 * 1024 * 1024;

/// A message could not be put into a frame.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The serialized message exceeds [`MAX_PAYLOAD`].
    #[error("frame payload is {size} bytes, limit is {MAX_PAYLOAD}")]
    TooLarge {
        /// Serialized size.
        size: usize,
    },
    /// Serialization failed.
    #[error("cannot serialize message")]
    Serialize(#[source] postcard::Error),
}

/// The peer sent bytes that are not a valid frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The magic bytes did not match.
    #[error("bad frame magic {found:02x?}")]
    BadMagic {
        /// Bytes found.
        found: [u8; 2],
    },
    /// The peer speaks another protocol version.
    #[error("unsupported protocol version {found} (this side speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion {
        /// Version found.
        found: u8,
    },
    /// Reserved flag bits were set.
    #[error("unknown frame flags {found:#04x}")]
    BadFlags {
        /// Flags found.
        found: u8,
    },
    /// The announced payload exceeds [`MAX_PAYLOAD`].
    #[error("frame announces {len} bytes, limit is {MAX_PAYLOAD}")]
    TooLarge {
        /// Announced length.
        len: u32,
    },
    /// The payload is not a valid message.
    #[error("malformed frame payload: {reason}")]
    Malformed {
        /// What the deserializer said.
        reason: String,
    },
}

/// Serializes `message` into one frame tagged with `id`.
pub fn encode_frame<T: Serialize>(id: u32, message: &T) -> Result<Vec<u8>, EncodeError> {
    let mut out = vec![0u8; HEADER_LEN];
    let mut out =
        postcard::to_extend(message, std::mem::take(&mut out)).map_err(EncodeError::Serialize)?;
    let size = out.len() - HEADER_LEN;
    let len = u32::try_from(size)
        .ok()
        .filter(|len| *len <= MAX_PAYLOAD)
        .ok_or(EncodeError::TooLarge { size })?;
    out[0..2].copy_from_slice(&MAGIC);
    out[2] = PROTOCOL_VERSION;
    out[3] = 0;
    out[4..8].copy_from_slice(&id.to_le_bytes());
    out[8..12].copy_from_slice(&len.to_le_bytes());
    Ok(out)
}

/// Incremental frame decoder: push bytes as they arrive, pull whole frames out.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet consumed as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Returns the next complete frame, `Ok(None)` when more bytes are needed.
    ///
    /// The header is validated as soon as it is complete, so an oversized or foreign frame is
    /// rejected before its payload is buffered.
    pub fn next_frame<T: DeserializeOwned>(&mut self) -> Result<Option<(u32, T)>, DecodeError> {
        let Some(header) = self.buf.get(..HEADER_LEN) else {
            return self.check_partial_header().map(|()| None);
        };
        let (id, len) = parse_header(header)?;
        let total = HEADER_LEN + len as usize;
        let Some(payload) = self.buf.get(HEADER_LEN..total) else {
            return Ok(None);
        };
        let message = postcard::from_bytes(payload).map_err(|e| DecodeError::Malformed {
            reason: e.to_string(),
        })?;
        self.buf.drain(..total);
        Ok(Some((id, message)))
    }

    fn check_partial_header(&self) -> Result<(), DecodeError> {
        for (i, byte) in self.buf.iter().take(2).enumerate() {
            if *byte != MAGIC[i] {
                let mut found = [0u8; 2];
                found[..self.buf.len().min(2)].copy_from_slice(&self.buf[..self.buf.len().min(2)]);
                return Err(DecodeError::BadMagic { found });
            }
        }
        Ok(())
    }
}

fn parse_header(header: &[u8]) -> Result<(u32, u32), DecodeError> {
    let field = |range: std::ops::Range<usize>| -> [u8; 4] {
        let mut bytes = [0u8; 4];
        bytes.copy_from_slice(&header[range]);
        bytes
    };
    if header[0..2] != MAGIC {
        return Err(DecodeError::BadMagic {
            found: [header[0], header[1]],
        });
    }
    if header[2] != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion { found: header[2] });
    }
    if header[3] != 0 {
        return Err(DecodeError::BadFlags { found: header[3] });
    }
    let id = u32::from_le_bytes(field(4..8));
    let len = u32::from_le_bytes(field(8..12));
    if len > MAX_PAYLOAD {
        return Err(DecodeError::TooLarge { len });
    }
    Ok((id, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Event, ExecOutcome, ExecRequest, Language, Request};
    use proptest::prelude::*;

    fn roundtrip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(id: u32, m: T) {
        let bytes = encode_frame(id, &m).unwrap();
        let mut d = FrameDecoder::new();
        d.push(&bytes);
        assert_eq!(d.next_frame::<T>().unwrap(), Some((id, m)));
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn messages_roundtrip() {
        roundtrip(1, Request::Ping);
        roundtrip(
            2,
            Request::Warm {
                language: Language::Python,
                modules: vec!["numpy".into(), "os.path".into()],
            },
        );
        roundtrip(
            0,
            Event::Hello(crate::AgentHello {
                protocol_version: PROTOCOL_VERSION,
                agent_version: "0.1.0".into(),
                uptime_ms: 7,
                boot: crate::BootTimeline {
                    init_ms: 3,
                    root_ms: 4,
                    configured_ms: 6,
                },
                root_mounted: true,
                packages: crate::layer::LayerStatus::Failed("no disk".into()),
            }),
        );
        roundtrip(
            u32::MAX,
            Request::Exec(ExecRequest {
                language: Language::Javascript,
                code: "console.log(1)".into(),
                timeout_ms: 30_000,
                env: vec![("A".into(), "b\tc".into())],
                stdout_limit: 1_000_000,
                stderr_limit: 100_000,
            }),
        );
        roundtrip(3, Event::Stdout((0..=255).collect()));
        roundtrip(
            5,
            Request::Reseed {
                entropy: vec![7; 64],
                unix_time_ns: 1_795_868_258_391_125_000,
            },
        );
        roundtrip(6, Event::Reseeded { interpreters: 2 });
        roundtrip(
            7,
            Request::WriteFile {
                path: "a/b.txt".into(),
                size: Some(3),
                executable: true,
            },
        );
        roundtrip(7, Request::FileData(vec![0, 255, 10]));
        roundtrip(7, Request::FileEnd);
        roundtrip(7, Request::FileAbort);
        roundtrip(8, Request::ReadFile { path: "x".into() });
        roundtrip(9, Request::ListFiles { path: ".".into() });
        roundtrip(
            10,
            Request::TrustCertificates {
                pem: b"-----BEGIN CERTIFICATE-----".to_vec(),
            },
        );
        roundtrip(10, Event::CertificatesTrusted { certificates: 2 });
        roundtrip(7, Event::FileWritten { size: 3 });
        roundtrip(8, Event::FileData(vec![1; 10]));
        roundtrip(8, Event::FileEnd { size: 10 });
        roundtrip(
            9,
            Event::FileList {
                entries: vec![crate::FileEntry {
                    name: "d".into(),
                    is_dir: true,
                    size: 4096,
                }],
                truncated: false,
            },
        );
        roundtrip(
            4,
            Event::ExecDone(ExecOutcome {
                exit_code: -1,
                timed_out: true,
                stdout_truncated: false,
                stderr_truncated: true,
                execution_time_ms: 12,
                interpreter_start_ms: 0,
            }),
        );
    }

    #[test]
    fn variant_indices_are_stable() {
        // postcard encodes the variant index first: old peers must keep understanding old
        // messages, so new variants only ever go at the end.
        let first = |m: &Request| encode_frame(1, m).unwrap()[HEADER_LEN];
        assert_eq!(first(&Request::Ping), 0);
        assert_eq!(first(&Request::Shutdown), 3);
        assert_eq!(
            first(&Request::WriteFile {
                path: String::new(),
                size: None,
                executable: false
            }),
            5
        );
        assert_eq!(
            first(&Request::ListFiles {
                path: String::new()
            }),
            10
        );
        assert_eq!(first(&Request::TrustCertificates { pem: Vec::new() }), 11);
        let first = |m: &Event| encode_frame(1, m).unwrap()[HEADER_LEN];
        assert_eq!(first(&Event::Reseeded { interpreters: 0 }), 7);
        assert_eq!(first(&Event::FileWritten { size: 0 }), 8);
        assert_eq!(
            first(&Event::FileList {
                entries: Vec::new(),
                truncated: true
            }),
            11
        );
        assert_eq!(first(&Event::CertificatesTrusted { certificates: 0 }), 12);
    }

    #[test]
    fn full_file_chunk_and_full_listing_fit_in_a_frame() {
        assert!(encode_frame(u32::MAX, &Request::FileData(vec![0xff; crate::FILE_CHUNK])).is_ok());
        let bundle = Request::TrustCertificates {
            pem: vec![b'A'; crate::MAX_CA_BUNDLE_BYTES],
        };
        assert!(encode_frame(u32::MAX, &bundle).is_ok());
        assert!(encode_frame(u32::MAX, &Event::FileData(vec![0xff; crate::FILE_CHUNK])).is_ok());
        let entry = crate::FileEntry {
            name: "\u{10ffff}".repeat(crate::MAX_NAME_BYTES / 4),
            is_dir: false,
            size: u64::MAX,
        };
        let list = Event::FileList {
            entries: vec![entry; crate::MAX_LIST_ENTRIES],
            truncated: true,
        };
        assert!(encode_frame(u32::MAX, &list).is_ok());
    }

    #[test]
    fn frames_split_across_pushes_and_back_to_back() {
        let mut bytes = encode_frame(1, &Event::Pong).unwrap();
        bytes.extend(encode_frame(2, &Event::Stderr(b"x".to_vec())).unwrap());
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for b in &bytes {
            d.push(std::slice::from_ref(b));
            while let Some(f) = d.next_frame::<Event>().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(
            got,
            vec![(1, Event::Pong), (2, Event::Stderr(b"x".to_vec()))]
        );
    }

    #[test]
    fn oversized_frame_rejected_from_header_alone() {
        let mut header = encode_frame(9, &Request::Ping).unwrap();
        header.truncate(HEADER_LEN);
        header[8..12].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        let mut d = FrameDecoder::new();
        d.push(&header);
        assert_eq!(
            d.next_frame::<Request>(),
            Err(DecodeError::TooLarge {
                len: MAX_PAYLOAD + 1
            })
        );
    }

    #[test]
    fn oversized_message_refused_by_encoder() {
        let big = Event::Stdout(vec![b'a'; MAX_PAYLOAD as usize + 1]);
        assert!(matches!(
            encode_frame(1, &big),
            Err(EncodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn bad_magic_version_and_flags() {
        let good = encode_frame(1, &Request::Ping).unwrap();
        let mut d = FrameDecoder::new();
        d.push(b"X");
        assert!(matches!(
            d.next_frame::<Request>(),
            Err(DecodeError::BadMagic { .. })
        ));

        let mut v = good.clone();
        v[2] = 99;
        let mut d = FrameDecoder::new();
        d.push(&v);
        assert_eq!(
            d.next_frame::<Request>(),
            Err(DecodeError::UnsupportedVersion { found: 99 })
        );

        let mut f = good;
        f[3] = 1;
        let mut d = FrameDecoder::new();
        d.push(&f);
        assert_eq!(
            d.next_frame::<Request>(),
            Err(DecodeError::BadFlags { found: 1 })
        );
    }

    #[test]
    fn garbage_payload_is_malformed() {
        let mut frame = encode_frame(1, &Request::Ping).unwrap();
        frame.truncate(HEADER_LEN);
        frame[8..12].copy_from_slice(&3u32.to_le_bytes());
        frame.extend([0xff, 0xff, 0xff]);
        let mut d = FrameDecoder::new();
        d.push(&frame);
        assert!(matches!(
            d.next_frame::<Request>(),
            Err(DecodeError::Malformed { .. })
        ));
    }

    proptest! {
        #[test]
        fn decoder_never_panics(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16)) {
            let mut d = FrameDecoder::new();
            for c in chunks {
                d.push(&c);
                while let Ok(Some(_)) = d.next_frame::<Event>() {}
            }
        }

        #[test]
        fn valid_header_with_random_payload_never_panics(id: u32, payload in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut frame = Vec::from(MAGIC);
            frame.push(PROTOCOL_VERSION);
            frame.push(0);
            frame.extend(id.to_le_bytes());
            frame.extend((payload.len() as u32).to_le_bytes());
            frame.extend(&payload);
            let mut d = FrameDecoder::new();
            d.push(&frame);
            let _ = d.next_frame::<Request>();
            let _ = d.next_frame::<Event>();
        }
    }
}
