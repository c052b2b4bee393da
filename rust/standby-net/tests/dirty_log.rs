//! Dirty-page logging over a real vhost-user connection.
//!
//! The frontend here is `vhost`'s own `Frontend`, so the messages are the ones QEMU
//! sends during a migration: SET_LOG_BASE with a shared log, then SET_FEATURES with
//! VHOST_F_LOG_ALL, and SET_FEATURES without it at the end. Guest memory and the log
//! are memfds both sides map. Every kind of write the device makes is checked:
//! virtio-net header, frame payload, and the used rings of both queues; with split
//! rings and with packed ones.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use standby_net::virtio_net::{
    F_LOG_ALL, F_MRG_RXBUF, F_PROTOCOL_FEATURES, F_RING_PACKED, F_VERSION_1,
};
use standby_net::{BackendConfig, DeviceHandle, PortSpec, Server};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

mod common;
use common::{memfd, socket_path};

const MEM_SIZE: usize = 1 << 20;
const PAGE: u64 = 4096;
const LOG_SIZE: usize = 4096; // one bit per page: far more than 1 MiB needs
const QUEUE_SIZE: u16 = 16;

/// Ring placement: every ring on its own page, so the log shows who wrote what.
/// A packed ring's descriptors lie at `desc`, its driver area at `avail`, and its
/// device area on the descriptors' page (see `PACKED_DEVICE_AREA`), where the
/// device writes its used descriptors anyway.
struct RingPages {
    desc: u64,
    avail: u64,
    used: u64,
}
const RX: RingPages = RingPages {
    desc: 0x1000,
    avail: 0x2000,
    used: 0x3000,
};
const TX: RingPages = RingPages {
    desc: 0x5000,
    avail: 0x6000,
    used: 0x7000,
};

const PACKED_DEVICE_AREA: u64 = 0x800;

/// The frontend's side: guest memory, the log, the rings, the eventfds.
struct Guest {
    frontend: Frontend,
    mem: GuestMemoryMmap,
    log: GuestMemoryMmap,
    log_file: File,
    kicks: [EventFd; 2],
    _calls: [EventFd; 2],
    next_desc: [u16; 2],
    packed: bool,
    /// Packed: where each chain made available so far starts.
    heads: [Vec<u16>; 2],
}

