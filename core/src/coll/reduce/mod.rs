//! reduce algorithms: the root's receive buffer ends with the elementwise reduction of all
//! ranks' send buffers (`count` elements). Only the root's receive buffer is significant;
//! other ranks never touch theirs (it may be empty) and accumulate in bounded scratch.
//!
//! - [`chain`]: pipelined chain (large messages).
//! - [`tree`]: binomial tree (small messages).

pub mod chain;
pub mod tree;

/// Scratch slots (of one slice each) an intermediate rank cycles through.
pub(crate) const SLOTS: usize = 4;
