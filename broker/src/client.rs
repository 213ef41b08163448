//! The in-process client: gateway firmware talks MQTT to the broker it
//! links, without a socket. [`crate::Broker::connect`] opens an in-memory
//! duplex stream, serves the broker side with the same connection task as
//! TCP clients (so an in-process session behaves exactly like a network
//! one: QoS, retained messages, persistent sessions, queue policies), and
//! runs the client side of MQTT 5.0 in a task of its own.
//!
//! Acknowledgements are end to end: [`Client::publish`] returns when the
//! broker acknowledged (for QoS 1/2: the message is durable in every
//! matching persistent queue), and a received QoS 1/2 message is
//! acknowledged to the broker only once [`Client::recv`] could take it,
//! or, with [`ClientOptions::manual_acks`], only when the application
//! calls [`Client::ack`] (a store-and-forward uplink acknowledges when the
//! upstream did; until then the message stays in the session's queue and
//! is sent again after a restart).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use ferrymq_codec::{
    self as codec, Connect, ConnectProperties, Disconnect, MqttString, Packet, Protocol, PubAck,
    Publish, PublishProperties, QoS, ReasonCode, Subscribe, Subscription, SubscriptionOptions,
    Unsubscribe,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::Shared;

/// How an in-process client connects.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The client identifier (empty: the broker assigns one).
    pub client_id: String,
    /// Start a new session (true) or resume the existing one.
    pub clean_start: bool,
    /// How long the session outlives the client (zero: it ends with it).
    pub session_expiry: Duration,
    /// Messages the client holds for [`Client::recv`] before it stops
    /// taking more (also its Receive Maximum towards the broker).
    pub receive_capacity: u16,
    /// Acknowledge received QoS 1/2 messages only through [`Client::ack`].
    pub manual_acks: bool,
    /// Have every stored message delivered with its stable
    /// [`crate::MessageId`] in a `ferry-id` user property.
    pub message_ids: bool,
}

impl ClientOptions {
    /// A clean, non-persistent session named `client_id`.
    pub fn new(client_id: impl Into<String>) -> Self {
        ClientOptions {
            client_id: client_id.into(),
            clean_start: true,
            session_expiry: Duration::ZERO,
            receive_capacity: 1024,
            manual_acks: false,
            message_ids: false,
        }
    }

    /// Received QoS 1/2 messages are acknowledged only by [`Client::ack`];
    /// at most `receive_capacity` wait unacknowledged.
    pub fn manual_acks(mut self) -> Self {
        self.manual_acks = true;
        self
    }

    /// Received stored messages carry their [`crate::MessageId`].
    pub fn message_ids(mut self) -> Self {
        self.message_ids = true;
        self
    }

    /// A persistent session that outlives the client by `expiry`,
    /// resumed if it exists.
    pub fn persistent(mut self, expiry: Duration) -> Self {
        self.clean_start = false;
        self.session_expiry = expiry;
        self
    }
}

/// Why an in-process client operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The broker refused it (CONNACK, PUBACK, PUBREC or SUBACK reason code).
    #[error("refused by the broker: {0}")]
    Refused(ReasonCode),
    /// The connection is closed (the broker stopped, or took it over).
    #[error("connection closed")]
    Closed,
    /// The request is not valid MQTT (e.g. a wildcard in a topic name).
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// A message delivered to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The topic.
    pub topic: MqttString,
    /// The payload.
    pub payload: Bytes,
    /// The delivery QoS.
    pub qos: QoS,
    /// Set for a retained message sent because of a new subscription.
    pub retain: bool,
    /// MQTT 5.0 properties.
    pub properties: PublishProperties,
    /// Set when the broker sends it again (after a reconnect).
    pub dup: bool,
    /// The packet identifier (QoS 1/2), which [`Client::ack`] answers.
    pub packet_id: u16,
    /// With [`ClientOptions::message_ids`]: when it was queued, in broker
    /// time ([`crate::Broker::now_ms`]).
    pub queued_ms: Option<u64>,
}

enum Command {
    Ack(u16, QoS),
    Send(Box<Packet>, Option<Done>),
    Disconnect(oneshot::Sender<()>),
}

/// An MQTT client connected to the broker in-process.
pub struct Client {
    commands: mpsc::Sender<Command>,
    incoming: mpsc::Receiver<Received>,
    task: JoinHandle<()>,
    session_present: bool,
}

/// In-memory stream buffer size, each way.
const DUPLEX_BUFFER: usize = 64 * 1024;
/// How long [`Client::disconnect`] waits for the broker to close.
const DISCONNECT_WAIT: Duration = Duration::from_secs(10);

