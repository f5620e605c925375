//! Thin, safe wrappers over the system calls the agent needs. Every `unsafe` block of the agent
//! lives here.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("path {} contains a NUL byte", path.display()),
        )
    })
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `RNDRESEEDCRNG` from `<linux/random.h>`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Forces the kernel to reseed its CRNG from the input pool now (needs `CAP_SYS_ADMIN`).
pub fn reseed_crng(urandom: &std::fs::File) -> io::Result<()> {
    // SAFETY: RNDRESEEDCRNG takes no argument and touches no user memory; the descriptor is
    // kept open by `urandom` for the duration of the call.
    check(unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG as _) }).map(drop)
}

/// Sets `CLOCK_REALTIME` to `unix_time_ns` (needs `CAP_SYS_TIME`).
pub fn set_realtime(unix_time_ns: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(unix_time_ns / 1_000_000_000)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        tv_nsec: (unix_time_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: clock_settime reads the timespec we pass by reference and keeps no pointer.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) }).map(drop)
}

/// This process's id.
pub fn getpid() -> i32 {
    // SAFETY: getpid has no preconditions and cannot fail.
    unsafe { libc::getpid() }
}

/// This process's effective uid.
pub fn geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// mount(2). `data` is the filesystem-specific option string.
pub fn mount(
    source: &str,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = CString::new(source).map_err(|_| io::ErrorKind::InvalidInput)?;
    let target = cstring(target)?;
    let fstype = fstype
        .map(CString::new)
        .transpose()
        .map_err(|_| io::ErrorKind::InvalidInput)?;
    let data = data
        .map(CString::new)
        .transpose()
        .map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: every pointer is either null or a NUL-terminated string that outlives the call.
    check(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr().cast::<libc::c_void>()),
        )
    })
    .map(drop)
}

/// umount2(2).
pub fn umount(target: &Path, flags: libc::c_int) -> io::Result<()> {
    let target = cstring(target)?;
    // SAFETY: `target` is a NUL-terminated string that outlives the call.
    check(unsafe { libc::umount2(target.as_ptr(), flags) }).map(drop)
}

/// chroot(2).
pub fn chroot(path: &Path) -> io::Result<()> {
    let path = cstring(path)?;
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    check(unsafe { libc::chroot(path.as_ptr()) }).map(drop)
}

/// Flushes every filesystem.
pub fn sync() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() }
}

/// reboot(2) with `RB_AUTOBOOT`: with `reboot=t` on the kernel command line and QEMU's
/// `-no-reboot`, this ends the VM. Only returns on failure.
pub fn reboot_now() -> io::Error {
    // SAFETY: reboot only takes a command constant; on success it does not return.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    io::Error::last_os_error()
}

/// Sends `signal` to `pid` (or a process group when `pid` is negative); a missing target is fine.
pub fn kill(pid: i32, signal: i32) -> io::Result<()> {
    // SAFETY: kill only takes integers.
    match check(unsafe { libc::kill(pid, signal) }) {
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
        other => other.map(drop),
    }
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitStatus {
    /// Exited with this code.
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
}

impl WaitStatus {
    /// The code a shell would report: the exit code, or 128 + signal number.
    pub fn code(self) -> i32 {
        match self {
            WaitStatus::Exited(code) => code,
            WaitStatus::Signaled(signal) => 128 + signal,
        }
    }
}

/// Reaps one terminated child of any kind without blocking. `Ok(None)`: none is ready (or there
/// are no children at all).
pub fn reap_any() -> io::Result<Option<(i32, WaitStatus)>> {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a valid out-pointer for the duration of the call.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid == 0 {
            return Ok(None);
        }
        if pid == -1 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ECHILD) => return Ok(None),
                _ => return Err(err),
            }
        }
        let status = if libc::WIFEXITED(status) {
            WaitStatus::Exited(libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            WaitStatus::Signaled(libc::WTERMSIG(status))
        } else {
            // Stopped/continued children are not reported without WUNTRACED/WCONTINUED.
            continue;
        };
        return Ok(Some((pid, status)));
    }
}

