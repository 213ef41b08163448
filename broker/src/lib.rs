//! ferrymq-broker: the MQTT broker as a library.
//!
//! [`Broker::start`] binds the configured listeners and serves clients
//! until [`Broker::shutdown`]; [`run`] does both around a shutdown future
//! (what the `ferrymq` binary calls). [`Broker::start_with_store`] plugs in
//! the [`Store`] that keeps sessions, queues and retained messages, and
//! [`Broker::connect`] gives gateway firmware an MQTT client without a
//! socket.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use ferrymq_broker::{Broker, ClientOptions, QoS};
//!
//! let mut config = ferrymq_config::Config::default();
//! config.listeners[0].bind = "127.0.0.1:0".parse()?;
//! let broker = Broker::start(config).await?;
//! println!("MQTT on {}", broker.local_addrs()[0]);
//! let mut app = broker.connect(ClientOptions::new("firmware")).await?;
//! app.subscribe("cmd/#", QoS::AtLeastOnce).await?;
//! app.publish("state/boot", "ok", QoS::AtLeastOnce, true).await?;
//! broker.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Module map (every module):
//! - connections: `server` (listeners, accept), `tls` and `websocket`
//!   (layers under a listener), `connection` (one task per client: stream
//!   I/O, drives the engine; its parts `admit`, `inbound`,
//!   `subscriptions`, `outbound`, `close`, `stream`), `negotiate` (what a CONNECT gets, no I/O),
//!   `engine` (the per-connection protocol state machine, no I/O),
//!   `doorbell` (a connection's one wake source besides its socket),
//!   `dormant` (idle connections without a task, and when they sleep),
//!   `keepalive` (every connection's keep-alive deadline in one queue,
//!   served by one task), `rate` (`max_publish_rate`), `client` (the
//!   in-process client);
//! - who may do what: `auth` (enhanced authentication), `users` (the
//!   password file), `acl` (the ACL file), `reload` (SIGHUP),
//!   `reloadable` (a value a reload replaces), `shed` (load shedding);
//! - messages: `message`, `publish` (routing one message into outboxes,
//!   retained and the store), `router` (the topic tree), `level_tree`
//!   (what the router's and the retained set's trees share), `retained`,
//!   `replay` (a new subscription's retained messages, streamed),
//!   `shared_sub` (shared subscription groups), `subscribe` (the one place
//!   a subscription is attached), `outbox` (per-session
//!   bounded queues);
//! - sessions: `session` (state that outlives a connection, the registry,
//!   takeover), `lifecycle` (wills, the end of a session), `recovery`
//!   (start-up), `bridge_session` (each bridge's local session), `ferry`
//!   (ferry batches), `dedup` (receiver-side de-duplication), `state`
//!   (state topics, last writer wins);
//! - the process: `shared` (what every task of one broker shares),
//!   `storage` (the `Store` trait, RocksDB and in-memory stores),
//!   `data_dir`, `memory` (allocator policy), `stats` (counters);
//! - for tests, benchmarks and fuzzing only: `bench_support`, `fuzzing`,
//!   `deep_tests`, `idle_tests`.
//!
//! The packet codec is its own crate, `ferrymq-codec`.

mod acl;
pub mod auth;
// For benches/router.rs only; not a stable API.
#[doc(hidden)]
pub mod bench_support;
mod bridge_session;
mod client;
mod connection;
mod data_dir;
mod dedup;
#[cfg(test)]
mod deep_tests;
mod doorbell;
mod dormant;
mod engine;
pub mod ferry;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
#[cfg(test)]
mod idle_tests;
mod keepalive;
mod level_tree;
mod lifecycle;
pub mod memory;
mod message;
mod negotiate;
mod outbox;
mod publish;
mod rate;
mod recovery;
mod reload;
mod reloadable;
mod replay;
mod retained;
mod router;
mod server;
mod session;
mod shared;
mod shared_sub;
pub mod shed;
pub mod state;
mod stats;
pub mod storage;
mod subscribe;
mod tls;
pub mod users;
mod websocket;

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

