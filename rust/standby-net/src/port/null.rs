//! `null` and `sink`: count and drop what the guest sends; nothing to receive.
//! `sink` reads each frame out of guest memory first, so a benchmark against a
//! consumer that copies frames (DPDK's rxonly) compares like with like.

use std::io;

use super::{GuestFrame, Port, TxOutcome};
use crate::virtio_net::MAX_HDR_AND_FRAME_LEN;

pub struct NullPort;

impl Port for NullPort {
    fn transmit(&mut self, _frame: &GuestFrame<'_>) -> io::Result<TxOutcome> {
        // Counted as sent by the transmit queue: the guest's frame left the device.
        Ok(TxOutcome::Sent)
    }
}

/// Reads every frame into one scratch buffer, then drops it.
pub struct SinkPort {
    scratch: Vec<u8>,
}

impl SinkPort {
    pub fn new() -> Self {
        Self {
            scratch: vec![0; MAX_HDR_AND_FRAME_LEN],
        }
    }
}

impl Port for SinkPort {
    fn transmit(&mut self, frame: &GuestFrame<'_>) -> io::Result<TxOutcome> {
        let len = frame.len.min(self.scratch.len());
        frame.read(0, &mut self.scratch[..len]);
        // Keep the compiler from dropping a copy nothing looks at.
        std::hint::black_box(&self.scratch[..len]);
        Ok(TxOutcome::Sent)
    }
}
