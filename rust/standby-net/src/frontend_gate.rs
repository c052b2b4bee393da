//! A gate between the frontend's socket and `vhost-user-backend`'s request handler.
//!
//! QEMU's virtio-net sends SET_VRING_ENABLE as soon as the guest driver acks its
//! features (`peer_attach`), before SET_FEATURES reaches the backend. `vhost` refuses
//! SET_VRING_ENABLE until VHOST_USER_F_PROTOCOL_FEATURES has been *acked* by
//! SET_FEATURES and closes the connection, where QEMU, DPDK and libvhost-user treat
//! the feature as negotiated once the backend offered it. The crate gives no hook
//! before its check, so the fix lives at the only layer in between: the socket.
//!
//! The gate forwards every message unchanged (payload and file descriptors), parsed
//! only as far as `vhost`'s own header type tells where a message ends. It holds back
//! a SET_VRING_ENABLE that arrives before SET_FEATURES, acks it itself when the
//! frontend asked for an ack, and replays the last state of each ring to the handler
//! right after SET_FEATURES. Replies travel back whole, one message at a time.
//!
//! A message the gate cannot frame (truncated, oversized) is forwarded as far as it
//! got and the gate closes: the handler then refuses it and the connection ends, as
//! it would without the gate.
//!
//! The gate also keeps a peer from holding the device: its first message must come
//! within the handshake deadline, and every message it starts must be complete
//! within the message deadline, else the connection is closed with the reason
//! ([`FrontendGate::close_reason`]). Between messages a frontend may stay silent
//! for as long as it likes: a healthy QEMU is idle for hours.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::io::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use vhost::vhost_user::message::{
    FrontendReq, VhostUserHeaderFlag, VhostUserLog, VhostUserMemory, VhostUserMemoryRegion,
    VhostUserProtocolFeatures, VhostUserSingleMemoryRegion, VhostUserU64, VhostUserVringState,
    MAX_ATTACHED_FD_ENTRIES,
};
use vm_memory::ByteValued;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::frontend_memory::check_mappable;

/// The message header as the vhost-user spec lays it out: request, flags, body size,
/// in native byte order. (`vhost` keeps its own header type to itself.)
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Header {
    request: u32,
    flags: u32,
    size: u32,
}

// SAFETY: three u32 fields, no padding; every bit pattern is a valid value.
unsafe impl ByteValued for Header {}

/// Protocol version 1, the only one there is.
const VERSION: u32 = 0x1;

impl Header {
    fn new(request: FrontendReq, flags: VhostUserHeaderFlag, size: usize) -> Self {
        Self {
            request: request.into(),
            flags: VERSION | flags.bits(),
            size: size as u32,
        }
    }

    fn code(&self) -> Option<FrontendReq> {
        FrontendReq::try_from(self.request).ok()
    }

    fn need_reply(&self) -> bool {
        self.flags & VhostUserHeaderFlag::NEED_REPLY.bits() != 0
    }
}

const HEADER_LEN: usize = std::mem::size_of::<Header>();
/// Larger bodies are not framed (the handler refuses anything above 4 KiB anyway;
/// this leaves room for a full memory table).
const MAX_BODY_LEN: usize = 64 * 1024;
/// Rings a frontend may enable before SET_FEATURES (more than any device has).
const MAX_EARLY_ENABLES: usize = 64;

/// What the device can take, for the requests the gate checks itself (the crate
/// acks some it then ignores or truncates).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub num_queues: u32,
    pub max_queue_size: u32,
    /// What GET_MAX_MEM_SLOTS answers.
    pub max_mem_slots: u64,
}

/// How long a peer may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadlines {
    /// From connecting to its first message.
    pub handshake: Duration,
    /// From the first byte of a message to its last.
    pub message: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(5),
            message: Duration::from_secs(5),
        }
    }
}

/// Why the gate closed a connection itself.
type CloseReason = Arc<Mutex<Option<String>>>;

/// Both directions of one connection.
pub struct FrontendGate {
    requests: Option<JoinHandle<()>>,
    replies: Option<JoinHandle<()>>,
    frontend: UnixStream,
    handler: UnixStream,
    close_reason: CloseReason,
}

