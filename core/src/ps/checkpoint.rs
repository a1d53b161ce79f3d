//! Checkpoints of the push/pull servers' state: the on-disk format, its writer and its checked
//! reader (no sockets here; the protocol that takes a checkpoint is in `server/ckpt.rs`
//! and `worker.rs`).
//!
//! # Layout of a checkpoint directory
//! * `ckpt-<ID>-s<SERVER>.bin`: one file per server (`SERVER`: its member id): a 64-byte header
//!   (magic `BRPSCKP1`, the server id as u64 little-endian, the checkpoint id as ASCII padded
//!   with zeros to 48 bytes), then the values of the parts that server owned, back to back
//!   (native byte order, as the servers hold them). Every byte after the header belongs to
//!   exactly one part.
//! * `manifest.json`: [`Manifest`]: the checkpoint id, group, consistency mode, partition size,
//!   view epoch, versions, the files (name, server, byte length, checksum) and every part (store
//!   key, user key, part index, dtype, version, file, offset, byte length, checksum, and the
//!   latest (worker, op) writes its value includes, so a restored server does not apply a
//!   retried one twice), and a checksum of the manifest itself.
//!
//! Checksums are XXH64 (seed 0) as 16 lowercase hex digits: of a part's bytes; of a file, over
//! its header followed by the checksums of its parts in file order (little-endian u64), so one
//! pass over the data checks both; of the manifest, over its compact JSON with `hash` empty.
//!
//! # Crash safety
//! Every file is written under a temporary name (`.tmp`), flushed to disk (`fsync`) and renamed;
//! the manifest is renamed last, and server files carry the checkpoint id in their names, so a
//! crash at any point leaves the previous manifest and every file it names intact. Files of
//! older checkpoints are removed only after the new manifest is in place.
//!
//! # Reading
//! [`Manifest::decode`] checks the manifest's checksum and that it is well formed (file names of
//! this format only, so it never points outside its directory; offsets and lengths inside their
//! files with checked arithmetic; every file covered exactly by its parts; known dtypes, whole
//! elements; store keys matching user key and part index; no part twice). [`verify_files`]
//! then reads every file once, in bounded chunks, checking length, header and checksums;
//! [`load_parts`] reads the parts a server holds. Any failure names the file.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::shard::part_key;
use crate::types::DataType;

/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";
/// `format` of a manifest.
pub const FORMAT: &str = "braid-ps-checkpoint";
/// `format_version` written and read by this build.
pub const FORMAT_VERSION: u32 = 1;
/// Magic of a server file.
const FILE_MAGIC: &[u8; 8] = b"BRPSCKP1";
/// Bytes of a server file's header.
pub const HEADER_LEN: u64 = 64;
/// Longest checkpoint id (lowercase hex digits).
pub const MAX_ID_LEN: usize = 48;
/// Longest checkpoint directory path accepted from a peer or a user (bytes).
pub const MAX_DIR_LEN: usize = 4096;
/// Largest manifest read (checked against the file's length before reading it).
pub const MAX_MANIFEST_BYTES: u64 = 256 << 20;
/// Chunk in which files are read and checked.
const CHUNK: usize = 1 << 20;

/// XXH64 (the xxHash 64-bit hash), streaming.
#[derive(Debug, Clone)]
pub struct Xxh64 {
    v: [u64; 4],
    total: u64,
    buf: [u8; 32],
    buf_len: usize,
    seed: u64,
}

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

