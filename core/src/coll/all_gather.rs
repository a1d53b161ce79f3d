//! all_gather algorithms (to be written).
