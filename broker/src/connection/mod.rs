//! One client connection: a task that reads and decodes packets, hands
//! them to the protocol engine, executes what the engine decides (routing,
//! subscriptions, store writes), and writes what is owed to the client,
//! batching every packet ready at the same moment into one write.
//!
//! This file is the task: its phases (`serve`), and the loop of turns
//! (`Conn::run`): a turn does everything that needs no waiting
//! (`Conn::turn`), then one wait on every source at once (`Conn::wait`,
//! polled by hand: the socket both ways, the session queue's doorbell,
//! and the rare waits), so the task never blocks one direction while the
//! other has work. When the client stops reading and the write buffer
//! passes [`OUT_HIGH_WATER`], the task stops reading from it and stops
//! draining its queue (which then applies its `queue_full` policy) until
//! the client catches up; other clients never wait for it. The rest is
//! in its parts, one behaviour each:
//!
//! - `admit.rs`: letting the client in (login, session, CONNACK) and
//!   re-authentication;
//! - `inbound.rs`: the packets the client sends, PUBLISH above all;
//! - `subscriptions.rs`: SUBSCRIBE and UNSUBSCRIBE;
//! - `outbound.rs`: what is drained and encoded towards the client;
//! - `close.rs`: how the connection ends (the will, the session handed
//!   back) and a panic kept to one connection;
//! - `dormancy.rs`: an idle connection giving up its task, and served on
//!   in a new one when it wakes;
//! - `stream.rs`: the byte stream and its buffers.
//!
//! The task is generic over the byte stream, so TCP connections and
//! in-process clients (an in-memory duplex) are served by the same code.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ferrymq_codec::{self as codec, Connect, MqttString, QoS, Will};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::debug;

use crate::Shared;
use crate::acl::ClientAccess;
use crate::auth::{AuthExchange, AuthMethod};
use crate::doorbell::{ALARM, READY};
use crate::dormant::{self, Rest};
use crate::engine::Engine;
use crate::keepalive::{self, Alarm};
use crate::publish::{Parked, ParkedOn, wait_for_room};
use crate::rate::PublishRate;
use crate::router::RouteCache;
use crate::session::Control;
use crate::storage::{self, Durable};

use close::{CatchPanic, Close, panic_message, panicked};
pub(crate) use dormancy::{Dormant, wake, woken};
use stream::Io;

mod admit;
mod close;
mod dormancy;
mod inbound;
mod outbound;
mod stream;
mod subscriptions;

/// Above this many bytes waiting to be written, stop reading from the
/// client and stop draining its outbox.
const OUT_HIGH_WATER: usize = 256 * 1024;
/// The free space a read is offered adapts to the traffic: it starts at
/// `READ_MIN` and doubles while reads fill it, up to `READ_MAX` (a busy
/// publisher is read 64 KiB at a time); reads far smaller than it halve
/// it again.
const READ_MIN: usize = 128;
const READ_MAX: usize = 64 * 1024;
/// Between bursts a connection keeps its buffers (a resting one has
/// none), but not a write buffer larger than this, nor a turn's vectors
/// with room for more than `TURN_KEEP` entries: a busy connection should
/// not hold its largest burst.
const OUT_KEEP: usize = 4 * 1024;
const TURN_KEEP: usize = 64;
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

/// What the listener holds for a connection's life, given back when the
/// connection ends: it goes with the connection also while dormant.
pub(crate) struct Admission {
    /// Its share of `max_connections`.
    pub(crate) _permit: tokio::sync::OwnedSemaphorePermit,
    /// Its share of its address's `max_connections_per_address` (only
    /// with that limit set: boxed, so that it costs nothing without).
    pub(crate) _per_address: Option<Box<dyn Send + Sync>>,
}

/// Serves one connection (network or in-process) to its end, inside a
/// span `connection{peer, client_id}` (the client id recorded once the
/// CONNECT is read), so that everything logged on its behalf says whose
/// it is. A plain TCP connection that goes idle may go dormant
/// (`dormant.rs`): this task ends, and [`wake`] serves it on in a new one.
pub(crate) fn serve<S>(
    stream: S,
    peer: String,
    shared: Arc<Shared>,
    options: ServeOptions,
    admission: Option<Admission>,
) -> impl Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use tracing::Instrument;
    let span = tracing::info_span!("connection", %peer, client_id = tracing::field::Empty);
    // The stream, the options and the admission in one box, moved into
    // `open` whole (whose boxed future frees it when done): what an async
    // block takes in stays in it for the connection's life, and so would a
    // box only moved out of. (The stream goes on in the connection.)
    let opening = Box::new((stream, options, admission));
    let peer = peer.into_boxed_str();
    // One async block (not an `async fn` around one): what it takes in is
    // stored once per connection, not once per layer.
    async move {
        // The phases before and after `run` are boxed: a task's size is its
        // largest state, and an idle connection should cost only `run`'s.
        let Some(mut conn) = Box::pin(open(opening, &shared, &peer)).await else {
            return;
        };
        tracing::Span::current().record(
            "client_id",
            tracing::field::display(&conn.engine.state.client_id),
        );
        debug!(%peer, client_id = %conn.engine.state.client_id, protocol = ?conn.engine.protocol, "connected");
        conn.keep_alive.packet(&shared.keep_alive);
        // A panic while handling a packet is caught in `run` (around `turn`,
        // without boxing `run`, whose state every idle connection pays).
        let outcome = conn.run().await;
        if let Some(closing) = conn.after_run(outcome, &peer) {
            closing.await;
        }
    }
    .instrument(span)
}

