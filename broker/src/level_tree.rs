//! What the router's and the retained set's level trees share: after a
//! removal, finding where to cut the branch the removal left empty, with
//! loops only (a topic can have 65,536 levels; recursion here once
//! overflowed the stack).

/// A node of a tree with one child per topic level.
pub(crate) trait LevelNode: Sized {
    /// The child for one level of a path.
    fn child(&self, level: &str) -> Option<&Self>;
    /// The same, mutably.
    fn child_mut(&mut self, level: &str) -> Option<&mut Self>;
    /// Whether the node holds nothing but its child at `next` (nothing at
    /// all when `next` is `None`).
    fn only_path_to(&self, next: Option<&str>) -> bool;
    /// Removes and returns the child at `level`.
    fn remove_child(&mut self, level: &str) -> Option<Self>;
}

/// Cuts off the part of `path` (from `root`) that holds nothing but the
/// path itself: the topmost such node is removed from its parent and
/// returned, for the caller to drop (each tree's `Drop` is iterative).
/// Two passes down the path, each a loop: one finds the cut, one makes it.
pub(crate) fn prune<N: LevelNode>(root: &mut N, path: &[&str]) -> Option<N> {
    let mut cut: Option<usize> = None;
    let mut node = &*root;
    for (depth, level) in path.iter().enumerate() {
        let child = node.child(level)?;
        if child.only_path_to(path.get(depth + 1).copied()) {
            cut.get_or_insert(depth);
        } else {
            cut = None;
        }
        node = child;
    }
    let depth = cut?;
    descend_mut(root, &path[..depth])?.remove_child(path[depth])
}

/// The node at the end of `path` from `root`, if the path exists.
pub(crate) fn descend_mut<'a, N: LevelNode>(root: &'a mut N, path: &[&str]) -> Option<&'a mut N> {
    let mut node = root;
    for level in path {
        node = node.child_mut(level)?;
    }
    Some(node)
}
