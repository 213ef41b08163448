//! TLS listeners with the real binary and Debian's mosquitto_pub /
//! mosquitto_sub as clients: server authentication, TLS versions, mutual
//! TLS, a certificate identity as the user name for the ACL, and an
//! expired certificate refused at start. Certificates are made here
//! (rcgen).

#![allow(clippy::unwrap_used)]

mod common;
#[path = "../bridge/tests/common/pki.rs"]
#[allow(dead_code)]
mod pki;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use pki::Pki;

/// Starts ferrymq with one TLS listener (`extra` keys in its table) and
/// `more` TOML after it.
fn tls_broker(pki: &Pki, extra: &str, more: &str) -> Broker {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "data_dir = {:?}\n[[listener]]\nbind = \"127.0.0.1:0\"\nprotocol = \"tls\"\n{}{extra}\n\
         {more}\n",
        dir.path().join("data").display().to_string(),
        pki.listener_keys(),
    );
    Broker::start_with_config(&config, dir)
}

/// mosquitto_pub over TLS with `args`; whether it succeeded.
fn publish(broker: &Broker, ca: &Path, args: &[&str]) -> bool {
    Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.addr.port().to_string()])
        .arg("--cafile")
        .arg(ca)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("mosquitto_pub (apt-get install mosquitto-clients)")
        .success()
}

#[test]
fn clients_that_trust_the_ca_connect_over_tls_1_3_and_others_do_not() {
    let pki = Pki::generate();
    let broker = tls_broker(&pki, "", "");
    let msg = ["-t", "tls/t", "-m", "x", "-q", "1"];
    assert!(publish(&broker, &pki.ca, &msg), "a client with the CA");
    assert!(!publish(&broker, &pki.other_ca, &msg), "another CA");
    assert!(
        !handshake_tls12(&broker, &pki.ca),
        "TLS 1.2 against a 1.3-only listener"
    );
    assert!(!publish_plain(&broker), "plain MQTT on a TLS port");
    // min_tls = "1.2" lets it in.
    let broker = tls_broker(&pki, "min_tls = \"1.2\"", "");
    assert!(handshake_tls12(&broker, &pki.ca));
}

/// Whether a TLS 1.2-only handshake (openssl s_client -tls1_2) completes:
/// it prints "New, TLSv1.2, Cipher is ..." only then (its "Protocol"
/// line names 1.2 either way).
fn handshake_tls12(broker: &Broker, ca: &Path) -> bool {
    let out = Command::new("openssl")
        .args(["s_client", "-tls1_2", "-connect"])
        .arg(broker.addr.to_string())
        .arg("-CAfile")
        .arg(ca)
        .stdin(Stdio::null())
        .output()
        .expect("openssl (apt-get install openssl)");
    String::from_utf8_lossy(&out.stdout).contains("New, TLSv1.2, Cipher is")
}

fn publish_plain(broker: &Broker) -> bool {
    Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.addr.port().to_string()])
        .args(["-t", "tls/t", "-m", "x"])
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

#[test]
fn mutual_tls_needs_a_client_certificate_signed_by_the_client_ca() {
    let pki = Pki::generate();
    let broker = tls_broker(
        &pki,
        &format!("client_ca = {:?}", pki.ca.display().to_string()),
        "",
    );
    let msg = ["-t", "tls/t", "-m", "x", "-q", "1"];
    assert!(!publish(&broker, &pki.ca, &msg), "no client certificate");
    let cert = pki.client_cert.display().to_string();
    let key = pki.client_key.display().to_string();
    let with_cert: Vec<&str> = ["--cert", cert.as_str(), "--key", key.as_str()]
        .iter()
        .chain(&msg)
        .copied()
        .collect();
    assert!(publish(&broker, &pki.ca, &with_cert));
}

#[test]
fn a_certificate_identity_stands_in_for_the_user_name_in_the_acl() {
    // The client certificate's common name.
    identity_as_user_name("", "edge-01");
}

