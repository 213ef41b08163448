//! ferrymq's configuration: the TOML schema, its defaults and its validation.
//!
//! A config file holds only what differs from the defaults: every key is
//! optional. Loading runs in two stages:
//!
//! 1. serde reads the TOML into raw structs whose fields are all optional.
//!    Unknown keys are collected (every one of them, with a "did you mean"
//!    hint), and a value of the wrong type is reported with its key path.
//! 2. The raw structs are turned into a [`Config`] and checked as a whole.
//!    Every problem is collected, each with its TOML key, so one run of
//!    `ferrymq check-config` shows them all.
//!
//! A [`Config`] built in code (the broker used as a library) goes through the
//! same second stage with [`Config::validate`].
//!
//! This crate does no I/O apart from [`Config::from_file`], reading the host
//! name for the default [`Config::node_id`], and checking that the TLS files
//! a [`Bridge`] names can be read (in the second stage, so configs built in
//! code are checked too).
//!
//! ```
//! use ferrymq_config::Config;
//!
//! let config = Config::from_toml_str(
//!     r#"
//!     [limits]
//!     max_packet_size = "256KiB"
//!     "#,
//! )?;
//! assert_eq!(config.limits.max_packet_size, 256 * 1024);
//! assert_eq!(config.listeners[0].bind.to_string(), "127.0.0.1:1883");
//!
//! let errors = Config::from_toml_str(
//!     r#"
//!     [limits]
//!     receive_maximum = 0
//!     max_conections = 10
//!     "#,
//! )
//! .expect_err("two problems");
//! assert_eq!(
//!     errors.to_string(),
//!     "limits.max_conections: unknown key; did you mean `max_connections`?\n\
//!      limits.receive_maximum: must be between 1 and 65535, got 0"
//! );
//! # Ok::<(), ferrymq_config::ConfigErrors>(())
//! ```

pub mod acl;
mod hint;
mod raw;
pub mod size;
#[cfg(test)]
mod tests;
mod validate;

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The whole configuration of one ferrymq node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `node_id`: a human label for this node (logs, `$SYS`, bridge
    /// metadata); not an identity, since cloned gateway images share host
    /// names. Default: the host name, or `"ferrymq"` when it cannot be read.
    pub node_id: String,
    /// `data_dir`: the node's data directory, created and locked at start so
    /// two brokers never share one. Default: `./ferrymq-data`.
    pub data_dir: PathBuf,
    /// `[[listener]]`: the sockets clients connect to. Default: one TCP
    /// listener on `127.0.0.1:1883`. A file that lists any listener replaces
    /// the default one.
    pub listeners: Vec<Listener>,
    /// `[auth]`: who may connect.
    pub auth: Auth,
    /// `[limits]`: bounds that protect the node from its clients.
    pub limits: Limits,
    /// `[storage]`: how long sessions live, how much each may queue, how
    /// writes reach the disk and how much of it the store may use.
    pub storage: Storage,
    /// `[[bridge]]`: store-and-forward uplinks to upstream MQTT brokers.
    /// Default: none.
    pub bridges: Vec<Bridge>,
    /// `[ferry]`: this node as the receiving end of other ferrymq nodes'
    /// bridges.
    pub ferry: Ferry,
    /// `[state]`: topics whose retained values are merged across nodes.
    pub state: State,
    /// `[metrics]`: Prometheus metrics, health checks, the status page and
    /// `$SYS` topics.
    pub metrics: Metrics,
    /// `[log]`: what the node logs, and how.
    pub log: Log,
}

/// `[log]`: the log written to standard error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log {
    /// `level`: `"error"`, `"warn"`, `"info"`, `"debug"` or `"trace"`,
    /// or per module, like `"info,ferrymq_bridge=debug"`. The `RUST_LOG`
    /// environment variable, when set, wins. Default: `"info"`.
    pub level: String,
    /// `format`: `"text"` (one line per event) or `"json"` (one JSON
    /// object per line, for log collectors). Default: `"text"`.
    pub format: LogFormat,
}

/// `[log] format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One line of text per event.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// `[metrics]`: what the node tells about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metrics {
    /// `enabled`: serve Prometheus metrics (`/metrics`), `/healthz`,
    /// `/readyz` and the status page (`/`) over HTTP on `bind`. Default:
    /// false.
    pub enabled: bool,
    /// `bind`: the HTTP address. Default: `"127.0.0.1:9464"`.
    pub bind: SocketAddr,
    /// `sys_interval_secs`: how often the `$SYS/...` topics are published
    /// (retained); 0 turns them off. Default: 0. Range: 0 ..= 86400.
    pub sys_interval: Duration,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            enabled: false,
            bind: SocketAddr::from(([127, 0, 0, 1], 9464)),
            sys_interval: Duration::ZERO,
        }
    }
}

/// `[state]`: retained values merged across nodes as last-writer-wins
/// registers stamped with a hybrid logical clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// `topics`: topic filters (`+` and `#` allowed, no `$share/`) whose
    /// retained messages are state: each carries a stamp (the `ferry-stamp`
    /// user property), the latest stamp wins on every node, a cleared
    /// value is a stamped tombstone, and every bridge carries these
    /// topics both ways. Default: none.
    pub topics: Vec<String>,
    /// `max_clock_skew_secs`: a stamp from another node at most this far
    /// ahead of this node's clock is taken as it is; one further ahead is
    /// pulled back to it, so one node's wrong clock cannot win for ever.
    /// Default: 60 seconds. Range: 1 ..= 31536000.
    pub max_clock_skew: Duration,
    /// `tombstone_ttl_secs`: how long a cleared value's tombstone is kept
    /// (it stops an older value coming back from a node that was away).
    /// Default: 30 days. Range: 60 ..= 4294967295 seconds.
    pub tombstone_ttl: Duration,
}

