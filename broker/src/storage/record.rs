//! The on-disk format of stored values: a compatibility boundary, so it
//! is versioned, checksummed and small. Every value ends with a CRC-32 of
//! the bytes before it; a value that fails its checksum or does not parse
//! is reported as corrupt (the store skips and counts it).
//!
//! All integers are big-endian. A message is stored as:
//!
//! ```text
//! u8  format version (1)
//! u8  flags: bits 0-1 QoS, bit 2 RETAIN, bit 3 has expiry
//! u64 origin session number
//! u64 expiry instant, broker milliseconds (only with bit 3)
//! u16 topic length, topic
//! MQTT 5.0 property block (variable byte length, properties)
//! u32 payload length, payload
//! ```

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use ferrymq_codec::{MqttString, PublishProperties, QoS, RetainHandling, SubscriptionOptions};

use super::{OutboundPhase, SessionRecord, StoredWill, SubscriptionRecord};
use crate::message::{Message, SessionId};

/// The record format version written today.
const FORMAT: u8 = 1;

/// A value that cannot be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt record: {0}")]
pub struct Corrupt(pub &'static str);

/// Converts between the broker's monotonic clock and stored broker time.
pub trait TimeBase {
    /// Broker milliseconds for an instant.
    fn to_ms(&self, at: tokio::time::Instant) -> u64;
    /// The instant for broker milliseconds.
    fn to_instant(&self, ms: u64) -> tokio::time::Instant;
}

fn seal(mut buf: BytesMut) -> Bytes {
    seal_in_place(&mut buf);
    buf.freeze()
}

/// Appends the CRC of everything in `buf`.
fn seal_in_place(buf: &mut BytesMut) {
    let crc = crc32fast::hash(buf);
    buf.put_u32(crc);
}

/// Checks the trailing CRC and returns the body, sharing `value` (the
/// store hands over what it read, so decoding copies nothing more).
fn open(mut value: Bytes) -> Result<Bytes, Corrupt> {
    let Some(body) = value.len().checked_sub(4) else {
        return Err(Corrupt("shorter than its checksum"));
    };
    let crc = &value[body..];
    let expected = u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32fast::hash(&value[..body]) != expected {
        return Err(Corrupt("checksum mismatch"));
    }
    value.truncate(body);
    Ok(value)
}

/// A cursor over a record body whose reads fail instead of panicking.
pub(crate) struct Cursor(pub(crate) Bytes);

impl Cursor {
    pub(crate) fn need(&self, n: usize) -> Result<(), Corrupt> {
        if self.0.len() < n {
            Err(Corrupt("truncated"))
        } else {
            Ok(())
        }
    }
    pub(crate) fn u8(&mut self) -> Result<u8, Corrupt> {
        self.need(1)?;
        Ok(self.0.get_u8())
    }
    pub(crate) fn u16(&mut self) -> Result<u16, Corrupt> {
        self.need(2)?;
        Ok(self.0.get_u16())
    }
    pub(crate) fn u32(&mut self) -> Result<u32, Corrupt> {
        self.need(4)?;
        Ok(self.0.get_u32())
    }
    pub(crate) fn u64(&mut self) -> Result<u64, Corrupt> {
        self.need(8)?;
        Ok(self.0.get_u64())
    }
    pub(crate) fn bytes(&mut self, n: usize) -> Result<Bytes, Corrupt> {
        self.need(n)?;
        Ok(self.0.split_to(n))
    }
    pub(crate) fn string(&mut self) -> Result<MqttString, Corrupt> {
        let n = usize::from(self.u16()?);
        MqttString::from_bytes(self.bytes(n)?).map_err(|_| Corrupt("invalid string"))
    }
    fn end(&self) -> Result<(), Corrupt> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Corrupt("trailing bytes"))
        }
    }
}

/// Writes `properties` as an MQTT 5 property block. Properties were
/// decoded from a packet (or built by the library user) and encode; if
/// they somehow did not, an empty block is written instead.
pub(crate) fn put_properties(buf: &mut BytesMut, properties: &PublishProperties) {
    let start = buf.len();
    if properties.encode_block(buf).is_err() {
        buf.truncate(start);
        buf.put_u8(0);
    }
}

