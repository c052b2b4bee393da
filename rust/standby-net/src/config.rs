//! What a standby backend is asked to be: socket, mode, host port, MAC, queues.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use std::str::FromStr;

use thiserror::Error;

use crate::frontend_gate::Deadlines;
use crate::public_socket::SocketAccess;

/// The longest a frontend may be given to send a request.
const MAX_DEADLINE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Most queue pairs one device serves (one worker thread each).
pub const MAX_QUEUE_PAIRS: u16 = 16;
/// Ring size advertised as the maximum; frontends pick any power of two up to it.
pub const DEFAULT_MAX_QUEUE_SIZE: u16 = 1024;
pub const DEFAULT_MTU: u16 = 1500;
/// The smallest MTU an IPv4 host must take (RFC 791), as Linux's minimum.
pub const MIN_MTU: u16 = 68;
/// The largest a TAP (and virtio-net's config field) can carry.
pub const MAX_MTU: u16 = 65535;
/// How long a worker keeps polling its rings after the last frame moved, in µs:
/// longer than the gap between a busy guest's batches, short enough that a quiet
/// guest costs no CPU.
pub const DEFAULT_POLL_US: u32 = 50;
/// Longest polling budget accepted (one second of a busy CPU per quiet spell).
pub const MAX_POLL_US: u32 = 1_000_000;

/// A setting that breaks its rule. The message is the rule alone; [`Self::setting`]
/// names the setting, so each surface (command line, TOML, Python) can name it the
/// way its user wrote it.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("expected null, sink, loop, tap:NAME or gen:SIZE[,rate=FPS][,count=N], got {0:?}")]
    UnknownPort(String),
    #[error("gen {0}")]
    BadGenerator(String),
    #[error("TAP name {0:?} must be 1 to 15 characters without '/' or whitespace")]
    BadTapName(String),
    #[error("expected six hex octets like 52:54:00:12:34:56, got {0:?}")]
    BadMac(String),
    #[error("{0} is a multicast address; a NIC needs a unicast one")]
    MulticastMac(MacAddr),
    #[error("must be between 1 and {MAX_QUEUE_PAIRS}, got {0}")]
    BadQueuePairs(i64),
    #[error("must be a power of two between 64 and 32768, got {0}")]
    BadQueueSize(i64),
    #[error("must be between {MIN_MTU} and {MAX_MTU}, got {0}")]
    BadMtu(i64),
    #[error("must be between 0 (never poll) and {MAX_POLL_US}, got {0}")]
    BadPollUs(i64),
    #[error("must not be empty")]
    EmptySocketPath,
    #[error("expected permission bits up to 0o777, got {0:#o}")]
    BadSocketMode(i64),
    #[error("must be more than 0 and at most 3600 seconds, got {0}")]
    BadHandshakeTimeout(String),
}

impl ConfigError {
    /// The setting at fault, as [`Settings`] (and the Python API) names it.
    pub fn setting(&self) -> &'static str {
        match self {
            Self::UnknownPort(_) | Self::BadGenerator(_) | Self::BadTapName(_) => "port",
            Self::BadMac(_) | Self::MulticastMac(_) => "mac",
            Self::BadQueuePairs(_) => "queues",
            Self::BadQueueSize(_) => "queue_size",
            Self::BadMtu(_) => "mtu",
            Self::BadPollUs(_) => "poll_us",
            Self::EmptySocketPath => "socket_path",
            Self::BadSocketMode(_) => "socket_mode",
            Self::BadHandshakeTimeout(_) => "handshake_timeout",
        }
    }
}

/// The host side of the device: where guest frames go and where frames for the guest come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortSpec {
    /// Count and drop what the guest sends; nothing to receive.
    Null,
    /// Like `Null`, but read every frame out of guest memory first (what a consumer
    /// of the frames costs, as DPDK's rxonly copying into an mbuf).
    Sink,
    /// Deliver every frame the guest sends back to its own receive queue.
    Loop,
    /// A TAP device, opened or created by name.
    Tap { name: String },
    /// Generate numbered frames for the guest (a host→guest source for benchmarks).
    Gen(GenSpec),
}

