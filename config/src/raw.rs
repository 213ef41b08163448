//! Stage 1: the TOML as written, every field optional, and its conversion
//! into a [`Config`].
//!
//! These `Raw*` structs are the file format (a compatibility boundary):
//! rename nothing here without a migration note. Unknown keys are not
//! refused by serde (`deny_unknown_fields` would stop at the first one);
//! `serde_ignored` collects every one instead.

use std::fmt;
use std::net::{Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use toml::de::{DeTable, DeValue};

use crate::size::RawSize;
use crate::validate::{self, IntRange};
use crate::{
    Auth, Bridge, BridgeAddress, BridgeKind, BridgeProtocol, BridgeTls, Config, ConfigError,
    Direction, Durability, Ferry, Forward, IdentityFrom, Lane, Limits, Listener, ListenerProtocol,
    ListenerTls, Log, LogFormat, Metrics, MinTls, QueueFull, State, Storage, hint,
};

#[derive(Debug, Default, Deserialize)]
#[serde(expecting = "a TOML document")]
pub(crate) struct RawConfig {
    node_id: Option<String>,
    data_dir: Option<String>,
    listener: Option<Vec<RawListener>>,
    auth: Option<RawAuth>,
    limits: Option<RawLimits>,
    storage: Option<RawStorage>,
    bridge: Option<Vec<RawBridge>>,
    ferry: Option<RawFerry>,
    state: Option<RawState>,
    metrics: Option<RawMetrics>,
    log: Option<RawLog>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(expecting = "a [log] table")]
struct RawLog {
    level: Option<String>,
    format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(expecting = "a [metrics] table")]
struct RawMetrics {
    enabled: Option<bool>,
    bind: Option<String>,
    sys_interval_secs: Option<Int>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(expecting = "a [state] table")]
struct RawState {
    topics: Option<Vec<String>>,
    max_clock_skew_secs: Option<Int>,
    tombstone_ttl_secs: Option<Int>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(expecting = "a [ferry] table")]
struct RawFerry {
    trusted_clients: Option<Vec<String>>,
    forget_after_secs: Option<Int>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(expecting = "a [[listener]] table")]
struct RawListener {
    bind: Option<String>,
    protocol: Option<String>,
    backlog: Option<Int>,
    cert: Option<String>,
    key: Option<String>,
    client_ca: Option<String>,
    require_client_cert: Option<bool>,
    min_tls: Option<String>,
    use_identity_as_username: Option<bool>,
    identity_from: Option<String>,
    path: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(expecting = "an [auth] table")]
struct RawAuth {
    allow_anonymous: Option<bool>,
    allow_anonymous_remote: Option<bool>,
    password_file: Option<String>,
    acl_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(expecting = "a [limits] table")]
struct RawLimits {
    max_connections: Option<Int>,
    max_connections_per_address: Option<Int>,
    max_packet_size: Option<RawSize>,
    receive_maximum: Option<Int>,
    max_keepalive_secs: Option<Int>,
    connect_timeout_secs: Option<Int>,
    topic_alias_maximum: Option<Int>,
    server_topic_aliases: Option<Int>,
    max_topic_levels: Option<Int>,
    max_subscriptions_per_client: Option<Int>,
    max_retained_messages: Option<Int>,
    max_publish_rate: Option<Int>,
    dormant_connections: Option<bool>,
    shed_cpu_percent: Option<Int>,
    shed_memory: Option<RawSize>,
    shed_window_secs: Option<Int>,
    critical_topics: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(expecting = "a [storage] table")]
struct RawStorage {
    max_session_expiry_secs: Option<Int>,
    max_queued_messages: Option<Int>,
    max_queued_bytes: Option<RawSize>,
    max_queued_memory: Option<RawSize>,
    queue_full: Option<String>,
    queue_qos0: Option<bool>,
    durability: Option<String>,
    sync_interval_ms: Option<Int>,
    max_disk_bytes: Option<RawSize>,
    low_disk_percent: Option<Int>,
    bridge_reserve_percent: Option<Int>,
    max_age_secs: Option<Int>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(expecting = "a [[bridge]] table")]
struct RawBridge {
    name: Option<String>,
    addresses: Option<Vec<String>>,
    kind: Option<String>,
    protocol: Option<String>,
    client_id: Option<String>,
    username: Option<String>,
    password: Option<String>,
    keepalive_secs: Option<Int>,
    connect_timeout_secs: Option<Int>,
    session_expiry_secs: Option<Int>,
    inflight: Option<Int>,
    batch_size: Option<Int>,
    batch_bytes: Option<RawSize>,
    batch_linger_ms: Option<Int>,
    drain_rate: Option<Int>,
    ramp_secs: Option<Int>,
    reconnect_min_ms: Option<Int>,
    reconnect_max_ms: Option<Int>,
    max_queued_messages: Option<Int>,
    max_queued_bytes: Option<RawSize>,
    tls: Option<RawBridgeTls>,
    forward: Option<Vec<RawForward>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(expecting = "a [bridge.tls] table")]
struct RawBridgeTls {
    ca_file: Option<String>,
    cert_file: Option<String>,
    key_file: Option<String>,
    server_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(expecting = "a [[bridge.forward]] table")]
struct RawForward {
    filter: Option<String>,
    direction: Option<String>,
    qos: Option<Int>,
    local_prefix: Option<String>,
    remote_prefix: Option<String>,
    lane: Option<String>,
    max_age_secs: Option<Int>,
}

/// One table of the file, for unknown-key hints.
pub(crate) struct Table {
    /// How the table is written in a file, e.g. `[limits]`.
    pub(crate) header: &'static str,
    /// Its path with array indices dropped: `[]`, `["listener"]`, ...
    pub(crate) path: &'static [&'static str],
    /// The keys it accepts; must match the `Raw*` struct (a test checks).
    pub(crate) keys: &'static [&'static str],
    /// Keys the design names that this version does not accept yet.
    planned: &'static [&'static str],
}

