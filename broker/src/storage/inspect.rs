//! `ferrymq queue stats` and `queue list`: what the store holds, read from the data
//! directory without a running broker's help. The database is opened
//! read-only, which RocksDB allows next to a running broker (the figures
//! are then a snapshot of that moment).

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferrymq_codec::QoS;

use rocksdb::{DB, Direction, IteratorMode, ReadOptions};

use super::record;
use super::rocks::{options, read_stats_value};
use super::{BrokerClock, StoreError};
use crate::message::Message;

/// One queue in the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueLine {
    /// Client identifier, or `$share/{name}/{filter}` for a shared group.
    pub owner: String,
    /// Session or group number.
    pub number: u64,
    /// Session Expiry Interval (sessions only).
    pub expiry: Option<Duration>,
    /// Offline for (sessions only; `None` if online when last written).
    pub offline_for: Option<Duration>,
    /// Messages queued.
    pub messages: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Age of the oldest queued message.
    pub oldest: Option<Duration>,
}

/// What `ferrymq queue stats` prints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueReport {
    /// Every persistent session and shared group.
    pub queues: Vec<QueueLine>,
    /// Retained messages.
    pub retained: u64,
    /// Retained messages and subscriptions with more topic levels than
    /// `max_topic_levels`: a broker with that limit skips them at start.
    pub over_level_limit: u64,
    /// Whether a running broker holds the data directory (a snapshot).
    pub running: bool,
}

/// The store of `data_dir`, opened for reading: next to a running broker
/// as a secondary instance that follows its files (with a scratch
/// directory, removed when this is dropped), otherwise read-only.
struct Reader {
    db: Option<DB>,
    scratch: std::path::PathBuf,
}