/// A pipe whose both ends are close-on-exec: `(read end, write end)`.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Duplicates `fd` to a close-on-exec descriptor numbered at least `min`.
pub fn dup_above(fd: &OwnedFd, min: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC only reads the integer arguments.
    let new = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) })?;
    // SAFETY: fcntl returned a fresh descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// One non-blocking `read(2)` on a descriptor opened with `O_NONBLOCK`.
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n.unsigned_abs())
    }
}

/// poll(2) on one descriptor; returns the `revents` bits.
pub fn poll_one(fd: RawFd, events: libc::c_short, timeout_ms: libc::c_int) -> io::Result<i16> {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    loop {
        // SAFETY: `pfd` is a valid array of one pollfd for the duration of the call.
        match check(unsafe { libc::poll(&mut pfd, 1, timeout_ms) }) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
            Ok(_) => return Ok(pfd.revents),
        }
    }
}

/// Makes this process receive SIGIO when `fd` changes state (virtio-serial: host connects).
pub fn enable_sigio(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl with integer arguments on a descriptor we own.
    check(unsafe { libc::fcntl(fd, libc::F_SETOWN, libc::getpid()) })?;
    // SAFETY: as above.
    let flags = check(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_ASYNC) }).map(drop)
}

/// Orphans of our descendants are reparented to us (dev mode, where we are not PID 1).
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) }).map(drop)
}

/// Milliseconds since the kernel started (`CLOCK_BOOTTIME`).
pub fn uptime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_BOOTTIME always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1000).saturating_add(nanos / 1_000_000)
}

/// Brings the loopback interface up, so programs in the sandbox can talk to themselves.
pub fn loopback_up() -> io::Result<()> {
    Interface::open("lo")?.up()
}

/// An IPv4 `sockaddr` (port zero), as interface and route ioctls take it.
fn sockaddr_ipv4(addr: [u8; 4]) -> libc::sockaddr {
    // `sockaddr_in` viewed as a `sockaddr`: the family, then in `sa_data` the port and the
    // address (both big-endian, which is byte order), then zero padding.
    let mut sa_data = [0 as libc::c_char; 14];
    for (dst, src) in sa_data[2..6].iter_mut().zip(addr) {
        *dst = src as libc::c_char;
    }
    libc::sockaddr {
        sa_family: libc::AF_INET as libc::sa_family_t,
        sa_data,
    }
}

/// A network interface configured through ioctls on an `AF_INET` datagram socket (needs
/// `CAP_NET_ADMIN` for every change).
pub struct Interface {
    sock: OwnedFd,
    name: CString,
}

impl Interface {
    /// Opens the control socket for interface `name` (the interface itself is looked up by each
    /// call).
    pub fn open(name: &str) -> io::Result<Self> {
        let name = CString::new(name)
            .ok()
            .filter(|n| n.as_bytes_with_nul().len() <= libc::IFNAMSIZ)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("bad interface name {name:?}"),
                )
            })?;
        // SAFETY: socket takes integer arguments; the result is checked.
        let sock = check(unsafe {
            libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0)
        })?;
        // SAFETY: socket returned a fresh descriptor that nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(sock) };
        Ok(Self { sock, name })
    }

    /// An `ifreq` naming this interface, everything else zero.
    fn request(&self) -> libc::ifreq {
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(self.name.as_bytes_with_nul()) {
            *dst = *src as libc::c_char;
        }
        req
    }

    /// One `SIOC*IF*` ioctl: the kernel reads `req` and, for the getters, fills it.
    fn ioctl(&self, request: libc::Ioctl, req: &mut libc::ifreq) -> io::Result<()> {
        // SAFETY: every request passed here takes a `struct ifreq`, and `req` is a valid,
        // exclusively borrowed one for the duration of the call; the kernel keeps no pointer.
        check(unsafe { libc::ioctl(self.sock.as_raw_fd(), request, &raw mut *req) }).map(drop)
    }

    /// Sets `IFF_UP | IFF_RUNNING`, keeping the other flags.
    pub fn up(&self) -> io::Result<()> {
        let mut req = self.request();
        self.ioctl(libc::SIOCGIFFLAGS, &mut req)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        self.ioctl(libc::SIOCSIFFLAGS, &mut req)
    }

    /// Sets the interface's IPv4 address.
    pub fn set_address(&self, addr: [u8; 4]) -> io::Result<()> {
        let mut req = self.request();
        req.ifr_ifru.ifru_addr = sockaddr_ipv4(addr);
        self.ioctl(libc::SIOCSIFADDR, &mut req)
    }

    /// Sets the netmask of the interface's IPv4 address.
    pub fn set_netmask(&self, mask: [u8; 4]) -> io::Result<()> {
        let mut req = self.request();
        req.ifr_ifru.ifru_netmask = sockaddr_ipv4(mask);
        self.ioctl(libc::SIOCSIFNETMASK, &mut req)
    }

    /// Sets the MTU.
    pub fn set_mtu(&self, mtu: u16) -> io::Result<()> {
        let mut req = self.request();
        req.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
        self.ioctl(libc::SIOCSIFMTU, &mut req)
    }

    /// Adds the default route (`0.0.0.0/0`) via `gateway` on this interface, which must be up
    /// with an address on the gateway's subnet. An existing default route is left alone.
    pub fn add_default_route(&self, gateway: [u8; 4]) -> io::Result<()> {
        // SAFETY: rtentry is plain old data (its one pointer may be null); all-zero is valid.
        let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
        route.rt_dst = sockaddr_ipv4([0; 4]);
        route.rt_genmask = sockaddr_ipv4([0; 4]);
        route.rt_gateway = sockaddr_ipv4(gateway);
        route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        route.rt_dev = self.name.as_ptr().cast_mut();
        // SAFETY: SIOCADDRT takes a `struct rtentry`; `route` and the NUL-terminated name its
        // `rt_dev` points to (only read by the kernel) outlive the call, which keeps no pointer.
        match check(unsafe { libc::ioctl(self.sock.as_raw_fd(), libc::SIOCADDRT, &raw mut route) })
        {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            other => other.map(drop),
        }
    }
}

