//! Communicators created from this one: `create_group` and `split`.

use braid_transport::region::Regions;

use crate::error::{Error, Result};

use super::setup::make_transport_with;
use super::{invalid, lock, Communicator};

/// The group name of a communicator created from the group `parent` (view `epoch`): `label`
/// says how it was created, `ids` are its members' ids (sorted), `k` counts earlier creations
/// with the same label and members. Every member computes the same name; member ids are never
/// reused by a coordinator, so names of different member sets never collide. Bounded length
/// (the coordinator accepts at most 256 bytes): a readable prefix of the parent's name and a
/// SHA-256 digest of everything.
fn subgroup_name(parent: &str, epoch: u64, label: &str, ids: &[u64], k: u64) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"braid subgroup v1\0");
    h.update((parent.len() as u64).to_le_bytes());
    h.update(parent.as_bytes());
    h.update(epoch.to_le_bytes());
    h.update((label.len() as u64).to_le_bytes());
    h.update(label.as_bytes());
    h.update((ids.len() as u64).to_le_bytes());
    for id in ids {
        h.update(id.to_le_bytes());
    }
    h.update(k.to_le_bytes());
    let d = h.finalize();
    let hex: String = d[..16].iter().map(|b| format!("{b:02x}")).collect();
    let mut cut = parent.len().min(64);
    while !parent.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}~{hex}", &parent[..cut])
}

impl Communicator {
    /// Creates a communicator of the ranks `ranks` of this one, like `MPI_Comm_create_group`
    /// (torch's `new_group`): collective over the listed ranks only (the others do not call
    /// it). The new rank of a member is its position in `ranks`; every member must pass the
    /// same list. `tag` tells apart creations that may run at the same time over overlapping
    /// member sets; creations with the same members and tag are told apart by their order
    /// (members must create them in the same order).
    ///
    /// The new communicator is independent: it meets its members through the same coordinator
    /// (and job token) as this one, under a group name derived from this group's name, view
    /// epoch, the members' ids, `tag` and that order; it is not elastic, has its own
    /// connections and threads, and works on after this communicator is dropped (a
    /// coordinator hosted by this process lives on until the last communicator sharing it is
    /// dropped). Its collectives never interfere with this communicator's.
    ///
    /// Blocks until every member called it (at most `BRAID_INIT_TIMEOUT`).
    ///
    /// Errors: [`Error::InvalidArgument`] when `ranks` is empty, has a rank out of range or
    /// twice, or does not include this rank; [`Error::InvalidUsage`] after this member left
    /// an elastic group; as [`Communicator::init`] otherwise (`Error::Timeout` when members
    /// do not all arrive in time). This communicator is unaffected by any of them.
    pub fn create_group(&self, ranks: &[usize], tag: u32) -> Result<Communicator> {
        self.make_group(ranks, &format!("group:{tag}"))
    }

    /// Splits this communicator, like `ncclCommSplit` / `MPI_Comm_split` (torch's
    /// `split_group`): collective over all ranks of this communicator. Ranks passing the same
    /// `Some(color)` form a new communicator, ordered by `key`, then by rank in this one;
    /// `None` takes part but gets no communicator (`Ok(None)`). Built on
    /// [`Communicator::create_group`] after an all-gather of every rank's (color, key); the
    /// new communicators have its properties.
    ///
    /// Errors: as [`Communicator::all_gather`] (the exchange of colors and keys) and
    /// [`Communicator::create_group`].
    pub fn split(&self, color: Option<u32>, key: i64) -> Result<Option<Communicator>> {
        let n = self.size();
        let mine = [color.map_or(-1, i64::from), key];
        let mut all = vec![0i64; 2 * n];
        self.all_gather(&mine, &mut all)?;
        let Some(color) = color else {
            return Ok(None);
        };
        let mut members: Vec<(i64, usize)> = all
            .chunks_exact(2)
            .enumerate()
            .filter(|(_, ck)| ck[0] == i64::from(color))
            .map(|(r, ck)| (ck[1], r))
            .collect();
        members.sort_unstable();
        let ranks: Vec<usize> = members.iter().map(|m| m.1).collect();
        self.make_group(&ranks, "split").map(Some)
    }

    /// Creates the communicator of `ranks` (see [`Communicator::create_group`]); `label`
    /// separates kinds of creation.
    fn make_group(&self, ranks: &[usize], label: &str) -> Result<Communicator> {
        let (n, me) = (self.size(), self.rank());
        if self.left {
            return Err(Error::InvalidUsage(format!(
                "member {} left the group; it cannot create communicators from it",
                self.inner.member
            )));
        }
        if ranks.is_empty() {
            return invalid("create_group: no ranks".into());
        }
        let mut seen = vec![false; n];
        for &r in ranks {
            if r >= n {
                return invalid(format!(
                    "create_group: rank {r} is not a rank of this communicator of {n} ranks"
                ));
            }
            if std::mem::replace(&mut seen[r], true) {
                return invalid(format!("create_group: rank {r} is listed twice"));
            }
        }
        let Some(new_rank) = ranks.iter().position(|&r| r == me) else {
            return invalid(format!(
                "create_group: this rank ({me}) is not in the ranks listed; only members call it"
            ));
        };
        let view = &self.inner.view;
        let mut ids = Vec::with_capacity(ranks.len());
        for &r in ranks {
            match view.members.get(r) {
                Some(m) => ids.push(m.id),
                None => return Err(Error::Internal(format!("no member at rank {r}"))),
            }
        }
        ids.sort_unstable();
        let k = {
            let mut g = lock(&self.subgroups);
            let c = g.entry((label.to_string(), ids.clone())).or_insert(0);
            let k = *c;
            *c += 1;
            k
        };
        let mut cfg = self.inner.cfg.clone();
        cfg.group = subgroup_name(&cfg.group, view.epoch, label, &ids, k);
        cfg.world_size = Some(ranks.len());
        cfg.rank = Some(new_rank);
        cfg.host_coordinator = false;
        cfg.elastic = false;
        tracing::info!(target: "braid::init", "rank {me}: creating communicator {} of {} ranks (rank {new_rank} in it)", cfg.group, ranks.len());
        let regions = Regions::new();
        // In-process ranks share one fabric: keep the parent's transport (every listen makes
        // a new endpoint); otherwise fresh transports of the same configuration.
        let transports = if self.transports.iter().any(|t| t.name() == "mem") {
            self.transports.clone()
        } else {
            make_transport_with(&cfg, Some(regions.clone()))?
        };
        let mut child = Communicator::init_on(cfg, transports, regions)?;
        child.coordinator = self.coordinator.clone();
        Ok(child)
    }
}
