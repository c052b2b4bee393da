//! The steering rules as a state machine without I/O: the controller sets the mode
//! from what QEMU says, the datapath reports what it sees, and the policy answers
//! with what to do with each frame and when to announce or probe.
//!
//! net_failover, the guest driver, decides the rule this follows: it transmits
//! through the primary while the primary is running with carrier, else through
//! the standby; while a primary is registered it drops what arrives on the standby
//! (kernel 6.1; a proposed change accepts it while the primary has no link). A
//! learning switch forwards the guest's MAC to the port it last saw it on. So the
//! switch must point at the standby's port exactly while the guest has no usable
//! primary, and at the primary's otherwise. The host cannot see the guest's
//! primary, but it can see which way the guest answers:
//!
//! * `releasing` (QEMU asked the guest to unplug its primary): probes go *into the
//!   guest* through the standby. A guest that still holds its primary drops them;
//!   the first answer (or any frame the guest sends) coming back through the
//!   standby means it released the primary: announce, the standby is the path.
//! * `plugged` (a primary was just plugged): until the guest uses it, the standby
//!   carries the traffic, so announce it (again each time someone else announces
//!   the guest's MAC, as QEMU does through an emulated primary after a migration),
//!   but hold back duplicate address detection, which would come back to the guest
//!   through its primary and make it give its own link-local address up;
//!   probes go *through the switch* and reach the guest only by its primary; the
//!   first answer that arrives from the switch shows the switch has learned the
//!   primary's port: stop announcing, the mode becomes `primary`.
//! * `primary` (the guest uses its primary): the standby's own chatter (the IPv6
//!   neighbour and router discovery and MLD the guest's virtio-net slave sends by
//!   itself) is held back so it cannot teach the switch the wrong port; anything
//!   else the guest sends through the standby (its primary lost carrier) is
//!   forwarded, and the switch is probed until the primary answers again. Set by
//!   the controller, it starts with such a probe.
//! * `standby` (no primary): everything is forwarded; announce for a while.
//! * `off`: nothing is inspected or sent.

use std::time::{Duration, Instant};

/// What the controller says about the guest's primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No steering: every frame passes, nothing is sent.
    Off,
    /// The guest has no primary: the standby is its only path.
    Standby,
    /// QEMU asked the guest to release its primary; find out when it has.
    Releasing,
    /// A primary was just plugged; it carries the traffic once the guest answers
    /// through it.
    Plugged,
    /// The guest uses its primary.
    Primary,
}

impl Mode {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Standby => "standby",
            Self::Releasing => "releasing",
            Self::Plugged => "plugged",
            Self::Primary => "primary",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "off" => Self::Off,
            "standby" => Self::Standby,
            "releasing" => Self::Releasing,
            "plugged" => Self::Plugged,
            "primary" => Self::Primary,
            _ => return None,
        })
    }
}

/// Where the host's switch is being steered for the guest's MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Not steered (mode `off`, or nothing seen yet).
    Unknown,
    /// The standby's host port.
    Standby,
    /// The primary's port (the guest answered through it).
    Primary,
}

impl Path {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Standby => "standby",
            Self::Primary => "primary",
        }
    }
}

/// A frame the guest sent through the standby, as steering sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestFrame {
    /// Addressed to the probe's own MAC: an answer to a probe.
    ProbeAnswer,
    /// Duplicate address detection for one of the guest's IPv6 addresses. The
    /// guest's failover master and both its slaves share their MAC, so their
    /// link-local address: a slave's probe that comes back to the master through the
    /// other slave makes the master give its own address up.
    DadProbe,
    /// Other IPv6 to a multicast group: what the virtio-net slave sends by itself.
    Chatter,
    /// Anything else: the guest's own traffic.
    Traffic,
}

/// A frame from the guest's MAC that arrived from the host's switch, so through
/// another of its ports (or from another host's copy of the guest).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostFrame {
    /// `announcement` when it is a RARP (a hypervisor announcing the guest, not the
    /// guest itself); `to_probe` when it answers a probe.
    FromGuest { announcement: bool, to_probe: bool },
}