impl Default for State {
    fn default() -> Self {
        State {
            topics: Vec::new(),
            max_clock_skew: Duration::from_secs(60),
            tombstone_ttl: Duration::from_secs(30 * 86_400),
        }
    }
}

/// `[ferry]`: whose message ids this node honours, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ferry {
    /// `trusted_clients`: client id patterns (`*` matches any run of
    /// characters) of the bridges whose message ids (the `ferry-id` user
    /// property) this node honours: a message whose id it has taken
    /// before is acknowledged and dropped, so each takes effect once.
    /// Other clients' ids are removed from their messages, so no client
    /// can suppress another node's messages by forging ids. Default: none.
    pub trusted_clients: Vec<String>,
    /// `forget_after_secs`: an origin (a sending node's queue in one of
    /// its runs) that sent nothing for this long is forgotten; a resend
    /// older than that would be taken again. Default: 30 days. Range: 60
    /// ..= 4294967295 seconds.
    pub forget_after: Duration,
}

impl Default for Ferry {
    fn default() -> Self {
        Ferry {
            trusted_clients: Vec::new(),
            forget_after: Duration::from_secs(30 * 86_400),
        }
    }
}

/// One `[[listener]]`: an address and the protocol spoken on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// `bind`: the address and port to listen on (required). Port 0 lets the
    /// operating system pick a free port.
    pub bind: SocketAddr,
    /// `protocol`: default `"tcp"`.
    pub protocol: ListenerProtocol,
    /// `backlog`: how many connections the kernel queues for this listener
    /// before they are accepted, so a fleet reconnecting at once (after a
    /// power cut) is not dropped. `None` (the default): the system's
    /// maximum (`/proc/sys/net/core/somaxconn`). Range: 1 ..= 65535 (the
    /// kernel caps it at its maximum).
    pub backlog: Option<u32>,
    /// The TLS settings, for `protocol = "tls"` and `"wss"` (and only
    /// then).
    pub tls: Option<ListenerTls>,
    /// `path`: the HTTP path a WebSocket client asks for, for `protocol =
    /// "ws"` and `"wss"` (and only then). Default: `"/mqtt"`.
    pub path: Option<String>,
}

/// What a listener speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ListenerProtocol {
    /// MQTT over plain TCP (`"tcp"`).
    #[default]
    Tcp,
    /// MQTT over TLS (`"tls"`).
    Tls,
    /// MQTT over WebSocket (`"ws"`), subprotocol `mqtt`.
    Ws,
    /// MQTT over WebSocket over TLS (`"wss"`).
    Wss,
}

/// The lowest TLS version a listener accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum MinTls {
    /// TLS 1.2 and 1.3 (`"1.2"`).
    V1_2,
    /// TLS 1.3 only (`"1.3"`).
    #[default]
    V1_3,
}

/// The TLS keys of a `[[listener]]` with `protocol = "tls"` or `"wss"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerTls {
    /// `cert`: the server's certificate chain (PEM), leaf first (required).
    pub cert: PathBuf,
    /// `key`: its private key (PEM) (required).
    pub key: PathBuf,
    /// `client_ca`: CA certificates (PEM) that sign client certificates
    /// (mutual TLS). Default: none (clients show no certificate).
    pub client_ca: Option<PathBuf>,
    /// `require_client_cert`: with `client_ca`, refuse clients without a
    /// certificate (otherwise one is verified when shown). Default: true.
    pub require_client_cert: bool,
    /// `min_tls`: `"1.3"` (default) or `"1.2"`.
    pub min_tls: MinTls,
    /// `use_identity_as_username`: with `client_ca`, the identity of the
    /// client's certificate (`identity_from`) is its user name (for the
    /// ACL), and no password is asked. Default: false.
    pub use_identity_as_username: bool,
    /// `identity_from`: which name of a client certificate is its
    /// identity (for ACL `identity` rules and `use_identity_as_username`).
    /// Default: the common name.
    pub identity_from: IdentityFrom,
}

/// Which name of a client certificate is the client's identity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum IdentityFrom {
    /// The subject's common name (`"common-name"`).
    #[default]
    CommonName,
    /// The first subject alternative name that is a DNS name, an email
    /// address or a URI (`"san"`).
    San,
}

/// `[auth]`: who may connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    /// `allow_anonymous`: clients without a user name may connect from a
    /// loopback address (from anywhere only with `allow_anonymous_remote`),
    /// so a default install is never open to the network. Default: `true`.
    pub allow_anonymous: bool,
    /// `allow_anonymous_remote`: anonymous clients may connect from any
    /// address, not only loopback. Logged as a warning at every start.
    /// Default: `false`.
    pub allow_anonymous_remote: bool,
    /// `password_file`: `user:hash` lines (argon2id, written by `ferrymq
    /// passwd FILE USER`); a client naming a user must give its password.
    /// Relative to the working directory, like `data_dir`. Default: none.
    pub password_file: Option<PathBuf>,
    /// `acl_file`: who may publish and subscribe where ([`acl`]); once set,
    /// nothing is allowed that no rule grants. Default: none (everything
    /// allowed to whoever may connect).
    pub acl_file: Option<PathBuf>,
}

