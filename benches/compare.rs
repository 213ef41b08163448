//! Side-by-side load harness: ferrymq (the release binary), Mosquitto (the
//! Debian package) and rumqttd (the crate, in the small runner of
//! `benches/rumqttd`, built on first use) on loopback ports, each started fresh for every
//! run, the same load generator against each, brokers alternated
//! (A B C A B C ...) so that machine noise hits all alike.
//!
//! Scenarios (MQTT 3.1.1, 64-byte payloads):
//! - `qos0-fanin`: 10 publishers -> 1 subscriber, QoS 0, full speed;
//! - `qos1-fanin`: the same at QoS 1, each publisher with 100 in flight;
//! - `fanout`: 1 publisher -> 50 subscribers, QoS 0, full speed;
//! - `fixed-rate`: QoS 1 at 5,000 msg/s in all (10 publishers × 500/s) to
//!   a clean-session subscriber; latency is measured from each message's
//!   scheduled send time, so a stalled broker cannot hide its stall
//!   (no coordinated omission);
//! - `idle`: 5,000 idle connections: broker RSS per connection;
//! - `durable`: 10 publishers (100 in flight each) to an offline persistent
//!   subscriber, then the subscriber returns and drains its queue.
//!
//! Measured per run: delivered msg/s (unique messages at the subscribers
//! over the time from the first send to the last delivery), lost /
//! duplicated / reordered messages, latency percentiles (timestamps in the
//! payload), broker CPU per delivered message (`/proc/PID/stat`), and the
//! load generator's own CPU. The generator runs on one thread, so the
//! broker always has the other core; it warns when it used more than 90 %
//! of its core (then the figure may be the generator's limit).
//!
//! Broker settings: each broker's defaults except where a scenario needs
//! otherwise. Mosquitto: no queue limit (`max_queued_messages 0`), no
//! persistence, TCP_NODELAY on. rumqttd: the values of its shipped
//! `rumqttd.toml`. ferrymq: `queue_full = "block"` (back-pressure, no
//! drops) with a 1,000-message queue for online scenarios; for `durable`
//! the default `group-commit` RocksDB store with room for the whole
//! backlog; metrics served and `$SYS` published every 10 s, as a
//! deployment runs; load shedding off (at full speed the broker may use
//! more than 90 % of the machine, and the harness measures what it
//! carries, not the shedding policy).
//!
//! Output: a markdown table of medians with ratios and the raw runs as
//! JSON, printed and written to `compare.md` / `compare.json` in the cargo
//! target directory.
//!
//! Run:
//!   cargo bench --bench compare
//!   cargo bench --bench compare -- --rounds 5 --seconds 5 \
//!       --scenarios qos0-fanin,idle --brokers ferrymq,mosquitto
//!
//! Under `cargo test --benches` (and nextest) a short smoke run checks the
//! harness against ferrymq (every scenario, nothing lost) and rumqttd.

#[allow(dead_code)]
mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use common::{Args, cpu_time, free_port, mosquitto_conf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Payload size of every message.
const PAYLOAD: usize = 64;
/// A subscriber stops after this long without a message once the
/// publishers are done (or without any progress at all).
const QUIET: Duration = Duration::from_millis(1500);
/// No progress for this long ends a run.
const STALL: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Mosquitto,
    Rumqttd,
    Ferrymq,
}

