//! Bad input closes only the offending connection, with the MQTT 5.0
//! reason code where one exists, while other clients keep publishing and
//! receiving.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use ferrymq_codec::{
    ConnAck, Packet, Protocol, Publish, ReasonCode, Subscribe, Subscription, SubscriptionOptions,
};

/// A subscriber and a publisher that must keep working whatever the
/// offender does.
struct Bystanders {
    sub: Raw,
    publisher: Raw,
    sent: u32,
}

impl Bystanders {
    fn new(broker: &Broker) -> Bystanders {
        let mut sub = Raw::connect(broker.addr, Protocol::V5, "bystander-sub");
        sub.send(&Packet::Subscribe(Subscribe {
            packet_id: 1,
            subscriptions: vec![Subscription {
                filter: s("healthy/#"),
                options: SubscriptionOptions::default(),
            }],
            properties: Default::default(),
        }));
        assert!(matches!(sub.recv(), Some(Packet::SubAck(_))));
        let publisher = Raw::connect(broker.addr, Protocol::V311, "bystander-pub");
        let mut b = Bystanders {
            sub,
            publisher,
            sent: 0,
        };
        b.still_work();
        b
    }

    /// One message goes from the publisher to the subscriber.
    fn still_work(&mut self) {
        self.sent += 1;
        let payload = Bytes::from(self.sent.to_string());
        self.publisher.send(&Packet::Publish(Publish {
            topic: s("healthy/check"),
            payload: payload.clone(),
            ..Publish::default()
        }));
        match self.sub.recv() {
            Some(Packet::Publish(p)) => assert_eq!(p.payload, payload),
            other => panic!("bystander got {other:?}"),
        }
    }
}

/// The reason codes of what the broker sent before closing (5.0 DISCONNECT
/// packets carry a reason string too; the code is what the spec fixes).
fn disconnect(code: ReasonCode) -> Vec<ReasonCode> {
    vec![code]
}

fn reasons(packets: Vec<Packet>) -> Vec<ReasonCode> {
    packets
        .into_iter()
        .map(|p| match p {
            Packet::Disconnect(d) => {
                assert!(
                    d.properties.reason_string.is_some(),
                    "no reason string in {d:?}"
                );
                d.reason_code
            }
            other => panic!("expected DISCONNECT, got {other:?}"),
        })
        .collect()
}

#[test]
fn garbage_bytes_close_only_that_connection() {
    // Some junk looks like the start of a long CONNECT: it waits for the
    // connect timeout, kept short here.
    let broker = Broker::start("[limits]\nconnect_timeout_secs = 1");
    let mut ok = Bystanders::new(&broker);
    // Before CONNECT: closed without a word.
    let mut http = Raw::open(broker.addr, Protocol::V311);
    http.send_bytes(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(http.until_closed(), []);
    ok.still_work();
    // After CONNECT: a five-byte remaining length is a Malformed Packet.
    let mut v5 = Raw::connect(broker.addr, Protocol::V5, "garbage-5");
    v5.send_bytes(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]);
    assert_eq!(
        reasons(v5.until_closed()),
        disconnect(ReasonCode::MALFORMED_PACKET)
    );
    let mut v3 = Raw::connect(broker.addr, Protocol::V311, "garbage-3");
    v3.send_bytes(&[0x00, 0x00]);
    assert_eq!(v3.until_closed(), []);
    ok.still_work();
    // Many at once.
    let mut crowd: Vec<Raw> = (0..20)
        .map(|_| Raw::open(broker.addr, Protocol::V311))
        .collect();
    for (i, raw) in crowd.iter_mut().enumerate() {
        let junk: Vec<u8> = (0..64).map(|j| ((i * 31 + j * 17) % 251) as u8).collect();
        raw.send_bytes(&junk);
    }
    ok.still_work();
    for raw in &mut crowd {
        raw.until_closed();
    }
    ok.still_work();
}

#[test]
fn a_connect_that_never_comes_times_out() {
    let broker = Broker::start("[limits]\nconnect_timeout_secs = 1");
    let mut ok = Bystanders::new(&broker);
    let start = Instant::now();
    let mut silent = Raw::open(broker.addr, Protocol::V311);
    let mut partial = Raw::open(broker.addr, Protocol::V311);
    partial.send_bytes(&[0x10, 20, 0, 4, b'M', b'Q']);
    ok.still_work();
    assert_eq!(silent.until_closed(), []);
    assert_eq!(partial.until_closed(), []);
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900),
        "closed after {elapsed:?}"
    );
    ok.still_work();
}

