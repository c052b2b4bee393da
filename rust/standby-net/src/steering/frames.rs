//! The Ethernet frames steering sends, and what it reads in the frames it sees.
//!
//! Sent: the RARP announcement that teaches the host's switches where the guest
//! is (the shape QEMU's self-announce uses; any learning switch takes its source
//! address), and two probes that make the guest answer through whatever path it
//! transmits on: an ARP probe (sender address 0.0.0.0, so the guest adds nothing
//! to its ARP cache) for each IPv4 address the guest is known to use, and an IPv6
//! neighbour solicitation for the guest's link-local address (a regular one, from
//! a link-local address of the probe's own: a DAD-style solicitation could make a
//! guest still checking its address give it up).
//!
//! Read: the first [`HEAD_LEN`] bytes of a frame, enough for the Ethernet header and
//! the ARP or IPv4 addresses.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::config::MacAddr;

/// Ethernet frames shorter than this are padded (the 4-byte FCS is added by hardware).
pub const MIN_FRAME_LEN: usize = 60;
/// How much of a frame [`FrameHead`] looks at.
pub const HEAD_LEN: usize = 64;
const ETH_HDR_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_RARP: u16 = 0x8035;
const ETH_P_IPV6: u16 = 0x86dd;
const ARPHRD_ETHER: u16 = 1;
const ARPOP_REQUEST: u16 = 1;
const ARPOP_RREQUEST: u16 = 3;
const IPPROTO_ICMPV6: u8 = 58;
const ND_NEIGHBOR_SOLICIT: u8 = 135;
const ND_OPT_SOURCE_LINKADDR: u8 = 1;
/// Ethernet + IPv6 + neighbour solicitation + source link-layer address option.
pub const NS_FRAME_LEN: usize = ETH_HDR_LEN + 40 + 24 + 8;

const BROADCAST: [u8; 6] = [0xff; 6];

/// The first bytes of a frame (no virtio-net header), read without copying more.
#[derive(Clone, Copy)]
pub struct FrameHead<'a> {
    bytes: &'a [u8],
}

impl<'a> FrameHead<'a> {
    /// `bytes` is the start of an Ethernet frame; `None` when it is shorter than a header.
    pub fn new(bytes: &'a [u8]) -> Option<Self> {
        (bytes.len() >= ETH_HDR_LEN).then_some(Self { bytes })
    }

    fn mac_at(&self, offset: usize) -> MacAddr {
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&self.bytes[offset..offset + 6]);
        MacAddr(mac)
    }

    fn u16_at(&self, offset: usize) -> Option<u16> {
        let b = self.bytes.get(offset..offset + 2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }

    fn ipv4_at(&self, offset: usize) -> Option<Ipv4Addr> {
        let b = self.bytes.get(offset..offset + 4)?;
        Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    }

    pub fn destination(&self) -> MacAddr {
        self.mac_at(0)
    }

    pub fn source(&self) -> MacAddr {
        self.mac_at(6)
    }

    pub fn ethertype(&self) -> u16 {
        u16::from_be_bytes([self.bytes[12], self.bytes[13]])
    }

    /// A RARP frame: an announcement (QEMU's, a backend's), not the guest talking.
    pub fn is_rarp(&self) -> bool {
        self.ethertype() == ETH_P_RARP
    }

    /// IPv6 to a multicast group: neighbour and router discovery, MLD reports.
    pub fn is_ipv6_multicast(&self) -> bool {
        self.ethertype() == ETH_P_IPV6 && self.bytes[0] == 0x33 && self.bytes[1] == 0x33
    }

    /// A duplicate address detection probe: a neighbour solicitation from the
    /// unspecified address (RFC 4862).
    pub fn is_dad_probe(&self) -> bool {
        let Some(ip) = self.bytes.get(ETH_HDR_LEN..ETH_HDR_LEN + 41) else {
            return false;
        };
        self.ethertype() == ETH_P_IPV6
            && ip[6] == IPPROTO_ICMPV6
            && ip[8..24].iter().all(|&b| b == 0)
            && ip[40] == ND_NEIGHBOR_SOLICIT
    }

    /// The sender of an Ethernet/IPv4 ARP packet, when it names an address.
    pub fn arp_sender(&self) -> Option<(MacAddr, Ipv4Addr)> {
        if self.ethertype() != ETH_P_ARP
            || self.u16_at(14)? != ARPHRD_ETHER
            || self.u16_at(16)? != ETH_P_IP
            || self.bytes.get(18..20)? != [6, 4]
        {
            return None;
        }
        let address = self.ipv4_at(28)?;
        (!address.is_unspecified()).then(|| (self.mac_at(22), address))
    }

    /// Source and destination of an IPv4 packet.
    pub fn ipv4_addresses(&self) -> Option<(Ipv4Addr, Ipv4Addr)> {
        if self.ethertype() != ETH_P_IP || self.bytes.get(14)? >> 4 != 4 {
            return None;
        }
        Some((self.ipv4_at(26)?, self.ipv4_at(30)?))
    }
}

