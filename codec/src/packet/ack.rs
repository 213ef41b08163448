//! The acknowledgements (PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK)
//! and the two packets that end or extend a conversation: DISCONNECT and AUTH.

use bytes::{BufMut, BytesMut};

use super::{Body, PacketType, Protocol};
use crate::error::{DecodeError, EncodeError};
use crate::properties::{self, AckProperties, AuthProperties, DisconnectProperties};
use crate::reason::{ReasonCode, ReasonContext};
use crate::wire::Reader;

/// PUBACK, PUBREC, PUBREL and PUBCOMP share one layout: a packet
/// identifier, then (MQTT 5.0) a reason code and properties, both omitted
/// on the wire when they are Success and empty.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PubAck {
    /// The packet identifier acknowledged.
    pub packet_id: u16,
    /// MQTT 5.0 reason code (Success in 3.1.1).
    pub reason_code: ReasonCode,
    /// MQTT 5.0 properties.
    pub properties: AckProperties,
}

/// PUBREC: the same layout as [`PubAck`].
pub type PubRec = PubAck;
/// PUBREL: the same layout as [`PubAck`].
pub type PubRel = PubAck;
/// PUBCOMP: the same layout as [`PubAck`].
pub type PubComp = PubAck;

fn read_reason(r: &mut Reader, context: ReasonContext) -> Result<ReasonCode, DecodeError> {
    let code = ReasonCode(r.u8()?);
    if code.is_valid_for(context) {
        Ok(code)
    } else {
        Err(DecodeError::InvalidReasonCode {
            packet: r.packet(),
            code: code.0,
        })
    }
}

impl PubAck {
    /// An acknowledgement with reason Success and no properties.
    pub fn new(packet_id: u16) -> Self {
        PubAck {
            packet_id,
            ..PubAck::default()
        }
    }

    pub(crate) fn decode(r: &mut Reader, protocol: Protocol) -> Result<Self, DecodeError> {
        let context = match r.packet() {
            PacketType::PubRel | PacketType::PubComp => ReasonContext::PubRel,
            _ => ReasonContext::PubAck,
        };
        let packet_id = r.packet_id()?;
        let mut ack = PubAck::new(packet_id);
        if protocol == Protocol::V5 && !r.is_empty() {
            ack.reason_code = read_reason(r, context)?;
            if !r.is_empty() {
                ack.properties = properties::decode(r)?;
            }
        }
        r.finish()?;
        Ok(ack)
    }
}

impl Body for PubAck {
    fn sizes(&self, protocol: Protocol) -> Result<(usize, [usize; 2]), EncodeError> {
        if self.packet_id == 0 {
            return Err(EncodeError::ZeroPacketId(PacketType::PubAck));
        }
        if protocol == Protocol::V311 {
            return Ok((2, [0; 2]));
        }
        let props = properties::encoded_len(&self.properties)?;
        let len = if props > 0 {
            3 + properties::block_len(props)
        } else if self.reason_code != ReasonCode::SUCCESS {
            3
        } else {
            2
        };
        Ok((len, [props, 0]))
    }

    fn write(&self, protocol: Protocol, props: [usize; 2], buf: &mut BytesMut) {
        buf.put_u16(self.packet_id);
        if protocol == Protocol::V311 {
            return;
        }
        if props[0] > 0 || self.reason_code != ReasonCode::SUCCESS {
            buf.put_u8(self.reason_code.0);
        }
        if props[0] > 0 {
            properties::encode(&self.properties, props[0], buf);
        }
    }
}

/// Reads the rest of a SUBACK or UNSUBACK: one reason code per byte.
fn read_codes(
    r: &mut Reader,
    protocol: Protocol,
    context: ReasonContext,
) -> Result<Vec<ReasonCode>, DecodeError> {
    let mut codes = Vec::with_capacity(r.remaining());
    while !r.is_empty() {
        let code = ReasonCode(r.u8()?);
        let valid = match protocol {
            // 3.1.1 SUBACK return codes: granted QoS 0-2 or 0x80 failure.
            Protocol::V311 => matches!(code.0, 0 | 1 | 2 | 0x80),
            Protocol::V5 => code.is_valid_for(context),
        };
        if !valid {
            return Err(DecodeError::InvalidReasonCode {
                packet: r.packet(),
                code: code.0,
            });
        }
        codes.push(code);
    }
    if codes.is_empty() {
        return Err(DecodeError::EmptyPayload(r.packet()));
    }
    Ok(codes)
}