/// What the datapath does with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Forward it as usual.
    Pass,
    /// Drop it: it would teach the switch the wrong port.
    HoldBack,
    /// It was for steering (a probe's answer): neither forwarded nor delivered.
    Consume,
}

/// Which way a probe goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Out of the standby's host port into the switch: reaches the guest only
    /// through its primary.
    ThroughSwitch,
    /// Into the guest through the standby.
    IntoGuest,
}

/// Why an announcement goes out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Announce {
    /// The first of a series (the path just changed to the standby).
    First,
    /// A repeat of the series.
    Repeat,
    /// Someone else announced the guest's MAC elsewhere.
    Counter,
}

/// Something to send now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Announce(Announce),
    Probe(Direction),
}

/// A change of path, for the event log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathChange {
    pub path: Path,
    pub reason: String,
}

/// One stretch of a cadence: every `every` until `until` after it started.
#[derive(Clone, Copy, Debug)]
pub struct Phase {
    pub until: Duration,
    pub every: Duration,
}

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// After the primary left: outlasts the announcements QEMU repeats after a
/// migration (by default until 750 ms after RESUME).
const ANNOUNCE_BURST: &[Phase] = &[
    Phase {
        until: ms(1000),
        every: ms(100),
    },
    Phase {
        until: ms(2000),
        every: ms(250),
    },
];
/// While a plugged primary has not answered yet.
const ANNOUNCE_UNTIL_PRIMARY: &[Phase] = &[
    Phase {
        until: ms(1000),
        every: ms(100),
    },
    Phase {
        until: ms(2000),
        every: ms(250),
    },
    Phase {
        until: ms(30_000),
        every: ms(1000),
    },
];
/// While QEMU waits for the guest's eject: fine-grained, since the release is
/// what the switch-over waits for.
const PROBE_INTO_GUEST: &[Phase] = &[
    Phase {
        until: ms(60_000),
        every: ms(20),
    },
    Phase {
        until: Duration::MAX,
        every: ms(1000),
    },
];
/// Until the primary answers: a primary's link comes up seconds after it is plugged.
const PROBE_THROUGH_SWITCH: &[Phase] = &[
    Phase {
        until: ms(5000),
        every: ms(50),
    },
    Phase {
        until: ms(60_000),
        every: ms(250),
    },
    Phase {
        until: Duration::MAX,
        every: ms(2000),
    },
];
/// One more probe after the primary answered, in case an announcement crossed the
/// answer on its way to the switch.
const CONFIRM: &[Phase] = &[];
const CONFIRM_DELAY: Duration = ms(20);
/// Someone else announcing the guest is answered at most this often.
const COUNTER_ANNOUNCE_GAP: Duration = ms(20);

/// Times of a repeated action.
#[derive(Clone, Copy, Debug)]
struct Cadence {
    started: Instant,
    next: Option<Instant>,
    plan: &'static [Phase],
}

impl Cadence {
    fn starting(now: Instant, plan: &'static [Phase]) -> Self {
        Self {
            started: now,
            next: Some(now),
            plan,
        }
    }

    fn once_at(at: Instant) -> Self {
        Self {
            started: at,
            next: Some(at),
            plan: CONFIRM,
        }
    }

    /// Whether it is due at `now`; if so, when it is due next.
    fn take(&mut self, now: Instant) -> bool {
        match self.next {
            Some(next) if next <= now => {
                let elapsed = now.saturating_duration_since(self.started);
                self.next = self
                    .plan
                    .iter()
                    .find(|phase| elapsed < phase.until)
                    .map(|phase| now + phase.every);
                true
            }
            _ => false,
        }
    }
}

/// The state of one device's steering.
#[derive(Debug)]
pub struct Policy {
    mode: Mode,
    path: Path,
    /// In `primary` mode: probing until the primary answers (set by the controller,
    /// or the guest fell back to the standby).
    reprobing: bool,
    announcing: Option<Cadence>,
    probing: Option<(Direction, Cadence)>,
    last_counter_announce: Option<Instant>,
    /// The next announcement answers someone else's.
    counter_pending: bool,
    changes: Vec<PathChange>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            mode: Mode::Off,
            path: Path::Unknown,
            reprobing: false,
            announcing: None,
            probing: None,
            last_counter_announce: None,
            counter_pending: false,
            changes: Vec::new(),
        }
    }
}

