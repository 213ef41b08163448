//! Hostile clients, measured: a well-behaved QoS 1 stream runs at 1,000
//! messages a second between two clients while, one scenario at a time,
//! other clients misbehave on purpose. ferrymq and Mosquitto (each at its
//! defaults, started fresh for each scenario) in the same run.
//!
//! Scenarios (the numbers of a `cargo bench` run):
//! - `connect-storm`: 10,000 connections opened at once (8 threads), each
//!   sending CONNECT and holding its connection;
//! - `slowloris`: 1,000 connections each sending one byte of a CONNECT
//!   every 2 seconds;
//! - `never-read`: 100 subscribers (QoS 1, `flood/#`) that never read
//!   their sockets while a publisher sends 1 KiB QoS 1 messages as fast as
//!   it is acknowledged;
//! - `many-subscriptions`: one client asks for 100,000 subscriptions
//!   (1,000 SUBSCRIBE packets of 100 filters);
//! - `retained-flood`: one client publishes retained 100-byte messages on
//!   distinct topics as fast as it is acknowledged;
//! - `malformed`: 4 threads connect and send a malformed packet, again and
//!   again, at full speed.
//!
//! For each: the stream's p99 latency (publish to delivery) in the 5 s
//! before and the 10 s during the attack, the broker's RSS before and its
//! peak during, how many acknowledged stream messages never arrived (must
//! be 0), and what the attack got done.
//!
//! Run:
//!   cargo bench --bench hostile
//!   cargo bench --bench hostile -- --scenarios never-read,slowloris --brokers ferrymq
//!
//! Under nextest a short smoke run (ferrymq only, small numbers) checks
//! that nothing acknowledged is lost in any scenario.

#[allow(dead_code)]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::Args;
use common::proc::{Broker, Client, Sampler, Stream, ms};
use ferrymq_codec::{
    MqttString, Packet, Protocol, QoS, Subscribe, Subscription, SubscriptionOptions,
};

/// The sizes of one run.
#[derive(Clone, Copy)]
struct Scale {
    before: Duration,
    during: Duration,
    storm: usize,
    slowloris: usize,
    never_read: usize,
    subscriptions: usize,
}

const BENCH: Scale = Scale {
    before: Duration::from_secs(5),
    during: Duration::from_secs(10),
    storm: 10_000,
    slowloris: 1_000,
    never_read: 100,
    subscriptions: 100_000,
};

const SMOKE: Scale = Scale {
    before: Duration::from_secs(1),
    during: Duration::from_secs(2),
    storm: 200,
    slowloris: 50,
    never_read: 10,
    subscriptions: 2_000,
};

const SCENARIOS: [&str; 6] = [
    "connect-storm",
    "slowloris",
    "never-read",
    "many-subscriptions",
    "retained-flood",
    "malformed",
];

fn s(v: &str) -> MqttString {
    MqttString::new(v).expect("a valid string")
}

/// An attack running in threads until stopped; `report` says what it got
/// done.
struct Attack {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<String>>,
}

impl Attack {
    fn spawn(
        threads: usize,
        f: impl Fn(usize, Arc<AtomicBool>) -> String + Send + Sync + 'static,
    ) -> Attack {
        let stop = Arc::new(AtomicBool::new(false));
        let f = Arc::new(f);
        let threads = (0..threads)
            .map(|i| {
                let (f, stop) = (f.clone(), stop.clone());
                std::thread::spawn(move || f(i, stop))
            })
            .collect();
        Attack { stop, threads }
    }

    fn stop(self) -> String {
        self.stop.store(true, Ordering::Relaxed);
        let reports: Vec<String> = self
            .threads
            .into_iter()
            .map(|t| t.join().expect("attack thread"))
            .filter(|r| !r.is_empty())
            .collect();
        reports.join("; ")
    }
}

