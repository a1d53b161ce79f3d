//! braid_config_t, the configuration of braid_comm_init and of the push/pull servers and
//! workers: set fields win, unset ones come from the environment. A caller's struct is read
//! field by field as far as its `size` covers it (fields are append-only).

use std::ffi::{c_char, c_int};
use std::mem::{offset_of, size_of};

use braid_core::Config;

use crate::args::{opt_str, put};
use crate::error::{boundary, braid_status_t, CResult, Fail};
use crate::BRAID_CONFIG_VERSION;

// ---- configuration -------------------------------------------------------------------------

/// Configuration of braid_comm_init. Initialise it with BRAID_CONFIG_INITIALIZER or
/// braid_config_init(), then set the fields you need; fields left unset come from the
/// environment (BRAID_COORDINATOR, BRAID_WORLD_SIZE, BRAID_RANK, BRAID_TIMEOUT,
/// BRAID_TRANSPORT, ... as set by braid-run, torchrun, mpirun or SLURM). Set fields win over
/// the environment. Strings are read during braid_comm_init only.
///
/// Compatibility: fields are only ever appended. `size` (sizeof(braid_config_t) of the
/// caller's header) and `version` let a newer library read an older caller's struct (fields
/// beyond `size` count as unset) and an older library ignore a newer caller's extra fields.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct braid_config_t {
    /// sizeof(braid_config_t) as the caller compiled it.
    pub size: usize,
    /// BRAID_CONFIG_VERSION as the caller compiled it (must not be 0).
    pub version: u32,
    /// Coordinator address "host:port"; NULL: unset.
    pub coordinator: *const c_char,
    /// Number of ranks (>= 1); -1: unset.
    pub world_size: c_int,
    /// This process's rank (0 <= rank < world_size); -1: unset (the coordinator assigns
    /// ranks by arrival).
    pub rank: c_int,
    /// Deadline in seconds of every blocking wait of an operation; <= 0: unset.
    pub timeout_s: f64,
    /// Transport between ranks ("auto", "tcp", ...; see BRAID_TRANSPORT); NULL: unset.
    pub transport: *const c_char,
    /// Job token (as BRAID_JOB_TOKEN: the coordinator and every rank must present the same
    /// one; HMAC-SHA256, never sent); NULL: unset (the environment decides).
    pub job_token: *const c_char,
}

/// Initialises `*config` with "everything unset" (the values of BRAID_CONFIG_INITIALIZER).
///
/// # Safety
/// `config` is NULL (braid_invalid_argument) or valid for writing a braid_config_t.
#[no_mangle]
pub unsafe extern "C" fn braid_config_init(config: *mut braid_config_t) -> braid_status_t {
    boundary("braid_config_init", || {
        let c = braid_config_t {
            size: size_of::<braid_config_t>(),
            version: BRAID_CONFIG_VERSION,
            coordinator: std::ptr::null(),
            world_size: -1,
            rank: -1,
            timeout_s: 0.0,
            transport: std::ptr::null(),
            job_token: std::ptr::null(),
        };
        // SAFETY: caller contract.
        unsafe { put(config, "config", c) }
    })
}

/// Reads a field of a caller's config if its `size` covers it.
macro_rules! field {
    ($cfg:expr, $size:expr, $f:ident) => {
        if $size >= offset_of!(braid_config_t, $f) + size_of_field(|c: &braid_config_t| &c.$f) {
            // SAFETY: the caller's struct is at least `size` bytes long (contract of
            // braid_comm_init) and this field lies inside it; read_unaligned tolerates any
            // alignment.
            Some(unsafe { std::ptr::addr_of!((*$cfg).$f).read_unaligned() })
        } else {
            None
        }
    };
}

fn size_of_field<T>(_: impl Fn(&braid_config_t) -> &T) -> usize {
    size_of::<T>()
}

/// The configuration of an optional caller config: set fields win, unset ones come from the
/// environment.
///
/// # Safety
/// `config` is NULL or points to at least `config->size` readable bytes whose string fields
/// are NULL or NUL-terminated.
pub(crate) unsafe fn config_of(config: *const braid_config_t) -> CResult<Config> {
    let mut over: Vec<(&'static str, String)> = Vec::new();
    if !config.is_null() {
        // SAFETY: non-NULL; the first field is always present (the caller's struct begins with
        // `size_t size`).
        let size = unsafe { std::ptr::addr_of!((*config).size).read_unaligned() };
        if size < offset_of!(braid_config_t, version) + size_of::<u32>() {
            return Err(Fail::arg(format!(
                "config->size is {size}: initialise the config with BRAID_CONFIG_INITIALIZER or \
                 braid_config_init"
            )));
        }
        let version = field!(config, size, version).unwrap_or(0);
        if version == 0 {
            return Err(Fail::arg(
                "config->version is 0: initialise the config with BRAID_CONFIG_INITIALIZER or \
                 braid_config_init",
            ));
        }
        if let Some(p) = field!(config, size, coordinator) {
            // SAFETY: a non-NULL field is a NUL-terminated string (documented).
            if let Some(s) = unsafe { opt_str(p, "config->coordinator") }? {
                over.push(("BRAID_COORDINATOR", s));
            }
        }
        if let Some(n) = field!(config, size, world_size) {
            match n {
                -1 => {}
                n if n >= 1 => over.push(("BRAID_WORLD_SIZE", n.to_string())),
                n => {
                    return Err(Fail::arg(format!(
                        "config->world_size is {n}: expected >= 1 or -1 (unset)"
                    )))
                }
            }
        }
        if let Some(r) = field!(config, size, rank) {
            match r {
                -1 => {}
                r if r >= 0 => over.push(("BRAID_RANK", r.to_string())),
                r => {
                    return Err(Fail::arg(format!(
                        "config->rank is {r}: expected >= 0 or -1 (unset)"
                    )))
                }
            }
        }
        if let Some(t) = field!(config, size, timeout_s) {
            if t.is_nan() || t > braid_core::config::MAX_SECS {
                return Err(Fail::arg(format!(
                    "config->timeout_s is {t}: expected a finite number of seconds up to {:e} \
                     (<= 0: unset)",
                    braid_core::config::MAX_SECS
                )));
            }
            if t > 0.0 {
                over.push(("BRAID_TIMEOUT", format!("{t}")));
            }
        }
        if let Some(p) = field!(config, size, transport) {
            // SAFETY: as for coordinator.
            if let Some(s) = unsafe { opt_str(p, "config->transport") }? {
                over.push(("BRAID_TRANSPORT", s));
            }
        }
        if let Some(p) = field!(config, size, job_token) {
            // SAFETY: a non-NULL field is a NUL-terminated string (documented).
            if let Some(s) = unsafe { opt_str(p, "config->job_token") }? {
                over.push(("BRAID_JOB_TOKEN", s));
            }
        }
    }
    // Set fields win; everything else comes from the environment as Config::from_env reads it
    // (and unknown BRAID_* names warn, as there).
    let cfg = Config::from_lookup(|k| {
        over.iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.clone())
            .or_else(|| braid_core::config::var(k))
    })?;
    cfg.announce();
    Ok(cfg)
}
