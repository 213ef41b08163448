//! The ACL file (`[auth] acl_file`): who may publish and subscribe where.
//!
//! ```toml
//! [[rule]]
//! user = "sensor-gw"                 # one selector a rule: user, client_id
//! publish   = ["sensors/%c/#"]       # (`*` wildcard), identity (client
//! subscribe = ["cmd/%c/#"]           # certificate), anonymous, everyone
//!
//! [[rule]]
//! everyone = true
//! subscribe = ["$SYS/broker/#"]
//! deny_subscribe = ["secret/#"]
//! ```
//!
//! Rules grant; nothing is allowed that no rule grants; a `deny_*` entry of
//! any rule that applies wins over every grant. `%u` stands for the user
//! name, `%c` for the client id. This module parses and checks the file;
//! the broker evaluates it.

use serde::Deserialize;

use crate::ConfigError;

/// Who a rule is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// Clients logged in as this user.
    User(String),
    /// Clients whose id matches this pattern (`*`: any run of characters).
    ClientId(String),
    /// Clients whose certificate identity is this.
    Identity(String),
    /// Clients without a user name.
    Anonymous,
    /// Every client.
    Everyone,
}

/// One `[[rule]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Who it applies to.
    pub selector: Selector,
    /// Topic filters it may publish to.
    pub publish: Vec<String>,
    /// Topic filters it may subscribe within.
    pub subscribe: Vec<String>,
    /// Topic filters it may not publish to, whatever grants it.
    pub deny_publish: Vec<String>,
    /// Topic filters it may not subscribe to (nor to anything that
    /// overlaps them), whatever grants it.
    pub deny_subscribe: Vec<String>,
    /// `trusted_bridge = true`: the clients it applies to are trusted as
    /// bridges of other ferrymq nodes (their message ids are honoured),
    /// as with `[ferry] trusted_clients`, but by a verified user or
    /// certificate identity rather than a client id alone.
    pub trusted_bridge: bool,
}

/// A parsed ACL file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    /// The rules, in file order.
    pub rules: Vec<Rule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    rule: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    user: Option<String>,
    client_id: Option<String>,
    identity: Option<String>,
    anonymous: Option<bool>,
    everyone: Option<bool>,
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    deny_publish: Vec<String>,
    #[serde(default)]
    deny_subscribe: Vec<String>,
    #[serde(default)]
    trusted_bridge: bool,
}

impl Acl {
    /// Parses an ACL file's text; every problem is reported with its key
    /// (`rule[i].publish[j]`).
    pub fn from_toml_str(text: &str) -> Result<Acl, Vec<ConfigError>> {
        let raw: RawFile = toml::from_str(text)
            .map_err(|e| vec![ConfigError::new("", e.message().to_string())])?;
        let mut errors = Vec::new();
        let mut rules = Vec::new();
        for (i, r) in raw.rule.into_iter().enumerate() {
            let key = |k: &str| format!("rule[{i}].{k}");
            let mut selectors = Vec::new();
            if let Some(u) = r.user {
                selectors.push(Selector::User(u));
            }
            if let Some(c) = r.client_id {
                selectors.push(Selector::ClientId(c));
            }
            if let Some(id) = r.identity {
                selectors.push(Selector::Identity(id));
            }
            match r.anonymous {
                Some(true) => selectors.push(Selector::Anonymous),
                Some(false) => errors.push(ConfigError::new(
                    key("anonymous"),
                    "only `anonymous = true` selects anything; leave it out otherwise",
                )),
                None => {}
            }
            match r.everyone {
                Some(true) => selectors.push(Selector::Everyone),
                Some(false) => errors.push(ConfigError::new(
                    key("everyone"),
                    "only `everyone = true` selects anything; leave it out otherwise",
                )),
                None => {}
            }
            if selectors.len() != 1 {
                errors.push(ConfigError::new(
                    format!("rule[{i}]"),
                    format!(
                        "needs exactly one of user, client_id, identity, anonymous = true, \
                         everyone = true; has {}",
                        selectors.len()
                    ),
                ));
                continue;
            }
            for (name, list) in [
                ("publish", &r.publish),
                ("subscribe", &r.subscribe),
                ("deny_publish", &r.deny_publish),
                ("deny_subscribe", &r.deny_subscribe),
            ] {
                for (j, filter) in list.iter().enumerate() {
                    // %u and %c stand for one whole level.
                    let probe = filter.replace("%u", "u").replace("%c", "c");
                    if let Err(e) = ferrymq_codec::topic::validate_topic_filter(&probe) {
                        errors.push(ConfigError::new(
                            format!("{}[{j}]", key(name)),
                            format!("\"{filter}\" is not a valid topic filter: {e}"),
                        ));
                    } else if probe.starts_with(ferrymq_codec::topic::SHARED_PREFIX) {
                        errors.push(ConfigError::new(
                            format!("{}[{j}]", key(name)),
                            format!(
                                "\"{filter}\": write the filter without $share/{{name}}/ (a \
                                 shared subscription is checked by its filter)"
                            ),
                        ));
                    }
                }
            }
            rules.push(Rule {
                selector: selectors.remove(0),
                publish: r.publish,
                subscribe: r.subscribe,
                deny_publish: r.deny_publish,
                deny_subscribe: r.deny_subscribe,
                trusted_bridge: r.trusted_bridge,
            });
        }
        if errors.is_empty() {
            Ok(Acl { rules })
        } else {
            Err(errors)
        }
    }

