//! A scripted MQTT 5 upstream on 127.0.0.1 for what Mosquitto cannot be
//! made to do: answer PUBACK 0x97 (quota exceeded) for a while, and check
//! that a client never exceeds the Receive Maximum it announced.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferrymq_codec::{
    ConnAck, ConnAckProperties, Packet, Protocol, PubAck, QoS, ReasonCode, decode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// How the fake behaves.
#[derive(Debug, Clone, Copy)]
pub struct Script {
    /// Announced in CONNACK.
    pub receive_maximum: u16,
    /// The first this many QoS 1 publishes get a refusing PUBACK...
    pub refuse_first: usize,
    /// ... with this code (default 0x97 Quota exceeded).
    pub refuse_with: ReasonCode,
    /// Each PUBACK is sent this long after its PUBLISH.
    pub ack_delay: Duration,
    /// Refuse every CONNECT with 0x9C (Use another server) and this
    /// Server Reference.
    pub refer_to: Option<&'static str>,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            receive_maximum: 100,
            refuse_first: 0,
            refuse_with: ReasonCode::QUOTA_EXCEEDED,
            ack_delay: Duration::from_millis(1),
            refer_to: None,
        }
    }
}

/// What the fake saw.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Payloads of accepted publishes, in arrival order (duplicates too).
    pub accepted: Vec<Bytes>,
    /// Their Message Expiry Intervals.
    pub expiry: Vec<Option<u32>>,
    /// When each publish arrived, and whether it was refused.
    pub arrivals: Vec<(Instant, bool)>,
    /// Most publishes unacknowledged at once.
    pub max_in_flight: usize,
    /// Connections accepted.
    pub connections: usize,
}

/// The fake upstream; stops on drop.
pub struct Fake {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Fake {
    /// On a free port of 127.0.0.1.
    pub async fn start(script: Script) -> Fake {
        Fake::start_on(([127, 0, 0, 1], 0).into(), script).await
    }

    /// On `addr` (a loopback address; port 0: any free one).
    pub async fn start_on(addr: std::net::SocketAddr, script: Script) -> Fake {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let refused = Arc::new(Mutex::new(0usize));
        let task = tokio::spawn({
            let seen = seen.clone();
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    seen.lock().unwrap().connections += 1;
                    tokio::spawn(serve(stream, script, seen.clone(), refused.clone()));
                }
            }
        });
        Fake { addr, seen, task }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn seen(&self) -> Seen {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    mut stream: TcpStream,
    script: Script,
    seen: Arc<Mutex<Seen>>,
    refused: Arc<Mutex<usize>>,
) {
    let mut input = BytesMut::new();
    let mut out = BytesMut::new();
    let mut protocol = Protocol::V5;
    // (due, packet id, refuse)
    let mut acks: std::collections::VecDeque<(Instant, u16, bool)> = Default::default();
    loop {
        loop {
            match decode(&mut input, protocol, u32::MAX) {
                Ok(Some(Packet::Connect(c))) => {
                    protocol = c.protocol;
                    let mut connack = ConnAck {
                        properties: ConnAckProperties {
                            receive_maximum: Some(script.receive_maximum),
                            ..Default::default()
                        },
                        ..ConnAck::default()
                    };
                    if let Some(reference) = script.refer_to {
                        connack.reason_code = ReasonCode::USE_ANOTHER_SERVER;
                        connack.properties.server_reference =
                            Some(ferrymq_codec::MqttString::new(reference).unwrap());
                    }
                    Packet::ConnAck(Box::new(connack))
                        .encode(protocol, &mut out)
                        .unwrap();
                    if script.refer_to.is_some() {
                        let _ = stream.write_all(&out).await;
                        return;
                    }
                }
                Ok(Some(Packet::Publish(p))) if p.qos == QoS::AtLeastOnce => {
                    let refuse = {
                        let mut r = refused.lock().unwrap();
                        let refuse = *r < script.refuse_first;
                        *r += usize::from(refuse);
                        refuse
                    };
                    acks.push_back((Instant::now() + script.ack_delay, p.packet_id, refuse));
                    let mut s = seen.lock().unwrap();
                    s.arrivals.push((Instant::now(), refuse));
                    if !refuse {
                        s.accepted.push(p.payload.clone());
                        s.expiry.push(p.properties.message_expiry_interval);
                    }
                    s.max_in_flight = s.max_in_flight.max(acks.len());
                }
                Ok(Some(Packet::PingReq)) => {
                    Packet::PingResp.encode(protocol, &mut out).unwrap();
                }
                Ok(Some(Packet::Disconnect(_))) => return,
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        let due = acks.front().map(|a| a.0);
        tokio::select! {
            read = stream.read_buf(&mut input) => {
                if !matches!(read, Ok(n) if n > 0) {
                    return;
                }
            }
            _ = async { tokio::time::sleep_until(due.unwrap_or_else(Instant::now)).await }, if due.is_some() => {
                let now = Instant::now();
                while let Some(&(at, id, refuse)) = acks.front() {
                    if at > now {
                        break;
                    }
                    acks.pop_front();
                    let mut ack = PubAck::new(id);
                    if refuse {
                        ack.reason_code = script.refuse_with;
                    }
                    Packet::PubAck(ack).encode(protocol, &mut out).unwrap();
                }
            }
        }
    }
}
