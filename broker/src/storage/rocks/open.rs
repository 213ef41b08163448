//! Opening the store: the database's options, the schema check, the
//! node's identity and epoch, and broker time carried over the downtime.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};

use parking_lot::{Condvar, Mutex, RwLock};
use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, DB, DBCompressionType, Options, WriteOptions};
use tokio::sync::watch;
use tracing::{info, warn};

use super::keys::{FAMILIES, META, QUEUE_STATS, big_u64, merge_max, merge_stats};
use super::writer::{SyncTimes, writer_loop};
use super::{Inner, Pending, RocksOptions, RocksStore, cf, db_error};
use crate::state::wall_ms;
use crate::storage::{BrokerClock, Durable, StoreError, random_id};

/// The schema this version reads and writes.
const SCHEMA: u32 = 1;
/// Wall clock before this (2020-01-01) is not trusted to measure downtime.
const SANE_WALL_MS: u64 = 1_577_836_800_000;

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
        let db = open_db(&path)?;
        let meta = cf(&db, META)?;
        let sync = {
            let mut w = WriteOptions::default();
            w.set_sync(true);
            w
        };
        check_schema(&db, meta, &sync, &path)?;
        let node_uuid = node_uuid(&db, meta, &sync)?;
        let epoch = bump_epoch(&db, meta, &sync)?;
        let (clock, previous_run_ms) = broker_time(&db, meta, &sync)?;
        let inner = Arc::new(Inner::new(db, path.clone(), store_options, clock));
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
}

/// Opens the database at `path`, or explains how to repair it: ferrymq
/// never starts empty over existing data.
fn open_db(path: &Path) -> Result<DB, StoreError> {
    let (db_options, families) = options();
    DB::open_cf_descriptors(&db_options, path, families).map_err(|e| {
        StoreError(format!(
            "cannot open the store at {}: {e}. ferrymq never starts empty over existing \
             data: if the store is damaged, repair it (RocksDB's `ldb repair`) or move it \
             aside to start empty",
            path.display()
        ))
    })
}

/// Refuses a store written with another schema; writes this one's into a
/// new store.
fn check_schema(
    db: &DB,
    meta: &ColumnFamily,
    sync: &WriteOptions,
    path: &Path,
) -> Result<(), StoreError> {
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
            .put_cf_opt(meta, b"schema", SCHEMA.to_be_bytes(), sync)
            .map_err(|e| db_error("writing the schema", e))?,
    }
    Ok(())
}

/// This node's identity: the stored one, or a random one stored now.
fn node_uuid(db: &DB, meta: &ColumnFamily, sync: &WriteOptions) -> Result<[u8; 16], StoreError> {
    let stored = db
        .get_cf(meta, b"node_uuid")
        .map_err(|e| db_error("reading the node id", e))?;
    if let Some(v) = stored
        && v.len() == 16
    {
        let mut id = [0u8; 16];
        id.copy_from_slice(&v);
        return Ok(id);
    }
    let id = random_id();
    db.put_cf_opt(meta, b"node_uuid", id, sync)
        .map_err(|e| db_error("writing the node id", e))?;
    Ok(id)
}

/// The epoch of this run: one above the stored one, stored (synced) now.
fn bump_epoch(db: &DB, meta: &ColumnFamily, sync: &WriteOptions) -> Result<u64, StoreError> {
    let epoch = db
        .get_cf(meta, b"epoch")
        .map_err(|e| db_error("reading the epoch", e))?
        .and_then(|v| big_u64(&v))
        .unwrap_or(0)
        + 1;
    db.put_cf_opt(meta, b"epoch", epoch.to_be_bytes(), sync)
        .map_err(|e| db_error("writing the epoch", e))?;
    Ok(epoch)
}

/// The broker clock of this run, and the broker time the previous run
/// last saved.
fn broker_time(
    db: &DB,
    meta: &ColumnFamily,
    sync: &WriteOptions,
) -> Result<(Arc<BrokerClock>, u64), StoreError> {
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
    db.put_cf_opt(meta, b"clock", clock_value, sync)
        .map_err(|e| db_error("writing the clock", e))?;
    Ok((clock, previous_run_ms))
}

impl Inner {
    /// What the writer thread and the store share, for a database just
    /// opened: healthy, no ticket taken yet.
    fn new(db: DB, path: PathBuf, options: RocksOptions, clock: Arc<BrokerClock>) -> Inner {
        let (durable_tx, _) = watch::channel(Durable::default());
        Inner {
            db: RwLock::new(Some(Arc::new(db))),
            path,
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
            options,
            clock,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Store;
    use crate::storage::rocks::testing::options;
    use ferrymq_config::Durability;

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
}
