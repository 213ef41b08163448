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
//!
//! What goes upstream, when, and what becomes of each message is decided
//! by `forward` (a state machine without I/O); this module does the I/O.

mod forward;

use std::collections::VecDeque;
use std::ops::ControlFlow;
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

use self::forward::{Action, Forwarder, Gone};
use crate::pace::{Backoff, Rng};
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
    options.receive_capacity = u16::try_from(forward::local_window(&config)).unwrap_or(u16::MAX);
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
        options.receive_capacity =
            u16::try_from(forward::local_window(&config)).unwrap_or(u16::MAX);
        Some(broker.connect(options).await?)
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
        forward: Forwarder::new(&config, live.is_some(), Rng::from_os()),
        config,
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

/// The next message of the live lane's local session (pending without a
/// live lane).
async fn recv_live(live: &mut Option<Client>) -> Option<Received> {
    match live {
        Some(live) => live.recv().await,
        None => std::future::pending().await,
    }
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
    /// The backlog lane's local session.
    local: Client,
    /// The live lane's local session (`lane = "live"` rules), when the
    /// bridge has one; its messages are sent ahead of the backlog.
    live: Option<Client>,
    /// Publishes inbound messages on the bridge's own session (so No Local
    /// keeps them from going back upstream).
    publisher: Publisher,
    node_uuid: [u8; 16],
    shared: Arc<Shared>,
    config: Bridge,
    backoff: Backoff,
    /// The forwarding policy: what both lanes took from their local
    /// queues, what goes upstream next, and what becomes of each message.
    forward: Forwarder,
    stop_rx: watch::Receiver<bool>,
}

