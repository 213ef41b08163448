//! The protocol engine of one connection, without I/O: it takes decoded
//! packets (and deliveries from the session's outbox) and returns what to
//! send, what to route and what to store. The connection task
//! (`connection.rs`) moves bytes and executes those decisions; the tests
//! below drive the engine directly, packet by packet.
//!
//! What the engine owns: the QoS 1/2 exchanges in both directions (packet
//! identifiers, the inbound QoS 2 identifiers held until PUBREL, outbound
//! in-flight messages and their two QoS 2 phases), flow control windows,
//! and the order of acknowledgements: a PUBACK or PUBREC leaves only when
//! the store ticket of its PUBLISH is durable, and acknowledgements leave
//! in the order their PUBLISH packets arrived.

use std::collections::VecDeque;
use std::sync::Arc;

use ferrymq_codec::{Packet, Protocol, PubAck, Publish, PublishProperties, QoS, ReasonCode};

use crate::message::{Message, SessionId};
use crate::outbox::Delivery;
use crate::session::{Inflight, SessionState};
use crate::storage::{OutboundPhase, StoreOp, Ticket};

/// Why a connection must close, decided by the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolViolation {
    /// The MQTT 5.0 reason code for the DISCONNECT.
    pub reason: ReasonCode,
    /// What happened, for the log.
    pub why: String,
}

fn violation(reason: ReasonCode, why: &str) -> ProtocolViolation {
    ProtocolViolation {
        reason,
        why: why.to_string(),
    }
}

/// Limits the engine enforces.
#[derive(Debug, Clone, Copy)]
pub struct EngineLimits {
    /// Our Receive Maximum: inbound QoS 1/2 publishes not yet fully
    /// acknowledged.
    pub receive_maximum: usize,
    /// The client's Receive Maximum: outbound QoS 1/2 messages in flight.
    pub client_receive_maximum: usize,
    /// The largest packet the client accepts.
    pub client_max_packet: usize,
    /// Whether retained publishes are accepted.
    pub retain_available: bool,
}

/// What to do with an inbound PUBLISH.
#[derive(Debug)]
pub enum InboundPublish {
    /// Route the message, storing `hold_qos2` (a `Qos2Received`) in the same
    /// batch, then report with [`Engine::routed`].
    Route {
        /// The message.
        message: Arc<Message>,
        /// Inbound QoS 2 packet identifier to hold until PUBREL.
        hold_qos2: Option<u16>,
    },
    /// A resent QoS 2 PUBLISH already accepted: acknowledged again, not routed.
    Duplicate,
}

/// The outcome of routing one inbound message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteOutcome {
    /// The store ticket its acknowledgement waits for (0: none).
    pub ticket: Ticket,
    /// Sessions it was queued for.
    pub matched: usize,
    /// Refused because a queue was full under the `refuse` policy.
    pub refused: bool,
}

/// An acknowledgement waiting for its store ticket.
struct PendingAck {
    ticket: Ticket,
    /// `None` for a refused 3.1.1 publish (it is not acknowledged at all).
    reply: Option<Packet>,
    /// Counts against our Receive Maximum until sent.
    qos1: bool,
}

/// One connection's protocol state.
pub struct Engine {
    /// The connection's protocol version.
    pub protocol: Protocol,
    /// The session, owned while connected.
    pub state: SessionState,
    limits: EngineLimits,
    /// Acknowledgements in PUBLISH order, each waiting for its ticket.
    pending: VecDeque<PendingAck>,
    /// QoS 1 publishes whose PUBACK has not been sent.
    pending_qos1: usize,
}

impl Engine {
    /// An engine for a session that just connected.
    pub fn new(protocol: Protocol, state: SessionState, limits: EngineLimits) -> Engine {
        Engine {
            protocol,
            state,
            limits,
            pending: VecDeque::new(),
            pending_qos1: 0,
        }
    }

    fn v5(&self) -> bool {
        self.protocol == Protocol::V5
    }

    fn session(&self) -> SessionId {
        SessionId(self.state.number)
    }

    /// Inbound QoS 1/2 publishes not yet fully acknowledged.
    pub fn inbound_unacknowledged(&self) -> usize {
        self.pending_qos1 + self.state.qos2_received.len()
    }

    /// Whether to read more packets: 3.1.1 has no Receive Maximum to
    /// announce, so its clients are slowed down by not reading instead.
    pub fn wants_input(&self) -> bool {
        self.v5() || self.inbound_unacknowledged() < self.limits.receive_maximum
    }

