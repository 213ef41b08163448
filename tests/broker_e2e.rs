//! End-to-end behaviour of the broker skeleton against the real binary:
//! rumqttc (3.1.1 and 5.0) and the raw codec client.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use ferrymq_codec::{
    ConnAck, Disconnect, Packet, Protocol, PubAck, Publish, QoS, ReasonCode, Subscribe,
    Subscription, SubscriptionOptions, Unsubscribe, Will, WillProperties,
};

fn subscribe(filters: &[&str]) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: 1,
        subscriptions: filters
            .iter()
            .map(|f| Subscription {
                filter: s(f),
                options: SubscriptionOptions::default(),
            })
            .collect(),
        properties: Default::default(),
    })
}

fn publish(topic: &str, payload: &'static str) -> Packet {
    Packet::Publish(Publish {
        topic: s(topic),
        payload: Bytes::from_static(payload.as_bytes()),
        ..Publish::default()
    })
}

fn expect_suback(raw: &mut Raw) -> Vec<ReasonCode> {
    match raw.recv() {
        Some(Packet::SubAck(ack)) => ack.reason_codes,
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

fn expect_publish(raw: &mut Raw) -> Publish {
    match raw.recv() {
        Some(Packet::Publish(p)) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

#[tokio::test]
async fn rumqttc_connects_with_mqtt_311_and_5_and_exchanges_messages() {
    let broker = Broker::start("");
    let mut v4 = V4Client::connect(broker.addr, "v4-client").await;
    let (mut v5, connack) = V5Client::connect(broker.addr, "v5-client").await;
    assert!(!connack.session_present);
    let props = connack.properties.expect("CONNACK properties");
    assert_eq!(props.receive_max, Some(1024));
    assert_eq!(props.max_packet_size, Some(1 << 20));
    v4.subscribe("from/v5").await;
    v5.subscribe("from/v4").await;
    v4.client
        .publish("from/v4", rumqttc::QoS::AtMostOnce, false, "hello 5")
        .await
        .unwrap();
    v5.client
        .publish(
            "from/v5",
            rumqttc::v5::mqttbytes::QoS::AtMostOnce,
            false,
            "hello 3.1.1",
        )
        .await
        .unwrap();
    assert_eq!(v5.publish_received().await.payload, "hello 5");
    assert_eq!(v4.publish_received().await.payload, "hello 3.1.1");
}

#[test]
fn keepalive_zero_means_no_keepalive() {
    let broker = Broker::start("");
    let mut raw = Raw::open(broker.addr, Protocol::V311);
    let mut connect = connect_packet(Protocol::V311, "lazy");
    connect.keep_alive = 0;
    raw.send(&Packet::Connect(Box::new(connect)));
    assert!(matches!(raw.recv(), Some(Packet::ConnAck(a)) if a.reason_code == ReasonCode::SUCCESS));
    // Well past 1.5 x any keep alive a timer could have been armed with.
    raw.expect_silence(Duration::from_secs(3));
    raw.send(&Packet::PingReq);
    assert_eq!(raw.recv(), Some(Packet::PingResp));
}

#[test]
fn keepalive_is_enforced_at_one_and_a_half_times() {
    let broker = Broker::start("");
    for protocol in [Protocol::V311, Protocol::V5] {
        let mut raw = Raw::open(broker.addr, protocol);
        let mut connect = connect_packet(protocol, "sleepy");
        connect.keep_alive = 2;
        raw.send(&Packet::Connect(Box::new(connect)));
        assert!(matches!(raw.recv(), Some(Packet::ConnAck(_))));
        let start = Instant::now();
        // A ping at 1 s keeps it alive past the first 3 s.
        raw.expect_silence(Duration::from_secs(1));
        raw.send(&Packet::PingReq);
        assert_eq!(raw.recv(), Some(Packet::PingResp));
        let packets = raw.until_closed();
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(3900),
            "closed after {elapsed:?}, before 1.5 x keep alive"
        );
        if protocol == Protocol::V5 {
            assert_eq!(
                packets,
                [Packet::Disconnect(Disconnect::new(
                    ReasonCode::KEEP_ALIVE_TIMEOUT
                ))]
            );
        } else {
            assert!(packets.is_empty());
        }
    }
}

#[test]
fn v5_keepalive_above_the_maximum_is_capped_with_server_keep_alive() {
    let broker = Broker::start("[limits]\nmax_keepalive_secs = 60");
    let mut raw = Raw::open(broker.addr, Protocol::V5);
    let mut connect = connect_packet(Protocol::V5, "slow-pinger");
    connect.keep_alive = 600;
    raw.send(&Packet::Connect(Box::new(connect)));
    match raw.recv() {
        Some(Packet::ConnAck(ack)) => assert_eq!(ack.properties.server_keep_alive, Some(60)),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

#[test]
fn wildcard_subscriptions_and_dollar_topics() {
    let broker = Broker::start("");
    let mut sub = Raw::connect(broker.addr, Protocol::V5, "sub");
    sub.send(&subscribe(&["a/+/c", "a/#", "#", "+/x", "$SYS/#"]));
    assert_eq!(expect_suback(&mut sub), [ReasonCode::GRANTED_QOS_0; 5]);
    let mut sub2 = Raw::connect(broker.addr, Protocol::V311, "sub2");
    sub2.send(&subscribe(&["+/b/+"]));
    expect_suback(&mut sub2);
    let mut publisher = Raw::connect(broker.addr, Protocol::V311, "pub");
    for topic in ["a/b/c", "$SYS/x", "z/x", "$SYS/broker/uptime", "last"] {
        publisher.send(&publish(topic, "m"));
    }
    // Overlapping subscriptions deliver once; `#` and `+/x` skip `$` topics.
    let got: Vec<String> = (0..5)
        .map(|_| expect_publish(&mut sub).topic.to_string())
        .collect();
    assert_eq!(
        got,
        ["a/b/c", "$SYS/x", "z/x", "$SYS/broker/uptime", "last"]
    );
    assert_eq!(expect_publish(&mut sub2).topic, "a/b/c");
    sub.expect_silence(Duration::from_millis(300));
    sub2.expect_silence(Duration::from_millis(300));
}

#[test]
fn dollar_topics_are_not_matched_by_leading_wildcards() {
    let broker = Broker::start("");
    let mut all = Raw::connect(broker.addr, Protocol::V311, "all");
    all.send(&subscribe(&["#", "+/uptime", "+/+/+"]));
    expect_suback(&mut all);
    let mut sys = Raw::connect(broker.addr, Protocol::V311, "sys");
    sys.send(&subscribe(&["$SYS/+/+"]));
    expect_suback(&mut sys);
    let mut publisher = Raw::connect(broker.addr, Protocol::V311, "pub");
    publisher.send(&publish("$SYS/broker/uptime", "1"));
    publisher.send(&publish("$other/uptime", "2"));
    publisher.send(&publish("plain/uptime", "3"));
    assert_eq!(expect_publish(&mut sys).topic, "$SYS/broker/uptime");
    assert_eq!(expect_publish(&mut all).topic, "plain/uptime");
    all.expect_silence(Duration::from_millis(300));
}

#[tokio::test]
async fn qos0_fans_out_to_every_subscriber_in_order() {
    let broker = Broker::start("");
    let mut subs = Vec::new();
    for i in 0..5 {
        let mut c = V4Client::connect(broker.addr, &format!("fan-{i}")).await;
        c.subscribe("fan/out").await;
        subs.push(c);
    }
    let (publisher, _connack) = V5Client::connect(broker.addr, "fan-pub").await;
    for n in 0..200 {
        publisher
            .client
            .publish(
                "fan/out",
                rumqttc::v5::mqttbytes::QoS::AtMostOnce,
                false,
                n.to_string(),
            )
            .await
            .unwrap();
    }
    for sub in &mut subs {
        for n in 0..200 {
            assert_eq!(sub.publish_received().await.payload, n.to_string());
        }
    }
}

#[test]
fn unsubscribe_stops_delivery_with_v5_reason_codes() {
    let broker = Broker::start("");
    let mut sub = Raw::connect(broker.addr, Protocol::V5, "unsub");
    sub.send(&subscribe(&["u/1", "u/2"]));
    expect_suback(&mut sub);
    sub.send(&Packet::Unsubscribe(Unsubscribe {
        packet_id: 2,
        filters: vec![s("u/1"), s("never/subscribed")],
        properties: Default::default(),
    }));
    match sub.recv() {
        Some(Packet::UnsubAck(ack)) => {
            assert_eq!(ack.packet_id, 2);
            assert_eq!(
                ack.reason_codes,
                [ReasonCode::SUCCESS, ReasonCode::NO_SUBSCRIPTION_EXISTED]
            );
        }
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    let mut publisher = Raw::connect(broker.addr, Protocol::V5, "pub");
    publisher.send(&publish("u/1", "gone"));
    publisher.send(&publish("u/2", "kept"));
    assert_eq!(expect_publish(&mut sub).payload, "kept");
}

#[test]
fn inbound_qos1_and_qos2_are_acknowledged_and_a_resent_qos2_is_delivered_once() {
    let broker = Broker::start("");
    let mut sub = Raw::connect(broker.addr, Protocol::V311, "q-sub");
    sub.send(&subscribe(&["q/#"]));
    expect_suback(&mut sub);
    let mut publisher = Raw::connect(broker.addr, Protocol::V5, "q-pub");
    let mut p1 = Publish {
        qos: QoS::AtLeastOnce,
        packet_id: 1,
        topic: s("q/1"),
        payload: Bytes::from_static(b"one"),
        ..Publish::default()
    };
    publisher.send(&Packet::Publish(p1.clone()));
    assert_eq!(publisher.recv(), Some(Packet::PubAck(PubAck::new(1))));
    let mut p2 = p1.clone();
    p2.qos = QoS::ExactlyOnce;
    p2.packet_id = 2;
    p2.topic = s("q/2");
    publisher.send(&Packet::Publish(p2.clone()));
    assert_eq!(publisher.recv(), Some(Packet::PubRec(PubAck::new(2))));
    // The client did not see the PUBREC (as if lost) and resends with DUP.
    p2.dup = true;
    publisher.send(&Packet::Publish(p2));
    assert_eq!(publisher.recv(), Some(Packet::PubRec(PubAck::new(2))));
    publisher.send(&Packet::PubRel(PubAck::new(2)));
    assert_eq!(publisher.recv(), Some(Packet::PubComp(PubAck::new(2))));
    // A PUBREL for an unknown id is answered with 0x92 in 5.0.
    publisher.send(&Packet::PubRel(PubAck::new(9)));
    let mut not_found = PubAck::new(9);
    not_found.reason_code = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
    assert_eq!(publisher.recv(), Some(Packet::PubComp(not_found)));
    // No subscriber: 5.0 says so in the PUBACK.
    p1.topic = s("nobody/listens");
    p1.packet_id = 3;
    publisher.send(&Packet::Publish(p1));
    let mut none = PubAck::new(3);
    none.reason_code = ReasonCode::NO_MATCHING_SUBSCRIBERS;
    assert_eq!(publisher.recv(), Some(Packet::PubAck(none)));
    // The subscriber got each message once, at its granted QoS 0.
    let first = expect_publish(&mut sub);
    assert_eq!((first.topic.as_str(), first.qos), ("q/1", QoS::AtMostOnce));
    assert_eq!(expect_publish(&mut sub).topic, "q/2");
    sub.expect_silence(Duration::from_millis(300));
}

#[test]
fn no_local_subscriptions_skip_the_publisher() {
    let broker = Broker::start("");
    let mut both = Raw::connect(broker.addr, Protocol::V5, "nl");
    both.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        subscriptions: vec![Subscription {
            filter: s("chat"),
            options: SubscriptionOptions {
                no_local: true,
                ..SubscriptionOptions::default()
            },
        }],
        properties: Default::default(),
    }));
    expect_suback(&mut both);
    let mut other = Raw::connect(broker.addr, Protocol::V5, "other");
    both.send(&publish("chat", "mine"));
    other.send(&publish("chat", "theirs"));
    assert_eq!(expect_publish(&mut both).payload, "theirs");
    both.expect_silence(Duration::from_millis(300));
}

fn connect_with_will(addr: std::net::SocketAddr, protocol: Protocol, id: &str) -> Raw {
    let mut raw = Raw::open(addr, protocol);
    let mut connect = connect_packet(protocol, id);
    connect.will = Some(Will {
        topic: s(&format!("will/{id}")),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: WillProperties::default(),
    });
    raw.send(&Packet::Connect(Box::new(connect)));
    assert!(matches!(raw.recv(), Some(Packet::ConnAck(_))));
    raw
}

#[test]
fn will_is_published_on_socket_drop_and_protocol_error_but_not_on_disconnect() {
    let broker = Broker::start("");
    let mut watcher = Raw::connect(broker.addr, Protocol::V311, "watcher");
    watcher.send(&subscribe(&["will/#"]));
    expect_suback(&mut watcher);

    let polite = connect_with_will(broker.addr, Protocol::V311, "polite");
    let mut polite = polite;
    polite.send(&Packet::Disconnect(Disconnect::default()));
    drop(polite);
    let dropped = connect_with_will(broker.addr, Protocol::V311, "dropped");
    drop(dropped);
    let mut broken = connect_with_will(broker.addr, Protocol::V5, "broken");
    broken.send_bytes(&[0x00, 0x00]);
    let mut v5_with_will = connect_with_will(broker.addr, Protocol::V5, "asked");
    v5_with_will.send(&Packet::Disconnect(Disconnect::new(
        ReasonCode::DISCONNECT_WITH_WILL_MESSAGE,
    )));

    let mut topics: Vec<String> = (0..3)
        .map(|_| expect_publish(&mut watcher).topic.to_string())
        .collect();
    topics.sort();
    assert_eq!(topics, ["will/asked", "will/broken", "will/dropped"]);
    watcher.expect_silence(Duration::from_millis(300));
}

#[test]
fn a_second_connection_with_the_same_client_id_takes_over() {
    let broker = Broker::start("");
    let mut first = Raw::connect(broker.addr, Protocol::V5, "twin");
    let mut second = Raw::connect(broker.addr, Protocol::V5, "twin");
    assert_eq!(
        first.until_closed(),
        [Packet::Disconnect(Disconnect::new(
            ReasonCode::SESSION_TAKEN_OVER
        ))]
    );
    second.send(&Packet::PingReq);
    assert_eq!(second.recv(), Some(Packet::PingResp));
}

#[test]
fn empty_client_ids_are_assigned_or_refused_per_version() {
    let broker = Broker::start("");
    let mut v5 = Raw::open(broker.addr, Protocol::V5);
    v5.send(&Packet::Connect(Box::new(connect_packet(Protocol::V5, ""))));
    match v5.recv() {
        Some(Packet::ConnAck(ack)) => {
            let id = ack
                .properties
                .assigned_client_identifier
                .expect("assigned id");
            assert!(id.starts_with("ferrymq-"), "{id}");
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    let mut v3 = Raw::open(broker.addr, Protocol::V311);
    let mut connect = connect_packet(Protocol::V311, "");
    connect.clean_start = false;
    v3.send(&Packet::Connect(Box::new(connect)));
    assert_eq!(
        v3.until_closed(),
        [Packet::ConnAck(Box::new(ConnAck {
            reason_code: ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
            ..ConnAck::default()
        }))]
    );
}

#[test]
fn unsupported_protocol_levels_get_connack_0x01() {
    let broker = Broker::start("");
    let mut raw = Raw::open(broker.addr, Protocol::V311);
    // MQTT 3.1 ("MQIsdp", level 3).
    raw.send_bytes(&[
        0x10, 14, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 2, 0, 60, 0, 0,
    ]);
    let mut raw_bytes = [0u8; 8];
    use std::io::Read;
    let n = raw.stream.read(&mut raw_bytes).expect("read");
    assert_eq!(&raw_bytes[..n], &[0x20, 2, 0, 1]);
    assert_eq!(raw.until_closed(), []);
}

#[test]
fn anonymous_clients_are_refused_when_allow_anonymous_is_false() {
    let broker = Broker::start("[auth]\nallow_anonymous = false");
    for (protocol, code) in [
        (Protocol::V311, ReasonCode::NOT_AUTHORIZED),
        (Protocol::V5, ReasonCode::NOT_AUTHORIZED),
    ] {
        let mut raw = Raw::open(broker.addr, protocol);
        raw.send(&Packet::Connect(Box::new(connect_packet(protocol, "anon"))));
        match raw.until_closed().as_slice() {
            [Packet::ConnAck(ack)] => assert_eq!(ack.reason_code, code),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}

#[test]
fn v5_unsupported_authentication_method_is_refused_with_0x8c() {
    let broker = Broker::start("");
    let mut raw = Raw::open(broker.addr, Protocol::V5);
    let mut connect = connect_packet(Protocol::V5, "scram");
    connect.properties.authentication_method = Some(s("SCRAM-SHA-256"));
    raw.send(&Packet::Connect(Box::new(connect)));
    match raw.until_closed().as_slice() {
        [Packet::ConnAck(ack)] => {
            assert_eq!(ack.reason_code, ReasonCode::BAD_AUTHENTICATION_METHOD)
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn max_connections_closes_the_connection_beyond_the_limit() {
    let broker = Broker::start("[limits]\nmax_connections = 2");
    let mut a = Raw::connect(broker.addr, Protocol::V311, "a");
    let _b = Raw::connect(broker.addr, Protocol::V311, "b");
    let mut c = Raw::open(broker.addr, Protocol::V311);
    c.send(&Packet::Connect(Box::new(connect_packet(
        Protocol::V311,
        "c",
    ))));
    assert_eq!(c.until_closed(), []);
    // The first two are unaffected, and a slot frees up when one leaves.
    a.send(&Packet::PingReq);
    assert_eq!(a.recv(), Some(Packet::PingResp));
    a.send(&Packet::Disconnect(Disconnect::default()));
    assert_eq!(a.until_closed(), []);
    let deadline = Instant::now() + WAIT;
    loop {
        let mut d = Raw::open(broker.addr, Protocol::V311);
        d.send(&Packet::Connect(Box::new(connect_packet(
            Protocol::V311,
            "d",
        ))));
        if let Some(Packet::ConnAck(_)) = d.recv() {
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigterm_disconnects_clients_with_0x8b_and_exits_cleanly() {
    let broker = Broker::start("");
    let mut v5 = Raw::connect(broker.addr, Protocol::V5, "stay");
    let mut v3 = Raw::connect(broker.addr, Protocol::V311, "stay3");
    let status = broker.terminate();
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(
        v5.until_closed(),
        [Packet::Disconnect(Disconnect::new(
            ReasonCode::SERVER_SHUTTING_DOWN
        ))]
    );
    assert_eq!(v3.until_closed(), []);
}

/// `ListenOverflows` + `ListenDrops` of this network namespace
/// (`/proc/net/netstat`, TcpExt).
fn listen_queue_drops() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .filter(|(name, _)| matches!(*name, "ListenOverflows" | "ListenDrops"))
        .map(|(_, v)| v.parse::<u64>().unwrap())
        .sum()
}

/// The soft limit on open files of this process.
fn open_files_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Regression for "connect bursts overflow a 128-entry listen queue": a
/// fleet reconnecting at once is 5,000 connection attempts in a burst.
#[test]
fn a_burst_of_5000_connections_overflows_no_listen_queue_and_all_are_connacked() {
    const BURST: usize = 5_000;
    if open_files_limit() < BURST as u64 + 500 {
        eprintln!(
            "skipped: this process may open only {} files, the burst needs {}",
            open_files_limit(),
            BURST + 500
        );
        return;
    }
    let broker = Broker::start("[limits]\nconnect_timeout_secs = 60");
    let before = listen_queue_drops();
    let mut streams: Vec<std::net::TcpStream> = (0..BURST)
        .map(|_| std::net::TcpStream::connect(broker.addr).unwrap())
        .collect();
    let after_connects = listen_queue_drops();
    let mut raws: Vec<Raw> = streams
        .drain(..)
        .enumerate()
        .map(|(i, stream)| {
            let mut raw = Raw::over(stream, Protocol::V311);
            raw.send(&Packet::Connect(Box::new(connect_packet(
                Protocol::V311,
                &format!("fleet-{i}"),
            ))));
            raw
        })
        .collect();
    for raw in &mut raws {
        match raw.recv_within(Duration::from_secs(60)) {
            Some(Packet::ConnAck(ack)) => assert_eq!(ack.reason_code, ReasonCode::SUCCESS),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }
    assert_eq!(
        after_connects - before,
        0,
        "the kernel dropped or overflowed the listen queue"
    );
}