fn xround(acc: u64, input: u64) -> u64 {
    acc.wrapping_add(input.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

fn xmerge(acc: u64, v: u64) -> u64 {
    (acc ^ xround(0, v)).wrapping_mul(P1).wrapping_add(P4)
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

impl Xxh64 {
    /// A hasher with `seed`.
    pub fn new(seed: u64) -> Xxh64 {
        Xxh64 {
            v: [
                seed.wrapping_add(P1).wrapping_add(P2),
                seed.wrapping_add(P2),
                seed,
                seed.wrapping_sub(P1),
            ],
            total: 0,
            buf: [0; 32],
            buf_len: 0,
            seed,
        }
    }

    fn stripes(&mut self, data: &[u8]) {
        for s in data.chunks_exact(32) {
            self.v[0] = xround(self.v[0], le64(&s[0..]));
            self.v[1] = xround(self.v[1], le64(&s[8..]));
            self.v[2] = xround(self.v[2], le64(&s[16..]));
            self.v[3] = xround(self.v[3], le64(&s[24..]));
        }
    }

    /// Adds `data`.
    pub fn update(&mut self, mut data: &[u8]) {
        self.total = self.total.wrapping_add(data.len() as u64);
        if self.buf_len > 0 {
            let take = (32 - self.buf_len).min(data.len());
            self.buf[self.buf_len..self.buf_len + take].copy_from_slice(&data[..take]);
            self.buf_len += take;
            data = &data[take..];
            if self.buf_len < 32 {
                return;
            }
            let b = self.buf;
            self.stripes(&b);
            self.buf_len = 0;
        }
        let whole = data.len() / 32 * 32;
        self.stripes(&data[..whole]);
        let rest = &data[whole..];
        self.buf[..rest.len()].copy_from_slice(rest);
        self.buf_len = rest.len();
    }

    /// The hash of everything added.
    pub fn digest(&self) -> u64 {
        let [v1, v2, v3, v4] = self.v;
        let mut h = if self.total >= 32 {
            let mut h = v1
                .rotate_left(1)
                .wrapping_add(v2.rotate_left(7))
                .wrapping_add(v3.rotate_left(12))
                .wrapping_add(v4.rotate_left(18));
            for v in [v1, v2, v3, v4] {
                h = xmerge(h, v);
            }
            h
        } else {
            self.seed.wrapping_add(P5)
        };
        h = h.wrapping_add(self.total);
        let mut rest = &self.buf[..self.buf_len];
        while rest.len() >= 8 {
            h ^= xround(0, le64(rest));
            h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
            rest = &rest[8..];
        }
        if rest.len() >= 4 {
            h ^= u64::from(le32(rest)).wrapping_mul(P1);
            h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
            rest = &rest[4..];
        }
        for &b in rest {
            h ^= u64::from(b).wrapping_mul(P5);
            h = h.rotate_left(11).wrapping_mul(P1);
        }
        h ^= h >> 33;
        h = h.wrapping_mul(P2);
        h ^= h >> 29;
        h = h.wrapping_mul(P3);
        h ^ (h >> 32)
    }
}

/// XXH64 of `data` with seed 0.
pub fn xxh64(data: &[u8]) -> u64 {
    let mut h = Xxh64::new(0);
    h.update(data);
    h.digest()
}

fn hex(h: u64) -> String {
    format!("{h:016x}")
}

/// One file of a checkpoint (a server's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// File name in the checkpoint directory (`ckpt-<ID>-s<SERVER>.bin`).
    pub name: String,
    /// The member id of the server that wrote it.
    pub server: u64,
    /// Its length in bytes.
    pub bytes: u64,
    /// XXH64 over its header and its parts' checksums (16 hex digits).
    pub hash: String,
}

/// One part of a key in a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartEntry {
    /// Store key (`shard::part_key(k, p)`).
    pub s: u64,
    /// User key.
    pub k: u64,
    /// Part index.
    pub p: u32,
    /// Element type (its name, e.g. `float`).
    pub dtype: String,
    /// The part's version (sync: closed rounds; async/bounded: applied pushes).
    pub version: u64,
    /// Index of its file in [`Manifest::files`].
    pub file: u32,
    /// Byte offset in that file.
    pub offset: u64,
    /// Byte length.
    pub len: u64,
    /// XXH64 of its bytes (16 hex digits).
    pub hash: String,
    /// The latest (worker, op) writes its value includes, as its server recorded them (at most
    /// [`MAX_APPLIED`]): a server restored from the checkpoint acknowledges a retry of one of
    /// them (its first acknowledgement lost when every server died) without applying it
    /// again. Absent in checkpoints of earlier builds (nothing is deduplicated then).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applied: Vec<(u64, u64)>,
}

/// Most [`PartEntry::applied`] records of one part.
pub const MAX_APPLIED: usize = 4096;

/// The manifest of a checkpoint (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Checkpoint id (lowercase hex; later checkpoints have larger ids of the same length).
    pub id: String,
    /// The group whose state it holds.
    pub group: String,
    /// Consistency mode of the group (`sync`, `async`, `bounded:TAU`).
    pub mode: String,
    /// `BRAID_PS_PARTITION_BYTES` of the group (parts are split by it).
    pub partition_bytes: u64,
    /// The view epoch every server took its part at.
    pub epoch: u64,
    /// The smallest part version (sync: the round boundary of the checkpoint).
    pub version: u64,
    /// The largest part version (equal to `version` when every key is in the same round).
    pub max_version: u64,
    /// When the manifest was written (milliseconds since the Unix epoch).
    pub created_unix_ms: u64,
    /// One file per server.
    pub files: Vec<FileEntry>,
    /// Every part (the per-part versions are the version vector in async mode).
    pub parts: Vec<PartEntry>,
    /// XXH64 of the compact JSON of this manifest with this field empty (16 hex digits).
    #[serde(default)]
    pub hash: String,
}

/// A part a server writes (its bytes are fetched one part at a time, see
/// [`write_server_file`]).
#[derive(Debug, Clone)]
pub(crate) struct PartMeta {
    pub s: u64,
    pub k: u64,
    pub p: u32,
    pub dtype: DataType,
    pub version: u64,
    pub len: u64,
    /// See [`PartEntry::applied`].
    pub applied: Vec<(u64, u64)>,
}

