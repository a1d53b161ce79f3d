//! The binary form of the frequent push/pull headers (requests, answers, replications):
//! fixed-width little-endian fields after a marker byte and a type byte, so the hot path
//! neither formats nor parses text. Every other message travels as JSON (a JSON header starts
//! with `{`, a binary one with [`MARK`]), and both forms decode everywhere.
//!
//! Layout: `MARK`, type, then the variant's fields in declaration order:
//! * `u64`/`i32`/`u32`: little-endian, 8/4/4 bytes; `bool`: one byte, 0 or 1;
//! * a string: `u32` byte length, then UTF-8;
//! * `Option<T>`: one byte (0 absent, 1 present), then `T` if present;
//! * a list: `u32` count, then the items (a part: `s`, `k` u64, `p` u32, `n`, `t` u64);
//! * a replication: `seq`, `worker`, `rule` (optional string), then the replicated message
//!   with its own type byte (one level: a replication never holds a replication).
//!
//! Decoding checks every length against the bytes that are actually there before it
//! allocates (the header itself is bounded by the channel's limits), refuses unknown types,
//! non-0/1 flags, invalid UTF-8 and trailing bytes.

use super::{Msg, PartRef};

/// First byte of a binary header (never the first byte of a JSON one).
pub(crate) const MARK: u8 = 0xB7;

pub(super) const INIT: u8 = 1;
pub(super) const PUSH: u8 = 2;
const PULL: u8 = 3;
const SNAP_VER: u8 = 4;
const ACK: u8 = 5;
const VALUES: u8 = 6;
const SNAP: u8 = 7;
const FAIL: u8 = 8;
const REPLICATE: u8 = 9;
const REP_ACK: u8 = 10;
const PULL_STATE: u8 = 11;
pub(super) const PUSH_STATE: u8 = 12;

/// Bytes of one encoded [`PartRef`].
const PART_BYTES: usize = 8 + 8 + 4 + 8 + 8;

/// Encodes `m` in binary form, or returns `None` for a message that travels as JSON.
pub(crate) fn encode(m: &Msg) -> Option<Vec<u8>> {
    let mut w = Vec::with_capacity(64 + parts_of(m).map_or(0, |p| p.len() * PART_BYTES));
    w.push(MARK);
    if let Msg::Replicate {
        seq,
        worker,
        op,
        rule,
    } = m
    {
        w.push(REPLICATE);
        u64_(&mut w, *seq);
        u64_(&mut w, *worker);
        match rule {
            Some(r) => {
                u32::try_from(r.len()).ok()?;
                w.push(1);
                str_(&mut w, r);
            }
            None => w.push(0),
        }
        body(&mut w, op)?;
    } else {
        body(&mut w, m)?;
    }
    Some(w)
}

fn parts_of(m: &Msg) -> Option<&[PartRef]> {
    match m {
        Msg::Init { parts, .. }
        | Msg::Push { parts, .. }
        | Msg::Pull { parts, .. }
        | Msg::PullState { parts, .. }
        | Msg::PushState { parts, .. } => Some(parts),
        Msg::Replicate { op, .. } => parts_of(op),
        _ => None,
    }
}

fn u64_(w: &mut Vec<u8>, v: u64) {
    w.extend_from_slice(&v.to_le_bytes());
}

fn u32_(w: &mut Vec<u8>, v: u32) {
    w.extend_from_slice(&v.to_le_bytes());
}

fn str_(w: &mut Vec<u8>, s: &str) {
    u32_(w, s.len() as u32);
    w.extend_from_slice(s.as_bytes());
}

fn opt_(w: &mut Vec<u8>, v: Option<u64>) {
    match v {
        Some(v) => {
            w.push(1);
            u64_(w, v);
        }
        None => w.push(0),
    }
}

fn parts_(w: &mut Vec<u8>, parts: &[PartRef]) {
    u32_(w, parts.len() as u32);
    for p in parts {
        u64_(w, p.s);
        u64_(w, p.k);
        u32_(w, p.p);
        u64_(w, p.n as u64);
        u64_(w, p.t);
    }
}

fn u64s_(w: &mut Vec<u8>, v: &[u64]) {
    u32_(w, v.len() as u32);
    for x in v {
        u64_(w, *x);
    }
}

/// Writes the type byte and fields of a message that is not a replication (`None`: it has no
/// binary form, or a string or list is too long for its `u32` length).
fn body(w: &mut Vec<u8>, m: &Msg) -> Option<()> {
    let too_long = |n: usize| u32::try_from(n).is_err();
    match m {
        Msg::Init {
            req,
            op,
            prio,
            dtype,
            parts,
        }
        | Msg::Push {
            req,
            op,
            prio,
            dtype,
            parts,
        }
        | Msg::PushState {
            req,
            op,
            prio,
            dtype,
            parts,
        } => {
            if too_long(dtype.len()) || too_long(parts.len()) {
                return None;
            }
            w.push(match m {
                Msg::Init { .. } => INIT,
                Msg::Push { .. } => PUSH,
                _ => PUSH_STATE,
            });
            u64_(w, *req);
            u64_(w, *op);
            u32_(w, *prio as u32);
            str_(w, dtype);
            parts_(w, parts);
        }
        Msg::Pull {
            req,
            epoch,
            prio,
            parts,
            min,
            at,
        } => {
            if too_long(parts.len()) {
                return None;
            }
            w.push(PULL);
            u64_(w, *req);
            u64_(w, *epoch);
            u32_(w, *prio as u32);
            parts_(w, parts);
            opt_(w, *min);
            opt_(w, *at);
        }
        Msg::PullState { req, prio, parts } => {
            if too_long(parts.len()) {
                return None;
            }
            w.push(PULL_STATE);
            u64_(w, *req);
            u32_(w, *prio as u32);
            parts_(w, parts);
        }
        Msg::SnapVer { req } => {
            w.push(SNAP_VER);
            u64_(w, *req);
        }
        Msg::Ack { req, versions } | Msg::Values { req, versions } => {
            if too_long(versions.len()) {
                return None;
            }
            w.push(if matches!(m, Msg::Ack { .. }) {
                ACK
            } else {
                VALUES
            });
            u64_(w, *req);
            u64s_(w, versions);
        }
        Msg::Snap { req, version } => {
            w.push(SNAP);
            u64_(w, *req);
            opt_(w, *version);
        }
        Msg::Fail { req, msg, retry } => {
            if too_long(msg.len()) {
                return None;
            }
            w.push(FAIL);
            u64_(w, *req);
            str_(w, msg);
            w.push(u8::from(*retry));
        }
        Msg::RepAck { seq } => {
            w.push(REP_ACK);
            u64_(w, *seq);
        }
        _ => return None,
    }
    Some(())
}

