//! A small client of the QEMU Machine Protocol: greeting, `qmp_capabilities`, commands with
//! ids, events, and passing a file descriptor (`getfd`).
//!
//! QEMU runs untrusted guest code, so what it sends is treated as hostile: lines are bounded,
//! every wait has a deadline, and anything unparsable is an error rather than a panic.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, BorrowedFd};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;
use tokio::time::{Instant, timeout_at};

/// Longest line accepted from QEMU. Replies we ask for are a few KB.
const MAX_LINE: usize = 256 * 1024;
/// Events kept while waiting for a reply; older ones are dropped.
const MAX_QUEUED_EVENTS: usize = 64;

/// A QMP exchange failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QmpError {
    /// Reading or writing the socket failed.
    #[error("QMP socket I/O failed")]
    Io(#[source] std::io::Error),
    /// QEMU closed the socket.
    #[error("QEMU closed the QMP socket")]
    Closed,
    /// The deadline passed while waiting for `what`.
    #[error("no QMP answer to {what} in time")]
    Timeout {
        /// What we were waiting for.
        what: String,
    },
    /// A line was longer than we accept.
    #[error("QMP line longer than {MAX_LINE} bytes")]
    LineTooLong,
    /// A line was not JSON.
    #[error("QMP line is not JSON")]
    NotJson(#[source] serde_json::Error),
    /// A line was JSON but not a QMP message.
    #[error("invalid QMP message: {0}")]
    Invalid(&'static str),
    /// QEMU refused a command.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
}

/// One message from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// The greeting sent on connection.
    Greeting,
    /// A successful reply.
    Return {
        /// The id we sent, if any.
        id: Option<u64>,
        /// The `return` value.
        value: Value,
    },
    /// A failed command.
    Error {
        /// The id we sent, if any.
        id: Option<u64>,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// An asynchronous event.
    Event {
        /// Event name, e.g. `MIGRATION`.
        name: String,
        /// Its `data`, or null.
        data: Value,
    },
}

/// Parses one line from QEMU.
pub fn parse_message(line: &[u8]) -> Result<Message, QmpError> {
    let value: Value = serde_json::from_slice(line).map_err(QmpError::NotJson)?;
    let Value::Object(object) = value else {
        return Err(QmpError::Invalid("not a JSON object"));
    };
    let id = object.get("id").and_then(Value::as_u64);
    if object.contains_key("QMP") {
        Ok(Message::Greeting)
    } else if let Some(value) = object.get("return") {
        Ok(Message::Return {
            id,
            value: value.clone(),
        })
    } else if let Some(error) = object.get("error") {
        let text = |key: &str| {
            error
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        Ok(Message::Error {
            id,
            class: text("class"),
            desc: text("desc"),
        })
    } else if let Some(name) = object.get("event").and_then(Value::as_str) {
        Ok(Message::Event {
            name: name.to_string(),
            data: object.get("data").cloned().unwrap_or(Value::Null),
        })
    } else {
        Err(QmpError::Invalid("neither return, error nor event"))
    }
}

/// Splits a byte stream into bounded lines.
#[derive(Debug, Default)]
pub struct LineBuffer {
    pending: Vec<u8>,
}

impl LineBuffer {
    /// Appends bytes read from the socket.
    pub fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
    }

    /// The next complete line (without its newline), or `None` until more bytes arrive.
    pub fn next_line(&mut self) -> Result<Option<Vec<u8>>, QmpError> {
        match self.pending.iter().position(|&b| b == b'\n') {
            Some(end) if end > MAX_LINE => Err(QmpError::LineTooLong),
            Some(end) => {
                let mut line: Vec<u8> = self.pending.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                Ok(Some(line))
            }
            None if self.pending.len() > MAX_LINE => Err(QmpError::LineTooLong),
            None => Ok(None),
        }
    }
}

/// A QMP connection in command mode.
#[derive(Debug)]
pub struct Qmp {
    stream: UnixStream,
    lines: LineBuffer,
    events: VecDeque<(String, Value)>,
    next_id: u64,
}

impl Qmp {
    /// Reads the greeting and enters command mode.
    pub async fn handshake(stream: UnixStream, deadline: Instant) -> Result<Qmp, QmpError> {
        let mut qmp = Qmp {
            stream,
            lines: LineBuffer::default(),
            events: VecDeque::new(),
            next_id: 1,
        };
        match qmp.read_message(deadline, "the QMP greeting").await? {
            Message::Greeting => {}
            _ => return Err(QmpError::Invalid("the first message is not the greeting")),
        }
        qmp.execute("qmp_capabilities", None, deadline).await?;
        Ok(qmp)
    }

    /// Runs `command` and returns its `return` value; events arriving meanwhile are queued.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        deadline: Instant,
    ) -> Result<Value, QmpError> {
        let (id, line) = self.encode(command, arguments);
        timeout_at(deadline, self.stream.write_all(&line))
            .await
            .map_err(|_| timeout(command))?
            .map_err(QmpError::Io)?;
        self.reply(command, id, deadline).await
    }

    /// Runs `command` with `fd` attached to it (for `getfd`/`add-fd`).
    pub async fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: BorrowedFd<'_>,
        deadline: Instant,
    ) -> Result<Value, QmpError> {
        let (id, line) = self.encode(command, arguments);
        // The descriptor travels with the first byte; the rest is written normally.
        let first = loop {
            timeout_at(deadline, self.stream.writable())
                .await
                .map_err(|_| timeout(command))?
                .map_err(QmpError::Io)?;
            let raw = self.stream.as_raw_fd();
            match self.stream.try_io(Interest::WRITABLE, || {
                crate::sys::send_with_fd(raw, &line, fd.as_raw_fd())
            }) {
                Ok(sent) => break sent,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(QmpError::Io(e)),
            }
        };
        timeout_at(deadline, self.stream.write_all(&line[first..]))
            .await
            .map_err(|_| timeout(command))?
            .map_err(QmpError::Io)?;
        self.reply(command, id, deadline).await
    }

    /// Waits for an event named `name` whose data satisfies `matches` (queued ones count).
    pub async fn wait_event(
        &mut self,
        name: &str,
        matches: impl Fn(&Value) -> bool,
        deadline: Instant,
    ) -> Result<Value, QmpError> {
        if let Some(i) = self
            .events
            .iter()
            .position(|(n, data)| n == name && matches(data))
        {
            return Ok(self.events.remove(i).map(|(_, d)| d).unwrap_or_default());
        }
        loop {
            match self
                .read_message(deadline, &format!("event {name}"))
                .await?
            {
                Message::Event { name: n, data } if n == name && matches(&data) => {
                    return Ok(data);
                }
                Message::Event { name, data } => self.queue_event(name, data),
                other => tracing::debug!(?other, "unexpected QMP message while waiting"),
            }
        }
    }

    fn encode(&mut self, command: &str, arguments: Option<Value>) -> (u64, Vec<u8>) {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string().into_bytes();
        line.push(b'\n');
        (id, line)
    }

    async fn reply(
        &mut self,
        command: &str,
        id: u64,
        deadline: Instant,
    ) -> Result<Value, QmpError> {
        loop {
            match self.read_message(deadline, command).await? {
                Message::Return {
                    id: Some(got),
                    value,
                } if got == id => return Ok(value),
                Message::Error {
                    id: Some(got),
                    class,
                    desc,
                } if got == id => {
                    return Err(QmpError::Command {
                        command: command.to_string(),
                        class,
                        desc,
                    });
                }
                Message::Event { name, data } => self.queue_event(name, data),
                other => tracing::debug!(?other, "QMP reply to another command"),
            }
        }
    }

    fn queue_event(&mut self, name: String, data: Value) {
        if self.events.len() == MAX_QUEUED_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back((name, data));
    }

    async fn read_message(&mut self, deadline: Instant, what: &str) -> Result<Message, QmpError> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(line) = self.lines.next_line()? {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return parse_message(&line);
            }
            let n = timeout_at(deadline, self.stream.read(&mut buf))
                .await
                .map_err(|_| timeout(what))?
                .map_err(QmpError::Io)?;
            if n == 0 {
                return Err(QmpError::Closed);
            }
            self.lines.push(&buf[..n]);
        }
    }
}