/// What a `gen` port sends: frames of `size` bytes, as fast as the guest takes them or
/// at `rate` frames a second, and `count` of them per connection (else without end).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenSpec {
    /// Ethernet frame length without the FCS, as testpmd's `--txpkts` counts it.
    pub size: u16,
    pub rate: Option<u64>,
    pub count: Option<u64>,
}

impl GenSpec {
    /// The Ethernet minimum (without FCS) up to a jumbo frame.
    pub const SIZES: std::ops::RangeInclusive<u16> = 60..=9018;

    fn parse(text: &str) -> Result<Self, ConfigError> {
        let bad = |what: String| ConfigError::BadGenerator(what);
        let mut parts = text.split(',');
        let size = parts.next().unwrap_or_default();
        let size = size
            .parse::<u16>()
            .ok()
            .filter(|n| Self::SIZES.contains(n))
            .ok_or_else(|| {
                bad(format!(
                    "frame size: expected {} to {} bytes, got {size:?}",
                    Self::SIZES.start(),
                    Self::SIZES.end()
                ))
            })?;
        let mut spec = Self {
            size,
            rate: None,
            count: None,
        };
        for option in parts {
            let (key, value) = option.split_once('=').unwrap_or((option, ""));
            let number = value.parse::<u64>().ok().filter(|&n| n > 0);
            let slot = match key {
                "rate" => &mut spec.rate,
                "count" => &mut spec.count,
                _ => {
                    return Err(bad(format!(
                        "option: expected rate=FPS or count=N, got {option:?}"
                    )))
                }
            };
            if slot.is_some() {
                return Err(bad(format!("option {key} given twice")));
            }
            *slot = Some(number.ok_or_else(|| {
                bad(format!(
                    "{key}: expected a whole number above 0, got {value:?}"
                ))
            })?);
        }
        Ok(spec)
    }
}

impl fmt::Display for GenSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gen:{}", self.size)?;
        if let Some(rate) = self.rate {
            write!(f, ",rate={rate}")?;
        }
        if let Some(count) = self.count {
            write!(f, ",count={count}")?;
        }
        Ok(())
    }
}

impl FromStr for PortSpec {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "null" => Ok(Self::Null),
            "loop" => Ok(Self::Loop),
            "sink" => Ok(Self::Sink),
            _ => match s.strip_prefix("tap:") {
                Some(name) => {
                    let valid = !name.is_empty()
                        && name.len() < libc::IFNAMSIZ
                        && !name.contains(|c: char| c == '/' || c.is_whitespace());
                    if valid {
                        Ok(Self::Tap {
                            name: name.to_string(),
                        })
                    } else {
                        Err(ConfigError::BadTapName(name.to_string()))
                    }
                }
                None => match s.strip_prefix("gen:") {
                    Some(text) => GenSpec::parse(text).map(Self::Gen),
                    None => Err(ConfigError::UnknownPort(s.to_string())),
                },
            },
        }
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Null => f.write_str("null"),
            Self::Loop => f.write_str("loop"),
            Self::Sink => f.write_str("sink"),
            Self::Tap { name } => write!(f, "tap:{name}"),
            Self::Gen(spec) => spec.fmt(f),
        }
    }
}

