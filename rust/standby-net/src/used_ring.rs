//! Completing descriptor chains in batches (DPDK's shadow used ring), for split
//! and packed rings.
//!
//! `virtio-queue`'s `Queue::add_used` stores the used index after every element, and
//! its `needs_notification` only works together with `add_used` (it counts calls).
//! The datapath instead keeps completions here, writes a batch of elements, publishes
//! them with one release store of the index, and decides once per pass whether the
//! guest wants an interrupt. It also honours VRING_AVAIL_F_NO_INTERRUPT, which
//! virtio-queue ignores: polling drivers such as DPDK's set it, and signalling them
//! anyway costs a syscall per batch on both sides.
//!
//! Elements are written through the ring's checked host pointers, and marked dirty
//! with the index for migration (see [`crate::guest_ring`]).

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_bindings::bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_PACKED_EVENT_FLAG_DESC, VRING_PACKED_EVENT_FLAG_DISABLE,
};
use virtio_queue::{Queue, QueueT};

use crate::guest_ring::{PackedRingView, RingView};
use crate::queue_pair::Ring;

/// Publish after this many completions even in the middle of a pass, so the
/// guest gets its buffers back while a long pass goes on.
pub const PUBLISH_EVERY: usize = 32;
/// A packed ring's used descriptors lie in the lines the driver polls and refills:
/// handed back a line (4 descriptors) at a time, each line goes back to the driver
/// soon after the device took it, instead of waiting under a batch of 32 while the
/// driver spins on it (DPDK's vhost hands back its batches of 4 the same way). An
/// A/B run of host-to-guest 64 B on packed rings (15 one-second samples each) gave a
/// median of 13.1 Mpps against 8.9 with 32; the ranges overlap.
const PACKED_PUBLISH_EVERY: usize = 4;

/// Bit 15 of a packed ring position as vhost-user carries it: the wrap counter.
const WRAP_BIT: u16 = 1 << 15;

/// A packed ring position as vhost-user carries it (bits 0–14 the descriptor,
/// bit 15 the wrap counter), split into its parts.
pub fn packed_parts(state: Wrapping<u16>) -> (u16, bool) {
    (state.0 & !WRAP_BIT, state.0 & WRAP_BIT != 0)
}

/// `state` moved on by `slots` descriptors of a ring of `size`; the wrap counter
/// flips each time the position passes the end.
pub fn packed_advance(state: Wrapping<u16>, slots: u16, size: u16) -> Wrapping<u16> {
    let (position, mut wrap) = packed_parts(state);
    let size = u32::from(size.max(1));
    let mut position = u32::from(position) + u32::from(slots);
    while position >= size {
        position -= size;
        wrap = !wrap;
    }
    Wrapping(position as u16 | if wrap { WRAP_BIT } else { 0 })
}

/// One completed chain, not yet written.
#[derive(Clone, Copy, Debug)]
struct Completion {
    id: u16,
    len: u32,
    /// Descriptors the chain took in a packed ring.
    slots: u16,
}

pub struct UsedRing {
    event_idx: bool,
    /// Split: index of the next element to write. Packed: position and wrap
    /// counter of the next used descriptor.
    next_used: Wrapping<u16>,
    /// Chains published since the pass began: the notification covers them all.
    published: u32,
    /// Packed: descriptors handed back since the pass began.
    slots_published: u32,
    /// Packed: each batch goes back as one used descriptor (transmit with IN_ORDER).
    one_per_batch: bool,
    pending: Vec<Completion>,
}

impl UsedRing {
    /// `capacity`: completions held before a publish without reallocating.
    pub fn new(capacity: usize) -> Self {
        Self {
            event_idx: false,
            next_used: Wrapping(0),
            published: 0,
            slots_published: 0,
            one_per_batch: false,
            pending: Vec::with_capacity(capacity),
        }
    }

    /// Start a pass over `queue`.
    pub fn begin(&mut self, queue: &Queue, ring: &Ring<'_>) {
        self.event_idx = queue.event_idx_enabled();
        self.next_used = Wrapping(match ring {
            Ring::Split(_) => queue.next_used(),
            // The device completes every chain it takes within the pass, so a pass
            // starts with the used position where the available one is
            // (SET_VRING_BASE sets only that one).
            Ring::Packed(_) => queue.next_avail(),
        });
        self.published = 0;
        self.slots_published = 0;
        self.one_per_batch = false;
        self.pending.clear();
    }

