//! One queue pair's datapath: the guest's transmit queue into the port, and the
//! port into the guest's receive queue.
//!
//! Descriptor chains are walked and buffers copied through [`crate::guest_ring`]
//! (checked host pointers, translated once per memory table); completions go through
//! [`UsedRing`] in batches. Every write is range-checked and dirty-logged. Nothing
//! here allocates per frame: piece lists live in the worker and are reused.

use std::num::Wrapping;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use vhost_user_backend::{VringState, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestMemoryAtomic, GuestMemoryLoadGuard};

use crate::guest_ring::{
    walk_chain, walk_packed_chain, ChainError, ChainRules, MappedMemory, PackedRingView, Piece,
    RingLayout, RingPlacement, RingPlacementError, RingView,
};
use crate::port::{GuestFrame, Port, SharedPort, TxOutcome};
use crate::stats::{CounterDelta, DeviceCounters};
use crate::used_ring::{packed_advance, packed_parts, UsedRing, PUBLISH_EVERY};
use crate::virtio_net::{MAX_HDR_AND_FRAME_LEN, NUM_BUFFERS_OFFSET, VNET_HDR_LEN_V1};
use crate::{GuestMemory, Vring};

/// Most buffers (descriptors, or their pieces where one crosses memory regions) in
/// a transmit chain, and in all the receive chains of one frame.
const MAX_CHAIN_SEGMENTS: usize = 1024;
/// How many chains ahead buffers are prefetched: far enough for the line to arrive
/// before its frame's turn, near enough to stay in cache (DPDK's vhost uses 4 too).
const PREFETCH_AHEAD: u16 = 4;
/// Newly available chains whose descriptors are prefetched together (DPDK's vhost
/// takes a burst of 32 the same way).
const PREFETCH_BATCH: u16 = 32;
/// Destination, source, EtherType: a frame shorter than this is no frame.
const ETH_HEADER_LEN: usize = 14;
/// Completions held before publishing: a batch, plus the buffers of one merged frame.
const USED_BATCH_CAPACITY: usize = PUBLISH_EVERY + MAX_CHAIN_SEGMENTS;

const TX_CHAINS: ChainRules = ChainRules {
    device_writes: false,
    max_bytes: MAX_HDR_AND_FRAME_LEN,
    max_pieces: MAX_CHAIN_SEGMENTS,
};

/// The ring itself is unusable: nothing moves on this queue until the frontend sets
/// it up again (or maps memory where it lies). (Logged with the queue's number in front.)
#[derive(Debug, Error)]
pub enum QueueError {
    #[error("{source}; the queue stays idle until it is set up again")]
    RingPlacement {
        queue: u16,
        source: RingPlacementError,
    },
    #[error("available index {avail} is more than a ring ahead of the device's {next}")]
    AvailIndexAhead { queue: u16, avail: u16, next: u16 },
    #[error(
        "the packed chain at descriptor {position} does not end within the ring; \
         nothing after it moves"
    )]
    UnterminatedPackedChain { queue: u16, position: u16 },
}

impl QueueError {
    pub fn queue(&self) -> u16 {
        match self {
            Self::RingPlacement { queue, .. }
            | Self::AvailIndexAhead { queue, .. }
            | Self::UnterminatedPackedChain { queue, .. } => *queue,
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
    /// Chains completed, refused ones included.
    pub chains: u16,
    /// The port pushed back; frames wait in the ring until it has room.
    pub blocked: bool,
}

/// What a pass over the receive queue did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxProgress {
    pub frames: u64,
    /// Chains completed, refused ones included.
    pub chains: u16,
    /// A frame waits for guest buffers.
    pub starved: bool,
}

/// What a pass does with the guest's kicks once the rings are drained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kicks {
    /// Ask for a kick when more arrives (the worker is going to sleep in epoll).
    Arm,
    /// Leave them suppressed: the worker polls again right away.
    Suppress,
}

/// Negotiated link parameters the datapath needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkParams {
    pub vnet_hdr_len: usize,
    pub mergeable_rx: bool,
    /// VIRTIO_F_RING_PACKED: every ring of the device is packed.
    pub packed_ring: bool,
    /// VIRTIO_F_IN_ORDER: the driver takes used buffers back in the order it made
    /// them available.
    pub in_order: bool,
}

