//! Gateway firmware embedding ferrymq: start the broker from a config
//! built in code, talk to it in-process, and stop it gracefully.
//!
//! Run: `cargo run --example embedded` (then, in another shell,
//! `mosquitto_pub -h 127.0.0.1 -p 1884 -t cmd/fan -m on`).

use std::time::Duration;

use ferrymq_broker::{Broker, ClientOptions, QoS};
use ferrymq_config::Config;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The same settings as a TOML file would give; every field has a default.
    let mut config = Config::default();
    config.listeners[0].bind = "127.0.0.1:1884".parse()?;
    config.data_dir = std::env::temp_dir().join("ferrymq-embedded-example");
    config.storage.queue_full = ferrymq_config::QueueFull::Block;
    // Or: let config = Config::from_file(Path::new("ferrymq.toml"))?;

    let broker = Broker::start(config).await?;
    println!("broker listening on {}", broker.local_addrs()[0]);

    // The firmware's own client: a persistent session, so commands sent
    // while it restarts wait for it.
    let mut firmware = broker
        .connect(ClientOptions::new("firmware").persistent(Duration::from_secs(3600)))
        .await?;
    firmware.subscribe("cmd/#", QoS::AtLeastOnce).await?;
    // Returns once the broker acknowledged it.
    firmware
        .publish("state/firmware", "up", QoS::AtLeastOnce, true)
        .await?;

    println!("waiting 10 s for commands on cmd/# (e.g. mosquitto_pub -p 1884 -t cmd/fan -m on)");
    let deadline = tokio::time::sleep(Duration::from_secs(10));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            message = firmware.recv() => match message {
                Some(m) => println!("command {} = {:?}", m.topic, m.payload),
                None => break,
            },
            _ = &mut deadline => break,
        }
    }

    firmware.disconnect().await;
    broker.shutdown().await;
    Ok(())
}
