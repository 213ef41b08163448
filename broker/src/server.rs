//! Listeners: bind each `[[listener]]`, accept connections within
//! `max_connections`, and hand each one to its own task.

use std::sync::Arc;
use std::time::Duration;

use ferrymq_config::Listener;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::stats::Stats;
use crate::{Shared, StartError};

/// Binds every configured listener. Nothing is accepted until
/// [`accept_loop`] runs, so a failure here leaves nothing half-started.
pub(crate) fn bind(listeners: &[Listener]) -> Result<Vec<TcpListener>, StartError> {
    let mut bound = Vec::with_capacity(listeners.len());
    for (index, l) in listeners.iter().enumerate() {
        let backlog = l.backlog.unwrap_or_else(system_backlog);
        let socket = listen(l.bind, backlog).map_err(|source| StartError::Bind {
            key: format!("listener[{index}].bind"),
            addr: l.bind,
            source,
        })?;
        bound.push(socket);
    }
    Ok(bound)
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

/// Accepts connections until shutdown. Each connection holds a permit of
/// `connections` for its whole life; when none is left, new connections
/// are closed at once (and counted) instead of waiting in the backlog.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    connections: Arc<Semaphore>,
) {
    let mut shutdown = shared.shutdown_rx.clone();
    let mut backoff = Duration::from_millis(5);
    if let Ok(addr) = listener.local_addr() {
        info!("listening on {addr} (tcp)");
    }
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
        Stats::add(&shared.stats.connections_accepted, 1);
        // Small MQTT packets must not wait for Nagle's algorithm.
        if let Err(e) = stream.set_nodelay(true) {
            warn!(%peer, "could not set TCP_NODELAY: {e}");
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            let (reader, writer) = stream.into_split();
            crate::connection::serve(
                reader,
                writer,
                peer.to_string(),
                shared,
                crate::connection::ServeOptions {
                    peer: Some(peer.ip()),
                    ..crate::connection::ServeOptions::default()
                },
            )
            .await;
            drop(permit);
        });
    }
}
