//! A ring the frontend stops is not written again.
//!
//! QEMU stops each ring with GET_VRING_BASE when a migration's last stage begins: the
//! reply's base is where the destination resumes, and guest memory is copied for the
//! last time right after. A frame the device still completed after replying is one
//! the destination completes a second time: the guest frees a buffer twice. So every
//! chain before the base the reply carries must be used, none from it on, and it must
//! stay so (split: the used index equals the base; packed: the descriptors' flags).
//!
//! The tests stop a ring hundreds of times while frames flow through it (a `gen` port
//! fills the receive ring, a `null` port drains the transmit ring, a `loop` port moves
//! frames from one to the other; a driver thread keeps each ring full), and restart it
//! from the base, as a destination would; with split rings and with packed ones.

use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use standby_net::virtio_net::{F_MRG_RXBUF, F_PROTOCOL_FEATURES, F_RING_PACKED, F_VERSION_1};
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

/// Packed descriptor flags (the split ring's WRITE bit is the same).
const F_WRITE: u16 = 1 << 1;
const F_AVAIL: u16 = 1 << 7;
const F_USED: u16 = 1 << 15;
/// Where a packed ring starts: position 0, wrap counter 1.
const PACKED_START: u16 = 0x8000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    Split,
    Packed,
}

struct Driver {
    frontend: Frontend,
    mem: GuestMemoryMmap,
    layout: Layout,
    kicks: [EventFd; 2],
    calls: [EventFd; 2],
}

