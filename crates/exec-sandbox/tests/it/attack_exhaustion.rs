//! Resource exhaustion: fork and thread bombs, filling the disk and its inodes, memory hogs,
//! output floods, more connections than the gateway allows and floods of DNS lookups. Each ends (by a limit,
//! an error or the timeout), the run returns its result, and the next run works.

use std::time::{Duration, Instant};

use exec_sandbox::{ExecOptions, Language, RunOptions, SessionOptions, limits::HOST_TIMEOUT_GRACE};

use crate::attack_gateway::{TwoVhosts, on_fixture_test};
use crate::support::{chain, expect_outcome, outcome, run, run_with};

/// The scheduler still runs code after an attack.
async fn next_run_works() {
    let r = run(Language::Raw, "echo next").await;
    assert_eq!((r.stdout.as_str(), r.exit_code), ("next\n", 0), "{r:?}");
}

#[tokio::test]
async fn a_fork_bomb_ends_at_the_timeout_and_the_next_run_works() {
    let timeout = 5;
    let started = Instant::now();
    let r = run_with(
        RunOptions::new(
            Language::Raw,
            "bomb() { bomb | bomb & }; bomb; sleep 60; echo survived",
        )
        .timeout_seconds(timeout),
    )
    .await;
    let elapsed = started.elapsed();
    assert!(r.timed_out && r.exit_code == -1, "{r:?}");
    assert!(!r.stdout.contains("survived"), "{r:?}");
    // Enforced in the guest: the bomb cannot starve the agent or outrun its cleanup.
    assert!(
        r.stderr.contains("Execution timed out after 5 s")
            && !r.stderr.contains("enforced by the host"),
        "{}",
        r.stderr
    );
    let bound = Duration::from_secs(timeout) + HOST_TIMEOUT_GRACE + Duration::from_secs(10);
    assert!(elapsed < bound, "took {elapsed:?}");
    next_run_works().await;
}

#[tokio::test]
async fn a_thread_bomb_is_refused_threads_and_the_next_run_works() {
    let code = r#"
import threading, time
n = 0
def idle():
    time.sleep(600)
try:
    while n < 100000:
        threading.Thread(target=idle, daemon=True).start()
        n += 1
    print("threads: all %d started" % n)
except RuntimeError as e:
    print("threads: refused (%s)" % e)
    print("started: %d" % n)
"#;
    let r = run_with(RunOptions::new(Language::Python, code).timeout_seconds(60)).await;
    assert_eq!(r.exit_code, 0, "{r:?}");
    expect_outcome(&r, "threads", &["refused (can't start new thread)"]);
    let started: u32 = outcome(&r, "started").parse().unwrap();
    assert!((100..=4096).contains(&started), "{r:?}");
    next_run_works().await;
}

#[tokio::test]
async fn filling_the_disk_and_its_inodes_ends_with_enospc() {
    let script = r#"
for d in /tmp /home/user /dev/shm; do
    err=$(head -c 2000M /dev/zero 2>&1 > "$d/fill"); rc=$?
    echo "fill $d: rc $rc (${err##*: })"
    echo "filled $d: $(( $(stat -c %s "$d/fill") / 1048576 ))"
    rm -f "$d/fill"
done
for d in /tmp /home/user; do
    mkdir "$d/inodes" && cd "$d/inodes" || exit 9
    n=0
    while [ $n -lt 200000 ] && : > "f$n" 2>/dev/null; do n=$((n + 1)); done
    err=$( (: > extra) 2>&1 )
    echo "inodes $d: ${err##*: }"
    echo "files $d: $n"
    cd / && rm -rf "$d/inodes"
done
echo "after: $(echo ok > /tmp/ok && cat /tmp/ok)"
"#;
    let r = run_with(RunOptions::new(Language::Raw, script).timeout_seconds(120)).await;
    assert_eq!(r.exit_code, 0, "{r:?}");
    for d in ["/tmp", "/home/user", "/dev/shm"] {
        expect_outcome(
            &r,
            &format!("fill {d}"),
            &["rc 1 (No space left on device)"],
        );
        let mb: u64 = outcome(&r, &format!("filled {d}")).parse().unwrap();
        assert!((1..2000).contains(&mb), "{d}: {mb} MB\n{}", r.stdout);
    }
    for d in ["/tmp", "/home/user"] {
        expect_outcome(&r, &format!("inodes {d}"), &["No space left on device"]);
        let files: u64 = outcome(&r, &format!("files {d}")).parse().unwrap();
        assert!(
            (1000..200_000).contains(&files),
            "{d}: {files}\n{}",
            r.stdout
        );
    }
    expect_outcome(&r, "after", &["ok"]);
    next_run_works().await;
}

