//! Idle connections: one with nothing to do waits on its socket and its
//! session queue's doorbell only, and its keep-alive deadline sits in the
//! broker's shared queue (`keepalive.rs`). These tests let connections go
//! idle on a paused clock and wake them each way: keep-alive expiry, a
//! ping before it, a delivery, a takeover and a shutdown.

use std::time::Duration;

use bytes::BytesMut;
use ferrymq_codec::{
    self as codec, ConnAck, Connect, ConnectProperties, Disconnect, MqttString, Packet, Protocol,
    QoS, ReasonCode, Subscribe, Subscription, SubscriptionOptions,
};
use ferrymq_config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use crate::Broker;
use crate::connection::{ServeOptions, serve};
use crate::storage::MemoryStore;

/// A client speaking raw packets over an in-memory stream, served by the
/// same connection task as a TCP client.
struct Raw {
    stream: DuplexStream,
    buf: BytesMut,
}

impl Raw {
    /// Connects as `client_id` (5.0) with `keep_alive` seconds.
    async fn open(broker: &Broker, client_id: &str, keep_alive: u16) -> (Raw, ConnAck) {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let shared = broker.shared.clone();
        let peer = format!("idle-test:{client_id}");
        tokio::spawn(async move {
            serve(theirs, peer, shared, ServeOptions::default()).await;
        });
        let mut raw = Raw {
            stream: ours,
            buf: BytesMut::new(),
        };
        raw.send(&Packet::Connect(Box::new(Connect {
            protocol: Protocol::V5,
            clean_start: true,
            keep_alive,
            client_id: MqttString::new(client_id).expect("client id"),
            will: None,
            username: None,
            password: None,
            properties: ConnectProperties::default(),
        })))
        .await;
        match raw.recv().await {
            Some(Packet::ConnAck(ack)) => (raw, *ack),
            other => panic!("{client_id}: no CONNACK but {other:?}"),
        }
    }

    async fn send(&mut self, packet: &Packet) {
        let mut out = BytesMut::new();
        packet.encode(Protocol::V5, &mut out).expect("encode");
        self.stream.write_all(&out).await.expect("write");
    }

    /// The next packet; `None` once the broker closed the stream.
    async fn recv(&mut self) -> Option<Packet> {
        loop {
            if let Some(packet) =
                codec::decode(&mut self.buf, Protocol::V5, 1 << 20).expect("decodes")
            {
                return Some(packet);
            }
            if self.stream.read_buf(&mut self.buf).await.ok()? == 0 {
                return None;
            }
        }
    }

    /// Whether the broker closed the stream within `within` (packets sent
    /// before the close are returned).
    async fn closed_within(&mut self, within: Duration) -> Option<Vec<Packet>> {
        let mut got = Vec::new();
        tokio::time::timeout(within, async {
            while let Some(packet) = self.recv().await {
                got.push(packet);
            }
        })
        .await
        .ok()?;
        Some(got)
    }
}

async fn broker() -> (Broker, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = Config {
        data_dir: dir.path().join("data"),
        ..Config::default()
    };
    config.listeners[0].bind = "127.0.0.1:0".parse().expect("address");
    // The memory store: a paused clock cannot wait for a disk thread.
    let broker = Broker::start_with_store(config, MemoryStore::new())
        .await
        .expect("broker");
    (broker, dir)
}

fn disconnect(code: ReasonCode) -> Vec<Packet> {
    vec![Packet::Disconnect(Disconnect::new(code))]
}

#[tokio::test(start_paused = true)]
async fn an_idle_connection_is_closed_at_one_and_a_half_keep_alives_by_the_shared_queue() {
    let (broker, _dir) = broker().await;
    let keep_alive = &broker.shared.keep_alive;
    let (mut sleepy, _) = Raw::open(&broker, "sleepy", 10).await;
    let (mut pinger, _) = Raw::open(&broker, "pinger", 10).await;
    assert_eq!(keep_alive.held(), 2, "one deadline per connection");
    // The pinger pings at 9 s; both are idle otherwise.
    tokio::time::sleep(Duration::from_secs(9)).await;
    pinger.send(&Packet::PingReq).await;
    assert_eq!(pinger.recv().await, Some(Packet::PingResp));
    // Nothing closes before 15 s.
    assert_eq!(
        sleepy.closed_within(Duration::from_millis(5_900)).await,
        None
    );
    assert_eq!(
        sleepy.closed_within(Duration::from_millis(200)).await,
        Some(disconnect(ReasonCode::KEEP_ALIVE_TIMEOUT))
    );
    // The pinger's deadline moved to 9 + 15 s when its first one came.
    assert_eq!(
        pinger.closed_within(Duration::from_millis(8_700)).await,
        None
    );
    assert_eq!(
        pinger.closed_within(Duration::from_millis(400)).await,
        Some(disconnect(ReasonCode::KEEP_ALIVE_TIMEOUT))
    );
    assert_eq!(
        keep_alive.held(),
        0,
        "a closed connection leaves no deadline"
    );
    broker.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn an_idle_connection_wakes_for_a_delivery_a_takeover_and_a_shutdown() {
    let (broker, _dir) = broker().await;
    let (mut idle, _) = Raw::open(&broker, "idle", 100).await;
    idle.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        subscriptions: vec![Subscription {
            filter: MqttString::new("news").expect("filter"),
            options: SubscriptionOptions {
                qos: QoS::AtMostOnce,
                ..SubscriptionOptions::default()
            },
        }],
        properties: Default::default(),
    }))
    .await;
    assert!(matches!(idle.recv().await, Some(Packet::SubAck(_))));
    // Long idle: a minute, less than its keep-alive limit of 150 s.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let app = broker
        .connect(crate::ClientOptions::new("app"))
        .await
        .expect("app");
    app.publish("news", "woken", crate::QoS::AtMostOnce, false)
        .await
        .expect("publish");
    match idle.recv().await {
        Some(Packet::Publish(p)) => assert_eq!(&p.payload[..], b"woken"),
        other => panic!("no delivery but {other:?}"),
    }
    // Idle again, then taken over by a new connection with its id.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let (_successor, ack) = Raw::open(&broker, "idle", 60).await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    assert_eq!(
        idle.closed_within(Duration::from_secs(1)).await,
        Some(disconnect(ReasonCode::SESSION_TAKEN_OVER))
    );
    // Another idle one, then the broker stops.
    let (mut last, _) = Raw::open(&broker, "last", 0).await;
    tokio::time::sleep(Duration::from_secs(600)).await;
    let stopping = tokio::spawn(async move { broker.shutdown().await });
    assert_eq!(
        last.closed_within(Duration::from_secs(5)).await,
        Some(disconnect(ReasonCode::SERVER_SHUTTING_DOWN))
    );
    stopping.await.expect("shutdown");
    drop(app);
}
