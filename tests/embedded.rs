//! The broker as a library: the in-process client, a pluggable store
//! (a deliberately slow one, and recovery from one), and TCP clients
//! beside in-process ones.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Raw, connect_packet, s};
use ferrymq_broker::{Broker, ClientOptions, MemoryStore, QoS, Store};
use ferrymq_codec::{
    Packet, Protocol, PubAck, Publish, ReasonCode, Subscribe, Subscription, SubscriptionOptions,
};
use ferrymq_config::Config;

fn config(dir: &tempfile::TempDir) -> Config {
    let mut config = Config {
        data_dir: dir.path().join("data"),
        ..Config::default()
    };
    config.listeners[0].bind = "127.0.0.1:0".parse().unwrap();
    config
}

async fn recv(client: &mut ferrymq_broker::Client) -> ferrymq_broker::Received {
    tokio::time::timeout(Duration::from_secs(5), client.recv())
        .await
        .expect("a message in time")
        .expect("connection open")
}

// Multi-threaded: the raw TCP client below blocks its thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_clients_publish_and_subscribe_with_acks() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(config(&dir)).await.unwrap();
    let mut sensor_app = broker.connect(ClientOptions::new("app")).await.unwrap();
    assert_eq!(
        sensor_app
            .subscribe("sensors/+/temp", QoS::ExactlyOnce)
            .await,
        Ok(QoS::ExactlyOnce)
    );
    let firmware = broker
        .connect(ClientOptions::new("firmware"))
        .await
        .unwrap();
    for (qos, payload) in [
        (QoS::AtMostOnce, "19.5"),
        (QoS::AtLeastOnce, "20.0"),
        (QoS::ExactlyOnce, "20.5"),
    ] {
        firmware
            .publish("sensors/boiler/temp", payload, qos, false)
            .await
            .unwrap();
        let got = recv(&mut sensor_app).await;
        assert_eq!((got.payload, got.qos), (Bytes::from(payload), qos));
    }
    // A retained state reaches later subscribers, in-process or over TCP.
    firmware
        .publish("state/boiler", "on", QoS::AtLeastOnce, true)
        .await
        .unwrap();
    let late = broker.connect(ClientOptions::new("late")).await.unwrap();
    let mut late = late;
    late.subscribe("state/#", QoS::AtLeastOnce).await.unwrap();
    let got = recv(&mut late).await;
    assert!(got.retain);
    let mut tcp = Raw::connect(broker.local_addrs()[0], Protocol::V311, "tcp-client");
    tcp.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        subscriptions: vec![Subscription {
            filter: s("state/boiler"),
            options: SubscriptionOptions::default(),
        }],
        properties: Default::default(),
    }));
    assert!(matches!(tcp.recv(), Some(Packet::SubAck(_))));
    assert!(matches!(tcp.recv(), Some(Packet::Publish(p)) if p.payload == "on" && p.retain));
    // Invalid requests are refused without touching the connection.
    assert!(
        firmware
            .publish("a/+", "x", QoS::AtMostOnce, false)
            .await
            .is_err()
    );
    firmware
        .publish("sensors/x/temp", "still fine", QoS::AtLeastOnce, false)
        .await
        .unwrap();
    assert_eq!(recv(&mut sensor_app).await.payload, "still fine");
    firmware.disconnect().await;
    broker.shutdown().await;
    // The broker is gone: the client sees the end.
    assert!(sensor_app.recv().await.is_none());
}

