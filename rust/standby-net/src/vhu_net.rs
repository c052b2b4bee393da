//! The vhost-user virtio-net device: what `vhost-user-backend` calls into.
//!
//! One instance lives for one frontend connection. Each queue pair has its own
//! worker thread (`queues_per_thread`), which sees its two vrings as events
//! [`RX_QUEUE_EVENT`] and [`TX_QUEUE_EVENT`], and its port as [`port_event`].

use std::io;
use std::net::Shutdown;
use std::os::unix::io::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler};
use vm_memory::{
    GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryRegion,
    MemoryRegionAddress,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::dirty_log::{self, DirtyLog};
use crate::fault_guard::GuardedRange;
use crate::frontend_memory::check_mappable;
use crate::port::SharedPort;
use crate::queue_pair::{Kicks, LinkParams, QueuePair};
use crate::stats::DeviceCounters;
use crate::status::{DeviceEvent, DeviceStatus};
use crate::virtio_net::{vnet_hdr_len, F_IN_ORDER, F_LOG_ALL, F_MRG_RXBUF, F_RING_PACKED};
use crate::{GuestMemory, Vring};

/// A worker's receive queue (guest buffers posted): the first of its two vrings.
pub const RX_QUEUE_EVENT: u16 = 0;
/// A worker's transmit queue (guest frames sent): the second of its two vrings.
pub const TX_QUEUE_EVENT: u16 = 1;

/// Idle polling passes between two looks at the clock (a pass over idle rings
/// takes well under a microsecond, a clock read about 20 ns).
const IDLE_PASSES_PER_CLOCK: u32 = 16;

/// Polling passes between two checks of the guest memory fault guard.
const PASSES_PER_FAULT_CHECK: u32 = 1024;

/// The port's event id. `vhost-user-backend` reserves ids up to `num_queues` for
/// vrings and its own exit event, so backend events start after that.
pub fn port_event(num_queues: usize) -> u16 {
    num_queues as u16 + 1
}

/// What the device offers, fixed for its lifetime.
#[derive(Clone, Debug)]
pub struct DeviceOffer {
    pub queue_pairs: u16,
    pub max_queue_size: u16,
    /// How long a worker polls after the last frame moved (zero: never).
    pub poll: Duration,
    pub features: u64,
    pub protocol_features: VhostUserProtocolFeatures,
}

pub struct VhostUserNet {
    offer: DeviceOffer,
    mem: GuestMemoryAtomic<GuestMemory>,
    pairs: Vec<Mutex<QueuePair>>,
    ports: Vec<SharedPort>,
    status: Arc<DeviceStatus>,
    /// Features acked on this connection, `0` before SET_FEATURES.
    acked_features: AtomicU64,
    dirty_logging: AtomicBool,
    /// The frontend handed over memory the device must not touch; the connection is
    /// being closed and the workers stay away from guest memory until it is.
    broken: AtomicBool,
    /// The workers' exit-event descriptors `vhost-user-backend` 0.24 takes over and
    /// never closes (`VringEpollHandler::new` turns them into raw descriptors): one
    /// per worker per connection would leak. Closed in [`Self::close_exit_events`].
    exit_events: Mutex<Vec<RawFd>>,
    /// The mapped regions, watched for a file that shrinks under them.
    guards: Mutex<Vec<GuardedRange>>,
    /// Closed to end the connection from a worker (guest memory went bad).
    frontend: Mutex<Option<UnixStream>>,
    /// Why the device closed the connection itself.
    broken_reason: Mutex<Option<String>>,
}

impl VhostUserNet {
    pub fn new(
        offer: DeviceOffer,
        mem: GuestMemoryAtomic<GuestMemory>,
        ports: Vec<SharedPort>,
        counters: Arc<DeviceCounters>,
        status: Arc<DeviceStatus>,
    ) -> Self {
        let pairs = ports
            .iter()
            .enumerate()
            .map(|(pair, port)| {
                Mutex::new(QueuePair::new(
                    pair as u16,
                    Arc::clone(port),
                    Arc::clone(&counters),
                ))
            })
            .collect();
        Self {
            offer,
            mem,
            pairs,
            ports,
            status,
            acked_features: AtomicU64::new(0),
            dirty_logging: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            exit_events: Mutex::new(Vec::new()),
            guards: Mutex::new(Vec::new()),
            frontend: Mutex::new(None),
            broken_reason: Mutex::new(None),
        }
    }

    /// The frontend's connection, so a worker can end it (see [`Self::check_faults`]).
    pub fn attach_frontend(&self, frontend: UnixStream) {
        *lock(&self.frontend) = Some(frontend);
    }

    /// Why the device ended the connection itself, if it did.
    pub fn broken_reason(&self) -> Option<String> {
        lock(&self.broken_reason).clone()
    }

    /// Stop touching guest memory and end the connection, saying why.
    fn break_connection(&self, reason: String) {
        if self.broken.swap(true, Ordering::AcqRel) {
            return;
        }
        log::error!("{reason}; closing the connection");
        *lock(&self.broken_reason) = Some(reason);
        if let Some(frontend) = lock(&self.frontend).as_ref() {
            let _ = frontend.shutdown(Shutdown::Both);
        }
    }

    /// A guest memory file shrank under its mapping: the accesses that hit it read
    /// zeros (see [`crate::fault_guard`]); the connection cannot go on.
    fn check_faults(&self) {
        let faulted = lock(&self.guards).iter().any(GuardedRange::faulted);
        if faulted {
            self.break_connection(
                "a guest memory file shrank under its mapping (the frontend truncated it)"
                    .to_string(),
            );
        }
    }

    /// Close the exit events handed to the daemon's workers. Call once the daemon is
    /// dropped (its workers joined, its epoll descriptors closed).
    pub fn close_exit_events(&self) {
        for fd in self
            .exit_events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            // SAFETY: `fd` is an eventfd this device created in `exit_event` and handed
            // to a worker, which kept it as a raw descriptor and never closed it. The
            // worker is gone, so nothing uses it; and since it was never closed, its
            // number cannot have been reused by anything else.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }

    fn num_queues(&self) -> usize {
        2 * self.offer.queue_pairs as usize
    }

    fn link_params(&self) -> LinkParams {
        let acked = self.acked_features.load(Ordering::Acquire);
        LinkParams {
            vnet_hdr_len: vnet_hdr_len(acked),
            mergeable_rx: acked & F_MRG_RXBUF != 0,
            packed_ring: acked & F_RING_PACKED != 0,
            in_order: acked & F_IN_ORDER != 0,
        }
    }

    /// Once frames move, poll `pair` with the guest's kicks suppressed until nothing
    /// moved for the poll budget (a wake-up that moves nothing polls no further): a kick costs the guest a syscall and this worker an epoll wake-up
    /// per batch, which at millions of frames a second is most of the time.
    ///
    /// Each pass loads the memory table afresh (a new one is picked up at once), and
    /// a queue the frontend stops or disables moves nothing, so a disconnect ends the
    /// loop within the budget. The clock is read once per [`IDLE_PASSES_PER_CLOCK`]
    /// idle passes, never while frames move.
    fn poll(
        &self,
        pair: &mut QueuePair,
        rx_vring: &Vring,
        tx_vring: &Vring,
        link: LinkParams,
        port_woke: bool,
    ) {
        let mut port_woke = port_woke;
        let mut idle_passes = 0u32;
        let mut idle_since: Option<Instant> = None;
        let mut moved_once = false;
        let mut passes = 0u32;
        while !self.broken.load(Ordering::Relaxed) {
            let moved = pair.pump(
                rx_vring,
                tx_vring,
                &self.mem.memory(),
                link,
                std::mem::take(&mut port_woke),
                Kicks::Suppress,
            );
            passes = passes.wrapping_add(1);
            if passes % PASSES_PER_FAULT_CHECK == 0 {
                // A memory file that shrank must end the connection while frames flow too.
                self.check_faults();
            }
            if moved {
                moved_once = true;
                idle_passes = 0;
                idle_since = None;
                continue;
            }
            if !moved_once {
                // Woken for nothing (a port timer, a stray kick): no reason to poll.
                break;
            }
            idle_passes += 1;
            if idle_passes % IDLE_PASSES_PER_CLOCK == 1 {
                let now = Instant::now();
                match idle_since {
                    None => idle_since = Some(now),
                    Some(since) if now.duration_since(since) >= self.offer.poll => break,
                    Some(_) => {}
                }
            }
            std::hint::spin_loop();
        }
    }

    /// Watch each port's descriptor from its pair's worker.
    pub fn register_ports(&self, handlers: &[Arc<VringEpollHandler<Arc<Self>>>]) -> io::Result<()> {
        let event = u64::from(port_event(self.num_queues()));
        for (port, handler) in self.ports.iter().zip(handlers) {
            let fd = port.lock().unwrap_or_else(|e| e.into_inner()).rx_fd();
            if let Some(fd) = fd {
                // Edge-triggered: the worker reads until the port is empty or the guest
                // has no buffers; in the second case the guest's kick resumes it.
                handler.register_listener(fd, EventSet::IN | EventSet::EDGE_TRIGGERED, event)?;
            }
        }
        Ok(())
    }

    /// Forget per-connection port state.
    pub fn reset_ports(&self) {
        for port in &self.ports {
            port.lock().unwrap_or_else(|e| e.into_inner()).reset();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every region must lie inside its file, sealed against shrinking where the file
/// takes seals (see [`crate::frontend_memory`]); then it is watched for one that
/// shrinks anyway.
fn check_backing(mem: &GuestMemory) -> io::Result<Vec<GuardedRange>> {
    let mut guards = Vec::new();
    for region in mem.iter() {
        let Some(file_offset) = region.file_offset() else {
            continue;
        };
        let what = format!(
            "memory region at guest address {:#x}",
            region.start_addr().0
        );
        check_mappable(
            file_offset.file().as_fd(),
            file_offset.start(),
            region.len(),
            &what,
        )
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let start = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(io::Error::other)?;
        guards.push(GuardedRange::new(start, region.len() as usize)?);
    }
    Ok(guards)
}

impl VhostUserBackend for VhostUserNet {
    type Bitmap = DirtyLog;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        VhostUserNet::num_queues(self)
    }

    fn max_queue_size(&self) -> usize {
        self.offer.max_queue_size as usize
    }

    fn features(&self) -> u64 {
        self.offer.features
    }

    fn acked_features(&self, features: u64) {
        let previous = self.acked_features.swap(features, Ordering::AcqRel);

        let hdr_len = vnet_hdr_len(features);
        for port in &self.ports {
            let mut port = port.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = port.configure(hdr_len, features) {
                log::error!("cannot configure the host port for the negotiated features: {e}");
            }
        }

        // QEMU toggles VHOST_F_LOG_ALL with a new SET_FEATURES at the start and end
        // of a migration; only a change of the other bits is a new negotiation.
        if previous & !F_LOG_ALL != features & !F_LOG_ALL {
            self.status.push(DeviceEvent::FeaturesAcked { features });
        }
        let logging = features & F_LOG_ALL != 0;
        dirty_log::set_logging(&self.mem.memory(), logging);
        if self.dirty_logging.swap(logging, Ordering::AcqRel) != logging {
            self.status.push(DeviceEvent::DirtyLogging { on: logging });
        }
        self.status.update_negotiation(|n| {
            n.acked_features = Some(features);
            n.dirty_logging = logging;
        });
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.offer.protocol_features
    }

    fn reset_device(&self) {
        self.acked_features.store(0, Ordering::Release);
        self.reset_ports();
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The vrings apply EVENT_IDX themselves; the datapath just follows the queue.
    }

    fn update_memory(&self, atomic_mem: GuestMemoryAtomic<GuestMemory>) -> io::Result<()> {
        let mem = atomic_mem.memory();
        // The gate checked every region before the handler mapped it (the crate
        // publishes a table to the workers before asking us); this is the backstop,
        // and registers the new regions with the fault guard.
        match check_backing(&mem) {
            Ok(guards) => *lock(&self.guards) = guards,
            Err(e) => {
                self.broken.store(true, Ordering::Release);
                return Err(e);
            }
        }
        // Regions mapped during a migration must be logged from the start.
        dirty_log::set_logging(&mem, self.dirty_logging.load(Ordering::Acquire));
        let bytes = mem.iter().map(|region| region.len()).sum();
        self.status.push(DeviceEvent::MemoryMapped {
            regions: mem.num_regions(),
            bytes,
        });
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker per queue pair: queues 2n (rx) and 2n + 1 (tx).
        (0..self.offer.queue_pairs)
            .map(|pair| 0b11u64 << (2 * pair))
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => {
                self.exit_events
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(pair.0.as_raw_fd());
                Some(pair)
            }
            Err(e) => {
                log::error!("cannot create a worker exit event: {e}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        let port_woke = device_event == port_event(VhostUserNet::num_queues(self));
        let known = device_event == RX_QUEUE_EVENT || device_event == TX_QUEUE_EVENT || port_woke;
        let (Some(pair), [rx_vring, tx_vring]) = (self.pairs.get(thread_id), vrings) else {
            return Err(io::Error::other(format!(
                "worker {thread_id} has no queue pair with {} vrings",
                vrings.len()
            )));
        };
        if !known {
            return Err(io::Error::other(format!(
                "unknown device event {device_event}"
            )));
        }
        if self.broken.load(Ordering::Acquire) {
            return Ok(());
        }
        // Whatever woke us, the same pass serves both directions.
        let mut pair = pair.lock().unwrap_or_else(|e| e.into_inner());
        let link = self.link_params();
        if !self.offer.poll.is_zero() {
            self.poll(&mut pair, rx_vring, tx_vring, link, port_woke);
        }
        // Going to sleep in epoll: ask for kicks, and serve what came meanwhile.
        pair.pump(
            rx_vring,
            tx_vring,
            &self.mem.memory(),
            link,
            port_woke,
            Kicks::Arm,
        );
        self.check_faults();
        Ok(())
    }
}
