//! File requests: write, read and list files under the sandbox user's home directory.
//!
//! Paths are relative to the home directory. They are checked lexically first (no absolute
//! path, no `..`, no NUL, components of at most [`MAX_NAME_BYTES`] bytes, at most
//! [`MAX_PATH_BYTES`] in all), then resolved by the kernel with `openat2(RESOLVE_BENEATH)` from
//! a descriptor of the home directory, so a symbolic link planted by user code can never lead
//! out of it, however it was made:
//!
//! - reads and listings follow links only while they stay beneath the home directory;
//! - writes follow no link at all on the way to the target's directory (`RESOLVE_NO_SYMLINKS`
//!   at each step), and replace a link named like the target rather than following it.
//!
//! A write goes to a temporary file in the target's directory, created by the agent with
//! `O_EXCL`, owned by the sandbox user and given its final mode before any data; it is renamed
//! over the target only once every byte arrived, so an aborted or failed write leaves no
//! partial file. Data arrives in chunks through a small queue: neither side holds a whole file.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use sbx_protocol::{
    Event, FILE_CHUNK, FileEntry, GuestErrorKind, MAX_FILE_SIZE, MAX_LIST_ENTRIES, MAX_NAME_BYTES,
    MAX_PATH_BYTES,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::config::{FILE_READ_CHUNK, MAX_UPLOADS, SANDBOX_GID, SANDBOX_UID, UPLOAD_IDLE_TIMEOUT};
use crate::context::Context;
use crate::log;
use crate::outbox::Outbox;
use crate::sys;

/// Chunks queued per upload before the dispatcher waits for the disk (bounds memory to a few
/// chunks per upload).
const UPLOAD_QUEUE: usize = 4;

/// Resolution for reads and listings: links are followed, but only beneath the home directory.
const BENEATH: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_MAGICLINKS);
/// Resolution on the way to a write target: no link at all.
const NO_LINKS: ResolveFlags = BENEATH.union(ResolveFlags::NO_SYMLINKS);

/// Why a file request failed.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The request broke a rule (path form, size limit, chunk size).
    #[error("{0}")]
    Invalid(String),
    /// A system call on the path failed.
    #[error("`{path}`: cannot {action}: {}", describe(.source))]
    Io {
        /// The path as requested.
        path: String,
        /// What was being done.
        action: &'static str,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// The host aborted the write (or went away): nothing to answer.
    #[error("write aborted")]
    Aborted,
}

impl FileError {
    fn kind(&self) -> GuestErrorKind {
        match self {
            FileError::Invalid(_) | FileError::Aborted => GuestErrorKind::InvalidRequest,
            FileError::Io { source, .. } => match errno(source) {
                Some(
                    Errno::NOENT
                    | Errno::XDEV
                    | Errno::LOOP
                    | Errno::NOTDIR
                    | Errno::ISDIR
                    | Errno::EXIST
                    | Errno::NOTEMPTY
                    | Errno::NAMETOOLONG
                    | Errno::FBIG
                    | Errno::NOSPC
                    | Errno::DQUOT,
                ) => GuestErrorKind::InvalidRequest,
                _ => GuestErrorKind::Internal,
            },
        }
    }
}

/// The system error number behind `error`, if it has one.
fn errno(error: &io::Error) -> Option<Errno> {
    error.raw_os_error().map(Errno::from_raw_os_error)
}

/// Plain words for the errors a caller can cause.
fn describe(error: &io::Error) -> String {
    match errno(error) {
        Some(Errno::XDEV) => "the path leads out of the home directory".into(),
        Some(Errno::LOOP) => "the path goes through a symbolic link".into(),
        Some(Errno::NOENT) => "no such file or directory".into(),
        Some(Errno::NOTDIR) => "a path component is not a directory".into(),
        Some(Errno::ISDIR) => "it is a directory".into(),
        Some(Errno::NOSPC) => "no space left in the home directory".into(),
        _ => error.to_string(),
    }
}

fn io_error<'a>(path: &'a str, action: &'static str) -> impl FnOnce(io::Error) -> FileError + 'a {
    move |source| FileError::Io {
        path: path.to_string(),
        action,
        source,
    }
}

/// Checks a path's form; returns its components (without `.` and empty ones). An empty list
/// means the home directory itself.
pub fn components(path: &str) -> Result<Vec<&str>, FileError> {
    if path.len() > MAX_PATH_BYTES {
        return Err(FileError::Invalid(format!(
            "path is {} bytes, limit is {MAX_PATH_BYTES}",
            path.len()
        )));
    }
    if path.contains('\0') {
        return Err(FileError::Invalid("path contains a NUL byte".into()));
    }
    if path.starts_with('/') {
        return Err(FileError::Invalid(format!(
            "path `{path}` is absolute; paths are relative to the home directory"
        )));
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(FileError::Invalid(format!("path `{path}` contains `..`")));
            }
            name if name.len() > MAX_NAME_BYTES => {
                return Err(FileError::Invalid(format!(
                    "path component is {} bytes, limit is {MAX_NAME_BYTES}",
                    name.len()
                )));
            }
            name => parts.push(name),
        }
    }
    Ok(parts)
}