impl Policy {
    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn path(&self) -> Path {
        self.path
    }

    fn change_path(&mut self, path: Path, reason: impl Into<String>) {
        self.path = path;
        self.changes.push(PathChange {
            path,
            reason: reason.into(),
        });
    }

    fn enter_standby(&mut self, now: Instant, reason: &str) {
        self.mode = Mode::Standby;
        self.reprobing = false;
        self.probing = None;
        self.announcing = Some(Cadence::starting(now, ANNOUNCE_BURST));
        self.change_path(Path::Standby, reason);
    }

    fn probe_switch(&mut self, now: Instant) {
        self.probing = Some((
            Direction::ThroughSwitch,
            Cadence::starting(now, PROBE_THROUGH_SWITCH),
        ));
    }

    /// The controller's word; `reason` goes to the event log.
    pub fn set_mode(&mut self, mode: Mode, now: Instant, reason: &str) {
        self.reprobing = false;
        self.announcing = None;
        self.probing = None;
        match mode {
            Mode::Off => {
                self.mode = Mode::Off;
                if self.path != Path::Unknown {
                    self.change_path(Path::Unknown, reason);
                }
            }
            Mode::Standby => self.enter_standby(now, reason),
            Mode::Releasing => {
                self.mode = Mode::Releasing;
                self.probing = Some((
                    Direction::IntoGuest,
                    Cadence::starting(now, PROBE_INTO_GUEST),
                ));
            }
            Mode::Plugged => {
                self.mode = Mode::Plugged;
                self.announcing = Some(Cadence::starting(now, ANNOUNCE_UNTIL_PRIMARY));
                self.probe_switch(now);
                self.change_path(
                    Path::Standby,
                    format!("{reason}; the standby carries the traffic until the primary answers"),
                );
            }
            Mode::Primary => {
                self.mode = Mode::Primary;
                self.reprobing = true;
                self.probe_switch(now);
                self.change_path(Path::Primary, format!("{reason}; probing it"));
            }
        }
    }

    /// Hold back the standby's own chatter: a primary is (still) the guest's path.
    pub fn holds_chatter(&self) -> bool {
        matches!(self.mode, Mode::Releasing | Mode::Primary)
    }

    /// Hold back the guest's duplicate address detection (see [`GuestFrame::DadProbe`]).
    pub fn holds_dad(&self) -> bool {
        self.holds_chatter() || self.mode == Mode::Plugged
    }

    /// The guest's traffic through the standby means something now.
    pub fn watches_guest_traffic(&self) -> bool {
        self.mode == Mode::Releasing || (self.mode == Mode::Primary && !self.reprobing)
    }

    /// The guest's MAC arriving from the switch means something now.
    pub fn watches_guest_elsewhere(&self) -> bool {
        self.mode == Mode::Plugged || (self.mode == Mode::Primary && self.reprobing)
    }

    /// A frame the guest sent through the standby.
    pub fn on_guest_frame(&mut self, frame: GuestFrame, now: Instant) -> Verdict {
        match frame {
            GuestFrame::ProbeAnswer => {
                if self.mode == Mode::Releasing {
                    self.enter_standby(
                        now,
                        "the guest answered through the standby: it released its primary",
                    );
                }
                Verdict::Consume
            }
            GuestFrame::DadProbe if self.holds_dad() => Verdict::HoldBack,
            GuestFrame::Chatter if self.holds_chatter() => Verdict::HoldBack,
            GuestFrame::Chatter | GuestFrame::DadProbe => Verdict::Pass,
            GuestFrame::Traffic => {
                match self.mode {
                    Mode::Releasing => self.enter_standby(
                        now,
                        "the guest sends through the standby: it released its primary",
                    ),
                    Mode::Primary if !self.reprobing => {
                        // Forwarded, so the switch now points at the standby: fine while
                        // the primary has no link, wrong as soon as it has again.
                        self.reprobing = true;
                        self.probe_switch(now);
                        self.change_path(
                            Path::Standby,
                            "the guest sends through the standby although it used its primary \
                             (primary without link?); probing until it answers again",
                        );
                    }
                    _ => {}
                }
                Verdict::Pass
            }
        }
    }

