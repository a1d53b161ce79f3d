//! Raw buffers (to be written).
