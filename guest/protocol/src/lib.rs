//! Wire protocol between the exec-sandbox host and its guest agent.
//!
//! Everything here is plain data plus a bounded frame codec: no async runtime, no I/O. The host
//! library and the static guest agent both depend on this crate, so a message means the same on
//! both sides of the trust boundary.
//!
//! A frame is a 12-byte header followed by a [postcard](https://docs.rs/postcard) payload:
//!
//! | bytes | field |
//! |---|---|
//! | 0..2 | magic `SX` |
//! | 2 | protocol version ([`PROTOCOL_VERSION`]) |
//! | 3 | flags (reserved, must be 0) |
//! | 4..8 | request id, little endian |
//! | 8..12 | payload length, little endian, at most [`MAX_PAYLOAD`] |
//!
//! Every request carries an id chosen by the host; every event the guest sends in answer carries
//! the same id, so several operations can be in flight on one channel.
//!
//! ```
//! use sbx_protocol::{encode_frame, FrameDecoder, Request};
//!
//! let bytes = encode_frame(7, &Request::Ping).unwrap();
//! let mut decoder = FrameDecoder::new();
//! decoder.push(&bytes);
//! let (id, request): (u32, Request) = decoder.next_frame().unwrap().unwrap();
//! assert_eq!((id, request), (7, Request::Ping));
//! ```

mod codec;
pub mod env;

/// Kernel command-line parameter telling the agent its CPU is emulated (QEMU's TCG):
/// `sbx.tcg=1`. JavaScriptCore's top JIT tier then stays off (`guest/agent/src/driver.rs`).
pub const TCG_CMDLINE_PARAM: &str = "sbx.tcg";
pub mod layer;
mod message;
pub mod net;

pub use codec::{
    DecodeError, EncodeError, FrameDecoder, HEADER_LEN, MAGIC, MAX_PAYLOAD, PROTOCOL_VERSION,
    encode_frame,
};
pub use message::{
    AgentHello, BootTimeline, CONTROL_PORT_NAME, EVENT_ID_UNSOLICITED, Event, ExecOutcome,
    ExecRequest, FILE_CHUNK, FileEntry, GuestError, GuestErrorKind, Language, MAX_CA_BUNDLE_BYTES,
    MAX_FILE_SIZE, MAX_LIST_ENTRIES, MAX_NAME_BYTES, MAX_PATH_BYTES, MAX_RESEED_ENTROPY, Request,
    pem_certificate_count,
};
