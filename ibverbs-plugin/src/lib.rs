//! `libbraid_ibverbs.so`: braid's verbs provider as a plugin.
//!
//! libbraid loads this library with `dlopen` when the ib transport is asked for real verbs
//! (see `braid_transport::ib::verbs`), so that libbraid itself has no run-time dependency on
//! libibverbs. The plugin exports [`braid_ibverbs_plugin_v1`], which returns the static
//! function table of `braid_transport::ib::verbs_abi` (the same source file, compiled in here).
//!
//! It is a thin mapping onto libibverbs through `ibverbs-sys` (and the `ibverbs` crate for
//! device enumeration). The data-path verbs `ibv_post_send`, `ibv_post_recv`, `ibv_poll_cq` and
//! `ibv_req_notify_cq` are `static inline` in `<infiniband/verbs.h>`; they are called through
//! the context's `ops` table as the header (and the `ibverbs` crate) does.
//!
//! Every exported function catches panics (none is expected) and reports failures as a
//! status code plus a thread-local text `"<verbs call>: <errno text>"`.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;

use ibverbs_sys as ffi;

/// The plugin ABI (the source file of `braid_transport::ib::verbs_abi`).
#[allow(dead_code)]
#[path = "../../transport/src/ib/verbs_abi.rs"]
pub mod abi;

use abi::{
    ConnectParamsV1, MrV1, PluginV1, PortAttrV1, QpAddrV1, SendWrV1, SgeV1, WcV1, ABI_VERSION,
};

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

/// A failure: the status code returned across the ABI and its text.
struct Fail {
    code: c_int,
    msg: String,
}

type Res = Result<(), Fail>;

/// A failure of `op` with an errno value.
fn errno_fail(op: &str, errno: c_int) -> Fail {
    let text = io::Error::from_raw_os_error(errno);
    Fail {
        code: if errno > 0 { errno } else { libc::EIO },
        msg: format!("{op}: {text}"),
    }
}

/// A failure of `op` from the calling thread's `errno`.
fn os_fail(op: &str) -> Fail {
    let e = io::Error::last_os_error();
    let code = e.raw_os_error().filter(|c| *c > 0).unwrap_or(libc::EIO);
    Fail {
        code,
        msg: format!("{op}: {e}"),
    }
}

/// A failure with a given code and text.
fn fail(code: c_int, msg: impl Into<String>) -> Fail {
    Fail {
        code,
        msg: msg.into(),
    }
}

/// Runs `f` with panics caught; records the failure text; returns the ABI status.
fn guard(op: &str, f: impl FnOnce() -> Res) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            set_error(e.msg);
            e.code.max(1)
        }
        Err(_) => {
            set_error(format!("{op}: panic inside libbraid_ibverbs"));
            libc::EIO
        }
    }
}

fn set_error(msg: String) {
    // try_with: during thread teardown the slot may be gone; the error is then lost, not a panic.
    let _ = LAST_ERROR.try_with(|e| {
        if let Ok(mut e) = e.try_borrow_mut() {
            *e = msg;
        }
    });
}

/// A non-null handle pointer, or EINVAL.
fn non_null<T>(p: *mut c_void, op: &str) -> Result<*mut T, Fail> {
    if p.is_null() {
        Err(fail(libc::EINVAL, format!("{op}: null handle")))
    } else {
        Ok(p.cast())
    }
}

/// An opened device port with its protection domain.
struct Ctx {
    ctx: *mut ffi::ibv_context,
    pd: *mut ffi::ibv_pd,
    port: u8,
    active_mtu: ffi::ibv_mtu,
    attr: PortAttrV1,
}

/// A completion queue with its completion channel.
struct Cq {
    cq: *mut ffi::ibv_cq,
    channel: *mut ffi::ibv_comp_channel,
}

/// A reliable-connected queue pair.
struct Qp {
    qp: *mut ffi::ibv_qp,
    port: u8,
    active_mtu: ffi::ibv_mtu,
    link_layer: u8,
    psn: u32,
}

// ---------------------------------------------------------------------------------------------
// devices

unsafe extern "C" fn list_devices(buf: *mut c_char, cap: usize, count: *mut u32) -> c_int {
    guard("list_devices", || {
        if count.is_null() || (buf.is_null() && cap > 0) {
            return Err(fail(libc::EINVAL, "list_devices: null argument"));
        }
        let list = ibverbs::devices().map_err(|e| {
            fail(
                e.raw_os_error().filter(|c| *c > 0).unwrap_or(libc::EIO),
                format!("ibv_get_device_list: {e}"),
            )
        })?;
        let mut n = 0u32;
        let mut at = 0usize;
        for dev in list.iter() {
            let Some(name) = dev.name() else { continue };
            let bytes = name.to_bytes_with_nul();
            let end = at.saturating_add(bytes.len());
            if end > cap {
                break;
            }
            // SAFETY: buf holds cap bytes (caller contract) and at..end lies within them.
            unsafe { ptr::copy_nonoverlapping(bytes.as_ptr().cast(), buf.add(at), bytes.len()) };
            at = end;
            n += 1;
        }
        // SAFETY: count is non-null (checked) and points to a u32 (caller contract).
        unsafe { *count = n };
        Ok(())
    })
}