pub use bridge_session::{BRIDGE_CLIENT_PREFIX, bridge_client_id, bridge_live_client_id};
pub use bridge_session::{DEAD_LETTER_PREFIX, REPLAY_PREFIX, is_reserved};
pub use client::{Client, ClientError, ClientOptions, PublishAck, Publisher, Received};
pub use data_dir::DataDir;
pub use dedup::DedupOrigin;
pub use ferrymq_codec::QoS;
pub use message::{MESSAGE_ID_PROPERTY, Message, MessageId, SessionId};
pub use outbox::QueueDepth;
pub use reload::{Reload, ReloadOutcome, ReloadPlan};
pub(crate) use shared::Shared;
pub use stats::Stats;
pub use storage::{DiskUse, MemoryStore, Store};
#[cfg(feature = "rocksdb")]
pub use storage::{RocksOptions, RocksStore, SyncSummary};

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
    /// The store could not be read.
    #[error("store: {0}")]
    Store(#[from] storage::StoreError),
    /// A TLS listener's certificate, key or CA file cannot be used.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The password file could not be read or parsed.
    #[error("auth.password_file: {}: {source}", path.display())]
    Users {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: users::UsersError,
    },
}

/// How long [`Broker::shutdown`] waits for connections to close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How often offline sessions are checked for expiry.
const EXPIRY_SWEEP: Duration = Duration::from_secs(1);

/// One session's queue ([`BrokerHandle::session_queues`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionQueue {
    /// Its client identifier.
    pub client_id: String,
    /// What its queue holds.
    pub depth: QueueDepth,
    /// Whether a connection holds the session.
    pub online: bool,
}

/// Every session's queue, summed, and the deepest ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionQueues {
    /// Sessions (online and offline).
    pub sessions: u64,
    /// Of those, held by a connection.
    pub online: u64,
    /// Messages queued in all of them.
    pub messages: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// The deepest queues, deepest first.
    pub top: Vec<SessionQueue>,
}

/// See [`Broker::handle`].
#[derive(Clone)]
pub struct BrokerHandle {
    shared: Arc<Shared>,
    /// The broker's connection permits (an in-process client takes one).
    connections: Arc<Semaphore>,
}

impl BrokerHandle {
    /// Connects an in-process client ([`Broker::connect`]).
    pub async fn connect(&self, options: ClientOptions) -> Result<Client, ClientError> {
        let permit = self
            .connections
            .clone()
            .try_acquire_owned()
            .map_err(|_| ClientError::Refused(ferrymq_codec::ReasonCode::SERVER_BUSY))?;
        client::connect(self.shared.clone(), options, permit).await
    }

    /// [`Broker::queue_depth`].
    pub fn queue_depth(&self, client_id: &str) -> Option<QueueDepth> {
        self.shared.sessions.outbox(client_id).map(|o| o.depth())
    }

    /// What the broker counted since it started.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// The store (its disk use, WAL syncs).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }

    /// The load shedding level now: 0 nothing, 1 QoS 0 publishes on
    /// topics that are not critical are dropped, 2 new connections are
    /// refused too.
    pub fn shed_level(&self) -> u8 {
        self.shared.shedding.level()
    }

    /// The memory every queue holds in queued messages now, in bytes, as
    /// counted against `[storage] max_queued_memory`.
    pub fn queued_memory(&self) -> usize {
        self.shared.queue_env.memory().used()
    }

    /// Replaces the measured load with `load` (`None`: measure again), so
    /// a test can drive load shedding without loading the machine.
    #[doc(hidden)]
    pub fn override_load(&self, load: Option<shed::Load>) {
        self.shared.shedding.set_override(load);
    }

