//! Receiver-side de-duplication (`[ferry] trusted_clients`): a message
//! that a trusted bridge sends with a `ferry-id` (`UUID:QUEUE:EPOCH:N`,
//! [`crate::MessageId`]) takes effect once, however often it is resent.
//!
//! Ids are numbered per origin queue (node uuid, queue, epoch), from 1,
//! in the order the sender queued them. Per origin the table keeps a
//! floor (every number below it was taken) and the numbers taken above
//! it. A sender resends only what it has in flight, in order, and at most
//! `receive_maximum` messages are ever in flight towards us, so a missing
//! number with more than that many numbers taken above it will never
//! come (the sender dropped it from its queue): the floor then moves past
//! it, which bounds the table at `receive_maximum` numbers per origin.
//! Origins silent for `forget_after` are forgotten (a resend older than
//! that would be taken again: the documented trade-off).
//!
//! Sans-I/O: the connection asks ([`Dedup::is_taken`]), routes, and takes
//! the id ([`Dedup::take`]) with the store batch that queues the message;
//! the store keeps the floor and the marks (see `storage`).

use std::collections::{BTreeSet, HashMap};

use crate::message::MessageId;

/// The queue a message id comes from; ids are numbered per origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DedupOrigin {
    /// The sending node's uuid.
    pub uuid: [u8; 16],
    /// Its queue.
    pub queue: u64,
    /// The run that queued the message.
    pub epoch: u64,
}

impl DedupOrigin {
    /// The origin of `id`.
    pub fn of(id: &MessageId) -> DedupOrigin {
        DedupOrigin {
            uuid: id.uuid,
            queue: id.queue,
            epoch: id.epoch,
        }
    }
}

/// What one origin has taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Every number below it was taken.
    pub floor: u64,
    /// Numbers taken at or above the floor (never the floor itself).
    pub above: BTreeSet<u64>,
    /// When a number was last taken (broker ms).
    pub last_ms: u64,
}

impl Seen {
    fn new(now_ms: u64) -> Seen {
        Seen {
            // Numbers start at 1.
            floor: 1,
            above: BTreeSet::new(),
            last_ms: now_ms,
        }
    }

    fn has(&self, n: u64) -> bool {
        n < self.floor || self.above.contains(&n)
    }
}

/// What taking a number changed, for the store: the new floor, whether
/// the number itself stays above it (a mark to write), and whether marks
/// written before went below the floor (to delete).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    /// The origin's floor now.
    pub floor: u64,
    /// The number is kept above the floor.
    pub mark: bool,
    /// Numbers marked before are now below the floor.
    pub cleared: bool,
}

/// The de-duplication table of a receiving node.
#[derive(Debug)]
pub struct Dedup {
    origins: HashMap<DedupOrigin, Seen>,
    /// The most numbers kept above an origin's floor (the receive
    /// maximum: no more can be in flight).
    max_above: usize,
}

impl Dedup {
    /// An empty table keeping at most `max_above` numbers above each
    /// origin's floor (at least 1).
    pub fn new(max_above: usize) -> Dedup {
        Dedup {
            origins: HashMap::new(),
            max_above: max_above.max(1),
        }
    }

    /// Keeps up to `max_above` numbers above each floor from now on if
    /// that is more than before (a reload that raised the receive
    /// maximum); never fewer, since connections made before keep the
    /// window they were given.
    pub fn raise_bound(&mut self, max_above: usize) {
        self.max_above = self.max_above.max(max_above);
    }

    /// Whether `id` was taken already.
    pub fn is_taken(&self, id: &MessageId) -> bool {
        self.origins
            .get(&DedupOrigin::of(id))
            .is_some_and(|seen| seen.has(id.n))
    }

    /// Takes `id` at `now_ms`; `None` if it was taken already.
    pub fn take(&mut self, id: &MessageId, now_ms: u64) -> Option<(DedupOrigin, Taken)> {
        let origin = DedupOrigin::of(id);
        let max_above = self.max_above;
        let seen = self
            .origins
            .entry(origin)
            .or_insert_with(|| Seen::new(now_ms));
        if seen.has(id.n) {
            return None;
        }
        seen.last_ms = now_ms;
        let marked_before = seen.above.len();
        seen.above.insert(id.n);
        // Over the bound: the lowest missing numbers will never come.
        while seen.above.len() > max_above {
            if let Some(lowest) = seen.above.pop_first() {
                seen.floor = lowest + 1;
            }
        }
        while seen.above.first() == Some(&seen.floor) {
            seen.above.pop_first();
            seen.floor += 1;
        }
        let mark = seen.above.contains(&id.n);
        // Of the numbers marked before, how many are still above.
        let kept_before = seen.above.len() - usize::from(mark);
        Some((
            origin,
            Taken {
                floor: seen.floor,
                mark,
                cleared: kept_before < marked_before,
            },
        ))
    }

    /// Puts back what the store kept of one origin.
    pub fn restore(&mut self, origin: DedupOrigin, floor: u64, marks: &[u64], last_ms: u64) {
        let mut seen = Seen {
            floor: floor.max(1),
            above: marks.iter().copied().filter(|&n| n >= floor).collect(),
            last_ms,
        };
        while seen.above.len() > self.max_above {
            if let Some(lowest) = seen.above.pop_first() {
                seen.floor = lowest + 1;
            }
        }
        while seen.above.first() == Some(&seen.floor) {
            seen.above.pop_first();
            seen.floor += 1;
        }
        self.origins.insert(origin, seen);
    }

