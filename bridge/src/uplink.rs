//! The uplink MQTT client: one connection to an upstream broker, driven
//! by our codec, with packet ids and in-flight state visible to its owner.
//!
//! [`Uplink::connect`] opens the connection (TCP, optional TLS, CONNECT /
//! CONNACK, all within `connect_timeout`). Then a single task owns the
//! [`Uplink`]: it queues requests with the synchronous methods
//! ([`Uplink::publish`], [`Uplink::ack`], [`Uplink::subscribe`], ...),
//! which encode into a bounded output buffer and never wait, and it calls
//! [`Uplink::next_event`], which writes that output, reads, runs the
//! keepalive and returns the next [`Event`]. `next_event` is cancel-safe,
//! so it can be one branch of a `tokio::select!`.
//!
//! The uplink never resends anything by itself. When a connection ends,
//! every exchange that was open on it is the owner's to redo on the next
//! one: publish again (a new packet id), or, when the upstream kept the
//! session (`session_present`), [`Uplink::republish`] with the old id and
//! [`Uplink::release`] QoS 2 exchanges that had their PUBREC.

mod session;
mod transport;

use std::future::{Future, poll_fn};
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferrymq_codec::{
    ConnAck, Connect, ConnectProperties, DecodeError, EncodeError, MqttString, Packet, PacketType,
    Protocol, Publish, QoS, ReasonCode, SubscribeProperties, Subscription, UnsubscribeProperties,
    decode,
};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use session::{Limits, Session};
use transport::Transport;

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 16 * 1024;

/// Loop turns of one poll before yielding to the runtime (a peer that
/// keeps the socket readable must not starve other tasks).
const MAX_TURNS: usize = 64;

/// How to reach and log in to the upstream broker.
#[derive(Clone)]
pub struct UplinkOptions {
    /// Host name or IP address of the upstream.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// MQTT version to speak.
    pub protocol: Protocol,
    /// Client identifier (empty: the upstream assigns one, MQTT 5.0 only).
    pub client_id: String,
    /// User Name.
    pub username: Option<String>,
    /// Password.
    pub password: Option<String>,
    /// Keep Alive sent in CONNECT (whole seconds, at most 65,535; zero
    /// switches it off, and with it the detection of dead links). A
    /// Server Keep Alive from the upstream replaces it.
    pub keepalive: Duration,
    /// Limit for the whole connect: DNS, TCP, TLS and CONNECT/CONNACK.
    /// Also bounds [`Uplink::disconnect`].
    pub connect_timeout: Duration,
    /// Clean Start (5.0) / Clean Session (3.1.1).
    pub clean_start: bool,
    /// Session Expiry Interval (5.0) in seconds; 3.1.1 sessions with
    /// `clean_start = false` last as long as the upstream keeps them.
    pub session_expiry_secs: u32,
    /// Our Receive Maximum: inbound QoS 1/2 messages the upstream may have
    /// unacknowledged at once (5.0). Exceeding it is a protocol error, in
    /// 3.1.1 too, so there it must be at least the upstream's own
    /// in-flight limit (Mosquitto: `max_inflight_messages`, default 20).
    pub receive_maximum: u16,
    /// Our Maximum Packet Size: larger inbound packets end the connection.
    pub max_packet_size: u32,
    /// Soft limit in bytes of the output buffer: publishes and subscribes
    /// are refused while it holds this much (see [`Uplink::can_publish`]).
    pub output_buffer_limit: usize,
    /// TLS, if the upstream wants it.
    pub tls: Option<TlsOptions>,
    /// MQTT 5 user properties of the CONNECT (a ferrymq upstream reads
    /// the ferry capability there). Default: none.
    pub user_properties: Vec<(String, String)>,
}

impl std::fmt::Debug for UplinkOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UplinkOptions")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("protocol", &self.protocol)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("keepalive", &self.keepalive)
            .field("connect_timeout", &self.connect_timeout)
            .field("clean_start", &self.clean_start)
            .field("session_expiry_secs", &self.session_expiry_secs)
            .field("receive_maximum", &self.receive_maximum)
            .field("max_packet_size", &self.max_packet_size)
            .field("output_buffer_limit", &self.output_buffer_limit)
            .field("tls", &self.tls)
            .field("user_properties", &self.user_properties)
            .finish()
    }
}

impl UplinkOptions {
    /// MQTT 5.0 over plain TCP, clean session, keepalive 30 s, connect
    /// timeout 10 s, Receive Maximum 256, Maximum Packet Size 1 MiB,
    /// output buffer 256 KiB.
    pub fn new(host: impl Into<String>, port: u16, client_id: impl Into<String>) -> Self {
        UplinkOptions {
            host: host.into(),
            port,
            protocol: Protocol::V5,
            client_id: client_id.into(),
            username: None,
            password: None,
            keepalive: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            clean_start: true,
            session_expiry_secs: 0,
            receive_maximum: 256,
            max_packet_size: 1024 * 1024,
            output_buffer_limit: 256 * 1024,
            tls: None,
            user_properties: Vec::new(),
        }
    }