#[tokio::test]
async fn a_slow_store_delays_pubacks_in_order_while_other_traffic_flows() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemoryStore::with_write_delay(Duration::from_millis(50));
    let broker = Broker::start_with_store(config(&dir), store).await.unwrap();
    let addr = broker.local_addrs()[0];
    tokio::task::spawn_blocking(move || {
        // A persistent subscriber: QoS 1 messages for it must be stored.
        let mut durable_sub = Raw::open(addr, Protocol::V311);
        let mut c = connect_packet(Protocol::V311, "durable-sub");
        c.clean_start = false;
        durable_sub.send(&Packet::Connect(Box::new(c)));
        assert!(matches!(durable_sub.recv(), Some(Packet::ConnAck(_))));
        durable_sub.send(&Packet::Subscribe(Subscribe {
            packet_id: 1,
            subscriptions: vec![Subscription {
                filter: s("slow/#"),
                options: SubscriptionOptions {
                    qos: ferrymq_codec::QoS::AtLeastOnce,
                    ..Default::default()
                },
            }],
            properties: Default::default(),
        }));
        assert!(matches!(durable_sub.recv(), Some(Packet::SubAck(_))));
        // Two clients with nothing to store.
        let mut fast_sub = Raw::connect(addr, Protocol::V311, "fast-sub");
        fast_sub.send(&Packet::Subscribe(Subscribe {
            packet_id: 1,
            subscriptions: vec![Subscription {
                filter: s("fast"),
                options: SubscriptionOptions::default(),
            }],
            properties: Default::default(),
        }));
        assert!(matches!(fast_sub.recv(), Some(Packet::SubAck(_))));
        let mut fast_pub = Raw::connect(addr, Protocol::V311, "fast-pub");

        let mut publisher = Raw::connect(addr, Protocol::V5, "slow-pub");
        let start = Instant::now();
        for id in 1..=10u16 {
            publisher.send(&Packet::Publish(Publish {
                qos: ferrymq_codec::QoS::AtLeastOnce,
                packet_id: id,
                topic: s("slow/x"),
                payload: Bytes::from(id.to_string()),
                ..Publish::default()
            }));
        }
        // While those wait for the store, other clients' traffic flows.
        fast_pub.send(&Packet::Publish(Publish {
            topic: s("fast"),
            payload: Bytes::from_static(b"now"),
            ..Publish::default()
        }));
        assert!(matches!(fast_sub.recv(), Some(Packet::Publish(p)) if p.payload == "now"));
        let fast_done = start.elapsed();
        let mut acked = Vec::new();
        for _ in 0..10 {
            match publisher.recv() {
                Some(Packet::PubAck(ack)) => acked.push(ack.packet_id),
                other => panic!("expected PUBACK, got {other:?}"),
            }
            if acked.len() == 1 {
                let first_ack = start.elapsed();
                assert!(
                    first_ack >= Duration::from_millis(50),
                    "PUBACK after {first_ack:?}: before the store completed"
                );
                assert!(fast_done < first_ack, "other traffic waited for the store");
            }
        }
        assert_eq!(
            acked,
            (1..=10).collect::<Vec<u16>>(),
            "PUBACKs left out of PUBLISH order"
        );
        // And the subscriber got them, in order, once durable.
        for id in 1..=10u16 {
            match durable_sub.recv() {
                Some(Packet::Publish(p)) => {
                    assert_eq!(p.payload, id.to_string());
                    durable_sub.send(&Packet::PubAck(PubAck::new(p.packet_id)));
                }
                other => panic!("expected PUBLISH, got {other:?}"),
            }
        }
    })
    .await
    .unwrap();
    broker.shutdown().await;
}

#[tokio::test]
async fn a_restarted_broker_recovers_sessions_queues_and_retained_from_its_store() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = MemoryStore::new();
    let broker = Broker::start_with_store(config(&dir), store.clone())
        .await
        .unwrap();
    let options = ClientOptions::new("gateway-app").persistent(Duration::from_secs(3600));
    let app = broker.connect(options.clone()).await.unwrap();
    assert!(!app.session_present());
    app.subscribe("cmd/#", QoS::AtLeastOnce).await.unwrap();
    app.disconnect().await;
    let cloud = broker.connect(ClientOptions::new("cloud")).await.unwrap();
    for i in 0..3 {
        cloud
            .publish("cmd/valve", format!("open {i}"), QoS::AtLeastOnce, false)
            .await
            .unwrap();
    }
    cloud
        .publish("state/valve", "closed", QoS::AtLeastOnce, true)
        .await
        .unwrap();
    broker.shutdown().await;

    let broker = Broker::start_with_store(config(&dir), store).await.unwrap();
    let mut app = broker.connect(options).await.unwrap();
    assert!(
        app.session_present(),
        "the session came back from the store"
    );
    for i in 0..3 {
        assert_eq!(recv(&mut app).await.payload, format!("open {i}"));
    }
    app.subscribe("state/+", QoS::AtLeastOnce).await.unwrap();
    let got = recv(&mut app).await;
    assert_eq!((got.payload, got.retain), (Bytes::from("closed"), true));
    // The subscription was recovered too: new commands arrive.
    let cloud = broker.connect(ClientOptions::new("cloud")).await.unwrap();
    cloud
        .publish("cmd/valve", "close", QoS::AtLeastOnce, false)
        .await
        .unwrap();
    assert_eq!(recv(&mut app).await.payload, "close");
    broker.shutdown().await;
}

#[tokio::test]
async fn in_process_publish_is_refused_with_0x97_when_queues_are_full() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&dir);
    config.storage.max_queued_messages = 1;
    config.storage.queue_full = ferrymq_config::QueueFull::Refuse;
    let broker = Broker::start(config).await.unwrap();
    let app = broker
        .connect(ClientOptions::new("offline").persistent(Duration::from_secs(60)))
        .await
        .unwrap();
    app.subscribe("q", QoS::AtLeastOnce).await.unwrap();
    app.disconnect().await;
    let publisher = broker.connect(ClientOptions::new("pub")).await.unwrap();
    publisher
        .publish("q", "1", QoS::AtLeastOnce, false)
        .await
        .unwrap();
    assert_eq!(
        publisher.publish("q", "2", QoS::AtLeastOnce, false).await,
        Err(ferrymq_broker::ClientError::Refused(
            ReasonCode::QUOTA_EXCEEDED
        ))
    );
    broker.shutdown().await;
}