impl FrontendGate {
    /// Start forwarding between `frontend` (QEMU, DPDK) and `handler` (the socket
    /// `vhost-user-backend` accepted).
    pub fn start(
        frontend: UnixStream,
        handler: UnixStream,
        deadlines: Deadlines,
        limits: Limits,
    ) -> io::Result<Self> {
        let frontend_writer = Arc::new(Mutex::new(frontend.try_clone()?));
        let close_reason = CloseReason::default();
        let requests = Requests {
            frontend: frontend.try_clone()?,
            handler: handler.try_clone()?,
            replies_to: Arc::clone(&frontend_writer),
            deadlines,
            limits,
            close_reason: Arc::clone(&close_reason),
            features_acked: false,
            reply_ack: false,
            mem_slots: false,
            regions: 0,
            early_enables: BTreeMap::new(),
        };
        let handler_for_shutdown = handler.try_clone()?;
        let replies = Replies {
            handler,
            frontend: frontend_writer,
        };
        let requests = thread::Builder::new()
            .name("vhost-user-gate-req".into())
            .spawn(move || requests.run())?;
        let replies = thread::Builder::new()
            .name("vhost-user-gate-rep".into())
            .spawn(move || replies.run())?;
        Ok(Self {
            requests: Some(requests),
            replies: Some(replies),
            frontend,
            handler: handler_for_shutdown,
            close_reason,
        })
    }

    /// Why the gate closed the connection itself (a deadline missed, a table full),
    /// if it did.
    pub fn close_reason(&self) -> Option<String> {
        self.close_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// End a connection the handler has closed: its last reply (a NACK, say) still
    /// reaches the frontend before the frontend's side closes. Returns why the gate
    /// closed it, if it did.
    pub fn finish(mut self) -> Option<String> {
        if let Some(replies) = self.replies.take() {
            let _ = replies.join();
        }
        let _ = self.frontend.shutdown(Shutdown::Both);
        if let Some(requests) = self.requests.take() {
            let _ = requests.join();
        }
        self.close_reason()
    }
}

impl Drop for FrontendGate {
    /// Close both sides; both threads end.
    fn drop(&mut self) {
        let _ = self.frontend.shutdown(Shutdown::Both);
        let _ = self.handler.shutdown(Shutdown::Both);
        for thread in [self.replies.take(), self.requests.take()]
            .into_iter()
            .flatten()
        {
            let _ = thread.join();
        }
    }
}

/// One framed message: header bytes, body bytes and the descriptors that came with it.
struct Message {
    header: [u8; HEADER_LEN],
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn header(&self) -> Header {
        *Header::from_slice(&self.header).expect("header buffer has the header's size")
    }

