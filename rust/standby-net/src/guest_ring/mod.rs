//! Split and packed virtqueues as host pointers: the datapath's access to guest memory.
//!
//! vm-memory maps guest memory and virtio-queue's `Queue` holds each ring's addresses
//! and indices; both stay. What this module replaces is their per-access path: every
//! `Bytes::read_obj`/`write_obj` looks up the region (a binary search) and builds a
//! slice iterator, and `DescriptorChain` reads each descriptor that way. Profiling
//! the worker at 64 B frames put 67 % of its time there (`GuestMemorySliceIterator`
//! 43 %, `find_region` 24 %), about four lookups per frame guest→host and ten in
//! loopback. Here the rings are translated once per memory table and ring layout,
//! each buffer once per use (against a flat region table with a last-hit hint), and
//! ring fields are read and written through checked host pointers.
//! `bench/vhost_throughput.py` measures what that buys.
//!
//! [`mapped`] holds every `unsafe` of it, with the argument why each is sound;
//! [`chain`] walks a descriptor chain in safe code on top.

mod chain;
mod mapped;
#[cfg(test)]
mod tests;

pub use chain::{walk_chain, walk_packed_chain, ChainError, ChainRules};
pub use mapped::{
    MappedMemory, PackedRingView, Piece, RingLayout, RingPlacement, RingPlacementError, RingView,
};
