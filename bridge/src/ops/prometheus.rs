//! `/metrics`: the Prometheus text format (0.0.4), written by the
//! `prometheus-client` crate from a [`Snapshot`] taken at scrape time.

use std::fmt;

use ferrymq_broker::Stats;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet, prometheus_text};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::{Ops, Snapshot, eta_secs};

/// Labels of one series.
type Labels = Vec<(&'static str, String)>;

/// The metrics, as text.
pub(super) fn encode(ops: &Ops) -> String {
    let snapshot = ops.snapshot();
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Frozen {
        families: render(ops, &snapshot),
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

/// Every family of the scrape.
fn render(ops: &Ops, s: &Snapshot) -> Vec<Family> {
    let stats = ops.broker.stats();
    let get = |c: &std::sync::atomic::AtomicU64| Stats::get(c) as f64;
    let mut f = Vec::new();
    let one = |name, help, kind, value: f64| Family {
        name,
        help,
        kind,
        series: vec![(Vec::new(), value)],
    };
    let labelled = |name, help, kind, series: Vec<(Labels, f64)>| Family {
        name,
        help,
        kind,
        series,
    };
    use MetricType::{Counter, Gauge};

    f.push(labelled(
        "ferrymq_build_info",
        "The running version (always 1).",
        Gauge,
        vec![(vec![("version", env!("CARGO_PKG_VERSION").to_owned())], 1.0)],
    ));
    f.push(one(
        "ferrymq_uptime_seconds",
        "Seconds since the node started.",
        Gauge,
        s.uptime.as_secs_f64(),
    ));
    // Connections.
    f.push(one(
        "ferrymq_connections",
        "Connections open now (in-process clients included).",
        Gauge,
        s.connections as f64,
    ));
    f.push(one(
        "ferrymq_connections_accepted",
        "Connections accepted by the listeners.",
        Counter,
        get(&stats.connections_accepted),
    ));
    f.push(labelled(
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
    ));
    f.push(one(
        "ferrymq_protocol_errors",
        "Connections closed for a malformed packet or a protocol error.",
        Counter,
        get(&stats.protocol_errors),
    ));
    // Messages.
    let by_qos = |counts: [u64; 3]| -> Vec<(Labels, f64)> {
        counts
            .iter()
            .enumerate()
            .map(|(q, n)| (vec![("qos", q.to_string())], *n as f64))
            .collect()
    };
    f.push(labelled(
        "ferrymq_messages_received",
        "PUBLISH packets received (wills included), by QoS.",
        Counter,
        by_qos(stats.received.by_qos()),
    ));
    f.push(labelled(
        "ferrymq_messages_sent",
        "PUBLISH packets sent to clients, by delivery QoS.",
        Counter,
        by_qos(stats.sent.by_qos()),
    ));
    f.push(one(
        "ferrymq_received_bytes",
        "Payload bytes received.",
        Counter,
        stats.received.bytes() as f64,
    ));
    f.push(one(
        "ferrymq_sent_bytes",
        "Payload bytes sent to clients.",
        Counter,
        stats.sent.bytes() as f64,
    ));
    f.push(labelled(
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
    ));
    f.push(labelled(
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
    ));
    f.push(one(
        "ferrymq_queued_memory_bytes",
        "Memory held in queued messages by every queue together, as counted against storage.max_queued_memory.",
        Gauge,
        ops.broker.queued_memory() as f64,
    ));
    f.push(one(
        "ferrymq_shed_level",
        "Load shedding: 0 nothing, 1 QoS 0 publishes on topics that are not critical dropped, 2 new connections refused too.",
        Gauge,
        f64::from(ops.broker.shed_level()),
    ));
    f.push(one(
        "ferrymq_duplicates_dropped",
        "Messages from trusted bridges taken before (de-duplicated by ferry-id).",
        Counter,
        get(&stats.duplicates_dropped),
    ));
    f.push(one(
        "ferrymq_state_writes_superseded",
        "State topic writes older than the value held (dropped).",
        Counter,
        get(&stats.state_writes_superseded),
    ));
    // Sessions and queues.
    f.push(labelled(
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
    ));
    f.push(one(
        "ferrymq_sessions_expired",
        "Offline sessions ended by their expiry.",
        Counter,
        get(&stats.sessions_expired),
    ));
    f.push(one(
        "ferrymq_queued_messages",
        "Messages queued for all sessions (bridges' outboxes included).",
        Gauge,
        s.queues.messages as f64,
    ));
    f.push(one(
        "ferrymq_queued_bytes",
        "Payload bytes queued for all sessions.",
        Gauge,
        s.queues.bytes as f64,
    ));
    let top = |bytes: bool| -> Vec<(Labels, f64)> {
        s.queues
            .top
            .iter()
            .map(|q| {
                let v = if bytes {
                    q.depth.bytes
                } else {
                    q.depth.messages
                };
                (vec![("client_id", q.client_id.clone())], v as f64)
            })
            .collect()
    };
    f.push(labelled(
        "ferrymq_session_queued_messages",
        "Messages queued for each of the ten deepest session queues.",
        Gauge,
        top(false),
    ));
    f.push(labelled(
        "ferrymq_session_queued_bytes",
        "Payload bytes queued for each of the ten deepest session queues.",
        Gauge,
        top(true),
    ));
    // The store and the disk.
    f.push(one(
        "ferrymq_store_bytes",
        "Bytes of the store's files.",
        Gauge,
        s.disk.used_bytes as f64,
    ));
    f.push(one(
        "ferrymq_store_budget_bytes",
        "The store's disk budget (storage.max_disk_bytes).",
        Gauge,
        s.disk.budget_bytes as f64,
    ));
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
    // Bridges.
    let per_bridge = |value: &dyn Fn(&crate::status::BridgeStatus) -> f64| -> Vec<(Labels, f64)> {
        s.bridges
            .iter()
            .map(|b| (vec![("bridge", b.name.clone())], value(b)))
            .collect()
    };
    f.push(labelled(
        "ferrymq_bridge_connected",
        "1 while the bridge's uplink is connected.",
        Gauge,
        per_bridge(&|b| f64::from(u8::from(b.connected))),
    ));
    f.push(labelled(
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
    ));
    f.push(labelled(
        "ferrymq_bridge_backlog_messages",
        "Messages waiting to go upstream.",
        Gauge,
        per_bridge(&|b| b.backlog_messages as f64),
    ));
    f.push(labelled(
        "ferrymq_bridge_backlog_bytes",
        "Payload bytes waiting to go upstream.",
        Gauge,
        per_bridge(&|b| b.backlog_bytes as f64),
    ));
    f.push(labelled(
        "ferrymq_bridge_backlog_oldest_seconds",
        "How long the oldest waiting message has waited.",
        Gauge,
        per_bridge(&|b| b.oldest_queued.map_or(0.0, |d| d.as_secs_f64())),
    ));
    f.push(labelled(
        "ferrymq_bridge_drain_rate",
        "Messages acknowledged upstream per second, over the last ten seconds.",
        Gauge,
        per_bridge(&|b| b.drained_per_sec),
    ));
    f.push(labelled(
        "ferrymq_bridge_drain_eta_seconds",
        "Seconds to drain the backlog at the current drain rate (+Inf when it does not drain).",
        Gauge,
        per_bridge(&eta_secs),
    ));
    f.push(labelled(
        "ferrymq_bridge_forwarded",
        "Messages acknowledged upstream.",
        Counter,
        per_bridge(&|b| b.forwarded as f64),
    ));
    f.push(labelled(
        "ferrymq_bridge_received",
        "Messages received from upstream and stored here.",
        Counter,
        per_bridge(&|b| b.received as f64),
    ));
    f.push(labelled(
        "ferrymq_bridge_dead_lettered",
        "Messages the upstream refused for good (kept under $dead/).",
        Counter,
        per_bridge(&|b| b.dead_lettered as f64),
    ));
    f.push(labelled(
        "ferrymq_bridge_expired",
        "Messages whose expiry ran out while they waited to go upstream.",
        Counter,
        per_bridge(&|b| b.expired as f64),
    ));
    f.push(labelled(
        "ferrymq_bridge_aged_out",
        "Messages dropped for waiting longer than their forward rule's max_age_secs.",
        Counter,
        per_bridge(&|b| b.aged_out as f64),
    ));
    f.push(labelled(
        "ferrymq_bridge_connects",
        "Successful uplink connections (reconnects included).",
        Counter,
        per_bridge(&|b| b.connects as f64),
    ));
    // The process.
    f.push(one(
        "process_cpu_seconds",
        "User and system CPU time of the process.",
        Counter,
        s.process.cpu_seconds,
    ));
    f.push(one(
        "process_resident_memory_bytes",
        "Resident memory of the process.",
        Gauge,
        s.process.resident_bytes as f64,
    ));
    f.push(one(
        "process_open_fds",
        "Open file descriptors of the process.",
        Gauge,
        s.process.open_fds as f64,
    ));
    f.push(one(
        "process_start_time_seconds",
        "When the process started, in seconds since the Unix epoch.",
        Gauge,
        s.started_unix,
    ));
    f
}

fn reason(r: &str) -> Labels {
    vec![("reason", r.to_owned())]
}