fn open_home(ctx: &Context) -> Result<OwnedFd, FileError> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    rustix::fs::open(&ctx.config.home, flags, Mode::empty())
        .map_err(|e| io_error("", "open the home directory")(e.into()))
}

async fn answer(out: &Outbox, id: u32, result: Result<Event, FileError>) {
    let event = match result {
        Ok(event) => event,
        Err(FileError::Aborted) => return,
        Err(e) => {
            let kind = e.kind();
            if kind == GuestErrorKind::Internal {
                log::warn(format_args!("file request {id}: {e}"));
            }
            Event::Error(sbx_protocol::GuestError {
                kind,
                message: e.to_string(),
            })
        }
    };
    let _ = out.send(id, &event).await;
}

// ---------------------------------------------------------------------------------------------
// Read

/// Serves a `ReadFile`: streams the file as `FileData` chunks, then `FileEnd`.
pub async fn read(ctx: Arc<Context>, out: Outbox, id: u32, path: String) {
    let result = read_inner(&ctx, &out, id, &path).await;
    answer(&out, id, result).await;
}

async fn read_inner(ctx: &Context, out: &Outbox, id: u32, path: &str) -> Result<Event, FileError> {
    let parts = components(path)?;
    if parts.is_empty() {
        return Err(FileError::Invalid("path names no file".into()));
    }
    let home = open_home(ctx)?;
    // O_NONBLOCK: opening a FIFO planted by user code must not hang; it is refused below.
    let fd = sys::openat2(
        home.as_fd(),
        parts.join("/").as_bytes(),
        OFlags::RDONLY | OFlags::NOCTTY | OFlags::NONBLOCK,
        0,
        BENEATH,
    )
    .map_err(io_error(path, "open"))?;
    let file = File::from(fd);
    let meta = file.metadata().map_err(io_error(path, "stat"))?;
    if !meta.is_file() {
        return Err(FileError::Invalid(format!(
            "`{path}` is not a regular file"
        )));
    }
    if meta.len() > MAX_FILE_SIZE {
        return Err(FileError::Invalid(format!(
            "`{path}` is {} bytes, limit is {MAX_FILE_SIZE}",
            meta.len()
        )));
    }
    // Bytes appended while we read are not sent: the answer is bounded by the size at open.
    let mut reader = tokio::fs::File::from_std(file).take(meta.len());
    let mut sent = 0u64;
    let mut buf = vec![0u8; FILE_READ_CHUNK];
    loop {
        let n = reader
            .read(&mut buf)
            .await
            .map_err(io_error(path, "read"))?;
        if n == 0 {
            return Ok(Event::FileEnd { size: sent });
        }
        sent += n as u64;
        if out
            .send(id, &Event::FileData(buf[..n].to_vec()))
            .await
            .is_err()
        {
            return Err(FileError::Aborted);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// List

/// Serves a `ListFiles`: one `FileList` answer.
pub async fn list(ctx: Arc<Context>, out: Outbox, id: u32, path: String) {
    let result = tokio::task::spawn_blocking(move || list_blocking(&ctx, &path))
        .await
        .unwrap_or_else(|e| Err(FileError::Invalid(format!("listing failed: {e}"))));
    answer(&out, id, result).await;
}

fn list_blocking(ctx: &Context, path: &str) -> Result<Event, FileError> {
    let parts = components(path)?;
    let home = open_home(ctx)?;
    let dir = if parts.is_empty() {
        home
    } else {
        sys::openat2(
            home.as_fd(),
            parts.join("/").as_bytes(),
            OFlags::RDONLY | OFlags::DIRECTORY,
            0,
            BENEATH,
        )
        .map_err(io_error(path, "open the directory"))?
    };
    // Reading through the descriptor's /proc link lists exactly the directory resolved above,
    // even if user code renames things meanwhile; entries are stat'ed without following links.
    let proc_link = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&dir));
    let entries = std::fs::read_dir(&proc_link).map_err(io_error(path, "list"))?;
    let mut listed = Vec::new();
    let mut truncated = false;
    for entry in entries {
        let Ok(entry) = entry else { continue };
        if listed.len() == MAX_LIST_ENTRIES {
            truncated = true;
            break;
        }
        // An entry removed since readdir is simply not listed.
        let Ok(meta) = entry.metadata() else { continue };
        listed.push(FileEntry {
            name: entry.file_name().to_string_lossy().into_owned(),
            is_dir: meta.is_dir(),
            size: meta.blocks().saturating_mul(512),
        });
    }
    drop(dir);
    listed.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Event::FileList {
        entries: listed,
        truncated,
    })
}

