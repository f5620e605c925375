//! The control channel: the virtio-serial port in the VM, stdin/stdout in dev mode.
//!
//! Two plain threads do the blocking I/O: a reader that decodes request frames and a writer
//! that writes encoded events in order.
//!
//! virtio-serial semantics (`docs/measurements.md`): while the host is not connected, `read` returns 0 at once
//! and `poll` reports POLLHUP without waiting, and `write` blocks until a host connects. So the
//! reader waits for a connection by polling after each SIGIO (which the port raises when the
//! host connects) or every [`RECONNECT_POLL`], never drops bytes that arrive while POLLHUP is
//! set, and starts a fresh decoder when a host leaves (a new connection is a new byte stream).
//! Each connection it sees is announced so that the host gets a hello. SIGIO is on only while
//! it waits: the port also raises it for every chunk of bytes that arrives, and a signal
//! delivered and handled per request is guest work that under emulation a restored clone
//! translates afresh (`docs/measurements.md`).

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::thread;
use std::time::{Duration, Instant};

use rustix::event::PollFlags;
use sbx_protocol::{CONTROL_PORT_NAME, FrameDecoder, Request};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::config::{OUTPUT_CHUNK, PORT_APPEAR_TIMEOUT, RECONNECT_POLL};
use crate::log;
use crate::outbox::{Frames, Outbox};
use crate::server::Inbound;
use crate::sys;

/// Requests waiting for the server.
const INBOUND_QUEUE: usize = 64;

/// The control channel could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// No port named [`CONTROL_PORT_NAME`] appeared in sysfs.
    #[error("no virtio-serial port named {CONTROL_PORT_NAME} under {} after {} s", dir.display(), waited.as_secs())]
    NotFound {
        /// Directory scanned.
        dir: PathBuf,
        /// How long we waited.
        waited: Duration,
    },
    /// The device node could not be opened.
    #[error("cannot open {}", path.display())]
    Open {
        /// Device node.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Threads or signal handlers could not be set up.
    #[error("cannot set up the control channel")]
    Setup(#[source] io::Error),
}

/// Finds the device name (e.g. `vport1p1`) of the port called `name` under `ports_dir`
/// (`/sys/class/virtio-ports`). The number depends on device order: never guess it.
pub fn find_port(ports_dir: &Path, name: &str) -> Option<String> {
    let entries = fs::read_dir(ports_dir).ok()?;
    for entry in entries.filter_map(Result::ok) {
        let Ok(found) = fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if found.trim_end() == name {
            return entry.file_name().into_string().ok();
        }
    }
    None
}

/// Waits for the control port to show up in sysfs and in /dev, then opens it read-write.
pub fn open_virtio(ports_dir: &Path, dev_dir: &Path) -> Result<File, PortError> {
    let started = Instant::now();
    loop {
        if let Some(device) = find_port(ports_dir, CONTROL_PORT_NAME) {
            let path = dev_dir.join(&device);
            // devtmpfs creates the node asynchronously; opening a missing path on a writable
            // /dev must not create a regular file, so check it is a character device first.
            let is_char_device = fs::metadata(&path).is_ok_and(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_char_device()
            });
            if is_char_device {
                return File::options()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(|source| PortError::Open { path, source });
            }
        }
        if started.elapsed() > PORT_APPEAR_TIMEOUT {
            return Err(PortError::NotFound {
                dir: ports_dir.to_path_buf(),
                waited: PORT_APPEAR_TIMEOUT,
            });
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Serves the protocol over the virtio-serial `port`. Must run inside the tokio runtime.
pub fn start_virtio(port: File) -> Result<(mpsc::Receiver<Inbound>, Outbox), PortError> {
    // SIGIO arrives when the host connects; the handler must exist before O_ASYNC is set (by
    // the reader, while it waits), or the default action would kill us.
    let mut sigio = signal(SignalKind::io()).map_err(PortError::Setup)?;
    let (wake_tx, wake_rx) = std_mpsc::sync_channel::<()>(1);
    tokio::spawn(async move {
        while sigio.recv().await.is_some() {
            let _ = wake_tx.try_send(());
        }
    });
    let sigio = sys::own_sigio(port.as_fd()).map_or_else(Sigio::unavailable, |()| Sigio::Off);
    let writer = port.try_clone().map_err(PortError::Setup)?;
    let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
    let (outbox, frames) = Outbox::new();
    spawn_thread("sbx-port-reader", move || {
        virtio_reader(port, &inbound_tx, &wake_rx, sigio);
    })?;
    spawn_thread("sbx-port-writer", move || write_frames(writer, frames))?;
    Ok((inbound_rx, outbox))
}

/// Serves the protocol over stdin/stdout (dev mode).
pub fn start_stdio() -> Result<(mpsc::Receiver<Inbound>, Outbox), PortError> {
    let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
    let (outbox, frames) = Outbox::new();
    spawn_thread("sbx-stdin-reader", move || {
        if inbound_tx.blocking_send(Inbound::Connected).is_err() {
            return;
        }
        let mut decoder = FrameDecoder::new();
        let mut stdin = io::stdin().lock();
        let mut buf = vec![0u8; OUTPUT_CHUNK];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if !decode(&mut decoder, &buf[..n], &inbound_tx) {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::error(format_args!("reading stdin: {e}"));
                    break;
                }
            }
        }
        let _ = inbound_tx.blocking_send(Inbound::Closed);
    })?;
    spawn_thread("sbx-stdout-writer", move || {
        write_frames(io::stdout(), frames)
    })?;
    Ok((inbound_rx, outbox))
}

fn spawn_thread(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), PortError> {
    thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(drop)
        .map_err(PortError::Setup)
}

/// Feeds bytes to the decoder and forwards whole requests. Returns false when the reader must
/// stop (corrupt stream or server gone).
fn decode(decoder: &mut FrameDecoder, bytes: &[u8], tx: &mpsc::Sender<Inbound>) -> bool {
    decoder.push(bytes);
    loop {
        match decoder.next_frame::<Request>() {
            Ok(Some((id, request))) => {
                if tx.blocking_send(Inbound::Request(id, request)).is_err() {
                    return false;
                }
            }
            Ok(None) => return true,
            Err(e) => {
                let _ = tx.blocking_send(Inbound::Desync(e));
                return false;
            }
        }
    }
}

/// Whether the control port raises SIGIO.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Sigio {
    /// `O_ASYNC` set: the reader waits for a connection.
    On,
    /// Connected, or not waiting yet.
    Off,
    /// `fcntl` refused: the reader polls every [`RECONNECT_POLL`].
    Unavailable,
}

