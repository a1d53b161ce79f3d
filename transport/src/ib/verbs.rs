//! The real verbs provider: [`Nic`] over `libbraid_ibverbs.so`, a plugin loaded at run time.
//!
//! libbraid has no link-time (`ldd`) dependency on libibverbs: the verbs calls live in the
//! plugin crate `braid-ibverbs` (ibverbs-plugin/), built as `libbraid_ibverbs.so` next to
//! libbraid. [`open`] `dlopen`s it (`RTLD_NOW | RTLD_LOCAL`), takes its function table
//! ([`super::verbs_abi::PluginV1`]) and opens a device port. A machine without rdma-core, or
//! without an RDMA device, gets an `Err` with the human reason (the `dlerror` text, or
//! "no RDMA devices found (ibv_get_device_list)") and never a panic.
//!
//! Where the plugin is looked for, in order: [`VerbsOptions::plugin`] (braid passes
//! `BRAID_IB_PLUGIN`, [`PLUGIN_ENV`], there) and nothing else when it is set; else the directory
//! of the object holding this code (libbraid.so, or the executable) and its parent (test
//! binaries live in `target/<profile>/deps`), the directory of the executable and its parent;
//! else the bare file name through the dynamic loader's path (`LD_LIBRARY_PATH`, ld.so.cache).
//! A loaded plugin is never unloaded.
//!
//! GPUDirect RDMA: [`gpu_path`] decides between registering device memory through a dma-buf
//! ([`VerbsNic::reg_dmabuf_mr`]), registering the device pointer directly (nvidia_peermem), or
//! staging through host memory.

use std::collections::HashSet;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::nic::{
    ConnectParams, Cq, LinkLayer, Mr, Nic, NicError, NicResult, PortInfo, Qp, QpAddr, QpState,
    SendOp, SendWr, Sge, Wc, WcOpcode,
};
use super::verbs_abi as abi;
use super::verbs_abi::PluginV1;

/// The environment variable naming the plugin file explicitly (read by braid's configuration
/// and passed as [`VerbsOptions::plugin`]).
pub const PLUGIN_ENV: &str = "BRAID_IB_PLUGIN";

/// What [`open`] opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerbsOptions {
    /// Device name (`mlx5_0`); None: the first device.
    pub device: Option<String>,
    /// Port number (1-based).
    pub port: u8,
    /// GID index (RoCE: the index of the RoCE v2 GID of the wanted address).
    pub gid_index: u8,
    /// The plugin file; None: searched (see the module documentation).
    pub plugin: Option<PathBuf>,
}

impl Default for VerbsOptions {
    fn default() -> Self {
        VerbsOptions {
            device: None,
            port: 1,
            gid_index: 0,
            plugin: None,
        }
    }
}

/// How GPU memory travels over the NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuPath {
    /// GPUDirect RDMA through a dma-buf of the device memory ([`VerbsNic::reg_dmabuf_mr`]):
    /// the kernel's upstream path, preferred when the NIC supports it.
    DmaBuf,
    /// GPUDirect RDMA by registering the device pointer itself with `ibv_reg_mr`, which the
    /// nvidia_peermem kernel module makes possible.
    PeerMem,
    /// No GPUDirect: GPU buffers are copied through registered host memory.
    HostStaging {
        /// Why (for the log).
        reason: &'static str,
    },
}

/// Decides how GPU buffers are registered: the user's opt-out wins; then dma-buf (supported by
/// the NIC and libibverbs); then nvidia_peermem; else staging through host memory.
pub fn gpu_path(dmabuf_supported: bool, peermem_loaded: bool, user_disabled: bool) -> GpuPath {
    if user_disabled {
        GpuPath::HostStaging {
            reason: "GPUDirect RDMA disabled by configuration",
        }
    } else if dmabuf_supported {
        GpuPath::DmaBuf
    } else if peermem_loaded {
        GpuPath::PeerMem
    } else {
        GpuPath::HostStaging {
            reason: "neither dma-buf registration nor the nvidia_peermem module is available",
        }
    }
}

/// Whether the nvidia_peermem kernel module (or its predecessor nv_peer_mem) is loaded.
pub fn peermem_loaded() -> bool {
    peermem_loaded_in(Path::new("/sys/module"))
}

/// [`peermem_loaded`] against a given `/sys/module` directory.
pub fn peermem_loaded_in(sys_module: &Path) -> bool {
    sys_module.join("nvidia_peermem").exists() || sys_module.join("nv_peer_mem").exists()
}

/// `dlerror()` as text.
fn dlerror_text() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated string valid until the next dl* call
    // of this thread; it is copied at once.
    let p = unsafe { libc::dlerror() };
    if p.is_null() {
        "unknown dlopen error".to_string()
    } else {
        // SAFETY: non-null NUL-terminated string (above).
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// Loads `name` (a path or a bare file name) and takes its function table.
fn load(name: &str) -> Result<&'static PluginV1, String> {
    let c = CString::new(name).map_err(|_| format!("{name}: path contains a NUL byte"))?;
    // SAFETY: valid NUL-terminated name. The handle is never closed: the table and the code it
    // points to stay valid for the rest of the process (module contract).
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if h.is_null() {
        return Err(dlerror_text());
    }
    // SAFETY: valid handle and NUL-terminated symbol name.
    let sym = unsafe { libc::dlsym(h, abi::PLUGIN_SYMBOL.as_ptr().cast()) };
    if sym.is_null() {
        return Err(format!(
            "{name}: no symbol braid_ibverbs_plugin_v1 ({})",
            dlerror_text()
        ));
    }
    // SAFETY: the plugin exports the symbol with the type PluginEntry (verbs_abi contract).
    let entry = unsafe { std::mem::transmute::<*mut c_void, abi::PluginEntry>(sym) };
    // SAFETY: calling the plugin's entry point; it returns a pointer to its static table.
    let table = unsafe { entry() };
    if table.is_null() {
        return Err(format!("{name}: braid_ibverbs_plugin_v1 returned null"));
    }
    // Read the two header fields before trusting the rest of the layout.
    // SAFETY: the table starts with abi_version and struct_size in every ABI version.
    let (version, size) = unsafe { ((*table).abi_version, (*table).struct_size) };
    if version != abi::ABI_VERSION || (size as usize) < std::mem::size_of::<PluginV1>() {
        return Err(format!(
            "{name}: plugin ABI version {version} (table of {size} bytes), braid needs version {} ({} bytes)",
            abi::ABI_VERSION,
            std::mem::size_of::<PluginV1>()
        ));
    }
    // SAFETY: a static table of this ABI version, valid while the library stays loaded:
    // forever (never dlclosed).
    Ok(unsafe { &*table })
}

