//! One bridge: the durable session `$bridge/{name}` in the local broker
//! (its subscriptions are the `out` rules; its queue is the outbox) and
//! an [`Uplink`] to the upstream broker.
//!
//! Outbound, the local broker delivers the queued messages in order, at
//! most `inflight` unacknowledged, each stamped with its stable
//! [`MessageId`] (`ferry-id`). The bridge publishes them upstream (QoS 1
//! at most: at-least-once, the id lets consumers drop duplicates) and
//! acknowledges each to the local broker only when the upstream
//! acknowledged it; only then does it leave the queue on disk. After a
//! reconnect everything unacknowledged is sent again, in order: a message
//! can be duplicated upstream only if it was in flight when the link
//! dropped (at most the in-flight window per reconnect). One FIFO for
//! backlog and live traffic: order per origin is kept, and a live message
//! waits for the backlog ahead of it.
//!
//! Inbound, the `in` rules are subscribed upstream in a persistent session
//! (Clean Start 0, `session_expiry_secs`), so the upstream keeps what is
//! meant for this node while the link is down; each message is published
//! locally and acknowledged upstream only once the local broker made it
//! durable. Loops with `both`: No Local on the local session and on the
//! uplink (MQTT 5), and a message carrying this node's own id is never
//! taken back in.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use ferrymq_broker::ferry;
use ferrymq_broker::{
    BrokerHandle, Client, ClientError, ClientOptions, DEAD_LETTER_PREFIX, MESSAGE_ID_PROPERTY,
    MessageId, PublishAck, Publisher, REPLAY_PREFIX, Received, bridge_client_id,
    bridge_live_client_id,
};
use ferrymq_codec::{
    MqttString, Protocol, Publish, QoS, ReasonCode, RetainHandling, SubscribeProperties,
    Subscription, SubscriptionOptions, topic,
};
use ferrymq_config::{Bridge, BridgeAddress, BridgeKind, BridgeProtocol, Direction, Lane};
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::pace::{Backoff, Pace, Rng};
use crate::status::BridgeStatus;
use crate::uplink::{Event, RequestError, TlsOptions, Uplink, UplinkError, UplinkOptions};

/// While connected to a fallback address, how often the first one is
/// tried again (at least; `reconnect_max_ms` when larger, at most a minute).
const FAILBACK_PROBE_MIN: Duration = Duration::from_secs(1);
const FAILBACK_PROBE_MAX: Duration = Duration::from_secs(60);

/// A running bridge.
pub struct BridgeHandle {
    shared: Arc<Shared>,
    stop_tx: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// What the bridge task and its handle share.
struct Shared {
    name: String,
    kind: BridgeKind,
    /// The live lane's local session, when the bridge has one.
    live_client_id: Option<String>,
    client_id: String,
    broker: BrokerHandle,
    live: Mutex<Live>,
}

/// Counters and state the task updates.
#[derive(Default)]
struct Live {
    connected: bool,
    address: Option<String>,
    last_error: Option<String>,
    forwarded: u64,
    /// Ferry batches sent (`kind = "ferrymq"`).
    batches_sent: u64,
    /// The upstream granted ferry batches on this connection.
    batches: bool,
    received: u64,
    dead_lettered: u64,
    expired: u64,
    /// Dropped for waiting longer than their rule's `max_age_secs`.
    aged_out: u64,
    connects: u64,
    /// Received from the local queue, not yet acknowledged upstream.
    pending_messages: u64,
    pending_bytes: u64,
    /// When the oldest of those was queued (broker ms).
    pending_oldest_ms: Option<u64>,
    /// (when, forwarded so far): samples for the drain rate, last ~10 s.
    samples: VecDeque<(Instant, u64)>,
}

impl BridgeHandle {
    /// The bridge's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// What the bridge is doing now.
    pub fn status(&self) -> BridgeStatus {
        self.shared.status()
    }

    /// Something that reads the status without the handle (for a task
    /// that reports it).
    pub fn monitor(&self) -> BridgeMonitor {
        BridgeMonitor(self.shared.clone())
    }

    /// Stops the bridge: disconnects from the upstream normally; what is
    /// not acknowledged stays queued.
    pub async fn stop(self) {
        let _ = self.stop_tx.send(true);
        let _ = self.task.await;
    }
}

/// Reads a bridge's status ([`BridgeHandle::monitor`]).
#[derive(Clone)]
pub struct BridgeMonitor(Arc<Shared>);

impl BridgeMonitor {
    /// [`BridgeHandle::status`].
    pub fn status(&self) -> BridgeStatus {
        self.0.status()
    }