/// Whether `id` is a valid checkpoint id.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether checkpoint id `a` is older than `b` (ids grow in length, then in order).
pub fn id_older(a: &str, b: &str) -> bool {
    (a.len(), a) < (b.len(), b)
}

/// A fresh checkpoint id: the time in nanoseconds, then `salt` (e.g. the member id), as hex.
pub fn new_id(salt: u64) -> String {
    let ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!("{ns:016x}{:08x}", salt & 0xffff_ffff)
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The name of server `server`'s file of checkpoint `id`.
pub fn file_name(id: &str, server: u64) -> String {
    format!("ckpt-{id}-s{server}.bin")
}

/// Checks a checkpoint directory path from a peer or a user: absolute, at most
/// [`MAX_DIR_LEN`] bytes, no control characters.
pub fn check_dir(dir: &str) -> std::result::Result<PathBuf, String> {
    if dir.len() > MAX_DIR_LEN {
        return Err(format!(
            "checkpoint directory of {} bytes (at most {MAX_DIR_LEN})",
            dir.len()
        ));
    }
    if dir.chars().any(char::is_control) {
        return Err("checkpoint directory with control characters".into());
    }
    let p = PathBuf::from(dir);
    if !p.is_absolute() {
        return Err(format!(
            "checkpoint directory {dir:?} is not an absolute path"
        ));
    }
    Ok(p)
}

fn header(id: &str, server: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(FILE_MAGIC);
    h[8..16].copy_from_slice(&server.to_le_bytes());
    let n = id.len().min(MAX_ID_LEN);
    h[16..16 + n].copy_from_slice(&id.as_bytes()[..n]);
    h
}

/// Syncs a directory (so renames in it survive a crash); best effort.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Writes server `server`'s file of checkpoint `id` into `dir` (temporary name, fsync,
/// rename); returns its entry and its parts' entries (`file` 0: the manifest writer numbers
/// the files). `fetch(i, buf)` fills `buf` (empty on entry, reused from part to part) with the
/// bytes of part `i`.
///
/// Errors: I/O errors, naming the file; `fetch`'s errors; a part whose bytes differ in length
/// from its entry.
pub(crate) fn write_server_file(
    dir: &Path,
    id: &str,
    server: u64,
    metas: &[PartMeta],
    mut fetch: impl FnMut(usize, &mut Vec<u8>) -> std::result::Result<(), String>,
) -> std::result::Result<(FileEntry, Vec<PartEntry>), String> {
    let name = file_name(id, server);
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(&name);
    let io = |what: &str, p: &Path, e: std::io::Error| format!("{what} {}: {e}", p.display());
    std::fs::create_dir_all(dir).map_err(|e| io("creating", dir, e))?;
    let f = File::create(&tmp).map_err(|e| io("creating", &tmp, e))?;
    let mut w = BufWriter::with_capacity(CHUNK, f);
    let hdr = header(id, server);
    w.write_all(&hdr).map_err(|e| io("writing", &tmp, e))?;
    let mut fh = Xxh64::new(0);
    fh.update(&hdr);
    let mut off = HEADER_LEN;
    let mut parts = Vec::with_capacity(metas.len());
    let mut buf = Vec::new();
    for (i, s) in metas.iter().enumerate() {
        buf.clear();
        fetch(i, &mut buf)?;
        let len = buf.len() as u64;
        if len != s.len {
            return Err(format!(
                "key {} part {}: {len} bytes, {} expected",
                s.k, s.p, s.len
            ));
        }
        let h = xxh64(&buf);
        w.write_all(&buf).map_err(|e| io("writing", &tmp, e))?;
        fh.update(&h.to_le_bytes());
        parts.push(PartEntry {
            s: s.s,
            k: s.k,
            p: s.p,
            dtype: s.dtype.name().to_string(),
            version: s.version,
            file: 0,
            offset: off,
            len,
            hash: hex(h),
            applied: s.applied.clone(),
        });
        off = off.saturating_add(len);
    }
    let f = w
        .into_inner()
        .map_err(|e| io("writing", &tmp, e.into_error()))?;
    f.sync_all().map_err(|e| io("syncing", &tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(|e| io("renaming", &tmp, e))?;
    sync_dir(dir);
    Ok((
        FileEntry {
            name,
            server,
            bytes: off,
            hash: hex(fh.digest()),
        },
        parts,
    ))
}

impl Manifest {
    /// Sets [`Manifest::hash`].
    pub fn seal(&mut self) {
        self.hash = String::new();
        let h = xxh64(&serde_json::to_vec(self).unwrap_or_default());
        self.hash = hex(h);
    }

    /// Whether [`Manifest::hash`] matches the contents.
    fn hash_ok(&self) -> bool {
        let mut m = self.clone();
        m.seal();
        m.hash == self.hash
    }

    /// Decodes and checks a manifest (see the module documentation).
    ///
    /// Errors: what is wrong, naming the field.
    pub fn decode(bytes: &[u8]) -> std::result::Result<Manifest, String> {
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| format!("corrupt manifest: {e}"))?;
        if m.format != FORMAT {
            return Err(format!("not a {FORMAT} manifest (format {:?})", m.format));
        }
        if m.format_version != FORMAT_VERSION {
            return Err(format!(
                "manifest format version {} (this build reads {FORMAT_VERSION})",
                m.format_version
            ));
        }
        if !m.hash_ok() {
            return Err(format!(
                "manifest checksum mismatch (it says {:?}): the manifest is corrupt",
                m.hash
            ));
        }
        m.validate()?;
        Ok(m)
    }

    /// Checks that the manifest is well formed (see the module documentation).
    ///
    /// Errors: what is wrong.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !valid_id(&self.id) {
            return Err(format!("invalid checkpoint id {:?}", self.id));
        }
        let mut names = HashSet::new();
        for f in &self.files {
            if f.name != file_name(&self.id, f.server) {
                return Err(format!(
                    "file {:?} of server {} is not named {}",
                    f.name,
                    f.server,
                    file_name(&self.id, f.server)
                ));
            }
            if !names.insert(f.name.as_str()) {
                return Err(format!("file {} listed twice", f.name));
            }
            if f.bytes < HEADER_LEN || !valid_hash(&f.hash) {
                return Err(format!("file {}: bad length or checksum", f.name));
            }
        }
        let mut seen = HashSet::new();
        let mut by_file: BTreeMap<u32, Vec<(u64, u64)>> = BTreeMap::new();
        for p in &self.parts {
            let what = || format!("key {} part {}", p.k, p.p);
            let f = self
                .files
                .get(p.file as usize)
                .ok_or_else(|| format!("{}: file index {} out of range", what(), p.file))?;
            let dt = DataType::parse(&p.dtype)
                .ok_or_else(|| format!("{}: unknown dtype {:?}", what(), p.dtype))?;
            if p.len % dt.size() as u64 != 0 {
                return Err(format!(
                    "{}: {} bytes is not a whole number of {} elements",
                    what(),
                    p.len,
                    dt.name()
                ));
            }
            let end = p
                .offset
                .checked_add(p.len)
                .filter(|e| p.offset >= HEADER_LEN && *e <= f.bytes)
                .ok_or_else(|| {
                    format!(
                        "{}: bytes {}+{} outside file {} ({} bytes)",
                        what(),
                        p.offset,
                        p.len,
                        f.name,
                        f.bytes
                    )
                })?;
            if p.s != part_key(p.k, p.p) {
                return Err(format!("{}: store key {:#x} does not match", what(), p.s));
            }
            if !seen.insert(p.s) {
                return Err(format!("{} listed twice", what()));
            }
            if !valid_hash(&p.hash) {
                return Err(format!("{}: bad checksum {:?}", what(), p.hash));
            }
            if p.applied.len() > MAX_APPLIED {
                return Err(format!(
                    "{}: {} applied-write records (at most {MAX_APPLIED})",
                    what(),
                    p.applied.len()
                ));
            }
            if p.version < self.version || p.version > self.max_version {
                return Err(format!(
                    "{}: version {} outside {}..={}",
                    what(),
                    p.version,
                    self.version,
                    self.max_version
                ));
            }
            by_file.entry(p.file).or_default().push((p.offset, end));
        }
        // Every byte after a header belongs to exactly one part.
        for (i, f) in self.files.iter().enumerate() {
            let mut spans = by_file.remove(&(i as u32)).unwrap_or_default();
            spans.sort_unstable();
            let mut at = HEADER_LEN;
            for (o, e) in spans {
                if o != at {
                    return Err(format!(
                        "file {}: parts leave a gap or overlap at byte {at}",
                        f.name
                    ));
                }
                at = e;
            }
            if at != f.bytes {
                return Err(format!(
                    "file {}: its parts end at byte {at}, the file has {}",
                    f.name, f.bytes
                ));
            }
        }
        Ok(())
    }
}