    fn keepalive_secs(&self) -> Result<u16, UplinkError> {
        let secs = self.keepalive.as_secs() + u64::from(self.keepalive.subsec_nanos() > 0);
        u16::try_from(secs).map_err(|_| {
            UplinkError::InvalidOptions(format!(
                "keepalive {:?} is above the protocol's 65535 s",
                self.keepalive
            ))
        })
    }

    /// The CONNECT packet these options describe.
    fn connect_packet(&self) -> Result<Connect, UplinkError> {
        let invalid = |what: &str, e: &dyn std::fmt::Display| {
            UplinkError::InvalidOptions(format!("{what}: {e}"))
        };
        if self.host.is_empty() {
            return Err(UplinkError::InvalidOptions("host is empty".into()));
        }
        if self.receive_maximum == 0 {
            return Err(UplinkError::InvalidOptions(
                "receive_maximum must be at least 1".into(),
            ));
        }
        if self.max_packet_size == 0 {
            return Err(UplinkError::InvalidOptions(
                "max_packet_size must be at least 1".into(),
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(UplinkError::InvalidOptions(
                "connect_timeout must not be zero".into(),
            ));
        }
        if self.protocol == Protocol::V311 && self.client_id.is_empty() && !self.clean_start {
            return Err(UplinkError::InvalidOptions(
                "MQTT 3.1.1 needs a client_id for a persistent session (clean_start = false)"
                    .into(),
            ));
        }
        let client_id = MqttString::new(&self.client_id).map_err(|e| invalid("client_id", &e))?;
        let username = self
            .username
            .as_deref()
            .map(MqttString::new)
            .transpose()
            .map_err(|e| invalid("username", &e))?;
        let properties = match self.protocol {
            Protocol::V311 => ConnectProperties::default(),
            Protocol::V5 => ConnectProperties {
                session_expiry_interval: Some(self.session_expiry_secs).filter(|&secs| secs > 0),
                receive_maximum: Some(self.receive_maximum).filter(|&r| r < u16::MAX),
                maximum_packet_size: Some(self.max_packet_size),
                user_properties: self
                    .user_properties
                    .iter()
                    .filter_map(|(k, v)| Some((MqttString::new(k).ok()?, MqttString::new(v).ok()?)))
                    .collect(),
                // Topic Alias Maximum is left out: 0, the upstream may not
                // use topic aliases towards us.
                ..ConnectProperties::default()
            },
        };
        let connect = Connect {
            protocol: self.protocol,
            clean_start: self.clean_start,
            keep_alive: self.keepalive_secs()?,
            client_id,
            will: None,
            username,
            password: self.password.clone().map(Bytes::from),
            properties,
        };
        // Everything that can be wrong with it is found here, once.
        Packet::Connect(Box::new(connect.clone()))
            .encoded_len(self.protocol)
            .map_err(|e| invalid("CONNECT", &e))?;
        Ok(connect)
    }
}

/// TLS towards the upstream (rustls; PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsOptions {
    /// The CA certificates (PEM) that are the only trust roots.
    pub ca_file: PathBuf,
    /// Our certificate chain (PEM), for mutual TLS; with `key_file`.
    pub cert_file: Option<PathBuf>,
    /// Our private key (PEM: PKCS#8, PKCS#1 or SEC1), for mutual TLS.
    pub key_file: Option<PathBuf>,
    /// The name the server certificate must carry and the SNI sent
    /// (default: `host`; an IP address is checked against IP SANs).
    pub server_name: Option<String>,
}

/// What the upstream said in its CONNACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connected {
    /// The upstream resumed an existing session.
    pub session_present: bool,
    /// Success (the refusals are [`UplinkError::Refused`]).
    pub reason_code: ReasonCode,
    /// Upstream's Receive Maximum: our in-flight window never exceeds it
    /// (65,535 when absent and for 3.1.1).
    pub receive_maximum: u16,
    /// Upstream's Maximum Packet Size; larger publishes are refused with
    /// [`RequestError::PacketTooLarge`].
    pub maximum_packet_size: Option<u32>,
    /// Server Keep Alive: the keepalive in force instead of ours.
    pub server_keep_alive: Option<u16>,
    /// Session Expiry Interval the upstream set instead of ours.
    pub session_expiry_interval: Option<u32>,
    /// Assigned Client Identifier (when we sent an empty one).
    pub assigned_client_identifier: Option<String>,
    /// Server Reference.
    pub server_reference: Option<String>,
    /// Reason String.
    pub reason_string: Option<String>,
    /// Topic Alias Maximum (we never use topic aliases).
    pub topic_alias_maximum: u16,
    /// Retain Available.
    pub retain_available: bool,
    /// Maximum QoS: publishes above it are refused with
    /// [`RequestError::QosNotSupported`].
    pub maximum_qos: QoS,
    /// Wildcard Subscription Available.
    pub wildcard_subscription_available: bool,
    /// Subscription Identifiers Available.
    pub subscription_identifiers_available: bool,
    /// Shared Subscription Available.
    pub shared_subscription_available: bool,
    /// User properties of the CONNACK (a ferrymq upstream grants the
    /// ferry capability there).
    pub user_properties: Vec<(String, String)>,
}

