//! The agent in dev mode (`--stdio`), driven over its real protocol with the host's python3
//! and bash (and Bun when `SBX_AGENT_BUN` points at one).

#![expect(clippy::unwrap_used, reason = "tests")]

mod files;
mod packages;
mod support;

use std::io::Write as _;
use std::time::{Duration, Instant};

use sbx_protocol::{Event, GuestErrorKind, Language, PROTOCOL_VERSION, Request};
use support::{Agent, EVENT_DEADLINE, wait_until};

const PY: Language = Language::Python;
const SH: Language = Language::Raw;
const JS: Language = Language::Javascript;

fn started() -> Agent {
    let mut agent = Agent::start();
    agent.hello();
    agent
}

#[test]
fn hello_comes_first() {
    let mut agent = Agent::start();
    let hello = agent.hello();
    assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
    assert!(!hello.root_mounted, "dev mode mounts nothing");
    assert_eq!(hello.packages, sbx_protocol::layer::LayerStatus::Absent);
    assert!(!hello.agent_version.is_empty());
}

#[test]
fn python_prints_and_exits() {
    let mut agent = started();
    let r = agent.exec(PY, "print(6*7)");
    assert_eq!(r.stdout(), "42\n");
    assert_eq!(r.outcome.exit_code, 0, "stderr: {}", r.stderr());
    assert!(!r.outcome.timed_out);
    assert!(
        r.outcome.interpreter_start_ms > 0,
        "first exec starts python"
    );
    let r = agent.exec(PY, "import sys; sys.exit(3)");
    assert_eq!(r.outcome.exit_code, 3);
    assert_eq!(r.outcome.interpreter_start_ms, 0, "python kept running");
    let r = agent.exec(PY, "raise SystemExit('bye')");
    assert_eq!((r.outcome.exit_code, r.stderr().as_str()), (1, "bye\n"));
    let r = agent.exec(PY, "raise SystemExit");
    assert_eq!(r.outcome.exit_code, 0);
}

#[test]
fn python_state_persists() {
    let mut agent = started();
    assert_eq!(
        agent
            .exec(PY, "x = 41\ndef f(): return x + 1")
            .outcome
            .exit_code,
        0
    );
    let r = agent.exec(PY, "print(f())");
    assert_eq!(r.stdout(), "42\n");
    let r = agent.exec(
        PY,
        "print(sorted(k for k in globals() if not k.startswith('__')))",
    );
    assert_eq!(r.stdout(), "['f', 'x']\n", "no driver names in __main__");
}

#[test]
fn python_exception_gives_traceback_and_1() {
    let mut agent = started();
    let r = agent.exec(PY, "def f():\n    return 1/0\nf()");
    assert_eq!(r.outcome.exit_code, 1);
    let err = r.stderr();
    assert!(
        err.starts_with("Traceback (most recent call last):\n"),
        "{err}"
    );
    assert!(err.contains("File \"<sandbox>\", line 3"), "{err}");
    assert!(err.contains("return 1/0"), "source lines shown: {err}");
    assert!(
        err.ends_with("ZeroDivisionError: division by zero\n"),
        "{err}"
    );
    assert!(
        !err.contains("_sbx") && !err.contains("line 1, in run"),
        "driver frames: {err}"
    );
    let r = agent.exec(PY, "x = (");
    assert_eq!(r.outcome.exit_code, 1);
    assert!(r.stderr().contains("SyntaxError"), "{}", r.stderr());
    assert_eq!(
        agent.exec(PY, "print('still alive')").stdout(),
        "still alive\n"
    );
}

#[test]
fn python_killed_by_signal_reports_128_plus_n_and_restarts() {
    let mut agent = started();
    agent.exec(PY, "lost = 1");
    let r = agent.exec(
        PY,
        "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
    );
    assert_eq!(r.outcome.exit_code, 137);
    let r = agent.exec(PY, "print('lost' in globals())");
    assert_eq!(r.stdout(), "False\n", "a fresh interpreter");
    assert!(r.outcome.interpreter_start_ms > 0);
    let r = agent.exec(PY, "import os; os._exit(5)");
    assert_eq!(r.outcome.exit_code, 5);
}

