//! What the vhost-user integration tests share: memory both sides map, and sockets.

use std::fs::File;
use std::os::unix::io::FromRawFd;
use std::path::PathBuf;

/// A memfd of `size` bytes: guest memory or a dirty log, mapped by both sides.
pub fn memfd(name: &str, size: usize) -> File {
    let name = std::ffi::CString::new(name).unwrap();
    // SAFETY: plain memfd_create(2); the descriptor is owned right below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64).unwrap();
    file
}

/// A socket path in a directory of this test process's own.
pub fn socket_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("standby-net-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("s.sock")
}
