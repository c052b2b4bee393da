//! One frontend connection: wait for it (accept, or connect in client mode), serve
//! it from its first request to its disconnect, and clean up after it.
//!
//! Each connection gets a fresh `VhostUserNet` and `VhostUserDaemon`, so nothing a
//! previous frontend negotiated or mapped leaks into the next one. The frontend's
//! socket reaches the daemon through a [`FrontendGate`] (see there for why). What a
//! frontend does wrong ends its own connection, with the reason in the event log;
//! a [`ConnectionError`] means the device itself cannot go on.

use std::error::Error as StdError;
use std::io;
use std::net::Shutdown;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use thiserror::Error;
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::frontend_gate::{FrontendGate, Limits};
use crate::public_socket::PublicSocket;
use crate::server::{lock, Shared};
use crate::status::{ConnectionState, DeviceEvent, DeviceStatus};
use crate::vhu_net::VhostUserNet;

/// What `vhost-user-backend` answers to GET_MAX_MEM_SLOTS (its own constant).
const MAX_MEM_SLOTS: u64 = 509;

/// How often client mode retries a frontend socket that is not there yet.
const CONNECT_RETRY: Duration = Duration::from_millis(100);

/// The device cannot serve any more frontends (each variant names the step).
#[derive(Debug, Error)]
pub(crate) enum ConnectionError {
    #[error("cannot wait for a frontend")]
    Wait(#[source] io::Error),
    #[error("cannot accept on {path}")]
    Accept {
        path: String,
        #[source]
        source: io::Error,
    },
    // `vhost_user_backend::Error` is no `std::error::Error`: its text goes in ours.
    #[error("cannot create the vhost-user daemon: {0}")]
    Daemon(vhost_user_backend::Error),
    #[error("cannot watch the host port")]
    WatchPort(#[source] io::Error),
    #[error("cannot reach the request handler")]
    ReachHandler(#[source] io::Error),
    #[error("the request handler did not accept: {0}")]
    StartHandler(vhost_user_backend::Error),
    #[error("cannot share the frontend socket")]
    ShareSocket(#[source] io::Error),
    #[error("cannot start the request gate")]
    StartGate(#[source] io::Error),
    #[error("cannot watch for other frontends")]
    WatchNewcomers(#[source] io::Error),
}

/// An error and its causes, one line, for the event log and the operator.
pub fn describe_chain(err: &dyn StdError) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// What closes the current connection: the frontend's socket and the handler's.
pub(crate) struct ConnectionHandle {
    frontend: UnixStream,
    handler: Option<ShutdownHandle>,
}

impl ConnectionHandle {
    pub(crate) fn shutdown(&self) {
        let _ = self.frontend.shutdown(Shutdown::Both);
        if let Some(handler) = &self.handler {
            handler.shutdown();
        }
    }
}

/// Where `vhost-user-backend` accepts the gate's side of each connection: an abstract
/// socket private to this process.
pub(crate) struct HandlerSocket {
    listener: Listener,
    address: SocketAddr,
}

impl HandlerSocket {
    pub(crate) fn new() -> io::Result<Self> {
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

/// How one connection ended.
pub(crate) enum Served {
    Disconnected,
    Stopped,
}

/// Wait for the frontend: accept on our socket, or connect to its socket. `None`
/// when the device is stopped meanwhile.
fn frontend_connection(
    shared: &Shared,
    socket: Option<&PublicSocket>,
) -> Result<Option<UnixStream>, ConnectionError> {
    let status = &shared.status;
    let path = shared.config.socket_path.display().to_string();
    match socket {
        Some(socket) => {
            status.set_state(ConnectionState::Listening);
            status.push(DeviceEvent::Listening { path });
            if !wait_readable(socket.listener.as_raw_fd(), &shared.stop_event)
                .map_err(ConnectionError::Wait)?
            {
                return Ok(None);
            }
            let (stream, _) =
                socket
                    .listener
                    .accept()
                    .map_err(|source| ConnectionError::Accept {
                        path: socket.path.display().to_string(),
                        source,
                    })?;
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
    poll(&mut fds, -1).is_ok() && fds[0].revents == 0 && fds[1].revents == 0 && fds[2].revents != 0
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
    ) -> Result<Self, ConnectionError> {
        // Made first: a daemon that fails half way may have taken exit events too.
        let mut guard = Self {
            daemon: None,
            backend: Arc::clone(backend),
        };
        let daemon = VhostUserDaemon::new("vhost-user-net".to_string(), Arc::clone(backend), mem)
            .map_err(ConnectionError::Daemon)?;
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

/// Serve one frontend from connect to disconnect. An error means the device cannot
/// serve again (its resources are gone), not that this frontend misbehaved: that
/// ends its connection and the next one is served.
pub(crate) fn serve_one(
    shared: &Shared,
    socket: Option<&PublicSocket>,
    handler_socket: &mut HandlerSocket,
    connection: &mut u64,
) -> Result<Served, ConnectionError> {
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
        .map_err(ConnectionError::WatchPort)?;

    // Reset before accepting: once accepted, the frontend negotiates on its own thread.
    status.update_negotiation(|n| {
        n.acked_features = None;
        n.dirty_logging = false;
    });
    let Some(frontend) = frontend_connection(shared, socket)? else {
        return Ok(Served::Stopped);
    };
    let handler_side =
        UnixStream::connect_addr(&handler_socket.address).map_err(ConnectionError::ReachHandler)?;
    daemon
        .start(&mut handler_socket.listener)
        .map_err(ConnectionError::StartHandler)?;
    let share = |stream: &UnixStream| stream.try_clone().map_err(ConnectionError::ShareSocket);
    let gate = FrontendGate::start(
        share(&frontend)?,
        handler_side,
        shared.config.deadlines,
        Limits {
            num_queues: shared.offer.queue_pairs as u32 * 2,
            max_queue_size: u32::from(shared.offer.max_queue_size),
            max_mem_slots: MAX_MEM_SLOTS,
        },
    )
    .map_err(ConnectionError::StartGate)?;

    backend.attach_frontend(share(&frontend)?);
    let frontend_for_busy = share(&frontend)?;
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
            .map_err(ConnectionError::WatchNewcomers)?,
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
fn wait_readable(fd: RawFd, stop: &EventFd) -> io::Result<bool> {
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
        poll(&mut fds, -1)?;
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
    let mut fds = [libc::pollfd {
        fd: stop.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    matches!(poll(&mut fds, timeout.as_millis() as libc::c_int), Ok(n) if n > 0)
}

/// `poll(2)` on `fds`, retried when a signal interrupts it; the number of ready fds.
fn poll(fds: &mut [libc::pollfd], timeout_ms: libc::c_int) -> io::Result<libc::c_int> {
    loop {
        // SAFETY: `fds` is a valid slice of pollfd for the duration of the call.
        let ret = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if ret >= 0 {
            return Ok(ret);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}
