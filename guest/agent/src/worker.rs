//! One task per language owns that language's interpreter and runs its jobs in order, so two
//! executions in the same language queue while other requests (pings, other languages) proceed.

use std::sync::Arc;
use std::time::Instant;

use sbx_protocol::{Event, ExecRequest, GuestErrorKind, Language};
use tokio::sync::{mpsc, oneshot};

use crate::config::WARM_IMPORTS_TIMEOUT;
use crate::context::Context;
use crate::driver;
use crate::interpreter::{Interpreter, StartError};
use crate::log;
use crate::outbox::Outbox;
use crate::reseed;
use crate::script::{self, Prepared};
use crate::warm;

/// Time an interpreter gets to reseed its generator.
const RESEED_TIMEOUT_MS: u64 = 5_000;

/// Work for a language's interpreter.
#[derive(Debug)]
pub enum Job {
    /// Start the interpreter now and import `modules` in it; answer `Warmed`.
    Warm {
        /// Request id.
        id: u32,
        /// Modules to import (checked by `warm::check`).
        modules: Vec<String>,
    },
    /// Run code; stream output, answer `ExecDone`.
    Exec {
        /// Request id.
        id: u32,
        /// The request.
        request: ExecRequest,
    },
    /// Reseed the running interpreter's generator (after a snapshot restore); answers whether
    /// an interpreter was reseeded. Never sends events itself.
    Reseed {
        /// Request id.
        id: u32,
        /// Where the answer goes.
        done: oneshot::Sender<bool>,
    },
}

impl Job {
    /// The request id this job answers.
    pub fn id(&self) -> u32 {
        match self {
            Job::Warm { id, .. } | Job::Exec { id, .. } | Job::Reseed { id, .. } => *id,
        }
    }
}

/// Starts the worker task for `language`; jobs sent to the returned queue run one at a time.
pub fn spawn(ctx: Arc<Context>, language: Language, out: Outbox) -> mpsc::UnboundedSender<Job> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(run(ctx, language, out, rx));
    tx
}

async fn run(
    ctx: Arc<Context>,
    language: Language,
    out: Outbox,
    mut jobs: mpsc::UnboundedReceiver<Job>,
) {
    let mut slot: Option<Interpreter> = None;
    while let Some(job) = jobs.recv().await {
        match job {
            Job::Warm { id, modules } => {
                let event = warm(&ctx, language, &mut slot, id, &modules, &out).await;
                let _ = out.send(id, &event).await;
            }
            Job::Exec { id, request } => {
                let event = exec(&ctx, language, &mut slot, id, &request, &out).await;
                let _ = out.send(id, &event).await;
            }
            Job::Reseed { id, done } => {
                let _ = done.send(reseed(language, &mut slot, id, &out).await);
            }
        }
    }
}

async fn exec(
    ctx: &Arc<Context>,
    language: Language,
    slot: &mut Option<Interpreter>,
    id: u32,
    request: &ExecRequest,
    out: &Outbox,
) -> Event {
    if let Err(e) = driver::validate(&request.code, &request.env, request.timeout_ms) {
        return Event::Error(sbx_protocol::GuestError {
            kind: GuestErrorKind::InvalidRequest,
            message: e.to_string(),
        });
    }
    let start_ms = match ensure(ctx, language, slot).await {
        Ok(ms) => ms,
        Err(e) => return start_failed(language, &e),
    };
    let Some(interpreter) = slot.as_mut() else {
        return internal(format!("{language} interpreter vanished"));
    };
    let code = driver::strip_bom(&request.code);
    // Kept until the execution ends: the file is removed when this is dropped.
    let script = (language == Language::Raw && script::is_script(code))
        .then(|| script::prepare(&ctx.config, code));
    let command = script.as_ref().map(Prepared::command);
    let code = command.as_deref().unwrap_or(code);
    let ran = interpreter.run(id, request, code, out).await;
    drop(script);
    match ran {
        Ok(mut ran) => {
            if !ran.alive {
                // Dropping it kills whatever it left behind; the next job starts a fresh one.
                *slot = None;
            }
            ran.outcome.interpreter_start_ms = start_ms;
            Event::ExecDone(ran.outcome)
        }
        Err(e) => internal(format!("cannot run code: {e}")),
    }
}

