//! Gateway firmware with store-and-forward: the broker and a bridge to a
//! regional broker, started in-process from a config built in code;
//! sensor readings published in-process go upstream (and wait on disk
//! while the uplink is down); commands from upstream arrive in-process;
//! the bridge's status is read every second.
//!
//! Run: `cargo run --example gateway -- [UPSTREAM_HOST:PORT]` (default
//! 127.0.0.1:1883, e.g. a local Mosquitto). Watch the readings upstream
//! with `mosquitto_sub -h HOST -p PORT -t 'site-1/#' -v`, and send a
//! command with `mosquitto_pub -h HOST -p PORT -t site-1/cmd/fan -m on`.
//! Without an upstream, the readings queue and the status says so.

use std::time::Duration;

use ferrymq_bridge::Node;
use ferrymq_broker::{ClientOptions, QoS};
use ferrymq_config::{Bridge, BridgeAddress, Config, Direction, Forward};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let upstream = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:1883".into());
    let (host, port) = upstream
        .rsplit_once(':')
        .ok_or("the upstream is HOST:PORT")?;

    // What a TOML file would say; every field not set keeps its default.
    let mut config = Config::default();
    config.listeners[0].bind = "127.0.0.1:1885".parse()?;
    config.data_dir = std::env::temp_dir().join("ferrymq-gateway-example");
    config.bridges.push(Bridge {
        name: "regional".into(),
        addresses: vec![BridgeAddress {
            host: host.into(),
            port: port.parse()?,
        }],
        client_id: "gateway-example".into(),
        forward: vec![
            // Readings go up as site-1/sensors/...
            Forward {
                filter: "sensors/#".into(),
                direction: Direction::Out,
                qos: 1,
                remote_prefix: "site-1/".into(),
                ..Forward::default()
            },
            // Commands for this site come down as cmd/...
            Forward {
                filter: "cmd/#".into(),
                direction: Direction::In,
                qos: 1,
                remote_prefix: "site-1/".into(),
                ..Forward::default()
            },
        ],
        ..Bridge::default()
    });
    config.validate()?;
    // Or: let config = Config::from_file(Path::new("ferrymq.toml"))?;

    let node = Node::start(config).await?;
    println!(
        "gateway broker on {}, bridged to {upstream}",
        node.broker().local_addrs()[0]
    );

    // The firmware's sensor loop and its command handler, in-process.
    let sensors = node.broker().connect(ClientOptions::new("sensors")).await?;
    let mut commands = node
        .broker()
        .connect(ClientOptions::new("firmware").persistent(Duration::from_secs(3600)))
        .await?;
    commands.subscribe("cmd/#", QoS::AtLeastOnce).await?;

    let mut tick = tokio::time::interval(Duration::from_secs(1));
    for reading in 0..10 {
        tokio::select! {
            _ = tick.tick() => {
                // Returns once it is on disk here, link up or down.
                sensors
                    .publish("sensors/boiler/temp", format!("{}", 60 + reading), QoS::AtLeastOnce, false)
                    .await?;
                for status in node.bridges() {
                    print!("{status}");
                }
            }
            command = commands.recv() => {
                if let Some(command) = command {
                    println!("command {}: {:?}", command.topic, command.payload);
                }
            }
        }
    }
    commands.disconnect().await;
    sensors.disconnect().await;
    // What did not go upstream yet stays queued for the next start.
    node.shutdown().await;
    Ok(())
}
