//! Access control with the real binary: `[auth] acl_file` with users from
//! `[auth] password_file`, raw clients in both protocol versions.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use ferrymq_codec::{
    Packet, Protocol, PubAck, Publish, QoS, ReasonCode, Subscribe, Subscription,
    SubscriptionOptions, Will,
};

const ACL: &str = r##"
[[rule]]
user = "gw"
publish = ["sensors/%c/#", "state/%u", "wills/%c"]
subscribe = ["cmd/%c/#", "sensors/#"]

[[rule]]
user = "ops"
subscribe = ["$SYS/#", "#"]
deny_subscribe = ["secret/#"]

[[rule]]
everyone = true
subscribe = ["public/#"]
"##;

fn broker() -> (Broker, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    for (user, password) in [("gw", "gw-pass"), ("ops", "ops-pass")] {
        add_user(&passwd, user, password);
    }
    let acl = dir.path().join("acl.toml");
    std::fs::write(&acl, ACL).unwrap();
    let broker = Broker::start(&format!(
        "[auth]\npassword_file = {:?}\nacl_file = {:?}\n",
        passwd.display().to_string(),
        acl.display().to_string()
    ));
    (broker, dir)
}

fn connect(
    broker: &Broker,
    protocol: Protocol,
    id: &str,
    user: &str,
    will: Option<&str>,
) -> (Raw, ReasonCode) {
    let mut raw = Raw::open(broker.addr, protocol);
    let mut c = connect_packet(protocol, id);
    c.username = Some(s(user));
    c.password = Some(Bytes::from(format!("{user}-pass")));
    c.will = will.map(|topic| Will {
        topic: s(topic),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Default::default(),
    });
    raw.send(&Packet::Connect(Box::new(c)));
    match raw.recv() {
        Some(Packet::ConnAck(ack)) => (raw, ack.reason_code),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

fn subscribe(raw: &mut Raw, filters: &[&str]) -> Vec<ReasonCode> {
    raw.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        subscriptions: filters
            .iter()
            .map(|f| Subscription {
                filter: s(f),
                options: SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    ..SubscriptionOptions::default()
                },
            })
            .collect(),
        properties: Default::default(),
    }));
    match raw.recv() {
        Some(Packet::SubAck(ack)) => ack.reason_codes,
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

fn publish(raw: &mut Raw, topic: &str, retain: bool) -> ReasonCode {
    raw.send(&Packet::Publish(Publish {
        topic: s(topic),
        qos: QoS::AtLeastOnce,
        packet_id: 7,
        retain,
        payload: Bytes::from(topic.to_owned()),
        ..Publish::default()
    }));
    match raw.recv() {
        Some(Packet::PubAck(ack)) => ack.reason_code,
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

/// The topics delivered to `raw` until it is quiet.
fn delivered(raw: &mut Raw) -> Vec<String> {
    let mut got = Vec::new();
    while let Some(p) = raw.recv_or_silence(Duration::from_millis(300)) {
        if let Packet::Publish(p) = p {
            if p.qos != QoS::AtMostOnce {
                raw.send(&Packet::PubAck(PubAck::new(p.packet_id)));
            }
            got.push(p.topic.to_string());
        }
    }
    got
}

#[test]
fn publishes_and_subscriptions_are_allowed_only_where_a_rule_grants_them_in_both_versions() {
    let (broker, _dir) = broker();
    let (mut ops, code) = connect(&broker, Protocol::V5, "ops-1", "ops", None);
    assert_eq!(code, ReasonCode::SUCCESS);
    // ops may read everything but secret/; `#` overlaps it, so it is
    // refused whole; $SYS only where granted.
    assert_eq!(
        subscribe(&mut ops, &["#", "sensors/#", "state/#", "$SYS/#"]),
        [
            ReasonCode::NOT_AUTHORIZED,
            ReasonCode::GRANTED_QOS_1,
            ReasonCode::GRANTED_QOS_1,
            ReasonCode::GRANTED_QOS_1
        ]
    );
    for protocol in [Protocol::V5, Protocol::V311] {
        let (mut gw, code) = connect(&broker, protocol, "dev1", "gw", None);
        assert_eq!(code, ReasonCode::SUCCESS);
        let denied = if protocol == Protocol::V5 {
            ReasonCode::NOT_AUTHORIZED
        } else {
            // 3.1.1 cannot say so: acknowledged and dropped.
            ReasonCode::SUCCESS
        };
        assert!(!publish(&mut gw, "sensors/dev1/temp", false).is_error());
        assert!(!publish(&mut gw, "state/gw", true).is_error());
        assert_eq!(publish(&mut gw, "sensors/dev2/temp", false), denied, "%c");
        assert_eq!(publish(&mut gw, "state/ops", true), denied, "%u, retained");
        assert_eq!(publish(&mut gw, "$SYS/fake", false), denied);
        let refused = if protocol == Protocol::V5 {
            ReasonCode::NOT_AUTHORIZED
        } else {
            ReasonCode(0x80)
        };
        assert_eq!(
            subscribe(
                &mut gw,
                &["cmd/dev1/#", "cmd/dev2/#", "public/news", "$SYS/#"]
            ),
            [
                ReasonCode::GRANTED_QOS_1,
                refused,
                ReasonCode::GRANTED_QOS_1,
                refused
            ]
        );
        let mut got = delivered(&mut ops);
        got.sort();
        assert_eq!(got, ["sensors/dev1/temp", "state/gw"], "{protocol:?}");
    }
    // The denied retained message was never stored.
    let (mut late, _) = connect(&broker, Protocol::V5, "ops-2", "ops", None);
    assert_eq!(
        subscribe(&mut late, &["state/+"]),
        [ReasonCode::GRANTED_QOS_1]
    );
    assert_eq!(delivered(&mut late), ["state/gw"]);
    // A will is checked like a publish.
    let (_, code) = connect(&broker, Protocol::V5, "dev1", "gw", Some("wills/dev2"));
    assert_eq!(code, ReasonCode::NOT_AUTHORIZED);
    let (_, code) = connect(&broker, Protocol::V311, "dev1", "gw", Some("wills/dev2"));
    assert_eq!(code, ReasonCode::NOT_AUTHORIZED, "3.1.1 return code 5");
    let (_, code) = connect(&broker, Protocol::V5, "dev1", "gw", Some("wills/dev1"));
    assert_eq!(code, ReasonCode::SUCCESS);
    broker.wait_for_log("not authorized by the ACL", WAIT);
}

#[test]
fn anonymous_clients_get_only_the_everyone_rules() {
    let (broker, _dir) = broker();
    let mut anon = Raw::connect(broker.addr, Protocol::V5, "anon");
    assert_eq!(
        subscribe(&mut anon, &["public/#", "sensors/#"]),
        [ReasonCode::GRANTED_QOS_1, ReasonCode::NOT_AUTHORIZED]
    );
    assert_eq!(
        publish(&mut anon, "public/x", false),
        ReasonCode::NOT_AUTHORIZED
    );
}

#[test]
fn a_reload_puts_new_users_and_rules_in_force_without_dropping_clients() {
    let (broker, dir) = broker();
    let (acl, users) = (dir.path().join("acl.toml"), dir.path().join("passwd"));
    let (mut gw, code) = connect(&broker, Protocol::V5, "gw-1", "gw", None);
    assert_eq!(code, ReasonCode::SUCCESS);
    assert_eq!(
        publish(&mut gw, "alerts/1", false),
        ReasonCode::NOT_AUTHORIZED
    );
    assert_eq!(
        subscribe(&mut gw, &["cmd/gw-1/#"]),
        [ReasonCode::GRANTED_QOS_1]
    );

    // New rules: gw may publish alerts/#, and no longer subscribe to
    // cmd/; a new user, and ops removed.
    let rules = ACL
        .replace(
            "publish = [\"sensors/%c/#\"",
            "publish = [\"alerts/#\", \"sensors/%c/#\"",
        )
        .replace("subscribe = [\"cmd/%c/#\", ", "subscribe = [");
    assert_ne!(rules, ACL);
    std::fs::write(&acl, rules).unwrap();
    add_user(&users, "new", "new-pass");
    assert!(passwd(&users, "ops", &["--delete"], "").0);
    broker.reload(2);
    let log = broker.log();
    assert!(log.contains("reload: auth.acl_file replaced"), "{log}");
    assert!(log.contains("reload: auth.password_file replaced"), "{log}");

    // The connected client stays, under the new rules (allowed; nobody
    // listens to alerts/).
    assert_eq!(
        publish(&mut gw, "alerts/1", false),
        ReasonCode::NO_MATCHING_SUBSCRIBERS
    );
    assert_eq!(
        subscribe(&mut gw, &["cmd/gw-1/x"]),
        [ReasonCode::NOT_AUTHORIZED]
    );
    let (_new, code) = connect(&broker, Protocol::V5, "new-1", "new", None);
    assert_eq!(code, ReasonCode::SUCCESS);
    let (_ops, code) = connect(&broker, Protocol::V311, "ops-1", "ops", None);
    assert_eq!(code, ReasonCode::BAD_USER_NAME_OR_PASSWORD);

    // Broken files fail the config's check: the reload is refused, each
    // problem logged with its key, and the rules in force stay.
    std::fs::write(&acl, "[[rule]\nuser = \"gw\"\n").unwrap();
    std::fs::write(&users, "new:plaintext\n").unwrap();
    broker.reload(1);
    let log = broker.log();
    assert!(log.contains("reload: the running config stays"), "{log}");
    assert!(
        log.contains("reload refused") && log.contains("auth.acl_file: "),
        "{log}"
    );
    assert!(log.contains("auth.password_file: "), "{log}");
    assert_eq!(
        publish(&mut gw, "alerts/2", false),
        ReasonCode::NO_MATCHING_SUBSCRIBERS
    );
    let (_new, code) = connect(&broker, Protocol::V5, "new-2", "new", None);
    assert_eq!(code, ReasonCode::SUCCESS);
}
