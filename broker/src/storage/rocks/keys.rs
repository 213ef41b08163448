//! The on-disk layout: column families, key encodings, the
//! `queue_stats` values and the merge operators that keep them.
//!
//! # On-disk layout
//!
//! Column families by kind; integers big-endian; values as in
//! [`crate::storage::record`] (versioned, CRC-32 checked).
//!
//! | family | key | value |
//! |---|---|---|
//! | `meta` | `schema`, `node_uuid`, `epoch`, `next_session`, `clock`, `state_clock` | u32 schema version; 16 random bytes; u64 run counter (bumped and synced at every start); u64 above every session or group number (max-merge); u64 broker ms + u64 wall ms at the last save; u64 the highest `[state]` clock reading (max-merge) |
//! | `sessions` | session number | client id, expiry, offline since (broker ms), pending will |
//! | `subscriptions` | session number ++ topic filter | options byte, subscription identifier |
//! | `queues` | queue number ++ sequence | delivery QoS / RETAIN / identifiers, then the message |
//! | `queue_stats` | queue number | i64 count, i64 payload bytes, u64 highest sequence (a merge of deltas, so concurrent writers never race) |
//! | `inflight` | session number ++ packet id | queue number, sequence, phase |
//! | `qos2_in` | session number ++ packet id | (empty): inbound QoS 2 held until PUBREL |
//! | `retained` | topic | the message |
//! | `groups` | group number | share name, filter (its queue lives in `queues` under its number) |
//!
//! Queue entries are written once and removed with SingleDelete; ending a
//! session is a DeleteRange per family. Start-up reads sessions,
//! subscriptions, in-flight state, retained messages and each queue's
//! `queue_stats` entry, never the queues themselves: they are paged in as
//! they are drained.

use rocksdb::MergeOperands;

use crate::dedup::DedupOrigin;

pub(super) const META: &str = "meta";
pub(super) const SESSIONS: &str = "sessions";
pub(super) const SUBSCRIPTIONS: &str = "subscriptions";
pub(super) const QUEUES: &str = "queues";
pub(super) const QUEUE_STATS: &str = "queue_stats";
pub(super) const INFLIGHT: &str = "inflight";
pub(super) const QOS2_IN: &str = "qos2_in";
pub(super) const RETAINED: &str = "retained";
pub(super) const GROUPS: &str = "groups";
/// De-duplication origins: per origin (uuid, queue, epoch: 32 bytes) a
/// floor record (tag 0: floor, last take) and marks (tag 1, number).
pub(super) const DEDUP: &str = "dedup";
pub(super) const FAMILIES: [&str; 10] = [
    META,
    SESSIONS,
    SUBSCRIPTIONS,
    QUEUES,
    QUEUE_STATS,
    INFLIGHT,
    QOS2_IN,
    RETAINED,
    GROUPS,
    DEDUP,
];

pub(super) fn big_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?))
}

pub(super) fn key_n(number: u64) -> [u8; 8] {
    number.to_be_bytes()
}

/// A de-duplication key: the origin, a tag (0: its floor record, 1: a
/// mark) and, for a mark, the number.
pub(super) fn key_dedup(origin: &DedupOrigin, tag: u8, n: u64) -> [u8; 41] {
    let mut k = [0u8; 41];
    k[..16].copy_from_slice(&origin.uuid);
    k[16..24].copy_from_slice(&origin.queue.to_be_bytes());
    k[24..32].copy_from_slice(&origin.epoch.to_be_bytes());
    k[32] = tag;
    k[33..].copy_from_slice(&n.to_be_bytes());
    k
}

/// The parts of a [`key_dedup`] key.
pub(super) fn parse_key_dedup(k: &[u8]) -> Option<(DedupOrigin, u8, u64)> {
    if k.len() != 41 {
        return None;
    }
    let origin = DedupOrigin {
        uuid: k[..16].try_into().ok()?,
        queue: big_u64(&k[16..24])?,
        epoch: big_u64(&k[24..32])?,
    };
    Some((origin, k[32], big_u64(&k[33..])?))
}

pub(super) fn key_ns(number: u64, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&number.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub(super) fn key_np(number: u64, packet_id: u16) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[..8].copy_from_slice(&number.to_be_bytes());
    k[8..].copy_from_slice(&packet_id.to_be_bytes());
    k
}

pub(super) fn key_nf(number: u64, filter: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + filter.len());
    k.extend_from_slice(&number.to_be_bytes());
    k.extend_from_slice(filter.as_bytes());
    k
}

/// A `queue_stats` value or delta: count, bytes, highest sequence.
pub(super) fn stats_value(count: i64, bytes: i64, max_seq: u64) -> [u8; 24] {
    let mut v = [0u8; 24];
    v[..8].copy_from_slice(&count.to_be_bytes());
    v[8..16].copy_from_slice(&bytes.to_be_bytes());
    v[16..].copy_from_slice(&max_seq.to_be_bytes());
    v
}

pub(super) fn read_stats(v: &[u8]) -> (i64, i64, u64) {
    let get = |r: std::ops::Range<usize>| v.get(r).and_then(|b| <[u8; 8]>::try_from(b).ok());
    (
        get(0..8).map_or(0, i64::from_be_bytes),
        get(8..16).map_or(0, i64::from_be_bytes),
        get(16..24).map_or(0, u64::from_be_bytes),
    )
}

/// Sums count and bytes deltas, keeps the highest sequence. Associative
/// and commutative: the order writers' deltas are applied in never matters.
pub(super) fn merge_stats(
    _key: &[u8],
    existing: Option<&[u8]>,
    operands: &MergeOperands,
) -> Option<Vec<u8>> {
    let (mut count, mut bytes, mut max) = existing.map_or((0, 0, 0), read_stats);
    for op in operands {
        let (c, b, m) = read_stats(op);
        count += c;
        bytes += b;
        max = max.max(m);
    }
    Some(stats_value(count, bytes, max).to_vec())
}

/// Keeps the highest u64 (for `next_session`).
pub(super) fn merge_max(
    _key: &[u8],
    existing: Option<&[u8]>,
    operands: &MergeOperands,
) -> Option<Vec<u8>> {
    let mut max = existing.and_then(big_u64).unwrap_or(0);
    for op in operands {
        max = max.max(big_u64(op).unwrap_or(0));
    }
    Some(max.to_be_bytes().to_vec())
}

/// Reads a `queue_stats` value: count, bytes, highest sequence.
pub(crate) fn read_stats_value(v: &[u8]) -> (i64, i64, u64) {
    read_stats(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_merge_in_any_order() {
        let deltas = [
            stats_value(1, 10, 5),
            stats_value(1, 20, 9),
            stats_value(-1, -10, 0),
        ];
        let mut total = (0i64, 0i64, 0u64);
        for d in deltas {
            let (c, b, m) = read_stats(&d);
            total = (total.0 + c, total.1 + b, total.2.max(m));
        }
        assert_eq!(total, (1, 20, 9));
    }
}