impl Reader {
    fn open(data_dir: &Path, running: bool) -> Result<Reader, StoreError> {
        let path = data_dir.join("db");
        if !path.exists() {
            return Err(StoreError(format!("no store at {}", path.display())));
        }
        let (mut db_options, _) = options();
        // Descriptors carry the merge operators the statistics need.
        let descriptors = || options().1;
        let cannot = |e: rocksdb::Error| {
            StoreError(format!("cannot read the store at {}: {e}", path.display()))
        };
        let scratch = tempfile_dir()?;
        let db = if running {
            db_options.set_max_open_files(-1);
            DB::open_cf_descriptors_as_secondary(&db_options, &path, &scratch, descriptors())
                .and_then(|db| db.try_catch_up_with_primary().map(|()| db))
        } else {
            DB::open_cf_descriptors_read_only(&db_options, &path, descriptors(), false)
        };
        match db {
            Ok(db) => Ok(Reader {
                db: Some(db),
                scratch,
            }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&scratch);
                Err(cannot(e))
            }
        }
    }

    fn db(&self) -> &DB {
        self.db
            .as_ref()
            .unwrap_or_else(|| unreachable!("set until drop"))
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily, StoreError> {
        self.db()
            .cf_handle(name)
            .ok_or_else(|| StoreError(format!("column family {name} is missing")))
    }

    /// The records of queue `number` (session or group), oldest first.
    fn queue(&self, number: u64) -> Result<rocksdb::DBIteratorWithThreadMode<'_, DB>, StoreError> {
        let mut read = ReadOptions::default();
        read.set_iterate_upper_bound(number.saturating_add(1).to_be_bytes().to_vec());
        let start = number.to_be_bytes();
        Ok(self.db().iterator_cf_opt(
            self.cf("queues")?,
            read,
            IteratorMode::From(&start, Direction::Forward),
        ))
    }

    /// Broker time as last saved (the running broker saves it every 10 s).
    fn now_ms(&self) -> u64 {
        let db = self.db();
        db.cf_handle("meta")
            .and_then(|meta| db.get_cf(meta, b"clock").ok().flatten())
            .and_then(|v| be_u64(&v))
            .unwrap_or(0)
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        drop(self.db.take());
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// One queued message, as `ferrymq queue list` shows it.
#[derive(Debug, Clone)]
pub struct ListedMessage {
    /// Position in its queue.
    pub seq: u64,
    /// How long it has been queued.
    pub age: Duration,
    /// Delivery QoS.
    pub qos: QoS,
    /// The message.
    pub message: Arc<Message>,
}

/// The oldest `limit` messages queued for session `client_id` (a bridge's
/// dead letters: `$bridge/{name}/dead`), and how many it holds in all.
/// `Ok(None)` when there is no persistent session of that name.
pub fn queue_list(
    data_dir: &Path,
    running: bool,
    client_id: &str,
    limit: usize,
) -> Result<Option<(Vec<ListedMessage>, u64)>, StoreError> {
    let reader = Reader::open(data_dir, running)?;
    let db = reader.db();
    let now_ms = reader.now_ms();
    let clock = BrokerClock::starting_at(now_ms);
    let mut number = None;
    for item in db.iterator_cf(reader.cf("sessions")?, IteratorMode::Start) {
        let (k, v) = item.map_err(|e| StoreError(e.to_string()))?;
        let Some(n) = be_u64(&k) else {
            continue;
        };
        if record::decode_session(n, v.into(), &clock)
            .is_ok_and(|s| s.client_id.as_str() == client_id)
        {
            number = Some(n);
        }
    }
    let Some(number) = number else {
        return Ok(None);
    };
    let mut listed = Vec::new();
    let mut total = 0;
    for item in reader.queue(number)? {
        let (k, v) = item.map_err(|e| StoreError(e.to_string()))?;
        total += 1;
        if listed.len() >= limit {
            continue;
        }
        let seq = k.get(8..).and_then(be_u64).unwrap_or(0);
        let q = record::decode_queued(v.into(), &clock)
            .map_err(|e| StoreError(format!("queued message {seq} of {client_id}: {e:?}")))?;
        listed.push(ListedMessage {
            seq,
            age: Duration::from_millis(now_ms.saturating_sub(q.queued_at_ms)),
            qos: q.qos,
            message: q.message,
        });
    }
    Ok(Some((listed, total)))
}

/// How `ferrymq queue list` prints a message: position (`EPOCH:N`), age, QoS, size,
/// topic, and the start of the payload (escaped).
impl fmt::Display for ListedMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const PREVIEW: usize = 40;
        let payload = &self.message.payload;
        let shown = &payload[..payload.len().min(PREVIEW)];
        let more = if payload.len() > PREVIEW { "..." } else { "" };
        let shift = super::SEQ_EPOCH_SHIFT;
        // As in a `ferry-id`: the run that queued it, and its number.
        let position = format!("{}:{}", self.seq >> shift, self.seq & ((1 << shift) - 1));
        writeln!(
            f,
            "{position:>10}  {:>8} ago  qos {}  {:>9}  {}  {}{more}",
            human_duration(self.age),
            self.qos as u8,
            human_bytes(payload.len() as u64),
            self.message.topic,
            shown.escape_ascii(),
        )
    }
}

