//! Routing one message: to the retained store, into the outbox of every
//! matching session, and into the store batch that makes all of it
//! durable, applying each queue's `queue_full` policy on the way.

use std::sync::Arc;

use ferrymq_codec::QoS;
use ferrymq_config::QueueFull;
use tracing::warn;

use crate::Shared;
use crate::engine::RouteOutcome;
use crate::message::{Message, MessageId, SessionId};
use crate::outbox::{Delivery, Outbox, Pushed};
use crate::router::{Route, RouteCache};
use crate::state::{self, Stamp};
use crate::stats::Stats;
use crate::storage::{Batch, StoreOp, Ticket};

/// A publish waiting for room in a full queue (policy `block`).
pub(crate) struct Parked {
    message: Arc<Message>,
    routes: Arc<[Route]>,
    /// The first route not yet served.
    next: usize,
    matched: usize,
    /// The ticket of the part already routed.
    ticket: Ticket,
    wait: bool,
    /// A trusted sender's id, taken with the batch that completes it.
    dedup: Option<MessageId>,
    /// Whether the publish may wait for room (see [`route`]).
    may_block: bool,
}

impl Parked {
    /// The outbox that has no room.
    pub(crate) fn outbox(&self) -> &Arc<Outbox> {
        &self.routes[self.next].outbox
    }

    /// The size of the message waiting for room.
    pub(crate) fn size(&self) -> usize {
        self.message.payload.len()
    }
}

/// The result of [`route`].
pub(crate) enum Routing {
    /// Routed (or refused).
    Done(RouteOutcome),
    /// Waiting for room; call [`resume`] once the outbox has some.
    Blocked(Parked),
}

/// Routes a message published by `origin`. `hold_qos2` is the inbound
/// QoS 2 packet identifier to store in the same batch, `persistent`
/// whether the publisher's session is stored, and `dedup` the id of a
/// trusted sender's message: taken (in memory and in the store) with the
/// batch that completes the routing, which the acknowledgement and the
/// deliveries then wait for. With `may_block` false a full queue under
/// `block` refuses the message up front instead of parking it.
pub(crate) fn route(
    shared: &Shared,
    cache: &mut RouteCache,
    message: Arc<Message>,
    hold_qos2: Option<u16>,
    persistent: bool,
    dedup: Option<MessageId>,
    may_block: bool,
) -> Routing {
    let routes = cache.routes(&shared.router, &message.topic, message.origin);
    let origin = message.origin;
    let policy = shared.config().storage.queue_full;
    let size = message.payload.len();
    // `refuse` (and `block` for offline sessions, which could block for
    // days) refuses a QoS 1/2 publish up front when any queue is full, so
    // that nobody gets a message its publisher was told was refused.
    // A store that fails to write, or whose disk budget is used up under
    // `refuse`/`block`, cannot take a QoS 1/2 message for a persistent
    // session: refuse it rather than acknowledge what is not stored.
    // The budget of a queue that may fill the bridges' reserve is the
    // whole budget; others' (and retained messages') the rest.
    let stores = |r: &&Route| r.outbox.stores(message.qos.min(r.qos));
    let needs_store = message.qos != QoS::AtMostOnce
        && (message.retain || targets(&routes, origin).any(|r| stores(&r)));
    let over_budget = needs_store
        && matches!(policy, QueueFull::Refuse | QueueFull::Block)
        && ((message.retain && shared.store.over_budget(false))
            || targets(&routes, origin)
                .filter(stores)
                .any(|r| shared.store.over_budget(r.outbox.uses_reserve())));
    let store_refuses = needs_store && (!shared.store.healthy() || over_budget);
    if message.qos != QoS::AtMostOnce
        && (store_refuses || matches!(policy, QueueFull::Refuse | QueueFull::Block))
    {
        let full = store_refuses
            || targets(&routes, origin).any(|r| {
                checked_up_front(policy, may_block, &r.outbox) && !r.outbox.has_room(size)
            });
        if full {
            Stats::add(&shared.stats.publishes_refused, 1);
            return Routing::Done(RouteOutcome {
                ticket: 0,
                matched: 0,
                refused: true,
            });
        }
    }
    // A state value (`[state]`): stamped, and taken only if it is newer
    // than the value held. Stamp, set and store ticket are taken under
    // one lock, so the set and the store keep the stamps' order.
    let mut message = message;
    let mut state = None;
    if message.retain
        && let Some(topics) = shared.state.as_ref().filter(|s| s.covers(&message.topic))
    {
        let mut guard = topics.lock();
        let held = shared.retained.get(&message.topic);
        let held_stamp = held.as_deref().and_then(Stamp::of);
        let Some(stamp) = guard.write(Stamp::of(&message), held_stamp, state::wall_ms()) else {
            Stats::add(&shared.stats.state_writes_superseded, 1);
            return Routing::Done(RouteOutcome {
                ticket: 0,
                matched: 1,
                refused: false,
            });
        };
        stamp.put_on(&mut message);
        let held_tombstone = held.filter(|m| m.payload.is_empty()).and(held_stamp);
        state = Some((guard, stamp, held_tombstone));
    }
    let stored_target = message.qos != QoS::AtMostOnce
        && targets(&routes, origin).any(|r| r.outbox.stores(message.qos.min(r.qos)));
    let hold = hold_qos2.filter(|_| persistent);
    // Whether deliveries and the acknowledgement wait for the store.
    let wait = message.retain || hold.is_some() || stored_target || dedup.is_some();
    let mut batch = Batch::new(shared.store.as_ref());
    let ticket = if wait { batch.ticket() } else { 0 };
    if let Some(packet_id) = hold {
        batch.push(StoreOp::Qos2Received {
            number: origin.0,
            packet_id,
        });
    }
    if let Some((mut guard, stamp, held_tombstone)) = state {
        // Held even when cleared: the tombstone keeps older values out.
        shared.retained.put(message.clone(), ticket);
        batch.push(StoreOp::RetainedPut(message.clone()));
        batch.push(StoreOp::StateClock(guard.clock()));
        match (message.payload.is_empty(), held_tombstone) {
            (true, previous) => guard.tombstone(&message.topic, stamp, previous),
            (false, Some(previous)) => guard.untombstone(&message.topic, previous),
            (false, None) => {}
        }
    } else if message.retain && !message.payload.is_empty() && retained_full(shared, &message) {
        // Delivered, not retained: counted and logged there.
    } else if message.retain
        // Setting always writes; clearing writes only what existed.
        && (shared.retained.set(message.clone(), ticket) || !message.payload.is_empty())
    {
        batch.push(if message.payload.is_empty() {
            StoreOp::RetainedDelete(message.topic.clone())
        } else {
            StoreOp::RetainedPut(message.clone())
        });
    }
    let parked = Parked {
        message,
        routes,
        next: 0,
        matched: 0,
        ticket,
        wait,
        dedup,
        may_block,
    };
    push_all(shared, parked, batch)
}