pub(crate) fn put_string(buf: &mut BytesMut, s: &str) {
    // MqttString guarantees at most 65,535 bytes.
    buf.put_u16(s.len() as u16);
    buf.put_slice(s.as_bytes());
}

fn qos(bits: u8) -> Result<QoS, Corrupt> {
    QoS::from_bits(bits & 0b11).map_err(|_| Corrupt("QoS 3"))
}

fn put_message(buf: &mut BytesMut, m: &Message, time: &dyn TimeBase) {
    let mut flags = m.qos as u8;
    if m.retain {
        flags |= 0b100;
    }
    if m.expires_at.is_some() {
        flags |= 0b1000;
    }
    buf.put_u8(FORMAT);
    buf.put_u8(flags);
    buf.put_u64(m.origin.0);
    if let Some(at) = m.expires_at {
        buf.put_u64(time.to_ms(at));
    }
    put_string(buf, &m.topic);
    put_properties(buf, &m.properties);
    buf.put_u32(m.payload.len() as u32);
    buf.put_slice(&m.payload);
}

fn read_message(c: &mut Cursor, time: &dyn TimeBase) -> Result<Message, Corrupt> {
    if c.u8()? != FORMAT {
        return Err(Corrupt("unknown message format"));
    }
    let flags = c.u8()?;
    let origin = SessionId(c.u64()?);
    let expires_at = if flags & 0b1000 != 0 {
        Some(time.to_instant(c.u64()?))
    } else {
        None
    };
    let topic = c.string()?;
    let (properties, used) =
        PublishProperties::decode_block(&c.0).map_err(|_| Corrupt("invalid properties"))?;
    c.0.advance(used);
    let len = c.u32()? as usize;
    let payload = c.bytes(len)?;
    Ok(Message {
        topic,
        payload,
        qos: qos(flags)?,
        retain: flags & 0b100 != 0,
        properties,
        origin,
        expires_at,
        holders: Default::default(),
    })
}

/// A retained message.
pub fn encode_retained(m: &Message, time: &dyn TimeBase) -> Bytes {
    let mut buf = BytesMut::with_capacity(64 + m.payload.len());
    put_message(&mut buf, m, time);
    seal(buf)
}

/// Reads a retained message.
pub fn decode_retained(value: Bytes, time: &dyn TimeBase) -> Result<Message, Corrupt> {
    let mut c = Cursor(open(value)?);
    let m = read_message(&mut c, time)?;
    c.end()?;
    Ok(m)
}

/// A queued delivery: when it was queued (broker ms), its QoS, RETAIN
/// flag and subscription identifiers, then the message; written into
/// `buf` (cleared first), which the store's writer reuses for every
/// record of a write, so that a record costs no allocation of its own.
pub fn encode_queued(
    buf: &mut BytesMut,
    queued_at_ms: u64,
    qos: QoS,
    retain: bool,
    identifiers: Option<&[u32]>,
    m: &Message,
    time: &dyn TimeBase,
) {
    let ids = identifiers.unwrap_or(&[]);
    buf.clear();
    buf.reserve(88 + m.payload.len() + 4 * ids.len());
    buf.put_u64(queued_at_ms);
    buf.put_u8(qos as u8 | if retain { 0b100 } else { 0 });
    buf.put_u8(ids.len().min(255) as u8);
    for id in ids.iter().take(255) {
        buf.put_u32(*id);
    }
    put_message(buf, m, time);
    seal_in_place(buf);
}

/// A queued delivery as read back.
pub struct Queued {
    /// When it was queued, in broker milliseconds.
    pub queued_at_ms: u64,
    /// Delivery QoS.
    pub qos: QoS,
    /// Delivery RETAIN flag.
    pub retain: bool,
    /// Subscription identifiers.
    pub identifiers: Option<Arc<[u32]>>,
    /// The message.
    pub message: Arc<Message>,
}

impl Queued {
    /// The record of the queue entry at `seq` (the key holds it).
    pub fn at(self, seq: u64) -> super::QueuedRecord {
        super::QueuedRecord {
            seq,
            qos: self.qos,
            retain: self.retain,
            identifiers: self.identifiers,
            message: self.message,
            queued_ms: self.queued_at_ms,
        }
    }
}

