//! MQTT 5.0 behaviour against the real binary, byte-exact with the raw
//! codec client (and rumqttc v5 where it exposes the feature): session
//! and message expiry, will delay, flow control, maximum packet size,
//! topic aliases, subscription identifiers, shared subscriptions,
//! properties, CONNACK capabilities and reason codes.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use ferrymq_codec::{
    ConnAck, Connect, Disconnect, MqttString, Packet, PayloadFormat, Protocol, PubAck, Publish,
    QoS, ReasonCode, Subscribe, SubscribeProperties, Subscription, SubscriptionOptions, Will,
    WillProperties,
};

const QUIET: Duration = Duration::from_millis(300);

fn v5(id: &str) -> Connect {
    connect_packet(Protocol::V5, id)
}

fn open(addr: std::net::SocketAddr, connect: Connect) -> (Raw, ConnAck) {
    let mut raw = Raw::open(addr, Protocol::V5);
    raw.send(&Packet::Connect(Box::new(connect)));
    match raw.recv() {
        Some(Packet::ConnAck(ack)) => (raw, *ack),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

fn persistent(id: &str, expiry: u32) -> Connect {
    let mut c = v5(id);
    c.clean_start = false;
    c.properties.session_expiry_interval = Some(expiry);
    c
}

fn subscribe(raw: &mut Raw, filter: &str, qos: QoS, id: Option<u32>) -> Vec<ReasonCode> {
    raw.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        subscriptions: vec![Subscription {
            filter: s(filter),
            options: SubscriptionOptions {
                qos,
                ..Default::default()
            },
        }],
        properties: SubscribeProperties {
            subscription_identifier: id,
            user_properties: vec![],
        },
    }));
    match raw.recv() {
        Some(Packet::SubAck(ack)) => ack.reason_codes,
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

fn message(topic: &str, payload: &str, qos: QoS, id: u16) -> Publish {
    Publish {
        qos,
        packet_id: if qos == QoS::AtMostOnce { 0 } else { id },
        topic: s(topic),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        ..Publish::default()
    }
}

/// Sends a PUBLISH and returns the PUBACK's reason code (QoS 1), or
/// confirms a QoS 0 publish was handled with a ping round trip.
fn publish(raw: &mut Raw, p: Publish) -> ReasonCode {
    let qos = p.qos;
    raw.send(&Packet::Publish(p));
    if qos == QoS::AtMostOnce {
        raw.send(&Packet::PingReq);
        assert_eq!(raw.recv(), Some(Packet::PingResp));
        return ReasonCode::SUCCESS;
    }
    match raw.recv() {
        Some(Packet::PubAck(ack)) => ack.reason_code,
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

fn expect_publish(raw: &mut Raw) -> Publish {
    match raw.recv() {
        Some(Packet::Publish(p)) => {
            if p.qos == QoS::AtLeastOnce {
                raw.send(&Packet::PubAck(PubAck::new(p.packet_id)));
            }
            p
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

fn close(raw: &mut Raw, disconnect: Disconnect) {
    raw.send(&Packet::Disconnect(disconnect));
    assert_eq!(raw.until_closed(), []);
}

#[test]
fn connack_announces_what_the_broker_supports() {
    let broker = Broker::start("");
    let mut c = v5("caps");
    c.properties.request_response_information = Some(true);
    let (_raw, ack) = open(broker.addr, c);
    let p = &ack.properties;
    assert_eq!(p.receive_maximum, Some(1024));
    assert_eq!(p.maximum_packet_size, Some(1 << 20));
    assert_eq!(p.topic_alias_maximum, Some(64));
    assert_eq!(p.retain_available, Some(true));
    assert_eq!(p.wildcard_subscription_available, Some(true));
    assert_eq!(p.subscription_identifier_available, Some(true));
    assert_eq!(p.shared_subscription_available, Some(true));
    assert_eq!(p.maximum_qos, None, "absent: QoS 2 is supported");
    assert_eq!(p.response_information.as_deref(), Some("response/caps/"));
}

#[test]
fn session_expiry_is_set_at_connect_and_changed_at_disconnect() {
    let broker = Broker::start("");
    // Set to 0 at DISCONNECT: the session ends with the connection.
    let (mut raw, _) = open(broker.addr, persistent("sx", 300));
    subscribe(&mut raw, "sx", QoS::AtLeastOnce, None);
    let mut d = Disconnect::default();
    d.properties.session_expiry_interval = Some(0);
    close(&mut raw, d);
    let (_raw, ack) = open(broker.addr, persistent("sx", 300));
    assert!(!ack.session_present);
    // A session created with 0 cannot be given an expiry at DISCONNECT.
    let (mut raw, _) = open(broker.addr, v5("sx0"));
    let mut d = Disconnect::default();
    d.properties.session_expiry_interval = Some(60);
    raw.send(&Packet::Disconnect(d));
    match raw.until_closed().as_slice() {
        [Packet::Disconnect(d)] => assert_eq!(d.reason_code, ReasonCode::PROTOCOL_ERROR),
        other => panic!("{other:?}"),
    }
}

#[test]
fn expired_messages_are_never_delivered_and_the_rest_carry_what_is_left() {
    let broker = Broker::start("");
    let (mut sub, _) = open(broker.addr, persistent("mx", 300));
    subscribe(&mut sub, "mx/#", QoS::AtLeastOnce, None);
    close(&mut sub, Disconnect::default());
    let (mut publisher, _) = open(broker.addr, v5("mx-pub"));
    let mut short = message("mx/short", "gone", QoS::AtLeastOnce, 1);
    short.properties.message_expiry_interval = Some(1);
    publish(&mut publisher, short.clone());
    let mut long = message("mx/long", "kept", QoS::AtLeastOnce, 2);
    long.properties.message_expiry_interval = Some(60);
    publish(&mut publisher, long);
    // A retained message expires too.
    short.retain = true;
    short.topic = s("mx/retained");
    short.packet_id = 3;
    publish(&mut publisher, short);
    std::thread::sleep(Duration::from_millis(2100));
    let (mut sub, ack) = open(broker.addr, persistent("mx", 300));
    assert!(ack.session_present);
    let got = expect_publish(&mut sub);
    assert_eq!(got.payload, "kept");
    let left = got.properties.message_expiry_interval.unwrap();
    assert!((57..=58).contains(&left), "remaining interval {left}");
    sub.expect_silence(QUIET);
    let (mut late, _) = open(broker.addr, v5("mx-late"));
    subscribe(&mut late, "mx/retained", QoS::AtLeastOnce, None);
    late.expect_silence(QUIET);
}

fn with_will(id: &str, delay: u32, expiry: u32) -> Connect {
    let mut c = persistent(id, expiry);
    c.will = Some(Will {
        topic: s(&format!("wd/{id}")),
        payload: Bytes::from_static(b"late"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: WillProperties {
            will_delay_interval: Some(delay),
            ..Default::default()
        },
    });
    c
}

/// Regression (the crash-cycles program: 41 of 100 wills arrived twice):
/// a delayed will that came due while the broker was down was published
/// at the next start but stayed in its session's record, so every later
/// start published it again.
#[test]
fn a_will_due_while_the_broker_was_down_is_published_once_across_restarts() {
    let data = tempfile::tempdir().unwrap();
    let mut broker = Broker::start_at(data.path(), "");
    let (mut watcher, _) = open(broker.addr, persistent("wr-watch", 300));
    subscribe(&mut watcher, "wd/#", QoS::AtLeastOnce, None);
    drop(watcher);
    let mut got: Vec<String> = Vec::new();
    for cycle in 0..4 {
        let (mut watcher, _) = open(broker.addr, persistent("wr-watch", 300));
        // A will due a second after its connection drops: after the kill
        // below, so it comes due while the broker is down.
        let (gone, _) = open(broker.addr, with_will(&format!("down-{cycle}"), 1, 300));
        drop(gone);
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(800) {
            if let Some(Packet::Publish(p)) = watcher.recv_or_silence(Duration::from_millis(100)) {
                watcher.send(&Packet::PubAck(PubAck::new(p.packet_id)));
                got.push(p.topic.to_string());
            }
        }
        broker.kill();
        drop(watcher);
        std::thread::sleep(Duration::from_millis(300));
        broker = Broker::start_at(data.path(), "");
    }
    let (mut watcher, _) = open(broker.addr, persistent("wr-watch", 300));
    while let Some(Packet::Publish(p)) = watcher.recv_or_silence(Duration::from_millis(1500)) {
        watcher.send(&Packet::PubAck(PubAck::new(p.packet_id)));
        got.push(p.topic.to_string());
    }
    got.sort();
    let want: Vec<String> = (0..4).map(|c| format!("wd/down-{c}")).collect();
    assert_eq!(got, want, "each will once");
}

#[test]
fn the_will_waits_for_its_delay_and_a_resumed_session_cancels_it() {
    let broker = Broker::start("");
    let (mut watcher, _) = open(broker.addr, v5("wd-watch"));
    subscribe(&mut watcher, "wd/#", QoS::AtLeastOnce, None);
    // Delayed 1 s: nothing at once, then the will.
    let (gone, _) = open(broker.addr, with_will("delayed", 1, 60));
    drop(gone);
    watcher.expect_silence(Duration::from_millis(600));
    assert_eq!(expect_publish(&mut watcher).topic, "wd/delayed");
    // Back within the delay: no will.
    let (back, _) = open(broker.addr, with_will("returns", 2, 60));
    drop(back);
    std::thread::sleep(Duration::from_millis(300));
    let (_back, ack) = open(broker.addr, with_will("returns", 2, 60));
    assert!(ack.session_present);
    watcher.expect_silence(Duration::from_millis(2500));
    // The session ends (expiry 1 s) before the delay (30 s): will then.
    let (short, _) = open(broker.addr, with_will("short-session", 30, 1));
    drop(short);
    let start = Instant::now();
    assert_eq!(expect_publish(&mut watcher).topic, "wd/short-session");
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn our_receive_maximum_is_enforced_with_0x93() {
    let broker = Broker::start("[limits]\nreceive_maximum = 2");
    let (mut raw, ack) = open(broker.addr, v5("rm"));
    assert_eq!(ack.properties.receive_maximum, Some(2));
    // Three QoS 2 publishes without PUBREL: one too many.
    for id in 1..=3 {
        raw.send(&Packet::Publish(message("rm", "x", QoS::ExactlyOnce, id)));
    }
    let packets = raw.until_closed();
    let recs: Vec<u16> = packets[..2]
        .iter()
        .map(|p| match p {
            Packet::PubRec(rec) => rec.packet_id,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(recs, [1, 2]);
    match &packets[2] {
        Packet::Disconnect(d) => assert_eq!(d.reason_code, ReasonCode::RECEIVE_MAXIMUM_EXCEEDED),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_clients_receive_maximum_and_maximum_packet_size_are_respected() {
    let broker = Broker::start("");
    let mut c = v5("small");
    c.properties.receive_maximum = Some(1);
    c.properties.maximum_packet_size = Some(100);
    let (mut sub, _) = open(broker.addr, c);
    subscribe(&mut sub, "fc", QoS::AtLeastOnce, None);
    let (mut publisher, _) = open(broker.addr, v5("fc-pub"));
    publish(
        &mut publisher,
        message("fc", &"x".repeat(200), QoS::AtLeastOnce, 1),
    );
    for i in 0..3u16 {
        publish(
            &mut publisher,
            message("fc", &format!("m{i}"), QoS::AtLeastOnce, i + 2),
        );
    }
    // The large one is skipped; one at a time for the others.
    let first = match sub.recv() {
        Some(Packet::Publish(p)) => p,
        other => panic!("{other:?}"),
    };
    assert_eq!(first.payload, "m0");
    sub.expect_silence(QUIET);
    sub.send(&Packet::PubAck(PubAck::new(first.packet_id)));
    assert_eq!(expect_publish(&mut sub).payload, "m1");
    assert_eq!(expect_publish(&mut sub).payload, "m2");
}

#[test]
fn topic_aliases_work_both_ways() {
    let broker = Broker::start("[limits]\ntopic_alias_maximum = 2");
    let mut c = v5("alias-sub");
    c.properties.topic_alias_maximum = Some(5);
    let (mut sub, _) = open(broker.addr, c);
    subscribe(&mut sub, "alias/#", QoS::AtMostOnce, None);
    let (mut publisher, _) = open(broker.addr, v5("alias-pub"));
    // The publisher defines alias 1, then uses it.
    let mut define = message("alias/very/long/topic", "1", QoS::AtMostOnce, 0);
    define.properties.topic_alias = Some(1);
    publish(&mut publisher, define);
    let mut using = message("", "2", QoS::AtMostOnce, 0);
    using.topic = MqttString::default();
    using.properties.topic_alias = Some(1);
    publish(&mut publisher, using.clone());
    // Towards the subscriber: topic and alias first, then the alias alone.
    let a = expect_publish(&mut sub);
    assert_eq!(
        (a.topic.as_str(), a.properties.topic_alias),
        ("alias/very/long/topic", Some(1))
    );
    let b = expect_publish(&mut sub);
    assert_eq!(
        (
            b.topic.as_str(),
            b.properties.topic_alias,
            b.payload.as_ref()
        ),
        ("", Some(1), &b"2"[..])
    );
    // Beyond our Topic Alias Maximum (2): 0x94.
    using.properties.topic_alias = Some(3);
    publisher.send(&Packet::Publish(using));
    match publisher.until_closed().as_slice() {
        [Packet::Disconnect(d)] => assert_eq!(d.reason_code, ReasonCode::TOPIC_ALIAS_INVALID),
        other => panic!("{other:?}"),
    }
}

#[test]
fn one_delivery_carries_every_matching_subscription_identifier() {
    let broker = Broker::start("");
    let (mut sub, _) = open(broker.addr, v5("sid"));
    subscribe(&mut sub, "sid/#", QoS::AtLeastOnce, Some(7));
    subscribe(&mut sub, "sid/+", QoS::AtMostOnce, Some(9));
    subscribe(&mut sub, "sid/x", QoS::AtMostOnce, None);
    let (mut publisher, _) = open(broker.addr, v5("sid-pub"));
    let mut retained = message("sid/x", "r", QoS::AtLeastOnce, 1);
    retained.retain = true;
    publish(&mut publisher, retained);
    let got = expect_publish(&mut sub);
    assert_eq!(got.qos, QoS::AtLeastOnce);
    assert_eq!(got.properties.subscription_identifiers, [7, 9]);
    sub.expect_silence(QUIET);
    // A retained message sent on subscribe carries that subscription's id.
    subscribe(&mut sub, "sid/+", QoS::AtMostOnce, Some(11));
    let got = expect_publish(&mut sub);
    assert!(got.retain);
    assert_eq!(got.properties.subscription_identifiers, [11]);
}

/// Regression (found by a third-party client suite): a No Local
/// subscription still added its Subscription Identifier, and raised the
/// QoS, on the publisher's own message arriving through another,
/// overlapping subscription. A subscription No Local excludes does not
/// match at all (MQTT 5 3.8.3.1).
#[test]
fn a_no_local_subscription_adds_no_identifier_or_qos_to_the_publishers_own_message() {
    let broker = Broker::start("");
    let (mut me, _) = open(broker.addr, v5("nl-self"));
    me.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        subscriptions: vec![Subscription {
            filter: s("nl/+"),
            options: SubscriptionOptions {
                qos: QoS::ExactlyOnce,
                no_local: true,
                ..Default::default()
            },
        }],
        properties: SubscribeProperties {
            subscription_identifier: Some(1),
            user_properties: vec![],
        },
    }));
    assert!(matches!(me.recv(), Some(Packet::SubAck(_))));
    subscribe(&mut me, "nl/x", QoS::AtMostOnce, Some(2));
    me.send(&Packet::Publish(message(
        "nl/x",
        "mine",
        QoS::AtMostOnce,
        0,
    )));
    let got = match me.recv() {
        Some(Packet::Publish(p)) => p,
        other => panic!("expected my own message through nl/x, got {other:?}"),
    };
    assert_eq!(got.qos, QoS::AtMostOnce);
    assert_eq!(got.properties.subscription_identifiers, [2]);
    me.expect_silence(QUIET);
    // Another publisher's message matches both.
    let (mut other, _) = open(broker.addr, v5("nl-other"));
    publish(&mut other, message("nl/x", "theirs", QoS::AtLeastOnce, 1));
    let got = expect_publish(&mut me);
    assert_eq!(got.qos, QoS::AtLeastOnce);
    assert_eq!(got.properties.subscription_identifiers, [1, 2]);
}

#[test]
fn shared_subscriptions_split_the_load_and_hand_back_unacknowledged_messages() {
    let broker = Broker::start("");
    // Members take one message at a time (Receive Maximum 1), so both are
    // busy while the publisher sends.
    let member = |id: &str| {
        let mut c = v5(id);
        c.properties.receive_maximum = Some(1);
        c
    };
    let (mut a, _) = open(broker.addr, member("share-a"));
    let (mut b, _) = open(broker.addr, member("share-b"));
    let (mut all, _) = open(broker.addr, v5("share-all"));
    assert_eq!(
        subscribe(&mut a, "$share/g/sh/#", QoS::AtLeastOnce, None),
        [ReasonCode::GRANTED_QOS_1]
    );
    assert_eq!(
        subscribe(&mut b, "$share/g/sh/#", QoS::AtLeastOnce, None),
        [ReasonCode::GRANTED_QOS_1]
    );
    subscribe(&mut all, "sh/#", QoS::AtLeastOnce, None);
    let (mut publisher, _) = open(broker.addr, v5("share-pub"));
    for i in 0..20u16 {
        publish(
            &mut publisher,
            message("sh/x", &i.to_string(), QoS::AtLeastOnce, i + 1),
        );
    }
    for i in 0..20 {
        assert_eq!(expect_publish(&mut all).payload, i.to_string());
    }
    let mut got: Vec<u32> = Vec::new();
    let mut per_member = [0; 2];
    for (n, member) in [&mut a, &mut b].into_iter().enumerate() {
        while let Some(Packet::Publish(p)) = member.recv_or_silence(QUIET) {
            member.send(&Packet::PubAck(PubAck::new(p.packet_id)));
            got.push(std::str::from_utf8(&p.payload).unwrap().parse().unwrap());
            per_member[n] += 1;
        }
    }
    got.sort();
    assert_eq!(
        got,
        (0..20).collect::<Vec<u32>>(),
        "each message to exactly one member"
    );
    assert!(
        per_member.iter().all(|n| *n > 0),
        "both members served: {per_member:?}"
    );
    // A member that goes away with an unacknowledged message: the other gets it.
    close(&mut b, Disconnect::default());
    let (mut c, _) = open(broker.addr, v5("share-c"));
    subscribe(&mut c, "$share/g/sh/#", QoS::AtLeastOnce, None);
    close(&mut a, Disconnect::default());
    let (mut a, _) = open(broker.addr, v5("share-a2"));
    subscribe(&mut a, "$share/g/sh/#", QoS::AtLeastOnce, None);
    publish(
        &mut publisher,
        message("sh/y", "handed-back", QoS::AtLeastOnce, 30),
    );
    let (mut holder, mut other) = match (a.recv_or_silence(QUIET), c.recv_or_silence(QUIET)) {
        (Some(Packet::Publish(_)), None) => (a, c),
        (None, Some(Packet::Publish(_))) => (c, a),
        other => panic!("{other:?}"),
    };
    holder.send(&Packet::Disconnect(Disconnect::default()));
    holder.until_closed();
    assert_eq!(expect_publish(&mut other).payload, "handed-back");
    // No Local is a protocol error on a shared subscription.
    other.send(&Packet::Subscribe(Subscribe {
        packet_id: 2,
        subscriptions: vec![Subscription {
            filter: s("$share/g/sh/#"),
            options: SubscriptionOptions {
                no_local: true,
                ..Default::default()
            },
        }],
        properties: Default::default(),
    }));
    match other.until_closed().as_slice() {
        [Packet::Disconnect(d)] => assert_eq!(d.reason_code, ReasonCode::PROTOCOL_ERROR),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_shared_subscribe_gets_no_retained_message() {
    let broker = Broker::start("");
    let (mut publisher, _) = open(broker.addr, v5("shr-pub"));
    let mut r = message("shr/t", "r", QoS::AtLeastOnce, 1);
    r.retain = true;
    publish(&mut publisher, r);
    let (mut member, _) = open(broker.addr, v5("shr"));
    subscribe(&mut member, "$share/g/shr/#", QoS::AtLeastOnce, None);
    member.expect_silence(QUIET);
}

/// Regression (torture test with group members): a message pulled from a
/// shared group and in flight to a member when the broker was killed was
/// sent again with the group's RETAIN (as stored in the group's queue),
/// not what the member's subscription made of it.
#[test]
fn a_shared_group_delivery_resent_after_a_kill_keeps_the_members_retain_flag() {
    let data = tempfile::tempdir().unwrap();
    let broker = Broker::start_at(data.path(), "");
    let (mut member, _) = open(broker.addr, persistent("shk", 300));
    subscribe(&mut member, "$share/g/shk/#", QoS::AtLeastOnce, None);
    let (mut publisher, _) = open(broker.addr, v5("shk-pub"));
    let mut r = message("shk/t", "r", QoS::AtLeastOnce, 1);
    r.retain = true;
    assert_eq!(publish(&mut publisher, r), ReasonCode::SUCCESS);
    // Received, not acknowledged; the broker dies.
    let Some(Packet::Publish(first)) = member.recv() else {
        panic!("no delivery");
    };
    assert_eq!((first.retain, first.dup), (false, false));
    std::thread::sleep(QUIET);
    broker.kill();
    drop(member);
    let broker = Broker::start_at(data.path(), "");
    let (mut member, ack) = open(broker.addr, persistent("shk", 300));
    assert!(ack.session_present);
    let Some(Packet::Publish(again)) = member.recv() else {
        panic!("not sent again");
    };
    assert_eq!(
        (again.retain, again.dup, again.packet_id),
        (false, true, first.packet_id)
    );
}

#[test]
fn properties_pass_through_and_the_payload_format_is_checked() {
    let broker = Broker::start("");
    let (mut sub, _) = open(broker.addr, v5("props"));
    subscribe(&mut sub, "props", QoS::AtLeastOnce, None);
    let (mut publisher, _) = open(broker.addr, v5("props-pub"));
    let mut p = message("props", "{\"t\":21}", QoS::AtLeastOnce, 1);
    p.properties.payload_format_indicator = Some(PayloadFormat::Utf8);
    p.properties.content_type = Some(s("application/json"));
    p.properties.response_topic = Some(s("reply/here"));
    p.properties.correlation_data = Some(Bytes::from_static(&[0, 1, 2]));
    p.properties.user_properties = vec![(s("k"), s("2")), (s("a"), s("x")), (s("k"), s("1"))];
    let sent = p.properties.clone();
    assert_eq!(publish(&mut publisher, p), ReasonCode::SUCCESS);
    let got = expect_publish(&mut sub);
    assert_eq!(got.properties, sent);
    // Announced as UTF-8 but not: refused with 0x99, not delivered.
    let mut bad = message("props", "", QoS::AtLeastOnce, 2);
    bad.payload = Bytes::from_static(&[0xFF, 0xFE]);
    bad.properties.payload_format_indicator = Some(PayloadFormat::Utf8);
    assert_eq!(
        publish(&mut publisher, bad),
        ReasonCode::PAYLOAD_FORMAT_INVALID
    );
    sub.expect_silence(QUIET);
    // Nobody subscribed: 0x10.
    assert_eq!(
        publish(&mut publisher, message("nobody", "x", QoS::AtLeastOnce, 3)),
        ReasonCode::NO_MATCHING_SUBSCRIBERS
    );
}

#[test]
fn server_disconnects_carry_a_reason_string() {
    let broker = Broker::start("");
    let (mut raw, _) = open(broker.addr, v5("why"));
    raw.send(&Packet::PingResp);
    match raw.until_closed().as_slice() {
        [Packet::Disconnect(d)] => {
            assert_eq!(d.reason_code, ReasonCode::PROTOCOL_ERROR);
            assert!(
                d.properties
                    .reason_string
                    .as_deref()
                    .is_some_and(|r| r.contains("PINGRESP"))
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn rumqttc_v5_sees_subscription_identifiers_and_message_expiry() {
    use rumqttc::v5::mqttbytes::v5::{Packet as P, PublishProperties, SubscribeProperties as SP};
    let broker = Broker::start("");
    let (mut sub, _) = V5Client::connect(broker.addr, "rq5-sub").await;
    let props = SP {
        id: Some(42),
        user_properties: vec![],
    };
    sub.client
        .subscribe_with_properties("rq5/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce, props)
        .await
        .unwrap();
    loop {
        if let P::SubAck(_) = next(&mut sub.incoming).await {
            break;
        }
    }
    let (publisher, _) = V5Client::connect(broker.addr, "rq5-pub").await;
    let props = PublishProperties {
        message_expiry_interval: Some(120),
        user_properties: vec![("origin".into(), "rumqttc".into())],
        ..Default::default()
    };
    publisher
        .client
        .publish_with_properties(
            "rq5/t",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            "v",
            props,
        )
        .await
        .unwrap();
    let got = sub.publish_received().await;
    let p = got.properties.expect("properties");
    assert_eq!(p.subscription_identifiers, [42]);
    assert!(matches!(p.message_expiry_interval, Some(119..=120)));
    assert_eq!(
        p.user_properties,
        [("origin".to_string(), "rumqttc".to_string())]
    );
}

#[test]
fn clients_cannot_publish_to_the_bridges_dead_letter_and_replay_topics() {
    let broker = Broker::start("");
    let (mut watcher, _) = open(broker.addr, v5("watch-reserved"));
    subscribe(&mut watcher, "$dead/#", QoS::AtLeastOnce, None);
    subscribe(&mut watcher, "$replay/#", QoS::AtLeastOnce, None);
    let (mut v5_client, _) = open(broker.addr, v5("inject5"));
    for (id, topic) in [(1, "$dead/up/x"), (2, "$replay/up/x")] {
        assert_eq!(
            publish(
                &mut v5_client,
                message(topic, "forged", QoS::AtLeastOnce, id)
            ),
            ReasonCode::NOT_AUTHORIZED,
            "{topic}"
        );
    }
    // 3.1.1 cannot be told no: acknowledged and dropped.
    let mut old = Raw::open(broker.addr, Protocol::V311);
    old.send(&Packet::Connect(Box::new(connect_packet(
        Protocol::V311,
        "inject3",
    ))));
    assert!(matches!(old.recv(), Some(Packet::ConnAck(_))));
    old.send(&Packet::Publish(message(
        "$replay/up/x",
        "forged",
        QoS::AtLeastOnce,
        7,
    )));
    assert_eq!(old.recv(), Some(Packet::PubAck(PubAck::new(7))));
    // A will cannot get there either.
    let mut will = v5("will-reserved");
    will.will = Some(Will {
        topic: s("$dead/up/will"),
        payload: Bytes::from_static(b"forged"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: WillProperties::default(),
    });
    let (dying, _) = open(broker.addr, will);
    drop(dying);
    watcher.expect_silence(QUIET);
    // The connections stay usable.
    assert_eq!(
        publish(&mut v5_client, message("nobody", "x", QoS::AtLeastOnce, 3)),
        ReasonCode::NO_MATCHING_SUBSCRIBERS
    );
}
