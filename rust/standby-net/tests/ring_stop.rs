//! A ring the frontend stops is not written again.
//!
//! QEMU stops each ring with GET_VRING_BASE when a migration's last stage begins: the
//! reply's base is where the destination resumes, and guest memory is copied for the
//! last time right after. A frame the device still completed after replying is one
//! the destination completes a second time: the guest frees a buffer twice. So the
//! used index must equal the base the reply carries, and stay there.
//!
//! The tests stop a ring hundreds of times while frames flow through it (a `gen` port
//! fills the receive ring, a `null` port drains the transmit ring, a `loop` port moves
//! frames from one to the other; a driver thread keeps each ring full), and restart it
//! from the base, as a destination would.

use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use standby_net::virtio_net::{F_MRG_RXBUF, F_PROTOCOL_FEATURES, F_VERSION_1};
use standby_net::{BackendConfig, GenSpec, PortSpec, Server};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

mod common;
use common::{memfd, socket_path};

const MEM_SIZE: usize = 2 << 20;
const QUEUE_SIZE: u16 = 256;
const BUFFER_LEN: u32 = 2048;
/// Ring `q`'s descriptors, avail and used rings, each on pages of its own.
const RINGS: [u64; 2] = [0x1000, 0x4000];
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
/// Ring `q`'s buffers: one per descriptor.
const BUFFERS: [u64; 2] = [0x10000, 0x100000];
const STOPS: u32 = 300;

/// A transmitted frame: the virtio-net header (12 bytes with VERSION_1), then 60 bytes.
const TX_FRAME_LEN: u32 = 72;

struct Driver {
    frontend: Frontend,
    mem: GuestMemoryMmap,
    kicks: [EventFd; 2],
    calls: [EventFd; 2],
}