/// The file of the loaded object (shared library or executable) holding this code.
fn own_object_path() -> Option<PathBuf> {
    let mut info = libc::Dl_info {
        dli_fname: std::ptr::null(),
        dli_fbase: std::ptr::null_mut(),
        dli_sname: std::ptr::null(),
        dli_saddr: std::ptr::null_mut(),
    };
    let addr = own_object_path as fn() -> Option<PathBuf> as *const c_void;
    // SAFETY: addr is code of this object; info is a valid out-struct.
    let rc = unsafe { libc::dladdr(addr, &mut info) };
    if rc == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: non-null NUL-terminated file name owned by the loader.
    let name = unsafe { CStr::from_ptr(info.dli_fname) };
    let p = PathBuf::from(name.to_string_lossy().into_owned());
    std::fs::canonicalize(&p).ok().or(Some(p))
}

/// The plugin paths tried before the loader path, in order, without duplicates.
fn candidates() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    let objects = [own_object_path(), std::env::current_exe().ok()];
    for o in objects.into_iter().flatten() {
        if let Some(d) = o.parent() {
            dirs.push(d.to_path_buf());
            if let Some(up) = d.parent() {
                dirs.push(up.to_path_buf());
            }
        }
    }
    let mut out: Vec<PathBuf> = Vec::new();
    for d in dirs {
        let p = d.join(abi::PLUGIN_FILE);
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// Finds and loads the plugin (see the module documentation).
fn load_plugin(explicit: Option<&Path>) -> Result<&'static PluginV1, String> {
    if let Some(p) = explicit {
        return load(&p.to_string_lossy())
            .map_err(|e| format!("{} not loadable: {e}", p.display()));
    }
    let mut first_err: Option<String> = None;
    let cands = candidates();
    for p in &cands {
        if !p.is_file() {
            continue;
        }
        match load(&p.to_string_lossy()) {
            Ok(t) => {
                tracing::debug!(target: "braid::ib", "verbs plugin loaded from {}", p.display());
                return Ok(t);
            }
            Err(e) => {
                tracing::debug!(target: "braid::ib", "verbs plugin {}: {e}", p.display());
                first_err.get_or_insert(e);
            }
        }
    }
    match load(abi::PLUGIN_FILE) {
        Ok(t) => {
            tracing::debug!(target: "braid::ib", "verbs plugin loaded from the loader path");
            Ok(t)
        }
        Err(e) => {
            let looked: Vec<String> = cands.iter().map(|p| p.display().to_string()).collect();
            Err(format!(
                "{} not loadable: {} (looked at {} and the loader path)",
                abi::PLUGIN_FILE,
                first_err.unwrap_or(e),
                looked.join(", ")
            ))
        }
    }
}

/// The calling thread's last plugin error as (op, message).
fn last_error(api: &PluginV1, fallback_op: &str, code: c_int) -> NicError {
    let mut buf = [0 as c_char; 512];
    // SAFETY: buf holds 512 bytes; the plugin writes a NUL-terminated string into it.
    let n = unsafe { (api.last_error)(buf.as_mut_ptr(), buf.len()) };
    let text = if n == 0 {
        String::new()
    } else {
        // SAFETY: NUL-terminated within buf (plugin contract).
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    };
    if text.is_empty() {
        return NicError::new(
            fallback_op,
            std::io::Error::from_raw_os_error(code).to_string(),
        );
    }
    match text.split_once(": ") {
        Some((op, msg)) if op.starts_with("ibv_") || op.starts_with(fallback_op) => {
            NicError::new(op, msg)
        }
        _ => NicError::new(fallback_op, text),
    }
}

/// Maps a plugin status to a result.
fn check(api: &PluginV1, op: &str, rc: c_int) -> NicResult<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(last_error(api, op, rc))
    }
}

/// The names of the RDMA devices (loads the plugin).
pub fn list_devices(plugin: Option<&Path>) -> Result<Vec<String>, String> {
    let api = load_plugin(plugin)?;
    let mut buf = vec![0 as c_char; 16 * 1024];
    let mut count = 0u32;
    // SAFETY: buf holds buf.len() bytes; count is a valid out-pointer.
    let rc = unsafe { (api.list_devices)(buf.as_mut_ptr(), buf.len(), &mut count) };
    check(api, "ibv_get_device_list", rc).map_err(|e| e.to_string())?;
    let bytes: Vec<u8> = buf.iter().map(|c| *c as u8).collect();
    Ok(bytes
        .split(|b| *b == 0)
        .take(count as usize)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect())
}

/// Opens a device port through the plugin: the [`Nic`] of the real verbs provider, or the
/// human reason why not (plugin not loadable, no RDMA device, port down, ...).
pub fn open(opts: &VerbsOptions) -> Result<Arc<dyn Nic>, String> {
    open_verbs(opts).map(|n| n as Arc<dyn Nic>)
}