fn valid_hash(h: &str) -> bool {
    h.len() == 16
        && h.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Reads and checks `dir/manifest.json`.
///
/// Errors: missing, too large, corrupt or malformed, naming the file.
pub fn read_manifest(dir: &Path) -> std::result::Result<Manifest, String> {
    let path = dir.join(MANIFEST);
    let f = File::open(&path).map_err(|e| format!("{}: cannot open: {e}", path.display()))?;
    let len = f
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    if len > MAX_MANIFEST_BYTES {
        return Err(format!(
            "{}: {len} bytes, larger than the {MAX_MANIFEST_BYTES}-byte limit of a manifest",
            path.display()
        ));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.take(MAX_MANIFEST_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Manifest::decode(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// Opens file `i` of `m` in `dir`, checking that it exists, has the manifest's length and the
/// header of this checkpoint and server.
fn open_checked(
    dir: &Path,
    m: &Manifest,
    f: &FileEntry,
) -> std::result::Result<(BufReader<File>, PathBuf), String> {
    let path = dir.join(&f.name);
    let p = path.display();
    let file = File::open(&path).map_err(|e| format!("{p}: missing or unreadable: {e}"))?;
    let len = file.metadata().map_err(|e| format!("{p}: {e}"))?.len();
    if len != f.bytes {
        return Err(format!(
            "{p}: {} ({len} bytes, the manifest says {})",
            if len < f.bytes {
                "truncated"
            } else {
                "too long"
            },
            f.bytes
        ));
    }
    let mut r = BufReader::with_capacity(CHUNK, file);
    let mut hdr = [0u8; HEADER_LEN as usize];
    r.read_exact(&mut hdr)
        .map_err(|e| format!("{p}: reading its header: {e}"))?;
    if hdr != header(&m.id, f.server) {
        return Err(format!(
            "{p}: corrupt header (not server {}'s file of checkpoint {})",
            f.server, m.id
        ));
    }
    Ok((r, path))
}

/// The parts of file `i`, in file order.
fn parts_of(m: &Manifest, i: usize) -> Vec<&PartEntry> {
    let mut v: Vec<&PartEntry> = m.parts.iter().filter(|p| p.file as usize == i).collect();
    v.sort_by_key(|p| p.offset);
    v
}

/// Reads every file of `m` once (in chunks of 1 MiB; nothing sized by the file is allocated)
/// and checks its length, header, every part's checksum and the file's checksum.
///
/// Errors: the first problem, naming the file (missing, truncated, corrupt, checksum
/// mismatch).
pub fn verify_files(dir: &Path, m: &Manifest) -> std::result::Result<(), String> {
    let mut buf = vec![0u8; CHUNK];
    for (i, f) in m.files.iter().enumerate() {
        let (mut r, path) = open_checked(dir, m, f)?;
        let p = path.display();
        let mut fh = Xxh64::new(0);
        fh.update(&header(&m.id, f.server));
        for part in parts_of(m, i) {
            let mut h = Xxh64::new(0);
            let mut left = part.len;
            while left > 0 {
                let n = left.min(CHUNK as u64) as usize;
                r.read_exact(&mut buf[..n])
                    .map_err(|e| format!("{p}: reading key {} part {}: {e}", part.k, part.p))?;
                h.update(&buf[..n]);
                left -= n as u64;
            }
            let got = hex(h.digest());
            if got != part.hash {
                return Err(format!(
                    "{p}: checksum mismatch in key {} part {} (bytes {}..{}): xxh64 {got}, the manifest says {}",
                    part.k,
                    part.p,
                    part.offset,
                    part.offset + part.len,
                    part.hash
                ));
            }
            fh.update(&h.digest().to_le_bytes());
        }
        let got = hex(fh.digest());
        if got != f.hash {
            return Err(format!(
                "{p}: file checksum mismatch: xxh64 {got}, the manifest says {}",
                f.hash
            ));
        }
    }
    Ok(())
}

/// Reads the parts for which `pick(store key)` is true, checking each one's checksum (lengths
/// are checked against the files' real lengths before anything is allocated).
///
/// Errors: as [`verify_files`], naming the file.
pub(crate) fn load_parts(
    dir: &Path,
    m: &Manifest,
    pick: impl Fn(u64) -> bool,
) -> std::result::Result<Vec<(PartEntry, Vec<u8>)>, String> {
    let mut out = Vec::new();
    for (i, f) in m.files.iter().enumerate() {
        let wanted: Vec<&PartEntry> = parts_of(m, i).into_iter().filter(|p| pick(p.s)).collect();
        if wanted.is_empty() {
            continue;
        }
        // The length is checked here, so the offsets the (validated) manifest gives are in it.
        let (mut r, path) = open_checked(dir, m, f)?;
        let p = path.display();
        for part in wanted {
            r.seek(SeekFrom::Start(part.offset))
                .map_err(|e| format!("{p}: {e}"))?;
            let mut data = vec![0u8; part.len as usize];
            r.read_exact(&mut data)
                .map_err(|e| format!("{p}: reading key {} part {}: {e}", part.k, part.p))?;
            let got = hex(xxh64(&data));
            if got != part.hash {
                return Err(format!(
                    "{p}: checksum mismatch in key {} part {}: xxh64 {got}, the manifest says {}",
                    part.k, part.p, part.hash
                ));
            }
            out.push((part.clone(), data));
        }
    }
    Ok(out)
}

/// Writes `m` (sealed here) as the directory's manifest: temporary name, fsync, rename, then
/// removes the files of older checkpoints.
///
/// Errors: I/O errors; a newer checkpoint's manifest already in place (it is kept).
pub fn write_manifest(dir: &Path, m: &mut Manifest) -> std::result::Result<(), String> {
    m.seal();
    if let Ok(cur) = read_manifest(dir) {
        if id_older(&m.id, &cur.id) {
            return Err(format!(
                "{}: a newer checkpoint ({}) was written meanwhile; checkpoint {} not installed",
                dir.join(MANIFEST).display(),
                cur.id,
                m.id
            ));
        }
    }
    let bytes = serde_json::to_vec_pretty(m).map_err(|e| format!("encoding the manifest: {e}"))?;
    let tmp = dir.join(format!("{MANIFEST}.{}.tmp", m.id));
    let io = |what: &str, p: &Path, e: std::io::Error| format!("{what} {}: {e}", p.display());
    let mut f = File::create(&tmp).map_err(|e| io("creating", &tmp, e))?;
    f.write_all(&bytes).map_err(|e| io("writing", &tmp, e))?;
    f.sync_all().map_err(|e| io("syncing", &tmp, e))?;
    drop(f);
    let path = dir.join(MANIFEST);
    std::fs::rename(&tmp, &path).map_err(|e| io("renaming", &tmp, e))?;
    sync_dir(dir);
    remove_older(dir, &m.id);
    Ok(())
}

/// The checkpoint id in a file name of this format (`ckpt-<ID>-s<N>.bin[.tmp]`,
/// `manifest.json.<ID>.tmp`).
fn id_in_name(name: &str) -> Option<&str> {
    if let Some(rest) = name.strip_prefix("ckpt-") {
        let rest = rest.strip_suffix(".tmp").unwrap_or(rest);
        let rest = rest.strip_suffix(".bin")?;
        let (id, server) = rest.rsplit_once("-s")?;
        if server.is_empty() || !server.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        return valid_id(id).then_some(id);
    }
    let id = name
        .strip_prefix(&format!("{MANIFEST}."))?
        .strip_suffix(".tmp")?;
    valid_id(id).then_some(id)
}

/// Removes files of checkpoints older than `id` (only names of this format).
fn remove_older(dir: &Path, id: &str) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if id_in_name(name).is_some_and(|old| id_older(old, id)) {
            if let Err(err) = std::fs::remove_file(e.path()) {
                tracing::warn!(target: "braid::ps", "checkpoint: cannot remove {}: {err}", e.path().display());
            }
        }
    }
}

/// Fuzzing entry point: `data` as a manifest (decoded and checked; a manifest that decodes is
/// re-encoded and must decode again), and as a server file's header.
#[doc(hidden)]
pub fn fuzz_manifest(data: &[u8]) {
    if let Ok(m) = Manifest::decode(data) {
        let again = serde_json::to_vec(&m).unwrap_or_default();
        assert!(
            Manifest::decode(&again).is_ok(),
            "re-encoded checkpoint manifest does not decode"
        );
    }
    if data.len() >= HEADER_LEN as usize {
        let server = le64(&data[8..16]);
        let _ = data[..HEADER_LEN as usize] == header("0", server);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = id_in_name(s);
        let _ = check_dir(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xxh64_reference_vectors() {
        for (input, want) in [
            (&b""[..], 0xef46_db37_51d8_e999u64),
            (b"a", 0xd24e_c4f1_a98c_6e5b),
            (b"abc", 0x44bc_2cf5_ad77_0999),
            (b"message digest", 0x066e_d728_fcee_b3be),
            (b"abcdefghijklmnopqrstuvwxyz", 0xcfe1_f278_fa89_835c),
            (
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
                0xaaa4_6907_d304_7814,
            ),
            (
                b"12345678901234567890123456789012345678901234567890123456789012345678901234567890",
                0xe04a_477f_19ee_145d,
            ),
        ] {
            assert_eq!(xxh64(input), want, "{:?}", String::from_utf8_lossy(input));
        }
        // Streaming in any chunking equals one call.
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let whole = xxh64(&data);
        for chunk in [1, 3, 7, 8, 31, 32, 33, 64, 100, 4096] {
            let mut h = Xxh64::new(0);
            for c in data.chunks(chunk) {
                h.update(c);
            }
            assert_eq!(h.digest(), whole, "chunks of {chunk}");
        }
    }

    fn snap(k: u64, p: u32, dtype: DataType, version: u64, data: Vec<u8>) -> (PartMeta, Vec<u8>) {
        (
            PartMeta {
                s: part_key(k, p),
                k,
                p,
                dtype,
                version,
                len: data.len() as u64,
                applied: Vec::new(),
            },
            data,
        )
    }

    fn write(
        dir: &Path,
        id: &str,
        server: u64,
        parts: &[(PartMeta, Vec<u8>)],
    ) -> std::result::Result<(FileEntry, Vec<PartEntry>), String> {
        let metas: Vec<PartMeta> = parts.iter().map(|p| p.0.clone()).collect();
        write_server_file(dir, id, server, &metas, |i, b| {
            b.extend_from_slice(&parts[i].1);
            Ok(())
        })
    }

    /// A checkpoint of two servers in a fresh directory.
    fn write_two(dir: &Path, id: &str) -> Manifest {
        let mut a = vec![
            snap(1, 0, DataType::F32, 7, (0..40u8).collect()),
            snap(1, 1, DataType::F32, 7, vec![9; 12]),
            snap(5, 0, DataType::F64, 7, Vec::new()),
        ];
        // The writes one part's value includes travel with it.
        a[1].0.applied = vec![(3, 1 << 60), (4, 7)];
        let b = vec![snap(2, 0, DataType::I64, 7, (0..64u8).rev().collect())];
        let mut files = Vec::new();
        let mut parts = Vec::new();
        for (i, (server, snaps)) in [(11u64, a), (12, b)].into_iter().enumerate() {
            let (f, ps) = write(dir, id, server, &snaps).unwrap();
            files.push(f);
            parts.extend(ps.into_iter().map(|mut p| {
                p.file = i as u32;
                p
            }));
        }
        let mut m = Manifest {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            id: id.into(),
            group: "g".into(),
            mode: "sync".into(),
            partition_bytes: 40,
            epoch: 3,
            version: 7,
            max_version: 7,
            created_unix_ms: 1,
            files,
            parts,
            hash: String::new(),
        };
        m.validate().unwrap();
        write_manifest(dir, &mut m).unwrap();
        m
    }

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("braid-ckpt-unit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn round_trip_and_older_files_removed() {
        let dir = tmpdir("round-trip");
        let m1 = write_two(&dir, "0001");
        let back = read_manifest(&dir).unwrap();
        assert_eq!(back, m1);
        verify_files(&dir, &back).unwrap();
        let got = load_parts(&dir, &back, |s| s == part_key(1, 1) || s == part_key(2, 0)).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].1, vec![9; 12]);
        assert_eq!(got[0].0.applied, vec![(3, 1 << 60), (4, 7)]);
        assert!(got[1].0.applied.is_empty());
        assert_eq!(got[1].1, (0..64u8).rev().collect::<Vec<_>>());
        // A second checkpoint replaces the first; the first's files go once it is in place.
        let m2 = write_two(&dir, "0002");
        assert_eq!(read_manifest(&dir).unwrap().id, "0002");
        for f in &m1.files {
            assert!(!dir.join(&f.name).exists(), "{} kept", f.name);
        }
        verify_files(&dir, &m2).unwrap();
        // An older checkpoint finishing late does not replace a newer one.
        let mut late = m1.clone();
        let e = write_manifest(&dir, &mut late).unwrap_err();
        assert!(e.contains("newer checkpoint"), "{e}");
        assert_eq!(read_manifest(&dir).unwrap().id, "0002");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_crash_before_the_manifest_leaves_the_previous_checkpoint() {
        let dir = tmpdir("crash");
        let m1 = write_two(&dir, "0001");
        // Checkpoint 0002's server files are written, its manifest is not (the writer died):
        // checkpoint 0001 is intact and still the one read.
        write(
            &dir,
            "0002",
            11,
            &[snap(1, 0, DataType::F32, 9, vec![1; 40])],
        )
        .unwrap();
        // A fetch that fails or gives the wrong length fails the file.
        let bad = snap(1, 0, DataType::F32, 9, vec![1; 40]).0;
        let e = write_server_file(&dir, "0003", 11, &[bad], |_, b| {
            b.push(1);
            Ok(())
        })
        .unwrap_err();
        assert!(e.contains("1 bytes, 40 expected"), "{e}");
        std::fs::write(dir.join("ckpt-0002-s12.bin.tmp"), b"half").unwrap();
        let m = read_manifest(&dir).unwrap();
        assert_eq!(m, m1);
        verify_files(&dir, &m).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn corruption_is_detected_and_names_the_file() {
        let dir = tmpdir("corrupt");
        let m = write_two(&dir, "00aa");
        let f0 = dir.join(&m.files[0].name);
        let good = std::fs::read(&f0).unwrap();
        let name = m.files[0].name.clone();
        // A flipped bit in a part.
        let mut bad = good.clone();
        bad[HEADER_LEN as usize + 41] ^= 0x10;
        std::fs::write(&f0, &bad).unwrap();
        let e = verify_files(&dir, &m).unwrap_err();
        assert!(e.contains(&name) && e.contains("checksum mismatch"), "{e}");
        assert!(e.contains("key 1 part 1"), "{e}");
        let e = load_parts(&dir, &m, |s| s == part_key(1, 1)).unwrap_err();
        assert!(e.contains(&name) && e.contains("checksum mismatch"), "{e}");
        // Truncated.
        std::fs::write(&f0, &good[..good.len() - 1]).unwrap();
        let e = verify_files(&dir, &m).unwrap_err();
        assert!(e.contains(&name) && e.contains("truncated"), "{e}");
        // Too long.
        let mut long = good.clone();
        long.push(0);
        std::fs::write(&f0, &long).unwrap();
        let e = verify_files(&dir, &m).unwrap_err();
        assert!(e.contains(&name) && e.contains("too long"), "{e}");
        // A header of another checkpoint.
        let mut other = good.clone();
        other[16] = b'f';
        std::fs::write(&f0, &other).unwrap();
        let e = verify_files(&dir, &m).unwrap_err();
        assert!(e.contains(&name) && e.contains("header"), "{e}");
        // Missing.
        std::fs::remove_file(&f0).unwrap();
        let e = verify_files(&dir, &m).unwrap_err();
        assert!(e.contains(&name) && e.contains("missing"), "{e}");
        std::fs::write(&f0, &good).unwrap();
        verify_files(&dir, &m).unwrap();
        // The manifest: a changed value (checksum), truncation (JSON), and garbage.
        let mp = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&mp).unwrap();
        std::fs::write(&mp, text.replacen("\"version\": 7", "\"version\": 6", 1)).unwrap();
        let e = read_manifest(&dir).unwrap_err();
        assert!(e.contains(MANIFEST) && e.contains("checksum"), "{e}");
        std::fs::write(&mp, &text[..text.len() / 2]).unwrap();
        let e = read_manifest(&dir).unwrap_err();
        assert!(e.contains(MANIFEST) && e.contains("corrupt"), "{e}");
        std::fs::remove_file(&mp).unwrap();
        let e = read_manifest(&dir).unwrap_err();
        assert!(e.contains(MANIFEST), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn malformed_manifests_are_refused() {
        let dir = tmpdir("malformed");
        let m = write_two(&dir, "0b");
        let _ = std::fs::remove_dir_all(&dir);
        let check = |f: &dyn Fn(&mut Manifest), want: &str| {
            let mut x = m.clone();
            f(&mut x);
            x.seal();
            let e = Manifest::decode(&serde_json::to_vec(&x).unwrap()).unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
        };
        check(
            &|x| x.files[0].name = "../../etc/passwd".into(),
            "not named",
        );
        check(&|x| x.id = "../x".into(), "invalid checkpoint id");
        check(&|x| x.parts[0].offset = u64::MAX, "outside file");
        check(&|x| x.parts[0].len = u64::MAX - 3, "outside file");
        check(&|x| x.parts[0].file = 9, "out of range");
        check(&|x| x.parts[0].dtype = "quaternion".into(), "unknown dtype");
        check(&|x| x.parts[0].len -= 1, "whole number");
        check(&|x| x.parts[0].k = 99, "store key");
        check(&|x| x.parts[1] = x.parts[0].clone(), "twice");
        check(&|x| x.parts[0].version = 8, "outside");
        check(&|x| x.files[1].bytes += 4, "end at byte");
        check(&|x| x.format_version = 2, "format version 2");
        check(&|x| x.format = "zip".into(), "not a");
        check(
            &|x| x.parts[0].applied = vec![(1, 1); MAX_APPLIED + 1],
            "applied-write records",
        );
        // Sealed and valid: decodes.
        let mut ok = m.clone();
        ok.seal();
        assert!(Manifest::decode(&serde_json::to_vec(&ok).unwrap()).is_ok());
        for junk in [&b""[..], b"{}", b"[1,2]", b"\xff\xfe"] {
            assert!(Manifest::decode(junk).is_err());
        }
    }

    #[test]
    fn directories_and_names() {
        assert!(check_dir("/tmp/x").is_ok());
        assert!(check_dir("relative/x").is_err());
        assert!(check_dir("/tmp/a\nb").is_err());
        assert!(check_dir(&format!("/{}", "a".repeat(MAX_DIR_LEN))).is_err());
        assert_eq!(id_in_name("ckpt-00ff-s12.bin"), Some("00ff"));
        assert_eq!(id_in_name("ckpt-00ff-s12.bin.tmp"), Some("00ff"));
        assert_eq!(id_in_name("manifest.json.00ff.tmp"), Some("00ff"));
        assert_eq!(id_in_name("ckpt-00ff-s.bin"), None);
        assert_eq!(id_in_name("ckpt-XY-s1.bin"), None);
        assert_eq!(id_in_name("model.bin"), None);
        assert!(id_older("ff", "0100"));
        assert!(id_older("0a", "0b"));
        assert!(!id_older("0b", "0b"));
        let a = new_id(7);
        assert!(valid_id(&a) && a.len() == 24, "{a}");
    }
}