/// `[limits]`: bounds that keep one node healthy whatever its clients do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// `max_connections`: caps open client connections, so a flood of
    /// clients cannot exhaust file descriptors or memory. Default: 100000.
    pub max_connections: u32,
    /// `max_connections_per_address`: caps open connections from one
    /// source address, so one host cannot take every connection; beyond
    /// it new connections from that address are closed at once. 0 means no
    /// limit (the default: clients behind one NAT share an address).
    pub max_connections_per_address: u32,
    /// `max_packet_size` (bytes; `"1MiB"` style accepted): the largest packet
    /// a client may send us, so one packet cannot take all memory. Announced
    /// as MQTT 5 Maximum Packet Size. Default: 1 MiB. Range: 64 ..=
    /// 268435460 (the largest packet MQTT can express).
    pub max_packet_size: u32,
    /// `receive_maximum`: how many QoS 1/2 publishes one client may have
    /// unacknowledged towards us (MQTT 5 Receive Maximum), bounding per-client
    /// in-flight state. Default: 1024.
    pub receive_maximum: u16,
    /// `max_keepalive_secs`: larger client keepalives are capped to this
    /// (MQTT 5 Server Keep Alive), so dead clients are noticed in bounded
    /// time. Default: 1 hour.
    pub max_keepalive: Duration,
    /// `connect_timeout_secs`: how long a new connection may take to send
    /// CONNECT, so idle sockets cannot pile up. Default: 10 s.
    pub connect_timeout: Duration,
    /// `topic_alias_maximum`: how many topic aliases one MQTT 5 client may
    /// define towards us (MQTT 5 Topic Alias Maximum, announced in CONNACK),
    /// bounding the per-client alias table. 0 means clients may not use
    /// topic aliases. Default: 64. Range: 0 ..= 65535.
    pub topic_alias_maximum: u16,
    /// `server_topic_aliases`: the most topic aliases we use towards one MQTT
    /// 5 client, never more than the client's own Topic Alias Maximum. 0
    /// means we never send topic aliases. Default: 16. Range: 0 ..= 65535.
    pub server_topic_aliases: u16,
    /// `max_topic_levels`: the most levels (`/`-separated parts) a topic
    /// name or filter may have: in a PUBLISH, a will, a SUBSCRIBE or
    /// UNSUBSCRIBE, from a bridge, and in a bridge's forward rules. Bounds
    /// the memory and time one topic can cost the topic trees. 0 means no
    /// limit. Default: 200 (Mosquitto's fixed limit). Range: 0 ..= 65536.
    pub max_topic_levels: u32,
    /// `max_subscriptions_per_client`: the most subscriptions (distinct
    /// filters, shared ones included) one network client's session may
    /// hold; a SUBSCRIBE beyond it is refused for the new filters (MQTT 5
    /// 0x97 Quota exceeded, 3.1.1 0x80), so one client cannot grow the
    /// topic tree without bound. 0 means no limit. Default: 10000.
    pub max_subscriptions_per_client: u32,
    /// `max_retained_messages`: the most topics with a retained message.
    /// Past it a retained publish on a topic that has none is delivered
    /// but not retained (counted, logged); replacing or clearing a held
    /// one always works, and state topics (`[state]`) are never turned
    /// away (they must converge). Each costs memory (about 600 bytes with
    /// a 100-byte payload) and disk. 0 means no limit. Default: 1000000.
    pub max_retained_messages: u32,
    /// `max_publish_rate`: the most PUBLISH packets per second one network
    /// client may send, with bursts of up to a second's worth; a faster
    /// client is slowed (its socket is not read until it is within the
    /// rate again), others are not. 0 means no limit (the default).
    pub max_publish_rate: u32,
    /// `dormant_connections`: an idle plain-TCP connection gives up its
    /// task and its registration with the async runtime, and waits in one
    /// epoll set until its socket or its session queue wakes it (about
    /// 0.9 instead of 1.7 KiB per idle connection; waking thousands at
    /// once costs more than waking tasks). On by default (a reload applies
    /// it to connections accepted after it).
    pub dormant_connections: bool,
    /// `shed_cpu_percent`: when the process has used more than this share
    /// of the machine's CPU for `shed_window_secs`, load is shed: first
    /// QoS 0 publishes on topics not in `critical_topics` are dropped
    /// (counted), then, if it stays above for another window, new
    /// connections are refused (MQTT 5 0x89 Server busy, 3.1.1 0x03).
    /// Each window below steps back. 0 turns it off. Default: 90.
    /// Range: 0 ..= 100.
    pub shed_cpu_percent: u8,
    /// `shed_memory` (`"512MiB"` style accepted): the same for the
    /// process's resident memory. 0 turns it off (the default).
    pub shed_memory: u64,
    /// `shed_window_secs`: how long the load must stay above (or below)
    /// before shedding steps up (or back). Default: 5. Range: 1 ..= 3600.
    pub shed_window: Duration,
    /// `critical_topics`: topic filters whose messages are never shed
    /// (e.g. `"alarms/#"`). Default: none.
    pub critical_topics: Vec<String>,
}

