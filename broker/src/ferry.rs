//! Ferry batches: how a `kind = "ferrymq"` bridge sends its queue to a
//! ferrymq node that trusts it (`[ferry] trusted_clients`). Many queued
//! messages travel in one MQTT 5 QoS 1 PUBLISH on [`BATCH_TOPIC`], whose
//! payload is a compressed frame of records (id, topic, flags,
//! properties, payload); the receiver routes every record as if it had
//! come alone (de-duplicated by its id) and acknowledges the PUBLISH once
//! all of them are durable. The bridge asks for batches with a CONNECT
//! user property ([`CAPABILITY_PROPERTY`] = [`CAPABILITY`]); a ferrymq
//! node that trusts the client answers with the same in its CONNACK, and
//! any other broker does not, so the bridge sends plain MQTT 5 there.
//!
//! The frame: a format byte (1), the records' encoded length (u32), then
//! the records compressed with zstd (level 3). Records: a count (u32),
//! then per record the id (uuid, queue, epoch, number), a flags byte
//! (QoS, retain), the topic (u16 length), the MQTT 5 property block
//! (without the `ferry-id`, which the id carries) and the payload (u32
//! length). Sans-I/O; the decoder refuses what does not parse, and a frame
//! that would expand beyond its limit (a compression bomb).

use bytes::{BufMut, Bytes, BytesMut};
use ferrymq_codec::{MqttString, PublishProperties, QoS};

use crate::message::{MESSAGE_ID_PROPERTY, MessageId};
use crate::state::STAMP_PROPERTY;
use crate::storage::record::{Cursor, put_properties, put_string};

/// The topic a batch is published on (a `$` topic: no wildcard
/// subscription matches it, and only trusted bridges may publish there).
pub const BATCH_TOPIC: &str = "$ferry/batch";

/// Topics under it are the ferry's own: only a trusted bridge may
/// publish there, and only [`BATCH_TOPIC`].
pub const RESERVED_PREFIX: &str = "$ferry/";

/// The CONNECT / CONNACK user property that asks for / grants batches.
pub const CAPABILITY_PROPERTY: &str = "ferry";

/// Its value: batches in this module's format.
pub const CAPABILITY: &str = "batch-zstd/1";

const FORMAT: u8 = 1;
const LEVEL: i32 = 3;

/// One queued message in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRecord {
    /// Its stable id (none for a QoS 0 message that was never stored).
    pub id: Option<MessageId>,
    /// Its topic.
    pub topic: MqttString,
    /// QoS (0 or 1).
    pub qos: QoS,
    /// RETAIN.
    pub retain: bool,
    /// Its MQTT 5 properties (the `ferry-id` is left out and put back).
    pub properties: PublishProperties,
    /// Its payload.
    pub payload: Bytes,
}

/// Why a frame cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// Not this format, truncated, or a record that does not parse.
    #[error("malformed ferry batch: {0}")]
    Malformed(&'static str),
    /// It would expand beyond the limit.
    #[error("ferry batch larger than {0} bytes once expanded")]
    TooLarge(usize),
}

impl From<crate::storage::record::Corrupt> for BatchError {
    fn from(c: crate::storage::record::Corrupt) -> Self {
        BatchError::Malformed(c.0)
    }
}

/// The encoded size of `record` before compression (for sizing batches).
pub fn record_size(record: &BatchRecord) -> usize {
    16 + 24 + 1 + 2 + record.topic.len() + 64 + 4 + record.payload.len()
}

