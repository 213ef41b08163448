//! [`RocksStore`]: the durable store, one RocksDB database in
//! `data_dir/db`.
//!
//! # On-disk layout
//!
//! Column families by kind; integers big-endian; values as in
//! [`super::record`] (versioned, CRC-32 checked).
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
//!
//! # Writing
//!
//! One writer thread applies batches in ticket order. With `group-commit`
//! it takes every batch queued so far, writes them as one `WriteBatch` and
//! syncs the WAL once; submitters keep queueing meanwhile, and that is the
//! next batch (no timer). `sync-each` syncs every batch on its own.
//! `interval` writes without syncing (the WAL is in the page cache, which
//! survives a killed process) and syncs every `sync_interval_ms`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use ferrymq_codec::MqttString;
use ferrymq_config::Durability;
use parking_lot::{Condvar, Mutex, RwLock};
use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, DB, DBCompressionType, Direction, IteratorMode,
    MergeOperands, Options, ReadOptions, WriteBatch, WriteOptions,
};
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::record::{self, TimeBase};
use super::{
    BrokerClock, DiskUse, Durable, InflightRecord, NodeIdentity, OutboundPhase, QueueSummary,
    QueuedRecord, Recovered, RecoveredGroup, RecoveredOrigin, RecoveredSession, Store, StoreError,
    StoreOp, Ticket, random_id,
};
use crate::dedup::DedupOrigin;

/// The schema this version reads and writes.
const SCHEMA: u32 = 1;

const META: &str = "meta";
const SESSIONS: &str = "sessions";
const SUBSCRIPTIONS: &str = "subscriptions";
const QUEUES: &str = "queues";
const QUEUE_STATS: &str = "queue_stats";
const INFLIGHT: &str = "inflight";
const QOS2_IN: &str = "qos2_in";
const RETAINED: &str = "retained";
const GROUPS: &str = "groups";
/// De-duplication origins: per origin (uuid, queue, epoch: 32 bytes) a
/// floor record (tag 0: floor, last take) and marks (tag 1, number).
const DEDUP: &str = "dedup";
const FAMILIES: [&str; 10] = [
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

/// How often broker time is saved.
const CLOCK_SAVE: Duration = Duration::from_secs(10);
/// How often disk use and free space are checked, at least.
const SPACE_CHECK: Duration = Duration::from_secs(1);
/// Bytes written between two space checks, at most: a fast writer must
/// not run a small disk full between two timed checks.
const SPACE_CHECK_BYTES: usize = 4 << 20;
/// Most failed ticket ranges remembered.
const FAILED_RANGES: usize = 64;
/// Wall clock before this (2020-01-01) is not trusted to measure downtime.
const SANE_WALL_MS: u64 = 1_577_836_800_000;

/// How the store writes and how much disk it may use.
#[derive(Debug, Clone, Copy)]
pub struct RocksOptions {
    /// The durability policy.
    pub durability: Durability,
    /// WAL sync period for `interval`.
    pub sync_interval: Duration,
    /// The disk budget of the store.
    pub max_disk_bytes: u64,
    /// The share of the budget (percent) only queues that may use the
    /// reserve (the bridges') can fill.
    pub bridge_reserve_percent: u8,
}

impl RocksOptions {
    /// The options `[storage]` asks for.
    pub fn of(storage: &ferrymq_config::Storage) -> RocksOptions {
        RocksOptions {
            durability: storage.durability,
            sync_interval: storage.sync_interval,
            max_disk_bytes: storage.max_disk_bytes,
            bridge_reserve_percent: storage.bridge_reserve_percent,
        }
    }

    /// The part of the budget that queues without a reserve may fill.
    fn shared_bytes(&self) -> u64 {
        let reserve = u64::from(self.bridge_reserve_percent.min(100));
        self.max_disk_bytes / 100 * (100 - reserve)
    }
}

fn big_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?))
}

fn key_n(number: u64) -> [u8; 8] {
    number.to_be_bytes()
}

/// A de-duplication key: the origin, a tag (0: its floor record, 1: a
/// mark) and, for a mark, the number.
fn key_dedup(origin: &DedupOrigin, tag: u8, n: u64) -> [u8; 41] {
    let mut k = [0u8; 41];
    k[..16].copy_from_slice(&origin.uuid);
    k[16..24].copy_from_slice(&origin.queue.to_be_bytes());
    k[24..32].copy_from_slice(&origin.epoch.to_be_bytes());
    k[32] = tag;
    k[33..].copy_from_slice(&n.to_be_bytes());
    k
}