pub(crate) const TABLES: &[Table] = &[
    Table {
        header: "the top level",
        path: &[],
        keys: &[
            "node_id", "data_dir", "listener", "auth", "limits", "storage", "bridge", "ferry",
            "state", "metrics", "log",
        ],
        planned: &[],
    },
    Table {
        header: "[[listener]]",
        path: &["listener"],
        keys: &[
            "bind",
            "protocol",
            "backlog",
            "cert",
            "key",
            "client_ca",
            "require_client_cert",
            "min_tls",
            "use_identity_as_username",
            "identity_from",
            "path",
        ],
        planned: &[],
    },
    Table {
        header: "[auth]",
        path: &["auth"],
        keys: &[
            "allow_anonymous",
            "allow_anonymous_remote",
            "password_file",
            "acl_file",
        ],
        planned: &[],
    },
    Table {
        header: "[limits]",
        path: &["limits"],
        keys: &[
            "max_connections",
            "max_connections_per_address",
            "max_packet_size",
            "receive_maximum",
            "max_keepalive_secs",
            "connect_timeout_secs",
            "topic_alias_maximum",
            "server_topic_aliases",
            "max_topic_levels",
            "max_subscriptions_per_client",
            "max_retained_messages",
            "max_publish_rate",
            "dormant_connections",
            "shed_cpu_percent",
            "shed_memory",
            "shed_window_secs",
            "critical_topics",
        ],
        planned: &[],
    },
    Table {
        header: "[storage]",
        path: &["storage"],
        keys: &[
            "max_session_expiry_secs",
            "max_queued_messages",
            "max_queued_bytes",
            "max_queued_memory",
            "queue_full",
            "queue_qos0",
            "durability",
            "sync_interval_ms",
            "max_disk_bytes",
            "low_disk_percent",
            "bridge_reserve_percent",
            "max_age_secs",
        ],
        planned: &[],
    },
    Table {
        header: "[[bridge]]",
        path: &["bridge"],
        keys: &[
            "name",
            "addresses",
            "kind",
            "protocol",
            "client_id",
            "username",
            "password",
            "keepalive_secs",
            "connect_timeout_secs",
            "session_expiry_secs",
            "inflight",
            "batch_size",
            "batch_bytes",
            "batch_linger_ms",
            "drain_rate",
            "ramp_secs",
            "reconnect_min_ms",
            "reconnect_max_ms",
            "max_queued_messages",
            "max_queued_bytes",
            "tls",
            "forward",
        ],
        planned: &[],
    },
    Table {
        header: "[bridge.tls]",
        path: &["bridge", "tls"],
        keys: &["ca_file", "cert_file", "key_file", "server_name"],
        planned: &[],
    },
    Table {
        header: "[[bridge.forward]]",
        path: &["bridge", "forward"],
        keys: &[
            "filter",
            "direction",
            "qos",
            "local_prefix",
            "remote_prefix",
            "lane",
            "max_age_secs",
        ],
        planned: &[],
    },
    Table {
        header: "[ferry]",
        path: &["ferry"],
        keys: &["trusted_clients", "forget_after_secs"],
        planned: &[],
    },
    Table {
        header: "[state]",
        path: &["state"],
        keys: &["topics", "max_clock_skew_secs", "tombstone_ttl_secs"],
        planned: &[],
    },
    Table {
        header: "[metrics]",
        path: &["metrics"],
        keys: &["enabled", "bind", "sys_interval_secs"],
        planned: &[],
    },
    Table {
        header: "[log]",
        path: &["log"],
        keys: &["level", "format"],
        planned: &[],
    },
];

/// An integer key. Read as `i128` (wider than anything TOML holds) so that
/// a negative or too-large value is reported with the key's allowed range
/// rather than with a Rust type name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Int(i128);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(IntVisitor)
    }
}

struct IntVisitor;

