//! Retained messages: the last retained message of each topic, in a tree
//! of topic levels so that a subscription's filter finds its matches
//! without scanning every topic.
//!
//! The children of a node are kept in order ([`Children`]), so the matches of
//! a filter come out in one deterministic order (topic levels compared
//! byte-wise, a topic before the topics below it) and a walk can stop
//! after a page and resume after the last topic it returned
//! ([`RetainedCursor`]): a new subscription is sent its retained messages
//! a page at a time, as fast as its client takes them, without a copy of
//! the matching set.

use std::collections::BTreeMap;
use std::collections::btree_map;
use std::ops::Bound;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::level_tree::{self, LevelNode};
use crate::message::Message;
use crate::storage::Ticket;

/// A retained message and the store ticket that made it durable.
#[derive(Clone)]
pub struct RetainedEntry {
    /// The message.
    pub message: Arc<Message>,
    /// Deliveries of it wait for this ticket.
    pub ticket: Ticket,
    /// When it was set, in the set's own sequence: a cursor skips entries
    /// set after it was made (those reach a subscriber as live messages).
    pub version: u64,
}

#[derive(Default)]
struct Node {
    children: Children,
    entry: Option<RetainedEntry>,
}

/// Children at most this many are a sorted vector; more, a B-tree.
const FEW: usize = 16;

/// The children of a node, in order of their names. Most nodes of a
/// retained tree have one child or none (`sensors/42/temp`: one per
/// level below the wide one), so a few children are a sorted vector
/// sized exactly (a one-child node costs its child, 80 bytes); a B-tree
/// (whose smallest node holds 11 slots, about 900 bytes) only serves
/// wide nodes, where a vector's inserts would be linear.
enum Children {
    Few(Vec<(Box<str>, Node)>),
    Many(BTreeMap<Box<str>, Node>),
}

impl Default for Children {
    fn default() -> Self {
        Children::Few(Vec::new())
    }
}

/// Children in order, from [`Children::range`].
enum ChildIter<'t> {
    Few(std::slice::Iter<'t, (Box<str>, Node)>),
    Many(btree_map::Range<'t, Box<str>, Node>),
}

impl<'t> Iterator for ChildIter<'t> {
    type Item = (&'t str, &'t Node);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            ChildIter::Few(it) => it.next().map(|(k, v)| (&**k, v)),
            ChildIter::Many(it) => it.next().map(|(k, v)| (&**k, v)),
        }
    }
}

impl Children {
    fn len(&self) -> usize {
        match self {
            Children::Few(v) => v.len(),
            Children::Many(m) => m.len(),
        }
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn get(&self, name: &str) -> Option<&Node> {
        match self {
            Children::Few(v) => v
                .binary_search_by(|(k, _)| (**k).cmp(name))
                .ok()
                .map(|i| &v[i].1),
            Children::Many(m) => m.get(name),
        }
    }

    fn get_mut(&mut self, name: &str) -> Option<&mut Node> {
        match self {
            Children::Few(v) => v
                .binary_search_by(|(k, _)| (**k).cmp(name))
                .ok()
                .map(|i| &mut v[i].1),
            Children::Many(m) => m.get_mut(name),
        }
    }

    /// The child `name`, made empty if missing.
    fn get_or_insert(&mut self, name: &str) -> &mut Node {
        if let Children::Few(v) = self
            && v.len() >= FEW
            && v.binary_search_by(|(k, _)| (**k).cmp(name)).is_err()
        {
            *self = Children::Many(std::mem::take(v).into_iter().collect());
        }
        match self {
            Children::Few(v) => {
                let i = match v.binary_search_by(|(k, _)| (**k).cmp(name)) {
                    Ok(i) => i,
                    Err(i) => {
                        // Exactly sized: a vector would double.
                        v.reserve_exact(1);
                        v.insert(i, (name.into(), Node::default()));
                        i
                    }
                };
                &mut v[i].1
            }
            Children::Many(m) => m.entry(name.into()).or_default(),
        }
    }

    fn remove(&mut self, name: &str) -> Option<Node> {
        match self {
            Children::Few(v) => {
                let i = v.binary_search_by(|(k, _)| (**k).cmp(name)).ok()?;
                let (_, node) = v.remove(i);
                v.shrink_to_fit();
                Some(node)
            }
            Children::Many(m) => m.remove(name),
        }
    }

    /// Every child, moved out (for an iterative drop).
    fn take_all(&mut self) -> Vec<Node> {
        match std::mem::take(self) {
            Children::Few(v) => v.into_iter().map(|(_, n)| n).collect(),
            Children::Many(m) => m.into_values().collect(),
        }
    }

    #[cfg(test)]
    fn values(&self) -> ChildIter<'_> {
        self.range(Bound::Unbounded, Bound::Unbounded)
    }

