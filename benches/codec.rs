//! Codec micro-benchmarks: decode and encode of the packets on the hot
//! path (PUBLISH at several sizes, in both versions; acknowledgements),
//! of a typical packet of every other type in both versions,
//! and the same 3.1.1 PUBLISH through rumqttc's codec (`mqttbytes`) as a
//! peer measured in the same run.
//!
//! Run: `cargo bench --bench codec`. Under `cargo test --benches` each
//! benchmark runs once, as a smoke test.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ferrymq_codec::{
    AckProperties, Auth, AuthProperties, Connect, ConnectProperties, Disconnect, MqttString,
    Packet, Protocol, PubAck, Publish, QoS, ReasonCode, SubAck, Subscribe, SubscribeProperties,
    Subscription, SubscriptionOptions, UnsubAck, Unsubscribe, UnsubscribeProperties, decode,
};

fn publish(payload: usize, protocol: Protocol) -> Publish {
    let mut p = Publish {
        qos: QoS::AtLeastOnce,
        packet_id: 42,
        topic: MqttString::from_static("site-1/sensors/boiler-3/temperature"),
        payload: Bytes::from(vec![0x5A; payload]),
        ..Publish::default()
    };
    if protocol == Protocol::V5 {
        p.properties.message_expiry_interval = Some(3600);
        p.properties.user_properties.push((
            MqttString::from_static("unit"),
            MqttString::from_static("celsius"),
        ));
    }
    p
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("publish");
    for protocol in [Protocol::V311, Protocol::V5] {
        for size in [64usize, 1024, 16 * 1024] {
            let packet = Packet::Publish(publish(size, protocol));
            let id = format!("{protocol:?}/{size}B");
            let wire = decode_and_encode(&mut group, &id, &packet, protocol, true);
            if protocol == Protocol::V311 {
                peer_rumqttc(&mut group, &wire, &id);
            }
        }
    }
    group.finish();

    // Every other packet type, in both versions where it exists.
    let mut group = c.benchmark_group("packet");
    for protocol in [Protocol::V311, Protocol::V5] {
        for (name, packet) in other_packets(protocol) {
            let id = format!("{protocol:?}/{name}");
            decode_and_encode(&mut group, &id, &packet, protocol, false);
        }
    }
    group.finish();

    // Many small packets in one buffer, as a socket read delivers them.
    let mut stream = BytesMut::new();
    for i in 1..=1000u16 {
        Packet::PubAck(PubAck::new(i))
            .encode(Protocol::V5, &mut stream)
            .expect("encodes");
    }
    let stream = stream.freeze();
    let mut group = c.benchmark_group("stream");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("decode 1000 PUBACK", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&stream[..]);
            let mut n = 0;
            while let Some(p) = decode(&mut buf, Protocol::V5, u32::MAX).expect("decodes") {
                black_box(p);
                n += 1;
            }
            assert_eq!(n, 1000);
        })
    });
    group.finish();
}

/// Benchmarks decoding `packet`'s wire bytes and encoding it (throughput
/// in bytes or in packets); returns the wire bytes.
fn decode_and_encode(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    id: &str,
    packet: &Packet,
    protocol: Protocol,
    per_byte: bool,
) -> Bytes {
    let mut wire = BytesMut::new();
    packet.encode(protocol, &mut wire).expect("encodes");
    let wire = wire.freeze();
    group.throughput(if per_byte {
        Throughput::Bytes(wire.len() as u64)
    } else {
        Throughput::Elements(1)
    });
    group.bench_with_input(BenchmarkId::new("decode", id), &wire, |b, wire| {
        b.iter(|| {
            let mut buf = BytesMut::from(&wire[..]);
            black_box(decode(&mut buf, protocol, u32::MAX).expect("decodes"))
        })
    });
    let mut out = BytesMut::with_capacity(wire.len() * 2);
    group.bench_with_input(BenchmarkId::new("encode", id), packet, |b, packet| {
        b.iter(|| {
            out.clear();
            black_box(packet.encode(protocol, &mut out).expect("encodes"))
        })
    });
    wire
}

