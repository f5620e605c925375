//! Package layers in dev mode: `SBX_AGENT_PACKAGES` names a directory laid out like a mounted
//! layer, which the agent points `PATH` and `NODE_PATH` at (the VM's mount and Python's site
//! directory are covered by the host's VM tests); and warm-ups that import modules.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use sbx_protocol::{Event, GuestErrorKind, Language, Request};

use crate::support::{Agent, EVENT_DEADLINE, TempDir, bun};

const PY: Language = Language::Python;
const SH: Language = Language::Raw;
const JS: Language = Language::Javascript;

fn write(path: &Path, content: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

/// A layer with a console script and three npm packages: `sbx-demo` (CommonJS, depends on
/// `sbx-dep`, counts its loads in a global) and `@sbx/esm` (ESM, depends on `sbx-demo`).
fn layer() -> TempDir {
    let dir = TempDir::new("layer");
    let script = dir.0.join("python/bin/sbx-hello");
    write(&script, "#!/bin/sh\necho hello from the layer\n");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let nm = dir.0.join("node/node_modules");
    write(
        &nm.join("sbx-dep/package.json"),
        r#"{"name":"sbx-dep","version":"1.0.0","main":"index.js"}"#,
    );
    write(
        &nm.join("sbx-dep/index.js"),
        "exports.twice = (x) => 2 * x;\n",
    );
    write(
        &nm.join("sbx-demo/package.json"),
        r#"{"name":"sbx-demo","version":"1.0.0","main":"index.js","dependencies":{"sbx-dep":"1.0.0"}}"#,
    );
    write(
        &nm.join("sbx-demo/index.js"),
        "globalThis.sbxLoads = (globalThis.sbxLoads || 0) + 1;\n\
         const { twice } = require('sbx-dep');\n\
         exports.demo = (x) => twice(x) + 1;\n",
    );
    write(
        &nm.join("@sbx/esm/package.json"),
        r#"{"name":"@sbx/esm","version":"1.0.0","type":"module","exports":"./index.js"}"#,
    );
    write(
        &nm.join("@sbx/esm/index.js"),
        "import { demo } from 'sbx-demo';\n\
         export const esm = (x) => demo(x) * 10;\n\
         export default 'esm-default';\n",
    );
    dir
}

fn agent_with(layer: &TempDir) -> Agent {
    let mut agent = Agent::start_with(&[("SBX_AGENT_PACKAGES", layer.0.to_str().unwrap())]);
    agent.hello();
    agent
}

#[test]
fn a_layer_puts_its_scripts_last_on_path_and_its_node_modules_on_node_path() {
    let layer = layer();
    let mut agent = agent_with(&layer);
    let hello = {
        let mut plain = Agent::start_with(&[("SBX_AGENT_PACKAGES", "")]);
        plain.hello()
    };
    assert_eq!(hello.packages, sbx_protocol::layer::LayerStatus::Absent);
    let r = agent.exec(SH, "echo \"$PATH\"; echo \"$NODE_PATH\"; sbx-hello");
    let bin = layer.0.join("python/bin");
    let nm = layer.0.join("node/node_modules");
    assert_eq!(
        r.stdout(),
        format!(
            "/usr/local/bin:/usr/bin:/bin:{}\n{}\nhello from the layer\n",
            bin.display(),
            nm.display()
        ),
        "{}",
        r.stderr()
    );
    let r = agent.exec(
        PY,
        "import os, subprocess\nprint(os.environ['NODE_PATH'])\n\
         print(subprocess.run(['sbx-hello'], capture_output=True, text=True).stdout, end='')",
    );
    assert_eq!(
        r.stdout(),
        format!("{}\nhello from the layer\n", nm.display()),
        "{}",
        r.stderr()
    );
}

#[test]
fn warm_imports_modules_without_touching_the_namespace() {
    let mut agent = Agent::start();
    agent.hello();
    let id = agent.send(&Request::Warm {
        language: PY,
        modules: vec![
            "decimal".into(),
            "no_such_module_sbx".into(),
            "json.decoder".into(),
        ],
    });
    match agent.next_for(id, EVENT_DEADLINE).event {
        Event::Warmed { elapsed_ms } => assert!(elapsed_ms > 0),
        other => panic!("expected Warmed, got {other:?}"),
    }
    let r = agent.exec(
        PY,
        "import sys\n\
         print('decimal' in sys.modules, 'json.decoder' in sys.modules)\n\
         print(sorted(n for n in globals() if not n.startswith('__') or 'sbx' in n))",
    );
    assert_eq!(
        r.stdout(),
        "True True\n['sys']\n",
        "a failed import is skipped; nothing is left in the namespace: {}",
        r.stderr()
    );
    assert_eq!(
        r.outcome.interpreter_start_ms, 0,
        "the warm interpreter ran it"
    );

    let id = agent.send(&Request::Warm {
        language: PY,
        modules: vec!["os".into(), "os; import x".into()],
    });
    match agent.next_for(id, EVENT_DEADLINE).event {
        Event::Error(e) => {
            assert_eq!(e.kind, GuestErrorKind::InvalidRequest);
            assert!(e.message.contains("os; import x"), "{}", e.message);
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

fn js_agent_with(test: &str, layer: &TempDir) -> Option<Agent> {
    if bun().is_none() {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "skipping {test}: set SBX_AGENT_BUN to a bun binary to run JavaScript tests"
        );
        return None;
    }
    Some(agent_with(layer))
}

#[test]
fn javascript_finds_layer_packages_from_the_driver_files_and_subprocesses() {
    let layer = layer();
    let Some(mut agent) = js_agent_with(
        "javascript_finds_layer_packages_from_the_driver_files_and_subprocesses",
        &layer,
    ) else {
        return;
    };
    // Before anything resolves: Bun caches what directories hold.
    write(
        &agent.home.0.join("node_modules/sbx-dep/index.js"),
        "exports.twice = () => 'mine';\n",
    );
    let check = |agent: &mut Agent, code: &str, expected: &str| {
        let r = agent.exec(JS, code);
        assert_eq!(
            (r.stdout().as_str(), r.outcome.exit_code),
            (expected, 0),
            "{code}: {}",
            r.stderr()
        );
    };
    check(
        &mut agent,
        "import demo from 'sbx-demo'; import { esm } from '@sbx/esm';\n\
         console.log(demo.demo(1), esm(1))",
        "3 30\n",
    );
    check(
        &mut agent,
        "const { demo } = require('sbx-demo'); console.log(demo(2))",
        "5\n",
    );
    check(
        &mut agent,
        "const m = await import('@sbx/esm'); console.log(m.default)",
        "esm-default\n",
    );
    // Code that only parses as a module runs from a file in /tmp.
    check(
        &mut agent,
        "import { esm } from '@sbx/esm';\nexport const x = 1;\nconsole.log(esm(2))",
        "50\n",
    );
    // `bun file` started by the user's code, from the home directory and from /tmp.
    let file = "import { esm } from '@sbx/esm';\nconst { demo } = require('sbx-demo');\n\
                console.log(esm(3), demo(3));\n";
    std::fs::create_dir_all(agent.home.0.join("sub")).unwrap();
    std::fs::write(agent.home.0.join("sub/main.ts"), file).unwrap();
    let tmp = TempDir::new("js-tmp");
    std::fs::write(tmp.0.join("main.mjs"), file).unwrap();
    check(
        &mut agent,
        &format!(
            "for (const f of ['sub/main.ts', {:?}]) {{\n\
               const p = Bun.spawnSync([process.execPath, f]);\n\
               process.stdout.write(p.stdout.toString() + p.stderr.toString());\n\
             }}",
            tmp.0.join("main.mjs").display().to_string()
        ),
        "70 7\n70 7\n",
    );
    // The user's own node_modules come first, as in Node; the layer's packages keep their own
    // dependencies.
    check(
        &mut agent,
        "console.log(require('sbx-dep').twice(1), require('sbx-demo').demo(1))",
        "mine 3\n",
    );
}

#[test]
fn javascript_warm_imports_load_packages_once() {
    let layer = layer();
    let Some(mut agent) = js_agent_with("javascript_warm_imports_load_packages_once", &layer)
    else {
        return;
    };
    let id = agent.send(&Request::Warm {
        language: JS,
        modules: vec!["sbx-demo".into(), "@sbx/esm".into(), "sbx-missing".into()],
    });
    match agent.next_for(id, EVENT_DEADLINE).event {
        Event::Warmed { .. } => {}
        other => panic!("expected Warmed, got {other:?}"),
    }
    let r = agent.exec(
        JS,
        "import { esm } from '@sbx/esm'; console.log(globalThis.sbxLoads, esm(1))",
    );
    assert_eq!(
        r.stdout(),
        "1 30\n",
        "loaded by the warm-up only: {}",
        r.stderr()
    );
}

#[test]
fn a_reseed_also_reseeds_numpys_global_generator() {
    let mut agent = Agent::start();
    agent.hello();
    // A stand-in for NumPy's `numpy.random` (the home directory is on `sys.path`): clones of a
    // template that imported it must not share its legacy global generator.
    write(&agent.home.0.join("numpy/__init__.py"), "");
    write(
        &agent.home.0.join("numpy/random.py"),
        "calls = []\ndef seed(seed=None):\n    calls.append(seed)\n",
    );
    let r = agent.exec(PY, "import numpy.random");
    assert_eq!(r.outcome.exit_code, 0, "{}", r.stderr());
    let id = agent.send(&Request::Reseed {
        entropy: vec![7; 64],
        unix_time_ns: 0,
    });
    assert_eq!(
        agent.next_for(id, EVENT_DEADLINE).event,
        Event::Reseeded { interpreters: 1 }
    );
    let r = agent.exec(PY, "print(numpy.random.calls, 'm' in globals())");
    assert_eq!(r.stdout(), "[None] False\n", "{}", r.stderr());
}
