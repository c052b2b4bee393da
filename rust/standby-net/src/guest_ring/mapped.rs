//! Guest memory as host pointers. This is the only module of the datapath that
//! dereferences a pointer into guest memory; each `unsafe` block says why it is sound.
//!
//! Three rules make it so:
//!
//! 1. **In bounds.** A host pointer is formed only for a range checked against the
//!    region it lies in. [`Piece`]s and [`RingPlacement`]s carry region and offset,
//!    not pointers, and are checked against the region's length again when turned
//!    into one, so a piece kept from an older memory table cannot reach past a region.
//! 2. **Still mapped.** [`MappedMemory`] owns an `Arc` of the memory table it was
//!    built from; its regions unmap only when the last `Arc` goes. Every pointer is
//!    used while a `&MappedMemory` is borrowed ([`RingView`] borrows it too).
//! 3. **Shared with a guest.** The guest may write its memory at any moment. No Rust
//!    reference (`&[u8]`) into it is ever made: ring fields are read and written with
//!    atomic or volatile accesses, buffers are copied with raw copies, and what the
//!    datapath decides on (a descriptor's length, an index) is read once into a local.
//!
//! Writes are marked in the dirty log of their region (a no-op unless VHOST_F_LOG_ALL
//! is on), so a migration sees every byte the device wrote, exactly as vm-memory's
//! accessors would have marked it.

use std::cell::Cell;
use std::num::Wrapping;
use std::ptr;
use std::sync::atomic::{fence, AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::dirty_log::{region_log, DirtyLog};
use crate::GuestMemory;

/// One mapped region: where it lies in the guest, where in this process.
struct MappedRegion {
    guest_start: u64,
    len: u64,
    host: *mut u8,
    log: DirtyLog,
}

/// A range of guest memory within one region, checked when it was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    region: u32,
    offset: u64,
    len: u32,
}

impl Piece {
    pub fn len(&self) -> usize {
        self.len as usize
    }
}

/// A guest range that does not lie (wholly) in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutsideMemory;

/// Why a ring cannot be used where the frontend put it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingPlacementError {
    #[error("the {0} lies outside guest memory or across two memory regions")]
    Outside(&'static str),
    #[error("the {0} is not aligned as the virtio specification requires")]
    Misaligned(&'static str),
    #[error("a ring of {0} entries (must be a power of two up to 32768)")]
    BadSize(u16),
}

/// Guest addresses and size of a virtqueue. For a packed ring (`packed`), the
/// available and used addresses are those of the driver and the device event
/// suppression areas (virtio 1.x, 2.8.10), as vhost-user passes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub size: u16,
    pub packed: bool,
}

/// Where a ring's three parts lie, translated once per memory table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingPlacement {
    desc: Piece,
    avail: Piece,
    used: Piece,
    size: u16,
    packed: bool,
}

/// A split-ring descriptor as read from guest memory (virtio 1.x, 2.7.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

const DESCRIPTOR_SIZE: usize = 16;
const CACHE_LINE: u64 = 64;
/// Lines of a buffer the device will read that [`MappedMemory::prefetch`] asks for:
/// a whole 1518 B frame with its header (25 lines) and then some. With only its first
/// two lines asked for, the copy of a large frame waited on every line after them
/// (A/B, 1518 B guest-to-host split: 5.70-6.24 Mpps with two lines, 6.81-8.31 with
/// all; bench/README.md).
const PREFETCH_READ_LINES: u32 = 32;
/// Lines of a buffer the device will write: the first two, which hold a small frame
/// after its virtio-net header.
const PREFETCH_WRITE_LINES: u32 = 2;

/// A packed-ring descriptor as read from guest memory (virtio 1.x, 2.8.13): the
/// same 16 bytes as a split one, with the buffer id where the split ring has its
/// flags, and the flags where it has `next`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedDescriptor {
    pub addr: u64,
    pub len: u32,
    pub id: u16,
    pub flags: u16,
}

impl From<Descriptor> for PackedDescriptor {
    fn from(raw: Descriptor) -> Self {
        Self {
            addr: raw.addr,
            len: raw.len,
            id: raw.flags,
            flags: raw.next,
        }
    }
}

impl Descriptor {
    fn from_le_bytes(raw: [u8; DESCRIPTOR_SIZE]) -> Self {
        let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, f0, f1, n0, n1] = raw;
        Self {
            addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
            len: u32::from_le_bytes([l0, l1, l2, l3]),
            flags: u16::from_le_bytes([f0, f1]),
            next: u16::from_le_bytes([n0, n1]),
        }
    }
}