impl Driver {
    fn connect(socket: &std::path::Path) -> Self {
        let mem_file = memfd("guest-ram", MEM_SIZE);
        let mem = GuestMemoryMmap::from_ranges_with_files(&[(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(mem_file.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        let mut frontend = Frontend::connect(socket, 2).unwrap();
        frontend.set_owner().unwrap();
        frontend.get_features().unwrap();
        frontend.get_protocol_features().unwrap();
        frontend
            .set_protocol_features(VhostUserProtocolFeatures::REPLY_ACK)
            .unwrap();
        frontend
            .set_features(F_VERSION_1 | F_MRG_RXBUF | F_PROTOCOL_FEATURES)
            .unwrap();
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
        // One single-descriptor chain per slot, head `i` in slot `i`: with chains
        // completed in order, the driver re-posts a slot's own head.
        for (queue, ring) in RINGS.iter().enumerate() {
            let (len, flags) = if queue == 0 {
                (BUFFER_LEN, 2u16) // device-writable
            } else {
                (TX_FRAME_LEN, 0u16)
            };
            for i in 0..u64::from(QUEUE_SIZE) {
                let desc = ring + 16 * i;
                let addr = BUFFERS[queue] + i * u64::from(BUFFER_LEN);
                mem.write_obj(addr, GuestAddress(desc)).unwrap();
                mem.write_obj(len, GuestAddress(desc + 8)).unwrap();
                mem.write_obj(flags, GuestAddress(desc + 12)).unwrap();
                mem.write_obj(0u16, GuestAddress(desc + 14)).unwrap();
                if queue == 1 {
                    // An Ethernet frame after the zeroed header: broadcast, from a MAC.
                    let frame = [0xffu8, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 1];
                    mem.write_slice(&frame, GuestAddress(addr + 12)).unwrap();
                }
            }
        }
        let kicks = [EventFd::new(0).unwrap(), EventFd::new(0).unwrap()];
        let calls = [EventFd::new(0).unwrap(), EventFd::new(0).unwrap()];
        let mut driver = Self {
            frontend,
            mem,
            kicks,
            calls,
        };
        for (queue, &ring) in RINGS.iter().enumerate() {
            driver.frontend.set_vring_num(queue, QUEUE_SIZE).unwrap();
            driver
                .frontend
                .set_vring_addr(
                    queue,
                    &VringConfigData {
                        queue_max_size: QUEUE_SIZE,
                        queue_size: QUEUE_SIZE,
                        flags: 0,
                        desc_table_addr: user_addr + ring,
                        used_ring_addr: user_addr + ring + USED,
                        avail_ring_addr: user_addr + ring + AVAIL,
                        log_addr: None,
                    },
                )
                .unwrap();
            driver.start(queue, 0);
            driver.frontend.set_vring_enable(queue, true).unwrap();
        }
        driver
    }

    /// Start (or restart) ring `queue` at `base`, as a destination QEMU does.
    fn start(&mut self, queue: usize, base: u16) {
        self.frontend.set_vring_base(queue, base).unwrap();
        self.frontend
            .set_vring_call(queue, &self.calls[queue])
            .unwrap();
        self.frontend
            .set_vring_kick(queue, &self.kicks[queue])
            .unwrap();
    }

    fn used_idx(&self, queue: usize) -> u16 {
        read_used_idx(&self.mem, queue)
    }
}

fn read_used_idx(mem: &GuestMemoryMmap, queue: usize) -> u16 {
    mem.read_obj(GuestAddress(RINGS[queue] + USED + 2)).unwrap()
}

/// Keep ring `queue` full: every chain the device used is made available again.
fn keep_ring_full(mem: GuestMemoryMmap, kick: EventFd, queue: usize, stop: Arc<AtomicBool>) {
    let avail_idx = GuestAddress(RINGS[queue] + AVAIL + 2);
    let mut avail: u16 = 0;
    while !stop.load(Ordering::Relaxed) {
        let used = read_used_idx(&mem, queue);
        let posted = avail;
        while avail.wrapping_sub(used) < QUEUE_SIZE {
            let slot = avail % QUEUE_SIZE;
            let entry = GuestAddress(RINGS[queue] + AVAIL + 4 + 2 * u64::from(slot));
            mem.write_obj(slot, entry).unwrap();
            avail = avail.wrapping_add(1);
        }
        if avail != posted {
            // The ring entries before the index that publishes them (x86 keeps
            // stores in order; the fence keeps the compiler from reordering).
            std::sync::atomic::fence(Ordering::Release);
            mem.write_obj(avail, avail_idx).unwrap();
            kick.write(1).unwrap();
        }
        thread::sleep(Duration::from_micros(20));
    }
}

/// Keep the rings `busy` full and stop them in turn, again and again, while `port`
/// moves frames through them.
fn stopped_rings_stay_where_the_reply_says(name: &str, port: PortSpec, busy: &[usize]) {
    let socket = socket_path(name);
    let mut server = Server::new(BackendConfig::new(&socket, port)).unwrap();
    server.start().unwrap();
    let mut driver = Driver::connect(&socket);

    let stop = Arc::new(AtomicBool::new(false));
    let fillers: Vec<_> = busy
        .iter()
        .map(|&queue| {
            let mem = driver.mem.clone();
            let kick = driver.kicks[queue].try_clone().unwrap();
            let stop = Arc::clone(&stop);
            thread::spawn(move || keep_ring_full(mem, kick, queue, stop))
        })
        .collect();

    let mut moved_while_running = 0u32;
    let mut last_base = [0u16; 2];
    for round in 0..STOPS {
        let queue = busy[round as usize % busy.len()];
        // Let frames flow for a while that differs from round to round.
        thread::sleep(Duration::from_micros(200 + u64::from(round * 37 % 800)));
        let base = driver.frontend.get_vring_base(queue).unwrap() as u16;
        let at_reply = driver.used_idx(queue);
        thread::sleep(Duration::from_millis(2));
        let later = driver.used_idx(queue);
        assert_eq!(
            (at_reply, later),
            (base, base),
            "ring {queue}, stop {round}: the reply said {base}, the used index read \
             {at_reply} then and {later} 2 ms later"
        );
        if base != last_base[queue] {
            moved_while_running += 1;
        }
        last_base[queue] = base;
        driver.start(queue, base);
    }
    stop.store(true, Ordering::Relaxed);
    for filler in fillers {
        filler.join().unwrap();
    }

    // Frames flowed between nearly every two stops of a ring: each stop met it busy.
    assert!(
        moved_while_running > STOPS * 9 / 10,
        "frames moved between only {moved_while_running} of {STOPS} stops"
    );
    let stats = server.handle().stats();
    for &queue in busy {
        assert!(
            stats[queue].packets > u64::from(STOPS),
            "ring {queue}: {:?}",
            stats[queue]
        );
    }
    drop(driver);
    server.stop();
}

#[test]
fn a_receive_ring_stopped_while_frames_arrive_is_not_written_after_the_reply() {
    let gen = GenSpec {
        size: 60,
        rate: None,
        count: None,
    };
    stopped_rings_stay_where_the_reply_says("stop-rx", PortSpec::Gen(gen), &[0]);
}

#[test]
fn a_transmit_ring_stopped_while_the_guest_sends_is_not_written_after_the_reply() {
    stopped_rings_stay_where_the_reply_says("stop-tx", PortSpec::Null, &[1]);
}

#[test]
fn either_ring_of_a_loop_port_stopped_mid_pass_is_not_written_after_the_reply() {
    // The loop port's pass holds both rings at once (`queue_pair/loop_back.rs`).
    stopped_rings_stay_where_the_reply_says("stop-loop", PortSpec::Loop, &[0, 1]);
}
