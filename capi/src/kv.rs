//! Push/pull: parameter servers and workers.
//!
//! Servers (braid_kv_server_start*) and workers (braid_kv_worker_start) are members of one
//! push/pull group (BRAID_GROUP); BRAID_WORLD_SIZE counts both at start. Settings that must be
//! the same on every member come from the environment (PsOptions::from_env): BRAID_PS_MODE
//! (sync | async | bounded:TAU), BRAID_PS_RULE (sum | sgd:LR | sgd:lr=..,momentum=..,wd=..,
//! rescale=..,clip=..; replaceable at run time: braid_kv_set_rule), BRAID_PS_PARTITION_BYTES,
//! BRAID_PS_REPLICAS.

use std::ffi::{c_char, c_int, c_void};
use std::sync::Arc;

use braid_core::ps::{KvServer, KvWorker, PsHandle, PsOptions, UpdateRule};
use braid_core::{DataType, Element, Error};

use crate::args::{c_slice, c_slice_mut, dtype_code, dtype_of, opt_str, put, DatatypeArg};
use crate::config::{braid_config_t, config_of};
use crate::error::{boundary, braid_status_t, CResult, Fail};

/// A push/pull server (opaque). Created by braid_kv_server_start or
/// braid_kv_server_start_with_update, freed by braid_kv_server_destroy.
pub struct braid_kv_server {
    server: KvServer,
}

/// Handle of a push/pull server. Using it after braid_kv_server_destroy is undefined
/// behaviour.
pub type braid_kv_server_t = *mut braid_kv_server;

/// A push/pull worker (opaque). Created by braid_kv_worker_start, freed by
/// braid_kv_worker_destroy.
pub struct braid_kv_worker {
    worker: KvWorker,
}

/// Handle of a push/pull worker. Using it after braid_kv_worker_destroy is undefined
/// behaviour.
pub type braid_kv_worker_t = *mut braid_kv_worker;

/// A non-blocking push, pull or push-pull (opaque). Created by braid_kv_push, braid_kv_pull
/// and braid_kv_push_pull, freed by braid_kv_request_free.
pub struct braid_kv_request {
    pending: Option<Box<dyn KvPending>>,
    result: Option<CResult<u64>>,
}

/// Handle of a push/pull operation. Using it after braid_kv_request_free is undefined
/// behaviour.
pub type braid_kv_request_t = *mut braid_kv_request;

/// A server update rule written in C: updates the `bytes` bytes of `value` (elements of
/// `dtype`) in place from `grad` (as many bytes: the sum of a sync round's pushes, or one push
/// in async/bounded mode) and returns 0; any other return value leaves the value unchanged
/// (async/bounded: the push fails with braid_invalid_argument; sync: the round closes with the
/// value unchanged). A value larger than BRAID_PS_PARTITION_BYTES is split into parts that are
/// updated separately: `value` and `grad` are then one part. `key` identifies the part: in
/// this release it is braid's store key of the part (a hash of the caller's key and the part
/// index), not the caller's key. Called on braid's server threads (on every replica of the
/// part); `user` is the pointer given to braid_kv_server_start_with_update. It must not call
/// braid functions on the same server.
pub type braid_kv_update_fn = Option<
    unsafe extern "C" fn(
        key: u64,
        dtype: DatatypeArg,
        value: *mut c_void,
        grad: *const c_void,
        bytes: usize,
        user: *mut c_void,
    ) -> c_int,
>;

/// An operation in flight, whatever its element type.
trait KvPending {
    /// Whether it finished (never blocks).
    fn ready(&self) -> bool;
    /// Waits for it, writes pulled values to the caller's buffer, returns the version.
    fn complete(self: Box<Self>) -> CResult<u64>;
}

/// A push: completes when every part was recorded (and replicated).
struct PushPending(PsHandle<()>);

impl KvPending for PushPending {
    fn ready(&self) -> bool {
        self.0.test()
    }

    fn complete(self: Box<Self>) -> CResult<u64> {
        self.0.wait()?;
        Ok(0)
    }
}

/// A pull (or push-pull): braid writes its values to the caller's `out` as the servers answer
/// (answers of 64 KiB or more received straight into it, no intermediate copy); it is ready,
/// and dropping it (braid_kv_request_free) returns, only once nothing writes there any more.
struct PullPending(PsHandle<u64>);

impl KvPending for PullPending {
    fn ready(&self) -> bool {
        self.0.test()
    }

    fn complete(self: Box<Self>) -> CResult<u64> {
        Ok(self.0.wait()?)
    }
}

/// A pull into CUDA device memory: braid pulls into `host` (staging), and completing it
/// copies the values to the device buffer (issue 14: push/pull with device buffers uses
/// staging). `inner` is declared first so it is dropped (stopping writes into `host`) first.
struct DevicePull<T: Element> {
    inner: Box<dyn KvPending>,
    host: Vec<T>,
    dev: braid_core::cuda::DevPtr,
}

impl<T: Element> KvPending for DevicePull<T> {
    fn ready(&self) -> bool {
        self.inner.ready()
    }

    fn complete(self: Box<Self>) -> CResult<u64> {
        let DevicePull { inner, host, dev } = *self;
        let version = inner.complete()?;
        let bytes: &[u8] = bytemuck::cast_slice(&host);
        braid_core::cuda::driver::copy_to_device(dev, bytes)?;
        Ok(version)
    }
}

/// Values in CUDA device memory, copied to the host (after the device's pending work), or None
/// for host memory (and NULL / empty).
fn staged_in<T: Element>(vals: *const c_void, total: usize) -> CResult<Option<Vec<T>>> {
    if vals.is_null() || total == 0 {
        return Ok(None);
    }
    match braid_core::cuda::pointer_kind(vals) {
        braid_core::cuda::PtrKind::Device(_) => {
            let mut v = vec![T::default(); total];
            braid_core::cuda::driver::copy_from_device(
                bytemuck::cast_slice_mut(&mut v),
                vals as braid_core::cuda::DevPtr,
            )?;
            Ok(Some(v))
        }
        _ => Ok(None),
    }
}

/// A C update callback and its user pointer.
struct UpdateCallback {
    f: unsafe extern "C" fn(
        u64,
        DatatypeArg,
        *mut c_void,
        *const c_void,
        usize,
        *mut c_void,
    ) -> c_int,
    user: *mut c_void,
}

// SAFETY: braid_kv_server_start_with_update's contract: the callback and `user` may be used
// from any thread (the caller synchronises whatever `user` shares with other threads).
unsafe impl Send for UpdateCallback {}
// SAFETY: as for Send.
unsafe impl Sync for UpdateCallback {}

