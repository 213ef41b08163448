//! State topics (`[state]`) with the real binary: an edge and a regional
//! node that both changed a value while apart hold the later write once
//! the link is back; an edge whose wall clock is an hour behind does not
//! replace a newer value with an older one; two edges merge through a real
//! Mosquitto upstream (the stamp travels as a user property); the clock
//! does not go back across a restart with the wall clock set back.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "../bridge/tests/common/mosquitto.rs"]
#[allow(dead_code)]
mod mosquitto;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::link::{Link, Mode};
use common::*;
use ferrymq_codec::{Packet, Protocol, PubAck, Publish, QoS, ReasonCode};

const STATE: &str = "[state]\ntopics = [\"shadow/#\"]\n";
const TRUSTED: &str = "[ferry]\ntrusted_clients = [\"edge-*\"]\n";
/// Runs a node with its wall clock an hour behind.
const HOUR_BEHIND: &[&str] = &[
    "env",
    "FAKETIME_DONT_FAKE_MONOTONIC=1",
    "faketime",
    "-f",
    "-1h",
];

/// A node on loopback `port` (0: any) with its data in `data`, run by
/// `wrapper` (see [`Broker::start_under`]).
fn node(wrapper: &[&str], data: &Path, port: u16, extra: &str) -> Broker {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "data_dir = {:?}\n[[listener]]\nbind = \"127.0.0.1:{port}\"\n{extra}\n",
        data.display().to_string()
    );
    let path = dir.path().join("ferrymq.toml");
    std::fs::write(&path, config).unwrap();
    Broker::start_under(wrapper, &path, dir)
}

/// A bridge "up" as `client_id` to 127.0.0.1:`port` with no rules of its
/// own: the state topics are its rules.
fn bridge(client_id: &str, port: u16, kind: &str) -> String {
    format!(
        r#"
[[bridge]]
name = "up"
kind = "{kind}"
addresses = ["127.0.0.1:{port}"]
client_id = "{client_id}"
keepalive_secs = 2
connect_timeout_secs = 2
reconnect_min_ms = 50
reconnect_max_ms = 300
ramp_secs = 0
"#
    )
}

