//! The few raw system calls the host library needs. Every `unsafe` block lives here.

use std::ffi::{CStr, CString, c_char};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Asks the kernel to SIGKILL the calling process when its parent thread exits.
///
/// Meant for `pre_exec`: it only calls async-signal-safe functions.
fn set_parent_death_signal() -> io::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and touches no memory.
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `bytes` on the connected unix socket `socket` with `fd` attached (`SCM_RIGHTS`).
/// Returns the number of bytes sent; `WouldBlock` when the socket is non-blocking and full.
pub(crate) fn send_with_fd(socket: RawFd, bytes: &[u8], fd: RawFd) -> io::Result<usize> {
    // SAFETY: CMSG_SPACE is a pure computation on a constant.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut control = [0u64; 8];
    if space > std::mem::size_of_val(&control) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `control`, which is large enough for one header holding
    // one descriptor (checked above) and suitably aligned (u64); CMSG_FIRSTHDR/CMSG_DATA only
    // compute addresses inside it.
    unsafe {
        let header = libc::CMSG_FIRSTHDR(&msg);
        (*header).cmsg_level = libc::SOL_SOCKET;
        (*header).cmsg_type = libc::SCM_RIGHTS;
        (*header).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(header).cast::<RawFd>(), fd);
    }
    // SAFETY: `msg` and everything it points to (iov over `bytes`, `control`) outlive the call;
    // the kernel only reads them.
    let sent = unsafe { libc::sendmsg(socket, &msg, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sent as usize)
}

/// Reads the CPU's time-stamp counter.
#[cfg(target_arch = "x86_64")]
pub(crate) fn read_tsc() -> u64 {
    // SAFETY: RDTSC is available on every x86_64 CPU and has no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The effective user id of the calling process.
pub(crate) fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Takes an exclusive `flock` on `file`: waits for it when `wait`, else returns `Ok(false)` at
/// once if another open file description holds it. Released when the descriptor is closed.
pub(crate) fn flock_exclusive(file: &std::fs::File, wait: bool) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let operation = if wait {
        libc::LOCK_EX
    } else {
        libc::LOCK_EX | libc::LOCK_NB
    };
    loop {
        // SAFETY: flock on a descriptor that `file` keeps open for the duration of the call;
        // no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
            return Ok(true);
        }
        let error = io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if !wait => return Ok(false),
            _ => return Err(error),
        }
    }
}

/// Makes `command`'s child receive SIGKILL when the spawning thread exits, so a build script
/// does not outlive a killed `sbx`.
pub(crate) fn kill_child_with_parent(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only calls prctl, which is
    // async-signal-safe, touches no memory and takes no lock.
    unsafe {
        command.pre_exec(set_parent_death_signal);
    }
}

/// A child process created by [`clone_process`], as its parent sees it.
pub(crate) struct Cloned {
    /// Its pid in our PID namespace.
    pub(crate) pid: u32,
    /// A pidfd of it.
    pub(crate) pidfd: OwnedFd,
}

/// Creates a child with `clone(flags | CLONE_PIDFD | SIGCHLD)`: like `fork`, in the new
/// namespaces `flags` asks for. The child runs `child` and exits with the code it returns.
///
/// `child` runs in a copy of this multithreaded process, so like a `pre_exec` closure it may
/// only make raw system calls on memory prepared before the call: no allocation, no lock, no
/// panic (`vm::jail::run_child` is written that way).
pub(crate) fn clone_process(flags: i32, child: &dyn Fn() -> i32) -> io::Result<Cloned> {
    let mut pidfd: libc::c_int = -1;
    let flags = (flags | libc::CLONE_PIDFD | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: without CLONE_VM the child gets a copy of the address space and continues on its
    // copy of this stack, as after fork. It only runs `child` (whose contract is above) and
    // leaves through `_exit`, never returning into the frames it shares with the parent. The
    // kernel writes the pidfd into `pidfd`, which outlives the call; the other pointer
    // arguments are null (no new stack, no TID or TLS pointers).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags,
            std::ptr::null_mut::<libc::c_void>(),
            &mut pidfd as *mut libc::c_int,
            std::ptr::null_mut::<libc::c_int>(),
            0 as libc::c_ulong,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if rc == 0 {
        reset_signals();
        let code = child();
        // SAFETY: _exit ends the child at once, running none of the parent's atexit handlers
        // or destructors.
        unsafe { libc::_exit(code) }
    }
    // SAFETY: CLONE_PIDFD made the kernel store a new descriptor that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    Ok(Cloned {
        pid: rc as u32,
        pidfd,
    })
}