/// Numbers each [`MappedMemory`], so a ring placed on one is never used with another.
static GENERATIONS: AtomicU64 = AtomicU64::new(0);

/// Guest memory of one memory table, translated for the datapath.
pub struct MappedMemory {
    /// Keeps every region mapped while pointers into it exist (rule 2).
    mem: Arc<GuestMemory>,
    generation: u64,
    regions: Vec<MappedRegion>,
    /// The region of the last lookup: a guest's buffers mostly come from one.
    hint: Cell<usize>,
    /// The CPU has PREFETCHW: asked once here, not on every prefetch of the datapath.
    prefetchw: bool,
}

// SAFETY: the raw pointers point into mappings owned by `mem` (shared, reference
// counted, never mutated through `MappedMemory` except by the guest-memory accesses
// below, which are sound from any thread). `hint` makes it `!Sync`, which is wanted:
// each worker owns its own `MappedMemory`.
unsafe impl Send for MappedMemory {}

impl MappedMemory {
    pub fn new(mem: Arc<GuestMemory>) -> Self {
        let regions = mem
            .iter()
            .filter_map(|region| {
                let host = region.get_host_address(MemoryRegionAddress(0)).ok()?;
                Some(MappedRegion {
                    guest_start: region.start_addr().0,
                    len: region.len(),
                    host,
                    log: region_log(region).clone(),
                })
            })
            .collect();
        Self {
            mem,
            generation: GENERATIONS.fetch_add(1, Ordering::Relaxed),
            regions,
            hint: Cell::new(0),
            prefetchw: has_prefetchw(),
        }
    }

    /// Unique to this table in this process.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether this was built from `mem` (the memory table has not changed since).
    pub fn is_built_from(&self, mem: &GuestMemory) -> bool {
        ptr::eq(Arc::as_ptr(&self.mem), mem)
    }

    fn region_of(&self, addr: u64) -> Option<usize> {
        let contains = |r: &MappedRegion| addr >= r.guest_start && addr - r.guest_start < r.len;
        let hint = self.hint.get();
        if self.regions.get(hint).is_some_and(contains) {
            return Some(hint);
        }
        // Regions are sorted and do not overlap (vm-memory checks it).
        let index = self
            .regions
            .partition_point(|r| r.guest_start <= addr)
            .checked_sub(1)?;
        contains(&self.regions[index]).then(|| {
            self.hint.set(index);
            index
        })
    }

    /// Append the pieces of `[addr, addr + len)` to `out`, one per region it crosses
    /// (regions adjacent in the guest need not be adjacent here). A zero-length range
    /// adds nothing. Fails when a byte lies outside guest memory, or when more than
    /// `max_pieces` would be in `out`. Inlined into the chain walks (see
    /// `walk_packed_chain`).
    #[inline(always)]
    pub fn translate(
        &self,
        addr: u64,
        len: u32,
        out: &mut Vec<Piece>,
        max_pieces: usize,
    ) -> Result<(), TranslateError> {
        addr.checked_add(u64::from(len))
            .ok_or(TranslateError::Outside)?;
        let mut addr = addr;
        let mut remaining = u64::from(len);
        while remaining > 0 {
            let index = self.region_of(addr).ok_or(TranslateError::Outside)?;
            let region = &self.regions[index];
            let offset = addr - region.guest_start;
            let n = remaining.min(region.len - offset);
            if out.len() >= max_pieces {
                return Err(TranslateError::TooManyPieces);
            }
            out.push(Piece {
                region: index as u32,
                offset,
                // n <= remaining <= u32::MAX
                len: n as u32,
            });
            addr += n;
            remaining -= n;
        }
        Ok(())
    }

    /// `[addr, addr + len)` within one region, starting at a host address aligned to `align`.
    fn contiguous(&self, addr: u64, len: u64, align: usize) -> Result<Piece, ContiguousError> {
        let index = self.region_of(addr).ok_or(ContiguousError::Outside)?;
        let region = &self.regions[index];
        let offset = addr - region.guest_start;
        if len > region.len - offset || len > u64::from(u32::MAX) {
            return Err(ContiguousError::Outside);
        }
        if (region.host as usize).wrapping_add(offset as usize) % align != 0 {
            return Err(ContiguousError::Misaligned);
        }
        Ok(Piece {
            region: index as u32,
            offset,
            len: len as u32,
        })
    }