    fn send(&self, to: &UnixStream) -> io::Result<()> {
        let fds: Vec<RawFd> = self.fds.iter().map(AsRawFd::as_raw_fd).collect();
        let bufs: [&[u8]; 2] = [&self.header, &self.body];
        let sent = to.send_with_fds(&bufs, &fds).map_err(io::Error::from)?;
        let total = HEADER_LEN + self.body.len();
        if sent < total {
            // The descriptors went with the first bytes; the rest is plain data.
            let rest: Vec<u8> = self
                .header
                .iter()
                .chain(&self.body)
                .copied()
                .skip(sent)
                .collect();
            (&*to).write_all(&rest)?;
        }
        Ok(())
    }
}

/// How reading a message ended.
enum Read_ {
    Message(Message),
    /// The peer closed between messages.
    Closed,
    /// A message that cannot be framed: what arrived of it, to pass on before closing.
    Unframed(Vec<u8>, Vec<OwnedFd>),
}

/// A message from `from`: the first bytes within `first` (`None`: wait as long as it
/// takes), the rest within `rest` of them.
fn read_message_within(
    from: &UnixStream,
    first: Option<Duration>,
    rest: Duration,
) -> Result<Read_, GateError> {
    from.set_read_timeout(first).map_err(GateError::Io)?;
    let mut started = false;
    let read = read_message_timed(from, || {
        started = true;
        from.set_read_timeout(Some(rest))
    });
    let _ = from.set_read_timeout(None);
    match read {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Err(if started {
                GateError::MessageDeadline(rest)
            } else {
                GateError::HandshakeDeadline(first.unwrap_or_default())
            })
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Err(GateError::TooManyFds),
        other => other.map_err(GateError::Io),
    }
}

fn read_message(from: &UnixStream) -> io::Result<Read_> {
    read_message_timed(from, || Ok(()))
}

/// Why the gate stops forwarding requests.
#[derive(Debug)]
enum GateError {
    HandshakeDeadline(Duration),
    MessageDeadline(Duration),
    TooManyEarlyEnables,
    /// The dirty log the frontend handed over cannot be mapped safely.
    BadLog(String),
    /// A request the device cannot honour, sent without asking for a reply.
    Refused(String),
    TooManyFds,
    Io(io::Error),
}

impl GateError {
    /// What to tell the operator (`None`: the peer just went away).
    fn reason(&self) -> Option<String> {
        match self {
            Self::HandshakeDeadline(d) => Some(format!(
                "the frontend sent no request within {:.1} s of connecting",
                d.as_secs_f64()
            )),
            Self::MessageDeadline(d) => Some(format!(
                "the frontend left a request unfinished for {:.1} s",
                d.as_secs_f64()
            )),
            Self::TooManyEarlyEnables => Some(format!(
                "the frontend enabled more than {MAX_EARLY_ENABLES} rings before SET_FEATURES"
            )),
            Self::BadLog(reason) => Some(format!("SET_LOG_BASE refused: {reason}")),
            Self::Refused(reason) => Some(reason.clone()),
            Self::TooManyFds => Some(format!(
                "the frontend sent more than {MAX_ATTACHED_FD_ENTRIES} file descriptors with one \
                 request"
            )),
            Self::Io(_) => None,
        }
    }
}

/// Read one message; `started` runs once its first bytes are in.
fn read_message_timed(
    from: &UnixStream,
    mut started: impl FnMut() -> io::Result<()>,
) -> io::Result<Read_> {
    let mut header = [0u8; HEADER_LEN];
    let mut raw_fds = [-1 as RawFd; MAX_ATTACHED_FD_ENTRIES];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr() as *mut libc::c_void,
        iov_len: HEADER_LEN,
    }];
    // SAFETY: the iovec points at `header`, which is writable for its length.
    let (mut got, fd_count) =
        unsafe { from.recv_with_fds(&mut iov, &mut raw_fds) }.map_err(io::Error::from)?;
    let fds: Vec<OwnedFd> = raw_fds[..fd_count]
        .iter()
        // SAFETY: recvmsg just gave us these descriptors; nobody else owns them.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if got == 0 && fds.is_empty() {
        return Ok(Read_::Closed);
    }
    started()?;
    while got < HEADER_LEN {
        match (&*from).read(&mut header[got..])? {
            0 => return Ok(Read_::Unframed(header[..got].to_vec(), fds)),
            n => got += n,
        }
    }
    let size = Header::from_slice(&header)
        .expect("header buffer has the header's size")
        .size as usize;
    if size > MAX_BODY_LEN {
        return Ok(Read_::Unframed(header.to_vec(), fds));
    }
    let mut body = vec![0u8; size];
    let mut filled = 0;
    while filled < size {
        match (&*from).read(&mut body[filled..])? {
            0 => {
                let mut partial = header.to_vec();
                partial.extend_from_slice(&body[..filled]);
                return Ok(Read_::Unframed(partial, fds));
            }
            n => filled += n,
        }
    }
    Ok(Read_::Message(Message { header, body, fds }))
}

/// Frontend → handler.
struct Requests {
    frontend: UnixStream,
    handler: UnixStream,
    replies_to: Arc<Mutex<UnixStream>>,
    deadlines: Deadlines,
    limits: Limits,
    close_reason: CloseReason,
    /// SET_FEATURES went through (and no reset since).
    features_acked: bool,
    /// REPLY_ACK was acked: a request with NEED_REPLY wants an ack.
    reply_ack: bool,
    /// CONFIGURE_MEM_SLOTS was acked: regions come one at a time (ADD_MEM_REG).
    mem_slots: bool,
    /// Regions the frontend has added (an upper bound: a refused one counts too).
    regions: u64,
    /// Ring index → requested state, for SET_VRING_ENABLE held back.
    early_enables: BTreeMap<u32, u32>,
}

