//! Property tests: every packet the codec can build survives encode ->
//! decode unchanged, in both protocol versions, and no input makes the
//! decoder panic or mis-frame.

use bytes::{Bytes, BytesMut};
use ferrymq_codec::*;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

fn text() -> impl Strategy<Value = MqttString> {
    "[a-zA-Z0-9 éü/_-]{0,12}".prop_map(|t| MqttString::new(&t).expect("valid"))
}

fn topic_name() -> impl Strategy<Value = MqttString> {
    "[a-z$]{0,3}(/[a-zA-Z0-9 é]{0,5}){0,4}"
        .prop_filter("non-empty", |t| !t.is_empty())
        .prop_map(|t| MqttString::new(&t).expect("valid"))
}

fn topic_filter() -> impl Strategy<Value = MqttString> {
    let level = prop_oneof!["[a-z0-9]{0,4}", Just("+".to_string())];
    (vec(level, 1..5), any::<bool>(), option::of("[a-z]{1,4}")).prop_map(|(levels, hash, share)| {
        let mut f = levels.join("/");
        if f.is_empty() {
            f.push('x');
        }
        if hash {
            f.push_str("/#");
        }
        if let Some(name) = share {
            f = format!("$share/{name}/{f}");
        }
        MqttString::new(&f).expect("valid")
    })
}

fn binary() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..16).prop_map(Bytes::from)
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn user() -> impl Strategy<Value = Vec<UserProperty>> {
    vec((text(), text()), 0..3)
}

fn packet_id() -> impl Strategy<Value = u16> {
    1..=u16::MAX
}

fn reason(allowed: &'static [u8]) -> impl Strategy<Value = ReasonCode> {
    proptest::sample::select(allowed).prop_map(ReasonCode)
}

fn ack_props(v5: bool) -> BoxedStrategy<AckProperties> {
    if !v5 {
        return Just(AckProperties::default()).boxed();
    }
    (option::of(text()), user())
        .prop_map(|(reason_string, user_properties)| AckProperties {
            reason_string,
            user_properties,
        })
        .boxed()
}

fn format() -> impl Strategy<Value = PayloadFormat> {
    prop_oneof![Just(PayloadFormat::Unspecified), Just(PayloadFormat::Utf8)]
}

fn publish(v5: bool) -> impl Strategy<Value = Publish> {
    let props = if v5 {
        (
            option::of(format()),
            option::of(any::<u32>()),
            option::of(text()),
            option::of(topic_name()),
            option::of(binary()),
            vec(1..=MAX_VARINT, 0..3),
            option::of(1..=u16::MAX),
            user(),
        )
            .prop_map(|(f, e, ct, rt, cd, ids, alias, user)| PublishProperties {
                payload_format_indicator: f,
                message_expiry_interval: e,
                content_type: ct,
                response_topic: rt,
                correlation_data: cd,
                subscription_identifiers: ids,
                topic_alias: alias,
                user_properties: user,
            })
            .boxed()
    } else {
        Just(PublishProperties::default()).boxed()
    };
    (
        qos(),
        any::<bool>(),
        any::<bool>(),
        topic_name(),
        packet_id(),
        binary(),
        props,
    )
        .prop_map(|(qos, dup, retain, topic, id, payload, properties)| {
            let at_most_once = qos == QoS::AtMostOnce;
            Publish {
                dup: dup && !at_most_once,
                qos,
                retain,
                topic,
                packet_id: if at_most_once { 0 } else { id },
                payload,
                properties,
            }
        })
}

fn connect(v5: bool) -> impl Strategy<Value = Connect> {
    let props = if v5 {
        (
            option::of(any::<u32>()),
            option::of(text()),
            option::of(binary()),
            option::of(any::<bool>()),
            option::of(any::<bool>()),
            option::of(1..=u16::MAX),
            option::of(any::<u16>()),
            option::of(1..=u32::MAX),
            user(),
        )
            .prop_map(
                |(se, am, ad, rpi, rri, rm, tam, mps, user)| ConnectProperties {
                    session_expiry_interval: se,
                    authentication_method: am,
                    authentication_data: ad,
                    request_problem_information: rpi,
                    request_response_information: rri,
                    receive_maximum: rm,
                    topic_alias_maximum: tam,
                    maximum_packet_size: mps,
                    user_properties: user,
                },
            )
            .boxed()
    } else {
        Just(ConnectProperties::default()).boxed()
    };
    let will_props = if v5 {
        (
            option::of(format()),
            option::of(any::<u32>()),
            option::of(text()),
            option::of(topic_name()),
            option::of(binary()),
            option::of(any::<u32>()),
            user(),
        )
            .prop_map(|(f, e, ct, rt, cd, delay, user)| WillProperties {
                payload_format_indicator: f,
                message_expiry_interval: e,
                content_type: ct,
                response_topic: rt,
                correlation_data: cd,
                will_delay_interval: delay,
                user_properties: user,
            })
            .boxed()
    } else {
        Just(WillProperties::default()).boxed()
    };
    let will = option::of(
        (topic_name(), binary(), qos(), any::<bool>(), will_props).prop_map(
            |(topic, payload, qos, retain, properties)| Will {
                topic,
                payload,
                qos,
                retain,
                properties,
            },
        ),
    );
    (
        any::<bool>(),
        any::<u16>(),
        text(),
        will,
        option::of(text()),
        option::of(binary()),
        props,
    )
        .prop_map(
            move |(clean_start, keep_alive, client_id, will, username, password, properties)| {
                Connect {
                    protocol: if v5 { Protocol::V5 } else { Protocol::V311 },
                    clean_start,
                    keep_alive,
                    client_id,
                    will,
                    // 3.1.1 cannot carry a password without a user name.
                    password: if v5 || username.is_some() {
                        password
                    } else {
                        None
                    },
                    username,
                    properties,
                }
            },
        )
}

