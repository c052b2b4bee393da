//! One queue pair's datapath: the guest's transmit queue into the port, and the
//! port into the guest's receive queue.
//!
//! Descriptor chains are walked with `virtio-queue`; completions go through
//! [`UsedRing`] in batches. Guest memory is only read and written through vm-memory,
//! so every write is range-checked and dirty-logged. Nothing here allocates per
//! frame: segment lists live in the worker and are reused.

use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use vhost_user_backend::{VringState, VringT};
use virtio_queue::{AvailIter, DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryBackend};

use crate::port::{GuestFrame, Port, SharedPort, TxOutcome};
use crate::stats::{CounterDelta, DeviceCounters};
use crate::used_ring::{UsedRing, PUBLISH_EVERY};
use crate::virtio_net::{MAX_HDR_AND_FRAME_LEN, NUM_BUFFERS_OFFSET, VNET_HDR_LEN_V1};
use crate::{GuestMemory, Vring};

/// Longest descriptor chain accepted (the largest ring a frontend may pick).
const MAX_CHAIN_SEGMENTS: usize = 1024;
/// Destination, source, EtherType: a frame shorter than this is no frame.
const ETH_HEADER_LEN: usize = 14;
/// Completions held before publishing: a batch, plus the buffers of one merged frame.
const USED_BATCH_CAPACITY: usize = PUBLISH_EVERY + MAX_CHAIN_SEGMENTS;

/// Why one descriptor chain was refused. The chain is completed with length 0 so
/// the guest does not see a descriptor leak; the queue goes on.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor {addr:#x}+{len:#x} lies outside guest memory")]
    OutsideGuestMemory { addr: u64, len: u32 },
    #[error("device-writable descriptor in a transmit chain")]
    WritableInTransmitChain,
    #[error("device-readable descriptor in a receive chain")]
    ReadableInReceiveChain,
    #[error("chain of {0} bytes cannot hold the virtio-net header")]
    ShorterThanHeader(usize),
    #[error("chain of more than {max} bytes", max = MAX_HDR_AND_FRAME_LEN)]
    LongerThanMaxFrame,
    #[error("chain of more than {MAX_CHAIN_SEGMENTS} descriptors")]
    TooManyDescriptors,
    #[error("chain does not end within the ring (it loops, or a next index lies past the ring)")]
    Unterminated,
    #[error("frame of {0} bytes is shorter than an Ethernet header")]
    ShorterThanEthernetHeader(usize),
}

/// The ring itself is unusable: nothing moves on this queue until the frontend sets
/// it up again. (Logged with the queue's number in front.)
#[derive(Debug, Error)]
pub enum QueueError {
    #[error("descriptor table or rings lie outside guest memory; the queue stays idle until it is set up again")]
    RingOutsideGuestMemory { queue: u16 },
    #[error("ring access failed: {source}")]
    RingAccess {
        queue: u16,
        source: virtio_queue::Error,
    },
}

impl QueueError {
    pub fn queue(&self) -> u16 {
        match self {
            Self::RingOutsideGuestMemory { queue } | Self::RingAccess { queue, .. } => *queue,
        }
    }
}

/// Logs the first of a run of errors, then at most one line a second, so a guest
/// that keeps sending garbage cannot flood the log.
struct ErrorLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl ErrorLog {
    const INTERVAL: Duration = Duration::from_secs(1);

    fn new() -> Self {
        Self {
            last: None,
            suppressed: 0,
        }
    }

    fn error(&mut self, queue: u16, what: &dyn std::fmt::Display) {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < Self::INTERVAL => self.suppressed += 1,
            _ => {
                if self.suppressed > 0 {
                    log::warn!(
                        "virtqueue {queue}: {what} ({} similar suppressed)",
                        self.suppressed
                    );
                } else {
                    log::warn!("virtqueue {queue}: {what}");
                }
                self.last = Some(now);
                self.suppressed = 0;
            }
        }
    }
}

/// What a pass over the transmit queue did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxProgress {
    pub frames: u64,
    /// The port pushed back; frames wait in the ring until it has room.
    pub blocked: bool,
}

/// What a pass over the receive queue did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxProgress {
    pub frames: u64,
    /// A frame waits for guest buffers.
    pub starved: bool,
}

/// Negotiated link parameters the datapath needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkParams {
    pub vnet_hdr_len: usize,
    pub mergeable_rx: bool,
}

fn ring_error(queue: u16) -> impl Fn(virtio_queue::Error) -> QueueError + Copy {
    move |source| QueueError::RingAccess { queue, source }
}

