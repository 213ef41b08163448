//! Table tests: for each packet type, wire bytes and what they decode to.
//! Valid rows are also encoded back and must give the same bytes.

use bytes::{Bytes, BytesMut};
use ferrymq_codec::*;

const MAX: u32 = 1 << 20;

fn s(text: &'static str) -> MqttString {
    MqttString::from_static(text)
}

/// Decodes `wire` as one packet; for a valid packet, checks that encoding
/// it gives `wire` back and that every strict prefix is "incomplete".
fn check(protocol: Protocol, wire: &[u8], expected: Result<Packet, DecodeError>) {
    let mut buf = BytesMut::from(wire);
    let got = decode(&mut buf, protocol, MAX);
    match expected {
        Ok(packet) => {
            assert_eq!(got, Ok(Some(packet.clone())), "decoding {wire:02x?}");
            assert!(buf.is_empty(), "bytes left after {wire:02x?}");
            let mut out = BytesMut::new();
            let n = packet.encode(protocol, &mut out).expect("encodes");
            assert_eq!(&out[..], wire, "re-encoding {packet:?}");
            assert_eq!(n, wire.len());
            assert_eq!(packet.encoded_len(protocol), Ok(wire.len()));
            for cut in 0..wire.len() {
                let mut partial = BytesMut::from(&wire[..cut]);
                assert_eq!(
                    decode(&mut partial, protocol, MAX),
                    Ok(None),
                    "prefix {cut}"
                );
                assert_eq!(partial.len(), cut, "an incomplete decode consumed bytes");
            }
        }
        Err(error) => assert_eq!(got, Err(error), "decoding {wire:02x?}"),
    }
}

/// Builds a packet: fixed header byte, then the body with its remaining length.
fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    assert!(body.len() < 128, "helper handles one-byte lengths only");
    let mut v = vec![first, body.len() as u8];
    v.extend_from_slice(body);
    v
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

const MQTT: &[u8] = &[0, 4, b'M', b'Q', b'T', b'T'];

fn connect(protocol: Protocol) -> Connect {
    Connect {
        protocol,
        clean_start: true,
        keep_alive: 60,
        client_id: s("c1"),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties::default(),
    }
}

#[test]
fn connect_v311() {
    use Protocol::V311;
    let base = |flags: u8, rest: &[u8]| {
        packet(
            0x10,
            &cat(&[MQTT, &[4, flags, 0, 60], &[0, 2, b'c', b'1'], rest]),
        )
    };
    check(
        V311,
        &base(0x02, &[]),
        Ok(Packet::Connect(Box::new(connect(V311)))),
    );
    // Keep alive 0 and an empty client id are valid at the codec level.
    let mut c = connect(V311);
    c.keep_alive = 0;
    c.client_id = s("");
    check(
        V311,
        &packet(0x10, &cat(&[MQTT, &[4, 0x02, 0, 0], &[0, 0]])),
        Ok(Packet::Connect(Box::new(c))),
    );
    // Will (QoS 1, retain), user name and password.
    let mut c = connect(V311);
    c.will = Some(Will {
        topic: s("w"),
        payload: Bytes::from_static(b"bye"),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties: WillProperties::default(),
    });
    c.username = Some(s("u"));
    c.password = Some(Bytes::from_static(b"p"));
    check(
        V311,
        &base(
            0b1110_1110,
            &[0, 1, b'w', 0, 3, b'b', b'y', b'e', 0, 1, b'u', 0, 1, b'p'],
        ),
        Ok(Packet::Connect(Box::new(c))),
    );
    let flags = |flags: u8, reason: &'static str| {
        (
            base(flags, &[]),
            Err(DecodeError::InvalidConnectFlags { flags, reason }),
        )
    };
    for (wire, expected) in [
        flags(0x03, "reserved bit 0 is set"),
        flags(0x0A, "will QoS or retain set without a will"),
        flags(0x22, "will QoS or retain set without a will"),
        (
            base(0x42, &[0, 1, b'p']),
            Err(DecodeError::InvalidConnectFlags {
                flags: 0x42,
                reason: "password without user name",
            }),
        ),
        (
            base(0x1E, &[0, 1, b'w', 0, 0]),
            Err(DecodeError::InvalidQos),
        ),
    ] {
        check(V311, &wire, expected);
    }
    // Protocol name and level.
    check(
        V311,
        &packet(
            0x10,
            &cat(&[&[0, 4, b'M', b'Q', b'T', b't'], &[4, 2, 0, 60, 0, 0]]),
        ),
        Err(DecodeError::InvalidProtocolName),
    );
    check(
        V311,
        &packet(0x10, &cat(&[MQTT, &[3, 2, 0, 60, 0, 0]])),
        Err(DecodeError::UnsupportedProtocolLevel(3)),
    );
    check(
        V311,
        &packet(0x10, &cat(&[&[0, 6], b"MQIsdp", &[3, 2, 0, 60, 0, 0]])),
        Err(DecodeError::UnsupportedProtocolLevel(3)),
    );
    // Client id with U+0000; will topic with a wildcard; trailing byte.
    check(
        V311,
        &packet(0x10, &cat(&[MQTT, &[4, 2, 0, 60], &[0, 2, b'a', 0]])),
        Err(DecodeError::InvalidString {
            packet: PacketType::Connect,
            error: StringError::NullCharacter,
        }),
    );
    check(
        V311,
        &base(0x06, &[0, 1, b'#', 0, 0]),
        Err(DecodeError::InvalidTopicName(TopicError::WildcardInName)),
    );
    check(
        V311,
        &base(0x02, &[9]),
        Err(DecodeError::TrailingBytes(PacketType::Connect)),
    );
    check(
        V311,
        &packet(0x10, &cat(&[MQTT, &[4, 2, 0]])),
        Err(DecodeError::UnexpectedEnd(PacketType::Connect)),
    );
    // Fixed-header flags of CONNECT must be 0.
    check(
        V311,
        &base(0x02, &[])
            .iter()
            .enumerate()
            .map(|(i, b)| if i == 0 { 0x11 } else { *b })
            .collect::<Vec<_>>(),
        Err(DecodeError::InvalidFlags {
            packet: PacketType::Connect,
            flags: 1,
        }),
    );
}

