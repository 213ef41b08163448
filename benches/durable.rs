//! Durable QoS 1 load program: what acknowledging only what is on disk
//! costs, per durability policy, next to the in-memory store and to
//! Mosquitto without a queue limit (volatile, lossless) in the same run.
//!
//! Scenario: 10 publishers, each with up to 100 QoS 1 publishes in flight,
//! 64-byte payloads, fan in to one online persistent (clean session 0)
//! subscriber over MQTT 3.1.1 on loopback. Reported per broker: delivered
//! msgs/s (unique messages at the subscriber over the run), PUBACK latency
//! and publish-to-delivery latency (p50/p99, from timestamps), WAL syncs/s,
//! the WAL write+sync time (p50/p99, upper bounds of power-of-two
//! buckets), and bytes the broker process wrote to the block device per
//! message (`write_bytes` of /proc/PID/io: flash wear). Losses and
//! duplicates are counted, never hidden.
//!
//! With `--startup-gib G` it also fills a store with G GiB of queued
//! messages (16 KiB each, for an offline persistent subscriber), restarts
//! the broker on it and reports how long the start took and the first
//! delivery after it.
//!
//! Run:
//!   cargo bench --bench durable
//!   cargo bench --bench durable -- --messages 50000 --startup-gib 4
//!   options: --messages N (per publisher; `sync-each` gets a twentieth),
//!            --publishers N, --window N, --startup-gib G,
//!            --modes memory,group-commit,sync-each,interval,mosquitto
//!
//! Under `cargo test --benches` (and nextest) it runs a small smoke load
//! that checks nothing is lost, Mosquitto left out.

#[allow(dead_code)]
mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::{Args, Mosquitto};
use ferrymq_broker::{Broker, MemoryStore, RocksOptions, RocksStore, Store, SyncSummary};
use ferrymq_codec::{
    Connect, ConnectProperties, Disconnect, MqttString, Packet, Protocol, PubAck, Publish, QoS,
    Subscribe, Subscription, SubscriptionOptions, decode,
};
use ferrymq_config::{Config, Durability};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// No progress for this long ends a run (and counts what is missing).
const STALL: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
struct Load {
    publishers: usize,
    window: usize,
    /// Per publisher.
    messages: usize,
    payload: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Memory,
    Rocks(Durability),
    Mosquitto,
}

impl Mode {
    fn parse(name: &str) -> Mode {
        match name {
            "memory" => Mode::Memory,
            "group-commit" => Mode::Rocks(Durability::GroupCommit),
            "sync-each" => Mode::Rocks(Durability::SyncEach),
            "interval" => Mode::Rocks(Durability::Interval),
            "mosquitto" => Mode::Mosquitto,
            other => panic!("unknown mode {other}"),
        }
    }

    fn label(self) -> String {
        match self {
            Mode::Memory => "ferrymq, in-memory store".into(),
            Mode::Rocks(d) => format!("ferrymq, RocksDB `{d}`"),
            Mode::Mosquitto => "Mosquitto 2, `max_queued_messages 0`, no persistence".into(),
        }
    }
}

/// What one run measured.
struct Outcome {
    mode: Mode,
    expected: u64,
    delivered: u64,
    duplicates: u64,
    elapsed: Duration,
    ack_micros: Vec<u32>,
    delivery_micros: Vec<u32>,
    syncs: Option<u64>,
    sync_times: Option<SyncSummary>,
    device_bytes: Option<u64>,
}

/// An MQTT 3.1.1 connection driven by our codec, writes batched.
struct Conn {
    stream: TcpStream,
    input: BytesMut,
    output: BytesMut,
}

impl Conn {
    async fn open(addr: std::net::SocketAddr, client_id: &str, clean: bool) -> Conn {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let mut conn = Conn {
            stream,
            input: BytesMut::with_capacity(64 * 1024),
            output: BytesMut::with_capacity(64 * 1024),
        };
        conn.queue(&Packet::Connect(Box::new(Connect {
            protocol: Protocol::V311,
            clean_start: clean,
            keep_alive: 120,
            client_id: MqttString::new(client_id).expect("client id"),
            will: None,
            username: None,
            password: None,
            properties: ConnectProperties::default(),
        })));
        conn.flush().await;
        match conn.next_packet().await {
            Some(Packet::ConnAck(ack)) if !ack.reason_code.is_error() => conn,
            other => panic!("{client_id}: expected CONNACK, got {other:?}"),
        }
    }

