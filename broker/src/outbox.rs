//! [`Outbox`]: the bounded queue of messages waiting to be sent to one
//! session. Publishers push without waiting; the connection task drains it.

use std::collections::VecDeque;
use std::sync::Arc;

use ferrymq_codec::QoS;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::message::Message;

/// One message on its way to one session, at the QoS of that delivery.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The shared message.
    pub message: Arc<Message>,
    /// min(published QoS, granted QoS).
    pub qos: QoS,
}

/// Limits of one outbox.
#[derive(Debug, Clone, Copy)]
pub struct OutboxLimits {
    /// Most messages queued at once.
    pub max_messages: usize,
    /// Most payload bytes queued at once.
    pub max_bytes: usize,
}

/// What happened to a pushed delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued.
    Queued,
    /// Not queued: the outbox is full (drop-newest; counted).
    DroppedFull,
    /// Not queued: the session has gone.
    Closed,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Delivery>,
    bytes: usize,
    closed: bool,
}

/// A session's outgoing queue.
pub struct Outbox {
    /// The deliveries; a short critical section per push or drain, held by
    /// one publisher or the owning connection, never across an await.
    queue: Mutex<Queue>,
    /// Wakes the connection task when the queue goes from empty to not
    /// empty (a stored permit covers a push that races with the drain).
    ready: Notify,
    /// Bounds, so one slow subscriber cannot take all memory.
    limits: OutboxLimits,
}

impl Outbox {
    /// An empty outbox.
    pub fn new(limits: OutboxLimits) -> Arc<Self> {
        Arc::new(Outbox {
            queue: Mutex::new(Queue::default()),
            ready: Notify::new(),
            limits,
        })
    }

    /// Queues a delivery unless the outbox is full or closed. Never waits.
    pub fn push(&self, delivery: Delivery) -> Pushed {
        let size = delivery.message.payload.len();
        let was_empty = {
            let mut q = self.queue.lock();
            if q.closed {
                return Pushed::Closed;
            }
            if q.items.len() >= self.limits.max_messages || q.bytes + size > self.limits.max_bytes {
                return Pushed::DroppedFull;
            }
            q.bytes += size;
            q.items.push_back(delivery);
            q.items.len() == 1
        };
        if was_empty {
            self.ready.notify_one();
        }
        Pushed::Queued
    }

    /// Waits until the outbox may hold something. Cancel-safe: a
    /// notification that arrives while nobody waits is kept as a permit.
    pub async fn ready(&self) {
        self.ready.notified().await;
    }

    /// Moves up to `max` deliveries into `out`, oldest first.
    pub fn drain_into(&self, out: &mut Vec<Delivery>, max: usize) {
        let mut q = self.queue.lock();
        let n = q.items.len().min(max);
        let mut freed = 0;
        for d in q.items.drain(..n) {
            freed += d.message.payload.len();
            out.push(d);
        }
        q.bytes -= freed;
        if !q.items.is_empty() {
            // More remains: make sure the drainer comes back.
            drop(q);
            self.ready.notify_one();
        }
    }

    /// Refuses further pushes and discards what is queued (the session ended).
    pub fn close(&self) {
        let mut q = self.queue.lock();
        q.closed = true;
        q.items.clear();
        q.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::SessionId;
    use bytes::Bytes;
    use ferrymq_codec::{MqttString, PublishProperties};

    fn delivery(payload: &'static [u8]) -> Delivery {
        Delivery {
            message: Arc::new(Message {
                topic: MqttString::from_static("t"),
                payload: Bytes::from_static(payload),
                qos: QoS::AtMostOnce,
                retain: false,
                properties: PublishProperties::default(),
                origin: SessionId(1),
            }),
            qos: QoS::AtMostOnce,
        }
    }

    #[test]
    fn bounded_by_messages_and_bytes() {
        let outbox = Outbox::new(OutboxLimits {
            max_messages: 2,
            max_bytes: 5,
        });
        assert_eq!(outbox.push(delivery(b"ab")), Pushed::Queued);
        assert_eq!(outbox.push(delivery(b"abcd")), Pushed::DroppedFull);
        assert_eq!(outbox.push(delivery(b"abc")), Pushed::Queued);
        assert_eq!(outbox.push(delivery(b"")), Pushed::DroppedFull);
        let mut out = Vec::new();
        outbox.drain_into(&mut out, 1);
        assert_eq!(out.len(), 1);
        assert_eq!(outbox.push(delivery(b"")), Pushed::Queued);
        outbox.drain_into(&mut out, 10);
        let payloads: Vec<_> = out.iter().map(|d| d.message.payload.clone()).collect();
        assert_eq!(payloads, [&b"ab"[..], b"abc", b""]);
        outbox.close();
        assert_eq!(outbox.push(delivery(b"x")), Pushed::Closed);
    }
}
