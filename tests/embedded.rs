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

/// A toy enhanced authentication method: the broker sends a number, the
/// client must answer it plus one.
struct AddOne;

struct AddOneExchange {
    challenge: u8,
}

impl ferrymq_broker::auth::AuthMethod for AddOne {
    fn name(&self) -> &str {
        "ADD-ONE"
    }

    fn begin(
        &self,
        _client_id: &str,
        data: Option<Bytes>,
    ) -> (
        Box<dyn ferrymq_broker::auth::AuthExchange>,
        ferrymq_broker::auth::AuthStep,
    ) {
        let challenge = data.and_then(|d| d.first().copied()).unwrap_or(41);
        (
            Box::new(AddOneExchange { challenge }),
            ferrymq_broker::auth::AuthStep::Continue(Some(Bytes::from(vec![challenge]))),
        )
    }
}

impl ferrymq_broker::auth::AuthExchange for AddOneExchange {
    fn step(&mut self, data: Option<Bytes>) -> ferrymq_broker::auth::AuthStep {
        use ferrymq_broker::auth::AuthStep;
        match data.as_deref() {
            Some([answer]) if *answer == self.challenge.wrapping_add(1) => {
                AuthStep::Success(Some(Bytes::from_static(b"welcome")))
            }
            _ => AuthStep::Failure(ReasonCode::NOT_AUTHORIZED),
        }
    }
}

