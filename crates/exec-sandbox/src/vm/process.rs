//! Starting QEMU in its jail ([`super::jail`]) so that it can never outlive us.
//!
//! QEMU is cloned into its namespaces from one dedicated thread that lives as long as the
//! process: the kernel sends the parent-death signal when the *thread* that created the child
//! exits, and tokio's threads come and go. The clone is QEMU itself (PID 1 of its own PID
//! namespace), so the host holds its real pid (for `/proc` readings), a pidfd to wait on, and
//! its exit status; there is no intermediate process.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Arc, OnceLock, mpsc};

use rustix::pipe::PipeFlags;
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;

use super::jail::{self, ChildPlan, Credentials, IsolationReport, Jail, JailError, Step};
use crate::sys::CStrings;

/// How this scheduler starts QEMU: the binary and the jail around it.
#[derive(Debug, Clone)]
pub(crate) struct Qemu {
    /// The QEMU binary as configured (a name looked up in `PATH`, or a path).
    pub(crate) binary: PathBuf,
    /// Who QEMU runs as, and whether this host allows namespaces.
    pub(crate) jail: Arc<Jail>,
}

impl Qemu {
    /// QEMU `binary` in a jail of its own whose QEMU user (root library only) is `user`.
    #[cfg(test)]
    pub(crate) fn new(binary: PathBuf, user: Option<String>) -> Self {
        Self::in_jail(binary, Arc::new(Jail::new(user)))
    }

    /// QEMU `binary` in `jail` (shared: what one spawn learns of the host, all know).
    pub(crate) fn in_jail(binary: PathBuf, jail: Arc<Jail>) -> Self {
        Self { binary, jail }
    }

    /// The binary's absolute, resolved path (looked up in `PATH` like `execvp` when it has no
    /// `/`); `NotFound` when there is none.
    pub(crate) fn resolve(&self) -> io::Result<PathBuf> {
        let found = if self.binary.as_os_str().as_bytes().contains(&b'/') {
            self.binary.clone()
        } else {
            let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
            std::env::split_paths(&path)
                .map(|dir| dir.join(&self.binary))
                .find(|p| is_executable(p))
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?
        };
        let resolved = std::fs::canonicalize(found)?;
        if !is_executable(&resolved) {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        Ok(resolved)
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// One QEMU to start.
pub(crate) struct Request {
    /// The resolved binary ([`Qemu::resolve`]).
    pub(crate) program: PathBuf,
    /// Its arguments (without the program name).
    pub(crate) args: Vec<OsString>,
    /// Descriptors QEMU inherits, each at its number (at most [`MAX_FDS`]).
    pub(crate) fds: Vec<(OwnedFd, i32)>,
    /// `cgroup.procs` (v2) or `tasks` (v1) files, open for writing, of the cgroups
    /// QEMU joins before it drops privileges.
    pub(crate) join_cgroups: Vec<OwnedFd>,
    /// Give QEMU `/dev/kvm`.
    pub(crate) kvm: bool,
    /// An empty directory, private to this VM, on which the jail's root is mounted.
    pub(crate) root: PathBuf,
}

/// Descriptors QEMU can inherit besides stdio.
pub(crate) const MAX_FDS: usize = 12;

/// A QEMU just started in its jail.
pub(crate) struct Spawned {
    /// The process.
    pub(crate) process: QemuProcess,
    /// Its stdout (the guest console).
    pub(crate) stdout: pipe::Receiver,
    /// Its stderr.
    pub(crate) stderr: pipe::Receiver,
    /// What the jail could build.
    pub(crate) isolation: IsolationReport,
}

/// What the spawner thread hands back.
struct Raw {
    pid: u32,
    pidfd: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
    isolation: IsolationReport,
}

type Job = Box<dyn FnOnce() + Send>;

fn spawner() -> &'static mpsc::Sender<Job> {
    static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("sbx-vm-spawner".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .expect("cannot start the VM spawner thread");
        tx
    })
}

/// Starts QEMU as `request` says, in `qemu`'s jail, stdin on `/dev/null`, stdout and stderr
/// piped, killed when this process dies or when the returned process is dropped.
pub(crate) async fn spawn_qemu(qemu: &Qemu, request: Request) -> Result<Spawned, JailError> {
    if request.fds.len() > MAX_FDS {
        return Err(JailError::Host {
            action: format!("pass {} descriptors to QEMU", request.fds.len()),
            source: io::Error::from(io::ErrorKind::InvalidInput),
        });
    }
    let jail = qemu.jail.clone();
    let argv0 = qemu.binary.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        deliver(tx, spawn_in_thread(&jail, &argv0, &request));
        // `request` (the host's copies of QEMU's descriptors) is closed here.
    });
    let gone = |what: &str| JailError::Host {
        action: what.to_owned(),
        source: io::Error::other("the VM spawner thread is gone"),
    };
    spawner().send(job).map_err(|_| gone("start QEMU"))?;
    let raw = rx.await.map_err(|_| gone("start QEMU"))??;
    let host = |action: &str| {
        let action = action.to_owned();
        move |source| JailError::Host { action, source }
    };
    let process = QemuProcess::new(raw.pid, raw.pidfd).map_err(host("watch QEMU"))?;
    Ok(Spawned {
        stdout: pipe::Receiver::from_owned_fd(raw.stdout).map_err(host("read QEMU's output"))?,
        stderr: pipe::Receiver::from_owned_fd(raw.stderr).map_err(host("read QEMU's output"))?,
        process,
        isolation: raw.isolation,
    })
}

