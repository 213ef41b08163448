//! The client side of one MQTT connection as a state machine without I/O:
//! packet identifiers, the in-flight exchanges both ways, flow control and
//! the keepalive clock. [`super::Uplink`] feeds it decoded packets and
//! instants and writes out what it encodes; the tests here drive it alone.

use std::collections::HashMap;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use ferrymq_codec::{
    Disconnect, MAX_VARINT, MqttString, Packet, Protocol, PubAck, Publish, QoS, ReasonCode,
    Subscribe, SubscribeProperties, Subscription, Unsubscribe, UnsubscribeProperties,
};
use tokio::time::Instant;

use super::{Event, ProtocolError, RequestError, UplinkError};

/// What the upstream announced in CONNACK that limits what we may send,
/// and our own limits for what it sends.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// The connection's protocol version.
    pub protocol: Protocol,
    /// Upstream's Receive Maximum: outbound QoS 1/2 publishes in flight.
    pub server_receive_maximum: u16,
    /// Upstream's Maximum Packet Size (None: only the protocol's limit).
    pub server_max_packet: Option<u32>,
    /// Upstream's Maximum QoS.
    pub maximum_qos: QoS,
    /// Upstream's Retain Available.
    pub retain_available: bool,
    /// Our Receive Maximum: inbound QoS 1/2 exchanges open at once.
    pub receive_maximum: u16,
    /// Soft limit of the output buffer, in bytes.
    pub output_limit: usize,
    /// The keepalive interval in force (None: keepalive off).
    pub keepalive: Option<Duration>,
}

/// A client-initiated exchange, by packet id.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pending {
    /// QoS 1 PUBLISH sent, waiting for PUBACK.
    Publish1,
    /// QoS 2 PUBLISH sent, waiting for PUBREC.
    Publish2,
    /// PUBREC received and PUBREL sent, waiting for PUBCOMP.
    Released,
    /// SUBSCRIBE sent, waiting for SUBACK.
    Subscribe,
    /// UNSUBSCRIBE sent, waiting for UNSUBACK.
    Unsubscribe,
}

impl Pending {
    fn is_publish(&self) -> bool {
        matches!(
            self,
            Pending::Publish1 | Pending::Publish2 | Pending::Released
        )
    }
}

/// A server-initiated QoS 1/2 exchange, by packet id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inbound {
    /// Handed to the owner; PUBACK waits for its `ack`.
    Qos1,
    /// Handed to the owner; PUBREC waits for its `ack`.
    Qos2,
    /// PUBREC sent, waiting for PUBREL (then PUBCOMP ends it).
    Qos2Received,
}

/// The keepalive clock: when to send PINGREQ, and when the silence after
/// one means the link is dead.
#[derive(Debug, Clone)]
pub(crate) struct KeepAlive {
    /// The interval (None: off, no PINGREQ and no dead-link detection).
    interval: Option<Duration>,
    /// When bytes last went to the socket.
    last_sent: Instant,
    /// When bytes last came from the socket.
    last_received: Instant,
    /// When the unanswered PINGREQ was queued.
    ping_sent: Option<Instant>,
}

impl KeepAlive {
    pub(crate) fn new(interval: Option<Duration>, now: Instant) -> Self {
        KeepAlive {
            interval: interval.filter(|i| !i.is_zero()),
            last_sent: now,
            last_received: now,
            ping_sent: None,
        }
    }

    /// How long to wait for any byte after a PINGREQ: half the interval,
    /// at least 1 s and at most the interval itself.
    pub(crate) fn ping_timeout(interval: Duration) -> Duration {
        (interval / 2).max(Duration::from_secs(1)).min(interval)
    }

    /// The next instant at which [`KeepAlive::poll`] has something to do.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        let interval = self.interval?;
        Some(match self.ping_sent {
            Some(sent) => sent + Self::ping_timeout(interval),
            // A PINGREQ when we sent nothing for an interval (the spec's
            // rule), and also when we heard nothing for one: under a
            // steady outbound stream that is what detects a dead link.
            None => self.last_sent.min(self.last_received) + interval,
        })
    }

    /// At `now`: `Ok(true)` when a PINGREQ is due, `Err(waited)` when the
    /// one sent got no answer in time.
    pub(crate) fn poll(&mut self, now: Instant) -> Result<bool, Duration> {
        let (Some(interval), Some(deadline)) = (self.interval, self.deadline()) else {
            return Ok(false);
        };
        if now < deadline {
            return Ok(false);
        }
        match self.ping_sent {
            Some(_) => Err(Self::ping_timeout(interval)),
            None => {
                self.ping_sent = Some(now);
                Ok(true)
            }
        }
    }

    pub(crate) fn sent(&mut self, now: Instant) {
        self.last_sent = now;
    }

    /// Any byte from the peer proves the link alive.
    pub(crate) fn received(&mut self, now: Instant) {
        self.last_received = now;
        self.ping_sent = None;
    }

    pub(crate) fn interval(&self) -> Option<Duration> {
        self.interval
    }
}

/// The protocol state of one uplink connection.
#[derive(Debug)]
pub(crate) struct Session {
    /// Limits from CONNACK and from our options.
    limits: Limits,
    /// The owner's cap on the in-flight window (`usize::MAX`: none).
    window_cap: usize,
    /// Encoded packets not yet written to the socket; new publishes and
    /// subscribes are refused while it holds `limits.output_limit` bytes
    /// (acknowledgements still go in: they are bounded by the in-flight
    /// limits).
    out: BytesMut,
    /// Client-initiated exchanges by packet id; ids in here are never
    /// handed out again until the exchange ends.
    pending: HashMap<u16, Pending>,
    /// How many entries of `pending` are publishes: what the window counts.
    in_flight: usize,
    /// Where the search for a free packet id starts (ids rotate, so a late
    /// acknowledgement of an old exchange is not mistaken for a new one).
    next_id: u16,
    /// Server-initiated QoS 1/2 exchanges by packet id; at most
    /// `limits.receive_maximum` of them.
    inbound: HashMap<u16, Inbound>,
    /// The keepalive clock.
    keepalive: KeepAlive,
}

