//! Starting QEMU so that it can never outlive us.
//!
//! QEMU gets `PR_SET_PDEATHSIG(SIGKILL)`. The kernel sends that signal when the *thread* that
//! forked the child exits, not the process; tokio worker and blocking threads come and go, so all
//! QEMU processes are forked from one dedicated thread that lives as long as the process.

use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Stdio;
use std::sync::OnceLock;
use std::sync::mpsc;

use tokio::process::{Child, Command};

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

/// Spawns `program args` with each `(fd, number)` of `fds` inherited at that number (at most
/// 8), stdin from /dev/null and piped stdout/stderr, killed when this process dies or when the
/// returned child is dropped. The child first writes itself into each cgroup whose open
/// `cgroup.procs` is in `cgroups` (at most 8; see `VmCgroup::join_fds`).
pub(crate) async fn spawn_qemu(
    program: std::path::PathBuf,
    args: Vec<std::ffi::OsString>,
    fds: Vec<(OwnedFd, i32)>,
    cgroups: Vec<OwnedFd>,
) -> std::io::Result<Child> {
    if fds.len() > 8 || cgroups.len() > 8 {
        return Err(std::io::Error::other(
            "at most 8 descriptors and 8 cgroups can be passed to QEMU",
        ));
    }
    let runtime = tokio::runtime::Handle::current();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let _guard = runtime.enter();
        let parent = std::process::id() as i32;
        let mut moves = [(-1, -1); 8];
        let count = fds.len().min(moves.len());
        for (slot, (fd, target)) in moves.iter_mut().zip(&fds) {
            *slot = (fd.as_raw_fd(), *target);
        }
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // Joining the cgroups comes first: the descriptor moves below may reuse their numbers.
        let mut joins = [-1; 8];
        for (slot, fd) in joins.iter_mut().zip(&cgroups) {
            *slot = fd.as_raw_fd();
        }
        crate::sys::join_cgroups_before_exec(cmd.as_std_mut(), joins, cgroups.len());
        crate::sys::die_with_parent_and_inherit(cmd.as_std_mut(), parent, moves, count);
        let result = cmd.spawn();
        drop(fds);
        drop(cgroups);
        let _ = tx.send(result);
    });
    spawner()
        .send(job)
        .map_err(|_| std::io::Error::other("VM spawner thread is gone"))?;
    rx.await
        .map_err(|_| std::io::Error::other("VM spawner thread dropped the request"))?
}
