//! The network policy of one VM: validated domains, the allowlist, which host addresses a guest
//! may reach, and the table binding the addresses given to a guest to the names they were
//! resolved for.
//!
//! The gateway never hands the guest a real address in a DNS answer: each allowed name gets a
//! *virtual* address from [`VIRTUAL_NET`] (198.18.0.0/15, reserved for benchmarking, never a
//! real destination), bound in a [`NameTable`] to that name and the host's real addresses for
//! it. A connection to a virtual address is therefore tied to exactly one name, and the name the
//! client presents (SNI or `Host`) must be that name.

use std::net::Ipv4Addr;
use std::sync::{Arc, PoisonError, RwLock};

/// Longest domain name (RFC 1035: 253 characters in text form).
pub const MAX_DOMAIN_BYTES: usize = 253;
/// Longest label (RFC 1035).
pub const MAX_LABEL_BYTES: usize = 63;
/// Most allowlist entries one VM may have.
pub const MAX_ALLOWED_DOMAINS: usize = 100;
/// Virtual addresses handed out in DNS answers: network and prefix length (198.18.0.0/15).
pub const VIRTUAL_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 0, 0), 15);
/// Most names one VM may have bound to virtual addresses.
pub const MAX_BOUND_NAMES: usize = 4096;

/// Why a domain is not a valid allowlist entry.
///
/// Messages quote the domain (escaped, and cut to its first 40 characters followed by `…` when
/// longer), so an error can be logged or shown as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// Nothing, or only a dot, was given.
    #[error("domain {domain:?} is empty; a domain needs at least one label")]
    Empty {
        /// The domain as given (quoted form).
        domain: String,
    },
    /// Longer than [`MAX_DOMAIN_BYTES`] without the trailing dot.
    #[error("domain {domain:?} is {len} bytes; the limit is {MAX_DOMAIN_BYTES}")]
    TooLong {
        /// The domain as given (quoted form).
        domain: String,
        /// Its length in bytes, without a trailing dot.
        len: usize,
    },
    /// A label longer than [`MAX_LABEL_BYTES`].
    #[error(
        "domain {domain:?} has a label of {len} bytes ({label:?}); the limit is {MAX_LABEL_BYTES}"
    )]
    LabelTooLong {
        /// The domain as given (quoted form).
        domain: String,
        /// The label (quoted form).
        label: String,
        /// The label's length in bytes.
        len: usize,
    },
    /// A leading dot, or two dots in a row.
    #[error("domain {domain:?} has an empty label (a leading dot or two dots in a row)")]
    EmptyLabel {
        /// The domain as given (quoted form).
        domain: String,
    },
    /// A character other than ASCII letters, digits, hyphens and the dots between labels.
    #[error(
        "domain {domain:?} contains {character:?}; labels may hold only ASCII letters, digits and hyphens"
    )]
    BadCharacter {
        /// The domain as given (quoted form).
        domain: String,
        /// The first character not allowed.
        character: char,
    },
    /// A label that starts or ends with a hyphen.
    #[error("domain {domain:?} has a label starting or ending with a hyphen ({label:?})")]
    HyphenAtEdge {
        /// The domain as given (quoted form).
        domain: String,
        /// The label (quoted form).
        label: String,
    },
    /// An IP address literal, or a name whose last label is all digits (which URL parsers and
    /// resolvers read as an address).
    #[error(
        "domain {domain:?} is an IP address or ends in an all-numeric label; a host name is required"
    )]
    AddressLiteral {
        /// The domain as given (quoted form).
        domain: String,
    },
    /// A wildcard (`*`); an entry already allows its subdomains.
    #[error("domain {domain:?} is a wildcard; give the parent domain, which allows its subdomains")]
    Wildcard {
        /// The domain as given (quoted form).
        domain: String,
    },
}

/// Longest excerpt, in characters, of a domain or label quoted in a [`DomainError`].
const QUOTE_CHARS: usize = 40;

