//! The topic tree: which sessions a published topic reaches.
//!
//! Subscriptions live in a tree with one node per topic level; `+` and `#`
//! are children of their own kind. Matching walks the topic's levels once,
//! following the exact child, the `+` child and collecting `#` entries.
//!
//! The publish path does not take the tree's lock in the steady state:
//! each connection keeps a [`RouteCache`] of topic -> routes, valid while
//! the router's generation (bumped by every subscribe and unsubscribe) is
//! unchanged. Sensors publish to a handful of topics each, so almost every
//! publish is a cache hit that costs one atomic load.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ferrymq_codec::QoS;
use parking_lot::RwLock;

use crate::level_tree::{self, LevelNode};
use crate::message::SessionId;
use crate::outbox::{GroupQueue, Outbox};

/// One subscription of one session to one filter.
#[derive(Clone)]
pub struct Subscriber {
    /// The subscribing session.
    pub session: SessionId,
    /// Where its messages go.
    pub outbox: Arc<Outbox>,
    /// Granted QoS.
    pub qos: QoS,
    /// No Local: not to be sent its own messages.
    pub no_local: bool,
    /// Retain As Published: keep the RETAIN flag when forwarding.
    pub retain_as_published: bool,
    /// MQTT 5.0 Subscription Identifier.
    pub identifier: Option<u32>,
    /// Set when the subscriber is a shared subscription group.
    pub group: Option<Arc<dyn GroupQueue>>,
}

impl Subscriber {
    /// A session's own subscription (not a shared group's) with the
    /// client's `options` and `identifier`.
    pub(crate) fn of_session(
        session: SessionId,
        outbox: Arc<Outbox>,
        options: &ferrymq_codec::SubscriptionOptions,
        identifier: Option<u32>,
    ) -> Subscriber {
        Subscriber {
            session,
            outbox,
            qos: options.qos,
            no_local: options.no_local,
            retain_as_published: options.retain_as_published,
            identifier,
            group: None,
        }
    }
}

/// Where one message goes: one entry per session, overlapping
/// subscriptions already merged (highest QoS; No Local only if every
/// matching subscription has it; Retain As Published if any has it).
#[derive(Clone)]
pub struct Route {
    /// The session.
    pub session: SessionId,
    /// Its outbox.
    pub outbox: Arc<Outbox>,
    /// The highest granted QoS among its matching subscriptions.
    pub qos: QoS,
    /// Skip when the publisher is this session.
    pub no_local: bool,
    /// Keep the message's RETAIN flag.
    pub retain_as_published: bool,
    /// The Subscription Identifiers of every matching subscription.
    pub identifiers: Option<Arc<[u32]>>,
    /// Set when the route is a shared subscription group (its members are
    /// woken after a push).
    pub group: Option<Arc<dyn GroupQueue>>,
}

#[derive(Default)]
struct Node {
    /// Children by literal level.
    children: HashMap<Box<str>, Node>,
    /// The `+` child.
    plus: Option<Box<Node>>,
    /// Subscriptions whose filter ends here.
    here: Subscribers,
    /// Subscriptions whose filter is this node's path followed by `/#`.
    hash: Subscribers,
}

/// The subscriptions of one filter, one per session, in no particular
/// order (routes are sorted by session after collection).
#[derive(Default)]
struct Subscribers {
    list: Vec<Subscriber>,
    /// Where each session is in `list`, once the list is long: a filter
    /// every client subscribes to (a `broadcast` topic) would otherwise be
    /// scanned on every subscribe and unsubscribe, and N clients would cost
    /// N squared. (Boxed: two of these are in every node of the tree,
    /// and an empty map inline would be 48 bytes each.)
    #[allow(clippy::box_collection)]
    index: Option<Box<HashMap<SessionId, usize>>>,
}

/// The length from which a filter's subscriptions are indexed.
const INDEX_FROM: usize = 32;

