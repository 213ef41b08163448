//! The `$SYS/...` topics: retained QoS 0 messages published every
//! `[metrics] sys_interval_secs` through an in-process client. The
//! broker-wide ones carry Mosquitto's names where Mosquitto has them
//! (`$SYS/broker/...`); ferrymq's own are under `$SYS/ferrymq/...`.
//! Subscribers see them as the ACL allows, like any topic.

use std::sync::Arc;
use std::time::Duration;

use ferrymq_broker::{ClientOptions, QoS, Stats};
use tokio::sync::watch;
use tracing::debug;

use super::{Ops, Snapshot};

/// The in-process client's id (`$bridge/` ids are the node's own; no
/// bridge name holds a `$`).
const CLIENT_ID: &str = "$bridge/$sys";

/// The topics and values of one round.
pub(super) fn topics(ops: &Ops, s: &Snapshot) -> Vec<(String, String)> {
    let stats = ops.broker.stats();
    let mut out: Vec<(String, String)> = vec![
        (
            "$SYS/broker/version".into(),
            format!("ferrymq {}", env!("CARGO_PKG_VERSION")),
        ),
        (
            "$SYS/broker/uptime".into(),
            format!("{} seconds", s.uptime.as_secs()),
        ),
        (
            "$SYS/broker/clients/connected".into(),
            s.connections.to_string(),
        ),
        (
            "$SYS/broker/clients/total".into(),
            s.queues.sessions.to_string(),
        ),
        (
            "$SYS/broker/clients/disconnected".into(),
            s.queues
                .sessions
                .saturating_sub(s.queues.online)
                .to_string(),
        ),
        (
            "$SYS/broker/messages/received".into(),
            stats.received.messages().to_string(),
        ),
        (
            "$SYS/broker/messages/sent".into(),
            stats.sent.messages().to_string(),
        ),
        (
            "$SYS/broker/bytes/received".into(),
            stats.received.bytes().to_string(),
        ),
        (
            "$SYS/broker/bytes/sent".into(),
            stats.sent.bytes().to_string(),
        ),
        (
            "$SYS/broker/load/messages/received/1min".into(),
            format!("{:.2}", s.in_rate * 60.0),
        ),
        (
            "$SYS/broker/load/messages/sent/1min".into(),
            format!("{:.2}", s.out_rate * 60.0),
        ),
        (
            "$SYS/broker/store/messages/count".into(),
            s.queues.messages.to_string(),
        ),
        (
            "$SYS/broker/store/messages/bytes".into(),
            s.queues.bytes.to_string(),
        ),
        (
            "$SYS/ferrymq/messages/dropped".into(),
            s.dropped.to_string(),
        ),
        (
            "$SYS/ferrymq/shed/level".into(),
            ops.broker.shed_level().to_string(),
        ),
        (
            "$SYS/ferrymq/shed/publishes".into(),
            Stats::get(&stats.publishes_shed).to_string(),
        ),
        (
            "$SYS/ferrymq/shed/connections".into(),
            Stats::get(&stats.connections_shed).to_string(),
        ),
        (
            "$SYS/ferrymq/store/bytes".into(),
            s.disk.used_bytes.to_string(),
        ),
        (
            "$SYS/ferrymq/disk/low".into(),
            u8::from(s.disk_low).to_string(),
        ),
        (
            "$SYS/ferrymq/disk/outage_days_left".into(),
            format!("{:.2}", s.outage_days_left()),
        ),
    ];
    if let Some((free, _)) = s.disk.filesystem {
        out.push(("$SYS/ferrymq/disk/free_bytes".into(), free.to_string()));
    }
    for b in &s.bridges {
        let topic = |leaf: &str| format!("$SYS/ferrymq/bridge/{}/{leaf}", b.name);
        out.extend([
            (topic("connected"), u8::from(b.connected).to_string()),
            (topic("backlog/messages"), b.backlog_messages.to_string()),
            (topic("backlog/bytes"), b.backlog_bytes.to_string()),
            (
                topic("backlog/oldest_seconds"),
                b.oldest_queued.map_or(0, |d| d.as_secs()).to_string(),
            ),
            (topic("drain_rate"), format!("{:.2}", b.drained_per_sec)),
            (topic("forwarded"), b.forwarded.to_string()),
            (topic("dead_lettered"), b.dead_lettered.to_string()),
            (topic("aged_out"), b.aged_out.to_string()),
        ]);
    }
    out
}

/// Publishes the topics every `every` until `stop`.
pub(super) async fn publish(ops: Arc<Ops>, every: Duration, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut client = None;
    loop {
        // Cancel-safe: nothing is in progress between ticks.
        tokio::select! {
            _ = tick.tick() => {}
            () = crate::link::stopped(&mut stop) => break,
        }
        if client.is_none() {
            match ops.broker.connect(ClientOptions::new(CLIENT_ID)).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    debug!("$SYS publisher cannot connect: {e}");
                    continue;
                }
            }
        }
        let Some(c) = &client else { continue };
        let snapshot = ops.snapshot();
        for (topic, value) in topics(&ops, &snapshot) {
            if let Err(e) = c.publish(&topic, value, QoS::AtMostOnce, true).await {
                debug!("$SYS publisher: {e}");
                client = None;
                break;
            }
        }
    }
    if let Some(c) = client {
        c.disconnect().await;
    }
}
