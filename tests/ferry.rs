//! Between ferrymq nodes (`[ferry]`, `kind = "ferrymq"`) with the real
//! binary: a message with a `ferry-id` from a trusted bridge takes effect
//! once at the receiving node, across resends, link cuts and SIGKILLs of
//! either node, over plain MQTT 5 and in ferry batches, at every hop of
//! edge -> regional -> central; ids from other clients are removed and
//! never honoured; a ferry bridge to another broker falls back to plain
//! MQTT 5 and says so; a fleet of 500 bridges comes back spread out after
//! the regional node restarts, and drains; batches cross a link with
//! latency, loss and reordering (`tc netem` on a veth pair into a network
//! namespace the test creates; skipped, saying why, on a kernel without
//! netem).

#![allow(clippy::unwrap_used)]

mod common;
#[path = "../bridge/tests/common/mosquitto.rs"]
#[allow(dead_code)]
mod mosquitto;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::link::{Link, Mode};
use common::*;
use ferrymq_codec::{Packet, Protocol, PubAck, Publish, PublishProperties, QoS, ReasonCode};

const TRUSTED: &str = "[ferry]\ntrusted_clients = [\"edge-*\"]\n";

/// A ferrymq node on a fixed loopback port (so a restart keeps it) with
/// its data in `data`.
fn node(data: &std::path::Path, port: u16, extra: &str) -> Broker {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "data_dir = {:?}\n[[listener]]\nbind = \"127.0.0.1:{port}\"\n{extra}\n",
        data.display().to_string()
    );
    Broker::start_with_config(&config, dir)
}

fn with_id(topic: &str, packet_id: u16, payload: &str, id: Option<&str>) -> Packet {
    Packet::Publish(Publish {
        qos: QoS::AtLeastOnce,
        packet_id,
        topic: s(topic),
        payload: Bytes::from(payload.to_owned()),
        properties: PublishProperties {
            user_properties: id
                .map(|id| vec![(s("ferry-id"), s(id))])
                .unwrap_or_default(),
            ..PublishProperties::default()
        },
        ..Publish::default()
    })
}

