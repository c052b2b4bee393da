//! `loop`: every frame the guest sends comes back to its own receive queue.
//!
//! The queue pair does the work (`queue_pair/loop_back.rs`): it copies each frame
//! from the guest's transmit buffers straight into its receive buffers, and a frame
//! that finds no receive buffer waits in the transmit ring. Nothing is dropped, which
//! makes the port usable for exact-count tests.

use std::io;

use super::{GuestFrame, Port, TxOutcome};

#[derive(Default)]
pub struct LoopPort;

impl Port for LoopPort {
    fn transmit(&mut self, _frame: &GuestFrame<'_>) -> io::Result<TxOutcome> {
        Err(io::Error::other(
            "the loop port's frames are copied by its queue pair",
        ))
    }

    fn loops_back(&self) -> bool {
        true
    }
}