impl Sigio {
    /// Turns SIGIO on or off if it is not so already; gives up on it if `fcntl` fails.
    fn set(&mut self, port: &File, on: bool) {
        let wanted = if on { Self::On } else { Self::Off };
        if *self == Self::Unavailable || *self == wanted {
            return;
        }
        *self = sys::set_sigio(port.as_fd(), on).map_or_else(Self::unavailable, |()| wanted);
    }

    /// `fcntl` failed: says so, and the reader polls from now on.
    fn unavailable(e: io::Error) -> Self {
        log::warn(format_args!(
            "no SIGIO on the control port, polling instead: {e}"
        ));
        Self::Unavailable
    }
}

fn virtio_reader(
    mut port: File,
    tx: &mpsc::Sender<Inbound>,
    wake: &std_mpsc::Receiver<()>,
    mut sigio: Sigio,
) {
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; OUTPUT_CHUNK];
    let mut announced = false;
    loop {
        let revents = match sys::poll_now(port.as_fd(), PollFlags::IN) {
            Ok(revents) => revents,
            Err(e) => {
                log::error(format_args!("poll on the control port: {e}"));
                thread::sleep(RECONNECT_POLL);
                continue;
            }
        };
        let connected = !revents.contains(PollFlags::HUP);
        let readable = revents.contains(PollFlags::IN);
        if connected && !announced {
            announced = true;
            sigio.set(&port, false);
            if tx.blocking_send(Inbound::Connected).is_err() {
                return;
            }
        }
        if !connected && !readable {
            // No host and nothing buffered: wait for SIGIO (host connected) or the fallback.
            announced = false;
            decoder = FrameDecoder::new();
            if sigio == Sigio::Off {
                // Look again once it is on: a host that connected before would raise none.
                sigio.set(&port, true);
                continue;
            }
            let _ = wake.recv_timeout(RECONNECT_POLL);
            continue;
        }
        // Connected (read blocks until data or a disconnect) or data left over from a host that
        // already left (read returns it, then 0).
        match port.read(&mut buf) {
            Ok(0) => {
                announced = false;
                decoder = FrameDecoder::new();
            }
            Ok(n) => {
                if !decode(&mut decoder, &buf[..n], tx) {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::error(format_args!("reading the control port: {e}"));
                thread::sleep(RECONNECT_POLL);
            }
        }
    }
}

fn write_frames(mut sink: impl Write, mut frames: Frames) {
    while let Some(frame) = frames.rx.blocking_recv() {
        let result = sink.write_all(&frame).and_then(|()| sink.flush());
        frames.counters.frame_done();
        if let Err(e) = result {
            // Dev mode: stdout closed. VM: the port went away. Either way nobody listens.
            log::error(format_args!("writing to the control channel: {e}"));
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_port_by_name_not_number() {
        let dir = std::env::temp_dir().join(format!("sbx-ports-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for (device, name) in [
            ("vport0p0", "org.qemu.console"),
            ("vport1p1", CONTROL_PORT_NAME),
        ] {
            fs::create_dir_all(dir.join(device)).expect("mkdir");
            fs::write(dir.join(device).join("name"), format!("{name}\n")).expect("write");
        }
        fs::create_dir_all(dir.join("vport2p0")).expect("port without a name yet");
        assert_eq!(
            find_port(&dir, CONTROL_PORT_NAME).as_deref(),
            Some("vport1p1")
        );
        assert_eq!(find_port(&dir, "other"), None);
        assert_eq!(find_port(&dir.join("missing"), CONTROL_PORT_NAME), None);
        let _ = fs::remove_dir_all(&dir);
    }
}
