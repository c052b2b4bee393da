//! Steering the host's switch to whichever path carries the guest's traffic.
//!
//! The rules are in [`policy`]; this module runs them: a [`SteeringPort`] around
//! each host port shows the policy what crosses the standby and applies its
//! verdicts, and a thread sends the announcements and probes it asks for, on the
//! host side through the TAP ([`HostWriter`]) or toward the guest through the
//! TAP's receive queue ([`TapInjector`]).
//!
//! Whatever the mode (but `off`), a frame of the guest's own that comes back from
//! the switch is not delivered to it: the guest's failover master and both slaves
//! share one MAC, so it would see a duplicate of its own addresses.
//!
//! The datapath pays for steering only on frames that matter: the mode's interest
//! is kept in atomic flags (set after every change of the policy), and the policy's
//! lock is taken only for a probe's answer or for a frame the mode waits for (the
//! guest's traffic through the standby while it releases its primary).
//!
//! Probes need an address of the guest's: its IPv6 link-local address (modified
//! EUI-64 of its MAC, Linux's default), and the IPv4 addresses seen in its ARP
//! packets (either way across the standby) or, until one is known, in its IPv4
//! traffic. A guest with neither is steered by the controller's modes alone.

mod frames;
mod policy;
mod port;

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

pub use policy::{Mode, Path};
pub use port::SteeringPort;

use frames::{arp_probe, link_local, neighbor_solicitation, rarp_announcement, FrameHead};

use crate::config::MacAddr;
use crate::port::{HostWriter, TapInjector};
use crate::status::{DeviceEvent, DeviceStatus};
use policy::{Action, Announce, Direction, GuestFrame, HostFrame, Policy, Verdict};

/// IPv4 addresses of the guest's kept for probing (the latest first).
const MAX_GUEST_ADDRESSES: usize = 4;
/// The thread's longest sleep when nothing is scheduled (it is woken for changes).
const IDLE_WAIT: Duration = Duration::from_secs(3600);

/// Flags the datapath reads without the policy's lock (see [`Policy`]'s methods of
/// the same names).
const ACTIVE: u8 = 1;
const HOLD_CHATTER: u8 = 2;
const HOLD_DAD: u8 = 4;
const WATCH_GUEST_TRAFFIC: u8 = 8;
const WATCH_GUEST_ELSEWHERE: u8 = 16;

/// How steering reaches both sides of a TAP.
pub struct HostSide {
    pub writer: HostWriter,
    pub injector: TapInjector,
}

/// Counters and state for readers (Python, logs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SteeringStatus {
    pub mode: Mode,
    pub path: Path,
    pub probe_mac: MacAddr,
    pub guest_addresses: Vec<Ipv4Addr>,
    pub announcements: u64,
    pub probes: u64,
    pub answers: u64,
    pub held_back: u64,
    /// Frames of the guest's own that came back from the switch (not delivered).
    pub looped: u64,
}

#[derive(Default)]
struct Counters {
    announcements: AtomicU64,
    probes: AtomicU64,
    answers: AtomicU64,
    held_back: AtomicU64,
    looped: AtomicU64,
}

/// The steering of one device, shared by its ports and its thread.
pub struct Steering {
    guest_mac: MacAddr,
    /// The source of probes, so their answers come back to this standby only.
    probe_mac: MacAddr,
    host: HostSide,
    flags: AtomicU8,
    policy: Mutex<Policy>,
    changed: Condvar,
    addresses: Mutex<Vec<Ipv4Addr>>,
    knows_address: AtomicBool,
    counters: Counters,
    status: Arc<DeviceStatus>,
    stopping: AtomicBool,
}

impl Steering {
    pub fn new(guest_mac: MacAddr, host: HostSide, status: Arc<DeviceStatus>) -> Arc<Self> {
        Arc::new(Self {
            guest_mac,
            probe_mac: MacAddr::random(),
            host,
            flags: AtomicU8::new(0),
            policy: Mutex::new(Policy::default()),
            changed: Condvar::new(),
            addresses: Mutex::new(Vec::new()),
            knows_address: AtomicBool::new(false),
            counters: Counters::default(),
            status,
            stopping: AtomicBool::new(false),
        })
    }

    fn lock_policy(&self) -> MutexGuard<'_, Policy> {
        self.policy.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run `f` on the policy, then republish its flags and wake the thread.
    fn with_policy<T>(&self, f: impl FnOnce(&mut Policy) -> T) -> T {
        let mut policy = self.lock_policy();
        let result = f(&mut policy);
        self.publish_flags(&policy);
        drop(policy);
        self.changed.notify_all();
        result
    }

