//! The writer thread: store ops into write batches, the batches written
//! in ticket order under the durability policy, the watermark, failed
//! writes and the reopen after them, broker time saved.
//!
//! One writer thread applies batches in ticket order. With `group-commit`
//! it takes every batch queued so far, writes them as one `WriteBatch` and
//! syncs the WAL once; submitters keep queueing meanwhile, and that is the
//! next batch (no timer). `sync-each` syncs every batch on its own.
//! `interval` writes without syncing (the WAL is in the page cache, which
//! survives a killed process) and syncs every `sync_interval_ms`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use ferrymq_codec::MqttString;
use ferrymq_config::Durability;
use rocksdb::{DB, WriteBatch, WriteOptions};
use tracing::{error, info, warn};

use super::keys::{
    DEDUP, GROUPS, INFLIGHT, META, QOS2_IN, QUEUE_STATS, QUEUES, RETAINED, SESSIONS, SUBSCRIPTIONS,
    key_dedup, key_n, key_nf, key_np, key_ns, stats_value,
};
use super::space::{SPACE_CHECK, SPACE_CHECK_BYTES, check_space};
use super::{Inner, cf, options};
use crate::dedup::DedupOrigin;
use crate::state::wall_ms;
use crate::storage::record::{self, TimeBase};
use crate::storage::{SessionRecord, StoreError, StoreOp, Ticket};

/// How often broker time is saved.
const CLOCK_SAVE: Duration = Duration::from_secs(10);
/// Most failed ticket ranges remembered.
const FAILED_RANGES: usize = 64;

/// How long WAL syncs took: a histogram with power-of-two buckets of
/// microseconds (bucket `i` holds durations below 2^i µs).
#[derive(Default)]
pub(super) struct SyncTimes {
    pub(super) buckets: [AtomicU64; 32],
}

impl SyncTimes {
    pub(super) fn record(&self, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket = (64 - micros.leading_zeros() as usize).min(31);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn summary(&self) -> SyncSummary {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        let quantile = |q: f64| {
            let rank = ((total as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return Duration::from_micros(1u64 << i);
                }
            }
            Duration::ZERO
        };
        SyncSummary {
            count: total,
            p50: if total == 0 {
                Duration::ZERO
            } else {
                quantile(0.5)
            },
            p99: if total == 0 {
                Duration::ZERO
            } else {
                quantile(0.99)
            },
        }
    }
}

/// How long WAL syncs (a write with sync, or a periodic sync) took since
/// the store opened. Quantiles are upper bounds: the next power of two of
/// microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncSummary {
    /// Syncs measured.
    pub count: u64,
    /// Half of the syncs took less than this.
    pub p50: Duration,
    /// 99 % of the syncs took less than this.
    pub p99: Duration,
}

/// Queue statistics changes of one write run, by queue number: count
/// and bytes deltas and the highest sequence (the `queue_stats` merge
/// operator's value), written as one merge per queue instead of one per
/// message.
type StatsDeltas = BTreeMap<u64, (i64, i64, u64)>;

/// Writes the accumulated statistics merges into `batch`.
fn flush_stats(
    db: &DB,
    batch: &mut WriteBatch,
    deltas: &mut StatsDeltas,
) -> Result<(), StoreError> {
    let family = cf(db, QUEUE_STATS)?;
    for (number, (count, bytes, max)) in std::mem::take(deltas) {
        batch.merge_cf(family, key_n(number), stats_value(count, bytes, max));
    }
    Ok(())
}

