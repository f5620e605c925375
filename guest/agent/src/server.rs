//! Dispatch of host requests: pings are answered here at once, work goes to the language's
//! worker and file requests to their own tasks, so a long execution never delays anything else.

use std::collections::HashMap;
use std::sync::Arc;

use sbx_protocol::{
    AgentHello, DecodeError, EVENT_ID_UNSOLICITED, Event, GuestErrorKind, Language,
    PROTOCOL_VERSION, Request,
};
use tokio::sync::{mpsc, oneshot};

use crate::certificates;
use crate::context::Context;
use crate::files::{self, Uploads};
use crate::log;
use crate::outbox::Outbox;
use crate::reseed;
use crate::sys;
use crate::warm;
use crate::worker::{self, Job};

/// What the control channel delivers to the server.
#[derive(Debug)]
pub enum Inbound {
    /// A host (re)connected: greet it.
    Connected,
    /// A request frame.
    Request(u32, Request),
    /// The host sent bytes that are not a valid frame: the stream cannot be trusted any more.
    Desync(DecodeError),
    /// The channel ended for good (dev mode: stdin closed).
    Closed,
}

/// Why serving stopped.
#[derive(Debug)]
pub enum Stop {
    /// The host asked for a power-off.
    Shutdown,
    /// The host's byte stream is corrupt.
    Desync(DecodeError),
    /// The channel is gone.
    Closed,
}

/// Serves requests until the host asks to stop or the channel fails.
pub async fn serve(ctx: Arc<Context>, mut inbound: mpsc::Receiver<Inbound>, out: Outbox) -> Stop {
    let mut workers: HashMap<Language, mpsc::UnboundedSender<Job>> = HashMap::new();
    let mut uploads = Uploads::default();
    loop {
        let Some(message) = inbound.recv().await else {
            return Stop::Closed;
        };
        match message {
            Inbound::Connected => {
                let hello = Event::Hello(AgentHello {
                    protocol_version: PROTOCOL_VERSION,
                    agent_version: env!("CARGO_PKG_VERSION").to_string(),
                    uptime_ms: sys::uptime_ms(),
                    boot: ctx.config.boot,
                    root_mounted: ctx.config.root_mounted,
                    packages: ctx.config.packages.status(),
                });
                let _ = out.send(EVENT_ID_UNSOLICITED, &hello).await;
            }
            Inbound::Request(id, request) => match request {
                Request::Ping => {
                    let _ = out.send(id, &Event::Pong).await;
                }
                Request::Warm { language, modules } => match warm::check(language, &modules) {
                    Ok(()) => {
                        let job = Job::Warm { id, modules };
                        submit(&ctx, &out, &mut workers, language, job).await;
                    }
                    Err(e) => {
                        let _ = out
                            .error(id, GuestErrorKind::InvalidRequest, e.to_string())
                            .await;
                    }
                },
                Request::Exec(request) => {
                    let language = request.language;
                    submit(
                        &ctx,
                        &out,
                        &mut workers,
                        language,
                        Job::Exec { id, request },
                    )
                    .await;
                }
                Request::Reseed {
                    entropy,
                    unix_time_ns,
                } => reseed(&ctx, &out, &workers, id, &entropy, unix_time_ns).await,
                Request::Shutdown => return Stop::Shutdown,
                // File requests run in their own tasks; only an upload's chunks pass through
                // here, and wait only while that upload's small queue is full.
                Request::WriteFile {
                    path,
                    size,
                    executable,
                } => {
                    uploads.start(&ctx, &out, id, path, size, executable).await;
                }
                Request::FileData(bytes) => uploads.data(id, bytes).await,
                Request::FileEnd => uploads.end(id).await,
                Request::FileAbort => uploads.abort(id),
                Request::ReadFile { path } => {
                    tokio::spawn(files::read(ctx.clone(), out.clone(), id, path));
                }
                Request::ListFiles { path } => {
                    tokio::spawn(files::list(ctx.clone(), out.clone(), id, path));
                }
                Request::TrustCertificates { pem } => {
                    let _ = match certificates::trust(ctx.config.mode, &pem) {
                        Ok(certificates) => {
                            out.send(id, &Event::CertificatesTrusted { certificates })
                                .await
                        }
                        Err(e) => {
                            let kind = if e.is_invalid_request() {
                                GuestErrorKind::InvalidRequest
                            } else {
                                GuestErrorKind::Internal
                            };
                            out.error(id, kind, crate::init::chain(&e)).await
                        }
                    };
                }
            },
            Inbound::Desync(e) => return Stop::Desync(e),
            Inbound::Closed => return Stop::Closed,
        }
    }
}

/// Reseeds the kernel at once, then each running interpreter through its worker (after the jobs
/// already queued there), and answers when all are done.
async fn reseed(
    ctx: &Arc<Context>,
    out: &Outbox,
    workers: &HashMap<Language, mpsc::UnboundedSender<Job>>,
    id: u32,
    entropy: &[u8],
    unix_time_ns: u64,
) {
    if let Err(e) = reseed::kernel(ctx.config.mode, entropy, unix_time_ns) {
        let mut message = e.to_string();
        if let Some(cause) = std::error::Error::source(&e) {
            message.push_str(&format!(": {cause}"));
        }
        log::error(format_args!("{message}"));
        let _ = out.error(id, GuestErrorKind::Internal, message).await;
        return;
    }
    let mut answers = Vec::new();
    for queue in workers.values() {
        let (done, answer) = oneshot::channel();
        if queue.send(Job::Reseed { id, done }).is_ok() {
            answers.push(answer);
        }
    }
    let out = out.clone();
    tokio::spawn(async move {
        let mut interpreters = 0;
        for answer in answers {
            // A worker that went away dropped its interpreter with it: nothing to reseed.
            if answer.await.unwrap_or(false) {
                interpreters += 1;
            }
        }
        let _ = out.send(id, &Event::Reseeded { interpreters }).await;
    });
}

async fn submit(
    ctx: &Arc<Context>,
    out: &Outbox,
    workers: &mut HashMap<Language, mpsc::UnboundedSender<Job>>,
    language: Language,
    job: Job,
) {
    let queue = workers
        .entry(language)
        .or_insert_with(|| worker::spawn(ctx.clone(), language, out.clone()));
    let Err(mpsc::error::SendError(job)) = queue.send(job) else {
        return;
    };
    // The worker is gone (it panicked): its interpreter was dropped with it. Start over.
    log::error(format_args!(
        "{language} worker stopped; starting a new one"
    ));
    let queue = worker::spawn(ctx.clone(), language, out.clone());
    let id = job.id();
    if queue.send(job).is_err() {
        let _ = out
            .error(
                id,
                GuestErrorKind::Internal,
                format!("{language} worker unavailable"),
            )
            .await;
    }
    workers.insert(language, queue);
}
