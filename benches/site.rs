//! What a deployed site pays for TLS and passwords: ferrymq (the release
//! binary) against Mosquitto (the Debian package) in the same run, each
//! started fresh for every measurement, alternated (A B A B ...) so that
//! machine noise hits both alike. MQTT 3.1.1 clients of our own (the
//! codec over tokio, rustls with the `ring` provider for TLS), on one
//! thread, so the broker has the other core.
//!
//! Measurements:
//! - `TLS 1.3 setups/s`: TCP connect, TLS 1.3 handshake (an ECDSA P-256
//!   certificate made here), CONNECT / CONNACK, DISCONNECT; 8 at a time.
//! - `QoS 1 fan-in over TLS`: 10 publishers -> 1 subscriber, 100 in
//!   flight each, 64-byte payloads; delivered msg/s.
//! - `logins/s`: `--clients` clients (10,000) log in with a user name and
//!   password over TCP (`--users` users, client i as user i mod users)
//!   and disconnect, 32 at a time: against a broker just started (cold:
//!   ferrymq verifies each user's argon2id hash once), then the same
//!   clients again (warm: ferrymq remembers the verified logins).
//!   Mosquitto checks its own (fast, salted SHA-512) hashes every time.
//! - `wrong passwords`: 8 connections from one address try wrong
//!   passwords for `--guess-seconds` (10): attempts answered per second
//!   and the broker's CPU use (ferrymq slows each failing address, so a
//!   guessing flood costs little CPU).
//! - the time of one argon2id verification here (in this process).
//!
//! Run:
//!   cargo bench --bench site
//!   cargo bench --bench site -- --rounds 1 --users 100 --clients 2000
//!
//! Under `cargo test --benches` (and nextest) a small smoke run checks the
//! program end to end against both brokers.

#[allow(dead_code)]
mod common;
#[path = "../bridge/tests/common/pki.rs"]
#[allow(dead_code, clippy::unwrap_used)]
mod pki;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::{Args, cpu_time, free_port, mosquitto_conf, wait_listening};
use ferrymq_codec::{
    Connect, ConnectProperties, MqttString, Packet, Protocol, PubAck, Publish, QoS, ReasonCode,
    Subscribe, Subscription, SubscriptionOptions, decode,
};
use rustls::pki_types::pem::PemObject as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// The load of one run.
#[derive(Debug, Clone, Copy)]
struct Load {
    setups: u64,
    publishers: u32,
    messages: u32,
    users: u32,
    clients: u32,
    guess: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ferrymq,
    Mosquitto,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Ferrymq => "ferrymq",
            Kind::Mosquitto => "mosquitto",
        }
    }
}

/// The files both brokers are started with: the server certificate and
/// the users (argon2id for ferrymq, Mosquitto's own format).
struct Site {
    pki: pki::Pki,
    ferrymq_passwd: std::path::PathBuf,
    mosquitto_passwd: std::path::PathBuf,
    /// Each user's password, by index.
    passwords: Vec<String>,
    tls: tokio_rustls::TlsConnector,
}