#[test]
fn bash_runs_in_one_persistent_shell() {
    let mut agent = started();
    let r = agent.exec(SH, "echo $((6*7))");
    assert_eq!((r.stdout().as_str(), r.outcome.exit_code), ("42\n", 0));
    agent.exec(SH, "x=5; cd /; f() { echo \"f:$1\"; }");
    let r = agent.exec(SH, "echo $x; pwd; f y");
    assert_eq!(r.stdout(), "5\n/\nf:y\n");
    let r = agent.exec(SH, "false");
    assert_eq!(r.outcome.exit_code, 1);
    let r = agent.exec(SH, "echo é; printf 'ü\\n' >&2; exit 7");
    assert_eq!((r.stdout().as_str(), r.stderr().as_str()), ("é\n", "ü\n"));
    assert_eq!(r.outcome.exit_code, 7);
    let r = agent.exec(SH, "echo ${x:-gone}");
    assert_eq!(
        r.stdout(),
        "gone\n",
        "exit ended the shell; a new one started"
    );
}

#[test]
fn bash_xtrace_shows_only_user_commands() {
    // The user's commands run inside eval, one level deeper than a script's top level: with
    // the default PS4 their trace lines start with `++` (the reference's shell evals too).
    let mut agent = started();
    let r = agent.exec(SH, "set -x; echo hi");
    assert_eq!(
        (r.stdout().as_str(), r.stderr().as_str()),
        ("hi\n", "++ echo hi\n")
    );
    let r = agent.exec(SH, "echo again");
    assert_eq!(r.stdout(), "again\n");
    assert_eq!(
        r.stderr(),
        "++ echo again\n",
        "the user's line and nothing of the driver"
    );
    let r = agent.exec(SH, "echo (");
    assert_eq!(r.outcome.exit_code, 2, "syntax error");
    let r = agent.exec(SH, "x=1; echo $x");
    assert_eq!(
        r.stderr(),
        "++ x=1\n++ echo 1\n",
        "still tracing after a syntax error"
    );
    let r = agent.exec(SH, "set +x; echo quiet");
    assert_eq!(r.stderr(), "++ set +x\n");
    let r = agent.exec(SH, "echo untraced");
    assert_eq!(
        (r.stdout().as_str(), r.stderr().as_str()),
        ("untraced\n", "")
    );
}

#[test]
fn a_leading_bom_is_ignored() {
    let mut agent = started();
    let r = agent.exec(PY, "\u{feff}print('py')");
    assert_eq!(
        (r.stdout().as_str(), r.outcome.exit_code),
        ("py\n", 0),
        "{}",
        r.stderr()
    );
    let r = agent.exec(SH, "\u{feff}echo sh");
    assert_eq!(
        (r.stdout().as_str(), r.outcome.exit_code),
        ("sh\n", 0),
        "{}",
        r.stderr()
    );
    let r = agent.exec(SH, "\u{feff}#!/bin/sh\necho script; exit 4");
    assert_eq!(
        (r.stdout().as_str(), r.outcome.exit_code),
        ("script\n", 4),
        "{}",
        r.stderr()
    );
    let r = agent.exec(PY, "print(len('\u{feff}x'))");
    assert_eq!(r.stdout(), "2\n", "only a leading one is stripped");
}

#[test]
fn raw_code_with_a_shebang_runs_as_a_script() {
    let mut agent = started();
    let r = agent.exec(SH, "#!/usr/bin/awk -f\nBEGIN { print \"hi\"; exit 3 }");
    assert_eq!(
        (r.stdout().as_str(), r.outcome.exit_code),
        ("hi\n", 3),
        "{}",
        r.stderr()
    );
    let python = support::python();
    let code = format!(
        "#!{}\nimport sys\nprint('py', sys.version_info[0])\nsys.exit(5)",
        python.display()
    );
    let r = agent.exec(SH, &code);
    assert_eq!(
        (r.stdout().as_str(), r.outcome.exit_code),
        ("py 3\n", 5),
        "{}",
        r.stderr()
    );

    // The execution's environment, the shell's working directory, stdin at end of file.
    agent.exec(SH, "cd /; export KEPT=yes");
    let mut request = Agent::request(
        SH,
        "#!/bin/sh\npwd; echo \"$KEPT $ONCE\"; cat; echo \"stdin done\"",
    );
    request.env = vec![("ONCE".into(), "v".into())];
    let r = agent.exec_request(request);
    assert_eq!(r.stdout(), "/\nyes v\nstdin done\n", "{}", r.stderr());

    // A separate process, even in bash: nothing persists.
    let r = agent.exec(SH, "#!/bin/bash\ncd /tmp; y=1; pwd");
    assert_eq!(r.stdout(), "/tmp\n");
    let r = agent.exec(SH, "pwd; echo \"${y-unset}\"");
    assert_eq!(r.stdout(), "/\nunset\n");

    // A private file, removed afterwards.
    let r = agent.exec(SH, "#!/bin/sh\necho \"$0\"; stat -c '%a %u' \"$0\"");
    let out = r.stdout();
    let (path, mode) = out.trim_end().split_once('\n').unwrap();
    assert!(path.starts_with("/tmp/.sbx-script-"), "{path}");
    let uid = rustix::process::geteuid().as_raw();
    assert_eq!(mode, format!("700 {uid}"));
    assert!(!std::path::Path::new(path).exists(), "{path} left behind");
}