fn timeout(what: &str) -> QmpError {
    QmpError::Timeout {
        what: what.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_message_kind() {
        let greeting = br#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#;
        assert_eq!(parse_message(greeting).unwrap(), Message::Greeting);
        assert_eq!(
            parse_message(br#"{"return": {}, "id": 3}"#).unwrap(),
            Message::Return {
                id: Some(3),
                value: json!({})
            }
        );
        assert_eq!(
            parse_message(
                br#"{"id": 4, "error": {"class": "GenericError", "desc": "File descriptor named '5' has not been found"}}"#
            )
            .unwrap(),
            Message::Error {
                id: Some(4),
                class: "GenericError".into(),
                desc: "File descriptor named '5' has not been found".into()
            }
        );
        assert_eq!(
            parse_message(br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "MIGRATION", "data": {"status": "completed"}}"#).unwrap(),
            Message::Event {
                name: "MIGRATION".into(),
                data: json!({"status": "completed"})
            }
        );
    }

    #[test]
    fn rejects_hostile_lines() {
        for bad in [
            &b"not json"[..],
            b"[1,2]",
            b"{}",
            b"\xff\xfe",
            b"{\"event\": 5}",
        ] {
            assert!(parse_message(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn lines_are_split_and_bounded() {
        let mut lines = LineBuffer::default();
        lines.push(b"{\"a\":1}\r\n{\"b\"");
        assert_eq!(lines.next_line().unwrap(), Some(b"{\"a\":1}".to_vec()));
        assert_eq!(lines.next_line().unwrap(), None);
        lines.push(b":2}\n");
        assert_eq!(lines.next_line().unwrap(), Some(b"{\"b\":2}".to_vec()));
        lines.push(&vec![b'x'; MAX_LINE + 1]);
        assert!(matches!(lines.next_line(), Err(QmpError::LineTooLong)));
    }

    #[tokio::test]
    async fn commands_match_replies_by_id_and_queue_events() {
        let (host, qemu) = UnixStream::pair().unwrap();
        let fake = tokio::spawn(async move {
            let (read, mut write) = qemu.into_split();
            let mut read = tokio::io::BufReader::new(read);
            write
                .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .await
                .unwrap();
            let mut line = String::new();
            for _ in 0..2 {
                line.clear();
                tokio::io::AsyncBufReadExt::read_line(&mut read, &mut line)
                    .await
                    .unwrap();
                let request: Value = serde_json::from_str(&line).unwrap();
                let id = request["id"].as_u64().unwrap();
                let answer = match request["execute"].as_str().unwrap() {
                    "qmp_capabilities" => format!("{{\"return\": {{}}, \"id\": {id}}}\n"),
                    // A stale reply and an event come before the real answer.
                    _ => format!(
                        "{{\"return\": {{}}, \"id\": 999}}\n{{\"event\": \"STOP\"}}\n{{\"error\": {{\"class\": \"GenericError\", \"desc\": \"no\"}}, \"id\": {id}}}\n"
                    ),
                };
                write.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let mut qmp = Qmp::handshake(host, deadline).await.unwrap();
        let err = qmp.execute("stop", None, deadline).await.unwrap_err();
        assert!(
            matches!(&err, QmpError::Command { command, desc, .. } if command == "stop" && desc == "no"),
            "{err}"
        );
        qmp.wait_event("STOP", |_| true, deadline).await.unwrap();
        fake.await.unwrap();
        let short = Instant::now() + std::time::Duration::from_millis(50);
        assert!(matches!(
            qmp.wait_event("RESUME", |_| true, short).await,
            Err(QmpError::Timeout { .. } | QmpError::Closed)
        ));
    }
}
