//! A TCP proxy on 127.0.0.1 that can blackhole its connections: after
//! [`Proxy::blackhole`] it keeps every socket open but forwards nothing in
//! either direction (what it reads is dropped), like a link whose packets
//! vanish in the network. Only a keepalive can notice that.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// The proxy; its tasks stop (and its sockets close) on drop.
pub struct Proxy {
    addr: SocketAddr,
    /// Set: forward nothing any more.
    blackholed: Arc<AtomicBool>,
    /// The accept loop; it owns the pipes (a `JoinSet`, aborted with it).
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards each connection to
    /// `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let blackholed = Arc::new(AtomicBool::new(false));
        let accept = tokio::spawn({
            let blackholed = blackholed.clone();
            async move {
                let mut pipes = JoinSet::new();
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (client_rx, client_tx) = client.into_split();
                    let (server_rx, server_tx) = server.into_split();
                    pipes.spawn(pipe(client_rx, server_tx, blackholed.clone()));
                    pipes.spawn(pipe(server_rx, client_tx, blackholed.clone()));
                }
            }
        });
        Proxy {
            addr,
            blackholed,
            accept,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// From now on forward nothing, close nothing.
    pub fn blackhole(&self) {
        self.blackholed.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies `from` to `to` until EOF (then shuts `to` down), or, once
/// blackholed, reads and drops everything and keeps both sockets open
/// even after EOF.
async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, blackholed: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await.unwrap_or(0);
        if blackholed.load(Ordering::SeqCst) {
            if n == 0 {
                // Dropping `to` would send FIN: hold it until the proxy goes.
                std::future::pending::<()>().await;
            }
            continue;
        }
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            let _ = to.shutdown().await;
            return;
        }
    }
}