/// Adds one op to a write batch (`scratch`: where a queued record is
/// encoded before the batch copies it, reused from op to op).
fn add(
    db: &DB,
    batch: &mut WriteBatch,
    op: StoreOp,
    time: &dyn TimeBase,
    deltas: &mut StatsDeltas,
    scratch: &mut BytesMut,
) -> Result<(), StoreError> {
    use StoreOp as O;
    // A delete of a queue's statistics must come after its earlier
    // changes, not before them.
    if matches!(op, O::SessionDelete { .. } | O::GroupDelete { .. }) {
        flush_stats(db, batch, deltas)?;
    }
    let mut stats = |number: u64, count: i64, bytes: i64, seq: u64| {
        let entry = deltas.entry(number).or_insert((0, 0, 0));
        entry.0 += count;
        entry.1 += bytes;
        entry.2 = entry.2.max(seq);
    };
    match op {
        O::SessionPut(s) => put_session(db, batch, &s, time)?,
        O::SessionDelete { number, .. } => delete_session(db, batch, number)?,
        O::SubscriptionPut {
            number,
            filter,
            subscription,
        } => batch.put_cf(
            cf(db, SUBSCRIPTIONS)?,
            key_nf(number, &filter),
            record::encode_subscription(&subscription),
        ),
        O::SubscriptionDelete { number, filter } => {
            batch.delete_cf(cf(db, SUBSCRIPTIONS)?, key_nf(number, &filter));
        }
        O::QueuePut {
            number,
            seq,
            qos,
            retain,
            identifiers,
            message,
        } => {
            record::encode_queued(
                scratch,
                time.to_ms(tokio::time::Instant::now()),
                qos,
                retain,
                identifiers.as_deref(),
                &message,
                time,
            );
            batch.put_cf(cf(db, QUEUES)?, key_ns(number, seq), &scratch[..]);
            stats(number, 1, message.payload.len() as i64, seq);
        }
        O::QueueDelete { number, seq, size } => {
            batch.single_delete_cf(cf(db, QUEUES)?, key_ns(number, seq));
            stats(number, -1, -i64::try_from(size).unwrap_or(i64::MAX), 0);
        }
        O::InflightPut {
            number,
            packet_id,
            queue,
            seq,
            phase,
        } => batch.put_cf(
            cf(db, INFLIGHT)?,
            key_np(number, packet_id),
            record::encode_inflight(queue, seq, phase),
        ),
        O::InflightDelete { number, packet_id } => {
            batch.delete_cf(cf(db, INFLIGHT)?, key_np(number, packet_id));
        }
        O::Qos2Received { number, packet_id } => {
            batch.put_cf(cf(db, QOS2_IN)?, key_np(number, packet_id), []);
        }
        O::Qos2Released { number, packet_id } => {
            batch.delete_cf(cf(db, QOS2_IN)?, key_np(number, packet_id));
        }
        O::RetainedPut(m) => {
            batch.put_cf(
                cf(db, RETAINED)?,
                m.topic.as_bytes(),
                record::encode_retained(&m, time),
            );
        }
        O::RetainedDelete(topic) => batch.delete_cf(cf(db, RETAINED)?, topic.as_bytes()),
        O::GroupPut {
            number,
            name,
            filter,
        } => put_group(db, batch, number, &name, &filter)?,
        O::GroupDelete { number } => delete_group(db, batch, number)?,
        O::DedupTake {
            origin,
            floor,
            mark,
            clear,
            at_ms,
        } => take_dedup(db, batch, &origin, floor, mark, clear, at_ms)?,
        O::DedupForget { origin } => forget_dedup(db, batch, &origin)?,
        O::StateClock(reading) => {
            batch.merge_cf(cf(db, META)?, b"state_clock", reading.to_be_bytes());
        }
    }
    Ok(())
}

/// A session's record, and the session counter kept above its number.
fn put_session(
    db: &DB,
    batch: &mut WriteBatch,
    s: &SessionRecord,
    time: &dyn TimeBase,
) -> Result<(), StoreError> {
    batch.put_cf(
        cf(db, SESSIONS)?,
        key_n(s.number),
        record::encode_session(s, time),
    );
    batch.merge_cf(cf(db, META)?, b"next_session", (s.number + 1).to_be_bytes());
    Ok(())
}

/// Ends a session: its record, and everything keyed by its number (a
/// DeleteRange per family), its queue's statistics included.
fn delete_session(db: &DB, batch: &mut WriteBatch, number: u64) -> Result<(), StoreError> {
    batch.delete_cf(cf(db, SESSIONS)?, key_n(number));
    let (from, to) = (key_n(number), key_n(number + 1));
    for family in [SUBSCRIPTIONS, QUEUES, INFLIGHT, QOS2_IN] {
        batch.delete_range_cf(cf(db, family)?, from, to);
    }
    batch.delete_cf(cf(db, QUEUE_STATS)?, key_n(number));
    Ok(())
}

/// A shared group's record; groups and sessions share the counter.
fn put_group(
    db: &DB,
    batch: &mut WriteBatch,
    number: u64,
    name: &MqttString,
    filter: &MqttString,
) -> Result<(), StoreError> {
    batch.put_cf(
        cf(db, GROUPS)?,
        key_n(number),
        record::encode_group(name, filter),
    );
    batch.merge_cf(cf(db, META)?, b"next_session", (number + 1).to_be_bytes());
    Ok(())
}

