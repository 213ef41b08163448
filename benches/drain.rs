//! Store-and-forward drain: how fast a bridge empties a large backlog into
//! a Mosquitto upstream once the link returns, and how long live messages
//! published during the drain take to arrive (one FIFO: a live message
//! waits for the backlog queued before it).
//!
//! Scenario: an edge node (the library: broker + bridge, RocksDB with
//! group commit) bridged to Mosquitto 2 (Debian's `mosquitto`, started
//! here on a free loopback port) through a link this program holds down
//! while the backlog is published in-process (64-byte payloads, QoS 1).
//! Then the link comes up; a subscriber on Mosquitto counts every message
//! by its `ferry-id` (duplicates are counted apart), while a live
//! publisher sends one timestamped message every 10 ms at the edge.
//! Bridge settings: `inflight = 1000`, `drain_rate = 0` (no cap),
//! `ramp_secs = 0`; Mosquitto `max_inflight_messages 1000`.
//!
//! Run:
//!   cargo bench --bench drain                       # 1,000,000 messages
//!   cargo bench --bench drain -- --messages 200000
//!
//! Under `cargo test --benches` (and nextest) a 2,000-message smoke run
//! checks that nothing is lost.

#[allow(dead_code)]
mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Args, Link, Mosquitto, edge_node, observer, payload, queue_backlog};
use ferrymq_bridge::{Event, Uplink, UplinkOptions};
use ferrymq_broker::{ClientOptions, QoS};
use ferrymq_codec::{MqttString, Publish};
use ferrymq_config::BridgeKind;

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

async fn run(messages: u64) {
    let upstream = Mosquitto::start("max_inflight_messages 1000\n");
    let link = Link::start(upstream.addr()).await;
    let (node, _dir) = edge_node(link.addr.port(), BridgeKind::Mqtt, 1000, false).await;

    // The backlog, published while the link is down.
    let filled = Instant::now();
    queue_backlog(&node, "backlog/data", messages).await;
    let fill_time = filled.elapsed();
    println!(
        "backlog: {messages} messages of 64 bytes queued in {:.1} s ({:.0} msg/s, link down)",
        fill_time.as_secs_f64(),
        messages as f64 / fill_time.as_secs_f64()
    );

    // The upstream subscriber.
    let mut observer = observer(upstream.addr(), "drain-observer").await;

    // The live publisher: one message every 10 ms, stamped.
    let live_on = Arc::new(AtomicBool::new(true));
    let started = Instant::now();
    let live = {
        let live_on = live_on.clone();
        let client = node
            .broker()
            .connect(ClientOptions::new("live"))
            .await
            .expect("connect");
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut sent = 0u64;
            while live_on.load(Ordering::SeqCst) {
                tick.tick().await;
                let at = started.elapsed().as_nanos() as u64;
                if client
                    .publish("live/data", at.to_string(), QoS::AtLeastOnce, false)
                    .await
                    .is_err()
                {
                    break;
                }
                sent += 1;
            }
            sent
        })
    };

    link.up.store(true, Ordering::SeqCst);
    let mut ids = HashSet::new();
    let mut duplicates = 0u64;
    let mut backlog_seen = 0u64;
    let mut live_latency = Vec::new();
    let mut drained_at = None;
    let mut quiet = 0;
    let mut live_sent = None;
    let mut live = Some(live);
    loop {
        if drained_at.is_some() && live_sent.is_none() {
            // The backlog is through: stop the live publisher, then wait
            // for what it sent.
            live_on.store(false, Ordering::SeqCst);
            if let Some(task) = live.take() {
                live_sent = Some(task.await.expect("live publisher"));
            }
        }
        if live_sent.is_some_and(|sent| live_latency.len() as u64 >= sent) {
            break;
        }
        let event = match tokio::time::timeout(Duration::from_secs(5), observer.next_event()).await
        {
            Ok(Ok(event)) => event,
            Ok(Err(e)) => panic!("observer: {e}"),
            Err(_) => {
                quiet += 1;
                if quiet > 2 {
                    break;
                }
                continue;
            }
        };
        let Event::Message(p) = event else { continue };
        if p.qos != QoS::AtMostOnce {
            observer.ack(p.packet_id).expect("ack");
        }
        let id = p
            .properties
            .user_properties
            .iter()
            .find(|(k, _)| k.as_str() == "ferry-id")
            .map(|(_, v)| v.to_string())
            .expect("ferry-id");
        if !ids.insert(id) {
            duplicates += 1;
            continue;
        }
        if p.topic.as_str() == "backlog/data" {
            backlog_seen += 1;
            if backlog_seen == messages {
                drained_at = Some(started.elapsed());
            }
        } else if let Ok(at) = std::str::from_utf8(&p.payload).unwrap_or("").parse::<u64>() {
            live_latency.push(started.elapsed().saturating_sub(Duration::from_nanos(at)));
        }
    }
    let live_sent = live_sent.unwrap_or(0);
    let drained = drained_at.unwrap_or_else(|| {
        panic!("only {backlog_seen} of {messages} backlog messages arrived upstream")
    });
    live_latency.sort();
    println!(
        "drain: {messages} messages upstream in {:.1} s = {:.0} msg/s; {duplicates} duplicates",
        drained.as_secs_f64(),
        messages as f64 / drained.as_secs_f64()
    );
    println!(
        "live during the drain: {} received of {live_sent} sent, latency p50 {:.2} s, p99 {:.2} s, max {:.2} s",
        live_latency.len(),
        percentile(&live_latency, 0.5).as_secs_f64(),
        percentile(&live_latency, 0.99).as_secs_f64(),
        live_latency
            .last()
            .copied()
            .unwrap_or_default()
            .as_secs_f64()
    );
    node.shutdown().await;

    // The peer in the same run: one client publishing the same messages
    // straight into Mosquitto with the same window, no edge in between.
    let direct = messages.min(300_000);
    let mut options = UplinkOptions::new("127.0.0.1", upstream.addr().port(), "direct-publisher");
    options.receive_maximum = u16::MAX;
    let (mut publisher, _) = Uplink::connect(&options).await.expect("publisher");
    publisher.set_window_cap(1000);
    let started = Instant::now();
    let (mut sent, mut received) = (0u64, 0u64);
    while received < direct {
        while sent < direct && publisher.can_publish() {
            publisher
                .publish(Publish {
                    qos: QoS::AtLeastOnce,
                    topic: MqttString::from_static("direct/data"),
                    payload: payload(sent),
                    ..Publish::default()
                })
                .expect("publish");
            sent += 1;
        }
        tokio::select! {
            event = publisher.next_event() => { event.expect("publisher"); }
            event = observer.next_event() => {
                if let Ok(Event::Message(p)) = event {
                    observer.ack(p.packet_id).expect("ack");
                    received += 1;
                }
            }
        }
    }
    let elapsed = started.elapsed();
    println!(
        "peer: one client straight into Mosquitto, window 1000: {direct} messages in {:.1} s = {:.0} msg/s (the drain reached {:.0} % of it)",
        elapsed.as_secs_f64(),
        direct as f64 / elapsed.as_secs_f64(),
        100.0 * (messages as f64 / drained.as_secs_f64()) / (direct as f64 / elapsed.as_secs_f64())
    );
}

fn main() {
    let Some(args) = Args::from_env() else {
        return;
    };
    let messages = if args.bench() {
        args.value("--messages")
            .map_or(1_000_000, |v| v.parse().expect("--messages N"))
    } else {
        2_000
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(messages));
}
