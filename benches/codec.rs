//! Codec micro-benchmarks: decode and encode of the packets on the hot
//! path (PUBLISH at several sizes, in both versions; acknowledgements),
//! and the same 3.1.1 PUBLISH through rumqttc's codec (`mqttbytes`) as a
//! peer measured in the same run.
//!
//! Run: `cargo bench --bench codec`. Under `cargo test --benches` each
//! benchmark runs once, as a smoke test.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ferrymq_codec::{MqttString, Packet, Protocol, PubAck, Publish, QoS, decode};

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
            let mut wire = BytesMut::new();
            packet.encode(protocol, &mut wire).expect("encodes");
            let wire = wire.freeze();
            let id = format!("{protocol:?}/{size}B");
            group.throughput(Throughput::Bytes(wire.len() as u64));
            group.bench_with_input(BenchmarkId::new("decode", &id), &wire, |b, wire| {
                b.iter(|| {
                    let mut buf = BytesMut::from(&wire[..]);
                    black_box(decode(&mut buf, protocol, u32::MAX).expect("decodes"))
                })
            });
            let mut out = BytesMut::with_capacity(wire.len() * 2);
            group.bench_with_input(BenchmarkId::new("encode", &id), &packet, |b, packet| {
                b.iter(|| {
                    out.clear();
                    black_box(packet.encode(protocol, &mut out).expect("encodes"))
                })
            });
            if protocol == Protocol::V311 {
                peer_rumqttc(&mut group, &wire, &id);
            }
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
