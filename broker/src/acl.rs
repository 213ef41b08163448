//! Access control: the rules of `[auth] acl_file`
//! ([`ferrymq_config::acl`]) evaluated for one client.
//!
//! At CONNECT the rules that apply to the client are picked and their
//! `%u` / `%c` filled in ([`Access::for_client`]); each PUBLISH (a will
//! and a retained message too) and each SUBSCRIBE filter is then checked
//! against that short list. A publish is allowed when a granted filter
//! matches its topic and no denied one does. A subscription is allowed
//! when a granted filter covers it (every topic it can match, the grant
//! matches too: `a/+` covers `a/b` and `a/+`, not `a/#`) and no denied
//! filter overlaps it (shares any topic with it), since a broad
//! subscription would otherwise receive what the deny hides. A user
//! selector matches only a user whose password was verified.

use ferrymq_codec::topic::matches;
use ferrymq_config::acl::{Acl, Selector};

use crate::reloadable::Reloadable;

/// A connected client's [`Access`], rebuilt from the rules in force when a
/// reload replaced them ([`ClientAccess::refresh`], before each PUBLISH
/// and SUBSCRIBE).
#[derive(Debug)]
pub(crate) struct ClientAccess {
    access: Access,
    /// The rules' generation `access` was built from.
    generation: u64,
    user: Option<Box<str>>,
    identity: Option<Box<str>>,
}

impl ClientAccess {
    /// The access of a client under the rules in force (see
    /// [`Access::for_client`]).
    pub(crate) fn new(
        rules: &Reloadable<Acl>,
        user: Option<&str>,
        client_id: &str,
        identity: Option<&str>,
    ) -> ClientAccess {
        let generation = rules.generation();
        ClientAccess {
            access: Access::for_client(&rules.get(), user, client_id, identity),
            generation,
            user: user.map(Box::from),
            identity: identity.map(Box::from),
        }
    }

    /// Rebuilds the access if the rules changed since it was built.
    pub(crate) fn refresh(&mut self, rules: &Reloadable<Acl>, client_id: &str) {
        let generation = rules.generation();
        if generation != self.generation {
            self.access = Access::for_client(
                &rules.get(),
                self.user.as_deref(),
                client_id,
                self.identity.as_deref(),
            );
            self.generation = generation;
        }
    }
}

impl std::ops::Deref for ClientAccess {
    type Target = Access;

    fn deref(&self) -> &Access {
        &self.access
    }
}

/// The rules that apply to one client, substituted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    publish: Vec<String>,
    subscribe: Vec<String>,
    deny_publish: Vec<String>,
    deny_subscribe: Vec<String>,
    /// A rule that applies says `trusted_bridge = true`.
    trusted_bridge: bool,
}

/// Fills `%u` and `%c` into `pattern`. `None` when the pattern names a
/// value the client lacks, or one that would smuggle a level separator or
/// a wildcard into the filter.
fn substitute(pattern: &str, user: Option<&str>, client_id: &str) -> Option<String> {
    let unsafe_value = |v: &str| v.is_empty() || v.contains(['/', '+', '#']);
    let mut out = pattern.to_owned();
    if out.contains("%u") {
        let user = user.filter(|u| !unsafe_value(u))?;
        out = out.replace("%u", user);
    }
    if out.contains("%c") {
        if unsafe_value(client_id) {
            return None;
        }
        out = out.replace("%c", client_id);
    }
    Some(out)
}

/// Whether a client id matches a `client_id` selector (`*`: any run of
/// characters, possibly empty).
pub(crate) fn id_matches(pattern: &str, id: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let (first, rest) = parts.split_first().unwrap_or((&"", &[]));
    let Some(mut tail) = id.strip_prefix(first) else {
        return false;
    };
    let Some((last, middle)) = rest.split_last() else {
        return tail.is_empty();
    };
    for part in middle {
        match tail.find(part) {
            Some(at) => tail = &tail[at + part.len()..],
            None => return false,
        }
    }
    tail.len() >= last.len() && tail.ends_with(last)
}

