//! [`MemoryStore`]: the store for brokers without a disk. It keeps the
//! durable state in memory (so a broker restarted in the same process
//! with the same store recovers it), applies batches in ticket order,
//! and completes them asynchronously, optionally after a delay that
//! simulates a slow disk.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferrymq_codec::MqttString;
use parking_lot::Mutex;
use tokio::sync::watch;

use super::{
    BrokerClock, Durable, InflightRecord, QueueSummary, QueuedRecord, Recovered, RecoveredGroup,
    RecoveredSession, SessionRecord, Store, StoreError, StoreOp, SubscriptionRecord, Ticket,
};
use crate::dedup::DedupOrigin;
use crate::message::Message;

#[derive(Default)]
struct SessionData {
    record: Option<SessionRecord>,
    subscriptions: BTreeMap<MqttString, SubscriptionRecord>,
    inflight: BTreeMap<u16, (u64, u64, super::OutboundPhase)>,
    qos2_received: BTreeSet<u16>,
}

#[derive(Default)]
struct State {
    sessions: BTreeMap<u64, SessionData>,
    /// Queues of sessions and shared groups, by number.
    queues: BTreeMap<u64, BTreeMap<u64, QueuedRecord>>,
    groups: BTreeMap<u64, (MqttString, MqttString)>,
    retained: HashMap<MqttString, Arc<Message>>,
    /// Above every session number seen.
    next_number: u64,
    state_clock: u64,
    /// De-duplication origins: floor, last take, marks.
    dedup: BTreeMap<DedupOrigin, (u64, u64, BTreeSet<u64>)>,
}

impl State {
    fn apply(&mut self, op: StoreOp, now_ms: u64) {
        use StoreOp as O;
        match op {
            O::SessionPut(record) => {
                let number = record.number;
                self.next_number = self.next_number.max(number + 1);
                self.sessions.entry(number).or_default().record = Some(record);
            }
            O::SessionDelete { number, .. } => {
                self.sessions.remove(&number);
                self.queues.remove(&number);
            }
            O::SubscriptionPut {
                number,
                filter,
                subscription,
            } => {
                self.session(number)
                    .subscriptions
                    .insert(filter, subscription);
            }
            O::SubscriptionDelete { number, filter } => {
                self.session(number).subscriptions.remove(&filter);
            }
            O::QueuePut {
                number,
                seq,
                qos,
                retain,
                identifiers,
                message,
            } => {
                let record = QueuedRecord {
                    seq,
                    qos,
                    retain,
                    identifiers,
                    message,
                    queued_ms: now_ms,
                };
                self.queues.entry(number).or_default().insert(seq, record);
            }
            O::QueueDelete { number, seq, .. } => {
                if let Some(q) = self.queues.get_mut(&number) {
                    q.remove(&seq);
                }
            }
            O::InflightPut {
                number,
                packet_id,
                queue,
                seq,
                phase,
            } => {
                self.session(number)
                    .inflight
                    .insert(packet_id, (queue, seq, phase));
            }
            O::InflightDelete { number, packet_id } => {
                self.session(number).inflight.remove(&packet_id);
            }
            O::Qos2Received { number, packet_id } => {
                self.session(number).qos2_received.insert(packet_id);
            }
            O::Qos2Released { number, packet_id } => {
                self.session(number).qos2_received.remove(&packet_id);
            }
            O::RetainedPut(message) => {
                self.retained.insert(message.topic.clone(), message);
            }
            O::RetainedDelete(topic) => {
                self.retained.remove(&topic);
            }
            O::StateClock(reading) => self.state_clock = self.state_clock.max(reading),
            O::GroupPut {
                number,
                name,
                filter,
            } => {
                self.next_number = self.next_number.max(number + 1);
                self.groups.insert(number, (name, filter));
            }
            O::GroupDelete { number } => {
                self.groups.remove(&number);
                self.queues.remove(&number);
            }
            O::DedupTake {
                origin,
                floor,
                mark,
                clear,
                at_ms,
            } => {
                let entry = self.dedup.entry(origin).or_default();
                entry.0 = floor;
                entry.1 = at_ms;
                if clear {
                    entry.2.retain(|&n| n >= floor);
                }
                entry.2.extend(mark);
            }
            O::DedupForget { origin } => {
                self.dedup.remove(&origin);
            }
        }
    }

    fn session(&mut self, number: u64) -> &mut SessionData {
        self.sessions.entry(number).or_default()
    }

    fn summary(&self, number: u64) -> QueueSummary {
        self.queues
            .get(&number)
            .map_or_else(QueueSummary::default, |q| QueueSummary {
                count: q.len() as u64,
                bytes: q.values().map(|r| r.message.payload.len() as u64).sum(),
                next_seq: q.keys().next_back().map_or(0, |s| s + 1),
            })
    }
}

/// Batches taken but not yet applied, kept until their turn.
#[derive(Default)]
struct Pending {
    /// The next ticket to apply.
    next: Ticket,
    waiting: BTreeMap<Ticket, Vec<StoreOp>>,
}