    /// The children whose names are within the bounds, in order.
    fn range<'t>(&'t self, from: Bound<&str>, to: Bound<&str>) -> ChildIter<'t> {
        match self {
            Children::Few(v) => {
                let start = match from {
                    Bound::Included(f) => v.partition_point(|(k, _)| &**k < f),
                    Bound::Excluded(f) => v.partition_point(|(k, _)| &**k <= f),
                    Bound::Unbounded => 0,
                };
                let end = match to {
                    Bound::Included(t) => v.partition_point(|(k, _)| &**k <= t),
                    Bound::Excluded(t) => v.partition_point(|(k, _)| &**k < t),
                    Bound::Unbounded => v.len(),
                };
                ChildIter::Few(v[start..end.max(start)].iter())
            }
            Children::Many(m) => ChildIter::Many(m.range::<str, _>((from, to))),
        }
    }
}

impl Node {
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.entry.is_none()
    }
}

impl LevelNode for Node {
    fn child(&self, level: &str) -> Option<&Node> {
        self.children.get(level)
    }

    fn child_mut(&mut self, level: &str) -> Option<&mut Node> {
        self.children.get_mut(level)
    }

    fn only_path_to(&self, next: Option<&str>) -> bool {
        self.entry.is_none() && self.children.len() == usize::from(next.is_some())
    }

    fn remove_child(&mut self, level: &str) -> Option<Node> {
        self.children.remove(level)
    }
}

/// A retained topic can be as deep as a client's publish: dropping the
/// tree must not recurse once per level (see the router's `Node`).
impl Drop for Node {
    fn drop(&mut self) {
        let mut stack: Vec<Node> = self.children.take_all();
        while let Some(mut node) = stack.pop() {
            stack.extend(node.children.take_all());
        }
    }
}

/// The tree and the sequence that versions its entries.
#[derive(Default)]
struct Tree {
    root: Node,
    /// The version of the last entry set.
    version: u64,
}

/// All retained messages. Written by retained publishes, read by subscribes.
#[derive(Default)]
pub struct Retained {
    /// The tree; write-locked per retained publish, read-locked per page
    /// of a subscription's retained messages.
    tree: RwLock<Tree>,
    /// How many topics hold an entry (changed under the tree's lock).
    count: std::sync::atomic::AtomicUsize,
}

/// Where a walk over the retained messages matching one filter stands.
/// Made by [`Retained::cursor`], advanced by [`Retained::next_page`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedCursor {
    /// The (valid, non-shared) filter.
    filter: Box<str>,
    /// The topic of the last entry returned: the walk resumes after it.
    after: Option<Box<str>>,
    /// Entries of a higher version were set after the cursor was made.
    up_to_version: u64,
    /// Every match has been returned.
    done: bool,
}

impl RetainedCursor {
    /// Whether every match has been returned.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The filter it walks.
    pub fn filter(&self) -> &str {
        &self.filter
    }
}

impl Retained {
    /// Sets (non-empty payload) or clears (empty payload) the retained
    /// message of the message's topic. Returns whether one existed before.
    pub fn set(&self, message: Arc<Message>, ticket: Ticket) -> bool {
        if message.payload.is_empty() {
            return self.remove(&mut self.tree.write().root, &message.topic);
        }
        self.put(message, ticket).is_some()
    }