impl Requests {
    fn run(mut self) {
        if let Err(e) = self.forward_all() {
            match e.reason() {
                Some(reason) => {
                    *self.close_reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason)
                }
                None => {
                    if let GateError::Io(e) = &e {
                        log::debug!("vhost-user gate: {e}");
                    }
                }
            }
        }
        let _ = self.handler.shutdown(Shutdown::Both);
        let _ = self.frontend.shutdown(Shutdown::Both);
    }

    fn forward_all(&mut self) -> Result<(), GateError> {
        let mut first = Some(self.deadlines.handshake);
        loop {
            let read = read_message_within(&self.frontend, first, self.deadlines.message)?;
            first = None;
            let message = match read {
                Read_::Message(message) => message,
                Read_::Closed => return Ok(()),
                Read_::Unframed(bytes, fds) => {
                    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
                    self.handler
                        .send_with_fds(&[&bytes[..]], &raw)
                        .map_err(|e| GateError::Io(io::Error::from(e)))?;
                    return Ok(());
                }
            };
            let header = message.header();
            match header.code() {
                Some(FrontendReq::SET_PROTOCOL_FEATURES) => {
                    if let Some(value) = VhostUserU64::from_slice(&message.body) {
                        let acked = VhostUserProtocolFeatures::from_bits_truncate(value.value);
                        self.reply_ack = acked.contains(VhostUserProtocolFeatures::REPLY_ACK);
                        self.mem_slots =
                            acked.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);
                    }
                }
                Some(FrontendReq::SET_VRING_ENABLE) if !self.features_acked => {
                    if let Some(state) = VhostUserVringState::from_slice(&message.body) {
                        self.hold_enable(&header, *state)?;
                        continue;
                    }
                }
                Some(FrontendReq::RESET_OWNER | FrontendReq::RESET_DEVICE) => {
                    self.features_acked = false;
                }
                // The crate maps the log without looking at the file: a file shorter
                // than the mapping kills the process at the first dirty page.
                Some(FrontendReq::SET_LOG_BASE) => check_log(&message)?,
                Some(code) => {
                    // Memory the device cannot use leaves nothing to serve: NACKed if
                    // asked, then closed, as when the handler fails to map a table.
                    if let Some(reason) = unmappable_region(code, &message) {
                        self.refuse(&header, code, reason.clone())?;
                        return Err(GateError::Refused(reason));
                    }
                    let refusal = self
                        .limits
                        .refusal(code, &message.body)
                        .or_else(|| self.slot_refusal(code, &message.body));
                    if let Some(reason) = refusal {
                        self.refuse(&header, code, reason)?;
                        continue;
                    }
                }
                _ => {}
            }
            message.send(&self.handler).map_err(GateError::Io)?;
            if header.code() == Some(FrontendReq::SET_FEATURES) {
                self.features_acked = true;
                self.replay_enables().map_err(GateError::Io)?;
            }
        }
    }

    /// Memory regions one at a time: only when negotiated, and no more than the
    /// device said it takes (GET_MAX_MEM_SLOTS); the crate would accept more.
    fn slot_refusal(&mut self, code: FrontendReq, body: &[u8]) -> Option<String> {
        match code {
            FrontendReq::SET_MEM_TABLE => {
                self.regions = body.get(..4).map_or(0, |n| {
                    u64::from(u32::from_ne_bytes([n[0], n[1], n[2], n[3]]))
                });
                None
            }
            FrontendReq::ADD_MEM_REG | FrontendReq::REM_MEM_REG if !self.mem_slots => Some(
                format!("{code:?}: memory slots were not negotiated; use SET_MEM_TABLE"),
            ),
            FrontendReq::ADD_MEM_REG if self.regions >= self.limits.max_mem_slots => Some(format!(
                "ADD_MEM_REG: {} regions already, the most GET_MAX_MEM_SLOTS allows",
                self.regions
            )),
            FrontendReq::ADD_MEM_REG => {
                self.regions += 1;
                None
            }
            FrontendReq::REM_MEM_REG => {
                self.regions = self.regions.saturating_sub(1);
                None
            }
            _ => None,
        }
    }

    /// Refuse a request: NACKed when the frontend asked for a reply, else the
    /// connection is closed (the frontend would otherwise believe it done).
    fn refuse(&self, request: &Header, code: FrontendReq, reason: String) -> Result<(), GateError> {
        if !(self.reply_ack && request.need_reply()) {
            return Err(GateError::Refused(reason));
        }
        log::warn!("vhost-user: {reason}; refused");
        self.reply(code, 1).map_err(GateError::Io)
    }

    /// A REPLY_ACK answer: 0 done, anything else refused.
    fn reply(&self, code: FrontendReq, value: u64) -> io::Result<()> {
        let reply = Header::new(
            code,
            VhostUserHeaderFlag::REPLY,
            std::mem::size_of::<VhostUserU64>(),
        );
        let mut bytes = reply.as_slice().to_vec();
        bytes.extend_from_slice(VhostUserU64::new(value).as_slice());
        let frontend = self.replies_to.lock().unwrap_or_else(|e| e.into_inner());
        (&*frontend).write_all(&bytes)
    }

    fn hold_enable(
        &mut self,
        request: &Header,
        state: VhostUserVringState,
    ) -> Result<(), GateError> {
        // Packed struct: copy the fields out before using them.
        let (index, num) = (state.index, state.num);
        log::debug!("vhost-user gate: SET_VRING_ENABLE {index} {num} before SET_FEATURES, held");
        if self.early_enables.len() == MAX_EARLY_ENABLES && !self.early_enables.contains_key(&index)
        {
            return Err(GateError::TooManyEarlyEnables);
        }
        self.early_enables.insert(index, num);
        if self.reply_ack && request.need_reply() {
            self.reply(FrontendReq::SET_VRING_ENABLE, 0)
                .map_err(GateError::Io)?;
        }
        Ok(())
    }

    fn replay_enables(&mut self) -> io::Result<()> {
        for (index, num) in std::mem::take(&mut self.early_enables) {
            let state = VhostUserVringState::new(index, num);
            let header = Header::new(
                FrontendReq::SET_VRING_ENABLE,
                VhostUserHeaderFlag::empty(),
                std::mem::size_of::<VhostUserVringState>(),
            );
            let mut header_bytes = [0u8; HEADER_LEN];
            header_bytes.copy_from_slice(header.as_slice());
            Message {
                header: header_bytes,
                body: state.as_slice().to_vec(),
                fds: Vec::new(),
            }
            .send(&self.handler)?;
        }
        Ok(())
    }
}

