use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use crdts::{CvRDT, LWWReg};
use proptest::prelude::*;

use super::*;

const NODE_A: [u8; 16] = [0xa; 16];
const NODE_B: [u8; 16] = [0xb; 16];

fn config(topics: &[&str]) -> ferrymq_config::State {
    ferrymq_config::State {
        topics: topics.iter().map(|t| (*t).to_owned()).collect(),
        ..ferrymq_config::State::default()
    }
}

fn stamp(ms: u64, counter: u64, node: [u8; 16]) -> Stamp {
    Stamp {
        hlc: ms << COUNTER_BITS | counter,
        node,
    }
}

#[test]
fn stamps_read_back_what_they_write_and_refuse_the_rest() {
    let s = stamp(1_733_400_000_123, 7, NODE_B);
    let text = s.to_string();
    assert_eq!(text, "1733400000123:7:0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b");
    assert_eq!(text.parse::<Stamp>(), Ok(s));
    for bad in [
        "",
        "1:2",
        "1:2:0b0b",
        "x:2:0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",
        "1:65536:0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",
        "281474976710656:0:0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",
        "1:2:0b0b0b0b0b0b0b0b0b0b0b0b0b0b0bzz",
        "1:2:0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b:9",
    ] {
        assert_eq!(bad.parse::<Stamp>(), Err(BadStamp), "{bad:?}");
    }
}

#[test]
fn later_stamps_win_and_the_node_breaks_ties() {
    let cases = [
        (stamp(10, 0, NODE_A), None, true),
        (stamp(10, 0, NODE_A), Some(stamp(9, 5, NODE_B)), true),
        (stamp(10, 0, NODE_A), Some(stamp(10, 1, NODE_A)), false),
        (stamp(10, 0, NODE_B), Some(stamp(10, 0, NODE_A)), true),
        (stamp(10, 0, NODE_A), Some(stamp(10, 0, NODE_B)), false),
        // The same write again changes nothing.
        (stamp(10, 0, NODE_A), Some(stamp(10, 0, NODE_A)), false),
    ];
    for (incoming, held, wins) in cases {
        assert_eq!(
            supersedes(&incoming, held.as_ref()),
            wins,
            "{incoming} over {held:?}"
        );
    }
}

#[test]
fn the_clock_follows_the_wall_and_never_goes_back() {
    let mut clock = Hlc::recovered(0);
    let a = clock.tick(1_000);
    let b = clock.tick(1_000);
    let c = clock.tick(900); // the wall clock was set back
    let d = clock.tick(2_000);
    assert!(a < b && b < c && c < d, "{a} {b} {c} {d}");
    assert_eq!(a, 1_000 << COUNTER_BITS);
    assert_eq!(d, 2_000 << COUNTER_BITS);
    // A restart continues a second past what was stored, even with the
    // wall clock back in 1970 (a gateway without a real-time clock).
    let mut restarted = Hlc::recovered(d);
    assert!(restarted.tick(0) > d + (999 << COUNTER_BITS));
}

#[test]
fn a_clock_far_ahead_moves_this_one_only_up_to_the_skew() {
    let skew = Duration::from_secs(60);
    let mut clock = Hlc::recovered(0);
    clock.observe(1_000 << COUNTER_BITS, 5_000, skew);
    assert_eq!(clock.last(), 1_000 << COUNTER_BITS);
    clock.observe(10_000 << COUNTER_BITS, 5_000, skew);
    assert_eq!(clock.last(), 10_000 << COUNTER_BITS);
    let year = 365 * 86_400_000;
    clock.observe((5_000 + year) << COUNTER_BITS, 5_000, skew);
    assert_eq!(clock.last(), 65_000 << COUNTER_BITS);
}

#[test]
fn writes_here_replace_what_they_saw_even_from_a_clock_far_ahead() {
    let topics = StateTopics::new(&config(&["shadow/#"]), NODE_A, 0);
    let mut guard = topics.lock();
    let ahead = stamp(10_000_000, 0, NODE_B);
    // Kept as it came: every node compares the same stamps.
    assert_eq!(guard.write(Some(ahead), None, 5_000), Some(ahead));
    assert!(guard.clock() < ahead.hlc);
    // A local write on that topic goes above it; on another, the clock.
    let next = guard.write(None, Some(ahead), 5_001).expect("wins");
    assert_eq!((next.hlc, next.node), (ahead.hlc + 1, NODE_A));
    let elsewhere = guard.write(None, None, 5_002).expect("wins");
    assert_eq!(elsewhere.wall_ms(), 65_000);
    // An older value from a trusted node does not replace a newer one.
    assert_eq!(
        guard.write(Some(stamp(1, 0, NODE_B)), Some(next), 5_003),
        None
    );
}

