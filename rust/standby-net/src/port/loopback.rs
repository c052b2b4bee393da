//! `loop`: every frame the guest sends comes back to its own receive queue.
//!
//! The queue pair does the work (`queue_pair/loop_back.rs`): it copies each frame
//! from the guest's transmit buffers straight into its receive buffers, and a frame
//! that finds no receive buffer waits in the transmit ring. Nothing is dropped, which
//! makes the port usable for exact-count tests.

use std::io;
use std::os::unix::io::RawFd;

use super::{GuestFrame, Port, TxOutcome};

#[derive(Default)]
pub struct LoopPort;

impl Port for LoopPort {
    fn transmit(&mut self, _frame: &GuestFrame<'_>) -> io::Result<TxOutcome> {
        Err(io::Error::other(
            "the loop port's frames are copied by its queue pair",
        ))
    }

    fn peek_rx(&mut self) -> io::Result<Option<&mut [u8]>> {
        Ok(None)
    }

    fn consume_rx(&mut self) {}

    fn rx_fd(&self) -> Option<RawFd> {
        None
    }

    fn configure(&mut self, _vnet_hdr_len: usize, _acked_features: u64) -> io::Result<()> {
        Ok(())
    }

    fn reset(&mut self) {}

    fn loops_back(&self) -> bool {
        true
    }
}