/// Phases 1 and 2: the CONNECT, then accepting it. A panic in either (a
/// bug) ends this connection only, logged with the client id once known.
async fn open<'a, S>(
    opening: Box<(S, ServeOptions, Option<Admission>)>,
    shared: &'a Shared,
    peer: &str,
) -> Option<Conn<'a, S>>
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let (stream, options, admission) = *opening;
    let mut io = Io::new(stream);
    let connect = match CatchPanic(Box::pin(first_connect(&mut io, shared, peer))).await {
        Ok(connect) => connect?,
        Err(why) => {
            panicked(shared, peer, "", "CONNECT", why);
            return None;
        }
    };
    let client_id = connect.client_id.to_string();
    match CatchPanic(Box::pin(Conn::accept(connect, io, shared, options))).await {
        Ok(conn) => conn.map(|conn| Conn { admission, ..conn }),
        Err(why) => {
            panicked(shared, peer, &client_id, "accept", why);
            None
        }
    }
}

/// Phase 1: waits (bounded by `connect_timeout_secs`) for the CONNECT.
/// `None` if the client closed, sent something else or nothing in time
/// (any refusal already written), or the broker is shutting down.
async fn first_connect<S>(io: &mut Io<S>, shared: &Shared, peer: &str) -> Option<Connect>
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
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
struct Conn<'a, S> {
    shared: &'a Shared,
    io: Io<S>,
    engine: Engine,
    control: Arc<Control>,
    /// What few connections have (a will, an authentication method, ACL
    /// access, a publish rate), in one box made only when one of them is
    /// there: an idle connection's size is what thousands of them cost.
    extras: Option<Box<Extras>>,
    /// Its keep-alive limit, last packet and deadline.
    keep_alive: keepalive::Watch,
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
    /// An in-process client (the bridges, gateway firmware): trusted with
    /// the bridges' reserved topics.
    in_process: bool,
    /// A bridge whose message ids are honoured (`[ferry]
    /// trusted_clients`, or an ACL rule with `trusted_bridge = true`).
    trusted: bool,
    /// Given back when the connection ends (`None`: in-process).
    admission: Option<Admission>,
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
    /// The free space the read is offered (at most `READ_MAX`).
    offered: u32,
    /// Nothing to do but wait on the socket and the doorbell, and it may
    /// go dormant (see `dormant::rest`).
    idle: bool,
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
    /// The connection goes dormant.
    Sleep,
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