pub(crate) async fn connect(
    shared: Arc<Shared>,
    options: ClientOptions,
    permit: OwnedSemaphorePermit,
) -> Result<Client, ClientError> {
    let client_id =
        MqttString::new(&options.client_id).map_err(|e| ClientError::Invalid(e.to_string()))?;
    let (ours, theirs) = tokio::io::duplex(DUPLEX_BUFFER);
    let peer = format!("in-process:{}", options.client_id);
    tokio::spawn(async move {
        let serve = crate::connection::ServeOptions {
            in_process: true,
            message_ids: options.message_ids,
            ..crate::connection::ServeOptions::default()
        };
        crate::connection::serve(theirs, peer, shared, serve, None).await;
        drop(permit);
    });
    let (mut reader, mut writer) = tokio::io::split(ours);
    let connect = Connect {
        protocol: Protocol::V5,
        clean_start: options.clean_start,
        keep_alive: 0,
        client_id,
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties {
            session_expiry_interval: Some(
                u32::try_from(options.session_expiry.as_secs()).unwrap_or(u32::MAX),
            ),
            receive_maximum: Some(options.receive_capacity.max(1)),
            ..ConnectProperties::default()
        },
    };
    let mut out = BytesMut::new();
    encode(&Packet::Connect(Box::new(connect)), &mut out)?;
    writer
        .write_all(&out)
        .await
        .map_err(|_| ClientError::Closed)?;
    let mut inbuf = BytesMut::new();
    let connack = loop {
        if let Some(packet) =
            codec::decode(&mut inbuf, Protocol::V5, u32::MAX).map_err(|_| ClientError::Closed)?
        {
            break packet;
        }
        if reader
            .read_buf(&mut inbuf)
            .await
            .map_err(|_| ClientError::Closed)?
            == 0
        {
            return Err(ClientError::Closed);
        }
    };
    let Packet::ConnAck(connack) = connack else {
        return Err(ClientError::Closed);
    };
    if connack.reason_code.is_error() {
        return Err(ClientError::Refused(connack.reason_code));
    }
    let capacity = usize::from(options.receive_capacity.max(1));
    let (commands, commands_rx) = mpsc::channel(64);
    let (incoming_tx, incoming) = mpsc::channel(capacity);
    let task = tokio::spawn(
        Driver {
            reader,
            writer,
            inbuf,
            out: BytesMut::new(),
            waiting: HashMap::new(),
            next_packet_id: 1,
            qos2_seen: HashSet::new(),
            backlog: VecDeque::new(),
            capacity,
            manual_acks: options.manual_acks,
            receive_maximum: usize::from(connack.properties.receive_maximum.unwrap_or(u16::MAX)),
            publishes_in_flight: 0,
            held: VecDeque::new(),
        }
        .run(commands_rx, incoming_tx),
    );
    Ok(Client {
        commands,
        incoming,
        task,
        session_present: connack.session_present,
    })
}

fn encode(packet: &Packet, out: &mut BytesMut) -> Result<(), ClientError> {
    packet
        .encode(Protocol::V5, out)
        .map(|_| ())
        .map_err(|e| ClientError::Invalid(e.to_string()))
}

fn topic(text: &str) -> Result<MqttString, ClientError> {
    MqttString::new(text).map_err(|e| ClientError::Invalid(e.to_string()))
}

impl Client {
    /// Whether the broker resumed an existing session.
    pub fn session_present(&self) -> bool {
        self.session_present
    }

    async fn request(&self, packet: Packet) -> Result<Packet, ClientError> {
        let (done, result) = oneshot::channel();
        self.commands
            .send(Command::Send(Box::new(packet), Some(done)))
            .await
            .map_err(|_| ClientError::Closed)?;
        result.await.map_err(|_| ClientError::Closed)?
    }

    /// Publishes a message. Returns once the broker acknowledged it (QoS 0:
    /// once it was handed to the broker).
    pub async fn publish(
        &self,
        topic_name: &str,
        payload: impl Into<Bytes>,
        qos: QoS,
        retain: bool,
    ) -> Result<(), ClientError> {
        let publish = Publish {
            qos,
            retain,
            topic: topic(topic_name)?,
            payload: payload.into(),
            ..Publish::default()
        };
        self.publish_packet(publish).await
    }