#[test]
fn shebang_scripts_fail_like_a_shell() {
    let mut agent = started();
    let r = agent.exec(SH, "#!/nonexistent/interp -x\necho hi");
    assert_eq!(r.outcome.exit_code, 127);
    assert_eq!(r.stdout(), "");
    assert_eq!(
        r.stderr(),
        "/nonexistent/interp: bad interpreter (#! line): No such file or directory\n"
    );
    let r = agent.exec(SH, "#!no-such-interpreter\necho hi");
    assert_eq!(r.outcome.exit_code, 127, "{}", r.stderr());
    let r = agent.exec(SH, "#!/etc/passwd\necho hi");
    assert_eq!(r.outcome.exit_code, 126, "{}", r.stderr());
    assert!(r.stderr().contains("/etc/passwd"), "{}", r.stderr());
    let r = agent.exec(SH, "echo still here");
    assert_eq!(r.stdout(), "still here\n");
}

#[test]
fn shebang_scripts_cannot_forge_their_status() {
    let mut agent = started();
    // Every descriptor of the driver (the script's parent) gets a status line without the
    // execution's nonce; the script's own exit code still counts. Some of those descriptors are
    // pipes nobody reads any more: the forger ignores SIGPIPE so that such a write fails
    // instead of killing it.
    let code = "#!/bin/bash\n\
        trap '' PIPE\n\
        for f in /proc/$PPID/fd/*; do\n\
          printf '0123456789abcdef0123456789abcdef 0\\n' > \"$f\"\n\
        done 2>/dev/null\n\
        sleep 0.3; echo after; exit 6";
    let r = agent.exec(SH, code);
    assert_eq!(r.outcome.exit_code, 6, "stderr: {}", r.stderr());
    assert!(r.stdout().ends_with("after\n"), "{}", r.stdout());
    let r = agent.exec(SH, "echo next");
    assert_eq!((r.stdout().as_str(), r.outcome.exit_code), ("next\n", 0));
}

#[test]
fn shebang_script_timeout_kills_it_and_removes_the_file() {
    let mut agent = started();
    let mut request = Agent::request(SH, "#!/bin/sh\necho \"$0\"; exec sleep 30");
    request.timeout_ms = 1000;
    let r = agent.exec_request(request);
    assert!(r.outcome.timed_out);
    assert_eq!(r.outcome.exit_code, -1);
    let path = r.stdout();
    assert!(
        !std::path::Path::new(path.trim_end()).exists(),
        "{path} left behind"
    );
    assert_eq!(agent.exec(SH, "echo back").stdout(), "back\n");
}

#[test]
fn python_int_digits_are_unlimited_unless_the_caller_says() {
    let mut agent = started();
    let big = "print(len(str(10**5000)))";
    let r = agent.exec(PY, big);
    assert_eq!(
        (r.stdout().as_str(), r.outcome.exit_code),
        ("5001\n", 0),
        "{}",
        r.stderr()
    );
    let mut request = Agent::request(PY, big);
    request.env = vec![("PYTHONINTMAXSTRDIGITS".into(), "4300".into())];
    let r = agent.exec_request(request);
    assert_eq!(r.outcome.exit_code, 1);
    assert!(r.stderr().contains("ValueError"), "{}", r.stderr());
    let r = agent.exec(PY, big);
    assert_eq!(
        r.stdout(),
        "5001\n",
        "the caller's limit was for one execution"
    );
    let mut request = Agent::request(PY, "print('ran')");
    request.env = vec![("PYTHONINTMAXSTRDIGITS".into(), "5".into())];
    let r = agent.exec_request(request);
    assert_eq!((r.stdout().as_str(), r.outcome.exit_code), ("", 1));
    assert_eq!(
        r.stderr(),
        "PYTHONINTMAXSTRDIGITS: invalid limit; must be >= 640 or 0 for unlimited.\n"
    );
    // Child Pythons inherit the setting through the environment.
    let r = agent.exec(
        PY,
        "import subprocess, sys\n\
         subprocess.run([sys.executable, '-c', 'print(len(str(10**5000)))'], check=True)",
    );
    assert_eq!(r.stdout(), "5001\n", "{}", r.stderr());
}

