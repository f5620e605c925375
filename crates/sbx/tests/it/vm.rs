//! End-to-end runs in real microVMs: the CLI half of the acceptance list.
//! The first one may build the images.

use std::time::Duration;

use predicates::prelude::*;

use crate::sbx;

/// Generous: software emulation boots slowly, and the first run may build the images.
const RUN_DEADLINE: Duration = Duration::from_secs(20 * 60);

fn json_of(stdout: &[u8]) -> serde_json::Value {
    let text = std::str::from_utf8(stdout).unwrap();
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn python_prints_42() {
    sbx()
        .args(["run", "print(6*7)"])
        .timeout(RUN_DEADLINE)
        .assert()
        .success()
        .stdout("42\n");
}

#[test]
fn typescript_prints_42() {
    sbx()
        .args([
            "run",
            "-l",
            "javascript",
            "const x: number = 6*7; console.log(x)",
        ])
        .timeout(RUN_DEADLINE)
        .assert()
        .success()
        .stdout("42\n");
}

#[test]
fn raw_prints_42_as_uid_1000() {
    sbx()
        .args(["run", "-l", "raw", "echo $((6*7)); id -u"])
        .timeout(RUN_DEADLINE)
        .assert()
        .success()
        .stdout("42\n1000\n");
}

#[test]
fn code_from_stdin() {
    sbx()
        .args(["run", "-"])
        .write_stdin("print(1)\n")
        .timeout(RUN_DEADLINE)
        .assert()
        .success()
        .stdout("1\n");
}

#[test]
fn a_file_source_takes_its_language_from_the_extension() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hello.sh");
    std::fs::write(&path, "echo from-bash-$BASH_VERSINFO\n").unwrap();
    sbx()
        .arg("run")
        .arg(&path)
        .timeout(RUN_DEADLINE)
        .assert()
        .success()
        .stdout(predicate::str::starts_with("from-bash-"));
}

/// The program never ends by itself: only the 2 s timeout can end the run with 124. Were the
/// timeout not enforced, the hang guard would kill `sbx` (no status) and the test would fail.
#[test]
fn timeout_exits_124() {
    sbx()
        .args(["run", "-t", "2", "while True: pass"])
        .timeout(RUN_DEADLINE)
        .assert()
        .code(124)
        .stdout("");
}

#[test]
fn timeout_in_json_has_exit_code_minus_1() {
    let out = sbx()
        .args(["run", "--json", "-t", "2", "while True: pass"])
        .timeout(RUN_DEADLINE)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(124));
    let v = json_of(&out.stdout);
    assert_eq!(v["exit_code"], -1);
    assert_eq!(v["timed_out"], true);
}

#[test]
fn the_program_exit_code_is_the_status() {
    sbx()
        .args(["run", "import sys; sys.exit(3)"])
        .timeout(RUN_DEADLINE)
        .assert()
        .code(3);
}

#[test]
fn json_names_the_accelerator_and_why() {
    let out = sbx()
        .args(["run", "--json", "print(6*7)"])
        .timeout(RUN_DEADLINE)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v = json_of(&out.stdout);
    assert_eq!(v["stdout"], "42\n");
    assert_eq!(v["source"], "code[1]");
    assert!(
        matches!(v["accelerator"]["name"].as_str(), Some("kvm" | "tcg")),
        "{v}"
    );
    assert!(
        !v["accelerator"]["reason"].as_str().unwrap_or("").is_empty(),
        "{v}"
    );
    for key in exec_sandbox::Timing::PHASES {
        assert!(v["timing"][key].is_u64(), "{key}: {v}");
    }
}

