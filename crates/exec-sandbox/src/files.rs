//! Files in a VM's home directory (`/home/user`): write, read and list over the control
//! channel, streamed in chunks both ways so no file is ever held whole in memory.
//!
//! Paths are relative to the home directory. Their form and the size limit are checked here
//! before anything is sent; the guest agent checks again and is the authority: it resolves every
//! path beneath the home directory, so a symbolic link planted by user code never leads out of
//! it. Writes are atomic in the guest (temporary file, then rename), owned by the sandbox user,
//! mode 0644 or 0755. Each operation is its own request on the multiplexed channel, so it runs
//! alongside an execution on the same VM.
//!
//! A deadline ([`limits::FILE_IO_DEADLINE`]) bounds every wait for an answer, and the channel's
//! own write deadline every frame sent; a frame that misses it closes the channel, so the VM is
//! discarded after a [`FileError::Timeout`] or [`FileError::Channel`].

use sbx_protocol::{Event, FILE_CHUNK, FileEntry, GuestErrorKind, MAX_LIST_ENTRIES, Request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::Error;
use crate::error_kind::ErrorKind;
use crate::limits;
use crate::validate::{self, ValidationError};
use crate::vm::channel::Subscription;
use crate::vm::{ChannelError, Link};

/// Why a file operation failed after validation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    /// The guest refused the request (missing file, not a regular file, a path through a
    /// symbolic link or out of the home directory, no space left, ...).
    #[error("{message}")]
    Refused {
        /// The agent's explanation.
        message: String,
    },
    /// The guest failed internally.
    #[error("guest agent failed: {message}")]
    Guest {
        /// The agent's explanation.
        message: String,
    },
    /// The local source could not be read or the local destination written.
    #[error("local I/O failed")]
    Local(#[source] std::io::Error),
    /// The source produced a different number of bytes than announced.
    #[error("source produced {actual} bytes, {announced} were announced")]
    SizeMismatch {
        /// The announced size.
        announced: u64,
        /// Bytes the source produced (up to the first one too many).
        actual: u64,
    },
    /// The directory holds more entries than one listing carries.
    #[error("directory holds more than {MAX_LIST_ENTRIES} entries")]
    TooManyEntries,
    /// The control channel failed.
    #[error("control channel of VM {vm} failed")]
    Channel {
        /// VM name.
        vm: String,
        /// Cause.
        #[source]
        source: ChannelError,
    },
    /// The guest did not answer or accept data in time.
    #[error("guest did not respond within {} s", limits::FILE_IO_DEADLINE.as_secs())]
    Timeout,
    /// The guest answered something that does not belong to this operation.
    #[error("unexpected answer from the guest: {event}")]
    Protocol {
        /// The answer's name.
        event: &'static str,
    },
    /// The guest sent more than a file may hold.
    #[error("guest sent more than {} bytes", limits::MAX_FILE_BYTES)]
    Oversized,
}

impl FileError {
    /// The stable kind: refusals and bad sources are the caller's; a broken guest or channel
    /// leaves the outcome unknown (a write may or may not have landed).
    pub fn kind(&self) -> ErrorKind {
        match self {
            FileError::Refused { .. } | FileError::SizeMismatch { .. } => ErrorKind::InvalidInput,
            FileError::TooManyEntries | FileError::Local(_) => ErrorKind::Permanent,
            FileError::Guest { .. }
            | FileError::Channel { .. }
            | FileError::Timeout
            | FileError::Protocol { .. }
            | FileError::Oversized => ErrorKind::OutcomeUnknown,
        }
    }
}

fn file_error<'a>(op: &'static str, path: &'a str) -> impl Fn(FileError) -> Error + 'a {
    move |source| Error::File {
        op,
        path: path.chars().take(256).collect(),
        source,
    }
}

/// An answer that does not belong here, named (never its payload, which the guest controls).
fn unexpected(event: &Event) -> FileError {
    FileError::Protocol {
        event: event.name(),
    }
}

fn guest_error(e: sbx_protocol::GuestError) -> FileError {
    match e.kind {
        GuestErrorKind::InvalidRequest => FileError::Refused { message: e.message },
        _ => FileError::Guest { message: e.message },
    }
}

fn channel_error(vm: Link<'_>) -> impl Fn(ChannelError) -> FileError + '_ {
    move |source| match source {
        ChannelError::WriteTimeout { .. } => FileError::Timeout,
        source => FileError::Channel {
            vm: vm.name.to_string(),
            source,
        },
    }
}

async fn next_event(vm: Link<'_>, events: &mut Subscription) -> Result<Event, FileError> {
    match tokio::time::timeout(limits::FILE_IO_DEADLINE, events.recv()).await {
        Ok(Some(event)) => Ok(event),
        Ok(None) => Err(channel_error(vm)(ChannelError::Closed)),
        Err(_) => Err(FileError::Timeout),
    }
}

/// Sends one more frame of the request `id`; the channel's write deadline bounds the wait.
async fn send(vm: Link<'_>, id: u32, request: &Request) -> Result<(), FileError> {
    vm.channel
        .send(id, request)
        .await
        .map_err(channel_error(vm))
}

/// Reads from `source` until `buf` is full or the source ends; returns the bytes read.
async fn fill(source: &mut (impl AsyncRead + Unpin), buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = source.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

/// Writes everything `source` produces to `path` (relative to `/home/user`) in the VM, creating
/// missing parent directories; mode 0755 if `executable`, else 0644. Returns the bytes written.
///
/// When `size` is given it is checked against [`limits::MAX_FILE_BYTES`] before anything is
/// sent, and the source must produce exactly that many bytes; without it the limit is enforced
/// while streaming. On any failure the guest keeps no partial file (an existing file at `path`
/// is left as it was).
pub(crate) async fn write_file(
    vm: Link<'_>,
    path: &str,
    mut source: impl AsyncRead + Unpin,
    size: Option<u64>,
    executable: bool,
) -> Result<u64, Error> {
    validate::guest_path(path, false)?;
    if let Some(size) = size {
        validate::file_size(size)?;
    }
    let mut events = vm
        .channel
        .request(&Request::WriteFile {
            path: path.to_string(),
            size,
            executable,
        })
        .await
        .map_err(channel_error(vm))
        .map_err(file_error("write", path))?;
    let id = events.id();
    let result = stream_to_guest(vm, &mut events, &mut source, size).await;
    if result.is_err() {
        // Best effort: the guest removes its temporary file on abort (or after its idle
        // timeout if this does not arrive).
        let _ = vm.channel.send(id, &Request::FileAbort).await;
    }
    result.map_err(|e| match e {
        Streamed::TooLarge(size) => Error::Validation(ValidationError::FileTooLarge { size }),
        Streamed::Failed(e) => file_error("write", path)(e),
    })
}

enum Streamed {
    TooLarge(u64),
    Failed(FileError),
}

impl From<FileError> for Streamed {
    fn from(e: FileError) -> Self {
        Streamed::Failed(e)
    }
}

async fn stream_to_guest(
    vm: Link<'_>,
    events: &mut Subscription,
    source: &mut (impl AsyncRead + Unpin),
    size: Option<u64>,
) -> Result<u64, Streamed> {
    let id = events.id();
    let mut buf = vec![0u8; FILE_CHUNK];
    let mut sent = 0u64;
    loop {
        // The guest may refuse at any time (bad path, no space): stop sending then.
        match events.try_recv() {
            None => {}
            Some(Event::Error(e)) => return Err(guest_error(e).into()),
            Some(other) => return Err(unexpected(&other).into()),
        }
        let n = fill(source, &mut buf).await.map_err(FileError::Local)?;
        if n == 0 {
            break;
        }
        sent += n as u64;
        match size {
            Some(announced) if sent > announced => {
                return Err(FileError::SizeMismatch {
                    announced,
                    actual: sent,
                }
                .into());
            }
            None if sent > limits::MAX_FILE_BYTES => return Err(Streamed::TooLarge(sent)),
            _ => {}
        }
        send(vm, id, &Request::FileData(buf[..n].to_vec())).await?;
    }
    if let Some(announced) = size.filter(|announced| *announced != sent) {
        return Err(FileError::SizeMismatch {
            announced,
            actual: sent,
        }
        .into());
    }
    send(vm, id, &Request::FileEnd).await?;
    match next_event(vm, events).await? {
        Event::FileWritten { size } if size == sent => Ok(size),
        Event::Error(e) => Err(guest_error(e).into()),
        other => Err(unexpected(&other).into()),
    }
}

/// Copies the regular file at `path` (relative to `/home/user`) in the VM to `dest`, chunk by
/// chunk; returns the bytes copied. Symbolic links are followed only while they stay beneath
/// the home directory. On failure `dest` may have received part of the file.
pub(crate) async fn read_file(
    vm: Link<'_>,
    path: &str,
    mut dest: impl AsyncWrite + Unpin,
) -> Result<u64, Error> {
    validate::guest_path(path, false)?;
    let result = async {
        let mut events = vm
            .channel
            .request(&Request::ReadFile {
                path: path.to_string(),
            })
            .await
            .map_err(channel_error(vm))?;
        let mut received = 0u64;
        loop {
            match next_event(vm, &mut events).await? {
                Event::FileData(bytes) => {
                    received += bytes.len() as u64;
                    if received > limits::MAX_FILE_BYTES {
                        return Err(FileError::Oversized);
                    }
                    dest.write_all(&bytes).await.map_err(FileError::Local)?;
                }
                Event::FileEnd { size } if size == received => {
                    dest.flush().await.map_err(FileError::Local)?;
                    return Ok(received);
                }
                Event::Error(e) => return Err(guest_error(e)),
                other => return Err(unexpected(&other)),
            }
        }
    }
    .await;
    result.map_err(file_error("read", path))
}

/// Lists the directory at `path` (relative to `/home/user`; `""` or `"."` is the home directory
/// itself), sorted by name. Sizes are allocated sizes (a sparse file reports what it occupies).
/// A directory with more than [`MAX_LIST_ENTRIES`] entries is an error
/// ([`FileError::TooManyEntries`]): list it by running code instead.
pub(crate) async fn list_files(vm: Link<'_>, path: &str) -> Result<Vec<FileEntry>, Error> {
    validate::guest_path(path, true)?;
    let result = async {
        let mut events = vm
            .channel
            .request(&Request::ListFiles {
                path: path.to_string(),
            })
            .await
            .map_err(channel_error(vm))?;
        match next_event(vm, &mut events).await? {
            Event::FileList {
                truncated: true, ..
            } => Err(FileError::TooManyEntries),
            Event::FileList { entries, .. } if entries.len() <= MAX_LIST_ENTRIES => Ok(entries),
            Event::Error(e) => Err(guest_error(e)),
            other => Err(unexpected(&other)),
        }
    }
    .await;
    result.map_err(file_error("list", path))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;
    use std::sync::OnceLock;
    use std::time::Duration;

    use sbx_protocol::{ExecRequest, Language};

    use super::*;
    use crate::vm::Channel;

    /// A directory removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!(
                "exec-sandbox-files-{}-{tag}-{n}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The embedded agent, copied once to an executable file.
    fn agent_binary() -> &'static PathBuf {
        static BINARY: OnceLock<(TempDir, PathBuf)> = OnceLock::new();
        &BINARY
            .get_or_init(|| {
                let dir = TempDir::new("bin");
                let path = dir.0.join("sbx-agent");
                std::fs::copy(env!("SBX_AGENT_PATH"), &path).unwrap();
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
                (dir, path)
            })
            .1
    }

    /// The guest agent in dev mode (`--stdio`) behind a real [`Channel`].
    struct Agent {
        channel: Channel,
        home: TempDir,
        _run: TempDir,
        _child: tokio::process::Child,
    }

    impl Agent {
        async fn start() -> Agent {
            let home = TempDir::new("home");
            let run = TempDir::new("run");
            let mut command = tokio::process::Command::new(agent_binary());
            command
                .args(["--stdio", "--no-setuid"])
                .env("SBX_AGENT_HOME", &home.0)
                .env("SBX_AGENT_RUN_DIR", &run.0)
                .env("SBX_AGENT_BASH", "/bin/bash")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true);
            // A concurrent fork may still hold the copy open for writing: retry ETXTBSY.
            let mut child = None;
            for _ in 0..50 {
                match command.spawn() {
                    Ok(c) => {
                        child = Some(c);
                        break;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => panic!("spawn agent: {e}"),
                }
            }
            let mut child = child.expect("agent binary stayed busy");
            let stdout = child.stdout.take().unwrap();
            let stdin = child.stdin.take().unwrap();
            let channel = Channel::new(tokio::io::join(stdout, stdin));
            tokio::time::timeout(Duration::from_secs(10), channel.hello())
                .await
                .unwrap()
                .unwrap();
            Agent {
                channel,
                home,
                _run: run,
                _child: child,
            }
        }

        fn link(&self) -> Link<'_> {
            Link {
                channel: &self.channel,
                name: "dev-agent",
            }
        }

        fn temp_files(&self) -> Vec<String> {
            let mut found = Vec::new();
            let mut dirs = vec![self.home.0.clone()];
            while let Some(dir) = dirs.pop() {
                for entry in std::fs::read_dir(dir).unwrap().flatten() {
                    if entry.file_type().unwrap().is_dir() {
                        dirs.push(entry.path());
                    } else if entry.file_name().to_string_lossy().ends_with(".tmp") {
                        found.push(entry.path().display().to_string());
                    }
                }
            }
            found
        }
    }

    fn pseudo_random(len: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[3]
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn round_trip_through_a_dev_agent() {
        let agent = Agent::start().await;
        let data = pseudo_random(3 * FILE_CHUNK + 12_345);
        let written = write_file(
            agent.link(),
            "dir/sub/data.bin",
            &data[..],
            Some(data.len() as u64),
            true,
        )
        .await
        .unwrap();
        assert_eq!(written, data.len() as u64);
        let on_disk = agent.home.0.join("dir/sub/data.bin");
        assert_eq!(std::fs::read(&on_disk).unwrap(), data);
        let mode = std::fs::metadata(&on_disk).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o755);

        let mut back = Vec::new();
        let read = read_file(agent.link(), "dir/sub/data.bin", &mut back)
            .await
            .unwrap();
        assert_eq!((read, back == data), (data.len() as u64, true));

        // Unknown size, empty file.
        assert_eq!(
            write_file(agent.link(), "empty", &b""[..], None, false)
                .await
                .unwrap(),
            0
        );
        let mut back = Vec::new();
        read_file(agent.link(), "empty", &mut back).await.unwrap();
        assert!(back.is_empty());

        let entries = list_files(agent.link(), "").await.unwrap();
        let names: Vec<_> = entries
            .iter()
            .map(|e| (e.name.as_str(), e.is_dir))
            .collect();
        assert_eq!(names, [("dir", true), ("empty", false)]);
        let entries = list_files(agent.link(), "dir/sub").await.unwrap();
        assert!(entries[0].size >= data.len() as u64, "{entries:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_input_is_rejected_before_transfer() {
        let agent = Agent::start().await;
        let e = write_file(
            agent.link(),
            "huge",
            &b""[..],
            Some(limits::MAX_FILE_BYTES + 1),
            false,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(e, Error::Validation(ValidationError::FileTooLarge { .. })),
            "{e:?}"
        );
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        for path in ["/etc/passwd", "../x", "a/../../b", "a\0b", ""] {
            let e = write_file(agent.link(), path, &b"x"[..], None, false)
                .await
                .unwrap_err();
            assert!(matches!(e, Error::Validation(_)), "{path:?}: {e:?}");
            let e = read_file(agent.link(), path, Vec::new()).await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{path:?}");
        }
        assert!(matches!(
            list_files(agent.link(), "/").await,
            Err(Error::Validation(_))
        ));
        assert_eq!(std::fs::read_dir(&agent.home.0).unwrap().count(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn short_or_long_source_leaves_no_file() {
        let agent = Agent::start().await;
        let data = vec![1u8; FILE_CHUNK + 10];
        let e = write_file(
            agent.link(),
            "long",
            &data[..],
            Some(FILE_CHUNK as u64),
            false,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                &e,
                Error::File {
                    source: FileError::SizeMismatch { .. },
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        let e = write_file(
            agent.link(),
            "short",
            &data[..],
            Some(10 * FILE_CHUNK as u64),
            false,
        )
        .await
        .unwrap_err();
        assert!(matches!(
            &e,
            Error::File {
                source: FileError::SizeMismatch { .. },
                ..
            }
        ));
        // The aborts reach the guest, which removes its temporary files.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !agent.temp_files().is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{:?}",
                agent.temp_files()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(std::fs::read_dir(&agent.home.0).unwrap().count(), 0);
        write_file(agent.link(), "after", &b"ok"[..], Some(2), false)
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn guest_refusals_are_invalid_input() {
        let agent = Agent::start().await;
        std::os::unix::fs::symlink("/etc/passwd", agent.home.0.join("passwd")).unwrap();
        let e = read_file(agent.link(), "passwd", Vec::new())
            .await
            .unwrap_err();
        assert!(
            matches!(
                &e,
                Error::File {
                    source: FileError::Refused { .. },
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        let e = read_file(agent.link(), "missing", Vec::new())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        std::os::unix::fs::symlink("/tmp", agent.home.0.join("tmp")).unwrap();
        let e = write_file(agent.link(), "tmp/x", &b"x"[..], Some(1), false)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn files_work_while_an_exec_runs() {
        let agent = Agent::start().await;
        let mut exec = agent
            .channel
            .request(&Request::Exec(ExecRequest {
                language: Language::Raw,
                code: "sleep 2; echo done".into(),
                timeout_ms: 20_000,
                env: Vec::new(),
                stdout_limit: 1000,
                stderr_limit: 1000,
            }))
            .await
            .unwrap();
        write_file(agent.link(), "during", &b"x"[..], Some(1), false)
            .await
            .unwrap();
        assert_eq!(list_files(agent.link(), ".").await.unwrap().len(), 1);
        assert!(exec.try_recv().is_none(), "exec finished too early");
        let mut stdout = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(20), exec.recv())
                .await
                .unwrap()
            {
                Some(Event::Stdout(bytes)) => stdout.extend(bytes),
                Some(Event::ExecDone(outcome)) => {
                    assert_eq!(outcome.exit_code, 0);
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(stdout, b"done\n");
    }
}
