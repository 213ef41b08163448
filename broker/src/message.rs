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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The topic name (never empty: a received Topic Alias is resolved first).
    pub topic: MqttString,
    /// The payload.
    pub payload: Bytes,
    /// The QoS it was published with.
    pub qos: QoS,
    /// The RETAIN flag it was published with.
    pub retain: bool,
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

/// Identifies one session for the lifetime of the process. Never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);