#[test]
fn connect_v5() {
    use Protocol::V5;
    let mut c = connect(V5);
    c.properties.session_expiry_interval = Some(30);
    c.properties.receive_maximum = Some(20);
    c.properties.user_properties.push((s("k"), s("v")));
    c.will = Some(Will {
        topic: s("w"),
        payload: Bytes::new(),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: WillProperties {
            will_delay_interval: Some(5),
            ..WillProperties::default()
        },
    });
    let props: &[u8] = &[
        15, 0x11, 0, 0, 0, 30, 0x21, 0, 20, 0x26, 0, 1, b'k', 0, 1, b'v',
    ];
    let wire = packet(
        0x10,
        &cat(&[
            MQTT,
            &[5, 0x06, 0, 60],
            props,
            &[0, 2, b'c', b'1'],
            &[5, 0x18, 0, 0, 0, 5],
            &[0, 1, b'w', 0, 0],
        ]),
    );
    check(V5, &wire, Ok(Packet::Connect(Box::new(c))));
    // The connection's protocol does not matter for CONNECT: it says its own.
    let mut buf = BytesMut::from(&wire[..]);
    assert!(
        matches!(decode(&mut buf, Protocol::V311, MAX), Ok(Some(Packet::Connect(c))) if c.protocol == V5)
    );

    let with_props = |props: &[u8]| packet(0x10, &cat(&[MQTT, &[5, 2, 0, 60], props, &[0, 0]]));
    check(
        V5,
        &with_props(&[3, 0x21, 0, 0]),
        Err(DecodeError::InvalidPropertyValue {
            property: PropertyId::ReceiveMaximum,
            value: 0,
        }),
    );
    check(
        V5,
        &with_props(&[5, 0x27, 0, 0, 0, 0]),
        Err(DecodeError::InvalidPropertyValue {
            property: PropertyId::MaximumPacketSize,
            value: 0,
        }),
    );
    check(
        V5,
        &with_props(&[2, 0x17, 2]),
        Err(DecodeError::InvalidPropertyValue {
            property: PropertyId::RequestProblemInformation,
            value: 2,
        }),
    );
    check(
        V5,
        &with_props(&[10, 0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2]),
        Err(DecodeError::DuplicateProperty(
            PropertyId::SessionExpiryInterval,
        )),
    );
    check(
        V5,
        &with_props(&[3, 0x13, 0, 5]),
        Err(DecodeError::PropertyNotAllowed {
            property: PropertyId::ServerKeepAlive,
            packet: "CONNECT",
        }),
    );
    check(
        V5,
        &with_props(&[2, 0x7F, 0]),
        Err(DecodeError::UnknownProperty(0x7F)),
    );
    // Property length running past the packet.
    check(
        V5,
        &with_props(&[9, 0x21, 0, 1]),
        Err(DecodeError::UnexpectedEnd(PacketType::Connect)),
    );
    // Will Delay Interval is a will property, not a CONNECT property.
    check(
        V5,
        &with_props(&[5, 0x18, 0, 0, 0, 1]),
        Err(DecodeError::PropertyNotAllowed {
            property: PropertyId::WillDelayInterval,
            packet: "CONNECT",
        }),
    );
    // 5.0 drops the rule that a password needs a user name.
    let mut c = connect(V5);
    c.password = Some(Bytes::from_static(b"p"));
    check(
        V5,
        &packet(
            0x10,
            &cat(&[MQTT, &[5, 0x42, 0, 60, 0], &[0, 2, b'c', b'1', 0, 1, b'p']]),
        ),
        Ok(Packet::Connect(Box::new(c))),
    );
}

