//! Users: the password file (`[auth] password_file`), checked at CONNECT.
//!
//! The file has one `user:hash` line per user, as `ferrymq passwd` writes
//! it, the hash an argon2id PHC string (`$argon2id$v=19$m=...`): never a
//! password. Blank lines and lines starting with `#` are ignored.
//!
//! Verification reveals nothing about who exists: an unknown user is
//! verified against a hash of the same cost. Failures are slowed per
//! source address ([`failure_delay`]): a growing delay before each new
//! attempt, so guessing from one address costs time, not our CPU. A slow
//! hash must not turn a power-cut reconnect storm into minutes of refused
//! sensors, so successful logins are remembered in a bounded cache keyed
//! by a keyed hash of user and password (never the password itself), and
//! at most one verification per core runs at a time, off the async
//! workers.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHasher, PasswordVerifier, phc::PasswordHash};
use argon2::{Algorithm, Argon2, Params, Version};
use parking_lot::Mutex;
use tokio::sync::Semaphore;

/// Argon2id memory cost, KiB (19 MiB), as OWASP recommends; with
/// [`T_COST`] one verification takes about 30 ms on the 2-core
/// development VM (README, "Users").
const M_COST_KIB: u32 = 19 * 1024;
/// Argon2id passes.
const T_COST: u32 = 2;

/// Successful logins remembered.
const CACHE_ENTRIES: usize = 100_000;
/// Source addresses whose failures are tracked at once.
const FAILURE_ADDRESSES: usize = 65_536;
/// Failures are forgotten after this long without another.
const FAILURE_MEMORY: Duration = Duration::from_secs(600);

/// Why a password file or a user name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsersError {
    /// A line of the file is not `user:$argon2id$...`.
    #[error("line {line}: {why}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        why: String,
    },
    /// The file could not be read or written.
    #[error("{0}")]
    Io(String),
    /// A user name that cannot be in the file.
    #[error("user name {0:?}: {1}")]
    BadName(String, &'static str),
    /// The user is not in the file.
    #[error("no user {0:?}")]
    NoSuchUser(String),
}

/// The hasher, at our parameters.
fn argon2() -> Argon2<'static> {
    // The parameters are constants within argon2's ranges.
    let params = Params::new(M_COST_KIB, T_COST, 1, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// An argon2id PHC string of `password` with a fresh random salt.
pub fn hash_password(password: &str) -> Result<String, UsersError> {
    argon2()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| UsersError::Io(format!("cannot hash: {e}")))
}

/// Whether `password` matches the PHC string `hash` (its own parameters
/// apply).
fn verify_hash(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| {
        argon2()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

/// Checks a user name: what a `user:hash` line can hold.
pub fn check_name(name: &str) -> Result<(), UsersError> {
    let bad = |why| Err(UsersError::BadName(name.to_owned(), why));
    if name.is_empty() {
        return bad("must not be empty");
    }
    if name.contains(':') {
        return bad("must not contain ':'");
    }
    if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return bad("must not contain spaces or control characters");
    }
    if name.len() > usize::from(u16::MAX) {
        return bad("is longer than an MQTT string");
    }
    Ok(())
}

/// The users of a password file, by name, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PasswordFile {
    users: Vec<(String, String)>,
}

