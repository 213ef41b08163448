//! Keep-alive deadlines of every connection in one ordered queue, served
//! by one task, instead of a timer inside each connection.
//!
//! A connection with a keep alive puts its deadline here (1.5 times the
//! keep alive after its last packet, as far as it knew when it put it) and
//! takes it out when it closes. When a deadline comes, the task rings that
//! connection's doorbell with [`ALARM`]; the connection then compares the
//! time of its last packet with the limit, closes, or puts its next
//! deadline in. A busy connection so touches this queue once per keep-alive
//! period, not once per packet, and an idle one costs an entry here (about
//! 40 bytes) instead of a timer in its task.
//!
//! [`Deadlines`] is the queue without I/O (table-tested); [`KeepAlive`]
//! locks it and [`KeepAlive::run`] is the task; [`Watch`] is what a
//! connection keeps: its limit, its last packet and the deadline it put in.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::doorbell::ALARM;
use crate::outbox::Outbox;

/// Deadlines by (instant, connection number), each with what to tell.
#[derive(Debug)]
pub struct Deadlines<T> {
    entries: BTreeMap<(Instant, u64), T>,
}

impl<T> Default for Deadlines<T> {
    fn default() -> Self {
        Deadlines {
            entries: BTreeMap::new(),
        }
    }
}

impl<T> Deadlines<T> {
    /// Puts connection `id`'s deadline `at`. Returns whether it is now the
    /// first one (the task must wake earlier than it planned).
    pub fn insert(&mut self, at: Instant, id: u64, item: T) -> bool {
        self.entries.insert((at, id), item);
        self.entries.first_key_value().map(|(k, _)| *k) == Some((at, id))
    }

    /// Takes connection `id`'s deadline `at` out (it closed, or moved it).
    pub fn remove(&mut self, at: Instant, id: u64) -> Option<T> {
        self.entries.remove(&(at, id))
    }

    /// Takes out every deadline at or before `now`, earliest first.
    pub fn due(&mut self, now: Instant) -> Vec<T> {
        let mut due = Vec::new();
        while let Some(entry) = self.entries.first_entry() {
            if entry.key().0 > now {
                break;
            }
            due.push(entry.remove());
        }
        due
    }

    /// The first deadline.
    pub fn next(&self) -> Option<Instant> {
        self.entries.first_key_value().map(|(k, _)| k.0)
    }

    /// How many are held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none is held.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The broker's keep-alive deadlines and the wake of their task.
pub struct KeepAlive {
    deadlines: Mutex<Deadlines<Arc<Outbox>>>,
    /// A deadline earlier than all others was put in.
    earlier: Notify,
    /// What connections count their times from ([`Watch`]: milliseconds
    /// since this, eight bytes where an `Instant` takes sixteen).
    epoch: Instant,
}

impl Default for KeepAlive {
    fn default() -> Self {
        KeepAlive {
            deadlines: Mutex::default(),
            earlier: Notify::new(),
            epoch: Instant::now(),
        }
    }
}

impl KeepAlive {
    /// Now, in milliseconds since the epoch.
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The instant `ms` milliseconds after the epoch.
    fn at(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }

    /// Puts connection `id`'s deadline: at `at`, its session queue's
    /// doorbell is rung with [`ALARM`].
    pub fn insert(&self, at: Instant, id: u64, outbox: Arc<Outbox>) {
        if self.deadlines.lock().insert(at, id, outbox) {
            self.earlier.notify_one();
        }
    }

    /// Takes connection `id`'s deadline `at` out.
    pub fn remove(&self, at: Instant, id: u64) {
        // Dropped outside the lock: it may be the last hold on the queue.
        let removed = self.deadlines.lock().remove(at, id);
        drop(removed);
    }

    /// How many deadlines are held.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.deadlines.lock().len()
    }