    /// Whether the filesystem holding the store has less free space than
    /// `[storage] low_disk_percent`.
    pub fn disk_low(&self) -> bool {
        self.shared.disk_low.load(Ordering::Relaxed)
    }

    /// Connections open now (in-process clients included).
    pub fn open_connections(&self) -> u64 {
        let max = u64::from(self.shared.config().limits.max_connections);
        max.saturating_sub(self.connections.available_permits() as u64)
    }

    /// Connections open now that are dormant: idle plain-TCP connections
    /// holding no task until their socket or their session queue wakes
    /// them.
    pub fn dormant_connections(&self) -> u64 {
        self.shared
            .dormant
            .as_ref()
            .map_or(0, |set| set.held() as u64)
    }

    /// The queues of all sessions: totals, and the `top` deepest.
    pub fn session_queues(&self, top: usize) -> SessionQueues {
        let mut all: Vec<SessionQueue> = self
            .shared
            .sessions
            .queues()
            .into_iter()
            .map(|(client_id, outbox, online)| SessionQueue {
                client_id: client_id.as_str().to_owned(),
                depth: outbox.depth(),
                online,
            })
            .collect();
        let mut totals = SessionQueues {
            sessions: all.len() as u64,
            online: all.iter().filter(|q| q.online).count() as u64,
            messages: all.iter().map(|q| q.depth.messages).sum(),
            bytes: all.iter().map(|q| q.depth.bytes).sum(),
            top: Vec::new(),
        };
        all.sort_by_key(|q| std::cmp::Reverse((q.depth.messages, q.depth.bytes)));
        all.truncate(top);
        totals.top = all;
        totals
    }

    /// [`Broker::now_ms`].
    pub fn now_ms(&self) -> u64 {
        self.shared.clock.now_ms()
    }

    /// This node's random identity (the uuid part of every [`MessageId`]).
    pub fn node_uuid(&self) -> [u8; 16] {
        self.shared.identity.uuid
    }

    /// The bound address of each listener, in the order of the config in
    /// force (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.shared
            .listeners
            .lock()
            .iter()
            .map(|l| l.addr)
            .collect()
    }

    /// Puts `config` in force without a restart, as far as it can be
    /// (what SIGHUP does to the `ferrymq` process, with the file read
    /// again): listeners added, removed or changed (connections made
    /// through a removed one stay up), limits, storage policies, `[ferry]`,
    /// authentication settings, then the password file, the ACL file and
    /// the certificates read again ([`Broker::reload`]). What only a start
    /// can change (`node_id`, `data_dir`, `storage.durability`,
    /// `storage.sync_interval_ms`, `storage.max_disk_bytes`, `storage.bridge_reserve_percent`, `[state]`,
    /// `log.format`, adding or removing an authentication file) keeps its
    /// running value and is reported as [`ReloadOutcome::NeedsRestart`]. A
    /// config that does not validate is refused as a whole.
    ///
    /// Bridges: the sessions of bridges whose settings changed are set up
    /// again, so their links must be stopped first (ferrymq-bridge's
    /// `Node::reload` does it); a bridge no longer configured keeps its
    /// queue, which takes nothing more.
    pub async fn apply(&self, config: Config) -> Reload {
        match self.plan(config) {
            Ok(plan) => self.apply_plan(plan).await,
            Err(refused) => refused,
        }
    }

    /// The first half of [`BrokerHandle::apply`]: checks `config` and says
    /// which bridges it adds, changes or removes; `Err` (with the reasons)
    /// if it does not validate.
    pub fn plan(&self, config: Config) -> Result<ReloadPlan, Reload> {
        reload::plan(&self.shared, config)
    }

    /// The second half of [`BrokerHandle::apply`]: puts `plan` in force.
    pub async fn apply_plan(&self, plan: ReloadPlan) -> Reload {
        reload::apply(&self.shared, &self.connections, plan).await
    }

    /// The broker's configuration in force (a reload may replace it).
    pub fn config(&self) -> Arc<Config> {
        self.shared.config.load_full()
    }
}