#[test]
fn interpreters_run_sandboxed_as_the_sandbox_user() {
    // The driver shell ($$) leads its own session: field 6 of its stat is its session id.
    let probe = "id -u; id -g; id -G; ulimit -u; grep -E '^(Uid|NoNewPrivs)' /proc/self/status; \
        read -r -a stat < /proc/$$/stat; [ \"${stat[5]}\" = $$ ] && echo session-leader";
    let has_setpriv = std::process::Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !rustix::process::geteuid().is_root() || !has_setpriv {
        let _ = writeln!(
            std::io::stderr(),
            "skipping interpreters_run_sandboxed_as_the_sandbox_user: needs root (and setpriv)"
        );
        return;
    }
    let mut agent = Agent::start_dropping_privileges();
    agent.hello();
    let r = agent.exec(SH, probe);
    assert_eq!(r.outcome.exit_code, 0, "stderr: {}", r.stderr());
    assert_eq!(
        r.stdout(),
        "1000\n1000\n1000\n1024\nUid:\t1000\t1000\t1000\t1000\nNoNewPrivs:\t1\nsession-leader\n",
        "uid, gid, no other groups, RLIMIT_NPROC, no-new-privs, own session"
    );
}

#[test]
fn timeout_kills_and_next_exec_works() {
    let mut agent = started();
    agent.exec(PY, "warm = True");
    let mut request = Agent::request(
        PY,
        "import subprocess, sys\nsubprocess.Popen(['sleep', '1000'])\nprint('spinning', flush=True)\nwhile True: pass",
    );
    request.timeout_ms = 1500;
    let r = agent.exec_request(request);
    let took = r.events.last().unwrap().at - r.sent_at;
    assert_eq!(r.outcome.exit_code, -1);
    assert!(r.outcome.timed_out);
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert!(took >= Duration::from_millis(1500), "took {took:?}");
    assert_eq!(r.stdout(), "spinning\n");
    assert!(
        r.stderr().ends_with("\nExecution timed out after 1.5 s\n"),
        "{}",
        r.stderr()
    );
    let agent_pid = agent.pid();
    assert!(
        wait_until(Duration::from_secs(3), || !has_descendant(
            agent_pid, "sleep"
        )),
        "the background sleep survived the timeout"
    );
    let r = agent.exec(PY, "print('warm' in globals())");
    assert_eq!((r.stdout().as_str(), r.outcome.exit_code), ("False\n", 0));
}

#[test]
fn bash_timeout_with_trap_is_killed_after_grace() {
    let mut agent = started();
    let mut request = Agent::request(SH, "trap '' TERM; while :; do :; done");
    request.timeout_ms = 500;
    let r = agent.exec_request(request);
    let took = r.events.last().unwrap().at - r.sent_at;
    assert_eq!(r.outcome.exit_code, -1);
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert_eq!(agent.exec(SH, "echo ok").stdout(), "ok\n");
}

/// Whether a process named `name` runs in the session tree of `root` (children via /proc).
fn has_descendant(root: u32, name: &str) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    let mut parents = std::collections::HashMap::new();
    let mut names = std::collections::HashMap::new();
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let mut rest = stat[close + 1..].split_whitespace();
        let state = rest.next().unwrap_or("");
        let ppid: u32 = rest.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if state != "Z" {
            parents.insert(pid, ppid);
            names.insert(pid, comm);
        }
    }
    names.iter().any(|(pid, comm)| {
        if comm != name {
            return false;
        }
        let mut p = *pid;
        for _ in 0..64 {
            match parents.get(&p) {
                Some(&pp) if pp == root => return true,
                Some(&pp) if pp > 1 => p = pp,
                _ => return false,
            }
        }
        false
    })
}

#[test]
fn stdout_is_capped_and_flagged() {
    let mut agent = started();
    let mut request = Agent::request(
        PY,
        "import sys\nsys.stdout.write('x' * 2_000_000)\nprint('done', file=sys.stderr)",
    );
    request.stdout_limit = 1_000_000;
    let r = agent.exec_request(request);
    assert_eq!(r.outcome.exit_code, 0);
    assert_eq!(r.stdout.len(), 1_000_000);
    assert!(r.stdout.iter().all(|b| *b == b'x'));
    assert!(r.outcome.stdout_truncated);
    assert!(!r.outcome.stderr_truncated);
    assert_eq!(r.stderr(), "done\n");
    for event in &r.events {
        if let Event::Stdout(chunk) = &event.event {
            assert!(chunk.len() <= 64 * 1024, "chunk of {}", chunk.len());
        }
    }
}

