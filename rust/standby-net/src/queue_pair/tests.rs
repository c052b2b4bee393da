//! Datapath tests: descriptor chains laid out in guest memory as a driver does,
//! vrings set up as vhost-user-backend does, then one `pump` and a look at the
//! used rings and guest memory. Every test runs on a split and on a packed ring
//! (`both_formats!` at the end): the driver side below speaks both.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use vhost_user_backend::VringT;
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_PACKED_DESC_F_AVAIL,
    VRING_PACKED_DESC_F_USED, VRING_PACKED_EVENT_FLAG_DISABLE, VRING_USED_F_NO_NOTIFY,
};
use virtio_queue::desc::{
    packed::Descriptor as PackedDescriptor, split::Descriptor as SplitDescriptor, RawDescriptor,
};
use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

use super::*;
use crate::port::{LoopPort, NullPort, Port};
use crate::stats::QueueStats;
use crate::virtio_net::VNET_HDR_LEN_LEGACY;

const QUEUE_SIZE: u16 = 16;
const RX_RING: GuestAddress = GuestAddress(0x0);
const TX_RING: GuestAddress = GuestAddress(0x1_0000);
const MEM_SIZE: usize = 0x10_0000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Split,
    Packed,
}

const MERGEABLE: LinkParams = LinkParams {
    vnet_hdr_len: VNET_HDR_LEN_V1,
    mergeable_rx: true,
    packed_ring: false,
    in_order: false,
};
const ONE_BUFFER: LinkParams = LinkParams {
    vnet_hdr_len: VNET_HDR_LEN_V1,
    mergeable_rx: false,
    packed_ring: false,
    in_order: false,
};

/// A readable (`false`) or device-writable (`true`) buffer.
type Segment = (u64, u32, bool);

/// Descriptors of one chain starting at table index `first`.
fn chain(first: u16, segments: &[Segment]) -> Vec<RawDescriptor> {
    segments
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, writable))| {
            let mut flags = if writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            let last = i == segments.len() - 1;
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let next = if last { 0 } else { first + i as u16 + 1 };
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
        })
        .collect()
}

/// The driver's side of one packed ring.
#[derive(Default)]
struct PackedDriver {
    /// Position and wrap counter of the next descriptor to make available.
    avail: (u16, bool),
    /// Position and wrap counter of the next used descriptor to look at.
    used: (u16, bool),
    /// Descriptors each buffer id took.
    slots: HashMap<u16, u16>,
    /// `(id, len)` of every used descriptor seen so far.
    seen: Vec<(u32, u32)>,
}

impl PackedDriver {
    fn new() -> Self {
        Self {
            avail: (0, true),
            used: (0, true),
            ..Self::default()
        }
    }
}

fn packed_flags(wrap: bool) -> u16 {
    if wrap {
        (1 << VRING_PACKED_DESC_F_AVAIL) as u16
    } else {
        (1 << VRING_PACKED_DESC_F_USED) as u16
    }
}

fn packed_used(flags: u16, wrap: bool) -> bool {
    let avail = flags & (1 << VRING_PACKED_DESC_F_AVAIL) as u16 != 0;
    let used = flags & (1 << VRING_PACKED_DESC_F_USED) as u16 != 0;
    avail == wrap && used == wrap
}

fn step((position, wrap): (u16, bool), slots: u16) -> (u16, bool) {
    let next = position + slots;
    if next >= QUEUE_SIZE {
        (next - QUEUE_SIZE, !wrap)
    } else {
        (next, wrap)
    }
}

struct Rig {
    format: Format,
    mem: GuestMemoryAtomic<GuestMemory>,
    rx: Vring,
    tx: Vring,
    counters: Arc<DeviceCounters>,
    pair: QueuePair,
    /// Next free descriptor index of each queue (split); next buffer id (packed).
    next_rx_desc: u16,
    next_tx_desc: u16,
    packed_rx: PackedDriver,
    packed_tx: PackedDriver,
}

// Split ring layout: descriptor table, then the available ring, then the used ring
// on a 4-byte boundary. Guest memory starts zeroed, so both rings start empty.
fn avail_ring(ring: GuestAddress) -> GuestAddress {
    ring.unchecked_add(16 * u64::from(QUEUE_SIZE))
}

fn used_ring(ring: GuestAddress) -> GuestAddress {
    GuestAddress((avail_ring(ring).0 + 6 + 2 * u64::from(QUEUE_SIZE)).next_multiple_of(4))
}

