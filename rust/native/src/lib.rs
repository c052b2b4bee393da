//! `failover_backend._native`: the standby device as a Python object.
//!
//! Wrappers only. Every call that can wait (stop, event and state waits) releases
//! the GIL, so the datapath threads, which may log through Python, never wait on
//! a thread that holds it.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, UNIX_EPOCH};

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use standby_net::{
    describe, virtio_net, BackendConfig, ConnectionState, Deadlines, DeviceEvent, DeviceHandle,
    MacAddr, PortSpec, Server, ServerError, SocketAccess, SteeringMode, TimedEvent,
};

create_exception!(
    _native,
    BackendError,
    PyException,
    "The standby backend could not do what was asked (socket, port, announcement)."
);

/// The one place core errors become Python exceptions: configuration mistakes are
/// `ValueError`, everything else `BackendError`; the message carries the whole cause chain.
fn to_py_err(err: ServerError) -> PyErr {
    if let ServerError::InvalidConfig(config) = &err {
        // "field: what is wrong", so Python can name the field.
        return PyValueError::new_err(config.to_string());
    }
    BackendError::new_err(standby_net::describe_chain(&err))
}

fn config_err(err: standby_net::ConfigError) -> PyErr {
    to_py_err(ServerError::InvalidConfig(err))
}

fn parse_state(name: &str) -> PyResult<ConnectionState> {
    Ok(match name {
        "stopped" => ConnectionState::Stopped,
        "listening" => ConnectionState::Listening,
        "connecting" => ConnectionState::Connecting,
        "connected" => ConnectionState::Connected,
        "failed" => ConnectionState::Failed,
        other => return Err(PyValueError::new_err(format!("unknown state {other:?}"))),
    })
}

fn event_dict<'py>(py: Python<'py>, timed: &TimedEvent) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    let time = timed
        .time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    dict.set_item("time", time)?;
    dict.set_item("kind", timed.event.kind())?;
    dict.set_item("message", describe(&timed.event))?;
    match &timed.event {
        DeviceEvent::Listening { path } | DeviceEvent::Connecting { path } => {
            dict.set_item("path", path)?
        }
        DeviceEvent::Connected { connection } | DeviceEvent::Refused { connection } => {
            dict.set_item("connection", connection)?
        }
        DeviceEvent::FeaturesAcked { features } => dict.set_item("features", features)?,
        DeviceEvent::MemoryMapped { regions, bytes } => {
            dict.set_item("regions", regions)?;
            dict.set_item("bytes", bytes)?;
        }
        DeviceEvent::DirtyLogging { on } => dict.set_item("on", on)?,
        DeviceEvent::Disconnected { connection, reason } => {
            dict.set_item("connection", connection)?;
            dict.set_item("reason", reason)?;
        }
        DeviceEvent::Announced { frames, answering } => {
            dict.set_item("frames", frames)?;
            dict.set_item("answering", answering)?;
        }
        DeviceEvent::SteeringMode { mode, reason } => {
            dict.set_item("mode", mode)?;
            dict.set_item("why", reason)?;
        }
        DeviceEvent::PathChanged { path, reason } => {
            dict.set_item("path", path)?;
            dict.set_item("why", reason)?;
        }
        DeviceEvent::Failed { reason } => dict.set_item("reason", reason)?,
        DeviceEvent::Stopped => {}
    }
    Ok(dict)
}

/// A vhost-user virtio-net standby device (see `failover_backend.StandbyBackend`).
#[pyclass(module = "failover_backend._native", frozen)]
struct NativeBackend {
    server: Mutex<Server>,
    device: DeviceHandle,
}

