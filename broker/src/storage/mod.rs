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

#[cfg(feature = "rocksdb")]
mod inspect;
mod memory;
// Used by the RocksDB store and the ferry's frames; without the store
// (the fuzz build) part of it is idle.
#[cfg_attr(not(feature = "rocksdb"), allow(dead_code))]
pub(crate) mod record;
#[cfg(feature = "rocksdb")]
mod rocks;

use std::sync::Arc;
use std::time::Duration;

use ferrymq_codec::{MqttString, QoS, SubscriptionOptions};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::dedup::DedupOrigin;
use crate::message::Message;

#[cfg(feature = "rocksdb")]
pub use inspect::{ListedMessage, QueueLine, QueueReport, queue_list, queue_stats};
pub use memory::MemoryStore;
pub use record::TimeBase;
#[cfg(feature = "rocksdb")]
pub use rocks::{RocksOptions, RocksStore, SyncSummary};

/// Broker time: milliseconds the node has been running, summed over its
/// runs (and over downtime while the wall clock can be trusted). Expiry
/// deadlines are stored in broker time, so a gateway without a real-time
/// clock, or whose clock jumps, never expires everything at once.
#[derive(Debug)]
pub struct BrokerClock {
    base: Instant,
    base_ms: u64,
}

impl BrokerClock {
    /// A clock reading `ms` now.
    pub fn starting_at(ms: u64) -> BrokerClock {
        BrokerClock {
            base: Instant::now(),
            base_ms: ms,
        }
    }

    /// Broker milliseconds now.
    pub fn now_ms(&self) -> u64 {
        self.to_ms(Instant::now())
    }
}

impl TimeBase for BrokerClock {
    fn to_ms(&self, at: Instant) -> u64 {
        if at >= self.base {
            self.base_ms
                .saturating_add((at - self.base).as_millis() as u64)
        } else {
            self.base_ms
                .saturating_sub((self.base - at).as_millis() as u64)
        }
    }

    fn to_instant(&self, ms: u64) -> Instant {
        if ms >= self.base_ms {
            self.base + Duration::from_millis(ms - self.base_ms)
        } else {
            self.base
                .checked_sub(Duration::from_millis(self.base_ms - ms))
                .unwrap_or(self.base)
        }
    }
}

/// A will waiting for its Will Delay Interval, stored with its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredWill {
    /// The will message.
    pub message: Arc<Message>,
    /// When it is due, in broker milliseconds.
    pub due_ms: u64,
}

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
    /// When the session went offline (broker milliseconds); `None` while a
    /// connection holds it.
    pub offline_since_ms: Option<u64>,
    /// A will waiting for its delay.
    pub pending_will: Option<StoredWill>,
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
        /// Session (or group) number.
        number: u64,
        /// Position in the queue.
        seq: u64,
        /// Its payload size, for the queue's byte count.
        size: u64,
    },
    /// An outbound QoS 1/2 message got a packet identifier, or moved to
    /// its second QoS 2 phase.
    InflightPut {
        /// Session number.
        number: u64,
        /// Packet identifier.
        packet_id: u16,
        /// The queue holding the message body (the session's, or a shared
        /// group's), where it stays until PUBACK or PUBREC.
        queue: u64,
        /// The message's position in that queue.
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
    /// A shared subscription group was created.
    GroupPut {
        /// Its number (from the session number sequence).
        number: u64,
        /// Share name.
        name: MqttString,
        /// Topic filter.
        filter: MqttString,
    },
    /// A shared subscription group ended: it and its queue go.
    GroupDelete {
        /// Its number.
        number: u64,
    },
    /// A trusted sender's message id was taken (see `dedup`), in the
    /// batch that routed the message.
    DedupTake {
        /// Its origin queue.
        origin: DedupOrigin,
        /// The origin's floor now: every number below it was taken.
        floor: u64,
        /// The number, when it stays above the floor.
        mark: Option<u64>,
        /// Marks written before went below the floor (delete them).
        clear: bool,
        /// When (broker ms), for forgetting idle origins.
        at_ms: u64,
    },
    /// An origin silent for `forget_after_secs` was forgotten.
    DedupForget {
        /// The origin.
        origin: DedupOrigin,
    },
    /// The state clock's reading (`[state]`), in the batch of the state
    /// write that took it: the stored value only ever grows.
    StateClock(u64),
}

/// What the store kept of one de-duplication origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredOrigin {
    /// The origin.
    pub origin: DedupOrigin,
    /// Every number below it was taken.
    pub floor: u64,
    /// Numbers taken above the floor.
    pub marks: Vec<u64>,
    /// When it last took a number (broker ms).
    pub last_ms: u64,
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
    /// When it was queued (broker time, ms).
    pub queued_ms: u64,
}

/// An outbound exchange as recovered.
#[derive(Debug, Clone)]
pub struct InflightRecord {
    /// Packet identifier.
    pub packet_id: u16,
    /// The queue holding the message.
    pub queue: u64,
    /// Its position there.
    pub seq: u64,
    /// Where the exchange is.
    pub phase: OutboundPhase,
    /// The message, for an exchange still in its first phase.
    pub body: Option<QueuedRecord>,
}

/// What a queue holds, without reading it (start-up never scans queues).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueSummary {
    /// Messages in it (those in flight included).
    pub count: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Above every sequence number ever used in it.
    pub next_seq: u64,
}

/// Everything of one session, as recovered at start.
#[derive(Debug, Clone)]
pub struct RecoveredSession {
    /// The session.
    pub record: SessionRecord,
    /// Its subscriptions.
    pub subscriptions: Vec<(MqttString, SubscriptionRecord)>,
    /// Its queue (read page by page when it is drained).
    pub queue: QueueSummary,
    /// Its outbound exchanges.
    pub inflight: Vec<InflightRecord>,
    /// Inbound QoS 2 packet identifiers awaiting PUBREL.
    pub qos2_received: Vec<u16>,
}

