//! Retained messages: the last retained message of each topic, in a tree
//! of topic levels so that a subscription's filter finds its matches
//! without scanning every topic.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;

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
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.entry.is_none()
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
            let levels: Vec<&str> = message.topic.split('/').collect();
            return remove(&mut tree, &levels);
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
        let levels: Vec<&str> = topic.split('/').collect();
        remove(&mut tree, &levels)
    }

    /// Appends every retained message matching the (valid, non-shared)
    /// `filter` to `out`.
    pub fn matching(&self, filter: &str, out: &mut Vec<RetainedEntry>) {
        let tree = self.tree.read();
        let levels: Vec<&str> = filter.split('/').collect();
        collect(&tree, &levels, true, out);
    }

    /// Number of retained messages.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        fn count(n: &Node) -> usize {
            usize::from(n.entry.is_some()) + n.children.values().map(count).sum::<usize>()
        }
        count(&self.tree.read())
    }

    /// True when no message is retained.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn remove(node: &mut Node, levels: &[&str]) -> bool {
    let Some((first, rest)) = levels.split_first() else {
        return node.entry.take().is_some();
    };
    let Some(child) = node.children.get_mut(*first) else {
        return false;
    };
    let removed = remove(child, rest);
    if child.is_empty() {
        node.children.remove(*first);
    }
    removed
}

/// Walks `levels` of a filter from `node`. `root` marks the first level,
/// where wildcards do not match topics starting with `$` [MQTT-4.7.2-1].
fn collect(node: &Node, levels: &[&str], root: bool, out: &mut Vec<RetainedEntry>) {
    let Some((first, rest)) = levels.split_first() else {
        out.extend(node.entry.iter().cloned());
        return;
    };
    let visible = |name: &str| !(root && name.starts_with('$'));
    match *first {
        "#" => {
            // `a/#` also matches `a` itself.
            if !root {
                out.extend(node.entry.iter().cloned());
            }
            for (name, child) in &node.children {
                if visible(name) {
                    everything(child, out);
                }
            }
        }
        "+" => {
            for (name, child) in &node.children {
                if visible(name) {
                    collect(child, rest, false, out);
                }
            }
        }
        literal => {
            if let Some(child) = node.children.get(literal) {
                collect(child, rest, false, out);
            }
        }
    }
}

fn everything(node: &Node, out: &mut Vec<RetainedEntry>) {
    out.extend(node.entry.iter().cloned());
    for child in node.children.values() {
        everything(child, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::SessionId;
    use bytes::Bytes;
    use ferrymq_codec::topic::matches;
    use ferrymq_codec::{MqttString, PublishProperties, QoS};
    use proptest::prelude::*;

    fn message(topic: &str, payload: &'static str) -> Arc<Message> {
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
