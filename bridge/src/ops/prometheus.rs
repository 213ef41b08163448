//! `/metrics`: the Prometheus text format (0.0.4), written by the
//! `prometheus-client` crate from a [`Snapshot`] taken at scrape time.

use std::fmt;
use std::sync::atomic::AtomicU64;

use ferrymq_broker::{QueueDepth, Stats};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet, prometheus_text};
use prometheus_client::metrics::MetricType::{self, Counter, Gauge};
use prometheus_client::registry::Registry;

use super::{Ops, Snapshot, eta_secs};
use crate::status::BridgeStatus;

/// Labels of one series.
type Labels = Vec<(&'static str, String)>;

/// The metrics, as text.
pub(super) fn encode(ops: &Ops) -> String {
    exposition(ops, &ops.snapshot())
}

/// The metrics of `snapshot` and of the broker's counters now, as text.
fn exposition(ops: &Ops, snapshot: &Snapshot) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Frozen {
        families: render(ops, snapshot),
        sync_buckets: snapshot.disk.sync_micros_log2.clone(),
    }));
    let mut out = String::with_capacity(8 << 10);
    // Writing into a String cannot fail.
    let _ = prometheus_text::encode(&mut out, &registry);
    out
}

/// The WAL sync time histogram's name and help.
const WAL_SYNC_SECONDS: (&str, &str) = (
    "ferrymq_wal_sync_duration_seconds",
    "How long write-ahead log syncs (group commits) took; buckets are powers of two of \
     microseconds, the sum is estimated from them.",
);

/// What one scrape writes, prepared before encoding.
struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    series: Vec<(Labels, f64)>,
}

impl fmt::Debug for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// The families of one scrape, as a collector.
#[derive(Debug)]
struct Frozen {
    families: Vec<Family>,
    /// WAL syncs by duration, entry `i` below 2^i µs.
    sync_buckets: Vec<u64>,
}

// The registry wants a 'static collector; one scrape's values are moved
// into it, so it holds no reference to the node.
impl Collector for Frozen {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        if !self.sync_buckets.is_empty() {
            let (name, help) = WAL_SYNC_SECONDS;
            let buckets: Vec<(f64, u64)> = self
                .sync_buckets
                .iter()
                .enumerate()
                .map(|(i, n)| ((1u64 << i) as f64 / 1e6, *n))
                .collect();
            let count = buckets.iter().map(|(_, n)| n).sum();
            // Each sync counted at three quarters of its bucket's bound.
            let sum = buckets.iter().map(|(le, n)| le * 0.75 * *n as f64).sum();
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            metric.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        for family in &self.families {
            let mut metric =
                encoder.encode_descriptor(family.name, family.help, None, family.kind)?;
            for (labels, value) in &family.series {
                if labels.is_empty() {
                    write_value(&mut metric, family.kind, *value)?;
                } else {
                    let mut series = metric.encode_family(labels)?;
                    write_value(&mut series, family.kind, *value)?;
                }
            }
        }
        Ok(())
    }
}

fn write_value(
    metric: &mut prometheus_client::encoding::MetricEncoder,
    kind: MetricType,
    value: f64,
) -> Result<(), fmt::Error> {
    match kind {
        MetricType::Counter => metric.encode_counter::<NoLabelSet, f64, f64>(&value, None),
        _ => metric.encode_gauge(&value),
    }
}

/// Every family of the scrape, in the order they are written.
fn render(ops: &Ops, s: &Snapshot) -> Vec<Family> {
    let stats = ops.broker.stats();
    let mut f = node(s);
    f.extend(connections(stats, s));
    f.extend(traffic(stats));
    f.extend(dropped_and_refused(ops, stats));
    f.extend(sessions(stats, s));
    f.extend(store(ops, s));
    f.extend(bridges(s));
    f.extend(process(s));
    f
}

/// A family of one series without labels.
fn one(name: &'static str, help: &'static str, kind: MetricType, value: f64) -> Family {
    Family {
        name,
        help,
        kind,
        series: vec![(Vec::new(), value)],
    }
}

/// A family of labelled series.
fn labelled(
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    series: Vec<(Labels, f64)>,
) -> Family {
    Family {
        name,
        help,
        kind,
        series,
    }
}

/// A broker counter's value now.
fn get(counter: &AtomicU64) -> f64 {
    Stats::get(counter) as f64
}

