//! [`Outbox`]: the bounded queue of messages waiting to be sent to one
//! session (or shared group), online or offline. Publishers push without
//! waiting (unless the policy is `block`); the session's connection drains
//! it.
//!
//! A stored queue is held in memory only up to a small bound: with a store
//! that pages queues (RocksDB), a persistent session's queue beyond 1,024
//! messages or 4 MiB stays on disk only (it is written there anyway) and
//! is paged in as it is drained, so a long outage costs disk, not memory.
//! A queue recovered at start is such a backlog from the outset. Paging
//! reads only what is durable: each spilled run of messages remembers the
//! store ticket that writes it. Limits count memory and disk alike.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicUsize, Ordering};

use ferrymq_codec::QoS;
use ferrymq_config::QueueFull;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::doorbell::{Doorbell, READY};
use crate::message::Message;
use crate::storage::{Durable, QueueSummary, Store, Ticket};

/// A shared subscription group (`shared_sub.rs`) as its queue's users see
/// it: the router wakes its members after a push, and a delivery pulled
/// from it goes back there when the member's session ends without
/// acknowledging it. (A trait, so that the queue and the router, below
/// the groups, do not import them.)
pub trait GroupQueue: Send + Sync + std::fmt::Debug {
    /// The group's number (its queue's, from the session number sequence).
    fn number(&self) -> u64;
    /// Wakes every member's connection: there is something to pull.
    fn wake(&self);
    /// Puts unacknowledged QoS 1 deliveries of a member whose session
    /// ended back at the front of the group's queue, for another member.
    fn give_back(&self, deliveries: Vec<Delivery>);
}

/// One message on its way to one session.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The shared message.
    pub message: Arc<Message>,
    /// min(published QoS, granted QoS).
    pub qos: QoS,
    /// The RETAIN flag to send.
    pub retain: bool,
    /// Position in its queue (assigned by [`Outbox::push`]).
    pub seq: u64,
    /// The number of the queue `seq` belongs to (the session's, or the
    /// shared group's it was pulled from).
    pub queue: u64,
    /// Not to be sent before this store ticket is durable (0: at once).
    pub ticket: Ticket,
    /// Whether the store holds it (its removal must be stored too).
    pub stored: bool,
    /// MQTT 5.0 Subscription Identifiers of the matching subscriptions.
    pub identifiers: Option<Arc<[u32]>>,
    /// The shared subscription group it was pulled from, if any (an
    /// unacknowledged QoS 1 message goes back there when the session ends).
    pub group: Option<Arc<dyn GroupQueue>>,
    /// When it was queued (broker time, ms).
    pub queued_ms: u64,
}

impl Delivery {
    /// Its payload size.
    pub fn size(&self) -> u64 {
        self.message.payload.len() as u64
    }
}

/// A delivery as a queue holds it: only what differs from entry to entry
/// (its queue's number and shared group are the outbox's, added when it
/// leaves), so that a long queue costs as little as it can.
#[derive(Debug)]
struct Queued {
    message: Arc<Message>,
    seq: u64,
    ticket: Ticket,
    queued_ms: u64,
    identifiers: Option<Arc<[u32]>>,
    qos: QoS,
    retain: bool,
    stored: bool,
}

impl Queued {
    fn new(d: Delivery) -> Queued {
        Queued {
            message: d.message,
            seq: d.seq,
            ticket: d.ticket,
            queued_ms: d.queued_ms,
            identifiers: d.identifiers,
            qos: d.qos,
            retain: d.retain,
            stored: d.stored,
        }
    }

    /// The delivery again, of the queue numbered `queue`.
    fn delivery(self, queue: u64) -> Delivery {
        Delivery {
            message: self.message,
            qos: self.qos,
            retain: self.retain,
            seq: self.seq,
            queue,
            ticket: self.ticket,
            stored: self.stored,
            identifiers: self.identifiers,
            group: None,
            queued_ms: self.queued_ms,
        }
    }

    fn size(&self) -> u64 {
        self.message.payload.len() as u64
    }
}

/// How much one queue holds ([`crate::Broker::queue_depth`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueDepth {
    /// Messages queued, in memory and on disk (not those in flight).
    pub messages: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// When the oldest one held in memory was queued (broker ms); `None`
    /// when nothing is in memory (an empty queue, or all of it on disk).
    pub oldest_queued_ms: Option<u64>,
}

/// What [`Outbox::pop_ready`] found.
#[derive(Debug)]
pub enum Pop {
    /// The first delivery, removed.
    Got(Delivery),
    /// Nothing queued.
    Empty,
    /// The first delivery waits for its store ticket.
    WaitDurable,
    /// The first delivery's QoS has no room in the receiver's window.
    WaitWindow,
}

/// Limits and policies of a session's queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Most messages queued at once.
    pub max_messages: u32,
    /// Most payload bytes queued at once.
    pub max_bytes: usize,
    /// What happens when a message does not fit.
    pub policy: QueueFull,
    /// Queue QoS 0 messages while the session is offline.
    pub queue_qos0: bool,
}

/// A delivery dropped to make room (drop-oldest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evicted {
    /// Its position.
    pub seq: u64,
    /// Whether the store holds it.
    pub stored: bool,
    /// Its payload size.
    pub size: u64,
    /// Dropped because every queue's memory together reached its bound
    /// ([`QueueMemory`]), not because its own queue was full.
    pub by_memory: bool,
}

/// The memory every queue of a broker holds in queued messages, against
/// `storage.max_queued_memory`: [`ENTRY_COST`] for each delivery held in
/// memory, plus each payload they hold once (a message queued for many
/// sessions shares one payload; [`Message::holders`] counts its entries).
/// What leaves a queue gives its part back. At the bound a stored queue
/// keeps new deliveries on disk only, and a queue held in memory only
/// counts as full (its `queue_full` policy applies) once it holds its fair
/// share, the bound divided among the queues holding something: the
/// subscribers that do not read are cut back to their share (drop-oldest
/// takes them down to it), while a client that reads, whose queue is
/// short, keeps getting every message. An empty queue always takes one.
///
/// Every push and pop on every thread changes these counts: one counter
/// for all would be a cache line the cores take from each other at every
/// delivery (a fan-out to 50 subscribers spent about a quarter more CPU a
/// delivery on it). So each thread counts in a shard of its own (one it
/// owns and writes alone, see `bump`), and a shard passes what it holds
/// on to the total the bound is checked against once it is more than
/// [`QueueMemory::chunk`] either way: that total is behind by at most a
/// chunk a shard (`SHARDS` × 64 KiB at most, none with a bound under 64
/// MiB). What [`QueueMemory::used`] reports is the total and the shards
/// together.
#[derive(Debug, Default)]
pub struct QueueMemory {
    /// Bytes charged, but for what the shards have not passed on.
    used: AtomicIsize,
    /// 0: no bound.
    limit: AtomicUsize,
    /// How much a shard holds before it passes it on (0: at once).
    chunk: AtomicUsize,
    shards: [Shard; SHARDS],
}

/// The shards of [`QueueMemory`]'s counts: one a thread, but for the
/// last ([`SHARED`]), which the threads that find none free share.
const SHARDS: usize = 8;

/// The shard shared by the threads beyond the first `SHARDS - 1`.
const SHARED: usize = SHARDS - 1;

/// One thread's counts (a cache line of its own, and the next: the
/// prefetcher takes lines in pairs).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    /// Bytes charged here and not yet passed on to the total.
    used: AtomicIsize,
    /// Queues that began holding something here, less those that stopped.
    holders: AtomicIsize,
}

/// Adds `delta` to one of a shard's counts and returns the new count.
/// Only its owner writes an owned shard, so a plain read and write do: a
/// locked add would also wait, at every push and pop, for the queue's
/// writes and the message's read before it. The shared one takes locked
/// adds.
fn bump(count: &AtomicIsize, delta: isize, owned: bool) -> isize {
    if owned {
        let now = count.load(Ordering::Relaxed) + delta;
        count.store(now, Ordering::Relaxed);
        now
    } else {
        count.fetch_add(delta, Ordering::Relaxed) + delta
    }
}