fn auth_packet(reason_code: ReasonCode, data: &[u8]) -> Packet {
    Packet::Auth(ferrymq_codec::Auth {
        reason_code,
        properties: ferrymq_codec::AuthProperties {
            authentication_method: Some(s("ADD-ONE")),
            authentication_data: Some(Bytes::copy_from_slice(data)),
            ..Default::default()
        },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enhanced_authentication_runs_its_exchange_and_re_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&dir);
    // Only authenticated clients get in.
    config.auth.allow_anonymous = false;
    let broker = Broker::builder(config)
        .auth_method(AddOne)
        .start()
        .await
        .unwrap();
    let addr = broker.local_addrs()[0];
    tokio::task::spawn_blocking(move || {
        let connect = |data: u8| {
            let mut c = connect_packet(Protocol::V5, "authed");
            c.properties.authentication_method = Some(s("ADD-ONE"));
            c.properties.authentication_data = Some(Bytes::from(vec![data]));
            c
        };
        // The right answer: CONNACK Success with the method's final data.
        let mut raw = Raw::open(addr, Protocol::V5);
        raw.send(&Packet::Connect(Box::new(connect(9))));
        assert_eq!(
            raw.recv(),
            Some(auth_packet(ReasonCode::CONTINUE_AUTHENTICATION, &[9]))
        );
        raw.send(&auth_packet(ReasonCode::CONTINUE_AUTHENTICATION, &[10]));
        match raw.recv() {
            Some(Packet::ConnAck(ack)) => {
                assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
                assert_eq!(
                    ack.properties.authentication_data.as_deref(),
                    Some(&b"welcome"[..])
                );
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
        // Re-authentication on the open connection.
        raw.send(&auth_packet(ReasonCode::RE_AUTHENTICATE, &[20]));
        assert_eq!(
            raw.recv(),
            Some(auth_packet(ReasonCode::CONTINUE_AUTHENTICATION, &[20]))
        );
        raw.send(&auth_packet(ReasonCode::CONTINUE_AUTHENTICATION, &[21]));
        assert_eq!(
            raw.recv(),
            Some(auth_packet(ReasonCode::SUCCESS, b"welcome"))
        );
        // A failed re-authentication ends the connection.
        raw.send(&auth_packet(ReasonCode::RE_AUTHENTICATE, &[30]));
        assert_eq!(
            raw.recv(),
            Some(auth_packet(ReasonCode::CONTINUE_AUTHENTICATION, &[30]))
        );
        raw.send(&auth_packet(ReasonCode::CONTINUE_AUTHENTICATION, &[0]));
        match raw.until_closed().as_slice() {
            [Packet::Disconnect(d)] => assert_eq!(d.reason_code, ReasonCode::NOT_AUTHORIZED),
            other => panic!("{other:?}"),
        }
        // The wrong answer: refused.
        let mut wrong = Raw::open(addr, Protocol::V5);
        wrong.send(&Packet::Connect(Box::new(connect(1))));
        assert!(matches!(wrong.recv(), Some(Packet::Auth(_))));
        wrong.send(&auth_packet(ReasonCode::CONTINUE_AUTHENTICATION, &[7]));
        match wrong.until_closed().as_slice() {
            [Packet::ConnAck(ack)] => assert_eq!(ack.reason_code, ReasonCode::NOT_AUTHORIZED),
            other => panic!("{other:?}"),
        }
        // A method the broker does not have: 0x8C.
        let mut unknown = Raw::open(addr, Protocol::V5);
        let mut c = connect(1);
        c.properties.authentication_method = Some(s("SCRAM-SHA-256"));
        unknown.send(&Packet::Connect(Box::new(c)));
        match unknown.until_closed().as_slice() {
            [Packet::ConnAck(ack)] => {
                assert_eq!(ack.reason_code, ReasonCode::BAD_AUTHENTICATION_METHOD)
            }
            other => panic!("{other:?}"),
        }
        // AUTH without a method in CONNECT is a protocol error.
        let mut plain = Raw::open(addr, Protocol::V5);
        plain.send(&Packet::Connect(Box::new(connect_packet(
            Protocol::V5,
            "anon",
        ))));
        match plain.until_closed().as_slice() {
            [Packet::ConnAck(ack)] => assert_eq!(ack.reason_code, ReasonCode::NOT_AUTHORIZED),
            other => panic!("{other:?}"),
        }
    })
    .await
    .unwrap();
    broker.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn message_expiry_on_a_paused_clock() {
    // The in-process client keeps everything in memory, so the clock can be
    // paused and moved: expiry is checked without waiting for it.
    let dir = tempfile::tempdir().unwrap();
    // The memory store: a paused clock cannot wait for a disk thread.
    let broker = Broker::start_with_store(config(&dir), MemoryStore::new())
        .await
        .unwrap();
    let options = ClientOptions::new("sleeper").persistent(Duration::from_secs(86_400));
    let app = broker.connect(options.clone()).await.unwrap();
    app.subscribe("exp/#", QoS::AtLeastOnce).await.unwrap();
    app.disconnect().await;
    let sender = broker.connect(ClientOptions::new("sender")).await.unwrap();
    for (topic, secs) in [("exp/hour", 3600), ("exp/minute", 60)] {
        let mut p = Publish {
            qos: ferrymq_codec::QoS::AtLeastOnce,
            topic: s(topic),
            payload: Bytes::from_static(b"x"),
            ..Publish::default()
        };
        p.properties.message_expiry_interval = Some(secs);
        sender.publish_packet(p).await.unwrap();
    }
    tokio::time::advance(Duration::from_secs(600)).await;
    let mut app = broker.connect(options).await.unwrap();
    assert!(
        app.session_present(),
        "the session outlived 10 minutes offline"
    );

    let got = recv(&mut app).await;
    assert_eq!(got.topic, "exp/hour");
    assert_eq!(got.properties.message_expiry_interval, Some(3000));
    assert!(
        tokio::time::timeout(Duration::from_secs(1), app.recv())
            .await
            .is_err(),
        "the expired message was delivered"
    );
    assert_eq!(
        ferrymq_broker::Stats::get(&broker.stats().messages_expired),
        1
    );
    broker.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn in_process_client_reads_messages_that_arrive_with_its_connack() {
    // Regression: bytes read together with the CONNACK were left in the
    // client's buffer until more arrived. On a paused clock the broker
    // writes the CONNACK and the queued messages in one go.
    let dir = tempfile::tempdir().unwrap();
    // The memory store: a paused clock cannot wait for a disk thread.
    let broker = Broker::start_with_store(config(&dir), MemoryStore::new())
        .await
        .unwrap();
    let options = ClientOptions::new("queued").persistent(Duration::from_secs(60));
    let app = broker.connect(options.clone()).await.unwrap();
    app.subscribe("q", QoS::AtLeastOnce).await.unwrap();
    app.disconnect().await;
    let sender = broker.connect(ClientOptions::new("sender")).await.unwrap();
    sender
        .publish("q", "waiting", QoS::AtLeastOnce, false)
        .await
        .unwrap();
    let mut app = broker.connect(options).await.unwrap();
    assert_eq!(recv(&mut app).await.payload, "waiting");
    broker.shutdown().await;
}

/// Syncs really happen: with one publisher and one message in flight,
/// every acknowledged QoS 1 message costs at least one WAL sync under
/// `sync-each` and `group-commit` (kill -9 tests cannot show this: the page
/// cache survives a killed process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_publish_was_synced_first_under_sync_each_and_group_commit() {
    for durability in [
        ferrymq_config::Durability::SyncEach,
        ferrymq_config::Durability::GroupCommit,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(&dir);
        config.storage.durability = durability;
        let broker = Broker::start(config).await.unwrap();
        let keeper = broker
            .connect(ClientOptions::new("keeper").persistent(Duration::from_secs(3600)))
            .await
            .unwrap();
        keeper
            .subscribe("synced/#", QoS::AtLeastOnce)
            .await
            .unwrap();
        keeper.disconnect().await;
        let publisher = broker.connect(ClientOptions::new("one")).await.unwrap();
        let before = broker.store().wal_syncs();
        let acknowledged = 200;
        for n in 0..acknowledged {
            publisher
                .publish("synced/x", n.to_string(), QoS::AtLeastOnce, false)
                .await
                .unwrap();
        }
        let syncs = broker.store().wal_syncs() - before;
        assert!(
            syncs >= acknowledged,
            "{durability:?}: {syncs} WAL syncs for {acknowledged} acknowledged messages"
        );
        broker.shutdown().await;
    }
}

fn ferry_id(received: &ferrymq_broker::Received) -> ferrymq_broker::MessageId {
    received
        .properties
        .user_properties
        .iter()
        .find(|(k, _)| k.as_str() == ferrymq_broker::MESSAGE_ID_PROPERTY)
        .map(|(_, v)| v.as_str().parse().unwrap())
        .expect("a ferry-id user property")
}

/// What a store-and-forward uplink relies on: a message stays queued until
/// the application acknowledges it, comes back after a reconnect or a
/// restart with the same id, and ids never repeat across runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_acks_and_message_ids_survive_reconnects_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let uplink = || {
        ClientOptions::new("uplink")
            .persistent(Duration::from_secs(3600))
            .manual_acks()
            .message_ids()
    };
    let broker = Broker::start(config(&dir)).await.unwrap();
    let mut up = broker.connect(uplink()).await.unwrap();
    up.subscribe("out/#", QoS::AtLeastOnce).await.unwrap();
    let app = broker.connect(ClientOptions::new("app")).await.unwrap();
    for n in 0..3 {
        app.publish("out/x", format!("m{n}"), QoS::AtLeastOnce, false)
            .await
            .unwrap();
    }
    let first: Vec<_> = [
        recv(&mut up).await,
        recv(&mut up).await,
        recv(&mut up).await,
    ]
    .into();
    let ids: Vec<_> = first.iter().map(ferry_id).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "distinct, in order: {ids:?}"
    );
    up.ack(&first[0]).await.unwrap();
    up.disconnect().await;

    // Reconnect: the two unacknowledged ones come again, same ids, DUP.
    let mut up = broker.connect(uplink()).await.unwrap();
    assert!(up.session_present());
    for expected in &first[1..] {
        let again = recv(&mut up).await;
        assert_eq!(again.payload, expected.payload);
        assert!(again.dup);
        assert_eq!(ferry_id(&again), ferry_id(expected));
    }
    up.disconnect().await;
    drop(app);
    broker.shutdown().await;

    // Restart: still there, same ids; a new message gets a later epoch.
    let broker = Broker::start(config(&dir)).await.unwrap();
    let mut up = broker.connect(uplink()).await.unwrap();
    let again = recv(&mut up).await;
    assert_eq!(ferry_id(&again), ids[1]);
    let again = recv(&mut up).await;
    assert_eq!(ferry_id(&again), ids[2]);
    let app = broker.connect(ClientOptions::new("app")).await.unwrap();
    app.publish("out/x", "after", QoS::AtLeastOnce, false)
        .await
        .unwrap();
    let fresh = recv(&mut up).await;
    let id = ferry_id(&fresh);
    assert_eq!((id.uuid, id.queue), (ids[0].uuid, ids[0].queue));
    assert_eq!(id.epoch, ids[0].epoch + 1, "a new run, a new epoch");
    for m in [&again, &fresh] {
        up.ack(m).await.unwrap();
    }
    up.disconnect().await;
    broker.shutdown().await;
}

/// Regression: `Client::disconnect` returned as soon as the DISCONNECT was
/// written, so a reconnect could take the session over before the broker
/// had read the acknowledgements sent just before, and an acknowledged
/// message came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_right_after_disconnect_never_overtakes_the_acks_sent_before() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start_with_store(config(&dir), MemoryStore::new())
        .await
        .unwrap();
    let options = || {
        ClientOptions::new("quick")
            .persistent(Duration::from_secs(60))
            .manual_acks()
    };
    let up = broker.connect(options()).await.unwrap();
    up.subscribe("quick/#", QoS::AtLeastOnce).await.unwrap();
    up.disconnect().await;
    let app = broker.connect(ClientOptions::new("app")).await.unwrap();
    for round in 0..200 {
        app.publish("quick/x", format!("{round}"), QoS::AtLeastOnce, false)
            .await
            .unwrap();
        let mut up = broker.connect(options()).await.unwrap();
        let got = recv(&mut up).await;
        assert_eq!(
            got.payload,
            Bytes::from(format!("{round}")),
            "round {round}: an acknowledged message came back"
        );
        up.ack(&got).await.unwrap();
        up.disconnect().await;
    }
    broker.shutdown().await;
}

