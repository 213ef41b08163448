//! Router micro-benchmarks: matching one published topic against the
//! topic tree holding 10,000 and 100,000 subscriptions, and what one
//! subscribe / unsubscribe costs in such a tree.
//!
//! Topics have four levels, `site-S/area-A/sensor-M/METRIC` (10 areas per
//! site, 10 sensors per area, 5 metrics). Two subscription sets, one
//! session per filter:
//! - exact: every filter is a topic (`site-3/area-1/sensor-7/temp`); a
//!   topic matches 1 filter.
//! - wildcard: per site, `site-S/#`, `site-S/area-A/#`,
//!   `site-S/area-A/+/METRIC`, `site-S/+/sensor-M/METRIC` and
//!   `site-S/+/+/METRIC` (116 filters); a topic matches 5 filters.
//!
//! `match` is the tree walk a route cache miss does (`Router::routes`,
//! routes built and merged by session), over 1,024 topics in turn, one
//! match per element. `cache-hit` and `cache-miss` ask the connection's
//! route cache, as the publish path does: 64 topics in turn (always
//! cached), or 1,024 in turn (more than the cache's 256 entries, so every
//! ask is a miss). `subscribe` adds filters that are not in the tree yet
//! (new sites, their nodes created), `unsubscribe` removes them again
//! (nodes pruned), 10,000 at a time, so the tree never holds more than
//! 10,000 extra subscriptions. `one-filter` does the same on one filter
//! that 100,000 sessions have already (a `broadcast` topic every client
//! subscribes to).
//!
//! The router is private to the broker; it is reached through
//! `ferrymq_broker::bench_support`, which is not a stable API.
//!
//! Run: `cargo bench --bench router`. Under `cargo test --benches` each
//! benchmark runs once, as a smoke test.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ferrymq_broker::QoS;
use ferrymq_broker::bench_support::{BenchRouter, BenchSession};

const AREAS: usize = 10;
const SENSORS: usize = 10;
const METRICS: [&str; 5] = ["temp", "humidity", "pressure", "battery", "status"];
/// Topics matched in turn by `match` (a power of two).
const TOPICS: usize = 1024;
/// Filters added (then removed) at a time by `subscribe` / `unsubscribe`.
const CHURN: usize = 10_000;

#[derive(Clone, Copy, Debug)]
enum Set {
    Exact,
    Wildcard,
}

impl Set {
    fn name(self) -> &'static str {
        match self {
            Set::Exact => "exact",
            Set::Wildcard => "wildcard",
        }
    }

    /// Routes each topic of a full site gets.
    fn matches_per_topic(self) -> usize {
        match self {
            Set::Exact => 1,
            Set::Wildcard => 5,
        }
    }

    /// Every filter of one site, in order.
    fn site_filters(self, s: usize) -> Vec<String> {
        let mut out = Vec::new();
        match self {
            Set::Exact => {
                for a in 0..AREAS {
                    for m in 0..SENSORS {
                        for metric in METRICS {
                            out.push(format!("site-{s}/area-{a}/sensor-{m}/{metric}"));
                        }
                    }
                }
            }
            Set::Wildcard => {
                out.push(format!("site-{s}/#"));
                for a in 0..AREAS {
                    out.push(format!("site-{s}/area-{a}/#"));
                    for metric in METRICS {
                        out.push(format!("site-{s}/area-{a}/+/{metric}"));
                    }
                }
                for m in 0..SENSORS {
                    for metric in METRICS {
                        out.push(format!("site-{s}/+/sensor-{m}/{metric}"));
                    }
                }
                for metric in METRICS {
                    out.push(format!("site-{s}/+/+/{metric}"));
                }
            }
        }
        out
    }

    /// `n` filters, sites `first_site..` in order.
    fn filters(self, first_site: usize, n: usize) -> Vec<String> {
        (first_site..)
            .flat_map(|s| self.site_filters(s))
            .take(n)
            .collect()
    }

    /// Sites whose filters are all among the first `n`.
    fn full_sites(self, n: usize) -> usize {
        n / self.site_filters(0).len()
    }
}

/// xorshift64: deterministic topic choice without a dependency.
fn next(state: &mut u64) -> usize {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state as usize
}

/// `count` topics spread over the first `sites` sites.
fn topics(sites: usize, count: usize) -> Vec<String> {
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    (0..count)
        .map(|_| {
            format!(
                "site-{}/area-{}/sensor-{}/{}",
                next(&mut rng) % sites,
                next(&mut rng) % AREAS,
                next(&mut rng) % SENSORS,
                METRICS[next(&mut rng) % METRICS.len()]
            )
        })
        .collect()
}

