//! A seeded torture test against the real binary, checked against a model
//! of what MQTT promises: clients in both protocol versions, with
//! persistent sessions and now and then a clean start (which discards the
//! session: nothing it was owed may arrive after) or a takeover by a
//! second connection, subscribe and unsubscribe (with wildcards), publish
//! at QoS 1 and 2 with and without retain, disconnect and come back, while
//! the broker is SIGKILLed and restarted at random points. At the end every
//! client drains its session, and the checker compares what each saw with
//! the model:
//!
//! - every acknowledged publish reaches every session whose subscriptions
//!   matched its topic when it was acknowledged (none lost across kills);
//! - nothing else is delivered live (nothing after an acknowledged
//!   unsubscribe, nothing for a topic no subscription matched);
//! - per publisher, each session sees the publisher's messages in the
//!   order they were published (the first delivery of each; QoS 1 may
//!   deliver again);
//! - a QoS 2 publish reaches a QoS 2 subscription exactly once (the
//!   client keeps the packet ids it answered PUBREC for until PUBREL, as
//!   the protocol asks of a receiver, across reconnects and kills);
//! - Session Present is set on every return, also after a kill;
//! - each client connects with a will: it is published when the
//!   connection drops without DISCONNECT (a watcher subscribed to `w/#`
//!   must get it), never after a DISCONNECT or a takeover that resumes
//!   the session, and at most once for a connection the broker's kill
//!   cut;
//! - the retained messages are the last acknowledged retained publish of
//!   each topic (a clear removes it).
//!
//! The broker is bridged to a real Mosquitto through a link that is cut
//! and restored at random (a generator of its own): every acknowledged
//! publish must reach the upstream, first arrivals in order per publisher.
//!
//! Two more clients are the members of one shared subscription group
//! (`$share/g/t/#`, persistent, QoS 2), with their own generator: they
//! drain now and then, are taken over, disconnect and return, and go
//! through the kills; every acknowledged publish must reach one of them,
//! a QoS 2 one exactly once.
//!
//! A failure prints the seed and the operations that explain it: those
//! of the clients it is about (the receiver, the publishers) and the kills
//! (`FERRYMQ_TORTURE_FULL_LOG=1`: every operation), and the failing
//! client's QoS 2 exchanges; the seed then becomes a case of
//! `REGRESSION_SEEDS`. `FERRYMQ_TORTURE_SEEDS=N` (and
//! `FERRYMQ_TORTURE_STEPS=M`) runs N seeds of M steps instead of the
//! short fixed run.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "../bridge/tests/common/mosquitto.rs"]
#[allow(dead_code)]
mod mosquitto;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::link::{Link, Mode};
use common::*;
use ferrymq_codec::{
    Packet, Protocol, PubAck, Publish, QoS, Subscribe, Subscription, SubscriptionOptions,
    Unsubscribe,
};

/// Seeds (and step counts) that found a bug, run every time. A change to
/// the generator changes what a seed does: then each bug is found again
/// with the new generator (by undoing its fix) and its seed replaced.
const REGRESSION_SEEDS: &[(u64, usize)] = &[
    // A QoS 2 message delivered twice: the broker sent PUBREL before the
    // release was durable, was killed, and sent the message again after
    // the client had completed the exchange (engine: `NEXT_WRITE`).
    // Seed 1 found it first; this one finds it with clean starts and
    // takeovers in the mix. Whether a kill lands in the window is timing:
    // with the fix undone it failed 1 run of 3; the engine's table tests
    // pin the rule itself.
    (1_796_515_265, 600),
];

const CLIENTS: usize = 10;
/// The shared subscription of the group members (every topic matches).
const GROUP_FILTER: &str = "$share/g/t/#";
const TOPICS: &[&str] = &["t/a", "t/b", "t/c/d"];
const FILTERS: &[&str] = &["t/a", "t/b", "t/+", "t/#", "t/c/+", "+/a"];

/// How long a drain waits for the next message before it calls the
/// session empty.
const QUIET: Duration = Duration::from_millis(150);

/// xorshift64*: small, seedable, the same everywhere.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Whether `filter` matches `topic` (the model's own, simple matcher).
fn matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A message as the model names it: (publisher, sequence number).
type MsgId = (usize, u32);

fn payload(id: MsgId) -> Bytes {
    Bytes::from(format!("{}:{}", id.0, id.1))
}

