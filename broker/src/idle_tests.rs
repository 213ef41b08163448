//! Idle connections: one with nothing to do waits on its socket and its
//! session queue's doorbell only, and its keep-alive deadline sits in the
//! broker's shared queue (`keepalive.rs`); a plain TCP one goes dormant,
//! without a task (`dormant.rs`). These tests let connections go idle on
//! a paused clock, in-memory (always a task) and over loopback TCP
//! (dormant), and wake them each way: keep-alive expiry, a ping before
//! it, a delivery, a takeover, the client closing and a shutdown.

use std::time::Duration;

use bytes::BytesMut;
use ferrymq_codec::{
    self as codec, ConnAck, Connect, ConnectProperties, Disconnect, MqttString, Packet, Protocol,
    QoS, ReasonCode, Subscribe, Subscription, SubscriptionOptions,
};
use ferrymq_config::Config;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::Broker;
use crate::connection::{ServeOptions, serve};
use crate::storage::MemoryStore;

/// A byte stream both ways.
trait Duplex: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Duplex for T {}

/// A client speaking raw packets over an in-memory stream (served by the
/// same connection task as a TCP client) or over loopback TCP.
struct Raw {
    stream: Box<dyn Duplex>,
    buf: BytesMut,
}

impl Raw {
    /// Connects as `client_id` (5.0) with `keep_alive` seconds, in memory.
    async fn open(broker: &Broker, client_id: &str, keep_alive: u16) -> (Raw, ConnAck) {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let shared = broker.shared.clone();
        let peer = format!("idle-test:{client_id}");
        tokio::spawn(async move {
            serve(theirs, peer, shared, ServeOptions::default(), None).await;
        });
        Raw::connect(Box::new(ours), client_id, keep_alive).await
    }

    /// The same over TCP, to the broker's listener.
    async fn tcp(broker: &Broker, client_id: &str, keep_alive: u16) -> (Raw, ConnAck) {
        let stream = tokio::net::TcpStream::connect(broker.local_addrs()[0])
            .await
            .expect("connect");
        Raw::connect(Box::new(stream), client_id, keep_alive).await
    }

    async fn connect(stream: Box<dyn Duplex>, client_id: &str, keep_alive: u16) -> (Raw, ConnAck) {
        let mut raw = Raw {
            stream,
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
    // TCP connections go dormant when idle (in-memory ones never do).
    config.limits.dormant_connections = true;
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
    idle.send(&subscribe("news")).await;
    assert!(matches!(idle.recv().await, Some(Packet::SubAck(_))));
    // Long idle: a minute, less than its keep-alive limit of 150 s.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let app = deliver_news(&broker, &mut idle).await;
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

/// Waits (on the paused clock, at most a virtual minute) until `what`.
async fn until(what: &str, f: impl Fn() -> bool) {
    for _ in 0..6000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never: {what}");
}

/// An in-process client publishes "woken" on `news`, and `raw` (subscribed
/// to it) gets it. Returns the client (dropping it would close it).
async fn deliver_news(broker: &Broker, raw: &mut Raw) -> crate::Client {
    let app = broker
        .connect(crate::ClientOptions::new("app"))
        .await
        .expect("app");
    app.publish("news", "woken", crate::QoS::AtMostOnce, false)
        .await
        .expect("publish");
    match raw.recv().await {
        Some(Packet::Publish(p)) => assert_eq!(&p.payload[..], b"woken"),
        other => panic!("no delivery but {other:?}"),
    }
    app
}

fn subscribe(filter: &str) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: 1,
        subscriptions: vec![Subscription {
            filter: MqttString::new(filter).expect("filter"),
            options: SubscriptionOptions {
                qos: QoS::AtMostOnce,
                ..SubscriptionOptions::default()
            },
        }],
        properties: Default::default(),
    })
}

