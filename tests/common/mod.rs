//! Shared helpers of the end-to-end tests: start the real `ferrymq` binary
//! on a free loopback port, and a raw MQTT client (std socket + our codec)
//! for byte-exact checks.

#![allow(dead_code, clippy::unwrap_used)]

pub mod link;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ferrymq_codec::{Connect, ConnectProperties, MqttString, Packet, Protocol, decode};

/// The binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_ferrymq")
}

/// Runs `ferrymq passwd FILE USER ARGS...` with `input` on its standard
/// input; whether it succeeded, and its standard error.
pub fn passwd(file: &Path, user: &str, args: &[&str], input: &str) -> (bool, String) {
    let mut child = Command::new(binary())
        .arg("passwd")
        .arg(file)
        .arg(user)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferrymq passwd");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write the password");
    let out = child.wait_with_output().expect("ferrymq passwd");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Adds `user` with `password` to the password file `file`.
pub fn add_user(file: &Path, user: &str, password: &str) {
    let (ok, err) = passwd(file, user, &["--stdin"], &format!("{password}\n"));
    assert!(ok, "ferrymq passwd {user}: {err}");
}

/// A loopback port free right now (for a node that must keep its port
/// across a restart).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address")
        .port()
}

/// A `ferrymq` process with its own data directory, killed on drop.
pub struct Broker {
    child: Child,
    /// Run by a wrapper (`start_under`): the child is the wrapper, in a
    /// process group of its own with ferrymq, and a kill is the group's
    /// (`faketime` forks ferrymq and waits: killing it alone left ferrymq
    /// running after its test).
    wrapped: bool,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    log: Arc<Mutex<String>>,
}

impl Broker {
    /// Starts the broker with a config made of a loopback listener on a
    /// free port, a fresh data dir, and `extra` (more TOML, may be empty).
    pub fn start(extra: &str) -> Broker {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = format!(
            "data_dir = {data:?}\n[[listener]]\nbind = \"127.0.0.1:0\"\n{extra}\n",
            data = dir.path().join("data")
        );
        Self::start_with_config(&config, dir)
    }

    /// Starts the broker on `config` (TOML text), written to
    /// `dir/ferrymq.toml`.
    pub fn start_with_config(config: &str, dir: tempfile::TempDir) -> Broker {
        let path = dir.path().join("ferrymq.toml");
        std::fs::write(&path, config).expect("write config");
        Self::start_with_file(&path, dir)
    }

    /// Starts the broker with its data in `data` (which outlives it, so a
    /// later broker can recover it), on a free loopback port.
    pub fn start_at(data: &Path, extra: &str) -> Broker {
        let dir = tempfile::tempdir().expect("temp dir");
        let config =
            format!("data_dir = {data:?}\n[[listener]]\nbind = \"127.0.0.1:0\"\n{extra}\n");
        Self::start_with_config(&config, dir)
    }

    /// The broker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILLs the process (no shutdown of any kind) and waits for it.
    pub fn kill(mut self) {
        self.sigkill();
    }