impl PasswordFile {
    /// Parses a password file's text.
    pub fn parse(text: &str) -> Result<PasswordFile, UsersError> {
        let mut users: Vec<(String, String)> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |why: String| UsersError::Line { line: i + 1, why };
            let Some((name, hash)) = line.split_once(':') else {
                return Err(err("expected user:hash".into()));
            };
            check_name(name).map_err(|e| err(e.to_string()))?;
            if !hash.starts_with("$argon2id$") || PasswordHash::new(hash).is_err() {
                return Err(err(format!(
                    "the hash of {name:?} is not an argon2id PHC string ($argon2id$...); \
                     write users with `ferrymq passwd`"
                )));
            }
            if users.iter().any(|(n, _)| n == name) {
                return Err(err(format!("user {name:?} appears twice")));
            }
            users.push((name.to_owned(), hash.to_owned()));
        }
        Ok(PasswordFile { users })
    }

    /// Reads and parses `path`; a missing file is an empty one only when
    /// `missing_ok` (for `ferrymq passwd` creating it).
    pub fn load(path: &Path, missing_ok: bool) -> Result<PasswordFile, UsersError> {
        match std::fs::read_to_string(path) {
            Ok(text) => PasswordFile::parse(&text),
            Err(e) if missing_ok && e.kind() == std::io::ErrorKind::NotFound => {
                Ok(PasswordFile::default())
            }
            Err(e) => Err(UsersError::Io(format!(
                "cannot read {}: {e}",
                path.display()
            ))),
        }
    }

    /// Adds `name` or changes its password.
    pub fn set(&mut self, name: &str, password: &str) -> Result<(), UsersError> {
        check_name(name)?;
        let hash = hash_password(password)?;
        match self.users.iter_mut().find(|(n, _)| n == name) {
            Some(entry) => entry.1 = hash,
            None => self.users.push((name.to_owned(), hash)),
        }
        Ok(())
    }

    /// Removes `name`.
    pub fn remove(&mut self, name: &str) -> Result<(), UsersError> {
        let before = self.users.len();
        self.users.retain(|(n, _)| n != name);
        if self.users.len() == before {
            return Err(UsersError::NoSuchUser(name.to_owned()));
        }
        Ok(())
    }

    /// Whether `name` exists with `password`.
    pub fn check(&self, name: &str, password: &str) -> bool {
        self.hash_of(name)
            .is_some_and(|hash| verify_hash(hash, password))
    }

    fn hash_of(&self, name: &str) -> Option<&str> {
        self.users
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, h)| h.as_str())
    }

    /// The number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether there is no user.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The file's text.
    pub fn to_text(&self) -> String {
        let mut text = String::new();
        for (name, hash) in &self.users {
            let _ = writeln!(text, "{name}:{hash}");
        }
        text
    }

    /// Writes the file atomically (a temporary file in the same directory,
    /// synced, renamed over it), readable by its owner only (0600).
    pub fn save(&self, path: &Path) -> Result<(), UsersError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let io =
            |e: std::io::Error| UsersError::Io(format!("cannot write {}: {e}", path.display()));
        let name = path
            .file_name()
            .ok_or_else(|| UsersError::Io(format!("{} is not a file name", path.display())))?;
        let mut tmp_name = name.to_os_string();
        tmp_name.push(".tmp");
        let tmp = path.with_file_name(tmp_name);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        file.write_all(self.to_text().as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(io)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // The rename itself is durable once the directory is.
            let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(())
    }
}

/// The delay before a new login attempt from an address that failed
/// `failures` times in a row: none for the first, then 100 ms doubling
/// to at most 10 s.
pub fn failure_delay(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let ms = 100u64.saturating_mul(1 << (failures - 1).min(10));
    Duration::from_millis(ms.min(10_000))
}

/// Failures of one source address.
struct Failures {
    count: u32,
    last: Instant,
}

/// The users a broker checks logins against, with the verification cache
/// and the per-address failure counts. A reload replaces the file
/// ([`Users::replace`]); logins under way finish with the one they began
/// with.
pub struct Users {
    file: parking_lot::RwLock<Arc<PasswordFile>>,
    /// Hash of no user's password: an unknown user costs the same work.
    decoy: String,
    /// Keys of the cache's hash: random per process.
    keys: (
        std::collections::hash_map::RandomState,
        std::collections::hash_map::RandomState,
    ),
    /// Recent successful logins (keyed hashes of user and password), and
    /// their order for eviction.
    cache: Mutex<(HashSet<u128>, VecDeque<u128>)>,
    /// Which file the cache holds logins of: bumped (with the cache lock
    /// held) when a reload replaces it, so a login verified against the
    /// old file is not remembered under the new one.
    generation: std::sync::atomic::AtomicU64,
    /// Failures per source address (bounded; forgotten after a while).
    failures: Mutex<HashMap<IpAddr, Failures>>,
    /// One verification per core at a time.
    verifiers: Arc<Semaphore>,
}

/// How a login went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Login {
    /// User and password match (verified now).
    Verified,
    /// User and password match (a recent verification remembered).
    Remembered,
    /// Unknown user or wrong password (not said which).
    Refused,
}

