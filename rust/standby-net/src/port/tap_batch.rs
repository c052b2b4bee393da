//! Writing a batch of guest frames to a TAP queue in one system call.
//!
//! The kernel still takes one frame per write, but an io_uring hands it the whole
//! batch in one `io_uring_enter`, where `writev` enters and leaves the kernel once per
//! frame. On this project's test machines that took guest-to-TAP from 0.48 to 0.84
//! Mpps at 64 B (bench/README.md, "Guest-to-TAP in batches"). The writes run inline
//! on the worker's CPU, in order. The TAP is non-blocking, so a write that cannot go
//! at once fails with EAGAIN (a drop, as with `writev`); a kernel whose TAP cannot
//! be written inline hands the writes to io_uring's own thread, and the flush still
//! waits for every one before the buffers go back.

use std::io;
use std::os::unix::io::RawFd;

use io_uring::{opcode, types, IoUring};

use super::{FlushedFrames, GuestFrame};

/// Frames in one batch: the transmit pass hands chains back 32 at a time, and a
/// batch is flushed before they go.
const BATCH_FRAMES: usize = 64;
/// Segments of all frames of a batch together. A frame with more than this many
/// does not fit any batch and is written on its own.
const BATCH_SEGMENTS: usize = 4 * BATCH_FRAMES;

/// What became of a frame offered to [`BatchWriter::queue`].
#[derive(Debug, PartialEq, Eq)]
pub enum Queued {
    /// In the batch; written at the next [`BatchWriter::flush`].
    Yes,
    /// The batch has no room: flush, then offer it again.
    BatchFull,
    /// More segments than any batch holds.
    TooManySegments,
}

/// Where one queued frame's iovecs are.
#[derive(Clone, Copy)]
struct QueuedFrame {
    first: usize,
    count: usize,
    /// Ethernet bytes, for the counters.
    bytes: u64,
}

pub struct BatchWriter {
    ring: IoUring,
    /// The iovecs of every queued frame, back to back. The submissions point into
    /// it, so it is allocated once and never grows past its capacity.
    iovecs: Vec<libc::iovec>,
    frames: Vec<QueuedFrame>,
}

// SAFETY: the iovecs hold pointers into guest memory only between `queue` and the
// `flush` that the transmit pass calls before it returns; between passes the vector
// is empty. Moving the writer to another thread moves no live pointer.
unsafe impl Send for BatchWriter {}

impl BatchWriter {
    /// An io_uring for the TAP queue `fd`, registered as its one fixed file. Fails
    /// where io_uring is missing or forbidden (old kernels, seccomp, the
    /// `kernel.io_uring_disabled` sysctl); the caller then writes frame by frame.
    pub fn new(fd: RawFd) -> io::Result<Self> {
        let ring = IoUring::new(BATCH_FRAMES as u32)?;
        ring.submitter().register_files(&[fd])?;
        Ok(Self {
            ring,
            iovecs: Vec::with_capacity(BATCH_SEGMENTS),
            frames: Vec::with_capacity(BATCH_FRAMES),
        })
    }

    /// Add `frame` (whose Ethernet part is `bytes` long) to the batch. Its memory
    /// must stay mapped and its chain unpublished until the next `flush`.
    pub fn queue(&mut self, frame: &GuestFrame<'_>, bytes: u64) -> Queued {
        if self.frames.len() == BATCH_FRAMES {
            return Queued::BatchFull;
        }
        let first = self.iovecs.len();
        if frame.iovecs(&mut self.iovecs, BATCH_SEGMENTS) {
            let count = self.iovecs.len() - first;
            self.frames.push(QueuedFrame {
                first,
                count,
                bytes,
            });
            return Queued::Yes;
        }
        self.iovecs.truncate(first);
        if first == 0 {
            Queued::TooManySegments
        } else {
            Queued::BatchFull
        }
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Frames queued.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Write every queued frame, in order, and wait until the kernel has taken them
    /// all: after this their guest buffers may go back to the guest. An error means
    /// the ring itself failed (the frames count as dropped); the writer must not be
    /// used again, as a submission it kept could still point into this batch.
    pub fn flush(&mut self) -> io::Result<FlushedFrames> {
        let mut flushed = FlushedFrames::default();
        if self.frames.is_empty() {
            return Ok(flushed);
        }
        let result = self.submit_all();
        if result.is_ok() {
            for completion in self.ring.completion() {
                if let Some(frame) = self.frames.get(completion.user_data() as usize) {
                    flushed.count(frame.bytes, completion.result());
                }
            }
        }
        self.frames.clear();
        self.iovecs.clear();
        result.map(|()| flushed)
    }

    fn submit_all(&mut self) -> io::Result<()> {
        {
            let mut submission = self.ring.submission();
            for (index, frame) in self.frames.iter().enumerate() {
                let iovecs = &self.iovecs[frame.first..frame.first + frame.count];
                let write =
                    opcode::Writev::new(types::Fixed(0), iovecs.as_ptr(), frame.count as u32)
                        .build()
                        .user_data(index as u64);
                // SAFETY: the iovecs and the guest memory they point to stay valid
                // until `submit_and_wait` below has seen every completion; the ring
                // has BATCH_FRAMES entries and the batch holds at most as many.
                unsafe { submission.push(&write) }
                    .map_err(|_| io::Error::other("io_uring submission queue full"))?;
            }
        }
        let wanted = self.frames.len();
        loop {
            match self.ring.submit_and_wait(wanted) {
                Ok(_) if self.ring.completion().len() >= wanted => return Ok(()),
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}