#[test]
fn state_topics_are_the_configured_filters() {
    let topics = StateTopics::new(&config(&["shadow/#", "cfg/+/mode"]), NODE_A, 0);
    for (topic, covered) in [
        ("shadow/dev-1", true),
        ("shadow", true),
        ("cfg/a/mode", true),
        ("cfg/a/b/mode", false),
        ("sensors/1", false),
        ("$SYS/shadow", false),
    ] {
        assert_eq!(topics.covers(topic), covered, "{topic}");
    }
}

#[test]
fn tombstones_expire_oldest_first() {
    let state = ferrymq_config::State {
        tombstone_ttl: Duration::from_secs(60),
        ..config(&["s/#"])
    };
    let topics = StateTopics::new(&state, NODE_A, 0);
    let mut guard = topics.lock();
    let (a, b) = (
        MqttString::from_static("s/a"),
        MqttString::from_static("s/b"),
    );
    guard.tombstone(&a, stamp(1_000, 0, NODE_A), None);
    guard.tombstone(&b, stamp(2_000, 0, NODE_A), None);
    // Cleared again: the newer tombstone replaces the older.
    guard.tombstone(&a, stamp(3_000, 0, NODE_A), Some(stamp(1_000, 0, NODE_A)));
    assert!(guard.expired_tombstones(61_999).is_empty());
    assert_eq!(
        guard.expired_tombstones(62_000),
        vec![(stamp(2_000, 0, NODE_A), b.clone())]
    );
    guard.untombstone(&a, stamp(3_000, 0, NODE_A));
    assert!(guard.expired_tombstones(u64::MAX).is_empty());
}

#[test]
fn bridges_carry_state_topics_both_ways_first() {
    let mut config = ferrymq_config::Config {
        state: config(&["shadow/#"]),
        ..ferrymq_config::Config::default()
    };
    config.bridges.push(ferrymq_config::Bridge {
        forward: vec![ferrymq_config::Forward {
            filter: "#".into(),
            remote_prefix: "site/".into(),
            ..ferrymq_config::Forward::default()
        }],
        ..ferrymq_config::Bridge::default()
    });
    add_bridge_rules(&mut config);
    add_bridge_rules(&mut config);
    let rules: Vec<(&str, ferrymq_config::Direction, &str)> = config.bridges[0]
        .forward
        .iter()
        .map(|r| (r.filter.as_str(), r.direction, r.remote_prefix.as_str()))
        .collect();
    assert_eq!(
        rules,
        [
            ("shadow/#", ferrymq_config::Direction::Both, ""),
            ("#", ferrymq_config::Direction::Out, "site/")
        ]
    );
}

/// One node of the model below: its state topics (clock, as the broker
/// has it) and the values it holds, as the retained set would.
struct Replica {
    node: [u8; 16],
    topics: StateTopics,
    values: BTreeMap<u8, (Stamp, Option<u8>)>,
    /// The clock as last stored with a write.
    stored: u64,
    /// This node's wall clock is the true time plus this (ms).
    offset: i64,
}

impl Replica {
    fn new(i: usize) -> Self {
        let node = [u8::try_from(i + 1).unwrap_or(0); 16];
        Replica {
            node,
            topics: StateTopics::new(&config(&["#"]), node, 0),
            values: BTreeMap::new(),
            stored: 0,
            offset: 0,
        }
    }

    fn wall(&self, now: u64) -> u64 {
        now.saturating_add_signed(self.offset)
    }

    /// What `publish::route` does with a state write.
    fn write(
        &mut self,
        now: u64,
        topic: u8,
        carried: Option<Stamp>,
        value: Option<u8>,
    ) -> Option<Stamp> {
        let wall = self.wall(now);
        let held = self.values.get(&topic).map(|(s, _)| *s);
        let mut guard = self.topics.lock();
        let stamp = guard.write(carried, held, wall)?;
        self.stored = guard.clock();
        drop(guard);
        self.values.insert(topic, (stamp, value));
        Some(stamp)
    }

    /// A restart: the clock comes back from what was stored and from the
    /// values' stamps (as `lib.rs` recovers it), with the wall clock moved.
    fn restart(&mut self, jump: i64) {
        self.offset = self.offset.saturating_add(jump);
        self.topics = StateTopics::new(&config(&["#"]), self.node, self.stored);
        let mut guard = self.topics.lock();
        for (stamp, _) in self.values.values() {
            guard.recovered(*stamp);
        }
    }
}

/// A write as it travels: topic, stamp, value (`None`: cleared).
type Write = (u8, Stamp, Option<u8>);

#[derive(Debug, Clone)]
enum Op {
    Write {
        at: usize,
        topic: u8,
        value: Option<u8>,
    },
    Deliver {
        from: usize,
        to: usize,
        lose: bool,
        duplicate: bool,
    },
    Cut {
        a: usize,
        b: usize,
    },
    Heal {
        a: usize,
        b: usize,
    },
    Restart {
        at: usize,
        jump: i64,
    },
    Wait {
        ms: u64,
    },
}