/// Whether the broker closed `c` (a read that does not wait finds the end
/// of the stream or an error).
fn is_closed(mut c: &TcpStream) -> bool {
    let _ = c.set_nonblocking(true);
    match c.read(&mut [0u8; 16]) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// A CONNECT as bytes (3.1.1, clean session).
fn connect_bytes(id: &str) -> Vec<u8> {
    let mut out = BytesMut::new();
    Packet::Connect(Box::new(ferrymq_codec::Connect {
        protocol: Protocol::V311,
        clean_start: true,
        keep_alive: 60,
        client_id: s(id),
        will: None,
        username: None,
        password: None,
        properties: Default::default(),
    }))
    .encode(Protocol::V311, &mut out)
    .expect("encode");
    out.to_vec()
}

fn start_attack(name: &str, addr: SocketAddr, scale: Scale) -> Attack {
    match name {
        "connect-storm" => {
            let per_thread = scale.storm / 8;
            let window = scale.during;
            Attack::spawn(8, move |t, stop| {
                // Everything must happen within the window: connects and
                // CONNACKs that take longer count as not connected.
                let started = Instant::now();
                let deadline = started + window;
                let mut held = Vec::with_capacity(per_thread);
                for i in 0..per_thread {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() || stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(mut c) = TcpStream::connect_timeout(&addr, left) else {
                        continue;
                    };
                    if c.write_all(&connect_bytes(&format!("storm-{t}-{i}")))
                        .is_ok()
                    {
                        held.push(c);
                    }
                }
                // Every CONNACK (4 bytes) read.
                let mut acked = 0;
                let mut last = started;
                for c in &mut held {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    let _ = c.set_read_timeout(Some(left));
                    let mut ack = [0u8; 4];
                    if c.read_exact(&mut ack).is_ok() && ack[3] == 0 {
                        acked += 1;
                        last = Instant::now();
                    }
                }
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                format!("{acked}/{:.1}", (last - started).as_secs_f64())
            })
        }
        "slowloris" => {
            let n = scale.slowloris;
            Attack::spawn(1, move |_, stop| {
                let hello = connect_bytes("slowloris");
                let mut conns: Vec<TcpStream> = (0..n)
                    .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok())
                    .collect();
                let mut sent = 0;
                let mut closed = 0;
                'outer: while sent < hello.len() {
                    closed = 0;
                    for c in &mut conns {
                        if c.write_all(&hello[sent..sent + 1]).is_err() {
                            closed += 1;
                        }
                    }
                    sent += 1;
                    for _ in 0..20 {
                        if stop.load(Ordering::Relaxed) {
                            break 'outer;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
                // A write into a closed socket fails only on the second try;
                // a read shows it at once.
                closed = closed.max(conns.iter().filter(|c| is_closed(c)).count());
                format!(
                    "{} of {n} open, {sent} bytes each sent, {closed} closed by the broker",
                    conns.len()
                )
            })
        }
        "never-read" => {
            let n = scale.never_read;
            let sleepers: Vec<Client> = (0..n)
                .map(|i| {
                    let mut c = Client::connect(addr, &format!("sleepy-{i}"));
                    c.subscribe("flood/#", QoS::AtLeastOnce);
                    c
                })
                .collect();
            let sleepers = Arc::new(Mutex::new(sleepers));
            Attack::spawn(1, move |_, stop| {
                let _held = sleepers.clone();
                let mut publisher = Client::connect(addr, "flooder");
                let payload = Bytes::from(vec![b'f'; 1024]);
                let mut sent = 0;
                while !stop.load(Ordering::Relaxed) {
                    publisher.publish_all(
                        1_000,
                        QoS::AtLeastOnce,
                        false,
                        |i| format!("flood/{}", i % 10),
                        payload.clone(),
                    );
                    sent += 1_000;
                }
                format!("{sent} x 1 KiB acknowledged for {n} subscribers that never read")
            })
        }
        "many-subscriptions" => {
            let n = scale.subscriptions;
            Attack::spawn(1, move |_, stop| {
                let mut c = Client::connect(addr, "subscriber-of-everything");
                let mut granted = 0;
                let mut refused = 0;
                for (k, chunk) in (0..n).collect::<Vec<_>>().chunks(100).enumerate() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    c.send(&Packet::Subscribe(Subscribe {
                        packet_id: (k % 60_000 + 1) as u16,
                        subscriptions: chunk
                            .iter()
                            .map(|i| Subscription {
                                filter: s(&format!("subs/{i}/+")),
                                options: SubscriptionOptions {
                                    qos: QoS::AtLeastOnce,
                                    ..Default::default()
                                },
                            })
                            .collect(),
                        properties: Default::default(),
                    }));
                    match c.recv() {
                        Some(Packet::SubAck(a)) => {
                            for code in a.reason_codes {
                                if code.0 < 0x80 {
                                    granted += 1;
                                } else {
                                    refused += 1;
                                }
                            }
                        }
                        _ => break,
                    }
                }
                format!("{granted} granted, {refused} refused")
            })
        }
        "retained-flood" => Attack::spawn(1, move |_, stop| {
            let mut c = Client::connect(addr, "retainer");
            let payload = Bytes::from(vec![b'r'; 100]);
            let mut sent = 0;
            while !stop.load(Ordering::Relaxed) {
                let base = sent;
                c.publish_all(
                    1_000,
                    QoS::AtLeastOnce,
                    true,
                    |i| format!("ret/{}/{}", (base + i) / 1000, (base + i) % 1000),
                    payload.clone(),
                );
                sent += 1_000;
            }
            format!("{sent} retained topics acknowledged")
        }),
        "malformed" => Attack::spawn(4, move |_, stop| {
            // A CONNECT whose protocol name is wrong, then a packet of a
            // reserved type: either closes the connection.
            let mut bad = connect_bytes("malformed");
            bad[4] = b'X';
            let mut closed = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut c) = TcpStream::connect(addr) else {
                    continue;
                };
                let _ = c.write_all(&bad);
                let _ = c.write_all(&[0xF0, 0x00]);
                let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                let mut sink = [0u8; 64];
                while let Ok(n) = c.read(&mut sink) {
                    if n == 0 {
                        break;
                    }
                }
                closed += 1;
            }
            format!("{closed}")
        }),
        other => panic!("unknown scenario {other}"),
    }
}