/// `s`, or its first [`QUOTE_CHARS`] characters followed by `…`.
fn quote(s: &str) -> String {
    match s.char_indices().nth(QUOTE_CHARS) {
        None => s.to_owned(),
        Some((cut, _)) => format!("{}…", s.get(..cut).unwrap_or_default()),
    }
}

/// `name` without one trailing dot.
fn strip_root(name: &str) -> &str {
    name.strip_suffix('.').unwrap_or(name)
}

/// Validates an allowlist entry and returns it normalized (lowercase, no trailing dot).
/// RFC 1035 host names: letters, digits and hyphens, labels of 1-63 bytes, at most 253 bytes;
/// an IP address literal is not a domain.
pub fn validate_domain(domain: &str) -> Result<String, DomainError> {
    let quoted = || quote(domain);
    let name = strip_root(domain);
    if name.is_empty() {
        return Err(DomainError::Empty { domain: quoted() });
    }
    if name.len() > MAX_DOMAIN_BYTES {
        return Err(DomainError::TooLong {
            domain: quoted(),
            len: name.len(),
        });
    }
    if name.contains('*') {
        return Err(DomainError::Wildcard { domain: quoted() });
    }
    let unbracketed = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    if unbracketed.parse::<std::net::IpAddr>().is_ok() {
        return Err(DomainError::AddressLiteral { domain: quoted() });
    }
    let mut last_label = "";
    for label in name.split('.') {
        if label.is_empty() {
            return Err(DomainError::EmptyLabel { domain: quoted() });
        }
        if let Some(character) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Err(DomainError::BadCharacter {
                domain: quoted(),
                character,
            });
        }
        if label.len() > MAX_LABEL_BYTES {
            return Err(DomainError::LabelTooLong {
                domain: quoted(),
                label: quote(label),
                len: label.len(),
            });
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(DomainError::HyphenAtEdge {
                domain: quoted(),
                label: quote(label),
            });
        }
        last_label = label;
    }
    if last_label.bytes().all(|b| b.is_ascii_digit()) {
        return Err(DomainError::AddressLiteral { domain: quoted() });
    }
    Ok(name.to_ascii_lowercase())
}

/// Which destinations a VM's DNS answers and connections may name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowlist {
    /// Every public name and address (network on, no allowlist given).
    Any,
    /// Only these domains and their subdomains (validated, normalized); empty allows nothing.
    Only(Vec<String>),
}

impl Allowlist {
    /// Whether `name` (any case, optional trailing dot) is allowed: equal to an entry or a
    /// subdomain of one (`a.example.com` for `example.com`; not `badexample.com`).
    ///
    /// A `name` that is not a valid host name (see [`validate_domain`]) is never allowed, not
    /// even by [`Allowlist::Any`].
    pub fn permits(&self, name: &str) -> bool {
        let Ok(name) = validate_domain(name) else {
            return false;
        };
        match self {
            Allowlist::Any => true,
            Allowlist::Only(entries) => entries.iter().any(|entry| {
                let entry = strip_root(entry);
                if entry.is_empty() || name.len() < entry.len() {
                    return false;
                }
                let split = name.len() - entry.len();
                let (prefix, suffix) = name.split_at(split);
                suffix.eq_ignore_ascii_case(entry) && (prefix.is_empty() || prefix.ends_with('.'))
            }),
        }
    }
}

/// What kind of host address a destination is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    /// Routable on the public internet.
    Public,
    /// 127.0.0.0/8.
    Loopback,
    /// 10/8, 172.16/12, 192.168/16, 100.64/10 (shared CGNAT space).
    Private,
    /// 169.254/16, which holds cloud metadata services (169.254.169.254).
    LinkLocal,
    /// A public address that is a cloud provider's control plane ([`CONTROL_PLANE`]): as
    /// dangerous as a metadata service, refused like a host-internal address.
    ControlPlane,
    /// 0/8, 192.0.0/24, 198.18/15, multicast 224/4, reserved 240/4, broadcast: never a
    /// destination. Documentation ranges (192.0.2/24, 198.51.100/24, 203.0.113/24) count as
    /// public.
    Unroutable,
}