fn connack(v5: bool) -> BoxedStrategy<ConnAck> {
    if !v5 {
        return (any::<bool>(), reason(&[0x00, 0x84, 0x85, 0x88, 0x86, 0x87]))
            .prop_map(|(session_present, reason_code)| ConnAck {
                session_present,
                reason_code,
                properties: ConnAckProperties::default(),
            })
            .boxed();
    }
    let props = (
        (
            option::of(any::<u32>()),
            option::of(text()),
            option::of(any::<u16>()),
            option::of(text()),
            option::of(binary()),
            option::of(text()),
        ),
        (
            option::of(text()),
            option::of(text()),
            option::of(1..=u16::MAX),
            option::of(any::<u16>()),
        ),
        (
            option::of(prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce)]),
            option::of(any::<bool>()),
            option::of(1..=u32::MAX),
            option::of(any::<bool>()),
            option::of(any::<bool>()),
            option::of(any::<bool>()),
            user(),
        ),
    )
        .prop_map(
            |(
                (se, aci, ska, am, ad, ri),
                (sr, rs, rm, tam),
                (mq, ra, mps, wsa, sia, ssa, user),
            )| ConnAckProperties {
                session_expiry_interval: se,
                assigned_client_identifier: aci,
                server_keep_alive: ska,
                authentication_method: am,
                authentication_data: ad,
                response_information: ri,
                server_reference: sr,
                reason_string: rs,
                receive_maximum: rm,
                topic_alias_maximum: tam,
                maximum_qos: mq,
                retain_available: ra,
                maximum_packet_size: mps,
                wildcard_subscription_available: wsa,
                subscription_identifier_available: sia,
                shared_subscription_available: ssa,
                user_properties: user,
            },
        );
    (
        any::<bool>(),
        reason(&[0x00, 0x80, 0x81, 0x82, 0x85, 0x87, 0x8C, 0x9F]),
        props,
    )
        .prop_map(|(session_present, reason_code, properties)| ConnAck {
            session_present,
            reason_code,
            properties,
        })
        .boxed()
}

