//! The error type of braid.
//!
//! Every variant belongs to one [`ErrorClass`] (the C ABI maps classes to status codes).
//! Errors on a communicator are sticky: once an operation failed with a communication error,
//! every later operation on that communicator returns the same error.

/// Broad class of an error (maps 1:1 to C status codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// A bad argument (size, pointer, rank, dtype, ...).
    InvalidArgument,
    /// A call that is wrong in this state (mismatched collectives, use after abort, ...).
    InvalidUsage,
    /// The operating system failed a call.
    System,
    /// A peer was lost or reported an error.
    Remote,
    /// A deadline passed.
    Timeout,
    /// A bug in braid.
    Internal,
}

/// braid's error.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A bad argument.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A call that is wrong in this state.
    #[error("invalid usage: {0}")]
    InvalidUsage(String),
    /// Ranks called different collectives (or the same one with different arguments).
    #[error(
        "collective mismatch: this rank {rank} called {local}, but rank {peer} called {remote}"
    )]
    Mismatch {
        /// This rank.
        rank: usize,
        /// The rank whose message did not match.
        peer: usize,
        /// This rank's signature.
        local: String,
        /// The peer's signature.
        remote: String,
    },
    /// The operating system failed a call.
    #[error("system error: {0}")]
    System(String),
    /// A peer process was lost (died, closed, network cut).
    #[error("peer lost: rank {rank} (member {member}, host {host}): {detail}")]
    PeerLost {
        /// Rank of the lost peer.
        rank: usize,
        /// Member id of the lost peer.
        member: u64,
        /// Host name of the lost peer.
        host: String,
        /// What was seen.
        detail: String,
    },
    /// A peer reported an error and aborted; `detail` is its message.
    #[error("rank {rank} (host {host}) aborted the communicator: {detail}")]
    Remote {
        /// Rank that reported.
        rank: usize,
        /// Its host.
        host: String,
        /// Its error message.
        detail: String,
    },
    /// The coordinator refused or failed.
    #[error("coordinator: {0}")]
    Coordinator(String),
    /// A deadline passed.
    #[error("timeout after {secs:.1} s: {what}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// Seconds waited.
        secs: f64,
    },
    /// The communicator was aborted by `abort()`.
    #[error("communicator aborted")]
    Aborted,
    /// A bug in braid.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The class of this error.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::InvalidArgument(_) => ErrorClass::InvalidArgument,
            Error::InvalidUsage(_) | Error::Mismatch { .. } | Error::Aborted => {
                ErrorClass::InvalidUsage
            }
            Error::System(_) => ErrorClass::System,
            Error::PeerLost { .. } | Error::Remote { .. } | Error::Coordinator(_) => {
                ErrorClass::Remote
            }
            Error::Timeout { .. } => ErrorClass::Timeout,
            Error::Internal(_) => ErrorClass::Internal,
        }
    }

    /// Whether this error leaves the communicator unusable (sticky). Argument errors are caught
    /// before anything is sent and are not sticky.
    pub fn is_sticky(&self) -> bool {
        !matches!(self, Error::InvalidArgument(_))
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::System(e.to_string())
    }
}

/// Result type of braid.
pub type Result<T> = std::result::Result<T, Error>;
