//! Errors of the codec: one variant per rule of the spec that input can break.

use thiserror::Error;

use crate::packet::PacketType;
use crate::properties::PropertyId;
use crate::reason::ReasonCode;

/// Why a string is not a valid MQTT UTF-8 Encoded String.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum StringError {
    /// Not valid UTF-8 (this includes encoded surrogates U+D800..U+DFFF and
    /// overlong encodings).
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    /// Contains U+0000 [MQTT-1.5.4-2].
    #[error("string contains U+0000")]
    NullCharacter,
    /// Longer than 65,535 bytes.
    #[error("string of {0} bytes is longer than 65535")]
    TooLong(usize),
}

/// Why a topic name or topic filter is not valid (spec 4.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum TopicError {
    /// Zero length [MQTT-4.7.3-1].
    #[error("topic is empty")]
    Empty,
    /// A topic name containing `+` or `#` [MQTT-3.3.2-2].
    #[error("topic name contains a wildcard")]
    WildcardInName,
    /// `#` that is not alone in the last level [MQTT-4.7.1-2].
    #[error("'#' must be the whole last level of a filter")]
    MisplacedMultiLevelWildcard,
    /// `+` that does not occupy a whole level [MQTT-4.7.1-3].
    #[error("'+' must occupy a whole level of a filter")]
    PartialLevelWildcard,
    /// `$share/` without a valid share name and filter (MQTT 5.0 4.8.2).
    #[error("shared subscription needs '$share/<name>/<filter>' with a name free of '/', '+', '#'")]
    InvalidSharedSubscription,
}

/// Why bytes received are not a valid MQTT packet.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The remaining length's fourth byte has its continuation bit set, or
    /// the length is not in its shortest encoding [MQTT-1.5.5-1].
    #[error("remaining length is longer than 4 bytes or not minimally encoded")]
    MalformedRemainingLength,
    /// The packet is larger than the receiver's maximum packet size.
    #[error("packet of {size} bytes exceeds the maximum packet size of {max}")]
    PacketTooLarge {
        /// Total size: fixed header and remaining length.
        size: u64,
        /// The limit in force.
        max: u32,
    },
    /// Packet type 0 (both versions) or 15 (in 3.1.1) is reserved.
    #[error("packet type {0} is reserved")]
    ReservedPacketType(u8),
    /// The fixed header's low four bits are not those the packet type requires.
    #[error("invalid fixed-header flags {flags:#06b} for {packet}")]
    InvalidFlags {
        /// The packet.
        packet: PacketType,
        /// The flags received.
        flags: u8,
    },
    /// A QoS field holds 3.
    #[error("QoS 3 is not a valid QoS")]
    InvalidQos,
    /// A packet identifier of 0 where a non-zero one is required.
    #[error("{0} has packet identifier 0")]
    ZeroPacketId(PacketType),
    /// A field runs past the end of the packet.
    #[error("{0} ends inside a field")]
    UnexpectedEnd(PacketType),
    /// Bytes remain after the last field.
    #[error("{0} has bytes after its last field")]
    TrailingBytes(PacketType),
    /// A string breaks the UTF-8 rules.
    #[error("invalid string in {packet}: {error}")]
    InvalidString {
        /// The packet.
        packet: PacketType,
        /// The rule broken.
        error: StringError,
    },
    /// A PUBLISH (or will) topic name breaks the topic rules.
    #[error("invalid topic name: {0}")]
    InvalidTopicName(TopicError),
    /// A SUBSCRIBE or UNSUBSCRIBE topic filter breaks the topic rules.
    #[error("invalid topic filter: {0}")]
    InvalidTopicFilter(TopicError),
    /// CONNECT names a protocol other than "MQTT".
    #[error("protocol name is not \"MQTT\"")]
    InvalidProtocolName,
    /// CONNECT asks for a protocol level other than 4 (3.1.1) or 5 (5.0).
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocolLevel(u8),
    /// CONNECT flags break a rule (reserved bit, will flags, password without user name).
    #[error("invalid CONNECT flags {flags:#010b}: {reason}")]
    InvalidConnectFlags {
        /// The flags byte.
        flags: u8,
        /// The rule broken.
        reason: &'static str,
    },
    /// CONNACK acknowledge flags with reserved bits set.
    #[error("invalid CONNACK flags {0:#010b}")]
    InvalidConnAckFlags(u8),
    /// A reason code not defined for this packet.
    #[error("reason code {code:#04x} is not valid in {packet}")]
    InvalidReasonCode {
        /// The packet.
        packet: PacketType,
        /// The code received.
        code: u8,
    },
    /// Subscription options with reserved bits set or Retain Handling 3.
    #[error("invalid subscription options {0:#010b}")]
    InvalidSubscriptionOptions(u8),
    /// SUBSCRIBE or UNSUBSCRIBE without any topic filter [MQTT-3.8.3-3],
    /// or SUBACK / UNSUBACK (5.0) without any reason code.
    #[error("{0} has an empty payload")]
    EmptyPayload(PacketType),
    /// A variable byte integer inside the packet uses more than 4 bytes or
    /// more bytes than its value needs.
    #[error("variable byte integer is longer than 4 bytes or not minimally encoded")]
    MalformedVarint,
    /// A property identifier the spec does not define.
    #[error("unknown property identifier {0:#04x}")]
    UnknownProperty(u32),
    /// A property the spec does not allow in this packet.
    #[error("property {property:?} is not allowed in {packet}")]
    PropertyNotAllowed {
        /// The property.
        property: PropertyId,
        /// Where it was found ("CONNECT", "will properties", ...).
        packet: &'static str,
    },
    /// A property that may appear once appears twice.
    #[error("property {0:?} appears more than once")]
    DuplicateProperty(PropertyId),
    /// A property value outside what the spec allows (e.g. Receive Maximum 0).
    #[error("property {property:?} has invalid value {value}")]
    InvalidPropertyValue {
        /// The property.
        property: PropertyId,
        /// The value received.
        value: u32,
    },
    /// AUTH or other MQTT 5.0-only content in a 3.1.1 connection.
    #[error("{0} does not exist in MQTT 3.1.1")]
    NotInProtocol(PacketType),
}