impl Limits {
    /// Why the device cannot honour `code` with `body`, if it cannot.
    fn refusal(&self, code: FrontendReq, body: &[u8]) -> Option<String> {
        match code {
            FrontendReq::SET_VRING_NUM => {
                let state = VhostUserVringState::from_slice(body)?;
                let (index, num) = (state.index, state.num);
                if index >= self.num_queues {
                    Some(format!(
                        "SET_VRING_NUM for ring {index} of {}",
                        self.num_queues
                    ))
                } else if !num.is_power_of_two() || num > self.max_queue_size {
                    Some(format!(
                        "SET_VRING_NUM {num} for ring {index}: a ring holds a power of two \
                         up to {} descriptors",
                        self.max_queue_size
                    ))
                } else {
                    None
                }
            }
            FrontendReq::SET_VRING_BASE => {
                let state = VhostUserVringState::from_slice(body)?;
                let (index, num) = (state.index, state.num);
                if index >= self.num_queues {
                    Some(format!(
                        "SET_VRING_BASE for ring {index} of {}",
                        self.num_queues
                    ))
                } else if num > u32::from(u16::MAX) && num >> 16 != num & 0xffff {
                    // A packed ring's base may carry the used position and wrap counter
                    // in bits 16–31 (QEMU sends them). This device completes every chain
                    // before it stops a ring, so they must equal the available ones.
                    Some(format!(
                        "SET_VRING_BASE {num} for ring {index}: a ring index is 16 bits \
                         (a packed ring's used half must equal its available half: this \
                         device keeps no chain in flight)"
                    ))
                } else {
                    None
                }
            }
            _ => None,
        }
    }
}

/// Guest memory must lie inside the files it comes in. Checked here, before the
/// handler sees it: `vhost-user-backend` maps a table and hands it to the workers
/// before the device is asked about it, and a worker touching a page past the end of
/// its file kills the process with SIGBUS (found by `fuzz/`, vhost_user_session).
fn unmappable_region(code: FrontendReq, message: &Message) -> Option<String> {
    let regions: Vec<VhostUserMemoryRegion> = match code {
        FrontendReq::SET_MEM_TABLE => {
            let header_len = std::mem::size_of::<VhostUserMemory>();
            let table = message.body.get(header_len..)?;
            table
                .chunks_exact(std::mem::size_of::<VhostUserMemoryRegion>())
                .filter_map(VhostUserMemoryRegion::from_slice)
                .copied()
                .collect()
        }
        FrontendReq::ADD_MEM_REG => {
            let single = VhostUserSingleMemoryRegion::from_slice(&message.body)?;
            vec![**single]
        }
        // Anything malformed is left to the handler, which refuses it.
        _ => return None,
    };
    for (region, fd) in regions.iter().zip(&message.fds) {
        // Packed struct: copy the fields out before using them.
        let (guest, size, offset) = (
            region.guest_phys_addr,
            region.memory_size,
            region.mmap_offset,
        );
        let what = format!("memory region at guest address {guest:#x}");
        if let Err(e) = check_mappable(fd.as_fd(), offset, size, &what) {
            return Some(format!("{code:?} refused: {e}"));
        }
    }
    None
}

