//! [`BridgeStatus`]: what one bridge is doing, for firmware (the library
//! API), ops (`ferrymq bridge status`) and logs.

use std::fmt;
use std::time::Duration;

/// A bridge's state at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BridgeStatus {
    /// The bridge's name.
    pub name: String,
    /// Whether the uplink is connected.
    pub connected: bool,
    /// The upstream address in use, or last tried.
    pub address: Option<String>,
    /// Why the link last failed.
    pub last_error: Option<String>,
    /// Messages waiting to go upstream: queued on disk plus sent and not
    /// yet acknowledged.
    pub backlog_messages: u64,
    /// Their payload bytes.
    pub backlog_bytes: u64,
    /// How long the oldest of them has waited.
    pub oldest_queued: Option<Duration>,
    /// Messages acknowledged upstream per second, over the last ~10 s.
    pub drained_per_sec: f64,
    /// Messages acknowledged upstream since start.
    pub forwarded: u64,
    /// Messages received from upstream and stored here since start.
    pub received: u64,
    /// Messages the upstream refused for good, kept under `$dead/`.
    pub dead_lettered: u64,
    /// Messages whose Message Expiry Interval ran out while they waited
    /// here (not forwarded; the local queue drops the others it holds).
    pub expired: u64,
    /// Messages dropped for waiting longer than their rule's
    /// `max_age_secs`.
    pub aged_out: u64,
    /// Successful connections since start.
    pub connects: u64,
    /// How it sends: `None` plain MQTT (`kind = "mqtt"`), `Some(true)`
    /// ferry batches, `Some(false)` a `kind = "ferrymq"` bridge whose
    /// upstream did not grant batches (plain MQTT 5, at least once).
    pub batches: Option<bool>,
    /// Ferry batches sent.
    pub batches_sent: u64,
}

impl fmt::Display for BridgeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "bridge {}: {}{}",
            self.name,
            if self.connected {
                "connected"
            } else {
                "disconnected"
            },
            self.address
                .as_ref()
                .map(|a| format!(" ({} {a})", if self.connected { "to" } else { "trying" }))
                .unwrap_or_default()
        )?;
        writeln!(
            f,
            "  backlog: {} messages, {} bytes{}",
            self.backlog_messages,
            self.backlog_bytes,
            self.oldest_queued
                .map(|d| format!(", oldest queued {}", human(d)))
                .unwrap_or_default()
        )?;
        writeln!(
            f,
            "  drained: {:.0} msg/s; forwarded {}, received {}, dead-lettered {}, expired {}, aged out {}, connects {}",
            self.drained_per_sec,
            self.forwarded,
            self.received,
            self.dead_lettered,
            self.expired,
            self.aged_out,
            self.connects
        )?;
        match self.batches {
            Some(true) => writeln!(f, "  ferry batches: {} sent", self.batches_sent)?,
            Some(false) if self.connected => writeln!(
                f,
                "  ferry batches: not granted by the upstream; sending plain MQTT 5 (at least once)"
            )?,
            _ => {}
        }
        if let Some(e) = &self.last_error {
            writeln!(f, "  last error: {e}")?;
        }
        Ok(())
    }
}

/// `3 s`, `5 min 2 s`, `2 h 3 min`, `4 d 1 h`.
pub(crate) fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        3600..86400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_reads_as_a_short_report() {
        let s = BridgeStatus {
            name: "regional".into(),
            connected: false,
            address: Some("10.0.0.5:1883".into()),
            last_error: Some("connection closed by the upstream".into()),
            backlog_messages: 1200,
            backlog_bytes: 76800,
            oldest_queued: Some(Duration::from_secs(3725)),
            drained_per_sec: 0.0,
            forwarded: 10,
            received: 2,
            dead_lettered: 0,
            expired: 0,
            aged_out: 0,
            connects: 1,
            batches: None,
            batches_sent: 0,
        };
        assert_eq!(
            s.to_string(),
            "bridge regional: disconnected (trying 10.0.0.5:1883)\n  backlog: 1200 messages, 76800 bytes, oldest queued 1 h 2 min\n  drained: 0 msg/s; forwarded 10, received 2, dead-lettered 0, expired 0, aged out 0, connects 1\n  last error: connection closed by the upstream\n"
        );
        let batched = BridgeStatus {
            connected: true,
            last_error: None,
            batches: Some(true),
            batches_sent: 12,
            ..s.clone()
        };
        assert!(batched.to_string().ends_with("  ferry batches: 12 sent\n"));
        let plain = BridgeStatus {
            batches: Some(false),
            ..batched
        };
        assert!(plain.to_string().contains("not granted by the upstream"));
    }
}
