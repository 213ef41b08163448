//! Entry points for the fuzz targets (`fuzz/`, feature `fuzzing`) and
//! the property tests that run the same drivers in every test run: the
//! session engine driven through packet sequences as a connection would
//! drive it, with its invariants checked after every step.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use ferrymq_codec::{
    MqttString, Packet, Protocol, PubAck, Publish, PublishProperties, QoS, ReasonCode,
};
use ferrymq_config::QueueFull;

use crate::engine::{Delivered, Engine, EngineLimits, InboundPublish, RouteOutcome};
use crate::message::{Message, SessionId};
use crate::outbox::{Delivery, Outbox, QueueLimits};
use crate::session::{Inflight, SessionState};
use crate::storage::{Durable, StoreOp, Ticket};

/// An engine for session 9 (Receive Maximum 2 both ways, packets up to
/// 200 bytes, 3 topic levels), persistent or not.
pub(crate) fn engine(protocol: Protocol, persistent: bool) -> Engine {
    let outbox = Outbox::new(
        9,
        QueueLimits {
            max_messages: 100,
            max_bytes: 1 << 20,
            policy: QueueFull::DropOldest,
            queue_qos0: false,
        },
        1,
    );
    let mut state = SessionState::new(MqttString::from_static("c"), 9, outbox);
    if persistent {
        state.set_expiry(Duration::from_secs(60));
    }
    Engine::new(
        protocol,
        state,
        EngineLimits {
            receive_maximum: 2,
            client_receive_maximum: 2,
            client_max_packet: 200,
            retain_available: true,
            topic_alias_maximum: 4,
            client_topic_aliases: 0,
            problem_information: true,
            max_topic_levels: 3,
            message_ids: None,
            volatile_inflight: false,
        },
    )
}

/// A PUBLISH of one byte on `t`.
pub(crate) fn publish(qos: QoS, packet_id: u16) -> Publish {
    Publish {
        qos,
        packet_id,
        topic: MqttString::from_static("t"),
        payload: Bytes::from_static(b"p"),
        ..Publish::default()
    }
}

/// A delivery of a one-byte message on `d` from queue 9.
pub(crate) fn delivery(qos: QoS, seq: u64, stored: bool) -> Delivery {
    Delivery {
        message: Arc::new(Message {
            topic: MqttString::from_static("d"),
            payload: Bytes::from_static(b"x"),
            qos,
            retain: false,
            properties: PublishProperties::default(),
            origin: SessionId(1),
            expires_at: None,
            holders: Default::default(),
        }),
        qos,
        retain: false,
        seq,
        queue: 9,
        ticket: 0,
        stored,
        identifiers: None,
        group: None,
        queued_ms: 0,
    }
}

/// Drives one engine through the packet sequence `bytes` describes
/// (three bytes an operation), as a connection would (reading only
/// while it wants input, sending only within the window, writing the
/// turn's ops and reporting the ticket), and checks after each step:
/// in-flight within the client's Receive Maximum, inbound within ours,
/// no packet id reused while in flight, resends only of what is in
/// flight, and a PUBREL or PUBCOMP only once the write recording it
/// is durable.
pub fn engine_sequence(protocol: Protocol, persistent: bool, bytes: &[u8]) {
    let mut driver = Driver::new(protocol, persistent);
    for op in bytes.chunks_exact(3) {
        driver.step(op[0] % 9, op[1], op[2]);
        driver.check_bounds();
    }
}

/// One engine and what [`engine_sequence`] tracks beside it: the ops of
/// the turn not yet written, the tickets written and durable, and the
/// releases and completions owed.
struct Driver {
    protocol: Protocol,
    persistent: bool,
    engine: Engine,
    /// Store ops of the turn, not written yet.
    ops: Vec<StoreOp>,
    /// Packets the engine sent at once.
    out: Vec<Packet>,
    /// The last ticket handed out, and the highest one durable.
    last_ticket: Ticket,
    durable: Ticket,
    /// The queue sequence of the last delivery.
    seq: u64,
    /// PUBRELs (true) and successful PUBCOMPs (false) owed, by packet
    /// id, oldest first: the ticket of their write once made.
    held: HashMap<(bool, u16), VecDeque<Option<Ticket>>>,
}

impl Driver {
    /// A driver of a new [`engine`] with nothing written yet.
    fn new(protocol: Protocol, persistent: bool) -> Driver {
        Driver {
            protocol,
            persistent,
            engine: engine(protocol, persistent),
            ops: Vec::new(),
            out: Vec::new(),
            last_ticket: 0,
            durable: 0,
            seq: 100,
            held: HashMap::new(),
        }
    }

    /// Runs operation `kind` (0 to 8) with its two argument bytes: `a`
    /// picks the QoS and the flags, `b` the packet id (1 to 4).
    fn step(&mut self, kind: u8, a: u8, b: u8) {
        let id = u16::from(b % 4) + 1;
        let qos = match a % 3 {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        };
        match kind {
            0 if self.engine.wants_input() => self.publish_in(qos, id, a),
            1 => self.engine.puback(id, &mut self.ops),
            2 => self.pubrec(id, a),
            3 => self.pubrel(id),
            4 => self.engine.pubcomp(id, &mut self.ops),
            5 if self.engine.can_send(qos) => self.deliver(qos, a),
            6 if !self.ops.is_empty() => self.write(),
            7 => self.make_durable(a),
            8 => self.resend(),
            _ => {}
        }
    }

