//! A connection's send side: bounded queues that drop the oldest packet when full, and the writer
//! task that drains them, several frames per syscall, under a write deadline.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{watch, Notify};

use crate::io::{write_all_vectored, Writer};
use crate::metrics::{Histogram, QUEUE_WAIT_SAMPLE_EVERY};

/// A frame to write: `head` then `tail`. `tail` is empty except for frames assembled around a
/// payload that is not copied (ForwardPacket = new header ‖ source key, then the client's bytes).
pub struct OutFrame {
    pub head: Bytes,
    pub tail: Bytes,
}

impl OutFrame {
    pub fn whole(frame: Bytes) -> OutFrame {
        OutFrame {
            head: frame,
            tail: Bytes::new(),
        }
    }
}

/// Control frames (PeerGone, PeerPresent, Pong, Health…) are never dropped silently; a peer that
/// lets this many pile up is too slow to keep and gets disconnected instead.
const CONTROL_QUEUE_LIMIT: usize = 64 << 10;

/// A queued packet; one in [`QUEUE_WAIT_SAMPLE_EVERY`] carries the instant it was queued.
struct Queued {
    frame: OutFrame,
    at: Option<Instant>,
}

#[derive(Default)]
struct Queues {
    control: VecDeque<Bytes>,
    disco: VecDeque<Queued>,
    packets: VecDeque<Queued>,
    /// Packets pushed so far, for sampling the queue wait.
    pushed: u64,
    /// Flush what is queued, then close (graceful shutdown, control overflow).
    finish: bool,
}

pub struct Outbox {
    queues: Mutex<Queues>,
    wake: Notify,
    packet_limit: usize,
    disco_limit: usize,
    /// Stamp every [`QUEUE_WAIT_SAMPLE_EVERY`]th packet with its enqueue instant (client outboxes).
    sample_wait: bool,
}

/// What enqueuing a packet did.
#[derive(Debug, PartialEq, Eq)]
pub enum Enqueued {
    Queued,
    /// Queued after dropping the oldest queued packet.
    DroppedOldest,
    /// The connection is finishing; the packet was discarded.
    Closed,
}

impl Outbox {
    pub fn new(packet_limit: usize, disco_limit: usize) -> Outbox {
        Outbox {
            queues: Mutex::new(Queues::default()),
            wake: Notify::new(),
            packet_limit,
            disco_limit,
            sample_wait: false,
        }
    }