#[test]
fn connack() {
    let ok = ConnAck::default();
    check(
        Protocol::V311,
        &[0x20, 2, 0, 0],
        Ok(Packet::ConnAck(Box::new(ok.clone()))),
    );
    check(
        Protocol::V5,
        &[0x20, 3, 0, 0, 0],
        Ok(Packet::ConnAck(Box::new(ok))),
    );
    let present = ConnAck {
        session_present: true,
        ..ConnAck::default()
    };
    check(
        Protocol::V311,
        &[0x20, 2, 1, 0],
        Ok(Packet::ConnAck(Box::new(present))),
    );
    for (code, reason) in [
        (1, ReasonCode::UNSUPPORTED_PROTOCOL_VERSION),
        (2, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID),
        (3, ReasonCode::SERVER_UNAVAILABLE),
        (4, ReasonCode::BAD_USER_NAME_OR_PASSWORD),
        (5, ReasonCode::NOT_AUTHORIZED),
    ] {
        let refused = ConnAck {
            reason_code: reason,
            ..ConnAck::default()
        };
        check(
            Protocol::V311,
            &[0x20, 2, 0, code],
            Ok(Packet::ConnAck(Box::new(refused))),
        );
    }
    check(
        Protocol::V311,
        &[0x20, 2, 0, 6],
        Err(DecodeError::InvalidReasonCode {
            packet: PacketType::ConnAck,
            code: 6,
        }),
    );
    check(
        Protocol::V311,
        &[0x20, 2, 2, 0],
        Err(DecodeError::InvalidConnAckFlags(2)),
    );
    check(
        Protocol::V5,
        &[0x20, 3, 0, 0x10, 0],
        Err(DecodeError::InvalidReasonCode {
            packet: PacketType::ConnAck,
            code: 0x10,
        }),
    );
    let mut full = ConnAck {
        reason_code: ReasonCode::SUCCESS,
        ..ConnAck::default()
    };
    full.properties.assigned_client_identifier = Some(s("auto-1"));
    full.properties.server_keep_alive = Some(30);
    full.properties.maximum_qos = Some(QoS::AtLeastOnce);
    full.properties.retain_available = Some(true);
    full.properties.reason_string = Some(s("ok"));
    let props: &[u8] = &[
        0x12, 0, 6, b'a', b'u', b't', b'o', b'-', b'1', 0x13, 0, 30, 0x1F, 0, 2, b'o', b'k', 0x24,
        1, 0x25, 1,
    ];
    let wire = cat(&[
        &[0x20, 3 + props.len() as u8, 0, 0, props.len() as u8],
        props,
    ]);
    check(Protocol::V5, &wire, Ok(Packet::ConnAck(Box::new(full))));
    check(
        Protocol::V5,
        &[0x20, 5, 0, 0, 2, 0x24, 2],
        Err(DecodeError::InvalidPropertyValue {
            property: PropertyId::MaximumQos,
            value: 2,
        }),
    );
    // A v5 refusal encoded for a 3.1.1 client maps to the nearest return code.
    let mut out = BytesMut::new();
    Packet::ConnAck(Box::new(ConnAck {
        reason_code: ReasonCode::BANNED,
        ..ConnAck::default()
    }))
    .encode(Protocol::V311, &mut out)
    .expect("encodes");
    assert_eq!(&out[..], &[0x20, 2, 0, 5]);
}

fn publish(qos: QoS, packet_id: u16) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: s("a/b"),
        packet_id,
        payload: Bytes::from_static(b"hi"),
        properties: PublishProperties::default(),
    }
}

#[test]
fn publish_v311() {
    use Protocol::V311;
    check(
        V311,
        &[0x30, 7, 0, 3, b'a', b'/', b'b', b'h', b'i'],
        Ok(Packet::Publish(publish(QoS::AtMostOnce, 0))),
    );
    let mut p = publish(QoS::ExactlyOnce, 10);
    p.dup = true;
    p.retain = true;
    check(
        V311,
        &[0x3D, 9, 0, 3, b'a', b'/', b'b', 0, 10, b'h', b'i'],
        Ok(Packet::Publish(p)),
    );
    // Empty payload.
    let mut p = publish(QoS::AtLeastOnce, 1);
    p.payload = Bytes::new();
    check(
        V311,
        &[0x32, 7, 0, 3, b'a', b'/', b'b', 0, 1],
        Ok(Packet::Publish(p)),
    );
    check(
        V311,
        &[0x36, 7, 0, 3, b'a', b'/', b'b', 0, 1],
        Err(DecodeError::InvalidQos),
    );
    check(
        V311,
        &[0x38, 5, 0, 3, b'a', b'/', b'b'],
        Err(DecodeError::InvalidFlags {
            packet: PacketType::Publish,
            flags: 8,
        }),
    );
    check(
        V311,
        &[0x32, 7, 0, 3, b'a', b'/', b'b', 0, 0],
        Err(DecodeError::ZeroPacketId(PacketType::Publish)),
    );
    check(
        V311,
        &[0x30, 5, 0, 3, b'a', b'/', b'+'],
        Err(DecodeError::InvalidTopicName(TopicError::WildcardInName)),
    );
    check(
        V311,
        &[0x30, 2, 0, 0],
        Err(DecodeError::InvalidTopicName(TopicError::Empty)),
    );
    check(
        V311,
        &[0x30, 4, 0, 2, 0xC3, 0x28],
        Err(DecodeError::InvalidString {
            packet: PacketType::Publish,
            error: StringError::InvalidUtf8,
        }),
    );
    check(
        V311,
        &[0x30, 3, 0, 5, b'a'],
        Err(DecodeError::UnexpectedEnd(PacketType::Publish)),
    );
}

