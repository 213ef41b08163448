//! Sessions: the state that outlives a connection ([`SessionState`]) and
//! the registry of sessions by client identifier ([`Sessions`]), which
//! also arbitrates takeover.
//!
//! A connected client's session state is owned by its connection (its
//! protocol engine); while the client is offline it is kept in the
//! registry. A persistent session (3.1.1 clean session 0, 5.0 Session
//! Expiry Interval > 0) keeps its subscriptions in the router and its
//! outbox while offline, so matching messages queue for it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferrymq_codec::MqttString;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::outbox::{Delivery, Outbox};
use crate::replay::Replays;
use crate::shared_sub::{Member, SharedGroup};
use crate::storage::{SessionRecord, SubscriptionRecord};

/// An outbound QoS 1/2 exchange in progress.
#[derive(Debug, Clone)]
pub enum Inflight {
    /// PUBLISH sent; waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Sent(Delivery),
    /// QoS 2: PUBREC received and PUBREL sent; waiting for PUBCOMP. The
    /// message itself is no longer needed.
    Released {
        /// Queue position the message had.
        seq: u64,
    },
}

/// Everything of a session that outlives its connection.
pub struct SessionState {
    /// The client identifier.
    pub client_id: MqttString,
    /// The session number: new at each clean start, never reused.
    pub number: u64,
    /// Session Expiry Interval in seconds (MQTT's width; `u32::MAX`:
    /// never): how long the session outlives its connection. Zero: it ends
    /// with the connection. Read and set as a `Duration` with
    /// [`SessionState::expiry`] and [`SessionState::set_expiry`].
    expiry_secs: u32,
    /// Messages waiting to be sent.
    pub outbox: Arc<Outbox>,
    /// Subscriptions by topic filter. (The maps here are B-trees: an
    /// empty `HashMap` is 48 bytes, an empty `BTreeMap` 24, and every
    /// connection has a session.)
    pub subscriptions: BTreeMap<MqttString, SubscriptionRecord>,
    /// Outbound QoS 1/2 exchanges by packet identifier.
    pub inflight: BTreeMap<u16, Inflight>,
    /// The next packet identifier to try for an outbound message.
    pub next_packet_id: u16,
    /// Whether the store holds this session (a `SessionPut` was written).
    pub stored: bool,
    /// What few sessions have, in one box made when one of them is there
    /// ([`SessionState::rare`]): every session, a dormant connection's
    /// too, pays for what is inline here.
    pub rare: Option<Box<Rare>>,
}

/// The parts of a session that few sessions have (`SessionState::rare`).
#[derive(Default)]
pub struct Rare {
    /// Inbound QoS 2 packet identifiers awaiting PUBREL.
    pub qos2_received: BTreeSet<u16>,
    /// A will waiting for its Will Delay Interval (5.0) while the session
    /// is offline.
    pub pending_will: Option<PendingWill>,
    /// The shared subscription groups it is a member of, with its
    /// membership (by the `$share/...` filter it subscribed with).
    pub groups: BTreeMap<MqttString, (Arc<SharedGroup>, Member)>,
    /// Retained messages still to send to new subscriptions.
    pub replays: Option<Box<Replays>>,
}

/// A will whose publication waits for its delay. Dropping it cancels the
/// will (the session was resumed); [`PendingWill::publish_now`] publishes
/// it at once (the session ended first).
pub struct PendingWill(pub tokio::sync::oneshot::Sender<()>);

impl PendingWill {
    /// Publishes the will now instead of at the end of its delay.
    pub fn publish_now(self) {
        let _ = self.0.send(());
    }
}

impl SessionState {
    /// A fresh session.
    pub fn new(client_id: MqttString, number: u64, outbox: Arc<Outbox>) -> Self {
        SessionState {
            client_id,
            number,
            expiry_secs: 0,
            outbox,
            subscriptions: BTreeMap::new(),
            inflight: BTreeMap::new(),
            next_packet_id: 1,
            stored: false,
            rare: None,
        }
    }

