//! A vhost-user virtio-net *standby* device for QEMU's virtio-net failover.
//!
//! QEMU's `virtio-net-pci,failover=on` runs its datapath here over vhost-user: the
//! guest's frames go to a host-side port (TAP, loop or null) and back. The device
//! supports live migration (dirty-page logging) and announces the guest's MAC on
//! the host side when the standby path becomes the active one.
//!
//! Built on rust-vmm: `vhost` parses the protocol, `vhost-user-backend` runs the
//! connection and the vring workers, `virtio-queue` holds each ring's addresses and
//! indices, and `vm-memory` maps and logs guest memory. The per-frame path walks the
//! rings through checked host pointers (`guest_ring`), which is where the speed is.
//!
//! ```no_run
//! use standby_net::{BackendConfig, PortSpec, Server};
//!
//! let mut server = Server::new(BackendConfig::new("/tmp/standby.sock", PortSpec::Loop))?;
//! server.start()?;
//! let device = server.handle();
//! println!("{}", device.state().as_str());
//! server.stop();
//! # Ok::<(), standby_net::ServerError>(())
//! ```

mod config;
mod connection;
mod dirty_log;
mod fault_guard;
mod frontend_gate;
mod frontend_memory;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod guest_ring;
mod port;
mod public_socket;
mod queue_pair;
mod server;
mod stats;
mod status;
pub mod steering;
mod used_ring;
mod vhu_net;
pub mod virtio_net;

use vhost_user_backend::VringRwLock;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

pub use config::{
    BackendConfig, ConfigError, GenSpec, MacAddr, PortSpec, Settings, MAX_QUEUE_PAIRS,
};
pub use connection::describe_chain;
pub use dirty_log::DirtyLog;
pub use frontend_gate::Deadlines;
pub use port::{OpenPortError, OpenTapError};
pub use public_socket::{BindError, SocketAccess};
pub use server::{DeviceHandle, Server, ServerError};
pub use stats::QueueStats;
pub use status::{describe, ConnectionState, DeviceEvent, Negotiation, TimedEvent};
pub use steering::{Mode as SteeringMode, Path as SteeringPath, SteeringStatus};

/// Guest memory as this device maps it: each region logs dirty pages on demand.
pub type GuestMemory = GuestMemoryMmap<DirtyLog>;
/// A vring of that memory, as `vhost-user-backend` hands it over.
pub type Vring = VringRwLock<GuestMemoryAtomic<GuestMemory>>;
