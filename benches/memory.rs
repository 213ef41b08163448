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

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Args;
use common::proc::{Broker, Client, Sampler};
use ferrymq_codec::{Packet, PubAck, QoS};

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
            (
                || Broker::ferrymq(""),
                &[QoS::AtMostOnce, QoS::AtLeastOnce][..],
            ),
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
    for make in [Broker::mosquitto as fn() -> Broker, || Broker::ferrymq("")] {
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
