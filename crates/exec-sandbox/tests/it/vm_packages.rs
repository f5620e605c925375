//! Package layers in real VMs: the tests build tiny EROFS layers with `mkfs.erofs`, attach them
//! with the testing-only `packages_layer` option, and check that the interpreters find the
//! packages (in a run, across a session, in subprocesses), that nothing of the layer is
//! writable or left as a device node, that runs with a layer never take a pooled VM and get
//! their own memory snapshots, and that an unusable layer is a clear boot error.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use exec_sandbox::{
    Error, ErrorKind, ExecOptions, ExecutionResult, Language, RunOptions, Scheduler,
    SchedulerConfig, SessionOptions,
};

use crate::support::{chain, wait_until};

/// A scheduler of its own: L1 as asked (with its own snapshot cache), `pool` warm VMs.
fn scheduler(l1: bool, pool: usize) -> (Scheduler, tempfile::TempDir) {
    let dir = tempfile::Builder::new()
        .prefix("sbx-packages-test-")
        .tempdir()
        .unwrap();
    let config = SchedulerConfig {
        l1_snapshots: l1,
        snapshot_cache_dir: dir.path().to_path_buf(),
        warm_pool_size: pool,
        ..SchedulerConfig::from_env().unwrap()
    };
    (Scheduler::new(config).unwrap(), dir)
}

async fn run(s: &Scheduler, options: RunOptions) -> ExecutionResult {
    s.run(options)
        .await
        .unwrap_or_else(|e| panic!("run failed: {}", chain(&e)))
}

/// `mkfs.erofs`, installed with the image build tools.
fn mkfs_erofs() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("mkfs.erofs"))
            .find(|p| p.is_file())
    });
    on_path
        .or_else(|| {
            ["/usr/sbin/mkfs.erofs", "/sbin/mkfs.erofs"]
                .into_iter()
                .map(PathBuf::from)
                .find(|p| p.is_file())
        })
        .expect("mkfs.erofs (erofs-utils) is needed: `sbx prefetch` installs it")
}

/// A layer image built from files written into a directory, as the host's builder would.
struct Layer {
    image: PathBuf,
    _dir: tempfile::TempDir,
}

impl Layer {
    fn build(files: &[(&str, &str)], executables: &[&str]) -> Layer {
        let dir = tempfile::Builder::new()
            .prefix("sbx-layer-")
            .tempdir()
            .unwrap();
        let root = dir.path().join("root");
        for (path, content) in files {
            let path = root.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, content).unwrap();
        }
        for path in executables {
            std::fs::set_permissions(root.join(path), std::fs::Permissions::from_mode(0o755))
                .unwrap();
        }
        let image = dir.path().join("layer.erofs");
        let out = Command::new(mkfs_erofs())
            .args(["-zlz4hc", "--all-root", "--quiet"])
            .arg(&image)
            .arg(&root)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mkfs.erofs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Layer { image, _dir: dir }
    }
}

/// `sbxdemo` (imports its dependency `sbxdep`, has a console script), and `sbxpth`, whose
/// `.pth` file puts a directory on `sys.path`: what `pip install --target python` leaves.
fn python_layer() -> Layer {
    Layer::build(
        &[
            (
                "python/sbxdemo/__init__.py",
                "from sbxdep import twice\n\ndef greet(name):\n    return f'hello {name} {twice(21)}'\n",
            ),
            (
                "python/sbxdep/__init__.py",
                "def twice(x):\n    return 2 * x\n",
            ),
            (
                "python/sbxdemo-1.0.dist-info/METADATA",
                "Metadata-Version: 2.1\nName: sbxdemo\nVersion: 1.0\n",
            ),
            ("python/sbxdemo-1.0.dist-info/top_level.txt", "sbxdemo\n"),
            ("python/sbxpth.pth", "sbxpth_lib\n"),
            ("python/sbxpth_lib/sbxhidden.py", "VALUE = 'via pth'\n"),
            (
                "python/bin/sbxdemo",
                "#!/usr/bin/python3\nimport sys\nfrom sbxdemo import greet\nprint(greet(sys.argv[1]))\n",
            ),
        ],
        &["python/bin/sbxdemo"],
    )
}

/// `sbx-demo` (CommonJS, depends on `sbx-dep`) and `@sbx/esm` (ESM, depends on `sbx-demo`):
/// what `npm install --prefix node` leaves.
fn js_layer() -> Layer {
    Layer::build(
        &[
            (
                "node/node_modules/sbx-dep/package.json",
                r#"{"name":"sbx-dep","version":"1.0.0","main":"index.js"}"#,
            ),
            (
                "node/node_modules/sbx-dep/index.js",
                "exports.twice = (x) => 2 * x;\n",
            ),
            (
                "node/node_modules/sbx-demo/package.json",
                r#"{"name":"sbx-demo","version":"1.0.0","main":"index.js","dependencies":{"sbx-dep":"1.0.0"}}"#,
            ),
            (
                "node/node_modules/sbx-demo/index.js",
                "const { twice } = require('sbx-dep');\nexports.demo = (x) => twice(x) + 1;\n",
            ),
            (
                "node/node_modules/@sbx/esm/package.json",
                r#"{"name":"@sbx/esm","version":"1.0.0","type":"module","exports":"./index.js"}"#,
            ),
            (
                "node/node_modules/@sbx/esm/index.js",
                "import { demo } from 'sbx-demo';\nexport const esm = (x) => demo(x) * 10;\nexport default 'esm-default';\n",
            ),
        ],
        &[],
    )
}