    /// Forgets the origins that took nothing since `before_ms`; returns
    /// them (for the store).
    pub fn forget_idle(&mut self, before_ms: u64) -> Vec<DedupOrigin> {
        let idle: Vec<DedupOrigin> = self
            .origins
            .iter()
            .filter(|(_, seen)| seen.last_ms < before_ms)
            .map(|(origin, _)| *origin)
            .collect();
        for origin in &idle {
            self.origins.remove(origin);
        }
        idle
    }

    /// What the table holds of `origin`.
    #[cfg(test)]
    pub fn seen(&self, origin: &DedupOrigin) -> Option<&Seen> {
        self.origins.get(origin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> MessageId {
        MessageId {
            uuid: [7; 16],
            queue: 3,
            epoch: 2,
            n,
        }
    }

    /// Takes `ns` in order into a table bounded at `max`; what each take
    /// returned (`None`: a duplicate), and the floor and marks after.
    fn run(max: usize, ns: &[u64]) -> (Vec<Option<Taken>>, u64, Vec<u64>) {
        let mut table = Dedup::new(max);
        let taken = ns
            .iter()
            .map(|&n| table.take(&id(n), 0).map(|(_, t)| t))
            .collect();
        let seen = table.seen(&DedupOrigin::of(&id(1))).expect("origin");
        (taken, seen.floor, seen.above.iter().copied().collect())
    }

    fn t(floor: u64, mark: bool, cleared: bool) -> Option<Taken> {
        Some(Taken {
            floor,
            mark,
            cleared,
        })
    }

    #[test]
    fn numbers_are_taken_once_and_the_floor_follows_the_contiguous_ones() {
        // (bound, numbers taken, what each take returned, floor, marks)
        type Case<'a> = (usize, &'a [u64], &'a [Option<Taken>], u64, &'a [u64]);
        let cases: &[Case] = &[
            // In order: the floor moves, nothing is marked.
            (
                8,
                &[1, 2, 3],
                &[t(2, false, false), t(3, false, false), t(4, false, false)],
                4,
                &[],
            ),
            // A resend of the last ones after a reconnect: duplicates.
            (
                8,
                &[1, 2, 2, 1],
                &[t(2, false, false), t(3, false, false), None, None],
                3,
                &[],
            ),
            // Out of order: 3 waits above the floor until 2 comes.
            (
                8,
                &[1, 3, 2],
                &[t(2, false, false), t(2, true, false), t(4, false, true)],
                4,
                &[],
            ),
            (8, &[3, 3], &[t(1, true, false), None], 1, &[3]),
            // 2 never comes (dropped by the sender): past the bound of
            // numbers above the floor, the floor moves past it.
            (
                2,
                &[1, 3, 4, 5],
                &[
                    t(2, false, false),
                    t(2, true, false),
                    t(2, true, false),
                    t(6, false, true),
                ],
                6,
                &[],
            ),
            (
                2,
                &[1, 3, 5, 7],
                &[
                    t(2, false, false),
                    t(2, true, false),
                    t(2, true, false),
                    t(4, true, true),
                ],
                4,
                &[5, 7],
            ),
            // Below the floor is a duplicate, also when it never came.
            (
                2,
                &[1, 3, 5, 7, 2],
                &[
                    t(2, false, false),
                    t(2, true, false),
                    t(2, true, false),
                    t(4, true, true),
                    None,
                ],
                4,
                &[5, 7],
            ),
        ];
        for (max, ns, expected, floor, marks) in cases {
            let (taken, got_floor, got_marks) = run(*max, ns);
            assert_eq!(&taken, expected, "{ns:?} (max {max})");
            assert_eq!((got_floor, &got_marks[..]), (*floor, *marks), "{ns:?}");
        }
    }

    #[test]
    fn origins_are_apart_and_idle_ones_are_forgotten() {
        let mut table = Dedup::new(16);
        let other = MessageId { epoch: 3, ..id(1) };
        assert!(table.take(&id(1), 10).is_some());
        assert!(table.take(&other, 20).is_some());
        assert!(table.is_taken(&id(1)) && table.is_taken(&other));
        assert!(!table.is_taken(&MessageId { queue: 4, ..id(1) }));
        assert_eq!(table.forget_idle(15), vec![DedupOrigin::of(&id(1))]);
        assert!(!table.is_taken(&id(1)));
        assert!(table.is_taken(&other));
        assert!(table.seen(&DedupOrigin::of(&id(1))).is_none());
    }

    #[test]
    fn a_restored_origin_answers_as_before() {
        let mut table = Dedup::new(4);
        table.restore(DedupOrigin::of(&id(1)), 5, &[7, 9, 2], 0);
        for (n, taken) in [
            (4, true),
            (5, false),
            (6, false),
            (7, true),
            (9, true),
            (10, false),
        ] {
            assert_eq!(table.is_taken(&id(n)), taken, "{n}");
        }
        // Marks that now continue the floor are folded into it; more than
        // the bound moves the floor past the lowest gaps.
        let mut table = Dedup::new(2);
        table.restore(DedupOrigin::of(&id(1)), 5, &[5, 6, 8, 10, 12], 0);
        let seen = table.seen(&DedupOrigin::of(&id(1))).expect("origin");
        assert_eq!((seen.floor, seen.above.len()), (9, 2));
    }
}