#[test]
fn a_packet_before_connect_closes_the_connection() {
    let broker = Broker::start("");
    let mut ok = Bystanders::new(&broker);
    let mut raw = Raw::open(broker.addr, Protocol::V311);
    raw.send(&Packet::PingReq);
    assert_eq!(raw.until_closed(), []);
    ok.still_work();
}

#[test]
fn a_second_connect_is_a_protocol_error() {
    let broker = Broker::start("");
    let mut ok = Bystanders::new(&broker);
    let mut v5 = Raw::connect(broker.addr, Protocol::V5, "twice-5");
    v5.send(&Packet::Connect(Box::new(connect_packet(
        Protocol::V5,
        "twice-5",
    ))));
    assert_eq!(
        reasons(v5.until_closed()),
        disconnect(ReasonCode::PROTOCOL_ERROR)
    );
    let mut v3 = Raw::connect(broker.addr, Protocol::V311, "twice-3");
    v3.send(&Packet::Connect(Box::new(connect_packet(
        Protocol::V311,
        "twice-3",
    ))));
    assert_eq!(v3.until_closed(), []);
    ok.still_work();
}

#[test]
fn an_oversize_packet_is_refused_from_its_header() {
    let broker = Broker::start("[limits]\nmax_packet_size = 1024");
    let mut ok = Bystanders::new(&broker);
    let big = Packet::Publish(Publish {
        topic: s("healthy/big"),
        payload: Bytes::from(vec![b'x'; 2000]),
        ..Publish::default()
    });
    let mut v5 = Raw::connect(broker.addr, Protocol::V5, "big-5");
    // Only the header: the broker must not wait for the body to refuse it.
    let mut wire = bytes::BytesMut::new();
    big.encode(Protocol::V5, &mut wire).unwrap();
    v5.send_bytes(&wire[..5]);
    assert_eq!(
        reasons(v5.until_closed()),
        disconnect(ReasonCode::PACKET_TOO_LARGE)
    );
    let mut v3 = Raw::connect(broker.addr, Protocol::V311, "big-3");
    v3.send(&big);
    assert_eq!(v3.until_closed(), []);
    ok.still_work();
    // An oversize CONNECT from a 5.0 client gets a CONNACK saying so.
    let mut connect = connect_packet(Protocol::V5, "big-connect");
    connect.password = Some(Bytes::from(vec![0; 2000]));
    let mut raw = Raw::open(broker.addr, Protocol::V5);
    raw.send(&Packet::Connect(Box::new(connect)));
    assert_eq!(
        raw.until_closed(),
        [Packet::ConnAck(Box::new(ConnAck {
            reason_code: ReasonCode::PACKET_TOO_LARGE,
            ..ConnAck::default()
        }))]
    );
    ok.still_work();
}

#[test]
fn an_invalid_topic_filter_closes_with_0x8f() {
    let broker = Broker::start("");
    let mut ok = Bystanders::new(&broker);
    // SUBSCRIBE "a/#/b" (the codec refuses to build it, so bytes by hand).
    let body = |props: &[u8]| {
        let mut b = vec![0, 7];
        b.extend_from_slice(props);
        b.extend_from_slice(&[0, 5, b'a', b'/', b'#', b'/', b'b', 0]);
        let mut p = vec![0x82, b.len() as u8];
        p.extend(b);
        p
    };
    let mut v5 = Raw::connect(broker.addr, Protocol::V5, "filter-5");
    v5.send_bytes(&body(&[0]));
    assert_eq!(
        reasons(v5.until_closed()),
        disconnect(ReasonCode::TOPIC_FILTER_INVALID)
    );
    let mut v3 = Raw::connect(broker.addr, Protocol::V311, "filter-3");
    v3.send_bytes(&body(&[]));
    assert_eq!(v3.until_closed(), []);
    ok.still_work();
}

