//! all_reduce algorithms (to be written).