/// SUBACK: one reason code per topic filter of the SUBSCRIBE, in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubAck {
    /// The SUBSCRIBE's packet identifier.
    pub packet_id: u16,
    /// Granted QoS (0x00-0x02) or a failure (0x80 and above; 3.1.1 gets 0x80
    /// for every failure).
    pub reason_codes: Vec<ReasonCode>,
    /// MQTT 5.0 properties.
    pub properties: AckProperties,
}

impl SubAck {
    pub(crate) fn decode(r: &mut Reader, protocol: Protocol) -> Result<Self, DecodeError> {
        let packet_id = r.packet_id()?;
        let properties = match protocol {
            Protocol::V5 => properties::decode(r)?,
            Protocol::V311 => AckProperties::default(),
        };
        let reason_codes = read_codes(r, protocol, ReasonContext::SubAck)?;
        Ok(SubAck {
            packet_id,
            reason_codes,
            properties,
        })
    }
}

impl Body for SubAck {
    fn sizes(&self, protocol: Protocol) -> Result<(usize, [usize; 2]), EncodeError> {
        if self.packet_id == 0 {
            return Err(EncodeError::ZeroPacketId(PacketType::SubAck));
        }
        if self.reason_codes.is_empty() {
            return Err(EncodeError::EmptyPayload(PacketType::SubAck));
        }
        let mut len = 2 + self.reason_codes.len();
        let mut props = 0;
        if protocol == Protocol::V5 {
            props = properties::encoded_len(&self.properties)?;
            len += properties::block_len(props);
        }
        Ok((len, [props, 0]))
    }

    fn write(&self, protocol: Protocol, props: [usize; 2], buf: &mut BytesMut) {
        buf.put_u16(self.packet_id);
        match protocol {
            Protocol::V5 => {
                properties::encode(&self.properties, props[0], buf);
                for code in &self.reason_codes {
                    buf.put_u8(code.0);
                }
            }
            Protocol::V311 => {
                for code in &self.reason_codes {
                    buf.put_u8(if code.is_error() { 0x80 } else { code.0 });
                }
            }
        }
    }
}

/// UNSUBACK. MQTT 3.1.1 carries only the packet identifier; 5.0 adds one
/// reason code per topic filter.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnsubAck {
    /// The UNSUBSCRIBE's packet identifier.
    pub packet_id: u16,
    /// MQTT 5.0 reason codes, one per topic filter (empty in 3.1.1).
    pub reason_codes: Vec<ReasonCode>,
    /// MQTT 5.0 properties.
    pub properties: AckProperties,
}

impl UnsubAck {
    pub(crate) fn decode(r: &mut Reader, protocol: Protocol) -> Result<Self, DecodeError> {
        let packet_id = r.packet_id()?;
        match protocol {
            Protocol::V311 => {
                r.finish()?;
                Ok(UnsubAck {
                    packet_id,
                    ..UnsubAck::default()
                })
            }
            Protocol::V5 => {
                let properties = properties::decode(r)?;
                let reason_codes = read_codes(r, protocol, ReasonContext::UnsubAck)?;
                Ok(UnsubAck {
                    packet_id,
                    reason_codes,
                    properties,
                })
            }
        }
    }
}

impl Body for UnsubAck {
    fn sizes(&self, protocol: Protocol) -> Result<(usize, [usize; 2]), EncodeError> {
        if self.packet_id == 0 {
            return Err(EncodeError::ZeroPacketId(PacketType::UnsubAck));
        }
        match protocol {
            Protocol::V311 => Ok((2, [0; 2])),
            Protocol::V5 => {
                if self.reason_codes.is_empty() {
                    return Err(EncodeError::EmptyPayload(PacketType::UnsubAck));
                }
                let props = properties::encoded_len(&self.properties)?;
                Ok((
                    2 + properties::block_len(props) + self.reason_codes.len(),
                    [props, 0],
                ))
            }
        }
    }