/// Whether `[limits] max_retained_messages` turns away the retained
/// `message`: the limit is reached and its topic holds none to replace.
/// Counted and logged when it does.
fn retained_full(shared: &Shared, message: &Message) -> bool {
    let max = shared.config().limits.max_retained_messages as usize;
    if max == 0 || shared.retained.count() < max || shared.retained.get(&message.topic).is_some() {
        return false;
    }
    Stats::add(&shared.stats.retained_refused, 1);
    if shared.drop_log.allow() {
        warn!(
            topic = %message.topic,
            max_retained_messages = max,
            refused_total = Stats::get(&shared.stats.retained_refused),
            "limits.max_retained_messages reached: a retained message on a new topic is delivered \
             but not retained"
        );
    }
    true
}

/// Continues a [`Routing::Blocked`] publish.
pub(crate) fn resume(shared: &Shared, parked: Parked) -> Routing {
    let mut batch = Batch::new(shared.store.as_ref());
    let mut parked = parked;
    if parked.wait {
        parked.ticket = parked.ticket.max(batch.ticket());
    }
    push_all(shared, parked, batch)
}

fn targets(routes: &[Route], origin: SessionId) -> impl Iterator<Item = &Route> {
    routes
        .iter()
        .filter(move |r| !(r.no_local && r.session == origin))
}

/// Whether [`route`]'s up-front room check covers a target: under
/// `refuse` every queue; under `block` those the publish may not wait for
/// (it may not block, or the session is offline and could stay away for
/// days).
fn checked_up_front(policy: QueueFull, may_block: bool, outbox: &Outbox) -> bool {
    policy == QueueFull::Refuse
        || (policy == QueueFull::Block && (!may_block || !outbox.is_online()))
}

fn push_all(shared: &Shared, mut p: Parked, mut batch: Batch<'_>) -> Routing {
    let queued_ms = shared.clock.now_ms();
    let policy = shared.config().storage.queue_full;
    while p.next < p.routes.len() {
        let route = &p.routes[p.next];
        if route.no_local && route.session == p.message.origin {
            p.next += 1;
            continue;
        }
        let qos = p.message.qos.min(route.qos);
        let delivery = Delivery {
            message: p.message.clone(),
            qos,
            retain: p.message.retain && route.retain_as_published,
            seq: 0,
            queue: 0,
            ticket: if p.wait { p.ticket } else { 0 },
            stored: false,
            identifiers: route.identifiers.clone(),
            group: None,
            queued_ms,
        };
        // A target the up-front room check covered, filled since by
        // another publisher, still takes this message.
        let checked = p.message.qos != QoS::AtMostOnce
            && checked_up_front(policy, p.may_block, &route.outbox);
        match push(shared, &route.outbox, delivery, &mut batch, checked) {
            PushResult::Done => {
                if let Some(group) = &route.group {
                    group.wake();
                }
                p.matched += 1;
                p.next += 1;
            }
            PushResult::Full => {
                // Policy `block`, the session online: wait for room. What
                // was routed so far is submitted now (the ticket must not
                // stay open while we wait).
                batch.submit();
                return Routing::Blocked(p);
            }
        }
    }
    if let Some(id) = &p.dedup {
        let taken = shared.dedup.lock().take(id, queued_ms);
        if let Some((origin, taken)) = taken {
            batch.push(StoreOp::DedupTake {
                origin,
                floor: taken.floor,
                mark: taken.mark.then_some(id.n),
                clear: taken.cleared,
                at_ms: queued_ms,
            });
        }
    }
    batch.submit();
    Routing::Done(RouteOutcome {
        ticket: if p.wait { p.ticket } else { 0 },
        matched: p.matched,
        refused: false,
    })
}

