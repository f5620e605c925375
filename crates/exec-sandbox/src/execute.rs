//! One execution in a VM's interpreter: dispatch the code, stream and cap its output, and stop
//! trusting the guest once the host's own deadline passes.
//!
//! Works over the channel seam ([`Link`]), so every rule here unit-tests against a fake agent
//! under tokio's paused time: the host deadline, the output caps, the mapping of guest errors,
//! and "outcome unknown" once the channel is lost after dispatch.

use std::time::Duration;

use sbx_protocol::{Event, ExecOutcome, ExecRequest, Language, Request};

use crate::error::Error;
use crate::limits;
use crate::result::{ExecutionResult, Timing};
use crate::vm::accel::AcceleratorChoice;
use crate::vm::{ChannelError, Link, OutputCallback, VmError, VmStats};

/// Bytes of room past the stderr cap for the agent's own timeout note.
const NOTE_ROOM: u64 = 256;

/// Where the VM of a run came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VmOrigin {
    /// Booted for this run.
    Cold,
    /// Taken from the warm pool.
    WarmPool,
    /// Restored from an L1 memory snapshot.
    Snapshot,
}

/// One stream's kept output.
#[derive(Default)]
struct Capped {
    bytes: Vec<u8>,
    truncated: bool,
}

impl Capped {
    /// Keeps what fits under `limit` (the host re-checks the guest's enforcement) and forwards
    /// the kept part to the callback.
    fn accept(&mut self, chunk: &[u8], limit: u64, callback: Option<&OutputCallback>) {
        let room = usize::try_from(limit)
            .unwrap_or(usize::MAX)
            .saturating_sub(self.bytes.len());
        let kept = &chunk[..chunk.len().min(room)];
        if kept.len() < chunk.len() {
            self.truncated = true;
        }
        if kept.is_empty() {
            return;
        }
        self.bytes.extend_from_slice(kept);
        if let Some(cb) = callback {
            cb(kept);
        }
    }
}

/// What one execution produced, before it becomes an [`ExecutionResult`].
pub(crate) struct Collected {
    stdout: Capped,
    stderr: Capped,
    outcome: ExecOutcome,
    guest_reported: bool,
}

impl Collected {
    /// The exit code the program ended with (-1 on a timeout).
    pub(crate) fn exit_code(&self) -> i32 {
        self.outcome.exit_code
    }

    /// False when the host's own deadline fired: the guest stopped answering.
    pub(crate) fn guest_reported(&self) -> bool {
        self.guest_reported
    }

    pub(crate) fn into_result(
        self,
        stats: VmStats,
        timing: Timing,
        accelerator: AcceleratorChoice,
        origin: VmOrigin,
    ) -> ExecutionResult {
        ExecutionResult {
            stdout: String::from_utf8_lossy(&self.stdout.bytes).into_owned(),
            stderr: String::from_utf8_lossy(&self.stderr.bytes).into_owned(),
            exit_code: self.outcome.exit_code,
            timed_out: self.outcome.timed_out,
            stdout_truncated: self.outcome.stdout_truncated || self.stdout.truncated,
            stderr_truncated: self.outcome.stderr_truncated || self.stderr.truncated,
            execution_time_ms: self
                .guest_reported
                .then_some(self.outcome.execution_time_ms),
            external_cpu_time_ms: stats.cpu_time_ms,
            external_memory_peak_mb: stats.memory_peak_mb,
            external_cpu_nr_throttled: stats.cpu_nr_throttled,
            timing: Timing {
                // The guest's figure, so never more than the host saw the execution take.
                interpreter_start_ms: if self.guest_reported {
                    self.outcome.interpreter_start_ms.min(timing.execute_ms)
                } else {
                    0
                },
                ..timing
            },
            accelerator,
            warm_pool_hit: origin == VmOrigin::WarmPool,
            l1_cache_hit: origin == VmOrigin::Snapshot,
            exposed_ports: Vec::new(),
            network_refusals: Vec::new(),
            packages_source: crate::packages::PackageSource::None,
            packages_install_ms: None,
            isolation: crate::result::Isolation::default(),
        }
    }
}

