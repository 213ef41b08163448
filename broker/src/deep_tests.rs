//! Deep topics and filters through every structure that walks them, on a
//! thread with a small stack: any walk that recursed once per level would
//! overflow it at once (issue: a 14,600-level retained topic plus a deep
//! wildcard subscription overflowed a 2 MiB worker stack and crashed the
//! broker for good).

use ferrymq_codec::QoS;
use ferrymq_codec::topic::matches;
use proptest::prelude::*;

use crate::message::SessionId;
use crate::retained::Retained;
use crate::retained::tests::message;
use crate::router::Router;
use crate::router::tests::sub;

/// Far below tokio's 2 MiB worker stacks.
const SMALL_STACK: usize = 256 << 10;

fn on_small_stack(f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new()
        .stack_size(SMALL_STACK)
        .spawn(f)
        .expect("spawn")
        .join()
        .expect("the walk finished on a small stack");
}

/// A topic of `depth` levels drawn from `a`, `b` and empty levels.
fn topic(depth: usize, seed: u64) -> String {
    let mut x = seed | 1;
    let levels: Vec<&str> = (0..depth)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ["a", "a", "a", "b", ""][(x % 5) as usize]
        })
        .collect();
    levels.join("/")
}

/// A filter that matches `topic` (its levels, some replaced by `+`, cut
/// short by `#` when `hash`), or, when `differ`, one level changed so it
/// does not.
fn filter_for(topic: &str, seed: u64, hash: bool, differ: bool) -> String {
    let mut levels: Vec<&str> = topic.split('/').collect();
    let mut x = seed | 1;
    for level in levels.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(3) {
            *level = "+";
        }
    }
    if differ {
        let last = levels.len() - 1;
        levels[last / 2] = "z";
    }
    if hash {
        let keep = levels.len() - levels.len() / 3;
        levels.truncate(keep.max(1));
        levels.push("#");
    }
    levels.join("/")
}

/// Router and retained set: subscribe, match, unsubscribe, set, match,
/// clear and drop, with the reference matcher as the oracle.
fn walk(depth: usize, seed: u64, hash: bool, differ: bool) {
    let topic = topic(depth, seed);
    let filter = filter_for(&topic, seed.rotate_left(17), hash, differ);
    let expected = matches(&filter, &topic);
    let router = Router::default();
    router.subscribe(&filter, sub(1, QoS::AtMostOnce));
    router.subscribe(&topic, sub(2, QoS::AtMostOnce));
    router.subscribe("#", sub(3, QoS::AtMostOnce));
    let mut routes = Vec::new();
    router.routes(&topic, SessionId(0), &mut routes);
    let mut sessions: Vec<u64> = routes.iter().map(|r| r.session.0).collect();
    sessions.sort_unstable();
    let mut want = vec![2, 3];
    if expected {
        want.insert(0, 1);
    }
    assert_eq!(
        sessions,
        want,
        "filter {} levels",
        filter.split('/').count()
    );
    assert!(router.unsubscribe(&filter, SessionId(1)));
    assert!(router.unsubscribe(&topic, SessionId(2)));
    assert_eq!(router.len(), 1, "the deep paths are pruned");
    drop(router);

    if topic.len() > ferrymq_codec::MAX_STRING_LEN {
        // Not a topic MQTT can carry (65,535 bytes at most); the retained
        // set only ever holds real ones.
        return;
    }
    let set = Retained::default();
    set.set(message(&topic, "v"), 0);
    set.set(message("x", "w"), 0);
    for (f, want) in [
        (filter.as_str(), expected),
        (topic.as_str(), true),
        ("#", true),
    ] {
        let mut out = Vec::new();
        set.matching(f, &mut out);
        let found = out.iter().any(|e| e.message.topic.as_str() == topic);
        assert_eq!(
            found,
            want,
            "retained match of a {}-level filter",
            f.split('/').count()
        );
    }
    // Cleared (pruned level by level) or dropped whole: both without recursion.
    if seed.is_multiple_of(2) {
        assert!(set.set(message(&topic, ""), 0));
        assert_eq!(set.len(), 1);
    }
    drop(set);
}

#[test]
fn a_retained_deep_topic_and_a_deep_wildcard_filter_walk_without_recursion() {
    // The crash of the issue: 14,600 levels overflowed 2 MiB; far deeper
    // here, on an eighth of that stack.
    on_small_stack(|| {
        // The deepest topic MQTT can carry: 65,535 separators, 65,536
        // empty levels.
        let deepest = "/".repeat(ferrymq_codec::MAX_STRING_LEN);
        let filter = format!("{}/#", vec!["+"; 65_535].join("/"));
        let set = Retained::default();
        set.set(message(&deepest, "v"), 0);
        let mut out = Vec::new();
        set.matching(&filter, &mut out);
        assert_eq!(out.len(), 1);
        out.clear();
        set.matching("#", &mut out);
        assert_eq!(out.len(), 1);
        drop(set);
        // The router takes filters of any length (a bridge rule or a
        // stored subscription is not bounded by one packet).
        let deep = vec!["a"; 100_000].join("/");
        let filter = format!("{}/#", vec!["+"; 99_999].join("/"));
        let router = Router::default();
        router.subscribe(&filter, sub(1, QoS::AtMostOnce));
        let mut routes = Vec::new();
        router.routes(&deep, SessionId(0), &mut routes);
        assert_eq!(routes.len(), 1);
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random deep topics and filters (up to 100,000 levels) through the
    /// router and the retained set, on a 256 KiB stack.
    #[test]
    fn deep_topics_and_filters_walk_on_a_small_stack(
        depth in prop_oneof![1usize..64, 1_000usize..100_000],
        seed in any::<u64>(),
        hash in any::<bool>(),
        differ in any::<bool>(),
    ) {
        on_small_stack(move || walk(depth, seed, hash, differ));
    }
}