impl Subscribers {
    fn position(&self, session: SessionId) -> Option<usize> {
        match &self.index {
            Some(index) => index.get(&session).copied(),
            None => self.list.iter().position(|s| s.session == session),
        }
    }

    /// Adds `sub`, or replaces its session's. Returns whether it replaced.
    fn upsert(&mut self, sub: Subscriber) -> bool {
        if let Some(at) = self.position(sub.session) {
            self.list[at] = sub;
            return true;
        }
        if let Some(index) = &mut self.index {
            index.insert(sub.session, self.list.len());
        } else if self.list.len() + 1 >= INDEX_FROM {
            let index = self
                .list
                .iter()
                .chain(std::iter::once(&sub))
                .enumerate()
                .map(|(at, s)| (s.session, at))
                .collect();
            self.index = Some(Box::new(index));
        }
        self.list.push(sub);
        false
    }

    /// Removes `session`'s subscription. Returns whether it was there.
    fn remove(&mut self, session: SessionId) -> bool {
        let Some(at) = self.position(session) else {
            return false;
        };
        self.list.swap_remove(at);
        if let Some(index) = &mut self.index {
            index.remove(&session);
            if let Some(moved) = self.list.get(at) {
                index.insert(moved.session, at);
            }
            if self.list.len() < INDEX_FROM / 2 {
                self.index = None;
            }
        }
        if self.list.capacity() > 2 * self.list.len() + 4 {
            self.list.shrink_to_fit();
        }
        true
    }
}

impl std::ops::Deref for Subscribers {
    type Target = [Subscriber];

    fn deref(&self) -> &[Subscriber] {
        &self.list
    }
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.here.is_empty()
            && self.hash.is_empty()
    }
}

impl LevelNode for Node {
    /// The child for one filter level (`+` or a literal).
    fn child(&self, level: &str) -> Option<&Node> {
        if level == "+" {
            self.plus.as_deref()
        } else {
            self.children.get(level)
        }
    }

    fn child_mut(&mut self, level: &str) -> Option<&mut Node> {
        if level == "+" {
            self.plus.as_deref_mut()
        } else {
            self.children.get_mut(level)
        }
    }

    fn only_path_to(&self, next: Option<&str>) -> bool {
        let no_subscribers = self.here.is_empty() && self.hash.is_empty();
        match next {
            None => self.is_empty(),
            Some("+") => no_subscribers && self.children.is_empty(),
            Some(_) => no_subscribers && self.plus.is_none() && self.children.len() == 1,
        }
    }

    fn remove_child(&mut self, level: &str) -> Option<Node> {
        if level == "+" {
            self.plus.take().map(|b| *b)
        } else {
            self.children.remove(level)
        }
    }
}

/// Dropping a tree as deep as a client's filter must not recurse once
/// per level: the default drop glue would, and a filter of a few
/// thousand levels would overflow the stack. Children are moved onto a
/// heap stack instead, so every node is dropped with no children left.
impl Drop for Node {
    fn drop(&mut self) {
        let mut stack: Vec<Node> = self.children.drain().map(|(_, n)| n).collect();
        stack.extend(self.plus.take().map(|b| *b));
        while let Some(mut node) = stack.pop() {
            stack.extend(node.children.drain().map(|(_, n)| n));
            stack.extend(node.plus.take().map(|b| *b));
        }
    }
}

/// The topic tree. Shared by all connections.
pub struct Router {
    /// The tree; written by (un)subscribes, read on cache misses.
    tree: RwLock<Node>,
    /// Bumped on every change, invalidating every [`RouteCache`].
    generation: AtomicU64,
}

impl Default for Router {
    fn default() -> Self {
        Router {
            tree: RwLock::new(Node::default()),
            generation: AtomicU64::new(0),
        }
    }
}

