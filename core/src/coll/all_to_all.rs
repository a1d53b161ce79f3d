//! all_to_all algorithms (to be written).
