//! What the load programs in `benches/` share: the libtest protocol that
//! lets nextest run each as one `smoke` test, their options, free loopback
//! ports, a private Mosquitto to measure against, and the edge node of the
//! drain programs (its bridge, its backlog, the link it drains through).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferrymq_config::{Bridge, BridgeAddress, BridgeKind, Config, Direction, Forward};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub mod proc;

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
        self.flag("--bench")
    }

    /// Whether `name` was given.
    pub fn flag(&self, name: &str) -> bool {
        self.0.iter().any(|a| a == name)
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

/// A link that refuses connections until it is brought up, and counts
/// the bytes it carries towards the upstream.
pub struct Link {
    pub addr: SocketAddr,
    pub up: Arc<AtomicBool>,
    pub upstream_bytes: Arc<AtomicU64>,
}

impl Link {
    pub async fn start(upstream: SocketAddr) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind link");
        let addr = listener.local_addr().expect("link address");
        let up = Arc::new(AtomicBool::new(false));
        let upstream_bytes = Arc::new(AtomicU64::new(0));
        let (flag, counter) = (up.clone(), upstream_bytes.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !flag.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let up = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Ok(n) = client_read.read(&mut buf).await {
                            if n == 0 || server_write.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            counter.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        let _ = server_write.shutdown().await;
                    };
                    let down = async move {
                        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                        let _ = client_write.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        Link {
            addr,
            up,
            upstream_bytes,
        }
    }
}

/// The payload of message `n`: 64 bytes starting with its number.
pub fn payload(n: u64) -> Bytes {
    let mut body = vec![b'x'; 64];
    let tag = n.to_string();
    body[..tag.len()].copy_from_slice(tag.as_bytes());
    body[tag.len()] = b' ';
    Bytes::from(body)
}

/// An edge node (the library: broker and one bridge `regional` as
/// client id `edge-1` to 127.0.0.1:`port`, forwarding everything out at
/// QoS 1, no drain cap, quick reconnects), with its data in a temporary
/// directory. With `live_lane`, `live/#` has a lane of its own.
pub async fn edge_node(
    port: u16,
    kind: BridgeKind,
    inflight: u16,
    live_lane: bool,
) -> (ferrymq_bridge::Node, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = Config {
        data_dir: dir.path().join("data"),
        ..Config::default()
    };
    config.listeners[0].bind = "127.0.0.1:0".parse().expect("addr");
    config.bridges.push(Bridge {
        name: "regional".into(),
        kind,
        addresses: vec![BridgeAddress {
            host: "127.0.0.1".into(),
            port,
        }],
        client_id: "edge-1".into(),
        inflight,
        drain_rate: 0,
        ramp: Duration::ZERO,
        reconnect_min: Duration::from_millis(20),
        reconnect_max: Duration::from_millis(100),
        max_queued_messages: 100_000_000,
        max_queued_bytes: 64 << 30,
        forward: if live_lane {
            vec![
                Forward {
                    filter: "backlog/#".into(),
                    ..Forward::default()
                },
                Forward {
                    filter: "live/#".into(),
                    lane: ferrymq_config::Lane::Live,
                    ..Forward::default()
                },
            ]
        } else {
            vec![Forward {
                filter: "#".into(),
                direction: Direction::Out,
                qos: 1,
                ..Forward::default()
            }]
        },
        ..Bridge::default()
    });
    let node = ferrymq_bridge::Node::start(config)
        .await
        .expect("start the edge");
    (node, dir)
}

/// Publishes `messages` numbered QoS 1 messages on `topic` in-process,
/// 2,000 in flight; returns once all are acknowledged (on disk).
pub async fn queue_backlog(node: &ferrymq_bridge::Node, topic: &'static str, messages: u64) {
    let app = node
        .broker()
        .connect(ferrymq_broker::ClientOptions::new("backlog"))
        .await
        .expect("connect");
    let publisher = app.publisher();
    let mut acks = std::collections::VecDeque::new();
    for n in 0..messages {
        let ack = publisher
            .submit(ferrymq_codec::Publish {
                qos: ferrymq_broker::QoS::AtLeastOnce,
                topic: ferrymq_codec::MqttString::from_static(topic),
                payload: payload(n),
                ..ferrymq_codec::Publish::default()
            })
            .await
            .expect("submit");
        acks.push_back(ack);
        if acks.len() >= 2000 {
            acks.pop_front().expect("ack").await.expect("acknowledged");
        }
    }
    for ack in acks {
        ack.await.expect("acknowledged");
    }
    app.disconnect().await;
}

/// An MQTT 5 client on `addr` subscribed to everything (`#`, QoS 1),
/// its SUBACK taken.
pub async fn observer(addr: SocketAddr, client_id: &str) -> ferrymq_bridge::Uplink {
    let mut options = ferrymq_bridge::UplinkOptions::new("127.0.0.1", addr.port(), client_id);
    options.receive_maximum = u16::MAX;
    let (mut observer, _) = ferrymq_bridge::Uplink::connect(&options)
        .await
        .expect("observer");
    observer
        .subscribe(
            vec![ferrymq_codec::Subscription {
                filter: ferrymq_codec::MqttString::from_static("#"),
                options: ferrymq_codec::SubscriptionOptions {
                    qos: ferrymq_broker::QoS::AtLeastOnce,
                    ..ferrymq_codec::SubscriptionOptions::default()
                },
            }],
            ferrymq_codec::SubscribeProperties::default(),
        )
        .expect("subscribe");
    while !matches!(
        observer.next_event().await,
        Ok(ferrymq_bridge::Event::SubAck { .. })
    ) {}
    observer
}
