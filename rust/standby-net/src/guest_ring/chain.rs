//! Walking one descriptor chain of a split or a packed ring into checked [`Piece`]s.
//!
//! Split rings follow virtio-queue's `DescriptorChain` (the tests compare the two): follow
//! `next` while VIRTQ_DESC_F_NEXT is set, at most `size` descriptors; a descriptor
//! with VIRTQ_DESC_F_INDIRECT replaces the rest of the chain with its table (not
//! nested, a whole number of descriptors). On top, the datapath's own checks: the
//! direction of every buffer, a limit on pieces and on bytes, every byte in guest
//! memory. Each descriptor is read once into a local (the guest may change it).

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};

use super::mapped::{
    Descriptor, DescriptorTable, MappedMemory, PackedRingView, Piece, RingView, TranslateError,
};

const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
const F_INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// Why one descriptor chain was refused. The chain is completed with length 0 so
/// the guest does not see a descriptor leak; the queue goes on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor {addr:#x}+{len:#x} lies outside guest memory")]
    OutsideGuestMemory { addr: u64, len: u32 },
    #[error("device-writable descriptor in a transmit chain")]
    WritableInTransmitChain,
    #[error("device-readable descriptor in a receive chain")]
    ReadableInReceiveChain,
    #[error("chain of {0} bytes cannot hold the virtio-net header")]
    ShorterThanHeader(usize),
    #[error("chain of more than {0} bytes")]
    LongerThan(usize),
    #[error("chain of more than {0} buffers")]
    TooManyBuffers(usize),
    #[error("chain does not end within the ring (it loops, or a next index lies past the ring)")]
    Unterminated,
    #[error(
        "indirect descriptor table of {0} bytes (nested, or not a whole number of descriptors)"
    )]
    BadIndirectTable(u32),
    #[error("frame of {0} bytes is shorter than an Ethernet header")]
    ShorterThanEthernetHeader(usize),
}

/// What the device does with a chain's buffers, and how much of them it accepts.
#[derive(Clone, Copy, Debug)]
pub struct ChainRules {
    /// Receive chains: every buffer device-writable. Transmit chains: none.
    pub device_writes: bool,
    /// Longest chain in bytes.
    pub max_bytes: usize,
    /// Most pieces in the output (counting what it already holds).
    pub max_pieces: usize,
}