impl Visitor<'_> for IntVisitor {
    type Value = Int;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an integer")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Int, E> {
        Ok(Int(i128::from(v)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Int, E> {
        Ok(Int(i128::from(v)))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Int, E> {
        Ok(Int(v))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Int, E> {
        i128::try_from(v)
            .map(Int)
            .map_err(|_| E::custom(format!("integer {v} is too large")))
    }
}

/// Stage 1: parses `text` into raw structs. On success also returns the
/// unknown keys found (as errors, to be reported with stage 2's). On failure
/// returns a syntax error, or a type error plus the unknown keys seen
/// before it.
pub(crate) fn parse(text: &str) -> Result<(RawConfig, Vec<ConfigError>), Vec<ConfigError>> {
    let document = DeTable::parse(text).map_err(|err| vec![syntax_error(text, &err)])?;
    // Positions of keys, to report unknown keys in file order (toml visits
    // keys in sorted order).
    let positions = document.get_ref().clone();
    let mut unknown = Vec::new();
    let result: Result<RawConfig, _> = {
        let mut on_unknown = |path: serde_ignored::Path<'_>| {
            let mut segs = Vec::new();
            segments(&path, &mut segs);
            let position = position(&positions, &segs).unwrap_or(usize::MAX);
            unknown.push((position, unknown_key(&segs)));
        };
        let deserializer =
            serde_ignored::Deserializer::new(toml::Deserializer::from(document), &mut on_unknown);
        serde_path_to_error::deserialize(deserializer)
    };
    unknown.sort_by_key(|&(position, _)| position);
    let mut errors: Vec<ConfigError> = unknown.into_iter().map(|(_, error)| error).collect();
    match result {
        Ok(raw) => Ok((raw, errors)),
        Err(err) => {
            errors.push(type_error(&err));
            Err(errors)
        }
    }
}

/// Byte offset where the key at `segs` is written in the file.
fn position(root: &DeTable<'_>, segs: &[Segment]) -> Option<usize> {
    let mut table = root;
    let mut value: Option<&DeValue<'_>> = None;
    let mut position = None;
    for seg in segs {
        match seg {
            Segment::Key(name) => {
                if let Some(value) = value {
                    table = value.as_table()?;
                }
                let (key, found) = table.iter().find(|(key, _)| key.get_ref() == name)?;
                position = Some(key.span().start);
                value = Some(found.get_ref());
            }
            Segment::Index(i) => {
                value = Some(value?.as_array()?.get(*i)?.get_ref());
            }
        }
    }
    position
}

/// A TOML syntax error as one line: "TOML syntax error at line L, column C:
/// message" (toml's own rendering spans several lines).
fn syntax_error(text: &str, err: &toml::de::Error) -> ConfigError {
    let message = match err.span().and_then(|span| text.get(..span.start)) {
        Some(before) => {
            let line = before.matches('\n').count() + 1;
            let line_start = before.rfind('\n').map_or(0, |i| i + 1);
            let column = before[line_start..].chars().count() + 1;
            format!(
                "TOML syntax error at line {line}, column {column}: {}",
                err.message()
            )
        }
        None => format!("TOML syntax error: {}", err.message()),
    };
    ConfigError::new("", message)
}

fn type_error(err: &serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
    let path = err.path().to_string();
    let key = if path == "." { String::new() } else { path };
    let mut message = err.inner().message().to_owned();
    if message.contains("expected a sequence") {
        let hint = match table_key(&key).as_str() {
            "listener" => " (write each listener as [[listener]], with double brackets)",
            "bridge" => " (write each bridge as [[bridge]], with double brackets)",
            "bridge.forward" => {
                " (write each rule as [[bridge.forward]], with double brackets, or as \
                 forward = [ { filter = \"...\" } ])"
            }
            "bridge.addresses" => " (write a list, like addresses = [\"broker.example.com:1883\"])",
            _ => "",
        };
        message.push_str(hint);
    }
    if table_key(&key) == "bridge.protocol" && message.starts_with("invalid type") {
        // `protocol = 5` is the likely slip.
        message.push_str(" (write protocol = \"5\" or \"3.1.1\", in quotes)");
    }
    ConfigError::new(key, message)
}

/// `key` without its indices: `bridge[0].forward[1]` -> `bridge.forward`.
fn table_key(key: &str) -> String {
    key.split('[')
        .map(|part| part.split_once(']').map_or(part, |(_, rest)| rest))
        .collect()
}

/// One segment of a key path.
enum Segment {
    Key(String),
    Index(usize),
}

fn segments(path: &serde_ignored::Path<'_>, out: &mut Vec<Segment>) {
    use serde_ignored::Path;
    match path {
        Path::Root => {}
        Path::Seq { parent, index } => {
            segments(parent, out);
            out.push(Segment::Index(*index));
        }
        Path::Map { parent, key } => {
            segments(parent, out);
            out.push(Segment::Key(key.clone()));
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => {
            segments(parent, out);
        }
    }
}

/// `key: unknown key`, with a hint when the key is misspelt, belongs in
/// another table, or is planned for a later version.
fn unknown_key(segs: &[Segment]) -> ConfigError {
    let mut key = String::new();
    for seg in segs {
        match seg {
            Segment::Key(name) => {
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(name);
            }
            Segment::Index(i) => key.push_str(&format!("[{i}]")),
        }
    }
    let mut names = segs.iter().filter_map(|seg| match seg {
        Segment::Key(name) => Some(name.as_str()),
        Segment::Index(_) => None,
    });
    let leaf = names.next_back().unwrap_or_default();
    let parent: Vec<&str> = names.collect();
    let table = TABLES.iter().find(|t| t.path == parent.as_slice());

    let hint = if let Some(table) = table {
        if table.planned.contains(&leaf) {
            Some(format!("`{leaf}` is not available yet in this version"))
        } else if let Some(known) = hint::closest(leaf, table.keys) {
            Some(format!("did you mean `{known}`?"))
        } else {
            TABLES
                .iter()
                .find(|other| other.keys.contains(&leaf))
                .map(|other| format!("`{leaf}` belongs in {}", other.header))
        }
    } else {
        None
    };
    let message = match hint {
        Some(hint) => format!("unknown key; {hint}"),
        None => "unknown key".to_owned(),
    };
    ConfigError::new(key, message)
}

impl RawConfig {
    /// Turns the raw values into a [`Config`], falling back to defaults for
    /// missing keys. Values the `Config` types cannot hold are reported to
    /// `errors` and replaced by their default, so that stage 2 can still
    /// check the rest. Also returns the indices of listeners whose `bind`
    /// could not be used (stage 2 skips address checks on those).
    pub(crate) fn into_config(self, errors: &mut Vec<ConfigError>) -> (Config, Vec<usize>) {
        let defaults = Config::default();
        let mut unusable_binds = Vec::new();
        let listeners = match self.listener {
            None => defaults.listeners,
            Some(raw) => raw
                .into_iter()
                .enumerate()
                .map(|(i, raw)| {
                    let (listener, bind_ok) = raw.into_listener(i, errors);
                    if !bind_ok {
                        unusable_binds.push(i);
                    }
                    listener
                })
                .collect(),
        };
        let node_id = self.node_id.unwrap_or(defaults.node_id);
        let bridges = self
            .bridge
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, raw)| raw.into_bridge(i, &node_id, errors))
            .collect();
        let config = Config {
            node_id,
            data_dir: self.data_dir.map_or(defaults.data_dir, PathBuf::from),
            listeners,
            auth: self.auth.unwrap_or_default().into_auth(defaults.auth),
            limits: self
                .limits
                .unwrap_or_default()
                .into_limits(defaults.limits, errors),
            storage: self
                .storage
                .unwrap_or_default()
                .into_storage(defaults.storage, errors),
            bridges,
            ferry: self
                .ferry
                .unwrap_or_default()
                .into_ferry(defaults.ferry, errors),
            state: self
                .state
                .unwrap_or_default()
                .into_state(defaults.state, errors),
            metrics: self
                .metrics
                .unwrap_or_default()
                .into_metrics(defaults.metrics, errors),
            log: self.log.unwrap_or_default().into_log(defaults.log, errors),
        };
        (config, unusable_binds)
    }
}

impl RawFerry {
    fn into_ferry(self, defaults: Ferry, errors: &mut Vec<ConfigError>) -> Ferry {
        Ferry {
            trusted_clients: self.trusted_clients.unwrap_or(defaults.trusted_clients),
            forget_after: Duration::from_secs(narrow(
                self.forget_after_secs.map(|Int(v)| v),
                "ferry.forget_after_secs",
                &validate::FORGET_AFTER_SECS,
                defaults.forget_after.as_secs(),
                errors,
            )),
        }
    }
}

impl RawState {
    fn into_state(self, defaults: State, errors: &mut Vec<ConfigError>) -> State {
        State {
            topics: self.topics.unwrap_or(defaults.topics),
            max_clock_skew: Duration::from_secs(narrow(
                self.max_clock_skew_secs.map(|Int(v)| v),
                "state.max_clock_skew_secs",
                &validate::CLOCK_SKEW_SECS,
                defaults.max_clock_skew.as_secs(),
                errors,
            )),
            tombstone_ttl: Duration::from_secs(narrow(
                self.tombstone_ttl_secs.map(|Int(v)| v),
                "state.tombstone_ttl_secs",
                &validate::FORGET_AFTER_SECS,
                defaults.tombstone_ttl.as_secs(),
                errors,
            )),
        }
    }
}

impl RawLog {
    fn into_log(self, defaults: Log, errors: &mut Vec<ConfigError>) -> Log {
        let format = match self.format.as_deref() {
            None => defaults.format,
            Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                errors.push(ConfigError::new(
                    "log.format",
                    format!("unknown format \"{other}\"; expected \"text\" or \"json\""),
                ));
                defaults.format
            }
        };
        Log {
            level: self.level.unwrap_or(defaults.level),
            format,
        }
    }
}