    /// The task: rings each deadline when it comes, until shutdown.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) {
        loop {
            let next = self.deadlines.lock().next();
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            // Each branch only waits; dropping the others loses nothing
            // (`earlier` keeps its permit, the next loop reads the queue
            // again).
            tokio::select! {
                () = sleep => {}
                () = self.earlier.notified() => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            let due = self.deadlines.lock().due(Instant::now());
            for outbox in due {
                outbox.doorbell().ring(ALARM);
            }
        }
    }
}

/// A connection's keep-alive: its limit (1.5 times the keep alive; none
/// when 0), the time of its last packet, and the alarm it has in the
/// broker's keep-alive queue. An awake connection also has its quiet
/// checks there (`dormant::rest`: one that finds it quiet puts it to
/// sleep, or, if it may not sleep, lets its buffers go): its alarm is
/// then its keep-alive deadline or its next quiet check, whichever comes
/// first. A connection that rests (dormant, or awake with its buffers let
/// go) has no quiet checks until something stirs it. Times are
/// milliseconds since the queue's epoch: every connection, dormant ones
/// too, holds one of these.
pub(crate) struct Watch {
    last_packet_ms: u64,
    /// The alarm it put in the queue (0: none).
    deadline_ms: u64,
    /// In milliseconds (at most 1.5 times 65,535 s), 0 for none.
    limit_ms: u32,
    /// It may go dormant.
    sleepy: bool,
    /// Accepted, and nothing read or delivered since its CONNACK, and it
    /// has not rested yet.
    fresh: bool,
    /// Something was read or delivered since the last quiet check.
    stirred: bool,
    /// Awake, with its buffers let go: no quiet checks until stirred.
    resting: bool,
}

/// What an alarm meant (see [`Watch::alarm`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Alarm {
    /// Not this connection's alarm (its deadline has not come): a kick.
    Other,
    /// The client has been silent for longer than the limit.
    Expired,
    /// A quiet check (or a keep-alive deadline passed in time) came;
    /// `quiet`: nothing was read or delivered since the last one.
    Checked { quiet: bool },
}

impl Watch {
    /// `sleepy`: the connection may go dormant. Its last packet is now.
    pub(crate) fn new(queue: &KeepAlive, limit: Option<Duration>, sleepy: bool) -> Watch {
        Watch {
            last_packet_ms: queue.now_ms(),
            deadline_ms: 0,
            limit_ms: limit.map_or(0, |l| u32::try_from(l.as_millis()).unwrap_or(u32::MAX)),
            sleepy,
            fresh: true,
            stirred: false,
            resting: false,
        }
    }

    /// A packet came now.
    pub(crate) fn packet(&mut self, queue: &KeepAlive) {
        self.last_packet_ms = queue.now_ms();
    }

    /// Whether the connection may go dormant (decided when it was
    /// accepted).
    pub(crate) fn sleepy(&self) -> bool {
        self.sleepy
    }

    /// Whether it is fresh: accepted and not stirred since.
    pub(crate) fn fresh(&self) -> bool {
        self.fresh
    }

    /// Something was read or delivered. A resting connection's quiet
    /// checks start again.
    pub(crate) fn stir(&mut self, queue: &KeepAlive, connection: u64, outbox: &Arc<Outbox>) {
        let was_resting = self.resting;
        self.woken();
        if was_resting {
            self.disarm(queue, connection);
            self.arm(queue, connection, outbox, true);
        }
    }

    /// Stirred, without putting its quiet checks back in (a dormant one
    /// woken: `Conn::run` puts them in when the connection runs again).
    pub(crate) fn woken(&mut self) {
        self.stirred = true;
        self.fresh = false;
        self.resting = false;
    }

    /// It stays awake but lets its buffers go (it may not sleep): no
    /// quiet checks until it is stirred, only its keep-alive deadline.
    pub(crate) fn rest(&mut self, queue: &KeepAlive, connection: u64, outbox: &Arc<Outbox>) {
        self.fresh = false;
        self.resting = true;
        self.disarm(queue, connection);
        self.arm(queue, connection, outbox, false);
    }

