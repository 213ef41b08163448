//! Stage 2: rules on a whole [`Config`], shared by parsed files and configs
//! built in code. Every problem is collected, keyed by its TOML key.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::time::Duration;

use ferrymq_codec::TopicError;
use ferrymq_codec::topic::{SHARED_PREFIX, validate_topic_filter};

use crate::{Bridge, BridgeKind, BridgeProtocol, BridgeTls, Config, ConfigError, Forward};

/// The allowed values of an integer key, with the unit shown in messages.
pub(crate) struct IntRange {
    lo: u64,
    hi: u64,
    /// `""`, `" bytes"`, `" seconds"`, `" milliseconds"`.
    unit: &'static str,
}

impl IntRange {
    fn check(&self, key: &str, value: u64, errors: &mut Vec<ConfigError>) {
        self.check_wide(key, i128::from(value), errors);
    }

    /// [`IntRange::check`] for a value that may not fit in a `u64`.
    fn check_wide(&self, key: &str, value: i128, errors: &mut Vec<ConfigError>) {
        if !(i128::from(self.lo)..=i128::from(self.hi)).contains(&value) {
            errors.push(self.error(key, value));
        }
    }

    /// `key: must be between LO and HI UNIT, got VALUE`.
    pub(crate) fn error(&self, key: &str, value: i128) -> ConfigError {
        ConfigError::new(
            key,
            format!(
                "must be between {} and {}{}, got {value}",
                self.lo, self.hi, self.unit
            ),
        )
    }
}

/// A count of things one client or address may have; 0 is no limit
/// (`max_connections_per_address`, `max_subscriptions_per_client`,
/// `max_retained_messages`).
pub(crate) const COUNT_OR_NO_LIMIT: IntRange = IntRange {
    lo: 0,
    hi: u32::MAX as u64,
    unit: "",
};

pub(crate) const MAX_CONNECTIONS: IntRange = IntRange {
    lo: 1,
    hi: u32::MAX as u64,
    unit: "",
};

/// Up to the largest packet MQTT can express: a 256 MiB - 1 remaining
/// length plus a 5-byte fixed header.
pub(crate) const MAX_PACKET_SIZE: IntRange = IntRange {
    lo: 64,
    hi: 268_435_460,
    unit: " bytes",
};

pub(crate) const RECEIVE_MAXIMUM: IntRange = IntRange {
    lo: 1,
    hi: 65_535,
    unit: "",
};

/// MQTT keepalive is a 16-bit number of seconds.
pub(crate) const MAX_KEEPALIVE_SECS: IntRange = IntRange {
    lo: 1,
    hi: 65_535,
    unit: " seconds",
};

pub(crate) const CONNECT_TIMEOUT_SECS: IntRange = IntRange {
    lo: 1,
    hi: 3600,
    unit: " seconds",
};

/// MQTT 5 Topic Alias Maximum is 16 bits; 0 means no topic aliases.
pub(crate) const TOPIC_ALIAS_MAXIMUM: IntRange = IntRange {
    lo: 0,
    hi: 65_535,
    unit: "",
};

/// A listen backlog: at least one, and what `listen(2)` takes (the kernel
/// caps it at `net.core.somaxconn`).
pub(crate) const LISTEN_BACKLOG: IntRange = IntRange {
    lo: 1,
    hi: 65_535,
    unit: "",
};

/// A topic of 65,535 bytes (the longest MQTT string) has at most 65,536
/// levels; 0 means no limit.
pub(crate) const MAX_TOPIC_LEVELS: IntRange = IntRange {
    lo: 0,
    hi: 65_536,
    unit: "",
};

/// Messages per second; 0 is no limit. A million a second is beyond what
/// one client can send here, so a larger number is a mistake.
pub(crate) const MAX_PUBLISH_RATE: IntRange = IntRange {
    lo: 0,
    hi: 1_000_000,
    unit: " messages per second",
};

/// At least a minute: an origin forgotten sooner could be forgotten
/// between a message and its resend.
pub(crate) const FORGET_AFTER_SECS: IntRange = IntRange {
    lo: 60,
    hi: u32::MAX as u64,
    unit: " seconds",
};

/// `[state] max_clock_skew_secs`: a second to a year.
pub(crate) const CLOCK_SKEW_SECS: IntRange = IntRange {
    lo: 1,
    hi: 365 * 86_400,
    unit: " seconds",
};

/// `[storage] low_disk_percent`: 0 (off) to 99.
pub(crate) const LOW_DISK_PERCENT: IntRange = IntRange {
    lo: 0,
    hi: 99,
    unit: " percent",
};

/// `[storage] bridge_reserve_percent`: 0 (no reserve) to 90.
pub(crate) const BRIDGE_RESERVE_PERCENT: IntRange = IntRange {
    lo: 0,
    hi: 90,
    unit: " percent",
};