    /// A frame from the guest's MAC that came from the host's switch (never
    /// delivered to the guest: it is its own, looped back).
    pub fn on_host_frame(&mut self, frame: HostFrame, now: Instant) {
        let HostFrame::FromGuest {
            announcement,
            to_probe,
        } = frame;
        if announcement {
            // Someone announced the guest elsewhere while the standby still carries
            // its traffic (QEMU, through an emulated primary the guest cannot use yet).
            if self.mode == Mode::Plugged {
                let quiet = self
                    .last_counter_announce
                    .is_none_or(|last| now.duration_since(last) >= COUNTER_ANNOUNCE_GAP);
                if let (true, Some(cadence)) = (quiet, self.announcing.as_mut()) {
                    cadence.next = Some(now);
                    self.last_counter_announce = Some(now);
                    self.counter_pending = true;
                }
            }
        } else if to_probe && self.watches_guest_elsewhere() {
            // Only an answer counts: frames the guest sent before (flooded to this
            // port from where it ran before a migration) can wait in the TAP's queue.
            self.mode = Mode::Primary;
            self.reprobing = false;
            self.announcing = None;
            self.probing = Some((
                Direction::ThroughSwitch,
                Cadence::once_at(now + CONFIRM_DELAY),
            ));
            self.change_path(Path::Primary, "the guest answered through its primary");
        }
    }

