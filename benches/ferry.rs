//! Ferry drain: an edge's backlog of 64-byte QoS 1 messages drained into
//! a ferrymq regional node, three ways in the same run:
//! - `ferry batches`: a ferrymq edge with `kind = "ferrymq"` (batches of
//!   500, zstd);
//! - `plain MQTT 5`: the same edge with `kind = "mqtt"` (one PUBLISH per
//!   message, de-duplicated at the regional node by its `ferry-id`);
//! - `Mosquitto edge`: Mosquitto 2 (Debian's) as the edge, its own MQTT 5
//!   bridge (`max_queued_messages 0`, `max_inflight_messages 1000`).
//!
//! The edge queues the backlog while the link (a proxy here that counts
//! bytes) is down; then the link comes up and a subscriber on the
//! regional node (the release `ferrymq` binary, `[ferry] trusted_clients`)
//! counts every message by its number: drain rate (link up to the last
//! message), bytes on the wire per message from the edge to the regional
//! node, lost and duplicated messages. During the drain the edge also
//! gets a live message every 10 ms on `live/data` (ferrymq edges: a
//! `lane = "live"` rule; Mosquitto: the same bridge, one FIFO), whose
//! latency to the regional subscriber is measured. ferrymq edges: the library (broker
//! and bridge, RocksDB with group commit), `inflight = 1000` (messages,
//! or batches with `kind = "ferrymq"`), no drain cap.
//!
//! Run:
//!   cargo bench --bench ferry                      # 1,000,000 messages
//!   cargo bench --bench ferry -- --messages 200000
//!
//! Under `cargo test --benches` (and nextest) a 3,000-message smoke run
//! checks that every way loses and duplicates nothing.

#[allow(dead_code)]
mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{
    Args, Link, Mosquitto, cpu_time, edge_node, free_port, observer, payload, queue_backlog,
    wait_listening,
};
use ferrymq_bridge::{Event, Node, Uplink, UplinkOptions};
use ferrymq_broker::QoS;
use ferrymq_codec::{MqttString, Publish};
use ferrymq_config::BridgeKind;

/// The regional node: the release binary, trusting `edge-*`.
struct Regional {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Regional {
    fn start() -> Regional {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let config = format!(
            "data_dir = {:?}\n[[listener]]\nbind = \"127.0.0.1:{port}\"\n\
             [ferry]\ntrusted_clients = [\"edge-*\"]\n\
             [storage]\nmax_queued_messages = 100000000\nmax_queued_bytes = \"64GiB\"\n\
             max_disk_bytes = \"64GiB\"\n",
            dir.path().join("data").display().to_string()
        );
        let file = dir.path().join("ferrymq.toml");
        std::fs::write(&file, config).expect("write the config");
        let child = Command::new(env!("CARGO_BIN_EXE_ferrymq"))
            .arg("--config")
            .arg(&file)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the regional ferrymq");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_listening(addr, "the regional ferrymq");
        Regional {
            child,
            addr,
            _dir: dir,
        }
    }
}

impl Drop for Regional {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    Batches,
    Plain,
    Mosquitto,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Batches => "ferry batches (kind = \"ferrymq\")",
            Way::Plain => "plain MQTT 5 (kind = \"mqtt\")",
            Way::Mosquitto => "Mosquitto edge (its MQTT 5 bridge)",
        }
    }
}

/// What one drain measured.
struct Drained {
    /// Latency of the live messages sent during the drain.
    live_p50: Duration,
    live_p99: Duration,
    live_count: usize,
    /// CPU of the regional node during the drain, in cores.
    regional_cores: f64,
    /// CPU of this process (the ferrymq edge and the subscriber; for the
    /// Mosquitto edge, the subscriber only), in cores.
    edge_cores: f64,
    rate: f64,
    bytes_per_message: f64,
    lost: u64,
    duplicates: u64,
}

/// A ferrymq edge with its backlog queued; the node stays up.
async fn ferrymq_edge(link: &Link, kind: BridgeKind, messages: u64) -> (Node, tempfile::TempDir) {
    let inflight = if kind == BridgeKind::Ferrymq {
        16
    } else {
        1000
    };
    let (node, dir) = edge_node(link.addr.port(), kind, inflight, true).await;
    queue_backlog(&node, "backlog/data", messages).await;
    (node, dir)
}

