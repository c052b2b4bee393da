//! `gen:SIZE[,rate=FPS][,count=N]`: a host→guest source. Numbered frames for the
//! guest, as fast as it posts buffers or at a set rate; what the guest sends is
//! counted and dropped, as by `null`.
//!
//! Each frame goes to the device's MAC from [`GEN_SOURCE_MAC`] with the local
//! experimental EtherType 0x88b5; its payload is the frame's number (big-endian u64,
//! from 0 on each connection) followed by the bytes 0, 1, 2, ... so a receiver can
//! check order and content. One frame buffer is rewritten in place: no allocation per
//! frame.
//!
//! A periodic timer is the port's wake-up descriptor: it starts the flow on a new
//! connection without waiting for a kick, and paces a set rate (1 ms ticks). Without
//! a rate the guest's kicks for new buffers drive it. A tick at which no frame went
//! out since the last one, though one was ready (not held back by the rate), doubles
//! the period, up to [`IDLE_TICK_MAX`]; the next frame that goes out brings it back to
//! 1 ms. A guest that takes nothing costs a few wake-ups a second, not a thousand (3-4 %
//! of a CPU before, bench/README.md). The timer stops once `count` frames went out.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

use super::{GuestFrame, Port, TxOutcome};
use crate::config::{GenSpec, MacAddr};
use crate::virtio_net::NUM_BUFFERS_OFFSET;

/// Source address of generated frames (locally administered).
pub const GEN_SOURCE_MAC: MacAddr = MacAddr([0x02, 0x67, 0x65, 0x6e, 0x00, 0x01]);
/// IEEE 802 local experimental EtherType.
pub const GEN_ETHER_TYPE: u16 = 0x88b5;
const TICK: Duration = Duration::from_millis(1);
/// The longest period of an idle port's timer: how late at worst a flow starts that
/// no kick announced.
const IDLE_TICK_MAX: Duration = Duration::from_millis(128);

pub struct GenPort {
    spec: GenSpec,
    destination: MacAddr,
    /// Virtio-net header (zeroed), then the Ethernet frame.
    frame: Vec<u8>,
    vnet_hdr_len: usize,
    /// Number of the next frame; also how many went out on this connection.
    sequence: u64,
    pacer: Option<Pacer>,
    timer: TimerFd,
    /// The timer's period now: [`TICK`], or longer while no frame goes out.
    tick: Duration,
    /// `sequence` at the last tick.
    sequence_at_tick: u64,
}

impl GenPort {
    pub fn new(spec: GenSpec, destination: MacAddr) -> io::Result<Self> {
        let mut port = Self {
            spec,
            destination,
            frame: Vec::new(),
            vnet_hdr_len: 0,
            sequence: 0,
            pacer: None,
            timer: nonblocking(TimerFd::new()?)?,
            tick: TICK,
            sequence_at_tick: 0,
        };
        port.build_frame();
        port.restart()?;
        Ok(port)
    }

    fn build_frame(&mut self) {
        let size = usize::from(self.spec.size);
        let mut frame = vec![0u8; self.vnet_hdr_len + size];
        let ethernet = &mut frame[self.vnet_hdr_len..];
        ethernet[..6].copy_from_slice(&self.destination.0);
        ethernet[6..12].copy_from_slice(&GEN_SOURCE_MAC.0);
        ethernet[12..14].copy_from_slice(&GEN_ETHER_TYPE.to_be_bytes());
        for (i, byte) in ethernet[22..].iter_mut().enumerate() {
            *byte = i as u8;
        }
        self.frame = frame;
    }

    /// From frame 0 again, paced from now.
    fn restart(&mut self) -> io::Result<()> {
        self.sequence = 0;
        self.sequence_at_tick = 0;
        self.pacer = self.spec.rate.map(|rate| Pacer::new(rate, Instant::now()));
        self.set_tick(TICK)
    }

    fn set_tick(&mut self, tick: Duration) -> io::Result<()> {
        self.tick = tick;
        self.timer
            .reset(tick, Some(tick))
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }

    fn finished(&self) -> bool {
        self.spec.count.is_some_and(|count| self.sequence >= count)
    }
}

impl Port for GenPort {
    fn transmit(&mut self, _frame: &GuestFrame<'_>) -> io::Result<TxOutcome> {
        Ok(TxOutcome::Sent)
    }