/// `[storage]`: session lifetime, the bounds on each session's queue of
/// messages waiting for delivery, when writes to the store are acknowledged
/// and the store's disk budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Storage {
    /// `max_session_expiry_secs`: caps the Session Expiry Interval MQTT 5
    /// clients ask for, and is the expiry of MQTT 3.1.1 persistent (clean
    /// session 0) sessions. Default: 7 days. Range: 0 ..= 4294967295 (MQTT's
    /// 32-bit seconds, where 4294967295 means never).
    pub max_session_expiry: Duration,
    /// `max_queued_messages`: the most messages queued for one session,
    /// online or offline, not counting those in flight. Default: 10000.
    /// Range: 1 ..= 100000000.
    pub max_queued_messages: u32,
    /// `max_queued_bytes` (bytes; `"64MiB"` style accepted): the most payload
    /// bytes queued for one session, so one slow or absent subscriber cannot
    /// take all memory. Default: 64 MiB. Range: 1 KiB ..= 1 TiB.
    pub max_queued_bytes: u64,
    /// `max_queued_memory` (bytes; `"256MiB"` style accepted): the most
    /// memory all queues together hold in queued messages (each entry's
    /// bookkeeping, and each payload once while any queue holds it). At the bound a stored queue keeps new
    /// messages on disk only, and a queue held in memory only (a clean
    /// session, QoS 0) that is not empty counts as full: `queue_full`
    /// applies. Messages in flight are not counted (the Receive Maximum
    /// bounds them). 0 = no bound. Default: 256 MiB. Range: 0 ..= 1 TiB.
    pub max_queued_memory: u64,
    /// `queue_full`: what happens to a message for a session whose queue is
    /// at either bound. Every drop is counted. Default: `"drop-oldest"`.
    pub queue_full: QueueFull,
    /// `queue_qos0`: also queue QoS 0 messages for offline persistent
    /// sessions (by default they are only delivered live). Default: `false`.
    pub queue_qos0: bool,
    /// `durability`: when a write to the store is acknowledged, and so what
    /// a killed process or a power loss can lose. Default: `"group-commit"`.
    pub durability: Durability,
    /// `sync_interval_ms`: how often the write-ahead log is synced with
    /// [`Durability::Interval`]. Only meaningful with that policy, but
    /// checked whatever the policy. Default: 100 ms. Range: 1 ..= 60000
    /// milliseconds.
    pub sync_interval: Duration,
    /// `max_disk_bytes` (bytes; `"8GiB"` style accepted): the disk budget of
    /// the data directory. When the store reaches it, the `queue_full`
    /// policy applies to new messages for persistent sessions. Default: 8
    /// GiB. Range: 16 MiB ..= 1 PiB.
    pub max_disk_bytes: u64,
    /// `low_disk_percent`: below this much free space on the filesystem
    /// holding the store, the node warns (log, `ferrymq_disk_low`,
    /// `$SYS/ferrymq/disk/low`). 0 turns the warning off. Default: 10.
    /// Range: 0 ..= 99.
    pub low_disk_percent: u8,
    /// `bridge_reserve_percent`: the share of `max_disk_bytes` kept for the
    /// bridges' queues. Other persistent sessions' queues (and retained
    /// messages) may fill the rest only: past it, `queue_full` applies to
    /// them while the bridges still queue, so one abandoned client cannot
    /// take the space an uplink's backlog needs. 0 = no reserve. Default:
    /// 20. Range: 0 ..= 90.
    pub bridge_reserve_percent: u8,
    /// `max_age_secs`: a message queued for a network client's session
    /// that has waited longer than this is dropped (and counted) when its
    /// turn to be delivered comes, instead of being delivered. 0 means no
    /// limit (the default). Bridges have their own, per forward rule.
    /// Range: 0 ..= 4294967295.
    pub max_age: Option<Duration>,
}

/// `queue_full`: what to do with a message for a session whose queue is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum QueueFull {
    /// Evict the oldest queued message to make room (`"drop-oldest"`).
    #[default]
    DropOldest,
    /// Discard the new message (`"drop-newest"`).
    DropNewest,
    /// Refuse QoS 1/2 publishes: reason code 0x97 (Quota exceeded) in MQTT
    /// 5, no acknowledgement in 3.1.1 (`"refuse"`).
    Refuse,
    /// The publisher waits until there is room (`"block"`).
    Block,
}

/// `durability`: when a write to the store is acknowledged, relative to
/// syncing the write-ahead log (WAL) to disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Durability {
    /// One writer writes everything queued so far as one batch and syncs the
    /// WAL once for it, acknowledging each waiter after the sync: nothing
    /// acknowledged is lost, even on power loss (`"group-commit"`).
    #[default]
    GroupCommit,
    /// One WAL sync per write: the same guarantee as
    /// [`Durability::GroupCommit`], slower (`"sync-each"`).
    SyncEach,
    /// Acknowledge after the WAL write and sync the WAL every
    /// [`Storage::sync_interval`]: survives a killed process; on power loss
    /// loses at most one interval of acknowledged writes (`"interval"`).
    Interval,
}