impl RawMetrics {
    fn into_metrics(self, defaults: Metrics, errors: &mut Vec<ConfigError>) -> Metrics {
        let bind = match self.bind {
            None => defaults.bind,
            Some(text) => text.parse::<SocketAddr>().unwrap_or_else(|_| {
                errors.push(ConfigError::new(
                    "metrics.bind",
                    format!("\"{text}\" is not an address like 127.0.0.1:9464"),
                ));
                defaults.bind
            }),
        };
        Metrics {
            enabled: self.enabled.unwrap_or(defaults.enabled),
            bind,
            sys_interval: Duration::from_secs(narrow(
                self.sys_interval_secs.map(|Int(v)| v),
                "metrics.sys_interval_secs",
                &validate::SYS_INTERVAL_SECS,
                defaults.sys_interval.as_secs(),
                errors,
            )),
        }
    }
}

impl RawListener {
    /// The listener, and whether its `bind` is a real address.
    fn into_listener(self, index: usize, errors: &mut Vec<ConfigError>) -> (Listener, bool) {
        let fallback = Listener::default();
        let bind = match self.bind {
            None => {
                errors.push(ConfigError::new(
                    format!("listener[{index}].bind"),
                    "missing; every [[listener]] needs an address like \"127.0.0.1:1883\"",
                ));
                None
            }
            Some(text) => match text.parse::<SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    errors.push(ConfigError::new(
                        format!("listener[{index}].bind"),
                        format!("\"{text}\" is not an address like 127.0.0.1:1883"),
                    ));
                    None
                }
            },
        };
        let protocol = match self.protocol.as_deref() {
            None | Some("tcp") => ListenerProtocol::Tcp,
            Some("tls") => ListenerProtocol::Tls,
            Some("ws") => ListenerProtocol::Ws,
            Some("wss") => ListenerProtocol::Wss,
            Some(other) => {
                errors.push(ConfigError::new(
                    format!("listener[{index}].protocol"),
                    format!(
                        "unknown protocol \"{other}\"; expected one of \"tcp\", \"tls\", \"ws\", \
                         \"wss\""
                    ),
                ));
                ListenerProtocol::Tcp
            }
        };
        // The range is checked with the whole config (`validate`); here
        // only what does not fit the type.
        let backlog = self.backlog.and_then(|Int(v)| {
            u32::try_from(v)
                .map_err(|_| {
                    let key = format!("listener[{index}].backlog");
                    errors.push(validate::LISTEN_BACKLOG.error(&key, v));
                })
                .ok()
        });
        let key = |k: &str| format!("listener[{index}].{k}");
        let min_tls = match self.min_tls.as_deref() {
            None | Some("1.3") => MinTls::V1_3,
            Some("1.2") => MinTls::V1_2,
            Some(other) => {
                errors.push(ConfigError::new(
                    key("min_tls"),
                    format!("unknown TLS version \"{other}\"; expected \"1.3\" or \"1.2\""),
                ));
                MinTls::V1_3
            }
        };
        let identity_from = match self.identity_from.as_deref() {
            None | Some("common-name") => IdentityFrom::CommonName,
            Some("san") => IdentityFrom::San,
            Some(other) => {
                errors.push(ConfigError::new(
                    key("identity_from"),
                    format!("unknown source \"{other}\"; expected \"common-name\" or \"san\""),
                ));
                IdentityFrom::CommonName
            }
        };
        let tls = if protocol.is_tls() {
            let required = |value: Option<String>, name: &str, errors: &mut Vec<ConfigError>| {
                value.map(PathBuf::from).unwrap_or_else(|| {
                    errors.push(ConfigError::new(
                        key(name),
                        format!(
                            "missing; protocol = \"{protocol}\" needs cert and key (PEM files)"
                        ),
                    ));
                    PathBuf::new()
                })
            };
            Some(ListenerTls {
                cert: required(self.cert, "cert", errors),
                key: required(self.key, "key", errors),
                client_ca: self.client_ca.map(PathBuf::from),
                require_client_cert: self.require_client_cert.unwrap_or(true),
                min_tls,
                use_identity_as_username: self.use_identity_as_username.unwrap_or(false),
                identity_from,
            })
        } else {
            for (name, given) in [
                ("cert", self.cert.is_some()),
                ("key", self.key.is_some()),
                ("client_ca", self.client_ca.is_some()),
                ("require_client_cert", self.require_client_cert.is_some()),
                ("min_tls", self.min_tls.is_some()),
                (
                    "use_identity_as_username",
                    self.use_identity_as_username.is_some(),
                ),
                ("identity_from", self.identity_from.is_some()),
            ] {
                if given {
                    errors.push(ConfigError::new(
                        key(name),
                        "only for protocol = \"tls\" and \"wss\" listeners",
                    ));
                }
            }
            None
        };
        let path = if protocol.is_websocket() {
            Some(
                self.path
                    .unwrap_or_else(|| crate::DEFAULT_WEBSOCKET_PATH.to_owned()),
            )
        } else {
            if self.path.is_some() {
                errors.push(ConfigError::new(
                    key("path"),
                    "only for protocol = \"ws\" and \"wss\" listeners",
                ));
            }
            None
        };
        let listener = Listener {
            bind: bind.unwrap_or(fallback.bind),
            protocol,
            backlog,
            tls,
            path,
        };
        (listener, bind.is_some())
    }
}