/// Where a queue's rings lie: a queue refused once is not looked at again until the
/// frontend sets it up differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RingLayout {
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    size: u16,
}

impl RingLayout {
    fn of(queue: &Queue) -> Self {
        Self {
            desc_table: queue.desc_table(),
            avail_ring: queue.avail_ring(),
            used_ring: queue.used_ring(),
            size: queue.size(),
        }
    }

    /// Descriptor table, available and used rings (with their event index fields)
    /// lie in guest memory. (virtio-queue's own `is_valid` logs an error on every
    /// call, so a guest could flood the log by kicking a bad queue.)
    fn in_memory(&self, mem: &GuestMemory) -> bool {
        let size = usize::from(self.size);
        mem.check_range(GuestAddress(self.desc_table), 16 * size)
            && mem.check_range(GuestAddress(self.avail_ring), 6 + 2 * size)
            && mem.check_range(GuestAddress(self.used_ring), 6 + 8 * size)
    }
}

/// The vring's queue, once its rings are checked to lie in guest memory; `None` for
/// a queue already refused and not set up again since.
fn valid_queue<'s>(
    state: &'s mut VringState<GuestMemoryAtomic<GuestMemory>>,
    mem: &GuestMemory,
    queue: u16,
    refused: &mut Option<RingLayout>,
) -> Result<Option<&'s mut Queue>, QueueError> {
    let ring = state.get_queue_mut();
    let layout = RingLayout::of(ring);
    if *refused == Some(layout) {
        return Ok(None);
    }
    if layout.in_memory(mem) {
        *refused = None;
        Ok(Some(ring))
    } else {
        *refused = Some(layout);
        Err(QueueError::RingOutsideGuestMemory { queue })
    }
}

/// Start a ring where its used index says, once per connection and ring layout.
///
/// A frontend sets the ring base (the next chain to process) with SET_VRING_BASE.
/// QEMU sets it to where the last connection stopped, which is the used index that
/// connection left in guest memory: this device completes every chain it takes
/// before it returns. A frontend that reconnects may set it to 0 while its ring runs
/// on (DPDK's virtio-user in server mode does): the chains between 0 and the used
/// index would then be processed twice (frames sent again, stale buffers filled
/// again). The used index is the truth; start from there.
fn sync_with_used_ring(
    queue: &mut Queue,
    mem: &GuestMemory,
    index: u16,
    synced: &mut Option<RingLayout>,
) -> Result<(), QueueError> {
    let layout = RingLayout::of(queue);
    if *synced == Some(layout) {
        return Ok(());
    }
    let used = queue
        .used_idx(mem, Ordering::Acquire)
        .map_err(ring_error(index))?;
    if used.0 != queue.next_avail() {
        log::info!(
            "virtqueue {index}: ring base {} differs from the used index {} in guest memory; \
             resuming from the used index",
            queue.next_avail(),
            used.0
        );
        queue.set_next_avail(used.0);
        queue.set_next_used(used.0);
    }
    *synced = Some(layout);
    Ok(())
}

/// Interrupt the guest when the pass completed something it wants to hear about.
fn signal_if(
    notify: bool,
    state: &VringState<GuestMemoryAtomic<GuestMemory>>,
    errors: &mut ErrorLog,
    queue: u16,
) {
    if notify {
        if let Err(e) = state.signal_used_queue() {
            errors.error(queue, &format!("cannot signal the guest: {e}"));
        }
    }
}

fn queue_usable(vring: &Vring) -> bool {
    let state = vring.get_ref();
    state.is_enabled() && state.get_queue().ready()
}

/// Guest → host.
pub struct TxVirtio {
    queue: u16,
    counters: Arc<DeviceCounters>,
    segments: Vec<(GuestAddress, u32)>,
    used: UsedRing,
    errors: ErrorLog,
    refused: Option<RingLayout>,
    /// The ring layout whose start was checked against the used ring.
    synced: Option<RingLayout>,
}

impl TxVirtio {
    pub fn new(queue: u16, counters: Arc<DeviceCounters>) -> Self {
        Self {
            queue,
            counters,
            segments: Vec::with_capacity(MAX_CHAIN_SEGMENTS),
            used: UsedRing::new(USED_BATCH_CAPACITY),
            errors: ErrorLog::new(),
            refused: None,
            synced: None,
        }
    }