/// One `[[bridge]]`: a store-and-forward uplink to an upstream MQTT broker.
/// Messages that match a `forward` rule are queued durably on this node and
/// sent when the upstream is reachable; the upstream keeps a session for
/// the bridge, so messages for this node wait there while the link is down.
///
/// Every key but `name`, `addresses` and `forward` has a default. In a
/// file, `client_id` defaults to `"{node_id}-{name}"`; the parser fills it
/// in, so [`Bridge::client_id`] is always the identifier used.
///
/// ```
/// use std::time::Duration;
/// use ferrymq_config::{BridgeProtocol, Config, Direction};
///
/// let config = Config::from_toml_str(
///     r#"
///     node_id = "edge-01"
///
///     [[bridge]]
///     name = "regional"
///     addresses = ["10.0.0.5:1883", "[fd00::5]:1883"]
///     forward = [ { filter = "sensors/#", remote_prefix = "site-1/" } ]
///     "#,
/// )?;
/// let bridge = &config.bridges[0];
/// assert_eq!(bridge.client_id, "edge-01-regional");
/// assert_eq!(bridge.addresses[1].host, "fd00::5");
/// assert_eq!(bridge.addresses[1].to_string(), "[fd00::5]:1883");
/// assert_eq!(bridge.protocol, BridgeProtocol::V5);
/// assert_eq!(bridge.keepalive, Duration::from_secs(30));
/// assert_eq!(bridge.forward[0].direction, Direction::Out);
/// assert_eq!(bridge.forward[0].qos, 1);
/// # Ok::<(), ferrymq_config::ConfigErrors>(())
/// ```
///
/// A bridge built in code starts from [`Bridge::default()`], which is not
/// valid until `name`, `addresses`, `client_id` and `forward` are set:
///
/// ```
/// use ferrymq_config::{Bridge, BridgeAddress, Config, Forward};
///
/// let mut config = Config::default();
/// config.bridges.push(Bridge {
///     name: "regional".into(),
///     addresses: vec![BridgeAddress { host: "broker.example.com".into(), port: 1883 }],
///     client_id: "edge-01-regional".into(),
///     forward: vec![Forward { filter: "sensors/#".into(), ..Forward::default() }],
///     ..Bridge::default()
/// });
/// assert_eq!(config.validate(), Ok(()));
///
/// config.bridges[0].forward[0].filter = "sensors/#/temp".into();
/// assert_eq!(
///     config.validate().expect_err("bad filter").to_string(),
///     "bridge[0].forward[0].filter: \"sensors/#/temp\" is not a valid topic filter: \
///      '#' must be the whole last level of a filter"
/// );
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Bridge {
    /// `name` (required): names the bridge in logs, metrics and its queue,
    /// and in the default `client_id`. Unique among bridges; 1 to 64 of
    /// `A-Z a-z 0-9 _ -`.
    pub name: String,
    /// `addresses` (required, at least one): the upstream broker as
    /// `"host:port"` strings (host: a DNS name, an IPv4 address or an IPv6
    /// address in brackets, `"[fd00::5]:1883"`; the port is required). They
    /// are tried in order, moving to the next when one fails.
    pub addresses: Vec<BridgeAddress>,
    /// `kind`: what the upstream speaks. Default: `"mqtt"`.
    pub kind: BridgeKind,
    /// `protocol`: the MQTT version spoken to the upstream, `"5"` or
    /// `"3.1.1"`. Default: `"5"`.
    pub protocol: BridgeProtocol,
    /// `client_id`: the bridge's MQTT client identifier upstream, and so the
    /// name of its session there. Default (also when written `""`):
    /// `"{node_id}-{name}"`. 1 to 65535 bytes of UTF-8 without U+0000;
    /// a 3.1.1 upstream may refuse identifiers longer than 23 characters or
    /// outside `0-9 a-z A-Z` (its spec only guarantees those).
    pub client_id: String,
    /// `username`: sent in CONNECT when set. Default: none.
    pub username: Option<String>,
    /// `password`: sent in CONNECT when set. MQTT 3.1.1 forbids a password
    /// without a username. The file holds it in clear: keep the file
    /// readable by ferrymq only. Default: none.
    pub password: Option<String>,
    /// `keepalive_secs`: the MQTT keepalive asked of the upstream. The
    /// bridge relies on it to notice a half-open link, so 0 (off) is
    /// refused. Default: 30 s. Range: 1 ..= 65535 seconds.
    pub keepalive: Duration,
    /// `connect_timeout_secs`: how long one connection attempt (TCP, TLS,
    /// CONNECT to CONNACK) may take before the next address is tried.
    /// Default: 10 s. Range: 1 ..= 300 seconds.
    pub connect_timeout: Duration,
    /// `session_expiry_secs`: the Session Expiry Interval of the bridge's
    /// session upstream, so the upstream keeps messages for this node while
    /// the link is down. 0 ends the session at each disconnect;
    /// 4294967295 means never. A 3.1.1 upstream has no expiry: any value
    /// above 0 asks it for a persistent session (clean session 0).
    /// Default: 7 days. Range: 0 ..= 4294967295 seconds.
    pub session_expiry: Duration,
    /// `inflight`: the most QoS 1/2 publishes sent upstream and not yet
    /// acknowledged (with `kind = "ferrymq"`: batches); the bridge also
    /// keeps below the upstream's Receive Maximum. Default: 100. Range: 1
    /// ..= 65535.
    pub inflight: u16,
    /// `batch_size`: with `kind = "ferrymq"`, the most messages in one
    /// batch. Default: 500. Range: 1 ..= 65535.
    pub batch_size: u16,
    /// `batch_bytes` (`"256KiB"` style accepted): with `kind = "ferrymq"`,
    /// the most message bytes in one batch before compression (at least
    /// one message goes in every batch). Default: 256 KiB. Range: 1 KiB
    /// ..= 64 MiB.
    pub batch_bytes: u64,
    /// `batch_linger_ms`: with `kind = "ferrymq"`, how long a batch that
    /// is not full waits for more messages before it goes (the backlog
    /// lane only; a backlog fills its batches without waiting). 0 sends at
    /// once. Default: 0. Range: 0 ..= 60000.
    pub batch_linger: Duration,
    /// `drain_rate`: the most messages per second forwarded upstream, so a
    /// node that reconnects after a long outage cannot flood the upstream
    /// with its backlog. 0 means unlimited. Default: 0. Range: 0 ..=
    /// 10000000 messages per second.
    pub drain_rate: u32,
    /// `ramp_secs`: after each reconnect, the forwarding rate rises from 10%
    /// of `drain_rate` (of an internal rate when `drain_rate` is 0) to the
    /// full rate over this time; 0 starts at the full rate. Default: 10 s.
    /// Range: 0 ..= 3600 seconds.
    pub ramp: Duration,
    /// `reconnect_min_ms`: the shortest wait before reconnecting. Waits grow
    /// exponentially from here to `reconnect_max_ms`, each drawn at random
    /// below its bound (full jitter), so many nodes that lose the same
    /// upstream do not return at once. Default: 500 ms. Range: 10 ..=
    /// 3600000 milliseconds.
    pub reconnect_min: Duration,
    /// `reconnect_max_ms`: the longest wait before reconnecting; at least
    /// `reconnect_min_ms`. Default: 60 s. Range: 10 ..= 86400000
    /// milliseconds.
    pub reconnect_max: Duration,
    /// `max_queued_messages`: the most messages the bridge's durable
    /// outbound queue holds (messages waiting to go upstream while the link
    /// is down or slow). Default: 10000000. Range: 1 ..= 1000000000.
    pub max_queued_messages: u32,
    /// `max_queued_bytes` (bytes; `"1GiB"` style accepted): the most payload
    /// bytes in the bridge's durable outbound queue. Default: 1 GiB. Range:
    /// 1 KiB ..= 1 PiB.
    pub max_queued_bytes: u64,
    /// `[bridge.tls]`: when present, the link to the upstream uses TLS.
    /// Default: none (plain TCP).
    pub tls: Option<BridgeTls>,
    /// `[[bridge.forward]]` (or `forward = [ { ... } ]`, the same TOML):
    /// which topics cross the bridge, in which direction. At least one.
    pub forward: Vec<Forward>,
}

