//! The TAP port: guest frames are written to a TAP queue straight from guest memory
//! (no copy), a batch per system call where io_uring is there; frames read from the
//! TAP wait in a buffer until a guest buffer takes them.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::tap_batch::{BatchWriter, Queued};
use super::{is_host_side_full_or_down, FlushedFrames, GuestFrame, Port, Tap, TxOutcome};
use crate::virtio_net::{
    F_GUEST_CSUM, F_GUEST_ECN, F_GUEST_TSO4, F_GUEST_TSO6, MAX_HDR_AND_FRAME_LEN, VNET_HDR_LEN_V1,
};

/// writev(2) takes at most this many segments.
const IOV_MAX: usize = 1024;

pub struct TapPort {
    tap: Tap,
    offloads_supported: bool,
    vnet_hdr_len: Arc<AtomicUsize>,
    /// Batches of guest frames, one system call each; `None` where io_uring is not
    /// available (or failed), and frames are written one `writev` each.
    batch: Option<BatchWriter>,
    /// Frames written outside `flush` (a full batch, a frame written alone), not
    /// reported yet.
    flushed: FlushedFrames,
    /// Reused for every frame written alone.
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
        let batch = match BatchWriter::new(tap.as_raw_fd()) {
            Ok(batch) => Some(batch),
            Err(e) => {
                log::info!(
                    "{}: no io_uring ({e}); writing guest frames one by one",
                    tap.name()
                );
                None
            }
        };
        Self {
            tap,
            offloads_supported,
            vnet_hdr_len,
            batch,
            flushed: FlushedFrames::default(),
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

impl TapPort {
    /// Whether guest frames go out in batches.
    #[cfg(test)]
    fn writes_batches(&self) -> bool {
        self.batch.is_some()
    }

    /// The same port, writing one frame per `writev` (as where io_uring is missing).
    #[cfg(test)]
    fn one_by_one(mut self) -> Self {
        self.batch = None;
        self
    }

    /// Write the batch now, keeping the count for the next `flush`.
    fn flush_batch(&mut self) {
        let Some(batch) = self.batch.as_mut() else {
            return;
        };
        if batch.is_empty() {
            return;
        }
        let queued = batch.len() as u64;
        match batch.flush() {
            Ok(flushed) => self.flushed.add(flushed),
            Err(e) => {
                // The ring failed, not a write: count the batch as lost and write
                // one by one from now on.
                log::warn!(
                    "{}: io_uring failed ({e}); writing guest frames one by one",
                    self.tap.name()
                );
                self.flushed.dropped += queued;
                self.batch = None;
            }
        }
    }

    /// Write one frame with `writev`, now.
    fn write_alone(&mut self, frame: &GuestFrame<'_>) -> io::Result<TxOutcome> {
        self.iovecs.clear();
        if !frame.iovecs(&mut self.iovecs, IOV_MAX) {
            return Err(io::Error::other("frame has more than 1024 segments"));
        }
        // The guest memory behind the iovecs stays mapped while `frame` is borrowed.
        match self.tap.writev(&self.iovecs) {
            Ok(_) => Ok(TxOutcome::Sent),
            // Queue full, or the link is down: the frame is lost, as on a wire.
            Err(e) if e.raw_os_error().is_some_and(is_host_side_full_or_down) => {
                Ok(TxOutcome::Dropped)
            }
            Err(e) => Err(e),
        }
    }
}

impl Port for TapPort {
    fn transmit(&mut self, frame: &GuestFrame<'_>) -> io::Result<TxOutcome> {
        let bytes = frame.len.saturating_sub(self.hdr_len()) as u64;
        if let Some(batch) = self.batch.as_mut() {
            let mut queued = batch.queue(frame, bytes);
            if queued == Queued::BatchFull {
                self.flush_batch();
                if let Some(batch) = self.batch.as_mut() {
                    queued = batch.queue(frame, bytes);
                }
            }
            if queued == Queued::Yes {
                return Ok(TxOutcome::Queued);
            }
            // The batch is empty here (flushed above, or the frame has more segments
            // than any batch holds), so a frame written alone goes after those before it.
        }
        self.write_alone(frame)
    }

    fn flush(&mut self) -> FlushedFrames {
        self.flush_batch();
        std::mem::take(&mut self.flushed)
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
    use crate::guest_ring::MappedMemory;
    use crate::port::open_tap_queues;
    use crate::virtio_net::F_CSUM;
    use crate::GuestMemory;
    use std::os::unix::io::{FromRawFd, OwnedFd};
    use vm_memory::{Bytes, GuestAddress};

    const REGION: u64 = 0x40000;
    const ETH_P_ALL: u16 = 0x0003;

    /// A packet socket on `interface` that records what the host receives there.
    fn capture_socket(interface: &str) -> OwnedFd {
        let name = std::ffi::CString::new(interface).unwrap();
        // SAFETY: `name` is NUL-terminated and lives for the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0);
        let protocol = ETH_P_ALL.to_be();
        // SAFETY: plain socket(2); owned right below.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(protocol),
            )
        };
        assert!(raw >= 0, "{}", io::Error::last_os_error());
        // SAFETY: a fresh descriptor nobody else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol;
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: `addr` is a sockaddr_ll of the size given, alive for the call.
        let bound = unsafe {
            libc::bind(
                socket.as_raw_fd(),
                std::ptr::addr_of!(addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(bound, 0, "{}", io::Error::last_os_error());
        let timeout = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: SO_RCVTIMEO reads one timeval, alive for the call.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::addr_of!(timeout).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        socket
    }

    /// The next `count` frames of our test protocol the host received (not the
    /// kernel's own, such as IPv6 router solicitations).
    fn captured(socket: &OwnedFd, count: usize) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 4096];
        while frames.len() < count {
            // SAFETY: `buf` is writable for its length during the call.
            let n =
                unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            assert!(
                n >= 0,
                "frame {} never came: {}",
                frames.len(),
                io::Error::last_os_error()
            );
            let frame = &buf[..n as usize];
            if frame.get(12..14) == Some(&[0x88, 0xb6]) {
                frames.push(frame.to_vec());
            }
        }
        frames
    }

    /// Frame `index`: Ethernet to a MAC nobody has, local experimental ethertype,
    /// its index and a pattern as payload; `len` bytes in all.
    fn test_frame(index: u32, len: usize) -> Vec<u8> {
        let mut frame = vec![
            0x02, 0, 0, 0, 0x77, 0x01, 0x02, 0, 0, 0, 0x77, 0x02, 0x88, 0xb6,
        ];
        frame.extend_from_slice(&index.to_be_bytes());
        frame.extend((0..len - frame.len()).map(|i| (i as u32 + index) as u8));
        frame
    }

    /// 150 frames in guest memory (header first), handed to `port` before one last
    /// flush, as a transmit pass does: the host gets them in order and whole, however
    /// each is split into buffers. Returns the port's answers, and what it flushed.
    fn send_through(port: &mut TapPort, tap: &str) -> (Vec<TxOutcome>, FlushedFrames, u64) {
        let mem = GuestMemory::from_ranges(&[
            (GuestAddress(0), REGION as usize),
            (GuestAddress(REGION), REGION as usize),
        ])
        .unwrap();
        let mapped = MappedMemory::new(Arc::new(mem.clone()));
        let socket = capture_socket(tap);
        let mut frames = Vec::new();
        let mut outcomes = Vec::new();
        let mut bytes_sent = 0u64;
        for index in 0..150u32 {
            let frame = test_frame(index, [60, 1514, 333][index as usize % 3]);
            let mut buffer = vec![0u8; VNET_HDR_LEN_V1];
            buffer.extend_from_slice(&frame);
            // Each frame in its own 2 KiB slot; frame 100 across the two regions.
            let at = match index {
                100 => REGION - 100,
                ..100 => u64::from(index) * 0x800,
                _ => u64::from(index + 30) * 0x800,
            };
            mem.write_slice(&buffer, GuestAddress(at)).unwrap();
            let mut pieces = Vec::new();
            if index == 77 {
                // 300 one-byte buffers: more than any batch holds.
                for offset in 0..buffer.len() as u64 {
                    mapped
                        .translate(at + offset, 1, &mut pieces, usize::MAX)
                        .unwrap();
                }
            } else {
                mapped
                    .translate(at, buffer.len() as u32, &mut pieces, usize::MAX)
                    .unwrap();
            }
            outcomes.push(
                port.transmit(&GuestFrame::new(&mapped, &pieces, buffer.len()))
                    .unwrap(),
            );
            bytes_sent += frame.len() as u64;
            frames.push(frame);
        }
        let flushed = port.flush();
        assert_eq!(captured(&socket, frames.len()), frames);
        (outcomes, flushed, bytes_sent)
    }

    fn tap_port(prefix: &str) -> (TapPort, String) {
        let name = format!("{prefix}{}", std::process::id() % 100_000);
        let mut opened = open_tap_queues(&name, 1, 1500).expect("a TAP (run the tests as root)");
        let mut port = opened.ports.remove(0);
        port.configure(VNET_HDR_LEN_V1, 0).unwrap();
        (port, name)
    }

    #[test]
    fn batched_frames_reach_the_host_in_order_and_are_counted_at_the_flush() {
        let (mut port, tap) = tap_port("fbtb");
        assert!(
            port.writes_batches(),
            "io_uring works here (kernel.io_uring_disabled?)"
        );
        let (outcomes, flushed, bytes) = send_through(&mut port, &tap);
        for (index, outcome) in outcomes.iter().enumerate() {
            let expected = if index == 77 {
                TxOutcome::Sent
            } else {
                TxOutcome::Queued
            };
            assert_eq!(*outcome, expected, "frame {index}");
        }
        assert_eq!((flushed.sent, flushed.dropped), (149, 0));
        // Frame 77 (333 B) was written alone, and counted as Sent there.
        assert_eq!(flushed.bytes, bytes - 333);
        assert!(flushed.error.is_none());
        assert!(port.flush().sent == 0, "a flush reports each frame once");
    }

    #[test]
    fn frames_written_one_by_one_reach_the_host_the_same() {
        let (port, tap) = tap_port("fbto");
        let mut port = port.one_by_one();
        let (outcomes, flushed, _) = send_through(&mut port, &tap);
        assert!(outcomes.iter().all(|outcome| *outcome == TxOutcome::Sent));
        assert_eq!((flushed.sent, flushed.dropped), (0, 0));
    }

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
