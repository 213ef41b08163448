//! Store micro-benchmarks: the RocksDB store (`RocksStore`, durability
//! `group-commit`, in a temporary directory on the machine's disk) doing
//! what the broker asks of it for a persistent session's queue, through
//! the public `Store` API, with 64-byte payloads.
//!
//! - `append`: queue messages for a session (`StoreOp::QueuePut`), submit,
//!   wait until the watermark says durable. Three shapes: one message per
//!   batch (a lone publisher: one WAL sync per message), 100 messages in
//!   one batch (one ticket), and 100 batches of one message submitted back
//!   to back before waiting for the last (100 publishers at once: the
//!   writer groups whatever is pending into one write and one sync).
//! - `ack`: the same three shapes with what a PUBACK writes
//!   (`QueueDelete` + `InflightDelete`) for messages queued beforehand.
//!   The broker never waits for these; waiting here measures how fast the
//!   store takes them.
//! - `scan`: `Store::read_queue` of a page of N messages from the start
//!   of a session's queue of 10,000 (what paging after a restart does),
//!   with a neighbouring queue of 10,000 after it; once while the data is
//!   in the memtable, once after a reopen (recovery flushes it to a table
//!   file).
//!
//! Times are per message (`Throughput::Elements`). After each write
//! benchmark the number of messages per WAL sync is printed (warm-up
//! included). Append and ack are bound by the disk's sync latency, so
//! they use flat sampling and 10 samples.
//!
//! Run: `cargo bench --bench store`. Under `cargo test --benches` each
//! benchmark runs once, as a smoke test.

use std::cell::Cell;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group,
    criterion_main, measurement::WallTime,
};
use ferrymq_broker::storage::{Batch, Durable, StoreOp, Ticket};
use ferrymq_broker::{Message, QoS, RocksOptions, RocksStore, SessionId, Store};
use ferrymq_codec::{MqttString, PublishProperties};
use ferrymq_config::Durability;
use tokio::sync::watch;

/// The queue (session number) written and read.
const SESSION: u64 = 7;
/// Messages in the queue `scan` reads, and in its neighbour's.
const SCAN_QUEUE: u64 = 10_000;

/// A store in a temporary directory and a way to wait for its watermark.
struct Fixture {
    store: Arc<RocksStore>,
    durable: watch::Receiver<Durable>,
    /// Drives `watch::Receiver::wait_for` from the benchmark thread.
    rt: tokio::runtime::Runtime,
    /// The next sequence of the queue.
    next_seq: u64,
    /// The message every op carries: 64-byte payload.
    message: Arc<Message>,
}

impl Fixture {
    fn open(dir: &Path) -> Fixture {
        let store = RocksStore::open(
            dir,
            RocksOptions {
                durability: Durability::GroupCommit,
                sync_interval: Duration::from_millis(100),
                max_disk_bytes: 8 << 30,
                bridge_reserve_percent: 20,
            },
        )
        .expect("store opens");
        store.load().expect("store loads");
        Fixture {
            durable: store.durable(),
            next_seq: store.identity().first_seq(),
            store,
            rt: tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime"),
            message: Arc::new(Message {
                topic: MqttString::from_static("site-3/area-1/sensor-7/temp"),
                payload: Bytes::from(vec![0x5A; 64]),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: PublishProperties::default(),
                origin: SessionId(1),
                expires_at: None,
                holders: Default::default(),
            }),
        }
    }

    fn put(&self, number: u64, seq: u64) -> StoreOp {
        StoreOp::QueuePut {
            number,
            seq,
            qos: QoS::AtLeastOnce,
            retain: false,
            identifiers: None,
            message: self.message.clone(),
        }
    }

    /// What a PUBACK of the message at `seq` writes.
    fn ack(&self, seq: u64, ops: &mut Vec<StoreOp>) {
        ops.push(StoreOp::QueueDelete {
            number: SESSION,
            seq,
            size: self.message.payload.len() as u64,
        });
        ops.push(StoreOp::InflightDelete {
            number: SESSION,
            packet_id: packet_id(seq),
        });
    }

    /// Blocks until `ticket` is durable.
    fn wait(&mut self, ticket: Ticket) {
        let durable = &mut self.durable;
        let outcome = self.rt.block_on(async {
            durable
                .wait_for(|d| d.up_to >= ticket)
                .await
                .map(|d| d.is_durable(ticket))
        });
        assert_eq!(outcome.ok(), Some(true), "ticket {ticket} written");
    }

    /// Queues `count` messages (with their in-flight entries when
    /// `inflight`, as after delivery), durable on return; their sequences.
    fn fill(&mut self, number: u64, count: u64, inflight: bool) -> std::ops::Range<u64> {
        let first = self.next_seq;
        let mut ticket = 0;
        let mut batch = Batch::new(&*self.store);
        for seq in first..first + count {
            batch.push(self.put(number, seq));
            if inflight {
                batch.push(StoreOp::InflightPut {
                    number,
                    packet_id: packet_id(seq),
                    queue: number,
                    seq,
                    phase: ferrymq_broker::storage::OutboundPhase::Sent,
                });
            }
            if (seq - first) % 1000 == 999 {
                ticket = std::mem::replace(&mut batch, Batch::new(&*self.store)).submit();
            }
        }
        ticket = ticket.max(batch.submit());
        if ticket > 0 {
            self.wait(ticket);
        }
        self.next_seq += count;
        first..first + count
    }