/// [`open`] with the concrete type (for the GPUDirect calls of [`VerbsNic`]).
pub fn open_verbs(opts: &VerbsOptions) -> Result<Arc<VerbsNic>, String> {
    let api = load_plugin(opts.plugin.as_deref())?;
    open_with(api, opts)
}

/// Opens a device port through a loaded plugin table.
fn open_with(api: &'static PluginV1, opts: &VerbsOptions) -> Result<Arc<VerbsNic>, String> {
    let dev = match &opts.device {
        Some(d) => Some(
            CString::new(d.as_str())
                .map_err(|_| format!("device name {d:?} contains a NUL byte"))?,
        ),
        None => None,
    };
    let mut ctx: *mut c_void = std::ptr::null_mut();
    // SAFETY: dev is null or NUL-terminated; ctx is a valid out-pointer.
    let rc = unsafe {
        (api.open)(
            dev.as_ref().map_or(std::ptr::null(), |d| d.as_ptr()),
            opts.port,
            opts.gid_index,
            &mut ctx,
        )
    };
    if rc != 0 || ctx.is_null() {
        let e = last_error(api, "open", rc.max(1));
        // The plugin's open reasons are complete sentences; keep them as they are.
        return Err(if e.op == "open" { e.msg } else { e.to_string() });
    }
    let inner = Arc::new(Inner {
        api,
        ctx,
        cqs: Mutex::new(Vec::new()),
        mrs: Mutex::new(HashSet::new()),
    });
    let mut attr = abi::PortAttrV1::default();
    // SAFETY: live context; attr is a valid out-struct.
    let rc = unsafe { (api.port_attr)(ctx, &mut attr) };
    check(api, "port_attr", rc).map_err(|e| e.to_string())?;
    // SAFETY: the plugin NUL-terminates the name within the array.
    let device = unsafe { CStr::from_ptr(attr.device.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    let port = PortInfo {
        device,
        port: attr.port,
        lid: attr.lid,
        gid: attr.gid,
        mtu: attr.mtu,
        speed_mbps: attr.speed_mbps,
        link_layer: if attr.link_layer == abi::LINK_LAYER_ETHERNET {
            LinkLayer::Ethernet
        } else {
            LinkLayer::InfiniBand
        },
    };
    tracing::info!(
        target: "braid::ib",
        "verbs: opened {} port {} ({:?}, lid {}, mtu {}, {} Mbit/s)",
        port.device, port.port, port.link_layer, port.lid, port.mtu, port.speed_mbps
    );
    Ok(Arc::new(VerbsNic { inner, port }))
}

/// The plugin context, shared by the NIC and everything created from it, so that the device
/// is closed only after its last queue and region handle is gone.
struct Inner {
    api: &'static PluginV1,
    ctx: *mut c_void,
    /// Live completion queue handles: `create_qp` only accepts one of these.
    cqs: Mutex<Vec<u64>>,
    /// Live memory region handles: `dereg_mr` only accepts one of these.
    mrs: Mutex<HashSet<u64>>,
}

// SAFETY: the context and protection domain of libibverbs may be used from any thread
// (verbs calls on them are thread-safe); the table is immutable static data.
unsafe impl Send for Inner {}
// SAFETY: as above.
unsafe impl Sync for Inner {}

impl Drop for Inner {
    fn drop(&mut self) {
        // SAFETY: ctx came from open and every CQ/QP holding this Inner is gone.
        let rc = unsafe { (self.api.close)(self.ctx) };
        if let Err(e) = check(self.api, "close", rc) {
            tracing::warn!(target: "braid::ib", "verbs: closing the device: {e}");
        }
    }
}

/// An opened verbs device port with its protection domain.
pub struct VerbsNic {
    inner: Arc<Inner>,
    port: PortInfo,
}

impl std::fmt::Debug for VerbsNic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsNic")
            .field("port", &self.port)
            .finish()
    }
}

impl VerbsNic {
    /// Whether the device and libibverbs can register dma-buf memory (GPUDirect RDMA).
    pub fn dmabuf_supported(&self) -> bool {
        // SAFETY: live context.
        unsafe { (self.inner.api.dmabuf_supported)(self.inner.ctx) == 1 }
    }

    /// The GPU path for this NIC ([`gpu_path`] with this device's dma-buf support and the
    /// loaded kernel modules).
    pub fn gpu_path(&self, user_disabled: bool) -> GpuPath {
        let p = gpu_path(self.dmabuf_supported(), peermem_loaded(), user_disabled);
        tracing::debug!(target: "braid::ib", "verbs: GPU path of {}: {p:?}", self.port.device);
        p
    }

    /// Registers `len` bytes at `offset` of the dma-buf `fd` (device memory exported with
    /// `cuMemGetHandleForAddressRange`), addressed in work requests as `iova` onwards.
    ///
    /// # Safety
    /// The device memory must stay allocated until [`Nic::dereg_mr`]; the NIC reads and writes
    /// it at any time in between.
    pub unsafe fn reg_dmabuf_mr(
        &self,
        fd: RawFd,
        offset: u64,
        len: usize,
        iova: u64,
        access: u32,
    ) -> NicResult<Mr> {
        let mut out = abi::MrV1::default();
        // SAFETY: live context; out is a valid out-struct; the memory contract is the caller's.
        let rc = unsafe {
            (self.inner.api.reg_dmabuf_mr)(self.inner.ctx, offset, len, iova, fd, access, &mut out)
        };
        check(self.inner.api, "ibv_reg_dmabuf_mr", rc)?;
        Ok(self.inner.track(out))
    }
}

impl Inner {
    /// Records a new region's handle (for the check of `dereg_mr`).
    fn track(&self, m: abi::MrV1) -> Mr {
        if let Ok(mut l) = self.mrs.lock() {
            l.insert(m.handle);
        }
        Mr {
            id: m.handle,
            addr: m.addr,
            len: m.len,
            lkey: m.lkey,
            rkey: m.rkey,
        }
    }
}