    /// Hint the CPU to fetch the lines of the buffer at guest address `addr` (for
    /// writing when `write`): a buffer a few chains ahead is then in cache when its
    /// turn comes, instead of on the CPU that filled it. Does nothing for an address
    /// outside memory; stops at the end of the address's region.
    pub fn prefetch(&self, addr: u64, len: u32, write: bool) {
        let Some(index) = self.region_of(addr) else {
            return;
        };
        let region = &self.regions[index];
        let offset = addr - region.guest_start;
        let at = region.host.wrapping_add(offset as usize).cast_const();
        let prefetchw = write && self.prefetchw;
        let lines = if write {
            PREFETCH_WRITE_LINES
        } else {
            PREFETCH_READ_LINES
        };
        let end = u64::from(len).min(region.len - offset);
        prefetch(at, prefetchw);
        let mut next = CACHE_LINE - (at as u64 % CACHE_LINE);
        for _ in 1..lines {
            if next >= end {
                break;
            }
            prefetch(at.wrapping_add(next as usize), prefetchw);
            next += CACHE_LINE;
        }
    }

    /// Host address of `piece`, checked against its region once more (rule 1).
    fn host(&self, piece: Piece) -> Option<*mut u8> {
        let region = self.regions.get(piece.region as usize)?;
        if piece.offset.checked_add(u64::from(piece.len))? > region.len {
            return None;
        }
        // SAFETY: offset + len <= region.len, so the result stays within the region's
        // mapping (or one past its end for an empty piece at its end).
        Some(unsafe { region.host.add(piece.offset as usize) })
    }

    fn mark_dirty(&self, piece: Piece, from: usize, len: usize) {
        if let Some(region) = self.regions.get(piece.region as usize) {
            region.log.mark_dirty(piece.offset as usize + from, len);
        }
    }

    /// Copy the bytes of `pieces`, from byte `skip` on, into `dst`; returns how many.
    pub fn read(&self, pieces: &[Piece], skip: usize, dst: &mut [u8]) -> usize {
        let mut skip = skip;
        let mut copied = 0;
        for &piece in pieces {
            if copied == dst.len() {
                break;
            }
            if skip >= piece.len() {
                skip -= piece.len();
                continue;
            }
            let Some(src) = self.host(piece) else {
                break;
            };
            let n = (piece.len() - skip).min(dst.len() - copied);
            // SAFETY: `src + skip .. + n` lies within the piece (skip + n <= piece.len),
            // which `host` checked to be mapped; `dst[copied..copied + n]` is ours. The
            // guest may write the source meanwhile: the copy then holds a mix of old
            // and new bytes, as a DMA read would, and no reference to it exists.
            unsafe { ptr::copy_nonoverlapping(src.add(skip), dst.as_mut_ptr().add(copied), n) };
            copied += n;
            skip = 0;
        }
        copied
    }

    /// Copy `src` into `pieces` in order, from byte `skip` of them on, marking what
    /// was written dirty; returns how many bytes fit.
    pub fn write(&self, pieces: &[Piece], skip: usize, src: &[u8]) -> usize {
        let mut skip = skip;
        let mut written = 0;
        for &piece in pieces {
            if written == src.len() {
                break;
            }
            if skip >= piece.len() {
                skip -= piece.len();
                continue;
            }
            let Some(dst) = self.host(piece) else {
                break;
            };
            let n = (piece.len() - skip).min(src.len() - written);
            // SAFETY: `dst + skip .. + n` lies within the piece, checked to be mapped,
            // and the frontend gave this memory for the device to write (a
            // device-writable descriptor); `src` is ours and cannot overlap guest memory.
            unsafe { ptr::copy_nonoverlapping(src.as_ptr().add(written), dst.add(skip), n) };
            self.mark_dirty(piece, skip, n);
            written += n;
            skip = 0;
        }
        written
    }

    /// Copy up to `len` bytes of guest memory from `src` (from its byte `skip` on)
    /// into `dst`, marking what was written dirty; returns how many bytes. For the
    /// loop port: guest buffer to guest buffer, with no copy in between.
    pub fn copy(&self, dst: &[Piece], src: &[Piece], skip: usize, len: usize) -> usize {
        let mut copied = 0;
        let mut src_index = 0;
        let mut src_skip = skip;
        for &to in dst {
            let mut filled = 0;
            while filled < to.len() && copied < len {
                let Some(&from) = src.get(src_index) else {
                    return copied;
                };
                if src_skip >= from.len() {
                    src_skip -= from.len();
                    src_index += 1;
                    continue;
                }
                let (Some(from_at), Some(to_at)) = (self.host(from), self.host(to)) else {
                    return copied;
                };
                let n = (from.len() - src_skip)
                    .min(to.len() - filled)
                    .min(len - copied);
                // SAFETY: both ranges lie within their pieces (src_skip + n <= from.len,
                // filled + n <= to.len), checked to be mapped; the destination is a
                // device-writable buffer. A guest may hand the same memory for both:
                // `ptr::copy` allows the overlap.
                unsafe { ptr::copy(from_at.add(src_skip), to_at.add(filled), n) };
                self.mark_dirty(to, filled, n);
                filled += n;
                copied += n;
                src_skip += n;
            }
            if copied == len {
                break;
            }
        }
        copied
    }

