//! Membership (to be written).