    fn peek_rx(&mut self) -> io::Result<Option<&mut [u8]>> {
        if self.finished() {
            // Nothing more to send on this connection: no more wake-ups either.
            if self.timer.is_armed().unwrap_or(false) {
                let _ = self.timer.clear();
            }
            return Ok(None);
        }
        if let Some(pacer) = &mut self.pacer {
            if !pacer.may_send(self.sequence, Instant::now()) {
                return Ok(None);
            }
        }
        let hdr = self.vnet_hdr_len;
        // The caller may have written `num_buffers` into the last frame's header (the
        // only field it writes): zero those two bytes, not the header (a call to
        // memset per frame).
        if hdr >= NUM_BUFFERS_OFFSET + 2 {
            self.frame[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&[0; 2]);
        }
        self.frame[hdr + 14..hdr + 22].copy_from_slice(&self.sequence.to_be_bytes());
        Ok(Some(&mut self.frame))
    }

    fn consume_rx(&mut self) {
        self.sequence += 1;
        if self.tick != TICK && !self.finished() {
            // Frames flow again: pace them, and start the next flow as promptly.
            if let Err(e) = self.set_tick(TICK) {
                log::warn!("gen port: cannot re-arm its timer: {e}");
            }
        }
    }

    fn rx_fd(&self) -> Option<RawFd> {
        Some(self.timer.as_raw_fd())
    }

    fn woken(&mut self) {
        // An unread timer raises no new edge: read its expirations (never blocks).
        let _ = self.timer.wait();
        // Slow down only when the guest held frames back: a paced port with nothing
        // due yet needs its clock.
        let guest_took_nothing = self.sequence == self.sequence_at_tick
            && self
                .pacer
                .as_ref()
                .is_none_or(|pacer| pacer.is_due(self.sequence, Instant::now()));
        if guest_took_nothing && self.tick < IDLE_TICK_MAX && !self.finished() {
            if let Err(e) = self.set_tick((self.tick * 2).min(IDLE_TICK_MAX)) {
                log::warn!("gen port: cannot slow its timer: {e}");
            }
        }
        self.sequence_at_tick = self.sequence;
    }

    fn configure(&mut self, vnet_hdr_len: usize, _acked_features: u64) -> io::Result<()> {
        self.vnet_hdr_len = vnet_hdr_len;
        self.build_frame();
        Ok(())
    }

    fn reset(&mut self) {
        if let Err(e) = self.restart() {
            log::error!("gen port: cannot restart its timer: {e}");
        }
    }
}

fn nonblocking(timer: TimerFd) -> io::Result<TimerFd> {
    let fd = timer.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(timer)
}

/// Frames allowed by a rate since a start time. Credit the guest could not take (no
/// buffers) is forgotten beyond one burst, so a stalled guest is not flooded after.
struct Pacer {
    rate: u64,
    start: Instant,
    /// Frame number counted from at `start`.
    base: u64,
    burst: u64,
}

impl Pacer {
    fn new(rate: u64, start: Instant) -> Self {
        Self {
            rate,
            start,
            base: 0,
            // Ten ticks' worth, and at least one ring burst.
            burst: (rate / 100).max(32),
        }
    }