    /// Append an iovec for each piece (for writev); stops at `max` iovecs and says
    /// whether all fit. The iovecs are valid while `self` is borrowed.
    pub fn iovecs(&self, pieces: &[Piece], out: &mut Vec<libc::iovec>, max: usize) -> bool {
        for &piece in pieces {
            if out.len() == max {
                return false;
            }
            let Some(base) = self.host(piece) else {
                return false;
            };
            out.push(libc::iovec {
                iov_base: base.cast(),
                iov_len: piece.len(),
            });
        }
        true
    }

    /// Place a ring, each part in one region; done once per memory table and ring
    /// layout. Split (virtio 1.x, 2.7): alignments 16, 2 and 4. Packed (2.8): a
    /// 16-aligned descriptor ring and two 4-byte event suppression areas. Both with
    /// a power-of-two size, so positions wrap with a mask (virtio-queue and DPDK's
    /// vhost require it too).
    pub fn place_ring(&self, layout: &RingLayout) -> Result<RingPlacement, RingPlacementError> {
        if !layout.size.is_power_of_two() {
            return Err(RingPlacementError::BadSize(layout.size));
        }
        let size = u64::from(layout.size);
        let part = |addr, len, align, name| {
            self.contiguous(addr, len, align).map_err(|e| match e {
                ContiguousError::Outside => RingPlacementError::Outside(name),
                ContiguousError::Misaligned => RingPlacementError::Misaligned(name),
            })
        };
        if layout.packed {
            return Ok(RingPlacement {
                desc: part(layout.desc_table, 16 * size, 16, "descriptor ring")?,
                // off_wrap, flags
                avail: part(layout.avail_ring, 4, 4, "driver event suppression area")?,
                used: part(layout.used_ring, 4, 4, "device event suppression area")?,
                size: layout.size,
                packed: true,
            });
        }
        Ok(RingPlacement {
            desc: part(layout.desc_table, 16 * size, 16, "descriptor table")?,
            // flags, idx, ring[size], used_event
            avail: part(layout.avail_ring, 6 + 2 * size, 2, "available ring")?,
            // flags, idx, ring[size] of {id, len}, avail_event
            used: part(layout.used_ring, 6 + 8 * size, 4, "used ring")?,
            size: layout.size,
            packed: false,
        })
    }

    /// The packed ring placed by [`Self::place_ring`] on this memory table.
    pub fn packed_ring(&self, placement: &RingPlacement) -> Option<PackedRingView<'_>> {
        if !placement.packed {
            return None;
        }
        let checked =
            |piece: Piece, len: usize| (piece.len() >= len).then(|| self.host(piece)).flatten();
        Some(PackedRingView {
            mem: self,
            desc: checked(
                placement.desc,
                DESCRIPTOR_SIZE * usize::from(placement.size),
            )?,
            desc_piece: placement.desc,
            driver: checked(placement.avail, EVENT_AREA_SIZE)?,
            device: checked(placement.used, EVENT_AREA_SIZE)?,
            device_piece: placement.used,
            size: placement.size,
            mask: placement.size.wrapping_sub(1),
        })
    }

    /// The split ring placed by [`Self::place_ring`] on this memory table.
    pub fn ring(&self, placement: &RingPlacement) -> Option<RingView<'_>> {
        if placement.packed {
            return None;
        }
        let size = usize::from(placement.size);
        let checked =
            |piece: Piece, len: usize| (piece.len() >= len).then(|| self.host(piece)).flatten();
        Some(RingView {
            mem: self,
            desc: checked(placement.desc, 16 * size)?,
            avail: checked(placement.avail, 6 + 2 * size)?,
            used: checked(placement.used, 6 + 8 * size)?,
            used_piece: placement.used,
            size: placement.size,
            // A power of two (`place_ring`): positions wrap with a mask, not a division.
            mask: placement.size.wrapping_sub(1),
        })
    }

    /// An indirect descriptor table of `len` bytes at `addr`, within one region.
    pub fn indirect_table(
        &self,
        addr: u64,
        len: u32,
    ) -> Result<DescriptorTable<'_>, OutsideMemory> {
        let piece = self
            .contiguous(addr, u64::from(len), 1)
            .map_err(|_| OutsideMemory)?;
        let base = self.host(piece).ok_or(OutsideMemory)?;
        Ok(DescriptorTable {
            _mem: self,
            base,
            count: (len as usize / DESCRIPTOR_SIZE) as u16,
        })
    }

    /// The guest address a piece starts at (tests compare with vm-memory's answers).
    #[cfg(test)]
    pub fn guest_address(&self, piece: Piece) -> u64 {
        self.regions[piece.region as usize].guest_start + piece.offset
    }

    /// The host address a piece starts at (tests compare with vm-memory's answers).
    #[cfg(test)]
    pub fn host_address(&self, piece: Piece) -> *mut u8 {
        self.host(piece).expect("a piece of this table")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ContiguousError {
    Outside,
    Misaligned,
}

/// Why a range could not be translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TranslateError {
    Outside,
    TooManyPieces,
}

