//! all_reduce algorithms: every rank ends with the elementwise reduction of all ranks' send
//! buffers (`count` elements each), bitwise identical on every rank.
//!
//! - [`ring`]: bandwidth-optimal, pipelined reduce-scatter + all-gather (large messages).
//! - [`rec_doubling`]: latency-optimal recursive doubling (small messages).

pub mod rec_doubling;
pub mod ring;
