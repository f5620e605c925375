//! Environment hijacks: every name in `sbx_protocol::env::DENIED` is refused before a VM is
//! touched, and the hijacks behind the rows are shown to be real inside a VM (by a program that
//! sets the variable for a child of its own, which is what a caller's `env` would do for every
//! program of the execution).

use exec_sandbox::{Error, ErrorKind, Language, RunOptions, Scheduler, SchedulerConfig};

use crate::support::{chain, run};

#[tokio::test]
async fn every_denied_name_is_refused_before_a_vm_starts() {
    // A scheduler of its own, so that its VM count is this test's.
    let scheduler = Scheduler::new(SchedulerConfig::from_env().unwrap()).unwrap();
    for (name, value) in [
        ("__sbx_code", "echo HIJACKED"),
        ("__sbx_nl", "@"),
        ("PS4", "$(id)"),
        ("BASH_ENV", "/tmp/x"),
        ("PYTHONBREAKPOINT", "os.system"),
        ("PYTHONWARNINGS", "ignore::x.Y"),
        ("CDPATH", "/etc"),
        ("GLOBIGNORE", "*"),
        ("NODE_OPTIONS", "--require=/tmp/x.js"),
        ("HTTPS_PROXY", "http://127.0.0.1:9"),
        ("GIT_SSH_COMMAND", "id"),
        ("GCONV_PATH", "/tmp"),
    ] {
        let options = RunOptions::new(Language::Raw, "echo original").env(name, value);
        let error = scheduler.run(options).await.unwrap_err();
        assert!(matches!(error, Error::Validation(_)), "{name}: {error:?}");
        assert_eq!(error.kind(), ErrorKind::InvalidInput);
        let shown = chain(&error);
        assert!(
            shown.contains(name) && shown.contains("not allowed"),
            "{shown}"
        );
    }
    assert_eq!(scheduler.peak_vms(), 0, "a refused run started a VM");
}

#[tokio::test]
async fn the_hijacks_behind_the_rows_are_real_in_the_guest() {
    let script = r#"
cd "$(mktemp -d)"
echo 'echo "BASH_ENV ran"' > env.sh
PS4='$(echo "PS4 ran" >&2)+ ' bash -xc true 2>&1
BASH_ENV=./env.sh bash -c true
mkdir -p elsewhere/target
CDPATH=$PWD/elsewhere bash -c 'cd target >/dev/null && echo "CDPATH moved cd to ${PWD##*/elsewhere/}"'
touch a b
# What the bash driver does with a caller's variable: `export` it in the user's shell.
(export GLOBIGNORE=a; echo "GLOBIGNORE left:" *)
"#;
    let r = run(Language::Raw, script).await;
    assert_eq!(r.exit_code, 0, "{}", r.stderr);
    for shown in [
        "PS4 ran",
        "BASH_ENV ran",
        "CDPATH moved cd to target",
        "GLOBIGNORE left: b elsewhere env.sh",
    ] {
        assert!(r.stdout.contains(shown), "{shown}: {}", r.stdout);
    }
    // A program's own `breakpoint()` imports and calls whatever the variable names.
    let program = r#"
import os, subprocess, sys, tempfile
d = tempfile.mkdtemp()
with open(os.path.join(d, "hijack.py"), "w") as f:
    f.write("def run(*a):\n    print('PYTHONBREAKPOINT ran')\n")
env = dict(os.environ, PYTHONBREAKPOINT="hijack.run")
subprocess.run([sys.executable, "-c", "breakpoint()"], env=env, cwd=d, check=True)
"#;
    let r = run(Language::Python, program).await;
    assert_eq!(r.stdout, "PYTHONBREAKPOINT ran\n", "{}", r.stderr);
}
