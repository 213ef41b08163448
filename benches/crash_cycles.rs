//! Crash cycles: the real broker SIGKILLed again and again under load,
//! then everything it acknowledged accounted for.
//!
//! Each cycle starts ferrymq on the same data directory and port and runs
//! for a random 0.3 to 1.5 s before `kill -9`:
//! - two publishers send QoS 1 messages (`load/{p}`, numbered, up to 32 in
//!   flight each) and keep what was PUBACKed;
//! - two persistent subscribers (3.1.1, clean session 0, `load/#` at QoS 1)
//!   read and acknowledge whatever comes;
//! - a retained value (`ret/state`, numbered) is set now and then;
//! - a bridge forwards `load/0/#` to an upstream whose link is cut for the
//!   whole run, so its queue only fills;
//! - a 5.0 client with a will delayed 2 s (session kept 5 minutes) drops
//!   its connection without DISCONNECT before the kill: the broker holds
//!   the will across the kill and must publish it after the delay.
//!
//! At the end the broker runs once more: the subscribers drain, the
//! upstream (a real Mosquitto) comes up at the bridge's address, and the
//! report says, per path, how many acknowledged messages arrived, were
//! lost (must be 0), or arrived more than once (QoS 1 allows it; counted).
//!
//! Run (not part of the test suite's full load):
//!   cargo bench --bench crash_cycles                 # 100 kills
//!   cargo bench --bench crash_cycles -- --kills 300 --seed 7
//!
//! Under nextest a smoke run of 3 kills checks the same.

#[allow(dead_code)]
mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use common::proc::Client;
use common::{Args, Mosquitto, free_port};
use ferrymq_codec::{
    Connect, ConnectProperties, MqttString, Packet, Protocol, PubAck, Publish, QoS, Subscribe,
    Subscription, SubscriptionOptions, Will, WillProperties,
};

const PUBLISHERS: u64 = 2;
const SUBSCRIBERS: usize = 2;
const WINDOW: usize = 32;

fn s(v: &str) -> MqttString {
    MqttString::new(v).expect("a valid string")
}

/// A small generator (xorshift), so a seed replays the same timings.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// The broker under test: one data directory and port for every cycle.
struct Node {
    config: std::path::PathBuf,
    addr: SocketAddr,
    child: Option<Child>,
}

impl Node {
    fn new(dir: &Path, upstream: SocketAddr) -> Node {
        let port = free_port();
        let config = dir.join("ferrymq.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = {:?}\n\
                 [storage]\nmax_queued_messages = 10000000\nmax_queued_bytes = \"1GiB\"\n\
                 [[listener]]\nbind = \"127.0.0.1:{port}\"\n\
                 [[bridge]]\nname = \"up\"\naddresses = [\"{upstream}\"]\n\
                 reconnect_min_ms = 100\nreconnect_max_ms = 500\n\
                 [[bridge.forward]]\nfilter = \"load/0/#\"\nqos = 1\n",
                dir.join("data").display().to_string()
            ),
        )
        .expect("write ferrymq.toml");
        Node {
            config,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child: None,
        }
    }

    fn start(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_ferrymq"))
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ferrymq");
        self.child = Some(child);
        common::wait_listening(self.addr, "ferrymq");
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn connect(protocol: Protocol, id: &str, clean: bool) -> Connect {
    Connect {
        protocol,
        clean_start: clean,
        keep_alive: 0,
        client_id: s(id),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties::default(),
    }
}

fn subscribe(c: &mut Client, filter: &str) -> bool {
    if c.try_send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        subscriptions: vec![Subscription {
            filter: s(filter),
            options: SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                ..Default::default()
            },
        }],
        properties: Default::default(),
    }))
    .is_err()
    {
        return false;
    }
    loop {
        match c.recv() {
            Some(Packet::SubAck(_)) => return true,
            Some(Packet::Publish(p)) => {
                let _ = c.try_send(&Packet::PubAck(PubAck::new(p.packet_id)));
            }
            Some(_) => {}
            None => return false,
        }
    }
}

/// (publisher, number) from a payload.
fn parse(payload: &[u8]) -> (u64, u64) {
    let p = u64::from_be_bytes(payload[..8].try_into().expect("publisher"));
    let n = u64::from_be_bytes(payload[8..16].try_into().expect("number"));
    (p, n)
}

