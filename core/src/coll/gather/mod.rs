//! gather algorithms: the root's receive buffer (`count·n` elements) ends with every rank's
//! send buffer (`count` elements), rank j's in block j. Only the root's receive buffer is
//! significant; other ranks never touch theirs.
//!
//! - [`direct`]: every rank sends straight to the root.

pub mod direct;
