//! Operations with the real binary: Prometheus metrics parsed by Python's
//! `prometheus_client`, `/healthz` and `/readyz`, the status page loaded
//! in headless Chromium, `$SYS` topics read by mosquitto_sub.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A node with metrics on a free port and a bridge whose upstream is
/// down (nothing listens on its port), forwarding `sensors/#`.
fn node_with_a_dead_uplink() -> (Broker, SocketAddr) {
    let dead = free_port();
    let node = Broker::start(&format!(
        r#"
[metrics]
enabled = true
bind = "127.0.0.1:0"
sys_interval_secs = 1

[[bridge]]
name = "regional"
addresses = ["127.0.0.1:{dead}"]
reconnect_min_ms = 100
reconnect_max_ms = 500
forward = [ {{ filter = "sensors/#" }} ]
"#
    ));
    let metrics = metrics_addr(&node);
    (node, metrics)
}

/// The metrics port, as the node logged it.
fn metrics_addr(node: &Broker) -> SocketAddr {
    let needle = "metrics and status page listening on ";
    node.wait_for_log(needle, Duration::from_secs(20));
    let log = node.log();
    let rest = log.split(needle).nth(1).unwrap();
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

/// `GET path`: status code and body.
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

/// Every sample of the exposition, parsed by `prometheus_client`'s text
/// parser: `name{labels}` (labels sorted) -> value.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let script = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        print(f"{s.name}{{{labels}}}\t{s.value}")
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the parser refused:\n{text}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let (key, value) = line.split_once('\t').unwrap();
            (key.to_owned(), value.parse().unwrap())
        })
        .collect()
}

fn publish(addr: SocketAddr, count: u32) {
    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args(["-q", "1", "-t", "sensors/boiler", "-l"])
        .stdin(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            let mut stdin = child.stdin.take().unwrap();
            for n in 0..count {
                writeln!(stdin, "{n}").unwrap();
            }
            drop(stdin);
            child.wait()
        })
        .unwrap();
    assert!(status.success());
}

/// Scrapes until `check` holds (the bridge takes messages from its
/// queue asynchronously).
fn scrape_until(
    addr: SocketAddr,
    what: &str,
    check: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> BTreeMap<String, f64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = get(addr, "/metrics");
        assert_eq!(status, 200);
        let metrics = parse_metrics(&body);
        if check(&metrics) {
            return metrics;
        }
        assert!(Instant::now() < deadline, "{what}; got {metrics:#?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn metrics_parse_and_the_backlog_grows_while_the_uplink_is_down() {
    let (node, metrics) = node_with_a_dead_uplink();
    publish(node.addr, 100);
    let backlog = "ferrymq_bridge_backlog_messages{bridge=regional}";
    let first = scrape_until(metrics, "a backlog of 100", |m| {
        m.get(backlog) == Some(&100.0)
    });
    for series in [
        "ferrymq_build_info{version=0.1.0}",
        "ferrymq_uptime_seconds{}",
        "ferrymq_connections{}",
        "ferrymq_connections_accepted_total{}",
        "ferrymq_connections_refused_total{reason=max_connections}",
        "ferrymq_connections_refused_total{reason=login}",
        "ferrymq_protocol_errors_total{}",
        "ferrymq_messages_received_total{qos=0}",
        "ferrymq_messages_received_total{qos=1}",
        "ferrymq_messages_received_total{qos=2}",
        "ferrymq_messages_sent_total{qos=1}",
        "ferrymq_received_bytes_total{}",
        "ferrymq_sent_bytes_total{}",
        "ferrymq_messages_dropped_total{reason=queue_full}",
        "ferrymq_messages_dropped_total{reason=expired}",
        "ferrymq_refused_total{reason=acl}",
        "ferrymq_duplicates_dropped_total{}",
        "ferrymq_sessions{state=online}",
        "ferrymq_sessions{state=offline}",
        "ferrymq_queued_messages{}",
        "ferrymq_queued_bytes{}",
        "ferrymq_session_queued_messages{client_id=$bridge/regional}",
        "ferrymq_store_bytes{}",
        "ferrymq_store_budget_bytes{}",
        "ferrymq_filesystem_free_bytes{}",
        "ferrymq_filesystem_size_bytes{}",
        "ferrymq_disk_low{}",
        "ferrymq_outage_days_left{}",
        "ferrymq_wal_syncs_total{}",
        "ferrymq_wal_sync_duration_seconds_count{}",
        "ferrymq_wal_sync_duration_seconds_bucket{le=+Inf}",
        "ferrymq_bridge_connected{bridge=regional}",
        "ferrymq_bridge_backlog_bytes{bridge=regional}",
        "ferrymq_bridge_backlog_oldest_seconds{bridge=regional}",
        "ferrymq_bridge_drain_rate{bridge=regional}",
        "ferrymq_bridge_drain_eta_seconds{bridge=regional}",
        "ferrymq_bridge_forwarded_total{bridge=regional}",
        "ferrymq_bridge_received_total{bridge=regional}",
        "ferrymq_bridge_dead_lettered_total{bridge=regional}",
        "ferrymq_bridge_expired_total{bridge=regional}",
        "ferrymq_bridge_connects_total{bridge=regional}",
        "process_cpu_seconds_total{}",
        "process_resident_memory_bytes{}",
        "process_open_fds{}",
        "process_start_time_seconds{}",
    ] {
        assert!(
            first.contains_key(series),
            "{series} missing from {first:#?}"
        );
    }
    assert_eq!(first["ferrymq_bridge_connected{bridge=regional}"], 0.0);
    assert_eq!(first["ferrymq_messages_received_total{qos=1}"], 100.0);
    assert!(first["ferrymq_bridge_drain_eta_seconds{bridge=regional}"].is_infinite());
    assert!(first["ferrymq_wal_syncs_total{}"] > 0.0);
    assert!(first["process_resident_memory_bytes{}"] > 1e6);
    // The link stays down: the backlog grows with what is published.
    publish(node.addr, 150);
    scrape_until(metrics, "a backlog of 250", |m| {
        m.get(backlog) == Some(&250.0)
    });
}

#[test]
fn health_and_readiness() {
    let (_node, metrics) = node_with_a_dead_uplink();
    assert_eq!(get(metrics, "/healthz"), (200, "ok\n".into()));
    assert_eq!(get(metrics, "/readyz"), (200, "ready\n".into()));
    assert_eq!(get(metrics, "/nothing").0, 404);
    // Only GET and HEAD.
    let mut stream = TcpStream::connect(metrics).unwrap();
    stream.write_all(b"POST /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 405"), "{response}");
}