/// Write `descs` at table index `first` and make the chain available, as a driver does.
fn add_chain(mem: &GuestMemory, ring: GuestAddress, first: u16, descs: &[RawDescriptor]) {
    for (i, desc) in descs.iter().enumerate() {
        let index = u64::from(first) + i as u64;
        mem.write_obj(*desc, ring.unchecked_add(16 * index))
            .unwrap();
    }
    let avail = avail_ring(ring);
    let idx: u16 = mem.read_obj(avail.unchecked_add(2)).unwrap();
    let slot = u64::from(idx % QUEUE_SIZE);
    mem.write_obj(first, avail.unchecked_add(4 + 2 * slot))
        .unwrap();
    mem.write_obj(idx.wrapping_add(1), avail.unchecked_add(2))
        .unwrap();
}

// Packed ring layout: the descriptor ring, then the driver's and the device's
// event suppression areas.
fn driver_area(ring: GuestAddress) -> GuestAddress {
    ring.unchecked_add(0x800)
}

fn device_area(ring: GuestAddress) -> GuestAddress {
    ring.unchecked_add(0x900)
}

fn vring(mem: &GuestMemoryAtomic<GuestMemory>, ring: GuestAddress, format: Format) -> Vring {
    let vring = Vring::new(mem.clone(), QUEUE_SIZE).unwrap();
    vring.set_queue_size(QUEUE_SIZE);
    match format {
        Format::Split => vring
            .set_queue_info(ring.0, avail_ring(ring).0, used_ring(ring).0)
            .unwrap(),
        Format::Packed => {
            vring
                .set_queue_info(ring.0, driver_area(ring).0, device_area(ring).0)
                .unwrap();
            // Position 0, wrap counter 1: where a frontend starts a packed ring.
            vring.set_queue_next_avail(0x8000);
        }
    }
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    vring
}

impl Rig {
    fn new(format: Format, port: Box<dyn Port>) -> Self {
        let mem = GuestMemoryAtomic::new(
            GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        );
        let counters = Arc::new(DeviceCounters::new(2));
        let port: SharedPort = Arc::new(Mutex::new(port));
        Self {
            format,
            rx: vring(&mem, RX_RING, format),
            tx: vring(&mem, TX_RING, format),
            pair: QueuePair::new(0, port, Arc::clone(&counters)),
            mem,
            counters,
            next_rx_desc: 0,
            next_tx_desc: 0,
            packed_rx: PackedDriver::new(),
            packed_tx: PackedDriver::new(),
        }
    }

    fn driver(&mut self, ring: GuestAddress) -> (&mut u16, &mut PackedDriver) {
        if ring == RX_RING {
            (&mut self.next_rx_desc, &mut self.packed_rx)
        } else {
            (&mut self.next_tx_desc, &mut self.packed_tx)
        }
    }

    /// Make a chain of `segments` available, with `flags` on each descriptor
    /// besides WRITE and NEXT (INDIRECT, for one).
    fn add_with(&mut self, ring: GuestAddress, segments: &[Segment], extra: u16) {
        let format = self.format;
        let mem = self.mem.memory();
        let (first, packed) = self.driver(ring);
        match format {
            Format::Split => {
                let index = *first % QUEUE_SIZE;
                let mut descs = chain(index, segments);
                for desc in &mut descs {
                    let split = SplitDescriptor::from(*desc);
                    *desc = RawDescriptor::from(SplitDescriptor::new(
                        split.addr().0,
                        split.len(),
                        split.flags() | extra,
                        split.next(),
                    ));
                }
                add_chain(&mem, ring, index, &descs);
            }
            Format::Packed => {
                // Every descriptor but the head first, then the head's flags, as a
                // driver hands a chain over; the id goes on every descriptor.
                let id = *first;
                let head = packed.avail;
                let mut at = head;
                let mut head_desc = None;
                for (i, &(addr, len, writable)) in segments.iter().enumerate() {
                    let mut flags = packed_flags(at.1) | extra;
                    if writable {
                        flags |= VRING_DESC_F_WRITE as u16;
                    }
                    if i + 1 < segments.len() {
                        flags |= VRING_DESC_F_NEXT as u16;
                    }
                    let desc = RawDescriptor::from(PackedDescriptor::new(addr, len, id, flags));
                    if i == 0 {
                        head_desc = Some(desc);
                    } else {
                        mem.write_obj(desc, ring.unchecked_add(16 * u64::from(at.0)))
                            .unwrap();
                    }
                    at = step(at, 1);
                }
                mem.write_obj(
                    head_desc.unwrap(),
                    ring.unchecked_add(16 * u64::from(head.0)),
                )
                .unwrap();
                packed.avail = at;
                packed.slots.insert(id, segments.len() as u16);
            }
        }
        *first += segments.len() as u16;
    }

