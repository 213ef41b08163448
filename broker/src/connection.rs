//! One client connection: a task that reads and decodes packets, hands
//! them to the protocol engine, executes what the engine decides (routing,
//! subscriptions, store writes), and writes what is owed to the client,
//! batching every packet ready at the same moment into one write.
//!
//! The task is generic over the byte stream, so TCP connections and
//! in-process clients (an in-memory duplex) are served by the same code.
//! Reading and writing are concurrent branches of one `select!`, so the
//! task never blocks one direction while the other has work. When the
//! client stops reading and the write buffer passes [`OUT_HIGH_WATER`],
//! the task stops reading from it and stops draining its outbox (which
//! then applies its `queue_full` policy) until the client catches up;
//! other clients never wait for it.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use ferrymq_codec::{
    self as codec, Auth, AuthProperties, ConnAck, Connect, DecodeError, Disconnect, MqttString,
    Packet, Protocol, QoS, ReasonCode, ReasonContext, SubAck, Subscribe, UnsubAck, Unsubscribe,
    Will,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, error, warn};

use codec::topic::exceeds_levels;

use crate::Shared;
use crate::acl::ClientAccess;
use crate::auth::{AuthExchange, AuthMethod, AuthStep};
use crate::bridge_session;
use crate::doorbell::{ALARM, READY};
use crate::engine::{Delivered, Engine, InboundPublish, RouteOutcome};
use crate::ferry;
use crate::ferry::strip_ferry_properties;
use crate::lifecycle::{
    begin_session, delay_will, end_session, publish_will_message, will_message,
};
use crate::message::{MESSAGE_ID_PROPERTY, Message, MessageId, SessionId};
use crate::negotiate::{self, secs_u32};
use crate::outbox::Delivery;
use crate::outbox::{Outbox, Pop};
use crate::publish::{self, Parked, ParkedOn, Routing, wait_for_room};
use crate::rate::PublishRate;
use crate::router::RouteCache;
use crate::session::Control;
use crate::shared_sub::{Member, SharedGroup};
use crate::shed;
use crate::state::STAMP_PROPERTY;
use crate::stats::{Stats, Tally};
use crate::storage::{self, Batch, Durable, SessionRecord, StoreOp, SubscriptionRecord, Ticket};
use crate::subscribe::{self, Attached};

/// Above this many bytes waiting to be written, stop reading from the
/// client and stop draining its outbox.
const OUT_HIGH_WATER: usize = 256 * 1024;
/// The free space a read is offered adapts to the traffic: it starts at
/// `READ_MIN` and doubles while reads fill it, up to `READ_MAX` (a busy
/// publisher is read 64 KiB at a time); reads far smaller than it halve
/// it again.
const READ_MIN: usize = 128;
const READ_MAX: usize = 64 * 1024;
/// An idle connection (nothing to read, write or send) lets go of write
/// buffers larger than this: thousands of idle connections should cost a
/// few hundred bytes each, not their largest burst.
const OUT_KEEP: usize = 4 * 1024;
/// Acknowledgements waiting for the store before the connection stops
/// reading more packets (a bound on per-connection memory).
const PENDING_ACKS_LIMIT: usize = 4096;

/// The most a ferry batch may expand to (32 times `max_packet_size`, and
/// never more than this), so a compressed frame cannot take all memory.
const FERRY_BATCH_EXPANDED_MAX: usize = 256 << 20;
/// How long a closing connection may take to flush its last packets.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);
/// How long a closing connection keeps reading (and discarding) what the
/// client still sends, so that its close is not a reset.
const CLOSE_LINGER: Duration = Duration::from_secs(1);
/// ... and at most this much of it.
const CLOSE_LINGER_BYTES: usize = 1 << 20;

/// Why a connection ends. Decides the DISCONNECT sent (MQTT 5.0) and
/// whether the will is published.
#[derive(Debug)]
enum Close {
    /// The client sent DISCONNECT; `with_will` for reason 0x04.
    Disconnect { with_will: bool },
    /// The client closed the socket without DISCONNECT.
    Eof,
    /// The socket failed.
    Io(io::Error),
    /// The client broke the protocol; the reason code goes in our DISCONNECT.
    Protocol(ReasonCode, String),
    /// No packet within 1.5 times the keep alive.
    KeepAlive,
    /// Another connection took over this client identifier.
    TakenOver,
    /// The broker is stopping.
    Shutdown,
    /// Handling this connection panicked (a bug): this connection closes
    /// (DISCONNECT 0x83 in 5.0), its session is handed back, the broker
    /// goes on.
    Panicked(String),
}

impl Close {
    /// The reason code of the DISCONNECT we send, if we send one.
    fn reason_code(&self) -> Option<ReasonCode> {
        match self {
            Close::Disconnect { .. } | Close::Eof | Close::Io(_) => None,
            Close::Protocol(code, _) => Some(*code),
            Close::KeepAlive => Some(ReasonCode::KEEP_ALIVE_TIMEOUT),
            Close::TakenOver => Some(ReasonCode::SESSION_TAKEN_OVER),
            Close::Shutdown => Some(ReasonCode::SERVER_SHUTTING_DOWN),
            Close::Panicked(_) => Some(ReasonCode::IMPLEMENTATION_SPECIFIC_ERROR),
        }
    }

    /// `persistent`: whether the session outlives this connection (only
    /// then can a connection taking over resume it).
    fn publishes_will(&self, control: &Control, persistent: bool) -> bool {
        match self {
            Close::Disconnect { with_will } => *with_will,
            // The broker going down takes the subscribers with it.
            Close::Shutdown => false,
            // Not when the new connection resumes the session.
            Close::TakenOver => !(persistent && control.taken_over_with_resume()),
            _ => true,
        }
    }

    fn protocol(error: &DecodeError) -> Close {
        Close::Protocol(error.reason_code(), error.to_string())
    }
}