#[test]
fn invalid_utf8_and_wildcard_topic_names_close_with_their_codes() {
    let broker = Broker::start("");
    let mut ok = Bystanders::new(&broker);
    let mut utf8 = Raw::connect(broker.addr, Protocol::V5, "utf8");
    utf8.send_bytes(&[0x30, 5, 0, 2, 0xC3, 0x28, 0]);
    assert_eq!(
        reasons(utf8.until_closed()),
        disconnect(ReasonCode::MALFORMED_PACKET)
    );
    let mut wildcard = Raw::connect(broker.addr, Protocol::V5, "wild");
    wildcard.send_bytes(&[0x30, 6, 0, 3, b'a', b'/', b'+', 0]);
    assert_eq!(
        reasons(wildcard.until_closed()),
        disconnect(ReasonCode::TOPIC_NAME_INVALID)
    );
    ok.still_work();
}

#[test]
fn a_malformed_v5_connect_gets_a_connack_with_the_reason() {
    let broker = Broker::start("");
    let mut ok = Bystanders::new(&broker);
    // Session Expiry Interval twice: a Protocol Error.
    let mut raw = Raw::open(broker.addr, Protocol::V5);
    raw.send_bytes(&[
        0x10, 23, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 30, 10, 0x11, 0, 0, 0, 1, 0x11, 0, 0, 0,
        2, 0, 0,
    ]);
    assert_eq!(
        raw.until_closed(),
        [Packet::ConnAck(Box::new(ConnAck {
            reason_code: ReasonCode::PROTOCOL_ERROR,
            ..ConnAck::default()
        }))]
    );
    ok.still_work();
}

#[test]
fn server_only_packets_from_a_client_are_protocol_errors() {
    let broker = Broker::start("");
    let mut ok = Bystanders::new(&broker);
    let mut raw = Raw::connect(broker.addr, Protocol::V5, "confused");
    raw.send(&Packet::PingResp);
    assert_eq!(
        reasons(raw.until_closed()),
        disconnect(ReasonCode::PROTOCOL_ERROR)
    );
    let mut sub_id = Raw::connect(broker.addr, Protocol::V5, "sub-id");
    let mut publish = Publish {
        topic: s("healthy/x"),
        ..Publish::default()
    };
    publish.properties.subscription_identifiers = vec![1];
    sub_id.send(&Packet::Publish(publish));
    assert_eq!(
        reasons(sub_id.until_closed()),
        disconnect(ReasonCode::PROTOCOL_ERROR)
    );
    ok.still_work();
}

/// `a/a/.../a`, `levels` levels.
fn deep_topic(levels: usize) -> String {
    vec!["a"; levels].join("/")
}

/// `+/+/.../+/#`: matches every topic of at least `plus` levels.
fn deep_wildcard(plus: usize) -> String {
    format!("{}#", "+/".repeat(plus))
}

fn subscribe_packet(packet_id: u16, filter: &str) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id,
        subscriptions: vec![Subscription {
            filter: s(filter),
            options: SubscriptionOptions::default(),
        }],
        properties: Default::default(),
    })
}

fn publish_packet(topic: &str, qos: ferrymq_codec::QoS, retain: bool) -> Packet {
    Packet::Publish(Publish {
        topic: s(topic),
        qos,
        retain,
        packet_id: u16::from(qos != ferrymq_codec::QoS::AtMostOnce),
        payload: Bytes::from_static(b"deep"),
        ..Publish::default()
    })
}

