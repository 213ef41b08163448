//! Users: `ferrymq passwd` and logins against `[auth] password_file` with
//! the real binary, raw clients in both protocol versions and Debian's
//! mosquitto_pub / mosquitto_sub.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use ferrymq_codec::{Packet, Protocol, ReasonCode};

#[test]
fn passwd_adds_changes_checks_and_deletes_users_in_a_0600_file_of_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    assert!(passwd(&file, "sensor-1", &["--stdin"], "first secret\n").0);
    assert!(passwd(&file, "gateway", &["--stdin"], "gw pass\n").0);
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text.lines().count(), 2);
    assert!(
        text.lines().all(|l| l.contains(":$argon2id$v=19$")),
        "{text}"
    );
    assert!(!text.contains("secret") && !text.contains("gw pass"));
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(passwd(&file, "sensor-1", &["--stdin", "--check"], "first secret\n").0);
    assert!(!passwd(&file, "sensor-1", &["--stdin", "--check"], "wrong\n").0);
    assert!(!passwd(&file, "nobody", &["--stdin", "--check"], "first secret\n").0);
    // Change, then the old password no longer works.
    assert!(passwd(&file, "sensor-1", &["--stdin"], "second secret\n").0);
    assert!(!passwd(&file, "sensor-1", &["--stdin", "--check"], "first secret\n").0);
    assert!(
        passwd(
            &file,
            "sensor-1",
            &["--stdin", "--check"],
            "second secret\n"
        )
        .0
    );
    assert!(passwd(&file, "gateway", &["--delete"], "").0);
    let (ok, err) = passwd(&file, "gateway", &["--delete"], "");
    assert!(!ok && err.contains("no user \"gateway\""), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap().lines().count(), 1);
    let (ok, err) = passwd(&file, "a:b", &["--stdin"], "x\n");
    assert!(!ok && err.contains("must not contain ':'"), "{err}");
    let (ok, err) = passwd(&file, "empty", &["--stdin"], "\n");
    assert!(!ok && err.contains("must not be empty"), "{err}");
    assert!(!dir.path().join("passwd.tmp").exists());
}

fn users_broker(extra: &str) -> (Broker, tempfile::TempDir) {
    let users = tempfile::tempdir().unwrap();
    let file = users.path().join("passwd");
    add_user(&file, "sensor-1", "s3cret");
    let broker = Broker::start(&format!(
        "[auth]\npassword_file = {:?}\n{extra}",
        file.display().to_string()
    ));
    (broker, users)
}

/// The CONNACK code (3.1.1 return codes as their 5.0 reason codes).
fn login(broker: &Broker, protocol: Protocol, user: Option<&str>, password: &str) -> ReasonCode {
    let mut raw = Raw::open(broker.addr, protocol);
    let mut connect = connect_packet(protocol, "login");
    connect.username = user.map(s);
    connect.password = user.map(|_| Bytes::copy_from_slice(password.as_bytes()));
    raw.send(&Packet::Connect(Box::new(connect)));
    match raw.recv_within(Duration::from_secs(30)) {
        Some(Packet::ConnAck(ack)) => ack.reason_code,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

#[test]
fn a_user_logs_in_with_its_password_and_nothing_else_does_in_both_versions() {
    let (broker, _users) = users_broker("allow_anonymous = false");
    for protocol in [Protocol::V5, Protocol::V311] {
        assert_eq!(
            login(&broker, protocol, Some("sensor-1"), "s3cret"),
            ReasonCode::SUCCESS
        );
        // Wrong password and unknown user: the same answer (5.0 0x86,
        // 3.1.1 return code 4).
        for (user, password) in [("sensor-1", "S3CRET"), ("ghost", "s3cret")] {
            assert_eq!(
                login(&broker, protocol, Some(user), password),
                ReasonCode::BAD_USER_NAME_OR_PASSWORD,
                "{protocol:?} {user}"
            );
        }
        // No user name, anonymous access off: 0x87 (3.1.1: 5).
        assert_eq!(
            login(&broker, protocol, None, ""),
            ReasonCode::NOT_AUTHORIZED
        );
    }
    broker.wait_for_log("login refused: unknown user or wrong password", WAIT);
}

#[test]
fn repeated_failures_from_one_address_are_slowed_and_a_right_password_still_works() {
    let (broker, _users) = users_broker("");
    // Failures 1 to 4: the fourth waits out the delay earned by three
    // (400 ms) before it is even verified.
    for _ in 0..3 {
        assert_eq!(
            login(&broker, Protocol::V5, Some("sensor-1"), "guess"),
            ReasonCode::BAD_USER_NAME_OR_PASSWORD
        );
    }
    let start = Instant::now();
    assert_eq!(
        login(&broker, Protocol::V5, Some("sensor-1"), "guess"),
        ReasonCode::BAD_USER_NAME_OR_PASSWORD
    );
    assert!(
        start.elapsed() >= Duration::from_millis(400),
        "not slowed: {:?}",
        start.elapsed()
    );
    // The right password after the delay; then the address is forgiven.
    assert_eq!(
        login(&broker, Protocol::V5, Some("sensor-1"), "s3cret"),
        ReasonCode::SUCCESS
    );
    // Anonymous from loopback still allowed by default.
    assert_eq!(
        login(&broker, Protocol::V311, None, ""),
        ReasonCode::SUCCESS
    );
}

#[test]
fn mosquitto_pub_and_sub_log_in_with_a_user_name_and_password() {
    let (broker, _users) = users_broker("allow_anonymous = false");
    let port = broker.addr.port().to_string();
    let credentials = |password: &'static str| {
        [
            "-h",
            "127.0.0.1",
            "-p",
            port.as_str(),
            "-u",
            "sensor-1",
            "-P",
            password,
        ]
    };
    let mut sub = Command::new("mosquitto_sub")
        .args(credentials("s3cret"))
        .args(["-t", "secure/#", "-C", "1", "-W", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub (apt-get install mosquitto-clients)");
    // Publish until the subscriber (connecting meanwhile) gets one.
    let deadline = Instant::now() + Duration::from_secs(20);
    let out = loop {
        let status = Command::new("mosquitto_pub")
            .args(credentials("s3cret"))
            .args(["-t", "secure/door", "-m", "open"])
            .status()
            .unwrap();
        assert!(status.success(), "mosquitto_pub with a password");
        if let Some(_exited) = sub.try_wait().unwrap() {
            break sub.wait_with_output().unwrap();
        }
        assert!(Instant::now() < deadline, "mosquitto_sub got nothing");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "open");
    // A wrong password: mosquitto_pub fails.
    let status = Command::new("mosquitto_pub")
        .args(credentials("nope"))
        .args(["-t", "secure/door", "-m", "x"])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success());
}
