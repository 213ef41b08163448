//! [`Message`]: an application message as the broker holds it, shared by
//! every subscriber it is delivered to.

use bytes::Bytes;
use ferrymq_codec::{MqttString, PublishProperties, QoS};
use tokio::time::Instant;

/// One application message. Routed as `Arc<Message>`: fan-out to many
/// subscribers shares one allocation, and the payload shares the buffer it
/// was received in.
///
/// Queues hold messages, never encoded packets: packet identifiers, topic
/// aliases and subscription identifiers belong to one delivery and are
/// applied when it is sent.
///
/// Laid out as declared, its queue-entry count first: beside the `Arc`'s
/// own count, in the cache line every push and pop of a delivery touches
/// anyway (last, it was a second line that the publisher's and the
/// subscribers' cores took from each other at every delivery).
#[derive(Debug, Clone, PartialEq, Eq)]
#[repr(C)]
pub struct Message {
    /// How many queue entries hold it: its payload counts once against
    /// `[storage] max_queued_memory` while any does. Not part of its value
    /// (a clone starts at 0; equality ignores it).
    pub holders: Holders,
    /// The QoS it was published with.
    pub qos: QoS,
    /// The RETAIN flag it was published with.
    pub retain: bool,
    /// The topic name (never empty: a received Topic Alias is resolved first).
    pub topic: MqttString,
    /// The payload.
    pub payload: Bytes,
    /// Properties to pass on (MQTT 5.0). Topic Alias and Subscription
    /// Identifiers are never stored here; the Message Expiry Interval is
    /// the one received (what is sent onward is computed from `expires_at`).
    pub properties: PublishProperties,
    /// The session that published it, for No Local.
    pub origin: SessionId,
    /// When it expires (MQTT 5.0 Message Expiry Interval), on the broker's
    /// monotonic clock. Expired messages are never delivered.
    pub expires_at: Option<Instant>,
}

/// A count of the queue entries holding a [`Message`]
/// (`outbox::QueueMemory`).
#[derive(Debug, Default)]
pub struct Holders(pub(crate) std::sync::atomic::AtomicU32);

impl Clone for Holders {
    fn clone(&self) -> Self {
        Holders::default()
    }
}

impl PartialEq for Holders {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Holders {}

impl Message {
    /// Whether it has expired at `now`.
    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }

    /// The Message Expiry Interval to send at `now`: what was received
    /// minus the time spent here, in whole seconds rounded up (never 0
    /// for a message that has not expired).
    pub fn remaining_expiry(&self, now: Instant) -> Option<u32> {
        let left = self.expires_at?.saturating_duration_since(now);
        let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
        Some(u32::try_from(secs).unwrap_or(u32::MAX))
    }

    /// The expiry instant for an interval received at `now`.
    pub fn expiry_from(interval: Option<u32>, now: Instant) -> Option<Instant> {
        interval.map(|secs| now + std::time::Duration::from_secs(u64::from(secs)))
    }
}

/// The user property that carries a [`MessageId`] (`ferry-id`).
pub const MESSAGE_ID_PROPERTY: &str = "ferry-id";

/// Between the broker and its in-process clients only: when a delivered
/// message was queued (broker ms). The client turns it into
/// `Received::queued_ms` and never shows it as a user property.
pub(crate) const QUEUED_AT_PROPERTY: &str = "ferry-queued-ms";

/// A message's stable identity when it leaves the node: the node, the
/// queue it waited in, the run that queued it and its place in that queue.
/// Written `UUID:QUEUE:EPOCH:N` (UUID as 32 hex digits). The same message
/// gets the same id on every resend, across restarts; no two messages
/// ever share one. A receiver can de-duplicate with, per (uuid, queue,
/// epoch), a low-water mark plus the numbers seen above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId {
    /// The node's random identity.
    pub uuid: [u8; 16],
    /// The queue (session or group number; never reused).
    pub queue: u64,
    /// The run that queued it.
    pub epoch: u64,
    /// Its number within that queue and run.
    pub n: u64,
}

/// Bits of a queue sequence below the epoch (the run that queued it):
/// 2^40 messages per queue per run.
pub const SEQ_EPOCH_SHIFT: u32 = 40;

impl MessageId {
    /// The id of the message at `seq` in queue `queue` of node `uuid`.
    pub fn new(uuid: [u8; 16], queue: u64, seq: u64) -> MessageId {
        let shift = SEQ_EPOCH_SHIFT;
        MessageId {
            uuid,
            queue,
            epoch: seq >> shift,
            n: seq & ((1u64 << shift) - 1),
        }
    }
}

impl std::fmt::Display for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.uuid {
            write!(f, "{b:02x}")?;
        }
        write!(f, ":{}:{}:{}", self.queue, self.epoch, self.n)
    }
}

impl std::str::FromStr for MessageId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("not a message id (UUID:QUEUE:EPOCH:N): {s:?}");
        let mut parts = s.split(':');
        let (Some(hex), Some(queue), Some(epoch), Some(n), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(bad());
        };
        if hex.len() != 32 || !hex.is_ascii() {
            return Err(bad());
        }
        let mut uuid = [0u8; 16];
        for (i, b) in uuid.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(MessageId {
            uuid,
            queue: queue.parse().map_err(|_| bad())?,
            epoch: epoch.parse().map_err(|_| bad())?,
            n: n.parse().map_err(|_| bad())?,
        })
    }
}

/// Identifies one session for the lifetime of the process. Never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);
