//! The control packets (spec chapter 3), the fixed header, and the
//! [`decode`] / [`Packet::encode`] entry points.

mod ack;
mod connect;
mod publish;
mod subscribe;

use std::fmt;

use bytes::{Buf, BufMut, BytesMut};

use crate::error::{DecodeError, EncodeError};
use crate::wire::{self, MAX_VARINT, Reader};

pub use ack::{Auth, Disconnect, PubAck, PubComp, PubRec, PubRel, SubAck, UnsubAck};
pub use connect::{ConnAck, Connect, Will};
pub use publish::{Publish, PublishRef};
pub use subscribe::{RetainHandling, Subscribe, Subscription, SubscriptionOptions, Unsubscribe};

/// The protocol version of a connection, fixed by its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// MQTT 3.1.1 (protocol level 4).
    V311,
    /// MQTT 5.0 (protocol level 5).
    V5,
}

impl Protocol {
    /// The protocol level byte of CONNECT.
    pub fn level(self) -> u8 {
        match self {
            Protocol::V311 => 4,
            Protocol::V5 => 5,
        }
    }
}

/// Quality of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[repr(u8)]
pub enum QoS {
    /// 0: at most once.
    #[default]
    AtMostOnce = 0,
    /// 1: at least once.
    AtLeastOnce = 1,
    /// 2: exactly once.
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS for a two-bit field; 3 is an error.
    pub fn from_bits(bits: u8) -> Result<QoS, DecodeError> {
        match bits {
            0 => Ok(QoS::AtMostOnce),
            1 => Ok(QoS::AtLeastOnce),
            2 => Ok(QoS::ExactlyOnce),
            _ => Err(DecodeError::InvalidQos),
        }
    }
}

/// The packet types of the fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
#[allow(missing_docs)]
pub enum PacketType {
    Connect = 1,
    ConnAck = 2,
    Publish = 3,
    PubAck = 4,
    PubRec = 5,
    PubRel = 6,
    PubComp = 7,
    Subscribe = 8,
    SubAck = 9,
    Unsubscribe = 10,
    UnsubAck = 11,
    PingReq = 12,
    PingResp = 13,
    Disconnect = 14,
    Auth = 15,
}

impl PacketType {
    fn from_nibble(nibble: u8) -> Option<PacketType> {
        use PacketType as T;
        Some(match nibble {
            1 => T::Connect,
            2 => T::ConnAck,
            3 => T::Publish,
            4 => T::PubAck,
            5 => T::PubRec,
            6 => T::PubRel,
            7 => T::PubComp,
            8 => T::Subscribe,
            9 => T::SubAck,
            10 => T::Unsubscribe,
            11 => T::UnsubAck,
            12 => T::PingReq,
            13 => T::PingResp,
            14 => T::Disconnect,
            15 => T::Auth,
            _ => return None,
        })
    }

    /// The fixed-header flags every packet but PUBLISH must carry.
    fn required_flags(self) -> u8 {
        match self {
            PacketType::PubRel | PacketType::Subscribe | PacketType::Unsubscribe => 0b0010,
            _ => 0,
        }
    }

    /// The first byte of the fixed header, for packets with fixed flags.
    pub(crate) fn first_byte(self) -> u8 {
        (self as u8) << 4 | self.required_flags()
    }
}

impl fmt::Display for PacketType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            PacketType::Connect => "CONNECT",
            PacketType::ConnAck => "CONNACK",
            PacketType::Publish => "PUBLISH",
            PacketType::PubAck => "PUBACK",
            PacketType::PubRec => "PUBREC",
            PacketType::PubRel => "PUBREL",
            PacketType::PubComp => "PUBCOMP",
            PacketType::Subscribe => "SUBSCRIBE",
            PacketType::SubAck => "SUBACK",
            PacketType::Unsubscribe => "UNSUBSCRIBE",
            PacketType::UnsubAck => "UNSUBACK",
            PacketType::PingReq => "PINGREQ",
            PacketType::PingResp => "PINGRESP",
            PacketType::Disconnect => "DISCONNECT",
            PacketType::Auth => "AUTH",
        };
        f.write_str(name)
    }
}

/// An MQTT control packet, in either protocol version.
///
/// The version-specific parts (properties, reason codes) are always
/// present in the structs; encoding for MQTT 3.1.1 leaves out what 3.1.1
/// cannot carry, and decoding 3.1.1 leaves them at their defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Packet {
    Connect(Box<Connect>),
    ConnAck(Box<ConnAck>),
    Publish(Publish),
    PubAck(PubAck),
    PubRec(PubRec),
    PubRel(PubRel),
    PubComp(PubComp),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    Auth(Auth),
}

/// Encoding of one packet body: sizes first (checking everything that
/// can fail), then an infallible write of exactly that many bytes.
pub(crate) trait Body {
    /// Body length and up to two property-block lengths to reuse in `write`.
    fn sizes(&self, protocol: Protocol) -> Result<(usize, [usize; 2]), EncodeError>;
    /// Writes the body; `props` as returned by `sizes`.
    fn write(&self, protocol: Protocol, props: [usize; 2], buf: &mut BytesMut);
}