#[test]
fn publish_v5() {
    use Protocol::V5;
    check(
        V5,
        &[0x30, 8, 0, 3, b'a', b'/', b'b', 0, b'h', b'i'],
        Ok(Packet::Publish(publish(QoS::AtMostOnce, 0))),
    );
    let mut p = publish(QoS::AtLeastOnce, 3);
    p.properties = PublishProperties {
        payload_format_indicator: Some(PayloadFormat::Utf8),
        message_expiry_interval: Some(60),
        content_type: Some(s("t")),
        response_topic: Some(s("r")),
        correlation_data: Some(Bytes::from_static(b"c")),
        subscription_identifiers: vec![1, 200],
        topic_alias: Some(4),
        user_properties: vec![(s("k"), s("1")), (s("k"), s("2"))],
    };
    let props: &[u8] = &[
        0x01, 1, 0x02, 0, 0, 0, 60, 0x03, 0, 1, b't', 0x08, 0, 1, b'r', 0x09, 0, 1, b'c', 0x0B, 1,
        0x0B, 0xC8, 0x01, 0x23, 0, 4, 0x26, 0, 1, b'k', 0, 1, b'1', 0x26, 0, 1, b'k', 0, 1, b'2',
    ];
    let body = cat(&[
        &[0, 3, b'a', b'/', b'b', 0, 3, props.len() as u8],
        props,
        b"hi",
    ]);
    check(V5, &packet(0x32, &body), Ok(Packet::Publish(p)));
    // An empty topic is allowed only with a Topic Alias.
    let mut p = publish(QoS::AtMostOnce, 0);
    p.topic = s("");
    p.properties.topic_alias = Some(1);
    check(
        V5,
        &[0x30, 8, 0, 0, 3, 0x23, 0, 1, b'h', b'i'],
        Ok(Packet::Publish(p)),
    );
    check(
        V5,
        &[0x30, 5, 0, 0, 0, b'h', b'i'],
        Err(DecodeError::InvalidTopicName(TopicError::Empty)),
    );
    check(
        V5,
        &[0x30, 8, 0, 1, b'a', 3, 0x23, 0, 0, b'x'],
        Err(DecodeError::InvalidPropertyValue {
            property: PropertyId::TopicAlias,
            value: 0,
        }),
    );
    assert_eq!(
        DecodeError::InvalidPropertyValue {
            property: PropertyId::TopicAlias,
            value: 0
        }
        .reason_code(),
        ReasonCode::TOPIC_ALIAS_INVALID
    );
    check(
        V5,
        &[0x30, 6, 0, 1, b'a', 2, 0x0B, 0],
        Err(DecodeError::InvalidPropertyValue {
            property: PropertyId::SubscriptionIdentifier,
            value: 0,
        }),
    );
    check(
        V5,
        &[0x30, 7, 0, 1, b'a', 3, 0x21, 0, 1],
        Err(DecodeError::PropertyNotAllowed {
            property: PropertyId::ReceiveMaximum,
            packet: "PUBLISH",
        }),
    );
    check(
        V5,
        &[0x30, 9, 0, 1, b'a', 5, 0x08, 0, 2, b'a', b'#'],
        Err(DecodeError::InvalidTopicName(TopicError::WildcardInName)),
    );
    check(
        V5,
        &[0x30, 8, 0, 1, b'a', 4, 0x01, 1, 0x01, 0],
        Err(DecodeError::DuplicateProperty(
            PropertyId::PayloadFormatIndicator,
        )),
    );
    check(
        V5,
        &[0x30, 6, 0, 1, b'a', 2, 0x01, 2],
        Err(DecodeError::InvalidPropertyValue {
            property: PropertyId::PayloadFormatIndicator,
            value: 2,
        }),
    );
    // Property identifiers are variable byte integers: 129 is unknown, and
    // 1 spelled in two bytes breaks the minimal-encoding rule.
    check(
        V5,
        &[0x30, 7, 0, 1, b'a', 3, 0x81, 0x01, 1],
        Err(DecodeError::UnknownProperty(129)),
    );
    check(
        V5,
        &[0x30, 7, 0, 1, b'a', 3, 0x81, 0x00, 1],
        Err(DecodeError::MalformedVarint),
    );
}