#[test]
fn output_streams_before_completion() {
    let mut agent = started();
    let r = agent.exec(
        PY,
        "import time\nprint('first', flush=True)\ntime.sleep(1)\nprint('second')",
    );
    assert_eq!(r.stdout(), "first\nsecond\n");
    let first = r
        .events
        .iter()
        .find(|e| matches!(e.event, Event::Stdout(_)))
        .unwrap();
    let done = r.events.last().unwrap();
    assert!(
        done.at - first.at >= Duration::from_millis(500),
        "first output came {:?} before completion",
        done.at - first.at
    );
}

#[test]
fn stdin_is_at_end_of_file() {
    let mut agent = started();
    let r = agent.exec(PY, "import sys\nprint(repr(sys.stdin.read()))\ntry:\n    input()\nexcept EOFError:\n    print('EOF')");
    assert_eq!(r.stdout(), "''\nEOF\n");
    let r = agent.exec(SH, "read line; echo \"rc=$?\"; cat; echo end");
    assert_eq!(r.stdout(), "rc=1\nend\n");
}

#[test]
fn env_applies_to_one_execution() {
    let mut agent = started();
    for (language, show) in [
        (
            PY,
            "import os; print(os.environ.get('SBX_T', 'unset'), os.environ['HOME'] != '')",
        ),
        (
            SH,
            "echo \"${SBX_T-unset}\" $([ -n \"$HOME\" ] && echo True)",
        ),
    ] {
        let mut request = Agent::request(language, show);
        request.env = vec![("SBX_T".into(), "a b\tc".into())];
        let r = agent.exec_request(request);
        assert_eq!(r.stdout(), "a b\tc True\n", "{language}");
        let r = agent.exec(language, show);
        assert_eq!(r.stdout(), "unset True\n", "{language}");
    }
    let mut request = Agent::request(SH, "echo $HOME_SET");
    request.env = vec![("HOME_SET".into(), "1".into())];
    agent.exec_request(request);
    agent.exec(SH, "export KEEP=mine");
    let mut request = Agent::request(SH, "echo $KEEP");
    request.env = vec![("KEEP".into(), "theirs".into())];
    assert_eq!(agent.exec_request(request).stdout(), "theirs\n");
    assert_eq!(agent.exec(SH, "echo $KEEP").stdout(), "mine\n", "restored");
}

#[test]
fn a_completion_line_forged_with_the_real_nonce_does_not_end_execution() {
    let mut agent = started();
    // The review's attack: the driver's nonce is on the interpreter's stack.
    let code = "import os, sys, time\n\
        f = sys._getframe()\n\
        while f is not None and 'nonce' not in f.f_locals:\n    f = f.f_back\n\
        os.write(4, (f.f_locals['nonce'] + ' 0\\n').encode())\n\
        time.sleep(0.3)\n\
        print('after', flush=True)\n\
        sys.exit(3)";
    let r = agent.exec(PY, code);
    assert_eq!(r.outcome.exit_code, 3, "stderr: {}", r.stderr());
    assert_eq!(r.stdout(), "after\n");
    assert!(
        r.stderr()
            .contains("wrote the driver's completion line itself"),
        "{}",
        r.stderr()
    );
    // The shell's user code runs with the driver's descriptors closed: it cannot even try.
    let r = agent.exec(SH, "echo \"$__sbx_nonce 0\" >&4; echo after; (exit 5)");
    assert_eq!(r.outcome.exit_code, 5, "stderr: {}", r.stderr());
    assert_eq!(r.stdout(), "after\n");
    assert!(r.stderr().contains("Bad file descriptor"), "{}", r.stderr());
    // And the interpreters keep working, without the note.
    let r = agent.exec(PY, "print(1)");
    assert_eq!((r.stdout().as_str(), r.stderr().as_str()), ("1\n", ""));
    let r = agent.exec(SH, "echo 2");
    assert_eq!((r.stdout().as_str(), r.stderr().as_str()), ("2\n", ""));
}

#[test]
fn forged_status_lines_do_not_end_execution() {
    let mut agent = started();
    let code = "import os, sys, time\n\
        fake = '0123456789abcdef0123456789abcdef 0\\n'\n\
        print('ready'); print(fake, end='', flush=True)\n\
        sys.stderr.write(fake); sys.stderr.flush()\n\
        os.write(4, fake.encode())\n\
        time.sleep(0.3)\n\
        print('after')\n\
        sys.exit(4)";
    let r = agent.exec(PY, code);
    assert_eq!(r.outcome.exit_code, 4, "stderr: {}", r.stderr());
    assert!(r.stdout().ends_with("after\n"), "{}", r.stdout());
    let r = agent.exec(
        SH,
        "echo '0123456789abcdef0123456789abcdef 0'; sleep 0.2; echo tail; exit 0",
    );
    assert_eq!(r.stdout(), "0123456789abcdef0123456789abcdef 0\ntail\n");
}