/// What a child does between fork and exec to become a sandboxed interpreter.
#[derive(Debug, Clone, Copy)]
pub struct ChildSetup {
    /// Becomes the child's fd 3 (commands from the agent).
    pub command_fd: RawFd,
    /// Becomes the child's fd 4 (status lines to the agent).
    pub status_fd: RawFd,
    /// Switch to this uid/gid (dropping supplementary groups) and cap the process count.
    pub drop_to: Option<(u32, u32, u64)>,
}

/// Arranges for `command`'s child to apply `setup` just before exec. `setup`'s descriptors must
/// be numbered above 4 and stay open until the child is spawned.
pub fn sandbox_child(command: &mut Command, setup: ChildSetup) {
    let pre_exec = move || -> io::Result<()> {
        // Only async-signal-safe calls from here on: no allocation, no locks.
        // SAFETY: dup2 on descriptors that are open in the child (inherited from the parent);
        // the targets 3 and 4 lose their close-on-exec flag, which is the point.
        check(unsafe { libc::dup2(setup.command_fd, 3) })?;
        // SAFETY: as above.
        check(unsafe { libc::dup2(setup.status_fd, 4) })?;
        // SAFETY: setsid takes no arguments; the child is not a process-group leader.
        check(unsafe { libc::setsid() })?;
        // SAFETY: prctl with integer arguments.
        check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
        if let Some((uid, gid, nproc)) = setup.drop_to {
            let limit = libc::rlimit {
                rlim_cur: nproc,
                rlim_max: nproc,
            };
            // SAFETY: `limit` is a valid rlimit for the duration of the call.
            check(unsafe { libc::setrlimit(libc::RLIMIT_NPROC, &limit) })?;
            // SAFETY: a zero-length group list needs no pointer.
            check(unsafe { libc::setgroups(0, std::ptr::null()) })?;
            // SAFETY: integer argument.
            check(unsafe { libc::setgid(gid) })?;
            // SAFETY: integer argument.
            check(unsafe { libc::setuid(uid) })?;
        }
        // Note: execve resets this for a readable binary; it protects the window until exec
        // and documents intent. The interpreters run user code in-process anyway.
        // SAFETY: prctl with integer arguments.
        check(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) })?;
        Ok(())
    };
    // SAFETY: the closure only makes async-signal-safe system calls (dup2, setsid, prctl,
    // setrlimit, setgroups, setgid, setuid) on plain integers captured by value; it allocates
    // nothing and takes no locks, so it is sound between fork and exec.
    unsafe { command.pre_exec(pre_exec) };
}

