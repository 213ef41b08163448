//! Bridges end to end inside one process: a [`Node`] (broker + bridges)
//! and a real Mosquitto upstream (one private broker per test), observed
//! with the uplink client.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::fake::{Fake, Script};
use common::mosquitto::Mosquitto;
use common::pki::Pki;
use ferrymq_bridge::{BridgeStatus, Event, Node, Uplink, UplinkOptions};
use ferrymq_broker::{ClientOptions, MessageId, QoS};
use ferrymq_codec::{MqttString, Publish, SubscribeProperties, Subscription, SubscriptionOptions};
use ferrymq_config::{Bridge, BridgeAddress, BridgeTls, Config, Direction, Forward};

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

/// The next message the local `listener` receives, while the upstream
/// `watch` client's events (its acknowledgements) are taken meanwhile.
async fn local_message(
    listener: &mut ferrymq_broker::Client,
    watch: &mut Uplink,
) -> ferrymq_broker::Received {
    tokio::time::timeout(WAIT, async {
        loop {
            tokio::select! {
                m = listener.recv() => break m.unwrap(),
                _ = watch.next_event() => {}
            }
        }
    })
    .await
    .unwrap()
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
    let command = local_message(&mut listener, &mut watch).await;
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

/// Publishes `count` QoS 1 messages `0..count` on `topic` at the edge.
async fn publish_local(node: &Node, topic: &str, count: u32) {
    let app = node
        .broker()
        .connect(ClientOptions::new("app"))
        .await
        .unwrap();
    for n in 0..count {
        app.publish(topic, n.to_string(), QoS::AtLeastOnce, false)
            .await
            .unwrap();
    }
    app.disconnect().await;
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_over_quota_loses_nothing_and_the_bridge_backs_off() {
    let fake = Fake::start(Script {
        receive_maximum: 100,
        refuse_first: 20,
        ack_delay: Duration::from_millis(1),
        ..Script::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut bridge = bridge_to(&[fake.port()]);
    bridge.reconnect_min = Duration::from_millis(200);
    let node = Node::start(node_config(&dir, bridge)).await.unwrap();
    publish_local(&node, "data/x", 200).await;
    wait_until("every message accepted upstream", || {
        let seen = fake.seen();
        let distinct: std::collections::BTreeSet<_> = seen.accepted.iter().collect();
        distinct.len() == 200
    })
    .await;
    let seen = fake.seen();
    assert_eq!(seen.connections, 1, "0x97 keeps the connection");
    // After the first refusal the bridge paused before sending again.
    let first = seen
        .arrivals
        .iter()
        .position(|(_, refused)| *refused)
        .unwrap();
    let gap = seen
        .arrivals
        .iter()
        .skip(first)
        .find(|(_, r)| !*r)
        .map(|(t, _)| *t - seen.arrivals[first].0);
    assert!(
        gap.is_some_and(|g| g >= Duration::from_millis(90)),
        "no back-off after 0x97: {gap:?}"
    );
    let status = eventually(&node, |s| s.forwarded >= 200).await;
    assert_eq!(status.dead_lettered, 0);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_upstream_receive_maximum_is_never_exceeded() {
    let fake = Fake::start(Script {
        receive_maximum: 3,
        refuse_first: 0,
        ack_delay: Duration::from_millis(5),
        ..Script::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut bridge = bridge_to(&[fake.port()]);
    bridge.inflight = 100;
    let node = Node::start(node_config(&dir, bridge)).await.unwrap();
    publish_local(&node, "data/x", 100).await;
    wait_until("all accepted", || fake.seen().accepted.len() >= 100).await;
    let seen = fake.seen();
    assert_eq!(
        seen.max_in_flight, 3,
        "the window is the upstream's 3, used fully"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_the_second_address_and_back_to_the_first() {
    let mut first = Mosquitto::start("");
    let second = Mosquitto::start("");
    let mut on_first = observer(first.port(), "site/#").await;
    let mut on_second = observer(second.port(), "site/#").await;
    let dir = tempfile::tempdir().unwrap();
    let mut bridge = bridge_to(&[first.port(), second.port()]);
    bridge.reconnect_max = Duration::from_millis(1000);
    let node = Node::start(node_config(&dir, bridge)).await.unwrap();
    publish_local(&node, "data/a", 5).await;
    assert_eq!(collect(&mut on_first, 5).await.len(), 5);
    // The first upstream dies: the bridge moves to the second.
    first.kill();
    publish_local(&node, "data/b", 5).await;
    let got = collect(&mut on_second, 5).await;
    assert!(got.iter().all(|(t, _, _)| t == "site/data/b"), "{got:?}");
    assert_eq!(
        node.bridges()[0].address.as_deref(),
        Some(format!("127.0.0.1:{}", second.port()).as_str())
    );
    // It comes back: the bridge returns to it (probing every second).
    first.restart();
    let mut on_first = observer(first.port(), "site/#").await;
    let back = format!("127.0.0.1:{}", first.port());
    eventually(&node, |s| {
        s.connected && s.address.as_deref() == Some(back.as_str())
    })
    .await;
    publish_local(&node, "data/c", 5).await;
    let got = collect(&mut on_first, 5).await;
    assert!(got.iter().all(|(t, _, _)| t == "site/data/c"), "{got:?}");
    node.shutdown().await;
}

async fn tls_round_trip(mutual: bool) {
    let pki = Pki::generate();
    let upstream = Mosquitto::start(&pki.mosquitto_options(mutual));
    let dir = tempfile::tempdir().unwrap();
    let mut bridge = bridge_to(&[upstream.port()]);
    bridge.tls = Some(BridgeTls {
        ca_file: pki.ca.clone(),
        cert_file: mutual.then(|| pki.client_cert.clone()),
        key_file: mutual.then(|| pki.client_key.clone()),
        server_name: None,
    });
    let node = Node::start(node_config(&dir, bridge)).await.unwrap();
    eventually(&node, |s| s.connected).await;
    publish_local(&node, "data/secure", 3).await;
    eventually(&node, |s| s.forwarded >= 3).await;
    node.shutdown().await;
    assert!(upstream.log().contains("as edge-1"), "{}", upstream.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_upstream_with_a_test_ca() {
    tls_round_trip(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_to_the_upstream() {
    tls_round_trip(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_messages_queued_upstream_while_the_edge_was_away_arrive_when_it_returns() {
    let upstream = Mosquitto::start("");
    let dir = tempfile::tempdir().unwrap();
    let config = node_config(&dir, bridge_to(&[upstream.port()]));
    // First run: the edge's session upstream (and a local persistent
    // listener) exist.
    let node = Node::start(config.clone()).await.unwrap();
    let listener_options = || ClientOptions::new("listener").persistent(Duration::from_secs(3600));
    let listener = node.broker().connect(listener_options()).await.unwrap();
    listener.subscribe("cmd/#", QoS::AtLeastOnce).await.unwrap();
    listener.disconnect().await;
    eventually(&node, |s| s.connected).await;
    // Let the upstream SUBACK land before leaving.
    tokio::time::sleep(Duration::from_millis(200)).await;
    node.shutdown().await;
    // While the edge is away, the cloud sends it commands.
    let mut cloud = observer(upstream.port(), "unused/#").await;
    for n in 0..5 {
        cloud
            .publish(Publish {
                qos: QoS::AtLeastOnce,
                topic: MqttString::from_static("site/cmd/run"),
                payload: n.to_string().into(),
                ..Publish::default()
            })
            .unwrap();
    }
    cloud.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Back: they arrive.
    let node = Node::start(config).await.unwrap();
    let mut listener = node.broker().connect(listener_options()).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 5 {
        let m = tokio::time::timeout(WAIT, listener.recv())
            .await
            .expect("queued commands arrive")
            .unwrap();
        got.push(String::from_utf8(m.payload.to_vec()).unwrap());
    }
    assert_eq!(got, ["0", "1", "2", "3", "4"]);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_directions_never_loop() {
    let upstream = Mosquitto::start("");
    let dir = tempfile::tempdir().unwrap();
    let mut bridge = bridge_to(&[upstream.port()]);
    bridge.forward = vec![Forward {
        filter: "sync/#".into(),
        direction: Direction::Both,
        qos: 1,
        ..Forward::default()
    }];
    let node = Node::start(node_config(&dir, bridge)).await.unwrap();
    eventually(&node, |s| s.connected).await;
    let mut cloud = observer(upstream.port(), "sync/#").await;
    let mut local = node
        .broker()
        .connect(ClientOptions::new("local"))
        .await
        .unwrap();
    local.subscribe("sync/#", QoS::AtLeastOnce).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Edge -> cloud, once; never back to the edge a second time.
    local
        .publish("sync/from-edge", "e", QoS::AtLeastOnce, false)
        .await
        .unwrap();
    // Cloud -> edge, once; never back to the cloud.
    cloud
        .publish(Publish {
            qos: QoS::AtLeastOnce,
            topic: MqttString::from_static("sync/from-cloud"),
            payload: "c".into(),
            ..Publish::default()
        })
        .unwrap();
    let mut at_cloud = Vec::new();
    let mut at_edge = Vec::new();
    let end = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        tokio::select! {
            e = cloud.next_event() => if let Ok(Event::Message(p)) = e {
                cloud.ack(p.packet_id).unwrap();
                at_cloud.push(p.topic.to_string());
            },
            m = local.recv() => at_edge.push(m.unwrap().topic.to_string()),
            _ = tokio::time::sleep_until(end) => break,
        }
    }
    at_cloud.sort();
    at_edge.sort();
    assert_eq!(at_cloud, ["sync/from-cloud", "sync/from-edge"]);
    assert_eq!(at_edge, ["sync/from-cloud", "sync/from-edge"]);
    node.shutdown().await;
}

/// Regression: while the link was down the bridge stopped taking messages
/// from its local queue, and those already handed to it were counted
/// nowhere, so the status showed an empty backlog with 10 messages waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_counts_the_whole_backlog_while_the_link_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let dead_port = common::mosquitto::free_port();
    let node = Node::start(node_config(&dir, bridge_to(&[dead_port])))
        .await
        .unwrap();
    publish_local(&node, "data/x", 150).await;
    let status = eventually(&node, |s| s.backlog_messages == 150).await;
    assert!(!status.connected);
    assert_eq!(
        status.backlog_bytes,
        (0..150)
            .map(|n: u32| n.to_string().len() as u64)
            .sum::<u64>()
    );
    assert!(status.oldest_queued.is_some(), "{status}");
    assert!(status.last_error.is_some(), "{status}");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_reference_sends_the_bridge_to_another_upstream() {
    let target = Fake::start(Script::default()).await;
    let reference: &'static str =
        Box::leak(format!("127.0.0.1:{}", target.port()).into_boxed_str());
    let referrer = Fake::start(Script {
        refer_to: Some(reference),
        ..Script::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(node_config(&dir, bridge_to(&[referrer.port()])))
        .await
        .unwrap();
    publish_local(&node, "data/x", 3).await;
    wait_until("forwarded to the referred server", || {
        target.seen().accepted.len() == 3
    })
    .await;
    assert!(referrer.seen().connections >= 1);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_expiry_counts_on_while_messages_wait_for_the_link() {
    // The upstream's address, taken and released: nothing listens yet. On
    // 127.0.0.9, where no other test binds, so that no broker of another
    // test can take the port meanwhile and receive the bridge.
    let addr = std::net::TcpListener::bind("127.0.0.9:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut bridge = bridge_to(&[addr.port()]);
    bridge.addresses[0].host = "127.0.0.9".into();
    let node = Node::start(node_config(&dir, bridge)).await.unwrap();
    let app = node
        .broker()
        .connect(ClientOptions::new("app"))
        .await
        .unwrap();
    for (payload, expiry) in [("short", 1), ("long", 60)] {
        app.publish_packet(Publish {
            qos: QoS::AtLeastOnce,
            topic: MqttString::from_static("data/x"),
            payload: payload.into(),
            properties: ferrymq_codec::PublishProperties {
                message_expiry_interval: Some(expiry),
                ..Default::default()
            },
            ..Publish::default()
        })
        .await
        .unwrap();
    }
    // Both wait in the bridge (taken from the local queue) past the
    // short one's expiry.
    eventually(&node, |s| s.backlog_messages == 2).await;
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let upstream = Fake::start_on(addr, Script::default()).await;
    wait_until("the long one forwarded", || {
        upstream.seen().accepted.len() == 1
    })
    .await;
    let seen = upstream.seen();
    assert_eq!(seen.accepted, [bytes::Bytes::from_static(b"long")]);
    let left = seen.expiry[0].expect("an expiry interval");
    assert!(
        (55..=58).contains(&left),
        "60 s minus the time it waited: {left}"
    );
    // One expired, one forwarded, none left (the upstream's PUBACK and
    // the local acknowledgement may still be on their way: wait for them).
    eventually(&node, |s| {
        s.expired == 1 && s.forwarded == 1 && s.backlog_messages == 0
    })
    .await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_kept_and_replayed_on_request() {
    let fake = Fake::start(Script {
        refuse_first: 3,
        refuse_with: ferrymq_codec::ReasonCode::NOT_AUTHORIZED,
        ..Script::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = node_config(&dir, bridge_to(&[fake.port()]));
    let node = Node::start(config.clone()).await.unwrap();
    let mut local = node
        .broker()
        .connect(ClientOptions::new("local"))
        .await
        .unwrap();
    local.subscribe("data/#", QoS::AtLeastOnce).await.unwrap();
    publish_local(&node, "data/x", 5).await;
    eventually(&node, |s| s.dead_lettered == 3 && s.forwarded == 2).await;
    let dead = node.broker().queue_depth("$bridge/regional/dead").unwrap();
    assert_eq!(dead.messages, 3, "kept for ferrymq queue stats: {dead:?}");
    // The operator asks for a replay (what `ferrymq queue replay-dead`
    // does); the upstream now takes them.
    ferrymq_bridge::request_replay(&config.data_dir, "regional").unwrap();
    wait_until("the dead letters went upstream", || {
        let distinct: std::collections::BTreeSet<_> = fake.seen().accepted.into_iter().collect();
        distinct.len() == 5
    })
    .await;
    wait_until("the dead-letter queue is empty", || {
        node.broker()
            .queue_depth("$bridge/regional/dead")
            .is_some_and(|d| d.messages == 0)
    })
    .await;
    // Local subscribers saw each message once: the replay went to the
    // bridge only.
    let mut local_copies = 0;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(300), local.recv()).await {
        local_copies += 1;
    }
    assert_eq!(local_copies, 5);
    node.shutdown().await;
}

/// A message from upstream deeper than the edge's `max_topic_levels` is
/// refused by the edge broker for good: the bridge takes it from the
/// upstream (acknowledges it, counted by the broker) instead of
/// reconnecting and getting it again for ever, and what follows arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbound_message_deeper_than_the_level_limit_is_dropped_not_retried() {
    let upstream = Mosquitto::start("");
    let mut watch = observer(upstream.port(), "site/data/#").await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = node_config(&dir, bridge_to(&[upstream.port()]));
    config.limits.max_topic_levels = 4;
    let node = Node::start(config).await.unwrap();
    let mut listener = node
        .broker()
        .connect(ClientOptions::new("listener"))
        .await
        .unwrap();
    listener.subscribe("cmd/#", QoS::AtLeastOnce).await.unwrap();
    eventually(&node, |s| s.connected).await;
    let connects = node.bridges()[0].connects;
    let publish = |watch: &mut Uplink, topic: &str| {
        watch
            .publish(Publish {
                qos: QoS::AtLeastOnce,
                topic: MqttString::new(topic).unwrap(),
                payload: "x".into(),
                ..Publish::default()
            })
            .unwrap();
    };
    // "Connected" comes with the CONNACK, before the bridge's upstream
    // subscription is in place: wait until a message gets through.
    loop {
        publish(&mut watch, "site/cmd/warm");
        let next = tokio::time::timeout(Duration::from_millis(500), async {
            loop {
                tokio::select! {
                    m = listener.recv() => break m,
                    _ = watch.next_event() => {}
                }
            }
        });
        if let Ok(Some(m)) = next.await {
            assert_eq!(m.topic.as_str(), "cmd/warm");
            break;
        }
    }
    for topic in ["site/cmd/a/b/c/d", "site/cmd/ok"] {
        publish(&mut watch, topic);
    }
    // (A warm-up message published before the last one may still come.)
    let got = loop {
        let m = local_message(&mut listener, &mut watch).await;
        if m.topic.as_str() != "cmd/warm" {
            break m;
        }
    };
    assert_eq!(got.topic.as_str(), "cmd/ok");
    let stats = node.broker().stats();
    assert_eq!(
        ferrymq_broker::Stats::get(&stats.topic_levels_refused),
        1,
        "the deep one was refused once"
    );
    let status = node.bridges().remove(0);
    assert!(status.connected && status.connects == connects, "{status}");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_queue_left_by_an_earlier_config_still_goes_up() {
    let dir = tempfile::tempdir().unwrap();
    // A live rule, and no upstream yet: the alarms wait in the live queue.
    let mut with_live = bridge_to(&[1]);
    with_live.forward.push(Forward {
        filter: "alarm/#".into(),
        remote_prefix: "site/".into(),
        lane: ferrymq_config::Lane::Live,
        ..Forward::default()
    });
    let node = Node::start(node_config(&dir, with_live)).await.unwrap();
    publish_local(&node, "alarm/fire", 3).await;
    node.shutdown().await;
    // The rule is gone from the config; the upstream is there now. (What
    // a removed rule queued goes up under its local topic, as in the
    // backlog lane.)
    let upstream = Mosquitto::start("");
    let mut watch = observer(upstream.port(), "alarm/#").await;
    let node = Node::start(node_config(&dir, bridge_to(&[upstream.port()])))
        .await
        .unwrap();
    let got = collect(&mut watch, 3).await;
    let topics: Vec<&str> = got.iter().map(|(t, _, _)| t.as_str()).collect();
    assert_eq!(topics, ["alarm/fire"; 3]);
    node.shutdown().await;
}
