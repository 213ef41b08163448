//! The [`Store`]: where the broker's durable state goes, and where it comes
//! back from at start.
//!
//! The broker describes every change to durable state as a [`StoreOp`]
//! (a session created, a message queued for a session, a message
//! acknowledged, a retained message set...). Ops travel in batches; each
//! batch has a [`Ticket`]. Tickets are taken with [`Store::begin`] and
//! every taken ticket must be submitted (a [`Batch`] does that, even when
//! dropped), because the store applies batches strictly in ticket order
//! and reports durability as a watermark: "every batch up to ticket N is
//! durable". A publisher waits for its ticket before acknowledging; a
//! subscriber's connection sends a queued message only once the ticket
//! that queued it is durable.
//!
//! Writes complete asynchronously, also in [`MemoryStore`]: nothing in the
//! broker assumes a write is durable when `submit` returns. This is the
//! seam where the RocksDB store plugs in.

mod memory;

use std::sync::Arc;

use ferrymq_codec::{MqttString, QoS, SubscriptionOptions};
use tokio::sync::watch;

use crate::message::Message;

pub use memory::MemoryStore;

/// Orders batches; "durable up to ticket N" covers every batch <= N.
pub type Ticket = u64;

/// A session as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// The client identifier.
    pub client_id: MqttString,
    /// The session number: new at every clean start, never reused; the
    /// prefix of every key of the session's state.
    pub number: u64,
    /// Session Expiry Interval in seconds (`u32::MAX`: never).
    pub expiry_secs: u32,
}

/// A subscription as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionRecord {
    /// The options the client asked for (QoS is the granted QoS).
    pub options: SubscriptionOptions,
    /// MQTT 5.0 Subscription Identifier.
    pub identifier: Option<u32>,
}

/// Where an outbound QoS 1/2 message is in its exchange with the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboundPhase {
    /// PUBLISH sent, waiting for PUBACK / PUBREC.
    Sent,
    /// QoS 2: PUBREC received, PUBREL sent, waiting for PUBCOMP.
    Released,
}

/// One change to durable state.
#[derive(Debug, Clone)]
pub enum StoreOp {
    /// A session began (or its expiry changed).
    SessionPut(SessionRecord),
    /// A session ended: it and everything keyed by its number go.
    SessionDelete {
        /// Its client identifier.
        client_id: MqttString,
        /// Its number.
        number: u64,
    },
    /// A subscription was made or replaced.
    SubscriptionPut {
        /// Session number.
        number: u64,
        /// Topic filter.
        filter: MqttString,
        /// Options and identifier.
        subscription: SubscriptionRecord,
    },
    /// A subscription was removed.
    SubscriptionDelete {
        /// Session number.
        number: u64,
        /// Topic filter.
        filter: MqttString,
    },
    /// A message was queued for a session.
    QueuePut {
        /// Session number.
        number: u64,
        /// Position in the session's queue.
        seq: u64,
        /// The delivery QoS.
        qos: QoS,
        /// The RETAIN flag of the delivery.
        retain: bool,
        /// The Subscription Identifiers of the delivery.
        identifiers: Option<Arc<[u32]>>,
        /// The message.
        message: Arc<Message>,
    },
    /// A queued message left the queue (acknowledged, expired or dropped).
    QueueDelete {
        /// Session number.
        number: u64,
        /// Position in the session's queue.
        seq: u64,
    },
    /// An outbound QoS 1/2 message got a packet identifier, or moved to
    /// its second QoS 2 phase.
    InflightPut {
        /// Session number.
        number: u64,
        /// Packet identifier.
        packet_id: u16,
        /// The queue position of the message (its body stays there until
        /// PUBACK or PUBREC).
        seq: u64,
        /// Where the exchange is.
        phase: OutboundPhase,
    },
    /// An outbound exchange completed (PUBACK or PUBCOMP).
    InflightDelete {
        /// Session number.
        number: u64,
        /// Packet identifier.
        packet_id: u16,
    },
    /// An inbound QoS 2 PUBLISH was accepted; its packet identifier is held
    /// until PUBREL so a resend is recognised.
    Qos2Received {
        /// Session number.
        number: u64,
        /// Packet identifier.
        packet_id: u16,
    },
    /// PUBREL released an inbound QoS 2 packet identifier.
    Qos2Released {
        /// Session number.
        number: u64,
        /// Packet identifier.
        packet_id: u16,
    },
    /// A retained message was set (replacing any on its topic).
    RetainedPut(Arc<Message>),
    /// A topic's retained message was cleared.
    RetainedDelete(MqttString),
}

