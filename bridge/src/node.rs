//! [`Node`]: the broker and its bridges, started and stopped together;
//! what the `ferrymq` command runs, and what gateway firmware embeds.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferrymq_broker::{Broker, BrokerHandle, ClientError, Reload, ReloadOutcome, StartError};
use ferrymq_config::Config;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

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

/// A file `data_dir/delete-bridge-queues.{bridge}` asks the running node
/// to delete the queues (backlog, live lane, dead letters) that a bridge
/// no longer configured left behind (`ferrymq queue delete-bridge`); it
/// is removed once done. Also honoured at start.
pub const DELETE_REQUEST_PREFIX: &str = "delete-bridge-queues.";

/// Asks the node running on `data_dir` to delete the queues of bridge
/// `name`, which must no longer be configured (within a second, or at its
/// next start).
pub fn request_delete(data_dir: &Path, name: &str) -> std::io::Result<PathBuf> {
    request(data_dir, DELETE_REQUEST_PREFIX, name)
}

/// Writes the request file `data_dir/{prefix}{name}`.
fn request(data_dir: &Path, prefix: &str, name: &str) -> std::io::Result<PathBuf> {
    let path = data_dir.join(format!("{prefix}{name}"));
    std::fs::write(&path, b"")?;
    Ok(path)
}