fn suback_codes(packet: Option<Packet>) -> Vec<ReasonCode> {
    match packet {
        Some(Packet::SubAck(ack)) => ack.reason_codes,
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

/// The deep pairs of issue "any client can crash the broker for good": a
/// 20,000-level topic (the crash began near 14,600 levels on 2 MiB worker
/// stacks), and the deepest topic MQTT can carry, 65,535 separators, with
/// a wildcard filter as long as a string allows. (100,000 levels cannot be
/// sent: an MQTT topic has at most 65,535 bytes; the router and retained
/// set are walked at 100,000 levels by the broker's small-stack tests.)
fn deep_pairs() -> [(String, String); 2] {
    [
        (deep_topic(20_000), deep_wildcard(19_999)),
        ("/".repeat(65_535), deep_wildcard(32_767)),
    ]
}

/// Publishes each deep topic retained (unless `stored`: they are already),
/// subscribes with its deep wildcard and with the topic itself, and checks
/// that exactly the retained messages each filter matches come back.
fn retained_deep_then_deep_wildcard(broker: &Broker, ok: &mut Bystanders, stored: bool) {
    let mut attacker = Raw::connect(broker.addr, Protocol::V5, "deep-attacker");
    let pairs = deep_pairs();
    let mut retained: Vec<&str> = Vec::new();
    if stored {
        retained.extend(pairs.iter().map(|(t, _)| t.as_str()));
    }
    for (topic, filter) in &pairs {
        if !stored {
            attacker.send(&publish_packet(
                topic,
                ferrymq_codec::QoS::AtLeastOnce,
                true,
            ));
            match attacker.recv() {
                Some(Packet::PubAck(ack)) => assert!(!ack.reason_code.is_error(), "{ack:?}"),
                other => panic!("expected PUBACK, got {other:?}"),
            }
            retained.push(topic);
        }
        for (id, f) in [(2, filter), (3, topic)] {
            attacker.send(&subscribe_packet(id, f));
            assert_eq!(suback_codes(attacker.recv()), [ReasonCode::SUCCESS]);
            let mut expected: Vec<&str> = retained
                .iter()
                .copied()
                .filter(|t| ferrymq_codec::topic::matches(f, t))
                .collect();
            let mut got: Vec<String> = expected
                .iter()
                .map(|_| match attacker.recv() {
                    Some(Packet::Publish(p)) => {
                        assert!(p.retain);
                        p.topic.to_string()
                    }
                    other => panic!("expected a retained message, got {other:?}"),
                })
                .collect();
            expected.sort_unstable();
            got.sort_unstable();
            assert_eq!(
                got,
                expected,
                "retained messages for a {}-byte filter",
                f.len()
            );
        }
        attacker.send(&Packet::Unsubscribe(ferrymq_codec::Unsubscribe {
            packet_id: 4,
            filters: vec![s(filter), s(topic)],
            properties: Default::default(),
        }));
        match attacker.recv() {
            Some(Packet::UnsubAck(ack)) => {
                assert_eq!(ack.reason_codes, [ReasonCode::SUCCESS, ReasonCode::SUCCESS])
            }
            other => panic!("expected UNSUBACK, got {other:?}"),
        }
        ok.still_work();
    }
}

#[test]
fn a_retained_deep_topic_then_a_deep_wildcard_subscription_no_longer_crashes_the_broker() {
    let data = tempfile::tempdir().unwrap();
    let no_limit = "[limits]\nmax_topic_levels = 0";
    let broker = Broker::start_at(data.path(), no_limit);
    let mut ok = Bystanders::new(&broker);
    retained_deep_then_deep_wildcard(&broker, &mut ok, false);
    assert!(broker.terminate().success());

    // The retained messages come back at start and are walked again.
    let broker = Broker::start_at(data.path(), no_limit);
    let mut ok = Bystanders::new(&broker);
    retained_deep_then_deep_wildcard(&broker, &mut ok, true);
    assert!(broker.terminate().success());

    // With the limit (the default, 200), the stored deep retained messages
    // are skipped at start, counted, reported by `queue stats`, kept on disk.
    let broker = Broker::start_at(data.path(), "");
    broker.wait_for_log("skipped stored retained messages", WAIT);
    assert!(broker.log().contains("records=2"), "{}", broker.log());
    let stats = std::process::Command::new(binary())
        .args(["queue", "stats", "--config"])
        .arg(broker.dir.path().join("ferrymq.toml"))
        .output()
        .unwrap();
    let stats = String::from_utf8_lossy(&stats.stdout);
    assert!(stats.contains("2 retained messages"), "{stats}");
    assert!(
        stats.contains("2 retained messages or subscriptions have more topic levels"),
        "{stats}"
    );
    let mut ok = Bystanders::new(&broker);
    let mut attacker = Raw::connect(broker.addr, Protocol::V5, "deep-attacker");
    attacker.send(&subscribe_packet(1, "+/#"));
    assert_eq!(suback_codes(attacker.recv()), [ReasonCode::SUCCESS]);
    attacker.expect_silence(Duration::from_millis(300));
    ok.still_work();
}

#[test]
fn topics_over_max_topic_levels_are_refused_with_their_reason_codes() {
    let broker = Broker::start("[limits]\nmax_topic_levels = 8");
    let mut ok = Bystanders::new(&broker);
    let nine = deep_topic(9);
    let (topic, filter) = deep_pairs().into_iter().next().unwrap();
    // 5.0: SUBACK 0x8F for that filter only, PUBACK / PUBREC 0x90, a
    // QoS 0 publish dropped, UNSUBACK 0x8F; the connection stays.
    let mut v5 = Raw::connect(broker.addr, Protocol::V5, "deep-5");
    v5.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        subscriptions: [filter.as_str(), "a/#", "+/+/+/+/+/+/+/+/#"]
            .into_iter()
            .map(|f| Subscription {
                filter: s(f),
                options: SubscriptionOptions::default(),
            })
            .collect(),
        properties: Default::default(),
    }));
    assert_eq!(
        suback_codes(v5.recv()),
        [
            ReasonCode::TOPIC_FILTER_INVALID,
            ReasonCode::SUCCESS,
            ReasonCode::TOPIC_FILTER_INVALID
        ]
    );
    for (qos, is_rec) in [
        (ferrymq_codec::QoS::AtLeastOnce, false),
        (ferrymq_codec::QoS::ExactlyOnce, true),
    ] {
        v5.send(&publish_packet(&topic, qos, true));
        match v5.recv() {
            Some(Packet::PubAck(ack)) if !is_rec => {
                assert_eq!(ack.reason_code, ReasonCode::TOPIC_NAME_INVALID)
            }
            Some(Packet::PubRec(ack)) if is_rec => {
                assert_eq!(ack.reason_code, ReasonCode::TOPIC_NAME_INVALID)
            }
            other => panic!("expected a 0x90 acknowledgement, got {other:?}"),
        }
    }
    v5.send(&publish_packet(
        &nine,
        ferrymq_codec::QoS::AtMostOnce,
        false,
    ));
    v5.send(&Packet::Unsubscribe(ferrymq_codec::Unsubscribe {
        packet_id: 2,
        filters: vec![s(&nine), s("a/#")],
        properties: Default::default(),
    }));
    match v5.recv() {
        Some(Packet::UnsubAck(ack)) => assert_eq!(
            ack.reason_codes,
            [ReasonCode::TOPIC_FILTER_INVALID, ReasonCode::SUCCESS]
        ),
        other => panic!("expected UNSUBACK (the QoS 0 publish sent nothing), got {other:?}"),
    }
    // Eight levels are fine.
    v5.send(&publish_packet(
        &deep_topic(8),
        ferrymq_codec::QoS::AtLeastOnce,
        false,
    ));
    match v5.recv() {
        Some(Packet::PubAck(ack)) => assert!(!ack.reason_code.is_error(), "{ack:?}"),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    ok.still_work();

    // 3.1.1: SUBACK 0x80 for that filter; a deep PUBLISH closes the
    // connection (3.1.1 has no way to refuse one).
    let mut v3 = Raw::connect(broker.addr, Protocol::V311, "deep-3");
    v3.send(&subscribe_packet(1, &nine));
    assert_eq!(suback_codes(v3.recv()), [ReasonCode(0x80)]);
    v3.send(&publish_packet(
        &nine,
        ferrymq_codec::QoS::AtLeastOnce,
        false,
    ));
    assert_eq!(v3.until_closed(), []);
    ok.still_work();

    // A deep will: refused at CONNECT (5.0 0x90, 3.1.1 "not authorized").
    for (protocol, code) in [(Protocol::V5, 0x90), (Protocol::V311, 0x87)] {
        let mut c = connect_packet(protocol, "deep-will");
        c.will = Some(ferrymq_codec::Will {
            topic: s(&nine),
            payload: Bytes::from_static(b"gone"),
            qos: ferrymq_codec::QoS::AtMostOnce,
            retain: true,
            properties: Default::default(),
        });
        let mut raw = Raw::open(broker.addr, protocol);
        raw.send(&Packet::Connect(Box::new(c)));
        match raw.until_closed().as_slice() {
            [Packet::ConnAck(ack)] => assert_eq!(ack.reason_code.0, code, "{protocol:?}"),
            other => panic!("expected a refusing CONNACK, got {other:?}"),
        }
    }
    ok.still_work();
    broker.wait_for_log("more levels than limits.max_topic_levels", WAIT);
}