/// A forward rule's `max_age_secs`: 0 (none) or any 32-bit count.
pub(crate) const MAX_AGE_SECS: IntRange = IntRange {
    lo: 0,
    hi: u32::MAX as u64,
    unit: " seconds",
};

/// `[limits] shed_cpu_percent`: 0 (off) to 100.
pub(crate) const SHED_CPU_PERCENT: IntRange = IntRange {
    lo: 0,
    hi: 100,
    unit: " percent",
};

/// `[limits] shed_memory`: 0 (off) or any size.
pub(crate) const SHED_MEMORY: IntRange = IntRange {
    lo: 0,
    hi: u64::MAX,
    unit: " bytes",
};

/// `[limits] shed_window_secs`: a second to an hour.
pub(crate) const SHED_WINDOW_SECS: IntRange = IntRange {
    lo: 1,
    hi: 3600,
    unit: " seconds",
};

/// `[metrics] sys_interval_secs`: 0 (off) to a day.
pub(crate) const SYS_INTERVAL_SECS: IntRange = IntRange {
    lo: 0,
    hi: 86_400,
    unit: " seconds",
};

/// Aliases we send are bounded by the client's 16-bit Topic Alias Maximum;
/// 0 means we never send one.
pub(crate) const SERVER_TOPIC_ALIASES: IntRange = IntRange {
    lo: 0,
    hi: 65_535,
    unit: "",
};

/// MQTT 5 Session Expiry Interval is a 32-bit number of seconds; 0 ends a
/// session at disconnect and the maximum means never.
pub(crate) const MAX_SESSION_EXPIRY_SECS: IntRange = IntRange {
    lo: 0,
    hi: u32::MAX as u64,
    unit: " seconds",
};

pub(crate) const MAX_QUEUED_MESSAGES: IntRange = IntRange {
    lo: 1,
    hi: 100_000_000,
    unit: "",
};

/// 1 KiB ..= 1 TiB.
pub(crate) const MAX_QUEUED_BYTES: IntRange = IntRange {
    lo: 1 << 10,
    hi: 1 << 40,
    unit: " bytes",
};

/// 0 (no bound) ..= 1 TiB.
pub(crate) const MAX_QUEUED_MEMORY: IntRange = IntRange {
    lo: 0,
    hi: 1 << 40,
    unit: " bytes",
};

/// 1 ms ..= 1 minute.
pub(crate) const SYNC_INTERVAL_MS: IntRange = IntRange {
    lo: 1,
    hi: 60_000,
    unit: " milliseconds",
};

/// 16 MiB ..= 1 PiB.
pub(crate) const MAX_DISK_BYTES: IntRange = IntRange {
    lo: 16 << 20,
    hi: 1 << 50,
    unit: " bytes",
};

/// MQTT keepalive is a 16-bit number of seconds; a bridge needs one (0,
/// off, is refused with its own message).
pub(crate) const BRIDGE_KEEPALIVE_SECS: IntRange = IntRange {
    lo: 1,
    hi: 65_535,
    unit: " seconds",
};

pub(crate) const BRIDGE_CONNECT_TIMEOUT_SECS: IntRange = IntRange {
    lo: 1,
    hi: 300,
    unit: " seconds",
};

/// As [`MAX_SESSION_EXPIRY_SECS`]: MQTT's 32-bit seconds.
pub(crate) const BRIDGE_SESSION_EXPIRY_SECS: IntRange = IntRange {
    lo: 0,
    hi: u32::MAX as u64,
    unit: " seconds",
};

pub(crate) const BRIDGE_BATCH_SIZE: IntRange = IntRange {
    lo: 1,
    hi: 65_535,
    unit: "",
};

pub(crate) const BRIDGE_BATCH_BYTES: IntRange = IntRange {
    lo: 1024,
    hi: 64 << 20,
    unit: " bytes",
};

pub(crate) const BRIDGE_BATCH_LINGER_MS: IntRange = IntRange {
    lo: 0,
    hi: 60_000,
    unit: " milliseconds",
};

/// Bounded like a Receive Maximum: 16 bits, not 0.
pub(crate) const BRIDGE_INFLIGHT: IntRange = IntRange {
    lo: 1,
    hi: 65_535,
    unit: "",
};

/// 0 means unlimited.
pub(crate) const BRIDGE_DRAIN_RATE: IntRange = IntRange {
    lo: 0,
    hi: 10_000_000,
    unit: " messages per second",
};

pub(crate) const BRIDGE_RAMP_SECS: IntRange = IntRange {
    lo: 0,
    hi: 3600,
    unit: " seconds",
};

/// 10 ms ..= 1 hour.
pub(crate) const BRIDGE_RECONNECT_MIN_MS: IntRange = IntRange {
    lo: 10,
    hi: 3_600_000,
    unit: " milliseconds",
};

/// 10 ms ..= 1 day.
pub(crate) const BRIDGE_RECONNECT_MAX_MS: IntRange = IntRange {
    lo: 10,
    hi: 86_400_000,
    unit: " milliseconds",
};

