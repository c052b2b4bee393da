//! Walking one descriptor chain of a split ring into checked [`Piece`]s.
//!
//! The rules are virtio-queue's `DescriptorChain` (the tests compare the two): follow
//! `next` while VIRTQ_DESC_F_NEXT is set, at most `size` descriptors; a descriptor
//! with VIRTQ_DESC_F_INDIRECT replaces the rest of the chain with its table (not
//! nested, a whole number of descriptors). On top, the datapath's own checks: the
//! direction of every buffer, a limit on pieces and on bytes, every byte in guest
//! memory. Each descriptor is read once into a local (the guest may change it).

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};

use super::mapped::{Descriptor, DescriptorTable, Piece, RingView, TranslateError};

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
        let writable = desc.flags & F_WRITE != 0;
        if writable != rules.device_writes {
            return Err(if rules.device_writes {
                ChainError::ReadableInReceiveChain
            } else {
                ChainError::WritableInTransmitChain
            });
        }
        len += desc.len as usize;
        if len > rules.max_bytes {
            return Err(ChainError::LongerThan(rules.max_bytes));
        }
        mem.translate(desc.addr, desc.len, pieces, rules.max_pieces)
            .map_err(|e| match e {
                TranslateError::Outside => ChainError::OutsideGuestMemory {
                    addr: desc.addr,
                    len: desc.len,
                },
                TranslateError::TooManyPieces => ChainError::TooManyBuffers(rules.max_pieces),
            })?;
        if desc.flags & F_NEXT == 0 {
            return Ok(len);
        }
        index = desc.next;
        ttl -= 1;
    }
}
