//! The few raw system calls the host library needs. Every `unsafe` block lives here.

use std::io;
use std::os::fd::RawFd;

/// Asks the kernel to SIGKILL the calling process when its parent thread exits.
///
/// Meant for `pre_exec`: it only calls async-signal-safe functions.
pub(crate) fn set_parent_death_signal() -> io::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and touches no memory.
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The parent process id of the caller.
pub(crate) fn parent_pid() -> i32 {
    // SAFETY: getppid has no preconditions and cannot fail.
    unsafe { libc::getppid() }
}

/// Moves `fd` to `target` in the calling process, leaving `target` open across exec.
///
/// Meant for `pre_exec`: it only calls async-signal-safe functions.
pub(crate) fn move_fd_for_exec(fd: RawFd, target: RawFd) -> io::Result<()> {
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

/// Reads the CPU's time-stamp counter.
#[cfg(target_arch = "x86_64")]
pub(crate) fn read_tsc() -> u64 {
    // SAFETY: RDTSC is available on every x86_64 CPU and has no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}