#[test]
fn pub_acks() {
    for (first, make) in [
        (0x40u8, Packet::PubAck as fn(PubAck) -> Packet),
        (0x50, Packet::PubRec),
        (0x62, Packet::PubRel),
        (0x70, Packet::PubComp),
    ] {
        check(Protocol::V311, &[first, 2, 0, 9], Ok(make(PubAck::new(9))));
        check(Protocol::V5, &[first, 2, 0, 9], Ok(make(PubAck::new(9))));
        check(
            Protocol::V311,
            &[first, 3, 0, 9, 0],
            Err(DecodeError::TrailingBytes(
                make(PubAck::new(9)).packet_type(),
            )),
        );
        check(
            Protocol::V311,
            &[first, 2, 0, 0],
            Err(DecodeError::ZeroPacketId(
                make(PubAck::new(9)).packet_type(),
            )),
        );
        check(
            Protocol::V311,
            &[first | 0x01, 2, 0, 9],
            Err(DecodeError::InvalidFlags {
                packet: make(PubAck::new(9)).packet_type(),
                flags: (first & 0x0F) | 1,
            }),
        );
        // Reason code only; reason code and properties.
        let mut with_reason = PubAck::new(9);
        let code = if first == 0x62 || first == 0x70 {
            0x92
        } else {
            0x97
        };
        with_reason.reason_code = ReasonCode(code);
        check(
            Protocol::V5,
            &[first, 3, 0, 9, code],
            Ok(make(with_reason.clone())),
        );
        with_reason.properties.reason_string = Some(s("no"));
        check(
            Protocol::V5,
            &[first, 9, 0, 9, code, 5, 0x1F, 0, 2, b'n', b'o'],
            Ok(make(with_reason)),
        );
        // Success with an explicit zero-length property block is accepted
        // (it re-encodes shorter, so it is not a table round-trip).
        let mut buf = BytesMut::from(&[first, 4, 0, 9, 0, 0][..]);
        assert_eq!(
            decode(&mut buf, Protocol::V5, MAX),
            Ok(Some(make(PubAck::new(9))))
        );
    }
    check(
        Protocol::V5,
        &[0x40, 3, 0, 9, 0x92],
        Err(DecodeError::InvalidReasonCode {
            packet: PacketType::PubAck,
            code: 0x92,
        }),
    );
    check(
        Protocol::V5,
        &[0x62, 3, 0, 9, 0x97],
        Err(DecodeError::InvalidReasonCode {
            packet: PacketType::PubRel,
            code: 0x97,
        }),
    );
    check(
        Protocol::V5,
        &[0x40, 5, 0, 9, 0, 1, 0x1F],
        Err(DecodeError::UnexpectedEnd(PacketType::PubAck)),
    );
    check(
        Protocol::V5,
        &[0x40, 6, 0, 9, 0, 2, 0x11, 0],
        Err(DecodeError::UnexpectedEnd(PacketType::PubAck)),
    );
    check(
        Protocol::V5,
        &[0x40, 9, 0, 9, 0, 5, 0x11, 0, 0, 0, 1],
        Err(DecodeError::PropertyNotAllowed {
            property: PropertyId::SessionExpiryInterval,
            packet: "acknowledgement",
        }),
    );
}

#[test]
fn subscribe() {
    let sub = |filter: &'static str, qos: QoS| Subscription {
        filter: s(filter),
        options: SubscriptionOptions {
            qos,
            ..SubscriptionOptions::default()
        },
    };
    let v3 = Subscribe {
        packet_id: 1,
        subscriptions: vec![sub("a/+", QoS::AtLeastOnce), sub("#", QoS::ExactlyOnce)],
        properties: SubscribeProperties::default(),
    };
    check(
        Protocol::V311,
        &[0x82, 12, 0, 1, 0, 3, b'a', b'/', b'+', 1, 0, 1, b'#', 2],
        Ok(Packet::Subscribe(v3)),
    );
    let v5 = Subscribe {
        packet_id: 1,
        subscriptions: vec![Subscription {
            filter: s("$share/g/a"),
            options: SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                no_local: false,
                retain_as_published: true,
                retain_handling: RetainHandling::DoNotSend,
            },
        }],
        properties: SubscribeProperties {
            subscription_identifier: Some(128),
            user_properties: vec![],
        },
    };
    check(
        Protocol::V5,
        &packet(
            0x82,
            &cat(&[&[0, 1, 3, 0x0B, 0x80, 0x01, 0, 10], b"$share/g/a", &[0x29]]),
        ),
        Ok(Packet::Subscribe(v5)),
    );
    for (wire, protocol, error) in [
        (
            vec![0x80, 6, 0, 1, 0, 1, b'a', 0],
            Protocol::V311,
            DecodeError::InvalidFlags {
                packet: PacketType::Subscribe,
                flags: 0,
            },
        ),
        (
            vec![0x82, 2, 0, 1],
            Protocol::V311,
            DecodeError::EmptyPayload(PacketType::Subscribe),
        ),
        (
            vec![0x82, 3, 0, 1, 0],
            Protocol::V5,
            DecodeError::EmptyPayload(PacketType::Subscribe),
        ),
        (
            vec![0x82, 6, 0, 1, 0, 1, b'a', 3],
            Protocol::V311,
            DecodeError::InvalidQos,
        ),
        (
            vec![0x82, 6, 0, 1, 0, 1, b'a', 4],
            Protocol::V311,
            DecodeError::InvalidSubscriptionOptions(4),
        ),
        (
            vec![0x82, 7, 0, 1, 0, 0, 1, b'a', 0x30],
            Protocol::V5,
            DecodeError::InvalidSubscriptionOptions(0x30),
        ),
        (
            vec![0x82, 7, 0, 1, 0, 0, 1, b'a', 0x40],
            Protocol::V5,
            DecodeError::InvalidSubscriptionOptions(0x40),
        ),
        (
            vec![0x82, 5, 0, 1, 0, 1, b'a'],
            Protocol::V311,
            DecodeError::UnexpectedEnd(PacketType::Subscribe),
        ),
        (
            vec![0x82, 8, 0, 1, 0, 3, b'a', b'#', b'b', 0],
            Protocol::V311,
            DecodeError::InvalidTopicFilter(TopicError::MisplacedMultiLevelWildcard),
        ),
        (
            vec![0x82, 7, 0, 1, 0, 2, b'a', b'+', 0],
            Protocol::V311,
            DecodeError::InvalidTopicFilter(TopicError::PartialLevelWildcard),
        ),
        (
            vec![0x82, 5, 0, 1, 0, 0, 0],
            Protocol::V311,
            DecodeError::InvalidTopicFilter(TopicError::Empty),
        ),
        (
            vec![0x82, 6, 0, 0, 0, 1, b'a', 0],
            Protocol::V311,
            DecodeError::ZeroPacketId(PacketType::Subscribe),
        ),
        (
            vec![0x82, 7, 0, 1, 2, 0x0B, 0, 0, 0],
            Protocol::V5,
            DecodeError::InvalidPropertyValue {
                property: PropertyId::SubscriptionIdentifier,
                value: 0,
            },
        ),
    ] {
        check(protocol, &wire, Err(error));
    }
    assert_eq!(
        DecodeError::InvalidTopicFilter(TopicError::Empty).reason_code(),
        ReasonCode::TOPIC_FILTER_INVALID
    );
}

