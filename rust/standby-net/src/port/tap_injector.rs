//! Frames put in a TAP's receive queue, as if they came from the host's switch.
//!
//! An `AF_PACKET` socket that sends on the TAP interface makes the kernel transmit
//! the frame *on* the TAP, which hands it to the TAP's reader: the datapath, which
//! delivers it to the guest like any other frame. That is how steering's probes
//! reach the guest through the standby without a path into the datapath's threads.

use std::ffi::CString;
use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};

#[derive(Debug)]
pub struct TapInjector {
    socket: OwnedFd,
    ifindex: libc::c_int,
    interface: String,
}

impl TapInjector {
    /// A sender on TAP `interface` (needs CAP_NET_RAW, which opening a TAP implies).
    pub fn open(interface: &str) -> io::Result<Self> {
        let name = CString::new(interface).map_err(io::Error::other)?;
        // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        // Protocol 0: the socket sends only; it never queues received frames.
        // SAFETY: plain socket(2); the descriptor is owned right below.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Self {
            socket,
            ifindex: ifindex as libc::c_int,
            interface: interface.to_string(),
        })
    }

    /// Queue one Ethernet frame for the guest.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = libc::AF_PACKET as libc::c_ushort;
        address.sll_ifindex = self.ifindex;
        address.sll_halen = 6;
        address.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: `frame` is readable for its length and `address` is a valid
        // sockaddr_ll of the size given, both for the duration of the call.
        let ret = unsafe {
            libc::sendto(
                self.socket.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
                &address as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    pub fn interface(&self) -> &str {
        &self.interface
    }
}