pub(crate) fn encode_body(
    first_byte: u8,
    body: &impl Body,
    protocol: Protocol,
    buf: &mut BytesMut,
) -> Result<usize, EncodeError> {
    let (len, props) = body.sizes(protocol)?;
    if len > MAX_VARINT as usize {
        return Err(EncodeError::PacketTooLarge(len));
    }
    let total = 1 + wire::varint_len(len) + len;
    buf.reserve(total);
    let start = buf.len();
    buf.put_u8(first_byte);
    wire::put_varint(buf, len);
    body.write(protocol, props, buf);
    debug_assert_eq!(buf.len() - start, total, "sizes() disagrees with write()");
    Ok(total)
}

pub(crate) fn body_len(body: &impl Body, protocol: Protocol) -> Result<usize, EncodeError> {
    let (len, _) = body.sizes(protocol)?;
    if len > MAX_VARINT as usize {
        return Err(EncodeError::PacketTooLarge(len));
    }
    Ok(1 + wire::varint_len(len) + len)
}

/// A body-less packet (PINGREQ, PINGRESP).
struct Empty;

impl Body for Empty {
    fn sizes(&self, _: Protocol) -> Result<(usize, [usize; 2]), EncodeError> {
        Ok((0, [0; 2]))
    }
    fn write(&self, _: Protocol, _: [usize; 2], _: &mut BytesMut) {}
}

impl Packet {
    /// The packet's type.
    pub fn packet_type(&self) -> PacketType {
        match self {
            Packet::Connect(_) => PacketType::Connect,
            Packet::ConnAck(_) => PacketType::ConnAck,
            Packet::Publish(_) => PacketType::Publish,
            Packet::PubAck(_) => PacketType::PubAck,
            Packet::PubRec(_) => PacketType::PubRec,
            Packet::PubRel(_) => PacketType::PubRel,
            Packet::PubComp(_) => PacketType::PubComp,
            Packet::Subscribe(_) => PacketType::Subscribe,
            Packet::SubAck(_) => PacketType::SubAck,
            Packet::Unsubscribe(_) => PacketType::Unsubscribe,
            Packet::UnsubAck(_) => PacketType::UnsubAck,
            Packet::PingReq => PacketType::PingReq,
            Packet::PingResp => PacketType::PingResp,
            Packet::Disconnect(_) => PacketType::Disconnect,
            Packet::Auth(_) => PacketType::Auth,
        }
    }

    /// Appends the encoded packet to `buf`, returning its size in bytes.
    /// CONNECT is encoded in its own `protocol` field's version.
    pub fn encode(&self, protocol: Protocol, buf: &mut BytesMut) -> Result<usize, EncodeError> {
        let ty = self.packet_type();
        match self {
            Packet::Connect(p) => encode_body(ty.first_byte(), p.as_ref(), p.protocol, buf),
            Packet::ConnAck(p) => encode_body(ty.first_byte(), p.as_ref(), protocol, buf),
            Packet::Publish(p) => p.encode(protocol, buf),
            Packet::PubAck(p) | Packet::PubRec(p) | Packet::PubRel(p) | Packet::PubComp(p) => {
                encode_body(ty.first_byte(), p, protocol, buf)
            }
            Packet::Subscribe(p) => encode_body(ty.first_byte(), p, protocol, buf),
            Packet::SubAck(p) => encode_body(ty.first_byte(), p, protocol, buf),
            Packet::Unsubscribe(p) => encode_body(ty.first_byte(), p, protocol, buf),
            Packet::UnsubAck(p) => encode_body(ty.first_byte(), p, protocol, buf),
            Packet::PingReq | Packet::PingResp => {
                encode_body(ty.first_byte(), &Empty, protocol, buf)
            }
            Packet::Disconnect(p) => encode_body(ty.first_byte(), p, protocol, buf),
            Packet::Auth(p) => match protocol {
                Protocol::V311 => Err(EncodeError::NotInProtocol(PacketType::Auth)),
                Protocol::V5 => encode_body(ty.first_byte(), p, protocol, buf),
            },
        }
    }

    /// The size [`Packet::encode`] would produce, fixed header included:
    /// what a Maximum Packet Size is compared with.
    pub fn encoded_len(&self, protocol: Protocol) -> Result<usize, EncodeError> {
        match self {
            Packet::Connect(p) => body_len(p.as_ref(), p.protocol),
            Packet::ConnAck(p) => body_len(p.as_ref(), protocol),
            Packet::Publish(p) => p.encoded_len(protocol),
            Packet::PubAck(p) | Packet::PubRec(p) | Packet::PubRel(p) | Packet::PubComp(p) => {
                body_len(p, protocol)
            }
            Packet::Subscribe(p) => body_len(p, protocol),
            Packet::SubAck(p) => body_len(p, protocol),
            Packet::Unsubscribe(p) => body_len(p, protocol),
            Packet::UnsubAck(p) => body_len(p, protocol),
            Packet::PingReq | Packet::PingResp => Ok(2),
            Packet::Disconnect(p) => body_len(p, protocol),
            Packet::Auth(p) => match protocol {
                Protocol::V311 => Err(EncodeError::NotInProtocol(PacketType::Auth)),
                Protocol::V5 => body_len(p, protocol),
            },
        }
    }
}