fn parse(payload: &[u8]) -> MsgId {
    let text = std::str::from_utf8(payload).unwrap();
    let (p, n) = text.split_once(':').unwrap();
    (p.parse().unwrap(), n.parse().unwrap())
}

/// One client of the test and what the model expects of it.
struct Client {
    index: usize,
    protocol: Protocol,
    conn: Option<Raw>,
    /// Whether the broker holds a session for it (it connected once).
    has_session: bool,
    /// Its acknowledged subscriptions.
    filters: BTreeSet<&'static str>,
    next_packet_id: u16,
    next_seq: u32,
    /// Messages it must get (acknowledged while a filter matched).
    expected: BTreeSet<MsgId>,
    /// Messages it got live (without the retain flag), in arrival order.
    received: Vec<MsgId>,
    /// The QoS of all its subscriptions (1 or 2).
    sub_qos: QoS,
    /// QoS 2 deliveries answered with PUBREC, waiting for PUBREL.
    awaiting_rel: BTreeSet<u16>,
    /// Its QoS 2 exchanges, for a failure's report.
    trace: Vec<String>,
    /// Whether its session outlives the connection.
    persistent: bool,
    /// The will of its current connection (`w/{index}`), if any.
    will: Option<MsgId>,
    /// Whether it connects with a will (every client but the watcher).
    with_will: bool,
    /// The watcher's: wills that must never be published.
    forbidden: BTreeSet<MsgId>,
}

impl Client {
    fn new(index: usize) -> Client {
        Client {
            index,
            protocol: if index.is_multiple_of(2) {
                Protocol::V5
            } else {
                Protocol::V311
            },
            conn: None,
            has_session: false,
            filters: BTreeSet::new(),
            next_packet_id: 0,
            next_seq: 0,
            expected: BTreeSet::new(),
            received: Vec::new(),
            sub_qos: if index.is_multiple_of(3) {
                QoS::AtLeastOnce
            } else {
                QoS::ExactlyOnce
            },
            awaiting_rel: BTreeSet::new(),
            trace: Vec::new(),
            persistent: true,
            will: None,
            with_will: true,
            forbidden: BTreeSet::new(),
        }
    }

    fn id(&self) -> String {
        format!("torture-{}", self.index)
    }

    /// Subscribes to `filter` at its QoS and waits for the SUBACK.
    fn subscribe(&mut self, filter: &'static str) -> Result<(), String> {
        let packet_id = self.packet_id();
        self.send(&Packet::Subscribe(Subscribe {
            packet_id,
            subscriptions: vec![Subscription {
                filter: s(filter),
                options: SubscriptionOptions {
                    qos: self.sub_qos,
                    ..SubscriptionOptions::default()
                },
            }],
            properties: Default::default(),
        }));
        match self.read_until(WAIT, |p| matches!(p, Packet::SubAck(_))) {
            Some(Packet::SubAck(ack)) if ack.reason_codes[0].0 <= 2 => {
                self.filters.insert(filter);
                Ok(())
            }
            other => Err(format!("SUBACK for {}: {other:?}", self.index)),
        }
    }

    /// Reads until `id` has arrived (at most `WAIT`).
    fn wait_for(&mut self, id: MsgId) -> bool {
        let deadline = std::time::Instant::now() + WAIT;
        while !self.received.contains(&id) {
            if std::time::Instant::now() > deadline {
                return false;
            }
            self.read_until(QUIET, |_| false);
        }
        true
    }

    /// Records that the will `id` must never be published.
    fn forbid(&mut self, id: Option<MsgId>) {
        if let Some(id) = id {
            self.forbidden.insert(id);
        }
    }

    fn send(&mut self, packet: &Packet) {
        self.conn.as_mut().unwrap().send(packet);
    }

    fn packet_id(&mut self) -> u16 {
        self.next_packet_id = self.next_packet_id % 60_000 + 1;
        self.next_packet_id
    }