/// Encodes `records` into one frame.
pub fn encode_batch(records: &[BatchRecord]) -> Bytes {
    let mut raw = BytesMut::with_capacity(records.iter().map(record_size).sum::<usize>() + 4);
    raw.put_u32(u32::try_from(records.len()).unwrap_or(u32::MAX));
    for r in records {
        let id = r.id.unwrap_or(MessageId {
            uuid: [0; 16],
            queue: 0,
            epoch: 0,
            n: 0,
        });
        raw.put_slice(&id.uuid);
        raw.put_u64(id.queue);
        raw.put_u64(id.epoch);
        raw.put_u64(id.n);
        let mut flags = r.qos as u8;
        if r.retain {
            flags |= 0b100;
        }
        if r.id.is_some() {
            flags |= 0b1000;
        }
        raw.put_u8(flags);
        put_string(&mut raw, &r.topic);
        let mut properties = r.properties.clone();
        properties
            .user_properties
            .retain(|(k, _)| k.as_str() != MESSAGE_ID_PROPERTY);
        put_properties(&mut raw, &properties);
        raw.put_u32(u32::try_from(r.payload.len()).unwrap_or(u32::MAX));
        raw.put_slice(&r.payload);
    }
    // One compression context per thread, kept: making one per batch
    // costs more than compressing a small batch.
    thread_local! {
        static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    let compressed = COMPRESSOR
        .with(|cell| {
            let mut cell = cell.borrow_mut();
            if cell.is_none() {
                *cell = zstd::bulk::Compressor::new(LEVEL).ok();
            }
            cell.as_mut().and_then(|c| c.compress(&raw).ok())
        })
        .unwrap_or_default();
    let mut frame = BytesMut::with_capacity(compressed.len() + 5);
    frame.put_u8(FORMAT);
    frame.put_u32(u32::try_from(raw.len()).unwrap_or(u32::MAX));
    frame.put_slice(&compressed);
    frame.freeze()
}

/// Decodes a frame that expands to at most `max_bytes`. Each record gets
/// its id back as a `ferry-id` user property, first.
pub fn decode_batch(frame: &[u8], max_bytes: usize) -> Result<Vec<BatchRecord>, BatchError> {
    let [format, l0, l1, l2, l3, compressed @ ..] = frame else {
        return Err(BatchError::Malformed("shorter than its header"));
    };
    if *format != FORMAT {
        return Err(BatchError::Malformed("unknown format"));
    }
    let len = u32::from_be_bytes([*l0, *l1, *l2, *l3]) as usize;
    if len > max_bytes {
        return Err(BatchError::TooLarge(max_bytes));
    }
    let raw = zstd::bulk::decompress(compressed, len)
        .map_err(|_| BatchError::Malformed("does not decompress"))?;
    if raw.len() != len {
        return Err(BatchError::Malformed("expands to another length"));
    }
    let mut c = Cursor(Bytes::from(raw));
    let count = c.u32()? as usize;
    // Each record takes at least 48 bytes: a count beyond that is a lie.
    if count > len / 48 + 1 {
        return Err(BatchError::Malformed("more records than bytes"));
    }
    let mut records = Vec::with_capacity(count);
    for _ in 0..count {
        let uuid: [u8; 16] = c
            .bytes(16)?
            .as_ref()
            .try_into()
            .map_err(|_| BatchError::Malformed("uuid"))?;
        let id = MessageId {
            uuid,
            queue: c.u64()?,
            epoch: c.u64()?,
            n: c.u64()?,
        };
        let flags = c.u8()?;
        let qos = QoS::from_bits(flags & 0b11).map_err(|_| BatchError::Malformed("QoS 3"))?;
        let topic = c.string()?;
        let (mut properties, used) = PublishProperties::decode_block(&c.0)
            .map_err(|_| BatchError::Malformed("invalid properties"))?;
        c.bytes(used)?;
        let payload_len = c.u32()? as usize;
        let payload = c.bytes(payload_len)?;
        let id = (flags & 0b1000 != 0).then_some(id);
        if let Some(id) = &id {
            let value =
                MqttString::new(&id.to_string()).map_err(|_| BatchError::Malformed("id"))?;
            properties
                .user_properties
                .insert(0, (MqttString::from_static(MESSAGE_ID_PROPERTY), value));
        }
        records.push(BatchRecord {
            id,
            topic,
            qos,
            retain: flags & 0b100 != 0,
            properties,
            payload,
        });
    }
    if !c.0.is_empty() {
        return Err(BatchError::Malformed("trailing bytes"));
    }
    Ok(records)
}

/// Removes the `ferry-id` and `ferry-stamp` user properties.
pub(crate) fn strip_ferry_properties(properties: &mut ferrymq_codec::PublishProperties) {
    properties
        .user_properties
        .retain(|(k, _)| k.as_str() != MESSAGE_ID_PROPERTY && k.as_str() != STAMP_PROPERTY);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u64, payload: &str) -> BatchRecord {
        let id = MessageId {
            uuid: [5; 16],
            queue: 2,
            epoch: 7,
            n,
        };
        BatchRecord {
            id: Some(id),
            topic: MqttString::new(&format!("site/dev{n}/temp")).expect("topic"),
            qos: QoS::AtLeastOnce,
            retain: n == 2,
            properties: PublishProperties {
                content_type: Some(MqttString::from_static("application/json")),
                message_expiry_interval: Some(60),
                user_properties: vec![
                    (
                        MqttString::from_static(MESSAGE_ID_PROPERTY),
                        MqttString::new(&id.to_string()).expect("id"),
                    ),
                    (
                        MqttString::from_static("unit"),
                        MqttString::from_static("C"),
                    ),
                ],
                ..PublishProperties::default()
            },
            payload: Bytes::from(payload.to_owned()),
        }
    }

    #[test]
    fn a_batch_round_trips_with_each_id_first_among_the_user_properties() {
        let mut records: Vec<BatchRecord> = (1..=300)
            .map(|n| record(n, &format!("{{\"t\":{}.5}}", 20 + n % 7)))
            .collect();
        // A QoS 0 message without an id.
        records[7].id = None;
        records[7].qos = QoS::AtMostOnce;
        records[7].properties.user_properties.remove(0);
        let frame = encode_batch(&records);
        assert_eq!(decode_batch(&frame, 1 << 20), Ok(records.clone()));
        // Small sensor messages: a few bytes each once compressed.
        assert!(frame.len() < records.len() * 30, "{} bytes", frame.len());
        assert_eq!(decode_batch(&encode_batch(&[]), 16), Ok(Vec::new()));
    }

    #[test]
    fn bad_frames_are_refused() {
        let frame = encode_batch(&[record(1, "x"), record(2, "y")]);
        let cases: Vec<(Vec<u8>, usize, BatchError)> = vec![
            (
                vec![],
                1 << 20,
                BatchError::Malformed("shorter than its header"),
            ),
            (
                {
                    let mut f = frame.to_vec();
                    f[0] = 9;
                    f
                },
                1 << 20,
                BatchError::Malformed("unknown format"),
            ),
            (frame.to_vec(), 10, BatchError::TooLarge(10)),
            (
                frame[..frame.len() - 3].to_vec(),
                1 << 20,
                BatchError::Malformed("does not decompress"),
            ),
            // A header that claims less than the body expands to.
            (
                {
                    let mut f = frame.to_vec();
                    f[4] = f[4].wrapping_sub(1);
                    f
                },
                1 << 20,
                BatchError::Malformed("does not decompress"),
            ),
        ];
        for (bytes, max, expected) in cases {
            assert_eq!(
                decode_batch(&bytes, max),
                Err(expected.clone()),
                "{expected}"
            );
        }
    }

    proptest::proptest! {
        /// Whatever a peer sends, decoding returns an answer (no panic, no
        /// unbounded allocation): random bytes, and valid frames with
        /// bytes flipped or cut off.
        #[test]
        fn decoding_any_bytes_never_panics(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            flips in proptest::collection::vec((0usize..4096, proptest::prelude::any::<u8>()), 0..8),
            cut in 0usize..4096,
        ) {
            let _ = decode_batch(&bytes, 1 << 20);
            let mut frame = encode_batch(&[record(1, "a"), record(2, "bb"), record(3, "ccc")]).to_vec();
            for (at, value) in flips {
                let len = frame.len();
                frame[at % len] ^= value;
            }
            let _ = decode_batch(&frame, 1 << 20);
            let cut = cut % (frame.len() + 1);
            let _ = decode_batch(&frame[..cut], 1 << 20);
        }
    }
}
