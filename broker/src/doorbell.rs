//! [`Doorbell`]: the one wake source of a connection besides its socket.
//! Whatever has news for a connection rings its session queue's doorbell
//! with what the news is about: a push into the queue ([`READY`]), or
//! something the connection must look at ([`ALARM`]: it was kicked by a
//! takeover or a shutdown, or its keep-alive deadline came). The
//! connection takes the bits it can act on when it polls; the others stay
//! set for a later poll (a permit, as a `Notify` keeps one), so nothing
//! rung is lost while the connection is busy.
//!
//! One doorbell is two words, where the separate wake sources it replaces
//! (a `Notify` for the queue, one for the kick, a timer for keep-alive)
//! each needed a future of their own inside every idle connection.

use std::sync::atomic::{AtomicU8, Ordering};
use std::task::Context;

use futures_util::task::AtomicWaker;

/// The queue may hold something to send.
pub const READY: u8 = 1;
/// Look at the kick flag and the keep-alive deadline.
pub const ALARM: u8 = 2;

/// See the module documentation.
#[derive(Default)]
pub struct Doorbell {
    rung: AtomicU8,
    waker: AtomicWaker,
}

impl std::fmt::Debug for Doorbell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Doorbell")
            .field("rung", &self.rung.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Doorbell {
    /// Rings for `what` (a set of bits). Wakes the connection unless all
    /// of them were rung already (then it was woken for them already, or
    /// has not taken them yet because it cannot act on them now).
    pub fn ring(&self, what: u8) {
        let before = self.rung.fetch_or(what, Ordering::AcqRel);
        if before & what != what {
            self.waker.wake();
        }
    }

    /// Makes `waker` the one woken by the next ring (a connection going
    /// dormant hands its doorbell to the set that keeps it).
    pub fn register(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }

    /// The bits rung and not yet taken.
    pub fn rung(&self) -> u8 {
        self.rung.load(Ordering::Acquire)
    }

    /// Takes the rung bits among `wanted`, leaving the others set, and
    /// registers `cx`'s waker for the next ring (before taking, so that a
    /// ring in between is not missed).
    pub fn take(&self, cx: &Context<'_>, wanted: u8) -> u8 {
        self.waker.register(cx.waker());
        self.rung.fetch_and(!wanted, Ordering::AcqRel) & wanted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use std::task::{Wake, Waker};

    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn woken(count: &Arc<Count>) -> usize {
        count.0.load(Ordering::SeqCst)
    }

    #[test]
    fn a_ring_before_the_first_poll_is_kept() {
        let bell = Doorbell::default();
        bell.ring(READY);
        let count = Arc::new(Count::default());
        let waker = Waker::from(count.clone());
        let cx = Context::from_waker(&waker);
        assert_eq!(bell.take(&cx, READY | ALARM), READY);
        assert_eq!(bell.take(&cx, READY | ALARM), 0);
    }

    #[test]
    fn bits_not_wanted_stay_rung_until_wanted() {
        let count = Arc::new(Count::default());
        let waker = Waker::from(count.clone());
        let cx = Context::from_waker(&waker);
        let bell = Doorbell::default();
        assert_eq!(bell.take(&cx, READY | ALARM), 0);
        bell.ring(READY);
        bell.ring(ALARM);
        // The write buffer is full: only the alarm is taken.
        assert_eq!(bell.take(&cx, ALARM), ALARM);
        assert_eq!(bell.take(&cx, READY | ALARM), READY);
    }

    #[test]
    fn a_ring_wakes_once_until_its_bit_is_taken() {
        let count = Arc::new(Count::default());
        let waker = Waker::from(count.clone());
        let cx = Context::from_waker(&waker);
        let bell = Doorbell::default();
        assert_eq!(bell.take(&cx, READY | ALARM), 0);
        bell.ring(READY);
        assert_eq!(woken(&count), 1);
        // Rung again before it was taken: no second wake.
        bell.ring(READY);
        assert_eq!(woken(&count), 1);
        // Another bit wakes (the waker is registered again by the poll).
        assert_eq!(bell.take(&cx, 0), 0);
        bell.ring(ALARM);
        assert_eq!(woken(&count), 2);
        assert_eq!(bell.take(&cx, READY | ALARM), READY | ALARM);
        bell.ring(READY);
        assert_eq!(woken(&count), 3);
    }

    #[test]
    fn a_ring_from_another_thread_wakes_the_poller() {
        let count = Arc::new(Count::default());
        let waker = Waker::from(count.clone());
        let cx = Context::from_waker(&waker);
        let bell = Arc::new(Doorbell::default());
        assert_eq!(bell.take(&cx, READY), 0);
        let ringer = bell.clone();
        std::thread::spawn(move || ringer.ring(READY))
            .join()
            .expect("ringer");
        assert_eq!(woken(&count), 1);
        assert_eq!(bell.take(&cx, READY), READY);
    }
}
