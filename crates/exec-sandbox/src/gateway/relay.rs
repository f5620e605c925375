//! The host side of one relayed TCP connection.
//!
//! A relay task owns a host `TcpStream` (connected by the gateway on the guest's behalf, or
//! accepted on a forwarded port) and moves bytes between it and the stack:
//! guest → host through a bounded channel (the stack stops reading the guest's socket when it
//! is full), host → guest as [`Event::Data`] under a byte credit the stack returns as the
//! guest's socket takes the data, so a slow guest slows the host connection instead of growing
//! a buffer.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};

use super::stack::{ConnId, Event};

/// Longest an outbound host connection may take to establish (all addresses together).
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// Bytes read from the host per chunk.
pub const CHUNK: usize = 16 * 1024;
/// Host bytes in flight toward one guest socket (read but not yet taken by the guest).
pub const CREDIT: usize = 64 * 1024;
/// Guest chunks queued toward one host connection.
pub const TO_HOST_CHUNKS: usize = 4;

/// Why a relayed host connection failed (the guest's side is reset).
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// No address to connect to.
    #[error("no address")]
    NoAddress,
    /// Connecting to the last address tried failed.
    #[error("{addr}")]
    Connect {
        /// The address tried.
        addr: SocketAddrV4,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// No address answered within [`CONNECT_DEADLINE`].
    #[error("no connection within {} s", CONNECT_DEADLINE.as_secs())]
    ConnectTimeout,
    /// Reading or writing the host connection failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The channels of one relay.
pub struct RelayIo {
    /// Which connection.
    pub id: ConnId,
    /// Guest bytes to write to the host; closed when the guest finished sending.
    pub to_host: mpsc::Receiver<Vec<u8>>,
    /// Back to the stack.
    pub events: mpsc::Sender<Event>,
    /// Host bytes the relay may still read ahead of the guest.
    pub credit: Arc<Semaphore>,
}

/// Connects to `port` on the first of `addrs` that answers, then relays, with `initial`
/// (the bytes the guest already sent while presenting its name) written first.
pub async fn connect_and_relay(addrs: Vec<Ipv4Addr>, port: u16, initial: Vec<u8>, io: RelayIo) {
    let started = Instant::now();
    let attempt = async {
        let mut last = RelayError::NoAddress;
        for addr in &addrs {
            let addr = SocketAddrV4::new(*addr, port);
            match TcpStream::connect(addr).await {
                Ok(stream) => return Ok(stream),
                Err(source) => last = RelayError::Connect { addr, source },
            }
        }
        Err(last)
    };
    let stream = match tokio::time::timeout(CONNECT_DEADLINE, attempt).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return fail(&io, error).await,
        Err(_) => return fail(&io, RelayError::ConnectTimeout).await,
    };
    let _ = stream.set_nodelay(true);
    let _ = io
        .events
        .send(Event::Connected {
            id: io.id,
            took: started.elapsed(),
        })
        .await;
    relay(stream, initial, io).await;
}

async fn fail(io: &RelayIo, error: RelayError) {
    let _ = io.events.send(Event::Failed { id: io.id, error }).await;
}

/// Relays between `stream` and the stack until both directions are done or one fails.
pub async fn relay(stream: TcpStream, initial: Vec<u8>, io: RelayIo) {
    let RelayIo {
        id,
        mut to_host,
        events,
        credit,
    } = io;
    let (mut reader, mut writer) = stream.into_split();
    let upstream = async move {
        if !initial.is_empty() {
            writer.write_all(&initial).await?;
        }
        while let Some(chunk) = to_host.recv().await {
            writer.write_all(&chunk).await?;
        }
        // The guest finished sending: pass its FIN on.
        writer.shutdown().await
    };
    let down_events = events.clone();
    let downstream = async move {
        let mut buf = vec![0; CHUNK];
        loop {
            let Ok(permit) = credit.acquire_many(CHUNK as u32).await else {
                return Ok(());
            };
            permit.forget();
            let n = reader.read(&mut buf).await?;
            credit.add_permits(CHUNK - n);
            let event = if n == 0 {
                Event::Eof { id }
            } else {
                Event::Data {
                    id,
                    bytes: buf[..n].to_vec(),
                }
            };
            if down_events.send(event).await.is_err() || n == 0 {
                return Ok(());
            }
        }
    };
    if let Err(e) = tokio::try_join!(upstream, downstream) {
        let _ = events
            .send(Event::Failed {
                id,
                error: RelayError::Io(e),
            })
            .await;
    }
}
