//! [`Node`]: the broker and its bridges, started and stopped together;
//! what the `ferrymq` command runs, and what gateway firmware embeds.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferrymq_broker::{Broker, BrokerHandle, ClientError, StartError};
use ferrymq_config::Config;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::link::{self, BridgeHandle, BridgeMonitor};
use crate::status::BridgeStatus;

/// The file in `data_dir` where a running node writes its bridges' status
/// every second, for `ferrymq bridge status`.
pub const STATUS_FILE: &str = "bridge-status.txt";

/// How often the status file is rewritten (and replay requests looked for).
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// A file `data_dir/replay-dead-letters.{bridge}` asks the running node to
/// replay that bridge's dead letters (`ferrymq queue replay-dead`); it is
/// removed once the replay starts. Also honoured at start.
pub const REPLAY_REQUEST_PREFIX: &str = "replay-dead-letters.";

/// Asks the node running on `data_dir` to replay the dead letters of
/// bridge `name` (within a second, or at its next start).
pub fn request_replay(data_dir: &Path, name: &str) -> std::io::Result<PathBuf> {
    let path = data_dir.join(format!("{REPLAY_REQUEST_PREFIX}{name}"));
    std::fs::write(&path, b"")?;
    Ok(path)
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The broker could not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The metrics port (`[metrics] bind`) could not be bound.
    #[error("metrics.bind: cannot listen on {bind}: {source}")]
    Metrics {
        /// The address.
        bind: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A bridge could not attach to the broker.
    #[error("bridge {name}: {source}")]
    Bridge {
        /// The bridge.
        name: String,
        /// Why.
        source: ClientError,
    },
}

/// A running broker with its bridges.
pub struct Node {
    broker: Broker,
    bridges: Vec<BridgeHandle>,
    /// Stops the status writer and the operations tasks.
    stop_tx: watch::Sender<bool>,
    writer: Option<JoinHandle<()>>,
    ops: crate::ops::Running,
}

impl Node {
    /// Starts the broker of `config` (state in `data_dir`), then every
    /// `[[bridge]]`.
    pub async fn start(config: Config) -> Result<Node, NodeError> {
        let broker = Broker::start(config).await?;
        Node::with_broker(broker).await
    }

    /// Starts the bridges of an already started broker (one built with a
    /// custom store or authentication methods).
    pub async fn with_broker(broker: Broker) -> Result<Node, NodeError> {
        let handle = broker.handle();
        let mut bridges = Vec::new();
        for config in handle.config().bridges.clone() {
            let name = config.name.clone();
            match link::start(handle.clone(), config).await {
                Ok(bridge) => bridges.push(bridge),
                Err(source) => {
                    for b in bridges {
                        b.stop().await;
                    }
                    broker.shutdown().await;
                    return Err(NodeError::Bridge { name, source });
                }
            }
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let monitors: Vec<BridgeMonitor> = bridges.iter().map(|b| b.monitor()).collect();
        let ops = match crate::ops::start(handle.clone(), monitors.clone(), stop_rx.clone()).await {
            Ok(ops) => ops,
            Err((bind, source)) => {
                for b in bridges {
                    b.stop().await;
                }
                broker.shutdown().await;
                return Err(NodeError::Metrics { bind, source });
            }
        };
        let writer = (!bridges.is_empty())
            .then(|| tokio::spawn(write_status(monitors, handle.clone(), stop_rx)));
        Ok(Node {
            broker,
            bridges,
            stop_tx,
            writer,
            ops,
        })
    }

    /// The broker (in-process clients, stats, the store).
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// Every bridge's status, in config order.
    pub fn bridges(&self) -> Vec<BridgeStatus> {
        self.bridges.iter().map(BridgeHandle::status).collect()
    }

    /// Stops the bridges (what is not acknowledged upstream stays queued),
    /// then the broker.
    pub async fn shutdown(self) {
        let _ = self.stop_tx.send(true);
        if let Some(writer) = self.writer {
            let _ = writer.await;
        }
        self.ops.join().await;
        for bridge in self.bridges {
            bridge.stop().await;
        }
        self.broker.shutdown().await;
    }
}

/// Runs a node until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), NodeError> {
    let node = Node::start(config).await?;
    shutdown.await;
    node.shutdown().await;
    Ok(())
}

/// Rewrites the status file every second (write, then rename: a reader
/// never sees half a file).
async fn write_status(
    monitors: Vec<BridgeMonitor>,
    broker: BrokerHandle,
    mut stop_rx: watch::Receiver<bool>,
) {
    let data_dir = broker.config().data_dir.clone();
    let path = data_dir.join(STATUS_FILE);
    let mut tick = tokio::time::interval(STATUS_EVERY);
    let mut warned = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            // Cancel-safe: nothing is in progress between ticks.
            () = crate::link::stopped(&mut stop_rx) => break,
        }
        for monitor in &monitors {
            let name = monitor.name().to_owned();
            let request = data_dir.join(format!("{REPLAY_REQUEST_PREFIX}{name}"));
            if std::fs::remove_file(&request).is_ok() {
                let broker = broker.clone();
                tokio::spawn(async move {
                    if let Err(e) = crate::link::replay_dead_letters(&broker, &name).await {
                        warn!(bridge = %name, "replaying dead letters failed: {e}");
                    }
                });
            }
        }
        let text: String = monitors.iter().map(|m| m.status().to_string()).collect();
        let tmp = path.with_extension("tmp");
        let written = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written
            && !warned
        {
            warn!(path = %path.display(), "cannot write the bridge status file: {e}");
            warned = true;
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// The status a running node wrote in `data_dir`.
pub fn read_status(data_dir: &Path) -> std::io::Result<String> {
    std::fs::read_to_string(data_dir.join(STATUS_FILE))
}
