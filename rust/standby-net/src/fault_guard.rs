//! Guest memory whose file shrinks under its mapping must not kill the process.
//!
//! Touching a mapped page past the end of its file raises SIGBUS. Files that take
//! seals are sealed against shrinking when mapped ([`crate::frontend_memory`]); for
//! the others (a memfd created without `MFD_ALLOW_SEALING`, hugetlbfs) a SIGBUS
//! handler looks the faulting address up among the guest memory mappings registered
//! here. When it is one of them, the handler maps an anonymous page over the
//! faulting one (the access then completes: reads see zeros, writes go nowhere),
//! flags the mapping, and returns; the device sees the flag after its pass over the
//! queues and closes the connection ([`GuardedRange::faulted`]). A SIGBUS anywhere
//! else goes to the handler that was there before (an embedding program's, a
//! fuzzer's), or gets the default action: the process dies, as it should.
//!
//! The handler only reads atomics and calls `mmap(2)`, which is a plain system call
//! on Linux; it takes no lock and allocates nothing.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};

/// Mappings guarded at once (regions of all connections of this process).
const SLOTS: usize = 256;

struct Slot {
    start: AtomicUsize,
    /// 0 when the slot is free.
    len: AtomicUsize,
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};

static SLOTS_TABLE: [Slot; SLOTS] = [FREE; SLOTS];
static INSTALL: Once = Once::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);
/// The disposition of SIGBUS before ours, written once before ours is installed.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

extern "C" fn on_sigbus(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler.
    let address = unsafe { (*info).si_addr() } as usize;
    for slot in &SLOTS_TABLE {
        let len = slot.len.load(Ordering::Acquire);
        let start = slot.start.load(Ordering::Acquire);
        if len != 0 && address >= start && address - start < len {
            let page = page_size();
            let page_start = address & !(page - 1);
            // SAFETY: the page lies inside a guest memory mapping this process made and
            // still holds (registered until unmapped): replacing it with anonymous
            // memory changes no memory anything else owns.
            let remapped = unsafe {
                libc::mmap(
                    page_start as *mut libc::c_void,
                    page,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if remapped != libc::MAP_FAILED {
                slot.faulted.store(true, Ordering::Release);
                return;
            }
        }
    }
    // Not guest memory: whoever handled SIGBUS before us, else the default action
    // when the faulting access runs again.
    if let Some(previous) = PREVIOUS.get().filter(|p| p.sa_sigaction > libc::SIG_IGN) {
        let handler = previous.sa_sigaction;
        if previous.sa_flags & libc::SA_SIGINFO != 0 {
            // SAFETY: the handler was installed for SIGBUS with SA_SIGINFO, so it takes
            // these three arguments; we pass on what the kernel gave us.
            let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                unsafe { std::mem::transmute(handler) };
            handler(signal, info, context);
        } else {
            // SAFETY: a plain handler installed for SIGBUS takes the signal number.
            let handler: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
            handler(signal);
        }
        return;
    }
    // SAFETY: restoring the default disposition of SIGBUS from its own handler.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

fn page_size() -> usize {
    // SAFETY: sysconf only reads a constant of the system.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// Install the handler (once per process).
fn install() -> io::Result<()> {
    let mut result = Ok(());
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid value to fill in.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        // SAFETY: a zeroed sigaction is a valid value for the kernel to fill in.
        let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: reads the current disposition into `previous`, which lives for the call.
        if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut previous) } == 0 {
            let _ = PREVIOUS.set(previous);
        }
        // SAFETY: `action` is a valid sigaction whose handler has the SA_SIGINFO shape.
        if unsafe { libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) } < 0 {
            result = Err(io::Error::last_os_error());
        } else {
            INSTALLED.store(true, Ordering::Release);
        }
    });
    if result.is_ok() && !INSTALLED.load(Ordering::Acquire) {
        return Err(io::Error::other(
            "the SIGBUS handler could not be installed",
        ));
    }
    result
}

/// A guest memory mapping under the handler's watch, until dropped.
#[derive(Debug)]
pub struct GuardedRange {
    slot: usize,
}

impl GuardedRange {
    /// Watch `len` bytes at `start`, a mapping of a file the frontend handed over.
    pub fn new(start: *const u8, len: usize) -> io::Result<Self> {
        install()?;
        for (index, slot) in SLOTS_TABLE.iter().enumerate() {
            // Claim a free slot: the length goes last, so the handler never sees a
            // half-written slot as taken.
            if slot
                .start
                .compare_exchange(0, start as usize, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                slot.faulted.store(false, Ordering::Release);
                slot.len.store(len, Ordering::Release);
                return Ok(Self { slot: index });
            }
        }
        Err(io::Error::other(format!(
            "more than {SLOTS} guest memory mappings to guard"
        )))
    }

    /// An access touched a page past the end of the file: the frontend shrank it.
    pub fn faulted(&self) -> bool {
        SLOTS_TABLE[self.slot].faulted.load(Ordering::Acquire)
    }
}

impl Drop for GuardedRange {
    fn drop(&mut self) {
        let slot = &SLOTS_TABLE[self.slot];
        slot.len.store(0, Ordering::Release);
        slot.faulted.store(false, Ordering::Release);
        slot.start.store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::fs::File;
    use std::os::unix::io::{AsRawFd, FromRawFd};

    #[test]
    fn a_mapping_whose_file_shrank_reads_zeros_and_is_flagged() {
        let name = CString::new("fb-guard").unwrap();
        // SAFETY: memfd_create with a valid name; owned right below.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor.
        let file = unsafe { File::from_raw_fd(fd) };
        let page = page_size();
        file.set_len(2 * page as u64).unwrap();
        // SAFETY: a new shared mapping of the file, unmapped at the end of the test.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED);
        let bytes = map as *mut u8;
        // SAFETY: inside the mapping, backed by the file.
        unsafe { bytes.add(page).write_volatile(7) };
        let guard = GuardedRange::new(bytes, 2 * page).unwrap();
        file.set_len(page as u64).unwrap(); // the frontend shrinks it
                                            // SAFETY: inside the mapping; the handler turns the SIGBUS into a zero page.
        let read = unsafe { bytes.add(page).read_volatile() };
        assert_eq!(read, 0);
        assert!(guard.faulted());
        // SAFETY: still backed by the file.
        assert_eq!(unsafe { bytes.read_volatile() }, 0);
        drop(guard);
        // SAFETY: unmapping what this test mapped.
        unsafe { libc::munmap(map, 2 * page) };
    }
}
