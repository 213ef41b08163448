//! WebSocket listeners (`ws`, `wss`) with the real binary and real
//! clients: MQTT.js under node (npm `mqtt`, installed by
//! scripts/install-test-deps.sh) and Python paho-mqtt with
//! `transport="websockets"`, in both protocol versions; a message crosses
//! from a WebSocket client to a TCP one (one engine behind every
//! listener); wrong paths and subprotocols are refused over HTTP.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "../bridge/tests/common/pki.rs"]
#[allow(dead_code)]
mod pki;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use pki::Pki;

/// Starts ferrymq with a TCP listener (index 0), a `ws` one (1) and a
/// `wss` one (2), and `more` TOML.
fn ws_broker(pki: &Pki, more: &str) -> Broker {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "data_dir = {:?}\n\
         [[listener]]\nbind = \"127.0.0.1:0\"\n\
         [[listener]]\nbind = \"127.0.0.1:0\"\nprotocol = \"ws\"\n\
         [[listener]]\nbind = \"127.0.0.1:0\"\nprotocol = \"wss\"\npath = \"/secure/mqtt\"\n\
         {}{more}\n",
        dir.path().join("data").display().to_string(),
        pki.listener_keys(),
    );
    Broker::start_with_config(&config, dir)
}

/// Runs tests/interop/mqttjs/check.js with `args`; its output, after
/// asserting that it succeeded.
fn mqttjs(args: &[&str], env: &[(&str, &str)]) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/mqttjs");
    assert!(
        dir.join("node_modules/mqtt").exists(),
        "MQTT.js is not installed: run scripts/install-test-deps.sh (npm ci in {})",
        dir.display()
    );
    let output = Command::new("node")
        .current_dir(&dir)
        .arg("check.js")
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("node (apt-get install nodejs)");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "MQTT.js {args:?} failed:\n{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqttjs_over_ws_and_wss_in_both_protocol_versions() {
    let pki = Pki::generate();
    let broker = ws_broker(&pki, "");
    let ws = broker.listener_addr(1);
    let wss = broker.listener_addr(2);
    let ca = pki.ca.display().to_string();
    // A TCP client sees what the WebSocket clients publish.
    let mut tcp = V4Client::connect(broker.addr, "tcp-side").await;
    tcp.subscribe("ws/cross").await;
    for version in ["4", "5"] {
        let runs = [
            (format!("ws://127.0.0.1:{}/mqtt", ws.port()), None),
            (
                format!("wss://127.0.0.1:{}/secure/mqtt", wss.port()),
                Some(ca.clone()),
            ),
        ];
        for (url, ca) in runs {
            let out = tokio::task::spawn_blocking(move || {
                let mut args = vec!["exchange", &url, version];
                args.extend(ca.as_deref());
                mqttjs(&args, &[])
            })
            .await
            .unwrap();
            assert!(out.contains("ok exchanged 20"), "{out}");
            let crossed = tcp.publish_received().await;
            assert_eq!(&crossed.payload[..], b"from-mqttjs");
        }
    }
}

#[test]
fn paho_over_ws_and_wss_in_both_protocol_versions() {
    let pki = Pki::generate();
    let broker = ws_broker(&pki, "");
    let script = format!("{}/tests/interop/paho_ws.py", env!("CARGO_MANIFEST_DIR"));
    let ws = broker.listener_addr(1).port().to_string();
    let wss = broker.listener_addr(2).port().to_string();
    let ca = pki.ca.display().to_string();
    for args in [
        vec!["127.0.0.1", &ws, "/mqtt"],
        vec!["127.0.0.1", &wss, "/secure/mqtt", &ca],
    ] {
        let output = Command::new("python3")
            .arg(&script)
            .args(&args)
            .output()
            .expect("python3 with paho-mqtt");
        assert!(
            output.status.success(),
            "paho_ws.py {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn a_refused_login_reaches_a_websocket_client_with_its_reason_code() {
    let pki = Pki::generate();
    let dir = tempfile::tempdir().unwrap();
    let passwords = dir.path().join("passwd");
    add_user(&passwords, "sensor", "right");
    let broker = ws_broker(
        &pki,
        &format!(
            "[auth]\npassword_file = {:?}\n",
            passwords.display().to_string()
        ),
    );
    let url = format!("ws://127.0.0.1:{}/mqtt", broker.listener_addr(1).port());
    let wrong = [("USER_NAME", "sensor"), ("PASSWORD", "wrong")];
    // 0x86 Bad User Name or Password (5.0); 4 in 3.1.1.
    let out = mqttjs(&["refused", &url, "5"], &wrong);
    assert!(out.contains("code=134"), "{out}");
    let out = mqttjs(&["refused", &url, "4"], &wrong);
    assert!(out.contains("code=4"), "{out}");
}

/// Sends an HTTP upgrade request for `path` offering `protocol`; the
/// status line of the answer.
fn upgrade(addr: SocketAddr, path: &str, protocol: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {protocol}\r\n\r\n"
    )
    .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    let answer = String::from_utf8_lossy(&answer).into_owned();
    answer.lines().next().unwrap_or_default().to_owned()
}

#[test]
fn a_wrong_path_or_subprotocol_is_refused_over_http() {
    let pki = Pki::generate();
    let broker = ws_broker(&pki, "");
    let ws = broker.listener_addr(1);
    assert!(upgrade(ws, "/other", "mqtt").starts_with("HTTP/1.1 404"));
    assert!(upgrade(ws, "/mqtt", "chat").starts_with("HTTP/1.1 400"));
    assert!(upgrade(ws, "/mqtt", "mqtt").starts_with("HTTP/1.1 101"));
    // The broker is unharmed: a TCP client still exchanges messages.
    let mut client = Raw::connect(broker.addr, ferrymq_codec::Protocol::V5, "after");
    client.send(&ferrymq_codec::Packet::PingReq);
    assert_eq!(client.recv(), Some(ferrymq_codec::Packet::PingResp));
}
