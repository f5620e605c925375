//! One persistent interpreter process: starting it sandboxed, running code in it, tearing it
//! down.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rustix::pipe::PipeFlags;
use rustix::process::Signal;
use sbx_protocol::{ExecOutcome, ExecRequest, Language};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::sync::oneshot;
use tokio::time::{Instant, sleep_until, timeout};

use crate::config::{
    KILL_WAIT, SANDBOX_GID, SANDBOX_NPROC, SANDBOX_UID, START_STDERR_TAIL, START_TIMEOUT,
    TERM_GRACE,
};
use crate::context::Context;
use crate::driver::{self, Nonce};
use crate::log;
use crate::outbox::Outbox;
use crate::procscan::{self, Sweep};
use crate::streams::{ExecSink, OutputPipe, Pipes, StatusReader, Stream};
use crate::sys::{self, ChildSetup, WaitStatus};

/// An interpreter could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Creating the control pipes failed.
    #[error("cannot create pipes for the {language} interpreter")]
    Pipes {
        /// Language being started.
        language: Language,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The program could not be executed.
    #[error("cannot start {}", program.display())]
    Spawn {
        /// Interpreter binary.
        program: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The interpreter exited before its driver was ready.
    #[error("{} exited with code {code} while starting{}", program.display(), tail(stderr))]
    Exited {
        /// Interpreter binary.
        program: PathBuf,
        /// Its exit code (128+N for signal N).
        code: i32,
        /// The end of what it wrote on stderr.
        stderr: String,
    },
    /// The driver did not report ready in time.
    #[error("{} was not ready after {} s{}", program.display(), after.as_secs(), tail(stderr))]
    NotReady {
        /// Interpreter binary.
        program: PathBuf,
        /// How long we waited.
        after: Duration,
        /// The end of what it wrote on stderr.
        stderr: String,
    },
}

fn tail(stderr: &str) -> String {
    if stderr.trim().is_empty() {
        String::new()
    } else {
        format!(": {}", stderr.trim())
    }
}

/// How an execution ended, as far as the interpreter is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The driver reported this exit code and is back at its command read; the interpreter
    /// lives on. `forged`: more than one status line carried the command's nonce (code in the
    /// interpreter wrote one): the last one counts.
    Completed { code: i32, forged: bool },
    /// The interpreter process ended.
    Died(WaitStatus),
    /// The deadline passed.
    TimedOut,
    /// The sandbox is at its memory limit with its swap full (`memory::Guard::exhausted`).
    OutOfMemory,
}

/// The result of running code: what to report, and whether the interpreter survived.
#[derive(Debug)]
pub struct Ran {
    /// Outcome to report (without `interpreter_start_ms`, which the caller knows).
    pub outcome: ExecOutcome,
    /// The interpreter is still usable.
    pub alive: bool,
}

/// A running interpreter with its driver.
#[derive(Debug)]
pub struct Interpreter {
    ctx: Arc<Context>,
    language: Language,
    pid: i32,
    pipes: Pipes,
    status: StatusReader,
    commands: pipe::Sender,
    exit: oneshot::Receiver<WaitStatus>,
    exited: Option<WaitStatus>,
    /// The interpreter's cgroup (in a VM): it and everything it started, killed in one write.
    group: Option<crate::memory::Group>,
}