#[test]
fn the_status_page_shows_a_down_uplink_its_backlog_and_plots_in_chromium() {
    let (node, metrics) = node_with_a_dead_uplink();
    publish(node.addr, 42);
    scrape_until(metrics, "a backlog of 42", |m| {
        m.get("ferrymq_bridge_backlog_messages{bridge=regional}") == Some(&42.0)
    });
    let url = format!("http://{metrics}/");
    let chromium = |extra: &[&str]| {
        Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--window-size=1280,1000",
                // Lets the page's script run its fetch and draw.
                "--virtual-time-budget=4000",
            ])
            .args(extra)
            .arg(&url)
            .output()
            .unwrap()
    };
    let dom = chromium(&["--dump-dom"]);
    assert!(
        dom.status.success(),
        "{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let dom = String::from_utf8(dom.stdout).unwrap();
    assert!(
        dom.contains(r#"data-loaded="1""#),
        "the script did not run:\n{dom}"
    );
    let card = dom
        .split(r#"id="bridge-regional""#)
        .nth(1)
        .unwrap_or_else(|| panic!("no card for the bridge:\n{dom}"));
    assert!(card.contains(">regional<"), "{card}");
    assert!(
        card.contains(r#"class="state down">disconnected<"#),
        "{card}"
    );
    assert!(card.contains(">42 messages, "), "{card}");
    assert!(
        card.contains("Connection refused"),
        "the last error: {card}"
    );
    // The backlog plot drew its points.
    let points: u32 = card
        .split(r#"class="backlog-plot""#)
        .nth(1)
        .and_then(|rest| rest.split("data-points=\"").nth(1))
        .and_then(|rest| rest.split('"').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no drawn backlog plot: {card}"));
    assert!(points >= 2, "{points} points");
    // A screenshot, kept as an artifact of the test run.
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    let out = chromium(&[&format!("--screenshot={}", shot.display())]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 10_000, "screenshot of {size} bytes");
    eprintln!("status page screenshot: {}", shot.display());
}

#[test]
fn sys_topics_reach_mosquitto_sub() {
    let (node, _metrics) = node_with_a_dead_uplink();
    let read = |topic: &str| {
        let out = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &node.addr.port().to_string()])
            .args(["-t", topic, "-C", "1", "-W", "10"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{topic}");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    assert_eq!(read("$SYS/broker/version"), "ferrymq 0.1.0");
    assert!(read("$SYS/broker/uptime").ends_with(" seconds"));
    assert_eq!(read("$SYS/ferrymq/bridge/regional/connected"), "0");
    publish(node.addr, 7);
    let deadline = Instant::now() + Duration::from_secs(20);
    while read("$SYS/ferrymq/bridge/regional/backlog/messages") != "7" {
        assert!(Instant::now() < deadline, "the backlog never reached $SYS");
        std::thread::sleep(Duration::from_millis(300));
    }
    // `#` does not match $SYS topics (MQTT 4.7.2).
    let out = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &node.addr.port().to_string()])
        .args(["-t", "#", "-C", "1", "-W", "2"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).is_empty());
}

#[test]
fn a_low_disk_is_reported_in_the_log_the_metrics_and_sys() {
    // 99 %: whatever this machine's disk holds, it is "low".
    let node = Broker::start(
        "[storage]\nlow_disk_percent = 99\n\
         [metrics]\nenabled = true\nbind = \"127.0.0.1:0\"\nsys_interval_secs = 1\n",
    );
    let metrics = metrics_addr(&node);
    node.wait_for_log("low disk", Duration::from_secs(10));
    scrape_until(metrics, "ferrymq_disk_low 1", |m| {
        m.get("ferrymq_disk_low{}") == Some(&1.0)
    });
    // Published every second; the first round may predate the check.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &node.addr.port().to_string()])
            .args(["-t", "$SYS/ferrymq/disk/low", "-C", "1", "-W", "10"])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).trim() == "1" {
            break;
        }
        assert!(Instant::now() < deadline, "$SYS/ferrymq/disk/low stayed 0");
        std::thread::sleep(Duration::from_millis(300));
    }
}