fn ethernet_header(frame: &mut [u8], destination: [u8; 6], source: MacAddr, ethertype: u16) {
    frame[0..6].copy_from_slice(&destination);
    frame[6..12].copy_from_slice(&source.0);
    frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
}

/// A broadcast RARP reverse request from `mac`: "`mac` is here".
pub fn rarp_announcement(mac: MacAddr) -> [u8; MIN_FRAME_LEN] {
    let mut frame = [0u8; MIN_FRAME_LEN];
    ethernet_header(&mut frame, BROADCAST, mac, ETH_P_RARP);
    let arp = &mut frame[ETH_HDR_LEN..];
    arp[0..2].copy_from_slice(&ARPHRD_ETHER.to_be_bytes());
    arp[2..4].copy_from_slice(&ETH_P_IP.to_be_bytes());
    arp[4] = 6; // hardware address length
    arp[5] = 4; // protocol address length
    arp[6..8].copy_from_slice(&ARPOP_RREQUEST.to_be_bytes());
    arp[8..14].copy_from_slice(&mac.0); // sender hardware address; sender IP 0.0.0.0
    arp[18..24].copy_from_slice(&mac.0); // target hardware address; target IP 0.0.0.0
    frame
}

/// A broadcast ARP probe from `from` for `target` (RFC 5227 shape: sender IP
/// 0.0.0.0). Linux answers it with a unicast reply to `from` when it owns `target`.
pub fn arp_probe(from: MacAddr, target: Ipv4Addr) -> [u8; MIN_FRAME_LEN] {
    let mut frame = [0u8; MIN_FRAME_LEN];
    ethernet_header(&mut frame, BROADCAST, from, ETH_P_ARP);
    let arp = &mut frame[ETH_HDR_LEN..];
    arp[0..2].copy_from_slice(&ARPHRD_ETHER.to_be_bytes());
    arp[2..4].copy_from_slice(&ETH_P_IP.to_be_bytes());
    arp[4] = 6;
    arp[5] = 4;
    arp[6..8].copy_from_slice(&ARPOP_REQUEST.to_be_bytes());
    arp[8..14].copy_from_slice(&from.0);
    arp[24..28].copy_from_slice(&target.octets());
    frame
}

/// The modified EUI-64 link-local address of `mac` (what Linux gives an interface
/// by default).
pub fn link_local(mac: MacAddr) -> Ipv6Addr {
    let m = mac.0;
    Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        m[0] ^ 0x02,
        m[1],
        m[2],
        0xff,
        0xfe,
        m[3],
        m[4],
        m[5],
    ])
}

/// A neighbour solicitation from `from` (its link-local address, with its MAC as
/// source link-layer option) for `target`, sent to `target`'s solicited-node group.
pub fn neighbor_solicitation(from: MacAddr, target: Ipv6Addr) -> [u8; NS_FRAME_LEN] {
    let t = target.octets();
    let group = Ipv6Addr::from([
        0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, t[13], t[14], t[15],
    ]);
    let source = link_local(from);
    let mut frame = [0u8; NS_FRAME_LEN];
    ethernet_header(
        &mut frame,
        [0x33, 0x33, 0xff, t[13], t[14], t[15]],
        from,
        ETH_P_IPV6,
    );
    let ip = &mut frame[ETH_HDR_LEN..];
    ip[0] = 0x60; // version 6, no traffic class or flow label
    ip[4..6].copy_from_slice(&32u16.to_be_bytes()); // payload: NS + option
    ip[6] = IPPROTO_ICMPV6;
    ip[7] = 255; // hop limit: neighbour discovery requires 255
    ip[8..24].copy_from_slice(&source.octets());
    ip[24..40].copy_from_slice(&group.octets());
    let icmp = &mut ip[40..];
    icmp[0] = ND_NEIGHBOR_SOLICIT;
    icmp[8..24].copy_from_slice(&t);
    icmp[24] = ND_OPT_SOURCE_LINKADDR;
    icmp[25] = 1; // option length in units of 8 bytes
    icmp[26..32].copy_from_slice(&from.0);
    let checksum = icmpv6_checksum(&source, &group, &icmp[..32]);
    icmp[2..4].copy_from_slice(&checksum.to_be_bytes());
    frame
}

