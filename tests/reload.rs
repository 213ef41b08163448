//! Reload of the config file on SIGHUP, against the real binary: a
//! listener and a bridge added, a limit changed, a bridge removed and
//! added back, a listener removed, all under live clients; nothing queued
//! is lost, and a broken file leaves the running config in force.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use ferrymq_codec::{Packet, Protocol, PubAck, Publish, QoS};

/// The edge's config: its first listener, then `extra` (more listeners,
/// limits, bridges).
fn config(data: &Path, extra: &str) -> String {
    format!(
        "data_dir = {:?}\n[[listener]]\nbind = \"127.0.0.1:0\"\n{extra}\n",
        data.display().to_string()
    )
}

/// A bridge forwarding `filter` to `upstream`, reconnecting quickly.
fn bridge(name: &str, upstream: SocketAddr, filter: &str) -> String {
    format!(
        r#"
[[bridge]]
name = "{name}"
addresses = ["{upstream}"]
client_id = "edge-{name}"
keepalive_secs = 2
connect_timeout_secs = 1
reconnect_min_ms = 50
reconnect_max_ms = 300
ramp_secs = 0

[[bridge.forward]]
filter = "{filter}"
"#
    )
}

/// Writes `text` to `file`, SIGHUPs the node and waits until it logged
/// the end of one more reload (`done`: a line only a reload's end writes).
fn reload(node: &Broker, file: &Path, text: &str, done: &str) {
    let count = || node.log().matches(done).count();
    let before = count();
    std::fs::write(file, text).unwrap();
    let kill = std::process::Command::new("kill")
        .args(["-HUP", &node.pid().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while count() == before {
        assert!(
            std::time::Instant::now() < deadline,
            "no reload logged:\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A ferrymq upstream and a client subscribed to everything on it.
fn upstream() -> (Broker, Raw) {
    let upstream = Broker::start("");
    let mut sub = Raw::connect(upstream.addr, Protocol::V5, "up-sub");
    sub.send(&subscribe_qos1("#"));
    assert!(matches!(sub.recv(), Some(Packet::SubAck(_))));
    (upstream, sub)
}

/// An edge started from a file, with bridge "a" forwarding `data/#` to an
/// address where nothing listens (what it forwards waits in its queue):
/// (its directory, data dir, config file, the edge).
fn edge_with_a_bridge_to_nowhere() -> (tempfile::TempDir, PathBuf, PathBuf, Broker) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = dir.path().join("edge.toml");
    let nowhere: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    std::fs::write(&file, config(&data, &bridge("a", nowhere, "data/#"))).unwrap();
    let edge = Broker::start_with_file(&file, tempfile::tempdir().unwrap());
    (dir, data, file, edge)
}

const IN_FORCE: &str = "in force";
const REFUSED: &str = "reload: the running config stays";

/// Publishes `payload` on `topic` at QoS 1 from `client` and waits for
/// its acknowledgement.
fn publish(client: &mut Raw, id: u16, topic: &str, payload: &str) {
    client.send(&Packet::Publish(Publish {
        qos: QoS::AtLeastOnce,
        packet_id: id,
        topic: s(topic),
        payload: bytes::Bytes::from(payload.to_owned()),
        ..Publish::default()
    }));
    assert_eq!(client.recv(), Some(Packet::PubAck(PubAck::new(id))));
}

/// The next message `client` gets within 10 s (acknowledged): (topic,
/// payload).
fn next(client: &mut Raw) -> (String, String) {
    match client.recv_within(Duration::from_secs(10)) {
        Some(Packet::Publish(p)) => {
            if p.qos != QoS::AtMostOnce {
                client.send(&Packet::PubAck(PubAck::new(p.packet_id)));
            }
            (
                p.topic.to_string(),
                String::from_utf8_lossy(&p.payload).into_owned(),
            )
        }
        other => panic!("expected a message, got {other:?}"),
    }
}

#[test]
fn listeners_bridges_and_limits_change_on_sighup_under_live_clients() {
    let (upstream, mut up_sub) = upstream();

    // v1: bridge "a" points where nothing listens, so what it forwards
    // waits in its queue.
    let (_dir, data, file, edge) = edge_with_a_bridge_to_nowhere();
    let mut watcher = Raw::connect(edge.addr, Protocol::V5, "watcher");
    watcher.send(&subscribe_qos1("alarms/#"));
    assert!(matches!(watcher.recv(), Some(Packet::SubAck(_))));
    let mut sensor = Raw::connect(edge.addr, Protocol::V311, "sensor");
    for n in 0..50u16 {
        publish(&mut sensor, n + 1, "data/t", &n.to_string());
    }

    // v2: a second listener, bridge "b" to the upstream, a limit, and
    // bridge "a" removed (its 50 stay queued).
    let port = free_port();
    let second: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let v2 = config(
        &data,
        &format!(
            "[[listener]]\nbind = \"{second}\"\n[limits]\nmax_subscriptions_per_client = 1\n{}",
            bridge("b", upstream.addr, "alarms/#")
        ),
    );
    reload(&edge, &file, &v2, IN_FORCE);
    assert!(edge.log().contains("reload: listener[1] replaced"));
    let mut late = Raw::connect(second, Protocol::V5, "late");
    publish(&mut late, 1, "alarms/fire", "1");
    // Through the new listener to the watcher connected before the reload,
    // and through the new bridge upstream.
    assert_eq!(next(&mut watcher), ("alarms/fire".into(), "1".into()));
    assert_eq!(next(&mut up_sub), ("alarms/fire".into(), "1".into()));
    // The new limit holds for a client connected before it.
    watcher.send(&subscribe_qos1("more/#"));
    match watcher.recv() {
        Some(Packet::SubAck(ack)) => assert_eq!(ack.reason_codes[0].0, 0x97, "{ack:?}"),
        other => panic!("expected a SUBACK, got {other:?}"),
    }
    // Bridge "a" is gone: what is published for it now is not queued.
    for n in 50..60u16 {
        publish(&mut sensor, n + 1, "data/t", &n.to_string());
    }

    // A broken file: refused, everything stays as it was.
    reload(
        &edge,
        &file,
        &config(&data, "[limits]\nmax_connections = \"many\"\n"),
        REFUSED,
    );
    assert!(edge.log().contains("limits.max_connections"));
    let mut again = Raw::connect(second, Protocol::V5, "again");
    publish(&mut again, 1, "alarms/fire", "2");
    assert_eq!(next(&mut watcher), ("alarms/fire".into(), "2".into()));
    assert_eq!(next(&mut up_sub), ("alarms/fire".into(), "2".into()));

    // v3: bridge "a" back, now to the upstream; the second listener gone.
    let v3 = config(
        &data,
        &format!(
            "{}{}",
            bridge("a", upstream.addr, "data/#"),
            bridge("b", upstream.addr, "alarms/#")
        ),
    );
    reload(&edge, &file, &v3, IN_FORCE);
    assert!(edge.log().contains("reload: listener[1] removed"));
    // Every message queued before the removal, in order, once; none of
    // those published while it was removed.
    for n in 0..50 {
        assert_eq!(next(&mut up_sub), ("data/t".into(), n.to_string()));
    }
    up_sub.expect_silence(Duration::from_millis(500));
    assert!(
        TcpStream::connect_timeout(&second, Duration::from_secs(1)).is_err(),
        "the removed listener still accepts"
    );
    // Connections made through the removed listener and before any
    // reload are still up; bridge "b" kept its link throughout.
    publish(&mut late, 2, "alarms/fire", "3");
    assert_eq!(next(&mut watcher), ("alarms/fire".into(), "3".into()));
    assert_eq!(next(&mut up_sub), ("alarms/fire".into(), "3".into()));
    let restarted_b = edge
        .log()
        .lines()
        .any(|l| l.contains("stopping the bridge") && l.contains("bridge=b"));
    assert!(!restarted_b, "{}", edge.log());
}

#[test]
fn a_smaller_max_connections_refuses_new_connections_and_keeps_the_open_ones() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = dir.path().join("edge.toml");
    std::fs::write(&file, config(&data, "")).unwrap();
    let node = Broker::start_with_file(&file, tempfile::tempdir().unwrap());
    let mut open: Vec<Raw> = (0..3)
        .map(|i| Raw::connect(node.addr, Protocol::V5, &format!("c{i}")))
        .collect();
    reload(
        &node,
        &file,
        &config(&data, "[limits]\nmax_connections = 2\n"),
        IN_FORCE,
    );
    // Three are open, above the new limit: a fourth is closed unanswered.
    let mut refused = Raw::open(node.addr, Protocol::V5);
    refused.send(&Packet::Connect(Box::new(connect_packet(
        Protocol::V5,
        "refused",
    ))));
    assert_eq!(refused.recv(), None);
    for client in &mut open {
        client.send(&Packet::PingReq);
        assert_eq!(client.recv(), Some(Packet::PingResp));
    }
    // Two close: one place frees up (the limit is 2).
    open.truncate(1);
    std::thread::sleep(Duration::from_millis(300));
    let _fits = Raw::connect(node.addr, Protocol::V5, "fits");
    let mut over = Raw::open(node.addr, Protocol::V5);
    over.send(&Packet::Connect(Box::new(connect_packet(
        Protocol::V5,
        "over",
    ))));
    assert_eq!(over.recv(), None);
    // Raised again: room at once.
    reload(
        &node,
        &file,
        &config(&data, "[limits]\nmax_connections = 10\n"),
        IN_FORCE,
    );
    let _more = Raw::connect(node.addr, Protocol::V5, "more");
}

#[test]
fn a_removed_bridge_keeps_its_queue_across_a_restart_until_it_is_deleted() {
    let (upstream, mut up_sub) = upstream();
    let (_dir, data, file, edge) = edge_with_a_bridge_to_nowhere();
    let mut sensor = Raw::connect(edge.addr, Protocol::V311, "sensor");
    for n in 0..20u16 {
        publish(&mut sensor, n + 1, "data/t", &n.to_string());
    }
    drop(sensor);
    let delete = || {
        std::process::Command::new(binary())
            .args([
                "--config",
                file.to_str().unwrap(),
                "queue",
                "delete-bridge",
                "a",
            ])
            .output()
            .unwrap()
    };
    // Still configured: refused.
    let out = delete();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is in the config"));
    // Removed from the file, then a restart: the queue is kept and takes
    // nothing more.
    std::fs::write(&file, config(&data, "")).unwrap();
    assert!(edge.terminate().success());
    let edge = Broker::start_with_file(&file, tempfile::tempdir().unwrap());
    edge.wait_for_log(
        "its queue is kept and takes nothing more",
        Duration::from_secs(10),
    );
    assert!(edge.log().contains("queued=20"), "{}", edge.log());
    let mut sensor = Raw::connect(edge.addr, Protocol::V311, "sensor");
    for n in 20..25u16 {
        publish(&mut sensor, n + 1, "data/t", &n.to_string());
    }
    // Deleted on request by the running node.
    let out = delete();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    edge.wait_for_log(
        "deleted the queues of a removed bridge",
        Duration::from_secs(10),
    );
    assert!(edge.log().contains("messages=20"), "{}", edge.log());
    // Added back: nothing of the deleted queue goes up.
    reload(
        &edge,
        &file,
        &config(&data, &bridge("a", upstream.addr, "data/#")),
        IN_FORCE,
    );
    publish(&mut sensor, 100, "data/t", "new");
    assert_eq!(next(&mut up_sub), ("data/t".into(), "new".into()));
    up_sub.expect_silence(Duration::from_millis(500));
}
