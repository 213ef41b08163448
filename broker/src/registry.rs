//! Which connection holds which client identifier, for session takeover:
//! a second CONNECT with the same client identifier closes the first
//! connection, and the new one proceeds once the old one has finished.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ferrymq_codec::MqttString;
use parking_lot::Mutex;
use tokio::sync::{Notify, watch};

/// The handle a connection registers under its client identifier.
pub struct Control {
    /// Identifies the registering connection, so it removes only its own entry.
    pub connection: u64,
    /// Tells the connection to close (taken over). A stored permit makes
    /// a kick that arrives before the connection waits still count.
    kicked: Notify,
    /// Set to `true` by the connection when it has fully finished.
    done_tx: watch::Sender<bool>,
}

impl Control {
    /// A control for connection number `connection`.
    pub fn new(connection: u64) -> Arc<Self> {
        Arc::new(Control {
            connection,
            kicked: Notify::new(),
            done_tx: watch::Sender::new(false),
        })
    }

    /// Resolves when the connection is told to close. Cancel-safe.
    pub async fn kicked(&self) {
        self.kicked.notified().await;
    }

    /// Marks the connection as finished.
    pub fn finish(&self) {
        self.done_tx.send_replace(true);
    }
}

/// Client identifier -> connection currently holding it.
#[derive(Default)]
pub struct Registry {
    /// Locked only on CONNECT and at connection end, never on the publish path.
    clients: Mutex<HashMap<MqttString, Arc<Control>>>,
}

/// How long a new connection waits for the one it takes over to finish.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

impl Registry {
    /// Registers `control` under `client_id`. If another connection held
    /// it, tells that one to close and waits (bounded) until it finished.
    /// Returns whether a connection was taken over.
    pub async fn register(&self, client_id: &MqttString, control: Arc<Control>) -> bool {
        let previous = self.clients.lock().insert(client_id.clone(), control);
        let Some(previous) = previous else {
            return false;
        };
        previous.kicked.notify_one();
        let mut done = previous.done_tx.subscribe();
        // A timeout only means the old task is slow to notice; it will
        // still stop at its next poll, and its entry is already replaced.
        let _ = tokio::time::timeout(TAKEOVER_WAIT, done.wait_for(|d| *d)).await;
        true
    }

    /// Removes `client_id` if `connection` still holds it.
    pub fn unregister(&self, client_id: &MqttString, connection: u64) {
        let mut clients = self.clients.lock();
        if clients
            .get(client_id)
            .is_some_and(|c| c.connection == connection)
        {
            clients.remove(client_id);
        }
    }
}