impl RawAuth {
    fn into_auth(self, defaults: Auth) -> Auth {
        Auth {
            allow_anonymous: self.allow_anonymous.unwrap_or(defaults.allow_anonymous),
            allow_anonymous_remote: self
                .allow_anonymous_remote
                .unwrap_or(defaults.allow_anonymous_remote),
            password_file: self
                .password_file
                .map(PathBuf::from)
                .or(defaults.password_file),
            acl_file: self.acl_file.map(PathBuf::from).or(defaults.acl_file),
        }
    }
}

impl RawLimits {
    fn into_limits(self, defaults: Limits, errors: &mut Vec<ConfigError>) -> Limits {
        Limits {
            max_connections: narrow(
                self.max_connections.map(|Int(v)| v),
                "limits.max_connections",
                &validate::MAX_CONNECTIONS,
                defaults.max_connections,
                errors,
            ),
            max_connections_per_address: narrow(
                self.max_connections_per_address.map(|Int(v)| v),
                "limits.max_connections_per_address",
                &validate::COUNT_OR_NO_LIMIT,
                defaults.max_connections_per_address,
                errors,
            ),
            max_packet_size: narrow(
                self.max_packet_size.map(|RawSize(v)| i128::from(v)),
                "limits.max_packet_size",
                &validate::MAX_PACKET_SIZE,
                defaults.max_packet_size,
                errors,
            ),
            receive_maximum: narrow(
                self.receive_maximum.map(|Int(v)| v),
                "limits.receive_maximum",
                &validate::RECEIVE_MAXIMUM,
                defaults.receive_maximum,
                errors,
            ),
            max_keepalive: Duration::from_secs(narrow(
                self.max_keepalive_secs.map(|Int(v)| v),
                "limits.max_keepalive_secs",
                &validate::MAX_KEEPALIVE_SECS,
                defaults.max_keepalive.as_secs(),
                errors,
            )),
            connect_timeout: Duration::from_secs(narrow(
                self.connect_timeout_secs.map(|Int(v)| v),
                "limits.connect_timeout_secs",
                &validate::CONNECT_TIMEOUT_SECS,
                defaults.connect_timeout.as_secs(),
                errors,
            )),
            topic_alias_maximum: narrow(
                self.topic_alias_maximum.map(|Int(v)| v),
                "limits.topic_alias_maximum",
                &validate::TOPIC_ALIAS_MAXIMUM,
                defaults.topic_alias_maximum,
                errors,
            ),
            server_topic_aliases: narrow(
                self.server_topic_aliases.map(|Int(v)| v),
                "limits.server_topic_aliases",
                &validate::SERVER_TOPIC_ALIASES,
                defaults.server_topic_aliases,
                errors,
            ),
            max_topic_levels: narrow(
                self.max_topic_levels.map(|Int(v)| v),
                "limits.max_topic_levels",
                &validate::MAX_TOPIC_LEVELS,
                defaults.max_topic_levels,
                errors,
            ),
            max_subscriptions_per_client: narrow(
                self.max_subscriptions_per_client.map(|Int(v)| v),
                "limits.max_subscriptions_per_client",
                &validate::COUNT_OR_NO_LIMIT,
                defaults.max_subscriptions_per_client,
                errors,
            ),
            max_retained_messages: narrow(
                self.max_retained_messages.map(|Int(v)| v),
                "limits.max_retained_messages",
                &validate::COUNT_OR_NO_LIMIT,
                defaults.max_retained_messages,
                errors,
            ),
            max_publish_rate: narrow(
                self.max_publish_rate.map(|Int(v)| v),
                "limits.max_publish_rate",
                &validate::MAX_PUBLISH_RATE,
                defaults.max_publish_rate,
                errors,
            ),
            dormant_connections: self
                .dormant_connections
                .unwrap_or(defaults.dormant_connections),
            shed_cpu_percent: narrow(
                self.shed_cpu_percent.map(|Int(v)| v),
                "limits.shed_cpu_percent",
                &validate::SHED_CPU_PERCENT,
                defaults.shed_cpu_percent,
                errors,
            ),
            shed_memory: narrow(
                self.shed_memory.map(|RawSize(v)| i128::from(v)),
                "limits.shed_memory",
                &validate::SHED_MEMORY,
                defaults.shed_memory,
                errors,
            ),
            shed_window: Duration::from_secs(narrow(
                self.shed_window_secs.map(|Int(v)| v),
                "limits.shed_window_secs",
                &validate::SHED_WINDOW_SECS,
                defaults.shed_window.as_secs(),
                errors,
            )),
            critical_topics: self.critical_topics.unwrap_or(defaults.critical_topics),
        }
    }
}

