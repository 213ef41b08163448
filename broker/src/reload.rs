//! Reload (SIGHUP, or [`crate::Broker::reload`]): the password file, the
//! ACL file and every TLS listener's certificate, key and client CA are
//! read again and put in force for what starts from then on, without
//! dropping a connection. Each part on its own: one that cannot be read or
//! parsed is refused, logged with its key, and the one in force stays.
//!
//! - Users: the next login checks the new file; remembered logins go with
//!   the old one ([`crate::users::Users::replace`]).
//! - ACL: a connected client's rules are rebuilt from the new file before
//!   its next PUBLISH or SUBSCRIBE ([`crate::acl::ClientAccess`]);
//!   subscriptions made before stay.
//! - TLS: new connections handshake with the new certificate; established
//!   ones keep their session.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{error, info};

use crate::Shared;

/// A value a reload may replace, with a generation that tells holders of
/// something derived from it that it changed.
pub(crate) struct Reloadable<T> {
    current: parking_lot::RwLock<Arc<T>>,
    generation: AtomicU64,
}

impl<T: PartialEq> Reloadable<T> {
    pub(crate) fn new(value: T) -> Self {
        Reloadable {
            current: parking_lot::RwLock::new(Arc::new(value)),
            generation: AtomicU64::new(0),
        }
    }

    /// The value in force.
    pub(crate) fn get(&self) -> Arc<T> {
        self.current.read().clone()
    }

    /// Counts the replacements so far. Read it before [`Reloadable::get`]:
    /// the value is then at least as new as the generation.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Puts `value` in force if it differs from the value in force;
    /// whether it did.
    pub(crate) fn replace(&self, value: T) -> bool {
        let mut current = self.current.write();
        if **current == value {
            return false;
        }
        *current = Arc::new(value);
        self.generation.fetch_add(1, Ordering::Release);
        true
    }
}

/// What a reload did with one part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// Read again; the same as what was in force.
    Unchanged,
    /// Read again and put in force.
    Replaced,
    /// Refused (the reason); what was in force stays.
    Refused(String),
}

/// What a reload did, part by part: `auth.password_file`,
/// `auth.acl_file`, `listener[i]` for each TLS listener (only the parts
/// the config has).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reload {
    /// Each part's key and outcome, in config order.
    pub parts: Vec<(String, ReloadOutcome)>,
}

impl Reload {
    /// Whether every part was read (none refused).
    pub fn is_ok(&self) -> bool {
        self.parts
            .iter()
            .all(|(_, o)| !matches!(o, ReloadOutcome::Refused(_)))
    }

    /// The outcome of the part at `key`.
    pub fn outcome(&self, key: &str) -> Option<&ReloadOutcome> {
        self.parts.iter().find(|(k, _)| k == key).map(|(_, o)| o)
    }

    fn record(&mut self, key: String, outcome: ReloadOutcome) {
        match &outcome {
            ReloadOutcome::Unchanged => info!("reload: {key} unchanged"),
            ReloadOutcome::Replaced => info!("reload: {key} replaced"),
            ReloadOutcome::Refused(why) => {
                error!("reload: {why}; the previous {key} stays in force");
            }
        }
        self.parts.push((key, outcome));
    }
}

fn changed(replaced: bool) -> ReloadOutcome {
    if replaced {
        ReloadOutcome::Replaced
    } else {
        ReloadOutcome::Unchanged
    }
}

/// Reads every reloadable file again and puts what changed in force.
pub(crate) fn reload(shared: &Shared) -> Reload {
    let mut report = Reload::default();
    let auth = &shared.config.auth;
    if let (Some(users), Some(path)) = (&shared.users, &auth.password_file) {
        let key = "auth.password_file".to_owned();
        let outcome = match crate::users::PasswordFile::load(path, false) {
            Ok(file) => changed(users.replace(file)),
            Err(e) => ReloadOutcome::Refused(format!("{key}: {}: {e}", path.display())),
        };
        report.record(key, outcome);
    }
    if let (Some(acl), Some(path)) = (&shared.acl, &auth.acl_file) {
        let key = "auth.acl_file".to_owned();
        let outcome = match ferrymq_config::acl::Acl::from_file(path, &key) {
            Ok(rules) => changed(acl.replace(rules)),
            Err(errors) => ReloadOutcome::Refused(
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
        };
        report.record(key, outcome);
    }
    for (index, listener) in shared.config.listeners.iter().enumerate() {
        let Some(tls) = &listener.tls else { continue };
        let outcome = match crate::server::Tls::build(index, tls) {
            Ok(new) => {
                let mut all = shared.tls.write();
                let same = all[index]
                    .as_ref()
                    .is_some_and(|old| old.fingerprint == new.fingerprint);
                if same {
                    ReloadOutcome::Unchanged
                } else {
                    all[index] = Some(new);
                    ReloadOutcome::Replaced
                }
            }
            Err(e) => ReloadOutcome::Refused(e.to_string()),
        };
        report.record(format!("listener[{index}]"), outcome);
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replacement_counts_only_when_the_value_changes() {
        let r = Reloadable::new(vec![1]);
        assert_eq!(r.generation(), 0);
        assert!(!r.replace(vec![1]));
        assert_eq!(r.generation(), 0);
        assert!(r.replace(vec![2]));
        assert_eq!((r.generation(), r.get().as_slice()), (1, &[2][..]));
    }

    #[test]
    fn a_report_is_ok_unless_a_part_was_refused() {
        let mut report = Reload::default();
        report.record("a".into(), ReloadOutcome::Replaced);
        report.record("b".into(), ReloadOutcome::Unchanged);
        assert!(report.is_ok());
        report.record("c".into(), ReloadOutcome::Refused("c: bad".into()));
        assert!(!report.is_ok());
        assert_eq!(report.outcome("b"), Some(&ReloadOutcome::Unchanged));
        assert_eq!(report.outcome("d"), None);
    }
}