/// The version that runs and how long the node has run.
fn node(s: &Snapshot) -> Vec<Family> {
    vec![
        labelled(
            "ferrymq_build_info",
            "The running version (always 1).",
            Gauge,
            vec![(vec![("version", env!("CARGO_PKG_VERSION").to_owned())], 1.0)],
        ),
        one(
            "ferrymq_uptime_seconds",
            "Seconds since the node started.",
            Gauge,
            s.uptime.as_secs_f64(),
        ),
    ]
}

/// Connections open, accepted, refused and closed for a protocol error.
fn connections(stats: &Stats, s: &Snapshot) -> Vec<Family> {
    vec![
        one(
            "ferrymq_connections",
            "Connections open now (in-process clients included).",
            Gauge,
            s.connections as f64,
        ),
        one(
            "ferrymq_connections_dormant",
            "Of the open connections, those idle without a task of their own (plain TCP only).",
            Gauge,
            s.dormant as f64,
        ),
        one(
            "ferrymq_connections_accepted",
            "Connections accepted by the listeners.",
            Counter,
            get(&stats.connections_accepted),
        ),
        labelled(
            "ferrymq_connections_refused",
            "Connections refused or failed before the session began, by reason.",
            Counter,
            vec![
                (reason("max_connections"), get(&stats.connections_refused)),
                (reason("login"), get(&stats.auth_failures)),
                (reason("tls_handshake"), get(&stats.tls_handshakes_failed)),
                (
                    reason("websocket_upgrade"),
                    get(&stats.websocket_upgrades_failed),
                ),
            ],
        ),
        one(
            "ferrymq_protocol_errors",
            "Connections closed for a malformed packet or a protocol error.",
            Counter,
            get(&stats.protocol_errors),
        ),
    ]
}

/// Messages received and sent, by QoS, and their payload bytes.
fn traffic(stats: &Stats) -> Vec<Family> {
    vec![
        labelled(
            "ferrymq_messages_received",
            "PUBLISH packets received (wills included), by QoS.",
            Counter,
            by_qos(stats.received.by_qos()),
        ),
        labelled(
            "ferrymq_messages_sent",
            "PUBLISH packets sent to clients, by delivery QoS.",
            Counter,
            by_qos(stats.sent.by_qos()),
        ),
        one(
            "ferrymq_received_bytes",
            "Payload bytes received.",
            Counter,
            stats.received.bytes() as f64,
        ),
        one(
            "ferrymq_sent_bytes",
            "Payload bytes sent to clients.",
            Counter,
            stats.sent.bytes() as f64,
        ),
    ]
}

/// One series per QoS (0, 1, 2) of `counts`.
fn by_qos(counts: [u64; 3]) -> Vec<(Labels, f64)> {
    counts
        .iter()
        .enumerate()
        .map(|(q, n)| (vec![("qos", q.to_string())], *n as f64))
        .collect()
}

/// Deliveries dropped and publishes or subscriptions refused, by reason,
/// with what drives them (queued memory, load shedding), and messages
/// dropped as duplicates or as superseded state writes.
fn dropped_and_refused(ops: &Ops, stats: &Stats) -> Vec<Family> {
    vec![
        labelled(
            "ferrymq_messages_dropped",
            "Deliveries dropped, by reason.",
            Counter,
            vec![
                (
                    reason("queue_full"),
                    get(&stats.messages_dropped_queue_full),
                ),
                (reason("memory"), get(&stats.messages_dropped_memory)),
                (reason("too_large"), get(&stats.messages_dropped_too_large)),
                (reason("expired"), get(&stats.messages_expired)),
                (reason("aged_out"), get(&stats.messages_aged_out)),
                (reason("shed"), get(&stats.publishes_shed)),
            ],
        ),
        labelled(
            "ferrymq_refused",
            "Publishes and subscriptions refused or slowed, by reason.",
            Counter,
            vec![
                (reason("queue_full_or_store"), get(&stats.publishes_refused)),
                (reason("acl"), get(&stats.acl_denied)),
                (reason("publish_rate"), get(&stats.publishes_throttled)),
                (
                    reason("max_subscriptions"),
                    get(&stats.subscriptions_refused),
                ),
                (reason("topic_levels"), get(&stats.topic_levels_refused)),
                (reason("max_retained"), get(&stats.retained_refused)),
            ],
        ),
        one(
            "ferrymq_queued_memory_bytes",
            "Memory held in queued messages by every queue together, as counted against storage.max_queued_memory.",
            Gauge,
            ops.broker.queued_memory() as f64,
        ),
        one(
            "ferrymq_shed_level",
            "Load shedding: 0 nothing, 1 QoS 0 publishes on topics that are not critical dropped, 2 new connections refused too.",
            Gauge,
            f64::from(ops.broker.shed_level()),
        ),
        one(
            "ferrymq_duplicates_dropped",
            "Messages from trusted bridges taken before (de-duplicated by ferry-id).",
            Counter,
            get(&stats.duplicates_dropped),
        ),
        one(
            "ferrymq_state_writes_superseded",
            "State topic writes older than the value held (dropped).",
            Counter,
            get(&stats.state_writes_superseded),
        ),
    ]
}

