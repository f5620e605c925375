//! The agent's seam to the kernel: small helpers that give [`rustix`] calls the agent's
//! conventions, and the few calls rustix does not cover (an `ioctl` it has no wrapper for,
//! `fcntl(F_SETOWN)`, `dup2` onto a descriptor number the child does not own yet), made through
//! `libc`. Everything else calls rustix, whose wrappers are safe, directly. Every `unsafe` block
//! of the agent lives here.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use rustix::io::Errno;
use rustix::process::{Pid, Signal};

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `RNDRESEEDCRNG` from `<linux/random.h>`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: rustix::ioctl::Opcode = rustix::ioctl::opcode::none(b'R', 0x07);

/// Forces the kernel to reseed its CRNG from the input pool now (needs `CAP_SYS_ADMIN`).
pub fn reseed_crng(urandom: &File) -> io::Result<()> {
    // SAFETY: RNDRESEEDCRNG is a valid opcode that takes no argument and touches no user
    // memory; the descriptor is kept open by `urandom` for the duration of the call.
    unsafe { rustix::ioctl::ioctl(urandom, rustix::ioctl::NoArg::<RNDRESEEDCRNG>::new()) }?;
    Ok(())
}

/// This process's id, as the kernel's signed pid type.
pub fn getpid() -> i32 {
    rustix::process::getpid().as_raw_pid()
}

/// `kill(pid, signal)` for a positive `pid`; a process that is already gone is fine.
pub fn kill_process(pid: i32, signal: Signal) -> io::Result<()> {
    let Some(pid) = Pid::from_raw(pid.max(0)) else {
        return Err(io::ErrorKind::InvalidInput.into());
    };
    ignore_gone(rustix::process::kill_process(pid, signal))
}

/// `kill(-pgid, signal)`: the whole process group `pgid` (a positive id); a group that is
/// already gone is fine.
pub fn kill_group(pgid: i32, signal: Signal) -> io::Result<()> {
    let Some(pgid) = Pid::from_raw(pgid.max(0)) else {
        return Err(io::ErrorKind::InvalidInput.into());
    };
    ignore_gone(rustix::process::kill_process_group(pgid, signal))
}

/// `kill(-1, signal)`: every process this one may signal, except init and itself.
pub fn kill_everyone(signal: Signal) -> io::Result<()> {
    ignore_gone(rustix::process::kill_process_group(Pid::INIT, signal))
}

fn ignore_gone(result: rustix::io::Result<()>) -> io::Result<()> {
    match result {
        Err(Errno::SRCH) => Ok(()),
        other => Ok(other?),
    }
}

/// `SIGKILL`'s number, as [`WaitStatus::Signaled`] carries it.
pub const SIGKILL: i32 = Signal::KILL.as_raw();

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
        let (pid, status) = match rustix::process::wait(rustix::process::WaitOptions::NOHANG) {
            Ok(Some(reaped)) => reaped,
            Ok(None) | Err(Errno::CHILD) => return Ok(None),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        let status = if let Some(code) = status.exit_status() {
            WaitStatus::Exited(code)
        } else if let Some(signal) = status.terminating_signal() {
            WaitStatus::Signaled(signal)
        } else {
            // Stopped/continued children are not reported without WUNTRACED/WCONTINUED.
            continue;
        };
        return Ok(Some((pid.as_raw_pid(), status)));
    }
}

/// poll(2) on one descriptor without waiting; returns the `revents` bits.
pub fn poll_now(
    fd: BorrowedFd<'_>,
    events: rustix::event::PollFlags,
) -> io::Result<rustix::event::PollFlags> {
    let mut fds = [rustix::event::PollFd::from_borrowed_fd(fd, events)];
    let zero = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    loop {
        match rustix::event::poll(&mut fds, Some(&zero)) {
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
            Ok(_) => return Ok(fds[0].revents()),
        }
    }
}

/// Makes this process the owner of `fd`'s SIGIO (virtio-serial raises it when the host
/// connects, and on every byte that arrives): delivered only while [`set_sigio`] has it on.
pub fn own_sigio(fd: BorrowedFd<'_>) -> io::Result<()> {
    // rustix has no F_SETOWN.
    // SAFETY: fcntl(F_SETOWN) takes integer arguments; `fd` is open for the duration of the call.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETOWN, getpid()) })?;
    Ok(())
}

/// Turns SIGIO for `fd` on or off (`O_ASYNC`).
pub fn set_sigio(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(fd)?;
    let flags = if on {
        flags | rustix::fs::OFlags::ASYNC
    } else {
        flags - rustix::fs::OFlags::ASYNC
    };
    rustix::fs::fcntl_setfl(fd, flags)?;
    Ok(())
}

/// Milliseconds since the kernel started (`CLOCK_BOOTTIME`).
pub fn uptime_ms() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1000).saturating_add(nanos / 1_000_000)
}

