//! Runs rumqttd 0.20 on 127.0.0.1:PORT (MQTT 3.1.1) with the settings of
//! its shipped `rumqttd.toml`, until killed. Started by the load harness
//! (`benches/compare.rs`) as the rumqttd peer.
//!
//! Usage: ferrymq-rumqttd-runner PORT

use std::collections::HashMap;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

fn main() {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| {
            eprintln!("usage: ferrymq-rumqttd-runner PORT");
            std::process::exit(2)
        });
    let mut v4 = HashMap::new();
    v4.insert(
        "1".to_string(),
        ServerSettings {
            name: "v4-1".into(),
            listen: ([127, 0, 0, 1], port).into(),
            tls: None,
            // The shipped config waits 1 ms between accepts; the harness
            // opens thousands of connections, so none.
            next_connection_delay_ms: 0,
            connections: ConnectionSettings {
                connection_timeout_ms: 60_000,
                max_payload_size: 20_480,
                max_inflight_count: 100,
                auth: None,
                external_auth: None,
                dynamic_filters: true,
            },
        },
    );
    let config = Config {
        router: RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 200,
            max_segment_size: 104_857_600,
            max_segment_count: 10,
            ..RouterConfig::default()
        },
        v4: Some(v4),
        ..Config::default()
    };
    if let Err(e) = Broker::new(config).start() {
        eprintln!("rumqttd: {e}");
        std::process::exit(1);
    }
}