impl UpdateCallback {
    fn call(
        &self,
        key: u64,
        dtype: DataType,
        value: &mut [u8],
        grad: &[u8],
    ) -> braid_core::Result<()> {
        if value.len() != grad.len() {
            return Err(Error::Internal(format!(
                "update rule: value of {} bytes, gradient of {} bytes",
                value.len(),
                grad.len()
            )));
        }
        // SAFETY: `value` is valid for writing and `grad` for reading `value.len()` bytes for
        // the call; the function pointer and `user` are valid on this thread (contract of
        // braid_kv_server_start_with_update).
        let rc = unsafe {
            (self.f)(
                key,
                DatatypeArg(dtype_code(dtype)),
                value.as_mut_ptr().cast(),
                grad.as_ptr().cast(),
                value.len(),
                self.user,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "update callback returned {rc} for key {key}; value unchanged"
            )))
        }
    }
}

/// Runs `$f::<T>($args)` with `T` the Rust element type of `$dtype` (a `DataType`).
macro_rules! with_element {
    ($dtype:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $dtype {
            DataType::I8 => $f::<i8>($($arg),*),
            DataType::U8 => $f::<u8>($($arg),*),
            DataType::I16 => $f::<i16>($($arg),*),
            DataType::I32 => $f::<i32>($($arg),*),
            DataType::U32 => $f::<u32>($($arg),*),
            DataType::I64 => $f::<i64>($($arg),*),
            DataType::U64 => $f::<u64>($($arg),*),
            DataType::F32 => $f::<f32>($($arg),*),
            DataType::F64 => $f::<f64>($($arg),*),
            DataType::F16 => $f::<half::f16>($($arg),*),
            DataType::BF16 => $f::<half::bf16>($($arg),*),
        }
    };
}

/// The keys, lengths and element count of a push/pull call.
struct KvKeys<'a> {
    keys: &'a [u64],
    lens: &'a [usize],
    total: usize,
}

/// Reads the `keys` and `lens` arrays of a call.
///
/// # Safety
/// `keys` and `lens` are NULL or valid for `nkeys` elements for `'a`.
unsafe fn kv_keys<'a>(keys: *const u64, lens: *const usize, nkeys: usize) -> CResult<KvKeys<'a>> {
    // SAFETY: forwarded contract.
    let keys = unsafe { c_slice(keys, nkeys, "keys") }?;
    // SAFETY: forwarded contract.
    let lens = unsafe { c_slice(lens, nkeys, "lens") }?;
    let total = lens
        .iter()
        .try_fold(0usize, |a, &n| a.checked_add(n))
        .ok_or_else(|| Fail::arg("the lengths overflow size_t"))?;
    Ok(KvKeys { keys, lens, total })
}

/// The worker behind a handle.
///
/// # Safety
/// `worker` is NULL or a handle from braid_kv_worker_start not yet destroyed.
unsafe fn kv_worker_ref<'a>(worker: braid_kv_worker_t) -> CResult<&'a braid_kv_worker> {
    // SAFETY: per this function's contract, a non-NULL `worker` points to a live
    // braid_kv_worker (Box::into_raw in braid_kv_worker_start, freed only by
    // braid_kv_worker_destroy).
    unsafe { worker.cast_const().as_ref() }.ok_or_else(|| Fail::arg("worker is NULL"))
}

/// Starts a server from an optional config and an optional update rule overriding
/// BRAID_PS_RULE.
///
/// # Safety
/// `server` is NULL or writable; `config` as for braid_comm_init.
unsafe fn start_server(
    server: *mut braid_kv_server_t,
    config: *const braid_config_t,
    rule: Option<UpdateRule>,
) -> CResult {
    // SAFETY: caller contract.
    unsafe { put(server, "server", std::ptr::null_mut()) }?;
    // SAFETY: caller contract.
    let cfg = unsafe { config_of(config) }?;
    let mut opts = PsOptions::from_env()?;
    if let Some(r) = rule {
        opts.rule = r;
    }
    let s = KvServer::start(cfg, opts)?;
    let b = Box::into_raw(Box::new(braid_kv_server { server: s }));
    // SAFETY: checked non-NULL by `put` above; caller contract.
    unsafe { server.write(b) };
    Ok(())
}

/// Starts a push/pull server: registers with the coordinator as a server of the group
/// (BRAID_GROUP) and serves pushes and pulls on braid's threads until
/// braid_kv_server_destroy. Blocks until the group has formed (all BRAID_WORLD_SIZE servers and
/// workers registered; bounded by BRAID_INIT_TIMEOUT), so servers and workers must start
/// concurrently (separate processes or threads). `config` may be NULL: everything comes from
/// the environment (as for braid_comm_init). Consistency mode, update rule, partition size and
/// replicas come from BRAID_PS_MODE, BRAID_PS_RULE, BRAID_PS_PARTITION_BYTES and
/// BRAID_PS_REPLICAS (the same on every member). On failure `*server` is set to NULL.
///
/// Errors: as braid_comm_init; braid_invalid_argument for a malformed BRAID_PS_* variable.
///
/// # Safety
/// `server` is NULL or valid for a write; `config` as for braid_comm_init.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_server_start(
    server: *mut braid_kv_server_t,
    config: *const braid_config_t,
) -> braid_status_t {
    boundary("braid_kv_server_start", || {
        // SAFETY: this function's contract.
        unsafe { start_server(server, config, None) }
    })
}

/// Starts a push/pull server (as braid_kv_server_start) whose update rule is `update` (called
/// with `user`) instead of BRAID_PS_RULE. Every server of a group should use the same rule.
///
/// Errors: as braid_kv_server_start; braid_invalid_argument when `update` is NULL.
///
/// # Safety
/// As braid_kv_server_start; `update` is a function that may be called from any thread until
/// braid_kv_server_destroy returns, and `user` (passed to it unchanged, may be NULL) stays
/// valid and usable from those threads until then (the caller synchronises what it shares).
#[no_mangle]
pub unsafe extern "C" fn braid_kv_server_start_with_update(
    server: *mut braid_kv_server_t,
    config: *const braid_config_t,
    update: braid_kv_update_fn,
    user: *mut c_void,
) -> braid_status_t {
    boundary("braid_kv_server_start_with_update", || {
        let Some(f) = update else {
            // SAFETY: caller contract.
            unsafe { put(server, "server", std::ptr::null_mut()) }?;
            return Err(Fail::arg("update is NULL"));
        };
        let cb = UpdateCallback { f, user };
        let rule = UpdateRule::Custom(Arc::new(
            move |key: u64, dtype: DataType, value: &mut [u8], grad: &[u8]| {
                cb.call(key, dtype, value, grad)
            },
        ));
        // SAFETY: this function's contract.
        unsafe { start_server(server, config, Some(rule)) }
    })
}

