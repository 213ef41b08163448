//! The disk budget and a full disk: the broker refuses what it cannot
//! store (with a reason code), keeps serving, recovers when space
//! returns, and loses nothing it acknowledged.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use ferrymq_codec::{
    Disconnect, Packet, Protocol, PubAck, Publish, QoS, ReasonCode, Subscribe, Subscription,
    SubscriptionOptions,
};

fn offline_subscriber(addr: std::net::SocketAddr) {
    let mut raw = Raw::open(addr, Protocol::V311);
    let mut c = connect_packet(Protocol::V311, "disk-sub");
    c.clean_start = false;
    raw.send(&Packet::Connect(Box::new(c)));
    assert!(matches!(raw.recv(), Some(Packet::ConnAck(_))));
    raw.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        subscriptions: vec![Subscription {
            filter: s("disk/#"),
            options: SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                ..Default::default()
            },
        }],
        properties: Default::default(),
    }));
    assert!(matches!(raw.recv(), Some(Packet::SubAck(_))));
    raw.send(&Packet::Disconnect(Disconnect::default()));
    raw.until_closed();
}

/// Publishes one QoS 1 message of `size` bytes numbered `n` on
/// `disk/data`; returns the PUBACK's reason code.
fn publish(raw: &mut Raw, n: u32, size: usize) -> ReasonCode {
    publish_to(raw, "disk/data", n, size)
}

/// [`publish`] on `topic`.
fn publish_to(raw: &mut Raw, topic: &str, n: u32, size: usize) -> ReasonCode {
    // Incompressible (the store compresses): xorshift noise after the number.
    let mut payload = n.to_string().into_bytes();
    payload.push(b':');
    let mut x = u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while payload.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        payload.extend_from_slice(&x.to_le_bytes());
    }
    payload.truncate(size);
    let id = (n % 60_000) as u16 + 1;
    raw.send(&Packet::Publish(Publish {
        qos: QoS::AtLeastOnce,
        packet_id: id,
        topic: s(topic),
        payload: Bytes::from(payload),
        ..Publish::default()
    }));
    match raw.recv() {
        Some(Packet::PubAck(ack)) if ack.packet_id == id => ack.reason_code,
        other => panic!("expected PUBACK {id}, got {other:?}"),
    }
}

/// Every message numbered in `acked` reaches the persistent subscriber.
fn all_delivered(addr: std::net::SocketAddr, acked: &BTreeSet<u32>) {
    let mut sub = Raw::open(addr, Protocol::V311);
    let mut c = connect_packet(Protocol::V311, "disk-sub");
    c.clean_start = false;
    sub.send(&Packet::Connect(Box::new(c)));
    assert!(matches!(sub.recv(), Some(Packet::ConnAck(a)) if a.session_present));
    let mut missing = acked.clone();
    while !missing.is_empty() {
        match sub.recv_or_silence(Duration::from_secs(5)) {
            Some(Packet::Publish(p)) => {
                let n: u32 = std::str::from_utf8(
                    &p.payload[..p.payload.iter().position(|b| *b == b':').unwrap()],
                )
                .unwrap()
                .parse()
                .unwrap();
                missing.remove(&n);
                sub.send(&Packet::PubAck(PubAck::new(p.packet_id)));
            }
            other => panic!(
                "{} acknowledged messages missing ({other:?})",
                missing.len()
            ),
        }
    }
}

#[test]
fn the_disk_budget_refuses_new_messages_under_refuse() {
    let data = tempfile::tempdir().unwrap();
    let config = "[storage]\nmax_disk_bytes = \"16MiB\"\nqueue_full = \"refuse\"\nmax_queued_bytes = \"1GiB\"\nmax_queued_messages = 1000000";
    let broker = Broker::start_at(data.path(), config);
    offline_subscriber(broker.addr);
    let mut publisher = Raw::connect(broker.addr, Protocol::V5, "disk-pub");
    let mut acked = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    loop {
        assert!(
            Instant::now() < deadline,
            "the budget never applied ({} acknowledged)",
            acked.len()
        );
        match publish(&mut publisher, n, 64 * 1024) {
            ReasonCode::SUCCESS => {
                acked.insert(n);
            }
            ReasonCode::QUOTA_EXCEEDED => break,
            other => panic!("unexpected reason {other:?}"),
        }
        n += 1;
    }
    assert!(
        acked.len() > 100,
        "refused after only {} messages",
        acked.len()
    );
    broker.wait_for_log("disk budget reached", WAIT);
    // Still serving: a message nobody stores goes through.
    let mut other = Raw::connect(broker.addr, Protocol::V5, "disk-other");
    other.send(&Packet::PingReq);
    assert_eq!(other.recv(), Some(Packet::PingResp));
    all_delivered(broker.addr, &acked);
}

