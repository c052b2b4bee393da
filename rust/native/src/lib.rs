//! `failover_backend._native`: the standby device as a Python object.
//!
//! Wrappers only. Every call that can wait (start, stop, announcements) releases the
//! GIL, so the datapath threads, which may log through Python, never wait on a thread
//! that holds it. Python waits for changes on `change_fd`, in its event loop.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, UNIX_EPOCH};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use pyo3::{create_exception, import_exception};
use standby_net::{
    describe, virtio_net, DeviceEvent, DeviceHandle, Server, ServerError, Settings, SteeringMode,
    TimedEvent,
};

// The package's own class, so Python code catches one `BackendError` whoever raised it.
import_exception!(failover_backend.errors, BackendError);

create_exception!(
    _native,
    SettingError,
    PyValueError,
    "A backend setting breaks its rule: args are (setting, rule)."
);

/// The one place core errors become Python exceptions: configuration mistakes are
/// `SettingError`, everything else `BackendError`; the message carries the whole cause chain.
fn to_py_err(err: ServerError) -> PyErr {
    if let ServerError::InvalidConfig(config) = &err {
        return config_err(config);
    }
    BackendError::new_err(standby_net::describe_chain(&err))
}

/// `SettingError(setting, rule)`: Python names the setting as its user wrote it.
fn config_err(err: &standby_net::ConfigError) -> PyErr {
    SettingError::new_err((err.setting(), err.to_string()))
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
        queues: i64,
        client: bool,
        queue_size: i64,
        mtu: i64,
        poll_us: i64,
        socket_mode: i64,
        socket_group: Option<u32>,
        handshake_timeout: f64,
    ) -> PyResult<Self> {
        let config = Settings {
            socket_path,
            port: port.to_string(),
            mac: mac.map(str::to_string),
            queues,
            client,
            queue_size,
            mtu,
            poll_us,
            socket_mode,
            socket_group,
            handshake_timeout,
        }
        .into_config()
        .map_err(|e| config_err(&e))?;
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

    /// An eventfd (non-blocking) that becomes readable after every change of state,
    /// negotiation or events; drain it (read 8 bytes) before reading what changed.
    /// Owned by this object: duplicate it to keep it past this object's life.
    #[getter]
    fn change_fd(&self) -> i32 {
        self.device.change_fd()
    }

    /// Events from sequence number `since` on, with the number to pass next time
    /// (wait for them on `change_fd`).
    #[pyo3(signature = (since = 0))]
    fn events<'py>(&self, py: Python<'py>, since: u64) -> PyResult<(Vec<Bound<'py, PyDict>>, u64)> {
        let (events, next) = self.device.events_since(since, Duration::ZERO);
        let dicts = events
            .iter()
            .map(|event| event_dict(py, event))
            .collect::<PyResult<_>>()?;
        Ok((dicts, next))
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

/// Check backend settings without opening anything: `(port, mac)` in their canonical
/// spelling (`mac` `None` when not given), or `SettingError(setting, rule)`. The CLI
/// and the TOML loader check here, with the rules `NativeBackend` applies.
#[pyfunction]
// One parameter per Python keyword argument.
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (socket_path, *, port = "null", mac = None, queues = 1, client = false, queue_size = 1024, mtu = 1500, poll_us = 50, socket_mode = 0o600, socket_group = None, handshake_timeout = 5.0))]
fn check_settings(
    socket_path: PathBuf,
    port: &str,
    mac: Option<&str>,
    queues: i64,
    client: bool,
    queue_size: i64,
    mtu: i64,
    poll_us: i64,
    socket_mode: i64,
    socket_group: Option<u32>,
    handshake_timeout: f64,
) -> PyResult<(String, Option<String>)> {
    let config = Settings {
        socket_path,
        port: port.to_string(),
        mac: mac.map(str::to_string),
        queues,
        client,
        queue_size,
        mtu,
        poll_us,
        socket_mode,
        socket_group,
        handshake_timeout,
    }
    .into_config()
    .map_err(|e| config_err(&e))?;
    Ok((config.port.to_string(), mac.map(|_| config.mac.to_string())))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Rust log records go to Python's `logging` (logger names follow the Rust modules).
    let _ = pyo3_log::try_init();
    m.add_class::<NativeBackend>()?;
    m.add_function(wrap_pyfunction!(feature_names, m)?)?;
    m.add_function(wrap_pyfunction!(protocol_feature_names, m)?)?;
    m.add_function(wrap_pyfunction!(check_settings, m)?)?;
    m.add("SettingError", m.py().get_type::<SettingError>())?;
    m.add("F_STANDBY", virtio_net::F_STANDBY)?;
    m.add("F_LOG_ALL", virtio_net::F_LOG_ALL)?;
    m.add("F_MRG_RXBUF", virtio_net::F_MRG_RXBUF)?;
    m.add("F_VERSION_1", virtio_net::F_VERSION_1)?;
    m.add("F_MQ", virtio_net::F_MQ)?;
    Ok(())
}
