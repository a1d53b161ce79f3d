//! scatter algorithms: rank j's receive buffer (`count` elements) ends with block j of the
//! root's send buffer (`count·n` elements). Only the root's send buffer is significant; other
//! ranks never touch theirs.
//!
//! - [`direct`]: the root sends straight to every rank.

pub mod direct;