/// The ICMPv6 checksum: one's complement sum over the pseudo-header and the message.
fn icmpv6_checksum(source: &Ipv6Addr, destination: &Ipv6Addr, message: &[u8]) -> u16 {
    let mut sum = 0u32;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    };
    add(&source.octets());
    add(&destination.octets());
    add(&(message.len() as u32).to_be_bytes());
    add(&[0, 0, 0, IPPROTO_ICMPV6]);
    add(message);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
    const PROBE: MacAddr = MacAddr([0x02, 0xfb, 0x00, 0x00, 0x00, 0x07]);

    #[test]
    fn rarp_announcement_is_a_broadcast_reverse_request_from_the_mac() {
        let frame = rarp_announcement(GUEST);
        assert_eq!(&frame[0..6], &[0xff; 6]);
        assert_eq!(&frame[6..12], &GUEST.0);
        assert_eq!(&frame[12..14], &[0x80, 0x35]);
        assert_eq!(&frame[14..22], &[0, 1, 8, 0, 6, 4, 0, 3]);
        assert_eq!(&frame[22..28], &GUEST.0);
        assert_eq!(&frame[28..32], &[0; 4]);
        assert_eq!(&frame[32..38], &GUEST.0);
        assert!(frame[38..].iter().all(|&b| b == 0));
        assert!(FrameHead::new(&frame).unwrap().is_rarp());
    }

    #[test]
    fn arp_probe_asks_for_the_target_from_no_address() {
        let frame = arp_probe(PROBE, Ipv4Addr::new(10, 1, 2, 3));
        let head = FrameHead::new(&frame).unwrap();
        assert_eq!(head.destination(), MacAddr([0xff; 6]));
        assert_eq!(head.source(), PROBE);
        assert_eq!(head.ethertype(), ETH_P_ARP);
        assert_eq!(&frame[14..22], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&frame[22..28], &PROBE.0);
        assert_eq!(&frame[28..32], &[0; 4], "sender IP 0.0.0.0: a probe");
        assert_eq!(&frame[32..38], &[0; 6]);
        assert_eq!(&frame[38..42], &[10, 1, 2, 3]);
        // A probe names no sender address: nothing to learn from it.
        assert_eq!(head.arp_sender(), None);
    }

    #[test]
    fn link_local_is_the_modified_eui64() {
        assert_eq!(
            link_local(GUEST),
            "fe80::5054:ff:fe12:3456".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn neighbor_solicitation_goes_to_the_solicited_node_group_with_a_valid_checksum() {
        let target = link_local(GUEST);
        let frame = neighbor_solicitation(PROBE, target);
        let head = FrameHead::new(&frame).unwrap();
        assert_eq!(
            head.destination(),
            MacAddr([0x33, 0x33, 0xff, 0x12, 0x34, 0x56])
        );
        assert!(head.is_ipv6_multicast());
        let ip = &frame[14..];
        assert_eq!(ip[6], IPPROTO_ICMPV6);
        assert_eq!(ip[7], 255);
        assert_eq!(&ip[8..24], &link_local(PROBE).octets());
        assert_eq!(
            &ip[24..40],
            &"ff02::1:ff12:3456".parse::<Ipv6Addr>().unwrap().octets()
        );
        assert_eq!(&ip[48..64], &target.octets());
        assert_eq!(&ip[64..72], &[1, 1, 0x02, 0xfb, 0, 0, 0, 7]);
        // Summing again with the checksum in place gives zero (all ones, complemented).
        let mut source = [0u8; 16];
        source.copy_from_slice(&ip[8..24]);
        let mut group = [0u8; 16];
        group.copy_from_slice(&ip[24..40]);
        assert_eq!(
            icmpv6_checksum(&Ipv6Addr::from(source), &Ipv6Addr::from(group), &ip[40..72]),
            0
        );
    }

    #[test]
    fn tells_a_dad_probe_from_a_regular_solicitation() {
        let target = link_local(GUEST);
        let mut frame = neighbor_solicitation(GUEST, target);
        assert!(!FrameHead::new(&frame).unwrap().is_dad_probe());
        frame[22..38].fill(0); // source ::
        assert!(FrameHead::new(&frame).unwrap().is_dad_probe());
        assert!(
            !FrameHead::new(&frame[..50]).unwrap().is_dad_probe(),
            "truncated"
        );
    }

    #[test]
    fn reads_arp_senders_and_ipv4_addresses() {
        // An ARP request from the guest for 10.0.0.1.
        let mut arp = arp_probe(GUEST, Ipv4Addr::new(10, 0, 0, 1));
        arp[28..32].copy_from_slice(&[10, 0, 0, 2]);
        let head = FrameHead::new(&arp).unwrap();
        assert_eq!(head.arp_sender(), Some((GUEST, Ipv4Addr::new(10, 0, 0, 2))));
        assert_eq!(head.ipv4_addresses(), None);

        let mut ip = [0u8; 34];
        ip[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
        ip[14] = 0x45;
        ip[26..30].copy_from_slice(&[192, 168, 1, 5]);
        ip[30..34].copy_from_slice(&[192, 168, 1, 1]);
        let head = FrameHead::new(&ip).unwrap();
        assert_eq!(
            head.ipv4_addresses(),
            Some((Ipv4Addr::new(192, 168, 1, 5), Ipv4Addr::new(192, 168, 1, 1)))
        );
        assert!(!head.is_ipv6_multicast() && !head.is_rarp());
        // Truncated frames are not misread.
        assert_eq!(FrameHead::new(&ip[..20]).unwrap().ipv4_addresses(), None);
        assert!(FrameHead::new(&ip[..10]).is_none());
    }
}