/// Reads a binary header (its first byte is [`MARK`]).
pub(crate) fn decode(b: &[u8]) -> Result<Msg, String> {
    let mut r = Reader { b, at: 0 };
    if r.u8()? != MARK {
        return Err("not a binary header".into());
    }
    let m = match r.u8()? {
        REPLICATE => {
            let seq = r.u64()?;
            let worker = r.u64()?;
            let rule = if r.flag()? { Some(r.str()?) } else { None };
            let ty = r.u8()?;
            if ty == REPLICATE {
                return Err("a replication inside a replication".into());
            }
            let op = Box::new(r.body(ty)?);
            Msg::Replicate {
                seq,
                worker,
                op,
                rule,
            }
        }
        ty => r.body(ty)?,
    };
    if r.at != b.len() {
        return Err(format!(
            "{} bytes after the {} header",
            b.len() - r.at,
            m.kind()
        ));
    }
    Ok(m)
}

/// A write of type `ty` ([`INIT`], [`PUSH`], else a [`PUSH_STATE`]) with these fields.
pub(super) fn write(
    ty: u8,
    req: u64,
    op: u64,
    prio: i32,
    dtype: String,
    parts: Vec<PartRef>,
) -> Msg {
    match ty {
        INIT => Msg::Init {
            req,
            op,
            prio,
            dtype,
            parts,
        },
        PUSH => Msg::Push {
            req,
            op,
            prio,
            dtype,
            parts,
        },
        _ => Msg::PushState {
            req,
            op,
            prio,
            dtype,
            parts,
        },
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| format!("header ends inside a field (at byte {})", self.at))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn flag(&mut self) -> Result<bool, String> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(format!("flag byte {v} (0 or 1)")),
        }
    }

    fn u32(&mut self) -> Result<u32, String> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }

    fn i32(&mut self) -> Result<i32, String> {
        Ok(self.u32()? as i32)
    }

    fn opt(&mut self) -> Result<Option<u64>, String> {
        Ok(if self.flag()? {
            Some(self.u64()?)
        } else {
            None
        })
    }

    fn str(&mut self) -> Result<String, String> {
        let n = self.u32()? as usize;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| "a string is not UTF-8".to_string())
    }

    /// A list count, checked against the bytes left for items of `each` bytes.
    fn count(&mut self, each: usize) -> Result<usize, String> {
        let n = self.u32()? as usize;
        if n.saturating_mul(each) > self.b.len() - self.at {
            return Err(format!("a list of {n} items in a shorter header"));
        }
        Ok(n)
    }

    fn parts(&mut self) -> Result<Vec<PartRef>, String> {
        let n = self.count(PART_BYTES)?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let s = self.u64()?;
            let k = self.u64()?;
            let p = self.u32()?;
            let n = usize::try_from(self.u64()?).map_err(|_| "part length overflows")?;
            let t = self.u64()?;
            v.push(PartRef { s, k, p, n, t });
        }
        Ok(v)
    }

    fn u64s(&mut self) -> Result<Vec<u64>, String> {
        let n = self.count(8)?;
        (0..n).map(|_| self.u64()).collect()
    }

    /// The fields of a message of type `ty` (not a replication).
    fn body(&mut self, ty: u8) -> Result<Msg, String> {
        Ok(match ty {
            INIT | PUSH | PUSH_STATE => {
                let req = self.u64()?;
                let op = self.u64()?;
                let prio = self.i32()?;
                let dtype = self.str()?;
                let parts = self.parts()?;
                write(ty, req, op, prio, dtype, parts)
            }
            PULL => Msg::Pull {
                req: self.u64()?,
                epoch: self.u64()?,
                prio: self.i32()?,
                parts: self.parts()?,
                min: self.opt()?,
                at: self.opt()?,
            },
            PULL_STATE => Msg::PullState {
                req: self.u64()?,
                prio: self.i32()?,
                parts: self.parts()?,
            },
            SNAP_VER => Msg::SnapVer { req: self.u64()? },
            ACK => Msg::Ack {
                req: self.u64()?,
                versions: self.u64s()?,
            },
            VALUES => Msg::Values {
                req: self.u64()?,
                versions: self.u64s()?,
            },
            SNAP => Msg::Snap {
                req: self.u64()?,
                version: self.opt()?,
            },
            FAIL => Msg::Fail {
                req: self.u64()?,
                msg: self.str()?,
                retry: self.flag()?,
            },
            REP_ACK => Msg::RepAck { seq: self.u64()? },
            t => return Err(format!("unknown binary message type {t}")),
        })
    }
}