const PYTHON_CHECKS: &str = r#"import errno, importlib.metadata, mmap, os, subprocess, sys
import sbxdemo, sbxhidden
print(sbxdemo.greet("run"), "|", sbxhidden.VALUE, "|", importlib.metadata.version("sbxdemo"))
sub = subprocess.run([sys.executable, "-c", "import sbxdemo, sbxhidden; print(sbxdemo.greet('sub'), sbxhidden.VALUE)"], capture_output=True, text=True)
print(sub.stdout.strip() or sub.stderr)
bare = subprocess.run(["env", "-i", "/usr/bin/python3", "-c", "import sbxdemo; print('bare env', sbxdemo.greet('x'))"], capture_output=True, text=True)
print(bare.stdout.strip() or bare.stderr)
script = subprocess.run(["sbxdemo", "script"], capture_output=True, text=True)
print(script.stdout.strip() or script.stderr)
site = os.path.dirname(os.path.dirname(sbxdemo.__file__))
stdlib = os.path.dirname(os.__file__)
print("after stdlib", sys.path.index(site) > sys.path.index(stdlib))
for path in [site + "/sbxdemo/new.py", site + "/sbxdemo/__init__.py", "/opt/sbx/packages/python/x", "/opt/sbx/x", "/opt/x"]:
    try:
        open(path, "a").close()
        print("WROTE", path)
    except OSError as e:
        print(errno.errorcode[e.errno] in ("EROFS", "EACCES"), end=" ")
print()
with open(sbxdemo.__file__, "rb") as f:
    mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ | mmap.PROT_EXEC).close()
print("exec mappings allowed")
print("disks:", sorted(n for n in os.listdir("/dev") if n.startswith("vd")))
for line in open("/proc/self/mountinfo"):
    fields = line.split()
    if fields[4] in ("/opt/sbx/packages", site):
        opts = set(fields[5].split(","))
        print(fields[4] == site, {"ro", "nosuid", "nodev"} <= opts, "noexec" in opts)
"#;

#[tokio::test]
async fn python_finds_the_layer_everywhere_and_cannot_change_it() {
    let (s, _dir) = scheduler(false, 0);
    let layer = python_layer();
    let r = run(
        &s,
        RunOptions::new(Language::Python, PYTHON_CHECKS).packages_layer(&layer.image),
    )
    .await;
    assert_eq!(r.exit_code, 0, "stderr: {}", r.stderr);
    assert!(!r.warm_pool_hit);
    assert_eq!(
        r.stdout,
        "hello run 42 | via pth | 1.0\n\
         hello sub 42 via pth\n\
         bare env hello x 42\n\
         hello script 42\n\
         after stdlib True\n\
         True True True True True \n\
         exec mappings allowed\n\
         disks: []\n\
         False True False\n\
         True True False\n",
        "stderr: {}",
        r.stderr
    );

    // The same scheduler without a layer: as before.
    let r = run(
        &s,
        RunOptions::new(
            Language::Python,
            "import os\nprint(os.path.exists('/opt/sbx'), os.listdir('/usr/local/lib/python3.11/dist-packages'), 'NODE_PATH' in os.environ, os.environ['PATH'])\nimport sbxdemo",
        ),
    )
    .await;
    assert_eq!(r.stdout, "False [] False /usr/local/bin:/usr/bin:/bin\n");
    assert_eq!(r.exit_code, 1);
    assert!(
        r.stderr
            .contains("ModuleNotFoundError: No module named 'sbxdemo'"),
        "{}",
        r.stderr
    );
}

const JS_CHECKS: &str = r#"import demo from 'sbx-demo';
import { esm } from '@sbx/esm';
import { readdirSync, writeFileSync } from 'node:fs';
const { demo: viaRequire } = require('sbx-demo');
const dynamic = await import('@sbx/esm');
console.log(demo.demo(1), esm(1), viaRequire(2), dynamic.default);
writeFileSync('/home/user/main.ts', "import { esm } from '@sbx/esm';\nconsole.log('file', esm(3));\n");
const p = Bun.spawnSync(['bun', 'main.ts'], { cwd: '/home/user' });
console.log(p.stdout.toString().trim() || p.stderr.toString());
const codes = [];
for (const path of ['/opt/sbx/packages/node/node_modules/sbx-demo/index.js', '/opt/sbx/packages/node/node_modules/new.js', '/opt/sbx/x']) {
  try { writeFileSync(path, 'x'); codes.push('WROTE ' + path); } catch (e) { codes.push(e.code); }
}
console.log(codes.join(' '));
console.log('disks:', readdirSync('/dev').filter((n) => n.startsWith('vd')).length);
"#;