pub(crate) const BRIDGE_MAX_QUEUED_MESSAGES: IntRange = IntRange {
    lo: 1,
    hi: 1_000_000_000,
    unit: "",
};

/// 1 KiB ..= 1 PiB.
pub(crate) const BRIDGE_MAX_QUEUED_BYTES: IntRange = IntRange {
    lo: 1 << 10,
    hi: 1 << 50,
    unit: " bytes",
};

pub(crate) const QOS: IntRange = IntRange {
    lo: 0,
    hi: 2,
    unit: "",
};

/// The longest MQTT string (client identifier, topic filter, user name)
/// and binary data (password), in bytes.
const MAX_MQTT_STRING: usize = 65_535;

/// Checks every rule on `config`, pushing one error per problem.
/// `unusable_binds` lists listeners whose `bind` was already reported as
/// unusable (a placeholder stands in), so address rules skip them.
pub(crate) fn check(config: &Config, unusable_binds: &[usize], errors: &mut Vec<ConfigError>) {
    if config.node_id.trim().is_empty() {
        errors.push(ConfigError::new("node_id", "must not be empty"));
    }
    if config.data_dir.as_os_str().is_empty() {
        errors.push(ConfigError::new("data_dir", "must not be empty"));
    }
    check_listeners(config, unusable_binds, errors);
    check_auth(config, errors);
    check_limits(config, errors);
    check_storage(config, errors);
    for (i, bridge) in config.bridges.iter().enumerate() {
        check_bridge(config, i, bridge, errors);
    }
    check_ferry(config, errors);
    check_state(config, errors);
    check_log_level(&config.log.level, errors);
    check_secs(
        &SYS_INTERVAL_SECS,
        "metrics.sys_interval_secs",
        config.metrics.sys_interval,
        errors,
    );
}

/// `[log] level`: comma-separated directives, each a level or
/// `module=level` (module paths of letters, digits, `_` and `::`).
fn check_log_level(level: &str, errors: &mut Vec<ConfigError>) {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let valid = !level.trim().is_empty()
        && level.split(',').all(|directive| {
            let (target, lvl) = directive
                .trim()
                .rsplit_once('=')
                .unwrap_or(("", directive.trim()));
            LEVELS.contains(&lvl.to_ascii_lowercase().as_str())
                && target
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        });
    if !valid {
        errors.push(ConfigError::new(
            "log.level",
            format!(
                "\"{level}\" is not a log level: use error, warn, info, debug or trace, or per \
                 module like \"info,ferrymq_bridge=debug\""
            ),
        ));
    }
}

fn check_state(config: &Config, errors: &mut Vec<ConfigError>) {
    let state = &config.state;
    for (i, filter) in state.topics.iter().enumerate() {
        let key = format!("state.topics[{i}]");
        if filter.starts_with(SHARED_PREFIX) {
            errors.push(ConfigError::new(
                key,
                format!("{filter:?} is a shared subscription; state topics are plain filters"),
            ));
        } else if let Err(e) = validate_topic_filter(filter) {
            errors.push(ConfigError::new(
                key,
                format!("{filter:?} is not a topic filter: {e}"),
            ));
        }
    }
    check_secs(
        &CLOCK_SKEW_SECS,
        "state.max_clock_skew_secs",
        state.max_clock_skew,
        errors,
    );
    check_secs(
        &FORGET_AFTER_SECS,
        "state.tombstone_ttl_secs",
        state.tombstone_ttl,
        errors,
    );
}

fn check_ferry(config: &Config, errors: &mut Vec<ConfigError>) {
    let ferry = &config.ferry;
    for (i, pattern) in ferry.trusted_clients.iter().enumerate() {
        if pattern.is_empty() || pattern.chars().any(char::is_control) {
            errors.push(ConfigError::new(
                format!("ferry.trusted_clients[{i}]"),
                format!(
                    "{pattern:?} is not a client id pattern: it is not empty and has no control \
                     characters (`*` matches any run of characters, like \"edge-*\")"
                ),
            ));
        }
    }
    check_secs(
        &FORGET_AFTER_SECS,
        "ferry.forget_after_secs",
        ferry.forget_after,
        errors,
    );
}

/// Whether `path` can be a WebSocket listener's path: absolute, without
/// a query, a fragment, white space or control characters.
fn is_websocket_path(path: &str) -> bool {
    path.starts_with('/')
        && !path
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '#')
}