/// Hands a started QEMU to the caller; when the caller went away meanwhile (a run dropped while
/// its VM was starting), nothing else owns the process, so it is killed and reaped here.
/// Returns the pid of a process it had to kill.
fn deliver(
    tx: tokio::sync::oneshot::Sender<Result<Raw, JailError>>,
    spawned: Result<Raw, JailError>,
) -> Option<u32> {
    let Err(Ok(raw)) = tx.send(spawned) else {
        return None;
    };
    let _ = rustix::process::pidfd_send_signal(&raw.pidfd, rustix::process::Signal::KILL);
    // SIGKILL cannot be caught: the wait is short.
    let _ = rustix::process::waitpid(
        rustix::process::Pid::from_raw(raw.pid as i32),
        rustix::process::WaitOptions::empty(),
    );
    Some(raw.pid)
}

/// Why an attempt failed: anything, or namespaces this host does not allow.
enum AttemptError {
    Jail(JailError),
    Namespaces(String),
}

impl From<JailError> for AttemptError {
    fn from(e: JailError) -> Self {
        AttemptError::Jail(e)
    }
}

/// In the spawner thread: the full jail, or (once namespaces turn out impossible here) the
/// jail without them.
fn spawn_in_thread(jail: &Jail, argv0: &Path, request: &Request) -> Result<Raw, JailError> {
    let credentials = jail.credentials()?;
    let unavailable = jail.namespaces_unavailable();
    match attempt(credentials, unavailable.as_deref(), argv0, request) {
        Ok(raw) => Ok(raw),
        Err(AttemptError::Jail(e)) => Err(e),
        Err(AttemptError::Namespaces(reason)) => {
            jail.give_up_namespaces(reason.clone());
            attempt(credentials, Some(&reason), argv0, request).map_err(|e| match e {
                AttemptError::Jail(e) => e,
                AttemptError::Namespaces(reason) => JailError::Host {
                    action: "start QEMU without namespaces".into(),
                    source: io::Error::other(reason),
                },
            })
        }
    }
}

