//! Completing descriptor chains in batches (DPDK's shadow used ring).
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

use virtio_bindings::bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Queue, QueueT};

use crate::guest_ring::RingView;

/// Publish after this many completions even in the middle of a pass, so the
/// guest gets its buffers back while a long pass goes on.
pub const PUBLISH_EVERY: usize = 32;

pub struct UsedRing {
    event_idx: bool,
    /// Index of the next element to write.
    next_used: Wrapping<u16>,
    /// The used index when the pass began: the notification covers everything since.
    pass_start: Wrapping<u16>,
    /// `(id, len)` of each completion not yet written.
    pending: Vec<(u16, u32)>,
}

impl UsedRing {
    /// `capacity`: completions held before a publish without reallocating.
    pub fn new(capacity: usize) -> Self {
        Self {
            event_idx: false,
            next_used: Wrapping(0),
            pass_start: Wrapping(0),
            pending: Vec::with_capacity(capacity),
        }
    }

    /// Start a pass over `queue`.
    pub fn begin(&mut self, queue: &Queue) {
        self.event_idx = queue.event_idx_enabled();
        self.next_used = Wrapping(queue.next_used());
        self.pass_start = self.next_used;
        self.pending.clear();
    }

    /// Complete chain `head` with `len` bytes written. Not visible to the guest
    /// until [`UsedRing::publish`].
    pub fn push(&mut self, head: u16, len: u32) {
        self.pending.push((head, len));
    }

    /// Publish when a batch is full; call only between frames, so the buffers of
    /// one merged frame always appear together.
    pub fn publish_if_full(&mut self, ring: &RingView<'_>) {
        if self.pending.len() >= PUBLISH_EVERY {
            self.publish(ring);
        }
    }

    /// Write the pending elements, then the index once.
    pub fn publish(&mut self, ring: &RingView<'_>) {
        if self.pending.is_empty() {
            return;
        }
        let first = self.next_used;
        // A pass never holds more than a ring of completions: each is a chain taken
        // from the ring, and a publish follows at most PUBLISH_EVERY plus one frame.
        let count = self.pending.len().min(usize::from(ring.size()));
        for &(id, len) in &self.pending[..count] {
            ring.write_used(self.next_used, id, len);
            self.next_used += Wrapping(1);
        }
        self.pending.clear();
        // Release inside: the guest that sees the new index sees the elements too.
        ring.publish_used(first, count as u16);
    }

    /// Chains completed since [`Self::begin`], published or not.
    pub fn completed_in_pass(&self) -> u16 {
        (self.next_used - self.pass_start).0 + self.pending.len() as u16
    }

    /// Publish what is left, give the index back to `queue`, and say whether the
    /// guest asked to be interrupted for what this pass completed.
    pub fn finish(&mut self, queue: &mut Queue, ring: &RingView<'_>) -> bool {
        self.publish(ring);
        queue.set_next_used(self.next_used.0);
        let completed = self.next_used - self.pass_start;
        if completed.0 == 0 {
            return false;
        }
        // The index store must be visible before the driver's suppression fields are read.
        fence(Ordering::SeqCst);
        if self.event_idx {
            // virtio 1.x vring_need_event: interrupt when used_event was passed.
            self.next_used - ring.used_event() - Wrapping(1) < completed
        } else {
            ring.avail_flags() & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::guest_ring::{MappedMemory, RingLayout, RingPlacement};
    use crate::GuestMemory;

    const SIZE: u16 = 8;
    const DESC: u64 = 0x3000;
    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;

    fn setup(
        event_idx: bool,
        next_used: u16,
    ) -> (GuestMemory, MappedMemory, RingPlacement, Queue, UsedRing) {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mapped = MappedMemory::new(Arc::new(mem.clone()));
        let placement = mapped
            .place_ring(&RingLayout {
                desc_table: DESC,
                avail_ring: AVAIL,
                used_ring: USED,
                size: SIZE,
            })
            .unwrap();
        let mut queue = Queue::new(SIZE).unwrap();
        queue.set_size(SIZE);
        queue.set_event_idx(event_idx);
        queue.set_next_used(next_used);
        let mut used = UsedRing::new(SIZE as usize);
        used.begin(&queue);
        (mem, mapped, placement, queue, used)
    }

    fn used_idx(mem: &GuestMemory) -> u16 {
        mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    #[test]
    fn elements_appear_with_one_index_update_and_wrap_around() {
        let (mem, mapped, placement, mut queue, mut used) = setup(false, SIZE - 1);
        let ring = mapped.ring(&placement).unwrap();
        used.push(3, 64);
        used.push(5, 1500);
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
        let ring = mapped.ring(&placement).unwrap();
        used.push(0, 0);
        assert!(used.finish(&mut queue, &ring));
        mem.write_obj(VRING_AVAIL_F_NO_INTERRUPT as u16, GuestAddress(AVAIL))
            .unwrap();
        used.begin(&queue);
        used.push(1, 0);
        assert!(!used.finish(&mut queue, &ring));
        used.begin(&queue);
        assert!(
            !used.finish(&mut queue, &ring),
            "nothing completed, nothing to say"
        );
    }

    #[test]
    fn used_event_decides_with_event_idx() {
        let used_event = GuestAddress(AVAIL + 4 + 2 * u64::from(SIZE));
        let (mem, mapped, placement, mut queue, mut used) = setup(true, 10);
        let ring = mapped.ring(&placement).unwrap();
        // The driver wants an interrupt once entry 11 is used: 10 -> 12 passes it.
        mem.write_obj(11u16, used_event).unwrap();
        used.push(0, 0);
        used.push(1, 0);
        assert!(used.finish(&mut queue, &ring));
        // Entry 20 is far ahead: 12 -> 13 does not reach it.
        mem.write_obj(20u16, used_event).unwrap();
        used.begin(&queue);
        used.push(2, 0);
        assert!(!used.finish(&mut queue, &ring));
    }
}
