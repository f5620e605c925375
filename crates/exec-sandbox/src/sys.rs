//! The few raw system calls the host library needs. Every `unsafe` block lives here.

use std::io;
use std::os::fd::RawFd;

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

/// The parent process id of the caller.
fn parent_pid() -> i32 {
    // SAFETY: getppid has no preconditions and cannot fail.
    unsafe { libc::getppid() }
}

/// Moves `fd` to `target` in the calling process, leaving `target` open across exec.
///
/// Meant for `pre_exec`: it only calls async-signal-safe functions.
fn move_fd_for_exec(fd: RawFd, target: RawFd) -> io::Result<()> {
    if fd == target {
        // SAFETY: F_GETFD/F_SETFD on an fd we own; no memory is passed.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        return Ok(());
    }
    // SAFETY: dup2 onto a descriptor number; dup2 clears FD_CLOEXEC on the new descriptor.
    if unsafe { libc::dup2(fd, target) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Moves each `(fd, target)` pair into place in the calling process, leaving the targets open
/// across exec. Sources are first copied above every target so that placing one cannot
/// clobber another that is still to be moved.
///
/// Meant for `pre_exec`: it only calls async-signal-safe functions and allocates nothing.
fn move_fds_for_exec(moves: &[(RawFd, RawFd)]) -> io::Result<()> {
    const MAX: usize = 8;
    if moves.len() > MAX {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let above = moves.iter().map(|&(_, t)| t).max().unwrap_or(0) + 1;
    let mut copies = [-1; MAX];
    for (i, &(fd, _)) in moves.iter().enumerate() {
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor the caller keeps open; no memory is passed.
        let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, above) };
        if copy < 0 {
            return Err(io::Error::last_os_error());
        }
        copies[i] = copy;
    }
    for (i, &(_, target)) in moves.iter().enumerate() {
        move_fd_for_exec(copies[i], target)?;
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

/// Makes `command`'s child receive SIGKILL when the spawning thread exits (and refuse to start
/// if `parent` died before it could ask), and places the first `count` descriptors of `moves`
/// at their target numbers, open across exec.
pub(crate) fn die_with_parent_and_inherit(
    command: &mut std::process::Command,
    parent: i32,
    moves: [(RawFd, RawFd); 8],
    count: usize,
) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
    // functions (prctl, getppid, fcntl, dup2); it allocates nothing (`moves` is copied in).
    unsafe {
        command.pre_exec(move || {
            set_parent_death_signal()?;
            // The parent may have died between fork and prctl: then nobody will signal us.
            if parent_pid() != parent {
                return Err(io::Error::other("parent exited during spawn"));
            }
            move_fds_for_exec(&moves[..count.min(moves.len())])
        });
    }
}

/// Makes `command`'s child write itself (`"0\n"`) into the cgroup of each of the first `count`
/// descriptors of `procs` (open `cgroup.procs` files) between fork and exec, before the
/// closures registered after this one run. A failed write fails the spawn.
pub(crate) fn join_cgroups_before_exec(
    command: &mut std::process::Command,
    procs: [RawFd; 8],
    count: usize,
) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and calls only write(2), which is
    // async-signal-safe; it allocates nothing (`procs` is copied in).
    unsafe {
        command.pre_exec(move || {
            for &fd in &procs[..count.min(procs.len())] {
                write_for_exec(fd, b"0\n")?;
            }
            Ok(())
        });
    }
}

/// Writes all of `bytes` to `fd` in one write(2) (retried on EINTR).
///
/// Meant for `pre_exec`: it only calls async-signal-safe functions.
fn write_for_exec(fd: RawFd, bytes: &[u8]) -> io::Result<()> {
    loop {
        // SAFETY: `bytes` is valid for its length for the duration of the call; the kernel
        // only reads it.
        let written = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if written == bytes.len() as isize {
            return Ok(());
        }
        if written < 0 {
            let error = io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(error);
        }
        return Err(io::Error::from(io::ErrorKind::WriteZero));
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