/// Asks the node running on `data_dir` to replay the dead letters of
/// bridge `name` (within a second, or at its next start).
pub fn request_replay(data_dir: &Path, name: &str) -> std::io::Result<PathBuf> {
    request(data_dir, REPLAY_REQUEST_PREFIX, name)
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
    ops: Option<crate::ops::Running>,
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
        let mut node = Node {
            broker,
            bridges,
            stop_tx: watch::channel(false).0,
            writer: None,
            ops: None,
        };
        if let Err((bind, source)) = node.start_watchers().await {
            for b in node.bridges.drain(..) {
                b.stop().await;
            }
            node.broker.shutdown().await;
            return Err(NodeError::Metrics { bind, source });
        }
        Ok(node)
    }

    /// Starts the status file writer and the operations tasks (metrics,
    /// status page, `$SYS`) for the bridges running now.
    async fn start_watchers(&mut self) -> Result<(), (std::net::SocketAddr, std::io::Error)> {
        let handle = self.broker.handle();
        let (stop_tx, stop_rx) = watch::channel(false);
        let monitors: Vec<BridgeMonitor> = self.bridges.iter().map(|b| b.monitor()).collect();
        self.ops =
            Some(crate::ops::start(handle.clone(), monitors.clone(), stop_rx.clone()).await?);
        self.writer = Some(tokio::spawn(write_status(monitors, handle, stop_rx)));
        self.stop_tx = stop_tx;
        Ok(())
    }

    /// Stops what [`Node::start_watchers`] started.
    async fn stop_watchers(&mut self) {
        let _ = self.stop_tx.send(true);
        if let Some(writer) = self.writer.take() {
            let _ = writer.await;
        }
        if let Some(ops) = self.ops.take() {
            ops.join().await;
        }
    }

    /// Puts `config` in force without a restart (what SIGHUP does to the
    /// `ferrymq` process): everything [`Broker::apply`] does, plus the
    /// bridges (a removed one stops, its queue kept on disk and taking
    /// nothing more; an added one starts; a changed one restarts with its
    /// new settings, its queue intact) and `[metrics]`. Bridges whose
    /// settings did not change keep their link. A config that does not
    /// validate is refused as a whole and nothing changes. A change of
    /// bridges or of `[metrics]` restarts the metrics port and the status
    /// page (whose plots start again).
    pub async fn reload(&mut self, config: Config) -> Reload {
        let handle = self.broker.handle();
        let old = handle.config();
        let plan = match handle.plan(config) {
            Ok(plan) => plan,
            Err(refused) => return refused,
        };
        let restart_watchers = plan.config().metrics != old.metrics
            || !plan.changed_bridges.is_empty()
            || !plan.removed_bridges.is_empty();
        if restart_watchers {
            self.stop_watchers().await;
        }
        let (stop, keep): (Vec<BridgeHandle>, Vec<BridgeHandle>) =
            std::mem::take(&mut self.bridges)
                .into_iter()
                .partition(|b| {
                    let name = b.name().to_owned();
                    plan.changed_bridges.contains(&name) || plan.removed_bridges.contains(&name)
                });
        self.bridges = keep;
        for bridge in stop {
            info!(bridge = %bridge.name(), "reload: stopping the bridge");
            bridge.stop().await;
        }
        let changed = plan.changed_bridges.clone();
        let mut report = handle.apply_plan(plan).await;
        let now = handle.config();
        for config in now.bridges.iter().filter(|b| changed.contains(&b.name)) {
            let name = config.name.clone();
            match link::start(handle.clone(), config.clone()).await {
                Ok(bridge) => {
                    info!(bridge = %name, "reload: bridge started");
                    self.bridges.push(bridge);
                }
                Err(e) => {
                    warn!(bridge = %name, "reload: the bridge cannot start: {e}");
                    report.parts.push((
                        format!("bridge {name}"),
                        ReloadOutcome::Refused(format!("bridge {name}: {e}")),
                    ));
                }
            }
        }
        // In the order of the config.
        self.bridges
            .sort_by_key(|b| now.bridges.iter().position(|c| c.name == b.name()));
        if restart_watchers && let Err((bind, e)) = self.start_watchers().await {
            warn!("reload: metrics.bind: cannot listen on {bind}: {e}");
            report.parts.push((
                "metrics.bind".into(),
                ReloadOutcome::Refused(format!("metrics.bind: cannot listen on {bind}: {e}")),
            ));
        }
        report
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
    pub async fn shutdown(mut self) {
        self.stop_watchers().await;
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

/// Rewrites the status file every second when there are bridges (write,
/// then rename: a reader never sees half a file), and carries out the
/// requests left in the data directory.
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
        delete_requested(&broker, &data_dir).await;
        if monitors.is_empty() {
            continue;
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

/// Deletes the queues of each bridge named by a delete request in
/// `data_dir`, unless it is configured (then the request is refused in the
/// log): each of its sessions is taken over with a clean start, which
/// drops the session and everything it queued, in memory and on disk.
async fn delete_requested(broker: &BrokerHandle, data_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return;
    };
    let names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix(DELETE_REQUEST_PREFIX)
                .map(str::to_owned)
        })
        .collect();
    for name in names {
        let _ = std::fs::remove_file(data_dir.join(format!("{DELETE_REQUEST_PREFIX}{name}")));
        if broker.config().bridges.iter().any(|b| b.name == name) {
            warn!(bridge = %name, "not deleting the queues of a configured bridge: remove it from the config and reload first");
            continue;
        }
        let ids = [
            ferrymq_broker::bridge_client_id(&name),
            ferrymq_broker::bridge_live_client_id(&name),
            crate::link::dead_letter_client_id(&name),
        ];
        let mut deleted = 0;
        for id in ids {
            let Some(depth) = broker.queue_depth(&id) else {
                continue;
            };
            match broker
                .connect(ferrymq_broker::ClientOptions::new(&id))
                .await
            {
                Ok(client) => {
                    client.disconnect().await;
                    deleted += depth.messages;
                }
                Err(e) => warn!(bridge = %name, client_id = %id, "cannot delete the queue: {e}"),
            }
        }
        info!(bridge = %name, messages = deleted, "deleted the queues of a removed bridge");
    }
}

/// The status a running node wrote in `data_dir`.
pub fn read_status(data_dir: &Path) -> std::io::Result<String> {
    std::fs::read_to_string(data_dir.join(STATUS_FILE))
}
