//! File transfer through a session's VM: upload, use, download, list, and the guest's path rules.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use exec_sandbox::{ErrorKind, ExecOptions, Language, SessionOptions};

use crate::support::{chain, scheduler};

#[tokio::test]
async fn upload_transform_download_and_list_in_a_real_vm() {
    let session = scheduler()
        .session(SessionOptions::new(Language::Python))
        .await
        .unwrap_or_else(|e| panic!("{}", chain(&e)));

    let data: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let written = session
        .write_file("in/data.bin", &data[..], Some(data.len() as u64), false)
        .await
        .unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!(written, data.len() as u64);

    let r = session
        .exec(ExecOptions::new(
            "import os\nb = open('in/data.bin', 'rb').read()\nopen('out.bin', 'wb').write(bytes(reversed(b)))\nprint(len(b), oct(os.stat('in/data.bin').st_mode & 0o777), os.stat('in/data.bin').st_uid)",
        ))
        .await
        .unwrap();
    assert_eq!(r.stdout, "300000 0o644 1000\n", "stderr: {}", r.stderr);

    let mut back = Vec::new();
    session.read_file("out.bin", &mut back).await.unwrap();
    let expected: Vec<u8> = data.iter().rev().copied().collect();
    assert!(back == expected, "downloaded bytes differ");

    let entries = session.list_files("").await.unwrap();
    let names: Vec<_> = entries
        .iter()
        .map(|e| (e.name.as_str(), e.is_dir))
        .collect();
    assert!(names.contains(&("in", true)), "{names:?}");
    assert!(names.contains(&("out.bin", false)), "{names:?}");

    // An executable upload runs.
    let script = b"#!/bin/sh\necho uploaded-script-ran\n";
    session
        .write_file("bin/hello.sh", &script[..], Some(script.len() as u64), true)
        .await
        .unwrap();
    let r = session
        .exec(ExecOptions::new("import subprocess\nprint(subprocess.run(['./bin/hello.sh'], capture_output=True, text=True).stdout, end='')"))
        .await
        .unwrap();
    assert_eq!(r.stdout, "uploaded-script-ran\n", "stderr: {}", r.stderr);

    // A symlink planted by user code is not followed out of the home directory.
    session
        .exec(ExecOptions::new(
            "import os\nos.symlink('/etc/passwd', 'passwd')\nos.symlink('/etc', 'etc')",
        ))
        .await
        .unwrap();
    let err = session
        .read_file("passwd", &mut Vec::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{}", chain(&err));
    let err = session
        .write_file("etc/evil", &b"x"[..], Some(1), false)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{}", chain(&err));
    // Rejected on the host before anything is sent.
    for bad in ["/etc/passwd", "../x", "a/../../x"] {
        let err = session.read_file(bad, &mut Vec::new()).await.unwrap_err();
        assert_eq!(
            err.kind(),
            ErrorKind::InvalidInput,
            "{bad}: {}",
            chain(&err)
        );
    }

    // Listing and writing work while an execution is running on the same VM. The program says
    // it started, then waits (up to 100 s) for a file that the test writes only after listing:
    // a listing or a write held back until the execution ends would see it end first.
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let started_tx = Mutex::new(Some(started_tx));
    let running = session.exec(
        ExecOptions::new(
            "import os, time\nprint('started', flush=True)\nfor _ in range(1000):\n    if os.path.exists('go'): break\n    time.sleep(0.1)\nprint('released' if os.path.exists('go') else 'gave up')",
        )
        .timeout_seconds(120)
        .on_stdout(move |_| {
            if let Some(tx) = started_tx.lock().unwrap().take() {
                let _ = tx.send(());
            }
        }),
    );
    tokio::pin!(running);
    let entries = tokio::select! {
        biased;
        r = &mut running => panic!("the execution ended before the listing: {r:?}"),
        entries = async {
            started_rx.await.expect("the program prints before it waits");
            session.list_files("in").await.unwrap()
        } => entries,
    };
    assert_eq!(entries.len(), 1, "{entries:?}");
    session
        .write_file("go", &b""[..], Some(0), false)
        .await
        .unwrap();
    let r = running.await.unwrap();
    assert_eq!(r.stdout, "started\nreleased\n", "stderr: {}", r.stderr);
    session.close().await;
}

/// A source that must not be read; records whether it was.
struct MustNotRead(Arc<AtomicBool>);

impl tokio::io::AsyncRead for MustNotRead {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        _buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.0.store(true, Ordering::SeqCst);
        std::task::Poll::Ready(Err(std::io::Error::other("read although refused")))
    }
}

/// A reader that yields `good` bytes and then fails, like a local disk error mid-upload.
struct FailingReader {
    good: usize,
}

impl tokio::io::AsyncRead for FailingReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.good == 0 {
            return std::task::Poll::Ready(Err(std::io::Error::other("disk went away")));
        }
        let n = self.good.min(buf.remaining());
        buf.put_slice(&vec![b'z'; n]);
        self.good -= n;
        std::task::Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn big_random_round_trip_limits_and_aborted_writes_in_a_real_vm() {
    use sha2::{Digest, Sha256};

    let session = scheduler()
        .session(SessionOptions::new(Language::Raw))
        .await
        .unwrap_or_else(|e| panic!("{}", chain(&e)));

    // 10 MB of pseudo-random bytes (a fixed xorshift stream), and the empty file.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let data: Vec<u8> = (0..10 * 1024 * 1024)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    session
        .write_file(
            "nested/deeper/random.bin",
            &data[..],
            Some(data.len() as u64),
            false,
        )
        .await
        .unwrap_or_else(|e| panic!("{}", chain(&e)));
    session
        .write_file("empty", &b""[..], Some(0), false)
        .await
        .unwrap();
    let r = session
        .exec(ExecOptions::new(
            "sha256sum nested/deeper/random.bin | cut -c1-64; stat -c %s empty",
        ))
        .await
        .unwrap();
    let expected = hex::encode(Sha256::digest(&data));
    assert_eq!(r.stdout, format!("{expected}\n0\n"), "stderr: {}", r.stderr);
    let mut back = Vec::new();
    session
        .read_file("nested/deeper/random.bin", &mut back)
        .await
        .unwrap();
    assert_eq!(hex::encode(Sha256::digest(&back)), expected);
    let mut empty = Vec::new();
    assert_eq!(session.read_file("empty", &mut empty).await.unwrap(), 0);

    // Over the limit with a known size: refused before anything is read or sent (no `huge`
    // in the listing at the end).
    let read = Arc::new(AtomicBool::new(false));
    let err = session
        .write_file(
            "huge",
            MustNotRead(read.clone()),
            Some(exec_sandbox::limits::MAX_FILE_BYTES + 1),
            false,
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{}", chain(&err));
    assert!(!read.load(Ordering::SeqCst), "the source was read");

    // A write whose source fails midway leaves no file, and the session keeps working.
    let err = session
        .write_file("partial.bin", FailingReader { good: 600_000 }, None, false)
        .await
        .unwrap_err();
    assert!(chain(&err).contains("disk went away"), "{}", chain(&err));
    let names: Vec<_> = session
        .list_files("")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(!names.iter().any(|n| n.contains("partial")), "{names:?}");
    let r = session
        .exec(ExecOptions::new("ls -A | sort | tr '\\n' ' '"))
        .await
        .unwrap();
    assert_eq!(r.stdout, "empty nested ", "stderr: {}", r.stderr);
    session.close().await;
}