/// A running broker.
pub struct Broker {
    shared: Arc<Shared>,
    /// Tells every task to stop.
    shutdown_tx: watch::Sender<bool>,
    /// One permit per open connection; all permits back = all closed.
    connections: Arc<Semaphore>,
    tasks: Vec<JoinHandle<()>>,
    /// The task that wakes dormant connections: it runs until every
    /// connection has closed, since a shutdown wakes them to close.
    dormancy: Option<JoinHandle<()>>,
    /// Held (locked) while the broker runs.
    _data_dir: DataDir,
}

impl Broker {
    /// Starts a broker whose state is stored in `data_dir` ([`RocksStore`]).
    pub async fn start(config: Config) -> Result<Broker, StartError> {
        Self::builder(config).start().await
    }

    /// Starts a broker whose state lives in `store`.
    pub async fn start_with_store(
        config: Config,
        store: Arc<dyn Store>,
    ) -> Result<Broker, StartError> {
        Self::builder(config).store(store).start().await
    }

    /// A broker to configure further before starting it.
    pub fn builder(config: Config) -> BrokerBuilder {
        BrokerBuilder {
            config,
            store: None,
            auth_methods: Vec::new(),
        }
    }

    /// Validates `config`, locks the data directory, recovers the state
    /// held by `store`, binds every listener and starts accepting.
    async fn launch(
        config: Config,
        store: Option<Arc<dyn Store>>,
        auth_methods: Vec<Arc<dyn auth::AuthMethod>>,
    ) -> Result<Broker, StartError> {
        config.validate()?;
        let mut config = config;
        state::add_bridge_rules(&mut config);
        let access = Access::load(&config, auth_methods)?;
        let data_dir = DataDir::open(&config.data_dir)?;
        let store: Arc<dyn Store> = match store {
            Some(store) => store,
            #[cfg(feature = "rocksdb")]
            None => RocksStore::open(&config.data_dir, RocksOptions::of(&config.storage))?,
            #[cfg(not(feature = "rocksdb"))]
            None => {
                return Err(StartError::Store(storage::StoreError(
                    "built without the rocksdb feature: give the broker a store".into(),
                )));
            }
        };
        let recovered = store.load()?;
        let tls = server::tls_settings(&config.listeners)?;
        let listeners = server::bind(&config.listeners)?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let max_connections = config.limits.max_connections as usize;
        info!(node_id = %config.node_id, data_dir = %data_dir.path().display(), "ferrymq starting");
        let shared = new_shared(config, store, &recovered, access, shutdown_rx);
        recovery::restore(&shared, recovered);
        let connections = Arc::new(Semaphore::new(max_connections));
        start_listeners(&shared, listeners, tls, &connections);
        let tasks = spawn_tasks(&shared);
        let dormancy = spawn_dormancy(&shared);
        Ok(Broker {
            shared,
            shutdown_tx,
            connections,
            tasks,
            dormancy,
            _data_dir: data_dir,
        })
    }

