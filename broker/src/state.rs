//! State topics (`[state] topics`): the retained value of such a topic is
//! a last-writer-wins register. Every value carries a [`Stamp`] (the
//! `ferry-stamp` user property): a hybrid logical clock reading and the
//! node that made it, compared as one number, then by node. On every node
//! a retained publish to a state topic takes effect only if its stamp is
//! above the one held, so nodes that took the same writes in any order,
//! any number of times, hold the same value: the merge is commutative,
//! associative and idempotent. A cleared value is a tombstone: the empty
//! retained message with its stamp, kept (never delivered) so that an
//! older value cannot come back, until `tombstone_ttl_secs` have passed.
//!
//! This module is the policy, without I/O: the stamp's text form, the
//! clock ([`Hlc`]) and the comparison. `publish::route` applies it to the
//! retained set under [`StateTopics::lock`], so that stamp order, set order
//! and store order are one.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferrymq_codec::MqttString;
use ferrymq_codec::topic::matches;
use parking_lot::{Mutex, MutexGuard};

use crate::message::Message;

/// The user property that carries a state value's [`Stamp`].
pub const STAMP_PROPERTY: &str = "ferry-stamp";

/// Bits of a clock reading below the milliseconds: the logical counter.
const COUNTER_BITS: u32 = 16;

/// How far a restarted clock starts ahead of the last reading it stored:
/// stamps of the batch a crash lost (never acknowledged, but perhaps
/// delivered) are not handed out again.
const RESTART_LEAP_MS: u64 = 1_000;

/// When and where a state value was written: a hybrid logical clock
/// reading (milliseconds since the Unix epoch in the high 48 bits, a
/// counter in the low 16) and the writing node's identity, which breaks
/// ties. Written `MS:COUNTER:NODE` (NODE as 32 hex digits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Stamp {
    /// The clock reading.
    pub hlc: u64,
    /// The node that made it.
    pub node: [u8; 16],
}

impl Stamp {
    /// The reading's milliseconds since the Unix epoch.
    pub fn wall_ms(&self) -> u64 {
        self.hlc >> COUNTER_BITS
    }

    /// The stamp a message carries, if any (the first one).
    pub fn of(message: &Message) -> Option<Stamp> {
        message
            .properties
            .user_properties
            .iter()
            .find(|(k, _)| k.as_str() == STAMP_PROPERTY)
            .and_then(|(_, v)| v.as_str().parse().ok())
    }

    /// `message` with this stamp as its only `ferry-stamp`.
    pub fn put_on(&self, message: &mut Arc<Message>) {
        let properties = &mut Arc::make_mut(message).properties.user_properties;
        properties.retain(|(k, _)| k.as_str() != STAMP_PROPERTY);
        if let Ok(value) = MqttString::new(&self.to_string()) {
            properties.push((MqttString::from_static(STAMP_PROPERTY), value));
        }
    }
}

impl fmt::Display for Stamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:",
            self.hlc >> COUNTER_BITS,
            self.hlc & ((1 << COUNTER_BITS) - 1)
        )?;
        self.node.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// A `ferry-stamp` that does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadStamp;

impl FromStr for Stamp {
    type Err = BadStamp;

    fn from_str(s: &str) -> Result<Self, BadStamp> {
        let mut parts = s.split(':');
        let (Some(ms), Some(counter), Some(node), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(BadStamp);
        };
        let ms: u64 = ms.parse().map_err(|_| BadStamp)?;
        let counter: u64 = counter.parse().map_err(|_| BadStamp)?;
        if ms >> (64 - COUNTER_BITS) != 0 || counter >> COUNTER_BITS != 0 || node.len() != 32 {
            return Err(BadStamp);
        }
        let mut id = [0u8; 16];
        for (i, byte) in id.iter_mut().enumerate() {
            *byte = u8::from_str_radix(node.get(2 * i..2 * i + 2).ok_or(BadStamp)?, 16)
                .map_err(|_| BadStamp)?;
        }
        Ok(Stamp {
            hlc: ms << COUNTER_BITS | counter,
            node: id,
        })
    }
}