impl Interpreter {
    /// Starts `language`'s interpreter and waits until its driver is ready.
    pub async fn start(ctx: &Arc<Context>, language: Language) -> Result<Interpreter, StartError> {
        let pipes_error = |source| StartError::Pipes { language, source };
        let (program, args) = driver::argv(&ctx.config, language);
        // The child's ends are moved above fd 4 so that dup2 onto 3 and 4 cannot clobber them.
        let pipe = || rustix::pipe::pipe_with(PipeFlags::CLOEXEC);
        let above_4 = |fd: &OwnedFd| rustix::io::fcntl_dupfd_cloexec(fd, 10);
        let (cmd_read, cmd_write) = pipe().map_err(|e| pipes_error(e.into()))?;
        let (status_read, status_write) = pipe().map_err(|e| pipes_error(e.into()))?;
        let child_cmd = above_4(&cmd_read).map_err(|e| pipes_error(e.into()))?;
        let child_status = above_4(&status_write).map_err(|e| pipes_error(e.into()))?;
        drop((cmd_read, status_write));

        let group = crate::memory::guard().and_then(|guard| match guard.new_group() {
            Ok(group) => Some(group),
            Err(e) => {
                log::warn(format_args!(
                    "{language} interpreter: no cgroup of its own: {e}"
                ));
                None
            }
        });
        let config = &ctx.config;
        let mut command = Command::new(&program);
        command
            .args(&args)
            .env_clear()
            .envs(config.base_env())
            .envs(
                driver::interpreter_env(language, config.emulated_cpu)
                    .iter()
                    .copied(),
            )
            .current_dir(&config.home)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        sys::sandbox_child(
            &mut command,
            ChildSetup {
                command_fd: child_cmd.as_raw_fd(),
                status_fd: child_status.as_raw_fd(),
                drop_to: config.drop_privileges.then_some((
                    SANDBOX_UID,
                    SANDBOX_GID,
                    SANDBOX_NPROC,
                )),
                cgroup_procs: group.as_ref().map(crate::memory::Group::procs_fd),
            },
        );
        let (mut child, exit) =
            ctx.reaper
                .spawn(&mut command)
                .map_err(|source| StartError::Spawn {
                    program: program.clone(),
                    source,
                })?;
        drop((child_cmd, child_status));
        let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
        ctx.add_session(pid);

        let stdout = child.stdout.take().map(OwnedFd::from);
        let stderr = child.stderr.take().map(OwnedFd::from);
        let wrap = || -> io::Result<(Pipes, StatusReader, pipe::Sender)> {
            let missing = || io::Error::other("child pipe missing");
            Ok((
                Pipes {
                    stdout: OutputPipe::new(stdout.ok_or_else(missing)?, Stream::Stdout)?,
                    stderr: OutputPipe::new(stderr.ok_or_else(missing)?, Stream::Stderr)?,
                },
                StatusReader::new(status_read)?,
                pipe::Sender::from_owned_fd(cmd_write)?,
            ))
        };
        let (pipes, status, commands) = match wrap() {
            Ok(parts) => parts,
            Err(source) => {
                let _ = sys::kill_group(pid, Signal::KILL);
                ctx.remove_session(pid);
                return Err(StartError::Pipes { language, source });
            }
        };
        let mut interpreter = Interpreter {
            ctx: ctx.clone(),
            language,
            pid,
            pipes,
            status,
            commands,
            exit,
            exited: None,
            group,
        };
        interpreter.wait_ready(&program).await?;
        Ok(interpreter)
    }