fn check_listeners(config: &Config, unusable_binds: &[usize], errors: &mut Vec<ConfigError>) {
    if config.listeners.is_empty() {
        errors.push(ConfigError::new(
            "listener",
            "at least one [[listener]] is required",
        ));
    }
    for (i, listener) in config.listeners.iter().enumerate() {
        if let Some(tls) = &listener.tls {
            let key = |k: &str| format!("listener[{i}].{k}");
            for (name, path) in [("cert", Some(&tls.cert)), ("key", Some(&tls.key))]
                .into_iter()
                .chain([("client_ca", tls.client_ca.as_ref())])
            {
                // A missing cert or key was reported when it was parsed.
                if let Some(path) = path.filter(|p| !p.as_os_str().is_empty()) {
                    check_file(&key(name), path, errors);
                }
            }
            if tls.use_identity_as_username && tls.client_ca.is_none() {
                errors.push(ConfigError::new(
                    key("use_identity_as_username"),
                    "needs client_ca: the identity is that of a verified client certificate",
                ));
            }
        }
        if let Some(path) = &listener.path
            && !is_websocket_path(path)
        {
            errors.push(ConfigError::new(
                format!("listener[{i}].path"),
                format!(
                    "\"{path}\" is not an HTTP path: it starts with \"/\" and has no spaces, \
                     \"?\" or \"#\" (like \"/mqtt\")"
                ),
            ));
        }
        if let Some(backlog) = listener.backlog {
            LISTEN_BACKLOG.check(
                &format!("listener[{i}].backlog"),
                u64::from(backlog),
                errors,
            );
        }
    }
    let usable: Vec<(usize, std::net::SocketAddr)> = config
        .listeners
        .iter()
        .enumerate()
        .filter(|(i, _)| !unusable_binds.contains(i))
        .map(|(i, listener)| (i, listener.bind))
        .collect();

    // Port 0 asks the OS for a free port, so two such listeners never clash.
    for (n, &(i, addr)) in usable.iter().enumerate() {
        if addr.port() == 0 {
            continue;
        }
        if let Some(&(first, _)) = usable[..n].iter().find(|(_, other)| *other == addr) {
            errors.push(ConfigError::new(
                format!("listener[{i}].bind"),
                format!("{addr} is already used by listener[{first}]"),
            ));
        }
    }

    let auth = &config.auth;
    let remote_login = auth.password_file.is_some() || auth.allow_anonymous_remote;
    let exposed: Vec<String> = usable
        .iter()
        .filter(|(_, addr)| !addr.ip().to_canonical().is_loopback())
        .map(|(i, addr)| format!("listener[{i}] binds {addr}"))
        .collect();
    if !exposed.is_empty() && !remote_login {
        errors.push(ConfigError::new(
            "auth.allow_anonymous",
            format!(
                "anonymous clients may only connect from loopback (127.0.0.1, ::1), but {} and \
                 no client from elsewhere could log in: set [auth] password_file (users from \
                 `ferrymq passwd FILE USER`), or allow_anonymous_remote = true to let anyone in",
                exposed.join(", ")
            ),
        ));
    }
}

/// `[auth]`: the password file is readable and made of `user:$argon2id$...`
/// lines (the broker parses each hash at start); anonymous remote access
/// needs anonymous access.
fn check_auth(config: &Config, errors: &mut Vec<ConfigError>) {
    let auth = &config.auth;
    if auth.allow_anonymous_remote && !auth.allow_anonymous {
        errors.push(ConfigError::new(
            "auth.allow_anonymous_remote",
            "needs allow_anonymous = true (it widens anonymous access to every address)",
        ));
    }
    if let Some(path) = &auth.acl_file
        && let Err(problems) = crate::acl::Acl::from_file(path, "auth.acl_file")
    {
        errors.extend(problems);
    }
    let Some(path) = &auth.password_file else {
        return;
    };
    check_file("auth.password_file", path, errors);
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let well_formed = line
            .split_once(':')
            .is_some_and(|(user, hash)| !user.is_empty() && hash.starts_with("$argon2id$"));
        if !well_formed {
            errors.push(ConfigError::new(
                "auth.password_file",
                format!(
                    "{} line {}: expected user:$argon2id$... (write users with `ferrymq \
                     passwd`; plaintext passwords are not accepted)",
                    path.display(),
                    i + 1
                ),
            ));
            return;
        }
    }
}