impl Guest {
    fn connect(socket: &PathBuf, packed: bool) -> Self {
        let mem_file = memfd("guest-ram", MEM_SIZE);
        let mem = GuestMemoryMmap::from_ranges_with_files(&[(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(mem_file.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        let log_file = memfd("dirty-log", LOG_SIZE);
        let log = GuestMemoryMmap::from_ranges_with_files(&[(
            GuestAddress(0),
            LOG_SIZE,
            Some(FileOffset::new(log_file.try_clone().unwrap(), 0)),
        )])
        .unwrap();

        let mut frontend = Frontend::connect(socket, 2).unwrap();
        frontend.set_owner().unwrap();
        let offered = frontend.get_features().unwrap();
        assert_ne!(offered & F_LOG_ALL, 0, "LOG_ALL must be offered");
        let protocol = frontend.get_protocol_features().unwrap();
        assert!(protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD));
        frontend
            .set_protocol_features(
                VhostUserProtocolFeatures::LOG_SHMFD | VhostUserProtocolFeatures::REPLY_ACK,
            )
            .unwrap();
        let features = Self::features(packed);
        frontend.set_features(features).unwrap();

        let user_addr = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        frontend
            .set_mem_table(&[VhostUserMemoryRegionInfo {
                guest_phys_addr: 0,
                memory_size: MEM_SIZE as u64,
                userspace_addr: user_addr,
                mmap_offset: 0,
                mmap_handle: mem_file.as_raw_fd(),
            }])
            .unwrap();

        let kicks = [EventFd::new(0).unwrap(), EventFd::new(0).unwrap()];
        let calls = [EventFd::new(0).unwrap(), EventFd::new(0).unwrap()];
        for (queue, ring) in [RX, TX].iter().enumerate() {
            frontend.set_vring_num(queue, QUEUE_SIZE).unwrap();
            frontend
                .set_vring_addr(
                    queue,
                    &VringConfigData {
                        queue_max_size: QUEUE_SIZE,
                        queue_size: QUEUE_SIZE,
                        flags: 0,
                        desc_table_addr: user_addr + ring.desc,
                        used_ring_addr: user_addr
                            + if packed {
                                ring.desc + PACKED_DEVICE_AREA
                            } else {
                                ring.used
                            },
                        avail_ring_addr: user_addr + ring.avail,
                        log_addr: None,
                    },
                )
                .unwrap();
            // A packed ring starts at position 0 with the wrap counter at 1.
            let base = if packed { 0x8000 } else { 0 };
            frontend.set_vring_base(queue, base).unwrap();
            frontend.set_vring_call(queue, &calls[queue]).unwrap();
            frontend.set_vring_kick(queue, &kicks[queue]).unwrap();
            frontend.set_vring_enable(queue, true).unwrap();
        }
        Self {
            frontend,
            mem,
            log,
            log_file,
            kicks,
            _calls: calls,
            next_desc: [0, 0],
            packed,
            heads: [Vec::new(), Vec::new()],
        }
    }

    fn features(packed: bool) -> u64 {
        let packed = if packed { F_RING_PACKED } else { 0 };
        F_VERSION_1 | F_MRG_RXBUF | F_PROTOCOL_FEATURES | packed
    }

    fn start_logging(&mut self, device: &DeviceHandle) {
        self.frontend
            .set_log_base(
                0,
                Some(VhostUserDirtyLogRegion {
                    mmap_size: LOG_SIZE as u64,
                    mmap_offset: 0,
                    mmap_handle: self.log_file.as_raw_fd(),
                }),
            )
            .unwrap();
        self.set_features_and_wait(Self::features(self.packed) | F_LOG_ALL, device);
    }

    fn stop_logging(&mut self, device: &DeviceHandle) {
        self.set_features_and_wait(Self::features(self.packed), device);
    }

    /// QEMU waits for the backend's ack when it toggles LOG_ALL, so no write the
    /// device makes afterwards misses the new setting. `Frontend` does not wait for
    /// that ack, so the test waits until the device reports the switch.
    fn set_features_and_wait(&mut self, features: u64, device: &DeviceHandle) {
        self.frontend.set_features(features).unwrap();
        let logging = features & F_LOG_ALL != 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        while device.negotiation().dirty_logging != logging {
            assert!(Instant::now() < deadline, "LOG_ALL never became {logging}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Add a chain of `(addr, len, device_writable)` buffers to queue `queue`.
    fn add_chain(&mut self, queue: usize, buffers: &[(u64, u32, bool)]) {
        if self.packed {
            return self.add_packed_chain(queue, buffers);
        }
        let ring = [RX, TX].into_iter().nth(queue).unwrap();
        let first = self.next_desc[queue];
        for (i, &(addr, len, writable)) in buffers.iter().enumerate() {
            let index = u64::from(first) + i as u64;
            let last = i + 1 == buffers.len();
            let flags: u16 = (if writable { 2 } else { 0 }) | (if last { 0 } else { 1 });
            let next: u16 = if last { 0 } else { first + i as u16 + 1 };
            let desc = ring.desc + 16 * index;
            self.mem.write_obj(addr, GuestAddress(desc)).unwrap();
            self.mem.write_obj(len, GuestAddress(desc + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(desc + 12)).unwrap();
            self.mem.write_obj(next, GuestAddress(desc + 14)).unwrap();
        }
        self.next_desc[queue] += buffers.len() as u16;
        let idx: u16 = self.mem.read_obj(GuestAddress(ring.avail + 2)).unwrap();
        let slot = u64::from(idx % QUEUE_SIZE);
        self.mem
            .write_obj(first, GuestAddress(ring.avail + 4 + 2 * slot))
            .unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(ring.avail + 2))
            .unwrap();
    }

    /// The same on a packed ring (the test never goes round it): the head's flags
    /// last, marked available in round 1.
    fn add_packed_chain(&mut self, queue: usize, buffers: &[(u64, u32, bool)]) {
        let ring = [RX, TX].into_iter().nth(queue).unwrap();
        let first = self.next_desc[queue];
        assert!(first + buffers.len() as u16 <= QUEUE_SIZE);
        const AVAIL: u16 = 1 << 7;
        for (i, &(addr, len, writable)) in buffers.iter().enumerate().rev() {
            let desc = ring.desc + 16 * (u64::from(first) + i as u64);
            let last = i + 1 == buffers.len();
            let flags: u16 = AVAIL | (if writable { 2 } else { 0 }) | (if last { 0 } else { 1 });
            self.mem.write_obj(addr, GuestAddress(desc)).unwrap();
            self.mem.write_obj(len, GuestAddress(desc + 8)).unwrap();
            self.mem.write_obj(first, GuestAddress(desc + 12)).unwrap();
            self.mem.write_obj(flags, GuestAddress(desc + 14)).unwrap();
        }
        self.heads[queue].push(first);
        self.next_desc[queue] += buffers.len() as u16;
    }

    fn kick(&self, queue: usize) {
        self.kicks[queue].write(1).unwrap();
    }

    /// Chains the device has used (split: its used index; packed: the used
    /// descriptors where the chains began).
    fn used_idx(&self, queue: usize) -> u16 {
        let ring = [RX, TX].into_iter().nth(queue).unwrap();
        if !self.packed {
            return self.mem.read_obj(GuestAddress(ring.used + 2)).unwrap();
        }
        const AVAIL_AND_USED: u16 = 1 << 7 | 1 << 15;
        self.heads[queue]
            .iter()
            .take_while(|&&head| {
                let flags: u16 = self
                    .mem
                    .read_obj(GuestAddress(ring.desc + 16 * u64::from(head) + 14))
                    .unwrap();
                flags & AVAIL_AND_USED == AVAIL_AND_USED
            })
            .count() as u16
    }

    fn wait_used(&self, queue: usize, count: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.used_idx(queue) != count {
            assert!(
                Instant::now() < deadline,
                "queue {queue}: used idx stuck at {}",
                self.used_idx(queue)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn dirty_pages(&self) -> Vec<u64> {
        let mut bitmap = vec![0u8; LOG_SIZE];
        self.log.read_slice(&mut bitmap, GuestAddress(0)).unwrap();
        (0..(MEM_SIZE as u64 / PAGE))
            .filter(|page| bitmap[(page / 8) as usize] & (1 << (page % 8)) != 0)
            .collect()
    }

    fn clear_log(&self) {
        self.log
            .write_slice(&[0u8; LOG_SIZE], GuestAddress(0))
            .unwrap();
    }

    /// Send a 60-byte frame from `tx_page` and receive it into a header buffer on
    /// `rx_header_page` and a payload buffer on `rx_payload_page`.
    fn loop_one_frame(
        &mut self,
        tx_page: u64,
        rx_header_page: u64,
        rx_payload_page: u64,
        round: u16,
    ) {
        let mut frame = vec![0u8; 12];
        frame.extend((0..60).map(|i| i as u8 ^ 0x5a));
        self.mem
            .write_slice(&frame, GuestAddress(tx_page * PAGE))
            .unwrap();
        self.add_chain(
            0,
            &[
                (rx_header_page * PAGE, 12, true),
                (rx_payload_page * PAGE, 2048, true),
            ],
        );
        self.add_chain(1, &[(tx_page * PAGE, 72, false)]);
        self.kick(1);
        self.wait_used(1, round);
        self.wait_used(0, round);
        let mut payload = vec![0u8; 60];
        self.mem
            .read_slice(&mut payload, GuestAddress(rx_payload_page * PAGE))
            .unwrap();
        assert_eq!(payload, frame[12..], "payload delivered");
    }
}

#[test]
fn every_device_write_is_logged_while_log_all_is_on_and_none_after() {
    device_writes_are_logged(false);
}

#[test]
fn every_device_write_to_a_packed_ring_is_logged_too() {
    device_writes_are_logged(true);
}

fn device_writes_are_logged(packed: bool) {
    let socket = socket_path(if packed {
        "dirty-log-packed"
    } else {
        "dirty-log"
    });
    let mut server = Server::new(BackendConfig::new(&socket, PortSpec::Loop)).unwrap();
    server.start().unwrap();
    let device = server.handle();
    let mut guest = Guest::connect(&socket, packed);

    guest.start_logging(&device);
    guest.loop_one_frame(0x40, 0x20, 0x30, 1);
    assert!(device.negotiation().dirty_logging);
    let header_page = 0x20;
    let payload_page = 0x30;
    // Split: the used rings. Packed: the descriptor rings, where used descriptors
    // go (and the device areas, on the same pages).
    let (rx_used_page, tx_used_page) = if packed {
        (RX.desc / PAGE, TX.desc / PAGE)
    } else {
        (RX.used / PAGE, TX.used / PAGE)
    };
    assert_eq!(
        guest.dirty_pages(),
        [rx_used_page, tx_used_page, header_page, payload_page],
        "exactly the pages the device wrote: used rings, header, payload"
    );

    guest.stop_logging(&device);
    guest.clear_log();
    guest.loop_one_frame(0x41, 0x21, 0x31, 2);
    assert_eq!(
        guest.dirty_pages(),
        Vec::<u64>::new(),
        "nothing logged after LOG_ALL is off"
    );
    assert!(!device.negotiation().dirty_logging);

    // And on again: QEMU may migrate the same VM twice.
    guest.start_logging(&device);
    guest.loop_one_frame(0x42, 0x22, 0x32, 3);
    assert_eq!(
        guest.dirty_pages(),
        [rx_used_page, tx_used_page, 0x22, 0x32]
    );

    let stats = device.stats();
    assert_eq!((stats[0].packets, stats[1].packets), (3, 3));
    drop(guest);
    server.stop();
    assert!(!socket.exists());
}
