//! Listeners: bind each `[[listener]]`, accept connections within
//! `max_connections`, and hand each one to its own task.

use std::sync::Arc;
use std::time::Duration;

use ferrymq_config::{Listener, ListenerTls};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::connection::{Admission, ServeOptions, serve};

use crate::stats::Stats;
use crate::{Shared, StartError};

/// Binds every configured listener. Nothing is accepted until
/// [`accept_loop`] runs, so a failure here leaves nothing half-started.
pub(crate) fn bind(listeners: &[Listener]) -> Result<Vec<TcpListener>, StartError> {
    listeners
        .iter()
        .enumerate()
        .map(|(index, l)| bind_one(index, l))
        .collect()
}

/// Binds `[[listener]]` number `index`; a failure names its key.
pub(crate) fn bind_one(index: usize, l: &Listener) -> Result<TcpListener, StartError> {
    let backlog = l.backlog.unwrap_or_else(system_backlog);
    listen(l.bind, backlog).map_err(|source| StartError::Bind {
        key: format!("listener[{index}].bind"),
        addr: l.bind,
        source,
    })
}

/// Binds `addr` and listens with a queue of `backlog` connections (the
/// kernel caps it at `net.core.somaxconn`). Address reuse as tokio's own
/// `bind` sets it, so a restarted broker can bind while old connections
/// linger in TIME_WAIT.
fn listen(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// The system's largest listen backlog: `net.core.somaxconn`, or 4096
/// (Linux's default since 5.4) where it cannot be read.
fn system_backlog() -> u32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&v: &u32| v > 0)
        .unwrap_or(4096)
}

/// Logs where `listener` (configured as `config`) listens. Called in the
/// order of the config just before the accept loops start, not by each
/// loop (tasks start in any order): tools and tests read these lines.
fn announce(listener: &TcpListener, config: &Listener) {
    if let Ok(addr) = listener.local_addr() {
        match &config.path {
            Some(path) => info!("listening on {addr} ({}, path {path})", config.protocol),
            None => info!("listening on {addr} ({})", config.protocol),
        }
    }
}

/// A listener that accepts: its config, its TLS settings (a reload
/// replaces them for new connections) and its accept loop. Dropping it
/// stops accepting (connections it accepted stay up).
pub(crate) struct Running {
    pub(crate) config: Listener,
    pub(crate) addr: std::net::SocketAddr,
    pub(crate) tls: Arc<parking_lot::RwLock<Option<Tls>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Announces `listener` and starts its accept loop.
    pub(crate) fn start(
        listener: TcpListener,
        config: Listener,
        tls: Option<Tls>,
        shared: Arc<Shared>,
        connections: Arc<Semaphore>,
    ) -> Running {
        announce(&listener, &config);
        let addr = listener.local_addr().unwrap_or(config.bind);
        let tls = Arc::new(parking_lot::RwLock::new(tls));
        let task = tokio::spawn(accept_loop(
            listener,
            config.clone(),
            tls.clone(),
            shared,
            connections,
        ));
        Running {
            config,
            addr,
            tls,
            task,
        }
    }

