//! braid: collective communication for distributed training.
//!
//! A [`Communicator`] joins the ranks of a job (through the coordinator service of
//! [`membership`]) and runs collectives (all-reduce, reduce-scatter, all-gather, broadcast,
//! reduce, all-to-all, all-to-allv, gather, scatter, barrier) and tagged point-to-point transfers over the
//! transports of `braid-transport`.
//!
//! Layers inside this crate: [`config`] and [`error`] at the base; [`types`] and [`reduce`]
//! (element types and reduction kernels); [`coll`] (algorithms as plans, no I/O); `exec`
//! (runs plans over connections); [`comm`] (the public API); [`membership`] (coordinator,
//! rendezvous, views); [`topo`] (host topology through hwloc, sysfs fallback).

pub mod coll;
pub mod comm;
pub mod config;
pub mod cuda;
mod direct;
pub mod error;
mod exec;
#[doc(hidden)]
pub mod fuzzing;
mod matcher;
mod mem;
pub mod membership;
pub mod ps;
pub mod reduce;
pub mod shared;
pub mod topo;
pub mod types;

pub use braid_transport as transport;
pub use comm::{AnySource, Communicator, Group, Handle, P2p, RawColl, RawP2p};
pub use config::Config;
pub use error::{Error, ErrorClass, Result};
pub use shared::SharedBuf;
pub use types::{DataType, Element, ReduceOp};

/// braid's version as (major, minor, patch).
pub const VERSION: (u32, u32, u32) = (0, 1, 0);
