//! Control-plane status of a device: connection state, negotiation, and an event log.
//!
//! Written by the connection thread and the vhost-user request handler (a few times
//! per connection), read from Python at any time. The datapath never touches it.
//!
//! Every change is also counted on an eventfd ([`DeviceStatus::change_fd`]), so an
//! event loop can watch many devices at no cost while they are quiet, instead of
//! parking a thread on each or polling.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Where the device is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionState {
    /// Not started, or stopped.
    Stopped,
    /// Server mode: waiting for a frontend to connect.
    Listening,
    /// Client mode: waiting for the frontend's socket to accept us.
    Connecting,
    /// A frontend is attached.
    Connected,
    /// The device could not go on (for example its socket could not be bound).
    Failed,
}

impl ConnectionState {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Stopped => "stopped",
            Self::Listening => "listening",
            Self::Connecting => "connecting",
            Self::Connected => "connected",
            Self::Failed => "failed",
        }
    }
}

/// Something that happened to the device, for logs and for the controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceEvent {
    Listening {
        path: String,
    },
    Connecting {
        path: String,
    },
    Connected {
        connection: u64,
    },
    /// Another frontend connected while `connection` is served: closed at once.
    Refused {
        connection: u64,
    },
    /// SET_FEATURES: what the frontend acked.
    FeaturesAcked {
        features: u64,
    },
    /// Guest memory (re)mapped.
    MemoryMapped {
        regions: usize,
        bytes: u64,
    },
    /// VHOST_F_LOG_ALL switched on or off.
    DirtyLogging {
        on: bool,
    },
    /// The frontend went away, or the backend closed the connection after a bad request.
    Disconnected {
        connection: u64,
        reason: Option<String>,
    },
    /// Announcement frames sent on the host side; `answering` when they answer
    /// someone else announcing the guest's MAC.
    Announced {
        frames: u32,
        answering: bool,
    },
    /// The controller told steering where the guest's primary is.
    SteeringMode {
        mode: &'static str,
        reason: String,
    },
    /// Steering now points the host's switch at `path` (`standby`, `primary`, `unknown`).
    PathChanged {
        path: &'static str,
        reason: String,
    },
    Stopped,
    Failed {
        reason: String,
    },
}

impl DeviceEvent {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Listening { .. } => "listening",
            Self::Connecting { .. } => "connecting",
            Self::Connected { .. } => "connected",
            Self::Refused { .. } => "refused",
            Self::FeaturesAcked { .. } => "features_acked",
            Self::MemoryMapped { .. } => "memory_mapped",
            Self::DirtyLogging { .. } => "dirty_logging",
            Self::Disconnected { .. } => "disconnected",
            Self::Announced { .. } => "announced",
            Self::SteeringMode { .. } => "steering_mode",
            Self::PathChanged { .. } => "path_changed",
            Self::Stopped => "stopped",
            Self::Failed { .. } => "failed",
        }
    }
}

/// An event with the wall-clock time it happened.
#[derive(Clone, Debug)]
pub struct TimedEvent {
    pub time: SystemTime,
    pub event: DeviceEvent,
}

/// Negotiation results of the current (or last) connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Negotiation {
    pub offered_features: u64,
    /// `None` until the frontend sent SET_FEATURES on this connection.
    pub acked_features: Option<u64>,
    pub offered_protocol_features: u64,
    pub dirty_logging: bool,
    /// Connections accepted so far.
    pub connections: u64,
}

/// Events kept for readers; older ones are dropped first.
const EVENT_LOG_CAPACITY: usize = 1024;

struct Inner {
    state: ConnectionState,
    negotiation: Negotiation,
    events: VecDeque<TimedEvent>,
    /// Sequence number of the next event, so readers can resume where they stopped.
    next_seq: u64,
    /// Why the device stopped serving for good, once it has.
    failure: Option<String>,
}

