//! Moving an interpreter's output to the host: pipes, per-execution limits, the status line.

use std::future::Future;
use std::io;
use std::os::fd::AsFd;

use rustix::io::Errno;
use sbx_protocol::Event;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;

use crate::config::{DRAIN_CAP, OUTPUT_CHUNK};
use crate::outbox::Outbox;

/// Which output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A byte budget: the first `limit` bytes pass, the rest is dropped and remembered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    limit: u64,
    passed: u64,
    /// Something was dropped.
    pub truncated: bool,
}

impl Limit {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Limit {
        Limit {
            limit,
            passed: 0,
            truncated: false,
        }
    }

    /// The part of `chunk` that fits in what is left of the budget.
    pub fn admit<'a>(&mut self, chunk: &'a [u8]) -> &'a [u8] {
        let room = self.limit.saturating_sub(self.passed);
        let take = usize::try_from(room).unwrap_or(usize::MAX).min(chunk.len());
        if take < chunk.len() {
            self.truncated = true;
        }
        self.passed += take as u64;
        &chunk[..take]
    }
}

/// Where one execution's output goes.
#[derive(Debug)]
pub struct ExecSink<'a> {
    out: &'a Outbox,
    id: u32,
    /// Stdout budget.
    pub stdout: Limit,
    /// Stderr budget.
    pub stderr: Limit,
}

impl<'a> ExecSink<'a> {
    /// Output of request `id`, with the request's limits.
    pub fn new(out: &'a Outbox, id: u32, stdout_limit: u64, stderr_limit: u64) -> Self {
        ExecSink {
            out,
            id,
            stdout: Limit::new(stdout_limit),
            stderr: Limit::new(stderr_limit),
        }
    }

    /// Forwards what the budget allows of `chunk`.
    pub async fn forward(&mut self, stream: Stream, chunk: &[u8]) {
        let admitted = match stream {
            Stream::Stdout => self.stdout.admit(chunk),
            Stream::Stderr => self.stderr.admit(chunk),
        };
        if admitted.is_empty() {
            return;
        }
        let event = match stream {
            Stream::Stdout => Event::Stdout(admitted.to_vec()),
            Stream::Stderr => Event::Stderr(admitted.to_vec()),
        };
        // A closed outbox means the agent is shutting down; the output has nowhere to go.
        let _ = self.out.send(self.id, &event).await;
    }

    /// Sends `text` on stderr regardless of the budget (agent notes such as a timeout).
    pub async fn note(&mut self, text: &str) {
        let _ = self
            .out
            .send(self.id, &Event::Stderr(text.as_bytes().to_vec()))
            .await;
    }
}

/// The read end of an interpreter's stdout or stderr.
#[derive(Debug)]
pub struct OutputPipe {
    rx: pipe::Receiver,
    stream: Stream,
    buf: Vec<u8>,
    eof: bool,
}

impl OutputPipe {
    /// Wraps a pipe read end (made non-blocking).
    pub fn new(fd: std::os::fd::OwnedFd, stream: Stream) -> io::Result<Self> {
        Ok(OutputPipe {
            rx: pipe::Receiver::from_owned_fd(fd)?,
            stream,
            buf: vec![0; OUTPUT_CHUNK],
            eof: false,
        })
    }

    /// Reads whatever is in the pipe right now, without waiting, up to [`DRAIN_CAP`] bytes.
    async fn drain(&mut self, sink: &mut ExecSink<'_>) {
        let mut total = 0;
        while !self.eof && total < DRAIN_CAP {
            match rustix::io::read(&self.rx, &mut self.buf) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    total += n;
                    sink.forward(self.stream, &self.buf[..n]).await;
                }
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => return,
                Err(_) => self.eof = true,
            }
        }
    }

    /// Reads whatever is in the pipe right now and throws it away (bounded like `drain`).
    fn discard(&mut self) -> usize {
        let mut total = 0;
        while !self.eof && total < DRAIN_CAP {
            match rustix::io::read(&self.rx, &mut self.buf) {
                Ok(0) => self.eof = true,
                Ok(n) => total += n,
                Err(Errno::INTR) => {}
                Err(_) => break,
            }
        }
        total
    }
}

/// An interpreter's stdout and stderr.
#[derive(Debug)]
pub struct Pipes {
    /// Standard output.
    pub stdout: OutputPipe,
    /// Standard error.
    pub stderr: OutputPipe,
}