    /// How many topics hold an entry (a state tombstone included).
    pub fn count(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Removes the entry of `topic` from the tree under `root` (its write
    /// lock held) and prunes the nodes left empty; returns whether there
    /// was one (then counted out).
    fn remove(&self, root: &mut Node, topic: &str) -> bool {
        let levels: Vec<&str> = topic.split('/').collect();
        let Some(node) = level_tree::descend_mut(root, &levels) else {
            return false;
        };
        if node.entry.take().is_none() {
            return false;
        }
        self.count
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        // Dropped without recursion (see `Drop for Node`).
        drop(level_tree::prune(root, &levels));
        true
    }

    /// Holds `message` as its topic's entry, even with an empty payload (a
    /// state tombstone, `state.rs`: held, never delivered). Returns the
    /// entry's message before.
    pub fn put(&self, message: Arc<Message>, ticket: Ticket) -> Option<Arc<Message>> {
        let mut tree = self.tree.write();
        tree.version += 1;
        let version = tree.version;
        let mut node = &mut tree.root;
        for level in message.topic.split('/') {
            node = node.children.get_or_insert(level);
        }
        let before = node
            .entry
            .replace(RetainedEntry {
                message,
                ticket,
                version,
            })
            .map(|e| e.message);
        if before.is_none() {
            self.count
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        before
    }

    /// The message held for `topic` (a state tombstone included).
    pub fn get(&self, topic: &str) -> Option<Arc<Message>> {
        held(&self.tree.read().root, topic).cloned()
    }

    /// Removes the entry of `topic` if `pred` holds for its message;
    /// returns whether it did.
    pub fn remove_where(&self, topic: &str, pred: impl FnOnce(&Message) -> bool) -> bool {
        let mut tree = self.tree.write();
        if !held(&tree.root, topic).is_some_and(|m| pred(m)) {
            return false;
        }
        self.remove(&mut tree.root, topic)
    }

    /// Removes the retained message of `topic` if it has expired at `now`;
    /// returns whether it did.
    pub fn remove_expired(&self, topic: &str, now: tokio::time::Instant) -> bool {
        self.remove_where(topic, |m| m.is_expired(now))
    }

    /// A cursor over the retained messages matching the (valid,
    /// non-shared) `filter` now: messages set later are not returned by
    /// it.
    pub fn cursor(&self, filter: &str) -> RetainedCursor {
        RetainedCursor {
            filter: filter.into(),
            after: None,
            up_to_version: self.tree.read().version,
            done: false,
        }
    }

    /// Appends up to `max` of the cursor's next matches to `out`, in topic
    /// order, and moves the cursor past them. Matches cleared or replaced
    /// since the cursor was made are not returned.
    pub fn next_page(&self, cursor: &mut RetainedCursor, max: usize, out: &mut Vec<RetainedEntry>) {
        if cursor.done {
            return;
        }
        let tree = self.tree.read();
        let filter: Vec<&str> = cursor.filter.split('/').collect();
        let after: Option<Vec<&str>> = cursor.after.as_deref().map(|t| t.split('/').collect());
        let walk = Walk {
            filter: &filter,
            after: after.as_deref().unwrap_or_default(),
            up_to_version: cursor.up_to_version,
        };
        let start = out.len();
        let last = walk.run(&tree.root, after.is_some(), max, out);
        match last {
            Some(topic) if out.len() - start >= max => cursor.after = Some(topic.into()),
            _ => cursor.done = true,
        }
    }

    /// Appends every retained message matching the (valid, non-shared)
    /// `filter` to `out`, in topic order.
    #[cfg(test)]
    pub fn matching(&self, filter: &str, out: &mut Vec<RetainedEntry>) {
        let mut cursor = self.cursor(filter);
        self.next_page(&mut cursor, usize::MAX, out);
    }

    /// Number of retained messages.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        let tree = self.tree.read();
        let mut stack = vec![&tree.root];
        let mut n = 0;
        while let Some(node) = stack.pop() {
            n += usize::from(node.entry.is_some());
            stack.extend(node.children.values().map(|(_, n)| n));
        }
        n
    }

    /// True when no message is retained.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.tree.read().root.is_empty()
    }
}

/// The message held for `topic`.
fn held<'t>(root: &'t Node, topic: &str) -> Option<&'t Arc<Message>> {
    let mut node = root;
    for level in topic.split('/') {
        node = node.children.get(level)?;
    }
    node.entry.as_ref().map(|e| &e.message)
}

/// Clears the entry of `topic` and prunes the nodes left empty.
/// One page of a walk: a filter's levels, the levels of the topic the
/// walk resumes after (empty: from the start), and the newest version
/// to return.
struct Walk<'f> {
    filter: &'f [&'f str],
    after: &'f [&'f str],
    up_to_version: u64,
}

/// What a frame of the walk matches below its node.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The filter's remaining levels.
    Filter,
    /// Everything (below a `#`).
    Everything,
}

