//! Key placement: consistent hashing with virtual nodes, and splitting of large values into
//! parts spread over servers.
//!
//! Each server gets `VNODES × weight` points on a 64-bit ring (weights: measured capacity,
//! optional). A key part is owned by the server of the first point at or after its hash; its
//! replicas are the next distinct servers along the ring. A server joining or leaving moves
//! only the parts whose owner changes — about 1/servers of them.

use std::collections::BTreeMap;

/// Virtual nodes per server of weight 1.
pub const VNODES: usize = 128;

/// SplitMix64: a fast, well-mixed 64-bit hash (stable across processes and versions).
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The store key of part `part` of user key `key` (what servers index by).
pub fn part_key(key: u64, part: u32) -> u64 {
    mix(mix(key) ^ u64::from(part).wrapping_mul(0xd6e8_feb8_6659_fd93))
}

/// One part of a value: which bytes of the value it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    /// Part index (0-based).
    pub index: u32,
    /// Store key of the part ([`part_key`]).
    pub skey: u64,
    /// Byte offset in the value.
    pub offset: usize,
    /// Byte length.
    pub len: usize,
}

/// Splits a value of `bytes` bytes (elements of `esize` bytes) into parts of at most
/// `part_bytes` (rounded down to whole elements, at least one element); a value that fits is
/// one part.
pub fn split(key: u64, bytes: usize, esize: usize, part_bytes: usize) -> Vec<Part> {
    let esize = esize.max(1);
    let unit = (part_bytes / esize).max(1) * esize;
    if bytes <= unit {
        return vec![Part {
            index: 0,
            skey: part_key(key, 0),
            offset: 0,
            len: bytes,
        }];
    }
    let n = bytes.div_ceil(unit);
    // Equal parts (in whole elements), so no tiny tail part.
    let elems = bytes / esize;
    let per = elems / n;
    let extra = elems % n;
    let mut out = Vec::with_capacity(n);
    let mut off = 0;
    for i in 0..n {
        let len = (per + usize::from(i < extra)) * esize;
        out.push(Part {
            index: i as u32,
            skey: part_key(key, i as u32),
            offset: off,
            len,
        });
        off += len;
    }
    out
}

/// A consistent-hash ring over servers (member ids).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ring {
    points: BTreeMap<u64, u64>,
    servers: Vec<u64>,
}

impl Ring {
    /// A ring over `servers` (member id, weight > 0).
    pub fn new(servers: &[(u64, f64)]) -> Ring {
        let mut points = BTreeMap::new();
        for &(id, w) in servers {
            let n = ((VNODES as f64) * w.clamp(0.01, 100.0)).round().max(1.0) as u64;
            for v in 0..n {
                let mut p = mix(mix(id) ^ mix(v.wrapping_add(0x5151)));
                // Collisions are vanishingly rare; probe to keep every point.
                while points.contains_key(&p) {
                    p = mix(p);
                }
                points.insert(p, id);
            }
        }
        let mut servers: Vec<u64> = servers.iter().map(|s| s.0).collect();
        servers.sort_unstable();
        servers.dedup();
        Ring { points, servers }
    }

    /// The servers on the ring, in id order.
    pub fn servers(&self) -> &[u64] {
        &self.servers
    }

    /// The owner of store key `skey` followed by up to `replicas` further distinct servers.
    pub fn owners(&self, skey: u64, replicas: usize) -> Vec<u64> {
        let want = replicas.saturating_add(1).min(self.servers.len());
        let mut out = Vec::with_capacity(want);
        for (_, &id) in self.points.range(skey..).chain(self.points.range(..skey)) {
            if !out.contains(&id) {
                out.push(id);
                if out.len() == want {
                    break;
                }
            }
        }
        out
    }

    /// The owner of store key `skey` (`None` on an empty ring).
    pub fn owner(&self, skey: u64) -> Option<u64> {
        // The first point at or after `skey`, wrapping round (no list built: this runs for
        // every part of every request).
        self.points
            .range(skey..)
            .next()
            .or_else(|| self.points.iter().next())
            .map(|(_, &id)| id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_the_value_in_whole_elements() {
        assert_eq!(split(7, 100, 4, 1 << 20).len(), 1);
        let p = split(7, 10 * 4 + 4, 4, 16);
        assert_eq!(p.iter().map(|x| x.len).sum::<usize>(), 44);
        assert!(p.iter().all(|x| x.len % 4 == 0 && x.len <= 16 && x.len > 0));
        for w in p.windows(2) {
            assert_eq!(w[0].offset + w[0].len, w[1].offset);
        }
        let keys: std::collections::HashSet<u64> = p.iter().map(|x| x.skey).collect();
        assert_eq!(keys.len(), p.len());
        // Element larger than the part size: one element per part.
        assert_eq!(split(1, 64, 8, 4).len(), 8);
    }

    #[test]
    fn a_joining_server_moves_about_one_share_of_the_keys() {
        let r3 = Ring::new(&[(1, 1.0), (2, 1.0), (3, 1.0)]);
        let r4 = Ring::new(&[(1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0)]);
        let n = 20_000u64;
        let mut moved = 0;
        let mut per = [0usize; 5];
        for k in 0..n {
            let s = part_key(k, 0);
            let (a, b) = (r3.owner(s).unwrap(), r4.owner(s).unwrap());
            per[b as usize] += 1;
            if a != b {
                moved += 1;
                assert_eq!(b, 4, "only keys that go to the new server move");
            }
        }
        let frac = moved as f64 / n as f64;
        assert!((0.15..0.35).contains(&frac), "moved {frac}");
        for (s, &c) in per.iter().enumerate().skip(1) {
            let share = c as f64 / n as f64;
            assert!((0.15..0.35).contains(&share), "server {s} holds {share}");
        }
    }

    #[test]
    fn replicas_are_distinct_and_follow_the_owner() {
        let r = Ring::new(&[(10, 1.0), (20, 1.0), (30, 1.0)]);
        for k in 0..1000 {
            let o = r.owners(part_key(k, 0), 1);
            assert_eq!(o.len(), 2);
            assert_ne!(o[0], o[1]);
        }
        assert_eq!(Ring::new(&[(5, 1.0)]).owners(1, 1), vec![5]);
        assert!(Ring::new(&[]).owner(1).is_none());
    }

    /// `owner` (no list built) is the first of `owners`, also for keys past the last point
    /// of the ring (wrapping round to the first) and before the first.
    #[test]
    fn owner_is_the_first_of_owners() {
        for servers in [
            vec![(7, 1.0)],
            vec![(1, 1.0), (2, 1.0)],
            vec![(3, 1.0), (9, 2.5), (4, 0.5)],
        ] {
            let r = Ring::new(&servers);
            let first = *r.points.keys().next().unwrap();
            let last = *r.points.keys().next_back().unwrap();
            let edges = [0, first.saturating_sub(1), first, first + 1, last, u64::MAX];
            for k in (0..5000).map(|k| part_key(k, 0)).chain(edges) {
                assert_eq!(r.owner(k), r.owners(k, 0).first().copied(), "key {k}");
            }
            assert_eq!(r.owner(u64::MAX), Some(*r.points.values().next().unwrap()));
        }
    }

    #[test]
    fn weights_shift_the_shares() {
        let r = Ring::new(&[(1, 1.0), (2, 3.0)]);
        let n = 20_000u64;
        let heavy = (0..n)
            .filter(|k| r.owner(part_key(*k, 0)) == Some(2))
            .count();
        let share = heavy as f64 / n as f64;
        assert!((0.65..0.85).contains(&share), "{share}");
    }
}