fn check_limits(config: &Config, errors: &mut Vec<ConfigError>) {
    let limits = &config.limits;
    MAX_CONNECTIONS.check(
        "limits.max_connections",
        u64::from(limits.max_connections),
        errors,
    );
    MAX_PACKET_SIZE.check(
        "limits.max_packet_size",
        u64::from(limits.max_packet_size),
        errors,
    );
    RECEIVE_MAXIMUM.check(
        "limits.receive_maximum",
        u64::from(limits.receive_maximum),
        errors,
    );
    check_secs(
        &MAX_KEEPALIVE_SECS,
        "limits.max_keepalive_secs",
        limits.max_keepalive,
        errors,
    );
    check_secs(
        &CONNECT_TIMEOUT_SECS,
        "limits.connect_timeout_secs",
        limits.connect_timeout,
        errors,
    );
    // Both fit their whole `u16`: checked anyway so the rules stay in one
    // place if a range ever narrows.
    TOPIC_ALIAS_MAXIMUM.check(
        "limits.topic_alias_maximum",
        u64::from(limits.topic_alias_maximum),
        errors,
    );
    SERVER_TOPIC_ALIASES.check(
        "limits.server_topic_aliases",
        u64::from(limits.server_topic_aliases),
        errors,
    );
    MAX_TOPIC_LEVELS.check(
        "limits.max_topic_levels",
        u64::from(limits.max_topic_levels),
        errors,
    );
    MAX_PUBLISH_RATE.check(
        "limits.max_publish_rate",
        u64::from(limits.max_publish_rate),
        errors,
    );
    SHED_CPU_PERCENT.check(
        "limits.shed_cpu_percent",
        u64::from(limits.shed_cpu_percent),
        errors,
    );
    check_secs(
        &SHED_WINDOW_SECS,
        "limits.shed_window_secs",
        limits.shed_window,
        errors,
    );
    for (i, filter) in limits.critical_topics.iter().enumerate() {
        if filter.starts_with(SHARED_PREFIX) || validate_topic_filter(filter).is_err() {
            errors.push(ConfigError::new(
                format!("limits.critical_topics[{i}]"),
                format!("{filter:?} is not a topic filter like \"alarms/#\""),
            ));
        }
    }
}

fn check_storage(config: &Config, errors: &mut Vec<ConfigError>) {
    let storage = &config.storage;
    LOW_DISK_PERCENT.check(
        "storage.low_disk_percent",
        u64::from(storage.low_disk_percent),
        errors,
    );
    BRIDGE_RESERVE_PERCENT.check(
        "storage.bridge_reserve_percent",
        u64::from(storage.bridge_reserve_percent),
        errors,
    );
    if let Some(age) = storage.max_age {
        check_secs(&MAX_AGE_SECS, "storage.max_age_secs", age, errors);
    }
    check_secs(
        &MAX_SESSION_EXPIRY_SECS,
        "storage.max_session_expiry_secs",
        storage.max_session_expiry,
        errors,
    );
    MAX_QUEUED_MESSAGES.check(
        "storage.max_queued_messages",
        u64::from(storage.max_queued_messages),
        errors,
    );
    MAX_QUEUED_BYTES.check("storage.max_queued_bytes", storage.max_queued_bytes, errors);
    MAX_QUEUED_MEMORY.check(
        "storage.max_queued_memory",
        storage.max_queued_memory,
        errors,
    );
    // Checked whatever `durability` is, so a bad value cannot lie in wait
    // for the day the policy becomes "interval".
    check_millis(
        &SYNC_INTERVAL_MS,
        "storage.sync_interval_ms",
        storage.sync_interval,
        errors,
    );
    MAX_DISK_BYTES.check("storage.max_disk_bytes", storage.max_disk_bytes, errors);
}

