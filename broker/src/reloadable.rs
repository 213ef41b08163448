//! A value a reload may replace (the ACL rules), kept apart from the
//! reload itself so that what reads it does not import the reload.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

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
}
