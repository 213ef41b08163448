//! Store-and-forward with the real binary: an edge ferrymq bridged through
//! a test link (pass / cut / blackhole) to a real Mosquitto upstream,
//! SIGKILLed while the link is down. Every message the edge acknowledged
//! must reach the upstream, in order per publisher, with duplicates only
//! from a reconnect and at most the in-flight window each.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "../bridge/tests/common/mosquitto.rs"]
#[allow(dead_code)]
mod mosquitto;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::link::{Link, Mode};
use common::*;
use ferrymq_broker::MessageId;
use ferrymq_codec::{
    Packet, Protocol, PubAck, Publish, QoS, Subscribe, Subscription, SubscriptionOptions,
};
use mosquitto::Mosquitto;

const INFLIGHT: usize = 50;

fn edge_config(link_port: u16) -> String {
    format!(
        r#"
[[bridge]]
name = "regional"
addresses = ["127.0.0.1:{link_port}"]
client_id = "edge-1"
inflight = {INFLIGHT}
keepalive_secs = 2
connect_timeout_secs = 2
reconnect_min_ms = 50
reconnect_max_ms = 500
drain_rate = 2000
ramp_secs = 0

[[bridge.forward]]
filter = "data/#"
remote_prefix = "site/"
"#
    )
}

/// What the upstream observer saw: (number, ferry-id) in arrival order.
type Seen = Arc<Mutex<Vec<(u32, MessageId)>>>;

/// An MQTT 5 subscriber on the upstream, in a thread, acknowledging all.
fn observe(
    upstream: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
) -> (Seen, std::thread::JoinHandle<()>) {
    let seen: Seen = Arc::default();
    let mut raw = Raw::connect(upstream, Protocol::V5, "observer");
    raw.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        subscriptions: vec![Subscription {
            filter: s("site/#"),
            options: SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                ..Default::default()
            },
        }],
        properties: Default::default(),
    }));
    assert!(matches!(raw.recv(), Some(Packet::SubAck(_))));
    let thread = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if let Some(Packet::Publish(p)) = raw.recv_or_silence(Duration::from_millis(200)) {
                    raw.send(&Packet::PubAck(PubAck::new(p.packet_id)));
                    let n: u32 = std::str::from_utf8(&p.payload).unwrap().parse().unwrap();
                    let id: MessageId = p
                        .properties
                        .user_properties
                        .iter()
                        .find(|(k, _)| k.as_str() == "ferry-id")
                        .map(|(_, v)| v.as_str().parse().unwrap())
                        .expect("every forwarded message carries a ferry-id");
                    seen.lock().unwrap().push((n, id));
                }
            }
        })
    };
    (seen, thread)
}

