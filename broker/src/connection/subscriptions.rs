//! SUBSCRIBE and UNSUBSCRIBE: each filter checked (levels, ACL, quota),
//! attached or detached (`subscribe.rs` does it for every caller), stored
//! for a persistent session, and answered once durable; retained messages
//! of new subscriptions are replayed after the SUBACK.

use codec::topic::exceeds_levels;
use ferrymq_codec::{
    self as codec, MqttString, Packet, Protocol, ReasonCode, SubAck, Subscribe, UnsubAck,
    Unsubscribe,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::warn;

use super::inbound::{acl_denied, too_many_levels};
use super::{Close, Conn};
use crate::message::SessionId;
use crate::stats::Stats;
use crate::storage::{Batch, StoreOp, SubscriptionRecord};
use crate::subscribe::{self, Attached};

impl<S: AsyncRead + AsyncWrite + Unpin + 'static> Conn<'_, S> {
    /// Why a SUBSCRIBE filter is refused, if it is: more levels than
    /// `max_topic_levels`, not allowed by the ACL (a shared subscription
    /// is checked by its filter), or a new filter beyond
    /// `max_subscriptions_per_client` (3.1.1 gets 0x80 for the last two, its
    /// only failure code). Counted and logged here.
    fn refusal(&self, filter: &MqttString) -> Option<ReasonCode> {
        let shared = self.shared;
        let state = &self.engine.state;
        if exceeds_levels(filter, shared.config().limits.max_topic_levels) {
            too_many_levels(shared, &state.client_id, "SUBSCRIBE filter", filter);
            return Some(ReasonCode::TOPIC_FILTER_INVALID);
        }
        if let Some(access) = self.access() {
            let filter = codec::topic::shared_subscription(filter)
                .map_or(filter.as_str(), |(_, inner)| inner);
            if !access.may_subscribe(filter) {
                acl_denied(shared, &state.client_id, "SUBSCRIBE", filter);
                return Some(ReasonCode::NOT_AUTHORIZED);
            }
        }
        let quota = shared.config().limits.max_subscriptions_per_client as usize;
        if quota > 0
            && !self.in_process
            && state.subscriptions.len() >= quota
            && !state.subscriptions.contains_key(filter)
        {
            Stats::add(&shared.stats.subscriptions_refused, 1);
            if shared.refuse_log.allow() {
                warn!(client_id = %state.client_id, "limits.max_subscriptions_per_client reached: refusing new filters");
            }
            return Some(ReasonCode::QUOTA_EXCEEDED);
        }
        None
    }

    pub(super) fn subscribe(&mut self, subscribe: Subscribe) -> Option<Close> {
        self.refresh_access();
        let v5 = self.engine.protocol == Protocol::V5;
        let shared = self.shared;
        let mut batch = Batch::new(shared.store.as_ref());
        let mut reason_codes = Vec::with_capacity(subscribe.subscriptions.len());
        let mut retained = Vec::new();
        for mut s in subscribe.subscriptions {
            if let Some(refused) = self.refusal(&s.filter) {
                reason_codes.push(refused);
                continue;
            }
            let state = &mut self.engine.state;
            // Kept for the session's life: not the read buffer with it.
            s.filter = s.filter.detached();
            let mut options = s.options;
            if !v5 {
                options = codec::SubscriptionOptions {
                    qos: options.qos,
                    ..Default::default()
                };
            }
            let identifier = if v5 {
                subscribe.properties.subscription_identifier
            } else {
                None
            };
            let record = SubscriptionRecord {
                options,
                identifier,
            };
            let is_shared = codec::topic::shared_subscription(&s.filter).is_some();
            if is_shared && options.no_local {
                // [MQTT-3.8.3-4]
                return Some(Close::Protocol(
                    ReasonCode::PROTOCOL_ERROR,
                    "No Local on a shared subscription".into(),
                ));
            }
            let existed = match subscribe::attach(shared, state, &s.filter, record) {
                Attached::Invalid => {
                    reason_codes.push(ReasonCode::TOPIC_FILTER_INVALID);
                    continue;
                }
                attached => attached == Attached::Replaced,
            };
            if state.is_persistent() {
                batch.push(StoreOp::SubscriptionPut {
                    number: state.number,
                    filter: s.filter.clone(),
                    subscription: record,
                });
            }
            if is_shared {
                // No retained messages on a shared subscription: MQTT 5.0
                // 3.3.1.3 sends them when a new Non-shared Subscription is
                // made (a sentence without a rule number).
                reason_codes.push(ReasonCode(options.qos as u8));
                continue;
            }
            // A resubscribe sends the retained messages again (3.1.1 and
            // 5.0 Retain Handling 0); 5.0 can ask for new subscriptions only
            // or none.
            let send_retained = match options.retain_handling {
                codec::RetainHandling::SendAtSubscribe => true,
                codec::RetainHandling::SendIfNew => !existed,
                codec::RetainHandling::DoNotSend => false,
            };
            if send_retained {
                retained.push((s.filter.clone(), options.qos, identifier));
            }
            reason_codes.push(ReasonCode(options.qos as u8));
        }
        let ticket = batch.submit();
        let suback = SubAck {
            packet_id: subscribe.packet_id,
            reason_codes,
            properties: Default::default(),
        };
        // The SUBACK leaves once the subscription is durable; the retained
        // messages are streamed after it (`replay.rs`), from a cursor made
        // now that the subscriptions are in the router.
        self.engine.reply_after(ticket, Packet::SubAck(suback));
        for (filter, granted, identifier) in retained {
            let replays = self.engine.state.rare().replays.get_or_insert_default();
            replays.start(&shared.retained, &filter, granted, identifier, ticket);
        }
        None
    }

    pub(super) fn unsubscribe(&mut self, unsubscribe: Unsubscribe) {
        let shared = self.shared;
        let state = &mut self.engine.state;
        let mut batch = Batch::new(shared.store.as_ref());
        let mut reason_codes = Vec::with_capacity(unsubscribe.filters.len());
        for filter in &unsubscribe.filters {
            if exceeds_levels(filter, shared.config().limits.max_topic_levels) {
                // Never subscribed in this run: no subscription that deep exists.
                too_many_levels(shared, &state.client_id, "UNSUBSCRIBE filter", filter);
                reason_codes.push(ReasonCode::TOPIC_FILTER_INVALID);
                continue;
            }
            let existed = state.subscriptions.remove(filter).is_some();
            if let Some(replays) = state.rare.as_mut().and_then(|r| r.replays.as_mut()) {
                replays.cancel(filter);
            }
            if existed {
                let group = state.rare.as_mut().and_then(|r| r.groups.remove(filter));
                state.trim_rare();
                match group {
                    Some((group, _)) => {
                        shared.groups.leave(shared, &group, SessionId(state.number))
                    }
                    None => {
                        shared.router.unsubscribe(filter, SessionId(state.number));
                    }
                }
                if state.is_persistent() {
                    batch.push(StoreOp::SubscriptionDelete {
                        number: state.number,
                        filter: filter.clone(),
                    });
                }
            }
            reason_codes.push(if existed {
                ReasonCode::SUCCESS
            } else {
                ReasonCode::NO_SUBSCRIPTION_EXISTED
            });
        }
        let ticket = batch.submit();
        let unsuback = UnsubAck {
            packet_id: unsubscribe.packet_id,
            reason_codes,
            properties: Default::default(),
        };
        self.engine.reply_after(ticket, Packet::UnsubAck(unsuback));
    }
}
