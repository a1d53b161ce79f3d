//! Plan simulator (to be written).