    /// Session Expiry Interval.
    pub fn expiry(&self) -> Duration {
        Duration::from_secs(u64::from(self.expiry_secs))
    }

    /// Sets the Session Expiry Interval (in whole seconds, at most
    /// `u32::MAX`: never).
    pub fn set_expiry(&mut self, expiry: Duration) {
        self.expiry_secs = secs_u32(expiry);
    }

    /// The rare parts, made if the session had none.
    pub fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_default()
    }

    /// Lets the rare parts' box go once it holds nothing.
    pub fn trim_rare(&mut self) {
        if self.rare.as_ref().is_some_and(|r| {
            r.qos2_received.is_empty()
                && r.pending_will.is_none()
                && r.groups.is_empty()
                && r.replays.is_none()
        }) {
            self.rare = None;
        }
    }

    /// Inbound QoS 2 packet identifiers awaiting PUBREL.
    pub fn qos2_received(&self) -> Option<&BTreeSet<u16>> {
        self.rare.as_ref().map(|r| &r.qos2_received)
    }

    /// Whether inbound QoS 2 `packet_id` awaits its PUBREL.
    pub fn qos2_holds(&self, packet_id: u16) -> bool {
        self.qos2_received()
            .is_some_and(|ids| ids.contains(&packet_id))
    }

    /// Inbound QoS 2 `packet_id` is done (PUBREL came, or it was
    /// refused); whether it was held.
    pub fn qos2_release(&mut self, packet_id: u16) -> bool {
        let held = self
            .rare
            .as_mut()
            .is_some_and(|r| r.qos2_received.remove(&packet_id));
        self.trim_rare();
        held
    }

    /// The shared subscription groups it is a member of.
    pub fn groups(&self) -> impl Iterator<Item = &(Arc<SharedGroup>, Member)> {
        self.rare.iter().flat_map(|r| r.groups.values())
    }

    /// Takes the delayed will out (it is cancelled when dropped).
    pub fn take_pending_will(&mut self) -> Option<PendingWill> {
        let will = self.rare.as_mut()?.pending_will.take();
        self.trim_rare();
        will
    }

    /// Whether retained messages wait to be sent to a new subscription.
    pub fn replaying(&self) -> bool {
        self.rare
            .as_ref()
            .and_then(|r| r.replays.as_ref())
            .is_some_and(|r| !r.is_empty())
    }

    /// Whether the session outlives its connection.
    pub fn is_persistent(&self) -> bool {
        self.expiry_secs > 0
    }

    /// The session's record for the store: the one way one is made.
    /// `offline_since_ms` is `None` while a connection holds the session;
    /// the record carries no will (the connection's end adds a delayed
    /// one).
    pub fn record(&self, offline_since_ms: Option<u64>) -> SessionRecord {
        SessionRecord {
            client_id: self.client_id.clone(),
            number: self.number,
            expiry_secs: self.expiry_secs,
            offline_since_ms,
            pending_will: None,
        }
    }
}