impl Session {
    pub(crate) fn new(limits: Limits, now: Instant) -> Self {
        let keepalive = KeepAlive::new(limits.keepalive, now);
        Session {
            limits,
            window_cap: usize::MAX,
            out: BytesMut::new(),
            pending: HashMap::new(),
            in_flight: 0,
            next_id: 1,
            inbound: HashMap::new(),
            keepalive,
        }
    }

    pub(crate) fn protocol(&self) -> Protocol {
        self.limits.protocol
    }

    pub(crate) fn window(&self) -> usize {
        usize::from(self.limits.server_receive_maximum).min(self.window_cap)
    }

    pub(crate) fn set_window_cap(&mut self, cap: usize) {
        self.window_cap = cap;
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub(crate) fn output_full(&self) -> bool {
        self.out.len() >= self.limits.output_limit
    }

    pub(crate) fn can_publish(&self) -> bool {
        self.in_flight < self.window() && !self.output_full()
    }

    pub(crate) fn is_idle(&self) -> bool {
        self.out.is_empty() && self.pending.is_empty() && self.inbound.is_empty()
    }

    pub(crate) fn keepalive_interval(&self) -> Option<Duration> {
        self.keepalive.interval()
    }

    /// Bytes waiting for the socket.
    pub(crate) fn output(&self) -> &[u8] {
        &self.out
    }

    /// `n` bytes of [`Session::output`] were written at `now`.
    pub(crate) fn consume(&mut self, n: usize, now: Instant) {
        self.out.advance(n);
        self.keepalive.sent(now);
    }

    /// Bytes arrived at `now`.
    pub(crate) fn received(&mut self, now: Instant) {
        self.keepalive.received(now);
    }

    /// The next instant [`Session::tick`] must run.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.keepalive.deadline()
    }