    /// Frames due by `now`, counted from frame 0.
    fn due(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.start);
        self.base + (elapsed.as_nanos() * u128::from(self.rate) / 1_000_000_000) as u64
    }

    /// Whether frame `sequence` is due (without using up the credit).
    fn is_due(&self, sequence: u64, now: Instant) -> bool {
        sequence < self.due(now)
    }

    fn may_send(&mut self, sequence: u64, now: Instant) -> bool {
        let due = self.due(now);
        if due > sequence + self.burst {
            // Start over from here with a full burst of credit.
            self.start = now;
            self.base = sequence + self.burst;
            return true;
        }
        sequence < due
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

    use super::*;

    fn spec(size: u16, rate: Option<u64>, count: Option<u64>) -> GenSpec {
        GenSpec { size, rate, count }
    }

    const GUEST: MacAddr = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

    #[test]
    fn frames_are_numbered_addressed_to_the_guest_and_stop_at_count() {
        let mut port = GenPort::new(spec(64, None, Some(3)), GUEST).unwrap();
        port.configure(12, 0).unwrap();
        for number in 0..3u64 {
            let frame = port.peek_rx().unwrap().expect("a frame");
            assert_eq!(frame.len(), 12 + 64);
            let (header, ethernet) = frame.split_at(12);
            assert_eq!(header, &[0u8; 12][..]);
            assert_eq!(&ethernet[..6], &GUEST.0);
            assert_eq!(&ethernet[6..12], &GEN_SOURCE_MAC.0);
            assert_eq!(&ethernet[12..14], &[0x88, 0xb5]);
            assert_eq!(&ethernet[14..22], &number.to_be_bytes());
            let pattern: Vec<u8> = (0..42).collect();
            assert_eq!(&ethernet[22..], &pattern[..]);
            frame[10] = 1; // num_buffers, as the receive queue writes it
            port.consume_rx();
        }
        assert!(port.peek_rx().unwrap().is_none(), "count reached");
        assert!(!port.timer.is_armed().unwrap(), "no more wake-ups");
        port.reset();
        let again = port
            .peek_rx()
            .unwrap()
            .expect("a new connection starts over");
        assert_eq!(&again[12 + 14..12 + 22], &0u64.to_be_bytes());
    }

    /// An epoll watching the port's descriptor as a worker does (edge-triggered).
    fn watch(port: &GenPort) -> Epoll {
        let epoll = Epoll::new().unwrap();
        let watched = EventSet::IN | EventSet::EDGE_TRIGGERED;
        let fd = port.rx_fd().unwrap();
        epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(watched, 7))
            .unwrap();
        epoll
    }

    #[test]
    fn the_timer_wakes_its_watcher_every_tick_once_read() {
        let mut port = GenPort::new(spec(64, Some(10), None), GUEST).unwrap();
        let epoll = watch(&port);
        let mut events = [EpollEvent::default(); 2];
        for _ in 0..5 {
            assert_eq!(epoll.wait(100, &mut events).unwrap(), 1, "a tick");
            port.woken();
        }
        port.woken(); // nothing to read: must not block
    }

    #[test]
    fn a_paced_port_keeps_its_clock_while_no_frame_is_due_and_slows_when_one_is_held_back() {
        // 10 frames a second: the first is due after 100 ms.
        let mut port = GenPort::new(spec(64, Some(10), None), GUEST).unwrap();
        port.configure(12, 0).unwrap();
        for _ in 0..5 {
            port.woken();
        }
        assert_eq!(port.tick, TICK, "nothing was due, so nothing was held back");
        std::thread::sleep(Duration::from_millis(120));
        port.woken();
        assert_eq!(
            port.tick,
            2 * TICK,
            "a frame was due and the guest took none"
        );
        port.peek_rx().unwrap().expect("the frame due");
        port.consume_rx();
        assert_eq!(port.tick, TICK);
    }

    #[test]
    fn a_port_nobody_takes_frames_from_slows_its_timer_and_the_next_frame_speeds_it_up() {
        let mut port = GenPort::new(spec(64, None, None), GUEST).unwrap();
        port.configure(12, 0).unwrap();
        let epoll = watch(&port);
        let mut events = [EpollEvent::default(); 2];
        let mut tick = |port: &mut GenPort| {
            assert_eq!(epoll.wait(1000, &mut events).unwrap(), 1, "a tick");
            port.woken();
        };
        let started = Instant::now();
        let mut ticks = Vec::new();
        for _ in 0..7 {
            tick(&mut port);
            ticks.push(port.tick.as_millis());
        }
        assert_eq!(
            ticks,
            [2, 4, 8, 16, 32, 64, 128],
            "doubled at each idle tick"
        );
        assert!(started.elapsed() >= Duration::from_millis(120));
        tick(&mut port);
        assert_eq!(
            port.tick, IDLE_TICK_MAX,
            "no longer than the longest period"
        );

        // A frame goes out: ticks every millisecond again, and a tick that saw one
        // keeps them so.
        port.peek_rx().unwrap().expect("a frame");
        port.consume_rx();
        assert_eq!(port.tick, TICK);
        let asked = Instant::now();
        tick(&mut port);
        assert!(
            asked.elapsed() < Duration::from_millis(100),
            "the next tick is due in 1 ms"
        );
        assert_eq!(port.tick, TICK, "a frame went out since the last tick");
    }

    #[test]
    fn a_frame_not_consumed_is_offered_again() {
        let mut port = GenPort::new(spec(60, None, None), GUEST).unwrap();
        port.configure(10, 0).unwrap();
        let first = port.peek_rx().unwrap().unwrap().to_vec();
        assert_eq!(port.peek_rx().unwrap().unwrap(), &first[..]);
    }

    #[test]
    fn the_pacer_allows_the_rate_and_forgets_credit_beyond_a_burst() {
        let start = Instant::now();
        let mut pacer = Pacer::new(1000, start);
        assert!(!pacer.may_send(0, start), "nothing due at the start");
        let at = |ms| start + Duration::from_millis(ms);
        assert!(pacer.may_send(0, at(1)));
        assert!(!pacer.may_send(1, at(1)), "one frame a millisecond");
        assert!(pacer.may_send(9, at(10)));
        assert!(!pacer.may_send(10, at(10)));
        // A guest without buffers for a second: 1000 frames due, 32 kept as credit.
        assert!(pacer.may_send(10, at(1010)));
        assert!(pacer.may_send(41, at(1010)));
        assert!(!pacer.may_send(42, at(1010)), "credit is one burst");
        assert!(pacer.may_send(42, at(1011)));
    }
}