fn layout_of(queue: &Queue, packed: bool) -> RingLayout {
    RingLayout {
        desc_table: queue.desc_table(),
        avail_ring: queue.avail_ring(),
        used_ring: queue.used_ring(),
        size: queue.size(),
        packed,
    }
}

/// One queue's ring for a pass, in the format the driver negotiated.
pub enum Ring<'m> {
    Split(RingView<'m>),
    Packed(PackedRingView<'m>),
}

impl<'m> Ring<'m> {
    pub fn size(&self) -> u16 {
        match self {
            Ring::Split(ring) => ring.size(),
            Ring::Packed(ring) => ring.size(),
        }
    }

    /// The memory the ring and its buffers lie in.
    pub fn memory(&self) -> &'m MappedMemory {
        match self {
            Ring::Split(ring) => ring.memory(),
            Ring::Packed(ring) => ring.memory(),
        }
    }
}

const PACKED_EVENT_ENABLE: u16 =
    virtio_bindings::bindings::virtio_ring::VRING_PACKED_EVENT_FLAG_ENABLE as u16;
const PACKED_EVENT_DISABLE: u16 =
    virtio_bindings::bindings::virtio_ring::VRING_PACKED_EVENT_FLAG_DISABLE as u16;

/// One queue's ring, placed on the current memory table. A ring refused once is not
/// looked at again until the frontend sets it up differently or maps new memory, so
/// a guest that keeps kicking a bad ring costs nothing and floods no log.
#[derive(Default)]
struct PlacedRing {
    /// The layout and memory table `placement` was made for.
    key: Option<(RingLayout, u64)>,
    /// `None`: refused.
    placement: Option<RingPlacement>,
    /// The layout whose start was checked against the used ring.
    synced: Option<RingLayout>,
    /// Kicks are suppressed in the ring now (so suppressing again writes nothing:
    /// the used ring's first line is shared with a driver that polls it).
    kicks_suppressed: bool,
}

impl PlacedRing {
    fn suppress_kicks(&mut self, ring: &Ring<'_>, event_idx: bool) {
        if !self.kicks_suppressed {
            match ring {
                Ring::Split(ring) => ring.suppress_kicks(event_idx),
                Ring::Packed(ring) => ring.set_device_event_flags(PACKED_EVENT_DISABLE),
            }
            self.kicks_suppressed = true;
        }
    }

    /// Ask for a kick once the driver adds a chain where `cursor` last found none;
    /// says whether it already has (then the caller goes on instead of waiting).
    fn allow_kicks(&mut self, ring: &Ring<'_>, event_idx: bool, cursor: &AvailCursor) -> bool {
        self.kicks_suppressed = false;
        match ring {
            Ring::Split(split) => split.allow_kicks(event_idx, cursor.empty_at),
            Ring::Packed(packed) => {
                packed.set_device_event_flags(PACKED_EVENT_ENABLE);
                // The driver must see the store before we look at its ring again.
                std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
                cursor.more_since_empty(ring)
            }
        }
    }