/// Stops a server and frees it: it leaves the group (with BRAID_PS_REPLICAS >= 1 its replicas
/// take over its keys). Call it once the workers are done. NULL is a no-op returning
/// braid_success. The handle is invalid afterwards.
///
/// # Safety
/// `server` is NULL or a live server not used by any other thread.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_server_destroy(server: braid_kv_server_t) -> braid_status_t {
    boundary("braid_kv_server_destroy", || {
        if !server.is_null() {
            // SAFETY: `server` came from Box::into_raw in start_server and is freed once
            // (caller contract).
            drop(unsafe { Box::from_raw(server) });
        }
        Ok(())
    })
}

/// Writes to `*workers` the number of workers in the view this server runs on (the group's
/// current membership, updated as workers join, leave or die). A dedicated server process can
/// poll it and stop once workers came and all left.
///
/// Errors: braid_invalid_argument (NULL `server` or `workers`).
///
/// # Safety
/// `server` is NULL or a live server; `workers` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_server_workers(
    server: braid_kv_server_t,
    workers: *mut usize,
) -> braid_status_t {
    boundary("braid_kv_server_workers", || {
        // SAFETY: per contract, a non-NULL `server` came from Box::into_raw in start_server and
        // has not been destroyed.
        let s =
            unsafe { server.cast_const().as_ref() }.ok_or_else(|| Fail::arg("server is NULL"))?;
        let n = s.server.sizes().0;
        // SAFETY: caller contract.
        unsafe { put(workers, "workers", n) }
    })
}

/// Starts a push/pull worker: registers with the coordinator as a worker of the group
/// (BRAID_GROUP) and connects to its servers. Blocks until the group has formed (see
/// braid_kv_server_start). `config` may be NULL. Settings as for braid_kv_server_start. On
/// failure `*worker` is set to NULL.
///
/// Errors: as braid_kv_server_start.
///
/// # Safety
/// `worker` is NULL or valid for a write; `config` as for braid_comm_init.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_worker_start(
    worker: *mut braid_kv_worker_t,
    config: *const braid_config_t,
) -> braid_status_t {
    boundary("braid_kv_worker_start", || {
        // SAFETY: caller contract.
        unsafe { put(worker, "worker", std::ptr::null_mut()) }?;
        // SAFETY: caller contract.
        let cfg = unsafe { config_of(config) }?;
        let w = KvWorker::start(cfg, PsOptions::from_env()?)?;
        let b = Box::into_raw(Box::new(braid_kv_worker { worker: w }));
        // SAFETY: checked non-NULL by `put` above; caller contract.
        unsafe { worker.write(b) };
        Ok(())
    })
}

/// Writes a checkpoint of the group's push/pull state to directory `dir` (created if needed;
/// a relative path is taken from the current directory; every server must reach the same
/// path), blocking until it is on disk: every server writes the parts it owns at one
/// consistent version (sync: the round this worker last pushed into), one file per server,
/// then this worker writes `manifest.json` last, so the previous checkpoint in `dir` stays
/// valid until the new one is complete. Servers copy their state in memory and write in the
/// background. The coordinator records it (`braid-coordinator status`). Servers started with
/// BRAID_PS_RESTORE=`dir` load it, with any number of servers. Periodic checkpoints:
/// BRAID_PS_CHECKPOINT_DIR and BRAID_PS_CHECKPOINT_EVERY.
///
/// Errors: braid_invalid_argument (NULL `worker` or `dir`, a path that is not UTF-8 or too
/// long, a server's refusal, e.g. still writing an earlier checkpoint or the view changed
/// meanwhile), braid_remote_error when a server is lost before it answered,
/// braid_system_error (I/O writing the manifest), braid_timeout (BRAID_TIMEOUT). Nothing is
/// installed on error.
///
/// # Safety
/// `worker` is NULL or live; `dir` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_checkpoint(
    worker: braid_kv_worker_t,
    dir: *const c_char,
) -> braid_status_t {
    boundary("braid_kv_checkpoint", || {
        // SAFETY: caller contract.
        let w = unsafe { kv_worker_ref(worker) }?;
        // SAFETY: caller contract (NULL or NUL-terminated).
        let dir = unsafe { opt_str(dir, "dir") }?.ok_or_else(|| Fail::arg("dir is NULL"))?;
        w.worker.checkpoint(dir)?;
        Ok(())
    })
}

/// Installs update rule `rule` on every push/pull server of the view, blocking until each
/// acknowledged it (bounded by BRAID_TIMEOUT). `rule` is spelt as BRAID_PS_RULE: `sum`,
/// `sgd:LR`, or `sgd:lr=LR,momentum=M,wd=WD,rescale=R,clip=C` (any subset, `lr` required;
/// defaults momentum 0, wd 0, rescale 1, no clipping; a negative clip means none): MXNet 1.9's
/// SGD (sgd_update / sgd_mom_update: g = clip(rescale * grad); without momentum
/// w = (1 - lr*wd)*w - lr*g; with momentum mom = momentum*mom - lr*wd*w - lr*g, w += mom),
/// float keys only (float16/bfloat16 computed in float32). The momentum buffer is kept per key
/// on the servers (zero at its first use), survives rule changes, moves with the key when a
/// server leaves or dies (replicas keep it), and can be read and replaced with
/// braid_kv_pull_state / braid_kv_push_state. The request is queued on each server's
/// connection behind everything this worker queued before; servers use the rule for every
/// update applied after it (sync mode: the rounds that close after it). Idempotent: call it on
/// every worker with the same rule. Afterwards this worker also sends the rule to servers that
/// join the view later, before anything else it sends them.
///
/// Errors: braid_invalid_argument (NULL `worker` or `rule`, a malformed rule naming the bad
/// field, a server running a callback rule from braid_kv_server_start_with_update, which
/// cannot be replaced), braid_remote_error naming a server lost before it answered,
/// braid_timeout. On error some servers may already use the new rule: call it again.
///
/// # Safety
/// `worker` is NULL or live; `rule` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_set_rule(
    worker: braid_kv_worker_t,
    rule: *const c_char,
) -> braid_status_t {
    boundary("braid_kv_set_rule", || {
        // SAFETY: caller contract.
        let w = unsafe { kv_worker_ref(worker) }?;
        // SAFETY: caller contract (NULL or NUL-terminated).
        let spec = unsafe { opt_str(rule, "rule") }?.ok_or_else(|| Fail::arg("rule is NULL"))?;
        let r = UpdateRule::parse(&spec)?;
        w.worker.set_rule(&r)?;
        Ok(())
    })
}

