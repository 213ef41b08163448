//! The forwarding policy of one bridge as a state machine without I/O:
//! which of the messages taken from the local queues goes upstream next,
//! when, and what becomes of each once the upstream answered.
//! [`super::Runner`] feeds it the messages it takes from the local
//! queues, the connection's start and end, the upstream's
//! acknowledgements and the time; it puts the publishes handed out by
//! [`Forwarder::next_publish`] on the uplink and reports how each went,
//! waits until [`Forwarder::wake_at`], and performs the [`Action`]s. The
//! tests here drive it alone.
//!
//! The rules it keeps:
//! - Each lane is one FIFO, sent in queue order; after a reconnect every
//!   message not acknowledged goes again, in order, from the oldest.
//! - A message is acknowledged locally ([`Action::Forwarded`]) only once
//!   the upstream acknowledged it (or, at QoS 0, once it is sent); until
//!   then it stays in the local queue on disk.
//! - At most the local window is taken from each lane; sends go while the
//!   uplink's in-flight window has room, the live lane first, then the
//!   backlog, within one pace; 0x97 (quota exceeded) pauses everything.
//! - With ferry batches granted, consecutive messages go as one batch of
//!   at most `batch_size` / `batch_bytes`; with `batch_linger_ms` the
//!   backlog's batch that is not full waits for more (the live lane never
//!   waits). Without them (plain MQTT, or an upstream that did not grant
//!   batches) each message is one PUBLISH.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use ferrymq_broker::{MESSAGE_ID_PROPERTY, MessageId, REPLAY_PREFIX, Received, ferry};
use ferrymq_codec::{MqttString, Publish, QoS, ReasonCode, topic};
use ferrymq_config::{Bridge, BridgeKind, Direction, Lane};
use tokio::time::Instant;

use super::qos;
use crate::pace::{Backoff, Pace, Rng};
use crate::uplink::RequestError;

/// The lanes in the order every turn serves them.
const LANES: [Lane; 2] = [Lane::Live, Lane::Backlog];

/// After an upstream "quota exceeded" (0x97), at least this long without
/// sending.
const QUOTA_PAUSE_MIN: Duration = Duration::from_millis(100);

/// What the owner does for the policy, in the order returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// The upstream has it (or took it at QoS 0): acknowledge it to the
    /// lane's local session, count it forwarded.
    Forwarded(Lane, Received),
    /// It goes nowhere: acknowledge it locally, count it.
    Dropped(Lane, Received, Gone),
    /// The upstream will never take it: keep it as a dead letter (for
    /// this reason), then acknowledge it locally.
    DeadLetter(Lane, Received, String),
    /// The upstream is over quota (0x97): nothing is sent for this long.
    Paused(Duration),
}

/// Why a queued message is not sent up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gone {
    /// Its Message Expiry Interval ran out while it waited here.
    Expired,
    /// It waited longer than its rule's `max_age_secs`.
    TooOld,
}

/// The messages of the backlog lane that the forwarder holds (status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pending {
    pub messages: u64,
    pub bytes: u64,
    /// When the oldest of them was queued (broker ms).
    pub oldest_queued_ms: Option<u64>,
}

/// The forwarding state of one bridge: both lanes' outboxes (kept across
/// connections) and the sending state of the current connection.
pub(crate) struct Forwarder {
    /// Forward rules (the upstream topic and QoS, `max_age_secs`), the
    /// batch limits, the window and the pace.
    config: Bridge,
    /// Messages a lane takes from its local queue at most.
    capacity: usize,
    backlog: Outbox,
    /// The live lane's outbox, when the bridge has one.
    live: Option<Outbox>,
    /// Waits after an upstream "quota exceeded" (0x97); reset by the next
    /// acknowledgement that is not a refusal, on any connection.
    quota: Backoff,
    /// The connection's sending state (`None`: no connection).
    link: Option<Link>,
    /// What the owner has to do, oldest first.
    actions: VecDeque<Action>,
}

/// The sending state of one upstream connection.
struct Link {
    /// The upstream granted ferry batches.
    batches: bool,
    /// Starts (its ramp) when the connection does.
    pace: Pace,
    /// No sending before this (0x97).
    paused_until: Option<Instant>,
    /// The pace allows the next message at this time.
    paced_until: Option<Instant>,
    /// The backlog's batch that is not full waits until this time;
    /// decided anew every turn.
    linger_until: Option<Instant>,
    /// The turn's time.
    now: Instant,
    /// The turn's time on the broker clock (`max_age_secs`).
    broker_ms: u64,
    /// Index in [`LANES`] of the lane being sent (`LANES.len()`: done).
    lane: usize,
    /// The publish handed out and not yet answered.
    sending: Option<Sending>,
}

/// A publish handed out by [`Forwarder::next_publish`].
struct Sending {
    lane: Lane,
    what: Sent,
}

enum Sent {
    /// One message, at QoS 0 or 1.
    One { key: u64, at_most_once: bool },
    /// A ferry batch; `paced` when the pace ran out after it.
    Batch {
        keys: Vec<u64>,
        paced: Option<Instant>,
    },
}

impl Forwarder {
    /// The policy of `config`'s bridge, with a live lane when `live`;
    /// `rng` draws the 0x97 back-off.
    pub(crate) fn new(config: &Bridge, live: bool, rng: Rng) -> Forwarder {
        Forwarder {
            capacity: local_window(config),
            quota: Backoff::new(config.reconnect_min, config.reconnect_max, rng),
            config: config.clone(),
            backlog: Outbox::default(),
            live: live.then(Outbox::default),
            link: None,
            actions: VecDeque::new(),
        }
    }

    fn outbox(&mut self, lane: Lane) -> Option<&mut Outbox> {
        match lane {
            Lane::Backlog => Some(&mut self.backlog),
            Lane::Live => self.live.as_mut(),
        }
    }

    /// Whether `lane` takes another message from its local queue (never
    /// for a lane the bridge does not have).
    pub(crate) fn has_room(&self, lane: Lane) -> bool {
        let outbox = match lane {
            Lane::Backlog => Some(&self.backlog),
            Lane::Live => self.live.as_ref(),
        };
        outbox.is_some_and(|o| o.entries.len() < self.capacity)
    }

    /// A message from `lane`'s local queue (the backlog's for a lane the
    /// bridge does not have), taken at `now`: its Message Expiry Interval
    /// counts on from then. Returns its key, in queue order.
    pub(crate) fn take(&mut self, lane: Lane, received: Received, now: Instant) -> u64 {
        match self.outbox(lane) {
            Some(outbox) => outbox.push(received, now),
            None => self.backlog.push(received, now),
        }
    }