/// What to execute (already validated) and where its output goes.
#[derive(Clone)]
pub(crate) struct Execution {
    /// The interpreter.
    pub language: Language,
    /// The program.
    pub code: String,
    /// The execution timeout the guest enforces.
    pub timeout_seconds: u64,
    /// Environment variables.
    pub env: Vec<(String, String)>,
    /// Receives kept stdout chunks as they arrive.
    pub on_stdout: Option<OutputCallback>,
    /// Receives kept stderr chunks as they arrive.
    pub on_stderr: Option<OutputCallback>,
    /// How long past the timeout the host waits for the guest's own answer
    /// ([`limits::host_timeout_grace`]).
    pub host_grace: Duration,
    /// A VM not pinged since it idled (a pooled VM taken for a run): a ping goes right ahead
    /// of the code and must be answered within this, or the execution fails with
    /// [`VmError::NotAnswering`] before any output is taken. The agent serves requests in
    /// order, so the two round trips overlap and an unanswered ping means the code got no
    /// further than the guest's queue.
    pub ping_first: Option<Duration>,
}

/// Runs `execution` in the VM behind `link`, with the host's own deadline a grace period past
/// the timeout.
pub(crate) async fn execute(link: Link<'_>, execution: Execution) -> Result<Collected, Error> {
    let Execution {
        language,
        code,
        timeout_seconds,
        env,
        on_stdout,
        on_stderr,
        host_grace,
        ping_first,
    } = execution;
    let request = ExecRequest {
        language,
        code,
        timeout_ms: timeout_seconds * 1000,
        env,
        stdout_limit: limits::MAX_STDOUT_BYTES,
        stderr_limit: limits::MAX_STDERR_BYTES,
    };
    let host_deadline = Duration::from_secs(timeout_seconds) + host_grace;
    let channel_error = |source| VmError::Channel {
        name: link.name.to_string(),
        source,
    };
    // Not sent: the code never ran, safe to retry.
    let pong = match ping_first {
        Some(within) => Some((
            link.channel
                .request(&Request::Ping)
                .await
                .map_err(|source| Error::Boot(channel_error(source)))?,
            within,
        )),
        None => None,
    };
    let mut subscription = link
        .channel
        .request(&Request::Exec(request))
        .await
        .map_err(|source| Error::Boot(channel_error(source)))?;
    if let Some((mut pong, within)) = pong
        && !matches!(
            tokio::time::timeout(within, pong.recv()).await,
            Ok(Some(Event::Pong))
        )
    {
        return Err(Error::Boot(VmError::NotAnswering {
            name: link.name.to_string(),
            after: within,
        }));
    }
    let mut stdout = Capped::default();
    let mut stderr = Capped::default();
    let deadline = tokio::time::Instant::now() + host_deadline;
    loop {
        let event = match tokio::time::timeout_at(deadline, subscription.recv()).await {
            Ok(Some(event)) => event,
            // Dispatched, then lost: the code may or may not have run.
            Ok(None) => return Err(Error::Communication(channel_error(ChannelError::Closed))),
            Err(_elapsed) => {
                let note = format!(
                    "\nExecution timed out after {timeout_seconds} s (enforced by the host: the guest stopped responding)\n"
                );
                stderr.accept(
                    note.as_bytes(),
                    limits::MAX_STDERR_BYTES + note.len() as u64,
                    on_stderr.as_ref(),
                );
                return Ok(Collected {
                    stdout,
                    stderr,
                    outcome: ExecOutcome {
                        exit_code: -1,
                        timed_out: true,
                        stdout_truncated: false,
                        stderr_truncated: false,
                        execution_time_ms: host_deadline.as_millis() as u64,
                        interpreter_start_ms: 0,
                    },
                    guest_reported: false,
                });
            }
        };
        match event {
            Event::Stdout(chunk) => {
                stdout.accept(&chunk, limits::MAX_STDOUT_BYTES, on_stdout.as_ref())
            }
            Event::Stderr(chunk) => stderr.accept(
                &chunk,
                limits::MAX_STDERR_BYTES + NOTE_ROOM,
                on_stderr.as_ref(),
            ),
            Event::ExecDone(outcome) => {
                return Ok(Collected {
                    stdout,
                    stderr,
                    outcome,
                    guest_reported: true,
                });
            }
            Event::Error(e) => {
                return Err(Error::Guest {
                    kind: e.kind,
                    message: e.message,
                });
            }
            other => tracing::debug!(event = other.name(), "unexpected event during exec"),
        }
    }
}