/// `openat2(2)`: opens `path` relative to `dir` (close-on-exec) with the `RESOLVE_*` flags in
/// `resolve` (`RESOLVE_BENEATH` confines resolution, symbolic links included, to `dir`'s
/// subtree). Retries the `EAGAIN` the kernel returns when a concurrent rename made it unsure.
pub fn openat2(
    dir: BorrowedFd<'_>,
    path: &[u8],
    flags: rustix::fs::OFlags,
    mode: u32,
    resolve: rustix::fs::ResolveFlags,
) -> io::Result<OwnedFd> {
    let flags = flags | rustix::fs::OFlags::CLOEXEC;
    let mode = rustix::fs::Mode::from_raw_mode(mode);
    let mut attempts = 0;
    loop {
        match rustix::fs::openat2(dir, path, flags, mode, resolve) {
            Ok(fd) => return Ok(fd),
            Err(Errno::AGAIN | Errno::INTR) if attempts < 15 => attempts += 1,
            Err(e) => return Err(e.into()),
        }
    }
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
/// `CAP_NET_ADMIN` for every change). rustix has no wrappers for these ioctls.
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
        let sock = rustix::net::socket_with(
            rustix::net::AddressFamily::INET,
            rustix::net::SocketType::DGRAM,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )?;
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
    /// A cgroup v2 `cgroup.procs` the child writes itself into (the memory guard's group).
    pub cgroup_procs: Option<RawFd>,
}

/// `dup2(from, to)` on raw numbers, between fork and exec: `to` need not be open, which is why
/// rustix's `dup2` (whose target is an `OwnedFd`) does not fit.
fn dup2_in_child(from: RawFd, to: RawFd) -> io::Result<()> {
    // SAFETY: dup2 only takes integers; `from` is open in the child (inherited from the
    // parent, which keeps it open until the child is spawned) and whatever `to` was is closed
    // by the kernel, which is the point: nothing in the child owns that number.
    check(unsafe { libc::dup2(from, to) }).map(drop)
}

/// Arranges for `command`'s child to apply `setup` just before exec. `setup`'s descriptors must
/// be numbered above 4 and stay open until the child is spawned.
pub fn sandbox_child(command: &mut Command, setup: ChildSetup) {
    use rustix::process::{DumpableBehavior, Resource, Rlimit};
    use rustix::thread::{Gid, Uid};

    let pre_exec = move || -> io::Result<()> {
        // Only async-signal-safe calls from here on: no allocation, no locks. rustix makes raw
        // system calls; its errors convert to `io::Error` without allocating.
        if let Some(procs) = setup.cgroup_procs {
            // First, as dup2 onto 3 and 4 may close this descriptor. SAFETY: the parent keeps
            // it open for its whole life; the borrow ends with this statement. Writing "0"
            // moves the writing process (cgroup v2).
            rustix::io::write(unsafe { BorrowedFd::borrow_raw(procs) }, b"0")?;
        }
        // The targets 3 and 4 lose their close-on-exec flag, which is the point.
        dup2_in_child(setup.command_fd, 3)?;
        dup2_in_child(setup.status_fd, 4)?;
        // The child is not a process-group leader, so this cannot fail with EPERM.
        rustix::process::setsid()?;
        // The agent runs at a raised priority (`init::AGENT_NICE`); programs do not. (Outside a
        // VM the agent may not be allowed to lower a nice value it did not raise: no matter.)
        let _ = rustix::process::setpriority_process(None, 0);
        rustix::thread::set_no_new_privs(true)?;
        if let Some((uid, gid, nproc)) = setup.drop_to {
            let limit = Rlimit {
                current: Some(nproc),
                maximum: Some(nproc),
            };
            rustix::process::setrlimit(Resource::Nproc, limit)?;
            // An empty bounding set: nothing the program executes can regain a capability,
            // whatever file capabilities it carries. Numbers past the kernel's last are EINVAL.
            for cap in 0..64 {
                // SAFETY: prctl with integer arguments only.
                unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
            }
            // The `_thread` calls are the raw system calls, which change only the calling
            // thread's credentials: the forked child has one thread, so that is the process.
            rustix::thread::set_thread_groups(&[])?;
            rustix::thread::set_thread_gid(Gid::from_raw(gid))?;
            rustix::thread::set_thread_uid(Uid::from_raw(uid))?;
        }
        // Note: execve resets this for a readable binary; it protects the window until exec
        // and documents intent. The interpreters run user code in-process anyway.
        rustix::process::set_dumpable_behavior(DumpableBehavior::NotDumpable)?;
        Ok(())
    };
    // SAFETY: the closure only makes async-signal-safe system calls (dup2, setsid,
    // setpriority, prctl, write, prlimit, setgroups, setgid, setuid) on plain integers captured by value; it allocates
    // nothing and takes no locks, so it is sound between fork and exec.
    unsafe { command.pre_exec(pre_exec) };
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests")]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn wait_status_codes() {
        assert_eq!(WaitStatus::Exited(3).code(), 3);
        assert_eq!(WaitStatus::Signaled(9).code(), 137);
        assert_eq!(SIGKILL, 9);
    }

    #[test]
    fn reseed_opcode_matches_linux() {
        assert_eq!(RNDRESEEDCRNG, 0x5207);
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
    fn kill_of_a_missing_process_is_fine() {
        // Reaped children's pids are free; a pid far above pid_max is never in use.
        assert!(kill_process(i32::MAX, Signal::KILL).is_ok());
        assert!(kill_group(i32::MAX, Signal::KILL).is_ok());
        assert!(kill_process(0, Signal::KILL).is_err(), "0 is no process");
    }

    #[test]
    fn poll_reports_readable_and_hangup() {
        let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        let events = rustix::event::PollFlags::IN;
        assert!(poll_now(r.as_fd(), events).unwrap().is_empty());
        rustix::io::write(&w, b"x").unwrap();
        assert!(poll_now(r.as_fd(), events).unwrap().contains(events));
        drop(w);
        assert!(
            poll_now(r.as_fd(), events)
                .unwrap()
                .contains(rustix::event::PollFlags::HUP)
        );
    }
}
