//! ferrymq-bridge: store-and-forward from an edge ferrymq to upstream
//! brokers.
//!
//! - [`Node`]: the broker and its `[[bridge]]`s, started and stopped
//!   together (what the `ferrymq` command and gateway firmware run), with
//!   each bridge's [`BridgeStatus`].
//! - [`link`]: one bridge: its durable outbox is the broker session
//!   `$bridge/{name}`; messages go upstream in order and leave the queue
//!   only when the upstream acknowledged them.
//! - [`Uplink`]: the client towards the upstream, a client-side MQTT 3.1.1
//!   / 5.0 session on our own codec, in which the owner sees and controls
//!   packet ids and in-flight state, and which never replays anything by
//!   itself after a reconnect.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = ferrymq_config::Config::from_file("ferrymq.toml".as_ref())?;
//! let node = ferrymq_bridge::Node::start(config).await?;
//! for status in node.bridges() {
//!     print!("{status}");
//! }
//! node.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! The uplink client on its own:
//!
//! One task owns an [`Uplink`]: requests are synchronous and only queue
//! bytes; [`Uplink::next_event`] does the I/O and is cancel-safe, so it
//! sits in a `tokio::select!` beside the owner's other work.
//!
//! ```no_run
//! use std::time::Duration;
//! use ferrymq_bridge::{Event, Uplink, UplinkOptions};
//! use ferrymq_codec::{MqttString, Publish, QoS};
//!
//! # async fn run(mut outbox: tokio::sync::mpsc::Receiver<Publish>) -> Result<(), Box<dyn std::error::Error>> {
//! let mut options = UplinkOptions::new("regional.example", 1883, "edge-01");
//! options.keepalive = Duration::from_secs(20);
//! let (mut uplink, connected) = Uplink::connect(&options).await?;
//! uplink.set_window_cap(64); // never above connected.receive_maximum
//! loop {
//!     tokio::select! {
//!         // Cancel-safe: next_event keeps all progress in `uplink`.
//!         event = uplink.next_event() => match event? {
//!             Event::Acked { packet_id, reason_code, .. } => {
//!                 // Delete the outbox entry sent under `packet_id`.
//!                 let _ = (packet_id, reason_code);
//!             }
//!             Event::Message(publish) => {
//!                 // Store it durably first, then:
//!                 if publish.qos != QoS::AtMostOnce {
//!                     uplink.ack(publish.packet_id)?;
//!                 }
//!             }
//!             _ => {}
//!         },
//!         // Cancel-safe: `recv` loses no message when another branch wins;
//!         // only taken while the window has room.
//!         Some(mut message) = outbox.recv(), if uplink.can_publish() => {
//!             message.qos = QoS::AtLeastOnce;
//!             message.topic = MqttString::from_static("site-1/sensors/t1");
//!             let packet_id = uplink.publish(message)?;
//!             let _ = packet_id; // remember: outbox entry -> packet_id
//!         }
//!     }
//! }
//! # }
//! ```

#![warn(missing_docs)]

pub mod link;
pub mod node;
mod ops;
pub mod pace;
pub mod status;
pub mod uplink;

pub use ferrymq_broker::DEAD_LETTER_PREFIX;
pub use link::{BridgeHandle, BridgeMonitor, dead_letter_client_id, replay_dead_letters};
pub use node::{
    DELETE_REQUEST_PREFIX, Node, NodeError, REPLAY_REQUEST_PREFIX, STATUS_FILE, read_status,
    request_delete, request_replay, run,
};
pub use status::BridgeStatus;
pub use uplink::{
    Connected, Event, ProtocolError, RequestError, TlsOptions, Uplink, UplinkError, UplinkOptions,
};