#[test]
fn ping_is_answered_during_an_execution() {
    let mut agent = started();
    let sent_at = Instant::now();
    let exec_id = agent.send(&Request::Exec(Agent::request(
        PY,
        "import time; time.sleep(1.5); print('done')",
    )));
    std::thread::sleep(Duration::from_millis(300));
    let ping_id = agent.send(&Request::Ping);
    let pong = agent.next_for(ping_id, EVENT_DEADLINE);
    assert_eq!(pong.event, Event::Pong);
    let r = agent.collect(exec_id, sent_at);
    assert_eq!(r.stdout(), "done\n");
    assert!(
        pong.at < r.events.last().unwrap().at,
        "pong waited for the exec"
    );
}

#[test]
fn executions_in_one_language_queue_others_run_alongside() {
    let mut agent = started();
    let sent_at = Instant::now();
    let a = agent.send(&Request::Exec(Agent::request(
        PY,
        "import time; time.sleep(0.5); v = 1; print('a')",
    )));
    let b = agent.send(&Request::Exec(Agent::request(PY, "print('b', v)")));
    let c = agent.send(&Request::Exec(Agent::request(SH, "echo c")));
    let rc = agent.collect(c, sent_at);
    let ra = agent.collect(a, sent_at);
    let rb = agent.collect(b, sent_at);
    assert_eq!(
        (ra.stdout().as_str(), rb.stdout().as_str()),
        ("a\n", "b 1\n")
    );
    assert_eq!(rc.stdout(), "c\n");
    assert!(
        ra.events.last().unwrap().at <= rb.events[0].at,
        "b ran after a"
    );
    assert!(
        rc.events.last().unwrap().at < ra.events.last().unwrap().at,
        "bash did not wait"
    );
}

#[test]
fn warm_starts_the_interpreter_ahead() {
    let mut agent = started();
    let warm = Request::Warm {
        language: PY,
        modules: Vec::new(),
    };
    let id = agent.send(&warm);
    match agent.next_for(id, EVENT_DEADLINE).event {
        Event::Warmed { elapsed_ms } => assert!(elapsed_ms > 0),
        other => panic!("expected Warmed, got {other:?}"),
    }
    let id = agent.send(&warm);
    assert_eq!(
        agent.next_for(id, EVENT_DEADLINE).event,
        Event::Warmed { elapsed_ms: 0 }
    );
    let r = agent.exec(PY, "print(1)");
    assert_eq!(r.outcome.interpreter_start_ms, 0);
}

#[test]
fn reseed_reseeds_running_interpreters_and_keeps_their_state() {
    let mut agent = started();
    let setup = "import random\nrandom.seed(1)\nkept = 7";
    assert_eq!(agent.exec(PY, setup).outcome.exit_code, 0);
    assert_eq!(agent.exec(SH, "RANDOM=1").outcome.exit_code, 0);
    let seeded = agent
        .exec(PY, "random.seed(1); print(random.random())")
        .stdout();
    assert_eq!(agent.exec(PY, "random.seed(1)").outcome.exit_code, 0);
    let id = agent.send(&Request::Reseed {
        entropy: vec![0x5a; 64],
        unix_time_ns: 0,
    });
    assert_eq!(
        agent.next_for(id, EVENT_DEADLINE).event,
        Event::Reseeded { interpreters: 2 }
    );
    let r = agent.exec(PY, "print(random.random()); print(kept)");
    assert_eq!(r.outcome.exit_code, 0, "stderr: {}", r.stderr());
    let (value, kept) = r
        .stdout()
        .split_once('\n')
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .unwrap();
    assert_ne!(format!("{value}\n"), seeded, "the generator was reseeded");
    assert_eq!(kept, "7\n", "user state survives a reseed");
}

#[test]
fn invalid_requests_are_refused() {
    let mut agent = started();
    let e = agent.exec_error(Agent::request(PY, "print(1)\0"));
    assert_eq!(e.kind, GuestErrorKind::InvalidRequest);
    assert!(e.message.contains("NUL"), "{}", e.message);
    let mut request = Agent::request(SH, "true");
    request.env = vec![("BAD-NAME".into(), "x".into())];
    let e = agent.exec_error(request);
    assert_eq!(e.kind, GuestErrorKind::InvalidRequest);
    assert!(e.message.contains("BAD-NAME"), "{}", e.message);
    let mut request = Agent::request(SH, "true");
    request.timeout_ms = 0;
    assert_eq!(
        agent.exec_error(request).kind,
        GuestErrorKind::InvalidRequest
    );
    assert_eq!(agent.exec(SH, "echo fine").stdout(), "fine\n");
}

