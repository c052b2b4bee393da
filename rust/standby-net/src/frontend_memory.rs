//! Files the frontend hands over to be mapped (guest memory, the dirty log): checked
//! against their size when mapped, and kept from shrinking afterwards.
//!
//! A mapping past the end of its file maps fine, but the first access there kills
//! the process with SIGBUS; so does a file that shrinks under a mapping. The threat
//! model: the guest is untrusted (it controls ring contents, never what is mapped),
//! the frontend is semi-trusted (it chooses the files; it may be buggy, and a
//! backend must not die for it). So every file is checked to cover what will be
//! mapped, and a memfd that takes seals is sealed against shrinking (QEMU's
//! `memory-backend-memfd` comes sealed already; the seal is added when a frontend
//! left it off). A file that cannot be sealed (a memfd created without
//! `MFD_ALLOW_SEALING`, as DPDK's, hugetlbfs, a plain tmpfs file) is accepted after
//! the size check: what a later shrink would do is caught by [`crate::fault_guard`].

use std::io;
use std::os::unix::io::{AsRawFd, BorrowedFd};

/// A file the frontend wants mapped could not be accepted.
#[derive(Debug, thiserror::Error)]
pub enum MapCheckError {
    #[error("{what}: cannot inspect the file")]
    Inspect {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{what}: {need:#x} bytes at offset {offset:#x} run past the end of the file ({len:#x} bytes)")]
    PastEnd {
        what: String,
        offset: u64,
        need: u64,
        len: u64,
    },
}

/// Check that `fd` holds `len` bytes from `offset`, and seal it against shrinking
/// where the file allows it. `what` names it in errors (`"dirty log"`, a region).
pub fn check_mappable(
    fd: BorrowedFd<'_>,
    offset: u64,
    len: u64,
    what: &str,
) -> Result<(), MapCheckError> {
    let inspect = |source| MapCheckError::Inspect {
        what: what.to_string(),
        source,
    };
    // SAFETY: fstat fills the zeroed struct for a descriptor we borrow for the call.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `stat` lives for the call.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut stat) } < 0 {
        return Err(inspect(io::Error::last_os_error()));
    }
    let file_len = stat.st_size as u64;
    if offset.checked_add(len).is_none_or(|end| end > file_len) {
        return Err(MapCheckError::PastEnd {
            what: what.to_string(),
            offset,
            need: len,
            len: file_len,
        });
    }
    seal_against_shrinking(fd, what)
}

fn seal_against_shrinking(fd: BorrowedFd<'_>, what: &str) -> Result<(), MapCheckError> {
    // SAFETY: F_GET_SEALS takes no argument and only reads the descriptor's file.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        // Not a memfd: the file cannot be sealed (see the module documentation).
        return Ok(());
    }
    if seals & (libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL) != 0 {
        // Sealed already, or it takes no more seals.
        return Ok(());
    }
    // SAFETY: F_ADD_SEALS takes an int of seal bits; it only changes the file's seals.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) } < 0 {
        return Err(MapCheckError::Inspect {
            what: what.to_string(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::fs::File;
    use std::os::unix::io::{AsFd, FromRawFd};

    fn memfd(len: u64, flags: libc::c_uint) -> File {
        let name = CString::new("fb-test").unwrap();
        // SAFETY: memfd_create with a valid name; the descriptor is owned right below.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len).unwrap();
        file
    }

    fn seals(file: &File) -> i32 {
        // SAFETY: F_GET_SEALS only reads.
        unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) }
    }

    #[test]
    fn a_file_too_short_for_the_mapping_is_refused() {
        let file = memfd(4096, libc::MFD_ALLOW_SEALING);
        let err = check_mappable(file.as_fd(), 0, 8192, "dirty log").unwrap_err();
        assert_eq!(
            err.to_string(),
            "dirty log: 0x2000 bytes at offset 0x0 run past the end of the file (0x1000 bytes)"
        );
        assert!(check_mappable(file.as_fd(), 4096, 1, "region").is_err());
        assert!(check_mappable(file.as_fd(), u64::MAX, 2, "region").is_err());
    }

    #[test]
    fn a_memfd_is_sealed_against_shrinking_and_then_cannot_shrink() {
        let file = memfd(8192, libc::MFD_ALLOW_SEALING);
        check_mappable(file.as_fd(), 0, 8192, "region").unwrap();
        assert_ne!(seals(&file) & libc::F_SEAL_SHRINK, 0);
        assert!(
            file.set_len(4096).is_err(),
            "the frontend can no longer shrink it"
        );
        assert!(file.set_len(16384).is_ok(), "growing is still fine");
    }

    #[test]
    fn a_memfd_that_takes_no_seals_is_accepted_as_it_is() {
        // Created without MFD_ALLOW_SEALING, as DPDK does: F_SEAL_SEAL from the start.
        let file = memfd(4096, 0);
        check_mappable(file.as_fd(), 0, 4096, "region").unwrap();
        assert_eq!(seals(&file) & libc::F_SEAL_SHRINK, 0);
    }
}