fn kv_pull_state<T: Element>(w: &KvWorker, k: &KvKeys<'_>, out: *mut c_void) -> CResult {
    // Lengths too large for memory are named as such, before `out` is looked at.
    if k.total
        .checked_mul(size_of::<T>())
        .map_or(true, |b| b > isize::MAX as usize)
    {
        return Err(Fail::arg("the lengths are too large"));
    }
    // SAFETY: valid for writing `total` elements for the call (contract of
    // braid_kv_pull_state); nobody else uses it meanwhile.
    let o = unsafe { c_slice_mut(out.cast::<T>(), k.total, "out") }?;
    w.pull_state_into(k.keys, k.lens, o)?;
    Ok(())
}

fn kv_push_state<T: Element>(w: &KvWorker, k: &KvKeys<'_>, vals: *const c_void) -> CResult {
    // SAFETY: `vals` is NULL or valid for `total` elements for the call (contract of
    // braid_kv_push_state).
    let v = unsafe { c_slice(vals.cast::<T>(), k.total, "vals") }?;
    w.push_state(k.keys, k.lens, v)?;
    Ok(())
}

/// Reads the server-side optimizer state of `nkeys` keys (the momentum buffers of the sgd
/// rule, see braid_kv_set_rule) into `out`, laid out as braid_kv_pull's output (`lens[i]`
/// elements of `dtype`, the keys' datatype, concatenated); zeros for a key that has no state
/// yet (no update with momentum so far). Blocking. For MXNet's save_optimizer_states.
///
/// Errors: as braid_kv_pull; braid_invalid_argument for a key nobody initialised.
///
/// # Safety
/// `worker` is NULL or live; `keys` and `lens` valid for `nkeys` elements; `out` valid for
/// writing the sum of `lens` elements of `dtype` for the call.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_pull_state(
    worker: braid_kv_worker_t,
    keys: *const u64,
    lens: *const usize,
    nkeys: usize,
    out: *mut c_void,
    dtype: DatatypeArg,
) -> braid_status_t {
    boundary("braid_kv_pull_state", || {
        // SAFETY: caller contract.
        let w = unsafe { kv_worker_ref(worker) }?;
        let dtype = dtype_of(dtype)?;
        // SAFETY: caller contract.
        let k = unsafe { kv_keys(keys, lens, nkeys) }?;
        with_element!(dtype, kv_pull_state(&w.worker, &k, out))
    })
}

/// Replaces the server-side optimizer state of `nkeys` keys (laid out as braid_kv_push's
/// values; the keys' datatype and lengths) with `vals`, replicated like a push, blocking until
/// every part was stored and replicated. The servers use it from their next update. For
/// MXNet's load_optimizer_states.
///
/// Errors: as braid_kv_push; braid_invalid_argument for a key nobody initialised or a length
/// or datatype that is not the key's.
///
/// # Safety
/// `worker` is NULL or live; `keys` and `lens` valid for `nkeys` elements; `vals` valid for
/// reading the sum of `lens` elements of `dtype` for the call.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_push_state(
    worker: braid_kv_worker_t,
    keys: *const u64,
    lens: *const usize,
    nkeys: usize,
    vals: *const c_void,
    dtype: DatatypeArg,
) -> braid_status_t {
    boundary("braid_kv_push_state", || {
        // SAFETY: caller contract.
        let w = unsafe { kv_worker_ref(worker) }?;
        let dtype = dtype_of(dtype)?;
        // SAFETY: caller contract.
        let k = unsafe { kv_keys(keys, lens, nkeys) }?;
        with_element!(dtype, kv_push_state(&w.worker, &k, vals))
    })
}

/// Stops a worker and frees it (it leaves the group). Wait for or free its requests first:
/// operations still in flight afterwards fail, possibly only after BRAID_TIMEOUT. NULL is a
/// no-op returning braid_success. The handle is invalid afterwards.
///
/// # Safety
/// `worker` is NULL or a live worker not used by any other thread.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_worker_destroy(worker: braid_kv_worker_t) -> braid_status_t {
    boundary("braid_kv_worker_destroy", || {
        if !worker.is_null() {
            // SAFETY: `worker` came from Box::into_raw in braid_kv_worker_start and is freed
            // once (caller contract).
            drop(unsafe { Box::from_raw(worker) });
        }
        Ok(())
    })
}

fn kv_init<T: Element>(w: &KvWorker, k: &KvKeys<'_>, vals: *const c_void) -> CResult {
    let staged = staged_in::<T>(vals, k.total)?;
    let vals = staged.as_ref().map_or(vals, |v| v.as_ptr().cast());
    // SAFETY: `vals` is NULL or valid for `total` elements for the call (contract of
    // braid_kv_init).
    let v = unsafe { c_slice(vals.cast::<T>(), k.total, "vals") }?;
    w.init(k.keys, k.lens, v)?;
    Ok(())
}

/// Creates `nkeys` keys with initial values, blocking until every server holding a part
/// answered. Key `keys[i]` holds `lens[i]` elements of `datatype`; the values are concatenated
/// in `vals` (sum of `lens` elements). The first init of a key wins; later inits (other
/// workers) must agree on its length and datatype, else braid_invalid_argument. Every key must
/// be initialised (by some worker) before it is pushed. `keys` and `lens` may be NULL when
/// `nkeys` is 0, `vals` when the lengths sum to 0. Every datatype is accepted, float16 and
/// bfloat16 included (16-bit patterns; the servers sum them and run the sgd rule in float32 and
/// round back).
///
/// Errors: braid_invalid_argument (NULL or misaligned arrays, bad datatype, lengths that
/// contradict what this worker saw before, a server's refusal), braid_timeout (no answer within
/// BRAID_TIMEOUT).
///
/// # Safety
/// `worker` is NULL or live; `keys` and `lens` valid for `nkeys` elements and `vals` for the
/// sum of `lens` elements of `datatype`, for the duration of the call.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_init(
    worker: braid_kv_worker_t,
    keys: *const u64,
    lens: *const usize,
    nkeys: usize,
    vals: *const c_void,
    datatype: DatatypeArg,
) -> braid_status_t {
    boundary("braid_kv_init", || {
        // SAFETY: caller contract.
        let w = unsafe { kv_worker_ref(worker) }?;
        let dtype = dtype_of(datatype)?;
        // SAFETY: caller contract.
        let k = unsafe { kv_keys(keys, lens, nkeys) }?;
        with_element!(dtype, kv_init(&w.worker, &k, vals))
    })
}

/// Stores a new push/pull request in `*req` (checked non-NULL by the caller).
///
/// # Safety
/// `req` is valid for a write.
unsafe fn store_kv_request(req: *mut braid_kv_request_t, p: Box<dyn KvPending>) {
    let r = Box::into_raw(Box::new(braid_kv_request {
        pending: Some(p),
        result: None,
    }));
    // SAFETY: the caller checked `req` and guarantees it is valid for a write.
    unsafe { req.write(r) };
}