/// One upstream address of a [`Bridge`]: `"host:port"` in the file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BridgeAddress {
    /// A DNS name (resolved at each connection attempt), an IPv4 address,
    /// or an IPv6 address (without the brackets of the file form).
    pub host: String,
    /// The TCP port, 1 ..= 65535.
    pub port: u16,
}

/// `[bridge.tls]`: TLS towards the upstream. Relative paths are relative to
/// the working directory of the broker, as `data_dir` is (not to the config
/// file). Validation checks that each file is a readable regular file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeTls {
    /// `ca_file` (required): PEM certificates of the authorities trusted to
    /// sign the upstream's certificate.
    pub ca_file: PathBuf,
    /// `cert_file`: PEM certificate chain presented to the upstream (mutual
    /// TLS). Set with `key_file` or not at all. Default: none.
    pub cert_file: Option<PathBuf>,
    /// `key_file`: PEM private key of `cert_file`. Set with `cert_file` or
    /// not at all. Default: none.
    pub key_file: Option<PathBuf>,
    /// `server_name`: the name the upstream's certificate must carry (and
    /// the SNI sent). Default: none, meaning the host of each address.
    pub server_name: Option<String>,
}

/// One `[[bridge.forward]]` rule, with Mosquitto's bridge semantics: the
/// local subscription is `local_prefix + filter`, the upstream subscription
/// is `remote_prefix + filter`, and a forwarded message's topic has the one
/// prefix replaced by the other. With `local_prefix = ""`,
/// `remote_prefix = "site-1/"` and `filter = "sensors/#"`, a local
/// `sensors/t1` goes upstream as `site-1/sensors/t1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// `filter` (required): an MQTT topic filter (`+` and `#` wildcards
    /// allowed; `$share/` filters are not).
    pub filter: String,
    /// `direction`: `"out"` (local to upstream), `"in"` (upstream to local)
    /// or `"both"`. Default: `"out"`.
    pub direction: Direction,
    /// `qos`: the QoS of the subscriptions on both sides, and so the highest
    /// QoS forwarded. 0, 1 or 2. Default: 1.
    pub qos: u8,
    /// `local_prefix`: prepended to `filter` on this node's side; no
    /// wildcards and no U+0000. Usually ends with `/`. Default: `""`.
    pub local_prefix: String,
    /// `remote_prefix`: prepended to `filter` on the upstream's side; no
    /// wildcards and no U+0000. Usually ends with `/`. Default: `""`.
    pub remote_prefix: String,
    /// `lane`: `"backlog"` (one queue with the bridge's other rules, in
    /// order) or `"live"` (a queue of its own that goes up ahead of the
    /// backlog, for alarms that must not wait behind an outage's worth of
    /// readings). Only for `direction = "out"`. Default: `"backlog"`.
    pub lane: Lane,
    /// `max_age_secs`: a message this rule sends up that has waited longer
    /// than this is dropped (and counted) when the bridge reaches it,
    /// instead of being sent: data too old to matter after a long outage.
    /// 0 means no limit (the default). Range: 0 ..= 4294967295.
    pub max_age: Option<Duration>,
}

/// `lane` of a forward rule: which of a bridge's two queues it feeds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Lane {
    /// The bridge's queue, in order (`"backlog"`).
    #[default]
    Backlog,
    /// A queue that goes up ahead of the backlog (`"live"`).
    Live,
}

