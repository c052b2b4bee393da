//! The device's life: listen (or connect), serve one frontend, start over.
//!
//! Each connection gets a fresh `VhostUserNet` and `VhostUserDaemon`, so nothing a
//! previous frontend negotiated or mapped leaks into the next one; ports, counters
//! and the event log belong to the device and carry over. The frontend's socket
//! reaches the daemon through a [`FrontendGate`] (see there for why).

use std::io;
use std::net::Shutdown;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use thiserror::Error;
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{BackendConfig, ConfigError};
use crate::frontend_gate::{FrontendGate, Limits};
use crate::port::{open_ports, OpenPortError, Port, SharedPort};
use crate::public_socket::{bind, BindError, PublicSocket};
use crate::stats::{DeviceCounters, QueueStats};
use crate::status::{ConnectionState, DeviceEvent, DeviceStatus, Negotiation, TimedEvent};
use crate::steering::{Mode, Steering, SteeringPort, SteeringStatus, SteeringThread};
use crate::vhu_net::{DeviceOffer, VhostUserNet};
use crate::virtio_net::{protocol_features, BASE_FEATURES, F_MQ};

/// What `vhost-user-backend` answers to GET_MAX_MEM_SLOTS (its own constant).
const MAX_MEM_SLOTS: u64 = 509;

