//! Host-side announcements of the guest's MAC: the frames that make the host's
//! switches (a Linux bridge, the NIC's embedded switch) learn that the guest now
//! sits behind the standby port.
//!
//! The frame is a RARP "reverse request" carrying the MAC as sender and target,
//! the same shape QEMU's self-announce and vhost-user SEND_RARP use: it needs no
//! IP address and any switch learns from its source address.

use crate::config::MacAddr;

/// Ethernet frames shorter than this are padded (the 4-byte FCS is added by hardware).
pub const MIN_FRAME_LEN: usize = 60;
const ETH_P_RARP: u16 = 0x8035;
const ETH_P_IP: u16 = 0x0800;
const ARPHRD_ETHER: u16 = 1;
const ARPOP_RREQUEST: u16 = 3;

/// A broadcast RARP reverse request from `mac`.
pub fn rarp_frame(mac: MacAddr) -> [u8; MIN_FRAME_LEN] {
    let mut frame = [0u8; MIN_FRAME_LEN];
    frame[0..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&mac.0);
    frame[12..14].copy_from_slice(&ETH_P_RARP.to_be_bytes());
    let arp = &mut frame[14..];
    arp[0..2].copy_from_slice(&ARPHRD_ETHER.to_be_bytes());
    arp[2..4].copy_from_slice(&ETH_P_IP.to_be_bytes());
    arp[4] = 6; // hardware address length
    arp[5] = 4; // protocol address length
    arp[6..8].copy_from_slice(&ARPOP_RREQUEST.to_be_bytes());
    arp[8..14].copy_from_slice(&mac.0); // sender hardware address
                                        // sender protocol address: 0.0.0.0
    arp[18..24].copy_from_slice(&mac.0); // target hardware address
                                         // target protocol address: 0.0.0.0
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rarp_frame_is_a_broadcast_reverse_request_from_the_mac() {
        let mac = MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        let frame = rarp_frame(mac);
        assert_eq!(&frame[0..6], &[0xff; 6]);
        assert_eq!(&frame[6..12], &mac.0);
        assert_eq!(&frame[12..14], &[0x80, 0x35]);
        assert_eq!(&frame[14..22], &[0, 1, 8, 0, 6, 4, 0, 3]);
        assert_eq!(&frame[22..28], &mac.0);
        assert_eq!(&frame[28..32], &[0; 4]);
        assert_eq!(&frame[32..38], &mac.0);
        assert!(frame[38..].iter().all(|&b| b == 0));
    }
}