/// Publishes the backlog into a Mosquitto edge whose bridge is down.
async fn mosquitto_edge(link: &Link, messages: u64) -> Mosquitto {
    let edge = Mosquitto::start(&format!(
        "max_inflight_messages 1000\n\
         connection regional\naddress 127.0.0.1:{}\nbridge_protocol_version mqttv50\n\
         cleansession false\nlocal_clientid edge-local\nremote_clientid edge-mosquitto\n\
         restart_timeout 1 1\ntopic # out 1\n",
        link.addr.port()
    ));
    let mut options = UplinkOptions::new("127.0.0.1", edge.addr().port(), "backlog");
    options.receive_maximum = u16::MAX;
    let (mut publisher, _) = Uplink::connect(&options).await.expect("publisher");
    publisher.set_window_cap(1000);
    let (mut sent, mut acked) = (0u64, 0u64);
    while acked < messages {
        while sent < messages && publisher.can_publish() {
            publisher
                .publish(Publish {
                    qos: QoS::AtLeastOnce,
                    topic: MqttString::from_static("backlog/data"),
                    payload: payload(sent),
                    ..Publish::default()
                })
                .expect("publish");
            sent += 1;
        }
        if let Ok(Event::Acked { .. }) = publisher.next_event().await {
            acked += 1;
        }
    }
    edge
}

/// Publishes a message on `live/data` every 10 ms (its send time in ns
/// since `started`) at a ferrymq edge (in-process) or a Mosquitto edge,
/// until `on` goes false.
async fn live_publisher(
    ferrymq: Option<ferrymq_broker::BrokerHandle>,
    mosquitto: Option<SocketAddr>,
    started: Instant,
    on: Arc<AtomicBool>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    if let Some(broker) = ferrymq {
        let client = broker
            .connect(ferrymq_broker::ClientOptions::new("live"))
            .await
            .expect("connect");
        while on.load(Ordering::SeqCst) {
            tick.tick().await;
            let at = started.elapsed().as_nanos() as u64;
            let _ = client
                .publish("live/data", at.to_string(), QoS::AtLeastOnce, false)
                .await;
        }
    } else if let Some(addr) = mosquitto {
        let options = UplinkOptions::new("127.0.0.1", addr.port(), "live");
        let (mut publisher, _) = Uplink::connect(&options).await.expect("live publisher");
        while on.load(Ordering::SeqCst) {
            tokio::select! {
                _ = tick.tick() => {
                    let at = started.elapsed().as_nanos() as u64;
                    let _ = publisher.publish(Publish {
                        qos: QoS::AtLeastOnce,
                        topic: MqttString::from_static("live/data"),
                        payload: Bytes::from(at.to_string()),
                        ..Publish::default()
                    });
                }
                _ = publisher.next_event() => {}
            }
        }
    }
}

/// How long ago a live message was sent: its payload is its send time in
/// ns since `started`.
fn latency(payload: &[u8], started: Instant) -> Option<Duration> {
    let at = std::str::from_utf8(payload).ok()?.parse::<u64>().ok()?;
    Some(started.elapsed().saturating_sub(Duration::from_nanos(at)))
}