/// Reads a queued delivery.
pub fn decode_queued(value: Bytes, time: &dyn TimeBase) -> Result<Queued, Corrupt> {
    let mut c = Cursor(open(value)?);
    let queued_at_ms = c.u64()?;
    let flags = c.u8()?;
    let n = c.u8()?;
    let mut ids = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        ids.push(c.u32()?);
    }
    let message = read_message(&mut c, time)?;
    c.end()?;
    Ok(Queued {
        queued_at_ms,
        qos: qos(flags)?,
        retain: flags & 0b100 != 0,
        identifiers: (!ids.is_empty()).then(|| ids.into()),
        message: Arc::new(message),
    })
}

/// A session: client id, expiry, when it went offline, and a will
/// waiting for its delay.
pub fn encode_session(s: &SessionRecord, time: &dyn TimeBase) -> Bytes {
    let mut buf = BytesMut::with_capacity(64);
    buf.put_u8(FORMAT);
    put_string(&mut buf, &s.client_id);
    buf.put_u32(s.expiry_secs);
    match s.offline_since_ms {
        Some(ms) => {
            buf.put_u8(1);
            buf.put_u64(ms);
        }
        None => buf.put_u8(0),
    }
    match &s.pending_will {
        Some(will) => {
            buf.put_u8(1);
            buf.put_u64(will.due_ms);
            put_message(&mut buf, &will.message, time);
        }
        None => buf.put_u8(0),
    }
    seal(buf)
}

/// Reads a session (its number is the key).
pub fn decode_session(
    number: u64,
    value: Bytes,
    time: &dyn TimeBase,
) -> Result<SessionRecord, Corrupt> {
    let mut c = Cursor(open(value)?);
    if c.u8()? != FORMAT {
        return Err(Corrupt("unknown session format"));
    }
    let client_id = c.string()?;
    let expiry_secs = c.u32()?;
    let offline_since_ms = match c.u8()? {
        0 => None,
        _ => Some(c.u64()?),
    };
    let pending_will = match c.u8()? {
        0 => None,
        _ => {
            let due_ms = c.u64()?;
            let message = Arc::new(read_message(&mut c, time)?);
            Some(StoredWill { message, due_ms })
        }
    };
    c.end()?;
    Ok(SessionRecord {
        client_id,
        number,
        expiry_secs,
        offline_since_ms,
        pending_will,
    })
}

/// A subscription: its options byte (MQTT 5.0 layout) and identifier.
pub fn encode_subscription(s: &SubscriptionRecord) -> Bytes {
    let o = &s.options;
    let mut buf = BytesMut::with_capacity(9);
    buf.put_u8(
        o.qos as u8
            | u8::from(o.no_local) << 2
            | u8::from(o.retain_as_published) << 3
            | (o.retain_handling as u8) << 4,
    );
    buf.put_u32(s.identifier.unwrap_or(0));
    seal(buf)
}

/// Reads a subscription.
pub fn decode_subscription(value: Bytes) -> Result<SubscriptionRecord, Corrupt> {
    let mut c = Cursor(open(value)?);
    let byte = c.u8()?;
    let id = c.u32()?;
    c.end()?;
    let retain_handling = match (byte >> 4) & 0b11 {
        0 => RetainHandling::SendAtSubscribe,
        1 => RetainHandling::SendIfNew,
        _ => RetainHandling::DoNotSend,
    };
    Ok(SubscriptionRecord {
        options: SubscriptionOptions {
            qos: qos(byte)?,
            no_local: byte & 0b100 != 0,
            retain_as_published: byte & 0b1000 != 0,
            retain_handling,
        },
        identifier: (id != 0).then_some(id),
    })
}

/// An outbound exchange: the queue holding the message, its position,
/// and the phase.
pub fn encode_inflight(queue: u64, seq: u64, phase: OutboundPhase) -> Bytes {
    let mut buf = BytesMut::with_capacity(21);
    buf.put_u64(queue);
    buf.put_u64(seq);
    buf.put_u8(match phase {
        OutboundPhase::Sent => 0,
        OutboundPhase::Released => 1,
    });
    seal(buf)
}

/// Reads an outbound exchange.
pub fn decode_inflight(value: Bytes) -> Result<(u64, u64, OutboundPhase), Corrupt> {
    let mut c = Cursor(open(value)?);
    let queue = c.u64()?;
    let seq = c.u64()?;
    let phase = match c.u8()? {
        0 => OutboundPhase::Sent,
        1 => OutboundPhase::Released,
        _ => return Err(Corrupt("unknown phase")),
    };
    c.end()?;
    Ok((queue, seq, phase))
}

