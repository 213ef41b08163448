//! The processes and clients of the memory, hostile-client and
//! many-clients programs: a broker under test (ferrymq or Mosquitto, each
//! at its defaults, on a free loopback port, killed on drop), its resident
//! memory and open-file limit, a blocking MQTT 3.1.1 client on the codec,
//! and the well-behaved QoS 1 stream whose latency they watch.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use ferrymq_codec::{
    Connect, ConnectProperties, MqttString, Packet, Protocol, PubAck, Publish, QoS, Subscribe,
    Subscription, SubscriptionOptions, decode,
};

use super::{free_port, wait_listening};

/// A broker under test, killed on drop.
pub struct Broker {
    pub name: &'static str,
    pub child: Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Broker {
    /// ferrymq at its defaults plus `extra` config lines.
    pub fn ferrymq(extra: &str) -> Broker {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let config = format!(
            "data_dir = {:?}\n{extra}\n[[listener]]\nbind = \"127.0.0.1:{port}\"\n",
            dir.path().join("data").display().to_string()
        );
        let file = dir.path().join("ferrymq.toml");
        std::fs::write(&file, config).expect("write ferrymq.toml");
        let child = Command::new(env!("CARGO_BIN_EXE_ferrymq"))
            .arg("--config")
            .arg(file)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ferrymq");
        Broker::started("ferrymq", child, port, dir)
    }

    /// Mosquitto at its defaults (1,000 queued messages per client), no
    /// persistence.
    pub fn mosquitto() -> Broker {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\nuser root\n"),
        )
        .expect("write mosquitto.conf");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (apt install mosquitto)");
        Broker::started("mosquitto", child, port, dir)
    }

    fn started(name: &'static str, child: Child, port: u16, dir: tempfile::TempDir) -> Broker {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let broker = Broker {
            name,
            child,
            addr,
            _dir: dir,
        };
        wait_listening(addr, name);
        broker
    }

    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id())
    }

    /// What the broker says it is: `ferrymq 0.1.0 (debug build)`,
    /// `mosquitto version 2.0.11`.
    pub fn version(&self) -> String {
        let (program, flag) = match self.name {
            "ferrymq" => (env!("CARGO_BIN_EXE_ferrymq"), "--version"),
            _ => ("mosquitto", "-h"),
        };
        let out = Command::new(program)
            .arg(flag)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let line = out.lines().next().unwrap_or(self.name).trim().to_string();
        // The binary is built with this program's profile.
        match self.name {
            "ferrymq" if cfg!(debug_assertions) => format!("{line} (debug build)"),
            "ferrymq" => format!("{line} (release build)"),
            _ => line,
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A latency for a table: milliseconds with one decimal, `-` for none.
pub fn ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| {
        format!("{:.1} ms", d.as_secs_f64() * 1000.0)
    })
}

/// A process's resident memory, KiB (0 once it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A process's limit on open files (its soft `RLIMIT_NOFILE`, from
/// `/proc/PID/limits`; `u64::MAX` when unlimited, 0 once it is gone).
pub fn open_files_limit(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Max open files"))
                .and_then(|v| v.split_whitespace().next())
                .map(|v| v.parse().unwrap_or(u64::MAX))
        })
        .unwrap_or(0)
}

/// Raises this process's open-file limit, soft and hard, to `want` (as
/// root the hard limit may go up to `fs.nr_open`); processes started
/// afterwards inherit it. Never lowers it. Returns the soft limit in
/// force afterwards.
pub fn raise_open_files(want: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into memory we own.
    #[allow(unsafe_code)]
    let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    if got != 0 || limit.rlim_cur >= want {
        return open_files_limit(std::process::id());
    }
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(limit.rlim_max);
    let max = limit.rlim_max.max(want.min(ceiling));
    let raised = libc::rlimit {
        rlim_cur: want.min(max),
        rlim_max: max,
    };
    // SAFETY: setrlimit reads one `rlimit` we own; a refused change (not
    // root, or above fs.nr_open) returns an error and changes nothing.
    #[allow(unsafe_code)]
    let set = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) };
    if set != 0 {
        // Not allowed above the hard limit: as far as it goes.
        let within = libc::rlimit {
            rlim_cur: want.min(limit.rlim_max),
            rlim_max: limit.rlim_max,
        };
        // SAFETY: as above.
        #[allow(unsafe_code)]
        unsafe {
            libc::setrlimit(libc::RLIMIT_NOFILE, &within);
        }
    }
    open_files_limit(std::process::id())
}