/// Whether every topic that `filter` matches, `pattern` matches too.
pub fn covers(pattern: &str, filter: &str) -> bool {
    let wild = |f: &str| f.starts_with('+') || f.starts_with('#');
    if filter.starts_with('$') && wild(pattern) {
        return false;
    }
    let mut p = pattern.split('/');
    let mut f = filter.split('/');
    loop {
        match (p.next(), f.next()) {
            (Some("#"), _) => return true,
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(pl), Some(fl)) if pl == fl => {}
            (Some(_), Some(_)) => return false,
            (None, None) => return true,
            // (`a/#` covering `a` itself is the first arm.)
            (None, Some(_)) | (Some(_), None) => return false,
        }
    }
}

/// Whether some topic matches both filters.
pub fn overlaps(a: &str, b: &str) -> bool {
    let wild = |f: &str| f.starts_with('+') || f.starts_with('#');
    if (wild(a) && b.starts_with('$')) || (wild(b) && a.starts_with('$')) {
        return false;
    }
    let mut x = a.split('/');
    let mut y = b.split('/');
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(l), Some(r)) if l == r => {}
            (Some(_), Some(_)) => return false,
            (None, None) => return true,
            // One is longer: only a trailing `#` (seen above) would match.
            (None, Some(_)) | (Some(_), None) => return false,
        }
    }
}

impl Access {
    /// The access of a client: `user` only when its password was
    /// verified, `identity` from its certificate.
    pub fn for_client(
        acl: &Acl,
        user: Option<&str>,
        client_id: &str,
        identity: Option<&str>,
    ) -> Access {
        let mut access = Access::default();
        for rule in &acl.rules {
            let applies = match &rule.selector {
                Selector::User(u) => user == Some(u.as_str()),
                Selector::ClientId(pattern) => id_matches(pattern, client_id),
                Selector::Identity(id) => identity == Some(id.as_str()),
                Selector::Anonymous => user.is_none(),
                Selector::Everyone => true,
            };
            if !applies {
                continue;
            }
            let grant = |list: &[String], into: &mut Vec<String>| {
                into.extend(list.iter().filter_map(|p| substitute(p, user, client_id)));
            };
            // A deny that cannot be filled in denies everything it could
            // have meant.
            let deny = |list: &[String], into: &mut Vec<String>| {
                into.extend(
                    list.iter()
                        .map(|p| substitute(p, user, client_id).unwrap_or_else(|| "#".into())),
                );
            };
            access.trusted_bridge |= rule.trusted_bridge;
            grant(&rule.publish, &mut access.publish);
            grant(&rule.subscribe, &mut access.subscribe);
            deny(&rule.deny_publish, &mut access.deny_publish);
            deny(&rule.deny_subscribe, &mut access.deny_subscribe);
        }
        access
    }

    /// Whether a rule trusts the client as a bridge of another ferrymq
    /// node (`trusted_bridge = true`).
    pub fn trusted_bridge(&self) -> bool {
        self.trusted_bridge
    }

    /// Whether the client may publish to `topic` (a will or a retained
    /// message included).
    pub fn may_publish(&self, topic: &str) -> bool {
        self.publish.iter().any(|f| matches(f, topic))
            && !self.deny_publish.iter().any(|f| matches(f, topic))
    }

