//! reduce_scatter algorithms: rank r ends with block r (`count` elements) of the elementwise
//! reduction of all ranks' send buffers (`count·n` elements each).
//!
//! - [`ring`]: pipelined ring.

pub mod ring;