fn payload(p: u64, n: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(64);
    b.put_u64(p);
    b.put_u64(n);
    b.put_bytes(b'x', 48);
    b.freeze()
}

/// Reads and acknowledges every PUBLISH until the connection dies or
/// `stop`; counts what arrived per (publisher, number).
fn read_all(mut c: Client, stop: &AtomicBool, got: &Mutex<HashMap<(u64, u64), u32>>) {
    let _ = c.stream.set_read_timeout(Some(Duration::from_millis(200)));
    while !stop.load(Ordering::Relaxed) {
        match c.recv() {
            Some(Packet::Publish(p)) => {
                if p.payload.len() >= 16 {
                    *got.lock()
                        .expect("got")
                        .entry(parse(&p.payload))
                        .or_default() += 1;
                }
                if c.try_send(&Packet::PubAck(PubAck::new(p.packet_id)))
                    .is_err()
                {
                    return;
                }
            }
            Some(_) => {}
            // A timeout, or the broker's death (then the write fails next).
            None => {
                if c.try_send(&Packet::PingReq).is_err() {
                    return;
                }
            }
        }
    }
}

/// Publishes numbered QoS 1 messages with up to [`WINDOW`] in flight until
/// `stop` (set once the broker is dead); adds what was PUBACKed to `acked`.
fn publish_all(
    mut c: Client,
    publisher: u64,
    next: &Mutex<u64>,
    stop: &AtomicBool,
    acked: &Mutex<Vec<u64>>,
) {
    let (tokens, taken) = mpsc::sync_channel::<()>(WINDOW);
    for _ in 0..WINDOW {
        tokens.send(()).expect("token");
    }
    let pending: Mutex<HashMap<u16, u64>> = Mutex::default();
    let mut reader = c.try_clone();
    let _ = reader
        .stream
        .set_read_timeout(Some(Duration::from_millis(200)));
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                if let Some(Packet::PubAck(a)) = reader.recv()
                    && let Some(n) = pending.lock().expect("pending").remove(&a.packet_id)
                {
                    acked.lock().expect("acked").push(n);
                    let _ = tokens.send(());
                }
            }
        });
        while !stop.load(Ordering::Relaxed) {
            if taken.recv_timeout(Duration::from_millis(200)).is_err() {
                continue;
            }
            let n = {
                let mut next = next.lock().expect("next");
                *next += 1;
                *next
            };
            let packet_id = (n % 60_000 + 1) as u16;
            pending.lock().expect("pending").insert(packet_id, n);
            let _ = c.try_send(&Packet::Publish(Publish {
                topic: s(&format!("load/{publisher}/x")),
                qos: QoS::AtLeastOnce,
                packet_id,
                payload: payload(publisher, n),
                ..Publish::default()
            }));
        }
    });
}

#[derive(Default)]
struct Totals {
    acked: BTreeMap<u64, Vec<u64>>,
    retained_acked: u64,
    retained_sent: u64,
    wills_due: u64,
    kills: usize,
}

/// The persistent sessions that read through every cycle: client id and
/// filter. The last one watches the wills.
const READERS: [(&str, &str); SUBSCRIBERS + 1] = [
    ("crash-sub-0", "load/#"),
    ("crash-sub-1", "load/#"),
    ("crash-watch", "wills/#"),
];

