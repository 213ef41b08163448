//! Dormant connections: an idle plain-TCP connection gives up its task
//! and its registration with tokio, and waits as compact state in one
//! set ([`Dormancy`]) until its socket has something to read or its
//! session queue's doorbell rings (a delivery, a kick, its keep-alive
//! deadline); then it is handed back to the connection code, which runs
//! it as a task again.
//!
//! A connection's task is the largest thing an idle connection holds
//! (its future, every state it may be in, rounded up by tokio), and
//! tokio's registration of its socket the next; a dormant connection
//! holds neither: its socket is watched by one epoll instance of the
//! set's own (registered with tokio once, for all of them), its doorbell
//! keeps a waker that names its slot in the set, and one task serves the
//! set: it takes what woke, takes each woken connection out of the set
//! and hands it back.
//!
//! [`rest`] is the policy (without I/O, table-tested): when an idle
//! connection goes dormant. The set knows nothing of MQTT: it holds a
//! socket and the connection's state (`C`) and hands both back.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Poll, Wake, Waker};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use mio::unix::SourceFd;
use mio::{Events, Interest, Token};
use parking_lot::Mutex;
use tokio::io::unix::AsyncFd;
use tracing::warn;

use crate::doorbell::{ALARM, Doorbell, READY};

/// An idle connection woken from dormancy goes dormant again after a
/// quiet spell of this (to twice this) long: a connection with steady
/// traffic stays a task instead of going to sleep and waking for every
/// message.
pub(crate) const QUIET: Duration = Duration::from_secs(2);

/// At most this many connections are woken in one turn of the set's task
/// before it lets other tasks run (the woken ones' among them).
const WAKE_BATCH: usize = 256;

/// What an idle connection does now (see [`rest`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rest {
    /// Go dormant.
    Sleep,
    /// Stay a task, but let go of its buffers and stop its quiet checks
    /// until something stirs it: it may not sleep (TLS, WebSocket, or
    /// dormant connections off).
    Trim,
    /// Stay as it is: it was not quiet for long enough.
    Stay,
}

/// The policy. `idle`: the connection has nothing to read, write, send
/// or wait for but its socket and its doorbell (no buffered bytes, no
/// acknowledgement waiting for the store, no publish waiting for room, no
/// publish-rate pause). `fresh`: it was accepted and has not been stirred
/// since its CONNACK (it rests at once, so that thousands of clients
/// connecting together never all hold a task, or buffers, at the same
/// time). `quiet_check`: its quiet check came (`QUIET` after the previous
/// one) with nothing read or delivered since then. `may_sleep`: it may go
/// dormant (plain TCP, with dormant connections on).
///
/// A busy connection keeps its buffers from one turn to the next: letting
/// them go whenever a turn found nothing more to do made and freed them
/// (and the acknowledgements' queue) for every burst of traffic.
pub(crate) fn rest(idle: bool, fresh: bool, quiet_check: bool, may_sleep: bool) -> Rest {
    match (idle && (fresh || quiet_check), may_sleep) {
        (false, _) => Rest::Stay,
        (true, true) => Rest::Sleep,
        (true, false) => Rest::Trim,
    }
}

/// The set of dormant connections; `C` is the state each keeps.
pub(crate) struct Dormancy<C> {
    /// The set's epoll instance, taken by its task when it starts.
    poll: Mutex<Option<mio::Poll>>,
    /// Where sockets are added and removed, from any thread.
    registry: mio::Registry,
    slots: Mutex<Slots<C>>,
    /// Connections whose doorbell rang since the task last looked.
    rung: Mutex<Vec<Arc<Entry<C>>>>,
    /// The task's waker.
    task: AtomicWaker,
    /// How many connections are dormant.
    held: AtomicUsize,
}

/// The dormant connections by slot; a slot's token is its index and the
/// generation it was given at (a late event for a connection gone from it
/// does not wake the next one).
struct Slots<C> {
    entries: Vec<Option<Arc<Entry<C>>>>,
    free: Vec<u32>,
    generation: u32,
}

/// One dormant connection, and its doorbell's waker.
struct Entry<C> {
    token: u64,
    sleeper: Mutex<Sleeper<C>>,
    home: Weak<Dormancy<C>>,
}

/// What an entry holds, and whether it is still going to sleep.
struct Sleeper<C> {
    /// The socket and the state; `None` once taken.
    held: Option<(std::net::TcpStream, C)>,
    /// Still going to sleep: [`Dormancy::sleep`] has not yet handed over
    /// both the socket and the doorbell. The set's task does not take it
    /// then (served on by a new task while `sleep` still registers the
    /// set's waker with the doorbell, it would lose its doorbell's rings
    /// to the set), and marks it `woken` instead: `sleep` hands it back.
    arming: bool,
    /// Woken while going to sleep.
    woken: bool,
}