    /// SIGKILLs ferrymq (with its wrapper, if any) and waits for it.
    fn sigkill(&mut self) {
        if self.wrapped {
            let group = format!("-{}", self.child.id());
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        } else {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    /// Starts the broker on an existing config file that has exactly one
    /// listener (port 0 allowed).
    pub fn start_with_file(config: &Path, dir: tempfile::TempDir) -> Broker {
        Self::start_under(&[], config, dir)
    }

    /// [`Broker::start_with_file`], run by `wrapper` (a command and its
    /// arguments, e.g. `faketime -f -1h`) when it is not empty.
    pub fn start_under(wrapper: &[&str], config: &Path, dir: tempfile::TempDir) -> Broker {
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(binary());
                std::os::unix::process::CommandExt::process_group(&mut c, 0);
                c
            }
            None => Command::new(binary()),
        };
        let mut child = command
            .arg("--config")
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var("FERRYMQ_TEST_LOG")
                    .unwrap_or_else(|_| "info,ferrymq_broker=debug".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferrymq");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let log_writer = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("listening on ").nth(1)
                    && let Some(addr) = rest.split_whitespace().next()
                {
                    let _ = addr_tx.send(addr.parse::<SocketAddr>().expect("address"));
                }
                let mut log = log_writer.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut broker = Broker {
            child,
            wrapped: !wrapper.is_empty(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir,
            log,
        };
        match addr_rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => broker.addr = addr,
            Err(_) => panic!(
                "ferrymq did not start; log:\n{}",
                broker.log.lock().unwrap()
            ),
        }
        broker
    }

    /// The address of `[[listener]]` number `index` (as the broker logged
    /// it when it started listening); [`Broker::addr`] is the first's.
    pub fn listener_addr(&self, index: usize) -> SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log();
            let found = log
                .lines()
                .filter_map(|line| line.split("listening on ").nth(1))
                .filter_map(|rest| rest.split_whitespace().next())
                .nth(index);
            if let Some(addr) = found {
                return addr.parse().expect("address");
            }
            assert!(
                Instant::now() < deadline,
                "listener {index} never listened:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the broker logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log contains `needle` (or panics after `timeout`).
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("log never contained {needle:?}:\n{}", self.log());
    }

    /// Sends SIGHUP (reload) and waits until the broker logged the reload
    /// of `count` parts more than before.
    pub fn reload(&self, parts: usize) {
        // One line per part (the module path says "reload:" too, so
        // lines are counted, not matches).
        let reloads = || {
            self.log()
                .lines()
                .filter(|l| l.contains("reload: "))
                .count()
        };
        let before = reloads();
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap()
                .success()
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while reloads() < before + parts {
            assert!(
                Instant::now() < deadline,
                "no reload logged:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits for the process to exit; returns its status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "ferrymq did not exit on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.sigkill();
        if std::thread::panicking() {
            eprintln!("--- ferrymq log ---\n{}", self.log());
        }
    }
}

/// A byte-level MQTT client: sends what it is told, decodes what it gets.
pub struct Raw {
    pub stream: TcpStream,
    pub protocol: Protocol,
    buf: BytesMut,
}

/// How long a raw client waits for an expected packet.
pub const WAIT: Duration = Duration::from_secs(5);

impl Raw {
    /// Opens a TCP connection without sending anything.
    pub fn open(addr: SocketAddr, protocol: Protocol) -> Raw {
        Raw::over(TcpStream::connect(addr).expect("connect"), protocol)
    }

    /// A raw client on a connection opened already.
    pub fn over(stream: TcpStream, protocol: Protocol) -> Raw {
        stream.set_nodelay(true).unwrap();
        Raw {
            stream,
            protocol,
            buf: BytesMut::new(),
        }
    }

    /// Opens a connection and completes CONNECT/CONNACK with `client_id`.
    pub fn connect(addr: SocketAddr, protocol: Protocol, client_id: &str) -> Raw {
        let mut raw = Raw::open(addr, protocol);
        raw.send(&Packet::Connect(Box::new(connect_packet(
            protocol, client_id,
        ))));
        match raw.recv() {
            Some(Packet::ConnAck(ack)) => assert_eq!(ack.reason_code.0, 0, "CONNACK {ack:?}"),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        raw
    }

    pub fn send(&mut self, packet: &Packet) {
        let mut out = BytesMut::new();
        packet.encode(self.protocol, &mut out).expect("encode");
        self.send_bytes(&out);
    }

    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// Sends `packet`; whether it could be written (the broker may be
    /// gone).
    pub fn try_send(&mut self, packet: &Packet) -> bool {
        let mut out = BytesMut::new();
        packet.encode(self.protocol, &mut out).expect("encode");
        self.stream.write_all(&out).is_ok()
    }

    /// The next packet, or `None` if the connection closed first.
    pub fn recv(&mut self) -> Option<Packet> {
        self.recv_within(WAIT)
    }

    /// The next packet within `timeout`; `None` if the connection closed.
    /// Panics if nothing arrives in time.
    pub fn recv_within(&mut self, timeout: Duration) -> Option<Packet> {
        match self.poll(Instant::now() + timeout) {
            Polled::Packet(p) => Some(p),
            Polled::Closed => None,
            Polled::Timeout => panic!("no packet within {timeout:?}"),
        }
    }

    /// The next packet within `quiet`, the end of the connection, or
    /// nothing yet.
    pub fn poll_for(&mut self, quiet: Duration) -> Polled {
        self.poll(Instant::now() + quiet)
    }

    fn poll(&mut self, deadline: Instant) -> Polled {
        loop {
            if let Some(p) =
                decode(&mut self.buf, self.protocol, u32::MAX).expect("broker sent a valid packet")
            {
                return Polled::Packet(p);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Polled::Timeout;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Polled::Closed,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Polled::Closed,
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// Asserts that nothing arrives for `quiet` (the connection stays open).
    pub fn expect_silence(&mut self, quiet: Duration) {
        self.stream.set_read_timeout(Some(quiet)).unwrap();
        let mut chunk = [0u8; 64];
        match self.stream.read(&mut chunk) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Ok(0) => panic!("connection closed; expected it to stay open"),
            Ok(n) => panic!("unexpected bytes {:02x?}", &chunk[..n]),
            Err(e) => panic!("read: {e}"),
        }
    }

    /// Reads until the broker closes the connection, returning every packet
    /// it sent first (e.g. a DISCONNECT with a reason code).
    pub fn until_closed(&mut self) -> Vec<Packet> {
        let mut packets = Vec::new();
        while let Some(p) = self.recv() {
            packets.push(p);
        }
        packets
    }
}

pub fn connect_packet(protocol: Protocol, client_id: &str) -> Connect {
    Connect {
        protocol,
        clean_start: true,
        keep_alive: 30,
        client_id: MqttString::new(client_id).unwrap(),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties::default(),
    }
}

/// A SUBSCRIBE (packet id 1) to `filter` at QoS 1.
pub fn subscribe_qos1(filter: &str) -> Packet {
    Packet::Subscribe(ferrymq_codec::Subscribe {
        packet_id: 1,
        subscriptions: vec![ferrymq_codec::Subscription {
            filter: s(filter),
            options: ferrymq_codec::SubscriptionOptions {
                qos: ferrymq_codec::QoS::AtLeastOnce,
                ..Default::default()
            },
        }],
        properties: Default::default(),
    })
}

/// Publishes the numbers of `range` as QoS 1 messages on `data/temp` to
/// the broker at `edge` (client id `sensor`, 3.1.1), one at a time; each
/// must be acknowledged (an edge stores what it cannot send yet).
pub fn publish_numbers(edge: SocketAddr, range: std::ops::Range<u32>) {
    let mut raw = Raw::connect(edge, Protocol::V311, "sensor");
    for n in range {
        let id = (n % 60_000) as u16 + 1;
        raw.send(&Packet::Publish(ferrymq_codec::Publish {
            qos: ferrymq_codec::QoS::AtLeastOnce,
            packet_id: id,
            topic: s("data/temp"),
            payload: bytes::Bytes::from(n.to_string()),
            ..ferrymq_codec::Publish::default()
        }));
        assert_eq!(
            raw.recv(),
            Some(Packet::PubAck(ferrymq_codec::PubAck::new(id))),
            "message {n}"
        );
    }
}

/// The `ferry-id` user property of a delivered message, if any.
pub fn ferry_id(publish: &ferrymq_codec::Publish) -> Option<String> {
    publish
        .properties
        .user_properties
        .iter()
        .find(|(k, _)| k.as_str() == "ferry-id")
        .map(|(_, v)| v.to_string())
}

pub fn s(text: &str) -> MqttString {
    MqttString::new(text).unwrap()
}

/// A rumqttc (MQTT 3.1.1) client whose event loop runs in a task; every
/// incoming packet is forwarded to `incoming`.
pub struct V4Client {
    pub client: rumqttc::AsyncClient,
    pub incoming: tokio::sync::mpsc::UnboundedReceiver<rumqttc::Packet>,
}

impl V4Client {
    pub async fn connect(addr: SocketAddr, id: &str) -> V4Client {
        let mut opts = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 1000);
        let (tx, mut incoming) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(event) = eventloop.poll().await {
                if let rumqttc::Event::Incoming(packet) = event
                    && tx.send(packet).is_err()
                {
                    break;
                }
            }
        });
        let mut c = V4Client {
            client,
            incoming: tokio::sync::mpsc::unbounded_channel().1,
        };
        match next(&mut incoming).await {
            rumqttc::Packet::ConnAck(ack) => {
                assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success)
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
        c.incoming = incoming;
        c
    }

    /// Subscribes and waits for the SUBACK.
    pub async fn subscribe(&mut self, filter: &str) -> rumqttc::SubAck {
        self.client
            .subscribe(filter, rumqttc::QoS::AtMostOnce)
            .await
            .unwrap();
        loop {
            if let rumqttc::Packet::SubAck(ack) = next(&mut self.incoming).await {
                return ack;
            }
        }
    }

    /// The next PUBLISH received.
    pub async fn publish_received(&mut self) -> rumqttc::Publish {
        loop {
            if let rumqttc::Packet::Publish(p) = next(&mut self.incoming).await {
                return p;
            }
        }
    }

    /// Asserts no PUBLISH arrives within `quiet`.
    pub async fn no_publish(&mut self, quiet: Duration) {
        let deadline = tokio::time::Instant::now() + quiet;
        loop {
            match tokio::time::timeout_at(deadline, self.incoming.recv()).await {
                Err(_) => return,
                Ok(Some(rumqttc::Packet::Publish(p))) => panic!("unexpected publish {p:?}"),
                Ok(Some(_)) => {}
                Ok(None) => panic!("event loop ended"),
            }
        }
    }
}

/// The next item of a channel, within [`WAIT`].
pub async fn next<T>(rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("nothing arrived in time")
        .expect("event loop ended")
}

/// A rumqttc MQTT 5.0 client, like [`V4Client`].
pub struct V5Client {
    pub client: rumqttc::v5::AsyncClient,
    pub incoming: tokio::sync::mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Packet>,
}

impl V5Client {
    pub async fn connect(
        addr: SocketAddr,
        id: &str,
    ) -> (V5Client, rumqttc::v5::mqttbytes::v5::ConnAck) {
        use rumqttc::v5::mqttbytes::v5::Packet as P;
        let mut opts = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(opts, 1000);
        let (tx, mut incoming) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(event) = eventloop.poll().await {
                if let rumqttc::v5::Event::Incoming(packet) = event
                    && tx.send(packet).is_err()
                {
                    break;
                }
            }
        });
        let connack = match next(&mut incoming).await {
            P::ConnAck(ack) => ack,
            other => panic!("expected CONNACK, got {other:?}"),
        };
        (V5Client { client, incoming }, connack)
    }

    pub async fn subscribe(&mut self, filter: &str) -> rumqttc::v5::mqttbytes::v5::SubAck {
        use rumqttc::v5::mqttbytes::v5::Packet as P;
        self.client
            .subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtMostOnce)
            .await
            .unwrap();
        loop {
            if let P::SubAck(ack) = next(&mut self.incoming).await {
                return ack;
            }
        }
    }

    pub async fn publish_received(&mut self) -> rumqttc::v5::mqttbytes::v5::Publish {
        use rumqttc::v5::mqttbytes::v5::Packet as P;
        loop {
            if let P::Publish(p) = next(&mut self.incoming).await {
                return p;
            }
        }
    }
}

impl Raw {
    /// The next packet, or `None` if nothing arrives within `quiet` or the
    /// connection closed.
    pub fn recv_or_silence(&mut self, quiet: Duration) -> Option<Packet> {
        match self.poll(Instant::now() + quiet) {
            Polled::Packet(p) => Some(p),
            Polled::Closed | Polled::Timeout => None,
        }
    }
}

/// What [`Raw::poll`] found.
#[allow(clippy::large_enum_variant)] // short-lived, test only
pub enum Polled {
    Packet(Packet),
    Closed,
    Timeout,
}
