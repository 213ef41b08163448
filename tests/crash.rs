//! Durability against SIGKILL: nothing acknowledged is lost, whatever
//! moment the broker dies at. Real binary, real RocksDB, real kill -9.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use ferrymq_codec::{
    Disconnect, Packet, Protocol, PubAck, Publish, QoS, Subscribe, Subscription,
    SubscriptionOptions,
};

fn subscribe_persistent(addr: std::net::SocketAddr, id: &str, filter: &str) {
    let mut raw = Raw::open(addr, Protocol::V311);
    let mut c = connect_packet(Protocol::V311, id);
    c.clean_start = false;
    raw.send(&Packet::Connect(Box::new(c)));
    assert!(matches!(raw.recv(), Some(Packet::ConnAck(_))));
    raw.send(&subscribe_qos1(filter));
    assert!(matches!(raw.recv(), Some(Packet::SubAck(_))));
    raw.send(&Packet::Disconnect(Disconnect::default()));
    raw.until_closed();
}

/// Publishes QoS 1 messages numbered from `next` with up to 10 in flight
/// (at most `limit` of them), until the connection dies; records the
/// numbers that were PUBACKed.
fn publish_until_killed(
    addr: std::net::SocketAddr,
    next: &mut u32,
    acked: &mut BTreeSet<u32>,
    limit: u32,
) {
    let stop = *next + limit;
    let mut raw = Raw::connect(addr, Protocol::V311, "crash-pub");
    raw.stream.set_nonblocking(false).unwrap();
    let mut in_flight = std::collections::HashMap::new();
    let mut buf = bytes::BytesMut::new();
    loop {
        while in_flight.len() < 10 && *next < stop {
            let id = (*next % 60_000) as u16 + 1;
            let p = Publish {
                qos: QoS::AtLeastOnce,
                packet_id: id,
                topic: s("crash/data"),
                payload: Bytes::from(next.to_string()),
                ..Publish::default()
            };
            let mut out = bytes::BytesMut::new();
            Packet::Publish(p).encode(Protocol::V311, &mut out).unwrap();
            if std::io::Write::write_all(&mut raw.stream, &out).is_err() {
                return;
            }
            in_flight.insert(id, *next);
            *next += 1;
        }
        raw.stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut chunk = [0u8; 4096];
        match raw.stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        while let Ok(Some(packet)) = ferrymq_codec::decode(&mut buf, Protocol::V311, u32::MAX) {
            if let Packet::PubAck(ack) = packet
                && let Some(n) = in_flight.remove(&ack.packet_id)
            {
                acked.insert(n);
            }
        }
    }
}

