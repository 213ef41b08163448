//! Where an idle connection's bytes go: the broker runs in this process
//! (as gateway firmware links it, with the binary's logging set up) under
//! an allocator that counts live allocations by size, and N clients
//! (MQTT 3.1.1, clean session, keep alive 600 s, no subscription, as the
//! compare harness's `idle` row) connect over loopback and stay idle.
//!
//! It prints the heap each idle connection holds, in requested bytes and
//! in what glibc's malloc takes for them (its 8-byte header, 16-byte
//! steps, 32 bytes at least), and the allocation sizes that make it up
//! (each size's count per connection): the figure the compare harness
//! measures as RSS, broken down, in a second instead of a release run of
//! both brokers. Then every client closes, and it checks that the broker
//! gave back what the connections held, and that further rounds of the
//! same clients stop leaving more behind (a leak would not).
//!
//! Run (with `[limits] dormant_connections` on, as by default; `--awake`:
//! off):
//!   cargo bench --bench idle                      # 5,000 connections
//!   cargo bench --bench idle -- --connections 20000
//!   cargo bench --bench idle -- --awake
//!
//! Under nextest a smoke run of 200 connections checks that each is
//! accepted and that closing them gives their memory back, round after
//! round.

#[allow(dead_code)]
mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use common::Args;
use ferrymq_broker::Broker;
use ferrymq_config::Config;

/// Requested sizes are counted in 16-byte steps up to this; larger ones
/// in one last bucket.
const SMALL_LIMIT: usize = 4096;
const BUCKETS: usize = SMALL_LIMIT / 16 + 1;

/// Live allocations and bytes, in total and by size.
struct Counting {
    bytes: AtomicI64,
    /// Live allocations by requested size (16-byte steps: bucket `i` holds
    /// sizes `16 i - 15 ..= 16 i`; the last, everything larger).
    count: [AtomicI64; BUCKETS],
    /// What glibc's malloc takes for the live allocations.
    chunk_bytes: AtomicI64,
}

#[global_allocator]
static ALLOC: Counting = Counting {
    bytes: AtomicI64::new(0),
    count: [const { AtomicI64::new(0) }; BUCKETS],
    chunk_bytes: AtomicI64::new(0),
};

fn bucket(size: usize) -> usize {
    if size > SMALL_LIMIT {
        BUCKETS - 1
    } else {
        size.div_ceil(16)
    }
}

/// What glibc's malloc uses for a request of `size` bytes.
fn chunk(size: usize) -> i64 {
    ((size + 8).div_ceil(16) * 16).max(32) as i64
}

impl Counting {
    fn add(&self, size: usize, sign: i64) {
        self.bytes.fetch_add(sign * size as i64, Ordering::Relaxed);
        self.chunk_bytes
            .fetch_add(sign * chunk(size), Ordering::Relaxed);
        self.count[bucket(size)].fetch_add(sign, Ordering::Relaxed);
    }
}

// SAFETY: every call is passed on to the system allocator unchanged; the
// counters only observe the sizes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            self.add(layout.size(), 1);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) };
        self.add(layout.size(), -1);
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            self.add(layout.size(), 1);
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            self.add(layout.size(), -1);
            self.add(new_size, 1);
        }
        p
    }
}

/// The live heap at one moment.
struct Snapshot {
    bytes: i64,
    chunk_bytes: i64,
    count: Vec<i64>,
}

fn snapshot() -> Snapshot {
    Snapshot {
        bytes: ALLOC.bytes.load(Ordering::Relaxed),
        chunk_bytes: ALLOC.chunk_bytes.load(Ordering::Relaxed),
        count: ALLOC
            .count
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect(),
    }
}

/// Connects one idle client and reads its CONNACK.
fn open(addr: SocketAddr, client_id: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("connect");
    let id = client_id.as_bytes();
    let mut connect = vec![0x10, (10 + 2 + id.len()) as u8];
    connect.extend_from_slice(b"\x00\x04MQTT\x04\x02");
    connect.extend_from_slice(&600u16.to_be_bytes());
    connect.extend_from_slice(&(id.len() as u16).to_be_bytes());
    connect.extend_from_slice(id);
    stream.write_all(&connect).expect("CONNECT");
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).expect("CONNACK");
    assert_eq!(connack, [0x20, 2, 0, 0], "{client_id}: CONNACK");
    stream
}

/// Waits until the broker counts `n` open connections (at most 10 s).
fn settle(broker: &Broker, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while broker.handle().open_connections() != n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(broker.handle().open_connections(), n, "open connections");
    // The last connection's task may still be finishing its first wait.
    std::thread::sleep(Duration::from_millis(500));
}