impl Users {
    /// Users of `file`.
    pub fn new(file: PasswordFile) -> Result<Users, UsersError> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(Users {
            file: parking_lot::RwLock::new(Arc::new(file)),
            decoy: hash_password("no user has this password: it only costs time")?,
            keys: Default::default(),
            cache: Mutex::default(),
            generation: std::sync::atomic::AtomicU64::new(0),
            failures: Mutex::default(),
            verifiers: Arc::new(Semaphore::new(cores)),
        })
    }

    /// Reads the password file at `path`.
    pub fn load(path: &Path) -> Result<Users, UsersError> {
        Users::new(PasswordFile::load(path, false)?)
    }

    /// Puts `file` in force for the logins that start from now on, when it
    /// differs from the one in force; returns whether it did. The cache of
    /// verified logins is dropped with the old file (a removed user or a
    /// changed password must not log in from memory); the failure counts
    /// per address stay.
    pub fn replace(&self, file: PasswordFile) -> bool {
        let mut current = self.file.write();
        if **current == file {
            return false;
        }
        *current = Arc::new(file);
        let mut cache = self.cache.lock();
        cache.0.clear();
        cache.1.clear();
        self.generation.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// How many users the file in force has.
    pub fn len(&self) -> usize {
        self.file.read().len()
    }

    /// Whether the file in force has no user.
    pub fn is_empty(&self) -> bool {
        self.file.read().is_empty()
    }

    fn cache_key(&self, name: &str, password: &[u8]) -> u128 {
        let one = |state: &std::collections::hash_map::RandomState| {
            let mut h = state.build_hasher();
            h.write(name.as_bytes());
            h.write_u8(0xff);
            h.write(password);
            h.finish()
        };
        (u128::from(one(&self.keys.0)) << 64) | u128::from(one(&self.keys.1))
    }

    /// Checks a login from `from` (`None`: in-process). Waits the delay
    /// that earlier failures from that address earned, then verifies off
    /// the async workers; counts the outcome.
    pub async fn login(&self, from: Option<IpAddr>, name: &str, password: &[u8]) -> Login {
        let (file, generation) = {
            let file = self.file.read();
            (file.clone(), self.generation.load(Ordering::Relaxed))
        };
        let key = self.cache_key(name, password);
        if self.cache.lock().0.contains(&key) {
            if let Some(ip) = from {
                self.failures.lock().remove(&ip);
            }
            return Login::Remembered;
        }
        let delay = from.map_or(Duration::ZERO, |ip| {
            let mut failures = self.failures.lock();
            match failures.get(&ip) {
                Some(f) if f.last.elapsed() > FAILURE_MEMORY => {
                    failures.remove(&ip);
                    Duration::ZERO
                }
                Some(f) => failure_delay(f.count),
                None => Duration::ZERO,
            }
        });
        tokio::time::sleep(delay).await;
        let hash = file.hash_of(name).unwrap_or(&self.decoy).to_owned();
        // A password that is not UTF-8 cannot match: verified against the
        // decoy all the same, for the same time.
        let (hash, password) = match std::str::from_utf8(password) {
            Ok(p) => (hash, p.to_owned()),
            Err(_) => (self.decoy.clone(), String::from("\u{0}")),
        };
        // (The decoy's password must not log in as an unknown user.)
        let known = file.hash_of(name).is_some();
        let ok = match self.verifiers.clone().acquire_owned().await {
            Ok(permit) => tokio::task::spawn_blocking(move || {
                let ok = verify_hash(&hash, &password);
                drop(permit);
                ok
            })
            .await
            .unwrap_or(false),
            Err(_) => false,
        } && known;
        if let Some(ip) = from {
            let mut failures = self.failures.lock();
            if ok {
                failures.remove(&ip);
            } else {
                if failures.len() >= FAILURE_ADDRESSES && !failures.contains_key(&ip) {
                    // Bounded: forget the stalest address.
                    if let Some(oldest) = failures
                        .iter()
                        .min_by_key(|(_, f)| f.last)
                        .map(|(ip, _)| *ip)
                    {
                        failures.remove(&oldest);
                    }
                }
                let entry = failures.entry(ip).or_insert(Failures {
                    count: 0,
                    last: Instant::now(),
                });
                entry.count = entry.count.saturating_add(1);
                entry.last = Instant::now();
            }
        }
        if !ok {
            return Login::Refused;
        }
        let mut cache = self.cache.lock();
        if self.generation.load(Ordering::Relaxed) == generation && cache.0.insert(key) {
            cache.1.push_back(key);
            if cache.1.len() > CACHE_ENTRIES
                && let Some(old) = cache.1.pop_front()
            {
                cache.0.remove(&old);
            }
        }
        Login::Verified
    }

    /// The failures counted for `ip` so far (tests, status).
    pub fn failures_from(&self, ip: IpAddr) -> u32 {
        self.failures.lock().get(&ip).map_or(0, |f| f.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_logins_wait_longer_and_longer_up_to_ten_seconds() {
        let cases = [
            (0, 0),
            (1, 100),
            (2, 200),
            (3, 400),
            (5, 1_600),
            (7, 6_400),
            (8, 10_000),
            (40, 10_000),
            (u32::MAX, 10_000),
        ];
        for (failures, ms) in cases {
            assert_eq!(
                failure_delay(failures),
                Duration::from_millis(ms),
                "{failures}"
            );
        }
    }

    #[test]
    fn a_password_file_round_trips_and_refuses_what_is_not_a_hash() {
        let mut file = PasswordFile::default();
        file.set("sensor-1", "s3cret").expect("set");
        file.set("gw", "other").expect("set");
        file.set("sensor-1", "changed").expect("change");
        let text = file.to_text();
        assert!(!text.contains("s3cret") && !text.contains("changed"));
        assert!(text.lines().all(|l| l.contains(":$argon2id$v=19$")));
        let back = PasswordFile::parse(&format!("# users\n\n{text}")).expect("parse");
        assert_eq!(back, file);
        assert!(back.check("sensor-1", "changed"));
        assert!(!back.check("sensor-1", "s3cret"));
        assert!(!back.check("nobody", "changed"));
        let mut back = back;
        back.remove("gw").expect("remove");
        assert_eq!(back.remove("gw"), Err(UsersError::NoSuchUser("gw".into())));
        for (text, why) in [
            ("alice", "expected user:hash"),
            ("alice:plaintext", "not an argon2id PHC string"),
            (":$argon2id$", "must not be empty"),
        ] {
            let err = PasswordFile::parse(text).expect_err(text).to_string();
            assert!(
                err.starts_with("line 1:") && err.contains(why),
                "{text}: {err}"
            );
        }
        let twice = format!("{text}{text}");
        assert!(PasswordFile::parse(&twice).is_err());
        for bad in ["", "a:b", "a b", "tab\t"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn unknown_users_and_wrong_passwords_are_refused_alike_and_counted() {
        let mut file = PasswordFile::default();
        file.set("gw", "right").expect("set");
        let users = Users::new(file).expect("users");
        let from = Some(IpAddr::from([10, 1, 2, 3]));
        assert_eq!(users.login(from, "gw", b"right").await, Login::Verified);
        assert_eq!(users.login(from, "gw", b"right").await, Login::Remembered);
        assert_eq!(users.login(from, "gw", b"wrong").await, Login::Refused);
        assert_eq!(users.login(from, "ghost", b"right").await, Login::Refused);
        assert_eq!(users.login(from, "gw", &[0xff, 0xfe]).await, Login::Refused);
        assert_eq!(users.failures_from(IpAddr::from([10, 1, 2, 3])), 3);
        // Another address is not slowed by these.
        assert_eq!(users.failures_from(IpAddr::from([10, 9, 9, 9])), 0);
        // A success resets the address.
        assert_eq!(users.login(from, "gw", b"right").await, Login::Remembered);
        assert_eq!(users.failures_from(IpAddr::from([10, 1, 2, 3])), 0);
    }

    #[tokio::test]
    async fn a_replaced_file_forgets_the_logins_it_remembered() {
        let mut file = PasswordFile::default();
        file.set("gw", "old").expect("set");
        let users = Users::new(file.clone()).expect("users");
        assert_eq!(users.login(None, "gw", b"old").await, Login::Verified);
        assert_eq!(users.login(None, "gw", b"old").await, Login::Remembered);
        // The same users again: nothing changes, the cache stays.
        assert!(!users.replace(file.clone()));
        assert_eq!(users.login(None, "gw", b"old").await, Login::Remembered);
        // A changed password: the old one no longer logs in, even from
        // memory; the new one does.
        file.set("gw", "new").expect("set");
        assert!(users.replace(file.clone()));
        assert_eq!(users.login(None, "gw", b"old").await, Login::Refused);
        assert_eq!(users.login(None, "gw", b"new").await, Login::Verified);
        // A removed user is gone at once.
        file.remove("gw").expect("remove");
        assert!(users.replace(file));
        assert_eq!(users.login(None, "gw", b"new").await, Login::Refused);
        assert!(users.is_empty());
    }
}