    /// For this pass's transmit completions (all of length 0) on a driver that
    /// negotiated VIRTIO_F_IN_ORDER: hand each batch of a packed ring back as one used
    /// descriptor, the batch's last buffer id at its first position. The driver then
    /// takes back every buffer up to that id (virtio 1.x, packed rings, "In-order use
    /// of descriptors"), as DPDK's vhost dequeue hands back a burst. Only one line
    /// of the ring is written per batch, not every line the driver is refilling.
    /// A/B, 64 B guest-to-host packed (bench/README.md): 22.7-23.9 Mpps with one
    /// used descriptor per chain, 24.7-25.7 with one per batch of 32.
    pub fn hand_back_transmit_batches_whole(&mut self, in_order: bool) {
        self.one_per_batch = in_order;
    }

    /// Complete chain `id` (a split ring's head; a packed ring's buffer id, taking
    /// `slots` descriptors) with `len` bytes written. Not visible to the guest until
    /// [`UsedRing::publish`].
    pub fn push(&mut self, id: u16, len: u32, slots: u16) {
        self.pending.push(Completion { id, len, slots });
    }

    /// Publish when a batch is full; call only between frames, so the buffers of
    /// one merged frame always appear together.
    pub fn publish_if_full(&mut self, ring: &Ring<'_>) {
        if self.is_full(ring) {
            self.publish(ring);
        }
    }

    /// A batch is full: publish it (between frames).
    pub fn is_full(&self, ring: &Ring<'_>) -> bool {
        let every = match ring {
            Ring::Split(_) => PUBLISH_EVERY,
            Ring::Packed(_) if self.one_per_batch => PUBLISH_EVERY,
            Ring::Packed(_) => PACKED_PUBLISH_EVERY,
        };
        self.pending.len() >= every
    }

    /// Write the pending completions and make them visible at once.
    pub fn publish(&mut self, ring: &Ring<'_>) {
        if self.pending.is_empty() {
            return;
        }
        // A pass never holds more than a ring of completions: each is a chain taken
        // from the ring, and a publish follows at most PUBLISH_EVERY plus one frame.
        let count = self.pending.len().min(usize::from(ring.size()));
        match ring {
            Ring::Split(split) => self.publish_split(split, count),
            Ring::Packed(packed) => self.publish_packed(packed, count),
        }
        self.published = self.published.saturating_add(count as u32);
        self.pending.clear();
    }

    /// Write the elements, then the index once.
    fn publish_split(&mut self, ring: &RingView<'_>, count: usize) {
        let first = self.next_used;
        for done in &self.pending[..count] {
            ring.write_used(self.next_used, done.id, done.len);
            self.next_used += Wrapping(1);
        }
        // Release inside: the guest that sees the new index sees the elements too.
        ring.publish_used(first, count as u16);
    }

    /// Write each used descriptor where its chain began, then hand them back with
    /// the first one's flags last (DPDK's `vhost_flush_enqueue_shadow_packed` does
    /// the same): a driver reads used descriptors in order, so it sees the batch,
    /// and the buffers of a merged frame, whole or not at all.
    fn publish_packed(&mut self, ring: &PackedRingView<'_>, count: usize) {
        if self.one_per_batch {
            self.publish_packed_as_one(ring, count);
            return;
        }
        let size = ring.size();
        let first = self.next_used;
        let mut at = first;
        let mut last = first;
        for done in &self.pending[..count] {
            ring.write_used(packed_parts(at).0, done.id, done.len);
            last = at;
            at = packed_advance(at, done.slots, size);
            self.slots_published += u32::from(done.slots);
        }
        let mut at = first;
        for (i, done) in self.pending[..count].iter().enumerate() {
            if i > 0 {
                let (position, wrap) = packed_parts(at);
                ring.hand_back(position, wrap, done.len > 0, false);
            }
            at = packed_advance(at, done.slots, size);
        }
        let (position, wrap) = packed_parts(first);
        ring.hand_back(position, wrap, self.pending[0].len > 0, true);
        ring.mark_used_dirty(position, packed_parts(last).0);
        self.next_used = at;
    }