    /// The client publishes (a DUP flag from bit 3 of `a`); a message to
    /// route is routed under a new ticket, refused by a full queue when
    /// bit 4 of `a` is set.
    fn publish_in(&mut self, qos: QoS, id: u16, a: u8) {
        let mut p = publish(qos, if qos == QoS::AtMostOnce { 0 } else { id });
        p.dup = a & 8 != 0;
        if let Ok(InboundPublish::Route { .. }) = self.engine.publish(p, Instant::now()) {
            self.last_ticket += 1;
            self.engine.routed(
                qos,
                id,
                RouteOutcome {
                    ticket: self.last_ticket,
                    matched: 1,
                    refused: a & 16 != 0,
                },
            );
        }
    }

    /// The client answers PUBREC (failed when bit 0 of `a` is set). The
    /// PUBREL of a stored QoS 2 delivery must wait for its write.
    fn pubrec(&mut self, id: u16, a: u8) {
        let was_sent = matches!(
            self.engine.state.inflight.get(&id),
            Some(Inflight::Sent(d)) if d.qos == QoS::ExactlyOnce && d.stored
        );
        let mut ack = PubAck::new(id);
        if a & 1 != 0 {
            ack.reason_code = ReasonCode(0x80);
        }
        let before = self.out.len();
        self.engine.pubrec(ack, &mut self.ops, &mut self.out);
        if was_sent && a & 1 == 0 {
            assert_eq!(self.out.len(), before, "PUBREL {id} sent before its write");
            self.held.entry((true, id)).or_default().push_back(None);
        }
    }

    /// The client releases a QoS 2 message; for a persistent session the
    /// PUBCOMP of a held id is owed once its write is durable.
    fn pubrel(&mut self, id: u16) {
        let held_before = self.engine.state.qos2_holds(id);
        self.engine.pubrel(id, &mut self.ops);
        if held_before && self.persistent {
            self.held.entry((false, id)).or_default().push_back(None);
        }
    }

    /// A message is delivered (stored when bit 2 of `a` is set); a QoS
    /// 1/2 one sent at once must not reuse an id in flight.
    fn deliver(&mut self, qos: QoS, a: u8) {
        let in_flight: Vec<u16> = self.engine.state.inflight.keys().copied().collect();
        self.seq += 1;
        if let Delivered::Send(o) = self.engine.deliver(
            delivery(qos, self.seq, a & 4 != 0),
            Instant::now(),
            &mut self.ops,
        ) && qos != QoS::AtMostOnce
        {
            assert!(
                !in_flight.contains(&o.packet_id),
                "id {} reused",
                o.packet_id
            );
        }
    }

    /// The turn's ops are written under a new ticket, which the owed
    /// releases and completions not yet written wait for.
    fn write(&mut self) {
        self.ops.clear();
        self.last_ticket += 1;
        self.engine.written(self.last_ticket);
        for ticket in self.held.values_mut().flatten().filter(|t| t.is_none()) {
            *ticket = Some(self.last_ticket);
        }
    }

    /// The store reports durable up to the last ticket, or up to two
    /// before it (`a`); every PUBREL and PUBCOMP released must have its
    /// write durable.
    fn make_durable(&mut self, a: u8) {
        self.durable = self
            .durable
            .max(self.last_ticket.saturating_sub(u64::from(a % 3)));
        let mut released = Vec::new();
        self.engine.release_acks(
            &Durable {
                up_to: self.durable,
                ..Durable::default()
            },
            &mut released,
        );
        for packet in &released {
            let key = match packet {
                Packet::PubRel(r) => (true, r.packet_id),
                // A session that ends with its connection
                // stores no release: its PUBCOMP need not wait.
                // (3.1.1 answers an unknown id with a PUBCOMP
                // like any other, so only 5.0's are told apart.)
                Packet::PubComp(c)
                    if c.reason_code.0 == 0 && self.persistent && self.protocol == Protocol::V5 =>
                {
                    (false, c.packet_id)
                }
                _ => continue,
            };
            let ticket = self.held.get_mut(&key).and_then(VecDeque::pop_front);
            assert!(
                ticket.flatten().is_some_and(|t| t <= self.durable),
                "{packet:?} before its write was durable"
            );
        }
    }

    /// The engine resends what is in flight, as on a resumed session:
    /// only PUBRELs of released exchanges and DUP PUBLISHes of sent ones.
    fn resend(&mut self) {
        let mut resent = Vec::new();
        self.engine.resend_inflight(Instant::now(), &mut resent);
        for packet in resent {
            match packet {
                Packet::PubRel(r) => assert!(matches!(
                    self.engine.state.inflight.get(&r.packet_id),
                    Some(Inflight::Released { .. })
                )),
                Packet::Publish(p) => assert!(
                    p.dup
                        && matches!(
                            self.engine.state.inflight.get(&p.packet_id),
                            Some(Inflight::Sent(_))
                        )
                ),
                other => panic!("resent {other:?}"),
            }
        }
    }

    /// In flight within the client's Receive Maximum (2), and inbound
    /// within ours (2).
    fn check_bounds(&self) {
        assert!(
            self.engine.state.inflight.len() <= 2,
            "in flight beyond the window"
        );
        assert!(
            self.engine.inbound_unacknowledged() <= 2,
            "inbound beyond Receive Maximum"
        );
    }
}