#[test]
fn sigkill_mid_stream_loses_nothing_that_was_acknowledged() {
    let data = tempfile::tempdir().unwrap();
    // Queues large enough that no queue_full policy drops anything.
    const ROOMY: &str = "[storage]\nmax_queued_messages = 10000000\nmax_queued_bytes = \"1GiB\"";
    // Every policy promises the same against kill -9; `sync-each` also
    // makes writes slower than publishes, so an acknowledgement sent
    // before its write would be caught with many messages in flight.
    let policies = ["sync-each", "group-commit", "interval", "sync-each"];
    let start = |round: usize| {
        let policy = policies[round % policies.len()];
        Broker::start_at(data.path(), &format!("{ROOMY}\ndurability = \"{policy}\""))
    };
    let broker = start(0);
    subscribe_persistent(broker.addr, "crash-sub", "crash/#");
    // A retained message set before the first kill.
    let mut raw = Raw::connect(broker.addr, Protocol::V311, "crash-retain");
    raw.send(&Packet::Publish(Publish {
        qos: QoS::AtLeastOnce,
        packet_id: 1,
        retain: true,
        topic: s("crash/state"),
        payload: Bytes::from_static(b"armed"),
        ..Publish::default()
    }));
    assert_eq!(raw.recv(), Some(Packet::PubAck(PubAck::new(1))));
    drop(raw);

    let mut next = 0u32;
    let mut acked = BTreeSet::new();
    let mut broker = broker;
    for round in 0..4 {
        let addr = broker.addr;
        // Kill it while the publisher is in full flow.
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(400 + 150 * round));
            broker.kill();
        });
        publish_until_killed(addr, &mut next, &mut acked, 20000);
        killer.join().unwrap();
        broker = start(round as usize + 1);
    }
    assert!(
        acked.len() > 100,
        "the test published too little: {} acknowledged",
        acked.len()
    );

    // The subscriber gets every acknowledged message (duplicates of
    // unacknowledged ones are allowed: at least once).
    let mut sub = Raw::open(broker.addr, Protocol::V311);
    let mut c = connect_packet(Protocol::V311, "crash-sub");
    c.clean_start = false;
    sub.send(&Packet::Connect(Box::new(c)));
    assert!(matches!(sub.recv(), Some(Packet::ConnAck(a)) if a.session_present));
    let mut missing = acked.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !missing.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} acknowledged messages never arrived",
            missing.len()
        );
        match sub.recv_or_silence(Duration::from_secs(5)) {
            Some(Packet::Publish(p)) => {
                if p.topic == "crash/data" {
                    missing.remove(
                        &std::str::from_utf8(&p.payload)
                            .unwrap()
                            .parse::<u32>()
                            .unwrap(),
                    );
                }
                sub.send(&Packet::PubAck(PubAck::new(p.packet_id)));
            }
            None => panic!(
                "{} of {} acknowledged messages missing, e.g. {:?}",
                missing.len(),
                acked.len(),
                missing.iter().take(5).collect::<Vec<_>>()
            ),
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    // The retained message survived every kill.
    let mut late = Raw::connect(broker.addr, Protocol::V311, "crash-late");
    late.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        subscriptions: vec![Subscription {
            filter: s("crash/state"),
            options: SubscriptionOptions::default(),
        }],
        properties: Default::default(),
    }));
    assert!(matches!(late.recv(), Some(Packet::SubAck(_))));
    assert!(matches!(late.recv(), Some(Packet::Publish(p)) if p.payload == "armed" && p.retain));
}