    /// One used descriptor for the whole batch: where its first chain began, with
    /// the id of its last.
    fn publish_packed_as_one(&mut self, ring: &PackedRingView<'_>, count: usize) {
        let size = ring.size();
        let first = self.next_used;
        let mut at = first;
        for done in &self.pending[..count] {
            debug_assert_eq!(
                done.len, 0,
                "only transmit completions are handed back whole"
            );
            at = packed_advance(at, done.slots, size);
            self.slots_published += u32::from(done.slots);
        }
        let (position, wrap) = packed_parts(first);
        ring.write_used(position, self.pending[count - 1].id, 0);
        ring.hand_back(position, wrap, false, true);
        ring.mark_used_dirty(position, position);
        self.next_used = at;
    }

    /// Chains completed since [`Self::begin`], published or not.
    pub fn completed_in_pass(&self) -> u16 {
        let all = self.published.saturating_add(self.pending.len() as u32);
        u16::try_from(all).unwrap_or(u16::MAX)
    }

    /// Publish what is left, give the used position back to `queue`, and say
    /// whether the guest asked to be interrupted for what this pass completed.
    pub fn finish(&mut self, queue: &mut Queue, ring: &Ring<'_>) -> bool {
        self.publish(ring);
        queue.set_next_used(self.next_used.0);
        if self.published == 0 {
            return false;
        }
        // The used ring must be visible before the driver's suppression fields are read.
        fence(Ordering::SeqCst);
        match ring {
            Ring::Split(split) => {
                if self.event_idx {
                    // virtio 1.x vring_need_event: interrupt when used_event was passed
                    // (a pass that went round the index space passed it for sure).
                    let Ok(completed) = u16::try_from(self.published) else {
                        return true;
                    };
                    self.next_used - split.used_event() - Wrapping(1) < Wrapping(completed)
                } else {
                    split.avail_flags() & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0
                }
            }
            Ring::Packed(packed) => self.packed_wants_interrupt(packed),
        }
    }

