//! A TAP queue: a thin owner of one `/dev/net/tun` descriptor and its ioctls.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::virtio_net::VNET_HDR_LEN_V1;

const TUN_PATH: &str = "/dev/net/tun";

/// One queue of a TAP device, opened with IFF_VNET_HDR: every frame read or
/// written carries a virtio-net header first.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

fn ifreq_for(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(ifr)
}

/// A socket for interface ioctls (SIOCSIFFLAGS, SIOCSIFMTU).
fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned right below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(raw)?;
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Tap {
    /// Open (or create) the TAP device `name`. With `multi_queue`, each call attaches
    /// one more queue to the same device.
    pub fn open(name: &str, multi_queue: bool) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)?;
        let mut ifr = ifreq_for(name)?;
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which lives for the call.
        check(unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) })?;
        // SAFETY: the kernel wrote a NUL-terminated name into ifr_name.
        let name = unsafe { CStr::from_ptr(ifr.ifr_name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        Ok(Self { file, name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Length of the virtio-net header the kernel reads and writes in front of frames.
    pub fn set_vnet_hdr_len(&self, len: usize) -> io::Result<()> {
        let len = len as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int, which lives for the call.
        check(unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &len) })
    }

    /// Offloads (TUN_F_*) the reader of this TAP accepts: partial checksums, GSO.
    pub fn set_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        check(unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                flags as libc::c_ulong,
            )
        })
    }

    /// Set the interface's MTU: the largest frame the host stack sends through it
    /// (toward the guest) without fragmenting.
    pub fn set_mtu(&self, mtu: u16) -> io::Result<()> {
        let sock = control_socket()?;
        let mut ifr = ifreq_for(&self.name)?;
        ifr.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
        // SAFETY: SIOCSIFMTU reads one ifreq, which lives for the call.
        check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFMTU, &ifr) })
    }

    /// Set the link up (IFF_UP), as a NIC cable plugged in.
    pub fn set_up(&self) -> io::Result<()> {
        let sock = control_socket()?;
        let mut ifr = ifreq_for(&self.name)?;
        // SAFETY: SIOCGIFFLAGS fills one ifreq, which lives for the call.
        check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) })?;
        // SAFETY: SIOCGIFFLAGS set the flags member of the union.
        let flags = unsafe { ifr.ifr_ifru.ifru_flags };
        ifr.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        // SAFETY: SIOCSIFFLAGS reads one ifreq, which lives for the call.
        check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) })
    }

    /// Write one frame, header first, gathered from `iov`.
    pub fn writev(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller guarantees each iovec points to readable memory of its
        // length for the duration of the call; the kernel only reads from them.
        let ret = unsafe {
            libc::writev(
                self.file.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as libc::c_int,
            )
        };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret as usize)
        }
    }

    /// Read one frame, header first. `WouldBlock` when there is none.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of its length for the duration of the call.
        let ret = unsafe {
            libc::read(
                self.file.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
            )
        };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret as usize)
        }
    }

    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        })
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Writes frames onto the host side of a TAP from outside the datapath: the
/// announcements that steer the host's switches to the standby path. The kernel
/// takes each write as one frame, so this never interleaves with the datapath.
#[derive(Debug)]
pub struct HostWriter {
    tap: Tap,
    /// The header length the TAP currently expects (set by the guest's features).
    vnet_hdr_len: Arc<AtomicUsize>,
}

impl HostWriter {
    pub fn new(tap: Tap, vnet_hdr_len: Arc<AtomicUsize>) -> Self {
        Self { tap, vnet_hdr_len }
    }

    /// Send one Ethernet frame, as if the guest had sent it.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        let header = [0u8; VNET_HDR_LEN_V1];
        let hdr_len = self.vnet_hdr_len.load(Ordering::Acquire);
        let iov = [
            libc::iovec {
                iov_base: header.as_ptr() as *mut libc::c_void,
                iov_len: hdr_len,
            },
            libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len(),
            },
        ];
        self.tap.writev(&iov).map(|_| ())
    }

    pub fn interface(&self) -> &str {
        self.tap.name()
    }
}