/// A node being walked, with the children still to visit.
struct Frame<'t> {
    node: &'t Node,
    depth: usize,
    /// The node lies on the resumed topic's path (it and its ancestors
    /// equal that topic's first levels): it comes before the resume point.
    on_path: bool,
    mode: Mode,
    /// `None` until the node itself has been looked at.
    children: Option<ChildIter<'t>>,
}

impl<'f> Walk<'f> {
    /// Walks depth first, a node's entry before its children, children in
    /// order, from after the resume point, appending up to `max` matches.
    /// A heap stack, not recursion: a topic may have 65,536 levels. The
    /// work is the path down to the resume point plus one step per node
    /// visited. Returns the topic of the last entry appended.
    fn run<'t>(
        &self,
        root: &'t Node,
        resuming: bool,
        max: usize,
        out: &mut Vec<RetainedEntry>,
    ) -> Option<&'t str> {
        let mut stack = vec![Frame {
            node: root,
            depth: 0,
            on_path: resuming,
            mode: Mode::Filter,
            children: None,
        }];
        let mut taken = 0;
        let mut last = None;
        while let Some(frame) = stack.last_mut() {
            if frame.children.is_none() {
                if let Some(entry) = self.emits(frame) {
                    out.push(entry.clone());
                    last = Some(entry.message.topic.as_str());
                    taken += 1;
                    if taken >= max {
                        return last;
                    }
                }
                frame.children = Some(self.children(frame));
            }
            let (depth, on_path, mode) = (frame.depth, frame.on_path, frame.mode);
            let next = frame.children.as_mut().and_then(Iterator::next);
            let Some((name, child)) = next else {
                stack.pop();
                continue;
            };
            let level = self.filter.get(depth).copied();
            // [MQTT-4.7.2-1]: a wildcard first level does not match `$` topics.
            if depth == 0 && matches!(level, Some("+" | "#")) && name.starts_with('$') {
                continue;
            }
            stack.push(Frame {
                node: child,
                depth: depth + 1,
                on_path: on_path && self.after.get(depth) == Some(&name),
                mode: if level == Some("#") {
                    Mode::Everything
                } else {
                    mode
                },
                children: None,
            });
        }
        last
    }

    /// The frame's own entry, if it matches and comes after the resume
    /// point.
    fn emits<'t>(&self, frame: &Frame<'t>) -> Option<&'t RetainedEntry> {
        let matches = match frame.mode {
            Mode::Everything => true,
            // `a/#` matches `a` itself (the root holds no entry).
            Mode::Filter => {
                frame.depth == self.filter.len() || self.filter.get(frame.depth) == Some(&"#")
            }
        };
        let entry = frame.node.entry.as_ref()?;
        // A state tombstone (empty payload) is held, never delivered.
        (matches
            && !frame.on_path
            && entry.version <= self.up_to_version
            && !entry.message.payload.is_empty())
        .then_some(entry)
    }

    /// The children of the frame's node the walk visits: those its filter
    /// level allows, from the resume point's level on (when on its path).
    fn children<'t>(&self, frame: &Frame<'t>) -> ChildIter<'t> {
        let children = &frame.node.children;
        let from = match self.after.get(frame.depth) {
            Some(level) if frame.on_path => Bound::Included(*level),
            _ => Bound::Unbounded,
        };
        let level = match frame.mode {
            Mode::Everything => None,
            Mode::Filter => match self.filter.get(frame.depth) {
                // The filter ends here: nothing below matches.
                None => return children.range(Bound::Excluded(""), Bound::Included("")),
                Some(&("+" | "#")) => None,
                Some(literal) => Some(*literal),
            },
        };
        match (level, from) {
            (None, from) => children.range(from, Bound::Unbounded),
            (Some(literal), Bound::Included(resume)) if literal < resume => {
                children.range(Bound::Excluded(""), Bound::Included(""))
            }
            (Some(literal), _) => {
                children.range(Bound::Included(literal), Bound::Included(literal))
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::message::SessionId;
    use bytes::Bytes;
    use ferrymq_codec::topic::matches;
    use ferrymq_codec::{MqttString, PublishProperties, QoS};
    use proptest::prelude::*;

    /// A retained message (also for `deep_tests`).
    pub(crate) fn message(topic: &str, payload: &'static str) -> Arc<Message> {
        Arc::new(Message {
            topic: MqttString::new(topic).expect("topic"),
            payload: Bytes::from_static(payload.as_bytes()),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: PublishProperties::default(),
            origin: SessionId(0),
            expires_at: None,
            holders: Default::default(),
        })
    }

    fn topics(retained: &Retained, filter: &str) -> Vec<String> {
        let mut out = Vec::new();
        retained.matching(filter, &mut out);
        let mut t: Vec<String> = out.iter().map(|e| e.message.topic.to_string()).collect();
        t.sort();
        t
    }

    #[test]
    fn the_count_follows_sets_clears_and_removals() {
        let r = Retained::default();
        r.set(message("a", "1"), 0);
        r.set(message("a/b", "1"), 0);
        r.set(message("a", "2"), 0);
        assert_eq!(r.count(), 2, "a replaced value is one topic");
        r.set(message("a", ""), 0);
        r.set(message("zz", ""), 0);
        assert_eq!(r.count(), 1, "a clear counts only what existed");
        assert!(r.remove_where("a/b", |_| true));
        assert_eq!(r.count(), 0);
    }

    #[test]
    fn children_stay_ordered_as_a_vector_and_as_a_b_tree() {
        for count in [3, super::FEW, super::FEW + 1, 40] {
            let mut children = Children::default();
            // Inserted out of order; every other name twice.
            let names: Vec<String> = (0..count)
                .map(|i| format!("n{:02}", (i * 7) % count))
                .collect();
            for name in names.iter().chain(names.iter().step_by(2)) {
                children.get_or_insert(name);
            }
            assert_eq!(children.len(), count);
            assert_eq!(matches!(children, Children::Many(_)), count > super::FEW);
            let all: Vec<&str> = children.values().map(|(k, _)| k).collect();
            let mut sorted = all.clone();
            sorted.sort_unstable();
            assert_eq!(all, sorted);
            let from_two: Vec<&str> = children
                .range(Bound::Included("n02"), Bound::Unbounded)
                .map(|(k, _)| k)
                .collect();
            assert_eq!(from_two.len(), count - 2);
            let one: Vec<&str> = children
                .range(Bound::Included("n01"), Bound::Included("n01"))
                .map(|(k, _)| k)
                .collect();
            assert_eq!(one, ["n01"]);
            assert!(children.get("n00").is_some() && children.get("x").is_none());
            assert!(children.remove("n00").is_some() && children.get("n00").is_none());
            assert_eq!(children.len(), count - 1);
        }
    }

    #[test]
    fn set_replace_clear() {
        let r = Retained::default();
        assert!(!r.set(message("a/b", "1"), 0));
        assert!(r.set(message("a/b", "2"), 0));
        let mut out = Vec::new();
        r.matching("a/b", &mut out);
        assert_eq!(out[0].message.payload, "2");
        assert!(r.set(message("a/b", ""), 0));
        assert!(r.is_empty());
        assert!(
            r.tree.read().root.is_empty(),
            "cleared topics leave no nodes"
        );
    }

    #[test]
    fn wildcards_and_dollar_topics() {
        let r = Retained::default();
        for t in ["a", "a/b", "a/b/c", "$SYS/x", "b/x", "/x"] {
            r.set(message(t, "v"), 0);
        }
        assert_eq!(topics(&r, "a/#"), ["a", "a/b", "a/b/c"]);
        assert_eq!(topics(&r, "#"), ["/x", "a", "a/b", "a/b/c", "b/x"]);
        assert_eq!(topics(&r, "+/x"), ["/x", "b/x"]);
        assert_eq!(topics(&r, "$SYS/#"), ["$SYS/x"]);
        assert_eq!(topics(&r, "+/+"), ["/x", "a/b", "b/x"]);
    }

    proptest! {
        #[test]
        fn agrees_with_the_reference_matcher(
            set in proptest::collection::vec("[ab$]{0,1}(/[ab]{0,1}){0,3}", 1..12),
            filter in "([ab$+]{0,1}|#)(/([ab+]{0,1})){0,3}(/#)?",
        ) {
            prop_assume!(ferrymq_codec::topic::validate_topic_filter(&filter).is_ok());
            let r = Retained::default();
            for t in &set {
                r.set(message(t, "v"), 0);
            }
            let mut expected: Vec<String> = set.iter().filter(|t| matches(&filter, t)).cloned().collect();
            expected.sort();
            expected.dedup();
            prop_assert_eq!(topics(&r, &filter), expected);
        }
    }
}