    /// Reads and parses the file at `path`; errors are keyed under `key`
    /// (`auth.acl_file`) with the file's own key after it.
    pub fn from_file(path: &std::path::Path, key: &str) -> Result<Acl, Vec<ConfigError>> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            vec![ConfigError::new(
                key,
                format!("cannot read {}: {e}", path.display()),
            )]
        })?;
        Acl::from_toml_str(&text).map_err(|errors| {
            errors
                .into_iter()
                .map(|e| {
                    let inner = if e.key.is_empty() {
                        String::new()
                    } else {
                        format!(" {}", e.key)
                    };
                    ConfigError::new(key, format!("{}{inner}: {}", path.display(), e.message))
                })
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_with_one_selector_each() {
        let acl = Acl::from_toml_str(
            r##"
            [[rule]]
            user = "gw"
            publish = ["sensors/%c/#"]
            subscribe = ["cmd/%u/#"]
            [[rule]]
            everyone = true
            subscribe = ["$SYS/broker/#"]
            deny_subscribe = ["secret/#"]
            [[rule]]
            client_id = "edge-*"
            deny_publish = ["#"]
            "##,
        )
        .expect("parses");
        assert_eq!(acl.rules.len(), 3);
        assert_eq!(acl.rules[0].selector, Selector::User("gw".into()));
        assert_eq!(acl.rules[1].selector, Selector::Everyone);
        assert_eq!(acl.rules[2].selector, Selector::ClientId("edge-*".into()));
    }

    #[test]
    fn bad_rules_are_named_by_key() {
        let errors = Acl::from_toml_str(
            r#"
            [[rule]]
            user = "a"
            everyone = true
            [[rule]]
            anonymous = true
            publish = ["a/#/b", "ok/#"]
            [[rule]]
            "#,
        )
        .expect_err("invalid");
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "rule[0]: needs exactly one of user, client_id, identity, anonymous = true, \
                 everyone = true; has 2",
                "rule[1].publish[0]: \"a/#/b\" is not a valid topic filter: '#' must be the \
                 whole last level of a filter",
                "rule[2]: needs exactly one of user, client_id, identity, anonymous = true, \
                 everyone = true; has 0",
            ]
        );
        let unknown = Acl::from_toml_str("[[rule]]\nuser = \"a\"\npublsh = []\n").expect_err("x");
        assert!(
            unknown[0].to_string().contains("unknown field `publsh`"),
            "{unknown:?}"
        );
    }
}
