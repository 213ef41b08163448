//! The processes and clients of the memory and hostile-client programs: a
//! broker under test (ferrymq or Mosquitto, each at its defaults, on a free
//! loopback port, killed on drop), its resident memory, and a blocking MQTT
//! 3.1.1 client on the codec.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferrymq_codec::{
    Connect, ConnectProperties, MqttString, Packet, Protocol, Publish, QoS, Subscribe,
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
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
