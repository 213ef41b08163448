//! An idle plain-TCP connection giving up its task (`Conn::sleep`): what
//! it keeps while dormant ([`Dormant`]), and the new task that serves it
//! on when it wakes ([`wake`]). When it sleeps is `dormant::rest`'s to
//! say; the set that holds it is `dormant.rs`.

use std::any::{Any, TypeId};
use std::future::Future;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use super::close::{Close, close_connection};
use super::stream::Io;
use super::{Admission, Conn, Extras};
use crate::Shared;
use crate::engine::Engine;
use crate::keepalive;
use crate::session::Control;

/// What a dormant connection keeps (see `dormant.rs`): everything of its
/// `Conn` but the stream (the dormant set holds its socket), the buffers
/// (it has none when idle), the route memo and the watermark's receiver
/// (made again when it wakes), and its peer's address (the socket's, read
/// again when it wakes).
pub(crate) struct Dormant {
    engine: Engine,
    control: Arc<Control>,
    extras: Option<Box<Extras>>,
    keep_alive: keepalive::Watch,
    admission: Option<Admission>,
    in_process: bool,
    trusted: bool,
}

/// Serves a dormant connection on in a new task: its socket had something
/// (or closed), or its doorbell rang. In a new span
/// `connection{peer, client_id}`, as before it slept (the fields recorded
/// by the new task).
pub(crate) fn wake(socket: std::net::TcpStream, dormant: Dormant, shared: &Arc<Shared>) {
    use tracing::Instrument;
    use tracing::field::Empty;
    let span = tracing::info_span!("connection", peer = Empty, client_id = Empty);
    // Taken in boxed, and out of the box by `reopen` (whose boxed future
    // frees it): what the task takes in, it holds for its life, and a
    // woken connection's task should be no larger than a new one's. All
    // but the spawn happens in the new task: the set's task, which may be
    // waking thousands, only hands them out.
    tokio::spawn(woken(Box::new((socket, dormant)), shared.clone()).instrument(span));
}

/// The woken connection's task (its future's size is
/// `bench_support::woken_future_size`).
// (Not an `async fn`: its future would hold `woken` and `shared` beside
// what it awaits; a block that moves them into itself holds them once.)
#[allow(clippy::manual_async_fn)]
pub(crate) fn woken(
    woken: Box<(std::net::TcpStream, Dormant)>,
    shared: Arc<Shared>,
) -> impl Future<Output = ()> + Send {
    async move {
        let Some((mut conn, peer)) = Box::pin(reopen(woken, &shared)).await else {
            return;
        };
        let outcome = conn.run().await;
        if let Some(closing) = conn.after_run(outcome, &peer) {
            closing.await;
        }
    }
}

/// The woken connection's stream (its socket forgotten by the dormant set
/// and registered with tokio again) and its span's fields; `None` when its
/// socket is gone (then the connection ended here).
async fn reopen(
    woken: Box<(std::net::TcpStream, Dormant)>,
    shared: &Shared,
) -> Option<(Conn<'_, tokio::net::TcpStream>, Box<str>)> {
    let (socket, dormant) = *woken;
    if let Some(set) = &shared.dormant {
        set.forget(&socket);
    }
    // (A socket reset while dormant may no longer know its peer.)
    let peer: Box<str> = socket
        .peer_addr()
        .map_or_else(|_| "unknown".into(), |addr| addr.to_string().into());
    let span = tracing::Span::current();
    span.record("peer", tracing::field::display(&peer));
    span.record(
        "client_id",
        tracing::field::display(&dormant.engine.state.client_id),
    );
    match tokio::net::TcpStream::from_std(socket) {
        Ok(stream) => Some((Conn::from_dormant(shared, stream, dormant), peer)),
        Err(e) => {
            lost(shared, dormant, e, &peer).await;
            None
        }
    }
}