    async fn wait_ready(&mut self, program: &Path) -> Result<(), StartError> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut stderr_tail: Vec<u8> = Vec::new();
        let mut buf = vec![0u8; 4096];
        loop {
            tokio::select! {
                biased;
                line = self.status.next_line() => match line {
                    Some(line) if line == driver::READY => {
                        // Start-up chatter is not the first execution's output.
                        self.pipes.discard();
                        return Ok(());
                    }
                    Some(_) => {}
                    None => {
                        // The driver closed its status pipe: it is exiting; get the status.
                        let status = match timeout(KILL_WAIT, &mut self.exit).await {
                            Ok(Ok(status)) => status,
                            _ => WaitStatus::Signaled(sys::SIGKILL),
                        };
                        self.exited = Some(status);
                        self.collect_stderr(&mut stderr_tail, &mut buf);
                        return Err(StartError::Exited {
                            program: program.to_path_buf(),
                            code: status.code(),
                            stderr: String::from_utf8_lossy(&stderr_tail).into_owned(),
                        });
                    }
                },
                status = &mut self.exit, if self.exited.is_none() => {
                    let status = status.unwrap_or(WaitStatus::Signaled(sys::SIGKILL));
                    self.exited = Some(status);
                    self.collect_stderr(&mut stderr_tail, &mut buf);
                    return Err(StartError::Exited {
                        program: program.to_path_buf(),
                        code: status.code(),
                        stderr: String::from_utf8_lossy(&stderr_tail).into_owned(),
                    });
                }
                _ = sleep_until(deadline) => {
                    self.collect_stderr(&mut stderr_tail, &mut buf);
                    return Err(StartError::NotReady {
                        program: program.to_path_buf(),
                        after: START_TIMEOUT,
                        stderr: String::from_utf8_lossy(&stderr_tail).into_owned(),
                    });
                }
            }
        }
    }

    fn collect_stderr(&mut self, tail: &mut Vec<u8>, buf: &mut [u8]) {
        let fd = self.pipes.stderr_fd();
        while let Ok(n @ 1..) = rustix::io::read(fd, &mut *buf) {
            tail.extend_from_slice(&buf[..n]);
            if tail.len() > START_STDERR_TAIL {
                tail.drain(..tail.len() - START_STDERR_TAIL);
            }
        }
    }

    /// Whether the process is still running (it may have died between executions).
    pub fn is_alive(&mut self) -> bool {
        if self.exited.is_some() {
            return false;
        }
        match self.exit.try_recv() {
            Err(oneshot::error::TryRecvError::Empty) => true,
            Ok(status) => {
                self.exited = Some(status);
                false
            }
            Err(oneshot::error::TryRecvError::Closed) => {
                self.exited = Some(WaitStatus::Signaled(sys::SIGKILL));
                false
            }
        }
    }

    /// Runs `code` with `request`'s environment and limits, streaming its output as request
    /// `id`. The timeout counts from now.
    pub async fn run(
        &mut self,
        id: u32,
        request: &ExecRequest,
        code: &str,
        out: &Outbox,
    ) -> io::Result<Ran> {
        let started = Instant::now();
        let nonce = Nonce::generate()?;
        let command = driver::command(&nonce, &request.env, code);
        // Code in the interpreter can read the driver's nonce and write its status line: a
        // status line only ends the execution once the driver has also answered an empty
        // command sent after it, which it reads only when back at its command loop.
        let barrier = Nonce::generate()?;
        let barrier_command = driver::command(&barrier, &[], "");
        // Far-future deadlines (absurd timeouts) are capped rather than overflowing.
        let deadline = started
            .checked_add(Duration::from_millis(request.timeout_ms))
            .unwrap_or_else(|| started + Duration::from_secs(365 * 24 * 3600));
        let mut sink = ExecSink::new(out, id, request.stdout_limit, request.stderr_limit);
        let guard = crate::memory::guard();
        let kills_before = guard.map(crate::memory::Guard::kills);

        let Interpreter {
            pipes,
            status,
            commands,
            exit,
            ..
        } = self;
        let ended = pipes
            .pump_until(&mut sink, async {
                let mut exhausted = std::pin::pin!(async {
                    match guard {
                        Some(guard) => guard.exhausted().await,
                        None => std::future::pending().await,
                    }
                });
                tokio::select! {
                    biased;
                    st = &mut *exit => return Ended::Died(st.unwrap_or(WaitStatus::Signaled(sys::SIGKILL))),
                    _ = sleep_until(deadline) => return Ended::TimedOut,
                    () = &mut exhausted => return Ended::OutOfMemory,
                    // A failed write means the driver is gone: the exit status tells how.
                    _ = commands.write_all(&command) => {}
                }
                // The last status line of the command, and how many there were.
                let mut reported: Option<(i32, u32)> = None;
                loop {
                    tokio::select! {
                        biased;
                        line = status.next_line(), if !status.eof => {
                            let Some(line) = line else { continue };
                            if let Some(code) = driver::parse_status(&line, &nonce) {
                                let lines = reported.map_or(0, |(_, n)| n) + 1;
                                if lines == 1 {
                                    // The pipe is empty (the driver read the command), so this
                                    // small write cannot block.
                                    if commands.write_all(&barrier_command).await.is_err() {
                                        continue;
                                    }
                                }
                                reported = Some((code, lines));
                            } else if let (Some((code, lines)), Some(_)) =
                                (reported, driver::parse_status(&line, &barrier))
                            {
                                return Ended::Completed { code, forged: lines > 1 };
                            }
                        }
                        st = &mut *exit => return Ended::Died(st.unwrap_or(WaitStatus::Signaled(sys::SIGKILL))),
                        _ = sleep_until(deadline) => return Ended::TimedOut,
                        () = &mut exhausted => return Ended::OutOfMemory,
                    }
                }
            })
            .await;

        let mut forged = false;
        let mut out_of_memory = false;
        let (exit_code, timed_out, alive) = match ended {
            Ended::Completed { code, forged: f } => {
                forged = f;
                (code, false, true)
            }
            Ended::Died(status) => {
                self.exited = Some(status);
                (status.code(), false, false)
            }
            Ended::TimedOut => {
                self.terminate(&mut sink).await;
                (-1, true, false)
            }
            Ended::OutOfMemory => {
                out_of_memory = true;
                self.kill_and_wait(&mut sink).await;
                (WaitStatus::Signaled(sys::SIGKILL).code(), false, false)
            }
        };
        // Everything the program wrote before it finished is in the pipes now.
        self.pipes.drain(&mut sink).await;
        if timed_out {
            sink.note(&timeout_note(request.timeout_ms)).await;
        }
        if forged {
            sink.note(FORGED_NOTE).await;
        }
        if let (Some(guard), Some(before)) = (guard, kills_before)
            && exit_code == WaitStatus::Signaled(sys::SIGKILL).code()
            && (out_of_memory || guard.kills() > before)
        {
            sink.note(&guard.note()).await;
        }
        Ok(Ran {
            outcome: ExecOutcome {
                exit_code,
                timed_out,
                stdout_truncated: sink.stdout.truncated,
                stderr_truncated: sink.stderr.truncated,
                execution_time_ms: millis(started.elapsed()),
                interpreter_start_ms: 0,
            },
            alive,
        })
    }

    /// SIGTERM to the process group, a grace period (output still flows), then SIGKILL to the
    /// group and every straggler.
    async fn terminate(&mut self, sink: &mut ExecSink<'_>) {
        let _ = sys::kill_group(self.pid, Signal::TERM);
        if self.exited.is_none() {
            let exit = &mut self.exit;
            if let Ok(status) = self.pipes.pump_until(sink, timeout(TERM_GRACE, exit)).await {
                self.exited = Some(status.unwrap_or(WaitStatus::Signaled(sys::SIGKILL)));
            }
        }
        self.kill_and_wait(sink).await;
    }

    /// SIGKILLs the interpreter and everything it started, and waits for its exit.
    async fn kill_and_wait(&mut self, sink: &mut ExecSink<'_>) {
        self.kill_all(true);
        if self.exited.is_none() {
            let exit = &mut self.exit;
            match self.pipes.pump_until(sink, timeout(KILL_WAIT, exit)).await {
                Ok(status) => {
                    self.exited = Some(status.unwrap_or(WaitStatus::Signaled(sys::SIGKILL)));
                }
                Err(_) => log::warn(format_args!(
                    "{} interpreter (pid {}) survived SIGKILL for {} s",
                    self.language,
                    self.pid,
                    KILL_WAIT.as_secs()
                )),
            }
        }
    }

    /// SIGKILLs the interpreter and everything it started: its cgroup in one write (a fork
    /// bomb cannot outrun that), else its process group and a sweep of `/proc`.
    fn kill_all(&self, by_uid: bool) {
        if let Some(group) = &self.group {
            match group.kill() {
                Ok(()) => return,
                Err(e) => log::warn(format_args!("cannot kill the interpreter's cgroup: {e}")),
            }
        }
        let _ = sys::kill_group(self.pid, Signal::KILL);
        self.sweep(by_uid);
    }

    /// Kills the rest of the interpreter's session and, with `by_uid` in the VM, every process
    /// of the sandbox user outside the other interpreters' sessions.
    fn sweep(&self, by_uid: bool) {
        let spare = self.ctx.other_sessions(self.pid);
        let sweep = Sweep {
            sid: self.pid,
            uid: if by_uid {
                self.ctx.config.sandbox_uid_owned()
            } else {
                None
            },
            spare_sids: &spare,
            self_pid: sys::getpid(),
        };
        // A process may fork while we look: go round until nothing is selected.
        for _ in 0..5 {
            let pids = procscan::select(Path::new("/proc"), &sweep);
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                let _ = sys::kill_process(pid, Signal::KILL);
            }
        }
    }
}

impl Drop for Interpreter {
    fn drop(&mut self) {
        // Nothing of a discarded interpreter may keep running: not it, not what it started.
        self.kill_all(false);
        self.ctx.remove_session(self.pid);
    }
}

/// What the program's stderr ends with when code in the interpreter wrote the driver's
/// completion line itself: the execution went on until the driver really finished.
pub const FORGED_NOTE: &str = "\nexec-sandbox: the program wrote the driver's completion line itself; the execution ended when the interpreter really finished, with its real exit code\n";

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The note appended to stderr when an execution times out.
pub fn timeout_note(timeout_ms: u64) -> String {
    let secs = if timeout_ms.is_multiple_of(1000) {
        format!("{}", timeout_ms / 1000)
    } else {
        let text = format!("{:.3}", timeout_ms as f64 / 1000.0);
        text.trim_end_matches('0').to_string()
    };
    format!("\nExecution timed out after {secs} s\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_notes() {
        assert_eq!(timeout_note(30_000), "\nExecution timed out after 30 s\n");
        assert_eq!(timeout_note(1500), "\nExecution timed out after 1.5 s\n");
        assert_eq!(timeout_note(1), "\nExecution timed out after 0.001 s\n");
    }
}