impl Lane {
    /// Every lane, in the order error messages list them.
    pub(crate) const ALL: [Lane; 2] = [Lane::Backlog, Lane::Live];

    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Backlog => "backlog",
            Lane::Live => "live",
        }
    }
}

/// `kind`: what the upstream of a bridge speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum BridgeKind {
    /// Plain MQTT, to any broker (`"mqtt"`).
    #[default]
    Mqtt,
    /// A ferrymq upstream that trusts this bridge (`"ferrymq"`): queued
    /// messages travel in compressed batches, each taken exactly once.
    /// Any other upstream gets plain MQTT 5 (with a warning).
    Ferrymq,
}

/// `protocol`: the MQTT version a bridge speaks to its upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum BridgeProtocol {
    /// MQTT 5.0 (`"5"`).
    #[default]
    V5,
    /// MQTT 3.1.1 (`"3.1.1"`).
    V311,
}

/// `direction`: which way a [`Forward`] rule carries messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From this node to the upstream (`"out"`).
    #[default]
    Out,
    /// From the upstream to this node (`"in"`).
    In,
    /// Both ways (`"both"`).
    Both,
}

impl Default for Config {
    /// The embedded defaults; the same values as [`default_config_toml`].
    fn default() -> Self {
        Config {
            node_id: default_node_id(),
            data_dir: PathBuf::from("./ferrymq-data"),
            listeners: vec![Listener::default()],
            auth: Auth::default(),
            limits: Limits::default(),
            storage: Storage::default(),
            bridges: Vec::new(),
            ferry: Ferry::default(),
            state: State::default(),
            metrics: Metrics::default(),
            log: Log::default(),
        }
    }
}

impl Default for Listener {
    /// A TCP listener on `127.0.0.1:1883`.
    fn default() -> Self {
        Listener {
            bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 1883)),
            protocol: ListenerProtocol::Tcp,
            backlog: None,
            tls: None,
            path: None,
        }
    }
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            allow_anonymous: true,
            allow_anonymous_remote: false,
            password_file: None,
            acl_file: None,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 100_000,
            max_connections_per_address: 0,
            max_packet_size: 1 << 20,
            receive_maximum: 1024,
            max_keepalive: Duration::from_secs(3600),
            connect_timeout: Duration::from_secs(10),
            topic_alias_maximum: 64,
            server_topic_aliases: 16,
            max_topic_levels: 200,
            max_subscriptions_per_client: 10_000,
            max_retained_messages: 1_000_000,
            max_publish_rate: 0,
            dormant_connections: true,
            shed_cpu_percent: 90,
            shed_memory: 0,
            shed_window: Duration::from_secs(5),
            critical_topics: Vec::new(),
        }
    }
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            max_session_expiry: Duration::from_secs(7 * 24 * 3600),
            max_queued_messages: 10_000,
            max_queued_bytes: 64 << 20,
            max_queued_memory: 256 << 20,
            queue_full: QueueFull::DropOldest,
            queue_qos0: false,
            durability: Durability::GroupCommit,
            sync_interval: Duration::from_millis(100),
            max_disk_bytes: 8 << 30,
            low_disk_percent: 10,
            bridge_reserve_percent: 20,
            max_age: None,
        }
    }
}

impl Default for Bridge {
    /// The file's defaults for every key that has one; `name`, `addresses`,
    /// `client_id` and `forward` are empty, so a default bridge is not valid
    /// until they are set.
    fn default() -> Self {
        Bridge {
            name: String::new(),
            addresses: Vec::new(),
            kind: BridgeKind::Mqtt,
            protocol: BridgeProtocol::V5,
            client_id: String::new(),
            username: None,
            password: None,
            keepalive: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            session_expiry: Duration::from_secs(7 * 24 * 3600),
            inflight: 100,
            batch_size: 500,
            batch_bytes: 256 << 10,
            batch_linger: Duration::ZERO,
            drain_rate: 0,
            ramp: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(60),
            max_queued_messages: 10_000_000,
            max_queued_bytes: 1 << 30,
            tls: None,
            forward: Vec::new(),
        }
    }
}

/// Every field, with the password replaced by `"<redacted>"` so that logging
/// a config does not leak it.
impl fmt::Debug for Bridge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructured so that a new field cannot be forgotten here.
        let Bridge {
            name,
            addresses,
            kind,
            protocol,
            client_id,
            username,
            password,
            keepalive,
            connect_timeout,
            session_expiry,
            inflight,
            batch_size,
            batch_bytes,
            batch_linger,
            drain_rate,
            ramp,
            reconnect_min,
            reconnect_max,
            max_queued_messages,
            max_queued_bytes,
            tls,
            forward,
        } = self;
        f.debug_struct("Bridge")
            .field("name", name)
            .field("addresses", addresses)
            .field("kind", kind)
            .field("protocol", protocol)
            .field("client_id", client_id)
            .field("username", username)
            .field("password", &password.as_ref().map(|_| "<redacted>"))
            .field("keepalive", keepalive)
            .field("connect_timeout", connect_timeout)
            .field("session_expiry", session_expiry)
            .field("inflight", inflight)
            .field("batch_size", batch_size)
            .field("batch_bytes", batch_bytes)
            .field("batch_linger", batch_linger)
            .field("drain_rate", drain_rate)
            .field("ramp", ramp)
            .field("reconnect_min", reconnect_min)
            .field("reconnect_max", reconnect_max)
            .field("max_queued_messages", max_queued_messages)
            .field("max_queued_bytes", max_queued_bytes)
            .field("tls", tls)
            .field("forward", forward)
            .finish()
    }
}

