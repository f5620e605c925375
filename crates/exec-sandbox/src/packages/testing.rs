//! A loopback package index for tests: a PEP 503 simple index (`/simple/`) and an npm registry
//! (`/npm/`) served from memory on 127.0.0.1, holding wheels, source distributions and npm
//! tarballs built here. The tools are pointed at it through their own environment variables
//! ([`PackageIndex::tool_env`]), which also blank the host's pip and npm configuration, so
//! nothing reaches a real registry.
//!
//! [`PackageIndex::demo`] holds the standard fixtures:
//!
//! | Python | |
//! |---|---|
//! | `sbxdemo` 1.0, 1.1 | pure Python, depends on `sbxdep>=1.0`, console script `sbxdemo-cli` |
//! | `sbxdep` 1.0 | pure Python |
//! | `sbxsrc` 1.0 | source distribution only |
//! | `sbxneedsrc` 1.0 | wheel depending on `sbxsrc` |
//! | `sbxconflict` 1.0 | wheel depending on `sbxdep<1.0` (no such version) |
//! | `sbxext` 1.0 | compiled extension `sbxext._speed` (`answer()` → 42), `cp311-cp311-manylinux_2_17_x86_64`, when gcc and Python 3.11 headers exist ([`PackageIndex::has_extension`]) |
//!
//! | npm | |
//! |---|---|
//! | `sbx-demo` 1.0.0, 1.1.0 | depends on `sbx-dep@^1.0.0`; exports `"sbx-demo <version>"` |
//! | `sbx-dep` 1.0.0, 1.2.0 | no dependencies |
//! | `@sbx/scoped` 1.0.0 | a scoped name |
//! | `sbx-native` 1.0.0 | has a `binding.gyp` (refused) |
//! | `sbx-inst` 1.0.0 | has an `install` script (refused) |
//! | `sbx-post` 1.0.0 | `postinstall` only (allowed; it would create a file in [`PackageIndex::marker_dir`]) |

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use sha2::{Digest, Sha256, Sha512};

/// What the server holds.
#[derive(Default)]
struct Content {
    /// Python projects (normalized name) → wheel and sdist file names.
    projects: BTreeMap<String, Vec<String>>,
    /// npm packages → packument.
    packuments: BTreeMap<String, serde_json::Value>,
    /// Path → bytes, for `/files/…` and npm tarballs.
    files: HashMap<String, Vec<u8>>,
}

/// A loopback package index; stops serving when dropped.
pub struct PackageIndex {
    addr: SocketAddr,
    content: Arc<Mutex<Content>>,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    scratch: tempfile::TempDir,
    has_extension: bool,
}