/// Regression (seen as EPIPE / ECONNRESET in a Python client): after a
/// DISCONNECT with a reason code the broker closed its socket while the
/// client was still writing, so the close was a reset and the client's
/// kernel threw away the DISCONNECT it had not read yet. Now the broker
/// shuts its write side and reads (and discards) until the client closes,
/// for a second at most.
#[test]
fn a_client_still_writing_reads_the_disconnect_that_closed_it() {
    let broker = Broker::start("[limits]\nreceive_maximum = 2");
    let mut ok = Bystanders::new(&broker);
    let mut eager = Raw::connect(broker.addr, Protocol::V5, "eager");
    let publish = |id: u16| {
        Packet::Publish(Publish {
            topic: s("eager/t"),
            qos: ferrymq_codec::QoS::AtLeastOnce,
            packet_id: id,
            payload: Bytes::from(vec![b'p'; 4096]),
            ..Publish::default()
        })
    };
    // More than Receive Maximum at once, then it keeps writing for a while
    // without reading, as a client that has not noticed yet.
    let mut out = bytes::BytesMut::new();
    for id in 1..=50 {
        publish(id).encode(Protocol::V5, &mut out).unwrap();
    }
    eager.send_bytes(&out);
    // By now the broker has sent its DISCONNECT and closed. The client's
    // writes still succeed (the broker reads and discards them): a reset
    // would make them fail with EPIPE / ECONNRESET, and a client such as
    // paho stops there, never reading the DISCONNECT.
    std::thread::sleep(Duration::from_millis(100));
    for id in 51..=70 {
        let mut more = bytes::BytesMut::new();
        publish(id).encode(Protocol::V5, &mut more).unwrap();
        if let Err(e) = std::io::Write::write_all(&mut eager.stream, &more) {
            panic!("write {id} after the DISCONNECT failed: {e}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let got = eager.until_closed();
    match got.last() {
        Some(Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, ReasonCode::RECEIVE_MAXIMUM_EXCEEDED)
        }
        other => panic!(
            "the DISCONNECT was lost: last packet {other:?} of {}",
            got.len()
        ),
    }
    ok.still_work();
}

/// A TCP connection to `addr` from the loopback source address `from`
/// (all of 127.0.0.0/8 is this machine).
fn connect_from(from: [u8; 4], addr: std::net::SocketAddr) -> std::net::TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&std::net::SocketAddr::from((from, 0)).into())
        .unwrap();
    socket.connect(&addr.into()).unwrap();
    socket.into()
}