/// Something the upstream did that the owner must hear of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An outbound QoS 1/2 exchange ended, and its packet id is free: PUBACK
    /// (QoS 1), PUBREC with a failure code (QoS 2, not delivered) or
    /// PUBCOMP (QoS 2, after [`Event::Received`]). `reason_code` is that
    /// packet's.
    Acked {
        /// The PUBLISH's packet id.
        packet_id: u16,
        /// The reason code (always Success in 3.1.1).
        reason_code: ReasonCode,
        /// Reason String (5.0).
        reason_string: Option<String>,
    },
    /// A QoS 2 PUBLISH got PUBREC with a success code: the upstream has
    /// the message. PUBREL is sent; [`Event::Acked`] follows at PUBCOMP.
    /// (The second persisted phase of an outbound QoS 2 exchange.)
    Received {
        /// The PUBLISH's packet id.
        packet_id: u16,
        /// Success or No matching subscribers.
        reason_code: ReasonCode,
        /// Reason String (5.0).
        reason_string: Option<String>,
    },
    /// An inbound message. QoS 1/2: the upstream waits for
    /// [`Uplink::ack`] with its packet id; a resend of one not yet acked
    /// is not reported twice on this connection.
    Message(Publish),
    /// The answer to [`Uplink::subscribe`].
    SubAck {
        /// The SUBSCRIBE's packet id.
        packet_id: u16,
        /// Granted QoS or a failure, one per subscription.
        reason_codes: Vec<ReasonCode>,
        /// Reason String (5.0).
        reason_string: Option<String>,
    },
    /// The answer to [`Uplink::unsubscribe`].
    UnsubAck {
        /// The UNSUBSCRIBE's packet id.
        packet_id: u16,
        /// One per filter (5.0; empty in 3.1.1).
        reason_codes: Vec<ReasonCode>,
    },
}

/// How the upstream broke the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Bytes that are not a valid packet, or a packet above our Maximum
    /// Packet Size.
    #[error("{0}")]
    Decode(#[from] DecodeError),
    /// A packet a server never sends to a client (or not at this point).
    #[error("unexpected {0} from the server")]
    UnexpectedPacket(PacketType),
    /// A Topic Alias, although we allow none.
    #[error("topic alias {0} used, but we allow none")]
    TopicAlias(u16),
    /// More unacknowledged QoS 1/2 messages than our Receive Maximum.
    #[error("more than {0} unacknowledged QoS 1/2 messages (our Receive Maximum)")]
    ReceiveMaximumExceeded(u16),
    /// PUBREL for a message we have not acknowledged with PUBREC.
    #[error("PUBREL for packet id {0} before our PUBREC")]
    EarlyPubRel(u16),
}

impl ProtocolError {
    /// The MQTT 5.0 reason code our DISCONNECT carries.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            ProtocolError::Decode(e) => e.reason_code(),
            ProtocolError::UnexpectedPacket(_) | ProtocolError::EarlyPubRel(_) => {
                ReasonCode::PROTOCOL_ERROR
            }
            ProtocolError::TopicAlias(_) => ReasonCode::TOPIC_ALIAS_INVALID,
            ProtocolError::ReceiveMaximumExceeded(_) => ReasonCode::RECEIVE_MAXIMUM_EXCEEDED,
        }
    }
}

/// Why a connection could not be made, or ended. After any of these from
/// [`Uplink::next_event`] or [`Uplink::flush`] the uplink is finished:
/// drop it and connect again.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// The options cannot make a valid CONNECT.
    #[error("invalid uplink options: {0}")]
    InvalidOptions(String),
    /// DNS, TCP, TLS and CONNACK did not complete within `connect_timeout`.
    #[error("connecting to {host}:{port} took longer than {timeout:?}")]
    ConnectTimeout {
        /// Host.
        host: String,
        /// Port.
        port: u16,
        /// The limit.
        timeout: Duration,
    },
    /// The host name did not resolve.
    #[error("cannot resolve {host}: {source}")]
    Dns {
        /// Host.
        host: String,
        /// The resolver's error.
        #[source]
        source: io::Error,
    },
    /// No resolved address accepted a TCP connection.
    #[error("TCP connection to {addr} failed: {source}")]
    Tcp {
        /// The last address tried.
        addr: String,
        /// Its error.
        #[source]
        source: io::Error,
    },
    /// The TLS files or settings are unusable.
    #[error("TLS setup: {0}")]
    TlsConfig(String),
    /// The TLS handshake or the TLS layer failed (certificate not trusted,
    /// name mismatch, an alert from the server...).
    #[error("TLS with {server_name} failed: {source}")]
    Tls {
        /// The name the certificate was checked against.
        server_name: String,
        /// The cause (a rustls error inside).
        #[source]
        source: io::Error,
    },
    /// The upstream refused the connection in CONNACK.
    #[error(
        "connection refused by the upstream: {reason}{}",
        server_ref(server_reference)
    )]
    Refused {
        /// The CONNACK reason code (3.1.1 return codes are mapped).
        reason: ReasonCode,
        /// Reason String (5.0).
        reason_string: Option<String>,
        /// Server Reference (5.0): another server to use.
        server_reference: Option<String>,
    },
    /// The upstream broke the protocol (we sent it a DISCONNECT with the
    /// matching reason code, in 5.0).
    #[error("protocol error by the upstream: {0}")]
    Protocol(ProtocolError),
    /// The upstream closed the connection.
    #[error("connection closed by the upstream")]
    Closed,
    /// The upstream sent DISCONNECT (5.0).
    #[error("the upstream disconnected: {reason}{}", server_ref(server_reference))]
    Disconnected {
        /// Its reason code.
        reason: ReasonCode,
        /// Reason String.
        reason_string: Option<String>,
        /// Server Reference: another server to use.
        server_reference: Option<String>,
    },
    /// Nothing arrived within `waited` after a PINGREQ: the link is dead
    /// (or blackholed) even if the socket is open.
    #[error("keepalive timeout: nothing received for {waited:?} after PINGREQ")]
    KeepaliveTimeout {
        /// How long we waited after the PINGREQ.
        waited: Duration,
    },
    /// A socket error.
    #[error("I/O error: {0}")]
    Io(#[source] io::Error),
    /// The uplink already ended with an earlier error (or a disconnect).
    #[error("the uplink connection has already ended")]
    Finished,
}