/// What the fixed header says about the packet at the front of a buffer.
struct FixedHeader {
    packet_type: PacketType,
    flags: u8,
    /// Bytes of the fixed header itself (2 to 5).
    header_len: usize,
    /// The remaining length: bytes of the body.
    body_len: usize,
}

/// Reads the fixed header, or `Ok(None)` while it is incomplete.
fn fixed_header(buf: &[u8], protocol: Protocol) -> Result<Option<FixedHeader>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let nibble = first >> 4;
    let packet_type = match PacketType::from_nibble(nibble) {
        Some(PacketType::Auth) if protocol == Protocol::V311 => {
            return Err(DecodeError::ReservedPacketType(nibble));
        }
        Some(t) => t,
        None => return Err(DecodeError::ReservedPacketType(nibble)),
    };
    let mut body_len = 0usize;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        body_len |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            if byte == 0 && i > 0 {
                break;
            }
            return Ok(Some(FixedHeader {
                packet_type,
                flags: first & 0x0F,
                header_len: 2 + i,
                body_len,
            }));
        }
    }
    Err(DecodeError::MalformedRemainingLength)
}

/// Decodes the packet at the front of `buf`, removing its bytes.
///
/// Returns `Ok(None)` while the packet is incomplete (leaving `buf` as it
/// is; call again when more bytes arrived). A packet whose size exceeds
/// `max_packet_size` is refused as soon as its fixed header is read, so a
/// peer cannot make the receiver buffer it. `protocol` is the connection's
/// version; CONNECT is decoded in the version it announces itself.
///
/// On error the connection must be closed: the stream position is lost.
pub fn decode(
    buf: &mut BytesMut,
    protocol: Protocol,
    max_packet_size: u32,
) -> Result<Option<Packet>, DecodeError> {
    let Some(header) = fixed_header(buf, protocol)? else {
        return Ok(None);
    };
    let total = header.header_len + header.body_len;
    if total as u64 > u64::from(max_packet_size) {
        return Err(DecodeError::PacketTooLarge {
            size: total as u64,
            max: max_packet_size,
        });
    }
    if buf.len() < total {
        // Nothing is reserved for the declared size: a peer announcing a
        // large packet gets buffer space only as its bytes arrive.
        return Ok(None);
    }
    let ty = header.packet_type;
    if ty != PacketType::Publish && header.flags != ty.required_flags() {
        return Err(DecodeError::InvalidFlags {
            packet: ty,
            flags: header.flags,
        });
    }
    // One reader over the body; PUBLISH does not use it: it takes its
    // frame out of `buf` instead, so that its payload keeps sharing the
    // receive buffer.
    let mut r = Reader::new(&buf[header.header_len..total], None, ty);
    let packet = match ty {
        PacketType::Publish => {
            let frame = buf.split_to(total).freeze();
            let publish = Publish::decode(header.flags, frame, header.header_len, protocol)?;
            return Ok(Some(Packet::Publish(publish)));
        }
        PacketType::Connect => Packet::Connect(Box::new(Connect::decode(&mut r)?)),
        PacketType::ConnAck => Packet::ConnAck(Box::new(ConnAck::decode(&mut r, protocol)?)),
        PacketType::PubAck => Packet::PubAck(PubAck::decode(&mut r, protocol)?),
        PacketType::PubRec => Packet::PubRec(PubAck::decode(&mut r, protocol)?),
        PacketType::PubRel => Packet::PubRel(PubAck::decode(&mut r, protocol)?),
        PacketType::PubComp => Packet::PubComp(PubAck::decode(&mut r, protocol)?),
        PacketType::Subscribe => Packet::Subscribe(Subscribe::decode(&mut r, protocol)?),
        PacketType::SubAck => Packet::SubAck(SubAck::decode(&mut r, protocol)?),
        PacketType::Unsubscribe => Packet::Unsubscribe(Unsubscribe::decode(&mut r, protocol)?),
        PacketType::UnsubAck => Packet::UnsubAck(UnsubAck::decode(&mut r, protocol)?),
        PacketType::PingReq => {
            r.finish()?;
            Packet::PingReq
        }
        PacketType::PingResp => {
            r.finish()?;
            Packet::PingResp
        }
        PacketType::Disconnect => Packet::Disconnect(Disconnect::decode(&mut r, protocol)?),
        PacketType::Auth => Packet::Auth(Auth::decode(&mut r)?),
    };
    buf.advance(total);
    Ok(Some(packet))
}
