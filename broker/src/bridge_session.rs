//! The local side of each configured bridge: its durable session
//! `$bridge/{name}`, whose subscriptions are the bridge's `out` rules and
//! whose queue is the bridge's outbox. The broker sets them up at start,
//! before any listener accepts, so a message published from the first
//! moment on is queued for the bridge before its publisher is
//! acknowledged; the bridge (crate ferrymq-bridge) then drains the session
//! through an in-process client. Rules removed from the config are
//! unsubscribed here; what they queued already still goes upstream.

use std::time::Duration;

use ferrymq_codec::{MqttString, RetainHandling, SubscriptionOptions};
use ferrymq_config::{Direction, Lane};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::Shared;
use crate::message::SessionId;
use crate::publish;
use crate::session::SessionState;
use crate::storage::{Batch, StoreOp, SubscriptionRecord};

/// Topic prefix on which a bridge's replayed dead letters are published
/// (`$replay/{bridge}/{original topic}`): only the bridge's session takes
/// them, so local subscribers do not see them twice.
pub const REPLAY_PREFIX: &str = "$replay/";

/// Topic prefix under which a bridge keeps the messages the upstream
/// refused for good (`$dead/{bridge}/{topic}`).
pub const DEAD_LETTER_PREFIX: &str = "$dead/";

/// Whether network clients are kept from publishing to `topic`: the
/// bridges' dead-letter and replay topics are written by the bridges only
/// (anything published there would go upstream or into the dead letters
/// unchecked). Subscribing to them is allowed, to look at dead letters.
pub fn is_reserved(topic: &str) -> bool {
    topic.starts_with(REPLAY_PREFIX) || topic.starts_with(DEAD_LETTER_PREFIX)
}

/// The client identifier of a bridge's local session.
pub fn bridge_client_id(name: &str) -> String {
    format!("{BRIDGE_CLIENT_PREFIX}{name}")
}

/// Client identifiers reserved for bridges (in-process only).
pub const BRIDGE_CLIENT_PREFIX: &str = "$bridge/";

/// The client identifier of bridge `name`'s live lane (`lane = "live"`
/// rules): `$bridge/{name}/live` (bridge names have no `/`).
pub fn bridge_live_client_id(name: &str) -> String {
    format!("{BRIDGE_CLIENT_PREFIX}{name}/live")
}

/// A bridge session never expires.
pub(crate) const NEVER: Duration = Duration::from_secs(u32::MAX as u64);

/// The subscription options of an `out` rule on the bridge session: No
/// Local (what the bridge publishes locally, inbound, never goes back up),
/// RETAIN kept, retained messages queued only for a new rule.
pub(crate) fn out_options(qos: u8) -> SubscriptionOptions {
    SubscriptionOptions {
        qos: match qos {
            0 => ferrymq_codec::QoS::AtMostOnce,
            1 => ferrymq_codec::QoS::AtLeastOnce,
            _ => ferrymq_codec::QoS::ExactlyOnce,
        },
        no_local: true,
        retain_as_published: true,
        retain_handling: RetainHandling::SendIfNew,
    }
}

/// Creates or updates the sessions of every configured bridge that
/// `wanted` names (offline until the bridge attaches): `$bridge/{name}`
/// for its `out` rules of the backlog lane (and replayed dead letters),
/// and `$bridge/{name}/live` for its `lane = "live"` rules, when it has
/// any (or had: a live queue left from an earlier config is kept, its
/// rules gone, until the bridge drains it). A session attached to its
/// bridge is left as it is (see [`ensure_session`]).
pub(crate) fn ensure(shared: &Shared, wanted: impl Fn(&str) -> bool) {
    let config = shared.config();
    for bridge in config.bridges.iter().filter(|b| wanted(&b.name)) {
        let rules = |lane: Lane| -> Vec<(MqttString, SubscriptionOptions)> {
            bridge
                .forward
                .iter()
                .filter(|r| r.direction != Direction::In && r.lane == lane)
                .filter_map(|r| {
                    let filter =
                        MqttString::new(&format!("{}{}", r.local_prefix, r.filter)).ok()?;
                    Some((filter, out_options(r.qos)))
                })
                .collect()
        };
        let mut backlog = rules(Lane::Backlog);
        // Replayed dead letters come back through here (and to no other
        // local subscriber).
        if let Ok(filter) = MqttString::new(&format!("{REPLAY_PREFIX}{}/#", bridge.name)) {
            backlog.push((filter, out_options(1)));
        }
        ensure_session(
            shared,
            &bridge.name,
            &bridge_client_id(&bridge.name),
            backlog,
        );
        let live = rules(Lane::Live);
        let live_id = bridge_live_client_id(&bridge.name);
        let had_live =
            MqttString::new(&live_id).is_ok_and(|id| shared.sessions.outbox(id.as_str()).is_some());
        if !live.is_empty() || had_live {
            ensure_session(shared, &bridge.name, &live_id, live);
        }
    }
}

