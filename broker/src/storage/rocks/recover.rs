//! Start-up reads: everything but the queues (sessions, subscriptions,
//! in-flight state, retained messages, groups, de-duplication origins,
//! counters), skipping and counting records that cannot be read, and the
//! queue statistics and single messages they need.

use std::collections::BTreeMap;
use std::sync::Arc;

use ferrymq_codec::MqttString;
use rocksdb::{DB, IteratorMode};
use tracing::warn;

use super::keys::{
    DEDUP, GROUPS, INFLIGHT, META, QOS2_IN, QUEUE_STATS, QUEUES, RETAINED, SESSIONS, SUBSCRIPTIONS,
    big_u64, key_n, key_ns, parse_key_dedup, read_stats,
};
use super::{RocksStore, cf, db_error};
use crate::dedup::DedupOrigin;
use crate::message::Message;
use crate::storage::record;
use crate::storage::{
    BrokerClock, InflightRecord, OutboundPhase, QueueSummary, QueuedRecord, Recovered,
    RecoveredGroup, RecoveredOrigin, RecoveredSession, StoreError,
};

impl RocksStore {
    /// Reads everything but the queues, skipping (and counting) records
    /// that cannot be read.
    pub(super) fn recover(&self) -> Result<Recovered, StoreError> {
        let db = self.inner.db()?;
        let mut scan = Scan {
            store: self,
            db: &db,
            time: &self.inner.clock,
            corrupt: 0,
        };
        let mut sessions = scan.sessions()?;
        scan.subscriptions(&mut sessions)?;
        scan.inflight(&mut sessions)?;
        scan.qos2_received(&mut sessions)?;
        let retained = scan.retained()?;
        let groups = scan.groups()?;
        let dedup = scan.dedup()?;
        let next_session_number = scan
            .meta_u64(b"next_session", "reading the session counter")?
            .unwrap_or(1);
        let state_clock = scan
            .meta_u64(b"state_clock", "reading the state clock")?
            .unwrap_or(0);
        let corrupt = scan.corrupt;
        if corrupt > 0 {
            warn!(corrupt, "skipped unreadable records at start");
        }
        Ok(Recovered {
            sessions: sessions.into_values().collect(),
            groups,
            retained,
            dedup,
            next_session_number,
            state_clock,
            corrupt,
            previous_run_ms: self.previous_run_ms,
        })
    }

    pub(super) fn summary(&self, number: u64) -> Result<QueueSummary, StoreError> {
        let db = self.inner.db()?;
        let v = db
            .get_cf(cf(&db, QUEUE_STATS)?, key_n(number))
            .map_err(|e| db_error("reading queue statistics", e))?;
        Ok(v.map_or_else(QueueSummary::default, |v| {
            let (count, bytes, max) = read_stats(&v);
            QueueSummary {
                count: count.max(0) as u64,
                bytes: bytes.max(0) as u64,
                next_seq: max + 1,
            }
        }))
    }

    fn read_one(&self, queue: u64, seq: u64) -> Option<QueuedRecord> {
        let db = self.inner.db().ok()?;
        let family = cf(&db, QUEUES).ok()?;
        let v = db.get_cf(family, key_ns(queue, seq)).ok()??;
        let q = record::decode_queued(v.into(), &*self.inner.clock).ok()?;
        Some(q.at(seq))
    }
}

/// One start-up read of the database, family by family: what it reads
/// with, and the unreadable records it skipped so far.
struct Scan<'a> {
    store: &'a RocksStore,
    db: &'a DB,
    time: &'a BrokerClock,
    /// Records skipped because they could not be read.
    corrupt: u64,
}