    /// Runs the keepalive clock: queues a PINGREQ when one is due, fails
    /// when the last one got no answer in time.
    pub(crate) fn tick(&mut self, now: Instant) -> Result<(), UplinkError> {
        match self.keepalive.poll(now) {
            Ok(true) => {
                self.queue(&Packet::PingReq);
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(waited) => Err(UplinkError::KeepaliveTimeout { waited }),
        }
    }

    /// Encodes a packet this module built itself (acknowledgements, PINGREQ,
    /// DISCONNECT): those cannot fail to encode.
    fn queue(&mut self, packet: &Packet) {
        if let Err(e) = packet.encode(self.limits.protocol, &mut self.out) {
            // Unreachable: ids are non-zero and there are no properties
            // that could be invalid. Logged rather than panicking.
            tracing::error!(error = %e, packet = %packet.packet_type(), "uplink: cannot encode");
        }
    }

    fn ack_packet(packet_id: u16, reason_code: ReasonCode) -> PubAck {
        PubAck {
            reason_code,
            ..PubAck::new(packet_id)
        }
    }

    /// A free client packet id, or None when all 65,535 are in use.
    fn free_id(&self) -> Option<u16> {
        let mut id = self.next_id;
        for _ in 0..u16::MAX {
            if id != 0 && !self.pending.contains_key(&id) {
                return Some(id);
            }
            id = id.wrapping_add(1);
        }
        None
    }

    /// Marks `id` (from [`Session::free_id`]) as taken by the next exchange.
    fn commit_id(&mut self, id: u16, state: Pending) {
        self.next_id = id.wrapping_add(1).max(1);
        if state.is_publish() {
            self.in_flight += 1;
        }
        self.pending.insert(id, state);
    }

    /// The checks common to publish and republish, and the PUBLISH made
    /// ready to send (no topic alias, no subscription identifiers).
    fn check_publish(&self, publish: &mut Publish) -> Result<(), RequestError> {
        if publish.qos > self.limits.maximum_qos {
            return Err(RequestError::QosNotSupported {
                requested: publish.qos,
                maximum: self.limits.maximum_qos,
            });
        }
        if publish.retain && !self.limits.retain_available {
            return Err(RequestError::RetainNotSupported);
        }
        if publish.qos != QoS::AtMostOnce && self.in_flight >= self.window() {
            return Err(RequestError::WindowFull {
                window: self.window(),
            });
        }
        if self.output_full() {
            return Err(RequestError::OutputFull {
                limit: self.limits.output_limit,
            });
        }
        // Topic aliases belong to one connection and we never set any up;
        // Subscription Identifiers are for server-to-client PUBLISH only.
        publish.properties.topic_alias = None;
        publish.properties.subscription_identifiers.clear();
        if publish.qos != QoS::AtMostOnce && publish.packet_id == 0 {
            // A stand-in so that the size can be computed: every id has 2 bytes.
            publish.packet_id = 1;
        }
        let size = publish
            .encoded_len(self.limits.protocol)
            .map_err(RequestError::Invalid)?;
        let max = self
            .limits
            .server_max_packet
            .unwrap_or(MAX_VARINT + 5)
            .min(MAX_VARINT + 5);
        if size as u64 > u64::from(max) {
            return Err(RequestError::PacketTooLarge { size, max });
        }
        Ok(())
    }

    fn send_publish(&mut self, publish: &Publish) -> Result<(), RequestError> {
        publish
            .encode(self.limits.protocol, &mut self.out)
            .map(|_| ())
            .map_err(RequestError::Invalid)
    }

    /// Queues a new PUBLISH; for QoS 1/2 assigns and returns its packet id
    /// (0 for QoS 0). Nothing changes when it is refused.
    pub(crate) fn publish(&mut self, mut publish: Publish) -> Result<u16, RequestError> {
        publish.packet_id = 0;
        // A first attempt under this id, whatever the message went through
        // before ([MQTT-3.3.1-1]: DUP marks re-deliveries only).
        publish.dup = false;
        self.check_publish(&mut publish)?;
        if publish.qos == QoS::AtMostOnce {
            self.send_publish(&publish)?;
            return Ok(0);
        }
        let id = self.free_id().ok_or(RequestError::NoPacketId)?;
        publish.packet_id = id;
        self.send_publish(&publish)?;
        self.commit_id(id, publish_state(publish.qos));
        Ok(id)
    }

    /// Queues a QoS 1/2 PUBLISH again under the packet id it had on the
    /// previous connection, with DUP set.
    pub(crate) fn republish(
        &mut self,
        packet_id: u16,
        mut publish: Publish,
    ) -> Result<(), RequestError> {
        if publish.qos == QoS::AtMostOnce {
            return Err(RequestError::Qos0Republish);
        }
        self.check_reused_id(packet_id)?;
        publish.packet_id = packet_id;
        publish.dup = true;
        self.check_publish(&mut publish)?;
        self.send_publish(&publish)?;
        self.pending.insert(packet_id, publish_state(publish.qos));
        self.in_flight += 1;
        Ok(())
    }

    /// Queues PUBREL for a QoS 2 exchange whose PUBREC came on the previous
    /// connection.
    pub(crate) fn release(&mut self, packet_id: u16) -> Result<(), RequestError> {
        self.check_reused_id(packet_id)?;
        if self.in_flight >= self.window() {
            return Err(RequestError::WindowFull {
                window: self.window(),
            });
        }
        if self.output_full() {
            return Err(RequestError::OutputFull {
                limit: self.limits.output_limit,
            });
        }
        self.queue(&Packet::PubRel(PubAck::new(packet_id)));
        self.pending.insert(packet_id, Pending::Released);
        self.in_flight += 1;
        Ok(())
    }

    fn check_reused_id(&self, packet_id: u16) -> Result<(), RequestError> {
        if packet_id == 0 || self.pending.contains_key(&packet_id) {
            return Err(RequestError::PacketIdInUse(packet_id));
        }
        Ok(())
    }

    /// Queues SUBSCRIBE and returns its packet id.
    pub(crate) fn subscribe(
        &mut self,
        subscriptions: Vec<Subscription>,
        properties: SubscribeProperties,
    ) -> Result<u16, RequestError> {
        if self.output_full() {
            return Err(RequestError::OutputFull {
                limit: self.limits.output_limit,
            });
        }
        let id = self.free_id().ok_or(RequestError::NoPacketId)?;
        let packet = Packet::Subscribe(Subscribe {
            packet_id: id,
            subscriptions,
            properties,
        });
        packet
            .encode(self.limits.protocol, &mut self.out)
            .map_err(RequestError::Invalid)?;
        self.commit_id(id, Pending::Subscribe);
        Ok(id)
    }

    /// Queues UNSUBSCRIBE and returns its packet id.
    pub(crate) fn unsubscribe(
        &mut self,
        filters: Vec<MqttString>,
        properties: UnsubscribeProperties,
    ) -> Result<u16, RequestError> {
        if self.output_full() {
            return Err(RequestError::OutputFull {
                limit: self.limits.output_limit,
            });
        }
        let id = self.free_id().ok_or(RequestError::NoPacketId)?;
        let packet = Packet::Unsubscribe(Unsubscribe {
            packet_id: id,
            filters,
            properties,
        });
        packet
            .encode(self.limits.protocol, &mut self.out)
            .map_err(RequestError::Invalid)?;
        self.commit_id(id, Pending::Unsubscribe);
        Ok(id)
    }

    /// The owner made an inbound QoS 1/2 message durable: PUBACK (QoS 1)
    /// or PUBREC (QoS 2) with `reason_code`. In 5.0 a failure code (0x80
    /// and above) ends a QoS 2 exchange at PUBREC; 3.1.1 acknowledgements
    /// carry no code, so there it is an acceptance like any other.
    pub(crate) fn ack(
        &mut self,
        packet_id: u16,
        reason_code: ReasonCode,
    ) -> Result<(), RequestError> {
        match self.inbound.get(&packet_id).copied() {
            Some(Inbound::Qos1) => {
                self.inbound.remove(&packet_id);
                self.queue(&Packet::PubAck(Self::ack_packet(packet_id, reason_code)));
                Ok(())
            }
            Some(Inbound::Qos2) => {
                if reason_code.is_error() && self.limits.protocol == Protocol::V5 {
                    self.inbound.remove(&packet_id);
                } else {
                    self.inbound.insert(packet_id, Inbound::Qos2Received);
                }
                self.queue(&Packet::PubRec(Self::ack_packet(packet_id, reason_code)));
                Ok(())
            }
            Some(Inbound::Qos2Received) | None => Err(RequestError::UnknownPacketId(packet_id)),
        }
    }

    /// A DISCONNECT for the output (the session expiry is left as it was).
    pub(crate) fn queue_disconnect(&mut self, reason_code: ReasonCode) {
        self.queue(&Packet::Disconnect(Disconnect::new(reason_code)));
    }

    /// Applies one packet from the upstream; returns what the owner must
    /// hear of it, if anything.
    pub(crate) fn handle(&mut self, packet: Packet) -> Result<Option<Event>, UplinkError> {
        match packet {
            Packet::Publish(publish) => self.handle_publish(publish),
            Packet::PubAck(ack) => Ok(self.handle_puback(ack)),
            Packet::PubRec(rec) => Ok(self.handle_pubrec(rec)),
            Packet::PubRel(rel) => self.handle_pubrel(rel),
            Packet::PubComp(comp) => Ok(self.handle_pubcomp(comp)),
            Packet::SubAck(ack) => Ok(match self.pending.get(&ack.packet_id) {
                Some(Pending::Subscribe) => {
                    self.pending.remove(&ack.packet_id);
                    Some(Event::SubAck {
                        packet_id: ack.packet_id,
                        reason_codes: ack.reason_codes,
                        reason_string: ack.properties.reason_string.map(|s| s.to_string()),
                    })
                }
                _ => {
                    tracing::warn!(packet_id = ack.packet_id, "uplink: SUBACK for no SUBSCRIBE");
                    None
                }
            }),
            Packet::UnsubAck(ack) => Ok(match self.pending.get(&ack.packet_id) {
                Some(Pending::Unsubscribe) => {
                    self.pending.remove(&ack.packet_id);
                    Some(Event::UnsubAck {
                        packet_id: ack.packet_id,
                        reason_codes: ack.reason_codes,
                    })
                }
                _ => {
                    tracing::warn!(
                        packet_id = ack.packet_id,
                        "uplink: UNSUBACK for no UNSUBSCRIBE"
                    );
                    None
                }
            }),
            // Liveness was already noted when its bytes arrived.
            Packet::PingResp => Ok(None),
            Packet::Disconnect(d) => Err(d.into()),
            other => Err(UplinkError::Protocol(ProtocolError::UnexpectedPacket(
                other.packet_type(),
            ))),
        }
    }

    fn handle_publish(&mut self, publish: Publish) -> Result<Option<Event>, UplinkError> {
        if let Some(alias) = publish.properties.topic_alias {
            // We announce Topic Alias Maximum 0 (by leaving it out of CONNECT).
            return Err(UplinkError::Protocol(ProtocolError::TopicAlias(alias)));
        }
        let id = publish.packet_id;
        match (publish.qos, self.inbound.get(&id).copied()) {
            (QoS::AtMostOnce, _) => return Ok(Some(Event::Message(publish))),
            // The PUBREC was lost: send it again, the owner has the message.
            (QoS::ExactlyOnce, Some(Inbound::Qos2Received)) => {
                self.queue(&Packet::PubRec(PubAck::new(id)));
                return Ok(None);
            }
            (_, Some(state)) => {
                // A resend of a message the owner holds and will acknowledge.
                tracing::debug!(packet_id = id, ?state, "uplink: duplicate PUBLISH ignored");
                return Ok(None);
            }
            (_, None) => {}
        }
        if self.inbound.len() >= usize::from(self.limits.receive_maximum) {
            return Err(UplinkError::Protocol(
                ProtocolError::ReceiveMaximumExceeded(self.limits.receive_maximum),
            ));
        }
        let state = match publish.qos {
            QoS::ExactlyOnce => Inbound::Qos2,
            _ => Inbound::Qos1,
        };
        self.inbound.insert(id, state);
        Ok(Some(Event::Message(publish)))
    }

    fn handle_puback(&mut self, ack: PubAck) -> Option<Event> {
        if self.pending.get(&ack.packet_id) != Some(&Pending::Publish1) {
            tracing::warn!(
                packet_id = ack.packet_id,
                "uplink: PUBACK for no QoS 1 PUBLISH"
            );
            return None;
        }
        self.end_publish(ack.packet_id);
        Some(acked(ack))
    }

    fn handle_pubrec(&mut self, rec: PubAck) -> Option<Event> {
        let id = rec.packet_id;
        match self.pending.get(&id) {
            Some(Pending::Publish2) if rec.reason_code.is_error() => {
                self.end_publish(id);
                Some(acked(rec))
            }
            Some(Pending::Publish2) => {
                self.pending.insert(id, Pending::Released);
                self.queue(&Packet::PubRel(PubAck::new(id)));
                Some(Event::Received {
                    packet_id: id,
                    reason_code: rec.reason_code,
                    reason_string: rec.properties.reason_string.map(|s| s.to_string()),
                })
            }
            // Our PUBREL may have crossed a resent PUBREC.
            Some(Pending::Released) => {
                self.queue(&Packet::PubRel(PubAck::new(id)));
                None
            }
            _ => {
                tracing::warn!(packet_id = id, "uplink: PUBREC for no QoS 2 PUBLISH");
                self.queue(&Packet::PubRel(Self::ack_packet(
                    id,
                    ReasonCode::PACKET_IDENTIFIER_NOT_FOUND,
                )));
                None
            }
        }
    }

    fn handle_pubrel(&mut self, rel: PubAck) -> Result<Option<Event>, UplinkError> {
        let id = rel.packet_id;
        match self.inbound.get(&id) {
            Some(Inbound::Qos2Received) => {
                self.inbound.remove(&id);
            }
            Some(_) => {
                // PUBREL before our PUBREC: the owner has not made it durable.
                return Err(UplinkError::Protocol(ProtocolError::EarlyPubRel(id)));
            }
            // PUBREC went out on an earlier connection, and we send PUBREC
            // only once the owner made the message durable: complete it.
            None => {}
        }
        self.queue(&Packet::PubComp(PubAck::new(id)));
        Ok(None)
    }

    fn handle_pubcomp(&mut self, comp: PubAck) -> Option<Event> {
        if self.pending.get(&comp.packet_id) != Some(&Pending::Released) {
            tracing::warn!(packet_id = comp.packet_id, "uplink: PUBCOMP for no PUBREL");
            return None;
        }
        self.end_publish(comp.packet_id);
        Some(acked(comp))
    }

    fn end_publish(&mut self, id: u16) {
        if let Some(state) = self.pending.remove(&id)
            && state.is_publish()
        {
            self.in_flight -= 1;
        }
    }
}

fn publish_state(qos: QoS) -> Pending {
    match qos {
        QoS::ExactlyOnce => Pending::Publish2,
        _ => Pending::Publish1,
    }
}

fn acked(ack: PubAck) -> Event {
    Event::Acked {
        packet_id: ack.packet_id,
        reason_code: ack.reason_code,
        reason_string: ack.properties.reason_string.map(|s| s.to_string()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use bytes::Bytes;
    use ferrymq_codec::{
        AckProperties, DisconnectProperties, PacketType, PublishProperties, SubAck,
        SubscriptionOptions, decode,
    };

    use super::*;

    fn limits(protocol: Protocol) -> Limits {
        Limits {
            protocol,
            server_receive_maximum: 10,
            server_max_packet: None,
            maximum_qos: QoS::ExactlyOnce,
            retain_available: true,
            receive_maximum: 4,
            output_limit: 64 * 1024,
            keepalive: Some(Duration::from_secs(10)),
        }
    }

    fn session() -> Session {
        Session::new(limits(Protocol::V5), Instant::now())
    }

    fn message(qos: QoS) -> Publish {
        Publish {
            qos,
            topic: MqttString::from_static("up/t"),
            payload: Bytes::from_static(b"payload"),
            ..Publish::default()
        }
    }

    fn inbound(qos: QoS, packet_id: u16) -> Packet {
        Packet::Publish(Publish {
            packet_id,
            ..message(qos)
        })
    }

    fn ack(packet_id: u16, reason_code: ReasonCode) -> PubAck {
        PubAck {
            packet_id,
            reason_code,
            properties: AckProperties::default(),
        }
    }

    /// Everything the session queued for the socket, decoded, and consumed.
    fn sent(s: &mut Session) -> Vec<Packet> {
        let mut buf = BytesMut::from(s.output());
        let n = buf.len();
        let mut packets = Vec::new();
        while let Some(p) = decode(&mut buf, s.protocol(), u32::MAX).unwrap() {
            packets.push(p);
        }
        assert!(buf.is_empty(), "partial packet in the output");
        s.consume(n, Instant::now());
        packets
    }

    fn acked(packet_id: u16, reason_code: ReasonCode) -> Option<Event> {
        Some(Event::Acked {
            packet_id,
            reason_code,
            reason_string: None,
        })
    }

    #[test]
    fn packet_ids_rotate_and_skip_zero_and_ids_in_use() {
        let mut s = session();
        s.next_id = u16::MAX - 1;
        s.pending.insert(1, Pending::Subscribe);
        let ids: Vec<u16> = (0..3)
            .map(|_| s.publish(message(QoS::AtLeastOnce)).unwrap())
            .collect();
        assert_eq!(ids, [u16::MAX - 1, u16::MAX, 2]);
        // QoS 0 takes no id.
        assert_eq!(s.publish(message(QoS::AtMostOnce)).unwrap(), 0);
        // A freed id is not reused at once: the search goes on from 3.
        assert_eq!(
            s.handle(Packet::PubAck(PubAck::new(2))).unwrap(),
            acked(2, ReasonCode::SUCCESS)
        );
        assert_eq!(s.publish(message(QoS::AtLeastOnce)).unwrap(), 3);
        let sent_ids: Vec<u16> = sent(&mut s)
            .into_iter()
            .map(|p| match p {
                Packet::Publish(p) => p.packet_id,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(sent_ids, [u16::MAX - 1, u16::MAX, 2, 0, 3]);
    }

    #[test]
    fn every_id_in_use_refuses_without_changing_anything() {
        let mut s = Session::new(
            Limits {
                server_receive_maximum: u16::MAX,
                output_limit: usize::MAX,
                ..limits(Protocol::V5)
            },
            Instant::now(),
        );
        for _ in 0..u16::MAX {
            s.subscribe(
                vec![Subscription {
                    filter: MqttString::from_static("a"),
                    options: SubscriptionOptions::default(),
                }],
                SubscribeProperties::default(),
            )
            .unwrap();
        }
        let before = s.output().len();
        assert_eq!(
            s.publish(message(QoS::AtLeastOnce)),
            Err(RequestError::NoPacketId)
        );
        assert_eq!(s.output().len(), before);
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn window_is_the_lower_of_receive_maximum_and_cap() {
        let mut s = Session::new(
            Limits {
                server_receive_maximum: 2,
                ..limits(Protocol::V5)
            },
            Instant::now(),
        );
        assert_eq!(s.window(), 2);
        let a = s.publish(message(QoS::AtLeastOnce)).unwrap();
        s.publish(message(QoS::ExactlyOnce)).unwrap();
        assert!(!s.can_publish());
        assert_eq!(
            s.publish(message(QoS::AtLeastOnce)),
            Err(RequestError::WindowFull { window: 2 })
        );
        // QoS 0 is not windowed.
        assert_eq!(s.publish(message(QoS::AtMostOnce)), Ok(0));
        s.handle(Packet::PubAck(PubAck::new(a))).unwrap();
        assert_eq!(s.in_flight(), 1);
        assert!(s.can_publish());
        s.set_window_cap(1);
        assert_eq!(s.window(), 1);
        assert!(!s.can_publish());
        s.set_window_cap(100);
        assert_eq!(s.window(), 2);
    }

    #[test]
    fn outbound_qos2_goes_through_pubrec_pubrel_pubcomp() {
        let mut s = session();
        let id = s.publish(message(QoS::ExactlyOnce)).unwrap();
        assert!(
            matches!(&sent(&mut s)[..], [Packet::Publish(p)] if p.packet_id == id && p.qos == QoS::ExactlyOnce)
        );
        // A PUBACK for it is ignored (wrong packet for the phase).
        assert_eq!(s.handle(Packet::PubAck(PubAck::new(id))).unwrap(), None);
        assert_eq!(
            s.handle(Packet::PubRec(ack(id, ReasonCode::NO_MATCHING_SUBSCRIBERS)))
                .unwrap(),
            Some(Event::Received {
                packet_id: id,
                reason_code: ReasonCode::NO_MATCHING_SUBSCRIBERS,
                reason_string: None
            })
        );
        assert_eq!(sent(&mut s), [Packet::PubRel(PubAck::new(id))]);
        assert_eq!(s.in_flight(), 1, "a released exchange still counts");
        // A PUBREC resent (ours crossed it) gets PUBREL again, no event.
        assert_eq!(s.handle(Packet::PubRec(PubAck::new(id))).unwrap(), None);
        assert_eq!(sent(&mut s), [Packet::PubRel(PubAck::new(id))]);
        assert_eq!(
            s.handle(Packet::PubComp(PubAck::new(id))).unwrap(),
            acked(id, ReasonCode::SUCCESS)
        );
        assert_eq!(s.in_flight(), 0);
        assert!(s.is_idle());
        // A late PUBCOMP is ignored.
        assert_eq!(s.handle(Packet::PubComp(PubAck::new(id))).unwrap(), None);
    }

    #[test]
    fn pubrec_with_a_failure_code_ends_the_exchange() {
        let mut s = session();
        let id = s.publish(message(QoS::ExactlyOnce)).unwrap();
        sent(&mut s);
        assert_eq!(
            s.handle(Packet::PubRec(ack(id, ReasonCode::QUOTA_EXCEEDED)))
                .unwrap(),
            acked(id, ReasonCode::QUOTA_EXCEEDED)
        );
        assert!(sent(&mut s).is_empty(), "no PUBREL after a failed PUBREC");
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn pubrec_for_an_unknown_id_is_released_with_not_found() {
        let mut s = session();
        assert_eq!(s.handle(Packet::PubRec(PubAck::new(9))).unwrap(), None);
        assert_eq!(
            sent(&mut s),
            [Packet::PubRel(ack(
                9,
                ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
            ))]
        );
    }

    #[test]
    fn inbound_qos1_is_acknowledged_only_when_the_owner_acks() {
        let mut s = session();
        let event = s.handle(inbound(QoS::AtLeastOnce, 5)).unwrap();
        assert!(matches!(event, Some(Event::Message(p)) if p.packet_id == 5));
        assert!(sent(&mut s).is_empty());
        // A resend while the owner holds it is not reported twice.
        assert_eq!(s.handle(inbound(QoS::AtLeastOnce, 5)).unwrap(), None);
        s.ack(5, ReasonCode::SUCCESS).unwrap();
        assert_eq!(sent(&mut s), [Packet::PubAck(PubAck::new(5))]);
        assert_eq!(
            s.ack(5, ReasonCode::SUCCESS),
            Err(RequestError::UnknownPacketId(5))
        );
        assert!(s.is_idle());
    }

    #[test]
    fn inbound_qos2_pubrec_on_ack_then_pubcomp_on_pubrel() {
        let mut s = session();
        assert!(matches!(
            s.handle(inbound(QoS::ExactlyOnce, 7)).unwrap(),
            Some(Event::Message(_))
        ));
        assert!(sent(&mut s).is_empty());
        s.ack(7, ReasonCode::SUCCESS).unwrap();
        assert_eq!(sent(&mut s), [Packet::PubRec(PubAck::new(7))]);
        // The PUBLISH again (our PUBREC lost): PUBREC again, not a second message.
        assert_eq!(s.handle(inbound(QoS::ExactlyOnce, 7)).unwrap(), None);
        assert_eq!(sent(&mut s), [Packet::PubRec(PubAck::new(7))]);
        assert_eq!(
            s.ack(7, ReasonCode::SUCCESS),
            Err(RequestError::UnknownPacketId(7))
        );
        assert_eq!(s.handle(Packet::PubRel(PubAck::new(7))).unwrap(), None);
        assert_eq!(sent(&mut s), [Packet::PubComp(PubAck::new(7))]);
        assert!(s.is_idle());
        // PUBREL of an exchange whose PUBREC went out on an earlier
        // connection: complete it.
        assert_eq!(s.handle(Packet::PubRel(PubAck::new(8))).unwrap(), None);
        assert_eq!(sent(&mut s), [Packet::PubComp(PubAck::new(8))]);
    }

    #[test]
    fn inbound_qos2_refused_by_the_owner_ends_at_pubrec() {
        let mut s = session();
        s.handle(inbound(QoS::ExactlyOnce, 3)).unwrap();
        s.ack(3, ReasonCode::QUOTA_EXCEEDED).unwrap();
        assert_eq!(
            sent(&mut s),
            [Packet::PubRec(ack(3, ReasonCode::QUOTA_EXCEEDED))]
        );
        assert!(s.is_idle());
    }

    #[test]
    fn pubrel_before_our_pubrec_is_a_protocol_error() {
        let mut s = session();
        s.handle(inbound(QoS::ExactlyOnce, 3)).unwrap();
        assert!(matches!(
            s.handle(Packet::PubRel(PubAck::new(3))),
            Err(UplinkError::Protocol(ProtocolError::EarlyPubRel(3)))
        ));
    }

    #[test]
    fn inbound_beyond_our_receive_maximum_is_a_protocol_error() {
        let mut s = session(); // receive_maximum 4
        for id in 1..=2 {
            s.handle(inbound(QoS::AtLeastOnce, id)).unwrap();
            s.handle(inbound(QoS::ExactlyOnce, id + 10)).unwrap();
        }
        // QoS 0 is not counted.
        assert!(s.handle(inbound(QoS::AtMostOnce, 0)).unwrap().is_some());
        let err = s.handle(inbound(QoS::AtLeastOnce, 99)).unwrap_err();
        let UplinkError::Protocol(e) = err else {
            panic!("{err:?}")
        };
        assert_eq!(e, ProtocolError::ReceiveMaximumExceeded(4));
        assert_eq!(e.reason_code(), ReasonCode::RECEIVE_MAXIMUM_EXCEEDED);
        // Held until PUBCOMP: a QoS 2 after PUBREC still counts.
        let mut s = session();
        for id in 1..=4 {
            s.handle(inbound(QoS::ExactlyOnce, id)).unwrap();
            s.ack(id, ReasonCode::SUCCESS).unwrap();
        }
        assert!(s.handle(inbound(QoS::AtLeastOnce, 5)).is_err());
    }

    #[test]
    fn a_topic_alias_from_the_server_is_a_protocol_error() {
        let mut s = session();
        let mut publish = message(QoS::AtMostOnce);
        publish.topic = MqttString::from_static("");
        publish.properties.topic_alias = Some(1);
        let err = s.handle(Packet::Publish(publish)).unwrap_err();
        let UplinkError::Protocol(e) = err else {
            panic!("{err:?}")
        };
        assert_eq!(e.reason_code(), ReasonCode::TOPIC_ALIAS_INVALID);
    }

    #[test]
    fn refused_publishes_leave_no_trace() {
        let mut s = Session::new(
            Limits {
                server_max_packet: Some(100),
                maximum_qos: QoS::AtLeastOnce,
                retain_available: false,
                ..limits(Protocol::V5)
            },
            Instant::now(),
        );
        let mut big = message(QoS::AtLeastOnce);
        big.payload = Bytes::from(vec![b'x'; 200]);
        let size = Packet::Publish(Publish {
            packet_id: 1,
            ..big.clone()
        })
        .encoded_len(Protocol::V5)
        .unwrap();
        assert_eq!(
            s.publish(big),
            Err(RequestError::PacketTooLarge { size, max: 100 })
        );
        assert_eq!(
            s.publish(message(QoS::ExactlyOnce)),
            Err(RequestError::QosNotSupported {
                requested: QoS::ExactlyOnce,
                maximum: QoS::AtLeastOnce
            })
        );
        let mut retained = message(QoS::AtLeastOnce);
        retained.retain = true;
        assert_eq!(s.publish(retained), Err(RequestError::RetainNotSupported));
        let mut bad = message(QoS::AtLeastOnce);
        bad.topic = MqttString::from_static("a/+");
        assert!(matches!(s.publish(bad), Err(RequestError::Invalid(_))));
        assert!(s.is_idle());
        assert_eq!(s.next_id, 1, "no id was consumed");
        // Exactly at the limit is fine.
        let mut fits = message(QoS::AtLeastOnce);
        fits.payload = Bytes::from(vec![b'x'; 200 - (size - 100)]);
        assert_eq!(s.publish(fits), Ok(1));
    }

    #[test]
    fn properties_pass_through_except_alias_and_subscription_ids() {
        let mut s = session();
        let mut publish = message(QoS::AtLeastOnce);
        publish.properties = PublishProperties {
            user_properties: vec![(
                MqttString::from_static("ferry-id"),
                MqttString::from_static("n1:3:42"),
            )],
            content_type: Some(MqttString::from_static("text/plain")),
            message_expiry_interval: Some(60),
            topic_alias: Some(3),
            subscription_identifiers: vec![7],
            ..PublishProperties::default()
        };
        let id = s.publish(publish.clone()).unwrap();
        let [Packet::Publish(out)] = &sent(&mut s)[..] else {
            panic!()
        };
        let mut expected = publish;
        expected.packet_id = id;
        expected.properties.topic_alias = None;
        expected.properties.subscription_identifiers.clear();
        assert_eq!(out, &expected);
    }

    #[test]
    fn output_limit_is_soft_and_refuses_new_requests_only() {
        let mut s = Session::new(
            Limits {
                output_limit: 10,
                ..limits(Protocol::V5)
            },
            Instant::now(),
        );
        s.publish(message(QoS::AtLeastOnce)).unwrap();
        assert!(s.output_full());
        assert!(!s.can_publish());
        assert_eq!(
            s.publish(message(QoS::AtMostOnce)),
            Err(RequestError::OutputFull { limit: 10 })
        );
        // Acknowledgements are still queued.
        s.handle(inbound(QoS::AtLeastOnce, 1)).unwrap();
        s.ack(1, ReasonCode::SUCCESS).unwrap();
        assert_eq!(sent(&mut s).len(), 2);
        assert!(s.can_publish());
    }

    #[test]
    fn republish_keeps_the_id_and_sets_dup_and_release_sends_pubrel() {
        let mut s = session();
        s.republish(40, message(QoS::ExactlyOnce)).unwrap();
        s.release(41).unwrap();
        assert_eq!(s.in_flight(), 2);
        assert_eq!(
            s.republish(40, message(QoS::AtLeastOnce)),
            Err(RequestError::PacketIdInUse(40))
        );
        assert_eq!(s.release(0), Err(RequestError::PacketIdInUse(0)));
        assert_eq!(
            s.republish(42, message(QoS::AtMostOnce)),
            Err(RequestError::Qos0Republish)
        );
        let out = sent(&mut s);
        assert!(matches!(&out[0], Packet::Publish(p) if p.packet_id == 40 && p.dup));
        assert_eq!(out[1], Packet::PubRel(PubAck::new(41)));
        assert_eq!(
            s.handle(Packet::PubComp(PubAck::new(41))).unwrap(),
            acked(41, ReasonCode::SUCCESS)
        );
        // New publishes go around ids in use.
        s.next_id = 40;
        assert_eq!(s.publish(message(QoS::AtLeastOnce)), Ok(41));
    }

    #[test]
    fn subscribe_gets_an_id_and_its_suback() {
        let mut s = session();
        let options = SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            no_local: true,
            ..SubscriptionOptions::default()
        };
        let id = s
            .subscribe(
                vec![Subscription {
                    filter: MqttString::from_static("down/#"),
                    options,
                }],
                SubscribeProperties::default(),
            )
            .unwrap();
        let [Packet::Subscribe(sub)] = &sent(&mut s)[..] else {
            panic!()
        };
        assert_eq!((sub.packet_id, sub.subscriptions[0].options), (id, options));
        let suback = |packet_id| {
            Packet::SubAck(SubAck {
                packet_id,
                reason_codes: vec![ReasonCode::GRANTED_QOS_1],
                properties: AckProperties::default(),
            })
        };
        assert_eq!(s.handle(suback(id + 1)).unwrap(), None);
        assert_eq!(
            s.handle(suback(id)).unwrap(),
            Some(Event::SubAck {
                packet_id: id,
                reason_codes: vec![ReasonCode::GRANTED_QOS_1],
                reason_string: None
            })
        );
        assert_eq!(s.in_flight(), 0, "subscribes are not in the window");
        assert!(s.is_idle());
    }

    #[test]
    fn server_disconnect_and_unexpected_packets_end_the_session() {
        let mut s = session();
        let disconnect = Packet::Disconnect(Disconnect {
            reason_code: ReasonCode::USE_ANOTHER_SERVER,
            properties: DisconnectProperties {
                server_reference: Some(MqttString::from_static("other:1883")),
                ..DisconnectProperties::default()
            },
        });
        match s.handle(disconnect) {
            Err(UplinkError::Disconnected {
                reason,
                server_reference,
                ..
            }) => {
                assert_eq!(reason, ReasonCode::USE_ANOTHER_SERVER);
                assert_eq!(server_reference.as_deref(), Some("other:1883"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            s.handle(Packet::PingReq),
            Err(UplinkError::Protocol(ProtocolError::UnexpectedPacket(
                PacketType::PingReq
            )))
        ));
    }

    #[test]
    fn v311_acknowledgements_carry_no_reason_code() {
        let mut s = Session::new(limits(Protocol::V311), Instant::now());
        s.handle(inbound(QoS::AtLeastOnce, 1)).unwrap();
        s.ack(1, ReasonCode::SUCCESS).unwrap();
        assert_eq!(s.output(), [0x40, 2, 0, 1]);
        sent(&mut s);
        // A refusal cannot be said in 3.1.1: the PUBREC accepts, and the
        // exchange goes on to PUBREL / PUBCOMP.
        s.handle(inbound(QoS::ExactlyOnce, 2)).unwrap();
        s.ack(2, ReasonCode::QUOTA_EXCEEDED).unwrap();
        assert_eq!(sent(&mut s), [Packet::PubRec(PubAck::new(2))]);
        s.handle(Packet::PubRel(PubAck::new(2))).unwrap();
        assert_eq!(sent(&mut s), [Packet::PubComp(PubAck::new(2))]);
        assert!(s.is_idle());
    }

    #[test]
    fn a_new_publish_is_a_first_attempt_and_a_republish_is_not() {
        let mut s = session();
        let mut forwarded = message(QoS::AtLeastOnce);
        forwarded.dup = true;
        s.publish(forwarded.clone()).unwrap();
        s.republish(9, message(QoS::AtLeastOnce)).unwrap();
        let dups: Vec<bool> = sent(&mut s)
            .into_iter()
            .map(|p| match p {
                Packet::Publish(p) => p.dup,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(dups, [false, true]);
    }

    #[test]
    fn ping_timeout_is_half_the_interval_within_1s_and_the_interval() {
        let t = KeepAlive::ping_timeout;
        assert_eq!(t(Duration::from_secs(2)), Duration::from_secs(1));
        assert_eq!(t(Duration::from_secs(1)), Duration::from_secs(1));
        assert_eq!(t(Duration::from_secs(30)), Duration::from_secs(15));
        assert_eq!(t(Duration::from_millis(500)), Duration::from_millis(500));
    }

    #[test]
    fn keepalive_pings_after_silence_either_way_and_times_out() {
        let s = |secs: u64| Duration::from_secs(secs);
        let t0 = Instant::now();
        let mut k = KeepAlive::new(Some(s(10)), t0);
        assert_eq!(k.deadline(), Some(t0 + s(10)));
        // Sending alone does not postpone the ping: nothing was received.
        k.sent(t0 + s(4));
        assert_eq!(k.deadline(), Some(t0 + s(10)));
        k.received(t0 + s(6));
        assert_eq!(k.deadline(), Some(t0 + s(14)));
        assert_eq!(k.poll(t0 + s(13)), Ok(false));
        assert_eq!(k.poll(t0 + s(14)), Ok(true));
        // Waiting for the answer: half the interval.
        assert_eq!(k.deadline(), Some(t0 + s(19)));
        assert_eq!(k.poll(t0 + s(18)), Ok(false));
        // Any byte answers it.
        k.received(t0 + s(18));
        k.sent(t0 + s(14));
        assert_eq!(k.poll(t0 + s(19)), Ok(false));
        assert_eq!(k.deadline(), Some(t0 + s(24)));
        assert_eq!(k.poll(t0 + s(24)), Ok(true));
        assert_eq!(k.poll(t0 + s(29)), Err(s(5)));
    }

    #[test]
    fn keepalive_zero_is_off() {
        let t0 = Instant::now();
        let mut k = KeepAlive::new(Some(Duration::ZERO), t0);
        assert_eq!(k.deadline(), None);
        assert_eq!(k.poll(t0 + Duration::from_secs(100_000)), Ok(false));
    }

    #[test]
    fn tick_queues_pingreq_and_fails_when_unanswered() {
        let t0 = Instant::now();
        let mut s = Session::new(limits(Protocol::V5), t0);
        s.tick(t0 + Duration::from_secs(9)).unwrap();
        assert!(s.output().is_empty());
        s.tick(t0 + Duration::from_secs(10)).unwrap();
        assert_eq!(s.output(), [0xC0, 0]);
        assert!(matches!(
            s.tick(t0 + Duration::from_secs(15)),
            Err(UplinkError::KeepaliveTimeout { waited }) if waited == Duration::from_secs(5)
        ));
    }
}
