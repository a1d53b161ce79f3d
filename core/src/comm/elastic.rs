//! Elastic membership: adopting the next view (`update`), graceful leave, pipeline metrics,
//! state sync for joiners.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::types::{Element, ReduceOp};

use super::{lock, Communicator};

impl Communicator {
    /// Waits for queued non-blocking operations and stops the progress thread (it restarts
    /// on the next non-blocking call, on the then current view).
    fn quiesce(&mut self) -> Result<()> {
        let end = Instant::now() + self.inner.cfg.timeout;
        {
            let mut q = lock(&self.inner.queue);
            while q.outstanding > 0 {
                if Instant::now() >= end {
                    return Err(Error::Timeout {
                        what: format!(
                            "update(): waiting for {} pending non-blocking operations",
                            q.outstanding
                        ),
                        secs: self.inner.cfg.timeout.as_secs_f64(),
                    });
                }
                q = self
                    .inner
                    .qcv
                    .wait_timeout(q, Duration::from_millis(20))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
        }
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.qcv.notify_all();
        if let Some(h) = lock(&self.progress).take() {
            let _ = h.join();
        }
        // The thread is gone: the next non-blocking call starts a new one, which must not see
        // the stop request (an update() that kept the view keeps this `inner`).
        self.inner.stop.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Adopts the next membership view, if there is one, at a point all members agree on.
    ///
    /// Call it from the training loop between steps, on every rank (it is collective over the
    /// current view). Returns `Ok(true)` when the view changed: rank and size may differ, new
    /// members are reachable, collectives include them; the caller then typically runs
    /// [`Communicator::sync_from_oldest`] so joiners receive the current state. Returns
    /// `Ok(false)` when nothing changed (cost: one 8-byte all-reduce; nothing is asked of the
    /// coordinator, which pushes announcements to members).
    ///
    /// After a failure (a collective returned `PeerLost`, or a peer aborted), `update()` moves
    /// the survivors into the next view that excludes the lost member: it asks the coordinator
    /// for a resync and waits (at most `BRAID_INIT_TIMEOUT`) for that view, then returns
    /// `Ok(true)`; the sticky error is cleared. Non-blocking operations still pending are waited
    /// for first.
    ///
    /// After [`Communicator::leave`], the update that excludes this member returns `Ok(true)`
    /// with [`Communicator::has_left`] true; later collectives fail with `InvalidUsage`.
    ///
    /// On a group that is not elastic (`BRAID_ELASTIC` unset) it returns `Ok(false)`, or the
    /// sticky error if the communicator failed.
    ///
    /// Errors: the sticky error on non-elastic groups; `Error::Aborted` after
    /// [`Communicator::abort`]; `Error::Coordinator` when the coordinator retired this member
    /// (declared dead, e.g. after a network partition: it may join again as a new member);
    /// `Error::Timeout` when no view arrives in time.
    pub fn update(&mut self) -> Result<bool> {
        if self.left {
            return Err(Error::InvalidUsage(format!(
                "member {} left the group at epoch {}",
                self.inner.member, self.inner.view.epoch
            )));
        }
        let sticky = self.error();
        if !self.inner.cfg.elastic {
            return match sticky {
                Some(e) => Err(e),
                None => Ok(false),
            };
        }
        if matches!(sticky, Some(Error::Aborted)) || self.inner.abort.load(Ordering::SeqCst) {
            return Err(Error::Aborted);
        }
        if let Some(why) = lock(&self.client).as_ref().and_then(|c| c.expelled()) {
            return Err(Error::Coordinator(why));
        }
        self.quiesce()?;
        let cur = self.inner.view.epoch;
        let announced = lock(&self.client)
            .as_ref()
            .map_or(cur, |c| c.announced_epoch());
        // 1. Healthy: agree on the highest announced epoch.
        let mut target = None;
        if sticky.is_none() && self.attempted <= cur {
            let mut v = [announced];
            match self.all_reduce_inplace(&mut v, ReduceOp::Max) {
                Ok(()) if v[0] <= cur => return Ok(false),
                Ok(()) => target = Some(v[0]),
                Err(e) => {
                    tracing::warn!(target: "braid::init", "member {}: update() agreement failed: {e}; resynchronising", self.inner.member);
                }
            }
        }
        let deadline = Instant::now() + self.inner.cfg.init_timeout;
        let start = Instant::now();
        let mut round = 0u32;
        loop {
            round += 1;
            let epoch = match target.take() {
                Some(e) => e,
                None => {
                    // 2. Failed: ask for the next view and wait for it.
                    let base = cur.max(self.attempted);
                    let suspects = self.suspects();
                    let guard = lock(&self.client);
                    let Some(c) = guard.as_ref() else {
                        return Err(Error::InvalidUsage("no coordinator connection".into()));
                    };
                    c.resync(base, suspects);
                    let abort = self.inner.abort.clone();
                    c.wait_epoch(base + 1, deadline, &abort)?
                }
            };
            let got = {
                let guard = lock(&self.client);
                let Some(c) = guard.as_ref() else {
                    return Err(Error::InvalidUsage("no coordinator connection".into()));
                };
                c.view_of(epoch).or_else(|| {
                    // Agreed on an epoch whose view this member missed (it reconnected meanwhile):
                    // take the newest.
                    let top = c.announced_epoch();
                    c.view_of(top)
                })
            };
            let Some((view, reason)) = got else {
                if Instant::now() >= deadline {
                    return Err(Error::Timeout {
                        what: format!("update(): view epoch {epoch} never arrived"),
                        secs: start.elapsed().as_secs_f64(),
                    });
                }
                continue;
            };
            let ep = view.epoch;
            // Eager: a member of the new view that died is found here (connecting to it
            // fails) and the next view is tried, before update() returns.
            match self.install(view, deadline, false) {
                Ok(()) => {
                    tracing::info!(target: "braid::init", "member {}: view epoch {ep} ({reason}) after {:.3} s, {round} round(s)",
                        self.inner.member, start.elapsed().as_secs_f64());
                    return Ok(true);
                }
                Err(e) => {
                    if let Some(why) = lock(&self.client).as_ref().and_then(|c| c.expelled()) {
                        return Err(Error::Coordinator(why));
                    }
                    if Instant::now() >= deadline {
                        return Err(e);
                    }
                    tracing::warn!(target: "braid::init", "member {}: installing view epoch {ep} failed: {e}; trying the next one", self.inner.member);
                }
            }
        }
    }

    /// Member ids named by the sticky error (the peers this member lost).
    fn suspects(&self) -> Vec<u64> {
        let view = &self.inner.view;
        match self.error() {
            Some(Error::PeerLost { member, .. }) => vec![member],
            Some(Error::Remote { rank, .. }) => {
                view.members.get(rank).map(|m| m.id).into_iter().collect()
            }
            _ => Vec::new(),
        }
    }

    /// Announces a graceful leave to the coordinator. Keep running the training loop (with
    /// [`Communicator::update`] between steps) until `update()` returns true and
    /// [`Communicator::has_left`] is true: the other members adopt a view without this member
    /// at that point, and nothing fails.
    ///
    /// Errors: `InvalidUsage` when the group is not elastic or this member already left.
    pub fn leave(&mut self) -> Result<()> {
        if !self.inner.cfg.elastic {
            return Err(Error::InvalidUsage(
                "leave() needs an elastic group (BRAID_ELASTIC=1)".into(),
            ));
        }
        if self.left {
            return Err(Error::InvalidUsage("this member already left".into()));
        }
        match lock(&self.client).as_ref() {
            Some(c) => {
                c.leave();
                Ok(())
            }
            None => Err(Error::InvalidUsage("no coordinator connection".into())),
        }
    }

    /// Whether this member left the group (see [`Communicator::leave`]).
    pub fn has_left(&self) -> bool {
        self.left
    }

    /// Elastic pipelines: reports that this member's stage, blocks `blocks` of a pipeline whose
    /// block costs are `costs`, took `seconds` of compute (excluding waits) in the last step.
    /// The coordinator follows each member's measured throughput (stage cost per second,
    /// smoothed) and, when every stage has reported at least twice in the current view and a
    /// plan with the measured weights is predicted to shorten the slowest stage by more than
    /// `BRAID_PIPELINE_REPLAN_GAIN`, publishes a view with the same members re-weighed
    /// (reason "reweigh: ..."); [`Communicator::update`] adopts it like any view change, and
    /// a re-plan over the new view's weights gives slow members fewer blocks.
    ///
    /// Returns at once: the report is sent by the membership thread (never on the caller's
    /// thread). `seconds` 0 or an empty stage is accepted and ignored.
    ///
    /// Errors: `InvalidUsage` when the group is not elastic or this member left;
    /// `InvalidArgument` for more than 65536 blocks, a negative or non-finite cost or time, or
    /// `blocks` not within `costs`.
    pub fn report_pipeline_metric(
        &self,
        seconds: f64,
        blocks: std::ops::Range<usize>,
        costs: &[f64],
    ) -> Result<()> {
        if !self.inner.cfg.elastic {
            return Err(Error::InvalidUsage(
                "pipeline metrics need an elastic group (BRAID_ELASTIC=1)".into(),
            ));
        }
        if self.left {
            return Err(Error::InvalidUsage("this member left the group".into()));
        }
        let epoch = self.inner.view.epoch;
        let gain = self.inner.cfg.pipeline_replan_gain;
        match lock(&self.client).as_ref() {
            Some(c) => c.report_pipeline_metric(epoch, seconds, blocks, costs, gain),
            None => Err(Error::InvalidUsage("no coordinator connection".into())),
        }
    }

    /// Broadcasts `buf` from the member with the smallest id (the oldest member) to all: after
    /// a view change, joiners start from the current parameters. Collective; call it on every
    /// rank, once per buffer, in the same order.
    ///
    /// Errors: as [`Communicator::broadcast`].
    pub fn sync_from_oldest<T: Element>(&self, buf: &mut [T]) -> Result<()> {
        let root = self.oldest_rank();
        self.broadcast(buf, root)
    }

    /// The rank of the member with the smallest id.
    pub fn oldest_rank(&self) -> usize {
        self.inner
            .view
            .members
            .iter()
            .enumerate()
            .min_by_key(|(_, m)| m.id)
            .map_or(0, |(r, _)| r)
    }
}