impl Kind {
    fn parse(name: &str) -> Kind {
        match name {
            "ferrymq" => Kind::Ferrymq,
            "mosquitto" => Kind::Mosquitto,
            "rumqttd" => Kind::Rumqttd,
            other => panic!("unknown broker {other} (ferrymq, mosquitto, rumqttd)"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Ferrymq => "ferrymq",
            Kind::Mosquitto => "mosquitto",
            Kind::Rumqttd => "rumqttd",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Scenario {
    Qos0FanIn,
    Qos1FanIn,
    FanOut,
    FixedRate,
    Idle,
    Durable,
}

const SCENARIOS: [Scenario; 6] = [
    Scenario::Qos0FanIn,
    Scenario::Qos1FanIn,
    Scenario::FanOut,
    Scenario::FixedRate,
    Scenario::Idle,
    Scenario::Durable,
];

impl Scenario {
    fn parse(name: &str) -> Scenario {
        SCENARIOS
            .into_iter()
            .find(|s| s.name() == name)
            .unwrap_or_else(|| panic!("unknown scenario {name}"))
    }

    fn name(self) -> &'static str {
        match self {
            Scenario::Qos0FanIn => "qos0-fanin",
            Scenario::Qos1FanIn => "qos1-fanin",
            Scenario::FanOut => "fanout",
            Scenario::FixedRate => "fixed-rate",
            Scenario::Idle => "idle",
            Scenario::Durable => "durable",
        }
    }

    fn title(self, load: &Load) -> String {
        match self {
            Scenario::Qos0FanIn => format!("QoS 0 fan-in {} -> 1, full speed", load.publishers),
            Scenario::Qos1FanIn => format!(
                "QoS 1 fan-in {} -> 1, full speed, window {}",
                load.publishers, load.window
            ),
            Scenario::FanOut => format!("QoS 0 fan-out 1 -> {}, full speed", load.fanout),
            Scenario::FixedRate => format!(
                "QoS 1 at a fixed {} msg/s ({} publishers), clean-session subscriber",
                load.rate, load.publishers
            ),
            Scenario::Idle => format!("{} idle connections", load.idle),
            Scenario::Durable => format!(
                "durable QoS 1: {} publishers × {} messages (window {}) to an offline persistent subscriber, then its drain",
                load.publishers, load.durable_messages, load.window
            ),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Load {
    publishers: u32,
    window: usize,
    seconds: f64,
    fanout: u32,
    rate: u32,
    rate_seconds: f64,
    idle: u32,
    /// Per publisher.
    durable_messages: u64,
}

// ---------------------------------------------------------------------
// Brokers

/// A broker process under test, killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(kind: Kind, scenario: Scenario, load: &Load) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("broker.log")).expect("log file");
        let mut command = match kind {
            Kind::Ferrymq => {
                let (messages, bytes) = if scenario == Scenario::Durable {
                    (
                        load.durable_messages * u64::from(load.publishers) * 2,
                        "8GiB",
                    )
                } else {
                    (1000, "64MiB")
                };
                let config = format!(
                    "data_dir = {:?}\n[[listener]]\nbind = \"127.0.0.1:{port}\"\n\
                     [storage]\nqueue_full = \"block\"\nmax_queued_messages = {messages}\n\
                     max_queued_bytes = \"{bytes}\"\nmax_disk_bytes = \"64GiB\"\n\
                     [metrics]\nenabled = true\nbind = \"127.0.0.1:0\"\nsys_interval_secs = 10\n\
                     [limits]\nshed_cpu_percent = 0\n",
                    dir.path().join("data").display().to_string()
                );
                let file = dir.path().join("ferrymq.toml");
                std::fs::write(&file, config).expect("write ferrymq.toml");
                let mut c = Command::new(env!("CARGO_BIN_EXE_ferrymq"));
                c.arg("--config").arg(file).env("RUST_LOG", "warn");
                c
            }
            Kind::Mosquitto => {
                let file = dir.path().join("mosquitto.conf");
                std::fs::write(&file, mosquitto_conf(port, "set_tcp_nodelay true\n"))
                    .expect("write mosquitto.conf");
                let mut c = Command::new("mosquitto");
                c.arg("-c").arg(file);
                c
            }
            Kind::Rumqttd => {
                let mut c = Command::new(rumqttd_runner());
                c.arg(port.to_string());
                c
            }
        };
        let child = command
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", kind.name()));
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let server = Server {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "{} did not start: {}",
                kind.name(),
                std::fs::read_to_string(server._dir.path().join("broker.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        server
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The rumqttd runner (`benches/rumqttd`, a cargo project of its own),
/// built on first use into `peers/` of the target directory, in the
/// profile of this program.
fn rumqttd_runner() -> PathBuf {
    static RUNNER: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    RUNNER.get_or_init(build_rumqttd_runner).clone()
}

fn build_rumqttd_runner() -> PathBuf {
    let target = target_dir().join("peers");
    let release = !cfg!(debug_assertions);
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/rumqttd/Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .args(["build", "--locked", "--quiet", "--manifest-path"])
        .arg(&manifest)
        .env("CARGO_TARGET_DIR", &target);
    if release {
        build.arg("--release");
    }
    let status = build
        .status()
        .expect("run cargo to build the rumqttd runner");
    assert!(status.success(), "building the rumqttd runner failed");
    target
        .join(if release { "release" } else { "debug" })
        .join("ferrymq-rumqttd-runner")
}

/// Resident set size of a process, bytes.
fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

// ---------------------------------------------------------------------
// The load generator's MQTT 3.1.1 client: hand-written frames, batched
// writes, no allocation per message.

fn put_varint(out: &mut BytesMut, mut n: usize) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if n == 0 {
            break;
        }
    }
}

/// What the payload carries: publisher, sequence, scheduled send time
/// (ns since the harness's epoch).
fn put_publish(out: &mut BytesMut, topic: &[u8], qos: u8, packet_id: u16, stamp: (u32, u64, u64)) {
    let id_len = if qos > 0 { 2 } else { 0 };
    out.put_u8(0x30 | (qos << 1));
    put_varint(out, 2 + topic.len() + id_len + PAYLOAD);
    out.put_u16(topic.len() as u16);
    out.put_slice(topic);
    if qos > 0 {
        out.put_u16(packet_id);
    }
    out.put_u32(stamp.0);
    out.put_u64(stamp.1);
    out.put_u64(stamp.2);
    out.put_bytes(0x5A, PAYLOAD - 20);
}

/// One frame from the broker.
enum Frame {
    ConnAck(u8),
    SubAck,
    PubAck,
    Publish {
        qos: u8,
        packet_id: u16,
        stamp: (u32, u64, u64),
    },
    Other,
}

struct Conn {
    stream: TcpStream,
    input: BytesMut,
    output: BytesMut,
}

impl Conn {
    async fn open(addr: SocketAddr, client_id: &str, clean: bool) -> Conn {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let mut conn = Conn {
            stream,
            input: BytesMut::with_capacity(64 * 1024),
            output: BytesMut::with_capacity(64 * 1024),
        };
        let id = client_id.as_bytes();
        conn.output.put_u8(0x10);
        put_varint(&mut conn.output, 10 + 2 + id.len());
        conn.output.put_slice(b"\x00\x04MQTT\x04");
        conn.output.put_u8(if clean { 0x02 } else { 0x00 });
        conn.output.put_u16(600);
        conn.output.put_u16(id.len() as u16);
        conn.output.put_slice(id);
        conn.flush().await;
        match conn.next_frame().await {
            Some(Frame::ConnAck(0)) => conn,
            Some(Frame::ConnAck(code)) => panic!("{client_id}: CONNACK {code}"),
            _ => panic!("{client_id}: no CONNACK"),
        }
    }

    async fn subscribe(&mut self, filter: &str, qos: u8) {
        let f = filter.as_bytes();
        self.output.put_u8(0x82);
        put_varint(&mut self.output, 2 + 2 + f.len() + 1);
        self.output.put_u16(1);
        self.output.put_u16(f.len() as u16);
        self.output.put_slice(f);
        self.output.put_u8(qos);
        self.flush().await;
        loop {
            match self.next_frame().await {
                Some(Frame::SubAck) => return,
                Some(_) => {}
                None => panic!("no SUBACK"),
            }
        }
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
        if self.input.capacity() - self.input.len() < 16 * 1024 {
            self.input.reserve(64 * 1024);
        }
        matches!(self.stream.read_buf(&mut self.input).await, Ok(n) if n > 0)
    }

    /// The next complete frame in the input, if any.
    fn frame(&mut self) -> Option<Frame> {
        take_frame(&mut self.input)
    }

    async fn next_frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = self.frame() {
                return Some(f);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    async fn disconnect(mut self) {
        self.output.put_slice(&[0xE0, 0x00]);
        self.flush().await;
        let _ = self.stream.shutdown().await;
    }

    /// The connection for a plain thread (blocking, with a read timeout).
    fn into_sync(self) -> SyncConn {
        let stream = self.stream.into_std().expect("a std stream");
        stream.set_nonblocking(false).expect("blocking mode");
        stream
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        SyncConn {
            stream,
            input: self.input,
        }
    }
}

/// A connection driven by a plain thread: the fixed-rate scenario needs
/// send times far finer than the runtime's millisecond timer.
struct SyncConn {
    stream: std::net::TcpStream,
    input: BytesMut,
}

impl SyncConn {
    /// Reads more bytes: `Some(false)` when the connection closed, `None`
    /// when nothing came within the read timeout.
    fn fill(&mut self) -> Option<bool> {
        use std::io::Read;
        let mut buf = [0u8; 16 * 1024];
        match self.stream.read(&mut buf) {
            Ok(0) => Some(false),
            Ok(n) => {
                self.input.extend_from_slice(&buf[..n]);
                Some(true)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(_) => Some(false),
        }
    }
}

/// The next complete frame in `input`, if any.
fn take_frame(input: &mut BytesMut) -> Option<Frame> {
    let mut len = 0usize;
    let mut shift = 0;
    let mut header = 1;
    loop {
        let byte = *input.get(header)?;
        len |= usize::from(byte & 0x7F) << shift;
        header += 1;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    if input.len() < header + len {
        return None;
    }
    let first = input[0];
    input.advance(header);
    let mut body = input.split_to(len);
    Some(match first >> 4 {
        2 => Frame::ConnAck(body.get(1).copied().unwrap_or(0xFF)),
        9 => Frame::SubAck,
        4 => Frame::PubAck,
        3 => {
            let qos = (first >> 1) & 0b11;
            let topic_len = usize::from(body.get_u16());
            body.advance(topic_len);
            let packet_id = if qos > 0 { body.get_u16() } else { 0 };
            if body.len() < 20 {
                Frame::Other
            } else {
                Frame::Publish {
                    qos,
                    packet_id,
                    stamp: (body.get_u32(), body.get_u64(), body.get_u64()),
                }
            }
        }
        _ => Frame::Other,
    })
}

fn nanos_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_nanos() as u64
}

// ---------------------------------------------------------------------
// Publishers and subscribers

/// When a publisher stops sending.
#[derive(Debug, Clone, Copy)]
enum Until {
    Time(Instant),
    Count(u64),
}

#[derive(Debug, Default, Clone, Copy)]
struct Sent {
    sent: u64,
    acked: u64,
}

/// What a publisher sends.
#[derive(Debug, Clone)]
struct Plan {
    /// Its number (in every payload).
    number: u32,
    topic: Arc<[u8]>,
    qos: u8,
    /// QoS 1 publishes in flight at most.
    window: usize,
    until: Until,
    /// Time zero of the payload timestamps.
    epoch: Instant,
}

/// Publishes as fast as the broker takes them (QoS 0: batches of 64 per
/// write; QoS 1: up to `window` in flight).
async fn publisher(mut conn: Conn, plan: Plan) -> Sent {
    let Plan {
        number,
        topic,
        qos,
        window,
        until,
        epoch,
    } = plan;
    let mut seq = 0u64;
    let mut inflight = 0usize;
    let mut acked = 0u64;
    let mut last_progress = Instant::now();
    let open = |seq: u64| match until {
        Until::Time(t) => Instant::now() < t,
        Until::Count(n) => seq < n,
    };
    loop {
        if open(seq) {
            if qos == 0 {
                let stamp_ns = nanos_since(epoch);
                for _ in 0..64 {
                    put_publish(&mut conn.output, &topic, 0, 0, (number, seq, stamp_ns));
                    seq += 1;
                }
                conn.flush().await;
                continue;
            }
            let stamp_ns = nanos_since(epoch);
            while inflight < window && open(seq) {
                let id = (seq % 65_535) as u16 + 1;
                put_publish(&mut conn.output, &topic, qos, id, (number, seq, stamp_ns));
                seq += 1;
                inflight += 1;
            }
            conn.flush().await;
        } else if inflight == 0 {
            break;
        }
        tokio::select! {
            more = conn.fill() => {
                if !more {
                    break;
                }
                while let Some(frame) = conn.frame() {
                    if let Frame::PubAck = frame {
                        inflight -= 1;
                        acked += 1;
                        last_progress = Instant::now();
                    }
                }
            }
            () = tokio::time::sleep_until((last_progress + STALL).into()) => {
                eprintln!("publisher {number}: no PUBACK for {STALL:?}, {inflight} in flight");
                break;
            }
        }
    }
    conn.disconnect().await;
    Sent { sent: seq, acked }
}

/// What one subscriber saw.
#[derive(Debug, Default)]
struct Tally {
    unique: u64,
    duplicates: u64,
    reordered: u64,
    /// Latency of each unique message, µs.
    latency: Vec<u32>,
    first: Option<Instant>,
    last: Option<Instant>,
    /// Per publisher: which sequence numbers arrived, the highest so far.
    seen: Vec<(Vec<u64>, Option<u64>)>,
}

impl Tally {
    fn record(&mut self, stamp: (u32, u64, u64), epoch: Instant, now: Instant) {
        let (publisher, seq, sent_ns) = stamp;
        let p = publisher as usize;
        if self.seen.len() <= p {
            self.seen.resize(p + 1, (Vec::new(), None));
        }
        let (bits, highest) = &mut self.seen[p];
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if bits.len() <= word {
            bits.resize(word + 1024, 0);
        }
        if bits[word] & (1 << bit) != 0 {
            self.duplicates += 1;
            return;
        }
        bits[word] |= 1 << bit;
        if highest.is_some_and(|h| seq < h) {
            self.reordered += 1;
        }
        *highest = Some(highest.map_or(seq, |h| h.max(seq)));
        self.unique += 1;
        let now_ns = now.duration_since(epoch).as_nanos() as u64;
        self.latency
            .push(u32::try_from(now_ns.saturating_sub(sent_ns) / 1000).unwrap_or(u32::MAX));
        self.first.get_or_insert(now);
        self.last = Some(now);
    }
}

/// Receives until `expected` (set once the publishers are done) arrived,
/// or it is quiet for `QUIET` after they are done, or nothing at all
/// happens for `STALL`.
async fn subscriber(mut conn: Conn, expected: Arc<AtomicU64>, epoch: Instant) -> Tally {
    let mut tally = Tally::default();
    let mut last_activity = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            more = conn.fill() => {
                if !more {
                    break;
                }
                let now = Instant::now();
                last_activity = now;
                while let Some(frame) = conn.frame() {
                    if let Frame::Publish { qos, packet_id, stamp } = frame {
                        if qos == 1 {
                            conn.output.put_slice(&[0x40, 0x02]);
                            conn.output.put_u16(packet_id);
                        }
                        tally.record(stamp, epoch, now);
                    }
                }
                conn.flush().await;
            }
            _ = tick.tick() => {
                let want = expected.load(Ordering::Relaxed);
                let done = want != u64::MAX;
                if done && tally.unique >= want {
                    break;
                }
                let idle = last_activity.elapsed();
                if (done && idle > QUIET) || idle > STALL {
                    break;
                }
            }
        }
    }
    conn.disconnect().await;
    tally
}

// ---------------------------------------------------------------------
// Runs

/// The figures of one run.
#[derive(Debug, Default, Clone)]
struct Metrics(BTreeMap<&'static str, f64>);

impl Metrics {
    fn set(&mut self, key: &'static str, value: f64) {
        self.0.insert(key, value);
    }
}

fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[i]) / 1000.0
}

/// Delivery figures of a set of subscribers against what was sent.
fn delivery(metrics: &mut Metrics, tallies: &[Tally], expected: u64, start: Instant) {
    let unique: u64 = tallies.iter().map(|t| t.unique).sum();
    let last = tallies.iter().filter_map(|t| t.last).max().unwrap_or(start);
    let secs = last.duration_since(start).as_secs_f64().max(1e-3);
    metrics.set("delivered_per_s", unique as f64 / secs);
    metrics.set("delivered", unique as f64);
    metrics.set("expected", expected as f64);
    metrics.set("lost", expected.saturating_sub(unique) as f64);
    metrics.set(
        "duplicates",
        tallies.iter().map(|t| t.duplicates).sum::<u64>() as f64,
    );
    metrics.set(
        "reordered",
        tallies.iter().map(|t| t.reordered).sum::<u64>() as f64,
    );
    let mut latency: Vec<u32> = tallies
        .iter()
        .flat_map(|t| t.latency.iter().copied())
        .collect();
    latency.sort_unstable();
    metrics.set("latency_p50_ms", percentile(&latency, 0.50));
    metrics.set("latency_p99_ms", percentile(&latency, 0.99));
    metrics.set("latency_p999_ms", percentile(&latency, 0.999));
}

async fn run_traffic(server: &Server, scenario: Scenario, load: &Load, metrics: &mut Metrics) {
    let epoch = Instant::now();
    let addr = server.addr;
    let topic: Arc<[u8]> = Arc::from(&b"bench/site-1/sensors/temperature"[..]);
    let (publishers, subscribers, qos) = match scenario {
        Scenario::Qos0FanIn => (load.publishers, 1, 0),
        Scenario::Qos1FanIn => (load.publishers, 1, 1),
        Scenario::FanOut => (1, load.fanout, 0),
        _ => unreachable!("traffic scenarios only"),
    };
    let expected = Arc::new(AtomicU64::new(u64::MAX));
    let mut subs = Vec::new();
    for n in 0..subscribers {
        let mut conn = Conn::open(addr, &format!("sub-{n}"), true).await;
        conn.subscribe("bench/#", qos).await;
        subs.push(tokio::spawn(subscriber(conn, expected.clone(), epoch)));
    }
    let mut conns = Vec::new();
    for n in 0..publishers {
        conns.push(Conn::open(addr, &format!("pub-{n}"), true).await);
    }
    let start = Instant::now();
    let until = Until::Time(start + Duration::from_secs_f64(load.seconds));
    let mut pubs = Vec::new();
    for (n, conn) in conns.into_iter().enumerate() {
        let plan = Plan {
            number: n as u32,
            topic: topic.clone(),
            qos,
            window: load.window,
            until,
            epoch,
        };
        pubs.push(tokio::spawn(publisher(conn, plan)));
    }
    let mut sent = Sent::default();
    for p in pubs {
        let s = p.await.expect("publisher");
        sent.sent += s.sent;
        sent.acked += s.acked;
    }
    // QoS 1: what was acknowledged must arrive; QoS 0: what was sent may.
    let per_sub = if qos == 1 { sent.acked } else { sent.sent };
    expected.store(per_sub, Ordering::Relaxed);
    let mut tallies = Vec::new();
    for s in subs {
        tallies.push(s.await.expect("subscriber"));
    }
    metrics.set("sent", sent.sent as f64);
    delivery(metrics, &tallies, per_sub * u64::from(subscribers), start);
}

/// QoS 1 at a fixed rate, paced by a plain thread (`thread::sleep` is
/// precise to tens of µs; the runtime's timer to a millisecond): message
/// `k` goes to publisher `k % P` at `start + k / rate`, stamped with that
/// scheduled time, and waits (its latency growing) while that publisher's
/// window is full. How late the pacer itself was is reported as well.
fn run_fixed_rate(
    server: &Server,
    load: &Load,
    metrics: &mut Metrics,
    rt: &tokio::runtime::Runtime,
) {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    let epoch = Instant::now();
    let addr = server.addr;
    let publishers = load.publishers as usize;
    let (sub, pubs) = rt.block_on(async {
        let mut sub = Conn::open(addr, "sub-0", true).await;
        sub.subscribe("bench/#", 1).await;
        let mut pubs = Vec::new();
        for n in 0..publishers {
            pubs.push(
                Conn::open(addr, &format!("pub-{n}"), true)
                    .await
                    .into_sync(),
            );
        }
        (sub.into_sync(), pubs)
    });
    let expected = Arc::new(AtomicU64::new(u64::MAX));
    let subscriber = {
        let expected = expected.clone();
        std::thread::spawn(move || {
            let mut sub = sub;
            let mut tally = Tally::default();
            let mut acks = BytesMut::new();
            let mut last_activity = Instant::now();
            loop {
                match sub.fill() {
                    Some(false) => break,
                    Some(true) => {
                        let now = Instant::now();
                        last_activity = now;
                        while let Some(frame) = take_frame(&mut sub.input) {
                            if let Frame::Publish {
                                qos,
                                packet_id,
                                stamp,
                            } = frame
                            {
                                if qos == 1 {
                                    acks.put_slice(&[0x40, 0x02]);
                                    acks.put_u16(packet_id);
                                }
                                tally.record(stamp, epoch, now);
                            }
                        }
                        if !acks.is_empty() {
                            let _ = sub.stream.write_all(&acks);
                            acks.clear();
                        }
                    }
                    None => {}
                }
                let want = expected.load(Ordering::Relaxed);
                let done = want != u64::MAX;
                if done && tally.unique >= want {
                    break;
                }
                let idle = last_activity.elapsed();
                if (done && idle > QUIET) || idle > STALL {
                    break;
                }
            }
            let _ = sub.stream.write_all(&[0xE0, 0x00]);
            tally
        })
    };
    let inflight: Arc<Vec<AtomicUsize>> =
        Arc::new((0..publishers).map(|_| AtomicUsize::new(0)).collect());
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    for (i, mut conn) in pubs.into_iter().enumerate() {
        writers.push(conn.stream.try_clone().expect("a second handle"));
        let (inflight, acked, stop) = (inflight.clone(), acked.clone(), stop.clone());
        readers.push(std::thread::spawn(move || {
            loop {
                match conn.fill() {
                    Some(false) => break,
                    Some(true) => {
                        while let Some(frame) = take_frame(&mut conn.input) {
                            if let Frame::PubAck = frame {
                                inflight[i].fetch_sub(1, Ordering::Relaxed);
                                acked.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    None => {}
                }
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
        }));
    }
    let total = (f64::from(load.rate) * load.rate_seconds) as u64;
    let period = Duration::from_secs_f64(1.0 / f64::from(load.rate));
    let topic = b"bench/site-1/sensors/temperature";
    let start = Instant::now() + Duration::from_millis(10);
    let mut late_us = Vec::with_capacity(total as usize);
    let mut out = BytesMut::with_capacity(256);
    for k in 0..total {
        let i = (k % publishers as u64) as usize;
        let seq = k / publishers as u64;
        let at = start + period.mul_f64(k as f64);
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
        let waited = Instant::now();
        while inflight[i].load(Ordering::Relaxed) >= load.window {
            assert!(waited.elapsed() < STALL, "no PUBACK for {STALL:?}");
            std::thread::sleep(Duration::from_micros(20));
        }
        inflight[i].fetch_add(1, Ordering::Relaxed);
        let stamp_ns = at.duration_since(epoch).as_nanos() as u64;
        let id = (seq % 65_535) as u16 + 1;
        put_publish(&mut out, topic, 1, id, (i as u32, seq, stamp_ns));
        writers[i].write_all(&out).expect("write to the broker");
        out.clear();
        late_us.push(u32::try_from(at.elapsed().as_micros()).unwrap_or(u32::MAX));
    }
    let waited = Instant::now();
    while acked.load(Ordering::Relaxed) < total && waited.elapsed() < STALL {
        std::thread::sleep(Duration::from_millis(1));
    }
    let acked = acked.load(Ordering::Relaxed);
    expected.store(acked, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for mut w in writers {
        let _ = w.write_all(&[0xE0, 0x00]);
    }
    for r in readers {
        r.join().expect("ack reader");
    }
    let tally = subscriber.join().expect("subscriber");
    late_us.sort_unstable();
    metrics.set("sent", total as f64);
    metrics.set("pacer_late_p99_ms", percentile(&late_us, 0.99));
    delivery(metrics, std::slice::from_ref(&tally), acked, start);
}

async fn run_idle(server: &Server, load: &Load, metrics: &mut Metrics) {
    // Baseline: the broker after one connection came and went.
    Conn::open(server.addr, "probe", true)
        .await
        .disconnect()
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss(server.pid());
    let mut conns = Vec::with_capacity(load.idle as usize);
    let mut batch = Vec::new();
    for n in 0..load.idle {
        let addr = server.addr;
        batch.push(tokio::spawn(async move {
            Conn::open(addr, &format!("idle-{n}"), true).await
        }));
        if batch.len() == 100 {
            for c in batch.drain(..) {
                conns.push(c.await.expect("idle connection"));
            }
        }
    }
    for c in batch {
        conns.push(c.await.expect("idle connection"));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss(server.pid());
    metrics.set("connections", conns.len() as f64);
    metrics.set("rss_before_mib", before as f64 / 1_048_576.0);
    metrics.set("rss_after_mib", after as f64 / 1_048_576.0);
    metrics.set(
        "kib_per_connection",
        after.saturating_sub(before) as f64 / 1024.0 / f64::from(load.idle.max(1)),
    );
    drop(conns);
}

async fn run_durable(server: &Server, load: &Load, metrics: &mut Metrics) {
    let epoch = Instant::now();
    let addr = server.addr;
    let topic: Arc<[u8]> = Arc::from(&b"bench/site-1/sensors/temperature"[..]);
    let mut sub = Conn::open(addr, "durable-sub", false).await;
    sub.subscribe("bench/#", 1).await;
    sub.disconnect().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut conns = Vec::new();
    for n in 0..load.publishers {
        conns.push(Conn::open(addr, &format!("pub-{n}"), true).await);
    }
    let start = Instant::now();
    let mut pubs = Vec::new();
    for (n, conn) in conns.into_iter().enumerate() {
        let plan = Plan {
            number: n as u32,
            topic: topic.clone(),
            qos: 1,
            window: load.window,
            until: Until::Count(load.durable_messages),
            epoch,
        };
        pubs.push(tokio::spawn(publisher(conn, plan)));
    }
    let mut acked = 0;
    for p in pubs {
        acked += p.await.expect("publisher").acked;
    }
    let queued_in = start.elapsed();
    metrics.set("queued_per_s", acked as f64 / queued_in.as_secs_f64());
    let back = Instant::now();
    let conn = Conn::open(addr, "durable-sub", false).await;
    let expected = Arc::new(AtomicU64::new(acked));
    let tally = subscriber(conn, expected, epoch).await;
    let drained = tally
        .last
        .map_or(Duration::ZERO, |l| l.duration_since(back))
        .as_secs_f64()
        .max(1e-3);
    metrics.set("drain_per_s", tally.unique as f64 / drained);
    delivery(metrics, std::slice::from_ref(&tally), acked, start);
    // The rate that matters here is the drain's; the end-to-end rate
    // (first publish to last delivery) stays in `delivered_per_s`.
}

/// One run: a fresh broker, one scenario, its figures.
fn run(kind: Kind, scenario: Scenario, load: &Load) -> Metrics {
    let server = Server::start(kind, scenario, load);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("generator runtime");
    let pid = server.pid().to_string();
    let (cpu0, own0, wall0) = (cpu_time(&pid), cpu_time("self"), Instant::now());
    let mut metrics = Metrics::default();
    match scenario {
        Scenario::FixedRate => run_fixed_rate(&server, load, &mut metrics, &rt),
        Scenario::Idle => rt.block_on(run_idle(&server, load, &mut metrics)),
        Scenario::Durable => rt.block_on(run_durable(&server, load, &mut metrics)),
        _ => rt.block_on(run_traffic(&server, scenario, load, &mut metrics)),
    }
    let wall = wall0.elapsed().as_secs_f64();
    let broker_cpu = (cpu_time(&pid) - cpu0).as_secs_f64();
    let own_cpu = (cpu_time("self") - own0).as_secs_f64();
    metrics.set("broker_cpu_s", broker_cpu);
    metrics.set("broker_cores", broker_cpu / wall);
    metrics.set("generator_cores", own_cpu / wall);
    if let Some(delivered) = metrics.0.get("delivered").copied().filter(|d| *d > 0.0) {
        metrics.set("cpu_us_per_msg", broker_cpu * 1e6 / delivered);
    }
    drop(rt);
    drop(server);
    metrics
}

// ---------------------------------------------------------------------
// Report

fn median(values: &mut Vec<f64>) -> f64 {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Rows of the table: scenario, metric key, label.
const ROWS: &[(Scenario, &str, &str)] = &[
    (Scenario::Qos0FanIn, "delivered_per_s", "delivered msg/s"),
    (Scenario::Qos0FanIn, "lost", "lost (of sent)"),
    (Scenario::Qos0FanIn, "cpu_us_per_msg", "broker CPU µs/msg"),
    (Scenario::Qos0FanIn, "latency_p99_ms", "latency p99 ms"),
    (Scenario::Qos1FanIn, "delivered_per_s", "delivered msg/s"),
    (
        Scenario::Qos1FanIn,
        "lost",
        "lost (acknowledged, not delivered)",
    ),
    (Scenario::Qos1FanIn, "duplicates", "duplicates"),
    (Scenario::Qos1FanIn, "reordered", "reordered"),
    (Scenario::Qos1FanIn, "latency_p50_ms", "latency p50 ms"),
    (Scenario::Qos1FanIn, "latency_p99_ms", "latency p99 ms"),
    (Scenario::Qos1FanIn, "cpu_us_per_msg", "broker CPU µs/msg"),
    (
        Scenario::FanOut,
        "delivered_per_s",
        "delivered msg/s (all subscribers)",
    ),
    (Scenario::FanOut, "lost", "lost (of sent × subscribers)"),
    (Scenario::FanOut, "cpu_us_per_msg", "broker CPU µs/msg"),
    (Scenario::FixedRate, "latency_p50_ms", "latency p50 ms"),
    (Scenario::FixedRate, "latency_p99_ms", "latency p99 ms"),
    (Scenario::FixedRate, "latency_p999_ms", "latency p99.9 ms"),
    (Scenario::FixedRate, "lost", "lost"),
    (Scenario::FixedRate, "cpu_us_per_msg", "broker CPU µs/msg"),
    (
        Scenario::Idle,
        "kib_per_connection",
        "broker RSS KiB per connection",
    ),
    (
        Scenario::Durable,
        "queued_per_s",
        "queued (acknowledged) msg/s",
    ),
    (Scenario::Durable, "drain_per_s", "drain msg/s"),
    (Scenario::Durable, "lost", "lost"),
    (Scenario::Durable, "duplicates", "duplicates"),
    (Scenario::Durable, "cpu_us_per_msg", "broker CPU µs/msg"),
];

fn fmt_value(v: f64) -> String {
    if !v.is_finite() {
        "–".into()
    } else if v >= 10_000.0 {
        format!("{:.1}k", v / 1000.0)
    } else if v >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn ratio(ours: f64, peer: f64) -> String {
    if !ours.is_finite() || !peer.is_finite() || peer == 0.0 {
        return "–".into();
    }
    format!("{:.2}×", ours / peer)
}

type Runs = Vec<(Scenario, Kind, usize, Metrics)>;

fn medians(runs: &Runs, scenario: Scenario, kind: Kind, key: &str) -> f64 {
    let mut values: Vec<f64> = runs
        .iter()
        .filter(|(s, k, _, _)| *s == scenario && *k == kind)
        .filter_map(|(_, _, _, m)| m.0.get(key).copied())
        .collect();
    median(&mut values)
}

fn report(runs: &Runs, load: &Load, kinds: &[Kind], header: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "{header}\n");
    let _ = write!(md, "| scenario | metric |");
    for k in kinds {
        let _ = write!(md, " {} |", k.name());
    }
    let peers: Vec<Kind> = kinds
        .iter()
        .copied()
        .filter(|k| *k != Kind::Ferrymq)
        .collect();
    let ours = kinds.contains(&Kind::Ferrymq);
    if ours {
        for p in &peers {
            let _ = write!(md, " ferrymq ÷ {} |", p.name());
        }
    }
    let _ = writeln!(md);
    let columns = kinds.len() + if ours { peers.len() } else { 0 };
    let _ = writeln!(md, "|---|---|{}", "---|".repeat(columns));
    let scenarios: Vec<Scenario> = {
        let mut s: Vec<Scenario> = runs.iter().map(|r| r.0).collect();
        s.sort();
        s.dedup();
        s
    };
    for (scenario, key, label) in ROWS.iter().filter(|r| scenarios.contains(&r.0)) {
        let _ = write!(md, "| {} | {label} |", scenario.title(load));
        for k in kinds {
            let _ = write!(md, " {} |", fmt_value(medians(runs, *scenario, *k, key)));
        }
        if ours {
            let us = medians(runs, *scenario, Kind::Ferrymq, key);
            for p in &peers {
                let _ = write!(md, " {} |", ratio(us, medians(runs, *scenario, *p, key)));
            }
        }
        let _ = writeln!(md);
    }
    let _ = writeln!(
        md,
        "\nMedians of the rounds. Ratios are ferrymq's figure divided by the peer's: above 1 is better for rates, below 1 for latency, CPU, memory and losses."
    );
    md
}

fn json(runs: &Runs, header: &str) -> String {
    let mut out = String::from("{\n");
    let _ = writeln!(out, "  \"about\": {:?},", header);
    out.push_str("  \"runs\": [\n");
    for (i, (scenario, kind, round, metrics)) in runs.iter().enumerate() {
        let fields: Vec<String> = metrics
            .0
            .iter()
            .map(|(k, v)| {
                let v = if v.is_finite() {
                    format!("{v}")
                } else {
                    "null".into()
                };
                format!("\"{k}\": {v}")
            })
            .collect();
        let _ = write!(
            out,
            "    {{\"scenario\": \"{}\", \"broker\": \"{}\", \"round\": {round}, \"metrics\": {{{}}}}}",
            scenario.name(),
            kind.name(),
            fields.join(", ")
        );
        out.push_str(if i + 1 < runs.len() { ",\n" } else { "\n" });
    }
    out.push_str("  ]\n}\n");
    out
}

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).to_string();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s
        })
        .unwrap_or_default()
}

fn header() -> String {
    let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mosquitto = command_output("mosquitto", &["-h"])
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    format!(
        "{} on {cores} cores ({cpu}); {mosquitto}; rumqttd 0.20 (crate); ferrymq {} (release build)",
        date.trim(),
        env!("CARGO_PKG_VERSION")
    )
}

/// The cargo target directory (this program runs from `target/*/deps`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    exe.ancestors()
        .nth(3)
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
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
        seconds: 5.0,
        fanout: 50,
        rate: 5000,
        rate_seconds: 10.0,
        idle: 5000,
        durable_messages: 20_000,
    };
    let mut rounds = 3;
    let mut kinds = vec![Kind::Mosquitto, Kind::Rumqttd, Kind::Ferrymq];
    let mut scenarios = SCENARIOS.to_vec();
    if bench {
        if let Some(v) = value("--rounds") {
            rounds = v.parse().expect("--rounds N");
        }
        if let Some(v) = value("--seconds") {
            load.seconds = v.parse().expect("--seconds S");
            load.rate_seconds = load.seconds * 2.0;
        }
        if let Some(v) = value("--idle") {
            load.idle = v.parse().expect("--idle N");
        }
        if let Some(v) = value("--durable-messages") {
            load.durable_messages = v.parse().expect("--durable-messages N");
        }
        if let Some(v) = value("--brokers") {
            kinds = v.split(',').map(Kind::parse).collect();
        }
        if let Some(v) = value("--scenarios") {
            scenarios = v.split(',').map(Scenario::parse).collect();
        }
    } else {
        // Smoke: the harness itself, quickly.
        rounds = 1;
        load.seconds = 0.3;
        load.rate_seconds = 0.5;
        load.idle = 50;
        load.durable_messages = 200;
        kinds = vec![Kind::Rumqttd, Kind::Ferrymq];
    }
    let header = header();
    println!("{header}");
    let mut runs: Runs = Vec::new();
    for scenario in &scenarios {
        for round in 0..rounds {
            for kind in &kinds {
                if !bench && *kind == Kind::Rumqttd && *scenario != Scenario::Qos1FanIn {
                    continue;
                }
                let m = run(*kind, *scenario, &load);
                let get = |k: &str| m.0.get(k).copied().unwrap_or(f64::NAN);
                println!(
                    "{:<11} {:<9} round {}: {}; broker {:.2} cores, generator {:.2}",
                    scenario.name(),
                    kind.name(),
                    round + 1,
                    match scenario {
                        Scenario::Idle =>
                            format!("{} KiB/connection", fmt_value(get("kib_per_connection"))),
                        Scenario::Durable => format!(
                            "queued {}/s, drained {}/s, lost {}, dup {}",
                            fmt_value(get("queued_per_s")),
                            fmt_value(get("drain_per_s")),
                            get("lost"),
                            get("duplicates")
                        ),
                        Scenario::FixedRate => format!(
                            "delivered {}/s, lost {}, dup {}, p50 {} ms, p99 {} ms, p99.9 {} ms (pacer late p99 {} ms)",
                            fmt_value(get("delivered_per_s")),
                            get("lost"),
                            get("duplicates"),
                            fmt_value(get("latency_p50_ms")),
                            fmt_value(get("latency_p99_ms")),
                            fmt_value(get("latency_p999_ms")),
                            fmt_value(get("pacer_late_p99_ms"))
                        ),
                        _ => format!(
                            "delivered {}/s, lost {}, dup {}, reordered {}, p50 {} ms, p99 {} ms",
                            fmt_value(get("delivered_per_s")),
                            get("lost"),
                            get("duplicates"),
                            get("reordered"),
                            fmt_value(get("latency_p50_ms")),
                            fmt_value(get("latency_p99_ms"))
                        ),
                    },
                    get("broker_cores"),
                    get("generator_cores")
                );
                if get("generator_cores") > 0.9 {
                    println!(
                        "  warning: the load generator used {:.0} % of its core: this figure may be the generator's limit",
                        get("generator_cores") * 100.0
                    );
                }
                if !bench
                    && *kind == Kind::Ferrymq
                    && *scenario != Scenario::Qos0FanIn
                    && *scenario != Scenario::FanOut
                {
                    assert_eq!(
                        get("lost").max(0.0),
                        0.0,
                        "{}: ferrymq lost messages",
                        scenario.name()
                    );
                    assert_eq!(
                        get("duplicates").max(0.0),
                        0.0,
                        "{}: duplicates",
                        scenario.name()
                    );
                }
                runs.push((*scenario, *kind, round, m));
            }
        }
    }
    let table = report(&runs, &load, &kinds, &header);
    println!("\n{table}");
    if bench {
        let dir = target_dir();
        let md = dir.join("compare.md");
        let js = dir.join("compare.json");
        std::fs::write(&md, &table).expect("write compare.md");
        std::fs::write(&js, json(&runs, &header)).expect("write compare.json");
        println!("written: {} and {}", md.display(), js.display());
    }
}
