//! The host-pointer path against the libraries it stands in for: translations
//! against vm-memory's, chain walks against virtio-queue's `DescriptorChain`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use proptest::prelude::*;
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::*;
use crate::GuestMemory;

const PAGE: u64 = 0x1000;

/// Regions of 1 to 4 pages, each after a gap of 0 to 2 pages (0: adjacent).
fn regions() -> impl Strategy<Value = Vec<(GuestAddress, usize)>> {
    prop::collection::vec((0u64..3, 1u64..5), 1..5).prop_map(|layout| {
        let mut start = 0;
        layout
            .into_iter()
            .map(|(gap, pages)| {
                start += gap * PAGE;
                let region = (GuestAddress(start), (pages * PAGE) as usize);
                start += pages * PAGE;
                region
            })
            .collect()
    })
}

proptest! {
    #[test]
    fn translation_agrees_with_vm_memory(
        layout in regions(),
        addr in 0u64..0x1_8000,
        len in 0u32..0x3000,
    ) {
        let mem = GuestMemory::from_ranges(&layout).unwrap();
        let mapped = MappedMemory::new(Arc::new(mem.clone()));
        let mut pieces = Vec::new();
        let translated = mapped.translate(addr, len, &mut pieces, usize::MAX);
        let in_memory = len == 0 || mem.check_range(GuestAddress(addr), len as usize);
        prop_assert_eq!(translated.is_ok(), in_memory);
        if in_memory && len > 0 {
            let expected: Vec<(usize, usize)> = mem
                .get_slices(GuestAddress(addr), len as usize)
                .map(|slice| {
                    let slice = slice.unwrap();
                    (slice.ptr_guard().as_ptr() as usize, slice.len())
                })
                .collect();
            let ours: Vec<(usize, usize)> = pieces
                .iter()
                .map(|&piece| (mapped.host_address(piece) as usize, piece.len()))
                .collect();
            prop_assert_eq!(ours, expected);
        }
    }

    #[test]
    fn a_descriptor_reads_the_same_at_any_alignment(
        desc in descriptor(),
        offset in 0u64..16,
    ) {
        // Ring descriptors are 16-aligned (read as two words); an indirect table may
        // start anywhere (read byte by byte).
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        write_descriptor(&mem, INDIRECT + offset, &desc);
        let mapped = MappedMemory::new(Arc::new(mem));
        let table = mapped.indirect_table(INDIRECT + offset, 16).unwrap();
        let read = table.get(0).unwrap();
        prop_assert_eq!(
            (read.addr, read.len, read.flags, read.next),
            (desc.addr, desc.len, desc.flags, desc.next)
        );
    }

    #[test]
    fn chain_walk_agrees_with_virtio_queue(
        table in prop::collection::vec(descriptor(), SIZE as usize),
        indirect in prop::collection::vec(descriptor(), 4),
        head in 0u16..SIZE + 2,
        device_writes in any::<bool>(),
        max_bytes in prop_oneof![Just(usize::MAX), 0usize..0x400],
        max_pieces in 1usize..10,
    ) {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        for (i, desc) in table.iter().enumerate() {
            write_descriptor(&mem, DESC + 16 * i as u64, desc);
        }
        for (i, desc) in indirect.iter().enumerate() {
            write_descriptor(&mem, INDIRECT + 16 * i as u64, desc);
        }
        mem.write_obj(head, GuestAddress(AVAIL + 4)).unwrap();
        mem.store(1u16, GuestAddress(AVAIL + 2), Ordering::Release).unwrap();

        // virtio-queue's walk.
        let mut queue = Queue::new(SIZE).unwrap();
        queue.set_desc_table_address(Some(DESC as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        queue.set_ready(true);
        let chain = queue.iter(&mem).unwrap().next().unwrap();
        let descs: Vec<_> = chain.collect();
        let ends = descs.last().is_some_and(|d| !d.has_next());
        let total: usize = descs.iter().map(|d| d.len() as usize).sum();
        let buffers = descs.iter().filter(|d| d.len() > 0).count();
        // Where the two differ on purpose: virtio-queue reads an indirect table entry
        // by entry, so a table running past guest memory passes if the chain ends
        // first; this walk wants the whole table in memory before it reads any.
        let mut tables_in_memory = true;
        let mut index = head;
        for _ in 0..SIZE {
            let Some(desc) = table.get(usize::from(index)) else { break };
            if desc.flags & 4 != 0 {
                // The table replaces the rest of the chain.
                tables_in_memory = mem.check_range(GuestAddress(desc.addr), desc.len as usize);
                break;
            }
            if desc.flags & 1 == 0 {
                break;
            }
            index = desc.next;
        }
        let acceptable = ends
            && tables_in_memory
            && descs.iter().all(|d| d.is_write_only() == device_writes)
            && descs.iter().all(|d| mem.check_range(d.addr(), d.len() as usize))
            && total <= max_bytes
            && buffers <= max_pieces;

        // Ours.
        let mapped = MappedMemory::new(Arc::new(mem.clone()));
        let placement = mapped.place_ring(&LAYOUT).unwrap();
        let ring = mapped.ring(&placement).unwrap();
        let rules = ChainRules { device_writes, max_bytes, max_pieces };
        let mut pieces = Vec::new();
        let walked = walk_chain(&ring, head, rules, &mut pieces);
        prop_assert_eq!(walked.is_ok(), acceptable, "{:?} vs {:?}", walked, descs);
        if let Ok(len) = walked {
            prop_assert_eq!(len, total);
            let ours: Vec<(u64, usize)> = pieces
                .iter()
                .map(|&p| (mapped.guest_address(p), p.len()))
                .collect();
            let expected: Vec<(u64, usize)> = descs
                .iter()
                .filter(|d| d.len() > 0)
                .map(|d| (d.addr().0, d.len() as usize))
                .collect();
            prop_assert_eq!(ours, expected);
        }
    }
}

const SIZE: u16 = 8;
const MEM_SIZE: usize = 0x1_0000;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;
const INDIRECT: u64 = 0x400;
const LAYOUT: RingLayout = RingLayout {
    desc_table: DESC,
    avail_ring: AVAIL,
    used_ring: USED,
    size: SIZE,
    packed: false,
};

#[derive(Clone, Copy, Debug)]
struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// Buffers in memory, at its end, past it, or wrapping the address space; indirect
/// tables of a few descriptors (or a broken length); any flags; nexts in and past
/// the ring.
fn descriptor() -> impl Strategy<Value = RawDesc> {
    let addr = prop_oneof![
        4 => (0x10u64..0x40).prop_map(|k| k * 0x100),
        1 => Just(MEM_SIZE as u64 - 0x80),
        1 => Just(MEM_SIZE as u64 + 0x100),
        1 => Just(u64::MAX - 0x10),
        2 => Just(INDIRECT),
    ];
    let len = prop_oneof![4 => 0u32..0x100, 2 => (0u32..5).prop_map(|n| 16 * n), 1 => Just(17u32)];
    let flags = (0u16..8).prop_map(|bits| {
        let mut flags = 0;
        if bits & 1 != 0 {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        if bits & 2 != 0 {
            flags |= VRING_DESC_F_WRITE as u16;
        }
        if bits & 4 != 0 {
            flags |= VRING_DESC_F_INDIRECT as u16;
        }
        flags
    });
    (addr, len, flags, 0u16..SIZE + 2).prop_map(|(addr, len, flags, next)| RawDesc {
        addr,
        len,
        flags,
        next,
    })
}

fn write_descriptor(mem: &GuestMemory, at: u64, desc: &RawDesc) {
    mem.write_obj(desc.addr.to_le(), GuestAddress(at)).unwrap();
    mem.write_obj(desc.len.to_le(), GuestAddress(at + 8))
        .unwrap();
    mem.write_obj(desc.flags.to_le(), GuestAddress(at + 12))
        .unwrap();
    mem.write_obj(desc.next.to_le(), GuestAddress(at + 14))
        .unwrap();
}

#[test]
fn rings_are_refused_outside_memory_across_regions_misaligned_or_uneven() {
    // Two adjacent regions: guest-contiguous, not host-contiguous.
    let mem = GuestMemory::from_ranges(&[
        (GuestAddress(0), MEM_SIZE),
        (GuestAddress(MEM_SIZE as u64), MEM_SIZE),
    ])
    .unwrap();
    let mapped = MappedMemory::new(Arc::new(mem));
    let at = |desc_table, avail_ring, used_ring| RingLayout {
        desc_table,
        avail_ring,
        used_ring,
        size: 256,
        packed: false,
    };
    assert!(mapped.place_ring(&at(0x0, 0x1000, 0x2000)).is_ok());
    assert_eq!(
        mapped.place_ring(&at(0x0, 0x1000, 2 * MEM_SIZE as u64)),
        Err(RingPlacementError::Outside("used ring"))
    );
    assert_eq!(
        mapped.place_ring(&at(MEM_SIZE as u64 - 0x800, 0x1000, 0x2000)),
        Err(RingPlacementError::Outside("descriptor table")),
        "a table across two regions"
    );
    assert_eq!(
        mapped.place_ring(&at(0x8, 0x1000, 0x2000)),
        Err(RingPlacementError::Misaligned("descriptor table"))
    );
    assert_eq!(
        mapped.place_ring(&at(0x0, 0x1001, 0x2000)),
        Err(RingPlacementError::Misaligned("available ring"))
    );
    assert_eq!(
        mapped.place_ring(&at(0x0, 0x1000, 0x2002)),
        Err(RingPlacementError::Misaligned("used ring"))
    );
    let uneven = RingLayout {
        size: 100,
        packed: false,
        ..at(0x0, 0x1000, 0x2000)
    };
    assert_eq!(
        mapped.place_ring(&uneven),
        Err(RingPlacementError::BadSize(100))
    );
}

#[test]
fn a_piece_is_checked_against_its_region_when_used() {
    let big = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let small = GuestMemory::from_ranges(&[(GuestAddress(0), PAGE as usize)]).unwrap();
    let old = MappedMemory::new(Arc::new(big));
    let new = MappedMemory::new(Arc::new(small));
    let mut pieces = Vec::new();
    old.translate(0x2000, 0x100, &mut pieces, 1).unwrap();
    let mut buf = [0u8; 0x100];
    assert_eq!(old.read(&pieces, 0, &mut buf), 0x100);
    // The same piece against a smaller table: refused, not read past the region.
    assert_eq!(new.read(&pieces, 0, &mut buf), 0);
    assert_eq!(new.write(&pieces, 0, &buf), 0);
}

#[test]
fn guest_to_guest_copy_follows_both_piece_lists() {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let frame: Vec<u8> = (0..100u8).collect();
    // Source in three uneven pieces, destination in two others.
    mem.write_slice(&frame[..7], GuestAddress(0x1000)).unwrap();
    mem.write_slice(&frame[7..60], GuestAddress(0x2000))
        .unwrap();
    mem.write_slice(&frame[60..], GuestAddress(0x3000)).unwrap();
    let mapped = MappedMemory::new(Arc::new(mem.clone()));
    let (mut src, mut dst) = (Vec::new(), Vec::new());
    for (addr, len) in [(0x1000, 7), (0x2000, 53), (0x3000, 40)] {
        mapped.translate(addr, len, &mut src, 8).unwrap();
    }
    for (addr, len) in [(0x8000, 30), (0x9000, 100)] {
        mapped.translate(addr, len, &mut dst, 8).unwrap();
    }
    assert_eq!(mapped.copy(&dst, &src, 5, 95), 95);
    let mut out = vec![0u8; 95];
    mem.read_slice(&mut out[..30], GuestAddress(0x8000))
        .unwrap();
    mem.read_slice(&mut out[30..], GuestAddress(0x9000))
        .unwrap();
    assert_eq!(out, frame[5..]);
    // A shorter destination takes what fits.
    assert_eq!(mapped.copy(&dst[..1], &src, 0, 100), 30);
}