    /// Puts the alarm in: the limit after the last packet, or the next
    /// quiet check if that comes first (`awake`: not for a connection
    /// going dormant or resting, which needs no quiet check).
    pub(crate) fn arm(
        &mut self,
        queue: &KeepAlive,
        connection: u64,
        outbox: &Arc<Outbox>,
        awake: bool,
    ) {
        let deadline = (self.limit_ms > 0).then(|| self.last_packet_ms + u64::from(self.limit_ms));
        let quiet = u64::try_from(crate::dormant::QUIET.as_millis()).unwrap_or(u64::MAX);
        let check = awake.then(|| queue.now_ms() + quiet);
        let at = match (deadline, check) {
            (Some(d), Some(c)) => Some(d.min(c)),
            (d, c) => d.or(c),
        };
        if let Some(at) = at {
            let at = at.max(1);
            queue.insert(queue.at(at), connection, outbox.clone());
            self.deadline_ms = at;
        }
    }

    /// Takes the alarm out (the connection ends, or goes dormant and puts
    /// in another).
    pub(crate) fn disarm(&mut self, queue: &KeepAlive, connection: u64) {
        if self.deadline_ms > 0 {
            queue.remove(queue.at(self.deadline_ms), connection);
            self.deadline_ms = 0;
        }
    }

    /// On an alarm: whether the client has been silent for longer than the
    /// limit, or a quiet check came. Unless it expired, and if the alarm
    /// put in has come (the keep-alive task took it out when it rang),
    /// puts the next one in.
    pub(crate) fn alarm(
        &mut self,
        queue: &KeepAlive,
        connection: u64,
        outbox: &Arc<Outbox>,
    ) -> Alarm {
        if self.deadline_ms == 0 || Instant::now() < queue.at(self.deadline_ms) {
            return Alarm::Other;
        }
        self.deadline_ms = 0;
        let now = queue.now_ms();
        if self.limit_ms > 0 && now >= self.last_packet_ms + u64::from(self.limit_ms) {
            return Alarm::Expired;
        }
        let quiet = !std::mem::replace(&mut self.stirred, false);
        self.arm(queue, connection, outbox, !self.resting);
        Alarm::Checked { quiet }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn deadlines_come_due_in_order_and_only_when_reached() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut d = Deadlines::default();
        assert!(d.insert(t0 + 3 * s, 1, "c1"));
        assert!(!d.insert(t0 + 5 * s, 2, "c2"));
        // Earlier than all: the task must wake sooner.
        assert!(d.insert(t0 + s, 3, "c3"));
        // Same instant, another connection: both kept.
        assert!(!d.insert(t0 + 3 * s, 4, "c4"));
        assert_eq!(d.next(), Some(t0 + s));
        assert_eq!(d.due(t0), Vec::<&str>::new());
        assert_eq!(d.due(t0 + s), vec!["c3"]);
        assert_eq!(d.due(t0 + 4 * s), vec!["c1", "c4"]);
        assert_eq!(d.len(), 1);
        assert_eq!(d.due(t0 + 10 * s), vec!["c2"]);
        assert!(d.is_empty());
        assert_eq!(d.next(), None);
    }