    /// A new upstream connection at `now` (`batches`: it granted ferry
    /// batches): nothing is sent on it yet, the pace starts again.
    pub(crate) fn connected(&mut self, batches: bool, now: Instant) {
        self.link = Some(Link {
            batches,
            pace: Pace::new(self.config.drain_rate, self.config.ramp, now),
            paused_until: None,
            paced_until: None,
            linger_until: None,
            now,
            broker_ms: 0,
            lane: LANES.len(),
            sending: None,
        });
    }

    /// The connection ended: what it had in flight is unsent again, to go
    /// first, in order, on the next one. Nothing is acknowledged locally.
    pub(crate) fn disconnected(&mut self) {
        self.link = None;
        self.backlog.reset();
        if let Some(live) = &mut self.live {
            live.reset();
        }
    }

    /// Whether the connection sends ferry batches (one batch a PUBLISH).
    pub(crate) fn batches(&self) -> bool {
        self.link.as_ref().is_some_and(|l| l.batches)
    }

    /// Starts a turn of sending at `now` (`broker_ms` on the broker
    /// clock): a pause or pace wait that is over ends.
    pub(crate) fn begin_turn(&mut self, now: Instant, broker_ms: u64) {
        let Some(link) = &mut self.link else {
            return;
        };
        if link.paused_until.is_some_and(|t| t <= now) {
            link.paused_until = None;
        }
        if link.paced_until.is_some_and(|t| t <= now) {
            link.paced_until = None;
        }
        link.linger_until = None;
        link.now = now;
        link.broker_ms = broker_ms;
        link.lane = 0;
        link.sending = None;
    }

    /// The next PUBLISH of this turn, `can_publish` being whether the
    /// uplink has room for one; `None` when the turn is over. The owner
    /// answers each with [`Forwarder::published`] before asking again.
    pub(crate) fn next_publish(&mut self, can_publish: bool) -> Option<Publish> {
        let Forwarder {
            config,
            backlog,
            live,
            link,
            actions,
            ..
        } = self;
        let link = link.as_mut().filter(|l| l.sending.is_none())?;
        while let Some(&lane) = LANES.get(link.lane) {
            let outbox = match lane {
                Lane::Backlog => Some(&mut *backlog),
                Lane::Live => live.as_mut(),
            };
            if let Some(outbox) = outbox
                && link.may_send(can_publish)
            {
                let next = if link.batches {
                    link.next_batch(config, outbox, lane, actions)
                } else {
                    link.next_one(config, outbox, lane, actions)
                };
                if next.is_some() {
                    return next;
                }
            }
            link.lane += 1;
        }
        None
    }

    /// How the uplink took the last publish: its packet id, or why not.
    pub(crate) fn published(&mut self, result: Result<u16, RequestError>) {
        let Some(sending) = self.link.as_mut().and_then(|l| l.sending.take()) else {
            return;
        };
        let lane = sending.lane;
        let Forwarder {
            backlog,
            live,
            link,
            actions,
            ..
        } = self;
        let (Some(link), Some(outbox)) = (
            link.as_mut(),
            match lane {
                Lane::Backlog => Some(backlog),
                Lane::Live => live.as_mut(),
            },
        ) else {
            return;
        };
        match (sending.what, result) {
            // The window or the output buffer is full: the lane waits.
            (_, Err(RequestError::WindowFull { .. } | RequestError::OutputFull { .. })) => {
                link.lane += 1;
            }
            (Sent::One { key, at_most_once }, Ok(packet_id)) => {
                if !at_most_once {
                    outbox.mark_sent(key, packet_id);
                } else if let Some(entry) = outbox.remove(key) {
                    outbox.first_unsent = key + 1;
                    actions.push_back(Action::Forwarded(lane, entry.received));
                }
            }
            (Sent::One { key, .. }, Err(e)) => {
                // This message can never go to this upstream (too large, a
                // QoS or retain it does not support).
                if let Some(entry) = outbox.remove(key) {
                    actions.push_back(Action::DeadLetter(lane, entry.received, e.to_string()));
                }
            }
            (Sent::Batch { keys, paced }, Ok(packet_id)) => {
                outbox.mark_batch_sent(keys, packet_id);
                if paced.is_some() {
                    link.paced_until = paced;
                    link.lane += 1;
                }
            }
            (Sent::Batch { keys, .. }, Err(e)) => {
                // Larger than the upstream takes (batch_bytes above its
                // Maximum Packet Size): each goes to the dead letters
                // rather than blocking the queue.
                let why = format!("a ferry batch the upstream cannot take: {e}");
                for key in keys {
                    if let Some(entry) = outbox.remove(key) {
                        actions.push_back(Action::DeadLetter(lane, entry.received, why.clone()));
                    }
                }
            }
        }
    }

    /// The upstream acknowledged what went under `packet_id` (at `now`):
    /// acknowledged locally; 0x97 sends it again after a pause; another
    /// refusal dead-letters it.
    pub(crate) fn acked(
        &mut self,
        packet_id: u16,
        reason_code: ReasonCode,
        reason_string: Option<String>,
        now: Instant,
    ) {
        let lane = match &self.live {
            Some(live) if live.owns(packet_id) => Lane::Live,
            _ => Lane::Backlog,
        };
        let Forwarder {
            backlog,
            live,
            link,
            actions,
            quota,
            ..
        } = self;
        let outbox = match lane {
            Lane::Live => live.as_mut().unwrap_or(backlog),
            Lane::Backlog => backlog,
        };
        if reason_code == ReasonCode::QUOTA_EXCEEDED {
            // Kept; it goes again after the pause.
            outbox.unsend(packet_id);
            let delay = quota.next_delay().max(QUOTA_PAUSE_MIN);
            if let Some(link) = link {
                link.paused_until = Some(now + delay);
            }
            actions.push_back(Action::Paused(delay));
            return;
        }
        let entries = outbox.take_all(packet_id);
        if reason_code.is_error() {
            let why = format!(
                "refused by the upstream: {reason_code}{}",
                reason_string.map(|s| format!(" ({s})")).unwrap_or_default()
            );
            for entry in entries {
                actions.push_back(Action::DeadLetter(lane, entry.received, why.clone()));
            }
        } else {
            quota.reset();
            for entry in entries {
                actions.push_back(Action::Forwarded(lane, entry.received));
            }
        }
    }

    /// When sending may go on without an event from the upstream or the
    /// local queues: a pause, the pace or a lingering batch ends.
    pub(crate) fn wake_at(&self) -> Option<Instant> {
        let link = self.link.as_ref()?;
        [link.paused_until, link.paced_until, link.linger_until]
            .into_iter()
            .flatten()
            .min()
    }

