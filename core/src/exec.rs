//! Executor (to be written).
