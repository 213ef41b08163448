//! "Did you mean ...?" for misspelt keys.

/// The candidate closest to `word`, if it is within edit distance 2.
/// Ties go to the earlier candidate.
pub(crate) fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|&candidate| (edit_distance(word, candidate), candidate))
        .filter(|&(distance, _)| distance <= 2)
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, candidate)| candidate)
}

/// Optimal string alignment distance: insertions, deletions, substitutions
/// and swaps of two neighbouring characters each cost 1 (so
/// `max_connectoins` is one edit from `max_connections`).
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // rows[i][j] = distance between a[..i] and b[..j]; three rows suffice.
    let width = b.len() + 1;
    let mut before_prev: Vec<usize> = vec![0; width];
    let mut prev: Vec<usize> = (0..width).collect();
    let mut row: Vec<usize> = vec![0; width];
    for i in 1..=a.len() {
        row[0] = i;
        for j in 1..width {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (prev[j] + 1).min(row[j - 1] + 1).min(prev[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(before_prev[j - 2] + 1);
            }
            row[j] = best;
        }
        std::mem::swap(&mut before_prev, &mut prev);
        std::mem::swap(&mut prev, &mut row);
    }
    prev[width - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances() {
        for (a, b, expected) in [
            ("", "", 0),
            ("", "abc", 3),
            ("abc", "", 3),
            ("bind", "bind", 0),
            ("bnd", "bind", 1),
            ("binds", "bind", 1),
            ("bimd", "bind", 1),
            ("bnid", "bind", 1),
            ("max_conections", "max_connections", 1),
            ("max_connectoins", "max_connections", 1),
            ("kitten", "sitting", 3),
            ("ca", "abc", 3),
        ] {
            assert_eq!(edit_distance(a, b), expected, "{a:?} vs {b:?}");
            assert_eq!(edit_distance(b, a), expected, "{b:?} vs {a:?}");
        }
    }

    #[test]
    fn closest_candidate() {
        let keys = ["max_connections", "max_packet_size", "receive_maximum"];
        assert_eq!(closest("max_conections", &keys), Some("max_connections"));
        assert_eq!(closest("max_packet_sizes", &keys), Some("max_packet_size"));
        assert_eq!(closest("recieve_maximum", &keys), Some("receive_maximum"));
        assert_eq!(closest("max_keepalive", &keys), None);
        assert_eq!(closest("anything", &[]), None);
    }
}
