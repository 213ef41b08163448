//! One client connection: a single task that reads and decodes packets,
//! handles them, and writes what it owes the client, batching every packet
//! ready at the same moment into one write.
//!
//! The task never blocks on the socket in one direction while the other
//! has work: it waits for readiness (`readable()` / `writable()`) and
//! does non-blocking reads and writes. When the client stops reading and
//! the write buffer passes [`OUT_HIGH_WATER`], the task stops reading from
//! the client and stops draining its outbox (which then fills and drops,
//! counted) until the client catches up; other clients never wait for it.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use ferrymq_codec::{
    self as codec, ConnAck, Connect, DecodeError, Disconnect, MqttString, Packet, Protocol, PubAck,
    Publish, QoS, ReasonCode, ReasonContext, SubAck, Subscribe, UnsubAck, Unsubscribe, Will,
};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::Shared;
use crate::message::{Message, SessionId};
use crate::outbox::{Delivery, Outbox, OutboxLimits, Pushed};
use crate::registry::Control;
use crate::router::{RouteCache, Subscriber};
use crate::stats::Stats;

/// Above this many bytes waiting to be written, stop reading from the
/// client and stop draining its outbox.
const OUT_HIGH_WATER: usize = 256 * 1024;
/// Deliveries taken from the outbox per turn of the loop, so reading
/// the client's own packets is never starved by a busy outbox.
const DRAIN_BATCH: usize = 256;
/// Read buffer growth step.
const READ_CHUNK: usize = 8 * 1024;
/// How long a closing connection may take to flush its last packets.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);
/// Outbox bounds until sessions get configurable queue limits.
const OUTBOX_LIMITS: OutboxLimits = OutboxLimits {
    max_messages: 10_000,
    max_bytes: 64 * 1024 * 1024,
};

/// Why a connection ends. Decides the DISCONNECT sent (MQTT 5.0) and
/// whether the will is published.
#[derive(Debug)]
enum Close {
    /// The client sent DISCONNECT; `with_will` for reason 0x04.
    Disconnect { with_will: bool },
    /// The client closed the socket without DISCONNECT.
    Eof,
    /// The socket failed.
    Io(io::Error),
    /// The client broke the protocol; the reason code goes in our DISCONNECT.
    Protocol(ReasonCode, String),
    /// No packet within 1.5 times the keep alive.
    KeepAlive,
    /// Another connection took over this client identifier.
    TakenOver,
    /// The broker is stopping.
    Shutdown,
}

impl Close {
    /// The reason code of the DISCONNECT we send, if we send one.
    fn reason_code(&self) -> Option<ReasonCode> {
        match self {
            Close::Disconnect { .. } | Close::Eof | Close::Io(_) => None,
            Close::Protocol(code, _) => Some(*code),
            Close::KeepAlive => Some(ReasonCode::KEEP_ALIVE_TIMEOUT),
            Close::TakenOver => Some(ReasonCode::SESSION_TAKEN_OVER),
            Close::Shutdown => Some(ReasonCode::SERVER_SHUTTING_DOWN),
        }
    }

    fn publishes_will(&self) -> bool {
        match self {
            Close::Disconnect { with_will } => *with_will,
            // The broker going down takes the subscribers with it.
            Close::Shutdown => false,
            _ => true,
        }
    }

    fn protocol(error: &DecodeError) -> Close {
        Close::Protocol(error.reason_code(), error.to_string())
    }
}