    /// The bound address of each listener, in the order of the config in
    /// force (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.handle().local_addrs()
    }

    /// Broker time in milliseconds: continues across restarts, never jumps
    /// with the wall clock ([`Received::queued_ms`] is on this scale).
    pub fn now_ms(&self) -> u64 {
        self.shared.clock.now_ms()
    }

    /// How much the queue of `client_id`'s session holds, if the session
    /// exists (connected or not).
    pub fn queue_depth(&self, client_id: &str) -> Option<QueueDepth> {
        self.shared.sessions.outbox(client_id).map(|o| o.depth())
    }

    /// The broker's counters.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Reads the password file, the ACL file and the TLS listeners'
    /// certificates again and puts what changed in force for new logins,
    /// operations and connections, without dropping a connection (what
    /// SIGHUP does to the `ferrymq` process). A part that cannot be read is
    /// refused and logged, and the one in force stays.
    pub fn reload(&self) -> Reload {
        reload::reload(&self.shared)
    }

    /// [`BrokerHandle::apply`].
    pub async fn apply(&self, config: Config) -> Reload {
        self.handle().apply(config).await
    }

    /// The store (e.g. for its WAL sync count).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }

    /// Connects an in-process client: a session like any other, without a
    /// socket. Counts against `max_connections`.
    pub async fn connect(&self, options: ClientOptions) -> Result<Client, ClientError> {
        self.handle().connect(options).await
    }

    /// A cheap, cloneable handle for tasks that run beside the broker
    /// (bridges): in-process connections, queue depths, broker time.
    pub fn handle(&self) -> BrokerHandle {
        BrokerHandle {
            shared: self.shared.clone(),
            connections: self.connections.clone(),
        }
    }

    /// Stops accepting, tells every client (MQTT 5.0: DISCONNECT 0x8B
    /// Server shutting down), and waits until every connection has closed.
    pub async fn shutdown(self) {
        info!("shutting down");
        self.shutdown_tx.send_replace(true);
        self.shared.sessions.kick_all();
        let listeners = std::mem::take(&mut *self.shared.listeners.lock());
        for listener in listeners {
            listener.stop().await;
        }
        for task in self.tasks {
            task.abort();
            let _ = task.await;
        }
        let all = self.shared.config().limits.max_connections;
        match tokio::time::timeout(SHUTDOWN_GRACE, self.connections.acquire_many(all)).await {
            Ok(_) => info!("all connections closed"),
            Err(_) => warn!("connections still open after {SHUTDOWN_GRACE:?}; stopping anyway"),
        }
        if let Some(task) = self.dormancy {
            task.abort();
            let _ = task.await;
        }
        self.shared.store.close();
        info!(wal_syncs = self.shared.store.wal_syncs(), "store closed");
    }
}

/// A broker being configured: its store and its enhanced authentication
/// methods. See [`Broker::builder`].
pub struct BrokerBuilder {
    config: Config,
    store: Option<Arc<dyn Store>>,
    auth_methods: Vec<Arc<dyn auth::AuthMethod>>,
}

impl BrokerBuilder {
    /// Keeps sessions, queues and retained messages in `store` (default:
    /// a [`RocksStore`] in `data_dir`, with the configured durability).
    pub fn store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// Offers an MQTT 5.0 enhanced authentication method to clients.
    pub fn auth_method(mut self, method: impl auth::AuthMethod) -> Self {
        self.auth_methods.push(Arc::new(method));
        self
    }

    /// Starts the broker: validates the config, locks the data directory,
    /// recovers the store, binds every listener and starts accepting. Must
    /// be called inside a tokio runtime.
    pub async fn start(self) -> Result<Broker, StartError> {
        Broker::launch(self.config, self.store, self.auth_methods).await
    }
}

/// Who may log in and what they may do: the users of the password file,
/// the rules of the ACL file and the enhanced authentication methods.
struct Access {
    users: Option<users::Users>,
    acl: Option<reloadable::Reloadable<ferrymq_config::acl::Acl>>,
    methods: Vec<Arc<dyn auth::AuthMethod>>,
}

impl Access {
    /// Reads the password file and the ACL file that `config` names, and
    /// warns when anonymous clients may connect from any address.
    fn load(
        config: &Config,
        methods: Vec<Arc<dyn auth::AuthMethod>>,
    ) -> Result<Access, StartError> {
        let users = match &config.auth.password_file {
            Some(path) => Some(
                users::Users::load(path).map_err(|source| StartError::Users {
                    path: path.clone(),
                    source,
                })?,
            ),
            None => None,
        };
        let acl = match &config.auth.acl_file {
            Some(path) => Some(reloadable::Reloadable::new(
                ferrymq_config::acl::Acl::from_file(path, "auth.acl_file")
                    .map_err(|errors| StartError::Config(ConfigErrors(errors)))?,
            )),
            None => None,
        };
        if config.auth.allow_anonymous && config.auth.allow_anonymous_remote {
            warn!(
                "auth.allow_anonymous_remote = true: clients from any address may connect \
                 without a user name"
            );
        }
        Ok(Access {
            users,
            acl,
            methods,
        })
    }
}