/// Sessions online and offline, their expiries, and what their queues
/// hold: in all, and for each of the deepest.
fn sessions(stats: &Stats, s: &Snapshot) -> Vec<Family> {
    vec![
        labelled(
            "ferrymq_sessions",
            "Sessions, by whether a connection holds them.",
            Gauge,
            vec![
                (vec![("state", "online".into())], s.queues.online as f64),
                (
                    vec![("state", "offline".into())],
                    s.queues.sessions.saturating_sub(s.queues.online) as f64,
                ),
            ],
        ),
        one(
            "ferrymq_sessions_expired",
            "Offline sessions ended by their expiry.",
            Counter,
            get(&stats.sessions_expired),
        ),
        one(
            "ferrymq_queued_messages",
            "Messages queued for all sessions (bridges' outboxes included).",
            Gauge,
            s.queues.messages as f64,
        ),
        one(
            "ferrymq_queued_bytes",
            "Payload bytes queued for all sessions.",
            Gauge,
            s.queues.bytes as f64,
        ),
        labelled(
            "ferrymq_session_queued_messages",
            "Messages queued for each of the ten deepest session queues.",
            Gauge,
            top_queues(s, |depth| depth.messages),
        ),
        labelled(
            "ferrymq_session_queued_bytes",
            "Payload bytes queued for each of the ten deepest session queues.",
            Gauge,
            top_queues(s, |depth| depth.bytes),
        ),
    ]
}

/// One series per queue of the deepest, labelled with its client id.
fn top_queues(s: &Snapshot, value: fn(&QueueDepth) -> u64) -> Vec<(Labels, f64)> {
    s.queues
        .top
        .iter()
        .map(|q| {
            (
                vec![("client_id", q.client_id.clone())],
                value(&q.depth) as f64,
            )
        })
        .collect()
}

/// The store's size and budget, the filesystem under it, the outage it
/// can hold, and its write-ahead log syncs.
fn store(ops: &Ops, s: &Snapshot) -> Vec<Family> {
    let mut f = vec![
        one(
            "ferrymq_store_bytes",
            "Bytes of the store's files.",
            Gauge,
            s.disk.used_bytes as f64,
        ),
        one(
            "ferrymq_store_budget_bytes",
            "The store's disk budget (storage.max_disk_bytes).",
            Gauge,
            s.disk.budget_bytes as f64,
        ),
    ];
    if let Some((free, total)) = s.disk.filesystem {
        f.push(one(
            "ferrymq_filesystem_free_bytes",
            "Free bytes of the filesystem holding the store.",
            Gauge,
            free as f64,
        ));
        f.push(one(
            "ferrymq_filesystem_size_bytes",
            "Size of the filesystem holding the store.",
            Gauge,
            total as f64,
        ));
    }
    f.push(one(
        "ferrymq_disk_low",
        "1 while the filesystem holding the store has less than 10 % free.",
        Gauge,
        f64::from(u8::from(s.disk_low)),
    ));
    f.push(one(
        "ferrymq_outage_days_left",
        "Days of uplink outage the disk room left holds at the current inbound rate (+Inf when nothing comes in).",
        Gauge,
        s.outage_days_left(),
    ));
    f.push(one(
        "ferrymq_wal_syncs",
        "Write-ahead log syncs.",
        Counter,
        ops.broker.store().wal_syncs() as f64,
    ));
    f
}

/// A family with one series per bridge, labelled with its name.
struct PerBridge {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    /// A bridge's value, from its status.
    value: fn(&BridgeStatus) -> f64,
}

/// `ferrymq_bridge_connected`, written before the bridges' addresses.
const BRIDGE_CONNECTED: PerBridge = PerBridge {
    name: "ferrymq_bridge_connected",
    help: "1 while the bridge's uplink is connected.",
    kind: Gauge,
    value: |b| f64::from(u8::from(b.connected)),
};

