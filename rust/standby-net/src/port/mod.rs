//! Host-side ports: where the guest's frames go and where frames for the guest come from.
//!
//! A device has one port per queue pair, owned by that pair's worker while a frontend
//! is connected, and kept by the server across connections (a TAP must not vanish
//! because QEMU restarted).

mod generator;
mod loopback;
mod null;
mod open_tap;
mod tap;
mod tap_batch;
mod tap_injector;
mod tap_port;

use std::io;
use std::os::unix::io::RawFd;
use std::sync::{Arc, Mutex};

use crate::config::{MacAddr, PortSpec};
use crate::guest_ring::{MappedMemory, Piece};
use crate::steering::HostSide;
use crate::virtio_net::OFFLOAD_FEATURES;
use thiserror::Error;

pub use generator::GenPort;
pub use loopback::LoopPort;
pub use null::{NullPort, SinkPort};
pub use open_tap::{open_tap_queues, OpenTapError};
pub use tap::{HostWriter, Tap};
pub use tap_injector::TapInjector;

/// One guest frame in guest memory: the virtio-net header, then the Ethernet frame,
/// spread over the readable buffers of a transmit chain. Ports read it through
/// [`GuestFrame::read`] or [`GuestFrame::iovecs`]; it never hands out a reference
/// into guest memory, which the guest may be writing.
pub struct GuestFrame<'a> {
    mem: &'a MappedMemory,
    /// The chain's buffers, checked to lie in `mem`.
    pieces: &'a [Piece],
    /// Sum of the piece lengths.
    pub len: usize,
}

impl<'a> GuestFrame<'a> {
    pub fn new(mem: &'a MappedMemory, pieces: &'a [Piece], len: usize) -> Self {
        Self { mem, pieces, len }
    }

    /// Copy the frame, from byte `skip` on, into `dst`; returns how many bytes.
    pub fn read(&self, skip: usize, dst: &mut [u8]) -> usize {
        self.mem.read(self.pieces, skip, dst)
    }

    /// Append one iovec per buffer (at most `max` in all); says whether all fit. The
    /// iovecs point into guest memory, valid while the frame is borrowed.
    pub fn iovecs(&self, out: &mut Vec<libc::iovec>, max: usize) -> bool {
        self.mem.iovecs(self.pieces, out, max)
    }
}

/// What became of a frame handed to [`Port::transmit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxOutcome {
    /// Taken by the host side.
    Sent,
    /// Lost on the host side (for example a TAP whose queue is full).
    Dropped,
    /// Cannot be taken now; offer it again after the port made room.
    Busy,
    /// Kept from the host side on purpose (steering); counted by steering.
    Filtered,
    /// Taken into a batch the port writes at [`Port::flush`], which reports it. Its
    /// chain must not go back to the guest before then.
    Queued,
}

/// What became of the frames a [`Port::flush`] wrote.
#[derive(Debug, Default)]
pub struct FlushedFrames {
    pub sent: u64,
    /// Ethernet bytes of the frames sent.
    pub bytes: u64,
    pub dropped: u64,
    /// The first failure that was not the host side being full or down.
    pub error: Option<io::Error>,
}

impl FlushedFrames {
    /// Add what another flush wrote.
    pub fn add(&mut self, other: FlushedFrames) {
        self.sent += other.sent;
        self.bytes += other.bytes;
        self.dropped += other.dropped;
        self.error = self.error.take().or(other.error);
    }

    /// Count one frame of `bytes` by its write's result (bytes written, or -errno).
    pub fn count(&mut self, bytes: u64, result: i32) {
        if result >= 0 {
            self.sent += 1;
            self.bytes += bytes;
            return;
        }
        self.dropped += 1;
        if !is_host_side_full_or_down(-result) && self.error.is_none() {
            self.error = Some(io::Error::from_raw_os_error(-result));
        }
    }
}

/// A write the host side refused as a wire would lose a frame: its queue is full,
/// or its link is down.
pub fn is_host_side_full_or_down(errno: i32) -> bool {
    matches!(errno, libc::EAGAIN | libc::ENOBUFS | libc::EIO)
}

