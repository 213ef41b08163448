//! The start and end of a session, apart from the I/O that leads there:
//! attaching a connection to its session (taking over, resuming or
//! starting anew), a will published at once or after its delay (and
//! written back so a restart does not publish it again), the message a
//! will becomes, and what ending a session does to its subscriptions, its
//! shared groups, its queue and its stored state.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ferrymq_codec::{MqttString, QoS, Will};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::Shared;
use crate::bridge_session;
use crate::ferry::strip_ferry_properties;
use crate::message::{Message, SessionId};
use crate::outbox::{Delivery, GroupQueue};
use crate::publish::{self, Routing, wait_for_room};
use crate::router::RouteCache;
use crate::session::{Control, Inflight, SessionState};
use crate::storage::{self, Batch, SessionRecord, StoreOp, Ticket};

/// Attaches the connection `control` to `client_id`'s session, taking
/// over any connection that holds it: the existing session is resumed
/// when the client asks to (`resume`; a will waiting for its delay is
/// cancelled), otherwise it is ended and a new one made. The session is
/// marked online with `expiry`, and a persistent one's record is written.
/// Returns the session, whether it was resumed, and the ticket of the
/// record's write (the CONNACK waits for it).
pub(crate) async fn begin_session(
    shared: &Shared,
    client_id: &MqttString,
    resume: bool,
    expiry: Duration,
    control: &Arc<Control>,
) -> (SessionState, bool, Ticket) {
    let attached = shared
        .sessions
        .attach(client_id, control.clone(), resume)
        .await;
    if attached.took_over {
        debug!(%client_id, "took over an existing connection");
    }
    let mut batch = Batch::new(shared.store.as_ref());
    let (mut state, resumed) = match attached.previous {
        Some(mut previous) if resume => {
            // Resumed within its Will Delay Interval: the will is cancelled.
            drop(previous.take_pending_will());
            (previous, true)
        }
        previous => {
            if let Some(old) = previous {
                end_session(shared, old, &mut batch);
            }
            let number = shared.next_session_number();
            let outbox = shared.new_outbox(number);
            (SessionState::new(client_id.clone(), number, outbox), false)
        }
    };
    state.set_expiry(expiry);
    state.outbox.set_persistent(state.is_persistent());
    state.outbox.set_online(true);
    if let Some((messages, bytes)) = shared.session_bounds(client_id) {
        state.outbox.set_bounds(messages, bytes);
    }
    shared.sessions.set_outbox(client_id, state.outbox.clone());
    if state.is_persistent() {
        // Online now: no offline time, no will waiting.
        batch.push(StoreOp::SessionPut(state.record(None)));
        state.stored = true;
    }
    (state, resumed, batch.submit())
}

/// Publishes `message` (a will) after `delay`, unless the returned handle
/// is dropped first (the session resumed) or used to publish it earlier
/// (the session ended first). `record`, if given, is written back once the
/// will went out, so a restart does not publish it again.
pub(crate) fn delay_will(
    shared: &Shared,
    message: Arc<Message>,
    delay: Duration,
    record: Option<SessionRecord>,
) -> crate::session::PendingWill {
    let (trigger, fired) = tokio::sync::oneshot::channel::<()>();
    let this = shared.this.clone();
    tokio::spawn(async move {
        // Whichever comes first decides; the other is dropped with nothing
        // in progress (a sleep, and a oneshot receiver).
        let (publish, on_time) = tokio::select! {
            _ = tokio::time::sleep(delay) => (true, true),
            early = fired => (early.is_ok(), false),
        };
        if let (true, Some(shared)) = (publish, this.upgrade()) {
            publish_will_message(&shared, message, &mut RouteCache::default());
            if let (true, Some(record)) = (on_time, record) {
                storage::write(shared.store.as_ref(), vec![StoreOp::SessionPut(record)]);
            }
        }
    });
    crate::session::PendingWill(trigger)
}

/// The message a will becomes: a client's will never carries a message
/// id or a state stamp (see `Conn::message_id`).
pub(crate) fn will_message(will: Will, origin: SessionId) -> Arc<Message> {
    let mut message = Message {
        topic: will.topic,
        payload: will.payload,
        qos: will.qos,
        retain: will.retain,
        properties: ferrymq_codec::PublishProperties {
            payload_format_indicator: will.properties.payload_format_indicator,
            message_expiry_interval: will.properties.message_expiry_interval,
            content_type: will.properties.content_type,
            response_topic: will.properties.response_topic,
            correlation_data: will.properties.correlation_data,
            user_properties: will.properties.user_properties,
            ..Default::default()
        },
        origin,
        expires_at: Message::expiry_from(will.properties.message_expiry_interval, Instant::now()),
        holders: Default::default(),
    };
    strip_ferry_properties(&mut message.properties);
    Arc::new(message)
}

/// Routes a will like a publish from its (gone) client.
pub(crate) fn publish_will_message(
    shared: &Shared,
    message: Arc<Message>,
    routes: &mut RouteCache,
) {
    if bridge_session::is_reserved(message.topic.as_str()) {
        warn!(topic = %message.topic, "will dropped: its topic is reserved for the bridges");
        return;
    }
    shared
        .stats
        .received
        .count(message.qos, message.payload.len());
    // A will never blocks its (gone) publisher: under `block` a full queue
    // keeps it waiting in a task of its own.
    match publish::route(shared, routes, message, None, false, None, true) {
        Routing::Done(_) => {}
        Routing::Blocked(parked) => {
            if let Some(shared) = shared.this.upgrade() {
                tokio::spawn(async move {
                    let mut parked = parked;
                    loop {
                        wait_for_room(Some((parked.outbox().clone(), parked.size()))).await;
                        match publish::resume(&shared, parked) {
                            Routing::Done(_) => break,
                            Routing::Blocked(p) => parked = p,
                        }
                    }
                });
            }
        }
    }
}

/// Ends a session: its subscriptions leave the router, its queue is
/// discarded, and its stored state is deleted.
pub(crate) fn end_session(shared: &Shared, mut state: SessionState, batch: &mut Batch<'_>) {
    // A will still waiting for its delay goes out now: the session ended first.
    if let Some(will) = state.take_pending_will() {
        will.publish_now();
    }
    for filter in state.subscriptions.keys() {
        shared.router.unsubscribe(filter, SessionId(state.number));
    }
    // Unacknowledged QoS 1 messages pulled from shared groups go back to
    // their group for another member; QoS 2 ones stay with this session
    // (and end with it).
    let mut returned: HashMap<u64, (Arc<dyn GroupQueue>, Vec<Delivery>)> = HashMap::new();
    for inflight in std::mem::take(&mut state.inflight).into_values() {
        if let Inflight::Sent(d) = inflight
            && d.qos == QoS::AtLeastOnce
            && let Some(group) = d.group.clone()
        {
            returned
                .entry(group.number())
                .or_insert_with(|| (group, Vec::new()))
                .1
                .push(d);
        }
    }
    let groups = state.rare.take().map(|r| r.groups).unwrap_or_default();
    for (_, (group, member)) in groups {
        shared.groups.leave(shared, &group, member.session);
    }
    for (group, mut deliveries) in returned.into_values() {
        deliveries.sort_by_key(|d| d.seq);
        let deliveries = deliveries
            .into_iter()
            .map(|mut d| {
                // The group's queue adds no identifiers of its own.
                d.identifiers = None;
                d
            })
            .collect();
        group.give_back(deliveries);
    }
    state.outbox.close();
    if state.stored {
        batch.push(StoreOp::SessionDelete {
            client_id: state.client_id.clone(),
            number: state.number,
        });
    }
}