    /// Acknowledgements waiting for the store.
    pub fn pending_acks(&self) -> usize {
        self.pending.len()
    }

    /// The ticket the oldest waiting acknowledgement needs, if any.
    pub fn waiting_for(&self) -> Option<Ticket> {
        self.pending.front().map(|p| p.ticket)
    }

    /// An inbound PUBLISH.
    pub fn publish(&mut self, publish: Publish) -> Result<InboundPublish, ProtocolViolation> {
        if self.v5() {
            if !publish.properties.subscription_identifiers.is_empty() {
                // [MQTT-3.3.4-6]
                return Err(violation(
                    ReasonCode::PROTOCOL_ERROR,
                    "PUBLISH from a client with a Subscription Identifier",
                ));
            }
            if publish.properties.topic_alias.is_some() {
                return Err(violation(
                    ReasonCode::TOPIC_ALIAS_INVALID,
                    "Topic Alias beyond Topic Alias Maximum 0",
                ));
            }
            if publish.retain && !self.limits.retain_available {
                return Err(violation(
                    ReasonCode::RETAIN_NOT_SUPPORTED,
                    "retained PUBLISH while Retain Available is 0",
                ));
            }
        }
        if publish.qos == QoS::ExactlyOnce && self.state.qos2_received.contains(&publish.packet_id)
        {
            // A resend of a QoS 2 publish already accepted: acknowledge
            // again, in order, without routing it twice.
            self.pending.push_back(PendingAck {
                ticket: 0,
                reply: Some(Packet::PubRec(PubAck::new(publish.packet_id))),
                qos1: false,
            });
            return Ok(InboundPublish::Duplicate);
        }
        if publish.qos != QoS::AtMostOnce
            && self.v5()
            && self.inbound_unacknowledged() >= self.limits.receive_maximum
        {
            return Err(violation(
                ReasonCode::RECEIVE_MAXIMUM_EXCEEDED,
                "more QoS 1/2 publishes unacknowledged than Receive Maximum",
            ));
        }
        let hold_qos2 = (publish.qos == QoS::ExactlyOnce).then_some(publish.packet_id);
        let mut properties = publish.properties;
        properties.topic_alias = None;
        let message = Arc::new(Message {
            topic: publish.topic,
            payload: publish.payload,
            qos: publish.qos,
            retain: publish.retain,
            properties,
            origin: self.session(),
        });
        Ok(InboundPublish::Route { message, hold_qos2 })
    }