fn main() {
    let Some(args) = Args::from_env() else {
        return;
    };
    let n: usize = match args.value("--connections") {
        Some(v) => v.parse().expect("--connections N"),
        None if args.bench() => 5000,
        None => 200,
    };
    common::proc::raise_open_files(n as u64 + 100);
    // The binary's logging as a service has it (text at `info`, no colours:
    // its standard error is not a terminal; to nowhere here): a
    // connection's span is part of its cost.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_ansi(false)
        .with_writer(std::io::sink)
        .init();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = Config::default();
    config.listeners[0].bind = "127.0.0.1:0".parse().expect("an address");
    config.data_dir = dir.path().to_owned();
    // What it breaks down is an idle connection as it is by default, with
    // dormant connections on (`--awake`: off, with its task).
    config.limits.dormant_connections = !args.flag("--awake");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let broker = runtime.block_on(Broker::start(config)).expect("broker");
    let addr = broker.local_addrs()[0];

    // Baseline: after one connection came and went.
    drop(open(addr, "probe"));
    settle(&broker, 0);
    let mut streams = Vec::with_capacity(n);
    let before = snapshot();
    let mut dormant = Vec::new();
    let mut cycle = |streams: &mut Vec<TcpStream>| {
        for i in 0..n {
            streams.push(open(addr, &format!("idle-{i}")));
        }
        settle(&broker, n as u64);
        let after = snapshot();
        dormant.push(broker.handle().dormant_connections());
        streams.clear();
        settle(&broker, 0);
        // Tokio frees a closed socket's registration on a later turn of its
        // I/O driver: one more connection makes it turn.
        drop(open(addr, "probe"));
        settle(&broker, 0);
        (after, snapshot())
    };
    let (after, closed) = cycle(&mut streams);
    // The same clients four times more. What stays after a round (pools
    // and tables keep their capacity: the log subscriber's span slots are
    // pooled per thread, so a round whose spans were made on another
    // worker grows another pool) may grow for a round or two; a leak grows
    // with every round.
    let mut last = closed.chunk_bytes;
    let mut grown = Vec::new();
    for _ in 0..4 {
        let (_, closed) = cycle(&mut streams);
        grown.push((closed.chunk_bytes - last) as f64 / n as f64);
        last = closed.chunk_bytes;
    }

    let per = |a: i64, b: i64| (a - b) as f64 / n as f64;
    println!(
        "a TCP connection's future: {} bytes, a woken one's {} (a tokio task adds a header and rounds up to 128)",
        ferrymq_broker::bench_support::connection_future_size(),
        ferrymq_broker::bench_support::woken_future_size()
    );
    println!(
        "{n} idle connections, of which dormant (no task) in each round: {dormant:?}; heap held by each:"
    );
    println!(
        "  {:.0} bytes requested, {:.0} bytes in malloc chunks",
        per(after.bytes, before.bytes),
        per(after.chunk_bytes, before.chunk_bytes)
    );
    println!("  by requested size (allocations per connection):");
    for (i, (a, b)) in after.count.iter().zip(&before.count).enumerate() {
        let each = per(*a, *b);
        if each.abs() >= 0.05 {
            let size = if i == BUCKETS - 1 {
                format!("> {SMALL_LIMIT}")
            } else {
                format!("{:>4}..={:<4}", (16 * i).saturating_sub(15).max(1), 16 * i)
            };
            println!("    {size} B: {each:.2}");
        }
    }
    let left = per(closed.chunk_bytes, before.chunk_bytes);
    let rounds: Vec<String> = grown.iter().map(|g| format!("{g:+.0}")).collect();
    println!(
        "  after all closed: {left:.0} bytes per connection still held; each further round: {}",
        rounds.join(", ")
    );
    // What the connections held comes back when they close, but for the
    // tables that grew to hold them and keep their capacity (the session
    // registry's, the keep-alive queue's, the dormant set's) and the log
    // subscriber's pooled span slots: about 400 bytes a connection, however
    // much a connection itself holds.
    let held = per(after.chunk_bytes, before.chunk_bytes);
    assert!(held > 0.0, "the connections held no memory: not measured");
    assert!(
        left < 512.0,
        "{left:.0} of {held:.0} bytes per connection not given back after close"
    );
    // Idle plain-TCP connections go dormant once their CONNACK is out
    // (with `dormant_connections` on).
    let want = if args.flag("--awake") { 0 } else { n as u64 };
    assert!(
        dormant.iter().all(|&d| d == want),
        "idle connections dormant: {dormant:?} of {n}, {want} wanted"
    );
    // A leak of even one allocation per connection (32 bytes at least, in
    // glibc's malloc) would show in every round; the pools' growth and the
    // tables' jitter, a few bytes a connection at 200 of them, do not.
    let least = grown.iter().copied().fold(f64::INFINITY, f64::min);
    assert!(
        least < 32.0,
        "every round of the same connections kept more: {rounds:?} bytes each"
    );
    runtime.block_on(broker.shutdown());
}