/// Ends a shared group: its record, its queue and the queue's statistics.
fn delete_group(db: &DB, batch: &mut WriteBatch, number: u64) -> Result<(), StoreError> {
    batch.delete_cf(cf(db, GROUPS)?, key_n(number));
    batch.delete_range_cf(cf(db, QUEUES)?, key_n(number), key_n(number + 1));
    batch.delete_cf(cf(db, QUEUE_STATS)?, key_n(number));
    Ok(())
}

/// A de-duplication take: the origin's floor record, the marks the floor
/// passed removed (`clear`), the number as a mark when it stays above the
/// floor.
fn take_dedup(
    db: &DB,
    batch: &mut WriteBatch,
    origin: &DedupOrigin,
    floor: u64,
    mark: Option<u64>,
    clear: bool,
    at_ms: u64,
) -> Result<(), StoreError> {
    let family = cf(db, DEDUP)?;
    let mut value = [0u8; 16];
    value[..8].copy_from_slice(&floor.to_be_bytes());
    value[8..].copy_from_slice(&at_ms.to_be_bytes());
    batch.put_cf(family, key_dedup(origin, 0, 0), value);
    if clear {
        batch.delete_range_cf(family, key_dedup(origin, 1, 0), key_dedup(origin, 1, floor));
    }
    if let Some(n) = mark {
        batch.put_cf(family, key_dedup(origin, 1, n), []);
    }
    Ok(())
}

/// Forgets an origin: its floor record and every mark.
fn forget_dedup(db: &DB, batch: &mut WriteBatch, origin: &DedupOrigin) -> Result<(), StoreError> {
    batch.delete_range_cf(
        cf(db, DEDUP)?,
        key_dedup(origin, 0, 0),
        key_dedup(origin, 2, 0),
    );
    Ok(())
}