/// Link speed in Mbit/s from `active_speed` / `active_width` (as `ibv_devinfo` reads them).
fn speed_mbps(active_speed: u8, active_width: u8) -> u64 {
    let lane: u64 = match active_speed {
        1 => 2_500,
        2 => 5_000,
        4 | 8 => 10_000,
        16 => 14_000,
        32 => 25_000,
        64 => 50_000,
        128 => 100_000,
        _ => 0,
    };
    let lanes: u64 = match active_width {
        1 => 1,
        2 => 4,
        4 => 8,
        8 => 12,
        16 => 2,
        _ => 0,
    };
    lane * lanes
}

fn mtu_bytes(m: ffi::ibv_mtu) -> u32 {
    match m {
        1..=5 => 128u32 << m,
        _ => 0,
    }
}

fn mtu_enum(bytes: u32) -> Option<ffi::ibv_mtu> {
    match bytes {
        256 => Some(ffi::IBV_MTU_256),
        512 => Some(ffi::IBV_MTU_512),
        1024 => Some(ffi::IBV_MTU_1024),
        2048 => Some(ffi::IBV_MTU_2048),
        4096 => Some(ffi::IBV_MTU_4096),
        _ => None,
    }
}

fn port_state_name(s: u32) -> &'static str {
    match s {
        0 => "NOP",
        1 => "DOWN",
        2 => "INIT",
        3 => "ARMED",
        4 => "ACTIVE",
        5 => "ACTIVE_DEFER",
        _ => "unknown",
    }
}

