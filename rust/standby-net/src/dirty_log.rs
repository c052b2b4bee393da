//! Dirty-page logging for live migration (VHOST_F_LOG_ALL + LOG_SHMFD).
//!
//! `vhost-user-backend` maps the log QEMU hands over with SET_LOG_BASE into the
//! bitmap of every guest memory region, and vm-memory marks a page each time the
//! backend writes guest memory through its accessors. Two gaps are closed here:
//!
//! * the crate keeps marking after the frontend clears VHOST_F_LOG_ALL (the end of a
//!   migration, or a cancelled one). [`DirtyLog`] carries a switch that the device
//!   flips from the acked features, so marking stops when logging is turned off;
//! * writes made through raw pointers are not marked by vm-memory. The datapath
//!   writes guest memory through the host pointers of `guest_ring`, which marks
//!   each write in its region's log itself: payload, vnet header, used elements,
//!   used index and notification fields. The tests in `tests/dirty_log.rs` check
//!   each of them over a real vhost-user connection.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vhost_user_backend::bitmap::{AtomicBitmapMmap, BitmapMmapRegion, BitmapReplace};
use vm_memory::bitmap::{Bitmap, RefSlice, WithBitmapSlice};
use vm_memory::mmap::NewBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Bitmap of one guest memory region: the frontend's log, gated by LOG_ALL.
#[derive(Clone, Debug, Default)]
pub struct DirtyLog {
    log: BitmapMmapRegion,
    logging: Arc<AtomicBool>,
}

impl DirtyLog {
    /// Start or stop marking pages. Slices taken from this bitmap follow the switch.
    pub fn set_logging(&self, on: bool) {
        self.logging.store(on, Ordering::Release);
    }

    pub fn is_logging(&self) -> bool {
        self.logging.load(Ordering::Acquire)
    }
}

impl Bitmap for DirtyLog {
    fn mark_dirty(&self, offset: usize, len: usize) {
        // One load on the fast path when no migration is running; the crate's
        // bitmap would take a read lock for every write.
        if self.logging.load(Ordering::Acquire) {
            self.log.mark_dirty(offset, len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.log.dirty_at(offset)
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, Self> {
        // Every guest memory access makes a slice: borrowing costs nothing, where the
        // crate's own bitmap clones an `Arc` each time.
        RefSlice::new(self, offset)
    }
}

impl<'a> WithBitmapSlice<'a> for DirtyLog {
    type S = RefSlice<'a, Self>;
}

impl NewBitmap for DirtyLog {
    fn with_len(_len: usize) -> Self {
        Self::default()
    }
}

impl BitmapReplace for DirtyLog {
    type InnerBitmap = AtomicBitmapMmap;

    fn replace(&self, bitmap: AtomicBitmapMmap) {
        self.log.replace(bitmap);
    }
}

/// The log of one region (not a slice of it: slices borrow, the switch lives here).
pub fn region_log(region: &GuestRegionMmap<DirtyLog>) -> &DirtyLog {
    MmapRegion::bitmap(region)
}

/// Apply the LOG_ALL state to every region of `mem`.
pub fn set_logging(mem: &GuestMemoryMmap<DirtyLog>, on: bool) {
    for region in mem.iter() {
        region_log(region).set_logging(on);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn clones_share_the_switch() {
        let log = DirtyLog::default();
        let clone = log.clone();
        assert!(!clone.is_logging());
        log.set_logging(true);
        assert!(clone.is_logging());
        log.set_logging(false);
        assert!(!clone.is_logging());
    }

    #[test]
    fn logging_follows_every_region() {
        let mem = GuestMemoryMmap::<DirtyLog>::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x100000), 0x10000),
        ])
        .unwrap();
        set_logging(&mem, true);
        assert!(mem.iter().all(|r| region_log(r).is_logging()));
        set_logging(&mem, false);
        assert!(mem.iter().all(|r| !region_log(r).is_logging()));
        // Without a log base, writes are accepted and nothing is marked.
        set_logging(&mem, true);
        mem.write_slice(&[1, 2, 3], GuestAddress(0x100)).unwrap();
        assert!(!region_log(mem.iter().next().unwrap()).dirty_at(0x100));
    }
}