/// `host:port`, with an IPv6 host in brackets: `[fd00::5]:1883`.
impl fmt::Display for BridgeAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl Default for Forward {
    /// The file's defaults: direction out, QoS 1, no prefixes. The filter
    /// is empty, so a default rule is not valid until it is set.
    fn default() -> Self {
        Forward {
            filter: String::new(),
            direction: Direction::Out,
            qos: 1,
            local_prefix: String::new(),
            remote_prefix: String::new(),
            lane: Lane::Backlog,
            max_age: None,
        }
    }
}

impl BridgeKind {
    /// The name used in the config file, e.g. `"mqtt"`.
    pub fn as_str(self) -> &'static str {
        match self {
            BridgeKind::Mqtt => "mqtt",
            BridgeKind::Ferrymq => "ferrymq",
        }
    }
}

impl fmt::Display for BridgeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl BridgeProtocol {
    /// Every version, in the order error messages list them.
    pub(crate) const ALL: [BridgeProtocol; 2] = [BridgeProtocol::V5, BridgeProtocol::V311];

    /// The name used in the config file, e.g. `"3.1.1"`.
    pub fn as_str(self) -> &'static str {
        match self {
            BridgeProtocol::V5 => "5",
            BridgeProtocol::V311 => "3.1.1",
        }
    }
}

impl fmt::Display for BridgeProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Direction {
    /// Every direction, in the order error messages list them.
    pub(crate) const ALL: [Direction; 3] = [Direction::Out, Direction::In, Direction::Both];

    /// The name used in the config file, e.g. `"out"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Out => "out",
            Direction::In => "in",
            Direction::Both => "both",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ListenerProtocol {
    /// The name used in the config file, e.g. `"tcp"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ListenerProtocol::Tcp => "tcp",
            ListenerProtocol::Tls => "tls",
            ListenerProtocol::Ws => "ws",
            ListenerProtocol::Wss => "wss",
        }
    }

    /// Whether the listener runs TLS (`tls`, `wss`).
    pub fn is_tls(self) -> bool {
        matches!(self, ListenerProtocol::Tls | ListenerProtocol::Wss)
    }

    /// Whether the listener speaks WebSocket (`ws`, `wss`).
    pub fn is_websocket(self) -> bool {
        matches!(self, ListenerProtocol::Ws | ListenerProtocol::Wss)
    }
}

/// The HTTP path of a WebSocket listener without `path`.
pub const DEFAULT_WEBSOCKET_PATH: &str = "/mqtt";

impl fmt::Display for ListenerProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl QueueFull {
    /// Every policy, in the order error messages list them.
    pub(crate) const ALL: [QueueFull; 4] = [
        QueueFull::DropOldest,
        QueueFull::DropNewest,
        QueueFull::Refuse,
        QueueFull::Block,
    ];

    /// The name used in the config file, e.g. `"drop-oldest"`.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueFull::DropOldest => "drop-oldest",
            QueueFull::DropNewest => "drop-newest",
            QueueFull::Refuse => "refuse",
            QueueFull::Block => "block",
        }
    }
}

impl fmt::Display for QueueFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Durability {
    /// Every policy, in the order error messages list them.
    pub(crate) const ALL: [Durability; 3] = [
        Durability::GroupCommit,
        Durability::SyncEach,
        Durability::Interval,
    ];

    /// The name used in the config file, e.g. `"group-commit"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::GroupCommit => "group-commit",
            Durability::SyncEach => "sync-each",
            Durability::Interval => "interval",
        }
    }
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Config {
    /// Parses and validates a config file's text. Every key is optional and
    /// falls back to its default; every problem found is returned at once.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigErrors> {
        let (raw, mut errors) = raw::parse(text).map_err(ConfigErrors)?;
        let (config, unusable_binds) = raw.into_config(&mut errors);
        validate::check(&config, &unusable_binds, &mut errors);
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Reads `path` and parses it with [`Config::from_toml_str`]. A file that
    /// cannot be read is one error with an empty key, naming the path.
    pub fn from_file(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|err| {
            ConfigErrors(vec![ConfigError::new(
                "",
                format!("cannot read config file {}: {err}", path.display()),
            )])
        })?;
        Config::from_toml_str(&text)
    }

    /// Checks a config built in code with the same rules as a parsed file,
    /// reporting every problem with the TOML key it corresponds to.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        validate::check(self, &[], &mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

/// The commented default config file, as printed by
/// `ferrymq print-default-config`. It parses to [`Config::default()`].
pub fn default_config_toml() -> &'static str {
    include_str!("../default.toml")
}

/// One problem in a config, with the TOML key it concerns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The key path, like `limits.max_packet_size` or `listener[1].bind`;
    /// empty when the problem concerns the whole file (unreadable file, TOML
    /// syntax error).
    pub key: String,
    /// What is wrong and, where possible, what is allowed.
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// `key: message`, or only the message when the key is empty.
impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

/// Every problem found in a config; displayed one `key: message` per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

/// One problem per line, without a trailing newline.
impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl ConfigErrors {
    /// The problems, in the order they were found.
    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.0.iter()
    }
}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// The host name (Linux), or `"ferrymq"` when it cannot be read.
fn default_node_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "ferrymq".to_owned())
}