#[tokio::test]
async fn javascript_finds_the_layer_from_the_driver_and_from_bun_files() {
    let (s, _dir) = scheduler(false, 0);
    let layer = js_layer();
    let r = run(
        &s,
        RunOptions::new(Language::Javascript, JS_CHECKS).packages_layer(&layer.image),
    )
    .await;
    assert_eq!(
        (r.stdout.as_str(), r.exit_code),
        (
            "3 30 5 esm-default\nfile 70\nEROFS EROFS EROFS\ndisks: 0\n",
            0
        ),
        "stderr: {}",
        r.stderr
    );
}

#[tokio::test]
async fn a_session_keeps_the_layer_across_executions() {
    let (s, _dir) = scheduler(false, 0);
    let layer = python_layer();
    let session = s
        .session(SessionOptions::new(Language::Python).packages_layer(&layer.image))
        .await
        .unwrap_or_else(|e| panic!("session failed: {}", chain(&e)));
    let exec = async |code: &str| {
        let r = session
            .exec(ExecOptions::new(code))
            .await
            .unwrap_or_else(|e| panic!("exec failed: {}", chain(&e)));
        assert_eq!(r.exit_code, 0, "{code}: {}", r.stderr);
        r.stdout
    };
    assert_eq!(
        exec("import sbxdemo\nfirst = sbxdemo.greet('one')").await,
        ""
    );
    assert_eq!(
        exec("import sbxdep, subprocess\nprint(first, sbxdep.twice(2))\nsubprocess.run(['sbxdemo', 'two'])").await,
        "hello one 42 4\nhello two 42\n"
    );
    session.close().await;
}

#[tokio::test]
async fn runs_with_a_layer_skip_the_pool_and_get_their_own_templates() {
    let (s, dir) = scheduler(true, 1);
    let pooled = || {
        s.warm_pool_vms()
            .into_iter()
            .find(|vm| vm.language == Language::Python)
            .map(|vm| vm.name)
    };
    wait_until("a warm VM", Duration::from_secs(180), || pooled().is_some()).await;
    let warm_vm = pooled();
    let layer = python_layer();
    let code = "import sbxdemo; print(sbxdemo.greet('l1'))";
    let with_layer = || RunOptions::new(Language::Python, code).packages_layer(&layer.image);

    let cold = run(&s, with_layer()).await;
    assert_eq!(cold.stdout, "hello l1 42\n", "stderr: {}", cold.stderr);
    assert!(!cold.warm_pool_hit, "pooled VMs have no layer");
    assert!(!cold.l1_cache_hit, "no template for this layer yet");
    assert_eq!(pooled(), warm_vm, "the pooled VM was left alone");
    s.wait_for_snapshots().await;
    // The pool keeps every language: count python's templates only.
    let templates = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("meta.json")).ok())
        .filter(|meta| {
            serde_json::from_str::<serde_json::Value>(meta).is_ok_and(|m| m["language"] == "python")
        })
        .count();
    assert_eq!(templates, 2, "the pool's python template and the layer's");

    let restored = run(&s, with_layer()).await;
    assert_eq!(
        restored.stdout, "hello l1 42\n",
        "stderr: {}",
        restored.stderr
    );
    assert!(restored.l1_cache_hit, "restored from the layer's template");
    assert!(!restored.warm_pool_hit);

    // The pool still serves plain runs, which do not see the layer.
    let plain = run(
        &s,
        RunOptions::new(
            Language::Python,
            "import importlib.util as u; print(u.find_spec('sbxdemo'))",
        ),
    )
    .await;
    assert_eq!(plain.stdout, "None\n", "stderr: {}", plain.stderr);
    assert!(plain.warm_pool_hit);

    // Another layer never restores this one's template.
    let other = python_layer();
    let r = run(
        &s,
        RunOptions::new(Language::Python, code).packages_layer(&other.image),
    )
    .await;
    assert_eq!(r.stdout, "hello l1 42\n", "stderr: {}", r.stderr);
    assert!(!r.l1_cache_hit, "another layer, another template");
    s.wait_for_snapshots().await;
}

#[tokio::test]
async fn an_unusable_layer_is_a_clear_boot_error() {
    let (s, _dir) = scheduler(false, 0);
    let junk = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(junk.path(), vec![0x5a; 64 * 1024]).unwrap();
    let err = s
        .run(RunOptions::new(Language::Python, "print(1)").packages_layer(junk.path()))
        .await
        .expect_err("a layer that is not EROFS cannot be mounted");
    assert!(matches!(err, Error::Boot(_)), "{}", chain(&err));
    assert_eq!(err.kind(), ErrorKind::Permanent, "{}", chain(&err));
    let text = chain(&err);
    assert!(
        text.contains(&format!(
            "the guest could not mount the package layer {}: cannot mount the layer on /opt/sbx/packages",
            junk.path().display()
        )),
        "{text}"
    );
    assert!(Path::new(junk.path()).exists());
}