/// The byte stream and its buffers.
struct Io<R, W> {
    reader: R,
    writer: W,
    /// Bytes read but not yet decoded.
    inbuf: BytesMut,
    /// Encoded packets not yet written: everything owed to the client at
    /// one moment goes out in one write.
    out: BytesMut,
    /// The free space the next read is offered (`READ_MIN..=READ_MAX`).
    read_chunk: usize,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Io<R, W> {
    /// Makes room for the next read; returns the free space offered.
    fn reserve_read(&mut self) -> usize {
        if self.inbuf.capacity() - self.inbuf.len() < self.read_chunk / 2 {
            self.inbuf.reserve(self.read_chunk);
        }
        self.inbuf.capacity() - self.inbuf.len()
    }

    /// Adapts the read size after a read of `n` bytes into `offered`.
    fn after_read(&mut self, n: usize, offered: usize) {
        if n >= offered {
            self.read_chunk = (self.read_chunk * 2).min(READ_MAX);
        } else if n < self.read_chunk / 8 {
            self.read_chunk = (self.read_chunk / 2).max(READ_MIN);
        }
    }

    /// Lets go of buffers an idle connection does not need: an empty read
    /// buffer once reads are small again, an empty write buffer larger
    /// than `OUT_KEEP`.
    fn trim(&mut self) {
        if self.inbuf.is_empty()
            && self.read_chunk == READ_MIN
            && self.inbuf.capacity() > 2 * READ_MIN
        {
            self.inbuf = BytesMut::new();
        }
        if self.out.is_empty() && self.out.capacity() > OUT_KEEP {
            self.out = BytesMut::new();
        }
    }

    /// Encodes a packet into the write buffer. Our own packets always
    /// encode; if one did not, that is a bug worth a log line, not a panic.
    fn queue(&mut self, packet: &Packet, protocol: Protocol) {
        if let Err(e) = packet.encode(protocol, &mut self.out) {
            warn!("could not encode {:?}: {e}", packet.packet_type());
        }
    }

    /// Writes what is left (bounded in time) and closes the stream.
    async fn flush_and_close(&mut self) {
        self.flush_and_shutdown().await;
        self.linger().await;
    }

    /// Writes what is pending (a DISCONNECT or refusing CONNACK last) and
    /// shuts the write side: the client reads it, then the end of stream.
    async fn flush_and_shutdown(&mut self) {
        let out = std::mem::take(&mut self.out);
        let _ = tokio::time::timeout(CLOSE_FLUSH, async {
            self.writer.write_all(&out).await?;
            self.writer.shutdown().await
        })
        .await;
    }

    /// Reads and discards what the client still sends, until it closes,
    /// for at most [`CLOSE_LINGER`] and [`CLOSE_LINGER_BYTES`]. Closing a
    /// socket with unread bytes resets the connection, and a reset makes
    /// the client's kernel discard what the client has not read yet: the
    /// DISCONNECT with its reason code, just sent (seen as EPIPE or
    /// ECONNRESET by a client still writing).
    async fn linger(&mut self) {
        let mut scratch = [0u8; 512];
        let mut left = CLOSE_LINGER_BYTES;
        let _ = tokio::time::timeout(CLOSE_LINGER, async {
            while left > 0 {
                match self.reader.read(&mut scratch).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        })
        .await;
    }

    /// Waits for the first packet, which must be CONNECT. On failure
    /// returns why, with any refusal (CONNACK) already queued.
    async fn read_connect(&mut self, shared: &Shared) -> Result<Box<Connect>, String> {
        let max = shared.config().limits.max_packet_size;
        loop {
            let level = connect_level(&self.inbuf);
            match codec::decode(&mut self.inbuf, Protocol::V5, max) {
                Ok(Some(Packet::Connect(connect))) => return Ok(connect),
                Ok(Some(other)) => {
                    // [MQTT-3.1.0-1]: the first packet must be CONNECT.
                    return Err(format!(
                        "first packet is {}, not CONNECT",
                        other.packet_type()
                    ));
                }
                Ok(None) => {}
                Err(error) => {
                    Stats::add(&shared.stats.protocol_errors, 1);
                    self.refuse_connect(level, &error);
                    return Err(error.to_string());
                }
            }
            let _ = self.reserve_read();
            match self.reader.read_buf(&mut self.inbuf).await {
                Ok(0) => return Err("closed before CONNECT".into()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Reads the next packet of a connection speaking `protocol` (used
    /// during an authentication exchange, before the main loop).
    async fn read_packet(&mut self, protocol: Protocol, max: u32) -> Result<Packet, String> {
        loop {
            match codec::decode(&mut self.inbuf, protocol, max) {
                Ok(Some(packet)) => return Ok(packet),
                Ok(None) => {}
                Err(e) => return Err(e.to_string()),
            }
            let _ = self.reserve_read();
            match self.reader.read_buf(&mut self.inbuf).await {
                Ok(0) => return Err("closed during authentication".into()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Queues the CONNACK that tells a client why its CONNECT was refused,
    /// where the protocol has a way to say it.
    fn refuse_connect(&mut self, level: Option<u8>, error: &DecodeError) {
        let (protocol, code) = match (error, level) {
            // [MQTT-3.1.2-2]: unsupported level gets "unacceptable protocol
            // version", in the 3.1.1 format unless the client is newer.
            (DecodeError::UnsupportedProtocolLevel(l), _) => (
                if *l > 5 { Protocol::V5 } else { Protocol::V311 },
                ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
            ),
            (_, Some(5)) => {
                let code = error.reason_code();
                let code = if code.is_valid_for(ReasonContext::ConnAck) {
                    code
                } else {
                    ReasonCode::MALFORMED_PACKET
                };
                (Protocol::V5, code)
            }
            // 3.1.1 has no code for a malformed CONNECT: just close.
            _ => return,
        };
        let connack = ConnAck {
            reason_code: code,
            ..ConnAck::default()
        };
        self.queue(&Packet::ConnAck(Box::new(connack)), protocol);
    }
}

/// The protocol level of a CONNECT at the front of `buf`, if the bytes
/// are there: lets a refusal use the client's CONNACK format even when
/// the rest of its CONNECT is malformed.
fn connect_level(buf: &[u8]) -> Option<u8> {
    if buf.first()? >> 4 != 1 {
        return None;
    }
    let header_len = 1 + buf[1..].iter().take(4).position(|b| b & 0x80 == 0)? + 1;
    let body = buf.get(header_len..)?;
    (body.get(..6)? == b"\x00\x04MQTT").then(|| body.get(6).copied())?
}

/// Serves one client connection until it closes. `peer` names it in logs.
/// How a connection is served beyond what its CONNECT says (set by the
/// in-process client, never by a network peer).
#[derive(Debug, Clone, Default)]
pub(crate) struct ServeOptions {
    /// An in-process client (the only kind that may use a reserved
    /// `$bridge/` client identifier).
    pub(crate) in_process: bool,
    /// Stamp stored messages sent to this client with their message id.
    pub(crate) message_ids: bool,
    /// The client's address (`None`: in-process), for the anonymous rule
    /// and the per-address slowdown of failed logins.
    pub(crate) peer: Option<std::net::IpAddr>,
    /// The common name of the client's verified TLS certificate.
    pub(crate) identity: Option<Box<str>>,
    /// The identity is the client's user name (`use_identity_as_username`).
    pub(crate) identity_is_user: bool,
}

/// The client identifier of a bridge's local session.
pub fn bridge_client_id(name: &str) -> String {
    format!("{BRIDGE_CLIENT_PREFIX}{name}")
}

/// Client identifiers reserved for bridges (in-process only).
pub const BRIDGE_CLIENT_PREFIX: &str = "$bridge/";

/// The client identifier of bridge `name`'s live lane (`lane = "live"`
/// rules): `$bridge/{name}/live` (bridge names have no `/`).
pub fn bridge_live_client_id(name: &str) -> String {
    format!("{BRIDGE_CLIENT_PREFIX}{name}/live")
}

/// Serves one connection (network or in-process) to its end, inside a
/// span `connection{peer, client_id}` (the client id recorded once the
/// CONNECT is read), so that everything logged on its behalf says whose
/// it is.
pub(crate) fn serve<R, W>(
    reader: R,
    writer: W,
    peer: String,
    shared: Arc<Shared>,
    options: ServeOptions,
) -> impl Future<Output = ()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use tracing::Instrument;
    let span = tracing::info_span!("connection", %peer, client_id = tracing::field::Empty);
    // Boxed: used up by `open`, and what an async block takes in stays in
    // it for the connection's life.
    let options = Box::new(options);
    // One async block (not an `async fn` around one): what it takes in is
    // stored once per connection, not once per layer.
    async move {
        let io = Io {
            reader,
            writer,
            inbuf: BytesMut::new(),
            out: BytesMut::new(),
            read_chunk: READ_MIN,
        };
        // The phases before and after `run` are boxed: a task's size is its
        // largest state, and an idle connection should cost only `run`'s.
        let Some(mut conn) = Box::pin(open(io, &shared, &peer, *options)).await else {
            return;
        };
        tracing::Span::current().record(
            "client_id",
            tracing::field::display(&conn.engine.state.client_id),
        );
        debug!(%peer, client_id = %conn.engine.state.client_id, protocol = ?conn.engine.protocol, "connected");
        // A panic while handling a packet is caught in `run` (around `turn`,
        // without boxing `run`, whose state every idle connection pays).
        let close = conn.run(&shared.shutdown_rx).await;
        Box::pin(close_connection(conn, close, &peer)).await;
    }
    .instrument(span)
}

/// Phases 1 and 2: the CONNECT, then accepting it. A panic in either (a
/// bug) ends this connection only, logged with the client id once known.
async fn open<'a, R, W>(
    mut io: Io<R, W>,
    shared: &'a Shared,
    peer: &str,
    options: ServeOptions,
) -> Option<Conn<'a, R, W>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let connect = match CatchPanic(Box::pin(first_connect(&mut io, shared, peer))).await {
        Ok(connect) => connect?,
        Err(why) => {
            panicked(shared, peer, "", "CONNECT", why);
            return None;
        }
    };
    let client_id = connect.client_id.to_string();
    match CatchPanic(Box::pin(Conn::accept(connect, io, shared, options))).await {
        Ok(conn) => conn,
        Err(why) => {
            panicked(shared, peer, &client_id, "accept", why);
            None
        }
    }
}

/// The last phase: logs why the connection ends, then closes it (the will,
/// the session handed back or ended).
async fn close_connection<R, W>(conn: Conn<'_, R, W>, close: Close, peer: &str)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let shared = conn.shared;
    let client_id = conn.engine.state.client_id.clone();
    match &close {
        Close::Protocol(code, why) => {
            Stats::add(&shared.stats.protocol_errors, 1);
            warn!(%peer, %client_id, reason = %code, "closing: {why}");
        }
        Close::Panicked(why) => panicked(shared, peer, &client_id, "handler", why.clone()),
        Close::Io(e) => debug!(%peer, %client_id, "stream error: {e}"),
        other => debug!(%peer, %client_id, "closing: {other:?}"),
    }
    if let Err(why) = CatchPanic(Box::pin(conn.finish(close))).await {
        panicked(shared, peer, &client_id, "close", why);
    }
}

/// Counts and logs a panic that ended one connection.
fn panicked(shared: &Shared, peer: &str, client_id: &str, phase: &str, why: String) {
    Stats::add(&shared.stats.connection_panics, 1);
    error!(%peer, %client_id, "connection {phase} panicked, closing this connection only: {why}");
}

/// Polls a (boxed) future, turning a panic inside it into `Err` with the
/// panic's message; the future is not polled again after that. Tokio would
/// catch it too, but then the task is gone with no word of which client
/// it served, and the session it held would never be handed back.
struct CatchPanic<F>(F);

impl<F: std::future::Future + Unpin> std::future::Future for CatchPanic<F> {
    type Output = Result<F::Output, String>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::panic::{AssertUnwindSafe, catch_unwind};
        use std::task::Poll;
        let inner = &mut self.0;
        // Unwind safety: after a panic the future is dropped, never polled
        // again; the state it shared is left as the unwinding left it
        // (parking_lot locks are released, not poisoned).
        match catch_unwind(AssertUnwindSafe(|| std::pin::Pin::new(inner).poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(payload) => Poll::Ready(Err(panic_message(payload.as_ref()))),
        }
    }
}

/// The message of a panic payload (`&str` or `String`, as `panic!` makes).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// Phase 1: waits (bounded by `connect_timeout_secs`) for the CONNECT.
/// `None` if the client closed, sent something else or nothing in time
/// (any refusal already written), or the broker is shutting down.
async fn first_connect<R, W>(io: &mut Io<R, W>, shared: &Shared, peer: &str) -> Option<Connect>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut shutdown = shared.shutdown_rx.clone();
    let connect_timeout = shared.config().limits.connect_timeout;
    let connect = tokio::select! {
        // Dropping the read future is safe: bytes already read stay in `inbuf`.
        r = tokio::time::timeout(connect_timeout, io.read_connect(shared)) => r,
        _ = shutdown.wait_for(|stop| *stop) => return None,
    };
    match connect {
        // Out of its box: the box is freed now, not when the connection ends.
        Ok(Ok(connect)) => Some(*connect),
        Ok(Err(reason)) => {
            debug!(%peer, %reason, "closing before CONNECT completed");
            io.flush_and_close().await;
            None
        }
        Err(_) => {
            debug!(%peer, "no CONNECT within connect_timeout_secs; closing");
            None
        }
    }
}

/// What a connected client needs, beyond its engine.
struct Conn<'a, R, W> {
    shared: &'a Shared,
    io: Io<R, W>,
    engine: Engine,
    control: Arc<Control>,
    /// What few connections have (a will, an authentication method, ACL
    /// access, a publish rate), in one box made only when one of them is
    /// there: an idle connection's size is what thousands of them cost.
    extras: Option<Box<Extras>>,
    /// Its keep-alive limit, last packet and deadline.
    keep_alive: KeepAliveWatch,
    /// Topic -> routes memo for this client's publishes.
    /// (Made on the first publish: subscribers never need one.)
    routes: Option<Box<RouteCache>>,
    /// The store's durability watermark.
    durable: watch::Receiver<Durable>,
    /// A publish waiting for room in a full queue (policy `block`), with
    /// its QoS and packet identifier; no other packet is read meanwhile.
    /// (Boxed, like the other rarely used parts: an idle connection's
    /// size is what thousands of them cost.)
    parked: Option<Box<(Parked, QoS, u16)>>,
    /// Store ops to submit at the end of this turn (nobody waits for them).
    ops: Vec<StoreOp>,
    /// Packets to encode at the end of this turn.
    packets: Vec<Packet>,
    /// An in-process client (the bridges, gateway firmware): trusted with
    /// the bridges' reserved topics.
    in_process: bool,
    /// A bridge whose message ids are honoured (`[ferry]
    /// trusted_clients`, or an ACL rule with `trusted_bridge = true`).
    trusted: bool,
}

/// The parts of a connection that few connections have (`Conn::extras`).
#[derive(Default)]
struct Extras {
    /// The will, published if the connection ends abnormally.
    will: Option<Will>,
    /// The enhanced authentication method the client connected with.
    auth_method: Option<(MqttString, Arc<dyn AuthMethod>)>,
    /// A re-authentication in progress.
    reauth: Option<Box<dyn AuthExchange>>,
    /// What the ACL lets this client do (`None`: no `acl_file`, or an
    /// in-process client).
    access: Option<ClientAccess>,
    /// Its publish credit under `max_publish_rate` (`None`: no limit, or
    /// an in-process client).
    rate: Option<PublishRate>,
}

impl Extras {
    /// `None` when it would hold nothing.
    fn boxed(self) -> Option<Box<Extras>> {
        let any = self.will.is_some()
            || self.auth_method.is_some()
            || self.access.is_some()
            || self.rate.is_some();
        any.then(|| Box::new(self))
    }
}

/// What a turn's wait needs to know (see `Conn::turn`).
#[derive(Debug, Clone, Copy)]
struct Turn {
    drain: Drain,
    can_read: bool,
    /// The write buffer is below its high-water mark.
    room: bool,
    /// The free space the read is offered.
    offered: usize,
}

type RareWait = std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>;

/// The waits a turn rarely needs, boxed: the durability watermark
/// moving (resolves `false`), room in a parked publish's full queue
/// (`true`), the end of a publish-rate pause (`false`). `None` when none
/// is needed. (It watches its own copy of the watermark, so that it
/// borrows nothing from the connection.)
fn rare_waits(
    durable: &watch::Receiver<Durable>,
    need_durable: bool,
    parked: Option<ParkedOn>,
    throttled: Option<Duration>,
) -> Option<RareWait> {
    if !need_durable && parked.is_none() && throttled.is_none() {
        return None;
    }
    let mut durable = durable.clone();
    Some(Box::pin(async move {
        // Each branch only waits: the first to finish decides, and the
        // others are dropped with nothing half done.
        tokio::select! {
            _ = durable.changed(), if need_durable => false,
            () = wait_for_room(parked) => true,
            () = tokio::time::sleep(throttled.unwrap_or_default()), if throttled.is_some() => false,
        }
    }))
}

/// What woke a connection's wait (see `Conn::wait`).
enum Woke {
    /// Something to do: take another turn.
    Again,
    /// Room in the full queue a parked publish waits on.
    RoomMade,
    /// The connection ends now.
    Closed(Close),
    /// The connection ends, after reading what the client sent last
    /// (`Conn::last_words`).
    Ending(Close),
}

/// A connection's keep-alive: its limit (1.5 times the keep alive; `None`
/// when 0), the time of its last packet, and the deadline it has in the
/// broker's keep-alive queue (`keepalive.rs`).
struct KeepAliveWatch {
    limit: Option<Duration>,
    last_packet: Instant,
    deadline: Option<Instant>,
}

impl KeepAliveWatch {
    fn new(limit: Option<Duration>) -> KeepAliveWatch {
        KeepAliveWatch {
            limit,
            last_packet: Instant::now(),
            deadline: None,
        }
    }

    /// Puts the deadline in: the limit after the last packet.
    fn arm(&mut self, shared: &Shared, control: &Control, outbox: &Arc<Outbox>) {
        if let Some(limit) = self.limit {
            let at = self.last_packet + limit;
            shared
                .keep_alive
                .insert(at, control.connection, outbox.clone());
            self.deadline = Some(at);
        }
    }

    /// Takes the deadline out (the connection ends).
    fn disarm(&mut self, shared: &Shared, control: &Control) {
        if let Some(at) = self.deadline.take() {
            shared.keep_alive.remove(at, control.connection);
        }
    }

    /// On an alarm: whether the client has been silent for longer than the
    /// limit. If not, and the deadline put in has come (the keep-alive task
    /// took it out when it rang), puts the next one in.
    fn expired(&mut self, shared: &Shared, control: &Control, outbox: &Arc<Outbox>) -> bool {
        let (Some(limit), Some(at)) = (self.limit, self.deadline) else {
            return false;
        };
        let now = Instant::now();
        if now < at {
            // An alarm for something else (a kick).
            return false;
        }
        self.deadline = None;
        if now >= self.last_packet + limit {
            return true;
        }
        self.arm(shared, control, outbox);
        false
    }
}

/// How draining the outbox ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drain {
    /// Nothing left.
    Empty,
    /// The first message waits for a store ticket.
    WaitDurable,
    /// The client's Receive Maximum is reached.
    WaitWindow,
    /// The write buffer is full.
    OutFull,
}

impl<'a, R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Conn<'a, R, W> {
    /// Checks a CONNECT, attaches the session (taking over any connection
    /// holding it), and queues the CONNACK. Returns `None` when the client
    /// was refused (the refusal is sent and the stream closed).
    async fn accept(
        connect: Connect,
        mut io: Io<R, W>,
        shared: &'a Shared,
        options: ServeOptions,
    ) -> Option<Self> {
        let protocol = connect.protocol;
        let config = shared.config();
        let limits = &config.limits;
        let acl_access = access(shared, &connect, &options);
        // Taken before the login: a refused connection leaves a gap in the
        // numbers, which only have to be unique.
        let connection = shared.next_connection();
        let circumstances = negotiate::Circumstances {
            limits,
            max_session_expiry: config.storage.max_session_expiry,
            trusted_clients: &config.ferry.trusted_clients,
            acl_trusted_bridge: acl_access.as_ref().is_some_and(|a| a.trusted_bridge()),
            in_process: options.in_process,
            shedding: shared.shedding.level() >= shed::REFUSE_CONNECTIONS,
            connection,
            boot_id: shared.boot_id,
            message_ids: options.message_ids.then_some(shared.identity.uuid),
        };
        let admitted = admit(
            &connect,
            &mut io,
            shared,
            &options,
            &circumstances,
            acl_access.as_ref(),
        )
        .await;
        let (auth_method, auth_data) = match admitted {
            Ok(authenticated) => authenticated,
            Err(code) => {
                let connack = negotiate::refusing_connack(code);
                io.queue(&Packet::ConnAck(Box::new(connack)), protocol);
                io.flush_and_close().await;
                return None;
            }
        };
        let negotiate::Terms {
            client_id,
            expiry,
            keep_alive,
            trusted,
            mut connack,
            engine: engine_limits,
        } = negotiate::terms(&connect, &circumstances);
        if let Some(method) = &auth_method {
            connack.properties.authentication_method = Some(method.0.clone());
            connack.properties.authentication_data = auth_data;
        }
        let control = Control::new(connection);
        let (state, resumed, ticket) =
            begin_session(shared, &client_id, !connect.clean_start, expiry, &control).await;
        connack.session_present = resumed;
        let mut durable = shared.store.durable();
        // The session record is durable before the client hears it exists.
        let _ = durable.wait_for(|d| d.up_to >= ticket).await;
        io.queue(&Packet::ConnAck(Box::new(connack)), protocol);
        let engine = Engine::new(protocol, state, engine_limits);
        let mut conn = Conn {
            shared,
            io,
            engine,
            control,
            extras: Extras {
                will: connect.will,
                auth_method,
                reauth: None,
                access: acl_access,
                rate: (limits.max_publish_rate > 0 && !options.in_process)
                    .then(|| PublishRate::new(limits.max_publish_rate, Instant::now().into_std())),
            }
            .boxed(),
            keep_alive: KeepAliveWatch::new(keep_alive),
            routes: None,
            durable,
            parked: None,
            ops: Vec::new(),
            packets: Vec::new(),
            in_process: options.in_process,
            trusted,
        };
        if resumed {
            conn.engine
                .resend_inflight(Instant::now(), &mut conn.packets);
            if conn.in_process {
                // From here on the first phase of its exchanges is kept in
                // memory only (`volatile_inflight`): records of it from
                // before (a run that kept them) go now, not never.
                let number = conn.engine.state.number;
                for (&packet_id, inflight) in &conn.engine.state.inflight {
                    if matches!(inflight, crate::session::Inflight::Sent(_)) {
                        conn.ops.push(StoreOp::InflightDelete { number, packet_id });
                    }
                }
            }
        }
        Some(conn)
    }

    /// The connection's main loop; returns why it ended.
    async fn run(&mut self, shutdown: &watch::Receiver<bool>) -> Close {
        // (No copies of `self`'s fields here: this future's size is what
        // every idle connection pays.)
        // A kick rings the doorbell of the queue recorded for the session
        // (`begin_session`); one before that is seen by the first wait's
        // look at the flag.
        self.keep_alive.last_packet = Instant::now();
        self.keep_alive
            .arm(self.shared, &self.control, &self.engine.state.outbox);
        let close = loop {
            // A shutdown kicks every connection holding a session; one
            // that attached after that sees the flag here.
            if *shutdown.borrow() {
                break Close::Shutdown;
            }
            // Everything that needs no waiting, then one wait. (The work is
            // done in a plain function, so its temporaries are not part of
            // this future's size, which every idle connection pays.)
            // Every packet is handled inside `turn`: a panic there (a bug)
            // ends this connection only, which then closes as usual (its
            // session handed back). Unwind safety: the connection is not
            // used again but to close it.
            let turn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.turn()));
            let (turn, mut rare) = match turn {
                Ok(Ok(turn)) => turn,
                Ok(Err(close)) => break close,
                Err(payload) => break Close::Panicked(panic_message(payload.as_ref())),
            };
            // One wait on the socket, the doorbell and `rare`: polled by
            // hand, so that an idle connection holds no future for any of
            // them (the socket and the doorbell keep its waker).
            let woke = std::future::poll_fn(|cx| self.wait(cx, &turn, &mut rare, shutdown)).await;
            drop(rare);
            match woke {
                Woke::Again => {}
                Woke::RoomMade => self.resume_parked(),
                Woke::Closed(close) => break close,
                // Boxed: rare, and not to grow every idle connection.
                Woke::Ending(cause) => break Box::pin(self.last_words(cause)).await,
            }
        };
        self.keep_alive.disarm(self.shared, &self.control);
        close
    }

    /// Polls every source the turn wants, in this order: the kick, the
    /// keep-alive deadline, the write, the read, the queue's doorbell, the
    /// rare waits. Ready when any of them has something (a write and a
    /// read may both be done in one poll); Pending when none has, each
    /// holding the task's waker.
    ///
    /// Nothing is lost when it returns: the write and read futures are
    /// made and dropped within the poll (they do no I/O unless they
    /// complete), the doorbell keeps the bits not taken, and `rare` is
    /// kept by the caller across polls.
    fn wait(
        &mut self,
        cx: &mut Context<'_>,
        turn: &Turn,
        rare: &mut Option<RareWait>,
        shutdown: &watch::Receiver<bool>,
    ) -> Poll<Woke> {
        let outbox = &self.engine.state.outbox;
        let wanted = if turn.drain != Drain::OutFull && turn.room {
            ALARM | READY
        } else {
            ALARM
        };
        let rung = outbox.doorbell().take(cx, wanted);
        if self.control.is_kicked() {
            return Poll::Ready(if *shutdown.borrow() {
                Woke::Closed(Close::Shutdown)
            } else {
                Woke::Ending(Close::TakenOver)
            });
        }
        if rung & ALARM != 0 && self.keep_alive.expired(self.shared, &self.control, outbox) {
            return Poll::Ready(Woke::Closed(Close::KeepAlive));
        }
        // A taken READY is acted on by the next turn (it drains the queue).
        let mut woke = (rung & READY != 0).then_some(Woke::Again);
        let io = &mut self.io;
        if !io.out.is_empty() {
            match std::pin::pin!(io.writer.write(&io.out)).poll(cx) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Woke::Ending(Close::Io(io::ErrorKind::WriteZero.into())));
                }
                Poll::Ready(Ok(n)) => {
                    io.out.advance(n);
                    woke = Some(Woke::Again);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Woke::Ending(Close::Io(e))),
                Poll::Pending => {}
            }
        }
        if turn.can_read {
            match std::pin::pin!(io.reader.read_buf(&mut io.inbuf)).poll(cx) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Woke::Closed(Close::Eof)),
                Poll::Ready(Ok(n)) => {
                    self.keep_alive.last_packet = Instant::now();
                    io.after_read(n, turn.offered);
                    woke = Some(Woke::Again);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Woke::Closed(Close::Io(e))),
                Poll::Pending => {}
            }
        }
        if let Some(wait) = rare.as_mut()
            && let Poll::Ready(made) = wait.as_mut().poll(cx)
        {
            *rare = None;
            if made {
                return Poll::Ready(Woke::RoomMade);
            }
            woke = Some(Woke::Again);
        }
        match woke {
            Some(woke) => Poll::Ready(woke),
            None => Poll::Pending,
        }
    }

    /// The connection ends for `cause`: another connection takes its
    /// client id over, or a write failed (a client that closed with
    /// deliveries unread resets the stream, and the broker, not reading
    /// while its write buffer is full, learns it from the write). What the
    /// client sent before may be here already, a DISCONNECT among it (with
    /// its Session Expiry, cancelling the will): it is read (one read that
    /// does not wait) and handled before giving up, as if `cause` came
    /// after it.
    async fn last_words(&mut self, cause: Close) -> Close {
        // Whatever the read finds (bytes, the end of the stream, nothing
        // yet), `cause` decides unless a DISCONNECT came first.
        let _ =
            tokio::time::timeout(Duration::ZERO, self.io.reader.read_buf(&mut self.io.inbuf)).await;
        self.process_input().unwrap_or(cause)
    }

    /// One turn's work that needs no waiting: handle what was read,
    /// release acknowledgements, drain the outbox, submit store ops, trim
    /// buffers when idle. Returns what the wait needs (and the rare waits,
    /// when it needs any), or why to close.
    fn turn(&mut self) -> Result<(Turn, Option<RareWait>), Close> {
        if let Some(close) = self.process_input() {
            return Err(close);
        }
        // Marked seen: the rare wait's copy of the watermark then waits for
        // a later one.
        let state = self.durable.borrow_and_update().clone();
        let durable = state.up_to;
        self.engine.release_acks(&state, &mut self.packets);
        self.encode_packets();
        let drain = self.drain(durable);
        if !self.ops.is_empty() {
            let ticket = storage::write(self.shared.store.as_ref(), std::mem::take(&mut self.ops));
            self.engine.written(ticket);
        }
        let need_durable =
            drain == Drain::WaitDurable || self.engine.waiting_for().is_some_and(|t| t > durable);
        let room = self.io.out.len() < OUT_HIGH_WATER;
        let throttled = self.throttled();
        let can_read = room
            && self.parked.is_none()
            && throttled.is_none()
            && self.engine.wants_input()
            && self.engine.pending_acks() < PENDING_ACKS_LIMIT;
        if drain == Drain::Empty
            && self.io.out.is_empty()
            && self.io.inbuf.is_empty()
            && self.parked.is_none()
        {
            self.io.trim();
            self.packets.shrink_to_fit();
            self.ops.shrink_to_fit();
        }
        let offered = self.io.reserve_read();
        let parked = self
            .parked
            .as_ref()
            .map(|parked| (parked.0.outbox().clone(), parked.0.size()));
        let turn = Turn {
            drain,
            can_read,
            room,
            offered,
        };
        // The waits most turns do not need (durability, room in a full
        // queue) are one boxed future, made only when needed: inline,
        // they would add to every idle connection's size.
        Ok((
            turn,
            rare_waits(&self.durable, need_durable, parked, throttled),
        ))
    }

    /// How long the client must wait before it is read again, when it
    /// went over `max_publish_rate`.
    fn throttled(&mut self) -> Option<Duration> {
        let rate = self.extras.as_deref_mut()?.rate.as_mut()?;
        Some(rate.wait(Instant::now().into_std())).filter(|wait| !wait.is_zero())
    }

    /// Decodes and handles every complete packet in the read buffer, while
    /// the engine wants input and no publish is parked.
    fn process_input(&mut self) -> Option<Close> {
        let max = self.shared.config().limits.max_packet_size;
        while self.parked.is_none() && self.engine.wants_input() && self.throttled().is_none() {
            match codec::decode(&mut self.io.inbuf, self.engine.protocol, max) {
                Ok(Some(packet)) => {
                    if let Some(close) = self.handle(packet) {
                        return Some(close);
                    }
                }
                Ok(None) => break,
                Err(e) => return Some(Close::protocol(&e)),
            }
        }
        None
    }

    fn encode_packets(&mut self) {
        let protocol = self.engine.protocol;
        for packet in self.packets.drain(..) {
            if let Err(e) = packet.encode(protocol, &mut self.io.out) {
                warn!("could not encode {:?}: {e}", packet.packet_type());
            }
        }
    }

    /// Moves deliveries into the write buffer while the store, the
    /// client's window and the buffer allow: first from the session's own
    /// outbox, then pulled from the shared subscription groups it belongs to.
    fn drain(&mut self, durable: Ticket) -> Drain {
        if self.engine.state.replaying() {
            // Retained messages of new subscriptions go first: live ones
            // wait in the queue behind them (see `replay.rs`).
            match self.drain_replays(durable) {
                Drain::Empty => {}
                waiting => return waiting,
            }
        }
        let own = self.engine.state.outbox.clone();
        let mut result = self.drain_from(&own, durable, None);
        if !self.engine.state.groups.is_empty() && result != Drain::OutFull {
            let groups: Vec<(Arc<SharedGroup>, Member)> =
                self.engine.state.groups.values().cloned().collect();
            for (group, member) in &groups {
                match self.drain_from(&group.outbox, durable, Some((group, member))) {
                    Drain::OutFull => return Drain::OutFull,
                    Drain::WaitDurable => result = Drain::WaitDurable,
                    Drain::WaitWindow if result == Drain::Empty => result = Drain::WaitWindow,
                    _ => {}
                }
            }
        }
        result
    }

    /// Sends retained messages of new subscriptions while the store, the
    /// client's window and the write buffer allow.
    fn drain_replays(&mut self, durable: Ticket) -> Drain {
        let shared = self.shared;
        // Out of the session while the engine is used beside it.
        let Some(mut replays) = self.engine.state.replays.take() else {
            return Drain::Empty;
        };
        let now = Instant::now();
        let now_ms = shared.clock.now_ms();
        let mut expired = Vec::new();
        let mut sent = Tally::default();
        let state = loop {
            if self.io.out.len() >= OUT_HIGH_WATER {
                break Drain::OutFull;
            }
            let engine = &self.engine;
            let delivery = match replays.pop_ready(
                &shared.retained,
                durable,
                now,
                now_ms,
                |qos| engine.can_send(qos),
                &mut expired,
            ) {
                Pop::Got(d) => d,
                Pop::Empty => break Drain::Empty,
                Pop::WaitDurable => break Drain::WaitDurable,
                Pop::WaitWindow => break Drain::WaitWindow,
            };
            self.send(delivery, now, &mut sent);
        };
        // Kept while any is left; a finished one frees its box.
        self.engine.state.replays = (!replays.is_empty()).then_some(replays);
        shared.stats.sent.add(&sent);
        if !expired.is_empty() {
            // Expired retained messages are never sent, and go.
            let mut batch = Batch::new(shared.store.as_ref());
            for topic in expired {
                if shared.retained.remove_expired(&topic, now) {
                    batch.push(StoreOp::RetainedDelete(topic));
                }
            }
            batch.submit();
        }
        state
    }

    /// Hands a delivery to the engine and encodes what it sends (or drops
    /// it, counted: too large, expired, or older than `[storage]
    /// max_age_secs` for a network client), counting what went in `sent`.
    fn send(&mut self, delivery: Delivery, now: Instant, sent: &mut Tally) {
        if let Some(max_age) = self.shared.config().storage.max_age
            && !self.in_process
            && u128::from(
                self.shared
                    .clock
                    .now_ms()
                    .saturating_sub(delivery.queued_ms),
            ) > max_age.as_millis()
        {
            Engine::unqueue(&delivery, &mut self.ops);
            Stats::add(&self.shared.stats.messages_aged_out, 1);
            return;
        }
        match self.engine.deliver(delivery, now, &mut self.ops) {
            Delivered::Send(out) => {
                if let Err(e) = out.view().encode(self.engine.protocol, &mut self.io.out) {
                    warn!(topic = %out.message.topic, "could not encode a delivery: {e}");
                }
                sent.count(out.qos, out.message.payload.len());
            }
            Delivered::TooLarge => {
                Stats::add(&self.shared.stats.messages_dropped_too_large, 1);
            }
            Delivered::Expired => {
                Stats::add(&self.shared.stats.messages_expired, 1);
            }
        }
    }

    fn drain_from(
        &mut self,
        outbox: &Outbox,
        durable: Ticket,
        pulled_by: Option<(&Arc<SharedGroup>, &Member)>,
    ) -> Drain {
        let mut sent = Tally::default();
        let now = Instant::now();
        let member_qos = pulled_by.map_or(QoS::ExactlyOnce, |(_, m)| m.qos);
        // From a group with other members: one message per turn, then the
        // group is woken again, so that members take turns.
        let one_per_turn = pulled_by.is_some_and(|(g, _)| g.member_count() > 1);
        let state = loop {
            if self.io.out.len() >= OUT_HIGH_WATER {
                break Drain::OutFull;
            }
            if one_per_turn && sent.any() {
                if let Some((group, _)) = pulled_by {
                    group.wake();
                }
                break Drain::Empty;
            }
            let engine = &self.engine;
            let delivery =
                match outbox.pop_ready(durable, |qos| engine.can_send(qos.min(member_qos))) {
                    Pop::Got(d) => d,
                    Pop::Empty => break Drain::Empty,
                    Pop::WaitDurable => break Drain::WaitDurable,
                    Pop::WaitWindow => break Drain::WaitWindow,
                };
            let delivery = match pulled_by {
                Some((group, member)) => {
                    let mut d = SharedGroup::adapt(member, delivery);
                    d.group = Some(group.clone());
                    d
                }
                None => delivery,
            };
            self.send(delivery, now, &mut sent);
        };
        self.shared.stats.sent.add(&sent);
        state
    }

    /// Handles one packet from the client. Returns `Some` to close.
    fn handle(&mut self, packet: Packet) -> Option<Close> {
        match packet {
            Packet::Publish(publish) => return self.publish(publish),
            Packet::PubAck(ack) => self.engine.puback(ack.packet_id, &mut self.ops),
            Packet::PubRec(ack) => self.engine.pubrec(ack, &mut self.ops, &mut self.packets),
            Packet::PubRel(rel) => self.engine.pubrel(rel.packet_id, &mut self.ops),
            Packet::PubComp(ack) => self.engine.pubcomp(ack.packet_id, &mut self.ops),
            Packet::Subscribe(subscribe) => return self.subscribe(subscribe),
            Packet::Unsubscribe(unsubscribe) => self.unsubscribe(unsubscribe),
            Packet::PingReq => self.packets.push(Packet::PingResp),
            Packet::Disconnect(d) => return Some(self.disconnect(d)),
            Packet::Connect(_) => {
                // [MQTT-3.1.0-2]: a second CONNECT is a protocol violation.
                return Some(Close::Protocol(
                    ReasonCode::PROTOCOL_ERROR,
                    "second CONNECT".into(),
                ));
            }
            Packet::Auth(auth) => return self.reauthenticate(auth),
            other @ (Packet::ConnAck(_)
            | Packet::SubAck(_)
            | Packet::UnsubAck(_)
            | Packet::PingResp) => {
                return Some(Close::Protocol(
                    ReasonCode::PROTOCOL_ERROR,
                    format!("{} is sent by servers only", other.packet_type()),
                ));
            }
        }
        None
    }

    /// An AUTH packet after CONNACK: a re-authentication (5.0 4.12.1).
    fn reauthenticate(&mut self, auth: Auth) -> Option<Close> {
        let protocol_error =
            |why: &str| Some(Close::Protocol(ReasonCode::PROTOCOL_ERROR, why.into()));
        let Some((name, method)) = self.extras.as_deref().and_then(|e| e.auth_method.clone())
        else {
            // AUTH is only valid after CONNECT named an authentication method.
            return protocol_error("AUTH without an authentication method in CONNECT");
        };
        if auth.properties.authentication_method.as_ref() != Some(&name) {
            return protocol_error("AUTH with another authentication method than CONNECT's");
        }
        let data = auth.properties.authentication_data;
        let step = match auth.reason_code {
            ReasonCode::RE_AUTHENTICATE => {
                let (exchange, step) = method.begin(&self.engine.state.client_id, data);
                self.extras.get_or_insert_default().reauth = Some(exchange);
                step
            }
            ReasonCode::CONTINUE_AUTHENTICATION => {
                match self.extras.as_deref_mut().and_then(|e| e.reauth.as_mut()) {
                    Some(exchange) => exchange.step(data),
                    None => return protocol_error("AUTH Continue without an exchange in progress"),
                }
            }
            _ => return protocol_error("AUTH Success from a client"),
        };
        let reply = |reason_code, data| {
            Packet::Auth(Auth {
                reason_code,
                properties: AuthProperties {
                    authentication_method: Some(name.clone()),
                    authentication_data: data,
                    ..AuthProperties::default()
                },
            })
        };
        match step {
            AuthStep::Continue(data) => {
                let packet = reply(ReasonCode::CONTINUE_AUTHENTICATION, data);
                self.packets.push(packet);
            }
            AuthStep::Success(data) => {
                let packet = reply(ReasonCode::SUCCESS, data);
                if let Some(extras) = self.extras.as_deref_mut() {
                    extras.reauth = None;
                }
                self.packets.push(packet);
            }
            AuthStep::Failure(code) => {
                let code = if code.is_valid_for(ReasonContext::Disconnect) {
                    code
                } else {
                    ReasonCode::NOT_AUTHORIZED
                };
                return Some(Close::Protocol(code, "re-authentication failed".into()));
            }
        }
        None
    }

    /// What the ACL lets this client do, if an ACL applies to it.
    fn access(&self) -> Option<&ClientAccess> {
        self.extras.as_deref().and_then(|e| e.access.as_ref())
    }

    /// Rebuilds the client's ACL access if a reload changed the rules.
    fn refresh_access(&mut self) {
        let access = self.extras.as_deref_mut().and_then(|e| e.access.as_mut());
        if let (Some(access), Some(rules)) = (access, &self.shared.acl) {
            access.refresh(rules, &self.engine.state.client_id);
        }
    }

    fn publish(&mut self, publish: ferrymq_codec::Publish) -> Option<Close> {
        self.refresh_access();
        if let Some(rate) = self.extras.as_deref_mut().and_then(|e| e.rate.as_mut())
            && !rate.charge(Instant::now().into_std()).is_zero()
        {
            Stats::add(&self.shared.stats.publishes_throttled, 1);
            if self.shared.refuse_log.allow() {
                let client_id = &self.engine.state.client_id;
                warn!(%client_id, "over limits.max_publish_rate: not reading from it for a while");
            }
        }
        let (qos, packet_id) = (publish.qos, publish.packet_id);
        match self.engine.publish(publish, Instant::now()) {
            Err(v) => Some(Close::Protocol(v.reason, v.why)),
            Ok(InboundPublish::Answered) => None,
            Ok(InboundPublish::TooManyLevels { topic, close }) => {
                let shared = self.shared;
                too_many_levels(
                    shared,
                    &self.engine.state.client_id,
                    "PUBLISH topic",
                    &topic,
                );
                close.then(|| {
                    Close::Protocol(
                        ReasonCode::TOPIC_NAME_INVALID,
                        "PUBLISH topic with more levels than limits.max_topic_levels".into(),
                    )
                })
            }
            Ok(InboundPublish::Route { message, .. })
                if message.topic.starts_with(ferry::RESERVED_PREFIX) =>
            {
                if self.trusted
                    && message.topic.as_str() == ferry::BATCH_TOPIC
                    && qos != QoS::AtMostOnce
                {
                    self.ferry_batch(&message, qos, packet_id);
                } else {
                    self.engine.not_authorized(qos, packet_id);
                }
                None
            }
            Ok(InboundPublish::Route { message, .. })
                if !self.in_process && bridge_session::is_reserved(message.topic.as_str()) =>
            {
                self.engine.not_authorized(qos, packet_id);
                None
            }
            Ok(InboundPublish::Route { message, .. })
                if self
                    .access()
                    .is_some_and(|a| !a.may_publish(&message.topic)) =>
            {
                let (shared, client_id) = (self.shared, &self.engine.state.client_id);
                acl_denied(shared, client_id, "PUBLISH", &message.topic);
                self.engine.not_authorized(qos, packet_id);
                None
            }
            Ok(InboundPublish::Route { message, .. })
                if message.qos == QoS::AtMostOnce
                    && !self.in_process
                    && self.shared.shedding.level() >= shed::DROP_QOS0
                    && !self
                        .shared
                        .config()
                        .limits
                        .critical_topics
                        .iter()
                        .any(|f| codec::topic::matches(f, &message.topic)) =>
            {
                // Shedding load: a QoS 0 message may be lost anyway.
                Stats::add(&self.shared.stats.publishes_shed, 1);
                None
            }
            Ok(InboundPublish::Route {
                mut message,
                hold_qos2,
            }) => {
                // The node's own `$SYS` reports are not traffic.
                if !(self.in_process && message.topic.starts_with("$SYS/")) {
                    self.shared
                        .stats
                        .received
                        .count(message.qos, message.payload.len());
                }
                let id = self.message_id(&mut message);
                if let Some(id) = &id
                    && self.shared.dedup.lock().is_taken(id)
                {
                    // Taken before: acknowledged once what took it is
                    // durable.
                    Stats::add(&self.shared.stats.duplicates_dropped, 1);
                    let ticket = after_earlier_writes(self.shared);
                    let outcome = RouteOutcome {
                        ticket,
                        matched: 1,
                        refused: false,
                    };
                    self.engine.routed(qos, packet_id, outcome);
                    return None;
                }
                let persistent = self.engine.state.is_persistent();
                match publish::route(
                    self.shared,
                    self.routes.get_or_insert_default(),
                    message,
                    hold_qos2,
                    persistent,
                    id,
                    true,
                ) {
                    Routing::Done(outcome) => self.engine.routed(qos, packet_id, outcome),
                    Routing::Blocked(parked) => {
                        self.parked = Some(Box::new((parked, qos, packet_id)));
                    }
                }
                None
            }
        }
    }

    /// Routes every record of a ferry batch from a trusted bridge (see
    /// `ferry.rs`), each de-duplicated by its id, and acknowledges the
    /// batch once all of them are durable: 0x97 when a queue is full (the
    /// records before it are taken; the resend skips them), 0x99 when the
    /// frame does not parse.
    fn ferry_batch(&mut self, batch: &Message, qos: QoS, packet_id: u16) {
        let shared = self.shared;
        let max = usize::try_from(shared.config().limits.max_packet_size)
            .unwrap_or(usize::MAX)
            .saturating_mul(32)
            .min(FERRY_BATCH_EXPANDED_MAX);
        let records = match ferry::decode_batch(&batch.payload, max) {
            Ok(records) => records,
            Err(e) => {
                Stats::add(&shared.stats.protocol_errors, 1);
                warn!(client_id = %self.engine.state.client_id, "refused a ferry batch: {e}");
                self.engine
                    .refuse_acknowledged(qos, packet_id, ReasonCode::PAYLOAD_FORMAT_INVALID);
                return;
            }
        };
        let now = Instant::now();
        let persistent = self.engine.state.is_persistent();
        let origin = SessionId(self.engine.state.number);
        let (mut ticket, mut matched, mut refused, mut seen_before) = (0, 0, false, false);
        for record in records {
            shared
                .stats
                .received
                .count(record.qos, record.payload.len());
            let topic = record.topic.as_str();
            let allowed = codec::topic::validate_topic_name(topic).is_ok()
                && !exceeds_levels(topic, shared.config().limits.max_topic_levels)
                && !topic.starts_with(ferry::RESERVED_PREFIX)
                && !bridge_session::is_reserved(topic)
                && self.access().is_none_or(|a| a.may_publish(topic));
            if !allowed {
                // Never routable here: dropped (the batch is not
                // refused for it, or it would come back for ever).
                Stats::add(&shared.stats.acl_denied, 1);
                warn!(client_id = %self.engine.state.client_id, %topic, "dropped a ferry batch record this node may not take");
                continue;
            }
            if record
                .id
                .is_some_and(|id| shared.dedup.lock().is_taken(&id))
            {
                Stats::add(&shared.stats.duplicates_dropped, 1);
                seen_before = true;
                continue;
            }
            let message = Arc::new(Message {
                expires_at: Message::expiry_from(record.properties.message_expiry_interval, now),
                holders: Default::default(),
                topic: record.topic,
                payload: record.payload,
                qos: record.qos.min(QoS::AtLeastOnce),
                retain: record.retain,
                properties: record.properties,
                origin,
            });
            let routing = publish::route(
                shared,
                self.routes.get_or_insert_default(),
                message,
                None,
                persistent,
                record.id,
                false,
            );
            match routing {
                Routing::Done(outcome) if outcome.refused => {
                    refused = true;
                    break;
                }
                Routing::Done(outcome) => {
                    ticket = ticket.max(outcome.ticket);
                    matched += outcome.matched.max(1);
                }
                // A QoS 0 record for a full queue under `block` (QoS 1
                // records that passed the room check are never turned
                // away: `Outbox::push`): the rest of the batch
                // comes again.
                Routing::Blocked(_) => {
                    refused = true;
                    break;
                }
            }
        }
        if seen_before || ticket == 0 {
            // After whatever took them before is durable.
            ticket = ticket.max(after_earlier_writes(shared));
        }
        let outcome = RouteOutcome {
            ticket,
            matched: matched.max(1),
            refused,
        };
        self.engine.routed(qos, packet_id, outcome);
    }

    /// The `ferry-id` of a message from a trusted bridge (QoS 1 and 2:
    /// a QoS 0 message is never resent), which de-duplicates it. Other
    /// clients' ids and state stamps (`ferry-stamp`) are removed, so that
    /// no client can make a receiver further on drop another node's
    /// messages by forging ids, or win a state topic by forging a stamp
    /// (its write is stamped on arrival instead).
    fn message_id(&self, message: &mut Arc<Message>) -> Option<MessageId> {
        let is_id = |(key, _): &(MqttString, MqttString)| key.as_str() == MESSAGE_ID_PROPERTY;
        let is_ferry = |p: &(MqttString, MqttString)| is_id(p) || p.0.as_str() == STAMP_PROPERTY;
        if !message.properties.user_properties.iter().any(is_ferry) {
            return None;
        }
        if !self.trusted {
            if !self.in_process {
                strip_ferry_properties(&mut Arc::make_mut(message).properties);
            }
            return None;
        }
        if message.qos == QoS::AtMostOnce {
            return None;
        }
        message
            .properties
            .user_properties
            .iter()
            .find(|p| is_id(p))
            .and_then(|(_, value)| value.as_str().parse().ok())
    }

    fn resume_parked(&mut self) {
        let Some((parked, qos, packet_id)) = self.parked.take().map(|b| *b) else {
            return;
        };
        match publish::resume(self.shared, parked) {
            Routing::Done(outcome) => self.engine.routed(qos, packet_id, outcome),
            Routing::Blocked(parked) => self.parked = Some(Box::new((parked, qos, packet_id))),
        }
    }

    fn subscribe(&mut self, subscribe: Subscribe) -> Option<Close> {
        self.refresh_access();
        let v5 = self.engine.protocol == Protocol::V5;
        let in_process = self.in_process;
        let shared = self.shared;
        let state = &mut self.engine.state;
        let mut batch = Batch::new(shared.store.as_ref());
        let mut reason_codes = Vec::with_capacity(subscribe.subscriptions.len());
        let mut retained = Vec::new();
        for mut s in subscribe.subscriptions {
            if exceeds_levels(&s.filter, shared.config().limits.max_topic_levels) {
                too_many_levels(shared, &state.client_id, "SUBSCRIBE filter", &s.filter);
                reason_codes.push(ReasonCode::TOPIC_FILTER_INVALID);
                continue;
            }
            if let Some(access) = self.extras.as_deref().and_then(|e| e.access.as_ref()) {
                // A shared subscription is checked by its filter.
                let filter = codec::topic::shared_subscription(&s.filter)
                    .map_or(s.filter.as_str(), |(_, inner)| inner);
                if !access.may_subscribe(filter) {
                    acl_denied(shared, &state.client_id, "SUBSCRIBE", filter);
                    // 3.1.1 gets 0x80 (its only failure code).
                    reason_codes.push(ReasonCode::NOT_AUTHORIZED);
                    continue;
                }
            }
            let quota = shared.config().limits.max_subscriptions_per_client as usize;
            if quota > 0
                && !in_process
                && state.subscriptions.len() >= quota
                && !state.subscriptions.contains_key(&s.filter)
            {
                Stats::add(&shared.stats.subscriptions_refused, 1);
                if shared.refuse_log.allow() {
                    warn!(client_id = %state.client_id, "limits.max_subscriptions_per_client reached: refusing new filters");
                }
                // 3.1.1 gets 0x80 (its only failure code).
                reason_codes.push(ReasonCode::QUOTA_EXCEEDED);
                continue;
            }
            // Kept for the session's life: not the read buffer with it.
            s.filter = s.filter.detached();
            let mut options = s.options;
            if !v5 {
                options = codec::SubscriptionOptions {
                    qos: options.qos,
                    ..Default::default()
                };
            }
            let identifier = if v5 {
                subscribe.properties.subscription_identifier
            } else {
                None
            };
            let record = SubscriptionRecord {
                options,
                identifier,
            };
            let is_shared = codec::topic::shared_subscription(&s.filter).is_some();
            if is_shared && options.no_local {
                // [MQTT-3.8.3-4]
                return Some(Close::Protocol(
                    ReasonCode::PROTOCOL_ERROR,
                    "No Local on a shared subscription".into(),
                ));
            }
            let existed = match subscribe::attach(shared, state, &s.filter, record) {
                Attached::Invalid => {
                    reason_codes.push(ReasonCode::TOPIC_FILTER_INVALID);
                    continue;
                }
                attached => attached == Attached::Replaced,
            };
            if state.is_persistent() {
                batch.push(StoreOp::SubscriptionPut {
                    number: state.number,
                    filter: s.filter.clone(),
                    subscription: record,
                });
            }
            if is_shared {
                // No retained messages on a shared subscription: MQTT 5.0
                // 3.3.1.3 sends them when a new Non-shared Subscription is
                // made (a sentence without a rule number).
                reason_codes.push(ReasonCode(options.qos as u8));
                continue;
            }
            // A resubscribe sends the retained messages again (3.1.1 and
            // 5.0 Retain Handling 0); 5.0 can ask for new subscriptions only
            // or none.
            let send_retained = match options.retain_handling {
                codec::RetainHandling::SendAtSubscribe => true,
                codec::RetainHandling::SendIfNew => !existed,
                codec::RetainHandling::DoNotSend => false,
            };
            if send_retained {
                retained.push((s.filter.clone(), options.qos, identifier));
            }
            reason_codes.push(ReasonCode(options.qos as u8));
        }
        let ticket = batch.submit();
        let suback = SubAck {
            packet_id: subscribe.packet_id,
            reason_codes,
            properties: Default::default(),
        };
        // The SUBACK leaves once the subscription is durable; the retained
        // messages are streamed after it (`replay.rs`), from a cursor made
        // now that the subscriptions are in the router.
        self.engine.reply_after(ticket, Packet::SubAck(suback));
        for (filter, granted, identifier) in retained {
            let replays = self.engine.state.replays.get_or_insert_default();
            replays.start(&shared.retained, &filter, granted, identifier, ticket);
        }
        None
    }

    fn unsubscribe(&mut self, unsubscribe: Unsubscribe) {
        let shared = self.shared;
        let state = &mut self.engine.state;
        let mut batch = Batch::new(shared.store.as_ref());
        let mut reason_codes = Vec::with_capacity(unsubscribe.filters.len());
        for filter in &unsubscribe.filters {
            if exceeds_levels(filter, shared.config().limits.max_topic_levels) {
                // Never subscribed in this run: no subscription that deep exists.
                too_many_levels(shared, &state.client_id, "UNSUBSCRIBE filter", filter);
                reason_codes.push(ReasonCode::TOPIC_FILTER_INVALID);
                continue;
            }
            let existed = state.subscriptions.remove(filter).is_some();
            if let Some(replays) = state.replays.as_mut() {
                replays.cancel(filter);
            }
            if existed {
                match state.groups.remove(filter) {
                    Some((group, _)) => {
                        shared.groups.leave(shared, &group, SessionId(state.number))
                    }
                    None => {
                        shared.router.unsubscribe(filter, SessionId(state.number));
                    }
                }
                if state.is_persistent() {
                    batch.push(StoreOp::SubscriptionDelete {
                        number: state.number,
                        filter: filter.clone(),
                    });
                }
            }
            reason_codes.push(if existed {
                ReasonCode::SUCCESS
            } else {
                ReasonCode::NO_SUBSCRIPTION_EXISTED
            });
        }
        let ticket = batch.submit();
        let unsuback = UnsubAck {
            packet_id: unsubscribe.packet_id,
            reason_codes,
            properties: Default::default(),
        };
        self.engine.reply_after(ticket, Packet::UnsubAck(unsuback));
    }

    fn disconnect(&mut self, d: Disconnect) -> Close {
        if self.engine.protocol == Protocol::V5
            && let Some(asked) = d.properties.session_expiry_interval
        {
            let state = &mut self.engine.state;
            if state.expiry.is_zero() && asked > 0 {
                // MQTT 5.0 3.14.2.2.2 (a Protocol Error without a rule
                // number): a session created to end with its connection
                // cannot be made persistent at DISCONNECT.
                return Close::Protocol(
                    ReasonCode::PROTOCOL_ERROR,
                    "DISCONNECT sets a Session Expiry Interval on a session created with 0".into(),
                );
            }
            let expiry = Duration::from_secs(u64::from(asked))
                .min(self.shared.config().storage.max_session_expiry);
            if expiry != state.expiry {
                state.expiry = expiry;
                if state.is_persistent() {
                    self.ops.push(StoreOp::SessionPut(SessionRecord {
                        client_id: state.client_id.clone(),
                        number: state.number,
                        expiry_secs: secs_u32(expiry),
                        offline_since_ms: None,
                        pending_will: None,
                    }));
                }
            }
        }
        Close::Disconnect {
            with_will: d.reason_code == ReasonCode::DISCONNECT_WITH_WILL_MESSAGE,
        }
    }

    /// Closes the stream and hands the session back (or ends it), after
    /// publishing the will when the close calls for it.
    async fn finish(mut self, close: Close) {
        // Offline from now on (before the client can see the stream end):
        // QoS 0 is no longer queued for it unless configured.
        self.engine.state.outbox.set_online(false);
        let protocol = self.engine.protocol;
        // Acknowledgements already durable still go out.
        let state = self.durable.borrow().clone();
        self.engine.release_acks(&state, &mut self.packets);
        self.encode_packets();
        if let (Protocol::V5, Some(code)) = (protocol, close.reason_code()) {
            let mut disconnect = Disconnect::new(code);
            if let Close::Protocol(_, why) = &close {
                // Always allowed on DISCONNECT, and a help to whoever
                // debugs the client.
                disconnect.properties.reason_string = MqttString::new(why).ok();
            }
            self.io.queue(&Packet::Disconnect(disconnect), Protocol::V5);
        }
        if !self.ops.is_empty() {
            storage::write(self.shared.store.as_ref(), std::mem::take(&mut self.ops));
        }
        // The stream is closed last (`linger`), after the will and the
        // session's hand-back, which must not wait for the client.
        self.io.flush_and_shutdown().await;
        let shared = self.shared;
        let publish_will = close.publishes_will(&self.control, self.engine.state.is_persistent());
        let mut state = self.engine.into_state();
        let mut stored_will = None;
        let will = self.extras.as_deref_mut().and_then(|e| e.will.take());
        if let Some(will) = will.filter(|_| publish_will) {
            let delay = Duration::from_secs(u64::from(
                will.properties
                    .will_delay_interval
                    .filter(|_| protocol == Protocol::V5)
                    .unwrap_or(0),
            ));
            let message = will_message(will, SessionId(state.number));
            if delay.is_zero() || !state.is_persistent() {
                // Without a delay, or when the session ends now anyway.
                publish_will_message(shared, message, self.routes.get_or_insert_default());
            } else {
                stored_will = Some((message, delay));
            }
        }
        let client_id = state.client_id.clone();
        if state.is_persistent() {
            // The session goes offline now; a delayed will waits with it,
            // also across a restart.
            let clock = shared.store.clock();
            let record = SessionRecord {
                client_id: client_id.clone(),
                number: state.number,
                expiry_secs: secs_u32(state.expiry),
                offline_since_ms: Some(clock.now_ms()),
                pending_will: None,
            };
            let mut stored = record.clone();
            if let Some((message, delay)) = stored_will {
                stored.pending_will = Some(crate::storage::StoredWill {
                    message: message.clone(),
                    due_ms: clock.now_ms() + delay.as_millis() as u64,
                });
                state.pending_will = Some(delay_will(shared, message, delay, Some(record)));
            }
            storage::write(shared.store.as_ref(), vec![StoreOp::SessionPut(stored)]);
            shared
                .sessions
                .detach(&client_id, &self.control, Some(state));
        } else {
            let mut batch = Batch::new(shared.store.as_ref());
            end_session(shared, state, &mut batch);
            batch.submit();
            shared.sessions.detach(&client_id, &self.control, None);
        }
        self.io.linger().await;
    }
}

