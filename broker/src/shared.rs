//! [`Shared`]: what every connection task, listener, bridge session and
//! sweeper of one broker shares (the config in force, the router, the
//! retained set, the sessions, the store, the counters, the limits'
//! state). Made once by `Broker::start_with_store`; the broker's tasks
//! hold it in an `Arc`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use ferrymq_config::Config;
use tokio::sync::watch;

use crate::{
    Stats, Store, auth, dedup, outbox, reloadable, retained, router, server, session, shared_sub,
    shed, state, stats, storage, users,
};

/// What every connection task shares.
pub(crate) struct Shared {
    /// The config in force: read it through [`Shared::config`]; a reload
    /// replaces it.
    pub(crate) config: arc_swap::ArcSwap<Config>,
    pub(crate) router: router::Router,
    pub(crate) retained: retained::Retained,
    pub(crate) sessions: session::Sessions,
    pub(crate) groups: shared_sub::Groups,
    pub(crate) store: Arc<dyn Store>,
    /// Enhanced authentication methods, by name.
    pub(crate) auth_methods: Vec<Arc<dyn auth::AuthMethod>>,
    /// The users of `[auth] password_file`, if set.
    pub(crate) users: Option<users::Users>,
    /// The rules of `[auth] acl_file`, if set (a reload replaces them).
    pub(crate) acl: Option<reloadable::Reloadable<ferrymq_config::acl::Acl>>,
    pub(crate) stats: Stats,
    /// Source of connection numbers ([`Shared::next_connection`]).
    pub(crate) next_connection: AtomicU64,
    /// Source of session numbers, never reused, also across restarts
    /// ([`Shared::next_session_number`]).
    pub(crate) next_session: AtomicU64,
    /// Distinguishes this run in assigned client identifiers.
    pub(crate) boot_id: u64,
    /// This node's identity and run (the store's).
    pub(crate) identity: storage::NodeIdentity,
    /// Broker time (the store's clock).
    pub(crate) clock: Arc<storage::BrokerClock>,
    /// Becomes `true` when the broker stops; every task watches it.
    pub(crate) shutdown_rx: watch::Receiver<bool>,
    /// Rate limit for "session queue full" warnings.
    pub(crate) drop_log: stats::LogLimiter,
    /// What every queue shares: the store, and the memory every queue
    /// holds in queued messages, against `[storage] max_queued_memory`.
    pub(crate) queue_env: Arc<outbox::QueueEnv>,
    /// Rate limit for "max_connections reached" warnings.
    pub(crate) refuse_log: stats::LogLimiter,
    /// Rate limit for "too many topic levels" warnings.
    pub(crate) levels_log: stats::LogLimiter,
    /// Rate limit for "login refused" warnings.
    pub(crate) auth_log: stats::LogLimiter,
    /// Open connections per source address, for
    /// `max_connections_per_address` (only addresses with one open; only
    /// counted when the limit is set). Locked once per accept and close.
    pub(crate) per_address: parking_lot::Mutex<HashMap<std::net::IpAddr, u32>>,
    /// The message ids taken from trusted bridges (`[ferry]`).
    pub(crate) dedup: parking_lot::Mutex<dedup::Dedup>,
    /// The state topics and their clock (`[state]`; `None` without topics).
    pub(crate) state: Option<state::StateTopics>,
    /// The load shedding level (`[limits] shed_*`).
    pub(crate) shedding: shed::Shedding,
    /// Free space below `[storage] low_disk_percent` (checked every
    /// second by the sweeper).
    pub(crate) disk_low: std::sync::atomic::AtomicBool,
    /// The listeners accepting now, in config order (a reload adds,
    /// removes and replaces them).
    pub(crate) listeners: parking_lot::Mutex<Vec<server::Running>>,
    /// Every connection's keep-alive deadline (one task rings them).
    pub(crate) keep_alive: crate::keepalive::KeepAlive,
    /// The idle plain-TCP connections that gave up their task (`None`:
    /// the set could not be made, and every connection keeps its task).
    pub(crate) dormant: Option<Arc<crate::dormant::Dormancy<crate::connection::Dormant>>>,
    /// This, for tasks spawned from borrowed contexts.
    pub(crate) this: Weak<Shared>,
}

impl Shared {
    /// The config in force. Cheap (no lock, no shared write); hold it
    /// only for the moment: a reload puts a new one in force for what
    /// starts from then on.
    pub(crate) fn config(&self) -> arc_swap::Guard<Arc<Config>> {
        self.config.load()
    }

    /// A new, empty queue for session (or group) `number`.
    pub(crate) fn new_outbox(&self, number: u64) -> Arc<outbox::Outbox> {
        outbox::Outbox::paged(
            number,
            self.queue_limits(),
            self.identity.first_seq(),
            &self.queue_env,
        )
    }

    /// The queue limits of a new session (`[storage]` in force).
    pub(crate) fn queue_limits(&self) -> outbox::QueueLimits {
        let storage = &self.config().storage;
        outbox::QueueLimits {
            max_messages: storage.max_queued_messages,
            max_bytes: usize::try_from(storage.max_queued_bytes).unwrap_or(usize::MAX),
            policy: storage.queue_full,
            queue_qos0: storage.queue_qos0,
        }
    }

    /// Queue bounds of a session of its own (a bridge's), if it has them.
    pub(crate) fn session_bounds(&self, client_id: &str) -> Option<(u32, usize)> {
        let name = client_id.strip_prefix(crate::BRIDGE_CLIENT_PREFIX)?;
        let name = name.strip_suffix("/live").unwrap_or(name);
        self.config()
            .bridges
            .iter()
            .find(|b| b.name == name)
            .map(|b| {
                (
                    b.max_queued_messages,
                    usize::try_from(b.max_queued_bytes).unwrap_or(usize::MAX),
                )
            })
    }

    pub(crate) fn next_connection(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn next_session_number(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }
}
