//! barrier algorithms: no rank leaves before every rank entered.
//!
//! - [`dissemination`]: dissemination barrier.

pub mod dissemination;