#[test]
fn sessions_expire_across_a_restart_when_the_wall_clock_measures_the_downtime() {
    let data = tempfile::tempdir().unwrap();
    let broker = Broker::start_at(data.path(), "");
    let mut raw = Raw::open(broker.addr, Protocol::V5);
    let mut c = connect_packet(Protocol::V5, "short-lived");
    c.clean_start = false;
    c.properties.session_expiry_interval = Some(2);
    raw.send(&Packet::Connect(Box::new(c.clone())));
    assert!(matches!(raw.recv(), Some(Packet::ConnAck(_))));
    raw.send(&Packet::Disconnect(Disconnect::default()));
    raw.until_closed();
    let mut keep = c.clone();
    keep.client_id = s("long-lived");
    keep.properties.session_expiry_interval = Some(3600);
    let mut raw = Raw::open(broker.addr, Protocol::V5);
    raw.send(&Packet::Connect(Box::new(keep.clone())));
    assert!(matches!(raw.recv(), Some(Packet::ConnAck(_))));
    raw.send(&Packet::Disconnect(Disconnect::default()));
    raw.until_closed();
    broker.kill();
    std::thread::sleep(Duration::from_millis(2500));
    let broker = Broker::start_at(data.path(), "");
    for (connect, present) in [(c, false), (keep, true)] {
        let mut raw = Raw::open(broker.addr, Protocol::V5);
        let id = connect.client_id.clone();
        raw.send(&Packet::Connect(Box::new(connect)));
        match raw.recv() {
            Some(Packet::ConnAck(ack)) => assert_eq!(ack.session_present, present, "{id}"),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn queue_stats_and_queue_list_report_what_is_stored() {
    let data = tempfile::tempdir().unwrap();
    let broker = Broker::start_at(data.path(), "");
    subscribe_persistent(broker.addr, "stats-sub", "stats/#");
    let mut raw = Raw::connect(broker.addr, Protocol::V311, "stats-pub");
    for id in 1..=3u16 {
        raw.send(&Packet::Publish(Publish {
            qos: QoS::AtLeastOnce,
            packet_id: id,
            topic: s("stats/t"),
            payload: Bytes::from_static(b"12345"),
            ..Publish::default()
        }));
        assert!(matches!(raw.recv(), Some(Packet::PubAck(_))));
    }
    let config = data.path().join("stats.toml");
    std::fs::write(&config, format!("data_dir = {:?}\n", data.path())).unwrap();
    let command = |args: &[&str]| {
        std::process::Command::new(binary())
            .args(["queue"])
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap()
    };
    let run = || command(&["stats"]);
    let list = |limit: &str| {
        let out = command(&["list", "stats-sub", "--limit", limit]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    // While the broker runs: a snapshot.
    let text = list("100");
    assert!(text.starts_with("stats-sub: 3 messages queued"), "{text}");
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("stats/t")).collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines
            .iter()
            .all(|l| l.contains("qos 1") && l.ends_with("12345")),
        "{text}"
    );
    let out = command(&["list", "nobody"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no persistent session \"nobody\""));
    let out = run();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("a broker is running"), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("stats-sub"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains(" 3 ") && line.contains("15 B"), "{line}");
    broker.kill();
    let out = run();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!text.contains("a broker is running"), "{text}");
    assert!(text.contains("1 queues, 3 messages"), "{text}");
    // Stopped: read directly; --limit keeps to the oldest.
    let text = list("1");
    assert_eq!(
        text.lines().filter(|l| l.contains("stats/t")).count(),
        1,
        "{text}"
    );
    assert!(text.contains("... 2 more"), "{text}");
}

/// The same promise checked by an independent client: paho decides what
/// was acknowledged (its on_publish), and paho's subscriber must get all
/// of it after several SIGKILLs.
#[test]
fn paho_sigkill_mid_stream_loses_nothing_that_paho_saw_acknowledged() {
    let data = tempfile::tempdir().unwrap();
    let acked = data.path().join("acked.txt");
    const ROOMY: &str = "[storage]\nmax_queued_messages = 10000000\nmax_queued_bytes = \"1GiB\"";
    let script = format!("{}/tests/interop/paho_crash.py", env!("CARGO_MANIFEST_DIR"));
    let run = |broker: &Broker, args: &[&str]| {
        let output = std::process::Command::new("python3")
            .arg(&script)
            .arg("127.0.0.1")
            .arg(broker.addr.port().to_string())
            .args(args)
            .output()
            .expect("python3 with paho-mqtt (scripts/install-test-deps.sh)");
        assert!(
            output.status.success(),
            "paho_crash.py {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        eprint!("{}", String::from_utf8_lossy(&output.stdout));
    };
    // As above: `sync-each` rounds would expose an early acknowledgement.
    let policies = ["sync-each", "group-commit", "sync-each", "interval"];
    let start = |round: u64| {
        let policy = policies[round as usize % policies.len()];
        Broker::start_at(
            data.path().join("data").as_path(),
            &format!("{ROOMY}\ndurability = \"{policy}\""),
        )
    };
    let mut broker = start(0);
    run(&broker, &["prepare"]);
    for round in 0..3u64 {
        let first = (round * 1_000_000).to_string();
        let killer = {
            let pid = broker.pid();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(1500 + 300 * round));
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            })
        };
        run(&broker, &["publish", &first, acked.to_str().unwrap()]);
        killer.join().unwrap();
        broker.kill();
        broker = start(round + 1);
    }
    run(&broker, &["verify", acked.to_str().unwrap()]);
}

/// Regression: a session that was online when the broker was killed had
/// no offline time stored, so its expiry restarted from zero at the next
/// start (and a test that killed the broker right after a disconnect, before
/// the offline time was written, saw an expired session come back).
#[test]
fn a_session_online_when_the_broker_is_killed_expires_counting_from_the_crash() {
    let data = tempfile::tempdir().unwrap();
    let broker = Broker::start_at(data.path(), "");
    let mut c = connect_packet(Protocol::V5, "online-at-crash");
    c.clean_start = false;
    c.properties.session_expiry_interval = Some(2);
    let mut raw = Raw::open(broker.addr, Protocol::V5);
    raw.send(&Packet::Connect(Box::new(c.clone())));
    assert!(matches!(raw.recv(), Some(Packet::ConnAck(_))));
    broker.kill();
    drop(raw);
    std::thread::sleep(Duration::from_millis(2500));
    let broker = Broker::start_at(data.path(), "");
    let mut raw = Raw::open(broker.addr, Protocol::V5);
    raw.send(&Packet::Connect(Box::new(c)));
    match raw.recv() {
        Some(Packet::ConnAck(ack)) => assert!(
            !ack.session_present,
            "the session outlived its 2 s expiry across the crash"
        ),
        other => panic!("{other:?}"),
    }
}