/// A shared subscription group, as recovered at start.
#[derive(Debug, Clone)]
pub struct RecoveredGroup {
    /// Its number.
    pub number: u64,
    /// Share name.
    pub name: MqttString,
    /// Topic filter.
    pub filter: MqttString,
    /// Its queue.
    pub queue: QueueSummary,
}

/// The durable state, as read at start.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    /// Sessions, with their state.
    pub sessions: Vec<RecoveredSession>,
    /// Shared subscription groups.
    pub groups: Vec<RecoveredGroup>,
    /// Retained messages.
    pub retained: Vec<Arc<Message>>,
    /// Greater than every session number ever stored (deleted ones
    /// included), so numbers are never reused.
    pub next_session_number: u64,
    /// De-duplication origins (`[ferry]`).
    pub dedup: Vec<RecoveredOrigin>,
    /// The highest state clock reading stored (0: none).
    pub state_clock: u64,
    /// Records that could not be read and were skipped.
    pub corrupt: u64,
    /// Broker time last saved by the previous run (at most one save
    /// interval before it ended): when sessions that were online at a
    /// crash went offline, as near as is known.
    pub previous_run_ms: u64,
}

/// The store's progress, published on a watch channel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Durable {
    /// Every batch up to this ticket is done: written, or failed.
    pub up_to: Ticket,
    /// Recent ranges of tickets whose write failed (inclusive), oldest
    /// first, a bounded list: a waiter whose ticket is in one must not
    /// acknowledge.
    pub failed: Arc<[(Ticket, Ticket)]>,
}

impl Durable {
    /// Whether the batch of `ticket` is done and durable.
    pub fn is_durable(&self, ticket: Ticket) -> bool {
        ticket <= self.up_to && !self.is_failed(ticket)
    }

    /// Whether the batch of `ticket` failed to be written.
    pub fn is_failed(&self, ticket: Ticket) -> bool {
        self.failed
            .iter()
            .any(|(from, to)| (*from..=*to).contains(&ticket))
    }
}

/// Why the store could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

/// Who this node is, as stamped on every message that leaves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeIdentity {
    /// Random at the store's creation, kept forever (host names are not
    /// identities: cloned gateway images share them).
    pub uuid: [u8; 16],
    /// The run: bumped (and synced) at every start.
    pub epoch: u64,
}

impl NodeIdentity {
    /// The first queue sequence of this run: the epoch in the high bits,
    /// so sequences never repeat across runs even if a queue's counter
    /// were lost, and `seq >> SEQ_EPOCH_SHIFT` tells the run that queued a
    /// message.
    pub fn first_seq(&self) -> u64 {
        (self.epoch << SEQ_EPOCH_SHIFT) | 1
    }
}

pub use crate::message::SEQ_EPOCH_SHIFT;

/// 16 random bytes (from /dev/urandom; the clock and process id if it
/// cannot be read).
pub(crate) fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut id))
        .is_err()
    {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ (u64::from(std::process::id()) << 32);
        id[..8].copy_from_slice(&seed.to_be_bytes());
        id[8..].copy_from_slice(&seed.rotate_left(17).to_be_bytes());
    }
    id
}

/// A store's disk use and WAL sync times ([`Store::disk`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskUse {
    /// Bytes of the store's files.
    pub used_bytes: u64,
    /// `max_disk_bytes` (0: no disk).
    pub budget_bytes: u64,
    /// Free and total bytes of the filesystem holding the store.
    pub filesystem: Option<(u64, u64)>,
    /// WAL syncs by duration: entry `i` counts syncs that took less than
    /// 2^i microseconds (and at least 2^(i-1)).
    pub sync_micros_log2: Vec<u64>,
}

/// Durable state. See the module documentation for the ticket protocol.
pub trait Store: Send + Sync + 'static {
    /// This node's identity (valid once [`Store::load`] ran).
    fn identity(&self) -> NodeIdentity;

    /// Whether a long queue may be left on disk and paged in as it is
    /// drained, instead of also being held in memory.
    fn pages_queues(&self) -> bool {
        false
    }

    /// The broker clock (broker time continues across restarts).
    fn clock(&self) -> Arc<BrokerClock>;

    /// Up to `max` queued messages of queue `number` from `from_seq` on,
    /// in order (a queue is paged in when drained).
    fn read_queue(&self, number: u64, from_seq: u64, max: usize) -> Vec<QueuedRecord>;

    /// Whether writes succeed; while they fail, new QoS 1/2 messages that
    /// would need the store are refused.
    fn healthy(&self) -> bool {
        true
    }

    /// Whether the disk budget (`max_disk_bytes`) is used up for a queue
    /// that may fill the bridges' reserve (`reserve`), or the part outside
    /// it for any other queue and retained messages.
    fn over_budget(&self, reserve: bool) -> bool {
        let _ = reserve;
        false
    }

    /// WAL syncs done so far (0 for a store without a disk).
    fn wal_syncs(&self) -> u64 {
        0
    }

    /// Disk use and WAL sync times, as last measured (nothing for a store
    /// without a disk).
    fn disk(&self) -> DiskUse {
        DiskUse::default()
    }

    /// Writes everything pending and stops the writer (broker shutdown).
    fn close(&self) {}

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
pub fn write(store: &dyn Store, ops: Vec<StoreOp>) -> Ticket {
    if ops.is_empty() {
        return 0;
    }
    let ticket = store.begin();
    store.submit(ticket, ops);
    ticket
}