fn kv_push<T: Element>(
    w: &KvWorker,
    k: &KvKeys<'_>,
    vals: *const c_void,
    prio: c_int,
) -> CResult<Box<dyn KvPending>> {
    let staged = staged_in::<T>(vals, k.total)?;
    let vals = staged.as_ref().map_or(vals, |v| v.as_ptr().cast());
    // SAFETY: `vals` is NULL or valid for `total` elements for the call (contract of
    // braid_kv_push).
    let v = unsafe { c_slice(vals.cast::<T>(), k.total, "vals") }?;
    let h = w.push(k.keys, k.lens, v, prio)?;
    Ok(Box::new(PushPending(h)))
}

/// The start of a non-blocking push/pull call: `*req` cleared (it stays NULL on failure), the
/// worker, datatype and keys checked, `start` run and its operation stored in a new request at
/// `*req`.
///
/// # Safety
/// `worker` is NULL or live; `keys` and `lens` valid for `nkeys` elements for the call; `req`
/// NULL or valid for a write; what `start` reads, as its call's contract says.
unsafe fn kv_start(
    worker: braid_kv_worker_t,
    keys: *const u64,
    lens: *const usize,
    nkeys: usize,
    datatype: DatatypeArg,
    req: *mut braid_kv_request_t,
    start: impl FnOnce(&KvWorker, &KvKeys<'_>, DataType) -> CResult<Box<dyn KvPending>>,
) -> CResult<()> {
    // SAFETY: caller contract.
    unsafe { put(req, "req", std::ptr::null_mut()) }?;
    // SAFETY: caller contract.
    let w = unsafe { kv_worker_ref(worker) }?;
    let dtype = dtype_of(datatype)?;
    // SAFETY: caller contract.
    let k = unsafe { kv_keys(keys, lens, nkeys) }?;
    let p = start(&w.worker, &k, dtype)?;
    // SAFETY: `req` checked non-NULL above; caller contract.
    unsafe { store_kv_request(req, p) };
    Ok(())
}

/// A push sent from `vals` itself (braid_kv_push_nocopy); device memory as kv_push (staged).
fn kv_push_lent<T: Element>(
    w: &KvWorker,
    k: &KvKeys<'_>,
    vals: *const c_void,
    prio: c_int,
) -> CResult<Box<dyn KvPending>> {
    if matches!(
        braid_core::cuda::pointer_kind(vals),
        braid_core::cuda::PtrKind::Device(_)
    ) {
        return kv_push::<T>(w, k, vals, prio);
    }
    // SAFETY: `vals` is NULL or valid for `total` elements until the request completes
    // (contract of braid_kv_push_nocopy).
    let v = unsafe { c_slice(vals.cast::<T>(), k.total, "vals") }?;
    // SAFETY: unmodified until the request completed (contract): the request holds the
    // handle, which takes `vals` back when it is waited for or dropped.
    let h = unsafe { w.push_lent(k.keys, k.lens, v, prio) }?;
    Ok(Box::new(PushPending(h)))
}

fn kv_pull<T: Element>(
    w: &KvWorker,
    k: &KvKeys<'_>,
    push: Option<*const c_void>,
    out: *mut c_void,
    min_version: Option<u64>,
    prio: c_int,
) -> CResult<Box<dyn KvPending>> {
    let bytes = k
        .total
        .checked_mul(size_of::<T>())
        .filter(|b| *b <= isize::MAX as usize)
        .ok_or_else(|| Fail::arg("the lengths are too large"))?;
    if bytes > 0 && out.is_null() {
        return Err(Fail::arg("out is NULL"));
    }
    // Device memory: push from a host copy, pull into a host buffer copied to the device at
    // completion.
    let staged = match push {
        Some(vals) => staged_in::<T>(vals, k.total)?,
        None => None,
    };
    let push = match (&staged, push) {
        (Some(v), Some(_)) => Some(v.as_ptr().cast::<c_void>()),
        (_, p) => p,
    };
    let device_out = bytes > 0
        && matches!(
            braid_core::cuda::pointer_kind(out.cast_const()),
            braid_core::cuda::PtrKind::Device(_)
        );
    if device_out {
        let mut host = vec![T::default(); k.total];
        let inner = kv_pull::<T>(w, k, push, host.as_mut_ptr().cast(), min_version, prio)?;
        return Ok(Box::new(DevicePull {
            inner,
            host,
            dev: out as braid_core::cuda::DevPtr,
        }));
    }
    let out = out.cast::<T>();
    let handle = match push {
        Some(vals) => {
            // SAFETY: `vals` is NULL or valid for `total` elements for the call (contract of
            // braid_kv_push_pull).
            let v = unsafe { c_slice(vals.cast::<T>(), k.total, "vals") }?;
            // SAFETY: `out` is valid for `total` elements until the request completes or is
            // freed (contract of braid_kv_push_pull); freeing it forgets the operation first.
            unsafe { w.push_pull_raw(k.keys, k.lens, v, out, prio) }?
        }
        // SAFETY: as above (contract of braid_kv_pull).
        None => unsafe { w.pull_raw::<T>(k.keys, k.lens, out, min_version, prio) }?,
    };
    Ok(Box::new(PullPending(handle)))
}

/// Pushes gradients for `nkeys` keys (arrays as braid_kv_init; every key initialised before)
/// with priority `prio` (higher is sent first when queues build up) and writes a request to
/// `*req` (NULL on failure). Servers aggregate per BRAID_PS_MODE and apply BRAID_PS_RULE (or
/// the rule set with braid_kv_set_rule, or the server's callback). `vals` is copied before the call returns (it may be reused at once).
/// `vals` may be CUDA device memory (braid_kv_init, braid_kv_push_pull likewise): it is staged
/// through host memory after the device's pending work (cuCtxSynchronize).
/// The request completes when every part was recorded and replicated; braid_kv_wait writes
/// version 0 for a push.
///
/// Errors: as braid_kv_init, e.g. braid_invalid_argument naming the key when a length or
/// datatype differs from the key's; a server's refusal is reported by braid_kv_wait.
///
/// # Safety
/// `worker` is NULL or live; `keys`, `lens` and `vals` as for braid_kv_init; `req` is NULL or
/// valid for a write.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_push(
    worker: braid_kv_worker_t,
    keys: *const u64,
    lens: *const usize,
    nkeys: usize,
    vals: *const c_void,
    datatype: DatatypeArg,
    prio: c_int,
    req: *mut braid_kv_request_t,
) -> braid_status_t {
    boundary("braid_kv_push", || {
        // SAFETY: caller contract.
        unsafe {
            kv_start(worker, keys, lens, nkeys, datatype, req, |w, k, dt| {
                with_element!(dt, kv_push(w, k, vals, prio))
            })
        }
    })
}