/// Checks `bridge[index]`, in the order of its keys.
fn check_bridge(config: &Config, index: usize, bridge: &Bridge, errors: &mut Vec<ConfigError>) {
    let key = |name: &str| format!("bridge[{index}].{name}");
    let name = &bridge.name;
    if name.is_empty() {
        errors.push(ConfigError::new(
            key("name"),
            "missing or empty; every [[bridge]] needs a name: 1 to 64 of A-Z a-z 0-9 _ -",
        ));
    } else if name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        errors.push(ConfigError::new(
            key("name"),
            format!("\"{name}\" is not a valid bridge name: use 1 to 64 of A-Z a-z 0-9 _ -"),
        ));
    } else if let Some(first) = config.bridges[..index]
        .iter()
        .position(|other| other.name == *name)
    {
        errors.push(ConfigError::new(
            key("name"),
            format!("\"{name}\" is already used by bridge[{first}]"),
        ));
    }

    if bridge.addresses.is_empty() {
        errors.push(ConfigError::new(
            key("addresses"),
            "missing or empty; every [[bridge]] needs at least one address, like \
             addresses = [\"broker.example.com:1883\"]",
        ));
    }
    for (j, address) in bridge.addresses.iter().enumerate() {
        let problem = if let Err(problem) = host_problem(&address.host) {
            Some(problem)
        } else if address.port == 0 {
            Some("port must be between 1 and 65535, got 0".to_owned())
        } else {
            None
        };
        if let Some(problem) = problem {
            errors.push(ConfigError::new(
                key(&format!("addresses[{j}]")),
                format!("\"{address}\": {problem}"),
            ));
        }
    }

    let client_id = &bridge.client_id;
    if client_id.is_empty() {
        errors.push(ConfigError::new(
            key("client_id"),
            "must not be empty (a config file that leaves it out gets \"{node_id}-{name}\")",
        ));
    } else {
        check_mqtt_string(&key("client_id"), client_id, errors);
    }
    if let Some(username) = &bridge.username {
        check_mqtt_string(&key("username"), username, errors);
    }
    if let Some(password) = &bridge.password {
        // Binary data in MQTT: any bytes, U+0000 included.
        if password.len() > MAX_MQTT_STRING {
            errors.push(ConfigError::new(
                key("password"),
                format!(
                    "must be at most {MAX_MQTT_STRING} bytes, got {}",
                    password.len()
                ),
            ));
        }
        if bridge.protocol == BridgeProtocol::V311 && bridge.username.is_none() {
            errors.push(ConfigError::new(
                key("password"),
                "MQTT 3.1.1 does not allow a password without a username; set username too, \
                 or use protocol \"5\"",
            ));
        }
    }

    if bridge.keepalive.as_secs() == 0 {
        errors.push(ConfigError::new(
            key("keepalive_secs"),
            "must be between 1 and 65535 seconds, got 0: the bridge needs a keepalive to \
             notice a half-open link to the upstream",
        ));
    } else {
        check_secs(
            &BRIDGE_KEEPALIVE_SECS,
            &key("keepalive_secs"),
            bridge.keepalive,
            errors,
        );
    }
    check_secs(
        &BRIDGE_CONNECT_TIMEOUT_SECS,
        &key("connect_timeout_secs"),
        bridge.connect_timeout,
        errors,
    );
    check_secs(
        &BRIDGE_SESSION_EXPIRY_SECS,
        &key("session_expiry_secs"),
        bridge.session_expiry,
        errors,
    );
    BRIDGE_INFLIGHT.check(&key("inflight"), u64::from(bridge.inflight), errors);
    BRIDGE_BATCH_SIZE.check(&key("batch_size"), u64::from(bridge.batch_size), errors);
    BRIDGE_BATCH_BYTES.check(&key("batch_bytes"), bridge.batch_bytes, errors);
    check_millis(
        &BRIDGE_BATCH_LINGER_MS,
        &key("batch_linger_ms"),
        bridge.batch_linger,
        errors,
    );
    if bridge.kind == BridgeKind::Ferrymq && bridge.protocol != BridgeProtocol::V5 {
        errors.push(ConfigError::new(
            key("kind"),
            "\"ferrymq\" needs protocol = \"5\" (batches are negotiated with MQTT 5 user \
             properties)",
        ));
    }
    BRIDGE_DRAIN_RATE.check(&key("drain_rate"), u64::from(bridge.drain_rate), errors);
    check_secs(&BRIDGE_RAMP_SECS, &key("ramp_secs"), bridge.ramp, errors);
    let before = errors.len();
    check_millis(
        &BRIDGE_RECONNECT_MIN_MS,
        &key("reconnect_min_ms"),
        bridge.reconnect_min,
        errors,
    );
    check_millis(
        &BRIDGE_RECONNECT_MAX_MS,
        &key("reconnect_max_ms"),
        bridge.reconnect_max,
        errors,
    );
    // Compared only when both are in range, so one mistake is one error.
    if errors.len() == before && bridge.reconnect_max < bridge.reconnect_min {
        errors.push(ConfigError::new(
            key("reconnect_max_ms"),
            format!(
                "must be at least reconnect_min_ms ({}), got {}",
                bridge.reconnect_min.as_millis(),
                bridge.reconnect_max.as_millis()
            ),
        ));
    }
    BRIDGE_MAX_QUEUED_MESSAGES.check(
        &key("max_queued_messages"),
        u64::from(bridge.max_queued_messages),
        errors,
    );
    BRIDGE_MAX_QUEUED_BYTES.check(&key("max_queued_bytes"), bridge.max_queued_bytes, errors);

    if let Some(tls) = &bridge.tls {
        check_tls(&key("tls"), tls, errors);
    }

    // `[state] topics` are carried by every bridge: they are rules too.
    if bridge.forward.is_empty() && config.state.topics.is_empty() {
        errors.push(ConfigError::new(
            key("forward"),
            "missing or empty; every [[bridge]] needs at least one forward rule (or \
             [state] topics), like forward = [ { filter = \"sensors/#\" } ]",
        ));
    }
    for (j, rule) in bridge.forward.iter().enumerate() {
        let rule_key = key(&format!("forward[{j}]"));
        check_forward(&rule_key, rule, errors);
        check_forward_levels(&rule_key, rule, config.limits.max_topic_levels, errors);
    }
}

