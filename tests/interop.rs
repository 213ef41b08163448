//! Independent MQTT implementations against the real binary: Debian's
//! mosquitto_pub / mosquitto_sub and Eclipse Paho for Python (pinned in
//! .ci/run). These tools are required: CI installs them, and a missing
//! tool fails the test rather than skipping it.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use common::*;

fn tool(name: &str) -> Command {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{name} is not installed: run .ci/run's install step (apt-get install mosquitto-clients / pip install paho-mqtt)"
    );
    Command::new(name)
}

fn mosquitto_round_trip(version: &str) {
    let broker = Broker::start("");
    let port = broker.addr.port().to_string();
    // stdbuf: mosquitto_sub's debug lines are block-buffered on a pipe.
    tool("mosquitto_sub");
    let mut sub = tool("stdbuf")
        .args([
            "-oL",
            "mosquitto_sub",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-V",
            version,
            "-d",
            "-v",
            "-C",
            "3",
        ])
        .args([
            "-t",
            "sensors/+/temp",
            "-t",
            "#",
            "-i",
            &format!("mosq-sub-{version}"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = sub.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Wait for the SUBACK before publishing.
    loop {
        let line = rx
            .recv_timeout(WAIT)
            .expect("mosquitto_sub never subscribed");
        if line.contains("SUBACK") {
            break;
        }
    }
    for (topic, message) in [
        ("sensors/s1/temp", "21.5"),
        ("$SYS/hidden", "x"),
        ("sensors/s2/temp", "19.0"),
        ("other", "z"),
    ] {
        let status = tool("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-V",
                version,
                "-t",
                topic,
                "-m",
                message,
            ])
            .status()
            .unwrap();
        assert!(status.success(), "mosquitto_pub {topic}");
    }
    let mut received = Vec::new();
    while received.len() < 3 {
        let line = rx
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("received only {received:?}"));
        if !line.starts_with("Client ") && !line.starts_with("Subscribed ") {
            received.push(line);
        }
    }
    // Overlapping filters deliver once; `#` does not match `$SYS/...`.
    assert_eq!(
        received,
        ["sensors/s1/temp 21.5", "sensors/s2/temp 19.0", "other z"]
    );
    let status = sub.wait().unwrap();
    assert!(status.success());
}

#[test]
fn mosquitto_clients_mqtt_311() {
    mosquitto_round_trip("mqttv311");
}

#[test]
fn mosquitto_clients_mqtt_5() {
    mosquitto_round_trip("mqttv5");
}

/// Runs a Python paho script against a fresh broker with `args` after the
/// host and port; fails with the script's output.
fn paho(script: &str, args: &[&str]) {
    paho_with("", script, args);
}

/// [`paho`] against a broker started with `config` (extra TOML).
fn paho_with(config: &str, script: &str, args: &[&str]) {
    let broker = Broker::start(config);
    let path = format!("{}/tests/interop/{script}", env!("CARGO_MANIFEST_DIR"));
    let output = tool("python3")
        .arg(path)
        .arg("127.0.0.1")
        .arg(broker.addr.port().to_string())
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{script} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn paho_python_mqtt_311_and_5() {
    paho("paho_check.py", &[]);
}

/// One scenario of paho_core.py (over MQTT 3.1.1 then 5.0); one test per
/// scenario so that a failure names the behaviour.
fn paho_core(scenario: &str) {
    paho("paho_core.py", &[scenario]);
}

#[test]
fn paho_persistent_sessions() {
    paho_core("persistent");
}

#[test]
fn paho_qos2_and_qos_downgrade() {
    paho_core("qos2");
}

#[test]
fn paho_retained_messages() {
    paho_core("retained");
}

#[test]
fn paho_wills() {
    paho_core("will");
}

#[test]
fn paho_qos1_burst_in_order() {
    paho_core("order");
}

#[test]
fn paho_overlapping_subscriptions() {
    paho_core("overlap");
}

// MQTT 5.0 features, one test per scenario of paho_v5.py.

#[test]
fn paho_v5_session_expiry() {
    paho_with(
        "[storage]\nmax_session_expiry_secs = 60",
        "paho_v5.py",
        &["session_expiry"],
    );
}

#[test]
fn paho_v5_message_expiry() {
    paho("paho_v5.py", &["message_expiry"]);
}

#[test]
fn paho_v5_will_delay() {
    paho("paho_v5.py", &["will_delay"]);
}

#[test]
fn paho_v5_flow_control() {
    paho("paho_v5.py", &["flow_control"]);
}

#[test]
fn paho_v5_max_packet_size() {
    paho("paho_v5.py", &["max_packet_size"]);
}

#[test]
fn paho_v5_topic_alias() {
    paho("paho_v5.py", &["topic_alias"]);
}

#[test]
fn paho_v5_sub_ids() {
    paho("paho_v5.py", &["sub_ids"]);
}

#[test]
fn paho_v5_no_local_rap_rh() {
    paho("paho_v5.py", &["no_local_rap_rh"]);
}

#[test]
fn paho_v5_shared() {
    paho("paho_v5.py", &["shared"]);
}

#[test]
fn paho_v5_properties() {
    paho("paho_v5.py", &["properties"]);
}

#[test]
fn paho_v5_auth_unknown() {
    paho("paho_v5.py", &["auth_unknown"]);
}

#[test]
fn paho_v5_reason_codes() {
    paho("paho_v5.py", &["reason_codes"]);
}
