//! The TAP port: guest frames are written to a TAP queue straight from guest memory
//! (no copy); frames read from the TAP wait in a buffer until a guest buffer takes them.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{GuestFrame, Port, Tap, TxOutcome};
use crate::virtio_net::{
    F_GUEST_CSUM, F_GUEST_ECN, F_GUEST_TSO4, F_GUEST_TSO6, MAX_HDR_AND_FRAME_LEN, VNET_HDR_LEN_V1,
};

/// writev(2) takes at most this many segments.
const IOV_MAX: usize = 1024;

pub struct TapPort {
    tap: Tap,
    offloads_supported: bool,
    vnet_hdr_len: Arc<AtomicUsize>,
    /// Reused for every transmitted frame.
    iovecs: Vec<libc::iovec>,
    rx_buf: Vec<u8>,
    /// Length of the frame waiting in `rx_buf`, if any.
    rx_len: Option<usize>,
    /// No frontend has negotiated since the last one left: what the TAP queued
    /// meanwhile is stale.
    between_frontends: bool,
}

// SAFETY: the iovecs only hold pointers while `transmit` runs; between calls they
// are stale values never dereferenced, so moving the port to another thread is sound.
unsafe impl Send for TapPort {}

impl TapPort {
    pub fn new(tap: Tap, offloads_supported: bool, vnet_hdr_len: Arc<AtomicUsize>) -> Self {
        Self {
            tap,
            offloads_supported,
            vnet_hdr_len,
            iovecs: Vec::with_capacity(IOV_MAX),
            rx_buf: vec![0; MAX_HDR_AND_FRAME_LEN],
            rx_len: None,
            between_frontends: true,
        }
    }

    /// Drop what the TAP queued while no guest could take it (up to its queue length,
    /// seconds old when a backend restarts): a NIC without link would not have kept
    /// it, and a restarted guest path should not spend its first moments on it.
    fn discard_queued(&mut self) {
        let mut discarded = 0u32;
        while let Ok(len) = self.tap.read(&mut self.rx_buf) {
            if len == 0 {
                break;
            }
            discarded += 1;
        }
        self.rx_len = None;
        if discarded > 0 {
            log::info!(
                "{}: discarded {discarded} frame(s) queued while no frontend was connected",
                self.tap.name()
            );
        }
    }

    fn hdr_len(&self) -> usize {
        self.vnet_hdr_len.load(Ordering::Relaxed)
    }
}

/// TUN_F_* flags for the receive offloads the guest accepted.
fn tun_offloads(acked_features: u64) -> libc::c_uint {
    let mut flags = 0;
    if acked_features & F_GUEST_CSUM != 0 {
        flags |= libc::TUN_F_CSUM;
        // Segmentation offloads need checksum offload.
        if acked_features & F_GUEST_TSO4 != 0 {
            flags |= libc::TUN_F_TSO4;
        }
        if acked_features & F_GUEST_TSO6 != 0 {
            flags |= libc::TUN_F_TSO6;
        }
        if acked_features & F_GUEST_ECN != 0 {
            flags |= libc::TUN_F_TSO_ECN;
        }
    }
    flags
}

impl Port for TapPort {
    fn transmit(&mut self, frame: &GuestFrame<'_>) -> io::Result<TxOutcome> {
        self.iovecs.clear();
        if !frame.iovecs(&mut self.iovecs, IOV_MAX) {
            return Err(io::Error::other("frame has more than 1024 segments"));
        }
        // The guest memory behind the iovecs stays mapped while `frame` is borrowed.
        match self.tap.writev(&self.iovecs) {
            Ok(_) => Ok(TxOutcome::Sent),
            Err(e) => match e.raw_os_error() {
                // Queue full, or the link is down: the frame is lost, as on a wire.
                Some(libc::EAGAIN) | Some(libc::ENOBUFS) | Some(libc::EIO) => {
                    Ok(TxOutcome::Dropped)
                }
                _ => Err(e),
            },
        }
    }

    fn peek_rx(&mut self) -> io::Result<Option<&mut [u8]>> {
        if self.rx_len.is_none() {
            loop {
                match self.tap.read(&mut self.rx_buf) {
                    Ok(len) if len < self.hdr_len() => continue,
                    Ok(len) => {
                        self.rx_len = Some(len);
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(self.rx_len.map(|len| &mut self.rx_buf[..len]))
    }

    fn consume_rx(&mut self) {
        self.rx_len = None;
    }

    fn rx_fd(&self) -> Option<RawFd> {
        Some(self.tap.as_raw_fd())
    }

    fn configure(&mut self, vnet_hdr_len: usize, acked_features: u64) -> io::Result<()> {
        // A new frontend (not a renegotiation, as QEMU's at each migration's start).
        if std::mem::take(&mut self.between_frontends) {
            self.discard_queued();
        }
        self.tap.set_vnet_hdr_len(vnet_hdr_len)?;
        self.vnet_hdr_len.store(vnet_hdr_len, Ordering::Release);
        if self.offloads_supported {
            self.tap.set_offload(tun_offloads(acked_features))?;
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.rx_len = None;
        self.between_frontends = true;
        // Until the next guest says what it accepts, let the kernel finish checksums
        // and segmentation.
        if self.offloads_supported {
            if let Err(e) = self.tap.set_offload(0) {
                log::warn!("{}: cannot clear offloads: {e}", self.tap.name());
            }
        }
        if let Err(e) = self.tap.set_vnet_hdr_len(VNET_HDR_LEN_V1) {
            log::warn!("{}: cannot reset vnet header length: {e}", self.tap.name());
        }
        self.vnet_hdr_len.store(VNET_HDR_LEN_V1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio_net::F_CSUM;

    #[test]
    fn receive_offloads_follow_guest_features() {
        assert_eq!(tun_offloads(0), 0);
        assert_eq!(tun_offloads(F_CSUM), 0);
        assert_eq!(tun_offloads(F_GUEST_TSO4), 0, "TSO needs checksum offload");
        assert_eq!(
            tun_offloads(F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
        );
    }
}
