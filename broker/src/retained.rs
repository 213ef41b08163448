//! Retained messages: the last retained message of each topic, in a tree
//! of topic levels so that a subscription's filter finds its matches
//! without scanning every topic.

use std::collections::HashMap;
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
}

#[derive(Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    entry: Option<RetainedEntry>,
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
        let mut stack: Vec<Node> = self.children.drain().map(|(_, n)| n).collect();
        while let Some(mut node) = stack.pop() {
            stack.extend(node.children.drain().map(|(_, n)| n));
        }
    }
}

/// All retained messages. Written by retained publishes, read by subscribes.
#[derive(Default)]
pub struct Retained {
    /// The tree; write-locked per retained publish, read-locked per subscribe.
    tree: RwLock<Node>,
}

impl Retained {
    /// Sets (non-empty payload) or clears (empty payload) the retained
    /// message of the message's topic. Returns whether one existed before.
    pub fn set(&self, message: Arc<Message>, ticket: Ticket) -> bool {
        let mut tree = self.tree.write();
        if message.payload.is_empty() {
            return remove(&mut tree, &message.topic);
        }
        let mut node = &mut *tree;
        for level in message.topic.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        node.entry
            .replace(RetainedEntry { message, ticket })
            .is_some()
    }

    /// Removes the retained message of `topic` if it has expired at `now`;
    /// returns whether it did.
    pub fn remove_expired(&self, topic: &str, now: tokio::time::Instant) -> bool {
        let mut tree = self.tree.write();
        let mut node = &*tree;
        for level in topic.split('/') {
            match node.children.get(level) {
                Some(child) => node = child,
                None => return false,
            }
        }
        if !node
            .entry
            .as_ref()
            .is_some_and(|e| e.message.is_expired(now))
        {
            return false;
        }
        remove(&mut tree, topic)
    }

    /// Appends every retained message matching the (valid, non-shared)
    /// `filter` to `out`.
    pub fn matching(&self, filter: &str, out: &mut Vec<RetainedEntry>) {
        let tree = self.tree.read();
        let levels: Vec<&str> = filter.split('/').collect();
        collect(&tree, &levels, out);
    }

    /// Number of retained messages.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        let mut n = 0;
        for_each_below(&self.tree.read(), |e| {
            n += usize::from(e.is_some());
        });
        n
    }

    /// True when no message is retained.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Clears the entry of `topic` and prunes the nodes left empty.
fn remove(root: &mut Node, topic: &str) -> bool {
    let levels: Vec<&str> = topic.split('/').collect();
    let Some(node) = level_tree::descend_mut(root, &levels) else {
        return false;
    };
    if node.entry.take().is_none() {
        return false;
    }
    // Dropped without recursion (see `Drop for Node`).
    drop(level_tree::prune(root, &levels));
    true
}

/// Appends the retained messages matching a filter's `levels` below
/// `root`. The frontier is a heap stack, so a filter of any depth costs
/// heap, never call stack; the work is one step per tree node the filter
/// reaches. Wildcards at the first level skip topics starting with `$`
/// [MQTT-4.7.2-1].
fn collect(root: &Node, levels: &[&str], out: &mut Vec<RetainedEntry>) {
    let mut stack = vec![(root, 0usize)];
    while let Some((node, depth)) = stack.pop() {
        let Some(level) = levels.get(depth) else {
            out.extend(node.entry.iter().cloned());
            continue;
        };
        let at_root = depth == 0;
        let visible = |name: &str| !(at_root && name.starts_with('$'));
        match *level {
            "#" => {
                // `a/#` also matches `a` itself.
                if !at_root {
                    out.extend(node.entry.iter().cloned());
                }
                for (name, child) in &node.children {
                    if visible(name) {
                        for_each_below(child, |e| out.extend(e.iter().cloned()));
                    }
                }
            }
            "+" => stack.extend(
                node.children
                    .iter()
                    .filter(|(name, _)| visible(name))
                    .map(|(_, child)| (child, depth + 1)),
            ),
            literal => stack.extend(node.children.get(literal).map(|child| (child, depth + 1))),
        }
    }
}

/// Calls `f` with the entry slot of `node` and of every node below it,
/// depth first, with a heap stack.
fn for_each_below(node: &Node, mut f: impl FnMut(&Option<RetainedEntry>)) {
    let mut stack = vec![node];
    while let Some(node) = stack.pop() {
        f(&node.entry);
        stack.extend(node.children.values());
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
    fn set_replace_clear() {
        let r = Retained::default();
        assert!(!r.set(message("a/b", "1"), 0));
        assert!(r.set(message("a/b", "2"), 0));
        let mut out = Vec::new();
        r.matching("a/b", &mut out);
        assert_eq!(out[0].message.payload, "2");
        assert!(r.set(message("a/b", ""), 0));
        assert!(r.is_empty());
        assert!(r.tree.read().is_empty(), "cleared topics leave no nodes");
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