/// Serves one accepted TCP connection until it closes.
pub(crate) async fn serve(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown_rx.clone();
    let mut io = Io {
        stream,
        inbuf: BytesMut::new(),
        out: BytesMut::new(),
    };
    let connect_timeout = shared.config.limits.connect_timeout;
    let connect = tokio::select! {
        // Dropping the read future is safe: bytes already read stay in `inbuf`.
        r = tokio::time::timeout(connect_timeout, io.read_connect(&shared)) => r,
        _ = shutdown.wait_for(|stop| *stop) => return,
    };
    let connect = match connect {
        Ok(Ok(connect)) => connect,
        Ok(Err(reason)) => {
            debug!(%peer, %reason, "closing before CONNECT completed");
            io.flush_and_close().await;
            return;
        }
        Err(_) => {
            debug!(%peer, "no CONNECT within connect_timeout_secs; closing");
            return;
        }
    };
    let Some(mut session) = Session::accept(*connect, &mut io, &shared).await else {
        io.flush_and_close().await;
        return;
    };
    debug!(%peer, client_id = %session.client_id, protocol = ?session.protocol, "connected");
    let close = session.run(&mut io, &shared, &mut shutdown).await;
    match &close {
        Close::Protocol(code, why) => {
            Stats::add(&shared.stats.protocol_errors, 1);
            warn!(%peer, client_id = %session.client_id, reason = %code, "closing: {why}");
        }
        Close::Io(e) => debug!(%peer, client_id = %session.client_id, "socket error: {e}"),
        other => debug!(%peer, client_id = %session.client_id, "closing: {other:?}"),
    }
    if let (Protocol::V5, Some(code)) = (session.protocol, close.reason_code()) {
        io.queue(&Packet::Disconnect(Disconnect::new(code)), Protocol::V5);
    }
    io.flush_and_close().await;
    session.end(&shared, close.publishes_will());
}

/// The socket and its buffers.
struct Io {
    stream: TcpStream,
    /// Bytes read but not yet decoded.
    inbuf: BytesMut,
    /// Encoded packets not yet written: everything owed to the client at
    /// one moment goes out in one write.
    out: BytesMut,
}

