//! The retained messages of a new subscription, streamed: each
//! subscription that asks for them gets a [`RetainedCursor`], and its
//! connection takes them a page at a time from the retained set as fast as
//! the client's window (Receive Maximum) and the socket allow. They never
//! pass through the session's bounded queue, so no queue policy drops
//! them, and memory holds one page per replay, whatever the retained count.
//!
//! Order and once-only: the cursor returns each topic's entry at most
//! once, in topic order. An entry set after the SUBSCRIBE is skipped: the
//! subscription already existed, so that message reaches the client as a
//! live publish instead. Live messages wait in the session's queue until
//! every replay of the session is done (the connection drains replays
//! first), so the retained message of a topic always arrives before a
//! live one of the same topic.
//!
//! A replay lives with the session in memory (a client that reconnects to
//! its session carries on); it is not stored, so a broker restart ends it.

use std::collections::VecDeque;
use std::sync::Arc;

use ferrymq_codec::{MqttString, QoS};
use tokio::time::Instant;

use crate::outbox::{Delivery, Pop};
use crate::retained::{Retained, RetainedCursor, RetainedEntry};
use crate::storage::Ticket;

/// Retained messages read from the retained set at a time, per replay.
const PAGE: usize = 64;

/// The retained messages still to send for one subscription.
struct Replay {
    cursor: RetainedCursor,
    /// The QoS granted to the subscription.
    granted: QoS,
    /// Its Subscription Identifier (5.0).
    identifiers: Option<Arc<[u32]>>,
    /// The ticket of the SUBACK: nothing is sent before it.
    after: Ticket,
    /// The page read and not yet sent.
    page: VecDeque<RetainedEntry>,
}

/// The replays of one session, in SUBSCRIBE order.
#[derive(Default)]
pub struct Replays {
    queue: VecDeque<Replay>,
}

impl Replays {
    /// Starts sending the retained messages matching `filter` now (after
    /// any replay already under way). A replay of the same filter still
    /// under way starts over (a resubscribe sends them again).
    pub fn start(
        &mut self,
        retained: &Retained,
        filter: &str,
        granted: QoS,
        identifier: Option<u32>,
        after: Ticket,
    ) {
        self.cancel(filter);
        self.queue.push_back(Replay {
            cursor: retained.cursor(filter),
            granted,
            identifiers: identifier.map(|id| Arc::from([id])),
            after,
            page: VecDeque::new(),
        });
    }

    /// Stops the replay of `filter` (its subscription is gone).
    pub fn cancel(&mut self, filter: &str) {
        self.queue.retain(|r| r.cursor.filter() != filter);
    }

