//! For ferrymq's own benchmarks (`benches/router.rs`, `benches/idle.rs`)
//! only: **not a stable API**. It may change or disappear in any release,
//! and is hidden from the documentation.
//!
//! The router and its types (`Router`, `Subscriber`, `Route`, `RouteCache`,
//! the session outbox) stay private; [`BenchRouter`] wraps them so a
//! benchmark can subscribe and match through exactly the code the broker
//! runs, without those types becoming public.

use std::sync::Arc;

use ferrymq_codec::QoS;
use ferrymq_config::QueueFull;

use crate::message::SessionId;
use crate::outbox::{Outbox, QueueLimits};
use crate::router::{Route, RouteCache, Router, Subscriber};
use crate::storage::{MemoryStore, Store};

/// The publisher the benchmark's routes are asked for: a session that
/// subscribes to nothing.
const NO_PUBLISHER: SessionId = SessionId(u64::MAX);

/// A subscriber: a session number and its own (empty) outbox, made as the
/// broker makes a session's outbox.
pub struct BenchSession {
    id: SessionId,
    outbox: Arc<Outbox>,
}

/// The broker's topic tree, with the route cache of one connection.
pub struct BenchRouter {
    router: Router,
    /// One connection's memo of topic -> routes.
    cache: RouteCache,
    /// Reused by [`BenchRouter::routes`], as the route cache reuses its own.
    scratch: Vec<Route>,
    /// Behind every outbox (outboxes are made with a store, as in the
    /// broker); nothing is written to it.
    store: Arc<dyn Store>,
}

impl Default for BenchRouter {
    fn default() -> Self {
        BenchRouter {
            router: Router::default(),
            cache: RouteCache::default(),
            scratch: Vec::new(),
            store: MemoryStore::new(),
        }
    }
}

impl BenchRouter {
    /// An empty router.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new session numbered `number`, with an outbox of its own.
    pub fn session(&self, number: u64) -> BenchSession {
        let limits = QueueLimits {
            max_messages: 1000,
            max_bytes: 1 << 20,
            policy: QueueFull::DropOldest,
            queue_qos0: false,
        };
        BenchSession {
            id: SessionId(number),
            outbox: Outbox::paged(
                number,
                limits,
                1,
                &crate::outbox::QueueEnv::new(
                    Some(self.store.clone()),
                    crate::outbox::QueueMemory::new(0),
                ),
            ),
        }
    }

    /// Subscribes `session` to `filter` (a valid, non-shared topic filter,
    /// as SUBSCRIBE has checked by then), as a SUBSCRIBE does. Returns
    /// whether it replaced the session's subscription to that filter.
    pub fn subscribe(&self, filter: &str, session: &BenchSession, qos: QoS) -> bool {
        self.router.subscribe(
            filter,
            Subscriber {
                session: session.id,
                outbox: session.outbox.clone(),
                qos,
                no_local: false,
                retain_as_published: false,
                identifier: None,
                group: None,
            },
        )
    }

    /// Removes `session`'s subscription to `filter`; whether it existed.
    pub fn unsubscribe(&self, filter: &str, session: &BenchSession) -> bool {
        self.router.unsubscribe(filter, session.id)
    }

    /// Walks the tree for `topic` (what a route cache miss costs, without
    /// the cache's own work) and returns the number of routes: sessions
    /// reached, overlapping subscriptions merged.
    pub fn routes(&mut self, topic: &str) -> usize {
        self.scratch.clear();
        self.router.routes(topic, NO_PUBLISHER, &mut self.scratch);
        self.scratch.len()
    }

    /// The routes of `topic` through the route cache, as the publish path
    /// asks for them, and returns their number.
    pub fn cached_routes(&mut self, topic: &str) -> usize {
        self.cache.routes(&self.router, topic, NO_PUBLISHER).len()
    }
}

/// The size of a plain TCP connection's future (`connection::serve`),
/// which tokio's task holds for the connection's life (benches/idle.rs
/// prints it beside the heap each idle connection holds).
pub fn connection_future_size() -> usize {
    fn size<A, B, C, D, E, F>(_: fn(A, B, C, D, E) -> F) -> usize {
        std::mem::size_of::<F>()
    }
    size(crate::connection::serve::<tokio::net::TcpStream>)
}

/// The size of a woken dormant connection's future (`connection::woken`),
/// which its new task holds until it sleeps again or closes.
pub fn woken_future_size() -> usize {
    fn size<A, B, F>(_: fn(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }
    size(crate::connection::woken)
}
