//! `[limits] max_publish_rate`: how fast one client may publish. A
//! token bucket in time units: each PUBLISH costs `1 s / rate` of credit,
//! credit grows with time up to one second's worth (the burst), and a
//! PUBLISH that takes the credit below zero is still handled (it was
//! read already) but stops the connection from reading until the credit
//! is back at zero. The average is the rate; nothing is refused or lost.
//! Sans-I/O: the caller passes the time.

use std::time::{Duration, Instant};

/// One client's publish credit.
#[derive(Debug)]
pub(crate) struct PublishRate {
    /// What one PUBLISH costs, in nanoseconds of credit.
    cost: i64,
    /// The most credit that can build up (one second).
    capacity: i64,
    /// Credit now; negative while the client is over its rate.
    credit: i64,
    /// When `credit` was last brought up to date.
    at: Instant,
}

const SECOND: i64 = 1_000_000_000;

impl PublishRate {
    /// A client allowed `per_second` publishes a second (at least 1),
    /// starting with a full burst.
    pub(crate) fn new(per_second: u32, now: Instant) -> PublishRate {
        let cost = SECOND / i64::from(per_second.max(1));
        PublishRate {
            cost,
            capacity: SECOND,
            credit: SECOND,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at);
        let elapsed = i64::try_from(elapsed.as_nanos()).unwrap_or(i64::MAX);
        self.credit = self.credit.saturating_add(elapsed).min(self.capacity);
        self.at = now;
    }

    /// Charges one PUBLISH at `now`; returns how long the client must
    /// now wait before it is read again (zero: not at all).
    pub(crate) fn charge(&mut self, now: Instant) -> Duration {
        self.refill(now);
        self.credit -= self.cost;
        self.wait(now)
    }

    /// How long from `now` until the credit is back at zero.
    pub(crate) fn wait(&mut self, now: Instant) -> Duration {
        self.refill(now);
        Duration::from_nanos(u64::try_from(-self.credit).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn bursts_pass_then_the_rate_holds() {
        // (rate, publishes at the same instant, wait after the last)
        let cases: &[(u32, u32, Duration)] = &[
            // A second's worth passes at once; the next waits one cost.
            (10, 10, Duration::ZERO),
            (10, 11, Duration::from_millis(100)),
            (10, 13, Duration::from_millis(300)),
            (1, 1, Duration::ZERO),
            (1, 2, Duration::from_secs(1)),
            (1000, 1001, MS),
            // 0 is treated as 1 (the config says 0 means off, and then no
            // bucket is made at all).
            (0, 2, Duration::from_secs(1)),
        ];
        for &(rate, count, wait) in cases {
            let now = Instant::now();
            let mut bucket = PublishRate::new(rate, now);
            let mut last = Duration::ZERO;
            for _ in 0..count {
                last = bucket.charge(now);
            }
            assert_eq!(last, wait, "rate {rate}, {count} at once");
        }
    }

    #[test]
    fn credit_comes_back_with_time_up_to_one_second() {
        let start = Instant::now();
        let mut bucket = PublishRate::new(10, start);
        for _ in 0..12 {
            bucket.charge(start);
        }
        assert_eq!(bucket.wait(start), 200 * MS);
        assert_eq!(bucket.wait(start + 150 * MS), 50 * MS);
        assert_eq!(bucket.wait(start + 200 * MS), Duration::ZERO);
        // At the rate, a client never waits.
        let mut t = start + 200 * MS;
        for _ in 0..50 {
            t += 100 * MS;
            assert_eq!(bucket.charge(t), Duration::ZERO);
        }
        // Idle for a minute: only a second's worth builds up.
        t += Duration::from_secs(60);
        for _ in 0..10 {
            assert_eq!(bucket.charge(t), Duration::ZERO);
        }
        assert_eq!(bucket.charge(t), 100 * MS);
    }
}
