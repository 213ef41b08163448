//! Load shedding (`[limits] shed_cpu_percent`, `shed_memory`,
//! `shed_window_secs`, `critical_topics`). [`Shedder`] is the policy,
//! without I/O: it steps up one level after the load stayed over a limit
//! for a window, and back one level after a window under. Level 1 drops
//! QoS 0 publishes from network clients on topics that are not critical;
//! level 2 also refuses new network connections (CONNACK 0x89 Server busy,
//! 3.1.1 return code 3). In-process clients (the bridges, firmware) are
//! never shed. A task samples the process every second ([`sample`]) and
//! publishes the level in [`Shedding`], which the connections read with
//! one relaxed load.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tracing::{info, warn};

/// What the process uses: its share of the machine's CPU (1.0: every
/// core busy) and its resident memory.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    /// Share of the machine's CPU time, 0.0 ..= 1.0.
    pub cpu: f64,
    /// Resident memory, bytes.
    pub resident_bytes: u64,
}

/// The highest level: new connections are refused too.
pub const REFUSE_CONNECTIONS: u8 = 2;
/// QoS 0 publishes on topics that are not critical are dropped.
pub const DROP_QOS0: u8 = 1;

/// The shedding policy.
#[derive(Debug, Clone)]
pub struct Shedder {
    /// CPU share above which the load is "over" (`None`: not watched).
    cpu_limit: Option<f64>,
    /// Resident bytes above which the load is "over".
    memory_limit: Option<u64>,
    window: Duration,
    level: u8,
    over: bool,
    /// When the load last crossed a limit, or the level last changed.
    since: Option<Instant>,
}

impl Shedder {
    /// For `[limits]`.
    pub fn new(limits: &ferrymq_config::Limits) -> Self {
        Shedder {
            cpu_limit: (limits.shed_cpu_percent > 0)
                .then(|| f64::from(limits.shed_cpu_percent) / 100.0),
            memory_limit: (limits.shed_memory > 0).then_some(limits.shed_memory),
            window: limits.shed_window,
            level: 0,
            over: false,
            since: None,
        }
    }

    /// Takes the limits of `limits` (a reload), keeping the level reached
    /// and the time it was reached; with nothing watched any more, the
    /// level drops to 0 at once.
    pub fn set_limits(&mut self, limits: &ferrymq_config::Limits) {
        let next = Shedder::new(limits);
        self.cpu_limit = next.cpu_limit;
        self.memory_limit = next.memory_limit;
        self.window = next.window;
        if !self.enabled() {
            self.level = 0;
            self.since = None;
        }
    }

    /// Whether anything is watched at all.
    pub fn enabled(&self) -> bool {
        self.cpu_limit.is_some() || self.memory_limit.is_some()
    }

    /// Takes a sample at `now`; returns the level.
    pub fn observe(&mut self, load: Load, now: Instant) -> u8 {
        let over = self.cpu_limit.is_some_and(|l| load.cpu > l)
            || self.memory_limit.is_some_and(|m| load.resident_bytes > m);
        if over != self.over || self.since.is_none() {
            self.over = over;
            self.since = Some(now);
        }
        let held = self
            .since
            .is_some_and(|since| now.saturating_duration_since(since) >= self.window);
        if held {
            let next = if over {
                (self.level + 1).min(REFUSE_CONNECTIONS)
            } else {
                self.level.saturating_sub(1)
            };
            if next != self.level {
                self.level = next;
                self.since = Some(now);
            }
        }
        self.level
    }
}

/// The level the connections read, and a way to set the load by hand.
#[derive(Debug, Default)]
pub struct Shedding {
    level: AtomicU8,
    /// A load that replaces the measured one (tests; see
    /// `BrokerHandle::override_load`).
    overridden: Mutex<Option<Load>>,
}

impl Shedding {
    /// The level now (0: nothing is shed).
    pub fn level(&self) -> u8 {
        self.level.load(Ordering::Relaxed)
    }

    pub(crate) fn set_override(&self, load: Option<Load>) {
        *self.overridden.lock() = load;
    }
}

/// The process's CPU time and memory, from `/proc/self` (zero where it
/// cannot be read).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessUsage {
    /// User and system CPU time so far, seconds.
    pub cpu_seconds: f64,
    /// Resident memory, bytes.
    pub resident_bytes: u64,
    /// Open file descriptors (read by [`ProcessUsage::with_open_fds`]
    /// only: a listing of one entry per connection, too much to do every
    /// second for the sampler, which has no use for it).
    pub open_fds: u64,
}

