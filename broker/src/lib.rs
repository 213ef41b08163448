//! ferrymq-broker: the MQTT broker as a library.
//!
//! [`Broker::start`] binds the configured listeners and serves clients
//! until [`Broker::shutdown`]; [`run`] does both around a shutdown future
//! (what the `ferrymq` binary calls).
//!
//! ```no_run
//! # async fn example() -> Result<(), ferrymq_broker::StartError> {
//! let mut config = ferrymq_config::Config::default();
//! config.listeners[0].bind = "127.0.0.1:0".parse().expect("address");
//! let broker = ferrymq_broker::Broker::start(config).await?;
//! println!("MQTT on {}", broker.local_addrs()[0]);
//! broker.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Module map: `connection` (one task per client: socket I/O and the
//! protocol), `router` (the topic tree), `outbox` (per-session bounded
//! queues), `registry` (client id -> connection, for takeover), `server`
//! (listeners), `data_dir` (the locked data directory). The packet codec
//! is its own crate, `ferrymq-codec`.

mod connection;
mod data_dir;
mod message;
mod outbox;
mod registry;
mod router;
mod server;
mod stats;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ferrymq_config::{Config, ConfigErrors};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

pub use data_dir::DataDir;
pub use message::{Message, SessionId};
pub use stats::Stats;

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error("invalid configuration:\n{0}")]
    Config(#[from] ConfigErrors),
    /// A listener could not bind its address.
    #[error("{key}: cannot listen on {addr}: {source}")]
    Bind {
        /// The TOML key of the listener.
        key: String,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The data directory cannot be created or opened.
    #[error("data_dir: cannot use {}: {source}", path.display())]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Another process holds the data directory.
    #[error("data_dir: {} is in use by another ferrymq process", .0.display())]
    DataDirInUse(PathBuf),
}

/// What every connection task shares.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) router: router::Router,
    pub(crate) registry: registry::Registry,
    pub(crate) stats: Stats,
    /// Source of connection and session numbers (never reused).
    next_connection: AtomicU64,
    /// Distinguishes this run in assigned client identifiers.
    pub(crate) boot_id: u64,
    /// Becomes `true` when the broker stops; every task watches it.
    pub(crate) shutdown_rx: watch::Receiver<bool>,
    /// Rate limit for "subscriber queue full" warnings.
    pub(crate) drop_log: stats::LogLimiter,
    /// Rate limit for "max_connections reached" warnings.
    pub(crate) refuse_log: stats::LogLimiter,
}

impl Shared {
    pub(crate) fn next_connection(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }
}

/// How long [`Broker::shutdown`] waits for connections to close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A running broker.
pub struct Broker {
    shared: Arc<Shared>,
    /// Tells every task to stop.
    shutdown_tx: watch::Sender<bool>,
    /// One permit per open connection; all permits back = all closed.
    connections: Arc<Semaphore>,
    accept_tasks: Vec<JoinHandle<()>>,
    local_addrs: Vec<SocketAddr>,
    /// Held (locked) while the broker runs.
    _data_dir: DataDir,
}

impl Broker {
    /// Validates `config`, locks the data directory, binds every listener
    /// and starts accepting. Must be called inside a tokio runtime.
    pub async fn start(config: Config) -> Result<Broker, StartError> {
        config.validate()?;
        let data_dir = DataDir::open(&config.data_dir)?;
        let listeners = server::bind(&config.listeners).await?;
        let local_addrs = listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect();
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let max_connections = config.limits.max_connections as usize;
        info!(node_id = %config.node_id, data_dir = %data_dir.path().display(), "ferrymq starting");
        let boot_id = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let shared = Arc::new(Shared {
            config,
            router: router::Router::default(),
            registry: registry::Registry::default(),
            stats: Stats::default(),
            next_connection: AtomicU64::new(1),
            boot_id,
            shutdown_rx,
            drop_log: stats::LogLimiter::new(Duration::from_secs(10)),
            refuse_log: stats::LogLimiter::new(Duration::from_secs(10)),
        });
        let connections = Arc::new(Semaphore::new(max_connections));
        let accept_tasks = listeners
            .into_iter()
            .map(|l| tokio::spawn(server::accept_loop(l, shared.clone(), connections.clone())))
            .collect();
        Ok(Broker {
            shared,
            shutdown_tx,
            connections,
            accept_tasks,
            local_addrs,
            _data_dir: data_dir,
        })
    }

    /// The bound address of each listener, in config order (useful with port 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// The broker's counters.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Stops accepting, tells every client (MQTT 5.0: DISCONNECT 0x8B
    /// Server shutting down), and waits until every connection has closed.
    pub async fn shutdown(self) {
        info!("shutting down");
        self.shutdown_tx.send_replace(true);
        for task in self.accept_tasks {
            let _ = task.await;
        }
        let all = self.shared.config.limits.max_connections;
        match tokio::time::timeout(SHUTDOWN_GRACE, self.connections.acquire_many(all)).await {
            Ok(_) => info!("all connections closed"),
            Err(_) => warn!("connections still open after {SHUTDOWN_GRACE:?}; stopping anyway"),
        }
    }
}

/// Runs a broker until `shutdown` completes, then stops it gracefully.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let broker = Broker::start(config).await?;
    shutdown.await;
    broker.shutdown().await;
    Ok(())
}
