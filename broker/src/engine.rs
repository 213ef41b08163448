//! The protocol engine of one connection, without I/O: it takes decoded
//! packets (and deliveries from the session's outbox) and returns what to
//! send, what to route and what to store. The connection task
//! (`connection/`) moves bytes and executes those decisions; the tests
//! below drive the engine directly, packet by packet.
//!
//! What the engine owns: the QoS 1/2 exchanges in both directions (packet
//! identifiers, the inbound QoS 2 identifiers held until PUBREL, outbound
//! in-flight messages and their two QoS 2 phases), flow control windows,
//! and the order of acknowledgements: a PUBACK or PUBREC leaves only when
//! the store ticket of its PUBLISH is durable, and acknowledgements leave
//! in the order their PUBLISH packets arrived.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use ferrymq_codec::{
    AckProperties, MqttString, Packet, PayloadFormat, Protocol, PubAck, Publish, PublishProperties,
    PublishRef, QoS, ReasonCode,
};
use tokio::time::Instant;

use crate::message::{Message, SessionId};
use crate::outbox::Delivery;
use crate::session::{Inflight, SessionState};
use crate::storage::{Durable, OutboundPhase, StoreOp, Ticket};

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
    pub receive_maximum: u16,
    /// The client's Receive Maximum: outbound QoS 1/2 messages in flight.
    pub client_receive_maximum: u16,
    /// The largest packet the client accepts.
    pub client_max_packet: u32,
    /// Whether retained publishes are accepted.
    pub retain_available: bool,
    /// Our Topic Alias Maximum: aliases the client may define.
    pub topic_alias_maximum: u16,
    /// Aliases we may use towards the client (its Topic Alias Maximum,
    /// capped by `server_topic_aliases`).
    pub client_topic_aliases: u16,
    /// Whether the client wants reason strings on acknowledgements (5.0
    /// Request Problem Information).
    pub problem_information: bool,
    /// `max_topic_levels`: the most levels a published topic may have
    /// (0: no limit).
    pub max_topic_levels: u32,
    /// Stamp each stored message sent with its [`crate::MessageId`] (a
    /// `ferry-id` user property), from this node identity (bridge uplinks).
    pub message_ids: Option<[u8; 16]>,
    /// Keep the first phase of outbound exchanges (sent, not yet
    /// acknowledged) in memory only: an in-process client (a bridge) gets
    /// an unacknowledged message again after a restart anyway, since it
    /// is still in the queue; the packet id and the DUP flag it would
    /// have kept mean nothing to it. Two store writes fewer per message.
    pub volatile_inflight: bool,
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
    /// Answered by the engine, nothing to route: a resent QoS 2 PUBLISH
    /// already accepted (acknowledged again), or a QoS 1/2 message refused
    /// with a reason code (e.g. 0x99, payload not UTF-8 as announced).
    Answered,
    /// The topic has more levels than `max_topic_levels`; nothing to
    /// route. A 5.0 QoS 1/2 publish is answered 0x90 (Topic Name invalid),
    /// a QoS 0 one dropped. 3.1.1 has no way to say so: `close` is set, and
    /// the connection closes. The connection counts and logs it.
    TooManyLevels {
        /// The topic, for the log.
        topic: MqttString,
        /// Close the connection (3.1.1).
        close: bool,
    },
}

/// What became of a delivery taken from the outbox.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // `Send` is the common case: boxing it would allocate per delivery.
pub enum Delivered {
    /// Send this PUBLISH.
    Send(Outgoing),
    /// Sent later, in order, with the acknowledgements: a QoS 2 PUBLISH
    /// waits until the record of its packet identifier is durable, and
    /// what is delivered after it waits behind it (see
    /// [`Engine::deliver`]). Its QoS and payload size, to count it.
    Held(QoS, usize),
    /// Larger than the client's Maximum Packet Size: not sent, removed.
    TooLarge,
    /// Its Message Expiry Interval passed while queued: not sent, removed.
    Expired,
}

/// A PUBLISH to send, encoded from the stored message it delivers (see
/// [`Outgoing::view`]): no copy of its topic or payload is made.
#[derive(Debug)]
pub struct Outgoing {
    /// The message.
    pub message: Arc<Message>,
    /// DUP.
    pub dup: bool,
    /// Delivery QoS.
    pub qos: QoS,
    /// RETAIN.
    pub retain: bool,
    /// Packet identifier (0 at QoS 0).
    pub packet_id: u16,
    /// What it is sent with (5.0).
    pub properties: PublishProperties,
    /// The topic is left out: a Topic Alias the client knows stands for it.
    pub alias_only: bool,
}

impl Outgoing {
    /// The packet as an owned value (one that waits to be sent).
    fn into_packet(self) -> Packet {
        let topic = if self.alias_only {
            MqttString::default()
        } else {
            self.message.topic.clone()
        };
        Packet::Publish(Publish {
            dup: self.dup,
            qos: self.qos,
            retain: self.retain,
            topic,
            packet_id: self.packet_id,
            payload: self.message.payload.clone(),
            properties: self.properties,
        })
    }

    /// The packet, to encode.
    pub fn view(&self) -> PublishRef<'_> {
        PublishRef {
            dup: self.dup,
            qos: self.qos,
            retain: self.retain,
            topic: if self.alias_only {
                ""
            } else {
                self.message.topic.as_str()
            },
            packet_id: self.packet_id,
            payload: &self.message.payload,
            properties: &self.properties,
        }
    }
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

/// The ticket of a reply that waits for the ops the engine pushed with
/// it: the connection gives it the ticket of the write that carries them
/// ([`Engine::written`]).
const NEXT_WRITE: Ticket = Ticket::MAX;

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
    /// Acknowledgements waiting for the store, made on the first one and
    /// let go when none waits (`trim`): an idle connection has none.
    pending: Option<Box<Pending>>,
    /// Topic aliases of this connection, made on first use (most
    /// connections use none, and every byte here is paid per connection).
    aliases: Option<Box<Aliases>>,
}

/// Acknowledgements waiting for the store (`Engine::pending`).
#[derive(Default)]
struct Pending {
    /// In PUBLISH order, each waiting for its ticket.
    acks: VecDeque<PendingAck>,
    /// QoS 1 publishes whose PUBACK has not been sent.
    qos1: u32,
    /// Replies in `acks` waiting for the next write's ticket.
    unwritten: u32,
    /// PUBLISHes in `acks` (see [`Delivered::Held`]), and their bytes.
    held: u32,
    held_bytes: usize,
}