/// Starts the interpreter and imports `modules` in it. An interpreter that dies importing is
/// discarded and reported: a snapshot of it would not be warm.
async fn warm(
    ctx: &Arc<Context>,
    language: Language,
    slot: &mut Option<Interpreter>,
    id: u32,
    modules: &[String],
    out: &Outbox,
) -> Event {
    let started = Instant::now();
    if let Err(e) = ensure(ctx, language, slot).await {
        return start_failed(language, &e);
    }
    let elapsed_ms = || u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let (Some(code), Some(interpreter)) = (warm::code(language, modules), slot.as_mut()) else {
        return Event::Warmed {
            elapsed_ms: elapsed_ms(),
        };
    };
    let request = ExecRequest {
        language,
        code,
        timeout_ms: u64::try_from(WARM_IMPORTS_TIMEOUT.as_millis()).unwrap_or(u64::MAX),
        env: Vec::new(),
        // Nothing of this internal command reaches the host.
        stdout_limit: 0,
        stderr_limit: 0,
    };
    match interpreter.run(id, &request, &request.code, out).await {
        Ok(ran) if ran.alive => {
            if ran.outcome.exit_code != 0 {
                log::warn(format_args!(
                    "{language} warm-up imports ended with {}",
                    ran.outcome.exit_code
                ));
            }
            Event::Warmed {
                elapsed_ms: elapsed_ms(),
            }
        }
        outcome => {
            *slot = None;
            let how = match outcome {
                Ok(ran) if ran.outcome.timed_out => {
                    format!("timed out after {} s", WARM_IMPORTS_TIMEOUT.as_secs())
                }
                Ok(ran) => format!("exited with code {}", ran.outcome.exit_code),
                Err(e) => format!("failed: {e}"),
            };
            let message = format!("{language} interpreter {how} while importing modules to warm");
            log::warn(format_args!("{message}"));
            Event::Error(sbx_protocol::GuestError {
                kind: GuestErrorKind::InterpreterStart,
                message,
            })
        }
    }
}

/// Reseeds the running interpreter's generator. An interpreter that cannot be reseeded is
/// discarded, so the next job starts a fresh one (seeded from the fresh CRNG) rather than
/// sharing a generator state with other clones.
async fn reseed(language: Language, slot: &mut Option<Interpreter>, id: u32, out: &Outbox) -> bool {
    let Some(interpreter) = slot.as_mut() else {
        return false;
    };
    if !interpreter.is_alive() {
        return false;
    }
    let Some(code) = reseed::interpreter_code(language) else {
        return false;
    };
    let request = ExecRequest {
        language,
        code: code.to_string(),
        timeout_ms: RESEED_TIMEOUT_MS,
        env: Vec::new(),
        // Nothing of this internal command reaches the host.
        stdout_limit: 0,
        stderr_limit: 0,
    };
    match interpreter.run(id, &request, &request.code, out).await {
        Ok(ran) if ran.alive && ran.outcome.exit_code == 0 => true,
        outcome => {
            log::warn(format_args!(
                "{language} interpreter could not reseed its generator ({outcome:?}); discarding it"
            ));
            *slot = None;
            false
        }
    }
}

/// Makes sure the interpreter runs; returns how long starting it took (0 if it was running).
async fn ensure(
    ctx: &Arc<Context>,
    language: Language,
    slot: &mut Option<Interpreter>,
) -> Result<u64, StartError> {
    if let Some(interpreter) = slot {
        if interpreter.is_alive() {
            return Ok(0);
        }
        log::info(format_args!("{language} interpreter ended; restarting it"));
        *slot = None;
    }
    let started = Instant::now();
    let interpreter = Interpreter::start(ctx, language).await?;
    *slot = Some(interpreter);
    Ok(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX))
}

fn start_failed(language: Language, error: &StartError) -> Event {
    let mut message = format!("{language} interpreter: {error}");
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    log::warn(format_args!("{message}"));
    Event::Error(sbx_protocol::GuestError {
        kind: GuestErrorKind::InterpreterStart,
        message,
    })
}

fn internal(message: String) -> Event {
    log::warn(format_args!("{message}"));
    Event::Error(sbx_protocol::GuestError {
        kind: GuestErrorKind::Internal,
        message,
    })
}
