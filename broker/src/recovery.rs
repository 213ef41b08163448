//! Start-up recovery: what the store held when the broker stopped (or
//! died) becomes the running state again: shared groups with their
//! queues, sessions with their queues, messages in flight (a delivery
//! pulled from a shared group resent as its member's subscription made
//! it), subscriptions, wills still waiting (published at once when they
//! came due while the broker was down), retained messages; sessions that
//! expired meanwhile end, and what was over the topic-level limit stays on
//! disk, counted.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ferrymq_codec::MqttString;
use tracing::{info, warn};

use crate::message::Message;
use crate::outbox::{Delivery, GroupQueue, Outbox, QueueLimits};
use crate::session::{Inflight, SessionState};
use crate::stats::Stats;
use crate::storage::{
    self, InflightRecord, OutboundPhase, QueueSummary, Recovered, RecoveredGroup, RecoveredOrigin,
    RecoveredSession, SessionRecord, StoredWill, SubscriptionRecord,
};
use crate::{Shared, bridge_session, lifecycle, router, shared_sub, state};

/// Rebuilds sessions, subscriptions, queues, shared groups and retained
/// messages from what the store recovered. Every recovered session starts
/// offline; queues stay on disk until drained. Sessions and messages whose
/// expiry passed (in broker time) are removed, and wills whose delay
/// passed are published.
pub(crate) fn restore(shared: &Shared, recovered: Recovered) {
    let clock = shared.store.clock();
    let now_ms = clock.now_ms();
    let now = tokio::time::Instant::now();
    let mut restore = Restore {
        shared,
        now_ms,
        now,
        cleanup: storage::Batch::new(shared.store.as_ref()),
        max_levels: shared.config().limits.max_topic_levels,
        over_limit: 0,
        in_flight: HashMap::new(),
        limits: shared.queue_limits(),
        due_wills: Vec::new(),
        wills_gone: Vec::new(),
    };
    restore.dedup(&recovered.dedup);
    if recovered.corrupt > 0 {
        Stats::add(&shared.stats.corrupt_records, recovered.corrupt);
    }
    restore.retained(recovered.retained);
    // Messages in flight are not paged in again from their queue.
    for s in &recovered.sessions {
        for i in s.inflight.iter().filter(|i| i.phase == OutboundPhase::Sent) {
            restore.in_flight.entry(i.queue).or_default().insert(i.seq);
        }
    }
    for g in recovered.groups {
        restore.group(g);
    }
    for s in recovered.sessions {
        restore.session(s, recovered.previous_run_ms);
    }
    restore.finish();
}

/// What the steps of one restore share.
struct Restore<'a> {
    shared: &'a Shared,
    /// Broker time at the start of the restore.
    now_ms: u64,
    /// The same moment on the tokio clock.
    now: tokio::time::Instant,
    /// Deletions of what expired while the broker was down, or is no
    /// longer wanted: one batch, submitted at the end.
    cleanup: storage::Batch<'a>,
    /// `limits.max_topic_levels`.
    max_levels: u32,
    /// Records skipped for having more topic levels than that.
    over_limit: u64,
    /// Per queue, the sequences of its messages in flight.
    in_flight: HashMap<u64, HashSet<u64>>,
    /// The limits of every recovered queue.
    limits: QueueLimits,
    /// Wills to publish once everything is restored.
    due_wills: Vec<Arc<Message>>,
    /// The records of live sessions whose will came due while the broker
    /// was down, without it: written once the wills are published, so a
    /// later start does not publish them again (a kill in between: at
    /// worst once more, never lost).
    wills_gone: Vec<storage::StoreOp>,
}

