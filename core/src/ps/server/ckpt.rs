//! Checkpoints of the parts this server owns (taken at one consistent version, written in
//! the background) and the restore of a checkpoint at start (`BRAID_PS_RESTORE`).

use std::sync::Arc;

use super::dispatch::Effects;
use super::*;

/// Reads and checks the checkpoint in `dir` (manifest and every file) for `BRAID_PS_RESTORE`.
pub(super) fn open_restore(dir: &std::path::Path, opts: &PsOptions) -> Result<Manifest> {
    let t0 = Instant::now();
    let what = |e: String| {
        Error::InvalidArgument(format!(
            "BRAID_PS_RESTORE={}: {e}; this server does not start",
            dir.display()
        ))
    };
    let m = checkpoint::read_manifest(dir).map_err(what)?;
    if m.partition_bytes != opts.partition_bytes as u64 {
        return Err(what(format!(
            "the checkpoint was made with BRAID_PS_PARTITION_BYTES={}, this server uses {} (keys \
             would split into other parts)",
            m.partition_bytes, opts.partition_bytes
        )));
    }
    checkpoint::verify_files(dir, &m).map_err(what)?;
    let bytes: u64 = m.files.iter().map(|f| f.bytes).sum();
    tracing::info!(target: "braid::ps", "restore: checkpoint {} in {} checked: {} file(s), {} part(s), {bytes} bytes, version {}..{} ({:.2} s)", m.id, dir.display(), m.files.len(), m.parts.len(), m.version, m.max_version, t0.elapsed().as_secs_f64());
    Ok(m)
}

/// Loads the parts of a checked checkpoint that server `me` holds on the ring of `view` (owner
/// or replica) into `store`, and their applied-write records into `dedup`; returns the key
/// directory of every part of the checkpoint.
pub(super) fn load_restore(
    me: u64,
    view: &View,
    opts: &PsOptions,
    dir: &std::path::Path,
    m: &Manifest,
    store: &mut Store,
    dedup: &mut Dedup,
) -> Result<Map<u64, (u64, u32)>> {
    let ring = ring_of(view);
    let what = |e: String| {
        Error::InvalidArgument(format!(
            "BRAID_PS_RESTORE={}: {e}; this server does not start",
            dir.display()
        ))
    };
    let loaded = checkpoint::load_parts(dir, m, |s| ring.owners(s, opts.replicas).contains(&me))
        .map_err(what)?;
    let mut dumps = Vec::with_capacity(loaded.len());
    for (e, data) in loaded {
        for &(w, op) in &e.applied {
            dedup.first(w, op, e.s, e.version);
        }
        let dt = DataType::parse(&e.dtype)
            .ok_or_else(|| what(format!("key {} part {}: dtype {}", e.k, e.p, e.dtype)))?;
        dumps.push(KeyDump::restored(e.s, dt, e.version, data)?);
    }
    let n = dumps.len();
    let _ = store.import(dumps);
    if m.mode != mode_name(opts.consistency) {
        tracing::warn!(target: "braid::ps", "server {me}: restoring a checkpoint of a group in {} mode into {} mode", m.mode, mode_name(opts.consistency));
    }
    tracing::info!(target: "braid::ps", "server {me}: restored {n} of {} part(s) of checkpoint {} (version {}..{}) from {}", m.parts.len(), m.id, m.version, m.max_version, dir.display());
    Ok(m.parts.iter().map(|p| (p.s, (p.k, p.p))).collect())
}

/// Takes in a checkpoint request from worker `from` (see [`super`], "Checkpoints, exactly").
pub(super) fn accept_checkpoint(
    inner: &SInner,
    st: &mut SState,
    from: u64,
    req: u64,
    id: &str,
    dir: &str,
) -> std::result::Result<(), String> {
    if !checkpoint::valid_id(id) {
        return Err(format!("invalid checkpoint id {id:?}"));
    }
    let dir = checkpoint::check_dir(dir)?;
    if let Some(w) = &st.ckpt_writing {
        return Err(format!(
            "server {} is still writing checkpoint {w}: checkpoint {id} not taken",
            inner.me
        ));
    }
    if let Some(j) = &st.ckpt {
        return Err(format!(
            "server {} is taking checkpoint {}: checkpoint {id} not taken",
            inner.me, j.id
        ));
    }
    let me = Some(inner.me);
    if let Some((k, p)) = st
        .dir
        .iter()
        .find(|(s, _)| st.ring.owner(**s) == me && st.store.version(**s).is_none())
        .map(|(_, kp)| *kp)
    {
        return Err(format!(
            "key {k} part {p} has no copy on its owner, server {} (lost, or on its way after a \
             view change): checkpoint {id} not taken",
            inner.me
        ));
    }
    let sync = inner.opts.consistency == Consistency::Sync;
    let targets: Vec<(u64, u64)> = st
        .store
        .keys()
        .filter(|s| st.ring.owner(*s) == me)
        .map(|s| {
            let v = st.store.version(s).unwrap_or(0);
            let t = if sync {
                st.store.last_round(s, from).map_or(v, |r| r.max(v))
            } else {
                v
            };
            (s, t)
        })
        .collect();
    st.ckpt = Some(CkptJob {
        worker: from,
        req,
        id: id.to_string(),
        dir,
        targets,
        epoch: st.view.epoch,
        since: Instant::now(),
    });
    Ok(())
}