impl From<ferrymq_codec::Disconnect> for UplinkError {
    /// The upstream's DISCONNECT, with its reason and references.
    fn from(d: ferrymq_codec::Disconnect) -> UplinkError {
        UplinkError::Disconnected {
            reason: d.reason_code,
            reason_string: d.properties.reason_string.map(|s| s.to_string()),
            server_reference: d.properties.server_reference.map(|s| s.to_string()),
        }
    }
}

fn server_ref(reference: &Option<String>) -> String {
    match reference {
        Some(r) => format!(" (server reference: {r})"),
        None => String::new(),
    }
}

/// Why a request ([`Uplink::publish`], [`Uplink::ack`], ...) was refused.
/// Nothing was queued and the connection goes on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// As many QoS 1/2 publishes in flight as the window allows.
    #[error("in-flight window of {window} is full")]
    WindowFull {
        /// The window.
        window: usize,
    },
    /// The output buffer holds its limit; wait for [`Uplink::next_event`]
    /// (or [`Uplink::flush`]) to write it.
    #[error("output buffer holds its limit of {limit} bytes")]
    OutputFull {
        /// The limit.
        limit: usize,
    },
    /// The encoded PUBLISH exceeds the upstream's Maximum Packet Size: it
    /// can never be sent on this connection.
    #[error("PUBLISH of {size} bytes exceeds the upstream's maximum packet size of {max}")]
    PacketTooLarge {
        /// Encoded size.
        size: usize,
        /// The upstream's limit.
        max: u32,
    },
    /// QoS above the upstream's Maximum QoS.
    #[error("QoS {requested:?} is above the upstream's maximum {maximum:?}")]
    QosNotSupported {
        /// The QoS asked for.
        requested: QoS,
        /// The upstream's Maximum QoS.
        maximum: QoS,
    },
    /// RETAIN set, but the upstream has no retained messages.
    #[error("the upstream does not support retained messages")]
    RetainNotSupported,
    /// The packet is not valid MQTT (e.g. a wildcard in a topic name).
    #[error("invalid packet: {0}")]
    Invalid(EncodeError),
    /// All 65,535 packet ids are in use.
    #[error("no free packet id")]
    NoPacketId,
    /// [`Uplink::republish`] / [`Uplink::release`] with an id in use (or 0).
    #[error("packet id {0} is in use")]
    PacketIdInUse(u16),
    /// [`Uplink::republish`] of a QoS 0 message.
    #[error("only QoS 1/2 messages are republished")]
    Qos0Republish,
    /// [`Uplink::ack`] of an id with no inbound message waiting for it.
    #[error("no inbound message with packet id {0} waits for an acknowledgement")]
    UnknownPacketId(u16),
    /// The uplink has ended.
    #[error("the uplink connection has ended")]
    Finished,
}

/// One connection to an upstream broker. See the module documentation.
pub struct Uplink {
    /// The socket (TCP or TLS).
    stream: Transport,
    /// Protocol state without I/O: ids, in-flight exchanges, keepalive
    /// clock, and the output buffer (bounded by `output_buffer_limit`).
    session: Session,
    /// Received bytes not yet decoded: at most one partial packet (the
    /// decoder refuses one above our Maximum Packet Size as soon as its
    /// header is in) plus one read.
    read_buf: BytesMut,
    /// Our Maximum Packet Size, for the decoder.
    max_packet_size: u32,
    /// Armed at the session's next keepalive deadline.
    timer: Pin<Box<Sleep>>,
    /// Bytes went into the stream since the last completed flush (TLS
    /// may hold records until flushed).
    unflushed: bool,
    /// The connection ended; every later call fails fast.
    finished: bool,
    /// Bounds [`Uplink::disconnect`].
    close_timeout: Duration,
    /// For messages.
    server_name: String,
}

