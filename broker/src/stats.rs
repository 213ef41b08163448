//! Counters of what the broker did, shared by all tasks (relaxed atomics:
//! they are statistics, not synchronisation).

use std::sync::atomic::{AtomicU64, Ordering};

use ferrymq_codec::QoS;

/// Broker-wide counters.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted by a listener.
    pub connections_accepted: AtomicU64,
    /// Connections closed at once because `max_connections` were open.
    pub connections_refused: AtomicU64,
    /// Connections closed because of a malformed packet or a protocol error.
    pub protocol_errors: AtomicU64,
    /// PUBLISH packets received from clients (and wills published), by
    /// QoS, and their payload bytes.
    pub received: Traffic,
    /// PUBLISH packets written to clients, by delivery QoS, and their
    /// payload bytes.
    pub sent: Traffic,
    /// Deliveries dropped because a subscriber's queue was full.
    pub messages_dropped_queue_full: AtomicU64,
    /// Deliveries dropped because every queue's memory together reached
    /// `[storage] max_queued_memory`.
    pub messages_dropped_memory: AtomicU64,
    /// Retained publishes on new topics not retained: `[limits]
    /// max_retained_messages` was reached (the message was delivered).
    pub retained_refused: AtomicU64,
    /// Deliveries dropped because they exceeded the client's Maximum Packet Size.
    pub messages_dropped_too_large: AtomicU64,
    /// Queued messages whose Message Expiry Interval passed before delivery.
    pub messages_expired: AtomicU64,
    /// Queued messages older than `[storage] max_age_secs` when their
    /// turn came (dropped).
    pub messages_aged_out: AtomicU64,
    /// QoS 1/2 publishes refused because a queue was full (`refuse`).
    pub publishes_refused: AtomicU64,
    /// Offline sessions ended by their expiry.
    pub sessions_expired: AtomicU64,
    /// Stored records that could not be read at start (skipped).
    pub corrupt_records: AtomicU64,
    /// TLS handshakes that failed or timed out (wrong CA, old version, no
    /// client certificate where one is required, ...).
    pub tls_handshakes_failed: AtomicU64,
    /// WebSocket upgrades refused or failed (wrong path or subprotocol,
    /// not an upgrade request, timed out).
    pub websocket_upgrades_failed: AtomicU64,
    /// Logins refused: unknown user or wrong password.
    pub auth_failures: AtomicU64,
    /// Publishes after which a client was over `max_publish_rate` (and
    /// was not read from for a while).
    pub publishes_throttled: AtomicU64,
    /// Messages from trusted bridges dropped (and acknowledged) because
    /// their `ferry-id` was taken before.
    pub duplicates_dropped: AtomicU64,
    /// State writes (`[state]`) acknowledged and dropped because the value
    /// held was stamped later (or was the same write).
    pub state_writes_superseded: AtomicU64,
    /// QoS 0 publishes dropped by load shedding.
    pub publishes_shed: AtomicU64,
    /// Connections refused by load shedding.
    pub connections_shed: AtomicU64,
    /// State tombstones collected after `tombstone_ttl_secs`.
    pub state_tombstones_collected: AtomicU64,
    /// Subscriptions refused by `max_subscriptions_per_client`.
    pub subscriptions_refused: AtomicU64,
    /// Publishes (wills included) and subscriptions the ACL refused.
    pub acl_denied: AtomicU64,
    /// Connections closed because handling them panicked (a bug; the
    /// broker went on).
    pub connection_panics: AtomicU64,
    /// Topics and filters refused for having more levels than
    /// `max_topic_levels` (publishes, wills, subscriptions, unsubscriptions).
    pub topic_levels_refused: AtomicU64,
    /// Stored retained messages, subscriptions and wills skipped at start
    /// (and queued messages skipped when paged in) for having more levels
    /// than `max_topic_levels`: written by a run with a higher limit or
    /// none. They stay on disk.
    pub records_over_level_limit: AtomicU64,
}

impl Stats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Messages by QoS and their payload bytes.
#[derive(Debug, Default)]
pub struct Traffic {
    messages: [AtomicU64; 3],
    bytes: AtomicU64,
}

impl Traffic {
    /// Counts one message.
    pub(crate) fn count(&self, qos: QoS, bytes: usize) {
        self.messages[usize::from(qos as u8)].fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Adds what a [`Tally`] counted.
    pub(crate) fn add(&self, tally: &Tally) {
        for (counter, n) in self.messages.iter().zip(tally.messages) {
            if n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
        if tally.bytes > 0 {
            self.bytes.fetch_add(tally.bytes, Ordering::Relaxed);
        }
    }

    /// Messages of each QoS (0, 1, 2).
    pub fn by_qos(&self) -> [u64; 3] {
        self.messages.each_ref().map(|c| c.load(Ordering::Relaxed))
    }

    /// Messages of every QoS.
    pub fn messages(&self) -> u64 {
        self.by_qos().iter().sum()
    }

    /// Payload bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// Messages counted locally (by one connection's turn), added to a
/// [`Traffic`] at once.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    messages: [u64; 3],
    bytes: u64,
}

impl Tally {
    /// Counts one message.
    pub(crate) fn count(&mut self, qos: QoS, bytes: usize) {
        self.messages[usize::from(qos as u8)] += 1;
        self.bytes += bytes as u64;
    }

    /// Whether it counted anything.
    pub(crate) fn any(&self) -> bool {
        self.messages.iter().any(|&n| n > 0)
    }
}

/// Lets a repeated warning through at most once per interval, so a flood
/// of identical events cannot flood the log (the counters keep the totals).
#[derive(Debug)]
pub struct LogLimiter {
    start: std::time::Instant,
    /// Milliseconds since `start` when a warning last went through, plus one
    /// (0 = never).
    last_ms: AtomicU64,
    interval_ms: u64,
}

impl LogLimiter {
    /// A limiter passing one warning per `interval`.
    pub fn new(interval: std::time::Duration) -> Self {
        LogLimiter {
            start: std::time::Instant::now(),
            last_ms: AtomicU64::new(0),
            interval_ms: interval.as_millis().try_into().unwrap_or(u64::MAX),
        }
    }

    /// Whether a warning may be logged now.
    pub fn allow(&self) -> bool {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX) + 1;
        let last = self.last_ms.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < self.interval_ms {
            return false;
        }
        self.last_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_passes_one_per_interval() {
        let limiter = LogLimiter::new(std::time::Duration::from_secs(3600));
        assert!(limiter.allow());
        assert!(!limiter.allow());
        let open = LogLimiter::new(std::time::Duration::ZERO);
        assert!(open.allow());
        assert!(open.allow());
    }
}
