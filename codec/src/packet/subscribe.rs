//! SUBSCRIBE (3.8) and UNSUBSCRIBE (3.10).

use bytes::{BufMut, BytesMut};

use super::{Body, PacketType, Protocol, QoS};
use crate::error::{DecodeError, EncodeError};
use crate::properties::{self, SubscribeProperties, UnsubscribeProperties};
use crate::string::MqttString;
use crate::topic;
use crate::wire::{self, Reader};

/// Retain Handling (MQTT 5.0 subscription option).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RetainHandling {
    /// 0: send retained messages at the time of the subscribe.
    #[default]
    SendAtSubscribe,
    /// 1: send them only if the subscription did not exist.
    SendIfNew,
    /// 2: do not send them.
    DoNotSend,
}

/// The options byte of one subscription. MQTT 3.1.1 has only the QoS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SubscriptionOptions {
    /// Maximum QoS.
    pub qos: QoS,
    /// No Local (5.0): do not send the subscriber its own messages.
    pub no_local: bool,
    /// Retain As Published (5.0): keep the RETAIN flag of forwarded messages.
    pub retain_as_published: bool,
    /// Retain Handling (5.0).
    pub retain_handling: RetainHandling,
}

impl SubscriptionOptions {
    fn decode(byte: u8, protocol: Protocol) -> Result<Self, DecodeError> {
        let reserved = match protocol {
            Protocol::V311 => 0b1111_1100,
            Protocol::V5 => 0b1100_0000,
        };
        if byte & reserved != 0 {
            return Err(DecodeError::InvalidSubscriptionOptions(byte));
        }
        let retain_handling = match (byte >> 4) & 0b11 {
            0 => RetainHandling::SendAtSubscribe,
            1 => RetainHandling::SendIfNew,
            2 => RetainHandling::DoNotSend,
            _ => return Err(DecodeError::InvalidSubscriptionOptions(byte)),
        };
        Ok(SubscriptionOptions {
            qos: QoS::from_bits(byte & 0b11)?,
            no_local: byte & 0b0100 != 0,
            retain_as_published: byte & 0b1000 != 0,
            retain_handling,
        })
    }

    fn encode(&self, protocol: Protocol) -> u8 {
        let qos = self.qos as u8;
        match protocol {
            Protocol::V311 => qos,
            Protocol::V5 => {
                qos | u8::from(self.no_local) << 2
                    | u8::from(self.retain_as_published) << 3
                    | (self.retain_handling as u8) << 4
            }
        }
    }
}

/// One topic filter of a SUBSCRIBE with its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The topic filter (validated, possibly `$share/{name}/{filter}`).
    pub filter: MqttString,
    /// The options.
    pub options: SubscriptionOptions,
}

/// SUBSCRIBE: one or more topic filters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Packet Identifier (non-zero).
    pub packet_id: u16,
    /// The subscriptions, in order (at least one).
    pub subscriptions: Vec<Subscription>,
    /// MQTT 5.0 properties.
    pub properties: SubscribeProperties,
}

fn check_filters<'a>(
    filters: impl Iterator<Item = &'a MqttString>,
    packet: PacketType,
    packet_id: u16,
) -> Result<(), EncodeError> {
    if packet_id == 0 {
        return Err(EncodeError::ZeroPacketId(packet));
    }
    let mut any = false;
    for filter in filters {
        topic::validate_topic_filter(filter).map_err(EncodeError::InvalidTopic)?;
        any = true;
    }
    if any {
        Ok(())
    } else {
        Err(EncodeError::EmptyPayload(packet))
    }
}

fn read_filter(r: &mut Reader) -> Result<MqttString, DecodeError> {
    let filter = r.string()?;
    topic::validate_topic_filter(&filter).map_err(DecodeError::InvalidTopicFilter)?;
    Ok(filter)
}

impl Subscribe {
    pub(crate) fn decode(r: &mut Reader, protocol: Protocol) -> Result<Self, DecodeError> {
        let packet_id = r.packet_id()?;
        let properties = match protocol {
            Protocol::V5 => properties::decode(r)?,
            Protocol::V311 => SubscribeProperties::default(),
        };
        let mut subscriptions = Vec::new();
        while !r.is_empty() {
            let filter = read_filter(r)?;
            let options = SubscriptionOptions::decode(r.u8()?, protocol)?;
            subscriptions.push(Subscription { filter, options });
        }
        if subscriptions.is_empty() {
            return Err(DecodeError::EmptyPayload(PacketType::Subscribe));
        }
        Ok(Subscribe {
            packet_id,
            subscriptions,
            properties,
        })
    }
}

impl Body for Subscribe {
    fn sizes(&self, protocol: Protocol) -> Result<(usize, [usize; 2]), EncodeError> {
        check_filters(
            self.subscriptions.iter().map(|s| &s.filter),
            PacketType::Subscribe,
            self.packet_id,
        )?;
        let mut len = 2;
        let mut props = 0;
        if protocol == Protocol::V5 {
            props = properties::encoded_len(&self.properties)?;
            len += properties::block_len(props);
        }
        len += self
            .subscriptions
            .iter()
            .map(|s| 3 + s.filter.len())
            .sum::<usize>();
        Ok((len, [props, 0]))
    }

    fn write(&self, protocol: Protocol, props: [usize; 2], buf: &mut BytesMut) {
        buf.put_u16(self.packet_id);
        if protocol == Protocol::V5 {
            properties::encode(&self.properties, props[0], buf);
        }
        for s in &self.subscriptions {
            wire::put_string(buf, &s.filter);
            buf.put_u8(s.options.encode(protocol));
        }
    }
}

/// UNSUBSCRIBE: one or more topic filters to remove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    /// Packet Identifier (non-zero).
    pub packet_id: u16,
    /// The topic filters, in order (at least one).
    pub filters: Vec<MqttString>,
    /// MQTT 5.0 properties.
    pub properties: UnsubscribeProperties,
}

impl Unsubscribe {
    pub(crate) fn decode(r: &mut Reader, protocol: Protocol) -> Result<Self, DecodeError> {
        let packet_id = r.packet_id()?;
        let properties = match protocol {
            Protocol::V5 => properties::decode(r)?,
            Protocol::V311 => UnsubscribeProperties::default(),
        };
        let mut filters = Vec::new();
        while !r.is_empty() {
            filters.push(read_filter(r)?);
        }
        if filters.is_empty() {
            return Err(DecodeError::EmptyPayload(PacketType::Unsubscribe));
        }
        Ok(Unsubscribe {
            packet_id,
            filters,
            properties,
        })
    }
}

impl Body for Unsubscribe {
    fn sizes(&self, protocol: Protocol) -> Result<(usize, [usize; 2]), EncodeError> {
        check_filters(self.filters.iter(), PacketType::Unsubscribe, self.packet_id)?;
        let mut len = 2;
        let mut props = 0;
        if protocol == Protocol::V5 {
            props = properties::encoded_len(&self.properties)?;
            len += properties::block_len(props);
        }
        len += self.filters.iter().map(|f| 2 + f.len()).sum::<usize>();
        Ok((len, [props, 0]))
    }

    fn write(&self, protocol: Protocol, props: [usize; 2], buf: &mut BytesMut) {
        buf.put_u16(self.packet_id);
        if protocol == Protocol::V5 {
            properties::encode(&self.properties, props[0], buf);
        }
        for f in &self.filters {
            wire::put_string(buf, f);
        }
    }
}