enum PushResult {
    Done,
    Full,
}

/// Pushes one delivery, recording its store ops in `batch`.
fn push(
    shared: &Shared,
    outbox: &Outbox,
    delivery: Delivery,
    batch: &mut Batch<'_>,
    checked: bool,
) -> PushResult {
    let (qos, retain, message) = (delivery.qos, delivery.retain, delivery.message.clone());
    let identifiers = delivery.identifiers.clone();
    // A stored put must be ordered before the delete that follows its
    // delivery: take the ticket before the delivery becomes visible.
    let store_ticket = if outbox.is_persistent() {
        batch.ticket()
    } else {
        0
    };
    let budget_full = outbox.is_persistent() && shared.store.over_budget(outbox.uses_reserve());
    match outbox.push(delivery, budget_full, store_ticket, checked) {
        Pushed::Queued {
            seq,
            stored,
            evicted,
        } => {
            let number = outbox.session_number;
            if stored {
                batch.push(StoreOp::QueuePut {
                    number,
                    seq,
                    qos,
                    retain,
                    identifiers,
                    message,
                });
            }
            for old in evicted {
                dropped(shared, outbox, old.by_memory);
                if old.stored {
                    batch.push(StoreOp::QueueDelete {
                        number,
                        seq: old.seq,
                        size: old.size,
                    });
                }
            }
            PushResult::Done
        }
        Pushed::DroppedFull => {
            dropped(shared, outbox, false);
            PushResult::Done
        }
        Pushed::DroppedMemory => {
            dropped(shared, outbox, true);
            PushResult::Done
        }
        Pushed::Full if outbox.is_online() && !budget_full => PushResult::Full,
        Pushed::Full => {
            // Raced with the up-front check, or the disk budget is used up
            // (which blocking cannot wait out): dropped, counted.
            dropped(shared, outbox, false);
            PushResult::Done
        }
        Pushed::Skipped | Pushed::Closed => PushResult::Done,
    }
}

/// Counts a dropped delivery (and warns now and then); `by_memory`: every
/// queue's memory together was at `max_queued_memory`.
fn dropped(shared: &Shared, outbox: &Outbox, by_memory: bool) {
    if by_memory {
        Stats::add(&shared.stats.messages_dropped_memory, 1);
        if shared.drop_log.allow() {
            warn!(
                session = outbox.session_number,
                dropped_total = Stats::get(&shared.stats.messages_dropped_memory),
                queued_memory = shared.queue_env.memory().used(),
                policy = %shared.config().storage.queue_full,
                "queued messages reached storage.max_queued_memory: queues held in memory only \
                 count as full"
            );
        }
        return;
    }
    Stats::add(&shared.stats.messages_dropped_queue_full, 1);
    if shared.drop_log.allow() {
        warn!(
            session = outbox.session_number,
            dropped_total = Stats::get(&shared.stats.messages_dropped_queue_full),
            policy = %shared.config().storage.queue_full,
            "session queue full: dropping messages"
        );
    }
}

/// Queues the retained messages matching `filter` into a bridge's queue
/// (its outbox is durable and bounded far above a session's; what does not
/// fit is dropped and counted), read from the retained set a page at a
/// time. Network clients get theirs streamed instead (`replay.rs`).
pub(crate) fn queue_retained(shared: &Shared, outbox: &Outbox, filter: &str, granted: QoS) {
    let mut cursor = shared.retained.cursor(filter);
    let mut page = Vec::new();
    let now = tokio::time::Instant::now();
    while !cursor.is_done() {
        page.clear();
        shared.retained.next_page(&mut cursor, 256, &mut page);
        let mut batch = Batch::new(shared.store.as_ref());
        let queued_ms = shared.clock.now_ms();
        for entry in page.drain(..).filter(|e| !e.message.is_expired(now)) {
            let qos = entry.message.qos.min(granted);
            let delivery = Delivery {
                stored: false,
                queue: 0,
                message: entry.message,
                qos,
                retain: true,
                seq: 0,
                ticket: entry.ticket,
                identifiers: None,
                group: None,
                queued_ms,
            };
            if let PushResult::Full = push(shared, outbox, delivery, &mut batch, false) {
                dropped(shared, outbox, false);
            }
        }
        batch.submit();
    }
}

/// A publish parked on a full queue: the queue, and the size it waits
/// room for.
pub(crate) type ParkedOn = (Arc<Outbox>, usize);

/// Waits until `outbox` has room for `size` bytes. Cancel-safe.
pub(crate) async fn wait_for_room(target: Option<ParkedOn>) {
    let Some((outbox, size)) = target else {
        return std::future::pending().await;
    };
    outbox.room_for(size).await
}
