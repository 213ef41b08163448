//! What goes to the client: acknowledgements and replies encoded, and
//! deliveries drained into the write buffer (retained replays first, then
//! the session's queue, then its shared groups') while the store, the
//! client's window and the buffer allow.

use std::sync::Arc;

use ferrymq_codec::QoS;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tracing::warn;

use super::{Conn, Drain, OUT_HIGH_WATER};
use crate::engine::{Delivered, Engine};
use crate::outbox::{Delivery, GroupQueue, Outbox, Pop};
use crate::shared_sub::{Member, SharedGroup};
use crate::stats::{Stats, Tally};
use crate::storage::{Batch, StoreOp, Ticket};

impl<S: AsyncRead + AsyncWrite + Unpin + 'static> Conn<'_, S> {
    pub(super) fn encode_packets(&mut self) {
        let protocol = self.engine.protocol;
        let Some(busy) = self.io.owed() else {
            return;
        };
        for packet in busy.packets.drain(..) {
            if let Err(e) = packet.encode(protocol, &mut busy.out) {
                warn!("could not encode {:?}: {e}", packet.packet_type());
            }
        }
    }

    /// Moves deliveries into the write buffer while the store, the
    /// client's window and the buffer allow: first from the session's own
    /// outbox, then pulled from the shared subscription groups it belongs to.
    pub(super) fn drain(&mut self, durable: Ticket) -> Drain {
        if self.engine.state.replaying() {
            // Retained messages of new subscriptions go first: live ones
            // wait in the queue behind them (see `replay.rs`).
            match self.drain_replays(durable) {
                Drain::Empty => {}
                waiting => return waiting,
            }
        }
        let own = self.engine.state.outbox.clone();
        let mut result = self.drain_from(&own, durable, None);
        if self.engine.state.groups().next().is_some() && result != Drain::OutFull {
            let groups: Vec<(Arc<SharedGroup>, Member)> =
                self.engine.state.groups().cloned().collect();
            for (group, member) in &groups {
                match self.drain_from(&group.outbox, durable, Some((group, member))) {
                    Drain::OutFull => return Drain::OutFull,
                    Drain::WaitDurable => result = Drain::WaitDurable,
                    Drain::WaitWindow if result == Drain::Empty => result = Drain::WaitWindow,
                    _ => {}
                }
            }
        }
        result
    }

    /// Sends retained messages of new subscriptions while the store, the
    /// client's window and the write buffer allow.
    pub(super) fn drain_replays(&mut self, durable: Ticket) -> Drain {
        let shared = self.shared;
        // Out of the session while the engine is used beside it.
        let Some(mut replays) = self
            .engine
            .state
            .rare
            .as_mut()
            .and_then(|r| r.replays.take())
        else {
            return Drain::Empty;
        };
        let now = Instant::now();
        let now_ms = shared.clock.now_ms();
        let mut expired = Vec::new();
        let mut sent = Tally::default();
        let state = loop {
            if self.io.unwritten() >= OUT_HIGH_WATER {
                break Drain::OutFull;
            }
            if self.engine.held_bytes() >= OUT_HIGH_WATER {
                // Enough waits behind a QoS 2 PUBLISH for the store.
                break Drain::WaitDurable;
            }
            let engine = &self.engine;
            let delivery = match replays.pop_ready(
                &shared.retained,
                durable,
                now,
                now_ms,
                |qos| engine.can_send(qos),
                &mut expired,
            ) {
                Pop::Got(d) => d,
                Pop::Empty => break Drain::Empty,
                Pop::WaitDurable => break Drain::WaitDurable,
                Pop::WaitWindow => break Drain::WaitWindow,
            };
            self.send(delivery, now, &mut sent);
        };
        // Kept while any is left; a finished one frees its box.
        if replays.is_empty() {
            self.engine.state.trim_rare();
        } else {
            self.engine.state.rare().replays = Some(replays);
        }
        shared.stats.sent.add(&sent);
        if !expired.is_empty() {
            // Expired retained messages are never sent, and go.
            let mut batch = Batch::new(shared.store.as_ref());
            for topic in expired {
                if shared.retained.remove_expired(&topic, now) {
                    batch.push(StoreOp::RetainedDelete(topic));
                }
            }
            batch.submit();
        }
        state
    }

    /// Hands a delivery to the engine and encodes what it sends (or drops
    /// it, counted: too large, expired, or older than `[storage]
    /// max_age_secs` for a network client), counting what went in `sent`.
    pub(super) fn send(&mut self, delivery: Delivery, now: Instant, sent: &mut Tally) {
        if let Some(max_age) = self.shared.config().storage.max_age
            && !self.in_process
            && u128::from(
                self.shared
                    .clock
                    .now_ms()
                    .saturating_sub(delivery.queued_ms),
            ) > max_age.as_millis()
        {
            Engine::unqueue(&delivery, &mut self.io.busy().ops);
            Stats::add(&self.shared.stats.messages_aged_out, 1);
            return;
        }
        let busy = self.io.busy();
        match self.engine.deliver(delivery, now, &mut busy.ops) {
            Delivered::Send(out) => {
                if let Err(e) = out.view().encode(self.engine.protocol, &mut busy.out) {
                    warn!(topic = %out.message.topic, "could not encode a delivery: {e}");
                }
                sent.count(out.qos, out.message.payload.len());
            }
            Delivered::Held(qos, size) => sent.count(qos, size),
            Delivered::TooLarge => {
                Stats::add(&self.shared.stats.messages_dropped_too_large, 1);
            }
            Delivered::Expired => {
                Stats::add(&self.shared.stats.messages_expired, 1);
            }
        }
    }

    pub(super) fn drain_from(
        &mut self,
        outbox: &Outbox,
        durable: Ticket,
        pulled_by: Option<(&Arc<SharedGroup>, &Member)>,
    ) -> Drain {
        let mut sent = Tally::default();
        let now = Instant::now();
        let member_qos = pulled_by.map_or(QoS::ExactlyOnce, |(_, m)| m.qos);
        // From a group with other members: one message per turn, then the
        // group is woken again, so that members take turns.
        let one_per_turn = pulled_by.is_some_and(|(g, _)| g.member_count() > 1);
        let state = loop {
            if self.io.unwritten() >= OUT_HIGH_WATER {
                break Drain::OutFull;
            }
            if self.engine.held_bytes() >= OUT_HIGH_WATER {
                // Enough waits behind a QoS 2 PUBLISH for the store.
                break Drain::WaitDurable;
            }
            if one_per_turn && sent.any() {
                if let Some((group, _)) = pulled_by {
                    group.wake();
                }
                break Drain::Empty;
            }
            let engine = &self.engine;
            let delivery =
                match outbox.pop_ready(durable, |qos| engine.can_send(qos.min(member_qos))) {
                    Pop::Got(d) => d,
                    Pop::Empty => break Drain::Empty,
                    Pop::WaitDurable => break Drain::WaitDurable,
                    Pop::WaitWindow => break Drain::WaitWindow,
                };
            let delivery = match pulled_by {
                Some((group, member)) => {
                    let mut d = SharedGroup::adapt(member, delivery);
                    d.group = Some(group.clone());
                    d
                }
                None => delivery,
            };
            self.send(delivery, now, &mut sent);
        };
        self.shared.stats.sent.add(&sent);
        state
    }
}