    /// The ring for this pass; `Ok(None)` for a ring refused before.
    fn view<'m>(
        &mut self,
        index: u16,
        queue: &mut Queue,
        mem: &'m MappedMemory,
        packed: bool,
    ) -> Result<Option<Ring<'m>>, QueueError> {
        let layout = layout_of(queue, packed);
        let key = (layout, mem.generation());
        if self.key != Some(key) {
            self.key = Some(key);
            self.placement = None;
            self.kicks_suppressed = false;
            let placement =
                mem.place_ring(&layout)
                    .map_err(|source| QueueError::RingPlacement {
                        queue: index,
                        source,
                    })?;
            self.placement = Some(placement);
        }
        let Some(placement) = self.placement.as_ref() else {
            return Ok(None);
        };
        if packed {
            // A packed ring keeps no used index to check the base against: it is
            // taken as the frontend set it.
            return Ok(mem.packed_ring(placement).map(Ring::Packed));
        }
        let Some(ring) = mem.ring(placement) else {
            return Ok(None);
        };
        self.sync_with_used_ring(index, queue, &ring, layout);
        Ok(Some(Ring::Split(ring)))
    }

    /// Start a ring where its used index says, once per connection and ring layout.
    ///
    /// A frontend sets the ring base (the next chain to process) with SET_VRING_BASE.
    /// QEMU sets it to where the last connection stopped, which is the used index that
    /// connection left in guest memory: this device completes every chain it takes
    /// before it returns. A frontend that reconnects may set it to 0 while its ring
    /// runs on (DPDK's virtio-user in server mode does): the chains between 0 and the
    /// used index would then be processed twice (frames sent again, stale buffers
    /// filled again). The used index is the truth; start from there.
    fn sync_with_used_ring(
        &mut self,
        index: u16,
        queue: &mut Queue,
        ring: &RingView<'_>,
        layout: RingLayout,
    ) {
        if self.synced == Some(layout) {
            return;
        }
        let used = ring.used_idx();
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
        self.synced = Some(layout);
    }
}

/// A chain taken from the ring: what completes it, and its walk.
struct Taken {
    /// Split: the head's index; packed: the buffer id.
    id: u16,
    /// Ring slots it takes (packed; 1 for split).
    slots: u16,
    /// The chain's length in bytes, or why it was refused.
    walk: Result<usize, ChainError>,
}

/// The available chains not yet taken in this pass.
///
/// Positions are kept as vhost-user carries a ring base: for a split ring the next
/// available index; for a packed ring the next descriptor's position in bits 0–14
/// and the driver's wrap counter in bit 15.
struct AvailCursor {
    queue: u16,
    next: Wrapping<u16>,
    /// Split: the driver's index as last read.
    avail: Wrapping<u16>,
    /// Where the last look found no chain: the kick to ask for.
    empty_at: Wrapping<u16>,
    /// A packed chain without an end stopped the ring at `next`.
    broken: Option<QueueError>,
}

impl AvailCursor {
    fn new(queue_index: u16, queue: &Queue) -> Self {
        let next = Wrapping(queue.next_avail());
        Self {
            queue: queue_index,
            next,
            avail: next,
            empty_at: next,
            broken: None,
        }
    }

    /// Split: read the driver's index again; a driver cannot make more than a ring
    /// available. Packed rings have no index: each descriptor says it is available.
    fn refresh(&mut self, ring: &Ring<'_>) -> Result<(), QueueError> {
        let Ring::Split(ring) = ring else {
            return Ok(());
        };
        let avail = ring.avail_idx();
        if (avail - self.next).0 > ring.size() {
            return Err(QueueError::AvailIndexAhead {
                queue: self.queue,
                avail: avail.0,
                next: self.next.0,
            });
        }
        self.avail = avail;
        // The guest just wrote these descriptors on its own CPU: ask for all their
        // lines at once, so the misses overlap instead of stalling one chain at a time.
        let fresh = (self.avail - self.next).0.min(PREFETCH_BATCH);
        for i in 0..fresh {
            ring.prefetch_descriptor(self.next + Wrapping(i));
        }
        Ok(())
    }

    /// Where the cursor is, to [`Self::rewind`] to.
    fn mark(&self) -> Wrapping<u16> {
        self.next
    }

    /// Put the chains taken since `mark` back.
    fn rewind(&mut self, mark: Wrapping<u16>) {
        self.next = mark;
    }