/// Reads the report from the store in `data_dir`.
/// `max_topic_levels` (0: none) is the limit the report counts records
/// beyond, as a broker with that limit would skip them at start.
pub fn queue_stats(
    data_dir: &Path,
    running: bool,
    max_topic_levels: u32,
) -> Result<QueueReport, StoreError> {
    let reader = Reader::open(data_dir, running)?;
    let db = reader.db();
    let now_ms = reader.now_ms();
    let clock = BrokerClock::starting_at(now_ms);
    let mut report = QueueReport {
        running,
        ..QueueReport::default()
    };
    let age = |ms: u64| Duration::from_millis(now_ms.saturating_sub(ms));
    let oldest = |number: u64| -> Option<Duration> {
        let (_, v) = reader.queue(number).ok()?.next()?.ok()?;
        let q = record::decode_queued(v.into(), &clock).ok()?;
        Some(age(q.queued_at_ms))
    };
    let stats = |number: u64| -> (u64, u64) {
        db.cf_handle("queue_stats")
            .and_then(|f| db.get_cf(f, number.to_be_bytes()).ok().flatten())
            .map_or((0, 0), |v| {
                let (count, bytes, _) = read_stats_value(&v);
                (count.max(0) as u64, bytes.max(0) as u64)
            })
    };
    for item in db.iterator_cf(reader.cf("sessions")?, IteratorMode::Start) {
        let (k, v) = item.map_err(|e| StoreError(e.to_string()))?;
        let Some(number) = be_u64(&k) else {
            continue;
        };
        let Ok(session) = record::decode_session(number, v.into(), &clock) else {
            continue;
        };
        let (messages, bytes) = stats(number);
        report.queues.push(QueueLine {
            owner: session.client_id.to_string(),
            number,
            expiry: Some(Duration::from_secs(u64::from(session.expiry_secs))),
            offline_for: session.offline_since_ms.map(age),
            messages,
            bytes,
            oldest: oldest(number),
        });
    }
    for item in db.iterator_cf(reader.cf("groups")?, IteratorMode::Start) {
        let (k, v) = item.map_err(|e| StoreError(e.to_string()))?;
        let Some(number) = be_u64(&k) else {
            continue;
        };
        let Ok((name, filter)) = record::decode_group(v.into()) else {
            continue;
        };
        let (messages, bytes) = stats(number);
        report.queues.push(QueueLine {
            owner: format!("$share/{name}/{filter}"),
            number,
            expiry: None,
            offline_for: None,
            messages,
            bytes,
            oldest: oldest(number),
        });
    }
    let too_deep = |topic: &[u8]| {
        ferrymq_codec::topic::exceeds_levels(&String::from_utf8_lossy(topic), max_topic_levels)
    };
    for item in db.iterator_cf(reader.cf("retained")?, IteratorMode::Start) {
        let (topic, _) = item.map_err(|e| StoreError(e.to_string()))?;
        report.retained += 1;
        report.over_level_limit += u64::from(too_deep(&topic));
    }
    for item in db.iterator_cf(reader.cf("subscriptions")?, IteratorMode::Start) {
        let (key, _) = item.map_err(|e| StoreError(e.to_string()))?;
        report.over_level_limit += u64::from(key.get(8..).is_some_and(too_deep));
    }
    Ok(report)
}

/// The big-endian number at the start of a key or value (session and
/// group numbers, sequences, times).
fn be_u64(bytes: &[u8]) -> Option<u64> {
    bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
}

/// A fresh scratch directory for a secondary instance.
fn tempfile_dir() -> Result<std::path::PathBuf, StoreError> {
    let dir = std::env::temp_dir().join(format!(
        "ferrymq-inspect-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&dir)
        .map_err(|e| StoreError(format!("cannot create {}: {e}", dir.display())))?;
    Ok(dir)
}

fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86_400, (s % 86_400) / 3600),
    }
}

fn human_bytes(b: u64) -> String {
    match b {
        0..1024 => format!("{b} B"),
        1024..1_048_576 => format!("{:.1} KiB", b as f64 / 1024.0),
        1_048_576..1_073_741_824 => format!("{:.1} MiB", b as f64 / 1_048_576.0),
        _ => format!("{:.2} GiB", b as f64 / 1_073_741_824.0),
    }
}

impl fmt::Display for QueueReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.running {
            writeln!(
                f,
                "(a broker is running on this data directory: a snapshot of now)"
            )?;
        }
        writeln!(
            f,
            "{:<32} {:>8} {:>10} {:>12} {:>10} {:>12} {:>10}",
            "session / group", "number", "expiry", "offline for", "messages", "bytes", "oldest"
        )?;
        for q in &self.queues {
            let opt = |d: Option<Duration>| d.map_or("-".to_string(), human_duration);
            let expiry = match q.expiry {
                Some(d) if d.as_secs() >= u64::from(u32::MAX) => "never".to_string(),
                other => opt(other),
            };
            writeln!(
                f,
                "{:<32} {:>8} {:>10} {:>12} {:>10} {:>12} {:>10}",
                q.owner,
                q.number,
                expiry,
                opt(q.offline_for),
                q.messages,
                human_bytes(q.bytes),
                opt(q.oldest)
            )?;
        }
        let total: u64 = self.queues.iter().map(|q| q.messages).sum();
        let bytes: u64 = self.queues.iter().map(|q| q.bytes).sum();
        writeln!(
            f,
            "{} queues, {} messages, {} queued; {} retained messages",
            self.queues.len(),
            total,
            human_bytes(bytes),
            self.retained
        )?;
        if self.over_level_limit > 0 {
            writeln!(
                f,
                "{} retained messages or subscriptions have more topic levels than \
                 limits.max_topic_levels: skipped at start, kept on disk",
                self.over_level_limit
            )?;
        }
        Ok(())
    }
}
