//! The one place where a session's subscription is attached: a
//! `$share/{group}/{filter}` subscription joins its group (`shared_sub`),
//! any other goes into the router, and the session remembers it. Used by
//! a client's SUBSCRIBE (`connection/subscriptions.rs`), start-up recovery and the
//! bridges' own sessions; each writes the store itself (in its batch).

use ferrymq_codec::MqttString;
use ferrymq_codec::topic::shared_subscription;

use crate::Shared;
use crate::message::SessionId;
use crate::router::Subscriber;
use crate::session::SessionState;
use crate::shared_sub::Member;
use crate::storage::SubscriptionRecord;

/// What attaching a subscription did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Attached {
    /// A new subscription (a shared one is always counted as new).
    New,
    /// It replaced the session's subscription to the same filter.
    Replaced,
    /// A shared filter whose group name or inner filter is not a valid
    /// string: nothing was attached.
    Invalid,
}

/// Attaches `filter` with `record` to the session `state` (its queue is
/// where the messages go), replacing its subscription to the same filter.
pub(crate) fn attach(
    shared: &Shared,
    state: &mut SessionState,
    filter: &MqttString,
    record: SubscriptionRecord,
) -> Attached {
    let session = SessionId(state.number);
    if let Some((name, inner)) = shared_subscription(filter) {
        let (Ok(name), Ok(inner)) = (MqttString::new(name), MqttString::new(inner)) else {
            return Attached::Invalid;
        };
        let member = Member {
            session,
            outbox: state.outbox.clone(),
            qos: record.options.qos,
            retain_as_published: record.options.retain_as_published,
            identifier: record.identifier,
        };
        let group = shared.groups.join(shared, name, inner, member.clone());
        state.rare().groups.insert(filter.clone(), (group, member));
        state.subscriptions.insert(filter.clone(), record);
        return Attached::New;
    }
    let subscriber = Subscriber::of_session(
        session,
        state.outbox.clone(),
        &record.options,
        record.identifier,
    );
    shared.router.subscribe(filter, subscriber);
    match state.subscriptions.insert(filter.clone(), record) {
        Some(_) => Attached::Replaced,
        None => Attached::New,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrymq_codec::{QoS, SubscriptionOptions};

    fn record(qos: QoS) -> SubscriptionRecord {
        SubscriptionRecord {
            options: SubscriptionOptions {
                qos,
                ..SubscriptionOptions::default()
            },
            identifier: None,
        }
    }

    fn s(text: &str) -> MqttString {
        MqttString::new(text).expect("string")
    }

    #[tokio::test]
    async fn a_subscription_goes_to_the_router_or_its_group_and_the_session_remembers_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = ferrymq_config::Config {
            data_dir: dir.path().join("data"),
            ..Default::default()
        };
        config.listeners[0].bind = "127.0.0.1:0".parse().expect("address");
        let broker = crate::Broker::start_with_store(config, crate::storage::MemoryStore::new())
            .await
            .expect("broker");
        let shared = &broker.shared;
        let number = shared.next_session_number();
        let mut state = SessionState::new(s("c"), number, shared.new_outbox(number));
        let routes = |topic: &str| {
            let mut out = Vec::new();
            shared.router.routes(topic, SessionId(u64::MAX), &mut out);
            out.iter().map(|r| (r.session.0, r.qos)).collect::<Vec<_>>()
        };
        // (filter, QoS, what it did)
        let table = [
            ("a/+", QoS::AtMostOnce, Attached::New),
            ("a/+", QoS::AtLeastOnce, Attached::Replaced),
            ("$share/g/a/b", QoS::AtLeastOnce, Attached::New),
            ("$share/g/+", QoS::AtMostOnce, Attached::New),
        ];
        for (n, (filter, qos, want)) in table.into_iter().enumerate() {
            assert_eq!(
                attach(shared, &mut state, &s(filter), record(qos)),
                want,
                "row {n}"
            );
            assert_eq!(state.subscriptions[&s(filter)].options.qos, qos, "row {n}");
        }
        // The replaced subscription's QoS is the router's; the shared ones
        // are reached through their group, not as this session.
        assert_eq!(routes("a/x"), vec![(number, QoS::AtLeastOnce)]);
        assert_eq!(state.groups().count(), 2);
        assert!(routes("a/b").iter().any(|(session, _)| *session != number));
        broker.shutdown().await;
    }
}
