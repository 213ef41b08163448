//! CONNECT negotiation without I/O: what the broker answers a CONNECT,
//! from the packet, the limits in force and the client's circumstances.
//! `Conn::accept` (connection/admit.rs) asks [`refusal`] first, then runs the
//! login (which may wait: a password hash, an enhanced authentication
//! exchange), then takes the [`terms`] and attaches the session with
//! them. Everything decided here is table-tested below.
//!
//! The refusals that need no login come before it: they cost nothing,
//! and a login (a password hash on every attempt) costs the most.

use std::time::Duration;

use ferrymq_codec::{ConnAck, Connect, MqttString, Protocol, ReasonCode, ReasonContext};
use ferrymq_config::Limits;

use ferrymq_codec::topic::exceeds_levels;

use crate::bridge_session::BRIDGE_CLIENT_PREFIX;
use crate::engine::EngineLimits;
use crate::ferry;
use crate::session::secs_u32;

/// What the broker brings to a negotiation besides the packet.
#[derive(Debug, Clone, Copy)]
pub struct Circumstances<'a> {
    /// `[limits]` in force.
    pub limits: &'a Limits,
    /// `[storage] max_session_expiry_secs`.
    pub max_session_expiry: Duration,
    /// `[ferry] trusted_clients`: client id patterns whose message ids are
    /// honoured.
    pub trusted_clients: &'a [String],
    /// The ACL gives this client `trusted_bridge = true`.
    pub acl_trusted_bridge: bool,
    /// An in-process client (the embedding program, its bridges).
    pub in_process: bool,
    /// The broker sheds load by refusing connections.
    pub shedding: bool,
    /// This connection's number (in an assigned client identifier).
    pub connection: u64,
    /// This run's identifier (in an assigned client identifier).
    pub boot_id: u64,
    /// The node identity to stamp message ids with, for a client that
    /// wants them (bridge uplinks).
    pub message_ids: Option<[u8; 16]>,
}

/// Why a CONNECT is refused before any login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The broker sheds load (3.1.1: server unavailable).
    Shedding,
    /// The will topic has more levels than `max_topic_levels`.
    WillTooDeep,
    /// A network client asked for a bridge's reserved client identifier.
    ReservedId,
    /// [MQTT-3.1.3-8]: an empty client identifier needs a clean session
    /// in 3.1.1.
    EmptyIdKeepsNoSession,
}

impl Refusal {
    /// The CONNACK reason code for a client of `protocol`.
    pub fn code(self, protocol: Protocol) -> ReasonCode {
        match self {
            Refusal::Shedding => ReasonCode::SERVER_BUSY,
            // 3.1.1 has no "topic invalid" CONNACK; "not authorized" is
            // the nearest of its five, and tells the client not to retry.
            Refusal::WillTooDeep if protocol == Protocol::V5 => ReasonCode::TOPIC_NAME_INVALID,
            Refusal::WillTooDeep => ReasonCode::NOT_AUTHORIZED,
            Refusal::ReservedId | Refusal::EmptyIdKeepsNoSession => {
                ReasonCode::CLIENT_IDENTIFIER_NOT_VALID
            }
        }
    }
}

/// The refusal of a CONNECT that needs no login, if any.
pub fn refusal(connect: &Connect, c: &Circumstances<'_>) -> Option<Refusal> {
    if c.shedding && !c.in_process {
        // Refused before any work.
        Some(Refusal::Shedding)
    } else if connect
        .will
        .as_ref()
        .is_some_and(|w| exceeds_levels(&w.topic, c.limits.max_topic_levels))
    {
        Some(Refusal::WillTooDeep)
    } else if !c.in_process && connect.client_id.starts_with(BRIDGE_CLIENT_PREFIX) {
        // Reserved: a network client must never take a bridge's queue.
        Some(Refusal::ReservedId)
    } else if connect.client_id.is_empty()
        && connect.protocol == Protocol::V311
        && !connect.clean_start
    {
        Some(Refusal::EmptyIdKeepsNoSession)
    } else {
        None
    }
}