fn attempt(
    credentials: Credentials,
    unavailable: Option<&str>,
    argv0: &Path,
    request: &Request,
) -> Result<Raw, AttemptError> {
    let host = |action: &str| {
        let action = action.to_owned();
        move |source: io::Error| AttemptError::Jail(JailError::Host { action, source })
    };
    let (namespaces, names) = jail::namespaces_for(credentials, unavailable);
    let ops = if namespaces & libc::CLONE_NEWNS != 0 {
        jail::mount_plan(
            &jail::ViewRequest {
                root: &request.root,
                qemu: &request.program,
                kvm: request.kvm,
                credentials,
            },
            jail::probe,
        )?
    } else {
        Vec::new()
    };
    let devnull = std::fs::File::open("/dev/null").map_err(host("open /dev/null"))?;
    let (stdout_r, stdout_w) =
        rustix::pipe::pipe_with(PipeFlags::CLOEXEC).map_err(|e| host("create a pipe")(e.into()))?;
    let (stderr_r, stderr_w) =
        rustix::pipe::pipe_with(PipeFlags::CLOEXEC).map_err(|e| host("create a pipe")(e.into()))?;
    let mut moves = vec![
        (devnull.as_raw_fd(), 0),
        (stdout_w.as_raw_fd(), 1),
        (stderr_w.as_raw_fd(), 2),
    ];
    moves.extend(
        request
            .fds
            .iter()
            .map(|(fd, target)| (fd.as_raw_fd(), *target)),
    );
    let floor = jail::fd_floor(&moves);
    let (report_r, report_w) =
        rustix::pipe::pipe_with(PipeFlags::CLOEXEC).map_err(|e| host("create a pipe")(e.into()))?;
    // Above every target, so that placing QEMU's descriptors cannot clobber it; the original
    // is closed at once (an open write end here would hide the child's exec).
    let report_w = {
        let low = report_w;
        rustix::io::fcntl_dupfd_cloexec(&low, floor).map_err(|e| host("create a pipe")(e.into()))?
    };
    let id = credentials.identity();
    let user_map = (namespaces & libc::CLONE_NEWUSER != 0).then(|| {
        (
            format!("{0} {0} 1\n", id.uid).into_bytes(),
            format!("{0} {0} 1\n", id.gid).into_bytes(),
        )
    });
    let cstring = |s: &OsStr| {
        CString::new(s.as_bytes())
            .map_err(|_| host("pass a QEMU argument")(io::Error::from(io::ErrorKind::InvalidInput)))
    };
    let mut argv = vec![cstring(argv0.as_os_str())?];
    for arg in &request.args {
        argv.push(cstring(arg)?);
    }
    let cgroups: Vec<_> = request.join_cgroups.iter().map(AsFd::as_fd).collect();
    let mut keep: Vec<RawFd> = moves.iter().map(|&(fd, _)| fd).collect();
    keep.extend(cgroups.iter().map(AsRawFd::as_raw_fd));
    keep.push(report_w.as_raw_fd());
    keep.sort_unstable();
    keep.dedup();
    let plan = ChildPlan {
        namespaces,
        parent: std::process::id(),
        cgroups,
        user_map,
        ops,
        moves,
        keep,
        floor,
        switch_to: match credentials {
            Credentials::Switch(id) => Some(id),
            Credentials::Caller(_) => None,
        },
        last_cap: jail::last_capability(),
        report: report_w,
        program: cstring(request.program.as_os_str())?,
        argv: CStrings::new(argv),
        // QEMU needs no environment, and the host's may hold credentials.
        envp: CStrings::new(Vec::new()),
    };
    let cloned = match crate::sys::clone_process(namespaces, &|| jail::run_child(&plan)) {
        Ok(cloned) => cloned,
        Err(e) if namespaces != 0 && is_namespace_refusal(&e) => {
            return Err(AttemptError::Namespaces(format!(
                "the kernel refused new namespaces ({e})"
            )));
        }
        Err(e) => return Err(host("clone QEMU's process")(e)),
    };
    let ChildPlan {
        report: report_w,
        ops,
        program,
        ..
    } = plan;
    // Only the child may hold the write ends now: EOF on the report pipe means exec.
    drop((devnull, stdout_w, stderr_w, report_w));
    let report = read_report(&report_r, &ops, &program).map_err(host("read the jail's report"));
    match report? {
        None => Ok(Raw {
            pid: cloned.pid,
            pidfd: cloned.pidfd,
            stdout: stdout_r,
            stderr: stderr_r,
            isolation: jail::report(credentials, names, unavailable.map(namespaces_reason)),
        }),
        Some((step, error)) => {
            // The child exits right after its report.
            let _ = rustix::process::waitpid(
                rustix::process::Pid::from_raw(cloned.pid as i32),
                rustix::process::WaitOptions::empty(),
            );
            if namespaces != 0 && refuses_namespaces(step, &error) {
                Err(AttemptError::Namespaces(crate::vm::error_chain(&error)))
            } else {
                Err(AttemptError::Jail(error))
            }
        }
    }
}

/// The reason in reports when namespaces are off.
fn namespaces_reason(why: &str) -> String {
    format!("no namespaces: {why}")
}