/// Which shards a thread owns (bit `i`: shard `i`), for every
/// [`QueueMemory`] alike.
static OWNED: AtomicUsize = AtomicUsize::new(0);

/// A thread's shard, owned until the thread ends (then free for the
/// next: what it counted stays counted there).
struct ShardOwner(usize);

impl ShardOwner {
    fn take() -> ShardOwner {
        let mut owned = OWNED.load(Ordering::Relaxed);
        loop {
            let free = (!owned).trailing_zeros() as usize;
            if free >= SHARED {
                return ShardOwner(SHARED);
            }
            // Acquire: the last owner's counts are seen before writing on.
            match OWNED.compare_exchange_weak(
                owned,
                owned | 1 << free,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return ShardOwner(free),
                Err(now) => owned = now,
            }
        }
    }
}

impl Drop for ShardOwner {
    fn drop(&mut self) {
        if self.0 != SHARED {
            OWNED.fetch_and(!(1 << self.0), Ordering::Release);
        }
    }
}

/// The calling thread's shard (the shared one while the thread ends).
fn shard_index() -> usize {
    thread_local! {
        static SHARD: ShardOwner = ShardOwner::take();
    }
    SHARD.try_with(|s| s.0).unwrap_or(SHARED)
}

/// What one queued delivery costs besides its payload: the entry and its
/// share of the queue's spare slots.
pub const ENTRY_COST: usize = std::mem::size_of::<Queued>() * 9 / 8;

impl QueueMemory {
    /// A budget of `limit` bytes (0: no bound).
    pub fn new(limit: u64) -> Arc<Self> {
        let memory = Arc::new(QueueMemory::default());
        memory.set_limit(limit);
        memory
    }

    /// Puts a new bound in force (a reload).
    pub fn set_limit(&self, limit: u64) {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        self.limit.store(limit, Ordering::Relaxed);
        self.chunk.store(Self::chunk(limit), Ordering::Relaxed);
    }

    /// How far behind a shard may leave the total under `limit`: a
    /// thousandth of it, at most 64 KiB, and nothing under 64 MiB (small
    /// bounds are counted exactly). With no bound (0) nothing is checked
    /// against the total: 64 KiB, so that every push and pop does not
    /// update it.
    fn chunk(limit: usize) -> usize {
        const MAX: usize = 64 << 10;
        if limit == 0 {
            MAX
        } else if limit < 64 << 20 {
            0
        } else {
            (limit / 1024).min(MAX)
        }
    }

    /// Bytes charged now (the shards' counts included).
    pub fn used(&self) -> usize {
        let pending: isize = self
            .shards
            .iter()
            .map(|s| s.used.load(Ordering::Relaxed))
            .sum();
        (self.used.load(Ordering::Relaxed) + pending).max(0) as usize
    }

    /// The total the bound is checked against (behind `used` by what the
    /// shards hold).
    fn total(&self) -> isize {
        self.used.load(Ordering::Relaxed)
    }

    /// Whether `more` bytes would take the total past the bound.
    fn over(&self, more: usize) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        limit != 0 && self.total().saturating_add_unsigned(more) > limit as isize
    }

    /// Whether queue `q` (its entries charged `q.charged` at the last
    /// settle and cost `q.footprint()` now, its payloads changed by
    /// `q.payload_delta` since) would take the total past the bound with
    /// `more` bytes, and itself (what it holds, payloads included) past its
    /// share.
    fn over_share(&self, q: &Queue, more: usize) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        let total = self.total() + q.footprint() as isize - q.charged as isize
            + q.payload_delta
            + more as isize;
        limit != 0 && total > limit as isize && q.holding() + more > self.share()
    }

    /// What queuing one more delivery of `message` adds: its entry, and its
    /// payload unless another entry holds it already.
    fn cost(message: &Message) -> usize {
        let shared = message.holders.0.load(Ordering::Relaxed) > 0;
        ENTRY_COST + if shared { 0 } else { message.payload.len() }
    }

    /// Adds `delta` bytes in this thread's shard; returns the shard and
    /// whether the thread owns it.
    fn add(&self, delta: isize) -> (&Shard, bool) {
        let index = shard_index();
        let (shard, owned) = (&self.shards[index], index != SHARED);
        if delta != 0 {
            let held = bump(&shard.used, delta, owned);
            if held.unsigned_abs() > self.chunk.load(Ordering::Relaxed) {
                let moved = if owned {
                    shard.used.store(0, Ordering::Relaxed);
                    held
                } else {
                    shard.used.swap(0, Ordering::Relaxed)
                };
                self.used.fetch_add(moved, Ordering::Relaxed);
            }
        }
        (shard, owned)
    }

    /// The bound divided among the queues holding something (asked only
    /// at the bound).
    fn share(&self) -> usize {
        let holders: isize = self
            .shards
            .iter()
            .map(|s| s.holders.load(Ordering::Relaxed))
            .sum();
        self.limit.load(Ordering::Relaxed) / holders.max(1) as usize
    }

    /// Moves a queue's charge for its entries from `from` to `to` bytes
    /// and adds `payloads` (what its holds and releases changed): one
    /// update of this thread's shard per push or pop.
    fn recharge(&self, from: usize, to: usize, payloads: isize) {
        let (shard, owned) = self.add(to as isize - from as isize + payloads);
        match (from, to) {
            (0, 1..) => {
                bump(&shard.holders, 1, owned);
            }
            (1.., 0) => {
                bump(&shard.holders, -1, owned);
            }
            _ => {}
        }
    }
}

/// What an entry that now holds `message` adds to the payloads counted:
/// its size, for the first entry holding it.
fn held(message: &Message) -> isize {
    if message.holders.0.fetch_add(1, Ordering::Relaxed) == 0 {
        message.payload.len() as isize
    } else {
        0
    }
}

/// What an entry that lets `message` go takes from the payloads counted:
/// its size, for the last entry holding it.
fn let_go(message: &Message) -> isize {
    if message.holders.0.fetch_sub(1, Ordering::Relaxed) == 1 {
        -(message.payload.len() as isize)
    } else {
        0
    }
}

/// What happened to a pushed delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pushed {
    /// Queued at `seq` (to be stored when `stored`); with drop-oldest,
    /// `evicted` lists the oldest deliveries dropped to make room: their
    /// store entries must be deleted, and each drop is counted.
    Queued {
        /// Its position.
        seq: u64,
        /// Whether it must be stored.
        stored: bool,
        /// Deliveries dropped to make room.
        evicted: Vec<Evicted>,
    },
    /// Not queued: the queue is full and the policy drops the new message.
    DroppedFull,
    /// Not queued: every queue's memory together is at its bound, this
    /// queue is held in memory only and not empty, and the policy drops the
    /// new message ([`QueueMemory`]).
    DroppedMemory,
    /// Not queued: the queue is full and the policy is `block` or `refuse`;
    /// the caller waits for [`Outbox::space`] or refuses the publish.
    Full,
    /// Not queued: QoS 0 for an offline session that does not queue QoS 0.
    Skipped,
    /// Not queued: the session has ended.
    Closed,
}

/// Appends to a queue that grows by a quarter when full, not by doubling:
/// a queue at its bound (10,000 by default) then holds about an eighth
/// more slots than entries instead of up to twice as many, which is most
/// of what a queued entry costs (an entry is 56 bytes; its message is
/// shared). The copies stay amortised constant per entry.
fn push_grown(items: &mut VecDeque<Queued>, delivery: Queued) {
    if items.len() == items.capacity() {
        items.reserve_exact((items.capacity() / 4).max(16));
    }
    items.push_back(delivery);
}

/// Gives a drained queue's memory back: a queue using under a quarter of
/// its slots (and more than 64 of them) halves them. Amortised constant
/// per pop, and a queue that refills grows again by quarters.
fn shrink_drained(items: &mut VecDeque<Queued>) {
    let slots = items.capacity();
    if slots > 64 && items.len() < slots / 4 {
        items.shrink_to(slots / 2);
    }
}