/// As braid_kv_push, without copying `vals`: the values are sent from `vals` itself (64 KiB or
/// more; smaller ones are copied into the requests), so the call returns at once for any size
/// (as MPI_Isend, the caller keeps the buffer). CUDA device memory is copied first, as
/// braid_kv_push does. braid_kv_wait, braid_kv_test reporting done, and
/// braid_kv_request_free return only once nothing reads `vals` any more (a connection that
/// still holds it a second after the push failed, its server not reading, is closed).
///
/// Errors: as braid_kv_push.
///
/// # Safety
/// As braid_kv_push, and `vals` stays valid and UNMODIFIED until the request completes
/// (braid_kv_wait, braid_kv_test reporting done, or braid_kv_request_free): changing it before
/// then changes what the servers receive.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_push_nocopy(
    worker: braid_kv_worker_t,
    keys: *const u64,
    lens: *const usize,
    nkeys: usize,
    vals: *const c_void,
    datatype: DatatypeArg,
    prio: c_int,
    req: *mut braid_kv_request_t,
) -> braid_status_t {
    boundary("braid_kv_push_nocopy", || {
        // SAFETY: caller contract.
        unsafe {
            kv_start(worker, keys, lens, nkeys, datatype, req, |w, k, dt| {
                with_element!(dt, kv_push_lent(w, k, vals, prio))
            })
        }
    })
}

/// Pulls `nkeys` keys (arrays as braid_kv_init) into `out` (the sum of `lens` elements of
/// `datatype`, concatenated in key order) and writes a request to `*req` (NULL on failure).
/// `min_version` >= 0: the values of a version at least that (waits for it); -1: the default:
/// sync and bounded mode: the round this worker last pushed to (a push followed by a pull
/// returns that round's aggregate); async mode: the latest. The values are in `out` when
/// braid_kv_wait returns (or braid_kv_test reports done; host memory is written as the servers
/// answer, 64 KiB or more straight from the socket with no intermediate copy, and nothing
/// writes to it any more then; `out` may be CUDA device memory: braid pulls into host memory
/// and copies to the device then); braid_kv_wait reports the
/// smallest version over the parts read. Pulling a key nobody initialised waits for it until
/// BRAID_TIMEOUT.
///
/// Errors: as braid_kv_init; braid_invalid_argument when `min_version` < -1.
///
/// # Safety
/// `worker` is NULL or live; `keys` and `lens` valid for `nkeys` elements for the call; `out`
/// valid for writing the sum of `lens` elements of `datatype` and untouched until the request
/// completes (braid_kv_wait, braid_kv_test reporting done, or braid_kv_request_free); `req`
/// is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_pull(
    worker: braid_kv_worker_t,
    keys: *const u64,
    lens: *const usize,
    nkeys: usize,
    out: *mut c_void,
    datatype: DatatypeArg,
    min_version: i64,
    prio: c_int,
    req: *mut braid_kv_request_t,
) -> braid_status_t {
    boundary("braid_kv_pull", || {
        // SAFETY: caller contract.
        unsafe { put(req, "req", std::ptr::null_mut()) }?;
        // SAFETY: caller contract.
        let w = unsafe { kv_worker_ref(worker) }?;
        let dtype = dtype_of(datatype)?;
        let min = match min_version {
            -1 => None,
            v => Some(u64::try_from(v).map_err(|_| {
                Fail::arg(format!(
                    "min_version is {v}: expected a version >= 0 or -1 (default)"
                ))
            })?),
        };
        // SAFETY: caller contract.
        let k = unsafe { kv_keys(keys, lens, nkeys) }?;
        let p = with_element!(dtype, kv_pull(&w.worker, &k, None, out, min, prio))?;
        // SAFETY: `req` checked non-NULL above; caller contract.
        unsafe { store_kv_request(req, p) };
        Ok(())
    })
}

/// Pushes `vals` and pulls the same keys into `out` in one round trip (arrays as
/// braid_kv_init); writes a request to `*req` (NULL on failure). Sync mode: the result is the
/// aggregate of the round this push took part in; async: the value after it. `vals` is copied
/// before the call returns; `out` is written when the request completes (in place, out ==
/// vals, is allowed). braid_kv_wait reports the version pulled.
///
/// Errors: as braid_kv_push.
///
/// # Safety
/// As braid_kv_push for `vals` and braid_kv_pull for `out`.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_push_pull(
    worker: braid_kv_worker_t,
    keys: *const u64,
    lens: *const usize,
    nkeys: usize,
    vals: *const c_void,
    out: *mut c_void,
    datatype: DatatypeArg,
    prio: c_int,
    req: *mut braid_kv_request_t,
) -> braid_status_t {
    boundary("braid_kv_push_pull", || {
        // SAFETY: caller contract.
        unsafe {
            kv_start(worker, keys, lens, nkeys, datatype, req, |w, k, dt| {
                with_element!(dt, kv_pull(w, k, Some(vals), out, None, prio))
            })
        }
    })
}

/// As braid_kv_push_pull, without copying `vals`: the values are sent from `vals` itself (64
/// KiB or more; smaller ones are copied into the requests) and the answers received into
/// `out` as braid_kv_pull receives them, so the call returns at once for any size (as
/// MPI_Isend, the caller keeps the buffer). Where `vals` and `out` overlap (in place), or
/// either is CUDA device memory, the call copies `vals` first, as braid_kv_push_pull does.
/// braid_kv_wait, braid_kv_test reporting done, and braid_kv_request_free return only once
/// nothing reads `vals` or writes `out` any more (a connection that still holds them a second
/// after the operation failed, its server not reading or sending, is closed).
///
/// Errors: as braid_kv_push_pull.
///
/// # Safety
/// As braid_kv_push_pull, and `vals` stays valid and UNMODIFIED until the request completes
/// (braid_kv_wait, braid_kv_test reporting done, or braid_kv_request_free): changing it before
/// then changes what the servers receive.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_push_pull_nocopy(
    worker: braid_kv_worker_t,
    keys: *const u64,
    lens: *const usize,
    nkeys: usize,
    vals: *const c_void,
    out: *mut c_void,
    datatype: DatatypeArg,
    prio: c_int,
    req: *mut braid_kv_request_t,
) -> braid_status_t {
    boundary("braid_kv_push_pull_nocopy", || {
        // SAFETY: caller contract.
        unsafe {
            kv_start(worker, keys, lens, nkeys, datatype, req, |w, k, dt| {
                with_element!(dt, kv_push_pull_lent(w, k, vals, out, prio))
            })
        }
    })
}