impl<'a, S: AsyncRead + AsyncWrite + Unpin + 'static> Conn<'a, S> {
    /// The connection's main loop; returns why it ended, or `None` when it
    /// goes dormant (`Conn::sleep`).
    async fn run(&mut self) -> Option<Close> {
        // (No copies of `self`'s fields here: this future's size is what
        // every idle connection pays.)
        // A kick rings the doorbell of the queue recorded for the session
        // (`begin_session`); one before that is seen by the first wait's
        // look at the flag.
        // Its alarm: a new connection puts its first in; a woken one has
        // the one it put in when it went dormant (its keep-alive deadline
        // only), and needs its quiet checks again.
        let (queue, connection) = (&self.shared.keep_alive, self.control.connection);
        self.keep_alive.disarm(queue, connection);
        self.keep_alive
            .arm(queue, connection, &self.engine.state.outbox, true);
        let close = loop {
            // A shutdown kicks every connection holding a session; one
            // that attached after that sees the flag here.
            if *self.shared.shutdown_rx.borrow() {
                break Some(Close::Shutdown);
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
                Ok(Err(close)) => break Some(close),
                Err(payload) => break Some(Close::Panicked(panic_message(payload.as_ref()))),
            };
            // One wait on the socket, the doorbell and `rare`: polled by
            // hand, so that an idle connection holds no future for any of
            // them (the socket and the doorbell keep its waker).
            let woke = std::future::poll_fn(|cx| self.wait(cx, &turn, &mut rare)).await;
            drop(rare);
            match woke {
                Woke::Again => {}
                Woke::RoomMade => self.resume_parked(),
                Woke::Closed(close) => break Some(close),
                // Boxed: rare, and not to grow every idle connection.
                Woke::Ending(cause) => break Some(Box::pin(self.last_words(cause)).await),
                Woke::Sleep => break None,
            }
        };
        let (queue, connection) = (&self.shared.keep_alive, self.control.connection);
        self.keep_alive.disarm(queue, connection);
        if close.is_none() {
            // Dormant, its keep-alive deadline still rings it.
            self.keep_alive
                .arm(queue, connection, &self.engine.state.outbox, false);
        }
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
    ) -> Poll<Woke> {
        let outbox = &self.engine.state.outbox;
        let wanted = if turn.drain != Drain::OutFull && turn.room {
            ALARM | READY
        } else {
            ALARM
        };
        let rung = outbox.doorbell().take(cx, wanted);
        if self.control.is_kicked() {
            return Poll::Ready(if *self.shared.shutdown_rx.borrow() {
                Woke::Closed(Close::Shutdown)
            } else {
                Woke::Ending(Close::TakenOver)
            });
        }
        let mut quiet = false;
        if rung & ALARM != 0 {
            match self
                .keep_alive
                .alarm(&self.shared.keep_alive, self.control.connection, outbox)
            {
                Alarm::Expired => return Poll::Ready(Woke::Closed(Close::KeepAlive)),
                Alarm::Checked { quiet: q } => quiet = q,
                Alarm::Other => {}
            }
        }
        // A taken READY is acted on by the next turn (it drains the queue).
        let mut woke = (rung & READY != 0).then_some(Woke::Again);
        if woke.is_some() {
            self.keep_alive
                .stir(&self.shared.keep_alive, self.control.connection, outbox);
        }
        let io = &mut self.io;
        if io.unwritten() > 0 {
            match io.poll_write(cx) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Woke::Ending(Close::Io(io::ErrorKind::WriteZero.into())));
                }
                Poll::Ready(Ok(_)) => woke = Some(Woke::Again),
                Poll::Ready(Err(e)) => return Poll::Ready(Woke::Ending(Close::Io(e))),
                Poll::Pending => {}
            }
        }
        if turn.can_read {
            match io.poll_read(cx, turn.offered as usize) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Woke::Closed(Close::Eof)),
                Poll::Ready(Ok(_)) => {
                    let queue = &self.shared.keep_alive;
                    self.keep_alive.packet(queue);
                    self.keep_alive.stir(queue, self.control.connection, outbox);
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
            None => {
                let may_sleep = self.keep_alive.sleepy();
                match dormant::rest(turn.idle, self.keep_alive.fresh(), quiet, may_sleep) {
                    Rest::Sleep => Poll::Ready(Woke::Sleep),
                    Rest::Trim => {
                        let queue = &self.shared.keep_alive;
                        self.keep_alive.rest(queue, self.control.connection, outbox);
                        self.io.release();
                        self.engine.trim();
                        Poll::Pending
                    }
                    Rest::Stay => Poll::Pending,
                }
            }
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
        let _ = tokio::time::timeout(Duration::ZERO, self.io.read()).await;
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
        if self.engine.pending_acks() > 0 {
            self.engine
                .release_acks(&state, &mut self.io.busy().packets);
        }
        self.encode_packets();
        let drain = self.drain(durable);
        let ops = self.io.take_ops();
        if !ops.is_empty() {
            let ticket = storage::write(self.shared.store.as_ref(), ops);
            self.engine.written(ticket);
        }
        let need_durable =
            drain == Drain::WaitDurable || self.engine.waiting_for().is_some_and(|t| t > durable);
        let room = self.io.unwritten() < OUT_HIGH_WATER;
        let throttled = self.throttled();
        let can_read = room
            && self.parked.is_none()
            && throttled.is_none()
            && self.engine.wants_input()
            && self.engine.pending_acks() < PENDING_ACKS_LIMIT;
        if drain == Drain::Empty && self.io.unwritten() == 0 {
            self.io.trim();
        }
        let offered = u32::try_from(self.io.reserve_read()).unwrap_or(u32::MAX);
        let parked = self
            .parked
            .as_ref()
            .map(|parked| (parked.0.outbox().clone(), parked.0.size()));
        // The waits most turns do not need (durability, room in a full
        // queue) are one boxed future, made only when needed: inline,
        // they would add to every idle connection's size.
        let rare = rare_waits(&self.durable, need_durable, parked, throttled);
        let idle = rare.is_none()
            && can_read
            && drain == Drain::Empty
            && self.io.unwritten() == 0
            && !self.io.has_input()
            && self.engine.pending_acks() == 0;
        let turn = Turn {
            drain,
            can_read,
            room,
            offered,
            idle,
        };
        Ok((turn, rare))
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
        while self.io.has_input()
            && self.parked.is_none()
            && self.engine.wants_input()
            && self.throttled().is_none()
        {
            match codec::decode(&mut self.io.busy().inbuf, self.engine.protocol, max) {
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
}
