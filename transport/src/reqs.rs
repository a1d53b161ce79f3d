//! Book-keeping of posted requests, shared by the transports: one table per direction.
//!
//! A request is posted with a number of parts (stripes); it completes when every part is done.
//! Requests may be tested in any order; a completed request is forgotten once it has been
//! tested and every older one has too, so the table stays as small as the work in flight.

use std::collections::VecDeque;

use crate::{Completion, Meta, NetError, NetResult, Request, META_LEN};

#[derive(Clone, Copy)]
struct Slot {
    left: u32,
    tested: bool,
    meta: Meta,
}

/// Posted requests of one direction.
#[derive(Default)]
pub(crate) struct ReqTable {
    base: u64,
    q: VecDeque<Slot>,
    pending: usize,
}

impl ReqTable {
    /// Posts a request of `parts` parts (at least 1) and returns its sequence number.
    pub(crate) fn post(&mut self, parts: u32) -> u64 {
        let seq = self.base + self.q.len() as u64;
        self.q.push_back(Slot {
            left: parts.max(1),
            tested: false,
            meta: [0; META_LEN],
        });
        self.pending += 1;
        seq
    }

    /// Records that one part of `seq` is done.
    pub(crate) fn part_done(&mut self, seq: u64) {
        let Some(s) = seq
            .checked_sub(self.base)
            .and_then(|i| self.q.get_mut(i as usize))
        else {
            return;
        };
        if s.left > 0 {
            s.left -= 1;
            if s.left == 0 {
                self.pending = self.pending.saturating_sub(1);
            }
        }
    }

    /// Sets the meta a completed receive reports.
    pub(crate) fn set_meta(&mut self, seq: u64, meta: Meta) {
        if let Some(s) = seq
            .checked_sub(self.base)
            .and_then(|i| self.q.get_mut(i as usize))
        {
            s.meta = meta;
        }
    }

    /// Requests posted and not yet complete.
    pub(crate) fn pending(&self) -> usize {
        self.pending
    }

    /// Whether `req` completed; `error` is returned for a request that cannot complete any more.
    pub(crate) fn test(
        &mut self,
        req: Request,
        error: Option<&NetError>,
    ) -> NetResult<Option<Completion>> {
        if req.seq < self.base {
            return Ok(Some(Completion {
                len: 0,
                meta: [0; META_LEN],
            }));
        }
        let Some(s) = self.q.get_mut((req.seq - self.base) as usize) else {
            return Err(NetError::Protocol(format!("unknown request {req:?}")));
        };
        if s.left > 0 {
            return match error {
                Some(e) => Err(e.clone()),
                None => Ok(None),
            };
        }
        s.tested = true;
        let c = Completion {
            len: 0,
            meta: s.meta,
        };
        while self.q.front().is_some_and(|s| s.left == 0 && s.tested) {
            self.q.pop_front();
            self.base += 1;
        }
        Ok(Some(c))
    }
}
