//! The command-line contract: `ferrymq` on embedded defaults,
//! `--config FILE`, `check-config FILE`, `print-default-config`, and bad
//! configuration refused before anything starts.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use ferrymq_codec::{Packet, Protocol};

fn ferrymq(args: &[&str], cwd: &std::path::Path) -> Output {
    Command::new(binary())
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn print_default_config_prints_a_file_that_validates() {
    let dir = tempfile::tempdir().unwrap();
    let out = ferrymq(&["print-default-config"], dir.path());
    assert!(out.status.success());
    let file = dir.path().join("default.toml");
    std::fs::write(&file, &out.stdout).unwrap();
    assert!(text(&out.stdout).contains("[limits]"));
    let check = ferrymq(&["check-config", file.to_str().unwrap()], dir.path());
    assert!(check.status.success(), "{}", text(&check.stderr));
    assert!(text(&check.stdout).contains("ok"));
}

#[test]
fn check_config_prints_every_problem_with_its_key_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[limits]\nreceive_maximum = 0\nmax_conections = 5\n[[listener]]\nbind = \"nowhere\"\n",
    )
    .unwrap();
    let out = ferrymq(&["check-config", file.to_str().unwrap()], dir.path());
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    for key in [
        "limits.receive_maximum",
        "limits.max_conections",
        "listener[0].bind",
    ] {
        assert!(stderr.contains(key), "{key} missing from:\n{stderr}");
    }
    assert!(
        stderr.contains("did you mean `max_connections`"),
        "{stderr}"
    );
}

#[test]
fn a_bad_config_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        &file,
        format!("data_dir = \"d\"\n[[listener]]\nbind = \"127.0.0.1:{port}\"\n[limits]\nmax_packet_size = \"1 furlong\"\n"),
    )
    .unwrap();
    let out = ferrymq(&["--config", file.to_str().unwrap()], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("limits.max_packet_size"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        !dir.path().join("d").exists(),
        "the data dir was created by a refused config"
    );
}