/// A [`super::Store`] in memory.
pub struct MemoryStore {
    /// Source of tickets.
    next_ticket: AtomicU64,
    /// Submitted batches waiting for earlier tickets.
    pending: Mutex<Pending>,
    /// The stored state.
    state: Mutex<State>,
    /// The durability watermark.
    durable_tx: watch::Sender<Durable>,
    /// With a write delay: applied tickets and when, for the completer thread.
    delayed_tx: Option<std::sync::mpsc::Sender<(Ticket, Instant)>>,
    /// Broker time; the same across brokers started on this store.
    clock: Arc<BrokerClock>,
    /// Random per store.
    uuid: [u8; 16],
    /// Bumped at every load (every broker start on this store).
    epoch: AtomicU64,
    /// Whether queues are paged (tests of paging without a disk).
    paging: bool,
}

impl MemoryStore {
    /// A store whose writes are durable as soon as they are applied.
    pub fn new() -> Arc<MemoryStore> {
        Arc::new(Self::build(None))
    }

    /// A store whose writes become durable `delay` after they are
    /// submitted, in order: a slow disk, for tests and simulations.
    pub fn with_write_delay(delay: Duration) -> Arc<MemoryStore> {
        Arc::new(Self::build(Some(delay)))
    }

    fn build(delay: Option<Duration>) -> MemoryStore {
        let (durable_tx, _) = watch::channel(Durable::default());
        let delayed_tx = delay.map(|delay| {
            let (tx, rx) = std::sync::mpsc::channel::<(Ticket, Instant)>();
            let durable = durable_tx.clone();
            std::thread::Builder::new()
                .name("ferrymq-memstore".into())
                .spawn(move || {
                    // Completes tickets in order, each `delay` after it was applied.
                    while let Ok((ticket, applied)) = rx.recv() {
                        let due = applied + delay;
                        let now = Instant::now();
                        if due > now {
                            std::thread::sleep(due - now);
                        }
                        durable.send_modify(|d| d.up_to = d.up_to.max(ticket));
                    }
                })
                .expect("spawn the memory store's completer thread");
            tx
        });
        MemoryStore {
            next_ticket: AtomicU64::new(1),
            pending: Mutex::new(Pending {
                next: 1,
                waiting: BTreeMap::new(),
            }),
            state: Mutex::new(State::default()),
            durable_tx,
            delayed_tx,
            clock: Arc::new(BrokerClock::starting_at(0)),
            uuid: super::random_id(),
            epoch: AtomicU64::new(0),
            paging: false,
        }
    }

    /// A store that lets long queues be paged in from it, as the RocksDB
    /// store does (tests of paging without a disk).
    #[cfg(test)]
    pub(crate) fn paging() -> Arc<MemoryStore> {
        let mut store = Self::build(None);
        store.paging = true;
        Arc::new(store)
    }
}

impl Store for MemoryStore {
    fn identity(&self) -> super::NodeIdentity {
        super::NodeIdentity {
            uuid: self.uuid,
            epoch: self.epoch.load(Ordering::Acquire).max(1),
        }
    }

    fn pages_queues(&self) -> bool {
        self.paging
    }

    fn begin(&self) -> Ticket {
        self.next_ticket.fetch_add(1, Ordering::Relaxed)
    }

    fn submit(&self, ticket: Ticket, ops: Vec<StoreOp>) {
        let mut pending = self.pending.lock();
        pending.waiting.insert(ticket, ops);
        let mut applied = None;
        while let Some(ops) = {
            let next = pending.next;
            pending.waiting.remove(&next)
        } {
            let mut state = self.state.lock();
            let now_ms = self.clock.now_ms();
            for op in ops {
                state.apply(op, now_ms);
            }
            applied = Some(pending.next);
            pending.next += 1;
        }
        drop(pending);
        if let Some(up_to) = applied {
            match &self.delayed_tx {
                Some(tx) => {
                    let _ = tx.send((up_to, Instant::now()));
                }
                None => {
                    self.durable_tx
                        .send_modify(|d| d.up_to = d.up_to.max(up_to));
                }
            }
        }
    }

    fn durable(&self) -> watch::Receiver<Durable> {
        self.durable_tx.subscribe()
    }

    fn load(&self) -> Result<Recovered, StoreError> {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let state = self.state.lock();
        let sessions = state
            .sessions
            .iter()
            .filter_map(|(number, s)| {
                let inflight = s
                    .inflight
                    .iter()
                    .map(|(packet_id, (queue, seq, phase))| InflightRecord {
                        packet_id: *packet_id,
                        queue: *queue,
                        seq: *seq,
                        phase: *phase,
                        body: state.queues.get(queue).and_then(|q| q.get(seq)).cloned(),
                    })
                    .collect();
                Some(RecoveredSession {
                    record: s.record.clone()?,
                    subscriptions: s
                        .subscriptions
                        .iter()
                        .map(|(f, r)| (f.clone(), *r))
                        .collect(),
                    queue: state.summary(*number),
                    inflight,
                    qos2_received: s.qos2_received.iter().copied().collect(),
                })
            })
            .collect();
        let groups = state
            .groups
            .iter()
            .map(|(number, (name, filter))| RecoveredGroup {
                number: *number,
                name: name.clone(),
                filter: filter.clone(),
                queue: state.summary(*number),
            })
            .collect();
        Ok(Recovered {
            sessions,
            groups,
            retained: state.retained.values().cloned().collect(),
            dedup: state
                .dedup
                .iter()
                .map(|(origin, (floor, last_ms, marks))| super::RecoveredOrigin {
                    origin: *origin,
                    floor: *floor,
                    marks: marks.iter().copied().collect(),
                    last_ms: *last_ms,
                })
                .collect(),
            next_session_number: state.next_number,
            state_clock: state.state_clock,
            corrupt: 0,
            previous_run_ms: self.clock.now_ms(),
        })
    }