    /// Packets queued here are sampled for the queue-wait histogram (see [`run_writer`]).
    pub fn sampling_queue_wait(mut self) -> Outbox {
        self.sample_wait = true;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queues> {
        self.queues.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn push_packet(&self, frame: OutFrame, disco: bool) -> Enqueued {
        let mut q = self.lock();
        if q.finish {
            return Enqueued::Closed;
        }
        let at = if self.sample_wait && q.pushed.is_multiple_of(QUEUE_WAIT_SAMPLE_EVERY) {
            Some(Instant::now())
        } else {
            None
        };
        q.pushed = q.pushed.wrapping_add(1);
        let (queue, limit) = if disco {
            (&mut q.disco, self.disco_limit)
        } else {
            (&mut q.packets, self.packet_limit)
        };
        let dropped = queue.len() >= limit && queue.pop_front().is_some();
        queue.push_back(Queued { frame, at });
        drop(q);
        self.wake.notify_one();
        if dropped {
            Enqueued::DroppedOldest
        } else {
            Enqueued::Queued
        }
    }

    /// Packets (disco included) waiting for the writer now; control frames not counted.
    pub fn queued(&self) -> usize {
        let q = self.lock();
        q.packets.len() + q.disco.len()
    }

    pub fn push_control(&self, frame: Bytes) {
        let mut q = self.lock();
        if q.finish {
            return;
        }
        if q.control.len() >= CONTROL_QUEUE_LIMIT {
            q.finish = true;
        } else {
            q.control.push_back(frame);
        }
        drop(q);
        self.wake.notify_one();
    }

    /// Queues `last` (if any) as the final frame; the writer flushes everything and then closes.
    pub fn finish(&self, last: Option<Bytes>) {
        let mut q = self.lock();
        if !q.finish {
            q.control.extend(last);
            q.finish = true;
        }
        drop(q);
        self.wake.notify_one();
    }

    /// Moves every queued frame into `out`, control first; returns whether the writer should stop after.
    /// The sampled packets' time in the queue goes to `wait`.
    fn drain(&self, out: &mut Vec<Bytes>, wait: Option<&Histogram>) -> bool {
        let mut q = self.lock();
        out.extend(q.control.drain(..));
        let q = &mut *q;
        let mut now = None;
        for Queued { frame: f, at } in q.disco.drain(..).chain(q.packets.drain(..)) {
            if let (Some(at), Some(wait)) = (at, wait) {
                let now = *now.get_or_insert_with(Instant::now);
                wait.record(now.saturating_duration_since(at));
            }
            out.push(f.head);
            if !f.tail.is_empty() {
                out.push(f.tail);
            }
        }
        q.finish
    }
}

/// Why a writer stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum WriterExit {
    Finished,
    Closed,
    WriteError,
    WriteTimeout,
}

#[derive(Debug, Clone, Copy)]
pub struct WriterConfig {
    pub write_timeout: Duration,
    pub keepalive: Duration,
    /// Added to the keepalive period, uniformly at random, so keepalives of many clients spread out.
    pub keepalive_jitter: Duration,
}

/// Drains `outbox` into `writer` until the connection closes. `on_keepalive` is called for each
/// KeepAlive written (to count it); the queue wait of sampled packets goes to `queue_wait`.
pub async fn run_writer(
    outbox: &Outbox,
    mut writer: Writer,
    mut closed: watch::Receiver<bool>,
    config: &WriterConfig,
    keepalive_frame: &Bytes,
    on_keepalive: impl Fn(),
    queue_wait: Option<&Histogram>,
) -> WriterExit {
    let mut batch: Vec<Bytes> = Vec::new();
    let mut next_keepalive = tokio::time::Instant::now() + jittered(config);
    loop {
        let finish = outbox.drain(&mut batch, queue_wait);
        if batch.is_empty() && !finish {
            tokio::select! {
                _ = outbox.wake.notified() => continue,
                _ = tokio::time::sleep_until(next_keepalive) => {
                    batch.push(keepalive_frame.clone());
                    on_keepalive();
                }
                _ = closed.wait_for(|c| *c) => return WriterExit::Closed,
            }
        }
        if !batch.is_empty() {
            match tokio::time::timeout(config.write_timeout, write_all_vectored(&mut writer, &mut batch)).await {
                Ok(Ok(())) => next_keepalive = tokio::time::Instant::now() + jittered(config),
                Ok(Err(_)) => return WriterExit::WriteError,
                Err(_) => return WriterExit::WriteTimeout,
            }
        }
        if finish {
            use tokio::io::AsyncWriteExt;
            let _ = tokio::time::timeout(config.write_timeout, writer.shutdown()).await;
            return WriterExit::Finished;
        }
    }
}

fn jittered(config: &WriterConfig) -> Duration {
    config.keepalive + crate::backoff::random_up_to(config.keepalive_jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u8) -> OutFrame {
        OutFrame::whole(Bytes::from(vec![n]))
    }

    #[test]
    fn full_queue_drops_the_oldest() {
        let o = Outbox::new(2, 1);
        assert_eq!(o.push_packet(frame(1), false), Enqueued::Queued);
        assert_eq!(o.push_packet(frame(2), false), Enqueued::Queued);
        assert_eq!(o.push_packet(frame(3), false), Enqueued::DroppedOldest);
        assert_eq!(o.push_packet(frame(9), true), Enqueued::Queued);
        assert_eq!(o.push_packet(frame(8), true), Enqueued::DroppedOldest);
        o.push_control(Bytes::from_static(&[7]));
        let mut out = Vec::new();
        assert!(!o.drain(&mut out, None));
        let got: Vec<u8> = out.iter().map(|b| b[0]).collect();
        assert_eq!(got, vec![7, 8, 2, 3]);
    }

    #[test]
    fn finish_discards_later_packets() {
        let o = Outbox::new(4, 4);
        o.finish(Some(Bytes::from_static(&[1])));
        assert_eq!(o.push_packet(frame(2), false), Enqueued::Closed);
        let mut out = Vec::new();
        assert!(o.drain(&mut out, None));
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn every_64th_packet_is_timed_from_enqueue_to_drain() {
        static BOUNDS: &[u64] = &[1_000_000];
        let wait = Histogram::new(BOUNDS);
        let o = Outbox::new(1024, 32).sampling_queue_wait();
        for i in 0..130u32 {
            o.push_packet(frame(i as u8), i % 10 == 0);
        }
        let mut out = Vec::new();
        o.drain(&mut out, Some(&wait));
        assert_eq!(out.len(), 130);
        assert_eq!(wait.count(), 3, "packets 0, 64 and 128 of 130");
        // Not sampled without the flag, nor without a histogram.
        let plain = Outbox::new(1024, 32);
        plain.push_packet(frame(1), false);
        plain.drain(&mut out, Some(&wait));
        o.push_packet(frame(1), false);
        o.drain(&mut out, None);
        assert_eq!(wait.count(), 3);
    }

    #[tokio::test]
    async fn writer_sends_keepalives_when_idle_and_stops_on_close() {
        let (a, mut b) = tokio::io::duplex(1024);
        let o = Outbox::new(4, 4);
        let (tx, rx) = watch::channel(false);
        let cfg = WriterConfig {
            write_timeout: Duration::from_secs(1),
            keepalive: Duration::from_millis(20),
            keepalive_jitter: Duration::from_millis(5),
        };
        let ka = crate::frame::keep_alive();
        let count = std::sync::atomic::AtomicU64::new(0);
        let writer = run_writer(
            &o,
            Box::new(a),
            rx,
            &cfg,
            &ka,
            || {
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            },
            None,
        );
        let reader = async {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 10];
            b.read_exact(&mut buf).await.unwrap();
            tx.send_replace(true);
            buf
        };
        let (exit, buf) = tokio::join!(writer, reader);
        assert_eq!(exit, WriterExit::Closed);
        assert_eq!(&buf, &[6, 0, 0, 0, 0, 6, 0, 0, 0, 0]);
        assert!(count.load(std::sync::atomic::Ordering::Relaxed) >= 2);
    }
}
