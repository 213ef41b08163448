//! An idle plain-TCP connection giving up its task (`Conn::sleep`): what
//! it keeps while dormant ([`Dormant`]), and the new task that serves it
//! on when it wakes ([`wake`]). When it sleeps is `dormant::rest`'s to
//! say; the set that holds it is `dormant.rs`.

use std::any::{Any, TypeId};
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
/// `connection{peer, client_id}`, as before it slept.
pub(crate) fn wake(socket: std::net::TcpStream, dormant: Dormant, shared: &Arc<Shared>) {
    use tracing::Instrument;
    // (A socket reset while dormant may no longer know its peer.)
    let peer: Box<str> = socket
        .peer_addr()
        .map_or_else(|_| "unknown".into(), |addr| addr.to_string().into());
    let span = tracing::info_span!(
        "connection",
        peer = %peer,
        client_id = %dormant.engine.state.client_id
    );
    let shared = shared.clone();
    tokio::spawn(
        async move {
            match tokio::net::TcpStream::from_std(socket) {
                Ok(stream) => {
                    let mut conn = Conn::from_dormant(&shared, stream, dormant);
                    match conn.run().await {
                        Some(close) => Box::pin(close_connection(conn, close, &peer)).await,
                        None => conn.sleep(&peer),
                    }
                }
                Err(e) => Box::pin(lost(&shared, dormant, e, &peer)).await,
            }
        }
        .instrument(span),
    );
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
    /// Whether a connection over `S` may go dormant: plain TCP only (a TLS
    /// or WebSocket stream keeps state above the socket), and only when
    /// the broker has its dormant set.
    pub(super) fn may_sleep(shared: &Shared) -> bool {
        TypeId::of::<S>() == TypeId::of::<tokio::net::TcpStream>() && shared.dormant.is_some()
    }

    /// Goes dormant (its wait said so: it is idle, and `may_sleep`): the
    /// socket is taken from tokio and the rest kept in the dormant set.
    /// The task ends here; [`wake`] serves the connection on.
    pub(super) fn sleep(self, peer: &str) {
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
        let Some(arc) = shared.this.upgrade() else {
            return;
        };
        match tcp.into_std() {
            Ok(socket) => {
                if let Err((socket, dormant)) = set.sleep(socket, dormant, outbox.doorbell()) {
                    wake(socket, dormant, &arc);
                }
            }
            // (tokio could not let go of it)
            Err(e) => {
                let peer = peer.to_owned();
                tokio::spawn(async move { lost(&arc, dormant, e, &peer).await });
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
        dormant.keep_alive.stir();
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
