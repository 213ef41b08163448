//! CONNECT (3.1) and CONNACK (3.2).

use bytes::{BufMut, Bytes, BytesMut};

use super::{Body, PacketType, Protocol, QoS};
use crate::error::{DecodeError, EncodeError};
use crate::properties::{self, ConnAckProperties, ConnectProperties, WillProperties};
use crate::reason::{ReasonCode, ReasonContext};
use crate::string::MqttString;
use crate::topic;
use crate::wire::{self, Reader};

/// CONNECT: the first packet of every connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// The protocol version the client speaks.
    pub protocol: Protocol,
    /// Clean Session (3.1.1) / Clean Start (5.0).
    pub clean_start: bool,
    /// Keep Alive in seconds; 0 switches the mechanism off.
    pub keep_alive: u16,
    /// The client identifier; may be empty (the server then assigns one or refuses).
    pub client_id: MqttString,
    /// The will message, if any.
    pub will: Option<Will>,
    /// User Name.
    pub username: Option<MqttString>,
    /// Password (binary data).
    pub password: Option<Bytes>,
    /// MQTT 5.0 properties.
    pub properties: ConnectProperties,
}

/// The will message carried by CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// Will Topic: a topic name.
    pub topic: MqttString,
    /// Will Payload.
    pub payload: Bytes,
    /// Will QoS.
    pub qos: QoS,
    /// Will Retain.
    pub retain: bool,
    /// MQTT 5.0 will properties.
    pub properties: WillProperties,
}

const FLAG_RESERVED: u8 = 0b0000_0001;
const FLAG_CLEAN: u8 = 0b0000_0010;
const FLAG_WILL: u8 = 0b0000_0100;
const FLAG_WILL_RETAIN: u8 = 0b0010_0000;
const FLAG_PASSWORD: u8 = 0b0100_0000;
const FLAG_USERNAME: u8 = 0b1000_0000;

fn bad_flags(flags: u8, reason: &'static str) -> DecodeError {
    DecodeError::InvalidConnectFlags { flags, reason }
}

impl Connect {
    pub(crate) fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let name = r.binary()?;
        let level = r.u8()?;
        if name.as_ref() != b"MQTT" {
            // MQTT 3.1 ("MQIsdp", level 3) is recognised so the server can
            // answer with "unacceptable protocol version" instead of hanging up.
            return Err(if name.as_ref() == b"MQIsdp" {
                DecodeError::UnsupportedProtocolLevel(level)
            } else {
                DecodeError::InvalidProtocolName
            });
        }
        let protocol = match level {
            4 => Protocol::V311,
            5 => Protocol::V5,
            other => return Err(DecodeError::UnsupportedProtocolLevel(other)),
        };
        let flags = r.u8()?;
        if flags & FLAG_RESERVED != 0 {
            return Err(bad_flags(flags, "reserved bit 0 is set"));
        }
        let will_qos = QoS::from_bits((flags >> 3) & 0b11)?;
        let has_will = flags & FLAG_WILL != 0;
        if !has_will && (will_qos != QoS::AtMostOnce || flags & FLAG_WILL_RETAIN != 0) {
            return Err(bad_flags(flags, "will QoS or retain set without a will"));
        }
        if protocol == Protocol::V311 && flags & FLAG_PASSWORD != 0 && flags & FLAG_USERNAME == 0 {
            return Err(bad_flags(flags, "password without user name"));
        }
        let keep_alive = r.u16()?;
        let properties = match protocol {
            Protocol::V5 => properties::decode(r)?,
            Protocol::V311 => ConnectProperties::default(),
        };
        let client_id = r.string()?;
        let will = if has_will {
            let properties = match protocol {
                Protocol::V5 => properties::decode(r)?,
                Protocol::V311 => WillProperties::default(),
            };
            let topic = r.string()?;
            topic::validate_topic_name(&topic).map_err(DecodeError::InvalidTopicName)?;
            let payload = r.binary()?;
            Some(Will {
                topic,
                payload,
                qos: will_qos,
                retain: flags & FLAG_WILL_RETAIN != 0,
                properties,
            })
        } else {
            None
        };
        let username = if flags & FLAG_USERNAME != 0 {
            Some(r.string()?)
        } else {
            None
        };
        let password = if flags & FLAG_PASSWORD != 0 {
            Some(r.binary()?)
        } else {
            None
        };
        r.finish()?;
        Ok(Connect {
            protocol,
            clean_start: flags & FLAG_CLEAN != 0,
            keep_alive,
            client_id,
            will,
            username,
            password,
            properties,
        })
    }

    fn flags(&self) -> u8 {
        let mut flags = 0;
        if self.clean_start {
            flags |= FLAG_CLEAN;
        }
        if let Some(will) = &self.will {
            flags |= FLAG_WILL | (will.qos as u8) << 3;
            if will.retain {
                flags |= FLAG_WILL_RETAIN;
            }
        }
        if self.username.is_some() {
            flags |= FLAG_USERNAME;
        }
        if self.password.is_some() {
            flags |= FLAG_PASSWORD;
        }
        flags
    }
}