#[test]
fn missing_interpreter_is_a_start_error() {
    let mut agent = Agent::start_with(&[("SBX_AGENT_BUN", "/nonexistent/bun")]);
    agent.hello();
    let e = agent.exec_error(Agent::request(JS, "console.log(1)"));
    assert_eq!(e.kind, GuestErrorKind::InterpreterStart);
    assert!(e.message.contains("/nonexistent/bun"), "{}", e.message);
    let id = agent.send(&Request::Warm {
        language: JS,
        modules: Vec::new(),
    });
    assert!(matches!(
        agent.next_for(id, EVENT_DEADLINE).event,
        Event::Error(_)
    ));
}

#[test]
fn background_processes_do_not_hold_up_completion() {
    let mut agent = started();
    let t = Instant::now();
    let r = agent.exec(SH, "sleep 30 & echo started");
    assert_eq!(r.stdout(), "started\n");
    assert!(t.elapsed() < Duration::from_secs(10));
    let r = agent.exec(SH, "(sleep 0.1; echo orphan) & wait $!; echo waited");
    assert_eq!(r.stdout(), "orphan\nwaited\n");
}

#[test]
fn orphans_are_reaped() {
    let mut agent = started();
    agent.exec(SH, "(sleep 0.2 &) ; true");
    let pid = agent.pid();
    std::thread::sleep(Duration::from_millis(400));
    let zombies = || {
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        children
            .split_whitespace()
            .filter(|c| {
                std::fs::read_to_string(format!("/proc/{c}/stat"))
                    .map(|s| {
                        s.rsplit_once(')')
                            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
                    })
                    .unwrap_or(false)
            })
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(3), || zombies() == 0),
        "zombies left"
    );
}