/// One cycle: start, load, drop the will client, kill. Returns when the
/// broker is dead and every client thread has ended.
fn cycle(
    node: &mut Node,
    rng: &mut Rng,
    totals: &mut Totals,
    next: &[Mutex<u64>],
    got: &[Mutex<HashMap<(u64, u64), u32>>],
) {
    node.start();
    let addr = node.addr;
    let stop = AtomicBool::new(false);
    let acked: Vec<Mutex<Vec<u64>>> = (0..PUBLISHERS).map(|_| Mutex::default()).collect();
    std::thread::scope(|scope| {
        for ((id, _), got) in READERS.iter().zip(got) {
            let stop = &stop;
            scope.spawn(move || {
                // Subscribed before the first cycle: the session resumes.
                if let Ok(c) = Client::connect_with(addr, connect(Protocol::V311, id, false)) {
                    read_all(c, stop, got);
                }
            });
        }
        for p in 0..PUBLISHERS {
            let (stop, next, acked) = (&stop, &next[p as usize], &acked[p as usize]);
            scope.spawn(move || {
                if let Ok(c) = Client::connect_with(
                    addr,
                    connect(Protocol::V311, &format!("crash-pub-{p}"), true),
                ) {
                    publish_all(c, p, next, stop, acked);
                }
            });
        }
        // A retained value, set once a cycle at QoS 1.
        if let Ok(mut c) =
            Client::connect_with(addr, connect(Protocol::V311, "crash-retainer", true))
        {
            let n = totals.retained_sent + 1;
            totals.retained_sent = n;
            c.send(&Packet::Publish(Publish {
                topic: s("ret/state"),
                qos: QoS::AtLeastOnce,
                retain: true,
                packet_id: 1,
                payload: payload(99, n),
                ..Publish::default()
            }));
            if matches!(c.recv(), Some(Packet::PubAck(_))) {
                totals.retained_acked = n;
            }
        }
        // A will client of its own each cycle (a client id that came back
        // would cancel its will): connects with a will delayed 2 s, then
        // drops its connection; the broker stores the pending will, which
        // must go out 2 s later, whatever kills come in between.
        let will_id = format!("crash-will-{}", totals.kills);
        let mut will_connect = connect(Protocol::V5, &will_id, false);
        will_connect.properties.session_expiry_interval = Some(300);
        will_connect.will = Some(Will {
            topic: s("wills/crash"),
            payload: payload(98, totals.wills_due + 1),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: WillProperties {
                will_delay_interval: Some(2),
                ..Default::default()
            },
        });
        let run_for = Duration::from_millis(300 + rng.below(1200));
        let started = Instant::now();
        if let Ok(will) = Client::connect_with(addr, will_connect) {
            std::thread::sleep(run_for / 2);
            drop(will);
            // The broker notices the close and stores the pending will.
            std::thread::sleep(Duration::from_millis(200));
            totals.wills_due += 1;
        }
        std::thread::sleep(run_for.saturating_sub(started.elapsed()));
        node.kill();
        totals.kills += 1;
        stop.store(true, Ordering::Relaxed);
    });
    for (p, acked) in acked.into_iter().enumerate() {
        totals
            .acked
            .entry(p as u64)
            .or_default()
            .extend(acked.into_inner().expect("acked"));
    }
}

/// Reads until `quiet` passes without a PUBLISH; counts by (publisher, n).
fn drain(c: &mut Client, quiet: Duration, got: &Mutex<HashMap<(u64, u64), u32>>) {
    let _ = c.stream.set_read_timeout(Some(quiet));
    while let Some(packet) = c.recv() {
        if let Packet::Publish(p) = packet {
            if p.payload.len() >= 16 {
                *got.lock()
                    .expect("got")
                    .entry(parse(&p.payload))
                    .or_default() += 1;
            }
            c.send(&Packet::PubAck(PubAck::new(p.packet_id)));
        }
    }
}

/// (acknowledged, arrived, lost, arrived more than once).
fn account(
    acked: &BTreeMap<u64, Vec<u64>>,
    got: &HashMap<(u64, u64), u32>,
    only: Option<u64>,
) -> (usize, usize, usize, usize) {
    let mut totals = (0, 0, 0, 0);
    for (&p, ns) in acked.iter().filter(|(p, _)| only.is_none_or(|o| o == **p)) {
        for &n in ns {
            totals.0 += 1;
            match got.get(&(p, n)) {
                None => totals.2 += 1,
                Some(&c) => {
                    totals.1 += 1;
                    totals.3 += usize::from(c > 1);
                }
            }
        }
    }
    totals
}

