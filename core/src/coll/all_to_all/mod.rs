//! all_to_all algorithms: block j (`count` elements) of rank r's send buffer ends in block r
//! of rank j's receive buffer.
//!
//! - [`pairwise`]: pairwise exchange.

pub mod pairwise;