/// A persistent 5.0 session connecting with `clean_start = false`.
fn connect_resuming(addr: std::net::SocketAddr, id: &str) -> (Raw, bool) {
    let mut raw = Raw::open(addr, Protocol::V5);
    let mut c = connect_packet(Protocol::V5, id);
    c.clean_start = false;
    c.properties.session_expiry_interval = Some(300);
    raw.send(&Packet::Connect(Box::new(c)));
    match raw.recv() {
        Some(Packet::ConnAck(ack)) => (raw, ack.session_present),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// Publishes at QoS 2 and completes the exchange.
fn publish_exactly_once(raw: &mut Raw, topic: &str, payload: &'static str, retain: bool) {
    raw.send(&Packet::Publish(Publish {
        qos: QoS::ExactlyOnce,
        packet_id: 7,
        retain,
        topic: s(topic),
        payload: Bytes::from_static(payload.as_bytes()),
        ..Publish::default()
    }));
    assert!(matches!(raw.recv(), Some(Packet::PubRec(_))));
    raw.send(&Packet::PubRel(PubAck::new(7)));
    assert!(matches!(raw.recv(), Some(Packet::PubComp(_))));
}

#[test]
fn a_qos2_packet_id_the_client_still_holds_is_not_reused_for_a_new_message_after_a_kill() {
    // A QoS 2 receiver keeps the id of a PUBLISH it answered PUBREC for
    // until the PUBREL comes, across reconnects, and takes any PUBLISH
    // with that id as the same message again. So a broker that comes back
    // from a kill must know every id its client may still hold: resend
    // the PUBREL, and give no new message that id.
    let data = tempfile::tempdir().unwrap();
    let broker = Broker::start_at(data.path(), "");
    let mut publisher = Raw::connect(broker.addr, Protocol::V5, "holds-pub");
    publish_exactly_once(&mut publisher, "held/retained", "old", true);
    let (mut sub, _) = connect_resuming(broker.addr, "holds-sub");
    sub.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        subscriptions: ["held/retained", "held/new"]
            .iter()
            .map(|f| Subscription {
                filter: s(f),
                options: SubscriptionOptions {
                    qos: QoS::ExactlyOnce,
                    ..Default::default()
                },
            })
            .collect(),
        properties: Default::default(),
    }));
    let mut held = None;
    while held.is_none() {
        match sub.recv() {
            Some(Packet::SubAck(_)) => {}
            Some(Packet::Publish(p)) => {
                assert_eq!(&p.payload[..], b"old");
                sub.send(&Packet::PubRec(PubAck::new(p.packet_id)));
                held = Some(p.packet_id);
            }
            other => panic!("expected SUBACK and the retained message, got {other:?}"),
        }
    }
    let held = held.unwrap();
    // The broker has the PUBREC; the client has not read the PUBREL yet
    // when the broker dies.
    std::thread::sleep(Duration::from_millis(300));
    broker.kill();
    drop(sub);

    let broker = Broker::start_at(data.path(), "");
    let (mut sub, present) = connect_resuming(broker.addr, "holds-sub");
    assert!(present, "the session survived the kill");
    let mut publisher = Raw::connect(broker.addr, Protocol::V5, "holds-pub");
    publish_exactly_once(&mut publisher, "held/new", "new", false);
    let mut holding = true;
    loop {
        match sub.recv_within(Duration::from_secs(5)) {
            Some(Packet::PubRel(rel)) => {
                if rel.packet_id == held {
                    holding = false;
                }
                sub.send(&Packet::PubComp(PubAck::new(rel.packet_id)));
            }
            Some(Packet::Publish(p)) if p.retain => {
                sub.send(&Packet::PubRec(PubAck::new(p.packet_id)));
            }
            Some(Packet::Publish(p)) => {
                assert_eq!(&p.payload[..], b"new");
                assert!(
                    !(holding && p.packet_id == held),
                    "the new message came with id {held}, which the client still holds \
                     for the retained message (no PUBREL came): it takes it as that \
                     message again, and the new one is lost"
                );
                assert!(
                    !holding,
                    "the resumed session owes the PUBREL of id {held} (the broker had \
                     its PUBREC before the kill), sent again on reconnect"
                );
                break;
            }
            other => panic!("expected the new message, got {other:?}"),
        }
    }
}