/// The topic aliases of one connection, both ways.
#[derive(Debug, Default)]
struct Aliases {
    /// Topic aliases the client defined (index alias - 1).
    inbound: Vec<Option<MqttString>>,
    /// Topic aliases we defined towards the client.
    outbound: HashMap<MqttString, u16>,
    /// The topic of each alias we use (index alias - 1), for reuse.
    topics: Vec<MqttString>,
    /// The next alias to reassign once all are in use.
    next_reuse: usize,
}

impl Engine {
    /// An engine for a session that just connected.
    pub fn new(protocol: Protocol, state: SessionState, limits: EngineLimits) -> Engine {
        Engine {
            protocol,
            state,
            limits,
            pending: None,
            aliases: None,
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
        self.pending.as_ref().map_or(0, |p| p.qos1 as usize)
            + self.state.qos2_received().map_or(0, |ids| ids.len())
    }

    /// Whether to read more packets: 3.1.1 has no Receive Maximum to
    /// announce, so its clients are slowed down by not reading instead.
    pub fn wants_input(&self) -> bool {
        self.v5() || self.inbound_unacknowledged() < usize::from(self.limits.receive_maximum)
    }

    /// The acknowledgements waiting for the store, made if none did.
    fn pending(&mut self) -> &mut Pending {
        self.pending.get_or_insert_default()
    }

    /// Lets go of the room kept for acknowledgements when none waits (an
    /// idle connection).
    pub fn trim(&mut self) {
        if self.pending.as_ref().is_some_and(|p| p.acks.is_empty()) {
            self.pending = None;
        }
    }

    /// Acknowledgements waiting for the store.
    pub fn pending_acks(&self) -> usize {
        self.pending.as_ref().map_or(0, |p| p.acks.len())
    }

    /// The bytes of the PUBLISHes waiting to be sent in order behind one
    /// that waits for the store ([`Delivered::Held`]).
    pub fn held_bytes(&self) -> usize {
        self.pending.as_ref().map_or(0, |p| p.held_bytes)
    }

    /// The ticket the oldest waiting acknowledgement needs, if any.
    pub fn waiting_for(&self) -> Option<Ticket> {
        self.pending
            .as_ref()
            .and_then(|p| p.acks.front())
            .map(|a| a.ticket)
    }

    /// An inbound PUBLISH, received at `now`.
    pub fn publish(
        &mut self,
        mut publish: Publish,
        now: Instant,
    ) -> Result<InboundPublish, ProtocolViolation> {
        if self.v5() {
            if !publish.properties.subscription_identifiers.is_empty() {
                // [MQTT-3.3.4-6]
                return Err(violation(
                    ReasonCode::PROTOCOL_ERROR,
                    "PUBLISH from a client with a Subscription Identifier",
                ));
            }
            if let Some(alias) = publish.properties.topic_alias.take() {
                self.resolve_alias(&mut publish, alias)?;
            }
            if publish.retain && !self.limits.retain_available {
                return Err(violation(
                    ReasonCode::RETAIN_NOT_SUPPORTED,
                    "retained PUBLISH while Retain Available is 0",
                ));
            }
        }
        if ferrymq_codec::topic::exceeds_levels(&publish.topic, self.limits.max_topic_levels) {
            if !self.v5() {
                return Ok(InboundPublish::TooManyLevels {
                    topic: publish.topic,
                    close: true,
                });
            }
            self.refuse(&publish, ReasonCode::TOPIC_NAME_INVALID);
            return Ok(InboundPublish::TooManyLevels {
                topic: publish.topic,
                close: false,
            });
        }
        if publish.qos == QoS::ExactlyOnce && self.state.qos2_holds(publish.packet_id) {
            // A resend of a QoS 2 publish already accepted: acknowledge
            // again, in order, without routing it twice.
            self.pending().acks.push_back(PendingAck {
                ticket: 0,
                reply: Some(Packet::PubRec(PubAck::new(publish.packet_id))),
                qos1: false,
            });
            return Ok(InboundPublish::Answered);
        }
        if publish.qos != QoS::AtMostOnce
            && self.v5()
            && self.inbound_unacknowledged() >= usize::from(self.limits.receive_maximum)
        {
            return Err(violation(
                ReasonCode::RECEIVE_MAXIMUM_EXCEEDED,
                "more QoS 1/2 publishes unacknowledged than Receive Maximum",
            ));
        }
        if publish.properties.payload_format_indicator == Some(PayloadFormat::Utf8)
            && std::str::from_utf8(&publish.payload).is_err()
        {
            // The payload is not what the publisher announced.
            if publish.qos == QoS::AtMostOnce {
                return Err(violation(
                    ReasonCode::PAYLOAD_FORMAT_INVALID,
                    "payload announced as UTF-8 is not UTF-8",
                ));
            }
            self.refuse(&publish, ReasonCode::PAYLOAD_FORMAT_INVALID);
            return Ok(InboundPublish::Answered);
        }
        let hold_qos2 = (publish.qos == QoS::ExactlyOnce).then_some(publish.packet_id);
        let expires_at = Message::expiry_from(publish.properties.message_expiry_interval, now);
        let message = Arc::new(Message {
            topic: publish.topic,
            payload: publish.payload,
            qos: publish.qos,
            retain: publish.retain,
            properties: publish.properties,
            origin: self.session(),
            expires_at,
            holders: Default::default(),
        });
        Ok(InboundPublish::Route { message, hold_qos2 })
    }

    /// Refuses an inbound publish with `code` (5.0; 3.1.1 gets no
    /// acknowledgement), queued in order behind earlier acknowledgements.
    fn refuse(&mut self, publish: &Publish, code: ReasonCode) {
        let outcome = RouteOutcome {
            ticket: 0,
            matched: 0,
            refused: true,
        };
        self.answer(publish.qos, publish.packet_id, outcome, code);
    }

    /// Applies a Topic Alias from the client: defines it (topic given) or
    /// uses it (empty topic).
    fn resolve_alias(
        &mut self,
        publish: &mut Publish,
        alias: u16,
    ) -> Result<(), ProtocolViolation> {
        if alias == 0 || alias > self.limits.topic_alias_maximum {
            return Err(violation(
                ReasonCode::TOPIC_ALIAS_INVALID,
                "Topic Alias 0 or above our Topic Alias Maximum",
            ));
        }
        let index = usize::from(alias - 1);
        let aliases = self.aliases.get_or_insert_default();
        if publish.topic.is_empty() {
            match aliases.inbound.get(index).cloned().flatten() {
                Some(topic) => publish.topic = topic,
                None => {
                    return Err(violation(
                        ReasonCode::PROTOCOL_ERROR,
                        "Topic Alias used before it was defined",
                    ));
                }
            }
        } else {
            if aliases.inbound.len() <= index {
                aliases.inbound.resize(index + 1, None);
            }
            aliases.inbound[index] = Some(publish.topic.clone());
        }
        Ok(())
    }

    /// Reports how an inbound message was routed; its acknowledgement is
    /// queued behind earlier ones and leaves once `outcome.ticket` is durable.
    pub fn routed(&mut self, qos: QoS, packet_id: u16, outcome: RouteOutcome) {
        let code = if outcome.refused {
            ReasonCode::QUOTA_EXCEEDED
        } else if outcome.matched == 0 {
            ReasonCode::NO_MATCHING_SUBSCRIBERS
        } else {
            ReasonCode::SUCCESS
        };
        self.answer(qos, packet_id, outcome, code);
    }

    /// Answers a publish to a topic the client may not publish to. 5.0
    /// says so with 0x87; 3.1.1 has no way to, so the publish is
    /// acknowledged as usual and dropped [MQTT-3.3.5-2].
    pub fn not_authorized(&mut self, qos: QoS, packet_id: u16) {
        self.refuse_acknowledged(qos, packet_id, ReasonCode::NOT_AUTHORIZED);
    }

    /// Answers a publish refused with `code`: 5.0 says so; 3.1.1 has no
    /// way to, so the publish is acknowledged and dropped.
    pub fn refuse_acknowledged(&mut self, qos: QoS, packet_id: u16, code: ReasonCode) {
        let v5 = self.v5();
        let outcome = RouteOutcome {
            ticket: 0,
            matched: 0,
            refused: v5,
        };
        let code = if v5 { code } else { ReasonCode::SUCCESS };
        self.answer(qos, packet_id, outcome, code);
    }

    /// Queues the acknowledgement of an inbound publish.
    fn answer(&mut self, qos: QoS, packet_id: u16, outcome: RouteOutcome, code: ReasonCode) {
        let v5 = self.v5();
        let mut ack = PubAck::new(packet_id);
        if v5 {
            ack.reason_code = code;
            if self.limits.problem_information {
                ack.properties = reason_string(code);
            }
        }
        // A refused publish is answered with its reason code in 5.0 and
        // not at all in 3.1.1 (the client sends it again later).
        let reply = |p: fn(PubAck) -> Packet| (v5 || !outcome.refused).then(|| p(ack.clone()));
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                self.pending().qos1 += 1;
                self.pending().acks.push_back(PendingAck {
                    ticket: outcome.ticket,
                    reply: reply(Packet::PubAck),
                    qos1: true,
                });
            }
            QoS::ExactlyOnce => {
                if !outcome.refused {
                    self.state.rare().qos2_received.insert(packet_id);
                }
                self.pending().acks.push_back(PendingAck {
                    ticket: outcome.ticket,
                    reply: reply(Packet::PubRec),
                    qos1: false,
                });
            }
        }
    }

    /// The ops pushed so far went to the store under `ticket`: the replies
    /// that wait for them leave once it is durable.
    pub fn written(&mut self, ticket: Ticket) {
        let Some(pending) = self.pending.as_mut().filter(|p| p.unwritten > 0) else {
            return;
        };
        pending.unwritten = 0;
        for ack in pending.acks.iter_mut().filter(|a| a.ticket == NEXT_WRITE) {
            ack.ticket = ticket;
        }
    }

    /// Queues a reply (SUBACK, UNSUBACK) to leave once `ticket` is durable,
    /// behind every acknowledgement queued before it.
    pub fn reply_after(&mut self, ticket: Ticket, packet: Packet) {
        self.pending().acks.push_back(PendingAck {
            ticket,
            reply: Some(packet),
            qos1: false,
        });
    }

    /// Moves every acknowledgement whose ticket is done to `out`, in
    /// order. The acknowledgement of a publish whose write failed becomes a
    /// refusal (5.0: 0x97 with a reason string; 3.1.1: none, the client
    /// sends it again later), and its held QoS 2 id is released.
    pub fn release_acks(&mut self, durable: &Durable, out: &mut Vec<Packet>) {
        while let Some(pending) = self.pending.as_mut() {
            match pending.acks.front() {
                Some(front) if front.ticket <= durable.up_to => {}
                _ => break,
            }
            let Some(ack) = pending.acks.pop_front() else {
                break;
            };
            if ack.qos1 {
                pending.qos1 -= 1;
            }
            if let Some(Packet::Publish(p)) = &ack.reply {
                pending.held -= 1;
                pending.held_bytes = pending.held_bytes.saturating_sub(p.payload.len());
            }
            let Some(reply) = ack.reply else {
                continue;
            };
            if ack.ticket == 0 || !durable.is_failed(ack.ticket) {
                out.push(reply);
                continue;
            }
            let refuse = |mut a: PubAck, v5: bool, problem_information: bool| {
                a.reason_code = ReasonCode::QUOTA_EXCEEDED;
                if v5 && problem_information {
                    a.properties.reason_string = Some(MqttString::from_static(
                        "the store could not write the message",
                    ));
                }
                v5.then_some(a)
            };
            let (v5, info) = (self.v5(), self.limits.problem_information);
            match reply {
                Packet::PubAck(a) => out.extend(refuse(a, v5, info).map(Packet::PubAck)),
                Packet::PubRec(a) => {
                    self.state.qos2_release(a.packet_id);
                    out.extend(refuse(a, v5, info).map(Packet::PubRec));
                }
                // A subscription is live in memory even if its record failed.
                other => out.push(other),
            }
        }
    }

    /// An inbound PUBREL: releases the held QoS 2 packet identifier. The
    /// PUBCOMP waits until the release is durable ([`Engine::written`]):
    /// once the client has it, it may use the id for a new message, which
    /// a broker restarted with the id still held would take for a resend
    /// and drop.
    pub fn pubrel(&mut self, packet_id: u16, ops: &mut Vec<StoreOp>) {
        let mut comp = PubAck::new(packet_id);
        let mut ticket = 0;
        if self.state.qos2_release(packet_id) {
            if self.state.is_persistent() {
                ops.push(StoreOp::Qos2Released {
                    number: self.state.number,
                    packet_id,
                });
                ticket = NEXT_WRITE;
                self.pending().unwritten += 1;
            }
        } else if self.v5() {
            comp.reason_code = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
        }
        self.pending().acks.push_back(PendingAck {
            ticket,
            reply: Some(Packet::PubComp(comp)),
            qos1: false,
        });
    }

    /// Whether a delivery at `qos` may be sent now (the client's Receive
    /// Maximum bounds QoS 1/2 messages in flight).
    pub fn can_send(&self, qos: QoS) -> bool {
        qos == QoS::AtMostOnce
            || self.state.inflight.len() < usize::from(self.limits.client_receive_maximum)
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

    /// The PUBLISH for a delivery, without topic alias.
    fn publish_packet(&self, d: &Delivery, packet_id: u16, dup: bool, now: Instant) -> Publish {
        Publish {
            dup,
            qos: d.qos,
            retain: d.retain,
            topic: d.message.topic.clone(),
            packet_id,
            payload: d.message.payload.clone(),
            properties: self.outgoing_properties(d, now),
        }
    }

    /// The properties a delivery is sent with (5.0; none in 3.1.1).
    fn outgoing_properties(&self, d: &Delivery, now: Instant) -> PublishProperties {
        let mut properties = if self.v5() {
            d.message.properties.clone()
        } else {
            PublishProperties::default()
        };
        if self.v5() {
            properties.message_expiry_interval = d.message.remaining_expiry(now);
            if let Some(ids) = &d.identifiers {
                properties.subscription_identifiers = ids.to_vec();
            }
            if let (Some(uuid), true) = (self.limits.message_ids, d.stored) {
                // A message that came with an id (from a trusted bridge)
                // goes on with it, so every hop further up de-duplicates
                // it by its origin; others get this node's.
                let has_id = properties
                    .user_properties
                    .iter()
                    .any(|(key, _)| key.as_str() == crate::message::MESSAGE_ID_PROPERTY);
                let id = crate::message::MessageId::new(uuid, d.queue, d.seq);
                let ids = [
                    (crate::message::MESSAGE_ID_PROPERTY, id.to_string()),
                    (crate::message::QUEUED_AT_PROPERTY, d.queued_ms.to_string()),
                ];
                for (key, value) in ids.into_iter().skip(usize::from(has_id)) {
                    if let Ok(value) = MqttString::new(&value) {
                        properties
                            .user_properties
                            .push((MqttString::from_static(key), value));
                    }
                }
            }
        }
        properties
    }

    /// Replaces the topic by an alias where the client allows aliases:
    /// the first use of a topic sends it with its new alias, later uses
    /// send the alias alone. When every alias is taken, the oldest
    /// assignment is reused.
    fn apply_alias(&mut self, out: &mut Outgoing) {
        let max = usize::from(self.limits.client_topic_aliases);
        if max == 0 {
            return;
        }
        let topic = &out.message.topic;
        let aliases = self.aliases.get_or_insert_default();
        if let Some(&alias) = aliases.outbound.get(topic) {
            out.properties.topic_alias = Some(alias);
            out.alias_only = true;
            return;
        }
        let alias = if aliases.topics.len() < max {
            aliases.topics.push(topic.clone());
            aliases.topics.len()
        } else {
            let index = aliases.next_reuse;
            aliases.next_reuse = (index + 1) % max;
            let old = std::mem::replace(&mut aliases.topics[index], topic.clone());
            aliases.outbound.remove(&old);
            index + 1
        };
        // `alias` is at most `max`, a u16.
        let alias = u16::try_from(alias).unwrap_or(u16::MAX);
        aliases.outbound.insert(topic.clone(), alias);
        out.properties.topic_alias = Some(alias);
    }

    /// A delivery that leaves its queue unsent: its stored entry goes.
    pub fn unqueue(d: &Delivery, ops: &mut Vec<StoreOp>) {
        if d.stored {
            ops.push(StoreOp::QueueDelete {
                number: d.queue,
                seq: d.seq,
                size: d.size(),
            });
        }
    }

    /// Turns a delivery from the outbox into the PUBLISH to send at `now`,
    /// taking a packet identifier for QoS 1/2. A message whose expiry has
    /// passed, or that is larger than the client's Maximum Packet Size, is
    /// not sent and leaves the queue (the caller counts it).
    pub fn deliver(&mut self, d: Delivery, now: Instant, ops: &mut Vec<StoreOp>) -> Delivered {
        let number = self.state.number;
        let forget = Self::unqueue;
        if d.message.is_expired(now) {
            forget(&d, ops);
            return Delivered::Expired;
        }
        let properties = self.outgoing_properties(&d, now);
        let (qos, retain) = (d.qos, d.retain);
        let qos0 = qos == QoS::AtMostOnce;
        if qos0 {
            // Leaves the queue now, sent or not: its message moves into
            // the packet (no reference count touched).
            forget(&d, ops);
        }
        // QoS 0: the delivery is done with; QoS 1/2: kept for in-flight.
        let (message, keep) = if qos0 {
            (d.message, None)
        } else {
            (d.message.clone(), Some(d))
        };
        let mut out = Outgoing {
            dup: false,
            qos,
            retain,
            packet_id: 1,
            properties,
            alias_only: false,
            message,
        };
        // Sized with its topic, the largest form it can take.
        let size = out.view().encoded_len(self.protocol).unwrap_or(usize::MAX)
            + if self.limits.client_topic_aliases > 0 {
                3
            } else {
                0
            };
        if size > self.limits.client_max_packet as usize {
            if let Some(d) = &keep {
                forget(d, ops);
            }
            return Delivered::TooLarge;
        }
        self.apply_alias(&mut out);
        let Some(d) = keep else {
            out.packet_id = 0;
            return self.send_or_hold(out);
        };
        let packet_id = self.next_packet_id();
        out.packet_id = packet_id;
        let recorded = self.recorded(&d);
        if recorded && d.stored {
            ops.push(StoreOp::InflightPut {
                number,
                packet_id,
                queue: d.queue,
                seq: d.seq,
                phase: OutboundPhase::Sent,
            });
        } else if recorded {
            // From no queue (a retained message on subscribe): there is no
            // entry to send again after a restart, so its identifier is
            // kept as released: a restarted broker sends the PUBREL, which
            // frees it in the client whether the PUBLISH got there or not.
            ops.push(StoreOp::InflightPut {
                number,
                packet_id,
                queue: number,
                seq: 0,
                phase: OutboundPhase::Released,
            });
        }
        self.state.inflight.insert(packet_id, Inflight::Sent(d));
        if recorded && qos == QoS::ExactlyOnce {
            return self.hold(out, NEXT_WRITE);
        }
        self.send_or_hold(out)
    }

    /// Whether the store keeps a record of `d`'s packet identifier while
    /// it is in flight: of every stored delivery, and of a QoS 2 one from
    /// no queue to a persistent session (never of an in-process client's,
    /// whose in-flight state lives in memory only).
    fn recorded(&self, d: &Delivery) -> bool {
        !self.limits.volatile_inflight
            && (d.stored || (d.qos == QoS::ExactlyOnce && self.state.is_persistent()))
    }

    /// `out` now, or behind the PUBLISHes held before it (the order of
    /// deliveries is kept).
    fn send_or_hold(&mut self, out: Outgoing) -> Delivered {
        if self.pending.as_ref().is_some_and(|p| p.held > 0) {
            return self.hold(out, 0);
        }
        Delivered::Send(out)
    }

    /// Holds `out` with the acknowledgements until `ticket` is durable
    /// (`NEXT_WRITE`: the write of the ops pushed with it). A QoS 2
    /// receiver keeps the packet identifier of a PUBLISH it answered
    /// PUBREC for until the PUBREL, across reconnects, and takes any
    /// PUBLISH with that identifier for the same message: a broker
    /// killed before the identifier's record was durable would give it
    /// to a new message after the restart, which the client would drop
    /// (or send the message again under a new one, a duplicate). So the
    /// PUBLISH leaves only once its record is durable.
    fn hold(&mut self, out: Outgoing, ticket: Ticket) -> Delivered {
        let (qos, size) = (out.qos, out.message.payload.len());
        self.send_after(ticket, out.into_packet());
        Delivered::Held(qos, size)
    }

    /// Queues `packet` (a PUBLISH or PUBREL) with the acknowledgements, to
    /// leave once `ticket` is durable.
    fn send_after(&mut self, ticket: Ticket, packet: Packet) {
        let pending = self.pending();
        if ticket == NEXT_WRITE {
            pending.unwritten += 1;
        }
        if let Packet::Publish(p) = &packet {
            pending.held += 1;
            pending.held_bytes += p.payload.len();
        }
        pending.acks.push_back(PendingAck {
            ticket,
            reply: Some(packet),
            qos1: false,
        });
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
        Self::unqueue(d, ops);
        if self.recorded(d) {
            ops.push(StoreOp::InflightDelete {
                number: self.state.number,
                packet_id,
            });
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
        self.state
            .inflight
            .insert(packet_id, Inflight::Released { seq: d.seq });
        if d.stored {
            ops.push(StoreOp::InflightPut {
                number: self.state.number,
                packet_id,
                queue: d.queue,
                seq: d.seq,
                phase: OutboundPhase::Released,
            });
            ops.push(StoreOp::QueueDelete {
                number: d.queue,
                seq: d.seq,
                size: d.size(),
            });
            // The PUBREL waits until the release is durable: once the
            // client has it, it forgets the id, and a broker restarted
            // with the message still unreleased would send it again as a
            // new one.
            self.pending().acks.push_back(PendingAck {
                ticket: NEXT_WRITE,
                reply: Some(Packet::PubRel(PubAck::new(packet_id))),
                qos1: false,
            });
            self.pending().unwritten += 1;
            return;
        }
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
    /// and its original packet identifier (and its topic: aliases do not
    /// outlive a connection), and every pending PUBREL, in the order they
    /// were first sent.
    pub fn resend_inflight(&self, now: Instant, out: &mut Vec<Packet>) {
        let mut entries: Vec<(&u16, &Inflight)> = self.state.inflight.iter().collect();
        entries.sort_by_key(|(_, i)| match i {
            Inflight::Sent(d) => d.seq,
            Inflight::Released { seq } => *seq,
        });
        for (&packet_id, inflight) in entries {
            match inflight {
                Inflight::Sent(d) => out.push(Packet::Publish(
                    self.publish_packet(d, packet_id, true, now),
                )),
                Inflight::Released { .. } => out.push(Packet::PubRel(PubAck::new(packet_id))),
            }
        }
    }

    /// [`Engine::resend_inflight`], the packets leaving once `ticket` is
    /// durable (and every delivery after them behind them): the
    /// connection this one took over may have written the records of
    /// their ids just now, and a client must not get an id whose record a
    /// kill could still take away (see [`Engine::deliver`]).
    pub fn resend_inflight_after(&mut self, ticket: Ticket, now: Instant) {
        let mut out = Vec::new();
        self.resend_inflight(now, &mut out);
        for packet in out {
            self.send_after(ticket, packet);
        }
    }

    /// Ends the connection, returning the session.
    pub fn into_state(self) -> SessionState {
        self.state
    }
}

/// A Reason String explaining an error reason code on an acknowledgement.
pub fn reason_string(code: ReasonCode) -> AckProperties {
    let text = match code.0 {
        0x97 => "a subscriber's queue is full (queue_full = refuse)",
        0x99 => "the payload is not valid UTF-8 although the Payload Format Indicator says so",
        0x9E => "shared subscriptions are not available",
        _ => return AckProperties::default(),
    };
    AckProperties {
        reason_string: Some(MqttString::from_static(text)),
        user_properties: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing::{delivery, engine, publish};
    use bytes::Bytes;
    use ferrymq_codec::MqttString;
    use std::time::Duration;

    fn routed(e: &mut Engine, p: Publish, ticket: Ticket) {
        let (qos, id) = (p.qos, p.packet_id);
        match e.publish(p, Instant::now()).expect("accepted") {
            InboundPublish::Route { .. } => e.routed(
                qos,
                id,
                RouteOutcome {
                    ticket,
                    matched: 1,
                    refused: false,
                },
            ),
            InboundPublish::Answered | InboundPublish::TooManyLevels { .. } => {}
        }
    }

    impl Delivered {
        fn sent(self) -> Publish {
            match self {
                Delivered::Send(o) => match o.into_packet() {
                    Packet::Publish(p) => p,
                    other => panic!("not a PUBLISH: {other:?}"),
                },
                other => panic!("not sent: {other:?}"),
            }
        }
    }

    fn acks(e: &mut Engine, durable: Ticket) -> Vec<Packet> {
        let mut out = Vec::new();
        let durable = Durable {
            up_to: durable,
            ..Durable::default()
        };
        e.release_acks(&durable, &mut out);
        out
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
        let first = e
            .publish(publish(QoS::ExactlyOnce, 7), Instant::now())
            .expect("accepted");
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
        assert!(matches!(
            e.publish(resent, Instant::now()),
            Ok(InboundPublish::Answered)
        ));
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
        // The PUBCOMP waits for the release's write, then for it to be
        // durable.
        assert_eq!(acks(&mut e, 1), []);
        e.written(4);
        assert_eq!(acks(&mut e, 3), []);
        assert_eq!(acks(&mut e, 4), [Packet::PubComp(PubAck::new(7))]);
        // After release the same id starts a new message.
        assert!(matches!(
            e.publish(publish(QoS::ExactlyOnce, 7), Instant::now()),
            Ok(InboundPublish::Route { .. })
        ));
    }

    #[test]
    fn v5_receive_maximum_is_enforced_and_v311_is_slowed_instead() {
        let mut e = engine(Protocol::V5, false);
        routed(&mut e, publish(QoS::AtLeastOnce, 1), 1);
        routed(&mut e, publish(QoS::ExactlyOnce, 2), 1);
        let err = e
            .publish(publish(QoS::AtLeastOnce, 3), Instant::now())
            .expect_err("third is one too many");
        assert_eq!(err.reason, ReasonCode::RECEIVE_MAXIMUM_EXCEEDED);
        // QoS 0 does not count.
        assert!(
            e.publish(publish(QoS::AtMostOnce, 0), Instant::now())
                .is_ok()
        );
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
        let quota = |id| PubAck {
            packet_id: id,
            reason_code: ReasonCode::QUOTA_EXCEEDED,
            properties: reason_string(ReasonCode::QUOTA_EXCEEDED),
        };
        assert_eq!(
            acks(&mut e, 0),
            [Packet::PubAck(quota(1)), Packet::PubRec(quota(2))]
        );
        assert!(
            e.state.qos2_received().is_none_or(|ids| ids.is_empty()),
            "a refused QoS 2 id is not held"
        );
        // Request Problem Information 0: the code, without a reason string.
        let mut e = engine(Protocol::V5, false);
        e.limits.problem_information = false;
        e.routed(QoS::AtLeastOnce, 1, refused);
        let mut bare = PubAck::new(1);
        bare.reason_code = ReasonCode::QUOTA_EXCEEDED;
        assert_eq!(acks(&mut e, 0), [Packet::PubAck(bare)]);
        let mut e = engine(Protocol::V311, false);
        e.routed(QoS::AtLeastOnce, 1, refused);
        assert_eq!(acks(&mut e, 0), []);
    }

    #[test]
    fn a_failed_store_write_is_answered_0x97_in_v5_and_not_acknowledged_in_v311() {
        let failed = Durable {
            up_to: 3,
            failed: Arc::from([(2, 2)]),
        };
        let mut e = engine(Protocol::V5, true);
        e.limits.receive_maximum = 10;
        routed(&mut e, publish(QoS::AtLeastOnce, 1), 1);
        routed(&mut e, publish(QoS::AtLeastOnce, 2), 2);
        routed(&mut e, publish(QoS::ExactlyOnce, 3), 2);
        routed(&mut e, publish(QoS::AtLeastOnce, 4), 3);
        let mut out = Vec::new();
        e.release_acks(&failed, &mut out);
        let quota = |id| {
            let mut a = PubAck::new(id);
            a.reason_code = ReasonCode::QUOTA_EXCEEDED;
            a.properties.reason_string = Some(MqttString::from_static(
                "the store could not write the message",
            ));
            a
        };
        assert_eq!(
            out,
            [
                Packet::PubAck(PubAck::new(1)),
                Packet::PubAck(quota(2)),
                Packet::PubRec(quota(3)),
                Packet::PubAck(PubAck::new(4)),
            ]
        );
        assert!(
            !e.state.qos2_holds(3),
            "a QoS 2 id whose write failed is not held: a resend is a new message"
        );
        let mut e = engine(Protocol::V311, true);
        routed(&mut e, publish(QoS::AtLeastOnce, 1), 2);
        routed(&mut e, publish(QoS::AtLeastOnce, 2), 3);
        let mut out = Vec::new();
        e.release_acks(&failed, &mut out);
        assert_eq!(out, [Packet::PubAck(PubAck::new(2))]);
        assert_eq!(e.waiting_for(), None, "the failed one no longer blocks");
    }

    #[test]
    fn a_payload_that_is_not_the_utf8_it_claims_is_refused_with_0x99() {
        let mut e = engine(Protocol::V5, false);
        let mut p = publish(QoS::AtLeastOnce, 1);
        p.payload = Bytes::from_static(&[0xC3, 0x28]);
        p.properties.payload_format_indicator = Some(PayloadFormat::Utf8);
        assert!(matches!(
            e.publish(p.clone(), Instant::now()),
            Ok(InboundPublish::Answered)
        ));
        match &acks(&mut e, 0)[..] {
            [Packet::PubAck(ack)] => {
                assert_eq!(ack.reason_code, ReasonCode::PAYLOAD_FORMAT_INVALID)
            }
            other => panic!("{other:?}"),
        }
        p.qos = QoS::AtMostOnce;
        p.packet_id = 0;
        let err = e
            .publish(p, Instant::now())
            .map(|_| ())
            .expect_err("closes");
        assert_eq!(err.reason, ReasonCode::PAYLOAD_FORMAT_INVALID);
    }

    #[test]
    fn outbound_qos1_and_qos2_flows_with_store_ops() {
        let mut e = engine(Protocol::V311, true);
        let mut ops = Vec::new();
        let p1 = e
            .deliver(
                delivery(QoS::AtLeastOnce, 10, true),
                Instant::now(),
                &mut ops,
            )
            .sent();
        assert!(matches!(
            e.deliver(
                delivery(QoS::ExactlyOnce, 11, true),
                Instant::now(),
                &mut ops,
            ),
            Delivered::Held(QoS::ExactlyOnce, 1)
        ));
        // The QoS 2 PUBLISH leaves once its InflightPut is durable.
        e.written(5);
        assert_eq!(acks(&mut e, 4), []);
        let [Packet::Publish(p2)] = &acks(&mut e, 5)[..] else {
            panic!("the held PUBLISH")
        };
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
        // The PUBREL waits until the release is durable.
        assert_eq!(out, []);
        e.written(8);
        assert_eq!(acks(&mut e, 7), []);
        assert_eq!(acks(&mut e, 8), [Packet::PubRel(PubAck::new(2))]);
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
    fn a_qos2_publish_waits_for_the_record_of_its_id_and_later_deliveries_wait_behind_it() {
        // (persistent session, in-process client, QoS, stored) -> the op
        // recording its id (phase), and whether it is held.
        let table = [
            (
                true,
                false,
                QoS::ExactlyOnce,
                true,
                Some(OutboundPhase::Sent),
                true,
            ),
            // A retained message on subscribe: its id kept as released.
            (
                true,
                false,
                QoS::ExactlyOnce,
                false,
                Some(OutboundPhase::Released),
                true,
            ),
            (
                true,
                false,
                QoS::AtLeastOnce,
                true,
                Some(OutboundPhase::Sent),
                false,
            ),
            (true, false, QoS::AtLeastOnce, false, None, false),
            // A session that ends with its connection: nothing outlives it.
            (false, false, QoS::ExactlyOnce, false, None, false),
            // In-process: in-flight state in memory only.
            (true, true, QoS::ExactlyOnce, true, None, false),
        ];
        for (persistent, in_process, qos, stored, record, held) in table {
            let case = format!("{persistent} {in_process} {qos:?} {stored}");
            let mut e = engine(Protocol::V5, persistent);
            e.limits.volatile_inflight = in_process;
            let mut ops = Vec::new();
            let first = e.deliver(delivery(qos, 3, stored), Instant::now(), &mut ops);
            match (record, &ops[..]) {
                (None, []) => {}
                (Some(want), [StoreOp::InflightPut { phase, seq, .. }]) => {
                    assert_eq!(*phase, want, "{case}");
                    assert_eq!(*seq, if stored { 3 } else { 0 }, "{case}");
                }
                (want, ops) => panic!("{case}: {want:?} but {ops:?}"),
            }
            assert_eq!(matches!(first, Delivered::Held(..)), held, "{case}");
            // What comes next, even QoS 0, keeps its place behind it.
            let next = e.deliver(
                delivery(QoS::AtMostOnce, 4, stored),
                Instant::now(),
                &mut ops,
            );
            assert_eq!(matches!(next, Delivered::Held(..)), held, "{case}");
            if held {
                assert_eq!(e.held_bytes(), 2, "{case}");
                e.written(6);
                assert_eq!(acks(&mut e, 5), [], "{case}");
                let out = acks(&mut e, 6);
                let ids: Vec<u16> = out
                    .iter()
                    .map(|p| match p {
                        Packet::Publish(p) => p.packet_id,
                        other => panic!("{case}: {other:?}"),
                    })
                    .collect();
                assert_eq!(ids, [1, 0], "{case}: in delivery order");
                assert_eq!(e.held_bytes(), 0, "{case}");
            }
        }
    }

    #[test]
    fn a_refused_retained_qos2_delivery_takes_the_record_of_its_id_away() {
        let mut e = engine(Protocol::V5, true);
        let mut ops = Vec::new();
        e.deliver(
            delivery(QoS::ExactlyOnce, 0, false),
            Instant::now(),
            &mut ops,
        );
        ops.clear();
        let mut refused = PubAck::new(1);
        refused.reason_code = ReasonCode::UNSPECIFIED_ERROR;
        let mut out = Vec::new();
        e.pubrec(refused, &mut ops, &mut out);
        assert!(matches!(
            ops[..],
            [StoreOp::InflightDelete { packet_id: 1, .. }]
        ));
        assert!(e.state.inflight.is_empty());
    }

    #[test]
    fn resume_resends_publishes_with_dup_and_pending_pubrels_in_send_order() {
        let mut e = engine(Protocol::V311, true);
        let mut ops = Vec::new();
        e.deliver(
            delivery(QoS::ExactlyOnce, 20, true),
            Instant::now(),
            &mut ops,
        );
        e.deliver(
            delivery(QoS::AtLeastOnce, 21, true),
            Instant::now(),
            &mut ops,
        );
        let mut out = Vec::new();
        e.pubrec(PubAck::new(1), &mut ops, &mut out);
        out.clear();
        e.resend_inflight(Instant::now(), &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0], Packet::PubRel(PubAck::new(1)));
        match &out[1] {
            Packet::Publish(p) => assert!(p.dup && p.packet_id == 2 && p.qos == QoS::AtLeastOnce),
            other => panic!("{other:?}"),
        }
        // Resumed by a new connection: the same packets, once the ticket
        // taken at the takeover is durable, and a new delivery behind them.
        let limits = e.limits;
        let mut e = Engine::new(Protocol::V311, e.into_state(), limits);
        e.resend_inflight_after(30, Instant::now());
        assert!(matches!(
            e.deliver(
                delivery(QoS::AtMostOnce, 22, true),
                Instant::now(),
                &mut ops
            ),
            Delivered::Held(QoS::AtMostOnce, 1)
        ));
        assert_eq!(acks(&mut e, 29), []);
        let resent = acks(&mut e, 30);
        assert_eq!(resent[..2], out[..]);
        assert!(matches!(&resent[2..], [Packet::Publish(p)] if p.packet_id == 0));
    }

    #[test]
    fn a_message_too_large_for_the_client_is_not_sent_and_leaves_the_queue() {
        let mut e = engine(Protocol::V5, true);
        let mut big = delivery(QoS::AtLeastOnce, 30, true);
        Arc::get_mut(&mut big.message).expect("unique").payload = Bytes::from(vec![0; 300]);
        let mut ops = Vec::new();
        assert!(matches!(
            e.deliver(big, Instant::now(), &mut ops),
            Delivered::TooLarge
        ));
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
            .deliver(
                delivery(QoS::AtLeastOnce, 1, false),
                Instant::now(),
                &mut ops,
            )
            .sent();
        let b = e
            .deliver(
                delivery(QoS::AtLeastOnce, 2, false),
                Instant::now(),
                &mut ops,
            )
            .sent();
        assert_eq!((a.packet_id, b.packet_id), (u16::MAX, 1));
        e.state.next_packet_id = u16::MAX;
        let c = e
            .deliver(
                delivery(QoS::AtLeastOnce, 3, false),
                Instant::now(),
                &mut ops,
            )
            .sent();
        assert_eq!(c.packet_id, 2, "65535 and 1 are in flight");
        assert!(ops.is_empty(), "nothing stored for a clean session");
    }

    #[test]
    fn v5_client_publish_rules() {
        let mut e = engine(Protocol::V5, false);
        let mut p = publish(QoS::AtMostOnce, 0);
        p.properties.subscription_identifiers = vec![1];
        assert_eq!(
            e.publish(p, Instant::now())
                .map(|_| ())
                .expect_err("refused")
                .reason,
            ReasonCode::PROTOCOL_ERROR
        );
    }

    #[test]
    fn a_topic_over_max_topic_levels_is_refused_with_0x90_in_v5_and_closes_in_v311() {
        let deep = |qos, id| Publish {
            topic: MqttString::from_static("a/b/c/d"),
            ..publish(qos, id)
        };
        let mut e = engine(Protocol::V5, false);
        for (qos, id) in [
            (QoS::AtMostOnce, 0),
            (QoS::AtLeastOnce, 1),
            (QoS::ExactlyOnce, 2),
        ] {
            assert!(matches!(
                e.publish(deep(qos, id), Instant::now()),
                Ok(InboundPublish::TooManyLevels { close: false, .. })
            ));
        }
        let codes: Vec<(u16, ReasonCode)> = acks(&mut e, 0)
            .into_iter()
            .map(|p| match p {
                Packet::PubAck(a) | Packet::PubRec(a) => (a.packet_id, a.reason_code),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(
            codes,
            [
                (1, ReasonCode::TOPIC_NAME_INVALID),
                (2, ReasonCode::TOPIC_NAME_INVALID)
            ]
        );
        assert_eq!(
            e.inbound_unacknowledged(),
            0,
            "a refused QoS 2 id is not held"
        );
        // At the limit is fine.
        let at_limit = Publish {
            topic: MqttString::from_static("a/b/c"),
            ..publish(QoS::AtLeastOnce, 3)
        };
        assert!(matches!(
            e.publish(at_limit, Instant::now()),
            Ok(InboundPublish::Route { .. })
        ));
        let mut e = engine(Protocol::V311, false);
        assert!(matches!(
            e.publish(deep(QoS::AtLeastOnce, 1), Instant::now()),
            Ok(InboundPublish::TooManyLevels { close: true, .. })
        ));
        assert!(acks(&mut e, 0).is_empty(), "3.1.1 gets no acknowledgement");
    }

    fn routed_topic(step: Result<InboundPublish, ProtocolViolation>) -> String {
        match step {
            Ok(InboundPublish::Route { message, .. }) => message.topic.to_string(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn inbound_topic_aliases_are_defined_used_and_checked() {
        let mut e = engine(Protocol::V5, false);
        let mut define = publish(QoS::AtMostOnce, 0);
        define.topic = MqttString::from_static("long/topic/name");
        define.properties.topic_alias = Some(3);
        assert_eq!(
            routed_topic(e.publish(define, Instant::now())),
            "long/topic/name"
        );
        let mut use_it = publish(QoS::AtMostOnce, 0);
        use_it.topic = MqttString::default();
        use_it.properties.topic_alias = Some(3);
        assert_eq!(
            routed_topic(e.publish(use_it.clone(), Instant::now())),
            "long/topic/name"
        );
        // Unknown alias; alias above our Topic Alias Maximum (4).
        use_it.properties.topic_alias = Some(2);
        let err = e
            .publish(use_it.clone(), Instant::now())
            .map(|_| ())
            .expect_err("unknown");
        assert_eq!(err.reason, ReasonCode::PROTOCOL_ERROR);
        use_it.properties.topic_alias = Some(5);
        let err = e
            .publish(use_it, Instant::now())
            .map(|_| ())
            .expect_err("too high");
        assert_eq!(err.reason, ReasonCode::TOPIC_ALIAS_INVALID);
    }

    #[test]
    fn outbound_topic_aliases_are_assigned_reused_and_recycled() {
        let mut e = engine(Protocol::V5, false);
        e.limits.client_topic_aliases = 2;
        let mut ops = Vec::new();
        let mut send = |e: &mut Engine, topic: &'static str| {
            let mut d = delivery(QoS::AtMostOnce, 0, false);
            Arc::get_mut(&mut d.message).expect("unique").topic = MqttString::from_static(topic);
            let p = e.deliver(d, Instant::now(), &mut ops).sent();
            (p.topic.to_string(), p.properties.topic_alias)
        };
        assert_eq!(send(&mut e, "a"), ("a".into(), Some(1)));
        assert_eq!(send(&mut e, "a"), ("".into(), Some(1)));
        assert_eq!(send(&mut e, "b"), ("b".into(), Some(2)));
        // Both taken: the oldest assignment is reused for the new topic.
        assert_eq!(send(&mut e, "c"), ("c".into(), Some(1)));
        assert_eq!(send(&mut e, "c"), ("".into(), Some(1)));
        assert_eq!(send(&mut e, "a"), ("a".into(), Some(2)));
    }

    #[test]
    fn expired_messages_are_not_sent_and_the_rest_carry_their_remaining_interval() {
        let mut e = engine(Protocol::V5, true);
        let now = Instant::now();
        let mut ops = Vec::new();
        let mut d = delivery(QoS::AtLeastOnce, 40, true);
        Arc::get_mut(&mut d.message).expect("unique").expires_at =
            Some(now + Duration::from_millis(9_500));
        let p = e.deliver(d.clone(), now, &mut ops).sent();
        assert_eq!(p.properties.message_expiry_interval, Some(10), "rounded up");
        ops.clear();
        let later = now + Duration::from_secs(10);
        assert!(matches!(e.deliver(d, later, &mut ops), Delivered::Expired));
        assert!(matches!(ops[..], [StoreOp::QueueDelete { seq: 40, .. }]));
    }

    #[test]
    fn subscription_identifiers_go_out_with_the_message() {
        let mut e = engine(Protocol::V5, false);
        let mut d = delivery(QoS::AtMostOnce, 0, false);
        d.identifiers = Some(Arc::from([3u32, 8]));
        let p = e.deliver(d.clone(), Instant::now(), &mut Vec::new()).sent();
        assert_eq!(p.properties.subscription_identifiers, [3, 8]);
        let mut v3 = engine(Protocol::V311, false);
        let p = v3.deliver(d, Instant::now(), &mut Vec::new()).sent();
        assert!(p.properties.is_empty());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 512,
            ..proptest::prelude::ProptestConfig::default()
        })]

        #[test]
        fn packet_sequences_keep_the_engine_s_invariants(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            v5 in proptest::prelude::any::<bool>(),
            persistent in proptest::prelude::any::<bool>(),
        ) {
            let protocol = if v5 { Protocol::V5 } else { Protocol::V311 };
            crate::fuzzing::engine_sequence(protocol, persistent, &bytes);
        }
    }
}