    /// Take the next available chain and walk it into `pieces` (device-writable
    /// buffers when `write`); starts fetching the buffer of the chain
    /// [`PREFETCH_AHEAD`] behind it into the cache.
    ///
    /// Inlined into its callers: returned through memory, the chain's id and slots
    /// were written as two u16 and read back as one u32, a load the store buffer
    /// cannot forward, which then waits behind the stores to the used ring (A/B,
    /// 64 B packed loopback-1024: 11.6-15.4 Mpps out of line, 14.8-16.3 inlined).
    #[inline(always)]
    fn next_chain(
        &mut self,
        ring: &Ring<'_>,
        rules: ChainRules,
        pieces: &mut Vec<Piece>,
    ) -> Option<Taken> {
        match ring {
            Ring::Split(split) => {
                let Some(head) = self.take_split(split, rules.device_writes) else {
                    self.empty_at = self.next;
                    return None;
                };
                Some(Taken {
                    id: head,
                    slots: 1,
                    walk: walk_chain(split, head, rules, pieces),
                })
            }
            Ring::Packed(packed) => {
                let (position, wrap) = packed_parts(self.next);
                if self.broken.is_some() || !packed.is_available(position, wrap) {
                    self.empty_at = self.next;
                    return None;
                }
                let size = packed.size();
                // Two stages, as for split rings, so neither waits for memory: the
                // descriptors twice as far ahead (a plain prefetch of their line,
                // whatever it holds yet), then the buffer of the chain
                // PREFETCH_AHEAD ahead, whose descriptor the first stage brought in.
                // Reading that descriptor cold cost a quarter of the worker's time
                // in 64 B packed loopback (bench/results/2026-12-03-packed-two-stage.md).
                let (far, _) = packed_parts(packed_advance(self.next, 2 * PREFETCH_AHEAD, size));
                packed.prefetch_descriptor(far);
                let (ahead, ahead_wrap) =
                    packed_parts(packed_advance(self.next, PREFETCH_AHEAD, size));
                packed.prefetch_chain(ahead, ahead_wrap, rules.device_writes);
                let Some(chain) = walk_packed_chain(packed, position, rules, pieces) else {
                    self.broken = Some(QueueError::UnterminatedPackedChain {
                        queue: self.queue,
                        position,
                    });
                    self.empty_at = self.next;
                    return None;
                };
                self.next = packed_advance(self.next, chain.slots, size);
                Some(Taken {
                    id: chain.id,
                    slots: chain.slots,
                    walk: chain.walk,
                })
            }
        }
    }

    /// Head of the next available chain of a split ring.
    fn take_split(&mut self, ring: &RingView<'_>, write: bool) -> Option<u16> {
        if self.next == self.avail {
            return None;
        }
        // Two stages, so neither waits for memory: the descriptor twice as far
        // ahead, then the buffer it points to.
        let available = |position: Wrapping<u16>| {
            let left = (self.avail - position).0;
            left != 0 && left <= ring.size()
        };
        let far = self.next + Wrapping(2 * PREFETCH_AHEAD);
        if available(far) {
            ring.prefetch_descriptor(far);
        }
        let near = self.next + Wrapping(PREFETCH_AHEAD);
        if available(near) {
            ring.prefetch_chain(near, write);
        }
        let head = ring.avail_entry(self.next);
        self.next += Wrapping(1);
        Some(head)
    }

    /// The driver added a chain where the cursor last found none.
    fn more_since_empty(&self, ring: &Ring<'_>) -> bool {
        match ring {
            Ring::Split(split) => split.avail_idx() != self.empty_at,
            Ring::Packed(packed) => {
                let (position, wrap) = packed_parts(self.empty_at);
                self.broken.is_none() && packed.is_available(position, wrap)
            }
        }
    }

    /// The error that stopped the ring in this pass, if one did.
    fn take_error(&mut self) -> Option<QueueError> {
        self.broken.take()
    }
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

/// Whether the frontend lets the device use this ring: started and enabled.
///
/// Asked of the state the pass holds locked, never of a separate look: the frontend
/// stops a ring (GET_VRING_BASE) by clearing `ready` under this lock and replies with
/// the ring's position right after. A pass that looked first and locked later could
/// slip in between and complete chains behind the reply: at the end of a migration,
/// after guest memory was copied for the last time, so the destination would complete
/// them again (`tests/ring_stop.rs`).
fn usable(state: &VringState<GuestMemoryAtomic<GuestMemory>>) -> bool {
    state.is_enabled() && state.get_queue().ready()
}

/// Guest → host.
pub struct TxVirtio {
    queue: u16,
    counters: Arc<DeviceCounters>,
    pieces: Vec<Piece>,
    used: UsedRing,
    errors: ErrorLog,
    ring: PlacedRing,
}

/// Length checks of a transmit chain `len` bytes long.
fn check_frame_len(len: usize, hdr_len: usize) -> Result<usize, ChainError> {
    if len < hdr_len {
        return Err(ChainError::ShorterThanHeader(len));
    }
    if len - hdr_len < ETH_HEADER_LEN {
        return Err(ChainError::ShorterThanEthernetHeader(len - hdr_len));
    }
    Ok(len)
}

impl TxVirtio {
    pub fn new(queue: u16, counters: Arc<DeviceCounters>) -> Self {
        Self {
            queue,
            counters,
            pieces: Vec::with_capacity(MAX_CHAIN_SEGMENTS),
            used: UsedRing::new(USED_BATCH_CAPACITY),
            errors: ErrorLog::new(),
            ring: PlacedRing::default(),
        }
    }

