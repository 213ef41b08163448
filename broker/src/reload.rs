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

use tokio::sync::Semaphore;
use tracing::{error, info, warn};

use ferrymq_config::Config;

use crate::Shared;

/// What a reload did with one part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// Read again; the same as what was in force.
    Unchanged,
    /// Read again and put in force.
    Replaced,
    /// Refused (the reason); what was in force stays.
    Refused(String),
    /// Taken out of service (a listener no longer configured).
    Removed,
    /// Changed in the file; the running value stays until the next start.
    NeedsRestart,
}

/// What a reload did, part by part: `config` (the file as a whole, when a
/// new config was given), each changed section or key, `auth.password_file`,
/// `auth.acl_file`, `listener[i]` for each listener (only the parts the
/// config has).
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
            ReloadOutcome::Removed => info!("reload: {key} removed"),
            ReloadOutcome::NeedsRestart => {
                warn!("reload: {key} changed; it takes effect at the next start");
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

/// A new config checked and prepared for [`apply`]: the parts that need
/// a restart already reset to their running values (and reported), and
/// which bridges it adds, changes or removes, so that their links can be
/// stopped before it is put in force.
#[derive(Debug)]
pub struct ReloadPlan {
    config: Config,
    report: Reload,
    /// Bridges added, or whose settings changed (their links must not run
    /// while the plan is applied; they are started after).
    pub changed_bridges: Vec<String>,
    /// Bridges no longer configured (their links must be stopped).
    pub removed_bridges: Vec<String>,
}

impl ReloadPlan {
    /// The config the plan puts in force.
    pub fn config(&self) -> &Config {
        &self.config
    }
}

/// Checks `new` against the config in force: refused as a whole (the
/// report says why) if it does not validate.
pub(crate) fn plan(shared: &Shared, mut new: Config) -> Result<ReloadPlan, Reload> {
    let mut report = Reload::default();
    if let Err(errors) = new.validate() {
        let why = errors
            .0
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        report.record("config".into(), ReloadOutcome::Refused(why));
        return Err(report);
    }
    let old = shared.config.load_full();
    keep_running(&old, &mut new, &mut report);
    crate::state::add_bridge_rules(&mut new);
    let changed_bridges = new
        .bridges
        .iter()
        .filter(|b| !old.bridges.contains(b))
        .map(|b| b.name.clone())
        .collect();
    let removed_bridges = old
        .bridges
        .iter()
        .filter(|b| !new.bridges.iter().any(|n| n.name == b.name))
        .map(|b| b.name.clone())
        .collect();
    Ok(ReloadPlan {
        config: new,
        report,
        changed_bridges,
        removed_bridges,
    })
}

/// Puts `plan` in force, part by part, then reads the files it names
/// again ([`reload`]). The sessions of the plan's changed bridges (whose
/// links the caller stopped) are set up again, and those of removed
/// bridges stop taking messages (their queues stay).
pub(crate) async fn apply(
    shared: &Arc<Shared>,
    connections: &Arc<Semaphore>,
    plan: ReloadPlan,
) -> Reload {
    let ReloadPlan {
        config: mut new,
        mut report,
        changed_bridges,
        removed_bridges: _,
    } = plan;
    let old = shared.config.load_full();
    apply_listeners(shared, connections, &old, &mut new, &mut report).await;
    if new.limits.max_connections != old.limits.max_connections {
        resize(
            connections,
            old.limits.max_connections,
            new.limits.max_connections,
        );
    }
    shared
        .dedup
        .lock()
        .raise_bound(usize::from(new.limits.receive_maximum));
    for (key, changed) in [
        ("limits", new.limits != old.limits),
        ("storage", new.storage != old.storage),
        ("ferry", new.ferry != old.ferry),
        ("auth", new.auth != old.auth),
        ("bridge", new.bridges != old.bridges),
        ("metrics", new.metrics != old.metrics),
        ("log.level", new.log.level != old.log.level),
    ] {
        if changed {
            report.record(key.into(), ReloadOutcome::Replaced);
        }
    }
    let bounds_changed = new.storage != old.storage || new.bridges != old.bridges;
    shared.config.store(Arc::new(new));
    if bounds_changed {
        set_queue_limits(shared);
    }
    crate::bridge_session::ensure(shared, |name| changed_bridges.iter().any(|n| n == name));
    crate::bridge_session::retire_removed(shared);
    report.parts.extend(reload(shared).parts);
    report
}

/// Keeps in `new` the running value of what only a start can change (the
/// store's settings, the node's identity, the state topics, which
/// authentication files exist), reporting each that the file changed.
fn keep_running(old: &Config, new: &mut Config, report: &mut Reload) {
    // Each field named once: its key in the report, its path in both.
    macro_rules! keep {
        ($key:literal, $($field:ident).+) => {
            if old.$($field).+ != new.$($field).+ {
                new.$($field).+ = old.$($field).+.clone();
                report.record($key.into(), ReloadOutcome::NeedsRestart);
            }
        };
    }
    keep!("node_id", node_id);
    keep!("data_dir", data_dir);
    keep!("storage.durability", storage.durability);
    keep!("storage.sync_interval_ms", storage.sync_interval);
    keep!("storage.max_disk_bytes", storage.max_disk_bytes);
    keep!(
        "storage.bridge_reserve_percent",
        storage.bridge_reserve_percent
    );
    keep!("state", state);
    keep!("log.format", log.format);
    if old.auth.password_file.is_some() != new.auth.password_file.is_some() {
        new.auth.password_file = old.auth.password_file.clone();
        report.record("auth.password_file".into(), ReloadOutcome::NeedsRestart);
    }
    if old.auth.acl_file.is_some() != new.auth.acl_file.is_some() {
        new.auth.acl_file = old.auth.acl_file.clone();
        report.record("auth.acl_file".into(), ReloadOutcome::NeedsRestart);
    }
}

/// Stops the listeners `new` no longer has (what they accepted stays
/// connected), then binds and starts those it adds; a listener whose
/// settings changed is stopped and started again. One that cannot be
/// bound is refused with its key and left out of the config in force.
async fn apply_listeners(
    shared: &Arc<Shared>,
    connections: &Arc<Semaphore>,
    old: &Config,
    new: &mut Config,
    report: &mut Reload,
) {
    let removed: Vec<crate::server::Running> = {
        let mut running = shared.listeners.lock();
        let (keep, removed) = std::mem::take(&mut *running)
            .into_iter()
            .partition(|r| new.listeners.contains(&r.config));
        *running = keep;
        removed
    };
    for listener in removed {
        let index = old.listeners.iter().position(|l| *l == listener.config);
        info!(addr = %listener.addr, "listener removed: no longer accepting there");
        listener.stop().await;
        report.record(
            format!("listener[{}]", index.unwrap_or_default()),
            ReloadOutcome::Removed,
        );
    }
    let mut started = Vec::new();
    let mut refused = Vec::new();
    for (index, config) in new.listeners.iter().enumerate() {
        let running = shared.listeners.lock().iter().any(|r| r.config == *config);
        if running {
            continue;
        }
        let key = format!("listener[{index}]");
        let tls = match config
            .tls
            .as_ref()
            .map(|tls| crate::server::Tls::build(index, tls))
        {
            Some(Err(e)) => {
                refused.push(index);
                report.record(key, ReloadOutcome::Refused(e.to_string()));
                continue;
            }
            Some(Ok(tls)) => Some(tls),
            None => None,
        };
        match crate::server::bind_one(index, config) {
            Ok(listener) => {
                started.push(crate::server::Running::start(
                    listener,
                    config.clone(),
                    tls,
                    shared.clone(),
                    connections.clone(),
                ));
                report.record(key, ReloadOutcome::Replaced);
            }
            Err(e) => {
                refused.push(index);
                report.record(key, ReloadOutcome::Refused(e.to_string()));
            }
        }
    }
    for index in refused.into_iter().rev() {
        new.listeners.remove(index);
    }
    let mut running = shared.listeners.lock();
    running.extend(started);
    // In the order of the config in force.
    running.sort_by_key(|r| new.listeners.iter().position(|l| *l == r.config));
}

/// Changes the number of connections allowed from `old` to `new`. Fewer:
/// what is free now goes at once, the rest as connections close (no
/// connection is dropped for it).
fn resize(connections: &Arc<Semaphore>, old: u32, new: u32) {
    if new > old {
        connections.add_permits((new - old) as usize);
        return;
    }
    let fewer = (old - new) as usize;
    let rest = fewer - connections.forget_permits(fewer);
    if rest > 0 {
        let connections = connections.clone();
        tokio::spawn(async move {
            if let Ok(permits) = connections.acquire_many_owned(rest as u32).await {
                permits.forget();
            }
        });
    }
}

/// Gives every session's queue the bounds and policies of the config in
/// force (a bridge's its own bounds).
fn set_queue_limits(shared: &Shared) {
    shared
        .queue_env
        .memory()
        .set_limit(shared.config().storage.max_queued_memory);
    let limits = shared.queue_limits();
    for (client_id, outbox, _) in shared.sessions.queues() {
        let (max_messages, max_bytes) = shared
            .session_bounds(client_id.as_str())
            .unwrap_or((limits.max_messages, limits.max_bytes));
        outbox.set_limits(crate::outbox::QueueLimits {
            max_messages,
            max_bytes,
            ..limits
        });
    }
}

/// Reads every reloadable file again and puts what changed in force.
pub(crate) fn reload(shared: &Shared) -> Reload {
    let mut report = Reload::default();
    let auth = &shared.config().auth;
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
    let listeners = shared.config().listeners.clone();
    for (index, listener) in listeners.iter().enumerate() {
        let Some(tls) = &listener.tls else { continue };
        let Some(slot) = shared
            .listeners
            .lock()
            .iter()
            .find(|r| r.config == *listener)
            .map(|r| r.tls.clone())
        else {
            continue;
        };
        let outcome = match crate::server::Tls::build(index, tls) {
            Ok(new) => {
                let mut current = slot.write();
                let same = current
                    .as_ref()
                    .is_some_and(|old| old.fingerprint == new.fingerprint);
                if same {
                    ReloadOutcome::Unchanged
                } else {
                    *current = Some(new);
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