/// The writer thread: takes the batches whose turn it is, writes them
/// under the durability policy, publishes the watermark; saves broker
/// time, checks disk use, and reopens the database after write errors
/// once there is space again.
pub(super) fn writer_loop(inner: &Inner) {
    let policy = inner.options.durability;
    let mut last_clock = std::time::Instant::now();
    let mut last_space = std::time::Instant::now() - SPACE_CHECK;
    let mut last_sync = std::time::Instant::now();
    let mut unsynced = false;
    let mut written_since_check = 0usize;
    let tick = match policy {
        Durability::Interval => inner.options.sync_interval.min(SPACE_CHECK),
        _ => SPACE_CHECK,
    };
    loop {
        let run: Vec<(Ticket, Vec<StoreOp>)> = {
            let mut pending = inner.pending.lock();
            if !pending.waiting.contains_key(&pending.next) && !inner.stop.load(Ordering::Acquire) {
                inner.wake.wait_for(&mut pending, tick);
            }
            let mut run = Vec::new();
            loop {
                let next = pending.next;
                let Some(ops) = pending.waiting.remove(&next) else {
                    break;
                };
                run.push((next, ops));
                pending.next += 1;
            }
            run
        };
        if let Ok(db) = inner.db() {
            if !run.is_empty() {
                match policy {
                    Durability::SyncEach => {
                        for (ticket, ops) in run {
                            written_since_check += write_run(&db, inner, vec![(ticket, ops)], true);
                        }
                    }
                    Durability::GroupCommit => {
                        written_since_check += write_run(&db, inner, run, true);
                    }
                    Durability::Interval => {
                        written_since_check += write_run(&db, inner, run, false);
                        unsynced = true;
                    }
                }
            }
            if unsynced && last_sync.elapsed() >= inner.options.sync_interval {
                let started = std::time::Instant::now();
                match db.flush_wal(true) {
                    Ok(()) => {
                        inner.sync_times.record(started.elapsed());
                        inner.syncs.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => warn!("WAL sync failed: {e}"),
                }
                unsynced = false;
                last_sync = std::time::Instant::now();
            }
            let stopping = inner.stop.load(Ordering::Acquire);
            if last_clock.elapsed() >= CLOCK_SAVE || stopping {
                save_clock(&db, inner, stopping);
                last_clock = std::time::Instant::now();
            }
            if stopping && inner.pending.lock().waiting.is_empty() {
                if unsynced {
                    let _ = db.flush_wal(true);
                }
                return;
            }
        } else if !run.is_empty() {
            fail_run(inner, run, "the store is being reopened");
        }
        if last_space.elapsed() >= SPACE_CHECK || written_since_check >= SPACE_CHECK_BYTES {
            check_space(inner);
            last_space = std::time::Instant::now();
            written_since_check = 0;
            let failing = !inner.write_ok.load(Ordering::Acquire);
            if failing
                && !inner.low_space.load(Ordering::Acquire)
                && !inner.stop.load(Ordering::Acquire)
            {
                reopen(inner);
            }
        }
        if inner.stop.load(Ordering::Acquire) && inner.db().is_err() {
            return;
        }
    }
}

/// Closes and reopens the database: RocksDB keeps refusing writes after
/// some errors (a full disk during a flush), and a reopen clears that once
/// space is back. Readers hold the handle only briefly; the writer waits
/// for them.
fn reopen(inner: &Inner) {
    let Some(mut old) = inner.db.write().take() else {
        return;
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match Arc::try_unwrap(old) {
            Ok(db) => {
                drop(db);
                break;
            }
            Err(still_shared) => {
                if std::time::Instant::now() > deadline {
                    *inner.db.write() = Some(still_shared);
                    return;
                }
                old = still_shared;
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    let (db_options, families) = options();
    match DB::open_cf_descriptors(&db_options, &inner.path, families) {
        Ok(db) => {
            *inner.db.write() = Some(Arc::new(db));
            inner.write_ok.store(true, Ordering::Release);
            info!("store reopened after write errors; writes are accepted again");
        }
        Err(e) => warn!("cannot reopen the store yet: {e}"),
    }
}

/// Marks a run of batches as failed.
fn fail_run(inner: &Inner, run: Vec<(Ticket, Vec<StoreOp>)>, why: &str) {
    let (Some(first), Some(last)) = (run.first().map(|r| r.0), run.last().map(|r| r.0)) else {
        return;
    };
    if inner.write_ok.swap(false, Ordering::AcqRel) {
        error!(
            "store write failed: {why}; refusing new QoS 1/2 messages that need the store until writes succeed again"
        );
    }
    inner.durable_tx.send_modify(|d| {
        let mut failed: Vec<(Ticket, Ticket)> = d.failed.to_vec();
        match failed.last_mut() {
            Some((_, to)) if *to + 1 == first => *to = last,
            _ => failed.push((first, last)),
        }
        if failed.len() > FAILED_RANGES {
            failed.remove(0);
        }
        d.failed = failed.into();
        d.up_to = d.up_to.max(last);
    });
}

/// Writes a run of batches as one `WriteBatch`, then publishes the
/// watermark (or records the failure). Returns the bytes written.
fn write_run(db: &DB, inner: &Inner, run: Vec<(Ticket, Vec<StoreOp>)>, sync: bool) -> usize {
    let Some(last) = run.last().map(|r| r.0) else {
        return 0;
    };
    let tickets: Vec<Ticket> = run.iter().map(|r| r.0).collect();
    let mut batch = WriteBatch::default();
    let mut result = Ok(());
    let mut deltas = StatsDeltas::new();
    // Each queued record is encoded here before the batch copies it.
    let mut scratch = BytesMut::new();
    for (_, ops) in run {
        for op in ops {
            if let Err(e) = add(db, &mut batch, op, &*inner.clock, &mut deltas, &mut scratch) {
                result = Err(e.0);
            }
        }
    }
    if let Err(e) = flush_stats(db, &mut batch, &mut deltas) {
        result = Err(e.0);
    }
    #[cfg(test)]
    if inner
        .inject_failures
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok()
    {
        result = Err("injected write error".into());
    }
    let size = batch.size_in_bytes();
    if result.is_ok() && !batch.is_empty() {
        let mut options = WriteOptions::default();
        options.set_sync(sync);
        let started = std::time::Instant::now();
        result = db.write_opt(batch, &options).map_err(|e| e.to_string());
        if result.is_ok() && sync {
            inner.sync_times.record(started.elapsed());
            inner.syncs.fetch_add(1, Ordering::Relaxed);
        }
    }
    match result {
        Ok(()) => {
            if !inner.write_ok.swap(true, Ordering::AcqRel) {
                info!("store writes succeed again");
            }
            inner
                .durable_tx
                .send_modify(|d| d.up_to = d.up_to.max(last));
        }
        Err(e) => fail_run(
            inner,
            tickets.into_iter().map(|t| (t, Vec::new())).collect(),
            &e,
        ),
    }
    size
}

fn save_clock(db: &DB, inner: &Inner, sync: bool) {
    if !inner.write_ok.load(Ordering::Acquire) {
        return;
    }
    let Ok(meta) = cf(db, META) else {
        return;
    };
    let mut value = [0u8; 16];
    value[..8].copy_from_slice(&inner.clock.now_ms().to_be_bytes());
    value[8..].copy_from_slice(&wall_ms().to_be_bytes());
    let mut options = WriteOptions::default();
    options.set_sync(sync);
    if let Err(e) = db.put_cf_opt(meta, b"clock", value, &options) {
        warn!("could not save broker time: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Store;
    use crate::storage::rocks::RocksStore;
    use crate::storage::rocks::testing::{
        message, options, outcome, queue_put, session, write_sync,
    };
    use ferrymq_codec::{MqttString, QoS};

    #[test]
    fn queue_statistics_merged_once_a_run_stay_right_around_a_session_delete() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = RocksStore::open(dir.path(), options(Durability::GroupCommit)).expect("open");
        let put = |number, seq| StoreOp::QueuePut {
            number,
            seq,
            qos: QoS::AtLeastOnce,
            retain: false,
            identifiers: None,
            message: message(seq),
        };
        let delete = |number, seq| StoreOp::QueueDelete {
            number,
            seq,
            size: 1,
        };
        // One run: session 5 fills, drains partly and ends; session 6
        // fills and drains partly, around that delete.
        write_sync(
            &store,
            vec![
                session(5),
                session(6),
                put(5, 1),
                put(5, 2),
                put(6, 1),
                delete(5, 1),
                StoreOp::SessionDelete {
                    client_id: MqttString::from_static("c"),
                    number: 5,
                },
                put(6, 2),
                put(6, 3),
                delete(6, 1),
            ],
        );
        assert_eq!(
            store.summary(5).expect("summary").count,
            0,
            "gone with its session"
        );
        let six = store.summary(6).expect("summary");
        assert_eq!((six.count, six.bytes), (2, 2));
        assert!(six.next_seq > 3);
    }

    #[test]
    fn every_policy_syncs_at_least_once_per_acknowledged_write() {
        for durability in [Durability::SyncEach, Durability::GroupCommit] {
            let dir = tempfile::tempdir().expect("temp dir");
            let store = RocksStore::open(dir.path(), options(durability)).expect("open");
            let before = store.wal_syncs();
            // One writer, one write in flight at a time.
            for seq in 1..=20 {
                write_sync(&store, vec![queue_put(seq)]);
            }
            let times = store.sync_times();
            assert!(times.count >= 20 && times.p50 > Duration::ZERO && times.p99 >= times.p50);
            assert!(
                store.wal_syncs() - before >= 20,
                "{durability:?}: {} syncs",
                store.wal_syncs() - before
            );
        }
    }

    #[test]
    fn a_failed_write_fails_its_tickets_and_the_store_recovers() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = RocksStore::open(dir.path(), options(Durability::GroupCommit)).expect("open");
        write_sync(&store, vec![session(1), queue_put(1)]);
        store.inner.inject_failures.store(1, Ordering::Release);
        let failed = store.begin();
        store.submit(failed, vec![queue_put(2)]);
        let d = outcome(&store, failed);
        assert!(d.is_failed(failed), "the failed write is reported: {d:?}");
        assert!(!store.healthy(), "the store reports itself unhealthy");
        // The next write succeeds and the store is healthy again; the
        // failed batch never reached the disk.
        let ok = write_sync(&store, vec![queue_put(3)]);
        let d = outcome(&store, ok);
        assert!(!d.is_failed(ok));
        assert!(store.healthy());
        let seqs: Vec<u64> = store.read_queue(1, 0, 10).iter().map(|q| q.seq).collect();
        assert_eq!(seqs, [1, 3]);
    }

    #[test]
    fn a_reopen_after_write_errors_keeps_every_record_and_serves_reads() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = RocksStore::open(dir.path(), options(Durability::GroupCommit)).expect("open");
        write_sync(&store, vec![session(1), queue_put(1), queue_put(2)]);
        store.inner.write_ok.store(false, Ordering::Release);
        reopen(&store.inner);
        assert!(store.healthy(), "a successful reopen clears the failure");
        let seqs: Vec<u64> = store.read_queue(1, 0, 10).iter().map(|q| q.seq).collect();
        assert_eq!(seqs, [1, 2]);
        write_sync(&store, vec![queue_put(3)]);
        assert_eq!(store.summary(1).expect("summary").count, 3);
        // A reader holding the handle delays the reopen, never breaks it.
        let held = store.inner.db().expect("db");
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            drop(held);
        });
        store.inner.write_ok.store(false, Ordering::Release);
        reopen(&store.inner);
        releaser.join().expect("reader");
        assert!(store.healthy());
        assert_eq!(store.read_queue(1, 0, 10).len(), 3);
    }
}