    fn clock(&self) -> Arc<BrokerClock> {
        self.clock.clone()
    }

    fn read_queue(&self, number: u64, from_seq: u64, max: usize) -> Vec<QueuedRecord> {
        let state = self.state.lock();
        state.queues.get(&number).map_or_else(Vec::new, |q| {
            q.range(from_seq..)
                .take(max)
                .map(|(_, r)| r.clone())
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::SessionId;
    use crate::storage::Batch;
    use bytes::Bytes;
    use ferrymq_codec::{PublishProperties, QoS};

    fn message(topic: &'static str) -> Arc<Message> {
        Arc::new(Message {
            topic: MqttString::from_static(topic),
            payload: Bytes::from_static(b"x"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: PublishProperties::default(),
            origin: SessionId(0),
            expires_at: None,
            holders: Default::default(),
        })
    }

    #[test]
    fn batches_apply_in_ticket_order_and_the_watermark_waits_for_gaps() {
        let store = MemoryStore::new();
        let durable = store.durable();
        let first = store.begin();
        let second = store.begin();
        store.submit(second, vec![StoreOp::RetainedPut(message("b"))]);
        assert_eq!(durable.borrow().up_to, 0, "ticket 2 must wait for ticket 1");
        assert_eq!(store.load().map(|r| r.retained.len()).ok(), Some(0));
        store.submit(
            first,
            vec![StoreOp::RetainedDelete(MqttString::from_static("b"))],
        );
        assert_eq!(durable.borrow().up_to, second);
        // Applied in ticket order: the delete (1) came before the put (2).
        assert_eq!(store.load().map(|r| r.retained.len()).ok(), Some(1));
    }

    #[test]
    fn a_dropped_batch_still_submits_its_ticket() {
        let store = MemoryStore::new();
        {
            let mut batch = Batch::new(store.as_ref());
            batch.push(StoreOp::RetainedPut(message("a")));
        }
        let mut later = Batch::new(store.as_ref());
        later.push(StoreOp::RetainedPut(message("b")));
        let ticket = later.submit();
        assert_eq!(store.durable().borrow().up_to, ticket);
    }

    #[test]
    fn sessions_round_trip_through_load() {
        let store = MemoryStore::new();
        let record = SessionRecord {
            client_id: MqttString::from_static("c"),
            number: 7,
            expiry_secs: 60,
            offline_since_ms: None,
            pending_will: None,
        };
        super::super::write(
            store.as_ref(),
            vec![
                StoreOp::SessionPut(record.clone()),
                StoreOp::QueuePut {
                    number: 7,
                    seq: 1,
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    identifiers: None,
                    message: message("t"),
                },
                StoreOp::QueuePut {
                    number: 7,
                    seq: 2,
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    identifiers: None,
                    message: message("t"),
                },
                StoreOp::QueueDelete {
                    number: 7,
                    seq: 1,
                    size: 1,
                },
                StoreOp::Qos2Received {
                    number: 7,
                    packet_id: 3,
                },
            ],
        );
        let recovered = store.load().expect("load");
        assert_eq!(recovered.sessions.len(), 1);
        let s = &recovered.sessions[0];
        assert_eq!(s.record, record);
        assert_eq!(s.queue.count, 1);
        assert_eq!(s.queue.next_seq, 3);
        let page: Vec<u64> = store.read_queue(7, 0, 10).iter().map(|q| q.seq).collect();
        assert_eq!(page, [2]);
        assert_eq!(s.qos2_received, [3]);
        super::super::write(
            store.as_ref(),
            vec![StoreOp::SessionDelete {
                client_id: record.client_id,
                number: 7,
            }],
        );
        assert!(store.load().expect("load").sessions.is_empty());
    }

    #[test]
    fn a_write_delay_completes_later_and_in_order() {
        let store = MemoryStore::with_write_delay(Duration::from_millis(50));
        let mut durable = store.durable();
        let start = Instant::now();
        let t1 = store.begin();
        store.submit(t1, vec![]);
        let t2 = store.begin();
        store.submit(t2, vec![]);
        assert_eq!(durable.borrow().up_to, 0);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let _ = durable.wait_for(|d| d.up_to >= t2).await;
        });
        assert!(start.elapsed() >= Duration::from_millis(50));
    }
}