/// An Ethernet address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A random locally administered unicast address.
    pub fn random() -> Self {
        let mut bytes = [0u8; 6];
        let filled = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
        if filled.is_err() {
            // Only reached without /dev/urandom; the pid and clock still vary per run.
            let seed = std::process::id() as u64
                ^ std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0);
            bytes.copy_from_slice(&seed.to_le_bytes()[..6]);
        }
        bytes[0] = (bytes[0] & 0xfe) | 0x02;
        Self(bytes)
    }

    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl FromStr for MacAddr {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigError::BadMac(s.to_string());
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for byte in bytes.iter_mut() {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        let mac = Self(bytes);
        if mac.is_multicast() {
            return Err(ConfigError::MulticastMac(mac));
        }
        Ok(mac)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// A backend's settings as a user gives them, numbers not yet narrowed to the
/// device's types: every surface (the command line, the TOML file, the Python API)
/// hands them here, so each rule is written once and each message reads the same.
#[derive(Clone, Debug)]
pub struct Settings {
    pub socket_path: PathBuf,
    pub port: String,
    /// `None`: a random locally administered address.
    pub mac: Option<String>,
    pub queues: i64,
    pub client: bool,
    pub queue_size: i64,
    pub mtu: i64,
    pub poll_us: i64,
    pub socket_mode: i64,
    pub socket_group: Option<u32>,
    /// Seconds.
    pub handshake_timeout: f64,
}

impl Settings {
    /// The defaults, on `socket_path`.
    pub fn new(socket_path: impl Into<PathBuf>) -> Self {
        Self {
            socket_path: socket_path.into(),
            port: "null".into(),
            mac: None,
            queues: 1,
            client: false,
            queue_size: DEFAULT_MAX_QUEUE_SIZE.into(),
            mtu: DEFAULT_MTU.into(),
            poll_us: DEFAULT_POLL_US.into(),
            socket_mode: 0o600,
            socket_group: None,
            handshake_timeout: Deadlines::default().handshake.as_secs_f64(),
        }
    }

    /// Check every setting against its rule; the first one broken is reported.
    pub fn into_config(self) -> Result<BackendConfig, ConfigError> {
        let port: PortSpec = self.port.parse()?;
        let mut config = BackendConfig::new(self.socket_path, port);
        if let Some(mac) = &self.mac {
            config.mac = mac.parse()?;
        }
        config.client = self.client;
        config.queue_pairs = narrow(self.queues, 1, MAX_QUEUE_PAIRS.into())
            .ok_or(ConfigError::BadQueuePairs(self.queues))?;
        config.max_queue_size = narrow(self.queue_size, 64, 32768)
            .filter(|size: &u16| size.is_power_of_two())
            .ok_or(ConfigError::BadQueueSize(self.queue_size))?;
        config.mtu = narrow(self.mtu, MIN_MTU.into(), MAX_MTU.into())
            .ok_or(ConfigError::BadMtu(self.mtu))?;
        config.poll_us = narrow(self.poll_us, 0, MAX_POLL_US.into())
            .ok_or(ConfigError::BadPollUs(self.poll_us))?;
        config.socket_access = SocketAccess {
            mode: narrow(self.socket_mode, 0, 0o777)
                .ok_or(ConfigError::BadSocketMode(self.socket_mode))?,
            group: self.socket_group,
        };
        let timeout = self.handshake_timeout;
        let deadline = (timeout > 0.0 && timeout <= MAX_DEADLINE.as_secs_f64())
            .then(|| std::time::Duration::try_from_secs_f64(timeout).ok())
            .flatten()
            .ok_or_else(|| ConfigError::BadHandshakeTimeout(timeout.to_string()))?;
        config.deadlines = Deadlines {
            handshake: deadline,
            message: deadline,
        };
        config.validate()?;
        Ok(config)
    }
}

/// `value` in `low..=high`, as the narrower type.
fn narrow<T: TryFrom<i64>>(value: i64, low: i64, high: i64) -> Option<T> {
    (low..=high)
        .contains(&value)
        .then(|| T::try_from(value).ok())
        .flatten()
}

/// Everything needed to run one standby device.
#[derive(Clone, Debug)]
pub struct BackendConfig {
    /// The vhost-user socket.
    pub socket_path: PathBuf,
    /// Connect to a socket the frontend listens on instead of listening ourselves.
    pub client: bool,
    pub port: PortSpec,
    /// The guest's MAC, used for host-side announcements.
    pub mac: MacAddr,
    pub queue_pairs: u16,
    pub max_queue_size: u16,
    pub mtu: u16,
    /// Keep polling the rings this long (µs) after the last frame moved, with the
    /// guest's kicks suppressed; 0 sleeps in epoll after every pass.
    pub poll_us: u32,
    /// Who may connect to the socket (server mode).
    pub socket_access: SocketAccess,
    /// How long a frontend may take to send its first request, and to finish one.
    pub deadlines: Deadlines,
}

impl BackendConfig {
    pub fn new(socket_path: impl Into<PathBuf>, port: PortSpec) -> Self {
        Self {
            socket_path: socket_path.into(),
            client: false,
            port,
            mac: MacAddr::random(),
            queue_pairs: 1,
            max_queue_size: DEFAULT_MAX_QUEUE_SIZE,
            mtu: DEFAULT_MTU,
            poll_us: DEFAULT_POLL_US,
            socket_access: SocketAccess::default(),
            deadlines: Deadlines::default(),
        }
    }

    /// Check every field; the first bad one is reported.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.socket_path.as_os_str().is_empty() {
            return Err(ConfigError::EmptySocketPath);
        }
        if self.queue_pairs == 0 || self.queue_pairs > MAX_QUEUE_PAIRS {
            return Err(ConfigError::BadQueuePairs(self.queue_pairs.into()));
        }
        if !self.max_queue_size.is_power_of_two() || self.max_queue_size < 64 {
            return Err(ConfigError::BadQueueSize(self.max_queue_size.into()));
        }
        if self.mtu < MIN_MTU {
            return Err(ConfigError::BadMtu(self.mtu.into()));
        }
        if self.poll_us > MAX_POLL_US {
            return Err(ConfigError::BadPollUs(self.poll_us.into()));
        }
        if self.mac.is_multicast() {
            return Err(ConfigError::MulticastMac(self.mac));
        }
        if self.socket_access.mode > 0o777 {
            return Err(ConfigError::BadSocketMode(self.socket_access.mode.into()));
        }
        for deadline in [self.deadlines.handshake, self.deadlines.message] {
            if deadline.is_zero() || deadline > MAX_DEADLINE {
                return Err(ConfigError::BadHandshakeTimeout(
                    deadline.as_secs_f64().to_string(),
                ));
            }
        }
        Ok(())
    }

    /// Number of virtqueues: one receive and one transmit queue per pair.
    pub fn num_queues(&self) -> usize {
        2 * self.queue_pairs as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_generators_and_says_what_is_wrong() {
        let generator = |size, rate, count| Ok(PortSpec::Gen(GenSpec { size, rate, count }));
        assert_eq!("gen:64".parse(), generator(64, None, None));
        assert_eq!(
            "gen:1518,rate=1000".parse(),
            generator(1518, Some(1000), None)
        );
        assert_eq!(
            "gen:60,count=5,rate=7".parse(),
            generator(60, Some(7), Some(5))
        );
        for spec in ["gen:64", "gen:1518,rate=1000", "gen:9018,rate=1,count=2"] {
            assert_eq!(spec.parse::<PortSpec>().unwrap().to_string(), spec);
        }
        for (spec, says) in [
            ("gen:", "frame size: expected 60 to 9018 bytes, got \"\""),
            ("gen:59", "got \"59\""),
            ("gen:9019", "got \"9019\""),
            (
                "gen:64,rate=0",
                "rate: expected a whole number above 0, got \"0\"",
            ),
            ("gen:64,count=x", "count: expected a whole number above 0"),
            (
                "gen:64,rate",
                "rate: expected a whole number above 0, got \"\"",
            ),
            (
                "gen:64,burst=3",
                "option: expected rate=FPS or count=N, got \"burst=3\"",
            ),
            ("gen:64,rate=1,rate=2", "option rate given twice"),
        ] {
            let message = spec.parse::<PortSpec>().unwrap_err().to_string();
            assert!(message.starts_with("gen "), "{spec}: {message}");
            assert!(message.contains(says), "{spec}: {message}");
        }
    }

    #[test]
    fn parses_ports() {
        assert_eq!("null".parse(), Ok(PortSpec::Null));
        assert_eq!("loop".parse(), Ok(PortSpec::Loop));
        assert_eq!("sink".parse(), Ok(PortSpec::Sink));
        assert_eq!(PortSpec::Sink.to_string(), "sink");
        assert_eq!("tap:fb0".parse(), Ok(PortSpec::Tap { name: "fb0".into() }));
        assert_eq!(
            "tap:".parse::<PortSpec>(),
            Err(ConfigError::BadTapName(String::new()))
        );
        assert!(matches!(
            "tap:name-that-is-too-long".parse::<PortSpec>(),
            Err(ConfigError::BadTapName(_))
        ));
        assert!(matches!(
            "udp:1.2.3.4".parse::<PortSpec>(),
            Err(ConfigError::UnknownPort(_))
        ));
    }

    #[test]
    fn parses_and_prints_macs() {
        let mac: MacAddr = "52:54:00:AB:cd:01".parse().unwrap();
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:01");
        for bad in [
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:01:02",
            "52-54-00-ab-cd-01",
            "zz:54:00:ab:cd:01",
            "5:54:00:ab:cd:01",
        ] {
            assert!(
                matches!(bad.parse::<MacAddr>(), Err(ConfigError::BadMac(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            "01:00:5e:00:00:01".parse::<MacAddr>(),
            Err(ConfigError::MulticastMac(_))
        ));
    }

    #[test]
    fn random_mac_is_local_unicast() {
        let mac = MacAddr::random();
        assert!(!mac.is_multicast());
        assert_eq!(mac.0[0] & 2, 2);
    }

    #[test]
    fn validates_fields() {
        let mut config = BackendConfig::new("/tmp/x.sock", PortSpec::Null);
        assert_eq!(config.validate(), Ok(()));
        config.queue_pairs = 0;
        assert_eq!(config.validate(), Err(ConfigError::BadQueuePairs(0)));
        config.queue_pairs = 2;
        assert_eq!(config.num_queues(), 4);
        config.max_queue_size = 1000;
        assert_eq!(config.validate(), Err(ConfigError::BadQueueSize(1000)));
        config.max_queue_size = 1024;
        config.poll_us = MAX_POLL_US + 1;
        assert_eq!(
            config.validate(),
            Err(ConfigError::BadPollUs(i64::from(MAX_POLL_US) + 1))
        );
    }

    #[test]
    fn settings_are_checked_wide_and_name_themselves() {
        let bad = |change: fn(&mut Settings)| {
            let mut settings = Settings::new("/tmp/x.sock");
            change(&mut settings);
            let err = settings.into_config().unwrap_err();
            (err.setting(), err.to_string())
        };
        assert!(Settings::new("/tmp/x.sock").into_config().is_ok());
        // Past the device's own types too: 70000 is no u16, -1 no u32.
        assert_eq!(
            bad(|s| s.mtu = 70_000),
            ("mtu", "must be between 68 and 65535, got 70000".into())
        );
        assert_eq!(bad(|s| s.poll_us = -1).0, "poll_us");
        assert_eq!(bad(|s| s.queues = 17).0, "queues");
        assert_eq!(bad(|s| s.queue_size = 1000).0, "queue_size");
        assert_eq!(bad(|s| s.queue_size = 65536).0, "queue_size");
        assert_eq!(
            bad(|s| s.socket_mode = 0o1000),
            (
                "socket_mode",
                "expected permission bits up to 0o777, got 0o1000".into()
            )
        );
        assert_eq!(
            bad(|s| s.handshake_timeout = f64::NAN).0,
            "handshake_timeout"
        );
        assert_eq!(bad(|s| s.handshake_timeout = 0.0).0, "handshake_timeout");
        assert_eq!(bad(|s| s.port = "tap:a/b".into()).0, "port");
        assert_eq!(bad(|s| s.mac = Some("01:00:5e:00:00:01".into())).0, "mac");
        assert_eq!(bad(|s| s.socket_path = PathBuf::new()).0, "socket_path");
    }
}