    fn publish_flags(&self, policy: &Policy) {
        let mut flags = 0;
        if policy.mode() != Mode::Off {
            flags |= ACTIVE;
        }
        if policy.holds_chatter() {
            flags |= HOLD_CHATTER;
        }
        if policy.holds_dad() {
            flags |= HOLD_DAD;
        }
        if policy.watches_guest_traffic() {
            flags |= WATCH_GUEST_TRAFFIC;
        }
        if policy.watches_guest_elsewhere() {
            flags |= WATCH_GUEST_ELSEWHERE;
        }
        self.flags.store(flags, Ordering::Release);
    }

    /// Whether any of the bits of `flag` is set.
    fn flag(&self, flag: u8) -> bool {
        self.flags.load(Ordering::Acquire) & flag != 0
    }

    /// The controller's word on the guest's primary.
    pub fn set_mode(&self, mode: Mode, reason: &str) {
        self.status.push(DeviceEvent::SteeringMode {
            mode: mode.as_str(),
            reason: reason.to_string(),
        });
        self.with_policy(|policy| policy.set_mode(mode, Instant::now(), reason));
    }

    pub fn status(&self) -> SteeringStatus {
        let policy = self.lock_policy();
        SteeringStatus {
            mode: policy.mode(),
            path: policy.path(),
            probe_mac: self.probe_mac,
            guest_addresses: self.guest_addresses(),
            announcements: self.counters.announcements.load(Ordering::Relaxed),
            probes: self.counters.probes.load(Ordering::Relaxed),
            answers: self.counters.answers.load(Ordering::Relaxed),
            held_back: self.counters.held_back.load(Ordering::Relaxed),
            looped: self.counters.looped.load(Ordering::Relaxed),
        }
    }