/// A cache hint for `at`, which lies in mapped guest memory: read (shared), or
/// with `write` (and a CPU that has PREFETCHW) for ownership, so that the store
/// that follows does not wait for the line to be taken from the driver's cache.
#[inline(always)]
/// Hint the CPU to fetch the cache line at `at`; for writing (PREFETCHW) when
/// `prefetchw`, which only a CPU with the instruction may ask for ([`has_prefetchw`]).
fn prefetch(at: *const u8, prefetchw: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        if prefetchw {
            // SAFETY: a prefetch is only a hint: it never faults and changes no
            // memory, whatever the address; the caller checked the CPU has it.
            unsafe {
                std::arch::asm!("prefetchw [{0}]", in(reg) at, options(nostack, preserves_flags, readonly));
            }
            return;
        }
        // SAFETY: as above; SSE is part of the x86_64 baseline. (`_MM_HINT_ET0`
        // compiles to a read prefetch unless the whole crate targets PRFCHW.)
        unsafe { _mm_prefetch::<_MM_HINT_T0>(at.cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (at, prefetchw);
}

/// CPUID.80000001H:ECX bit 8: the CPU has PREFETCHW (AMD since K6-2, Intel since
/// Broadwell). Rust's feature detection does not name it.
fn has_prefetchw() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid;
        // SAFETY: CPUID exists on every x86_64 CPU; leaf 0x80000001 is read only when
        // the highest extended leaf says it exists. (Safe to call since Rust 1.87; this
        // crate builds with 1.85.)
        #[allow(unused_unsafe)]
        unsafe {
            __cpuid(0x8000_0000).eax >= 0x8000_0001 && __cpuid(0x8000_0001).ecx & (1 << 8) != 0
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Read one descriptor at `at`.
///
/// # Safety
/// `at .. at + 16` must lie in mapped guest memory.
unsafe fn read_descriptor(at: *const u8) -> Descriptor {
    if at as usize % 8 == 0 {
        // Ring descriptors (16-aligned) and nearly every indirect table: two 8-byte
        // loads. A volatile read of a byte array compiles to 16 byte loads, which cost
        // more than the rest of the walk.
        let words = at.cast::<u64>();
        // SAFETY: the 16 bytes are mapped (the caller's promise) and 8-aligned.
        // Volatile, because the guest may write them concurrently: the datapath uses
        // this copy only, so a length is never read twice.
        let (addr, rest) = unsafe {
            (
                u64::from_le(ptr::read_volatile(words)),
                u64::from_le(ptr::read_volatile(words.add(1))),
            )
        };
        return Descriptor {
            addr,
            len: rest as u32,
            flags: (rest >> 32) as u16,
            next: (rest >> 48) as u16,
        };
    }
    // SAFETY: as above; a byte array has alignment 1, so any address will do
    // (an indirect table need not be aligned).
    let raw = unsafe { ptr::read_volatile(at.cast::<[u8; DESCRIPTOR_SIZE]>()) };
    Descriptor::from_le_bytes(raw)
}

/// An indirect descriptor table, checked to lie in one region.
pub struct DescriptorTable<'m> {
    _mem: &'m MappedMemory,
    base: *const u8,
    count: u16,
}

impl DescriptorTable<'_> {
    pub fn len(&self) -> u16 {
        self.count
    }

    pub fn get(&self, index: u16) -> Option<Descriptor> {
        if index >= self.count {
            return None;
        }
        // SAFETY: index < count = table length / 16, and the table lies in one mapped
        // region (checked in `indirect_table`), kept mapped by the borrowed memory.
        Some(unsafe { read_descriptor(self.base.add(usize::from(index) * DESCRIPTOR_SIZE)) })
    }

    /// Entry `index` of a packed ring's indirect table (same 16-byte layout).
    pub fn get_packed(&self, index: u16) -> Option<PackedDescriptor> {
        self.get(index).map(PackedDescriptor::from)
    }
}

/// A split ring in host memory for one pass of the datapath.
pub struct RingView<'m> {
    mem: &'m MappedMemory,
    desc: *const u8,
    avail: *const u8,
    used: *mut u8,
    used_piece: Piece,
    size: u16,
    mask: u16,
}

