//! Bridges end to end inside one process: a [`Node`] (broker + bridges)
//! and a real Mosquitto upstream (one private broker per test), observed
//! with the uplink client.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::mosquitto::Mosquitto;
use ferrymq_bridge::{BridgeStatus, Event, Node, Uplink, UplinkOptions};
use ferrymq_broker::{ClientOptions, MessageId, QoS};
use ferrymq_codec::{MqttString, Publish, SubscribeProperties, Subscription, SubscriptionOptions};
use ferrymq_config::{Bridge, BridgeAddress, Config, Direction, Forward};

const WAIT: Duration = Duration::from_secs(10);

fn node_config(dir: &tempfile::TempDir, bridge: Bridge) -> Config {
    let mut config = Config {
        data_dir: dir.path().join("data"),
        ..Config::default()
    };
    config.listeners[0].bind = "127.0.0.1:0".parse().unwrap();
    config.bridges = vec![bridge];
    config
}

fn bridge_to(ports: &[u16]) -> Bridge {
    Bridge {
        name: "regional".into(),
        addresses: ports
            .iter()
            .map(|p| BridgeAddress {
                host: "127.0.0.1".into(),
                port: *p,
            })
            .collect(),
        client_id: "edge-1".into(),
        reconnect_min: Duration::from_millis(50),
        reconnect_max: Duration::from_millis(500),
        connect_timeout: Duration::from_secs(2),
        keepalive: Duration::from_secs(5),
        ramp: Duration::ZERO,
        forward: vec![
            Forward {
                filter: "data/#".into(),
                direction: Direction::Out,
                qos: 1,
                remote_prefix: "site/".into(),
                ..Forward::default()
            },
            Forward {
                filter: "cmd/#".into(),
                direction: Direction::In,
                qos: 1,
                remote_prefix: "site/".into(),
                ..Forward::default()
            },
        ],
        ..Bridge::default()
    }
}

/// An MQTT 5 client on the upstream subscribed to `filter`.
async fn observer(port: u16, filter: &str) -> Uplink {
    let mut options = UplinkOptions::new("127.0.0.1", port, "observer");
    options.connect_timeout = WAIT;
    let (mut uplink, _) = Uplink::connect(&options).await.unwrap();
    uplink
        .subscribe(
            vec![Subscription {
                filter: MqttString::new(filter).unwrap(),
                options: SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    ..SubscriptionOptions::default()
                },
            }],
            SubscribeProperties::default(),
        )
        .unwrap();
    loop {
        match tokio::time::timeout(WAIT, uplink.next_event()).await {
            Ok(Ok(Event::SubAck { .. })) => return uplink,
            Ok(Ok(_)) => {}
            other => panic!("no SUBACK: {other:?}"),
        }
    }
}

/// Receives (and acknowledges) messages until `count` distinct ones, by
/// ferry-id; returns them in arrival order with duplicates.
async fn collect(uplink: &mut Uplink, count: usize) -> Vec<(String, MessageId, String)> {
    let mut got = Vec::new();
    let mut distinct = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while distinct.len() < count {
        let event = tokio::time::timeout_at(deadline, uplink.next_event())
            .await
            .unwrap_or_else(|_| panic!("only {} of {count} arrived", distinct.len()))
            .unwrap();
        if let Event::Message(p) = event {
            if p.qos != QoS::AtMostOnce {
                uplink.ack(p.packet_id).unwrap();
            }
            let id: MessageId = p
                .properties
                .user_properties
                .iter()
                .find(|(k, _)| k.as_str() == "ferry-id")
                .map(|(_, v)| v.as_str().parse().unwrap())
                .expect("a ferry-id");
            let payload = String::from_utf8(p.payload.to_vec()).unwrap();
            distinct.insert(id, ());
            got.push((p.topic.to_string(), id, payload));
        }
    }
    got
}

