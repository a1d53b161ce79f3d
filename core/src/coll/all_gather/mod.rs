//! all_gather algorithms: every rank ends with all ranks' send buffers (`count` elements
//! each), rank j's in block j of the receive buffer (`count·n` elements).
//!
//! - [`ring`]: pipelined ring.

pub mod ring;