/// A hybrid logical clock: readings follow the wall clock when it moves
/// forward and never go backwards (a wall clock set back, or a gateway
/// without a real-time clock booting in 1970, only makes the counter
/// count). Readings seen from other nodes move it forward, at most
/// `max_skew` ahead of this node's wall clock.
#[derive(Debug, Clone)]
pub struct Hlc {
    last: u64,
}

impl Hlc {
    /// A clock that continues after `stored`, the last reading a previous
    /// run stored (0: none), with a leap past readings it may have handed
    /// out but not stored.
    pub fn recovered(stored: u64) -> Self {
        Hlc {
            last: if stored == 0 {
                0
            } else {
                stored.saturating_add(RESTART_LEAP_MS << COUNTER_BITS)
            },
        }
    }

    /// The last reading.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// A new reading at wall clock `wall_ms`, above every earlier one.
    pub fn tick(&mut self, wall_ms: u64) -> u64 {
        let physical = wall_ms.saturating_mul(1 << COUNTER_BITS);
        self.last = physical.max(self.last.saturating_add(1));
        self.last
    }

    /// Takes another node's reading at wall clock `wall_ms`: the clock
    /// moves up to it, but never more than `max_skew` ahead of the wall
    /// clock, so one node's clock far ahead does not drag every clock
    /// with it.
    pub fn observe(&mut self, remote: u64, wall_ms: u64, max_skew: Duration) {
        let skew = u64::try_from(max_skew.as_millis()).unwrap_or(u64::MAX);
        let bound = wall_ms
            .saturating_add(skew)
            .saturating_mul(1 << COUNTER_BITS);
        self.last = self.last.max(remote.min(bound));
    }
}

/// Whether a value stamped `incoming` replaces one stamped `held`.
pub fn supersedes(incoming: &Stamp, held: Option<&Stamp>) -> bool {
    held.is_none_or(|h| incoming > h)
}

/// The wall clock in milliseconds since the Unix epoch (0 before it).
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// This node's state topics, its clock, and the tombstones it keeps.
pub struct StateTopics {
    filters: Vec<Box<str>>,
    node: [u8; 16],
    max_skew: Duration,
    tombstone_ttl: Duration,
    inner: Mutex<Inner>,
}

/// What [`StateTopics::lock`] guards.
pub struct Inner {
    clock: Hlc,
    /// Tombstones held, oldest stamp first.
    tombstones: BTreeSet<(Stamp, MqttString)>,
}

impl StateTopics {
    /// For `[state]`, on node `node`, whose clock continues after
    /// `stored` (see [`Hlc::recovered`]).
    pub fn new(config: &ferrymq_config::State, node: [u8; 16], stored: u64) -> Self {
        StateTopics {
            filters: config.topics.iter().map(|t| t.as_str().into()).collect(),
            node,
            max_skew: config.max_clock_skew,
            tombstone_ttl: config.tombstone_ttl,
            inner: Mutex::new(Inner {
                clock: Hlc::recovered(stored),
                tombstones: BTreeSet::new(),
            }),
        }
    }

    /// Whether `topic` is a state topic.
    pub fn covers(&self, topic: &str) -> bool {
        self.filters.iter().any(|f| matches(f, topic))
    }

    /// Locks the clock and the tombstones: a state write stamps, compares,
    /// sets and takes its store ticket under this lock.
    pub fn lock(&self) -> StateGuard<'_> {
        StateGuard {
            topics: self,
            inner: self.inner.lock(),
        }
    }
}

/// A state write in progress ([`StateTopics::lock`]).
pub struct StateGuard<'a> {
    topics: &'a StateTopics,
    inner: MutexGuard<'a, Inner>,
}

