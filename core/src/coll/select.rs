//! Algorithm selection (to be written).