/// What every task of a new broker shares: the config, the store and
/// `access`, empty trees and registries, counters at zero, and session
/// numbers after the highest one `recovered` holds. The recovered state
/// itself is restored into it afterwards.
fn new_shared(
    config: Config,
    store: Arc<dyn Store>,
    recovered: &storage::Recovered,
    access: Access,
    shutdown_rx: watch::Receiver<bool>,
) -> Arc<Shared> {
    let identity = store.identity();
    let clock = store.clock();
    let boot_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let first_session = recovered.next_session_number.max(1);
    // No more than the Receive Maximum can be in flight from a sender.
    let dedup_bound = usize::from(config.limits.receive_maximum);
    let queue_env = outbox::QueueEnv::new(
        Some(store.clone()),
        outbox::QueueMemory::new(config.storage.max_queued_memory),
    );
    let state = (!config.state.topics.is_empty())
        .then(|| state::StateTopics::new(&config.state, identity.uuid, recovered.state_clock));
    Arc::new_cyclic(|this| Shared {
        config: arc_swap::ArcSwap::from_pointee(config),
        router: router::Router::default(),
        retained: retained::Retained::default(),
        sessions: session::Sessions::default(),
        groups: shared_sub::Groups::default(),
        store,
        auth_methods: access.methods,
        users: access.users,
        acl: access.acl,
        stats: Stats::default(),
        next_connection: AtomicU64::new(1),
        next_session: AtomicU64::new(first_session),
        boot_id,
        identity,
        clock,
        shutdown_rx,
        drop_log: stats::LogLimiter::new(Duration::from_secs(10)),
        queue_env,
        refuse_log: stats::LogLimiter::new(Duration::from_secs(10)),
        levels_log: stats::LogLimiter::new(Duration::from_secs(10)),
        auth_log: stats::LogLimiter::new(Duration::from_secs(10)),
        per_address: parking_lot::Mutex::default(),
        dedup: parking_lot::Mutex::new(dedup::Dedup::new(dedup_bound)),
        state,
        shedding: shed::Shedding::default(),
        disk_low: std::sync::atomic::AtomicBool::new(false),
        listeners: parking_lot::Mutex::default(),
        keep_alive: keepalive::KeepAlive::default(),
        dormant: dormant::Dormancy::new()
            .inspect_err(|e| warn!("idle connections will keep their tasks: {e}"))
            .ok(),
        this: this.clone(),
    })
}

/// Starts accepting on each bound listener, with its config and TLS
/// settings, within the permits of `connections`.
fn start_listeners(
    shared: &Arc<Shared>,
    listeners: Vec<tokio::net::TcpListener>,
    tls: Vec<Option<server::Tls>>,
    connections: &Arc<Semaphore>,
) {
    *shared.listeners.lock() = listeners
        .into_iter()
        .zip(shared.config().listeners.iter().cloned())
        .zip(tls)
        .map(|((listener, config), tls)| {
            server::Running::start(listener, config, tls, shared.clone(), connections.clone())
        })
        .collect();
}

/// Spawns the broker's own tasks: the session sweeper, the keep-alive
/// queue and the load shedding sampler.
fn spawn_tasks(shared: &Arc<Shared>) -> Vec<JoinHandle<()>> {
    let mut tasks = vec![tokio::spawn(expire_sessions(shared.clone()))];
    {
        let shared = shared.clone();
        tasks.push(tokio::spawn(async move {
            let shutdown = shared.shutdown_rx.clone();
            shared.keep_alive.run(shutdown).await;
        }));
    }
    {
        let shared = shared.clone();
        tasks.push(tokio::spawn(async move {
            let shutdown = shared.shutdown_rx.clone();
            shed::sample(&shared.shedding, || shared.config.load_full(), shutdown).await;
        }));
    }
    tasks
}