#[test]
fn json_and_debug_say_which_host_walls_stood_around_qemu() {
    let out = sbx()
        .args(["run", "--json", "--debug", "print(6*7)"])
        .timeout(RUN_DEADLINE)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v = json_of(&out.stdout);
    assert_eq!(v["stdout"], "42\n");
    let isolation = &v["isolation"];
    let cgroup = isolation["cgroup"].as_bool().expect("isolation.cgroup");
    if cgroup {
        assert!(
            matches!(
                isolation["cgroup_version"].as_str(),
                Some("v1" | "v2" | "v1+v2")
            ),
            "{v}"
        );
        assert!(v["external_cpu_nr_throttled"].is_u64(), "{v}");
    } else {
        // No cgroup is never silent: the result says why.
        assert!(
            isolation["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "{v}"
        );
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let finished = stderr
        .lines()
        .find(|l| l.contains("finished"))
        .unwrap_or_else(|| panic!("no finished line in --debug output: {stderr}"));
    assert!(finished.contains(&format!("cgroup={cgroup}")), "{finished}");
    assert!(finished.contains("vm_start_ms="), "{finished}");
}

/// The number after `key=` in `line`.
fn field(line: &str, key: &str) -> u64 {
    let at = line
        .find(&format!("{key}="))
        .unwrap_or_else(|| panic!("no {key} in {line}"));
    line[at + key.len() + 1..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or_else(|e| panic!("{key} in {line}: {e}"))
}

/// `--debug` boots (a clone prints no boot log) and shows the guest's boot on its own clock,
/// step after step, before the code runs: the interpreter's process started after the agent
/// served the host (its start time, from the guest's `/proc`, is later).
#[test]
fn debug_shows_the_guest_boot_timeline() {
    // Field 22 of /proc/self/stat: start time in clock ticks since boot.
    let code = "import os\n\
                ticks = int(open('/proc/self/stat').read().rsplit(')', 1)[1].split()[19])\n\
                print(ticks * 1000 // os.sysconf('SC_CLK_TCK'))";
    let out = sbx()
        .args(["run", "--json", "--debug", code])
        .timeout(RUN_DEADLINE)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v = json_of(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let timeline = stderr
        .lines()
        .find(|l| l.contains("guest boot timeline"))
        .unwrap_or_else(|| panic!("no boot timeline in --debug output: {stderr}"));
    let kernel = field(timeline, "kernel_ms");
    let root = field(timeline, "root_mounted_ms");
    let configured = field(timeline, "configured_ms");
    let serving = field(timeline, "agent_serving_ms");
    assert!(
        0 < kernel && kernel <= root && root <= configured && configured <= serving,
        "{timeline}"
    );
    let started_ms: u64 = v["stdout"]
        .as_str()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("{v}"));
    // Clock ticks are 10 ms.
    assert!(
        started_ms + 10 >= serving,
        "the interpreter started at {started_ms} ms, before the agent served ({serving} ms): \
         {timeline}"
    );
    assert!(
        v["timing"]["interpreter_start_ms"].as_u64() > Some(0),
        "{v}"
    );
}

#[test]
fn several_sources_print_in_order_without_interleaving() {
    let out = sbx()
        .args([
            "run",
            "-j",
            "3",
            "import time; time.sleep(2); print('first')",
            "print('second')",
            "-c",
            "import sys; print('third'); sys.exit(5)",
        ])
        .timeout(RUN_DEADLINE)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "first\nsecond\nthird\n"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let headers: Vec<_> = stderr.lines().filter(|l| l.starts_with("==> [")).collect();
    assert_eq!(headers.len(), 3, "{stderr}");
    assert!(
        headers[0].starts_with("==> [1/3] code[1] (exit 0,"),
        "{stderr}"
    );
    assert!(
        headers[2].starts_with("==> [3/3] code[3] (exit 5,"),
        "{stderr}"
    );
}

#[test]
fn several_sources_in_json_give_one_line_each_in_order() {
    let out = sbx()
        .args(["run", "--json", "print(1)", "-c", "print(2)"])
        .timeout(RUN_DEADLINE)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["stdout"], "1\n");
    assert_eq!(lines[1]["stdout"], "2\n");
}

#[test]
fn env_vars_reach_the_program() {
    sbx()
        .args([
            "run",
            "-e",
            "GREETING=hi there",
            "import os; print(os.environ['GREETING'])",
        ])
        .timeout(RUN_DEADLINE)
        .assert()
        .success()
        .stdout("hi there\n");
}

#[test]
fn upload_then_download_through_a_session() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.csv"), "a,b\n1,2\n").unwrap();
    sbx()
        .current_dir(dir.path())
        .args([
            "run",
            "--upload",
            "in.csv:data/in.csv",
            "--download",
            "data/out.txt",
            "open('data/out.txt', 'w').write(open('data/in.csv').read().upper())\nprint('done')",
        ])
        .timeout(RUN_DEADLINE)
        .assert()
        .success()
        .stdout("done\n");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("out.txt")).unwrap(),
        "A,B\n1,2\n"
    );
    // A download that fails leaves no file behind.
    sbx()
        .current_dir(dir.path())
        .args(["run", "--download", "missing.txt", "print(1)"])
        .timeout(RUN_DEADLINE)
        .assert()
        .failure();
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn expose_is_announced_on_stderr_and_in_json_and_the_guest_gets_a_nic() {
    let out = sbx()
        .args([
            "run",
            "--json",
            "-l",
            "raw",
            "--expose",
            "80",
            "--expose",
            "53/udp",
            "ls /sys/class/net | tr '\\n' ' '",
        ])
        .timeout(RUN_DEADLINE)
        .assert()
        .success()
        .get_output()
        .clone();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let json = json_of(&out.stdout);
    assert_eq!(json["stdout"], "eth0 lo ", "{json}");
    let ports = json["exposed_ports"].as_array().expect("exposed_ports");
    assert_eq!(ports.len(), 2, "{json}");
    assert_eq!(ports[0]["internal"], 80);
    assert_eq!(ports[0]["protocol"], "tcp");
    assert_eq!(ports[1]["protocol"], "udp");
    let url = ports[0]["url"].as_str().unwrap();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    assert!(
        stderr.contains(&format!("port 80/tcp -> {url}")),
        "the port is announced on stderr: {stderr}"
    );
}

#[test]
fn allow_domain_implies_network_and_unlisted_names_do_not_resolve() {
    // --allow-domain implies --network; an unlisted name gets NXDOMAIN from the gateway.
    sbx()
        .args([
            "run",
            "-l",
            "raw",
            "--allow-domain",
            "example.com",
            "getent hosts unlisted.test || echo refused; ls /sys/class/net | tr '\\n' ' '",
        ])
        .timeout(RUN_DEADLINE)
        .assert()
        .success()
        .stdout("refused\neth0 lo ");
}