#[pymethods]
impl NativeBackend {
    #[new]
    // One parameter per Python keyword argument.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (socket_path, *, port = "null", mac = None, queues = 1, client = false, queue_size = 1024, mtu = 1500, poll_us = 50, socket_mode = 0o600, socket_group = None, handshake_timeout = 5.0))]
    fn new(
        py: Python<'_>,
        socket_path: PathBuf,
        port: &str,
        mac: Option<&str>,
        queues: u16,
        client: bool,
        queue_size: u16,
        mtu: u16,
        poll_us: u32,
        socket_mode: u32,
        socket_group: Option<u32>,
        handshake_timeout: f64,
    ) -> PyResult<Self> {
        let port: PortSpec = port.parse().map_err(config_err)?;
        let mut config = BackendConfig::new(socket_path, port);
        if let Some(mac) = mac {
            config.mac = mac.parse::<MacAddr>().map_err(config_err)?;
        }
        config.queue_pairs = queues;
        config.client = client;
        config.max_queue_size = queue_size;
        config.mtu = mtu;
        config.poll_us = poll_us;
        config.socket_access = SocketAccess {
            mode: socket_mode,
            group: socket_group,
        };
        let deadline = Duration::try_from_secs_f64(handshake_timeout).map_err(|_| {
            PyValueError::new_err(format!(
                "handshake timeout: expected seconds, got {handshake_timeout}"
            ))
        })?;
        config.deadlines = Deadlines {
            handshake: deadline,
            message: deadline,
        };
        let server = py.detach(|| Server::new(config)).map_err(to_py_err)?;
        Ok(Self {
            device: server.handle(),
            server: Mutex::new(server),
        })
    }

    /// Start serving (server mode: the socket exists when this returns).
    fn start(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.lock().start()).map_err(to_py_err)
    }

    /// Close the connection, stop, remove the socket. Safe to call twice.
    fn stop(&self, py: Python<'_>) {
        py.detach(|| self.lock().stop());
    }

    #[getter]
    fn state(&self) -> &'static str {
        self.device.state().as_str()
    }

    /// Why the device stopped serving for good, if it has.
    #[getter]
    fn failure(&self) -> Option<String> {
        self.device.failure()
    }

    #[getter]
    fn socket_path(&self) -> String {
        self.device.config().socket_path.display().to_string()
    }

    #[getter]
    fn mac(&self) -> String {
        self.device.config().mac.to_string()
    }

    #[getter]
    fn port(&self) -> String {
        self.device.config().port.to_string()
    }

    #[getter]
    fn queues(&self) -> u16 {
        self.device.config().queue_pairs
    }

    #[getter]
    fn client(&self) -> bool {
        self.device.config().client
    }

    #[getter]
    fn mtu(&self) -> u16 {
        self.device.config().mtu
    }

    #[getter]
    fn poll_us(&self) -> u32 {
        self.device.config().poll_us
    }

    /// Counters of every virtqueue.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.device
            .stats()
            .iter()
            .map(|q| {
                let dict = PyDict::new(py);
                dict.set_item("queue", q.queue)?;
                dict.set_item("direction", if q.is_rx() { "rx" } else { "tx" })?;
                dict.set_item("packets", q.packets)?;
                dict.set_item("bytes", q.bytes)?;
                dict.set_item("drops", q.drops)?;
                dict.set_item("errors", q.errors)?;
                Ok(dict)
            })
            .collect()
    }

    /// Offered and acked features of the current (or last) connection.
    fn negotiation<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let n = self.device.negotiation();
        let dict = PyDict::new(py);
        dict.set_item("offered_features", n.offered_features)?;
        dict.set_item("acked_features", n.acked_features)?;
        dict.set_item("offered_protocol_features", n.offered_protocol_features)?;
        dict.set_item("dirty_logging", n.dirty_logging)?;
        dict.set_item("connections", n.connections)?;
        Ok(dict)
    }

    /// Events from sequence number `since` on, waiting up to `timeout` seconds for
    /// the first; returns them with the number to pass next time.
    #[pyo3(signature = (since = 0, timeout = 0.0))]
    fn events<'py>(
        &self,
        py: Python<'py>,
        since: u64,
        timeout: f64,
    ) -> PyResult<(Vec<Bound<'py, PyDict>>, u64)> {
        let timeout = Duration::from_secs_f64(timeout.max(0.0));
        let (events, next) = py.detach(|| self.device.events_since(since, timeout));
        let dicts = events
            .iter()
            .map(|event| event_dict(py, event))
            .collect::<PyResult<_>>()?;
        Ok((dicts, next))
    }

    /// Wait up to `timeout` seconds for one of `states`; returns the state reached.
    fn wait_state(
        &self,
        py: Python<'_>,
        states: Vec<String>,
        timeout: f64,
    ) -> PyResult<&'static str> {
        let wanted = states
            .iter()
            .map(|s| parse_state(s))
            .collect::<PyResult<Vec<_>>>()?;
        let timeout = Duration::from_secs_f64(timeout.max(0.0));
        let state = py.detach(|| self.device.wait_state(timeout, |s| wanted.contains(&s)));
        Ok(state.as_str())
    }

    /// Send `count` RARP announcements of the guest's MAC on the host port.
    #[pyo3(signature = (count = 1))]
    fn announce(&self, py: Python<'_>, count: u32) -> PyResult<u32> {
        py.detach(|| self.device.announce(count)).map_err(to_py_err)
    }

    /// Tell steering where the guest's primary is: off, standby, releasing, plugged, primary.
    #[pyo3(signature = (mode, reason = ""))]
    fn steer(&self, py: Python<'_>, mode: &str, reason: &str) -> PyResult<()> {
        let mode = SteeringMode::parse(mode).ok_or_else(|| {
            PyValueError::new_err(format!(
                "steering mode: expected off, standby, releasing, plugged or primary, got {mode:?}"
            ))
        })?;
        py.detach(|| self.device.steer(mode, reason))
            .map_err(to_py_err)
    }

    /// Steering's state and counters, `None` for ports without a host switch.
    fn steering<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(status) = self.device.steering_status() else {
            return Ok(None);
        };
        let dict = PyDict::new(py);
        dict.set_item("mode", status.mode.as_str())?;
        dict.set_item("path", status.path.as_str())?;
        dict.set_item("probe_mac", status.probe_mac.to_string())?;
        let addresses: Vec<String> = status
            .guest_addresses
            .iter()
            .map(|a| a.to_string())
            .collect();
        dict.set_item("guest_addresses", addresses)?;
        dict.set_item("announcements", status.announcements)?;
        dict.set_item("probes", status.probes)?;
        dict.set_item("answers", status.answers)?;
        dict.set_item("held_back", status.held_back)?;
        dict.set_item("looped", status.looped)?;
        Ok(Some(dict))
    }
}