/// The other families with one series per bridge, in the order they are
/// written after the bridges' addresses.
const PER_BRIDGE: [PerBridge; 11] = [
    PerBridge {
        name: "ferrymq_bridge_backlog_messages",
        help: "Messages waiting to go upstream.",
        kind: Gauge,
        value: |b| b.backlog_messages as f64,
    },
    PerBridge {
        name: "ferrymq_bridge_backlog_bytes",
        help: "Payload bytes waiting to go upstream.",
        kind: Gauge,
        value: |b| b.backlog_bytes as f64,
    },
    PerBridge {
        name: "ferrymq_bridge_backlog_oldest_seconds",
        help: "How long the oldest waiting message has waited.",
        kind: Gauge,
        value: |b| b.oldest_queued.map_or(0.0, |d| d.as_secs_f64()),
    },
    PerBridge {
        name: "ferrymq_bridge_drain_rate",
        help: "Messages acknowledged upstream per second, over the last ten seconds.",
        kind: Gauge,
        value: |b| b.drained_per_sec,
    },
    PerBridge {
        name: "ferrymq_bridge_drain_eta_seconds",
        help: "Seconds to drain the backlog at the current drain rate (+Inf when it does not drain).",
        kind: Gauge,
        value: eta_secs,
    },
    PerBridge {
        name: "ferrymq_bridge_forwarded",
        help: "Messages acknowledged upstream.",
        kind: Counter,
        value: |b| b.forwarded as f64,
    },
    PerBridge {
        name: "ferrymq_bridge_received",
        help: "Messages received from upstream and stored here.",
        kind: Counter,
        value: |b| b.received as f64,
    },
    PerBridge {
        name: "ferrymq_bridge_dead_lettered",
        help: "Messages the upstream refused for good (kept under $dead/).",
        kind: Counter,
        value: |b| b.dead_lettered as f64,
    },
    PerBridge {
        name: "ferrymq_bridge_expired",
        help: "Messages whose expiry ran out while they waited to go upstream.",
        kind: Counter,
        value: |b| b.expired as f64,
    },
    PerBridge {
        name: "ferrymq_bridge_aged_out",
        help: "Messages dropped for waiting longer than their forward rule's max_age_secs.",
        kind: Counter,
        value: |b| b.aged_out as f64,
    },
    PerBridge {
        name: "ferrymq_bridge_connects",
        help: "Successful uplink connections (reconnects included).",
        kind: Counter,
        value: |b| b.connects as f64,
    },
];

/// Each bridge's link, backlog and counts: `BRIDGE_CONNECTED`, the
/// address, then `PER_BRIDGE`.
fn bridges(s: &Snapshot) -> Vec<Family> {
    let per_bridge = |family: &PerBridge| {
        labelled(
            family.name,
            family.help,
            family.kind,
            s.bridges
                .iter()
                .map(|b| (vec![("bridge", b.name.clone())], (family.value)(b)))
                .collect(),
        )
    };
    let address = labelled(
        "ferrymq_bridge_address",
        "The upstream address in use or last tried (always 1).",
        Gauge,
        s.bridges
            .iter()
            .map(|b| {
                (
                    vec![
                        ("bridge", b.name.clone()),
                        ("address", b.address.clone().unwrap_or_default()),
                    ],
                    1.0,
                )
            })
            .collect(),
    );
    let mut f = vec![per_bridge(&BRIDGE_CONNECTED), address];
    f.extend(PER_BRIDGE.iter().map(per_bridge));
    f
}

/// The process's CPU time, memory, open files and start time.
fn process(s: &Snapshot) -> Vec<Family> {
    vec![
        one(
            "process_cpu_seconds",
            "User and system CPU time of the process.",
            Counter,
            s.process.cpu_seconds,
        ),
        one(
            "process_resident_memory_bytes",
            "Resident memory of the process.",
            Gauge,
            s.process.resident_bytes as f64,
        ),
        one(
            "process_open_fds",
            "Open file descriptors of the process.",
            Gauge,
            s.process.open_fds as f64,
        ),
        one(
            "process_start_time_seconds",
            "When the process started, in seconds since the Unix epoch.",
            Gauge,
            s.started_unix,
        ),
    ]
}