/// Counts the backlog at a subscriber on the regional node once the link
/// is up.
async fn drain(way: Way, messages: u64) -> Drained {
    let regional = Regional::start();
    // The Mosquitto edge's bridge client is trusted too (its messages
    // carry no ids, so nothing is de-duplicated).
    let link = Link::start(regional.addr).await;
    let mut observer = observer(regional.addr, "observer").await;
    let (edge_node, edge_mosquitto) = match way {
        Way::Batches => (
            Some(ferrymq_edge(&link, BridgeKind::Ferrymq, messages).await),
            None,
        ),
        Way::Plain => (
            Some(ferrymq_edge(&link, BridgeKind::Mqtt, messages).await),
            None,
        ),
        Way::Mosquitto => (None, Some(mosquitto_edge(&link, messages).await)),
    };
    let regional_pid = regional.child.id().to_string();
    let (regional_cpu0, own_cpu0) = (cpu_time(&regional_pid), cpu_time("self"));
    let started = Instant::now();
    link.up.store(true, Ordering::SeqCst);
    // A live message every 10 ms at the edge during the drain, stamped.
    let live_on = Arc::new(AtomicBool::new(true));
    let live = tokio::spawn(live_publisher(
        edge_node.as_ref().map(|(node, _)| node.broker().handle()),
        edge_mosquitto.as_ref().map(Mosquitto::addr),
        started,
        live_on.clone(),
    ));
    let mut seen = HashSet::new();
    let mut duplicates = 0u64;
    let mut live_latency = Vec::new();
    while (seen.len() as u64) < messages {
        let event = tokio::time::timeout(Duration::from_secs(20), observer.next_event()).await;
        let Ok(Ok(event)) = event else {
            break;
        };
        let Event::Message(p) = event else { continue };
        if p.qos != QoS::AtMostOnce {
            observer.ack(p.packet_id).expect("ack");
        }
        if p.topic.starts_with("live/") {
            live_latency.extend(latency(&p.payload, started));
            continue;
        }
        let number = p
            .payload
            .split(|b| *b == b' ')
            .next()
            .and_then(|n| std::str::from_utf8(n).ok())
            .and_then(|n| n.parse::<u64>().ok())
            .expect("a numbered payload");
        if !seen.insert(number) {
            duplicates += 1;
        }
    }
    let elapsed = started.elapsed();
    live_on.store(false, Ordering::SeqCst);
    let _ = live.await;
    let regional_cores =
        (cpu_time(&regional_pid) - regional_cpu0).as_secs_f64() / elapsed.as_secs_f64();
    let edge_cores = (cpu_time("self") - own_cpu0).as_secs_f64() / elapsed.as_secs_f64();
    // Live messages still on their way (behind the backlog, in one FIFO),
    // and late duplicates.
    while let Ok(Ok(event)) =
        tokio::time::timeout(Duration::from_millis(1000), observer.next_event()).await
    {
        if let Event::Message(p) = event {
            observer.ack(p.packet_id).expect("ack");
            if p.topic.starts_with("live/") {
                live_latency.extend(latency(&p.payload, started));
            } else {
                duplicates += 1;
            }
        }
    }
    let bytes = link.upstream_bytes.load(Ordering::Relaxed);
    if let Some((node, _dir)) = edge_node {
        node.shutdown().await;
    }
    drop(edge_mosquitto);
    let delivered = seen.len() as u64;
    live_latency.sort();
    let pick = |q: f64| {
        live_latency
            .get(
                ((live_latency.len() as f64 * q) as usize)
                    .min(live_latency.len().saturating_sub(1)),
            )
            .copied()
            .unwrap_or_default()
    };
    Drained {
        live_p50: pick(0.5),
        live_p99: pick(0.99),
        live_count: live_latency.len(),
        regional_cores,
        edge_cores,
        rate: delivered as f64 / elapsed.as_secs_f64(),
        bytes_per_message: bytes as f64 / delivered.max(1) as f64,
        lost: messages - delivered,
        duplicates,
    }
}

fn main() {
    let Some(args) = Args::from_env() else {
        return;
    };
    let bench = args.bench();
    let messages = if bench {
        args.value("--messages")
            .map_or(1_000_000, |v| v.parse().expect("--messages N"))
    } else {
        3_000
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // `--ways batches,plain,mosquitto`: which to run (all by default).
    let ways: Vec<Way> = args.value("--ways").map_or_else(
        || vec![Way::Batches, Way::Plain, Way::Mosquitto],
        |v| {
            v.split(',')
                .map(|w| match w {
                    "batches" => Way::Batches,
                    "plain" => Way::Plain,
                    "mosquitto" => Way::Mosquitto,
                    other => panic!("--ways: unknown way {other:?}"),
                })
                .collect()
        },
    );
    let mut results = Vec::new();
    for way in ways {
        eprintln!("ferry: {} ...", way.name());
        let drained = runtime.block_on(drain(way, messages));
        results.push((way, drained));
    }
    let plain_rate = results
        .iter()
        .find(|(w, _)| *w == Way::Plain)
        .map_or(f64::NAN, |(_, d)| d.rate);
    let plain_bytes = results
        .iter()
        .find(|(w, _)| *w == Way::Plain)
        .map_or(f64::NAN, |(_, d)| d.bytes_per_message);
    println!(
        "Drain of {messages} x 64-byte QoS 1 messages into a ferrymq regional node:\n\n\
         | edge | drain msg/s | x plain | wire bytes/msg (edge -> regional) | x fewer than plain | lost | duplicated | live p50 / p99 ms (n) | regional CPU (cores) | this process CPU (cores) |\n\
         |---|---|---|---|---|---|---|---|---|---|"
    );
    for (way, d) in &results {
        println!(
            "| {} | {:.0} | {:.2} | {:.1} | {:.1} | {} | {} | {:.1} / {:.1} ({}) | {:.2} | {:.2} |",
            way.name(),
            d.rate,
            d.rate / plain_rate,
            d.bytes_per_message,
            plain_bytes / d.bytes_per_message,
            d.lost,
            d.duplicates,
            d.live_p50.as_secs_f64() * 1000.0,
            d.live_p99.as_secs_f64() * 1000.0,
            d.live_count,
            d.regional_cores,
            d.edge_cores
        );
    }
    for (way, d) in &results {
        if *way != Way::Mosquitto {
            assert_eq!(
                (d.lost, d.duplicates),
                (0, 0),
                "{}: lost or duplicated",
                way.name()
            );
        }
    }
}