/// Whether the child's failure at `step` means this host refuses the namespaces (so every
/// later spawn goes without them) rather than that this one spawn broke. Only a refusal by the
/// kernel counts: a VM's directory removed under a starting spawn (a refill cancelled when its
/// scheduler shut down) fails a mount with `ENOENT`, and must not cost the rest of the process
/// its namespaces.
fn refuses_namespaces(step: Option<Step>, error: &JailError) -> bool {
    let refused = match error {
        JailError::Child { source, .. } => is_namespace_refusal(source),
        _ => false,
    };
    refused && step.is_some_and(Step::is_namespace_setup)
}

/// Errors of `clone` that mean "no new namespaces for you" rather than a broken spawn.
fn is_namespace_refusal(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPERM | libc::EACCES | libc::EINVAL | libc::ENOSPC | libc::EUSERS)
    )
}

/// Reads the child's report until exec closes the pipe: `None` when QEMU started, or the
/// failed step.
fn read_report(
    pipe: &OwnedFd,
    ops: &[jail::Op],
    program: &std::ffi::CStr,
) -> io::Result<Option<(Option<Step>, JailError)>> {
    let mut record = [0u8; jail::REPORT_BYTES];
    let mut filled = 0;
    while filled < record.len() {
        match rustix::io::read(pipe, &mut record[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    match filled {
        0 => Ok(None),
        n if n == record.len() => Ok(Some(jail::child_error(&record, ops, program))),
        _ => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
    }
}

/// A running QEMU: its pid until reaped, a pidfd to wait on; killed and reaped when dropped.
pub(crate) struct QemuProcess {
    pid: u32,
    pidfd: Option<AsyncFd<OwnedFd>>,
    status: Option<ExitStatus>,
}

impl QemuProcess {
    fn new(pid: u32, pidfd: OwnedFd) -> io::Result<Self> {
        Ok(Self {
            pid,
            pidfd: Some(crate::sys::watch_readable(pidfd)?),
            status: None,
        })
    }

    /// The host pid, while the process has not been reaped.
    pub(crate) fn id(&self) -> Option<u32> {
        self.status.is_none().then_some(self.pid)
    }

    /// Sends SIGKILL (nothing once reaped).
    pub(crate) fn start_kill(&mut self) -> io::Result<()> {
        match (&self.pidfd, self.status) {
            (Some(pidfd), None) => {
                rustix::process::pidfd_send_signal(pidfd.get_ref(), rustix::process::Signal::KILL)
                    .map_err(Into::into)
            }
            _ => Ok(()),
        }
    }

    /// Waits for the process to exit and reaps it. Cancel-safe.
    pub(crate) async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.try_reap()? {
                return Ok(status);
            }
            let Some(pidfd) = &self.pidfd else {
                return Err(io::Error::other("QEMU's pidfd is gone"));
            };
            // A pidfd becomes readable when the process exits.
            let mut ready = pidfd.readable().await?;
            ready.clear_ready();
        }
    }

    fn try_reap(&mut self) -> io::Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        let pid = rustix::process::Pid::from_raw(self.pid as i32);
        match rustix::process::waitpid(pid, rustix::process::WaitOptions::NOHANG) {
            Ok(Some((_, status))) => {
                let status = ExitStatus::from_raw(status.as_raw());
                self.status = Some(status);
                Ok(Some(status))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

impl Drop for QemuProcess {
    /// Kills QEMU and reaps it: now if it is already gone, else in the background.
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        let _ = self.start_kill();
        if matches!(self.try_reap(), Ok(Some(_))) {
            return;
        }
        let pid = self.pid;
        let reap = move || {
            let _ = rustix::process::waitpid(
                rustix::process::Pid::from_raw(pid as i32),
                rustix::process::WaitOptions::empty(),
            );
        };
        match (self.pidfd.take(), tokio::runtime::Handle::try_current()) {
            (Some(pidfd), Ok(runtime)) => {
                runtime.spawn(async move {
                    let _ = pidfd.readable().await;
                    reap();
                });
            }
            _ => {
                std::thread::spawn(reap);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use tokio::io::AsyncReadExt;

    use super::*;

    /// A jail request for `program args` (found on `PATH`), and the directory holding its root.
    fn request(
        program: &str,
        args: &[&str],
        fds: Vec<(OwnedFd, i32)>,
        join_cgroups: Vec<OwnedFd>,
    ) -> (Qemu, Request, tempfile::TempDir) {
        let qemu = Qemu::new(program.into(), None);
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let request = Request {
            program: qemu.resolve().unwrap(),
            args: args.iter().map(OsString::from).collect(),
            fds,
            join_cgroups,
            kvm: false,
            root,
        };
        (qemu, request, dir)
    }

    /// Output, status and report of `program args` started through the jail.
    async fn jailed(
        program: &str,
        args: &[&str],
        fds: Vec<(OwnedFd, i32)>,
        join_cgroups: Vec<OwnedFd>,
    ) -> (String, ExitStatus, IsolationReport) {
        let (qemu, request, _dir) = request(program, args, fds, join_cgroups);
        let mut spawned = spawn_qemu(&qemu, request).await.expect("spawn");
        let mut out = String::new();
        spawned.stdout.read_to_string(&mut out).await.unwrap();
        let status = spawned.process.wait().await.unwrap();
        (out, status, spawned.isolation)
    }

    fn field<'a>(status: &'a str, name: &str) -> &'a str {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} in {status}"))
            .trim()
    }

    /// A QEMU that finished starting after its caller went away is killed and reaped by the
    /// spawner, not left running.
    #[tokio::test]
    async fn a_child_nobody_waits_for_any_more_is_killed() {
        let (qemu, request, _dir) = request("sleep", &["60"], Vec::new(), Vec::new());
        let (tx, rx) = tokio::sync::oneshot::channel();
        drop(rx);
        let killed = tokio::task::spawn_blocking(move || {
            deliver(tx, spawn_in_thread(&qemu.jail, &qemu.binary, &request))
        })
        .await
        .unwrap()
        .expect("the started child was killed");
        assert!(
            !std::path::Path::new(&format!("/proc/{killed}")).exists(),
            "pid {killed} is still there"
        );
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = Err(JailError::Host {
            action: "test".into(),
            source: io::Error::other("test"),
        });
        assert_eq!(deliver(tx, spawned), None, "nothing to kill");
        assert!(rx.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn the_child_runs_unprivileged_without_capabilities() {
        let (status, exit, isolation) =
            jailed("cat", &["/proc/self/status"], Vec::new(), Vec::new()).await;
        assert!(exit.success(), "{exit}");
        assert!(isolation.unprivileged);
        let uids: Vec<&str> = field(&status, "Uid:").split_whitespace().collect();
        let gids: Vec<&str> = field(&status, "Gid:").split_whitespace().collect();
        assert!(uids.iter().all(|u| *u != "0" && *u == uids[0]), "{uids:?}");
        assert!(gids.iter().all(|g| *g != "0" && *g == gids[0]), "{gids:?}");
        assert_eq!(field(&status, "Groups:"), "", "no supplementary groups");
        for caps in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
            assert_eq!(field(&status, caps), "0000000000000000", "{caps}");
        }
        assert_eq!(field(&status, "NoNewPrivs:"), "1");
        if isolation.namespaces.contains(&"pid") {
            assert_eq!(field(&status, "Pid:"), "1", "PID 1 of its own namespace");
        }
    }

    #[tokio::test]
    async fn the_child_sees_only_its_own_root_and_inherits_files_by_number() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(b"handed over").unwrap();
        // Readable by the jail's user through its descriptor, as QEMU's asset files are.
        std::fs::set_permissions(
            file.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .unwrap();
        let fd = OwnedFd::from(std::fs::File::open(file.path()).unwrap());
        let (out, exit, isolation) = jailed(
            "sh",
            &[
                "-c",
                "ls -A / /dev; hostname; cat /proc/self/fd/8; echo; ls /proc/self/fd",
            ],
            vec![(fd, 8)],
            Vec::new(),
        )
        .await;
        assert!(exit.success(), "{exit}: {out}");
        assert!(out.contains("handed over"), "{out}");
        if !isolation.namespaces.contains(&"mount") {
            return;
        }
        let mut sections = out.split("\n\n");
        let root = sections.next().unwrap();
        let names: Vec<&str> = root.lines().skip(1).collect();
        let mut expected = vec!["dev", "proc", "usr"];
        for entry in ["bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc"] {
            if std::fs::symlink_metadata(Path::new("/").join(entry)).is_ok() {
                expected.push(entry);
            }
        }
        expected.sort_unstable();
        let mut got = names.clone();
        got.sort_unstable();
        assert_eq!(got, expected, "{out}");
        let rest = sections.collect::<Vec<_>>().join("\n\n");
        assert!(rest.contains("null\nurandom"), "{out}");
        assert!(rest.contains("\nsbx\n"), "the jail's host name: {out}");
        // stdio, the handed-over file, and the directory `ls` opened: nothing else.
        let fds: Vec<&str> = out
            .lines()
            .rev()
            .take_while(|l| l.parse::<u32>().is_ok())
            .collect();
        let mut fds: Vec<u32> = fds.iter().map(|f| f.parse().unwrap()).collect();
        fds.sort_unstable();
        assert_eq!(&fds[..4], [0, 1, 2, 3], "{out}");
        assert_eq!(fds.last(), Some(&8), "{out}");
        assert_eq!(fds.len(), 5, "{out}");
    }

    #[tokio::test]
    async fn the_child_joins_the_cgroups_given_before_exec() {
        let procs = tempfile::NamedTempFile::new().unwrap();
        let fd = OwnedFd::from(
            std::fs::OpenOptions::new()
                .write(true)
                .open(procs.path())
                .unwrap(),
        );
        let (_, exit, _) = jailed("true", &[], Vec::new(), vec![fd]).await;
        assert!(exit.success());
        assert_eq!(std::fs::read_to_string(procs.path()).unwrap(), "0\n");
    }

    /// A spawn whose directory is removed under it (a pool refill cancelled as its scheduler
    /// shut down) fails alone: later spawns of the process keep their namespaces.
    #[tokio::test]
    async fn a_root_removed_under_a_spawn_fails_it_and_keeps_the_namespaces() {
        let (qemu, _, _) = request("true", &[], Vec::new(), Vec::new());
        let spawn = |root: Option<&str>| {
            let (_, mut request, dir) = request("true", &[], Vec::new(), Vec::new());
            if let Some(name) = root {
                request.root = dir.path().join(name);
            }
            let qemu = &qemu;
            async move {
                let spawned = spawn_qemu(qemu, request).await;
                drop(dir);
                spawned
            }
        };
        let mut first = spawn(None).await.expect("a spawn");
        assert!(first.process.wait().await.unwrap().success());
        if first.isolation.namespaces.contains(&"mount") {
            let Err(e) = spawn(Some("removed")).await else {
                panic!("a spawn without its root directory cannot start");
            };
            let chain = crate::vm::error_chain(&e);
            assert!(chain.contains("No such file or directory"), "{chain}");
            assert_eq!(qemu.jail.namespaces_unavailable(), None, "{chain}");
            let mut next = spawn(None).await.expect("the next spawn");
            assert!(next.process.wait().await.unwrap().success());
            assert!(next.isolation.namespaces.contains(&"mount"), "{chain}");
        }
        let vanished = JailError::Child {
            step: "mount proc".into(),
            source: io::Error::from_raw_os_error(libc::ENOENT),
        };
        assert!(!refuses_namespaces(Some(Step::Mount), &vanished));
        for (step, refused) in [
            (Step::Mount, true),
            (Step::UserMap, true),
            (Step::Hostname, true),
            (Step::Fds, false),
            (Step::Exec, false),
        ] {
            let error = JailError::Child {
                step: "test".into(),
                source: io::Error::from_raw_os_error(libc::EPERM),
            };
            assert_eq!(refuses_namespaces(Some(step), &error), refused, "{step:?}");
        }
    }

    #[tokio::test]
    async fn an_exec_failure_names_the_step() {
        let qemu = Qemu::new("/usr/bin/true".into(), None);
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        // A program whose interpreter is not in the jail's view: exec itself fails.
        let script = dir.path().join("prog");
        std::fs::write(&script, "#!/nonexistent/interpreter\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let request = Request {
            program: script.clone(),
            args: Vec::new(),
            fds: Vec::new(),
            join_cgroups: Vec::new(),
            kvm: false,
            root,
        };
        let Err(e) = spawn_qemu(&qemu, request).await else {
            panic!("a program without its interpreter cannot run");
        };
        let chain = crate::vm::error_chain(&e);
        assert_eq!(
            chain,
            format!(
                "jail: cannot execute {}: {}",
                script.display(),
                io::Error::from_raw_os_error(libc::ENOENT)
            )
        );
    }
}