/// Documented cloud control-plane addresses outside the ranges [`classify`] already treats as
/// internal, with whose they are. (AWS, GCP, Oracle, DigitalOcean, Hetzner and OpenStack
/// metadata live at 169.254.169.254, AWS's time and ECS endpoints at 169.254.169.123 and
/// 169.254.170.2, Tencent's at 169.254.0.23: all link-local. Alibaba's 100.100.100.200 is in
/// the shared 100.64/10 space, Oracle's 192.0.0.192 in 192.0.0/24: internal and unroutable.)
pub const CONTROL_PLANE: &[(Ipv4Addr, u8, &str)] = &[(
    Ipv4Addr::new(168, 63, 129, 16),
    32,
    "Azure WireServer and HostGAPlugin",
)];

/// The IPv4 addresses of the host's own interfaces: reaching one from the gateway reaches the
/// host's services past its firewall, so they are refused like loopback. A shared handle: the
/// gateway's owner reads the interfaces at run time and keeps it current
/// ([`HostAddrs::replace`]); every policy holding a clone sees the update.
#[derive(Debug, Clone, Default)]
pub struct HostAddrs(Arc<RwLock<Vec<Ipv4Addr>>>);

impl HostAddrs {
    /// A handle holding `addrs`.
    pub fn new(addrs: Vec<Ipv4Addr>) -> HostAddrs {
        HostAddrs(Arc::new(RwLock::new(addrs)))
    }

    /// Replaces the addresses (for every clone of this handle).
    pub fn replace(&self, addrs: Vec<Ipv4Addr>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = addrs;
    }

    /// Whether `addr` is one of the host's.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&addr)
    }

    /// The addresses now.
    pub fn to_vec(&self) -> Vec<Ipv4Addr> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Two handles are equal when they hold the same addresses now.
impl PartialEq for HostAddrs {
    fn eq(&self, other: &HostAddrs) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.to_vec() == other.to_vec()
    }
}

impl Eq for HostAddrs {}

/// Whether `addr` is in `net`/`prefix`.
fn in_net(addr: Ipv4Addr, net: Ipv4Addr, prefix: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    u32::from(addr) & mask == u32::from(net) & mask
}

/// Classifies a host address.
pub fn classify(addr: Ipv4Addr) -> AddressClass {
    const TABLE: &[(Ipv4Addr, u8, AddressClass)] = &[
        (Ipv4Addr::new(0, 0, 0, 0), 8, AddressClass::Unroutable),
        (Ipv4Addr::new(127, 0, 0, 0), 8, AddressClass::Loopback),
        (Ipv4Addr::new(10, 0, 0, 0), 8, AddressClass::Private),
        (Ipv4Addr::new(172, 16, 0, 0), 12, AddressClass::Private),
        (Ipv4Addr::new(192, 168, 0, 0), 16, AddressClass::Private),
        (Ipv4Addr::new(100, 64, 0, 0), 10, AddressClass::Private),
        (Ipv4Addr::new(169, 254, 0, 0), 16, AddressClass::LinkLocal),
        (Ipv4Addr::new(192, 0, 0, 0), 24, AddressClass::Unroutable),
        (VIRTUAL_NET.0, VIRTUAL_NET.1, AddressClass::Unroutable),
        // Multicast 224/4 and reserved 240/4, which holds the broadcast address.
        (Ipv4Addr::new(224, 0, 0, 0), 3, AddressClass::Unroutable),
    ];
    if CONTROL_PLANE
        .iter()
        .any(|(net, prefix, _)| in_net(addr, *net, *prefix))
    {
        return AddressClass::ControlPlane;
    }
    TABLE
        .iter()
        .find(|(net, prefix, _)| in_net(addr, *net, *prefix))
        .map_or(AddressClass::Public, |(_, _, class)| *class)
}

