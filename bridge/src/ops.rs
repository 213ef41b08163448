//! What a running node tells about itself (`[metrics]`): Prometheus
//! metrics, `/healthz` and `/readyz`, a status page with the last hour's
//! plots, and the `$SYS/...` topics. Everything here reads what the broker
//! and the bridges count anyway, at scrape or publish time: nothing is
//! added to the message path.

mod http;
mod page;
mod prometheus;
mod sys;

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferrymq_broker::shed::ProcessUsage;
use ferrymq_broker::{BrokerHandle, SessionQueues};
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::link::BridgeMonitor;
use crate::status::BridgeStatus;

/// How often the history behind the status page's plots is sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// The plots' span: one hour of samples.
const SAMPLES: usize = 361;
/// Sessions whose queues are listed by name (the deepest), to bound the
/// metrics' cardinality.
const TOP_QUEUES: usize = 10;

/// The node as the operations endpoints see it.
pub(crate) struct Ops {
    broker: BrokerHandle,
    bridges: Vec<BridgeMonitor>,
    /// When the node started (wall clock, and monotonic).
    started_wall: SystemTime,
    started: Instant,
    history: Mutex<VecDeque<Sample>>,
}

impl std::fmt::Debug for Ops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ops").finish_non_exhaustive()
    }
}

/// One point of the history.
#[derive(Debug, Clone)]
struct Sample {
    /// Seconds since the node started.
    at: f64,
    received: u64,
    received_bytes: u64,
    sent: u64,
    /// Per bridge, in config order: backlog messages, forwarded so far.
    bridges: Vec<(u64, u64)>,
}

/// A snapshot of everything reported, taken at once.
pub(crate) struct Snapshot {
    pub(crate) uptime: Duration,
    pub(crate) started_unix: f64,
    pub(crate) connections: u64,
    /// Of them, dormant (idle, without a task of their own).
    pub(crate) dormant: u64,
    pub(crate) queues: SessionQueues,
    pub(crate) disk: ferrymq_broker::DiskUse,
    pub(crate) bridges: Vec<BridgeStatus>,
    /// Messages and payload bytes received per second, over the last
    /// minutes of history.
    pub(crate) in_rate: f64,
    pub(crate) in_bytes_rate: f64,
    pub(crate) out_rate: f64,
    pub(crate) process: ProcessUsage,
    /// Free space below `[storage] low_disk_percent`.
    pub(crate) disk_low: bool,
    /// Messages dropped so far: queue full, too large, expired, shed.
    pub(crate) dropped: u64,
}

impl Snapshot {
    /// Bytes the store may still grow by: the budget left, and no more
    /// than the filesystem's free space.
    pub(crate) fn room_bytes(&self) -> u64 {
        let budget_left = self.disk.budget_bytes.saturating_sub(self.disk.used_bytes);
        match self.disk.filesystem {
            Some((free, _)) => budget_left.min(free),
            None => budget_left,
        }
    }

    /// How many days of outage the room left holds at the current inbound
    /// rate (payload bytes; infinite when nothing comes in).
    pub(crate) fn outage_days_left(&self) -> f64 {
        if self.in_bytes_rate <= 0.0 {
            return f64::INFINITY;
        }
        self.room_bytes() as f64 / (self.in_bytes_rate * 86_400.0)
    }
}

impl Ops {
    fn new(broker: BrokerHandle, bridges: Vec<BridgeMonitor>) -> Ops {
        let ops = Ops {
            broker,
            bridges,
            started_wall: SystemTime::now(),
            started: Instant::now(),
            history: Mutex::new(VecDeque::with_capacity(SAMPLES)),
        };
        let first = ops.sample();
        ops.history.lock().push_back(first);
        ops
    }

    fn sample(&self) -> Sample {
        let stats = self.broker.stats();
        Sample {
            at: self.started.elapsed().as_secs_f64(),
            received: stats.received.messages(),
            received_bytes: stats.received.bytes(),
            sent: stats.sent.messages(),
            bridges: self
                .bridges
                .iter()
                .map(|b| {
                    let s = b.status();
                    (s.backlog_messages, s.forwarded)
                })
                .collect(),
        }
    }

    fn record_sample(&self) {
        let sample = self.sample();
        let mut history = self.history.lock();
        if history.len() >= SAMPLES {
            history.pop_front();
        }
        history.push_back(sample);
    }