impl RawStorage {
    fn into_storage(self, defaults: Storage, errors: &mut Vec<ConfigError>) -> Storage {
        Storage {
            max_session_expiry: Duration::from_secs(narrow(
                self.max_session_expiry_secs.map(|Int(v)| v),
                "storage.max_session_expiry_secs",
                &validate::MAX_SESSION_EXPIRY_SECS,
                defaults.max_session_expiry.as_secs(),
                errors,
            )),
            max_queued_messages: narrow(
                self.max_queued_messages.map(|Int(v)| v),
                "storage.max_queued_messages",
                &validate::MAX_QUEUED_MESSAGES,
                defaults.max_queued_messages,
                errors,
            ),
            max_queued_bytes: narrow(
                self.max_queued_bytes.map(|RawSize(v)| i128::from(v)),
                "storage.max_queued_bytes",
                &validate::MAX_QUEUED_BYTES,
                defaults.max_queued_bytes,
                errors,
            ),
            max_queued_memory: narrow(
                self.max_queued_memory.map(|RawSize(v)| i128::from(v)),
                "storage.max_queued_memory",
                &validate::MAX_QUEUED_MEMORY,
                defaults.max_queued_memory,
                errors,
            ),
            queue_full: choice(
                self.queue_full.as_deref(),
                "storage.queue_full",
                "policy",
                &QueueFull::ALL,
                QueueFull::as_str,
                defaults.queue_full,
                errors,
            ),
            queue_qos0: self.queue_qos0.unwrap_or(defaults.queue_qos0),
            durability: choice(
                self.durability.as_deref(),
                "storage.durability",
                "policy",
                &Durability::ALL,
                Durability::as_str,
                defaults.durability,
                errors,
            ),
            sync_interval: Duration::from_millis(narrow(
                self.sync_interval_ms.map(|Int(v)| v),
                "storage.sync_interval_ms",
                &validate::SYNC_INTERVAL_MS,
                whole_millis(defaults.sync_interval),
                errors,
            )),
            max_disk_bytes: narrow(
                self.max_disk_bytes.map(|RawSize(v)| i128::from(v)),
                "storage.max_disk_bytes",
                &validate::MAX_DISK_BYTES,
                defaults.max_disk_bytes,
                errors,
            ),
            low_disk_percent: narrow(
                self.low_disk_percent.map(|Int(v)| v),
                "storage.low_disk_percent",
                &validate::LOW_DISK_PERCENT,
                defaults.low_disk_percent,
                errors,
            ),
            bridge_reserve_percent: narrow(
                self.bridge_reserve_percent.map(|Int(v)| v),
                "storage.bridge_reserve_percent",
                &validate::BRIDGE_RESERVE_PERCENT,
                defaults.bridge_reserve_percent,
                errors,
            ),
            max_age: Some(Duration::from_secs(narrow(
                self.max_age_secs.map(|Int(v)| v),
                "storage.max_age_secs",
                &validate::MAX_AGE_SECS,
                0,
                errors,
            )))
            .filter(|d| !d.is_zero()),
        }
    }
}