    /// The next thing to do, oldest first.
    pub(crate) fn next_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// What the backlog lane holds (taken, not acknowledged upstream).
    pub(crate) fn pending(&self) -> Pending {
        Pending {
            messages: self.backlog.entries.len() as u64,
            bytes: self.backlog.bytes,
            // Entries are in queue order: the first was queued first.
            oldest_queued_ms: self
                .backlog
                .entries
                .values()
                .next()
                .and_then(|e| e.received.queued_ms),
        }
    }
}

impl Link {
    fn may_send(&self, can_publish: bool) -> bool {
        self.paused_until.is_none() && self.paced_until.is_none() && can_publish
    }

    /// The next unsent message of `outbox` as one PUBLISH, within the
    /// pace; `None` when the lane has nothing more to send now. Messages
    /// that expired or aged out on the way are dropped.
    fn next_one(
        &mut self,
        config: &Bridge,
        outbox: &mut Outbox,
        lane: Lane,
        actions: &mut VecDeque<Action>,
    ) -> Option<Publish> {
        loop {
            let (key, entry) = outbox.next_unsent()?;
            if let Err(at) = self.pace.take(self.now) {
                self.paced_until = Some(at);
                return None;
            }
            match upstream_publish(config, entry, self.now, self.broker_ms) {
                Ok(publish) => {
                    let at_most_once = publish.qos == QoS::AtMostOnce;
                    self.sending = Some(Sending {
                        lane,
                        what: Sent::One { key, at_most_once },
                    });
                    return Some(publish);
                }
                Err(gone) => {
                    outbox.first_unsent = key + 1;
                    if let Some(entry) = outbox.remove(key) {
                        actions.push_back(Action::Dropped(lane, entry.received, gone));
                    }
                }
            }
        }
    }

    /// The next unsent messages of `outbox` (up to `batch_size` messages
    /// and `batch_bytes`, each within the pace) as one ferry batch;
    /// `None` when the lane sends nothing more now.
    fn next_batch(
        &mut self,
        config: &Bridge,
        outbox: &mut Outbox,
        lane: Lane,
        actions: &mut VecDeque<Action>,
    ) -> Option<Publish> {
        let (max_count, max_bytes) = (
            usize::from(config.batch_size),
            usize::try_from(config.batch_bytes).unwrap_or(usize::MAX),
        );
        // The live lane never waits for a fuller batch.
        let linger = match lane {
            Lane::Live => Duration::ZERO,
            Lane::Backlog => config.batch_linger,
        };
        if let Some(at) = outbox.linger_until(linger, max_count, max_bytes, self.now) {
            self.linger_until = Some(at);
            return None;
        }
        let mut records = Vec::new();
        let mut keys = Vec::new();
        let mut gone = Vec::new();
        let mut bytes = 0usize;
        let mut paced = None;
        for (&key, entry) in outbox.entries.range(outbox.first_unsent..) {
            if entry.sent.is_some() {
                continue;
            }
            if records.len() >= max_count {
                break;
            }
            let publish = match upstream_publish(config, entry, self.now, self.broker_ms) {
                Ok(publish) => publish,
                Err(why) => {
                    gone.push((key, why));
                    continue;
                }
            };
            let record = ferry::BatchRecord {
                id: message_id(&entry.received),
                topic: publish.topic,
                qos: publish.qos,
                retain: publish.retain,
                properties: publish.properties,
                payload: publish.payload,
            };
            let size = ferry::record_size(&record);
            if !records.is_empty() && bytes + size > max_bytes {
                break;
            }
            if let Err(at) = self.pace.take(self.now) {
                paced = Some(at);
                break;
            }
            bytes += size;
            records.push(record);
            keys.push(key);
        }
        for (key, why) in gone {
            if let Some(entry) = outbox.remove(key) {
                actions.push_back(Action::Dropped(lane, entry.received, why));
            }
        }
        if records.is_empty() {
            if paced.is_some() {
                self.paced_until = paced;
            }
            return None;
        }
        self.sending = Some(Sending {
            lane,
            what: Sent::Batch { keys, paced },
        });
        Some(Publish {
            qos: QoS::AtLeastOnce,
            topic: MqttString::from_static(ferry::BATCH_TOPIC),
            payload: ferry::encode_batch(&records),
            ..Publish::default()
        })
    }
}

/// How many messages the bridge takes from a local queue at a time: the
/// in-flight window, in batches with `kind = "ferrymq"`.
pub(super) fn local_window(config: &Bridge) -> usize {
    match config.kind {
        BridgeKind::Mqtt => usize::from(config.inflight),
        BridgeKind::Ferrymq => (usize::from(config.inflight) * usize::from(config.batch_size))
            .clamp(1, usize::from(u16::MAX)),
    }
}

/// The PUBLISH for the upstream: topic remapped, QoS at most 1, the
/// message id and all properties kept, the Message Expiry Interval
/// reduced by the time it waited here; why not, when it expired or
/// waited longer than its rule's `max_age_secs` (`broker_ms`: now on the
/// broker clock).
fn upstream_publish(
    config: &Bridge,
    entry: &Entry,
    now: Instant,
    broker_ms: u64,
) -> Result<Publish, Gone> {
    let received = &entry.received;
    let (topic, rule_qos, max_age) = outbound_route(config, received.topic.as_str());
    if let (Some(max_age), Some(queued_ms)) = (max_age, received.queued_ms) {
        let waited = broker_ms.saturating_sub(queued_ms);
        if u128::from(waited) > max_age.as_millis() {
            return Err(Gone::TooOld);
        }
    }
    let mut properties = received.properties.clone();
    properties.subscription_identifiers.clear();
    properties.topic_alias = None;
    if let Some(interval) = properties.message_expiry_interval {
        let waited = now.saturating_duration_since(entry.taken).as_secs();
        let left = u64::from(interval)
            .checked_sub(waited)
            .filter(|l| *l > 0)
            .ok_or(Gone::Expired)?;
        properties.message_expiry_interval = Some(u32::try_from(left).unwrap_or(u32::MAX));
    }
    Ok(Publish {
        dup: false,
        qos: received.qos.min(rule_qos).min(QoS::AtLeastOnce),
        retain: received.retain,
        topic,
        packet_id: 0,
        payload: received.payload.clone(),
        properties,
    })
}