/// Unsubscribes every rule of the sessions of bridges that are no longer
/// configured, keeping what they queued: a removed bridge's queue waits
/// on disk, growing no more, until the bridge is configured again (its
/// rules come back and it drains) or the queue is deleted. Sessions
/// attached to a client are left alone.
pub(crate) fn retire_removed(shared: &Shared) {
    let config = shared.config();
    let removed: Vec<MqttString> = shared
        .sessions
        .queues()
        .into_iter()
        .filter(|(id, _, online)| {
            let Some(name) = id.as_str().strip_prefix(BRIDGE_CLIENT_PREFIX) else {
                return false;
            };
            let name = name.strip_suffix("/live").unwrap_or(name);
            // Bridge names are of A-Z a-z 0-9 _ -: this leaves out the
            // dead letters' sessions and other in-process clients.
            let a_bridge = name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            !*online && a_bridge && !config.bridges.iter().any(|b| b.name == name)
        })
        .map(|(id, _, _)| id)
        .collect();
    for client_id in removed {
        let Some(mut state) = shared.sessions.take_offline(&client_id) else {
            continue;
        };
        let filters: Vec<MqttString> = state.subscriptions.keys().cloned().collect();
        if !filters.is_empty() {
            let mut batch = Batch::new(shared.store.as_ref());
            for filter in filters {
                state.subscriptions.remove(&filter);
                shared.router.unsubscribe(&filter, SessionId(state.number));
                batch.push(StoreOp::SubscriptionDelete {
                    number: state.number,
                    filter,
                });
            }
            batch.submit();
            info!(
                %client_id,
                queued = state.outbox.depth().messages,
                "bridge no longer configured: its queue is kept and takes nothing more"
            );
        }
        shared.sessions.insert_offline(state, Instant::now());
    }
}

/// Creates or updates one bridge session `client_id` with exactly the
/// subscriptions `wanted`; one attached to its bridge (whose link runs)
/// is left as it is, with a warning.
fn ensure_session(
    shared: &Shared,
    name: &str,
    client_id: &str,
    wanted: Vec<(MqttString, SubscriptionOptions)>,
) {
    let bridge = name;
    let Ok(client_id) = MqttString::new(client_id) else {
        warn!(%bridge, "cannot name the bridge's session");
        return;
    };
    let mut batch = Batch::new(shared.store.as_ref());
    let mut state = match shared.sessions.take_offline(&client_id) {
        Some(state) => state,
        None if shared.sessions.outbox(client_id.as_str()).is_some() => {
            warn!(%bridge, %client_id, "the bridge's session is attached: its rules stay as they are");
            return;
        }
        None => {
            let number = shared.next_session_number();
            let outbox = shared.new_outbox(number);
            let mut state = SessionState::new(client_id.clone(), number, outbox);
            state.set_expiry(NEVER);
            state.stored = true;
            batch.push(StoreOp::SessionPut(
                state.record(Some(shared.clock.now_ms())),
            ));
            info!(%bridge, %client_id, "created the bridge's queue");
            state
        }
    };
    state.outbox.set_persistent(true);
    state.outbox.set_uses_reserve();
    if let Some((messages, bytes)) = shared.session_bounds(client_id.as_str()) {
        state.outbox.set_bounds(messages, bytes);
    }
    let stale: Vec<MqttString> = state
        .subscriptions
        .keys()
        .filter(|f| !wanted.iter().any(|(w, _)| w == *f))
        .cloned()
        .collect();
    for filter in stale {
        state.subscriptions.remove(&filter);
        shared.router.unsubscribe(&filter, SessionId(state.number));
        batch.push(StoreOp::SubscriptionDelete {
            number: state.number,
            filter: filter.clone(),
        });
        info!(%bridge, %filter, "rule no longer configured: unsubscribed");
    }
    let mut retained = Vec::new();
    for (filter, options) in wanted {
        let record = SubscriptionRecord {
            options,
            identifier: None,
        };
        let existing = state.subscriptions.get(&filter).copied();
        if existing == Some(record) {
            continue;
        }
        crate::subscribe::attach(shared, &mut state, &filter, record);
        batch.push(StoreOp::SubscriptionPut {
            number: state.number,
            filter: filter.clone(),
            subscription: record,
        });
        if existing.is_none() {
            retained.push((filter.clone(), options.qos));
        }
    }
    batch.submit();
    let outbox = state.outbox.clone();
    shared.sessions.insert_offline(state, Instant::now());
    for (filter, granted) in retained {
        publish::queue_retained(shared, &outbox, &filter, granted);
    }
}
