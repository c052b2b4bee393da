//! The loop port's datapath: each frame the guest transmits is copied from its
//! transmit buffers straight into its receive buffers.
//!
//! Going through the port (`transmit` into a host slot, `peek_rx` out of it) costs a
//! second copy and a ring of slots per frame. Here a transmit chain stays in its ring
//! until a receive buffer takes it, so nothing is dropped and order is kept, as with
//! the slots; `bench/vhost_throughput.py` (loopback) measures what it saves.
//!
//! Chains are taken [`LOOP_BATCH`] at a time, then placed: each ring's lines are then
//! read in runs, not by turns one frame each (DPDK's forwarding moves bursts the same
//! way). In an A/B on one machine (`bench/README.md`), 64 B packed loopback with 1024
//! frames in flight went from 10.6-11.4 to 14.2-15.2 Mpps, split from 13.5-14.5 to
//! 14.7-15.4.

use std::num::Wrapping;
use std::ops::Range;

use vhost_user_backend::VringT;
use virtio_queue::QueueT;

use super::{
    check_frame_len, signal_if, usable, AvailCursor, FrameSource, Kicks, LinkParams, Placement,
    QueuePair, Taken, TX_CHAINS,
};
use crate::guest_ring::MappedMemory;
use crate::stats::CounterDelta;
use crate::Vring;

/// Transmit chains taken before any of them is placed.
pub(super) const LOOP_BATCH: usize = 8;

/// A transmit chain taken, waiting for a receive buffer.
pub(super) struct LoopChain {
    /// Where the transmit cursor was before it: where it goes back to when the
    /// receive ring has no buffer for it.
    mark: Wrapping<u16>,
    taken: Taken,
    /// Its buffers, in the pair's transmit pieces.
    pieces: Range<usize>,
}