impl Pipes {
    /// Forwards output to `sink` as it comes until `stop` completes, and returns its result.
    /// Each read (at most [`OUTPUT_CHUNK`] bytes) becomes one event right away.
    pub async fn pump_until<F: Future>(&mut self, sink: &mut ExecSink<'_>, stop: F) -> F::Output {
        tokio::pin!(stop);
        let Pipes { stdout, stderr } = self;
        loop {
            tokio::select! {
                biased;
                value = &mut stop => return value,
                r = stdout.rx.read(&mut stdout.buf), if !stdout.eof => match r {
                    Ok(0) | Err(_) => stdout.eof = true,
                    Ok(n) => sink.forward(Stream::Stdout, &stdout.buf[..n]).await,
                },
                r = stderr.rx.read(&mut stderr.buf), if !stderr.eof => match r {
                    Ok(0) | Err(_) => stderr.eof = true,
                    Ok(n) => sink.forward(Stream::Stderr, &stderr.buf[..n]).await,
                },
            }
        }
    }

    /// Forwards what is already in both pipes, without waiting for more.
    pub async fn drain(&mut self, sink: &mut ExecSink<'_>) {
        self.stdout.drain(sink).await;
        self.stderr.drain(sink).await;
    }

    /// The stderr read end, for non-blocking reads outside an execution.
    pub fn stderr_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.stderr.rx.as_fd()
    }

    /// Throws away what is in both pipes (output of a start-up, not of any execution).
    pub fn discard(&mut self) -> usize {
        self.stdout.discard() + self.stderr.discard()
    }
}

/// Longest status line accepted; longer ones are garbage and skipped.
const MAX_STATUS_LINE: usize = 256;

/// Reads newline-terminated lines from a driver's status pipe.
#[derive(Debug)]
pub struct StatusReader {
    rx: pipe::Receiver,
    buf: Vec<u8>,
    skipping: bool,
    /// The driver closed its end.
    pub eof: bool,
}

impl StatusReader {
    /// Wraps a pipe read end (made non-blocking).
    pub fn new(fd: std::os::fd::OwnedFd) -> io::Result<Self> {
        Ok(StatusReader {
            rx: pipe::Receiver::from_owned_fd(fd)?,
            buf: Vec::new(),
            skipping: false,
            eof: false,
        })
    }

    /// The next line (without its newline), `None` at end of file. Cancel-safe: bytes are kept
    /// in the reader until a whole line is there.
    pub async fn next_line(&mut self) -> Option<String> {
        let mut chunk = [0u8; 512];
        loop {
            if let Some(line) = self.take_line() {
                return Some(line);
            }
            if self.eof {
                return None;
            }
            match self.rx.read(&mut chunk).await {
                Ok(0) | Err(_) => self.eof = true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn take_line(&mut self) -> Option<String> {
        loop {
            let Some(end) = self.buf.iter().position(|b| *b == b'\n') else {
                if self.buf.len() > MAX_STATUS_LINE {
                    self.buf.clear();
                    self.skipping = true;
                }
                return None;
            };
            let line: Vec<u8> = self.buf.drain(..=end).collect();
            if std::mem::take(&mut self.skipping) || line.len() > MAX_STATUS_LINE + 1 {
                continue;
            }
            let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            return Some(text);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_admits_up_to_budget() {
        let mut l = Limit::new(5);
        assert_eq!(l.admit(b"abc"), b"abc");
        assert!(!l.truncated);
        assert_eq!(l.admit(b"def"), b"de");
        assert!(l.truncated);
        assert_eq!(l.admit(b"g"), b"");
        let mut zero = Limit::new(0);
        assert_eq!(zero.admit(b""), b"");
        assert!(!zero.truncated, "nothing was dropped");
        assert_eq!(zero.admit(b"x"), b"");
        assert!(zero.truncated);
    }

    #[tokio::test]
    async fn status_reader_splits_and_skips_long_lines() {
        let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).expect("pipe");
        let mut reader = StatusReader::new(r).expect("reader");
        let long = "x".repeat(MAX_STATUS_LINE * 3);
        let mut w = std::fs::File::from(w);
        std::io::Write::write_all(&mut w, format!("ready\n{long}\nab").as_bytes()).expect("write");
        assert_eq!(reader.next_line().await.as_deref(), Some("ready"));
        std::io::Write::write_all(&mut w, b"c 0\n").expect("write");
        drop(w);
        assert_eq!(reader.next_line().await.as_deref(), Some("abc 0"));
        assert_eq!(reader.next_line().await, None);
    }
}