/// In a new child: no blocked signals and SIGPIPE back to its default (Rust ignores it, and an
/// ignored signal stays ignored across exec), as `std::process::Command` does.
fn reset_signals() {
    // SAFETY: sigemptyset initialises the set on our stack; sigprocmask and signal are
    // async-signal-safe and take no other memory.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// A null-terminated array of C strings for `execve`, owning the strings it points at.
pub(crate) struct CStrings {
    _strings: Vec<CString>,
    pointers: Vec<*const c_char>,
}

impl CStrings {
    /// The array of `strings`.
    pub(crate) fn new(strings: Vec<CString>) -> Self {
        // The pointers stay valid when `strings` moves: each CString's bytes are on the heap.
        let mut pointers: Vec<*const c_char> = strings.iter().map(|s| s.as_ptr()).collect();
        pointers.push(std::ptr::null());
        Self {
            _strings: strings,
            pointers,
        }
    }
}

/// `execve(program, argv, envp)`; returns only on failure.
///
/// Meant for a new child: async-signal-safe, allocates nothing.
pub(crate) fn exec(program: &CStr, argv: &CStrings, envp: &CStrings) -> io::Error {
    // SAFETY: `program` is NUL-terminated; `argv` and `envp` are null-terminated arrays of
    // pointers to NUL-terminated strings they own, alive for the call.
    unsafe {
        libc::execve(
            program.as_ptr(),
            argv.pointers.as_ptr(),
            envp.pointers.as_ptr(),
        )
    };
    io::Error::last_os_error()
}

/// Closes every descriptor but those in `keep` (ascending, no duplicates), with one
/// `close_range` per gap. A new child's first step: a copy of a multithreaded parent holds
/// every descriptor the parent had open at the clone (other VMs' pipes and sockets, cache
/// locks), and would keep them, and the locks held, until its `exec`.
///
/// Meant for a new child: async-signal-safe, allocates nothing. Kernels before 5.9 lack
/// `close_range`; there the descriptors stay until `exec` closes them (all are close-on-exec).
pub(crate) fn close_all_but(keep: &[RawFd]) -> io::Result<()> {
    let close = |from: u32, to: u32| -> io::Result<()> {
        // SAFETY: close_range takes two numbers and flags; no memory.
        let rc = unsafe { libc::syscall(libc::SYS_close_range, from, to, 0u32) };
        match rc {
            0 => Ok(()),
            _ if io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) => Ok(()),
            _ => Err(io::Error::last_os_error()),
        }
    };
    if keep.first().is_some_and(|&fd| fd < 0) || keep.windows(2).any(|w| w[0] >= w[1]) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let mut next: u32 = 0;
    for &fd in keep {
        let fd = fd as u32;
        if fd > next {
            close(next, fd - 1)?;
        }
        next = fd + 1;
    }
    close(next, u32::MAX)
}