/// The CONNACK of a refused CONNECT: `code`, or "not authorized" when the
/// code is not one a CONNACK may carry.
pub fn refusing_connack(code: ReasonCode) -> ConnAck {
    let reason_code = if code.is_valid_for(ReasonContext::ConnAck) {
        code
    } else {
        ReasonCode::NOT_AUTHORIZED
    };
    ConnAck {
        reason_code,
        ..ConnAck::default()
    }
}

/// What an accepted CONNECT gets.
#[derive(Debug)]
pub struct Terms {
    /// The client identifier: the client's (copied out of the read
    /// buffer), or one assigned to an empty one.
    pub client_id: MqttString,
    /// How long the session outlives the connection.
    pub expiry: Duration,
    /// 1.5 times the keep alive in force; `None` for 0 (no keep alive).
    pub keep_alive: Option<Duration>,
    /// Its message ids are honoured (a trusted bridge).
    pub trusted: bool,
    /// The CONNACK, but for Session Present and enhanced authentication
    /// (known once the session is attached and the exchange is done).
    pub connack: ConnAck,
    /// What the connection's engine enforces.
    pub engine: EngineLimits,
}

/// The terms of an accepted CONNECT.
pub fn terms(connect: &Connect, c: &Circumstances<'_>) -> Terms {
    let protocol = connect.protocol;
    let v5 = protocol == Protocol::V5;
    let limits = c.limits;
    let props = &connect.properties;
    let mut connack = ConnAck::default();
    let client_id = if connect.client_id.is_empty() {
        let assigned =
            MqttString::new(&format!("ferrymq-{}-{}", c.boot_id, c.connection)).unwrap_or_default();
        if v5 {
            connack.properties.assigned_client_identifier = Some(assigned.clone());
        }
        assigned
    } else {
        // Kept for the session's life: not the read buffer with it.
        connect.client_id.detached()
    };
    // An assigned id never matches a trusted pattern.
    let trusted = !c.in_process
        && ((!connect.client_id.is_empty()
            && c.trusted_clients
                .iter()
                .any(|pattern| crate::acl::id_matches(pattern, client_id.as_str())))
            || c.acl_trusted_bridge);
    // A trusted bridge that asks for ferry batches gets them.
    let asks_batches = props
        .user_properties
        .iter()
        .any(|(k, v)| k.as_str() == ferry::CAPABILITY_PROPERTY && v.as_str() == ferry::CAPABILITY);
    if trusted && asks_batches && v5 {
        connack.properties.user_properties.push((
            MqttString::from_static(ferry::CAPABILITY_PROPERTY),
            MqttString::from_static(ferry::CAPABILITY),
        ));
    }
    let expiry = match protocol {
        Protocol::V311 if connect.clean_start => Duration::ZERO,
        Protocol::V311 => c.max_session_expiry,
        Protocol::V5 => Duration::from_secs(u64::from(props.session_expiry_interval.unwrap_or(0)))
            .min(c.max_session_expiry),
    };
    // A bridge's queue lives as long as the node: an outage of any length,
    // even with the broker down, must not expire it. (The node's other
    // `$bridge/` clients, like the `$SYS` publisher, ask for no session at
    // all, and get none.)
    let expiry = if c.in_process && client_id.starts_with(BRIDGE_CLIENT_PREFIX) && !expiry.is_zero()
    {
        Duration::from_secs(u64::from(u32::MAX))
    } else {
        expiry
    };
    let mut keep_alive = connect.keep_alive;
    if v5 {
        let max_keep_alive = u16::try_from(limits.max_keepalive.as_secs()).unwrap_or(u16::MAX);
        if keep_alive > max_keep_alive {
            keep_alive = max_keep_alive;
            connack.properties.server_keep_alive = Some(keep_alive);
        }
        // What this broker supports, said explicitly (Maximum QoS is
        // absent: QoS 2 is supported).
        let p = &mut connack.properties;
        p.receive_maximum = Some(limits.receive_maximum);
        p.maximum_packet_size = Some(limits.max_packet_size);
        p.retain_available = Some(true);
        p.wildcard_subscription_available = Some(true);
        p.subscription_identifier_available = Some(true);
        p.shared_subscription_available = Some(true);
        if limits.topic_alias_maximum > 0 {
            p.topic_alias_maximum = Some(limits.topic_alias_maximum);
        }
        if props.request_response_information == Some(true) {
            // A topic prefix only this client is expected to use for
            // responses to its requests.
            p.response_information = MqttString::new(&format!("response/{client_id}/")).ok();
        }
        if props
            .session_expiry_interval
            .is_some_and(|asked| u64::from(asked) > expiry.as_secs())
        {
            p.session_expiry_interval = Some(secs_u32(expiry));
        }
    }
    let engine = EngineLimits {
        receive_maximum: limits.receive_maximum,
        client_receive_maximum: match props.receive_maximum {
            Some(max) if v5 => max,
            // 3.1.1 clients cannot say; our own limit keeps it bounded.
            _ => limits.receive_maximum,
        },
        client_max_packet: match props.maximum_packet_size {
            Some(max) if v5 => max,
            _ => u32::MAX,
        },
        retain_available: true,
        topic_alias_maximum: if v5 { limits.topic_alias_maximum } else { 0 },
        client_topic_aliases: match props.topic_alias_maximum {
            Some(max) if v5 => max.min(limits.server_topic_aliases),
            _ => 0,
        },
        problem_information: props.request_problem_information.unwrap_or(true),
        max_topic_levels: limits.max_topic_levels,
        message_ids: c.message_ids,
        volatile_inflight: c.in_process,
    };
    Terms {
        client_id,
        expiry,
        keep_alive: (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500)),
        trusted,
        connack,
        engine,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrymq_codec::{ConnectProperties, Will};

    fn limits() -> Limits {
        Limits {
            max_keepalive: Duration::from_secs(600),
            max_topic_levels: 4,
            topic_alias_maximum: 10,
            server_topic_aliases: 8,
            ..Limits::default()
        }
    }

    fn circumstances(limits: &Limits) -> Circumstances<'_> {
        Circumstances {
            limits,
            max_session_expiry: Duration::from_secs(3_600),
            trusted_clients: &[],
            acl_trusted_bridge: false,
            in_process: false,
            shedding: false,
            connection: 42,
            boot_id: 7,
            message_ids: None,
        }
    }

    fn connect(protocol: Protocol, client_id: &str) -> Connect {
        Connect {
            protocol,
            clean_start: true,
            keep_alive: 60,
            client_id: MqttString::new(client_id).expect("client id"),
            will: None,
            username: None,
            password: None,
            properties: ConnectProperties::default(),
        }
    }

    fn will(topic: &str) -> Option<Will> {
        Some(Will {
            topic: MqttString::new(topic).expect("topic"),
            payload: Default::default(),
            qos: ferrymq_codec::QoS::AtMostOnce,
            retain: false,
            properties: Default::default(),
        })
    }

    #[test]
    fn refusals_before_login() {
        use Protocol::{V5, V311};
        let l = limits();
        let plain = circumstances(&l);
        let shedding = Circumstances {
            shedding: true,
            ..plain
        };
        let in_process = Circumstances {
            in_process: true,
            ..plain
        };
        let deep = |p| Connect {
            will: will("a/b/c/d/e"),
            ..connect(p, "c")
        };
        let kept = |p| Connect {
            clean_start: false,
            ..connect(p, "")
        };
        // (connect, circumstances, refusal, CONNACK code)
        let table: Vec<(
            Connect,
            Circumstances<'_>,
            Option<Refusal>,
            Option<ReasonCode>,
        )> = vec![
            (connect(V5, "c"), plain, None, None),
            (
                connect(V5, "c"),
                shedding,
                Some(Refusal::Shedding),
                Some(ReasonCode::SERVER_BUSY),
            ),
            // The embedding program is never shed.
            (
                connect(V5, "c"),
                Circumstances {
                    shedding: true,
                    ..in_process
                },
                None,
                None,
            ),
            (
                deep(V5),
                plain,
                Some(Refusal::WillTooDeep),
                Some(ReasonCode::TOPIC_NAME_INVALID),
            ),
            (
                deep(V311),
                plain,
                Some(Refusal::WillTooDeep),
                Some(ReasonCode::NOT_AUTHORIZED),
            ),
            (
                Connect {
                    will: will("a/b/c/d"),
                    ..connect(V5, "c")
                },
                plain,
                None,
                None,
            ),
            (
                connect(V5, "$bridge/up"),
                plain,
                Some(Refusal::ReservedId),
                Some(ReasonCode::CLIENT_IDENTIFIER_NOT_VALID),
            ),
            (connect(V5, "$bridge/up"), in_process, None, None),
            (
                kept(V311),
                plain,
                Some(Refusal::EmptyIdKeepsNoSession),
                Some(ReasonCode::CLIENT_IDENTIFIER_NOT_VALID),
            ),
            // 5.0 gets an assigned identifier and a session.
            (kept(V5), plain, None, None),
            (connect(V311, ""), plain, None, None),
        ];
        for (n, (connect, c, want, code)) in table.into_iter().enumerate() {
            let got = refusal(&connect, &c);
            assert_eq!(got, want, "row {n}");
            assert_eq!(got.map(|r| r.code(connect.protocol)), code, "row {n}");
        }
    }

    #[test]
    fn a_refusing_connack_carries_only_codes_a_connack_may() {
        assert_eq!(
            refusing_connack(ReasonCode::BAD_USER_NAME_OR_PASSWORD).reason_code,
            ReasonCode::BAD_USER_NAME_OR_PASSWORD
        );
        // 0x8E is a DISCONNECT code only.
        assert_eq!(
            refusing_connack(ReasonCode::SESSION_TAKEN_OVER).reason_code,
            ReasonCode::NOT_AUTHORIZED
        );
    }

    #[test]
    fn session_expiry() {
        use Protocol::{V5, V311};
        let l = limits();
        let hour = Duration::from_secs(3_600);
        let v5 = |asked: Option<u32>| {
            let mut c = connect(V5, "c");
            c.properties.session_expiry_interval = asked;
            c
        };
        let persistent_311 = Connect {
            clean_start: false,
            ..connect(V311, "c")
        };
        let bridge = |asked| {
            let mut c = v5(asked);
            c.client_id = MqttString::new("$bridge/up").expect("client id");
            c
        };
        let in_process = Circumstances {
            in_process: true,
            ..circumstances(&l)
        };
        // (connect, circumstances, expiry, Session Expiry in the CONNACK)
        let table = [
            (connect(V311, "c"), circumstances(&l), Duration::ZERO, None),
            (persistent_311, circumstances(&l), hour, None),
            (v5(None), circumstances(&l), Duration::ZERO, None),
            (
                v5(Some(60)),
                circumstances(&l),
                Duration::from_secs(60),
                None,
            ),
            // Above the maximum: capped, and the CONNACK says so.
            (v5(Some(86_400)), circumstances(&l), hour, Some(3_600)),
            // A bridge's queue never expires; the network cannot ask.
            (
                bridge(Some(60)),
                in_process,
                Duration::from_secs(u64::from(u32::MAX)),
                None,
            ),
            (bridge(None), in_process, Duration::ZERO, None),
        ];
        for (n, (connect, c, expiry, said)) in table.into_iter().enumerate() {
            let t = terms(&connect, &c);
            assert_eq!(t.expiry, expiry, "row {n}");
            assert_eq!(
                t.connack.properties.session_expiry_interval, said,
                "row {n}"
            );
        }
    }

    #[test]
    fn keep_alive_and_assigned_identifiers() {
        use Protocol::{V5, V311};
        let l = limits();
        let c = circumstances(&l);
        let with_keep_alive = |p, secs| Connect {
            keep_alive: secs,
            ..connect(p, "c")
        };
        // (connect, watched limit, Server Keep Alive)
        let table = [
            (with_keep_alive(V5, 0), None, None),
            (with_keep_alive(V5, 10), Some(15_000), None),
            (with_keep_alive(V5, 601), Some(900_000), Some(600)),
            // 3.1.1 cannot be told: its own keep alive holds.
            (with_keep_alive(V311, 601), Some(901_500), None),
        ];
        for (n, (connect, watched, said)) in table.into_iter().enumerate() {
            let t = terms(&connect, &c);
            assert_eq!(t.keep_alive, watched.map(Duration::from_millis), "row {n}");
            assert_eq!(t.connack.properties.server_keep_alive, said, "row {n}");
        }
        let v5 = terms(&connect(V5, ""), &c);
        assert_eq!(v5.client_id, "ferrymq-7-42");
        assert_eq!(
            v5.connack.properties.assigned_client_identifier.as_deref(),
            Some("ferrymq-7-42")
        );
        let v311 = terms(&connect(V311, ""), &c);
        assert_eq!(v311.client_id, "ferrymq-7-42");
        assert_eq!(v311.connack.properties.assigned_client_identifier, None);
        assert_eq!(terms(&connect(V5, "own"), &c).client_id, "own");
    }

    #[test]
    fn trust_and_ferry_batches() {
        use Protocol::{V5, V311};
        let l = limits();
        let patterns = ["edge-*".to_owned()];
        let c = Circumstances {
            trusted_clients: &patterns,
            ..circumstances(&l)
        };
        let asks = |p, id: &str| {
            let mut connect = connect(p, id);
            connect.properties.user_properties.push((
                MqttString::from_static(ferry::CAPABILITY_PROPERTY),
                MqttString::from_static(ferry::CAPABILITY),
            ));
            connect
        };
        let offered = |t: &Terms| !t.connack.properties.user_properties.is_empty();
        // (connect, circumstances, trusted, batches offered)
        let table = [
            (asks(V5, "edge-1"), c, true, true),
            (connect(V5, "edge-1"), c, true, false),
            (asks(V5, "sensor"), c, false, false),
            (
                asks(V5, "sensor"),
                Circumstances {
                    acl_trusted_bridge: true,
                    ..c
                },
                true,
                true,
            ),
            // 3.1.1 has no user properties to answer with.
            (asks(V311, "edge-1"), c, true, false),
            // An assigned identifier never matches a pattern.
            (
                asks(V5, ""),
                Circumstances {
                    trusted_clients: &["*".to_owned()],
                    ..c
                },
                false,
                false,
            ),
            // In-process clients are the node itself.
            (
                asks(V5, "edge-1"),
                Circumstances {
                    in_process: true,
                    ..c
                },
                false,
                false,
            ),
        ];
        for (n, (connect, c, trusted, batches)) in table.into_iter().enumerate() {
            let t = terms(&connect, &c);
            assert_eq!(t.trusted, trusted, "row {n}");
            assert_eq!(offered(&t), batches, "row {n}");
        }
    }

    #[test]
    fn what_the_engine_enforces_and_the_connack_says() {
        use Protocol::{V5, V311};
        let l = limits();
        let c = circumstances(&l);
        let mut asked = connect(V5, "c");
        asked.properties.receive_maximum = Some(5);
        asked.properties.maximum_packet_size = Some(1_000);
        asked.properties.topic_alias_maximum = Some(100);
        asked.properties.request_problem_information = Some(false);
        asked.properties.request_response_information = Some(true);
        let t = terms(&asked, &c);
        assert_eq!(t.engine.client_receive_maximum, 5);
        assert_eq!(t.engine.client_max_packet, 1_000);
        // Capped by `server_topic_aliases`.
        assert_eq!(t.engine.client_topic_aliases, 8);
        assert_eq!(t.engine.topic_alias_maximum, 10);
        assert!(!t.engine.problem_information);
        let p = &t.connack.properties;
        assert_eq!(p.receive_maximum, Some(l.receive_maximum));
        assert_eq!(p.maximum_packet_size, Some(l.max_packet_size));
        assert_eq!(p.topic_alias_maximum, Some(10));
        assert_eq!(p.response_information.as_deref(), Some("response/c/"));
        assert_eq!(p.retain_available, Some(true));
        // 3.1.1 asks for nothing and is told nothing.
        let old = terms(&connect(V311, "c"), &c);
        assert_eq!(old.engine.client_receive_maximum, l.receive_maximum);
        assert_eq!(old.engine.client_max_packet, u32::MAX);
        assert_eq!(old.engine.topic_alias_maximum, 0);
        assert_eq!(old.engine.client_topic_aliases, 0);
        assert_eq!(old.connack.properties, Default::default());
        // In-process: its first phase stays in memory; ids stamped if asked.
        let node = [9u8; 16];
        let embedded = terms(
            &connect(V5, "app"),
            &Circumstances {
                in_process: true,
                message_ids: Some(node),
                ..c
            },
        );
        assert!(embedded.engine.volatile_inflight);
        assert_eq!(embedded.engine.message_ids, Some(node));
    }
}