/// Where a primer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Primed {
    /// A template, before its memory snapshot.
    Template,
    /// A VM about to enter the warm pool (a template's clone, or a cold boot).
    PooledVm,
}

/// What a VM runs before its snapshot or before the pool hands it out: a line to stdout and
/// one to stderr. It binds no name, so it leaves nothing a program could see.
///
/// A pooled JavaScript VM's primer also runs a throwaway loop long enough for JavaScriptCore's
/// baseline JIT to compile it (3000 iterations; 200 000 reached the next tier, whose compile
/// then ran on into the user's executions). A clone's QEMU then translates the JIT compiler's
/// paths before the run rather than in it: a pooled clone's first execution took 82-91 ms
/// (p50; 44% of QEMU's samples in translation) with the plain primer, 28-29 ms with the loop.
/// A template runs the plain one: with the loop there, its clones' warm runs took 137 ms and
/// their idle PSS grew 69 → 81 MB.
pub(crate) fn primer(language: Language, at: Primed) -> &'static str {
    match (language, at) {
        (Language::Python, _) => "print(0); print(0, file=__import__('sys').stderr)",
        (Language::Javascript, Primed::Template) => "console.log(0); console.error(0)",
        (Language::Javascript, Primed::PooledVm) => {
            "(() => { let s = 0; for (let i = 0; i < 3000; i++) s += i % 7; return s; })(); \
             console.log(0); console.error(0)"
        }
        (Language::Raw, _) => "echo 0; echo 0 >&2",
    }
}