/// A backlog on disk, not in memory: sequences `from .. until`.
#[derive(Default)]
struct OnDisk {
    from: u64,
    until: u64,
    count: usize,
    bytes: usize,
    /// Sequences in the range already in flight (recovered), not to be
    /// paged in again.
    skip: HashSet<u64>,
    /// Sequences below this are durable (readable).
    safe_until: u64,
    /// Spilled runs not yet known durable: (end of the run, exclusive;
    /// the highest store ticket in it and before it), in order.
    pending: VecDeque<(u64, Ticket)>,
    /// Queued in memory since the backlog was recovered, logically after
    /// it (here, not in the queue: only a queue with a backlog has one).
    tail: VecDeque<Queued>,
    /// Bytes of `tail`.
    tail_bytes: usize,
}

impl OnDisk {
    /// Moves `safe_until` over the runs whose ticket is done (written, or
    /// failed: then their records are simply missing).
    fn advance(&mut self, durable: Ticket) {
        while let Some(&(end, ticket)) = self.pending.front() {
            if ticket > durable {
                break;
            }
            self.safe_until = end;
            self.pending.pop_front();
        }
    }

    /// Adds a spilled delivery; runs are merged every [`SPILL_RUN`]
    /// messages, so the bookkeeping is a few bytes per run.
    fn append(&mut self, seq: u64, size: usize, ticket: Ticket) {
        self.until = seq + 1;
        self.count += 1;
        self.bytes += size;
        match self.pending.back_mut() {
            Some((end, max)) if *end + SPILL_RUN as u64 > seq + 1 => {
                *end = seq + 1;
                *max = (*max).max(ticket);
            }
            last => {
                let before = last.map_or(0, |l| l.1);
                self.pending.push_back((seq + 1, ticket.max(before)));
            }
        }
    }
}

/// Deliveries read from disk per page.
const PAGE: usize = 256;
/// A stored queue holds at most this many deliveries in memory before the
/// rest stays on disk (with a store that pages queues).
const SPILL_MESSAGES: usize = 1024;
/// ... or this many payload bytes.
const SPILL_BYTES: usize = 4 << 20;
/// Spilled deliveries share one durability checkpoint per this many.
const SPILL_RUN: usize = 64;

struct Queue {
    /// The head of the queue, in memory.
    items: VecDeque<Queued>,
    /// Bytes of `items`.
    bytes: usize,
    /// A recovered backlog still on disk, logically after `items`, and
    /// what was queued behind it. (Boxed: most queues never have one, and
    /// every connection has a queue.)
    disk: Option<Box<OnDisk>>,
    next_seq: u64,
    closed: bool,
    /// Its bounds and policies: those it was made with, or set since (a
    /// bridge's own bounds, a reload's).
    limits: QueueLimits,
    /// What this queue's entries have charged to the broker's
    /// [`QueueMemory`] (at the last settle).
    charged: usize,
    /// What its entries' holds and releases changed the payloads counted
    /// by, since the last settle.
    payload_delta: isize,
}

impl Queue {
    /// An empty queue whose first delivery gets `next_seq`.
    fn new(next_seq: u64, limits: QueueLimits) -> Queue {
        Queue {
            items: VecDeque::new(),
            bytes: 0,
            disk: None,
            next_seq,
            closed: false,
            limits,
            charged: 0,
            payload_delta: 0,
        }
    }

    /// What the entries held in memory cost ([`QueueMemory`]), payloads
    /// aside.
    fn footprint(&self) -> usize {
        (self.items.len() + self.tail_len()) * ENTRY_COST
    }

    /// Entries queued in memory behind a backlog.
    fn tail_len(&self) -> usize {
        self.disk.as_ref().map_or(0, |d| d.tail.len())
    }

    /// Their payload bytes.
    fn tail_bytes(&self) -> usize {
        self.disk.as_ref().map_or(0, |d| d.tail_bytes)
    }

    /// What it holds in memory, payloads included (whoever else holds
    /// them): its size against its share of [`QueueMemory`].
    fn holding(&self) -> usize {
        self.footprint() + self.bytes + self.tail_bytes()
    }

    /// Whether nothing is held in memory.
    fn nothing_in_memory(&self) -> bool {
        self.items.is_empty() && self.tail_len() == 0
    }

    fn count(&self) -> usize {
        self.items.len() + self.disk.as_ref().map_or(0, |d| d.count + d.tail.len())
    }

    fn total_bytes(&self) -> usize {
        self.bytes + self.disk.as_ref().map_or(0, |d| d.bytes + d.tail_bytes)
    }
}

/// A session's outgoing queue.
pub struct Outbox {
    /// The deliveries; a short critical section per push or drain, held by
    /// a publisher or the owning connection, never across an await (a page
    /// of a recovered backlog is read from the store under it).
    queue: Mutex<Queue>,
    /// Wakes the connection when the queue gets something ([`READY`], kept
    /// until taken, so a push that races with the drain is not missed), or
    /// when it must look at its kick flag or keep-alive deadline.
    bell: Doorbell,
    /// Wakes publishers blocked on a full queue (policy `block`).
    space: Notify,
    /// How many publishers wait on `space` ([`Outbox::room_for`]): a pop
    /// tells them only while there are some (telling a `Notify` takes its
    /// lock, which a pop to nobody need not).
    waiting: AtomicUsize,
    /// The `queue_qos0` of the limits in force, read without the lock.
    queue_qos0: AtomicBool,
    /// May fill the disk budget's bridge reserve (a bridge's queue).
    uses_reserve: AtomicBool,
    /// The session (or group) number: the store key prefix of this queue.
    pub session_number: u64,
    /// Whether the session outlives its connection (its queue is stored).
    persistent: AtomicBool,
    /// Whether a connection is attached (QoS 0 is skipped while offline
    /// unless `queue_qos0`).
    online: AtomicBool,
    /// What every queue of the broker shares (its store, memory bound).
    env: Arc<QueueEnv>,
}

/// What every queue of a broker shares, held once: the store a backlog is
/// paged in from, with its durability watermark (paging reads only
/// durable runs) and whether it pages queues at all (long stored queues
/// then stay on disk), and the memory all the queues hold, with its bound.
/// Every connection has a queue: one pointer each instead of four fields.
pub struct QueueEnv {
    store: Option<Arc<dyn Store>>,
    durable_rx: Option<tokio::sync::watch::Receiver<Durable>>,
    spill: bool,
    memory: Arc<QueueMemory>,
}

impl QueueEnv {
    /// The environment of queues backed by `store` (`None`: in memory
    /// only), charging `memory`.
    pub fn new(store: Option<Arc<dyn Store>>, memory: Arc<QueueMemory>) -> Arc<QueueEnv> {
        Arc::new(QueueEnv {
            spill: store.as_ref().is_some_and(|s| s.pages_queues()),
            durable_rx: store.as_ref().map(|s| s.durable()),
            store,
            memory,
        })
    }

    /// The memory all the queues hold, with its bound.
    pub fn memory(&self) -> &QueueMemory {
        &self.memory
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let q = self.queue.get_mut();
        let released: isize = q
            .items
            .iter()
            .chain(q.disk.iter().flat_map(|d| d.tail.iter()))
            .map(|e| let_go(&e.message))
            .sum();
        self.env
            .memory
            .recharge(q.charged, 0, q.payload_delta + released);
    }
}