    /// Publishes a prepared PUBLISH (properties included); its packet
    /// identifier is assigned here.
    pub async fn publish_packet(&self, publish: Publish) -> Result<(), ClientError> {
        codec::topic::validate_topic_name(&publish.topic)
            .map_err(|e| ClientError::Invalid(e.to_string()))?;
        match self.request(Packet::Publish(publish)).await? {
            Packet::PubAck(ack) | Packet::PubComp(ack) | Packet::PubRec(ack)
                if ack.reason_code.is_error() =>
            {
                Err(ClientError::Refused(ack.reason_code))
            }
            _ => Ok(()),
        }
    }

    /// A handle that publishes on this client's session from elsewhere
    /// (another task, or beside [`Client::recv`]).
    pub fn publisher(&self) -> Publisher {
        Publisher {
            commands: self.commands.clone(),
        }
    }

    /// Acknowledges a received QoS 1/2 message (with
    /// [`ClientOptions::manual_acks`]; otherwise messages are acknowledged
    /// when taken and this does nothing).
    pub async fn ack(&self, received: &Received) -> Result<(), ClientError> {
        if received.qos == QoS::AtMostOnce {
            return Ok(());
        }
        self.commands
            .send(Command::Ack(received.packet_id, received.qos))
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// Subscribes to a topic filter; returns the granted QoS.
    pub async fn subscribe(&self, filter: &str, qos: QoS) -> Result<QoS, ClientError> {
        self.subscribe_with(
            filter,
            SubscriptionOptions {
                qos,
                ..SubscriptionOptions::default()
            },
        )
        .await
    }

    /// Subscribes with every MQTT 5.0 subscription option (No Local,
    /// Retain As Published, Retain Handling); returns the granted QoS.
    pub async fn subscribe_with(
        &self,
        filter: &str,
        options: SubscriptionOptions,
    ) -> Result<QoS, ClientError> {
        let subscribe = Subscribe {
            packet_id: 0,
            subscriptions: vec![Subscription {
                filter: topic(filter)?,
                options,
            }],
            properties: Default::default(),
        };
        codec::topic::validate_topic_filter(filter)
            .map_err(|e| ClientError::Invalid(e.to_string()))?;
        match self.request(Packet::Subscribe(subscribe)).await? {
            Packet::SubAck(ack) => match ack.reason_codes.first() {
                Some(code) if !code.is_error() => {
                    QoS::from_bits(code.0).map_err(|_| ClientError::Refused(*code))
                }
                Some(code) => Err(ClientError::Refused(*code)),
                None => Err(ClientError::Closed),
            },
            _ => Err(ClientError::Closed),
        }
    }

    /// Removes a subscription.
    pub async fn unsubscribe(&self, filter: &str) -> Result<(), ClientError> {
        let unsubscribe = Unsubscribe {
            packet_id: 0,
            filters: vec![topic(filter)?],
            properties: Default::default(),
        };
        self.request(Packet::Unsubscribe(unsubscribe))
            .await
            .map(|_| ())
    }

    /// The next message delivered to this client; `None` once the
    /// connection has closed and every delivered message was taken.
    pub async fn recv(&mut self) -> Option<Received> {
        self.incoming.recv().await
    }

    /// Disconnects normally (no will) and waits for the connection to end.
    /// A persistent session stays for its expiry.
    pub async fn disconnect(self) {
        let (done, wait) = oneshot::channel();
        if self.commands.send(Command::Disconnect(done)).await.is_ok() {
            let _ = wait.await;
        }
        let _ = self.task.await;
    }
}

/// Publishes on a [`Client`]'s session ([`Client::publisher`]).
#[derive(Clone)]
pub struct Publisher {
    commands: mpsc::Sender<Command>,
}

/// The broker's answer to a publish handed over by [`Publisher::submit`].
pub struct PublishAck(oneshot::Receiver<Result<Packet, ClientError>>);

impl std::future::Future for PublishAck {
    type Output = Result<(), ClientError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx).map(|r| match r {
            Ok(Ok(Packet::PubAck(ack) | Packet::PubComp(ack) | Packet::PubRec(ack)))
                if ack.reason_code.is_error() =>
            {
                Err(ClientError::Refused(ack.reason_code))
            }
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ClientError::Closed),
        })
    }
}

impl Publisher {
    /// Hands a PUBLISH to the session (publishes leave in the order they
    /// are submitted) and returns the future of its acknowledgement, so a
    /// caller can have many in flight.
    pub async fn submit(&self, publish: Publish) -> Result<PublishAck, ClientError> {
        codec::topic::validate_topic_name(&publish.topic)
            .map_err(|e| ClientError::Invalid(e.to_string()))?;
        let (done, result) = oneshot::channel();
        self.commands
            .send(Command::Send(
                Box::new(Packet::Publish(publish)),
                Some(done),
            ))
            .await
            .map_err(|_| ClientError::Closed)?;
        Ok(PublishAck(result))
    }
}

