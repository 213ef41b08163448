//! Topic names and topic filters (spec 4.7): validation and matching.
//!
//! The broker's router has its own tree; [`matches`] is the reference
//! definition that its tests (and small users) compare against.

use crate::error::TopicError;

/// The prefix of a shared subscription filter (MQTT 5.0 4.8.2).
pub const SHARED_PREFIX: &str = "$share/";

/// Checks a topic name (what PUBLISH carries): at least one character and
/// no wildcard.
pub fn validate_topic_name(name: &str) -> Result<(), TopicError> {
    if name.is_empty() {
        return Err(TopicError::Empty);
    }
    // A fold without early exit: the compiler vectorises it, and topic
    // names are short, so scanning to the end costs less than branching.
    if name
        .bytes()
        .fold(false, |found, b| found | (b == b'+') | (b == b'#'))
    {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// Checks a topic filter (what SUBSCRIBE carries): `+` only as a whole
/// level, `#` only as the whole last level, and for `$share/` filters a
/// share name free of wildcards followed by a valid filter.
pub fn validate_topic_filter(filter: &str) -> Result<(), TopicError> {
    if let Some((_, inner)) = split_shared(filter)? {
        return validate_plain_filter(inner);
    }
    validate_plain_filter(filter)
}

fn validate_plain_filter(filter: &str) -> Result<(), TopicError> {
    if filter.is_empty() {
        return Err(TopicError::Empty);
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(TopicError::MisplacedMultiLevelWildcard);
        }
        if level.contains('+') && level != "+" {
            return Err(TopicError::PartialLevelWildcard);
        }
    }
    Ok(())
}

fn split_shared(filter: &str) -> Result<Option<(&str, &str)>, TopicError> {
    let Some(rest) = filter.strip_prefix(SHARED_PREFIX) else {
        return Ok(None);
    };
    let (name, inner) = rest
        .split_once('/')
        .ok_or(TopicError::InvalidSharedSubscription)?;
    if name.is_empty() || name.contains(['+', '#']) || inner.is_empty() {
        return Err(TopicError::InvalidSharedSubscription);
    }
    Ok(Some((name, inner)))
}

/// For a valid shared subscription filter `$share/{name}/{filter}`, the
/// share name and the filter; `None` for any other filter.
pub fn shared_subscription(filter: &str) -> Option<(&str, &str)> {
    split_shared(filter).ok().flatten()
}

/// Whether a topic name or filter has more than `max_levels` levels
/// (`a/b/c` has three); `max_levels` 0 means no limit. A shared
/// subscription's levels are those of its filter, without `$share/{name}/`.
pub fn exceeds_levels(topic: &str, max_levels: u32) -> bool {
    if max_levels == 0 {
        return false;
    }
    let inner = shared_subscription(topic).map_or(topic, |(_, filter)| filter);
    let separators = inner.bytes().filter(|&b| b == b'/').count();
    // Levels are separators + 1.
    u64::try_from(separators).map_or(true, |s| s >= u64::from(max_levels))
}

/// Whether a (valid, non-shared) topic filter matches a topic name,
/// including the rule that a filter starting with a wildcard does not match
/// a topic starting with `$` [MQTT-4.7.2-1].
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for level in filter.split('/') {
        if level == "#" {
            return true;
        }
        match topic_levels.next() {
            Some(t) if level == "+" || level == t => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        for ok in ["a", "/", "a/b", "a//b", "$SYS/x", " ", "température"] {
            assert_eq!(validate_topic_name(ok), Ok(()), "{ok:?}");
        }
        assert_eq!(validate_topic_name(""), Err(TopicError::Empty));
        for bad in ["a/+", "#", "a/b#", "+"] {
            assert_eq!(
                validate_topic_name(bad),
                Err(TopicError::WildcardInName),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn topic_filters() {
        for ok in [
            "#",
            "+",
            "a/#",
            "a/+/b",
            "+/+",
            "/",
            "a//b",
            "$SYS/#",
            "/+",
            "+/",
            "$share/g/a/#",
            "$share/g/#",
            "$share",
        ] {
            assert_eq!(validate_topic_filter(ok), Ok(()), "{ok:?}");
        }
        let cases = [
            ("", TopicError::Empty),
            ("a/#/b", TopicError::MisplacedMultiLevelWildcard),
            ("a#", TopicError::MisplacedMultiLevelWildcard),
            ("a/b#", TopicError::MisplacedMultiLevelWildcard),
            ("##", TopicError::MisplacedMultiLevelWildcard),
            ("a+", TopicError::PartialLevelWildcard),
            ("a/+b/c", TopicError::PartialLevelWildcard),
            ("$share/", TopicError::InvalidSharedSubscription),
            ("$share/g", TopicError::InvalidSharedSubscription),
            ("$share//a", TopicError::InvalidSharedSubscription),
            ("$share/g+/a", TopicError::InvalidSharedSubscription),
            ("$share/g/", TopicError::InvalidSharedSubscription),
            ("$share/g/a+", TopicError::PartialLevelWildcard),
        ];
        for (filter, error) in cases {
            assert_eq!(validate_topic_filter(filter), Err(error), "{filter:?}");
        }
        assert_eq!(shared_subscription("$share/g/a/+"), Some(("g", "a/+")));
        assert_eq!(shared_subscription("a/b"), None);
    }

    #[test]
    fn level_limits() {
        let cases = [
            ("a", 1, false),
            ("a/b", 1, true),
            ("a/b", 2, false),
            ("/", 1, true),
            ("/", 2, false),
            ("a/b/c/d", 3, true),
            ("a/b/c/d", 0, false),
            ("$share/g/a/b", 2, false),
            ("$share/g/a/b/c", 2, true),
        ];
        for (topic, max, over) in cases {
            assert_eq!(exceeds_levels(topic, max), over, "{topic:?} max {max}");
        }
    }

    #[test]
    fn matching() {
        let cases = [
            ("a/b", "a/b", true),
            ("a/b", "a/c", false),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/+", "a/", true),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("#", "a/b", true),
            ("#", "/", true),
            ("+/+", "/", true),
            ("+", "/a", false),
            ("/+", "/a", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("$SYS/+", "$SYS/x", true),
            ("a/b/c", "a/b", false),
            ("a//b", "a//b", true),
            ("a/+/b", "a//b", true),
        ];
        for (filter, topic, expected) in cases {
            assert_eq!(matches(filter, topic), expected, "{filter:?} ~ {topic:?}");
        }
    }
}
