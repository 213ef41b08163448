//! Starts a private Mosquitto broker (the Debian package's
//! `/usr/sbin/mosquitto`) on a free loopback port with a generated config,
//! and kills it on drop. It never touches the system service or port 1883.
//!
//! ```ignore
//! let broker = Mosquitto::start("max_inflight_messages 3");
//! let addr = broker.addr();
//! ```

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long Mosquitto gets to open its port.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A running Mosquitto, killed (SIGKILL) on drop; its log is printed when
/// the test panicked.
pub struct Mosquitto {
    child: Child,
    port: u16,
    /// Holds the config and the log; removed on drop.
    dir: tempfile::TempDir,
}

/// The broker binary: `$MOSQUITTO`, else `/usr/sbin/mosquitto`, else
/// `mosquitto` on the PATH.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("MOSQUITTO") {
        return path.into();
    }
    let debian = Path::new("/usr/sbin/mosquitto");
    if debian.exists() {
        return debian.into();
    }
    "mosquitto".into()
}

impl Mosquitto {
    /// Anonymous access on a loopback listener, then `extra` config lines.
    /// Lines in `extra` come right after the `listener` line, so listener
    /// options (`cafile`, `require_certificate`, `max_qos`...) apply to it,
    /// and `allow_anonymous false` there overrides the default.
    pub fn start(extra: &str) -> Mosquitto {
        Self::start_in(tempfile::tempdir().expect("temp dir"), extra)
    }

    /// [`Mosquitto::start`] with the config and log in `dir` (which may
    /// already hold files the config names, e.g. a password file).
    pub fn start_in(dir: tempfile::TempDir, extra: &str) -> Mosquitto {
        let config_path = dir.path().join("mosquitto.conf");
        let log_path = dir.path().join("mosquitto.log");
        let mut log = String::new();
        // The port is free when we look, but another process may take it
        // before Mosquitto binds: then try another one.
        for _ in 0..5 {
            let port = free_port();
            std::fs::write(&config_path, Self::config(port, extra, dir.path()))
                .expect("write mosquitto.conf");
            let _ = std::fs::remove_file(&log_path);
            let mut child = spawn(&config_path);
            match wait_until_listening(&mut child, port, &log_path) {
                Ok(()) => return Mosquitto { child, port, dir },
                Err(why) => log = why,
            }
            let _ = child.kill();
            let _ = child.wait();
            if !log.contains("Address already in use") {
                break;
            }
        }
        panic!("mosquitto did not start; log:\n{log}");
    }

    /// The generated config: a loopback listener on `port`, anonymous
    /// access, no persistence, everything logged to `dir/mosquitto.log`.
    pub fn config(port: u16, extra: &str, dir: &Path) -> String {
        format!(
            "listener {port} 127.0.0.1\n\
             # Mosquitto takes the last value: `extra` may say false.\n\
             allow_anonymous true\n\
             {extra}\n\
             # Run as root (CI containers), Mosquitto would switch to the `mosquitto`\n\
             # user and could not read this private temp dir; `root` keeps it.\n\
             # As a non-root user this line has no effect.\n\
             user root\n\
             persistence false\n\
             log_dest file {log}\n\
             log_type all\n\
             log_timestamp_format %H:%M:%S\n",
            log = dir.join("mosquitto.log").display(),
        )
    }

    /// The listener's address (127.0.0.1).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The listener's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory with the config and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything Mosquitto logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// Starts it again (after [`Mosquitto::kill`]) on the same port with
    /// the same config.
    pub fn restart(&mut self) {
        self.kill();
        let config_path = self.dir.path().join("mosquitto.conf");
        let log_path = self.dir.path().join("mosquitto.log");
        self.child = spawn(&config_path);
        if let Err(why) = wait_until_listening(&mut self.child, self.port, &log_path) {
            panic!("mosquitto did not restart: {why}");
        }
    }

    /// SIGKILLs the broker (connections drop without DISCONNECT).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- mosquitto log (port {}) ---\n{}", self.port, self.log());
        }
    }
}

/// Waits until the broker accepts connections on `port`; on failure
/// returns why, with its log.
fn wait_until_listening(child: &mut Child, port: u16, log: &Path) -> Result<(), String> {
    let log = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited with {status}\n{}", log()));
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(format!("no listener after {START_TIMEOUT:?}\n{}", log()))
}

/// A loopback port nobody listens on right now.
/// Starts Mosquitto on `config`, quiet (it logs to its own file).
fn spawn(config: &Path) -> Child {
    Command::new(binary())
        .arg("-c")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}); install Debian's mosquitto \
                 (scripts/install-test-deps.sh)",
                binary().display()
            )
        })
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Writes a Mosquitto password file with one user (runs `mosquitto_passwd`).
pub fn password_file(path: &Path, user: &str, password: &str) {
    let status = Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(path)
        .args([user, password])
        .stdout(Stdio::null())
        .status()
        .expect("run mosquitto_passwd (Debian package mosquitto)");
    assert!(status.success(), "mosquitto_passwd failed: {status}");
}
