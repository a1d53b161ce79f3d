//! broadcast algorithms (to be written).