fn router(c: &mut Criterion) {
    let mut group = c.benchmark_group("router");
    for set in [Set::Exact, Set::Wildcard] {
        for n in [10_000usize, 100_000] {
            let mut router = BenchRouter::new();
            let filters = set.filters(0, n);
            let sessions: Vec<BenchSession> = (0..n as u64).map(|i| router.session(i)).collect();
            for (filter, session) in filters.iter().zip(&sessions) {
                router.subscribe(filter, session, QoS::AtLeastOnce);
            }
            let sites = set.full_sites(n);
            let topics = topics(sites, TOPICS);
            for topic in &topics {
                assert_eq!(router.routes(topic), set.matches_per_topic(), "{topic}");
            }
            let id = format!("{}/{n}", set.name());
            group.throughput(Throughput::Elements(1));
            group.bench_function(BenchmarkId::new("match", &id), |b| {
                let mut i = 0;
                b.iter(|| {
                    let topic = &topics[i % TOPICS];
                    i += 1;
                    black_box(router.routes(black_box(topic)))
                })
            });
            if matches!(set, Set::Wildcard) && n == 100_000 {
                group.bench_function(BenchmarkId::new("cache-hit", &id), |b| {
                    let mut i = 0;
                    b.iter(|| {
                        let topic = &topics[i % 64];
                        i += 1;
                        black_box(router.cached_routes(black_box(topic)))
                    })
                });
                group.bench_function(BenchmarkId::new("cache-miss", &id), |b| {
                    let mut i = 0;
                    b.iter(|| {
                        let topic = &topics[i % TOPICS];
                        i += 1;
                        black_box(router.cached_routes(black_box(topic)))
                    })
                });
            }
            // Filters not in the tree: the sites after the set's.
            let churn = set.filters(sites + 1, CHURN);
            let churners: Vec<BenchSession> = (0..CHURN as u64)
                .map(|i| router.session(n as u64 + i))
                .collect();
            group.bench_function(BenchmarkId::new("subscribe", &id), |b| {
                b.iter_custom(|iters| {
                    churn_timed(&router, &churn, &churners, iters, Timed::Subscribe)
                })
            });
            group.bench_function(BenchmarkId::new("unsubscribe", &id), |b| {
                b.iter_custom(|iters| {
                    churn_timed(&router, &churn, &churners, iters, Timed::Unsubscribe)
                })
            });
        }
    }
    // One filter every session subscribes to (a `broadcast` topic): what
    // one more subscriber costs when 100,000 have it already.
    let router = BenchRouter::new();
    let members = 100_000u64;
    for i in 0..members {
        router.subscribe("broadcast", &router.session(i), QoS::AtMostOnce);
    }
    let churn = vec!["broadcast".to_owned(); CHURN];
    let churners: Vec<BenchSession> = (0..CHURN as u64)
        .map(|i| router.session(members + i))
        .collect();
    let id = format!("one-filter/{members}");
    for (name, timed) in [
        ("subscribe", Timed::Subscribe),
        ("unsubscribe", Timed::Unsubscribe),
    ] {
        group.bench_function(BenchmarkId::new(name, &id), |b| {
            b.iter_custom(|iters| churn_timed(&router, &churn, &churners, iters, timed))
        });
    }
    group.finish();
}

#[derive(Clone, Copy, PartialEq)]
enum Timed {
    Subscribe,
    Unsubscribe,
}

/// Subscribes and unsubscribes `iters` filters of `churn`, at most
/// `churn.len()` at a time, timing only the `timed` half.
fn churn_timed(
    router: &BenchRouter,
    churn: &[String],
    sessions: &[BenchSession],
    iters: u64,
    timed: Timed,
) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters as usize;
    while left > 0 {
        let k = left.min(churn.len());
        left -= k;
        let pairs = churn[..k].iter().zip(sessions);
        let started = Instant::now();
        for (filter, session) in pairs.clone() {
            black_box(router.subscribe(filter, session, QoS::AtLeastOnce));
        }
        if timed == Timed::Subscribe {
            total += started.elapsed();
        }
        let started = Instant::now();
        for (filter, session) in pairs {
            black_box(router.unsubscribe(filter, session));
        }
        if timed == Timed::Unsubscribe {
            total += started.elapsed();
        }
    }
    total
}

criterion_group!(benches, router);
criterion_main!(benches);
