//! MQTT 3.1.1 session semantics (and their 5.0 forms) against the real
//! binary with the raw codec client: persistent sessions, redelivery,
//! QoS 2 in both directions, retained messages, wills, takeover,
//! overlapping subscriptions, queue policies and session expiry.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use ferrymq_codec::{
    ConnAck, Disconnect, Packet, Protocol, PubAck, Publish, QoS, ReasonCode, RetainHandling,
    Subscribe, Subscription, SubscriptionOptions, Will, WillProperties,
};

const QUIET: Duration = Duration::from_millis(300);

fn connect(
    addr: std::net::SocketAddr,
    protocol: Protocol,
    id: &str,
    clean: bool,
) -> (Raw, ConnAck) {
    let mut raw = Raw::open(addr, protocol);
    let mut c = connect_packet(protocol, id);
    c.clean_start = clean;
    if protocol == Protocol::V5 && !clean {
        c.properties.session_expiry_interval = Some(300);
    }
    raw.send(&Packet::Connect(Box::new(c)));
    match raw.recv() {
        Some(Packet::ConnAck(ack)) => {
            assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
            (raw, *ack)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

fn subscribe_with(raw: &mut Raw, filter: &str, options: SubscriptionOptions) -> ReasonCode {
    raw.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        subscriptions: vec![Subscription {
            filter: s(filter),
            options,
        }],
        properties: Default::default(),
    }));
    match raw.recv() {
        Some(Packet::SubAck(ack)) => ack.reason_codes[0],
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

fn subscribe(raw: &mut Raw, filter: &str, qos: QoS) -> ReasonCode {
    subscribe_with(
        raw,
        filter,
        SubscriptionOptions {
            qos,
            ..Default::default()
        },
    )
}

fn message(topic: &str, payload: &str, qos: QoS, packet_id: u16) -> Publish {
    Publish {
        qos,
        packet_id: if qos == QoS::AtMostOnce { 0 } else { packet_id },
        topic: s(topic),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        ..Publish::default()
    }
}

/// Publishes and completes the QoS exchange from the publisher's side.
/// At QoS 0 a ping round trip proves the broker has routed the message
/// (a connection's packets are handled in order).
fn publish(raw: &mut Raw, p: Publish) -> ReasonCode {
    let (qos, id) = (p.qos, p.packet_id);
    raw.send(&Packet::Publish(p));
    match qos {
        QoS::AtMostOnce => {
            raw.send(&Packet::PingReq);
            assert_eq!(raw.recv(), Some(Packet::PingResp));
            ReasonCode::SUCCESS
        }
        QoS::AtLeastOnce => match raw.recv() {
            Some(Packet::PubAck(ack)) if ack.packet_id == id => ack.reason_code,
            other => panic!("expected PUBACK {id}, got {other:?}"),
        },
        QoS::ExactlyOnce => {
            let rec = match raw.recv() {
                Some(Packet::PubRec(ack)) if ack.packet_id == id => ack.reason_code,
                other => panic!("expected PUBREC {id}, got {other:?}"),
            };
            if rec.is_error() {
                return rec;
            }
            raw.send(&Packet::PubRel(PubAck::new(id)));
            match raw.recv() {
                Some(Packet::PubComp(ack)) if ack.packet_id == id => ack.reason_code,
                other => panic!("expected PUBCOMP {id}, got {other:?}"),
            }
        }
    }
}

fn expect_publish(raw: &mut Raw) -> Publish {
    match raw.recv() {
        Some(Packet::Publish(p)) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

/// Receives a PUBLISH and acknowledges it as a client must.
fn receive(raw: &mut Raw) -> Publish {
    let p = expect_publish(raw);
    match p.qos {
        QoS::AtMostOnce => {}
        QoS::AtLeastOnce => raw.send(&Packet::PubAck(PubAck::new(p.packet_id))),
        QoS::ExactlyOnce => {
            raw.send(&Packet::PubRec(PubAck::new(p.packet_id)));
            match raw.recv() {
                Some(Packet::PubRel(rel)) => assert_eq!(rel.packet_id, p.packet_id),
                other => panic!("expected PUBREL, got {other:?}"),
            }
            raw.send(&Packet::PubComp(PubAck::new(p.packet_id)));
        }
    }
    p
}

fn payloads(raw: &mut Raw, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| String::from_utf8(receive(raw).payload.to_vec()).unwrap())
        .collect()
}

#[test]
fn persistent_sessions_queue_while_offline_and_deliver_on_return() {
    let broker = Broker::start("");
    for protocol in [Protocol::V311, Protocol::V5] {
        let id = format!("persist-{protocol:?}");
        let (mut sub, ack) = connect(broker.addr, protocol, &id, false);
        assert!(!ack.session_present);
        subscribe(&mut sub, "p/#", QoS::AtLeastOnce);
        sub.send(&Packet::Disconnect(Disconnect::default()));
        assert_eq!(sub.until_closed(), []);

        let (mut publisher, _) = connect(broker.addr, Protocol::V311, "persist-pub", true);
        for i in 0..5u16 {
            let code = publish(
                &mut publisher,
                message("p/x", &format!("m{i}"), QoS::AtLeastOnce, i + 1),
            );
            assert!(!code.is_error());
        }
        // QoS 0 is not queued for an offline session by default.
        publish(&mut publisher, message("p/x", "q0", QoS::AtMostOnce, 0));
        publisher.send(&Packet::Disconnect(Disconnect::default()));

        let (mut sub, ack) = connect(broker.addr, protocol, &id, false);
        assert!(ack.session_present, "{protocol:?}");
        assert_eq!(payloads(&mut sub, 5), ["m0", "m1", "m2", "m3", "m4"]);
        sub.expect_silence(QUIET);
        // A clean start discards the session and its subscription.
        sub.send(&Packet::Disconnect(Disconnect::default()));
        let (mut sub, ack) = connect(broker.addr, protocol, &id, true);
        assert!(!ack.session_present);
        let (mut publisher, _) = connect(broker.addr, Protocol::V311, "persist-pub", true);
        publish(&mut publisher, message("p/x", "gone", QoS::AtLeastOnce, 9));
        sub.expect_silence(QUIET);
    }
}

#[test]
fn messages_older_than_max_age_are_dropped_when_their_turn_comes() {
    let broker = Broker::start("[storage]\nmax_age_secs = 2\n");
    let (mut sub, _) = connect(broker.addr, Protocol::V5, "aging", false);
    subscribe(&mut sub, "a/#", QoS::AtLeastOnce);
    sub.send(&Packet::Disconnect(Disconnect::default()));
    assert_eq!(sub.until_closed(), []);
    let (mut publisher, _) = connect(broker.addr, Protocol::V5, "aging-pub", true);
    for i in 0..3u16 {
        publish(
            &mut publisher,
            message("a/x", &format!("old{i}"), QoS::AtLeastOnce, i + 1),
        );
    }
    std::thread::sleep(Duration::from_secs(3));
    for i in 0..2u16 {
        publish(
            &mut publisher,
            message("a/x", &format!("new{i}"), QoS::AtLeastOnce, i + 10),
        );
    }
    let (mut sub, ack) = connect(broker.addr, Protocol::V5, "aging", false);
    assert!(ack.session_present);
    assert_eq!(payloads(&mut sub, 2), ["new0", "new1"]);
    sub.expect_silence(QUIET);
}

#[test]
fn unacknowledged_messages_are_resent_with_dup_and_their_packet_id() {
    let broker = Broker::start("");
    let (mut sub, _) = connect(broker.addr, Protocol::V311, "resend", false);
    subscribe(&mut sub, "r/#", QoS::ExactlyOnce);
    let (mut publisher, _) = connect(broker.addr, Protocol::V5, "resend-pub", true);
    publish(&mut publisher, message("r/1", "one", QoS::AtLeastOnce, 1));
    publish(&mut publisher, message("r/2", "two", QoS::ExactlyOnce, 2));
    let first = expect_publish(&mut sub);
    let second = expect_publish(&mut sub);
    assert_eq!((first.payload.as_ref(), first.dup), (&b"one"[..], false));
    // Complete phase one of the QoS 2 message only, then vanish.
    sub.send(&Packet::PubRec(PubAck::new(second.packet_id)));
    assert_eq!(
        sub.recv(),
        Some(Packet::PubRel(PubAck::new(second.packet_id)))
    );
    drop(sub);

    let (mut sub, ack) = connect(broker.addr, Protocol::V311, "resend", false);
    assert!(ack.session_present);
    // The QoS 1 message again, with DUP and the same id; the QoS 2 one
    // only as its pending PUBREL.
    let mut got = [sub.recv().unwrap(), sub.recv().unwrap()];
    got.sort_by_key(|p| format!("{p:?}"));
    let again = got
        .iter()
        .find_map(|p| match p {
            Packet::Publish(p) => Some(p.clone()),
            _ => None,
        })
        .expect("the QoS 1 message is resent");
    assert!(again.dup);
    assert_eq!(again.packet_id, first.packet_id);
    assert!(got.contains(&Packet::PubRel(PubAck::new(second.packet_id))));
    sub.send(&Packet::PubAck(PubAck::new(again.packet_id)));
    sub.send(&Packet::PubComp(PubAck::new(second.packet_id)));
    sub.expect_silence(QUIET);
    drop(sub);
    // Everything is acknowledged now: nothing comes back.
    let (mut sub, _) = connect(broker.addr, Protocol::V311, "resend", false);
    sub.expect_silence(QUIET);
}

#[test]
fn qos2_is_exactly_once_in_both_directions() {
    let broker = Broker::start("");
    let (mut sub, _) = connect(broker.addr, Protocol::V5, "q2-sub", true);
    subscribe(&mut sub, "q2", QoS::ExactlyOnce);
    let (mut publisher, _) = connect(broker.addr, Protocol::V311, "q2-pub", true);
    // The publisher resends its PUBLISH (as after a lost PUBREC) before
    // releasing it: still one delivery.
    let mut p = message("q2", "once", QoS::ExactlyOnce, 5);
    publisher.send(&Packet::Publish(p.clone()));
    assert_eq!(publisher.recv(), Some(Packet::PubRec(PubAck::new(5))));
    p.dup = true;
    publisher.send(&Packet::Publish(p));
    assert_eq!(publisher.recv(), Some(Packet::PubRec(PubAck::new(5))));
    publisher.send(&Packet::PubRel(PubAck::new(5)));
    assert_eq!(publisher.recv(), Some(Packet::PubComp(PubAck::new(5))));
    let got = receive(&mut sub);
    assert_eq!(
        (got.qos, got.payload.as_ref()),
        (QoS::ExactlyOnce, &b"once"[..])
    );
    sub.expect_silence(QUIET);
    // Delivered QoS is min(published, granted).
    let (mut low, _) = connect(broker.addr, Protocol::V311, "q2-low", true);
    subscribe(&mut low, "q2", QoS::AtLeastOnce);
    publish(&mut publisher, message("q2", "two", QoS::ExactlyOnce, 6));
    assert_eq!(receive(&mut low).qos, QoS::AtLeastOnce);
    assert_eq!(receive(&mut sub).qos, QoS::ExactlyOnce);
    publish(&mut publisher, message("q2", "one", QoS::AtLeastOnce, 7));
    assert_eq!(receive(&mut sub).qos, QoS::AtLeastOnce);
}

#[test]
fn retained_messages_are_set_cleared_and_delivered_on_subscribe() {
    let broker = Broker::start("");
    let (mut early, _) = connect(broker.addr, Protocol::V311, "ret-early", true);
    subscribe(&mut early, "ret/#", QoS::AtLeastOnce);
    let (mut publisher, _) = connect(broker.addr, Protocol::V311, "ret-pub", true);
    let mut lamp = message("ret/lamp", "on", QoS::AtLeastOnce, 1);
    lamp.retain = true;
    publish(&mut publisher, lamp);
    let mut sys = message("$SYS/ret", "sys", QoS::AtMostOnce, 0);
    sys.retain = true;
    publish(&mut publisher, sys);
    // An existing subscription gets it as a normal message (RETAIN 0).
    let live = receive(&mut early);
    assert_eq!((live.payload.as_ref(), live.retain), (&b"on"[..], false));
    // A new subscription gets it with RETAIN 1, at min(QoS) ...
    let (mut late, _) = connect(broker.addr, Protocol::V311, "ret-late", true);
    subscribe(&mut late, "ret/+", QoS::AtLeastOnce);
    let got = receive(&mut late);
    assert_eq!(
        (got.payload.as_ref(), got.retain, got.qos),
        (&b"on"[..], true, QoS::AtLeastOnce)
    );
    // ... and again on a resubscribe; `#` does not match `$SYS/ret`.
    subscribe(&mut late, "#", QoS::AtMostOnce);
    assert_eq!(receive(&mut late).topic, "ret/lamp");
    late.expect_silence(QUIET);
    subscribe(&mut late, "$SYS/#", QoS::AtMostOnce);
    let got = receive(&mut late);
    assert_eq!((got.topic.as_str(), got.retain), ("$SYS/ret", true));
    // An empty retained payload clears it (and is delivered live).
    let mut clear = message("ret/lamp", "", QoS::AtLeastOnce, 2);
    clear.retain = true;
    publish(&mut publisher, clear);
    assert_eq!(receive(&mut early).payload.len(), 0);
    let (mut later, _) = connect(broker.addr, Protocol::V311, "ret-later", true);
    subscribe(&mut later, "ret/#", QoS::AtLeastOnce);
    later.expect_silence(QUIET);
}

#[test]
fn past_max_retained_messages_a_new_topic_is_delivered_but_not_retained() {
    let broker = Broker::start("[limits]\nmax_retained_messages = 3");
    let (mut live, _) = connect(broker.addr, Protocol::V311, "mr-live", true);
    subscribe(&mut live, "mr/#", QoS::AtLeastOnce);
    let (mut publisher, _) = connect(broker.addr, Protocol::V311, "mr-pub", true);
    let mut retain = |topic: &str, payload: &str, id: u16| {
        let mut m = message(topic, payload, QoS::AtLeastOnce, id);
        m.retain = true;
        assert_eq!(publish(&mut publisher, m), ReasonCode::SUCCESS);
    };
    for (i, t) in ["mr/a", "mr/b", "mr/c", "mr/d"].into_iter().enumerate() {
        retain(t, "1", i as u16 + 1);
    }
    // All four were delivered live.
    let got: Vec<String> = (0..4)
        .map(|_| receive(&mut live).topic.to_string())
        .collect();
    assert_eq!(got, ["mr/a", "mr/b", "mr/c", "mr/d"]);
    broker.wait_for_log("limits.max_retained_messages reached", WAIT);
    // At the limit a held one is still replaced; a clear makes room.
    retain("mr/a", "2", 5);
    retain("mr/b", "", 6);
    retain("mr/e", "1", 7);
    let (mut late, _) = connect(broker.addr, Protocol::V311, "mr-late", true);
    subscribe(&mut late, "mr/#", QoS::AtLeastOnce);
    let mut held: Vec<(String, String)> = (0..3)
        .map(|_| {
            let p = receive(&mut late);
            (
                p.topic.to_string(),
                String::from_utf8(p.payload.to_vec()).unwrap(),
            )
        })
        .collect();
    held.sort();
    assert_eq!(
        held,
        [("mr/a", "2"), ("mr/c", "1"), ("mr/e", "1")].map(|(t, p)| (t.into(), p.into()))
    );
    late.expect_silence(QUIET);
}

#[test]
fn v5_retain_as_published_and_retain_handling() {
    let broker = Broker::start("");
    let (mut publisher, _) = connect(broker.addr, Protocol::V5, "rh-pub", true);
    let mut m = message("rh/t", "v", QoS::AtMostOnce, 0);
    m.retain = true;
    publish(&mut publisher, m.clone());
    let (mut sub, _) = connect(broker.addr, Protocol::V5, "rh-sub", true);
    let opts = |rh, rap| SubscriptionOptions {
        retain_handling: rh,
        retain_as_published: rap,
        ..Default::default()
    };
    subscribe_with(&mut sub, "rh/t", opts(RetainHandling::DoNotSend, true));
    sub.expect_silence(QUIET);
    // Retain As Published keeps the flag on live deliveries.
    publish(&mut publisher, m.clone());
    assert!(receive(&mut sub).retain);
    // Send-if-new: not on a resubscribe ...
    subscribe_with(&mut sub, "rh/t", opts(RetainHandling::SendIfNew, false));
    sub.expect_silence(QUIET);
    // ... but on a new subscription.
    subscribe_with(&mut sub, "rh/+", opts(RetainHandling::SendIfNew, false));
    assert!(receive(&mut sub).retain);
    publish(&mut publisher, message("rh/t", "live", QoS::AtMostOnce, 0));
    assert!(!receive(&mut sub).retain);
}

fn with_will(
    addr: std::net::SocketAddr,
    protocol: Protocol,
    id: &str,
    clean: bool,
    keep_alive: u16,
) -> Raw {
    let mut raw = Raw::open(addr, protocol);
    let mut c = connect_packet(protocol, id);
    c.clean_start = clean;
    c.keep_alive = keep_alive;
    if protocol == Protocol::V5 && !clean {
        c.properties.session_expiry_interval = Some(300);
    }
    c.will = Some(Will {
        topic: s(&format!("will/{id}")),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties: WillProperties::default(),
    });
    raw.send(&Packet::Connect(Box::new(c)));
    assert!(matches!(raw.recv(), Some(Packet::ConnAck(_))));
    raw
}

#[test]
fn will_is_published_with_qos_and_retain_on_keepalive_timeout() {
    let broker = Broker::start("");
    let (mut watcher, _) = connect(broker.addr, Protocol::V311, "will-watch", true);
    subscribe(&mut watcher, "will/#", QoS::AtLeastOnce);
    let _silent = with_will(broker.addr, Protocol::V311, "sleeper", true, 1);
    // No packet within 1.5 s: the broker closes it and publishes the will.
    let got = receive(&mut watcher);
    assert_eq!(
        (got.topic.as_str(), got.qos, got.retain),
        ("will/sleeper", QoS::AtLeastOnce, false)
    );
    // It was retained: a late subscriber gets it with RETAIN 1.
    let (mut late, _) = connect(broker.addr, Protocol::V311, "will-late", true);
    subscribe(&mut late, "will/+", QoS::AtLeastOnce);
    let got = receive(&mut late);
    assert_eq!((got.payload.as_ref(), got.retain), (&b"gone"[..], true));
}

#[test]
fn takeover_publishes_the_old_will_unless_the_session_is_resumed() {
    let broker = Broker::start("");
    let (mut watcher, _) = connect(broker.addr, Protocol::V311, "tw-watch", true);
    subscribe(&mut watcher, "will/#", QoS::AtLeastOnce);
    // Resumed (clean session 0 on both): no will.
    let mut old = with_will(broker.addr, Protocol::V5, "tw-resume", false, 30);
    let (_new, ack) = connect(broker.addr, Protocol::V5, "tw-resume", false);
    assert!(ack.session_present);
    assert_eq!(
        old.until_closed(),
        [Packet::Disconnect(Disconnect::new(
            ReasonCode::SESSION_TAKEN_OVER
        ))]
    );
    watcher.expect_silence(QUIET);
    // Not resumed (clean start): the will goes out.
    let mut old = with_will(broker.addr, Protocol::V311, "tw-clean", false, 30);
    let (_new, ack) = connect(broker.addr, Protocol::V311, "tw-clean", true);
    assert!(!ack.session_present);
    assert_eq!(old.until_closed(), []);
    assert_eq!(receive(&mut watcher).topic, "will/tw-clean");
    // 5.0 asks to resume a session that ended with its connection (expiry
    // 0): nothing to resume, so the will goes out.
    let mut old = with_will(broker.addr, Protocol::V5, "tw-ended", true, 30);
    let (_new, ack) = connect(broker.addr, Protocol::V5, "tw-ended", false);
    assert!(!ack.session_present);
    old.until_closed();
    assert_eq!(receive(&mut watcher).topic, "will/tw-ended");
}

/// Regression (torture seed 1 on CI): a client that had not read its
/// deliveries sent DISCONNECT and closed; its close reset the connection
/// (unread data), the broker's pending write failed before it read the
/// DISCONNECT, and the will went out as after a lost connection.
#[test]
fn a_disconnect_behind_unread_deliveries_still_cancels_the_will() {
    let broker = Broker::start("");
    let (mut watcher, _) = connect(broker.addr, Protocol::V311, "ud-watch", true);
    subscribe(&mut watcher, "will/#", QoS::AtLeastOnce);
    let mut busy = with_will(broker.addr, Protocol::V311, "ud-busy", true, 30);
    subscribe(&mut busy, "ud/flood", QoS::AtMostOnce);
    // `busy` reads nothing more: 8 MB fill its socket buffers and the
    // broker's write buffer, so the broker stops reading it.
    let (mut publisher, _) = connect(broker.addr, Protocol::V311, "ud-pub", true);
    let payload = "x".repeat(8 * 1024);
    for _ in 0..1000 {
        publish(
            &mut publisher,
            message("ud/flood", &payload, QoS::AtMostOnce, 0),
        );
    }
    std::thread::sleep(QUIET);
    busy.send(&Packet::Disconnect(Disconnect::new(ReasonCode::SUCCESS)));
    drop(busy);
    watcher.expect_silence(QUIET * 3);
    // A connection lost without DISCONNECT still publishes its will.
    let lost = with_will(broker.addr, Protocol::V311, "ud-lost", true, 30);
    drop(lost);
    assert_eq!(receive(&mut watcher).topic, "will/ud-lost");
}

#[test]
fn overlapping_subscriptions_deliver_once_at_the_highest_qos() {
    let broker = Broker::start("");
    let (mut sub, _) = connect(broker.addr, Protocol::V311, "ov", true);
    subscribe(&mut sub, "ov/#", QoS::AtMostOnce);
    subscribe(&mut sub, "ov/+", QoS::ExactlyOnce);
    subscribe(&mut sub, "ov/a", QoS::AtLeastOnce);
    let (mut publisher, _) = connect(broker.addr, Protocol::V311, "ov-pub", true);
    publish(&mut publisher, message("ov/a", "x", QoS::ExactlyOnce, 1));
    assert_eq!(receive(&mut sub).qos, QoS::ExactlyOnce);
    sub.expect_silence(QUIET);
}

#[tokio::test]
async fn order_per_publisher_is_kept_at_qos1() {
    let broker = Broker::start("");
    let mut sub = V4Client::connect(broker.addr, "order-sub").await;
    sub.client
        .subscribe("order", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        if let rumqttc::Packet::SubAck(_) = next(&mut sub.incoming).await {
            break;
        }
    }
    let publisher = V4Client::connect(broker.addr, "order-pub").await;
    for i in 0..1000 {
        publisher
            .client
            .publish("order", rumqttc::QoS::AtLeastOnce, false, i.to_string())
            .await
            .unwrap();
    }
    for i in 0..1000 {
        let p = sub.publish_received().await;
        assert_eq!(p.payload, i.to_string(), "message {i}");
    }
}

#[test]
fn a_subscriber_that_stops_reading_does_not_stall_the_others() {
    let broker = Broker::start("[storage]\nmax_queued_messages = 1000");
    let (mut stalled, _) = connect(broker.addr, Protocol::V311, "stalled", true);
    subscribe(&mut stalled, "flood", QoS::AtMostOnce);
    // `stalled` never reads again.
    let (mut reader, _) = connect(broker.addr, Protocol::V311, "reader", true);
    subscribe(&mut reader, "flood", QoS::AtMostOnce);
    let (mut publisher, _) = connect(broker.addr, Protocol::V311, "flooder", true);
    let payload = "x".repeat(1024);
    // 20 MB in rounds of 500: far more than the stalled client's socket
    // buffers and queue hold, while the reader keeps up with every round.
    for round in 0..40 {
        for _ in 0..500 {
            publish(
                &mut publisher,
                message("flood", &payload, QoS::AtMostOnce, 0),
            );
        }
        for i in 0..500 {
            let p = expect_publish(&mut reader);
            assert_eq!(p.payload.len(), 1024, "round {round}, message {i}");
        }
    }
    // The publisher was never blocked, and its connection still answers.
    publisher.send(&Packet::PingReq);
    assert_eq!(publisher.recv(), Some(Packet::PingResp));
    broker.wait_for_log("session queue full", WAIT);
    drop(stalled);
}

#[test]
fn queued_memory_stays_bounded_while_subscribers_never_read() {
    // 2 MiB for every queue together; each session's own bound (10,000
    // messages, 64 MiB) would let the four that never read hold 160 MB.
    let broker = Broker::start("[storage]\nmax_queued_memory = \"2MiB\"");
    let stalled: Vec<Raw> = (0..4)
        .map(|i| {
            let (mut c, _) = connect(
                broker.addr,
                Protocol::V311,
                &format!("qm-stalled-{i}"),
                true,
            );
            subscribe(&mut c, "qm/flood", QoS::AtLeastOnce);
            c
        })
        .collect();
    // A persistent session away meanwhile: its queue goes to disk.
    let (mut away, _) = connect(broker.addr, Protocol::V311, "qm-away", false);
    subscribe(&mut away, "qm/flood", QoS::AtLeastOnce);
    drop(away);
    let (mut reader, _) = connect(broker.addr, Protocol::V311, "qm-reader", true);
    subscribe(&mut reader, "qm/flood", QoS::AtLeastOnce);
    let (mut publisher, _) = connect(broker.addr, Protocol::V311, "qm-pub", true);
    let payload = "m".repeat(4096);
    let mut n = 0u16;
    for _ in 0..40 {
        for _ in 0..100 {
            n += 1;
            let p = message("qm/flood", &format!("{n:05}{payload}"), QoS::AtLeastOnce, n);
            assert_eq!(publish(&mut publisher, p), ReasonCode::SUCCESS);
        }
        // The client that reads gets every message, in order.
        for i in (n - 99)..=n {
            let p = receive(&mut reader);
            assert_eq!(&p.payload[..5], format!("{i:05}").as_bytes());
        }
    }
    broker.wait_for_log("reached storage.max_queued_memory", WAIT);
    // The persistent session gets all 4,000 on return, none lost.
    let (mut away, ack) = connect(broker.addr, Protocol::V311, "qm-away", false);
    assert!(ack.session_present);
    for i in 1..=n {
        let p = receive(&mut away);
        assert_eq!(&p.payload[..5], format!("{i:05}").as_bytes());
    }
    drop(stalled);
}

fn queue_of_three(policy: &str) -> Broker {
    Broker::start(&format!(
        "[storage]\nmax_queued_messages = 3\nqueue_full = \"{policy}\""
    ))
}

/// An offline persistent subscriber, five QoS 1 messages for it; returns
/// the publisher's reason codes and what the subscriber gets on return.
fn five_for_an_offline_queue_of_three(
    broker: &Broker,
    protocol: Protocol,
) -> (Vec<Option<ReasonCode>>, Vec<String>) {
    let (mut sub, _) = connect(broker.addr, Protocol::V311, "q3", false);
    subscribe(&mut sub, "q3", QoS::AtLeastOnce);
    sub.send(&Packet::Disconnect(Disconnect::default()));
    assert_eq!(sub.until_closed(), []);
    let (mut publisher, _) = connect(broker.addr, protocol, "q3-pub", true);
    let mut codes = Vec::new();
    for i in 0..5u16 {
        publisher.send(&Packet::Publish(message(
            "q3",
            &format!("m{i}"),
            QoS::AtLeastOnce,
            i + 1,
        )));
    }
    loop {
        match publisher.recv_or_silence(QUIET) {
            Some(Packet::PubAck(ack)) => codes.push((ack.packet_id, ack.reason_code)),
            None => break,
            other => panic!("{other:?}"),
        }
    }
    let codes = (1..=5u16)
        .map(|id| codes.iter().find(|(i, _)| *i == id).map(|(_, c)| *c))
        .collect();
    let (mut sub, _) = connect(broker.addr, Protocol::V311, "q3", false);
    let mut got = Vec::new();
    while let Some(Packet::Publish(p)) = sub.recv_or_silence(QUIET) {
        sub.send(&Packet::PubAck(PubAck::new(p.packet_id)));
        got.push(String::from_utf8(p.payload.to_vec()).unwrap());
    }
    (codes, got)
}

#[test]
fn queue_full_drop_oldest_keeps_the_newest() {
    let broker = queue_of_three("drop-oldest");
    let (codes, got) = five_for_an_offline_queue_of_three(&broker, Protocol::V311);
    assert_eq!(codes, vec![Some(ReasonCode::SUCCESS); 5]);
    assert_eq!(got, ["m2", "m3", "m4"]);
}

#[test]
fn queue_full_drop_newest_keeps_the_oldest() {
    let broker = queue_of_three("drop-newest");
    let (codes, got) = five_for_an_offline_queue_of_three(&broker, Protocol::V311);
    assert_eq!(codes, vec![Some(ReasonCode::SUCCESS); 5]);
    assert_eq!(got, ["m0", "m1", "m2"]);
}

#[test]
fn queue_full_refuse_answers_0x97_in_v5_and_nothing_in_v311() {
    let broker = queue_of_three("refuse");
    let (codes, got) = five_for_an_offline_queue_of_three(&broker, Protocol::V5);
    let ok = Some(ReasonCode::SUCCESS);
    let refused = Some(ReasonCode::QUOTA_EXCEEDED);
    assert_eq!(codes, [ok, ok, ok, refused, refused]);
    assert_eq!(got, ["m0", "m1", "m2"]);
    let broker = queue_of_three("refuse");
    let (codes, _) = five_for_an_offline_queue_of_three(&broker, Protocol::V311);
    assert_eq!(codes, [ok, ok, ok, None, None]);
}

#[test]
fn queue_full_block_holds_the_publisher_until_there_is_room() {
    let broker = Broker::start("[storage]\nmax_queued_messages = 2\nqueue_full = \"block\"");
    // An online subscriber that takes one message at a time (Receive Maximum 1).
    let mut sub = Raw::open(broker.addr, Protocol::V5);
    let mut c = connect_packet(Protocol::V5, "slow");
    c.properties.receive_maximum = Some(1);
    sub.send(&Packet::Connect(Box::new(c)));
    assert!(matches!(sub.recv(), Some(Packet::ConnAck(_))));
    subscribe(&mut sub, "b", QoS::AtLeastOnce);
    let (mut publisher, _) = connect(broker.addr, Protocol::V5, "blocked-pub", true);
    // One in flight, two queued: the fourth waits.
    for i in 1..=4u16 {
        publisher.send(&Packet::Publish(message(
            "b",
            &format!("m{i}"),
            QoS::AtLeastOnce,
            i,
        )));
    }
    for id in 1..=3u16 {
        assert_eq!(publisher.recv(), Some(Packet::PubAck(PubAck::new(id))));
    }
    publisher.expect_silence(QUIET);
    // The subscriber acknowledges one: room again, the fourth goes through.
    let first = expect_publish(&mut sub);
    sub.send(&Packet::PubAck(PubAck::new(first.packet_id)));
    assert_eq!(publisher.recv(), Some(Packet::PubAck(PubAck::new(4))));
    let mut got = vec![first.payload];
    for _ in 0..3 {
        got.push(receive(&mut sub).payload);
    }
    assert_eq!(got, ["m1", "m2", "m3", "m4"]);
}

#[test]
fn qos0_is_queued_for_offline_sessions_when_configured() {
    let broker = Broker::start("[storage]\nqueue_qos0 = true");
    let (mut sub, _) = connect(broker.addr, Protocol::V311, "q0", false);
    subscribe(&mut sub, "q0", QoS::AtMostOnce);
    sub.send(&Packet::Disconnect(Disconnect::default()));
    assert_eq!(sub.until_closed(), []);
    let (mut publisher, _) = connect(broker.addr, Protocol::V311, "q0-pub", true);
    publish(&mut publisher, message("q0", "kept", QoS::AtMostOnce, 0));
    let (mut sub, _) = connect(broker.addr, Protocol::V311, "q0", false);
    assert_eq!(receive(&mut sub).payload, "kept");
}

#[test]
fn sessions_expire_after_their_interval() {
    let broker = Broker::start("[storage]\nmax_session_expiry_secs = 1");
    for protocol in [Protocol::V311, Protocol::V5] {
        let id = format!("expiring-{protocol:?}");
        let (mut sub, ack) = connect(broker.addr, protocol, &id, false);
        if protocol == Protocol::V5 {
            // Asked for 300 s, capped at 1 s and told so.
            assert_eq!(ack.properties.session_expiry_interval, Some(1));
        }
        subscribe(&mut sub, "exp", QoS::AtLeastOnce);
        sub.send(&Packet::Disconnect(Disconnect::default()));
        assert_eq!(sub.until_closed(), []);
        std::thread::sleep(Duration::from_millis(2600));
        let (_sub, ack) = connect(broker.addr, protocol, &id, false);
        assert!(
            !ack.session_present,
            "{protocol:?} session outlived its expiry"
        );
    }
}

#[tokio::test]
async fn rumqttc_persistent_sessions_and_qos2_in_both_versions() {
    use rumqttc::v5::mqttbytes::v5::Packet as P5;
    let broker = Broker::start("");
    let (host, port) = (broker.addr.ip().to_string(), broker.addr.port());

    // MQTT 3.1.1: clean session false, subscribe QoS 2, go away.
    let mut opts = rumqttc::MqttOptions::new("rq-v4", host.clone(), port);
    opts.set_clean_session(false);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts.clone(), 100);
    client
        .subscribe("rq/v4", rumqttc::QoS::ExactlyOnce)
        .await
        .unwrap();
    loop {
        if let rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) =
            eventloop.poll().await.unwrap()
        {
            break;
        }
    }
    client.disconnect().await.unwrap();
    while eventloop.poll().await.is_ok() {}

    // MQTT 5.0: clean start false with a Session Expiry Interval.
    let mut opts5 = rumqttc::v5::MqttOptions::new("rq-v5", host.clone(), port);
    opts5.set_clean_start(false);
    opts5.set_session_expiry_interval(Some(300));
    let (client5, mut eventloop5) = rumqttc::v5::AsyncClient::new(opts5.clone(), 100);
    client5
        .subscribe("rq/v5", rumqttc::v5::mqttbytes::QoS::ExactlyOnce)
        .await
        .unwrap();
    loop {
        if let rumqttc::v5::Event::Incoming(P5::SubAck(_)) = eventloop5.poll().await.unwrap() {
            break;
        }
    }
    client5.disconnect().await.unwrap();
    while eventloop5.poll().await.is_ok() {}

    // Both offline: publish QoS 2 to each.
    let publisher = V4Client::connect(broker.addr, "rq-pub").await;
    for topic in ["rq/v4", "rq/v5"] {
        for i in 0..3 {
            publisher
                .client
                .publish(
                    topic,
                    rumqttc::QoS::ExactlyOnce,
                    false,
                    format!("{topic} {i}"),
                )
                .await
                .unwrap();
        }
    }
    // Wait until the broker completed all six (PUBCOMP each).
    let mut publisher = publisher;
    let mut completed = 0;
    while completed < 6 {
        if let rumqttc::Packet::PubComp(_) = next(&mut publisher.incoming).await {
            completed += 1;
        }
    }

    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 100);
    let mut got = Vec::new();
    while got.len() < 3 {
        match tokio::time::timeout(WAIT, eventloop.poll())
            .await
            .expect("in time")
            .unwrap()
        {
            rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack)) => assert!(ack.session_present),
            rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                assert_eq!(p.qos, rumqttc::QoS::ExactlyOnce);
                got.push(String::from_utf8(p.payload.to_vec()).unwrap());
            }
            _ => {}
        }
    }
    assert_eq!(got, ["rq/v4 0", "rq/v4 1", "rq/v4 2"]);
    drop(client);

    let (client5, mut eventloop5) = rumqttc::v5::AsyncClient::new(opts5, 100);
    let mut got = Vec::new();
    while got.len() < 3 {
        match tokio::time::timeout(WAIT, eventloop5.poll())
            .await
            .expect("in time")
            .unwrap()
        {
            rumqttc::v5::Event::Incoming(P5::ConnAck(ack)) => assert!(ack.session_present),
            rumqttc::v5::Event::Incoming(P5::Publish(p)) => {
                got.push(String::from_utf8(p.payload.to_vec()).unwrap());
            }
            _ => {}
        }
    }
    assert_eq!(got, ["rq/v5 0", "rq/v5 1", "rq/v5 2"]);
    drop(client5);
}

#[test]
fn network_clients_cannot_use_a_bridge_client_id() {
    let broker = Broker::start("");
    for protocol in [Protocol::V311, Protocol::V5] {
        let mut raw = Raw::open(broker.addr, protocol);
        raw.send(&Packet::Connect(Box::new(connect_packet(
            protocol,
            "$bridge/regional",
        ))));
        match raw.recv() {
            Some(Packet::ConnAck(ack)) => {
                assert_eq!(
                    ack.reason_code,
                    ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
                    "{protocol:?}"
                )
            }
            other => panic!("{protocol:?}: {other:?}"),
        }
    }
}
