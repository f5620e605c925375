//! File requests (write, read, list) against the agent in dev mode, where the home directory is
//! a temporary directory of the test.

use std::os::unix::fs::{PermissionsExt, symlink};
use std::time::{Duration, Instant};

use sbx_protocol::{
    Event, FILE_CHUNK, GuestErrorKind, Language, MAX_FILE_SIZE, MAX_NAME_BYTES, MAX_PATH_BYTES,
    Request, encode_frame,
};

use crate::support::{Agent, EVENT_DEADLINE, TempDir, wait_until};

fn started() -> Agent {
    let mut agent = Agent::start();
    agent.hello();
    agent
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn random_bytes(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        out.extend(seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Names in the home directory, temporary files included.
fn home_names(agent: &Agent) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(&agent.home.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn round_trips_random_all_bytes_and_empty() {
    let mut agent = started();
    let big = random_bytes(10 * 1024 * 1024 + 7, 0x5eed);
    assert_eq!(
        agent.write_file("big.bin", &big, false).unwrap(),
        big.len() as u64
    );
    let back = agent.read_file("big.bin").unwrap();
    assert!(back == big, "10 MiB round trip differs");
    assert_eq!(std::fs::read(agent.home.0.join("big.bin")).unwrap(), big);

    let all: Vec<u8> = (0..=255).collect();
    agent.write_file("all.bin", &all, false).unwrap();
    assert_eq!(agent.read_file("all.bin").unwrap(), all);

    assert_eq!(agent.write_file("empty", b"", false).unwrap(), 0);
    assert_eq!(agent.read_file("empty").unwrap(), b"");

    // Unknown size: the agent takes whatever arrives before the end.
    agent
        .write_file_sized("unsized.txt", b"no size announced", None, false)
        .unwrap();
    assert_eq!(
        agent.read_file("unsized.txt").unwrap(),
        b"no size announced"
    );

    // Overwriting replaces the content.
    agent.write_file("all.bin", b"short", false).unwrap();
    assert_eq!(agent.read_file("all.bin").unwrap(), b"short");
    assert_eq!(
        home_names(&agent),
        ["all.bin", "big.bin", "empty", "unsized.txt"],
        "no temporary files left"
    );
}

#[test]
fn nested_directories_are_created_and_listed_with_allocated_sizes() {
    let mut agent = started();
    agent
        .write_file("a/b/c/data.txt", &[b'x'; 5000], false)
        .unwrap();
    agent.write_file("a/top.txt", b"1", false).unwrap();
    let (entries, truncated) = agent.list_files("a").unwrap();
    assert!(!truncated);
    let names: Vec<(&str, bool)> = entries
        .iter()
        .map(|e| (e.name.as_str(), e.is_dir))
        .collect();
    assert_eq!(names, [("b", true), ("top.txt", false)], "sorted by name");
    let (entries, _) = agent.list_files("a/b/c/").unwrap();
    assert_eq!(entries.len(), 1);
    assert!(
        entries[0].size >= 5000 && entries[0].size % 512 == 0,
        "allocated size {}",
        entries[0].size
    );
    let (entries, _) = agent.list_files("").unwrap();
    assert_eq!(entries.iter().map(|e| &e.name).collect::<Vec<_>>(), ["a"]);
    assert_eq!(agent.list_files(".").unwrap().0, entries);

    // A sparse file reports what it occupies, not its length.
    let r = agent.exec(
        Language::Python,
        "with open('sparse', 'wb') as f: f.truncate(50_000_000)",
    );
    assert_eq!(r.outcome.exit_code, 0, "{}", r.stderr());
    let (entries, _) = agent.list_files(".").unwrap();
    let sparse = entries.iter().find(|e| e.name == "sparse").unwrap();
    assert!(sparse.size < 1_000_000, "sparse size {}", sparse.size);

    let e = agent.list_files("a/top.txt").unwrap_err();
    assert_eq!(e.kind, GuestErrorKind::InvalidRequest, "{}", e.message);
    let e = agent.list_files("missing").unwrap_err();
    assert!(e.message.contains("no such file"), "{}", e.message);
}

#[test]
fn every_rejected_path_form() {
    let mut agent = started();
    let long_name = "n".repeat(MAX_NAME_BYTES + 1);
    let long_path = format!("{}/f", vec!["d"; MAX_PATH_BYTES / 2].join("/"));
    assert!(long_path.len() > MAX_PATH_BYTES);
    let bad = [
        "/etc/passwd",
        "/",
        "../outside",
        "a/../../outside",
        "a/..",
        "nul\0byte",
        long_name.as_str(),
        long_path.as_str(),
    ];
    for path in bad {
        let shown = &path[..path.len().min(40)];
        let e = agent.write_file(path, b"x", false).unwrap_err();
        assert_eq!(e.kind, GuestErrorKind::InvalidRequest, "write {shown}");
        let e = agent.read_file(path).unwrap_err();
        assert_eq!(e.kind, GuestErrorKind::InvalidRequest, "read {shown}");
        let e = agent.list_files(path).unwrap_err();
        assert_eq!(e.kind, GuestErrorKind::InvalidRequest, "list {shown}");
    }
    // Naming no file at all is fine for a listing only.
    for path in ["", ".", "./"] {
        assert!(agent.write_file(path, b"x", false).is_err(), "{path:?}");
        assert!(agent.read_file(path).is_err(), "{path:?}");
    }
    assert!(home_names(&agent).is_empty(), "{:?}", home_names(&agent));
    // The longest allowed name works.
    let name = "n".repeat(MAX_NAME_BYTES);
    agent.write_file(&name, b"ok", false).unwrap();
    assert_eq!(agent.read_file(&format!("./{name}")).unwrap(), b"ok");
}

#[test]
fn symlinks_never_lead_out_of_home() {
    let mut agent = started();
    let outside = TempDir::new("outside");
    std::fs::write(outside.0.join("secret"), b"host secret").unwrap();
    let home = agent.home.0.clone();
    symlink("/etc/passwd", home.join("passwd")).unwrap();
    symlink(outside.0.join("secret"), home.join("secret")).unwrap();
    symlink("../../../../../../../etc/passwd", home.join("relative")).unwrap();
    symlink(&outside.0, home.join("outdir")).unwrap();

    for path in ["passwd", "secret", "relative", "outdir/secret"] {
        let e = agent.read_file(path).unwrap_err();
        assert_eq!(e.kind, GuestErrorKind::InvalidRequest, "{path}: {e:?}");
    }
    let e = agent.read_file("passwd").unwrap_err();
    assert!(
        e.message.contains("out of the home directory"),
        "{}",
        e.message
    );
    assert!(
        agent.list_files("outdir").is_err(),
        "listing through a link out"
    );

    // A symlinked directory is refused as a write target, also with parents to create.
    for path in ["outdir/new.txt", "outdir/sub/new.txt"] {
        let e = agent.write_file(path, b"pwned", false).unwrap_err();
        assert_eq!(e.kind, GuestErrorKind::InvalidRequest, "{path}: {e:?}");
    }
    assert_eq!(
        std::fs::read_dir(&outside.0).unwrap().count(),
        1,
        "nothing written outside"
    );
    // Even a link that stays inside home is not followed on the way to a write target.
    std::fs::create_dir(home.join("real")).unwrap();
    symlink("real", home.join("inner")).unwrap();
    assert!(agent.write_file("inner/x", b"x", false).is_err());

    // A link named like the target is replaced, not followed.
    agent.write_file("secret", b"replaced", false).unwrap();
    assert_eq!(
        std::fs::read(outside.0.join("secret")).unwrap(),
        b"host secret"
    );
    assert!(
        std::fs::symlink_metadata(home.join("secret"))
            .unwrap()
            .is_file()
    );
    assert_eq!(agent.read_file("secret").unwrap(), b"replaced");

    // Links that stay beneath home are followed for reads.
    agent
        .write_file("real/target.txt", b"inside", false)
        .unwrap();
    symlink("real/target.txt", home.join("ok")).unwrap();
    assert_eq!(agent.read_file("ok").unwrap(), b"inside");
    assert_eq!(agent.list_files("inner").unwrap().0.len(), 1);
}

#[test]
fn only_regular_files_are_read() {
    let mut agent = started();
    let fifo = agent.home.0.join("fifo");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    let e = agent.read_file("fifo").unwrap_err();
    assert!(e.message.contains("not a regular file"), "{}", e.message);
    std::fs::create_dir(agent.home.0.join("dir")).unwrap();
    assert!(agent.read_file("dir").is_err());
}

#[test]
fn modes_and_executable_upload_runs() {
    let mut agent = started();
    agent
        .write_file("bin/hello.sh", b"#!/bin/sh\necho ran $1\n", true)
        .unwrap();
    agent.write_file("plain.txt", b"x", false).unwrap();
    let home = agent.home.0.clone();
    let mode = |p: &str| {
        std::fs::metadata(home.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("bin/hello.sh"), 0o755);
    assert_eq!(mode("plain.txt"), 0o644);
    assert_eq!(mode("bin"), 0o755);
    let r = agent.exec(Language::Raw, "./bin/hello.sh ok");
    assert_eq!(r.stdout(), "ran ok\n", "{}", r.stderr());
    // Re-uploading as not executable changes the mode.
    agent.write_file("bin/hello.sh", b"echo\n", false).unwrap();
    assert_eq!(mode("bin/hello.sh"), 0o644);
}

#[test]
fn size_limits_and_mismatches() {
    let mut agent = started();
    // Over the limit: refused before any data is sent.
    let id = agent.send(&Request::WriteFile {
        path: "huge".into(),
        size: Some(MAX_FILE_SIZE + 1),
        executable: false,
    });
    match agent.next_for(id, EVENT_DEADLINE).event {
        Event::Error(e) => {
            assert_eq!(e.kind, GuestErrorKind::InvalidRequest);
            assert!(
                e.message.contains(&MAX_FILE_SIZE.to_string()),
                "{}",
                e.message
            );
        }
        other => panic!("{other:?}"),
    }
    // More or fewer bytes than announced.
    let e = agent
        .write_file_sized("more", b"0123456789", Some(5), false)
        .unwrap_err();
    assert!(e.message.contains("announced"), "{}", e.message);
    let e = agent
        .write_file_sized("fewer", b"01234", Some(10), false)
        .unwrap_err();
    assert!(e.message.contains("announced 10"), "{}", e.message);
    // An oversized chunk.
    let id = agent.send(&Request::WriteFile {
        path: "chunky".into(),
        size: None,
        executable: false,
    });
    let chunk = encode_frame(id, &Request::FileData(vec![0; FILE_CHUNK + 1])).unwrap();
    agent.send_raw(&chunk);
    match agent.next_for(id, EVENT_DEADLINE).event {
        Event::Error(e) => assert!(e.message.contains("chunk"), "{}", e.message),
        other => panic!("{other:?}"),
    }
    assert!(
        wait_until(Duration::from_secs(5), || home_names(&agent).is_empty()),
        "left behind: {:?}",
        home_names(&agent)
    );
    let ping = agent.send(&Request::Ping);
    assert_eq!(agent.next_for(ping, EVENT_DEADLINE).event, Event::Pong);
}

#[test]
fn aborted_write_leaves_no_file_and_the_agent_keeps_working() {
    let mut agent = started();
    agent.write_file("keep.txt", b"old", false).unwrap();
    for target in ["keep.txt", "new/dir/file.txt"] {
        let id = agent.send(&Request::WriteFile {
            path: target.into(),
            size: Some(3 * FILE_CHUNK as u64),
            executable: false,
        });
        let frame = encode_frame(id, &Request::FileData(vec![7; FILE_CHUNK])).unwrap();
        agent.send_raw(&frame);
        // Let the chunk reach the disk, so the temporary file exists before the abort.
        assert!(wait_until(Duration::from_secs(5), || {
            std::fs::read_dir(agent.home.0.join(target).parent().unwrap())
                .map(|d| {
                    d.filter_map(Result::ok)
                        .any(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
                })
                .unwrap_or(false)
        }));
        agent.send_raw(&encode_frame(id, &Request::FileAbort).unwrap());
        let dir = agent.home.0.join(target).parent().unwrap().to_path_buf();
        assert!(
            wait_until(Duration::from_secs(5), || {
                std::fs::read_dir(&dir)
                    .unwrap()
                    .filter_map(Result::ok)
                    .all(|e| !e.file_name().to_string_lossy().ends_with(".tmp"))
            }),
            "temporary file left in {dir:?}"
        );
    }
    assert_eq!(
        agent.read_file("keep.txt").unwrap(),
        b"old",
        "target untouched"
    );
    assert!(agent.read_file("new/dir/file.txt").is_err());
    agent
        .write_file("new/dir/file.txt", b"fine", false)
        .unwrap();
    assert_eq!(agent.read_file("new/dir/file.txt").unwrap(), b"fine");
}

#[test]
fn file_requests_answer_while_an_exec_runs() {
    let mut agent = started();
    agent.write_file("f.txt", b"data", false).unwrap();
    let sent = Instant::now();
    let exec = agent.send(&Request::Exec(Agent::request(
        Language::Raw,
        "sleep 3; echo done",
    )));
    let list = agent.send(&Request::ListFiles { path: ".".into() });
    let answered = agent.next_for(list, EVENT_DEADLINE);
    assert!(
        matches!(answered.event, Event::FileList { .. }),
        "{answered:?}"
    );
    assert_eq!(agent.read_file("f.txt").unwrap(), b"data");
    agent.write_file("g.txt", b"more", false).unwrap();
    let ping = agent.send(&Request::Ping);
    assert_eq!(agent.next_for(ping, EVENT_DEADLINE).event, Event::Pong);
    let during = Instant::now();
    let r = agent.collect(exec, sent);
    assert_eq!(r.stdout(), "done\n");
    let done_at = r.events.last().unwrap().at;
    assert!(
        during < done_at && answered.at < done_at,
        "file requests waited for the exec"
    );
}

#[test]
fn listing_is_bounded() {
    let mut agent = started();
    let dir = agent.home.0.join("many");
    std::fs::create_dir(&dir).unwrap();
    for i in 0..sbx_protocol::MAX_LIST_ENTRIES + 5 {
        std::fs::write(dir.join(format!("f{i:05}")), b"").unwrap();
    }
    let (entries, truncated) = agent.list_files("many").unwrap();
    assert!(truncated);
    assert_eq!(entries.len(), sbx_protocol::MAX_LIST_ENTRIES);
    assert!(entries.windows(2).all(|w| w[0].name < w[1].name), "sorted");
    std::fs::remove_file(dir.join("f00000")).unwrap();
    std::fs::remove_file(dir.join("f00001")).unwrap();
    std::fs::remove_file(dir.join("f00002")).unwrap();
    std::fs::remove_file(dir.join("f00003")).unwrap();
    std::fs::remove_file(dir.join("f00004")).unwrap();
    let (entries, truncated) = agent.list_files("many").unwrap();
    assert!(!truncated, "exactly the limit fits");
    assert_eq!(entries.len(), sbx_protocol::MAX_LIST_ENTRIES);
}