    /// Stops accepting and closes the listening socket (before returning,
    /// so its address can be bound again).
    pub(crate) async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Accepts connections for one listener until shutdown or until it is
/// stopped. Each connection holds a permit of `connections` for its whole
/// life; when none is left, new connections are closed at once (and
/// counted) instead of waiting in the backlog.
async fn accept_loop(
    listener: TcpListener,
    config: Listener,
    tls_slot: Arc<parking_lot::RwLock<Option<Tls>>>,
    shared: Arc<Shared>,
    connections: Arc<Semaphore>,
) {
    let protocol = config.protocol;
    let path: Option<Arc<str>> = config.path.as_deref().map(Arc::from);
    let mut shutdown = shared.shutdown_rx.clone();
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            // Cancelling accept() is safe: a connection not yet accepted
            // stays in the kernel's backlog and is closed with the listener.
            r = listener.accept() => r,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => {
                backoff = Duration::from_millis(5);
                pair
            }
            Err(e) => {
                // Typically out of file descriptors: wait instead of spinning.
                warn!("accept failed: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            Stats::add(&shared.stats.connections_refused, 1);
            if shared.refuse_log.allow() {
                warn!(%peer, "max_connections reached: closing new connections");
            }
            drop(stream);
            continue;
        };
        let Some(per_address) = PerAddress::take(&shared, peer.ip()) else {
            Stats::add(&shared.stats.connections_refused, 1);
            if shared.refuse_log.allow() {
                warn!(%peer, "max_connections_per_address reached: closing new connections from it");
            }
            drop(stream);
            continue;
        };
        Stats::add(&shared.stats.connections_accepted, 1);
        // Small MQTT packets must not wait for Nagle's algorithm.
        if let Err(e) = stream.set_nodelay(true) {
            warn!(%peer, "could not set TCP_NODELAY: {e}");
        }
        // The certificates in force now: a reload changes them for new
        // connections only.
        let tls = if protocol.is_tls() {
            tls_slot.read().clone()
        } else {
            None
        };
        let shared = shared.clone();
        let options = ServeOptions {
            peer: Some(peer.ip()),
            ..ServeOptions::default()
        };
        if tls.is_none() && path.is_none() {
            // The task is the connection's future, nothing else: what a
            // task holds, it holds for the connection's life. The admission
            // goes with the connection (which may outlive this task,
            // dormant).
            let admission = Admission {
                _permit: permit,
                _per_address: per_address.map(|p| Box::new(p) as Box<dyn Send + Sync>),
            };
            tokio::spawn(serve(
                stream,
                peer.to_string(),
                shared,
                options,
                Some(admission),
            ));
        } else {
            let path = path.clone();
            tokio::spawn(async move {
                // Boxed: TLS and WebSocket state is large.
                Box::pin(serve_layered(stream, peer, tls, path, shared, options)).await;
                drop(per_address);
                drop(permit);
            });
        }
    }
}

/// One connection counted against its source address's share
/// (`max_connections_per_address`); given back when dropped.
struct PerAddress {
    shared: Arc<Shared>,
    ip: std::net::IpAddr,
}

impl PerAddress {
    /// Counts a new connection from `ip`; `None` when the address is at
    /// its limit. With no limit nothing is counted.
    fn take(shared: &Arc<Shared>, ip: std::net::IpAddr) -> Option<Option<PerAddress>> {
        let limit = shared.config().limits.max_connections_per_address;
        if limit == 0 {
            return Some(None);
        }
        let mut open = shared.per_address.lock();
        let count = open.entry(ip).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(Some(PerAddress {
            shared: shared.clone(),
            ip,
        }))
    }
}

impl Drop for PerAddress {
    fn drop(&mut self) {
        let mut open = self.shared.per_address.lock();
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Serves a connection of a `tls`, `ws` or `wss` listener: the TLS
/// handshake if there is one, then the WebSocket upgrade if there is one,
/// then the MQTT session.
async fn serve_layered(
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    tls: Option<Tls>,
    path: Option<Arc<str>>,
    shared: Arc<Shared>,
    mut options: ServeOptions,
) {
    let Some(tls) = tls else {
        match path {
            Some(path) => serve_websocket(stream, peer, &path, shared, options).await,
            None => serve(stream, peer.to_string(), shared, options, None).await,
        }
        return;
    };
    let Some(stream) = tls_handshake(stream, peer, &tls, &shared, &mut options).await else {
        return;
    };
    match path {
        Some(path) => serve_websocket(stream, peer, &path, shared, options).await,
        None => serve(stream, peer.to_string(), shared, options, None).await,
    }
}

/// Runs the TLS handshake (bounded like the wait for CONNECT) and notes
/// the client certificate's identity in `options`.
async fn tls_handshake(
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    tls: &Tls,
    shared: &Shared,
    options: &mut ServeOptions,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    let limit = shared.config().limits.connect_timeout;
    let stream = match tokio::time::timeout(limit, tls.acceptor.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            Stats::add(&shared.stats.tls_handshakes_failed, 1);
            debug!(%peer, "TLS handshake failed: {e}");
            return None;
        }
        Err(_) => {
            Stats::add(&shared.stats.tls_handshakes_failed, 1);
            debug!(%peer, "no TLS handshake within connect_timeout_secs");
            return None;
        }
    };
    options.identity = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|cert| crate::tls::identity(cert, tls.identity_from))
        .map(String::into_boxed_str);
    options.identity_is_user = tls.identity_is_user;
    Some(stream)
}

/// Runs the WebSocket upgrade for `path` (bounded like the wait for
/// CONNECT), then serves the MQTT session over its messages.
async fn serve_websocket<S>(
    stream: S,
    peer: std::net::SocketAddr,
    path: &str,
    shared: Arc<Shared>,
    options: ServeOptions,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let limit = shared.config().limits.connect_timeout;
    let max_packet = shared.config().limits.max_packet_size;
    let upgrade = crate::websocket::accept(stream, path, max_packet);
    let (reader, writer) = match tokio::time::timeout(limit, upgrade).await {
        Ok(Ok(halves)) => halves,
        Ok(Err(e)) => {
            Stats::add(&shared.stats.websocket_upgrades_failed, 1);
            debug!(%peer, "WebSocket upgrade failed: {e}");
            return;
        }
        Err(_) => {
            Stats::add(&shared.stats.websocket_upgrades_failed, 1);
            debug!(%peer, "no WebSocket upgrade within connect_timeout_secs");
            return;
        }
    };
    let stream = tokio::io::join(reader, writer);
    serve(stream, peer.to_string(), shared, options, None).await;
}

/// A TLS listener's acceptor and settings.
#[derive(Clone)]
pub(crate) struct Tls {
    /// Runs the handshake with the listener's certificate and client CA.
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
    /// The client certificate's identity is its user name.
    pub(crate) identity_is_user: bool,
    /// Which name of a client certificate is its identity.
    pub(crate) identity_from: ferrymq_config::IdentityFrom,
    /// A hash of the files it was built from: a reload that finds the
    /// same keeps the acceptor (and says so).
    pub(crate) fingerprint: u64,
}

impl Tls {
    /// Builds the TLS settings of `[[listener]]` number `index` from its
    /// files; a problem is named by its key.
    pub(crate) fn build(index: usize, tls: &ListenerTls) -> Result<Tls, crate::tls::TlsError> {
        use std::hash::{Hash, Hasher};
        let config = crate::tls::server_config(index, tls)?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for path in [Some(&tls.cert), Some(&tls.key), tls.client_ca.as_ref()]
            .into_iter()
            .flatten()
        {
            std::fs::read(path).ok().hash(&mut hasher);
        }
        Ok(Tls {
            acceptor: tokio_rustls::TlsAcceptor::from(config),
            identity_is_user: tls.use_identity_as_username,
            identity_from: tls.identity_from,
            fingerprint: hasher.finish(),
        })
    }
}

/// The TLS settings of every listener (`None` for `tcp` and `ws`), built
/// from their files; a problem is named by its key.
pub(crate) fn tls_settings(
    listeners: &[Listener],
) -> Result<Vec<Option<Tls>>, crate::tls::TlsError> {
    listeners
        .iter()
        .enumerate()
        .map(|(index, l)| l.tls.as_ref().map(|tls| Tls::build(index, tls)).transpose())
        .collect()
}
