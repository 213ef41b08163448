//! Memory and retained replay, ferrymq against Mosquitto in the same run
//! (both on free loopback ports, started fresh for each scenario):
//!
//! - `retained`: N retained messages (100-byte payloads, distinct topics)
//!   are published, then one new subscriber to `#` reads them all: how
//!   many arrived, messages/s, and the broker's peak RSS during the replay
//!   (sampled every 20 ms) against its RSS before. QoS 0 for both brokers
//!   (Mosquitto's QoS 1 replay stops at its queue bound, which the README
//!   quotes), and QoS 1 for ferrymq.
//! - `burst`: S subscribers (QoS 1, `load/#`) that never read their sockets
//!   while M × 1 KiB QoS 1 messages are published; then every client
//!   disconnects. RSS before, at the peak, and 30 s after the last client
//!   left (sampled each second). Both brokers at their default queue
//!   bounds (ferrymq 10,000 messages per session, Mosquitto 1,000).
//!
//! Run:
//!   cargo bench --bench memory                        # 200,000 and 1,000,000 retained; 2,000 x 20,000 burst
//!   cargo bench --bench memory -- --retained 200000 --subscribers 500 --messages 5000
//!
//! Under nextest a small smoke run checks that every retained message
//! arrives and that the brokers come back down after the burst.

#[allow(dead_code)]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::{Args, free_port, wait_listening};
use ferrymq_codec::{
    Connect, ConnectProperties, MqttString, Packet, Protocol, PubAck, Publish, QoS, Subscribe,
    Subscription, SubscriptionOptions, decode,
};

/// A broker under test, killed on drop.
struct Broker {
    name: &'static str,
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Broker {
    fn ferrymq() -> Broker {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let config = format!(
            "data_dir = {:?}\n[[listener]]\nbind = \"127.0.0.1:{port}\"\n",
            dir.path().join("data").display().to_string()
        );
        let file = dir.path().join("ferrymq.toml");
        std::fs::write(&file, config).expect("write ferrymq.toml");
        let child = Command::new(env!("CARGO_BIN_EXE_ferrymq"))
            .arg("--config")
            .arg(file)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ferrymq");
        Broker::started("ferrymq", child, port, dir)
    }

    /// Mosquitto at its defaults (1,000 queued messages per client), no
    /// persistence.
    fn mosquitto() -> Broker {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\nuser root\n"),
        )
        .expect("write mosquitto.conf");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (apt install mosquitto)");
        Broker::started("mosquitto", child, port, dir)
    }