impl Body for Connect {
    fn sizes(&self, protocol: Protocol) -> Result<(usize, [usize; 2]), EncodeError> {
        // Protocol name (2 + 4), level, flags, keep alive.
        let mut len = 6 + 1 + 1 + 2 + 2 + self.client_id.len();
        let mut props = [0; 2];
        if protocol == Protocol::V5 {
            props[0] = properties::encoded_len(&self.properties)?;
            len += properties::block_len(props[0]);
        }
        if let Some(will) = &self.will {
            topic::validate_topic_name(&will.topic).map_err(EncodeError::InvalidTopic)?;
            wire::check_binary(&will.payload)?;
            if protocol == Protocol::V5 {
                properties::check_response_topic(&will.properties.response_topic)?;
                props[1] = properties::encoded_len(&will.properties)?;
                len += properties::block_len(props[1]);
            }
            len += 2 + will.topic.len() + 2 + will.payload.len();
        }
        if let Some(username) = &self.username {
            len += 2 + username.len();
        }
        if let Some(password) = &self.password {
            if protocol == Protocol::V311 && self.username.is_none() {
                return Err(EncodeError::PasswordWithoutUsername);
            }
            wire::check_binary(password)?;
            len += 2 + password.len();
        }
        Ok((len, props))
    }

    fn write(&self, protocol: Protocol, props: [usize; 2], buf: &mut BytesMut) {
        wire::put_string(buf, "MQTT");
        buf.put_u8(protocol.level());
        buf.put_u8(self.flags());
        buf.put_u16(self.keep_alive);
        if protocol == Protocol::V5 {
            properties::encode(&self.properties, props[0], buf);
        }
        wire::put_string(buf, &self.client_id);
        if let Some(will) = &self.will {
            if protocol == Protocol::V5 {
                properties::encode(&will.properties, props[1], buf);
            }
            wire::put_string(buf, &will.topic);
            wire::put_binary(buf, &will.payload);
        }
        if let Some(username) = &self.username {
            wire::put_string(buf, username);
        }
        if let Some(password) = &self.password {
            wire::put_binary(buf, password);
        }
    }
}

/// CONNACK: the server's answer to CONNECT.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnAck {
    /// Session Present.
    pub session_present: bool,
    /// The outcome. For MQTT 3.1.1 it is mapped to (and from) the six
    /// 3.1.1 return codes, see [`ReasonCode::to_v3_connack`].
    pub reason_code: ReasonCode,
    /// MQTT 5.0 properties.
    pub properties: ConnAckProperties,
}

impl ConnAck {
    pub(crate) fn decode(r: &mut Reader, protocol: Protocol) -> Result<Self, DecodeError> {
        let flags = r.u8()?;
        if flags & 0xFE != 0 {
            return Err(DecodeError::InvalidConnAckFlags(flags));
        }
        let code = r.u8()?;
        let invalid = DecodeError::InvalidReasonCode {
            packet: PacketType::ConnAck,
            code,
        };
        let (reason_code, properties) = match protocol {
            Protocol::V311 => (
                ReasonCode::from_v3_connack(code).ok_or(invalid)?,
                ConnAckProperties::default(),
            ),
            Protocol::V5 => {
                let reason = ReasonCode(code);
                if !reason.is_valid_for(ReasonContext::ConnAck) {
                    return Err(invalid);
                }
                (reason, properties::decode(r)?)
            }
        };
        r.finish()?;
        Ok(ConnAck {
            session_present: flags & 1 != 0,
            reason_code,
            properties,
        })
    }
}

impl Body for ConnAck {
    fn sizes(&self, protocol: Protocol) -> Result<(usize, [usize; 2]), EncodeError> {
        match protocol {
            Protocol::V311 => Ok((2, [0; 2])),
            Protocol::V5 => {
                let props = properties::encoded_len(&self.properties)?;
                Ok((2 + properties::block_len(props), [props, 0]))
            }
        }
    }

    fn write(&self, protocol: Protocol, props: [usize; 2], buf: &mut BytesMut) {
        buf.put_u8(u8::from(self.session_present));
        match protocol {
            Protocol::V311 => buf.put_u8(self.reason_code.to_v3_connack()),
            Protocol::V5 => {
                buf.put_u8(self.reason_code.0);
                properties::encode(&self.properties, props[0], buf);
            }
        }
    }
}