/// Places each `(source, target)` of `moves` at its target number, open across exec; closes
/// every other descriptor below `floor` except stdio, and makes everything from `floor` up
/// close-on-exec. Sources are first copied to `floor` or above (above every target), so placing
/// one cannot clobber another still to be placed; `floor` must exceed every target.
///
/// Meant for a new child: async-signal-safe, allocates nothing.
pub(crate) fn place_fds(moves: &[(RawFd, RawFd)], floor: RawFd) -> io::Result<()> {
    const MAX: usize = 16;
    let last_error = || Err(io::Error::last_os_error());
    if moves.len() > MAX
        || moves
            .iter()
            .any(|&(_, target)| target >= floor || target < 0)
    {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let mut copies = [-1; MAX];
    for (copy, &(fd, _)) in copies.iter_mut().zip(moves) {
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor number; no memory is passed.
        *copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, floor) };
        if *copy < 0 {
            return last_error();
        }
    }
    for (&copy, &(_, target)) in copies.iter().zip(moves) {
        // SAFETY: dup2 onto a descriptor number (clearing FD_CLOEXEC on it); no memory.
        if unsafe { libc::dup2(copy, target) } < 0 {
            return last_error();
        }
    }
    for fd in 3..floor {
        if !moves.iter().any(|&(_, target)| target == fd) {
            // SAFETY: closing a descriptor number of this (single-threaded) child; EBADF for
            // a number not open is fine.
            unsafe { libc::close(fd) };
        }
    }
    // SAFETY: close_range takes two numbers and flags; no memory.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            floor as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    // Kernels before 5.11: every descriptor of ours is close-on-exec already.
    if rc < 0
        && !matches!(
            io::Error::last_os_error().raw_os_error(),
            Some(libc::ENOSYS | libc::EINVAL)
        )
    {
        return last_error();
    }
    Ok(())
}

/// Registers `fd` with the tokio runtime of the caller, for readiness to read (a pidfd: its
/// process exited).
pub(crate) fn watch_readable(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is a valid open descriptor that only it closes, and it stays inside
    // the AsyncFd (so open and the same file) for as long as the registration lasts; its
    // `as_raw_fd` always returns that descriptor.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
            .map_err(|e| e.into_parts().1)
    }
}
/// Whether the calling process may create entries in the directory `path`, by its effective
/// ids (`EACCES`, `EROFS`, ... otherwise).
pub(crate) fn may_write(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `path` is a NUL-terminated string that outlives the call; faccessat only reads it.
    let rc = unsafe {
        libc::faccessat(
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::W_OK | libc::X_OK,
            libc::AT_EACCESS,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;

    use rustix::pipe::PipeFlags;

    use super::*;

    /// Whether a second open file description of the parent's lock can be locked while a child,
    /// cloned with the lock open and told whether to close all but its own descriptors, still
    /// lives (before any `exec`).
    fn lock_is_free_while_the_child_lives(close: bool) -> bool {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let lock = std::fs::File::create(&path).unwrap();
        assert!(flock_exclusive(&lock, false).unwrap());
        let (hold_r, hold_w) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC).unwrap();
        let (ready_r, ready_w) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC).unwrap();
        let mut keep = [hold_r.as_raw_fd(), ready_w.as_raw_fd()];
        keep.sort_unstable();
        let child = clone_process(0, &|| {
            if close && close_all_but(&keep).is_err() {
                return 2;
            }
            let _ = rustix::io::write(&ready_w, b"r");
            let mut byte = [0u8; 1];
            let _ = rustix::io::read(&hold_r, &mut byte);
            0
        })
        .unwrap();
        drop(ready_w);
        let mut byte = [0u8; 1];
        std::fs::File::from(ready_r).read_exact(&mut byte).unwrap();
        drop(lock);
        let again = std::fs::File::open(&path).unwrap();
        // Another test of this process may fork while the lock is open: its child holds a
        // copy until it `exec`s (close-on-exec), so look again for a while before saying no.
        let free = (0..50).any(|_| {
            flock_exclusive(&again, false).unwrap() || {
                std::thread::sleep(std::time::Duration::from_millis(10));
                false
            }
        });
        std::fs::File::from(hold_w).write_all(b"go").unwrap();
        let status = rustix::process::waitpid(
            Some(rustix::process::Pid::from_raw(child.pid as i32).unwrap()),
            rustix::process::WaitOptions::empty(),
        )
        .unwrap()
        .unwrap()
        .1;
        assert_eq!(status.exit_status(), Some(0));
        free
    }

    #[test]
    fn a_new_child_that_closes_all_but_its_own_descriptors_holds_none_of_the_parents_locks() {
        assert!(
            !lock_is_free_while_the_child_lives(false),
            "a copied descriptor keeps the lock"
        );
        assert!(lock_is_free_while_the_child_lives(true));
    }

    #[test]
    fn close_all_but_wants_ascending_descriptors() {
        // Checked before anything is closed.
        assert!(close_all_but(&[5, 4]).is_err());
        assert!(close_all_but(&[-1]).is_err());
    }
}