impl std::fmt::Debug for Uplink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uplink")
            .field("server", &self.server_name)
            .field("session", &self.session)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl Uplink {
    /// Connects and logs in: resolves `host`, opens TCP (no Nagle delay),
    /// runs the TLS handshake when `tls` is set, sends CONNECT and reads
    /// CONNACK, all within `connect_timeout`. The PEM files are read at
    /// each call, so renewed certificates are picked up at the next
    /// connect.
    pub async fn connect(options: &UplinkOptions) -> Result<(Uplink, Connected), UplinkError> {
        let connect = options.connect_packet()?;
        let tls = options
            .tls
            .as_ref()
            .map(|tls| transport::setup(tls, &options.host))
            .transpose()?;
        match tokio::time::timeout(options.connect_timeout, establish(options, tls, connect)).await
        {
            Ok(result) => result,
            Err(_) => Err(UplinkError::ConnectTimeout {
                host: options.host.clone(),
                port: options.port,
                timeout: options.connect_timeout,
            }),
        }
    }

    /// The in-flight limit for QoS 1/2 publishes: the upstream's Receive
    /// Maximum, or the owner's cap when lower.
    pub fn window(&self) -> usize {
        self.session.window()
    }

    /// Caps the window below the upstream's Receive Maximum (for example
    /// the bridge's configured in-flight window). Publishes already in
    /// flight stay; new ones wait until fewer than the cap are.
    pub fn set_window_cap(&mut self, cap: usize) {
        self.session.set_window_cap(cap);
    }

    /// Outbound QoS 1/2 publishes (and releases) waiting for their ack.
    pub fn in_flight(&self) -> usize {
        self.session.in_flight()
    }

    /// True when [`Uplink::publish`] of a QoS 1/2 message would not be
    /// refused for the window or the output buffer.
    pub fn can_publish(&self) -> bool {
        !self.finished && self.session.can_publish()
    }

    /// Nothing in flight either way and no output waiting.
    pub fn is_idle(&self) -> bool {
        self.session.is_idle()
    }

    /// Encoded bytes not yet written to the socket.
    pub fn pending_output(&self) -> usize {
        self.session.output().len()
    }

    /// The keepalive interval in force (ours, or the Server Keep Alive).
    pub fn keepalive(&self) -> Option<Duration> {
        self.session.keepalive_interval()
    }

    /// The protocol version of the connection.
    pub fn protocol(&self) -> Protocol {
        self.session.protocol()
    }

    /// Queues a PUBLISH without waiting. QoS 1/2 get a fresh packet id,
    /// returned (and carried by the [`Event::Acked`] that ends it); QoS 0
    /// returns 0. The message's properties pass through (5.0) except a
    /// Topic Alias and Subscription Identifiers, which a client never
    /// sends. Refused when the window or the output buffer is full, or
    /// when the upstream cannot take the message (size, QoS, retain).
    pub fn publish(&mut self, publish: Publish) -> Result<u16, RequestError> {
        self.check_open()?;
        self.session.publish(publish)
    }

    /// Sends again, with DUP set, a QoS 1/2 PUBLISH that was in flight
    /// under `packet_id` on the previous connection. Use it only when the
    /// upstream resumed the session (`session_present`): it still knows
    /// the id, and a QoS 2 message under a new id would be a second copy
    /// (and the old id would stay held there).
    pub fn republish(&mut self, packet_id: u16, publish: Publish) -> Result<(), RequestError> {
        self.check_open()?;
        self.session.republish(packet_id, publish)
    }

    /// Sends PUBREL for a QoS 2 exchange that received its PUBREC on the
    /// previous connection (resumed session only); [`Event::Acked`]
    /// follows at PUBCOMP. It counts against the window.
    pub fn release(&mut self, packet_id: u16) -> Result<(), RequestError> {
        self.check_open()?;
        self.session.release(packet_id)
    }

    /// Acknowledges an inbound QoS 1/2 message ([`Event::Message`]): PUBACK,
    /// or PUBREC (PUBREL is then answered with PUBCOMP internally). Call it
    /// once the message is durable on our side.
    pub fn ack(&mut self, packet_id: u16) -> Result<(), RequestError> {
        self.ack_with_reason(packet_id, ReasonCode::SUCCESS)
    }

    /// [`Uplink::ack`] with a reason code (5.0): a failure (e.g. 0x97 Quota
    /// exceeded) refuses the message, and the upstream will not resend it.
    /// 3.1.1 acknowledgements carry no code: there it is a plain `ack`.
    pub fn ack_with_reason(
        &mut self,
        packet_id: u16,
        reason_code: ReasonCode,
    ) -> Result<(), RequestError> {
        self.check_open()?;
        self.session.ack(packet_id, reason_code)
    }

    /// Queues SUBSCRIBE; returns its packet id ([`Event::SubAck`] answers).
    /// Subscription options (No Local, Retain As Published, Retain
    /// Handling) and properties are sent as given (5.0).
    pub fn subscribe(
        &mut self,
        subscriptions: Vec<Subscription>,
        properties: SubscribeProperties,
    ) -> Result<u16, RequestError> {
        self.check_open()?;
        self.session.subscribe(subscriptions, properties)
    }

    /// Queues UNSUBSCRIBE; returns its packet id ([`Event::UnsubAck`] answers).
    pub fn unsubscribe(
        &mut self,
        filters: Vec<MqttString>,
        properties: UnsubscribeProperties,
    ) -> Result<u16, RequestError> {
        self.check_open()?;
        self.session.unsubscribe(filters, properties)
    }

    fn check_open(&self) -> Result<(), RequestError> {
        if self.finished {
            Err(RequestError::Finished)
        } else {
            Ok(())
        }
    }

    /// Writes queued output, reads and handles input, runs the keepalive,
    /// until something happens that the owner must hear of.
    ///
    /// Cancel-safe: all progress (bytes written, bytes read, packets
    /// handled, PINGREQ queued) is recorded in `self` before a poll
    /// returns, and the future holds nothing else; dropping it (another
    /// `select!` branch won) loses nothing and the next call goes on.
    ///
    /// An `Err` ends the connection (a DISCONNECT with the reason is
    /// attempted first for 5.0 protocol errors); later calls return
    /// [`UplinkError::Finished`].
    pub async fn next_event(&mut self) -> Result<Event, UplinkError> {
        poll_fn(|cx| self.poll_event(cx)).await
    }

    /// [`Uplink::next_event`] as a poll function.
    pub fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Result<Event, UplinkError>> {
        if self.finished {
            return Poll::Ready(Err(UplinkError::Finished));
        }
        let result = self.poll_event_inner(cx);
        if let Poll::Ready(Err(error)) = &result {
            self.fail(cx, error);
        }
        result
    }

    fn poll_event_inner(&mut self, cx: &mut Context<'_>) -> Poll<Result<Event, UplinkError>> {
        for _ in 0..MAX_TURNS {
            let now = Instant::now();
            self.session.tick(now)?;
            self.poll_write_output(cx)?;
            if let Some(event) = self.decode_buffered()? {
                return Poll::Ready(Ok(event));
            }
            match self.poll_read(cx) {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
            if let Some(deadline) = self.session.deadline() {
                if self.timer.deadline() != deadline {
                    self.timer.as_mut().reset(deadline);
                }
                if self.timer.as_mut().poll(cx).is_ready() {
                    continue;
                }
            }
            return Poll::Pending;
        }
        // Still busy after many turns: let other tasks run, come back soon.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Writes as much output as the socket takes, then flushes. Never
    /// `Pending`: a blocked socket just leaves output for later (its
    /// waker is registered).
    fn poll_write_output(&mut self, cx: &mut Context<'_>) -> Result<(), UplinkError> {
        while !self.session.output().is_empty() {
            match Pin::new(&mut self.stream).poll_write(cx, self.session.output()) {
                Poll::Ready(Ok(0)) => return Err(UplinkError::Closed),
                Poll::Ready(Ok(n)) => {
                    self.session.consume(n, Instant::now());
                    self.unflushed = true;
                }
                Poll::Ready(Err(e)) => return Err(self.io_error(e)),
                Poll::Pending => return Ok(()),
            }
        }
        if self.unflushed {
            match Pin::new(&mut self.stream).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.unflushed = false,
                Poll::Ready(Err(e)) => return Err(self.io_error(e)),
                Poll::Pending => {}
            }
        }
        Ok(())
    }

    /// Decodes buffered packets until one makes an event or no whole
    /// packet is left.
    fn decode_buffered(&mut self) -> Result<Option<Event>, UplinkError> {
        loop {
            let packet = decode(
                &mut self.read_buf,
                self.session.protocol(),
                self.max_packet_size,
            )
            .map_err(|e| UplinkError::Protocol(e.into()))?;
            let Some(packet) = packet else {
                return Ok(None);
            };
            tracing::trace!(packet = %packet.packet_type(), "uplink: received");
            if let Some(event) = self.session.handle(packet)? {
                return Ok(Some(event));
            }
        }
    }

    /// One read into `read_buf`; `Ready(Ok)` when bytes arrived.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), UplinkError>> {
        self.read_buf.reserve(READ_CHUNK);
        // A fresh `read_buf` future per poll: it reads nothing unless it
        // completes, so dropping it when Pending loses nothing.
        let read = self.stream.read_buf(&mut self.read_buf);
        match ready!(std::pin::pin!(read).poll(cx)) {
            Ok(0) => Poll::Ready(Err(UplinkError::Closed)),
            Ok(_) => {
                self.session.received(Instant::now());
                Poll::Ready(Ok(()))
            }
            Err(e) => Poll::Ready(Err(self.io_error(e))),
        }
    }

    /// Marks the uplink finished; for a 5.0 protocol error, tries once
    /// (without waiting) to tell the upstream why.
    fn fail(&mut self, cx: &mut Context<'_>, error: &UplinkError) {
        self.finished = true;
        if let UplinkError::Protocol(e) = error
            && self.session.protocol() == Protocol::V5
        {
            self.session.queue_disconnect(e.reason_code());
            let _ = self.poll_write_output(cx);
        }
        tracing::debug!(server = %self.server_name, %error, "uplink: connection ended");
    }

    fn io_error(&self, error: io::Error) -> UplinkError {
        io_error(error, &self.server_name)
    }

    /// Waits until all queued output is written (without reading: use
    /// [`Uplink::next_event`] to make progress both ways). Cancel-safe:
    /// written bytes are recorded as they go.
    pub async fn flush(&mut self) -> Result<(), UplinkError> {
        poll_fn(|cx| {
            if self.finished {
                return Poll::Ready(Err(UplinkError::Finished));
            }
            if let Err(e) = self.poll_write_output(cx) {
                self.finished = true;
                return Poll::Ready(Err(e));
            }
            if self.session.output().is_empty() && !self.unflushed {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Ends the connection: DISCONNECT with `reason` (5.0; the session
    /// expiry stays as CONNECT set it), after the output queued so far,
    /// then closes the stream (TLS close_notify). Gives up after
    /// `connect_timeout` (a dead link cannot take it).
    pub async fn disconnect(mut self, reason: ReasonCode) -> Result<(), UplinkError> {
        if self.finished {
            return Err(UplinkError::Finished);
        }
        self.session.queue_disconnect(reason);
        let timeout = self.close_timeout;
        let close = async {
            self.flush().await?;
            let server = self.server_name.clone();
            self.stream
                .shutdown()
                .await
                .map_err(|e| io_error(e, &server))
        };
        match tokio::time::timeout(timeout, close).await {
            Ok(result) => result,
            Err(_) => Err(UplinkError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("DISCONNECT not written within {timeout:?}"),
            ))),
        }
    }
}

/// An I/O error, or a TLS error when rustls is inside.
fn io_error(error: io::Error, server_name: &str) -> UplinkError {
    if transport::tls_cause(&error).is_some() {
        UplinkError::Tls {
            server_name: server_name.to_owned(),
            source: error,
        }
    } else if matches!(
        error.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
    ) {
        UplinkError::Closed
    } else {
        UplinkError::Io(error)
    }
}

/// DNS, TCP, TLS, CONNECT and CONNACK; the caller bounds the time.
async fn establish(
    options: &UplinkOptions,
    tls: Option<transport::TlsSetup>,
    connect: Connect,
) -> Result<(Uplink, Connected), UplinkError> {
    let tcp = connect_tcp(options).await?;
    let (mut stream, server_name) = secure(tcp, tls, &options.host).await?;
    send_connect(&mut stream, options.protocol, connect, &server_name).await?;
    let mut read_buf = BytesMut::with_capacity(READ_CHUNK);
    let connack = read_connack(&mut stream, &mut read_buf, options, &server_name).await?;
    let connected = Connected::accepted(connack)?;
    let uplink = Uplink::new(stream, read_buf, &connected, options, server_name)?;
    tracing::debug!(
        server = %uplink.server_name,
        session_present = connected.session_present,
        receive_maximum = connected.receive_maximum,
        "uplink: connected"
    );
    Ok((uplink, connected))
}

/// Resolves the upstream's host and connects to the first of its
/// addresses that accepts, with Nagle's algorithm switched off.
async fn connect_tcp(options: &UplinkOptions) -> Result<TcpStream, UplinkError> {
    let addrs = tokio::net::lookup_host((options.host.as_str(), options.port))
        .await
        .map_err(|source| UplinkError::Dns {
            host: options.host.clone(),
            source,
        })?;
    // Each address in turn; the error reported is the last one's.
    let mut tcp = Err(UplinkError::Dns {
        host: options.host.clone(),
        source: io::Error::new(io::ErrorKind::NotFound, "no address"),
    });
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                tcp = Ok(stream);
                break;
            }
            Err(source) => {
                tracing::debug!(%addr, error = %source, "uplink: TCP connect failed");
                tcp = Err(UplinkError::Tcp {
                    addr: addr.to_string(),
                    source,
                });
            }
        }
    }
    let tcp = tcp?;
    tcp.set_nodelay(true).map_err(UplinkError::Io)?;
    Ok(tcp)
}

