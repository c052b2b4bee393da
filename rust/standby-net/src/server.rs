//! The device's life: listen (or connect), serve one frontend, start over
//! ([`crate::connection`] serves each one). Ports, counters, steering and the event
//! log belong to the device and carry over from one connection to the next.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{BackendConfig, ConfigError};
use crate::connection::{describe_chain, serve_one, ConnectionHandle, HandlerSocket, Served};
use crate::port::{open_ports, OpenPortError, Port, SharedPort};
use crate::public_socket::{bind, BindError, PublicSocket};
use crate::stats::{DeviceCounters, QueueStats};
use crate::status::{ConnectionState, DeviceEvent, DeviceStatus, Negotiation, TimedEvent};
use crate::steering::{Mode, Steering, SteeringPort, SteeringStatus, SteeringThread};
use crate::vhu_net::DeviceOffer;
use crate::virtio_net::{protocol_features, BASE_FEATURES, F_MQ};

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("invalid setting {}", .0.setting())]
    InvalidConfig(#[from] ConfigError),
    #[error("cannot open the host port")]
    OpenPort(#[from] OpenPortError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("cannot create the stop event")]
    StopEvent(#[source] io::Error),
    #[error("cannot create the status change event")]
    ChangeEvent(#[source] io::Error),
    #[error("cannot start the connection thread")]
    SpawnThread(#[source] io::Error),
    #[error("already started")]
    AlreadyStarted,
    #[error("the host port cannot reach the host's switch (port {port}; steering needs tap:NAME)")]
    CannotSteer { port: String },
    #[error("cannot start the steering thread")]
    SpawnSteering(#[source] io::Error),
    #[error("cannot send an announcement on {interface}")]
    Announce {
        interface: String,
        #[source]
        source: io::Error,
    },
}

/// What the connection thread and any reader share.
pub(crate) struct Shared {
    pub(crate) config: BackendConfig,
    pub(crate) offer: DeviceOffer,
    pub(crate) ports: Vec<SharedPort>,
    /// Present when the port reaches a host switch (TAP).
    pub(crate) steering: Option<Arc<Steering>>,
    pub(crate) counters: Arc<DeviceCounters>,
    pub(crate) status: Arc<DeviceStatus>,
    pub(crate) stopping: AtomicBool,
    pub(crate) stop_event: EventFd,
    /// Ends the current connection from outside (stop).
    pub(crate) connection: Mutex<Option<ConnectionHandle>>,
}

/// A cheap handle to read a running device and act on it.
#[derive(Clone)]
pub struct DeviceHandle {
    shared: Arc<Shared>,
}

impl DeviceHandle {
    pub fn state(&self) -> ConnectionState {
        self.shared.status.state()
    }

    pub fn negotiation(&self) -> Negotiation {
        self.shared.status.negotiation()
    }

    /// Why the device stopped serving for good (state `failed`), if it has: it does
    /// not recover by itself; restart it.
    pub fn failure(&self) -> Option<String> {
        self.shared.status.failure()
    }

    pub fn stats(&self) -> Vec<QueueStats> {
        self.shared.counters.snapshot()
    }

    pub fn config(&self) -> &BackendConfig {
        &self.shared.config
    }

    /// Events from sequence number `from` on; waits up to `timeout` for the first one.
    /// Readable after every change of state, negotiation or events (see
    /// [`DeviceStatus::change_fd`]).
    pub fn change_fd(&self) -> std::os::fd::RawFd {
        self.shared.status.change_fd()
    }

    pub fn events_since(&self, from: u64, timeout: Duration) -> (Vec<TimedEvent>, u64) {
        self.shared.status.events_since(from, timeout)
    }

    pub fn wait_state(
        &self,
        timeout: Duration,
        done: impl Fn(ConnectionState) -> bool,
    ) -> ConnectionState {
        self.shared.status.wait_state(timeout, done)
    }

    fn steering(&self) -> Result<&Steering, ServerError> {
        self.shared
            .steering
            .as_deref()
            .ok_or_else(|| ServerError::CannotSteer {
                port: self.shared.config.port.to_string(),
            })
    }

    /// Send `count` announcements of the guest's MAC on the host side.
    pub fn announce(&self, count: u32) -> Result<u32, ServerError> {
        let steering = self.steering()?;
        let sent = steering
            .announce(count)
            .map_err(|source| ServerError::Announce {
                interface: steering.interface().to_string(),
                source,
            })?;
        self.shared.status.push(DeviceEvent::Announced {
            frames: sent,
            answering: false,
        });
        Ok(sent)
    }

    /// Tell steering where the guest's primary is (see [`crate::steering`]).
    pub fn steer(&self, mode: Mode, reason: &str) -> Result<(), ServerError> {
        self.steering()?.set_mode(mode, reason);
        Ok(())
    }

    /// Steering's state and counters; `None` for ports without a host switch.
    pub fn steering_status(&self) -> Option<SteeringStatus> {
        self.shared.steering.as_ref().map(|s| s.status())
    }
}

/// A standby device serving one vhost-user socket.
pub struct Server {
    shared: Arc<Shared>,
    socket: Option<PublicSocket>,
    thread: Option<JoinHandle<()>>,
    steering_thread: Option<SteeringThread>,
}

impl Server {
    /// Check the configuration and open the host ports; nothing listens yet.
    pub fn new(config: BackendConfig) -> Result<Self, ServerError> {
        config.validate()?;
        let opened = open_ports(&config.port, config.queue_pairs, config.mac, config.mtu)?;
        let multi_queue = config.queue_pairs > 1;
        let mut features = BASE_FEATURES | opened.offload_features;
        if multi_queue {
            features |= F_MQ;
        }
        let offer = DeviceOffer {
            queue_pairs: config.queue_pairs,
            max_queue_size: config.max_queue_size,
            poll: Duration::from_micros(u64::from(config.poll_us)),
            features,
            protocol_features: protocol_features(),
        };
        let status = Arc::new(
            DeviceStatus::new(offer.features, offer.protocol_features.bits())
                .map_err(ServerError::ChangeEvent)?,
        );
        let steering = opened
            .host_side
            .map(|host| Steering::new(config.mac, host, Arc::clone(&status)));
        let ports = opened
            .ports
            .into_iter()
            .map(|port| {
                let port: Box<dyn Port> = match &steering {
                    Some(steering) => Box::new(SteeringPort::new(port, Arc::clone(steering))),
                    None => port,
                };
                Arc::new(Mutex::new(port))
            })
            .collect();
        let shared = Shared {
            counters: Arc::new(DeviceCounters::new(config.num_queues())),
            config,
            offer,
            ports,
            steering,
            status,
            stopping: AtomicBool::new(false),
            stop_event: EventFd::new(EFD_NONBLOCK).map_err(ServerError::StopEvent)?,
            connection: Mutex::new(None),
        };
        Ok(Self {
            shared: Arc::new(shared),
            socket: None,
            thread: None,
            steering_thread: None,
        })
    }

    pub fn handle(&self) -> DeviceHandle {
        DeviceHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Start serving. In server mode the socket is bound before this returns, so a
    /// frontend started right after finds it; the state is `Listening` (`Connecting`
    /// in client mode) by then, so a wait begun right after never sees `Stopped`.
    pub fn start(&mut self) -> Result<(), ServerError> {
        if self.thread.is_some() {
            return Err(ServerError::AlreadyStarted);
        }
        let config = &self.shared.config;
        if !config.client {
            self.socket = Some(bind(&config.socket_path, config.socket_access)?);
        }
        if let Some(steering) = &self.shared.steering {
            self.steering_thread = Some(steering.spawn().map_err(ServerError::SpawnSteering)?);
        }
        self.shared.status.set_state(if config.client {
            ConnectionState::Connecting
        } else {
            ConnectionState::Listening
        });
        let shared = Arc::clone(&self.shared);
        let socket = self.socket.take();
        let thread = thread::Builder::new()
            .name("vhost-user-conn".to_string())
            .spawn(move || run(&shared, socket))
            .map_err(|e| {
                self.shared.status.set_state(ConnectionState::Stopped);
                ServerError::SpawnThread(e)
            })?;
        self.thread = Some(thread);
        Ok(())
    }

    /// Close the connection, stop listening, remove the socket. Idempotent.
    pub fn stop(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        let _ = self.shared.stop_event.write(1);
        if let Some(connection) = lock(&self.shared.connection).as_ref() {
            connection.shutdown();
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("the connection thread panicked");
            }
        }
        if let Some(thread) = self.steering_thread.take() {
            if let Some(steering) = &self.shared.steering {
                steering.set_mode(Mode::Off, "backend stopped");
            }
            drop(thread);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn run(shared: &Shared, socket: Option<PublicSocket>) {
    let status = &shared.status;
    let mut handler_socket = match HandlerSocket::new() {
        Ok(handler_socket) => handler_socket,
        Err(e) => {
            status.set_state(ConnectionState::Failed);
            status.push(DeviceEvent::Failed {
                reason: format!("cannot create the handler socket: {e}"),
            });
            return;
        }
    };
    let mut connection = 0u64;
    loop {
        if shared.stopping.load(Ordering::Acquire) {
            break;
        }
        match serve_one(
            shared,
            socket.as_ref(),
            &mut handler_socket,
            &mut connection,
        ) {
            Ok(Served::Disconnected) => continue,
            Ok(Served::Stopped) => break,
            Err(err) => {
                let reason = describe_chain(&err);
                log::error!("the device cannot serve any more: {reason}");
                status.set_state(ConnectionState::Failed);
                status.push(DeviceEvent::Failed { reason });
                return;
            }
        }
    }
    // Dropping the socket removes its file.
    drop(socket);
    status.set_state(ConnectionState::Stopped);
    status.push(DeviceEvent::Stopped);
}
