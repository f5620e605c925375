//! Frames between QEMU's NIC backend and the user-space stack.
//!
//! On the wire (`-netdev socket` with a stream socket) every Ethernet frame is preceded by its
//! length, 4 bytes big endian. Frames come from the guest: lengths are checked before anything
//! is buffered.

use std::collections::VecDeque;

use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Ethernet header bytes.
const ETHERNET_HEADER: usize = 14;
/// Largest frame on the link.
pub const MAX_FRAME: usize = sbx_protocol::net::MTU as usize + ETHERNET_HEADER;
/// Smallest frame worth parsing (an Ethernet header).
const MIN_FRAME: usize = ETHERNET_HEADER;
/// Frames the stack may queue for QEMU before it stops producing more in one poll.
const MAX_TX_QUEUE: usize = 256;

/// Why the frame stream from QEMU ended.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// QEMU closed its end (the VM is gone).
    #[error("the NIC socket closed")]
    Closed,
    /// A length outside the link's limits.
    #[error("frame of {0} bytes; the link carries {MIN_FRAME}-{MAX_FRAME}")]
    BadLength(usize),
    /// Reading failed.
    #[error("reading the NIC socket: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one length-prefixed frame.
pub async fn read_frame(reader: &mut (impl AsyncRead + Unpin)) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    if let Err(e) = reader.read_exact(&mut len).await {
        return Err(match e.kind() {
            std::io::ErrorKind::UnexpectedEof => FrameError::Closed,
            _ => FrameError::Io(e),
        });
    }
    let len = u32::from_be_bytes(len) as usize;
    if !(MIN_FRAME..=MAX_FRAME).contains(&len) {
        return Err(FrameError::BadLength(len));
    }
    let mut frame = vec![0; len];
    reader.read_exact(&mut frame).await?;
    Ok(frame)
}

/// Writes one length-prefixed frame.
pub async fn write_frame(
    writer: &mut (impl AsyncWrite + Unpin),
    frame: &[u8],
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(4 + frame.len());
    buf.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    buf.extend_from_slice(frame);
    writer.write_all(&buf).await
}

/// The stack's device: frames received from the guest wait in `rx`, frames for the guest
/// collect in `tx`.
#[derive(Debug, Default)]
pub struct Queues {
    /// From the guest, not yet processed.
    pub rx: VecDeque<Vec<u8>>,
    /// For the guest, not yet written.
    pub tx: VecDeque<Vec<u8>>,
}

pub struct Rx(Vec<u8>);
pub struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl RxToken for Rx {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(&self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut frame = vec![0; len];
        let result = f(&mut frame);
        self.0.push_back(frame);
        result
    }
}

impl Device for Queues {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((Rx(frame), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        (self.tx.len() < MAX_TX_QUEUE).then_some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_bad_lengths_are_refused() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let frame: Vec<u8> = (0..60u8).collect();
        write_frame(&mut a, &frame).await.unwrap();
        assert_eq!(read_frame(&mut b).await.unwrap(), frame);

        for len in [0u32, 13, MAX_FRAME as u32 + 1, u32::MAX] {
            let (mut a, mut b) = tokio::io::duplex(64);
            a.write_all(&len.to_be_bytes()).await.unwrap();
            assert!(matches!(
                read_frame(&mut b).await,
                Err(FrameError::BadLength(l)) if l == len as usize
            ));
        }
        drop(a);
        assert!(matches!(read_frame(&mut b).await, Err(FrameError::Closed)));
    }
}