    /// Hand every available frame to `port`, until the ring is empty or the port is busy.
    pub fn process(
        &mut self,
        vring: &Vring,
        mem: &MappedMemory,
        port: &mut dyn Port,
        link: LinkParams,
        kicks: Kicks,
    ) -> Result<TxProgress, QueueError> {
        let mut state = vring.get_mut();
        if !usable(&state) {
            return Ok(TxProgress::default());
        }
        let queue = state.get_queue_mut();
        let Some(ring) = self.ring.view(self.queue, queue, mem, link.packed_ring)? else {
            return Ok(TxProgress::default());
        };
        let event_idx = queue.event_idx_enabled();
        let mut cursor = AvailCursor::new(self.queue, queue);
        let mut delta = CounterDelta::default();
        let mut progress = TxProgress::default();
        self.used.begin(queue, &ring);
        self.used.hand_back_transmit_batches_whole(link.in_order);
        self.ring.suppress_kicks(&ring, event_idx);
        // With EVENT_IDX the guest kicks only when it passes `avail_event`, so after
        // re-arming notifications look again: a frame added in between would
        // otherwise wait for the next kick.
        let result = loop {
            if let Err(e) = cursor.refresh(&ring) {
                break Err(e);
            }
            loop {
                let mark = cursor.mark();
                self.pieces.clear();
                let Some(taken) = cursor.next_chain(&ring, TX_CHAINS, &mut self.pieces) else {
                    break;
                };
                match taken
                    .walk
                    .and_then(|len| check_frame_len(len, link.vnet_hdr_len))
                {
                    Ok(len) => match port.transmit(&GuestFrame::new(mem, &self.pieces, len)) {
                        Ok(TxOutcome::Sent) => {
                            delta.packets += 1;
                            delta.bytes += (len - link.vnet_hdr_len) as u64;
                        }
                        Ok(TxOutcome::Dropped) => delta.drops += 1,
                        Ok(TxOutcome::Filtered) | Ok(TxOutcome::Queued) => {}
                        Ok(TxOutcome::Busy) => {
                            // Leave the chain in the ring; it is offered again later.
                            cursor.rewind(mark);
                            progress.blocked = true;
                            break;
                        }
                        Err(e) => {
                            delta.drops += 1;
                            self.errors.error(self.queue, &format!("host port: {e}"));
                        }
                    },
                    Err(e) => {
                        delta.errors += 1;
                        self.errors.error(self.queue, &e);
                    }
                }
                // Transmit buffers are only read: completed with length 0.
                self.used.push(taken.id, 0, taken.slots);
                if self.used.is_full(&ring) {
                    // A port's queued frames are written before their buffers go back.
                    self.flush_port(port, &mut delta);
                    self.used.publish(&ring);
                }
            }
            // Every way out of this loop passes here after the last chain it took,
            // so no buffer goes back before its frame is written.
            self.flush_port(port, &mut delta);
            if progress.blocked {
                break Ok(());
            }
            self.used.publish(&ring);
            if kicks == Kicks::Suppress || !self.ring.allow_kicks(&ring, event_idx, &cursor) {
                break Ok(());
            }
            self.ring.suppress_kicks(&ring, event_idx);
        };
        let result = result.and(cursor.take_error().map_or(Ok(()), Err));
        queue.set_next_avail(cursor.next.0);
        progress.chains = self.used.completed_in_pass();
        let notify = self.used.finish(queue, &ring);
        signal_if(notify, &state, &mut self.errors, self.queue);
        progress.frames = delta.packets;
        self.counters.queue(self.queue as usize).add(&delta);
        result.map(|()| progress)
    }