const RING_HEADER: usize = 4;
const USED_ELEM_SIZE: usize = 8;

impl<'m> RingView<'m> {
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The memory the ring lies in (its buffers are translated there).
    pub fn memory(&self) -> &'m MappedMemory {
        self.mem
    }

    fn atomic_u16(&self, at: *const u8) -> &AtomicU16 {
        // SAFETY: every caller passes a 2-aligned field inside a ring part checked to be
        // mapped and aligned (`place_ring`, `ring`); the reference lives no longer than
        // `self`, which borrows the memory that keeps it mapped. Atomics are the right
        // access for memory another party writes concurrently.
        unsafe { AtomicU16::from_ptr(at.cast_mut().cast()) }
    }

    /// The driver's available index (acquire: the entries before it are visible).
    pub fn avail_idx(&self) -> Wrapping<u16> {
        // SAFETY: `avail + 2` is the idx field, within the available ring.
        let field = self.atomic_u16(unsafe { self.avail.add(2) });
        Wrapping(u16::from_le(field.load(Ordering::Acquire)))
    }

    /// Head of the chain at available position `position`.
    pub fn avail_entry(&self, position: Wrapping<u16>) -> u16 {
        let slot = usize::from(position.0 & self.mask);
        // SAFETY: slot < size, and the ring holds `size` entries after its header.
        let field = self.atomic_u16(unsafe { self.avail.add(RING_HEADER + 2 * slot) });
        u16::from_le(field.load(Ordering::Relaxed))
    }

    /// The driver's flags (VRING_AVAIL_F_NO_INTERRUPT).
    pub fn avail_flags(&self) -> u16 {
        u16::from_le(self.atomic_u16(self.avail).load(Ordering::Relaxed))
    }

    /// `used_event`, after the available entries (EVENT_IDX).
    pub fn used_event(&self) -> Wrapping<u16> {
        let at = RING_HEADER + 2 * usize::from(self.size);
        // SAFETY: the available ring was checked to hold 6 + 2 * size bytes.
        let field = self.atomic_u16(unsafe { self.avail.add(at) });
        Wrapping(u16::from_le(field.load(Ordering::Relaxed)))
    }

    /// Descriptor `index` of the ring's table; `None` past the table.
    pub fn descriptor(&self, index: u16) -> Option<Descriptor> {
        if index >= self.size {
            return None;
        }
        // SAFETY: index < size, and the table was checked to hold 16 * size bytes.
        Some(unsafe { read_descriptor(self.desc.add(usize::from(index) * DESCRIPTOR_SIZE)) })
    }

    /// Prefetch the first buffer of the chain at available position `position`
    /// (made available already: the caller read the index past it). A hint only:
    /// the chain is read again, and checked, when its turn comes.
    pub fn prefetch_chain(&self, position: Wrapping<u16>, write: bool) {
        let head = self.avail_entry(position);
        if let Some(desc) = self.descriptor(head) {
            self.mem.prefetch(desc.addr, desc.len, write);
        }
    }

    /// Prefetch the head descriptor of the chain at available position `position`,
    /// so that [`Self::prefetch_chain`] later finds it in cache.
    pub fn prefetch_descriptor(&self, position: Wrapping<u16>) {
        let head = self.avail_entry(position);
        if head < self.size {
            prefetch(
                self.desc.wrapping_add(usize::from(head) * DESCRIPTOR_SIZE),
                false,
            );
        }
    }

    /// The used index as the guest sees it.
    pub fn used_idx(&self) -> Wrapping<u16> {
        // SAFETY: `used + 2` is the idx field, within the used ring.
        let field = self.atomic_u16(unsafe { self.used.add(2) });
        Wrapping(u16::from_le(field.load(Ordering::Acquire)))
    }

    /// Write one used element at position `position`; invisible until [`Self::publish_used`].
    pub fn write_used(&self, position: Wrapping<u16>, id: u16, len: u32) {
        let slot = usize::from(position.0 & self.mask);
        // SAFETY: slot < size; the used ring holds `size` 8-byte elements after its
        // 4-byte header and is 4-aligned, so both u32 fields are aligned and mapped.
        unsafe {
            let elem = self.used.add(RING_HEADER + USED_ELEM_SIZE * slot);
            ptr::write_volatile(elem.cast::<u32>(), u32::from(id).to_le());
            ptr::write_volatile(elem.add(4).cast::<u32>(), len.to_le());
        }
    }

    /// Make the `count` elements written from position `first` visible with one
    /// release store of the used index, and mark them and the index dirty.
    pub fn publish_used(&self, first: Wrapping<u16>, count: u16) {
        let size = usize::from(self.size);
        let start = usize::from(first.0 & self.mask);
        let count = usize::from(count).min(size);
        let before_wrap = count.min(size - start);
        let elems = RING_HEADER + USED_ELEM_SIZE * start;
        self.mem
            .mark_dirty(self.used_piece, elems, USED_ELEM_SIZE * before_wrap);
        if count > before_wrap {
            self.mem.mark_dirty(
                self.used_piece,
                RING_HEADER,
                USED_ELEM_SIZE * (count - before_wrap),
            );
        }
        let new_idx = first + Wrapping(count as u16);
        // SAFETY: `used + 2` is the idx field, within the used ring.
        let field = self.atomic_u16(unsafe { self.used.add(2) });
        field.store(new_idx.0.to_le(), Ordering::Release);
        self.mem.mark_dirty(self.used_piece, 2, 2);
    }

    /// Ask the driver for no kicks (without EVENT_IDX: VRING_USED_F_NO_NOTIFY; with it,
    /// not moving `avail_event` is enough).
    pub fn suppress_kicks(&self, event_idx: bool) {
        if !event_idx {
            self.store_used_flags(
                virtio_bindings::bindings::virtio_ring::VRING_USED_F_NO_NOTIFY as u16,
            );
        }
    }

    /// Ask for a kick once the driver makes `next_avail` available; says whether it
    /// already has (then the caller goes on instead of waiting).
    pub fn allow_kicks(&self, event_idx: bool, next_avail: Wrapping<u16>) -> bool {
        if event_idx {
            let at = RING_HEADER + USED_ELEM_SIZE * usize::from(self.size);
            // SAFETY: the used ring was checked to hold 6 + 8 * size bytes; avail_event
            // is its last field, 2-aligned.
            let field = self.atomic_u16(unsafe { self.used.add(at) });
            field.store(next_avail.0.to_le(), Ordering::Relaxed);
            self.mem.mark_dirty(self.used_piece, at, 2);
        } else {
            self.store_used_flags(0);
        }
        // The driver must see the store before we look at its index again.
        fence(Ordering::SeqCst);
        self.avail_idx() != next_avail
    }

    fn store_used_flags(&self, flags: u16) {
        self.atomic_u16(self.used)
            .store(flags.to_le(), Ordering::Relaxed);
        self.mem.mark_dirty(self.used_piece, 0, 2);
    }
}