    /// Reports how an inbound message was routed; its acknowledgement is
    /// queued behind earlier ones and leaves once `outcome.ticket` is durable.
    pub fn routed(&mut self, qos: QoS, packet_id: u16, outcome: RouteOutcome) {
        let v5 = self.v5();
        let code = if outcome.refused {
            ReasonCode::QUOTA_EXCEEDED
        } else if outcome.matched == 0 && v5 {
            ReasonCode::NO_MATCHING_SUBSCRIBERS
        } else {
            ReasonCode::SUCCESS
        };
        let ack = PubAck {
            packet_id,
            reason_code: if v5 { code } else { ReasonCode::SUCCESS },
            properties: Default::default(),
        };
        // A refused publish is answered with 0x97 in 5.0 and not at all in
        // 3.1.1 (the client sends it again later).
        let reply = |p: fn(PubAck) -> Packet| (v5 || !outcome.refused).then(|| p(ack.clone()));
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                self.pending_qos1 += 1;
                self.pending.push_back(PendingAck {
                    ticket: outcome.ticket,
                    reply: reply(Packet::PubAck),
                    qos1: true,
                });
            }
            QoS::ExactlyOnce => {
                if !outcome.refused {
                    self.state.qos2_received.insert(packet_id);
                }
                self.pending.push_back(PendingAck {
                    ticket: outcome.ticket,
                    reply: reply(Packet::PubRec),
                    qos1: false,
                });
            }
        }
    }

    /// Queues a reply (SUBACK, UNSUBACK) to leave once `ticket` is durable,
    /// behind every acknowledgement queued before it.
    pub fn reply_after(&mut self, ticket: Ticket, packet: Packet) {
        self.pending.push_back(PendingAck {
            ticket,
            reply: Some(packet),
            qos1: false,
        });
    }

    /// Moves every acknowledgement whose ticket is durable to `out`, in order.
    pub fn release_acks(&mut self, durable: Ticket, out: &mut Vec<Packet>) {
        while let Some(front) = self.pending.front() {
            if front.ticket > durable {
                break;
            }
            let Some(ack) = self.pending.pop_front() else {
                break;
            };
            if ack.qos1 {
                self.pending_qos1 -= 1;
            }
            out.extend(ack.reply);
        }
    }

    /// An inbound PUBREL: releases the held QoS 2 packet identifier.
    pub fn pubrel(&mut self, packet_id: u16, ops: &mut Vec<StoreOp>) {
        let mut comp = PubAck::new(packet_id);
        if self.state.qos2_received.remove(&packet_id) {
            if self.state.is_persistent() {
                ops.push(StoreOp::Qos2Released {
                    number: self.state.number,
                    packet_id,
                });
            }
        } else if self.v5() {
            comp.reason_code = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
        }
        self.pending.push_back(PendingAck {
            ticket: 0,
            reply: Some(Packet::PubComp(comp)),
            qos1: false,
        });
    }

    /// Whether a delivery at `qos` may be sent now (the client's Receive
    /// Maximum bounds QoS 1/2 messages in flight).
    pub fn can_send(&self, qos: QoS) -> bool {
        qos == QoS::AtMostOnce || self.state.inflight.len() < self.limits.client_receive_maximum
    }

    fn next_packet_id(&mut self) -> u16 {
        loop {
            let id = self.state.next_packet_id;
            self.state.next_packet_id = id.checked_add(1).unwrap_or(1);
            if id != 0 && !self.state.inflight.contains_key(&id) {
                return id;
            }
        }
    }

    fn publish_packet(&self, d: &Delivery, packet_id: u16, dup: bool) -> Publish {
        Publish {
            dup,
            qos: d.qos,
            retain: d.retain,
            topic: d.message.topic.clone(),
            packet_id,
            payload: d.message.payload.clone(),
            properties: if self.v5() {
                d.message.properties.clone()
            } else {
                PublishProperties::default()
            },
        }
    }

    /// Turns a delivery from the outbox into the PUBLISH to send, taking a
    /// packet identifier for QoS 1/2. Returns `None` when the message is
    /// larger than the client's Maximum Packet Size: it is not sent, and
    /// leaves the queue (the caller counts it).
    pub fn deliver(&mut self, d: Delivery, ops: &mut Vec<StoreOp>) -> Option<Publish> {
        let mut publish = self.publish_packet(&d, 1, false);
        let size = publish.encoded_len(self.protocol).unwrap_or(usize::MAX);
        let number = self.state.number;
        if size > self.limits.client_max_packet || d.qos == QoS::AtMostOnce {
            if d.stored {
                ops.push(StoreOp::QueueDelete { number, seq: d.seq });
            }
            if size > self.limits.client_max_packet {
                return None;
            }
            publish.packet_id = 0;
            return Some(publish);
        }
        let packet_id = self.next_packet_id();
        publish.packet_id = packet_id;
        if d.stored {
            ops.push(StoreOp::InflightPut {
                number,
                packet_id,
                seq: d.seq,
                phase: OutboundPhase::Sent,
            });
        }
        self.state.inflight.insert(packet_id, Inflight::Sent(d));
        Some(publish)
    }

    /// PUBACK from the client: the QoS 1 message is delivered.
    pub fn puback(&mut self, packet_id: u16, ops: &mut Vec<StoreOp>) {
        if let Some(Inflight::Sent(d)) = self.state.inflight.get(&packet_id)
            && d.qos == QoS::AtLeastOnce
        {
            let d = match self.state.inflight.remove(&packet_id) {
                Some(Inflight::Sent(d)) => d,
                _ => return,
            };
            self.forget(&d, packet_id, ops);
        }
    }

    fn forget(&self, d: &Delivery, packet_id: u16, ops: &mut Vec<StoreOp>) {
        if d.stored {
            let number = self.state.number;
            ops.push(StoreOp::QueueDelete { number, seq: d.seq });
            ops.push(StoreOp::InflightDelete { number, packet_id });
        }
    }

    /// PUBREC from the client: the QoS 2 message is received; answer PUBREL.
    pub fn pubrec(&mut self, ack: PubAck, ops: &mut Vec<StoreOp>, out: &mut Vec<Packet>) {
        let packet_id = ack.packet_id;
        let sent = matches!(
            self.state.inflight.get(&packet_id),
            Some(Inflight::Sent(d)) if d.qos == QoS::ExactlyOnce
        );
        if !sent {
            let mut rel = PubAck::new(packet_id);
            if self.v5() {
                rel.reason_code = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
            }
            out.push(Packet::PubRel(rel));
            return;
        }
        let Some(Inflight::Sent(d)) = self.state.inflight.remove(&packet_id) else {
            return;
        };
        if ack.reason_code.is_error() {
            // 5.0: the client refused it; the exchange ends here.
            self.forget(&d, packet_id, ops);
            return;
        }
        if d.stored {
            let number = self.state.number;
            ops.push(StoreOp::InflightPut {
                number,
                packet_id,
                seq: d.seq,
                phase: OutboundPhase::Released,
            });
            ops.push(StoreOp::QueueDelete { number, seq: d.seq });
        }
        self.state
            .inflight
            .insert(packet_id, Inflight::Released { seq: d.seq });
        out.push(Packet::PubRel(PubAck::new(packet_id)));
    }

    /// PUBCOMP from the client: the QoS 2 exchange is complete.
    pub fn pubcomp(&mut self, packet_id: u16, ops: &mut Vec<StoreOp>) {
        if let Some(Inflight::Released { .. }) = self.state.inflight.get(&packet_id) {
            self.state.inflight.remove(&packet_id);
            if self.state.is_persistent() {
                ops.push(StoreOp::InflightDelete {
                    number: self.state.number,
                    packet_id,
                });
            }
        }
    }

    /// On resuming a session: every unacknowledged PUBLISH again, with DUP
    /// and its original packet identifier, and every pending PUBREL, in
    /// the order they were first sent.
    pub fn resend_inflight(&self, out: &mut Vec<Packet>) {
        let mut entries: Vec<(&u16, &Inflight)> = self.state.inflight.iter().collect();
        entries.sort_by_key(|(_, i)| match i {
            Inflight::Sent(d) => d.seq,
            Inflight::Released { seq } => *seq,
        });
        for (&packet_id, inflight) in entries {
            match inflight {
                Inflight::Sent(d) => {
                    out.push(Packet::Publish(self.publish_packet(d, packet_id, true)))
                }
                Inflight::Released { .. } => out.push(Packet::PubRel(PubAck::new(packet_id))),
            }
        }
    }

    /// Ends the connection, returning the session.
    pub fn into_state(self) -> SessionState {
        self.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{Outbox, QueueLimits};
    use bytes::Bytes;
    use ferrymq_codec::MqttString;
    use ferrymq_config::QueueFull;
    use std::time::Duration;

    fn engine(protocol: Protocol, persistent: bool) -> Engine {
        let outbox = Outbox::new(
            9,
            QueueLimits {
                max_messages: 100,
                max_bytes: 1 << 20,
                policy: QueueFull::DropOldest,
                queue_qos0: false,
            },
            1,
        );
        let mut state = SessionState::new(MqttString::from_static("c"), 9, outbox);
        if persistent {
            state.expiry = Duration::from_secs(60);
        }
        Engine::new(
            protocol,
            state,
            EngineLimits {
                receive_maximum: 2,
                client_receive_maximum: 2,
                client_max_packet: 200,
                retain_available: true,
            },
        )
    }

    fn publish(qos: QoS, packet_id: u16) -> Publish {
        Publish {
            qos,
            packet_id,
            topic: MqttString::from_static("t"),
            payload: Bytes::from_static(b"p"),
            ..Publish::default()
        }
    }

    fn routed(e: &mut Engine, p: Publish, ticket: Ticket) {
        let (qos, id) = (p.qos, p.packet_id);
        match e.publish(p).expect("accepted") {
            InboundPublish::Route { .. } => e.routed(
                qos,
                id,
                RouteOutcome {
                    ticket,
                    matched: 1,
                    refused: false,
                },
            ),
            InboundPublish::Duplicate => {}
        }
    }

    fn acks(e: &mut Engine, durable: Ticket) -> Vec<Packet> {
        let mut out = Vec::new();
        e.release_acks(durable, &mut out);
        out
    }

    fn delivery(qos: QoS, seq: u64, stored: bool) -> Delivery {
        Delivery {
            message: Arc::new(Message {
                topic: MqttString::from_static("d"),
                payload: Bytes::from_static(b"x"),
                qos,
                retain: false,
                properties: PublishProperties::default(),
                origin: SessionId(1),
            }),
            qos,
            retain: false,
            seq,
            ticket: 0,
            stored,
        }
    }

    #[test]
    fn acknowledgements_wait_for_their_ticket_and_keep_publish_order() {
        let mut e = engine(Protocol::V311, true);
        routed(&mut e, publish(QoS::AtLeastOnce, 1), 5);
        routed(&mut e, publish(QoS::AtLeastOnce, 2), 3);
        routed(&mut e, publish(QoS::AtMostOnce, 0), 0);
        assert_eq!(acks(&mut e, 4), [], "PUBACK 2 must not overtake PUBACK 1");
        assert_eq!(e.waiting_for(), Some(5));
        assert_eq!(
            acks(&mut e, 5),
            [
                Packet::PubAck(PubAck::new(1)),
                Packet::PubAck(PubAck::new(2))
            ]
        );
        assert_eq!(e.waiting_for(), None);
    }

    #[test]
    fn qos2_is_held_until_pubrel_and_a_resend_is_not_routed_again() {
        let mut e = engine(Protocol::V311, true);
        let first = e.publish(publish(QoS::ExactlyOnce, 7)).expect("accepted");
        assert!(matches!(
            first,
            InboundPublish::Route {
                hold_qos2: Some(7),
                ..
            }
        ));
        e.routed(
            QoS::ExactlyOnce,
            7,
            RouteOutcome {
                ticket: 1,
                matched: 1,
                refused: false,
            },
        );
        let mut resent = publish(QoS::ExactlyOnce, 7);
        resent.dup = true;
        assert!(matches!(e.publish(resent), Ok(InboundPublish::Duplicate)));
        assert_eq!(
            acks(&mut e, 1),
            [
                Packet::PubRec(PubAck::new(7)),
                Packet::PubRec(PubAck::new(7))
            ]
        );
        let mut ops = Vec::new();
        e.pubrel(7, &mut ops);
        assert!(matches!(
            ops[..],
            [StoreOp::Qos2Released {
                number: 9,
                packet_id: 7
            }]
        ));
        assert_eq!(acks(&mut e, 1), [Packet::PubComp(PubAck::new(7))]);
        // After release the same id starts a new message.
        assert!(matches!(
            e.publish(publish(QoS::ExactlyOnce, 7)),
            Ok(InboundPublish::Route { .. })
        ));
    }

    #[test]
    fn v5_receive_maximum_is_enforced_and_v311_is_slowed_instead() {
        let mut e = engine(Protocol::V5, false);
        routed(&mut e, publish(QoS::AtLeastOnce, 1), 1);
        routed(&mut e, publish(QoS::ExactlyOnce, 2), 1);
        let err = e
            .publish(publish(QoS::AtLeastOnce, 3))
            .expect_err("third is one too many");
        assert_eq!(err.reason, ReasonCode::RECEIVE_MAXIMUM_EXCEEDED);
        // QoS 0 does not count.
        assert!(e.publish(publish(QoS::AtMostOnce, 0)).is_ok());
        let mut e = engine(Protocol::V311, false);
        routed(&mut e, publish(QoS::AtLeastOnce, 1), 1);
        assert!(e.wants_input());
        routed(&mut e, publish(QoS::AtLeastOnce, 2), 1);
        assert!(
            !e.wants_input(),
            "3.1.1 clients are slowed down by not reading"
        );
        acks(&mut e, 1);
        assert!(e.wants_input());
    }

    #[test]
    fn refused_publishes_get_0x97_in_v5_and_no_ack_in_v311() {
        let refused = RouteOutcome {
            ticket: 0,
            matched: 0,
            refused: true,
        };
        let mut e = engine(Protocol::V5, false);
        e.routed(QoS::AtLeastOnce, 1, refused);
        e.routed(QoS::ExactlyOnce, 2, refused);
        let mut quota1 = PubAck::new(1);
        quota1.reason_code = ReasonCode::QUOTA_EXCEEDED;
        let mut quota2 = PubAck::new(2);
        quota2.reason_code = ReasonCode::QUOTA_EXCEEDED;
        assert_eq!(
            acks(&mut e, 0),
            [Packet::PubAck(quota1), Packet::PubRec(quota2)]
        );
        assert!(
            e.state.qos2_received.is_empty(),
            "a refused QoS 2 id is not held"
        );
        let mut e = engine(Protocol::V311, false);
        e.routed(QoS::AtLeastOnce, 1, refused);
        assert_eq!(acks(&mut e, 0), []);
    }

    #[test]
    fn outbound_qos1_and_qos2_flows_with_store_ops() {
        let mut e = engine(Protocol::V311, true);
        let mut ops = Vec::new();
        let p1 = e
            .deliver(delivery(QoS::AtLeastOnce, 10, true), &mut ops)
            .expect("sent");
        let p2 = e
            .deliver(delivery(QoS::ExactlyOnce, 11, true), &mut ops)
            .expect("sent");
        assert_eq!((p1.packet_id, p2.packet_id), (1, 2));
        assert!(!e.can_send(QoS::AtLeastOnce), "client Receive Maximum is 2");
        assert!(e.can_send(QoS::AtMostOnce));
        assert_eq!(ops.len(), 2, "both got InflightPut");
        ops.clear();
        e.puback(1, &mut ops);
        assert!(matches!(
            ops[..],
            [
                StoreOp::QueueDelete { seq: 10, .. },
                StoreOp::InflightDelete { packet_id: 1, .. }
            ]
        ));
        ops.clear();
        let mut out = Vec::new();
        e.pubrec(PubAck::new(2), &mut ops, &mut out);
        assert_eq!(out, [Packet::PubRel(PubAck::new(2))]);
        assert!(matches!(
            ops[..],
            [
                StoreOp::InflightPut {
                    phase: OutboundPhase::Released,
                    ..
                },
                StoreOp::QueueDelete { seq: 11, .. }
            ]
        ));
        ops.clear();
        e.pubcomp(2, &mut ops);
        assert!(matches!(
            ops[..],
            [StoreOp::InflightDelete { packet_id: 2, .. }]
        ));
        assert!(e.state.inflight.is_empty());
    }

    #[test]
    fn resume_resends_publishes_with_dup_and_pending_pubrels_in_send_order() {
        let mut e = engine(Protocol::V311, true);
        let mut ops = Vec::new();
        e.deliver(delivery(QoS::ExactlyOnce, 20, true), &mut ops);
        e.deliver(delivery(QoS::AtLeastOnce, 21, true), &mut ops);
        let mut out = Vec::new();
        e.pubrec(PubAck::new(1), &mut ops, &mut out);
        out.clear();
        e.resend_inflight(&mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0], Packet::PubRel(PubAck::new(1)));
        match &out[1] {
            Packet::Publish(p) => assert!(p.dup && p.packet_id == 2 && p.qos == QoS::AtLeastOnce),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_message_too_large_for_the_client_is_not_sent_and_leaves_the_queue() {
        let mut e = engine(Protocol::V5, true);
        let mut big = delivery(QoS::AtLeastOnce, 30, true);
        Arc::get_mut(&mut big.message).expect("unique").payload = Bytes::from(vec![0; 300]);
        let mut ops = Vec::new();
        assert!(e.deliver(big, &mut ops).is_none());
        assert!(matches!(ops[..], [StoreOp::QueueDelete { seq: 30, .. }]));
        assert!(e.state.inflight.is_empty());
    }

    #[test]
    fn packet_ids_skip_those_in_flight_and_wrap_without_zero() {
        let mut e = engine(Protocol::V311, false);
        e.limits.client_receive_maximum = 10;
        e.state.next_packet_id = u16::MAX;
        let mut ops = Vec::new();
        let a = e
            .deliver(delivery(QoS::AtLeastOnce, 1, false), &mut ops)
            .expect("sent");
        let b = e
            .deliver(delivery(QoS::AtLeastOnce, 2, false), &mut ops)
            .expect("sent");
        assert_eq!((a.packet_id, b.packet_id), (u16::MAX, 1));
        e.state.next_packet_id = u16::MAX;
        let c = e
            .deliver(delivery(QoS::AtLeastOnce, 3, false), &mut ops)
            .expect("sent");
        assert_eq!(c.packet_id, 2, "65535 and 1 are in flight");
        assert!(ops.is_empty(), "nothing stored for a clean session");
    }

    #[test]
    fn v5_client_publish_rules() {
        let mut e = engine(Protocol::V5, false);
        let mut p = publish(QoS::AtMostOnce, 0);
        p.properties.subscription_identifiers = vec![1];
        assert_eq!(
            e.publish(p).map(|_| ()).expect_err("refused").reason,
            ReasonCode::PROTOCOL_ERROR
        );
        let mut p = publish(QoS::AtMostOnce, 0);
        p.properties.topic_alias = Some(1);
        assert_eq!(
            e.publish(p).map(|_| ()).expect_err("refused").reason,
            ReasonCode::TOPIC_ALIAS_INVALID
        );
    }
}
