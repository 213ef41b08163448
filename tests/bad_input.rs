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