    /// What is due at `now`.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Some(cadence) = self.announcing.as_mut() {
            let first = cadence.next == Some(cadence.started);
            if cadence.take(now) {
                let why = if std::mem::take(&mut self.counter_pending) {
                    Announce::Counter
                } else if first {
                    Announce::First
                } else {
                    Announce::Repeat
                };
                actions.push(Action::Announce(why));
            }
            if cadence.next.is_none() {
                self.announcing = None;
            }
        }
        if let Some((direction, cadence)) = self.probing.as_mut() {
            if cadence.take(now) {
                actions.push(Action::Probe(*direction));
            }
            if cadence.next.is_none() {
                self.probing = None;
            }
        }
        actions
    }

    /// When [`Policy::tick`] has something next.
    pub fn next_deadline(&self) -> Option<Instant> {
        let announce = self.announcing.and_then(|c| c.next);
        let probe = self.probing.and_then(|(_, c)| c.next);
        match (announce, probe) {
            (Some(a), Some(p)) => Some(a.min(p)),
            (a, p) => a.or(p),
        }
    }

    /// Path changes since the last call.
    pub fn take_changes(&mut self) -> Vec<PathChange> {
        std::mem::take(&mut self.changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn actions_until(policy: &mut Policy, start: Instant, end: Duration) -> Vec<(u64, Action)> {
        let mut seen = Vec::new();
        let mut now = start;
        while now <= start + end {
            for action in policy.tick(now) {
                seen.push(((now - start).as_millis() as u64, action));
            }
            now += ms(5);
        }
        seen
    }

    fn count(seen: &[(u64, Action)], action: Action) -> usize {
        seen.iter()
            .filter(|(_, a)| match (a, action) {
                (Action::Announce(_), Action::Announce(_)) => true,
                (a, b) => *a == b,
            })
            .count()
    }

    const ANNOUNCE: Action = Action::Announce(Announce::Repeat);

    #[test]
    fn off_passes_everything_and_sends_nothing() {
        let mut policy = Policy::default();
        let now = Instant::now();
        assert_eq!(
            policy.on_guest_frame(GuestFrame::Chatter, now),
            Verdict::Pass
        );
        assert_eq!(
            policy.on_guest_frame(GuestFrame::Traffic, now),
            Verdict::Pass
        );
        assert!(policy.tick(now).is_empty());
        assert_eq!(policy.next_deadline(), None);
        assert!(!policy.holds_chatter() && !policy.watches_guest_elsewhere());
    }

    #[test]
    fn standby_announces_a_bounded_burst_and_forwards_everything() {
        let mut policy = Policy::default();
        let start = Instant::now();
        policy.set_mode(Mode::Standby, start, "primary gone");
        assert_eq!(policy.path(), Path::Standby);
        assert_eq!(policy.take_changes()[0].reason, "primary gone");
        let seen = actions_until(&mut policy, start, ms(5000));
        assert_eq!(seen[0], (0, Action::Announce(Announce::First)));
        // Every 100 ms to 1 s, then every 250 ms to 2 s.
        assert_eq!(count(&seen, ANNOUNCE), 15, "{seen:?}");
        assert!(seen.iter().all(|(at, _)| *at <= 2000));
        assert_eq!(policy.next_deadline(), None);
        assert_eq!(
            policy.on_guest_frame(GuestFrame::Chatter, start),
            Verdict::Pass
        );
    }

    #[test]
    fn releasing_probes_into_the_guest_until_it_answers_through_the_standby() {
        let mut policy = Policy::default();
        let start = Instant::now();
        policy.set_mode(Mode::Releasing, start, "QEMU asked");
        // Still the primary's time: the slave's chatter is held back.
        assert_eq!(
            policy.on_guest_frame(GuestFrame::Chatter, start),
            Verdict::HoldBack
        );
        let seen = actions_until(&mut policy, start, ms(195));
        assert_eq!(count(&seen, Action::Probe(Direction::IntoGuest)), 10);
        assert_eq!(count(&seen, ANNOUNCE), 0);
        // The guest still holding its primary answers through it: nothing changes.
        let from_primary = HostFrame::FromGuest {
            announcement: false,
            to_probe: true,
        };
        policy.on_host_frame(from_primary, start);
        assert_eq!(policy.mode(), Mode::Releasing);
        // The answer comes back through the standby: released.
        let at = start + ms(200);
        assert_eq!(
            policy.on_guest_frame(GuestFrame::ProbeAnswer, at),
            Verdict::Consume
        );
        assert_eq!(policy.mode(), Mode::Standby);
        assert_eq!(policy.path(), Path::Standby);
        assert!(policy.take_changes()[0]
            .reason
            .contains("released its primary"));
        assert_eq!(policy.tick(at), vec![Action::Announce(Announce::First)]);
        assert_eq!(
            policy.on_guest_frame(GuestFrame::Chatter, at),
            Verdict::Pass
        );
    }

    #[test]
    fn releasing_ends_on_the_guests_own_traffic_through_the_standby() {
        let mut policy = Policy::default();
        let start = Instant::now();
        policy.set_mode(Mode::Releasing, start, "QEMU asked");
        assert_eq!(
            policy.on_guest_frame(GuestFrame::Traffic, start),
            Verdict::Pass
        );
        assert_eq!(policy.mode(), Mode::Standby);
    }

    #[test]
    fn primary_announces_the_standby_until_the_guest_answers_through_the_switch() {
        let mut policy = Policy::default();
        let start = Instant::now();
        policy.set_mode(Mode::Plugged, start, "primary plugged");
        assert_eq!(policy.path(), Path::Standby);
        assert!(policy.watches_guest_elsewhere());
        // The standby carries the traffic meanwhile: its chatter too.
        assert_eq!(
            policy.on_guest_frame(GuestFrame::Chatter, start),
            Verdict::Pass
        );
        let seen = actions_until(&mut policy, start, ms(2000));
        assert_eq!(count(&seen, Action::Probe(Direction::ThroughSwitch)), 41);
        assert_eq!(count(&seen, ANNOUNCE), 15);

        let at = start + ms(2500);
        let answer = HostFrame::FromGuest {
            announcement: false,
            to_probe: true,
        };
        policy.on_host_frame(answer, at);
        assert_eq!(policy.path(), Path::Primary);
        let changes = policy.take_changes();
        assert_eq!(
            changes.last().unwrap().reason,
            "the guest answered through its primary"
        );
        // No announcement after the answer, one confirming probe, then silence.
        let seen = actions_until(&mut policy, at, ms(60_000));
        assert_eq!(seen, vec![(20, Action::Probe(Direction::ThroughSwitch))]);
        assert_eq!(policy.next_deadline(), None);
        assert_eq!(
            policy.on_guest_frame(GuestFrame::Chatter, at),
            Verdict::HoldBack
        );
    }

    #[test]
    fn someone_announcing_the_guest_elsewhere_is_answered_at_once_but_not_flooded() {
        let mut policy = Policy::default();
        let start = Instant::now();
        policy.set_mode(Mode::Plugged, start, "resumed");
        policy.tick(start);
        let rarp = HostFrame::FromGuest {
            announcement: true,
            to_probe: false,
        };
        let at = start + ms(50);
        policy.on_host_frame(rarp, at);
        assert!(policy
            .tick(at)
            .contains(&Action::Announce(Announce::Counter)));
        // A second one right after waits for the gap.
        let soon = at + ms(5);
        policy.on_host_frame(rarp, soon);
        assert!(policy.tick(soon).is_empty());
        // Not an answer: the primary is not taken for working.
        assert_eq!(policy.path(), Path::Standby);
    }

    #[test]
    fn a_guest_falling_back_to_the_standby_is_forwarded_and_the_primary_probed_again() {
        let mut policy = Policy::default();
        let start = Instant::now();
        policy.set_mode(Mode::Plugged, start, "plugged");
        let talk = HostFrame::FromGuest {
            announcement: false,
            to_probe: false,
        };
        // The guest talking is not an answer: it may be an old frame.
        policy.on_host_frame(talk, start);
        assert_eq!(policy.mode(), Mode::Plugged);
        let talk = HostFrame::FromGuest {
            announcement: false,
            to_probe: true,
        };
        policy.on_host_frame(talk, start);
        actions_until(&mut policy, start, ms(100));
        let at = start + ms(1000);
        assert_eq!(
            policy.on_guest_frame(GuestFrame::Traffic, at),
            Verdict::Pass
        );
        assert_eq!(policy.path(), Path::Standby);
        assert!(policy.watches_guest_elsewhere());
        let seen = actions_until(&mut policy, at, ms(1000));
        assert_eq!(count(&seen, Action::Probe(Direction::ThroughSwitch)), 21);
        assert_eq!(
            count(&seen, ANNOUNCE),
            0,
            "the primary may come back any time"
        );
        // Still the primary's time: chatter stays held.
        assert_eq!(
            policy.on_guest_frame(GuestFrame::Chatter, at),
            Verdict::HoldBack
        );
        policy.on_host_frame(talk, at + ms(1100));
        assert_eq!(policy.path(), Path::Primary);
    }

    #[test]
    fn primary_from_the_controller_probes_without_announcing_and_holds_chatter() {
        let mut policy = Policy::default();
        let start = Instant::now();
        policy.set_mode(Mode::Primary, start, "running with its primary");
        assert_eq!(policy.path(), Path::Primary);
        assert_eq!(
            policy.on_guest_frame(GuestFrame::Chatter, start),
            Verdict::HoldBack
        );
        let seen = actions_until(&mut policy, start, ms(100));
        assert_eq!(count(&seen, ANNOUNCE), 0);
        assert_eq!(count(&seen, Action::Probe(Direction::ThroughSwitch)), 3);
        let answer = HostFrame::FromGuest {
            announcement: false,
            to_probe: true,
        };
        policy.on_host_frame(answer, start + ms(100));
        assert_eq!(policy.mode(), Mode::Primary);
        assert!(policy.watches_guest_traffic());
    }

    #[test]
    fn off_stops_everything() {
        let mut policy = Policy::default();
        let start = Instant::now();
        policy.set_mode(Mode::Plugged, start, "plugged");
        policy.set_mode(Mode::Off, start, "migrated away");
        assert!(policy.tick(start).is_empty());
        assert_eq!(policy.path(), Path::Unknown);
        assert_eq!(
            policy.on_guest_frame(GuestFrame::Chatter, start),
            Verdict::Pass
        );
    }

    #[test]
    fn modes_parse_from_their_names() {
        for mode in [
            Mode::Off,
            Mode::Standby,
            Mode::Releasing,
            Mode::Plugged,
            Mode::Primary,
        ] {
            assert_eq!(Mode::parse(mode.as_str()), Some(mode));
        }
        assert_eq!(Mode::parse("vf"), None);
    }
}