/// Regression: the in-process client sent as many QoS 1 publishes as it
/// was given, and the broker closed it for exceeding its Receive Maximum
/// (a 1,000,000-message backlog benchmark died at the 1,025th).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_publishes_beyond_the_broker_receive_maximum_wait_their_turn() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&dir);
    config.limits.receive_maximum = 10;
    let broker = Broker::start_with_store(config, MemoryStore::new())
        .await
        .unwrap();
    let mut sub = broker.connect(ClientOptions::new("sub")).await.unwrap();
    sub.subscribe("pipe/#", QoS::AtLeastOnce).await.unwrap();
    let app = broker.connect(ClientOptions::new("app")).await.unwrap();
    let publisher = app.publisher();
    let mut acks = Vec::new();
    for n in 0..100 {
        acks.push(
            publisher
                .submit(Publish {
                    qos: QoS::AtLeastOnce,
                    topic: s("pipe/x"),
                    payload: Bytes::from(format!("{n}")),
                    ..Publish::default()
                })
                .await
                .unwrap(),
        );
    }
    for ack in acks {
        ack.await.expect("acknowledged, not cut off");
    }
    for n in 0..100 {
        assert_eq!(
            recv(&mut sub).await.payload,
            Bytes::from(format!("{n}")),
            "in order"
        );
    }
    broker.shutdown().await;
}