#[tokio::test]
async fn stdout_is_capped_at_one_megabyte() {
    let r = run(
        Language::Python,
        "import sys\nsys.stdout.write('x' * 2_000_000)\nprint('done', file=sys.stderr)",
    )
    .await;
    assert_eq!(
        r.stdout.len(),
        exec_sandbox::limits::MAX_STDOUT_BYTES as usize
    );
    assert!(r.stdout_truncated);
    assert!(r.stderr.contains("done"));
    assert_eq!(r.exit_code, 0);
}

#[tokio::test]
async fn stderr_is_capped() {
    let r = run(
        Language::Raw,
        "head -c 300000 /dev/zero | tr '\\0' e >&2; echo ok",
    )
    .await;
    assert!(r.stderr.len() <= exec_sandbox::limits::MAX_STDERR_BYTES as usize);
    assert!(r.stderr_truncated);
    assert_eq!(r.stdout, "ok\n");
}

#[tokio::test]
async fn an_endless_flood_on_both_streams_ends_at_the_timeout() {
    let started = Instant::now();
    let r =
        run_with(RunOptions::new(Language::Raw, "yes out & yes err >&2 & wait").timeout_seconds(3))
            .await;
    assert!(r.timed_out && r.exit_code == -1, "{:?}", r.timing);
    assert!(r.stdout_truncated && r.stderr_truncated);
    assert_eq!(
        r.stdout.len(),
        exec_sandbox::limits::MAX_STDOUT_BYTES as usize
    );
    // The capped stream, then the timeout note (always shown, past the cap; the host's, when
    // the flood starved the guest agent, is the longer one).
    let note =
        "\nExecution timed out after 3 s (enforced by the host: the guest stopped responding)\n";
    let tail = &r.stderr[r.stderr.len().saturating_sub(note.len())..];
    assert!(tail.contains("\nExecution timed out after 3 s"), "{tail:?}");
    assert!(r.stderr.len() <= exec_sandbox::limits::MAX_STDERR_BYTES as usize + note.len());
    assert!(r.stderr.starts_with("err\nerr\n"));
    assert!(r.stdout.starts_with("out\nout\n"));
    let bound = Duration::from_secs(3) + HOST_TIMEOUT_GRACE + Duration::from_secs(10);
    assert!(started.elapsed() < bound, "took {:?}", started.elapsed());
    next_run_works().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_refused_and_the_run_returns() {
    let fixture = TwoVhosts::start().await;
    let limit = sbx_net::verdict::MAX_CONNECTIONS;
    let code = format!(
        r#"
import socket, time
PORT, TRIES = {port}, {tries}
held, refused, other = [], 0, []
for i in range(TRIES):
    try:
        s = socket.create_connection(("fixture.test", PORT), timeout=30)
    except ConnectionRefusedError:
        refused += 1
        continue
    try:
        s.sendall(b"GET / HTTP/1.1\r\nHost: fixture.test\r\n\r\n")
        if b"vhost:fixture.test" not in s.recv(4096):
            raise ConnectionResetError("no answer")
        held.append(s)
    except OSError as e:
        other.append(type(e).__name__)
        s.close()
print("held: %d" % len(held))
print("refused: %d" % refused)
print("other: %s" % (",".join(other) or "none"), flush=True)
for s in held:
    s.close()
# Closed connections free their slots.
deadline = time.time() + 30
while True:
    try:
        s = socket.create_connection(("fixture.test", PORT), timeout=30)
        s.sendall(b"GET / HTTP/1.1\r\nHost: fixture.test\r\nConnection: close\r\n\r\n")
        print("after closing: %s" % ("served" if b"vhost:" in s.recv(4096) else "empty"))
        break
    except OSError as e:
        if time.time() > deadline:
            print("after closing: %s" % type(e).__name__)
            break
        time.sleep(0.5)
"#,
        port = fixture.port,
        tries = limit + 20,
    );
    let result = on_fixture_test(code, 180).await;
    assert_eq!(result.exit_code, 0, "{result:?}");
    let held: usize = outcome(&result, "held").parse().unwrap();
    let refused: usize = outcome(&result, "refused").parse().unwrap();
    expect_outcome(&result, "other", &["none"]);
    // The guest's own DNS query is UDP: every one of the limit's slots is a held connection.
    assert_eq!((held, refused), (limit, 20), "{}", result.stdout);
    expect_outcome(&result, "after closing", &["served"]);
    let refusals = result.network_refusals.join("\n");
    assert!(
        result.network_refusals.iter().any(|r| r.starts_with("TCP ")
            && r.ends_with(&format!(":{}: {limit} connections are open", fixture.port))),
        "{refusals}"
    );
    let served = fixture.served.lock().unwrap().len();
    assert_eq!(served, limit + 1, "one request per accepted connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unlisted_dns_lookups_finishes_promptly() {
    let lookups = 300;
    let code = format!(
        r#"
import socket, time
started = time.monotonic()
answered, refused = 0, 0
for i in range({lookups}):
    try:
        socket.gethostbyname("n%d.other.test" % i)
        answered += 1
    except socket.gaierror:
        refused += 1
print("answered: %d" % answered)
print("refused: %d" % refused)
print("seconds: %d" % (time.monotonic() - started))
print("allowed after: %s" % socket.gethostbyname("fixture.test").startswith("198.18."))
"#
    );
    let started = Instant::now();
    let result = on_fixture_test(code, 120).await;
    assert_eq!(result.exit_code, 0, "{result:?}");
    expect_outcome(&result, "answered", &["0"]);
    expect_outcome(&result, "refused", &[&lookups.to_string()]);
    expect_outcome(&result, "allowed after", &["True"]);
    let seconds: u64 = outcome(&result, "seconds").parse().unwrap();
    assert!(seconds < 60, "{seconds} s for {lookups} lookups");
    assert!(started.elapsed() < Duration::from_secs(90));
    // The refusals are reported, capped: 50 distinct entries and a count of the rest.
    let refusals = &result.network_refusals;
    assert_eq!(refusals.len(), 51, "{refusals:?}");
    assert_eq!(refusals[0], "DNS n0.other.test: not in the allowlist");
    let more: usize = refusals[50]
        .strip_prefix("... and ")
        .and_then(|r| r.strip_suffix(" more"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{refusals:?}"));
    assert!(more >= lookups - 50, "{refusals:?}");
}

/// A fork bomb in a session: the execution ends at its timeout, enforced by the guest (the
/// agent, at a raised priority, kills the interpreter's cgroup in one write), and the session
/// carries on with its state and nothing of the bomb left.
#[tokio::test]
async fn a_fork_bomb_in_a_session_ends_at_the_timeout() {
    let s = crate::support::scheduler()
        .session(SessionOptions::new(Language::Raw))
        .await
        .unwrap_or_else(|e| panic!("session: {}", chain(&e)));
    let r = s.exec(ExecOptions::new("kept=yes")).await.unwrap();
    assert_eq!(r.exit_code, 0, "{r:?}");
    let started = Instant::now();
    let r = s
        .exec(ExecOptions::new("bomb() { bomb | bomb & }; bomb; sleep 60").timeout_seconds(5))
        .await
        .unwrap_or_else(|e| panic!("exec: {}", chain(&e)));
    assert!(r.timed_out && r.exit_code == -1, "{r:?}");
    let bound = Duration::from_secs(5) + HOST_TIMEOUT_GRACE + Duration::from_secs(10);
    assert!(started.elapsed() < bound, "took {:?}", started.elapsed());
    match s
        .exec(ExecOptions::new(
            "echo \"next: $kept\"; echo \"processes: $(ls -d /proc/[0-9]* | wc -l)\"",
        ))
        .await
    {
        Ok(next) => {
            expect_outcome(&next, "next", &[""]);
            let processes: u32 = outcome(&next, "processes").parse().unwrap();
            assert!(processes < 10, "the bomb survived: {next:?}");
        }
        Err(e) => panic!("the session did not survive the bomb: {}", chain(&e)),
    }
    s.close().await;
    next_run_works().await;
}

/// Appends 1 MiB chunks that are not one repeated byte (zram keeps those for free) until the
/// guard kills the program, printing the count every 10 MiB.
const PYTHON_HOG: &str = r#"
chunks = []
pattern = bytes(range(256)) * 4096
while True:
    chunks.append(bytearray(pattern))
    if len(chunks) % 10 == 0:
        print(len(chunks), flush=True)
"#;

#[tokio::test]
async fn memory_hogs_are_killed_with_137_and_the_agent_reports_it() {
    // Swapping under TCG is slow when the cores are shared: a generous timeout.
    let r = run_with(RunOptions::new(Language::Python, PYTHON_HOG).timeout_seconds(180)).await;
    assert_eq!(r.exit_code, 137, "{}\n{}", r.stdout, r.stderr);
    assert!(!r.timed_out);
    let reached: u32 = r
        .stdout
        .lines()
        .last()
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    // 256 MB of guest memory, of which the guard gives the programs 210 MiB: compressed swap
    // takes them further before the kill.
    assert!(reached > 210, "only {reached} MiB before the kill");
    // The note comes from the agent, after the kill: it survived and kept serving.
    assert!(
        r.stderr
            .contains("out of memory: the sandbox's processes needed more than"),
        "{}",
        r.stderr
    );
    // A shell's child that reads an endless line: the whole group goes, the shell included.
    let r = run(Language::Raw, "tail /dev/zero; echo survived").await;
    assert_eq!(r.exit_code, 137, "{}", r.stderr);
    assert!(!r.stdout.contains("survived"), "{}", r.stdout);
    assert!(r.stderr.contains("out of memory"), "{}", r.stderr);
}
