//! PUBLISH (3.3).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{Body, PacketType, Protocol, QoS};
use crate::error::{DecodeError, EncodeError, TopicError};
use crate::properties::{self, PublishProperties};
use crate::string::MqttString;
use crate::topic;
use crate::wire::{self, Reader};

/// PUBLISH: an application message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Publish {
    /// DUP: this may be a re-delivery. Never set at QoS 0 (decoding refuses
    /// it, encoding leaves it out).
    pub dup: bool,
    /// QoS level.
    pub qos: QoS,
    /// RETAIN.
    pub retain: bool,
    /// Topic Name. Empty only in MQTT 5.0 with a Topic Alias.
    pub topic: MqttString,
    /// Packet Identifier: non-zero at QoS 1 and 2, 0 (absent) at QoS 0.
    pub packet_id: u16,
    /// The payload, shared with the buffer it was decoded from.
    pub payload: Bytes,
    /// MQTT 5.0 properties.
    pub properties: PublishProperties,
}

impl Publish {
    /// Decodes a PUBLISH from its whole frame, the fixed header's
    /// `header_len` bytes included. The topic (and any string property)
    /// shares the frame, and the payload is the frame itself moved past
    /// everything before it: decoding adds one reference to the buffer,
    /// not one per part.
    pub(crate) fn decode(
        flags: u8,
        mut frame: Bytes,
        header_len: usize,
        protocol: Protocol,
    ) -> Result<Self, DecodeError> {
        let qos = QoS::from_bits((flags >> 1) & 0b11)?;
        let dup = flags & 0b1000 != 0;
        if dup && qos == QoS::AtMostOnce {
            // [MQTT-3.3.1-2]: DUP must be 0 for QoS 0.
            return Err(DecodeError::InvalidFlags {
                packet: PacketType::Publish,
                flags,
            });
        }
        let (topic, packet_id, properties, payload_at) = {
            let mut r = Reader::new(&frame[header_len..], Some(&frame), PacketType::Publish);
            let topic = r.string()?;
            let packet_id = match qos {
                QoS::AtMostOnce => 0,
                _ => r.packet_id()?,
            };
            let properties = match protocol {
                Protocol::V5 => properties::decode(&mut r)?,
                Protocol::V311 => PublishProperties::default(),
            };
            (topic, packet_id, properties, frame.len() - r.remaining())
        };
        check_topic(&topic, &properties, protocol).map_err(DecodeError::InvalidTopicName)?;
        frame.advance(payload_at);
        Ok(Publish {
            dup,
            qos,
            retain: flags & 1 != 0,
            topic,
            packet_id,
            payload: frame,
            properties,
        })
    }

    /// The same packet with borrowed parts, to encode.
    pub fn as_ref(&self) -> PublishRef<'_> {
        PublishRef {
            dup: self.dup,
            qos: self.qos,
            retain: self.retain,
            topic: &self.topic,
            packet_id: self.packet_id,
            payload: &self.payload,
            properties: &self.properties,
        }
    }

    /// Appends the encoded packet to `buf`, returning its size. For MQTT
    /// 3.1.1 the properties are left out.
    pub fn encode(&self, protocol: Protocol, buf: &mut BytesMut) -> Result<usize, EncodeError> {
        self.as_ref().encode(protocol, buf)
    }

    /// The encoded size, fixed header included.
    pub fn encoded_len(&self, protocol: Protocol) -> Result<usize, EncodeError> {
        self.as_ref().encoded_len(protocol)
    }
}

/// A PUBLISH to encode from borrowed parts. A broker sending one message
/// to many subscribers encodes each copy from the one stored message,
/// without cloning its topic and payload for every copy (each clone is an
/// atomic update of a reference count that every copy shares).
#[derive(Debug, Clone, Copy)]
pub struct PublishRef<'a> {
    /// DUP (left out at QoS 0).
    pub dup: bool,
    /// QoS level.
    pub qos: QoS,
    /// RETAIN.
    pub retain: bool,
    /// Topic Name. Empty only in MQTT 5.0 with a Topic Alias.
    pub topic: &'a str,
    /// Packet Identifier: non-zero at QoS 1 and 2, ignored at QoS 0.
    pub packet_id: u16,
    /// The payload.
    pub payload: &'a [u8],
    /// MQTT 5.0 properties.
    pub properties: &'a PublishProperties,
}

impl PublishRef<'_> {
    /// The first byte of the fixed header.
    fn first_byte(&self) -> u8 {
        (PacketType::Publish as u8) << 4
            | u8::from(self.dup && self.qos != QoS::AtMostOnce) << 3
            | (self.qos as u8) << 1
            | u8::from(self.retain)
    }

    /// Appends the encoded packet to `buf`, returning its size. For MQTT
    /// 3.1.1 the properties are left out.
    pub fn encode(&self, protocol: Protocol, buf: &mut BytesMut) -> Result<usize, EncodeError> {
        super::encode_body(self.first_byte(), self, protocol, buf)
    }

    /// The encoded size, fixed header included.
    pub fn encoded_len(&self, protocol: Protocol) -> Result<usize, EncodeError> {
        super::body_len(self, protocol)
    }
}

/// The topic must be a valid topic name; MQTT 5.0 allows it to be empty
/// when a Topic Alias stands for it.
fn check_topic(
    topic: &str,
    properties: &PublishProperties,
    protocol: Protocol,
) -> Result<(), TopicError> {
    if topic.is_empty() && protocol == Protocol::V5 && properties.topic_alias.is_some() {
        return Ok(());
    }
    topic::validate_topic_name(topic)
}

impl Body for PublishRef<'_> {
    fn sizes(&self, protocol: Protocol) -> Result<(usize, [usize; 2]), EncodeError> {
        check_topic(self.topic, self.properties, protocol).map_err(EncodeError::InvalidTopic)?;
        if self.qos != QoS::AtMostOnce && self.packet_id == 0 {
            return Err(EncodeError::ZeroPacketId(PacketType::Publish));
        }
        let mut len = 2 + self.topic.len() + self.payload.len();
        if self.qos != QoS::AtMostOnce {
            len += 2;
        }
        let mut props = 0;
        if protocol == Protocol::V5 {
            properties::check_response_topic(&self.properties.response_topic)?;
            props = properties::encoded_len(self.properties)?;
            len += properties::block_len(props);
        }
        Ok((len, [props, 0]))
    }

    fn write(&self, protocol: Protocol, props: [usize; 2], buf: &mut BytesMut) {
        wire::put_string(buf, self.topic);
        if self.qos != QoS::AtMostOnce {
            buf.put_u16(self.packet_id);
        }
        if protocol == Protocol::V5 {
            properties::encode(self.properties, props[0], buf);
        }
        buf.put_slice(self.payload);
    }
}
