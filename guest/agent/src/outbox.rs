//! The queue of encoded events waiting for the control channel's writer thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sbx_protocol::{Event, GuestError, GuestErrorKind, encode_frame};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::log;

/// Frames queued before senders wait: bounds memory when the host reads slowly (output events
/// are at most 64 KiB, so this is a few MiB) and pushes back on chatty programs.
pub const QUEUE_FRAMES: usize = 64;

/// Sends events to the host. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Vec<u8>>,
    counters: Arc<Counters>,
}

/// Frames queued and frames written, to know when everything reached the channel.
#[derive(Debug, Default)]
pub struct Counters {
    queued: AtomicU64,
    written: AtomicU64,
}

impl Counters {
    /// Called by the writer after each frame it wrote (or gave up on).
    pub fn frame_done(&self) {
        self.written.fetch_add(1, Ordering::Release);
    }
}

/// The writer side of an [`Outbox`].
#[derive(Debug)]
pub struct Frames {
    /// Encoded frames, in order.
    pub rx: mpsc::Receiver<Vec<u8>>,
    /// Shared with the outbox.
    pub counters: Arc<Counters>,
}

/// The host is gone: nothing reads events any more.
#[derive(Debug, thiserror::Error)]
#[error("the control channel writer has stopped")]
pub struct Closed;

impl Outbox {
    /// A new outbox and the receiving end for the writer.
    pub fn new() -> (Outbox, Frames) {
        let (tx, rx) = mpsc::channel(QUEUE_FRAMES);
        let counters = Arc::<Counters>::default();
        (
            Outbox {
                tx,
                counters: counters.clone(),
            },
            Frames { rx, counters },
        )
    }

    /// Queues `event` for request `id`, waiting while the queue is full.
    pub async fn send(&self, id: u32, event: &Event) -> Result<(), Closed> {
        let frame = match encode_frame(id, event) {
            Ok(frame) => frame,
            Err(e) => {
                // Only oversized events can fail, and output is chunked well below the limit.
                log::warn(format_args!("cannot encode event for request {id}: {e}"));
                let error = Event::Error(GuestError {
                    kind: GuestErrorKind::Internal,
                    message: format!("cannot encode event: {e}"),
                });
                encode_frame(id, &error).map_err(|_| Closed)?
            }
        };
        self.counters.queued.fetch_add(1, Ordering::AcqRel);
        self.tx.send(frame).await.map_err(|_| {
            self.counters.written.fetch_add(1, Ordering::AcqRel);
            Closed
        })
    }

    /// Sends an error event.
    pub async fn error(
        &self,
        id: u32,
        kind: GuestErrorKind,
        message: String,
    ) -> Result<(), Closed> {
        self.send(id, &Event::Error(GuestError { kind, message }))
            .await
    }

    /// Waits until every queued frame was written, or `timeout` passes. Returns whether all
    /// frames went out.
    pub async fn flushed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let queued = self.counters.queued.load(Ordering::Acquire);
            let written = self.counters.written.load(Ordering::Acquire);
            if written >= queued {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}