    /// The history with a point for now at its end.
    fn history_now(&self) -> Vec<Sample> {
        let mut points: Vec<Sample> = self.history.lock().iter().cloned().collect();
        points.push(self.sample());
        points
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        let points = self.history_now();
        // Rates over up to the last five minutes of history.
        let now = points.last().cloned();
        let then = now.as_ref().and_then(|n| {
            points
                .iter()
                .find(|p| n.at - p.at <= 300.0 && n.at - p.at > 0.5)
                .cloned()
        });
        let rate = |f: fn(&Sample) -> u64| match (&then, &now) {
            (Some(a), Some(b)) => f(b).saturating_sub(f(a)) as f64 / (b.at - a.at),
            _ => 0.0,
        };
        Snapshot {
            uptime: self.started.elapsed(),
            started_unix: self
                .started_wall
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            connections: self.broker.open_connections(),
            dormant: self.broker.dormant_connections(),
            queues: self.broker.session_queues(TOP_QUEUES),
            disk: self.broker.store().disk(),
            bridges: self.bridges.iter().map(BridgeMonitor::status).collect(),
            in_rate: rate(|s| s.received),
            in_bytes_rate: rate(|s| s.received_bytes),
            out_rate: rate(|s| s.sent),
            process: ProcessUsage::with_open_fds(),
            disk_low: self.broker.disk_low(),
            dropped: {
                let stats = self.broker.stats();
                [
                    &stats.messages_dropped_queue_full,
                    &stats.messages_dropped_memory,
                    &stats.messages_dropped_too_large,
                    &stats.messages_expired,
                    &stats.publishes_shed,
                ]
                .into_iter()
                .map(ferrymq_broker::Stats::get)
                .sum()
            },
        }
    }

    /// `/readyz`: the store takes writes (listeners are bound before the
    /// node starts at all).
    fn ready(&self) -> bool {
        self.broker.store().healthy()
    }

    /// The status page's data: the snapshot and the last hour's history.
    fn status_json(&self) -> String {
        let s = self.snapshot();
        let points = self.history_now();
        let mut out = String::with_capacity(4096);
        let _ = write!(
            out,
            "{{\"uptime_secs\":{},\"connections\":{},\"in_rate\":{},\"out_rate\":{},\
             \"queued_messages\":{},\"queued_bytes\":{},\"sessions\":{},\
             \"store_bytes\":{},\"budget_bytes\":{},\"fs_free_bytes\":{},\"fs_total_bytes\":{},\
             \"disk_low\":{},\"outage_days_left\":{},\"dropped\":{},\"shed_level\":{},\
             \"bridges\":[",
            s.uptime.as_secs(),
            s.connections,
            num(s.in_rate),
            num(s.out_rate),
            s.queues.messages,
            s.queues.bytes,
            s.queues.sessions,
            s.disk.used_bytes,
            s.disk.budget_bytes,
            s.disk.filesystem.map_or(0, |(free, _)| free),
            s.disk.filesystem.map_or(0, |(_, total)| total),
            s.disk_low,
            num(s.outage_days_left()),
            s.dropped,
            self.broker.shed_level(),
        );
        for (i, b) in s.bridges.iter().enumerate() {
            let eta = eta_secs(b);
            let _ = write!(
                out,
                "{}{{\"name\":{},\"connected\":{},\"address\":{},\"last_error\":{},\
                 \"backlog_messages\":{},\"backlog_bytes\":{},\"oldest_secs\":{},\
                 \"drain_rate\":{},\"eta_secs\":{},\"forwarded\":{},\"dead_lettered\":{},\
                 \"backlog\":[",
                if i == 0 { "" } else { "," },
                string(&b.name),
                b.connected,
                b.address.as_deref().map_or("null".into(), string),
                b.last_error.as_deref().map_or("null".into(), string),
                b.backlog_messages,
                b.backlog_bytes,
                b.oldest_queued
                    .map_or("null".into(), |d| num(d.as_secs_f64())),
                num(b.drained_per_sec),
                num(eta),
                b.forwarded,
                b.dead_lettered,
            );
            let series: Vec<String> = points
                .iter()
                .map(|p| {
                    let backlog = p.bridges.get(i).map_or(0, |b| b.0);
                    format!("[{},{backlog}]", num(p.at))
                })
                .collect();
            out.push_str(&series.join(","));
            out.push_str("],\"drained\":[");
            let drained: Vec<String> = points
                .windows(2)
                .map(|w| {
                    let (a, b) = (&w[0], &w[1]);
                    let forwarded = |p: &Sample| p.bridges.get(i).map_or(0, |b| b.1);
                    let rate =
                        forwarded(b).saturating_sub(forwarded(a)) as f64 / (b.at - a.at).max(0.001);
                    format!("[{},{}]", num(b.at), num(rate))
                })
                .collect();
            out.push_str(&drained.join(","));
            out.push_str("]}");
        }
        out.push_str("],\"throughput\":[");
        let throughput: Vec<String> = points
            .windows(2)
            .map(|w| {
                let (a, b) = (&w[0], &w[1]);
                let dt = (b.at - a.at).max(0.001);
                format!(
                    "[{},{},{}]",
                    num(b.at),
                    num(b.received.saturating_sub(a.received) as f64 / dt),
                    num(b.sent.saturating_sub(a.sent) as f64 / dt)
                )
            })
            .collect();
        out.push_str(&throughput.join(","));
        out.push_str("]}");
        out
    }
}