/// Starts writing the pending checkpoint once every part reached its version: each part's
/// version is pinned in the store (kept readable while the store goes on), and a thread copies
/// the parts one at a time, each under the state lock, and writes them. Fails it (answering
/// the worker) on a view change, a version no longer held, or after the operation timeout.
pub(super) fn poll_checkpoint(inner: &Arc<SInner>, st: &mut SState, outbox: &mut Vec<Out>) {
    let Some(job) = &st.ckpt else {
        return;
    };
    let fail = |job: &CkptJob, msg: String, outbox: &mut Vec<Out>| {
        tracing::warn!(target: "braid::ps", "server {}: checkpoint {}: {msg}", inner.me, job.id);
        outbox.push((
            job.worker,
            i32::MAX,
            Msg::Fail {
                req: job.req,
                msg,
                retry: false,
            },
            Vec::new(),
        ));
    };
    if job.epoch != st.view.epoch {
        let msg = format!(
            "the view changed (epoch {} to {}) during checkpoint {}: not taken",
            job.epoch, st.view.epoch, job.id
        );
        if let Some(job) = st.ckpt.take() {
            fail(&job, msg, outbox);
        }
        return;
    }
    let ready = job
        .targets
        .iter()
        .all(|(s, t)| st.store.version(*s).map_or(true, |v| v >= *t));
    if !ready {
        if job.since.elapsed() > inner.timeout {
            let msg = format!(
                "the sync rounds checkpoint {} covers did not close within {:.0} s",
                job.id,
                inner.timeout.as_secs_f64()
            );
            if let Some(job) = st.ckpt.take() {
                fail(&job, msg, outbox);
            }
        }
        return;
    }
    let Some(job) = st.ckpt.take() else {
        return;
    };
    let mut metas = Vec::with_capacity(job.targets.len());
    let mut missing = None;
    // The writes each part's value at its version includes: a retry of one of them reaching a
    // server restored from this checkpoint is acknowledged, not applied again.
    let mut applied = st
        .dedup
        .applied_upto(&job.targets.iter().copied().collect());
    for &(s, t) in &job.targets {
        let Some(&(k, p)) = st.dir.get(&s) else {
            missing = Some(format!(
                "part {s:#x} is not in the key directory: checkpoint {} not taken",
                job.id
            ));
            break;
        };
        let (Some(len), Some(dtype)) = (
            st.store.read_at(s, t).map(|d| d.len() as u64),
            st.store.dtype(s),
        ) else {
            missing = Some(format!(
                "key {k} part {p}: version {t} is no longer held (parts keep their last {} \
                 versions): checkpoint {} not taken",
                inner.opts.history.max(1),
                job.id
            ));
            break;
        };
        st.store.pin(s, t);
        metas.push(PartMeta {
            s,
            k,
            p,
            dtype,
            version: t,
            len,
            applied: applied.remove(&s).unwrap_or_default(),
        });
    }
    if let Some(msg) = missing {
        for m in &metas {
            st.store.unpin(m.s);
        }
        fail(&job, msg, outbox);
        return;
    }
    let known = st.dir.len() as u64;
    let epoch = st.view.epoch;
    st.ckpt_writing = Some(job.id.clone());
    let writer = inner.clone();
    let (worker, req, id) = (job.worker, job.req, job.id.clone());
    let spawned = std::thread::Builder::new()
        .name(format!("braid-ps-ckpt-{}", inner.me))
        .spawn(move || write_checkpoint(writer, job, metas, epoch, known));
    if let Err(e) = spawned {
        st.ckpt_writing = None;
        let job = CkptJob {
            worker,
            req,
            id,
            dir: std::path::PathBuf::new(),
            targets: Vec::new(),
            epoch,
            since: Instant::now(),
        };
        // The pins go with the thread that was not started.
        for s in st.store.keys().collect::<Vec<_>>() {
            st.store.unpin(s);
        }
        fail(
            &job,
            format!("cannot start the checkpoint writer thread: {e}"),
            outbox,
        );
    }
}