fn main() {
    let Some(args) = Args::from_env() else {
        return;
    };
    let kills: usize = args
        .value("--kills")
        .map_or(if args.bench() { 100 } else { 3 }, |v| {
            v.parse().expect("--kills N")
        });
    let seed: u64 = args
        .value("--seed")
        .map_or(1, |v| v.parse().expect("--seed N"));
    let dir = tempfile::tempdir().expect("temp dir");
    let upstream_port = free_port();
    let upstream = SocketAddr::from(([127, 0, 0, 1], upstream_port));
    let mut node = Node::new(dir.path(), upstream);
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut totals = Totals::default();
    let next: Vec<Mutex<u64>> = (0..PUBLISHERS).map(|_| Mutex::new(0)).collect();
    let got: Vec<Mutex<HashMap<(u64, u64), u32>>> =
        READERS.iter().map(|_| Mutex::default()).collect();
    // The persistent sessions subscribe once, before any load.
    node.start();
    for (id, filter) in READERS {
        let mut c =
            Client::connect_with(node.addr, connect(Protocol::V311, id, false)).expect("reader");
        subscribe(&mut c, filter);
    }
    node.kill();
    let started = Instant::now();
    for _ in 0..kills {
        cycle(&mut node, &mut rng, &mut totals, &next, &got);
    }
    let cycles_took = started.elapsed();
    // The last run: every reader drains (the last wills are due 2 s after
    // the start), then the upstream comes up and the bridge drains.
    node.start();
    for ((id, _), got) in READERS.iter().zip(&got) {
        let mut c =
            Client::connect_with(node.addr, connect(Protocol::V311, id, false)).expect("reader");
        drain(&mut c, Duration::from_secs(3), got);
    }
    let mut retained_probe =
        Client::connect_with(node.addr, connect(Protocol::V311, "crash-probe", true))
            .expect("probe");
    let retained = Mutex::default();
    subscribe(&mut retained_probe, "ret/#");
    drain(&mut retained_probe, Duration::from_secs(1), &retained);
    let mosquitto = Mosquitto::start(&format!("listener {upstream_port} 127.0.0.1"));
    let mut upstream_sub =
        Client::connect_with(mosquitto.addr(), connect(Protocol::V311, "crash-up", true))
            .expect("upstream subscriber");
    subscribe(&mut upstream_sub, "load/#");
    let upstream_got = Mutex::default();
    // Quiet this long means the bridge's queue is empty (it reconnects
    // within half a second).
    drain(&mut upstream_sub, Duration::from_secs(5), &upstream_got);
    node.kill();

    println!(
        "## {kills} SIGKILLs under load (seed {seed}), {:.0} s",
        cycles_took.as_secs_f64()
    );
    println!("| path | acknowledged | arrived | lost | arrived twice or more |");
    println!("|---|---:|---:|---:|---:|");
    let mut lost = 0;
    for (i, got) in got[..SUBSCRIBERS].iter().enumerate() {
        let (a, d, l, dup) = account(&totals.acked, &got.lock().expect("got"), None);
        println!("| persistent subscriber {i} | {a} | {d} | {l} | {dup} |");
        lost += l;
    }
    let (a, d, l, dup) = account(&totals.acked, &upstream_got.lock().expect("up"), Some(0));
    println!(
        "| bridge to Mosquitto (load/0/#, link cut until the end) | {a} | {d} | {l} | {dup} |"
    );
    lost += l;
    let wills = got[SUBSCRIBERS].lock().expect("wills");
    let will_dups = wills.values().filter(|c| **c > 1).count();
    let wills_lost = (1..=totals.wills_due)
        .filter(|n| !wills.contains_key(&(98, *n)))
        .count();
    println!(
        "| wills held across a kill | {} | {} | {wills_lost} | {will_dups} |",
        totals.wills_due,
        wills.len()
    );
    let retained = retained.into_inner().expect("retained");
    let held = retained.keys().map(|(_, n)| *n).max().unwrap_or(0);
    // The last value acknowledged, or one sent after it (unacknowledged
    // when the kill came, it may or may not have been taken).
    let retained_ok = (totals.retained_acked..=totals.retained_sent).contains(&held);
    println!(
        "| retained value (held {held}; last acknowledged {}) | 1 | {} | {} | - |",
        totals.retained_acked,
        usize::from(retained_ok),
        usize::from(!retained_ok)
    );
    assert_eq!(lost, 0, "acknowledged messages lost");
    assert_eq!(wills_lost, 0, "wills lost");
    assert!(retained_ok, "the retained value went back");
    assert_eq!(totals.kills, kills);
}