impl Runner {
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
                    self.forward.disconnected();
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
            live.disconnect().await;
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
        loop {
            tokio::select! {
                // Dropping a connect in progress closes its socket: safe.
                out = &mut work => return Some(out),
                // Cancel-safe: mpsc receive loses nothing when not chosen.
                received = self.local.recv(), if self.forward.has_room(Lane::Backlog) => match received {
                    Some(received) => {
                        self.forward.take(Lane::Backlog, received, Instant::now());
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

    /// Runs one upstream connection until it ends: each turn sends what
    /// the forwarding policy hands out, then waits for the next thing to
    /// feed it (or to handle here: inbound messages, the fail-back probe,
    /// the status samples, a stop).
    async fn serve(
        &mut self,
        mut uplink: Uplink,
        receive_maximum: u16,
        on_fallback: bool,
        batches: bool,
    ) -> Ended {
        uplink.set_window_cap(usize::from(self.config.inflight.min(receive_maximum)));
        if let Err(e) = self.subscribe_inbound(&mut uplink) {
            return Ended::Lost(format!("cannot subscribe upstream: {e}"), None);
        }
        self.forward.connected(batches, Instant::now());
        // Local publishes of inbound messages, oldest first, with the
        // upstream packet id to acknowledge once each is durable.
        let mut inbound: VecDeque<(u16, PublishAck)> = VecDeque::new();
        let probe_every = self
            .config
            .reconnect_max
            .clamp(FAILBACK_PROBE_MIN, FAILBACK_PROBE_MAX);
        let mut probe = tokio::time::interval_at(Instant::now() + probe_every, probe_every);
        let mut sample = tokio::time::interval(Duration::from_secs(1));
        let mut stop = self.stop_rx.clone();
        loop {
            self.send(&mut uplink).await;
            let wake_at = self.forward.wake_at();
            let flow = tokio::select! {
                // Cancel-safe: next_event keeps its progress in `uplink`.
                event = uplink.next_event() => self.upstream_event(&mut uplink, event, &mut inbound).await,
                // Cancel-safe: mpsc receive loses nothing when not chosen.
                received = self.local.recv(), if self.forward.has_room(Lane::Backlog) => self.take(Lane::Backlog, received),
                // Cancel-safe as the branch above.
                received = recv_live(&mut self.live), if self.forward.has_room(Lane::Live) => self.take(Lane::Live, received),
                // Polls the oldest local publish in place (a oneshot, cancel-safe).
                done = front_ack(&mut inbound), if !inbound.is_empty() => self.inbound_done(&mut uplink, done, &mut inbound),
                // Cancel-safe: the next turn asks for the wake-up again.
                _ = sleep_until(wake_at), if wake_at.is_some() => ControlFlow::Continue(()),
                // Cancel-safe: an interval's tick, like a watch change
                // below, loses nothing when another branch wins.
                _ = probe.tick(), if on_fallback => {
                    if self.first_address_reachable().await {
                        let _ = uplink.disconnect(ReasonCode::NORMAL_DISCONNECTION).await;
                        return Ended::FailBack;
                    }
                    ControlFlow::Continue(())
                }
                _ = sample.tick() => self.sample(),
                () = stopped(&mut stop) => {
                    let _ = uplink.disconnect(ReasonCode::NORMAL_DISCONNECTION).await;
                    return Ended::Stop;
                }
            };
            if let ControlFlow::Break(ended) = flow {
                return ended;
            }
        }
    }

    /// Subscribes the `in` rules upstream (none: nothing to do).
    fn subscribe_inbound(&self, uplink: &mut Uplink) -> Result<(), RequestError> {
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
        if subscriptions.is_empty() {
            return Ok(());
        }
        uplink
            .subscribe(subscriptions, SubscribeProperties::default())
            .map(|_| ())
    }

    /// One turn of sending: each publish the forwarding policy hands out
    /// goes on the uplink (which only encodes it) while the window, the
    /// pace and a quota pause allow; then what it decided is done.
    async fn send(&mut self, uplink: &mut Uplink) {
        self.forward
            .begin_turn(Instant::now(), self.shared.broker.now_ms());
        let batches = self.forward.batches();
        while let Some(publish) = self.forward.next_publish(uplink.can_publish()) {
            let result = uplink.publish(publish);
            if let Ok(packet_id) = result {
                tracing::trace!(bridge = %self.config.name, packet_id, batches, "sent upstream");
                if batches {
                    self.update(|l| l.batches_sent += 1);
                }
            }
            self.forward.published(result);
        }
        self.perform().await;
        self.update_pending();
    }

    /// Does what the forwarding policy decided, in order.
    async fn perform(&mut self) {
        while let Some(action) = self.forward.next_action() {
            match action {
                Action::Forwarded(lane, received) => {
                    let _ = self.lane_client(lane).ack(&received).await;
                    self.update(|l| l.forwarded += 1);
                }
                Action::Dropped(lane, received, gone) => {
                    let _ = self.lane_client(lane).ack(&received).await;
                    self.update(|l| match gone {
                        Gone::Expired => l.expired += 1,
                        Gone::TooOld => l.aged_out += 1,
                    });
                }
                Action::DeadLetter(lane, received, why) => {
                    self.dead_letter(lane, &received, &why).await;
                }
                Action::Paused(delay) => {
                    warn!(bridge = %self.config.name, ?delay, "the upstream is over quota (0x97): backing off");
                }
            }
        }
    }

    /// The local session of `lane`.
    fn lane_client(&self, lane: Lane) -> &Client {
        match (lane, &self.live) {
            (Lane::Live, Some(live)) => live,
            _ => &self.local,
        }
    }

    /// A message from `lane`'s local queue (`None`: the broker is going
    /// away).
    fn take(&mut self, lane: Lane, received: Option<Received>) -> ControlFlow<Ended> {
        let Some(received) = received else {
            return ControlFlow::Break(Ended::Stop);
        };
        tracing::trace!(bridge = %self.config.name, ?lane, local_id = received.packet_id, dup = received.dup, payload = ?received.payload, "from the local queue");
        self.forward.take(lane, received, Instant::now());
        ControlFlow::Continue(())
    }

    /// Something the upstream did.
    async fn upstream_event(
        &mut self,
        uplink: &mut Uplink,
        event: Result<Event, UplinkError>,
        inbound: &mut VecDeque<(u16, PublishAck)>,
    ) -> ControlFlow<Ended> {
        match event {
            Ok(Event::Acked {
                packet_id,
                reason_code,
                reason_string,
            }) => {
                tracing::trace!(bridge = %self.config.name, packet_id, %reason_code, "acknowledged upstream");
                self.forward
                    .acked(packet_id, reason_code, reason_string, Instant::now());
                self.perform().await;
            }
            Ok(Event::Received { .. } | Event::UnsubAck { .. }) => {}
            Ok(Event::SubAck { reason_codes, .. }) => {
                if reason_codes.iter().any(|c| c.is_error()) {
                    warn!(bridge = %self.config.name, ?reason_codes, "the upstream refused some inbound subscriptions");
                }
            }
            Ok(Event::Message(publish)) => return self.inbound(uplink, publish, inbound).await,
            Err(e) => {
                let reference = match &e {
                    UplinkError::Disconnected {
                        server_reference, ..
                    } => server_reference.clone(),
                    _ => None,
                };
                return ControlFlow::Break(Ended::Lost(e.to_string(), reference));
            }
        }
        ControlFlow::Continue(())
    }

    /// The local broker answered the oldest local publish of an inbound
    /// message: durable here, it is acknowledged upstream.
    fn inbound_done(
        &mut self,
        uplink: &mut Uplink,
        done: Result<(), ClientError>,
        inbound: &mut VecDeque<(u16, PublishAck)>,
    ) -> ControlFlow<Ended> {
        let packet_id = inbound.pop_front().map(|(id, _)| id);
        match (done, packet_id) {
            (Ok(()), Some(packet_id)) => {
                ack_upstream(uplink, packet_id)?;
                self.update(|l| l.received += 1);
            }
            (Err(ClientError::Refused(ReasonCode::TOPIC_NAME_INVALID)), Some(packet_id)) => {
                // Deeper than limits.max_topic_levels: refused for good
                // (the broker counted and logged it), so it is taken from
                // the upstream rather than sent again after every
                // reconnect.
                warn!(bridge = %self.config.name, "dropped an inbound message: its topic has more levels than limits.max_topic_levels");
                ack_upstream(uplink, packet_id)?;
            }
            (Err(e), _) => {
                // Not durable here: the upstream must keep it.
                // Reconnecting makes it send again.
                return ControlFlow::Break(Ended::Lost(
                    format!("the local broker refused an inbound message: {e}"),
                    None,
                ));
            }
            (Ok(()), None) => {}
        }
        ControlFlow::Continue(())
    }

    /// A sample of the forwarded count, for the drain rate.
    fn sample(&self) -> ControlFlow<Ended> {
        let now = Instant::now();
        self.update(|l| {
            l.samples.push_back((now, l.forwarded));
            while l.samples.len() > 11 {
                l.samples.pop_front();
            }
        });
        ControlFlow::Continue(())
    }

    fn update_pending(&self) {
        let pending = self.forward.pending();
        self.update(|l| {
            l.pending_messages = pending.messages;
            l.pending_bytes = pending.bytes;
            l.pending_oldest_ms = pending.oldest_queued_ms;
        });
    }

    /// An upstream message: published locally (acknowledged upstream once
    /// durable here), or dropped if it is one of ours coming back.
    async fn inbound(
        &mut self,
        uplink: &mut Uplink,
        publish: Publish,
        waiting: &mut VecDeque<(u16, PublishAck)>,
    ) -> ControlFlow<Ended> {
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
            return ack_upstream(uplink, packet_id);
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
                ControlFlow::Continue(())
            }
            Err(e) => ControlFlow::Break(Ended::Lost(
                format!("cannot publish an inbound message locally: {e}"),
                None,
            )),
        }
    }

    /// The upstream will never take it: kept under `$dead/{bridge}/...`
    /// (durably, before it leaves `lane`'s queue), counted and logged.
    async fn dead_letter(&mut self, lane: Lane, received: &Received, why: &str) {
        warn!(bridge = %self.config.name, topic = %received.topic, "dead-lettered: {why}");
        let topic = format!(
            "{DEAD_LETTER_PREFIX}{}/{}",
            self.config.name, received.topic
        );
        let publish = Publish {
            qos: QoS::AtLeastOnce,
            topic: MqttString::new(&topic).unwrap_or_default(),
            payload: received.payload.clone(),
            properties: received.properties.clone(),
            ..Publish::default()
        };
        let kept = match self.publisher.submit(publish).await {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        };
        if kept {
            let _ = self.lane_client(lane).ack(received).await;
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

/// Acknowledges inbound `packet_id` upstream (0: a QoS 0 message, nothing
/// to do).
fn ack_upstream(uplink: &mut Uplink, packet_id: u16) -> ControlFlow<Ended> {
    if packet_id != 0
        && let Err(e) = uplink.ack(packet_id)
    {
        return ControlFlow::Break(Ended::Lost(
            format!("cannot acknowledge upstream: {e}"),
            None,
        ));
    }
    ControlFlow::Continue(())
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
                    let (up, _, _) = forward::outbound_route(&config, &local);
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