impl RawBridge {
    /// The bridge at `bridge[index]`. Only what the [`Bridge`] types cannot
    /// hold is reported here; stage 2 checks the rest, for configs built in
    /// code too. A missing `name`, `addresses`, `forward` or `filter` is
    /// left empty, for stage 2 to report.
    fn into_bridge(self, index: usize, node_id: &str, errors: &mut Vec<ConfigError>) -> Bridge {
        let defaults = Bridge::default();
        let key = |name: &str| format!("bridge[{index}].{name}");
        let name = self.name.unwrap_or_default();
        let client_id = match self.client_id {
            Some(id) if !id.is_empty() => id,
            _ => format!("{node_id}-{name}"),
        };
        let addresses = self
            .addresses
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(j, text)| {
                parse_address(text).unwrap_or_else(|message| {
                    errors.push(ConfigError::new(key(&format!("addresses[{j}]")), message));
                    // Reported; a valid stand-in keeps stage 2 quiet about it.
                    BridgeAddress {
                        host: "localhost".to_owned(),
                        port: 1883,
                    }
                })
            })
            .collect();
        let kind = match self.kind.as_deref() {
            None | Some("mqtt") => BridgeKind::Mqtt,
            Some("ferrymq") => BridgeKind::Ferrymq,
            Some(other) => {
                errors.push(ConfigError::new(
                    key("kind"),
                    format!("unknown kind \"{other}\"; expected \"mqtt\" or \"ferrymq\""),
                ));
                defaults.kind
            }
        };
        let protocol = match self.protocol.as_deref() {
            // "5" is one edit away from these, but they mean 3.1.1 (whose
            // protocol level in CONNECT is 4).
            Some(text @ ("3" | "4")) => {
                let why = if text == "4" {
                    ", whose protocol level is 4"
                } else {
                    ""
                };
                errors.push(ConfigError::new(
                    key("protocol"),
                    format!(
                        "unknown protocol \"{text}\" (did you mean \"3.1.1\"{why}?); expected one \
                         of \"5\", \"3.1.1\""
                    ),
                ));
                defaults.protocol
            }
            text => choice(
                text,
                &key("protocol"),
                "protocol",
                &BridgeProtocol::ALL,
                BridgeProtocol::as_str,
                defaults.protocol,
                errors,
            ),
        };
        Bridge {
            name,
            addresses,
            kind,
            protocol,
            client_id,
            username: self.username,
            password: self.password,
            keepalive: Duration::from_secs(narrow(
                self.keepalive_secs.map(|Int(v)| v),
                &key("keepalive_secs"),
                &validate::BRIDGE_KEEPALIVE_SECS,
                defaults.keepalive.as_secs(),
                errors,
            )),
            connect_timeout: Duration::from_secs(narrow(
                self.connect_timeout_secs.map(|Int(v)| v),
                &key("connect_timeout_secs"),
                &validate::BRIDGE_CONNECT_TIMEOUT_SECS,
                defaults.connect_timeout.as_secs(),
                errors,
            )),
            session_expiry: Duration::from_secs(narrow(
                self.session_expiry_secs.map(|Int(v)| v),
                &key("session_expiry_secs"),
                &validate::BRIDGE_SESSION_EXPIRY_SECS,
                defaults.session_expiry.as_secs(),
                errors,
            )),
            inflight: narrow(
                self.inflight.map(|Int(v)| v),
                &key("inflight"),
                &validate::BRIDGE_INFLIGHT,
                defaults.inflight,
                errors,
            ),
            batch_size: narrow(
                self.batch_size.map(|Int(v)| v),
                &key("batch_size"),
                &validate::BRIDGE_BATCH_SIZE,
                defaults.batch_size,
                errors,
            ),
            batch_bytes: narrow(
                self.batch_bytes.map(|RawSize(v)| i128::from(v)),
                &key("batch_bytes"),
                &validate::BRIDGE_BATCH_BYTES,
                defaults.batch_bytes,
                errors,
            ),
            batch_linger: Duration::from_millis(narrow(
                self.batch_linger_ms.map(|Int(v)| v),
                &key("batch_linger_ms"),
                &validate::BRIDGE_BATCH_LINGER_MS,
                whole_millis(defaults.batch_linger),
                errors,
            )),
            drain_rate: narrow(
                self.drain_rate.map(|Int(v)| v),
                &key("drain_rate"),
                &validate::BRIDGE_DRAIN_RATE,
                defaults.drain_rate,
                errors,
            ),
            ramp: Duration::from_secs(narrow(
                self.ramp_secs.map(|Int(v)| v),
                &key("ramp_secs"),
                &validate::BRIDGE_RAMP_SECS,
                defaults.ramp.as_secs(),
                errors,
            )),
            reconnect_min: Duration::from_millis(narrow(
                self.reconnect_min_ms.map(|Int(v)| v),
                &key("reconnect_min_ms"),
                &validate::BRIDGE_RECONNECT_MIN_MS,
                whole_millis(defaults.reconnect_min),
                errors,
            )),
            reconnect_max: Duration::from_millis(narrow(
                self.reconnect_max_ms.map(|Int(v)| v),
                &key("reconnect_max_ms"),
                &validate::BRIDGE_RECONNECT_MAX_MS,
                whole_millis(defaults.reconnect_max),
                errors,
            )),
            max_queued_messages: narrow(
                self.max_queued_messages.map(|Int(v)| v),
                &key("max_queued_messages"),
                &validate::BRIDGE_MAX_QUEUED_MESSAGES,
                defaults.max_queued_messages,
                errors,
            ),
            max_queued_bytes: narrow(
                self.max_queued_bytes.map(|RawSize(v)| i128::from(v)),
                &key("max_queued_bytes"),
                &validate::BRIDGE_MAX_QUEUED_BYTES,
                defaults.max_queued_bytes,
                errors,
            ),
            tls: self.tls.map(RawBridgeTls::into_tls),
            forward: self
                .forward
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .map(|(j, raw)| raw.into_forward(&key(&format!("forward[{j}]")), errors))
                .collect(),
        }
    }
}

impl RawBridgeTls {
    /// A missing `ca_file` is left empty, for stage 2 to report.
    fn into_tls(self) -> BridgeTls {
        BridgeTls {
            ca_file: self.ca_file.map(PathBuf::from).unwrap_or_default(),
            cert_file: self.cert_file.map(PathBuf::from),
            key_file: self.key_file.map(PathBuf::from),
            server_name: self.server_name,
        }
    }
}

impl RawForward {
    /// The rule at `key` (`bridge[i].forward[j]`). A missing `filter` is left
    /// empty, for stage 2 to report.
    fn into_forward(self, key: &str, errors: &mut Vec<ConfigError>) -> Forward {
        let defaults = Forward::default();
        Forward {
            filter: self.filter.unwrap_or_default(),
            direction: choice(
                self.direction.as_deref(),
                &format!("{key}.direction"),
                "direction",
                &Direction::ALL,
                Direction::as_str,
                defaults.direction,
                errors,
            ),
            qos: narrow(
                self.qos.map(|Int(v)| v),
                &format!("{key}.qos"),
                &validate::QOS,
                defaults.qos,
                errors,
            ),
            local_prefix: self.local_prefix.unwrap_or_default(),
            remote_prefix: self.remote_prefix.unwrap_or_default(),
            lane: choice(
                self.lane.as_deref(),
                &format!("{key}.lane"),
                "lane",
                &Lane::ALL,
                Lane::as_str,
                defaults.lane,
                errors,
            ),
            max_age: Some(Duration::from_secs(narrow(
                self.max_age_secs.map(|Int(v)| v),
                &format!("{key}.max_age_secs"),
                &validate::MAX_AGE_SECS,
                0,
                errors,
            )))
            .filter(|d| !d.is_zero()),
        }
    }
}