/// A dormant connection whose socket went with an error `e` (tokio could
/// not take it, or not give it back) ends as if its stream failed:
/// nothing more is written, the rest of its end is as usual.
async fn lost(shared: &Shared, dormant: Dormant, e: std::io::Error, peer: &str) {
    let gone = tokio::io::join(tokio::io::empty(), tokio::io::sink());
    let conn = Conn::from_dormant(shared, gone, dormant);
    close_connection(conn, Close::Io(e), peer).await;
}

impl<'a, S: AsyncRead + AsyncWrite + Unpin + 'static> Conn<'a, S> {
    /// Whether a connection over `S` may go dormant: with `[limits]
    /// dormant_connections` on, plain TCP only (a TLS or WebSocket stream
    /// keeps state above the socket), and only when the broker has its
    /// dormant set. Asked once, when it is accepted (its keep-alive watch
    /// keeps the answer).
    pub(super) fn may_sleep(shared: &Shared) -> bool {
        TypeId::of::<S>() == TypeId::of::<tokio::net::TcpStream>()
            && shared.dormant.is_some()
            && shared.config().limits.dormant_connections
    }

    /// What follows `run`: the close (a future to await) when it ended,
    /// or going dormant.
    pub(super) fn after_run(
        self,
        outcome: Option<Close>,
        peer: &'a str,
    ) -> Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>>
    where
        S: Send,
    {
        match outcome {
            Some(close) => Some(Box::pin(close_connection(self, close, peer))),
            None => {
                self.sleep(peer);
                None
            }
        }
    }

    /// Goes dormant (its wait said so: it is idle, and may sleep): the
    /// socket is taken from tokio and the rest kept in the dormant set.
    /// The task ends here; [`wake`] serves the connection on.
    pub(super) fn sleep(mut self, peer: &str) {
        // (Its buffers go with `io`; the engine's are let go here.)
        self.engine.trim();
        let shared = self.shared;
        let Conn {
            io,
            engine,
            control,
            extras,
            keep_alive,
            in_process,
            trusted,
            admission,
            ..
        } = self;
        let dormant = Dormant {
            engine,
            control,
            extras,
            keep_alive,
            admission,
            in_process,
            trusted,
        };
        let set = shared.dormant.as_ref().expect("may_sleep");
        let mut stream = Some(io.stream);
        let tcp = (&mut stream as &mut dyn Any)
            .downcast_mut::<Option<tokio::net::TcpStream>>()
            .and_then(Option::take)
            .expect("may_sleep: a TCP stream");
        let outbox = dormant.engine.state.outbox.clone();
        // The broker for a new task, when one is needed (`None` only once
        // the broker is gone).
        let this = || shared.this.upgrade();
        match tcp.into_std() {
            // Given back: woken while going to sleep, or not watched.
            Ok(socket) => {
                if let Err((socket, dormant)) = set.sleep(socket, dormant, outbox.doorbell())
                    && let Some(arc) = this()
                {
                    wake(socket, dormant, &arc);
                }
            }
            // (tokio could not let go of it)
            Err(e) => {
                if let Some(arc) = this() {
                    let peer = peer.to_owned();
                    tokio::spawn(async move { lost(&arc, dormant, e, &peer).await });
                }
            }
        }
    }

    /// The connection again, over `stream`, from what it kept while
    /// dormant.
    fn from_dormant(shared: &'a Shared, stream: S, mut dormant: Dormant) -> Self {
        // Woken: it goes dormant again only after a quiet check finds it
        // quiet (its socket's readiness may reach tokio only after its first
        // read was tried: going back to sleep on that would wake it again
        // at once, and again).
        dormant.keep_alive.woken();
        Conn {
            shared,
            io: Io::new(stream),
            engine: dormant.engine,
            control: dormant.control,
            extras: dormant.extras,
            keep_alive: dormant.keep_alive,
            routes: None,
            durable: shared.store.durable(),
            parked: None,
            in_process: dormant.in_process,
            trusted: dormant.trusted,
            admission: dormant.admission,
        }
    }
}