    /// Whether the client may subscribe to the (valid, non-shared) `filter`.
    pub fn may_subscribe(&self, filter: &str) -> bool {
        self.subscribe.iter().any(|g| covers(g, filter))
            && !self.deny_subscribe.iter().any(|d| overlaps(d, filter))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cover_and_overlap() {
        let cases = [
            ("#", "a/b", true, true),
            ("#", "#", true, true),
            ("a/#", "a", true, true),
            ("a/#", "a/b/#", true, true),
            ("a/+", "a/b", true, true),
            ("a/+", "a/+", true, true),
            ("a/+", "a/#", false, true),
            ("a/+", "a/b/c", false, false),
            ("a/b", "a/+", false, true),
            ("a/b", "a/c", false, false),
            ("+/b", "a/+", false, true),
            ("#", "$SYS/x", false, false),
            ("+/x", "$SYS/x", false, false),
            ("$SYS/#", "$SYS/broker/load", true, true),
            ("a", "a/b", false, false),
            ("a/b/c", "a/#", false, true),
        ];
        for (pattern, filter, cover, overlap) in cases {
            assert_eq!(covers(pattern, filter), cover, "{pattern} covers {filter}");
            assert_eq!(
                overlaps(pattern, filter),
                overlap,
                "{pattern} overlaps {filter}"
            );
            assert_eq!(
                overlaps(filter, pattern),
                overlap,
                "{filter} overlaps {pattern}"
            );
        }
    }

    #[test]
    fn client_id_patterns() {
        for (pattern, id, ok) in [
            ("edge-*", "edge-01", true),
            ("edge-*", "edge-", true),
            ("edge-*", "xedge-01", false),
            ("*-gw", "plant-gw", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxcyyb", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("*", "", true),
        ] {
            assert_eq!(id_matches(pattern, id), ok, "{pattern} ~ {id}");
        }
    }

    fn acl(text: &str) -> Acl {
        Acl::from_toml_str(text).expect("acl")
    }

    #[test]
    fn grants_denies_and_substitutions() {
        let acl = acl(r##"
            [[rule]]
            user = "gw"
            publish = ["sensors/%c/#", "shared/%u"]
            subscribe = ["cmd/%c/#"]
            [[rule]]
            everyone = true
            subscribe = ["$SYS/broker/#", "public/#"]
            deny_subscribe = ["public/secret/#"]
            [[rule]]
            anonymous = true
            publish = ["anon/+"]
            deny_publish = ["anon/%c"]
        "##);
        let gw = Access::for_client(&acl, Some("gw"), "dev1", None);
        assert!(gw.may_publish("sensors/dev1/temp"));
        assert!(gw.may_publish("shared/gw"));
        assert!(!gw.may_publish("sensors/dev2/temp"));
        assert!(
            !gw.may_publish("anon/x"),
            "anonymous rules are not the user's"
        );
        assert!(gw.may_subscribe("cmd/dev1/#"));
        assert!(gw.may_subscribe("cmd/dev1/+"));
        assert!(!gw.may_subscribe("cmd/#"));
        assert!(gw.may_subscribe("$SYS/broker/load"));
        assert!(!gw.may_subscribe("$SYS/#"));
        assert!(gw.may_subscribe("public/news"));
        assert!(
            !gw.may_subscribe("public/#"),
            "overlaps the denied public/secret/#"
        );
        assert!(!gw.may_subscribe("#"));
        let anon = Access::for_client(&acl, None, "dev3", None);
        assert!(anon.may_publish("anon/other"));
        assert!(!anon.may_publish("anon/dev3"));
        assert!(!anon.may_publish("sensors/dev3/temp"));
        // A client id that would smuggle a wildcard in gets no %c grant,
        // and a %c deny denies everything.
        let sly = Access::for_client(&acl, Some("gw"), "#", None);
        assert!(!sly.may_publish("sensors/x/temp"));
        let sly_anon = Access::for_client(&acl, None, "a/b", None);
        assert!(!sly_anon.may_publish("anon/other"));
        // No rule for it: nothing.
        let nobody = Access::for_client(&Acl::default(), Some("gw"), "c", None);
        assert!(!nobody.may_publish("a") && !nobody.may_subscribe("a"));
    }

    #[test]
    fn a_rule_can_trust_a_verified_user_or_identity_as_a_bridge() {
        let acl = acl(r##"
            [[rule]]
            user = "regional-link"
            publish = ["#"]
            trusted_bridge = true
            [[rule]]
            identity = "edge-07.plant.example"
            trusted_bridge = true
            [[rule]]
            everyone = true
            publish = ["#"]
        "##);
        let cases = [
            (Some("regional-link"), "any-id", None, true),
            (None, "any-id", Some("edge-07.plant.example"), true),
            (Some("someone"), "regional-link", None, false),
            (None, "edge-07", None, false),
        ];
        for (user, client_id, identity, trusted) in cases {
            let access = Access::for_client(&acl, user, client_id, identity);
            assert_eq!(
                access.trusted_bridge(),
                trusted,
                "{user:?} {client_id} {identity:?}"
            );
        }
    }
}