enum Table<'v, 'm> {
    Ring(&'v RingView<'m>),
    Indirect(DescriptorTable<'m>),
}

impl Table<'_, '_> {
    fn get(&self, index: u16) -> Option<Descriptor> {
        match self {
            Table::Ring(ring) => ring.descriptor(index),
            Table::Indirect(table) => table.get(index),
        }
    }
}

/// Append the buffers of the chain starting at `head` to `pieces`; returns the
/// chain's length in bytes. On an error, `pieces` may hold part of the chain.
#[inline(always)]
pub fn walk_chain(
    ring: &RingView<'_>,
    head: u16,
    rules: ChainRules,
    pieces: &mut Vec<Piece>,
) -> Result<usize, ChainError> {
    let mem = ring.memory();
    let mut table = Table::Ring(ring);
    let mut index = head;
    let mut ttl = ring.size();
    let mut indirect = false;
    let mut len = 0usize;
    loop {
        if ttl == 0 {
            return Err(ChainError::Unterminated);
        }
        let Some(desc) = table.get(index) else {
            return Err(ChainError::Unterminated);
        };
        if desc.flags & F_INDIRECT != 0 {
            let entries = desc.len as usize / 16;
            if indirect || desc.len % 16 != 0 || entries > usize::from(u16::MAX) {
                return Err(ChainError::BadIndirectTable(desc.len));
            }
            let table_in_memory = mem.indirect_table(desc.addr, desc.len).map_err(|_| {
                ChainError::OutsideGuestMemory {
                    addr: desc.addr,
                    len: desc.len,
                }
            })?;
            ttl = table_in_memory.len();
            table = Table::Indirect(table_in_memory);
            index = 0;
            indirect = true;
            continue;
        }
        len = add_buffer(mem, desc.addr, desc.len, desc.flags, rules, pieces, len)?;
        if desc.flags & F_NEXT == 0 {
            return Ok(len);
        }
        index = desc.next;
        ttl -= 1;
    }
}

/// Check one buffer of a chain that holds `len` bytes so far and append its
/// pieces; returns the chain's new length.
#[inline(always)]
fn add_buffer(
    mem: &MappedMemory,
    addr: u64,
    buffer_len: u32,
    flags: u16,
    rules: ChainRules,
    pieces: &mut Vec<Piece>,
    len: usize,
) -> Result<usize, ChainError> {
    let writable = flags & F_WRITE != 0;
    if writable != rules.device_writes {
        return Err(if rules.device_writes {
            ChainError::ReadableInReceiveChain
        } else {
            ChainError::WritableInTransmitChain
        });
    }
    let len = len + buffer_len as usize;
    if len > rules.max_bytes {
        return Err(ChainError::LongerThan(rules.max_bytes));
    }
    mem.translate(addr, buffer_len, pieces, rules.max_pieces)
        .map_err(|e| match e {
            TranslateError::Outside => ChainError::OutsideGuestMemory {
                addr,
                len: buffer_len,
            },
            TranslateError::TooManyPieces => ChainError::TooManyBuffers(rules.max_pieces),
        })?;
    Ok(len)
}

/// One chain of a packed ring: what completes it, and its buffers.
#[derive(Debug, PartialEq, Eq)]
pub struct PackedChain {
    /// The buffer id, from the chain's last descriptor.
    pub id: u16,
    /// Descriptors it takes in the ring (the used descriptor skips them all).
    pub slots: u16,
    /// Its length in bytes, or why it was refused.
    pub walk: Result<usize, ChainError>,
}

/// Walk the packed chain whose first descriptor is at `position` (virtio 1.x,
/// 2.8.6–2.8.7): descriptors follow each other in the ring while VIRTQ_DESC_F_NEXT
/// is set; one with VIRTQ_DESC_F_INDIRECT stands for a table whose entries all
/// belong to the chain. A chain refused for its buffers is still walked to its end,
/// so the ring goes on after it. `None`: the chain does not end within the ring;
/// where the next chain starts is then unknown, and the ring cannot go on.
///
/// Inlined into the ring cursor, with `add_buffer` and `MappedMemory::translate`:
/// out of line, the chain came back through memory, and the worker's next loads
/// of it waited behind its stores to the used ring (A/B, 64 B packed loopback-32:
/// 10.8-11.5 Mpps out of line, 13.1-13.5 inlined; bench/README.md). The split walk
/// is inlined for the same reason.
#[inline(always)]
pub fn walk_packed_chain(
    ring: &PackedRingView<'_>,
    position: u16,
    rules: ChainRules,
    pieces: &mut Vec<Piece>,
) -> Option<PackedChain> {
    let mem = ring.memory();
    let mut walk = Ok(0usize);
    for slots in 1..=ring.size() {
        let desc = ring.descriptor(position.wrapping_add(slots - 1));
        if let Ok(len) = walk {
            walk = if desc.flags & F_INDIRECT != 0 {
                add_packed_indirect(mem, desc.addr, desc.len, rules, pieces, len)
            } else {
                add_buffer(mem, desc.addr, desc.len, desc.flags, rules, pieces, len)
            };
        }
        if desc.flags & F_NEXT == 0 {
            return Some(PackedChain {
                id: desc.id,
                slots,
                walk,
            });
        }
    }
    None
}

/// The buffers of a packed indirect table (not nested, a whole number of entries).
fn add_packed_indirect(
    mem: &MappedMemory,
    addr: u64,
    table_len: u32,
    rules: ChainRules,
    pieces: &mut Vec<Piece>,
    mut len: usize,
) -> Result<usize, ChainError> {
    let entries = table_len as usize / 16;
    if table_len % 16 != 0 || entries == 0 || entries > usize::from(u16::MAX) {
        return Err(ChainError::BadIndirectTable(table_len));
    }
    let table =
        mem.indirect_table(addr, table_len)
            .map_err(|_| ChainError::OutsideGuestMemory {
                addr,
                len: table_len,
            })?;
    for index in 0..table.len() {
        let Some(desc) = table.get_packed(index) else {
            break;
        };
        if desc.flags & F_INDIRECT != 0 {
            return Err(ChainError::BadIndirectTable(table_len));
        }
        len = add_buffer(mem, desc.addr, desc.len, desc.flags, rules, pieces, len)?;
    }
    Ok(len)
}