/// Checks `[bridge.tls]` at `key` (`bridge[i].tls`), files included.
fn check_tls(key: &str, tls: &BridgeTls, errors: &mut Vec<ConfigError>) {
    if tls.ca_file.as_os_str().is_empty() {
        errors.push(ConfigError::new(
            format!("{key}.ca_file"),
            "missing or empty; [bridge.tls] needs ca_file, the CA certificates (PEM) that sign \
             the upstream's certificate",
        ));
    } else {
        check_file(&format!("{key}.ca_file"), &tls.ca_file, errors);
    }
    match (&tls.cert_file, &tls.key_file) {
        (Some(_), None) => errors.push(ConfigError::new(
            format!("{key}.key_file"),
            "missing; cert_file is set, and mutual TLS needs both cert_file and key_file",
        )),
        (None, Some(_)) => errors.push(ConfigError::new(
            format!("{key}.cert_file"),
            "missing; key_file is set, and mutual TLS needs both cert_file and key_file",
        )),
        _ => {}
    }
    if let Some(cert_file) = &tls.cert_file {
        check_file(&format!("{key}.cert_file"), cert_file, errors);
    }
    if let Some(key_file) = &tls.key_file {
        check_file(&format!("{key}.key_file"), key_file, errors);
    }
    if let Some(server_name) = &tls.server_name {
        if server_name.is_empty() {
            errors.push(ConfigError::new(
                format!("{key}.server_name"),
                "must not be empty; leave it out to use the host of each address",
            ));
        } else if let Err(problem) = host_problem(server_name) {
            errors.push(ConfigError::new(format!("{key}.server_name"), problem));
        }
    }
}

/// `path` must be a regular file we can open for reading. Relative paths
/// are relative to the working directory.
fn check_file(key: &str, path: &Path, errors: &mut Vec<ConfigError>) {
    if path.as_os_str().is_empty() {
        errors.push(ConfigError::new(key, "must not be empty"));
        return;
    }
    let problem = match std::fs::metadata(path) {
        Err(err) => Some(format!("cannot read {}: {err}", path.display())),
        Ok(meta) if !meta.is_file() => Some(format!("{} is not a regular file", path.display())),
        Ok(_) => std::fs::File::open(path)
            .err()
            .map(|err| format!("cannot read {}: {err}", path.display())),
    };
    if let Some(problem) = problem {
        errors.push(ConfigError::new(key, problem));
    }
}

/// Checks one `[[bridge.forward]]` rule at `key` (`bridge[i].forward[j]`).
fn check_forward(key: &str, rule: &Forward, errors: &mut Vec<ConfigError>) {
    if rule.lane == crate::Lane::Live && rule.direction != crate::Direction::Out {
        errors.push(ConfigError::new(
            format!("{key}.lane"),
            format!(
                "\"live\" is only for direction = \"out\", not \"{}\" (what comes in is \
                 published here at once)",
                rule.direction
            ),
        ));
    }
    if let Some(age) = rule.max_age {
        if rule.direction == crate::Direction::In {
            errors.push(ConfigError::new(
                format!("{key}.max_age_secs"),
                "only for messages that go up (direction \"out\" or \"both\"); what comes \
                 in is published here at once",
            ));
        }
        check_secs(&MAX_AGE_SECS, &format!("{key}.max_age_secs"), age, errors);
    }
    let filter = &rule.filter;
    let filter_ok = if filter.is_empty() {
        errors.push(ConfigError::new(
            format!("{key}.filter"),
            "missing or empty; every forward rule needs a topic filter, like \"sensors/#\"",
        ));
        false
    } else if let Err(problem) = filter_problem(filter) {
        let message = match problem {
            FilterProblem::Nul => "must not contain U+0000".to_owned(),
            FilterProblem::TooLong(len) => {
                format!("must be at most {MAX_MQTT_STRING} bytes, got {len}")
            }
            problem => format!("\"{filter}\" {problem}"),
        };
        errors.push(ConfigError::new(format!("{key}.filter"), message));
        false
    } else {
        true
    };
    QOS.check(&format!("{key}.qos"), u64::from(rule.qos), errors);
    for (name, prefix) in [
        ("local_prefix", &rule.local_prefix),
        ("remote_prefix", &rule.remote_prefix),
    ] {
        let prefix_key = format!("{key}.{name}");
        if prefix.contains('\0') {
            errors.push(ConfigError::new(prefix_key, "must not contain U+0000"));
        } else if prefix.contains(['+', '#']) {
            errors.push(ConfigError::new(
                prefix_key,
                format!("\"{prefix}\" must not contain the wildcards '+' or '#'"),
            ));
        } else if filter_ok && !prefix.is_empty() {
            // Both valid alone; the joint can still break a rule, as
            // "site-1" + "#" does.
            let joined = format!("{prefix}{filter}");
            if let Err(problem) = filter_problem(&joined) {
                let joint = format!("\"{prefix}\" + filter \"{filter}\" = \"{joined}\"");
                let message = match problem {
                    FilterProblem::TooLong(len) => format!(
                        "with the filter, makes a topic filter of {len} bytes; the most is \
                         {MAX_MQTT_STRING}"
                    ),
                    FilterProblem::Invalid(_) => {
                        format!("{joint}, which {problem}; end the prefix with '/'")
                    }
                    FilterProblem::Shared => {
                        format!("{joint}, a shared subscription, which a bridge cannot use")
                    }
                    // The prefix and the filter were checked for U+0000.
                    FilterProblem::Nul => format!("{joint}, which {problem}"),
                };
                errors.push(ConfigError::new(prefix_key, message));
            }
        }
    }
}