// ---------------------------------------------------------------------------------------------
// Write

/// What the dispatcher forwards to an upload.
#[derive(Debug)]
enum Chunk {
    Data(Vec<u8>),
    End,
}

/// The uploads in progress, by request id. Owned by the dispatcher.
#[derive(Debug, Default)]
pub struct Uploads {
    queues: HashMap<u32, mpsc::Sender<Chunk>>,
}

impl Uploads {
    /// Starts the upload `id` (a `WriteFile` request).
    pub async fn start(
        &mut self,
        ctx: &Arc<Context>,
        out: &Outbox,
        id: u32,
        path: String,
        size: Option<u64>,
        executable: bool,
    ) {
        self.queues.retain(|_, queue| !queue.is_closed());
        if self.queues.len() >= MAX_UPLOADS {
            let message = format!("{MAX_UPLOADS} writes already in progress");
            let _ = out.error(id, GuestErrorKind::InvalidRequest, message).await;
            return;
        }
        let (tx, rx) = mpsc::channel(UPLOAD_QUEUE);
        // A reused id replaces (and so aborts) the older upload.
        self.queues.insert(id, tx);
        let write = Write {
            ctx: ctx.clone(),
            path,
            size,
            executable,
        };
        let out = out.clone();
        tokio::spawn(async move {
            let result = write.run(rx).await;
            answer(&out, id, result).await;
        });
    }

    /// Forwards a chunk; data for an unknown or failed upload is dropped (its error was sent).
    pub async fn data(&mut self, id: u32, bytes: Vec<u8>) {
        self.forward(id, Chunk::Data(bytes)).await;
    }

    /// Ends upload `id`.
    pub async fn end(&mut self, id: u32) {
        self.forward(id, Chunk::End).await;
        self.queues.remove(&id);
    }

    /// Aborts upload `id`: its task sees the queue close and removes the temporary file.
    pub fn abort(&mut self, id: u32) {
        self.queues.remove(&id);
    }

    async fn forward(&mut self, id: u32, chunk: Chunk) {
        let Some(queue) = self.queues.get(&id) else {
            return;
        };
        // Waits while the upload's queue is full: the disk paces the host.
        if queue.send(chunk).await.is_err() {
            self.queues.remove(&id);
        }
    }
}

struct Write {
    ctx: Arc<Context>,
    path: String,
    size: Option<u64>,
    executable: bool,
}

/// A temporary file removed on drop unless it was renamed into place.
struct TempFile {
    dir: OwnedFd,
    name: String,
    committed: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = rustix::fs::unlinkat(&self.dir, &self.name, AtFlags::empty());
        }
    }
}

impl Write {
    async fn run(self, mut chunks: mpsc::Receiver<Chunk>) -> Result<Event, FileError> {
        let path = self.path.as_str();
        let parts = components(path)?;
        let Some((name, parents)) = parts.split_last() else {
            return Err(FileError::Invalid("path names no file".into()));
        };
        let limit = match self.size {
            Some(size) if size > MAX_FILE_SIZE => {
                return Err(FileError::Invalid(format!(
                    "file is {size} bytes, limit is {MAX_FILE_SIZE}"
                )));
            }
            Some(size) => size,
            None => MAX_FILE_SIZE,
        };
        let dir = self.parent_dir(parents)?;
        let (temp, file) = self.create_temp(dir)?;
        let mut file = tokio::fs::File::from_std(file);
        let mut written = 0u64;
        loop {
            let chunk = tokio::time::timeout(UPLOAD_IDLE_TIMEOUT, chunks.recv())
                .await
                .map_err(|_| {
                    FileError::Invalid(format!(
                        "no data for {} s; write abandoned",
                        UPLOAD_IDLE_TIMEOUT.as_secs()
                    ))
                })?;
            match chunk {
                None => return Err(FileError::Aborted),
                Some(Chunk::Data(bytes)) => {
                    if bytes.len() > FILE_CHUNK {
                        return Err(FileError::Invalid(format!(
                            "data chunk is {} bytes, limit is {FILE_CHUNK}",
                            bytes.len()
                        )));
                    }
                    written += bytes.len() as u64;
                    if written > limit {
                        return Err(FileError::Invalid(match self.size {
                            Some(size) => format!("more data than the announced {size} bytes"),
                            None => format!("file exceeds the limit of {MAX_FILE_SIZE} bytes"),
                        }));
                    }
                    file.write_all(&bytes)
                        .await
                        .map_err(io_error(path, "write"))?;
                }
                Some(Chunk::End) => break,
            }
        }
        if let Some(size) = self.size.filter(|size| *size != written) {
            return Err(FileError::Invalid(format!(
                "announced {size} bytes, received {written}"
            )));
        }
        file.flush().await.map_err(io_error(path, "write"))?;
        drop(file);
        let mut temp = temp;
        rustix::fs::renameat(&temp.dir, &temp.name, &temp.dir, *name)
            .map_err(|e| io_error(path, "rename into place")(e.into()))?;
        temp.committed = true;
        Ok(Event::FileWritten { size: written })
    }