impl PackageIndex {
    /// An empty index on a free loopback port.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let addr = listener.local_addr().expect("bound address");
        let content = Arc::new(Mutex::new(Content::default()));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (content, requests, stop) = (
                Arc::clone(&content),
                Arc::clone(&requests),
                Arc::clone(&stop),
            );
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    let (content, requests) = (Arc::clone(&content), Arc::clone(&requests));
                    std::thread::spawn(move || serve(stream, addr, &content, &requests));
                }
            });
        }
        let scratch = tempfile::Builder::new()
            .prefix("sbx-package-index-")
            .tempdir()
            .expect("a scratch directory");
        std::fs::create_dir(scratch.path().join("markers")).expect("markers directory");
        Self {
            addr,
            content,
            requests,
            stop,
            scratch,
            has_extension: false,
        }
    }

    /// The standard fixtures (see the module documentation).
    pub fn demo() -> Self {
        let mut index = Self::start();
        index.add_wheel("sbxdemo", "1.0", &["sbxdep>=1.0"], &[]);
        index.add_wheel("sbxdemo", "1.1", &["sbxdep>=1.0"], &[]);
        index.add_wheel("sbxdep", "1.0", &[], &[]);
        index.add_sdist("sbxsrc", "1.0");
        index.add_wheel("sbxneedsrc", "1.0", &["sbxsrc"], &[]);
        index.add_wheel("sbxconflict", "1.0", &["sbxdep<1.0"], &[]);
        if let Some(library) = extension_library() {
            index.add_platform_wheel(
                "sbxext",
                "1.0",
                "cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64",
                &[(
                    "sbxext/_speed.cpython-311-x86_64-linux-gnu.so",
                    library.clone(),
                )],
            );
            index.has_extension = true;
        }
        index.add_npm("sbx-dep", "1.0.0", &[], &[], &[]);
        index.add_npm("sbx-dep", "1.2.0", &[], &[], &[]);
        index.add_npm("sbx-demo", "1.0.0", &[("sbx-dep", "^1.0.0")], &[], &[]);
        index.add_npm("sbx-demo", "1.1.0", &[("sbx-dep", "^1.0.0")], &[], &[]);
        index.add_npm("@sbx/scoped", "1.0.0", &[], &[], &[]);
        index.add_npm(
            "sbx-native",
            "1.0.0",
            &[],
            &[],
            &[("binding.gyp", b"{\"targets\": []}\n".to_vec())],
        );
        index.add_npm(
            "sbx-inst",
            "1.0.0",
            &[],
            &[("install", "node install.js")],
            &[],
        );
        let marker = index.marker_dir().join("postinstall-ran");
        let script = format!(
            "node -e \"require('fs').writeFileSync('{}', 'ran')\"",
            marker.display()
        );
        index.add_npm("sbx-post", "1.0.0", &[], &[("postinstall", &script)], &[]);
        index
    }

    /// `http://127.0.0.1:<port>/simple/`.
    pub fn pip_index_url(&self) -> String {
        format!("http://{}/simple/", self.addr)
    }

    /// `http://127.0.0.1:<port>/npm/`.
    pub fn npm_registry_url(&self) -> String {
        format!("http://{}/npm/", self.addr)
    }

    /// Whether the compiled-extension wheel `sbxext` could be built (gcc and the Python 3.11
    /// headers are needed).
    pub fn has_extension(&self) -> bool {
        self.has_extension
    }

    /// Where the `sbx-post` postinstall script would leave `postinstall-ran` if it ever ran.
    pub fn marker_dir(&self) -> PathBuf {
        self.scratch.path().join("markers")
    }

    /// The paths requested so far, in order.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    /// Environment for pip and npm pointing at this index, with the host's own configuration
    /// blanked and caches in a scratch directory (see [`tool_env`]).
    pub fn tool_env(&self) -> Vec<(String, Option<String>)> {
        tool_env(
            &self.pip_index_url(),
            &self.npm_registry_url(),
            self.scratch.path(),
        )
    }

    /// Adds a pure-Python wheel `name-version-py3-none-any.whl` with module `name` (printing
    /// `name version` from `main()`, exposed as the console script `name-cli`), requiring
    /// `requires` (PEP 508 strings), plus `extra` files.
    pub fn add_wheel(
        &self,
        name: &str,
        version: &str,
        requires: &[&str],
        extra: &[(&str, Vec<u8>)],
    ) {
        let bytes = wheel(name, version, requires, extra, "py3-none-any", true);
        self.add_python_file(
            name,
            &format!("{}-{version}-py3-none-any.whl", dist_name(name)),
            bytes,
        );
    }

    /// Adds a platform wheel with the given compatibility `tag` and `files`.
    pub fn add_platform_wheel(
        &self,
        name: &str,
        version: &str,
        tag: &str,
        files: &[(&str, Vec<u8>)],
    ) {
        let bytes = wheel(name, version, &[], files, tag, false);
        self.add_python_file(
            name,
            &format!("{}-{version}-{tag}.whl", dist_name(name)),
            bytes,
        );
    }

    /// Adds a source distribution `name-version.tar.gz` (whose `setup.py` refuses to run).
    pub fn add_sdist(&self, name: &str, version: &str) {
        let root = format!("{}-{version}", dist_name(name));
        let bytes = gzip(&tar(&[
            (
                format!("{root}/PKG-INFO"),
                format!("Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n").into_bytes(),
                0o644,
            ),
            (
                format!("{root}/setup.py"),
                b"raise SystemExit('this test package must never be built')\n".to_vec(),
                0o644,
            ),
        ]));
        self.add_python_file(name, &format!("{root}.tar.gz"), bytes);
    }

    fn add_python_file(&self, name: &str, file: &str, bytes: Vec<u8>) {
        let mut content = self.content.lock().unwrap();
        content.files.insert(format!("/files/{file}"), bytes);
        content
            .projects
            .entry(crate::packages::install::normalize_python_name(name))
            .or_default()
            .push(file.to_string());
    }

    /// Adds npm package `name@version` (`index.js` exporting `"name version"`) with
    /// `dependencies`, `scripts` and `extra` files; the newest added version is `latest`.
    pub fn add_npm(
        &self,
        name: &str,
        version: &str,
        dependencies: &[(&str, &str)],
        scripts: &[(&str, &str)],
        extra: &[(&str, Vec<u8>)],
    ) {
        let mut manifest = serde_json::json!({
            "name": name,
            "version": version,
            "main": "index.js",
        });
        if !dependencies.is_empty() {
            manifest["dependencies"] = dependencies
                .iter()
                .map(|(n, r)| ((*n).to_string(), serde_json::Value::from(*r)))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        if !scripts.is_empty() {
            manifest["scripts"] = scripts
                .iter()
                .map(|(n, s)| ((*n).to_string(), serde_json::Value::from(*s)))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        let mut files = vec![
            (
                "package/package.json".to_string(),
                serde_json::to_vec_pretty(&manifest).unwrap(),
                0o644,
            ),
            (
                "package/index.js".to_string(),
                format!("module.exports = '{name} {version}';\n").into_bytes(),
                0o644,
            ),
        ];
        files.extend(
            extra
                .iter()
                .map(|(path, bytes)| (format!("package/{path}"), bytes.clone(), 0o644)),
        );
        let tarball = gzip(&tar(&files));
        let base = name.rsplit('/').next().unwrap_or(name);
        let path = format!("/npm/{name}/-/{base}-{version}.tgz");
        let integrity = format!("sha512-{}", base64(&Sha512::digest(&tarball), false));
        manifest["dist"] = serde_json::json!({
            "tarball": format!("http://{}{path}", self.addr),
            "integrity": integrity,
        });
        let mut content = self.content.lock().unwrap();
        content.files.insert(path, tarball);
        let packument = content
            .packuments
            .entry(name.to_string())
            .or_insert_with(|| serde_json::json!({"name": name, "dist-tags": {}, "versions": {}}));
        packument["versions"][version] = manifest;
        packument["dist-tags"]["latest"] = version.into();
    }
}

impl Drop for PackageIndex {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

/// Environment that points pip at `pip_index_url` and npm at `npm_registry_url`, with every
/// configuration file of the host blanked and caches under `scratch` (created as needed): the
/// tools then contact nothing else.
pub fn tool_env(
    pip_index_url: &str,
    npm_registry_url: &str,
    scratch: &Path,
) -> Vec<(String, Option<String>)> {
    let file = |name: &str| {
        let path = scratch.join(name);
        if !path.exists() {
            std::fs::write(&path, "").expect("an empty config file");
        }
        Some(path.display().to_string())
    };
    let set = |name: &str, value: &str| (name.to_string(), Some(value.to_string()));
    let unset = |name: &str| (name.to_string(), None);
    vec![
        set("PIP_INDEX_URL", pip_index_url),
        ("PIP_CONFIG_FILE".into(), Some("/dev/null".into())),
        unset("PIP_EXTRA_INDEX_URL"),
        unset("PIP_FIND_LINKS"),
        unset("PIP_NO_INDEX"),
        unset("PIP_REQUIRE_VIRTUALENV"),
        set(
            "PIP_CACHE_DIR",
            &scratch.join("pip-cache").display().to_string(),
        ),
        set("npm_config_registry", npm_registry_url),
        unset("NPM_CONFIG_REGISTRY"),
        ("npm_config_userconfig".into(), file("npmrc")),
        unset("NPM_CONFIG_USERCONFIG"),
        ("npm_config_globalconfig".into(), file("global-npmrc")),
        unset("NPM_CONFIG_GLOBALCONFIG"),
        set(
            "npm_config_cache",
            &scratch.join("npm-cache").display().to_string(),
        ),
        unset("NPM_CONFIG_CACHE"),
        set("npm_config_update_notifier", "false"),
        set("npm_config_audit", "false"),
        set("npm_config_fund", "false"),
    ]
}

/// Answers one HTTP/1.x request on `stream`.
fn serve(
    mut stream: TcpStream,
    addr: SocketAddr,
    content: &Mutex<Content>,
    requests: &Mutex<Vec<String>>,
) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut head = Vec::new();
    let mut byte = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
        match stream.read(&mut byte) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&byte[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    let path = percent_decode(target.split('?').next().unwrap_or("/"));
    requests.lock().unwrap().push(path.clone());
    let found = route(&path, addr, &content.lock().unwrap());
    let (status, kind, body) = match found {
        Some((kind, body)) => ("200 OK", kind, body),
        None => ("404 Not Found", "text/plain", b"not found\n".to_vec()),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        response.extend_from_slice(&body);
    }
    let _ = stream.write_all(&response);
    let _ = stream.flush();
}

fn route(path: &str, addr: SocketAddr, content: &Content) -> Option<(&'static str, Vec<u8>)> {
    if let Some(project) = path.strip_prefix("/simple/") {
        let project =
            crate::packages::install::normalize_python_name(project.trim_end_matches('/'));
        let files = content.projects.get(&project)?;
        let links: String = files
            .iter()
            .map(|file| {
                let sha = hex::encode(Sha256::digest(&content.files[&format!("/files/{file}")]));
                format!("<a href=\"http://{addr}/files/{file}#sha256={sha}\">{file}</a><br/>\n")
            })
            .collect();
        let page = format!("<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n");
        return Some(("text/html", page.into_bytes()));
    }
    if let Some(bytes) = content.files.get(path) {
        return Some(("application/octet-stream", bytes.clone()));
    }
    let name = path.strip_prefix("/npm/")?.trim_end_matches('/');
    let packument = content.packuments.get(name)?;
    Some(("application/json", serde_json::to_vec(packument).unwrap()))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| std::str::from_utf8(&bytes[i + 1..i + 3]).ok())
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        if let Some(b) = escaped {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The name as it appears in wheel and sdist file names (`-` → `_`).
fn dist_name(name: &str) -> String {
    name.replace('-', "_")
}

/// A wheel: the module `name` (`__init__.py` unless `extra` provides files of the package),
/// its dist-info (METADATA with `requires`, WHEEL with `tag`, an entry point, RECORD).
fn wheel(
    name: &str,
    version: &str,
    requires: &[&str],
    extra: &[(&str, Vec<u8>)],
    tag: &str,
    purelib: bool,
) -> Vec<u8> {
    let module = dist_name(name);
    let info = format!("{module}-{version}.dist-info");
    let mut files: Vec<(String, Vec<u8>, u32)> = vec![(
        format!("{module}/__init__.py"),
        format!("VERSION = '{version}'\n\n\ndef main():\n    print('{name} {version}')\n")
            .into_bytes(),
        0o644,
    )];
    files.extend(extra.iter().map(|(path, bytes)| {
        let mode = if path.ends_with(".so") { 0o755 } else { 0o644 };
        ((*path).to_string(), bytes.clone(), mode)
    }));
    let mut metadata = format!("Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n");
    for requirement in requires {
        metadata.push_str(&format!("Requires-Dist: {requirement}\n"));
    }
    files.push((format!("{info}/METADATA"), metadata.into_bytes(), 0o644));
    files.push((
        format!("{info}/WHEEL"),
        format!(
            "Wheel-Version: 1.0\nGenerator: exec-sandbox-tests\nRoot-Is-Purelib: {purelib}\nTag: {tag}\n"
        )
        .into_bytes(),
        0o644,
    ));
    files.push((
        format!("{info}/entry_points.txt"),
        format!("[console_scripts]\n{name}-cli = {module}:main\n").into_bytes(),
        0o644,
    ));
    let mut record: String = files
        .iter()
        .map(|(path, bytes, _)| {
            format!(
                "{path},sha256={},{}\n",
                base64(&Sha256::digest(bytes), true),
                bytes.len()
            )
        })
        .collect();
    record.push_str(&format!("{info}/RECORD,,\n"));
    files.push((format!("{info}/RECORD"), record.into_bytes(), 0o644));
    zip(&files)
}

/// The test extension module, compiled once per process; `None` without gcc or headers.
fn extension_library() -> Option<&'static Vec<u8>> {
    static LIBRARY: OnceLock<Option<Vec<u8>>> = OnceLock::new();
    LIBRARY.get_or_init(compile_extension).as_ref()
}

fn compile_extension() -> Option<Vec<u8>> {
    const SOURCE: &str = r#"#define PY_SSIZE_T_CLEAN
#include <Python.h>
static PyObject *answer(PyObject *self, PyObject *args) { return PyLong_FromLong(42); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, "The answer."}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_speed", NULL, -1, methods};
PyMODINIT_FUNC PyInit__speed(void) { return PyModule_Create(&module); }
"#;
    let include = ["/usr/include/python3.11"]
        .into_iter()
        .map(PathBuf::from)
        .find(|dir| dir.join("Python.h").is_file())?;
    let dir = tempfile::tempdir().ok()?;
    let source = dir.path().join("speed.c");
    let output = dir.path().join("speed.so");
    std::fs::write(&source, SOURCE).ok()?;
    let status = std::process::Command::new("gcc")
        .args(["-shared", "-fPIC", "-O1"])
        .arg(format!("-I{}", include.display()))
        .arg("-o")
        .arg(&output)
        .arg(&source)
        .status()
        .ok()?;
    if !status.success() {
        return None;
    }
    std::fs::read(&output).ok()
}

// ---------------------------------------------------------------------------------------------
// Archive formats, just enough of each.

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A zip archive of `files` (path, bytes, unix mode), stored without compression.
fn zip(files: &[(String, Vec<u8>, u32)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (path, bytes, mode) in files {
        let offset = out.len() as u32;
        let crc = crc32(bytes);
        let size = bytes.len() as u32;
        let name = path.as_bytes();
        // Local file header: version 2.0, no flags, stored, 1980-01-01 00:00.
        out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        for v in [20u16, 0, 0, 0, 0x21] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in [crc, size, size] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(name);
        out.extend_from_slice(bytes);
        // Central directory entry: made by Unix (3) so the mode is kept.
        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        for v in [0x0314u16, 20, 0, 0, 0, 0x21] {
            central.extend_from_slice(&v.to_le_bytes());
        }
        for v in [crc, size, size] {
            central.extend_from_slice(&v.to_le_bytes());
        }
        for v in [name.len() as u16, 0, 0, 0, 0] {
            central.extend_from_slice(&v.to_le_bytes());
        }
        central.extend_from_slice(&((0o100_000 | mode) << 16).to_le_bytes());
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(name);
    }
    let central_offset = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    for v in [0u16, 0, files.len() as u16, files.len() as u16] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&central_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

/// A ustar archive of regular `files` (path < 100 bytes, bytes, mode).
fn tar(files: &[(String, Vec<u8>, u32)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (path, bytes, mode) in files {
        let mut header = [0u8; 512];
        let field = |header: &mut [u8; 512], at: usize, text: &str| {
            header[at..at + text.len()].copy_from_slice(text.as_bytes());
        };
        assert!(path.len() < 100, "tar path too long: {path}");
        field(&mut header, 0, path);
        field(&mut header, 100, &format!("{mode:07o}"));
        field(&mut header, 108, "0000000");
        field(&mut header, 116, "0000000");
        field(&mut header, 124, &format!("{:011o}", bytes.len()));
        field(&mut header, 136, "00000000000");
        field(&mut header, 148, "        ");
        header[156] = b'0';
        field(&mut header, 257, "ustar");
        field(&mut header, 263, "00");
        let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
        field(&mut header, 148, &format!("{sum:06o}\0 "));
        out.extend_from_slice(&header);
        out.extend_from_slice(bytes);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// A gzip stream of `data` in stored (uncompressed) deflate blocks.
fn gzip(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    let mut chunks = data.chunks(0xffff).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(chunk) = chunks.next() {
        out.push(u8::from(chunks.peek().is_none()));
        let len = chunk.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

/// Base64 (standard alphabet, padded), or URL-safe without padding (wheel RECORD hashes).
fn base64(bytes: &[u8], url_safe: bool) -> String {
    let alphabet: &[u8; 64] = if url_safe {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    };
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
        if !url_safe {
            for _ in chunk.len()..3 {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_match_known_vectors() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(base64(b"foobar", false), "Zm9vYmFy");
        assert_eq!(base64(b"fooba", false), "Zm9vYmE=");
        assert_eq!(base64(b"foob", false), "Zm9vYg==");
        assert_eq!(base64(&[0xfb, 0xff], true), "-_8");
        assert_eq!(percent_decode("/npm/@sbx%2fscoped"), "/npm/@sbx/scoped");
        assert_eq!(percent_decode("/a%2"), "/a%2");
    }

    #[test]
    fn the_index_serves_pages_files_and_packuments() {
        let index = PackageIndex::demo();
        let get = |path: &str| {
            let mut stream = TcpStream::connect(index.addr).unwrap();
            write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut response = Vec::new();
            stream.read_to_end(&mut response).unwrap();
            String::from_utf8_lossy(&response).into_owned()
        };
        let page = get("/simple/SbxDemo/");
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        assert!(
            page.contains("sbxdemo-1.1-py3-none-any.whl#sha256="),
            "{page}"
        );
        assert!(get("/simple/nope/").starts_with("HTTP/1.1 404"));
        assert!(get("/npm/@sbx%2fscoped").contains("\"latest\":\"1.0.0\""));
        assert!(get("/npm/sbx-demo/-/sbx-demo-1.0.0.tgz").starts_with("HTTP/1.1 200"));
        assert_eq!(index.requests().len(), 4);
    }
}