impl Driver {
    fn connect(socket: &std::path::Path, layout: Layout) -> Self {
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
        let packed = if layout == Layout::Packed {
            F_RING_PACKED
        } else {
            0
        };
        frontend
            .set_features(F_VERSION_1 | F_MRG_RXBUF | F_PROTOCOL_FEATURES | packed)
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
        // One single-descriptor chain per slot, head (or buffer id) `i` in slot `i`:
        // with chains completed in order, the driver re-posts a slot's own chain. A
        // packed descriptor's id and flags are written when it is made available.
        for (queue, ring) in RINGS.iter().enumerate() {
            for i in 0..u64::from(QUEUE_SIZE) {
                let desc = ring + 16 * i;
                let addr = BUFFERS[queue] + i * u64::from(BUFFER_LEN);
                mem.write_obj(addr, GuestAddress(desc)).unwrap();
                mem.write_obj(buffer_len(queue), GuestAddress(desc + 8))
                    .unwrap();
                if layout == Layout::Split {
                    mem.write_obj(buffer_flags(queue), GuestAddress(desc + 12))
                        .unwrap();
                    mem.write_obj(0u16, GuestAddress(desc + 14)).unwrap();
                }
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
            layout,
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
            let base = if layout == Layout::Packed {
                PACKED_START
            } else {
                0
            };
            driver.start(queue, base);
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

    /// Why ring `queue` is not where a reply of `base` put it, if it is not: every
    /// chain before `base` used, none from it on.
    fn not_at(&self, queue: usize, base: u16) -> Option<String> {
        match self.layout {
            Layout::Split => {
                let used = read_used_idx(&self.mem, queue);
                (used != base).then(|| format!("the used index is {used}"))
            }
            Layout::Packed => {
                let at = Position::from_base(base);
                if is_used(&self.mem, queue, at) {
                    return Some(format!("position {} is used", at.slot));
                }
                let before = at.back();
                let moved = base != PACKED_START;
                (moved && !is_used(&self.mem, queue, before))
                    .then(|| format!("position {} is not used", before.slot))
            }
        }
    }
}

fn buffer_len(queue: usize) -> u32 {
    if queue == 0 {
        BUFFER_LEN
    } else {
        TX_FRAME_LEN
    }
}

fn buffer_flags(queue: usize) -> u16 {
    if queue == 0 {
        F_WRITE
    } else {
        0
    }
}

fn read_used_idx(mem: &GuestMemoryMmap, queue: usize) -> u16 {
    mem.read_obj(GuestAddress(RINGS[queue] + USED + 2)).unwrap()
}

/// A slot of a packed ring, and the wrap counter of the round it is in.
#[derive(Clone, Copy)]
struct Position {
    slot: u16,
    wrap: bool,
}

impl Position {
    fn from_base(base: u16) -> Self {
        Self {
            slot: base & 0x7fff,
            wrap: base & 0x8000 != 0,
        }
    }

    fn next(self) -> Self {
        if self.slot + 1 == QUEUE_SIZE {
            Self {
                slot: 0,
                wrap: !self.wrap,
            }
        } else {
            Self {
                slot: self.slot + 1,
                ..self
            }
        }
    }

    fn back(self) -> Self {
        if self.slot == 0 {
            Self {
                slot: QUEUE_SIZE - 1,
                wrap: !self.wrap,
            }
        } else {
            Self {
                slot: self.slot - 1,
                ..self
            }
        }
    }

    fn flags_addr(self, queue: usize) -> GuestAddress {
        GuestAddress(RINGS[queue] + 16 * u64::from(self.slot) + 14)
    }
}

/// The device marked the descriptor at `at` used in `at`'s round. Its USED bit says so
/// even after the driver made it available again for the next round (which flips
/// only the AVAIL bit), where the filler thread races the check.
fn is_used(mem: &GuestMemoryMmap, queue: usize, at: Position) -> bool {
    let flags: u16 = mem.read_obj(at.flags_addr(queue)).unwrap();
    (flags & F_USED != 0) == at.wrap
}

/// Keep ring `queue` full: every chain the device used is made available again.
fn keep_ring_full(
    mem: GuestMemoryMmap,
    layout: Layout,
    kick: EventFd,
    queue: usize,
    stop: Arc<AtomicBool>,
) {
    match layout {
        Layout::Split => keep_split_ring_full(mem, kick, queue, stop),
        Layout::Packed => keep_packed_ring_full(mem, kick, queue, stop),
    }
}

fn keep_split_ring_full(mem: GuestMemoryMmap, kick: EventFd, queue: usize, stop: Arc<AtomicBool>) {
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

fn keep_packed_ring_full(mem: GuestMemoryMmap, kick: EventFd, queue: usize, stop: Arc<AtomicBool>) {
    let start = Position::from_base(PACKED_START);
    let (mut avail, mut used) = (start, start);
    let mut outstanding = 0u16;
    while !stop.load(Ordering::Relaxed) {
        while outstanding > 0 && is_used(&mem, queue, used) {
            used = used.next();
            outstanding -= 1;
        }
        let posted = outstanding;
        while outstanding < QUEUE_SIZE {
            let desc = RINGS[queue] + 16 * u64::from(avail.slot);
            mem.write_obj(buffer_len(queue), GuestAddress(desc + 8))
                .unwrap();
            mem.write_obj(avail.slot, GuestAddress(desc + 12)).unwrap();
            // The descriptor before the flags that make it available.
            std::sync::atomic::fence(Ordering::Release);
            let round = if avail.wrap { F_AVAIL } else { F_USED };
            mem.write_obj(buffer_flags(queue) | round, avail.flags_addr(queue))
                .unwrap();
            avail = avail.next();
            outstanding += 1;
        }
        if outstanding != posted {
            kick.write(1).unwrap();
        }
        thread::sleep(Duration::from_micros(20));
    }
}

/// Keep the rings `busy` full and stop them in turn, again and again, while `port`
/// moves frames through them.
fn stopped_rings_stay_where_the_reply_says(
    name: &str,
    port: PortSpec,
    layout: Layout,
    busy: &[usize],
) {
    let socket = socket_path(name);
    let mut server = Server::new(BackendConfig::new(&socket, port)).unwrap();
    server.start().unwrap();
    let mut driver = Driver::connect(&socket, layout);

    let stop = Arc::new(AtomicBool::new(false));
    let fillers: Vec<_> = busy
        .iter()
        .map(|&queue| {
            let mem = driver.mem.clone();
            let kick = driver.kicks[queue].try_clone().unwrap();
            let stop = Arc::clone(&stop);
            thread::spawn(move || keep_ring_full(mem, layout, kick, queue, stop))
        })
        .collect();

    let mut moved_while_running = 0u32;
    let mut last_packets = [0u64; 2];
    let device = server.handle();
    for round in 0..STOPS {
        let queue = busy[round as usize % busy.len()];
        // Let frames flow for a while that differs from round to round.
        thread::sleep(Duration::from_micros(200 + u64::from(round * 37 % 800)));
        let base = driver.frontend.get_vring_base(queue).unwrap() as u16;
        let at_reply = driver.not_at(queue, base);
        thread::sleep(Duration::from_millis(2));
        let later = driver.not_at(queue, base);
        assert!(
            at_reply.is_none() && later.is_none(),
            "ring {queue}, stop {round}: the reply said {base:#x}; at the reply: {}; \
             2 ms later: {}",
            at_reply.as_deref().unwrap_or("there"),
            later.as_deref().unwrap_or("there"),
        );
        // The device's count, not the base: a packed ring that went round an even
        // number of times comes back to the same base.
        let packets = device.stats()[queue].packets;
        if packets != last_packets[queue] {
            moved_while_running += 1;
        }
        last_packets[queue] = packets;
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
    let stats = device.stats();
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

/// Split rings, then packed ones.
fn with_each_layout(name: &str, port: PortSpec, busy: &[usize]) {
    stopped_rings_stay_where_the_reply_says(name, port.clone(), Layout::Split, busy);
    let packed = format!("{name}-packed");
    stopped_rings_stay_where_the_reply_says(&packed, port, Layout::Packed, busy);
}

#[test]
fn a_receive_ring_stopped_while_frames_arrive_is_not_written_after_the_reply() {
    let gen = GenSpec {
        size: 60,
        rate: None,
        count: None,
    };
    with_each_layout("stop-rx", PortSpec::Gen(gen), &[0]);
}

#[test]
fn a_transmit_ring_stopped_while_the_guest_sends_is_not_written_after_the_reply() {
    with_each_layout("stop-tx", PortSpec::Null, &[1]);
}

#[test]
fn either_ring_of_a_loop_port_stopped_mid_pass_is_not_written_after_the_reply() {
    // The loop port's pass holds both rings at once (`queue_pair/loop_back.rs`).
    with_each_layout("stop-loop", PortSpec::Loop, &[0, 1]);
}