    /// Count what the port wrote of the frames it had queued.
    fn flush_port(&mut self, port: &mut dyn Port, delta: &mut CounterDelta) {
        let flushed = port.flush();
        delta.packets += flushed.sent;
        delta.bytes += flushed.bytes;
        delta.drops += flushed.dropped;
        if let Some(e) = flushed.error {
            self.errors.error(self.queue, &format!("host port: {e}"));
        }
    }
}

/// A receive chain taken for the frame being placed.
#[derive(Clone, Copy, Debug)]
struct TakenChain {
    id: u16,
    slots: u16,
    /// One past this chain's last entry in `RxVirtio::pieces`.
    pieces_end: usize,
}

/// Where a frame for the guest comes from.
enum FrameSource<'a> {
    /// A host buffer, virtio-net header first; `num_buffers` is set in place.
    Host(&'a mut [u8]),
    /// The guest's own transmit buffers (the loop port), header first: copied
    /// buffer to buffer, `num_buffers` set in the guest's receive buffer.
    Guest { pieces: &'a [Piece], len: usize },
}

impl FrameSource<'_> {
    fn len(&self) -> usize {
        match self {
            FrameSource::Host(frame) => frame.len(),
            FrameSource::Guest { len, .. } => *len,
        }
    }
}

/// What became of one frame offered to the receive queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placement {
    Delivered,
    /// Not enough guest buffers now; the frame waits.
    NoBuffers,
    /// No buffer the guest can post will ever hold it; the frame is dropped.
    NeverFits,
}

/// Host → guest.
pub struct RxVirtio {
    queue: u16,
    counters: Arc<DeviceCounters>,
    pieces: Vec<Piece>,
    chains: Vec<TakenChain>,
    used: UsedRing,
    errors: ErrorLog,
    ring: PlacedRing,
}

impl RxVirtio {
    pub fn new(queue: u16, counters: Arc<DeviceCounters>) -> Self {
        Self {
            queue,
            counters,
            pieces: Vec::with_capacity(MAX_CHAIN_SEGMENTS),
            chains: Vec::with_capacity(64),
            used: UsedRing::new(USED_BATCH_CAPACITY),
            errors: ErrorLog::new(),
            ring: PlacedRing::default(),
        }
    }

    /// Put the chains taken since `mark` back into the ring.
    fn give_back(&mut self, cursor: &mut AvailCursor, mark: Wrapping<u16>) {
        cursor.rewind(mark);
        self.chains.clear();
        self.pieces.clear();
    }