struct Row {
    scenario: &'static str,
    broker: &'static str,
    p99_before: Option<Duration>,
    p99_during: Option<Duration>,
    rss_before: u64,
    rss_peak: u64,
    acked: usize,
    lost: usize,
    attack: String,
}

fn run(scenario: &'static str, broker: Broker, scale: Scale) -> Row {
    let base = Instant::now();
    let stream = Stream::start(broker.addr, base);
    // Settle, then the quiet window.
    std::thread::sleep(Duration::from_millis(500));
    let quiet_from = Instant::now();
    std::thread::sleep(scale.before);
    let quiet_to = Instant::now();
    let rss_before = broker.rss_kib();
    let sampler = Sampler::start(broker.child.id(), Duration::from_millis(100));
    let attack = start_attack(scenario, broker.addr, scale);
    let during_from = Instant::now();
    std::thread::sleep(scale.during);
    let during_to = Instant::now();
    let rss_peak = sampler.peak();
    let p99_before = stream.p99(quiet_from, quiet_to);
    let p99_during = stream.p99(during_from, during_to);
    let mut attack = attack.stop();
    if scenario == "malformed" {
        let total: u64 = attack
            .split("; ")
            .filter_map(|n| n.parse::<u64>().ok())
            .sum();
        attack = format!("{total} malformed connections closed");
    }
    if scenario == "connect-storm" {
        // Per thread: "connected/seconds to the last CONNACK".
        let per: Vec<(u64, f64)> = attack
            .split("; ")
            .filter_map(|r| r.split_once('/'))
            .filter_map(|(n, s)| Some((n.parse().ok()?, s.parse().ok()?)))
            .collect();
        let connected: u64 = per.iter().map(|p| p.0).sum();
        let took = per.iter().map(|p| p.1).fold(0.0, f64::max);
        attack = format!(
            "{connected} of {} connected within the window, the last after {took:.1} s",
            scale.storm
        );
    }
    let (acked, lost) = stream.finish();
    Row {
        scenario,
        broker: broker.name,
        p99_before,
        p99_during,
        rss_before,
        rss_peak,
        acked,
        lost,
        attack,
    }
}

fn main() {
    let Some(args) = Args::from_env() else {
        return;
    };
    let bench = args.bench();
    let scale = if bench { BENCH } else { SMOKE };
    let scenarios: Vec<&'static str> = match args.value("--scenarios") {
        Some(list) => list
            .split(',')
            .map(|s| {
                *SCENARIOS
                    .iter()
                    .find(|k| **k == s)
                    .unwrap_or_else(|| panic!("unknown scenario {s}"))
            })
            .collect(),
        None => SCENARIOS.to_vec(),
    };
    let brokers: Vec<String> = match args.value("--brokers") {
        Some(list) => list.split(',').map(str::to_owned).collect(),
        None if bench => vec!["ferrymq".into(), "mosquitto".into()],
        None => vec!["ferrymq".into()],
    };
    println!(
        "## Hostile clients: a QoS 1 stream at 1,000 msg/s, {:?} before and {:?} during each attack",
        scale.before, scale.during
    );
    println!(
        "| scenario | broker | stream p99 before | p99 during | RSS before | peak RSS during | acknowledged | lost | the attack |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---|");
    let mut lost_any = Vec::new();
    for &scenario in &scenarios {
        for name in &brokers {
            let broker = match name.as_str() {
                "ferrymq" => Broker::ferrymq(""),
                "mosquitto" => Broker::mosquitto(),
                other => panic!("unknown broker {other}"),
            };
            let row = run(scenario, broker, scale);
            println!(
                "| {} | {} | {} | {} | {:.1} MiB | {:.1} MiB | {} | {} | {} |",
                row.scenario,
                row.broker,
                ms(row.p99_before),
                ms(row.p99_during),
                row.rss_before as f64 / 1024.0,
                row.rss_peak as f64 / 1024.0,
                row.acked,
                row.lost,
                row.attack
            );
            if row.broker == "ferrymq" && row.lost > 0 {
                lost_any.push(format!("{}: {} lost", row.scenario, row.lost));
            }
        }
    }
    assert!(
        lost_any.is_empty(),
        "ferrymq lost acknowledged messages: {lost_any:?}"
    );
}