    /// Whether nothing is left to send.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The next retained message to send, as the outbox's `pop_ready`
    /// would give it: `WaitDurable` until it (and the SUBACK) is durable,
    /// `WaitWindow` while `can_send` refuses its QoS. Expired messages are
    /// skipped, their topics added to `expired` (the caller removes them).
    pub fn pop_ready(
        &mut self,
        retained: &Retained,
        durable: Ticket,
        now: Instant,
        now_ms: u64,
        can_send: impl Fn(QoS) -> bool,
        expired: &mut Vec<MqttString>,
    ) -> Pop {
        loop {
            let Some(replay) = self.queue.front_mut() else {
                return Pop::Empty;
            };
            if replay.page.is_empty() {
                if replay.cursor.is_done() {
                    self.queue.pop_front();
                    continue;
                }
                let mut page = Vec::with_capacity(PAGE);
                retained.next_page(&mut replay.cursor, PAGE, &mut page);
                replay.page.extend(page);
                continue;
            }
            let Some(entry) = replay.page.front() else {
                continue;
            };
            if entry.message.is_expired(now) {
                expired.push(entry.message.topic.clone());
                replay.page.pop_front();
                continue;
            }
            let qos = entry.message.qos.min(replay.granted);
            let ticket = entry.ticket.max(replay.after);
            if ticket > durable {
                return Pop::WaitDurable;
            }
            if !can_send(qos) {
                return Pop::WaitWindow;
            }
            let Some(entry) = replay.page.pop_front() else {
                continue;
            };
            return Pop::Got(Delivery {
                message: entry.message,
                qos,
                retain: true,
                seq: 0,
                queue: 0,
                ticket,
                stored: false,
                identifiers: replay.identifiers.clone(),
                group: None,
                queued_ms: now_ms,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retained::tests::message;

    fn set(retained: &Retained, topic: &str, payload: &'static str, ticket: Ticket) {
        retained.set(message(topic, payload), ticket);
    }

    /// Pops until `Empty` or a wait, within a window of `window` QoS 1/2
    /// messages; returns the topics and why it stopped.
    fn drain(
        replays: &mut Replays,
        retained: &Retained,
        durable: Ticket,
        window: usize,
    ) -> (Vec<String>, &'static str) {
        let mut got = Vec::new();
        let mut expired = Vec::new();
        let now = Instant::now();
        loop {
            let in_flight = got.len();
            match replays.pop_ready(
                retained,
                durable,
                now,
                0,
                |_| in_flight < window,
                &mut expired,
            ) {
                Pop::Got(d) => {
                    assert!(d.retain);
                    got.push(d.message.topic.to_string());
                }
                Pop::Empty => return (got, "empty"),
                Pop::WaitDurable => return (got, "durable"),
                Pop::WaitWindow => return (got, "window"),
            }
        }
    }

    #[test]
    fn every_match_once_in_topic_order_within_the_window() {
        let retained = Retained::default();
        for i in (0..300).rev() {
            set(&retained, &format!("s/{i:03}"), "v", 0);
        }
        set(&retained, "other/x", "v", 0);
        let mut replays = Replays::default();
        replays.start(&retained, "s/+", QoS::AtLeastOnce, Some(7), 0);
        let (first, why) = drain(&mut replays, &retained, 0, 100);
        assert_eq!((first.len(), why), (100, "window"));
        let (rest, why) = drain(&mut replays, &retained, 0, usize::MAX);
        assert_eq!(why, "empty");
        let all: Vec<String> = first.into_iter().chain(rest).collect();
        let expected: Vec<String> = (0..300).map(|i| format!("s/{i:03}")).collect();
        assert_eq!(all, expected);
        assert!(replays.is_empty());
    }

    #[test]
    fn nothing_before_the_suback_and_the_message_are_durable() {
        let retained = Retained::default();
        set(&retained, "a", "v", 5);
        let mut replays = Replays::default();
        replays.start(&retained, "a", QoS::AtMostOnce, None, 9);
        assert_eq!(drain(&mut replays, &retained, 5, 10).1, "durable");
        assert_eq!(
            drain(&mut replays, &retained, 9, 10),
            (vec!["a".to_string()], "empty")
        );
    }

    #[test]
    fn set_after_the_subscribe_or_cleared_is_not_replayed() {
        let retained = Retained::default();
        for t in ["a/1", "a/2", "a/3"] {
            set(&retained, t, "old", 0);
        }
        let mut replays = Replays::default();
        replays.start(&retained, "a/#", QoS::AtMostOnce, None, 0);
        // Live meanwhile: a/1 replaced (it reaches the client live), a/2
        // cleared, a/4 new (live too).
        set(&retained, "a/1", "new", 0);
        set(&retained, "a/2", "", 0);
        set(&retained, "a/4", "new", 0);
        assert_eq!(
            drain(&mut replays, &retained, 0, 10),
            (vec!["a/3".to_string()], "empty")
        );
    }

    #[test]
    fn a_resubscribe_starts_over_and_an_unsubscribe_stops() {
        let retained = Retained::default();
        for i in 0..10 {
            set(&retained, &format!("t/{i}"), "v", 0);
        }
        let mut replays = Replays::default();
        replays.start(&retained, "t/#", QoS::AtLeastOnce, None, 0);
        replays.start(&retained, "t/9", QoS::AtLeastOnce, None, 0);
        assert_eq!(drain(&mut replays, &retained, 0, 4).0.len(), 4);
        replays.start(&retained, "t/#", QoS::AtLeastOnce, None, 0);
        let (got, _) = drain(&mut replays, &retained, 0, usize::MAX);
        // t/9's replay was first in line now; t/# started over after it.
        assert_eq!(got.len(), 11);
        assert_eq!(got[0], "t/9");
        replays.start(&retained, "t/#", QoS::AtLeastOnce, None, 0);
        replays.cancel("t/#");
        assert!(replays.is_empty());
    }

    #[test]
    fn expired_messages_are_skipped_and_reported() {
        let retained = Retained::default();
        let mut m = (*message("e", "v")).clone();
        m.expires_at = Some(Instant::now() - std::time::Duration::from_secs(1));
        retained.set(Arc::new(m), 0);
        set(&retained, "f", "v", 0);
        let mut replays = Replays::default();
        replays.start(&retained, "+", QoS::AtMostOnce, None, 0);
        let mut expired = Vec::new();
        let pop = replays.pop_ready(&retained, 0, Instant::now(), 0, |_| true, &mut expired);
        assert!(matches!(pop, Pop::Got(d) if d.message.topic.as_str() == "f"));
        assert_eq!(expired, [MqttString::from_static("e")]);
    }
}