/// Publishes 64 KiB messages on `topic` until one is refused (0x97);
/// returns how many were acknowledged.
fn fill(raw: &mut Raw, topic: &str, first: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = first;
    loop {
        assert!(Instant::now() < deadline, "{topic}: never refused");
        match publish_to(raw, topic, n, 64 * 1024) {
            ReasonCode::SUCCESS => n += 1,
            ReasonCode::QUOTA_EXCEEDED => return n - first,
            other => panic!("unexpected reason {other:?}"),
        }
    }
}

#[test]
fn the_bridges_reserve_holds_while_a_persistent_client_fills_the_rest() {
    // Half of 96 MiB: the store's files grow in steps of up to a memtable
    // (16 MiB) as it is flushed beside its log, so the reserve must be
    // several steps wide to be seen.
    for reserve in [50, 0] {
        let data = tempfile::tempdir().unwrap();
        let config = format!(
            "[storage]\nmax_disk_bytes = \"96MiB\"\nqueue_full = \"refuse\"\n\
             max_queued_bytes = \"1GiB\"\nmax_queued_messages = 1000000\n\
             bridge_reserve_percent = {reserve}\n\
             [[bridge]]\nname = \"up\"\naddresses = [\"127.0.0.1:{}\"]\n\
             [[bridge.forward]]\nfilter = \"uplink/#\"\n",
            free_port()
        );
        let broker = Broker::start_at(data.path(), &config);
        // A persistent client that never comes back fills what it may.
        offline_subscriber(broker.addr);
        let mut publisher = Raw::connect(broker.addr, Protocol::V5, "disk-pub");
        let client = fill(&mut publisher, "disk/data", 0);
        // The bridge's queue still takes messages, in the reserve only.
        let bridge = fill(&mut publisher, "uplink/data", 100_000);
        eprintln!("reserve {reserve} %: client {client}, then bridge {bridge} messages of 64 KiB");
        if reserve == 0 {
            assert_eq!(bridge, 0, "no reserve: the bridge is refused as soon");
        } else {
            assert!(
                client > 100 && bridge >= 50,
                "reserve {reserve}: client {client}, bridge {bridge}"
            );
            broker.wait_for_log("outside the bridges' reserve", WAIT);
            // And the client still gets nothing more.
            assert_eq!(
                publish_to(&mut publisher, "disk/data", 1_000_000, 1024),
                ReasonCode::QUOTA_EXCEEDED
            );
        }
    }
}

/// A small tmpfs for the data directory, unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size_mib: u32) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "this test mounts a small tmpfs to fill a disk for real: it needs root (CAP_SYS_ADMIN), as CI has"
        );
        SmallDisk { dir }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn free_bytes(path: &std::path::Path) -> u64 {
    let out = Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn a_full_disk_refuses_with_0x97_keeps_serving_and_recovers_when_space_returns() {
    // 256 MiB: the store keeps 48 MiB of headroom free on a filesystem
    // this size, so about 32 MiB of messages fit after the ballast.
    let disk = SmallDisk::mount(256);
    let data = disk.dir.path().join("data");
    let config = "[storage]\nmax_queued_bytes = \"1GiB\"\nmax_queued_messages = 1000000";
    let broker = Broker::start_at(&data, config);
    offline_subscriber(broker.addr);
    // Leave about 80 MiB; messages fill it until the headroom is reached
    // (or, if they outrun the once-a-second space check, until writes fail
    // for real: either way they are refused, never acknowledged).
    let ballast = disk.dir.path().join("ballast");
    let fill = free_bytes(disk.dir.path()).saturating_sub(80 << 20);
    std::fs::write(&ballast, vec![0u8; fill as usize]).unwrap();

    let mut publisher = Raw::connect(broker.addr, Protocol::V5, "full-pub");
    let mut acked = BTreeSet::new();
    let mut n = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            Instant::now() < deadline,
            "never refused ({} acknowledged)",
            acked.len()
        );
        match publish(&mut publisher, n, 64 * 1024) {
            ReasonCode::SUCCESS => {
                acked.insert(n);
            }
            ReasonCode::QUOTA_EXCEEDED => break,
            other => panic!("unexpected reason {other:?}"),
        }
        n += 1;
    }
    assert!(!acked.is_empty());
    broker.wait_for_log("refusing new", WAIT);
    // Still serving.
    publisher.send(&Packet::PingReq);
    assert_eq!(publisher.recv(), Some(Packet::PingResp));
    // Space returns: publishes are accepted again.
    std::fs::remove_file(&ballast).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        n += 1;
        if publish(&mut publisher, n, 1024) == ReasonCode::SUCCESS {
            acked.insert(n);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the broker never recovered after space returned"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    all_delivered(broker.addr, &acked);
}