/// Whether the gateway may connect to `addr` on the guest's behalf: public addresses that are
/// not the host's own always; loopback, private, link-local, control-plane addresses and the
/// host's own (`host`) only when the operator allows host-internal destinations; unroutable
/// never.
pub fn host_may_connect(addr: Ipv4Addr, allow_internal: bool, host: &HostAddrs) -> bool {
    match classify(addr) {
        AddressClass::Public => allow_internal || !host.contains(addr),
        AddressClass::Loopback
        | AddressClass::Private
        | AddressClass::LinkLocal
        | AddressClass::ControlPlane => allow_internal,
        AddressClass::Unroutable => false,
    }
}

/// Whether `presented` (SNI or `Host`, any case, optional trailing dot) names `bound`.
///
/// An empty name names nothing.
pub fn same_name(presented: &str, bound: &str) -> bool {
    let (presented, bound) = (strip_root(presented), strip_root(bound));
    !presented.is_empty() && presented.eq_ignore_ascii_case(bound)
}

/// A name bound to a virtual address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The name (normalized) the guest asked for.
    pub name: String,
    /// The host's addresses for it, already filtered by [`host_may_connect`].
    pub addrs: Vec<Ipv4Addr>,
}

/// The first virtual address handed out (198.18.0.1); the n-th bound name gets this plus n.
const FIRST_VIRTUAL: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

/// Virtual address ↔ name bindings of one VM. The same name keeps its virtual address for the
/// VM's life; re-binding refreshes its real addresses.
///
/// Names are bound to 198.18.0.1, 198.18.0.2, … in the order they are first bound.
#[derive(Debug, Default)]
pub struct NameTable {
    /// Bindings in order: the n-th (from 0) holds [`FIRST_VIRTUAL`] + n.
    bindings: Vec<Binding>,
    /// Normalized name → index in `bindings`.
    by_name: std::collections::HashMap<String, usize>,
}

impl NameTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Binds `name` to `addrs` and returns its virtual address, or `None` when
    /// [`MAX_BOUND_NAMES`] names are bound already.
    ///
    /// `name` is normalized (lowercase, no trailing dot) first, so `Example.COM.` and
    /// `example.com` share one address.
    pub fn bind(&mut self, name: &str, addrs: Vec<Ipv4Addr>) -> Option<Ipv4Addr> {
        let name = strip_root(name).to_ascii_lowercase();
        if let Some(&index) = self.by_name.get(&name) {
            let binding = self.bindings.get_mut(index)?;
            binding.addrs = addrs;
            return virtual_addr(index);
        }
        if self.bindings.len() >= MAX_BOUND_NAMES {
            return None;
        }
        let index = self.bindings.len();
        let addr = virtual_addr(index)?;
        self.bindings.push(Binding {
            name: name.clone(),
            addrs,
        });
        self.by_name.insert(name, index);
        Some(addr)
    }

    /// The binding of a virtual address, if it was handed out.
    pub fn lookup(&self, virtual_addr: Ipv4Addr) -> Option<&Binding> {
        if !Self::is_virtual(virtual_addr) {
            return None;
        }
        let index = u32::from(virtual_addr).checked_sub(u32::from(FIRST_VIRTUAL))?;
        self.bindings.get(usize::try_from(index).ok()?)
    }

    /// Whether `addr` is in [`VIRTUAL_NET`].
    pub fn is_virtual(addr: Ipv4Addr) -> bool {
        in_net(addr, VIRTUAL_NET.0, VIRTUAL_NET.1)
    }
}