/// A push_pull started without copies ([`braid_kv_push_pull_wait`], one key of
/// [`braid_kv_push_pull_waitv`], [`braid_kv_push_pull_nocopy`]): sent from `vals` and
/// received into `out` when both are host memory that does not overlap; else as
/// braid_kv_push_pull (vals copied first, device memory staged).
fn kv_push_pull_lent<T: Element>(
    w: &KvWorker,
    k: &KvKeys<'_>,
    vals: *const c_void,
    out: *mut c_void,
    prio: c_int,
) -> CResult<Box<dyn KvPending>> {
    let bytes = k
        .total
        .checked_mul(size_of::<T>())
        .filter(|b| *b <= isize::MAX as usize)
        .ok_or_else(|| Fail::arg("the lengths are too large"))?;
    let (v0, o0) = (vals as usize, out as usize);
    let apart = v0.saturating_add(bytes) <= o0 || o0.saturating_add(bytes) <= v0;
    let host = |p: *const c_void| {
        !matches!(
            braid_core::cuda::pointer_kind(p),
            braid_core::cuda::PtrKind::Device(_)
        )
    };
    if bytes == 0 || !apart || !host(vals) || !host(out.cast_const()) {
        return kv_pull::<T>(w, k, Some(vals), out, None, prio);
    }
    // SAFETY: `vals` is valid for `total` elements until the handle was waited for or dropped
    // (contract: within the call for the waiting forms, until the request completes for
    // braid_kv_push_pull_nocopy).
    let v = unsafe { c_slice(vals.cast::<T>(), k.total, "vals") }?;
    // Checked as the plain pull checks it (not NULL, size).
    // SAFETY: valid for writes of `total` elements as long (contract).
    let o = unsafe { c_slice_mut(out.cast::<T>(), k.total, "out") }?;
    // SAFETY: both are used by nobody else until the handle was waited for or dropped
    // (contract, as above); they do not overlap (checked above).
    let h = unsafe { w.push_pull_lent(k.keys, k.lens, v, o.as_mut_ptr(), prio) }?;
    Ok(Box::new(PullPending(h)))
}

/// Refuses a braid_kv_push_pull_waitv whose keys' memory is shared between keys: an output
/// that overlaps another key's output or values (the keys are in flight together, so one
/// key's answer would be written where another key's is, or where its values are still being
/// sent from). A key's output may overlap its own values (in place). `bytes[i]` is key i's
/// size; empty keys take no memory.
fn check_keys_apart(vals: &[*const c_void], outs: &[*mut c_void], bytes: &[usize]) -> CResult<()> {
    let span = |p: usize, i: usize| (p, p.saturating_add(bytes[i]));
    // Outputs by address; each must end before the next starts.
    let mut by_addr: Vec<(usize, usize, usize)> = (0..outs.len())
        .filter(|&i| bytes[i] > 0)
        .map(|i| {
            let (a, b) = span(outs[i] as usize, i);
            (a, b, i)
        })
        .collect();
    by_addr.sort_unstable();
    for w in by_addr.windows(2) {
        if w[1].0 < w[0].1 {
            let (i, j) = (w[0].2.min(w[1].2), w[0].2.max(w[1].2));
            return Err(Fail::arg(format!(
                "outs[{j}] overlaps outs[{i}]: every key needs an output of its own"
            )));
        }
    }
    // Values: the outputs they meet (the outputs do not overlap each other, so at most the
    // ones from the first that ends after the values start) must be their own key's.
    for (i, &v) in vals.iter().enumerate() {
        if bytes[i] == 0 {
            continue;
        }
        let (a, b) = span(v as usize, i);
        let first = by_addr.partition_point(|o| o.1 <= a);
        if let Some(o) = by_addr[first..]
            .iter()
            .take_while(|o| o.0 < b)
            .find(|o| o.2 != i)
        {
            return Err(Fail::arg(format!(
                "outs[{}] overlaps vals[{i}]: a key's output may overlap only its own values",
                o.2
            )));
        }
    }
    Ok(())
}