/// Runs [`primer`] in a VM before the pool hands it out. Under emulation most of a VM's first
/// execution is QEMU translating, for the first time in its process, the paths every
/// execution takes (the agent's and the driver's, the interpreter printing, the output sent
/// to the host); doing that here, while the pool refills, takes it off the run that gets the
/// VM. Fails unless the snippet exits 0 with exactly its output.
pub(crate) async fn prime(
    link: Link<'_>,
    language: Language,
    at: Primed,
    host_grace: Duration,
) -> Result<(), VmError> {
    let name = link.name.to_string();
    let failed = |reason: String| VmError::Prime {
        name: name.clone(),
        reason,
    };
    let execution = Execution {
        language,
        code: primer(language, at).into(),
        timeout_seconds: limits::PRIME_TIMEOUT_SECONDS,
        env: Vec::new(),
        on_stdout: None,
        on_stderr: None,
        host_grace,
        ping_first: None,
    };
    let collected = execute(link, execution)
        .await
        .map_err(|e| failed(crate::vm::error_chain(&e)))?;
    const EXPECTED: &[u8] = b"0\n";
    if collected.exit_code() != 0
        || collected.stdout.bytes != EXPECTED
        || collected.stderr.bytes != EXPECTED
    {
        let shown = |bytes: &[u8]| {
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(100)]).into_owned();
            format!("{text:?}")
        };
        return Err(failed(format!(
            "exit code {}, stdout {}, stderr {}",
            collected.exit_code(),
            shown(&collected.stdout.bytes),
            shown(&collected.stderr.bytes)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use sbx_protocol::{GuestError, GuestErrorKind};

    use super::*;
    use crate::ErrorKind;
    use crate::vm::VmHandle;
    use crate::vm::fake::{Destroyed, FakeVm, Reply, done};

    fn python(code: &str, timeout_seconds: u64) -> Execution {
        Execution {
            language: Language::Python,
            code: code.into(),
            timeout_seconds,
            env: vec![("A".into(), "1".into())],
            on_stdout: None,
            on_stderr: None,
            host_grace: limits::HOST_TIMEOUT_GRACE,
            ping_first: None,
        }
    }

    fn vm(script: impl FnMut(&Request) -> Reply + Send + 'static) -> FakeVm {
        FakeVm::new("fake", Box::new(script), &Destroyed::default())
    }

    fn result_of(collected: Collected, origin: VmOrigin) -> ExecutionResult {
        collected.into_result(
            VmStats::default(),
            Timing::default(),
            AcceleratorChoice {
                accelerator: crate::Accelerator::Tcg,
                reason: "test".into(),
            },
            origin,
        )
    }

    fn collector() -> (OutputCallback, Arc<Mutex<Vec<u8>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        (
            Arc::new(move |b: &[u8]| sink.lock().unwrap().extend_from_slice(b)),
            seen,
        )
    }

    #[test]
    fn capped_output_keeps_the_limit_and_reports_truncation() {
        let mut c = Capped::default();
        let (cb, seen) = collector();
        c.accept(b"hello", 8, Some(&cb));
        assert!(!c.truncated);
        c.accept(b"world", 8, Some(&cb));
        assert_eq!(c.bytes, b"hellowor");
        assert!(c.truncated);
        c.accept(b"more", 8, Some(&cb));
        assert_eq!(*seen.lock().unwrap(), b"hellowor");
    }

    /// The guest's interpreter start is reported, but never as more than the execution the
    /// host timed, and not at all when the guest did not report the outcome.
    #[test]
    fn the_guests_interpreter_start_is_bounded_by_the_execution() {
        let collected = |interpreter_start_ms, guest_reported| Collected {
            stdout: Capped::default(),
            stderr: Capped::default(),
            outcome: ExecOutcome {
                exit_code: 0,
                timed_out: false,
                stdout_truncated: false,
                stderr_truncated: false,
                execution_time_ms: 1,
                interpreter_start_ms,
            },
            guest_reported,
        };
        let timing = Timing {
            execute_ms: 50,
            ..Timing::default()
        };
        let accelerator = || AcceleratorChoice {
            accelerator: crate::Accelerator::Tcg,
            reason: "test".into(),
        };
        let start = |c: Collected| {
            c.into_result(VmStats::default(), timing, accelerator(), VmOrigin::Cold)
                .timing
                .interpreter_start_ms
        };
        assert_eq!(start(collected(30, true)), 30);
        assert_eq!(start(collected(u64::MAX, true)), 50, "a lying guest");
        assert_eq!(start(collected(30, false)), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn streams_output_and_returns_the_guest_outcome() {
        let vm = vm(|_| {
            Reply::Events(vec![
                (Duration::ZERO, Event::Stdout(b"4".to_vec())),
                (Duration::from_secs(1), Event::Stdout(b"2\n".to_vec())),
                (Duration::ZERO, Event::Stderr(b"warn\n".to_vec())),
                (Duration::ZERO, done(3)),
            ])
        });
        let (on_stdout, seen) = collector();
        let mut execution = python("print(42)", 10);
        execution.on_stdout = Some(on_stdout);
        let collected = execute(vm.link(), execution).await.unwrap();
        assert!(collected.guest_reported());
        assert_eq!(collected.exit_code(), 3);
        assert_eq!(*seen.lock().unwrap(), b"42\n");
        let result = result_of(collected, VmOrigin::Snapshot);
        assert_eq!(result.stdout, "42\n");
        assert_eq!(result.stderr, "warn\n");
        assert_eq!(result.execution_time_ms, Some(5));
        assert!(result.l1_cache_hit && !result.warm_pool_hit);
        // The request carried the code, the timeout in ms, the env and the caps.
        let [Request::Exec(sent)] = &vm.requests()[..] else {
            panic!("{:?}", vm.requests())
        };
        assert_eq!(sent.code, "print(42)");
        assert_eq!(sent.timeout_ms, 10_000);
        assert_eq!(sent.env, vec![("A".to_string(), "1".to_string())]);
        assert_eq!(sent.stdout_limit, limits::MAX_STDOUT_BYTES);
    }

    /// A fake agent that answers every execution with `stdout`, `stderr` and `exit_code`.
    fn answering(stdout: &'static [u8], stderr: &'static [u8], exit_code: i32) -> FakeVm {
        vm(move |_| {
            Reply::now([
                Event::Stdout(stdout.to_vec()),
                Event::Stderr(stderr.to_vec()),
                done(exit_code),
            ])
        })
    }

    #[tokio::test(start_paused = true)]
    async fn priming_runs_the_languages_snippet_and_checks_its_output() {
        for (language, at) in Language::ALL
            .into_iter()
            .flat_map(|l| [(l, Primed::Template), (l, Primed::PooledVm)])
        {
            let vm = answering(b"0\n", b"0\n", 0);
            prime(vm.link(), language, at, limits::HOST_TIMEOUT_GRACE)
                .await
                .unwrap();
            let [Request::Exec(sent)] = &vm.requests()[..] else {
                panic!("{:?}", vm.requests())
            };
            assert_eq!(sent.language, language);
            assert_eq!(sent.code, primer(language, at));
            assert_eq!(sent.timeout_ms, limits::PRIME_TIMEOUT_SECONDS * 1000);
            assert!(sent.env.is_empty());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_primer_that_fails_or_prints_something_else_fails_the_vm() {
        for (vm, reason) in [
            (answering(b"0\n", b"oops\n", 1), "exit code 1"),
            (answering(b"", b"0\n", 0), "stdout \"\""),
            (answering(b"0\n", b"", 0), "stderr \"\""),
            (vm(|_| Reply::Hangup), "closed"),
        ] {
            let error = prime(
                vm.link(),
                Language::Raw,
                Primed::PooledVm,
                limits::HOST_TIMEOUT_GRACE,
            )
            .await
            .unwrap_err();
            assert!(matches!(error, VmError::Prime { .. }), "{error:?}");
            let chain = crate::vm::error_chain(&error);
            assert!(chain.contains(reason), "{reason}: {chain}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_guest_meets_the_host_deadline() {
        let vm = vm(|_| Reply::Events(vec![(Duration::ZERO, Event::Stdout(b"partial".to_vec()))]));
        let started = tokio::time::Instant::now();
        let (on_stderr, seen) = collector();
        let mut execution = python("while True: pass", 2);
        execution.on_stderr = Some(on_stderr);
        let collected = execute(vm.link(), execution).await.unwrap();
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(2) + limits::HOST_TIMEOUT_GRACE,
            "exactly the timeout plus the grace"
        );
        assert!(!collected.guest_reported());
        assert_eq!(collected.exit_code(), -1);
        let note = String::from_utf8(seen.lock().unwrap().clone()).unwrap();
        assert!(note.contains("enforced by the host"), "{note}");
        let result = result_of(collected, VmOrigin::Cold);
        assert!(result.timed_out);
        assert_eq!(result.stdout, "partial");
        assert_eq!(result.execution_time_ms, None, "the guest reported nothing");
    }

    /// A pooled VM's ping goes ahead of the code; the run goes on once it is answered, and
    /// fails with `NotAnswering`, taking no output, once the ping's deadline passes.
    #[tokio::test(start_paused = true)]
    async fn a_ping_sent_ahead_of_the_code_must_be_answered() {
        let within = Duration::from_secs(1);
        let (on_stdout, seen) = collector();
        let mut execution = python("print(1)", 10);
        execution.on_stdout = Some(on_stdout);
        execution.ping_first = Some(within);

        let answers = vm(|request| match request {
            Request::Ping => Reply::now([Event::Pong]),
            _ => Reply::now([Event::Stdout(b"1\n".to_vec()), done(0)]),
        });
        let collected = execute(answers.link(), execution.clone()).await.unwrap();
        assert_eq!(collected.stdout.bytes, b"1\n");
        let [Request::Ping, Request::Exec(_)] = &answers.requests()[..] else {
            panic!("ping, then the code: {:?}", answers.requests())
        };

        // Hung before the ping: the code's output, had the guest sent any, is not taken.
        let hung = vm(|request| match request {
            Request::Ping => Reply::Silence,
            _ => Reply::Events(vec![(
                Duration::from_secs(5),
                Event::Stdout(b"late".to_vec()),
            )]),
        });
        let started = tokio::time::Instant::now();
        seen.lock().unwrap().clear();
        let Err(error) = execute(hung.link(), execution).await else {
            panic!("an unanswered ping must fail the execution");
        };
        assert_eq!(started.elapsed(), within);
        assert!(
            matches!(error, Error::Boot(VmError::NotAnswering { after, .. }) if after == within),
            "{error:?}"
        );
        assert_eq!(error.kind(), ErrorKind::Transient);
        assert!(seen.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn output_beyond_the_caps_is_dropped_and_flagged() {
        let big = vec![b'x'; limits::MAX_STDOUT_BYTES as usize / 2 + 1];
        let err = vec![b'e'; limits::MAX_STDERR_BYTES as usize + 1000];
        let vm = vm(move |_| {
            Reply::now([
                Event::Stdout(big.clone()),
                Event::Stdout(big.clone()),
                Event::Stderr(err.clone()),
                done(0),
            ])
        });
        let (on_stdout, seen) = collector();
        let mut execution = python("spam()", 10);
        execution.on_stdout = Some(on_stdout);
        let collected = execute(vm.link(), execution).await.unwrap();
        assert_eq!(
            seen.lock().unwrap().len() as u64,
            limits::MAX_STDOUT_BYTES,
            "the callback sees only what is kept"
        );
        let result = result_of(collected, VmOrigin::Cold);
        assert_eq!(result.stdout.len() as u64, limits::MAX_STDOUT_BYTES);
        assert!(result.stdout_truncated);
        assert_eq!(
            result.stderr.len() as u64,
            limits::MAX_STDERR_BYTES + NOTE_ROOM
        );
        assert!(result.stderr_truncated);
    }

    #[tokio::test(start_paused = true)]
    async fn guest_errors_keep_their_kind() {
        for (kind, expected) in [
            (GuestErrorKind::InvalidRequest, ErrorKind::InvalidInput),
            (GuestErrorKind::InterpreterStart, ErrorKind::Transient),
            (GuestErrorKind::Internal, ErrorKind::OutcomeUnknown),
        ] {
            let vm = vm(move |_| {
                Reply::now([Event::Error(GuestError {
                    kind,
                    message: "nope".into(),
                })])
            });
            let err = execute(vm.link(), python("x", 5)).await.err().unwrap();
            assert!(
                matches!(&err, Error::Guest { kind: k, message } if *k == kind && message == "nope")
            );
            assert_eq!(err.kind(), expected, "{kind}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_channel_lost_after_dispatch_is_outcome_unknown() {
        let vm = vm(|_| Reply::Hangup);
        let err = execute(vm.link(), python("x", 5)).await.err().unwrap();
        assert!(matches!(err, Error::Communication(_)), "{err}");
        assert_eq!(err.kind(), ErrorKind::OutcomeUnknown);
    }

    #[tokio::test(start_paused = true)]
    async fn a_channel_lost_before_dispatch_is_transient() {
        let vm = vm(|_| Reply::Hangup);
        // The first request kills the agent; wait until the channel sees it.
        let _ = execute(vm.link(), python("x", 5)).await;
        assert!(vm.link().channel.is_closed());
        let err = execute(vm.link(), python("x", 5)).await.err().unwrap();
        assert!(matches!(err, Error::Boot(_)), "{err}");
        assert_eq!(err.kind(), ErrorKind::Transient);
    }
}