    /// Collect the readable descriptors of `chain`; returns the chain's length.
    fn gather(
        &mut self,
        chain: DescriptorChain<&GuestMemory>,
        mem: &GuestMemory,
        hdr_len: usize,
    ) -> Result<usize, ChainError> {
        self.segments.clear();
        let mut len = 0usize;
        let mut ends = false;
        for desc in chain {
            ends = !desc.has_next();
            if desc.is_write_only() {
                return Err(ChainError::WritableInTransmitChain);
            }
            if self.segments.len() == MAX_CHAIN_SEGMENTS {
                return Err(ChainError::TooManyDescriptors);
            }
            len += desc.len() as usize;
            if len > MAX_HDR_AND_FRAME_LEN {
                return Err(ChainError::LongerThanMaxFrame);
            }
            if !mem.check_range(desc.addr(), desc.len() as usize) {
                return Err(ChainError::OutsideGuestMemory {
                    addr: desc.addr().0,
                    len: desc.len(),
                });
            }
            self.segments.push((desc.addr(), desc.len()));
        }
        // The iterator stops quietly on a loop or a next index past the ring: the last
        // descriptor it gave then still points further.
        if !ends {
            return Err(ChainError::Unterminated);
        }
        if len < hdr_len {
            return Err(ChainError::ShorterThanHeader(len));
        }
        if len - hdr_len < ETH_HEADER_LEN {
            return Err(ChainError::ShorterThanEthernetHeader(len - hdr_len));
        }
        Ok(len)
    }

    /// Hand every available frame to `port`, until the ring is empty or the port is busy.
    pub fn process(
        &mut self,
        vring: &Vring,
        mem: &GuestMemory,
        port: &mut dyn Port,
        link: LinkParams,
    ) -> Result<TxProgress, QueueError> {
        if !queue_usable(vring) {
            return Ok(TxProgress::default());
        }
        let ring_error = ring_error(self.queue);
        let mut state = vring.get_mut();
        let Some(queue) = valid_queue(&mut state, mem, self.queue, &mut self.refused)? else {
            return Ok(TxProgress::default());
        };
        sync_with_used_ring(queue, mem, self.queue, &mut self.synced)?;
        let mut delta = CounterDelta::default();
        let mut progress = TxProgress::default();
        self.used.begin(queue);
        // With EVENT_IDX the guest kicks only when it passes `avail_event`, so after
        // re-arming notifications look again: a frame added in between would
        // otherwise wait for the next kick.
        loop {
            queue.disable_notification(mem).map_err(ring_error)?;
            let mut chains = queue.iter(mem).map_err(ring_error)?;
            while let Some(chain) = chains.next() {
                let head = chain.head_index();
                match self.gather(chain, mem, link.vnet_hdr_len) {
                    Ok(len) => {
                        let frame = GuestFrame {
                            mem,
                            segments: &self.segments,
                            len,
                        };
                        match port.transmit(&frame) {
                            Ok(TxOutcome::Sent) => {
                                delta.packets += 1;
                                delta.bytes += (len - link.vnet_hdr_len) as u64;
                            }
                            Ok(TxOutcome::Dropped) => delta.drops += 1,
                            Ok(TxOutcome::Filtered) => {}
                            Ok(TxOutcome::Busy) => {
                                // Leave the chain in the ring; it is offered again later.
                                chains.go_to_previous_position();
                                progress.blocked = true;
                                break;
                            }
                            Err(e) => {
                                delta.drops += 1;
                                self.errors.error(self.queue, &format!("host port: {e}"));
                            }
                        }
                    }
                    Err(e) => {
                        delta.errors += 1;
                        self.errors.error(self.queue, &e);
                    }
                }
                // Transmit buffers are only read: completed with length 0.
                self.used.push(head, 0);
                self.used.publish_if_full(mem).map_err(ring_error)?;
            }
            if progress.blocked {
                break;
            }
            self.used.publish(mem).map_err(ring_error)?;
            if !queue.enable_notification(mem).map_err(ring_error)? {
                break;
            }
        }
        let notify = self.used.finish(queue, mem).map_err(ring_error)?;
        signal_if(notify, &state, &mut self.errors, self.queue);
        progress.frames = delta.packets;
        self.counters.queue(self.queue as usize).add(&delta);
        Ok(progress)
    }
}

/// A receive chain taken for the frame being placed.
#[derive(Clone, Copy, Debug)]
struct TakenChain {
    head: u16,
    /// One past this chain's last entry in `RxVirtio::segments`.
    segments_end: usize,
}

/// What became of one frame offered to the receive queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placement {
    Delivered,
    /// Not enough guest buffers now (the `usize` available were too few); the frame waits.
    NoBuffers(usize),
    /// No buffer the guest can post will ever hold it; the frame is dropped.
    NeverFits,
}