/// The parts of a [`key_dedup`] key.
fn parse_key_dedup(k: &[u8]) -> Option<(DedupOrigin, u8, u64)> {
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

fn key_ns(number: u64, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&number.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn key_np(number: u64, packet_id: u16) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[..8].copy_from_slice(&number.to_be_bytes());
    k[8..].copy_from_slice(&packet_id.to_be_bytes());
    k
}

fn key_nf(number: u64, filter: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + filter.len());
    k.extend_from_slice(&number.to_be_bytes());
    k.extend_from_slice(filter.as_bytes());
    k
}

/// A `queue_stats` value or delta: count, bytes, highest sequence.
fn stats_value(count: i64, bytes: i64, max_seq: u64) -> [u8; 24] {
    let mut v = [0u8; 24];
    v[..8].copy_from_slice(&count.to_be_bytes());
    v[8..16].copy_from_slice(&bytes.to_be_bytes());
    v[16..].copy_from_slice(&max_seq.to_be_bytes());
    v
}

fn read_stats(v: &[u8]) -> (i64, i64, u64) {
    let get = |r: std::ops::Range<usize>| v.get(r).and_then(|b| <[u8; 8]>::try_from(b).ok());
    (
        get(0..8).map_or(0, i64::from_be_bytes),
        get(8..16).map_or(0, i64::from_be_bytes),
        get(16..24).map_or(0, u64::from_be_bytes),
    )
}