    /// Removes `seqs` from the queue (untimed clean-up), durable on return.
    fn clear(&mut self, seqs: std::ops::Range<u64>) {
        let mut ops = Vec::new();
        for seq in seqs {
            self.ack(seq, &mut ops);
        }
        let mut batch = Batch::new(&*self.store);
        for op in ops {
            batch.push(op);
        }
        let ticket = batch.submit();
        if ticket > 0 {
            self.wait(ticket);
        }
    }

    /// Submits `batches` tickets of `per_batch` messages each, made by
    /// `op` from consecutive `seqs`, and waits for the last one.
    fn round(
        &mut self,
        batches: u64,
        per_batch: u64,
        seqs: &mut std::ops::Range<u64>,
        op: impl Fn(&Fixture, u64, &mut Vec<StoreOp>),
    ) {
        let mut last = 0;
        for _ in 0..batches {
            let mut ops = Vec::with_capacity(2 * per_batch as usize);
            for _ in 0..per_batch {
                let seq = seqs.next().expect("enough sequences");
                op(self, seq, &mut ops);
            }
            let mut batch = Batch::new(&*self.store);
            for op in ops {
                batch.push(op);
            }
            last = batch.submit();
        }
        self.wait(last);
    }
}

fn packet_id(seq: u64) -> u16 {
    (seq % 65_535) as u16 + 1
}

/// Batch shapes: (tickets submitted before waiting, messages per ticket).
const SHAPES: [(u64, u64, &str); 3] = [
    (1, 1, "1 batch of 1"),
    (1, 100, "1 batch of 100"),
    (100, 1, "100 batches of 1"),
];

fn writes(group: &mut BenchmarkGroup<'_, WallTime>, fx: &mut Fixture) {
    for (batches, per_batch, shape) in SHAPES {
        let per_round = batches * per_batch;
        group.throughput(Throughput::Elements(per_round));
        // Messages and WAL syncs of the timed parts, warm-up included.
        let counts = Cell::new((0u64, 0u64));
        let count = |messages: u64, syncs: u64| {
            let (m, s) = counts.get();
            counts.set((m + messages, s + syncs));
        };

        group.bench_function(BenchmarkId::new("append", shape), |b| {
            b.iter_custom(|iters| {
                let first = fx.next_seq;
                let mut seqs = first..first + iters * per_round;
                fx.next_seq = seqs.end;
                let syncs = fx.store.wal_syncs();
                let started = Instant::now();
                for _ in 0..iters {
                    fx.round(batches, per_batch, &mut seqs, |fx, seq, ops| {
                        ops.push(fx.put(SESSION, seq))
                    });
                }
                let took = started.elapsed();
                count(iters * per_round, fx.store.wal_syncs() - syncs);
                fx.clear(first..fx.next_seq);
                took
            })
        });
        report_syncs("append", shape, counts.replace((0, 0)));

        group.bench_function(BenchmarkId::new("ack", shape), |b| {
            b.iter_custom(|iters| {
                let mut seqs = fx.fill(SESSION, iters * per_round, true);
                let syncs = fx.store.wal_syncs();
                let started = Instant::now();
                for _ in 0..iters {
                    fx.round(batches, per_batch, &mut seqs, |fx, seq, ops| {
                        fx.ack(seq, ops)
                    });
                }
                let took = started.elapsed();
                count(iters * per_round, fx.store.wal_syncs() - syncs);
                took
            })
        });
        report_syncs("ack", shape, counts.get());
    }
}

fn report_syncs(op: &str, shape: &str, (messages, syncs): (u64, u64)) {
    if syncs > 0 {
        eprintln!(
            "store/{op}/{shape}: {messages} messages, {syncs} WAL syncs ({:.1} messages per sync)",
            messages as f64 / syncs as f64
        );
    }
}

fn scans(group: &mut BenchmarkGroup<'_, WallTime>, fx: &Fixture, when: &str, first: u64) {
    for page in [16usize, 256] {
        group.throughput(Throughput::Elements(page as u64));
        group.bench_function(BenchmarkId::new(format!("scan {when}"), page), |b| {
            b.iter(|| {
                let records = fx.store.read_queue(SESSION, black_box(0), page);
                assert_eq!(records.first().map(|r| r.seq), Some(first));
                assert_eq!(records.len(), page);
                records
            })
        });
    }
}

fn store(c: &mut Criterion) {
    let mut group = c.benchmark_group("store");
    {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut fx = Fixture::open(dir.path());
        group.sampling_mode(SamplingMode::Flat).sample_size(10);
        writes(&mut group, &mut fx);
    }
    // Scans, in a store of their own (the writes leave tombstones).
    group.sampling_mode(SamplingMode::Auto).sample_size(100);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut fx = Fixture::open(dir.path());
    let first = fx.fill(SESSION, SCAN_QUEUE, false).start;
    fx.fill(SESSION + 1, SCAN_QUEUE, false);
    scans(&mut group, &fx, "memtable", first);
    drop(fx);
    let fx = Fixture::open(dir.path());
    let tables = std::fs::read_dir(fx.store.path())
        .expect("store directory")
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "sst"))
        .count();
    assert!(tables > 0, "the reopen flushed the queues to table files");
    scans(&mut group, &fx, "table file", first);
    group.finish();
}

criterion_group!(benches, store);
criterion_main!(benches);