impl Nic for VerbsNic {
    fn port(&self) -> PortInfo {
        self.port.clone()
    }

    fn gpu_path(&self, user_disabled: bool) -> GpuPath {
        VerbsNic::gpu_path(self, user_disabled)
    }

    unsafe fn reg_dmabuf_mr(
        &self,
        fd: RawFd,
        offset: u64,
        len: usize,
        iova: u64,
        access: u32,
    ) -> NicResult<Mr> {
        // SAFETY: the caller's contract is this one's.
        unsafe { VerbsNic::reg_dmabuf_mr(self, fd, offset, len, iova, access) }
    }

    unsafe fn reg_mr(&self, addr: *mut u8, len: usize, access: u32) -> NicResult<Mr> {
        let mut out = abi::MrV1::default();
        // SAFETY: live context; out is a valid out-struct; the memory stays valid until
        // dereg_mr (this function's contract).
        let rc =
            unsafe { (self.inner.api.reg_mr)(self.inner.ctx, addr.cast(), len, access, &mut out) };
        check(self.inner.api, "ibv_reg_mr", rc)?;
        Ok(self.inner.track(out))
    }

    fn dereg_mr(&self, mr: &Mr) -> NicResult<()> {
        let known = self
            .inner
            .mrs
            .lock()
            .map(|mut l| l.remove(&mr.id))
            .unwrap_or(false);
        if !known {
            return Err(NicError::new(
                "ibv_dereg_mr",
                "not a registered region of this verbs device",
            ));
        }
        // SAFETY: mr.id is a live handle from reg_mr of this NIC (checked above), deregistered
        // once (removed from the set).
        let rc = unsafe { (self.inner.api.dereg_mr)(mr.id) };
        check(self.inner.api, "ibv_dereg_mr", rc)
    }

    fn create_cq(&self, depth: u32) -> NicResult<Box<dyn Cq>> {
        let mut cq: *mut c_void = std::ptr::null_mut();
        let mut fd: c_int = -1;
        // SAFETY: live context; valid out-pointers.
        let rc = unsafe { (self.inner.api.create_cq)(self.inner.ctx, depth, &mut cq, &mut fd) };
        check(self.inner.api, "ibv_create_cq", rc)?;
        if let Ok(mut l) = self.inner.cqs.lock() {
            l.push(cq as u64);
        }
        Ok(Box::new(VerbsCq {
            inner: self.inner.clone(),
            cq,
            fd,
        }))
    }

    fn create_qp(&self, cq: &dyn Cq, max_send: u32, max_recv: u32) -> NicResult<Box<dyn Qp>> {
        let h = cq.handle();
        let ours = self
            .inner
            .cqs
            .lock()
            .map(|l| l.contains(&h))
            .unwrap_or(false);
        if !ours {
            return Err(NicError::new(
                "ibv_create_qp",
                "the completion queue is not one of this verbs device",
            ));
        }
        let mut qp: *mut c_void = std::ptr::null_mut();
        let mut addr = abi::QpAddrV1::default();
        // SAFETY: live context and CQ (checked above: a live CQ of this NIC); valid
        // out-pointers.
        let rc = unsafe {
            (self.inner.api.create_qp)(
                self.inner.ctx,
                h as usize as *mut c_void,
                max_send,
                max_recv,
                &mut qp,
                &mut addr,
            )
        };
        check(self.inner.api, "ibv_create_qp", rc)?;
        Ok(Box::new(VerbsQp {
            inner: self.inner.clone(),
            qp,
            addr: QpAddr {
                lid: addr.lid,
                gid: addr.gid,
                qpn: addr.qpn,
                psn: addr.psn,
                nic_addr: Vec::new(),
            },
        }))
    }