    /// Connects, resuming its session or (`clean`) starting a new one,
    /// and checks Session Present. A clean start discards the session:
    /// its subscriptions, and what it had not received yet. In 5.0 the
    /// new session is persistent (Session Expiry); in 3.1.1 a clean
    /// session ends with its connection.
    fn connect(&mut self, broker: &Broker, clean: bool, log: &[String]) {
        let mut raw = Raw::open(broker.addr, self.protocol);
        let mut c = connect_packet(self.protocol, &self.id());
        c.clean_start = clean;
        if self.protocol == Protocol::V5 {
            c.properties.session_expiry_interval = Some(u32::MAX);
        }
        if clean {
            self.discard_session();
        }
        self.persistent = self.protocol == Protocol::V5 || !clean;
        self.will = None;
        if self.with_will {
            let id = (self.index, self.next_seq);
            self.next_seq += 1;
            c.will = Some(ferrymq_codec::Will {
                topic: s(&format!("w/{}", self.index)),
                payload: payload(id),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: Default::default(),
            });
            self.will = Some(id);
        }
        raw.send(&Packet::Connect(Box::new(c)));
        match raw.recv() {
            Some(Packet::ConnAck(ack)) => {
                assert_eq!(ack.reason_code.0, 0, "{}", log.join("\n"));
                assert_eq!(
                    ack.session_present,
                    self.has_session,
                    "client {}: Session Present\n{}",
                    self.index,
                    log.join("\n")
                );
            }
            other => panic!("client {}: expected CONNACK, got {other:?}", self.index),
        }
        self.has_session = true;
        self.trace.push(format!("CONNECT clean={clean}"));
        self.conn = Some(raw);
    }

    /// The session is gone (a clean start, or a non-persistent session
    /// that ended): no subscriptions, no QoS 2 state, and what it had not
    /// received is no longer owed.
    fn discard_session(&mut self) {
        self.has_session = false;
        self.filters.clear();
        self.awaiting_rel.clear();
        let got: BTreeSet<MsgId> = self.received.iter().copied().collect();
        self.expected.retain(|id| got.contains(id));
    }

    /// The connection ends (a DISCONNECT, a takeover's end, the broker's
    /// death): a non-persistent session ends with it.
    fn connection_ended(&mut self) {
        self.conn = None;
        if !self.persistent {
            self.discard_session();
        }
    }

    /// Takes one delivery (recorded and acknowledged) or the PUBREL of
    /// one (completed).
    fn take(&mut self, packet: Packet) {
        let conn = self.conn.as_mut().unwrap();
        let p = match packet {
            Packet::Publish(p) => p,
            Packet::PubRel(rel) => {
                self.trace.push(format!("PUBREL {}", rel.packet_id));
                self.awaiting_rel.remove(&rel.packet_id);
                conn.send(&Packet::PubComp(PubAck::new(rel.packet_id)));
                return;
            }
            other => panic!("client {}: unexpected {other:?}", self.index),
        };
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => conn.send(&Packet::PubAck(PubAck::new(p.packet_id))),
            QoS::ExactlyOnce => {
                self.trace.push(format!(
                    "PUBLISH {} dup={} {:?}",
                    p.packet_id,
                    p.dup,
                    parse(&p.payload)
                ));
                conn.send(&Packet::PubRec(PubAck::new(p.packet_id)));
                // Sent again before our PUBREC got through: the same
                // message, not a new one.
                if !self.awaiting_rel.insert(p.packet_id) {
                    return;
                }
            }
        }
        if !p.retain {
            self.received.push(parse(&p.payload));
        }
    }

    /// Reads deliveries until `until` returns true for a packet that is
    /// not a delivery (returned), or until the connection is quiet for
    /// `quiet` (`None`).
    fn read_until(&mut self, quiet: Duration, until: impl Fn(&Packet) -> bool) -> Option<Packet> {
        loop {
            let packet = self.conn.as_mut().unwrap().recv_or_silence(quiet)?;
            if until(&packet) {
                return Some(packet);
            }
            self.take(packet);
        }
    }

    /// Reads until the connection is quiet for `quiet`.
    fn drain(&mut self, quiet: Duration) {
        self.read_until(quiet, |_| false);
    }
}

/// What one run did, to print when it fails.
struct Run {
    seed: u64,
    log: Vec<String>,
}

impl Run {
    fn fail(&self, what: &str) -> ! {
        panic!(
            "torture seed {} failed: {what}\noperations:\n{}",
            self.seed,
            self.log.join("\n")
        );
    }

