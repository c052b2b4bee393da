//! `loop`: every frame the guest sends comes back to its own receive queue.
//!
//! Frames wait in a fixed ring of slots between the transmit and the receive side.
//! When the ring is full the port answers `Busy`, so the transmit queue stops and
//! resumes once the guest posted receive buffers: nothing is dropped, which makes
//! the port usable for exact-count tests.

use std::io;
use std::os::unix::io::RawFd;

use super::{GuestFrame, Port, TxOutcome};

/// Frames held between transmit and receive.
const LOOP_SLOTS: usize = 256;

pub struct LoopPort {
    /// Slot buffers grow to the largest frame they held and are reused: no allocation
    /// per frame once warm.
    slots: Vec<Vec<u8>>,
    lens: [usize; LOOP_SLOTS],
    head: usize,
    count: usize,
}

impl LoopPort {
    pub fn new() -> Self {
        Self {
            slots: (0..LOOP_SLOTS).map(|_| Vec::new()).collect(),
            lens: [0; LOOP_SLOTS],
            head: 0,
            count: 0,
        }
    }

    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.count
    }
}

impl Default for LoopPort {
    fn default() -> Self {
        Self::new()
    }
}

impl Port for LoopPort {
    fn transmit(&mut self, frame: &GuestFrame<'_>) -> io::Result<TxOutcome> {
        if self.count == LOOP_SLOTS {
            return Ok(TxOutcome::Busy);
        }
        let index = (self.head + self.count) % LOOP_SLOTS;
        let slot = &mut self.slots[index];
        if slot.len() < frame.len {
            slot.resize(frame.len, 0);
        }
        let copied = frame.read(0, &mut slot[..frame.len]);
        if copied != frame.len {
            return Err(io::Error::other("guest frame shorter than its chain"));
        }
        self.lens[index] = frame.len;
        self.count += 1;
        Ok(TxOutcome::Sent)
    }

    fn peek_rx(&mut self) -> io::Result<Option<&mut [u8]>> {
        if self.count == 0 {
            return Ok(None);
        }
        let len = self.lens[self.head];
        Ok(Some(&mut self.slots[self.head][..len]))
    }

    fn consume_rx(&mut self) {
        if self.count > 0 {
            self.head = (self.head + 1) % LOOP_SLOTS;
            self.count -= 1;
        }
    }

    fn rx_fd(&self) -> Option<RawFd> {
        None
    }

    fn configure(&mut self, _vnet_hdr_len: usize, _acked_features: u64) -> io::Result<()> {
        Ok(())
    }

    fn reset(&mut self) {
        self.head = 0;
        self.count = 0;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::guest_ring::MappedMemory;
    use crate::GuestMemory;

    #[test]
    fn frames_come_back_in_order_and_the_ring_pushes_back() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        mem.write_slice(&[1, 2, 3, 4, 5, 6], GuestAddress(0x100))
            .unwrap();
        mem.write_slice(&[7, 8], GuestAddress(0x200)).unwrap();
        let mapped = MappedMemory::new(Arc::new(mem));
        let mut pieces = Vec::new();
        mapped.translate(0x100, 6, &mut pieces, 2).unwrap();
        mapped.translate(0x200, 2, &mut pieces, 2).unwrap();
        let frame = GuestFrame::new(&mapped, &pieces, 8);
        let mut port = LoopPort::new();
        for _ in 0..LOOP_SLOTS {
            assert_eq!(port.transmit(&frame).unwrap(), TxOutcome::Sent);
        }
        assert_eq!(port.transmit(&frame).unwrap(), TxOutcome::Busy);
        assert_eq!(port.peek_rx().unwrap().unwrap(), &[1, 2, 3, 4, 5, 6, 7, 8]);
        port.consume_rx();
        assert_eq!(port.pending(), LOOP_SLOTS - 1);
        assert_eq!(port.transmit(&frame).unwrap(), TxOutcome::Sent);
        port.reset();
        assert!(port.peek_rx().unwrap().is_none());
    }
}
