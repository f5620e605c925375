//! A VM with no QEMU, for unit tests: a real [`Channel`] to a scripted agent on an in-memory
//! stream. Tests run under tokio's paused time, so deadlines are exact and instant.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sbx_protocol::{Event, ExecOutcome, FrameDecoder, Request, encode_frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Channel, Link, VmHandle, VmStats};
use crate::network::ExposedPort;

/// How the fake agent answers one request frame.
pub(crate) enum Reply {
    /// These events for the request, each sent after its delay.
    Events(Vec<(Duration, Event)>),
    /// No answer at all (a hung guest).
    Silence,
    /// The agent goes away: the channel closes (a dead VM).
    Hangup,
}

impl Reply {
    /// These events at once.
    pub(crate) fn now(events: impl IntoIterator<Item = Event>) -> Reply {
        Reply::Events(events.into_iter().map(|e| (Duration::ZERO, e)).collect())
    }
}

/// The fake agent's behaviour: called for every frame the host sends.
pub(crate) type Script = Box<dyn FnMut(&Request) -> Reply + Send>;

/// A completed execution with `exit_code`.
pub(crate) fn done(exit_code: i32) -> Event {
    Event::ExecDone(ExecOutcome {
        exit_code,
        timed_out: exit_code == -1,
        stdout_truncated: false,
        stderr_truncated: false,
        execution_time_ms: 5,
        interpreter_start_ms: 0,
    })
}

/// A script for a healthy agent: pongs, warms, reseeds, trusts, and runs every execution
/// with exit code 0 and no output.
pub(crate) fn healthy() -> Script {
    Box::new(|request| match request {
        Request::Ping => Reply::now([Event::Pong]),
        Request::Warm { .. } => Reply::now([Event::Warmed { elapsed_ms: 1 }]),
        Request::Exec(_) => Reply::now([done(0)]),
        Request::Reseed { .. } => Reply::now([Event::Reseeded { interpreters: 1 }]),
        Request::TrustCertificates { .. } => {
            Reply::now([Event::CertificatesTrusted { certificates: 1 }])
        }
        _ => Reply::Silence,
    })
}

/// Counts destroyed fakes, shared by every fake a test makes.
#[derive(Clone, Default)]
pub(crate) struct Destroyed(Arc<AtomicUsize>);

impl Destroyed {
    /// How many fakes were destroyed.
    pub(crate) fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// A fake VM.
pub(crate) struct FakeVm {
    name: String,
    channel: Channel,
    requests: Arc<Mutex<Vec<Request>>>,
    destroyed: Destroyed,
    refusals: Mutex<Vec<String>>,
    exposed: Vec<ExposedPort>,
    agent: tokio::task::JoinHandle<()>,
    foreground: AtomicBool,
}

impl FakeVm {
    /// A fake called `name` whose agent follows `script`.
    pub(crate) fn new(name: &str, script: Script, destroyed: &Destroyed) -> FakeVm {
        let (host, mut guest) = tokio::io::duplex(1 << 20);
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let mut script = script;
        let agent = tokio::spawn(async move {
            let mut decoder = FrameDecoder::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let frame = match decoder.next_frame::<Request>() {
                    Ok(frame) => frame,
                    Err(_) => return,
                };
                let Some((id, request)) = frame else {
                    match guest.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => decoder.push(&buf[..n]),
                    }
                    continue;
                };
                let reply = script(&request);
                seen.lock().unwrap().push(request);
                match reply {
                    Reply::Events(events) => {
                        for (delay, event) in events {
                            tokio::time::sleep(delay).await;
                            let frame = encode_frame(id, &event).expect("events encode");
                            if guest.write_all(&frame).await.is_err() {
                                return;
                            }
                        }
                    }
                    Reply::Silence => {}
                    Reply::Hangup => return,
                }
            }
        });
        FakeVm {
            name: name.to_string(),
            channel: Channel::new(host),
            requests,
            destroyed: destroyed.clone(),
            refusals: Mutex::new(Vec::new()),
            exposed: Vec::new(),
            agent,
            foreground: AtomicBool::new(false),
        }
    }

    /// Whether it was given a run's CPU weight ([`VmHandle::to_foreground`]).
    pub(crate) fn in_foreground(&self) -> bool {
        self.foreground.load(Ordering::SeqCst)
    }

    /// Every request frame the agent received so far.
    pub(crate) fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    /// Makes the next [`VmHandle::take_network_refusals`] return `refusals`.
    pub(crate) fn refuse(&self, refusals: &[&str]) {
        self.refusals
            .lock()
            .unwrap()
            .extend(refusals.iter().map(|r| r.to_string()));
    }
}

impl VmHandle for FakeVm {
    fn name(&self) -> &str {
        &self.name
    }

    fn link(&self) -> Link<'_> {
        Link {
            channel: &self.channel,
            name: &self.name,
        }
    }

    fn exposed_ports(&self) -> &[ExposedPort] {
        &self.exposed
    }

    fn take_network_refusals(&self) -> Vec<String> {
        std::mem::take(&mut *self.refusals.lock().unwrap())
    }

    fn isolation(&self) -> crate::result::Isolation {
        crate::result::Isolation::default()
    }

    fn to_foreground(&self) {
        self.foreground.store(true, Ordering::SeqCst);
    }

    async fn destroy(self) -> VmStats {
        self.agent.abort();
        self.destroyed.0.fetch_add(1, Ordering::SeqCst);
        VmStats {
            cpu_time_ms: Some(7),
            memory_peak_mb: Some(42),
            cpu_nr_throttled: Some(0),
        }
    }
}
