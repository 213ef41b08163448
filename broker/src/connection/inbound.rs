//! What the client sends: each packet handed to the engine, and a
//! PUBLISH checked (ACL, rate, reserved topics, ferry batches and message
//! ids) and routed; DISCONNECT and its Session Expiry.

use std::sync::Arc;
use std::time::Duration;

use codec::topic::exceeds_levels;
use ferrymq_codec::{self as codec, Disconnect, MqttString, Packet, Protocol, QoS, ReasonCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tracing::warn;

use super::{Close, Conn, FERRY_BATCH_EXPANDED_MAX};
use crate::Shared;
use crate::acl::ClientAccess;
use crate::bridge_session;
use crate::engine::{InboundPublish, RouteOutcome};
use crate::ferry;
use crate::ferry::strip_ferry_properties;
use crate::message::{MESSAGE_ID_PROPERTY, Message, MessageId, SessionId};
use crate::publish::{self, Routing};
use crate::shed;
use crate::state::STAMP_PROPERTY;
use crate::stats::Stats;
use crate::storage::{self, Batch, StoreOp};

impl<S: AsyncRead + AsyncWrite + Unpin + 'static> Conn<'_, S> {
    /// Handles one packet from the client. Returns `Some` to close.
    pub(super) fn handle(&mut self, packet: Packet) -> Option<Close> {
        match packet {
            Packet::Publish(publish) => return self.publish(publish),
            Packet::PubAck(ack) => self.engine.puback(ack.packet_id, &mut self.io.busy().ops),
            Packet::PubRec(ack) => {
                let busy = self.io.busy();
                self.engine.pubrec(ack, &mut busy.ops, &mut busy.packets);
            }
            Packet::PubRel(rel) => self.engine.pubrel(rel.packet_id, &mut self.io.busy().ops),
            Packet::PubComp(ack) => self.engine.pubcomp(ack.packet_id, &mut self.io.busy().ops),
            Packet::Subscribe(subscribe) => return self.subscribe(subscribe),
            Packet::Unsubscribe(unsubscribe) => self.unsubscribe(unsubscribe),
            Packet::PingReq => self.io.busy().packets.push(Packet::PingResp),
            Packet::Disconnect(d) => return Some(self.disconnect(d)),
            Packet::Connect(_) => {
                // [MQTT-3.1.0-2]: a second CONNECT is a protocol violation.
                return Some(Close::Protocol(
                    ReasonCode::PROTOCOL_ERROR,
                    "second CONNECT".into(),
                ));
            }
            Packet::Auth(auth) => return self.reauthenticate(auth),
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

    /// What the ACL lets this client do, if an ACL applies to it.
    pub(super) fn access(&self) -> Option<&ClientAccess> {
        self.extras.as_deref().and_then(|e| e.access.as_ref())
    }

    /// Rebuilds the client's ACL access if a reload changed the rules.
    pub(super) fn refresh_access(&mut self) {
        let access = self.extras.as_deref_mut().and_then(|e| e.access.as_mut());
        if let (Some(access), Some(rules)) = (access, &self.shared.acl) {
            access.refresh(rules, &self.engine.state.client_id);
        }
    }

    pub(super) fn publish(&mut self, publish: ferrymq_codec::Publish) -> Option<Close> {
        self.refresh_access();
        if let Some(rate) = self.extras.as_deref_mut().and_then(|e| e.rate.as_mut())
            && !rate.charge(Instant::now().into_std()).is_zero()
        {
            Stats::add(&self.shared.stats.publishes_throttled, 1);
            if self.shared.refuse_log.allow() {
                let client_id = &self.engine.state.client_id;
                warn!(%client_id, "over limits.max_publish_rate: not reading from it for a while");
            }
        }
        let (qos, packet_id) = (publish.qos, publish.packet_id);
        match self.engine.publish(publish, Instant::now()) {
            Err(v) => Some(Close::Protocol(v.reason, v.why)),
            Ok(InboundPublish::Answered) => None,
            Ok(InboundPublish::TooManyLevels { topic, close }) => {
                let shared = self.shared;
                too_many_levels(
                    shared,
                    &self.engine.state.client_id,
                    "PUBLISH topic",
                    &topic,
                );
                close.then(|| {
                    Close::Protocol(
                        ReasonCode::TOPIC_NAME_INVALID,
                        "PUBLISH topic with more levels than limits.max_topic_levels".into(),
                    )
                })
            }
            Ok(InboundPublish::Route { message, .. })
                if message.topic.starts_with(ferry::RESERVED_PREFIX) =>
            {
                if self.trusted
                    && message.topic.as_str() == ferry::BATCH_TOPIC
                    && qos != QoS::AtMostOnce
                {
                    self.ferry_batch(&message, qos, packet_id);
                } else {
                    self.engine.not_authorized(qos, packet_id);
                }
                None
            }
            Ok(InboundPublish::Route { message, .. })
                if !self.in_process && bridge_session::is_reserved(message.topic.as_str()) =>
            {
                self.engine.not_authorized(qos, packet_id);
                None
            }
            Ok(InboundPublish::Route { message, .. })
                if self
                    .access()
                    .is_some_and(|a| !a.may_publish(&message.topic)) =>
            {
                let (shared, client_id) = (self.shared, &self.engine.state.client_id);
                acl_denied(shared, client_id, "PUBLISH", &message.topic);
                self.engine.not_authorized(qos, packet_id);
                None
            }
            Ok(InboundPublish::Route { message, .. }) if self.shed(&message) => {
                // Shedding load: a QoS 0 message may be lost anyway.
                Stats::add(&self.shared.stats.publishes_shed, 1);
                None
            }
            Ok(InboundPublish::Route { message, hold_qos2 }) => {
                self.route(message, hold_qos2, qos, packet_id);
                None
            }
        }
    }

    /// Whether a QoS 0 message is dropped to shed load (a network client's,
    /// on no `critical_topics` topic): it may be lost anyway.
    fn shed(&self, message: &Message) -> bool {
        message.qos == QoS::AtMostOnce
            && !self.in_process
            && self.shared.shedding.level() >= shed::DROP_QOS0
            && !self
                .shared
                .config()
                .limits
                .critical_topics
                .iter()
                .any(|f| codec::topic::matches(f, &message.topic))
    }

    /// Routes an accepted message (counted, de-duplicated by its message
    /// id when it has one) and tells the engine how it went; a message
    /// blocked on a full queue (policy `block`) is parked.
    fn route(
        &mut self,
        mut message: Arc<Message>,
        hold_qos2: Option<u16>,
        qos: QoS,
        packet_id: u16,
    ) {
        // The node's own `$SYS` reports are not traffic.
        if !(self.in_process && message.topic.starts_with("$SYS/")) {
            self.shared
                .stats
                .received
                .count(message.qos, message.payload.len());
        }
        let id = self.message_id(&mut message);
        if let Some(id) = &id
            && self.shared.dedup.lock().is_taken(id)
        {
            // Taken before: acknowledged once what took it is durable.
            Stats::add(&self.shared.stats.duplicates_dropped, 1);
            let ticket = after_earlier_writes(self.shared);
            let outcome = RouteOutcome {
                ticket,
                matched: 1,
                refused: false,
            };
            self.engine.routed(qos, packet_id, outcome);
            return;
        }
        let persistent = self.engine.state.is_persistent();
        match publish::route(
            self.shared,
            self.routes.get_or_insert_default(),
            message,
            hold_qos2,
            persistent,
            id,
            true,
        ) {
            Routing::Done(outcome) => self.engine.routed(qos, packet_id, outcome),
            Routing::Blocked(parked) => {
                self.parked = Some(Box::new((parked, qos, packet_id)));
            }
        }
    }

    /// Routes every record of a ferry batch from a trusted bridge (see
    /// `ferry.rs`), each de-duplicated by its id, and acknowledges the
    /// batch once all of them are durable: 0x97 when a queue is full (the
    /// records before it are taken; the resend skips them), 0x99 when the
    /// frame does not parse.
    pub(super) fn ferry_batch(&mut self, batch: &Message, qos: QoS, packet_id: u16) {
        let shared = self.shared;
        let max = usize::try_from(shared.config().limits.max_packet_size)
            .unwrap_or(usize::MAX)
            .saturating_mul(32)
            .min(FERRY_BATCH_EXPANDED_MAX);
        let records = match ferry::decode_batch(&batch.payload, max) {
            Ok(records) => records,
            Err(e) => {
                Stats::add(&shared.stats.protocol_errors, 1);
                warn!(client_id = %self.engine.state.client_id, "refused a ferry batch: {e}");
                self.engine
                    .refuse_acknowledged(qos, packet_id, ReasonCode::PAYLOAD_FORMAT_INVALID);
                return;
            }
        };
        let now = Instant::now();
        let persistent = self.engine.state.is_persistent();
        let origin = SessionId(self.engine.state.number);
        let (mut ticket, mut matched, mut refused, mut seen_before) = (0, 0, false, false);
        for record in records {
            shared
                .stats
                .received
                .count(record.qos, record.payload.len());
            let topic = record.topic.as_str();
            let allowed = codec::topic::validate_topic_name(topic).is_ok()
                && !exceeds_levels(topic, shared.config().limits.max_topic_levels)
                && !topic.starts_with(ferry::RESERVED_PREFIX)
                && !bridge_session::is_reserved(topic)
                && self.access().is_none_or(|a| a.may_publish(topic));
            if !allowed {
                // Never routable here: dropped (the batch is not
                // refused for it, or it would come back for ever).
                Stats::add(&shared.stats.acl_denied, 1);
                warn!(client_id = %self.engine.state.client_id, %topic, "dropped a ferry batch record this node may not take");
                continue;
            }
            if record
                .id
                .is_some_and(|id| shared.dedup.lock().is_taken(&id))
            {
                Stats::add(&shared.stats.duplicates_dropped, 1);
                seen_before = true;
                continue;
            }
            let message = Arc::new(Message {
                expires_at: Message::expiry_from(record.properties.message_expiry_interval, now),
                holders: Default::default(),
                topic: record.topic,
                payload: record.payload,
                qos: record.qos.min(QoS::AtLeastOnce),
                retain: record.retain,
                properties: record.properties,
                origin,
            });
            let routing = publish::route(
                shared,
                self.routes.get_or_insert_default(),
                message,
                None,
                persistent,
                record.id,
                false,
            );
            match routing {
                Routing::Done(outcome) if outcome.refused => {
                    refused = true;
                    break;
                }
                Routing::Done(outcome) => {
                    ticket = ticket.max(outcome.ticket);
                    matched += outcome.matched.max(1);
                }
                // A QoS 0 record for a full queue under `block` (QoS 1
                // records that passed the room check are never turned
                // away: `Outbox::push`): the rest of the batch
                // comes again.
                Routing::Blocked(_) => {
                    refused = true;
                    break;
                }
            }
        }
        if seen_before || ticket == 0 {
            // After whatever took them before is durable.
            ticket = ticket.max(after_earlier_writes(shared));
        }
        let outcome = RouteOutcome {
            ticket,
            matched: matched.max(1),
            refused,
        };
        self.engine.routed(qos, packet_id, outcome);
    }

    /// The `ferry-id` of a message from a trusted bridge (QoS 1 and 2:
    /// a QoS 0 message is never resent), which de-duplicates it. Other
    /// clients' ids and state stamps (`ferry-stamp`) are removed, so that
    /// no client can make a receiver further on drop another node's
    /// messages by forging ids, or win a state topic by forging a stamp
    /// (its write is stamped on arrival instead).
    pub(super) fn message_id(&self, message: &mut Arc<Message>) -> Option<MessageId> {
        let is_id = |(key, _): &(MqttString, MqttString)| key.as_str() == MESSAGE_ID_PROPERTY;
        let is_ferry = |p: &(MqttString, MqttString)| is_id(p) || p.0.as_str() == STAMP_PROPERTY;
        if !message.properties.user_properties.iter().any(is_ferry) {
            return None;
        }
        if !self.trusted {
            if !self.in_process {
                strip_ferry_properties(&mut Arc::make_mut(message).properties);
            }
            return None;
        }
        if message.qos == QoS::AtMostOnce {
            return None;
        }
        message
            .properties
            .user_properties
            .iter()
            .find(|p| is_id(p))
            .and_then(|(_, value)| value.as_str().parse().ok())
    }

    pub(super) fn resume_parked(&mut self) {
        let Some((parked, qos, packet_id)) = self.parked.take().map(|b| *b) else {
            return;
        };
        match publish::resume(self.shared, parked) {
            Routing::Done(outcome) => self.engine.routed(qos, packet_id, outcome),
            Routing::Blocked(parked) => self.parked = Some(Box::new((parked, qos, packet_id))),
        }
    }

    pub(super) fn disconnect(&mut self, d: Disconnect) -> Close {
        if self.engine.protocol == Protocol::V5
            && let Some(asked) = d.properties.session_expiry_interval
        {
            let state = &mut self.engine.state;
            if !state.is_persistent() && asked > 0 {
                // MQTT 5.0 3.14.2.2.2 (a Protocol Error without a rule
                // number): a session created to end with its connection
                // cannot be made persistent at DISCONNECT.
                return Close::Protocol(
                    ReasonCode::PROTOCOL_ERROR,
                    "DISCONNECT sets a Session Expiry Interval on a session created with 0".into(),
                );
            }
            let expiry = Duration::from_secs(u64::from(asked))
                .min(self.shared.config().storage.max_session_expiry);
            if expiry != state.expiry() {
                state.set_expiry(expiry);
                if state.is_persistent() {
                    let record = state.record(None);
                    self.io.busy().ops.push(StoreOp::SessionPut(record));
                }
            }
        }
        Close::Disconnect {
            with_will: d.reason_code == ReasonCode::DISCONNECT_WITH_WILL_MESSAGE,
        }
    }
}

/// A store ticket that is durable only once every write submitted before
/// it is: what an acknowledgement of a message taken earlier waits for.
fn after_earlier_writes(shared: &Shared) -> storage::Ticket {
    Batch::new(shared.store.as_ref()).submit()
}

/// Counts and logs (rate-limited) what the ACL refused.
pub(super) fn acl_denied(shared: &Shared, client_id: &str, what: &str, topic: &str) {
    Stats::add(&shared.stats.acl_denied, 1);
    if shared.auth_log.allow() {
        warn!(%client_id, %topic, "not authorized by the ACL: {what}");
    }
}

/// Counts a topic or filter refused for having more levels than
/// `max_topic_levels`, and logs it (rate-limited, with its start only).
pub(super) fn too_many_levels(shared: &Shared, client_id: &str, what: &str, topic: &str) {
    Stats::add(&shared.stats.topic_levels_refused, 1);
    if shared.levels_log.allow() {
        let levels = topic.split('/').count();
        let start: String = topic.chars().take(64).collect();
        warn!(
            %client_id,
            levels,
            max = shared.config().limits.max_topic_levels,
            "refused a {what} with more levels than limits.max_topic_levels: {start}..."
        );
    }
}