/// A login that passed with an enhanced authentication method: the
/// method (with its name), and the data of its last step for the CONNACK.
type Authenticated = (
    Option<(MqttString, Arc<dyn AuthMethod>)>,
    Option<bytes::Bytes>,
);

/// Everything that may refuse a CONNECT, in order: the refusals that need
/// no login (`negotiate::refusal`, counted and logged here), the login (an
/// enhanced authentication exchange, or the password file and the
/// anonymous rules), then the ACL on the will topic. `Err` is the reason
/// code to refuse with.
async fn admit<R, W>(
    connect: &Connect,
    io: &mut Io<R, W>,
    shared: &Shared,
    options: &ServeOptions,
    circumstances: &negotiate::Circumstances<'_>,
    access: Option<&ClientAccess>,
) -> Result<Authenticated, ReasonCode>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if let Some(refusal) = negotiate::refusal(connect, circumstances) {
        match (refusal, &connect.will) {
            (negotiate::Refusal::Shedding, _) => Stats::add(&shared.stats.connections_shed, 1),
            (negotiate::Refusal::WillTooDeep, Some(will)) => {
                too_many_levels(shared, &connect.client_id, "will topic", &will.topic);
            }
            _ => {}
        }
        return Err(refusal.code(connect.protocol));
    }
    let mut authenticated = (None, None);
    if let (Protocol::V5, Some(name)) =
        (connect.protocol, &connect.properties.authentication_method)
    {
        let Some(method) = shared
            .auth_methods
            .iter()
            .find(|m| m.name() == name.as_str())
        else {
            return Err(ReasonCode::BAD_AUTHENTICATION_METHOD);
        };
        let data = connect.properties.authentication_data.clone();
        match authenticate(io, shared, method.as_ref(), name, &connect.client_id, data).await {
            Ok(AuthStep::Success(data)) => {
                authenticated = (Some((name.clone(), method.clone())), data);
            }
            Ok(AuthStep::Failure(code)) => return Err(code),
            Ok(AuthStep::Continue(_)) | Err(_) => return Err(ReasonCode::NOT_AUTHORIZED),
        }
    } else if let Some(code) = log_in(shared, connect, options).await {
        return Err(code);
    }
    if let Some(will) = &connect.will
        && access.is_some_and(|a| !a.may_publish(&will.topic))
    {
        acl_denied(shared, &connect.client_id, "will", &will.topic);
        return Err(ReasonCode::NOT_AUTHORIZED);
    }
    Ok(authenticated)
}

