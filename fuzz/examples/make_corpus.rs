//! Writes the seed corpus of the `decode` fuzz target:
//!
//! ```text
//! cd fuzz && cargo run --example make_corpus [-- OUT_DIR]
//! ```
//!
//! OUT_DIR defaults to `fuzz/corpus/decode`. Each file is the target's
//! selector byte (protocol, maximum packet size, cut point; see
//! `fuzz_targets/decode.rs`) followed by wire bytes: one file per packet
//! type and version with and without properties, a will, multi-byte
//! remaining lengths, several packets in one stream, and invalid packets
//! the decoder must refuse. Files of the same name are overwritten; other
//! files in OUT_DIR (inputs the fuzzer found) are left alone.

use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use ferrymq_codec::{
    AckProperties, Auth, AuthProperties, ConnAck, ConnAckProperties, Connect, ConnectProperties,
    Disconnect, DisconnectProperties, MqttString, Packet, PayloadFormat, Protocol, PubAck, Publish,
    PublishProperties, QoS, ReasonCode, RetainHandling, SubAck, Subscribe, SubscribeProperties,
    Subscription, SubscriptionOptions, UnsubAck, Unsubscribe, UnsubscribeProperties, Will,
    WillProperties, decode,
};

use Protocol::{V5, V311};

/// Maximum packet size indices of the selector (see the fuzz target).
const UNLIMITED: u8 = 0;
const SIZE_16: u8 = 3;
/// Cut points of the selector, in 32nds of the stream.
const CUT_HALF: u8 = 16;

fn selector(protocol: Protocol, max_index: u8, cut: u8) -> u8 {
    let bit = match protocol {
        V311 => 0,
        V5 => 1,
    };
    bit | (max_index & 0b11) << 1 | (cut & 0b1_1111) << 3
}

fn s(text: &str) -> MqttString {
    MqttString::new(text).expect("valid MQTT string")
}

fn user(pairs: &[(&str, &str)]) -> Vec<(MqttString, MqttString)> {
    pairs.iter().map(|(k, v)| (s(k), s(v))).collect()
}

fn encode(packet: &Packet, protocol: Protocol) -> Vec<u8> {
    let mut buf = BytesMut::new();
    packet
        .encode(protocol, &mut buf)
        .unwrap_or_else(|e| panic!("seed does not encode: {e}: {packet:?}"));
    buf.to_vec()
}