impl Router {
    /// Adds or replaces `sub`'s subscription to a valid, non-shared
    /// `filter`. Returns whether it replaced an existing one.
    pub fn subscribe(&self, filter: &str, sub: Subscriber) -> bool {
        let mut tree = self.tree.write();
        let mut node = &mut *tree;
        let mut levels = filter.split('/').peekable();
        let mut replaced = false;
        while let Some(level) = levels.next() {
            if level == "#" {
                replaced = node.hash.upsert(sub.clone());
                break;
            }
            node = if level == "+" {
                node.plus.get_or_insert_with(Box::default)
            } else {
                node.children.entry(level.into()).or_default()
            };
            if levels.peek().is_none() {
                replaced = node.here.upsert(sub.clone());
            }
        }
        self.generation.fetch_add(1, Ordering::Release);
        replaced
    }

    /// Removes a session's subscription to `filter`. Returns whether it existed.
    pub fn unsubscribe(&self, filter: &str, session: SessionId) -> bool {
        let mut tree = self.tree.write();
        let removed = remove_path(&mut tree, filter, session);
        if removed {
            self.generation.fetch_add(1, Ordering::Release);
        }
        removed
    }

    /// The current generation, for [`RouteCache`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Appends the routes for `topic`, published by session `origin`, to
    /// `out`, one per session. The publisher's own No Local subscriptions
    /// are left out before its overlapping subscriptions merge: a
    /// subscription No Local excludes does not match at all (MQTT 5
    /// 3.8.3.1), so it adds no identifier, QoS or Retain As Published.
    pub fn routes(&self, topic: &str, origin: SessionId, out: &mut Vec<Route>) {
        let start = out.len();
        {
            let tree = self.tree.read();
            // [MQTT-4.7.2-1]: a wildcard first level does not match `$` topics.
            let dollar = topic.starts_with('$');
            collect(&tree, topic, !dollar, origin, out);
        }
        merge_by_session(out, start);
    }

    /// Number of subscriptions in the tree.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        let tree = self.tree.read();
        let mut stack = vec![&*tree];
        let mut n = 0;
        while let Some(node) = stack.pop() {
            n += node.here.len() + node.hash.len();
            stack.extend(node.children.values());
            stack.extend(node.plus.as_deref());
        }
        n
    }

    /// True when nobody is subscribed.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn to_route(s: &Subscriber) -> Route {
    Route {
        session: s.session,
        outbox: s.outbox.clone(),
        qos: s.qos,
        no_local: s.no_local,
        retain_as_published: s.retain_as_published,
        identifiers: s.identifier.map(|id| Arc::from([id])),
        group: s.group.clone(),
    }
}

/// The level of `topic` that starts at byte `at`, and where the next one
/// starts; `None` past the last level. (`a/` has the levels `a` and ``.)
fn level_at(topic: &str, at: usize) -> Option<(&str, usize)> {
    let rest = topic.get(at..)?;
    let len = rest.find('/').unwrap_or(rest.len());
    Some((&rest[..len], at + len + 1))
}

