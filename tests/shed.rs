//! Load shedding, driven through the broker's load override (the test
//! hook for the load signal) with real TCP clients: QoS 0 publishes on
//! topics that are not critical go first, critical topics never, QoS 1
//! never; then new connections are refused (5.0 0x89, 3.1.1 code 3) while
//! connected clients go on; all of it recovers when the load drops.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Raw, connect_packet, s, subscribe_qos1};
use ferrymq_broker::shed::Load;
use ferrymq_broker::{Broker, BrokerHandle, Stats};
use ferrymq_codec::{Packet, Protocol, PubAck, Publish, QoS, ReasonCode};
use ferrymq_config::Config;

fn publish(raw: &mut Raw, topic: &str, qos: QoS, packet_id: u16) {
    raw.send(&Packet::Publish(Publish {
        qos,
        packet_id,
        topic: s(topic),
        payload: Bytes::from_static(b"x"),
        ..Publish::default()
    }));
    if qos == QoS::AtLeastOnce {
        assert!(matches!(raw.recv(), Some(Packet::PubAck(_))));
    }
}

/// The topics delivered to `raw` until it is quiet.
fn delivered(raw: &mut Raw) -> Vec<String> {
    let mut topics = Vec::new();
    while let Some(packet) = raw.recv_or_silence(Duration::from_millis(400)) {
        if let Packet::Publish(p) = packet {
            if p.qos != QoS::AtMostOnce {
                raw.send(&Packet::PubAck(PubAck::new(p.packet_id)));
            }
            topics.push(p.topic.as_str().to_owned());
        }
    }
    topics
}

/// The CONNACK reason a new client gets.
fn connack(addr: SocketAddr, protocol: Protocol) -> ReasonCode {
    let mut raw = Raw::open(addr, protocol);
    raw.send(&Packet::Connect(Box::new(connect_packet(protocol, "late"))));
    match raw.recv() {
        Some(Packet::ConnAck(ack)) => ack.reason_code,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

fn wait_level(broker: &BrokerHandle, level: u8) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while broker.shed_level() != level {
        assert!(
            Instant::now() < deadline,
            "shedding stayed at {} (waiting for {level})",
            broker.shed_level()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn overload_sheds_qos0_then_connections_and_recovers() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        data_dir: dir.path().join("data"),
        ..Config::default()
    };
    config.listeners[0].bind = "127.0.0.1:0".parse().unwrap();
    config.limits.shed_window = Duration::from_secs(1);
    config.limits.critical_topics = vec!["alarms/#".into()];
    let broker = runtime.block_on(Broker::start(config)).unwrap();
    let handle = broker.handle();
    let addr = broker.local_addrs()[0];
    let mut watcher = Raw::connect(addr, Protocol::V5, "watcher");
    watcher.send(&subscribe_qos1("#"));
    assert!(matches!(watcher.recv(), Some(Packet::SubAck(_))));
    let mut sensor = Raw::connect(addr, Protocol::V5, "sensor");

    handle.override_load(Some(Load {
        cpu: 0.99,
        resident_bytes: 0,
    }));
    wait_level(&handle, 1);
    publish(&mut sensor, "sensors/a", QoS::AtMostOnce, 0);
    publish(&mut sensor, "alarms/fire", QoS::AtMostOnce, 0);
    publish(&mut sensor, "sensors/b", QoS::AtLeastOnce, 1);
    assert_eq!(delivered(&mut watcher), ["alarms/fire", "sensors/b"]);
    assert_eq!(connack(addr, Protocol::V5), ReasonCode::SUCCESS);

    wait_level(&handle, 2);
    assert_eq!(connack(addr, Protocol::V5), ReasonCode::SERVER_BUSY);
    // 3.1.1: return code 3, server unavailable.
    assert_eq!(
        connack(addr, Protocol::V311),
        ReasonCode::SERVER_UNAVAILABLE
    );
    // Connected clients go on.
    publish(&mut sensor, "alarms/smoke", QoS::AtMostOnce, 0);
    publish(&mut sensor, "sensors/c", QoS::AtMostOnce, 0);
    assert_eq!(delivered(&mut watcher), ["alarms/smoke"]);

    handle.override_load(Some(Load {
        cpu: 0.1,
        resident_bytes: 0,
    }));
    wait_level(&handle, 0);
    assert_eq!(connack(addr, Protocol::V5), ReasonCode::SUCCESS);
    publish(&mut sensor, "sensors/d", QoS::AtMostOnce, 0);
    assert_eq!(delivered(&mut watcher), ["sensors/d"]);

    let stats = handle.stats();
    assert_eq!(Stats::get(&stats.publishes_shed), 2);
    assert_eq!(Stats::get(&stats.connections_shed), 2);
    runtime.block_on(broker.shutdown());
}