/// Where a request's answer goes.
type Done = oneshot::Sender<Result<Packet, ClientError>>;

/// What an outstanding request waits for.
struct Waiting {
    done: Done,
    /// A QoS 1/2 PUBLISH (counts against the broker's Receive Maximum).
    publish: bool,
}

/// The client side of the connection.
struct Driver<R, W> {
    reader: R,
    writer: W,
    inbuf: BytesMut,
    out: BytesMut,
    /// Requests awaiting their acknowledgement, by packet identifier.
    waiting: HashMap<u16, Waiting>,
    next_packet_id: u16,
    /// Inbound QoS 2 packet identifiers received and not yet released.
    qos2_seen: HashSet<u16>,
    /// Messages received but not yet taken by the application, with the
    /// acknowledgement to send once taken.
    backlog: VecDeque<(Received, Option<Packet>)>,
    capacity: usize,
    /// Acknowledgements wait for [`Command::Ack`].
    manual_acks: bool,
    /// The broker's Receive Maximum: QoS 1/2 publishes it takes
    /// unacknowledged (more is a protocol error, so more wait in `held`).
    receive_maximum: usize,
    publishes_in_flight: usize,
    /// QoS 1/2 publishes waiting for room in the broker's window, in order
    /// (bounded by the command channel and its callers).
    held: VecDeque<(Packet, Option<Done>)>,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Driver<R, W> {
    fn packet_id(&mut self) -> u16 {
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = id.checked_add(1).unwrap_or(1);
            if id != 0 && !self.waiting.contains_key(&id) {
                return id;
            }
        }
    }

    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        incoming: mpsc::Sender<Received>,
    ) {
        let mut disconnecting: Option<oneshot::Sender<()>> = None;
        // Packets that came in the same read as the CONNACK.
        let mut open = self.received();
        while open {
            // Cancel-safe branches: `recv`, `reserve`, `read_buf` and
            // `write` do nothing unless they complete.
            tokio::select! {
                command = commands.recv(), if disconnecting.is_none() => match command {
                    Some(Command::Send(packet, done)) => self.send(*packet, done),
                    Some(Command::Ack(packet_id, qos)) => {
                        let ack = PubAck::new(packet_id);
                        let _ = encode(&match qos {
                            QoS::ExactlyOnce => Packet::PubRec(ack),
                            _ => Packet::PubAck(ack),
                        }, &mut self.out);
                    }
                    Some(Command::Disconnect(done)) => {
                        let _ = encode(&Packet::Disconnect(Disconnect::new(ReasonCode::NORMAL_DISCONNECTION)), &mut self.out);
                        disconnecting = Some(done);
                    }
                    None => break,
                },
                permit = incoming.reserve(), if !self.backlog.is_empty() => {
                    let Ok(permit) = permit else { break };
                    if let Some((received, ack)) = self.backlog.pop_front() {
                        permit.send(received);
                        if let Some(ack) = ack {
                            let _ = encode(&ack, &mut self.out);
                        }
                    }
                }
                read = self.reader.read_buf(&mut self.inbuf), if self.backlog.len() < self.capacity => {
                    match read {
                        Ok(n) if n > 0 => open = self.received(),
                        _ => break,
                    }
                }
                written = self.writer.write(&self.out), if !self.out.is_empty() => {
                    match written {
                        Ok(n) if n > 0 => self.out.advance(n),
                        _ => break,
                    }
                }
                else => break,
            }
            if self.out.is_empty()
                && let Some(done) = disconnecting.take()
            {
                let _ = self.writer.shutdown().await;
                // The broker closes its side once it has handled everything
                // up to the DISCONNECT: wait for that (bounded), so that a
                // reconnect cannot overtake acknowledgements sent before.
                let mut rest = [0u8; 4096];
                let _ = tokio::time::timeout(DISCONNECT_WAIT, async {
                    while matches!(self.reader.read(&mut rest).await, Ok(n) if n > 0) {}
                })
                .await;
                let _ = done.send(());
                break;
            }
        }
        // Hand over what was received, then end.
        for (received, _) in self.backlog.drain(..) {
            let _ = incoming.send(received).await;
        }
        for (_, waiting) in self.waiting.drain() {
            let _ = waiting.done.send(Err(ClientError::Closed));
        }
    }

    fn send(&mut self, packet: Packet, done: Option<Done>) {
        let publish = matches!(&packet, Packet::Publish(p) if p.qos != QoS::AtMostOnce);
        if publish && (self.publishes_in_flight >= self.receive_maximum || !self.held.is_empty()) {
            self.held.push_back((packet, done));
            return;
        }
        self.send_now(packet, done, publish);
    }

    /// Encodes a request (`publish`: a QoS 1/2 PUBLISH that fits the
    /// broker's window).
    fn send_now(&mut self, mut packet: Packet, done: Option<Done>, publish: bool) {
        let needs_id = match &packet {
            Packet::Publish(p) => p.qos != QoS::AtMostOnce,
            Packet::Subscribe(_) | Packet::Unsubscribe(_) => true,
            _ => false,
        };
        let id = if needs_id { self.packet_id() } else { 0 };
        match &mut packet {
            Packet::Publish(p) if needs_id => p.packet_id = id,
            Packet::Subscribe(s) => s.packet_id = id,
            Packet::Unsubscribe(u) => u.packet_id = id,
            _ => {}
        }
        if let Err(e) = encode(&packet, &mut self.out) {
            if let Some(done) = done {
                let _ = done.send(Err(e));
            }
            return;
        }
        if publish {
            self.publishes_in_flight += 1;
        }
        match done {
            Some(done) if needs_id => {
                self.waiting.insert(id, Waiting { done, publish });
            }
            // QoS 0: done once handed over.
            Some(done) => {
                let _ = done.send(Ok(packet));
            }
            None => {}
        }
    }

    fn complete(&mut self, packet_id: u16, packet: Packet) {
        if let Some(waiting) = self.waiting.remove(&packet_id) {
            let _ = waiting.done.send(Ok(packet));
            if waiting.publish {
                self.publishes_in_flight = self.publishes_in_flight.saturating_sub(1);
                while self.publishes_in_flight < self.receive_maximum {
                    let Some((packet, done)) = self.held.pop_front() else {
                        break;
                    };
                    self.send_now(packet, done, true);
                }
            }
        }
    }

    /// Handles every complete packet read. Returns false to close.
    fn received(&mut self) -> bool {
        loop {
            let packet = match codec::decode(&mut self.inbuf, Protocol::V5, u32::MAX) {
                Ok(Some(packet)) => packet,
                Ok(None) => return true,
                Err(_) => return false,
            };
            match packet {
                Packet::Publish(p) => self.incoming_publish(p),
                Packet::PubAck(ack) | Packet::PubComp(ack) => {
                    self.complete(ack.packet_id, Packet::PubAck(ack))
                }
                Packet::PubRec(ack) => {
                    if ack.reason_code.is_error() {
                        self.complete(ack.packet_id, Packet::PubRec(ack));
                    } else {
                        let _ = encode(&Packet::PubRel(PubAck::new(ack.packet_id)), &mut self.out);
                    }
                }
                Packet::PubRel(rel) => {
                    self.qos2_seen.remove(&rel.packet_id);
                    let _ = encode(&Packet::PubComp(PubAck::new(rel.packet_id)), &mut self.out);
                }
                Packet::SubAck(ack) => self.complete(ack.packet_id, Packet::SubAck(ack)),
                Packet::UnsubAck(ack) => self.complete(ack.packet_id, Packet::UnsubAck(ack)),
                Packet::Disconnect(_) => return false,
                _ => {}
            }
        }
    }

    fn incoming_publish(&mut self, p: Publish) {
        let mut properties = p.properties;
        let mut queued_ms = None;
        properties.user_properties.retain(|(key, value)| {
            if key.as_str() == crate::message::QUEUED_AT_PROPERTY {
                queued_ms = value.as_str().parse().ok();
                false
            } else {
                true
            }
        });
        let received = Received {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            properties,
            dup: p.dup,
            packet_id: p.packet_id,
            queued_ms,
        };
        if self.manual_acks {
            // QoS 2: delivered once per packet id until its PUBREL.
            if p.qos != QoS::ExactlyOnce || self.qos2_seen.insert(p.packet_id) {
                self.backlog.push_back((received, None));
            }
            return;
        }
        match p.qos {
            QoS::AtMostOnce => self.backlog.push_back((received, None)),
            QoS::AtLeastOnce => self
                .backlog
                .push_back((received, Some(Packet::PubAck(PubAck::new(p.packet_id))))),
            QoS::ExactlyOnce => {
                // Delivered once; a resend is only acknowledged again.
                if self.qos2_seen.insert(p.packet_id) {
                    self.backlog.push_back((received, None));
                }
                let _ = encode(&Packet::PubRec(PubAck::new(p.packet_id)), &mut self.out);
            }
        }
    }
}