/// Sets (or, with an empty payload, clears) the retained value of `topic`
/// on the node at `addr`, as a plain MQTT 5 client would.
fn set(addr: SocketAddr, topic: &str, payload: &str) {
    let mut raw = Raw::connect(addr, Protocol::V5, "writer");
    raw.send(&Packet::Publish(Publish {
        qos: QoS::AtLeastOnce,
        retain: true,
        packet_id: 1,
        topic: s(topic),
        payload: Bytes::from(payload.to_owned()),
        ..Publish::default()
    }));
    match raw.recv() {
        Some(Packet::PubAck(ack)) => assert!(
            [ReasonCode::SUCCESS, ReasonCode::NO_MATCHING_SUBSCRIBERS].contains(&ack.reason_code),
            "{:?}",
            ack.reason_code
        ),
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

/// The state values a new subscriber to `shadow/#` gets from `addr`, with
/// their stamps.
fn held_stamped(addr: SocketAddr) -> BTreeMap<String, (String, String)> {
    let mut raw = Raw::connect(addr, Protocol::V5, "reader");
    raw.send(&subscribe_qos1("shadow/#"));
    let mut values = BTreeMap::new();
    while let Some(packet) = raw.recv_or_silence(Duration::from_millis(300)) {
        if let Packet::Publish(p) = packet {
            raw.send(&Packet::PubAck(PubAck::new(p.packet_id)));
            let stamp = p
                .properties
                .user_properties
                .iter()
                .find(|(k, _)| k.as_str() == "ferry-stamp")
                .map(|(_, v)| v.as_str().to_owned())
                .unwrap_or_default();
            let payload = String::from_utf8(p.payload.to_vec()).unwrap();
            values.insert(p.topic.as_str().to_owned(), (payload, stamp));
        }
    }
    values
}

fn held(addr: SocketAddr) -> BTreeMap<String, String> {
    held_stamped(addr)
        .into_iter()
        .map(|(t, (v, _))| (t, v))
        .collect()
}

fn values(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(t, v)| ((*t).to_owned(), (*v).to_owned()))
        .collect()
}

/// Waits until every node in `nodes` holds exactly `expected`.
fn converge(nodes: &[(&str, SocketAddr)], expected: &BTreeMap<String, String>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen: Vec<(&str, BTreeMap<String, String>)> = nodes
            .iter()
            .map(|(name, addr)| (*name, held(*addr)))
            .collect();
        if seen.iter().all(|(_, v)| v == expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "expected {expected:?} everywhere, got {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The milliseconds of a `ferry-stamp`.
fn stamp_ms(stamp: &str) -> u64 {
    stamp.split(':').next().unwrap().parse().unwrap()
}

#[test]
fn values_both_sides_changed_while_apart_converge_on_the_later_write() {
    let regional_data = tempfile::tempdir().unwrap();
    let port = free_port();
    let regional = node(
        &[],
        regional_data.path(),
        port,
        &format!("{STATE}{TRUSTED}"),
    );
    let link = Link::new(regional.addr, Mode::Pass);
    let edge_data = tempfile::tempdir().unwrap();
    let edge_config = format!("{STATE}{}", bridge("edge-1", link.port(), "ferrymq"));
    let edge = node(&[], edge_data.path(), 0, &edge_config);
    let both = [("edge", edge.addr), ("regional", regional.addr)];
    set(edge.addr, "shadow/a", "edge-0");
    converge(&both, &values(&[("shadow/a", "edge-0")]));

    link.set(Mode::Down);
    let later = || std::thread::sleep(Duration::from_millis(30));
    // a: the edge writes last; b: the regional node does; c: set on one
    // side, cleared later on the other; d: cleared, then set later.
    set(regional.addr, "shadow/a", "regional-1");
    set(edge.addr, "shadow/b", "edge-1");
    set(regional.addr, "shadow/c", "regional-c");
    set(edge.addr, "shadow/d", "");
    later();
    set(edge.addr, "shadow/a", "edge-2");
    set(regional.addr, "shadow/b", "regional-2");
    set(edge.addr, "shadow/c", "");
    set(regional.addr, "shadow/d", "regional-d");
    assert_eq!(held(edge.addr).get("shadow/a").unwrap(), "edge-2");
    assert_eq!(held(regional.addr).get("shadow/a").unwrap(), "regional-1");

    link.set(Mode::Pass);
    let expected = values(&[
        ("shadow/a", "edge-2"),
        ("shadow/b", "regional-2"),
        ("shadow/d", "regional-d"),
    ]);
    converge(&both, &expected);
    // Both sides hold the same stamps, not just the same values.
    assert_eq!(held_stamped(edge.addr), held_stamped(regional.addr));

    // The regional node, SIGKILLed and restarted, still holds them, and a
    // cleared value does not come back from the edge.
    regional.kill();
    let regional = node(
        &[],
        regional_data.path(),
        port,
        &format!("{STATE}{TRUSTED}"),
    );
    converge(
        &[("edge", edge.addr), ("regional", regional.addr)],
        &expected,
    );
}

#[test]
fn an_edge_clock_an_hour_behind_does_not_replace_a_newer_value_with_an_older_one() {
    let regional_data = tempfile::tempdir().unwrap();
    let regional = node(&[], regional_data.path(), 0, &format!("{STATE}{TRUSTED}"));
    let link = Link::new(regional.addr, Mode::Pass);
    let edge_data = tempfile::tempdir().unwrap();
    let edge_config = format!("{STATE}{}", bridge("edge-1", link.port(), "ferrymq"));
    let edge = node(HOUR_BEHIND, edge_data.path(), 0, &edge_config);
    let both = [("edge", edge.addr), ("regional", regional.addr)];
    set(regional.addr, "shadow/x", "regional-0");
    converge(&both, &values(&[("shadow/x", "regional-0")]));
    // The edge's stamps are an hour behind the regional node's.
    let stamps = held_stamped(edge.addr);
    set(edge.addr, "shadow/probe", "edge");
    let edge_stamp = stamp_ms(&held_stamped(edge.addr)["shadow/probe"].1);
    let regional_stamp = stamp_ms(&stamps["shadow/x"].1);
    assert!(
        regional_stamp > edge_stamp + 3_500_000,
        "edge {edge_stamp} regional {regional_stamp}"
    );

    link.set(Mode::Down);
    set(regional.addr, "shadow/y", "regional-newer");
    std::thread::sleep(Duration::from_millis(200));
    // Later in real time, but stamped by a clock an hour behind, by an
    // edge that had not seen the regional value.
    set(edge.addr, "shadow/y", "edge-older");
    link.set(Mode::Pass);
    converge(
        &both,
        &values(&[
            ("shadow/probe", "edge"),
            ("shadow/x", "regional-0"),
            ("shadow/y", "regional-newer"),
        ]),
    );
    // Once it has seen the value, the edge's next write replaces it,
    // whatever its clock says.
    set(edge.addr, "shadow/y", "edge-after");
    converge(
        &both,
        &values(&[
            ("shadow/probe", "edge"),
            ("shadow/x", "regional-0"),
            ("shadow/y", "edge-after"),
        ]),
    );
}

#[test]
fn two_edges_merge_state_through_a_real_mosquitto_upstream() {
    let upstream = mosquitto::Mosquitto::start("");
    let link = Link::new(upstream.addr(), Mode::Pass);
    let (one_data, two_data) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let one = node(
        &[],
        one_data.path(),
        0,
        &format!("{STATE}{}", bridge("edge-1", upstream.port(), "mqtt")),
    );
    let two = node(
        &[],
        two_data.path(),
        0,
        &format!("{STATE}{}", bridge("edge-2", link.port(), "mqtt")),
    );
    let both = [("edge-1", one.addr), ("edge-2", two.addr)];
    set(one.addr, "shadow/a", "one-0");
    converge(&both, &values(&[("shadow/a", "one-0")]));

    link.set(Mode::Down);
    set(two.addr, "shadow/a", "two-earlier");
    set(one.addr, "shadow/b", "one-earlier");
    std::thread::sleep(Duration::from_millis(30));
    set(one.addr, "shadow/a", "one-later");
    set(two.addr, "shadow/b", "two-later");
    link.set(Mode::Pass);
    converge(
        &both,
        &values(&[("shadow/a", "one-later"), ("shadow/b", "two-later")]),
    );
    assert_eq!(held_stamped(one.addr), held_stamped(two.addr));
}

#[test]
fn the_state_clock_does_not_go_back_when_a_restart_sets_the_wall_clock_back() {
    let data = tempfile::tempdir().unwrap();
    let first = node(&[], data.path(), 0, STATE);
    set(first.addr, "shadow/before", "1");
    let before = stamp_ms(&held_stamped(first.addr)["shadow/before"].1);
    first.kill();
    let again = node(HOUR_BEHIND, data.path(), 0, STATE);
    set(again.addr, "shadow/after", "2");
    let after = stamp_ms(&held_stamped(again.addr)["shadow/after"].1);
    assert!(after > before, "{after} after {before}");
}

#[test]
fn a_client_cannot_win_a_state_topic_with_a_forged_stamp() {
    let node = Broker::start(STATE);
    let mut raw = Raw::connect(node.addr, Protocol::V5, "forger");
    let far_future = "281474976710655:0:ffffffffffffffffffffffffffffffff";
    raw.send(&Packet::Publish(Publish {
        qos: QoS::AtLeastOnce,
        retain: true,
        packet_id: 1,
        topic: s("shadow/x"),
        payload: Bytes::from_static(b"forged"),
        properties: ferrymq_codec::PublishProperties {
            user_properties: vec![(s("ferry-stamp"), s(far_future))],
            ..Default::default()
        },
        ..Publish::default()
    }));
    assert!(matches!(raw.recv(), Some(Packet::PubAck(_))));
    // Stamped here instead, so a later write replaces it.
    let (value, stamp) = held_stamped(node.addr)["shadow/x"].clone();
    assert_eq!(value, "forged");
    assert_ne!(stamp, far_future);
    set(node.addr, "shadow/x", "later");
    assert_eq!(held(node.addr)["shadow/x"], "later");
}