/// Waits until the (first) bridge's status satisfies `done`.
async fn eventually(node: &Node, done: impl Fn(&BridgeStatus) -> bool) -> BridgeStatus {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status = node.bridges().remove(0);
        if done(&status) {
            return status;
        }
        assert!(tokio::time::Instant::now() < deadline, "still: {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_cross_the_bridge_both_ways_with_their_ids() {
    let upstream = Mosquitto::start("");
    let mut watch = observer(upstream.port(), "site/data/#").await;
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(node_config(&dir, bridge_to(&[upstream.port()])))
        .await
        .unwrap();
    let app = node
        .broker()
        .connect(ClientOptions::new("app"))
        .await
        .unwrap();
    let mut listener = node
        .broker()
        .connect(ClientOptions::new("listener"))
        .await
        .unwrap();
    listener.subscribe("cmd/#", QoS::AtLeastOnce).await.unwrap();
    for n in 0..10 {
        app.publish("data/boiler", format!("m{n}"), QoS::AtLeastOnce, false)
            .await
            .unwrap();
    }
    let got = collect(&mut watch, 10).await;
    let payloads: Vec<&str> = got.iter().map(|(_, _, p)| p.as_str()).collect();
    assert_eq!(
        payloads,
        (0..10).map(|n| format!("m{n}")).collect::<Vec<_>>()
    );
    assert!(got.iter().all(|(t, _, _)| t == "site/data/boiler"));
    // Upstream -> edge.
    watch
        .publish(Publish {
            qos: QoS::AtLeastOnce,
            topic: MqttString::from_static("site/cmd/reboot"),
            payload: "now".into(),
            ..Publish::default()
        })
        .unwrap();
    let command = tokio::time::timeout(WAIT, async {
        loop {
            tokio::select! {
                m = listener.recv() => break m.unwrap(),
                _ = watch.next_event() => {}
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(command.topic.as_str(), "cmd/reboot");
    assert_eq!(command.payload, "now");
    // The counters move once the upstream has the acknowledgements.
    let status = eventually(&node, |s| s.forwarded >= 10 && s.received >= 1).await;
    assert!(status.connected, "{status}");
    node.shutdown().await;
}

/// Regression: the bridge subscribed its `out` rules only after the
/// broker was already accepting clients, so messages published in the
/// first moments after the very first start were acknowledged and never
/// forwarded. The broker now creates the bridge's queue before it accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_queue_takes_messages_from_the_first_moment_before_the_bridge_runs() {
    let dir = tempfile::tempdir().unwrap();
    // No bridge task at all: only the broker with a [[bridge]] config.
    let config = node_config(&dir, bridge_to(&[1]));
    let broker = ferrymq_broker::Broker::start(config.clone()).await.unwrap();
    let app = broker.connect(ClientOptions::new("app")).await.unwrap();
    app.publish("data/early", "first", QoS::AtLeastOnce, false)
        .await
        .unwrap();
    app.publish("cmd/not-out", "x", QoS::AtLeastOnce, false)
        .await
        .unwrap();
    let depth = broker.queue_depth("$bridge/regional").unwrap();
    assert_eq!(depth.messages, 1, "queued for the bridge: {depth:?}");
    drop(app);
    broker.shutdown().await;
    // A rule removed from the config is unsubscribed at the next start;
    // what it queued stays.
    let mut config = config;
    config.bridges[0].forward.retain(|r| r.filter != "data/#");
    config.bridges[0].forward.push(Forward {
        filter: "other/#".into(),
        ..Forward::default()
    });
    let broker = ferrymq_broker::Broker::start(config).await.unwrap();
    let app = broker.connect(ClientOptions::new("app")).await.unwrap();
    app.publish("data/late", "dropped rule", QoS::AtLeastOnce, false)
        .await
        .unwrap();
    app.publish("other/x", "new rule", QoS::AtLeastOnce, false)
        .await
        .unwrap();
    let depth = broker.queue_depth("$bridge/regional").unwrap();
    assert_eq!(
        depth.messages, 2,
        "the old message and the new rule's: {depth:?}"
    );
    drop(app);
    broker.shutdown().await;
}
