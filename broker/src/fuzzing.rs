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
use crate::storage::{Durable, Ticket};

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
        state.expiry = Duration::from_secs(60);
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
    let mut e = engine(protocol, persistent);
    let (mut ops, mut out) = (Vec::new(), Vec::new());
    let (mut last_ticket, mut durable): (Ticket, Ticket) = (0, 0);
    let mut seq = 100;
    // PUBRELs (true) and successful PUBCOMPs (false) owed, by packet
    // id, oldest first: the ticket of their write once made.
    let mut held: HashMap<(bool, u16), VecDeque<Option<Ticket>>> = HashMap::new();
    for op in bytes.chunks_exact(3) {
        let (kind, a, b) = (op[0] % 9, op[1], op[2]);
        let id = u16::from(b % 4) + 1;
        let qos = match a % 3 {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        };
        match kind {
            0 if e.wants_input() => {
                let mut p = publish(qos, if qos == QoS::AtMostOnce { 0 } else { id });
                p.dup = a & 8 != 0;
                if let Ok(InboundPublish::Route { .. }) = e.publish(p, Instant::now()) {
                    last_ticket += 1;
                    e.routed(
                        qos,
                        id,
                        RouteOutcome {
                            ticket: last_ticket,
                            matched: 1,
                            refused: a & 16 != 0,
                        },
                    );
                }
            }
            1 => e.puback(id, &mut ops),
            2 => {
                let was_sent = matches!(
                    e.state.inflight.get(&id),
                    Some(Inflight::Sent(d)) if d.qos == QoS::ExactlyOnce && d.stored
                );
                let mut ack = PubAck::new(id);
                if a & 1 != 0 {
                    ack.reason_code = ReasonCode(0x80);
                }
                let before = out.len();
                e.pubrec(ack, &mut ops, &mut out);
                if was_sent && a & 1 == 0 {
                    assert_eq!(out.len(), before, "PUBREL {id} sent before its write");
                    held.entry((true, id)).or_default().push_back(None);
                }
            }
            3 => {
                let held_before = e.state.qos2_received.contains(&id);
                e.pubrel(id, &mut ops);
                if held_before && persistent {
                    held.entry((false, id)).or_default().push_back(None);
                }
            }
            4 => e.pubcomp(id, &mut ops),
            5 if e.can_send(qos) => {
                let in_flight: Vec<u16> = e.state.inflight.keys().copied().collect();
                seq += 1;
                if let Delivered::Send(o) =
                    e.deliver(delivery(qos, seq, a & 4 != 0), Instant::now(), &mut ops)
                    && qos != QoS::AtMostOnce
                {
                    assert!(
                        !in_flight.contains(&o.packet_id),
                        "id {} reused",
                        o.packet_id
                    );
                }
            }
            6 if !ops.is_empty() => {
                ops.clear();
                last_ticket += 1;
                e.written(last_ticket);
                for ticket in held.values_mut().flatten().filter(|t| t.is_none()) {
                    *ticket = Some(last_ticket);
                }
            }
            7 => {
                durable = durable.max(last_ticket.saturating_sub(u64::from(a % 3)));
                let mut released = Vec::new();
                e.release_acks(
                    &Durable {
                        up_to: durable,
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
                            if c.reason_code.0 == 0 && persistent && protocol == Protocol::V5 =>
                        {
                            (false, c.packet_id)
                        }
                        _ => continue,
                    };
                    let ticket = held.get_mut(&key).and_then(VecDeque::pop_front);
                    assert!(
                        ticket.flatten().is_some_and(|t| t <= durable),
                        "{packet:?} before its write was durable"
                    );
                }
            }
            8 => {
                let mut resent = Vec::new();
                e.resend_inflight(Instant::now(), &mut resent);
                for packet in resent {
                    match packet {
                        Packet::PubRel(r) => assert!(matches!(
                            e.state.inflight.get(&r.packet_id),
                            Some(Inflight::Released { .. })
                        )),
                        Packet::Publish(p) => assert!(
                            p.dup
                                && matches!(
                                    e.state.inflight.get(&p.packet_id),
                                    Some(Inflight::Sent(_))
                                )
                        ),
                        other => panic!("resent {other:?}"),
                    }
                }
            }
            _ => {}
        }
        assert!(e.state.inflight.len() <= 2, "in flight beyond the window");
        assert!(
            e.inbound_unacknowledged() <= 2,
            "inbound beyond Receive Maximum"
        );
    }
}