/// A walk's frontier: (node, where its next level starts in the topic,
/// whether wildcards match there). It grows by at most one entry a level,
/// so the first [`Frontier::INLINE`] entries live inline and a topic of
/// that many levels matches without allocating; deeper ones spill to the
/// heap, never to the call stack.
struct Frontier<'t> {
    inline: [Option<(&'t Node, usize, bool)>; Frontier::INLINE],
    len: usize,
    spilled: Vec<(&'t Node, usize, bool)>,
}

impl<'t> Frontier<'t> {
    const INLINE: usize = 16;

    fn new() -> Frontier<'t> {
        Frontier {
            inline: [None; Frontier::INLINE],
            len: 0,
            spilled: Vec::new(),
        }
    }

    fn push(&mut self, entry: (&'t Node, usize, bool)) {
        if self.len < Frontier::INLINE {
            self.inline[self.len] = Some(entry);
            self.len += 1;
        } else {
            self.spilled.push(entry);
        }
    }

    fn pop(&mut self) -> Option<(&'t Node, usize, bool)> {
        if let Some(entry) = self.spilled.pop() {
            return Some(entry);
        }
        self.len = self.len.checked_sub(1)?;
        self.inline[self.len].take()
    }
}

/// Collects the subscriptions matching `topic`. The walk keeps its
/// frontier in a [`Frontier`], never in the call stack, so its depth is
/// bounded by nothing a client sends; the work is one step per tree node
/// the topic reaches, and nothing is allocated for the topic's levels
/// (each is found in place). `wildcards` is false at the root of a `$`
/// topic.
fn collect(root: &Node, topic: &str, wildcards: bool, origin: SessionId, out: &mut Vec<Route>) {
    let matching = |s: &&Subscriber| !(s.no_local && s.session == origin);
    let mut frontier = Frontier::new();
    frontier.push((root, 0, wildcards));
    while let Some((node, at, wildcards)) = frontier.pop() {
        if wildcards {
            // `a/#` matches `a` and everything below it.
            out.extend(node.hash.iter().filter(matching).map(to_route));
        }
        let Some((level, next)) = level_at(topic, at) else {
            out.extend(node.here.iter().filter(matching).map(to_route));
            continue;
        };
        if let Some(child) = node.children.get(level) {
            frontier.push((child, next, true));
        }
        if let (true, Some(plus)) = (wildcards, &node.plus) {
            frontier.push((plus, next, true));
        }
    }
}

/// Merges entries of the same session (overlapping subscriptions) in
/// `out[start..]`: one route per session with the highest QoS.
fn merge_by_session(out: &mut Vec<Route>, start: usize) {
    if out.len() - start < 2 {
        return;
    }
    out[start..].sort_unstable_by_key(|r| r.session);
    let mut write = start;
    for read in start + 1..out.len() {
        if out[read].session == out[write].session {
            let (qos, no_local, rap) = (
                out[read].qos,
                out[read].no_local,
                out[read].retain_as_published,
            );
            let more = out[read].identifiers.take();
            let kept = &mut out[write];
            kept.qos = kept.qos.max(qos);
            kept.no_local &= no_local;
            kept.retain_as_published |= rap;
            kept.identifiers = match (kept.identifiers.take(), more) {
                (Some(a), Some(b)) => {
                    let mut ids: Vec<u32> = a.iter().chain(b.iter()).copied().collect();
                    ids.sort_unstable();
                    ids.dedup();
                    Some(ids.into())
                }
                (a, b) => a.or(b),
            };
        } else {
            write += 1;
            out.swap(write, read);
        }
    }
    out.truncate(write + 1);
}

/// Removes `session`'s subscription to `filter`, then prunes the nodes
/// the filter leaves empty.
fn remove_path(root: &mut Node, filter: &str, session: SessionId) -> bool {
    let levels: Vec<&str> = filter.split('/').collect();
    let Some((&last, path)) = levels.split_last() else {
        return false;
    };
    // The node the subscription sits on: the filter's parent for `#`.
    let (path, last_is_hash) = if last == "#" {
        (path, true)
    } else {
        (&levels[..], false)
    };
    let Some(node) = level_tree::descend_mut(root, path) else {
        return false;
    };
    let list = if last_is_hash {
        &mut node.hash
    } else {
        &mut node.here
    };
    if !list.remove(session) {
        return false;
    }
    // Dropped without recursion (see `Drop for Node`).
    drop(level_tree::prune(root, path));
    true
}

/// A connection's memo of topic -> routes, valid for one router generation
/// and one publishing session.
pub struct RouteCache {
    generation: u64,
    /// The publisher the routes were made for (No Local depends on it).
    origin: SessionId,
    /// Routes per topic, and whether they were asked for again since the
    /// last sweep.
    entries: HashMap<Box<str>, (Arc<[Route]>, bool)>,
    scratch: Vec<Route>,
}

/// Entries kept per connection. When full, a sweep drops the entries not
/// asked for again since the last sweep (second chance), or half of them
/// when every one was: a publisher's steady topics stay cached, one
/// cycling through more topics than this pays a tree walk for most.
const ROUTE_CACHE_ENTRIES: usize = 256;

impl Default for RouteCache {
    fn default() -> Self {
        RouteCache {
            generation: u64::MAX,
            origin: SessionId(u64::MAX),
            entries: HashMap::new(),
            scratch: Vec::new(),
        }
    }
}

impl RouteCache {
    /// The routes for `topic` published by `origin`, from the cache or the
    /// tree.
    pub fn routes(&mut self, router: &Router, topic: &str, origin: SessionId) -> Arc<[Route]> {
        let generation = router.generation();
        if generation != self.generation || origin != self.origin {
            self.entries.clear();
            self.generation = generation;
            self.origin = origin;
        } else if let Some((routes, used)) = self.entries.get_mut(topic) {
            *used = true;
            return routes.clone();
        }
        self.scratch.clear();
        router.routes(topic, origin, &mut self.scratch);
        let routes: Arc<[Route]> = self.scratch.drain(..).collect();
        if self.entries.len() >= ROUTE_CACHE_ENTRIES {
            self.sweep();
        }
        self.entries.insert(topic.into(), (routes.clone(), false));
        routes
    }

    /// Makes room: drops what was not asked for since the last sweep, or
    /// every other entry when all were.
    fn sweep(&mut self) {
        self.entries.retain(|_, (_, used)| std::mem::take(used));
        if self.entries.len() >= ROUTE_CACHE_ENTRIES {
            let mut keep = false;
            self.entries.retain(|_, _| {
                keep = !keep;
                keep
            });
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::outbox::QueueLimits;
    use ferrymq_codec::topic::matches;
    use ferrymq_config::QueueFull;
    use proptest::prelude::*;

    /// A subscriber with a tiny outbox (also for `deep_tests`).
    pub(crate) fn sub(session: u64, qos: QoS) -> Subscriber {
        Subscriber {
            session: SessionId(session),
            outbox: Outbox::new(
                session,
                QueueLimits {
                    max_messages: 1,
                    max_bytes: 1,
                    policy: QueueFull::DropOldest,
                    queue_qos0: false,
                },
                1,
            ),
            qos,
            no_local: false,
            retain_as_published: false,
            identifier: None,
            group: None,
        }
    }

    #[test]
    fn a_filter_every_client_subscribes_to_is_indexed_not_scanned() {
        // Regression: each subscribe and unsubscribe scanned the filter's
        // whole list, so 100,000 clients subscribing to one `broadcast`
        // topic cost 100,000 squared comparisons. Past `INDEX_FROM` the
        // list is indexed by session; the index must stay right through
        // replacements and removals in any order (checked against a map).
        let router = Router::default();
        let mut model = std::collections::BTreeMap::new();
        let mut x = 7u64;
        for step in 0..4_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let session = (x >> 16) % 300;
            let qos = if step.is_multiple_of(2) {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            };
            if x.is_multiple_of(3) {
                assert_eq!(
                    router.unsubscribe("broadcast", SessionId(session)),
                    model.remove(&session).is_some(),
                    "step {step}"
                );
            } else {
                assert_eq!(
                    router.subscribe("broadcast", sub(session, qos)),
                    model.insert(session, qos).is_some(),
                    "step {step}"
                );
            }
            if step.is_multiple_of(97) {
                let want: Vec<(u64, QoS)> = model.iter().map(|(s, q)| (*s, *q)).collect();
                assert_eq!(sessions(&router, "broadcast"), want, "step {step}");
            }
        }
        let tree = router.tree.read();
        let node = tree.children.get("broadcast").expect("node");
        assert_eq!(node.here.index.is_some(), model.len() >= INDEX_FROM / 2);
        assert!(model.len() >= INDEX_FROM, "the index was exercised");
    }

    fn sessions(router: &Router, topic: &str) -> Vec<(u64, QoS)> {
        let mut out = Vec::new();
        router.routes(topic, SessionId(u64::MAX), &mut out);
        let mut v: Vec<_> = out.iter().map(|r| (r.session.0, r.qos)).collect();
        v.sort();
        v
    }

    #[test]
    fn wildcards_and_dollar_topics() {
        let router = Router::default();
        router.subscribe("a/b", sub(1, QoS::AtMostOnce));
        router.subscribe("a/+", sub(2, QoS::AtMostOnce));
        router.subscribe("#", sub(3, QoS::AtMostOnce));
        router.subscribe("a/#", sub(4, QoS::AtMostOnce));
        router.subscribe("$SYS/#", sub(5, QoS::AtMostOnce));
        router.subscribe("+/x", sub(6, QoS::AtMostOnce));
        let q0 = QoS::AtMostOnce;
        assert_eq!(
            sessions(&router, "a/b"),
            [(1, q0), (2, q0), (3, q0), (4, q0)]
        );
        assert_eq!(sessions(&router, "a"), [(3, q0), (4, q0)]);
        assert_eq!(sessions(&router, "$SYS/x"), [(5, q0)]);
        assert_eq!(sessions(&router, "b/x"), [(3, q0), (6, q0)]);
    }

    #[test]
    fn overlapping_subscriptions_merge_to_the_highest_qos() {
        let router = Router::default();
        router.subscribe("a/+", sub(1, QoS::AtMostOnce));
        router.subscribe("a/b", sub(1, QoS::ExactlyOnce));
        router.subscribe("#", sub(1, QoS::AtLeastOnce));
        assert_eq!(sessions(&router, "a/b"), [(1, QoS::ExactlyOnce)]);
    }

    /// Regression: a No Local subscription added its Subscription
    /// Identifier (and could raise the QoS) to the publisher's own message
    /// that reached it through another, overlapping subscription.
    #[test]
    fn a_no_local_subscription_adds_nothing_to_the_publishers_own_message() {
        let router = Router::default();
        let own = |id, qos, no_local| Subscriber {
            qos,
            no_local,
            identifier: Some(id),
            ..sub(1, qos)
        };
        router.subscribe("a/+", own(1, QoS::ExactlyOnce, true));
        router.subscribe("a/b", own(2, QoS::AtMostOnce, false));
        let mut out = Vec::new();
        router.routes("a/b", SessionId(1), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].qos, QoS::AtMostOnce);
        assert_eq!(out[0].identifiers.as_deref(), Some(&[2][..]));
        assert!(!out[0].no_local);
        // From anyone else, both match and merge.
        out.clear();
        router.routes("a/b", SessionId(7), &mut out);
        assert_eq!(out[0].qos, QoS::ExactlyOnce);
        assert_eq!(out[0].identifiers.as_deref(), Some(&[1, 2][..]));
        // Only No Local subscriptions: the publisher is not reached at all.
        out.clear();
        router.routes("a/c", SessionId(1), &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn resubscribe_replaces_and_unsubscribe_prunes() {
        let router = Router::default();
        assert!(!router.subscribe("a/+/c", sub(1, QoS::AtMostOnce)));
        assert!(router.subscribe("a/+/c", sub(1, QoS::AtLeastOnce)));
        assert_eq!(router.len(), 1);
        assert_eq!(sessions(&router, "a/b/c"), [(1, QoS::AtLeastOnce)]);
        assert!(!router.unsubscribe("a/+/c", SessionId(2)));
        assert!(router.unsubscribe("a/+/c", SessionId(1)));
        assert!(!router.unsubscribe("a/+/c", SessionId(1)));
        assert!(router.is_empty());
        assert!(router.tree.read().is_empty(), "empty nodes are pruned");
    }

    #[test]
    fn route_cache_follows_the_generation() {
        let router = Router::default();
        let mut cache = RouteCache::default();
        assert_eq!(cache.routes(&router, "a", SessionId(9)).len(), 0);
        router.subscribe("a", sub(1, QoS::AtMostOnce));
        assert_eq!(cache.routes(&router, "a", SessionId(9)).len(), 1);
        router.unsubscribe("a", SessionId(1));
        assert_eq!(cache.routes(&router, "a", SessionId(9)).len(), 0);
    }

    #[test]
    fn topics_around_the_inline_frontier_match_like_the_reference() {
        // Up to 20 levels: the walk's frontier spills past 16.
        let router = Router::default();
        let mut filters = Vec::new();
        for n in 1..=20usize {
            let exact = vec!["x"; n].join("/");
            let pluses = vec!["+"; n].join("/");
            let mut hash = vec!["x"; n - 1];
            hash.push("#");
            filters.extend([exact, pluses, hash.join("/")]);
        }
        for (i, f) in filters.iter().enumerate() {
            router.subscribe(f, sub(i as u64, QoS::AtMostOnce));
        }
        for n in 1..=20usize {
            let topic = vec!["x"; n].join("/");
            let want: Vec<(u64, QoS)> = filters
                .iter()
                .enumerate()
                .filter(|(_, f)| matches(f, &topic))
                .map(|(i, _)| (i as u64, QoS::AtMostOnce))
                .collect();
            assert_eq!(sessions(&router, &topic), want, "{n} levels");
        }
    }

    #[test]
    fn a_full_route_cache_keeps_the_topics_asked_for_again() {
        let router = Router::default();
        router.subscribe("#", sub(1, QoS::AtMostOnce));
        let mut cache = RouteCache::default();
        let origin = SessionId(9);
        cache.routes(&router, "hot", origin);
        for i in 0..2 * ROUTE_CACHE_ENTRIES {
            cache.routes(&router, &format!("cold/{i}"), origin);
            cache.routes(&router, "hot", origin);
        }
        assert!(cache.entries.contains_key("hot"));
        assert!(cache.entries.len() <= ROUTE_CACHE_ENTRIES);
        // Every entry asked for again: a sweep keeps half of them.
        let mut cache = RouteCache::default();
        for round in 0..2 {
            for i in 0..ROUTE_CACHE_ENTRIES {
                cache.routes(&router, &format!("steady/{i}"), origin);
            }
            assert_eq!(cache.entries.len(), ROUTE_CACHE_ENTRIES, "round {round}");
        }
        cache.routes(&router, "new", origin);
        assert_eq!(cache.entries.len(), ROUTE_CACHE_ENTRIES / 2 + 1);
    }

    fn filter() -> impl Strategy<Value = String> {
        let level = prop_oneof!["[ab$]{0,1}", Just("+".to_string())];
        (proptest::collection::vec(level, 1..4), any::<bool>()).prop_map(|(levels, hash)| {
            let mut f = levels.join("/");
            if hash {
                f = if f.is_empty() {
                    "#".into()
                } else {
                    format!("{f}/#")
                };
            }
            f
        })
    }

    proptest! {
        /// The tree agrees with the reference matcher for any set of filters.
        #[test]
        fn tree_matches_like_the_reference(
            filters in proptest::collection::vec(filter(), 1..12),
            topics in proptest::collection::vec("[ab$]{0,1}(/[ab$]{0,1}){0,3}", 1..12),
        ) {
            let router = Router::default();
            for (i, f) in filters.iter().enumerate() {
                router.subscribe(f, sub(i as u64, QoS::AtMostOnce));
            }
            for topic in &topics {
                let expected: Vec<(u64, QoS)> = filters
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| matches(f, topic))
                    .map(|(i, _)| (i as u64, QoS::AtMostOnce))
                    .collect();
                prop_assert_eq!(sessions(&router, topic), expected, "topic {:?}", topic);
            }
            for (i, f) in filters.iter().enumerate() {
                prop_assert!(router.unsubscribe(f, SessionId(i as u64)));
            }
            prop_assert!(router.tree.read().is_empty());
        }
    }
}