/// An authentication method with a bug: it panics when the client's data
/// is 0xEE, at CONNECT or when re-authenticating.
struct Buggy;

struct BuggyExchange;

impl ferrymq_broker::auth::AuthMethod for Buggy {
    fn name(&self) -> &str {
        "BUGGY"
    }

    fn begin(
        &self,
        _client_id: &str,
        data: Option<Bytes>,
    ) -> (
        Box<dyn ferrymq_broker::auth::AuthExchange>,
        ferrymq_broker::auth::AuthStep,
    ) {
        assert_ne!(data.as_deref(), Some(&[0xEE][..]), "a bug in the method");
        (
            Box::new(BuggyExchange),
            ferrymq_broker::auth::AuthStep::Success(None),
        )
    }
}

impl ferrymq_broker::auth::AuthExchange for BuggyExchange {
    fn step(&mut self, _data: Option<Bytes>) -> ferrymq_broker::auth::AuthStep {
        ferrymq_broker::auth::AuthStep::Success(None)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_one_connection_closes_that_connection_only() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::builder(config(&dir))
        .auth_method(Buggy)
        .start()
        .await
        .unwrap();
    let addr = broker.local_addrs()[0];
    let mut bystander = broker
        .connect(ClientOptions::new("bystander"))
        .await
        .unwrap();
    bystander
        .subscribe("alive/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    tokio::task::spawn_blocking(move || {
        let connect = |data: u8| {
            let mut c = connect_packet(Protocol::V5, "buggy");
            c.clean_start = false;
            c.properties.session_expiry_interval = Some(600);
            c.properties.authentication_method = Some(s("BUGGY"));
            c.properties.authentication_data = Some(Bytes::from(vec![data]));
            c
        };
        // A panic while accepting: that connection is closed.
        let mut raw = Raw::open(addr, Protocol::V5);
        raw.send(&Packet::Connect(Box::new(connect(0xEE))));
        assert_eq!(raw.until_closed(), []);
        // A panic while connected: DISCONNECT 0x83, the session is handed
        // back, and the client resumes it.
        let mut raw = Raw::open(addr, Protocol::V5);
        raw.send(&Packet::Connect(Box::new(connect(1))));
        assert!(
            matches!(raw.recv(), Some(Packet::ConnAck(a)) if a.reason_code == ReasonCode::SUCCESS)
        );
        raw.send(&Packet::Subscribe(ferrymq_codec::Subscribe {
            packet_id: 1,
            subscriptions: vec![ferrymq_codec::Subscription {
                filter: s("alive/#"),
                options: Default::default(),
            }],
            properties: Default::default(),
        }));
        assert!(matches!(raw.recv(), Some(Packet::SubAck(_))));
        raw.send(&Packet::Auth(ferrymq_codec::Auth {
            reason_code: ReasonCode::RE_AUTHENTICATE,
            properties: ferrymq_codec::AuthProperties {
                authentication_method: Some(s("BUGGY")),
                authentication_data: Some(Bytes::from_static(&[0xEE])),
                ..Default::default()
            },
        }));
        match raw.until_closed().as_slice() {
            [Packet::Disconnect(d)] => {
                assert_eq!(d.reason_code, ReasonCode::IMPLEMENTATION_SPECIFIC_ERROR)
            }
            other => panic!("expected DISCONNECT 0x83, got {other:?}"),
        }
        let mut raw = Raw::open(addr, Protocol::V5);
        raw.send(&Packet::Connect(Box::new(connect(2))));
        match raw.recv() {
            Some(Packet::ConnAck(a)) => {
                assert_eq!(a.reason_code, ReasonCode::SUCCESS);
                assert!(a.session_present, "the session survived the panic");
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
    })
    .await
    .unwrap();
    assert_eq!(
        ferrymq_broker::Stats::get(&broker.stats().connection_panics),
        2
    );
    // Everyone else went on.
    let publisher = broker
        .connect(ClientOptions::new("publisher"))
        .await
        .unwrap();
    publisher
        .publish("alive/yes", "1", QoS::AtLeastOnce, false)
        .await
        .unwrap();
    assert_eq!(recv(&mut bystander).await.payload, "1");
    broker.shutdown().await;
}

/// The in-process client gets every retained message too (regression for
/// "a new subscriber gets 10,000 of 200,000 retained messages").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_process_subscriber_gets_every_one_of_200000_retained_messages() {
    const RETAINED: usize = 200_000;
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(config(&dir)).await.unwrap();
    let publisher = broker
        .connect(ClientOptions::new("retainer"))
        .await
        .unwrap()
        .publisher();
    let mut acks = Vec::with_capacity(RETAINED);
    for i in 0..RETAINED {
        let ack = publisher
            .submit(Publish {
                topic: s(&format!("shadow/{i:06}")),
                qos: QoS::AtLeastOnce,
                retain: true,
                payload: Bytes::from_static(&[b'v'; 100]),
                ..Publish::default()
            })
            .await
            .unwrap();
        acks.push(ack);
    }
    for ack in acks {
        ack.await.unwrap();
    }
    let mut options = ClientOptions::new("dashboard");
    options.receive_capacity = 16;
    let mut dashboard = broker.connect(options).await.unwrap();
    dashboard
        .subscribe("shadow/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut previous = String::new();
    for i in 0..RETAINED {
        let m = recv(&mut dashboard).await;
        assert!(m.retain);
        assert_eq!(
            m.topic.as_str(),
            format!("shadow/{i:06}"),
            "after {previous}"
        );
        previous = m.topic.to_string();
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), dashboard.recv())
            .await
            .is_err(),
        "nothing more"
    );
    assert_eq!(
        ferrymq_broker::Stats::get(&broker.stats().messages_dropped_queue_full),
        0
    );
    broker.shutdown().await;
}
