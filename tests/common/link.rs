//! A TCP proxy on 127.0.0.1 standing for the uplink between an edge and
//! its upstream, which a test can pass, cut (every connection reset, new
//! ones refused), blackhole (connections accepted and held, nothing
//! forwarded, nothing closed: a link whose packets vanish) and restore.
//! Plain threads, so it works in tests without a runtime.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the link does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forwards both ways.
    Pass,
    /// Resets every connection; new ones are reset at once.
    Down,
    /// Holds connections open and forwards nothing.
    Blackhole,
}

struct State {
    mode: Mode,
    /// Bumped at every change of mode: connections of an older generation
    /// are dropped (reset) when the link comes back.
    generation: u64,
    /// Open connections (client side, upstream side), for resets.
    open: Vec<(u64, TcpStream, Option<TcpStream>)>,
}

/// The link; stops (and resets everything) on drop.
pub struct Link {
    addr: SocketAddr,
    upstream: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl Link {
    /// A link to `upstream`, starting in `mode`.
    pub fn new(upstream: SocketAddr, mode: Mode) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            mode,
            generation: 0,
            open: Vec::new(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let state = state.clone();
            let stop = stop.clone();
            std::thread::spawn(move || accept_loop(listener, upstream, state, stop));
        }
        Link {
            addr,
            upstream,
            state,
            stop,
        }
    }

    /// Where the edge connects.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port the edge connects to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Changes what the link does. Leaving `Pass` or `Blackhole` resets
    /// the connections of that period (a blackholed connection is not
    /// revived: its peers gave up on it).
    pub fn set(&self, mode: Mode) {
        let mut state = self.state.lock().unwrap();
        if state.mode == mode {
            return;
        }
        state.mode = mode;
        state.generation += 1;
        if mode != Mode::Blackhole {
            for (_, client, upstream) in state.open.drain(..) {
                reset(&client);
                if let Some(u) = upstream {
                    reset(&u);
                }
            }
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.set(Mode::Down);
        // Wake the accept loop.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Closes with RST (SO_LINGER 0), as a broken link or a firewall does.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
    let _ = stream.shutdown(Shutdown::Both);
}

fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
) {
    for client in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        let (mode, generation) = {
            let s = state.lock().unwrap();
            (s.mode, s.generation)
        };
        match mode {
            Mode::Down => {
                reset(&client);
            }
            Mode::Blackhole => {
                // Accepted, and then nothing: hold it until the mode changes.
                let held = client.try_clone().unwrap();
                state.lock().unwrap().open.push((generation, held, None));
                std::thread::spawn(move || swallow(client));
            }
            Mode::Pass => {
                let Ok(server) = TcpStream::connect(upstream) else {
                    reset(&client);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                state.lock().unwrap().open.push((
                    generation,
                    client.try_clone().unwrap(),
                    Some(server.try_clone().unwrap()),
                ));
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let state = state.clone();
                    std::thread::spawn(move || pump(from, to, state, generation));
                }
            }
        }
    }
}

/// Reads and drops everything (a blackholed connection).
fn swallow(mut from: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    while matches!(from.read(&mut buf), Ok(n) if n > 0) {}
}

/// Copies `from` to `to` while the link passes in this generation; once
/// blackholed, drops what it reads without closing anything.
fn pump(mut from: TcpStream, mut to: TcpStream, state: Arc<Mutex<State>>, generation: u64) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(n) if n > 0 => n,
            _ => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
        };
        let (mode, current) = {
            let s = state.lock().unwrap();
            (s.mode, s.generation)
        };
        if mode == Mode::Blackhole {
            continue;
        }
        if current != generation || to.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}