/// Splits `"host:port"` into a [`BridgeAddress`], or says what is wrong with
/// its form. Only the form is checked here (brackets, a port that fits 16
/// bits); the host's own rules and port 0 are stage 2's, which also sees
/// configs built in code.
fn parse_address(text: &str) -> Result<BridgeAddress, String> {
    if text.is_empty() {
        return Err("empty; write \"host:port\", like \"broker.example.com:1883\"".to_owned());
    }
    if let Some((scheme, rest)) = text.split_once("://") {
        return Err(format!(
            "\"{text}\": write \"host:port\" without \"{scheme}://\", like \"{rest}\""
        ));
    }
    let no_port = |host: &str| {
        format!(
            "\"{text}\" has no port; write \"host:port\", like \"{host}:1883\" (8883 is usual \
             with TLS)"
        )
    };
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let Some((host, after)) = rest.split_once(']') else {
            return Err(format!("\"{text}\" has no closing ']'"));
        };
        if host.parse::<Ipv6Addr>().is_err() {
            return Err(format!(
                "\"{text}\": brackets are for IPv6 addresses, and \"{host}\" is not one"
            ));
        }
        match after.strip_prefix(':') {
            Some(port) => (host, port),
            None if after.is_empty() => return Err(no_port(&format!("[{host}]"))),
            None => {
                return Err(format!(
                    "\"{text}\" is not \"host:port\"; write an IPv6 address like \"[{host}]:1883\""
                ));
            }
        }
    } else {
        match text.split_once(':') {
            None => return Err(no_port(text)),
            Some((_, after)) if after.contains(':') => {
                // Several colons: an IPv6 address without brackets. Which
                // part is the port cannot be told, so the example is fixed.
                return Err(format!(
                    "\"{text}\": an IPv6 address goes in brackets, with the port after them, \
                     like \"[fd00::5]:1883\""
                ));
            }
            Some(split) => split,
        }
    };
    if port.is_empty() {
        return Err(no_port(&text[..text.len() - 1]));
    }
    let port = if port.bytes().all(|b| b.is_ascii_digit()) {
        port.parse::<u16>()
            .map_err(|_| format!("\"{text}\": port must be between 1 and 65535, got {port}"))?
    } else {
        return Err(format!(
            "\"{text}\": port must be between 1 and 65535, got \"{port}\""
        ));
    };
    Ok(BridgeAddress {
        host: host.to_owned(),
        port,
    })
}

/// The value spelt `text` among `all` (named by `name`), or `default` when
/// the key is missing. An unknown spelling is reported as an unknown `what`
/// (`"policy"`, `"protocol"`, ...) with the values listed (and a "did you
/// mean" when `text` is close to one), and replaced by `default`.
fn choice<T: Copy>(
    text: Option<&str>,
    key: &str,
    what: &str,
    all: &[T],
    name: fn(T) -> &'static str,
    default: T,
    errors: &mut Vec<ConfigError>,
) -> T {
    let Some(text) = text else {
        return default;
    };
    if let Some(&value) = all.iter().find(|&&v| name(v) == text) {
        return value;
    }
    let names: Vec<&str> = all.iter().map(|&p| name(p)).collect();
    // Any short name is "close" to an empty text: no hint for one.
    let hint = Some(text)
        .filter(|text| !text.is_empty())
        .and_then(|text| hint::closest(text, &names))
        .map(|name| format!(" (did you mean \"{name}\"?)"))
        .unwrap_or_default();
    let expected: Vec<String> = names.iter().map(|name| format!("\"{name}\"")).collect();
    errors.push(ConfigError::new(
        key,
        format!(
            "unknown {what} \"{text}\"{hint}; expected one of {}",
            expected.join(", ")
        ),
    ));
    default
}

/// `duration` in whole milliseconds, saturating (a default is far below
/// `u64::MAX` milliseconds).
fn whole_millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Converts a raw number into the field's type. A value the type cannot
/// hold is reported with the key's range (the same message stage 2 gives)
/// and replaced by the default; a value the type holds is left for stage 2
/// to range-check.
fn narrow<T: TryFrom<i128>>(
    raw: Option<i128>,
    key: &str,
    range: &IntRange,
    default: T,
    errors: &mut Vec<ConfigError>,
) -> T {
    let Some(value) = raw else {
        return default;
    };
    T::try_from(value).unwrap_or_else(|_| {
        errors.push(range.error(key, value));
        default
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deserializer that only records the field names a struct asks for.
    struct FieldNames;

    #[derive(Debug)]
    struct Found(&'static [&'static str]);

    impl fmt::Display for Found {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{:?}", self.0)
        }
    }

    impl std::error::Error for Found {}

    impl de::Error for Found {
        fn custom<T: fmt::Display>(_: T) -> Self {
            Found(&[])
        }
    }

    impl<'de> Deserializer<'de> for FieldNames {
        type Error = Found;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Found> {
            Err(Found(&[]))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Found> {
            Err(Found(fields))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }

    fn fields_of<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
        match T::deserialize(FieldNames) {
            Ok(_) => panic!("FieldNames never produces a value"),
            Err(Found(fields)) => fields,
        }
    }

    /// The hint tables must list exactly the keys serde accepts.
    #[test]
    fn tables_match_raw_structs() {
        let expected = [
            fields_of::<RawConfig>(),
            fields_of::<RawListener>(),
            fields_of::<RawAuth>(),
            fields_of::<RawLimits>(),
            fields_of::<RawStorage>(),
            fields_of::<RawBridge>(),
            fields_of::<RawBridgeTls>(),
            fields_of::<RawForward>(),
            fields_of::<RawFerry>(),
            fields_of::<RawState>(),
            fields_of::<RawMetrics>(),
            fields_of::<RawLog>(),
        ];
        let actual: Vec<&[&str]> = TABLES.iter().map(|t| t.keys).collect();
        assert_eq!(actual, expected);
    }
}
