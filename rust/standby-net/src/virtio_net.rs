//! virtio-net definitions this device needs: feature bits and the per-packet header.
//!
//! Bit numbers come from `virtio-bindings`; this module only gives them the `u64`
//! masks the vhost-user feature negotiation works with, and names the sets the
//! device offers.

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::bindings::virtio_config::{
    VIRTIO_F_ANY_LAYOUT, VIRTIO_F_IN_ORDER, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1,
};
use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STANDBY,
};
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// `1 << bit` as a feature mask.
pub const fn bit(n: u32) -> u64 {
    1u64 << n
}

pub const F_VERSION_1: u64 = bit(VIRTIO_F_VERSION_1);
pub const F_ANY_LAYOUT: u64 = bit(VIRTIO_F_ANY_LAYOUT);
/// Buffers are used in the order they were made available. The datapath always does
/// (a chain is completed, or put back for later, before the next one is taken), so
/// offering it only lets the driver skip walking its free list on every completion.
pub const F_IN_ORDER: u64 = bit(VIRTIO_F_IN_ORDER);
/// The packed ring layout (virtio 1.x, 2.8), on the same checked datapath as split.
pub const F_RING_PACKED: u64 = bit(VIRTIO_F_RING_PACKED);
pub const F_RING_INDIRECT_DESC: u64 = bit(VIRTIO_RING_F_INDIRECT_DESC);
pub const F_RING_EVENT_IDX: u64 = bit(VIRTIO_RING_F_EVENT_IDX);
pub const F_MAC: u64 = bit(VIRTIO_NET_F_MAC);
pub const F_MTU: u64 = bit(VIRTIO_NET_F_MTU);
pub const F_MRG_RXBUF: u64 = bit(VIRTIO_NET_F_MRG_RXBUF);
pub const F_GUEST_ANNOUNCE: u64 = bit(VIRTIO_NET_F_GUEST_ANNOUNCE);
pub const F_MQ: u64 = bit(VIRTIO_NET_F_MQ);
/// The failover bit. QEMU negotiates it with the guest itself and never forwards it
/// to a vhost-user backend; it is named here so logs can say so.
pub const F_STANDBY: u64 = bit(VIRTIO_NET_F_STANDBY);

pub const F_CSUM: u64 = bit(VIRTIO_NET_F_CSUM);
pub const F_GUEST_CSUM: u64 = bit(VIRTIO_NET_F_GUEST_CSUM);
pub const F_HOST_TSO4: u64 = bit(VIRTIO_NET_F_HOST_TSO4);
pub const F_HOST_TSO6: u64 = bit(VIRTIO_NET_F_HOST_TSO6);
pub const F_HOST_ECN: u64 = bit(VIRTIO_NET_F_HOST_ECN);
pub const F_GUEST_TSO4: u64 = bit(VIRTIO_NET_F_GUEST_TSO4);
pub const F_GUEST_TSO6: u64 = bit(VIRTIO_NET_F_GUEST_TSO6);
pub const F_GUEST_ECN: u64 = bit(VIRTIO_NET_F_GUEST_ECN);

pub const F_LOG_ALL: u64 = VhostUserVirtioFeatures::LOG_ALL.bits();
pub const F_PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// What every instance offers, whatever its port: the ring layouts, in-order use,
/// mergeable receive buffers, MTU and MAC advice, guest-side announcements, and the
/// two vhost-user bits live migration needs.
pub const BASE_FEATURES: u64 = F_VERSION_1
    | F_ANY_LAYOUT
    | F_IN_ORDER
    | F_RING_PACKED
    | F_RING_INDIRECT_DESC
    | F_RING_EVENT_IDX
    | F_MAC
    | F_MTU
    | F_MRG_RXBUF
    | F_GUEST_ANNOUNCE
    | F_LOG_ALL
    | F_PROTOCOL_FEATURES;

/// Checksum and segmentation offloads; offered only when the host port can
/// carry partial checksums and GSO frames (a TAP that accepts TUNSETOFFLOAD).
pub const OFFLOAD_FEATURES: u64 = F_CSUM
    | F_GUEST_CSUM
    | F_HOST_TSO4
    | F_HOST_TSO6
    | F_HOST_ECN
    | F_GUEST_TSO4
    | F_GUEST_TSO6
    | F_GUEST_ECN;

/// Protocol features this backend handles. Everything else (RARP, NET_MTU, STATUS,
/// CONFIG, ...) is left out on purpose: `vhost` does not dispatch those requests and
/// an undispatched request ends the connection. MQ is offered with one queue pair
/// too: the frontend then learns the count from GET_QUEUE_NUM.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::RESET_DEVICE
}

