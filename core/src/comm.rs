//! Communicator (to be written).
/// A communicator.
pub struct Communicator;
/// A handle.
pub struct Handle;