/// The virtual address of the `index`-th binding, if it is still inside [`VIRTUAL_NET`].
fn virtual_addr(index: usize) -> Option<Ipv4Addr> {
    let addr = Ipv4Addr::from(u32::from(FIRST_VIRTUAL).checked_add(u32::try_from(index).ok()?)?);
    NameTable::is_virtual(addr).then_some(addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn valid_domains_are_normalized() {
        let table = [
            ("example.com", "example.com"),
            ("Example.COM", "example.com"),
            ("example.com.", "example.com"),
            ("localhost", "localhost"),
            ("a-b.c0.example", "a-b.c0.example"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
            ("1.example.com", "1.example.com"),
            ("3com.com", "3com.com"),
            ("example.org", "example.org"),
        ];
        for (input, want) in table {
            assert_eq!(validate_domain(input).as_deref(), Ok(want), "{input}");
        }
        let longest = format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61)
        );
        assert_eq!(longest.len(), 253);
        assert_eq!(validate_domain(&longest), Ok(longest.clone()));
        assert_eq!(validate_domain(&format!("{longest}.")), Ok(longest));
        let label63 = format!("{}.com", "x".repeat(63));
        assert!(validate_domain(&label63).is_ok());
    }

    #[test]
    fn invalid_domains_are_refused_with_the_rule_broken() {
        let long = format!("{}.com", vec!["a".repeat(60); 5].join("."));
        let table: &[(&str, &str)] = &[
            ("", "is empty"),
            (".", "is empty"),
            (&long, "is 308 bytes; the limit is 253"),
            (&format!("{}.com", "x".repeat(64)), "label of 64 bytes"),
            ("a..com", "empty label"),
            (".example.com", "empty label"),
            ("example.com..", "empty label"),
            ("exa mple.com", "contains ' '"),
            ("ex_ample.com", "contains '_'"),
            ("bücher.de", "contains 'ü'"),
            ("example.com/", "contains '/'"),
            ("example.com:443", "contains ':'"),
            ("-example.com", "hyphen"),
            ("example-.com", "hyphen"),
            ("1.2.3.4", "IP address"),
            ("127.0.0.1.", "IP address"),
            ("example.123", "all-numeric"),
            ("::1", "IP address"),
            ("[::1]", "IP address"),
            ("*.example.com", "wildcard"),
            ("*", "wildcard"),
        ];
        for (input, want) in table {
            let err = validate_domain(input).expect_err(input);
            let message = err.to_string();
            assert!(message.contains(want), "{input:?}: {message}");
        }
        let message = validate_domain(&long).unwrap_err().to_string();
        assert!(
            message.starts_with(&format!("domain \"{}…\" is 308 bytes", "a".repeat(40))),
            "{message}"
        );
        assert!(message.contains("the limit is 253"), "{message}");
        let message = validate_domain(&format!("{}.com", "x".repeat(64)))
            .unwrap_err()
            .to_string();
        assert!(message.contains("the limit is 63"), "{message}");
    }

    #[test]
    fn allowlist_matches_entries_and_subdomains_only() {
        let list = Allowlist::Only(vec!["example.com".into(), "example.org".into()]);
        for name in [
            "example.com",
            "EXAMPLE.com.",
            "a.example.com",
            "a.b.Example.Com",
            "example.org",
        ] {
            assert!(list.permits(name), "{name}");
        }
        for name in [
            "badexample.com",
            "example.com.evil",
            "example.co",
            "com",
            "xample.com",
            "",
            ".",
            "example.com..",
            "a..example.com",
            "evil.com/example.com",
            "evil .example.com",
            "files.example.net",
        ] {
            assert!(!list.permits(name), "{name}");
        }
        assert!(!Allowlist::Only(vec![]).permits("example.com"));
        assert!(!Allowlist::Only(vec![String::new()]).permits("example.com"));
        // Entries are compared case-insensitively, trailing dot or not.
        assert!(Allowlist::Only(vec!["Example.COM.".into()]).permits("www.example.com"));
        assert!(Allowlist::Any.permits("anything.example"));
        assert!(Allowlist::Any.permits("Example.com."));
        assert!(!Allowlist::Any.permits("not a name"));
        assert!(!Allowlist::Any.permits("10.0.0.1"));
    }

    #[test]
    fn classify_table() {
        use AddressClass::*;
        let table = [
            ("169.254.169.254", LinkLocal),
            ("169.254.0.1", LinkLocal),
            ("100.64.0.1", Private),
            ("100.127.255.254", Private),
            ("100.128.0.1", Public),
            ("100.63.255.255", Public),
            ("127.0.0.1", Loopback),
            ("127.255.255.254", Loopback),
            ("10.255.255.53", Private),
            ("10.0.0.1", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("172.32.0.1", Public),
            ("172.15.255.255", Public),
            ("192.168.1.1", Private),
            ("203.0.113.80", Public),
            ("192.0.2.1", Public),
            ("198.51.100.7", Public),
            ("8.8.8.8", Public),
            ("1.1.1.1", Public),
            ("198.18.0.5", Unroutable),
            ("198.19.255.255", Unroutable),
            ("198.17.255.255", Public),
            ("198.20.0.0", Public),
            ("192.0.0.8", Unroutable),
            ("224.0.0.1", Unroutable),
            ("239.255.255.250", Unroutable),
            ("240.0.0.1", Unroutable),
            ("255.255.255.255", Unroutable),
            ("0.0.0.0", Unroutable),
            ("0.1.2.3", Unroutable),
            ("223.255.255.255", Public),
        ];
        for (addr, want) in table {
            let addr: Ipv4Addr = addr.parse().unwrap();
            assert_eq!(classify(addr), want, "{addr}");
        }
    }

    #[test]
    fn host_may_connect_follows_the_class() {
        let public = Ipv4Addr::new(203, 0, 113, 80);
        let internal = [
            Ipv4Addr::new(127, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(169, 254, 169, 254),
        ];
        let never = [
            Ipv4Addr::new(0, 0, 0, 0),
            Ipv4Addr::new(198, 18, 0, 5),
            Ipv4Addr::new(224, 0, 0, 1),
        ];
        let none = HostAddrs::default();
        assert!(host_may_connect(public, false, &none));
        assert!(host_may_connect(public, true, &none));
        for addr in internal {
            assert!(!host_may_connect(addr, false, &none), "{addr}");
            assert!(host_may_connect(addr, true, &none), "{addr}");
        }
        for addr in never {
            assert!(!host_may_connect(addr, false, &none), "{addr}");
            assert!(!host_may_connect(addr, true, &none), "{addr}");
        }
    }

    #[test]
    fn control_planes_and_the_hosts_own_addresses_are_internal() {
        let wire_server = Ipv4Addr::new(168, 63, 129, 16);
        assert_eq!(classify(wire_server), AddressClass::ControlPlane);
        for (net, prefix, _) in CONTROL_PLANE {
            assert_eq!(classify(*net), AddressClass::ControlPlane, "{net}/{prefix}");
        }
        // Its neighbours are ordinary public addresses.
        for neighbour in [
            Ipv4Addr::new(168, 63, 129, 15),
            Ipv4Addr::new(168, 63, 129, 17),
        ] {
            assert_eq!(classify(neighbour), AddressClass::Public, "{neighbour}");
        }
        let own_public = Ipv4Addr::new(203, 0, 113, 9);
        let other_public = Ipv4Addr::new(203, 0, 113, 10);
        let host = HostAddrs::new(vec![own_public]);
        for (addr, allowed) in [
            (wire_server, false),
            (own_public, false),
            (other_public, true),
        ] {
            assert_eq!(host_may_connect(addr, false, &host), allowed, "{addr}");
            assert!(
                host_may_connect(addr, true, &host),
                "{addr} with the switch"
            );
        }
        // The handle is shared: an interface that goes away is reachable again, one that
        // appears is refused at once.
        let view = host.clone();
        host.replace(vec![other_public]);
        assert!(host_may_connect(own_public, false, &view));
        assert!(!host_may_connect(other_public, false, &view));
        assert_eq!(view.to_vec(), vec![other_public]);
    }

    #[test]
    fn same_name_ignores_case_and_one_trailing_dot() {
        assert!(same_name("Example.COM.", "example.com"));
        assert!(same_name("example.com", "example.com."));
        assert!(!same_name("a.example.com", "example.com"));
        assert!(!same_name("example.com..", "example.com"));
        assert!(!same_name("", ""));
        assert!(!same_name(".", ""));
    }

    #[test]
    fn name_table_hands_out_stable_sequential_addresses() {
        let mut table = NameTable::new();
        let real = vec![Ipv4Addr::new(203, 0, 113, 80)];
        let a = table.bind("example.com", real.clone()).unwrap();
        let b = table.bind("example.org", vec![]).unwrap();
        assert_eq!(a, Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(b, Ipv4Addr::new(198, 18, 0, 2));
        // Same name (any case, trailing dot) → same address; addresses refreshed.
        let fresh = vec![
            Ipv4Addr::new(203, 0, 113, 81),
            Ipv4Addr::new(203, 0, 113, 82),
        ];
        assert_eq!(table.bind("EXAMPLE.com.", fresh.clone()), Some(a));
        let binding = table.lookup(a).unwrap();
        assert_eq!(binding.name, "example.com");
        assert_eq!(binding.addrs, fresh);
        assert_eq!(table.lookup(b).unwrap().name, "example.org");
        assert_eq!(table.lookup(Ipv4Addr::new(198, 18, 0, 3)), None);
        assert_eq!(table.lookup(Ipv4Addr::new(198, 18, 0, 0)), None);
        assert_eq!(table.lookup(Ipv4Addr::new(203, 0, 113, 80)), None);
    }

    #[test]
    fn name_table_is_capped() {
        let mut table = NameTable::new();
        let mut last = None;
        for i in 0..MAX_BOUND_NAMES {
            last = table.bind(&format!("n{i}.example"), vec![]);
            let addr = last.expect("under the cap");
            assert!(NameTable::is_virtual(addr));
        }
        // 4096 names: 198.18.0.1 + 4095 = 198.18.16.0.
        assert_eq!(last, Some(Ipv4Addr::new(198, 18, 16, 0)));
        assert_eq!(table.bind("one-more.example", vec![]), None);
        // Names already bound still re-bind.
        assert_eq!(
            table.bind("n0.example", vec![]),
            Some(Ipv4Addr::new(198, 18, 0, 1))
        );
        assert_eq!(
            table.lookup(Ipv4Addr::new(198, 18, 16, 0)).unwrap().name,
            "n4095.example"
        );
        assert_eq!(table.lookup(Ipv4Addr::new(198, 18, 16, 1)), None);
    }

    #[test]
    fn is_virtual_is_198_18_slash_15() {
        assert!(NameTable::is_virtual(Ipv4Addr::new(198, 18, 0, 0)));
        assert!(NameTable::is_virtual(Ipv4Addr::new(198, 19, 255, 255)));
        assert!(!NameTable::is_virtual(Ipv4Addr::new(198, 17, 255, 255)));
        assert!(!NameTable::is_virtual(Ipv4Addr::new(198, 20, 0, 0)));
    }

    proptest! {
        #[test]
        fn validate_domain_never_panics_and_output_is_valid(s in ".{0,300}") {
            if let Ok(name) = validate_domain(&s) {
                prop_assert!(name.len() <= MAX_DOMAIN_BYTES);
                prop_assert_eq!(validate_domain(&name), Ok(name.clone()));
                prop_assert!(!name.bytes().any(|b| b.is_ascii_uppercase()));
            }
        }

        #[test]
        fn generated_names_validate_and_permit_their_subdomains(
            labels in proptest::collection::vec("[a-z][a-z0-9-]{0,20}[a-z0-9]", 1..5),
            sub in "[a-z]{1,10}",
        ) {
            let name = labels.join(".");
            prop_assert_eq!(validate_domain(&name.to_uppercase()), Ok(name.clone()));
            let list = Allowlist::Only(vec![name.clone()]);
            prop_assert!(list.permits(&name));
            let subdomain = format!("{sub}.{name}");
            prop_assert!(list.permits(&subdomain));
            let glued = format!("{sub}{name}");
            prop_assert!(!list.permits(&glued));
        }

        #[test]
        fn classify_never_panics(bits in any::<u32>()) {
            let addr = Ipv4Addr::from(bits);
            let class = classify(addr);
            prop_assert_eq!(NameTable::is_virtual(addr), in_net(addr, VIRTUAL_NET.0, VIRTUAL_NET.1));
            if NameTable::is_virtual(addr) {
                prop_assert_eq!(class, AddressClass::Unroutable);
            }
        }
    }
}