impl StateGuard<'_> {
    /// The stamp of a write to a topic whose value is stamped `held`, at
    /// wall clock `wall_ms`. `carried`: the stamp it came with from a node
    /// trusted to stamp, kept as it is (every node compares the same
    /// stamps, which is what makes them agree); the clock takes it, at
    /// most `max_clock_skew` ahead of the wall clock. `None`: written
    /// here, stamped with the clock and above `held` (a write replaces
    /// what its writer saw, even a value stamped by a clock far ahead).
    fn stamp(&mut self, carried: Option<Stamp>, held: Option<Stamp>, wall_ms: u64) -> Stamp {
        let clock = &mut self.inner.clock;
        match carried {
            Some(stamp) => {
                clock.observe(stamp.hlc, wall_ms, self.topics.max_skew);
                stamp
            }
            None => Stamp {
                hlc: clock
                    .tick(wall_ms)
                    .max(held.map_or(0, |h| h.hlc.saturating_add(1))),
                node: self.topics.node,
            },
        }
    }

    /// A write to a topic whose value is stamped `held` (see
    /// [`StateGuard::stamp`]): its stamp if it replaces that value,
    /// `None` if it is older (or the same write again).
    pub fn write(
        &mut self,
        carried: Option<Stamp>,
        held: Option<Stamp>,
        wall_ms: u64,
    ) -> Option<Stamp> {
        let stamp = self.stamp(carried, held, wall_ms);
        supersedes(&stamp, held.as_ref()).then_some(stamp)
    }

    /// Takes a stamp read from the store at start: the clock stays above it.
    pub fn recovered(&mut self, stamp: Stamp) {
        self.inner.clock.last = self.inner.clock.last.max(stamp.hlc);
    }

    /// The clock's last reading, to store with the write.
    pub fn clock(&self) -> u64 {
        self.inner.clock.last()
    }

    /// Records the tombstone now held for `topic`, replacing `previous`
    /// (the stamp of the tombstone held before, if any).
    pub fn tombstone(&mut self, topic: &MqttString, stamp: Stamp, previous: Option<Stamp>) {
        if let Some(previous) = previous {
            self.inner.tombstones.remove(&(previous, topic.clone()));
        }
        self.inner.tombstones.insert((stamp, topic.clone()));
    }

    /// A value replaced the tombstone stamped `previous` on `topic`.
    pub fn untombstone(&mut self, topic: &MqttString, previous: Stamp) {
        self.inner.tombstones.remove(&(previous, topic.clone()));
    }

    /// Removes and returns the tombstones older than `tombstone_ttl` at
    /// wall clock `wall_ms`.
    pub fn expired_tombstones(&mut self, wall_ms: u64) -> Vec<(Stamp, MqttString)> {
        let ttl = u64::try_from(self.topics.tombstone_ttl.as_millis()).unwrap_or(u64::MAX);
        let mut out = Vec::new();
        while let Some(first) = self.inner.tombstones.first() {
            if first.0.wall_ms().saturating_add(ttl) > wall_ms {
                break;
            }
            out.extend(self.inner.tombstones.pop_first());
        }
        out
    }
}

/// Adds every `[state]` topic to each bridge's forward rules, both ways
/// and without prefixes, ahead of the bridge's own rules (so a state topic
/// is always carried as itself): state is merged across every bridge.
pub fn add_bridge_rules(config: &mut ferrymq_config::Config) {
    let topics = config.state.topics.clone();
    for bridge in &mut config.bridges {
        let rules = topics
            .iter()
            .filter(|t| {
                !bridge.forward.iter().any(|r| {
                    &r.filter == *t
                        && r.direction == ferrymq_config::Direction::Both
                        && r.local_prefix.is_empty()
                        && r.remote_prefix.is_empty()
                })
            })
            .map(|t| ferrymq_config::Forward {
                filter: t.clone(),
                direction: ferrymq_config::Direction::Both,
                qos: 1,
                ..ferrymq_config::Forward::default()
            })
            .collect::<Vec<_>>();
        bridge.forward.splice(0..0, rules);
    }
}

#[cfg(test)]
mod tests;
