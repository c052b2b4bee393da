//! Datapath tests: descriptor chains laid out in guest memory as a driver does,
//! vrings set up as vhost-user-backend does, then one `pump` and a look at the
//! used rings and guest memory.

use std::sync::{Arc, Mutex};

use vhost_user_backend::VringT;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

use super::*;
use crate::port::{LoopPort, NullPort, Port};
use crate::stats::QueueStats;
use crate::virtio_net::VNET_HDR_LEN_LEGACY;

const QUEUE_SIZE: u16 = 16;
const RX_RING: GuestAddress = GuestAddress(0x0);
const TX_RING: GuestAddress = GuestAddress(0x1_0000);
const MEM_SIZE: usize = 0x10_0000;

const MERGEABLE: LinkParams = LinkParams {
    vnet_hdr_len: VNET_HDR_LEN_V1,
    mergeable_rx: true,
};
const ONE_BUFFER: LinkParams = LinkParams {
    vnet_hdr_len: VNET_HDR_LEN_V1,
    mergeable_rx: false,
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

struct Rig {
    mem: GuestMemoryAtomic<GuestMemory>,
    rx: Vring,
    tx: Vring,
    counters: Arc<DeviceCounters>,
    pair: QueuePair,
    /// Next free descriptor index of each queue.
    next_rx_desc: u16,
    next_tx_desc: u16,
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

fn vring(mem: &GuestMemoryAtomic<GuestMemory>, ring: GuestAddress) -> Vring {
    let vring = Vring::new(mem.clone(), QUEUE_SIZE).unwrap();
    vring.set_queue_size(QUEUE_SIZE);
    vring
        .set_queue_info(ring.0, avail_ring(ring).0, used_ring(ring).0)
        .unwrap();
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    vring
}

impl Rig {
    fn new(port: Box<dyn Port>) -> Self {
        let mem = GuestMemoryAtomic::new(
            GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        );
        let counters = Arc::new(DeviceCounters::new(2));
        let port: SharedPort = Arc::new(Mutex::new(port));
        Self {
            rx: vring(&mem, RX_RING),
            tx: vring(&mem, TX_RING),
            pair: QueuePair::new(0, port, Arc::clone(&counters)),
            mem,
            counters,
            next_rx_desc: 0,
            next_tx_desc: 0,
        }
    }

    fn add(&mut self, ring: GuestAddress, segments: &[Segment]) {
        let first = if ring == RX_RING {
            &mut self.next_rx_desc
        } else {
            &mut self.next_tx_desc
        };
        let descs = chain(*first, segments);
        add_chain(&self.mem.memory(), ring, *first, &descs);
        *first += segments.len() as u16;
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
        let guard = self.mem.memory();
        self.pair
            .pump(&self.rx, &self.tx, &guard, link, false, Kicks::Arm);
    }

    /// `(head, len)` of every used entry of the ring at `ring`.
    fn used(&self, ring: GuestAddress) -> Vec<(u32, u32)> {
        let guard = self.mem.memory();
        let used = used_ring(ring);
        let count: u16 = guard.read_obj(used.unchecked_add(2)).unwrap();
        (0..u64::from(count))
            .map(|i| {
                let elem: [u32; 2] = guard.read_obj(used.unchecked_add(4 + 8 * i)).unwrap();
                (elem[0], elem[1])
            })
            .collect()
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

#[test]
fn transmitted_frame_is_completed_and_reaches_the_port() {
    let mut rig = Rig::new(Box::new(NullPort));
    let frame = hdr_and_frame(60, 1);
    // Header and frame in separate descriptors, as Linux sends them.
    rig.send(&[(0x2_0000, 12, false), (0x2_1000, 60, false)], &frame);
    rig.pump(MERGEABLE);
    assert_eq!(rig.used(TX_RING), [(0, 0)]);
    assert_eq!(rig.stats()[1], stats(1, 1, 60, 0, 0));
}

#[test]
fn looped_frame_lands_in_a_receive_buffer_with_its_header() {
    let mut rig = Rig::new(Box::<LoopPort>::default());
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

#[test]
fn mergeable_buffers_take_a_frame_in_pieces_and_count_them_in_num_buffers() {
    let mut rig = Rig::new(Box::<LoopPort>::default());
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

#[test]
fn a_frame_waits_for_buffers_instead_of_being_dropped() {
    let mut rig = Rig::new(Box::<LoopPort>::default());
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

#[test]
fn without_mergeable_buffers_a_frame_too_big_for_one_buffer_is_dropped() {
    let mut rig = Rig::new(Box::<LoopPort>::default());
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

#[test]
fn legacy_header_has_no_num_buffers_field() {
    let mut rig = Rig::new(Box::<LoopPort>::default());
    let mut frame = vec![0xaa; VNET_HDR_LEN_LEGACY];
    frame.extend([0x55; 60]);
    rig.send(&[(0x2_0000, 70, false)], &frame);
    rig.post_rx(&[(0x4_0000, 2048, true)]);
    let legacy = LinkParams {
        vnet_hdr_len: VNET_HDR_LEN_LEGACY,
        mergeable_rx: false,
    };
    rig.pump(legacy);
    assert_eq!(rig.used(RX_RING), [(0, 70)]);
    assert_eq!(rig.read(0x4_0000, 70), frame, "copied as is");
}

#[test]
fn malformed_transmit_chains_are_completed_empty_and_counted() {
    let mut rig = Rig::new(Box::new(NullPort));
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

#[test]
fn malformed_receive_chain_is_returned_empty_and_the_frame_goes_on() {
    let mut rig = Rig::new(Box::<LoopPort>::default());
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

#[test]
fn indirect_descriptor_tables_are_followed() {
    let mut rig = Rig::new(Box::<LoopPort>::default());
    let frame = hdr_and_frame(60, 11);
    let guard = rig.mem.memory();
    guard.write_slice(&frame, GuestAddress(0x2_0000)).unwrap();
    // A two-entry table at 0x3000: header, then frame.
    let table = chain(0, &[(0x2_0000, 12, false), (0x2_000c, 60, false)]);
    for (i, desc) in table.iter().enumerate() {
        guard
            .write_obj(*desc, GuestAddress(0x3000 + 16 * i as u64))
            .unwrap();
    }
    drop(guard);
    let indirect = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
    let head = RawDescriptor::from(SplitDescriptor::new(0x3000, 32, indirect, 0));
    add_chain(&rig.mem.memory(), TX_RING, 0, &[head]);
    rig.post_rx(&[(0x4_0000, 2048, true)]);
    rig.pump(MERGEABLE);

    assert_eq!(rig.used(TX_RING), [(0, 0)]);
    assert_eq!(rig.used(RX_RING), [(0, 72)]);
    assert_eq!(&rig.read(0x4_0000 + 12, 60), &frame[12..]);
}

#[test]
fn a_ring_outside_guest_memory_moves_nothing_and_does_not_panic() {
    let mut rig = Rig::new(Box::<LoopPort>::default());
    rig.tx
        .set_queue_info(0x2_0000, MEM_SIZE as u64 + 0x1000, 0x3_0000)
        .unwrap();
    rig.pump(MERGEABLE);
    assert_eq!(rig.stats()[1], stats(1, 0, 0, 0, 0));
}

#[test]
fn looped_frames_wait_in_order_until_the_guest_posts_buffers() {
    let mut rig = Rig::new(Box::<LoopPort>::default());
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
#[test]
fn used_entries_follow_the_available_order_across_errors_and_waits() {
    let mut rig = Rig::new(Box::<LoopPort>::default());
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