#[tokio::test(start_paused = true)]
async fn a_dormant_connection_wakes_for_a_delivery_a_ping_a_takeover_and_a_shutdown() {
    let (broker, _dir) = broker().await;
    let handle = broker.handle();
    let dormant = || handle.dormant_connections();
    let (mut sub, _) = Raw::tcp(&broker, "sub", 100).await;
    // Dormant once its CONNACK is out.
    until("dormant after CONNACK", || dormant() == 1).await;
    sub.send(&subscribe("news")).await;
    assert!(matches!(sub.recv().await, Some(Packet::SubAck(_))));
    // Woken, it stays awake through a quiet check with traffic before it,
    // and goes dormant at the first one that finds it quiet (2 to 4 s).
    assert_eq!(dormant(), 0, "awake after its SUBSCRIBE");
    tokio::time::sleep(Duration::from_millis(1_900)).await;
    assert_eq!(dormant(), 0, "dormant before a quiet spell");
    until("dormant after a quiet spell", || dormant() == 1).await;
    // A delivery wakes it (its session queue's doorbell).
    let app = deliver_news(&broker, &mut sub).await;
    until("dormant after the delivery", || dormant() == 1).await;
    // A ping wakes it (its socket).
    sub.send(&Packet::PingReq).await;
    assert_eq!(sub.recv().await, Some(Packet::PingResp));
    until("dormant after the ping", || dormant() == 1).await;
    // Taken over while dormant: told so (the kick rings its doorbell).
    let (_successor, ack) = Raw::tcp(&broker, "sub", 60).await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    assert_eq!(
        sub.closed_within(Duration::from_secs(1)).await,
        Some(disconnect(ReasonCode::SESSION_TAKEN_OVER))
    );
    until("the successor dormant", || dormant() == 1).await;
    // Dormant ones are woken to be told the broker stops.
    let (mut last, _) = Raw::tcp(&broker, "last", 0).await;
    until("both dormant", || dormant() == 2).await;
    let stopping = tokio::spawn(async move { broker.shutdown().await });
    assert_eq!(
        last.closed_within(Duration::from_secs(5)).await,
        Some(disconnect(ReasonCode::SERVER_SHUTTING_DOWN))
    );
    stopping.await.expect("shutdown");
    drop(app);
}

#[tokio::test(start_paused = true)]
async fn a_dormant_connection_is_closed_at_one_and_a_half_keep_alives() {
    let (broker, _dir) = broker().await;
    let handle = broker.handle();
    let (mut sleepy, _) = Raw::tcp(&broker, "sleepy", 10).await;
    let (mut pinger, _) = Raw::tcp(&broker, "pinger", 10).await;
    until("both dormant", || handle.dormant_connections() == 2).await;
    // Dormant, their deadlines stay in the queue (no quiet checks).
    assert_eq!(broker.shared.keep_alive.held(), 2);
    tokio::time::sleep(Duration::from_secs(9)).await;
    pinger.send(&Packet::PingReq).await;
    assert_eq!(pinger.recv().await, Some(Packet::PingResp));
    assert_eq!(
        sleepy.closed_within(Duration::from_millis(5_800)).await,
        None
    );
    assert_eq!(
        sleepy.closed_within(Duration::from_millis(400)).await,
        Some(disconnect(ReasonCode::KEEP_ALIVE_TIMEOUT))
    );
    // The pinger went dormant again after its ping; its deadline is
    // 9 + 15 s.
    until("the pinger dormant", || handle.dormant_connections() == 1).await;
    assert_eq!(
        pinger.closed_within(Duration::from_millis(8_500)).await,
        None
    );
    assert_eq!(
        pinger.closed_within(Duration::from_millis(600)).await,
        Some(disconnect(ReasonCode::KEEP_ALIVE_TIMEOUT))
    );
    assert_eq!(handle.dormant_connections(), 0);
    assert_eq!(broker.shared.keep_alive.held(), 0, "no deadline left");
    broker.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_client_closing_its_dormant_connection_ends_it_at_once() {
    let (broker, _dir) = broker().await;
    let handle = broker.handle();
    let (raw, _) = Raw::tcp(&broker, "gone", 600).await;
    until("dormant", || handle.dormant_connections() == 1).await;
    assert_eq!(handle.open_connections(), 1);
    drop(raw);
    // Its end of stream wakes it; it closes as any connection would.
    until("closed", || handle.open_connections() == 0).await;
    assert_eq!(handle.dormant_connections(), 0);
    assert_eq!(broker.shared.keep_alive.held(), 0, "no deadline left");
    broker.shutdown().await;
}
