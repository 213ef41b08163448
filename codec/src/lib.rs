//! ferrymq-codec: every MQTT 3.1.1 and 5.0 control packet, encoded and
//! decoded on [`bytes`], with the spec's validation rules.
//!
//! The codec is pure: no I/O, no async runtime, no allocation of payloads
//! (a decoded PUBLISH's payload and strings share the receive buffer).
//! [`decode`] returns `Ok(None)` while a packet is incomplete, so a caller
//! can feed it whatever the socket produced.
//!
//! ```
//! use bytes::BytesMut;
//! use ferrymq_codec::{decode, MqttString, Packet, Protocol, Publish, QoS};
//!
//! let publish = Publish {
//!     qos: QoS::AtLeastOnce,
//!     packet_id: 7,
//!     topic: MqttString::from_static("sensors/t1"),
//!     payload: "21.5".into(),
//!     ..Publish::default()
//! };
//! let mut buf = BytesMut::new();
//! Packet::Publish(publish.clone()).encode(Protocol::V5, &mut buf).unwrap();
//!
//! // Half a packet is not an error, just not a packet yet.
//! let mut partial = buf.split_to(5);
//! assert_eq!(decode(&mut partial, Protocol::V5, 1 << 20), Ok(None));
//! partial.unsplit(buf);
//! assert_eq!(decode(&mut partial, Protocol::V5, 1 << 20), Ok(Some(Packet::Publish(publish))));
//! ```
//!
//! Every rule a peer can break is its own [`DecodeError`] variant, and
//! [`DecodeError::reason_code`] gives the MQTT 5.0 reason code to close the
//! connection with.

#![warn(missing_docs)]

mod error;
mod packet;
mod properties;
mod reason;
mod string;
pub mod topic;
mod wire;

pub use error::{DecodeError, EncodeError, StringError, TopicError};
pub use packet::{
    Auth, ConnAck, Connect, Disconnect, Packet, PacketType, Protocol, PubAck, PubComp, PubRec,
    PubRel, Publish, PublishRef, QoS, RetainHandling, SubAck, Subscribe, Subscription,
    SubscriptionOptions, UnsubAck, Unsubscribe, Will, decode,
};
pub use properties::{
    AckProperties, AuthProperties, ConnAckProperties, ConnectProperties, DisconnectProperties,
    PayloadFormat, PropertyId, PublishProperties, SubscribeProperties, UnsubscribeProperties,
    UserProperty, WillProperties,
};
pub use reason::{ReasonCode, ReasonContext};
pub use string::{MAX_STRING_LEN, MqttString};
pub use wire::MAX_VARINT;
