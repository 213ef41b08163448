//! Start-up recovery: what the store held when the broker stopped (or
//! died) becomes the running state again: shared groups with their
//! queues, sessions with their queues, messages in flight (a delivery
//! pulled from a shared group resent as its member's subscription made
//! it), subscriptions, wills still waiting (published at once when they
//! came due while the broker was down), retained messages; sessions that
//! expired meanwhile end, and what was over the topic-level limit stays on
//! disk, counted.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use ferrymq_codec::MqttString;
use tracing::{info, warn};

use crate::outbox::{Delivery, Outbox};
use crate::router::Subscriber;
use crate::session::{Inflight, SessionState};
use crate::stats::Stats;
use crate::storage::{self, OutboundPhase, Recovered};
use crate::{SessionId, Shared, bridge_session, connection, lifecycle, router, shared_sub, state};

/// Rebuilds sessions, subscriptions, queues, shared groups and retained
/// messages from what the store recovered. Every recovered session starts
/// offline; queues stay on disk until drained. Sessions and messages whose
/// expiry passed (in broker time) are removed, and wills whose delay
/// passed are published.
pub(crate) fn restore(shared: &Shared, recovered: Recovered) {
    let store = shared.store.clone();
    let clock = store.clock();
    let now_ms = clock.now_ms();
    let now = tokio::time::Instant::now();
    let mut cleanup = storage::Batch::new(store.as_ref());
    {
        let mut dedup = shared.dedup.lock();
        for origin in &recovered.dedup {
            dedup.restore(origin.origin, origin.floor, &origin.marks, origin.last_ms);
        }
    }
    if recovered.corrupt > 0 {
        Stats::add(&shared.stats.corrupt_records, recovered.corrupt);
    }
    // Records deeper than `max_topic_levels` (written with a higher limit,
    // or none) are skipped, never loaded into a tree; they stay on disk.
    let max_levels = shared.config().limits.max_topic_levels;
    let mut over_limit = 0u64;
    let mut too_deep = |topic: &str| {
        let over = ferrymq_codec::topic::exceeds_levels(topic, max_levels);
        over_limit += u64::from(over);
        over
    };
    let mut state = shared.state.as_ref().map(state::StateTopics::lock);
    for message in recovered.retained {
        if too_deep(&message.topic) {
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
        if message.is_expired(now) {
            cleanup.push(storage::StoreOp::RetainedDelete(message.topic.clone()));
        } else if let Some((guard, stamp)) = stamped {
            // A state value or tombstone: the clock stays above its stamp.
            guard.recovered(stamp);
            if message.payload.is_empty() {
                guard.tombstone(&message.topic, stamp, None);
            }
            shared.retained.put(message, 0);
        } else if message.payload.is_empty() {
            // A tombstone of a topic that is no longer a state topic.
            cleanup.push(storage::StoreOp::RetainedDelete(message.topic.clone()));
        } else {
            shared.retained.set(message, 0);
        }
    }
    drop(state);
    // Messages in flight are not paged in again from their queue.
    let mut in_flight: HashMap<u64, HashSet<u64>> = HashMap::new();
    for s in &recovered.sessions {
        for i in s.inflight.iter().filter(|i| i.phase == OutboundPhase::Sent) {
            in_flight.entry(i.queue).or_default().insert(i.seq);
        }
    }
    let limits = connection::queue_limits(shared);
    // A recovered queue (a group's or a session's), its backlog on disk.
    let queue = |number, summary, skip| {
        Outbox::recovered(
            number,
            limits,
            summary,
            skip,
            store.clone(),
            shared.identity.first_seq(),
            shared.queue_memory.clone(),
        )
    };
    for g in recovered.groups {
        if too_deep(&g.filter) {
            continue;
        }
        let skip = in_flight.remove(&g.number).unwrap_or_default();
        let outbox = queue(g.number, g.queue, skip);
        shared
            .groups
            .restore(shared, g.number, g.name, g.filter, outbox);
    }
    let mut due_wills = Vec::new();
    // The records of live sessions whose will came due while the broker
    // was down, without it: written once the wills are published, so a
    // later start does not publish them again (a kill in between: at
    // worst once more, never lost).
    let mut wills_gone = Vec::new();
    for s in recovered.sessions {
        let number = s.record.number;
        // A session online when the previous run ended went offline then
        // (as near as is known: its last clock save).
        let offline_since_ms = s
            .record
            .offline_since_ms
            .unwrap_or(recovered.previous_run_ms);
        let offline_ms = now_ms.saturating_sub(offline_since_ms);
        let expiry = Duration::from_secs(u64::from(s.record.expiry_secs));
        let will = s
            .record
            .pending_will
            .clone()
            .filter(|w| !too_deep(&w.message.topic));
        if s.record.expiry_secs != u32::MAX && u128::from(offline_ms) >= expiry.as_millis() {
            info!(client_id = %s.record.client_id, "session expired while the broker was down");
            Stats::add(&shared.stats.sessions_expired, 1);
            cleanup.push(storage::StoreOp::SessionDelete {
                client_id: s.record.client_id.clone(),
                number,
            });
            due_wills.extend(will.map(|w| w.message));
            continue;
        }
        let skip = in_flight.remove(&number).unwrap_or_default();
        let outbox = queue(number, s.queue, skip);
        if let Some((messages, bytes)) =
            connection::session_bounds(shared, s.record.client_id.as_str())
        {
            outbox.set_bounds(messages, bytes);
        }
        let mut state = SessionState::new(s.record.client_id.clone(), number, outbox.clone());
        state.expiry = expiry;
        state.stored = true;
        for inflight in s.inflight {
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
                        .then(|| shared.groups.by_number(inflight.queue))
                        .flatten(),
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
        state.qos2_received = s.qos2_received.into_iter().collect();
        for (filter, sub) in s.subscriptions {
            if too_deep(&filter) {
                continue;
            }
            if let Some((name, inner)) = ferrymq_codec::topic::shared_subscription(&filter) {
                let (Ok(name), Ok(inner)) = (MqttString::new(name), MqttString::new(inner)) else {
                    continue;
                };
                let member = shared_sub::Member {
                    session: SessionId(number),
                    outbox: outbox.clone(),
                    qos: sub.options.qos,
                    retain_as_published: sub.options.retain_as_published,
                    identifier: sub.identifier,
                };
                let group = shared.groups.join(shared, name, inner, member.clone());
                state.groups.insert(filter.clone(), (group, member));
                state.subscriptions.insert(filter, sub);
                continue;
            }
            shared.router.subscribe(
                &filter,
                Subscriber::of_session(
                    SessionId(number),
                    outbox.clone(),
                    &sub.options,
                    sub.identifier,
                ),
            );
            state.subscriptions.insert(filter, sub);
        }
        // A delivery pulled from a shared group is stored as the group
        // queued it (the group's QoS and RETAIN); what is resent is what
        // the member's subscription made of it when it was pulled.
        for entry in state.inflight.values_mut() {
            let Inflight::Sent(d) = entry else { continue };
            let Some(group) = d.group.clone() else {
                continue;
            };
            if let Some((_, member)) = state
                .groups
                .values()
                .find(|(g, _)| g.number == group.number)
            {
                let mut adapted = shared_sub::SharedGroup::adapt(member, d.clone());
                adapted.group = Some(group);
                *d = adapted;
            }
        }
        if let Some(will) = will {
            // The record once the will is out.
            let mut record = s.record.clone();
            record.pending_will = None;
            if will.due_ms <= now_ms {
                due_wills.push(will.message);
                wills_gone.push(storage::StoreOp::SessionPut(record));
            } else {
                let delay = Duration::from_millis(will.due_ms - now_ms);
                state.pending_will = Some(lifecycle::delay_will(
                    shared,
                    will.message,
                    delay,
                    Some(record),
                ));
            }
        }
        let offline_since = now
            .checked_sub(Duration::from_millis(offline_ms))
            .unwrap_or(now);
        shared.sessions.insert_offline(state, offline_since);
    }
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