/// Host → guest.
pub struct RxVirtio {
    queue: u16,
    counters: Arc<DeviceCounters>,
    segments: Vec<(GuestAddress, u32)>,
    chains: Vec<TakenChain>,
    used: UsedRing,
    errors: ErrorLog,
    refused: Option<RingLayout>,
    /// The ring layout whose start was checked against the used ring.
    synced: Option<RingLayout>,
}

impl RxVirtio {
    pub fn new(queue: u16, counters: Arc<DeviceCounters>) -> Self {
        Self {
            queue,
            counters,
            segments: Vec::with_capacity(MAX_CHAIN_SEGMENTS),
            chains: Vec::with_capacity(64),
            used: UsedRing::new(USED_BATCH_CAPACITY),
            errors: ErrorLog::new(),
            refused: None,
            synced: None,
        }
    }

    /// Append the writable descriptors of `chain` to `segments`; returns their capacity.
    fn take_writable(
        &mut self,
        chain: DescriptorChain<&GuestMemory>,
        mem: &GuestMemory,
    ) -> Result<usize, ChainError> {
        let mut capacity = 0usize;
        let mut ends = false;
        for desc in chain {
            ends = !desc.has_next();
            if !desc.is_write_only() {
                return Err(ChainError::ReadableInReceiveChain);
            }
            if self.segments.len() == MAX_CHAIN_SEGMENTS {
                return Err(ChainError::TooManyDescriptors);
            }
            if !mem.check_range(desc.addr(), desc.len() as usize) {
                return Err(ChainError::OutsideGuestMemory {
                    addr: desc.addr().0,
                    len: desc.len(),
                });
            }
            capacity += desc.len() as usize;
            self.segments.push((desc.addr(), desc.len()));
        }
        if !ends {
            return Err(ChainError::Unterminated);
        }
        Ok(capacity)
    }

    /// Put the chains taken so far back into the ring, newest first.
    fn give_back(&mut self, chains: &mut AvailIter<'_, &GuestMemory>) {
        for _ in 0..self.chains.len() {
            chains.go_to_previous_position();
        }
        self.chains.clear();
        self.segments.clear();
    }

    /// Copy `frame` (virtio-net header first) into as many guest buffers as it needs.
    fn place(
        &mut self,
        chains: &mut AvailIter<'_, &GuestMemory>,
        queue_size: u16,
        mem: &GuestMemory,
        frame: &mut [u8],
        link: LinkParams,
        delta: &mut CounterDelta,
    ) -> Result<Placement, virtio_queue::Error> {
        self.chains.clear();
        self.segments.clear();
        let need = frame.len();
        let mut capacity = 0usize;
        while capacity < need {
            let one_buffer_only = !link.mergeable_rx && !self.chains.is_empty();
            if one_buffer_only || self.chains.len() == queue_size as usize {
                self.give_back(chains);
                return Ok(Placement::NeverFits);
            }
            let Some(chain) = chains.next() else {
                let available = self.chains.len();
                self.give_back(chains);
                return Ok(Placement::NoBuffers(available));
            };
            let head = chain.head_index();
            let first_segment = self.segments.len();
            match self.take_writable(chain, mem) {
                Ok(chain_capacity) => {
                    self.chains.push(TakenChain {
                        head,
                        segments_end: self.segments.len(),
                    });
                    capacity += chain_capacity;
                }
                Err(e) => {
                    // The ring cannot be rewound past a chain that is completed, so the
                    // buffers taken before the bad one go back empty, then the bad one.
                    // Guests drop used buffers shorter than a header.
                    self.segments.truncate(first_segment);
                    for taken in self.chains.drain(..) {
                        self.used.push(taken.head, 0);
                    }
                    self.segments.clear();
                    capacity = 0;
                    self.used.push(head, 0);
                    delta.errors += 1;
                    self.errors.error(self.queue, &e);
                }
            }
        }

        if link.vnet_hdr_len == VNET_HDR_LEN_V1 {
            let num_buffers = self.chains.len() as u16;
            frame[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2]
                .copy_from_slice(&num_buffers.to_le_bytes());
        }
        let mut offset = 0usize;
        let mut segment = 0usize;
        for taken in &self.chains {
            let mut written = 0usize;
            while segment < taken.segments_end && offset < need {
                let (addr, len) = self.segments[segment];
                let n = (len as usize).min(need - offset);
                // In range: checked when the chain was taken, under the same memory guard.
                mem.write_slice(&frame[offset..offset + n], addr)
                    .map_err(virtio_queue::Error::GuestMemory)?;
                offset += n;
                written += n;
                segment += 1;
            }
            segment = taken.segments_end;
            self.used.push(taken.head, written as u32);
        }
        // Between frames: the buffers of this one are published together.
        self.used.publish_if_full(mem)?;
        Ok(Placement::Delivered)
    }

