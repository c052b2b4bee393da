//! A host port with steering in front: shows steering the head of every frame
//! that crosses the standby and applies its verdict.

use std::io;
use std::os::unix::io::RawFd;
use std::sync::Arc;

use super::frames::{FrameHead, HEAD_LEN};
use super::policy::Verdict;
use super::Steering;
use crate::port::{FlushedFrames, GuestFrame, Port, TxOutcome};
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

    fn flush(&mut self) -> FlushedFrames {
        self.inner.flush()
    }

    fn peek_rx(&mut self) -> io::Result<Option<&mut [u8]>> {
        if !self.steering.active() || self.rx_judged {
            return self.inner.peek_rx();
        }
        // Probes' answers are steering's own: never delivered to the guest.
        loop {
            match self.host_verdict()? {
                Some(Verdict::Consume) => self.inner.consume_rx(),
                Some(_) => {
                    self.rx_judged = true;
                    // The frame just judged, held by the inner port (no new read).
                    return self.inner.peek_rx();
                }
                // Found empty: say so, rather than peek again and hand on, unjudged,
                // a frame that arrived in between.
                None => return Ok(None),
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MacAddr;
    use crate::port::open_tap_queues;
    use crate::status::DeviceStatus;
    use crate::steering::{HostSide, Mode};

    const GUEST: MacAddr = MacAddr([0x52, 0x54, 0x00, 0xfb, 0x00, 0x42]);

    /// A host port whose first read finds it empty and whose next read finds
    /// `arriving`: a frame that lands between two reads.
    struct ArrivesBetweenReads {
        arriving: Option<Vec<u8>>,
        reads: u32,
        held: Option<Vec<u8>>,
    }

    impl Port for ArrivesBetweenReads {
        fn transmit(&mut self, _frame: &GuestFrame<'_>) -> io::Result<TxOutcome> {
            Ok(TxOutcome::Sent)
        }

        fn peek_rx(&mut self) -> io::Result<Option<&mut [u8]>> {
            if self.held.is_none() {
                self.reads += 1;
                if self.reads > 1 {
                    self.held = self.arriving.take();
                }
            }
            Ok(self.held.as_deref_mut())
        }

        fn consume_rx(&mut self) {
            self.held = None;
        }
    }

    /// The guest answering the probe, as it comes from the host side: after the
    /// virtio-net header, Ethernet to the probe's MAC from the guest's.
    fn answer_to(probe: MacAddr) -> Vec<u8> {
        let mut frame = vec![0u8; VNET_HDR_LEN_V1];
        frame.extend_from_slice(&probe.0);
        frame.extend_from_slice(&GUEST.0);
        frame.extend_from_slice(&[0x08, 0x06]);
        frame.resize(VNET_HDR_LEN_V1 + 60, 0);
        frame
    }

    #[test]
    fn a_frame_arriving_between_two_reads_is_judged_before_the_guest_sees_it() {
        // Steering needs the host side of a real TAP (root, /dev/net/tun), as in CI.
        let name = format!("fbsp{}", std::process::id() % 100_000);
        let tap = open_tap_queues(&name, 1, 1500).expect("a TAP (run the tests as root)");
        let status = Arc::new(DeviceStatus::new(0, 0).unwrap());
        let host = HostSide {
            writer: tap.host_writer,
            injector: tap.injector,
        };
        let steering = Steering::new(GUEST, host, status);
        steering.set_mode(Mode::Primary, "test");
        let probe = steering.status().probe_mac;
        let inner = ArrivesBetweenReads {
            arriving: Some(answer_to(probe)),
            reads: 0,
            held: None,
        };
        let mut port = SteeringPort::new(Box::new(inner), Arc::clone(&steering));

        // Empty at first look: nothing for the guest.
        assert!(port.peek_rx().unwrap().is_none());
        // The answer arrived meanwhile: steering's, never the guest's.
        assert!(port.peek_rx().unwrap().is_none());
        assert_eq!(steering.status().answers, 1);
    }
}