/// Runs an enhanced authentication exchange during CONNECT: relays
/// Authentication Data between the client (AUTH packets) and `method`
/// until it answers success or failure. Bounded by `connect_timeout_secs`
/// as a whole.
async fn authenticate<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    io: &mut Io<R, W>,
    shared: &Shared,
    method: &dyn AuthMethod,
    name: &MqttString,
    client_id: &MqttString,
    data: Option<bytes::Bytes>,
) -> Result<AuthStep, String> {
    let (mut exchange, mut step) = method.begin(client_id, data);
    let max = shared.config().limits.max_packet_size;
    let timeout = shared.config().limits.connect_timeout;
    tokio::time::timeout(timeout, async {
        loop {
            let AuthStep::Continue(data) = step else {
                return Ok(step);
            };
            let challenge = Auth {
                reason_code: ReasonCode::CONTINUE_AUTHENTICATION,
                properties: AuthProperties {
                    authentication_method: Some(name.clone()),
                    authentication_data: data,
                    ..AuthProperties::default()
                },
            };
            io.queue(&Packet::Auth(challenge), Protocol::V5);
            let out = std::mem::take(&mut io.out);
            io.writer.write_all(&out).await.map_err(|e| e.to_string())?;
            match io.read_packet(Protocol::V5, max).await? {
                Packet::Auth(answer)
                    if answer.reason_code == ReasonCode::CONTINUE_AUTHENTICATION
                        && answer.properties.authentication_method.as_ref() == Some(name) =>
                {
                    step = exchange.step(answer.properties.authentication_data);
                }
                other => return Err(format!("expected AUTH, got {}", other.packet_type())),
            }
        }
    })
    .await
    .map_err(|_| "authentication timed out".to_string())?
}