/// How often client mode retries a frontend socket that is not there yet.
const CONNECT_RETRY: Duration = Duration::from_millis(100);

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("invalid configuration")]
    InvalidConfig(#[from] ConfigError),
    #[error("cannot open the host port")]
    OpenPort(#[from] OpenPortError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("cannot create the stop event")]
    StopEvent(#[source] io::Error),
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
struct Shared {
    config: BackendConfig,
    offer: DeviceOffer,
    ports: Vec<SharedPort>,
    /// Present when the port reaches a host switch (TAP).
    steering: Option<Arc<Steering>>,
    counters: Arc<DeviceCounters>,
    status: Arc<DeviceStatus>,
    stopping: AtomicBool,
    stop_event: EventFd,
    /// Ends the current connection from outside (stop).
    connection: Mutex<Option<ConnectionHandle>>,
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

/// What closes the current connection: the frontend's socket and the handler's.
struct ConnectionHandle {
    frontend: UnixStream,
    handler: Option<ShutdownHandle>,
}

impl ConnectionHandle {
    fn shutdown(&self) {
        let _ = self.frontend.shutdown(Shutdown::Both);
        if let Some(handler) = &self.handler {
            handler.shutdown();
        }
    }
}

/// Where `vhost-user-backend` accepts the gate's side of each connection: an abstract
/// socket private to this process.
struct HandlerSocket {
    listener: Listener,
    address: SocketAddr,
}

impl HandlerSocket {
    fn new() -> io::Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "standby-net-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let address = SocketAddr::from_abstract_name(name.as_bytes())?;
        let listener = Listener::from(UnixListener::bind_addr(&address)?);
        Ok(Self { listener, address })
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
        let opened = open_ports(&config.port, config.queue_pairs)?;
        let multi_queue = config.queue_pairs > 1;
        let mut features = BASE_FEATURES | opened.offload_features;
        if multi_queue {
            features |= F_MQ;
        }
        let offer = DeviceOffer {
            queue_pairs: config.queue_pairs,
            max_queue_size: config.max_queue_size,
            features,
            protocol_features: protocol_features(),
        };
        let status = Arc::new(DeviceStatus::new(
            offer.features,
            offer.protocol_features.bits(),
        ));
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
    /// frontend started right after finds it.
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
        let shared = Arc::clone(&self.shared);
        let socket = self.socket.take();
        let thread = thread::Builder::new()
            .name("vhost-user-conn".to_string())
            .spawn(move || run(&shared, socket))
            .map_err(ServerError::SpawnThread)?;
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

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// How one connection ended.
enum Served {
    Disconnected,
    Stopped,
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
            Err(reason) => {
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

/// Wait for the frontend: accept on our socket, or connect to its socket.
fn frontend_connection(
    shared: &Shared,
    socket: Option<&PublicSocket>,
) -> Result<Option<UnixStream>, String> {
    let status = &shared.status;
    let path = shared.config.socket_path.display().to_string();
    match socket {
        Some(socket) => {
            status.set_state(ConnectionState::Listening);
            status.push(DeviceEvent::Listening { path });
            if !wait_readable(socket.listener.as_raw_fd(), &shared.stop_event)? {
                return Ok(None);
            }
            let (stream, _) = socket
                .listener
                .accept()
                .map_err(|e| format!("cannot accept on {}: {e}", socket.path.display()))?;
            Ok(Some(stream))
        }
        None => {
            status.set_state(ConnectionState::Connecting);
            status.push(DeviceEvent::Connecting { path: path.clone() });
            loop {
                match UnixStream::connect(&shared.config.socket_path) {
                    Ok(stream) => return Ok(Some(stream)),
                    Err(e) => {
                        log::debug!("frontend socket {path} not ready: {e}");
                        if wait_stop(&shared.stop_event, CONNECT_RETRY) {
                            return Ok(None);
                        }
                    }
                }
            }
        }
    }
}

/// While a frontend is connected, later ones are accepted and closed at once, with
/// the reason logged: left in the listen queue they would hang in their handshake
/// with no word why. A QEMU with `reconnect=N` tries again until this one leaves.
/// Once the current frontend has hung up, newcomers wait for the next accept.
struct RefuseWhileBusy {
    done: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl RefuseWhileBusy {
    fn start(
        listener: &UnixListener,
        frontend: &UnixStream,
        status: Arc<DeviceStatus>,
        connection: u64,
    ) -> io::Result<Self> {
        let listener = listener.try_clone()?;
        let frontend = frontend.try_clone()?;
        let done = EventFd::new(EFD_NONBLOCK)?;
        let done_for_thread = done.try_clone()?;
        let thread = thread::Builder::new()
            .name("vhost-user-busy".to_string())
            .spawn(move || {
                while newcomer_while_busy(&listener, &frontend, &done_for_thread) {
                    if let Ok((extra, _)) = listener.accept() {
                        drop(extra);
                        let event = DeviceEvent::Refused { connection };
                        log::warn!("{}", crate::status::describe(&event));
                        status.push(event);
                    }
                }
            })?;
        Ok(Self {
            done,
            thread: Some(thread),
        })
    }
}

/// Wait until another frontend knocks while `frontend` is still there (`true`), or
/// until `frontend` hangs up or `done` fires (`false`).
fn newcomer_while_busy(listener: &UnixListener, frontend: &UnixStream, done: &EventFd) -> bool {
    let mut fds = [
        libc::pollfd {
            fd: done.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: frontend.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        },
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of three pollfd for the duration of the call.
        let ret = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if ret < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        return fds[0].revents == 0 && fds[1].revents == 0 && fds[2].revents != 0;
    }
}

impl Drop for RefuseWhileBusy {
    fn drop(&mut self) {
        let _ = self.done.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The daemon of one connection. Dropping it joins its workers, then closes what
/// `vhost-user-backend` leaves open (see [`VhostUserNet::close_exit_events`]), on
/// every way out of a connection.
struct ConnectionDaemon {
    daemon: Option<VhostUserDaemon<Arc<VhostUserNet>>>,
    backend: Arc<VhostUserNet>,
}

impl ConnectionDaemon {
    fn new(
        backend: &Arc<VhostUserNet>,
        mem: GuestMemoryAtomic<crate::GuestMemory>,
    ) -> Result<Self, String> {
        // Made first: a daemon that fails half way may have taken exit events too.
        let mut guard = Self {
            daemon: None,
            backend: Arc::clone(backend),
        };
        let daemon = VhostUserDaemon::new("vhost-user-net".to_string(), Arc::clone(backend), mem)
            .map_err(|e| format!("cannot create the vhost-user daemon: {e}"))?;
        guard.daemon = Some(daemon);
        Ok(guard)
    }
}

impl std::ops::Deref for ConnectionDaemon {
    type Target = VhostUserDaemon<Arc<VhostUserNet>>;

    fn deref(&self) -> &Self::Target {
        self.daemon.as_ref().expect("present until dropped")
    }
}

impl std::ops::DerefMut for ConnectionDaemon {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.daemon.as_mut().expect("present until dropped")
    }
}

impl Drop for ConnectionDaemon {
    fn drop(&mut self) {
        self.daemon.take();
        self.backend.close_exit_events();
    }
}

/// Serve one frontend from connect to disconnect.
fn serve_one(
    shared: &Shared,
    socket: Option<&PublicSocket>,
    handler_socket: &mut HandlerSocket,
    connection: &mut u64,
) -> Result<Served, String> {
    let status = &shared.status;
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let backend = Arc::new(VhostUserNet::new(
        shared.offer.clone(),
        mem.clone(),
        shared.ports.clone(),
        Arc::clone(&shared.counters),
        Arc::clone(status),
    ));
    let mut daemon = ConnectionDaemon::new(&backend, mem)?;
    backend
        .register_ports(&daemon.get_epoll_handlers())
        .map_err(|e| format!("cannot watch the host port: {e}"))?;

    // Reset before accepting: once accepted, the frontend negotiates on its own thread.
    status.update_negotiation(|n| {
        n.acked_features = None;
        n.dirty_logging = false;
    });
    let Some(frontend) = frontend_connection(shared, socket)? else {
        return Ok(Served::Stopped);
    };
    let handler_side = UnixStream::connect_addr(&handler_socket.address)
        .map_err(|e| format!("cannot reach the request handler: {e}"))?;
    daemon
        .start(&mut handler_socket.listener)
        .map_err(|e| format!("the request handler did not accept: {e}"))?;
    let gate = FrontendGate::start(
        frontend
            .try_clone()
            .map_err(|e| format!("cannot share the frontend socket: {e}"))?,
        handler_side,
        shared.config.deadlines,
        Limits {
            num_queues: shared.offer.queue_pairs as u32 * 2,
            max_queue_size: u32::from(shared.offer.max_queue_size),
            max_mem_slots: MAX_MEM_SLOTS,
        },
    )
    .map_err(|e| format!("cannot start the request gate: {e}"))?;

    backend.attach_frontend(
        frontend
            .try_clone()
            .map_err(|e| format!("cannot share the frontend socket: {e}"))?,
    );
    let frontend_for_busy = frontend
        .try_clone()
        .map_err(|e| format!("cannot share the frontend socket: {e}"))?;
    *connection += 1;
    status.update_negotiation(|n| n.connections = *connection);
    status.set_state(ConnectionState::Connected);
    status.push(DeviceEvent::Connected {
        connection: *connection,
    });
    *lock(&shared.connection) = Some(ConnectionHandle {
        frontend,
        handler: daemon.shutdown_handle(),
    });
    if shared.stopping.load(Ordering::Acquire) {
        if let Some(handle) = lock(&shared.connection).as_ref() {
            handle.shutdown();
        }
    }

    let busy = match socket {
        Some(socket) => Some(
            RefuseWhileBusy::start(
                &socket.listener,
                &frontend_for_busy,
                Arc::clone(status),
                *connection,
            )
            .map_err(|e| format!("cannot watch for other frontends: {e}"))?,
        ),
        None => None,
    };
    let result = daemon.wait();
    drop(busy);
    lock(&shared.connection).take();
    // The handler's side is closed: the gate passes its last reply on, then closes.
    let gate_reason = gate.finish();
    let reason = match result {
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
            VhostUserError::Disconnected | VhostUserError::PartialMessage,
        )) => backend.broken_reason().or(gate_reason),
        // `vhost` closes the connection on any request it refuses; say which.
        Err(e) => Some(format!("request refused, connection closed: {e}")),
    };
    if let Some(reason) = &reason {
        log::warn!("{reason}");
    }
    status.push(DeviceEvent::Disconnected {
        connection: *connection,
        reason,
    });
    // Joins the workers before the ports are reset under them.
    drop(daemon);
    backend.reset_ports();
    status.update_negotiation(|n| n.dirty_logging = false);
    Ok(if shared.stopping.load(Ordering::Acquire) {
        Served::Stopped
    } else {
        Served::Disconnected
    })
}

/// Wait until `fd` is readable (`true`) or the stop event fires (`false`).
fn wait_readable(fd: RawFd, stop: &EventFd) -> Result<bool, String> {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let ret = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("cannot wait for a frontend: {err}"));
        }
        if fds[1].revents != 0 {
            return Ok(false);
        }
        if fds[0].revents != 0 {
            return Ok(true);
        }
    }
}

/// Sleep up to `timeout`; `true` if the stop event fired.
fn wait_stop(stop: &EventFd, timeout: Duration) -> bool {
    let mut fd = libc::pollfd {
        fd: stop.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let ret = unsafe { libc::poll(&mut fd, 1, timeout.as_millis() as libc::c_int) };
    ret > 0
}
