//! `null`: count and drop what the guest sends; nothing to receive.

use std::io;
use std::os::unix::io::RawFd;

use super::{GuestFrame, Port, TxOutcome};

pub struct NullPort;

impl Port for NullPort {
    fn transmit(&mut self, _frame: &GuestFrame<'_>) -> io::Result<TxOutcome> {
        // Counted as sent by the transmit queue: the guest's frame left the device.
        Ok(TxOutcome::Sent)
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
}