/// A forward rule's filter, with either prefix, must stay within
/// `limits.max_topic_levels`: the broker would refuse its subscription,
/// and its messages could never be forwarded.
fn check_forward_levels(key: &str, rule: &Forward, max_levels: u32, errors: &mut Vec<ConfigError>) {
    for (name, prefix) in [
        ("local_prefix", &rule.local_prefix),
        ("remote_prefix", &rule.remote_prefix),
    ] {
        let joined = format!("{prefix}{}", rule.filter);
        if ferrymq_codec::topic::exceeds_levels(&joined, max_levels) {
            let levels = joined.split('/').count();
            let (what, at) = if prefix.is_empty() {
                ("the filter".to_owned(), format!("{key}.filter"))
            } else {
                (format!("{name} + the filter"), format!("{key}.{name}"))
            };
            errors.push(ConfigError::new(
                at,
                format!(
                    "{what} has {levels} topic levels, more than limits.max_topic_levels \
                     ({max_levels})"
                ),
            ));
            return;
        }
    }
}

/// Why a non-empty string cannot be a bridge's topic filter.
enum FilterProblem {
    /// A `$share/` filter: a bridge is one client, so there is nothing to
    /// share with.
    Shared,
    Nul,
    TooLong(usize),
    Invalid(TopicError),
}

/// Completes a sentence that starts with the filter: `"a/#/b" is not ...`.
impl std::fmt::Display for FilterProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FilterProblem::Shared => write!(
                f,
                "is a shared subscription, which a bridge cannot use; write the filter without \
                 \"{SHARED_PREFIX}{{group}}/\""
            ),
            FilterProblem::Nul => f.write_str("contains U+0000"),
            FilterProblem::TooLong(len) => {
                write!(f, "is {len} bytes long; the most is {MAX_MQTT_STRING}")
            }
            FilterProblem::Invalid(err) => write!(f, "is not a valid topic filter: {err}"),
        }
    }
}

fn filter_problem(filter: &str) -> Result<(), FilterProblem> {
    if filter.starts_with(SHARED_PREFIX) {
        return Err(FilterProblem::Shared);
    }
    if filter.contains('\0') {
        return Err(FilterProblem::Nul);
    }
    if filter.len() > MAX_MQTT_STRING {
        return Err(FilterProblem::TooLong(filter.len()));
    }
    validate_topic_filter(filter).map_err(FilterProblem::Invalid)
}

/// An MQTT UTF-8 string: at most 65535 bytes, no U+0000.
fn check_mqtt_string(key: &str, value: &str, errors: &mut Vec<ConfigError>) {
    if value.len() > MAX_MQTT_STRING {
        errors.push(ConfigError::new(
            key,
            format!(
                "must be at most {MAX_MQTT_STRING} bytes, got {}",
                value.len()
            ),
        ));
    }
    if value.contains('\0') {
        errors.push(ConfigError::new(key, "must not contain U+0000"));
    }
}

/// What is wrong with `host` (a bridge address's host or a TLS server
/// name): it must be an IPv6 address (without brackets), an IPv4 address,
/// or a DNS name of dot-separated labels of 1 to 63 letters, digits, `-` or
/// `_`, not starting or ending with `-`, 253 bytes at most.
fn host_problem(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("no host; write \"host:port\", like \"broker.example.com:1883\"".to_owned());
    }
    if host.contains(':') {
        return host
            .parse::<Ipv6Addr>()
            .map(drop)
            .map_err(|_| format!("\"{host}\" is not an IPv6 address"));
    }
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return host
            .parse::<Ipv4Addr>()
            .map(drop)
            .map_err(|_| format!("\"{host}\" is not an IPv4 address"));
    }
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if host.len() > 253 || !host.split('.').all(label_ok) {
        return Err(format!(
            "\"{host}\" is not a host name (dot-separated labels of 1 to 63 letters, digits, \
             '-' or '_', not starting or ending with '-'), an IPv4 address or an IPv6 address"
        ));
    }
    Ok(())
}

/// Durations are whole seconds in the file; one built in code with a
/// fraction is checked on its whole seconds, and one below a second fails.
fn check_secs(range: &IntRange, key: &str, value: Duration, errors: &mut Vec<ConfigError>) {
    range.check(key, value.as_secs(), errors);
}

/// Durations are whole milliseconds in the file; one built in code with a
/// fraction is checked on its whole milliseconds, and one below a
/// millisecond fails.
fn check_millis(range: &IntRange, key: &str, value: Duration, errors: &mut Vec<ConfigError>) {
    // Any `Duration` in milliseconds fits in an `i128` (below 2^75).
    let millis = i128::try_from(value.as_millis()).unwrap_or(i128::MAX);
    range.check_wide(key, millis, errors);
}