/// Runs the TLS handshake over `tcp` when `tls` is given. Returns the
/// stream and the name its errors are reported under: the TLS server
/// name, or the host without TLS.
async fn secure(
    tcp: TcpStream,
    tls: Option<transport::TlsSetup>,
    host: &str,
) -> Result<(Transport, String), UplinkError> {
    match tls {
        None => Ok((Transport::Tcp(tcp), host.to_owned())),
        Some(setup) => {
            let name = setup.server_name.to_str().into_owned();
            let connector = tokio_rustls::TlsConnector::from(setup.config);
            let stream = connector
                .connect(setup.server_name, tcp)
                .await
                .map_err(|source| UplinkError::Tls {
                    server_name: name.clone(),
                    source,
                })?;
            Ok((Transport::Tls(Box::new(stream)), name))
        }
    }
}

/// Encodes the CONNECT packet, writes it and flushes the stream.
async fn send_connect(
    stream: &mut Transport,
    protocol: Protocol,
    connect: Connect,
    server_name: &str,
) -> Result<(), UplinkError> {
    let mut out = BytesMut::new();
    Packet::Connect(Box::new(connect))
        .encode(protocol, &mut out)
        .map_err(|e| UplinkError::InvalidOptions(format!("CONNECT: {e}")))?;
    stream
        .write_all(&out)
        .await
        .map_err(|e| io_error(e, server_name))?;
    stream.flush().await.map_err(|e| io_error(e, server_name))?;
    Ok(())
}

