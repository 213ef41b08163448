//! What the load programs in `benches/` share: the libtest protocol that
//! lets nextest run each as one `smoke` test, their options, free loopback
//! ports, and a private Mosquitto to measure against.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The program's command line.
pub struct Args(Vec<String>);

impl Args {
    /// The arguments, or `None` when nextest only asked for the list of
    /// tests (the answer, one test named `smoke`, is printed).
    pub fn from_env() -> Option<Args> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        if args.iter().any(|a| a == "--list") {
            if !args.iter().any(|a| a == "--ignored") {
                println!("smoke: test");
            }
            return None;
        }
        Some(Args(args))
    }

    /// Run by `cargo bench` (full load), not as a smoke test.
    pub fn bench(&self) -> bool {
        self.0.iter().any(|a| a == "--bench")
    }

    /// The value given after `name`, if any.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .position(|a| a == name)
            .and_then(|i| self.0.get(i + 1))
            .map(String::as_str)
    }
}

/// A loopback port nothing listens on (taken and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Mosquitto's config for the peer runs: loopback only, no queue limit,
/// no persistence (volatile and lossless), plus `extra` lines.
pub fn mosquitto_conf(port: u16, extra: &str) -> String {
    format!(
        "listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n\
         persistence false\nuser root\n{extra}"
    )
}

/// CPU time (user + system) of a process so far.
pub fn cpu_time(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) in ")".
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here;
    // in clock ticks of 1/100 s (USER_HZ on Linux).
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// Waits until something listens on `addr`.
pub fn wait_listening(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A Mosquitto of its own (Debian's package), killed on drop.
pub struct Mosquitto {
    child: std::process::Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts one with [`mosquitto_conf`] and `extra` lines.
    pub fn start(extra: &str) -> Mosquitto {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(&conf, mosquitto_conf(port, extra)).expect("write mosquitto.conf");
        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mosquitto (apt install mosquitto)");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mosquitto = Mosquitto {
            child,
            addr,
            _dir: dir,
        };
        wait_listening(addr, "mosquitto");
        mosquitto
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