/// The label of a series counted by reason.
fn reason(r: &str) -> Labels {
    vec![("reason", r.to_owned())]
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use ferrymq_broker::shed::ProcessUsage;
    use ferrymq_broker::{
        Broker, ClientOptions, DiskUse, MemoryStore, QoS, QueueDepth, SessionQueue, SessionQueues,
    };
    use ferrymq_config::Config;

    use super::*;
    use crate::status::BridgeStatus;

    /// A snapshot with a distinct value in every field the metrics read.
    fn snapshot() -> Snapshot {
        let queue = |client_id: &str, messages, bytes| SessionQueue {
            client_id: client_id.to_owned(),
            depth: QueueDepth {
                messages,
                bytes,
                oldest_queued_ms: None,
            },
            online: false,
        };
        Snapshot {
            uptime: Duration::from_millis(12_500),
            started_unix: 1_700_000_000.0,
            connections: 3,
            dormant: 2,
            queues: SessionQueues {
                sessions: 7,
                online: 2,
                messages: 40,
                bytes: 4_000,
                top: vec![queue("deep", 30, 3_000), queue("shallow", 10, 1_000)],
            },
            disk: DiskUse {
                used_bytes: 200_000,
                budget_bytes: 1_064_000,
                filesystem: Some((900_000, 2_000_000)),
                sync_micros_log2: vec![0, 3, 5, 1],
            },
            bridges: vec![
                BridgeStatus {
                    name: "up".into(),
                    connected: true,
                    address: Some("10.0.0.1:8883".into()),
                    backlog_messages: 100,
                    backlog_bytes: 10_000,
                    oldest_queued: Some(Duration::from_millis(1_500)),
                    drained_per_sec: 4.0,
                    forwarded: 11,
                    received: 12,
                    dead_lettered: 13,
                    expired: 14,
                    aged_out: 15,
                    connects: 16,
                    ..BridgeStatus::default()
                },
                BridgeStatus {
                    name: "down".into(),
                    backlog_messages: 7,
                    backlog_bytes: 70,
                    ..BridgeStatus::default()
                },
            ],
            in_rate: 1.0,
            in_bytes_rate: 5.0,
            out_rate: 2.0,
            process: ProcessUsage {
                cpu_seconds: 1.25,
                resident_bytes: 4_096,
                open_fds: 9,
            },
            disk_low: true,
            dropped: 0,
        }
    }

    /// Sets every counter the metrics read to a value of its own.
    fn count_distinctly(stats: &ferrymq_broker::Stats) {
        let counters: [&AtomicU64; 20] = [
            &stats.connections_accepted,
            &stats.connections_refused,
            &stats.auth_failures,
            &stats.tls_handshakes_failed,
            &stats.websocket_upgrades_failed,
            &stats.protocol_errors,
            &stats.messages_dropped_queue_full,
            &stats.messages_dropped_memory,
            &stats.messages_dropped_too_large,
            &stats.messages_expired,
            &stats.messages_aged_out,
            &stats.publishes_shed,
            &stats.publishes_refused,
            &stats.acl_denied,
            &stats.publishes_throttled,
            &stats.subscriptions_refused,
            &stats.topic_levels_refused,
            &stats.retained_refused,
            &stats.duplicates_dropped,
            &stats.state_writes_superseded,
        ];
        for (n, counter) in (101..).zip(counters) {
            counter.store(n, Ordering::Relaxed);
        }
        stats.sessions_expired.store(121, Ordering::Relaxed);
    }

    /// Waits (up to 10 s) until `done` holds.
    async fn until(done: impl Fn() -> bool) {
        for _ in 0..1_000 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("not reached in 10 s");
    }

    /// The whole exposition of a fixed snapshot, byte for byte: the
    /// families, their order, help, type, labels and values.
    #[tokio::test]
    async fn the_exposition_of_a_fixed_snapshot() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config {
            data_dir: dir.path().join("data"),
            ..Config::default()
        };
        config.listeners[0].bind = "127.0.0.1:0".parse().expect("address");
        // No load shedding, whatever the machine's load.
        config.limits.shed_cpu_percent = 0;
        let broker = Broker::start_with_store(config, MemoryStore::new())
            .await
            .expect("broker");
        // Received by QoS: 5, 2, 3; sent by QoS: 1, 2, 3.
        let mut subscriber = broker
            .connect(ClientOptions::new("subscriber"))
            .await
            .expect("subscriber");
        subscriber
            .subscribe("s/#", QoS::ExactlyOnce)
            .await
            .expect("subscribe");
        let publisher = broker
            .connect(ClientOptions::new("publisher"))
            .await
            .expect("publisher");
        for (qos, times) in [
            (QoS::AtMostOnce, 1),
            (QoS::AtLeastOnce, 2),
            (QoS::ExactlyOnce, 3),
        ] {
            for _ in 0..times {
                publisher
                    .publish("s/x", "four", qos, false)
                    .await
                    .expect("publish");
            }
        }
        for _ in 0..4 {
            publisher
                .publish("n", "nobody", QoS::AtMostOnce, false)
                .await
                .expect("publish");
        }
        for _ in 0..6 {
            subscriber.recv().await.expect("delivery");
        }
        let stats = broker.stats();
        until(|| stats.received.messages() == 10 && stats.sent.messages() == 6).await;
        subscriber.disconnect().await;
        publisher.disconnect().await;
        let ops = Ops::new(broker.handle(), Vec::new());
        until(|| ops.broker.queued_memory() == 0).await;
        count_distinctly(stats);

        let text = exposition(&ops, &snapshot());
        let expected = EXPECTED.replace("{version}", env!("CARGO_PKG_VERSION"));
        if text != expected {
            println!("{text}");
        }
        assert!(text == expected, "the exposition changed (printed above)");
        broker.shutdown().await;
    }

    /// What [`snapshot`] and the counters above come to.
    const EXPECTED: &str = r#"# HELP ferrymq_wal_sync_duration_seconds How long write-ahead log syncs (group commits) took; buckets are powers of two of microseconds, the sum is estimated from them.