impl NativeBackend {
    fn lock(&self) -> std::sync::MutexGuard<'_, Server> {
        self.server.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Names of the virtio-net feature bits set in `features`.
#[pyfunction]
fn feature_names(features: u64) -> Vec<&'static str> {
    virtio_net::feature_names(features)
}

/// Names of the vhost-user protocol feature bits set in `features`.
#[pyfunction]
fn protocol_feature_names(features: u64) -> Vec<&'static str> {
    virtio_net::protocol_feature_names(features)
}

/// The host port `spec` in its canonical spelling; `ValueError` ("port: ...") when it
/// is not one. The CLI and the TOML loader check ports here, with the core's rules.
#[pyfunction]
fn parse_port(spec: &str) -> PyResult<String> {
    spec.parse::<PortSpec>()
        .map(|port| port.to_string())
        .map_err(config_err)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Rust log records go to Python's `logging` (logger names follow the Rust modules).
    let _ = pyo3_log::try_init();
    m.add_class::<NativeBackend>()?;
    m.add("BackendError", m.py().get_type::<BackendError>())?;
    m.add_function(wrap_pyfunction!(feature_names, m)?)?;
    m.add_function(wrap_pyfunction!(protocol_feature_names, m)?)?;
    m.add_function(wrap_pyfunction!(parse_port, m)?)?;
    m.add("F_STANDBY", virtio_net::F_STANDBY)?;
    m.add("F_LOG_ALL", virtio_net::F_LOG_ALL)?;
    m.add("F_MRG_RXBUF", virtio_net::F_MRG_RXBUF)?;
    m.add("F_VERSION_1", virtio_net::F_VERSION_1)?;
    m.add("F_MQ", virtio_net::F_MQ)?;
    Ok(())
}