/// Opens the device (or the first one), returning the context and its name.
fn open_device(want: Option<&CStr>) -> Result<(*mut ffi::ibv_context, String), Fail> {
    let mut n: c_int = 0;
    // SAFETY: n is a valid out-pointer; the list is freed below.
    let list = unsafe { ffi::ibv_get_device_list(&mut n) };
    if list.is_null() {
        let e = io::Error::last_os_error();
        let code = e.raw_os_error().filter(|c| *c > 0).unwrap_or(libc::ENODEV);
        // ENOSYS: libibverbs found no kernel verbs interface (/sys/class/infiniband_verbs).
        let hint = if code == libc::ENOSYS {
            "; no kernel RDMA support: ib_uverbs not loaded"
        } else {
            ""
        };
        return Err(fail(
            code,
            format!("no RDMA devices found (ibv_get_device_list: {e}{hint})"),
        ));
    }
    let count = usize::try_from(n).unwrap_or(0);
    let mut names = Vec::with_capacity(count);
    let mut chosen = None;
    for i in 0..count {
        // SAFETY: the list holds n device pointers.
        let dev = unsafe { *list.add(i) };
        if dev.is_null() {
            continue;
        }
        // SAFETY: dev is a device of the live list; the name is a NUL-terminated string owned
        // by it, copied before the list is freed.
        let name_ptr = unsafe { ffi::ibv_get_device_name(dev) };
        if name_ptr.is_null() {
            continue;
        }
        // SAFETY: non-null NUL-terminated string (above).
        let name = unsafe { CStr::from_ptr(name_ptr) };
        let matches = match want {
            None => chosen.is_none(),
            Some(w) => w == name,
        };
        if matches && chosen.is_none() {
            chosen = Some((dev, name.to_string_lossy().into_owned()));
        }
        names.push(name.to_string_lossy().into_owned());
    }
    let result = match chosen {
        None if names.is_empty() => Err(fail(
            libc::ENODEV,
            "no RDMA devices found (ibv_get_device_list)",
        )),
        None => Err(fail(
            libc::ENODEV,
            format!(
                "RDMA device {} not found (ibv_get_device_list has: {})",
                want.map(|w| w.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                names.join(", ")
            ),
        )),
        Some((dev, name)) => {
            // SAFETY: dev belongs to the live list; an opened context stays valid after the
            // list is freed (verbs(3)).
            let ctx = unsafe { ffi::ibv_open_device(dev) };
            if ctx.is_null() {
                Err(os_fail(&format!("ibv_open_device({name})")))
            } else {
                Ok((ctx, name))
            }
        }
    };
    // SAFETY: list came from ibv_get_device_list and is freed once.
    unsafe { ffi::ibv_free_device_list(list) };
    result
}

unsafe extern "C" fn open(
    device: *const c_char,
    port: u8,
    gid_index: u8,
    out: *mut *mut c_void,
) -> c_int {
    guard("open", || {
        if out.is_null() {
            return Err(fail(libc::EINVAL, "open: null argument"));
        }
        let want = if device.is_null() {
            None
        } else {
            // SAFETY: non-null device is a NUL-terminated name (caller contract).
            Some(unsafe { CStr::from_ptr(device) })
        };
        let (ctx, name) = open_device(want)?;
        match open_port(ctx, &name, port, gid_index) {
            Ok(c) => {
                // SAFETY: out is non-null (checked) and writable (caller contract).
                unsafe { *out = Box::into_raw(Box::new(c)).cast() };
                Ok(())
            }
            Err(e) => {
                // SAFETY: ctx was opened above and nothing else uses it.
                unsafe { ffi::ibv_close_device(ctx) };
                Err(e)
            }
        }
    })
}

/// PD, port and GID of an opened context (the context is closed by the caller on error).
fn open_port(ctx: *mut ffi::ibv_context, name: &str, port: u8, gid_index: u8) -> Result<Ctx, Fail> {
    let mut pattr = ffi::ibv_port_attr::default();
    // SAFETY: ctx is an open context; pattr is a full (zeroed) ibv_port_attr, at least the
    // size of the compat struct the exported symbol fills.
    let rc =
        unsafe { ffi::ibv_query_port(ctx, port, (&mut pattr as *mut ffi::ibv_port_attr).cast()) };
    if rc != 0 {
        return Err(errno_fail(
            &format!("ibv_query_port({name}, port {port})"),
            rc,
        ));
    }
    if pattr.state != ffi::ibv_port_state::IBV_PORT_ACTIVE {
        return Err(fail(
            libc::ENETDOWN,
            format!(
                "ibv_query_port: port {port} of {name} is not active (state {})",
                port_state_name(pattr.state)
            ),
        ));
    }
    let mut gid = ffi::ibv_gid::default();
    // SAFETY: open context, valid out-pointer.
    let rc = unsafe { ffi::ibv_query_gid(ctx, port, c_int::from(gid_index), &mut gid) };
    if rc != 0 {
        return Err(os_fail(&format!(
            "ibv_query_gid({name}, port {port}, index {gid_index})"
        )));
    }
    // SAFETY: open context.
    let pd = unsafe { ffi::ibv_alloc_pd(ctx) };
    if pd.is_null() {
        return Err(os_fail(&format!("ibv_alloc_pd({name})")));
    }
    let link_layer = if u32::from(pattr.link_layer) == ffi::IBV_LINK_LAYER_ETHERNET {
        abi::LINK_LAYER_ETHERNET
    } else {
        abi::LINK_LAYER_INFINIBAND
    };
    let mut attr = PortAttrV1 {
        port,
        link_layer,
        lid: pattr.lid,
        state: pattr.state,
        mtu: mtu_bytes(pattr.active_mtu),
        // SAFETY: every bit pattern of the union is a valid [u8; 16].
        gid: unsafe { gid.raw },
        speed_mbps: speed_mbps(pattr.active_speed, pattr.active_width),
        ..PortAttrV1::default()
    };
    for (d, s) in attr.device.iter_mut().zip(name.bytes().take(63)) {
        *d = s as c_char;
    }
    Ok(Ctx {
        ctx,
        pd,
        port,
        active_mtu: pattr.active_mtu,
        attr,
    })
}

unsafe extern "C" fn close(ctx: *mut c_void) -> c_int {
    guard("close", || {
        let c: *mut Ctx = non_null(ctx, "close")?;
        // SAFETY: c came from Box::into_raw in open and is closed once (caller contract).
        let c = unsafe { Box::from_raw(c) };
        // SAFETY: the PD and context are live; every object created from them is gone
        // (caller contract; verbs refuses with EBUSY otherwise).
        let rc = unsafe { ffi::ibv_dealloc_pd(c.pd) };
        // SAFETY: as above.
        let rc2 = unsafe { ffi::ibv_close_device(c.ctx) };
        if rc != 0 {
            return Err(errno_fail("ibv_dealloc_pd", rc));
        }
        if rc2 != 0 {
            return Err(os_fail("ibv_close_device"));
        }
        Ok(())
    })
}

unsafe extern "C" fn port_attr(ctx: *mut c_void, out: *mut PortAttrV1) -> c_int {
    guard("port_attr", || {
        let c: *mut Ctx = non_null(ctx, "port_attr")?;
        if out.is_null() {
            return Err(fail(libc::EINVAL, "port_attr: null argument"));
        }
        // SAFETY: c is a live context handle; out is writable (caller contract).
        unsafe { *out = (*c).attr };
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// memory

fn mr_out(mr: *mut ffi::ibv_mr, out: *mut MrV1, addr: u64) {
    // SAFETY: mr is a region just registered; out is writable (checked non-null by callers).
    unsafe {
        *out = MrV1 {
            handle: mr as u64,
            addr,
            len: (*mr).length as u64,
            lkey: (*mr).lkey,
            rkey: (*mr).rkey,
        };
    }
}

unsafe extern "C" fn reg_mr(
    ctx: *mut c_void,
    addr: *mut c_void,
    len: usize,
    access: u32,
    out: *mut MrV1,
) -> c_int {
    guard("reg_mr", || {
        let c: *mut Ctx = non_null(ctx, "reg_mr")?;
        if out.is_null() {
            return Err(fail(libc::EINVAL, "reg_mr: null argument"));
        }
        let access = c_int::try_from(access)
            .map_err(|_| fail(libc::EINVAL, "ibv_reg_mr: bad access flags"))?;
        // SAFETY: live PD; the caller keeps the memory valid until dereg (nic::Nic::reg_mr).
        let mr = unsafe { ffi::ibv_reg_mr((*c).pd, addr, len, access) };
        if mr.is_null() {
            return Err(os_fail("ibv_reg_mr"));
        }
        mr_out(mr, out, addr as u64);
        Ok(())
    })
}

type RegDmabufFn =
    unsafe extern "C" fn(*mut ffi::ibv_pd, u64, usize, u64, c_int, c_int) -> *mut ffi::ibv_mr;

/// `ibv_reg_dmabuf_mr` from the loaded libibverbs (rdma-core >= 34), looked up at run time so
/// that the plugin still loads with an older libibverbs.
fn reg_dmabuf_fn() -> Option<RegDmabufFn> {
    // SAFETY: RTLD_NOLOAD only returns a handle when libibverbs is already loaded (it is: this
    // library links it); the handle is never closed (one reference leaked, harmless).
    let h = unsafe {
        libc::dlopen(
            c"libibverbs.so.1".as_ptr(),
            libc::RTLD_NOW | libc::RTLD_NOLOAD | libc::RTLD_LOCAL,
        )
    };
    if h.is_null() {
        return None;
    }
    // SAFETY: valid handle and NUL-terminated name.
    let f = unsafe { libc::dlsym(h, c"ibv_reg_dmabuf_mr".as_ptr()) };
    if f.is_null() {
        None
    } else {
        // SAFETY: the symbol is the function of <infiniband/verbs.h> with this signature.
        Some(unsafe { std::mem::transmute::<*mut c_void, RegDmabufFn>(f) })
    }
}

unsafe extern "C" fn reg_dmabuf_mr(
    ctx: *mut c_void,
    offset: u64,
    len: usize,
    iova: u64,
    fd: c_int,
    access: u32,
    out: *mut MrV1,
) -> c_int {
    guard("reg_dmabuf_mr", || {
        let c: *mut Ctx = non_null(ctx, "reg_dmabuf_mr")?;
        if out.is_null() {
            return Err(fail(libc::EINVAL, "reg_dmabuf_mr: null argument"));
        }
        let access = c_int::try_from(access)
            .map_err(|_| fail(libc::EINVAL, "ibv_reg_dmabuf_mr: bad access flags"))?;
        let f = reg_dmabuf_fn().ok_or_else(|| {
            fail(
                libc::EOPNOTSUPP,
                "ibv_reg_dmabuf_mr: not in this libibverbs (rdma-core >= 34 needed)",
            )
        })?;
        // SAFETY: live PD; fd and the range are the caller's dma-buf (checked by the kernel).
        let mr = unsafe { f((*c).pd, offset, len, iova, fd, access) };
        if mr.is_null() {
            return Err(os_fail("ibv_reg_dmabuf_mr"));
        }
        mr_out(mr, out, iova);
        Ok(())
    })
}

unsafe extern "C" fn dmabuf_supported(ctx: *mut c_void) -> c_int {
    let mut supported = 0;
    let rc = guard("dmabuf_supported", || {
        let c: *mut Ctx = non_null(ctx, "dmabuf_supported")?;
        let Some(f) = reg_dmabuf_fn() else {
            return Ok(());
        };
        // SAFETY: live PD; fd -1 makes the kernel fail the call (EBADF) before touching memory
        // when dma-buf is supported, and the provider fail it earlier (EOPNOTSUPP /
        // EPROTONOSUPPORT) when not: NCCL's probe.
        let mr = unsafe { f((*c).pd, 0, 0, 0, -1, 0) };
        if !mr.is_null() {
            // SAFETY: unexpected success: release what was registered.
            unsafe { ffi::ibv_dereg_mr(mr) };
            supported = 1;
            return Ok(());
        }
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        if errno != libc::EOPNOTSUPP && errno != libc::EPROTONOSUPPORT {
            supported = 1;
        }
        Ok(())
    });
    if rc == 0 {
        supported
    } else {
        0
    }
}

unsafe extern "C" fn dereg_mr(handle: u64) -> c_int {
    guard("dereg_mr", || {
        let mr = handle as usize as *mut ffi::ibv_mr;
        if mr.is_null() {
            return Err(fail(libc::EINVAL, "ibv_dereg_mr: null handle"));
        }
        // SAFETY: handle came from reg_mr / reg_dmabuf_mr and is deregistered once.
        let rc = unsafe { ffi::ibv_dereg_mr(mr) };
        if rc != 0 {
            return Err(errno_fail("ibv_dereg_mr", rc));
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// completion queues

unsafe extern "C" fn create_cq(
    ctx: *mut c_void,
    depth: u32,
    out: *mut *mut c_void,
    fd: *mut c_int,
) -> c_int {
    guard("create_cq", || {
        let c: *mut Ctx = non_null(ctx, "create_cq")?;
        if out.is_null() || fd.is_null() {
            return Err(fail(libc::EINVAL, "create_cq: null argument"));
        }
        let depth = c_int::try_from(depth.max(1))
            .map_err(|_| fail(libc::EINVAL, "ibv_create_cq: depth too large"))?;
        // SAFETY: live context.
        let channel = unsafe { ffi::ibv_create_comp_channel((*c).ctx) };
        if channel.is_null() {
            return Err(os_fail("ibv_create_comp_channel"));
        }
        // SAFETY: channel is live; its fd is owned by it.
        let chan_fd = unsafe { (*channel).fd };
        // SAFETY: fcntl on a descriptor we own.
        let flags = unsafe { libc::fcntl(chan_fd, libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(chan_fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
        {
            let e = os_fail("fcntl(O_NONBLOCK) on the completion channel");
            // SAFETY: channel has no CQ yet.
            unsafe { ffi::ibv_destroy_comp_channel(channel) };
            return Err(e);
        }
        // SAFETY: live context and channel.
        let cq = unsafe { ffi::ibv_create_cq((*c).ctx, depth, ptr::null_mut(), channel, 0) };
        if cq.is_null() {
            let e = os_fail("ibv_create_cq");
            // SAFETY: channel has no CQ.
            unsafe { ffi::ibv_destroy_comp_channel(channel) };
            return Err(e);
        }
        // SAFETY: out-pointers checked non-null, writable (caller contract).
        unsafe {
            *fd = chan_fd;
            *out = Box::into_raw(Box::new(Cq { cq, channel })).cast();
        }
        Ok(())
    })
}

unsafe extern "C" fn destroy_cq(cq: *mut c_void) -> c_int {
    guard("destroy_cq", || {
        let q: *mut Cq = non_null(cq, "destroy_cq")?;
        // SAFETY: q came from create_cq and is destroyed once (caller contract).
        let q = unsafe { Box::from_raw(q) };
        // SAFETY: every event taken was acknowledged (take_cq_event), so this does not wait.
        let rc = unsafe { ffi::ibv_destroy_cq(q.cq) };
        if rc != 0 {
            // The CQ is still in use (EBUSY): keep the channel, which it references.
            return Err(errno_fail("ibv_destroy_cq", rc));
        }
        // SAFETY: its only CQ is gone.
        let rc = unsafe { ffi::ibv_destroy_comp_channel(q.channel) };
        if rc != 0 {
            return Err(errno_fail("ibv_destroy_comp_channel", rc));
        }
        Ok(())
    })
}

/// How many completions one `poll_cq` call moves at most.
const POLL_BATCH: usize = 32;

unsafe extern "C" fn poll_cq(cq: *mut c_void, out: *mut WcV1, n: u32, got: *mut u32) -> c_int {
    guard("poll_cq", || {
        let q: *mut Cq = non_null(cq, "poll_cq")?;
        if got.is_null() || (out.is_null() && n > 0) {
            return Err(fail(libc::EINVAL, "poll_cq: null argument"));
        }
        let want = (n as usize).min(POLL_BATCH);
        let mut wcs = [ffi::ibv_wc::default(); POLL_BATCH];
        // SAFETY: q.cq is a live CQ; its context's ops table is filled by the provider.
        let f = unsafe { (*(*(*q).cq).context).ops.poll_cq }
            .ok_or_else(|| fail(libc::ENOSYS, "ibv_poll_cq: provider has no poll_cq"))?;
        // SAFETY: live CQ, wcs holds at least `want` entries.
        let r = unsafe { f((*q).cq, want as c_int, wcs.as_mut_ptr()) };
        if r < 0 {
            return Err(errno_fail("ibv_poll_cq", -r));
        }
        let r = (r as usize).min(want);
        for (i, wc) in wcs.iter().take(r).enumerate() {
            let (status, vendor_err) = wc.error().unwrap_or((0, 0));
            let imm = wc.imm_data();
            let v = WcV1 {
                wr_id: wc.wr_id(),
                status,
                opcode: wc.opcode(),
                byte_len: u32::try_from(wc.len()).unwrap_or(u32::MAX),
                imm: imm.map(u32::from_be).unwrap_or(0),
                has_imm: u32::from(imm.is_some()),
                qpn: wc.qp_num,
                vendor_err,
                _pad: 0,
            };
            // SAFETY: out holds n >= r entries (caller contract).
            unsafe { *out.add(i) = v };
        }
        // SAFETY: got checked non-null.
        unsafe { *got = r as u32 };
        Ok(())
    })
}

unsafe extern "C" fn arm_cq(cq: *mut c_void) -> c_int {
    guard("arm_cq", || {
        let q: *mut Cq = non_null(cq, "arm_cq")?;
        // SAFETY: live CQ and its provider ops.
        let f = unsafe { (*(*(*q).cq).context).ops.req_notify_cq }
            .ok_or_else(|| fail(libc::ENOSYS, "ibv_req_notify_cq: provider has none"))?;
        // SAFETY: live CQ.
        let rc = unsafe { f((*q).cq, 0) };
        if rc != 0 {
            return Err(errno_fail("ibv_req_notify_cq", rc));
        }
        Ok(())
    })
}

unsafe extern "C" fn take_cq_event(cq: *mut c_void, got: *mut u32) -> c_int {
    guard("take_cq_event", || {
        let q: *mut Cq = non_null(cq, "take_cq_event")?;
        if got.is_null() {
            return Err(fail(libc::EINVAL, "take_cq_event: null argument"));
        }
        let mut ev_cq: *mut ffi::ibv_cq = ptr::null_mut();
        let mut ev_ctx: *mut c_void = ptr::null_mut();
        // SAFETY: live channel with a non-blocking fd: returns at once.
        let rc = unsafe { ffi::ibv_get_cq_event((*q).channel, &mut ev_cq, &mut ev_ctx) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                // SAFETY: got checked non-null.
                unsafe { *got = 0 };
                return Ok(());
            }
            return Err(os_fail("ibv_get_cq_event"));
        }
        if !ev_cq.is_null() {
            // SAFETY: the event's CQ (ours: the channel has one CQ); acknowledged at once so
            // that destroy_cq never waits.
            unsafe { ffi::ibv_ack_cq_events(ev_cq, 1) };
        }
        // SAFETY: got checked non-null.
        unsafe { *got = 1 };
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// queue pairs

/// A random 24-bit initial packet sequence number.
fn random_psn(qpn: u32) -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(qpn);
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    (h.finish() as u32) & 0x00ff_ffff
}

fn qp_mask(bits: &[ffi::ibv_qp_attr_mask]) -> c_int {
    bits.iter().fold(0u32, |a, b| a | b.0) as c_int
}

unsafe extern "C" fn create_qp(
    ctx: *mut c_void,
    cq: *mut c_void,
    max_send: u32,
    max_recv: u32,
    out: *mut *mut c_void,
    addr: *mut QpAddrV1,
) -> c_int {
    guard("create_qp", || {
        let c: *mut Ctx = non_null(ctx, "create_qp")?;
        let q: *mut Cq = non_null(cq, "create_qp")?;
        if out.is_null() || addr.is_null() {
            return Err(fail(libc::EINVAL, "create_qp: null argument"));
        }
        // SAFETY: live handles (caller contract).
        let (pd, port, active_mtu, attr, cq) =
            unsafe { ((*c).pd, (*c).port, (*c).active_mtu, (*c).attr, (*q).cq) };
        let mut init = ffi::ibv_qp_init_attr {
            send_cq: cq,
            recv_cq: cq,
            cap: ffi::ibv_qp_cap {
                max_send_wr: max_send.max(1),
                max_recv_wr: max_recv.max(1),
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
            qp_type: ffi::ibv_qp_type::IBV_QPT_RC,
            sq_sig_all: 0,
            ..Default::default()
        };
        // SAFETY: live PD and CQ.
        let qp = unsafe { ffi::ibv_create_qp(pd, &mut init) };
        if qp.is_null() {
            return Err(os_fail("ibv_create_qp"));
        }
        let mut a = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_INIT,
            pkey_index: 0,
            port_num: port,
            qp_access_flags: (ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
                | ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
                | ffi::ibv_access_flags::IBV_ACCESS_REMOTE_READ)
                .0,
            ..Default::default()
        };
        let mask = qp_mask(&[
            ffi::ibv_qp_attr_mask::IBV_QP_STATE,
            ffi::ibv_qp_attr_mask::IBV_QP_PKEY_INDEX,
            ffi::ibv_qp_attr_mask::IBV_QP_PORT,
            ffi::ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS,
        ]);
        // SAFETY: qp just created.
        let rc = unsafe { ffi::ibv_modify_qp(qp, &mut a, mask) };
        if rc != 0 {
            // SAFETY: qp just created, unused.
            unsafe { ffi::ibv_destroy_qp(qp) };
            return Err(errno_fail("ibv_modify_qp(INIT)", rc));
        }
        // SAFETY: live qp.
        let qpn = unsafe { (*qp).qp_num };
        let psn = random_psn(qpn);
        let h = Qp {
            qp,
            port,
            active_mtu,
            link_layer: attr.link_layer,
            psn,
        };
        // SAFETY: out-pointers checked non-null and writable (caller contract).
        unsafe {
            *addr = QpAddrV1 {
                lid: attr.lid,
                _pad: 0,
                qpn,
                psn,
                gid: attr.gid,
            };
            *out = Box::into_raw(Box::new(h)).cast();
        }
        Ok(())
    })
}

unsafe extern "C" fn destroy_qp(qp: *mut c_void) -> c_int {
    guard("destroy_qp", || {
        let q: *mut Qp = non_null(qp, "destroy_qp")?;
        // SAFETY: q came from create_qp and is destroyed once (caller contract).
        let q = unsafe { Box::from_raw(q) };
        // SAFETY: live qp.
        let rc = unsafe { ffi::ibv_destroy_qp(q.qp) };
        if rc != 0 {
            return Err(errno_fail("ibv_destroy_qp", rc));
        }
        Ok(())
    })
}

unsafe extern "C" fn connect_qp(
    qp: *mut c_void,
    remote: *const QpAddrV1,
    params: *const ConnectParamsV1,
) -> c_int {
    guard("connect_qp", || {
        let q: *mut Qp = non_null(qp, "connect_qp")?;
        if remote.is_null() || params.is_null() {
            return Err(fail(libc::EINVAL, "connect_qp: null argument"));
        }
        // SAFETY: live handle; remote and params point to valid structs (caller contract).
        let (q, r, p) = unsafe { (&*q, *remote, *params) };
        let mtu = mtu_enum(p.mtu).ok_or_else(|| {
            fail(
                libc::EINVAL,
                format!("ibv_modify_qp(RTR): path MTU {} is not 256..4096", p.mtu),
            )
        })?;
        let mtu = if q.active_mtu > 0 {
            mtu.min(q.active_mtu)
        } else {
            mtu
        };
        let global = p.use_gid != 0 || q.link_layer == abi::LINK_LAYER_ETHERNET;
        let mut a = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTR,
            path_mtu: mtu,
            dest_qp_num: r.qpn,
            rq_psn: r.psn & 0x00ff_ffff,
            max_dest_rd_atomic: 1,
            min_rnr_timer: p.min_rnr_timer,
            ah_attr: ffi::ibv_ah_attr {
                grh: ffi::ibv_global_route {
                    dgid: ffi::ibv_gid { raw: r.gid },
                    flow_label: 0,
                    sgid_index: p.gid_index,
                    hop_limit: 255,
                    traffic_class: p.traffic_class,
                },
                dlid: r.lid,
                sl: p.sl,
                src_path_bits: 0,
                static_rate: 0,
                is_global: u8::from(global),
                port_num: q.port,
            },
            ..Default::default()
        };
        let mask = qp_mask(&[
            ffi::ibv_qp_attr_mask::IBV_QP_STATE,
            ffi::ibv_qp_attr_mask::IBV_QP_AV,
            ffi::ibv_qp_attr_mask::IBV_QP_PATH_MTU,
            ffi::ibv_qp_attr_mask::IBV_QP_DEST_QPN,
            ffi::ibv_qp_attr_mask::IBV_QP_RQ_PSN,
            ffi::ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC,
            ffi::ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER,
        ]);
        // SAFETY: live qp, valid attr.
        let rc = unsafe { ffi::ibv_modify_qp(q.qp, &mut a, mask) };
        if rc != 0 {
            return Err(errno_fail("ibv_modify_qp(RTR)", rc));
        }
        let mut a = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTS,
            timeout: p.timeout,
            retry_cnt: p.retry_cnt,
            rnr_retry: p.rnr_retry,
            sq_psn: q.psn,
            max_rd_atomic: 1,
            ..Default::default()
        };
        let mask = qp_mask(&[
            ffi::ibv_qp_attr_mask::IBV_QP_STATE,
            ffi::ibv_qp_attr_mask::IBV_QP_TIMEOUT,
            ffi::ibv_qp_attr_mask::IBV_QP_RETRY_CNT,
            ffi::ibv_qp_attr_mask::IBV_QP_RNR_RETRY,
            ffi::ibv_qp_attr_mask::IBV_QP_SQ_PSN,
            ffi::ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC,
        ]);
        // SAFETY: live qp, valid attr.
        let rc = unsafe { ffi::ibv_modify_qp(q.qp, &mut a, mask) };
        if rc != 0 {
            return Err(errno_fail("ibv_modify_qp(RTS)", rc));
        }
        Ok(())
    })
}

unsafe extern "C" fn post_send(qp: *mut c_void, wr: *const SendWrV1) -> c_int {
    guard("post_send", || {
        let q: *mut Qp = non_null(qp, "post_send")?;
        if wr.is_null() {
            return Err(fail(libc::EINVAL, "post_send: null argument"));
        }
        // SAFETY: live handle; wr points to a valid request (caller contract).
        let (q, w) = unsafe { (&*q, *wr) };
        let mut sge = ffi::ibv_sge {
            addr: w.sge.addr,
            length: w.sge.len,
            lkey: w.sge.lkey,
        };
        let mut s = ffi::ibv_send_wr {
            wr_id: w.wr_id,
            ..Default::default()
        };
        if w.has_sge != 0 {
            s.sg_list = &mut sge;
            s.num_sge = 1;
        }
        if w.signaled != 0 {
            s.send_flags = ffi::ibv_send_flags::IBV_SEND_SIGNALED.0;
        }
        s.opcode = match w.opcode {
            abi::OP_SEND => ffi::ibv_wr_opcode::IBV_WR_SEND,
            abi::OP_SEND_IMM => ffi::ibv_wr_opcode::IBV_WR_SEND_WITH_IMM,
            abi::OP_WRITE => ffi::ibv_wr_opcode::IBV_WR_RDMA_WRITE,
            abi::OP_WRITE_IMM => ffi::ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM,
            o => return Err(fail(libc::EINVAL, format!("ibv_post_send: bad opcode {o}"))),
        };
        if w.opcode == abi::OP_SEND_IMM || w.opcode == abi::OP_WRITE_IMM {
            s.__bindgen_anon_1.imm_data = w.imm.to_be();
        }
        if w.opcode == abi::OP_WRITE || w.opcode == abi::OP_WRITE_IMM {
            s.wr.rdma = ffi::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 {
                remote_addr: w.remote_addr,
                rkey: w.rkey,
            };
        }
        let mut bad: *mut ffi::ibv_send_wr = ptr::null_mut();
        // SAFETY: live qp and its provider ops.
        let f = unsafe { (*(*q.qp).context).ops.post_send }
            .ok_or_else(|| fail(libc::ENOSYS, "ibv_post_send: provider has none"))?;
        // SAFETY: live qp; s and sge outlive the call (the provider copies the request).
        let rc = unsafe { f(q.qp, &mut s, &mut bad) };
        if rc != 0 {
            return Err(errno_fail("ibv_post_send", rc));
        }
        Ok(())
    })
}

unsafe extern "C" fn post_recv(qp: *mut c_void, wr_id: u64, sge: *const SgeV1) -> c_int {
    guard("post_recv", || {
        let q: *mut Qp = non_null(qp, "post_recv")?;
        // SAFETY: live handle (caller contract).
        let q = unsafe { &*q };
        let g = if sge.is_null() {
            SgeV1::default()
        } else {
            // SAFETY: non-null sge points to a valid entry (caller contract).
            unsafe { *sge }
        };
        let mut s = ffi::ibv_sge {
            addr: g.addr,
            length: g.len,
            lkey: g.lkey,
        };
        let mut r = ffi::ibv_recv_wr {
            wr_id,
            ..Default::default()
        };
        if !sge.is_null() {
            r.sg_list = &mut s;
            r.num_sge = 1;
        }
        let mut bad: *mut ffi::ibv_recv_wr = ptr::null_mut();
        // SAFETY: live qp and its provider ops.
        let f = unsafe { (*(*q.qp).context).ops.post_recv }
            .ok_or_else(|| fail(libc::ENOSYS, "ibv_post_recv: provider has none"))?;
        // SAFETY: live qp; r and s outlive the call.
        let rc = unsafe { f(q.qp, &mut r, &mut bad) };
        if rc != 0 {
            return Err(errno_fail("ibv_post_recv", rc));
        }
        Ok(())
    })
}

unsafe extern "C" fn qp_state(qp: *mut c_void, state: *mut u32) -> c_int {
    guard("qp_state", || {
        let q: *mut Qp = non_null(qp, "qp_state")?;
        if state.is_null() {
            return Err(fail(libc::EINVAL, "qp_state: null argument"));
        }
        let mut a = ffi::ibv_qp_attr::default();
        let mut init = ffi::ibv_qp_init_attr::default();
        // SAFETY: live qp, valid out-structs.
        let rc = unsafe {
            ffi::ibv_query_qp(
                (*q).qp,
                &mut a,
                qp_mask(&[ffi::ibv_qp_attr_mask::IBV_QP_STATE]),
                &mut init,
            )
        };
        if rc != 0 {
            return Err(errno_fail("ibv_query_qp", rc));
        }
        // SAFETY: state checked non-null.
        unsafe { *state = a.qp_state };
        Ok(())
    })
}

unsafe extern "C" fn wc_status_str(status: u32) -> *const c_char {
    // SAFETY: ibv_wc_status_str returns a static string for any value.
    match catch_unwind(|| unsafe { ffi::ibv_wc_status_str(status) }) {
        Ok(p) if !p.is_null() => p,
        _ => c"unknown".as_ptr(),
    }
}

unsafe extern "C" fn last_error(buf: *mut c_char, cap: usize) -> usize {
    catch_unwind(|| {
        LAST_ERROR
            .try_with(|e| {
                let Ok(e) = e.try_borrow() else { return 0 };
                let bytes = e.as_bytes();
                if !buf.is_null() && cap > 0 {
                    let n = bytes.len().min(cap - 1);
                    // SAFETY: buf holds cap bytes (caller contract); n + 1 <= cap.
                    unsafe {
                        ptr::copy_nonoverlapping(bytes.as_ptr().cast(), buf, n);
                        *buf.add(n) = 0;
                    }
                }
                bytes.len()
            })
            .unwrap_or(0)
    })
    .unwrap_or(0)
}

static NAME: &CStr = c"braid_ibverbs 0.1 (rdma-core via ibverbs-sys 0.3)";

static TABLE: PluginV1 = PluginV1 {
    abi_version: ABI_VERSION,
    struct_size: std::mem::size_of::<PluginV1>() as u32,
    name: NAME.as_ptr(),
    list_devices,
    open,
    close,
    port_attr,
    reg_mr,
    reg_dmabuf_mr,
    dmabuf_supported,
    dereg_mr,
    create_cq,
    destroy_cq,
    poll_cq,
    arm_cq,
    take_cq_event,
    create_qp,
    destroy_qp,
    connect_qp,
    post_send,
    post_recv,
    qp_state,
    wc_status_str,
    last_error,
};

/// The plugin entry point: braid's verbs function table (ABI version 1), static for the
/// lifetime of the loaded library.
#[no_mangle]
pub extern "C" fn braid_ibverbs_plugin_v1() -> *const PluginV1 {
    &TABLE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speeds_and_mtus() {
        assert_eq!(speed_mbps(32, 2), 100_000); // EDR 4x
        assert_eq!(speed_mbps(64, 2), 200_000); // HDR 4x
        assert_eq!(speed_mbps(0, 2), 0);
        assert_eq!(mtu_bytes(ffi::IBV_MTU_4096), 4096);
        assert_eq!(mtu_bytes(ffi::IBV_MTU_256), 256);
        assert_eq!(mtu_enum(1024), Some(ffi::IBV_MTU_1024));
        assert_eq!(mtu_enum(1000), None);
        assert!(random_psn(7) <= 0x00ff_ffff);
    }
}