    fn guest_addresses(&self) -> Vec<Ipv4Addr> {
        self.addresses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn learn_address(&self, address: Ipv4Addr) {
        if address.is_unspecified() || address.is_multicast() || address.is_broadcast() {
            return;
        }
        let mut addresses = self.addresses.lock().unwrap_or_else(|e| e.into_inner());
        if addresses.first() == Some(&address) {
            return;
        }
        addresses.retain(|a| *a != address);
        addresses.insert(0, address);
        addresses.truncate(MAX_GUEST_ADDRESSES);
        self.knows_address.store(true, Ordering::Release);
        log::debug!("guest {} uses {address}", self.guest_mac);
    }

    /// Whether the datapath should show this device's frames to steering at all.
    pub fn active(&self) -> bool {
        self.flag(ACTIVE)
    }

    /// A frame the guest sent through the standby.
    fn guest_frame(&self, head: &FrameHead<'_>) -> Verdict {
        if let Some((mac, address)) = head.arp_sender() {
            if mac == self.guest_mac {
                self.learn_address(address);
            }
        } else if !self.knows_address.load(Ordering::Acquire) && head.source() == self.guest_mac {
            if let Some((source, _)) = head.ipv4_addresses() {
                self.learn_address(source);
            }
        }
        let kind = if head.destination() == self.probe_mac {
            GuestFrame::ProbeAnswer
        } else if head.is_dad_probe() {
            GuestFrame::DadProbe
        } else if head.is_ipv6_multicast() {
            GuestFrame::Chatter
        } else {
            GuestFrame::Traffic
        };
        match kind {
            GuestFrame::ProbeAnswer => {
                self.counters.answers.fetch_add(1, Ordering::Relaxed);
                self.with_policy(|p| p.on_guest_frame(kind, Instant::now()))
            }
            GuestFrame::Chatter if self.flag(HOLD_CHATTER) => self.hold_back(),
            GuestFrame::DadProbe if self.flag(HOLD_CHATTER | HOLD_DAD) => self.hold_back(),
            GuestFrame::Traffic if self.flag(WATCH_GUEST_TRAFFIC) => {
                self.with_policy(|p| p.on_guest_frame(kind, Instant::now()))
            }
            _ => Verdict::Pass,
        }
    }

    fn hold_back(&self) -> Verdict {
        self.counters.held_back.fetch_add(1, Ordering::Relaxed);
        Verdict::HoldBack
    }

    /// A frame from the host's switch, on its way to the guest.
    fn host_frame(&self, head: &FrameHead<'_>) -> Verdict {
        let from_guest = head.source() == self.guest_mac;
        let to_probe = head.destination() == self.probe_mac;
        if let Some((mac, address)) = head.arp_sender() {
            if mac == self.guest_mac {
                self.learn_address(address);
            }
        } else if !self.knows_address.load(Ordering::Acquire)
            && head.destination() == self.guest_mac
        {
            if let Some((_, destination)) = head.ipv4_addresses() {
                self.learn_address(destination);
            }
        }
        if from_guest {
            if to_probe {
                self.counters.answers.fetch_add(1, Ordering::Relaxed);
            } else {
                self.counters.looped.fetch_add(1, Ordering::Relaxed);
            }
            if self.flag(WATCH_GUEST_ELSEWHERE) {
                let frame = HostFrame::FromGuest {
                    announcement: head.is_rarp(),
                    to_probe,
                };
                self.with_policy(|p| p.on_host_frame(frame, Instant::now()));
            }
            // The guest's own frame, back from another of its ports: delivered, it
            // would make the guest see a duplicate of its own addresses.
            return Verdict::Consume;
        }
        if to_probe {
            Verdict::Consume
        } else {
            Verdict::Pass
        }
    }

    /// Announce the guest's MAC on the host side now, `count` times.
    pub fn announce(&self, count: u32) -> std::io::Result<u32> {
        let frame = rarp_announcement(self.guest_mac);
        for _ in 0..count {
            self.host.writer.send(&frame)?;
            self.counters.announcements.fetch_add(1, Ordering::Relaxed);
        }
        Ok(count)
    }

    pub fn interface(&self) -> &str {
        self.host.writer.interface()
    }

    fn probe(&self, direction: Direction) {
        let mut frames: Vec<Vec<u8>> = self
            .guest_addresses()
            .into_iter()
            .map(|address| arp_probe(self.probe_mac, address).to_vec())
            .collect();
        frames.push(neighbor_solicitation(self.probe_mac, link_local(self.guest_mac)).to_vec());
        for frame in &frames {
            let sent = match direction {
                Direction::ThroughSwitch => self.host.writer.send(frame),
                Direction::IntoGuest => self.host.injector.send(frame),
            };
            match sent {
                Ok(()) => {
                    self.counters.probes.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => log::debug!("{}: cannot send a probe: {e}", self.interface()),
            }
        }
    }

    fn perform(&self, action: Action) {
        match action {
            Action::Announce(why) => match self.announce(1) {
                Ok(frames) => match why {
                    Announce::First | Announce::Counter => {
                        self.status.push(DeviceEvent::Announced {
                            frames,
                            answering: why == Announce::Counter,
                        })
                    }
                    Announce::Repeat => {}
                },
                Err(e) => log::warn!("{}: cannot announce the guest: {e}", self.interface()),
            },
            Action::Probe(direction) => self.probe(direction),
        }
    }

    /// The thread that sends what the policy schedules; returns when stopped.
    pub fn spawn(self: &Arc<Self>) -> std::io::Result<SteeringThread> {
        self.stopping.store(false, Ordering::Release);
        let steering = Arc::clone(self);
        let thread = thread::Builder::new()
            .name("steering".to_string())
            .spawn(move || steering.run())?;
        Ok(SteeringThread {
            steering: Arc::clone(self),
            thread: Some(thread),
        })
    }

    fn run(&self) {
        let mut policy = self.lock_policy();
        while !self.stopping.load(Ordering::Acquire) {
            let now = Instant::now();
            let actions = policy.tick(now);
            let changes = policy.take_changes();
            self.publish_flags(&policy);
            if !actions.is_empty() || !changes.is_empty() {
                drop(policy);
                for change in changes {
                    self.status.push(DeviceEvent::PathChanged {
                        path: change.path.as_str(),
                        reason: change.reason,
                    });
                }
                for action in actions {
                    self.perform(action);
                }
                policy = self.lock_policy();
                continue;
            }
            let wait = policy.next_deadline().map_or(IDLE_WAIT, |deadline| {
                deadline.saturating_duration_since(now)
            });
            policy = self
                .changed
                .wait_timeout(policy, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Stops the steering thread when dropped.
pub struct SteeringThread {
    steering: Arc<Steering>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for SteeringThread {
    fn drop(&mut self) {
        self.steering.stopping.store(true, Ordering::Release);
        {
            let _policy = self.steering.lock_policy();
            self.steering.changed.notify_all();
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("the steering thread panicked");
            }
        }
    }
}
