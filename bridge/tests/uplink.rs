//! The uplink client against a real Mosquitto (Debian's /usr/sbin/mosquitto,
//! one private broker per test on a free loopback port).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::mosquitto::{self, Mosquitto};
use common::pki::Pki;
use common::proxy::Proxy;
use ferrymq_bridge::{Event, RequestError, TlsOptions, Uplink, UplinkError, UplinkOptions};
use ferrymq_codec::{
    ConnAck, ConnAckProperties, Disconnect, DisconnectProperties, MqttString, Packet, Protocol,
    Publish, PublishProperties, QoS, ReasonCode, SubscribeProperties, Subscription,
    SubscriptionOptions, decode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a test waits for an expected event.
const WAIT: Duration = Duration::from_secs(5);

fn options(port: u16, client_id: &str) -> UplinkOptions {
    let mut options = UplinkOptions::new("127.0.0.1", port, client_id);
    options.connect_timeout = WAIT;
    options
}

fn persistent(port: u16, client_id: &str, protocol: Protocol) -> UplinkOptions {
    let mut options = options(port, client_id);
    options.protocol = protocol;
    options.clean_start = false;
    options.session_expiry_secs = 300;
    options
}

async fn connect(options: &UplinkOptions) -> Uplink {
    Uplink::connect(options).await.unwrap().0
}

/// The next event, failing the test on an error or after [`WAIT`].
async fn next(uplink: &mut Uplink) -> Event {
    match tokio::time::timeout(WAIT, uplink.next_event()).await {
        Ok(Ok(event)) => event,
        Ok(Err(e)) => panic!("uplink failed: {e}"),
        Err(_) => panic!("no event within {WAIT:?}"),
    }
}

/// Runs the uplink (answering what it must) for `time`, expecting no event.
async fn quiet(uplink: &mut Uplink, time: Duration) {
    if let Ok(result) = tokio::time::timeout(time, uplink.next_event()).await {
        panic!("expected nothing, got {result:?}");
    }
}

/// Runs the uplink until nothing is in flight either way and all output
/// is written (e.g. PUBREL answered with PUBCOMP, which makes no event).
async fn settle(uplink: &mut Uplink) {
    let deadline = Instant::now() + WAIT;
    while !uplink.is_idle() {
        assert!(Instant::now() < deadline, "not idle: {uplink:?}");
        // Cancelling next_event is safe: that is what this exercises too.
        if let Ok(result) =
            tokio::time::timeout(Duration::from_millis(20), uplink.next_event()).await
        {
            panic!("unexpected {result:?}");
        }
    }
}

async fn message(uplink: &mut Uplink) -> Publish {
    match next(uplink).await {
        Event::Message(publish) => publish,
        other => panic!("expected a message, got {other:?}"),
    }
}

async fn subscribe(uplink: &mut Uplink, filter: &'static str, options: SubscriptionOptions) {
    let id = uplink
        .subscribe(
            vec![Subscription {
                filter: MqttString::from_static(filter),
                options,
            }],
            SubscribeProperties::default(),
        )
        .unwrap();
    match next(uplink).await {
        Event::SubAck {
            packet_id,
            reason_codes,
            ..
        } => {
            assert_eq!(packet_id, id);
            assert_eq!(reason_codes, [ReasonCode(options.qos as u8)]);
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

fn qos(qos: QoS) -> SubscriptionOptions {
    SubscriptionOptions {
        qos,
        ..SubscriptionOptions::default()
    }
}

fn publish(topic: &'static str, qos: QoS, payload: &'static str) -> Publish {
    Publish {
        qos,
        topic: MqttString::from_static(topic),
        payload: Bytes::from_static(payload.as_bytes()),
        ..Publish::default()
    }
}

fn user(name: &'static str, value: &str) -> (MqttString, MqttString) {
    (
        MqttString::from_static(name),
        MqttString::new(value).unwrap(),
    )
}

/// Publishes and waits for the end of the exchange (QoS 2: Received, then Acked).
async fn publish_acked(uplink: &mut Uplink, message: Publish) -> u16 {
    let qos = message.qos;
    let id = uplink.publish(message).unwrap();
    if qos == QoS::ExactlyOnce {
        assert!(
            matches!(next(uplink).await, Event::Received { packet_id, reason_code, .. }
                if packet_id == id && !reason_code.is_error())
        );
    }
    match next(uplink).await {
        Event::Acked {
            packet_id,
            reason_code,
            ..
        } => {
            assert_eq!(packet_id, id);
            assert!(!reason_code.is_error(), "{reason_code}");
        }
        other => panic!("expected the ack of {id}, got {other:?}"),
    }
    id
}

#[tokio::test]
async fn connects_with_mqtt5_and_reads_connack_properties() {
    let broker = Mosquitto::start("");
    let (uplink, connected) = Uplink::connect(&options(broker.port(), "up-v5"))
        .await
        .unwrap();
    assert!(!connected.session_present);
    assert_eq!(connected.reason_code, ReasonCode::SUCCESS);
    // Mosquitto's default max_inflight_messages.
    assert_eq!(connected.receive_maximum, 20);
    assert_eq!(connected.maximum_qos, QoS::ExactlyOnce);
    assert!(connected.retain_available);
    assert_eq!(connected.maximum_packet_size, None);
    assert_eq!(uplink.window(), 20);
    assert_eq!(uplink.protocol(), Protocol::V5);
    assert_eq!(uplink.keepalive(), Some(Duration::from_secs(30)));
    // An empty client id gets one assigned.
    let (_, assigned) = Uplink::connect(&options(broker.port(), "")).await.unwrap();
    assert!(
        assigned
            .assigned_client_identifier
            .is_some_and(|id| !id.is_empty())
    );
    uplink
        .disconnect(ReasonCode::NORMAL_DISCONNECTION)
        .await
        .unwrap();
}

#[tokio::test]
async fn connects_with_mqtt311_and_exchanges_messages_with_a_v5_client() {
    let broker = Mosquitto::start("");
    let mut v3_options = options(broker.port(), "up-v3");
    v3_options.protocol = Protocol::V311;
    let (mut v3, connected) = Uplink::connect(&v3_options).await.unwrap();
    assert!(!connected.session_present);
    // No Receive Maximum in 3.1.1: only the owner's cap limits the window.
    assert_eq!(connected.receive_maximum, u16::MAX);
    assert_eq!(v3.protocol(), Protocol::V311);
    let mut v5 = connect(&options(broker.port(), "sub-v5")).await;
    subscribe(&mut v5, "v3/#", qos(QoS::ExactlyOnce)).await;
    subscribe(&mut v3, "v5/#", qos(QoS::AtLeastOnce)).await;

    publish_acked(&mut v3, publish("v3/a", QoS::AtLeastOnce, "one")).await;
    publish_acked(&mut v3, publish("v3/b", QoS::ExactlyOnce, "two")).await;
    for (topic, payload, qos) in [
        ("v3/a", "one", QoS::AtLeastOnce),
        ("v3/b", "two", QoS::ExactlyOnce),
    ] {
        let m = message(&mut v5).await;
        assert_eq!(
            (m.topic.as_str(), &m.payload[..], m.qos),
            (topic, payload.as_bytes(), qos)
        );
        v5.ack(m.packet_id).unwrap();
    }
    publish_acked(&mut v5, publish("v5/c", QoS::AtLeastOnce, "three")).await;
    let m = message(&mut v3).await;
    assert_eq!((m.topic.as_str(), &m.payload[..]), ("v5/c", &b"three"[..]));
    v3.ack(m.packet_id).unwrap();
    settle(&mut v3).await;
    settle(&mut v5).await;
}

#[tokio::test]
async fn qos1_and_qos2_publishes_arrive_with_their_user_properties() {
    let broker = Mosquitto::start("");
    let mut subscriber = connect(&options(broker.port(), "sub")).await;
    subscribe(&mut subscriber, "sensors/#", qos(QoS::ExactlyOnce)).await;
    let mut uplink = connect(&options(broker.port(), "up")).await;

    for (n, qos) in [(1, QoS::AtLeastOnce), (2, QoS::ExactlyOnce)] {
        let mut message = publish("sensors/t1", qos, "21.5");
        message.properties = PublishProperties {
            user_properties: vec![user("ferry-id", &format!("node-a:7:{n}")), user("k", "v")],
            content_type: Some(MqttString::from_static("text/plain")),
            message_expiry_interval: Some(600),
            ..PublishProperties::default()
        };
        let sent = message.clone();
        let id = publish_acked(&mut uplink, message).await;
        assert_ne!(id, 0);

        let got = self::message(&mut subscriber).await;
        assert_eq!(got.topic, sent.topic);
        assert_eq!(got.payload, sent.payload);
        assert_eq!(got.qos, qos);
        assert_eq!(
            got.properties.user_properties,
            sent.properties.user_properties
        );
        assert_eq!(got.properties.content_type, sent.properties.content_type);
        assert!(got.properties.message_expiry_interval.is_some());
        subscriber.ack(got.packet_id).unwrap();
    }
    assert_eq!(uplink.in_flight(), 0);
    settle(&mut subscriber).await;
    // QoS 0 takes no id and no acknowledgement.
    assert_eq!(
        uplink.publish(publish("sensors/q0", QoS::AtMostOnce, "x")),
        Ok(0)
    );
    // Queued only: the owner's next_event or flush writes it.
    assert!(uplink.pending_output() > 0);
    uplink.flush().await.unwrap();
    assert_eq!(uplink.pending_output(), 0);
    assert_eq!(message(&mut subscriber).await.topic, "sensors/q0");
}

#[tokio::test]
async fn no_local_subscription_skips_our_own_publishes() {
    let broker = Mosquitto::start("");
    let mut uplink = connect(&options(broker.port(), "up")).await;
    let no_local = SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        no_local: true,
        ..SubscriptionOptions::default()
    };
    subscribe(&mut uplink, "cmd/#", no_local).await;
    publish_acked(&mut uplink, publish("cmd/own", QoS::AtLeastOnce, "echo?")).await;
    let mut other = connect(&options(broker.port(), "other")).await;
    publish_acked(&mut other, publish("cmd/other", QoS::AtLeastOnce, "x")).await;
    // The first message to arrive is the other client's.
    let got = message(&mut uplink).await;
    assert_eq!(got.topic, "cmd/other");
    uplink.ack(got.packet_id).unwrap();
    settle(&mut uplink).await;
}

#[tokio::test]
async fn window_follows_the_upstream_receive_maximum_and_the_owner_cap() {
    // Mosquitto announces max_inflight_messages as its Receive Maximum.
    let broker = Mosquitto::start("max_inflight_messages 3");
    let (mut uplink, connected) = Uplink::connect(&options(broker.port(), "up"))
        .await
        .unwrap();
    assert_eq!(connected.receive_maximum, 3);
    assert_eq!(uplink.window(), 3);
    let mut ids = Vec::new();
    for n in 0..3 {
        assert!(uplink.can_publish());
        let qos = if n == 1 {
            QoS::ExactlyOnce
        } else {
            QoS::AtLeastOnce
        };
        ids.push(uplink.publish(publish("w/t", qos, "x")).unwrap());
    }
    assert!(!uplink.can_publish());
    assert_eq!(
        uplink.publish(publish("w/t", QoS::AtLeastOnce, "x")),
        Err(RequestError::WindowFull { window: 3 })
    );
    assert_eq!(uplink.in_flight(), 3);
    // Every exchange ends, in some order; each frees its slot.
    let mut acked = Vec::new();
    while acked.len() < 3 {
        match next(&mut uplink).await {
            Event::Acked { packet_id, .. } => acked.push(packet_id),
            Event::Received { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    acked.sort_unstable();
    ids.sort_unstable();
    assert_eq!(acked, ids);
    assert_eq!(uplink.in_flight(), 0);

    uplink.set_window_cap(1);
    assert_eq!(uplink.window(), 1);
    uplink
        .publish(publish("w/t", QoS::AtLeastOnce, "x"))
        .unwrap();
    assert_eq!(
        uplink.publish(publish("w/t", QoS::AtLeastOnce, "x")),
        Err(RequestError::WindowFull { window: 1 })
    );
    assert!(matches!(next(&mut uplink).await, Event::Acked { .. }));
    assert!(uplink.can_publish());
    settle(&mut uplink).await;
}

#[tokio::test]
async fn persistent_session_keeps_qos1_messages_while_we_are_away() {
    for protocol in [Protocol::V5, Protocol::V311] {
        let broker = Mosquitto::start("");
        let sub_options = persistent(broker.port(), "edge-sub", protocol);
        let (mut sub, connected) = Uplink::connect(&sub_options).await.unwrap();
        assert!(!connected.session_present, "{protocol:?}: no session yet");
        subscribe(&mut sub, "down/#", qos(QoS::AtLeastOnce)).await;
        sub.disconnect(ReasonCode::NORMAL_DISCONNECTION)
            .await
            .unwrap();

        let mut publisher = connect(&options(broker.port(), "pub")).await;
        for n in 0..3 {
            let payload = ["m0", "m1", "m2"][n];
            publish_acked(&mut publisher, publish("down/x", QoS::AtLeastOnce, payload)).await;
        }

        let (mut sub, connected) = Uplink::connect(&sub_options).await.unwrap();
        assert!(connected.session_present, "{protocol:?}: session resumed");
        for payload in ["m0", "m1", "m2"] {
            let m = message(&mut sub).await;
            assert_eq!(&m.payload[..], payload.as_bytes(), "{protocol:?}");
            assert_eq!(m.qos, QoS::AtLeastOnce);
            sub.ack(m.packet_id).unwrap();
        }
        settle(&mut sub).await;
        sub.disconnect(ReasonCode::NORMAL_DISCONNECTION)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn inbound_messages_are_acknowledged_only_when_the_owner_acks() {
    let broker = Mosquitto::start("");
    let sub_options = persistent(broker.port(), "edge-sub", Protocol::V5);
    let mut sub = connect(&sub_options).await;
    subscribe(&mut sub, "down/#", qos(QoS::ExactlyOnce)).await;
    let mut publisher = connect(&options(broker.port(), "pub")).await;
    publish_acked(&mut publisher, publish("down/1", QoS::AtLeastOnce, "a")).await;
    publish_acked(&mut publisher, publish("down/2", QoS::ExactlyOnce, "b")).await;

    // Received but not acknowledged (not durable yet), then the link drops.
    for topic in ["down/1", "down/2"] {
        let m = message(&mut sub).await;
        assert_eq!(m.topic, topic);
        assert!(!m.dup);
    }
    quiet(&mut sub, Duration::from_millis(300)).await;
    drop(sub);

    // Both come again; this time they are acknowledged.
    let (mut sub, connected) = Uplink::connect(&sub_options).await.unwrap();
    assert!(connected.session_present);
    for (topic, qos) in [("down/1", QoS::AtLeastOnce), ("down/2", QoS::ExactlyOnce)] {
        let m = message(&mut sub).await;
        assert_eq!((m.topic.as_str(), m.qos), (topic, qos));
        assert!(m.dup, "a redelivery carries DUP");
        sub.ack(m.packet_id).unwrap();
    }
    // QoS 2: our PUBREC, Mosquitto's PUBREL, our PUBCOMP; then nothing is open.
    settle(&mut sub).await;
    sub.disconnect(ReasonCode::NORMAL_DISCONNECTION)
        .await
        .unwrap();

    // Not redelivered: the first message after reconnecting is a new one.
    let (mut sub, connected) = Uplink::connect(&sub_options).await.unwrap();
    assert!(connected.session_present);
    publish_acked(&mut publisher, publish("down/3", QoS::AtLeastOnce, "c")).await;
    let m = message(&mut sub).await;
    assert_eq!((m.topic.as_str(), m.dup), ("down/3", false));
    sub.ack(m.packet_id).unwrap();
    settle(&mut sub).await;
}

#[tokio::test]
async fn keepalive_pings_a_live_link_and_detects_a_blackholed_one() {
    let broker = Mosquitto::start("");
    let proxy = Proxy::start(broker.addr()).await;
    let keepalive = Duration::from_secs(2);
    let mut options = options(proxy.addr().port(), "up");
    options.keepalive = keepalive;
    let mut uplink = connect(&options).await;

    // Idle for more than a keepalive: a PINGREQ goes out and is answered.
    quiet(&mut uplink, keepalive + Duration::from_millis(500)).await;
    let log = broker.log();
    assert!(log.contains("Received PINGREQ from up"), "{log}");
    assert!(log.contains("Sending PINGRESP to up"), "{log}");
    publish_acked(&mut uplink, publish("ka/t", QoS::AtLeastOnce, "alive")).await;

    proxy.blackhole();
    let start = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(10), uplink.next_event()).await;
    let elapsed = start.elapsed();
    match result {
        Ok(Err(UplinkError::KeepaliveTimeout { waited })) => {
            assert_eq!(
                waited,
                Duration::from_secs(1),
                "keepalive / 2, at least 1 s"
            );
        }
        other => panic!("expected a keepalive timeout, got {other:?} after {elapsed:?}"),
    }
    // PINGREQ at most one keepalive after the last traffic, then 1 s of
    // silence; with some slack for a loaded machine.
    let bound = keepalive + Duration::from_secs(1) + Duration::from_millis(1500);
    assert!(elapsed <= bound, "took {elapsed:?}, bound {bound:?}");
    assert!(matches!(
        uplink.next_event().await,
        Err(UplinkError::Finished)
    ));
    assert_eq!(
        uplink.publish(publish("ka/t", QoS::AtLeastOnce, "x")),
        Err(RequestError::Finished)
    );
}

#[tokio::test]
async fn refused_connack_is_an_error_with_its_reason_code() {
    let dir = tempfile::tempdir().unwrap();
    let passwords = dir.path().join("passwd");
    mosquitto::password_file(&passwords, "edge", "s3cret");
    let broker = Mosquitto::start_in(
        dir,
        &format!(
            "allow_anonymous false\npassword_file {}",
            passwords.display()
        ),
    );
    for protocol in [Protocol::V5, Protocol::V311] {
        let mut anonymous = options(broker.port(), "anon");
        anonymous.protocol = protocol;
        match Uplink::connect(&anonymous).await {
            Err(UplinkError::Refused {
                reason,
                server_reference,
                ..
            }) => {
                // 3.1.1 return code 5 maps to the same reason code.
                assert_eq!(reason, ReasonCode::NOT_AUTHORIZED, "{protocol:?}");
                assert_eq!(server_reference, None);
            }
            other => panic!("{protocol:?}: expected a refusal, got {other:?}"),
        }
        let mut wrong = anonymous.clone();
        wrong.username = Some("edge".into());
        wrong.password = Some("wrong".into());
        let err = Uplink::connect(&wrong).await.unwrap_err();
        assert!(
            matches!(err, UplinkError::Refused { reason, .. } if reason == ReasonCode::NOT_AUTHORIZED),
            "{protocol:?}: {err:?}"
        );
        let mut right = wrong.clone();
        right.password = Some("s3cret".into());
        let (uplink, _) = Uplink::connect(&right).await.unwrap();
        uplink
            .disconnect(ReasonCode::NORMAL_DISCONNECTION)
            .await
            .unwrap();
    }
    // The password never shows in the options' Debug output.
    let mut with_password = options(broker.port(), "x");
    with_password.password = Some("s3cret".into());
    assert!(!format!("{with_password:?}").contains("s3cret"));
}

#[tokio::test]
async fn session_takeover_ends_the_old_connection() {
    let broker = Mosquitto::start("");
    let mut first = connect(&options(broker.port(), "same-id")).await;
    let _second = connect(&options(broker.port(), "same-id")).await;
    match tokio::time::timeout(WAIT, first.next_event())
        .await
        .unwrap()
    {
        // Mosquitto 2.0.11 just closes the old connection; the spec (and
        // later Mosquitto versions) send DISCONNECT 0x8E first.
        Err(UplinkError::Closed) => {}
        Err(UplinkError::Disconnected { reason, .. }) => {
            assert_eq!(reason, ReasonCode::SESSION_TAKEN_OVER);
        }
        other => panic!("expected the end of the connection, got {other:?}"),
    }
    assert!(matches!(
        first.next_event().await,
        Err(UplinkError::Finished)
    ));
}

/// A one-connection MQTT 5.0 server that reads CONNECT, writes `script`,
/// then reads until the client closes; its task returns what it read after
/// CONNECT. For what Mosquitto never sends (DISCONNECT and refusals with a
/// Server Reference, topic aliases we did not allow).
async fn scripted_server(script: Vec<Packet>) -> (u16, tokio::task::JoinHandle<Vec<Packet>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut input = BytesMut::new();
        loop {
            if let Some(packet) = decode(&mut input, Protocol::V5, u32::MAX).unwrap() {
                assert!(matches!(packet, Packet::Connect(_)), "{packet:?}");
                break;
            }
            assert_ne!(socket.read_buf(&mut input).await.unwrap(), 0);
        }
        let mut out = BytesMut::new();
        for packet in script {
            packet.encode(Protocol::V5, &mut out).unwrap();
        }
        socket.write_all(&out).await.unwrap();
        while socket.read_buf(&mut input).await.unwrap_or(0) > 0 {}
        let mut received = Vec::new();
        while let Ok(Some(packet)) = decode(&mut input, Protocol::V5, u32::MAX) {
            received.push(packet);
        }
        received
    });
    (port, task)
}

fn connack(reason_code: ReasonCode, server_reference: Option<&'static str>) -> Packet {
    Packet::ConnAck(Box::new(ConnAck {
        session_present: false,
        reason_code,
        properties: ConnAckProperties {
            server_reference: server_reference.map(MqttString::from_static),
            reason_string: Some(MqttString::from_static("go elsewhere")),
            ..ConnAckProperties::default()
        },
    }))
}

#[tokio::test]
async fn refusal_and_disconnect_carry_the_server_reference() {
    let (port, _server) = scripted_server(vec![connack(
        ReasonCode::USE_ANOTHER_SERVER,
        Some("b:1883"),
    )])
    .await;
    match Uplink::connect(&options(port, "x")).await {
        Err(UplinkError::Refused {
            reason,
            reason_string,
            server_reference,
        }) => {
            assert_eq!(reason, ReasonCode::USE_ANOTHER_SERVER);
            assert_eq!(reason_string.as_deref(), Some("go elsewhere"));
            assert_eq!(server_reference.as_deref(), Some("b:1883"));
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    let disconnect = Packet::Disconnect(Disconnect {
        reason_code: ReasonCode::SERVER_MOVED,
        properties: DisconnectProperties {
            server_reference: Some(MqttString::from_static("c:8883")),
            ..DisconnectProperties::default()
        },
    });
    let (port, _server) =
        scripted_server(vec![connack(ReasonCode::SUCCESS, None), disconnect]).await;
    let mut uplink = connect(&options(port, "x")).await;
    let err = uplink.next_event().await.unwrap_err();
    assert!(
        matches!(&err, UplinkError::Disconnected { reason, server_reference, .. }
            if *reason == ReasonCode::SERVER_MOVED && server_reference.as_deref() == Some("c:8883")),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "the upstream disconnected: 0x9d (Server moved) (server reference: c:8883)"
    );
}

#[tokio::test]
async fn a_topic_alias_we_did_not_allow_ends_the_connection_with_0x94() {
    let aliased = Packet::Publish(Publish {
        topic: MqttString::from_static("a/b"),
        properties: PublishProperties {
            topic_alias: Some(1),
            ..PublishProperties::default()
        },
        ..Publish::default()
    });
    let (port, server) = scripted_server(vec![connack(ReasonCode::SUCCESS, None), aliased]).await;
    let mut uplink = connect(&options(port, "x")).await;
    let err = uplink.next_event().await.unwrap_err();
    let UplinkError::Protocol(e) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(e.reason_code(), ReasonCode::TOPIC_ALIAS_INVALID);
    drop(uplink);
    // We told the server why.
    assert_eq!(
        server.await.unwrap(),
        [Packet::Disconnect(Disconnect::new(
            ReasonCode::TOPIC_ALIAS_INVALID
        ))]
    );
}

#[tokio::test]
async fn upstream_limits_refuse_publishes_without_ending_the_connection() {
    let broker = Mosquitto::start(
        "max_packet_size 2000\nmax_qos 1\nretain_available false\nmax_keepalive 10",
    );
    let mut up_options = options(broker.port(), "up");
    up_options.keepalive = Duration::from_secs(60);
    let (mut uplink, connected) = Uplink::connect(&up_options).await.unwrap();
    assert_eq!(connected.maximum_packet_size, Some(2000));
    assert_eq!(connected.maximum_qos, QoS::AtLeastOnce);
    assert!(!connected.retain_available);
    // Our 60 s keepalive was above max_keepalive: Server Keep Alive rules.
    assert_eq!(connected.server_keep_alive, Some(10));
    assert_eq!(uplink.keepalive(), Some(Duration::from_secs(10)));

    let mut big = publish("lim/t", QoS::AtLeastOnce, "");
    big.payload = Bytes::from(vec![0u8; 3000]);
    assert!(matches!(
        uplink.publish(big),
        Err(RequestError::PacketTooLarge { max: 2000, size }) if size > 3000
    ));
    assert!(matches!(
        uplink.publish(publish("lim/t", QoS::ExactlyOnce, "x")),
        Err(RequestError::QosNotSupported { .. })
    ));
    let mut retained = publish("lim/t", QoS::AtLeastOnce, "x");
    retained.retain = true;
    assert_eq!(
        uplink.publish(retained),
        Err(RequestError::RetainNotSupported)
    );
    assert_eq!(uplink.in_flight(), 0);
    publish_acked(&mut uplink, publish("lim/t", QoS::AtLeastOnce, "fits")).await;
}

#[tokio::test]
async fn upstream_going_away_ends_the_uplink_with_closed() {
    let mut broker = Mosquitto::start("");
    let mut uplink = connect(&options(broker.port(), "up")).await;
    broker.kill();
    match tokio::time::timeout(WAIT, uplink.next_event())
        .await
        .unwrap()
    {
        Err(UplinkError::Closed) => {}
        other => panic!("expected Closed, got {other:?}"),
    }
}

#[tokio::test]
async fn connect_fails_fast_on_a_closed_port_and_times_out_on_a_silent_one() {
    let port = mosquitto::free_port();
    match Uplink::connect(&options(port, "x")).await {
        Err(UplinkError::Tcp { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::ConnectionRefused);
        }
        other => panic!("expected a TCP error, got {other:?}"),
    }
    // Accepts, then never answers CONNECT.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let mut slow = options(port, "x");
    slow.connect_timeout = Duration::from_millis(500);
    let start = Instant::now();
    match Uplink::connect(&slow).await {
        Err(UplinkError::ConnectTimeout { timeout, .. }) => {
            assert_eq!(timeout, Duration::from_millis(500));
        }
        other => panic!("expected a connect timeout, got {other:?}"),
    }
    assert!(start.elapsed() < WAIT);
    drop(silent);
}

fn tls_options(pki: &Pki, port: u16, client_id: &str) -> UplinkOptions {
    let mut options = options(port, client_id);
    options.tls = Some(TlsOptions {
        ca_file: pki.ca.clone(),
        cert_file: None,
        key_file: None,
        server_name: None,
    });
    options
}

fn with_client_cert(mut options: UplinkOptions, pki: &Pki) -> UplinkOptions {
    let tls = options.tls.as_mut().unwrap();
    tls.cert_file = Some(pki.client_cert.clone());
    tls.key_file = Some(pki.client_key.clone());
    options
}

#[tokio::test]
async fn tls_connects_to_an_ip_or_a_name_and_carries_messages() {
    let pki = Pki::generate();
    let broker = Mosquitto::start(&pki.mosquitto_options(false));
    // server_name defaults to the host, 127.0.0.1: checked against the IP SAN.
    let mut by_ip = connect(&tls_options(&pki, broker.port(), "tls-ip")).await;
    subscribe(&mut by_ip, "tls/#", qos(QoS::ExactlyOnce)).await;
    let mut by_name = tls_options(&pki, broker.port(), "tls-name");
    by_name.tls.as_mut().unwrap().server_name = Some("localhost".into());
    let mut by_name = connect(&by_name).await;
    publish_acked(&mut by_name, publish("tls/t", QoS::ExactlyOnce, "secret")).await;
    let m = message(&mut by_ip).await;
    assert_eq!(&m.payload[..], b"secret");
    by_ip.ack(m.packet_id).unwrap();
    settle(&mut by_ip).await;
    by_ip
        .disconnect(ReasonCode::NORMAL_DISCONNECTION)
        .await
        .unwrap();
    by_name
        .disconnect(ReasonCode::NORMAL_DISCONNECTION)
        .await
        .unwrap();

    // A client certificate offered to a server that does not ask is fine.
    let mut uplink = connect(&with_client_cert(
        tls_options(&pki, broker.port(), "c"),
        &pki,
    ))
    .await;
    publish_acked(&mut uplink, publish("tls/t", QoS::AtLeastOnce, "x")).await;
}

#[tokio::test]
async fn mutual_tls_needs_our_client_certificate() {
    let pki = Pki::generate();
    let broker = Mosquitto::start(&pki.mosquitto_options(true));
    let options = with_client_cert(tls_options(&pki, broker.port(), "mtls"), &pki);
    let (mut uplink, _) = Uplink::connect(&options).await.unwrap();
    publish_acked(&mut uplink, publish("mtls/t", QoS::AtLeastOnce, "x")).await;

    let without = tls_options(&pki, broker.port(), "no-cert");
    match Uplink::connect(&without).await {
        // TLS 1.3: our handshake completes, then the server's alert arrives.
        Err(UplinkError::Tls { source, .. }) => {
            let text = source.to_string();
            assert!(text.contains("CertificateRequired"), "{text}");
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }
}

#[tokio::test]
async fn tls_refuses_a_server_our_ca_did_not_sign_or_another_name() {
    let pki = Pki::generate();
    let broker = Mosquitto::start(&pki.mosquitto_options(false));
    let mut wrong_ca = tls_options(&pki, broker.port(), "x");
    wrong_ca.tls.as_mut().unwrap().ca_file = pki.other_ca.clone();
    match Uplink::connect(&wrong_ca).await {
        Err(UplinkError::Tls { source, .. }) => {
            let text = source.to_string();
            assert!(text.contains("UnknownIssuer"), "{text}");
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }
    let mut wrong_name = tls_options(&pki, broker.port(), "x");
    wrong_name.tls.as_mut().unwrap().server_name = Some("upstream.example".into());
    let err = Uplink::connect(&wrong_name).await.unwrap_err();
    assert!(
        matches!(&err, UplinkError::Tls { source, .. } if source.to_string().contains("not valid for name")),
        "{err}"
    );
    // Unreadable files are a configuration error, before any connection.
    let mut missing = tls_options(&pki, broker.port(), "x");
    missing.tls.as_mut().unwrap().ca_file = pki.dir.path().join("nope.pem");
    let err = Uplink::connect(&missing).await.unwrap_err();
    assert!(
        matches!(&err, UplinkError::TlsConfig(text) if text.contains("nope.pem")),
        "{err:?}"
    );
}