/// Size of the header in front of every frame: 12 bytes for VERSION_1 or
/// mergeable buffers (`virtio_net_hdr_v1` / `virtio_net_hdr_mrg_rxbuf`), 10 otherwise.
pub fn vnet_hdr_len(acked_features: u64) -> usize {
    if acked_features & (F_VERSION_1 | F_MRG_RXBUF) != 0 {
        VNET_HDR_LEN_V1
    } else {
        VNET_HDR_LEN_LEGACY
    }
}

pub const VNET_HDR_LEN_V1: usize = 12;
pub const VNET_HDR_LEN_LEGACY: usize = 10;
/// Offset of `num_buffers` inside the 12-byte header.
pub const NUM_BUFFERS_OFFSET: usize = 10;

/// Largest frame a guest may hand over or receive: a 64 KiB GSO packet plus an
/// Ethernet/VLAN header, after the vnet header.
pub const MAX_FRAME_LEN: usize = 65_536 + 14 + 4;

/// Largest vnet header + frame.
pub const MAX_HDR_AND_FRAME_LEN: usize = VNET_HDR_LEN_V1 + MAX_FRAME_LEN;

/// Names of the virtio-net feature bits this project cares about, for logs and
/// for the Python `features` mapping.
pub fn feature_names(features: u64) -> Vec<&'static str> {
    const NAMES: &[(u64, &str)] = &[
        (F_CSUM, "CSUM"),
        (F_GUEST_CSUM, "GUEST_CSUM"),
        (F_MTU, "MTU"),
        (F_MAC, "MAC"),
        (F_GUEST_TSO4, "GUEST_TSO4"),
        (F_GUEST_TSO6, "GUEST_TSO6"),
        (F_GUEST_ECN, "GUEST_ECN"),
        (F_HOST_TSO4, "HOST_TSO4"),
        (F_HOST_TSO6, "HOST_TSO6"),
        (F_HOST_ECN, "HOST_ECN"),
        (F_MRG_RXBUF, "MRG_RXBUF"),
        (F_GUEST_ANNOUNCE, "GUEST_ANNOUNCE"),
        (F_MQ, "MQ"),
        (F_ANY_LAYOUT, "ANY_LAYOUT"),
        (F_IN_ORDER, "IN_ORDER"),
        (F_RING_PACKED, "RING_PACKED"),
        (F_RING_INDIRECT_DESC, "RING_INDIRECT_DESC"),
        (F_RING_EVENT_IDX, "RING_EVENT_IDX"),
        (F_LOG_ALL, "LOG_ALL"),
        (F_PROTOCOL_FEATURES, "PROTOCOL_FEATURES"),
        (F_VERSION_1, "VERSION_1"),
        (F_STANDBY, "STANDBY"),
    ];
    NAMES
        .iter()
        .filter(|(mask, _)| features & mask != 0)
        .map(|(_, name)| *name)
        .collect()
}

/// Names of vhost-user protocol feature bits.
pub fn protocol_feature_names(features: u64) -> Vec<&'static str> {
    VhostUserProtocolFeatures::from_bits_truncate(features)
        .iter_names()
        .map(|(name, _)| name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_length_follows_version_and_mergeable_buffers() {
        assert_eq!(vnet_hdr_len(F_VERSION_1), 12);
        assert_eq!(vnet_hdr_len(F_MRG_RXBUF), 12);
        assert_eq!(vnet_hdr_len(0), 10);
    }

    #[test]
    fn base_features_carry_migration_bits_and_not_standby() {
        assert_ne!(BASE_FEATURES & F_LOG_ALL, 0);
        assert_ne!(BASE_FEATURES & F_PROTOCOL_FEATURES, 0);
        assert_eq!(BASE_FEATURES & F_STANDBY, 0);
        assert_eq!(F_STANDBY, 1 << 62);
    }

    #[test]
    fn protocol_features_always_allow_migration() {
        let offered = protocol_features();
        for needed in [
            VhostUserProtocolFeatures::MQ,
            VhostUserProtocolFeatures::REPLY_ACK,
            VhostUserProtocolFeatures::LOG_SHMFD,
        ] {
            assert!(offered.contains(needed));
        }
        // Requests for these are not dispatched by `vhost`: never offer them.
        for unhandled in [
            VhostUserProtocolFeatures::RARP,
            VhostUserProtocolFeatures::MTU,
            VhostUserProtocolFeatures::STATUS,
            VhostUserProtocolFeatures::CONFIG,
            VhostUserProtocolFeatures::INFLIGHT_SHMFD,
        ] {
            assert!(!protocol_features().intersects(unhandled));
        }
    }

    #[test]
    fn names_features() {
        assert_eq!(
            feature_names(F_MRG_RXBUF | F_VERSION_1),
            ["MRG_RXBUF", "VERSION_1"]
        );
        assert_eq!(protocol_feature_names(0b11), ["MQ", "LOG_SHMFD"]);
    }
}
