//! How a connection ends: why ([`Close`]: the DISCONNECT it sends, whether
//! the will goes out), the last flush, the will, and the session handed
//! back or ended; and a panic in one connection's handling (a bug) caught
//! so that it ends that connection only.

use std::io;
use std::time::Duration;

use ferrymq_codec::{DecodeError, Disconnect, MqttString, Packet, Protocol, ReasonCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, error, warn};

use super::Conn;
use crate::Shared;
use crate::lifecycle::{delay_will, end_session, publish_will_message, will_message};
use crate::message::SessionId;
use crate::session::Control;
use crate::stats::Stats;
use crate::storage::{self, Batch, StoreOp};

/// Why a connection ends. Decides the DISCONNECT sent (MQTT 5.0) and
/// whether the will is published.
#[derive(Debug)]
pub(super) enum Close {
    /// The client sent DISCONNECT; `with_will` for reason 0x04.
    Disconnect { with_will: bool },
    /// The client closed the socket without DISCONNECT.
    Eof,
    /// The socket failed.
    Io(io::Error),
    /// The client broke the protocol; the reason code goes in our DISCONNECT.
    Protocol(ReasonCode, String),
    /// No packet within 1.5 times the keep alive.
    KeepAlive,
    /// Another connection took over this client identifier.
    TakenOver,
    /// The broker is stopping.
    Shutdown,
    /// Handling this connection panicked (a bug): this connection closes
    /// (DISCONNECT 0x83 in 5.0), its session is handed back, the broker
    /// goes on.
    Panicked(String),
}

impl Close {
    /// The reason code of the DISCONNECT we send, if we send one.
    fn reason_code(&self) -> Option<ReasonCode> {
        match self {
            Close::Disconnect { .. } | Close::Eof | Close::Io(_) => None,
            Close::Protocol(code, _) => Some(*code),
            Close::KeepAlive => Some(ReasonCode::KEEP_ALIVE_TIMEOUT),
            Close::TakenOver => Some(ReasonCode::SESSION_TAKEN_OVER),
            Close::Shutdown => Some(ReasonCode::SERVER_SHUTTING_DOWN),
            Close::Panicked(_) => Some(ReasonCode::IMPLEMENTATION_SPECIFIC_ERROR),
        }
    }

    /// `persistent`: whether the session outlives this connection (only
    /// then can a connection taking over resume it).
    fn publishes_will(&self, control: &Control, persistent: bool) -> bool {
        match self {
            Close::Disconnect { with_will } => *with_will,
            // The broker going down takes the subscribers with it.
            Close::Shutdown => false,
            // Not when the new connection resumes the session.
            Close::TakenOver => !(persistent && control.taken_over_with_resume()),
            _ => true,
        }
    }

    pub(super) fn protocol(error: &DecodeError) -> Close {
        Close::Protocol(error.reason_code(), error.to_string())
    }
}

/// The last phase: logs why the connection ends, then closes it (the will,
/// the session handed back or ended).
pub(super) async fn close_connection<S>(conn: Conn<'_, S>, close: Close, peer: &str)
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let shared = conn.shared;
    let client_id = conn.engine.state.client_id.clone();
    match &close {
        Close::Protocol(code, why) => {
            Stats::add(&shared.stats.protocol_errors, 1);
            warn!(%peer, %client_id, reason = %code, "closing: {why}");
        }
        Close::Panicked(why) => panicked(shared, peer, &client_id, "handler", why.clone()),
        Close::Io(e) => debug!(%peer, %client_id, "stream error: {e}"),
        other => debug!(%peer, %client_id, "closing: {other:?}"),
    }
    if let Err(why) = CatchPanic(Box::pin(conn.finish(close))).await {
        panicked(shared, peer, &client_id, "close", why);
    }
}

/// Counts and logs a panic that ended one connection.
pub(super) fn panicked(shared: &Shared, peer: &str, client_id: &str, phase: &str, why: String) {
    Stats::add(&shared.stats.connection_panics, 1);
    error!(%peer, %client_id, "connection {phase} panicked, closing this connection only: {why}");
}

