//! Entry points for the fuzz targets (`fuzz/`), behind the `fuzzing` feature. Each
//! takes arbitrary bytes and must neither panic, hang nor touch memory it was not
//! given; what it returns does not matter.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use vhost_user_backend::VringT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::port::{LoopPort, SharedPort};
use crate::queue_pair::{Kicks, LinkParams, QueuePair};
use crate::server::{DeviceHandle, Server};
use crate::stats::DeviceCounters;
use crate::virtio_net::VNET_HDR_LEN_V1;
use crate::{BackendConfig, GuestMemory, PortSpec, Vring};

const QUEUE_SIZE: u16 = 16;
const MEM_SIZE: usize = 0x1_0000;
const RX_RING: u64 = 0x0;
const TX_RING: u64 = 0x800;
/// Descriptor table and available ring of one queue: what the driver writes.
const DRIVER_AREA: usize = 16 * QUEUE_SIZE as usize + 6 + 2 * QUEUE_SIZE as usize;

fn used_ring(ring: u64) -> u64 {
    (ring + DRIVER_AREA as u64).next_multiple_of(4)
}

fn vring(mem: &GuestMemoryAtomic<GuestMemory>, ring: u64, event_idx: bool) -> Option<Vring> {
    let vring = Vring::new(mem.clone(), QUEUE_SIZE).ok()?;
    vring.set_queue_size(QUEUE_SIZE);
    vring
        .set_queue_info(ring, ring + 16 * u64::from(QUEUE_SIZE), used_ring(ring))
        .ok()?;
    vring.set_queue_event_idx(event_idx);
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    Some(vring)
}

/// Walk whatever descriptor tables and available rings `data` lays out, both ways,
/// through a loop port: the first byte picks the negotiated options (event index,
/// mergeable receive buffers, header length, split or packed rings and the packed
/// wrap counter to start with) and whether kicks are re-armed, the rest fills guest
/// memory from the start (rings, then buffers), so descriptors point at rings,
/// buffers, indirect tables, or past the end.
pub fn walk_rings(data: &[u8]) {
    let Some((&options, rest)) = data.split_first() else {
        return;
    };
    let Ok(memory) = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    let len = rest.len().min(MEM_SIZE);
    if memory.write_slice(&rest[..len], GuestAddress(0)).is_err() {
        return;
    }
    let mem = GuestMemoryAtomic::new(memory);
    let event_idx = options & 1 != 0;
    let (Some(rx), Some(tx)) = (
        vring(&mem, RX_RING, event_idx),
        vring(&mem, TX_RING, event_idx),
    ) else {
        return;
    };
    if options & 32 != 0 {
        // A packed ring in its driver's first round (a split ring at index 0x8000).
        rx.set_queue_next_avail(0x8000);
        tx.set_queue_next_avail(0x8000);
    }
    let link = LinkParams {
        vnet_hdr_len: if options & 4 != 0 {
            VNET_HDR_LEN_V1
        } else {
            10
        },
        mergeable_rx: options & 2 != 0,
        packed_ring: options & 16 != 0,
        in_order: options & 64 != 0,
    };
    let port: SharedPort = Arc::new(Mutex::new(Box::<LoopPort>::default()));
    let mut pair = QueuePair::new(0, port, Arc::new(DeviceCounters::new(2)));
    let kicks = if options & 8 != 0 {
        Kicks::Suppress
    } else {
        Kicks::Arm
    };
    let guard = mem.memory();
    for _ in 0..2 {
        pair.pump(&rx, &tx, &guard, link, false, kicks);
    }
}

/// One device, serving every session of the process (a fresh connection each).
fn device() -> &'static (Mutex<Server>, DeviceHandle, PathBuf) {
    static DEVICE: OnceLock<(Mutex<Server>, DeviceHandle, PathBuf)> = OnceLock::new();
    DEVICE.get_or_init(|| {
        let path =
            std::env::temp_dir().join(format!("standby-net-fuzz-{}.sock", std::process::id()));
        let mut config = BackendConfig::new(&path, PortSpec::Loop);
        config.deadlines.handshake = Duration::from_millis(200);
        config.deadlines.message = Duration::from_millis(200);
        let mut server = Server::new(config).expect("a loop device");
        server.start().expect("listening");
        let handle = server.handle();
        (Mutex::new(server), handle, path)
    })
}

/// Requests that carry descriptors: what to attach when the input has them.
fn attachment(request: u32, memfd: &std::fs::File, event: &EventFd) -> Vec<i32> {
    match request {
        // SET_MEM_TABLE, SET_LOG_BASE, ADD_MEM_REG: a file to map.
        5 | 6 | 37 => vec![memfd.as_raw_fd()],
        // SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR: an eventfd.
        12..=14 => vec![event.as_raw_fd()],
        _ => Vec::new(),
    }
}

/// Send `data` to the device as a frontend would: cut into messages by their
/// headers, with a memfd or an eventfd attached to the requests that take one, then
/// close, and wait until the device is ready for the next frontend.
pub fn vhost_user_session(data: &[u8]) {
    let (_, handle, path) = device();
    let Ok(mut frontend) = UnixStream::connect(path) else {
        return;
    };
    let _ = frontend.set_read_timeout(Some(Duration::from_millis(500)));
    let memfd = memfd_of(0x10000);
    let Ok(event) = EventFd::new(libc::EFD_NONBLOCK) else {
        return;
    };
    let mut rest = data;
    while rest.len() >= 12 {
        let request = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let size = u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]) as usize;
        let end = (12 + size).min(rest.len());
        let fds = memfd
            .as_ref()
            .map(|file| attachment(request, file, &event))
            .unwrap_or_default();
        let sent = if fds.is_empty() {
            frontend.write_all(&rest[..end]).is_ok()
        } else {
            frontend.send_with_fds(&[&rest[..end]], &fds).is_ok()
        };
        if !sent {
            break;
        }
        rest = &rest[end..];
    }
    let _ = frontend.write_all(rest);
    let _ = frontend.shutdown(std::net::Shutdown::Write);
    // Drain the replies until the device closes its side.
    let mut sink = [0u8; 4096];
    while matches!(frontend.read(&mut sink), Ok(n) if n > 0) {}
    drop(frontend);
    let _ = handle.wait_state(Duration::from_secs(5), |state| {
        state == crate::ConnectionState::Listening
    });
    assert!(
        handle.failure().is_none(),
        "the device stopped serving: {:?}",
        handle.failure()
    );
}

fn memfd_of(len: u64) -> Option<std::fs::File> {
    let name = std::ffi::CString::new("fuzz-guest-ram").ok()?;
    // SAFETY: memfd_create with a valid name; the descriptor is owned right below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(len).ok()?;
    Some(file)
}