impl http::Routes for Ops {
    fn get(&self, path: &str) -> http::Response {
        match path {
            "/metrics" => http::Response::new(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                prometheus::encode(self),
            ),
            "/healthz" => http::Response::text(200, "ok\n"),
            "/readyz" if self.ready() => http::Response::text(200, "ready\n"),
            "/readyz" => http::Response::text(503, "the store does not take writes\n"),
            "/" | "/index.html" => http::Response::new(200, "text/html; charset=utf-8", page::HTML),
            "/status.json" => http::Response::new(200, "application/json", self.status_json()),
            _ => http::Response::text(404, "not found\n"),
        }
    }
}

/// Seconds to drain a bridge's backlog at its current rate (infinite when
/// it does not drain; 0 when empty).
pub(crate) fn eta_secs(b: &BridgeStatus) -> f64 {
    if b.backlog_messages == 0 {
        0.0
    } else if b.drained_per_sec > 0.0 {
        b.backlog_messages as f64 / b.drained_per_sec
    } else {
        f64::INFINITY
    }
}

/// A JSON number (`null` for what JSON cannot write).
fn num(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3}")
    } else {
        "null".into()
    }
}

/// A JSON string.
fn string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '<' || c == '>' || c == '&' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The operations tasks of a node: the HTTP port (with `[metrics]
/// enabled`), the history sampler, the `$SYS` publisher.
pub(crate) struct Running {
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Waits for the tasks (stopped through their watch).
    pub(crate) async fn join(self) {
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Starts what `[metrics]` asks for.
pub(crate) async fn start(
    broker: BrokerHandle,
    bridges: Vec<BridgeMonitor>,
    stop: watch::Receiver<bool>,
) -> Result<Running, (SocketAddr, std::io::Error)> {
    let config = broker.config().metrics.clone();
    let ops = Arc::new(Ops::new(broker, bridges));
    let mut tasks = Vec::new();
    if config.enabled {
        let listener = tokio::net::TcpListener::bind(config.bind)
            .await
            .map_err(|e| (config.bind, e))?;
        let local = listener.local_addr().unwrap_or(config.bind);
        tracing::info!("metrics and status page listening on {local}");
        tasks.push(tokio::spawn(http::serve(
            listener,
            ops.clone(),
            stop.clone(),
        )));
        let sampler = ops.clone();
        let mut stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            tick.tick().await;
            loop {
                // Cancel-safe: nothing is in progress between ticks.
                tokio::select! {
                    _ = tick.tick() => sampler.record_sample(),
                    () = crate::link::stopped(&mut stop) => break,
                }
            }
        }));
    }
    if !config.sys_interval.is_zero() {
        tasks.push(tokio::spawn(sys::publish(ops, config.sys_interval, stop)));
    }
    Ok(Running { tasks })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_and_numbers() {
        assert_eq!(string("a\"b\\c\n<"), "\"a\\\"b\\\\c\\u000a\\u003c\"");
        assert_eq!(num(1.5), "1.500");
        assert_eq!(num(f64::INFINITY), "null");
    }

    #[test]
    fn drain_time_of_a_backlog() {
        let status = |backlog, rate| BridgeStatus {
            backlog_messages: backlog,
            drained_per_sec: rate,
            ..BridgeStatus::default()
        };
        assert_eq!(eta_secs(&status(0, 0.0)), 0.0);
        assert_eq!(eta_secs(&status(100, 10.0)), 10.0);
        assert_eq!(eta_secs(&status(100, 0.0)), f64::INFINITY);
    }
}