/// Polls a (boxed) future, turning a panic inside it into `Err` with the
/// panic's message; the future is not polled again after that. Tokio would
/// catch it too, but then the task is gone with no word of which client
/// it served, and the session it held would never be handed back.
pub(super) struct CatchPanic<F>(pub(super) F);

impl<F: std::future::Future + Unpin> std::future::Future for CatchPanic<F> {
    type Output = Result<F::Output, String>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::panic::{AssertUnwindSafe, catch_unwind};
        use std::task::Poll;
        let inner = &mut self.0;
        // Unwind safety: after a panic the future is dropped, never polled
        // again; the state it shared is left as the unwinding left it
        // (parking_lot locks are released, not poisoned).
        match catch_unwind(AssertUnwindSafe(|| std::pin::Pin::new(inner).poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(payload) => Poll::Ready(Err(panic_message(payload.as_ref()))),
        }
    }
}

/// The message of a panic payload (`&str` or `String`, as `panic!` makes).
pub(super) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

impl<S: AsyncRead + AsyncWrite + Unpin + 'static> Conn<'_, S> {
    /// Closes the stream and hands the session back (or ends it), after
    /// publishing the will when the close calls for it.
    pub(super) async fn finish(mut self, close: Close) {
        // Offline from now on (before the client can see the stream end):
        // QoS 0 is no longer queued for it unless configured.
        self.engine.state.outbox.set_online(false);
        let protocol = self.engine.protocol;
        // Acknowledgements already durable still go out.
        let state = self.durable.borrow().clone();
        self.engine
            .release_acks(&state, &mut self.io.busy().packets);
        self.encode_packets();
        if let (Protocol::V5, Some(code)) = (protocol, close.reason_code()) {
            let mut disconnect = Disconnect::new(code);
            if let Close::Protocol(_, why) = &close {
                // Always allowed on DISCONNECT, and a help to whoever
                // debugs the client.
                disconnect.properties.reason_string = MqttString::new(why).ok();
            }
            self.io.queue(&Packet::Disconnect(disconnect), Protocol::V5);
        }
        let ops = self.io.take_ops();
        if !ops.is_empty() {
            storage::write(self.shared.store.as_ref(), ops);
        }
        // The stream is closed last (`linger`), after the will and the
        // session's hand-back, which must not wait for the client.
        self.io.flush_and_shutdown().await;
        let shared = self.shared;
        let publish_will = close.publishes_will(&self.control, self.engine.state.is_persistent());
        let mut state = self.engine.into_state();
        let mut stored_will = None;
        let will = self.extras.as_deref_mut().and_then(|e| e.will.take());
        if let Some(will) = will.filter(|_| publish_will) {
            let delay = Duration::from_secs(u64::from(
                will.properties
                    .will_delay_interval
                    .filter(|_| protocol == Protocol::V5)
                    .unwrap_or(0),
            ));
            let message = will_message(will, SessionId(state.number));
            if delay.is_zero() || !state.is_persistent() {
                // Without a delay, or when the session ends now anyway.
                publish_will_message(shared, message, self.routes.get_or_insert_default());
            } else {
                stored_will = Some((message, delay));
            }
        }
        let client_id = state.client_id.clone();
        if state.is_persistent() {
            // The session goes offline now; a delayed will waits with it,
            // also across a restart.
            let clock = shared.store.clock();
            let record = state.record(Some(clock.now_ms()));
            let mut stored = record.clone();
            if let Some((message, delay)) = stored_will {
                stored.pending_will = Some(crate::storage::StoredWill {
                    message: message.clone(),
                    due_ms: clock.now_ms() + delay.as_millis() as u64,
                });
                state.rare().pending_will = Some(delay_will(shared, message, delay, Some(record)));
            }
            storage::write(shared.store.as_ref(), vec![StoreOp::SessionPut(stored)]);
            shared
                .sessions
                .detach(&client_id, &self.control, Some(state));
        } else {
            let mut batch = Batch::new(shared.store.as_ref());
            end_session(shared, state, &mut batch);
            batch.submit();
            shared.sessions.detach(&client_id, &self.control, None);
        }
        self.io.linger().await;
    }
}