/// Waits for every started operation (all in flight), then returns `refused` if given, else
/// the first error, else the smallest version.
fn complete_each(started: Vec<Box<dyn KvPending>>, refused: Option<Fail>) -> CResult<u64> {
    let mut first = refused;
    let mut version: Option<u64> = None;
    for p in started {
        match p.complete() {
            Ok(v) => version = Some(version.map_or(v, |m| m.min(v))),
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    match first {
        Some(e) => Err(e),
        None => Ok(version.unwrap_or(0)),
    }
}

/// Pushes `vals` and pulls the same keys into `out` (arrays as braid_kv_init) and waits for
/// the answer: braid_kv_push_pull, braid_kv_wait and braid_kv_request_free in one call, which
/// copies neither buffer: the values are sent from `vals` itself and the answers received
/// straight into `out` (64 KiB or more; braid_kv_push_pull copies `vals` before it returns).
/// Both are used only during the call, whatever its outcome. `*version` (when `version` is not
/// NULL) receives the version pulled. `out` may be `vals` or overlap it (in place), or either
/// may be CUDA device memory: then it runs as braid_kv_push_pull and braid_kv_wait do
/// (`vals` copied or staged first).
///
/// Errors: as braid_kv_push_pull and braid_kv_wait.
///
/// # Safety
/// `worker` is NULL or live; `keys` and `lens` valid for `nkeys` elements, `vals` valid for
/// reading and `out` for writing the sum of `lens` elements of `datatype` for the call, and
/// `out` not used by anyone else meanwhile; `version` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_push_pull_wait(
    worker: braid_kv_worker_t,
    keys: *const u64,
    lens: *const usize,
    nkeys: usize,
    vals: *const c_void,
    out: *mut c_void,
    datatype: DatatypeArg,
    prio: c_int,
    version: *mut u64,
) -> braid_status_t {
    boundary("braid_kv_push_pull_wait", || {
        // SAFETY: caller contract.
        let w = unsafe { kv_worker_ref(worker) }?;
        let dtype = dtype_of(datatype)?;
        // SAFETY: caller contract.
        let k = unsafe { kv_keys(keys, lens, nkeys) }?;
        let v =
            with_element!(dtype, kv_push_pull_lent(&w.worker, &k, vals, out, prio))?.complete()?;
        if !version.is_null() {
            // SAFETY: non-NULL; caller contract.
            unsafe { version.write(v) };
        }
        Ok(())
    })
}

/// braid_kv_push_pull_wait of `nkeys` keys, each with its own arrays: `vals[i]` (`lens[i]`
/// elements of `datatype`) is pushed to `keys[i]` and the key's value pulled into `outs[i]`.
/// Every key's push and pull are sent before the call waits for any answer (the keys are in
/// flight together), and nothing is copied for a key whose `vals[i]` and `outs[i]` are host
/// memory that does not overlap (as braid_kv_push_pull_wait; `outs[i]` may be `vals[i]`,
/// in place, which copies `vals[i]` first). `*version` (when `version` is not NULL) receives
/// the smallest version pulled over the keys. The arrays are used only during the call,
/// whatever its outcome.
///
/// Errors: as braid_kv_push_pull_wait. When a key's request cannot be sent (e.g. its length
/// differs from the key's), the keys before it were sent and are waited for (their values
/// are in their outputs), the rest are not sent, and that error is returned; else the first
/// failed key's error, once every key's operation ended. Before anything is sent:
/// braid_invalid_argument for `vals` or `outs` NULL (with `nkeys` > 0), and for an output
/// that overlaps another key's output or values (naming both; a key's output may overlap its
/// own values).
///
/// # Safety
/// `worker` is NULL or live; `keys`, `lens`, `vals` and `outs` valid for `nkeys` elements;
/// `vals[i]` valid for reading and `outs[i]` for writing `lens[i]` elements of `datatype`
/// for the call, and the outputs not used by anyone else meanwhile; `version` is NULL or
/// valid for a write.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_push_pull_waitv(
    worker: braid_kv_worker_t,
    keys: *const u64,
    lens: *const usize,
    nkeys: usize,
    vals: *const *const c_void,
    outs: *const *mut c_void,
    datatype: DatatypeArg,
    prio: c_int,
    version: *mut u64,
) -> braid_status_t {
    boundary("braid_kv_push_pull_waitv", || {
        // SAFETY: caller contract.
        let w = unsafe { kv_worker_ref(worker) }?;
        let dtype = dtype_of(datatype)?;
        // SAFETY: caller contract.
        let k = unsafe { kv_keys(keys, lens, nkeys) }?;
        // SAFETY: caller contract.
        let vals = unsafe { c_slice(vals, nkeys, "vals") }?;
        // SAFETY: caller contract.
        let outs = unsafe { c_slice(outs, nkeys, "outs") }?;
        let size = dtype.size();
        let bytes = k
            .lens
            .iter()
            .map(|n| n.checked_mul(size).filter(|b| *b <= isize::MAX as usize))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| Fail::arg("the lengths are too large"))?;
        check_keys_apart(vals, outs, &bytes)?;
        let mut started = Vec::with_capacity(nkeys);
        let mut refused = None;
        for i in 0..nkeys {
            let one = KvKeys {
                keys: &k.keys[i..=i],
                lens: &k.lens[i..=i],
                total: k.lens[i],
            };
            let p = with_element!(
                dtype,
                kv_push_pull_lent(&w.worker, &one, vals[i], outs[i], prio)
            );
            match p {
                Ok(p) => started.push(p),
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        let v = complete_each(started, refused)?;
        if !version.is_null() {
            // SAFETY: non-NULL; caller contract.
            unsafe { version.write(v) };
        }
        Ok(())
    })
}

/// Waits for a push/pull request (if not yet done; not blocking when `block` is false) and
/// returns its outcome.
fn kv_finish(r: &mut braid_kv_request, block: bool) -> Option<CResult<u64>> {
    if r.result.is_none() {
        let p = r.pending.take()?;
        if !block && !p.ready() {
            r.pending = Some(p);
            return None;
        }
        r.result = Some(p.complete());
    }
    r.result.clone()
}

/// The push/pull request behind a handle.
///
/// # Safety
/// `req` is NULL or a request not yet freed, used by this thread only.
unsafe fn kv_req_mut<'a>(req: braid_kv_request_t) -> CResult<&'a mut braid_kv_request> {
    // SAFETY: per contract, a non-NULL `req` came from Box::into_raw in store_kv_request and
    // has not been freed; requests must not be used from two threads at once (documented).
    unsafe { req.as_mut() }.ok_or_else(|| Fail::arg("req is NULL"))
}

/// Blocks until a push/pull request completes (bounded by BRAID_TIMEOUT) and returns its
/// status; a pull's values are in its `out` buffer afterwards. `*version` (when `version` is
/// not NULL) receives the version pulled (the smallest over the parts read; 0 for a push). May
/// be called again (same status and version). The request still has to be freed with
/// braid_kv_request_free.
///
/// Errors: a server's refusal (braid_invalid_argument: wrong length or datatype, a push to a
/// key never initialised), braid_timeout (no answer within BRAID_TIMEOUT).
///
/// # Safety
/// `req` is NULL or a live request; `version` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_wait(
    req: braid_kv_request_t,
    version: *mut u64,
) -> braid_status_t {
    boundary("braid_kv_wait", || {
        // SAFETY: caller contract.
        let r = unsafe { kv_req_mut(req) }?;
        let v =
            kv_finish(r, true).unwrap_or_else(|| Err(Fail::usage("request holds no operation")))?;
        if !version.is_null() {
            // SAFETY: non-NULL; caller contract.
            unsafe { version.write(v) };
        }
        Ok(())
    })
}

/// Checks a push/pull request without blocking: `*done` = 1 and the operation's status when it
/// has completed (a pull's values are then in `out`), `*done` = 0 and braid_success while it
/// runs. May be called again after completion (same status).
///
/// # Safety
/// `req` is NULL or a live request; `done` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_test(
    req: braid_kv_request_t,
    done: *mut c_int,
) -> braid_status_t {
    boundary("braid_kv_test", || {
        if done.is_null() {
            return Err(Fail::arg("done is NULL"));
        }
        // SAFETY: caller contract.
        let r = unsafe { kv_req_mut(req) }?;
        let out = kv_finish(r, false);
        // SAFETY: checked non-NULL; caller contract.
        unsafe { done.write(c_int::from(out.is_some())) };
        out.map_or(Ok(()), |o| o.map(|_| ()))
    })
}

/// Frees a push/pull request. An incomplete operation is waited for first (a pull's values are
/// written to `out`), and if its failure had not been reported by braid_kv_test/braid_kv_wait,
/// that status is returned. NULL is a no-op returning braid_success. The handle is invalid
/// afterwards.
///
/// # Safety
/// `req` is NULL or a live request not used by any other thread.
#[no_mangle]
pub unsafe extern "C" fn braid_kv_request_free(req: braid_kv_request_t) -> braid_status_t {
    boundary("braid_kv_request_free", || {
        if req.is_null() {
            return Ok(());
        }
        // SAFETY: `req` came from Box::into_raw in store_kv_request and is freed once
        // (contract).
        let mut r = unsafe { Box::from_raw(req) };
        let reported = r.result.is_some();
        let out = kv_finish(&mut r, true);
        drop(r);
        match out {
            Some(Err(f)) if !reported => Err(f),
            _ => Ok(()),
        }
    })
}