fn distinct(seen: &Seen) -> usize {
    seen.lock()
        .unwrap()
        .iter()
        .map(|(n, _)| *n)
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

fn wait_for(seen: &Seen, count: usize, what: &str, data: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while distinct(seen) < count {
        if Instant::now() > deadline {
            let got: std::collections::BTreeSet<u32> =
                seen.lock().unwrap().iter().map(|(n, _)| *n).collect();
            let missing: Vec<u32> = (0..count as u32)
                .filter(|n| !got.contains(n))
                .take(20)
                .collect();
            let status =
                std::fs::read_to_string(data.join("bridge-status.txt")).unwrap_or_default();
            panic!(
                "{what}: {} of {count} arrived upstream; missing e.g. {missing:?}\n{status}",
                got.len()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The outage scenario, with `trouble` (cut or blackhole) mid-drain.
fn outage(trouble: Mode) {
    const N: u32 = 1600;
    let upstream = Mosquitto::start("");
    let stop = Arc::new(AtomicBool::new(false));
    let (seen, observer) = observe(upstream.addr(), stop.clone());
    let link = Link::new(upstream.addr(), Mode::Down);
    let data = tempfile::tempdir().unwrap();
    let config = edge_config(link.port());
    let edge = Broker::start_at(data.path(), &config);
    publish_numbers(edge.addr, 0..N / 2);
    // Killed with its whole backlog on disk, restarted.
    if std::env::var_os("FERRYMQ_TEST_LOG").is_some() {
        eprintln!("--- first edge ---\n{}", edge.log());
    }
    edge.kill();
    let edge = Broker::start_at(data.path(), &config);
    publish_numbers(edge.addr, N / 2..N);
    assert_eq!(distinct(&seen), 0, "nothing crossed a link that is down");

    link.set(Mode::Pass);
    wait_for(
        &seen,
        N as usize / 3,
        "first part of the drain",
        data.path(),
    );
    link.set(trouble);
    std::thread::sleep(Duration::from_millis(if trouble == Mode::Blackhole {
        4500
    } else {
        300
    }));
    link.set(Mode::Pass);
    wait_for(&seen, N as usize, "the whole backlog", data.path());
    // Let late duplicates arrive, then stop observing.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    observer.join().unwrap();

    let seen = seen.lock().unwrap().clone();
    // One id per message, whatever the resends.
    let mut ids: BTreeMap<u32, MessageId> = BTreeMap::new();
    for (n, id) in &seen {
        assert_eq!(
            *ids.entry(*n).or_insert(*id),
            *id,
            "message {n} came with two ids"
        );
    }
    assert_eq!(ids.len(), N as usize, "every acknowledged message arrived");
    // Order per publisher: first arrivals in publish order.
    let mut first = Vec::new();
    let mut met = std::collections::BTreeSet::new();
    for (n, _) in &seen {
        if met.insert(*n) {
            first.push(*n);
        }
    }
    assert!(
        first.windows(2).all(|w| w[0] < w[1]),
        "order broken: {:?}",
        first.windows(2).find(|w| w[0] > w[1])
    );
    // Duplicates: only from reconnects, at most the window each.
    let duplicates = seen.len() - N as usize;
    let connects = upstream.log().matches("as edge-1").count();
    assert!(
        connects >= 2,
        "the link came back at least once: {connects}"
    );
    assert!(
        duplicates <= INFLIGHT * (connects - 1),
        "{duplicates} duplicates for {connects} connections of window {INFLIGHT}"
    );
    eprintln!(
        "{trouble:?}: {N} delivered, {duplicates} duplicates, {connects} upstream connections"
    );
    drop(edge);
}

#[test]
fn an_outage_with_a_crash_and_a_cut_link_loses_nothing() {
    outage(Mode::Down);
}

#[test]
fn an_outage_with_a_crash_and_a_blackholed_link_loses_nothing() {
    outage(Mode::Blackhole);
}

/// Runs `ferrymq ARGS --config CONFIG` until it succeeds with `want` in
/// its output (20 s at most); returns that output.
fn cli_until(args: &[&str], config: &std::path::Path, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = std::process::Command::new(binary())
            .args(args)
            .arg("--config")
            .arg(config)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() && text.contains(want) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn bridge_status_shows_the_backlog_and_why_the_link_is_down() {
    let dead = mosquitto::free_port();
    let data = tempfile::tempdir().unwrap();
    let edge = Broker::start_at(data.path(), &edge_config(dead));
    publish_numbers(edge.addr, 0..25);
    // A copy: the broker's own file goes with it.
    let config = data.path().join("edge.toml");
    std::fs::copy(edge.dir.path().join("ferrymq.toml"), &config).unwrap();
    let text = cli_until(&["bridge", "status"], &config, "backlog: 25 messages");
    assert!(text.contains("bridge regional: disconnected"), "{text}");
    assert!(text.contains("last error:"), "{text}");
    // Stopped: no live status, and it says where to look instead.
    drop(edge);
    let out = std::process::Command::new(binary())
        .args(["bridge", "status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("is not running") && stderr.contains("queue stats"),
        "{stderr}"
    );
}

#[test]
fn queue_replay_dead_refuses_an_unknown_bridge_and_leaves_a_request_for_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("edge.toml");
    let text = edge_config(mosquitto::free_port()).replace(
        "[[bridge]]",
        &format!("data_dir = {:?}\n\n[[bridge]]", data.display().to_string()),
    );
    std::fs::write(&config, text).unwrap();
    let run = |name: &str| {
        std::process::Command::new(binary())
            .args(["queue", "replay-dead", name, "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    let out = run("nowhere");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no bridge named \"nowhere\""), "{stderr}");
    let out = run("regional");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("when it starts"), "{stdout}");
    assert!(data.join("replay-dead-letters.regional").exists());
}

#[test]
fn queue_dead_lists_what_the_upstream_could_never_take() {
    // Mosquitto announces a Maximum Packet Size of 300 bytes.
    let upstream = Mosquitto::start("max_packet_size 300\n");
    let data = tempfile::tempdir().unwrap();
    let edge = Broker::start_at(data.path(), &edge_config(upstream.port()));
    let mut raw = Raw::connect(edge.addr, Protocol::V311, "sensor");
    for (id, topic, size) in [(1, "data/big", 1000), (2, "data/small", 10)] {
        raw.send(&Packet::Publish(Publish {
            qos: QoS::AtLeastOnce,
            packet_id: id,
            topic: s(topic),
            payload: Bytes::from(vec![b'x'; size]),
            ..Publish::default()
        }));
        assert_eq!(raw.recv(), Some(Packet::PubAck(PubAck::new(id))));
    }
    let config = data.path().join("edge.toml");
    std::fs::copy(edge.dir.path().join("ferrymq.toml"), &config).unwrap();
    let dead = |name: &str| {
        std::process::Command::new(binary())
            .args(["queue", "dead", name, "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    let text = cli_until(&["queue", "dead", "regional"], &config, "1 messages queued");
    let line = text
        .lines()
        .find(|l| l.contains("$dead/regional/data/big"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.contains("1000 B") && line.contains("xxxx..."),
        "{line}"
    );
    assert!(!text.contains("data/small"), "{text}");
    let out = dead("elsewhere");
    assert!(!out.status.success());
}

#[test]
fn messages_older_than_max_age_are_dropped_and_counted_across_a_restart() {
    let upstream = Mosquitto::start("");
    let stop = Arc::new(AtomicBool::new(false));
    let (seen, observer) = observe(upstream.addr(), stop.clone());
    let link = Link::new(upstream.addr(), Mode::Down);
    let data = tempfile::tempdir().unwrap();
    let config = edge_config(link.port()).replace(
        "remote_prefix = \"site/\"",
        "remote_prefix = \"site/\"\nmax_age_secs = 4",
    );
    let edge = Broker::start_at(data.path(), &config);
    publish_numbers(edge.addr, 0..10);
    // The first ten grow old while the link is down...
    std::thread::sleep(Duration::from_secs(5));
    publish_numbers(edge.addr, 10..20);
    // ... across a SIGKILL and a restart (broker time goes on).
    edge.kill();
    let edge = Broker::start_at(data.path(), &config);
    link.set(Mode::Pass);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status_file = data.path().join("bridge-status.txt");
    loop {
        let status = std::fs::read_to_string(&status_file).unwrap_or_default();
        if distinct(&seen) >= 10 && status.contains("aged out 10,") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} arrived; status:\n{status}",
            distinct(&seen)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    observer.join().unwrap();
    let numbers: std::collections::BTreeSet<u32> =
        seen.lock().unwrap().iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, (10..20).collect(), "only the young ones went up");
    drop(edge);
}