/// Publishes and returns the PUBACK's reason code.
fn acked(raw: &mut Raw, packet: &Packet) -> ReasonCode {
    raw.send(packet);
    match raw.recv() {
        Some(Packet::PubAck(ack)) => ack.reason_code,
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

fn subscriber(addr: SocketAddr, id: &str, filter: &str) -> Raw {
    let mut raw = Raw::connect(addr, Protocol::V5, id);
    raw.send(&subscribe_qos1(filter));
    assert!(matches!(raw.recv(), Some(Packet::SubAck(_))));
    raw
}

/// The payloads and ferry-ids delivered to `raw` until it is quiet.
fn delivered(raw: &mut Raw) -> Vec<(String, Option<String>)> {
    let mut got = Vec::new();
    while let Some(packet) = raw.recv_or_silence(Duration::from_millis(400)) {
        if let Packet::Publish(p) = packet {
            raw.send(&Packet::PubAck(PubAck::new(p.packet_id)));
            let id = ferry_id(&p);
            got.push((String::from_utf8(p.payload.to_vec()).unwrap(), id));
        }
    }
    got
}

#[test]
fn a_trusted_bridge_resend_is_taken_once_even_after_the_receiver_is_killed() {
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let regional = node(data.path(), port, TRUSTED);
    let mut sub = subscriber(regional.addr, "observer", "site/#");
    let first = "000102030405060708090a0b0c0d0e0f:4:2:1";

    let mut edge = Raw::connect(regional.addr, Protocol::V5, "edge-1");
    assert_eq!(
        acked(&mut edge, &with_id("site/a", 1, "one", Some(first))),
        ReasonCode::SUCCESS
    );
    // Resent on the same connection and on a new one (as after a cut):
    // acknowledged, not delivered again.
    assert_eq!(
        acked(&mut edge, &with_id("site/a", 2, "one", Some(first))),
        ReasonCode::SUCCESS
    );
    drop(edge);
    let mut edge = Raw::connect(regional.addr, Protocol::V5, "edge-1");
    assert_eq!(
        acked(&mut edge, &with_id("site/a", 1, "one", Some(first))),
        ReasonCode::SUCCESS
    );
    assert_eq!(delivered(&mut sub), [("one".into(), Some(first.into()))]);

    // An untrusted client's id is not honoured, and not passed on.
    let mut sensor = Raw::connect(regional.addr, Protocol::V5, "sensor-1");
    for packet_id in [1, 2] {
        acked(
            &mut sensor,
            &with_id("site/b", packet_id, "forged", Some(first)),
        );
    }
    assert_eq!(
        delivered(&mut sub),
        [("forged".into(), None), ("forged".into(), None)]
    );

    // What was taken survives a SIGKILL of the receiver.
    drop(sub);
    regional.kill();
    let regional = node(data.path(), port, TRUSTED);
    let mut sub = subscriber(regional.addr, "observer-2", "site/#");
    let mut edge = Raw::connect(regional.addr, Protocol::V5, "edge-1");
    let second = "000102030405060708090a0b0c0d0e0f:4:2:2";
    acked(&mut edge, &with_id("site/a", 1, "one", Some(first)));
    acked(&mut edge, &with_id("site/a", 2, "two", Some(second)));
    acked(&mut edge, &with_id("site/a", 3, "two", Some(second)));
    assert_eq!(delivered(&mut sub), [("two".into(), Some(second.into()))]);
    assert!(regional.log().contains("listening on"));
}

/// What an observer saw, in arrival order: `Some((n, ferry-id))` a
/// message, `None` a new connection of the observer.
type Seen = Arc<Mutex<Vec<Option<(u32, String)>>>>;

/// A persistent MQTT 5 subscriber on the regional node that reconnects
/// (the node is killed and restarted) until `stop`.
fn observe(
    addr: SocketAddr,
    filter: &'static str,
    stop: Arc<AtomicBool>,
) -> (Seen, std::thread::JoinHandle<()>) {
    let seen: Seen = Arc::default();
    let thread = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let Ok(stream) = std::net::TcpStream::connect(addr) else {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                };
                let mut raw = Raw::over(stream, Protocol::V5);
                let mut connect = connect_packet(Protocol::V5, "observer");
                connect.clean_start = false;
                connect.properties.session_expiry_interval = Some(3600);
                if !raw.try_send(&Packet::Connect(Box::new(connect)))
                    || !matches!(raw.recv(), Some(Packet::ConnAck(_)))
                {
                    continue;
                }
                seen.lock().unwrap().push(None);
                raw.try_send(&subscribe_qos1(filter));
                while !stop.load(Ordering::SeqCst) {
                    match raw.poll_for(Duration::from_millis(200)) {
                        Polled::Packet(Packet::Publish(p)) => {
                            let n = std::str::from_utf8(&p.payload).unwrap().parse().unwrap();
                            let id = ferry_id(&p).unwrap_or_default();
                            seen.lock().unwrap().push(Some((n, id)));
                            if !raw.try_send(&Packet::PubAck(PubAck::new(p.packet_id))) {
                                break;
                            }
                        }
                        Polled::Packet(_) | Polled::Timeout => {}
                        Polled::Closed => break,
                    }
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
        .flatten()
        .map(|(n, _)| *n)
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

fn wait_for(seen: &Seen, count: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while distinct(seen) < count {
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {count} arrived",
            distinct(seen)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts that the observer got each of `0..count` taken once by the
/// node it watches, in order.
fn taken_once(seen: &[Option<(u32, String)>], count: u32) {
    // The last hop is QoS 1: after the node's restart the observer may get the head of
    // its queue again (sent before the kill, its acknowledgement not yet
    // on disk), always first on a new connection. So on each connection,
    // messages already seen may come only before the first new one, and
    // new ones come in publish order; a message taken twice would come
    // again after newer ones.
    let mut met = std::collections::BTreeSet::new();
    let mut last_new = None;
    for (i, item) in seen.iter().enumerate() {
        match item {
            None => last_new = None,
            Some((n, _)) if met.contains(n) => assert!(
                last_new.is_none(),
                "message {n} came again after {last_new:?}, a new one (arrival {i}): \
                 taken twice"
            ),
            Some((n, _)) => {
                assert!(
                    last_new.is_none_or(|last| last < *n),
                    "order broken: {n} after {last_new:?}"
                );
                met.insert(*n);
                last_new = Some(*n);
            }
        }
    }
    assert_eq!(
        met.len(),
        count as usize,
        "every acknowledged message arrived"
    );
}

/// A `[[bridge]]` named "up" as `client_id` to 127.0.0.1:`port`,
/// forwarding `filter` out under `prefix`, with `extra` keys.
fn bridge_config(client_id: &str, port: u16, filter: &str, prefix: &str, extra: &str) -> String {
    format!(
        r#"
[[bridge]]
name = "up"
addresses = ["127.0.0.1:{port}"]
client_id = "{client_id}"
{extra}
inflight = 50
keepalive_secs = 2
connect_timeout_secs = 2
reconnect_min_ms = 50
reconnect_max_ms = 300
ramp_secs = 0

[[bridge.forward]]
filter = "{filter}"
remote_prefix = "{prefix}"
"#
    )
}

#[test]
fn an_edge_bridge_into_a_ferrymq_regional_delivers_each_message_once_across_cuts_and_kills() {
    edge_into_regional("");
}

#[test]
fn ferry_batches_into_a_ferrymq_regional_deliver_each_message_once_across_cuts_and_kills() {
    let edge_status = edge_into_regional("kind = \"ferrymq\"\nbatch_size = 64");
    // Batches were granted and used.
    assert!(batches_sent(&edge_status) > 0, "{edge_status}");
}

/// The batches a bridge status says were sent.
fn batches_sent(status: &str) -> u64 {
    status
        .split("ferry batches: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no batches in the status:\n{status}"))
}

#[test]
fn a_batch_that_is_not_full_waits_batch_linger_ms_for_more() {
    let regional = Broker::start(TRUSTED);
    let mut observer = subscriber(regional.addr, "observer", "site/#");
    let edge_data = tempfile::tempdir().unwrap();
    let config = bridge_config(
        "edge-1",
        regional.addr.port(),
        "data/#",
        "site/",
        "kind = \"ferrymq\"\nbatch_size = 100\nbatch_linger_ms = 3000",
    );
    let edge = Broker::start_at(edge_data.path(), &config);
    // Connected (the status says batches were granted) before publishing.
    let status_file = edge_data.path().join("bridge-status.txt");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&status_file).is_ok_and(|s| s.contains("ferry batches: 0 sent"))
    {
        assert!(Instant::now() < deadline, "the bridge did not connect");
        std::thread::sleep(Duration::from_millis(50));
    }
    // 20 messages, one at a time, well within the linger: one batch.
    publish_numbers(edge.addr, 0..20);
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < 20 && Instant::now() < deadline {
        got.extend(delivered(&mut observer).into_iter().map(|(p, _)| p));
    }
    assert_eq!(got, (0..20).map(|n| n.to_string()).collect::<Vec<_>>());
    std::thread::sleep(Duration::from_millis(1_200));
    let status = std::fs::read_to_string(&status_file).unwrap();
    assert_eq!(batches_sent(&status), 1, "{status}");
}

/// An edge bridge (`kind` keys) into a ferrymq regional node, across a
/// cut link and kills of both nodes: each of N messages taken once.
/// Returns the edge's bridge status at the end.
fn edge_into_regional(kind: &str) -> String {
    const N: u32 = 1500;
    let regional_data = tempfile::tempdir().unwrap();
    let port = free_port();
    let regional = node(regional_data.path(), port, TRUSTED);
    let regional_addr = regional.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let (seen, observer) = observe(regional_addr, "site/#", stop.clone());
    let link = Link::new(regional_addr, Mode::Down);
    let edge_data = tempfile::tempdir().unwrap();
    let bridge = bridge_config("edge-1", link.port(), "data/#", "site/", kind);
    let edge = Broker::start_at(edge_data.path(), &bridge);
    publish_numbers(edge.addr, 0..N / 2);
    // The edge is killed with its backlog on disk.
    edge.kill();
    let edge = Broker::start_at(edge_data.path(), &bridge);
    publish_numbers(edge.addr, N / 2..N);
    link.set(Mode::Pass);
    wait_for(&seen, N as usize / 4, "first part of the drain");
    // The link is cut mid-drain...
    link.set(Mode::Down);
    std::thread::sleep(Duration::from_millis(300));
    link.set(Mode::Pass);
    wait_for(&seen, N as usize / 2, "second part of the drain");
    // ... and the regional node killed mid-drain and restarted.
    regional.kill();
    let regional = node(regional_data.path(), port, TRUSTED);
    wait_for(&seen, N as usize, "the whole backlog");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    observer.join().unwrap();

    let seen = seen.lock().unwrap().clone();
    taken_once(&seen, N);
    eprintln!(
        "{N} taken once; {} deliveries on {} observer connections",
        seen.iter().flatten().count(),
        seen.iter().filter(|i| i.is_none()).count()
    );
    let status =
        std::fs::read_to_string(edge_data.path().join("bridge-status.txt")).unwrap_or_default();
    drop((edge, regional));
    status
}

#[test]
fn edge_to_regional_to_central_takes_each_message_once_at_every_hop() {
    const N: u32 = 1200;
    let (central_data, regional_data, edge_data) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let (central_port, regional_port) = (free_port(), free_port());
    let central = node(
        central_data.path(),
        central_port,
        "[ferry]\ntrusted_clients = [\"regional-*\"]\n",
    );
    let stop = Arc::new(AtomicBool::new(false));
    let (seen, observer) = observe(central.addr, "hq/#", stop.clone());
    // The regional node trusts the edge and bridges on to the central
    // one through a link that will be cut.
    let up = Link::new(central.addr, Mode::Pass);
    let regional_config = format!(
        "{TRUSTED}{}",
        bridge_config("regional-1", up.port(), "site/#", "hq/", "")
    );
    let regional = node(regional_data.path(), regional_port, &regional_config);
    let edge_config = bridge_config("edge-1", regional_port, "data/#", "site/", "");
    let mut at_regional = subscriber(regional.addr, "regional-observer", "site/#");
    let edge = Broker::start_at(edge_data.path(), &edge_config);
    publish_numbers(edge.addr, 0..N / 3);
    wait_for(&seen, N as usize / 6, "first part");
    // The ids the edge gave, as the regional node got them.
    let edge_ids: Vec<(String, Option<String>)> = delivered(&mut at_regional);
    assert!(edge_ids.len() >= N as usize / 6);
    drop(at_regional);
    up.set(Mode::Down);
    publish_numbers(edge.addr, N / 3..2 * N / 3);
    // The regional node is killed with messages taken from the edge and
    // not yet sent on; the link comes back after its restart.
    regional.kill();
    let regional = node(regional_data.path(), regional_port, &regional_config);
    up.set(Mode::Pass);
    edge.kill();
    let edge = Broker::start_at(edge_data.path(), &edge_config);
    publish_numbers(edge.addr, 2 * N / 3..N);
    wait_for(&seen, N as usize, "everything at the central node");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    observer.join().unwrap();
    let seen = seen.lock().unwrap().clone();
    taken_once(&seen, N);
    // The central node saw the edge's ids, not ids the regional node made
    // up: the same message is the same at every hop.
    let edge_uuids: std::collections::BTreeSet<String> = seen
        .iter()
        .flatten()
        .map(|(_, id)| id.split(':').next().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        edge_uuids.len(),
        1,
        "ids from one origin node: {edge_uuids:?}"
    );
    drop((edge, regional, central));
}

#[test]
fn a_ferry_bridge_to_a_broker_that_is_not_ferrymq_sends_plain_mqtt_5_and_says_so() {
    let upstream = mosquitto::Mosquitto::start("");
    let mut observer = subscriber(upstream.addr(), "observer", "site/#");
    let edge_data = tempfile::tempdir().unwrap();
    let config = bridge_config(
        "edge-1",
        upstream.port(),
        "data/#",
        "site/",
        "kind = \"ferrymq\"",
    );
    let edge = Broker::start_at(edge_data.path(), &config);
    publish_numbers(edge.addr, 0..20);
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < 20 && Instant::now() < deadline {
        got.extend(delivered(&mut observer));
    }
    let numbers: Vec<String> = (0..20).map(|n| n.to_string()).collect();
    assert_eq!(
        got.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(),
        numbers
    );
    assert!(got.iter().all(|(_, id)| id.is_some()), "each with its id");
    edge.wait_for_log("did not grant ferry batches", Duration::from_secs(10));
    let status_file = edge_data.path().join("bridge-status.txt");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = std::fs::read_to_string(&status_file).unwrap_or_default();
        if status.contains("not granted by the upstream") {
            break;
        }
        assert!(Instant::now() < deadline, "status:\n{status}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_fleet_of_500_bridges_comes_back_spread_out_and_drains_after_the_regional_restarts() {
    const EDGES: u32 = 500;
    const EACH: u32 = 10;
    let regional_data = tempfile::tempdir().unwrap();
    let port = free_port();
    let regional = node(regional_data.path(), port, TRUSTED);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // 500 edges in this process (in-memory stores), each bridged straight
    // to the regional node.
    let dirs: Vec<tempfile::TempDir> = (0..EDGES).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes: Vec<ferrymq_bridge::Node> = runtime.block_on(async {
        let mut nodes = Vec::new();
        for (i, dir) in dirs.iter().enumerate() {
            let text = format!(
                "data_dir = {:?}\n[[listener]]\nbind = \"127.0.0.1:0\"\n{}",
                dir.path().join("data").display().to_string(),
                // Backoff as a fleet would have it: 200 ms to 3 s, full jitter.
                bridge_config(&format!("edge-{i}"), port, "data/#", "site/", "").replace(
                    "reconnect_min_ms = 50\nreconnect_max_ms = 300",
                    "reconnect_min_ms = 200\nreconnect_max_ms = 3000"
                )
            );
            let config = ferrymq_config::Config::from_toml_str(&text).unwrap();
            let broker = ferrymq_broker::Broker::builder(config)
                .store(ferrymq_broker::storage::MemoryStore::new())
                .start()
                .await
                .unwrap();
            nodes.push(ferrymq_bridge::Node::with_broker(broker).await.unwrap());
        }
        nodes
    });
    let connected = |count: usize| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while nodes.iter().filter(|n| n.bridges()[0].connected).count() < count {
            assert!(Instant::now() < deadline, "not all bridges connected");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    connected(EDGES as usize);
    let stop = Arc::new(AtomicBool::new(false));
    let (seen, observer) = observe(regional.addr, "site/#", stop.clone());
    std::thread::sleep(Duration::from_millis(300));

    // The regional node goes away; every edge queues its messages.
    regional.kill();
    runtime.block_on(async {
        for (i, node) in nodes.iter().enumerate() {
            let client = node
                .broker()
                .connect(ferrymq_broker::ClientOptions::new("sensor"))
                .await
                .unwrap();
            for n in 0..EACH {
                let number = i as u32 * 1000 + n;
                client
                    .publish("data/t", number.to_string(), QoS::AtLeastOnce, false)
                    .await
                    .unwrap();
            }
            client.disconnect().await;
        }
    });
    std::thread::sleep(Duration::from_secs(2));
    let regional = node(regional_data.path(), port, TRUSTED);
    let back = Instant::now();
    connected(EDGES as usize);
    let total = (EDGES * EACH) as usize;
    let deadline = Instant::now() + Duration::from_secs(120);
    while distinct(&seen) < total {
        assert!(
            Instant::now() < deadline,
            "{} of {total} drained",
            distinct(&seen)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::SeqCst);
    observer.join().unwrap();

    // When the edges came back (the regional node logs each connection):
    // spread by their jittered backoff, none refused.
    let log = regional.log();
    let restarted = log.rfind("listening on").unwrap();
    let times: Vec<f64> = log[restarted..]
        .lines()
        .filter(|l| l.contains(" connected ") && l.contains("client_id=edge-"))
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|stamp| {
            let time = stamp.split('T').nth(1)?.trim_end_matches('Z');
            let mut parts = time.split(':');
            let (h, m, s): (f64, f64, f64) = (
                parts.next()?.parse().ok()?,
                parts.next()?.parse().ok()?,
                parts.next()?.parse().ok()?,
            );
            Some(h * 3600.0 + m * 60.0 + s)
        })
        .collect();
    assert!(
        times.len() >= EDGES as usize,
        "{} reconnections logged",
        times.len()
    );
    let first = times.iter().copied().fold(f64::MAX, f64::min);
    let mut histogram = std::collections::BTreeMap::new();
    for t in &times {
        *histogram.entry(((t - first) * 4.0) as u32).or_insert(0u32) += 1;
    }
    let busiest = histogram.values().copied().max().unwrap_or(0);
    eprintln!(
        "reconnections per 250 ms after the restart: {histogram:?}; all drained {:?} after it",
        back.elapsed()
    );
    assert!(
        busiest < EDGES / 2,
        "half the fleet came back in one 250 ms: {histogram:?}"
    );
    assert!(!log.contains("max_connections"), "a connection was refused");
    runtime.block_on(async {
        for node in nodes {
            node.shutdown().await;
        }
    });
}

#[test]
fn live_lane_messages_overtake_the_backlog() {
    const BACKLOG: u32 = 3000;
    let regional_data = tempfile::tempdir().unwrap();
    let regional = node(regional_data.path(), free_port(), TRUSTED);
    let stop = Arc::new(AtomicBool::new(false));
    let (seen, observer) = observe(regional.addr, "site/#", stop.clone());
    let link = Link::new(regional.addr, Mode::Down);
    let edge_data = tempfile::tempdir().unwrap();
    // The backlog drains at 500 msg/s (6 s); alarms have a lane of their
    // own.
    let config = format!(
        "{}\n[[bridge.forward]]\nfilter = \"alarm/#\"\nremote_prefix = \"site/\"\nlane = \"live\"\n",
        bridge_config(
            "edge-1",
            link.port(),
            "data/#",
            "site/",
            "kind = \"ferrymq\"\ndrain_rate = 500"
        )
    );
    let edge = Broker::start_at(edge_data.path(), &config);
    publish_numbers(edge.addr, 0..BACKLOG);
    link.set(Mode::Pass);
    wait_for(&seen, 10, "the drain started");
    let mut alarms = Raw::connect(edge.addr, Protocol::V311, "alarms");
    for k in 0..5u32 {
        alarms.send(&Packet::Publish(Publish {
            qos: QoS::AtLeastOnce,
            packet_id: k as u16 + 1,
            topic: s("alarm/fire"),
            payload: Bytes::from((100_000 + k).to_string()),
            ..Publish::default()
        }));
        assert!(matches!(alarms.recv(), Some(Packet::PubAck(_))));
    }
    wait_for(&seen, BACKLOG as usize + 5, "everything");
    stop.store(true, Ordering::SeqCst);
    observer.join().unwrap();
    let order: Vec<u32> = seen
        .lock()
        .unwrap()
        .iter()
        .flatten()
        .map(|(n, _)| *n)
        .collect();
    let last_alarm = order.iter().rposition(|n| *n >= 100_000).unwrap();
    let backlog_before = order[..last_alarm].iter().filter(|n| **n < BACKLOG).count();
    // In one FIFO every alarm would come after the whole backlog; in its
    // lane the last one comes while most of the backlog still waits.
    assert!(
        backlog_before < BACKLOG as usize / 2,
        "the last alarm came after {backlog_before} of {BACKLOG} backlog messages"
    );
    eprintln!("the last alarm came after {backlog_before} of {BACKLOG} backlog messages");
    drop((edge, regional));
}

#[test]
fn an_acl_rule_can_trust_a_bridge_by_its_verified_user() {
    let data = tempfile::tempdir().unwrap();
    let users = data.path().join("passwd");
    add_user(&users, "regional-link", "link-pass");
    let acl = data.path().join("acl.toml");
    std::fs::write(
        &acl,
        "[[rule]]\nuser = \"regional-link\"\npublish = [\"#\"]\ntrusted_bridge = true\n\
         [[rule]]\neveryone = true\npublish = [\"#\"]\nsubscribe = [\"#\"]\n",
    )
    .unwrap();
    let regional = node(
        data.path(),
        free_port(),
        &format!(
            "[auth]\npassword_file = {:?}\nacl_file = {:?}\n",
            users.display().to_string(),
            acl.display().to_string()
        ),
    );
    let mut sub = subscriber(regional.addr, "observer", "site/#");
    let id = "000102030405060708090a0b0c0d0e0f:4:2:1";
    // Any client id, logged in as the trusted user: taken once.
    let mut link = Raw::open(regional.addr, Protocol::V5);
    let mut connect = connect_packet(Protocol::V5, "whatever-7");
    connect.username = Some(s("regional-link"));
    connect.password = Some(Bytes::from_static(b"link-pass"));
    link.send(&Packet::Connect(Box::new(connect)));
    assert!(
        matches!(link.recv(), Some(Packet::ConnAck(a)) if a.reason_code == ReasonCode::SUCCESS)
    );
    for packet_id in [1, 2] {
        acked(&mut link, &with_id("site/a", packet_id, "one", Some(id)));
    }
    assert_eq!(delivered(&mut sub), [("one".into(), Some(id.into()))]);
    // Anonymous, same id: not trusted, taken twice, its id removed.
    let mut other = Raw::connect(regional.addr, Protocol::V5, "edge-1");
    for packet_id in [1, 2] {
        acked(&mut other, &with_id("site/b", packet_id, "two", Some(id)));
    }
    assert_eq!(
        delivered(&mut sub),
        [("two".into(), None), ("two".into(), None)]
    );
}

/// A network namespace of this test's own, joined to this one by a veth
/// pair (10.213.N.1 here, 10.213.N.2 there) with `tc netem` on both ends;
/// removed on drop.
struct Netns {
    name: String,
    host_if: String,
    peer: std::net::Ipv4Addr,
}

impl Netns {
    /// Sets it up, or says which step the machine refused.
    fn create(netem: &str) -> Result<Netns, String> {
        let pid = std::process::id();
        let net = pid % 250;
        let ns = Netns {
            name: format!("fmq{pid}"),
            host_if: format!("fmqh{}", pid % 10_000_000),
            peer: std::net::Ipv4Addr::new(10, 213, net as u8, 2),
        };
        let peer_if = format!("fmqn{}", pid % 10_000_000);
        let host_addr = format!("10.213.{net}.1/30");
        let peer_addr = format!("10.213.{net}.2/30");
        let netem: Vec<&str> = netem.split_whitespace().collect();
        let ip_netns = ["ip", "netns", "exec", ns.name.as_str()];
        let mut steps: Vec<Vec<&str>> = vec![
            vec!["ip", "netns", "add", &ns.name],
            vec![
                "ip",
                "link",
                "add",
                &ns.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &peer_if,
            ],
            vec!["ip", "link", "set", &peer_if, "netns", &ns.name],
            vec!["ip", "addr", "add", &host_addr, "dev", &ns.host_if],
            vec!["ip", "link", "set", &ns.host_if, "up"],
        ];
        for inside in [
            vec!["ip", "addr", "add", &peer_addr, "dev", &peer_if],
            vec!["ip", "link", "set", &peer_if, "up"],
            vec!["ip", "link", "set", "lo", "up"],
        ] {
            steps.push(ip_netns.iter().copied().chain(inside).collect());
        }
        let mut host_netem = vec!["tc", "qdisc", "add", "dev", &ns.host_if, "root", "netem"];
        host_netem.extend(&netem);
        let mut peer_netem: Vec<&str> = ip_netns.to_vec();
        peer_netem.extend(["tc", "qdisc", "add", "dev", &peer_if, "root", "netem"]);
        peer_netem.extend(&netem);
        steps.push(host_netem);
        steps.push(peer_netem);
        for step in steps {
            let out = std::process::Command::new(step[0])
                .args(&step[1..])
                .output()
                .map_err(|e| format!("`{}`: {e}", step.join(" ")))?;
            if !out.status.success() {
                return Err(format!(
                    "`{}`: {}",
                    step.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for args in [
            vec!["link", "del", self.host_if.as_str()],
            vec!["netns", "del", self.name.as_str()],
        ] {
            let _ = std::process::Command::new("ip")
                .args(args)
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

#[test]
fn ferry_batches_take_each_message_once_over_a_link_with_latency_loss_and_reordering() {
    // Half the link's packets late, 2 % lost, a quarter reordered.
    let ns = match Netns::create("delay 20ms 10ms loss 2% reorder 25% 50%") {
        Ok(ns) => ns,
        Err(why) => {
            // Kernels without the netem qdisc (sch_netem) cannot run this.
            eprintln!("SKIPPED: no network namespace with netem on this machine: {why}");
            return;
        }
    };
    let regional_dir = tempfile::tempdir().unwrap();
    let config = format!(
        "data_dir = {:?}\n[[listener]]\nbind = \"{}:{}\"\n\
         [auth]\nallow_anonymous_remote = true\n{TRUSTED}",
        regional_dir.path().join("data").display().to_string(),
        ns.peer,
        free_port(),
    );
    let path = regional_dir.path().join("ferrymq.toml");
    std::fs::write(&path, config).unwrap();
    let config_dir = tempfile::tempdir().unwrap();
    let regional = Broker::start_under(&["ip", "netns", "exec", &ns.name], &path, config_dir);
    let mut observer = subscriber(regional.addr, "observer", "site/#");
    let edge_data = tempfile::tempdir().unwrap();
    let edge = Broker::start_at(
        edge_data.path(),
        &bridge_config(
            "edge-1",
            regional.addr.port(),
            "data/#",
            "site/",
            "kind = \"ferrymq\"\nbatch_size = 50",
        )
        .replace("127.0.0.1", &ns.peer.to_string()),
    );
    const COUNT: u32 = 2_000;
    publish_numbers(edge.addr, 0..COUNT);
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < COUNT as usize && Instant::now() < deadline {
        got.extend(delivered(&mut observer).into_iter().map(|(p, _)| p));
    }
    let expected: Vec<String> = (0..COUNT).map(|n| n.to_string()).collect();
    assert_eq!(got, expected, "each once, in order");
    drop((edge, regional));
}