/// The upstream topic and QoS of a local topic (the first `out` rule
/// that matches), and the rule's `max_age_secs`.
pub(super) fn outbound_route(config: &Bridge, local: &str) -> (MqttString, QoS, Option<Duration>) {
    // A replayed dead letter: routed as its original topic.
    let replay = format!("{REPLAY_PREFIX}{}/", config.name);
    let local = local.strip_prefix(&replay).unwrap_or(local);
    for rule in config
        .forward
        .iter()
        .filter(|r| r.direction != Direction::In)
    {
        let filter = format!("{}{}", rule.local_prefix, rule.filter);
        if topic::matches(&filter, local) {
            let rest = local.strip_prefix(&rule.local_prefix).unwrap_or(local);
            let remote = format!("{}{rest}", rule.remote_prefix);
            if let Ok(t) = MqttString::new(&remote) {
                return (t, qos(rule.qos), rule.max_age);
            }
        }
    }
    // Matched a subscription of an earlier config: send it unchanged.
    (
        MqttString::new(local).unwrap_or_default(),
        QoS::AtLeastOnce,
        None,
    )
}

/// The id the local broker gave a queued message (`ferry-id`).
fn message_id(received: &Received) -> Option<MessageId> {
    received
        .properties
        .user_properties
        .iter()
        .find(|(k, _)| k.as_str() == MESSAGE_ID_PROPERTY)
        .and_then(|(_, v)| v.as_str().parse().ok())
}

/// A message from the local queue on its way upstream.
struct Entry {
    received: Received,
    /// Its upstream packet id on the current connection, once sent.
    sent: Option<u16>,
    /// Its payload size (status).
    size: u64,
    /// When the bridge took it (its Message Expiry Interval counts on).
    taken: Instant,
}

/// The messages taken from one lane's local queue and not yet
/// acknowledged upstream, in queue order (at most the local window).
#[derive(Default)]
struct Outbox {
    entries: BTreeMap<u64, Entry>,
    next_key: u64,
    /// Upstream packet id -> entry.
    by_packet_id: HashMap<u16, u64>,
    /// Upstream packet id -> the entries of a ferry batch.
    batches: HashMap<u16, Vec<u64>>,
    /// The first entry not sent on this connection.
    first_unsent: u64,
    /// The payload bytes of the entries (for the status, without walking
    /// them: with `kind = "ferrymq"` there are thousands).
    bytes: u64,
}

impl Outbox {
    fn push(&mut self, received: Received, now: Instant) -> u64 {
        let size = received.payload.len() as u64;
        self.bytes += size;
        let key = self.next_key;
        self.entries.insert(
            key,
            Entry {
                received,
                sent: None,
                size,
                taken: now,
            },
        );
        self.next_key += 1;
        key
    }

    /// With `linger` (`batch_linger_ms`): until when the unsent entries,
    /// fewer than a full batch of `max_count` messages and `max_bytes`
    /// payload bytes, wait for more; `None` when they go now.
    fn linger_until(
        &self,
        linger: Duration,
        max_count: usize,
        max_bytes: usize,
        now: Instant,
    ) -> Option<Instant> {
        if linger.is_zero() {
            return None;
        }
        let mut unsent = self
            .entries
            .range(self.first_unsent..)
            .map(|(_, e)| e)
            .filter(|e| e.sent.is_none());
        let first = unsent.next()?;
        let (mut count, mut bytes) = (1, first.size);
        for entry in unsent {
            count += 1;
            bytes += entry.size;
            if count >= max_count || bytes >= max_bytes as u64 {
                return None;
            }
        }
        Some(first.taken + linger).filter(|at| *at > now && count < max_count)
    }

    fn next_unsent(&self) -> Option<(u64, &Entry)> {
        self.entries
            .range(self.first_unsent..)
            .find(|(_, e)| e.sent.is_none())
            .map(|(k, e)| (*k, e))
    }

    fn mark_sent(&mut self, key: u64, packet_id: u16) {
        if let Some(e) = self.entries.get_mut(&key) {
            e.sent = Some(packet_id);
            self.by_packet_id.insert(packet_id, key);
        }
        self.first_unsent = key + 1;
    }

    /// The entry sent under `packet_id`, taken out.
    fn take(&mut self, packet_id: u16) -> Option<Entry> {
        let key = self.by_packet_id.remove(&packet_id)?;
        self.remove(key)
    }

    /// Whether a message (or batch) of this outbox is in flight under
    /// `packet_id`.
    fn owns(&self, packet_id: u16) -> bool {
        self.by_packet_id.contains_key(&packet_id) || self.batches.contains_key(&packet_id)
    }

    /// The entry at `key`, taken out.
    fn remove(&mut self, key: u64) -> Option<Entry> {
        let entry = self.entries.remove(&key)?;
        self.bytes -= entry.size;
        Some(entry)
    }

    /// Marks `keys` sent as one ferry batch under `packet_id`.
    fn mark_batch_sent(&mut self, keys: Vec<u64>, packet_id: u16) {
        for &key in &keys {
            if let Some(e) = self.entries.get_mut(&key) {
                e.sent = Some(packet_id);
            }
            self.first_unsent = self.first_unsent.max(key + 1);
        }
        self.batches.insert(packet_id, keys);
    }

    /// The entries sent under `packet_id` (one, or a batch's), taken out.
    fn take_all(&mut self, packet_id: u16) -> Vec<Entry> {
        match self.batches.remove(&packet_id) {
            Some(keys) => keys.iter().filter_map(|&key| self.remove(key)).collect(),
            None => self.take(packet_id).into_iter().collect(),
        }
    }

    /// Back to unsent, to be sent again (after a refusal to retry).
    fn unsend(&mut self, packet_id: u16) {
        let keys = match self.batches.remove(&packet_id) {
            Some(keys) => keys,
            None => self.by_packet_id.remove(&packet_id).into_iter().collect(),
        };
        for key in keys {
            if let Some(e) = self.entries.get_mut(&key) {
                e.sent = None;
            }
            self.first_unsent = self.first_unsent.min(key);
        }
    }