    fn status_str(&self, status: u32) -> String {
        // SAFETY: the plugin returns a static NUL-terminated string.
        let p = unsafe { (self.inner.api.wc_status_str)(status) };
        if p.is_null() {
            return super::nic::status::as_str(status).to_string();
        }
        // SAFETY: non-null static NUL-terminated string.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// A completion queue of the plugin.
struct VerbsCq {
    inner: Arc<Inner>,
    cq: *mut c_void,
    fd: RawFd,
}

// SAFETY: a CQ handle may move between threads (verbs objects are not thread-bound); &mut self
// serialises polls.
unsafe impl Send for VerbsCq {}

impl Cq for VerbsCq {
    fn poll(&mut self, out: &mut [Wc]) -> NicResult<usize> {
        let mut done = 0usize;
        let mut buf = [abi::WcV1::default(); 32];
        while done < out.len() {
            let want = (out.len() - done).min(buf.len());
            let mut got = 0u32;
            // SAFETY: live CQ; buf holds at least `want` entries.
            let rc = unsafe {
                (self.inner.api.poll_cq)(self.cq, buf.as_mut_ptr(), want as u32, &mut got)
            };
            check(self.inner.api, "ibv_poll_cq", rc)?;
            let got = (got as usize).min(want);
            for (slot, w) in out[done..].iter_mut().zip(buf.iter().take(got)) {
                *slot = Wc {
                    wr_id: w.wr_id,
                    status: w.status,
                    opcode: match w.opcode {
                        abi::WC_RDMA_WRITE => WcOpcode::Write,
                        abi::WC_RECV => WcOpcode::Recv,
                        abi::WC_RECV_RDMA_WITH_IMM => WcOpcode::RecvRdmaWithImm,
                        // WC_SEND, and anything on an error completion (meaningless there).
                        _ => WcOpcode::Send,
                    },
                    byte_len: w.byte_len,
                    imm: (w.has_imm != 0).then_some(w.imm),
                    qpn: w.qpn,
                };
            }
            done += got;
            if got < want {
                break;
            }
        }
        Ok(done)
    }

    fn arm(&mut self) -> NicResult<()> {
        // SAFETY: live CQ.
        let rc = unsafe { (self.inner.api.arm_cq)(self.cq) };
        check(self.inner.api, "ibv_req_notify_cq", rc)
    }

    fn take_event(&mut self) -> NicResult<()> {
        let mut got = 0u32;
        // SAFETY: live CQ; valid out-pointer.
        let rc = unsafe { (self.inner.api.take_cq_event)(self.cq, &mut got) };
        check(self.inner.api, "ibv_get_cq_event", rc)
    }

    fn fd(&self) -> RawFd {
        self.fd
    }

    fn handle(&self) -> u64 {
        self.cq as u64
    }
}

impl Drop for VerbsCq {
    fn drop(&mut self) {
        if let Ok(mut l) = self.inner.cqs.lock() {
            l.retain(|h| *h != self.cq as u64);
        }
        // SAFETY: cq came from create_cq and is destroyed once.
        let rc = unsafe { (self.inner.api.destroy_cq)(self.cq) };
        if let Err(e) = check(self.inner.api, "ibv_destroy_cq", rc) {
            tracing::warn!(target: "braid::ib", "verbs: destroying a completion queue: {e}");
        }
    }
}

/// A reliable-connected queue pair of the plugin.
struct VerbsQp {
    inner: Arc<Inner>,
    qp: *mut c_void,
    addr: QpAddr,
}

// SAFETY: a QP handle may move between threads; &mut self serialises posts.
unsafe impl Send for VerbsQp {}

impl Qp for VerbsQp {
    fn addr(&self) -> QpAddr {
        self.addr.clone()
    }

    fn connect(&mut self, remote: &QpAddr, params: &ConnectParams) -> NicResult<()> {
        let r = abi::QpAddrV1 {
            lid: remote.lid,
            _pad: 0,
            qpn: remote.qpn,
            psn: remote.psn,
            gid: remote.gid,
        };
        let p = abi::ConnectParamsV1 {
            mtu: params.mtu,
            timeout: params.timeout,
            retry_cnt: params.retry_cnt,
            rnr_retry: params.rnr_retry,
            min_rnr_timer: params.min_rnr_timer,
            gid_index: params.gid_index,
            traffic_class: params.traffic_class,
            sl: params.sl,
            use_gid: u8::from(params.use_gid),
        };
        // SAFETY: live QP; r and p are valid for the call.
        let rc = unsafe { (self.inner.api.connect_qp)(self.qp, &r, &p) };
        check(self.inner.api, "ibv_modify_qp", rc)
    }

    fn post_send(&mut self, wr: &SendWr) -> NicResult<()> {
        let (opcode, imm, remote_addr, rkey) = match wr.op {
            SendOp::Send => (abi::OP_SEND, 0, 0, 0),
            SendOp::SendImm(imm) => (abi::OP_SEND_IMM, imm, 0, 0),
            SendOp::Write { remote_addr, rkey } => (abi::OP_WRITE, 0, remote_addr, rkey),
            SendOp::WriteImm {
                remote_addr,
                rkey,
                imm,
            } => (abi::OP_WRITE_IMM, imm, remote_addr, rkey),
        };
        let w = abi::SendWrV1 {
            wr_id: wr.wr_id,
            opcode,
            imm,
            remote_addr,
            rkey,
            signaled: u32::from(wr.signaled),
            has_sge: u32::from(wr.sge.is_some()),
            _pad: 0,
            sge: sge_v1(wr.sge),
        };
        // SAFETY: live QP; w is valid for the call (the plugin copies it into the send queue).
        let rc = unsafe { (self.inner.api.post_send)(self.qp, &w) };
        check(self.inner.api, "ibv_post_send", rc)
    }

    fn post_recv(&mut self, wr_id: u64, sge: Option<Sge>) -> NicResult<()> {
        let s = sge_v1(sge);
        let p: *const abi::SgeV1 = if sge.is_some() { &s } else { std::ptr::null() };
        // SAFETY: live QP; p is null or points to s, valid for the call.
        let rc = unsafe { (self.inner.api.post_recv)(self.qp, wr_id, p) };
        check(self.inner.api, "ibv_post_recv", rc)
    }

    fn state(&self) -> QpState {
        let mut s = abi::qps::ERR;
        // SAFETY: live QP; valid out-pointer.
        let rc = unsafe { (self.inner.api.qp_state)(self.qp, &mut s) };
        if let Err(e) = check(self.inner.api, "ibv_query_qp", rc) {
            tracing::debug!(target: "braid::ib", "verbs: {e}");
            return QpState::Error;
        }
        match s {
            abi::qps::RESET | abi::qps::INIT => QpState::Init,
            abi::qps::RTR => QpState::Rtr,
            abi::qps::RTS | abi::qps::SQD => QpState::Rts,
            _ => QpState::Error,
        }
    }
}

fn sge_v1(s: Option<Sge>) -> abi::SgeV1 {
    s.map_or(abi::SgeV1::default(), |s| abi::SgeV1 {
        addr: s.addr,
        len: s.len,
        lkey: s.lkey,
    })
}

impl Drop for VerbsQp {
    fn drop(&mut self) {
        // SAFETY: qp came from create_qp and is destroyed once.
        let rc = unsafe { (self.inner.api.destroy_qp)(self.qp) };
        if let Err(e) = check(self.inner.api, "ibv_destroy_qp", rc) {
            tracing::warn!(target: "braid::ib", "verbs: destroying a queue pair: {e}");
        }
    }
}

#[cfg(test)]
#[allow(clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn gpu_path_decision() {
        assert!(matches!(
            gpu_path(true, true, true),
            GpuPath::HostStaging { .. }
        ));
        assert!(matches!(
            gpu_path(false, true, true),
            GpuPath::HostStaging { .. }
        ));
        assert_eq!(gpu_path(true, true, false), GpuPath::DmaBuf);
        assert_eq!(gpu_path(true, false, false), GpuPath::DmaBuf);
        assert_eq!(gpu_path(false, true, false), GpuPath::PeerMem);
        match gpu_path(false, false, false) {
            GpuPath::HostStaging { reason } => assert!(reason.contains("nvidia_peermem")),
            other => panic!("expected host staging, got {other:?}"),
        }
        match gpu_path(true, false, true) {
            GpuPath::HostStaging { reason } => assert!(reason.contains("disabled")),
            other => panic!("expected host staging, got {other:?}"),
        }
    }