    /// Copy `frame` (virtio-net header first) into as many guest buffers as it needs.
    fn place(
        &mut self,
        cursor: &mut AvailCursor,
        ring: &Ring<'_>,
        source: &mut FrameSource<'_>,
        link: LinkParams,
        delta: &mut CounterDelta,
    ) -> Placement {
        self.chains.clear();
        self.pieces.clear();
        let need = source.len();
        let rules = ChainRules {
            device_writes: true,
            max_bytes: usize::MAX,
            max_pieces: MAX_CHAIN_SEGMENTS,
        };
        let mut capacity = 0usize;
        let mut mark = cursor.mark();
        while capacity < need {
            let one_buffer_only = !link.mergeable_rx && !self.chains.is_empty();
            if one_buffer_only || self.chains.len() == usize::from(ring.size()) {
                self.give_back(cursor, mark);
                return Placement::NeverFits;
            }
            let Some(taken) = cursor.next_chain(ring, rules, &mut self.pieces) else {
                self.give_back(cursor, mark);
                return Placement::NoBuffers;
            };
            match taken.walk {
                Ok(chain_capacity) => {
                    self.chains.push(TakenChain {
                        id: taken.id,
                        slots: taken.slots,
                        pieces_end: self.pieces.len(),
                    });
                    capacity += chain_capacity;
                }
                Err(e) => {
                    // The ring cannot be rewound past a chain that is completed, so the
                    // buffers taken before the bad one go back empty, then the bad one.
                    // Guests drop used buffers shorter than a header.
                    for earlier in self.chains.drain(..) {
                        self.used.push(earlier.id, 0, earlier.slots);
                    }
                    self.pieces.clear();
                    capacity = 0;
                    self.used.push(taken.id, 0, taken.slots);
                    mark = cursor.mark();
                    delta.errors += 1;
                    self.errors.error(self.queue, &e);
                }
            }
        }

        let num_buffers = (self.chains.len() as u16).to_le_bytes();
        let with_num_buffers = link.vnet_hdr_len == VNET_HDR_LEN_V1;
        let mem = ring.memory();
        let mut offset = 0usize;
        let mut first_piece = 0usize;
        for taken in &self.chains {
            let buffers = &self.pieces[first_piece..taken.pieces_end];
            let written = match source {
                FrameSource::Host(frame) => {
                    if with_num_buffers && offset == 0 {
                        frame[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2]
                            .copy_from_slice(&num_buffers);
                    }
                    mem.write(buffers, 0, &frame[offset..])
                }
                FrameSource::Guest { pieces, len } => {
                    mem.copy(buffers, pieces, offset, *len - offset)
                }
            };
            offset += written;
            first_piece = taken.pieces_end;
            self.used.push(taken.id, written as u32, taken.slots);
        }
        if with_num_buffers && matches!(source, FrameSource::Guest { .. }) {
            // Every chain but the last is full, so the frame's byte n is byte n of the
            // pieces taken together (a frame holds a whole header: checked on transmit).
            mem.write(
                &self.pieces[..first_piece],
                NUM_BUFFERS_OFFSET,
                &num_buffers,
            );
        }
        // Between frames: the buffers of this one are published together.
        self.used.publish_if_full(ring);
        Placement::Delivered
    }

    /// Deliver frames from `port` until it has none or the guest has no buffers.
    pub fn process(
        &mut self,
        vring: &Vring,
        mem: &MappedMemory,
        port: &mut dyn Port,
        link: LinkParams,
        kicks: Kicks,
    ) -> Result<RxProgress, QueueError> {
        let mut state = vring.get_mut();
        if !usable(&state) {
            return Ok(RxProgress::default());
        }
        let queue = state.get_queue_mut();
        let Some(ring) = self.ring.view(self.queue, queue, mem, link.packed_ring)? else {
            return Ok(RxProgress::default());
        };
        let event_idx = queue.event_idx_enabled();
        let mut cursor = AvailCursor::new(self.queue, queue);
        let mut delta = CounterDelta::default();
        let mut progress = RxProgress::default();
        self.used.begin(queue, &ring);
        let result = 'frames: loop {
            if let Err(e) = cursor.refresh(&ring) {
                break Err(e);
            }
            loop {
                let frame = match port.peek_rx() {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break 'frames Ok(()),
                    Err(e) => {
                        delta.drops += 1;
                        self.errors.error(self.queue, &format!("host port: {e}"));
                        break 'frames Ok(());
                    }
                };
                let len = frame.len();
                let mut source = FrameSource::Host(frame);
                match self.place(&mut cursor, &ring, &mut source, link, &mut delta) {
                    Placement::Delivered => {
                        port.consume_rx();
                        delta.packets += 1;
                        delta.bytes += (len - link.vnet_hdr_len) as u64;
                    }
                    Placement::NeverFits => {
                        port.consume_rx();
                        delta.drops += 1;
                    }
                    Placement::NoBuffers => break,
                }
            }
            // Out of buffers: hand back what is done, then ask for a kick when more
            // arrive; if some came in meanwhile, go on.
            self.used.publish(&ring);
            if kicks == Kicks::Arm {
                self.ring.allow_kicks(&ring, event_idx, &cursor);
            }
            if !cursor.more_since_empty(&ring) {
                progress.starved = true;
                break Ok(());
            }
        };
        if !progress.starved || kicks == Kicks::Suppress {
            // Buffers to spare, or the worker polls: no need for a kick each time the
            // guest adds more. A starved pass that leaves kicks on while polling costs
            // the guest a syscall per refill (a driver that refills faster than the
            // port sends leaves every pass starved).
            self.ring.suppress_kicks(&ring, event_idx);
        }
        let result = result.and(cursor.take_error().map_or(Ok(()), Err));
        queue.set_next_avail(cursor.next.0);
        progress.chains = self.used.completed_in_pass();
        let notify = self.used.finish(queue, &ring);
        signal_if(notify, &state, &mut self.errors, self.queue);
        progress.frames = delta.packets;
        self.counters.queue(self.queue as usize).add(&delta);
        result.map(|()| progress)
    }
}