/// Bytes of an event suppression structure: `off_wrap`, then `flags`.
const EVENT_AREA_SIZE: usize = 4;
/// Offset of a packed descriptor's flags, written last by whoever hands it over.
const PACKED_FLAGS_OFFSET: usize = 14;

/// A packed ring in host memory for one pass of the datapath.
///
/// Positions are taken modulo the ring size (a power of two), so every access lies
/// in the descriptor ring whatever position the caller passes.
pub struct PackedRingView<'m> {
    mem: &'m MappedMemory,
    desc: *mut u8,
    desc_piece: Piece,
    driver: *const u8,
    device: *mut u8,
    device_piece: Piece,
    size: u16,
    mask: u16,
}

impl<'m> PackedRingView<'m> {
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The memory the ring lies in (its buffers are translated there).
    pub fn memory(&self) -> &'m MappedMemory {
        self.mem
    }

    fn slot(&self, position: u16) -> usize {
        usize::from(position & self.mask) * DESCRIPTOR_SIZE
    }

    fn atomic_u16(&self, at: *const u8) -> &AtomicU16 {
        // SAFETY: every caller passes a 2-aligned field inside a part checked to be
        // mapped and aligned (`place_ring`, `packed_ring`): a descriptor's flags in the
        // 16-aligned ring, or a field of a 4-aligned event area. The reference lives no
        // longer than `self`, which borrows the memory that keeps it mapped.
        unsafe { AtomicU16::from_ptr(at.cast_mut().cast()) }
    }

    fn flags_field(&self, position: u16) -> &AtomicU16 {
        // SAFETY: `slot` < 16 * size, the length of the checked descriptor ring.
        self.atomic_u16(unsafe { self.desc.add(self.slot(position) + PACKED_FLAGS_OFFSET) })
    }

    /// The descriptor at `position` is available in the driver's round `wrap`
    /// (acquire: its other fields, written before its flags, are visible).
    pub fn is_available(&self, position: u16, wrap: bool) -> bool {
        let flags = u16::from_le(self.flags_field(position).load(Ordering::Acquire));
        let avail = flags & PACKED_AVAIL != 0;
        let used = flags & PACKED_USED != 0;
        avail == wrap && used != wrap
    }

    /// The descriptor at `position`, read once.
    pub fn descriptor(&self, position: u16) -> PackedDescriptor {
        // SAFETY: `slot` < 16 * size, the length of the checked descriptor ring.
        unsafe { read_descriptor(self.desc.add(self.slot(position))) }.into()
    }

    /// Write the id and length of a used descriptor at `position`; the driver
    /// ignores them until [`Self::hand_back`] sets its flags.
    pub fn write_used(&self, position: u16, id: u16, len: u32) {
        // SAFETY: `slot` < 16 * size, the length of the checked, 16-aligned ring, so
        // the u32 length at +8 and the u16 id at +12 are aligned and mapped.
        unsafe {
            let desc = self.desc.add(self.slot(position));
            ptr::write_volatile(desc.add(8).cast::<u32>(), len.to_le());
            ptr::write_volatile(desc.add(12).cast::<u16>(), id.to_le());
        }
    }

    /// Hand the descriptor at `position` back to the driver as used in round `wrap`
    /// (`written`: the device wrote into its buffers). `release`: everything written
    /// before is visible to a driver that sees these flags.
    pub fn hand_back(&self, position: u16, wrap: bool, written: bool, release: bool) {
        let mut flags = if wrap { PACKED_AVAIL | PACKED_USED } else { 0 };
        if written {
            flags |= virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
        }
        let order = if release {
            Ordering::Release
        } else {
            Ordering::Relaxed
        };
        self.flags_field(position).store(flags.to_le(), order);
    }

    /// Mark the descriptors from `first` to `last` (positions, wrapping) dirty.
    pub fn mark_used_dirty(&self, first: u16, last: u16) {
        let (first, last) = (self.slot(first), self.slot(last));
        if first <= last {
            self.mem
                .mark_dirty(self.desc_piece, first, last - first + DESCRIPTOR_SIZE);
        } else {
            let ring = DESCRIPTOR_SIZE * usize::from(self.size);
            self.mem.mark_dirty(self.desc_piece, first, ring - first);
            self.mem
                .mark_dirty(self.desc_piece, 0, last + DESCRIPTOR_SIZE);
        }
    }

    /// The driver's event suppression: `(off_wrap, flags)`.
    pub fn driver_event(&self) -> (u16, u16) {
        let off_wrap = self.atomic_u16(self.driver).load(Ordering::Relaxed);
        // SAFETY: the driver area was checked to hold 4 bytes; flags is at +2.
        let flags = self
            .atomic_u16(unsafe { self.driver.add(2) })
            .load(Ordering::Relaxed);
        (u16::from_le(off_wrap), u16::from_le(flags))
    }

    /// Set the device's event suppression flags (ENABLE or DISABLE kicks).
    pub fn set_device_event_flags(&self, flags: u16) {
        // SAFETY: the device area was checked to hold 4 bytes; flags is at +2.
        let field = self.atomic_u16(unsafe { self.device.add(2) });
        field.store(flags.to_le(), Ordering::Relaxed);
        self.mem.mark_dirty(self.device_piece, 2, 2);
    }

    /// Prefetch the line holding the descriptor at `position`, available or not (a
    /// hint that reads nothing), so that [`Self::prefetch_chain`] later finds it in cache.
    pub fn prefetch_descriptor(&self, position: u16) {
        // SAFETY: `slot` < 16 * size, inside the checked descriptor ring.
        prefetch(unsafe { self.desc.add(self.slot(position)) }, false);
    }

    /// Prefetch the descriptor at `position`, and its buffer if the driver already
    /// made it available. A hint only: the chain is read again, and checked, when
    /// its turn comes.
    pub fn prefetch_chain(&self, position: u16, wrap: bool, write: bool) {
        if self.is_available(position, wrap) {
            let desc = self.descriptor(position);
            self.mem.prefetch(desc.addr, desc.len, write);
        }
    }
}

const PACKED_AVAIL: u16 = 1 << virtio_bindings::bindings::virtio_ring::VRING_PACKED_DESC_F_AVAIL;
const PACKED_USED: u16 = 1 << virtio_bindings::bindings::virtio_ring::VRING_PACKED_DESC_F_USED;
