//! [`RocksStore`]: the durable store, one RocksDB database in
//! `data_dir/db`.
//!
//! By role, one file each:
//!
//! - `keys.rs`: the on-disk layout (column families, keys, values) and
//!   the merge operators that keep the queue statistics.
//! - `open.rs`: opening: the database's options, the schema check, the
//!   node's identity and epoch, broker time carried over the downtime.
//! - `recover.rs`: what start-up reads, everything but the queues.
//! - `writer.rs`: the writer thread: ops into write batches, the
//!   durability policies, the watermark, failed writes, reopening.
//! - `space.rs`: disk use against the budget, free space against the
//!   headroom.
//! - this file: the store's types and the [`Store`] API (tickets,
//!   submitting, paging queues, health, closing).
//! - `testing.rs` (tests only): what the tests of these files share.

mod keys;
mod open;
mod recover;
mod space;
#[cfg(test)]
mod testing;
mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use ferrymq_config::Durability;
use parking_lot::{Condvar, Mutex, RwLock};
use rocksdb::{ColumnFamily, DB, Direction, IteratorMode, ReadOptions};
use tokio::sync::watch;
use tracing::warn;

use super::record;
use super::{
    BrokerClock, DiskUse, Durable, NodeIdentity, QueuedRecord, Recovered, Store, StoreError,
    StoreOp, Ticket,
};
use keys::{QUEUES, big_u64, key_n, key_ns};
use writer::SyncTimes;

pub(crate) use keys::read_stats_value;
pub(crate) use open::options;
pub use writer::SyncSummary;

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

impl RocksStore {
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
            match record::decode_queued(v.into(), time) {
                Ok(q) => out.push(q.at(seq)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::rocks::testing::{message, options, session, write_sync};
    use ferrymq_codec::QoS;
    use proptest::prelude::*;
    use std::collections::VecDeque;

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