#[test]
fn suback() {
    let ack = SubAck {
        packet_id: 1,
        reason_codes: vec![ReasonCode::GRANTED_QOS_1, ReasonCode(0x80)],
        properties: AckProperties::default(),
    };
    check(
        Protocol::V311,
        &[0x90, 4, 0, 1, 1, 0x80],
        Ok(Packet::SubAck(ack.clone())),
    );
    check(
        Protocol::V5,
        &[0x90, 5, 0, 1, 0, 1, 0x80],
        Ok(Packet::SubAck(ack)),
    );
    check(
        Protocol::V311,
        &[0x90, 3, 0, 1, 0x87],
        Err(DecodeError::InvalidReasonCode {
            packet: PacketType::SubAck,
            code: 0x87,
        }),
    );
    check(
        Protocol::V5,
        &[0x90, 4, 0, 1, 0, 0x92],
        Err(DecodeError::InvalidReasonCode {
            packet: PacketType::SubAck,
            code: 0x92,
        }),
    );
    check(
        Protocol::V5,
        &[0x90, 3, 0, 1, 0],
        Err(DecodeError::EmptyPayload(PacketType::SubAck)),
    );
    // 5.0-only failure codes become 0x80 for a 3.1.1 receiver.
    let mut out = BytesMut::new();
    Packet::SubAck(SubAck {
        packet_id: 2,
        reason_codes: vec![ReasonCode::TOPIC_FILTER_INVALID, ReasonCode::GRANTED_QOS_0],
        properties: AckProperties::default(),
    })
    .encode(Protocol::V311, &mut out)
    .expect("encodes");
    assert_eq!(&out[..], &[0x90, 4, 0, 2, 0x80, 0]);
}

#[test]
fn unsubscribe_and_unsuback() {
    let unsub = Unsubscribe {
        packet_id: 4,
        filters: vec![s("a/#"), s("b")],
        properties: UnsubscribeProperties::default(),
    };
    check(
        Protocol::V311,
        &[0xA2, 10, 0, 4, 0, 3, b'a', b'/', b'#', 0, 1, b'b'],
        Ok(Packet::Unsubscribe(unsub.clone())),
    );
    check(
        Protocol::V5,
        &[0xA2, 11, 0, 4, 0, 0, 3, b'a', b'/', b'#', 0, 1, b'b'],
        Ok(Packet::Unsubscribe(unsub)),
    );
    check(
        Protocol::V311,
        &[0xA2, 2, 0, 4],
        Err(DecodeError::EmptyPayload(PacketType::Unsubscribe)),
    );
    check(
        Protocol::V311,
        &[0xA0, 5, 0, 4, 0, 1, b'b'],
        Err(DecodeError::InvalidFlags {
            packet: PacketType::Unsubscribe,
            flags: 0,
        }),
    );
    check(
        Protocol::V5,
        &[0xA2, 7, 0, 4, 2, 0x0B, 1, 0, 0],
        Err(DecodeError::PropertyNotAllowed {
            property: PropertyId::SubscriptionIdentifier,
            packet: "UNSUBSCRIBE",
        }),
    );
    check(
        Protocol::V311,
        &[0xB0, 2, 0, 4],
        Ok(Packet::UnsubAck(UnsubAck {
            packet_id: 4,
            ..UnsubAck::default()
        })),
    );
    check(
        Protocol::V311,
        &[0xB0, 3, 0, 4, 0],
        Err(DecodeError::TrailingBytes(PacketType::UnsubAck)),
    );
    let v5 = UnsubAck {
        packet_id: 4,
        reason_codes: vec![ReasonCode::SUCCESS, ReasonCode::NO_SUBSCRIPTION_EXISTED],
        properties: AckProperties::default(),
    };
    check(
        Protocol::V5,
        &[0xB0, 5, 0, 4, 0, 0, 0x11],
        Ok(Packet::UnsubAck(v5)),
    );
    check(
        Protocol::V5,
        &[0xB0, 4, 0, 4, 0, 0x01],
        Err(DecodeError::InvalidReasonCode {
            packet: PacketType::UnsubAck,
            code: 1,
        }),
    );
}

