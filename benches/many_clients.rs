//! 100,000 concurrent clients on one machine, ferrymq against Mosquitto in
//! the same run (each started fresh, at its defaults but for ferrymq's
//! `max_connections`, raised to hold N clients and the three others).
//!
//! Per broker, after a QoS 1 stream at 1,000 msg/s between two clients
//! and the publisher of step 4 have connected (first, so that they are in
//! whatever the broker takes; the stream runs until the end):
//! 1. N clients (MQTT 3.1.1, clean session, keep alive 600 s, ids `c<n>`)
//!    connect and subscribe at QoS 0 to `own/<n>` and to `broadcast`, at
//!    most 500 handshakes in flight; the connect rate counts a client once
//!    its CONNACK and SUBACK are in. They come from 127.0.R.2, 127.0.R.3,
//!    ... (25,000 per source address, to stay within the ephemeral port
//!    range; R is the broker's place in the run, so no source port is still
//!    in TIME_WAIT from the broker before);
//! 2. after 5 s idle, the broker's RSS growth per connected client;
//! 3. the stream's p99 latency (publish to delivery) in a quiet 5 s window
//!    with the N clients connected;
//! 4. the publisher sends one QoS 0 message to every `own/<n>` as fast as
//!    it can, and once all have arrived (or nothing more arrives for 30 s)
//!    one to `broadcast`: the time until the last client got its own
//!    message (from the first publish), until the last got the broadcast
//!    (from its publish), the clients that missed either or got nothing,
//!    the stream's p99 during this load (the load window: from the first
//!    publish to the last delivery) and its acknowledged messages that
//!    never arrived (over the whole run, the connect phase included; the
//!    notes give its p99 during the connect phase).
//!
//! The program raises its open-file limit (soft and hard, as root up to
//! `fs.nr_open`) before starting the brokers, which inherit it; it prints
//! each broker's limit and says so when a broker cannot have enough. When
//! its own limit cannot be raised (the hard limit needs CAP_SYS_RESOURCE)
//! it measures as many clients as fit and says so first. A broker that
//! does not take every client is measured with those it took, and the
//! handshakes that failed are listed by what happened (refused, closed,
//! timed out). The connect phase stops early after 1,000 failed
//! handshakes in a row or when the broker is gone.
//!
//! The clients are tokio tasks on one worker thread (the broker keeps the
//! other core); the program's own CPU time in the connect phase and in the
//! deliveries is printed, since its one thread also reads every delivery.
//!
//! Run:
//!   cargo bench --bench many_clients                  # 100,000 clients, ferrymq and Mosquitto
//!   cargo bench --bench many_clients -- --clients 20000 --brokers ferrymq
//!   (also --in-flight N, handshakes at once, and --per-address N)
//!
//! Under nextest a smoke run (500 clients, ferrymq only) checks that every
//! client gets its message and the broadcast and that the stream loses
//! nothing acknowledged.