    fn write(&self, protocol: Protocol, props: [usize; 2], buf: &mut BytesMut) {
        buf.put_u16(self.packet_id);
        if protocol == Protocol::V5 {
            properties::encode(&self.properties, props[0], buf);
            for code in &self.reason_codes {
                buf.put_u8(code.0);
            }
        }
    }
}

/// DISCONNECT, sent by either side in MQTT 5.0 (by the client only in 3.1.1).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Disconnect {
    /// MQTT 5.0 reason code (Normal disconnection in 3.1.1).
    pub reason_code: ReasonCode,
    /// MQTT 5.0 properties.
    pub properties: DisconnectProperties,
}

impl Disconnect {
    /// A DISCONNECT with the given reason and no properties.
    pub fn new(reason_code: ReasonCode) -> Self {
        Disconnect {
            reason_code,
            properties: DisconnectProperties::default(),
        }
    }

    pub(crate) fn decode(r: &mut Reader, protocol: Protocol) -> Result<Self, DecodeError> {
        let mut disconnect = Disconnect::default();
        if protocol == Protocol::V5 && !r.is_empty() {
            disconnect.reason_code = read_reason(r, ReasonContext::Disconnect)?;
            if !r.is_empty() {
                disconnect.properties = properties::decode(r)?;
            }
        }
        r.finish()?;
        Ok(disconnect)
    }
}

impl Body for Disconnect {
    fn sizes(&self, protocol: Protocol) -> Result<(usize, [usize; 2]), EncodeError> {
        if protocol == Protocol::V311 {
            return Ok((0, [0; 2]));
        }
        let props = properties::encoded_len(&self.properties)?;
        let len = if props > 0 {
            1 + properties::block_len(props)
        } else if self.reason_code != ReasonCode::NORMAL_DISCONNECTION {
            1
        } else {
            0
        };
        Ok((len, [props, 0]))
    }

    fn write(&self, protocol: Protocol, props: [usize; 2], buf: &mut BytesMut) {
        if protocol == Protocol::V311 {
            return;
        }
        if props[0] > 0 || self.reason_code != ReasonCode::NORMAL_DISCONNECTION {
            buf.put_u8(self.reason_code.0);
        }
        if props[0] > 0 {
            properties::encode(&self.properties, props[0], buf);
        }
    }
}

/// AUTH (MQTT 5.0 only): one step of an enhanced authentication exchange.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Auth {
    /// Success, Continue authentication or Re-authenticate.
    pub reason_code: ReasonCode,
    /// Properties (method, data, reason string, user properties).
    pub properties: AuthProperties,
}

impl Auth {
    pub(crate) fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let mut auth = Auth::default();
        // Unlike DISCONNECT and the publish acknowledgements, AUTH may
        // only drop both fields together (MQTT 5.0 3.15.2.1): a reason
        // code must be followed by a property length.
        if !r.is_empty() {
            auth.reason_code = read_reason(r, ReasonContext::Auth)?;
            auth.properties = properties::decode(r)?;
        }
        r.finish()?;
        Ok(auth)
    }
}

impl Body for Auth {
    fn sizes(&self, _: Protocol) -> Result<(usize, [usize; 2]), EncodeError> {
        let props = properties::encoded_len(&self.properties)?;
        let len = if props > 0 || self.reason_code != ReasonCode::SUCCESS {
            1 + properties::block_len(props)
        } else {
            0
        };
        Ok((len, [props, 0]))
    }

    fn write(&self, _: Protocol, props: [usize; 2], buf: &mut BytesMut) {
        if props[0] > 0 || self.reason_code != ReasonCode::SUCCESS {
            buf.put_u8(self.reason_code.0);
            properties::encode(&self.properties, props[0], buf);
        }
    }
}