    #[test]
    fn a_removed_deadline_never_comes_due() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut d = Deadlines::default();
        d.insert(t0 + s, 1, "c1");
        d.insert(t0 + 2 * s, 2, "c2");
        assert_eq!(d.remove(t0 + s, 1), Some("c1"));
        // Another connection's key, or the same connection at another
        // instant, is not removed.
        assert_eq!(d.remove(t0 + 2 * s, 1), None);
        assert_eq!(d.remove(t0 + s, 2), None);
        assert_eq!(d.next(), Some(t0 + 2 * s));
        assert_eq!(d.due(t0 + 3 * s), vec!["c2"]);
    }

    /// A connection that may not sleep rests instead (its buffers let
    /// go): from then on its alarm is its keep-alive deadline only, until
    /// something stirs it, which brings its quiet checks back (a resting
    /// connection woken every 2 s for a check would cost its task a wake
    /// for nothing).
    #[tokio::test(start_paused = true)]
    async fn a_resting_connection_has_no_quiet_checks_until_it_is_stirred() {
        let queue = KeepAlive::default();
        let outbox = crate::outbox::Outbox::for_tests();
        let quiet = crate::dormant::QUIET;
        let mut watch = Watch::new(&queue, Some(Duration::from_secs(60)), false);
        let check_at = |queue: &KeepAlive| queue.now_ms() + quiet.as_millis() as u64;
        // What the queue's task does when an alarm comes: takes it out.
        let ring = |queue: &KeepAlive| drop(queue.deadlines.lock().due(Instant::now()));
        assert!(watch.fresh(), "fresh, though it may not sleep");
        watch.arm(&queue, 1, &outbox, true);
        assert_eq!(watch.deadline_ms, check_at(&queue));
        watch.rest(&queue, 1, &outbox);
        assert!(!watch.fresh());
        assert_eq!(watch.deadline_ms, watch.last_packet_ms + 60_000);
        assert_eq!(queue.held(), 1, "one alarm");
        tokio::time::advance(Duration::from_secs(10)).await;
        watch.packet(&queue);
        watch.stir(&queue, 1, &outbox);
        assert_eq!(watch.deadline_ms, check_at(&queue), "checks again");
        assert_eq!(queue.held(), 1, "still one alarm");
        // Its check: stirred since, so not quiet; the next one is put in.
        tokio::time::advance(quiet).await;
        ring(&queue);
        assert_eq!(
            watch.alarm(&queue, 1, &outbox),
            Alarm::Checked { quiet: false }
        );
        assert_eq!(watch.deadline_ms, check_at(&queue));
        // The next finds it quiet; it rests again.
        tokio::time::advance(quiet).await;
        ring(&queue);
        assert_eq!(
            watch.alarm(&queue, 1, &outbox),
            Alarm::Checked { quiet: true }
        );
        watch.rest(&queue, 1, &outbox);
        assert_eq!(watch.deadline_ms, watch.last_packet_ms + 60_000);
        // A stir while it does not rest puts nothing more in.
        watch.stir(&queue, 1, &outbox);
        let armed = watch.deadline_ms;
        watch.stir(&queue, 1, &outbox);
        assert_eq!(watch.deadline_ms, armed);
        assert_eq!(queue.held(), 1);
    }

    /// The doorbell bits rung since the last look.
    async fn rung(outbox: &Outbox) -> u8 {
        use crate::doorbell::READY;
        std::future::poll_fn(|cx| std::task::Poll::Ready(outbox.doorbell().take(cx, READY | ALARM)))
            .await
    }

    #[tokio::test(start_paused = true)]
    async fn the_task_rings_a_doorbell_at_its_deadline_and_not_before() {
        let keep_alive = Arc::new(KeepAlive::default());
        let (_stop, shutdown) = watch::channel(false);
        let task = tokio::spawn({
            let keep_alive = keep_alive.clone();
            async move { keep_alive.run(shutdown).await }
        });
        let outbox = crate::outbox::Outbox::for_tests();
        let start = Instant::now();
        keep_alive.insert(start + Duration::from_secs(90), 7, outbox.clone());
        // An earlier one put in later still comes first.
        let other = crate::outbox::Outbox::for_tests();
        keep_alive.insert(start + Duration::from_secs(30), 8, other.clone());
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert_eq!(rung(&other).await, 0);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(rung(&other).await, ALARM);
        assert_eq!(rung(&outbox).await, 0);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(rung(&outbox).await, ALARM);
        assert_eq!(keep_alive.held(), 0);
        // Removed before it came: never rung.
        keep_alive.insert(start + Duration::from_secs(120), 7, outbox.clone());
        keep_alive.remove(start + Duration::from_secs(120), 7);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(rung(&outbox).await, 0);
        task.abort();
    }
}