#[test]
fn anonymous_access_on_a_non_loopback_listener_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("open.toml");
    std::fs::write(&file, "[[listener]]\nbind = \"0.0.0.0:1883\"\n").unwrap();
    let out = ferrymq(&["check-config", file.to_str().unwrap()], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("auth.allow_anonymous"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn runs_on_embedded_defaults() {
    if TcpListener::bind("127.0.0.1:1883").is_err() {
        panic!(
            "127.0.0.1:1883 is taken on this machine; this test runs `ferrymq` with its defaults, which listen there"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(binary())
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut raw = loop {
        if let Ok(stream) = std::net::TcpStream::connect("127.0.0.1:1883") {
            drop(stream);
            break Raw::connect(
                "127.0.0.1:1883".parse().unwrap(),
                Protocol::V311,
                "defaults",
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ferrymq never listened on 1883"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    raw.send(&Packet::PingReq);
    assert_eq!(raw.recv(), Some(Packet::PingResp));
    assert!(
        dir.path().join("ferrymq-data").is_dir(),
        "default data dir not created"
    );
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn two_brokers_cannot_share_a_data_dir() {
    let first = Broker::start("");
    let config = first.dir.path().join("second.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[[listener]]\nbind = \"127.0.0.1:0\"\n",
            first.data_dir()
        ),
    )
    .unwrap();
    let out = ferrymq(&["--config", config.to_str().unwrap()], first.dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("in use by another ferrymq"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_taken_port_names_the_listener_key() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"d\"\n[[listener]]\nbind = \"127.0.0.1:0\"\n[[listener]]\nbind = \"{}\"\n",
            taken.local_addr().unwrap()
        ),
    )
    .unwrap();
    let out = ferrymq(&["--config", config.to_str().unwrap()], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("listener[1].bind"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn the_packaged_config_checks_ok() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = ferrymq(&["check-config", "packaging/ferrymq.toml"], root);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn the_systemd_unit_verifies() {
    let Ok(version) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("SKIPPED: no systemd-analyze on this machine");
        return;
    };
    assert!(version.status.success());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("packaging/ferrymq.service")).unwrap();
    // The unit as installed, with the binary where this build put it.
    let unit = unit.replace("/usr/bin/ferrymq", binary());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ferrymq.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let complaints: Vec<String> = text(&out.stderr)
        .lines()
        .chain(text(&out.stdout).lines())
        .filter(|l| l.contains("ferrymq.service"))
        .map(str::to_owned)
        .collect();
    assert!(
        out.status.success() && complaints.is_empty(),
        "{complaints:#?}"
    );
}

#[test]
fn the_log_can_be_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ferrymq.toml");
    std::fs::write(
        &file,
        "data_dir = \"data\"\n[[listener]]\nbind = \"127.0.0.1:0\"\n\
         [log]\nformat = \"json\"\nlevel = \"info\"\n",
    )
    .unwrap();
    let mut child = Command::new(binary())
        .args(["--config", file.to_str().unwrap()])
        .current_dir(dir.path())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = Vec::new();
    for line in std::io::BufRead::lines(stderr) {
        let line = line.unwrap();
        let listening = line.contains("listening on");
        seen.push(line);
        if listening {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen.last().is_some_and(|l| l.contains("listening on")),
        "{seen:#?}"
    );
    for line in &seen {
        assert!(
            line.starts_with('{') && line.ends_with('}') && line.contains(r#""level":"INFO""#),
            "not a JSON log line: {line}"
        );
    }
}

#[test]
fn reload_checks_the_config_then_signals_the_running_node() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ferrymq.toml");
    let data = dir.path().join("data");
    let good = |extra: &str| {
        format!(
            "data_dir = {:?}\n[[listener]]\nbind = \"127.0.0.1:0\"\n{extra}",
            data.display().to_string()
        )
    };
    std::fs::write(&file, good("[log]\nlevel = \"info\"\n")).unwrap();
    // RUST_LOG would decide the level; without it, [log] does.
    let node = Broker::start_under(
        &["env", "-u", "RUST_LOG"],
        &file,
        tempfile::tempdir().unwrap(),
    );
    let reload = |args: &[&str]| {
        Command::new(binary())
            .args(["--config", file.to_str().unwrap(), "reload"])
            .args(args)
            .output()
            .unwrap()
    };
    // A broken file is refused before anything is signalled.
    std::fs::write(&file, good("[limits]\nmax_connections = \"x\"\n")).unwrap();
    let out = reload(&[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("limits.max_connections"));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!node.log().contains("SIGHUP received"));
    // A plain SIGHUP with that file: refused by the node, which goes on.
    let kill = Command::new("kill")
        .args(["-HUP", &node.pid().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    node.wait_for_log("reload: the running config stays", Duration::from_secs(10));
    assert!(node.log().contains("reload refused"));
    let _ = Raw::connect(node.addr, Protocol::V5, "still-serving");
    // A good one: the log level changes now; what needs a restart is said.
    std::fs::write(
        &file,
        good("[log]\nlevel = \"debug\"\n[limits]\nmax_connections = 5\n"),
    )
    .unwrap();
    let out = reload(&[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("pid {}", node.pid())));
    node.wait_for_log("reload: log.level replaced", Duration::from_secs(10));
    node.wait_for_log("reload: limits replaced", Duration::from_secs(10));
    // No node: said so.
    node.kill();
    let out = reload(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no running ferrymq holds"));
}

#[test]
fn a_connection_s_log_lines_carry_its_span_with_peer_and_client_id() {
    let broker = Broker::start("");
    let mut client = Raw::connect(broker.addr, Protocol::V5, "spanned");
    client.send(&Packet::PingReq);
    assert_eq!(client.recv(), Some(Packet::PingResp));
    drop(client);
    broker.wait_for_log("closing: Eof", Duration::from_secs(10));
    let log = broker.log();
    let line = log
        .lines()
        .find(|l| l.contains("closing: Eof"))
        .unwrap_or_default();
    assert!(
        line.contains("connection{peer=127.0.0.1:") && line.contains("client_id=spanned}"),
        "{log}"
    );
}