/// Checks who the client is (when no enhanced authentication method
/// did): a user name must come with its password when `[auth]
/// password_file` is set; without one (or without a password file) the
/// client is anonymous, allowed with `allow_anonymous` from loopback (or
/// in-process clients are always let in), and from anywhere only with
/// `allow_anonymous_remote`.
/// `Some` is the refusal: 0x86 Bad User Name or Password (3.1.1: 4) for
/// failed credentials, 0x87 Not authorized (3.1.1: 5) for an anonymous
/// client that may not connect.
async fn log_in(shared: &Shared, connect: &Connect, options: &ServeOptions) -> Option<ReasonCode> {
    let auth = &shared.config().auth;
    // In-process clients are the embedding program itself.
    let ip = options.peer?;
    if options.identity_is_user && options.identity.is_some() {
        // Its certificate, verified in the TLS handshake, says who it is.
        return None;
    }
    if let (Some(users), Some(name)) = (&shared.users, &connect.username) {
        let password = connect.password.as_deref().unwrap_or_default();
        return match users.login(Some(ip), name, password).await {
            crate::users::Login::Verified | crate::users::Login::Remembered => None,
            crate::users::Login::Refused => {
                Stats::add(&shared.stats.auth_failures, 1);
                if shared.auth_log.allow() {
                    warn!(%ip, user = %name, "login refused: unknown user or wrong password");
                }
                Some(ReasonCode::BAD_USER_NAME_OR_PASSWORD)
            }
        };
    }
    let local = ip.to_canonical().is_loopback();
    let anonymous_ok = auth.allow_anonymous && (local || auth.allow_anonymous_remote);
    (!anonymous_ok).then_some(ReasonCode::NOT_AUTHORIZED)
}

