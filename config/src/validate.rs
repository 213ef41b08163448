//! Stage 2: rules on a whole [`Config`], shared by parsed files and configs
//! built in code. Every problem is collected, keyed by its TOML key.

use crate::{Config, ConfigError};

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
    check_limits(config, errors);
    check_storage(config, errors);
}

fn check_listeners(config: &Config, unusable_binds: &[usize], errors: &mut Vec<ConfigError>) {
    if config.listeners.is_empty() {
        errors.push(ConfigError::new(
            "listener",
            "at least one [[listener]] is required",
        ));
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

    if config.auth.allow_anonymous {
        let exposed: Vec<String> = usable
            .iter()
            .filter(|(_, addr)| !addr.ip().to_canonical().is_loopback())
            .map(|(i, addr)| format!("listener[{i}] binds {addr}"))
            .collect();
        if !exposed.is_empty() {
            errors.push(ConfigError::new(
                "auth.allow_anonymous",
                format!(
                    "anonymous access is only allowed when every listener binds a loopback \
                     address (127.0.0.1, ::1), but {}; bind loopback addresses only \
                     (password authentication arrives in a later version)",
                    exposed.join(", ")
                ),
            ));
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
}

fn check_storage(config: &Config, errors: &mut Vec<ConfigError>) {
    let storage = &config.storage;
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

/// Durations are whole seconds in the file; one built in code with a
/// fraction is checked on its whole seconds, and one below a second fails.
fn check_secs(
    range: &IntRange,
    key: &str,
    value: std::time::Duration,
    errors: &mut Vec<ConfigError>,
) {
    range.check(key, value.as_secs(), errors);
}

/// Durations are whole milliseconds in the file; one built in code with a
/// fraction is checked on its whole milliseconds, and one below a
/// millisecond fails.
fn check_millis(
    range: &IntRange,
    key: &str,
    value: std::time::Duration,
    errors: &mut Vec<ConfigError>,
) {
    // Any `Duration` in milliseconds fits in an `i128` (below 2^75).
    let millis = i128::try_from(value.as_millis()).unwrap_or(i128::MAX);
    range.check_wide(key, millis, errors);
}