#[test]
fn ping_disconnect_auth() {
    for protocol in [Protocol::V311, Protocol::V5] {
        check(protocol, &[0xC0, 0], Ok(Packet::PingReq));
        check(protocol, &[0xD0, 0], Ok(Packet::PingResp));
        check(
            protocol,
            &[0xE0, 0],
            Ok(Packet::Disconnect(Disconnect::default())),
        );
        check(
            protocol,
            &[0xC0, 1, 0],
            Err(DecodeError::TrailingBytes(PacketType::PingReq)),
        );
        check(
            protocol,
            &[0xC1, 0],
            Err(DecodeError::InvalidFlags {
                packet: PacketType::PingReq,
                flags: 1,
            }),
        );
        check(
            protocol,
            &[0xE2, 0],
            Err(DecodeError::InvalidFlags {
                packet: PacketType::Disconnect,
                flags: 2,
            }),
        );
        check(
            protocol,
            &[0x00, 0],
            Err(DecodeError::ReservedPacketType(0)),
        );
    }
    check(
        Protocol::V311,
        &[0xE0, 1, 0x8E],
        Err(DecodeError::TrailingBytes(PacketType::Disconnect)),
    );
    check(
        Protocol::V5,
        &[0xE0, 1, 0x8E],
        Ok(Packet::Disconnect(Disconnect::new(
            ReasonCode::SESSION_TAKEN_OVER,
        ))),
    );
    let mut d = Disconnect::new(ReasonCode::DISCONNECT_WITH_WILL_MESSAGE);
    d.properties.session_expiry_interval = Some(0);
    check(
        Protocol::V5,
        &[0xE0, 7, 0x04, 5, 0x11, 0, 0, 0, 0],
        Ok(Packet::Disconnect(d)),
    );
    check(
        Protocol::V5,
        &[0xE0, 1, 0x01],
        Err(DecodeError::InvalidReasonCode {
            packet: PacketType::Disconnect,
            code: 1,
        }),
    );
    // AUTH exists only in 5.0.
    check(
        Protocol::V311,
        &[0xF0, 0],
        Err(DecodeError::ReservedPacketType(15)),
    );
    check(Protocol::V5, &[0xF0, 0], Ok(Packet::Auth(Auth::default())));
    let auth = Auth {
        reason_code: ReasonCode::CONTINUE_AUTHENTICATION,
        properties: AuthProperties {
            authentication_method: Some(s("SCRAM")),
            authentication_data: Some(Bytes::from_static(&[1, 2])),
            ..AuthProperties::default()
        },
    };
    check(
        Protocol::V5,
        &[
            0xF0, 15, 0x18, 13, 0x15, 0, 5, b'S', b'C', b'R', b'A', b'M', 0x16, 0, 2, 1, 2,
        ],
        Ok(Packet::Auth(auth)),
    );
    check(
        Protocol::V5,
        &[0xF0, 2, 0x87, 0],
        Err(DecodeError::InvalidReasonCode {
            packet: PacketType::Auth,
            code: 0x87,
        }),
    );
    let mut out = BytesMut::new();
    assert_eq!(
        Packet::Auth(Auth::default()).encode(Protocol::V311, &mut out),
        Err(EncodeError::NotInProtocol(PacketType::Auth))
    );
}

#[test]
fn auth_with_reason_code_but_no_property_length_is_malformed() {
    // Found by fuzzing: `F0 01 18` was accepted and re-encoded longer.
    check(
        Protocol::V5,
        &[0xF0, 1, 0x18],
        Err(DecodeError::UnexpectedEnd(PacketType::Auth)),
    );
    // DISCONNECT and PUBACK may drop the property length alone.
    check(
        Protocol::V5,
        &[0xE0, 1, 0x8E],
        Ok(Packet::Disconnect(Disconnect::new(
            ReasonCode::SESSION_TAKEN_OVER,
        ))),
    );
}

#[test]
fn a_declared_length_reserves_no_memory_before_the_bytes_arrive() {
    // Found by fuzzing: a 5-byte header made the decoder reserve the whole
    // announced packet (up to the maximum packet size) per connection.
    let mut buf = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F][..]);
    assert_eq!(decode(&mut buf, Protocol::V5, u32::MAX), Ok(None));
    assert!(buf.capacity() < 4096, "reserved {} bytes", buf.capacity());
}

#[test]
fn fixed_header_limits() {
    // A remaining length with a fifth byte is malformed, even before the body arrives.
    let mut buf = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01][..]);
    assert_eq!(
        decode(&mut buf, Protocol::V5, u32::MAX),
        Err(DecodeError::MalformedRemainingLength)
    );
    // A remaining length that is not minimally encoded is malformed [MQTT-1.5.5-1].
    let mut buf = BytesMut::from(&[0xC0, 0x80, 0x00][..]);
    assert_eq!(
        decode(&mut buf, Protocol::V5, MAX),
        Err(DecodeError::MalformedRemainingLength)
    );
    // The maximum packet size is enforced from the header alone.
    let mut buf = BytesMut::from(&[0x30, 0xFF, 0xFF, 0x7F][..]);
    assert_eq!(
        decode(&mut buf, Protocol::V5, MAX),
        Err(DecodeError::PacketTooLarge {
            size: 4 + 2_097_151,
            max: MAX
        })
    );
    assert_eq!(
        DecodeError::PacketTooLarge { size: 0, max: 0 }.reason_code(),
        ReasonCode::PACKET_TOO_LARGE
    );
    // Exactly at the limit is fine.
    let wire = [0x30, 7, 0, 3, b'a', b'/', b'b', b'h', b'i'];
    let mut buf = BytesMut::from(&wire[..]);
    assert!(matches!(
        decode(&mut buf, Protocol::V311, 9),
        Ok(Some(Packet::Publish(_)))
    ));
    let mut buf = BytesMut::from(&wire[..]);
    assert!(matches!(
        decode(&mut buf, Protocol::V311, 8),
        Err(DecodeError::PacketTooLarge { size: 9, max: 8 })
    ));
    // Two packets in one buffer come out one at a time.
    let mut buf = BytesMut::from(&[0xC0, 0, 0xD0, 0, 0xC0][..]);
    assert_eq!(
        decode(&mut buf, Protocol::V311, MAX),
        Ok(Some(Packet::PingReq))
    );
    assert_eq!(
        decode(&mut buf, Protocol::V311, MAX),
        Ok(Some(Packet::PingResp))
    );
    assert_eq!(decode(&mut buf, Protocol::V311, MAX), Ok(None));
    assert_eq!(&buf[..], &[0xC0]);
}