fn name_cstring(name: &[u8]) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in path"))
}

/// `openat2(2)`: opens `path` relative to `dir` with the `RESOLVE_*` flags in `resolve`
/// (`RESOLVE_BENEATH` confines resolution, symbolic links included, to `dir`'s subtree).
/// Retries the `EAGAIN` the kernel returns when a concurrent rename made it unsure.
pub fn openat2(
    dir: std::os::fd::BorrowedFd<'_>,
    path: &[u8],
    flags: libc::c_int,
    mode: u32,
    resolve: u64,
) -> io::Result<OwnedFd> {
    let path = name_cstring(path)?;
    // SAFETY: open_how is plain old data; all-zero is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = u64::try_from(flags | libc::O_CLOEXEC).unwrap_or(0);
    how.mode = u64::from(mode);
    how.resolve = resolve;
    let mut attempts = 0;
    loop {
        // SAFETY: `path` is a NUL-terminated string and `how` a valid open_how, both outliving
        // the call, and the size passed is exactly that of `how`; the kernel keeps no pointer.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                path.as_ptr(),
                &raw const how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if ret >= 0 {
            let fd = RawFd::try_from(ret).map_err(|_| io::Error::other("bad descriptor"))?;
            // SAFETY: openat2 returned a fresh descriptor that nobody else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let error = io::Error::last_os_error();
        let retry = matches!(error.raw_os_error(), Some(libc::EAGAIN | libc::EINTR));
        attempts += 1;
        if !retry || attempts >= 16 {
            return Err(error);
        }
    }
}

/// `mkdirat(2)`.
pub fn mkdirat(dir: std::os::fd::BorrowedFd<'_>, name: &[u8], mode: u32) -> io::Result<()> {
    let name = name_cstring(name)?;
    // SAFETY: `name` is a NUL-terminated string that outlives the call.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
}

/// `renameat(2)` within one directory: replaces `to` (never following a link there).
pub fn renameat(dir: std::os::fd::BorrowedFd<'_>, from: &[u8], to: &[u8]) -> io::Result<()> {
    let from = name_cstring(from)?;
    let to = name_cstring(to)?;
    // SAFETY: both names are NUL-terminated strings that outlive the call.
    check(unsafe { libc::renameat(dir.as_raw_fd(), from.as_ptr(), dir.as_raw_fd(), to.as_ptr()) })
        .map(drop)
}

/// `unlinkat(2)` of a file (not a directory).
pub fn unlinkat(dir: std::os::fd::BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    let name = name_cstring(name)?;
    // SAFETY: `name` is a NUL-terminated string that outlives the call.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) }).map(drop)
}

/// `fchown(2)`.
pub fn fchown(fd: std::os::fd::BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: fchown takes integers only.
    check(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) }).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_status_codes() {
        assert_eq!(WaitStatus::Exited(3).code(), 3);
        assert_eq!(WaitStatus::Signaled(9).code(), 137);
    }

    #[test]
    fn ipv4_sockaddr_matches_sockaddr_in() {
        let sa = sockaddr_ipv4([10, 0, 2, 15]);
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        let bytes: Vec<u8> = sa.sa_data.iter().map(|&b| b as u8).collect();
        assert_eq!(bytes, [0, 0, 10, 0, 2, 15, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            std::mem::size_of::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_in>()
        );
    }

    #[test]
    fn interface_names() {
        assert!(Interface::open("eth0").is_ok());
        assert!(Interface::open("a-name-far-too-long").is_err());
        assert!(Interface::open("e\0th").is_err());
        let req = Interface::open("lo").expect("lo").request();
        assert_eq!(
            req.ifr_name[..3],
            [b'l' as libc::c_char, b'o' as libc::c_char, 0]
        );
    }

    #[test]
    fn pipe_and_nonblocking_read() {
        let (r, w) = pipe().expect("pipe");
        let file = std::fs::File::from(w);
        std::io::Write::write_all(&mut &file, b"hi").expect("write");
        let r = dup_above(&r, 10).expect("dup");
        assert!(r.as_raw_fd() >= 10);
        let mut buf = [0u8; 8];
        assert_eq!(read(r.as_raw_fd(), &mut buf).expect("read"), 2);
        assert_eq!(&buf[..2], b"hi");
    }
}