#[test]
fn shutdown_ends_the_agent() {
    let mut agent = started();
    agent.exec(PY, "print(1)");
    agent.send(&Request::Shutdown);
    assert!(agent.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn corrupt_frame_stops_the_agent() {
    let mut agent = started();
    agent.send_raw(b"XXXXXXXXXXXXXXXX");
    assert!(!agent.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn stdin_closed_ends_the_agent() {
    let mut agent = started();
    agent.exec(SH, "echo x");
    agent.close_stdin();
    assert!(agent.wait_exit(Duration::from_secs(10)).success());
}

fn js_agent(test: &str) -> Option<Agent> {
    if support::bun().is_none() {
        // Straight to stderr: the test harness would swallow eprintln! output of a passing test.
        let _ = writeln!(
            std::io::stderr(),
            "skipping {test}: set SBX_AGENT_BUN to a bun binary to run JavaScript tests"
        );
        return None;
    }
    Some(started())
}

#[test]
fn javascript_typescript_and_top_level_await() {
    let Some(mut agent) = js_agent("javascript_typescript_and_top_level_await") else {
        return;
    };
    let r = agent.exec(JS, "const x: number = 6*7; console.log(x)");
    assert_eq!(
        (r.stdout().as_str(), r.outcome.exit_code),
        ("42\n", 0),
        "{}",
        r.stderr()
    );
    let r = agent.exec(
        JS,
        "await new Promise(r => setTimeout(r, 10)); console.log('awaited')",
    );
    assert_eq!(r.stdout(), "awaited\n", "{}", r.stderr());
    let r = agent.exec(
        JS,
        "interface P { n: number }\nconst p: P = { n: x + 1 };\nconsole.log(p.n)",
    );
    assert_eq!(r.stdout(), "43\n", "state persists: {}", r.stderr());
    let r = agent.exec(
        JS,
        "setTimeout(() => console.log('later'), 200); console.log('now')",
    );
    assert_eq!(r.stdout(), "now\nlater\n", "pending timers finish first");
    let r = agent.exec(JS, "import { sep } from 'node:path'; console.log(sep)");
    assert_eq!(r.stdout(), "/\n", "{}", r.stderr());
    let r = agent.exec(JS, "export const m = 1; console.log('module', m)");
    assert_eq!(r.stdout(), "module 1\n", "module fallback: {}", r.stderr());
}

#[test]
fn javascript_exit_codes_and_errors() {
    let Some(mut agent) = js_agent("javascript_exit_codes_and_errors") else {
        return;
    };
    agent.exec(JS, "var kept = 'yes'");
    let r = agent.exec(JS, "console.log('a'); process.exit(3); console.log('b')");
    assert_eq!((r.stdout().as_str(), r.outcome.exit_code), ("a\n", 3));
    let r = agent.exec(JS, "setTimeout(() => process.exit(4), 10)");
    assert_eq!(r.outcome.exit_code, 4);
    let r = agent.exec(JS, "console.log(kept)");
    assert_eq!(r.stdout(), "yes\n", "process.exit did not kill the driver");
    let r = agent.exec(JS, "function f() { throw new TypeError('bad thing') }\nf()");
    assert_eq!(r.outcome.exit_code, 1);
    assert!(
        r.stderr().contains("TypeError: bad thing"),
        "{}",
        r.stderr()
    );
    assert!(!r.stderr().contains("driver.mjs"), "{}", r.stderr());
    let r = agent.exec(JS, "let = ;");
    assert_eq!(r.outcome.exit_code, 1);
    assert!(r.stderr().contains("SyntaxError"), "{}", r.stderr());
    let r = agent.exec(JS, "process.exitCode = 9");
    assert_eq!(r.outcome.exit_code, 9);
    let r = agent.exec(JS, "Promise.reject(new Error('nobody caught me'))");
    assert_eq!(r.outcome.exit_code, 1);
    assert!(r.stderr().contains("nobody caught me"), "{}", r.stderr());
    let r = agent.exec(JS, "console.log(await Bun.stdin.text() === '')");
    assert_eq!(r.stdout(), "true\n", "stdin at EOF: {}", r.stderr());
    let mut request = Agent::request(JS, "console.log(process.env.SBX_T)");
    request.env = vec![("SBX_T".into(), "v".into())];
    assert_eq!(agent.exec_request(request).stdout(), "v\n");
    assert_eq!(
        agent.exec(JS, "console.log(process.env.SBX_T)").stdout(),
        "undefined\n"
    );
}

#[test]
fn javascript_ignores_a_leading_bom() {
    let Some(mut agent) = js_agent("javascript_ignores_a_leading_bom") else {
        return;
    };
    let r = agent.exec(JS, "\u{feff}const n: number = 1; console.log('js', n)");
    assert_eq!(
        (r.stdout().as_str(), r.outcome.exit_code),
        ("js 1\n", 0),
        "{}",
        r.stderr()
    );
}

#[test]
fn javascript_timeout_and_relative_imports() {
    let Some(mut agent) = js_agent("javascript_timeout_and_relative_imports") else {
        return;
    };
    std::fs::write(agent.home.0.join("mod.ts"), "export const v: number = 7;\n").unwrap();
    let r = agent.exec(JS, "import { v } from './mod.ts'; console.log(v)");
    assert_eq!(r.stdout(), "7\n", "{}", r.stderr());
    let mut request = Agent::request(JS, "while (true) {}");
    request.timeout_ms = 1000;
    let r = agent.exec_request(request);
    assert_eq!(r.outcome.exit_code, -1);
    assert!(r.outcome.timed_out);
    assert_eq!(agent.exec(JS, "console.log('back')").stdout(), "back\n");
}

#[test]
fn env_names_that_hijack_are_refused_and_names_stay_data() {
    let mut agent = started();
    // The review's attacks, as the host would send them had it not refused them first.
    let attacks: [&[(&str, &str)]; 4] = [
        &[("__sbx_code", "echo HIJACKED")],
        &[("__sbx_nl", "@"), ("A", "x@PATH=/nonexistent@B=1")],
        &[("PS4", "$(echo HIJACKED >&2)")],
        &[("http_proxy", "http://127.0.0.1:9")],
    ];
    for env in attacks {
        let mut request = Agent::request(SH, "set -x; echo original");
        request.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let e = agent.exec_error(request);
        assert_eq!(e.kind, GuestErrorKind::InvalidRequest, "{env:?}");
        assert!(e.message.contains(env[0].0), "{env:?}: {}", e.message);
        assert!(e.message.contains("not allowed: it "), "{}", e.message);
    }
    let mut request = Agent::request(SH, "echo original");
    request.env = vec![("a[$(echo HIJACKED >&2)]".into(), "x".into())];
    assert_eq!(
        agent.exec_error(request).kind,
        GuestErrorKind::InvalidRequest
    );
    // User code may change the driver's variables in its own shell; the next command's
    // environment is still applied as data.
    agent.exec(SH, "__sbx_nl=@; __sbx_name=.; __sbx_env='X=1'");
    let mut request = Agent::request(SH, "echo \"$A|$B|$PATH\"");
    request.env = vec![
        ("A".into(), "x@PATH=/nonexistent".into()),
        ("B".into(), "1".into()),
    ];
    let r = agent.exec_request(request);
    let path = agent.exec(SH, "echo \"$PATH\"").stdout();
    assert_eq!(r.stdout(), format!("x@PATH=/nonexistent|1|{path}"));
    assert_eq!(agent.exec(SH, "echo \"${X-unset}\"").stdout(), "unset\n");
}