    #[test]
    fn peermem_detection() {
        let d = std::env::temp_dir().join(format!("braid-sysmod-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        assert!(std::fs::create_dir_all(&d).is_ok());
        assert!(!peermem_loaded_in(&d));
        assert!(std::fs::create_dir_all(d.join("nvidia_peermem")).is_ok());
        assert!(peermem_loaded_in(&d));
        let _ = std::fs::remove_dir_all(&d);
        // The real check does not panic, whatever this machine has.
        let _ = peermem_loaded();
    }

    #[test]
    fn candidates_are_plugin_files() {
        let c = candidates();
        assert!(!c.is_empty());
        assert!(c.iter().all(|p| p.ends_with(abi::PLUGIN_FILE)));
    }

    #[test]
    fn explicit_missing_plugin_is_a_reason() {
        let opts = VerbsOptions {
            plugin: Some(PathBuf::from("/nonexistent/libbraid_ibverbs.so")),
            ..VerbsOptions::default()
        };
        match open(&opts) {
            Ok(_) => panic!("opened a nonexistent plugin"),
            Err(e) => assert!(e.contains("not loadable"), "{e}"),
        }
    }

    /// A fake plugin table: checks the transport-side mapping of [`VerbsNic`] without
    /// libibverbs (the real plugin needs an RDMA device).
    mod mock {
        use crate::ib::verbs_abi as abi;
        use std::ffi::{c_char, c_int, c_void};
        use std::sync::Mutex;

        pub static CALLS: Mutex<Vec<String>> = Mutex::new(Vec::new());
        pub static LAST_SEND: Mutex<Option<abi::SendWrV1>> = Mutex::new(None);
        pub static LAST_CONNECT: Mutex<Option<(abi::QpAddrV1, abi::ConnectParamsV1)>> =
            Mutex::new(None);
        static ERR: Mutex<String> = Mutex::new(String::new());
        static NEXT_MR: Mutex<u64> = Mutex::new(0x1000);
        /// Completions handed out by poll_cq.
        pub static PENDING: Mutex<Vec<abi::WcV1>> = Mutex::new(Vec::new());

        fn call(s: &str) {
            if let Ok(mut c) = CALLS.lock() {
                c.push(s.to_string());
            }
        }
        fn err(code: c_int, s: &str) -> c_int {
            if let Ok(mut e) = ERR.lock() {
                *e = s.to_string();
            }
            code
        }
        // Distinct non-null dummy handles.
        static CTX: u8 = 0;
        static CQ: u8 = 0;
        static QP: u8 = 0;

        unsafe extern "C" fn list_devices(_b: *mut c_char, _c: usize, n: *mut u32) -> c_int {
            // SAFETY: valid out-pointer from the caller.
            unsafe { *n = 0 };
            0
        }
        unsafe extern "C" fn open(
            d: *const c_char,
            _p: u8,
            _g: u8,
            ctx: *mut *mut c_void,
        ) -> c_int {
            call("open");
            if !d.is_null() {
                return err(
                    libc::ENODEV,
                    "RDMA device x not found (ibv_get_device_list has: mock0)",
                );
            }
            // SAFETY: valid out-pointer from the caller.
            unsafe { *ctx = &CTX as *const u8 as *mut c_void };
            0
        }
        unsafe extern "C" fn close(_c: *mut c_void) -> c_int {
            call("close");
            0
        }
        unsafe extern "C" fn port_attr(_c: *mut c_void, out: *mut abi::PortAttrV1) -> c_int {
            let mut a = abi::PortAttrV1 {
                port: 1,
                link_layer: abi::LINK_LAYER_ETHERNET,
                lid: 0,
                state: 4,
                mtu: 1024,
                gid: [7; 16],
                speed_mbps: 100_000,
                ..abi::PortAttrV1::default()
            };
            for (d, s) in a.device.iter_mut().zip(b"mock0") {
                *d = *s as c_char;
            }
            // SAFETY: valid out-pointer from the caller.
            unsafe { *out = a };
            0
        }
        unsafe extern "C" fn reg_mr(
            _c: *mut c_void,
            addr: *mut c_void,
            len: usize,
            _a: u32,
            out: *mut abi::MrV1,
        ) -> c_int {
            let Ok(mut n) = NEXT_MR.lock() else {
                return libc::EIO;
            };
            *n += 1;
            // SAFETY: valid out-pointer from the caller.
            unsafe {
                *out = abi::MrV1 {
                    handle: *n,
                    addr: addr as u64,
                    len: len as u64,
                    lkey: 11,
                    rkey: 22,
                }
            };
            0
        }
        unsafe extern "C" fn reg_dmabuf_mr(
            _c: *mut c_void,
            _o: u64,
            _l: usize,
            _i: u64,
            _f: c_int,
            _a: u32,
            _out: *mut abi::MrV1,
        ) -> c_int {
            err(
                libc::EOPNOTSUPP,
                "ibv_reg_dmabuf_mr: Operation not supported",
            )
        }
        unsafe extern "C" fn dmabuf_supported(_c: *mut c_void) -> c_int {
            0
        }
        unsafe extern "C" fn dereg_mr(h: u64) -> c_int {
            call(&format!("dereg {h:#x}"));
            0
        }
        unsafe extern "C" fn create_cq(
            _c: *mut c_void,
            _d: u32,
            cq: *mut *mut c_void,
            fd: *mut c_int,
        ) -> c_int {
            // SAFETY: valid out-pointers from the caller.
            unsafe {
                *cq = &CQ as *const u8 as *mut c_void;
                *fd = 99;
            }
            0
        }
        unsafe extern "C" fn destroy_cq(_c: *mut c_void) -> c_int {
            call("destroy_cq");
            0
        }
        unsafe extern "C" fn poll_cq(
            _c: *mut c_void,
            out: *mut abi::WcV1,
            n: u32,
            got: *mut u32,
        ) -> c_int {
            let Ok(mut p) = PENDING.lock() else {
                return libc::EIO;
            };
            let k = p.len().min(n as usize);
            for (i, w) in p.drain(..k).enumerate() {
                // SAFETY: out holds n >= k entries.
                unsafe { *out.add(i) = w };
            }
            // SAFETY: valid out-pointer.
            unsafe { *got = k as u32 };
            0
        }
        unsafe extern "C" fn arm_cq(_c: *mut c_void) -> c_int {
            0
        }
        unsafe extern "C" fn take_cq_event(_c: *mut c_void, got: *mut u32) -> c_int {
            // SAFETY: valid out-pointer.
            unsafe { *got = 0 };
            0
        }
        unsafe extern "C" fn create_qp(
            _c: *mut c_void,
            cq: *mut c_void,
            _s: u32,
            _r: u32,
            qp: *mut *mut c_void,
            addr: *mut abi::QpAddrV1,
        ) -> c_int {
            assert_eq!(cq, &CQ as *const u8 as *mut c_void);
            // SAFETY: valid out-pointers.
            unsafe {
                *qp = &QP as *const u8 as *mut c_void;
                *addr = abi::QpAddrV1 {
                    lid: 5,
                    _pad: 0,
                    qpn: 0x77,
                    psn: 0x123,
                    gid: [7; 16],
                };
            }
            0
        }
        unsafe extern "C" fn destroy_qp(_q: *mut c_void) -> c_int {
            call("destroy_qp");
            0
        }
        unsafe extern "C" fn connect_qp(
            _q: *mut c_void,
            r: *const abi::QpAddrV1,
            p: *const abi::ConnectParamsV1,
        ) -> c_int {
            if let Ok(mut l) = LAST_CONNECT.lock() {
                // SAFETY: valid pointers from the caller.
                *l = Some(unsafe { (*r, *p) });
            }
            0
        }
        unsafe extern "C" fn post_send(_q: *mut c_void, wr: *const abi::SendWrV1) -> c_int {
            // SAFETY: valid pointer from the caller.
            let w = unsafe { *wr };
            if w.wr_id == 666 {
                return err(libc::ENOMEM, "ibv_post_send: Cannot allocate memory");
            }
            if let Ok(mut l) = LAST_SEND.lock() {
                *l = Some(w);
            }
            0
        }
        unsafe extern "C" fn post_recv(_q: *mut c_void, _id: u64, _s: *const abi::SgeV1) -> c_int {
            0
        }
        unsafe extern "C" fn qp_state(_q: *mut c_void, st: *mut u32) -> c_int {
            // SAFETY: valid out-pointer.
            unsafe { *st = abi::qps::SQE };
            0
        }
        unsafe extern "C" fn wc_status_str(_s: u32) -> *const c_char {
            c"mock status".as_ptr()
        }
        unsafe extern "C" fn last_error(buf: *mut c_char, cap: usize) -> usize {
            let Ok(e) = ERR.lock() else { return 0 };
            let b = e.as_bytes();
            let n = b.len().min(cap - 1);
            // SAFETY: buf holds cap bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(b.as_ptr().cast(), buf, n);
                *buf.add(n) = 0;
            }
            b.len()
        }

        pub static TABLE: abi::PluginV1 = abi::PluginV1 {
            abi_version: abi::ABI_VERSION,
            struct_size: std::mem::size_of::<abi::PluginV1>() as u32,
            name: c"mock".as_ptr(),
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
    }

    fn calls() -> Vec<String> {
        mock::CALLS.lock().map(|c| c.clone()).unwrap_or_default()
    }

    #[test]
    fn nic_over_a_mock_table() {
        use super::super::nic::{status, SendOp, SendWr, Sge, WcOpcode};

        // A named device the plugin does not have: its reason, as it is.
        let named = VerbsOptions {
            device: Some("x".into()),
            ..VerbsOptions::default()
        };
        match open_with(&mock::TABLE, &named) {
            Ok(_) => panic!("opened a missing device"),
            Err(e) => assert!(e.starts_with("RDMA device x not found"), "{e}"),
        }

        let nic = match open_with(&mock::TABLE, &VerbsOptions::default()) {
            Ok(n) => n,
            Err(e) => panic!("{e}"),
        };
        let port = nic.port();
        assert_eq!(port.device, "mock0");
        assert_eq!(port.link_layer, LinkLayer::Ethernet);
        assert_eq!(
            (port.mtu, port.speed_mbps, port.gid),
            (1024, 100_000, [7; 16])
        );
        assert_eq!(nic.status_str(status::RETRY_EXC_ERR), "mock status");
        assert_eq!(
            nic.gpu_path(false),
            gpu_path(false, peermem_loaded(), false)
        );

        // Regions: handles tracked; unknown or repeated deregistration refused before the plugin.
        let mut buf = vec![0u8; 64];
        // SAFETY: buf outlives the registration (deregistered below).
        let mr = match unsafe { nic.reg_mr(buf.as_mut_ptr(), buf.len(), 7) } {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        };
        assert_eq!((mr.len, mr.lkey, mr.rkey), (64, 11, 22));
        let forged = Mr { id: 0xdead, ..mr };
        assert!(nic.dereg_mr(&forged).is_err());
        assert!(nic.dereg_mr(&mr).is_ok());
        assert!(nic.dereg_mr(&mr).is_err());
        assert_eq!(calls().iter().filter(|c| c.starts_with("dereg")).count(), 1);
        // SAFETY: the mock registers nothing.
        match unsafe { nic.reg_dmabuf_mr(3, 0, 64, 0, 7) } {
            Ok(_) => panic!("mock dma-buf registered"),
            Err(e) => assert_eq!(
                e,
                NicError::new("ibv_reg_dmabuf_mr", "Operation not supported")
            ),
        }

        let mut cq = match nic.create_cq(16) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(cq.fd(), 99);

        // A completion queue that is not this NIC's.
        struct Foreign;
        impl Cq for Foreign {
            fn poll(&mut self, _: &mut [Wc]) -> NicResult<usize> {
                Ok(0)
            }
            fn arm(&mut self) -> NicResult<()> {
                Ok(())
            }
            fn take_event(&mut self) -> NicResult<()> {
                Ok(())
            }
            fn fd(&self) -> RawFd {
                -1
            }
            fn handle(&self) -> u64 {
                0xbad
            }
        }
        assert!(nic.create_qp(&Foreign, 4, 4).is_err());

        let mut qp = match nic.create_qp(cq.as_ref(), 4, 4) {
            Ok(q) => q,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(
            (qp.addr().qpn, qp.addr().psn, qp.addr().lid),
            (0x77, 0x123, 5)
        );
        let remote = QpAddr {
            lid: 9,
            gid: [1; 16],
            qpn: 0x88,
            psn: 0x456,
            nic_addr: Vec::new(),
        };
        let params = ConnectParams {
            use_gid: true,
            gid_index: 3,
            ..ConnectParams::default()
        };
        assert!(qp.connect(&remote, &params).is_ok());
        let (r, p) = match mock::LAST_CONNECT.lock().map(|l| *l) {
            Ok(Some(x)) => x,
            _ => panic!("connect not passed through"),
        };
        assert_eq!((r.lid, r.qpn, r.psn, r.gid), (9, 0x88, 0x456, [1; 16]));
        assert_eq!(
            (p.mtu, p.gid_index, p.use_gid, p.rnr_retry),
            (4096, 3, 1, 7)
        );

        let wr = SendWr {
            wr_id: 5,
            op: SendOp::WriteImm {
                remote_addr: 0xabc,
                rkey: 33,
                imm: 0x0102_0304,
            },
            sge: Some(Sge {
                addr: 0x10,
                len: 8,
                lkey: 11,
            }),
            signaled: true,
        };
        assert!(qp.post_send(&wr).is_ok());
        let w = match mock::LAST_SEND.lock().map(|l| *l) {
            Ok(Some(w)) => w,
            _ => panic!("send not passed through"),
        };
        assert_eq!(
            (w.opcode, w.imm, w.remote_addr, w.rkey),
            (abi::OP_WRITE_IMM, 0x0102_0304, 0xabc, 33)
        );
        assert_eq!(
            (w.signaled, w.has_sge, w.sge.addr, w.sge.len, w.sge.lkey),
            (1, 1, 0x10, 8, 11)
        );
        // A failing post: the verbs call name and the errno text.
        let bad = SendWr {
            wr_id: 666,
            op: SendOp::Send,
            sge: None,
            signaled: false,
        };
        assert_eq!(
            qp.post_send(&bad),
            Err(NicError::new("ibv_post_send", "Cannot allocate memory"))
        );
        assert_eq!(qp.state(), QpState::Error);

        // Completions: opcodes, immediates, and more than one plugin batch.
        let mut pending = Vec::new();
        for i in 0..40u64 {
            pending.push(abi::WcV1 {
                wr_id: i,
                opcode: match i % 4 {
                    0 => abi::WC_SEND,
                    1 => abi::WC_RDMA_WRITE,
                    2 => abi::WC_RECV,
                    _ => abi::WC_RECV_RDMA_WITH_IMM,
                },
                byte_len: i as u32,
                imm: 42,
                has_imm: u32::from(i % 4 == 3),
                qpn: 0x77,
                ..abi::WcV1::default()
            });
        }
        if let Ok(mut p) = mock::PENDING.lock() {
            *p = pending;
        }
        let mut out = vec![
            Wc {
                wr_id: 0,
                status: 0,
                opcode: WcOpcode::Send,
                byte_len: 0,
                imm: None,
                qpn: 0,
            };
            64
        ];
        assert_eq!(cq.poll(&mut out).ok(), Some(40));
        assert_eq!(out[1].opcode, WcOpcode::Write);
        assert_eq!(out[2].opcode, WcOpcode::Recv);
        assert_eq!(
            (out[3].opcode, out[3].imm),
            (WcOpcode::RecvRdmaWithImm, Some(42))
        );
        assert_eq!(
            (out[39].wr_id, out[39].byte_len, out[2].imm),
            (39, 39, None)
        );
        assert_eq!(cq.poll(&mut out).ok(), Some(0));

        // The device closes only after its last queue is gone.
        drop(nic);
        assert!(!calls().contains(&"close".to_string()));
        drop(qp);
        drop(cq);
        let c = calls();
        let pos = |s: &str| c.iter().position(|x| x == s);
        assert!(pos("destroy_qp") < pos("destroy_cq"));
        assert!(pos("destroy_cq") < pos("close"));
        assert!(pos("close").is_some());
        drop(buf);
    }
}
