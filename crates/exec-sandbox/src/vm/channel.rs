//! The control channel to the guest agent: framed requests out, events routed back by id.
//!
//! Everything read here comes from the guest and is hostile: frames are size-bounded by the
//! codec, a malformed frame closes the channel, and per-request queues are bounded so a flooding
//! guest is slowed down (backpressure on the socket) rather than buffered without limit.
//! Writing is bounded too: a guest that stops reading cannot hold a writer (or the writers
//! queued behind it) for longer than [`limits::CHANNEL_WRITE_DEADLINE`]; then the channel
//! closes, since a frame may be half written.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use std::time::Duration;

use sbx_protocol::{
    AgentHello, EVENT_ID_UNSOLICITED, Event, FrameDecoder, GuestErrorKind, Request, encode_frame,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::limits;

/// Events buffered per request before the reader stops reading from the guest.
const EVENTS_PER_REQUEST: usize = 64;

/// Why the channel failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    /// Reading or writing the socket failed.
    #[error("control channel I/O failed")]
    Io(#[source] std::io::Error),
    /// The guest sent an invalid frame.
    #[error("guest sent an invalid frame")]
    Protocol(#[source] sbx_protocol::DecodeError),
    /// A request could not be encoded.
    #[error("cannot encode request")]
    Encode(#[source] sbx_protocol::EncodeError),
    /// The guest closed the channel.
    #[error("guest closed the control channel")]
    Closed,
    /// The guest did not take a frame within the write deadline; the channel is closed.
    #[error("guest did not read the control channel for {} s", .after.as_secs())]
    WriteTimeout {
        /// The deadline.
        after: Duration,
    },
}

/// Why a request with a single expected answer failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AckError {
    /// The control channel failed.
    #[error("control channel failed")]
    Channel(#[source] ChannelError),
    /// The agent refused or failed the request.
    #[error("the guest agent failed ({kind}): {message}")]
    Refused {
        /// The agent's classification.
        kind: GuestErrorKind,
        /// The agent's explanation.
        message: String,
    },
    /// The agent answered with an event that does not answer this request.
    #[error("unexpected answer from the guest agent: {event}")]
    Unexpected {
        /// The event's name.
        event: &'static str,
    },
    /// No answer before the deadline.
    #[error("no answer from the guest agent within {} ms", .after.as_millis())]
    Timeout {
        /// The deadline.
        after: Duration,
    },
}

/// A VM's control channel and its name for errors: the seam between the VM and everything
/// that talks to its agent (executions, files, warm-ups), so they unit-test against an
/// in-process fake agent.
#[derive(Clone, Copy)]
pub(crate) struct Link<'a> {
    /// The channel.
    pub channel: &'a Channel,
    /// The VM's name.
    pub name: &'a str,
}

impl Link<'_> {
    /// Sends `request` and waits up to `deadline` for its one answer, which `expected` must
    /// accept.
    pub(crate) async fn acknowledged(
        self,
        request: &Request,
        deadline: Duration,
        expected: impl Fn(&Event) -> bool,
    ) -> Result<Event, AckError> {
        let mut answers = self
            .channel
            .request(request)
            .await
            .map_err(AckError::Channel)?;
        match tokio::time::timeout(deadline, answers.recv()).await {
            Ok(Some(event)) if expected(&event) => Ok(event),
            Ok(Some(Event::Error(e))) => Err(AckError::Refused {
                kind: e.kind,
                message: e.message,
            }),
            Ok(Some(other)) => Err(AckError::Unexpected {
                event: other.name(),
            }),
            Ok(None) => Err(AckError::Channel(ChannelError::Closed)),
            Err(_) => Err(AckError::Timeout { after: deadline }),
        }
    }
}

type Routes = Arc<std::sync::Mutex<RouteTable>>;

#[derive(Default)]
struct RouteTable {
    routes: HashMap<u32, mpsc::Sender<Event>>,
    hello: Option<oneshot::Sender<AgentHello>>,
    closed: bool,
}

/// A connected control channel.
pub struct Channel {
    writer: Mutex<Box<dyn AsyncWrite + Send + Unpin>>,
    routes: Routes,
    next_id: AtomicU32,
    hello: Mutex<Option<oneshot::Receiver<AgentHello>>>,
    reader: tokio::task::JoinHandle<Result<(), ChannelError>>,
}

/// Events answering one request, in order. `None` from [`Subscription::recv`] means the channel
/// closed before the request finished.
pub struct Subscription {
    id: u32,
    events: mpsc::Receiver<Event>,
    routes: Routes,
}

impl Subscription {
    /// The next event for this request.
    pub async fn recv(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// The request id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// An event already received, without waiting (`None` when there is none yet or the
    /// channel closed).
    pub fn try_recv(&mut self) -> Option<Event> {
        self.events.try_recv().ok()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Ok(mut table) = self.routes.lock() {
            table.routes.remove(&self.id);
        }
    }
}

impl Channel {
    /// Starts serving a connected stream.
    pub fn new<S>(stream: S) -> Self
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (reader, writer) = tokio::io::split(stream);
        let (hello_tx, hello_rx) = oneshot::channel();
        let routes: Routes = Arc::new(std::sync::Mutex::new(RouteTable {
            hello: Some(hello_tx),
            ..RouteTable::default()
        }));
        let reader = tokio::spawn(read_loop(reader, routes.clone()));
        Self {
            writer: Mutex::new(Box::new(writer)),
            routes,
            next_id: AtomicU32::new(1),
            hello: Mutex::new(Some(hello_rx)),
            reader,
        }
    }

    /// Waits for the agent's hello (sent once when it starts serving).
    pub async fn hello(&self) -> Result<AgentHello, ChannelError> {
        let rx = self.hello.lock().await.take().ok_or(ChannelError::Closed)?;
        rx.await.map_err(|_| ChannelError::Closed)
    }

    /// Sends a request and returns the stream of events answering it.
    pub async fn request(&self, request: &Request) -> Result<Subscription, ChannelError> {
        let id = loop {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            if id != EVENT_ID_UNSOLICITED {
                break id;
            }
        };
        let (tx, rx) = mpsc::channel(EVENTS_PER_REQUEST);
        {
            let mut table = self.routes.lock().map_err(|_| ChannelError::Closed)?;
            if table.closed {
                return Err(ChannelError::Closed);
            }
            table.routes.insert(id, tx);
        }
        let subscription = Subscription {
            id,
            events: rx,
            routes: self.routes.clone(),
        };
        let frame = encode_frame(id, request).map_err(ChannelError::Encode)?;
        self.write(&frame).await?;
        Ok(subscription)
    }

    /// Sends a further frame of the request `id` (a file's data after its `WriteFile`). Waits
    /// while the guest is not reading: the guest paces the host.
    pub async fn send(&self, id: u32, request: &Request) -> Result<(), ChannelError> {
        if self.is_closed() {
            return Err(ChannelError::Closed);
        }
        let frame = encode_frame(id, request).map_err(ChannelError::Encode)?;
        self.write(&frame).await
    }

    /// Writes one whole frame, waiting for the writer lock and the guest within
    /// [`limits::CHANNEL_WRITE_DEADLINE`]. On expiry the channel is closed: the frame may be
    /// half written, so nothing more can be sent.
    async fn write(&self, frame: &[u8]) -> Result<(), ChannelError> {
        self.write_within(frame, limits::CHANNEL_WRITE_DEADLINE)
            .await
    }

    async fn write_within(&self, frame: &[u8], deadline: Duration) -> Result<(), ChannelError> {
        let written = tokio::time::timeout(deadline, async {
            let mut writer = self.writer.lock().await;
            writer.write_all(frame).await?;
            writer.flush().await
        })
        .await;
        match written {
            Ok(result) => result.map_err(ChannelError::Io),
            Err(_) => {
                self.close();
                Err(ChannelError::WriteTimeout { after: deadline })
            }
        }
    }

    /// Stops reading and ends every subscription (they see the channel closed).
    fn close(&self) {
        self.reader.abort();
        if let Ok(mut table) = self.routes.lock() {
            table.closed = true;
            table.routes.clear();
            table.hello = None;
        }
    }

    /// True once the reader stopped (guest closed the channel or broke the protocol) or a write
    /// missed its deadline.
    pub fn is_closed(&self) -> bool {
        self.reader.is_finished() || self.routes.lock().map_or(true, |t| t.closed)
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: R,
    routes: Routes,
) -> Result<(), ChannelError> {
    let result = pump(&mut reader, &routes).await;
    if let Err(e) = &result {
        tracing::debug!(error = %e, "control channel closed");
    }
    if let Ok(mut table) = routes.lock() {
        table.closed = true;
        table.routes.clear();
        table.hello = None;
    }
    result
}

async fn pump<R: AsyncRead + Unpin>(reader: &mut R, routes: &Routes) -> Result<(), ChannelError> {
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while let Some((id, event)) = decoder
            .next_frame::<Event>()
            .map_err(ChannelError::Protocol)?
        {
            dispatch(routes, id, event).await;
        }
        let n = reader.read(&mut buf).await.map_err(ChannelError::Io)?;
        if n == 0 {
            return Err(ChannelError::Closed);
        }
        decoder.push(&buf[..n]);
    }
}

async fn dispatch(routes: &Routes, id: u32, event: Event) {
    if id == EVENT_ID_UNSOLICITED {
        if let Event::Hello(hello) = event {
            let tx = routes.lock().ok().and_then(|mut t| t.hello.take());
            if let Some(tx) = tx {
                let _ = tx.send(hello);
            }
        } else {
            tracing::debug!(?event, "ignoring unsolicited event");
        }
        return;
    }
    let tx = routes.lock().ok().and_then(|t| t.routes.get(&id).cloned());
    match tx {
        // A full queue blocks here: the guest waits for us, not the other way round.
        Some(tx) => {
            let _ = tx.send(event).await;
        }
        None => tracing::debug!(id, "event for an unknown or finished request"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sbx_protocol::{AgentHello, PROTOCOL_VERSION};

    async fn guest_send(stream: &mut tokio::io::DuplexStream, id: u32, event: &Event) {
        stream
            .write_all(&encode_frame(id, event).unwrap())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn routes_events_by_request_id() {
        let (host, mut guest) = tokio::io::duplex(1 << 16);
        let channel = Channel::new(host);
        let hello = AgentHello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "t".into(),
            uptime_ms: 1,
            boot: sbx_protocol::BootTimeline::default(),
            root_mounted: true,
            packages: sbx_protocol::layer::LayerStatus::Absent,
        };
        guest_send(
            &mut guest,
            EVENT_ID_UNSOLICITED,
            &Event::Hello(hello.clone()),
        )
        .await;
        assert_eq!(channel.hello().await.unwrap(), hello);

        let mut a = channel.request(&Request::Ping).await.unwrap();
        let mut b = channel.request(&Request::Ping).await.unwrap();
        let mut decoder = FrameDecoder::new();
        let mut buf = [0u8; 256];
        let n = guest.read(&mut buf).await.unwrap();
        decoder.push(&buf[..n]);
        let mut ids = Vec::new();
        while ids.len() < 2 {
            match decoder.next_frame::<Request>().unwrap() {
                Some((id, Request::Ping)) => ids.push(id),
                Some(other) => panic!("{other:?}"),
                None => {
                    let n = guest.read(&mut buf).await.unwrap();
                    decoder.push(&buf[..n]);
                }
            }
        }
        assert_eq!(ids, vec![a.id(), b.id()]);
        guest_send(&mut guest, b.id(), &Event::Stdout(b"to b".to_vec())).await;
        guest_send(&mut guest, a.id(), &Event::Pong).await;
        assert_eq!(a.recv().await, Some(Event::Pong));
        assert_eq!(b.recv().await, Some(Event::Stdout(b"to b".to_vec())));
    }

    #[tokio::test]
    async fn garbage_from_guest_closes_the_channel() {
        let (host, mut guest) = tokio::io::duplex(1 << 16);
        let channel = Channel::new(host);
        let mut sub = channel.request(&Request::Ping).await.unwrap();
        guest.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert_eq!(sub.recv().await, None);
        assert!(channel.hello().await.is_err());
        assert!(channel.request(&Request::Ping).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_guest_that_stops_reading_closes_the_channel_at_the_write_deadline() {
        // A 64-byte pipe the guest never reads: the first big frame cannot be written.
        let (host, _guest) = tokio::io::duplex(64);
        let channel = Channel::new(host);
        let mut waiting = channel.request(&Request::Ping).await.unwrap();
        let big = Request::FileData(vec![7; 4096]);
        let started = tokio::time::Instant::now();
        let err = channel.send(waiting.id(), &big).await.unwrap_err();
        assert!(
            matches!(err, ChannelError::WriteTimeout { after } if after == limits::CHANNEL_WRITE_DEADLINE),
            "{err}"
        );
        assert_eq!(started.elapsed(), limits::CHANNEL_WRITE_DEADLINE);
        assert!(channel.is_closed());
        assert_eq!(
            waiting.recv().await,
            None,
            "subscriptions end with the channel"
        );
        assert!(matches!(
            channel.request(&Request::Ping).await,
            Err(ChannelError::Closed)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_writer_queued_behind_a_stuck_write_gets_the_deadline_too() {
        let (host, _guest) = tokio::io::duplex(64);
        let channel = std::sync::Arc::new(Channel::new(host));
        let first = channel.clone();
        let stuck =
            tokio::spawn(async move { first.send(1, &Request::FileData(vec![7; 4096])).await });
        tokio::task::yield_now().await;
        let second = channel.send(1, &Request::FileEnd).await;
        assert!(second.is_err(), "the queued writer does not wait forever");
        assert!(stuck.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn acknowledged_maps_every_answer() {
        let (host, mut guest) = tokio::io::duplex(1 << 16);
        let channel = Channel::new(host);
        let link = Link {
            channel: &channel,
            name: "vm",
        };
        let answers = [
            Event::Pong,
            Event::Error(sbx_protocol::GuestError {
                kind: GuestErrorKind::InvalidRequest,
                message: "no".into(),
            }),
            Event::Stdout(b"x".to_vec()),
        ];
        let guest_task = tokio::spawn(async move {
            let mut decoder = FrameDecoder::new();
            let mut buf = [0u8; 256];
            for answer in answers {
                let id = loop {
                    if let Some((id, Request::Ping)) = decoder.next_frame::<Request>().unwrap() {
                        break id;
                    }
                    let n = guest.read(&mut buf).await.unwrap();
                    decoder.push(&buf[..n]);
                };
                guest_send(&mut guest, id, &answer).await;
            }
            guest
        });
        let pong = |e: &Event| matches!(e, Event::Pong);
        let deadline = Duration::from_secs(5);
        assert_eq!(
            link.acknowledged(&Request::Ping, deadline, pong)
                .await
                .unwrap(),
            Event::Pong
        );
        let refused = link.acknowledged(&Request::Ping, deadline, pong).await;
        assert!(
            matches!(&refused, Err(AckError::Refused { kind: GuestErrorKind::InvalidRequest, message }) if message == "no"),
            "{refused:?}"
        );
        let unexpected = link.acknowledged(&Request::Ping, deadline, pong).await;
        assert!(
            matches!(unexpected, Err(AckError::Unexpected { event: "Stdout" })),
            "{unexpected:?}"
        );
        let _guest = guest_task.await.unwrap();
        let silent = link
            .acknowledged(&Request::Ping, Duration::from_millis(50), pong)
            .await;
        assert!(
            matches!(silent, Err(AckError::Timeout { .. })),
            "{silent:?}"
        );
    }

    #[tokio::test]
    async fn guest_hangup_ends_subscriptions() {
        let (host, guest) = tokio::io::duplex(1024);
        let channel = Channel::new(host);
        let mut sub = channel.request(&Request::Ping).await.unwrap();
        drop(guest);
        assert_eq!(sub.recv().await, None);
    }
}
