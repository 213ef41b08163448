//! [`Message`]: an application message as the broker holds it, shared by
//! every subscriber it is delivered to.

use bytes::Bytes;
use ferrymq_codec::{MqttString, PublishProperties, QoS};

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
    /// Identifiers are never stored here.
    pub properties: PublishProperties,
    /// The session that published it, for No Local.
    pub origin: SessionId,
}

/// Identifies one session for the lifetime of the process. Never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);