impl Site {
    fn make(users: u32) -> Site {
        let pki = pki::Pki::generate();
        let passwords: Vec<String> = (0..users).map(|i| format!("pw-{i}-secret")).collect();
        // Hashed on every core: one argon2id hash takes tens of ms.
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let chunks: Vec<Vec<(usize, String)>> = (0..threads)
            .map(|t| {
                passwords
                    .iter()
                    .enumerate()
                    .skip(t)
                    .step_by(threads)
                    .map(|(i, p)| (i, p.clone()))
                    .collect()
            })
            .collect();
        let mut lines: Vec<(usize, String)> = std::thread::scope(|scope| {
            let handles: Vec<_> = chunks
                .into_iter()
                .map(|chunk| {
                    scope.spawn(move || {
                        chunk
                            .into_iter()
                            .map(|(i, p)| {
                                let hash = ferrymq_broker::users::hash_password(&p).expect("hash");
                                (i, format!("user{i}:{hash}\n"))
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("hashing thread"))
                .collect()
        });
        lines.sort();
        let ferrymq_passwd = pki.dir.path().join("ferrymq.passwd");
        std::fs::write(
            &ferrymq_passwd,
            lines.into_iter().map(|(_, l)| l).collect::<String>(),
        )
        .expect("write the password file");
        let mosquitto_passwd = pki.dir.path().join("mosquitto.passwd");
        let plain: String = passwords
            .iter()
            .enumerate()
            .map(|(i, p)| format!("user{i}:{p}\n"))
            .collect();
        std::fs::write(&mosquitto_passwd, plain).expect("write the password file");
        let status = Command::new("mosquitto_passwd")
            .arg("-U")
            .arg(&mosquitto_passwd)
            .status()
            .expect("mosquitto_passwd (apt install mosquitto)");
        assert!(status.success(), "mosquitto_passwd -U");
        let tls = connector(&pki.ca);
        Site {
            pki,
            ferrymq_passwd,
            mosquitto_passwd,
            passwords,
            tls,
        }
    }
}

/// A TLS 1.3-only client configuration trusting `ca`.
fn connector(ca: &Path) -> tokio_rustls::TlsConnector {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).expect("read the CA");
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.expect("CA PEM")).expect("add the CA");
    }
    let config = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// A broker with a plain TCP listener and a TLS 1.3 one, killed on drop.
struct Server {
    child: Child,
    tcp: SocketAddr,
    tls: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(kind: Kind, site: &Site) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let (tcp, tls) = (free_port(), free_port());
        let mut command = match kind {
            Kind::Ferrymq => {
                let config = format!(
                    "data_dir = {:?}\n\
                     [[listener]]\nbind = \"127.0.0.1:{tcp}\"\n\
                     [[listener]]\nbind = \"127.0.0.1:{tls}\"\nprotocol = \"tls\"\n{}\
                     [auth]\npassword_file = {:?}\n\
                     [storage]\nqueue_full = \"block\"\nmax_queued_messages = 1000\n",
                    dir.path().join("data").display().to_string(),
                    site.pki.listener_keys(),
                    site.ferrymq_passwd.display().to_string(),
                );
                let file = dir.path().join("ferrymq.toml");
                std::fs::write(&file, config).expect("write ferrymq.toml");
                let mut c = Command::new(env!("CARGO_BIN_EXE_ferrymq"));
                c.arg("--config").arg(file).env("RUST_LOG", "error");
                c
            }
            Kind::Mosquitto => {
                let extra = format!(
                    "set_tcp_nodelay true\npassword_file {}\n\
                     listener {tls} 127.0.0.1\ncertfile {}\nkeyfile {}\ntls_version tlsv1.3\n",
                    site.mosquitto_passwd.display(),
                    site.pki.server_cert.display(),
                    site.pki.server_key.display(),
                );
                let file = dir.path().join("mosquitto.conf");
                std::fs::write(&file, mosquitto_conf(tcp, &extra)).expect("write mosquitto.conf");
                let mut c = Command::new("mosquitto");
                c.arg("-c").arg(file);
                c
            }
        };
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", kind.name()));
        let server = Server {
            child,
            tcp: ([127, 0, 0, 1], tcp).into(),
            tls: ([127, 0, 0, 1], tls).into(),
            _dir: dir,
        };
        wait_listening(server.tcp, kind.name());
        wait_listening(server.tls, kind.name());
        server
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------
// A small MQTT 3.1.1 client over any stream.

struct Mqtt<S> {
    stream: S,
    inbuf: BytesMut,
    out: BytesMut,
}

const MAX_PACKET: u32 = 1 << 20;

impl<S: AsyncRead + AsyncWrite + Unpin> Mqtt<S> {
    /// Connects as `id` (with `login`, if given); the CONNACK's code, or
    /// `None` when the broker closed first.
    async fn connect(
        stream: S,
        id: &str,
        login: Option<(&str, &str)>,
    ) -> (Self, Option<ReasonCode>) {
        let mut mqtt = Mqtt {
            stream,
            inbuf: BytesMut::with_capacity(4096),
            out: BytesMut::with_capacity(4096),
        };
        mqtt.queue(&Packet::Connect(Box::new(Connect {
            protocol: Protocol::V311,
            clean_start: true,
            keep_alive: 60,
            client_id: MqttString::new(id).expect("client id"),
            will: None,
            username: login.map(|(u, _)| MqttString::new(u).expect("user")),
            password: login.map(|(_, p)| Bytes::copy_from_slice(p.as_bytes())),
            properties: ConnectProperties::default(),
        })));
        mqtt.flush().await;
        let code = match mqtt.recv().await {
            Some(Packet::ConnAck(ack)) => Some(ack.reason_code),
            _ => None,
        };
        (mqtt, code)
    }

    fn queue(&mut self, packet: &Packet) {
        packet
            .encode(Protocol::V311, &mut self.out)
            .expect("encode");
    }

    async fn flush(&mut self) {
        if !self.out.is_empty() {
            let _ = self.stream.write_all(&self.out).await;
            self.out.clear();
        }
    }

    /// The next packet; `None` at the end of the stream. What is queued
    /// is written before waiting for input.
    async fn recv(&mut self) -> Option<Packet> {
        loop {
            match decode(&mut self.inbuf, Protocol::V311, MAX_PACKET) {
                Ok(Some(packet)) => return Some(packet),
                Ok(None) => {}
                Err(_) => return None,
            }
            self.flush().await;
            match self.stream.read_buf(&mut self.inbuf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    async fn disconnect(mut self) {
        self.queue(&Packet::Disconnect(Default::default()));
        self.flush().await;
        let _ = self.stream.shutdown().await;
    }
}

async fn tls_stream(
    addr: SocketAddr,
    tls: &tokio_rustls::TlsConnector,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("server name");
    tls.connect(name.to_owned(), tcp)
        .await
        .expect("TLS handshake")
}

// ---------------------------------------------------------------------
// Measurements

/// TLS setups per second, 8 at a time.
async fn setups(server: &Server, site: &Site, load: &Load) -> f64 {
    let start = Instant::now();
    let next = Rc::new(std::cell::Cell::new(0u64));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (next, tls, addr, n) = (next.clone(), site.tls.clone(), server.tls, load.setups);
            tokio::task::spawn_local(async move {
                loop {
                    let i = next.get();
                    if i >= n {
                        return;
                    }
                    next.set(i + 1);
                    let stream = tls_stream(addr, &tls).await;
                    let (mqtt, code) = Mqtt::connect(stream, &format!("setup-{i}"), None).await;
                    assert_eq!(code, Some(ReasonCode::SUCCESS), "setup {i}");
                    mqtt.disconnect().await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("setup task");
    }
    load.setups as f64 / start.elapsed().as_secs_f64()
}

/// QoS 1 fan-in over TLS: delivered msg/s (every message checked once).
async fn tls_fanin(server: &Server, site: &Site, load: &Load) -> f64 {
    let total = u64::from(load.publishers) * u64::from(load.messages);
    let stream = tls_stream(server.tls, &site.tls).await;
    let (mut sub, code) = Mqtt::connect(stream, "fanin-sub", None).await;
    assert_eq!(code, Some(ReasonCode::SUCCESS));
    sub.queue(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        subscriptions: vec![Subscription {
            filter: MqttString::new("fanin/#").expect("filter"),
            options: SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                ..SubscriptionOptions::default()
            },
        }],
        properties: Default::default(),
    }));
    sub.flush().await;
    assert!(matches!(sub.recv().await, Some(Packet::SubAck(_))));
    let start = Instant::now();
    let subscriber = tokio::task::spawn_local(async move {
        let mut seen = vec![false; usize::try_from(total).expect("size")];
        let mut unique = 0u64;
        while unique < total {
            let Some(packet) = sub.recv().await else {
                panic!("the subscriber's connection ended after {unique} of {total}");
            };
            if let Packet::Publish(p) = packet {
                let index = u64::from_be_bytes(p.payload[..8].try_into().expect("index"));
                let slot = &mut seen[usize::try_from(index).expect("index")];
                if !*slot {
                    *slot = true;
                    unique += 1;
                }
                // Acknowledged in batches: written when `recv` waits.
                sub.queue(&Packet::PubAck(PubAck::new(p.packet_id)));
            }
        }
        sub.flush().await;
    });
    let publishers: Vec<_> = (0..load.publishers)
        .map(|n| {
            let (addr, tls, messages) = (server.tls, site.tls.clone(), load.messages);
            tokio::task::spawn_local(async move {
                let stream = tls_stream(addr, &tls).await;
                let (mut publisher, code) =
                    Mqtt::connect(stream, &format!("fanin-{n}"), None).await;
                assert_eq!(code, Some(ReasonCode::SUCCESS));
                let (mut sent, mut inflight) = (0u32, 0u32);
                let mut payload = vec![0u8; 64];
                while sent < messages || inflight > 0 {
                    while sent < messages && inflight < 100 {
                        let index = u64::from(n) * u64::from(messages) + u64::from(sent);
                        payload[..8].copy_from_slice(&index.to_be_bytes());
                        publisher.queue(&Packet::Publish(Publish {
                            topic: MqttString::new(&format!("fanin/{n}")).expect("topic"),
                            qos: QoS::AtLeastOnce,
                            packet_id: u16::try_from(sent % 60_000 + 1).expect("id"),
                            payload: Bytes::copy_from_slice(&payload),
                            ..Publish::default()
                        }));
                        sent += 1;
                        inflight += 1;
                    }
                    publisher.flush().await;
                    match publisher.recv().await {
                        Some(Packet::PubAck(_)) => inflight -= 1,
                        Some(_) => {}
                        None => panic!("publisher {n}'s connection ended"),
                    }
                }
                publisher.disconnect().await;
            })
        })
        .collect();
    for p in publishers {
        p.await.expect("publisher");
    }
    subscriber.await.expect("subscriber");
    total as f64 / start.elapsed().as_secs_f64()
}

/// Logins per second of `load.clients` clients, 32 at a time.
async fn logins(server: &Server, site: &Site, load: &Load) -> f64 {
    let start = Instant::now();
    let next = Rc::new(std::cell::Cell::new(0u32));
    let passwords = Rc::new(site.passwords.clone());
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (next, passwords, addr, load) =
                (next.clone(), passwords.clone(), server.tcp, *load);
            tokio::task::spawn_local(async move {
                loop {
                    let i = next.get();
                    if i >= load.clients {
                        return;
                    }
                    next.set(i + 1);
                    let user = i % load.users;
                    let stream = TcpStream::connect(addr).await.expect("connect");
                    let name = format!("user{user}");
                    let password = &passwords[user as usize];
                    let (mqtt, code) =
                        Mqtt::connect(stream, &format!("login-{i}"), Some((&name, password))).await;
                    assert_eq!(code, Some(ReasonCode::SUCCESS), "login {i} as {name}");
                    mqtt.disconnect().await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("login task");
    }
    f64::from(load.clients) / start.elapsed().as_secs_f64()
}

/// Wrong passwords from one address for `load.guess`, 8 at a time:
/// attempts answered per second, and the broker's CPU use (cores).
async fn guessing(server: &Server, load: &Load) -> (f64, f64) {
    let pid = server.pid();
    let (cpu0, start) = (cpu_time(&pid), Instant::now());
    let answered = Rc::new(std::cell::Cell::new(0u64));
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let (answered, addr, until) = (answered.clone(), server.tcp, start + load.guess);
            tokio::task::spawn_local(async move {
                let mut n = 0;
                while Instant::now() < until {
                    let left = until.saturating_duration_since(Instant::now());
                    let attempt = async {
                        let stream = TcpStream::connect(addr).await.expect("connect");
                        Mqtt::connect(stream, &format!("guess-{t}-{n}"), Some(("user0", "wrong")))
                            .await
                            .1
                    };
                    if let Ok(code) = tokio::time::timeout(left, attempt).await {
                        assert_ne!(code, Some(ReasonCode::SUCCESS), "a wrong password got in");
                        answered.set(answered.get() + 1);
                    }
                    n += 1;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("guess task");
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = (cpu_time(&pid) - cpu0).as_secs_f64();
    (answered.get() as f64 / wall, cpu / wall)
}

/// One round against `kind`: every measurement, each on a fresh broker
/// (the logins: cold on a fresh one, then warm on the same).
fn round(kind: Kind, site: &Site, load: &Load) -> Vec<(&'static str, f64)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let mut figures = Vec::new();
        let server = Server::start(kind, site);
        figures.push(("setups", setups(&server, site, load).await));
        drop(server);
        let server = Server::start(kind, site);
        figures.push(("fanin", tls_fanin(&server, site, load).await));
        drop(server);
        let server = Server::start(kind, site);
        figures.push(("logins_cold", logins(&server, site, load).await));
        figures.push(("logins_warm", logins(&server, site, load).await));
        drop(server);
        let server = Server::start(kind, site);
        let (attempts, cores) = guessing(&server, load).await;
        figures.push(("guess_per_s", attempts));
        figures.push(("guess_cpu", cores * 100.0));
        figures
    })
}

const ROWS: &[(&str, &str)] = &[
    (
        "setups",
        "TLS 1.3 setups/s (connect, handshake, CONNECT/CONNACK)",
    ),
    ("fanin", "QoS 1 fan-in over TLS 1.3, delivered msg/s"),
    ("logins_cold", "logins/s, broker just started (cold)"),
    ("logins_warm", "logins/s, the same clients again (warm)"),
    (
        "guess_per_s",
        "wrong-password attempts answered/s, one address",
    ),
    ("guess_cpu", "broker CPU during those attempts, % of a core"),
];

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() {
    let Some(args) = Args::from_env() else {
        return;
    };
    let bench = args.bench();
    let value = |name: &str, default: u64| {
        args.value(name)
            .map_or(default, |v| v.parse().expect("a number"))
    };
    let (load, rounds) = if bench {
        (
            Load {
                setups: value("--setups", 2000),
                publishers: 10,
                messages: u32::try_from(value("--messages", 20_000)).expect("--messages"),
                users: u32::try_from(value("--users", 1000)).expect("--users"),
                clients: u32::try_from(value("--clients", 10_000)).expect("--clients"),
                guess: Duration::from_secs(value("--guess-seconds", 10)),
            },
            value("--rounds", 3),
        )
    } else {
        // Smoke: the program itself, quickly.
        (
            Load {
                setups: 20,
                publishers: 4,
                messages: 100,
                users: 4,
                clients: 40,
                guess: Duration::from_millis(500),
            },
            1,
        )
    };
    let verify = {
        let mut file = ferrymq_broker::users::PasswordFile::default();
        file.set("u", "p").expect("set");
        let start = Instant::now();
        assert!(file.check("u", "p"));
        start.elapsed()
    };
    eprintln!("site: hashing {} users for both brokers...", load.users);
    let site = Site::make(load.users);
    let kinds = [Kind::Ferrymq, Kind::Mosquitto];
    let mut runs: Vec<(Kind, Vec<(&str, f64)>)> = Vec::new();
    for r in 0..rounds {
        for kind in kinds {
            eprintln!("site: round {} of {rounds}, {}", r + 1, kind.name());
            runs.push((kind, round(kind, &site, &load)));
        }
    }
    let figure = |kind: Kind, key: &str| {
        median(
            runs.iter()
                .filter(|(k, _)| *k == kind)
                .filter_map(|(_, f)| f.iter().find(|(k, _)| *k == key).map(|(_, v)| *v))
                .collect(),
        )
    };
    let mut table = format!(
        "Load: {} setups, {} publishers x {} messages, {} clients as {} users, {:?} of \
         wrong passwords; median of {rounds} round(s).\n\n\
         | | ferrymq | Mosquitto | ferrymq / Mosquitto |\n|---|---|---|---|\n",
        load.setups, load.publishers, load.messages, load.clients, load.users, load.guess
    );
    for (key, label) in ROWS {
        let (f, m) = (figure(Kind::Ferrymq, key), figure(Kind::Mosquitto, key));
        let _ = writeln!(table, "| {label} | {f:.0} | {m:.0} | {:.2}x |", f / m);
    }
    let _ = writeln!(
        table,
        "\nOne argon2id verification (m = 19 MiB, t = 2, p = 1) in this process: {:.1} ms.",
        verify.as_secs_f64() * 1000.0
    );
    println!("{table}");
    if !bench {
        // The smoke run checked every exchange as it went; the figures
        // exist.
        for (kind, figures) in &runs {
            assert!(
                figures.iter().all(|(_, v)| v.is_finite() && *v >= 0.0),
                "{}: {figures:?}",
                kind.name()
            );
        }
    }
}
