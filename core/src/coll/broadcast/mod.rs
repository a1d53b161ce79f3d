//! broadcast algorithms: every rank's receive buffer ends with the root's send buffer
//! (`count` elements). Only the root's send buffer is significant; other ranks' send buffers
//! are never touched (they may be empty).
//!
//! - [`chain`]: pipelined chain (large messages).
//! - [`tree`]: binomial tree (small messages).

pub mod chain;
pub mod tree;

/// Binomial-tree shape over virtual ranks (0 is the root): the parent of `v` and its children,
/// farthest subtree first.
pub(crate) fn binomial(v: usize, n: usize) -> (Option<usize>, Vec<usize>) {
    let low = if v == 0 {
        n.next_power_of_two()
    } else {
        1 << v.trailing_zeros()
    };
    let parent = (v != 0).then(|| v - low);
    let mut children = Vec::new();
    let mut m = low >> 1;
    while m > 0 {
        if v + m < n {
            children.push(v + m);
        }
        m >>= 1;
    }
    (parent, children)
}
