//! Completing descriptor chains in batches.
//!
//! `virtio-queue`'s `Queue::add_used` stores the used index after every element, and
//! its `needs_notification` only works together with `add_used` (it counts calls).
//! The datapath instead writes a batch of elements, publishes them with one release
//! store of the index, and decides once per pass whether the guest wants an
//! interrupt. It also honours VRING_AVAIL_F_NO_INTERRUPT, which virtio-queue ignores:
//! polling drivers such as DPDK's set it, and signalling them anyway costs a syscall
//! per batch on both sides. `bench/vhost_throughput.py` measures the difference.
//!
//! Elements are written through vm-memory, so they are range-checked and logged
//! for migration like every other write.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_bindings::bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Error, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::GuestMemory;

/// Publish after this many completions even in the middle of a pass, so the
/// guest gets its buffers back while a long pass goes on.
pub const PUBLISH_EVERY: usize = 32;

/// Offsets inside the split rings (virtio 1.x, 2.7).
const RING_HEADER: u64 = 4;
const USED_ELEM_SIZE: u64 = 8;
const AVAIL_ELEM_SIZE: u64 = 2;

pub struct UsedRing {
    used: GuestAddress,
    avail: GuestAddress,
    size: u16,
    event_idx: bool,
    /// Index of the next element to write.
    next_used: Wrapping<u16>,
    /// The used index when the pass began: the notification covers everything since.
    pass_start: Wrapping<u16>,
    /// `[id, len]` of each completion, little-endian as the ring stores them.
    pending: Vec<[u32; 2]>,
}

impl UsedRing {
    /// `capacity`: completions held before a publish without reallocating.
    pub fn new(capacity: usize) -> Self {
        Self {
            used: GuestAddress(0),
            avail: GuestAddress(0),
            size: 1,
            event_idx: false,
            next_used: Wrapping(0),
            pass_start: Wrapping(0),
            pending: Vec::with_capacity(capacity),
        }
    }

    /// Start a pass over `queue`, whose rings were checked to lie in guest memory.
    pub fn begin(&mut self, queue: &Queue) {
        self.used = GuestAddress(queue.used_ring());
        self.avail = GuestAddress(queue.avail_ring());
        self.size = queue.size().max(1);
        self.event_idx = queue.event_idx_enabled();
        self.next_used = Wrapping(queue.next_used());
        self.pass_start = self.next_used;
        self.pending.clear();
    }

    /// Complete chain `head` with `len` bytes written. Not visible to the guest
    /// until [`UsedRing::publish`].
    pub fn push(&mut self, head: u16, len: u32) {
        self.pending.push([u32::from(head).to_le(), len.to_le()]);
    }

    /// Publish when a batch is full; call only between frames, so the buffers of
    /// one merged frame always appear together.
    pub fn publish_if_full(&mut self, mem: &GuestMemory) -> Result<(), Error> {
        if self.pending.len() >= PUBLISH_EVERY {
            self.publish(mem)?;
        }
        Ok(())
    }

    /// Write the pending elements, then the index once.
    pub fn publish(&mut self, mem: &GuestMemory) -> Result<(), Error> {
        if self.pending.is_empty() {
            return Ok(());
        }
        for elem in self.pending.drain(..) {
            let slot = u64::from(self.next_used.0 % self.size);
            let addr = self
                .used
                .checked_add(RING_HEADER + slot * USED_ELEM_SIZE)
                .ok_or(Error::AddressOverflow)?;
            mem.write_obj(elem, addr).map_err(Error::GuestMemory)?;
            self.next_used += Wrapping(1);
        }
        // Release: the guest that sees the new index sees the elements too.
        mem.store(
            u16::to_le(self.next_used.0),
            self.used.unchecked_add(2),
            Ordering::Release,
        )
        .map_err(Error::GuestMemory)
    }