    /// Walks to the target's directory from the home directory, creating missing directories
    /// (owned by the sandbox user) and following no symbolic link.
    fn parent_dir(&self, parents: &[&str]) -> Result<OwnedFd, FileError> {
        let path = self.path.as_str();
        let mut dir = open_home(&self.ctx)?;
        for part in parents {
            let open = |dir: &OwnedFd| {
                sys::openat2(
                    dir.as_fd(),
                    part.as_bytes(),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW,
                    0,
                    NO_LINKS,
                )
            };
            let next = match open(&dir) {
                Ok(next) => next,
                Err(e) if errno(&e) == Some(Errno::NOENT) => {
                    let mode = Mode::from_raw_mode(0o755);
                    let created = match rustix::fs::mkdirat(&dir, *part, mode) {
                        Ok(()) => true,
                        // Made by someone else meanwhile: use it (if it is a real directory).
                        Err(Errno::EXIST) => false,
                        Err(e) => return Err(io_error(path, "create a directory")(e.into())),
                    };
                    let next = open(&dir).map_err(io_error(path, "open a directory"))?;
                    if created {
                        let perms = std::fs::Permissions::from_mode(0o755);
                        let next = File::from(next);
                        next.set_permissions(perms)
                            .map_err(io_error(path, "set a directory's mode"))?;
                        self.chown(next.as_fd())?;
                        OwnedFd::from(next)
                    } else {
                        next
                    }
                }
                Err(e) => return Err(io_error(path, "open a directory")(e)),
            };
            dir = next;
        }
        Ok(dir)
    }

    fn create_temp(&self, dir: OwnedFd) -> Result<(TempFile, File), FileError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let path = self.path.as_str();
        let name = format!(
            ".sbx-write-{}-{}.tmp",
            rustix::process::getpid().as_raw_pid(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let fd = sys::openat2(
            dir.as_fd(),
            name.as_bytes(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW,
            0o600,
            NO_LINKS,
        )
        .map_err(io_error(path, "create a temporary file"))?;
        let temp = TempFile {
            dir,
            name,
            committed: false,
        };
        let file = File::from(fd);
        let mode = if self.executable { 0o755 } else { 0o644 };
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io_error(path, "set the file's mode"))?;
        self.chown(file.as_fd())?;
        Ok((temp, file))
    }

    fn chown(&self, fd: std::os::fd::BorrowedFd<'_>) -> Result<(), FileError> {
        // Dev mode (not root) keeps the agent's own user.
        if !self.ctx.config.drop_privileges {
            return Ok(());
        }
        let owner = rustix::fs::Uid::from_raw(SANDBOX_UID);
        let group = rustix::fs::Gid::from_raw(SANDBOX_GID);
        rustix::fs::fchown(fd, Some(owner), Some(group))
            .map_err(|e| io_error(&self.path, "change the owner")(e.into()))
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn path_forms() {
        assert_eq!(components("a/b.txt").unwrap(), vec!["a", "b.txt"]);
        assert_eq!(components("./a//b/").unwrap(), vec!["a", "b"]);
        assert!(components("").unwrap().is_empty());
        assert!(components(".").unwrap().is_empty());
        assert!(components("..a/b..").is_ok(), "dots inside names are fine");
        for bad in ["/etc/passwd", "../x", "a/../../x", "a/..", "a\0b", "/"] {
            assert!(components(bad).is_err(), "{bad:?} accepted");
        }
        assert!(components(&"n".repeat(MAX_NAME_BYTES)).is_ok());
        assert!(components(&"n".repeat(MAX_NAME_BYTES + 1)).is_err());
        let long = vec!["d"; MAX_PATH_BYTES / 2].join("/");
        assert!(long.len() < MAX_PATH_BYTES && components(&long).is_ok());
        let too_long = format!("{long}/{}", "x".repeat(10));
        assert!(too_long.len() > MAX_PATH_BYTES && components(&too_long).is_err());
    }
}