/// What the ACL lets a client that passed `log_in` do: `None` without an
/// `acl_file`, and for in-process clients (the embedding program). Its
/// user name counts only when a password file verified it.
fn access(shared: &Shared, connect: &Connect, options: &ServeOptions) -> Option<ClientAccess> {
    let acl = shared.acl.as_ref().filter(|_| !options.in_process)?;
    let identity = options.identity.as_deref();
    let user = match (options.identity_is_user, identity) {
        (true, Some(identity)) => Some(identity),
        _ => shared.users.as_ref().and(connect.username.as_deref()),
    };
    Some(ClientAccess::new(acl, user, &connect.client_id, identity))
}

/// A store ticket that is durable only once every write submitted before
/// it is: what an acknowledgement of a message taken earlier waits for.
fn after_earlier_writes(shared: &Shared) -> storage::Ticket {
    Batch::new(shared.store.as_ref()).submit()
}

/// Counts and logs (rate-limited) what the ACL refused.
fn acl_denied(shared: &Shared, client_id: &str, what: &str, topic: &str) {
    Stats::add(&shared.stats.acl_denied, 1);
    if shared.auth_log.allow() {
        warn!(%client_id, %topic, "not authorized by the ACL: {what}");
    }
}

/// Counts a topic or filter refused for having more levels than
/// `max_topic_levels`, and logs it (rate-limited, with its start only).
pub(crate) fn too_many_levels(shared: &Shared, client_id: &str, what: &str, topic: &str) {
    Stats::add(&shared.stats.topic_levels_refused, 1);
    if shared.levels_log.allow() {
        let levels = topic.split('/').count();
        let start: String = topic.chars().take(64).collect();
        warn!(
            %client_id,
            levels,
            max = shared.config().limits.max_topic_levels,
            "refused a {what} with more levels than limits.max_topic_levels: {start}..."
        );
    }
}

#[cfg(test)]
mod tests {
    use super::connect_level;

    #[test]
    fn connect_level_is_read_from_a_partial_connect() {
        assert_eq!(
            connect_level(&[0x10, 0x10, 0, 4, b'M', b'Q', b'T', b'T', 5]),
            Some(5)
        );
        assert_eq!(
            connect_level(&[0x10, 0x80, 0x01, 0, 4, b'M', b'Q', b'T', b'T', 4]),
            Some(4)
        );
        assert_eq!(connect_level(&[0x10, 0x10, 0, 4, b'M', b'Q']), None);
        assert_eq!(
            connect_level(&[0x30, 0x10, 0, 4, b'M', b'Q', b'T', b'T', 5]),
            None
        );
        assert_eq!(connect_level(&[0x10]), None);
    }
}