/// The checkpoint writer thread: copies each part at its pinned version under the state lock
/// (one part per lock hold, into a reused buffer), unpins it and writes it; then answers the
/// worker with the part entries and the file's entry (or the failure).
pub(super) fn write_checkpoint(
    inner: Arc<SInner>,
    job: CkptJob,
    metas: Vec<PartMeta>,
    epoch: u64,
    known: u64,
) {
    let t0 = Instant::now();
    let mut longest = Duration::ZERO;
    let res = checkpoint::write_server_file(&job.dir, &job.id, inner.me, &metas, |i, buf| {
        let m = &metas[i];
        let mut st = lock(&inner.st);
        let held = Instant::now();
        let r = match st.store.read_at(m.s, m.version) {
            Some(d) => {
                buf.extend_from_slice(d);
                Ok(())
            }
            None => Err(format!(
                "key {} part {} left this server during the checkpoint",
                m.k, m.p
            )),
        };
        st.store.unpin(m.s);
        longest = longest.max(held.elapsed());
        r
    });
    let bytes: u64 = metas.iter().map(|m| m.len).sum();
    let write = t0.elapsed();
    let mut out = Vec::new();
    match res {
        Ok((file, parts)) => {
            tracing::info!(target: "braid::ps", "server {}: checkpoint {}: {} part(s), {bytes} bytes written to {} in {:.3} s (longest copy under the state lock {:.6} s)", inner.me, job.id, parts.len(), job.dir.join(&file.name).display(), write.as_secs_f64(), longest.as_secs_f64());
            for c in ckpt_chunks(parts) {
                out.push((
                    job.worker,
                    i32::MAX,
                    Msg::CkptParts {
                        req: job.req,
                        parts: c,
                    },
                    Vec::new(),
                ));
            }
            out.push((
                job.worker,
                i32::MAX,
                Msg::Checkpointed {
                    req: job.req,
                    file,
                    epoch,
                    known,
                    copy_us: longest.as_micros() as u64,
                    write_us: write.as_micros() as u64,
                },
                Vec::new(),
            ));
        }
        Err(e) => {
            tracing::error!(target: "braid::ps", "server {}: checkpoint {}: {e}", inner.me, job.id);
            out.push((
                job.worker,
                i32::MAX,
                Msg::Fail {
                    req: job.req,
                    msg: format!("server {}: checkpoint {}: {e}", inner.me, job.id),
                    retry: false,
                },
                Vec::new(),
            ));
        }
    }
    {
        let mut st = lock(&inner.st);
        for m in &metas {
            st.store.unpin(m.s);
        }
        st.ckpt_writing = None;
    }
    flush(&inner, out, Vec::new());
}

/// The part entries of a checkpoint answer in messages of at most [`MAX_CKPT_CHUNK`] entries
/// and about [`CKPT_CHUNK_BYTES`] of header each (an entry with its applied-write records
/// counted at their largest encoding), well inside what a worker reads.
fn ckpt_chunks(parts: Vec<PartEntry>) -> Vec<Vec<PartEntry>> {
    let mut out = Vec::new();
    let mut cur: Vec<PartEntry> = Vec::new();
    let mut bytes = 0;
    for p in parts {
        let b = 256 + 48 * p.applied.len();
        if !cur.is_empty() && (cur.len() >= MAX_CKPT_CHUNK || bytes + b > CKPT_CHUNK_BYTES) {
            out.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        bytes += b;
        cur.push(p);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Fails a pending checkpoint whose deadline passed (called by the watcher).
pub(super) fn expire_checkpoint(inner: &Arc<SInner>) {
    let mut out = Vec::new();
    {
        let mut guard = lock(&inner.st);
        let st = &mut *guard;
        if st.ckpt.is_none() {
            return;
        }
        poll_checkpoint(inner, st, &mut out);
    }
    flush(inner, out, Vec::new());
}

/// A worker's checkpoint request: taken in (answered once its rounds closed and the file is
/// written), or refused.
pub(super) fn on_checkpoint(
    inner: &Arc<SInner>,
    st: &mut SState,
    from: u64,
    req: u64,
    id: &str,
    dir: &str,
    fx: &mut Effects,
) {
    match accept_checkpoint(inner, st, from, req, id, dir) {
        Ok(()) => poll_checkpoint(inner, st, &mut fx.outbox),
        Err(msg) => {
            tracing::warn!(target: "braid::ps", "server {}: checkpoint request of worker {from}: {msg}", inner.me);
            fx.outbox.push((
                from,
                i32::MAX,
                Msg::Fail {
                    req,
                    msg,
                    retry: false,
                },
                Vec::new(),
            ));
        }
    }
}