/// Reads until the first packet from the upstream is decoded and returns
/// it if it is a CONNACK, whatever its reason code. A DISCONNECT, another
/// packet or the end of the stream before it is an error. What was read
/// beyond the CONNACK stays in `read_buf`.
async fn read_connack(
    stream: &mut Transport,
    read_buf: &mut BytesMut,
    options: &UplinkOptions,
    server_name: &str,
) -> Result<ConnAck, UplinkError> {
    let packet = loop {
        match decode(read_buf, options.protocol, options.max_packet_size) {
            Ok(Some(packet)) => break packet,
            Ok(None) => {}
            Err(e) => return Err(UplinkError::Protocol(e.into())),
        }
        let n = stream
            .read_buf(read_buf)
            .await
            .map_err(|e| io_error(e, server_name))?;
        if n == 0 {
            return Err(UplinkError::Closed);
        }
    };
    match packet {
        Packet::ConnAck(connack) => Ok(*connack),
        Packet::Disconnect(d) => Err(d.into()),
        other => Err(UplinkError::Protocol(ProtocolError::UnexpectedPacket(
            other.packet_type(),
        ))),
    }
}

impl Connected {
    /// What a CONNACK that accepts the connection says, with MQTT's
    /// defaults for the properties it leaves out. A refusing CONNACK is
    /// [`UplinkError::Refused`], with its reason string and Server
    /// Reference.
    fn accepted(connack: ConnAck) -> Result<Connected, UplinkError> {
        let props = connack.properties;
        let text = |s: Option<MqttString>| s.map(|s| s.to_string());
        if connack.reason_code.is_error() {
            return Err(UplinkError::Refused {
                reason: connack.reason_code,
                reason_string: text(props.reason_string),
                server_reference: text(props.server_reference),
            });
        }
        Ok(Connected {
            session_present: connack.session_present,
            reason_code: connack.reason_code,
            receive_maximum: props.receive_maximum.unwrap_or(u16::MAX),
            maximum_packet_size: props.maximum_packet_size,
            server_keep_alive: props.server_keep_alive,
            session_expiry_interval: props.session_expiry_interval,
            assigned_client_identifier: text(props.assigned_client_identifier),
            server_reference: text(props.server_reference),
            reason_string: text(props.reason_string),
            topic_alias_maximum: props.topic_alias_maximum.unwrap_or(0),
            retain_available: props.retain_available.unwrap_or(true),
            maximum_qos: props.maximum_qos.unwrap_or(QoS::ExactlyOnce),
            wildcard_subscription_available: props.wildcard_subscription_available.unwrap_or(true),
            subscription_identifiers_available: props
                .subscription_identifier_available
                .unwrap_or(true),
            shared_subscription_available: props.shared_subscription_available.unwrap_or(true),
            user_properties: props
                .user_properties
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }
}

impl Uplink {
    /// The uplink over `stream` once the upstream accepted the connection
    /// (`connected`): the keepalive is the upstream's Server Keep Alive,
    /// or ours without one, and the session's limits are the upstream's
    /// and our options'. `read_buf` holds what was read after the CONNACK.
    fn new(
        stream: Transport,
        read_buf: BytesMut,
        connected: &Connected,
        options: &UplinkOptions,
        server_name: String,
    ) -> Result<Uplink, UplinkError> {
        let keepalive = match connected.server_keep_alive {
            Some(secs) => Duration::from_secs(u64::from(secs)),
            None => Duration::from_secs(u64::from(options.keepalive_secs()?)),
        };
        let limits = Limits {
            protocol: options.protocol,
            server_receive_maximum: connected.receive_maximum,
            server_max_packet: connected.maximum_packet_size,
            maximum_qos: connected.maximum_qos,
            retain_available: connected.retain_available,
            receive_maximum: options.receive_maximum,
            output_limit: options.output_buffer_limit,
            keepalive: Some(keepalive),
        };
        let now = Instant::now();
        Ok(Uplink {
            stream,
            session: Session::new(limits, now),
            read_buf,
            max_packet_size: options.max_packet_size,
            // Re-armed at the first poll to the keepalive deadline.
            timer: Box::pin(tokio::time::sleep_until(now)),
            unflushed: false,
            finished: false,
            close_timeout: options.connect_timeout,
            server_name,
        })
    }
}
