//! Reduction kernels (to be written).