fn op(replicas: usize) -> impl Strategy<Value = Op> {
    let r = 0..replicas;
    prop_oneof![
        4 => (r.clone(), 0u8..4, proptest::option::weighted(0.8, any::<u8>()))
            .prop_map(|(at, topic, value)| Op::Write { at, topic, value }),
        4 => (r.clone(), r.clone(), proptest::bool::weighted(0.2), proptest::bool::weighted(0.2))
            .prop_map(|(from, to, lose, duplicate)| Op::Deliver { from, to, lose, duplicate }),
        1 => (r.clone(), r.clone()).prop_map(|(a, b)| Op::Cut { a, b }),
        1 => (r.clone(), r.clone()).prop_map(|(a, b)| Op::Heal { a, b }),
        1 => (r.clone(), prop_oneof![-7_200_000i64..7_200_000, Just(i64::MIN / 2)])
            .prop_map(|(at, jump)| Op::Restart { at, jump }),
        1 => (0u64..5_000).prop_map(|ms| Op::Wait { ms }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Replicas writing and clearing the same topics, with partitions,
    /// lost and duplicated messages, restarts and clock jumps (back to
    /// 1970 included): once healed and synced, every replica holds for
    /// each topic the value of the highest stamp ever written, as
    /// `crdts::LWWReg` merges them, and no clock ever went back.
    #[test]
    fn replicas_converge_on_the_highest_stamp(
        replicas in 2usize..=3,
        ops in proptest::collection::vec(op(3), 1..120),
    ) {
        let mut nodes: Vec<Replica> = (0..replicas).map(Replica::new).collect();
        // In flight from one node to another.
        let mut links: BTreeMap<(usize, usize), VecDeque<Write>> = BTreeMap::new();
        let mut cut = vec![vec![false; replicas]; replicas];
        let mut model: BTreeMap<u8, LWWReg<Option<u8>, Stamp>> = BTreeMap::new();
        let mut now: u64 = 1_733_400_000_000;
        for op in ops {
            match op {
                Op::Write { at, topic, value } => {
                    let at = at % replicas;
                    let before = nodes[at].topics.lock().clock();
                    let stamp = nodes[at].write(now, topic, None, value);
                    let stamp = stamp.expect("a local write always wins where it is made");
                    prop_assert!(nodes[at].topics.lock().clock() >= before);
                    let merged = LWWReg { val: value, marker: stamp };
                    match model.get_mut(&topic) {
                        Some(reg) => reg.merge(merged),
                        None => {
                            model.insert(topic, merged);
                        }
                    }
                    for to in (0..replicas).filter(|&to| to != at && !cut[at][to]) {
                        links.entry((at, to)).or_default().push_back((topic, stamp, value));
                    }
                }
                Op::Deliver { from, to, lose, duplicate } => {
                    let (from, to) = (from % replicas, to % replicas);
                    let Some(message) = links.get_mut(&(from, to)).and_then(VecDeque::pop_front) else {
                        continue;
                    };
                    if lose || cut[from][to] {
                        continue;
                    }
                    let (topic, stamp, value) = message;
                    nodes[to].write(now, topic, Some(stamp), value);
                    if duplicate {
                        nodes[to].write(now, topic, Some(stamp), value);
                    }
                }
                Op::Cut { a, b } => {
                    let (a, b) = (a % replicas, b % replicas);
                    cut[a][b] = true;
                    cut[b][a] = true;
                }
                Op::Heal { a, b } => {
                    let (a, b) = (a % replicas, b % replicas);
                    cut[a][b] = false;
                    cut[b][a] = false;
                }
                Op::Restart { at, jump } => {
                    let at = at % replicas;
                    let before = nodes[at].topics.lock().clock();
                    nodes[at].restart(jump);
                    prop_assert!(nodes[at].topics.lock().clock() >= before, "the clock went back at a restart");
                }
                Op::Wait { ms } => now += ms,
            }
        }
        // Healed: each side sends the other everything it holds (what a
        // reconnect's exchange of retained state amounts to), twice.
        for _ in 0..2 {
            for from in 0..replicas {
                let held: Vec<(u8, Stamp, Option<u8>)> =
                    nodes[from].values.iter().map(|(t, (s, v))| (*t, *s, *v)).collect();
                for to in (0..replicas).filter(|&to| to != from) {
                    for (topic, stamp, value) in &held {
                        nodes[to].write(now, *topic, Some(*stamp), *value);
                    }
                }
            }
        }
        let expected: BTreeMap<u8, (Stamp, Option<u8>)> =
            model.into_iter().map(|(t, reg)| (t, (reg.marker, reg.val))).collect();
        for node in &nodes {
            prop_assert_eq!(&node.values, &expected);
        }
    }
}