/// A shared subscription group: share name and filter.
pub fn encode_group(name: &str, filter: &str) -> Bytes {
    let mut buf = BytesMut::with_capacity(8 + name.len() + filter.len());
    put_string(&mut buf, name);
    put_string(&mut buf, filter);
    seal(buf)
}

/// Reads a shared subscription group.
pub fn decode_group(value: Bytes) -> Result<(MqttString, MqttString), Corrupt> {
    let mut c = Cursor(open(value)?);
    let name = c.string()?;
    let filter = c.string()?;
    c.end()?;
    Ok((name, filter))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::Instant;

    /// Broker time 0 is the base instant.
    struct Base(Instant);

    impl TimeBase for Base {
        fn to_ms(&self, at: Instant) -> u64 {
            at.saturating_duration_since(self.0).as_millis() as u64
        }
        fn to_instant(&self, ms: u64) -> Instant {
            self.0 + Duration::from_millis(ms)
        }
    }

    fn message() -> Message {
        let base = Instant::now();
        let mut properties = PublishProperties::default();
        properties
            .user_properties
            .push((MqttString::from_static("k"), MqttString::from_static("v")));
        properties.content_type = Some(MqttString::from_static("text/plain"));
        Message {
            topic: MqttString::from_static("a/b"),
            payload: Bytes::from_static(b"payload"),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties,
            origin: SessionId(42),
            expires_at: Some(base + Duration::from_millis(1500)),
            holders: Default::default(),
        }
    }

    #[test]
    fn queued_messages_round_trip() {
        let time = Base(Instant::now());
        let mut m = message();
        m.expires_at = Some(time.0 + Duration::from_millis(1500));
        let mut value = BytesMut::from(&b"left over from the record before"[..]);
        encode_queued(
            &mut value,
            77,
            QoS::AtLeastOnce,
            true,
            Some(&[3, 9]),
            &m,
            &time,
        );
        let value = value.freeze();
        let read = value.as_ptr_range();
        let q = decode_queued(value, &time).expect("decodes");
        assert_eq!(q.queued_at_ms, 77);
        assert_eq!((q.qos, q.retain), (QoS::AtLeastOnce, true));
        assert_eq!(q.identifiers.as_deref(), Some(&[3, 9][..]));
        assert_eq!(*q.message, m);
        // What the store read is the message's buffer: nothing copied.
        assert!(read.contains(&q.message.payload.as_ptr()), "payload copied");
        assert!(read.contains(&q.message.topic.as_ptr()), "topic copied");
    }

    #[test]
    fn any_flipped_bit_or_cut_is_detected() {
        let time = Base(Instant::now());
        let value = encode_retained(&message(), &time);
        for i in 0..value.len() {
            let mut bad = value.to_vec();
            bad[i] ^= 0x40;
            assert!(decode_retained(bad.into(), &time).is_err(), "flip at {i}");
        }
        for cut in 0..value.len() {
            assert!(
                decode_retained(value.slice(..cut), &time).is_err(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn sessions_subscriptions_inflight_and_groups_round_trip() {
        let time = Base(Instant::now());
        let mut m = message();
        m.expires_at = None;
        let s = SessionRecord {
            client_id: MqttString::from_static("c"),
            number: 7,
            expiry_secs: 60,
            offline_since_ms: Some(1234),
            pending_will: Some(StoredWill {
                message: Arc::new(m),
                due_ms: 99,
            }),
        };
        assert_eq!(decode_session(7, encode_session(&s, &time), &time), Ok(s));
        let sub = SubscriptionRecord {
            options: SubscriptionOptions {
                qos: QoS::ExactlyOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: RetainHandling::DoNotSend,
            },
            identifier: Some(77),
        };
        assert_eq!(decode_subscription(encode_subscription(&sub)), Ok(sub));
        assert_eq!(
            decode_inflight(encode_inflight(5, 6, OutboundPhase::Released)),
            Ok((5, 6, OutboundPhase::Released))
        );
        let (name, filter) = decode_group(encode_group("g", "a/#")).expect("decodes");
        assert_eq!((name.as_str(), filter.as_str()), ("g", "a/#"));
    }
}