# TYPE ferrymq_wal_sync_duration_seconds histogram
ferrymq_wal_sync_duration_seconds_bucket{le="1e-06"} 0
ferrymq_wal_sync_duration_seconds_bucket{le="2e-06"} 3
ferrymq_wal_sync_duration_seconds_bucket{le="4e-06"} 8
ferrymq_wal_sync_duration_seconds_bucket{le="8e-06"} 9
ferrymq_wal_sync_duration_seconds_bucket{le="+Inf"} 9
ferrymq_wal_sync_duration_seconds_sum 0.0000255
ferrymq_wal_sync_duration_seconds_count 9
# HELP ferrymq_build_info The running version (always 1).
# TYPE ferrymq_build_info gauge
ferrymq_build_info{version="{version}"} 1.0
# HELP ferrymq_uptime_seconds Seconds since the node started.
# TYPE ferrymq_uptime_seconds gauge
ferrymq_uptime_seconds 12.5
# HELP ferrymq_connections Connections open now (in-process clients included).
# TYPE ferrymq_connections gauge
ferrymq_connections 3.0
# HELP ferrymq_connections_dormant Of the open connections, those idle without a task of their own (plain TCP only).
# TYPE ferrymq_connections_dormant gauge
ferrymq_connections_dormant 2.0
# HELP ferrymq_connections_accepted_total Connections accepted by the listeners.
# TYPE ferrymq_connections_accepted_total counter
ferrymq_connections_accepted_total 101.0
# HELP ferrymq_connections_refused_total Connections refused or failed before the session began, by reason.
# TYPE ferrymq_connections_refused_total counter
ferrymq_connections_refused_total{reason="max_connections"} 102.0
ferrymq_connections_refused_total{reason="login"} 103.0
ferrymq_connections_refused_total{reason="tls_handshake"} 104.0
ferrymq_connections_refused_total{reason="websocket_upgrade"} 105.0
# HELP ferrymq_protocol_errors_total Connections closed for a malformed packet or a protocol error.
# TYPE ferrymq_protocol_errors_total counter
ferrymq_protocol_errors_total 106.0
# HELP ferrymq_messages_received_total PUBLISH packets received (wills included), by QoS.
# TYPE ferrymq_messages_received_total counter
ferrymq_messages_received_total{qos="0"} 5.0
ferrymq_messages_received_total{qos="1"} 2.0
ferrymq_messages_received_total{qos="2"} 3.0
# HELP ferrymq_messages_sent_total PUBLISH packets sent to clients, by delivery QoS.
# TYPE ferrymq_messages_sent_total counter
ferrymq_messages_sent_total{qos="0"} 1.0
ferrymq_messages_sent_total{qos="1"} 2.0
ferrymq_messages_sent_total{qos="2"} 3.0
# HELP ferrymq_received_bytes_total Payload bytes received.
# TYPE ferrymq_received_bytes_total counter
ferrymq_received_bytes_total 48.0
# HELP ferrymq_sent_bytes_total Payload bytes sent to clients.
# TYPE ferrymq_sent_bytes_total counter
ferrymq_sent_bytes_total 24.0
# HELP ferrymq_messages_dropped_total Deliveries dropped, by reason.
# TYPE ferrymq_messages_dropped_total counter
ferrymq_messages_dropped_total{reason="queue_full"} 107.0
ferrymq_messages_dropped_total{reason="memory"} 108.0
ferrymq_messages_dropped_total{reason="too_large"} 109.0
ferrymq_messages_dropped_total{reason="expired"} 110.0
ferrymq_messages_dropped_total{reason="aged_out"} 111.0
ferrymq_messages_dropped_total{reason="shed"} 112.0
# HELP ferrymq_refused_total Publishes and subscriptions refused or slowed, by reason.
# TYPE ferrymq_refused_total counter
ferrymq_refused_total{reason="queue_full_or_store"} 113.0
ferrymq_refused_total{reason="acl"} 114.0
ferrymq_refused_total{reason="publish_rate"} 115.0
ferrymq_refused_total{reason="max_subscriptions"} 116.0
ferrymq_refused_total{reason="topic_levels"} 117.0
ferrymq_refused_total{reason="max_retained"} 118.0
# HELP ferrymq_queued_memory_bytes Memory held in queued messages by every queue together, as counted against storage.max_queued_memory.
# TYPE ferrymq_queued_memory_bytes gauge
ferrymq_queued_memory_bytes 0.0
# HELP ferrymq_shed_level Load shedding: 0 nothing, 1 QoS 0 publishes on topics that are not critical dropped, 2 new connections refused too.
# TYPE ferrymq_shed_level gauge
ferrymq_shed_level 0.0
# HELP ferrymq_duplicates_dropped_total Messages from trusted bridges taken before (de-duplicated by ferry-id).
# TYPE ferrymq_duplicates_dropped_total counter
ferrymq_duplicates_dropped_total 119.0
# HELP ferrymq_state_writes_superseded_total State topic writes older than the value held (dropped).
# TYPE ferrymq_state_writes_superseded_total counter
ferrymq_state_writes_superseded_total 120.0
# HELP ferrymq_sessions Sessions, by whether a connection holds them.
# TYPE ferrymq_sessions gauge
ferrymq_sessions{state="online"} 2.0
ferrymq_sessions{state="offline"} 5.0
# HELP ferrymq_sessions_expired_total Offline sessions ended by their expiry.
# TYPE ferrymq_sessions_expired_total counter
ferrymq_sessions_expired_total 121.0
# HELP ferrymq_queued_messages Messages queued for all sessions (bridges' outboxes included).
# TYPE ferrymq_queued_messages gauge
ferrymq_queued_messages 40.0
# HELP ferrymq_queued_bytes Payload bytes queued for all sessions.
# TYPE ferrymq_queued_bytes gauge
ferrymq_queued_bytes 4000.0
# HELP ferrymq_session_queued_messages Messages queued for each of the ten deepest session queues.
# TYPE ferrymq_session_queued_messages gauge
ferrymq_session_queued_messages{client_id="deep"} 30.0
ferrymq_session_queued_messages{client_id="shallow"} 10.0
# HELP ferrymq_session_queued_bytes Payload bytes queued for each of the ten deepest session queues.
# TYPE ferrymq_session_queued_bytes gauge
ferrymq_session_queued_bytes{client_id="deep"} 3000.0
ferrymq_session_queued_bytes{client_id="shallow"} 1000.0
# HELP ferrymq_store_bytes Bytes of the store's files.
# TYPE ferrymq_store_bytes gauge
ferrymq_store_bytes 200000.0
# HELP ferrymq_store_budget_bytes The store's disk budget (storage.max_disk_bytes).
# TYPE ferrymq_store_budget_bytes gauge
ferrymq_store_budget_bytes 1064000.0
# HELP ferrymq_filesystem_free_bytes Free bytes of the filesystem holding the store.
# TYPE ferrymq_filesystem_free_bytes gauge
ferrymq_filesystem_free_bytes 900000.0
# HELP ferrymq_filesystem_size_bytes Size of the filesystem holding the store.
# TYPE ferrymq_filesystem_size_bytes gauge
ferrymq_filesystem_size_bytes 2000000.0
# HELP ferrymq_disk_low 1 while the filesystem holding the store has less than 10 % free.
# TYPE ferrymq_disk_low gauge
ferrymq_disk_low 1.0
# HELP ferrymq_outage_days_left Days of uplink outage the disk room left holds at the current inbound rate (+Inf when nothing comes in).
# TYPE ferrymq_outage_days_left gauge
ferrymq_outage_days_left 2.0
# HELP ferrymq_wal_syncs_total Write-ahead log syncs.
# TYPE ferrymq_wal_syncs_total counter
ferrymq_wal_syncs_total 0.0
# HELP ferrymq_bridge_connected 1 while the bridge's uplink is connected.
# TYPE ferrymq_bridge_connected gauge
ferrymq_bridge_connected{bridge="up"} 1.0
ferrymq_bridge_connected{bridge="down"} 0.0
# HELP ferrymq_bridge_address The upstream address in use or last tried (always 1).
# TYPE ferrymq_bridge_address gauge
ferrymq_bridge_address{bridge="up",address="10.0.0.1:8883"} 1.0
ferrymq_bridge_address{bridge="down",address=""} 1.0
# HELP ferrymq_bridge_backlog_messages Messages waiting to go upstream.
# TYPE ferrymq_bridge_backlog_messages gauge
ferrymq_bridge_backlog_messages{bridge="up"} 100.0
ferrymq_bridge_backlog_messages{bridge="down"} 7.0
# HELP ferrymq_bridge_backlog_bytes Payload bytes waiting to go upstream.
# TYPE ferrymq_bridge_backlog_bytes gauge
ferrymq_bridge_backlog_bytes{bridge="up"} 10000.0
ferrymq_bridge_backlog_bytes{bridge="down"} 70.0
# HELP ferrymq_bridge_backlog_oldest_seconds How long the oldest waiting message has waited.
# TYPE ferrymq_bridge_backlog_oldest_seconds gauge
ferrymq_bridge_backlog_oldest_seconds{bridge="up"} 1.5
ferrymq_bridge_backlog_oldest_seconds{bridge="down"} 0.0
# HELP ferrymq_bridge_drain_rate Messages acknowledged upstream per second, over the last ten seconds.
# TYPE ferrymq_bridge_drain_rate gauge
ferrymq_bridge_drain_rate{bridge="up"} 4.0
ferrymq_bridge_drain_rate{bridge="down"} 0.0
# HELP ferrymq_bridge_drain_eta_seconds Seconds to drain the backlog at the current drain rate (+Inf when it does not drain).
# TYPE ferrymq_bridge_drain_eta_seconds gauge
ferrymq_bridge_drain_eta_seconds{bridge="up"} 25.0
ferrymq_bridge_drain_eta_seconds{bridge="down"} +Inf
# HELP ferrymq_bridge_forwarded_total Messages acknowledged upstream.
# TYPE ferrymq_bridge_forwarded_total counter
ferrymq_bridge_forwarded_total{bridge="up"} 11.0
ferrymq_bridge_forwarded_total{bridge="down"} 0.0
# HELP ferrymq_bridge_received_total Messages received from upstream and stored here.
# TYPE ferrymq_bridge_received_total counter
ferrymq_bridge_received_total{bridge="up"} 12.0
ferrymq_bridge_received_total{bridge="down"} 0.0
# HELP ferrymq_bridge_dead_lettered_total Messages the upstream refused for good (kept under $dead/).
# TYPE ferrymq_bridge_dead_lettered_total counter
ferrymq_bridge_dead_lettered_total{bridge="up"} 13.0
ferrymq_bridge_dead_lettered_total{bridge="down"} 0.0
# HELP ferrymq_bridge_expired_total Messages whose expiry ran out while they waited to go upstream.
# TYPE ferrymq_bridge_expired_total counter
ferrymq_bridge_expired_total{bridge="up"} 14.0
ferrymq_bridge_expired_total{bridge="down"} 0.0
# HELP ferrymq_bridge_aged_out_total Messages dropped for waiting longer than their forward rule's max_age_secs.
# TYPE ferrymq_bridge_aged_out_total counter
ferrymq_bridge_aged_out_total{bridge="up"} 15.0
ferrymq_bridge_aged_out_total{bridge="down"} 0.0
# HELP ferrymq_bridge_connects_total Successful uplink connections (reconnects included).
# TYPE ferrymq_bridge_connects_total counter
ferrymq_bridge_connects_total{bridge="up"} 16.0
ferrymq_bridge_connects_total{bridge="down"} 0.0
# HELP process_cpu_seconds_total User and system CPU time of the process.
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 1.25
# HELP process_resident_memory_bytes Resident memory of the process.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 4096.0
# HELP process_open_fds Open file descriptors of the process.
# TYPE process_open_fds gauge
process_open_fds 9.0
# HELP process_start_time_seconds When the process started, in seconds since the Unix epoch.
# TYPE process_start_time_seconds gauge
process_start_time_seconds 1700000000.0
"#;
}