/// Sums count and bytes deltas, keeps the highest sequence. Associative
/// and commutative: the order writers' deltas are applied in never matters.
fn merge_stats(_key: &[u8], existing: Option<&[u8]>, operands: &MergeOperands) -> Option<Vec<u8>> {
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
fn merge_max(_key: &[u8], existing: Option<&[u8]>, operands: &MergeOperands) -> Option<Vec<u8>> {
    let mut max = existing.and_then(big_u64).unwrap_or(0);
    for op in operands {
        max = max.max(big_u64(op).unwrap_or(0));
    }
    Some(max.to_be_bytes().to_vec())
}

use crate::state::wall_ms;

/// How long WAL syncs took: a histogram with power-of-two buckets of
/// microseconds (bucket `i` holds durations below 2^i µs).
#[derive(Default)]
struct SyncTimes {
    buckets: [AtomicU64; 32],
}

impl SyncTimes {
    fn record(&self, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket = (64 - micros.leading_zeros() as usize).min(31);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }

    fn summary(&self) -> SyncSummary {
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

/// Batches submitted but not yet written.
struct Pending {
    next: Ticket,
    waiting: BTreeMap<Ticket, Vec<StoreOp>>,
}

/// What the writer thread and the store share.
struct Inner {
    /// Source of tickets.
    next_ticket: AtomicU64,
    /// Batches waiting for the writer; the writer takes every contiguous
    /// one at once.
    pending: Mutex<Pending>,
    /// Wakes the writer when a batch arrives (or to stop).
    wake: Condvar,
    /// The durability watermark.
    durable_tx: watch::Sender<Durable>,
    /// WAL syncs done.
    syncs: AtomicU64,
    /// How long they took.
    sync_times: SyncTimes,
    /// The database; replaced (reopened) by the writer after write errors
    /// once space is back, `None` only while that happens.
    db: RwLock<Option<Arc<DB>>>,
    /// Where the database lives.
    path: PathBuf,
    /// False after a write failed, until one succeeds.
    write_ok: AtomicBool,
    /// True while the filesystem has less free space than the headroom
    /// that lets acknowledgements (deletes), flushes and compactions run.
    low_space: AtomicBool,
    /// True while the store's files reached `max_disk_bytes`.
    over_budget: AtomicBool,
    /// The files reached the part of the budget outside the bridges'
    /// reserve.
    over_shared: AtomicBool,
    /// As last measured: the store's files, the filesystem's free and
    /// total bytes (`u64::MAX`: not known).
    used_bytes: AtomicU64,
    fs_free: AtomicU64,
    fs_total: AtomicU64,
    /// Set to stop the writer.
    stop: AtomicBool,
    options: RocksOptions,
    clock: Arc<BrokerClock>,
    /// Writes to fail on purpose (tests of the failure path).
    #[cfg(test)]
    inject_failures: std::sync::atomic::AtomicU32,
}

impl Inner {
    fn db(&self) -> Result<Arc<DB>, StoreError> {
        self.db
            .read()
            .clone()
            .ok_or_else(|| StoreError("the store is being reopened".into()))
    }
}

/// The durable [`Store`].
pub struct RocksStore {
    inner: Arc<Inner>,
    /// The writer thread, joined at close.
    writer: Mutex<Option<JoinHandle<()>>>,
    /// This node's identity: random at the first start, kept forever.
    pub node_uuid: [u8; 16],
    /// Bumped at every start.
    pub epoch: u64,
    /// Broker time last saved by the previous run.
    previous_run_ms: u64,
}

fn cf<'a>(db: &'a DB, name: &str) -> Result<&'a ColumnFamily, StoreError> {
    db.cf_handle(name)
        .ok_or_else(|| StoreError(format!("column family {name} is missing")))
}

fn db_error(what: &str, e: rocksdb::Error) -> StoreError {
    StoreError(format!("{what}: {e}"))
}

/// Reads a `queue_stats` value: count, bytes, highest sequence.
pub(crate) fn read_stats_value(v: &[u8]) -> (i64, i64, u64) {
    read_stats(v)
}

/// Options shared by every open of the database.
pub(crate) fn options() -> (Options, Vec<ColumnFamilyDescriptor>) {
    let mut db = Options::default();
    db.create_if_missing(true);
    db.create_missing_column_families(true);
    // Bounded WAL: older WAL files are flushed away past this.
    db.set_max_total_wal_size(64 << 20);
    db.set_write_buffer_size(16 << 20);
    db.set_keep_log_file_num(4);
    db.set_max_background_jobs(2);
    db.set_compression_type(DBCompressionType::Lz4);
    let families = FAMILIES
        .iter()
        .map(|name| {
            let mut o = Options::default();
            o.set_compression_type(DBCompressionType::Lz4);
            o.set_write_buffer_size(16 << 20);
            match *name {
                QUEUE_STATS => o.set_merge_operator_associative("ferrymq_queue_stats", merge_stats),
                META => o.set_merge_operator_associative("ferrymq_max_u64", merge_max),
                _ => {}
            }
            ColumnFamilyDescriptor::new(*name, o)
        })
        .collect();
    (db, families)
}

impl RocksStore {
    /// Opens (or creates) the store in `data_dir/db`, checks its schema,
    /// bumps the epoch and starts the writer thread.
    pub fn open(
        data_dir: &Path,
        store_options: RocksOptions,
    ) -> Result<Arc<RocksStore>, StoreError> {
        let path = data_dir.join("db");
        let (db_options, families) = options();
        let db = DB::open_cf_descriptors(&db_options, &path, families).map_err(|e| {
            StoreError(format!(
                "cannot open the store at {}: {e}. ferrymq never starts empty over existing \
                 data: if the store is damaged, repair it (RocksDB's `ldb repair`) or move it \
                 aside to start empty",
                path.display()
            ))
        })?;
        let meta = cf(&db, META)?;
        let sync = {
            let mut w = WriteOptions::default();
            w.set_sync(true);
            w
        };
        match db
            .get_cf(meta, b"schema")
            .map_err(|e| db_error("reading the schema", e))?
        {
            Some(v) => {
                let found = v
                    .get(..4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                if found != Some(SCHEMA) {
                    return Err(StoreError(format!(
                        "the store at {} has schema {}, this ferrymq reads schema {SCHEMA}: \
                         use the ferrymq version that wrote it, or move it aside",
                        path.display(),
                        found.map_or("unreadable".into(), |s| s.to_string())
                    )));
                }
            }
            None => db
                .put_cf_opt(meta, b"schema", SCHEMA.to_be_bytes(), &sync)
                .map_err(|e| db_error("writing the schema", e))?,
        }
        let node_uuid = match db
            .get_cf(meta, b"node_uuid")
            .map_err(|e| db_error("reading the node id", e))?
        {
            Some(v) if v.len() == 16 => {
                let mut id = [0u8; 16];
                id.copy_from_slice(&v);
                id
            }
            _ => {
                let id = random_id();
                db.put_cf_opt(meta, b"node_uuid", id, &sync)
                    .map_err(|e| db_error("writing the node id", e))?;
                id
            }
        };
        let epoch = db
            .get_cf(meta, b"epoch")
            .map_err(|e| db_error("reading the epoch", e))?
            .and_then(|v| big_u64(&v))
            .unwrap_or(0)
            + 1;
        db.put_cf_opt(meta, b"epoch", epoch.to_be_bytes(), &sync)
            .map_err(|e| db_error("writing the epoch", e))?;
        // Broker time: what was saved, plus the downtime if the wall clock
        // was trustworthy then and has not gone backwards since.
        let now_wall = wall_ms();
        let mut previous_run_ms = 0;
        let broker_ms = match db
            .get_cf(meta, b"clock")
            .map_err(|e| db_error("reading the clock", e))?
        {
            Some(v) if v.len() == 16 => {
                let saved = big_u64(&v[..8]).unwrap_or(0);
                previous_run_ms = saved;
                let saved_wall = big_u64(&v[8..]).unwrap_or(0);
                if saved_wall >= SANE_WALL_MS && now_wall >= saved_wall {
                    saved + (now_wall - saved_wall)
                } else {
                    warn!("the wall clock cannot measure the downtime; expiry ignores it");
                    saved
                }
            }
            _ => 0,
        };
        let clock = Arc::new(BrokerClock::starting_at(broker_ms));
        // Saved at once: a crash before the first periodic save must not
        // lose the downtime measure of this run.
        let mut clock_value = [0u8; 16];
        clock_value[..8].copy_from_slice(&broker_ms.to_be_bytes());
        clock_value[8..].copy_from_slice(&now_wall.to_be_bytes());
        db.put_cf_opt(meta, b"clock", clock_value, &sync)
            .map_err(|e| db_error("writing the clock", e))?;
        let (durable_tx, _) = watch::channel(Durable::default());
        let inner = Arc::new(Inner {
            db: RwLock::new(Some(Arc::new(db))),
            path: path.clone(),
            write_ok: AtomicBool::new(true),
            low_space: AtomicBool::new(false),
            #[cfg(test)]
            inject_failures: std::sync::atomic::AtomicU32::new(0),
            next_ticket: AtomicU64::new(1),
            pending: Mutex::new(Pending {
                next: 1,
                waiting: BTreeMap::new(),
            }),
            wake: Condvar::new(),
            durable_tx,
            syncs: AtomicU64::new(0),
            sync_times: SyncTimes::default(),
            over_budget: AtomicBool::new(false),
            over_shared: AtomicBool::new(false),
            used_bytes: AtomicU64::new(0),
            fs_free: AtomicU64::new(u64::MAX),
            fs_total: AtomicU64::new(u64::MAX),
            stop: AtomicBool::new(false),
            options: store_options,
            clock: clock.clone(),
        });
        let writer = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("ferrymq-store".into())
                .spawn(move || writer_loop(&inner))
                .map_err(|e| StoreError(format!("cannot start the store writer: {e}")))?
        };
        info!(path = %path.display(), epoch, durability = %store_options.durability, "store open");
        Ok(Arc::new(RocksStore {
            inner,
            writer: Mutex::new(Some(writer)),
            node_uuid,
            epoch,
            previous_run_ms,
        }))
    }

    /// Reads everything but the queues, skipping (and counting) records
    /// that cannot be read.
    fn recover(&self) -> Result<Recovered, StoreError> {
        let db = self.inner.db()?;
        let db = &*db;
        let time = &*self.inner.clock;
        let mut corrupt = 0u64;
        let mut skip = |what: &str, key: &[u8], e: &dyn std::fmt::Display| {
            warn!("skipping an unreadable {what} record (key {key:02x?}): {e}");
            corrupt += 1;
        };
        let mut sessions: BTreeMap<u64, RecoveredSession> = BTreeMap::new();
        for item in db.iterator_cf(cf(db, SESSIONS)?, IteratorMode::Start) {
            let (k, v) = item.map_err(|e| db_error("reading sessions", e))?;
            let Some(number) = big_u64(&k) else {
                skip("session", &k, &"bad key");
                continue;
            };
            match record::decode_session(number, &v, time) {
                Ok(record) => {
                    let queue = self.summary(number)?;
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
                Err(e) => skip("session", &k, &e),
            }
        }
        for item in db.iterator_cf(cf(db, SUBSCRIPTIONS)?, IteratorMode::Start) {
            let (k, v) = item.map_err(|e| db_error("reading subscriptions", e))?;
            let (Some(number), Some(filter)) = (big_u64(&k), k.get(8..)) else {
                skip("subscription", &k, &"bad key");
                continue;
            };
            let Ok(filter) = MqttString::new(&String::from_utf8_lossy(filter)) else {
                skip("subscription", &k, &"bad filter");
                continue;
            };
            match record::decode_subscription(&v) {
                Ok(sub) => {
                    if let Some(s) = sessions.get_mut(&number) {
                        s.subscriptions.push((filter, sub));
                    }
                }
                Err(e) => skip("subscription", &k, &e),
            }
        }
        for item in db.iterator_cf(cf(db, INFLIGHT)?, IteratorMode::Start) {
            let (k, v) = item.map_err(|e| db_error("reading in-flight state", e))?;
            let (Some(number), Some(packet_id)) = (
                big_u64(&k),
                k.get(8..10).map(|b| u16::from_be_bytes([b[0], b[1]])),
            ) else {
                skip("in-flight", &k, &"bad key");
                continue;
            };
            let (queue, seq, phase) = match record::decode_inflight(&v) {
                Ok(x) => x,
                Err(e) => {
                    skip("in-flight", &k, &e);
                    continue;
                }
            };
            let body = match phase {
                OutboundPhase::Sent => self.read_one(queue, seq),
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
        for item in db.iterator_cf(cf(db, QOS2_IN)?, IteratorMode::Start) {
            let (k, _) = item.map_err(|e| db_error("reading QoS 2 state", e))?;
            if let (Some(number), Some(id)) = (big_u64(&k), k.get(8..10))
                && let Some(s) = sessions.get_mut(&number)
            {
                s.qos2_received.push(u16::from_be_bytes([id[0], id[1]]));
            }
        }
        let mut retained = Vec::new();
        for item in db.iterator_cf(cf(db, RETAINED)?, IteratorMode::Start) {
            let (k, v) = item.map_err(|e| db_error("reading retained messages", e))?;
            match record::decode_retained(&v, time) {
                Ok(m) => retained.push(Arc::new(m)),
                Err(e) => skip("retained", &k, &e),
            }
        }
        let mut groups = Vec::new();
        for item in db.iterator_cf(cf(db, GROUPS)?, IteratorMode::Start) {
            let (k, v) = item.map_err(|e| db_error("reading groups", e))?;
            let Some(number) = big_u64(&k) else {
                skip("group", &k, &"bad key");
                continue;
            };
            match record::decode_group(&v) {
                Ok((name, filter)) => groups.push(RecoveredGroup {
                    number,
                    name,
                    filter,
                    queue: self.summary(number)?,
                }),
                Err(e) => skip("group", &k, &e),
            }
        }
        let mut dedup: BTreeMap<DedupOrigin, RecoveredOrigin> = BTreeMap::new();
        for item in db.iterator_cf(cf(db, DEDUP)?, IteratorMode::Start) {
            let (k, v) = item.map_err(|e| db_error("reading de-duplication records", e))?;
            let Some((origin, tag, n)) = parse_key_dedup(&k) else {
                skip("de-duplication", &k, &"bad key");
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
                _ => skip("de-duplication", &k, &"bad value"),
            }
        }
        let next_session_number = db
            .get_cf(cf(db, META)?, b"next_session")
            .map_err(|e| db_error("reading the session counter", e))?
            .and_then(|v| big_u64(&v))
            .unwrap_or(1);
        let state_clock = db
            .get_cf(cf(db, META)?, b"state_clock")
            .map_err(|e| db_error("reading the state clock", e))?
            .and_then(|v| big_u64(&v))
            .unwrap_or(0);
        if corrupt > 0 {
            warn!(corrupt, "skipped unreadable records at start");
        }
        Ok(Recovered {
            sessions: sessions.into_values().collect(),
            groups,
            retained,
            dedup: dedup.into_values().collect(),
            next_session_number,
            state_clock,
            corrupt,
            previous_run_ms: self.previous_run_ms,
        })
    }

    fn summary(&self, number: u64) -> Result<QueueSummary, StoreError> {
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
        let q = record::decode_queued(&v, &*self.inner.clock).ok()?;
        Some(QueuedRecord {
            seq,
            qos: q.qos,
            retain: q.retain,
            identifiers: q.identifiers,
            message: q.message,
            queued_ms: q.queued_at_ms,
        })
    }

    /// How long WAL syncs took so far.
    pub fn sync_times(&self) -> SyncSummary {
        self.inner.sync_times.summary()
    }

    /// The directory of the database.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

impl Store for RocksStore {
    fn identity(&self) -> NodeIdentity {
        NodeIdentity {
            uuid: self.node_uuid,
            epoch: self.epoch,
        }
    }

    fn pages_queues(&self) -> bool {
        true
    }

    fn begin(&self) -> Ticket {
        self.inner.next_ticket.fetch_add(1, Ordering::Relaxed)
    }

    fn submit(&self, ticket: Ticket, ops: Vec<StoreOp>) {
        let mut pending = self.inner.pending.lock();
        pending.waiting.insert(ticket, ops);
        if ticket == pending.next {
            self.inner.wake.notify_one();
        }
    }

    fn durable(&self) -> watch::Receiver<Durable> {
        self.inner.durable_tx.subscribe()
    }

    fn load(&self) -> Result<Recovered, StoreError> {
        self.recover()
    }

    fn clock(&self) -> Arc<BrokerClock> {
        self.inner.clock.clone()
    }

    fn read_queue(&self, number: u64, from_seq: u64, max: usize) -> Vec<QueuedRecord> {
        let Ok(db) = self.inner.db() else {
            return Vec::new();
        };
        let Ok(family) = cf(&db, QUEUES) else {
            return Vec::new();
        };
        let mut read = ReadOptions::default();
        read.set_iterate_upper_bound(key_n(number.saturating_add(1)).to_vec());
        let start = key_ns(number, from_seq);
        let mut out = Vec::new();
        let time = &*self.inner.clock;
        for item in db.iterator_cf_opt(family, read, IteratorMode::From(&start, Direction::Forward))
        {
            let Ok((k, v)) = item else {
                break;
            };
            let Some(seq) = k.get(8..16).and_then(big_u64) else {
                continue;
            };
            match record::decode_queued(&v, time) {
                Ok(q) => out.push(QueuedRecord {
                    seq,
                    qos: q.qos,
                    retain: q.retain,
                    identifiers: q.identifiers,
                    message: q.message,
                    queued_ms: q.queued_at_ms,
                }),
                Err(e) => warn!(
                    queue = number,
                    seq, "skipping an unreadable queued message: {e}"
                ),
            }
            if out.len() >= max {
                break;
            }
        }
        out
    }

    fn healthy(&self) -> bool {
        self.inner.write_ok.load(Ordering::Acquire) && !self.inner.low_space.load(Ordering::Acquire)
    }

    fn over_budget(&self, reserve: bool) -> bool {
        if reserve {
            self.inner.over_budget.load(Ordering::Acquire)
        } else {
            self.inner.over_shared.load(Ordering::Acquire)
        }
    }

    fn wal_syncs(&self) -> u64 {
        self.inner.syncs.load(Ordering::Relaxed)
    }

    fn disk(&self) -> DiskUse {
        let inner = &self.inner;
        let (free, total) = (
            inner.fs_free.load(Ordering::Relaxed),
            inner.fs_total.load(Ordering::Relaxed),
        );
        DiskUse {
            used_bytes: inner.used_bytes.load(Ordering::Relaxed),
            budget_bytes: inner.options.max_disk_bytes,
            filesystem: (total != u64::MAX).then_some((free, total)),
            sync_micros_log2: inner
                .sync_times
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
        }
    }

    fn close(&self) {
        self.inner.stop.store(true, Ordering::Release);
        {
            let _pending = self.inner.pending.lock();
            self.inner.wake.notify_one();
        }
        if let Some(writer) = self.writer.lock().take() {
            let _ = writer.join();
        }
    }
}

impl Drop for RocksStore {
    fn drop(&mut self) {
        self.close();
    }
}

/// Adds one op to a write batch.
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

fn add(
    db: &DB,
    batch: &mut WriteBatch,
    op: StoreOp,
    time: &dyn TimeBase,
    deltas: &mut StatsDeltas,
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
        O::SessionPut(s) => {
            batch.put_cf(
                cf(db, SESSIONS)?,
                key_n(s.number),
                record::encode_session(&s, time),
            );
            batch.merge_cf(cf(db, META)?, b"next_session", (s.number + 1).to_be_bytes());
        }
        O::SessionDelete { number, .. } => {
            batch.delete_cf(cf(db, SESSIONS)?, key_n(number));
            let (from, to) = (key_n(number), key_n(number + 1));
            for family in [SUBSCRIPTIONS, QUEUES, INFLIGHT, QOS2_IN] {
                batch.delete_range_cf(cf(db, family)?, from, to);
            }
            batch.delete_cf(cf(db, QUEUE_STATS)?, key_n(number));
        }
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
            let value = record::encode_queued(
                time.to_ms(tokio::time::Instant::now()),
                qos,
                retain,
                identifiers.as_deref(),
                &message,
                time,
            );
            batch.put_cf(cf(db, QUEUES)?, key_ns(number, seq), value);
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
        } => {
            batch.put_cf(
                cf(db, GROUPS)?,
                key_n(number),
                record::encode_group(&name, &filter),
            );
            batch.merge_cf(cf(db, META)?, b"next_session", (number + 1).to_be_bytes());
        }
        O::GroupDelete { number } => {
            batch.delete_cf(cf(db, GROUPS)?, key_n(number));
            batch.delete_range_cf(cf(db, QUEUES)?, key_n(number), key_n(number + 1));
            batch.delete_cf(cf(db, QUEUE_STATS)?, key_n(number));
        }
        O::DedupTake {
            origin,
            floor,
            mark,
            clear,
            at_ms,
        } => {
            let family = cf(db, DEDUP)?;
            let mut value = [0u8; 16];
            value[..8].copy_from_slice(&floor.to_be_bytes());
            value[8..].copy_from_slice(&at_ms.to_be_bytes());
            batch.put_cf(family, key_dedup(&origin, 0, 0), value);
            if clear {
                batch.delete_range_cf(
                    family,
                    key_dedup(&origin, 1, 0),
                    key_dedup(&origin, 1, floor),
                );
            }
            if let Some(n) = mark {
                batch.put_cf(family, key_dedup(&origin, 1, n), []);
            }
        }
        O::DedupForget { origin } => {
            batch.delete_range_cf(
                cf(db, DEDUP)?,
                key_dedup(&origin, 0, 0),
                key_dedup(&origin, 2, 0),
            );
        }
        O::StateClock(reading) => {
            batch.merge_cf(cf(db, META)?, b"state_clock", reading.to_be_bytes());
        }
    }
    Ok(())
}

/// The writer thread: takes the batches whose turn it is, writes them
/// under the durability policy, publishes the watermark; saves broker
/// time, checks disk use, and reopens the database after write errors
/// once there is space again.
fn writer_loop(inner: &Inner) {
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
    for (_, ops) in run {
        for op in ops {
            if let Err(e) = add(db, &mut batch, op, &*inner.clock, &mut deltas) {
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

/// Updates `over_budget` (the store's files reached `max_disk_bytes`: the
/// queue_full policy applies), `over_shared` (they reached the part
/// outside the bridges' reserve: it applies to every other queue) and
/// `low_space` (the filesystem has less
/// free space than the headroom acknowledgements, flushes and compactions
/// need: new messages that need the store are refused).
fn check_space(inner: &Inner) {
    let path = &inner.path;
    let used: u64 = std::fs::read_dir(path)
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    let (free, total) = filesystem_space(path).unwrap_or((u64::MAX, u64::MAX));
    inner.used_bytes.store(used, Ordering::Relaxed);
    inner.fs_free.store(free, Ordering::Relaxed);
    inner.fs_total.store(total, Ordering::Relaxed);
    // A twentieth of the filesystem, at least three memtables' worth (a
    // flush and a compaction must fit), at most 256 MiB.
    let headroom = (total / 20).clamp(48 << 20, 256 << 20);
    let over_shared = used >= inner.options.shared_bytes();
    if inner.over_shared.swap(over_shared, Ordering::AcqRel) != over_shared
        && inner.options.bridge_reserve_percent > 0
    {
        if over_shared {
            warn!(
                used,
                bridge_reserve_percent = inner.options.bridge_reserve_percent,
                "disk budget reached outside the bridges' reserve: queue_full applies to new \
                 messages for persistent sessions other than bridges"
            );
        } else {
            info!(
                used,
                "disk budget outside the bridges' reserve available again"
            );
        }
    }
    let over = used >= inner.options.max_disk_bytes;
    if inner.over_budget.swap(over, Ordering::AcqRel) != over {
        if over {
            warn!(
                used,
                max_disk_bytes = inner.options.max_disk_bytes,
                "disk budget reached: queue_full applies to new messages for persistent sessions"
            );
        } else {
            info!(used, "disk budget available again");
        }
    }
    let low = free < headroom;
    if inner.low_space.swap(low, Ordering::AcqRel) != low {
        if low {
            warn!(
                free,
                headroom, "disk almost full: refusing new messages that need the store"
            );
        } else {
            info!(free, "disk space available again");
        }
    }
}

/// Free and total bytes of the filesystem holding `path`.
fn filesystem_space(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    #[allow(unsafe_code)]
    // SAFETY: `c_path` is a valid NUL-terminated string and `stat` points
    // to writable memory of the right type; statvfs initialises it on success.
    let stat = unsafe {
        if libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) != 0 {
            return None;
        }
        stat.assume_init()
    };
    let block = stat.f_frsize as u64;
    Some((stat.f_bavail as u64 * block, stat.f_blocks as u64 * block))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Message, SessionId};
    use crate::storage::SessionRecord;
    use bytes::Bytes;
    use ferrymq_codec::{PublishProperties, QoS};
    use proptest::prelude::*;
    use std::collections::VecDeque;

    fn options(durability: Durability) -> RocksOptions {
        RocksOptions {
            durability,
            sync_interval: Duration::from_millis(10),
            max_disk_bytes: 1 << 40,
            bridge_reserve_percent: 20,
        }
    }

    fn message(n: u64) -> Arc<Message> {
        Arc::new(Message {
            topic: MqttString::from_static("q"),
            payload: Bytes::from(n.to_string()),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: PublishProperties::default(),
            origin: SessionId(1),
            expires_at: None,
            holders: Default::default(),
        })
    }

    /// Writes `ops` and waits until they are durable.
    fn write_sync(store: &RocksStore, ops: Vec<StoreOp>) -> Ticket {
        let ticket = store.begin();
        store.submit(ticket, ops);
        let mut durable = store.durable();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let _ = durable.wait_for(|d| d.up_to >= ticket).await;
        });
        ticket
    }

    fn session(number: u64) -> StoreOp {
        StoreOp::SessionPut(SessionRecord {
            client_id: MqttString::from_static("c"),
            number,
            expiry_secs: 60,
            offline_since_ms: None,
            pending_will: None,
        })
    }

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

    #[test]
    fn a_different_schema_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = RocksStore::open(dir.path(), options(Durability::GroupCommit)).expect("open");
        let db = store.inner.db().expect("db");
        db.put_cf(cf(&db, META).expect("cf"), b"schema", 99u32.to_be_bytes())
            .expect("put");
        drop(db);
        store.close();
        drop(store);
        let err = RocksStore::open(dir.path(), options(Durability::GroupCommit))
            .map(|_| ())
            .expect_err("schema 99");
        assert!(err.0.contains("schema 99"), "{}", err.0);
    }

    #[test]
    fn every_policy_syncs_at_least_once_per_acknowledged_write() {
        for durability in [Durability::SyncEach, Durability::GroupCommit] {
            let dir = tempfile::tempdir().expect("temp dir");
            let store = RocksStore::open(dir.path(), options(durability)).expect("open");
            let before = store.wal_syncs();
            // One writer, one write in flight at a time.
            for seq in 1..=20 {
                write_sync(
                    &store,
                    vec![StoreOp::QueuePut {
                        number: 1,
                        seq,
                        qos: QoS::AtLeastOnce,
                        retain: false,
                        identifiers: None,
                        message: message(seq),
                    }],
                );
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

    fn queue_put(seq: u64) -> StoreOp {
        StoreOp::QueuePut {
            number: 1,
            seq,
            qos: QoS::AtLeastOnce,
            retain: false,
            identifiers: None,
            message: message(seq),
        }
    }

    /// Waits (real time) until `ticket` has an outcome and returns it.
    fn outcome(store: &RocksStore, ticket: Ticket) -> Durable {
        let mut durable = store.durable();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            durable
                .wait_for(|d| d.up_to >= ticket)
                .await
                .map(|d| d.clone())
                .expect("the store is open")
        })
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

    #[derive(Debug, Clone)]
    enum Step {
        Append(u8),
        Ack(u8),
        Reopen,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (1u8..5).prop_map(Step::Append),
            3 => any::<u8>().prop_map(Step::Ack),
            1 => Just(Step::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// The stored queue behaves like a `VecDeque` under appends, acks
        /// of any queued message, and close/reopen cycles; its summary
        /// (count, bytes, next sequence) stays exact.
        #[test]
        fn the_queue_store_follows_a_vecdeque_model(steps in proptest::collection::vec(step(), 1..40)) {
            let dir = tempfile::tempdir().expect("temp dir");
            let mut store = RocksStore::open(dir.path(), options(Durability::GroupCommit)).expect("open");
            write_sync(&store, vec![session(1)]);
            let mut model: VecDeque<u64> = VecDeque::new();
            let mut next = 1u64;
            for step in steps {
                match step {
                    Step::Append(n) => {
                        let mut ops = Vec::new();
                        for _ in 0..n {
                            ops.push(StoreOp::QueuePut {
                                number: 1,
                                seq: next,
                                qos: QoS::AtLeastOnce,
                                retain: false,
                                identifiers: None,
                                message: message(next),
                            });
                            model.push_back(next);
                            next += 1;
                        }
                        write_sync(&store, ops);
                    }
                    Step::Ack(i) => {
                        if !model.is_empty() {
                            let seq = model.remove(usize::from(i) % model.len()).expect("index");
                            let size = seq.to_string().len() as u64;
                            write_sync(&store, vec![StoreOp::QueueDelete { number: 1, seq, size }]);
                        }
                    }
                    Step::Reopen => {
                        store.close();
                        drop(store);
                        store = RocksStore::open(dir.path(), options(Durability::GroupCommit)).expect("reopen");
                    }
                }
                let stored: Vec<u64> = store.read_queue(1, 0, 10_000).iter().map(|q| q.seq).collect();
                prop_assert_eq!(&stored, &model.iter().copied().collect::<Vec<_>>());
                let summary = store.summary(1).expect("summary");
                prop_assert_eq!(summary.count, model.len() as u64);
                let bytes: u64 = model.iter().map(|s| s.to_string().len() as u64).sum();
                prop_assert_eq!(summary.bytes, bytes);
                if next > 1 {
                    prop_assert_eq!(summary.next_seq, next);
                }
            }
        }
    }
}