/// Samples a broker's RSS every `every` until dropped; the peak.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    pub fn start(pid: u32, every: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(every);
            }
        });
        Sampler {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    pub fn peak(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

/// A blocking MQTT 3.1.1 client on the codec.
pub struct Client {
    pub stream: TcpStream,
    buf: BytesMut,
    protocol: Protocol,
}

impl Client {
    /// A 3.1.1 client with a clean session.
    pub fn connect(addr: SocketAddr, id: &str) -> Client {
        Client::connect_with(
            addr,
            Connect {
                protocol: Protocol::V311,
                clean_start: true,
                keep_alive: 0,
                client_id: MqttString::new(id).expect("client id"),
                will: None,
                username: None,
                password: None,
                properties: ConnectProperties::default(),
            },
        )
        .expect("connect")
    }

    /// Connects with `connect` (its protocol is the client's); an error
    /// when the broker cannot be reached or refuses.
    pub fn connect_with(addr: SocketAddr, connect: Connect) -> std::io::Result<Client> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        let mut c = Client {
            stream,
            buf: BytesMut::with_capacity(64 << 10),
            protocol: connect.protocol,
        };
        c.try_send(&Packet::Connect(Box::new(connect)))?;
        match c.recv() {
            Some(Packet::ConnAck(a)) if a.reason_code.0 == 0 => Ok(c),
            other => Err(std::io::Error::other(format!(
                "CONNACK expected, got {other:?}"
            ))),
        }
    }

    /// A second handle on the same connection (its own read buffer).
    pub fn try_clone(&self) -> Client {
        Client {
            stream: self.stream.try_clone().expect("clone"),
            buf: BytesMut::new(),
            protocol: self.protocol,
        }
    }

    /// Sends `packet`; an error when the connection is gone.
    pub fn try_send(&mut self, packet: &Packet) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        packet.encode(self.protocol, &mut out).expect("encode");
        self.stream.write_all(&out)
    }

    pub fn send(&mut self, packet: &Packet) {
        self.try_send(packet).expect("write");
    }

    pub fn recv(&mut self) -> Option<Packet> {
        loop {
            if let Some(p) = decode(&mut self.buf, self.protocol, u32::MAX).expect("decode") {
                return Some(p);
            }
            let mut chunk = [0u8; 64 << 10];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    pub fn subscribe(&mut self, filter: &str, qos: QoS) {
        self.send(&Packet::Subscribe(Subscribe {
            packet_id: 1,
            subscriptions: vec![Subscription {
                filter: MqttString::new(filter).expect("filter"),
                options: SubscriptionOptions {
                    qos,
                    ..SubscriptionOptions::default()
                },
            }],
            properties: Default::default(),
        }));
        match self.recv() {
            Some(Packet::SubAck(_)) => {}
            other => panic!("SUBACK expected, got {other:?}"),
        }
    }

    /// Publishes `count` messages from `topic(i)` pipelined at `qos`, then
    /// waits for the PUBACK of a final QoS 1 message (all before it are
    /// routed by then).
    pub fn publish_all(
        &mut self,
        count: usize,
        qos: QoS,
        retain: bool,
        topic: impl Fn(usize) -> String,
        payload: Bytes,
    ) {
        let mut reader = self.try_clone();
        let acks = if qos == QoS::AtMostOnce { 0 } else { count };
        let counter = std::thread::spawn(move || {
            let mut got = 0;
            while got < acks + 1 {
                match reader.recv() {
                    Some(Packet::PubAck(_)) => got += 1,
                    Some(_) => {}
                    None => break,
                }
            }
            got
        });
        let mut out = BytesMut::with_capacity(1 << 20);
        for i in 0..count {
            Packet::Publish(Publish {
                topic: MqttString::new(&topic(i)).expect("topic"),
                qos,
                retain,
                packet_id: if qos == QoS::AtMostOnce {
                    0
                } else {
                    (i % 60_000 + 1) as u16
                },
                payload: payload.clone(),
                ..Publish::default()
            })
            .encode(self.protocol, &mut out)
            .expect("encode");
            if out.len() > 256 << 10 {
                self.stream.write_all(&out).expect("write");
                out.clear();
            }
        }
        Packet::Publish(Publish {
            topic: MqttString::new("sync").expect("topic"),
            qos: QoS::AtLeastOnce,
            packet_id: 60_001,
            ..Publish::default()
        })
        .encode(self.protocol, &mut out)
        .expect("encode");
        self.stream.write_all(&out).expect("write");
        let got = counter.join().expect("ack reader");
        assert_eq!(got, acks + 1, "every publish acknowledged");
    }
}

/// The well-behaved stream: QoS 1 at 1,000 messages a second; every
/// payload carries its sequence number and when it was sent.
pub struct Stream {
    stop: Arc<AtomicBool>,
    /// Stops the subscriber, once everything acknowledged has arrived.
    stop_sub: Arc<AtomicBool>,
    publisher: JoinHandle<HashSet<u64>>,
    subscriber: JoinHandle<()>,
    /// (when received, latency) of every delivery.
    seen: Arc<Mutex<Vec<(Instant, Duration)>>>,
    received: Arc<Mutex<HashSet<u64>>>,
}

impl Stream {
    pub fn start(addr: SocketAddr, base: Instant) -> Stream {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_sub = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let received = Arc::new(Mutex::new(HashSet::new()));
        let mut sub = Client::connect(addr, "stream-sub");
        sub.subscribe("stream/x", QoS::AtLeastOnce);
        let subscriber = {
            let (stop, seen, received) = (stop_sub.clone(), seen.clone(), received.clone());
            sub.stream
                .set_read_timeout(Some(Duration::from_millis(200)))
                .expect("timeout");
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Some(Packet::Publish(p)) = sub.recv() else {
                        continue;
                    };
                    let now = Instant::now();
                    sub.send(&Packet::PubAck(PubAck::new(p.packet_id)));
                    let seq = u64::from_be_bytes(p.payload[..8].try_into().expect("seq"));
                    let sent = u64::from_be_bytes(p.payload[8..16].try_into().expect("time"));
                    let latency = now.duration_since(base) - Duration::from_nanos(sent);
                    seen.lock().expect("seen").push((now, latency));
                    received.lock().expect("received").insert(seq);
                }
            })
        };
        let publisher = {
            let stop = stop.clone();
            let mut client = Client::connect(addr, "stream-pub");
            std::thread::spawn(move || publish_paced(&mut client, &stop, base))
        };
        Stream {
            stop,
            stop_sub,
            publisher,
            subscriber,
            seen,
            received,
        }
    }

    /// The p99 latency of what arrived between `from` and `to`.
    pub fn p99(&self, from: Instant, to: Instant) -> Option<Duration> {
        let seen = self.seen.lock().expect("seen");
        let mut l: Vec<Duration> = seen
            .iter()
            .filter(|(at, _)| *at >= from && *at < to)
            .map(|(_, l)| *l)
            .collect();
        l.sort();
        (!l.is_empty()).then(|| l[(l.len() * 99 / 100).min(l.len() - 1)])
    }

    /// Stops publishing, waits for what is still on its way, and returns
    /// (acknowledged, acknowledged but never delivered).
    pub fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let acked = self.publisher.join().expect("publisher");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let missing = {
                let received = self.received.lock().expect("received");
                acked.iter().filter(|s| !received.contains(s)).count()
            };
            if missing == 0 || Instant::now() > deadline {
                self.stop_sub.store(true, Ordering::Relaxed);
                self.subscriber.join().expect("subscriber");
                return (acked.len(), missing);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Publishes one QoS 1 message a millisecond until `stop`; returns the
/// sequence numbers acknowledged.
fn publish_paced(client: &mut Client, stop: &AtomicBool, base: Instant) -> HashSet<u64> {
    let mut reader = client.try_clone();
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let pending: Arc<Mutex<std::collections::HashMap<u16, u64>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let acks = {
        let (acked, pending, done) = (acked.clone(), pending.clone(), done.clone());
        reader
            .stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) || !pending.lock().expect("pending").is_empty() {
                if let Some(Packet::PubAck(a)) = reader.recv()
                    && let Some(seq) = pending.lock().expect("pending").remove(&a.packet_id)
                {
                    acked.lock().expect("acked").insert(seq);
                }
            }
        })
    };
    let start = Instant::now();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let due = start + Duration::from_millis(seq);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let mut payload = BytesMut::with_capacity(64);
        payload.put_u64(seq);
        payload.put_u64(Instant::now().duration_since(base).as_nanos() as u64);
        payload.put_bytes(b's', 48);
        let packet_id = (seq % 60_000 + 1) as u16;
        pending.lock().expect("pending").insert(packet_id, seq);
        if client
            .try_send(&Packet::Publish(Publish {
                topic: MqttString::from_static("stream/x"),
                qos: QoS::AtLeastOnce,
                packet_id,
                payload: payload.freeze(),
                ..Publish::default()
            }))
            .is_err()
        {
            break;
        }
        seq += 1;
    }
    // The acknowledgements still on their way, for a while.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pending.lock().expect("pending").is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    done.store(true, Ordering::Relaxed);
    pending.lock().expect("pending").clear();
    acks.join().expect("ack reader");
    std::mem::take(&mut *acked.lock().expect("acked"))
}