impl Restore<'_> {
    /// Records deeper than `max_topic_levels` (written with a higher limit,
    /// or none) are skipped, never loaded into a tree; they stay on disk.
    fn too_deep(&mut self, topic: &str) -> bool {
        let over = ferrymq_codec::topic::exceeds_levels(topic, self.max_levels);
        self.over_limit += u64::from(over);
        over
    }

    /// The receiver-side de-duplication origins.
    fn dedup(&self, origins: &[RecoveredOrigin]) {
        let mut dedup = self.shared.dedup.lock();
        for origin in origins {
            dedup.restore(origin.origin, origin.floor, &origin.marks, origin.last_ms);
        }
    }

    /// The retained messages, state values and tombstones; the expired
    /// ones and stale tombstones are deleted.
    fn retained(&mut self, retained: Vec<Arc<Message>>) {
        let shared = self.shared;
        let mut state = shared.state.as_ref().map(state::StateTopics::lock);
        for message in retained {
            if self.too_deep(&message.topic) {
                continue;
            }
            let is_state = shared
                .state
                .as_ref()
                .is_some_and(|s| s.covers(&message.topic));
            let stamped = state
                .as_mut()
                .filter(|_| is_state)
                .zip(state::Stamp::of(&message));
            if message.is_expired(self.now) {
                self.cleanup
                    .push(storage::StoreOp::RetainedDelete(message.topic.clone()));
            } else if let Some((guard, stamp)) = stamped {
                // A state value or tombstone: the clock stays above its stamp.
                guard.recovered(stamp);
                if message.payload.is_empty() {
                    guard.tombstone(&message.topic, stamp, None);
                }
                shared.retained.put(message, 0);
            } else if message.payload.is_empty() {
                // A tombstone of a topic that is no longer a state topic.
                self.cleanup
                    .push(storage::StoreOp::RetainedDelete(message.topic.clone()));
            } else {
                shared.retained.set(message, 0);
            }
        }
    }

    /// A recovered queue (a group's or a session's), its backlog on disk.
    fn queue(&mut self, number: u64, summary: QueueSummary) -> Arc<Outbox> {
        let skip = self.in_flight.remove(&number).unwrap_or_default();
        Outbox::recovered(
            number,
            self.limits,
            summary,
            skip,
            self.shared.identity.first_seq(),
            &self.shared.queue_env,
        )
    }

    fn group(&mut self, g: RecoveredGroup) {
        if self.too_deep(&g.filter) {
            return;
        }
        let outbox = self.queue(g.number, g.queue);
        self.shared
            .groups
            .restore(self.shared, g.number, g.name, g.filter, outbox);
    }

    /// One session, offline: ended if it expired while the broker was
    /// down, else with its queue, exchanges, subscriptions and will.
    fn session(&mut self, s: RecoveredSession, previous_run_ms: u64) {
        let shared = self.shared;
        let number = s.record.number;
        // A session online when the previous run ended went offline then
        // (as near as is known: its last clock save).
        let offline_since_ms = s.record.offline_since_ms.unwrap_or(previous_run_ms);
        let offline_ms = self.now_ms.saturating_sub(offline_since_ms);
        let expiry = Duration::from_secs(u64::from(s.record.expiry_secs));
        let will = s
            .record
            .pending_will
            .clone()
            .filter(|w| !self.too_deep(&w.message.topic));
        if s.record.expiry_secs != u32::MAX && u128::from(offline_ms) >= expiry.as_millis() {
            info!(client_id = %s.record.client_id, "session expired while the broker was down");
            Stats::add(&shared.stats.sessions_expired, 1);
            self.cleanup.push(storage::StoreOp::SessionDelete {
                client_id: s.record.client_id.clone(),
                number,
            });
            self.due_wills.extend(will.map(|w| w.message));
            return;
        }
        let outbox = self.queue(number, s.queue);
        if let Some((messages, bytes)) = shared.session_bounds(s.record.client_id.as_str()) {
            outbox.set_bounds(messages, bytes);
        }
        let mut state = SessionState::new(s.record.client_id.clone(), number, outbox.clone());
        state.set_expiry(expiry);
        state.stored = true;
        self.inflight(&mut state, s.inflight);
        if !s.qos2_received.is_empty() {
            state.rare().qos2_received = s.qos2_received.into_iter().collect();
        }
        self.subscriptions(&mut state, s.subscriptions);
        adapt_group_deliveries(&mut state);
        if let Some(will) = will {
            self.will(&mut state, &s.record, will);
        }
        let offline_since = self
            .now
            .checked_sub(Duration::from_millis(offline_ms))
            .unwrap_or(self.now);
        shared.sessions.insert_offline(state, offline_since);
    }

    /// A session's outbound exchanges, resent as they were.
    fn inflight(&self, state: &mut SessionState, inflight: Vec<InflightRecord>) {
        let number = state.number;
        for inflight in inflight {
            let entry = match (inflight.phase, inflight.body) {
                (OutboundPhase::Sent, Some(body)) => Inflight::Sent(Delivery {
                    message: body.message,
                    qos: body.qos,
                    retain: body.retain,
                    seq: inflight.seq,
                    queue: inflight.queue,
                    ticket: 0,
                    stored: true,
                    identifiers: body.identifiers,
                    group: (inflight.queue != number)
                        .then(|| self.shared.groups.by_number(inflight.queue))
                        .flatten()
                        .map(|g| g as Arc<dyn GroupQueue>),
                    queued_ms: body.queued_ms,
                }),
                // Its message is gone (acknowledged before the crash, or
                // unreadable): nothing to resend.
                (OutboundPhase::Sent, None) => continue,
                (OutboundPhase::Released, _) => Inflight::Released { seq: inflight.seq },
            };
            state.inflight.insert(inflight.packet_id, entry);
            state.next_packet_id = state
                .next_packet_id
                .max(inflight.packet_id.wrapping_add(1).max(1));
        }
    }

    /// A session's subscriptions: into the topic tree, or its shared
    /// groups.
    fn subscriptions(
        &mut self,
        state: &mut SessionState,
        subscriptions: Vec<(MqttString, SubscriptionRecord)>,
    ) {
        let shared = self.shared;
        for (filter, sub) in subscriptions {
            if self.too_deep(&filter) {
                continue;
            }
            crate::subscribe::attach(shared, state, &filter, sub);
        }
    }

    /// A session's will: published at the end of the restore if it came
    /// due while the broker was down, else delayed for what is left.
    fn will(&mut self, state: &mut SessionState, record: &SessionRecord, will: StoredWill) {
        // The record once the will is out.
        let mut record = record.clone();
        record.pending_will = None;
        if will.due_ms <= self.now_ms {
            self.due_wills.push(will.message);
            self.wills_gone.push(storage::StoreOp::SessionPut(record));
        } else {
            let delay = Duration::from_millis(will.due_ms - self.now_ms);
            state.rare().pending_will = Some(lifecycle::delay_will(
                self.shared,
                will.message,
                delay,
                Some(record),
            ));
        }
    }

    /// Reports what was over the level limit, submits the cleanup, makes
    /// the bridges' sessions, publishes the wills that came due.
    fn finish(self) {
        let Restore {
            shared,
            mut cleanup,
            max_levels,
            over_limit,
            due_wills,
            wills_gone,
            ..
        } = self;
        if over_limit > 0 {
            Stats::add(&shared.stats.records_over_level_limit, over_limit);
            warn!(
                records = over_limit,
                max = max_levels,
                "skipped stored retained messages, subscriptions or wills with more topic levels \
                 than limits.max_topic_levels; they stay on disk (raise the limit to load them)"
            );
        }
        shared.groups.prune_empty(shared, &mut cleanup);
        cleanup.submit();
        bridge_session::ensure(shared, |_| true);
        bridge_session::retire_removed(shared);
        for message in due_wills {
            lifecycle::publish_will_message(shared, message, &mut router::RouteCache::default());
        }
        if !wills_gone.is_empty() {
            storage::write(shared.store.as_ref(), wills_gone);
        }
    }
}

/// A delivery pulled from a shared group is stored as the group queued it
/// (the group's QoS and RETAIN); what is resent is what the member's
/// subscription made of it when it was pulled.
fn adapt_group_deliveries(state: &mut SessionState) {
    for entry in state.inflight.values_mut() {
        let Inflight::Sent(d) = entry else { continue };
        let Some(group) = d.group.clone() else {
            continue;
        };
        if let Some((_, member)) = state
            .rare
            .iter()
            .flat_map(|r| r.groups.values())
            .find(|(g, _)| g.number == group.number())
        {
            let mut adapted = shared_sub::SharedGroup::adapt(member, d.clone());
            adapted.group = Some(group);
            *d = adapted;
        }
    }
}