#[test]
fn a_subject_alternative_name_can_be_the_identity() {
    identity_as_user_name("identity_from = \"san\"", "edge-01.plant.example");
}

/// With `use_identity_as_username` (and `extra` listener keys) the
/// client certificate's `name` is the user the ACL grants `edge/%u/#`.
fn identity_as_user_name(extra: &str, name: &str) {
    let pki = Pki::generate();
    let acl = pki.dir.path().join("acl.toml");
    std::fs::write(
        &acl,
        format!(
            "[[rule]]\nuser = {name:?}\npublish = [\"edge/%u/#\"]\nsubscribe = [\"edge/#\", \
             \"other/#\"]\n"
        ),
    )
    .unwrap();
    let broker = tls_broker(
        &pki,
        &format!(
            "client_ca = {:?}\nuse_identity_as_username = true\n{extra}",
            pki.ca.display().to_string()
        ),
        &format!("[auth]\nacl_file = {:?}", acl.display().to_string()),
    );
    let port = broker.addr.port().to_string();
    let cert = pki.client_cert.display().to_string();
    let key = pki.client_key.display().to_string();
    let client = ["--cert", cert.as_str(), "--key", key.as_str()];
    let mut sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "--cafile"])
        .arg(&pki.ca)
        .args(client)
        .args(["-t", "edge/#", "-t", "other/#", "-v", "-C", "1", "-W", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pub_to = |topic: &str| {
        let args: Vec<&str> = client
            .iter()
            .copied()
            .chain(["-t", topic, "-m", "m", "-q", "1"])
            .collect();
        assert!(publish(&broker, &pki.ca, &args), "{topic}");
    };
    // A denied and an allowed publish, again until the subscriber (which
    // connects meanwhile) has one message.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while sub.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the subscriber got nothing"
        );
        pub_to(&format!("other/{name}/x"));
        pub_to(&format!("edge/{name}/ok"));
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = sub.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("edge/{name}/ok m"),
        "only the publish the ACL grants to user {name} arrives"
    );
}

/// A self-signed certificate for 127.0.0.1 that expired in 2021, and its
/// key, as PEM.
fn expired_certificate() -> (String, String) {
    use rcgen::{CertificateParams, KeyPair};
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[test]
fn an_expired_certificate_is_refused_at_start_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = expired_certificate();
    let (cert_path, key_path) = (dir.path().join("old.pem"), dir.path().join("old.key"));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    let config = dir.path().join("ferrymq.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[[listener]]\nbind = \"127.0.0.1:0\"\nprotocol = \"tls\"\n\
             cert = {:?}\nkey = {:?}\n",
            dir.path().join("data").display().to_string(),
            cert_path.display().to_string(),
            key_path.display().to_string()
        ),
    )
    .unwrap();
    let out = Command::new(binary())
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("listener[0].cert: the certificate in") && err.contains("not now"),
        "{err}"
    );
}

