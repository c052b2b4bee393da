//! Per-queue counters: written by one worker, read by anyone, never locked.
//!
//! Workers add a whole batch at once (`QueueCounters::add`), so a reader polling at
//! any rate costs the datapath one shared cache line per batch, not per packet.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one virtqueue. Directions follow the guest's view, as virtio does:
/// queue `2n` receives (host → guest), queue `2n + 1` transmits (guest → host).
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct QueueCounters {
    packets: AtomicU64,
    bytes: AtomicU64,
    drops: AtomicU64,
    errors: AtomicU64,
}

/// What one batch adds to a queue's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterDelta {
    /// Frames moved.
    pub packets: u64,
    /// Frame bytes moved, without the virtio-net header.
    pub bytes: u64,
    /// Frames lost: the host port refused them, or no guest buffer could ever hold them.
    pub drops: u64,
    /// Malformed requests from the guest, completed without moving data.
    pub errors: u64,
}

impl CounterDelta {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl QueueCounters {
    pub fn add(&self, delta: &CounterDelta) {
        if delta.is_empty() {
            return;
        }
        // Relaxed: each counter is monotonic on its own; readers want a recent value,
        // not a consistent cut across counters.
        self.packets.fetch_add(delta.packets, Ordering::Relaxed);
        self.bytes.fetch_add(delta.bytes, Ordering::Relaxed);
        self.drops.fetch_add(delta.drops, Ordering::Relaxed);
        self.errors.fetch_add(delta.errors, Ordering::Relaxed);
    }

    pub fn snapshot(&self, queue: u16) -> QueueStats {
        QueueStats {
            queue,
            packets: self.packets.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            drops: self.drops.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

/// A copy of one queue's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub queue: u16,
    pub packets: u64,
    pub bytes: u64,
    pub drops: u64,
    pub errors: u64,
}

impl QueueStats {
    /// `true` for receive queues (host → guest).
    pub fn is_rx(&self) -> bool {
        self.queue % 2 == 0
    }
}

/// Counters of every queue of a device; they outlive connections, so a frontend
/// that reconnects keeps adding to the same totals.
#[derive(Debug)]
pub struct DeviceCounters {
    queues: Vec<QueueCounters>,
}

impl DeviceCounters {
    pub fn new(num_queues: usize) -> Self {
        Self {
            queues: (0..num_queues).map(|_| QueueCounters::default()).collect(),
        }
    }

    pub fn queue(&self, index: usize) -> &QueueCounters {
        &self.queues[index]
    }

    pub fn snapshot(&self) -> Vec<QueueStats> {
        self.queues
            .iter()
            .enumerate()
            .map(|(index, counters)| counters.snapshot(index as u16))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_add_up_per_queue() {
        let counters = DeviceCounters::new(4);
        let delta = CounterDelta {
            packets: 3,
            bytes: 180,
            drops: 1,
            errors: 0,
        };
        counters.queue(1).add(&delta);
        counters.queue(1).add(&delta);
        let stats = counters.snapshot();
        assert_eq!(stats.len(), 4);
        assert_eq!(
            stats[0],
            QueueStats {
                queue: 0,
                ..Default::default()
            }
        );
        assert_eq!(
            stats[1],
            QueueStats {
                queue: 1,
                packets: 6,
                bytes: 360,
                drops: 2,
                errors: 0
            }
        );
        assert!(stats[0].is_rx() && !stats[1].is_rx());
    }
}