    /// The driver's event suppression (virtio 1.x, 2.8.10): never, always, or once
    /// the device passes one descriptor (with EVENT_IDX).
    fn packed_wants_interrupt(&self, ring: &PackedRingView<'_>) -> bool {
        let (off_wrap, flags) = ring.driver_event();
        if flags == VRING_PACKED_EVENT_FLAG_DISABLE as u16 {
            return false;
        }
        if flags != VRING_PACKED_EVENT_FLAG_DESC as u16 || !self.event_idx {
            return true;
        }
        let size = i32::from(ring.size());
        if self.slots_published >= size.unsigned_abs() {
            return true;
        }
        // On one line: the used positions this pass wrote run from `old` to `new`;
        // an event position of the driver's other round lies a ring before.
        let (new, wrap) = packed_parts(self.next_used);
        let new = i32::from(new);
        let old = new - self.slots_published as i32;
        let (event, event_wrap) = packed_parts(Wrapping(off_wrap));
        let mut event = i32::from(event);
        if event_wrap != wrap {
            event -= size;
        }
        ((new - event - 1) as u16) < ((new - old) as u16)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::guest_ring::{MappedMemory, RingLayout, RingPlacement};
    use crate::queue_pair::Ring;
    use crate::GuestMemory;

    const SIZE: u16 = 8;
    const DESC: u64 = 0x3000;
    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;

    /// Guest memory with one ring of `SIZE` placed in it (packed or split), and its
    /// queue with EVENT_IDX as `event_idx`.
    fn place(packed: bool, event_idx: bool) -> (GuestMemory, MappedMemory, RingPlacement, Queue) {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mapped = MappedMemory::new(Arc::new(mem.clone()));
        let placement = mapped
            .place_ring(&RingLayout {
                desc_table: DESC,
                avail_ring: AVAIL,
                used_ring: USED,
                size: SIZE,
                packed,
            })
            .unwrap();
        let mut queue = Queue::new(SIZE).unwrap();
        queue.set_size(SIZE);
        queue.set_event_idx(event_idx);
        (mem, mapped, placement, queue)
    }

    fn setup(
        event_idx: bool,
        next_used: u16,
    ) -> (GuestMemory, MappedMemory, RingPlacement, Queue, UsedRing) {
        let (mem, mapped, placement, mut queue) = place(false, event_idx);
        queue.set_next_used(next_used);
        let used = UsedRing::new(SIZE as usize);
        (mem, mapped, placement, queue, used)
    }

    fn used_idx(mem: &GuestMemory) -> u16 {
        mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    #[test]
    fn elements_appear_with_one_index_update_and_wrap_around() {
        let (mem, mapped, placement, mut queue, mut used) = setup(false, SIZE - 1);
        let ring = Ring::Split(mapped.ring(&placement).unwrap());
        used.begin(&queue, &ring);
        used.push(3, 64, 1);
        used.push(5, 1500, 1);
        assert_eq!(used_idx(&mem), 0, "nothing visible before publishing");
        used.finish(&mut queue, &ring);
        assert_eq!(used_idx(&mem), SIZE + 1);
        assert_eq!(queue.next_used(), SIZE + 1);
        let last: [u32; 2] = mem.read_obj(GuestAddress(USED + 4 + 8 * 7)).unwrap();
        let wrapped: [u32; 2] = mem.read_obj(GuestAddress(USED + 4)).unwrap();
        assert_eq!((last, wrapped), ([3, 64], [5, 1500]));
    }

    #[test]
    fn no_interrupt_flag_is_honoured_without_event_idx() {
        let (mem, mapped, placement, mut queue, mut used) = setup(false, 0);
        let ring = Ring::Split(mapped.ring(&placement).unwrap());
        used.begin(&queue, &ring);
        used.push(0, 0, 1);
        assert!(used.finish(&mut queue, &ring));
        mem.write_obj(VRING_AVAIL_F_NO_INTERRUPT as u16, GuestAddress(AVAIL))
            .unwrap();
        used.begin(&queue, &ring);
        used.push(1, 0, 1);
        assert!(!used.finish(&mut queue, &ring));
        used.begin(&queue, &ring);
        assert!(
            !used.finish(&mut queue, &ring),
            "nothing completed, nothing to say"
        );
    }

    #[test]
    fn used_event_decides_with_event_idx() {
        let used_event = GuestAddress(AVAIL + 4 + 2 * u64::from(SIZE));
        let (mem, mapped, placement, mut queue, mut used) = setup(true, 10);
        let ring = Ring::Split(mapped.ring(&placement).unwrap());
        used.begin(&queue, &ring);
        // The driver wants an interrupt once entry 11 is used: 10 -> 12 passes it.
        mem.write_obj(11u16, used_event).unwrap();
        used.push(0, 0, 1);
        used.push(1, 0, 1);
        assert!(used.finish(&mut queue, &ring));
        // Entry 20 is far ahead: 12 -> 13 does not reach it.
        mem.write_obj(20u16, used_event).unwrap();
        used.begin(&queue, &ring);
        used.push(2, 0, 1);
        assert!(!used.finish(&mut queue, &ring));
    }

    fn setup_packed(
        event_idx: bool,
        state: u16,
    ) -> (GuestMemory, MappedMemory, RingPlacement, Queue) {
        let (mem, mapped, placement, mut queue) = place(true, event_idx);
        queue.set_next_avail(state);
        (mem, mapped, placement, queue)
    }

    /// `(len, id, flags)` of the packed descriptor at `position`.
    fn packed_desc(mem: &GuestMemory, position: u64) -> (u32, u16, u16) {
        let at = DESC + 16 * position;
        (
            mem.read_obj(GuestAddress(at + 8)).unwrap(),
            mem.read_obj(GuestAddress(at + 12)).unwrap(),
            mem.read_obj(GuestAddress(at + 14)).unwrap(),
        )
    }

    #[test]
    fn packed_used_descriptors_skip_their_chains_and_flip_the_wrap_counter() {
        // Position 6 of round 1; a one-descriptor chain, then a three-descriptor one.
        let (mem, mapped, placement, mut queue) = setup_packed(false, 0x8006);
        let ring = Ring::Packed(mapped.packed_ring(&placement).unwrap());
        let mut used = UsedRing::new(SIZE as usize);
        used.begin(&queue, &ring);
        used.push(3, 64, 1);
        used.push(5, 0, 3);
        assert_eq!(packed_desc(&mem, 6), (0, 0, 0), "nothing before publishing");
        used.finish(&mut queue, &ring);
        // AVAIL and USED both set, as the round-1 wrap counter says; WRITE when written.
        assert_eq!(packed_desc(&mem, 6), (64, 3, 0x8082));
        assert_eq!(packed_desc(&mem, 7), (0, 5, 0x8080));
        assert_eq!(
            queue.next_used(),
            2,
            "position 2 of round 0: 7 + 3 went past the end of 8"
        );
        // The datapath moves the available position along as it takes chains.
        queue.set_next_avail(queue.next_used());
        used.begin(&queue, &ring);
        used.push(9, 10, 1);
        used.finish(&mut queue, &ring);
        assert_eq!(packed_desc(&mem, 0), (0, 0, 0), "skipped with its chain");
        assert_eq!(
            packed_desc(&mem, 2),
            (10, 9, 0x0002),
            "round 0: flags clear"
        );
    }

    #[test]
    fn in_order_transmit_batches_go_back_as_one_used_descriptor() {
        // Position 6 of round 1: chains of 1, 2 and 1 descriptors, ids 3, 4 and 5.
        let (mem, mapped, placement, mut queue) = setup_packed(false, 0x8006);
        let ring = Ring::Packed(mapped.packed_ring(&placement).unwrap());
        let mut used = UsedRing::new(SIZE as usize);
        used.begin(&queue, &ring);
        used.hand_back_transmit_batches_whole(true);
        used.push(3, 0, 1);
        used.push(4, 0, 2);
        used.push(5, 0, 1);
        assert!(used.finish(&mut queue, &ring), "ENABLE: interrupt");
        assert_eq!(
            packed_desc(&mem, 6),
            (0, 5, 0x8080),
            "the last id where the batch began, used in round 1"
        );
        for position in [7, 0, 1] {
            assert_eq!(packed_desc(&mem, position), (0, 0, 0), "not written");
        }
        assert_eq!(queue.next_used(), 2, "6 + 4 went past the end of 8");
        assert_eq!(used.completed_in_pass(), 3);
        // The next pass hands back one chain per chain again unless asked.
        queue.set_next_avail(queue.next_used());
        used.begin(&queue, &ring);
        used.push(6, 0, 1);
        used.push(7, 0, 1);
        used.finish(&mut queue, &ring);
        assert_eq!(packed_desc(&mem, 2), (0, 6, 0));
        assert_eq!(packed_desc(&mem, 3), (0, 7, 0));
    }

    #[test]
    fn packed_driver_event_suppression_decides_the_interrupt() {
        let driver = |mem: &GuestMemory, off_wrap: u16, flags: u16| {
            mem.write_obj([off_wrap, flags], GuestAddress(AVAIL))
                .unwrap();
        };
        let pass = |queue: &mut Queue, mapped: &MappedMemory, placement, n: u16| {
            let ring = Ring::Packed(mapped.packed_ring(placement).unwrap());
            let mut used = UsedRing::new(SIZE as usize);
            used.begin(queue, &ring);
            for id in 0..n {
                used.push(id, 0, 1);
            }
            let notify = used.finish(queue, &ring);
            queue.set_next_avail(queue.next_used());
            notify
        };
        // Round 0, position 2: each pass completes two descriptors.
        let (mem, mapped, placement, mut queue) = setup_packed(true, 0x0002);
        driver(&mem, 0, 0);
        assert!(pass(&mut queue, &mapped, &placement, 2), "ENABLE: always");
        driver(&mem, 0, 1);
        assert!(!pass(&mut queue, &mapped, &placement, 2), "DISABLE: never");
        assert!(!pass(&mut queue, &mapped, &placement, 0), "nothing to say");
        // Now at position 6 of round 0. DESC: once position 6 is used.
        driver(&mem, 6, 2);
        assert!(pass(&mut queue, &mapped, &placement, 2), "6 and 7 used");
        // Now at position 0 of round 1. Position 1 of round 1 is not reached by one.
        driver(&mem, 0x8001, 2);
        assert!(!pass(&mut queue, &mapped, &placement, 1));
        // Position 7 of round 0 lies behind: passed before this pass began.
        driver(&mem, 7, 2);
        assert!(!pass(&mut queue, &mapped, &placement, 1));
        driver(&mem, 0x8002, 2);
        assert!(
            pass(&mut queue, &mapped, &placement, 1),
            "position 2 of round 1"
        );
    }
}