#[test]
fn decoded_payload_shares_the_receive_buffer() {
    let wire = [0x30, 7, 0, 3, b'a', b'/', b'b', b'h', b'i'];
    let mut buf = BytesMut::from(&wire[..]);
    let start = buf.as_ptr() as usize;
    let Ok(Some(Packet::Publish(p))) = decode(&mut buf, Protocol::V311, MAX) else {
        panic!("not a publish");
    };
    assert_eq!(p.payload.as_ptr() as usize, start + 7, "payload was copied");
    assert_eq!(p.topic.as_ptr() as usize, start + 4, "topic was copied");
}

#[test]
fn encode_refuses_what_cannot_be_sent() {
    let mut out = BytesMut::new();
    let mut p = publish(QoS::AtLeastOnce, 0);
    assert_eq!(
        Packet::Publish(p.clone()).encode(Protocol::V311, &mut out),
        Err(EncodeError::ZeroPacketId(PacketType::Publish))
    );
    p.packet_id = 1;
    p.topic = s("a/#");
    assert_eq!(
        p.encode(Protocol::V311, &mut out),
        Err(EncodeError::InvalidTopic(TopicError::WildcardInName))
    );
    p.topic = s("a");
    p.properties.subscription_identifiers = vec![0];
    assert_eq!(
        p.encode(Protocol::V5, &mut out),
        Err(EncodeError::InvalidPropertyValue {
            property: PropertyId::SubscriptionIdentifier,
            value: 0
        })
    );
    // ... but 3.1.1 drops properties, so the same packet is fine there.
    assert!(p.encode(Protocol::V311, &mut out).is_ok());
    p.properties = PublishProperties {
        correlation_data: Some(Bytes::from(vec![0; 70_000])),
        ..PublishProperties::default()
    };
    assert_eq!(
        p.encode(Protocol::V5, &mut out),
        Err(EncodeError::BinaryTooLong(70_000))
    );
    let sub = Subscribe {
        packet_id: 1,
        subscriptions: vec![],
        properties: SubscribeProperties::default(),
    };
    assert_eq!(
        Packet::Subscribe(sub).encode(Protocol::V5, &mut out),
        Err(EncodeError::EmptyPayload(PacketType::Subscribe))
    );
    let mut c = connect(Protocol::V311);
    c.password = Some(Bytes::from_static(b"p"));
    assert_eq!(
        Packet::Connect(Box::new(c)).encode(Protocol::V311, &mut out),
        Err(EncodeError::PasswordWithoutUsername)
    );
    // DUP is never sent at QoS 0.
    let mut out = BytesMut::new();
    let mut p = publish(QoS::AtMostOnce, 0);
    p.dup = true;
    p.encode(Protocol::V311, &mut out).expect("encodes");
    assert_eq!(out[0], 0x30);
}

#[test]
fn large_remaining_lengths_round_trip() {
    for size in [127usize, 128, 16_383, 16_384, 2_097_152] {
        let mut p = publish(QoS::AtMostOnce, 0);
        p.payload = Bytes::from(vec![7u8; size]);
        let mut out = BytesMut::new();
        let n = p.encode(Protocol::V5, &mut out).expect("encodes");
        assert_eq!(n, out.len());
        let got = decode(&mut out, Protocol::V5, u32::MAX).expect("decodes");
        assert_eq!(got, Some(Packet::Publish(p)));
    }
}

#[test]
fn publish_property_blocks_round_trip_for_storage() {
    let p = PublishProperties {
        payload_format_indicator: Some(PayloadFormat::Utf8),
        message_expiry_interval: Some(9),
        content_type: Some(s("text/plain")),
        response_topic: Some(s("r/t")),
        correlation_data: Some(Bytes::from_static(b"id")),
        subscription_identifiers: vec![],
        topic_alias: None,
        user_properties: vec![(s("a"), s("1")), (s("a"), s("2"))],
    };
    let mut buf = BytesMut::new();
    p.encode_block(&mut buf).expect("encodes");
    buf.extend_from_slice(b"rest");
    let bytes = buf.freeze();
    let (back, used) = PublishProperties::decode_block(&bytes).expect("decodes");
    assert_eq!(back, p);
    assert_eq!(&bytes[used..], b"rest");
    assert!(PublishProperties::decode_block(&Bytes::from_static(&[5, 0x01])).is_err());
}