/// Shared status of one device.
pub struct DeviceStatus {
    inner: Mutex<Inner>,
    changed: Condvar,
    /// Readable after every change (state, negotiation, event) until read.
    changed_fd: EventFd,
}

impl DeviceStatus {
    pub fn new(offered_features: u64, offered_protocol_features: u64) -> io::Result<Self> {
        Ok(Self {
            inner: Mutex::new(Inner {
                state: ConnectionState::Stopped,
                negotiation: Negotiation {
                    offered_features,
                    offered_protocol_features,
                    ..Default::default()
                },
                events: VecDeque::new(),
                next_seq: 0,
                failure: None,
            }),
            changed: Condvar::new(),
            changed_fd: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// An eventfd that becomes readable whenever something changed; a reader drains
    /// it, then reads what it wants to know. It stays open as long as this status.
    pub fn change_fd(&self) -> RawFd {
        self.changed_fd.as_raw_fd()
    }

    fn notify(&self) {
        self.changed.notify_all();
        // Only fails when the counter would overflow (never drained for 2^64
        // changes); the fd is readable then anyway.
        let _ = self.changed_fd.write(1);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking holder cannot leave these plain values half-written.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> ConnectionState {
        self.lock().state
    }

    pub fn negotiation(&self) -> Negotiation {
        self.lock().negotiation
    }

    /// Why the device stopped serving for good, once it has.
    pub fn failure(&self) -> Option<String> {
        self.lock().failure.clone()
    }

    pub fn set_state(&self, state: ConnectionState) {
        self.lock().state = state;
        self.notify();
    }

    pub fn update_negotiation(&self, update: impl FnOnce(&mut Negotiation)) {
        update(&mut self.lock().negotiation);
        self.notify();
    }

    /// Record an event and log it.
    pub fn push(&self, event: DeviceEvent) {
        log::debug!("{}", describe(&event));
        let mut inner = self.lock();
        if let DeviceEvent::Failed { reason } = &event {
            inner.failure = Some(reason.clone());
        }
        if inner.events.len() == EVENT_LOG_CAPACITY {
            inner.events.pop_front();
        }
        inner.events.push_back(TimedEvent {
            time: SystemTime::now(),
            event,
        });
        inner.next_seq += 1;
        drop(inner);
        self.notify();
    }

    /// Events with sequence number `>= from`, and the sequence number to pass next time.
    /// Waits up to `timeout` when there is none yet.
    pub fn events_since(&self, from: u64, timeout: Duration) -> (Vec<TimedEvent>, u64) {
        let deadline = Instant::now() + timeout;
        let mut inner = self.lock();
        while inner.next_seq <= from {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            inner = self
                .changed
                .wait_timeout(inner, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let first_kept = inner.next_seq - inner.events.len() as u64;
        let skip = from.saturating_sub(first_kept) as usize;
        let events = inner.events.iter().skip(skip).cloned().collect();
        (events, inner.next_seq)
    }

    /// Wait until `done` holds for the state, or `timeout` passes; returns the last state.
    pub fn wait_state(
        &self,
        timeout: Duration,
        done: impl Fn(ConnectionState) -> bool,
    ) -> ConnectionState {
        let deadline = Instant::now() + timeout;
        let mut inner = self.lock();
        while !done(inner.state) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            inner = self
                .changed
                .wait_timeout(inner, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        inner.state
    }
}

/// One line for logs.
pub fn describe(event: &DeviceEvent) -> String {
    use crate::virtio_net::feature_names;
    match event {
        DeviceEvent::Listening { path } => format!("listening on {path}"),
        DeviceEvent::Connecting { path } => format!("connecting to {path}"),
        DeviceEvent::Connected { connection } => {
            format!("frontend connected (connection {connection})")
        }
        DeviceEvent::Refused { connection } => format!(
            "refused another frontend: connection {connection} is being served (one at a time)"
        ),
        DeviceEvent::FeaturesAcked { features } => format!(
            "features negotiated: {:#x} [{}]",
            features,
            feature_names(*features).join(" ")
        ),
        DeviceEvent::MemoryMapped { regions, bytes } => {
            format!(
                "guest memory mapped: {regions} region(s), {} MiB",
                bytes >> 20
            )
        }
        DeviceEvent::DirtyLogging { on: true } => "dirty-page logging on (migration)".to_string(),
        DeviceEvent::DirtyLogging { on: false } => "dirty-page logging off".to_string(),
        DeviceEvent::Disconnected {
            connection,
            reason: None,
        } => format!("frontend disconnected (connection {connection})"),
        DeviceEvent::Disconnected {
            connection,
            reason: Some(reason),
        } => format!("connection {connection} closed: {reason}"),
        DeviceEvent::Announced {
            frames,
            answering: false,
        } => format!("announced guest MAC on host port ({frames} frame(s))"),
        DeviceEvent::Announced {
            frames,
            answering: true,
        } => format!(
            "announced guest MAC on host port ({frames} frame(s)), answering an \
             announcement of it from another port"
        ),
        DeviceEvent::SteeringMode { mode, reason } => format!("steering mode {mode}: {reason}"),
        DeviceEvent::PathChanged { path, reason } => format!("steering to the {path}: {reason}"),
        DeviceEvent::Stopped => "stopped".to_string(),
        DeviceEvent::Failed { reason } => format!("failed: {reason}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn readers_resume_from_sequence_numbers() {
        let status = DeviceStatus::new(1, 2).unwrap();
        status.push(DeviceEvent::Connected { connection: 1 });
        status.push(DeviceEvent::FeaturesAcked { features: 1 });
        let (events, next) = status.events_since(0, Duration::ZERO);
        assert_eq!(next, 2);
        assert_eq!(events.len(), 2);
        let (events, next) = status.events_since(1, Duration::ZERO);
        assert_eq!(events[0].event, DeviceEvent::FeaturesAcked { features: 1 });
        assert_eq!(next, 2);
        let (events, _) = status.events_since(2, Duration::from_millis(10));
        assert!(events.is_empty());
    }

    #[test]
    fn old_events_are_dropped_first() {
        let status = DeviceStatus::new(0, 0).unwrap();
        for connection in 0..(EVENT_LOG_CAPACITY as u64 + 5) {
            status.push(DeviceEvent::Connected { connection });
        }
        let (events, next) = status.events_since(0, Duration::ZERO);
        assert_eq!(events.len(), EVENT_LOG_CAPACITY);
        assert_eq!(events[0].event, DeviceEvent::Connected { connection: 5 });
        assert_eq!(next, EVENT_LOG_CAPACITY as u64 + 5);
    }

    #[test]
    fn waiters_wake_on_state_change() {
        let status = Arc::new(DeviceStatus::new(0, 0).unwrap());
        let setter = Arc::clone(&status);
        let thread = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            setter.set_state(ConnectionState::Connected);
        });
        let state = status.wait_state(Duration::from_secs(5), |s| s == ConnectionState::Connected);
        assert_eq!(state, ConnectionState::Connected);
        thread.join().unwrap();
    }

    #[test]
    fn every_change_makes_the_change_fd_readable_until_drained() {
        let status = DeviceStatus::new(0, 0).unwrap();
        let fd = status.change_fd();
        let count = || {
            let mut buf = [0u8; 8];
            // SAFETY: reads 8 bytes into a local buffer from an fd this test owns.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n == 8 {
                u64::from_ne_bytes(buf)
            } else {
                0
            }
        };
        assert_eq!(count(), 0, "nothing changed yet");
        status.set_state(ConnectionState::Listening);
        status.update_negotiation(|n| n.acked_features = Some(1));
        status.push(DeviceEvent::Stopped);
        assert_eq!(count(), 3);
        assert_eq!(count(), 0, "drained");
    }
}