impl QueuePair {
    /// One pass of the loop: transmit chains into receive buffers until the
    /// transmit ring is empty or the receive ring has no buffers. Says whether
    /// anything moved.
    pub(super) fn loop_back(
        &mut self,
        rx_vring: &Vring,
        tx_vring: &Vring,
        mem: &MappedMemory,
        link: LinkParams,
        kicks: Kicks,
    ) -> bool {
        // Only this worker ever holds both; the frontend's thread takes one at a time.
        let mut tx_state = tx_vring.get_mut();
        let mut rx_state = rx_vring.get_mut();
        if !usable(&tx_state) || !usable(&rx_state) {
            return false;
        }
        let tx_queue = tx_state.get_queue_mut();
        let rx_queue = rx_state.get_queue_mut();
        let (tx_index, rx_index) = (self.tx.queue, self.rx.queue);
        let tx_ring = match self.tx.ring.view(tx_index, tx_queue, mem, link.packed_ring) {
            Ok(Some(ring)) => ring,
            Ok(None) => return false,
            Err(e) => {
                self.errors.error(e.queue(), &e);
                return false;
            }
        };
        let rx_ring = match self.rx.ring.view(rx_index, rx_queue, mem, link.packed_ring) {
            Ok(Some(ring)) => ring,
            Ok(None) => return false,
            Err(e) => {
                self.errors.error(e.queue(), &e);
                return false;
            }
        };
        let (tx_event_idx, rx_event_idx) =
            (tx_queue.event_idx_enabled(), rx_queue.event_idx_enabled());
        let mut tx_cursor = AvailCursor::new(tx_index, tx_queue);
        let mut rx_cursor = AvailCursor::new(rx_index, rx_queue);
        let (mut tx_delta, mut rx_delta) = (CounterDelta::default(), CounterDelta::default());
        self.tx.used.begin(tx_queue, &tx_ring);
        self.rx.used.begin(rx_queue, &rx_ring);
        self.tx.ring.suppress_kicks(&tx_ring, tx_event_idx);
        let mut starved = false;
        loop {
            if let Err(e) = tx_cursor
                .refresh(&tx_ring)
                .and_then(|()| rx_cursor.refresh(&rx_ring))
            {
                self.errors.error(e.queue(), &e);
                break;
            }
            'batches: loop {
                // `loop_batch` is empty here: the last batch was drained (a drain cut
                // short empties it when dropped).
                self.tx.pieces.clear();
                while self.loop_batch.len() < LOOP_BATCH {
                    let mark = tx_cursor.mark();
                    let start = self.tx.pieces.len();
                    let Some(taken) =
                        tx_cursor.next_chain(&tx_ring, TX_CHAINS, &mut self.tx.pieces)
                    else {
                        break;
                    };
                    let pieces = start..self.tx.pieces.len();
                    self.loop_batch.push(LoopChain {
                        mark,
                        taken,
                        pieces,
                    });
                }
                if self.loop_batch.is_empty() {
                    break;
                }
                for LoopChain {
                    mark,
                    taken,
                    pieces,
                } in self.loop_batch.drain(..)
                {
                    match taken
                        .walk
                        .and_then(|len| check_frame_len(len, link.vnet_hdr_len))
                    {
                        Ok(len) => {
                            let mut source = FrameSource::Guest {
                                pieces: &self.tx.pieces[pieces],
                                len,
                            };
                            let placement = self.rx.place(
                                &mut rx_cursor,
                                &rx_ring,
                                &mut source,
                                link,
                                &mut rx_delta,
                            );
                            let bytes = (len - link.vnet_hdr_len) as u64;
                            match placement {
                                Placement::Delivered => {
                                    tx_delta.packets += 1;
                                    tx_delta.bytes += bytes;
                                    rx_delta.packets += 1;
                                    rx_delta.bytes += bytes;
                                }
                                Placement::NeverFits => {
                                    tx_delta.packets += 1;
                                    tx_delta.bytes += bytes;
                                    rx_delta.drops += 1;
                                }
                                Placement::NoBuffers => {
                                    // This frame and the rest of the batch wait in the
                                    // transmit ring for buffers.
                                    tx_cursor.rewind(mark);
                                    starved = true;
                                    break 'batches;
                                }
                            }
                        }
                        Err(e) => {
                            tx_delta.errors += 1;
                            self.tx.errors.error(tx_index, &e);
                        }
                    }
                    self.tx.used.push(taken.id, 0, taken.slots);
                    self.tx.used.publish_if_full(&tx_ring);
                }
                // The guest gets each batch's frames at once, not 32 at a time: with
                // few frames in flight it forwards these while the next batch is
                // placed, instead of waiting for all of them (A/B, 64 B split
                // loopback-32: 7.7-7.9 to 11.3-11.6 Mpps).
                self.rx.used.publish(&rx_ring);
            }
            self.tx.used.publish(&tx_ring);
            self.rx.used.publish(&rx_ring);
            if starved {
                // Ask for a kick when buffers come (the transmit side waits for them,
                // not for a kick of its own); go on if some came meanwhile.
                if kicks == Kicks::Arm {
                    self.rx.ring.allow_kicks(&rx_ring, rx_event_idx, &rx_cursor);
                }
                if !rx_cursor.more_since_empty(&rx_ring) {
                    break;
                }
                starved = false;
                continue;
            }
            if kicks == Kicks::Suppress
                || !self.tx.ring.allow_kicks(&tx_ring, tx_event_idx, &tx_cursor)
            {
                break;
            }
            self.tx.ring.suppress_kicks(&tx_ring, tx_event_idx);
        }
        if !starved || kicks == Kicks::Suppress {
            self.rx.ring.suppress_kicks(&rx_ring, rx_event_idx);
        }
        for cursor in [&mut tx_cursor, &mut rx_cursor] {
            if let Some(e) = cursor.take_error() {
                self.errors.error(e.queue(), &e);
            }
        }
        tx_queue.set_next_avail(tx_cursor.next.0);
        rx_queue.set_next_avail(rx_cursor.next.0);
        let moved = self.tx.used.completed_in_pass() > 0 || self.rx.used.completed_in_pass() > 0;
        let notify_tx = self.tx.used.finish(tx_queue, &tx_ring);
        let notify_rx = self.rx.used.finish(rx_queue, &rx_ring);
        signal_if(notify_tx, &tx_state, &mut self.tx.errors, tx_index);
        signal_if(notify_rx, &rx_state, &mut self.rx.errors, rx_index);
        self.tx.counters.queue(usize::from(tx_index)).add(&tx_delta);
        self.rx.counters.queue(usize::from(rx_index)).add(&rx_delta);
        moved
    }
}