/// A raw packet: first byte, minimal remaining length, body.
fn raw(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let mut byte = (len & 0x7F) as u8;
        len >>= 7;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// A two-byte-length string or binary field.
fn field(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn connect_v311_minimal() -> Connect {
    Connect {
        protocol: V311,
        clean_start: true,
        keep_alive: 60,
        client_id: s("sensor-1"),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties::default(),
    }
}

fn connect_v311_will() -> Connect {
    Connect {
        protocol: V311,
        clean_start: false,
        keep_alive: 0,
        client_id: s(""),
        will: Some(Will {
            topic: s("clients/sensor-1/status"),
            payload: Bytes::from_static(b"offline"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: WillProperties::default(),
        }),
        username: Some(s("alice")),
        password: Some(Bytes::from_static(b"s3cr\x00t")),
        properties: ConnectProperties::default(),
    }
}

fn connect_v5_full() -> Connect {
    Connect {
        protocol: V5,
        clean_start: true,
        keep_alive: 30,
        client_id: s("température-1"),
        will: Some(Will {
            topic: s("clients/t1/will"),
            payload: Bytes::from_static(b"{\"state\":\"gone\"}"),
            qos: QoS::ExactlyOnce,
            retain: false,
            properties: WillProperties {
                payload_format_indicator: Some(PayloadFormat::Utf8),
                message_expiry_interval: Some(3600),
                content_type: Some(s("application/json")),
                response_topic: Some(s("replies/t1")),
                correlation_data: Some(Bytes::from_static(&[1, 2, 3, 0xFF])),
                will_delay_interval: Some(10),
                user_properties: user(&[("k", "v"), ("k", "v2")]),
            },
        }),
        username: Some(s("bob")),
        password: Some(Bytes::from_static(b"pw")),
        properties: ConnectProperties {
            session_expiry_interval: Some(u32::MAX),
            authentication_method: Some(s("SCRAM-SHA-256")),
            authentication_data: Some(Bytes::from_static(b"client-first")),
            request_problem_information: Some(false),
            request_response_information: Some(true),
            receive_maximum: Some(20),
            topic_alias_maximum: Some(10),
            maximum_packet_size: Some(1 << 20),
            user_properties: user(&[("app", "ferrymq-fuzz")]),
        },
    }
}

fn publish(qos: QoS, packet_id: u16, topic: &str, payload: &'static [u8]) -> Publish {
    Publish {
        qos,
        packet_id,
        topic: s(topic),
        payload: Bytes::from_static(payload),
        ..Publish::default()
    }
}

fn publish_v5_props() -> Publish {
    Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: true,
        topic: s("a/b/c"),
        packet_id: 0x1234,
        payload: Bytes::from_static(b"21.5"),
        properties: PublishProperties {
            payload_format_indicator: Some(PayloadFormat::Unspecified),
            message_expiry_interval: Some(0),
            content_type: Some(s("text/plain")),
            response_topic: Some(s("reply/here")),
            correlation_data: Some(Bytes::from_static(b"corr")),
            subscription_identifiers: vec![1, 300, 268_435_455],
            topic_alias: Some(7),
            user_properties: user(&[("x", "1")]),
        },
    }
}

fn subscribe_v311() -> Subscribe {
    let opts = |qos| SubscriptionOptions {
        qos,
        ..SubscriptionOptions::default()
    };
    Subscribe {
        packet_id: 1,
        subscriptions: vec![
            Subscription {
                filter: s("a/+/c"),
                options: opts(QoS::AtMostOnce),
            },
            Subscription {
                filter: s("sensors/#"),
                options: opts(QoS::AtLeastOnce),
            },
            Subscription {
                filter: s("$SYS/broker/+"),
                options: opts(QoS::ExactlyOnce),
            },
        ],
        properties: SubscribeProperties::default(),
    }
}

fn subscribe_v5() -> Subscribe {
    Subscribe {
        packet_id: 65535,
        subscriptions: vec![
            Subscription {
                filter: s("$share/group/jobs/+"),
                options: SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: RetainHandling::DoNotSend,
                },
            },
            Subscription {
                filter: s("#"),
                options: SubscriptionOptions {
                    qos: QoS::ExactlyOnce,
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: RetainHandling::SendIfNew,
                },
            },
        ],
        properties: SubscribeProperties {
            subscription_identifier: Some(16_384),
            user_properties: user(&[("sub", "scriber")]),
        },
    }
}

fn ack_props(reason: &str) -> AckProperties {
    AckProperties {
        reason_string: Some(s(reason)),
        user_properties: user(&[("trace", "42")]),
    }
}

/// The seeds: name, connection protocol, selector, wire bytes.
fn seeds() -> Vec<(String, u8, Vec<u8>)> {
    let mut out: Vec<(String, u8, Vec<u8>)> = Vec::new();
    let mut packet = |name: &str, protocol: Protocol, p: Packet| {
        let wire = encode(&p, protocol);
        out.push((
            name.to_string(),
            selector(protocol, UNLIMITED, CUT_HALF),
            wire,
        ));
    };

    // Every packet type, MQTT 3.1.1.
    packet(
        "v311-connect",
        V311,
        Packet::Connect(Box::new(connect_v311_minimal())),
    );
    packet(
        "v311-connect-will-user-pass",
        V311,
        Packet::Connect(Box::new(connect_v311_will())),
    );
    packet(
        "v311-connack",
        V311,
        Packet::ConnAck(Box::default()),
    );
    packet(
        "v311-connack-refused",
        V311,
        Packet::ConnAck(Box::new(ConnAck {
            session_present: false,
            reason_code: ReasonCode::NOT_AUTHORIZED,
            properties: ConnAckProperties::default(),
        })),
    );
    packet(
        "v311-connack-session-present",
        V311,
        Packet::ConnAck(Box::new(ConnAck {
            session_present: true,
            ..ConnAck::default()
        })),
    );
    packet(
        "v311-publish-qos0",
        V311,
        Packet::Publish(publish(QoS::AtMostOnce, 0, "a/b", b"hello")),
    );
    packet(
        "v311-publish-qos1-dup-retain",
        V311,
        Packet::Publish(Publish {
            dup: true,
            retain: true,
            ..publish(QoS::AtLeastOnce, 10, "$SYS/x", b"")
        }),
    );
    // 200-byte payload: a two-byte remaining length.
    packet(
        "v311-publish-qos2-len2",
        V311,
        Packet::Publish(publish(QoS::ExactlyOnce, 0xFFFF, "big/one", &[0xA5; 200])),
    );
    packet("v311-puback", V311, Packet::PubAck(PubAck::new(1)));
    packet("v311-pubrec", V311, Packet::PubRec(PubAck::new(2)));
    packet("v311-pubrel", V311, Packet::PubRel(PubAck::new(3)));
    packet("v311-pubcomp", V311, Packet::PubComp(PubAck::new(0xFFFF)));
    packet("v311-subscribe", V311, Packet::Subscribe(subscribe_v311()));
    packet(
        "v311-suback",
        V311,
        Packet::SubAck(SubAck {
            packet_id: 1,
            reason_codes: vec![
                ReasonCode(0),
                ReasonCode(1),
                ReasonCode(2),
                ReasonCode(0x80),
            ],
            properties: AckProperties::default(),
        }),
    );
    packet(
        "v311-unsubscribe",
        V311,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 2,
            filters: vec![s("a/+/c"), s("sensors/#")],
            properties: UnsubscribeProperties::default(),
        }),
    );
    packet(
        "v311-unsuback",
        V311,
        Packet::UnsubAck(UnsubAck {
            packet_id: 2,
            ..UnsubAck::default()
        }),
    );
    packet("v311-pingreq", V311, Packet::PingReq);
    packet("v311-pingresp", V311, Packet::PingResp);
    packet(
        "v311-disconnect",
        V311,
        Packet::Disconnect(Disconnect::default()),
    );

    // Every packet type, MQTT 5.0, with and without properties.
    packet(
        "v5-connect-full",
        V5,
        Packet::Connect(Box::new(connect_v5_full())),
    );
    packet(
        "v5-connect-minimal",
        V5,
        Packet::Connect(Box::new(Connect {
            protocol: V5,
            ..connect_v311_minimal()
        })),
    );
    packet(
        "v5-connect-password-no-user",
        V5,
        Packet::Connect(Box::new(Connect {
            protocol: V5,
            password: Some(Bytes::from_static(b"token")),
            ..connect_v311_minimal()
        })),
    );
    packet(
        "v5-connack",
        V5,
        Packet::ConnAck(Box::default()),
    );
    packet(
        "v5-connack-full",
        V5,
        Packet::ConnAck(Box::new(ConnAck {
            session_present: true,
            reason_code: ReasonCode::SUCCESS,
            properties: ConnAckProperties {
                session_expiry_interval: Some(7200),
                assigned_client_identifier: Some(s("auto-1f2e")),
                server_keep_alive: Some(120),
                authentication_method: Some(s("SCRAM-SHA-256")),
                authentication_data: Some(Bytes::from_static(b"server-final")),
                response_information: Some(s("resp/")),
                server_reference: Some(s("other:1883")),
                reason_string: Some(s("welcome")),
                receive_maximum: Some(100),
                topic_alias_maximum: Some(16),
                maximum_qos: Some(QoS::AtLeastOnce),
                retain_available: Some(false),
                maximum_packet_size: Some(65_536),
                wildcard_subscription_available: Some(true),
                subscription_identifier_available: Some(false),
                shared_subscription_available: Some(true),
                user_properties: user(&[("region", "eu")]),
            },
        })),
    );
    packet(
        "v5-connack-refused",
        V5,
        Packet::ConnAck(Box::new(ConnAck {
            session_present: false,
            reason_code: ReasonCode::BAD_USER_NAME_OR_PASSWORD,
            properties: ConnAckProperties {
                reason_string: Some(s("no")),
                ..ConnAckProperties::default()
            },
        })),
    );
    packet(
        "v5-publish-qos0",
        V5,
        Packet::Publish(publish(QoS::AtMostOnce, 0, "a", b"x")),
    );
    packet("v5-publish-props", V5, Packet::Publish(publish_v5_props()));
    packet(
        "v5-publish-alias-only",
        V5,
        Packet::Publish(Publish {
            topic: MqttString::default(),
            properties: PublishProperties {
                topic_alias: Some(7),
                ..PublishProperties::default()
            },
            ..publish(QoS::ExactlyOnce, 9, "unused", b"aliased")
        }),
    );
    // Property block of 150 bytes: two-byte remaining and property lengths.
    packet(
        "v5-publish-long-props",
        V5,
        Packet::Publish(Publish {
            properties: PublishProperties {
                user_properties: user(&[("k".repeat(70).as_str(), "v".repeat(70).as_str())]),
                ..PublishProperties::default()
            },
            ..publish(QoS::AtMostOnce, 0, "t", b"")
        }),
    );
    packet("v5-puback", V5, Packet::PubAck(PubAck::new(5)));
    packet(
        "v5-puback-reason-props",
        V5,
        Packet::PubAck(PubAck {
            packet_id: 5,
            reason_code: ReasonCode::NO_MATCHING_SUBSCRIBERS,
            properties: ack_props("nobody listens"),
        }),
    );
    packet(
        "v5-pubrec-reason",
        V5,
        Packet::PubRec(PubAck {
            packet_id: 6,
            reason_code: ReasonCode::QUOTA_EXCEEDED,
            properties: AckProperties::default(),
        }),
    );
    packet(
        "v5-pubrel-not-found",
        V5,
        Packet::PubRel(PubAck {
            packet_id: 7,
            reason_code: ReasonCode::PACKET_IDENTIFIER_NOT_FOUND,
            properties: AckProperties::default(),
        }),
    );
    packet(
        "v5-pubcomp-props",
        V5,
        Packet::PubComp(PubAck {
            packet_id: 8,
            reason_code: ReasonCode::SUCCESS,
            properties: ack_props("done"),
        }),
    );
    packet("v5-subscribe", V5, Packet::Subscribe(subscribe_v5()));

    // Deep topics and filters: a retained publish of 20,000 levels and the
    // `+/+/.../#` filter that, together, once overflowed the broker's stack;
    // the deepest topic a string can carry; a deep will.
    let deep = |levels: usize| vec!["a"; levels].join("/");
    let deep_wildcard = |plus: usize| format!("{}#", "+/".repeat(plus));
    for (name, protocol) in [("v311", V311), ("v5", V5)] {
        let mut p = publish(QoS::AtMostOnce, 0, &deep(20_000), b"deep");
        p.retain = true;
        packet(&format!("{name}-publish-deep-topic"), protocol, Packet::Publish(p));
        packet(
            &format!("{name}-publish-deepest-topic"),
            protocol,
            Packet::Publish(publish(QoS::AtLeastOnce, 7, &"/".repeat(65_535), b"")),
        );
        for (kind, filter) in [("wildcard", deep_wildcard(19_999)), ("exact", deep(20_000))] {
            packet(
                &format!("{name}-subscribe-deep-{kind}"),
                protocol,
                Packet::Subscribe(Subscribe {
                    packet_id: 9,
                    subscriptions: vec![Subscription {
                        filter: s(&filter),
                        options: SubscriptionOptions::default(),
                    }],
                    properties: SubscribeProperties::default(),
                }),
            );
        }
        let mut c = connect_v311_will();
        c.protocol = protocol;
        c.client_id = s("deep-will");
        if let Some(will) = c.will.as_mut() {
            will.topic = s(&deep(20_000));
        }
        packet(&format!("{name}-connect-deep-will"), protocol, Packet::Connect(Box::new(c)));
    }
    packet(
        "v5-suback",
        V5,
        Packet::SubAck(SubAck {
            packet_id: 65535,
            reason_codes: vec![
                ReasonCode::GRANTED_QOS_1,
                ReasonCode::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED,
                ReasonCode::WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED,
            ],
            properties: ack_props("partly"),
        }),
    );
    packet(
        "v5-unsubscribe",
        V5,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 3,
            filters: vec![s("$share/group/jobs/+"), s("#")],
            properties: UnsubscribeProperties {
                user_properties: user(&[("why", "done")]),
            },
        }),
    );
    packet(
        "v5-unsuback",
        V5,
        Packet::UnsubAck(UnsubAck {
            packet_id: 3,
            reason_codes: vec![ReasonCode::SUCCESS, ReasonCode::NO_SUBSCRIPTION_EXISTED],
            properties: ack_props("ok"),
        }),
    );
    packet("v5-pingreq", V5, Packet::PingReq);
    packet("v5-pingresp", V5, Packet::PingResp);
    packet(
        "v5-disconnect",
        V5,
        Packet::Disconnect(Disconnect::default()),
    );
    packet(
        "v5-disconnect-will",
        V5,
        Packet::Disconnect(Disconnect::new(ReasonCode::DISCONNECT_WITH_WILL_MESSAGE)),
    );
    packet(
        "v5-disconnect-props",
        V5,
        Packet::Disconnect(Disconnect {
            reason_code: ReasonCode::SERVER_MOVED,
            properties: DisconnectProperties {
                session_expiry_interval: Some(0),
                server_reference: Some(s("elsewhere:8883")),
                reason_string: Some(s("maintenance")),
                user_properties: user(&[("a", "b")]),
            },
        }),
    );
    packet("v5-auth-empty", V5, Packet::Auth(Auth::default()));
    packet(
        "v5-auth-continue",
        V5,
        Packet::Auth(Auth {
            reason_code: ReasonCode::CONTINUE_AUTHENTICATION,
            properties: AuthProperties {
                authentication_method: Some(s("SCRAM-SHA-256")),
                authentication_data: Some(Bytes::from_static(b"\x00\x01\x02")),
                reason_string: Some(s("step 2")),
                user_properties: Vec::new(),
            },
        }),
    );
    // CONNECT is decoded in the version it announces, not the connection's.
    packet(
        "v5conn-v311-connect",
        V5,
        Packet::Connect(Box::new(connect_v311_will())),
    );
    packet(
        "v311conn-v5-connect",
        V311,
        Packet::Connect(Box::new(connect_v5_full())),
    );

    // Streams of several packets, cut at different points.
    let stream311 = cat(&[
        &encode(&Packet::Connect(Box::new(connect_v311_minimal())), V311),
        &encode(&Packet::Subscribe(subscribe_v311()), V311),
        &encode(
            &Packet::Publish(publish(QoS::AtLeastOnce, 4, "a/b", b"1")),
            V311,
        ),
        &encode(&Packet::PingReq, V311),
        &encode(&Packet::Disconnect(Disconnect::default()), V311),
    ]);
    out.push((
        "v311-stream-cut-early".into(),
        selector(V311, UNLIMITED, 3),
        stream311.clone(),
    ));
    out.push((
        "v311-stream-cut-late".into(),
        selector(V311, UNLIMITED, 29),
        stream311,
    ));
    let stream5 = cat(&[
        &encode(&Packet::Connect(Box::new(connect_v5_full())), V5),
        &encode(&Packet::Publish(publish_v5_props()), V5),
        &encode(&Packet::PubRel(PubAck::new(9)), V5),
        &encode(&Packet::Auth(Auth::default()), V5),
        // Incomplete trailing packet: decoding ends with Ok(None).
        &[0x30, 0x0A, 0x00, 0x01],
    ]);
    out.push((
        "v5-stream-partial-tail".into(),
        selector(V5, UNLIMITED, 11),
        stream5,
    ));

    // Remaining lengths of three and four bytes: incomplete packets
    // (Ok(None)) with a generous limit, too large with a small one.
    let mut len3 = raw(0x30, &cat(&[&field(b"t"), &[0u8; 16_384]]));
    len3.truncate(64);
    out.push((
        "v5-publish-len3-incomplete".into(),
        selector(V5, UNLIMITED, 0),
        len3.clone(),
    ));
    out.push((
        "v311-publish-len3-too-large".into(),
        selector(V311, 1, 0),
        len3,
    ));
    let len4 = cat(&[&[0x30, 0x80, 0x80, 0x80, 0x01], &field(b"t"), b"payload"]);
    out.push((
        "v311-publish-len4-incomplete".into(),
        selector(V311, UNLIMITED, 16),
        len4.clone(),
    ));
    out.push((
        "v5-publish-len4-too-large".into(),
        selector(V5, 2, 16),
        len4,
    ));
    let max_len = cat(&[&[0x30, 0xFF, 0xFF, 0xFF, 0x7F], &field(b"t")]);
    out.push((
        "v5-publish-len-max".into(),
        selector(V5, UNLIMITED, 16),
        max_len,
    ));
    out.push((
        "v5-publish-size-16-too-large".into(),
        selector(V5, SIZE_16, 16),
        encode(
            &Packet::Publish(publish(QoS::AtMostOnce, 0, "a/b", b"0123456789abcdef")),
            V5,
        ),
    ));

    // Invalid packets: the decoder must refuse them without panicking.
    let mut invalid = |name: &str, protocol: Protocol, wire: Vec<u8>| {
        out.push((
            name.to_string(),
            selector(protocol, UNLIMITED, CUT_HALF),
            wire,
        ));
    };
    let sub_body = cat(&[&[0x00, 0x01], &field(b"a/b"), &[0x01]]);
    invalid("bad-flags-subscribe", V311, raw(0x80, &sub_body));
    invalid("bad-flags-pubrel", V5, raw(0x60, &[0x00, 0x01]));
    invalid(
        "bad-flags-publish-qos3",
        V311,
        raw(0x36, &cat(&[&field(b"a"), &[0, 1]])),
    );
    invalid(
        "bad-flags-publish-dup-qos0",
        V5,
        raw(0x38, &cat(&[&field(b"a"), &[0]])),
    );
    invalid(
        "bad-remaining-length-5-bytes",
        V311,
        vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F, 0, 1, b'a'],
    );
    invalid(
        "bad-remaining-length-non-minimal",
        V5,
        vec![0xC0, 0x80, 0x00],
    );
    invalid(
        "bad-utf8-topic-overlong",
        V311,
        raw(0x30, &cat(&[&field(&[0xC0, 0xAF]), b"x"])),
    );
    invalid(
        "bad-utf8-topic-surrogate",
        V5,
        raw(0x30, &cat(&[&field(&[0xED, 0xA0, 0x80]), &[0]])),
    );
    invalid(
        "bad-utf8-topic-nul",
        V311,
        raw(0x30, &cat(&[&field(b"a\0b"), b"x"])),
    );
    invalid(
        "bad-utf8-user-property",
        V5,
        raw(
            0x30,
            &cat(&[
                &field(b"a"),
                &[8, 0x26],
                &field(b"k"),
                &field(&[0xFF, 0xFE]),
            ]),
        ),
    );
    invalid("bad-reserved-type-0", V5, vec![0x00, 0x00]);
    invalid("bad-auth-in-v311", V311, vec![0xF0, 0x00]);
    invalid(
        "bad-connect-reserved-flag",
        V311,
        raw(
            0x10,
            &cat(&[&field(b"MQTT"), &[4, 0x03, 0, 60], &field(b"c")]),
        ),
    );
    invalid(
        "bad-connect-protocol-name",
        V311,
        raw(
            0x10,
            &cat(&[&field(b"MQIsdp"), &[3, 0x02, 0, 60], &field(b"c")]),
        ),
    );
    invalid(
        "bad-duplicate-property",
        V5,
        raw(
            0x30,
            &cat(&[&field(b"a"), &[4, 0x01, 0x00, 0x01, 0x01], b"x"]),
        ),
    );
    invalid(
        "bad-unknown-property",
        V5,
        raw(0x40, &[0x00, 0x01, 0x00, 0x02, 0x7F, 0x00]),
    );
    invalid(
        "bad-property-not-allowed",
        V5,
        raw(0xE0, &[0x00, 0x03, 0x23, 0x00, 0x01]),
    );
    invalid("bad-trailing-bytes-pingreq", V311, vec![0xC0, 0x01, 0x00]);
    invalid("bad-zero-packet-id", V5, raw(0x40, &[0x00, 0x00]));
    invalid("bad-subscribe-empty", V311, raw(0x82, &[0x00, 0x01]));
    invalid(
        "bad-topic-filter",
        V5,
        raw(0x82, &cat(&[&[0x00, 0x01, 0x00], &field(b"a/#/b"), &[0]])),
    );

    // Inputs the fuzzer found and that were reported (regressions).
    for (name, hex) in FOUND {
        let bytes = from_hex(hex);
        let (&selector, wire) = bytes.split_first().expect("non-empty regression");
        out.push((name.to_string(), selector, wire.to_vec()));
    }
    out
}

/// Inputs found by fuzzing: name and hex of the whole input (selector
/// byte included).
const FOUND: &[(&str, &str)] = &[];

fn from_hex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

fn main() {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("corpus")
                .join("decode")
        });
    std::fs::create_dir_all(&dir).expect("create corpus directory");
    let seeds = seeds();
    for (name, selector, wire) in &seeds {
        // Sanity: the valid seeds decode, so the corpus starts where it should.
        let protocol = if selector & 1 == 0 { V311 } else { V5 };
        let decoded = decode(&mut BytesMut::from(&wire[..]), protocol, u32::MAX);
        if name.starts_with("bad-") {
            assert!(decoded.is_err(), "invalid seed {name} decodes: {decoded:?}");
        } else if !name.contains("len") && !name.starts_with("found-") {
            assert!(
                matches!(decoded, Ok(Some(_))),
                "seed {name} does not decode: {decoded:?}"
            );
        }
        let mut bytes = vec![*selector];
        bytes.extend_from_slice(wire);
        std::fs::write(dir.join(name), bytes).expect("write seed");
    }
    println!("wrote {} seeds to {}", seeds.len(), dir.display());
}
