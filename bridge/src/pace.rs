//! Timing of a bridge: reconnect backoff (exponential, full jitter) and
//! the forwarding rate (a token bucket that ramps up after a reconnect).

use std::time::Duration;

use tokio::time::Instant;

/// A small random number generator (xorshift64*), seeded per bridge from
/// the operating system, so nodes that lose the same upstream draw
/// different delays. Not for cryptography.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded from /dev/urandom (the clock and process id if unreadable).
    pub fn from_os() -> Rng {
        let mut seed = [0u8; 8];
        if std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
            .is_err()
        {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            seed = (now ^ u64::from(std::process::id()).rotate_left(32)).to_le_bytes();
        }
        Rng::seeded(u64::from_le_bytes(seed))
    }

    /// A fixed sequence (tests).
    pub fn seeded(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0 ..= max`.
    pub fn below_or_eq(&mut self, max: u64) -> u64 {
        if max == u64::MAX {
            return self.next_u64();
        }
        // Lemire's multiply-shift: no modulo bias worth mentioning here.
        ((u128::from(self.next_u64()) * u128::from(max + 1)) >> 64) as u64
    }
}

/// Reconnect delays: attempt `n` waits a uniformly random time between 0
/// and `min(max, min_delay * 2^n)` ("full jitter"), so a fleet of edges
/// that lost the same upstream spreads its returns over the whole window
/// instead of arriving in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
    rng: Rng,
}

impl Backoff {
    /// Delays between `min` and `max` (`max >= min`).
    pub fn new(min: Duration, max: Duration, rng: Rng) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
            rng,
        }
    }

    /// The bound of the next delay.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.min.saturating_mul(factor).min(self.max)
    }

    /// The next delay, and one attempt more.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(self.rng.below_or_eq(nanos))
    }

    /// After a success: the next failure starts from `min` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Messages per second used for the ramp when `drain_rate` is 0
/// (unlimited): the ramp rises to it, then the cap goes.
pub const UNCAPPED_RAMP_RATE: f64 = 10_000.0;

/// The forwarding rate: `drain_rate` messages per second (0: no cap),
/// reached over `ramp` after each reconnect starting from a tenth of it.
/// Bursts are bounded to a tenth of a second's worth.
#[derive(Debug, Clone)]
pub struct Pace {
    drain_rate: f64,
    ramp: Duration,
    since: Instant,
    tokens: f64,
    last: Instant,
}

impl Pace {
    /// A pace that starts (its ramp) at `now`.
    pub fn new(drain_rate: u32, ramp: Duration, now: Instant) -> Pace {
        Pace {
            drain_rate: f64::from(drain_rate),
            ramp,
            since: now,
            tokens: 1.0,
            last: now,
        }
    }

    /// The rate at `now`, `None` when uncapped.
    pub fn rate(&self, now: Instant) -> Option<f64> {
        let elapsed = now.saturating_duration_since(self.since);
        let full = if self.drain_rate > 0.0 {
            self.drain_rate
        } else {
            UNCAPPED_RAMP_RATE
        };
        if !self.ramp.is_zero() && elapsed < self.ramp {
            let progress = elapsed.as_secs_f64() / self.ramp.as_secs_f64();
            return Some(full * (0.1 + 0.9 * progress));
        }
        (self.drain_rate > 0.0).then_some(self.drain_rate)
    }

    /// Takes one message's token if there is one; otherwise returns when
    /// the next token will be there.
    pub fn take(&mut self, now: Instant) -> Result<(), Instant> {
        let Some(rate) = self.rate(now) else {
            return Ok(());
        };
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        let burst = (rate / 10.0).max(1.0);
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - self.tokens) / rate;
            Err(now + Duration::from_secs_f64(wait))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_within_an_exponentially_growing_ceiling() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let mut b = Backoff::new(min, max, Rng::seeded(7));
        let mut ceiling = min;
        for _ in 0..40 {
            assert_eq!(b.ceiling(), ceiling);
            let d = b.next_delay();
            assert!(d <= ceiling, "{d:?} above {ceiling:?}");
            ceiling = (ceiling * 2).min(max);
        }
        b.reset();
        assert_eq!(b.ceiling(), min);
    }

    #[test]
    fn jittered_delays_spread_over_the_whole_window() {
        // 500 edges whose upstream came back: at the cap, their delays
        // cover the window evenly instead of bunching.
        let max = Duration::from_secs(60);
        let mut delays: Vec<f64> = (0..500)
            .map(|edge| {
                let mut b = Backoff::new(Duration::from_millis(500), max, Rng::seeded(edge));
                for _ in 0..10 {
                    b.next_delay();
                }
                b.next_delay().as_secs_f64()
            })
            .collect();
        delays.sort_by(f64::total_cmp);
        let mean = delays.iter().sum::<f64>() / delays.len() as f64;
        assert!((25.0..35.0).contains(&mean), "mean {mean}");
        assert!(delays[0] < 3.0 && delays[499] > 57.0);
        // No second of the window gets more than 4x its fair share.
        let mut per_second = [0u32; 60];
        for d in &delays {
            per_second[(*d as usize).min(59)] += 1;
        }
        let busiest = per_second.iter().max().copied().unwrap_or(0);
        assert!(busiest <= 4 * 500 / 60, "{busiest} edges in one second");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reconnect_waits_exactly_the_drawn_delay() {
        let mut b = Backoff::new(
            Duration::from_millis(200),
            Duration::from_secs(2),
            Rng::seeded(3),
        );
        let mut draws = Rng::seeded(3);
        for attempt in 0..6u32 {
            let ceiling = Duration::from_millis(200) * 2u32.pow(attempt);
            let expected = Duration::from_nanos(
                draws.below_or_eq(ceiling.min(Duration::from_secs(2)).as_nanos() as u64),
            );
            let delay = b.next_delay();
            assert_eq!(delay, expected);
            let start = Instant::now();
            tokio::time::sleep(delay).await;
            // The timer wheel counts whole milliseconds.
            let waited = Instant::now() - start;
            assert!(
                waited >= delay && waited <= delay + Duration::from_millis(1),
                "waited {waited:?} for {delay:?}"
            );
        }
    }

    #[test]
    fn the_pace_ramps_from_a_tenth_to_the_drain_rate() {
        let t0 = Instant::now();
        let pace = Pace::new(1000, Duration::from_secs(10), t0);
        assert_eq!(pace.rate(t0), Some(100.0));
        let mid = pace.rate(t0 + Duration::from_secs(5)).expect("capped");
        assert!((mid - 550.0).abs() < 1e-6, "{mid}");
        assert_eq!(pace.rate(t0 + Duration::from_secs(11)), Some(1000.0));
        let uncapped = Pace::new(0, Duration::from_secs(10), t0);
        assert_eq!(uncapped.rate(t0), Some(UNCAPPED_RAMP_RATE / 10.0));
        assert_eq!(uncapped.rate(t0 + Duration::from_secs(10)), None);
        assert_eq!(Pace::new(0, Duration::ZERO, t0).rate(t0), None);
    }

    #[test]
    fn the_pace_lets_through_about_the_rate() {
        let t0 = Instant::now();
        let mut pace = Pace::new(200, Duration::ZERO, t0);
        let mut now = t0;
        let mut sent = 0;
        while now < t0 + Duration::from_secs(10) {
            match pace.take(now) {
                Ok(()) => sent += 1,
                Err(at) => now = at,
            }
        }
        assert!((1990..=2030).contains(&sent), "{sent} in 10 s at 200/s");
    }
}