/// A queued message as recovered.
#[derive(Debug, Clone)]
pub struct QueuedRecord {
    /// Position in the session's queue.
    pub seq: u64,
    /// Delivery QoS.
    pub qos: QoS,
    /// Delivery RETAIN flag.
    pub retain: bool,
    /// Subscription Identifiers of the delivery.
    pub identifiers: Option<Arc<[u32]>>,
    /// The message.
    pub message: Arc<Message>,
}

/// An outbound exchange as recovered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InflightRecord {
    /// Packet identifier.
    pub packet_id: u16,
    /// Queue position of the message.
    pub seq: u64,
    /// Where the exchange is.
    pub phase: OutboundPhase,
}

/// Everything of one session, as recovered at start.
#[derive(Debug, Clone)]
pub struct RecoveredSession {
    /// The session.
    pub record: SessionRecord,
    /// Its subscriptions.
    pub subscriptions: Vec<(MqttString, SubscriptionRecord)>,
    /// Its queue, in sequence order.
    pub queue: Vec<QueuedRecord>,
    /// Its outbound exchanges.
    pub inflight: Vec<InflightRecord>,
    /// Inbound QoS 2 packet identifiers awaiting PUBREL.
    pub qos2_received: Vec<u16>,
}

/// The durable state, as read at start.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    /// Sessions, with their state.
    pub sessions: Vec<RecoveredSession>,
    /// Retained messages.
    pub retained: Vec<Arc<Message>>,
    /// Greater than every session number ever stored (deleted ones
    /// included), so numbers are never reused.
    pub next_session_number: u64,
}

/// The store's progress, published on a watch channel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Durable {
    /// Every batch up to this ticket is durable.
    pub up_to: Ticket,
    /// Set when a write failed: nothing after it will become durable, and
    /// the broker stops (it never acknowledges what it could not store).
    pub failed: Option<Arc<str>>,
}

/// Why the store could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

/// Durable state. See the module documentation for the ticket protocol.
pub trait Store: Send + Sync + 'static {
    /// Takes the next ticket. It must be submitted, soon and without
    /// waiting in between: later tickets wait for it.
    fn begin(&self) -> Ticket;

    /// Submits the ops of a ticket taken with [`Store::begin`] (possibly
    /// none). Returns at once; durability is reported by [`Store::durable`].
    fn submit(&self, ticket: Ticket, ops: Vec<StoreOp>);

    /// The durability watermark.
    fn durable(&self) -> watch::Receiver<Durable>;

    /// Reads the whole durable state (at start).
    fn load(&self) -> Result<Recovered, StoreError>;
}

/// A batch being filled: takes its ticket on the first op, submits on
/// [`Batch::submit`] or when dropped, so no ticket is ever left hanging.
pub struct Batch<'a> {
    store: &'a dyn Store,
    ticket: Option<Ticket>,
    ops: Vec<StoreOp>,
}

impl<'a> Batch<'a> {
    /// An empty batch; no ticket is taken until an op is added.
    pub fn new(store: &'a dyn Store) -> Self {
        Batch {
            store,
            ticket: None,
            ops: Vec::new(),
        }
    }

    /// Adds an op (taking the ticket if this is the first).
    pub fn push(&mut self, op: StoreOp) {
        if self.ticket.is_none() {
            self.ticket = Some(self.store.begin());
        }
        self.ops.push(op);
    }

    /// Takes the ticket now even without ops (to order a later submit).
    pub fn ticket(&mut self) -> Ticket {
        *self.ticket.get_or_insert_with(|| self.store.begin())
    }

    /// Whether a ticket was taken.
    pub fn has_ticket(&self) -> bool {
        self.ticket.is_some()
    }

    /// Submits; returns the ticket to wait for (0: nothing to wait for).
    pub fn submit(mut self) -> Ticket {
        self.flush()
    }

    fn flush(&mut self) -> Ticket {
        match self.ticket.take() {
            Some(ticket) => {
                self.store.submit(ticket, std::mem::take(&mut self.ops));
                ticket
            }
            None => 0,
        }
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Submits ops nobody waits for (acknowledgements, deletions).
pub fn write(store: &dyn Store, ops: Vec<StoreOp>) {
    if !ops.is_empty() {
        let ticket = store.begin();
        store.submit(ticket, ops);
    }
}
