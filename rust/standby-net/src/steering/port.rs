//! A host port with steering in front: shows steering the head of every frame
//! that crosses the standby and applies its verdict.

use std::io;
use std::os::unix::io::RawFd;
use std::sync::Arc;

use super::frames::{FrameHead, HEAD_LEN};
use super::policy::Verdict;
use super::Steering;
use crate::port::{GuestFrame, Port, TxOutcome};
use crate::virtio_net::VNET_HDR_LEN_V1;

pub struct SteeringPort {
    inner: Box<dyn Port>,
    steering: Arc<Steering>,
    /// The virtio-net header in front of every frame, both ways.
    vnet_hdr_len: usize,
    /// The head of the frame being transmitted, copied out of guest memory.
    head: [u8; HEAD_LEN],
    /// The frame `peek_rx` holds was shown to steering already (it waits for guest
    /// buffers and is peeked again).
    rx_judged: bool,
}

impl SteeringPort {
    pub fn new(inner: Box<dyn Port>, steering: Arc<Steering>) -> Self {
        Self {
            inner,
            steering,
            vnet_hdr_len: VNET_HDR_LEN_V1,
            head: [0; HEAD_LEN],
            rx_judged: false,
        }
    }

    /// Copy the first bytes after the virtio-net header; returns how many.
    fn read_head(&mut self, frame: &GuestFrame<'_>) -> usize {
        frame.read(self.vnet_hdr_len, &mut self.head)
    }

    /// Steering's verdict on the frame `peek_rx` holds (`Pass` when there is none).
    fn host_verdict(&mut self) -> io::Result<Option<Verdict>> {
        let hdr_len = self.vnet_hdr_len;
        let Some(frame) = self.inner.peek_rx()? else {
            return Ok(None);
        };
        let verdict = match frame.get(hdr_len..).and_then(FrameHead::new) {
            Some(head) => self.steering.host_frame(&head),
            None => Verdict::Pass,
        };
        Ok(Some(verdict))
    }
}

impl Port for SteeringPort {
    fn transmit(&mut self, frame: &GuestFrame<'_>) -> io::Result<TxOutcome> {
        if self.steering.active() {
            let len = self.read_head(frame);
            let verdict = match FrameHead::new(&self.head[..len]) {
                Some(head) => self.steering.guest_frame(&head),
                None => Verdict::Pass,
            };
            match verdict {
                Verdict::Pass => {}
                Verdict::HoldBack | Verdict::Consume => return Ok(TxOutcome::Filtered),
            }
        }
        self.inner.transmit(frame)
    }

    fn peek_rx(&mut self) -> io::Result<Option<&mut [u8]>> {
        if self.steering.active() && !self.rx_judged {
            // Probes' answers are steering's own: never delivered to the guest.
            loop {
                match self.host_verdict()? {
                    Some(Verdict::Consume) => self.inner.consume_rx(),
                    Some(_) => {
                        self.rx_judged = true;
                        break;
                    }
                    None => break,
                }
            }
        }
        self.inner.peek_rx()
    }

    fn consume_rx(&mut self) {
        self.rx_judged = false;
        self.inner.consume_rx();
    }

    fn rx_fd(&self) -> Option<RawFd> {
        self.inner.rx_fd()
    }

    fn configure(&mut self, vnet_hdr_len: usize, acked_features: u64) -> io::Result<()> {
        self.inner.configure(vnet_hdr_len, acked_features)?;
        self.vnet_hdr_len = vnet_hdr_len;
        Ok(())
    }

    fn reset(&mut self) {
        self.rx_judged = false;
        self.inner.reset();
        self.vnet_hdr_len = VNET_HDR_LEN_V1;
    }
}