impl<C: Send + 'static> Wake for Entry<C> {
    fn wake(self: Arc<Self>) {
        if let Some(home) = self.home.upgrade() {
            home.rung.lock().push(self);
            home.task.wake();
        }
    }
}

fn slot_of(token: u64) -> usize {
    (token & u64::from(u32::MAX)) as usize
}

impl<C: Send + 'static> Dormancy<C> {
    /// A set with its own epoll instance.
    pub(crate) fn new() -> std::io::Result<Arc<Self>> {
        let poll = mio::Poll::new()?;
        let registry = poll.registry().try_clone()?;
        Ok(Arc::new(Dormancy {
            poll: Mutex::new(Some(poll)),
            registry,
            slots: Mutex::new(Slots {
                entries: Vec::new(),
                free: Vec::new(),
                generation: 0,
            }),
            rung: Mutex::new(Vec::new()),
            task: AtomicWaker::new(),
            held: AtomicUsize::new(0),
        }))
    }

    /// How many connections are dormant now.
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Puts a connection to sleep: its socket (taken from tokio) and its
    /// state, woken by the socket becoming readable (or closed) or by
    /// `doorbell` ringing. `Err` gives both back, for the caller to serve
    /// on: the socket could not be watched, or the connection was woken
    /// before it was asleep (a ring or a byte before or during this call:
    /// epoll reports a socket readable when it is added, and the
    /// doorbell's bits still set are looked at after its waker is). Once
    /// this returns `Ok`, the set's task may hand the connection out at
    /// any moment, and this call touches nothing of it any more.
    pub(crate) fn sleep(
        self: &Arc<Self>,
        socket: std::net::TcpStream,
        state: C,
        doorbell: &Doorbell,
    ) -> Result<(), (std::net::TcpStream, C)> {
        let fd = socket.as_raw_fd();
        let entry = self.enter(socket, state);
        let watched = self.watch(&entry, fd, doorbell);
        self.settle(
            &entry,
            watched.is_ok() && doorbell.rung() & (READY | ALARM) == 0,
        )
    }

    /// The first step of [`Dormancy::sleep`]: the connection in a slot of
    /// the set, going to sleep (not to be taken yet).
    fn enter(self: &Arc<Self>, socket: std::net::TcpStream, state: C) -> Arc<Entry<C>> {
        let mut slots = self.slots.lock();
        slots.generation = slots.generation.wrapping_add(1);
        let slot = match slots.free.pop() {
            Some(slot) => slot,
            None => {
                slots.entries.push(None);
                u32::try_from(slots.entries.len() - 1).expect("fewer than 2^32 connections")
            }
        };
        let entry = Arc::new(Entry {
            token: (u64::from(slots.generation) << 32) | u64::from(slot),
            sleeper: Mutex::new(Sleeper {
                held: Some((socket, state)),
                arming: true,
                woken: false,
            }),
            home: Arc::downgrade(self),
        });
        slots.entries[slot as usize] = Some(entry.clone());
        self.held.fetch_add(1, Ordering::Relaxed);
        entry
    }

    /// The second: its socket (`fd`) watched by the set's epoll instance,
    /// and the set's waker for it registered with its doorbell.
    fn watch(&self, entry: &Arc<Entry<C>>, fd: RawFd, doorbell: &Doorbell) -> std::io::Result<()> {
        let token = Token(usize::try_from(entry.token).expect("64-bit tokens"));
        if let Err(e) = self
            .registry
            .register(&mut SourceFd(&fd), token, Interest::READABLE)
        {
            warn!("could not watch an idle connection's socket, it stays awake: {e}");
            return Err(e);
        }
        doorbell.register(&Waker::from(entry.clone()));
        Ok(())
    }

    /// The last: asleep (`Ok`; from here on the set's task may take it),
    /// or, when it was woken meanwhile or `asleep` is false, taken out of
    /// the set again and given back.
    fn settle(&self, entry: &Arc<Entry<C>>, asleep: bool) -> Result<(), (std::net::TcpStream, C)> {
        let mut sleeper = entry.sleeper.lock();
        sleeper.arming = false;
        if asleep && !sleeper.woken {
            return Ok(());
        }
        let held = sleeper.held.take().expect("not taken while arming");
        drop(sleeper);
        self.free(entry);
        Err(held)
    }

    /// Takes `entry`'s connection out of the set: `None` when it was taken
    /// already, or is still going to sleep (then marked woken, and
    /// `sleep` hands it back). Its socket stays watched until
    /// [`Dormancy::forget`].
    fn take(&self, entry: &Arc<Entry<C>>) -> Option<(std::net::TcpStream, C)> {
        let held = {
            let mut sleeper = entry.sleeper.lock();
            if sleeper.arming {
                sleeper.woken = true;
                return None;
            }
            sleeper.held.take()?
        };
        self.free(entry);
        Some(held)
    }

    /// Gives `entry`'s slot back (its connection was taken).
    fn free(&self, entry: &Entry<C>) {
        {
            let mut slots = self.slots.lock();
            let slot = slot_of(entry.token);
            slots.entries[slot] = None;
            slots.free.push(slot as u32);
        }
        self.held.fetch_sub(1, Ordering::Relaxed);
    }

    /// Stops watching a woken connection's socket: the first thing its new
    /// task does (not the set's task, which so wakes a crowd faster; until
    /// then an event for it names a slot it left, and is ignored).
    pub(crate) fn forget(&self, socket: &std::net::TcpStream) {
        // Failing only if it was never added (then there is nothing to take
        // out), or closed (then epoll forgot it by itself).
        let _ = self.registry.deregister(&mut SourceFd(&socket.as_raw_fd()));
    }

    /// The entry in `token`'s slot, if it is still the one the token names.
    fn entry(&self, token: u64) -> Option<Arc<Entry<C>>> {
        let slots = self.slots.lock();
        let entry = slots.entries.get(slot_of(token))?.as_ref()?;
        (entry.token == token).then(|| entry.clone())
    }

    /// The set's task: hands every woken connection to `wake` (which runs
    /// it as a task again, and first `forget`s its socket), for as long as
    /// it runs. When it ends (the
    /// broker stops, the runtime goes), the connections still dormant are
    /// dropped, their sockets closed.
    pub(crate) async fn run(self: Arc<Self>, wake: impl Fn(std::net::TcpStream, C)) {
        /// Drops what is still dormant when the task ends.
        struct Clear<'a, C>(&'a Dormancy<C>);
        impl<C> Drop for Clear<'_, C> {
            fn drop(&mut self) {
                let entries = std::mem::take(&mut self.0.slots.lock().entries);
                for entry in entries.into_iter().flatten() {
                    drop(entry.sleeper.lock().held.take());
                }
                self.0.rung.lock().clear();
            }
        }
        let _clear = Clear(&*self);
        let Some(poll) = self.poll.lock().take() else {
            return;
        };
        // SAFETY: the epoll instance's descriptor is the `mio::Poll`'s own,
        // which the `AsyncFd` owns: it stays open, and the same, until the
        // `AsyncFd` is dropped (I/O safety, as `register_with_interest`
        // asks; `mio::Poll` has no `AsFd` that a safe constructor could use).
        #[allow(unsafe_code)]
        let registered =
            unsafe { AsyncFd::register_with_interest(poll, tokio::io::Interest::READABLE) };
        let mut poll = match registered {
            Ok(poll) => poll,
            Err(e) => {
                warn!("idle connections cannot go dormant: {e}");
                return std::future::pending().await;
            }
        };
        let mut events = Events::with_capacity(WAKE_BATCH);
        let mut woken = Vec::new();
        std::future::poll_fn(|cx| {
            self.task.register(cx.waker());
            woken.append(&mut *self.rung.lock());
            while woken.len() < WAKE_BATCH {
                let Poll::Ready(Ok(mut ready)) = poll.poll_read_ready_mut(cx) else {
                    break;
                };
                events.clear();
                if let Err(e) = ready
                    .get_inner_mut()
                    .poll(&mut events, Some(Duration::ZERO))
                    && e.kind() != std::io::ErrorKind::Interrupted
                {
                    warn!("waiting on idle connections: {e}");
                }
                if events.is_empty() {
                    // Nothing more: tokio watches the epoll instance again.
                    ready.clear_ready();
                    continue;
                }
                for event in &events {
                    if let Some(entry) = self.entry(event.token().0 as u64) {
                        woken.push(entry);
                    }
                }
            }
            // At most a batch a turn (a delivery to every client wakes them
            // all at once): the rest wait in `woken` for the next turn, and
            // the tasks of the ones woken now, and everyone else's, run in
            // between.
            // A full batch may leave more behind, here or in epoll (whose
            // readiness was then not taken: tokio would not wake this task
            // for it again).
            let more = woken.len() >= WAKE_BATCH;
            let batch = woken.len().min(WAKE_BATCH);
            for entry in woken.drain(..batch) {
                if let Some((socket, state)) = self.take(&entry) {
                    wake(socket, state);
                }
            }
            if more {
                // Others' turn; then this task goes on at once.
                cx.waker().wake_by_ref();
            }
            Poll::<()>::Pending
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn an_idle_connection_rests_when_fresh_or_quiet_only() {
        use Rest::{Sleep, Stay, Trim};
        // (idle, fresh, quiet check due with nothing since) -> rest, when
        // it may sleep and when it may not
        let table = [
            (true, true, false, Sleep, Trim),
            (true, false, true, Sleep, Trim),
            (true, true, true, Sleep, Trim),
            (true, false, false, Stay, Stay),
            // Something to do: never, fresh or quiet.
            (false, true, false, Stay, Stay),
            (false, false, true, Stay, Stay),
            (false, true, true, Stay, Stay),
            (false, false, false, Stay, Stay),
        ];
        for (idle, fresh, quiet, sleepy, awake) in table {
            assert_eq!(
                rest(idle, fresh, quiet, true),
                sleepy,
                "{idle} {fresh} {quiet}"
            );
            assert_eq!(
                rest(idle, fresh, quiet, false),
                awake,
                "{idle} {fresh} {quiet}"
            );
        }
    }

    /// A loopback pair: (the broker's side, the client's side).
    fn pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        let client = std::net::TcpStream::connect(addr).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        server.set_nonblocking(true).expect("non-blocking");
        (server, client)
    }

    fn new_set() -> Arc<Dormancy<u32>> {
        Dormancy::new().expect("an epoll instance")
    }

    /// Puts connection `n` to sleep.
    fn put(set: &Arc<Dormancy<u32>>, socket: std::net::TcpStream, n: u32, bell: &Doorbell) {
        assert!(set.sleep(socket, n, bell).is_ok(), "{n} watched");
    }

    /// Runs the set's task, sending each woken connection's state to the
    /// returned channel (with its socket).
    fn serve(
        set: &Arc<Dormancy<u32>>,
    ) -> tokio::sync::mpsc::UnboundedReceiver<(std::net::TcpStream, u32)> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let home = set.clone();
        tokio::spawn(set.clone().run(move |socket, n| {
            home.forget(&socket);
            let _ = tx.send((socket, n));
        }));
        rx
    }

    async fn nothing_for_a_while<T: std::fmt::Debug>(
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>,
    ) {
        let got = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await;
        assert!(got.is_err(), "woken for nothing: {got:?}");
    }

    #[tokio::test]
    async fn a_byte_on_the_socket_wakes_its_connection_only() {
        let set = new_set();
        let mut woken = serve(&set);
        let (a, mut client_a) = pair();
        let (b, _client_b) = pair();
        let bell_a = Doorbell::default();
        let bell_b = Doorbell::default();
        put(&set, a, 1, &bell_a);
        put(&set, b, 2, &bell_b);
        assert_eq!(set.held(), 2);
        nothing_for_a_while(&mut woken).await;
        client_a.write_all(b"x").expect("write");
        let (mut socket, n) = woken.recv().await.expect("woken");
        assert_eq!(n, 1);
        assert_eq!(set.held(), 1);
        // The byte is still there for the connection to read.
        socket.set_nonblocking(false).expect("blocking");
        let mut byte = [0u8];
        socket.read_exact(&mut byte).expect("the byte");
        assert_eq!(&byte, b"x");
        nothing_for_a_while(&mut woken).await;
    }

    #[tokio::test]
    async fn a_closed_socket_wakes_its_connection() {
        let set = new_set();
        let mut woken = serve(&set);
        let (a, client_a) = pair();
        let bell = Doorbell::default();
        put(&set, a, 7, &bell);
        drop(client_a);
        assert_eq!(woken.recv().await.expect("woken").1, 7);
        assert_eq!(set.held(), 0);
    }

    #[tokio::test]
    async fn a_ring_wakes_its_connection_also_one_before_it_slept() {
        let set = new_set();
        let mut woken = serve(&set);
        let (a, _ca) = pair();
        let (b, _cb) = pair();
        let bell_a = Doorbell::default();
        let bell_b = Doorbell::default();
        put(&set, a, 1, &bell_a);
        nothing_for_a_while(&mut woken).await;
        bell_a.ring(READY);
        assert_eq!(woken.recv().await.expect("woken").1, 1);
        // Rung before it went to sleep: given back at once.
        bell_b.ring(ALARM);
        let (_, n) = set.sleep(b, 2, &bell_b).expect_err("given back");
        assert_eq!(n, 2);
        assert_eq!(set.held(), 0);
        // A ring for a connection already woken (its slot taken again by
        // another) wakes nobody else.
        let (c, _cc) = pair();
        let bell_c = Doorbell::default();
        put(&set, c, 3, &bell_c);
        bell_a.ring(ALARM);
        nothing_for_a_while(&mut woken).await;
        assert_eq!(set.held(), 1);
    }

    /// Regression: a fresh connection going dormant right after its
    /// CONNACK was woken by its SUBSCRIBE (the socket readable as soon as
    /// it was watched) and served on by a new task, on another thread,
    /// before `sleep` had registered the set's waker with its doorbell;
    /// that registration then replaced the new task's, and the ring for
    /// the retained message its SUBSCRIBE found went to the set, for a
    /// connection no longer in it (about 2 in 1,000 `mosquitto_sub` runs).
    /// Now nothing is handed out while it goes to sleep: a wake then is
    /// marked, and `sleep` gives the connection back, its doorbell holding
    /// the set's waker until the connection registers its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_woken_while_going_dormant_is_given_back_not_served_by_the_set() {
        #[derive(Default)]
        struct Count(AtomicUsize);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let set = new_set();
        let mut woken = serve(&set);
        let (a, mut client) = pair();
        let bell = Doorbell::default();
        // Its SUBSCRIBE is there when it goes to sleep, and a ring comes
        // while it does; the set's task sees both before `sleep` ends.
        client.write_all(b"x").expect("write");
        let fd = a.as_raw_fd();
        let entry = set.enter(a, 1);
        set.watch(&entry, fd, &bell).expect("watched");
        bell.ring(READY);
        nothing_for_a_while(&mut woken).await;
        assert_eq!(set.held(), 1, "not taken while going to sleep");
        let (mut socket, n) = set.settle(&entry, true).expect_err("given back");
        assert_eq!(n, 1);
        assert_eq!(set.held(), 0);
        // Served on by its caller, which registers its own waker: the
        // next ring is the caller's, the set's waker is gone for good.
        let count = Arc::new(Count::default());
        let ours = Waker::from(count.clone());
        assert_eq!(
            bell.take(&std::task::Context::from_waker(&ours), READY),
            READY
        );
        bell.ring(READY);
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        nothing_for_a_while(&mut woken).await;
        set.forget(&socket);
        socket.set_nonblocking(false).expect("blocking");
        let mut byte = [0u8];
        socket.read_exact(&mut byte).expect("the byte");
        // Asleep without a wake, it is the set's to hand out.
        let (b, _cb) = pair();
        let fd = b.as_raw_fd();
        let entry = set.enter(b, 2);
        set.watch(&entry, fd, &bell).expect("watched");
        assert!(set.settle(&entry, true).is_ok());
        bell.ring(ALARM);
        assert_eq!(woken.recv().await.expect("woken").1, 2);
    }

    #[tokio::test]
    async fn many_connections_woken_at_once_all_come_back() {
        let set = new_set();
        let mut woken = serve(&set);
        let n = WAKE_BATCH as u32 * 3 + 5;
        let mut bells = Vec::new();
        let mut clients = Vec::new();
        for i in 0..n {
            let (server, client) = pair();
            let bell = Doorbell::default();
            put(&set, server, i, &bell);
            bells.push(bell);
            clients.push(client);
        }
        // Half by a byte, half by the bell.
        for (i, client) in clients.iter_mut().enumerate() {
            if i % 2 == 0 {
                client.write_all(b"x").expect("write");
            } else {
                bells[i].ring(READY);
            }
        }
        let mut seen = vec![false; n as usize];
        for _ in 0..n {
            let (_, i) = woken.recv().await.expect("woken");
            assert!(!std::mem::replace(&mut seen[i as usize], true), "{i} twice");
        }
        assert_eq!(set.held(), 0);
        nothing_for_a_while(&mut woken).await;
    }

    #[tokio::test]
    async fn the_end_of_the_task_closes_what_is_still_dormant() {
        let set = new_set();
        let task = tokio::spawn(set.clone().run(|_, _| {}));
        let (a, mut client) = pair();
        put(&set, a, 1, &Doorbell::default());
        tokio::time::sleep(Duration::from_millis(50)).await;
        task.abort();
        let _ = task.await;
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = [0u8; 1];
        assert_eq!(
            client.read(&mut buf).expect("read"),
            0,
            "the socket is closed"
        );
    }
}
