//! Tests through the public API: a TOML text in, a `Config` or the error
//! lines out.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{
    Auth, Bridge, BridgeAddress, BridgeKind, BridgeProtocol, BridgeTls, Config, ConfigError,
    ConfigErrors, Direction, Durability, Forward, Limits, Listener, ListenerProtocol, QueueFull,
    Storage, default_config_toml,
};

/// `toml` must parse to the defaults changed by `edit`.
fn check_ok(toml: &str, edit: impl FnOnce(&mut Config)) {
    let mut expected = Config::default();
    edit(&mut expected);
    match Config::from_toml_str(toml) {
        Ok(config) => assert_eq!(config, expected, "config from:\n{toml}"),
        Err(errors) => panic!("unexpected errors from:\n{toml}\n---\n{errors}"),
    }
}

/// `toml` must be refused with exactly these `key: message` lines.
fn check_err(toml: &str, expected: &[&str]) {
    let errors = match Config::from_toml_str(toml) {
        Ok(config) => panic!("expected errors from:\n{toml}\n---\ngot {config:?}"),
        Err(errors) => errors,
    };
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(lines, expected, "errors from:\n{toml}");
}

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("test address")
}

fn tcp(bind: &str) -> Listener {
    Listener {
        bind: addr(bind),
        protocol: ListenerProtocol::Tcp,
        backlog: None,
        tls: None,
        path: None,
    }
}

fn address(host: &str, port: u16) -> BridgeAddress {
    BridgeAddress {
        host: host.into(),
        port,
    }
}

