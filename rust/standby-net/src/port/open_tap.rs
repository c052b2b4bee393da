//! Opening the TAP queues of a device: multi-queue, header size, offload probe, link up.

use std::io;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use thiserror::Error;

use super::tap_port::TapPort;
use super::{HostWriter, Tap, TapInjector};
use crate::virtio_net::VNET_HDR_LEN_V1;

#[derive(Debug, Error)]
pub enum OpenTapError {
    #[error("cannot open TAP {name:?} (queue {queue}; needs CAP_NET_ADMIN and /dev/net/tun)")]
    Open {
        name: String,
        queue: u16,
        #[source]
        source: io::Error,
    },
    #[error("cannot set the virtio-net header length of TAP {name:?}")]
    SetHeaderLength {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot set the MTU of TAP {name:?} to {mtu}")]
    SetMtu {
        name: String,
        mtu: u16,
        #[source]
        source: io::Error,
    },
    #[error("cannot set TAP {name:?} up")]
    SetUp {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot duplicate the descriptor of TAP {name:?}")]
    Duplicate {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot open a packet socket on TAP {name:?} (needs CAP_NET_RAW)")]
    PacketSocket {
        name: String,
        #[source]
        source: io::Error,
    },
}

pub struct OpenedTap {
    pub ports: Vec<TapPort>,
    pub host_writer: HostWriter,
    pub injector: TapInjector,
    /// The TAP accepts checksum and segmentation offloads.
    pub offloads_supported: bool,
}

/// Open `queue_pairs` queues of TAP `name` (creating it if needed), give it the
/// guest's MTU and set it up.
pub fn open_tap_queues(name: &str, queue_pairs: u16, mtu: u16) -> Result<OpenedTap, OpenTapError> {
    let multi_queue = queue_pairs > 1;
    let taps = (0..queue_pairs)
        .map(|queue| {
            Tap::open(name, multi_queue).map_err(|source| OpenTapError::Open {
                name: name.to_string(),
                queue,
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let first = &taps[0];
    let name = first.name().to_string();

    // The header length and offloads belong to the device, not the queue.
    first
        .set_vnet_hdr_len(VNET_HDR_LEN_V1)
        .map_err(|source| OpenTapError::SetHeaderLength {
            name: name.clone(),
            source,
        })?;
    let all = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;
    let offloads_supported = first.set_offload(all).is_ok();
    if offloads_supported {
        // Accepted; now off until a guest says it can take them.
        let _ = first.set_offload(0);
    } else {
        log::info!("TAP {name}: no offload support; checksum and TSO are not offered");
    }
    first.set_mtu(mtu).map_err(|source| OpenTapError::SetMtu {
        name: name.clone(),
        mtu,
        source,
    })?;
    first.set_up().map_err(|source| OpenTapError::SetUp {
        name: name.clone(),
        source,
    })?;

    let vnet_hdr_len = Arc::new(AtomicUsize::new(VNET_HDR_LEN_V1));
    let writer_tap = first
        .try_clone()
        .map_err(|source| OpenTapError::Duplicate {
            name: name.clone(),
            source,
        })?;
    let host_writer = HostWriter::new(writer_tap, Arc::clone(&vnet_hdr_len));
    let injector = TapInjector::open(&name).map_err(|source| OpenTapError::PacketSocket {
        name: name.clone(),
        source,
    })?;
    let ports = taps
        .into_iter()
        .map(|tap| TapPort::new(tap, offloads_supported, Arc::clone(&vnet_hdr_len)))
        .collect();
    Ok(OpenedTap {
        ports,
        host_writer,
        injector,
        offloads_supported,
    })
}