    /// A new connection: nothing is sent on it yet.
    fn reset(&mut self) {
        self.by_packet_id.clear();
        self.batches.clear();
        for e in self.entries.values_mut() {
            e.sent = None;
        }
        self.first_unsent = self.entries.keys().next().copied().unwrap_or(self.next_key);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use bytes::Bytes;
    use ferrymq_codec::PublishProperties;
    use ferrymq_config::Forward;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A bridge forwarding everything (`#`) at QoS 1, without a pace.
    fn bridge(kind: BridgeKind, inflight: u16) -> Bridge {
        Bridge {
            name: "regional".into(),
            kind,
            inflight,
            ramp: Duration::ZERO,
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(2),
            forward: vec![Forward {
                filter: "#".into(),
                ..Forward::default()
            }],
            ..Bridge::default()
        }
    }

    /// A queued QoS 1 message on `data/t` whose payload is its name.
    fn message(name: &str) -> Received {
        Received {
            topic: MqttString::from_static("data/t"),
            payload: Bytes::copy_from_slice(name.as_bytes()),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: PublishProperties::default(),
            dup: false,
            packet_id: 0,
            queued_ms: Some(0),
        }
    }

    fn name(payload: &[u8]) -> String {
        String::from_utf8_lossy(payload).into_owned()
    }

    /// The uplink as the policy sees it: a window of publishes in flight
    /// (packet ids from 1 on each connection), and a packet size limit.
    struct Upstream {
        window: usize,
        in_flight: Vec<u16>,
        next_id: u16,
        max_payload: usize,
        /// Refuses the next publish as if its output buffer were full.
        output_full: bool,
    }

    impl Upstream {
        fn new(window: usize) -> Upstream {
            Upstream {
                window,
                in_flight: Vec::new(),
                next_id: 0,
                max_payload: usize::MAX,
                output_full: false,
            }
        }

        fn can_publish(&self) -> bool {
            self.in_flight.len() < self.window
        }

        /// What went up, named: `a` for one message, `[a b]` for a batch.
        fn publish(&mut self, publish: &Publish) -> (Result<u16, RequestError>, String) {
            let what = if publish.topic.as_str() == ferry::BATCH_TOPIC {
                let records = ferry::decode_batch(&publish.payload, usize::MAX).unwrap();
                let names: Vec<String> = records.iter().map(|r| name(&r.payload)).collect();
                format!("[{}]", names.join(" "))
            } else {
                name(&publish.payload)
            };
            if std::mem::take(&mut self.output_full) {
                return (Err(RequestError::OutputFull { limit: 0 }), what);
            }
            if !self.can_publish() {
                let window = self.window;
                return (Err(RequestError::WindowFull { window }), what);
            }
            if publish.payload.len() > self.max_payload {
                let error = RequestError::PacketTooLarge {
                    size: publish.payload.len(),
                    max: u32::try_from(self.max_payload).unwrap(),
                };
                return (Err(error), what);
            }
            if publish.qos == QoS::AtMostOnce {
                return (Ok(0), what);
            }
            self.next_id += 1;
            self.in_flight.push(self.next_id);
            (Ok(self.next_id), what)
        }
    }

    /// A forwarder on a connection to an [`Upstream`], on a clock of its
    /// own (`t0` plus what the test advanced).
    struct Harness {
        forward: Forwarder,
        up: Upstream,
        t0: Instant,
        now: Instant,
    }

    impl Harness {
        /// Connected, `batches` granted, an upstream window of `window`.
        fn new(config: &Bridge, live: bool, window: usize, batches: bool) -> Harness {
            let t0 = Instant::now();
            let mut forward = Forwarder::new(config, live, Rng::seeded(7));
            forward.connected(batches, t0);
            Harness {
                forward,
                up: Upstream::new(window),
                t0,
                now: t0,
            }
        }

        fn take(&mut self, lane: Lane, names: &[&str]) {
            for n in names {
                assert!(self.forward.has_room(lane), "no room for {n}");
                self.forward.take(lane, message(n), self.now);
            }
        }

        /// Takes `received` whatever it is.
        fn take_message(&mut self, lane: Lane, received: Received) {
            self.forward.take(lane, received, self.now);
        }

        /// How many more the lane takes from its local queue.
        fn room(&mut self, lane: Lane) -> usize {
            let mut n = 0;
            while self.forward.has_room(lane) {
                self.forward
                    .take(lane, message(&format!("room{n}")), self.now);
                n += 1;
            }
            n
        }

        fn advance(&mut self, by: Duration) {
            self.now += by;
        }

        /// One turn of sending at `now` (the broker clock at
        /// `broker_ms`): what the upstream took, in order.
        fn turn_at_broker_ms(&mut self, broker_ms: u64) -> Vec<String> {
            self.forward.begin_turn(self.now, broker_ms);
            let mut sent = Vec::new();
            while let Some(publish) = self.forward.next_publish(self.up.can_publish()) {
                let (result, what) = self.up.publish(&publish);
                if result.is_ok() {
                    sent.push(what);
                }
                self.forward.published(result);
            }
            sent
        }

        fn turn(&mut self) -> Vec<String> {
            self.turn_at_broker_ms(0)
        }

        /// The upstream acknowledges `packet_id` with `code`.
        fn ack(&mut self, packet_id: u16, code: ReasonCode) -> Vec<String> {
            self.up.in_flight.retain(|id| *id != packet_id);
            self.forward.acked(packet_id, code, None, self.now);
            self.actions()
        }

        fn ok(&mut self, packet_id: u16) -> Vec<String> {
            self.ack(packet_id, ReasonCode::SUCCESS)
        }

        /// The link drops and a new connection (ids from 1) comes up.
        fn reconnect(&mut self, batches: bool) {
            self.forward.disconnected();
            self.forward.connected(batches, self.now);
            self.up = Upstream::new(self.up.window);
        }

        /// What the owner has to do, named.
        fn actions(&mut self) -> Vec<String> {
            std::iter::from_fn(|| self.forward.next_action())
                .map(|action| match action {
                    Action::Forwarded(lane, m) => {
                        format!("forwarded{} {}", on(lane), name(&m.payload))
                    }
                    Action::Dropped(lane, m, gone) => {
                        format!("dropped{} {} ({gone:?})", on(lane), name(&m.payload))
                    }
                    Action::DeadLetter(lane, m, why) => {
                        format!("dead{} {}: {why}", on(lane), name(&m.payload))
                    }
                    Action::Paused(_) => "paused".to_owned(),
                })
                .collect()
        }
    }

    fn on(lane: Lane) -> &'static str {
        match lane {
            Lane::Live => " live",
            Lane::Backlog => "",
        }
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn messages_go_up_in_queue_order_and_leave_the_local_queue_only_when_acknowledged() {
        for batches in [false, true] {
            let config = bridge(BridgeKind::Ferrymq, 10);
            let mut h = Harness::new(&config, false, 10, batches);
            h.take(Lane::Backlog, &["a", "b", "c"]);
            let sent = h.turn();
            let expected = if batches {
                names(&["[a b c]"])
            } else {
                names(&["a", "b", "c"])
            };
            assert_eq!(sent, expected, "batches: {batches}");
            // Sent, not acknowledged: nothing leaves the local queue.
            assert!(h.actions().is_empty());
            assert_eq!(h.forward.pending().messages, 3);
            if batches {
                assert_eq!(
                    h.ok(1),
                    names(&["forwarded a", "forwarded b", "forwarded c"])
                );
            } else {
                assert_eq!(h.ok(2), names(&["forwarded b"]));
                assert_eq!(h.ok(1), names(&["forwarded a"]));
                assert_eq!(h.ok(3), names(&["forwarded c"]));
            }
            assert_eq!(h.forward.pending().messages, 0);
            // Nothing is sent twice on one connection.
            assert!(h.turn().is_empty());
        }
    }

    #[test]
    fn after_a_link_loss_what_was_in_flight_goes_again_in_order_and_nothing_is_acknowledged() {
        // (batches, messages, first connection, the upstream acknowledges
        //  its second publish, what goes again after the reconnect, and
        //  their acknowledgements)
        type Case<'a> = (
            bool,
            &'a [&'a str],
            &'a [&'a str],
            &'a [&'a str],
            &'a [&'a str],
        );
        let cases: [Case; 2] = [
            (
                false,
                &["a", "b", "c", "d"],
                &["a", "b", "c"],
                &["forwarded b"],
                &["a", "c", "d"],
            ),
            (
                true,
                &["a", "b", "c", "d", "e", "f"],
                &["[a b]", "[c d]", "[e f]"],
                &["forwarded c", "forwarded d"],
                &["[a b]", "[e f]"],
            ),
        ];
        for (batches, messages, first, acked, again) in cases {
            let mut config = bridge(BridgeKind::Ferrymq, 10);
            config.batch_size = 2;
            let mut h = Harness::new(&config, false, 3, batches);
            h.take(Lane::Backlog, messages);
            assert_eq!(h.turn(), names(first), "batches: {batches}");
            assert_eq!(h.ok(2), names(acked), "batches: {batches}");
            h.reconnect(batches);
            assert!(h.actions().is_empty(), "acknowledged without the upstream");
            assert_eq!(h.turn(), names(again), "batches: {batches}");
            let mut forwarded = Vec::new();
            for id in 1..=u16::try_from(again.len()).unwrap() {
                forwarded.extend(h.ok(id));
            }
            let rest: Vec<String> = messages
                .iter()
                .filter(|m| !acked.contains(&format!("forwarded {m}").as_str()))
                .map(|m| format!("forwarded {m}"))
                .collect();
            assert_eq!(forwarded, rest, "batches: {batches}");
            assert_eq!(h.forward.pending().messages, 0);
        }
    }

    #[test]
    fn the_window_bounds_what_is_taken_locally_and_what_is_in_flight_upstream() {
        // (kind, inflight, batch_size, upstream window, batches granted,
        //  taken, sent in the first turn)
        let cases = [
            (BridgeKind::Mqtt, 3, 500, 10, false, 3, 3),
            (BridgeKind::Mqtt, 5, 500, 2, false, 5, 2),
            (BridgeKind::Ferrymq, 2, 3, 2, true, 6, 2),
            // Not granted: the local window is still in batches, each
            // message one PUBLISH in the upstream window.
            (BridgeKind::Ferrymq, 2, 3, 2, false, 6, 2),
        ];
        for (kind, inflight, batch_size, window, batches, taken, sent) in cases {
            let mut config = bridge(kind, inflight);
            config.batch_size = batch_size;
            let mut h = Harness::new(&config, false, window, batches);
            let case = format!("{kind:?} inflight {inflight} window {window}");
            assert_eq!(h.room(Lane::Backlog), taken, "{case}");
            assert!(!h.forward.has_room(Lane::Live), "no live lane");
            assert_eq!(h.turn().len(), sent, "{case}");
            assert_eq!(h.up.in_flight.len(), sent, "{case}");
            // Full: nothing more until an acknowledgement frees room.
            assert!(h.turn().is_empty(), "{case}");
            let freed = h.ok(1).len();
            assert!(freed >= 1, "{case}");
            assert_eq!(h.room(Lane::Backlog), freed, "{case}");
            assert_eq!(h.turn().len(), 1, "{case}");
        }
    }

    #[test]
    fn a_full_uplink_keeps_the_message_for_the_next_turn() {
        for batches in [false, true] {
            let mut h = Harness::new(&bridge(BridgeKind::Ferrymq, 10), false, 10, batches);
            h.take(Lane::Backlog, &["a", "b"]);
            h.up.output_full = true;
            assert!(h.turn().is_empty(), "batches: {batches}");
            assert!(h.actions().is_empty());
            let expected = if batches {
                names(&["[a b]"])
            } else {
                names(&["a", "b"])
            };
            assert_eq!(h.turn(), expected, "batches: {batches}");
        }
    }

    #[test]
    fn batches_hold_at_most_batch_size_messages_and_batch_bytes() {
        // Each record here is 111 + 6 (topic) + 1 (payload) = 118 bytes.
        // (batch_size, batch_bytes, batches)
        let cases: [(u16, u64, &[&str]); 4] = [
            (500, 256 << 10, &["[a b c d e]"]),
            (2, 256 << 10, &["[a b]", "[c d]", "[e]"]),
            (500, 240, &["[a b]", "[c d]", "[e]"]),
            // A record larger than batch_bytes goes alone.
            (500, 100, &["[a]", "[b]", "[c]", "[d]", "[e]"]),
        ];
        for (batch_size, batch_bytes, expected) in cases {
            let mut config = bridge(BridgeKind::Ferrymq, 10);
            config.batch_size = batch_size;
            config.batch_bytes = batch_bytes;
            let mut h = Harness::new(&config, false, 10, true);
            h.take(Lane::Backlog, &["a", "b", "c", "d", "e"]);
            assert_eq!(
                h.turn(),
                names(expected),
                "batch_size {batch_size}, batch_bytes {batch_bytes}"
            );
        }
    }

    #[test]
    fn batch_linger_holds_a_backlog_batch_that_is_not_full_until_its_first_message_waited() {
        // (lane, batch_linger_ms, messages, ms after the first was taken,
        //  sent, wake-up in ms after the first was taken)
        type Case<'a> = (Lane, u64, &'a [&'a str], u64, &'a [&'a str], Option<u64>);
        let cases: [Case; 7] = [
            (Lane::Backlog, 0, &["a", "b"], 0, &["[a b]"], None),
            (Lane::Backlog, 50, &["a", "b"], 0, &[], Some(50)),
            (Lane::Backlog, 50, &["a", "b"], 49, &[], Some(50)),
            (Lane::Backlog, 50, &["a", "b"], 50, &["[a b]"], None),
            // A full batch (batch_size 3) goes at once.
            (
                Lane::Backlog,
                50,
                &["a", "b", "c", "d"],
                0,
                &["[a b c]"],
                Some(50),
            ),
            (Lane::Backlog, 50, &["a", "b", "c"], 0, &["[a b c]"], None),
            // The live lane never waits.
            (Lane::Live, 50, &["a", "b"], 0, &["[a b]"], None),
        ];
        for (lane, linger, messages, after, sent, wake) in cases {
            let mut config = bridge(BridgeKind::Ferrymq, 10);
            config.batch_size = 3;
            config.batch_linger = Duration::from_millis(linger);
            let mut h = Harness::new(&config, true, 10, true);
            h.take(lane, messages);
            h.advance(Duration::from_millis(after));
            let case = format!("{lane:?}, linger {linger} ms, {messages:?} after {after} ms");
            assert_eq!(h.turn(), names(sent), "{case}");
            assert_eq!(
                h.forward.wake_at(),
                wake.map(|ms| h.t0 + Duration::from_millis(ms)),
                "{case}"
            );
        }
        // Payload bytes up to batch_bytes do not wait either; the batch
        // takes what fits its records (111 bytes each and more), and the
        // rest waits again.
        let mut config = bridge(BridgeKind::Ferrymq, 10);
        config.batch_linger = Duration::from_millis(50);
        config.batch_bytes = 4;
        let mut h = Harness::new(&config, false, 10, true);
        h.take(Lane::Backlog, &["abc"]);
        assert!(h.turn().is_empty());
        h.advance(MS);
        h.take(Lane::Backlog, &["d"]);
        assert_eq!(h.turn(), names(&["[abc]"]));
        assert_eq!(h.forward.wake_at(), Some(h.t0 + 51 * MS));
    }

    #[test]
    fn the_live_lane_goes_ahead_of_the_backlog_in_the_same_window() {
        // (batches, what goes up, acknowledging the first publish, the
        //  last one, what the backlog then holds)
        type Case<'a> = (bool, &'a [&'a str], &'a [&'a str], &'a [&'a str], u64);
        let cases: [Case; 2] = [
            (
                false,
                &["x", "y", "a"],
                &["forwarded live x"],
                &["forwarded a"],
                1,
            ),
            (
                true,
                &["[x y]", "[a b]"],
                &["forwarded live x", "forwarded live y"],
                &["forwarded a", "forwarded b"],
                0,
            ),
        ];
        for (batches, sent, first, last, left) in cases {
            let mut h = Harness::new(&bridge(BridgeKind::Ferrymq, 10), true, 3, batches);
            h.take(Lane::Backlog, &["a", "b"]);
            h.take(Lane::Live, &["x", "y"]);
            assert_eq!(h.turn(), names(sent), "batches: {batches}");
            // Each acknowledgement goes to the lane that sent it.
            assert_eq!(h.ok(1), names(first), "batches: {batches}");
            let id = u16::try_from(sent.len()).unwrap();
            assert_eq!(h.ok(id), names(last), "batches: {batches}");
            assert_eq!(h.forward.pending().messages, left, "batches: {batches}");
        }
    }

    #[test]
    fn quota_exceeded_pauses_sending_and_sends_the_same_message_again() {
        for batches in [false, true] {
            let mut h = Harness::new(&bridge(BridgeKind::Ferrymq, 10), false, 10, batches);
            h.take(Lane::Backlog, &["a"]);
            assert_eq!(h.turn().len(), 1);
            assert_eq!(h.ack(1, ReasonCode::QUOTA_EXCEEDED), names(&["paused"]));
            let resume = h.forward.wake_at().unwrap();
            assert!(resume >= h.now + QUOTA_PAUSE_MIN, "batches: {batches}");
            // Room in the window, a message unsent, and yet nothing goes.
            h.take(Lane::Backlog, &["b"]);
            h.advance(resume - h.now - MS);
            assert!(h.turn().is_empty(), "batches: {batches}");
            h.advance(MS);
            let expected = if batches {
                names(&["[a b]"])
            } else {
                names(&["a", "b"])
            };
            assert_eq!(h.turn(), expected, "batches: {batches}");
            let forwarded = if batches {
                names(&["forwarded a", "forwarded b"])
            } else {
                names(&["forwarded a"])
            };
            assert_eq!(h.ok(2), forwarded, "batches: {batches}");
        }
    }

    #[test]
    fn quota_pauses_grow_and_an_acknowledgement_resets_them() {
        let mut config = bridge(BridgeKind::Mqtt, 10);
        config.reconnect_min = Duration::from_secs(1);
        config.reconnect_max = Duration::from_secs(60);
        let mut h = Harness::new(&config, false, 10, false);
        let mut draws = Backoff::new(config.reconnect_min, config.reconnect_max, Rng::seeded(7));
        h.take(Lane::Backlog, &["a"]);
        let mut id = 0;
        for _ in 0..4 {
            assert_eq!(h.turn(), names(&["a"]));
            id += 1;
            let expected = draws.next_delay().max(QUOTA_PAUSE_MIN);
            h.ack(id, ReasonCode::QUOTA_EXCEEDED);
            assert_eq!(h.forward.wake_at(), Some(h.now + expected));
            h.advance(expected);
        }
        assert_eq!(h.turn(), names(&["a"]));
        assert_eq!(h.ok(id + 1), names(&["forwarded a"]));
        draws.reset();
        h.take(Lane::Backlog, &["b"]);
        assert_eq!(h.turn(), names(&["b"]));
        h.ack(id + 2, ReasonCode::QUOTA_EXCEEDED);
        let expected = draws.next_delay().max(QUOTA_PAUSE_MIN);
        assert_eq!(h.forward.wake_at(), Some(h.now + expected));
    }

    #[test]
    fn what_the_upstream_refuses_or_cannot_take_is_dead_lettered() {
        let refused = format!("refused by the upstream: {}", ReasonCode::NOT_AUTHORIZED);
        let too_large = RequestError::PacketTooLarge { size: 5, max: 3 }.to_string();
        // Plain: a refusal, then a message too large for the upstream
        // (the next one still goes).
        let mut h = Harness::new(&bridge(BridgeKind::Mqtt, 10), false, 10, false);
        h.take(Lane::Backlog, &["a"]);
        assert_eq!(h.turn(), names(&["a"]));
        h.up.in_flight.clear();
        h.forward
            .acked(1, ReasonCode::NOT_AUTHORIZED, Some("no".into()), h.now);
        assert_eq!(h.actions(), vec![format!("dead a: {refused} (no)")]);
        h.up.max_payload = 3;
        h.take(Lane::Backlog, &["large", "c"]);
        assert_eq!(h.turn(), names(&["c"]));
        assert_eq!(h.actions(), vec![format!("dead large: {too_large}")]);
        // Batches: a refused batch and one the upstream cannot take
        // dead-letter each of their messages.
        let mut h = Harness::new(&bridge(BridgeKind::Ferrymq, 10), false, 10, true);
        h.take(Lane::Backlog, &["a", "b"]);
        assert_eq!(h.turn(), names(&["[a b]"]));
        assert_eq!(
            h.ack(1, ReasonCode::NOT_AUTHORIZED),
            vec![format!("dead a: {refused}"), format!("dead b: {refused}")]
        );
        h.up.max_payload = 3;
        h.take(Lane::Backlog, &["c", "d"]);
        assert!(h.turn().is_empty());
        let actions = h.actions();
        let why = "a ferry batch the upstream cannot take: PUBLISH of ";
        assert_eq!(actions.len(), 2, "{actions:?}");
        assert!(
            actions[0].starts_with(&format!("dead c: {why}")),
            "{actions:?}"
        );
        assert!(
            actions[1].starts_with(&format!("dead d: {why}")),
            "{actions:?}"
        );
        assert_eq!(h.forward.pending().messages, 0);
    }

    #[test]
    fn expired_and_too_old_messages_are_dropped_instead_of_sent() {
        let mut config = bridge(BridgeKind::Ferrymq, 10);
        config.forward.insert(
            0,
            Forward {
                filter: "old/#".into(),
                max_age: Some(Duration::from_secs(1)),
                ..Forward::default()
            },
        );
        for batches in [false, true] {
            let mut h = Harness::new(&config, false, 10, batches);
            let expiring = |name: &str, secs| {
                let mut m = message(name);
                m.properties.message_expiry_interval = Some(secs);
                m
            };
            let (gone, kept) = (expiring("gone", 2), expiring("kept", 10));
            h.take_message(Lane::Backlog, gone);
            h.take_message(Lane::Backlog, kept);
            let mut old = message("old");
            old.topic = MqttString::from_static("old/t");
            old.queued_ms = Some(1000);
            h.take_message(Lane::Backlog, old);
            let mut young = message("young");
            young.topic = MqttString::from_static("old/t");
            young.queued_ms = Some(2000);
            h.take_message(Lane::Backlog, young);
            h.advance(Duration::from_secs(2));
            // Broker time 3.0 s: old waited 2 s, young 1 s (not more).
            let sent = h.turn_at_broker_ms(3000);
            let expected = if batches {
                names(&["[kept young]"])
            } else {
                names(&["kept", "young"])
            };
            assert_eq!(sent, expected, "batches: {batches}");
            assert_eq!(
                h.actions(),
                names(&["dropped gone (Expired)", "dropped old (TooOld)"]),
                "batches: {batches}"
            );
        }
        // What is left of an expiry interval goes up with the message.
        let mut h = Harness::new(&config, false, 10, false);
        let mut m = message("kept");
        m.properties.message_expiry_interval = Some(10);
        h.take_message(Lane::Backlog, m);
        h.advance(Duration::from_secs(3));
        h.forward.begin_turn(h.now, 0);
        let publish = h.forward.next_publish(true).unwrap();
        assert_eq!(publish.properties.message_expiry_interval, Some(7));
    }

    #[test]
    fn at_qos_0_a_message_leaves_the_local_queue_once_sent() {
        let mut config = bridge(BridgeKind::Mqtt, 10);
        config.forward[0].qos = 0;
        let mut h = Harness::new(&config, false, 1, false);
        h.take(Lane::Backlog, &["a", "b"]);
        assert_eq!(h.turn(), names(&["a", "b"]));
        assert_eq!(h.actions(), names(&["forwarded a", "forwarded b"]));
        assert!(h.up.in_flight.is_empty());
        assert_eq!(h.forward.pending().messages, 0);
    }

    #[test]
    fn a_ferry_bridge_falls_back_to_plain_publishes_when_batches_are_not_granted() {
        // (kind, batches granted, what goes up)
        let cases: [(BridgeKind, bool, &[&str]); 3] = [
            (BridgeKind::Ferrymq, true, &["[a b c]"]),
            (BridgeKind::Ferrymq, false, &["a", "b", "c"]),
            (BridgeKind::Mqtt, false, &["a", "b", "c"]),
        ];
        for (kind, batches, expected) in cases {
            let mut h = Harness::new(&bridge(kind, 10), false, 10, batches);
            h.take(Lane::Backlog, &["a", "b", "c"]);
            assert_eq!(h.turn(), names(expected), "{kind:?}, batches {batches}");
            assert_eq!(h.forward.batches(), batches);
        }
        // The next connection decides anew.
        let mut h = Harness::new(&bridge(BridgeKind::Ferrymq, 10), false, 10, false);
        h.take(Lane::Backlog, &["a", "b"]);
        assert_eq!(h.turn(), names(&["a", "b"]));
        h.reconnect(true);
        assert_eq!(h.turn(), names(&["[a b]"]));
    }

    #[test]
    fn the_pace_spaces_sends_and_wakes_the_loop_when_the_next_one_may_go() {
        for batches in [false, true] {
            let mut config = bridge(BridgeKind::Ferrymq, 10);
            config.drain_rate = 10;
            let mut h = Harness::new(&config, true, 10, batches);
            h.take(Lane::Live, &["x"]);
            h.take(Lane::Backlog, &["a", "b"]);
            let first = if batches { "[x]" } else { "x" };
            assert_eq!(h.turn(), names(&[first]), "batches: {batches}");
            // One token a tenth of a second: the backlog waits too.
            let wake = h.forward.wake_at().unwrap();
            let after = (wake - h.t0).as_secs_f64();
            assert!((after - 0.1).abs() < 1e-6, "wakes after {after} s");
            h.advance(99 * MS);
            assert!(h.turn().is_empty(), "batches: {batches}");
            h.now = wake;
            let next = if batches { "[a]" } else { "a" };
            assert_eq!(h.turn(), names(&[next]), "batches: {batches}");
        }
    }

    #[test]
    fn the_local_window_is_the_in_flight_window_in_batches_for_ferry_bridges() {
        // (kind, inflight, batch_size, messages taken at a time)
        let cases = [
            (BridgeKind::Mqtt, 100, 500, 100),
            (BridgeKind::Ferrymq, 100, 500, 50_000),
            (BridgeKind::Ferrymq, 1000, 500, usize::from(u16::MAX)),
            (BridgeKind::Ferrymq, 0, 500, 1),
        ];
        for (kind, inflight, batch_size, expected) in cases {
            let config = Bridge {
                kind,
                inflight,
                batch_size,
                ..Bridge::default()
            };
            assert_eq!(local_window(&config), expected, "{kind:?} {inflight}");
        }
    }
}