/// The host side of one queue pair.
///
/// Only [`Port::transmit`] is required: the defaults are those of a port that takes
/// the guest's frames and sends it none (`null`, `sink`, `loop`).
pub trait Port: Send {
    /// Hand one frame from the guest to the host side.
    fn transmit(&mut self, frame: &GuestFrame<'_>) -> io::Result<TxOutcome>;

    /// Write the frames [`Port::transmit`] answered `Queued` for; called before their
    /// chains go back to the guest, and before the transmit pass ends.
    fn flush(&mut self) -> FlushedFrames {
        FlushedFrames::default()
    }

    /// The next frame for the guest, virtio-net header first. It stays here until
    /// [`Port::consume_rx`], so a frame that finds no guest buffer is not lost.
    /// The caller may rewrite the header in place (`num_buffers`).
    fn peek_rx(&mut self) -> io::Result<Option<&mut [u8]>> {
        Ok(None)
    }

    /// Forget the frame `peek_rx` returned.
    fn consume_rx(&mut self) {}

    /// A descriptor that becomes readable when `peek_rx` may have a new frame,
    /// watched edge-triggered; `None` for ports fed only by `transmit`.
    fn rx_fd(&self) -> Option<RawFd> {
        None
    }

    /// `rx_fd` woke the worker (a port whose descriptor must be read to signal again
    /// reads it here).
    fn woken(&mut self) {}

    /// Header length and offloads the guest acked.
    fn configure(&mut self, _vnet_hdr_len: usize, _acked_features: u64) -> io::Result<()> {
        Ok(())
    }

    /// Drop frames held for a connection that is gone.
    fn reset(&mut self) {}

    /// Every frame goes back to the guest: the queue pair then copies transmit
    /// buffers straight into receive buffers and never calls `transmit` or `peek_rx`.
    fn loops_back(&self) -> bool {
        false
    }
}

/// A port shared between the server (which keeps it across connections) and the
/// worker of its queue pair (the only one that locks it while connected).
pub type SharedPort = Arc<Mutex<Box<dyn Port>>>;

#[derive(Debug, Error)]
pub enum OpenPortError {
    #[error(transparent)]
    Tap(#[from] OpenTapError),
    #[error("gen port: cannot create its timer: {0}")]
    GenTimer(io::Error),
}

/// The ports of a device, and the virtio features they can support.
pub struct OpenPorts {
    pub ports: Vec<Box<dyn Port>>,
    /// Offload features the ports can honour (a subset of [`OFFLOAD_FEATURES`]).
    pub offload_features: u64,
    /// Both sides of a TAP, for steering: writes onto the host side from outside the
    /// datapath, and frames queued for the guest.
    pub host_side: Option<HostSide>,
}

/// Open one port per queue pair; `guest_mac` is where generated frames go, `mtu`
/// the guest's (a TAP gets it too).
pub fn open_ports(
    spec: &PortSpec,
    queue_pairs: u16,
    guest_mac: MacAddr,
    mtu: u16,
) -> Result<OpenPorts, OpenPortError> {
    match spec {
        PortSpec::Null => Ok(OpenPorts {
            ports: (0..queue_pairs)
                .map(|_| Box::new(NullPort) as Box<dyn Port>)
                .collect(),
            offload_features: 0,
            host_side: None,
        }),
        PortSpec::Sink => Ok(OpenPorts {
            ports: (0..queue_pairs)
                .map(|_| Box::new(SinkPort::new()) as Box<dyn Port>)
                .collect(),
            offload_features: 0,
            host_side: None,
        }),
        PortSpec::Loop => Ok(OpenPorts {
            ports: (0..queue_pairs)
                .map(|_| Box::<LoopPort>::default() as Box<dyn Port>)
                .collect(),
            offload_features: 0,
            host_side: None,
        }),
        PortSpec::Gen(spec) => Ok(OpenPorts {
            ports: (0..queue_pairs)
                .map(|_| Ok(Box::new(GenPort::new(*spec, guest_mac)?) as Box<dyn Port>))
                .collect::<io::Result<_>>()
                .map_err(OpenPortError::GenTimer)?,
            offload_features: 0,
            host_side: None,
        }),
        PortSpec::Tap { name } => {
            let opened = open_tap_queues(name, queue_pairs, mtu)?;
            let offload_features = if opened.offloads_supported {
                OFFLOAD_FEATURES
            } else {
                0
            };
            Ok(OpenPorts {
                host_side: Some(HostSide {
                    writer: opened.host_writer,
                    injector: opened.injector,
                }),
                ports: opened
                    .ports
                    .into_iter()
                    .map(|port| Box::new(port) as Box<dyn Port>)
                    .collect(),
                offload_features,
            })
        }
    }
}