    /// Deliver frames from `port` until it has none or the guest has no buffers.
    pub fn process(
        &mut self,
        vring: &Vring,
        mem: &GuestMemory,
        port: &mut dyn Port,
        link: LinkParams,
    ) -> Result<RxProgress, QueueError> {
        if !queue_usable(vring) {
            return Ok(RxProgress::default());
        }
        let ring_error = ring_error(self.queue);
        let mut state = vring.get_mut();
        let Some(queue) = valid_queue(&mut state, mem, self.queue, &mut self.refused)? else {
            return Ok(RxProgress::default());
        };
        sync_with_used_ring(queue, mem, self.queue, &mut self.synced)?;
        let queue_size = queue.size();
        let mut delta = CounterDelta::default();
        let mut progress = RxProgress::default();
        self.used.begin(queue);
        'frames: loop {
            let mut chains = queue.iter(mem).map_err(ring_error)?;
            let available = loop {
                let frame = match port.peek_rx() {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break 'frames,
                    Err(e) => {
                        delta.drops += 1;
                        self.errors.error(self.queue, &format!("host port: {e}"));
                        break 'frames;
                    }
                };
                let len = frame.len();
                let placement = self
                    .place(&mut chains, queue_size, mem, frame, link, &mut delta)
                    .map_err(ring_error)?;
                match placement {
                    Placement::Delivered => {
                        port.consume_rx();
                        delta.packets += 1;
                        delta.bytes += (len - link.vnet_hdr_len) as u64;
                    }
                    Placement::NeverFits => {
                        port.consume_rx();
                        delta.drops += 1;
                    }
                    Placement::NoBuffers(available) => break available,
                }
            };
            // Out of buffers: hand back what is done, then ask for a kick when more
            // arrive; if some came in meanwhile, go on.
            self.used.publish(mem).map_err(ring_error)?;
            queue.enable_notification(mem).map_err(ring_error)?;
            let avail = queue
                .avail_idx(mem, Ordering::Acquire)
                .map_err(ring_error)?;
            if (avail - Wrapping(queue.next_avail())).0 as usize <= available {
                progress.starved = true;
                break;
            }
        }
        if !progress.starved {
            // Buffers to spare: no need for a kick each time the guest adds more.
            queue.disable_notification(mem).map_err(ring_error)?;
        }
        let notify = self.used.finish(queue, mem).map_err(ring_error)?;
        signal_if(notify, &state, &mut self.errors, self.queue);
        progress.frames = delta.packets;
        self.counters.queue(self.queue as usize).add(&delta);
        Ok(progress)
    }
}

/// The worker state of one queue pair.
pub struct QueuePair {
    tx: TxVirtio,
    rx: RxVirtio,
    port: SharedPort,
    errors: ErrorLog,
}

impl QueuePair {
    pub fn new(pair: u16, port: SharedPort, counters: Arc<DeviceCounters>) -> Self {
        Self {
            rx: RxVirtio::new(2 * pair, Arc::clone(&counters)),
            tx: TxVirtio::new(2 * pair + 1, counters),
            port,
            errors: ErrorLog::new(),
        }
    }

    /// Move frames both ways until nothing moves. Called for every kick and every
    /// port wake-up (`port_woke`): a pass over an idle queue costs one read of its
    /// avail index.
    pub fn pump(
        &mut self,
        rx_vring: &Vring,
        tx_vring: &Vring,
        mem: &GuestMemory,
        link: LinkParams,
        port_woke: bool,
    ) {
        let mut port = self.port.lock().unwrap_or_else(|e| e.into_inner());
        if port_woke {
            port.woken();
        }
        loop {
            let tx = match self.tx.process(tx_vring, mem, port.as_mut(), link) {
                Ok(progress) => progress,
                Err(e) => {
                    self.errors.error(e.queue(), &e);
                    TxProgress::default()
                }
            };
            let rx = match self.rx.process(rx_vring, mem, port.as_mut(), link) {
                Ok(progress) => progress,
                Err(e) => {
                    self.errors.error(e.queue(), &e);
                    RxProgress::default()
                }
            };
            // A loop port that filled up stopped the transmit side; the receive side
            // just made room, so transmit again.
            if !(tx.blocked && rx.frames > 0) {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests;