/// A duration in whole seconds, saturating at `u32::MAX` (a session that
/// never expires is stored so).
pub fn secs_u32(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

/// The handle a connection registers while it holds a session.
pub struct Control {
    /// Identifies the holding connection.
    pub connection: u64,
    /// Set when the connection must close (taken over) or look at the
    /// shutdown flag; it checks this whenever it wakes, also before it first
    /// waits, so a kick before then still counts.
    kicked: AtomicBool,
    /// Set by the connection taking over when it resumes the session
    /// (then the old connection's will is not published).
    resumed: AtomicBool,
    /// Set when the connection has handed its session back; the
    /// registry's `handed_back` wakes whoever waits for that. (Not a watch
    /// channel, nor a `Notify` of its own: they cost 400 and 32 bytes per
    /// connection, for a wait only a takeover has.)
    done: AtomicBool,
}

impl Control {
    /// A control for connection number `connection`.
    pub fn new(connection: u64) -> Arc<Self> {
        Arc::new(Control {
            connection,
            kicked: AtomicBool::new(false),
            resumed: AtomicBool::new(false),
            done: AtomicBool::new(false),
        })
    }

    /// Whether the connection was told to close (or to look at the
    /// shutdown flag).
    pub fn is_kicked(&self) -> bool {
        self.kicked.load(Ordering::Acquire)
    }

    /// Tells the connection to close (or to look at the shutdown flag),
    /// and rings the doorbell of its session's queue, `outbox`, if the
    /// session has recorded one (`Sessions::set_outbox`, under the same
    /// lock as the caller's look: a connection that records it later reads
    /// the flag when it first waits).
    fn kick(&self, outbox: Option<&Outbox>) {
        self.kicked.store(true, Ordering::Release);
        if let Some(outbox) = outbox {
            outbox.doorbell().ring(crate::doorbell::ALARM);
        }
    }

    /// Whether the connection that took over resumes the session.
    pub fn taken_over_with_resume(&self) -> bool {
        self.resumed.load(Ordering::Acquire)
    }

    /// Resolves once the connection has handed its session back;
    /// `finished` is notified whenever any connection does.
    async fn handed_back(&self, finished: &Notify) {
        loop {
            let finished = finished.notified();
            tokio::pin!(finished);
            // Registered before the check, so a finish in between wakes it.
            finished.as_mut().enable();
            if self.done.load(Ordering::Acquire) {
                return;
            }
            finished.await;
        }
    }

    /// Marks the session handed back and wakes the takeovers waiting
    /// (each looks at its own connection's flag).
    fn finish(&self, finished: &Notify) {
        self.done.store(true, Ordering::Release);
        finished.notify_waiters();
    }
}

struct Slot {
    /// The state while no connection holds it. (Boxed: while a connection
    /// holds it, which is most of the time for most sessions, the slot
    /// would otherwise keep the room of a whole state empty.)
    state: Option<Box<SessionState>>,
    /// The connection holding the session.
    holder: Option<Arc<Control>>,
    /// When the session went offline (for expiry).
    offline_since: Instant,
    /// The session's queue while a connection holds the state (for
    /// [`Sessions::outbox`]).
    outbox: Option<Arc<Outbox>>,
}

/// Client identifier -> session.
#[derive(Default)]
pub struct Sessions {
    /// Locked on connect, disconnect and expiry sweeps; never on the
    /// publish path.
    slots: Mutex<HashMap<MqttString, Slot>>,
    /// Notified whenever a connection hands its session back (a takeover
    /// waits for that of the connection it took over).
    handed_back: Notify,
}

/// How long a connection taking over waits for the old one to finish.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

/// What a connecting client gets from [`Sessions::attach`].
pub struct Attached {
    /// The existing session, if there was one (the caller resumes it, or
    /// ends it when the client asked for a clean start).
    pub previous: Option<SessionState>,
    /// Whether another connection was taken over.
    pub took_over: bool,
}

impl Sessions {
    /// Registers `control` as the holder of `client_id`'s session, taking
    /// over (and waiting for) any connection that holds it now, and hands
    /// out the existing session state.
    pub async fn attach(
        &self,
        client_id: &MqttString,
        control: Arc<Control>,
        resume: bool,
    ) -> Attached {
        let previous_holder = {
            let mut slots = self.slots.lock();
            let slot = slots.entry(client_id.clone()).or_insert_with(|| Slot {
                state: None,
                holder: None,
                offline_since: Instant::now(),
                outbox: None,
            });
            let old = slot.holder.replace(control.clone());
            if let Some(old) = &old {
                old.resumed.store(resume, Ordering::Release);
                old.kick(slot.outbox.as_deref());
            }
            old
        };
        let took_over = previous_holder.is_some();
        if let Some(old) = previous_holder {
            // A timeout only means the old task is slow to notice; its
            // session comes back whenever it finishes.
            let _ = tokio::time::timeout(TAKEOVER_WAIT, old.handed_back(&self.handed_back)).await;
        }
        let previous = self
            .slots
            .lock()
            .get_mut(client_id)
            .and_then(|slot| slot.state.take())
            .map(|state| *state);
        Attached {
            previous,
            took_over,
        }
    }

    /// Tells every connection holding a session to look at the broker's
    /// shutdown flag (set before this is called): the connection loop
    /// waits on its kick signal rather than on a shutdown watch of its
    /// own, which would add 144 bytes to every connection.
    pub fn kick_all(&self) {
        for slot in self.slots.lock().values() {
            if let Some(holder) = &slot.holder {
                holder.kick(slot.outbox.as_deref());
            }
        }
    }

    /// Hands a session back when its connection ends. A persistent session
    /// (`keep`) stays for its expiry; otherwise the caller has ended it and
    /// passes `None`. Then signals anyone waiting to take over.
    pub fn detach(&self, client_id: &MqttString, control: &Control, state: Option<SessionState>) {
        let mut slots = self.slots.lock();
        if let Some(slot) = slots.get_mut(client_id) {
            let still_holder = slot
                .holder
                .as_ref()
                .is_some_and(|h| h.connection == control.connection);
            if still_holder {
                slot.holder = None;
            }
            slot.offline_since = Instant::now();
            slot.state = state.map(Box::new);
            if slot.holder.is_none() && slot.state.is_none() {
                slots.remove(client_id);
            }
        }
        drop(slots);
        control.finish(&self.handed_back);
    }

    /// Takes the state of `client_id`'s session if it is offline (held by
    /// no connection); the caller puts it back with
    /// [`Sessions::insert_offline`].
    pub fn take_offline(&self, client_id: &MqttString) -> Option<SessionState> {
        let mut slots = self.slots.lock();
        let slot = slots.get_mut(client_id)?;
        if slot.holder.is_some() {
            return None;
        }
        let state = slot.state.take();
        slots.remove(client_id);
        state.map(|state| *state)
    }

    /// Records the queue of the session a connection now holds.
    pub fn set_outbox(&self, client_id: &MqttString, outbox: Arc<Outbox>) {
        if let Some(slot) = self.slots.lock().get_mut(client_id) {
            slot.outbox = Some(outbox);
        }
    }

    /// The queue of `client_id`'s session, online or offline.
    pub fn outbox(&self, client_id: &str) -> Option<Arc<Outbox>> {
        let key = MqttString::new(client_id).ok()?;
        let slots = self.slots.lock();
        let slot = slots.get(&key)?;
        slot.state
            .as_ref()
            .map(|s| s.outbox.clone())
            .or_else(|| slot.outbox.clone())
    }

    /// Every session's queue, and whether a connection holds it.
    pub fn queues(&self) -> Vec<(MqttString, Arc<Outbox>, bool)> {
        self.slots
            .lock()
            .iter()
            .filter_map(|(id, slot)| {
                let outbox = slot
                    .state
                    .as_ref()
                    .map(|s| s.outbox.clone())
                    .or_else(|| slot.outbox.clone())?;
                Some((id.clone(), outbox, slot.holder.is_some()))
            })
            .collect()
    }

    /// Inserts a session recovered from the store, offline since
    /// `offline_since`.
    pub fn insert_offline(&self, state: SessionState, offline_since: Instant) {
        self.slots.lock().insert(
            state.client_id.clone(),
            Slot {
                state: Some(Box::new(state)),
                holder: None,
                offline_since,
                outbox: None,
            },
        );
    }

    /// Removes and returns the offline sessions whose expiry has passed.
    pub fn take_expired(&self, now: Instant) -> Vec<SessionState> {
        let mut slots = self.slots.lock();
        let expired: Vec<MqttString> = slots
            .iter()
            .filter(|(_, slot)| {
                slot.holder.is_none()
                    && slot.state.as_ref().is_some_and(|s| {
                        now.saturating_duration_since(slot.offline_since) >= s.expiry()
                    })
            })
            .map(|(id, _)| id.clone())
            .collect();
        expired
            .into_iter()
            .filter_map(|id| slots.remove(&id).and_then(|slot| slot.state))
            .map(|state| *state)
            .collect()
    }
}