    fn add(&mut self, ring: GuestAddress, segments: &[Segment]) {
        self.add_with(ring, segments, 0);
    }

    /// Make available one descriptor pointing at an indirect table at `table`
    /// that holds `segments`.
    fn add_indirect(&mut self, ring: GuestAddress, table: u64, segments: &[Segment]) {
        let descs: Vec<RawDescriptor> = match self.format {
            Format::Split => chain(0, segments),
            Format::Packed => segments
                .iter()
                .map(|&(addr, len, writable)| {
                    let flags = if writable {
                        VRING_DESC_F_WRITE as u16
                    } else {
                        0
                    };
                    RawDescriptor::from(PackedDescriptor::new(addr, len, 0, flags))
                })
                .collect(),
        };
        let mem = self.mem.memory();
        for (i, desc) in descs.iter().enumerate() {
            mem.write_obj(*desc, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        drop(mem);
        let len = 16 * segments.len() as u32;
        self.add_with(ring, &[(table, len, false)], VRING_DESC_F_INDIRECT as u16);
    }

    /// Post a transmit chain; the frame bytes are written into its buffers.
    fn send(&mut self, segments: &[Segment], bytes: &[u8]) {
        let mut offset = 0;
        let guard = self.mem.memory();
        for &(addr, len, _) in segments {
            let end = (offset + len as usize).min(bytes.len());
            if offset < end {
                guard
                    .write_slice(&bytes[offset..end], GuestAddress(addr))
                    .unwrap();
            }
            offset = end;
        }
        drop(guard);
        self.add(TX_RING, segments);
    }

    fn post_rx(&mut self, segments: &[Segment]) {
        self.add(RX_RING, segments);
    }

    fn pump(&mut self, link: LinkParams) {
        self.pump_with(link, Kicks::Arm);
    }

    /// One pass as the worker makes it while polling (`Kicks::Suppress`) or before
    /// it sleeps (`Kicks::Arm`).
    fn pump_with(&mut self, link: LinkParams, kicks: Kicks) {
        let guard = self.mem.memory();
        let link = LinkParams {
            packed_ring: self.format == Format::Packed,
            ..link
        };
        self.pair
            .pump(&self.rx, &self.tx, &guard, link, false, kicks);
    }

    /// Whether the device asks the driver to kick when it adds buffers to the ring
    /// at `ring` (event index off: a split ring's used flags, a packed ring's device
    /// event flags).
    fn wants_kicks(&self, ring: GuestAddress) -> bool {
        let mem = self.mem.memory();
        match self.format {
            Format::Split => {
                let flags: u16 = mem.read_obj(used_ring(ring)).unwrap();
                flags & VRING_USED_F_NO_NOTIFY as u16 == 0
            }
            Format::Packed => {
                let flags: u16 = mem.read_obj(device_area(ring).unchecked_add(2)).unwrap();
                flags != VRING_PACKED_EVENT_FLAG_DISABLE as u16
            }
        }
    }

    /// `(id, len)` of every used entry of the ring at `ring` so far: a split ring's
    /// used ring; a packed ring's used descriptors, as its driver collects them.
    fn used(&mut self, ring: GuestAddress) -> Vec<(u32, u32)> {
        if self.format == Format::Packed {
            return self.packed_used(ring);
        }
        let guard = self.mem.memory();
        let used = used_ring(ring);
        let count: u16 = guard.read_obj(used.unchecked_add(2)).unwrap();
        // Past a ring of them, the oldest are overwritten: only the last ring's worth.
        (u64::from(count.saturating_sub(QUEUE_SIZE))..u64::from(count))
            .map(|i| {
                let slot = i % u64::from(QUEUE_SIZE);
                let elem: [u32; 2] = guard.read_obj(used.unchecked_add(4 + 8 * slot)).unwrap();
                (elem[0], elem[1])
            })
            .collect()
    }

    fn packed_used(&mut self, ring: GuestAddress) -> Vec<(u32, u32)> {
        let mem = self.mem.memory();
        let (_, driver) = self.driver(ring);
        loop {
            let (position, wrap) = driver.used;
            let at = ring.unchecked_add(16 * u64::from(position));
            let flags: u16 = mem.read_obj(at.unchecked_add(14)).unwrap();
            if !packed_used(flags, wrap) {
                break;
            }
            let len: u32 = mem.read_obj(at.unchecked_add(8)).unwrap();
            let id: u16 = mem.read_obj(at.unchecked_add(12)).unwrap();
            driver.seen.push((u32::from(id), len));
            let slots = driver.slots[&id];
            driver.used = step(driver.used, slots);
        }
        driver.seen.clone()
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.mem
            .memory()
            .read_slice(&mut buf, GuestAddress(addr))
            .unwrap();
        buf
    }

    fn stats(&self) -> Vec<QueueStats> {
        self.counters.snapshot()
    }
}

/// A 12-byte virtio-net header followed by an Ethernet frame of `len` bytes.
fn hdr_and_frame(len: usize, seed: u8) -> Vec<u8> {
    let mut bytes = vec![0u8; VNET_HDR_LEN_V1];
    bytes.extend((0..len).map(|i| seed.wrapping_add(i as u8)));
    bytes
}

fn stats(queue: u16, packets: u64, bytes: u64, drops: u64, errors: u64) -> QueueStats {
    QueueStats {
        queue,
        packets,
        bytes,
        drops,
        errors,
    }
}

fn transmitted_frame_is_completed_and_reaches_the_port(format: Format) {
    let mut rig = Rig::new(format, Box::new(NullPort));
    let frame = hdr_and_frame(60, 1);
    // Header and frame in separate descriptors, as Linux sends them.
    rig.send(&[(0x2_0000, 12, false), (0x2_1000, 60, false)], &frame);
    rig.pump(MERGEABLE);
    assert_eq!(rig.used(TX_RING), [(0, 0)]);
    assert_eq!(rig.stats()[1], stats(1, 1, 60, 0, 0));
}

fn looped_frame_lands_in_a_receive_buffer_with_its_header(format: Format) {
    let mut rig = Rig::new(format, Box::<LoopPort>::default());
    let frame = hdr_and_frame(100, 7);
    rig.send(&[(0x2_0000, 112, false)], &frame);
    rig.post_rx(&[(0x4_0000, 2048, true)]);
    rig.pump(MERGEABLE);

    assert_eq!(rig.used(RX_RING), [(0, 112)]);
    let received = rig.read(0x4_0000, 112);
    assert_eq!(&received[..10], &frame[..10], "header as sent");
    assert_eq!(&received[10..12], &1u16.to_le_bytes(), "num_buffers");
    assert_eq!(&received[12..], &frame[12..], "payload unchanged");
    assert_eq!(
        rig.stats(),
        [stats(0, 1, 100, 0, 0), stats(1, 1, 100, 0, 0)]
    );
}

fn mergeable_buffers_take_a_frame_in_pieces_and_count_them_in_num_buffers(format: Format) {
    let mut rig = Rig::new(format, Box::<LoopPort>::default());
    let frame = hdr_and_frame(238, 3); // 250 bytes with the header
    rig.send(&[(0x2_0000, 250, false)], &frame);
    for i in 0..4 {
        rig.post_rx(&[(0x4_0000 + i * 0x1000, 100, true)]);
    }
    rig.pump(MERGEABLE);

    // Three buffers used, in order, the last one partly; the fourth left for later.
    assert_eq!(rig.used(RX_RING), [(0, 100), (1, 100), (2, 50)]);
    let mut received = rig.read(0x4_0000, 100);
    received.extend(rig.read(0x4_1000, 100));
    received.extend(rig.read(0x4_2000, 50));
    assert_eq!(&received[10..12], &3u16.to_le_bytes(), "num_buffers");
    assert_eq!(&received[12..], &frame[12..]);
}

fn a_frame_waits_for_buffers_instead_of_being_dropped(format: Format) {
    let mut rig = Rig::new(format, Box::<LoopPort>::default());
    let frame = hdr_and_frame(200, 9);
    rig.send(&[(0x2_0000, 212, false)], &frame);
    rig.post_rx(&[(0x4_0000, 100, true)]); // not enough for 212 bytes
    rig.pump(MERGEABLE);
    assert!(
        rig.used(RX_RING).is_empty(),
        "the lone buffer went back to the ring"
    );

    rig.post_rx(&[(0x4_1000, 200, true)]);
    rig.pump(MERGEABLE);
    assert_eq!(rig.used(RX_RING), [(0, 100), (1, 112)]);
    assert_eq!(rig.stats()[0], stats(0, 1, 200, 0, 0));
}

fn without_mergeable_buffers_a_frame_too_big_for_one_buffer_is_dropped(format: Format) {
    let mut rig = Rig::new(format, Box::<LoopPort>::default());
    rig.send(&[(0x2_0000, 312, false)], &hdr_and_frame(300, 1));
    rig.send(&[(0x2_1000, 72, false)], &hdr_and_frame(60, 2));
    rig.post_rx(&[(0x4_0000, 256, true)]);
    rig.post_rx(&[(0x4_1000, 256, true)]);
    rig.pump(ONE_BUFFER);

    // The big frame is dropped; the buffer it could not use takes the small one.
    assert_eq!(rig.used(RX_RING), [(0, 72)]);
    assert_eq!(&rig.read(0x4_0000 + 10, 2), &1u16.to_le_bytes());
    assert_eq!(rig.stats()[0], stats(0, 1, 60, 1, 0));
}

fn legacy_header_has_no_num_buffers_field(format: Format) {
    let mut rig = Rig::new(format, Box::<LoopPort>::default());
    let mut frame = vec![0xaa; VNET_HDR_LEN_LEGACY];
    frame.extend([0x55; 60]);
    rig.send(&[(0x2_0000, 70, false)], &frame);
    rig.post_rx(&[(0x4_0000, 2048, true)]);
    let legacy = LinkParams {
        vnet_hdr_len: VNET_HDR_LEN_LEGACY,
        mergeable_rx: false,
        packed_ring: false,
        in_order: false,
    };
    rig.pump(legacy);
    assert_eq!(rig.used(RX_RING), [(0, 70)]);
    assert_eq!(rig.read(0x4_0000, 70), frame, "copied as is");
}

fn malformed_transmit_chains_are_completed_empty_and_counted(format: Format) {
    let mut rig = Rig::new(format, Box::new(NullPort));
    // A writable descriptor in a transmit chain.
    rig.send(&[(0x2_0000, 72, true)], &hdr_and_frame(60, 0));
    // A descriptor past the end of guest memory.
    rig.send(&[(MEM_SIZE as u64 - 16, 72, false)], &[]);
    // Shorter than the virtio-net header.
    rig.send(&[(0x2_1000, 8, false)], &[0; 8]);
    // And a good one, which still goes through.
    rig.send(&[(0x2_2000, 72, false)], &hdr_and_frame(60, 0));
    rig.pump(MERGEABLE);

    assert_eq!(rig.used(TX_RING), [(0, 0), (1, 0), (2, 0), (3, 0)]);
    assert_eq!(rig.stats()[1], stats(1, 1, 60, 0, 3));
}

fn malformed_receive_chain_is_returned_empty_and_the_frame_goes_on(format: Format) {
    let mut rig = Rig::new(format, Box::<LoopPort>::default());
    let frame = hdr_and_frame(60, 5);
    rig.send(&[(0x2_0000, 72, false)], &frame);
    rig.post_rx(&[(0x4_0000, 2048, false)]); // read-only: not a receive buffer
    rig.post_rx(&[(MEM_SIZE as u64 - 8, 2048, true)]); // outside guest memory
    rig.post_rx(&[(0x4_2000, 2048, true)]);
    rig.pump(MERGEABLE);

    assert_eq!(rig.used(RX_RING), [(0, 0), (1, 0), (2, 72)]);
    assert_eq!(&rig.read(0x4_2000 + 12, 60), &frame[12..]);
    assert_eq!(rig.stats()[0], stats(0, 1, 60, 0, 2));
}

fn indirect_descriptor_tables_are_followed(format: Format) {
    let mut rig = Rig::new(format, Box::<LoopPort>::default());
    let frame = hdr_and_frame(60, 11);
    rig.mem
        .memory()
        .write_slice(&frame, GuestAddress(0x2_0000))
        .unwrap();
    // A two-entry table at 0x3000: header, then frame.
    rig.add_indirect(
        TX_RING,
        0x3000,
        &[(0x2_0000, 12, false), (0x2_000c, 60, false)],
    );
    rig.post_rx(&[(0x4_0000, 2048, true)]);
    rig.pump(MERGEABLE);

    assert_eq!(rig.used(TX_RING), [(0, 0)]);
    assert_eq!(rig.used(RX_RING), [(0, 72)]);
    assert_eq!(&rig.read(0x4_0000 + 12, 60), &frame[12..]);
}

fn a_ring_outside_guest_memory_moves_nothing_and_does_not_panic(format: Format) {
    let mut rig = Rig::new(format, Box::<LoopPort>::default());
    rig.tx
        .set_queue_info(0x2_0000, MEM_SIZE as u64 + 0x1000, 0x3_0000)
        .unwrap();
    rig.pump(MERGEABLE);
    assert_eq!(rig.stats()[1], stats(1, 0, 0, 0, 0));
}

fn looped_frames_wait_in_order_until_the_guest_posts_buffers(format: Format) {
    let mut rig = Rig::new(format, Box::<LoopPort>::default());
    // More frames than receive buffers: all are sent once buffers arrive.
    for i in 0..6u64 {
        rig.send(
            &[(0x2_0000 + i * 0x1000, 72, false)],
            &hdr_and_frame(60, i as u8),
        );
    }
    rig.post_rx(&[(0x4_0000, 2048, true)]);
    rig.post_rx(&[(0x4_1000, 2048, true)]);
    rig.pump(MERGEABLE);
    assert_eq!(rig.used(RX_RING).len(), 2);
    assert_eq!(
        rig.used(TX_RING).len(),
        2,
        "the rest wait in the transmit ring"
    );

    for i in 2..6u64 {
        rig.post_rx(&[(0x4_0000 + i * 0x1000, 2048, true)]);
    }
    rig.pump(MERGEABLE);
    assert_eq!(rig.used(RX_RING).len(), 6);
    assert_eq!(rig.used(TX_RING).len(), 6);
    for i in 0..6u64 {
        assert_eq!(
            rig.read(0x4_0000 + i * 0x1000 + 12, 1),
            [i as u8],
            "frame {i} in order"
        );
    }
    assert_eq!(
        rig.stats(),
        [stats(0, 6, 360, 0, 0), stats(1, 6, 360, 0, 0)]
    );
}

/// VIRTIO_F_IN_ORDER is offered because used entries always follow the order the
/// chains were made available: through bad chains, and frames waiting for buffers.
fn used_entries_follow_the_available_order_across_errors_and_waits(format: Format) {
    let mut rig = Rig::new(format, Box::<LoopPort>::default());
    let (a, b) = (hdr_and_frame(100, 1), hdr_and_frame(60, 2));
    rig.send(&[(0x2_0000, 12, false), (0x2_1000, 100, false)], &a); // head 0
    rig.send(&[(0x2_2000, 72, true)], &[]); // head 2: writable, refused
    rig.send(&[(0x2_3000, 12, false), (0x2_4000, 60, false)], &b); // head 3
    rig.post_rx(&[(0x4_0000, 2048, false)]); // head 0: read-only, refused
    rig.post_rx(&[(0x4_1000, 50, true)]); // head 1: too small alone
    rig.pump(MERGEABLE);
    assert_eq!(rig.used(TX_RING), [], "frame a waits for buffers");
    assert_eq!(rig.used(RX_RING), [(0, 0)], "the small buffer waits");

    rig.post_rx(&[(0x4_2000, 2048, true)]); // head 2
    rig.post_rx(&[(0x4_3000, 2048, true)]); // head 3
    rig.pump(MERGEABLE);
    assert_eq!(rig.used(TX_RING), [(0, 0), (2, 0), (3, 0)]);
    assert_eq!(rig.used(RX_RING), [(0, 0), (1, 50), (2, 62), (3, 72)]);
    assert_eq!(rig.stats()[0], stats(0, 2, 160, 0, 1));
}

/// Forty frames through rings of sixteen: positions (and a packed ring's wrap
/// counters) go round five times on the transmit side, chains straddle the end,
/// and the ring base a frontend reads back says where each ring stands.
fn frames_go_round_the_ring_many_times(format: Format) {
    let mut rig = Rig::new(format, Box::<LoopPort>::default());
    for i in 0..40u64 {
        let frame = hdr_and_frame(60, i as u8);
        // Header and frame in two descriptors.
        rig.send(&[(0x2_0000, 12, false), (0x2_1000, 60, false)], &frame);
        let buffer = 0x4_0000 + (i % 4) * 0x1000;
        rig.post_rx(&[(buffer, 2048, true)]);
        rig.pump(MERGEABLE);
        assert_eq!(rig.used(RX_RING).last().map(|u| u.1), Some(72), "frame {i}");
        assert_eq!(&rig.read(buffer + 12, 60), &frame[12..], "frame {i}");
    }
    assert_eq!(
        rig.stats(),
        [stats(0, 40, 2400, 0, 0), stats(1, 40, 2400, 0, 0)]
    );
    let bases = (rig.tx.queue_next_avail(), rig.rx.queue_next_avail());
    match format {
        Format::Split => assert_eq!(bases, (40, 40)),
        // Transmit: 80 descriptors, five rounds, wrap counter back to 0 at 0.
        // Receive: 40 descriptors, two rounds and a half: counter 1, position 8.
        Format::Packed => assert_eq!(bases, (0x0000, 0x8008)),
    }
}

/// A chain with a bad buffer in the middle is refused whole, and the next chain
/// starts after all of its descriptors.
fn a_chain_refused_in_the_middle_is_skipped_whole(format: Format) {
    let mut rig = Rig::new(format, Box::new(NullPort));
    let frame = hdr_and_frame(60, 4);
    rig.add(
        TX_RING,
        &[
            (0x2_0000, 12, false),
            (MEM_SIZE as u64 - 8, 30, false),
            (0x2_1000, 30, false),
        ],
    );
    rig.send(&[(0x2_2000, 72, false)], &frame);
    rig.pump(MERGEABLE);
    assert_eq!(rig.used(TX_RING), [(0, 0), (3, 0)]);
    assert_eq!(rig.stats()[1], stats(1, 1, 60, 0, 1));
}

/// A packed chain whose NEXT flags never end has no place the next chain could
/// start: the ring stops there, and nothing is read past it or completed.
#[test]
fn a_packed_chain_without_an_end_stops_the_ring() {
    let mut rig = Rig::new(Format::Packed, Box::new(NullPort));
    let segments = [(0x2_0000, 72, false); QUEUE_SIZE as usize];
    rig.add_with(TX_RING, &segments, VRING_DESC_F_NEXT as u16);
    rig.pump(MERGEABLE);
    assert_eq!(rig.used(TX_RING), []);
    assert_eq!(rig.stats()[1], stats(1, 0, 0, 0, 0));
    assert_eq!(rig.tx.queue_next_avail(), 0x8000, "the ring base stays");
}

/// A host port with a frame for the guest whenever it is asked.
struct EndlessSource {
    frame: Vec<u8>,
}

impl Port for EndlessSource {
    fn transmit(
        &mut self,
        _frame: &crate::port::GuestFrame<'_>,
    ) -> std::io::Result<crate::port::TxOutcome> {
        Ok(crate::port::TxOutcome::Sent)
    }

    fn peek_rx(&mut self) -> std::io::Result<Option<&mut [u8]>> {
        Ok(Some(&mut self.frame))
    }
}

/// A driver that refills the receive ring faster than the port sends leaves every
/// pass starved; while the worker polls it must not be asked to kick for each
/// refill (a syscall per refill, most of a polling driver's time at 64 B). Before
/// the worker sleeps it must be asked again, or buffers posted then would wait.
fn a_starved_receive_queue_asks_for_kicks_only_before_the_worker_sleeps(
    format: Format,
    looped: bool,
) {
    let port: Box<dyn Port> = if looped {
        Box::<LoopPort>::default()
    } else {
        Box::new(EndlessSource {
            frame: hdr_and_frame(60, 5),
        })
    };
    let mut rig = Rig::new(format, port);
    for i in 0..4u64 {
        rig.send(
            &[(0x2_0000 + i * 0x1000, 72, false)],
            &hdr_and_frame(60, i as u8),
        );
    }
    rig.post_rx(&[(0x4_0000, 2048, true)]);
    rig.pump_with(MERGEABLE, Kicks::Arm);
    assert_eq!(rig.used(RX_RING).len(), 1);
    assert!(
        rig.wants_kicks(RX_RING),
        "asleep and starved: a kick must wake the worker"
    );

    rig.post_rx(&[(0x4_1000, 2048, true)]);
    rig.pump_with(MERGEABLE, Kicks::Suppress);
    assert_eq!(
        rig.used(RX_RING).len(),
        2,
        "the polling pass filled the new buffer"
    );
    assert!(!rig.wants_kicks(RX_RING), "starved while polling: no kicks");

    rig.post_rx(&[(0x4_2000, 2048, true)]);
    rig.pump_with(MERGEABLE, Kicks::Suppress);
    assert_eq!(rig.used(RX_RING).len(), 3);
    assert!(!rig.wants_kicks(RX_RING), "still polling: still no kicks");

    rig.pump_with(MERGEABLE, Kicks::Arm);
    assert!(rig.wants_kicks(RX_RING), "going to sleep: kicks again");
    rig.post_rx(&[(0x4_3000, 2048, true)]);
    rig.pump_with(MERGEABLE, Kicks::Arm);
    assert_eq!(rig.used(RX_RING).len(), 4);
}

fn a_starved_receive_queue_fed_by_a_port_asks_for_kicks_only_before_the_worker_sleeps(
    format: Format,
) {
    a_starved_receive_queue_asks_for_kicks_only_before_the_worker_sleeps(format, false);
}

fn a_starved_receive_queue_fed_by_the_loop_port_asks_for_kicks_only_before_the_worker_sleeps(
    format: Format,
) {
    a_starved_receive_queue_asks_for_kicks_only_before_the_worker_sleeps(format, true);
}

/// What a batching port saw at each flush: frames it held, and the transmit ring's
/// used index the guest could read then.
type Flushes = Arc<Mutex<Vec<(u64, u16)>>>;

/// A port that writes frames only at `flush`, as the TAP port does with io_uring.
struct BatchingPort {
    mem: Arc<Mutex<Option<GuestMemoryAtomic<GuestMemory>>>>,
    queued: u64,
    flushes: Flushes,
}

impl Port for BatchingPort {
    fn transmit(
        &mut self,
        _frame: &crate::port::GuestFrame<'_>,
    ) -> std::io::Result<crate::port::TxOutcome> {
        self.queued += 1;
        Ok(crate::port::TxOutcome::Queued)
    }

    fn flush(&mut self) -> crate::port::FlushedFrames {
        let queued = std::mem::take(&mut self.queued);
        if queued > 0 {
            let mem = self.mem.lock().unwrap().as_ref().unwrap().memory();
            let used_idx: u16 = mem.read_obj(used_ring(TX_RING).unchecked_add(2)).unwrap();
            self.flushes.lock().unwrap().push((queued, used_idx));
        }
        crate::port::FlushedFrames {
            sent: queued,
            bytes: queued * 60,
            ..Default::default()
        }
    }
}

/// A frame a port queued is written (flushed) before its buffers go back to the
/// guest, and counted when the flush says it was sent.
#[test]
fn queued_frames_are_flushed_before_their_chains_go_back() {
    let mem = Arc::new(Mutex::new(None));
    let flushes = Flushes::default();
    let port = BatchingPort {
        mem: Arc::clone(&mem),
        queued: 0,
        flushes: Arc::clone(&flushes),
    };
    let mut rig = Rig::new(Format::Split, Box::new(port));
    *mem.lock().unwrap() = Some(rig.mem.clone());
    for round in 0..2u64 {
        for i in 0..10u64 {
            let at = 0x2_0000 + (round * 10 + i) * 0x1000;
            rig.send(&[(at, 72, false)], &hdr_and_frame(60, i as u8));
        }
        rig.pump(MERGEABLE);
    }
    assert_eq!(
        *flushes.lock().unwrap(),
        [(10, 0), (10, 10)],
        "each pass flushed its ten frames while none of their chains was back"
    );
    assert_eq!(
        rig.used(TX_RING).len(),
        16,
        "the last ring's worth of 20 chains"
    );
    assert_eq!(rig.stats()[1], stats(1, 20, 1200, 0, 0));
}

macro_rules! both_formats {
    ($($test:ident),* $(,)?) => {
        mod split {
            $(#[test]
            fn $test() {
                super::$test(super::Format::Split);
            })*
        }
        mod packed {
            $(#[test]
            fn $test() {
                super::$test(super::Format::Packed);
            })*
        }
    };
}

both_formats!(
    transmitted_frame_is_completed_and_reaches_the_port,
    looped_frame_lands_in_a_receive_buffer_with_its_header,
    mergeable_buffers_take_a_frame_in_pieces_and_count_them_in_num_buffers,
    a_frame_waits_for_buffers_instead_of_being_dropped,
    without_mergeable_buffers_a_frame_too_big_for_one_buffer_is_dropped,
    legacy_header_has_no_num_buffers_field,
    malformed_transmit_chains_are_completed_empty_and_counted,
    malformed_receive_chain_is_returned_empty_and_the_frame_goes_on,
    indirect_descriptor_tables_are_followed,
    a_ring_outside_guest_memory_moves_nothing_and_does_not_panic,
    looped_frames_wait_in_order_until_the_guest_posts_buffers,
    used_entries_follow_the_available_order_across_errors_and_waits,
    frames_go_round_the_ring_many_times,
    a_chain_refused_in_the_middle_is_skipped_whole,
    a_starved_receive_queue_fed_by_a_port_asks_for_kicks_only_before_the_worker_sleeps,
    a_starved_receive_queue_fed_by_the_loop_port_asks_for_kicks_only_before_the_worker_sleeps,
);