impl DecodeError {
    /// The MQTT 5.0 reason code to send (CONNACK or DISCONNECT) when closing
    /// a connection because of this error.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            DecodeError::PacketTooLarge { .. } => ReasonCode::PACKET_TOO_LARGE,
            DecodeError::InvalidTopicName(_) => ReasonCode::TOPIC_NAME_INVALID,
            DecodeError::InvalidPropertyValue {
                property: PropertyId::TopicAlias,
                ..
            } => ReasonCode::TOPIC_ALIAS_INVALID,
            DecodeError::InvalidTopicFilter(_) => ReasonCode::TOPIC_FILTER_INVALID,
            DecodeError::UnsupportedProtocolLevel(_) => ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
            DecodeError::ZeroPacketId(_)
            | DecodeError::DuplicateProperty(_)
            | DecodeError::PropertyNotAllowed { .. }
            | DecodeError::InvalidPropertyValue { .. }
            | DecodeError::EmptyPayload(_)
            | DecodeError::NotInProtocol(_)
            | DecodeError::InvalidProtocolName => ReasonCode::PROTOCOL_ERROR,
            _ => ReasonCode::MALFORMED_PACKET,
        }
    }
}

/// Why a packet cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncodeError {
    /// The remaining length would exceed 268,435,455.
    #[error("packet body of {0} bytes exceeds the MQTT maximum")]
    PacketTooLarge(usize),
    /// Binary data longer than 65,535 bytes.
    #[error("binary field of {0} bytes is longer than 65535")]
    BinaryTooLong(usize),
    /// A packet identifier of 0 where a non-zero one is required.
    #[error("{0} needs a non-zero packet identifier")]
    ZeroPacketId(PacketType),
    /// A topic name or filter that breaks the topic rules.
    #[error("invalid topic: {0}")]
    InvalidTopic(TopicError),
    /// SUBSCRIBE or UNSUBSCRIBE without topic filters, SUBACK without codes.
    #[error("{0} needs a non-empty payload")]
    EmptyPayload(PacketType),
    /// MQTT 3.1.1 cannot carry a password without a user name.
    #[error("MQTT 3.1.1 CONNECT cannot carry a password without a user name")]
    PasswordWithoutUsername,
    /// A packet or field that does not exist in the protocol version.
    #[error("{0} cannot be sent in MQTT 3.1.1")]
    NotInProtocol(PacketType),
    /// A property value the spec forbids (e.g. Subscription Identifier 0).
    #[error("property {property:?} cannot carry {value}")]
    InvalidPropertyValue {
        /// The property.
        property: PropertyId,
        /// The value.
        value: u32,
    },
}
