//! The guest's only NIC. The host gives the VM one (`eth0`, virtio-net) only when the run has
//! network access or forwarded ports; the gateway at the other end enforces the policy. The
//! agent gives it the fixed address of `sbx_protocol::net`, a default route via the gateway and
//! the gateway as the only DNS server (`/etc/resolv.conf` links to `/run/resolv.conf`).

use std::fs;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use sbx_protocol::net::{GATEWAY_IPV4, GUEST_IPV4, GUEST_NIC, MTU, PREFIX_LEN};

use crate::log;
use crate::sys::Interface;

/// Where the resolver configuration goes (`/etc/resolv.conf` in the image links here).
const RESOLV_CONF: &str = "/run/resolv.conf";

/// A step of the NIC setup failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} of {GUEST_NIC}")]
struct NetError {
    action: &'static str,
    #[source]
    source: io::Error,
}

fn step<T>(action: &'static str, result: io::Result<T>) -> Result<T, NetError> {
    result.map_err(|source| NetError { action, source })
}

/// Configures the NIC if there is one. Failures are logged; the agent serves regardless (code
/// then simply has no network).
pub fn configure() {
    if !Path::new("/sys/class/net").join(GUEST_NIC).exists() {
        return;
    }
    match bring_up() {
        Ok(()) => log::info(format_args!(
            "{GUEST_NIC} up: {}/{PREFIX_LEN} via {}, mtu {MTU}",
            Ipv4Addr::from(GUEST_IPV4),
            Ipv4Addr::from(GATEWAY_IPV4),
        )),
        Err(e) => log::warn(format_args!("{}", crate::init::chain(&e))),
    }
    if let Err(e) = write_resolv_conf(Path::new(RESOLV_CONF)) {
        log::warn(format_args!("cannot write {RESOLV_CONF}: {e}"));
    }
}

fn bring_up() -> Result<(), NetError> {
    let nic = step("open a control socket", Interface::open(GUEST_NIC))?;
    step("set the address", nic.set_address(GUEST_IPV4))?;
    step("set the netmask", nic.set_netmask(netmask(PREFIX_LEN)))?;
    step("set the MTU", nic.set_mtu(MTU))?;
    step("bring up", nic.up())?;
    step("add the default route", nic.add_default_route(GATEWAY_IPV4))
}

/// The IPv4 netmask of a prefix length (lengths over 32 count as 32).
fn netmask(prefix_len: u8) -> [u8; 4] {
    let bits = u32::from(prefix_len.min(32));
    u32::MAX.checked_shl(32 - bits).unwrap_or(0).to_be_bytes()
}

/// The resolver configuration: the gateway is the only DNS server; short timeouts so a refused
/// name fails fast.
fn resolv_conf() -> String {
    format!(
        "nameserver {}\noptions timeout:2 attempts:2\n",
        Ipv4Addr::from(GATEWAY_IPV4)
    )
}

fn write_resolv_conf(path: &Path) -> io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(path)?;
    file.write_all(resolv_conf().as_bytes())?;
    // Whatever the umask was.
    file.set_permissions(fs::Permissions::from_mode(0o644))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netmasks() {
        assert_eq!(netmask(24), [255, 255, 255, 0]);
        assert_eq!(netmask(PREFIX_LEN), [255, 255, 255, 0]);
        assert_eq!(netmask(0), [0, 0, 0, 0]);
        assert_eq!(netmask(1), [128, 0, 0, 0]);
        assert_eq!(netmask(20), [255, 255, 240, 0]);
        assert_eq!(netmask(32), [255, 255, 255, 255]);
        assert_eq!(netmask(40), [255, 255, 255, 255]);
    }

    #[test]
    fn the_gateway_is_on_the_guest_subnet() {
        let mask = u32::from_be_bytes(netmask(PREFIX_LEN));
        assert_eq!(
            u32::from_be_bytes(GUEST_IPV4) & mask,
            u32::from_be_bytes(GATEWAY_IPV4) & mask
        );
        assert_ne!(GUEST_IPV4, GATEWAY_IPV4);
    }

    #[test]
    fn resolv_conf_text() {
        assert_eq!(
            resolv_conf(),
            "nameserver 10.0.2.2\noptions timeout:2 attempts:2\n"
        );
    }

    #[test]
    fn resolv_conf_file() {
        let dir = std::env::temp_dir().join(format!("sbx-agent-net-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("resolv.conf");
        fs::write(&path, "old and much longer content\n").expect("seed");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        write_resolv_conf(&path).expect("write");
        assert_eq!(fs::read_to_string(&path).expect("read"), resolv_conf());
        let mode = fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
