//! Retained messages streamed to a new subscription: every one that
//! matched at SUBSCRIBE time, exactly once, in both protocol versions and
//! through the in-process client, with live traffic during the replay.
//!
//! Regression for "a new subscriber gets an arbitrary 10,000 of 200,000
//! retained messages": the retained set was pushed into the subscriber's
//! bounded session queue at once, and `drop-oldest` cut it to 10,000.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::*;
use ferrymq_codec::{
    ConnectProperties, Packet, Protocol, PubAck, Publish, QoS, Subscribe, Subscription,
    SubscriptionOptions,
};

const RETAINED: usize = 200_000;

fn topic(i: usize) -> String {
    format!("sensors/{i:06}/last")
}

/// Publishes `RETAINED` retained messages (100-byte payloads) on distinct
/// topics from one 3.1.1 connection, pipelined, then waits for the PUBACK
/// of a last QoS 1 publish: everything before it has been routed.
fn publish_retained(broker: &Broker) {
    let mut publisher = Raw::connect(broker.addr, Protocol::V311, "retainer");
    let payload = Bytes::from(vec![b'x'; 100]);
    let mut out = BytesMut::new();
    for i in 0..RETAINED {
        Packet::Publish(Publish {
            topic: s(&topic(i)),
            retain: true,
            payload: payload.clone(),
            ..Publish::default()
        })
        .encode(Protocol::V311, &mut out)
        .unwrap();
    }
    publisher.stream.write_all(&out).unwrap();
    publisher.send(&Packet::Publish(Publish {
        topic: s("sync"),
        qos: QoS::AtLeastOnce,
        packet_id: 1,
        ..Publish::default()
    }));
    assert!(matches!(
        publisher.recv_within(Duration::from_secs(120)),
        Some(Packet::PubAck(_))
    ));
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// The broker's RSS once it stopped moving: the store flushes its memtable
/// (16 MiB) in the background after the retained set is written, and on a
/// slow machine that flush could otherwise land in the replay's
/// measurement. Waits until two readings a second apart are within 1 MiB
/// (at most 30 s).
fn settled_rss_kib(pid: u32) -> u64 {
    let mut last = rss_kib(pid);
    for _ in 0..30 {
        std::thread::sleep(Duration::from_secs(1));
        let now = rss_kib(pid);
        if now.abs_diff(last) < 1024 {
            return now;
        }
        last = now;
    }
    last
}

/// Subscribes `sensors/#` at `qos`, acknowledges what needs it, and reads
/// until every retained message and both live ones arrived. Midway it
/// publishes (from another client) a live message on a topic the replay
/// has not reached yet, and a retained one on a new topic. Checks that
/// each retained message arrives once, in topic order, that the live ones
/// arrive once and after the retained message of their topic, and that
/// the broker's memory did not grow with the retained count.
fn replay_to(broker: &Broker, protocol: Protocol, qos: QoS, receive_maximum: Option<u16>) {
    let rss_before = settled_rss_kib(broker.pid());
    let mut sub = Raw::open(broker.addr, protocol);
    let mut connect = connect_packet(protocol, "dashboard");
    connect.properties = ConnectProperties {
        receive_maximum,
        ..ConnectProperties::default()
    };
    sub.send(&Packet::Connect(Box::new(connect)));
    assert!(matches!(sub.recv(), Some(Packet::ConnAck(a)) if a.reason_code.0 == 0));
    sub.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        subscriptions: vec![Subscription {
            filter: s("sensors/#"),
            options: SubscriptionOptions {
                qos,
                ..SubscriptionOptions::default()
            },
        }],
        properties: Default::default(),
    }));
    assert!(matches!(sub.recv(), Some(Packet::SubAck(_))));
    let mut rss_peak = rss_before;
    let late = topic(RETAINED - 7);
    let mut seen = HashSet::new();
    let mut previous = String::new();
    let mut live_late = 0;
    let mut live_new = 0;
    let mut late_retained_seen = false;
    let mut received = 0usize;
    while seen.len() < RETAINED || live_late == 0 || live_new == 0 {
        let Some(Packet::Publish(p)) = sub.recv_within(Duration::from_secs(30)) else {
            panic!("connection closed after {} retained messages", seen.len());
        };
        received += 1;
        if p.qos != QoS::AtMostOnce {
            sub.send(&Packet::PubAck(PubAck::new(p.packet_id)));
        }
        let t = p.topic.to_string();
        if p.payload.as_ref() == b"live" {
            if t == late {
                assert!(
                    late_retained_seen,
                    "the live message overtook its retained one"
                );
                live_late += 1;
            } else {
                assert_eq!(t, "sensors/new/last");
                live_new += 1;
            }
            continue;
        }
        assert!(p.retain, "{t}");
        assert!(t > previous, "out of order: {t} after {previous}");
        assert!(seen.insert(t.clone()), "twice: {t}");
        late_retained_seen |= t == late;
        previous = t;
        if received == 1_000 {
            let mut live = Raw::connect(broker.addr, Protocol::V5, "live");
            for (topic, retain) in [(late.as_str(), false), ("sensors/new/last", true)] {
                live.send(&Packet::Publish(Publish {
                    topic: s(topic),
                    retain,
                    qos: QoS::AtLeastOnce,
                    packet_id: 1,
                    payload: Bytes::from_static(b"live"),
                    ..Publish::default()
                }));
                assert!(matches!(live.recv(), Some(Packet::PubAck(_))));
            }
        }
        if received.is_multiple_of(10_000) {
            rss_peak = rss_peak.max(rss_kib(broker.pid()));
        }
    }
    assert_eq!(live_late, 1);
    assert_eq!(live_new, 1);
    sub.expect_silence(Duration::from_millis(300));
    // A page at a time: far less than a copy of the retained set (200,000
    // entries) or of their deliveries would take.
    let grew = rss_peak.saturating_sub(rss_before);
    assert!(
        grew < 16 * 1024,
        "RSS grew {grew} KiB during the replay ({rss_before} KiB before)"
    );
    // Clear the new topic so the next run sees the same set.
    let mut live = Raw::connect(broker.addr, Protocol::V5, "live");
    live.send(&Packet::Publish(Publish {
        topic: s("sensors/new/last"),
        retain: true,
        qos: QoS::AtLeastOnce,
        packet_id: 1,
        ..Publish::default()
    }));
    assert!(matches!(live.recv(), Some(Packet::PubAck(_))));
}

#[test]
fn a_new_subscriber_gets_every_one_of_200000_retained_messages_exactly_once() {
    let broker = Broker::start("");
    publish_retained(&broker);
    // 5.0 with a small Receive Maximum, QoS 1; 3.1.1 at QoS 1 and QoS 0.
    replay_to(&broker, Protocol::V5, QoS::AtLeastOnce, Some(20));
    replay_to(&broker, Protocol::V311, QoS::AtLeastOnce, None);
    replay_to(&broker, Protocol::V311, QoS::AtMostOnce, None);
    assert!(!broker.log().contains("queue full"), "{}", broker.log());
}