/// The worker state of one queue pair.
pub struct QueuePair {
    tx: TxVirtio,
    rx: RxVirtio,
    port: SharedPort,
    errors: ErrorLog,
    /// The current memory table, translated; rebuilt when the frontend changes it.
    mapped: Option<MappedMemory>,
    /// The port sends every frame back (see `loop_back`).
    loops_back: bool,
    /// The transmit chains `loop_back` took and has not placed yet.
    loop_batch: Vec<loop_back::LoopChain>,
}

impl QueuePair {
    pub fn new(pair: u16, port: SharedPort, counters: Arc<DeviceCounters>) -> Self {
        let loops_back = port.lock().unwrap_or_else(|e| e.into_inner()).loops_back();
        Self {
            rx: RxVirtio::new(2 * pair, Arc::clone(&counters)),
            tx: TxVirtio::new(2 * pair + 1, counters),
            loops_back,
            loop_batch: Vec::with_capacity(loop_back::LOOP_BATCH),
            port,
            errors: ErrorLog::new(),
            mapped: None,
        }
    }

    /// Move frames both ways until nothing moves; says whether anything did
    /// (frames, or chains refused). Called for every kick and every port wake-up
    /// (`port_woke`), and in a loop while the worker polls: a pass over an idle queue
    /// costs one read of its avail index. `kicks` says whether the guest should kick
    /// for what comes next.
    pub fn pump(
        &mut self,
        rx_vring: &Vring,
        tx_vring: &Vring,
        mem: &GuestMemoryLoadGuard<GuestMemory>,
        link: LinkParams,
        port_woke: bool,
        kicks: Kicks,
    ) -> bool {
        if !self.mapped.as_ref().is_some_and(|m| m.is_built_from(mem)) {
            self.mapped = Some(MappedMemory::new(mem.clone().into_inner()));
        }
        let Some(mem) = self.mapped.take() else {
            return false;
        };
        let moved = if self.loops_back {
            self.loop_back(rx_vring, tx_vring, &mem, link, kicks)
        } else {
            self.through_port(rx_vring, tx_vring, &mem, link, port_woke, kicks)
        };
        self.mapped = Some(mem);
        moved
    }

    /// Both directions through the port until nothing moves.
    fn through_port(
        &mut self,
        rx_vring: &Vring,
        tx_vring: &Vring,
        mem: &MappedMemory,
        link: LinkParams,
        port_woke: bool,
        kicks: Kicks,
    ) -> bool {
        let mut port = self.port.lock().unwrap_or_else(|e| e.into_inner());
        if port_woke {
            port.woken();
        }
        let mut moved = false;
        loop {
            let tx = match self.tx.process(tx_vring, mem, port.as_mut(), link, kicks) {
                Ok(progress) => progress,
                Err(e) => {
                    self.errors.error(e.queue(), &e);
                    TxProgress::default()
                }
            };
            let rx = match self.rx.process(rx_vring, mem, port.as_mut(), link, kicks) {
                Ok(progress) => progress,
                Err(e) => {
                    self.errors.error(e.queue(), &e);
                    RxProgress::default()
                }
            };
            moved |= tx.chains > 0 || rx.chains > 0;
            // A loop port that filled up stopped the transmit side; the receive side
            // just made room, so transmit again.
            if !(tx.blocked && rx.frames > 0) {
                return moved;
            }
        }
    }
}

mod loop_back;
#[cfg(test)]
mod tests;