    /// Fails, printing only the operations of `clients` (the ones a
    /// violation is about: the receiver and the publishers) and the kills,
    /// which is what explains a violation; `FERRYMQ_TORTURE_FULL_LOG=1`
    /// prints every operation.
    fn fail_about(&self, what: &str, clients: impl IntoIterator<Item = usize>) -> ! {
        if std::env::var_os("FERRYMQ_TORTURE_FULL_LOG").is_some() {
            self.fail(what);
        }
        let clients: BTreeSet<String> = clients.into_iter().map(|c| c.to_string()).collect();
        let relevant: Vec<&str> = self
            .log
            .iter()
            .map(String::as_str)
            .filter(|line| {
                let body = line.split_once(": ").map_or(*line, |(_, b)| b);
                body.contains("SIGKILL")
                    || body
                        .split(|ch: char| !ch.is_ascii_digit())
                        .any(|token| clients.contains(token))
            })
            .collect();
        panic!(
            "torture seed {} failed: {what}\noperations of clients {clients:?} and the kills \
             ({} of {}; FERRYMQ_TORTURE_FULL_LOG=1 prints all):\n{}",
            self.seed,
            relevant.len(),
            self.log.len(),
            relevant.join("\n")
        );
    }
}

/// The log's note of the will a connection was made with.
fn will_note(client: &Client) -> String {
    client
        .will
        .map(|(c, n)| format!(" (will {c}:{n})"))
        .unwrap_or_default()
}

/// The broker, bridged through `link` to the upstream: `t/#` goes up as
/// `up/t/#`.
fn start(data: &Path, link: &Link) -> Broker {
    Broker::start_at(
        data,
        &format!(
            "[storage]\nmax_queued_messages = 100000\n\
             [[bridge]]\nname = \"up\"\naddresses = [\"{}\"]\nkeepalive_secs = 2\n\
             connect_timeout_secs = 2\nreconnect_min_ms = 50\nreconnect_max_ms = 300\n\
             [[bridge.forward]]\nfilter = \"t/#\"\nremote_prefix = \"up/\"\nqos = 1\n",
            link.addr()
        ),
    )
}

/// The upstream's subscriber to everything the bridge brings (`up/#`),
/// in a thread until `stop`: the ids in arrival order.
fn observe(upstream: std::net::SocketAddr, stop: Arc<AtomicBool>) -> Arc<Mutex<Vec<MsgId>>> {
    let seen: Arc<Mutex<Vec<MsgId>>> = Arc::default();
    let mut raw = Raw::connect(upstream, Protocol::V311, "torture-upstream");
    raw.send(&subscribe_qos1("up/#"));
    assert!(matches!(raw.recv(), Some(Packet::SubAck(_))));
    let out = seen.clone();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match raw.poll_for(Duration::from_millis(100)) {
                Polled::Packet(Packet::Publish(p)) => {
                    if p.qos != QoS::AtMostOnce {
                        raw.send(&Packet::PubAck(PubAck::new(p.packet_id)));
                    }
                    out.lock().unwrap().push(parse(&p.payload));
                }
                Polled::Closed => return,
                _ => {}
            }
        }
    });
    seen
}