fn packet(v5: bool) -> impl Strategy<Value = Packet> {
    let pub_reason: &'static [u8] = if v5 {
        &[0x00, 0x10, 0x80, 0x97]
    } else {
        &[0x00]
    };
    let rel_reason: &'static [u8] = if v5 { &[0x00, 0x92] } else { &[0x00] };
    let pub_ack = (packet_id(), reason(pub_reason), ack_props(v5))
        .boxed()
        .prop_map(|(packet_id, reason_code, properties)| PubAck {
            packet_id,
            reason_code,
            properties,
        })
        .boxed();
    let pub_rel = (packet_id(), reason(rel_reason), ack_props(v5))
        .boxed()
        .prop_map(|(packet_id, reason_code, properties)| PubAck {
            packet_id,
            reason_code,
            properties,
        })
        .boxed();
    let options =
        (qos(), any::<bool>(), any::<bool>(), 0u8..3).prop_map(move |(qos, nl, rap, rh)| {
            if v5 {
                SubscriptionOptions {
                    qos,
                    no_local: nl,
                    retain_as_published: rap,
                    retain_handling: [
                        RetainHandling::SendAtSubscribe,
                        RetainHandling::SendIfNew,
                        RetainHandling::DoNotSend,
                    ][rh as usize],
                }
            } else {
                SubscriptionOptions {
                    qos,
                    ..SubscriptionOptions::default()
                }
            }
        });
    let sub_props = if v5 {
        (option::of(1..=MAX_VARINT), user())
            .prop_map(|(id, user)| SubscribeProperties {
                subscription_identifier: id,
                user_properties: user,
            })
            .boxed()
    } else {
        Just(SubscribeProperties::default()).boxed()
    };
    let subscribe = (
        packet_id(),
        vec(
            (topic_filter(), options)
                .prop_map(|(filter, options)| Subscription { filter, options }),
            1..4,
        ),
        sub_props,
    )
        .prop_map(|(packet_id, subscriptions, properties)| Subscribe {
            packet_id,
            subscriptions,
            properties,
        });
    let suback_codes: &'static [u8] = if v5 {
        &[0, 1, 2, 0x80, 0x8F, 0xA2]
    } else {
        &[0, 1, 2, 0x80]
    };
    let suback = (packet_id(), vec(reason(suback_codes), 1..4), ack_props(v5)).prop_map(
        |(packet_id, reason_codes, properties)| SubAck {
            packet_id,
            reason_codes,
            properties,
        },
    );
    let unsub_props = if v5 {
        user()
            .prop_map(|user_properties| UnsubscribeProperties { user_properties })
            .boxed()
    } else {
        Just(UnsubscribeProperties::default()).boxed()
    };
    let unsubscribe = (packet_id(), vec(topic_filter(), 1..4), unsub_props).prop_map(
        |(packet_id, filters, properties)| Unsubscribe {
            packet_id,
            filters,
            properties,
        },
    );
    let unsuback_count = if v5 { 1..4usize } else { 0..1usize };
    let unsuback = (
        packet_id(),
        vec(reason(&[0x00, 0x11, 0x80, 0x8F]), unsuback_count),
        ack_props(v5),
    )
        .prop_map(|(packet_id, reason_codes, properties)| UnsubAck {
            packet_id,
            reason_codes,
            properties,
        });
    let disconnect = if v5 {
        (
            reason(&[0x00, 0x04, 0x8B, 0x8E, 0x93]),
            option::of(any::<u32>()),
            option::of(text()),
            option::of(text()),
            user(),
        )
            .prop_map(|(reason_code, se, sr, rs, user)| Disconnect {
                reason_code,
                properties: DisconnectProperties {
                    session_expiry_interval: se,
                    server_reference: sr,
                    reason_string: rs,
                    user_properties: user,
                },
            })
            .boxed()
    } else {
        Just(Disconnect::default()).boxed()
    };
    let auth = (
        reason(&[0x00, 0x18, 0x19]),
        option::of(text()),
        option::of(binary()),
        option::of(text()),
        user(),
    )
        .prop_map(|(reason_code, am, ad, rs, user)| Auth {
            reason_code,
            properties: AuthProperties {
                authentication_method: am,
                authentication_data: ad,
                reason_string: rs,
                user_properties: user,
            },
        });
    let common = prop_oneof![
        connect(v5).prop_map(|c| Packet::Connect(Box::new(c))),
        connack(v5).prop_map(|c| Packet::ConnAck(Box::new(c))),
        publish(v5).prop_map(Packet::Publish),
        pub_ack.clone().prop_map(Packet::PubAck),
        pub_ack.prop_map(Packet::PubRec),
        pub_rel.clone().prop_map(Packet::PubRel),
        pub_rel.prop_map(Packet::PubComp),
        subscribe.prop_map(Packet::Subscribe),
        suback.prop_map(Packet::SubAck),
        unsubscribe.prop_map(Packet::Unsubscribe),
        unsuback.prop_map(Packet::UnsubAck),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        disconnect.prop_map(Packet::Disconnect),
    ];
    if v5 {
        prop_oneof![14 => common, 1 => auth.prop_map(Packet::Auth)].boxed()
    } else {
        common.boxed()
    }
}

fn round_trip(packet: &Packet, protocol: Protocol) -> Result<(), TestCaseError> {
    let mut buf = BytesMut::new();
    let n = packet
        .encode(protocol, &mut buf)
        .expect("a generated packet encodes");
    prop_assert_eq!(n, buf.len());
    prop_assert_eq!(packet.encoded_len(protocol), Ok(n));
    let decoded = decode(&mut buf, protocol, u32::MAX);
    prop_assert_eq!(decoded, Ok(Some(packet.clone())));
    prop_assert!(buf.is_empty());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2000,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_v311_packet_round_trips(packet in packet(false)) {
        round_trip(&packet, Protocol::V311)?;
    }

    #[test]
    fn every_v5_packet_round_trips(packet in packet(true)) {
        round_trip(&packet, Protocol::V5)?;
    }

    #[test]
    fn a_stream_of_packets_splits_at_any_point(packets in vec(packet(true), 1..6), cut in any::<prop::sample::Index>()) {
        let mut wire = BytesMut::new();
        for p in &packets {
            p.encode(Protocol::V5, &mut wire).expect("encodes");
        }
        let cut = cut.index(wire.len() + 1);
        let rest = wire.split_off(cut);
        let mut buf = wire;
        let mut got = Vec::new();
        while let Some(p) = decode(&mut buf, Protocol::V5, u32::MAX).expect("valid stream") {
            got.push(p);
        }
        buf.extend_from_slice(&rest);
        while let Some(p) = decode(&mut buf, Protocol::V5, u32::MAX).expect("valid stream") {
            got.push(p);
        }
        prop_assert_eq!(got, packets);
        prop_assert!(buf.is_empty());
    }

    /// Arbitrary bytes never panic the decoder, and whatever decodes is
    /// re-encoded to something that decodes to the same packet.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..64), v5 in any::<bool>()) {
        let protocol = if v5 { Protocol::V5 } else { Protocol::V311 };
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(packet)) = decode(&mut buf, protocol, 1 << 16) {
            let version = match &packet { Packet::Connect(c) => c.protocol, _ => protocol };
            let mut out = BytesMut::new();
            if packet.encode(version, &mut out).is_ok() {
                prop_assert_eq!(decode(&mut out, version, u32::MAX), Ok(Some(packet)));
            }
        }
    }
}