    fn started(name: &'static str, child: Child, port: u16, dir: tempfile::TempDir) -> Broker {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let broker = Broker {
            name,
            child,
            addr,
            _dir: dir,
        };
        wait_listening(addr, name);
        broker
    }

    fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id())
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process's resident memory, KiB (0 once it is gone).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Samples a broker's RSS every `every` until dropped; the peak.
struct Sampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(pid: u32, every: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(every);
            }
        });
        Sampler {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn peak(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

/// A blocking MQTT 3.1.1 client on the codec.
struct Client {
    stream: TcpStream,
    buf: BytesMut,
}

impl Client {
    fn connect(addr: SocketAddr, id: &str) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let mut c = Client {
            stream,
            buf: BytesMut::with_capacity(64 << 10),
        };
        c.send(&Packet::Connect(Box::new(Connect {
            protocol: Protocol::V311,
            clean_start: true,
            keep_alive: 0,
            client_id: MqttString::new(id).expect("client id"),
            will: None,
            username: None,
            password: None,
            properties: ConnectProperties::default(),
        })));
        match c.recv() {
            Some(Packet::ConnAck(a)) if a.reason_code.0 == 0 => c,
            other => panic!("CONNACK expected, got {other:?}"),
        }
    }

    fn send(&mut self, packet: &Packet) {
        let mut out = BytesMut::new();
        packet.encode(Protocol::V311, &mut out).expect("encode");
        self.stream.write_all(&out).expect("write");
    }

    fn recv(&mut self) -> Option<Packet> {
        loop {
            if let Some(p) = decode(&mut self.buf, Protocol::V311, u32::MAX).expect("decode") {
                return Some(p);
            }
            let mut chunk = [0u8; 64 << 10];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn subscribe(&mut self, filter: &str, qos: QoS) {
        self.send(&Packet::Subscribe(Subscribe {
            packet_id: 1,
            subscriptions: vec![Subscription {
                filter: MqttString::new(filter).expect("filter"),
                options: SubscriptionOptions {
                    qos,
                    ..SubscriptionOptions::default()
                },
            }],
            properties: Default::default(),
        }));
        match self.recv() {
            Some(Packet::SubAck(_)) => {}
            other => panic!("SUBACK expected, got {other:?}"),
        }
    }

    /// Publishes `count` messages from `topic(i)` pipelined at `qos`, then
    /// waits for the PUBACK of a final QoS 1 message (all before it are
    /// routed by then).
    fn publish_all(
        &mut self,
        count: usize,
        qos: QoS,
        retain: bool,
        topic: impl Fn(usize) -> String,
        payload: Bytes,
    ) {
        let mut reader = Client {
            stream: self.stream.try_clone().expect("clone"),
            buf: BytesMut::new(),
        };
        let acks = if qos == QoS::AtMostOnce { 0 } else { count };
        let counter = std::thread::spawn(move || {
            let mut got = 0;
            while got < acks + 1 {
                match reader.recv() {
                    Some(Packet::PubAck(_)) => got += 1,
                    Some(_) => {}
                    None => break,
                }
            }
            got
        });
        let mut out = BytesMut::with_capacity(1 << 20);
        for i in 0..count {
            Packet::Publish(Publish {
                topic: MqttString::new(&topic(i)).expect("topic"),
                qos,
                retain,
                packet_id: if qos == QoS::AtMostOnce {
                    0
                } else {
                    (i % 60_000 + 1) as u16
                },
                payload: payload.clone(),
                ..Publish::default()
            })
            .encode(Protocol::V311, &mut out)
            .expect("encode");
            if out.len() > 256 << 10 {
                self.stream.write_all(&out).expect("write");
                out.clear();
            }
        }
        Packet::Publish(Publish {
            topic: MqttString::new("sync").expect("topic"),
            qos: QoS::AtLeastOnce,
            packet_id: 60_001,
            ..Publish::default()
        })
        .encode(Protocol::V311, &mut out)
        .expect("encode");
        self.stream.write_all(&out).expect("write");
        let got = counter.join().expect("ack reader");
        assert_eq!(got, acks + 1, "every publish acknowledged");
    }
}

/// One retained replay: (arrived, seconds, peak RSS growth KiB, RSS before KiB).
fn retained_replay(
    broker: &Broker,
    count: usize,
    qos: QoS,
    publish: bool,
) -> (usize, f64, u64, u64) {
    if publish {
        let mut publisher = Client::connect(broker.addr, "retainer");
        publisher.publish_all(
            count,
            QoS::AtMostOnce,
            true,
            |i| format!("sensors/{i:07}/last"),
            Bytes::from(vec![b'x'; 100]),
        );
    }
    let before = broker.rss_kib();
    let sampler = Sampler::start(broker.child.id(), Duration::from_millis(20));
    let mut sub = Client::connect(broker.addr, "dashboard");
    let start = Instant::now();
    sub.subscribe("sensors/#", qos);
    let mut arrived = 0;
    sub.stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    while arrived < count {
        match sub.recv() {
            Some(Packet::Publish(p)) => {
                arrived += 1;
                if p.qos != QoS::AtMostOnce {
                    sub.send(&Packet::PubAck(PubAck::new(p.packet_id)));
                }
            }
            Some(_) => {}
            None => break,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let peak = sampler.peak();
    (arrived, secs, peak.saturating_sub(before), before)
}

/// The burst: (RSS before, peak, 30 s after everyone left), KiB.
fn burst(
    broker: &Broker,
    subscribers: usize,
    messages: usize,
    settle: Duration,
) -> (u64, u64, u64) {
    let before = broker.rss_kib();
    let sampler = Sampler::start(broker.child.id(), Duration::from_millis(100));
    let mut subs: Vec<Client> = (0..subscribers)
        .map(|i| {
            let mut c = Client::connect(broker.addr, &format!("sleepy-{i}"));
            c.subscribe("load/#", QoS::AtLeastOnce);
            c
        })
        .collect();
    let mut publisher = Client::connect(broker.addr, "burst");
    publisher.publish_all(
        messages,
        QoS::AtLeastOnce,
        false,
        |i| format!("load/{}", i % 100),
        Bytes::from(vec![b'p'; 1024]),
    );
    // Let the broker finish fanning out before everyone leaves.
    std::thread::sleep(Duration::from_secs(2));
    let peak = sampler.peak();
    subs.clear();
    drop(publisher);
    std::thread::sleep(settle);
    (before, peak, broker.rss_kib())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn main() {
    let Some(args) = Args::from_env() else {
        return;
    };
    let bench = args.bench();
    let num = |name: &str, bench_default: usize, smoke: usize| {
        args.value(name)
            .map_or(if bench { bench_default } else { smoke }, |v| {
                v.parse().expect("a number")
            })
    };
    let retained_counts: Vec<usize> = match args.value("--retained") {
        Some(v) => vec![v.parse().expect("--retained N")],
        None if bench => vec![200_000, 1_000_000],
        None => vec![5_000],
    };
    let subscribers = num("--subscribers", 2_000, 50);
    let messages = num("--messages", 20_000, 500);
    let settle = Duration::from_secs(if bench { 30 } else { 3 });

    println!("## Retained replay to one new subscriber");
    println!("| retained | broker | QoS | arrived | msg/s | RSS before | peak growth |");
    println!("|---:|---|---|---:|---:|---:|---:|");
    for &count in &retained_counts {
        for (make, qoses) in [
            (Broker::mosquitto as fn() -> Broker, &[QoS::AtMostOnce][..]),
            (Broker::ferrymq, &[QoS::AtMostOnce, QoS::AtLeastOnce][..]),
        ] {
            let broker = make();
            for (i, &qos) in qoses.iter().enumerate() {
                let (arrived, secs, growth, before) = retained_replay(&broker, count, qos, i == 0);
                println!(
                    "| {count} | {} | {} | {arrived} | {:.0} | {} | {} |",
                    broker.name,
                    qos as u8,
                    arrived as f64 / secs,
                    mib(before),
                    mib(growth)
                );
                if broker.name == "ferrymq" {
                    assert_eq!(arrived, count, "ferrymq replays every retained message");
                }
            }
        }
    }

    println!();
    println!(
        "## {subscribers} subscribers that never read, {messages} x 1 KiB QoS 1, then everyone leaves"
    );
    println!(
        "| broker | RSS before | peak | {}s after | after / before |",
        settle.as_secs()
    );
    println!("|---|---:|---:|---:|---:|");
    for make in [Broker::mosquitto as fn() -> Broker, Broker::ferrymq] {
        let broker = make();
        let (before, peak, after) = burst(&broker, subscribers, messages, settle);
        println!(
            "| {} | {} | {} | {} | {:.2} |",
            broker.name,
            mib(before),
            mib(peak),
            mib(after),
            after as f64 / before.max(1) as f64
        );
    }
}