/// A directory of its own for one test's files, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("ferrymq-config-{test}-{}", std::process::id()));
        // Left over from an interrupted run, if anything.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    /// Creates `name` (a small PEM-looking file) and returns its path.
    fn file(&self, name: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, "-----BEGIN CERTIFICATE-----\n").expect("write test file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn defaults() {
    let config = Config::default();
    assert!(!config.node_id.trim().is_empty());
    assert_eq!(config.data_dir, PathBuf::from("./ferrymq-data"));
    assert_eq!(config.listeners, vec![tcp("127.0.0.1:1883")]);
    assert_eq!(
        config.auth,
        Auth {
            allow_anonymous: true,
            allow_anonymous_remote: false,
            password_file: None,
            acl_file: None,
        }
    );
    assert_eq!(
        config.limits,
        Limits {
            max_connections: 100_000,
            max_connections_per_address: 0,
            max_packet_size: 1_048_576,
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
    );
    assert_eq!(
        config.storage,
        Storage {
            max_session_expiry: Duration::from_secs(604_800),
            max_queued_messages: 10_000,
            max_queued_bytes: 67_108_864,
            max_queued_memory: 268_435_456,
            queue_full: QueueFull::DropOldest,
            queue_qos0: false,
            durability: Durability::GroupCommit,
            sync_interval: Duration::from_millis(100),
            max_disk_bytes: 8_589_934_592,
            low_disk_percent: 10,
            bridge_reserve_percent: 20,
            max_age: None,
        }
    );
    assert_eq!(config.bridges, []);
    assert_eq!(QueueFull::default(), QueueFull::DropOldest);
    assert_eq!(Durability::default(), Durability::GroupCommit);
    assert_eq!(config.validate(), Ok(()));
}

#[test]
fn empty_file_is_defaults() {
    check_ok("", |_| {});
    check_ok("\n# only a comment\n\n", |_| {});
    check_ok("[auth]\n[limits]\n[storage]\n", |_| {});
}

#[test]
fn every_key_parsed() {
    check_ok(
        r#"
        node_id = "edge-01"
        data_dir = "/var/lib/ferrymq"

        [[listener]]
        bind = "127.0.0.1:1884"
        protocol = "tcp"
        backlog = 512

        [[listener]]
        bind = "[::1]:0"

        [auth]
        allow_anonymous = false

        [limits]
        max_connections = 5
        max_packet_size = "64KiB"
        receive_maximum = 10
        max_keepalive_secs = 60
        connect_timeout_secs = 3
        topic_alias_maximum = 10
        server_topic_aliases = 4
        max_topic_levels = 32
        max_subscriptions_per_client = 100
        max_retained_messages = 5000
        max_publish_rate = 50
        dormant_connections = false
        shed_cpu_percent = 75
        shed_memory = "1GiB"
        shed_window_secs = 10
        critical_topics = ["alarms/#"]

        [storage]
        max_session_expiry_secs = 86400
        max_queued_messages = 500
        max_queued_bytes = "2MiB"
        max_queued_memory = "32MiB"
        queue_full = "refuse"
        queue_qos0 = true
        durability = "interval"
        sync_interval_ms = 250
        max_disk_bytes = "512MiB"
        low_disk_percent = 5
        bridge_reserve_percent = 30
        max_age_secs = 86400
        "#,
        |c| {
            c.node_id = "edge-01".into();
            c.data_dir = "/var/lib/ferrymq".into();
            c.listeners = vec![
                Listener {
                    backlog: Some(512),
                    ..tcp("127.0.0.1:1884")
                },
                tcp("[::1]:0"),
            ];
            c.auth.allow_anonymous = false;
            c.limits = Limits {
                max_connections: 5,
                max_connections_per_address: 0,
                max_packet_size: 65_536,
                receive_maximum: 10,
                max_keepalive: Duration::from_secs(60),
                connect_timeout: Duration::from_secs(3),
                topic_alias_maximum: 10,
                server_topic_aliases: 4,
                max_topic_levels: 32,
                max_subscriptions_per_client: 100,
                max_retained_messages: 5000,
                max_publish_rate: 50,
                dormant_connections: false,
                shed_cpu_percent: 75,
                shed_memory: 1 << 30,
                shed_window: Duration::from_secs(10),
                critical_topics: vec!["alarms/#".into()],
            };
            c.storage = Storage {
                max_session_expiry: Duration::from_secs(86_400),
                max_queued_messages: 500,
                max_queued_bytes: 2_097_152,
                max_queued_memory: 33_554_432,
                queue_full: QueueFull::Refuse,
                queue_qos0: true,
                durability: Durability::Interval,
                sync_interval: Duration::from_millis(250),
                max_disk_bytes: 536_870_912,
                low_disk_percent: 5,
                bridge_reserve_percent: 30,
                max_age: Some(Duration::from_secs(86_400)),
            };
        },
    );
}

#[test]
fn limits_at_their_bounds() {
    check_ok(
        r#"
        [limits]
        max_connections = 1
        max_packet_size = 64
        receive_maximum = 65535
        max_keepalive_secs = 65535
        connect_timeout_secs = 3600
        topic_alias_maximum = 65535
        server_topic_aliases = 65535
        "#,
        |c| {
            c.limits.max_connections = 1;
            c.limits.max_packet_size = 64;
            c.limits.receive_maximum = 65535;
            c.limits.max_keepalive = Duration::from_secs(65535);
            c.limits.connect_timeout = Duration::from_secs(3600);
            c.limits.topic_alias_maximum = 65535;
            c.limits.server_topic_aliases = 65535;
        },
    );
    check_ok(
        "[limits]\nmax_connections = 4294967295\nmax_packet_size = 268435460\n\
         max_keepalive_secs = 1\nconnect_timeout_secs = 1\nreceive_maximum = 1\n\
         topic_alias_maximum = 0\nserver_topic_aliases = 0",
        |c| {
            c.limits.max_connections = u32::MAX;
            c.limits.max_packet_size = 268_435_460;
            c.limits.max_keepalive = Duration::from_secs(1);
            c.limits.connect_timeout = Duration::from_secs(1);
            c.limits.receive_maximum = 1;
            c.limits.topic_alias_maximum = 0;
            c.limits.server_topic_aliases = 0;
        },
    );
}

#[test]
fn packet_sizes() {
    for (value, bytes) in [
        ("4096", 4096),
        ("\"512\"", 512),
        ("\"512B\"", 512),
        ("\"64KiB\"", 65_536),
        ("\"1MiB\"", 1_048_576),
        ("\"1 MiB\"", 1_048_576),
        ("\"10KB\"", 10_000),
        ("\"1MB\"", 1_000_000),
        ("\"256MiB\"", 268_435_456),
    ] {
        check_ok(&format!("[limits]\nmax_packet_size = {value}"), |c| {
            c.limits.max_packet_size = bytes;
        });
    }
    let range = "must be between 64 and 268435460 bytes";
    for (value, expected) in [
        ("\"1GiB\"", format!("{range}, got 1073741824")),
        ("\"10TiB\"", format!("{range}, got 10995116277760")),
        ("63", format!("{range}, got 63")),
        ("268435461", format!("{range}, got 268435461")),
        ("0", format!("{range}, got 0")),
        ("-1", "a size cannot be negative, got -1".to_owned()),
        (
            "99999999999999999999",
            "size 99999999999999999999 is too large".to_owned(),
        ),
        (
            "\"abc\"",
            "invalid size \"abc\": a size starts with a whole number of bytes, \
             like \"512\" or \"1MiB\""
                .to_owned(),
        ),
        (
            "\"1 mib\"",
            "invalid size \"1 mib\": unknown unit \"mib\" (units are case-sensitive: did you \
             mean \"MiB\"?); units are B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
                .to_owned(),
        ),
        (
            "1.5",
            "invalid type: floating point `1.5`, expected a size: an integer number of bytes \
             or a string like \"1MiB\""
                .to_owned(),
        ),
    ] {
        check_err(
            &format!("[limits]\nmax_packet_size = {value}"),
            &[&format!("limits.max_packet_size: {expected}")],
        );
    }
}

#[test]
fn storage_at_their_bounds() {
    check_ok(
        r#"
        [storage]
        max_session_expiry_secs = 0
        max_queued_messages = 1
        max_queued_bytes = 1024
        sync_interval_ms = 1
        max_disk_bytes = "16MiB"
        "#,
        |c| {
            c.storage.max_session_expiry = Duration::ZERO;
            c.storage.max_queued_messages = 1;
            c.storage.max_queued_bytes = 1024;
            c.storage.sync_interval = Duration::from_millis(1);
            c.storage.max_disk_bytes = 16 << 20;
        },
    );
    check_ok(
        r#"
        [storage]
        max_session_expiry_secs = 4294967295
        max_queued_messages = 100000000
        max_queued_bytes = "1TiB"
        sync_interval_ms = 60000
        max_disk_bytes = "1024TiB"
        "#,
        |c| {
            c.storage.max_session_expiry = Duration::from_secs(u64::from(u32::MAX));
            c.storage.max_queued_messages = 100_000_000;
            c.storage.max_queued_bytes = 1 << 40;
            c.storage.sync_interval = Duration::from_secs(60);
            c.storage.max_disk_bytes = 1 << 50;
        },
    );
}

#[test]
fn storage_ranges() {
    for (key, value, range) in [
        (
            "max_session_expiry_secs",
            "4294967296",
            "between 0 and 4294967295 seconds",
        ),
        (
            "max_session_expiry_secs",
            "-1",
            "between 0 and 4294967295 seconds",
        ),
        (
            "max_session_expiry_secs",
            "99999999999999999999",
            "between 0 and 4294967295 seconds",
        ),
        ("bridge_reserve_percent", "91", "between 0 and 90 percent"),
        ("bridge_reserve_percent", "-1", "between 0 and 90 percent"),
        ("low_disk_percent", "100", "between 0 and 99 percent"),
        ("max_queued_messages", "0", "between 1 and 100000000"),
        (
            "max_queued_messages",
            "100000001",
            "between 1 and 100000000",
        ),
        (
            "max_queued_messages",
            "4294967296",
            "between 1 and 100000000",
        ),
        ("max_queued_messages", "-5", "between 1 and 100000000"),
        (
            "max_queued_bytes",
            "0",
            "between 1024 and 1099511627776 bytes",
        ),
        (
            "max_queued_bytes",
            "1023",
            "between 1024 and 1099511627776 bytes",
        ),
        (
            "max_queued_bytes",
            "1099511627777",
            "between 1024 and 1099511627776 bytes",
        ),
        ("sync_interval_ms", "0", "between 1 and 60000 milliseconds"),
        (
            "sync_interval_ms",
            "60001",
            "between 1 and 60000 milliseconds",
        ),
        ("sync_interval_ms", "-1", "between 1 and 60000 milliseconds"),
        (
            "sync_interval_ms",
            "99999999999999999999",
            "between 1 and 60000 milliseconds",
        ),
        (
            "max_disk_bytes",
            "0",
            "between 16777216 and 1125899906842624 bytes",
        ),
        (
            "max_disk_bytes",
            "16777215",
            "between 16777216 and 1125899906842624 bytes",
        ),
        (
            "max_disk_bytes",
            "1125899906842625",
            "between 16777216 and 1125899906842624 bytes",
        ),
    ] {
        check_err(
            &format!("[storage]\n{key} = {value}"),
            &[&format!("storage.{key}: must be {range}, got {value}")],
        );
    }
}

#[test]
fn queued_bytes_sizes() {
    for (value, bytes) in [
        ("4096", 4096),
        ("\"1KiB\"", 1024),
        ("\"10KB\"", 10_000),
        ("\"16MiB\"", 16_777_216),
        ("\"1 GiB\"", 1_073_741_824),
        ("\"1TB\"", 1_000_000_000_000),
    ] {
        check_ok(&format!("[storage]\nmax_queued_bytes = {value}"), |c| {
            c.storage.max_queued_bytes = bytes;
        });
    }
    let range = "must be between 1024 and 1099511627776 bytes";
    for (value, expected) in [
        ("\"1000B\"", format!("{range}, got 1000")),
        ("\"2TiB\"", format!("{range}, got 2199023255552")),
        ("-1", "a size cannot be negative, got -1".to_owned()),
        (
            "\"64mib\"",
            "invalid size \"64mib\": unknown unit \"mib\" (units are case-sensitive: did you \
             mean \"MiB\"?); units are B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
                .to_owned(),
        ),
    ] {
        check_err(
            &format!("[storage]\nmax_queued_bytes = {value}"),
            &[&format!("storage.max_queued_bytes: {expected}")],
        );
    }
}

#[test]
fn queue_full_policies() {
    for (text, policy) in [
        ("drop-oldest", QueueFull::DropOldest),
        ("drop-newest", QueueFull::DropNewest),
        ("refuse", QueueFull::Refuse),
        ("block", QueueFull::Block),
    ] {
        check_ok(&format!("[storage]\nqueue_full = \"{text}\""), |c| {
            c.storage.queue_full = policy;
        });
        assert_eq!(policy.as_str(), text);
        assert_eq!(policy.to_string(), text);
    }
    let expected = "expected one of \"drop-oldest\", \"drop-newest\", \"refuse\", \"block\"";
    for (text, hint) in [
        ("drop_oldest", " (did you mean \"drop-oldest\"?)"),
        ("drop-newset", " (did you mean \"drop-newest\"?)"),
        ("Refuse", " (did you mean \"refuse\"?)"),
        ("blocks", " (did you mean \"block\"?)"),
        ("blocking", ""),
        ("DROP-OLDEST", ""),
        ("wait", ""),
        ("", ""),
    ] {
        check_err(
            &format!("[storage]\nqueue_full = \"{text}\""),
            &[&format!(
                "storage.queue_full: unknown policy \"{text}\"{hint}; {expected}"
            )],
        );
    }
    check_err(
        "[storage]\nqueue_full = 1",
        &["storage.queue_full: invalid type: integer `1`, expected a string"],
    );
}

#[test]
fn disk_bytes_sizes() {
    for (value, bytes) in [
        ("16777216", 16_777_216),
        ("\"16MiB\"", 16_777_216),
        ("\"100MB\"", 100_000_000),
        ("\"8GiB\"", 8_589_934_592),
        ("\"8 GiB\"", 8_589_934_592),
        ("\"500GB\"", 500_000_000_000),
        ("\"2TiB\"", 2 << 40),
        ("\"1000TB\"", 1_000_000_000_000_000),
    ] {
        check_ok(&format!("[storage]\nmax_disk_bytes = {value}"), |c| {
            c.storage.max_disk_bytes = bytes;
        });
    }
    let range = "must be between 16777216 and 1125899906842624 bytes";
    for (value, expected) in [
        ("\"16MB\"", format!("{range}, got 16000000")),
        ("\"64KiB\"", format!("{range}, got 65536")),
        ("\"1025TiB\"", format!("{range}, got 1126999418470400")),
        ("\"2000TB\"", format!("{range}, got 2000000000000000")),
        ("-1", "a size cannot be negative, got -1".to_owned()),
        (
            "99999999999999999999",
            "size 99999999999999999999 is too large".to_owned(),
        ),
        (
            "\"8gib\"",
            "invalid size \"8gib\": unknown unit \"gib\" (units are case-sensitive: did you \
             mean \"GiB\"?); units are B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
                .to_owned(),
        ),
        (
            "\"1.5GiB\"",
            "invalid size \"1.5GiB\": fractions are not supported; use a smaller unit, like \
             \"1536KiB\""
                .to_owned(),
        ),
        (
            "true",
            "invalid type: boolean `true`, expected a size: an integer number of bytes or a \
             string like \"1MiB\""
                .to_owned(),
        ),
    ] {
        check_err(
            &format!("[storage]\nmax_disk_bytes = {value}"),
            &[&format!("storage.max_disk_bytes: {expected}")],
        );
    }
}

#[test]
fn durability_policies() {
    for (text, policy) in [
        ("group-commit", Durability::GroupCommit),
        ("sync-each", Durability::SyncEach),
        ("interval", Durability::Interval),
    ] {
        check_ok(&format!("[storage]\ndurability = \"{text}\""), |c| {
            c.storage.durability = policy;
        });
        assert_eq!(policy.as_str(), text);
        assert_eq!(policy.to_string(), text);
    }
    let expected = "expected one of \"group-commit\", \"sync-each\", \"interval\"";
    for (text, hint) in [
        ("group_commit", " (did you mean \"group-commit\"?)"),
        ("groupcommit", " (did you mean \"group-commit\"?)"),
        ("sync_each", " (did you mean \"sync-each\"?)"),
        ("Interval", " (did you mean \"interval\"?)"),
        ("intervall", " (did you mean \"interval\"?)"),
        ("sync", ""),
        ("fsync", ""),
        ("GROUP-COMMIT", ""),
        ("", ""),
    ] {
        check_err(
            &format!("[storage]\ndurability = \"{text}\""),
            &[&format!(
                "storage.durability: unknown policy \"{text}\"{hint}; {expected}"
            )],
        );
    }
    check_err(
        "[storage]\ndurability = true",
        &["storage.durability: invalid type: boolean `true`, expected a string"],
    );
}

#[test]
fn sync_interval_with_every_policy() {
    // Parsed and checked whatever the policy, though only "interval" uses it.
    for policy in [
        Durability::GroupCommit,
        Durability::SyncEach,
        Durability::Interval,
    ] {
        check_ok(
            &format!("[storage]\ndurability = \"{policy}\"\nsync_interval_ms = 5"),
            |c| {
                c.storage.durability = policy;
                c.storage.sync_interval = Duration::from_millis(5);
            },
        );
        check_err(
            &format!("[storage]\ndurability = \"{policy}\"\nsync_interval_ms = 0"),
            &["storage.sync_interval_ms: must be between 1 and 60000 milliseconds, got 0"],
        );
    }
    check_err(
        "[storage]\nsync_interval_ms = \"100ms\"",
        &[r#"storage.sync_interval_ms: invalid type: string "100ms", expected an integer"#],
    );
    check_err(
        "[storage]\nsync_interval_ms = 0.5",
        &["storage.sync_interval_ms: invalid type: floating point `0.5`, expected an integer"],
    );
}

#[test]
fn node_id_and_data_dir_must_not_be_empty() {
    check_err(r#"node_id = """#, &["node_id: must not be empty"]);
    check_err(r#"node_id = "  ""#, &["node_id: must not be empty"]);
    check_err(r#"data_dir = """#, &["data_dir: must not be empty"]);
}

#[test]
fn at_least_one_listener() {
    check_err(
        "listener = []",
        &["listener: at least one [[listener]] is required"],
    );
}

#[test]
fn listener_bind() {
    check_err(
        "[[listener]]\nbind = \"x\"",
        &[r#"listener[0].bind: "x" is not an address like 127.0.0.1:1883"#],
    );
    check_err(
        "[[listener]]\nbind = \"127.0.0.1:1883\"\n[[listener]]\nbind = \"localhost:1883\"",
        &[r#"listener[1].bind: "localhost:1883" is not an address like 127.0.0.1:1883"#],
    );
    check_err(
        "[[listener]]\nbind = \"127.0.0.1\"",
        &[r#"listener[0].bind: "127.0.0.1" is not an address like 127.0.0.1:1883"#],
    );
    check_err(
        "[[listener]]\nprotocol = \"tcp\"",
        &[
            r#"listener[0].bind: missing; every [[listener]] needs an address like "127.0.0.1:1883""#,
        ],
    );
}

#[test]
fn listener_backlog() {
    for (value, expected) in [("0", "0"), ("65536", "65536"), ("-1", "-1")] {
        check_err(
            &format!("[[listener]]\nbind = \"127.0.0.1:1883\"\nbacklog = {value}"),
            &[&format!(
                "listener[0].backlog: must be between 1 and 65535, got {expected}"
            )],
        );
    }
}

#[test]
fn duplicate_listeners() {
    check_err(
        r#"
        [[listener]]
        bind = "127.0.0.1:1883"
        [[listener]]
        bind = "[::1]:1883"
        [[listener]]
        bind = "127.0.0.1:1883"
        "#,
        &["listener[2].bind: 127.0.0.1:1883 is already used by listener[0]"],
    );
    // Port 0: the OS gives each listener its own port.
    check_ok(
        "[[listener]]\nbind = \"127.0.0.1:0\"\n[[listener]]\nbind = \"127.0.0.1:0\"",
        |c| c.listeners = vec![tcp("127.0.0.1:0"), tcp("127.0.0.1:0")],
    );
}

#[test]
fn listener_protocols() {
    check_ok(
        "[[listener]]\nbind = \"127.0.0.1:8080\"\nprotocol = \"ws\"",
        |c| {
            c.listeners = vec![Listener {
                protocol: ListenerProtocol::Ws,
                path: Some("/mqtt".into()),
                ..tcp("127.0.0.1:8080")
            }];
        },
    );
    check_ok(
        "[[listener]]\nbind = \"127.0.0.1:8080\"\nprotocol = \"ws\"\npath = \"/\"",
        |c| {
            c.listeners = vec![Listener {
                protocol: ListenerProtocol::Ws,
                path: Some("/".into()),
                ..tcp("127.0.0.1:8080")
            }];
        },
    );
    for (path, shown) in [
        ("mqtt", "mqtt"),
        ("", ""),
        ("/mqtt?x=1", "/mqtt?x=1"),
        ("/a b", "/a b"),
        ("/a#b", "/a#b"),
    ] {
        check_err(
            &format!("[[listener]]\nbind = \"127.0.0.1:8080\"\nprotocol = \"ws\"\npath = {path:?}"),
            &[&format!(
                "listener[0].path: \"{shown}\" is not an HTTP path: it starts with \"/\" and \
                 has no spaces, \"?\" or \"#\" (like \"/mqtt\")"
            )],
        );
    }
    check_err(
        "[[listener]]\nbind = \"127.0.0.1:8443\"\nprotocol = \"wss\"",
        &[
            "listener[0].cert: missing; protocol = \"wss\" needs cert and key (PEM files)",
            "listener[0].key: missing; protocol = \"wss\" needs cert and key (PEM files)",
        ],
    );
    check_err(
        "[[listener]]\nbind = \"127.0.0.1:8080\"\nprotocol = \"ws\"\nmin_tls = \"1.3\"",
        &["listener[0].min_tls: only for protocol = \"tls\" and \"wss\" listeners"],
    );
    check_err(
        "[[listener]]\nbind = \"127.0.0.1:8883\"\nprotocol = \"tls\"\npath = \"/mqtt\"",
        &[
            "listener[0].cert: missing; protocol = \"tls\" needs cert and key (PEM files)",
            "listener[0].key: missing; protocol = \"tls\" needs cert and key (PEM files)",
            "listener[0].path: only for protocol = \"ws\" and \"wss\" listeners",
        ],
    );
    check_err(
        "[[listener]]\nbind = \"127.0.0.1:1883\"\nprotocol = \"TCP\"",
        &[
            "listener[0].protocol: unknown protocol \"TCP\"; expected one of \"tcp\", \"tls\", \
             \"ws\", \"wss\"",
        ],
    );
    for protocol in [
        ListenerProtocol::Tcp,
        ListenerProtocol::Tls,
        ListenerProtocol::Ws,
        ListenerProtocol::Wss,
    ] {
        let text = protocol.to_string();
        assert_eq!(
            protocol.is_tls(),
            text.contains('s') && text != "ws",
            "{text}"
        );
        assert_eq!(protocol.is_websocket(), text.starts_with("ws"), "{text}");
    }
}

#[test]
fn anonymous_only_on_loopback_unless_users_or_remote_anonymous() {
    let message = |offenders: &str| {
        format!(
            "auth.allow_anonymous: anonymous clients may only connect from loopback \
             (127.0.0.1, ::1), but {offenders} and no client from elsewhere could log in: set \
             [auth] password_file (users from `ferrymq passwd FILE USER`), or \
             allow_anonymous_remote = true to let anyone in"
        )
    };
    check_err(
        "[[listener]]\nbind = \"0.0.0.0:1883\"",
        &[&message("listener[0] binds 0.0.0.0:1883")],
    );
    check_err(
        r#"
        [[listener]]
        bind = "127.0.0.1:1883"
        [[listener]]
        bind = "192.168.1.10:1883"
        [[listener]]
        bind = "[::]:1883"
        "#,
        &[&message(
            "listener[1] binds 192.168.1.10:1883, listener[2] binds [::]:1883",
        )],
    );
    // Without anonymous access the same: nobody could log in remotely.
    check_err(
        "[[listener]]\nbind = \"0.0.0.0:1883\"\n[auth]\nallow_anonymous = false",
        &[&message("listener[0] binds 0.0.0.0:1883")],
    );
    // Loopback in every spelling is fine.
    check_ok(
        r#"
        [[listener]]
        bind = "127.0.0.1:1883"
        [[listener]]
        bind = "127.0.0.2:1883"
        [[listener]]
        bind = "[::1]:1883"
        [[listener]]
        bind = "[::ffff:127.0.0.1]:1884"
        "#,
        |c| {
            c.listeners = vec![
                tcp("127.0.0.1:1883"),
                tcp("127.0.0.2:1883"),
                tcp("[::1]:1883"),
                tcp("[::ffff:127.0.0.1]:1884"),
            ];
        },
    );
    // Anonymous from anywhere, said explicitly.
    check_ok(
        "[[listener]]\nbind = \"0.0.0.0:1883\"\n[auth]\nallow_anonymous_remote = true",
        |c| {
            c.listeners = vec![tcp("0.0.0.0:1883")];
            c.auth.allow_anonymous_remote = true;
        },
    );
    check_err(
        "[auth]\nallow_anonymous = false\nallow_anonymous_remote = true",
        &[
            "auth.allow_anonymous_remote: needs allow_anonymous = true (it widens anonymous \
           access to every address)",
        ],
    );
    // With users any address is fine.
    let dir = TempDir::new("passwd");
    let passwd = dir.0.join("passwd");
    std::fs::write(
        &passwd,
        "# users\nsensor-1:$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA\n",
    )
    .expect("write passwd");
    check_ok(
        &format!(
            "[[listener]]\nbind = \"0.0.0.0:1883\"\n[auth]\npassword_file = {:?}",
            passwd.display().to_string()
        ),
        |c| {
            c.listeners = vec![tcp("0.0.0.0:1883")];
            c.auth.password_file = Some(passwd.clone());
        },
    );
    std::fs::write(&passwd, "sensor-1:hunter2\n").expect("write passwd");
    check_err(
        &format!("[auth]\npassword_file = {:?}", passwd.display().to_string()),
        &[&format!(
            "auth.password_file: {} line 1: expected user:$argon2id$... (write users with \
             `ferrymq passwd`; plaintext passwords are not accepted)",
            passwd.display()
        )],
    );
    check_err(
        "[auth]\npassword_file = \"/nonexistent/passwd\"",
        &[
            "auth.password_file: cannot read /nonexistent/passwd: No such file or directory (os \
           error 2)",
        ],
    );
}

#[test]
fn limit_ranges() {
    for (key, value, range) in [
        ("max_connections", "0", "between 1 and 4294967295"),
        ("max_connections", "-1", "between 1 and 4294967295"),
        ("max_connections", "4294967296", "between 1 and 4294967295"),
        (
            "max_connections",
            "99999999999999999999",
            "between 1 and 4294967295",
        ),
        ("receive_maximum", "0", "between 1 and 65535"),
        ("receive_maximum", "65536", "between 1 and 65535"),
        ("receive_maximum", "-3", "between 1 and 65535"),
        ("max_keepalive_secs", "0", "between 1 and 65535 seconds"),
        ("max_keepalive_secs", "65536", "between 1 and 65535 seconds"),
        ("max_keepalive_secs", "-1", "between 1 and 65535 seconds"),
        ("connect_timeout_secs", "0", "between 1 and 3600 seconds"),
        ("connect_timeout_secs", "3601", "between 1 and 3600 seconds"),
        ("connect_timeout_secs", "-10", "between 1 and 3600 seconds"),
        ("topic_alias_maximum", "-1", "between 0 and 65535"),
        ("topic_alias_maximum", "65536", "between 0 and 65535"),
        (
            "topic_alias_maximum",
            "99999999999999999999",
            "between 0 and 65535",
        ),
        ("server_topic_aliases", "-1", "between 0 and 65535"),
        ("server_topic_aliases", "65536", "between 0 and 65535"),
        ("max_topic_levels", "-1", "between 0 and 65536"),
        ("max_topic_levels", "65537", "between 0 and 65536"),
        (
            "max_subscriptions_per_client",
            "-1",
            "between 0 and 4294967295",
        ),
        (
            "max_publish_rate",
            "1000001",
            "between 0 and 1000000 messages per second",
        ),
        (
            "max_publish_rate",
            "-5",
            "between 0 and 1000000 messages per second",
        ),
        (
            "server_topic_aliases",
            "99999999999999999999",
            "between 0 and 65535",
        ),
    ] {
        check_err(
            &format!("[limits]\n{key} = {value}"),
            &[&format!("limits.{key}: must be {range}, got {value}")],
        );
    }
}

#[test]
fn every_problem_reported_at_once() {
    check_err(
        r#"
        node_id = ""
        data_dir = ""
        nodeid = "x"

        [[listener]]
        bind = "0.0.0.0:1883"
        protocol = "wss"
        [[listener]]
        bind = "nowhere"
        [[listener]]
        bind = "0.0.0.0:1883"
        bnd = "x"

        [limits]
        max_connections = 0
        max_packet_size = "1GiB"
        receive_maximum = 0
        max_keepalive_secs = 0
        connect_timeout_secs = 0
        topic_alias_maximum = 65536
        server_topic_aliases = -1
        max_conections = 1

        [storage]
        max_session_expiry_secs = -1
        max_queued_messages = 0
        max_queued_bytes = 10
        queue_full = "drop"
        max_queued_message = 5
        durability = "fsync"
        sync_interval_ms = 0
        max_disk_bytes = "1MiB"
        "#,
        &[
            "nodeid: unknown key; did you mean `node_id`?",
            "listener[2].bnd: unknown key; did you mean `bind`?",
            "limits.max_conections: unknown key; did you mean `max_connections`?",
            "storage.max_queued_message: unknown key; did you mean `max_queued_messages`?",
            "listener[0].cert: missing; protocol = \"wss\" needs cert and key (PEM files)",
            "listener[0].key: missing; protocol = \"wss\" needs cert and key (PEM files)",
            "listener[1].bind: \"nowhere\" is not an address like 127.0.0.1:1883",
            "limits.topic_alias_maximum: must be between 0 and 65535, got 65536",
            "limits.server_topic_aliases: must be between 0 and 65535, got -1",
            "storage.max_session_expiry_secs: must be between 0 and 4294967295 seconds, got -1",
            "storage.queue_full: unknown policy \"drop\"; expected one of \"drop-oldest\", \
             \"drop-newest\", \"refuse\", \"block\"",
            "storage.durability: unknown policy \"fsync\"; expected one of \"group-commit\", \
             \"sync-each\", \"interval\"",
            "node_id: must not be empty",
            "data_dir: must not be empty",
            "listener[2].bind: 0.0.0.0:1883 is already used by listener[0]",
            "auth.allow_anonymous: anonymous clients may only connect from loopback \
             (127.0.0.1, ::1), but listener[0] binds 0.0.0.0:1883, listener[2] binds \
             0.0.0.0:1883 and no client from elsewhere could log in: set [auth] password_file \
             (users from `ferrymq passwd FILE USER`), or allow_anonymous_remote = true to let \
             anyone in",
            "limits.max_connections: must be between 1 and 4294967295, got 0",
            "limits.max_packet_size: must be between 64 and 268435460 bytes, got 1073741824",
            "limits.receive_maximum: must be between 1 and 65535, got 0",
            "limits.max_keepalive_secs: must be between 1 and 65535 seconds, got 0",
            "limits.connect_timeout_secs: must be between 1 and 3600 seconds, got 0",
            "storage.max_queued_messages: must be between 1 and 100000000, got 0",
            "storage.max_queued_bytes: must be between 1024 and 1099511627776 bytes, got 10",
            "storage.sync_interval_ms: must be between 1 and 60000 milliseconds, got 0",
            "storage.max_disk_bytes: must be between 16777216 and 1125899906842624 bytes, \
             got 1048576",
        ],
    );
}

#[test]
fn unknown_keys() {
    check_err(
        r#"
        node_idd = "x"
        colour = "blue"

        [[listener]]
        bind = "127.0.0.1:1883"
        [[listener]]
        bind = "127.0.0.1:1884"
        protocl = "tcp"

        [auth]
        allow_anonymus = true

        [limits]
        max_conections = 10
        recieve_maximum = 5
        max_keepalive = 60
        topic_alias_maximun = 8
        server_topic_alias = 4

        [storage]
        max_session_expiry = 60
        queue_qos_0 = true
        durabilty = "sync-each"
        sync_interval = 50
        max_disk_byte = "8GiB"
        "#,
        &[
            "node_idd: unknown key; did you mean `node_id`?",
            "colour: unknown key",
            "listener[1].protocl: unknown key; did you mean `protocol`?",
            "auth.allow_anonymus: unknown key; did you mean `allow_anonymous`?",
            "limits.max_conections: unknown key; did you mean `max_connections`?",
            "limits.recieve_maximum: unknown key; did you mean `receive_maximum`?",
            "limits.max_keepalive: unknown key",
            "limits.topic_alias_maximun: unknown key; did you mean `topic_alias_maximum`?",
            "limits.server_topic_alias: unknown key; did you mean `server_topic_aliases`?",
            "storage.max_session_expiry: unknown key",
            "storage.queue_qos_0: unknown key; did you mean `queue_qos0`?",
            "storage.durabilty: unknown key; did you mean `durability`?",
            "storage.sync_interval: unknown key",
            "storage.max_disk_byte: unknown key; did you mean `max_disk_bytes`?",
        ],
    );
}

#[test]
fn unknown_keys_in_the_wrong_table_or_not_built_yet() {
    check_err(
        r#"
        max_connections = 10
        [[listeners]]
        bind = "127.0.0.1:1883"
        [[listener]]
        bind = "127.0.0.1:1883"
        [auth]
        password_fil = "passwd"
        [limits]
        queue_full = "refuse"
        durability = "sync-each"
        [storage]
        max_connections = 10
        topic_alias_maximum = 0
        [metric]
        "#,
        &[
            "max_connections: unknown key; `max_connections` belongs in [limits]",
            "listeners: unknown key; did you mean `listener`?",
            "auth.password_fil: unknown key; did you mean `password_file`?",
            "limits.queue_full: unknown key; `queue_full` belongs in [storage]",
            "limits.durability: unknown key; `durability` belongs in [storage]",
            "storage.max_connections: unknown key; `max_connections` belongs in [limits]",
            "storage.topic_alias_maximum: unknown key; `topic_alias_maximum` belongs in [limits]",
            "metric: unknown key; did you mean `metrics`?",
        ],
    );
}

#[test]
fn type_errors_name_the_key() {
    check_err(
        "[limits]\nmax_connections = \"x\"",
        &[r#"limits.max_connections: invalid type: string "x", expected an integer"#],
    );
    check_err(
        "[limits]\ntopic_alias_maximum = \"64\"",
        &[r#"limits.topic_alias_maximum: invalid type: string "64", expected an integer"#],
    );
    check_err(
        "[limits]\ntopic_alias_maximum = true",
        &["limits.topic_alias_maximum: invalid type: boolean `true`, expected an integer"],
    );
    check_err(
        "[limits]\nserver_topic_aliases = 1.5",
        &["limits.server_topic_aliases: invalid type: floating point `1.5`, expected an integer"],
    );
    check_err(
        "[limits]\nserver_topic_aliases = [16]",
        &["limits.server_topic_aliases: invalid type: sequence, expected an integer"],
    );
    check_err(
        "[auth]\nallow_anonymous = \"yes\"",
        &[r#"auth.allow_anonymous: invalid type: string "yes", expected a boolean"#],
    );
    check_err(
        "[[listener]]\nbind = 1883",
        &["listener[0].bind: invalid type: integer `1883`, expected a string"],
    );
    check_err(
        "limits = 5",
        &["limits: invalid type: integer `5`, expected a [limits] table"],
    );
    check_err(
        "storage = \"rocksdb\"",
        &[r#"storage: invalid type: string "rocksdb", expected a [storage] table"#],
    );
    check_err(
        "[storage]\nqueue_qos0 = 1",
        &["storage.queue_qos0: invalid type: integer `1`, expected a boolean"],
    );
    check_err(
        "[storage]\ndurability = 1",
        &["storage.durability: invalid type: integer `1`, expected a string"],
    );
    check_err(
        "[storage]\nsync_interval_ms = \"100\"",
        &[r#"storage.sync_interval_ms: invalid type: string "100", expected an integer"#],
    );
    check_err(
        "[storage]\nmax_disk_bytes = [1]",
        &[
            "storage.max_disk_bytes: invalid type: sequence, expected a size: an integer number \
             of bytes or a string like \"1MiB\"",
        ],
    );
    check_err(
        "[storage]\nmax_queued_messages = 1.5",
        &["storage.max_queued_messages: invalid type: floating point `1.5`, expected an integer"],
    );
    check_err(
        "[listener]\nbind = \"127.0.0.1:1883\"",
        &[
            "listener: invalid type: map, expected a sequence (write each listener as \
           [[listener]], with double brackets)",
        ],
    );
    // Unknown keys seen before the type error (toml visits tables in key
    // order) are reported with it.
    check_err(
        "[auth]\nallow_anonymus = true\n[limits]\nmax_connections = true",
        &[
            "auth.allow_anonymus: unknown key; did you mean `allow_anonymous`?",
            "limits.max_connections: invalid type: boolean `true`, expected an integer",
        ],
    );
}

#[test]
fn syntax_error() {
    let errors = Config::from_toml_str("data_dir = \"x\"\n[limits\nmax_connections = 1\n")
        .expect_err("syntax error");
    assert_eq!(errors.0.len(), 1, "{errors}");
    let error = &errors.0[0];
    assert_eq!(error.key, "");
    assert!(
        error
            .message
            .starts_with("TOML syntax error at line 2, column 8: "),
        "{}",
        error.message
    );
    assert!(!error.message.contains('\n'), "one line: {}", error.message);

    let errors = Config::from_toml_str("a = 1\na = 2\n").expect_err("duplicate key");
    assert_eq!(errors.0.len(), 1, "{errors}");
    assert!(
        errors.0[0]
            .message
            .starts_with("TOML syntax error at line 2"),
        "{errors}"
    );
}

/// `text` with every commented-out setting (`# key = value`, `# [table]`)
/// uncommented; prose comments stay.
fn uncomment_settings(text: &str) -> String {
    let is_setting = |line: &str| {
        line.starts_with('[')
            || line.split_once(" = ").is_some_and(|(key, _)| {
                !key.is_empty()
                    && key
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            })
    };
    let lines: Vec<&str> = text
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(setting) if is_setting(setting) => setting,
            _ => line,
        })
        .collect();
    lines.join("\n")
}

/// Every key path in `table`, tables and every table of arrays of tables
/// included (each path once): `bridge`, `bridge.tls`,
/// `bridge.tls.ca_file`, ...
fn key_paths(prefix: &str, table: &toml::Table, out: &mut Vec<String>) {
    for (key, value) in table {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        let nested: Vec<&toml::Table> = match value {
            toml::Value::Table(nested) => vec![nested],
            toml::Value::Array(items) => items.iter().filter_map(toml::Value::as_table).collect(),
            _ => Vec::new(),
        };
        for nested in nested {
            key_paths(&path, nested, out);
        }
        if !out.contains(&path) {
            out.push(path);
        }
    }
}

#[test]
fn default_config_toml_round_trip() {
    let text = default_config_toml();
    // node_id is commented out: its default is the host name. So is the
    // example bridge: there is none by default.
    assert!(text.contains("# node_id = "));
    assert!(text.contains("# [[bridge]]"));
    assert_eq!(Config::from_toml_str(text), Ok(Config::default()));

    // With its settings uncommented, it shows every key the code accepts,
    // and nothing else.
    let uncommented = uncomment_settings(text);
    let table: toml::Table = uncommented.parse().expect("default.toml parses");
    let mut shown = Vec::new();
    key_paths("", &table, &mut shown);
    shown.sort();
    let mut accepted: Vec<String> = Vec::new();
    for table in crate::raw::TABLES {
        for key in table.keys {
            let path: Vec<&str> = table.path.iter().chain([key]).copied().collect();
            accepted.push(path.join("."));
        }
    }
    accepted.sort();
    assert_eq!(shown, accepted);
}

#[test]
fn default_config_toml_example_bridge() {
    // The example, uncommented, is a valid bridge whose keys that have a
    // default show it.
    let dir = TempDir::new("example-bridge");
    for name in ["regional-ca.pem", "edge-01.pem", "edge-01.key"] {
        dir.file(name);
    }
    // The example TLS listener's files, and the example password and ACL
    // files (no users, no rules yet).
    for name in ["server.pem", "server.key", "clients-ca.pem"] {
        dir.file(name);
    }
    std::fs::write(dir.0.join("passwd"), "").expect("passwd");
    std::fs::write(dir.0.join("acl.toml"), "").expect("acl");
    let uncommented = uncomment_settings(default_config_toml())
        .replace("/etc/ferrymq/", &format!("{}/", dir.0.display()));
    let config = match Config::from_toml_str(&uncommented) {
        Ok(config) => config,
        Err(errors) => panic!("example bridge refused:\n{errors}"),
    };
    assert_eq!(
        config.bridges,
        [Bridge {
            name: "regional".into(),
            addresses: vec![
                address("10.0.0.5", 8883),
                address("regional-2.example.com", 8883)
            ],
            client_id: format!("{}-regional", config.node_id),
            username: Some("edge-01".into()),
            password: Some("change-me".into()),
            tls: Some(BridgeTls {
                ca_file: dir.0.join("regional-ca.pem"),
                cert_file: Some(dir.0.join("edge-01.pem")),
                key_file: Some(dir.0.join("edge-01.key")),
                server_name: Some("regional.example.com".into()),
            }),
            forward: vec![
                Forward {
                    filter: "sensors/#".into(),
                    remote_prefix: "site-1/".into(),
                    ..Forward::default()
                },
                Forward {
                    filter: "commands/edge-01/#".into(),
                    direction: Direction::In,
                    ..Forward::default()
                },
            ],
            ..Bridge::default()
        }]
    );
}

#[test]
fn validate_config_built_in_code() {
    let mut config = Config::default();
    assert_eq!(config.validate(), Ok(()));

    config.node_id = String::new();
    config.listeners = vec![tcp("10.0.0.1:1883"), tcp("10.0.0.1:1883")];
    config.limits.max_keepalive = Duration::ZERO;
    config.limits.connect_timeout = Duration::from_millis(500);
    config.limits.max_packet_size = 10;
    config.storage.max_session_expiry = Duration::from_secs(u64::from(u32::MAX) + 1);
    config.storage.max_queued_messages = 0;
    config.storage.max_queued_bytes = (1 << 40) + 1;
    config.storage.sync_interval = Duration::from_micros(999);
    config.storage.max_disk_bytes = (1 << 50) + 1;
    let errors = config.validate().expect_err("invalid");
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        lines,
        [
            "node_id: must not be empty",
            "listener[1].bind: 10.0.0.1:1883 is already used by listener[0]",
            "auth.allow_anonymous: anonymous clients may only connect from loopback \
             (127.0.0.1, ::1), but listener[0] binds 10.0.0.1:1883, listener[1] binds \
             10.0.0.1:1883 and no client from elsewhere could log in: set [auth] password_file \
             (users from `ferrymq passwd FILE USER`), or allow_anonymous_remote = true to let \
             anyone in",
            "limits.max_packet_size: must be between 64 and 268435460 bytes, got 10",
            "limits.max_keepalive_secs: must be between 1 and 65535 seconds, got 0",
            "limits.connect_timeout_secs: must be between 1 and 3600 seconds, got 0",
            "storage.max_session_expiry_secs: must be between 0 and 4294967295 seconds, \
             got 4294967296",
            "storage.max_queued_messages: must be between 1 and 100000000, got 0",
            "storage.max_queued_bytes: must be between 1024 and 1099511627776 bytes, \
             got 1099511627777",
            "storage.sync_interval_ms: must be between 1 and 60000 milliseconds, got 0",
            "storage.max_disk_bytes: must be between 16777216 and 1125899906842624 bytes, \
             got 1125899906842625",
        ]
    );

    // A sync interval is checked on its whole milliseconds, however long.
    for (interval, expected) in [
        (Duration::from_micros(1500), Ok(())),
        (Duration::from_secs(60), Ok(())),
        (Duration::from_millis(60_001), Err("60001")),
        (Duration::MAX, Err("18446744073709551615999")),
    ] {
        let mut config = Config::default();
        config.storage.sync_interval = interval;
        let expected = expected.map_err(|got| {
            ConfigErrors(vec![ConfigError {
                key: "storage.sync_interval_ms".into(),
                message: format!("must be between 1 and 60000 milliseconds, got {got}"),
            }])
        });
        assert_eq!(config.validate(), expected, "{interval:?}");
    }

    // Every durability policy is valid, with the interval used or not.
    for durability in [
        Durability::GroupCommit,
        Durability::SyncEach,
        Durability::Interval,
    ] {
        let mut config = Config::default();
        config.storage.durability = durability;
        assert_eq!(config.validate(), Ok(()), "{durability}");
    }

    // Topic aliases: 0 (none) and the largest 16-bit count are both valid.
    for count in [0, u16::MAX] {
        let mut config = Config::default();
        config.limits.topic_alias_maximum = count;
        config.limits.server_topic_aliases = count;
        assert_eq!(config.validate(), Ok(()), "{count}");
    }

    // Session expiry 0 (end at disconnect) and "never" are both valid.
    for secs in [0, u64::from(u32::MAX)] {
        let mut config = Config::default();
        config.storage.max_session_expiry = Duration::from_secs(secs);
        assert_eq!(config.validate(), Ok(()), "{secs}");
    }

    let no_listeners = Config {
        listeners: Vec::new(),
        ..Config::default()
    };
    assert_eq!(
        no_listeners.validate(),
        Err(ConfigErrors(vec![ConfigError {
            key: "listener".into(),
            message: "at least one [[listener]] is required".into(),
        }]))
    );
}

#[test]
fn errors_display_one_line_each() {
    let errors = ConfigErrors(vec![
        ConfigError {
            key: String::new(),
            message: "whole file".into(),
        },
        ConfigError {
            key: "limits.max_connections".into(),
            message: "must be between 1 and 4294967295, got 0".into(),
        },
    ]);
    assert_eq!(
        errors.to_string(),
        "whole file\nlimits.max_connections: must be between 1 and 4294967295, got 0"
    );
    let as_error: &dyn std::error::Error = &errors;
    assert!(as_error.source().is_none());
}

#[test]
fn from_file_missing() {
    let path = Path::new("/nonexistent/ferrymq-config-test/ferrymq.toml");
    let errors = Config::from_file(path).expect_err("missing file");
    assert_eq!(errors.0.len(), 1);
    assert_eq!(errors.0[0].key, "");
    assert!(
        errors.0[0]
            .message
            .starts_with("cannot read config file /nonexistent/ferrymq-config-test/ferrymq.toml: "),
        "{errors}"
    );
}

#[test]
fn from_file_reads_and_validates() {
    let dir = std::env::temp_dir().join(format!("ferrymq-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("ferrymq.toml");
    std::fs::write(&path, "[limits]\nmax_connections = 7\n").expect("write config");
    let loaded = Config::from_file(&path);
    std::fs::write(&path, "[limits]\nmax_connections = 0\n").expect("write config");
    let refused = Config::from_file(&path);
    std::fs::remove_dir_all(&dir).expect("clean up");

    let mut expected = Config::default();
    expected.limits.max_connections = 7;
    assert_eq!(loaded, Ok(expected));
    assert_eq!(
        refused.expect_err("invalid").to_string(),
        "limits.max_connections: must be between 1 and 4294967295, got 0"
    );
}

/// A file with one valid bridge (`regional()`), `extra` written among its
/// keys; `extra` may end with a `[bridge.tls]` table.
fn bridge_toml(extra: &str) -> String {
    format!(
        "node_id = \"edge-01\"\n[[bridge]]\nname = \"regional\"\n\
         addresses = [\"10.0.0.5:1883\"]\n{extra}\n[[bridge.forward]]\nfilter = \"sensors/#\"\n"
    )
}

/// A file with one bridge whose only forward rule is `{ rule }`.
fn forward_toml(rule: &str) -> String {
    format!(
        "node_id = \"edge-01\"\n[[bridge]]\nname = \"regional\"\n\
         addresses = [\"10.0.0.5:1883\"]\nforward = [ {{ {rule} }} ]\n"
    )
}

/// The bridge of `bridge_toml("")`.
fn regional() -> Bridge {
    Bridge {
        name: "regional".into(),
        addresses: vec![address("10.0.0.5", 1883)],
        client_id: "edge-01-regional".into(),
        forward: vec![Forward {
            filter: "sensors/#".into(),
            ..Forward::default()
        }],
        ..Bridge::default()
    }
}

/// `toml` must parse to the defaults with node_id "edge-01" and the one
/// bridge `regional()` changed by `edit`.
fn check_bridge_ok(toml: &str, edit: impl FnOnce(&mut Bridge)) {
    let mut bridge = regional();
    edit(&mut bridge);
    check_ok(toml, |c| {
        c.node_id = "edge-01".into();
        c.bridges = vec![bridge];
    });
}

#[test]
fn bridge_defaults() {
    assert_eq!(
        Bridge::default(),
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
            session_expiry: Duration::from_secs(604_800),
            inflight: 100,
            batch_size: 500,
            batch_bytes: 256 << 10,
            batch_linger: Duration::ZERO,
            drain_rate: 0,
            ramp: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_millis(60_000),
            max_queued_messages: 10_000_000,
            max_queued_bytes: 1_073_741_824,
            tls: None,
            forward: Vec::new(),
        }
    );
    assert_eq!(
        Forward::default(),
        Forward {
            filter: String::new(),
            direction: Direction::Out,
            qos: 1,
            local_prefix: String::new(),
            remote_prefix: String::new(),
            lane: crate::Lane::Backlog,
            max_age: None,
        }
    );
    assert_eq!(BridgeKind::default(), BridgeKind::Mqtt);
    assert_eq!(BridgeProtocol::default(), BridgeProtocol::V5);
    assert_eq!(Direction::default(), Direction::Out);

    check_bridge_ok(&bridge_toml(""), |_| {});
    // An empty client_id is the default too.
    check_bridge_ok(&bridge_toml("client_id = \"\""), |_| {});
    // `forward = [ { ... } ]` is the same TOML as [[bridge.forward]].
    check_bridge_ok(&forward_toml("filter = \"sensors/#\""), |_| {});

    // The default client_id follows the node_id, default or not.
    let config = Config::from_toml_str(
        "[[bridge]]\nname = \"up\"\naddresses = [\"h:1\"]\nforward = [ { filter = \"#\" } ]",
    )
    .expect("valid");
    assert_eq!(
        config.bridges[0].client_id,
        format!("{}-up", config.node_id)
    );
}

#[test]
fn every_bridge_key_parsed() {
    let dir = TempDir::new("every-bridge-key");
    let ca = dir.file("ca.pem");
    let cert = dir.file("edge.pem");
    let key = dir.file("edge.key");
    let toml = format!(
        r##"
        node_id = "edge-01"

        [[bridge]]
        name = "regional"
        addresses = ["10.0.0.5:8883", "[fd00::5]:8883", "regional.example.com:8884"]
        kind = "mqtt"
        protocol = "3.1.1"
        client_id = "gateway-7"
        username = "edge"
        password = "secret"
        keepalive_secs = 15
        connect_timeout_secs = 5
        session_expiry_secs = 0
        inflight = 20
        batch_linger_ms = 20
        drain_rate = 500
        ramp_secs = 0
        reconnect_min_ms = 100
        reconnect_max_ms = 100
        max_queued_messages = 1000
        max_queued_bytes = "10MiB"

        [bridge.tls]
        ca_file = "{ca}"
        cert_file = "{cert}"
        key_file = "{key}"
        server_name = "regional.example.com"

        [[bridge.forward]]
        filter = "sensors/+/temp"
        direction = "both"
        qos = 2
        local_prefix = "local/"
        remote_prefix = "site-1/"

        [[bridge.forward]]
        filter = "#"
        direction = "in"
        qos = 0
        local_prefix = "from-regional/"

        [[bridge]]
        name = "cloud_2"
        addresses = ["cloud.example.com:1883"]
        forward = [ {{ filter = "alarms/#", direction = "out" }} ]
        "##,
        ca = ca.display(),
        cert = cert.display(),
        key = key.display(),
    );
    check_ok(&toml, |c| {
        c.node_id = "edge-01".into();
        c.bridges = vec![
            Bridge {
                name: "regional".into(),
                addresses: vec![
                    address("10.0.0.5", 8883),
                    address("fd00::5", 8883),
                    address("regional.example.com", 8884),
                ],
                kind: BridgeKind::Mqtt,
                protocol: BridgeProtocol::V311,
                client_id: "gateway-7".into(),
                username: Some("edge".into()),
                password: Some("secret".into()),
                keepalive: Duration::from_secs(15),
                connect_timeout: Duration::from_secs(5),
                session_expiry: Duration::ZERO,
                inflight: 20,
                batch_size: 500,
                batch_bytes: 256 << 10,
                batch_linger: Duration::from_millis(20),
                drain_rate: 500,
                ramp: Duration::ZERO,
                reconnect_min: Duration::from_millis(100),
                reconnect_max: Duration::from_millis(100),
                max_queued_messages: 1000,
                max_queued_bytes: 10 << 20,
                tls: Some(BridgeTls {
                    ca_file: ca.clone(),
                    cert_file: Some(cert.clone()),
                    key_file: Some(key.clone()),
                    server_name: Some("regional.example.com".into()),
                }),
                forward: vec![
                    Forward {
                        filter: "sensors/+/temp".into(),
                        direction: Direction::Both,
                        qos: 2,
                        local_prefix: "local/".into(),
                        remote_prefix: "site-1/".into(),
                        lane: crate::Lane::Backlog,
                        max_age: None,
                    },
                    Forward {
                        filter: "#".into(),
                        direction: Direction::In,
                        qos: 0,
                        local_prefix: "from-regional/".into(),
                        remote_prefix: String::new(),
                        lane: crate::Lane::Backlog,
                        max_age: None,
                    },
                ],
            },
            Bridge {
                name: "cloud_2".into(),
                addresses: vec![address("cloud.example.com", 1883)],
                client_id: "edge-01-cloud_2".into(),
                forward: vec![Forward {
                    filter: "alarms/#".into(),
                    ..Forward::default()
                }],
                ..Bridge::default()
            },
        ];
    });
}

#[test]
fn bridge_enums() {
    for (text, protocol) in [("5", BridgeProtocol::V5), ("3.1.1", BridgeProtocol::V311)] {
        check_bridge_ok(&bridge_toml(&format!("protocol = \"{text}\"")), |b| {
            b.protocol = protocol;
        });
        assert_eq!(protocol.as_str(), text);
        assert_eq!(protocol.to_string(), text);
    }
    for (text, direction) in [
        ("out", Direction::Out),
        ("in", Direction::In),
        ("both", Direction::Both),
    ] {
        check_bridge_ok(
            &forward_toml(&format!("filter = \"sensors/#\", direction = \"{text}\"")),
            |b| b.forward[0].direction = direction,
        );
        assert_eq!(direction.as_str(), text);
        assert_eq!(direction.to_string(), text);
    }
    check_bridge_ok(&bridge_toml("kind = \"mqtt\""), |_| {});
    assert_eq!(BridgeKind::Mqtt.as_str(), "mqtt");
    assert_eq!(BridgeKind::Mqtt.to_string(), "mqtt");
}

#[test]
fn bridge_kind() {
    check_ok(
        &bridge_toml("kind = \"ferrymq\"\nbatch_size = 1000\nbatch_bytes = \"1MiB\""),
        |c| {
            let mut b = regional();
            b.kind = crate::BridgeKind::Ferrymq;
            b.batch_size = 1000;
            b.batch_bytes = 1 << 20;
            c.node_id = "edge-01".into();
            c.bridges = vec![b];
        },
    );
    check_err(
        &bridge_toml("kind = \"amqp\""),
        &["bridge[0].kind: unknown kind \"amqp\"; expected \"mqtt\" or \"ferrymq\""],
    );
    check_err(
        &bridge_toml("kind = \"ferrymq\"\nprotocol = \"3.1.1\"\nbatch_size = 0\nbatch_bytes = 10"),
        &[
            "bridge[0].batch_size: must be between 1 and 65535, got 0",
            "bridge[0].batch_bytes: must be between 1024 and 67108864 bytes, got 10",
            "bridge[0].kind: \"ferrymq\" needs protocol = \"5\" (batches are negotiated with \
             MQTT 5 user properties)",
        ],
    );
}

#[test]
fn bridge_protocol() {
    let expected = "expected one of \"5\", \"3.1.1\"";
    for (text, hint) in [
        ("5.0", " (did you mean \"5\"?)"),
        ("v5", " (did you mean \"5\"?)"),
        ("3.1", " (did you mean \"3.1.1\"?)"),
        ("311", " (did you mean \"3.1.1\"?)"),
        ("4", " (did you mean \"3.1.1\", whose protocol level is 4?)"),
        ("3", " (did you mean \"3.1.1\"?)"),
        ("6", " (did you mean \"5\"?)"),
        ("mqttv5", ""),
        ("", ""),
    ] {
        check_err(
            &bridge_toml(&format!("protocol = \"{text}\"")),
            &[&format!(
                "bridge[0].protocol: unknown protocol \"{text}\"{hint}; {expected}"
            )],
        );
    }
    check_err(
        &bridge_toml("protocol = 5"),
        &[
            "bridge[0].protocol: invalid type: integer `5`, expected a string (write protocol = \
           \"5\" or \"3.1.1\", in quotes)",
        ],
    );
}

#[test]
fn bridge_names() {
    let name_rule = "1 to 64 of A-Z a-z 0-9 _ -";
    check_bridge_ok(
        &bridge_toml("").replace("\"regional\"", &format!("\"{}\"", "a".repeat(64))),
        |b| {
            b.name = "a".repeat(64);
            b.client_id = format!("edge-01-{}", "a".repeat(64));
        },
    );
    check_bridge_ok(
        &bridge_toml("").replace("\"regional\"", "\"Up_link-2\""),
        |b| {
            b.name = "Up_link-2".into();
            b.client_id = "edge-01-Up_link-2".into();
        },
    );
    for bad in ["bad name", "up/1", "été", "a.b", &"a".repeat(65)] {
        check_err(
            &bridge_toml("").replace("\"regional\"", &format!("\"{bad}\"")),
            &[&format!(
                "bridge[0].name: \"{bad}\" is not a valid bridge name: use {name_rule}"
            )],
        );
    }
    let missing =
        format!("bridge[0].name: missing or empty; every [[bridge]] needs a name: {name_rule}");
    check_err(
        &bridge_toml("").replace("\"regional\"", "\"\""),
        &[&missing],
    );
    check_err(
        &bridge_toml("").replace("name = \"regional\"\n", ""),
        &[&missing],
    );
    check_err(
        r##"
        [[bridge]]
        name = "a"
        addresses = ["h:1"]
        forward = [ { filter = "#" } ]
        [[bridge]]
        name = "b"
        addresses = ["h:1"]
        forward = [ { filter = "#" } ]
        [[bridge]]
        name = "a"
        addresses = ["h:1"]
        forward = [ { filter = "#" } ]
        [[bridge]]
        name = "b"
        addresses = ["h:1"]
        forward = [ { filter = "#" } ]
        "##,
        &[
            "bridge[2].name: \"a\" is already used by bridge[0]",
            "bridge[3].name: \"b\" is already used by bridge[1]",
        ],
    );
}

#[test]
fn bridge_addresses() {
    for (text, host, port) in [
        ("10.0.0.5:8883", "10.0.0.5", 8883),
        ("[::1]:1883", "::1", 1883),
        ("[fd00::5]:1", "fd00::5", 1),
        ("[::ffff:10.0.0.5]:1883", "::ffff:10.0.0.5", 1883),
        ("broker.example.com:65535", "broker.example.com", 65535),
        ("localhost:1883", "localhost", 1883),
        ("my_broker:1883", "my_broker", 1883),
        ("Broker-1.Example.COM:1883", "Broker-1.Example.COM", 1883),
        ("1a.example:1883", "1a.example", 1883),
    ] {
        check_bridge_ok(&bridge_toml("").replace("10.0.0.5:1883", text), |b| {
            b.addresses = vec![address(host, port)]
        });
        assert_eq!(address(host, port).to_string(), text);
    }

    let no_port = |text: &str, like: &str| {
        format!(
            "\"{text}\" has no port; write \"host:port\", like \"{like}:1883\" (8883 is usual \
             with TLS)"
        )
    };
    let not_host = |host: &str| {
        format!(
            "\"{host}\" is not a host name (dot-separated labels of 1 to 63 letters, digits, '-' \
             or '_', not starting or ending with '-'), an IPv4 address or an IPv6 address"
        )
    };
    let ipv6 = |text: &str| {
        format!(
            "\"{text}\": an IPv6 address goes in brackets, with the port after them, like \
             \"[fd00::5]:1883\""
        )
    };
    let long_label = "a".repeat(64);
    let long_name = ["a".repeat(63).as_str(); 4].join(".");
    for (text, expected) in [
        ("10.0.0.5", no_port("10.0.0.5", "10.0.0.5")),
        ("broker", no_port("broker", "broker")),
        ("broker:", no_port("broker:", "broker")),
        ("[::1]", no_port("[::1]", "[::1]")),
        ("[::1]:", no_port("[::1]:", "[::1]")),
        ("::1:1883", ipv6("::1:1883")),
        ("fd00::5", ipv6("fd00::5")),
        (
            "[1.2.3.4]:1883",
            "\"[1.2.3.4]:1883\": brackets are for IPv6 addresses, and \"1.2.3.4\" is not one"
                .into(),
        ),
        (
            "[broker]:1883",
            "\"[broker]:1883\": brackets are for IPv6 addresses, and \"broker\" is not one".into(),
        ),
        ("[::1:1883", "\"[::1:1883\" has no closing ']'".into()),
        (
            "[::1]1883",
            "\"[::1]1883\" is not \"host:port\"; write an IPv6 address like \"[::1]:1883\"".into(),
        ),
        (
            "mqtt://broker:1883",
            "\"mqtt://broker:1883\": write \"host:port\" without \"mqtt://\", like \
             \"broker:1883\""
                .into(),
        ),
        (
            "broker:0",
            "\"broker:0\": port must be between 1 and 65535, got 0".into(),
        ),
        (
            "broker:65536",
            "\"broker:65536\": port must be between 1 and 65535, got 65536".into(),
        ),
        (
            "broker:99999999999999999999999",
            "\"broker:99999999999999999999999\": port must be between 1 and 65535, got \
             99999999999999999999999"
                .into(),
        ),
        (
            "broker:http",
            "\"broker:http\": port must be between 1 and 65535, got \"http\"".into(),
        ),
        (
            "broker:+1883",
            "\"broker:+1883\": port must be between 1 and 65535, got \"+1883\"".into(),
        ),
        (
            "broker: 1883",
            "\"broker: 1883\": port must be between 1 and 65535, got \" 1883\"".into(),
        ),
        (
            "",
            "empty; write \"host:port\", like \"broker.example.com:1883\"".into(),
        ),
        (
            ":1883",
            "\":1883\": no host; write \"host:port\", like \"broker.example.com:1883\"".into(),
        ),
        (
            "999.1.1.1:1883",
            "\"999.1.1.1:1883\": \"999.1.1.1\" is not an IPv4 address".into(),
        ),
        (
            "10.0.0:1883",
            "\"10.0.0:1883\": \"10.0.0\" is not an IPv4 address".into(),
        ),
        (
            "foo bar:1883",
            format!("\"foo bar:1883\": {}", not_host("foo bar")),
        ),
        (
            "-bad.example.com:1883",
            format!(
                "\"-bad.example.com:1883\": {}",
                not_host("-bad.example.com")
            ),
        ),
        (
            "bad-.example.com:1883",
            format!(
                "\"bad-.example.com:1883\": {}",
                not_host("bad-.example.com")
            ),
        ),
        ("a..b:1883", format!("\"a..b:1883\": {}", not_host("a..b"))),
        (
            "example.com.:1883",
            format!("\"example.com.:1883\": {}", not_host("example.com.")),
        ),
        (
            &format!("{long_label}:1883"),
            format!("\"{long_label}:1883\": {}", not_host(&long_label)),
        ),
        (
            &format!("{long_name}:1883"),
            format!("\"{long_name}:1883\": {}", not_host(&long_name)),
        ),
    ] {
        check_err(
            &bridge_toml("").replace("10.0.0.5:1883", text),
            &[&format!("bridge[0].addresses[0]: {expected}")],
        );
    }
    // 63-character labels, 251 bytes in all: the longest name accepted.
    let longest = ["a".repeat(63).as_str(); 3]
        .into_iter()
        .chain(["a".repeat(59).as_str()])
        .collect::<Vec<_>>()
        .join(".");
    assert_eq!(longest.len(), 251);
    check_bridge_ok(&bridge_toml("").replace("10.0.0.5", &longest), |b| {
        b.addresses = vec![address(&longest, 1883)]
    });

    // Each bad address is reported with its index; good ones are kept.
    check_err(
        &bridge_toml("").replace(
            "[\"10.0.0.5:1883\"]",
            "[\"10.0.0.5:1883\", \"nowhere\", \"h:0\", \"[::1]:1883\"]",
        ),
        &[
            &format!("bridge[0].addresses[1]: {}", no_port("nowhere", "nowhere")),
            "bridge[0].addresses[2]: \"h:0\": port must be between 1 and 65535, got 0",
        ],
    );

    let missing = "bridge[0].addresses: missing or empty; every [[bridge]] needs at least one \
                   address, like addresses = [\"broker.example.com:1883\"]";
    check_err(
        &bridge_toml("").replace("addresses = [\"10.0.0.5:1883\"]\n", ""),
        &[missing],
    );
    check_err(
        &bridge_toml("").replace("[\"10.0.0.5:1883\"]", "[]"),
        &[missing],
    );
}

#[test]
fn bridge_client_id_and_credentials() {
    check_bridge_ok(&bridge_toml("client_id = \"gw-7\""), |b| {
        b.client_id = "gw-7".into();
    });
    let longest = "x".repeat(65_535);
    check_bridge_ok(&bridge_toml(&format!("client_id = \"{longest}\"")), |b| {
        b.client_id = longest.clone();
    });
    check_err(
        &bridge_toml(&format!("client_id = \"{longest}x\"")),
        &["bridge[0].client_id: must be at most 65535 bytes, got 65536"],
    );
    check_err(
        &bridge_toml("client_id = \"a\\u0000b\""),
        &["bridge[0].client_id: must not contain U+0000"],
    );
    check_err(
        &bridge_toml("username = \"a\\u0000b\""),
        &["bridge[0].username: must not contain U+0000"],
    );
    check_err(
        &bridge_toml(&format!("password = \"{longest}x\"")),
        &["bridge[0].password: must be at most 65535 bytes, got 65536"],
    );

    // A password without a username: fine in MQTT 5, refused in 3.1.1.
    check_bridge_ok(&bridge_toml("password = \"secret\""), |b| {
        b.password = Some("secret".into());
    });
    check_bridge_ok(
        &bridge_toml("protocol = \"3.1.1\"\nusername = \"\"\npassword = \"secret\""),
        |b| {
            b.protocol = BridgeProtocol::V311;
            b.username = Some(String::new());
            b.password = Some("secret".into());
        },
    );
    check_bridge_ok(
        &bridge_toml("protocol = \"3.1.1\"\nusername = \"edge\""),
        |b| {
            b.protocol = BridgeProtocol::V311;
            b.username = Some("edge".into());
        },
    );
    check_err(
        &bridge_toml("protocol = \"3.1.1\"\npassword = \"secret\""),
        &[
            "bridge[0].password: MQTT 3.1.1 does not allow a password without a username; set \
           username too, or use protocol \"5\"",
        ],
    );
}

#[test]
fn bridge_debug_hides_the_password() {
    let bridge = Bridge {
        password: Some("hunter2".into()),
        ..regional()
    };
    let debug = format!("{bridge:?}");
    assert!(!debug.contains("hunter2"), "{debug}");
    assert!(debug.contains("password: Some(\"<redacted>\")"), "{debug}");
    assert!(debug.contains("name: \"regional\""), "{debug}");
    assert!(
        format!("{regional:?}", regional = regional()).contains("password: None"),
        "no password"
    );
}

#[test]
fn bridge_numbers_at_their_bounds() {
    check_bridge_ok(
        &bridge_toml(
            "keepalive_secs = 1\nconnect_timeout_secs = 1\nsession_expiry_secs = 0\n\
             inflight = 1\ndrain_rate = 0\nramp_secs = 0\nreconnect_min_ms = 10\n\
             reconnect_max_ms = 10\nmax_queued_messages = 1\nmax_queued_bytes = \"1KiB\"",
        ),
        |b| {
            b.keepalive = Duration::from_secs(1);
            b.connect_timeout = Duration::from_secs(1);
            b.session_expiry = Duration::ZERO;
            b.inflight = 1;
            b.drain_rate = 0;
            b.ramp = Duration::ZERO;
            b.reconnect_min = Duration::from_millis(10);
            b.reconnect_max = Duration::from_millis(10);
            b.max_queued_messages = 1;
            b.max_queued_bytes = 1024;
        },
    );
    check_bridge_ok(
        &bridge_toml(
            "keepalive_secs = 65535\nconnect_timeout_secs = 300\n\
             session_expiry_secs = 4294967295\ninflight = 65535\ndrain_rate = 10000000\n\
             ramp_secs = 3600\nreconnect_min_ms = 3600000\nreconnect_max_ms = 86400000\n\
             max_queued_messages = 1000000000\nmax_queued_bytes = \"1024TiB\"",
        ),
        |b| {
            b.keepalive = Duration::from_secs(65_535);
            b.connect_timeout = Duration::from_secs(300);
            b.session_expiry = Duration::from_secs(u64::from(u32::MAX));
            b.inflight = 65_535;
            b.drain_rate = 10_000_000;
            b.ramp = Duration::from_secs(3600);
            b.reconnect_min = Duration::from_secs(3600);
            b.reconnect_max = Duration::from_secs(86_400);
            b.max_queued_messages = 1_000_000_000;
            b.max_queued_bytes = 1 << 50;
        },
    );
}

#[test]
fn bridge_ranges() {
    for (key, value, range) in [
        ("keepalive_secs", "65536", "between 1 and 65535 seconds"),
        ("keepalive_secs", "-1", "between 1 and 65535 seconds"),
        ("connect_timeout_secs", "0", "between 1 and 300 seconds"),
        ("connect_timeout_secs", "301", "between 1 and 300 seconds"),
        (
            "session_expiry_secs",
            "-1",
            "between 0 and 4294967295 seconds",
        ),
        (
            "session_expiry_secs",
            "4294967296",
            "between 0 and 4294967295 seconds",
        ),
        ("inflight", "0", "between 1 and 65535"),
        ("inflight", "65536", "between 1 and 65535"),
        (
            "drain_rate",
            "-1",
            "between 0 and 10000000 messages per second",
        ),
        (
            "drain_rate",
            "10000001",
            "between 0 and 10000000 messages per second",
        ),
        (
            "drain_rate",
            "4294967296",
            "between 0 and 10000000 messages per second",
        ),
        ("ramp_secs", "-1", "between 0 and 3600 seconds"),
        ("ramp_secs", "3601", "between 0 and 3600 seconds"),
        (
            "reconnect_min_ms",
            "9",
            "between 10 and 3600000 milliseconds",
        ),
        (
            "reconnect_min_ms",
            "3600001",
            "between 10 and 3600000 milliseconds",
        ),
        (
            "reconnect_max_ms",
            "86400001",
            "between 10 and 86400000 milliseconds",
        ),
        (
            "reconnect_max_ms",
            "-1",
            "between 10 and 86400000 milliseconds",
        ),
        ("max_queued_messages", "0", "between 1 and 1000000000"),
        (
            "max_queued_messages",
            "1000000001",
            "between 1 and 1000000000",
        ),
        (
            "max_queued_bytes",
            "1023",
            "between 1024 and 1125899906842624 bytes",
        ),
        (
            "max_queued_bytes",
            "1125899906842625",
            "between 1024 and 1125899906842624 bytes",
        ),
    ] {
        check_err(
            &bridge_toml(&format!("{key} = {value}")),
            &[&format!("bridge[0].{key}: must be {range}, got {value}")],
        );
    }
    check_err(
        &bridge_toml("keepalive_secs = 0"),
        &[
            "bridge[0].keepalive_secs: must be between 1 and 65535 seconds, got 0: the bridge \
           needs a keepalive to notice a half-open link to the upstream",
        ],
    );
    check_err(
        &bridge_toml("max_queued_bytes = \"2 gib\""),
        &[
            "bridge[0].max_queued_bytes: invalid size \"2 gib\": unknown unit \"gib\" (units are \
           case-sensitive: did you mean \"GiB\"?); units are B, KB, MB, GB, TB, KiB, MiB, GiB, \
           TiB",
        ],
    );
    check_bridge_ok(&bridge_toml("max_queued_bytes = \"500MB\""), |b| {
        b.max_queued_bytes = 500_000_000;
    });
}

#[test]
fn bridge_reconnect_max_at_least_min() {
    check_err(
        &bridge_toml("reconnect_min_ms = 1000\nreconnect_max_ms = 999"),
        &["bridge[0].reconnect_max_ms: must be at least reconnect_min_ms (1000), got 999"],
    );
    // Against the default minimum, 500 ms.
    check_err(
        &bridge_toml("reconnect_max_ms = 100"),
        &["bridge[0].reconnect_max_ms: must be at least reconnect_min_ms (500), got 100"],
    );
    // A minimum above the default maximum needs a maximum too.
    check_err(
        &bridge_toml("reconnect_min_ms = 120000"),
        &["bridge[0].reconnect_max_ms: must be at least reconnect_min_ms (120000), got 60000"],
    );
    check_bridge_ok(
        &bridge_toml("reconnect_min_ms = 120000\nreconnect_max_ms = 120000"),
        |b| {
            b.reconnect_min = Duration::from_secs(120);
            b.reconnect_max = Duration::from_secs(120);
        },
    );
    // A minimum out of range is one error, not two.
    check_err(
        &bridge_toml("reconnect_min_ms = 3600001\nreconnect_max_ms = 1000"),
        &["bridge[0].reconnect_min_ms: must be between 10 and 3600000 milliseconds, got 3600001"],
    );
}

#[test]
fn bridge_tls() {
    let dir = TempDir::new("bridge-tls");
    let ca = dir.file("ca.pem");
    let cert = dir.file("edge.pem");
    let key = dir.file("edge.key");
    let tls = |keys: &str| bridge_toml(&format!("[bridge.tls]\n{keys}"));
    let ca_line = format!("ca_file = \"{}\"", ca.display());

    check_bridge_ok(&tls(&ca_line), |b| {
        b.tls = Some(BridgeTls {
            ca_file: ca.clone(),
            cert_file: None,
            key_file: None,
            server_name: None,
        });
    });
    // Relative paths are kept as written and read from the working
    // directory (the crate's directory under `cargo test`), like data_dir.
    check_bridge_ok(
        &tls("ca_file = \"Cargo.toml\"\nserver_name = \"10.0.0.5\""),
        |b| {
            b.tls = Some(BridgeTls {
                ca_file: "Cargo.toml".into(),
                cert_file: None,
                key_file: None,
                server_name: Some("10.0.0.5".into()),
            });
        },
    );

    check_err(
        &tls(""),
        &[
            "bridge[0].tls.ca_file: missing or empty; [bridge.tls] needs ca_file, the CA \
           certificates (PEM) that sign the upstream's certificate",
        ],
    );
    check_err(
        &tls(&format!("{ca_line}\ncert_file = \"{}\"", cert.display())),
        &[
            "bridge[0].tls.key_file: missing; cert_file is set, and mutual TLS needs both \
           cert_file and key_file",
        ],
    );
    check_err(
        &tls(&format!("{ca_line}\nkey_file = \"{}\"", key.display())),
        &[
            "bridge[0].tls.cert_file: missing; key_file is set, and mutual TLS needs both \
           cert_file and key_file",
        ],
    );
    let missing = dir.0.join("missing.pem");
    check_err(
        &tls(&format!(
            "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
            missing.display(),
            cert.display(),
            dir.0.display()
        )),
        &[
            &format!(
                "bridge[0].tls.ca_file: cannot read {}: No such file or directory (os error 2)",
                missing.display()
            ),
            &format!(
                "bridge[0].tls.key_file: {} is not a regular file",
                dir.0.display()
            ),
        ],
    );
    check_err(
        &tls("ca_file = \"no-such-ca.pem\""),
        &[
            "bridge[0].tls.ca_file: cannot read no-such-ca.pem: No such file or directory (os \
           error 2)",
        ],
    );
    check_err(
        &tls(&format!("{ca_line}\ncert_file = \"\"\nkey_file = \"\"")),
        &[
            "bridge[0].tls.cert_file: must not be empty",
            "bridge[0].tls.key_file: must not be empty",
        ],
    );
    check_err(
        &tls(&format!("{ca_line}\nserver_name = \"\"")),
        &[
            "bridge[0].tls.server_name: must not be empty; leave it out to use the host of each \
           address",
        ],
    );
    check_err(
        &tls(&format!("{ca_line}\nserver_name = \"bad name\"")),
        &[
            "bridge[0].tls.server_name: \"bad name\" is not a host name (dot-separated labels of 1 \
           to 63 letters, digits, '-' or '_', not starting or ending with '-'), an IPv4 address \
           or an IPv6 address",
        ],
    );
}

#[test]
fn bridge_forward_rules() {
    let missing = "bridge[0].forward: missing or empty; every [[bridge]] needs at least one \
                   forward rule (or [state] topics), like forward = [ { filter = \"sensors/#\" } ]";
    check_err(
        "[[bridge]]\nname = \"regional\"\naddresses = [\"10.0.0.5:1883\"]",
        &[missing],
    );
    check_err(
        "[[bridge]]\nname = \"regional\"\naddresses = [\"10.0.0.5:1883\"]\nforward = []",
        &[missing],
    );
    check_err(
        &forward_toml("qos = 0"),
        &[
            "bridge[0].forward[0].filter: missing or empty; every forward rule needs a topic \
           filter, like \"sensors/#\"",
        ],
    );

    for filter in [
        "#",
        "+",
        "a/+/b/#",
        "/",
        "a//b",
        "$SYS/#",
        "$share",
        "sensors/t 1",
    ] {
        check_bridge_ok(&forward_toml(&format!("filter = \"{filter}\"")), |b| {
            b.forward[0].filter = filter.into();
        });
    }
    let longest = "a".repeat(65_535);
    check_bridge_ok(&forward_toml(&format!("filter = \"{longest}\"")), |b| {
        b.forward[0].filter = longest.clone();
    });
    let hash = "is not a valid topic filter: '#' must be the whole last level of a filter";
    let plus = "is not a valid topic filter: '+' must occupy a whole level of a filter";
    for (filter, expected) in [
        (
            "",
            "missing or empty; every forward rule needs a topic filter, like \"sensors/#\"".into(),
        ),
        ("a/#/b", format!("\"a/#/b\" {hash}")),
        ("a#", format!("\"a#\" {hash}")),
        ("#/", format!("\"#/\" {hash}")),
        ("a+/b", format!("\"a+/b\" {plus}")),
        ("a/+b", format!("\"a/+b\" {plus}")),
        (
            "$share/group/sensors/#",
            "\"$share/group/sensors/#\" is a shared subscription, which a bridge cannot use; \
             write the filter without \"$share/{group}/\""
                .into(),
        ),
        ("a\\u0000b", "must not contain U+0000".into()),
        (
            &format!("{longest}a"),
            "must be at most 65535 bytes, got 65536".into(),
        ),
    ] {
        check_err(
            &forward_toml(&format!("filter = \"{filter}\"")),
            &[&format!("bridge[0].forward[0].filter: {expected}")],
        );
    }

    for qos in [0, 1, 2] {
        check_bridge_ok(
            &forward_toml(&format!("filter = \"sensors/#\", qos = {qos}")),
            |b| b.forward[0].qos = qos,
        );
    }
    for qos in ["3", "-1", "256"] {
        check_err(
            &forward_toml(&format!("filter = \"sensors/#\", qos = {qos}")),
            &[&format!(
                "bridge[0].forward[0].qos: must be between 0 and 2, got {qos}"
            )],
        );
    }

    let expected = "expected one of \"out\", \"in\", \"both\"";
    for (text, hint) in [
        ("Out", " (did you mean \"out\"?)"),
        ("bot", " (did you mean \"both\"?)"),
        ("outbound", ""),
        ("", ""),
    ] {
        check_err(
            &forward_toml(&format!("filter = \"sensors/#\", direction = \"{text}\"")),
            &[&format!(
                "bridge[0].forward[0].direction: unknown direction \"{text}\"{hint}; {expected}"
            )],
        );
    }
}

#[test]
fn bridge_forward_prefixes() {
    check_bridge_ok(
        &forward_toml(
            "filter = \"+/temp\", local_prefix = \"local/\", remote_prefix = \"site-1/edge/\"",
        ),
        |b| {
            b.forward[0] = Forward {
                filter: "+/temp".into(),
                local_prefix: "local/".into(),
                remote_prefix: "site-1/edge/".into(),
                ..Forward::default()
            };
        },
    );
    // Without a wildcard at the joint, a prefix need not end with '/'.
    check_bridge_ok(
        &forward_toml("filter = \"-temp/#\", remote_prefix = \"site-1\""),
        |b| {
            b.forward[0].filter = "-temp/#".into();
            b.forward[0].remote_prefix = "site-1".into();
        },
    );
    for (name, prefix, filter, expected) in [
        (
            "local_prefix",
            "a/+/",
            "#",
            "\"a/+/\" must not contain the wildcards '+' or '#'".to_owned(),
        ),
        (
            "remote_prefix",
            "#",
            "#",
            "\"#\" must not contain the wildcards '+' or '#'".into(),
        ),
        (
            "local_prefix",
            "a\\u0000/",
            "#",
            "must not contain U+0000".into(),
        ),
        (
            "remote_prefix",
            "site-1",
            "#",
            "\"site-1\" + filter \"#\" = \"site-1#\", which is not a valid topic filter: '#' must \
             be the whole last level of a filter; end the prefix with '/'"
                .into(),
        ),
        (
            "local_prefix",
            "site-1",
            "+/temp",
            "\"site-1\" + filter \"+/temp\" = \"site-1+/temp\", which is not a valid topic \
             filter: '+' must occupy a whole level of a filter; end the prefix with '/'"
                .into(),
        ),
        (
            "remote_prefix",
            "$share/g/",
            "sensors/#",
            "\"$share/g/\" + filter \"sensors/#\" = \"$share/g/sensors/#\", a shared \
             subscription, which a bridge cannot use"
                .into(),
        ),
        (
            "remote_prefix",
            &format!("{}/", "p".repeat(65_533)),
            "ab",
            "with the filter, makes a topic filter of 65536 bytes; the most is 65535".into(),
        ),
    ] {
        check_err(
            &forward_toml(&format!("filter = \"{filter}\", {name} = \"{prefix}\"")),
            &[&format!("bridge[0].forward[0].{name}: {expected}")],
        );
    }
    // A bad filter is reported once, not again at each prefix.
    check_err(
        &forward_toml("filter = \"a#\", local_prefix = \"x\", remote_prefix = \"y/\""),
        &[
            "bridge[0].forward[0].filter: \"a#\" is not a valid topic filter: '#' must be the \
           whole last level of a filter",
        ],
    );
}

#[test]
fn bridge_unknown_keys() {
    check_err(
        r#"
        node_id = "edge-01"
        bridges = 1
        name = "x"

        [[bridge]]
        name = "regional"
        adresses = ["10.0.0.5:1883"]
        keepalive = 30
        clientid = "x"
        ca_file = "ca.pem"
        filter = "x"

        [bridge.tls]
        cafile = "ca.pem"
        sni = "x"

        [[bridge.forward]]
        filter = "a/#"
        directon = "in"
        prefix = "x"
        qos = 1
        "#,
        &[
            "bridges: unknown key; did you mean `bridge`?",
            "name: unknown key; `name` belongs in [[bridge]]",
            "bridge[0].adresses: unknown key; did you mean `addresses`?",
            "bridge[0].keepalive: unknown key",
            "bridge[0].clientid: unknown key; did you mean `client_id`?",
            "bridge[0].ca_file: unknown key; `ca_file` belongs in [bridge.tls]",
            "bridge[0].filter: unknown key; `filter` belongs in [[bridge.forward]]",
            "bridge[0].tls.cafile: unknown key; did you mean `ca_file`?",
            "bridge[0].tls.sni: unknown key",
            "bridge[0].forward[0].directon: unknown key; did you mean `direction`?",
            "bridge[0].forward[0].prefix: unknown key",
            "bridge[0].addresses: missing or empty; every [[bridge]] needs at least one address, \
             like addresses = [\"broker.example.com:1883\"]",
            "bridge[0].tls.ca_file: missing or empty; [bridge.tls] needs ca_file, the CA \
             certificates (PEM) that sign the upstream's certificate",
        ],
    );
    // Inline rules are checked the same way.
    check_err(
        &forward_toml("filter = \"a/#\", quos = 1"),
        &["bridge[0].forward[0].quos: unknown key; did you mean `qos`?"],
    );
}

#[test]
fn bridge_type_errors() {
    check_err(
        "[bridge]\nname = \"regional\"",
        &[
            "bridge: invalid type: map, expected a sequence (write each bridge as [[bridge]], \
           with double brackets)",
        ],
    );
    check_err(
        "[[bridge]]\nname = \"regional\"\n[bridge.forward]\nfilter = \"a\"",
        &[
            "bridge[0].forward: invalid type: map, expected a sequence (write each rule as \
           [[bridge.forward]], with double brackets, or as forward = [ { filter = \"...\" } ])",
        ],
    );
    check_err(
        "[[bridge]]\naddresses = \"10.0.0.5:1883\"",
        &[
            "bridge[0].addresses: invalid type: string \"10.0.0.5:1883\", expected a sequence \
           (write a list, like addresses = [\"broker.example.com:1883\"])",
        ],
    );
    check_err(
        "[[bridge]]\naddresses = [1883]",
        &["bridge[0].addresses[0]: invalid type: integer `1883`, expected a string"],
    );
    check_err(
        "[[bridge]]\ntls = true",
        &["bridge[0].tls: invalid type: boolean `true`, expected a [bridge.tls] table"],
    );
    check_err(
        "[[bridge]]\nforward = [\"a/#\"]",
        &[
            "bridge[0].forward[0]: invalid type: string \"a/#\", expected a [[bridge.forward]] \
           table",
        ],
    );
    check_err(
        "[[bridge]]\nforward = [ { filter = \"a\", qos = \"1\" } ]",
        &["bridge[0].forward[0].qos: invalid type: string \"1\", expected an integer"],
    );
    check_err(
        "[[bridge]]\nkeepalive_secs = 1.5",
        &["bridge[0].keepalive_secs: invalid type: floating point `1.5`, expected an integer"],
    );
}

#[test]
fn every_bridge_problem_reported_at_once() {
    let dir = TempDir::new("every-bridge-problem");
    let missing = dir.0.join("edge.pem");
    let toml = format!(
        r#"
        node_id = "edge-01"

        [[bridge]]
        name = "up 1"
        addresses = ["10.0.0.5", "[::1]:1883", "h:0"]
        kind = "ferrymq"
        protocol = "3.1.1"
        password = "secret"
        keepalive_secs = 0
        reconnect_min_ms = 2000
        reconnect_max_ms = 1000
        max_queued_bytes = "10B"
        inflight = 70000
        nme = "x"

        [bridge.tls]
        cert_file = "{missing}"

        [[bridge.forward]]
        filter = "a/#/b"
        qos = 3
        direction = "sideways"
        remote_prefix = "x/+"

        [[bridge.forward]]
        filtre = "x"

        [[bridge]]
        name = "up-2"
        addresses = []

        [[bridge]]
        name = "up-2"
        addresses = ["h:1"]
        forward = [ {{ filter = "$share/g/#" }} ]
        "#,
        missing = missing.display(),
    );
    check_err(
        &toml,
        &[
            "bridge[0].nme: unknown key; did you mean `name`?",
            "bridge[0].forward[1].filtre: unknown key; did you mean `filter`?",
            // Stage 1: what the types cannot hold.
            "bridge[0].addresses[0]: \"10.0.0.5\" has no port; write \"host:port\", like \
             \"10.0.0.5:1883\" (8883 is usual with TLS)",
            "bridge[0].inflight: must be between 1 and 65535, got 70000",
            "bridge[0].forward[0].direction: unknown direction \"sideways\"; expected one of \
             \"out\", \"in\", \"both\"",
            // Stage 2: the rules.
            "bridge[0].name: \"up 1\" is not a valid bridge name: use 1 to 64 of A-Z a-z 0-9 _ -",
            "bridge[0].addresses[2]: \"h:0\": port must be between 1 and 65535, got 0",
            "bridge[0].password: MQTT 3.1.1 does not allow a password without a username; set \
             username too, or use protocol \"5\"",
            "bridge[0].keepalive_secs: must be between 1 and 65535 seconds, got 0: the bridge \
             needs a keepalive to notice a half-open link to the upstream",
            "bridge[0].kind: \"ferrymq\" needs protocol = \"5\" (batches are negotiated with \
             MQTT 5 user properties)",
            "bridge[0].reconnect_max_ms: must be at least reconnect_min_ms (2000), got 1000",
            "bridge[0].max_queued_bytes: must be between 1024 and 1125899906842624 bytes, got 10",
            "bridge[0].tls.ca_file: missing or empty; [bridge.tls] needs ca_file, the CA \
             certificates (PEM) that sign the upstream's certificate",
            "bridge[0].tls.key_file: missing; cert_file is set, and mutual TLS needs both \
             cert_file and key_file",
            &format!(
                "bridge[0].tls.cert_file: cannot read {}: No such file or directory (os error 2)",
                missing.display()
            ),
            "bridge[0].forward[0].filter: \"a/#/b\" is not a valid topic filter: '#' must be the \
             whole last level of a filter",
            "bridge[0].forward[0].qos: must be between 0 and 2, got 3",
            "bridge[0].forward[0].remote_prefix: \"x/+\" must not contain the wildcards '+' or \
             '#'",
            "bridge[0].forward[1].filter: missing or empty; every forward rule needs a topic \
             filter, like \"sensors/#\"",
            "bridge[1].addresses: missing or empty; every [[bridge]] needs at least one address, \
             like addresses = [\"broker.example.com:1883\"]",
            "bridge[1].forward: missing or empty; every [[bridge]] needs at least one forward \
             rule (or [state] topics), like forward = [ { filter = \"sensors/#\" } ]",
            "bridge[2].name: \"up-2\" is already used by bridge[1]",
            "bridge[2].forward[0].filter: \"$share/g/#\" is a shared subscription, which a \
             bridge cannot use; write the filter without \"$share/{group}/\"",
        ],
    );
}

#[test]
fn validate_bridge_built_in_code() {
    let mut config = Config::default();
    config.bridges.push(regional());
    assert_eq!(config.validate(), Ok(()));

    config.bridges.push(Bridge {
        name: "regional".into(),
        addresses: vec![
            address("", 1883),
            address("::1", 0),
            address("[::1]", 1),
            address("::1", 1),
        ],
        client_id: String::new(),
        keepalive: Duration::from_millis(999),
        connect_timeout: Duration::from_secs(301),
        session_expiry: Duration::from_secs(u64::from(u32::MAX) + 1),
        ramp: Duration::from_secs(3601),
        reconnect_min: Duration::from_micros(9_999),
        reconnect_max: Duration::from_secs(86_401),
        inflight: 0,
        batch_size: 500,
        batch_bytes: 256 << 10,
        drain_rate: 10_000_001,
        max_queued_messages: 0,
        max_queued_bytes: (1 << 50) + 1,
        tls: Some(BridgeTls {
            ca_file: PathBuf::new(),
            cert_file: Some(PathBuf::new()),
            key_file: None,
            server_name: Some(String::new()),
        }),
        forward: vec![Forward {
            qos: 3,
            ..Forward::default()
        }],
        ..Bridge::default()
    });
    let errors = config.validate().expect_err("invalid");
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        lines,
        [
            "bridge[1].name: \"regional\" is already used by bridge[0]",
            "bridge[1].addresses[0]: \":1883\": no host; write \"host:port\", like \
             \"broker.example.com:1883\"",
            "bridge[1].addresses[1]: \"[::1]:0\": port must be between 1 and 65535, got 0",
            "bridge[1].addresses[2]: \"[[::1]]:1\": \"[::1]\" is not an IPv6 address",
            "bridge[1].client_id: must not be empty (a config file that leaves it out gets \
             \"{node_id}-{name}\")",
            "bridge[1].keepalive_secs: must be between 1 and 65535 seconds, got 0: the bridge \
             needs a keepalive to notice a half-open link to the upstream",
            "bridge[1].connect_timeout_secs: must be between 1 and 300 seconds, got 301",
            "bridge[1].session_expiry_secs: must be between 0 and 4294967295 seconds, got \
             4294967296",
            "bridge[1].inflight: must be between 1 and 65535, got 0",
            "bridge[1].drain_rate: must be between 0 and 10000000 messages per second, got \
             10000001",
            "bridge[1].ramp_secs: must be between 0 and 3600 seconds, got 3601",
            "bridge[1].reconnect_min_ms: must be between 10 and 3600000 milliseconds, got 9",
            "bridge[1].reconnect_max_ms: must be between 10 and 86400000 milliseconds, got \
             86401000",
            "bridge[1].max_queued_messages: must be between 1 and 1000000000, got 0",
            "bridge[1].max_queued_bytes: must be between 1024 and 1125899906842624 bytes, got \
             1125899906842625",
            "bridge[1].tls.ca_file: missing or empty; [bridge.tls] needs ca_file, the CA \
             certificates (PEM) that sign the upstream's certificate",
            "bridge[1].tls.key_file: missing; cert_file is set, and mutual TLS needs both \
             cert_file and key_file",
            "bridge[1].tls.cert_file: must not be empty",
            "bridge[1].tls.server_name: must not be empty; leave it out to use the host of each \
             address",
            "bridge[1].forward[0].filter: missing or empty; every forward rule needs a topic \
             filter, like \"sensors/#\"",
            "bridge[1].forward[0].qos: must be between 0 and 2, got 3",
        ]
    );
}

#[test]
fn bridge_forward_rules_within_the_topic_level_limit() {
    let limits = "[limits]\nmax_topic_levels = 3\n";
    check_err(
        &format!(
            "{}{limits}",
            forward_toml("filter = \"a/b/c/#\", remote_prefix = \"x/\"")
        ),
        &[
            "bridge[0].forward[0].filter: the filter has 4 topic levels, more than \
           limits.max_topic_levels (3)",
        ],
    );
    check_err(
        &format!(
            "{}{limits}",
            forward_toml("filter = \"a/#\", remote_prefix = \"site/edge/\"")
        ),
        &[
            "bridge[0].forward[0].remote_prefix: remote_prefix + the filter has 4 topic \
           levels, more than limits.max_topic_levels (3)",
        ],
    );
    // 0 is no limit.
    let deep = vec!["a"; 300].join("/");
    let config = Config::from_toml_str(&format!(
        "{}[limits]\nmax_topic_levels = 0\n",
        forward_toml(&format!("filter = \"{deep}\""))
    ));
    assert!(config.is_ok(), "{config:?}");
}

#[test]
fn tls_listeners() {
    let dir = TempDir::new("tls-listener");
    let (cert, key, ca) = (
        dir.file("server.pem"),
        dir.file("server.key"),
        dir.file("ca.pem"),
    );
    check_ok(
        &format!(
            "[[listener]]\nbind = \"127.0.0.1:8883\"\nprotocol = \"tls\"\ncert = {:?}\nkey = {:?}\n\
             client_ca = {:?}\nmin_tls = \"1.2\"\nuse_identity_as_username = true\n",
            cert.display().to_string(),
            key.display().to_string(),
            ca.display().to_string()
        ),
        |c| {
            c.listeners = vec![Listener {
                protocol: ListenerProtocol::Tls,
                tls: Some(ferrymq_config_tls(&cert, &key, Some(&ca))),
                ..tcp("127.0.0.1:8883")
            }];
        },
    );
    check_ok(
        &format!(
            "[[listener]]\nbind = \"127.0.0.1:8883\"\nprotocol = \"tls\"\ncert = {:?}\nkey = {:?}\n\
             client_ca = {:?}\nmin_tls = \"1.2\"\nuse_identity_as_username = true\n\
             identity_from = \"san\"\n",
            cert.display().to_string(),
            key.display().to_string(),
            ca.display().to_string()
        ),
        |c| {
            let mut tls = ferrymq_config_tls(&cert, &key, Some(&ca));
            tls.identity_from = crate::IdentityFrom::San;
            c.listeners = vec![Listener {
                protocol: ListenerProtocol::Tls,
                tls: Some(tls),
                ..tcp("127.0.0.1:8883")
            }];
        },
    );
    check_err(
        "[[listener]]\nbind = \"127.0.0.1:1883\"\nidentity_from = \"cn\"",
        &[
            "listener[0].identity_from: unknown source \"cn\"; expected \"common-name\" or \"san\"",
            "listener[0].identity_from: only for protocol = \"tls\" and \"wss\" listeners",
        ],
    );
    check_err(
        "[[listener]]\nbind = \"127.0.0.1:8883\"\nprotocol = \"tls\"\nmin_tls = \"1.1\"",
        &[
            "listener[0].min_tls: unknown TLS version \"1.1\"; expected \"1.3\" or \"1.2\"",
            "listener[0].cert: missing; protocol = \"tls\" needs cert and key (PEM files)",
            "listener[0].key: missing; protocol = \"tls\" needs cert and key (PEM files)",
        ],
    );
    check_err(
        "[[listener]]\nbind = \"127.0.0.1:1883\"\ncert = \"x.pem\"",
        &["listener[0].cert: only for protocol = \"tls\" and \"wss\" listeners"],
    );
    check_err(
        &format!(
            "[[listener]]\nbind = \"127.0.0.1:8883\"\nprotocol = \"tls\"\ncert = {:?}\n\
             key = \"/nonexistent/key.pem\"\nuse_identity_as_username = true\n",
            cert.display().to_string()
        ),
        &[
            "listener[0].key: cannot read /nonexistent/key.pem: No such file or directory (os \
             error 2)",
            "listener[0].use_identity_as_username: needs client_ca: the identity is that of a \
             verified client certificate",
        ],
    );
}

fn ferrymq_config_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
    ca: Option<&std::path::Path>,
) -> crate::ListenerTls {
    crate::ListenerTls {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        client_ca: ca.map(std::path::Path::to_path_buf),
        require_client_cert: true,
        min_tls: crate::MinTls::V1_2,
        use_identity_as_username: true,
        identity_from: crate::IdentityFrom::CommonName,
    }
}

#[test]
fn ferry_trusted_clients_and_forget_after() {
    check_ok(
        "[ferry]\ntrusted_clients = [\"edge-*\", \"gw-7\"]\nforget_after_secs = 3600",
        |c| {
            c.ferry.trusted_clients = vec!["edge-*".into(), "gw-7".into()];
            c.ferry.forget_after = Duration::from_secs(3600);
        },
    );
    check_err(
        "[ferry]\ntrusted_clients = [\"\", \"a\\u0001\"]\nforget_after_secs = 59",
        &[
            "ferry.trusted_clients[0]: \"\" is not a client id pattern: it is not empty and has \
             no control characters (`*` matches any run of characters, like \"edge-*\")",
            "ferry.trusted_clients[1]: \"a\\u{1}\" is not a client id pattern: it is not empty \
             and has no control characters (`*` matches any run of characters, like \"edge-*\")",
            "ferry.forget_after_secs: must be between 60 and 4294967295 seconds, got 59",
        ],
    );
    check_err(
        "[ferry]\ntrusted_client = [\"edge-*\"]",
        &["ferry.trusted_client: unknown key; did you mean `trusted_clients`?"],
    );
}

#[test]
fn state_topics_skew_and_tombstones() {
    check_ok(
        "[state]\ntopics = [\"shadow/#\", \"cfg/+/mode\"]\nmax_clock_skew_secs = 5\n\
         tombstone_ttl_secs = 600",
        |c| {
            c.state.topics = vec!["shadow/#".into(), "cfg/+/mode".into()];
            c.state.max_clock_skew = Duration::from_secs(5);
            c.state.tombstone_ttl = Duration::from_secs(600);
        },
    );
    check_err(
        "[state]\ntopics = [\"a/#/b\", \"$share/g/x\"]\nmax_clock_skew_secs = 0\n\
         tombstone_ttl_secs = 59",
        &[
            "state.topics[0]: \"a/#/b\" is not a topic filter: '#' must be the whole last level \
             of a filter",
            "state.topics[1]: \"$share/g/x\" is a shared subscription; state topics are plain \
             filters",
            "state.max_clock_skew_secs: must be between 1 and 31536000 seconds, got 0",
            "state.tombstone_ttl_secs: must be between 60 and 4294967295 seconds, got 59",
        ],
    );
}

#[test]
fn metrics_endpoint_and_sys_interval() {
    check_ok(
        "[metrics]\nenabled = true\nbind = \"0.0.0.0:9100\"\nsys_interval_secs = 30",
        |c| {
            c.metrics.enabled = true;
            c.metrics.bind = std::net::SocketAddr::from(([0, 0, 0, 0], 9100));
            c.metrics.sys_interval = Duration::from_secs(30);
        },
    );
    check_err(
        "[metrics]\nbind = \"localhost\"\nsys_interval_secs = 86401",
        &[
            "metrics.bind: \"localhost\" is not an address like 127.0.0.1:9464",
            "metrics.sys_interval_secs: must be between 0 and 86400 seconds, got 86401",
        ],
    );
}

#[test]
fn log_level_and_format() {
    check_ok(
        "[log]\nlevel = \"warn,ferrymq_bridge::link=debug\"\nformat = \"json\"",
        |c| {
            c.log.level = "warn,ferrymq_bridge::link=debug".into();
            c.log.format = crate::LogFormat::Json;
        },
    );
    check_err(
        "[log]\nlevel = \"loud\"\nformat = \"xml\"",
        &[
            "log.format: unknown format \"xml\"; expected \"text\" or \"json\"",
            "log.level: \"loud\" is not a log level: use error, warn, info, debug or trace, or \
             per module like \"info,ferrymq_bridge=debug\"",
        ],
    );
}

#[test]
fn load_shedding_keys() {
    check_ok(
        "[limits]\nshed_cpu_percent = 80\nshed_memory = \"512MiB\"\nshed_window_secs = 2\n\
         critical_topics = [\"alarms/#\"]",
        |c| {
            c.limits.shed_cpu_percent = 80;
            c.limits.shed_memory = 512 << 20;
            c.limits.shed_window = Duration::from_secs(2);
            c.limits.critical_topics = vec!["alarms/#".into()];
        },
    );
    check_err(
        "[limits]\nshed_cpu_percent = 101\nshed_window_secs = 0\ncritical_topics = [\"a/#/b\"]",
        &[
            "limits.shed_cpu_percent: must be between 0 and 100 percent, got 101",
            "limits.shed_window_secs: must be between 1 and 3600 seconds, got 0",
            "limits.critical_topics[0]: \"a/#/b\" is not a topic filter like \"alarms/#\"",
        ],
    );
}

#[test]
fn forward_max_age() {
    check_ok(
        &forward_toml("filter = \"data/#\", max_age_secs = 3600"),
        |c| {
            c.node_id = "edge-01".into();
            let mut b = regional();
            b.forward = vec![Forward {
                filter: "data/#".into(),
                max_age: Some(Duration::from_secs(3600)),
                ..Forward::default()
            }];
            c.bridges = vec![b];
        },
    );
    check_err(
        &forward_toml("filter = \"cmd/#\", direction = \"in\", max_age_secs = 60"),
        &[
            "bridge[0].forward[0].max_age_secs: only for messages that go up (direction \"out\" \
           or \"both\"); what comes in is published here at once",
        ],
    );
}

#[test]
fn forward_lanes() {
    check_ok(
        &forward_toml("filter = \"alarms/#\", lane = \"live\""),
        |c| {
            c.node_id = "edge-01".into();
            let mut b = regional();
            b.forward = vec![Forward {
                filter: "alarms/#".into(),
                lane: crate::Lane::Live,
                ..Forward::default()
            }];
            c.bridges = vec![b];
        },
    );
    check_err(
        &forward_toml("filter = \"cmd/#\", direction = \"in\", lane = \"live\""),
        &[
            "bridge[0].forward[0].lane: \"live\" is only for direction = \"out\", not \"in\" \
           (what comes in is published here at once)",
        ],
    );
    check_err(
        &forward_toml("filter = \"a\", lane = \"fast\""),
        &[
            "bridge[0].forward[0].lane: unknown lane \"fast\"; expected one of \"backlog\", \
           \"live\"",
        ],
    );
}