    /// Publish what is left, give the index back to `queue`, and say whether the
    /// guest asked to be interrupted for what this pass completed.
    pub fn finish(&mut self, queue: &mut Queue, mem: &GuestMemory) -> Result<bool, Error> {
        self.publish(mem)?;
        queue.set_next_used(self.next_used.0);
        let completed = self.next_used - self.pass_start;
        if completed.0 == 0 {
            return Ok(false);
        }
        // The index store must be visible before the driver's suppression fields are read.
        fence(Ordering::SeqCst);
        if self.event_idx {
            // used_event sits after the avail ring's entries.
            let used_event = self
                .avail
                .unchecked_add(RING_HEADER + AVAIL_ELEM_SIZE * u64::from(self.size));
            let event = Wrapping(u16::from_le(
                mem.load::<u16>(used_event, Ordering::Relaxed)
                    .map_err(Error::GuestMemory)?,
            ));
            // virtio 1.x vring_need_event: interrupt when used_event was passed.
            Ok(self.next_used - event - Wrapping(1) < completed)
        } else {
            let flags = u16::from_le(
                mem.load::<u16>(self.avail, Ordering::Relaxed)
                    .map_err(Error::GuestMemory)?,
            );
            Ok(flags & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u16 = 8;
    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;

    fn setup(event_idx: bool, next_used: u16) -> (GuestMemory, Queue, UsedRing) {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut queue = Queue::new(SIZE).unwrap();
        queue.set_size(SIZE);
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        queue.set_event_idx(event_idx);
        queue.set_next_used(next_used);
        let mut used = UsedRing::new(SIZE as usize);
        used.begin(&queue);
        (mem, queue, used)
    }

    fn used_idx(mem: &GuestMemory) -> u16 {
        mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    #[test]
    fn elements_appear_with_one_index_update_and_wrap_around() {
        let (mem, mut queue, mut used) = setup(false, SIZE - 1);
        used.push(3, 64);
        used.push(5, 1500);
        assert_eq!(used_idx(&mem), 0, "nothing visible before publishing");
        used.finish(&mut queue, &mem).unwrap();
        assert_eq!(used_idx(&mem), SIZE + 1);
        assert_eq!(queue.next_used(), SIZE + 1);
        let last: [u32; 2] = mem.read_obj(GuestAddress(USED + 4 + 8 * 7)).unwrap();
        let wrapped: [u32; 2] = mem.read_obj(GuestAddress(USED + 4)).unwrap();
        assert_eq!((last, wrapped), ([3, 64], [5, 1500]));
    }

    #[test]
    fn no_interrupt_flag_is_honoured_without_event_idx() {
        let (mem, mut queue, mut used) = setup(false, 0);
        used.push(0, 0);
        assert!(used.finish(&mut queue, &mem).unwrap());
        mem.write_obj(VRING_AVAIL_F_NO_INTERRUPT as u16, GuestAddress(AVAIL))
            .unwrap();
        used.begin(&queue);
        used.push(1, 0);
        assert!(!used.finish(&mut queue, &mem).unwrap());
        used.begin(&queue);
        assert!(
            !used.finish(&mut queue, &mem).unwrap(),
            "nothing completed, nothing to say"
        );
    }

    #[test]
    fn used_event_decides_with_event_idx() {
        let used_event = GuestAddress(AVAIL + 4 + 2 * u64::from(SIZE));
        let (mem, mut queue, mut used) = setup(true, 10);
        // The driver wants an interrupt once entry 11 is used: 10 -> 12 passes it.
        mem.write_obj(11u16, used_event).unwrap();
        used.push(0, 0);
        used.push(1, 0);
        assert!(used.finish(&mut queue, &mem).unwrap());
        // Entry 20 is far ahead: 12 -> 13 does not reach it.
        mem.write_obj(20u16, used_event).unwrap();
        used.begin(&queue);
        used.push(2, 0);
        assert!(!used.finish(&mut queue, &mem).unwrap());
    }
}
