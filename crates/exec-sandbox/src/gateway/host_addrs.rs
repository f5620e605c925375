//! The host's own interface addresses, read at run time for every gateway's policy: a
//! connection to one of them reaches the host's services past its firewall, so the verdicts
//! refuse them like loopback ([`sbx_net::policy::HostAddrs`]).
//!
//! One handle for the process, re-read from the kernel (`getifaddrs`) when a gateway is about
//! to decide and the last read is older than [`MAX_AGE`]: an address added to an interface is
//! refused within that time, without a thread of its own.

use std::io;
use std::net::Ipv4Addr;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use sbx_net::policy::HostAddrs;

/// How old the addresses may be when a verdict reads them.
pub(crate) const MAX_AGE: Duration = Duration::from_secs(1);

struct Shared {
    addrs: HostAddrs,
    read_at: Mutex<Option<Instant>>,
}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| Shared {
        addrs: HostAddrs::default(),
        read_at: Mutex::new(None),
    })
}

/// The process's handle, re-read first when older than [`MAX_AGE`]. A failed read keeps the
/// addresses last read (and is logged): interfaces do not vanish because a syscall failed.
pub(crate) fn current() -> HostAddrs {
    let shared = shared();
    let mut read_at = shared
        .read_at
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if read_at.is_none_or(|at| at.elapsed() >= MAX_AGE) {
        match read() {
            Ok(addrs) => shared.addrs.replace(addrs),
            Err(e) => tracing::warn!("cannot read the host's interface addresses: {e}"),
        }
        *read_at = Some(Instant::now());
    }
    shared.addrs.clone()
}

/// The IPv4 addresses of every interface of the host, from `getifaddrs(3)`.
pub(crate) fn read() -> io::Result<Vec<Ipv4Addr>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `getifaddrs` writes a pointer to a list it allocated into `list`, freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut addrs = Vec::new();
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: `entry` is a node of the list `getifaddrs` returned, not yet freed.
        let ifaddr = unsafe { &*entry };
        let sockaddr = ifaddr.ifa_addr;
        // SAFETY: a non-null `ifa_addr` points to a socket address whose family says its type;
        // an `AF_INET` one is a `sockaddr_in`.
        if !sockaddr.is_null() && i32::from(unsafe { (*sockaddr).sa_family }) == libc::AF_INET {
            // SAFETY: as above, the family is `AF_INET`.
            let inet = unsafe { &*sockaddr.cast::<libc::sockaddr_in>() };
            let addr = Ipv4Addr::from(u32::from_be(inet.sin_addr.s_addr));
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
        entry = ifaddr.ifa_next;
    }
    // SAFETY: `list` came from `getifaddrs` and no reference into it outlives this call.
    unsafe { libc::freeifaddrs(list) };
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_hosts_interfaces() {
        let addrs = read().unwrap();
        assert!(addrs.contains(&Ipv4Addr::LOCALHOST), "{addrs:?}");
        // What `ip` would list: every address is one of the kernel's local routes.
        let local = std::fs::read_to_string("/proc/net/fib_trie").unwrap_or_default();
        for addr in &addrs {
            assert!(local.contains(&addr.to_string()), "{addr} not in fib_trie");
        }
    }

    #[test]
    fn the_shared_handle_is_current() {
        let handle = current();
        assert_eq!(handle.to_vec(), read().unwrap());
        assert!(handle.contains(Ipv4Addr::LOCALHOST));
    }
}