/// The README's site config (LAN listener with TLS, password file, ACL):
/// `check-config` accepts it as written (its files made here), and a
/// broker starts on it (loopback ports instead of its own) and serves a
/// user over TLS.
#[test]
fn the_readme_site_config_checks_and_starts() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("## A site: TLS, users and an ACL")
        .nth(1)
        .expect("the README's site section");
    let toml = section
        .split("```toml\n")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("its TOML block");
    let pki = Pki::generate();
    let etc = pki.dir.path();
    // (The PKI's own files are etc/server.pem and etc/server.key.)
    assert_eq!(pki.server_cert, etc.join("server.pem"));
    assert_eq!(pki.server_key, etc.join("server.key"));
    add_user(&etc.join("passwd"), "sensor-gw", "gw-secret");
    std::fs::write(
        etc.join("acl.toml"),
        "[[rule]]\nuser = \"sensor-gw\"\npublish = [\"sensors/#\"]\nsubscribe = [\"cmd/#\"]\n",
    )
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let config = toml
        .replace("/etc/ferrymq/", &format!("{}/", etc.display()))
        .replace(
            "/var/lib/ferrymq",
            &data.path().join("data").display().to_string(),
        );
    let file = etc.join("ferrymq.toml");
    std::fs::write(&file, &config).unwrap();
    let check = Command::new(binary())
        .args(["check-config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    // Started on free loopback ports.
    let (tcp, tls, wss) = (
        "bind = \"127.0.0.1:1883\"",
        "bind = \"0.0.0.0:8883\"\nprotocol = \"tls\"",
        "bind = \"0.0.0.0:8884\"",
    );
    assert!(
        config.contains(tcp) && config.contains(tls) && config.contains(wss),
        "{config}"
    );
    let local = config
        .replace(tcp, "bind = \"127.0.0.1:0\"")
        .replace(tls, "bind = \"127.0.0.1:0\"\nprotocol = \"tls\"")
        .replace(wss, "bind = \"127.0.0.1:0\"");
    let dir = tempfile::tempdir().unwrap();
    let started = dir.path().join("site.toml");
    std::fs::write(&started, local).unwrap();
    let mut broker = Broker::start_with_file(&started, dir);
    // Both listeners log their address; the TLS one says so.
    broker.wait_for_log(" (tls)", WAIT);
    broker.wait_for_log(" (wss, path /mqtt)", WAIT);
    let log = broker.log();
    let tls_addr = log
        .lines()
        .find(|l| l.ends_with(" (tls)"))
        .and_then(|l| l.split("listening on ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the TLS listener's address");
    broker.addr = tls_addr.parse().unwrap();
    let user = [
        "-u",
        "sensor-gw",
        "-P",
        "gw-secret",
        "-t",
        "sensors/a",
        "-m",
        "1",
        "-q",
        "1",
    ];
    assert!(publish(&broker, &pki.ca, &user), "a user over TLS");
    let wrong = [
        "-u",
        "sensor-gw",
        "-P",
        "nope",
        "-t",
        "sensors/a",
        "-m",
        "1",
    ];
    assert!(!publish(&broker, &pki.ca, &wrong));
}

#[test]
fn a_reload_serves_a_new_certificate_to_new_connections_and_keeps_the_old_ones() {
    let old = Pki::generate();
    let broker = tls_broker(&old, "", "");
    let port = broker.addr.port().to_string();
    // A subscriber connected with the old CA before the reload.
    let sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "-i", "kept", "-q", "1"])
        .args(["-t", "reload/t", "-C", "1", "-W", "30"])
        .arg("--cafile")
        .arg(&old.ca)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    broker.wait_for_log("client_id=kept", WAIT);

    // The files at the same paths now hold a certificate of another CA.
    let new = Pki::generate();
    std::fs::copy(&new.server_cert, &old.server_cert).unwrap();
    std::fs::copy(&new.server_key, &old.server_key).unwrap();
    broker.reload(1);
    assert!(broker.log().contains("reload: listener[0] replaced"));
    let msg = ["-t", "reload/t", "-m", "after", "-q", "1", "-r"];
    assert!(
        !publish(&broker, &old.ca, &msg),
        "the old CA no longer fits"
    );
    assert!(publish(&broker, &new.ca, &msg), "the new CA does");
    // The subscriber's connection was never dropped (with only the old CA
    // it could not have connected again).
    let out = sub.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "after");

    // An expired certificate is refused; the one in force stays.
    let (cert, key) = expired_certificate();
    std::fs::write(&old.server_cert, cert).unwrap();
    std::fs::write(&old.server_key, key).unwrap();
    broker.reload(1);
    let log = broker.log();
    assert!(
        log.contains("listener[0].cert: the certificate in")
            && log.contains("the previous listener[0] stays in force"),
        "{log}"
    );
    assert!(publish(&broker, &new.ca, &msg));
}