/// The bridge's promise: every acknowledged publish reached the upstream
/// (at least once: the uplink is plain MQTT), first arrivals in publish
/// order per publisher, however often the link was cut and the broker
/// killed. Waits (at most 20 s) for the backlog to drain.
fn check_upstream(seen: &Mutex<Vec<MsgId>>, expected: &BTreeSet<MsgId>, run: &Run) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let missing = loop {
        let got: BTreeSet<MsgId> = seen.lock().unwrap().iter().copied().collect();
        let missing: Vec<MsgId> = expected.difference(&got).copied().collect();
        if missing.is_empty() || std::time::Instant::now() > deadline {
            break missing;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if !missing.is_empty() {
        run.fail_about(
            &format!(
                "the upstream lost {} acknowledged messages: {missing:?}",
                missing.len()
            ),
            missing.iter().map(|id| id.0),
        );
    }
    let mut last: HashMap<usize, u32> = HashMap::new();
    let mut first = BTreeSet::new();
    for &(publisher, n) in seen.lock().unwrap().iter() {
        if !first.insert((publisher, n)) {
            continue;
        }
        if let Some(&before) = last.get(&publisher)
            && n < before
        {
            run.fail_about(
                &format!("the upstream got {publisher}:{n} after {publisher}:{before}"),
                [publisher],
            );
        }
        last.insert(publisher, n);
    }
}

fn run(seed: u64, steps: usize) {
    let mut rng = Rng::new(seed);
    let data = tempfile::tempdir().unwrap();
    // The upstream, through a link that is cut now and then.
    let upstream = mosquitto::Mosquitto::start("max_queued_messages 100000");
    let stop_observer = Arc::new(AtomicBool::new(false));
    let upstream_seen = observe(upstream.addr(), stop_observer.clone());
    let link = Link::new(upstream.addr(), Mode::Pass);
    let mut link_up = true;
    let mut link_rng = Rng::new(seed ^ 0x1F4C_0000_0001);
    let mut broker = start(data.path(), &link);
    let mut run = Run {
        seed,
        log: Vec::new(),
    };
    let mut clients: Vec<Client> = (0..CLIENTS).map(Client::new).collect();
    // Subscribed to every will (`w/#`), connected throughout.
    let mut watcher = Client::new(CLIENTS);
    watcher.protocol = Protocol::V5;
    watcher.sub_qos = QoS::AtLeastOnce;
    watcher.with_will = false;
    watcher.connect(&broker, false, &run.log);
    watcher.subscribe("w/#").unwrap();
    // Two members of one shared subscription group (persistent, 5.0 and
    // 3.1.1, QoS 2), driven by a generator of their own so that the
    // others' operations stay what a seed made them before.
    let mut members: Vec<Client> = (CLIENTS + 1..CLIENTS + 3).map(Client::new).collect();
    let mut group_rng = Rng::new(seed ^ 0x0060_0EF5_5EED);
    for member in &mut members {
        member.with_will = false;
        member.sub_qos = QoS::ExactlyOnce;
        member.connect(&broker, false, &run.log);
        member.subscribe(GROUP_FILTER).unwrap();
    }
    // Every acknowledged publish: one of the members must get it.
    let mut group_expected: BTreeSet<MsgId> = BTreeSet::new();
    // Wills that must be published, and those that may be (once).
    let mut maybe_wills: BTreeSet<MsgId> = BTreeSet::new();
    // The retained message the model expects per topic.
    let mut retained: BTreeMap<&str, MsgId> = BTreeMap::new();
    // The messages published at QoS 2.
    let mut exactly_once: BTreeSet<MsgId> = BTreeSet::new();
    for step in 0..steps {
        group_step(&mut members, &mut group_rng, &broker, step, &mut run);
        if link_rng.below(100) < 3 {
            link_up = !link_up;
            link.set(if link_up { Mode::Pass } else { Mode::Down });
            run.log.push(format!(
                "{step}: link {}",
                if link_up { "restored" } else { "cut" }
            ));
        }
        let c = rng.below(CLIENTS);
        let op = rng.below(100);
        if clients[c].conn.is_none() && op < 90 {
            let clean = rng.below(8) == 0;
            run.log.push(format!("{step}: connect {c} clean={clean}"));
            clients[c].connect(&broker, clean, &run.log);
            run.log
                .last_mut()
                .unwrap()
                .push_str(&will_note(&clients[c]));
            continue;
        }
        match op {
            0..25 => {
                let filter = FILTERS[rng.below(FILTERS.len())];
                run.log.push(format!("{step}: {c} subscribe {filter}"));
                if let Err(e) = clients[c].subscribe(filter) {
                    run.fail(&e);
                }
            }
            25..35 => {
                let Some(&filter) = clients[c]
                    .filters
                    .iter()
                    .nth(rng.below(clients[c].filters.len().max(1)))
                else {
                    continue;
                };
                run.log.push(format!("{step}: {c} unsubscribe {filter}"));
                let client = &mut clients[c];
                let packet_id = client.packet_id();
                client.send(&Packet::Unsubscribe(Unsubscribe {
                    packet_id,
                    filters: vec![s(filter)],
                    properties: Default::default(),
                }));
                if client
                    .read_until(WAIT, |p| matches!(p, Packet::UnsubAck(_)))
                    .is_none()
                {
                    run.fail(&format!("no UNSUBACK for {c}"));
                }
                client.filters.remove(filter);
            }
            35..80 => {
                let topic = TOPICS[rng.below(TOPICS.len())];
                let retain = rng.below(5) == 0;
                let qos = if rng.below(2) == 0 {
                    QoS::AtLeastOnce
                } else {
                    QoS::ExactlyOnce
                };
                let id = (c, clients[c].next_seq);
                clients[c].next_seq += 1;
                run.log.push(format!(
                    "{step}: {c} publish {id:?} on {topic} {qos:?} retain={retain}"
                ));
                if qos == QoS::ExactlyOnce {
                    exactly_once.insert(id);
                }
                let client = &mut clients[c];
                let packet_id = client.packet_id();
                client.send(&Packet::Publish(Publish {
                    qos,
                    packet_id,
                    retain,
                    topic: s(topic),
                    payload: payload(id),
                    ..Publish::default()
                }));
                let acked = |p: &Packet| match p {
                    Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubComp(a) => {
                        a.packet_id == packet_id
                    }
                    _ => false,
                };
                match client.read_until(WAIT, acked) {
                    Some(Packet::PubAck(ack) | Packet::PubRec(ack)) if ack.reason_code.0 < 0x80 => {
                    }
                    other => run.fail(&format!("acknowledgement of {id:?}: {other:?}")),
                }
                if qos == QoS::ExactlyOnce {
                    client.send(&Packet::PubRel(PubAck::new(packet_id)));
                    match client.read_until(WAIT, acked) {
                        Some(Packet::PubComp(_)) => {}
                        other => run.fail(&format!("PUBCOMP of {id:?}: {other:?}")),
                    }
                }
                // Acknowledged: every session subscribed now must get it,
                // and one member of the group.
                group_expected.insert(id);
                for other in clients.iter_mut() {
                    if other.filters.iter().any(|f| matches(f, topic)) {
                        other.expected.insert(id);
                    }
                }
                if retain {
                    retained.insert(topic, id);
                }
            }
            80..90 => {
                run.log.push(format!("{step}: {c} drains"));
                clients[c].drain(QUIET);
            }
            90..93 if clients[c].persistent => {
                // A second connection with the same client id takes the
                // session over; the first is closed.
                run.log.push(format!("{step}: {c} is taken over"));
                let old = clients[c].conn.take();
                // The session is resumed: the old connection's will is not
                // published.
                let will = clients[c].will.filter(|_| old.is_some());
                clients[c].connect(&broker, false, &run.log);
                run.log
                    .last_mut()
                    .unwrap()
                    .push_str(&will_note(&clients[c]));
                drop(old);
                watcher.forbid(will);
            }
            90..96 => {
                // Decided without the generator, so that a seed's
                // operations stay what they were before wills existed.
                let abnormal = step % 2 == 1;
                let Some(mut raw) = clients[c].conn.take() else {
                    continue;
                };
                run.log
                    .push(format!("{step}: {c} disconnects (abnormal={abnormal})"));
                if !abnormal {
                    raw.send(&Packet::Disconnect(Default::default()));
                }
                // What arrived before was acknowledged already or comes
                // again on return.
                drop(raw);
                let will = clients[c].will.take();
                clients[c].connection_ended();
                if abnormal {
                    let will = will.unwrap();
                    watcher.expected.insert(will);
                    if !watcher.wait_for(will) {
                        run.fail(&format!("the will {will:?} of {c} never came"));
                    }
                } else {
                    watcher.forbid(will);
                }
            }
            _ => {
                run.log.push(format!("{step}: SIGKILL and restart"));
                broker.kill();
                broker = start(data.path(), &link);
                for client in &mut clients {
                    // The broker died with the connection: its will may
                    // come (once) or not.
                    if client.conn.is_some() {
                        maybe_wills.extend(client.will.take());
                    }
                    client.connection_ended();
                }
                watcher.connection_ended();
                watcher.connect(&broker, false, &run.log);
                for member in &mut members {
                    member.connection_ended();
                }
            }
        }
    }
    // Everyone comes back and drains its session.
    run.log.push("end: every client returns and drains".into());
    for client in &mut clients {
        if client.conn.is_none() {
            client.connect(&broker, false, &run.log);
        }
        // Longer: a backlog after a restart is paged in from disk.
        client.drain(QUIET * 4);
    }
    watcher.drain(QUIET * 4);
    for member in &mut members {
        if member.conn.is_none() {
            member.connect(&broker, false, &run.log);
        }
        member.drain(QUIET * 4);
    }
    check_group(&members, &group_expected, &exactly_once, &run);
    // Every acknowledged publish matched the bridge's `t/#`.
    link.set(Mode::Pass);
    check_upstream(&upstream_seen, &group_expected, &run);
    stop_observer.store(true, Ordering::Relaxed);
    let wills: BTreeSet<MsgId> = watcher.received.iter().copied().collect();
    let missing: Vec<&MsgId> = watcher.expected.difference(&wills).collect();
    let unexpected: Vec<&MsgId> = wills
        .iter()
        .filter(|w| !watcher.expected.contains(w) && !maybe_wills.contains(w))
        .collect();
    let forbidden: Vec<&MsgId> = wills.intersection(&watcher.forbidden).collect();
    if !missing.is_empty() || !unexpected.is_empty() || !forbidden.is_empty() {
        let whose: Vec<usize> = missing
            .iter()
            .chain(&unexpected)
            .chain(&forbidden)
            .map(|w| w.0)
            .collect();
        run.fail_about(
            &format!(
                "wills: missing {missing:?}, published without cause {unexpected:?}, \
                 published after a DISCONNECT or a resumed takeover {forbidden:?}"
            ),
            whose,
        );
    }
    for client in &clients {
        let got: BTreeSet<MsgId> = client.received.iter().copied().collect();
        let lost: Vec<&MsgId> = client.expected.difference(&got).collect();
        if !lost.is_empty() {
            run.fail_about(
                &format!(
                    "client {} lost {} acknowledged messages: {lost:?}",
                    client.index,
                    lost.len()
                ),
                lost.iter().map(|id| id.0).chain([client.index]),
            );
        }
        let extra: Vec<&MsgId> = got.difference(&client.expected).collect();
        if !extra.is_empty() {
            run.fail_about(
                &format!(
                    "client {} got messages no subscription of it matched: {extra:?}",
                    client.index
                ),
                extra.iter().map(|id| id.0).chain([client.index]),
            );
        }
        if client.sub_qos == QoS::ExactlyOnce {
            let mut counts: HashMap<MsgId, usize> = HashMap::new();
            for id in client
                .received
                .iter()
                .filter(|id| exactly_once.contains(id))
            {
                *counts.entry(*id).or_default() += 1;
            }
            if let Some((id, n)) = counts.iter().find(|(_, n)| **n > 1) {
                run.fail_about(
                    &format!(
                        "client {} got the QoS 2 message {id:?} {n} times; its QoS 2 \
                         exchanges:\n{}",
                        client.index,
                        client.trace.join("\n")
                    ),
                    [id.0, client.index],
                );
            }
        }
        let mut last: HashMap<usize, u32> = HashMap::new();
        let mut seen = BTreeSet::new();
        for &(publisher, n) in &client.received {
            if !seen.insert((publisher, n)) {
                continue;
            }
            if let Some(&before) = last.get(&publisher)
                && n < before
            {
                run.fail_about(
                    &format!(
                        "client {} got {publisher}:{n} after {publisher}:{before}",
                        client.index
                    ),
                    [publisher, client.index],
                );
            }
            last.insert(publisher, n);
        }
    }
    // Retained: a new subscriber to everything gets exactly the model's.
    let mut probe = Raw::connect(broker.addr, Protocol::V5, "torture-probe");
    probe.send(&subscribe_qos1("#"));
    let mut got = BTreeMap::new();
    loop {
        match probe.recv_or_silence(QUIET * 2) {
            Some(Packet::SubAck(_)) => {}
            Some(Packet::Publish(p)) => {
                assert!(p.retain);
                probe.send(&Packet::PubAck(PubAck::new(p.packet_id)));
                got.insert(p.topic.to_string(), parse(&p.payload));
            }
            None => break,
            Some(other) => run.fail(&format!("probe got {other:?}")),
        }
    }
    let want: BTreeMap<String, MsgId> = retained
        .iter()
        .map(|(t, id)| ((*t).to_owned(), *id))
        .collect();
    if got != want {
        run.fail(&format!("retained: got {got:?}, want {want:?}"));
    }
    let delivered: usize = clients.iter().map(|c| c.expected.len()).sum();
    let kills = run.log.iter().filter(|l| l.contains("SIGKILL")).count();
    let cuts = run.log.iter().filter(|l| l.contains("link cut")).count();
    let upstream_arrivals = upstream_seen.lock().unwrap().len();
    eprintln!(
        "torture seed {seed}: {steps} steps, {kills} kills, {delivered} deliveries checked, \
         {} for the shared group and the upstream ({upstream_arrivals} arrivals there, \
         {cuts} link cuts), {} wills that had to come, {} that must not",
        group_expected.len(),
        watcher.expected.len(),
        watcher.forbidden.len()
    );
}

/// One step of the group members: a reconnect after a kill, or now and
/// then a drain, a takeover, or a normal or abnormal disconnect (and a
/// return at their next step).
fn group_step(members: &mut [Client], rng: &mut Rng, broker: &Broker, step: usize, run: &mut Run) {
    let m = rng.below(members.len());
    let member = &mut members[m];
    let index = member.index;
    if member.conn.is_none() {
        run.log.push(format!("{step}: member {index} connects"));
        member.connect(broker, false, &run.log);
        return;
    }
    match rng.below(100) {
        0..10 => {
            // Short: what is left comes at the next drain, or at the end.
            run.log.push(format!("{step}: member {index} drains"));
            member.drain(QUIET / 3);
        }
        10..13 => {
            run.log
                .push(format!("{step}: member {index} is taken over"));
            let old = member.conn.take();
            member.connect(broker, false, &run.log);
            drop(old);
        }
        13..16 => {
            let abnormal = step % 2 == 1;
            run.log.push(format!(
                "{step}: member {index} disconnects (abnormal={abnormal})"
            ));
            let mut raw = member.conn.take().unwrap();
            if !abnormal {
                raw.send(&Packet::Disconnect(Default::default()));
            }
            drop(raw);
            member.connection_ended();
        }
        _ => {}
    }
}

/// The shared group's promise: every acknowledged publish reached one of
/// its members (the group's queue is stored, so none is lost across
/// kills, takeovers and members away), and a QoS 2 one exactly one of
/// them once.
fn check_group(
    members: &[Client],
    expected: &BTreeSet<MsgId>,
    exactly_once: &BTreeSet<MsgId>,
    run: &Run,
) {
    let mut counts: HashMap<MsgId, usize> = HashMap::new();
    for member in members {
        for id in &member.received {
            *counts.entry(*id).or_default() += 1;
        }
    }
    let lost: Vec<&MsgId> = expected
        .iter()
        .filter(|id| !counts.contains_key(id))
        .collect();
    let members_and = |ids: &[&MsgId]| -> Vec<usize> {
        members
            .iter()
            .map(|m| m.index)
            .chain(ids.iter().map(|id| id.0))
            .collect()
    };
    if !lost.is_empty() {
        run.fail_about(
            &format!(
                "the shared group lost {} acknowledged messages: {lost:?}",
                lost.len()
            ),
            members_and(&lost),
        );
    }
    if let Some((id, n)) = counts
        .iter()
        .find(|(id, n)| **n > 1 && exactly_once.contains(id))
    {
        run.fail_about(
            &format!("the shared group got the QoS 2 message {id:?} {n} times"),
            members_and(&[id]),
        );
    }
    let unknown: Vec<&MsgId> = counts.keys().filter(|id| !expected.contains(id)).collect();
    if !unknown.is_empty() {
        run.fail_about(
            &format!("the shared group got messages never published: {unknown:?}"),
            members_and(&unknown),
        );
    }
}

#[test]
fn random_operations_with_kills_keep_every_promise() {
    let seeds: u64 = std::env::var("FERRYMQ_TORTURE_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let steps: usize = std::env::var("FERRYMQ_TORTURE_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    for &(seed, steps) in REGRESSION_SEEDS {
        run(seed, steps);
    }
    if seeds == 0 {
        // The short run of CI: fixed seeds.
        run(1, steps);
        run(2, steps);
    } else {
        let base = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        for i in 0..seeds {
            run(base.wrapping_add(i), steps);
        }
    }
}

#[test]
fn a_failure_prints_the_operations_of_the_clients_it_is_about_and_the_kills() {
    let run = Run {
        seed: 7,
        log: vec![
            "0: connect 1 clean=false (will 1:0)".into(),
            "1: connect 2 clean=false (will 2:0)".into(),
            "2: 2 publish (2, 1) on t/a AtLeastOnce retain=false".into(),
            "3: 11 drains".into(),
            "4: SIGKILL and restart".into(),
            "5: 1 subscribe t/#".into(),
        ],
    };
    let failed = std::panic::catch_unwind(|| run.fail_about("client 1 lost (2, 1)", [1, 2]));
    let message = *failed.unwrap_err().downcast::<String>().unwrap();
    let printed: Vec<&str> = message.lines().skip(2).collect();
    assert_eq!(
        printed,
        [
            "0: connect 1 clean=false (will 1:0)",
            "1: connect 2 clean=false (will 2:0)",
            "2: 2 publish (2, 1) on t/a AtLeastOnce retain=false",
            "4: SIGKILL and restart",
            "5: 1 subscribe t/#",
        ]
    );
}