/// The dirty log must cover the mapping it is given for, and stay that size.
fn check_log(message: &Message) -> Result<(), GateError> {
    let log = VhostUserLog::from_slice(&message.body)
        .ok_or_else(|| GateError::BadLog("its body is not a log description".to_string()))?;
    let fd = message
        .fds
        .first()
        .ok_or_else(|| GateError::BadLog("no file descriptor came with it".to_string()))?;
    // Packed struct: copy the fields out before using them.
    let (size, offset) = (log.mmap_size, log.mmap_offset);
    check_mappable(fd.as_fd(), offset, size, "dirty log")
        .map_err(|e| GateError::BadLog(e.to_string()))
}

/// Handler → frontend: whole replies, so a reply never interleaves with an ack the
/// gate sends itself.
struct Replies {
    handler: UnixStream,
    frontend: Arc<Mutex<UnixStream>>,
}

impl Replies {
    fn run(self) {
        loop {
            let message = match read_message(&self.handler) {
                Ok(Read_::Message(message)) => message,
                Ok(Read_::Closed | Read_::Unframed(..)) | Err(_) => break,
            };
            let frontend = self.frontend.lock().unwrap_or_else(|e| e.into_inner());
            if message.send(&frontend).is_err() {
                break;
            }
        }
        let frontend = self.frontend.lock().unwrap_or_else(|e| e.into_inner());
        let _ = frontend.shutdown(Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        num_queues: 2,
        max_queue_size: 1024,
        max_mem_slots: 4,
    };

    fn request(code: FrontendReq, flags: VhostUserHeaderFlag, body: &[u8]) -> Vec<u8> {
        let header = Header::new(code, flags, body.len());
        let mut bytes = header.as_slice().to_vec();
        bytes.extend_from_slice(body);
        bytes
    }

    fn read_header(from: &mut UnixStream) -> (Header, Vec<u8>) {
        let mut header = [0u8; HEADER_LEN];
        from.read_exact(&mut header).unwrap();
        let header = *Header::from_slice(&header).unwrap();
        let mut body = vec![0u8; header.size as usize];
        from.read_exact(&mut body).unwrap();
        (header, body)
    }

    #[test]
    fn a_packed_ring_base_passes_only_with_nothing_in_flight() {
        let base = |num: u32| {
            LIMITS.refusal(
                FrontendReq::SET_VRING_BASE,
                VhostUserVringState::new(1, num).as_slice(),
            )
        };
        assert_eq!(base(0x8000), None, "DPDK: position 0, wrap counter 1");
        assert_eq!(base(0x8000_8000), None, "QEMU: the used half equals it");
        assert!(base(0x8001_8000).is_some(), "a chain in flight");
        assert!(base(70000).is_some());
    }

    #[test]
    fn early_ring_enable_is_acked_held_and_replayed_after_set_features() {
        let (mut qemu, frontend) = UnixStream::pair().unwrap();
        let (handler, mut crate_side) = UnixStream::pair().unwrap();
        let _gate = FrontendGate::start(frontend, handler, Deadlines::default(), LIMITS).unwrap();
        let need_reply = VhostUserHeaderFlag::NEED_REPLY;
        let none = || VhostUserHeaderFlag::empty();

        let reply_ack = VhostUserU64::new(VhostUserProtocolFeatures::REPLY_ACK.bits());
        qemu.write_all(&request(
            FrontendReq::SET_PROTOCOL_FEATURES,
            none(),
            reply_ack.as_slice(),
        ))
        .unwrap();
        let (header, _) = read_header(&mut crate_side);
        assert_eq!(header.code().unwrap(), FrontendReq::SET_PROTOCOL_FEATURES);

        // Before SET_FEATURES: acked by the gate, not seen by the handler.
        let enable = VhostUserVringState::new(1, 1);
        qemu.write_all(&request(
            FrontendReq::SET_VRING_ENABLE,
            need_reply,
            enable.as_slice(),
        ))
        .unwrap();
        let (ack, body) = read_header(&mut qemu);
        assert_eq!(ack.flags, VERSION | VhostUserHeaderFlag::REPLY.bits());
        assert_eq!(ack.code(), Some(FrontendReq::SET_VRING_ENABLE));
        assert_eq!(VhostUserU64::from_slice(&body).unwrap().value, 0);

        // SET_FEATURES goes through, then the held state of ring 1.
        let features = VhostUserU64::new(1 << 30);
        qemu.write_all(&request(
            FrontendReq::SET_FEATURES,
            none(),
            features.as_slice(),
        ))
        .unwrap();
        let (header, _) = read_header(&mut crate_side);
        assert_eq!(header.code().unwrap(), FrontendReq::SET_FEATURES);
        let (header, body) = read_header(&mut crate_side);
        assert_eq!(header.code().unwrap(), FrontendReq::SET_VRING_ENABLE);
        assert!(!header.need_reply(), "replayed requests want no reply");
        let state = *VhostUserVringState::from_slice(&body).unwrap();
        let (index, num) = (state.index, state.num);
        assert_eq!((index, num), (1, 1));

        // After SET_FEATURES everything passes, and replies come back whole.
        qemu.write_all(&request(
            FrontendReq::SET_VRING_ENABLE,
            none(),
            enable.as_slice(),
        ))
        .unwrap();
        let (header, _) = read_header(&mut crate_side);
        assert_eq!(header.code().unwrap(), FrontendReq::SET_VRING_ENABLE);
        crate_side
            .write_all(&request(
                FrontendReq::GET_FEATURES,
                VhostUserHeaderFlag::REPLY,
                VhostUserU64::new(7).as_slice(),
            ))
            .unwrap();
        let (reply, body) = read_header(&mut qemu);
        assert_eq!(reply.code().unwrap(), FrontendReq::GET_FEATURES);
        assert_eq!(VhostUserU64::from_slice(&body).unwrap().value, 7);
    }

    #[test]
    fn regions_past_the_advertised_slots_are_refused() {
        let (mut qemu, frontend) = UnixStream::pair().unwrap();
        let (handler, mut crate_side) = UnixStream::pair().unwrap();
        let _gate = FrontendGate::start(frontend, handler, Deadlines::default(), LIMITS).unwrap();
        let acked =
            VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        qemu.write_all(&request(
            FrontendReq::SET_PROTOCOL_FEATURES,
            VhostUserHeaderFlag::empty(),
            VhostUserU64::new(acked.bits()).as_slice(),
        ))
        .unwrap();
        read_header(&mut crate_side);
        let region = [0u8; 40];
        for _ in 0..LIMITS.max_mem_slots {
            qemu.write_all(&request(
                FrontendReq::ADD_MEM_REG,
                VhostUserHeaderFlag::NEED_REPLY,
                &region,
            ))
            .unwrap();
            let (header, _) = read_header(&mut crate_side);
            assert_eq!(header.code(), Some(FrontendReq::ADD_MEM_REG), "passed on");
        }
        qemu.write_all(&request(
            FrontendReq::ADD_MEM_REG,
            VhostUserHeaderFlag::NEED_REPLY,
            &region,
        ))
        .unwrap();
        let (nack, body) = read_header(&mut qemu);
        assert_eq!(nack.code(), Some(FrontendReq::ADD_MEM_REG));
        assert_ne!(VhostUserU64::from_slice(&body).unwrap().value, 0, "NACK");
    }

    fn sealable_memfd(len: u64) -> std::fs::File {
        let name = std::ffi::CString::new("gate-test-ram").unwrap();
        // SAFETY: a valid name; the new descriptor is owned right below.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_ALLOW_SEALING) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: a fresh descriptor nobody else owns.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(len).unwrap();
        file
    }

    fn one_region_table(size: u64, mmap_offset: u64) -> Vec<u8> {
        let mut body = VhostUserMemory::new(1).as_slice().to_vec();
        let region = VhostUserMemoryRegion::new(0, size, 0x7f00_0000_0000, mmap_offset);
        body.extend_from_slice(region.as_slice());
        body
    }

    /// A gate with REPLY_ACK and memory slots negotiated; QEMU's side reads with a
    /// timeout, so a request passed on instead of refused fails rather than hangs.
    fn gate_with_slots() -> (UnixStream, UnixStream, FrontendGate) {
        let (qemu, frontend) = UnixStream::pair().unwrap();
        let (handler, mut crate_side) = UnixStream::pair().unwrap();
        let gate = FrontendGate::start(frontend, handler, Deadlines::default(), LIMITS).unwrap();
        qemu.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let acked =
            VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        (&qemu)
            .write_all(&request(
                FrontendReq::SET_PROTOCOL_FEATURES,
                VhostUserHeaderFlag::empty(),
                VhostUserU64::new(acked.bits()).as_slice(),
            ))
            .unwrap();
        read_header(&mut crate_side);
        (qemu, crate_side, gate)
    }

    #[test]
    fn a_region_past_the_end_of_its_file_is_nacked_and_the_connection_closed() {
        let ram = sealable_memfd(0x1_0000);
        let mut single = 0u64.to_ne_bytes().to_vec();
        single.extend_from_slice(&one_region_table(0x1_0000, 0x1000)[8..]);
        let cases = [
            // One region at a time is checked the same way.
            (FrontendReq::ADD_MEM_REG, single),
            // The table the fuzzer found: the right size, at an offset far past the end.
            (
                FrontendReq::SET_MEM_TABLE,
                one_region_table(0x1_0000, 0x3_0000_0000_0000),
            ),
            // One byte too long.
            (FrontendReq::SET_MEM_TABLE, one_region_table(0x1_0001, 0)),
        ];
        for (code, body) in cases {
            let (mut qemu, mut crate_side, gate) = gate_with_slots();
            let bad = request(code, VhostUserHeaderFlag::NEED_REPLY, &body);
            qemu.send_with_fds(&[&bad[..]], &[ram.as_raw_fd()]).unwrap();
            let (nack, reply) = read_header(&mut qemu);
            assert_eq!(nack.code(), Some(code));
            assert_ne!(VhostUserU64::from_slice(&reply).unwrap().value, 0, "NACK");
            let mut rest = Vec::new();
            qemu.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty(), "{code:?}: closed after the NACK");
            crate_side.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty(), "{code:?}: never reached the handler");
            let reason = gate.close_reason().expect("a reason for closing");
            assert!(reason.contains("past the end"), "{reason}");
        }
    }

    #[test]
    fn a_table_inside_its_file_is_passed_on_and_the_file_sealed() {
        let ram = sealable_memfd(0x1_0000);
        let (qemu, mut crate_side, _gate) = gate_with_slots();
        let fits = request(
            FrontendReq::SET_MEM_TABLE,
            VhostUserHeaderFlag::NEED_REPLY,
            &one_region_table(0x1_0000, 0),
        );
        qemu.send_with_fds(&[&fits[..]], &[ram.as_raw_fd()])
            .unwrap();
        let (header, _) = read_header(&mut crate_side);
        assert_eq!(header.code(), Some(FrontendReq::SET_MEM_TABLE));
        // SAFETY: F_GET_SEALS takes no argument.
        let seals = unsafe { libc::fcntl(ram.as_raw_fd(), libc::F_GET_SEALS) };
        assert_ne!(seals & libc::F_SEAL_SHRINK, 0, "sealed against shrinking");
    }

    #[test]
    fn descriptors_pass_through() {
        let (qemu, frontend) = UnixStream::pair().unwrap();
        let (handler, crate_side) = UnixStream::pair().unwrap();
        let _gate = FrontendGate::start(frontend, handler, Deadlines::default(), LIMITS).unwrap();
        let (keep, passed) = UnixStream::pair().unwrap();
        let bytes = request(
            FrontendReq::SET_VRING_KICK,
            VhostUserHeaderFlag::empty(),
            VhostUserU64::new(0).as_slice(),
        );
        qemu.send_with_fds(&[&bytes[..]], &[passed.as_raw_fd()])
            .unwrap();
        let mut buf = [0u8; 64];
        let mut fds = [-1; 4];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        }];
        // SAFETY: the iovec points at `buf`.
        let (got, nfds) = unsafe { crate_side.recv_with_fds(&mut iov, &mut fds) }.unwrap();
        assert_eq!((got, nfds), (bytes.len(), 1));
        // SAFETY: just received, owned here.
        let mut received = unsafe { UnixStream::from_raw_fd(fds[0]) };
        received.write_all(b"x").unwrap();
        let mut one = [0u8; 1];
        (&keep).read_exact(&mut one).unwrap();
        assert_eq!(&one, b"x", "the descriptor reached the handler");
    }

    #[test]
    fn an_oversized_message_is_passed_on_and_the_gate_closes() {
        let (mut qemu, frontend) = UnixStream::pair().unwrap();
        let (handler, mut crate_side) = UnixStream::pair().unwrap();
        let _gate = FrontendGate::start(frontend, handler, Deadlines::default(), LIMITS).unwrap();
        let header = Header::new(
            FrontendReq::SET_FEATURES,
            VhostUserHeaderFlag::empty(),
            1 << 30,
        );
        qemu.write_all(header.as_slice()).unwrap();
        let mut got = Vec::new();
        crate_side.read_to_end(&mut got).unwrap();
        assert_eq!(got, header.as_slice(), "header passed on, then closed");
    }
}