/// Spawns the task of the dormant connections' set: it runs each woken
/// connection as a task again.
fn spawn_dormancy(shared: &Arc<Shared>) -> Option<JoinHandle<()>> {
    let set = shared.dormant.clone()?;
    let shared = shared.clone();
    Some(tokio::spawn(set.run(move |socket, dormant| {
        connection::wake(socket, dormant, &shared);
    })))
}

/// Ends offline sessions whose expiry has passed.
async fn expire_sessions(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(EXPIRY_SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        forget_idle_origins(&shared);
        collect_tombstones(&shared);
        check_low_disk(&shared);
        let expired = shared.sessions.take_expired(tokio::time::Instant::now());
        if expired.is_empty() {
            continue;
        }
        let mut batch = storage::Batch::new(shared.store.as_ref());
        for state in expired {
            info!(client_id = %state.client_id, "session expired");
            Stats::add(&shared.stats.sessions_expired, 1);
            lifecycle::end_session(&shared, state, &mut batch);
        }
        batch.submit();
    }
}

/// Forgets the de-duplication origins silent for `forget_after_secs`.
fn forget_idle_origins(shared: &Shared) {
    let forget_after =
        u64::try_from(shared.config().ferry.forget_after.as_millis()).unwrap_or(u64::MAX);
    let Some(before_ms) = shared.clock.now_ms().checked_sub(forget_after) else {
        return;
    };
    let forgotten = shared.dedup.lock().forget_idle(before_ms);
    if forgotten.is_empty() {
        return;
    }
    info!(
        origins = forgotten.len(),
        "forgot idle de-duplication origins (ferry.forget_after_secs)"
    );
    let mut batch = storage::Batch::new(shared.store.as_ref());
    for origin in forgotten {
        batch.push(storage::StoreOp::DedupForget { origin });
    }
    batch.submit();
}

/// Warns when the filesystem holding the store has less free space than
/// `[storage] low_disk_percent` (and when it has enough again).
fn check_low_disk(shared: &Shared) {
    let percent = shared.config().storage.low_disk_percent;
    let Some((free, total)) = shared.store.disk().filesystem else {
        return;
    };
    let low = percent > 0 && total > 0 && free.saturating_mul(100) < total * u64::from(percent);
    if shared.disk_low.swap(low, Ordering::Relaxed) != low {
        if low {
            warn!(
                free,
                total, percent, "low disk: less free space than storage.low_disk_percent"
            );
        } else {
            info!(
                free,
                total, "disk space above storage.low_disk_percent again"
            );
        }
    }
}

/// Removes the state tombstones older than `[state] tombstone_ttl_secs`.
fn collect_tombstones(shared: &Shared) {
    let Some(topics) = &shared.state else {
        return;
    };
    let mut guard = topics.lock();
    let expired = guard.expired_tombstones(state::wall_ms());
    if expired.is_empty() {
        return;
    }
    let mut batch = storage::Batch::new(shared.store.as_ref());
    for (stamp, topic) in expired {
        let still_it =
            |m: &message::Message| m.payload.is_empty() && state::Stamp::of(m) == Some(stamp);
        if shared.retained.remove_where(&topic, still_it) {
            Stats::add(&shared.stats.state_tombstones_collected, 1);
            batch.push(storage::StoreOp::RetainedDelete(topic));
        }
    }
    batch.submit();
}

/// Runs a broker until `shutdown` completes, then stops it gracefully.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let broker = Broker::start(config).await?;
    shutdown.await;
    broker.shutdown().await;
    Ok(())
}