    /// The bridge's name.
    pub fn name(&self) -> &str {
        &self.0.name
    }
}

impl Shared {
    fn status(&self) -> BridgeStatus {
        let mut depth = self.broker.queue_depth(&self.client_id).unwrap_or_default();
        if let Some(live) = self
            .live_client_id
            .as_ref()
            .and_then(|id| self.broker.queue_depth(id))
        {
            depth.messages += live.messages;
            depth.bytes += live.bytes;
            depth.oldest_queued_ms = match (depth.oldest_queued_ms, live.oldest_queued_ms) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        let now_ms = self.broker.now_ms();
        let live = self.live.lock();
        let oldest = [live.pending_oldest_ms, depth.oldest_queued_ms]
            .into_iter()
            .flatten()
            .min();
        let drained_per_sec = match (live.samples.front(), live.samples.back()) {
            (Some((t0, n0)), Some((t1, n1))) if t1 > t0 => {
                (n1 - n0) as f64 / (*t1 - *t0).as_secs_f64()
            }
            _ => 0.0,
        };
        BridgeStatus {
            name: self.name.clone(),
            connected: live.connected,
            address: live.address.clone(),
            last_error: live.last_error.clone(),
            backlog_messages: depth.messages + live.pending_messages,
            backlog_bytes: depth.bytes + live.pending_bytes,
            oldest_queued: oldest.map(|ms| Duration::from_millis(now_ms.saturating_sub(ms))),
            drained_per_sec,
            forwarded: live.forwarded,
            received: live.received,
            dead_lettered: live.dead_lettered,
            expired: live.expired,
            aged_out: live.aged_out,
            connects: live.connects,
            batches: (self.kind == BridgeKind::Ferrymq).then_some(live.batches),
            batches_sent: live.batches_sent,
        }
    }
}

/// Starts `config`'s bridge beside the broker of `broker`.
pub async fn start(broker: BrokerHandle, config: Bridge) -> Result<BridgeHandle, ClientError> {
    let client_id = bridge_client_id(&config.name);
    let forever = Duration::from_secs(u64::from(u32::MAX));
    let mut options = ClientOptions::new(&client_id)
        .persistent(forever)
        .manual_acks()
        .message_ids();
    options.receive_capacity = u16::try_from(local_window(&config)).unwrap_or(u16::MAX);
    // The broker created the session and its `out` subscriptions at
    // start (before accepting anyone): this resumes it.
    let local = broker.connect(options).await?;
    // The live lane: for live rules, and for a live queue an earlier
    // config left (drained, then idle).
    let live_id = bridge_live_client_id(&config.name);
    let live = if config.forward.iter().any(|r| r.lane == Lane::Live)
        || broker.queue_depth(&live_id).is_some()
    {
        let mut options = ClientOptions::new(&live_id)
            .persistent(forever)
            .manual_acks()
            .message_ids();
        options.receive_capacity = u16::try_from(local_window(&config)).unwrap_or(u16::MAX);
        Some(LaneState {
            client: broker.connect(options).await?,
            outbox: Outbox::default(),
        })
    } else {
        None
    };
    // The dead-letter queue: a durable session that keeps what the
    // upstream refused for good, for `ferrymq queue stats` to show.
    let dead = broker
        .connect(ClientOptions::new(dead_letter_client_id(&config.name)).persistent(forever))
        .await?;
    dead.subscribe(
        &format!("{DEAD_LETTER_PREFIX}{}/#", config.name),
        QoS::AtLeastOnce,
    )
    .await?;
    dead.disconnect().await;
    let shared = Arc::new(Shared {
        name: config.name.clone(),
        kind: config.kind,
        live_client_id: live.is_some().then(|| bridge_live_client_id(&config.name)),
        client_id,
        broker: broker.clone(),
        live: Mutex::new(Live::default()),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let runner = Runner {
        publisher: local.publisher(),
        local,
        node_uuid: broker.node_uuid(),
        shared: shared.clone(),
        backoff: Backoff::new(config.reconnect_min, config.reconnect_max, Rng::from_os()),
        quota: Backoff::new(config.reconnect_min, config.reconnect_max, Rng::from_os()),
        config,
        outbox: Outbox::default(),
        live,
        stop_rx,
    };
    let task = tokio::spawn(runner.run());
    Ok(BridgeHandle {
        shared,
        stop_tx,
        task,
    })
}

/// The durable session that keeps bridge `name`'s dead letters.
pub fn dead_letter_client_id(name: &str) -> String {
    format!("{}/dead", bridge_client_id(name))
}

/// Puts the dead letters of bridge `name` back on their original topics
/// (so they go upstream again if a rule still matches them), oldest
/// first, each removed from the dead-letter queue only once it is queued
/// again. Returns how many were replayed.
pub async fn replay_dead_letters(broker: &BrokerHandle, name: &str) -> Result<u64, ClientError> {
    let client_id = dead_letter_client_id(name);
    let forever = Duration::from_secs(u64::from(u32::MAX));
    let mut dead = broker
        .connect(
            ClientOptions::new(&client_id)
                .persistent(forever)
                .manual_acks(),
        )
        .await?;
    let publisher = dead.publisher();
    let prefix = format!("{DEAD_LETTER_PREFIX}{name}/");
    let mut replayed = 0;
    // The session's queue is delivered at once on connect: a quiet half
    // second means it is empty.
    while let Ok(Some(letter)) = tokio::time::timeout(Duration::from_millis(500), dead.recv()).await
    {
        let Some(topic) = letter
            .topic
            .as_str()
            .strip_prefix(&prefix)
            .and_then(|t| MqttString::new(&format!("{REPLAY_PREFIX}{name}/{t}")).ok())
        else {
            dead.ack(&letter).await?;
            continue;
        };
        let mut properties = letter.properties.clone();
        // It gets a new id when it is queued again.
        properties
            .user_properties
            .retain(|(k, _)| k.as_str() != MESSAGE_ID_PROPERTY);
        properties.subscription_identifiers.clear();
        publisher
            .submit(Publish {
                qos: QoS::AtLeastOnce,
                retain: false,
                topic,
                payload: letter.payload.clone(),
                properties,
                ..Publish::default()
            })
            .await?
            .await?;
        dead.ack(&letter).await?;
        replayed += 1;
    }
    dead.disconnect().await;
    info!(bridge = %name, replayed, "dead letters replayed");
    Ok(replayed)
}

fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
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

/// The messages taken from the local queue and not yet acknowledged
/// upstream, in queue order (at most `inflight`).
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
    fn push(&mut self, received: Received) {
        let size = received.payload.len() as u64;
        self.bytes += size;
        self.entries.insert(
            self.next_key,
            Entry {
                received,
                sent: None,
                size,
                taken: Instant::now(),
            },
        );
        self.next_key += 1;
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

/// What [`Runner::send_batch`] did.
enum Batch {
    /// A batch went out.
    Sent,
    /// Nothing to send.
    Nothing,
    /// The window or the output buffer is full.
    Full,
    /// The pace allows more only at this time (a batch may have gone).
    Paced(Instant),
    /// A batch that is not full waits for more until this time
    /// (`batch_linger_ms`).
    Linger(Instant),
}

/// The next message of the live lane's local session while its outbox
/// has room (pending otherwise, and without a live lane).
async fn recv_live(live: &mut Option<LaneState>, capacity: usize) -> Option<Received> {
    match live {
        Some(live) if live.outbox.entries.len() < capacity => live.client.recv().await,
        _ => std::future::pending().await,
    }
}

/// How many messages the bridge takes from its local queue at a time:
/// the in-flight window, in batches with `kind = "ferrymq"`.
fn local_window(config: &Bridge) -> usize {
    match config.kind {
        BridgeKind::Mqtt => usize::from(config.inflight),
        BridgeKind::Ferrymq => (usize::from(config.inflight) * usize::from(config.batch_size))
            .clamp(1, usize::from(u16::MAX)),
    }
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

/// Why a queued message is not sent up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gone {
    /// Its Message Expiry Interval ran out while it waited here.
    Expired,
    /// It waited longer than its rule's `max_age_secs`.
    TooOld,
}

/// How a connection ended.
enum Ended {
    /// Stop requested (or the broker is going away).
    Stop,
    /// The link failed or the upstream disconnected us; reconnect.
    Lost(String, Option<String>),
    /// The first address is reachable again: leave the fallback.
    FailBack,
}

struct Runner {
    local: Client,
    /// Publishes inbound messages on the bridge's own session (so No Local
    /// keeps them from going back upstream).
    publisher: Publisher,
    node_uuid: [u8; 16],
    shared: Arc<Shared>,
    config: Bridge,
    backoff: Backoff,
    /// Waits after an upstream "quota exceeded" (0x97).
    quota: Backoff,
    outbox: Outbox,
    /// The live lane (`lane = "live"` rules): its own local session and
    /// outbox, sent ahead of the backlog. While the code below handles
    /// the live lane, it is swapped into `local` / `outbox`
    /// ([`Runner::swap_lanes`]), so one path serves both.
    live: Option<LaneState>,
    stop_rx: watch::Receiver<bool>,
}

/// A lane's local session and what it took from it.
struct LaneState {
    client: Client,
    outbox: Outbox,
}

impl Runner {
    /// Swaps the live lane with the backlog in `local` / `outbox` (no-op
    /// without a live lane). Always called in pairs.
    fn swap_lanes(&mut self) {
        if let Some(live) = &mut self.live {
            std::mem::swap(&mut self.local, &mut live.client);
            std::mem::swap(&mut self.outbox, &mut live.outbox);
        }
    }

    async fn run(mut self) {
        let mut index = 0usize;
        let mut redirect: Option<BridgeAddress> = None;
        loop {
            if *self.stop_rx.borrow() {
                break;
            }
            let address = redirect
                .take()
                .unwrap_or_else(|| self.config.addresses[index].clone());
            let options = self.uplink_options(&address);
            self.update(|l| l.address = Some(address.to_string()));
            let mut stop = self.stop_rx.clone();
            let connecting = Uplink::connect(&options);
            let Some(connected) = self.meanwhile(connecting, &mut stop).await else {
                break;
            };
            let outcome = match connected {
                Ok((uplink, connected)) => {
                    info!(bridge = %self.config.name, %address, session_present = connected.session_present, "uplink connected");
                    self.update(|l| {
                        l.connected = true;
                        l.connects += 1;
                    });
                    self.backoff.reset();
                    let on_fallback = index != 0;
                    let batches = connected
                        .user_properties
                        .iter()
                        .any(|(k, v)| k == ferry::CAPABILITY_PROPERTY && v == ferry::CAPABILITY);
                    if self.config.kind == BridgeKind::Ferrymq && !batches {
                        warn!(bridge = %self.config.name, %address, "the upstream did not grant ferry batches (not ferrymq, or this client id is not in its [ferry] trusted_clients): sending plain MQTT 5, at least once");
                    }
                    self.update(|l| l.batches = batches);
                    let ended = self
                        .serve(uplink, connected.receive_maximum, on_fallback, batches)
                        .await;
                    self.update(|l| l.connected = false);
                    self.outbox.reset();
                    if let Some(live) = &mut self.live {
                        live.outbox.reset();
                    }
                    ended
                }
                Err(e) => {
                    let reference = match &e {
                        UplinkError::Refused {
                            server_reference, ..
                        } => server_reference.clone(),
                        _ => None,
                    };
                    // Next address; after a full round, wait.
                    index = (index + 1) % self.config.addresses.len();
                    Ended::Lost(e.to_string(), reference)
                }
            };
            match outcome {
                Ended::Stop => break,
                Ended::FailBack => {
                    info!(bridge = %self.config.name, "first address reachable again: failing back");
                    index = 0;
                    continue;
                }
                Ended::Lost(why, reference) => {
                    warn!(bridge = %self.config.name, %address, "uplink: {why}");
                    self.update(|l| l.last_error = Some(why));
                    if let Some(reference) = reference.as_deref().and_then(parse_reference) {
                        info!(bridge = %self.config.name, to = %reference, "the upstream refers us to another server");
                        redirect = Some(reference);
                        continue;
                    }
                    if index != 0 {
                        // Try the next address at once: failover.
                        continue;
                    }
                    let delay = self.backoff.next_delay();
                    debug!(bridge = %self.config.name, ?delay, "reconnecting after");
                    if self
                        .meanwhile(tokio::time::sleep(delay), &mut stop)
                        .await
                        .is_none()
                    {
                        break;
                    }
                }
            }
        }
        self.local.disconnect().await;
        if let Some(live) = self.live.take() {
            live.client.disconnect().await;
        }
    }

    /// Runs `work` (a connection attempt, a wait) while still taking
    /// messages from the local queue up to the window, so the status
    /// counts them (and their age) while the link is down. `None` when a
    /// stop was requested first.
    async fn meanwhile<T>(
        &mut self,
        work: impl std::future::Future<Output = T>,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<T> {
        tokio::pin!(work);
        let capacity = local_window(&self.config);
        loop {
            tokio::select! {
                // Dropping a connect in progress closes its socket: safe.
                out = &mut work => return Some(out),
                // Cancel-safe: mpsc receive loses nothing when not chosen.
                received = self.local.recv(), if self.outbox.entries.len() < capacity => match received {
                    Some(received) => {
                        self.outbox.push(received);
                        self.update_pending();
                    }
                    None => return None,
                },
                () = stopped(stop) => return None,
            }
        }
    }

    fn update(&self, f: impl FnOnce(&mut Live)) {
        f(&mut self.shared.live.lock());
    }

    fn uplink_options(&self, address: &BridgeAddress) -> UplinkOptions {
        let c = &self.config;
        let mut o = UplinkOptions::new(address.host.clone(), address.port, c.client_id.clone());
        o.protocol = match c.protocol {
            BridgeProtocol::V5 => Protocol::V5,
            BridgeProtocol::V311 => Protocol::V311,
        };
        o.username = c.username.clone();
        o.password = c.password.clone();
        o.keepalive = c.keepalive;
        o.connect_timeout = c.connect_timeout;
        let expiry = u32::try_from(c.session_expiry.as_secs()).unwrap_or(u32::MAX);
        o.clean_start = expiry == 0;
        o.session_expiry_secs = expiry;
        // 3.1.1 upstreams cannot be told a Receive Maximum: accept what a
        // broker commonly sends unacknowledged.
        o.receive_maximum = c.inflight.max(1024);
        if c.kind == BridgeKind::Ferrymq {
            o.user_properties = vec![(
                ferry::CAPABILITY_PROPERTY.to_owned(),
                ferry::CAPABILITY.to_owned(),
            )];
        }
        o.tls = c.tls.as_ref().map(|t| TlsOptions {
            ca_file: t.ca_file.clone(),
            cert_file: t.cert_file.clone(),
            key_file: t.key_file.clone(),
            server_name: t.server_name.clone(),
        });
        o
    }

    /// Runs one upstream connection until it ends.
    async fn serve(
        &mut self,
        mut uplink: Uplink,
        receive_maximum: u16,
        on_fallback: bool,
        batches: bool,
    ) -> Ended {
        uplink.set_window_cap(usize::from(self.config.inflight.min(receive_maximum)));
        let v5 = uplink.protocol() == Protocol::V5;
        let subscriptions: Vec<Subscription> = self
            .config
            .forward
            .iter()
            .filter(|r| r.direction != Direction::Out)
            .filter_map(|r| {
                Some(Subscription {
                    filter: MqttString::new(&format!("{}{}", r.remote_prefix, r.filter)).ok()?,
                    options: SubscriptionOptions {
                        qos: qos(r.qos),
                        no_local: v5,
                        retain_as_published: v5,
                        retain_handling: RetainHandling::SendAtSubscribe,
                    },
                })
            })
            .collect();
        if !subscriptions.is_empty()
            && let Err(e) = uplink.subscribe(subscriptions, SubscribeProperties::default())
        {
            return Ended::Lost(format!("cannot subscribe upstream: {e}"), None);
        }
        let mut pace = Pace::new(self.config.drain_rate, self.config.ramp, Instant::now());
        let mut paced_until: Option<Instant> = None;
        let mut paused_until: Option<Instant> = None;
        // Local publishes of inbound messages, oldest first, with the
        // upstream packet id to acknowledge once each is durable.
        let mut inbound: VecDeque<(u16, PublishAck)> = VecDeque::new();
        let probe_every = self
            .config
            .reconnect_max
            .clamp(FAILBACK_PROBE_MIN, FAILBACK_PROBE_MAX);
        let mut probe = tokio::time::interval_at(Instant::now() + probe_every, probe_every);
        let mut sample = tokio::time::interval(Duration::from_secs(1));
        let capacity = local_window(&self.config);
        let mut stop = self.stop_rx.clone();
        loop {
            // Send what the window, the pace and a quota pause allow.
            let now = Instant::now();
            if paused_until.is_some_and(|t| t <= now) {
                paused_until = None;
            }
            if paced_until.is_some_and(|t| t <= now) {
                paced_until = None;
            }
            // Decided anew at every turn.
            let mut linger_until = None;
            // The live lane first, then the backlog, in the same window.
            for live_lane in [true, false] {
                if live_lane {
                    if self.live.is_none() {
                        continue;
                    }
                    self.swap_lanes();
                }
                while batches
                    && paused_until.is_none()
                    && paced_until.is_none()
                    && uplink.can_publish()
                {
                    // The live lane never waits for a fuller batch.
                    let linger = if live_lane {
                        Duration::ZERO
                    } else {
                        self.config.batch_linger
                    };
                    match self.send_batch(&mut uplink, &mut pace, now, linger).await {
                        Batch::Sent => {}
                        Batch::Paced(at) => {
                            paced_until = Some(at);
                            break;
                        }
                        Batch::Linger(at) => {
                            linger_until = Some(at);
                            break;
                        }
                        Batch::Nothing | Batch::Full => break,
                    }
                }
                while !batches
                    && paused_until.is_none()
                    && paced_until.is_none()
                    && uplink.can_publish()
                {
                    let Some((key, entry)) = self.outbox.next_unsent() else {
                        break;
                    };
                    if let Err(at) = pace.take(now) {
                        paced_until = Some(at);
                        break;
                    }
                    let publish = match self.upstream_publish(entry, now) {
                        Ok(publish) => publish,
                        Err(gone) => {
                            self.outbox.first_unsent = key + 1;
                            self.drop_gone(key, gone).await;
                            continue;
                        }
                    };
                    let at_most_once = publish.qos == QoS::AtMostOnce;
                    match uplink.publish(publish) {
                        Ok(packet_id) if at_most_once => {
                            let _ = packet_id;
                            if let Some(entry) = self.outbox.remove(key) {
                                self.outbox.first_unsent = key + 1;
                                self.forwarded(&entry).await;
                            }
                        }
                        Ok(packet_id) => {
                            tracing::trace!(bridge = %self.config.name, key, packet_id, "sent upstream");
                            self.outbox.mark_sent(key, packet_id);
                        }
                        Err(RequestError::WindowFull { .. } | RequestError::OutputFull { .. }) => {
                            break;
                        }
                        Err(e) => {
                            // This message can never go to this upstream (too
                            // large, a QoS or retain it does not support).
                            if let Some(entry) = self.outbox.remove(key) {
                                self.dead_letter(entry, &e.to_string()).await;
                            }
                        }
                    }
                }
                if live_lane {
                    self.swap_lanes();
                }
            }
            self.update_pending();
            let wake_at = [paused_until, paced_until, linger_until]
                .into_iter()
                .flatten()
                .min();
            tokio::select! {
                // Cancel-safe: next_event keeps its progress in `uplink`.
                event = uplink.next_event() => match event {
                    Ok(Event::Acked { packet_id, reason_code, reason_string }) => {
                        tracing::trace!(bridge = %self.config.name, packet_id, %reason_code, "acknowledged upstream");
                        let live_lane = self.live.as_ref().is_some_and(|l| l.outbox.owns(packet_id));
                        if live_lane {
                            self.swap_lanes();
                        }
                        if reason_code == ReasonCode::QUOTA_EXCEEDED {
                            // Keep it and back off; it goes again later.
                            self.outbox.unsend(packet_id);
                            let delay = self.quota.next_delay().max(Duration::from_millis(100));
                            warn!(bridge = %self.config.name, ?delay, "the upstream is over quota (0x97): backing off");
                            paused_until = Some(Instant::now() + delay);
                        } else {
                            let entries = self.outbox.take_all(packet_id);
                            if reason_code.is_error() {
                                let why = format!("refused by the upstream: {reason_code}{}", reason_string.map(|s| format!(" ({s})")).unwrap_or_default());
                                for entry in entries {
                                    self.dead_letter(entry, &why).await;
                                }
                            } else {
                                self.quota.reset();
                                for entry in &entries {
                                    self.forwarded(entry).await;
                                }
                            }
                        }
                        if live_lane {
                            self.swap_lanes();
                        }
                    }
                    Ok(Event::Received { .. } | Event::UnsubAck { .. }) => {}
                    Ok(Event::SubAck { reason_codes, .. }) => {
                        if reason_codes.iter().any(|c| c.is_error()) {
                            warn!(bridge = %self.config.name, ?reason_codes, "the upstream refused some inbound subscriptions");
                        }
                    }
                    Ok(Event::Message(publish)) => {
                        if let Some(ended) = self.inbound(&mut uplink, publish, &mut inbound).await {
                            return ended;
                        }
                    }
                    Err(e) => {
                        let reference = match &e {
                            UplinkError::Disconnected { server_reference, .. } => server_reference.clone(),
                            _ => None,
                        };
                        return Ended::Lost(e.to_string(), reference);
                    }
                },
                // Cancel-safe: mpsc receive loses nothing when not chosen.
                received = self.local.recv(), if self.outbox.entries.len() < capacity => match received {
                    Some(received) => {
                        tracing::trace!(bridge = %self.config.name, key = self.outbox.next_key, local_id = received.packet_id, dup = received.dup, payload = ?received.payload, "from the local queue");
                        self.outbox.push(received);
                    }
                    None => return Ended::Stop,
                },
                // Cancel-safe as the branch above.
                received = recv_live(&mut self.live, capacity), if self.live.is_some() => match received {
                    Some(received) => {
                        if let Some(live) = &mut self.live {
                            live.outbox.push(received);
                        }
                    }
                    None => return Ended::Stop,
                },
                // Polls the oldest local publish in place (a oneshot, cancel-safe).
                done = front_ack(&mut inbound), if !inbound.is_empty() => {
                    let packet_id = inbound.pop_front().map(|(id, _)| id);
                    match (done, packet_id) {
                        (Ok(()), Some(packet_id)) => {
                            if packet_id != 0 && let Err(e) = uplink.ack(packet_id) {
                                return Ended::Lost(format!("cannot acknowledge upstream: {e}"), None);
                            }
                            self.update(|l| l.received += 1);
                        }
                        (Err(ClientError::Refused(ReasonCode::TOPIC_NAME_INVALID)), Some(packet_id)) => {
                            // Deeper than limits.max_topic_levels: refused for
                            // good (the broker counted and logged it), so it is
                            // taken from the upstream rather than sent again
                            // after every reconnect.
                            warn!(bridge = %self.config.name, "dropped an inbound message: its topic has more levels than limits.max_topic_levels");
                            if packet_id != 0 && let Err(e) = uplink.ack(packet_id) {
                                return Ended::Lost(format!("cannot acknowledge upstream: {e}"), None);
                            }
                        }
                        (Err(e), _) => {
                            // Not durable here: the upstream must keep it.
                            // Reconnecting makes it send again.
                            return Ended::Lost(format!("the local broker refused an inbound message: {e}"), None);
                        }
                        (Ok(()), None) => {}
                    }
                }
                _ = sleep_until(wake_at), if wake_at.is_some() => {}
                _ = probe.tick(), if on_fallback => {
                    if self.first_address_reachable().await {
                        let _ = uplink.disconnect(ReasonCode::NORMAL_DISCONNECTION).await;
                        return Ended::FailBack;
                    }
                }
                _ = sample.tick() => {
                    let now = Instant::now();
                    self.update(|l| {
                        l.samples.push_back((now, l.forwarded));
                        while l.samples.len() > 11 {
                            l.samples.pop_front();
                        }
                    });
                }
                () = stopped(&mut stop) => {
                    let _ = uplink.disconnect(ReasonCode::NORMAL_DISCONNECTION).await;
                    return Ended::Stop;
                }
            }
        }
    }

    /// Sends the next unsent entries (up to `batch_size` messages and
    /// `batch_bytes`, within the pace) as one ferry batch.
    async fn send_batch(
        &mut self,
        uplink: &mut Uplink,
        pace: &mut Pace,
        now: Instant,
        linger: Duration,
    ) -> Batch {
        let (max_count, max_bytes) = (
            usize::from(self.config.batch_size),
            usize::try_from(self.config.batch_bytes).unwrap_or(usize::MAX),
        );
        if let Some(at) = self.outbox.linger_until(linger, max_count, max_bytes, now) {
            return Batch::Linger(at);
        }
        let mut records = Vec::new();
        let mut keys = Vec::new();
        let mut expired = Vec::new();
        let mut bytes = 0usize;
        let mut paced = None;
        for (&key, entry) in self.outbox.entries.range(self.outbox.first_unsent..) {
            if entry.sent.is_some() {
                continue;
            }
            if records.len() >= max_count {
                break;
            }
            let publish = match self.upstream_publish(entry, now) {
                Ok(publish) => publish,
                Err(gone) => {
                    expired.push((key, gone));
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
            if let Err(at) = pace.take(now) {
                paced = Some(at);
                break;
            }
            bytes += size;
            records.push(record);
            keys.push(key);
        }
        for (key, gone) in expired {
            self.drop_gone(key, gone).await;
        }
        if records.is_empty() {
            return paced.map_or(Batch::Nothing, Batch::Paced);
        }
        let publish = Publish {
            qos: QoS::AtLeastOnce,
            topic: MqttString::from_static(ferry::BATCH_TOPIC),
            payload: ferry::encode_batch(&records),
            ..Publish::default()
        };
        match uplink.publish(publish) {
            Ok(packet_id) => {
                tracing::trace!(bridge = %self.config.name, packet_id, messages = keys.len(), "batch sent upstream");
                self.outbox.mark_batch_sent(keys, packet_id);
                self.update(|l| l.batches_sent += 1);
                paced.map_or(Batch::Sent, Batch::Paced)
            }
            Err(RequestError::WindowFull { .. } | RequestError::OutputFull { .. }) => Batch::Full,
            Err(e) => {
                // Larger than the upstream takes (batch_bytes above its
                // Maximum Packet Size): each goes to the dead letters,
                // counted and logged, rather than blocking the queue.
                let why = format!("a ferry batch the upstream cannot take: {e}");
                for key in keys {
                    if let Some(entry) = self.outbox.remove(key) {
                        self.dead_letter(entry, &why).await;
                    }
                }
                Batch::Sent
            }
        }
    }

    fn update_pending(&self) {
        // Entries are in queue order: the first was queued first.
        let (count, bytes) = (self.outbox.entries.len() as u64, self.outbox.bytes);
        let oldest = self
            .outbox
            .entries
            .values()
            .next()
            .and_then(|e| e.received.queued_ms);
        self.update(|l| {
            l.pending_messages = count;
            l.pending_bytes = bytes;
            l.pending_oldest_ms = oldest;
        });
    }

    /// The PUBLISH for the upstream: topic remapped, QoS at most 1, the
    /// message id and all properties kept, the Message Expiry Interval
    /// reduced by the time it waited here; why not, when it expired or
    /// waited longer than its rule's `max_age_secs`.
    fn upstream_publish(&self, entry: &Entry, now: Instant) -> Result<Publish, Gone> {
        let received = &entry.received;
        let (topic, rule_qos, max_age) = outbound_route(&self.config, received.topic.as_str());
        if let (Some(max_age), Some(queued_ms)) = (max_age, received.queued_ms) {
            let waited = self.shared.broker.now_ms().saturating_sub(queued_ms);
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

    /// An upstream message: published locally (acknowledged upstream once
    /// durable here), or dropped if it is one of ours coming back.
    async fn inbound(
        &mut self,
        uplink: &mut Uplink,
        publish: Publish,
        waiting: &mut VecDeque<(u16, PublishAck)>,
    ) -> Option<Ended> {
        let packet_id = if publish.qos == QoS::AtMostOnce {
            0
        } else {
            publish.packet_id
        };
        let ours = publish
            .properties
            .user_properties
            .iter()
            .filter(|(k, _)| k.as_str() == MESSAGE_ID_PROPERTY)
            .filter_map(|(_, v)| v.as_str().parse::<MessageId>().ok())
            .any(|id| id.uuid == self.node_uuid);
        let route = inbound_route(&self.config, publish.topic.as_str());
        let Some((topic, rule_qos)) = route.filter(|_| !ours) else {
            // Ours (a loop) or matching no rule: taken, not published.
            if packet_id != 0
                && let Err(e) = uplink.ack(packet_id)
            {
                return Some(Ended::Lost(
                    format!("cannot acknowledge upstream: {e}"),
                    None,
                ));
            }
            return None;
        };
        let local = Publish {
            dup: false,
            qos: publish.qos.min(rule_qos),
            retain: publish.retain,
            topic,
            packet_id: 0,
            payload: publish.payload,
            properties: ferrymq_codec::PublishProperties {
                topic_alias: None,
                subscription_identifiers: Vec::new(),
                ..publish.properties
            },
        };
        match self.publisher.submit(local).await {
            Ok(ack) => {
                waiting.push_back((packet_id, ack));
                None
            }
            Err(e) => Some(Ended::Lost(
                format!("cannot publish an inbound message locally: {e}"),
                None,
            )),
        }
    }

    /// The upstream has it: it leaves the local queue.
    /// A message that goes nowhere: taken from the local queue, counted.
    async fn drop_gone(&mut self, key: u64, gone: Gone) {
        if let Some(entry) = self.outbox.remove(key) {
            let _ = self.local.ack(&entry.received).await;
            self.update(|l| match gone {
                Gone::Expired => l.expired += 1,
                Gone::TooOld => l.aged_out += 1,
            });
        }
    }

    async fn forwarded(&mut self, entry: &Entry) {
        let _ = self.local.ack(&entry.received).await;
        self.update(|l| l.forwarded += 1);
    }

    /// The upstream will never take it: kept under `$dead/{bridge}/...`
    /// (durably, before it leaves the queue), counted and logged.
    async fn dead_letter(&mut self, entry: Entry, why: &str) {
        warn!(bridge = %self.config.name, topic = %entry.received.topic, "dead-lettered: {why}");
        let topic = format!(
            "{DEAD_LETTER_PREFIX}{}/{}",
            self.config.name, entry.received.topic
        );
        let publish = Publish {
            qos: QoS::AtLeastOnce,
            topic: MqttString::new(&topic).unwrap_or_default(),
            payload: entry.received.payload.clone(),
            properties: entry.received.properties.clone(),
            ..Publish::default()
        };
        let kept = match self.publisher.submit(publish).await {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        };
        if kept {
            let _ = self.local.ack(&entry.received).await;
        }
        self.update(|l| l.dead_lettered += 1);
    }

    async fn first_address_reachable(&self) -> bool {
        let first = &self.config.addresses[0];
        let target = (first.host.as_str(), first.port);
        matches!(
            tokio::time::timeout(
                self.config.connect_timeout,
                tokio::net::TcpStream::connect(target)
            )
            .await,
            Ok(Ok(_))
        )
    }
}

/// The upstream topic and QoS of a local topic (the first `out` rule
/// that matches).
fn outbound_route(config: &Bridge, local: &str) -> (MqttString, QoS, Option<Duration>) {
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

/// The local topic and QoS of an upstream topic (the first `in` rule
/// that matches).
fn inbound_route(config: &Bridge, remote: &str) -> Option<(MqttString, QoS)> {
    config
        .forward
        .iter()
        .filter(|r| r.direction != Direction::Out)
        .find(|r| topic::matches(&format!("{}{}", r.remote_prefix, r.filter), remote))
        .and_then(|r| {
            let rest = remote.strip_prefix(&r.remote_prefix).unwrap_or(remote);
            MqttString::new(&format!("{}{rest}", r.local_prefix))
                .ok()
                .map(|t| (t, qos(r.qos)))
        })
}

/// Waits for the oldest local publish's acknowledgement, in place.
async fn front_ack(waiting: &mut VecDeque<(u16, PublishAck)>) -> Result<(), ClientError> {
    match waiting.front_mut() {
        Some((_, ack)) => ack.await,
        None => std::future::pending().await,
    }
}

/// Resolves once a stop is requested (never if the sender is gone). Does
/// not hold the watch's guard across an await, so the task stays `Send`.
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A Server Reference ("host:port", or a host alone meaning port 1883;
/// several separated by spaces: the first).
fn parse_reference(reference: &str) -> Option<BridgeAddress> {
    let first = reference.split_whitespace().next()?;
    if let Ok(addr) = first.parse::<std::net::SocketAddr>() {
        return Some(BridgeAddress {
            host: addr.ip().to_string(),
            port: addr.port(),
        });
    }
    match first.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => Some(BridgeAddress {
            host: host.to_string(),
            port: port.parse().ok()?,
        }),
        _ => Some(BridgeAddress {
            host: first.trim_matches(|c| c == '[' || c == ']').to_string(),
            port: 1883,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_references_name_the_next_address() {
        let r = |s| parse_reference(s).map(|a| a.to_string());
        assert_eq!(r("10.0.0.7:8883").as_deref(), Some("10.0.0.7:8883"));
        assert_eq!(
            r("regional-2:1884 other:1").as_deref(),
            Some("regional-2:1884")
        );
        assert_eq!(r("regional-3").as_deref(), Some("regional-3:1883"));
        assert_eq!(r("[fd00::5]:8883").as_deref(), Some("[fd00::5]:8883"));
        assert_eq!(r(""), None);
    }

    /// Forward rules and prefix rewriting walk a topic of any depth with a
    /// loop: checked on a 256 KiB stack with topics far deeper than the
    /// 14,600 levels that once overflowed a 2 MiB worker stack.
    #[test]
    fn deep_topics_are_mapped_by_forward_rules_on_a_small_stack() {
        std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(|| {
                let rule = |filter: &str, direction| ferrymq_config::Forward {
                    filter: filter.into(),
                    direction,
                    local_prefix: "local/".into(),
                    remote_prefix: "site/".into(),
                    ..ferrymq_config::Forward::default()
                };
                for levels in [20_000, 32_000] {
                    let deep = vec!["a"; levels].join("/");
                    let wild = format!("{}/#", vec!["+"; levels - 1].join("/"));
                    let config = Bridge {
                        forward: vec![rule(&wild, Direction::Out), rule(&wild, Direction::In)],
                        ..Bridge::default()
                    };
                    let local = format!("local/{}", &deep[..deep.len() - 2]);
                    let (up, _, _) = outbound_route(&config, &local);
                    assert_eq!(up.as_str(), format!("site/{}", &local["local/".len()..]));
                    let (down, _) = inbound_route(&config, &up).expect("matches the in rule");
                    assert_eq!(down.as_str(), local);
                }
            })
            .expect("spawn")
            .join()
            .expect("mapped on a small stack");
    }
}