impl Scan<'_> {
    fn skip(&mut self, what: &str, key: &[u8], e: &dyn std::fmt::Display) {
        warn!("skipping an unreadable {what} record (key {key:02x?}): {e}");
        self.corrupt += 1;
    }

    /// The sessions by number, each with its queue's summary.
    fn sessions(&mut self) -> Result<BTreeMap<u64, RecoveredSession>, StoreError> {
        let db = self.db;
        let mut sessions: BTreeMap<u64, RecoveredSession> = BTreeMap::new();
        for item in db.iterator_cf(cf(db, SESSIONS)?, IteratorMode::Start) {
            let (k, v) = item.map_err(|e| db_error("reading sessions", e))?;
            let Some(number) = big_u64(&k) else {
                self.skip("session", &k, &"bad key");
                continue;
            };
            match record::decode_session(number, v.into(), self.time) {
                Ok(record) => {
                    let queue = self.store.summary(number)?;
                    sessions.insert(
                        number,
                        RecoveredSession {
                            record,
                            subscriptions: Vec::new(),
                            queue,
                            inflight: Vec::new(),
                            qos2_received: Vec::new(),
                        },
                    );
                }
                Err(e) => self.skip("session", &k, &e),
            }
        }
        Ok(sessions)
    }

    /// Each session's subscriptions.
    fn subscriptions(
        &mut self,
        sessions: &mut BTreeMap<u64, RecoveredSession>,
    ) -> Result<(), StoreError> {
        let db = self.db;
        for item in db.iterator_cf(cf(db, SUBSCRIPTIONS)?, IteratorMode::Start) {
            let (k, v) = item.map_err(|e| db_error("reading subscriptions", e))?;
            let (Some(number), Some(filter)) = (big_u64(&k), k.get(8..)) else {
                self.skip("subscription", &k, &"bad key");
                continue;
            };
            let Ok(filter) = MqttString::new(&String::from_utf8_lossy(filter)) else {
                self.skip("subscription", &k, &"bad filter");
                continue;
            };
            match record::decode_subscription(v.into()) {
                Ok(sub) => {
                    if let Some(s) = sessions.get_mut(&number) {
                        s.subscriptions.push((filter, sub));
                    }
                }
                Err(e) => self.skip("subscription", &k, &e),
            }
        }
        Ok(())
    }

    /// Each session's outbound exchanges, with the message of each one
    /// still to be acknowledged.
    fn inflight(
        &mut self,
        sessions: &mut BTreeMap<u64, RecoveredSession>,
    ) -> Result<(), StoreError> {
        let db = self.db;
        for item in db.iterator_cf(cf(db, INFLIGHT)?, IteratorMode::Start) {
            let (k, v) = item.map_err(|e| db_error("reading in-flight state", e))?;
            let (Some(number), Some(packet_id)) = (
                big_u64(&k),
                k.get(8..10).map(|b| u16::from_be_bytes([b[0], b[1]])),
            ) else {
                self.skip("in-flight", &k, &"bad key");
                continue;
            };
            let (queue, seq, phase) = match record::decode_inflight(v.into()) {
                Ok(x) => x,
                Err(e) => {
                    self.skip("in-flight", &k, &e);
                    continue;
                }
            };
            let body = match phase {
                OutboundPhase::Sent => self.store.read_one(queue, seq),
                OutboundPhase::Released => None,
            };
            if let Some(s) = sessions.get_mut(&number) {
                s.inflight.push(InflightRecord {
                    packet_id,
                    queue,
                    seq,
                    phase,
                    body,
                });
            }
        }
        Ok(())
    }

    /// Each session's inbound QoS 2 packet identifiers awaiting PUBREL.
    fn qos2_received(
        &mut self,
        sessions: &mut BTreeMap<u64, RecoveredSession>,
    ) -> Result<(), StoreError> {
        let db = self.db;
        for item in db.iterator_cf(cf(db, QOS2_IN)?, IteratorMode::Start) {
            let (k, _) = item.map_err(|e| db_error("reading QoS 2 state", e))?;
            if let (Some(number), Some(id)) = (big_u64(&k), k.get(8..10))
                && let Some(s) = sessions.get_mut(&number)
            {
                s.qos2_received.push(u16::from_be_bytes([id[0], id[1]]));
            }
        }
        Ok(())
    }

    fn retained(&mut self) -> Result<Vec<Arc<Message>>, StoreError> {
        let db = self.db;
        let mut retained = Vec::new();
        for item in db.iterator_cf(cf(db, RETAINED)?, IteratorMode::Start) {
            let (k, v) = item.map_err(|e| db_error("reading retained messages", e))?;
            match record::decode_retained(v.into(), self.time) {
                Ok(m) => retained.push(Arc::new(m)),
                Err(e) => self.skip("retained", &k, &e),
            }
        }
        Ok(retained)
    }

    /// The shared subscription groups, each with its queue's summary.
    fn groups(&mut self) -> Result<Vec<RecoveredGroup>, StoreError> {
        let db = self.db;
        let mut groups = Vec::new();
        for item in db.iterator_cf(cf(db, GROUPS)?, IteratorMode::Start) {
            let (k, v) = item.map_err(|e| db_error("reading groups", e))?;
            let Some(number) = big_u64(&k) else {
                self.skip("group", &k, &"bad key");
                continue;
            };
            match record::decode_group(v.into()) {
                Ok((name, filter)) => groups.push(RecoveredGroup {
                    number,
                    name,
                    filter,
                    queue: self.store.summary(number)?,
                }),
                Err(e) => self.skip("group", &k, &e),
            }
        }
        Ok(groups)
    }

    /// The de-duplication origins: each one's floor record and marks.
    fn dedup(&mut self) -> Result<Vec<RecoveredOrigin>, StoreError> {
        let db = self.db;
        let mut dedup: BTreeMap<DedupOrigin, RecoveredOrigin> = BTreeMap::new();
        for item in db.iterator_cf(cf(db, DEDUP)?, IteratorMode::Start) {
            let (k, v) = item.map_err(|e| db_error("reading de-duplication records", e))?;
            let Some((origin, tag, n)) = parse_key_dedup(&k) else {
                self.skip("de-duplication", &k, &"bad key");
                continue;
            };
            let entry = dedup.entry(origin).or_insert(RecoveredOrigin {
                origin,
                floor: 1,
                marks: Vec::new(),
                last_ms: 0,
            });
            match (tag, big_u64(&v), v.get(8..).and_then(big_u64)) {
                (0, Some(floor), Some(at_ms)) => {
                    entry.floor = floor;
                    entry.last_ms = at_ms;
                }
                (1, _, _) => entry.marks.push(n),
                _ => self.skip("de-duplication", &k, &"bad value"),
            }
        }
        Ok(dedup.into_values().collect())
    }

    /// A u64 counter in `meta`, if stored.
    fn meta_u64(&self, key: &[u8], what: &str) -> Result<Option<u64>, StoreError> {
        let db = self.db;
        Ok(db
            .get_cf(cf(db, META)?, key)
            .map_err(|e| db_error(what, e))?
            .and_then(|v| big_u64(&v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::rocks::testing::{message, options, session, write_sync};
    use crate::storage::{Store, StoreOp};
    use ferrymq_codec::QoS;
    use ferrymq_config::Durability;

    #[test]
    fn dedup_floors_and_marks_survive_a_reopen_and_forgotten_origins_go() {
        use crate::dedup::DedupOrigin;
        let dir = tempfile::tempdir().expect("temp dir");
        let store = RocksStore::open(dir.path(), options(Durability::GroupCommit)).expect("open");
        let origin = |queue| DedupOrigin {
            uuid: [9; 16],
            queue,
            epoch: 3,
        };
        let take = |queue, floor, mark, clear| StoreOp::DedupTake {
            origin: origin(queue),
            floor,
            mark,
            clear,
            at_ms: 77,
        };
        write_sync(
            &store,
            vec![
                take(1, 2, None, false),
                take(1, 2, Some(4), false),
                take(1, 2, Some(6), false),
                take(2, 2, Some(5), false),
            ],
        );
        // 2 and 3 came: the floor passes 4, whose mark goes; 6 stays.
        write_sync(&store, vec![take(1, 5, None, true)]);
        write_sync(&store, vec![StoreOp::DedupForget { origin: origin(2) }]);
        drop(store);
        let store = RocksStore::open(dir.path(), options(Durability::GroupCommit)).expect("reopen");
        let recovered = store.recover().expect("recover");
        assert_eq!(
            recovered.dedup,
            vec![RecoveredOrigin {
                origin: origin(1),
                floor: 5,
                marks: vec![6],
                last_ms: 77,
            }]
        );
        assert_eq!(recovered.corrupt, 0);
    }

    #[test]
    fn sessions_queues_and_retained_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = RocksStore::open(dir.path(), options(Durability::GroupCommit)).expect("open");
        let epoch = store.epoch;
        let node = store.node_uuid;
        let mut ops = vec![session(5)];
        for seq in 1..=3 {
            ops.push(StoreOp::QueuePut {
                number: 5,
                seq,
                qos: QoS::AtLeastOnce,
                retain: false,
                identifiers: Some(Arc::from([7u32])),
                message: message(seq),
            });
        }
        ops.push(StoreOp::QueueDelete {
            number: 5,
            seq: 1,
            size: 1,
        });
        ops.push(StoreOp::InflightPut {
            number: 5,
            packet_id: 9,
            queue: 5,
            seq: 2,
            phase: OutboundPhase::Sent,
        });
        ops.push(StoreOp::Qos2Received {
            number: 5,
            packet_id: 4,
        });
        let mut retained = (*message(0)).clone();
        retained.topic = MqttString::from_static("r/t");
        retained.retain = true;
        ops.push(StoreOp::RetainedPut(Arc::new(retained)));
        write_sync(&store, ops);
        store.close();
        drop(store);

        let store = RocksStore::open(dir.path(), options(Durability::GroupCommit)).expect("reopen");
        assert_eq!(store.epoch, epoch + 1, "the epoch is bumped at every start");
        assert_eq!(store.node_uuid, node, "the node id is kept");
        let r = store.load().expect("load");
        assert_eq!(r.sessions.len(), 1);
        let s = &r.sessions[0];
        assert_eq!(
            s.queue,
            QueueSummary {
                count: 2,
                bytes: 2,
                next_seq: 4
            }
        );
        assert_eq!(s.qos2_received, [4]);
        assert_eq!(s.inflight.len(), 1);
        let body = s.inflight[0]
            .body
            .as_ref()
            .expect("the in-flight message body");
        assert_eq!(body.message.payload, "2");
        assert_eq!(body.identifiers.as_deref(), Some(&[7][..]));
        let page: Vec<u64> = store.read_queue(5, 0, 10).iter().map(|q| q.seq).collect();
        assert_eq!(page, [2, 3]);
        assert_eq!(r.retained.len(), 1);
        assert!(r.next_session_number > 5);
        // Ending the session removes everything keyed by it.
        write_sync(
            &store,
            vec![StoreOp::SessionDelete {
                client_id: MqttString::from_static("c"),
                number: 5,
            }],
        );
        assert!(store.read_queue(5, 0, 10).is_empty());
        assert!(store.load().expect("load").sessions.is_empty());
    }

    #[test]
    fn unreadable_records_are_skipped_and_counted() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = RocksStore::open(dir.path(), options(Durability::SyncEach)).expect("open");
        write_sync(&store, vec![session(1), session(2)]);
        // Damage one session record and one queued message behind the
        // store's back.
        let db = store.inner.db().expect("db");
        let sessions = cf(&db, SESSIONS).expect("cf");
        db.put_cf(sessions, key_n(2), b"garbage").expect("put");
        let queues = cf(&db, QUEUES).expect("cf");
        db.put_cf(queues, key_ns(1, 1), b"garbage too")
            .expect("put");
        drop(db);
        write_sync(
            &store,
            vec![StoreOp::QueuePut {
                number: 1,
                seq: 2,
                qos: QoS::AtLeastOnce,
                retain: false,
                identifiers: None,
                message: message(2),
            }],
        );
        let r = store.load().expect("start-up does not stop");
        assert_eq!(r.corrupt, 1);
        assert_eq!(r.sessions.len(), 1);
        let page: Vec<u64> = store.read_queue(1, 0, 10).iter().map(|q| q.seq).collect();
        assert_eq!(page, [2], "the unreadable queued message is skipped");
    }
}