#[test]
fn connections_beyond_the_per_address_limit_are_closed_while_other_addresses_go_on() {
    let broker = Broker::start("[limits]\nmax_connections_per_address = 20");
    // 20 from one address are served...
    let mut crowd: Vec<Raw> = (0..20)
        .map(|i| {
            let mut raw = Raw::over(connect_from([127, 0, 0, 1], broker.addr), Protocol::V311);
            raw.send(&Packet::Connect(Box::new(connect_packet(
                Protocol::V311,
                &format!("crowd-{i}"),
            ))));
            assert!(matches!(raw.recv(), Some(Packet::ConnAck(_))), "{i}");
            raw
        })
        .collect();
    // Another address is not affected: it exchanges messages...
    let mut other = Raw::over(connect_from([127, 0, 0, 2], broker.addr), Protocol::V5);
    other.send(&Packet::Connect(Box::new(connect_packet(
        Protocol::V5,
        "other",
    ))));
    assert!(matches!(other.recv(), Some(Packet::ConnAck(_))));
    other.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        subscriptions: vec![Subscription {
            filter: s("o/#"),
            options: SubscriptionOptions::default(),
        }],
        properties: Default::default(),
    }));
    assert!(matches!(other.recv(), Some(Packet::SubAck(_))));
    // ... while 1,000 more connections from the crowd's address are
    // closed at once, unanswered.
    let addr = broker.addr;
    let flood = std::thread::spawn(move || {
        for i in 0..1000 {
            let mut extra = Raw::over(connect_from([127, 0, 0, 1], addr), Protocol::V311);
            assert_eq!(extra.until_closed(), [], "connection {i} beyond the limit");
        }
    });
    let mut n = 0;
    while !flood.is_finished() || n < 10 {
        let payload = format!("hi {n}");
        crowd[0].send(&Packet::Publish(Publish {
            topic: s("o/x"),
            payload: Bytes::from(payload.clone()),
            ..Publish::default()
        }));
        assert!(
            matches!(other.recv(), Some(Packet::Publish(p)) if p.payload == payload),
            "message {n} during the flood"
        );
        n += 1;
    }
    flood.join().unwrap();
    // A slot given back is taken again.
    drop(crowd.pop());
    let deadline = Instant::now() + WAIT;
    loop {
        let mut again = Raw::over(connect_from([127, 0, 0, 1], broker.addr), Protocol::V311);
        again.send(&Packet::Connect(Box::new(connect_packet(
            Protocol::V311,
            "again",
        ))));
        if matches!(again.recv(), Some(Packet::ConnAck(_))) {
            break;
        }
        assert!(Instant::now() < deadline, "the freed slot never came back");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn subscriptions_beyond_the_per_client_quota_are_refused_in_both_versions() {
    let broker = Broker::start("[limits]\nmax_subscriptions_per_client = 3");
    for (protocol, refused) in [
        (Protocol::V5, ReasonCode::QUOTA_EXCEEDED),
        (Protocol::V311, ReasonCode(0x80)),
    ] {
        let mut c = Raw::connect(broker.addr, protocol, &format!("quota-{protocol:?}"));
        for (id, filter) in [(1, "a"), (2, "b/+"), (3, "$share/g/c")] {
            c.send(&subscribe_packet(id, filter));
            assert_eq!(suback_codes(c.recv()), [ReasonCode(0)], "{filter}");
        }
        // A fourth filter is refused; the same one again is granted.
        c.send(&subscribe_packet(4, "d"));
        assert_eq!(suback_codes(c.recv()), [refused], "{protocol:?}");
        c.send(&subscribe_packet(5, "b/+"));
        assert_eq!(suback_codes(c.recv()), [ReasonCode(0)]);
        // One given up makes room.
        c.send(&Packet::Unsubscribe(ferrymq_codec::Unsubscribe {
            packet_id: 6,
            filters: vec![s("a")],
            properties: Default::default(),
        }));
        assert!(matches!(c.recv(), Some(Packet::UnsubAck(_))));
        c.send(&subscribe_packet(7, "d"));
        assert_eq!(suback_codes(c.recv()), [ReasonCode(0)]);
    }
}

#[test]
fn a_client_over_its_publish_rate_is_slowed_and_others_are_not() {
    let broker = Broker::start("[limits]\nmax_publish_rate = 20");
    let mut fast = Raw::connect(broker.addr, Protocol::V5, "fast");
    let mut other = Raw::connect(broker.addr, Protocol::V311, "other");
    // 100 QoS 1 publishes at once: a second's worth (20) passes, the rest
    // at 20 a second.
    let started = Instant::now();
    let qos1 = |topic: &str, packet_id: u16| {
        Packet::Publish(Publish {
            topic: s(topic),
            qos: ferrymq_codec::QoS::AtLeastOnce,
            packet_id,
            payload: Bytes::from_static(b"x"),
            ..Publish::default()
        })
    };
    for id in 1..=100u16 {
        fast.send(&qos1("rate/fast", id));
    }
    // Meanwhile another client's publishes are all acknowledged...
    for id in 1..=20u16 {
        other.send(&qos1("rate/other", id));
        assert!(matches!(other.recv(), Some(Packet::PubAck(a)) if a.packet_id == id));
    }
    // ... before the fast client is through (it needs 4 s more).
    let mut acked = 0;
    while fast.recv_or_silence(Duration::ZERO).is_some() {
        acked += 1;
    }
    assert!(acked < 100, "the fast client was not slowed");
    while acked < 100 {
        match fast.recv() {
            Some(Packet::PubAck(_)) => acked += 1,
            other => panic!("expected PUBACK {acked}, got {other:?}"),
        }
    }
    // 80 beyond the burst at 20 a second: at least 4 s (a lower bound,
    // which a slow machine cannot break).
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(3900), "took {took:?}");
    assert!(broker.log().contains("over limits.max_publish_rate"));
}