/// A typical packet of every type but PUBLISH (AUTH: 5.0 only).
fn other_packets(protocol: Protocol) -> Vec<(&'static str, Packet)> {
    let s = MqttString::from_static;
    let mut connect = Connect {
        protocol,
        clean_start: false,
        keep_alive: 60,
        client_id: s("gateway-17/boiler-3"),
        will: None,
        username: Some(s("boiler-3")),
        password: Some(Bytes::from_static(b"correct horse battery staple")),
        properties: ConnectProperties::default(),
    };
    if protocol == Protocol::V5 {
        connect.properties.session_expiry_interval = Some(86_400);
        connect.properties.receive_maximum = Some(100);
    }
    let filters = [s("site-1/sensors/+/temperature"), s("site-1/cmd/#")];
    let subscribe = Subscribe {
        packet_id: 7,
        subscriptions: filters
            .iter()
            .map(|f| Subscription {
                filter: f.clone(),
                options: SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    ..SubscriptionOptions::default()
                },
            })
            .collect(),
        properties: SubscribeProperties::default(),
    };
    let mut packets = vec![
        ("CONNECT", Packet::Connect(Box::new(connect))),
        ("CONNACK", Packet::ConnAck(Box::default())),
        ("PUBACK", Packet::PubAck(PubAck::new(7))),
        ("PUBREC", Packet::PubRec(PubAck::new(7))),
        ("PUBREL", Packet::PubRel(PubAck::new(7))),
        ("PUBCOMP", Packet::PubComp(PubAck::new(7))),
        ("SUBSCRIBE", Packet::Subscribe(subscribe)),
        (
            "SUBACK",
            Packet::SubAck(SubAck {
                packet_id: 7,
                reason_codes: vec![ReasonCode::GRANTED_QOS_1; 2],
                properties: AckProperties::default(),
            }),
        ),
        (
            "UNSUBSCRIBE",
            Packet::Unsubscribe(Unsubscribe {
                packet_id: 8,
                filters: filters.to_vec(),
                properties: UnsubscribeProperties::default(),
            }),
        ),
        (
            "UNSUBACK",
            Packet::UnsubAck(UnsubAck {
                packet_id: 8,
                reason_codes: if protocol == Protocol::V5 {
                    vec![ReasonCode::SUCCESS; 2]
                } else {
                    Vec::new()
                },
                properties: AckProperties::default(),
            }),
        ),
        ("PINGREQ", Packet::PingReq),
        ("PINGRESP", Packet::PingResp),
        ("DISCONNECT", Packet::Disconnect(Disconnect::default())),
    ];
    if protocol == Protocol::V5 {
        packets.push((
            "AUTH",
            Packet::Auth(Auth {
                reason_code: ReasonCode::CONTINUE_AUTHENTICATION,
                properties: AuthProperties {
                    authentication_method: Some(s("SCRAM-SHA-256")),
                    authentication_data: Some(Bytes::from_static(&[0x5A; 32])),
                    ..AuthProperties::default()
                },
            }),
        ));
    }
    packets
}

/// The same wire bytes through rumqttc's 3.1.1 codec.
fn peer_rumqttc(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    wire: &Bytes,
    id: &str,
) {
    group.bench_with_input(BenchmarkId::new("decode-rumqttc", id), wire, |b, wire| {
        b.iter(|| {
            let mut buf = BytesMut::from(&wire[..]);
            black_box(rumqttc::Packet::read(&mut buf, usize::MAX).expect("decodes"))
        })
    });
    let mut buf = BytesMut::from(&wire[..]);
    let packet = rumqttc::Packet::read(&mut buf, usize::MAX).expect("decodes");
    let mut out = BytesMut::with_capacity(wire.len() * 2);
    group.bench_with_input(
        BenchmarkId::new("encode-rumqttc", id),
        &packet,
        |b, packet| {
            b.iter(|| {
                out.clear();
                black_box(packet.write(&mut out, usize::MAX).expect("encodes"))
            })
        },
    );
}

criterion_group!(benches, codec);
criterion_main!(benches);