impl Outbox {
    /// An empty outbox whose first delivery gets `first_seq`, with no
    /// store behind it (tests and fuzzing).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn new(session_number: u64, limits: QueueLimits, first_seq: u64) -> Arc<Self> {
        let queue = Queue::new(first_seq, limits);
        let env = QueueEnv::new(None, QueueMemory::new(0));
        Arc::new(Self::with(session_number, queue, env, false))
    }

    /// An empty outbox of 1,000 messages and 1 MiB (tests).
    #[cfg(test)]
    pub fn for_tests() -> Arc<Self> {
        let limits = QueueLimits {
            max_messages: 1_000,
            max_bytes: 1 << 20,
            policy: QueueFull::DropOldest,
            queue_qos0: false,
        };
        Self::new(0, limits, 1)
    }

    /// An outbox holding `queue`, in `env`.
    fn with(session_number: u64, queue: Queue, env: Arc<QueueEnv>, persistent: bool) -> Outbox {
        let queue_qos0 = queue.limits.queue_qos0;
        Outbox {
            queue: Mutex::new(queue),
            bell: Doorbell::default(),
            space: Notify::new(),
            waiting: AtomicUsize::new(0),
            queue_qos0: AtomicBool::new(queue_qos0),
            uses_reserve: AtomicBool::new(false),
            session_number,
            persistent: AtomicBool::new(persistent),
            online: AtomicBool::new(false),
            env,
        }
    }

    /// Charges the broker's [`QueueMemory`] with what `q` holds in memory
    /// now; called after every change under the lock.
    fn settle(&self, q: &mut Queue) {
        let now = q.footprint();
        self.env
            .memory
            .recharge(q.charged, now, std::mem::take(&mut q.payload_delta));
        q.charged = now;
    }

    /// An empty outbox in `env`: when its store pages queues, a long
    /// stored queue stays on disk beyond the in-memory bound.
    pub fn paged(
        session_number: u64,
        limits: QueueLimits,
        first_seq: u64,
        env: &Arc<QueueEnv>,
    ) -> Arc<Self> {
        let queue = Queue::new(first_seq, limits);
        Arc::new(Self::with(session_number, queue, env.clone(), false))
    }

    /// An outbox for a queue recovered from the store of `env`: its
    /// `summary.count` messages stay on disk until drained; `in_flight` lists sequences
    /// already in flight, not to be sent again from the backlog.
    /// New deliveries get sequences from `first_seq` on (or after the
    /// recovered ones, if higher).
    pub fn recovered(
        session_number: u64,
        limits: QueueLimits,
        summary: QueueSummary,
        in_flight: HashSet<u64>,
        first_seq: u64,
        env: &Arc<QueueEnv>,
    ) -> Arc<Self> {
        let in_flight_count = in_flight.len();
        let disk = OnDisk {
            from: 0,
            until: summary.next_seq,
            count: (summary.count as usize).saturating_sub(in_flight_count),
            bytes: summary.bytes as usize,
            skip: in_flight,
            safe_until: summary.next_seq,
            ..OnDisk::default()
        };
        let mut queue = Queue::new(summary.next_seq.max(first_seq).max(1), limits);
        queue.disk = (summary.count > 0).then(|| Box::new(disk));
        let outbox = Self::with(session_number, queue, env.clone(), true);
        outbox.bell.ring(READY);
        Arc::new(outbox)
    }

    /// Marks the session as persistent (its queue is stored) or not.
    pub fn set_persistent(&self, persistent: bool) {
        self.persistent.store(persistent, Ordering::Release);
    }

    /// Whether messages queued here must be stored.
    pub fn is_persistent(&self) -> bool {
        self.persistent.load(Ordering::Acquire)
    }

    /// Marks a connection as attached or not.
    pub fn set_online(&self, online: bool) {
        self.online.store(online, Ordering::Release);
    }

    /// Whether a connection is attached.
    pub fn is_online(&self) -> bool {
        self.online.load(Ordering::Acquire)
    }

    /// Whether a delivery at `qos` should be stored when queued here.
    pub fn stores(&self, qos: QoS) -> bool {
        self.is_persistent() && (qos != QoS::AtMostOnce || self.queue_qos0.load(Ordering::Relaxed))
    }

    /// Lets this queue fill the disk budget's bridge reserve
    /// (`storage.bridge_reserve_percent`): a bridge's queue.
    pub fn set_uses_reserve(&self) {
        self.uses_reserve.store(true, Ordering::Relaxed);
    }

    /// Whether this queue may fill the disk budget's bridge reserve.
    pub fn uses_reserve(&self) -> bool {
        self.uses_reserve.load(Ordering::Relaxed)
    }

    /// Gives this queue its own bounds (messages, payload bytes) instead of
    /// the configured per-session ones.
    pub fn set_bounds(&self, max_messages: u32, max_bytes: usize) {
        let mut q = self.queue.lock();
        q.limits.max_messages = max_messages;
        q.limits.max_bytes = max_bytes;
    }

    /// Puts `limits` in force for this queue from now on (a reload): what
    /// is queued stays, even above a smaller bound.
    pub fn set_limits(&self, limits: QueueLimits) {
        let mut q = self.queue.lock();
        q.limits = limits;
        self.queue_qos0.store(limits.queue_qos0, Ordering::Relaxed);
        drop(q);
        // A larger bound may let blocked publishers go on.
        self.space.notify_waiters();
    }

    fn bounds(&self, q: &Queue) -> (usize, usize) {
        let limits = q.limits;
        (limits.max_messages as usize, limits.max_bytes)
    }

    /// Whether one more delivery of `size` bytes (QoS 1 or 2) fits now.
    pub fn has_room(&self, size: usize) -> bool {
        let q = self.queue.lock();
        let (max_messages, max_bytes) = self.bounds(&q);
        q.count() < max_messages
            && q.total_bytes() + size <= max_bytes
            && !self.full_by_memory(&q, ENTRY_COST + size, self.is_persistent())
    }

    /// Whether the memory bound makes this queue full for a delivery that
    /// costs `more`: at the bound, a queue that cannot keep it on disk (not
    /// `stored`, or a store that does not page), holds something in memory
    /// already and would go past its share ([`QueueMemory`]).
    fn full_by_memory(&self, q: &Queue, more: usize, stored: bool) -> bool {
        let on_disk_instead = self.env.spill && stored;
        !(on_disk_instead || q.nothing_in_memory()) && self.env.memory.over_share(q, more)
    }

    /// Reads the next page of the backlog into memory, if there is one and
    /// nothing is in memory. Returns false when the backlog's head is not
    /// durable yet (try again when the watermark moves).
    fn refill(&self, q: &mut Queue) -> bool {
        if !q.items.is_empty() {
            return true;
        }
        let Some(disk) = q.disk.as_mut() else {
            return true;
        };
        if let Some(rx) = &self.env.durable_rx {
            disk.advance(rx.borrow().up_to);
        }
        let limit = disk.safe_until.min(disk.until);
        if disk.from >= limit && disk.from < disk.until {
            return false;
        }
        let page = match &self.env.store {
            Some(store) if disk.from < limit => {
                store.read_queue(self.session_number, disk.from, PAGE)
            }
            _ => Vec::new(),
        };
        let full_page = page.len() >= PAGE;
        let mut last = None;
        for record in page {
            if record.seq >= limit {
                break;
            }
            last = Some(record.seq);
            if disk.skip.remove(&record.seq) {
                continue;
            }
            let size = record.message.payload.len();
            disk.count = disk.count.saturating_sub(1);
            disk.bytes = disk.bytes.saturating_sub(size);
            q.bytes += size;
            q.payload_delta += held(&record.message);
            q.items.push_back(Queued {
                message: record.message,
                qos: record.qos,
                retain: record.retain,
                seq: record.seq,
                ticket: 0,
                stored: true,
                identifiers: record.identifiers,
                queued_ms: record.queued_ms,
            });
        }
        // A short page read everything below `limit`.
        disk.from = match last {
            Some(seq) if full_page => seq + 1,
            _ => limit,
        };
        if let Some(done) = q.disk.take_if(|d| d.from >= d.until) {
            // The backlog is read: what queued since follows it.
            q.bytes += done.tail_bytes;
            q.items.extend(done.tail);
        }
        true
    }

    /// Queues a delivery (its `seq` and `queue` are assigned here). Never
    /// waits. `budget_full`: the store's disk budget is used up, so a
    /// delivery that would be stored is treated as not fitting.
    /// `store_ticket`: the ticket of the batch that will store it (a
    /// spilled delivery is paged in only once that ticket is done).
    /// `checked`: the publish already passed the up-front room check of
    /// `refuse` / `block` (`publish::route`), so a queue that another
    /// publisher filled since takes it past its bound (by at most the
    /// publishes that raced) rather than answering `Full`, which would
    /// refuse a message already delivered to the publish's other
    /// subscribers (a duplicate for them on the resend).
    pub fn push(
        &self,
        delivery: Delivery,
        budget_full: bool,
        store_ticket: Ticket,
        checked: bool,
    ) -> Pushed {
        let (pushed, was_empty) = {
            let mut q = self.queue.lock();
            let pushed = self.push_locked(&mut q, delivery, budget_full, store_ticket, checked);
            self.settle(&mut q);
            pushed
        };
        if was_empty {
            self.bell.ring(READY);
        }
        pushed
    }

    /// [`Outbox::push`] under the lock; also returns whether the queue
    /// was empty before (the connection is to be woken).
    fn push_locked(
        &self,
        q: &mut Queue,
        mut delivery: Delivery,
        budget_full: bool,
        store_ticket: Ticket,
        checked: bool,
    ) -> (Pushed, bool) {
        let size = delivery.message.payload.len();
        if q.closed {
            return (Pushed::Closed, false);
        }
        let limits = q.limits;
        if delivery.qos == QoS::AtMostOnce
            && !limits.queue_qos0
            && !self.online.load(Ordering::Acquire)
        {
            return (Pushed::Skipped, false);
        }
        let (max_messages, max_bytes) = (limits.max_messages as usize, limits.max_bytes);
        if size > max_bytes {
            // Larger than the whole budget: no eviction can make room.
            return (Pushed::DroppedFull, false);
        }
        // While a backlog is on disk everything queued behind it is
        // stored too, so that it can follow the backlog after a restart.
        let stored = self.stores(delivery.qos) || (q.disk.is_some() && self.is_persistent());
        let spill = self.env.spill && stored;
        // At the memory bound a queue that can keep it on disk does; one
        // held in memory only is full past its share (`QueueMemory`).
        let cost = QueueMemory::cost(&delivery.message);
        let memory_full = self.env.memory.over(cost);
        let mut evicted = Vec::new();
        let mut must_evict = budget_full && stored;
        // Drop-oldest takes a queue past its share down to it, at most two
        // deliveries a push (so a push stays short).
        let mut memory_evictions = 0;
        loop {
            let by_memory = memory_evictions < 2 && self.full_by_memory(q, cost, stored);
            if !(must_evict
                || by_memory
                || q.count() >= max_messages
                || q.total_bytes() + size > max_bytes)
            {
                break;
            }
            match limits.policy {
                QueueFull::DropOldest => {
                    self.refill(q);
                    let (old, from_tail) = match q.items.pop_front() {
                        Some(old) => (old, false),
                        None => match q.disk.as_mut().and_then(|d| d.tail.pop_front()) {
                            Some(old) => (old, true),
                            None => break,
                        },
                    };
                    q.payload_delta += let_go(&old.message);
                    let size = old.message.payload.len();
                    match q.disk.as_mut() {
                        Some(d) if from_tail => d.tail_bytes = d.tail_bytes.saturating_sub(size),
                        _ => q.bytes = q.bytes.saturating_sub(size),
                    }
                    evicted.push(Evicted {
                        seq: old.seq,
                        stored: old.stored,
                        size: old.size(),
                        by_memory: by_memory && !must_evict,
                    });
                    memory_evictions += usize::from(by_memory);
                    must_evict = false;
                }
                QueueFull::DropNewest if by_memory => return (Pushed::DroppedMemory, false),
                QueueFull::DropNewest => return (Pushed::DroppedFull, false),
                QueueFull::Refuse | QueueFull::Block if checked => break,
                QueueFull::Refuse | QueueFull::Block => return (Pushed::Full, false),
            }
        }
        if budget_full && stored && evicted.is_empty() && limits.policy == QueueFull::DropOldest {
            // Nothing of this session's to evict: the new one goes.
            return (Pushed::DroppedFull, false);
        }
        let seq = q.next_seq;
        q.next_seq += 1;
        delivery.seq = seq;
        delivery.stored = stored;
        let was_empty = q.items.is_empty() && q.disk.is_none();
        if let (true, Some(disk)) = (spill, q.disk.as_mut()) {
            // Behind a backlog on disk: it stays there too.
            disk.append(seq, size, store_ticket.max(delivery.ticket));
        } else if let Some(disk) = q.disk.as_mut() {
            disk.tail_bytes += size;
            q.payload_delta += held(&delivery.message);
            push_grown(&mut disk.tail, Queued::new(delivery));
        } else if spill
            && (memory_full || q.items.len() >= SPILL_MESSAGES || q.bytes + size > SPILL_BYTES)
        {
            let mut disk = OnDisk {
                from: seq,
                until: seq,
                safe_until: seq,
                ..OnDisk::default()
            };
            disk.append(seq, size, store_ticket.max(delivery.ticket));
            q.disk = Some(Box::new(disk));
        } else {
            q.bytes += size;
            q.payload_delta += held(&delivery.message);
            push_grown(&mut q.items, Queued::new(delivery));
        }
        (
            Pushed::Queued {
                seq,
                stored,
                evicted,
            },
            was_empty,
        )
    }

    /// Puts back deliveries returned by a session that ended (shared
    /// groups), in order, ahead of anything queued since.
    pub fn restore(&self, deliveries: Vec<Delivery>) {
        if deliveries.is_empty() {
            return;
        }
        let mut q = self.queue.lock();
        for d in deliveries.into_iter().rev() {
            q.next_seq = q.next_seq.max(d.seq + 1);
            q.bytes += d.message.payload.len();
            q.payload_delta += held(&d.message);
            q.items.push_front(Queued::new(d));
        }
        self.settle(&mut q);
        drop(q);
        self.bell.ring(READY);
    }

    /// The doorbell of the connection draining this outbox.
    pub fn doorbell(&self) -> &Doorbell {
        &self.bell
    }

    /// Wakes the connection draining this outbox.
    pub fn wake(&self) {
        self.bell.ring(READY);
    }

    /// Resolves when the queue has room for `size` bytes (for `block`),
    /// or its session went offline. Cancel-safe.
    pub async fn room_for(&self, size: usize) {
        /// Counts a waiter in `waiting` while it lives.
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        // Counted before the queue's lock is first taken below: a pop
        // under that lock afterwards sees the count (and tells), a pop
        // before it left the room that `has_room` then finds.
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.waiting);
        loop {
            let space = self.space.notified();
            tokio::pin!(space);
            // Registered before checking, so a pop in between is not missed.
            space.as_mut().enable();
            if self.has_room(size) || !self.is_online() {
                return;
            }
            space.await;
        }
    }

    /// Removes the first delivery if its ticket is durable (`<= durable`)
    /// and `can_send` accepts its QoS: one lock, so several drainers (the
    /// members of a shared group) never take the same delivery.
    pub fn pop_ready(&self, durable: Ticket, can_send: impl Fn(QoS) -> bool) -> Pop {
        let mut q = self.queue.lock();
        let pop = self.pop_locked(&mut q, durable, can_send);
        self.settle(&mut q);
        drop(q);
        if let Pop::Got(d) = &pop {
            // Its payload's count, after the lock: the message's count is
            // shared with the publisher's core, the lock with every
            // publisher to this queue.
            self.env.memory.add(let_go(&d.message));
            if self.waiting.load(Ordering::Relaxed) != 0 {
                self.space.notify_waiters();
            }
        }
        pop
    }

    /// [`Outbox::pop_ready`] under the lock.
    fn pop_locked(&self, q: &mut Queue, durable: Ticket, can_send: impl Fn(QoS) -> bool) -> Pop {
        let readable = self.refill(q);
        let Some(front) = q.items.front() else {
            return if readable {
                Pop::Empty
            } else {
                Pop::WaitDurable
            };
        };
        if front.ticket > durable {
            return Pop::WaitDurable;
        }
        if !can_send(front.qos) {
            return Pop::WaitWindow;
        }
        let Some(d) = q.items.pop_front() else {
            return Pop::Empty;
        };
        // (Its payload's count is `pop_ready`'s to take back.)
        q.bytes -= d.message.payload.len();
        shrink_drained(&mut q.items);
        Pop::Got(d.delivery(self.session_number))
    }

    /// What is queued: messages and payload bytes (memory and disk), and
    /// when the first one in memory was queued (broker ms).
    pub fn depth(&self) -> QueueDepth {
        let q = self.queue.lock();
        QueueDepth {
            messages: q.count() as u64,
            bytes: q.total_bytes() as u64,
            oldest_queued_ms: q
                .items
                .front()
                .or(q.disk.as_ref().and_then(|d| d.tail.front()))
                .map(|d| d.queued_ms),
        }
    }

    /// Refuses further pushes and returns what was queued in memory (the
    /// session ended; its stored entries go with the session).
    pub fn close(&self) -> Vec<Delivery> {
        let mut q = self.queue.lock();
        q.closed = true;
        q.bytes = 0;
        let tail = q.disk.take().map(|d| d.tail).unwrap_or_default();
        let number = self.session_number;
        let queue = &mut *q;
        let mut released = 0;
        let items: Vec<Delivery> = (queue.items.drain(..).chain(tail))
            .map(|e| {
                released += let_go(&e.message);
                e.delivery(number)
            })
            .collect();
        q.payload_delta += released;
        self.settle(&mut q);
        drop(q);
        self.space.notify_waiters();
        items
    }

    /// Messages queued (memory and disk).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.queue.lock().count()
    }

    /// True when nothing is queued.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_total_may_lag_by_a_chunk_a_shard_only_under_a_large_bound() {
        // (bound, how far a shard may leave the total behind)
        let table = [
            (0, 64 << 10),
            (1, 0),
            (1 << 20, 0),
            ((64 << 20) - 1, 0),
            (64 << 20, 64 << 10),
            (256 << 20, 64 << 10),
            (usize::MAX, 64 << 10),
        ];
        for (limit, chunk) in table {
            assert_eq!(QueueMemory::chunk(limit), chunk, "{limit}");
        }
    }

    #[test]
    fn memory_counted_on_many_threads_adds_up_and_the_checked_total_lags_by_little() {
        let memory = QueueMemory::new(1 << 30);
        let chunk = QueueMemory::chunk(1 << 30) as isize;
        // Twelve threads at once (more than there are shards: some share
        // one) each charge 10,000 entries of 1,000 bytes and give half of
        // them back, one at a time; twice, so that the second twelve count
        // on in the shards the first left behind.
        for _ in 0..2 {
            std::thread::scope(|scope| {
                for _ in 0..12 {
                    let memory = &memory;
                    scope.spawn(move || {
                        for _ in 0..10_000 {
                            memory.recharge(0, 1_000, 0);
                        }
                        for _ in 0..5_000 {
                            memory.recharge(1_000, 0, 0);
                        }
                    });
                }
            });
        }
        assert_eq!(memory.used(), 2 * 12 * 5_000 * 1_000);
        // (Either way: a shard may hold what was given back, too.)
        let lag = memory.used() as isize - memory.total();
        assert!(
            lag.abs() <= SHARDS as isize * chunk,
            "the total the bound is checked against is {lag} bytes off"
        );
        // Not behind at all under a small bound.
        let small = QueueMemory::new(1 << 20);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| small.recharge(0, 700, 7));
            }
        });
        assert_eq!((small.used(), small.total()), (2_828, 2_828));
    }

    #[test]
    fn a_thread_owns_its_shard_until_it_ends_and_the_threads_beyond_share_one() {
        // Twelve threads alive at once: those that found a shard free each
        // own a different one, the rest share the last.
        let barrier = std::sync::Barrier::new(12);
        let shards: Vec<usize> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..12)
                .map(|_| {
                    scope.spawn(|| {
                        let first = shard_index();
                        barrier.wait();
                        assert_eq!(shard_index(), first, "a thread keeps its shard");
                        first
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().expect("a counting thread"))
                .collect()
        });
        let owned: Vec<usize> = shards.iter().copied().filter(|&s| s != SHARED).collect();
        let distinct: HashSet<usize> = owned.iter().copied().collect();
        assert_eq!(distinct.len(), owned.len(), "{shards:?}");
        assert!(owned.len() <= SHARED && shards.len() - owned.len() >= 12 - SHARED);
        // They ended: their shards are free again.
        let taken = OWNED.load(Ordering::Relaxed);
        assert!(owned.iter().all(|s| taken & 1 << s == 0), "{taken:b}");
        let next = std::thread::spawn(shard_index).join().expect("a thread");
        assert_ne!(next, SHARED);
    }

    #[tokio::test(start_paused = true)]
    async fn a_publisher_waiting_for_room_is_told_by_the_pop_that_makes_it() {
        let o = outbox(QueueFull::Block, 1, 1 << 20);
        assert!(matches!(
            o.push(delivery(QoS::AtLeastOnce, b"a"), false, 0, false),
            Pushed::Queued { .. }
        ));
        let waiter = tokio::spawn({
            let o = o.clone();
            async move { o.room_for(1).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished(), "the queue is full");
        assert_eq!(o.waiting.load(Ordering::Relaxed), 1);
        assert!(matches!(o.pop_ready(0, |_| true), Pop::Got(_)));
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("told of the room")
            .expect("the waiter");
        assert_eq!(o.waiting.load(Ordering::Relaxed), 0, "no longer counted");
    }
    use crate::message::SessionId;
    use bytes::Bytes;
    use ferrymq_codec::{MqttString, PublishProperties};
    use std::time::Duration;

    fn outbox(policy: QueueFull, max_messages: u32, max_bytes: usize) -> Arc<Outbox> {
        let o = Outbox::new(
            1,
            QueueLimits {
                max_messages,
                max_bytes,
                policy,
                queue_qos0: false,
            },
            1,
        );
        o.set_online(true);
        o
    }

    fn delivery(qos: QoS, payload: &'static [u8]) -> Delivery {
        Delivery {
            message: Arc::new(Message {
                topic: MqttString::from_static("t"),
                payload: Bytes::from_static(payload),
                qos,
                retain: false,
                properties: PublishProperties::default(),
                origin: SessionId(2),
                expires_at: None,
                holders: Default::default(),
            }),
            qos,
            retain: false,
            seq: 0,
            queue: 0,
            ticket: 0,
            stored: true,
            identifiers: None,
            group: None,
            queued_ms: 0,
        }
    }

    fn seqs(o: &Outbox) -> Vec<u64> {
        o.queue.lock().items.iter().map(|d| d.seq).collect()
    }

    /// Pushes `n` QoS 1 deliveries, each of which must be queued.
    fn fill(o: &Outbox, n: usize) {
        for _ in 0..n {
            assert!(matches!(
                o.push(delivery(QoS::AtLeastOnce, b"a"), false, 0, false),
                Pushed::Queued { .. }
            ));
        }
    }

    #[test]
    fn a_publish_that_passed_the_room_check_is_not_refused_by_a_queue_filled_since() {
        for policy in [QueueFull::Block, QueueFull::Refuse] {
            let o = outbox(policy, 2, 100);
            fill(&o, 2);
            // Full now: an unchecked push is turned away...
            assert_eq!(
                o.push(delivery(QoS::AtLeastOnce, b"b"), false, 0, false),
                Pushed::Full
            );
            // ... one whose publish found room a moment ago goes in.
            assert!(matches!(
                o.push(delivery(QoS::AtLeastOnce, b"b"), false, 0, true),
                Pushed::Queued { .. }
            ));
            assert_eq!(seqs(&o).len(), 3, "{policy:?}");
        }
    }

    #[test]
    fn drop_oldest_evicts_and_reports_what_it_evicted() {
        let o = outbox(QueueFull::DropOldest, 2, 100);
        fill(&o, 2);
        assert_eq!(
            o.push(delivery(QoS::AtLeastOnce, b"b"), false, 0, false),
            Pushed::Queued {
                seq: 3,
                stored: false,
                evicted: vec![Evicted {
                    seq: 1,
                    stored: false,
                    size: 1,
                    by_memory: false,
                }]
            }
        );
        assert_eq!(seqs(&o), [2, 3]);
        // The byte budget can need several evictions.
        let o = outbox(QueueFull::DropOldest, 10, 4);
        for _ in 0..4 {
            o.push(delivery(QoS::AtLeastOnce, b"x"), false, 0, false);
        }
        assert_eq!(
            o.push(delivery(QoS::AtLeastOnce, b"yyy"), false, 0, false),
            Pushed::Queued {
                seq: 5,
                stored: false,
                evicted: (1..=3)
                    .map(|seq| Evicted {
                        seq,
                        stored: false,
                        size: 1,
                        by_memory: false,
                    })
                    .collect()
            }
        );
        assert_eq!(o.len(), 2);
        // Larger than the whole budget: dropped, nothing evicted.
        assert_eq!(
            o.push(delivery(QoS::AtLeastOnce, b"zzzzz"), false, 0, false),
            Pushed::DroppedFull
        );
        assert_eq!(o.len(), 2);
    }

    #[test]
    fn the_other_policies_keep_the_queue_as_it_is() {
        for (policy, expected) in [
            (QueueFull::DropNewest, Pushed::DroppedFull),
            (QueueFull::Refuse, Pushed::Full),
            (QueueFull::Block, Pushed::Full),
        ] {
            let o = outbox(policy, 1, 100);
            o.push(delivery(QoS::AtLeastOnce, b"a"), false, 0, false);
            assert_eq!(
                o.push(delivery(QoS::AtLeastOnce, b"b"), false, 0, false),
                expected,
                "{policy:?}"
            );
            assert_eq!(seqs(&o), [1]);
            assert!(!o.has_room(0));
        }
    }

    #[test]
    fn limits_set_by_a_reload_apply_to_the_next_push_and_keep_what_is_queued() {
        let o = outbox(QueueFull::DropNewest, 3, 100);
        fill(&o, 3);
        let set = |max_messages, policy, queue_qos0| {
            o.set_limits(QueueLimits {
                max_messages,
                max_bytes: 100,
                policy,
                queue_qos0,
            });
        };
        // Smaller: the three stay; the next is refused by the new policy.
        set(2, QueueFull::Refuse, false);
        assert_eq!(o.depth().messages, 3);
        assert_eq!(
            o.push(delivery(QoS::AtLeastOnce, b"b"), false, 0, false),
            Pushed::Full
        );
        // Larger: room again.
        set(4, QueueFull::Refuse, false);
        assert!(matches!(
            o.push(delivery(QoS::AtLeastOnce, b"c"), false, 0, false),
            Pushed::Queued { .. }
        ));
        // queue_qos0 follows too.
        o.set_online(false);
        set(10, QueueFull::Refuse, false);
        assert_eq!(
            o.push(delivery(QoS::AtMostOnce, b"d"), false, 0, false),
            Pushed::Skipped
        );
        set(10, QueueFull::Refuse, true);
        assert!(matches!(
            o.push(delivery(QoS::AtMostOnce, b"d"), false, 0, false),
            Pushed::Queued { .. }
        ));
    }

    #[test]
    fn qos0_is_queued_offline_only_when_configured() {
        let o = outbox(QueueFull::DropOldest, 10, 100);
        o.set_online(false);
        assert_eq!(
            o.push(delivery(QoS::AtMostOnce, b"a"), false, 0, false),
            Pushed::Skipped
        );
        assert!(matches!(
            o.push(delivery(QoS::AtLeastOnce, b"a"), false, 0, false),
            Pushed::Queued { .. }
        ));
        let q0 = Outbox::new(
            1,
            QueueLimits {
                max_messages: 10,
                max_bytes: 100,
                policy: QueueFull::DropOldest,
                queue_qos0: true,
            },
            1,
        );
        q0.set_persistent(true);
        assert!(matches!(
            q0.push(delivery(QoS::AtMostOnce, b"a"), false, 0, false),
            Pushed::Queued { .. }
        ));
        assert!(q0.stores(QoS::AtMostOnce));
        assert!(
            !o.stores(QoS::AtLeastOnce),
            "not persistent: nothing stored"
        );
    }

    #[test]
    fn restore_puts_messages_back_in_front_in_order() {
        let o = outbox(QueueFull::DropOldest, 10, 100);
        o.push(delivery(QoS::AtLeastOnce, b"new"), false, 0, false);
        let mut old = vec![
            delivery(QoS::AtLeastOnce, b"a"),
            delivery(QoS::AtLeastOnce, b"b"),
        ];
        old[0].seq = 7;
        old[1].seq = 8;
        o.restore(old);
        assert_eq!(seqs(&o), [7, 8, 1]);
        assert!(matches!(o.pop_ready(0, |_| true), Pop::Got(d) if d.seq == 7));
        // New pushes continue after the highest restored sequence.
        assert!(matches!(
            o.push(delivery(QoS::AtLeastOnce, b"c"), false, 0, false),
            Pushed::Queued { seq: 9, .. }
        ));
        assert_eq!(o.close().len(), 3);
        assert_eq!(
            o.push(delivery(QoS::AtLeastOnce, b"d"), false, 0, false),
            Pushed::Closed
        );
        assert!(o.is_empty());
    }

    /// A persistent outbox over a store that pages queues, and a way to
    /// push as `publish.rs` does: take a ticket, push, store the put.
    struct Paged {
        store: Arc<crate::storage::MemoryStore>,
        outbox: Arc<Outbox>,
        held: Vec<(Ticket, Vec<crate::storage::StoreOp>)>,
    }

    impl Paged {
        fn new() -> Paged {
            Paged::with_memory(QueueMemory::new(0))
        }

        fn with_memory(memory: Arc<QueueMemory>) -> Paged {
            let store = crate::storage::MemoryStore::paging();
            let outbox = Outbox::paged(
                9,
                QueueLimits {
                    max_messages: 1_000_000,
                    max_bytes: 1 << 30,
                    policy: QueueFull::DropOldest,
                    queue_qos0: false,
                },
                1,
                &QueueEnv::new(Some(store.clone()), memory),
            );
            outbox.set_persistent(true);
            outbox.set_online(true);
            Paged {
                store,
                outbox,
                held: Vec::new(),
            }
        }

        /// Pushes one stored delivery; its write is submitted now, or held
        /// back (a slow disk) when `hold`.
        fn push(&mut self, hold: bool) -> u64 {
            let ticket = self.store.begin();
            let d = delivery(QoS::AtLeastOnce, b"payload");
            let message = d.message.clone();
            let Pushed::Queued {
                seq, stored: true, ..
            } = self.outbox.push(d, false, ticket, false)
            else {
                panic!("not queued and stored");
            };
            let ops = vec![crate::storage::StoreOp::QueuePut {
                number: 9,
                seq,
                qos: QoS::AtLeastOnce,
                retain: false,
                identifiers: None,
                message,
            }];
            if hold {
                self.held.push((ticket, ops));
            } else {
                self.store.submit(ticket, ops);
            }
            seq
        }

        fn release(&mut self) {
            for (ticket, ops) in self.held.drain(..) {
                self.store.submit(ticket, ops);
            }
        }

        fn in_memory(&self) -> usize {
            let q = self.outbox.queue.lock();
            q.items.len() + q.tail_len()
        }

        /// Pops everything that can be popped now.
        fn drain(&self) -> (Vec<u64>, Pop) {
            let mut got = Vec::new();
            loop {
                match self.outbox.pop_ready(u64::MAX, |_| true) {
                    Pop::Got(d) => got.push(d.seq),
                    other => return (got, other),
                }
            }
        }
    }

    #[test]
    fn a_long_stored_queue_stays_on_disk_and_drains_in_order() {
        let mut p = Paged::new();
        let pushed: Vec<u64> = (0..5_000).map(|_| p.push(false)).collect();
        assert!(
            p.in_memory() <= SPILL_MESSAGES,
            "{} deliveries held in memory",
            p.in_memory()
        );
        assert_eq!(p.outbox.len(), 5_000, "memory and disk both count");
        let (got, last) = p.drain();
        assert_eq!(got, pushed, "every delivery, in order, once");
        assert!(matches!(last, Pop::Empty));
        // Drained: new deliveries are held in memory again.
        p.push(false);
        assert_eq!(p.in_memory(), 1);
    }

    #[test]
    fn spilled_deliveries_are_paged_in_only_once_their_write_is_durable() {
        let mut p = Paged::new();
        let first: Vec<u64> = (0..SPILL_MESSAGES).map(|_| p.push(false)).collect();
        // These spill to disk, but their writes have not happened yet.
        let held: Vec<u64> = (0..300).map(|_| p.push(true)).collect();
        let (got, last) = p.drain();
        assert_eq!(got, first);
        assert!(
            matches!(last, Pop::WaitDurable),
            "the spilled deliveries are not readable yet: {last:?}"
        );
        p.release();
        let (got, last) = p.drain();
        assert_eq!(got, held);
        assert!(matches!(last, Pop::Empty));
    }

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn a_queued_entry_takes_56_bytes() {
        // The queue number and shared group of a delivery are the outbox's.
        assert_eq!(std::mem::size_of::<Queued>(), 56);
        // (A delivery in flight names its group through a trait object,
        // two words: the queue does not import the groups.)
        assert_eq!(std::mem::size_of::<Delivery>(), 80);
    }

    /// An online queue held in memory only, charging `memory`.
    fn sharing(memory: &Arc<QueueMemory>, policy: QueueFull) -> Outbox {
        let limits = QueueLimits {
            max_messages: 100,
            max_bytes: 1 << 20,
            policy,
            queue_qos0: false,
        };
        let queue = Queue::new(1, limits);
        let o = Outbox::with(1, queue, QueueEnv::new(None, memory.clone()), false);
        o.set_online(true);
        o
    }

    /// What one 1-byte delivery charges.
    const ONE: usize = ENTRY_COST + 1;

    #[test]
    fn at_the_memory_bound_a_queue_in_memory_only_is_full_unless_empty() {
        // Room for three deliveries in all.
        let memory = QueueMemory::new(3 * ONE as u64);
        let hog = sharing(&memory, QueueFull::DropOldest);
        for _ in 0..3 {
            hog.push(delivery(QoS::AtLeastOnce, b"x"), false, 0, false);
        }
        assert_eq!(memory.used(), 3 * ONE);
        // drop-oldest: the hog's oldest makes room, counted as memory's.
        let Pushed::Queued { evicted, .. } =
            hog.push(delivery(QoS::AtLeastOnce, b"x"), false, 0, false)
        else {
            panic!("not queued");
        };
        assert_eq!(evicted.len(), 1);
        assert!(evicted[0].by_memory);
        assert_eq!((seqs(&hog), memory.used()), (vec![2, 3, 4], 3 * ONE));
        // An empty queue still takes one, past the bound ...
        let reader = sharing(&memory, QueueFull::DropNewest);
        assert!(matches!(
            reader.push(delivery(QoS::AtLeastOnce, b"y"), false, 0, false),
            Pushed::Queued { .. }
        ));
        // ... but not a second, under each policy.
        assert_eq!(
            reader.push(delivery(QoS::AtLeastOnce, b"y"), false, 0, false),
            Pushed::DroppedMemory
        );
        let refusing = sharing(&memory, QueueFull::Refuse);
        refusing.push(delivery(QoS::AtLeastOnce, b"z"), false, 0, false);
        assert_eq!(
            refusing.push(delivery(QoS::AtLeastOnce, b"z"), false, 0, false),
            Pushed::Full
        );
        // What leaves gives its memory back: a pop, a close, a drop.
        assert!(matches!(reader.pop_ready(0, |_| true), Pop::Got(_)));
        assert_eq!(memory.used(), 4 * ONE);
        assert_eq!(hog.close().len(), 3);
        assert_eq!(memory.used(), ONE);
        drop(refusing);
        assert_eq!(memory.used(), 0);
        // Under the bound again: queues grow as before.
        for _ in 0..3 {
            assert!(matches!(
                reader.push(delivery(QoS::AtLeastOnce, b"y"), false, 0, false),
                Pushed::Queued { evicted, .. } if evicted.is_empty()
            ));
        }
    }

    #[test]
    fn a_message_queued_for_many_sessions_counts_its_payload_once() {
        let memory = QueueMemory::new(0);
        let queues: Vec<Outbox> = (0..3)
            .map(|_| sharing(&memory, QueueFull::DropOldest))
            .collect();
        let d = delivery(QoS::AtLeastOnce, &[7; 1000]);
        for q in &queues {
            q.push(d.clone(), false, 0, false);
        }
        assert_eq!(memory.used(), 3 * ENTRY_COST + 1000);
        for q in &queues[..2] {
            assert!(matches!(q.pop_ready(0, |_| true), Pop::Got(_)));
        }
        assert_eq!(memory.used(), ENTRY_COST + 1000);
        drop(queues);
        assert_eq!(memory.used(), 0);
    }

    #[test]
    fn at_the_memory_bound_a_queue_past_its_share_is_cut_back_while_a_short_one_grows() {
        let memory = QueueMemory::new(10 * ONE as u64);
        let hog = sharing(&memory, QueueFull::DropOldest);
        for _ in 0..10 {
            hog.push(delivery(QoS::AtLeastOnce, b"x"), false, 0, false);
        }
        // Two queues hold something: a share is 5 deliveries.
        let reader = sharing(&memory, QueueFull::DropOldest);
        for _ in 0..3 {
            assert!(matches!(
                reader.push(delivery(QoS::AtLeastOnce, b"y"), false, 0, false),
                Pushed::Queued { evicted, .. } if evicted.is_empty()
            ));
        }
        // Each push of the hog's drops two of its oldest until the total is
        // back at the bound; then one for one.
        for _ in 0..5 {
            hog.push(delivery(QoS::AtLeastOnce, b"x"), false, 0, false);
        }
        assert_eq!((hog.len(), memory.used()), (7, 10 * ONE));
        // The short queue grows to its share, cutting the hog back further.
        for _ in 0..2 {
            reader.push(delivery(QoS::AtLeastOnce, b"y"), false, 0, false);
        }
        for _ in 0..3 {
            hog.push(delivery(QoS::AtLeastOnce, b"x"), false, 0, false);
        }
        assert_eq!((hog.len(), reader.len()), (5, 5));
        assert_eq!(memory.used(), 10 * ONE);
    }

    #[test]
    fn at_the_memory_bound_a_stored_queue_keeps_new_deliveries_on_disk() {
        // Room for ten deliveries of 7 bytes in all.
        let memory = QueueMemory::new(10 * (ENTRY_COST + 7) as u64);
        let mut p = Paged::with_memory(memory.clone());
        let pushed: Vec<u64> = (0..100).map(|_| p.push(false)).collect();
        assert!(p.in_memory() <= 10, "{} held in memory", p.in_memory());
        assert!(memory.used() <= 10 * (ENTRY_COST + 7));
        assert_eq!(p.outbox.len(), 100, "nothing dropped");
        let (got, last) = p.drain();
        assert_eq!(got, pushed, "every delivery, in order, once");
        assert!(matches!(last, Pop::Empty));
        assert_eq!(memory.used(), 0);
    }
}