impl ProcessUsage {
    /// Reads it now.
    pub fn read() -> ProcessUsage {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // The fields after the command name (which may hold spaces) start
        // at field 3; utime and stime are fields 14 and 15, in ticks of
        // USER_HZ, which Linux fixes at 100 for /proc.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = |n: usize| -> f64 {
            fields
                .get(n - 3)
                .and_then(|f| f.parse().ok())
                .unwrap_or(0.0)
        };
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let resident_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        ProcessUsage {
            cpu_seconds: (ticks(14) + ticks(15)) / 100.0,
            resident_bytes: resident_kib * 1024,
            open_fds: 0,
        }
    }

    /// [`ProcessUsage::read`], with the open file descriptors counted.
    pub fn with_open_fds() -> ProcessUsage {
        ProcessUsage {
            open_fds: std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64),
            ..ProcessUsage::read()
        }
    }
}

/// How often the load is sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Samples the process every second and publishes the level, until the
/// broker stops; `limits` gives the config in force at each sample.
pub(crate) async fn sample(
    shedding: &Shedding,
    limits: impl Fn() -> std::sync::Arc<ferrymq_config::Config>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut shedder = Shedder::new(&limits().limits);
    let cores = std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64);
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    let mut last = (Instant::now(), ProcessUsage::read().cpu_seconds);
    loop {
        // Cancel-safe: a tick not taken stays due, and the shutdown flag
        // is only observed.
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        // A reload may have changed the limits.
        shedder.set_limits(&limits().limits);
        if !shedder.enabled() {
            shedding.level.store(0, Ordering::Relaxed);
            continue;
        }
        let now = Instant::now();
        let usage = ProcessUsage::read();
        let elapsed = now.saturating_duration_since(last.0).as_secs_f64();
        let measured = Load {
            cpu: if elapsed > 0.0 {
                ((usage.cpu_seconds - last.1) / elapsed / cores).max(0.0)
            } else {
                0.0
            },
            resident_bytes: usage.resident_bytes,
        };
        last = (now, usage.cpu_seconds);
        let load = shedding.overridden.lock().unwrap_or(measured);
        let before = shedding.level();
        let level = shedder.observe(load, now);
        if level != before {
            shedding.level.store(level, Ordering::Relaxed);
            if level > before {
                warn!(
                    level,
                    cpu_percent = (load.cpu * 100.0).round(),
                    resident_bytes = load.resident_bytes,
                    "overloaded: shedding {}",
                    describe(level)
                );
            } else {
                info!(level, "load down: shedding {}", describe(level));
            }
        }
    }
}

fn describe(level: u8) -> &'static str {
    match level {
        0 => "nothing",
        DROP_QOS0 => "QoS 0 publishes on topics that are not critical",
        _ => "QoS 0 publishes on topics that are not critical, and new connections",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(cpu: u8, memory: u64) -> ferrymq_config::Limits {
        ferrymq_config::Limits {
            shed_cpu_percent: cpu,
            shed_memory: memory,
            shed_window: Duration::from_secs(5),
            ..ferrymq_config::Limits::default()
        }
    }

    fn load(cpu: f64, resident_bytes: u64) -> Load {
        Load {
            cpu,
            resident_bytes,
        }
    }

    #[test]
    fn steps_up_after_a_window_over_and_back_after_a_window_under() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut shedder = Shedder::new(&limits(90, 0));
        // (second, cpu share, expected level)
        let steps = [
            (0, 0.5, 0),
            (1, 0.95, 0),
            (5, 0.95, 0),
            (6, 0.95, DROP_QOS0),
            (10, 0.95, DROP_QOS0),
            (11, 0.95, REFUSE_CONNECTIONS),
            (30, 0.99, REFUSE_CONNECTIONS),
            // A dip shorter than the window changes nothing.
            (31, 0.2, REFUSE_CONNECTIONS),
            (33, 0.95, REFUSE_CONNECTIONS),
            (34, 0.2, REFUSE_CONNECTIONS),
            (39, 0.2, DROP_QOS0),
            (43, 0.2, DROP_QOS0),
            (44, 0.2, 0),
            (100, 0.2, 0),
        ];
        for (second, cpu, expected) in steps {
            assert_eq!(
                shedder.observe(load(cpu, 0), at(second)),
                expected,
                "at {second} s, cpu {cpu}"
            );
        }
    }

    #[test]
    fn memory_counts_too_and_zero_turns_a_limit_off() {
        let start = Instant::now();
        let later = start + Duration::from_secs(6);
        let mut memory = Shedder::new(&limits(0, 1 << 20));
        assert!(memory.enabled());
        memory.observe(load(1.0, 2 << 20), start);
        assert_eq!(memory.observe(load(1.0, 2 << 20), later), DROP_QOS0);
        let mut cpu_only = Shedder::new(&limits(90, 0));
        cpu_only.observe(load(0.1, u64::MAX), start);
        assert_eq!(cpu_only.observe(load(0.1, u64::MAX), later), 0);
        assert!(!Shedder::new(&limits(0, 0)).enabled());
    }

    #[test]
    fn this_process_can_be_read() {
        let usage = ProcessUsage::read();
        assert!(usage.resident_bytes > 0);
        assert_eq!(usage.open_fds, 0, "not listed every second");
        assert!(ProcessUsage::with_open_fds().open_fds > 0);
    }
}