impl Io {
    /// Reads whatever the socket has (at least one byte, or EOF).
    /// Returns Ok(false) on EOF.
    fn try_read(&mut self) -> io::Result<Option<bool>> {
        if self.inbuf.capacity() - self.inbuf.len() < READ_CHUNK / 2 {
            self.inbuf.reserve(READ_CHUNK);
        }
        match self.stream.try_read_buf(&mut self.inbuf) {
            Ok(0) => Ok(Some(false)),
            Ok(_) => Ok(Some(true)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes as much of `out` as the socket takes now.
    fn try_flush(&mut self) -> io::Result<()> {
        while !self.out.is_empty() {
            match self.stream.try_write(&self.out) {
                Ok(n) => {
                    let _ = self.out.split_to(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Encodes a packet into the write buffer. Our own packets always
    /// encode; if one did not, that is a bug worth a log line, not a panic.
    fn queue(&mut self, packet: &Packet, protocol: Protocol) {
        if let Err(e) = packet.encode(protocol, &mut self.out) {
            warn!("could not encode {:?}: {e}", packet.packet_type());
        }
    }

    /// Writes what is left (bounded in time) and closes the socket.
    async fn flush_and_close(&mut self) {
        use tokio::io::AsyncWriteExt;
        let out = std::mem::take(&mut self.out);
        let _ = tokio::time::timeout(CLOSE_FLUSH, async {
            self.stream.write_all(&out).await?;
            self.stream.shutdown().await
        })
        .await;
    }

    /// Waits for the first packet, which must be CONNECT. On failure
    /// returns why, with any refusal (CONNACK) already queued.
    async fn read_connect(&mut self, shared: &Shared) -> Result<Box<Connect>, String> {
        let max = shared.config.limits.max_packet_size;
        loop {
            let level = connect_level(&self.inbuf);
            match codec::decode(&mut self.inbuf, Protocol::V5, max) {
                Ok(Some(Packet::Connect(connect))) => return Ok(connect),
                Ok(Some(other)) => {
                    // [MQTT-3.1.0-1]: the first packet must be CONNECT.
                    return Err(format!(
                        "first packet is {}, not CONNECT",
                        other.packet_type()
                    ));
                }
                Ok(None) => {}
                Err(error) => {
                    Stats::add(&shared.stats.protocol_errors, 1);
                    self.refuse_connect(level, &error);
                    return Err(error.to_string());
                }
            }
            self.stream.readable().await.map_err(|e| e.to_string())?;
            match self.try_read() {
                Ok(Some(true)) | Ok(None) => {}
                Ok(Some(false)) => return Err("closed before CONNECT".into()),
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Queues the CONNACK that tells a client why its CONNECT was refused,
    /// where the protocol has a way to say it.
    fn refuse_connect(&mut self, level: Option<u8>, error: &DecodeError) {
        let (protocol, code) = match (error, level) {
            // [MQTT-3.1.2-2]: unsupported level gets "unacceptable protocol
            // version", in the 3.1.1 format unless the client is newer.
            (DecodeError::UnsupportedProtocolLevel(l), _) => (
                if *l > 5 { Protocol::V5 } else { Protocol::V311 },
                ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
            ),
            (_, Some(5)) => {
                let code = error.reason_code();
                let code = if code.is_valid_for(ReasonContext::ConnAck) {
                    code
                } else {
                    ReasonCode::MALFORMED_PACKET
                };
                (Protocol::V5, code)
            }
            // 3.1.1 has no code for a malformed CONNECT: just close.
            _ => return,
        };
        let connack = ConnAck {
            reason_code: code,
            ..ConnAck::default()
        };
        self.queue(&Packet::ConnAck(Box::new(connack)), protocol);
    }
}

/// The protocol level of a CONNECT at the front of `buf`, if the bytes
/// are there: lets a refusal use the client's CONNACK format even when
/// the rest of its CONNECT is malformed.
fn connect_level(buf: &[u8]) -> Option<u8> {
    if buf.first()? >> 4 != 1 {
        return None;
    }
    let header_len = 1 + buf[1..].iter().take(4).position(|b| b & 0x80 == 0)? + 1;
    let body = buf.get(header_len..)?;
    (body.get(..6)? == b"\x00\x04MQTT").then(|| body.get(6).copied())?
}

/// The state of one connected client (this version keeps nothing after
/// the connection closes).
struct Session {
    id: SessionId,
    connection: u64,
    client_id: MqttString,
    protocol: Protocol,
    control: Arc<Control>,
    /// Messages routed to this client, waiting to be written.
    outbox: Arc<Outbox>,
    /// The filters this session subscribed to, to remove them at the end.
    filters: Vec<MqttString>,
    /// Inbound QoS 2 packet ids received and not yet released by PUBREL:
    /// a resent PUBLISH with one of these is acknowledged, not routed again.
    inbound_qos2: Vec<u16>,
    /// Our Receive Maximum: most QoS 2 publishes awaiting PUBREL at once.
    receive_maximum: usize,
    /// Largest packet the client accepts (MQTT 5.0 Maximum Packet Size).
    client_max_packet: usize,
    /// The will, published if the connection ends abnormally.
    will: Option<Will>,
    /// 1.5 x the keep alive; `None` when keep alive is 0.
    keep_alive: Option<Duration>,
    /// Topic -> routes memo for this client's publishes.
    routes: RouteCache,
    /// Deliveries taken from the outbox, reused between turns.
    batch: Vec<Delivery>,
}

impl Session {
    /// Checks a CONNECT, registers the client and queues the CONNACK.
    /// Returns `None` (with a refusal queued) when the client is refused.
    async fn accept(connect: Connect, io: &mut Io, shared: &Arc<Shared>) -> Option<Session> {
        let protocol = connect.protocol;
        let limits = &shared.config.limits;
        let refuse = |io: &mut Io, code: ReasonCode| {
            let connack = ConnAck {
                reason_code: code,
                ..ConnAck::default()
            };
            io.queue(&Packet::ConnAck(Box::new(connack)), protocol);
            None
        };
        if protocol == Protocol::V5 && connect.properties.authentication_method.is_some() {
            // No enhanced authentication method is available.
            return refuse(io, ReasonCode::BAD_AUTHENTICATION_METHOD);
        }
        if !shared.config.auth.allow_anonymous {
            // No credential store exists in this version: nobody can log in.
            return refuse(io, ReasonCode::NOT_AUTHORIZED);
        }
        let connection = shared.next_connection();
        let mut connack = ConnAck::default();
        let client_id = if connect.client_id.is_empty() {
            if protocol == Protocol::V311 && !connect.clean_start {
                // [MQTT-3.1.3-8]: an empty id needs a clean session in 3.1.1.
                return refuse(io, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID);
            }
            let assigned = MqttString::new(&format!("ferrymq-{}-{connection}", shared.boot_id))
                .unwrap_or_default();
            if protocol == Protocol::V5 {
                connack.properties.assigned_client_identifier = Some(assigned.clone());
            }
            assigned
        } else {
            connect.client_id.clone()
        };
        let mut keep_alive = connect.keep_alive;
        let max_keep_alive = u16::try_from(limits.max_keepalive.as_secs()).unwrap_or(u16::MAX);
        if protocol == Protocol::V5 && keep_alive > max_keep_alive {
            keep_alive = max_keep_alive;
            connack.properties.server_keep_alive = Some(keep_alive);
        }
        if protocol == Protocol::V5 {
            let p = &mut connack.properties;
            p.receive_maximum = Some(limits.receive_maximum);
            p.maximum_packet_size = Some(limits.max_packet_size);
            p.retain_available = Some(false);
            p.subscription_identifier_available = Some(false);
            p.shared_subscription_available = Some(false);
            p.wildcard_subscription_available = Some(true);
        }
        let control = Control::new(connection);
        if shared.registry.register(&client_id, control.clone()).await {
            debug!(%client_id, "took over an existing connection");
        }
        io.queue(&Packet::ConnAck(Box::new(connack)), protocol);
        let client_max_packet = match connect.properties.maximum_packet_size {
            Some(max) if protocol == Protocol::V5 => max as usize,
            _ => usize::MAX,
        };
        Some(Session {
            id: SessionId(connection),
            connection,
            client_id,
            protocol,
            control,
            outbox: Outbox::new(OUTBOX_LIMITS),
            filters: Vec::new(),
            inbound_qos2: Vec::new(),
            receive_maximum: usize::from(limits.receive_maximum),
            client_max_packet,
            will: connect.will,
            keep_alive: (keep_alive > 0)
                .then(|| Duration::from_millis(u64::from(keep_alive) * 1500)),
            routes: RouteCache::default(),
            batch: Vec::with_capacity(DRAIN_BATCH),
        })
    }

    /// The connection's main loop; returns why it ended.
    async fn run(
        &mut self,
        io: &mut Io,
        shared: &Shared,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Close {
        let control = self.control.clone();
        let outbox = self.outbox.clone();
        let mut last_packet = Instant::now();
        let keep_alive = self.keep_alive;
        let keep_alive_timer = tokio::time::sleep(keep_alive.unwrap_or(Duration::MAX / 4));
        tokio::pin!(keep_alive_timer);
        loop {
            if let Err(e) = io.try_flush() {
                return Close::Io(e);
            }
            let room = io.out.len() < OUT_HIGH_WATER;
            // Every branch is cancel-safe: the readiness futures do no I/O
            // (the branch bodies do it with try_read/try_write), `kicked`
            // and `ready` keep their permit when dropped, `changed` only
            // observes a value, and the timer is re-armed each turn.
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop) => return Close::Shutdown,
                _ = control.kicked() => return Close::TakenOver,
                _ = &mut keep_alive_timer, if keep_alive.is_some() => {
                    let limit = keep_alive.unwrap_or(Duration::MAX / 4);
                    let deadline = last_packet + limit;
                    if Instant::now() >= deadline {
                        return Close::KeepAlive;
                    }
                    keep_alive_timer.as_mut().reset(deadline);
                }
                ready = io.stream.readable(), if room => {
                    if let Err(e) = ready {
                        return Close::Io(e);
                    }
                    match io.try_read() {
                        Ok(Some(true)) => {}
                        Ok(None) => continue,
                        Ok(Some(false)) => return Close::Eof,
                        Err(e) => return Close::Io(e),
                    }
                    let max = shared.config.limits.max_packet_size;
                    let mut any = false;
                    loop {
                        match codec::decode(&mut io.inbuf, self.protocol, max) {
                            Ok(Some(packet)) => {
                                any = true;
                                if let Some(close) = self.handle(packet, io, shared) {
                                    return close;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => return Close::protocol(&e),
                        }
                    }
                    // One clock read per socket read, not per packet.
                    if any {
                        last_packet = Instant::now();
                    }
                }
                _ = outbox.ready(), if room => self.drain(io, shared),
                ready = io.stream.writable(), if !io.out.is_empty() => {
                    if let Err(e) = ready {
                        return Close::Io(e);
                    }
                }
            }
        }
    }

    /// Handles one packet from the client. Returns `Some` to close.
    fn handle(&mut self, packet: Packet, io: &mut Io, shared: &Shared) -> Option<Close> {
        let v5 = self.protocol == Protocol::V5;
        match packet {
            Packet::Publish(publish) => return self.publish(publish, io, shared),
            Packet::PubRel(rel) => {
                let mut comp = PubAck::new(rel.packet_id);
                match self.inbound_qos2.iter().position(|id| *id == rel.packet_id) {
                    Some(i) => {
                        self.inbound_qos2.swap_remove(i);
                    }
                    None if v5 => comp.reason_code = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND,
                    None => {}
                }
                io.queue(&Packet::PubComp(comp), self.protocol);
            }
            // Acknowledgements of QoS 1/2 deliveries: this version delivers
            // at QoS 0 only, so there is nothing to acknowledge.
            Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_) => {}
            Packet::Subscribe(subscribe) => return self.subscribe(subscribe, io, shared),
            Packet::Unsubscribe(unsubscribe) => self.unsubscribe(unsubscribe, io, shared),
            Packet::PingReq => io.queue(&Packet::PingResp, self.protocol),
            Packet::Disconnect(d) => {
                return Some(Close::Disconnect {
                    with_will: d.reason_code == ReasonCode::DISCONNECT_WITH_WILL_MESSAGE,
                });
            }
            Packet::Connect(_) => {
                // [MQTT-3.1.0-2]: a second CONNECT is a protocol violation.
                return Some(Close::Protocol(
                    ReasonCode::PROTOCOL_ERROR,
                    "second CONNECT".into(),
                ));
            }
            Packet::Auth(_) => {
                // AUTH is only valid after CONNECT named an authentication method.
                return Some(Close::Protocol(
                    ReasonCode::PROTOCOL_ERROR,
                    "AUTH without authentication method".into(),
                ));
            }
            other @ (Packet::ConnAck(_)
            | Packet::SubAck(_)
            | Packet::UnsubAck(_)
            | Packet::PingResp) => {
                return Some(Close::Protocol(
                    ReasonCode::PROTOCOL_ERROR,
                    format!("{} is sent by servers only", other.packet_type()),
                ));
            }
        }
        None
    }

    fn publish(&mut self, publish: Publish, io: &mut Io, shared: &Shared) -> Option<Close> {
        let v5 = self.protocol == Protocol::V5;
        if v5 {
            if !publish.properties.subscription_identifiers.is_empty() {
                // [MQTT-3.3.4-6]: clients must not send Subscription Identifiers.
                return Some(Close::Protocol(
                    ReasonCode::PROTOCOL_ERROR,
                    "PUBLISH with a Subscription Identifier".into(),
                ));
            }
            if publish.properties.topic_alias.is_some() {
                // Our Topic Alias Maximum is 0 (not announced).
                return Some(Close::Protocol(
                    ReasonCode::TOPIC_ALIAS_INVALID,
                    "Topic Alias beyond Topic Alias Maximum 0".into(),
                ));
            }
            if publish.retain {
                // CONNACK announced Retain Available = 0.
                return Some(Close::Protocol(
                    ReasonCode::RETAIN_NOT_SUPPORTED,
                    "retained PUBLISH while Retain Available is 0".into(),
                ));
            }
        }
        if publish.qos == QoS::ExactlyOnce && self.inbound_qos2.contains(&publish.packet_id) {
            // A resend of a QoS 2 publish we already routed: acknowledge only.
            io.queue(
                &Packet::PubRec(PubAck::new(publish.packet_id)),
                self.protocol,
            );
            return None;
        }
        if publish.qos == QoS::ExactlyOnce && self.inbound_qos2.len() >= self.receive_maximum {
            return Some(Close::Protocol(
                ReasonCode::RECEIVE_MAXIMUM_EXCEEDED,
                "more QoS 2 publishes in flight than Receive Maximum".into(),
            ));
        }
        Stats::add(&shared.stats.messages_received, 1);
        let packet_id = publish.packet_id;
        let qos = publish.qos;
        let message = Arc::new(Message {
            topic: publish.topic,
            payload: publish.payload,
            qos,
            retain: false,
            properties: publish.properties,
            origin: self.id,
        });
        let delivered = route(&mut self.routes, shared, message);
        let mut ack = PubAck::new(packet_id);
        if v5 && delivered == 0 {
            ack.reason_code = ReasonCode::NO_MATCHING_SUBSCRIBERS;
        }
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => io.queue(&Packet::PubAck(ack), self.protocol),
            QoS::ExactlyOnce => {
                self.inbound_qos2.push(packet_id);
                io.queue(&Packet::PubRec(ack), self.protocol);
            }
        }
        None
    }

    fn subscribe(&mut self, subscribe: Subscribe, io: &mut Io, shared: &Shared) -> Option<Close> {
        let v5 = self.protocol == Protocol::V5;
        if v5 && subscribe.properties.subscription_identifier.is_some() {
            // CONNACK announced Subscription Identifier Available = 0.
            return Some(Close::Protocol(
                ReasonCode::SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED,
                "Subscription Identifier while not available".into(),
            ));
        }
        let mut reason_codes = Vec::with_capacity(subscribe.subscriptions.len());
        for s in subscribe.subscriptions {
            if codec::topic::shared_subscription(&s.filter).is_some() {
                reason_codes.push(ReasonCode::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED);
                continue;
            }
            let subscriber = Subscriber {
                session: self.id,
                outbox: self.outbox.clone(),
                // This version delivers at QoS 0: granting less than asked is
                // the server's right, and the SUBACK tells the client.
                qos: QoS::AtMostOnce,
                no_local: v5 && s.options.no_local,
            };
            if !shared.router.subscribe(&s.filter, subscriber) {
                self.filters.push(s.filter);
            }
            reason_codes.push(ReasonCode::GRANTED_QOS_0);
        }
        let suback = SubAck {
            packet_id: subscribe.packet_id,
            reason_codes,
            properties: Default::default(),
        };
        io.queue(&Packet::SubAck(suback), self.protocol);
        None
    }

    fn unsubscribe(&mut self, unsubscribe: Unsubscribe, io: &mut Io, shared: &Shared) {
        let mut reason_codes = Vec::with_capacity(unsubscribe.filters.len());
        for filter in &unsubscribe.filters {
            let existed = shared.router.unsubscribe(filter, self.id);
            if existed {
                self.filters.retain(|f| f != filter);
            }
            reason_codes.push(if existed {
                ReasonCode::SUCCESS
            } else {
                ReasonCode::NO_SUBSCRIPTION_EXISTED
            });
        }
        let unsuback = UnsubAck {
            packet_id: unsubscribe.packet_id,
            reason_codes,
            properties: Default::default(),
        };
        io.queue(&Packet::UnsubAck(unsuback), self.protocol);
    }

    /// Encodes a batch of outbox deliveries into the write buffer.
    fn drain(&mut self, io: &mut Io, shared: &Shared) {
        self.outbox.drain_into(&mut self.batch, DRAIN_BATCH);
        let mut sent = 0;
        for delivery in self.batch.drain(..) {
            let m = &delivery.message;
            // Deliveries are at QoS 0 in this version (granted QoS is 0),
            // so no packet identifier is needed.
            let publish = Publish {
                dup: false,
                qos: delivery.qos,
                retain: false,
                topic: m.topic.clone(),
                packet_id: 0,
                payload: m.payload.clone(),
                properties: if self.protocol == Protocol::V5 {
                    m.properties.clone()
                } else {
                    Default::default()
                },
            };
            let start = io.out.len();
            match publish.encode(self.protocol, &mut io.out) {
                Ok(n) if n > self.client_max_packet => {
                    // Too large for this client: not sent, counted.
                    io.out.truncate(start);
                    Stats::add(&shared.stats.messages_dropped_too_large, 1);
                }
                Ok(_) => sent += 1,
                Err(e) => warn!(topic = %m.topic, "could not encode a delivery: {e}"),
            }
        }
        Stats::add(&shared.stats.messages_sent, sent);
    }

    /// Removes everything the session put in shared structures and
    /// publishes the will if the close calls for it.
    fn end(mut self, shared: &Shared, publish_will: bool) {
        for filter in &self.filters {
            shared.router.unsubscribe(filter, self.id);
        }
        self.outbox.close();
        if let Some(will) = self.will.take().filter(|_| publish_will) {
            let message = Arc::new(Message {
                topic: will.topic,
                payload: will.payload,
                qos: will.qos,
                retain: false,
                properties: ferrymq_codec::PublishProperties {
                    payload_format_indicator: will.properties.payload_format_indicator,
                    message_expiry_interval: will.properties.message_expiry_interval,
                    content_type: will.properties.content_type,
                    response_topic: will.properties.response_topic,
                    correlation_data: will.properties.correlation_data,
                    user_properties: will.properties.user_properties,
                    ..Default::default()
                },
                origin: self.id,
            });
            Stats::add(&shared.stats.messages_received, 1);
            route(&mut self.routes, shared, message);
        }
        shared.registry.unregister(&self.client_id, self.connection);
        self.control.finish();
    }
}

/// Pushes a message to every matching session's outbox. Never waits: a
/// full outbox drops the delivery (counted). Returns how many sessions
/// the message was queued for.
fn route(cache: &mut RouteCache, shared: &Shared, message: Arc<Message>) -> usize {
    let routes = cache.routes(&shared.router, &message.topic);
    let mut queued = 0;
    for route in routes.iter() {
        if route.no_local && route.session == message.origin {
            continue;
        }
        let delivery = Delivery {
            message: message.clone(),
            qos: message.qos.min(route.qos),
        };
        match route.outbox.push(delivery) {
            Pushed::Queued => queued += 1,
            Pushed::DroppedFull => {
                Stats::add(&shared.stats.messages_dropped_queue_full, 1);
                if shared.drop_log.allow() {
                    warn!(
                        session = route.session.0,
                        dropped_total = Stats::get(&shared.stats.messages_dropped_queue_full),
                        "subscriber queue full: dropping messages"
                    );
                }
            }
            Pushed::Closed => {}
        }
    }
    queued
}

#[cfg(test)]
mod tests {
    use super::connect_level;

    #[test]
    fn connect_level_is_read_from_a_partial_connect() {
        assert_eq!(
            connect_level(&[0x10, 0x10, 0, 4, b'M', b'Q', b'T', b'T', 5]),
            Some(5)
        );
        assert_eq!(
            connect_level(&[0x10, 0x80, 0x01, 0, 4, b'M', b'Q', b'T', b'T', 4]),
            Some(4)
        );
        assert_eq!(connect_level(&[0x10, 0x10, 0, 4, b'M', b'Q']), None);
        assert_eq!(
            connect_level(&[0x30, 0x10, 0, 4, b'M', b'Q', b'T', b'T', 5]),
            None
        );
        assert_eq!(connect_level(&[0x10]), None);
    }
}