#[allow(dead_code)]
mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::proc::{Broker, Client, Stream, ms, open_files_limit, raise_open_files};
use common::{Args, cpu_time};
use ferrymq_codec::{
    Connect, ConnectProperties, MqttString, Packet, Protocol, Publish, QoS, Subscribe,
    Subscription, SubscriptionOptions, decode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The sizes and waits of one run.
#[derive(Clone, Copy)]
struct Scale {
    clients: usize,
    in_flight: usize,
    per_address: usize,
    /// Idle after the connect phase, before the RSS is read.
    idle: Duration,
    /// The stream's quiet window before the load.
    quiet: Duration,
    /// How long the deliveries may stall before the rest count as missed.
    patience: Duration,
}

const BENCH: Scale = Scale {
    clients: 100_000,
    in_flight: 500,
    per_address: 25_000,
    idle: Duration::from_secs(5),
    quiet: Duration::from_secs(5),
    patience: Duration::from_secs(30),
};

const SMOKE: Scale = Scale {
    clients: 500,
    in_flight: 100,
    per_address: 25_000,
    idle: Duration::from_secs(1),
    quiet: Duration::from_secs(1),
    patience: Duration::from_secs(5),
};

/// A handshake (TCP, CONNACK and SUBACK) that takes longer failed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

/// Failed handshakes in a row after which the connect phase stops: the
/// broker takes no more.
const GIVE_UP: usize = 1_000;

/// Open files a broker needs besides one per client (its store, its
/// listeners, the stream and the publisher).
const BROKER_FILES: u64 = 1_000;

/// The own message's payload (the broadcast's is the same).
const PAYLOAD: &[u8] = b"one for each client";

/// What the client tasks tell the program.
struct Hub {
    base: Instant,
    /// When client n got its own message: nanoseconds after `base`, plus
    /// one (0: not yet).
    own_at: Vec<AtomicU64>,
    /// The same for the broadcast.
    broadcast_at: Vec<AtomicU64>,
    /// How many got their own message, and the broadcast.
    own: AtomicUsize,
    broadcast: AtomicUsize,
    connected: AtomicUsize,
    /// When the last handshake completed, nanoseconds after `base`.
    last_connected: AtomicU64,
    /// Failed handshakes since the last one that worked (see [`GIVE_UP`]).
    failing: AtomicUsize,
    /// Failed handshakes by what happened; a lock is enough, failures are
    /// few or the phase stops.
    failures: Mutex<BTreeMap<String, usize>>,
    /// Connections the broker closed after their handshake, before the
    /// measurements ended.
    dropped: AtomicUsize,
    /// Deliveries on a topic the client did not expect (must be 0).
    misrouted: AtomicUsize,
    /// Set once everything is measured: closes are no longer counted.
    done: AtomicBool,
}

impl Hub {
    fn new(clients: usize) -> Hub {
        Hub {
            base: Instant::now(),
            own_at: (0..clients).map(|_| AtomicU64::new(0)).collect(),
            broadcast_at: (0..clients).map(|_| AtomicU64::new(0)).collect(),
            own: AtomicUsize::new(0),
            broadcast: AtomicUsize::new(0),
            connected: AtomicUsize::new(0),
            last_connected: AtomicU64::new(0),
            failing: AtomicUsize::new(0),
            failures: Mutex::new(BTreeMap::new()),
            dropped: AtomicUsize::new(0),
            misrouted: AtomicUsize::new(0),
            done: AtomicBool::new(false),
        }
    }

    fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64 + 1
    }

    fn at(&self, nanos: u64) -> Instant {
        self.base + Duration::from_nanos(nanos.saturating_sub(1))
    }

    fn fail(&self, what: String) {
        self.failing.fetch_add(1, Ordering::Relaxed);
        *self
            .failures
            .lock()
            .expect("failures")
            .entry(what)
            .or_insert(0) += 1;
    }

    /// The last arrival recorded in `times`, if any.
    fn last(&self, times: &[AtomicU64]) -> Option<Instant> {
        let last = times
            .iter()
            .map(|t| t.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        (last > 0).then(|| self.at(last))
    }
}

/// CONNECT and SUBSCRIBE (`own/<n>` and `broadcast`, QoS 0) of client n,
/// sent together.
fn hello(n: usize) -> BytesMut {
    let mut out = BytesMut::with_capacity(96);
    let subscription = |filter: &str| Subscription {
        filter: MqttString::new(filter).expect("filter"),
        options: SubscriptionOptions {
            qos: QoS::AtMostOnce,
            ..SubscriptionOptions::default()
        },
    };
    Packet::Connect(Box::new(Connect {
        protocol: Protocol::V311,
        clean_start: true,
        keep_alive: 600,
        client_id: MqttString::new(&format!("c{n}")).expect("client id"),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties::default(),
    }))
    .encode(Protocol::V311, &mut out)
    .expect("encode");
    Packet::Subscribe(Subscribe {
        packet_id: 1,
        subscriptions: vec![subscription(&format!("own/{n}")), subscription("broadcast")],
        properties: Default::default(),
    })
    .encode(Protocol::V311, &mut out)
    .expect("encode");
    out
}

/// The next packet from the broker; `Err` says what happened instead.
async fn next_packet(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<Packet, String> {
    loop {
        match decode(buf, Protocol::V311, u32::MAX) {
            Ok(Some(p)) => return Ok(p),
            Ok(None) => {}
            Err(e) => return Err(format!("malformed packet from the broker: {e}")),
        }
        buf.reserve(64);
        match stream.read_buf(buf).await {
            Ok(0) => return Err("closed by the broker".into()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Err("reset by the broker".into());
            }
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

/// Connects client n from `source` and takes its CONNACK and SUBACK.
async fn handshake(
    n: usize,
    source: IpAddr,
    broker: SocketAddr,
) -> Result<(TcpStream, BytesMut), String> {
    let local = |what: &str, e: std::io::Error| format!("{what} (this program): {e}");
    let socket = TcpSocket::new_v4().map_err(|e| local("socket", e))?;
    bind_address_no_port(&socket).map_err(|e| local("setsockopt", e))?;
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|e| local("bind", e))?;
    let mut stream = socket.connect(broker).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
        std::io::ErrorKind::ConnectionReset => "reset by the broker".to_string(),
        _ => format!("connect: {e}"),
    })?;
    stream.set_nodelay(true).map_err(|e| local("nodelay", e))?;
    stream
        .write_all(&hello(n))
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = BytesMut::with_capacity(64);
    let (mut connack, mut suback) = (false, false);
    while !(connack && suback) {
        match next_packet(&mut stream, &mut buf).await? {
            Packet::ConnAck(a) if a.reason_code.0 == 0 => connack = true,
            Packet::ConnAck(a) => {
                return Err(format!("CONNACK refused (0x{:02x})", a.reason_code.0));
            }
            Packet::SubAck(a) if a.reason_codes.iter().all(|c| c.0 < 0x80) => suback = true,
            Packet::SubAck(_) => return Err("subscription refused".into()),
            other => return Err(format!("unexpected {other:?}")),
        }
    }
    Ok((stream, buf))
}

/// Leaves the choice of the source port to `connect` (Linux's
/// `IP_BIND_ADDRESS_NO_PORT`): a `bind` to port 0 searches for a port
/// free for every destination, and with 20,000 in use on an address that
/// search took most of this program's CPU in the connect phase.
fn bind_address_no_port(socket: &TcpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: the descriptor is the socket's own, open while `socket`
    // lives; the option value is a c_int we own, of the length passed.
    #[allow(unsafe_code)]
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Client n: its handshake (holding a place among those in flight), then
/// it records its deliveries until the broker closes or the program ends.
async fn client(
    n: usize,
    source: IpAddr,
    broker: SocketAddr,
    hub: Arc<Hub>,
    permit: OwnedSemaphorePermit,
) {
    let (mut stream, mut buf) =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(n, source, broker)).await {
            Ok(Ok(connected)) => connected,
            Ok(Err(what)) => return hub.fail(what),
            Err(_) => return hub.fail("timed out".into()),
        };
    hub.connected.fetch_add(1, Ordering::Relaxed);
    hub.failing.store(0, Ordering::Relaxed);
    hub.last_connected.fetch_max(hub.now(), Ordering::Relaxed);
    drop(permit);
    loop {
        match next_packet(&mut stream, &mut buf).await {
            Ok(Packet::Publish(p)) => {
                let now = hub.now();
                let (times, count) = if p.topic.as_str() == "broadcast" {
                    (&hub.broadcast_at, &hub.broadcast)
                } else if p.topic.strip_prefix("own/").and_then(|t| t.parse().ok()) == Some(n) {
                    (&hub.own_at, &hub.own)
                } else {
                    hub.misrouted.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                if times[n].swap(now, Ordering::Relaxed) == 0 {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(_) => {}
            Err(_) => {
                if !hub.done.load(Ordering::Relaxed) {
                    hub.dropped.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
        }
    }
}

/// Waits until `count` reaches `target` or stays put for `patience`.
fn wait_for(count: &AtomicUsize, target: usize, patience: Duration) {
    let mut seen = count.load(Ordering::Relaxed);
    let mut moved = Instant::now();
    while seen < target && moved.elapsed() < patience {
        std::thread::sleep(Duration::from_millis(5));
        let now = count.load(Ordering::Relaxed);
        if now != seen {
            seen = now;
            moved = Instant::now();
        }
    }
}

/// This program's CPU time so far.
fn own_cpu() -> Duration {
    cpu_time(&std::process::id().to_string())
}

struct Row {
    broker: &'static str,
    connected: usize,
    connect_rate: f64,
    rss_before: u64,
    rss_per_client: f64,
    p99_before: Option<Duration>,
    p99_during: Option<Duration>,
    window: Duration,
    own_in: Option<Duration>,
    broadcast_in: Option<Duration>,
    missed_own: usize,
    missed_broadcast: usize,
    got_nothing: usize,
    misrouted: usize,
    acked: usize,
    lost: usize,
    /// What else the reader must know: limits, failures, closes, CPU.
    notes: Vec<String>,
}

/// One broker's run; `run` is its place in the run (its source addresses).
fn measure(mut broker: Broker, run: u8, scale: Scale) -> Row {
    let pid = broker.child.id();
    let mut notes = Vec::new();
    let need = scale.clients as u64 + BROKER_FILES;
    let files = open_files_limit(pid);
    if files < need {
        notes.push(format!(
            "{} may open only {files} files, {need} needed: it cannot hold {} clients",
            broker.name, scale.clients
        ));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let hub = Arc::new(Hub::new(scale.clients));
    // The stream and the publisher connect first, so that they are in
    // even when the broker cannot take every client.
    let stream = Stream::start(broker.addr, Instant::now());
    let mut publisher = Client::connect(broker.addr, "publisher");
    std::thread::sleep(Duration::from_millis(500));

    // 1. Connect, `in_flight` handshakes at a time.
    let rss_before = broker.rss_kib();
    let addr = broker.addr;
    let cpu = own_cpu();
    let start = Instant::now();
    let in_flight = Arc::new(Semaphore::new(scale.in_flight));
    let stopped = runtime.block_on(async {
        for n in 0..scale.clients {
            let permit = in_flight.clone().acquire_owned().await.expect("semaphore");
            if hub.failing.load(Ordering::Relaxed) >= GIVE_UP {
                return Some((n, format!("{GIVE_UP} failed handshakes in a row")));
            }
            if n % 1000 == 0 && !matches!(broker.child.try_wait(), Ok(None)) {
                return Some((n, format!("{} is gone", broker.name)));
            }
            let source = IpAddr::V4(Ipv4Addr::new(
                127,
                0,
                run,
                (2 + n / scale.per_address) as u8,
            ));
            tokio::spawn(client(n, source, addr, hub.clone(), permit));
        }
        None
    });
    // The handshakes still in flight end (or time out).
    runtime.block_on(async {
        let _all = in_flight
            .acquire_many(scale.in_flight as u32)
            .await
            .expect("semaphore");
    });
    let connected = hub.connected.load(Ordering::Relaxed);
    let last = hub.at(hub.last_connected.load(Ordering::Relaxed));
    let connect_rate = connected as f64 / last.saturating_duration_since(start).as_secs_f64();
    let connect_to = Instant::now();
    notes.push(format!(
        "{}: open-file limit {files}; {connected} of {} clients connected in {:.1} s; \
         this program's CPU {:.1} s; stream p99 meanwhile {}",
        broker.name,
        scale.clients,
        last.saturating_duration_since(start).as_secs_f64(),
        own_cpu().saturating_sub(cpu).as_secs_f64(),
        ms(stream.p99(start, connect_to))
    ));
    if let Some((n, why)) = stopped {
        notes.push(format!(
            "{}: connect phase stopped at client {n} ({why}); {} not tried",
            broker.name,
            scale.clients - n
        ));
    }
    let failures = std::mem::take(&mut *hub.failures.lock().expect("failures"));
    if !failures.is_empty() {
        let list: Vec<String> = failures.iter().map(|(k, v)| format!("{v} {k}")).collect();
        notes.push(format!(
            "{}: failed handshakes: {}",
            broker.name,
            list.join(", ")
        ));
    }

    // 2. Idle, then the memory they take.
    std::thread::sleep(scale.idle);
    let rss_after = broker.rss_kib();
    let rss_per_client = rss_after.saturating_sub(rss_before) as f64 / connected.max(1) as f64;

    // 3. The stream's quiet window.
    let quiet_from = Instant::now();
    std::thread::sleep(scale.quiet);
    let quiet_to = Instant::now();

    // 4. One message to each client, then the broadcast.
    let alive = connected - hub.dropped.load(Ordering::Relaxed);
    let payload = Bytes::from_static(PAYLOAD);
    let cpu = own_cpu();
    let during_from = Instant::now();
    publisher.publish_all(
        scale.clients,
        QoS::AtMostOnce,
        false,
        |n| format!("own/{n}"),
        payload.clone(),
    );
    wait_for(&hub.own, alive, scale.patience);
    let own_in = hub
        .last(&hub.own_at)
        .map(|t| t.saturating_duration_since(during_from));
    let alive = connected - hub.dropped.load(Ordering::Relaxed);
    let broadcast_from = Instant::now();
    publisher.send(&Packet::Publish(Publish {
        topic: MqttString::from_static("broadcast"),
        qos: QoS::AtMostOnce,
        payload,
        ..Publish::default()
    }));
    wait_for(&hub.broadcast, alive, scale.patience);
    let broadcast_in = hub
        .last(&hub.broadcast_at)
        .map(|t| t.saturating_duration_since(broadcast_from));
    let during_to = Instant::now();
    notes.push(format!(
        "{}: this program's CPU during the deliveries {:.1} s",
        broker.name,
        own_cpu().saturating_sub(cpu).as_secs_f64()
    ));
    let p99_before = stream.p99(quiet_from, quiet_to);
    let p99_during = stream.p99(during_from, during_to);
    let (acked, lost) = stream.finish();
    hub.done.store(true, Ordering::Relaxed);

    let dropped = hub.dropped.load(Ordering::Relaxed);
    if dropped > 0 {
        notes.push(format!(
            "{}: {dropped} connections closed by the broker after their handshake",
            broker.name
        ));
    }
    let own = hub.own.load(Ordering::Relaxed);
    let broadcast = hub.broadcast.load(Ordering::Relaxed);
    let got_nothing = (0..scale.clients)
        .filter(|&n| {
            hub.own_at[n].load(Ordering::Relaxed) == 0
                && hub.broadcast_at[n].load(Ordering::Relaxed) == 0
        })
        .count()
        - (scale.clients - connected);
    let name = broker.name;
    // The broker goes first, so that it closes the connections (and its
    // side keeps the TIME_WAITs), then the clients.
    drop(broker);
    runtime.shutdown_background();
    Row {
        broker: name,
        connected,
        connect_rate,
        rss_before,
        rss_per_client,
        p99_before,
        p99_during,
        window: during_to - during_from,
        own_in,
        broadcast_in,
        missed_own: connected - own,
        missed_broadcast: connected - broadcast,
        got_nothing,
        misrouted: hub.misrouted.load(Ordering::Relaxed),
        acked,
        lost,
        notes,
    }
}

fn main() {
    let Some(args) = Args::from_env() else {
        return;
    };
    let bench = args.bench();
    let mut scale = if bench { BENCH } else { SMOKE };
    let num = |name: &str, default: usize| {
        args.value(name)
            .map_or(default, |v| v.parse().expect("a number"))
    };
    scale.clients = num("--clients", scale.clients);
    scale.in_flight = num("--in-flight", scale.in_flight).max(1);
    scale.per_address = num("--per-address", scale.per_address).max(1);
    assert!(
        scale.clients.div_ceil(scale.per_address) <= 253,
        "more than 253 source addresses: raise --per-address"
    );
    let brokers: Vec<String> = match args.value("--brokers") {
        Some(list) => list.split(',').map(str::to_owned).collect(),
        None if bench => vec!["ferrymq".into(), "mosquitto".into()],
        None => vec!["ferrymq".into()],
    };
    // Ours: a socket per client, the brokers inherit it.
    let want = scale.clients as u64 + BROKER_FILES;
    let files = raise_open_files(want);
    let mut notes = vec![format!("this program's open-file limit: {files}")];
    if files < want {
        // Past our own limit the run would measure our EMFILEs (and its
        // reads of /proc would fail), not the broker.
        let fit = files.saturating_sub(BROKER_FILES) as usize;
        assert!(
            fit > 0,
            "an open-file limit of {files} leaves no room for clients"
        );
        notes.push(format!(
            "**{fit} clients measured, not {}**: the open-file limit could not be raised to \
             {want} (raising the hard limit takes CAP_SYS_RESOURCE); the brokers inherit {files}",
            scale.clients
        ));
        scale.clients = fit;
    }
    println!(
        "## {} clients (QoS 0 to `own/<n>` and `broadcast`), {} handshakes in flight; a QoS 1 stream at 1,000 msg/s",
        scale.clients, scale.in_flight
    );
    println!(
        "| broker | connected | connects/s | RSS before | RSS per client | stream p99 quiet | p99 during | load window | all own messages in | broadcast to all in | missed own | missed broadcast | got nothing | stream acknowledged | lost |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut versions = Vec::new();
    let mut problems = Vec::new();
    for (run, name) in brokers.iter().enumerate() {
        let broker = match name.as_str() {
            "ferrymq" => Broker::ferrymq(&format!(
                "[limits]\nmax_connections = {}",
                scale.clients + 100
            )),
            "mosquitto" => Broker::mosquitto(),
            other => panic!("unknown broker {other}"),
        };
        versions.push(broker.version());
        let row = measure(broker, run as u8, scale);
        println!(
            "| {} | {} | {:.0} | {:.1} MiB | {:.1} KiB | {} | {} | {:.1} s | {} | {} | {} | {} | {} | {} | {} |",
            row.broker,
            row.connected,
            row.connect_rate,
            row.rss_before as f64 / 1024.0,
            row.rss_per_client,
            ms(row.p99_before),
            ms(row.p99_during),
            row.window.as_secs_f64(),
            ms(row.own_in),
            ms(row.broadcast_in),
            row.missed_own,
            row.missed_broadcast,
            row.got_nothing,
            row.acked,
            row.lost
        );
        notes.extend(row.notes);
        if row.misrouted > 0 {
            notes.push(format!(
                "{}: {} deliveries on a topic the client did not subscribe to",
                row.broker, row.misrouted
            ));
        }
        if row.broker == "ferrymq" {
            if row.connected < scale.clients {
                problems.push(format!(
                    "{} clients not connected",
                    scale.clients - row.connected
                ));
            }
            if row.missed_own + row.missed_broadcast + row.misrouted + row.lost > 0 {
                problems.push(format!(
                    "{} missed own, {} missed broadcast, {} misrouted, {} stream messages lost",
                    row.missed_own, row.missed_broadcast, row.misrouted, row.lost
                ));
            }
        }
    }
    println!();
    println!("{}", versions.join("; "));
    for note in notes {
        println!("- {note}");
    }
    assert!(problems.is_empty(), "ferrymq: {problems:?}");
}