    fn queue(&mut self, packet: &Packet) {
        packet
            .encode(Protocol::V311, &mut self.output)
            .expect("encode");
    }

    async fn flush(&mut self) {
        if !self.output.is_empty() {
            self.stream
                .write_all(&self.output)
                .await
                .expect("write to the broker");
            self.output.clear();
        }
    }

    /// Reads more bytes; false when the connection closed.
    async fn fill(&mut self) -> bool {
        matches!(self.stream.read_buf(&mut self.input).await, Ok(n) if n > 0)
    }

    fn decoded(&mut self) -> Option<Packet> {
        decode(&mut self.input, Protocol::V311, u32::MAX).expect("a valid packet from the broker")
    }

    async fn next_packet(&mut self) -> Option<Packet> {
        loop {
            if let Some(p) = self.decoded() {
                return Some(p);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    async fn subscribe(&mut self, filter: &str) {
        self.queue(&Packet::Subscribe(Subscribe {
            packet_id: 1,
            subscriptions: vec![Subscription {
                filter: MqttString::new(filter).expect("filter"),
                options: SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    ..SubscriptionOptions::default()
                },
            }],
            properties: Default::default(),
        }));
        self.flush().await;
        match self.next_packet().await {
            Some(Packet::SubAck(_)) => {}
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    async fn disconnect(mut self) {
        self.queue(&Packet::Disconnect(Disconnect::default()));
        self.flush().await;
        let _ = self.stream.shutdown().await;
    }
}

fn micros_since(epoch: Instant, then_nanos: u64) -> u32 {
    let now = epoch.elapsed().as_nanos() as u64;
    u32::try_from(now.saturating_sub(then_nanos) / 1000).unwrap_or(u32::MAX)
}

/// Incompressible filler, different per publisher.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// One publisher: `load.messages` QoS 1 publishes, at most `load.window`
/// unacknowledged. Payload: send time (ns since `epoch`), publisher, number,
/// then filler. Returns the PUBACK latencies.
async fn publisher(
    addr: std::net::SocketAddr,
    index: usize,
    load: Load,
    epoch: Instant,
) -> Vec<u32> {
    let mut conn = Conn::open(addr, &format!("bench-pub-{index}"), true).await;
    let topic = MqttString::new(&format!("bench/{index}")).expect("topic");
    let mut payload = noise(index as u64 + 1, load.payload.max(16));
    let mut sent_at = vec![0u64; load.window + 1];
    let mut free: Vec<u16> = (1..=load.window as u16).rev().collect();
    let mut latencies = Vec::with_capacity(load.messages);
    let (mut sent, mut acked) = (0usize, 0usize);
    while acked < load.messages {
        while sent < load.messages {
            let Some(id) = free.pop() else { break };
            let now = epoch.elapsed().as_nanos() as u64;
            payload[..8].copy_from_slice(&now.to_le_bytes());
            payload[8..12].copy_from_slice(&(index as u32).to_le_bytes());
            payload[12..16].copy_from_slice(&(sent as u32).to_le_bytes());
            sent_at[usize::from(id)] = now;
            conn.queue(&Packet::Publish(Publish {
                qos: QoS::AtLeastOnce,
                packet_id: id,
                topic: topic.clone(),
                payload: Bytes::copy_from_slice(&payload),
                ..Publish::default()
            }));
            sent += 1;
        }
        conn.flush().await;
        if !conn.fill().await {
            panic!("publisher {index}: the broker closed the connection");
        }
        while let Some(packet) = conn.decoded() {
            if let Packet::PubAck(ack) = packet {
                assert!(
                    !ack.reason_code.is_error(),
                    "publisher {index}: refused with {:?}",
                    ack.reason_code
                );
                latencies.push(micros_since(epoch, sent_at[usize::from(ack.packet_id)]));
                free.push(ack.packet_id);
                acked += 1;
            }
        }
    }
    conn.disconnect().await;
    latencies
}

/// What the subscriber saw.
struct Received {
    unique: u64,
    duplicates: u64,
    latencies: Vec<u32>,
    last: Instant,
}

/// The persistent subscriber: acknowledges every message, counts unique
/// ones until `load` is complete or nothing arrives for [`STALL`].
async fn subscriber(mut conn: Conn, load: Load, epoch: Instant) -> Received {
    let total = (load.publishers * load.messages) as u64;
    let mut seen = vec![vec![false; load.messages]; load.publishers];
    let mut got = Received {
        unique: 0,
        duplicates: 0,
        latencies: Vec::with_capacity(total as usize),
        last: Instant::now(),
    };
    while got.unique < total {
        match tokio::time::timeout(STALL, conn.fill()).await {
            Ok(true) => {}
            Ok(false) | Err(_) => break,
        }
        while let Some(packet) = conn.decoded() {
            let Packet::Publish(p) = packet else { continue };
            if p.qos != QoS::AtMostOnce {
                conn.queue(&Packet::PubAck(PubAck::new(p.packet_id)));
            }
            let field = |r: std::ops::Range<usize>| {
                p.payload.get(r).map_or(0, |b| {
                    b.iter().rev().fold(0u64, |a, x| a << 8 | u64::from(*x))
                })
            };
            let (sent, from, number) = (field(0..8), field(8..12), field(12..16));
            let Some(slot) = seen
                .get_mut(from as usize)
                .and_then(|s| s.get_mut(number as usize))
            else {
                continue;
            };
            if *slot {
                got.duplicates += 1;
            } else {
                *slot = true;
                got.unique += 1;
                got.latencies.push(micros_since(epoch, sent));
            }
        }
        conn.flush().await;
        got.last = Instant::now();
    }
    conn.disconnect().await;
    got
}

fn device_write_bytes(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// A broker under test.
enum Target {
    Ferrymq {
        broker: Broker,
        rocks: Option<Arc<RocksStore>>,
        _dir: tempfile::TempDir,
    },
    Mosquitto(Mosquitto),
}

impl Target {
    fn addr(&self) -> std::net::SocketAddr {
        match self {
            Target::Ferrymq { broker, .. } => broker.local_addrs()[0],
            Target::Mosquitto(m) => m.addr(),
        }
    }

    fn pid(&self) -> u32 {
        match self {
            Target::Ferrymq { .. } => std::process::id(),
            Target::Mosquitto(m) => m.pid(),
        }
    }
}

fn bench_config(data_dir: &Path) -> Config {
    let mut config = Config {
        data_dir: data_dir.to_path_buf(),
        ..Config::default()
    };
    config.listeners[0].bind = "127.0.0.1:0".parse().expect("addr");
    // Lossless, like Mosquitto's max_queued_messages 0: the queue never
    // drops; the disk budget is far away.
    config.storage.max_queued_messages = 100_000_000;
    config.storage.max_queued_bytes = 64 << 30;
    config.storage.max_disk_bytes = 256 << 30;
    config
}

fn start(mode: Mode, rt: &tokio::runtime::Runtime) -> Target {
    let dir = tempfile::tempdir().expect("temp dir");
    match mode {
        Mode::Mosquitto => Target::Mosquitto(Mosquitto::start("")),
        Mode::Memory | Mode::Rocks(_) => {
            let mut config = bench_config(&dir.path().join("data"));
            let (store, rocks): (Arc<dyn Store>, _) = match mode {
                Mode::Rocks(durability) => {
                    config.storage.durability = durability;
                    std::fs::create_dir_all(&config.data_dir).expect("data dir");
                    let rocks =
                        RocksStore::open(&config.data_dir, RocksOptions::of(&config.storage))
                            .expect("open the store");
                    (rocks.clone(), Some(rocks))
                }
                _ => (MemoryStore::new(), None),
            };
            let broker = rt
                .block_on(Broker::builder(config).store(store).start())
                .expect("start ferrymq");
            Target::Ferrymq {
                broker,
                rocks,
                _dir: dir,
            }
        }
    }
}

fn stop(target: Target, rt: &tokio::runtime::Runtime) {
    match target {
        Target::Ferrymq { broker, .. } => rt.block_on(broker.shutdown()),
        Target::Mosquitto(m) => drop(m),
    }
}

fn run(mode: Mode, load: Load, broker_rt: &tokio::runtime::Runtime) -> Outcome {
    let target = start(mode, broker_rt);
    let addr = target.addr();
    let load_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("load runtime");
    let syncs_before = match &target {
        Target::Ferrymq { broker, .. } => Some(broker.store().wal_syncs()),
        Target::Mosquitto(_) => None,
    };
    let io_before = device_write_bytes(target.pid());
    let epoch = Instant::now();
    let (pubs, received, elapsed) = load_rt.block_on(async {
        let mut sub = Conn::open(addr, "bench-sub", false).await;
        sub.subscribe("bench/#").await;
        let sub = tokio::spawn(subscriber(sub, load, epoch));
        let started = Instant::now();
        let pubs: Vec<_> = (0..load.publishers)
            .map(|i| tokio::spawn(publisher(addr, i, load, epoch)))
            .collect();
        let mut acks = Vec::new();
        for p in pubs {
            acks.extend(p.await.expect("publisher"));
        }
        let received = sub.await.expect("subscriber");
        let elapsed = received.last.duration_since(started);
        (acks, received, elapsed)
    });
    let device_bytes = io_before
        .zip(device_write_bytes(target.pid()))
        .map(|(a, b)| b.saturating_sub(a));
    let (syncs, sync_times) = match &target {
        Target::Ferrymq { broker, rocks, .. } => (
            syncs_before.map(|b| broker.store().wal_syncs() - b),
            rocks.as_ref().map(|r| r.sync_times()),
        ),
        Target::Mosquitto(_) => (None, None),
    };
    stop(target, broker_rt);
    Outcome {
        mode,
        expected: (load.publishers * load.messages) as u64,
        delivered: received.unique,
        duplicates: received.duplicates,
        elapsed,
        ack_micros: pubs,
        delivery_micros: received.latencies,
        syncs,
        sync_times,
        device_bytes,
    }
}

fn percentile(values: &mut [u32], q: f64) -> String {
    if values.is_empty() {
        return "–".into();
    }
    values.sort_unstable();
    let i = ((values.len() as f64 * q).ceil() as usize).clamp(1, values.len()) - 1;
    let us = values[i];
    if us >= 10_000 {
        format!("{:.0} ms", f64::from(us) / 1000.0)
    } else if us >= 1000 {
        format!("{:.1} ms", f64::from(us) / 1000.0)
    } else {
        format!("{us} µs")
    }
}

fn report(outcomes: &mut [Outcome]) {
    let base = outcomes
        .iter()
        .find(|o| o.mode == Mode::Mosquitto)
        .map(|o| o.delivered as f64 / o.elapsed.as_secs_f64());
    println!(
        "\n| broker | delivered msg/s | vs Mosquitto | lost | dup | PUBACK p50 / p99 | delivery p50 / p99 | WAL syncs/s | WAL write+sync p50 / p99 | device bytes/msg |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for o in outcomes.iter_mut() {
        let secs = o.elapsed.as_secs_f64();
        let rate = o.delivered as f64 / secs;
        let ratio = base.map_or("–".into(), |b| format!("{:.2}×", rate / b));
        let syncs = o
            .syncs
            .map_or("–".into(), |s| format!("{:.0}", s as f64 / secs));
        let sync_times = o
            .sync_times
            .filter(|t| t.count > 0)
            .map_or("–".into(), |t| {
                format!("≤ {} µs / ≤ {} µs", t.p50.as_micros(), t.p99.as_micros())
            });
        let bytes = o.device_bytes.map_or("–".into(), |b| {
            format!("{:.0}", b as f64 / o.delivered.max(1) as f64)
        });
        println!(
            "| {} | {:.0} | {} | {} | {} | {} / {} | {} / {} | {} | {} | {} |",
            o.mode.label(),
            rate,
            ratio,
            o.expected - o.delivered,
            o.duplicates,
            percentile(&mut o.ack_micros, 0.5),
            percentile(&mut o.ack_micros, 0.99),
            percentile(&mut o.delivery_micros, 0.5),
            percentile(&mut o.delivery_micros, 0.99),
            syncs,
            sync_times,
            bytes
        );
    }
}

/// Fills a store with about `gib` GiB of queued 16 KiB messages for an
/// offline persistent subscriber, restarts the broker on it, and reports
/// the start-up time and the first delivery after it.
fn startup(gib: f64, broker_rt: &tokio::runtime::Runtime) -> (Duration, Duration, u64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let config = bench_config(&data);
    let load = Load {
        publishers: 4,
        window: 64,
        payload: 16 * 1024,
        messages: ((gib * f64::from(1u32 << 30)) / (16.0 * 1024.0) / 4.0).ceil() as usize,
    };
    let load_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("load runtime");
    let broker = broker_rt
        .block_on(Broker::start(config.clone()))
        .expect("start");
    let addr = broker.local_addrs()[0];
    let epoch = Instant::now();
    load_rt.block_on(async {
        let mut sub = Conn::open(addr, "backlog", false).await;
        sub.subscribe("bench/#").await;
        sub.disconnect().await;
        let pubs: Vec<_> = (0..load.publishers)
            .map(|i| tokio::spawn(publisher(addr, i, load, epoch)))
            .collect();
        for p in pubs {
            p.await.expect("publisher");
        }
    });
    broker_rt.block_on(broker.shutdown());
    let stored: u64 = walk_size(&data);
    let started = Instant::now();
    let broker = broker_rt.block_on(Broker::start(config)).expect("restart");
    let ready = started.elapsed();
    let addr = broker.local_addrs()[0];
    let first = load_rt.block_on(async {
        let mut sub = Conn::open(addr, "backlog", false).await;
        loop {
            match sub.next_packet().await {
                Some(Packet::Publish(_)) => break started.elapsed(),
                Some(_) => {}
                None => panic!("the broker closed the backlog subscriber"),
            }
        }
    });
    broker_rt.block_on(broker.shutdown());
    (ready, first, stored)
}

fn walk_size(path: &Path) -> u64 {
    std::fs::read_dir(path).map_or(0, |dir| {
        dir.filter_map(Result::ok)
            .map(|e| {
                let p = e.path();
                if p.is_dir() {
                    walk_size(&p)
                } else {
                    e.metadata().map_or(0, |m| m.len())
                }
            })
            .sum()
    })
}

fn main() {
    let Some(args) = Args::from_env() else {
        return;
    };
    let bench = args.bench();
    let value = |name: &str| args.value(name);
    let mut load = Load {
        publishers: 10,
        window: 100,
        messages: 50_000,
        payload: 64,
    };
    let mut modes = vec![
        Mode::Mosquitto,
        Mode::Memory,
        Mode::Rocks(Durability::GroupCommit),
        Mode::Rocks(Durability::SyncEach),
        Mode::Rocks(Durability::Interval),
    ];
    let mut startup_gib = 0.0;
    if bench {
        if let Some(v) = value("--messages") {
            load.messages = v.parse().expect("--messages N");
        }
        if let Some(v) = value("--publishers") {
            load.publishers = v.parse().expect("--publishers N");
        }
        if let Some(v) = value("--window") {
            load.window = v.parse().expect("--window N");
        }
        if let Some(v) = value("--modes") {
            modes = v.split(',').map(Mode::parse).collect();
        }
        if let Some(v) = value("--startup-gib") {
            startup_gib = v.parse().expect("--startup-gib G");
        }
    } else {
        // Smoke: a short load through every ferrymq policy, and a small
        // restart.
        load.messages = 300;
        modes.retain(|m| *m != Mode::Mosquitto);
        startup_gib = 0.01;
    }
    let broker_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("broker runtime");
    println!(
        "durable QoS 1 fan-in: {} publishers × {} messages, window {}, {}-byte payloads, 1 persistent subscriber",
        load.publishers, load.messages, load.window, load.payload
    );
    let mut outcomes: Vec<Outcome> = modes
        .iter()
        .map(|m| {
            // A sync per write is two orders of magnitude slower: a
            // twentieth of the load measures it in the same time.
            let load = match m {
                Mode::Rocks(Durability::SyncEach) => Load {
                    messages: (load.messages / 20).max(100),
                    ..load
                },
                _ => load,
            };
            run(*m, load, &broker_rt)
        })
        .collect();
    report(&mut outcomes);
    for o in &outcomes {
        if o.mode != Mode::Mosquitto {
            assert_eq!(
                o.delivered,
                o.expected,
                "{}: {} acknowledged messages were not delivered",
                o.mode.label(),
                o.expected - o.delivered
            );
        }
    }
    if startup_gib > 0.0 {
        let (ready, first, stored) = startup(startup_gib, &broker_rt);
        println!(
            "\nstart-up on {:.2} GiB stored: ready (store open, state restored, listening) in {:.2} s; first queued message delivered {:.2} s after the start",
            stored as f64 / f64::from(1u32 << 30),
            ready.as_secs_f64(),
            first.as_secs_f64()
        );
    }
}
