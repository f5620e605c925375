//! Addressing of a networked VM's only NIC, shared by the host gateway and the guest agent.
//!
//! The guest and the gateway sit alone on a point-to-point /24. The gateway is the guest's
//! default route and its only DNS server; nothing else exists on the link.

/// The guest's address.
pub const GUEST_IPV4: [u8; 4] = [10, 0, 2, 15];
/// The gateway's address: default route and DNS server.
pub const GATEWAY_IPV4: [u8; 4] = [10, 0, 2, 2];
/// Prefix length of the link.
pub const PREFIX_LEN: u8 = 24;
/// The guest NIC's MAC address (locally administered).
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// The gateway's MAC address (locally administered).
pub const GATEWAY_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x02];
/// Link MTU (IP packet size) on both sides.
pub const MTU: u16 = 65520;
/// Name of the guest's NIC.
pub const GUEST_NIC: &str = "eth0";
